//! End-to-end encryption keys: device keys, one-time and fallback keys,
//! cross-signing keys and signatures, and device-list changes.
//!
//! The server stores what clients publish and hands it to other clients; it
//! never holds a private key or a room key it could use. What it decides:
//! a one-time key goes to one claimer only, a signature is checked before it
//! is published, and who is told that whose devices changed.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
};

use kabar_domain::e2ee::{self, CrossSigningKind};
use kabar_store::{
    ClaimedKey, CrossSigningKey, KeyClaim, KeyCounts, KeySignature, MembershipRecord, OneTimeKey, Store, StoreError, StreamPos,
};
use ruma::{OwnedUserId, UserId};
use serde_json::{Map, Value, json};

use crate::{
    changes::{Changes, DeviceKey, GenerationCache},
    error::{Error, Result},
    rooms::{Room, Rooms},
};

use kabar_domain::membership::Membership;

/// Bounds on one request, so a client cannot make one request cost without limit.
const MAX_KEYS_PER_UPLOAD: usize = 1000;
const MAX_QUERIED_USERS: usize = 1000;
const MAX_CLAIMS: usize = 10_000;
/// Bound on cached key counts; past it they are read again.
const MAX_CACHED_COUNTS: usize = 1_000_000;

/// What `/keys/upload` carries.
#[derive(Debug, Default)]
pub struct KeysUpload {
    pub device_keys: Option<Value>,
    pub one_time_keys: Map<String, Value>,
    pub fallback_keys: Map<String, Value>,
}

/// What `/keys/device_signing/upload` carries.
#[derive(Debug, Default)]
pub struct CrossSigningUpload {
    pub master_key: Option<Value>,
    pub self_signing_key: Option<Value>,
    pub user_signing_key: Option<Value>,
}

impl CrossSigningUpload {
    fn keys(&self) -> impl Iterator<Item = (CrossSigningKind, &Value)> {
        [
            (CrossSigningKind::Master, &self.master_key),
            (CrossSigningKind::SelfSigning, &self.self_signing_key),
            (CrossSigningKind::UserSigning, &self.user_signing_key),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| (k, v)))
    }
}

/// A device's one-time key counts as `/sync` and `/keys/upload` report them,
/// written straight from the cached counts.
/// `signed_curve25519` is always present: clients read a missing count as
/// "unknown", while zero makes them upload keys.
#[derive(Debug)]
pub struct OneTimeKeyCounts(pub Arc<KeyCounts>);

impl serde::Serialize for OneTimeKeyCounts {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let counts = &self.0.one_time;
        let mut map = serializer.serialize_map(None)?;
        if !counts.contains_key("signed_curve25519") {
            map.serialize_entry("signed_curve25519", &0)?;
        }
        for (algorithm, n) in counts {
            map.serialize_entry(algorithm, n)?;
        }
        map.end()
    }
}

/// Whose devices changed for a user, and with whom they no longer share a room.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct DeviceListDelta {
    pub changed: Vec<OwnedUserId>,
    pub left: Vec<OwnedUserId>,
}

impl DeviceListDelta {
    pub fn is_empty(&self) -> bool {
        self.changed.is_empty() && self.left.is_empty()
    }
}

pub struct Keys {
    store: Arc<dyn Store>,
    rooms: Arc<Rooms>,
    changes: Arc<Changes>,
    /// Each device's key counts with the tracker generation they were read at:
    /// every sync reports them, and they change only on uploads and claims.
    counts: GenerationCache<DeviceKey, Arc<KeyCounts>>,
}

fn to_json(v: &Value) -> String {
    // serde_json's maps are sorted, so equal objects give equal strings.
    v.to_string()
}

fn parse_stored(json: &str) -> Value {
    serde_json::from_str(json).unwrap_or_else(|e| {
        tracing::error!(error = %e, "stored key is not JSON");
        Value::Null
    })
}

