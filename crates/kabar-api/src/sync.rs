//! Sync and the per-user, per-room signals around it: filters, typing,
//! receipts, read markers, presence, account data, tags, push rules.

use std::{sync::Arc, time::Duration};

use axum::{Json, extract::State};
use kabar_core::{
    ephemeral::Ephemeral,
    rooms::Rooms,
    sync::{
        SyncEngine, SyncRequest, SyncResponse,
        sliding::{SlidingBody, SlidingRequest, SlidingResponse},
    },
    user_data::UserData,
};
use kabar_domain::{SyncToken, membership::Membership};
use ruma::{
    OwnedEventId, OwnedRoomId, OwnedUserId,
    api::client::filter::FilterDefinition,
    push::{Action, AnyPushRule, NewPushRule, RuleKind},
};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::{
    ApiMetrics,
    error::{ApiError, ApiResult},
    extract::{Auth, JsonBody, PathParams, QueryParams},
};

#[derive(Deserialize)]
pub struct SyncQuery {
    since: Option<String>,
    #[serde(default)]
    full_state: bool,
    timeout: Option<u64>,
    filter: Option<String>,
    set_presence: Option<String>,
}

/// GET /_matrix/client/v3/sync
pub async fn sync_route(
    State(sync): State<Arc<SyncEngine>>,
    State(ud): State<Arc<UserData>>,
    State(metrics): State<Arc<ApiMetrics>>,
    Auth(s): Auth,
    QueryParams(q): QueryParams<SyncQuery>,
) -> ApiResult<Json<SyncResponse>> {
    if q.set_presence
        .as_deref()
        .is_some_and(|p| !matches!(p, "online" | "offline" | "unavailable"))
    {
        return Err(ApiError::invalid_param("set_presence must be online, offline or unavailable"));
    }
    let since = q
        .since
        .as_deref()
        .map(|t| t.parse::<SyncToken>().map_err(|e| ApiError::invalid_param(e.to_string())))
        .transpose()?;
    let filter: Arc<FilterDefinition> = match q.filter.as_deref() {
        None => Arc::default(),
        Some(f) if f.trim_start().starts_with('{') => {
            Arc::new(serde_json::from_str(f).map_err(|e| ApiError::bad_json(format!("invalid filter: {e}")))?)
        }
        Some(id) => ud
            .sync_filter(&s.user_id, id)
            .await?
            .ok_or_else(|| ApiError::not_found("unknown filter"))?,
    };
    let req = SyncRequest {
        since,
        full_state: q.full_state,
        timeout: Duration::from_millis(q.timeout.unwrap_or(0)),
        filter,
        set_presence: q.set_presence,
    };
    let _open = metrics.sync_opened();
    Ok(Json(sync.sync(&s, req).await?))
}

#[derive(Deserialize)]
pub struct SlidingQuery {
    pos: Option<String>,
    timeout: Option<u64>,
    set_presence: Option<String>,
}

/// POST /_matrix/client/unstable/org.matrix.simplified_msc3575/sync
/// (simplified sliding sync, MSC4186)
pub async fn sliding_sync_route(
    State(sync): State<Arc<SyncEngine>>,
    State(metrics): State<Arc<ApiMetrics>>,
    Auth(s): Auth,
    QueryParams(q): QueryParams<SlidingQuery>,
    JsonBody(body): JsonBody<SlidingBody>,
) -> ApiResult<Json<SlidingResponse>> {
    if q.set_presence
        .as_deref()
        .is_some_and(|p| !matches!(p, "online" | "offline" | "unavailable"))
    {
        return Err(ApiError::invalid_param("set_presence must be online, offline or unavailable"));
    }
    let req = SlidingRequest {
        pos: q.pos,
        timeout: Duration::from_millis(q.timeout.unwrap_or(0)),
        set_presence: q.set_presence,
        body,
    };
    let _open = metrics.sync_opened();
    Ok(Json(sync.sliding_sync(&s, req).await?))
}

fn own_user(path_user: &str, s: &kabar_store::Session) -> ApiResult<OwnedUserId> {
    let u = OwnedUserId::try_from(path_user).map_err(|_| ApiError::invalid_param("invalid user id"))?;
    if u != s.user_id {
        return Err(ApiError::forbidden("you can only act for yourself"));
    }
    Ok(u)
}

fn room_id(s: &str) -> ApiResult<OwnedRoomId> {
    OwnedRoomId::try_from(s).map_err(|_| ApiError::invalid_param("invalid room id"))
}

