//! The configuration file. Every key has a default, so no file is needed.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
};

use anyhow::{Context, bail};
use serde::Deserialize;

/// Kabar's configuration (`kabar.toml`). See `docs/config.md` for the reference.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The server name in user ids (`@alice:<server_name>`). Cannot change once users exist.
    pub server_name: String,
    /// Address the client API listens on.
    pub listen: SocketAddr,
    /// URL clients reach the server at, for `/.well-known/matrix/client`.
    /// Defaults to `http://<listen>`.
    pub public_base_url: Option<String>,
    /// Where the database and media live.
    pub data_dir: PathBuf,
    /// Log filter (`error`, `warn`, `info`, `debug`, `trace`, or a tracing directive).
    pub log: String,
    pub registration: RegistrationConfig,
    pub rooms: RoomsConfig,
    pub limits: LimitsConfig,
    pub password_hashing: PasswordHashingConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrationConfig {
    /// `auto`: open while listening on loopback only, token-only otherwise;
    /// `open`: anyone may register; `token`: a registration token is required;
    /// `closed`: nobody may register.
    pub mode: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomsConfig {
    /// Room version for new rooms: `10`, `11` or `12`.
    pub default_version: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest JSON request body in bytes.
    pub max_json_body_bytes: usize,
    /// Largest media upload in bytes.
    pub max_upload_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PasswordHashingConfig {
    /// argon2id memory cost in KiB (at least 19456, OWASP's minimum).
    pub memory_kib: u32,
    /// argon2id passes (at least 2).
    pub iterations: u32,
    /// Threads that hash passwords; 0 means one per core.
    pub threads: usize,
    /// Hashes that may wait; beyond this, clients are told to retry later.
    pub queue: usize,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server_name: "localhost".into(),
            listen: "127.0.0.1:8008".parse().expect("valid address"),
            public_base_url: None,
            data_dir: PathBuf::from("./kabar-data"),
            log: "info".into(),
            registration: RegistrationConfig::default(),
            rooms: RoomsConfig::default(),
            limits: LimitsConfig::default(),
            password_hashing: PasswordHashingConfig::default(),
        }
    }
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        Self { mode: "auto".into() }
    }
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self {
            default_version: "12".into(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_json_body_bytes: 1024 * 1024,
            max_upload_bytes: 50 * 1024 * 1024,
        }
    }
}

impl Default for PasswordHashingConfig {
    fn default() -> Self {
        Self {
            memory_kib: 19 * 1024,
            iterations: 2,
            threads: 0,
            queue: 256,
        }
    }
}

impl Config {
    pub fn load(path: Option<&Path>) -> anyhow::Result<Self> {
        let config: Config = match path {
            None => Config::default(),
            Some(p) => {
                let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
                toml::from_str(&text).with_context(|| format!("in {}", p.display()))?
            }
        };
        config.validate()?;
        Ok(config)
    }

    pub fn validate(&self) -> anyhow::Result<()> {
        if ruma::ServerName::parse(&self.server_name).is_err() {
            bail!("server_name {:?} is not a valid server name", self.server_name);
        }
        if !["auto", "open", "token", "closed"].contains(&self.registration.mode.as_str()) {
            bail!(
                "registration.mode must be auto, open, token or closed, not {:?}",
                self.registration.mode
            );
        }
        if !["10", "11", "12"].contains(&self.rooms.default_version.as_str()) {
            bail!("rooms.default_version must be 10, 11 or 12");
        }
        if self.password_hashing.memory_kib < 19 * 1024 || self.password_hashing.iterations < 2 {
            bail!("password_hashing must be at least memory_kib = 19456 and iterations = 2");
        }
        if self.limits.max_json_body_bytes < 65_536 {
            bail!("limits.max_json_body_bytes must be at least 65536 (one event)");
        }
        Ok(())
    }

    pub fn public_base_url(&self, bound: SocketAddr) -> String {
        self.public_base_url.clone().unwrap_or_else(|| format!("http://{bound}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_unknown_keys_are_refused() {
        Config::default().validate().unwrap();
        assert!(toml::from_str::<Config>("server_nmae = \"x\"").is_err());
        let c: Config = toml::from_str("[registration]\nmode = \"token\"").unwrap();
        assert_eq!(c.registration.mode, "token");
        assert_eq!(c.listen.port(), 8008, "unset keys keep their defaults");
        let bad: Config = toml::from_str("[rooms]\ndefault_version = \"9\"").unwrap();
        assert!(bad.validate().is_err());
    }
}