/// Adds stored signatures to a key object's `signatures`.
fn with_signatures(mut key: Value, signatures: &[&KeySignature]) -> Value {
    // Stored keys were objects when they were checked; anything else is left as it is.
    if signatures.is_empty() || !key.is_object() {
        return key;
    }
    if !key.get("signatures").is_some_and(Value::is_object) {
        key["signatures"] = json!({});
    }
    for s in signatures {
        let by_signer = &mut key["signatures"][s.signer.as_str()];
        if !by_signer.is_object() {
            *by_signer = json!({});
        }
        by_signer[s.signer_key_id.as_str()] = json!(s.signature);
    }
    key
}

fn signature_failure(errcode: &str, error: impl Into<String>) -> Value {
    json!({ "errcode": errcode, "error": error.into() })
}

fn keys_of(map: &Map<String, Value>) -> Result<Vec<OneTimeKey>> {
    if map.len() > MAX_KEYS_PER_UPLOAD {
        return Err(Error::TooLarge(format!("at most {MAX_KEYS_PER_UPLOAD} keys per upload")));
    }
    map.iter()
        .map(|(id, key)| {
            let (algorithm, _) = e2ee::split_key_id(id).map_err(|e| Error::InvalidParam(e.to_string()))?;
            if !(key.is_object() || key.is_string()) {
                return Err(Error::BadJson(format!("key {id} must be an object or a string")));
            }
            Ok(OneTimeKey {
                algorithm: algorithm.to_owned(),
                key_id: id.clone(),
                json: to_json(key),
            })
        })
        .collect()
}

/// A conflict in key storage is the client's mistake (a key id reused), not the server's.
fn client_conflict(e: StoreError) -> Error {
    match e {
        StoreError::Conflict(m) => Error::InvalidParam(m),
        other => other.into(),
    }
}

impl Keys {
    pub fn new(store: Arc<dyn Store>, rooms: Arc<Rooms>, changes: Arc<Changes>) -> Self {
        Self {
            store,
            rooms,
            changes,
            counts: GenerationCache::new(MAX_CACHED_COUNTS),
        }
    }

    fn is_local(&self, user: &UserId) -> bool {
        user.server_name() == self.rooms.server_name()
    }

    /// POST /keys/upload: publishes the device's identity keys and adds
    /// one-time and fallback keys; returns the device's key counts.
    pub async fn upload(&self, device: &DeviceKey, upload: KeysUpload) -> Result<Arc<KeyCounts>> {
        let (user, device_id) = (&*device.user_id, device.device_id.as_str());
        if let Some(keys) = &upload.device_keys {
            e2ee::check_device_keys(keys, user.as_str(), device_id).map_err(|e| Error::InvalidParam(e.to_string()))?;
            let json = to_json(keys);
            if let Some(pos) = self.store.put_device_keys(user, device_id, &json).await? {
                self.rooms.applied().reached(pos).await;
            }
        }
        let one_time = keys_of(&upload.one_time_keys)?;
        let fallback = keys_of(&upload.fallback_keys)?;
        // The counts answered below (and by the device's next sync) are
        // read once the upload is applied.
        if !one_time.is_empty() {
            let pos = self
                .store
                .add_one_time_keys(user, device_id, one_time)
                .await
                .map_err(client_conflict)?;
            self.rooms.applied().reached(pos).await;
        }
        if !fallback.is_empty() {
            let pos = self.store.put_fallback_keys(user, device_id, fallback).await?;
            self.rooms.applied().reached(pos).await;
        }
        self.key_counts(device).await
    }

    /// The device's key counts, from memory unless an upload or claim touched them.
    pub async fn key_counts(&self, device: &DeviceKey) -> Result<Arc<KeyCounts>> {
        let read = async { self.store.key_counts(&device.user_id, &device.device_id).await.map(Arc::new) };
        Ok(self.counts.get_or_read(&self.changes.one_time_keys, device, read).await?)
    }

