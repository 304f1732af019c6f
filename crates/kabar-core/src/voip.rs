//! TURN server credentials for calls (`GET /voip/turnServer`).
//!
//! Kabar relays no media itself; it hands out time-limited credentials for
//! a TURN server that shares a secret with it (coturn's `use-auth-secret`,
//! the "TURN REST API"): the user name is `<expiry in seconds>:<user id>`
//! and the password is the base64 HMAC-SHA1 of that name under the secret,
//! so the TURN server can check them without asking Kabar.

use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use ruma::UserId;
use serde::Serialize;

/// The TURN server to hand out, as configured.
#[derive(Debug, Clone, Default)]
pub struct TurnConfig {
    /// `turn:` or `turns:` URIs; none means calls get no TURN server.
    pub uris: Vec<String>,
    pub shared_secret: Option<String>,
    /// How long handed-out credentials stay valid.
    pub lifetime: Duration,
}

/// What `/voip/turnServer` answers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TurnCredentials {
    pub username: String,
    pub password: String,
    pub uris: Vec<String>,
    /// Seconds the credentials stay valid.
    pub ttl: u64,
}

impl TurnConfig {
    /// Credentials for `user` at `now_secs` (Unix time), or `None` when no
    /// TURN server with a shared secret is configured.
    pub fn credentials(&self, user: &UserId, now_secs: u64) -> Option<TurnCredentials> {
        let secret = self.shared_secret.as_deref().filter(|s| !s.is_empty())?;
        if self.uris.is_empty() {
            return None;
        }
        let ttl = self.lifetime.as_secs().max(1);
        let username = format!("{}:{user}", now_secs + ttl);
        let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
        mac.update(username.as_bytes());
        let password = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
        Some(TurnCredentials {
            username,
            password,
            uris: self.uris.clone(),
            ttl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_the_turn_rest_api_hmac_of_expiry_and_user() {
        let config = TurnConfig {
            uris: vec!["turn:turn.example.org:3478?transport=udp".into()],
            shared_secret: Some("s3cret".into()),
            lifetime: Duration::from_secs(86_400),
        };
        let c = config.credentials(ruma::user_id!("@alice:example.org"), 1_000_000).unwrap();
        assert_eq!(c.username, "1086400:@alice:example.org");
        assert_eq!(c.ttl, 86_400);
        // Computed independently: printf '1086400:@alice:example.org' | openssl dgst -sha1 -hmac s3cret -binary | base64
        assert_eq!(c.password, "vvZ/GfOBZxHiN9WSKhsnMqUOVlo=");
        assert!(TurnConfig::default().credentials(ruma::user_id!("@a:x"), 0).is_none());
        let no_secret = TurnConfig {
            shared_secret: None,
            ..config
        };
        assert!(no_secret.credentials(ruma::user_id!("@a:x"), 0).is_none());
    }
}
