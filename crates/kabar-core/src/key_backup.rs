//! Server-side key backup: versions, each holding room keys that the
//! client encrypted to the backup's public key before uploading them.

use std::sync::Arc;

use kabar_domain::e2ee::BackupKeyRank;
use kabar_store::{BackupKey, BackupScope, BackupVersion, BackupWrite, Store};
use ruma::{OwnedRoomId, RoomId, UserId};
use serde_json::{Map, Value, json};

use crate::error::{Error, Result};

/// Keys one upload may carry.
const MAX_KEYS_PER_UPLOAD: usize = 10_000;

pub struct KeyBackups {
    store: Arc<dyn Store>,
}

fn parse_version(version: &str) -> Result<u64> {
    version
        .parse()
        .map_err(|_| Error::NotFound(format!("unknown backup version {version:?}")))
}

fn version_json(v: &BackupVersion) -> Value {
    json!({
        "algorithm": v.algorithm,
        "auth_data": serde_json::from_str::<Value>(&v.auth_data).unwrap_or_default(),
        "count": v.count,
        "etag": v.etag.to_string(),
        "version": v.version.to_string(),
    })
}

fn write_json(write: BackupWrite) -> Option<Value> {
    match write {
        BackupWrite::Done { etag, count } => Some(json!({ "etag": etag.to_string(), "count": count })),
        BackupWrite::WrongVersion { .. } => None,
    }
}

/// Reads one `KeyBackupData` object.
fn backup_key(room_id: &RoomId, session_id: &str, data: &Value) -> Result<BackupKey> {
    let bad = |m: &str| Error::BadJson(format!("key {session_id} in {room_id}: {m}"));
    let number = |field: &str| {
        data.get(field)
            .and_then(Value::as_u64)
            .ok_or_else(|| bad(&format!("{field} must be a non-negative integer")))
    };
    let rank = BackupKeyRank {
        first_message_index: number("first_message_index")?,
        forwarded_count: number("forwarded_count")?,
        is_verified: data
            .get("is_verified")
            .and_then(Value::as_bool)
            .ok_or_else(|| bad("is_verified must be a boolean"))?,
    };
    if !data.get("session_data").is_some_and(Value::is_object) {
        return Err(bad("session_data must be an object"));
    }
    Ok(BackupKey {
        room_id: room_id.to_owned(),
        session_id: session_id.to_owned(),
        rank,
        json: data.to_string(),
    })
}

/// Backup algorithms clients use: the spec's, and MSC3270's symmetric one.
const BACKUP_ALGORITHMS: &[&str] = &["m.megolm_backup.v1.curve25519-aes-sha2", "org.matrix.msc3270.v1.aes-hmac-sha2"];