    /// POST /keys/query: the published keys of the users asked for (all
    /// devices for an empty list). Users of other servers are not reachable
    /// (no federation) and are left out.
    pub async fn query(&self, requester: &UserId, wanted: BTreeMap<OwnedUserId, Vec<String>>) -> Result<Value> {
        if wanted.len() > MAX_QUERIED_USERS {
            return Err(Error::TooLarge(format!("at most {MAX_QUERIED_USERS} users per query")));
        }
        let mut device_keys = Map::new();
        let mut master_keys = Map::new();
        let mut self_signing_keys = Map::new();
        let mut user_signing_keys = Map::new();
        for (user, devices) in wanted {
            if !self.is_local(&user) {
                continue;
            }
            let signatures = self.store.signatures(&user).await?;
            // Who verified whom is the verifier's business: signatures by
            // other users (their user-signing keys on this user's master key)
            // are shown to their signer only.
            let on = |target: &str| -> Vec<&KeySignature> {
                signatures
                    .iter()
                    .filter(|s| s.target_key == target && (s.signer == user || s.signer == requester))
                    .collect()
            };
            let mut by_device = Map::new();
            for record in self.store.device_keys(&user).await? {
                if !devices.is_empty() && !devices.contains(&record.device_id) {
                    continue;
                }
                let mut key = with_signatures(parse_stored(&record.json), &on(&record.device_id));
                // The device's name, when it has one (never null: strict clients refuse it).
                if let (Some(name), true) = (&record.display_name, key.is_object()) {
                    key["unsigned"] = json!({ "device_display_name": name });
                }
                by_device.insert(record.device_id, key);
            }
            device_keys.insert(user.to_string(), Value::Object(by_device));
            for k in self.store.cross_signing_keys(&user).await? {
                let key = with_signatures(parse_stored(&k.json), &on(&k.public_key));
                match k.kind {
                    CrossSigningKind::Master => master_keys.insert(user.to_string(), key),
                    CrossSigningKind::SelfSigning => self_signing_keys.insert(user.to_string(), key),
                    // Only its owner may see which key signs other users.
                    CrossSigningKind::UserSigning if user == requester => user_signing_keys.insert(user.to_string(), key),
                    CrossSigningKind::UserSigning => None,
                };
            }
        }
        Ok(json!({
            "device_keys": device_keys,
            "master_keys": master_keys,
            "self_signing_keys": self_signing_keys,
            "user_signing_keys": user_signing_keys,
            "failures": {},
        }))
    }

    /// POST /keys/claim: one key per (user, device, algorithm) asked for; each
    /// one-time key is handed out once, then the fallback key.
    pub async fn claim(&self, wanted: BTreeMap<OwnedUserId, BTreeMap<String, String>>) -> Result<Value> {
        let claims: Vec<KeyClaim> = wanted
            .into_iter()
            .filter(|(user, _)| self.is_local(user))
            .flat_map(|(user_id, devices)| {
                devices.into_iter().map(move |(device_id, algorithm)| KeyClaim {
                    user_id: user_id.clone(),
                    device_id,
                    algorithm,
                })
            })
            .collect();
        if claims.len() > MAX_CLAIMS {
            return Err(Error::TooLarge(format!("at most {MAX_CLAIMS} keys per claim")));
        }
        let claimed = self.store.claim_keys(claims).await?;
        let mut out = Map::new();
        for ClaimedKey {
            user_id,
            device_id,
            key_id,
            json,
        } in claimed
        {
            let by_user = out.entry(user_id.to_string()).or_insert_with(|| json!({}));
            let by_device = &mut by_user[device_id.as_str()];
            if !by_device.is_object() {
                *by_device = json!({});
            }
            by_device[key_id.as_str()] = parse_stored(&json);
        }
        Ok(json!({ "one_time_keys": out, "failures": {} }))
    }

    /// Whether replacing the user's cross-signing keys with `upload` needs
    /// the password: not for the first keys (clients set them up right after
    /// sign-up) nor for a repeat of what is stored.
    pub async fn cross_signing_needs_auth(&self, user: &UserId, upload: &CrossSigningUpload) -> Result<bool> {
        let stored = self.store.cross_signing_keys(user).await?;
        if !stored.iter().any(|k| k.kind == CrossSigningKind::Master) {
            return Ok(false);
        }
        Ok(upload
            .keys()
            .any(|(kind, key)| !stored.iter().any(|s| s.kind == kind && s.json == to_json(key))))
    }

