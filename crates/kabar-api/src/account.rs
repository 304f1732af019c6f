//! Discovery, registration, login, sessions, devices, profiles, user directory.

use std::sync::Arc;

use axum::{Json, extract::State};
use kabar_core::{
    accounts::{Accounts, RegistrationRequest},
    rooms::{Rooms, SUPPORTED_ROOM_VERSIONS},
    user_data::UserData,
};
use kabar_store::ProfileField;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    ServerInfo,
    error::{ApiError, ApiResult},
    extract::{Auth, ClientAddr, JsonBody, PathParams, QueryParams},
};

/// GET /_matrix/client/versions
pub async fn versions_route() -> Json<Value> {
    Json(json!({
        "versions": ["r0.6.1", "v1.1", "v1.2", "v1.3", "v1.4", "v1.5", "v1.6", "v1.7", "v1.8", "v1.9", "v1.10", "v1.11", "v1.12", "v1.13", "v1.14", "v1.15", "v1.16"],
        // Simplified sliding sync (MSC4186): what Element X syncs with.
        "unstable_features": { "org.matrix.simplified_msc3575": true },
    }))
}

/// GET /.well-known/matrix/client
pub async fn well_known_route(State(info): State<Arc<ServerInfo>>) -> Json<Value> {
    Json(json!({ "m.homeserver": { "base_url": info.public_base_url() } }))
}

/// GET /_matrix/client/v3/capabilities
pub async fn capabilities_route(State(rooms): State<Arc<Rooms>>, Auth(_): Auth) -> Json<Value> {
    let available: serde_json::Map<String, Value> = SUPPORTED_ROOM_VERSIONS.iter().map(|v| (v.to_string(), json!("stable"))).collect();
    Json(json!({
        "capabilities": {
            "m.change_password": { "enabled": true },
            "m.room_versions": { "default": rooms.default_version().as_str(), "available": available },
            "m.set_displayname": { "enabled": true },
            "m.set_avatar_url": { "enabled": true },
            "m.3pid_changes": { "enabled": false },
            "m.get_login_token": { "enabled": false },
        }
    }))
}

/// GET /_matrix/client/v3/login
pub async fn login_types_route() -> Json<Value> {
    Json(json!({ "flows": [{ "type": "m.login.password" }] }))
}

#[derive(Deserialize)]
pub struct LoginBody {
    #[serde(rename = "type")]
    kind: String,
    identifier: Option<Value>,
    user: Option<String>,
    password: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
}

/// POST /_matrix/client/v3/login
pub async fn login_route(
    State(accounts): State<Arc<Accounts>>,
    State(info): State<Arc<ServerInfo>>,
    ClientAddr(client): ClientAddr,
    JsonBody(body): JsonBody<LoginBody>,
) -> ApiResult<Json<Value>> {
    if body.kind != "m.login.password" {
        return Err(ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "M_UNKNOWN",
            "unsupported login type",
        ));
    }
    let user = match &body.identifier {
        Some(id) if id.get("type").and_then(Value::as_str) == Some("m.id.user") => {
            id.get("user").and_then(Value::as_str).map(str::to_owned)
        }
        Some(_) => {
            return Err(ApiError::new(
                axum::http::StatusCode::BAD_REQUEST,
                "M_UNKNOWN",
                "unsupported identifier type",
            ));
        }
        None => body.user.clone(),
    }
    .ok_or_else(|| ApiError::bad_json("missing user identifier"))?;
    let password = body.password.ok_or_else(|| ApiError::bad_json("missing password"))?;
    let li = accounts
        .login_password(&user, &password, body.device_id, body.initial_device_display_name, client)
        .await?;
    Ok(Json(json!({
        "user_id": li.user_id,
        "access_token": li.access_token,
        "device_id": li.device_id,
        "home_server": accounts.server_name(),
        "well_known": { "m.homeserver": { "base_url": info.public_base_url() } },
    })))
}

#[derive(Deserialize, Default)]
pub struct RegisterBody {
    username: Option<String>,
    password: Option<String>,
    device_id: Option<String>,
    initial_device_display_name: Option<String>,
    #[serde(default)]
    inhibit_login: bool,
    auth: Option<Value>,
}

#[derive(Deserialize)]
pub struct RegisterQuery {
    kind: Option<String>,
}