impl KeyBackups {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Self { store }
    }

    /// POST /room_keys/version
    pub async fn create_version(&self, user: &UserId, algorithm: &str, auth_data: &Value) -> Result<String> {
        if !auth_data.is_object() {
            return Err(Error::BadJson("an auth_data object is required".into()));
        }
        if !BACKUP_ALGORITHMS.contains(&algorithm) {
            return Err(Error::InvalidParam(format!(
                "unsupported backup algorithm {algorithm:?}: use {}",
                BACKUP_ALGORITHMS.join(" or ")
            )));
        }
        let version = self.store.create_backup_version(user, algorithm, &auth_data.to_string()).await?;
        Ok(version.to_string())
    }

    /// GET /room_keys/version[/{version}]: `None` is the current version.
    pub async fn version(&self, user: &UserId, version: Option<&str>) -> Result<Value> {
        let version = version.map(parse_version).transpose()?;
        self.store
            .backup_version(user, version)
            .await?
            .map(|v| version_json(&v))
            .ok_or_else(|| Error::NotFound("no key backup found".into()))
    }

    /// PUT /room_keys/version/{version}: replaces the auth data; the algorithm cannot change.
    pub async fn update_version(&self, user: &UserId, version: &str, body: &Value) -> Result<()> {
        let number = parse_version(version)?;
        let stored = self
            .store
            .backup_version(user, Some(number))
            .await?
            .ok_or_else(|| Error::NotFound("no key backup found".into()))?;
        if body.get("version").and_then(Value::as_str).is_some_and(|v| v != version) {
            return Err(Error::InvalidParam("version in the body differs from the path".into()));
        }
        if body.get("algorithm").and_then(Value::as_str) != Some(stored.algorithm.as_str()) {
            return Err(Error::InvalidParam("a backup's algorithm cannot change".into()));
        }
        let auth_data = body
            .get("auth_data")
            .filter(|a| a.is_object())
            .ok_or_else(|| Error::BadJson("auth_data must be an object".into()))?;
        self.store.update_backup_version(user, number, &auth_data.to_string()).await?;
        Ok(())
    }

    /// DELETE /room_keys/version/{version}
    pub async fn delete_version(&self, user: &UserId, version: &str) -> Result<()> {
        if self.store.delete_backup_version(user, parse_version(version)?).await? {
            Ok(())
        } else {
            Err(Error::NotFound("no key backup found".into()))
        }
    }

    /// The error for a write that named a version other than the current one.
    async fn wrong_version(&self, user: &UserId, version: u64, write: BackupWrite) -> Error {
        let BackupWrite::WrongVersion { current } = write else {
            return Error::Internal("not a version mismatch".into());
        };
        match self.store.backup_version(user, Some(version)).await {
            Ok(Some(_)) => Error::WrongRoomKeysVersion {
                current: current.map(|c| c.to_string()),
            },
            Ok(None) => Error::NotFound("no key backup found".into()),
            Err(e) => e.into(),
        }
    }

    /// PUT /room_keys/keys[/{room}[/{session}]]: `rooms` is
    /// `{room: {"sessions": {session: KeyBackupData}}}`.
    pub async fn put_keys(&self, user: &UserId, version: &str, rooms: &Map<String, Value>) -> Result<Value> {
        let number = parse_version(version)?;
        let mut keys = vec![];
        for (room, body) in rooms {
            let room_id = OwnedRoomId::try_from(room.as_str()).map_err(|_| Error::InvalidParam(format!("{room} is not a room id")))?;
            let sessions = body
                .get("sessions")
                .and_then(Value::as_object)
                .ok_or_else(|| Error::BadJson("each room needs a sessions object".into()))?;
            for (session_id, data) in sessions {
                keys.push(backup_key(&room_id, session_id, data)?);
            }
            if keys.len() > MAX_KEYS_PER_UPLOAD {
                return Err(Error::TooLarge(format!("at most {MAX_KEYS_PER_UPLOAD} keys per upload")));
            }
        }
        let write = self.store.put_backup_keys(user, number, keys).await?;
        match write_json(write) {
            Some(v) => Ok(v),
            None => Err(self.wrong_version(user, number, write).await),
        }
    }

    /// GET /room_keys/keys[/{room}[/{session}]]: all keys, a room's
    /// (`{"sessions": ...}`), or one `KeyBackupData`.
    pub async fn keys(&self, user: &UserId, version: &str, scope: BackupScope<'_>) -> Result<Value> {
        let number = parse_version(version)?;
        if self.store.backup_version(user, Some(number)).await?.is_none() {
            return Err(Error::NotFound("no key backup found".into()));
        }
        let keys = self.store.backup_keys(user, number, scope).await?;
        let data = |k: &BackupKey| serde_json::from_str::<Value>(&k.json).unwrap_or_default();
        Ok(match (scope.room_id, scope.session_id) {
            (Some(_), Some(_)) => keys
                .first()
                .map(data)
                .ok_or_else(|| Error::NotFound("no such key in the backup".into()))?,
            (Some(_), None) => {
                let sessions: Map<String, Value> = keys.iter().map(|k| (k.session_id.clone(), data(k))).collect();
                json!({ "sessions": sessions })
            }
            _ => {
                let mut rooms = Map::new();
                for k in &keys {
                    let room = rooms.entry(k.room_id.to_string()).or_insert_with(|| json!({ "sessions": {} }));
                    room["sessions"][k.session_id.as_str()] = data(k);
                }
                json!({ "rooms": rooms })
            }
        })
    }

    /// DELETE /room_keys/keys[/{room}[/{session}]]
    pub async fn delete_keys(&self, user: &UserId, version: &str, scope: BackupScope<'_>) -> Result<Value> {
        let number = parse_version(version)?;
        let write = self.store.delete_backup_keys(user, number, scope).await?;
        write_json(write).ok_or_else(|| Error::NotFound("no key backup found".into()))
    }
}
