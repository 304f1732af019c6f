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
    /// Address of the Prometheus metrics listener (`/metrics`); off when unset.
    /// Keep it off the public network.
    pub metrics_listen: Option<SocketAddr>,
    pub admission: AdmissionConfig,
    pub work: WorkConfig,
}

/// Rate limits for newcomers, per client address and for the whole server.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionConfig {
    /// Attempts to complete a registration.
    pub register: RateLimitConfig,
    /// Password logins.
    pub login: RateLimitConfig,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Sustained attempts per minute from one client address (an IPv6 /64); 0 turns it off.
    pub per_address_per_minute: u32,
    /// Attempts one address may make in a burst.
    pub per_address_burst: u32,
    /// Sustained attempts per second for the whole server; 0 (the default)
    /// leaves the pace to the measured capacity of the hashing pool.
    pub global_per_second: u32,
    /// Attempts the whole server may take in a burst.
    pub global_burst: u32,
}

/// Bounded classes of expensive work. Unset values take each class's default.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct WorkConfig {
    /// Initial and full-state syncs.
    pub initial_sync: WorkClassConfig,
    /// Room joins.
    pub join: WorkClassConfig,
    /// Thumbnail generation.
    pub thumbnail: WorkClassConfig,
}

#[derive(Debug, Clone, Copy, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct WorkClassConfig {
    /// How many run at once (0: one per core).
    pub slots: Option<usize>,
    /// How many may wait for a slot.
    pub max_queued: Option<usize>,
    /// The longest one may wait, in milliseconds; a request predicted to wait
    /// longer is refused at once with M_LIMIT_EXCEEDED.
    pub max_queue_delay_ms: Option<u64>,
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
    /// The longest a hash may wait for a thread, in milliseconds; a request
    /// predicted to wait longer is refused at once with M_LIMIT_EXCEEDED.
    pub max_queue_delay_ms: u64,
    /// CPU priority of the hashing threads against the threads serving
    /// requests: `idle` (only spare CPU; signed-in users always first), `low`
    /// (nice 19) or `normal`.
    pub priority: String,
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
            metrics_listen: None,
            admission: AdmissionConfig::default(),
            work: WorkConfig::default(),
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
            max_queue_delay_ms: 2_000,
            priority: "idle".into(),
        }
    }
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            per_address_per_minute: 30,
            per_address_burst: 10,
            global_per_second: 0,
            global_burst: 100,
        }
    }
}

impl WorkClassConfig {
    /// This class's settings with `defaults` filling what is unset; 0 slots
    /// means one per core.
    pub fn resolve(&self, defaults: (usize, usize, u64), cores: usize) -> (usize, usize, u64) {
        let slots = self.slots.unwrap_or(defaults.0);
        (
            if slots == 0 { cores } else { slots },
            self.max_queued.unwrap_or(defaults.1),
            self.max_queue_delay_ms.unwrap_or(defaults.2),
        )
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
        for (name, r) in [("register", &self.admission.register), ("login", &self.admission.login)] {
            if r.per_address_per_minute > 0 && r.per_address_burst == 0 {
                bail!("admission.{name}.per_address_burst must be at least 1 when per_address_per_minute is set");
            }
            if r.global_per_second > 0 && r.global_burst == 0 {
                bail!("admission.{name}.global_burst must be at least 1 when global_per_second is set");
            }
        }
        if !["idle", "low", "normal"].contains(&self.password_hashing.priority.as_str()) {
            bail!(
                "password_hashing.priority must be idle, low or normal, not {:?}",
                self.password_hashing.priority
            );
        }
        if self.password_hashing.max_queue_delay_ms == 0 {
            bail!("password_hashing.max_queue_delay_ms must be at least 1");
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

    #[test]
    fn load_settings_are_checked() {
        let c: Config = toml::from_str("[admission.login]\nper_address_burst = 3\n\n[work.join]\nslots = 8").unwrap();
        c.validate().unwrap();
        assert_eq!(c.admission.login.per_address_burst, 3);
        assert_eq!(c.admission.login.per_address_per_minute, 30, "unset keys keep their defaults");
        assert_eq!(c.work.join.resolve((64, 4096, 5000), 2), (8, 4096, 5000));
        assert_eq!(
            c.work.initial_sync.resolve((0, 1024, 10_000), 2),
            (2, 1024, 10_000),
            "0 slots: one per core"
        );
        for bad in [
            "[admission.register]\nper_address_burst = 0",
            "[admission.login]\nglobal_per_second = 5\nglobal_burst = 0",
            "[password_hashing]\npriority = \"urgent\"",
            "[password_hashing]\nmax_queue_delay_ms = 0",
        ] {
            let c: Config = toml::from_str(bad).unwrap();
            assert!(c.validate().is_err(), "{bad}");
        }
        assert!(toml::from_str::<Config>("[work.jion]\nslots = 1").is_err(), "unknown class");
    }
}
