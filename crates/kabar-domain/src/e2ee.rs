//! Rules of the end-to-end encryption module that the server enforces.
//!
//! The server never sees plaintext; what it decides is which key a claim
//! gets, whether a backed-up room key replaces the one already stored, and
//! whether an uploaded key object is well formed.

use serde_json::Value;

/// Why an uploaded key was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("key id {0:?} is not of the form <algorithm>:<id>")]
    BadKeyId(String),
    #[error("{0}")]
    Invalid(String),
}

/// Splits a one-time or fallback key id, `<algorithm>:<key id>`.
pub fn split_key_id(key_id: &str) -> Result<(&str, &str), KeyError> {
    match key_id.split_once(':') {
        Some((alg, id)) if !alg.is_empty() && !id.is_empty() && alg.len() <= 64 && id.len() <= 128 => Ok((alg, id)),
        _ => Err(KeyError::BadKeyId(key_id.chars().take(80).collect())),
    }
}

/// Checks a device-keys object uploaded by `user_id`'s device `device_id`.
pub fn check_device_keys(keys: &Value, user_id: &str, device_id: &str) -> Result<(), KeyError> {
    let obj = keys
        .as_object()
        .ok_or_else(|| KeyError::Invalid("device_keys must be an object".into()))?;
    if obj.get("user_id").and_then(Value::as_str) != Some(user_id) {
        return Err(KeyError::Invalid("device_keys.user_id is not the uploading user".into()));
    }
    if obj.get("device_id").and_then(Value::as_str) != Some(device_id) {
        return Err(KeyError::Invalid("device_keys.device_id is not the uploading device".into()));
    }
    if !obj.get("algorithms").is_some_and(Value::is_array) {
        return Err(KeyError::Invalid("device_keys.algorithms must be a list".into()));
    }
    let key_map = obj
        .get("keys")
        .and_then(Value::as_object)
        .ok_or_else(|| KeyError::Invalid("device_keys.keys must be an object".into()))?;
    for (id, key) in key_map {
        split_key_id(id)?;
        if !key.is_string() {
            return Err(KeyError::Invalid(format!("device key {id} must be a string")));
        }
    }
    Ok(())
}

/// The three kinds of cross-signing key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum CrossSigningKind {
    Master,
    SelfSigning,
    UserSigning,
}

impl CrossSigningKind {
    pub const ALL: [CrossSigningKind; 3] = [Self::Master, Self::SelfSigning, Self::UserSigning];

    /// The `usage` the key object must list, also its name in the store.
    pub fn usage(self) -> &'static str {
        match self {
            Self::Master => "master",
            Self::SelfSigning => "self_signing",
            Self::UserSigning => "user_signing",
        }
    }

    pub fn from_usage(usage: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.usage() == usage)
    }
}

/// Checks a cross-signing key object and returns its one public key, `ed25519:<key>` -> `<key>`.
pub fn check_cross_signing_key(key: &Value, user_id: &str, kind: CrossSigningKind) -> Result<String, KeyError> {
    let obj = key
        .as_object()
        .ok_or_else(|| KeyError::Invalid(format!("{} key must be an object", kind.usage())))?;
    if obj.get("user_id").and_then(Value::as_str) != Some(user_id) {
        return Err(KeyError::Invalid(format!("{} key belongs to another user", kind.usage())));
    }
    let usage_ok = obj
        .get("usage")
        .and_then(Value::as_array)
        .is_some_and(|u| u.iter().any(|x| x.as_str() == Some(kind.usage())));
    if !usage_ok {
        return Err(KeyError::Invalid(format!(
            "{} key must list usage {:?}",
            kind.usage(),
            kind.usage()
        )));
    }
    let keys = obj
        .get("keys")
        .and_then(Value::as_object)
        .filter(|k| k.len() == 1)
        .ok_or_else(|| KeyError::Invalid(format!("{} key must hold exactly one key", kind.usage())))?;
    let (id, public) = keys.iter().next().expect("one key");
    let (alg, key_name) = split_key_id(id)?;
    if alg != "ed25519" || public.as_str() != Some(key_name) {
        return Err(KeyError::Invalid(format!(
            "{} key id must be ed25519:<public key> and name its key",
            kind.usage()
        )));
    }
    Ok(key_name.to_owned())
}

