//! End-to-end encryption: keys, cross-signing, send-to-device, key backup.

use std::{collections::BTreeMap, sync::Arc};

use axum::{Json, extract::State};
use kabar_core::{
    accounts::Accounts,
    key_backup::KeyBackups,
    keys::{CrossSigningUpload, Keys, KeysUpload, OneTimeKeyCounts},
    to_device::ToDevice,
};
use kabar_domain::SyncToken;
use kabar_store::BackupScope;
use ruma::{OwnedRoomId, OwnedUserId};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::{
    error::{ApiError, ApiResult},
    extract::{Auth, JsonBody, PathParams, QueryParams},
};

#[derive(Deserialize)]
pub struct UploadBody {
    device_keys: Option<Value>,
    #[serde(default)]
    one_time_keys: Map<String, Value>,
    #[serde(default)]
    fallback_keys: Map<String, Value>,
}

/// POST /_matrix/client/v3/keys/upload
pub async fn upload_keys_route(State(keys): State<Arc<Keys>>, Auth(s): Auth, JsonBody(b): JsonBody<UploadBody>) -> ApiResult<Json<Value>> {
    let upload = KeysUpload {
        device_keys: b.device_keys,
        one_time_keys: b.one_time_keys,
        fallback_keys: b.fallback_keys,
    };
    let counts = keys.upload(&s, upload).await?;
    Ok(Json(json!({ "one_time_key_counts": OneTimeKeyCounts(counts) })))
}

#[derive(Deserialize)]
pub struct QueryBody {
    device_keys: BTreeMap<OwnedUserId, Vec<String>>,
}

/// POST /_matrix/client/v3/keys/query
pub async fn query_keys_route(State(keys): State<Arc<Keys>>, Auth(s): Auth, JsonBody(b): JsonBody<QueryBody>) -> ApiResult<Json<Value>> {
    Ok(Json(keys.query(&s.user_id, b.device_keys).await?))
}

#[derive(Deserialize)]
pub struct ClaimBody {
    one_time_keys: BTreeMap<OwnedUserId, BTreeMap<String, String>>,
}

/// POST /_matrix/client/v3/keys/claim
pub async fn claim_keys_route(State(keys): State<Arc<Keys>>, Auth(_): Auth, JsonBody(b): JsonBody<ClaimBody>) -> ApiResult<Json<Value>> {
    Ok(Json(keys.claim(b.one_time_keys).await?))
}

#[derive(Deserialize)]
pub struct ChangesQuery {
    from: String,
    to: String,
}

fn sync_position(token: &str) -> ApiResult<u64> {
    token
        .parse::<SyncToken>()
        .map(|t| t.stream)
        .map_err(|e| ApiError::invalid_param(e.to_string()))
}

/// GET /_matrix/client/v3/keys/changes
pub async fn key_changes_route(
    State(keys): State<Arc<Keys>>,
    Auth(s): Auth,
    QueryParams(q): QueryParams<ChangesQuery>,
) -> ApiResult<Json<Value>> {
    let delta = keys.changes(&s.user_id, sync_position(&q.from)?, sync_position(&q.to)?).await?;
    Ok(Json(json!({ "changed": delta.changed, "left": delta.left })))
}

#[derive(Deserialize)]
pub struct CrossSigningBody {
    master_key: Option<Value>,
    self_signing_key: Option<Value>,
    user_signing_key: Option<Value>,
    auth: Option<Value>,
}

/// POST /_matrix/client/v3/keys/device_signing/upload
pub async fn upload_cross_signing_route(
    State(keys): State<Arc<Keys>>,
    State(accounts): State<Arc<Accounts>>,
    Auth(s): Auth,
    JsonBody(b): JsonBody<CrossSigningBody>,
) -> ApiResult<Json<Value>> {
    let upload = CrossSigningUpload {
        master_key: b.master_key,
        self_signing_key: b.self_signing_key,
        user_signing_key: b.user_signing_key,
    };
    if keys.cross_signing_needs_auth(&s.user_id, &upload).await? {
        accounts.require_password(&s, b.auth.as_ref(), "replace cross-signing keys").await?;
    }
    keys.upload_cross_signing(&s.user_id, upload).await?;
    Ok(Json(json!({})))
}

/// POST /_matrix/client/v3/keys/signatures/upload
pub async fn upload_signatures_route(
    State(keys): State<Arc<Keys>>,
    Auth(s): Auth,
    JsonBody(b): JsonBody<Map<String, Value>>,
) -> ApiResult<Json<Value>> {
    Ok(Json(keys.upload_signatures(&s.user_id, b).await?))
}

#[derive(Deserialize)]
pub struct SendToDeviceBody {
    messages: Map<String, Value>,
}