/// POST /_matrix/client/v3/register
pub async fn register_route(
    State(accounts): State<Arc<Accounts>>,
    ClientAddr(client): ClientAddr,
    QueryParams(q): QueryParams<RegisterQuery>,
    JsonBody(body): JsonBody<RegisterBody>,
) -> ApiResult<Json<Value>> {
    if q.kind.as_deref() == Some("guest") {
        return Err(ApiError::forbidden("guest access is not enabled"));
    }
    let li = accounts
        .register(
            RegistrationRequest {
                username: body.username,
                password: body.password,
                device_id: body.device_id,
                initial_device_display_name: body.initial_device_display_name,
                inhibit_login: body.inhibit_login,
                auth: body.auth,
            },
            client,
        )
        .await?;
    let mut out = json!({ "user_id": li.user_id, "home_server": accounts.server_name() });
    if let Some(t) = li.access_token {
        out["access_token"] = json!(t);
        out["device_id"] = json!(li.device_id);
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
pub struct AvailableQuery {
    username: String,
}

/// GET /_matrix/client/v3/register/available
pub async fn register_available_route(
    State(accounts): State<Arc<Accounts>>,
    QueryParams(q): QueryParams<AvailableQuery>,
) -> ApiResult<Json<Value>> {
    accounts.username_available(&q.username.to_lowercase()).await?;
    Ok(Json(json!({ "available": true })))
}

#[derive(Deserialize)]
pub struct TokenValidityQuery {
    token: String,
}

/// GET /_matrix/client/v1/register/m.login.registration_token/validity
pub async fn registration_token_validity_route(
    State(accounts): State<Arc<Accounts>>,
    QueryParams(q): QueryParams<TokenValidityQuery>,
) -> ApiResult<Json<Value>> {
    Ok(Json(json!({ "valid": accounts.registration_token_valid(&q.token).await? })))
}

/// GET /_matrix/client/v3/account/3pid
///
/// Kabar binds no third-party identifiers (email, phone): the list is empty.
pub async fn threepids_route(Auth(_): Auth) -> Json<Value> {
    Json(json!({ "threepids": [] }))
}

/// GET /_matrix/client/v3/thirdparty/protocols
///
/// No application-service bridges are registered, so no protocols.
pub async fn thirdparty_protocols_route(Auth(_): Auth) -> Json<Value> {
    Json(json!({}))
}

/// GET /_matrix/client/v3/voip/turnServer
///
/// Credentials for the configured TURN server, or `{}` when there is none
/// (clients then call peer to peer or through their own fallback).
pub async fn turn_server_route(State(info): State<Arc<ServerInfo>>, Auth(s): Auth) -> Json<Value> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match info.turn.credentials(&s.user_id, now) {
        Some(c) => Json(json!(c)),
        None => Json(json!({})),
    }
}

/// POST /_matrix/client/v3/logout
pub async fn logout_route(State(accounts): State<Arc<Accounts>>, Auth(s): Auth) -> ApiResult<Json<Value>> {
    accounts.logout(&s).await?;
    Ok(Json(json!({})))
}

/// POST /_matrix/client/v3/logout/all
pub async fn logout_all_route(State(accounts): State<Arc<Accounts>>, Auth(s): Auth) -> ApiResult<Json<Value>> {
    accounts.logout_all(&s.user_id).await?;
    Ok(Json(json!({})))
}

/// GET /_matrix/client/v3/account/whoami
pub async fn whoami_route(Auth(s): Auth) -> Json<Value> {
    Json(json!({ "user_id": s.user_id, "device_id": s.device_id, "is_guest": false }))
}

#[derive(Deserialize)]
pub struct PasswordBody {
    new_password: String,
    #[serde(default = "yes")]
    logout_devices: bool,
    auth: Option<Value>,
}

fn yes() -> bool {
    true
}

/// POST /_matrix/client/v3/account/password
pub async fn password_route(
    State(accounts): State<Arc<Accounts>>,
    Auth(s): Auth,
    JsonBody(b): JsonBody<PasswordBody>,
) -> ApiResult<Json<Value>> {
    accounts
        .change_password(&s, b.new_password, b.logout_devices, b.auth.as_ref())
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct AuthOnlyBody {
    auth: Option<Value>,
}

/// POST /_matrix/client/v3/account/deactivate
pub async fn deactivate_route(
    State(accounts): State<Arc<Accounts>>,
    Auth(s): Auth,
    JsonBody(b): JsonBody<AuthOnlyBody>,
) -> ApiResult<Json<Value>> {
    accounts.deactivate(&s, b.auth.as_ref()).await?;
    Ok(Json(json!({ "id_server_unbind_result": "no-support" })))
}

/// A device as `/devices` shows it: optional fields are left out, never null.
fn device_json(d: &kabar_store::DeviceRecord) -> Value {
    let mut out = json!({ "device_id": d.device_id });
    if let Some(name) = &d.display_name {
        out["display_name"] = json!(name);
    }
    if let Some(ip) = &d.last_seen_ip {
        out["last_seen_ip"] = json!(ip);
    }
    if let Some(ts) = d.last_seen_ms {
        out["last_seen_ts"] = json!(ts);
    }
    out
}

/// GET /_matrix/client/v3/devices
pub async fn devices_route(State(accounts): State<Arc<Accounts>>, Auth(s): Auth) -> ApiResult<Json<Value>> {
    let devices = accounts.store().devices(&s.user_id).await.map_err(kabar_core::Error::from)?;
    Ok(Json(json!({ "devices": devices.iter().map(device_json).collect::<Vec<_>>() })))
}

/// GET /_matrix/client/v3/devices/{deviceId}
pub async fn device_route(
    State(accounts): State<Arc<Accounts>>,
    Auth(s): Auth,
    PathParams(device_id): PathParams<String>,
) -> ApiResult<Json<Value>> {
    let devices = accounts.store().devices(&s.user_id).await.map_err(kabar_core::Error::from)?;
    let d = devices
        .iter()
        .find(|d| d.device_id == device_id)
        .ok_or_else(|| ApiError::not_found("device not found"))?;
    Ok(Json(device_json(d)))
}

#[derive(Deserialize)]
pub struct RenameBody {
    display_name: Option<String>,
}

/// PUT /_matrix/client/v3/devices/{deviceId}
pub async fn rename_device_route(
    State(accounts): State<Arc<Accounts>>,
    Auth(s): Auth,
    PathParams(device_id): PathParams<String>,
    JsonBody(b): JsonBody<RenameBody>,
) -> ApiResult<Json<Value>> {
    accounts.rename_device(&s, &device_id, b.display_name.as_deref()).await?;
    Ok(Json(json!({})))
}

/// DELETE /_matrix/client/v3/devices/{deviceId}
pub async fn delete_device_route(
    State(accounts): State<Arc<Accounts>>,
    Auth(s): Auth,
    PathParams(device_id): PathParams<String>,
    JsonBody(b): JsonBody<AuthOnlyBody>,
) -> ApiResult<Json<Value>> {
    accounts.delete_devices(&s, &[device_id], b.auth.as_ref()).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct DeleteDevicesBody {
    devices: Vec<String>,
    auth: Option<Value>,
}

/// POST /_matrix/client/v3/delete_devices
pub async fn delete_devices_route(
    State(accounts): State<Arc<Accounts>>,
    Auth(s): Auth,
    JsonBody(b): JsonBody<DeleteDevicesBody>,
) -> ApiResult<Json<Value>> {
    accounts.delete_devices(&s, &b.devices, b.auth.as_ref()).await?;
    Ok(Json(json!({})))
}

fn parse_user(user_id: &str) -> ApiResult<ruma::OwnedUserId> {
    ruma::OwnedUserId::try_from(user_id).map_err(|_| ApiError::invalid_param("invalid user id"))
}

/// GET /_matrix/client/v3/profile/{userId}
pub async fn profile_route(State(ud): State<Arc<UserData>>, PathParams(user_id): PathParams<String>) -> ApiResult<Json<Value>> {
    let p = ud.profile(&parse_user(&user_id)?).await?;
    let mut out = json!({});
    if let Some(d) = p.displayname {
        out["displayname"] = json!(d);
    }
    if let Some(a) = p.avatar_url {
        out["avatar_url"] = json!(a);
    }
    Ok(Json(out))
}

fn profile_field(field: &str) -> ApiResult<ProfileField> {
    match field {
        "displayname" => Ok(ProfileField::DisplayName),
        "avatar_url" => Ok(ProfileField::AvatarUrl),
        _ => Err(ApiError::not_found("unknown profile field")),
    }
}

/// GET /_matrix/client/v3/profile/{userId}/{keyName}
pub async fn profile_field_route(
    State(ud): State<Arc<UserData>>,
    PathParams((user_id, field)): PathParams<(String, String)>,
) -> ApiResult<Json<Value>> {
    let p = ud.profile(&parse_user(&user_id)?).await?;
    let value = match profile_field(&field)? {
        ProfileField::DisplayName => p.displayname,
        ProfileField::AvatarUrl => p.avatar_url,
    };
    let value = value.ok_or_else(|| ApiError::not_found("profile field not set"))?;
    Ok(Json(json!({ field: value })))
}

/// PUT /_matrix/client/v3/profile/{userId}/{keyName}
pub async fn set_profile_field_route(
    State(ud): State<Arc<UserData>>,
    Auth(s): Auth,
    PathParams((user_id, field)): PathParams<(String, String)>,
    JsonBody(body): JsonBody<serde_json::Map<String, Value>>,
) -> ApiResult<Json<Value>> {
    if parse_user(&user_id)? != s.user_id {
        return Err(ApiError::forbidden("you can only change your own profile"));
    }
    let kind = profile_field(&field)?;
    let value = match body.get(&field) {
        Some(Value::String(v)) => Some(v.clone()),
        Some(Value::Null) | None => None,
        Some(_) => return Err(ApiError::bad_json(format!("{field} must be a string"))),
    };
    ud.set_profile(&s.user_id, kind, value).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct UserSearchBody {
    search_term: String,
    #[serde(default = "ten")]
    limit: usize,
}

fn ten() -> usize {
    10
}

/// POST /_matrix/client/v3/user_directory/search
pub async fn user_search_route(
    State(ud): State<Arc<UserData>>,
    Auth(s): Auth,
    JsonBody(b): JsonBody<UserSearchBody>,
) -> ApiResult<Json<Value>> {
    let (users, limited) = ud.search_users(&s.user_id, &b.search_term, b.limit).await?;
    let results: Vec<Value> = users
        .iter()
        .map(|u| {
            let mut found = json!({ "user_id": u.user_id });
            if let Some(name) = &u.displayname {
                found["display_name"] = json!(name);
            }
            if let Some(avatar) = &u.avatar_url {
                found["avatar_url"] = json!(avatar);
            }
            found
        })
        .collect();
    Ok(Json(json!({ "results": results, "limited": limited })))
}