/// Unpadded standard base64, as the spec writes keys and signatures
/// (padded input is accepted too).
const KEY_BASE64: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    base64::engine::GeneralPurposeConfig::new()
        .with_encode_padding(false)
        .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
);

/// Checks that `object` carries a valid ed25519 signature by `signer`'s key
/// `key_id` (`ed25519:<name>`), whose public key is `public_key` (base64),
/// over its canonical JSON without `signatures` and `unsigned`.
pub fn verify_signature(object: &Value, signer: &str, key_id: &str, public_key: &str) -> Result<(), KeyError> {
    use base64::Engine as _;
    let invalid = |m: &str| KeyError::Invalid(format!("signature {signer} {key_id}: {m}"));
    let signature = object
        .pointer(&format!("/signatures/{}/{}", pointer_escape(signer), pointer_escape(key_id)))
        .and_then(Value::as_str)
        .ok_or_else(|| invalid("missing"))?;
    let canonical = ruma::CanonicalJsonValue::try_from(object.clone()).map_err(|e| invalid(&e.to_string()))?;
    let ruma::CanonicalJsonValue::Object(canonical) = canonical else {
        return Err(invalid("not an object"));
    };
    let signed = ruma::signatures::to_canonical_json_string_for_signing(&canonical).map_err(|e| invalid(&e.to_string()))?;
    let public = KEY_BASE64.decode(public_key).map_err(|_| invalid("public key is not base64"))?;
    let signature = KEY_BASE64.decode(signature).map_err(|_| invalid("signature is not base64"))?;
    ruma::signatures::verify_canonical_json_bytes(&ruma::SigningKeyAlgorithm::Ed25519, &public, &signature, signed.as_bytes())
        .map_err(|_| invalid("does not verify"))
}

/// Escapes a JSON pointer segment (`~` and `/`).
fn pointer_escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// The object without `signatures` and `unsigned`: what a signature covers,
/// and what must match when a client re-uploads a key with a new signature.
pub fn signed_part(object: &Value) -> Value {
    let mut o = object.clone();
    if let Some(map) = o.as_object_mut() {
        map.remove("signatures");
        map.remove("unsigned");
    }
    o
}

/// What decides whether one backed-up copy of a room key beats another.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackupKeyRank {
    pub is_verified: bool,
    pub first_message_index: u64,
    pub forwarded_count: u64,
}