/// POST /_matrix/client/v3/user/{userId}/filter
pub async fn create_filter_route(
    State(ud): State<Arc<UserData>>,
    Auth(s): Auth,
    PathParams(user): PathParams<String>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&user, &s)?;
    serde_json::from_value::<FilterDefinition>(body.clone()).map_err(|e| ApiError::bad_json(format!("invalid filter: {e}")))?;
    Ok(Json(json!({ "filter_id": ud.put_filter(&user, &body).await? })))
}

/// GET /_matrix/client/v3/user/{userId}/filter/{filterId}
pub async fn get_filter_route(
    State(ud): State<Arc<UserData>>,
    Auth(s): Auth,
    PathParams((user, id)): PathParams<(String, String)>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&user, &s)?;
    let json = ud.filter(&user, &id).await?.ok_or_else(|| ApiError::not_found("unknown filter"))?;
    Ok(Json(
        serde_json::from_str(&json).map_err(|e| kabar_core::Error::Internal(e.to_string()))?,
    ))
}

#[derive(Deserialize)]
pub struct TypingBody {
    typing: bool,
    timeout: Option<u64>,
}

/// PUT /_matrix/client/v3/rooms/{roomId}/typing/{userId}
pub async fn typing_route(
    State(eph): State<Arc<Ephemeral>>,
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams((room, user)): PathParams<(String, String)>,
    JsonBody(b): JsonBody<TypingBody>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&user, &s)?;
    let room_id = room_id(&room)?;
    let room = rooms
        .room(&room_id)
        .await
        .map_err(|_| ApiError::forbidden("you are not in this room"))?;
    if room.read().membership(&user) != Some(Membership::Join) {
        return Err(ApiError::forbidden("you are not in this room"));
    }
    if room.read().member_visibility(&user).is_some() {
        // A channel's subscriber cannot post, and their typing would name
        // them to every other subscriber: accepted, told to no one.
        return Ok(Json(json!({})));
    }
    eph.set_typing(&room_id, &user, b.typing, Duration::from_millis(b.timeout.unwrap_or(30_000)));
    Ok(Json(json!({})))
}

#[derive(Deserialize, Default)]
pub struct ReceiptBody {
    thread_id: Option<String>,
}

/// POST /_matrix/client/v3/rooms/{roomId}/receipt/{receiptType}/{eventId}
pub async fn receipt_route(
    State(ud): State<Arc<UserData>>,
    Auth(s): Auth,
    PathParams((room, kind, event)): PathParams<(String, String, String)>,
    JsonBody(b): JsonBody<ReceiptBody>,
) -> ApiResult<Json<Value>> {
    let event = OwnedEventId::try_from(event).map_err(|_| ApiError::invalid_param("invalid event id"))?;
    ud.set_receipt(&s.user_id, &room_id(&room)?, &kind, &event, b.thread_id).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct ReadMarkersBody {
    #[serde(rename = "m.fully_read")]
    fully_read: Option<OwnedEventId>,
    #[serde(rename = "m.read")]
    read: Option<OwnedEventId>,
    #[serde(rename = "m.read.private")]
    read_private: Option<OwnedEventId>,
}

/// POST /_matrix/client/v3/rooms/{roomId}/read_markers
pub async fn read_markers_route(
    State(ud): State<Arc<UserData>>,
    Auth(s): Auth,
    PathParams(room): PathParams<String>,
    JsonBody(b): JsonBody<ReadMarkersBody>,
) -> ApiResult<Json<Value>> {
    let room_id = room_id(&room)?;
    for (kind, ev) in [
        ("m.fully_read", b.fully_read),
        ("m.read", b.read),
        ("m.read.private", b.read_private),
    ] {
        if let Some(ev) = ev {
            ud.set_receipt(&s.user_id, &room_id, kind, &ev, None).await?;
        }
    }
    Ok(Json(json!({})))
}

/// GET /_matrix/client/v3/presence/{userId}/status
///
/// Only the user and those who share a room with them may read it (a
/// status message is not for strangers).
pub async fn get_presence_route(
    State(eph): State<Arc<Ephemeral>>,
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams(user): PathParams<String>,
) -> ApiResult<Json<Value>> {
    let user = OwnedUserId::try_from(user).map_err(|_| ApiError::invalid_param("invalid user id"))?;
    if user != s.user_id && !rooms.share_a_room(&s.user_id, &user).await? {
        return Err(ApiError::forbidden("you may not see this user's presence"));
    }
    let p = eph
        .presence(&user)
        .ok_or_else(|| ApiError::not_found("no presence for this user"))?;
    let mut out = json!({ "presence": p.presence, "last_active_ago": p.last_active.elapsed().as_millis() as u64, "currently_active": p.presence == "online" });
    if let Some(m) = p.status_msg {
        out["status_msg"] = json!(m);
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
pub struct PresenceBody {
    presence: String,
    status_msg: Option<String>,
}

/// PUT /_matrix/client/v3/presence/{userId}/status
pub async fn set_presence_route(
    State(eph): State<Arc<Ephemeral>>,
    Auth(s): Auth,
    PathParams(user): PathParams<String>,
    JsonBody(b): JsonBody<PresenceBody>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&user, &s)?;
    if !matches!(b.presence.as_str(), "online" | "offline" | "unavailable") {
        return Err(ApiError::invalid_param("presence must be online, offline or unavailable"));
    }
    if b.status_msg.as_ref().is_some_and(|m| m.len() > 1024) {
        return Err(ApiError::invalid_param("status message is too long"));
    }
    eph.set_presence(&user, &b.presence, b.status_msg);
    Ok(Json(json!({})))
}

/// GET /_matrix/client/v3/user/{userId}/account_data/{type}
pub async fn get_account_data_route(
    State(ud): State<Arc<UserData>>,
    Auth(s): Auth,
    PathParams((user, kind)): PathParams<(String, String)>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&user, &s)?;
    Ok(Json(ud.account_data(&user, None, &kind).await?))
}

/// PUT /_matrix/client/v3/user/{userId}/account_data/{type}
pub async fn put_account_data_route(
    State(ud): State<Arc<UserData>>,
    Auth(s): Auth,
    PathParams((user, kind)): PathParams<(String, String)>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&user, &s)?;
    ud.set_account_data(&user, None, &kind, body).await?;
    Ok(Json(json!({})))
}

/// GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}
pub async fn get_room_account_data_route(
    State(ud): State<Arc<UserData>>,
    Auth(s): Auth,
    PathParams((user, room, kind)): PathParams<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&user, &s)?;
    Ok(Json(ud.account_data(&user, Some(&room_id(&room)?), &kind).await?))
}

/// PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/account_data/{type}
pub async fn put_room_account_data_route(
    State(ud): State<Arc<UserData>>,
    Auth(s): Auth,
    PathParams((user, room, kind)): PathParams<(String, String, String)>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&user, &s)?;
    ud.set_account_data(&user, Some(&room_id(&room)?), &kind, body).await?;
    Ok(Json(json!({})))
}

async fn tags_of(ud: &UserData, user: &OwnedUserId, room: &OwnedRoomId) -> ApiResult<Value> {
    match ud.account_data(user, Some(room), "m.tag").await {
        Ok(v) => Ok(v),
        Err(kabar_core::Error::NotFound(_)) => Ok(json!({ "tags": {} })),
        Err(e) => Err(e.into()),
    }
}

/// GET /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags
pub async fn get_tags_route(
    State(ud): State<Arc<UserData>>,
    Auth(s): Auth,
    PathParams((user, room)): PathParams<(String, String)>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&user, &s)?;
    Ok(Json(tags_of(&ud, &user, &room_id(&room)?).await?))
}

/// PUT /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}
pub async fn put_tag_route(
    State(ud): State<Arc<UserData>>,
    Auth(s): Auth,
    PathParams((user, room, tag)): PathParams<(String, String, String)>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&user, &s)?;
    let room = room_id(&room)?;
    if tag.is_empty() || tag.len() > 255 {
        return Err(ApiError::invalid_param("invalid tag"));
    }
    let mut tags = tags_of(&ud, &user, &room).await?;
    tags["tags"][&tag] = body;
    ud.set_account_data(&user, Some(&room), "m.tag", tags).await?;
    Ok(Json(json!({})))
}

/// DELETE /_matrix/client/v3/user/{userId}/rooms/{roomId}/tags/{tag}
pub async fn delete_tag_route(
    State(ud): State<Arc<UserData>>,
    Auth(s): Auth,
    PathParams((user, room, tag)): PathParams<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let user = own_user(&user, &s)?;
    let room = room_id(&room)?;
    let mut tags = tags_of(&ud, &user, &room).await?;
    if let Some(map) = tags["tags"].as_object_mut() {
        map.remove(&tag);
    }
    ud.set_account_data(&user, Some(&room), "m.tag", tags).await?;
    Ok(Json(json!({})))
}

/// GET /_matrix/client/v3/pushrules/
pub async fn push_rules_route(State(ud): State<Arc<UserData>>, Auth(s): Auth) -> ApiResult<Json<Value>> {
    Ok(Json(json!({ "global": ud.push_rules(&s.user_id).await? })))
}