/// PUT /_matrix/client/v3/sendToDevice/{eventType}/{txnId}
pub async fn send_to_device_route(
    State(to_device): State<Arc<ToDevice>>,
    Auth(s): Auth,
    PathParams((kind, txn)): PathParams<(String, String)>,
    JsonBody(b): JsonBody<SendToDeviceBody>,
) -> ApiResult<Json<Value>> {
    to_device.send(&s, &kind, &txn, b.messages).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct BackupVersionBody {
    algorithm: String,
    auth_data: Value,
}

/// POST /_matrix/client/v3/room_keys/version
pub async fn create_backup_route(
    State(backups): State<Arc<KeyBackups>>,
    Auth(s): Auth,
    JsonBody(b): JsonBody<BackupVersionBody>,
) -> ApiResult<Json<Value>> {
    let version = backups.create_version(&s.user_id, &b.algorithm, &b.auth_data).await?;
    Ok(Json(json!({ "version": version })))
}

/// GET /_matrix/client/v3/room_keys/version
pub async fn current_backup_route(State(backups): State<Arc<KeyBackups>>, Auth(s): Auth) -> ApiResult<Json<Value>> {
    Ok(Json(backups.version(&s.user_id, None).await?))
}

/// GET /_matrix/client/v3/room_keys/version/{version}
pub async fn backup_route(
    State(backups): State<Arc<KeyBackups>>,
    Auth(s): Auth,
    PathParams(version): PathParams<String>,
) -> ApiResult<Json<Value>> {
    Ok(Json(backups.version(&s.user_id, Some(&version)).await?))
}

/// PUT /_matrix/client/v3/room_keys/version/{version}
pub async fn update_backup_route(
    State(backups): State<Arc<KeyBackups>>,
    Auth(s): Auth,
    PathParams(version): PathParams<String>,
    JsonBody(b): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    backups.update_version(&s.user_id, &version, &b).await?;
    Ok(Json(json!({})))
}

/// DELETE /_matrix/client/v3/room_keys/version/{version}
pub async fn delete_backup_route(
    State(backups): State<Arc<KeyBackups>>,
    Auth(s): Auth,
    PathParams(version): PathParams<String>,
) -> ApiResult<Json<Value>> {
    backups.delete_version(&s.user_id, &version).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct VersionQuery {
    version: String,
}

/// Which level of `/room_keys/keys` a request is at: all keys, a room's, or one session's.
#[derive(Deserialize, Default)]
pub struct RoomKeysPath {
    room: Option<OwnedRoomId>,
    session: Option<String>,
}

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for RoomKeysPath {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Self::Rejection> {
        use axum::extract::{Path, rejection::PathRejection};
        match Path::<RoomKeysPath>::from_request_parts(parts, state).await {
            Ok(Path(path)) => Ok(path),
            // The top level has no path parameters at all.
            Err(PathRejection::MissingPathParams(_)) => Ok(RoomKeysPath::default()),
            Err(e) => Err(ApiError::invalid_param(e.body_text())),
        }
    }
}

impl RoomKeysPath {
    fn scope(&self) -> BackupScope<'_> {
        BackupScope {
            room_id: self.room.as_deref(),
            session_id: self.session.as_deref(),
        }
    }

    /// The body of a PUT at this level, as `{room: {"sessions": {session: data}}}`.
    fn rooms_of(&self, body: Value) -> ApiResult<Map<String, Value>> {
        let rooms = match (&self.room, &self.session) {
            (Some(room), Some(session)) => json!({ room.as_str(): { "sessions": { session.as_str(): body } } }),
            (Some(room), None) => json!({ room.as_str(): body }),
            _ => body.get("rooms").cloned().ok_or_else(|| ApiError::bad_json("missing rooms"))?,
        };
        match rooms {
            Value::Object(map) => Ok(map),
            _ => Err(ApiError::bad_json("rooms must be an object")),
        }
    }
}

/// PUT /_matrix/client/v3/room_keys/keys[/{roomId}[/{sessionId}]]
pub async fn put_room_keys_route(
    State(backups): State<Arc<KeyBackups>>,
    Auth(s): Auth,
    path: RoomKeysPath,
    QueryParams(q): QueryParams<VersionQuery>,
    JsonBody(b): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    let rooms = path.rooms_of(b)?;
    Ok(Json(backups.put_keys(&s.user_id, &q.version, &rooms).await?))
}

/// GET /_matrix/client/v3/room_keys/keys[/{roomId}[/{sessionId}]]
pub async fn get_room_keys_route(
    State(backups): State<Arc<KeyBackups>>,
    Auth(s): Auth,
    path: RoomKeysPath,
    QueryParams(q): QueryParams<VersionQuery>,
) -> ApiResult<Json<Value>> {
    Ok(Json(backups.keys(&s.user_id, &q.version, path.scope()).await?))
}

/// DELETE /_matrix/client/v3/room_keys/keys[/{roomId}[/{sessionId}]]
pub async fn delete_room_keys_route(
    State(backups): State<Arc<KeyBackups>>,
    Auth(s): Auth,
    path: RoomKeysPath,
    QueryParams(q): QueryParams<VersionQuery>,
) -> ApiResult<Json<Value>> {
    Ok(Json(backups.delete_keys(&s.user_id, &q.version, path.scope()).await?))
}