    /// POST /keys/device_signing/upload (after user-interactive auth, if
    /// [`cross_signing_needs_auth`](Self::cross_signing_needs_auth) said so).
    pub async fn upload_cross_signing(&self, user: &UserId, upload: CrossSigningUpload) -> Result<()> {
        let stored = self.store.cross_signing_keys(user).await?;
        let mut keys = vec![];
        for (kind, key) in upload.keys() {
            let public_key = e2ee::check_cross_signing_key(key, user.as_str(), kind).map_err(|e| Error::InvalidParam(e.to_string()))?;
            keys.push(CrossSigningKey {
                kind,
                public_key,
                json: to_json(key),
            });
        }
        if keys.is_empty() {
            return Ok(());
        }
        let master = keys
            .iter()
            .chain(stored.iter())
            .find(|k| k.kind == CrossSigningKind::Master)
            .map(|k| k.public_key.clone())
            .ok_or_else(|| Error::InvalidParam("a master key is needed first".into()))?;
        for (kind, key) in upload.keys().filter(|(k, _)| *k != CrossSigningKind::Master) {
            e2ee::verify_signature(key, user.as_str(), &format!("ed25519:{master}"), &master)
                .map_err(|e| Error::InvalidParam(format!("{} key is not signed by the master key: {e}", kind.usage())))?;
        }
        let pos = self.store.put_cross_signing_keys(user, keys).await?;
        self.rooms.applied().reached(pos).await;
        Ok(())
    }

    /// POST /keys/signatures/upload: checks each signature the requester
    /// made and publishes those that verify; the rest are reported per key.
    pub async fn upload_signatures(&self, requester: &UserId, body: Map<String, Value>) -> Result<Value> {
        let own_cross_signing = self.store.cross_signing_keys(requester).await?;
        let own_key = |kind: CrossSigningKind| own_cross_signing.iter().find(|k| k.kind == kind);
        let own_devices = self.store.device_keys(requester).await?;
        let mut accepted = vec![];
        let mut failures = Map::new();
        for (target, objects) in body {
            let Ok(target_user) = OwnedUserId::try_from(target.as_str()) else {
                failures.insert(target, json!({ "*": signature_failure("M_INVALID_PARAM", "not a user id") }));
                continue;
            };
            let Some(objects) = objects.as_object() else {
                failures.insert(
                    target,
                    json!({ "*": signature_failure("M_BAD_JSON", "expected an object of keys") }),
                );
                continue;
            };
            let target_keys = if target_user == requester {
                None
            } else {
                Some(self.store.cross_signing_keys(&target_user).await?)
            };
            for (key_id, object) in objects {
                match self.check_signatures(
                    requester,
                    &target_user,
                    key_id,
                    object,
                    &own_key,
                    &own_devices,
                    target_keys.as_deref(),
                ) {
                    Ok(mut sigs) => accepted.append(&mut sigs),
                    Err(failure) => {
                        let entry = failures.entry(target.clone()).or_insert_with(|| json!({}));
                        entry[key_id.as_str()] = failure;
                    }
                }
            }
        }
        if !accepted.is_empty() {
            let pos = self.store.put_signatures(accepted).await?;
            self.rooms.applied().reached(pos).await;
        }
        Ok(json!({ "failures": failures }))
    }