/// GET /_matrix/client/v3/pushrules/global/
pub async fn push_rules_global_route(State(ud): State<Arc<UserData>>, Auth(s): Auth) -> ApiResult<Json<Value>> {
    Ok(Json(
        serde_json::to_value(ud.push_rules(&s.user_id).await?).map_err(|e| kabar_core::Error::Internal(e.to_string()))?,
    ))
}

/// Push rules live in the `global` scope; no other exists.
fn rule_scope(scope: &str) -> ApiResult<()> {
    if scope != "global" {
        return Err(ApiError::invalid_param("the only push rule scope is global"));
    }
    Ok(())
}

fn rule_kind(kind: &str) -> ApiResult<RuleKind> {
    Ok(match kind {
        "override" => RuleKind::Override,
        "underride" => RuleKind::Underride,
        "sender" => RuleKind::Sender,
        "room" => RuleKind::Room,
        "content" => RuleKind::Content,
        _ => return Err(ApiError::invalid_param("unknown push rule kind")),
    })
}

/// GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}
pub async fn get_push_rule_route(
    State(ud): State<Arc<UserData>>,
    Auth(s): Auth,
    PathParams((scope, kind, id)): PathParams<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    rule_scope(&scope)?;
    let rules = ud.push_rules(&s.user_id).await?;
    let rule = rules
        .get(rule_kind(&kind)?, &id)
        .ok_or_else(|| ApiError::not_found("push rule not found"))?;
    let json = match rule.to_owned() {
        AnyPushRule::Override(r) | AnyPushRule::Underride(r) => serde_json::to_value(r),
        AnyPushRule::Content(r) => serde_json::to_value(r),
        AnyPushRule::Room(r) => serde_json::to_value(r),
        AnyPushRule::Sender(r) => serde_json::to_value(r),
        _ => return Err(ApiError::not_found("push rule not found")),
    };
    Ok(Json(json.map_err(|e| kabar_core::Error::Internal(e.to_string()))?))
}

#[derive(Deserialize)]
pub struct PushRulePosition {
    before: Option<String>,
    after: Option<String>,
}

/// PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}
pub async fn put_push_rule_route(
    State(ud): State<Arc<UserData>>,
    Auth(s): Auth,
    PathParams((scope, kind, id)): PathParams<(String, String, String)>,
    QueryParams(pos): QueryParams<PushRulePosition>,
    JsonBody(mut body): JsonBody<serde_json::Map<String, Value>>,
) -> ApiResult<Json<Value>> {
    rule_scope(&scope)?;
    let kind = rule_kind(&kind)?;
    // The spec's rules for ids: no leading dot (server defaults), no
    // slashes; a room rule is named by its room, a sender rule by its user.
    if id.starts_with('.') {
        return Err(ApiError::invalid_param(
            "rule ids starting with a dot are reserved for server-default rules",
        ));
    }
    if id.is_empty() || id.contains(['/', '\\']) || id.chars().any(char::is_control) {
        return Err(ApiError::invalid_param("invalid push rule id"));
    }
    match kind {
        RuleKind::Room if OwnedRoomId::try_from(id.as_str()).is_err() => {
            return Err(ApiError::invalid_param("a room rule's id must be a room id"));
        }
        RuleKind::Sender if OwnedUserId::try_from(id.as_str()).is_err() => {
            return Err(ApiError::invalid_param("a sender rule's id must be a user id"));
        }
        _ => {}
    }
    body.insert("rule_id".into(), json!(id));
    let body = Value::Object(body);
    let bad = |e: serde_json::Error| ApiError::bad_json(format!("invalid push rule: {e}"));
    let rule = match kind {
        RuleKind::Override => NewPushRule::Override(serde_json::from_value(body).map_err(bad)?),
        RuleKind::Underride => NewPushRule::Underride(serde_json::from_value(body).map_err(bad)?),
        RuleKind::Sender => NewPushRule::Sender(serde_json::from_value(body).map_err(bad)?),
        RuleKind::Room => NewPushRule::Room(serde_json::from_value(body).map_err(bad)?),
        RuleKind::Content => NewPushRule::Content(serde_json::from_value(body).map_err(bad)?),
        _ => return Err(ApiError::invalid_param("unknown push rule kind")),
    };
    let mut rules = ud.push_rules(&s.user_id).await?;
    rules
        .insert(rule, pos.after.as_deref(), pos.before.as_deref())
        .map_err(|e| match e {
            ruma::push::InsertPushRuleError::UnknownRuleId => ApiError::not_found(e.to_string()),
            other => ApiError::invalid_param(other.to_string()),
        })?;
    ud.set_push_rules(&s.user_id, &rules).await?;
    Ok(Json(json!({})))
}