impl BackupKeyRank {
    /// Whether `self` (newly uploaded) should replace `stored`, as the spec's
    /// key backup rules say: a verified key beats an unverified one; then the
    /// key that decrypts from an earlier message; then the one forwarded
    /// fewer times. A tie keeps what is stored.
    pub fn replaces(&self, stored: &BackupKeyRank) -> bool {
        if self.is_verified != stored.is_verified {
            return self.is_verified;
        }
        if self.first_message_index != stored.first_message_index {
            return self.first_message_index < stored.first_message_index;
        }
        self.forwarded_count < stored.forwarded_count
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_ids_need_an_algorithm_and_an_id() {
        assert_eq!(split_key_id("signed_curve25519:AAAAHg").unwrap(), ("signed_curve25519", "AAAAHg"));
        for bad in ["", "nocolon", ":id", "alg:"] {
            assert!(split_key_id(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn device_keys_must_be_the_uploaders_own() {
        let keys = json!({
            "user_id": "@a:x", "device_id": "D", "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
            "keys": { "curve25519:D": "c", "ed25519:D": "e" }, "signatures": {}
        });
        assert!(check_device_keys(&keys, "@a:x", "D").is_ok());
        assert!(check_device_keys(&keys, "@b:x", "D").is_err());
        assert!(check_device_keys(&keys, "@a:x", "E").is_err());
        let mut bad = keys.clone();
        bad["keys"]["curve25519:D"] = json!(1);
        assert!(check_device_keys(&bad, "@a:x", "D").is_err());
    }

    #[test]
    fn cross_signing_keys_name_their_one_public_key() {
        let master = json!({ "user_id": "@a:x", "usage": ["master"], "keys": { "ed25519:PUB": "PUB" } });
        assert_eq!(check_cross_signing_key(&master, "@a:x", CrossSigningKind::Master).unwrap(), "PUB");
        assert!(check_cross_signing_key(&master, "@a:x", CrossSigningKind::SelfSigning).is_err());
        assert!(check_cross_signing_key(&master, "@b:x", CrossSigningKind::Master).is_err());
        let mismatched = json!({ "user_id": "@a:x", "usage": ["master"], "keys": { "ed25519:PUB": "OTHER" } });
        assert!(check_cross_signing_key(&mismatched, "@a:x", CrossSigningKind::Master).is_err());
        let two = json!({ "user_id": "@a:x", "usage": ["master"], "keys": { "ed25519:A": "A", "ed25519:B": "B" } });
        assert!(check_cross_signing_key(&two, "@a:x", CrossSigningKind::Master).is_err());
    }

    #[test]
    fn signatures_verify_against_the_signers_public_key_only() {
        use base64::Engine as _;
        let pair = ruma::signatures::Ed25519KeyPair::from_der(&ruma::signatures::Ed25519KeyPair::generate(), "K".into()).unwrap();
        let public = KEY_BASE64.encode(pair.public_key());
        let mut object = ruma::CanonicalJsonValue::try_from(json!({
            "user_id": "@a:x", "usage": ["self_signing"], "keys": { "ed25519:S": "S" }
        }))
        .unwrap();
        let ruma::CanonicalJsonValue::Object(obj) = &mut object else {
            unreachable!()
        };
        ruma::signatures::sign_json("@a:x", &pair, obj).unwrap();
        let signed: Value = object.into();
        verify_signature(&signed, "@a:x", "ed25519:K", &public).unwrap();
        let mut with_unsigned = signed.clone();
        with_unsigned["unsigned"] = json!({ "x": 1 });
        verify_signature(&with_unsigned, "@a:x", "ed25519:K", &public).expect("unsigned is not covered");
        let mut tampered = signed.clone();
        tampered["keys"]["ed25519:S"] = json!("T");
        assert!(verify_signature(&tampered, "@a:x", "ed25519:K", &public).is_err());
        assert!(
            verify_signature(&signed, "@a:x", "ed25519:OTHER", &public).is_err(),
            "no such signature"
        );
        let other = ruma::signatures::Ed25519KeyPair::from_der(&ruma::signatures::Ed25519KeyPair::generate(), "K".into()).unwrap();
        assert!(verify_signature(&signed, "@a:x", "ed25519:K", &KEY_BASE64.encode(other.public_key())).is_err());
    }

    #[test]
    fn backup_keys_are_replaced_only_by_better_ones() {
        let rank = |v, i, f| BackupKeyRank {
            is_verified: v,
            first_message_index: i,
            forwarded_count: f,
        };
        assert!(rank(true, 9, 9).replaces(&rank(false, 0, 0)), "verified beats unverified");
        assert!(!rank(false, 0, 0).replaces(&rank(true, 9, 9)));
        assert!(rank(false, 1, 9).replaces(&rank(false, 2, 0)), "earlier first message wins next");
        assert!(rank(false, 2, 0).replaces(&rank(false, 2, 1)), "then fewer forwards");
        assert!(!rank(false, 2, 1).replaces(&rank(false, 2, 1)), "a tie keeps the stored key");
    }
}