    /// The signatures by `requester` on one uploaded key object that are
    /// allowed and verify, or the failure to report for it.
    #[allow(clippy::too_many_arguments)]
    fn check_signatures<'a>(
        &self,
        requester: &UserId,
        target_user: &UserId,
        key_id: &str,
        object: &Value,
        own_key: &impl Fn(CrossSigningKind) -> Option<&'a CrossSigningKey>,
        own_devices: &[kabar_store::DeviceKeysRecord],
        target_keys: Option<&[CrossSigningKey]>,
    ) -> std::result::Result<Vec<KeySignature>, Value> {
        // What is being signed, as stored, and which of the requester's keys may sign it.
        let (stored_json, allowed_signers): (&str, Vec<(String, String)>) = match target_keys {
            None => {
                if let Some(device) = own_devices.iter().find(|d| d.device_id == key_id) {
                    let signer = own_key(CrossSigningKind::SelfSigning)
                        .ok_or_else(|| signature_failure("M_INVALID_SIGNATURE", "no self-signing key to sign devices with"))?;
                    (
                        device.json.as_str(),
                        vec![(format!("ed25519:{}", signer.public_key), signer.public_key.clone())],
                    )
                } else if let Some(master) = own_key(CrossSigningKind::Master).filter(|m| m.public_key == key_id) {
                    // A device signs its user's master key (that is how a new
                    // device vouches for the identity it verified).
                    let signers = own_devices
                        .iter()
                        .filter_map(|d| {
                            let key = parse_stored(&d.json);
                            let id = format!("ed25519:{}", d.device_id);
                            key.get("keys")
                                .and_then(|k| k.get(&id))
                                .and_then(Value::as_str)
                                .map(|k| (id.clone(), k.to_owned()))
                        })
                        .collect();
                    (master.json.as_str(), signers)
                } else {
                    return Err(signature_failure("M_NOT_FOUND", "no such device or key"));
                }
            }
            Some(target_keys) => {
                let master = target_keys
                    .iter()
                    .find(|k| k.kind == CrossSigningKind::Master && k.public_key == key_id)
                    .ok_or_else(|| signature_failure("M_NOT_FOUND", "not the user's master key"))?;
                let signer = own_key(CrossSigningKind::UserSigning)
                    .ok_or_else(|| signature_failure("M_INVALID_SIGNATURE", "no user-signing key to sign users with"))?;
                (
                    master.json.as_str(),
                    vec![(format!("ed25519:{}", signer.public_key), signer.public_key.clone())],
                )
            }
        };
        if e2ee::signed_part(object) != e2ee::signed_part(&parse_stored(stored_json)) {
            return Err(signature_failure(
                "M_INVALID_SIGNATURE",
                "the signed object differs from the published key",
            ));
        }
        let mut sigs = vec![];
        for (signer_key_id, public_key) in &allowed_signers {
            let Some(signature) = object
                .get("signatures")
                .and_then(|s| s.get(requester.as_str()))
                .and_then(|s| s.get(signer_key_id))
                .and_then(Value::as_str)
            else {
                continue;
            };
            e2ee::verify_signature(object, requester.as_str(), signer_key_id, public_key)
                .map_err(|e| signature_failure("M_INVALID_SIGNATURE", e.to_string()))?;
            sigs.push(KeySignature {
                target_user: target_user.to_owned(),
                target_key: key_id.to_owned(),
                signer: requester.to_owned(),
                signer_key_id: signer_key_id.clone(),
                signature: signature.to_owned(),
            });
        }
        if sigs.is_empty() {
            return Err(signature_failure(
                "M_INVALID_SIGNATURE",
                "no signature by a key allowed to sign this",
            ));
        }
        Ok(sigs)
    }

    /// GET /keys/changes: [`device_list_delta`](Self::device_list_delta)
    /// between two sync tokens, by the user's current memberships.
    pub async fn changes(&self, user: &UserId, from: StreamPos, to: StreamPos) -> Result<DeviceListDelta> {
        let to = to.min(self.rooms.applied().position());
        let memberships = self.store.memberships(user).await?;
        self.device_list_delta(user, &memberships, from, to).await
    }

    /// Whose device lists changed for `user` in `(since, until]` and with whom
    /// `user` no longer shares an encrypted room, for sync and `/keys/changes`.
    ///
    /// Changed: users sharing a room with `user` (or `user`) who published or
    /// removed keys; users who joined one of `user`'s encrypted rooms; every
    /// member of an encrypted room `user` joined or that turned encryption on.
    /// Left: users who left (or whose room `user` left) and now share no
    /// encrypted room with `user`.
    pub async fn device_list_delta(
        &self,
        user: &UserId,
        memberships: &[MembershipRecord],
        since: StreamPos,
        until: StreamPos,
    ) -> Result<DeviceListDelta> {
        let mut joined: Vec<(StreamPos, Arc<Room>)> = vec![];
        let mut left_rooms: Vec<Arc<Room>> = vec![];
        for m in memberships.iter().filter(|m| m.pos <= until) {
            match m.membership {
                Membership::Join => joined.push((m.pos, self.rooms.room(&m.room_id).await?)),
                Membership::Leave | Membership::Ban if m.pos > since => left_rooms.push(self.rooms.room(&m.room_id).await?),
                _ => {}
            }
        }
        let shares_room = |other: &UserId, encrypted_only: bool| {
            other == user
                || joined.iter().any(|(_, room)| {
                    let r = room.read();
                    (!encrypted_only || r.encrypted_at().is_some()) && r.membership(other) == Some(Membership::Join)
                })
        };

        let mut changed: BTreeSet<OwnedUserId> = BTreeSet::new();
        let mut left_candidates: BTreeSet<OwnedUserId> = BTreeSet::new();
        let logged = match self.changes.device_lists.changed_between(since, until) {
            Some(users) => users,
            None => self
                .store
                .device_list_changes(since, until)
                .await?
                .into_iter()
                .map(|(u, _)| u)
                .collect(),
        };
        let own_changed = logged.iter().any(|u| u == user);
        changed.extend(logged.into_iter().filter(|u| shares_room(u, false)));

        for (joined_at, room) in &joined {
            let r = room.read();
            let Some(encrypted_at) = r.encrypted_at() else { continue };
            if *joined_at > since || (encrypted_at > since && encrypted_at <= until) {
                changed.extend(r.members(Membership::Join).filter_map(|m| OwnedUserId::try_from(m).ok()));
            } else if r.last_pos > since {
                for (other, membership) in r.member_changes(since, until) {
                    match membership {
                        Membership::Join => {
                            changed.insert(other);
                        }
                        Membership::Leave | Membership::Ban => {
                            left_candidates.insert(other);
                        }
                        _ => {}
                    }
                }
            }
        }
        for room in &left_rooms {
            let r = room.read();
            if r.encrypted_at().is_some() {
                left_candidates.extend(r.members(Membership::Join).filter_map(|m| OwnedUserId::try_from(m).ok()));
            }
        }
        let left: Vec<OwnedUserId> = left_candidates.into_iter().filter(|u| !shares_room(u, true)).collect();
        // Joining a room does not make the user's own devices news; a change of them does.
        changed.remove(user);
        if own_changed {
            changed.insert(user.to_owned());
        }
        changed.retain(|u| !left.contains(u));
        Ok(DeviceListDelta {
            changed: changed.into_iter().collect(),
            left,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use base64::Engine as _;
    use kabar_domain::EventSigner;
    use kabar_store::{NewDevice, Session};
    use ruma::{CanonicalJsonValue, RoomVersionId, owned_user_id, signatures::Ed25519KeyPair};

    use super::*;
    use crate::{
        load::{Gate, GateLimits, LoadMetrics},
        notifier::Notifier,
    };

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(bytes)
    }

    /// An ed25519 key pair whose key id is `ed25519:<its public key>`, as cross-signing keys are named.
    fn key_pair() -> (Ed25519KeyPair, String) {
        let der = Ed25519KeyPair::generate();
        let public = b64(&Ed25519KeyPair::from_der(&der, "x".into()).unwrap().public_key());
        (Ed25519KeyPair::from_der(&der, public.clone()).unwrap(), public)
    }

    fn signed(object: Value, signer: &str, pair: &Ed25519KeyPair) -> Value {
        let mut canonical = CanonicalJsonValue::try_from(object).unwrap();
        let CanonicalJsonValue::Object(obj) = &mut canonical else {
            unreachable!()
        };
        ruma::signatures::sign_json(signer, pair, obj).unwrap();
        canonical.into()
    }

    fn cross_signing_key(user: &str, usage: &str, public: &str) -> Value {
        json!({ "user_id": user, "usage": [usage], "keys": { format!("ed25519:{public}"): public } })
    }

    async fn keys_service(dir: &std::path::Path) -> (Keys, Arc<dyn Store>) {
        let store: Arc<dyn Store> = Arc::new(kabar_store_sqlite::SqliteStore::open(&dir.join("db")).unwrap());
        let targets = crate::applier::ApplierTargets::fresh(&store, Arc::new(Notifier::new()));
        let (caches, changes) = (targets.rooms.clone(), targets.changes.clone());
        let applier = crate::applier::Applier::spawn(
            store.clone(),
            targets,
            Arc::new(kabar_bus::LocalBus::new("test")),
            Duration::from_secs(1),
        );
        let signer = Arc::new(EventSigner::new(ruma::owned_server_name!("localhost"), &EventSigner::generate_key(), "k").unwrap());
        let limits = GateLimits {
            slots: 4,
            max_queued: 16,
            max_queue_delay: Duration::from_secs(5),
        };
        let joins = Arc::new(Gate::new(LoadMetrics::default().class("join"), limits, Duration::from_millis(1)));
        let rooms = Arc::new(Rooms::new(
            store.clone(),
            signer,
            caches,
            applier.applied(),
            RoomVersionId::V12,
            joins,
        ));
        (Keys::new(store.clone(), rooms, changes), store)
    }

    #[tokio::test]
    async fn only_signatures_by_the_right_key_over_the_published_object_are_stored() {
        let dir = tempfile::tempdir().unwrap();
        let (keys, store) = keys_service(dir.path()).await;
        let user = owned_user_id!("@ann:localhost");
        let me = user.as_str();
        let session = Session {
            user_id: user.clone(),
            device_id: "PHONE".into(),
        };
        store
            .upsert_device(NewDevice {
                user_id: user.clone(),
                device_id: "PHONE".into(),
                display_name: None,
                token_hash: "t".into(),
                now_ms: 1,
                ip: None,
            })
            .await
            .unwrap();
        let (_, device_public) = key_pair();
        let device_keys = json!({
            "user_id": me, "device_id": "PHONE", "algorithms": ["m.olm.v1.curve25519-aes-sha2"],
            "keys": { "ed25519:PHONE": device_public, "curve25519:PHONE": "c" }
        });
        let upload = KeysUpload {
            device_keys: Some(device_keys.clone()),
            ..KeysUpload::default()
        };
        keys.upload(&session, upload).await.unwrap();

        let (master, master_public) = key_pair();
        let (self_signing, self_public) = key_pair();
        let (stranger, _) = key_pair();
        let self_key = cross_signing_key(me, "self_signing", &self_public);
        let forged = CrossSigningUpload {
            master_key: Some(cross_signing_key(me, "master", &master_public)),
            self_signing_key: Some(signed(self_key.clone(), me, &stranger)),
            user_signing_key: None,
        };
        assert!(
            matches!(keys.upload_cross_signing(&user, forged).await, Err(Error::InvalidParam(_))),
            "a self-signing key the master key did not sign is refused"
        );
        let genuine = CrossSigningUpload {
            master_key: Some(cross_signing_key(me, "master", &master_public)),
            self_signing_key: Some(signed(self_key, me, &master)),
            user_signing_key: None,
        };
        keys.upload_cross_signing(&user, genuine).await.unwrap();

        let failures = |v: Value| v["failures"][me]["PHONE"]["errcode"].as_str().map(str::to_owned);
        let upload_one = |object: Value| {
            let body: Map<String, Value> = json!({ me: { "PHONE": object } }).as_object().unwrap().clone();
            keys.upload_signatures(&user, body)
        };
        let by_stranger_as_self_signing = {
            let mut object = signed(device_keys.clone(), me, &stranger);
            let sig = object["signatures"][me][format!("ed25519:{}", stranger.version())].take();
            object["signatures"][me] = json!({ format!("ed25519:{self_public}"): sig });
            object
        };
        assert_eq!(
            failures(upload_one(by_stranger_as_self_signing).await.unwrap()).as_deref(),
            Some("M_INVALID_SIGNATURE"),
            "a signature that does not verify with the self-signing key"
        );
        assert_eq!(
            failures(upload_one(signed(device_keys.clone(), me, &master)).await.unwrap()).as_deref(),
            Some("M_INVALID_SIGNATURE"),
            "the master key does not sign devices directly"
        );
        let mut tampered = signed(device_keys.clone(), me, &self_signing);
        tampered["keys"]["curve25519:PHONE"] = json!("other");
        assert_eq!(
            failures(upload_one(tampered).await.unwrap()).as_deref(),
            Some("M_INVALID_SIGNATURE"),
            "a signed object that is not the published key"
        );
        assert!(store.signatures(&user).await.unwrap().is_empty(), "nothing refused was stored");

        let result = upload_one(signed(device_keys, me, &self_signing)).await.unwrap();
        assert_eq!(result["failures"], json!({}));
        let query = keys.query(&user, BTreeMap::from([(user.clone(), vec![])])).await.unwrap();
        let signature = &query["device_keys"][me]["PHONE"]["signatures"][me][format!("ed25519:{self_public}")];
        assert!(signature.is_string(), "the verified signature is published: {query}");
        assert_eq!(
            query["self_signing_keys"][me]["keys"][format!("ed25519:{self_public}")],
            self_public
        );
    }

    #[tokio::test]
    async fn a_user_signing_signature_is_verified_and_shown_to_its_signer_only() {
        let dir = tempfile::tempdir().unwrap();
        let (keys, _) = keys_service(dir.path()).await;
        let (ann, bob, cat) = (
            owned_user_id!("@ann:localhost"),
            owned_user_id!("@bob:localhost"),
            owned_user_id!("@cat:localhost"),
        );
        let (_, ann_master) = key_pair();
        let ann_master_key = cross_signing_key(ann.as_str(), "master", &ann_master);
        keys.upload_cross_signing(
            &ann,
            CrossSigningUpload {
                master_key: Some(ann_master_key.clone()),
                ..CrossSigningUpload::default()
            },
        )
        .await
        .unwrap();
        let (bob_master, bob_master_public) = key_pair();
        let (bob_usk, bob_usk_public) = key_pair();
        let bob_usk_key = signed(
            cross_signing_key(bob.as_str(), "user_signing", &bob_usk_public),
            bob.as_str(),
            &bob_master,
        );
        keys.upload_cross_signing(
            &bob,
            CrossSigningUpload {
                master_key: Some(cross_signing_key(bob.as_str(), "master", &bob_master_public)),
                user_signing_key: Some(bob_usk_key),
                ..CrossSigningUpload::default()
            },
        )
        .await
        .unwrap();

        // Bob verifies Ann: his user-signing key signs her master key.
        let body = json!({ ann.as_str(): { ann_master.as_str(): signed(ann_master_key, bob.as_str(), &bob_usk) } });
        let result = keys.upload_signatures(&bob, body.as_object().unwrap().clone()).await.unwrap();
        assert_eq!(result["failures"], json!({}));
        let master_seen_by = |viewer: OwnedUserId| {
            let (keys, ann) = (&keys, ann.clone());
            async move {
                let q = keys.query(&viewer, BTreeMap::from([(ann.clone(), vec![])])).await.unwrap();
                q["master_keys"][ann.as_str()].clone()
            }
        };
        // Key ids hold base64, which may contain '/': looked up by key, not by JSON pointer.
        let bob_key_id = format!("ed25519:{bob_usk_public}");
        let signed_by_bob = |master: Value| master["signatures"][bob.as_str()].get(&bob_key_id).is_some();
        assert!(signed_by_bob(master_seen_by(bob.clone()).await), "the signer sees it");
        assert!(!signed_by_bob(master_seen_by(cat).await), "others do not");
        assert!(!signed_by_bob(master_seen_by(ann.clone()).await), "nor does the signed user");
        let bob_query = keys.query(&ann, BTreeMap::from([(bob.clone(), vec![])])).await.unwrap();
        assert_eq!(
            bob_query["user_signing_keys"],
            json!({}),
            "a user-signing key is shown to its owner only"
        );
    }
}