/// DELETE /_matrix/client/v3/pushrules/global/{kind}/{ruleId}
pub async fn delete_push_rule_route(
    State(ud): State<Arc<UserData>>,
    Auth(s): Auth,
    PathParams((scope, kind, id)): PathParams<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    rule_scope(&scope)?;
    let mut rules = ud.push_rules(&s.user_id).await?;
    rules.remove(rule_kind(&kind)?, &id).map_err(|e| match e {
        ruma::push::RemovePushRuleError::NotFound => ApiError::not_found("push rule not found"),
        other => ApiError::new(axum::http::StatusCode::BAD_REQUEST, "M_UNKNOWN", other.to_string()),
    })?;
    ud.set_push_rules(&s.user_id, &rules).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct EnabledBody {
    enabled: bool,
}

/// The rule a path names, for the `enabled` and `actions` endpoints.
async fn named_rule(ud: &UserData, s: &kabar_store::Session, scope: &str, kind: &str, id: &str) -> ApiResult<(bool, Value)> {
    rule_scope(scope)?;
    let rules = ud.push_rules(&s.user_id).await?;
    let rule = rules
        .get(rule_kind(kind)?, id)
        .ok_or_else(|| ApiError::not_found("push rule not found"))?;
    let actions = serde_json::to_value(rule.actions()).map_err(|e| kabar_core::Error::Internal(e.to_string()))?;
    Ok((rule.enabled(), actions))
}

/// GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled
pub async fn get_push_rule_enabled_route(
    State(ud): State<Arc<UserData>>,
    Auth(s): Auth,
    PathParams((scope, kind, id)): PathParams<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let (enabled, _) = named_rule(&ud, &s, &scope, &kind, &id).await?;
    Ok(Json(json!({ "enabled": enabled })))
}

/// GET /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions
pub async fn get_push_rule_actions_route(
    State(ud): State<Arc<UserData>>,
    Auth(s): Auth,
    PathParams((scope, kind, id)): PathParams<(String, String, String)>,
) -> ApiResult<Json<Value>> {
    let (_, actions) = named_rule(&ud, &s, &scope, &kind, &id).await?;
    Ok(Json(json!({ "actions": actions })))
}

/// PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/enabled
pub async fn push_rule_enabled_route(
    State(ud): State<Arc<UserData>>,
    Auth(s): Auth,
    PathParams((scope, kind, id)): PathParams<(String, String, String)>,
    JsonBody(b): JsonBody<EnabledBody>,
) -> ApiResult<Json<Value>> {
    rule_scope(&scope)?;
    let mut rules = ud.push_rules(&s.user_id).await?;
    rules
        .set_enabled(rule_kind(&kind)?, &id, b.enabled)
        .map_err(|_| ApiError::not_found("push rule not found"))?;
    ud.set_push_rules(&s.user_id, &rules).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct ActionsBody {
    actions: Vec<Action>,
}

/// PUT /_matrix/client/v3/pushrules/global/{kind}/{ruleId}/actions
pub async fn push_rule_actions_route(
    State(ud): State<Arc<UserData>>,
    Auth(s): Auth,
    PathParams((scope, kind, id)): PathParams<(String, String, String)>,
    JsonBody(b): JsonBody<ActionsBody>,
) -> ApiResult<Json<Value>> {
    rule_scope(&scope)?;
    let mut rules = ud.push_rules(&s.user_id).await?;
    rules
        .set_actions(rule_kind(&kind)?, &id, b.actions)
        .map_err(|_| ApiError::not_found("push rule not found"))?;
    ud.set_push_rules(&s.user_id, &rules).await?;
    Ok(Json(json!({})))
}

/// GET /_matrix/client/v3/pushers
pub async fn pushers_route(State(ud): State<Arc<UserData>>, Auth(s): Auth) -> ApiResult<Json<Value>> {
    Ok(Json(json!({ "pushers": ud.pushers(&s.user_id).await? })))
}

/// POST /_matrix/client/v3/pushers/set
pub async fn set_pusher_route(State(ud): State<Arc<UserData>>, Auth(s): Auth, JsonBody(body): JsonBody<Value>) -> ApiResult<Json<Value>> {
    ud.set_pusher(&s.user_id, &body).await?;
    Ok(Json(json!({})))
}
