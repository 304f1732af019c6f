//! Rooms: creation, membership, events, state, history, aliases, directory.

use std::sync::Arc;

use axum::{Json, extract::State};
use kabar_core::{
    filter::{TimelineFilter, filter_allows},
    rooms::{CreateRoom, Dir, Rooms, VisibleEvent},
    sync::{SyncEngine, client_event, visible_client_event},
    views::ViewCounts,
};
use kabar_domain::{NewEvent, PaginationToken, membership::Membership};
use kabar_store::{Session, StoredEvent, TxnRef};
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UserId, api::client::filter::RoomEventFilter};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::{
    error::{ApiError, ApiResult},
    extract::{Auth, JsonBody, PathParams, QueryParams},
};

fn room_id(s: &str) -> ApiResult<OwnedRoomId> {
    OwnedRoomId::try_from(s).map_err(|_| ApiError::invalid_param("invalid room id"))
}

fn event_id(s: &str) -> ApiResult<OwnedEventId> {
    OwnedEventId::try_from(s).map_err(|_| ApiError::invalid_param("invalid event id"))
}

fn user_id(s: &str) -> ApiResult<OwnedUserId> {
    OwnedUserId::try_from(s).map_err(|_| ApiError::invalid_param("invalid user id"))
}

#[derive(Deserialize, Default)]
pub struct CreateRoomBody {
    preset: Option<String>,
    visibility: Option<String>,
    room_version: Option<String>,
    creation_content: Option<Map<String, Value>>,
    #[serde(default)]
    initial_state: Vec<InitialState>,
    #[serde(default)]
    invite: Vec<String>,
    #[serde(default)]
    is_direct: bool,
    name: Option<String>,
    topic: Option<String>,
    room_alias_name: Option<String>,
    power_level_content_override: Option<Map<String, Value>>,
}

#[derive(Deserialize)]
struct InitialState {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    state_key: String,
    content: Map<String, Value>,
}

/// POST /_matrix/client/v3/createRoom
pub async fn create_room_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    JsonBody(b): JsonBody<CreateRoomBody>,
) -> ApiResult<Json<Value>> {
    let room_version = b
        .room_version
        .map(|v| {
            RoomVersionId::try_from(v.as_str())
                .map_err(|_| kabar_core::Error::UnsupportedRoomVersion(format!("room version {v} is not supported")))
        })
        .transpose()?;
    let invite = b.invite.iter().map(|u| user_id(u)).collect::<ApiResult<Vec<_>>>()?;
    let visibility_public = match b.visibility.as_deref() {
        None | Some("private") => false,
        Some("public") => true,
        Some(_) => return Err(ApiError::invalid_param("visibility must be public or private")),
    };
    let room_id = rooms
        .create_room(
            &s.user_id,
            CreateRoom {
                preset: b.preset,
                visibility_public,
                room_version,
                creation_content: b.creation_content,
                initial_state: b
                    .initial_state
                    .into_iter()
                    .map(|i| (i.kind, i.state_key, Value::Object(i.content)))
                    .collect(),
                invite,
                is_direct: b.is_direct,
                name: b.name,
                topic: b.topic,
                room_alias_name: b.room_alias_name,
                power_level_content_override: b.power_level_content_override,
            },
        )
        .await?;
    Ok(Json(json!({ "room_id": room_id })))
}

#[derive(Deserialize, Default)]
pub struct ReasonBody {
    reason: Option<String>,
}

/// POST /_matrix/client/v3/join/{roomIdOrAlias}
pub async fn join_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams(target): PathParams<String>,
    JsonBody(b): JsonBody<ReasonBody>,
) -> ApiResult<Json<Value>> {
    let room_id = rooms.resolve(&target).await?;
    rooms
        .set_membership(&s.user_id, &room_id, &s.user_id, Membership::Join, b.reason, None)
        .await?;
    Ok(Json(json!({ "room_id": room_id })))
}

/// POST /_matrix/client/v3/rooms/{roomId}/join
///
/// The same as joining by id through `/join/{roomIdOrAlias}`.
pub async fn join_by_id_route(
    rooms: State<Arc<Rooms>>,
    auth: Auth,
    PathParams(target): PathParams<String>,
    body: JsonBody<ReasonBody>,
) -> ApiResult<Json<Value>> {
    join_route(rooms, auth, PathParams(room_id(&target)?.to_string()), body).await
}

/// POST /_matrix/client/v3/rooms/{roomId}/leave
pub async fn leave_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams(target): PathParams<String>,
    JsonBody(b): JsonBody<ReasonBody>,
) -> ApiResult<Json<Value>> {
    let room_id = room_id(&target)?;
    let room = rooms
        .room(&room_id)
        .await
        .map_err(|_| ApiError::forbidden("you are not in this room"))?;
    if room.read().membership(&s.user_id).is_none_or(|m| m == Membership::Leave) {
        return Err(ApiError::forbidden("you are not in this room"));
    }
    rooms
        .set_membership(&s.user_id, &room_id, &s.user_id, Membership::Leave, b.reason, None)
        .await?;
    Ok(Json(json!({})))
}

/// POST /_matrix/client/v3/rooms/{roomId}/forget
pub async fn forget_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams(target): PathParams<String>,
) -> ApiResult<Json<Value>> {
    let room_id = room_id(&target)?;
    let membership = match rooms.room(&room_id).await {
        Ok(room) => room.read().membership(&s.user_id),
        Err(_) => None,
    };
    if matches!(membership, Some(Membership::Join | Membership::Invite)) {
        return Err(ApiError::new(
            axum::http::StatusCode::BAD_REQUEST,
            "M_UNKNOWN",
            "leave the room before forgetting it",
        ));
    }
    rooms.forget(&s.user_id, &room_id).await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
pub struct TargetBody {
    user_id: String,
    reason: Option<String>,
}

async fn membership_action(rooms: &Rooms, s: &Session, room: &str, b: TargetBody, membership: Membership) -> ApiResult<Json<Value>> {
    let room_id = room_id(room)?;
    let target = user_id(&b.user_id)?;
    rooms.check_can_read(&s.user_id, &room_id).await?;
    if membership == Membership::Leave {
        // Kick and unban both send "leave"; the auth rules tell them apart.
        let room = rooms.room(&room_id).await?;
        if room.read().membership(&target).is_none() {
            return Err(ApiError::forbidden("the user is not in this room"));
        }
    }
    rooms
        .set_membership(&s.user_id, &room_id, &target, membership, b.reason, None)
        .await?;
    Ok(Json(json!({})))
}

/// POST /_matrix/client/v3/rooms/{roomId}/invite
pub async fn invite_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams(room): PathParams<String>,
    JsonBody(b): JsonBody<TargetBody>,
) -> ApiResult<Json<Value>> {
    let target = user_id(&b.user_id)?;
    let rid = room_id(&room)?;
    if let Ok(r) = rooms.room(&rid).await
        && r.read().membership(&target) == Some(Membership::Join)
    {
        return Err(ApiError::forbidden("the user is already in the room"));
    }
    membership_action(&rooms, &s, &room, b, Membership::Invite).await
}

/// POST /_matrix/client/v3/rooms/{roomId}/kick
pub async fn kick_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams(room): PathParams<String>,
    JsonBody(b): JsonBody<TargetBody>,
) -> ApiResult<Json<Value>> {
    // A kick removes someone who is in the room, invited or knocking; a
    // "leave" for a banned user would be an unban, which has its own endpoint.
    let rid = room_id(&room)?;
    let target = user_id(&b.user_id)?;
    if let Ok(r) = rooms.room(&rid).await
        && !matches!(
            r.read().membership(&target),
            Some(Membership::Join | Membership::Invite | Membership::Knock)
        )
    {
        return Err(ApiError::forbidden("the user is not in this room"));
    }
    membership_action(&rooms, &s, &room, b, Membership::Leave).await
}

/// POST /_matrix/client/v3/rooms/{roomId}/ban
pub async fn ban_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams(room): PathParams<String>,
    JsonBody(b): JsonBody<TargetBody>,
) -> ApiResult<Json<Value>> {
    let rid = room_id(&room)?;
    let target = user_id(&b.user_id)?;
    rooms.check_can_read(&s.user_id, &rid).await?;
    rooms
        .set_membership(&s.user_id, &rid, &target, Membership::Ban, b.reason, None)
        .await?;
    Ok(Json(json!({})))
}

/// POST /_matrix/client/v3/rooms/{roomId}/unban
pub async fn unban_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams(room): PathParams<String>,
    JsonBody(b): JsonBody<TargetBody>,
) -> ApiResult<Json<Value>> {
    let rid = room_id(&room)?;
    let r = rooms.room(&rid).await?;
    if r.read().membership(&user_id(&b.user_id)?) != Some(Membership::Ban) {
        return Err(ApiError::forbidden("the user is not banned"));
    }
    membership_action(&rooms, &s, &room, b, Membership::Leave).await
}

/// GET /_matrix/client/v3/joined_rooms
pub async fn joined_rooms_route(State(ud): State<Arc<kabar_core::user_data::UserData>>, Auth(s): Auth) -> ApiResult<Json<Value>> {
    Ok(Json(json!({ "joined_rooms": ud.joined_rooms(&s.user_id).await? })))
}

/// The transaction a request is sent under: idempotent per device and
/// request path (`scope`: the endpoint and what its path names).
fn transaction(s: &Session, txn_id: String, scope: String) -> ApiResult<TxnRef> {
    if txn_id.is_empty() || txn_id.len() > 255 || txn_id.chars().any(char::is_control) {
        return Err(ApiError::invalid_param("invalid transaction id"));
    }
    Ok(TxnRef {
        device_id: s.device_id.clone(),
        txn_id,
        scope,
    })
}

fn content_object(body: Value) -> ApiResult<Value> {
    if body.is_object() {
        Ok(body)
    } else {
        Err(ApiError::bad_json("event content must be a JSON object"))
    }
}

/// PUT /_matrix/client/v3/rooms/{roomId}/send/{eventType}/{txnId}
pub async fn send_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams((room, kind, txn_id)): PathParams<(String, String, String)>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    let room_id = room_id(&room)?;
    if kind.is_empty() || kind.len() > 255 {
        return Err(ApiError::invalid_param("invalid event type"));
    }
    let content = content_object(body)?;
    let mut ev = NewEvent::message(kind.clone(), content);
    if kind == "m.room.redaction" {
        ev.redacts = ev.content.get("redacts").and_then(Value::as_str).map(event_id).transpose()?;
    }
    let txn = transaction(&s, txn_id, format!("send/{kind}"))?;
    let id = rooms.send(&s.user_id, &room_id, ev, Some(txn)).await?;
    Ok(Json(json!({ "event_id": id })))
}

/// PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}
pub async fn put_state_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams((room, kind, state_key)): PathParams<(String, String, String)>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    put_state(&rooms, &s, &room, kind, state_key, body).await
}

/// PUT /_matrix/client/v3/rooms/{roomId}/state/{eventType}
pub async fn put_state_empty_key_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams((room, kind)): PathParams<(String, String)>,
    JsonBody(body): JsonBody<Value>,
) -> ApiResult<Json<Value>> {
    put_state(&rooms, &s, &room, kind, String::new(), body).await
}

async fn put_state(rooms: &Rooms, s: &Session, room: &str, kind: String, state_key: String, body: Value) -> ApiResult<Json<Value>> {
    let room_id = room_id(room)?;
    if kind.is_empty() || kind.len() > 255 || state_key.len() > 255 {
        return Err(ApiError::invalid_param("invalid event type or state key"));
    }
    let content = content_object(body)?;
    if kind == "m.room.member" {
        // Membership changes go through the same checks as the membership endpoints.
        let target = user_id(&state_key)?;
        let m = content
            .get("membership")
            .and_then(Value::as_str)
            .and_then(Membership::parse)
            .ok_or_else(|| ApiError::bad_json("invalid membership"))?;
        let extra = content.as_object().cloned();
        let id = rooms.set_membership(&s.user_id, &room_id, &target, m, None, extra).await?;
        return Ok(Json(json!({ "event_id": id })));
    }
    let id = rooms
        .send(&s.user_id, &room_id, NewEvent::state(kind, state_key, content), None)
        .await?;
    Ok(Json(json!({ "event_id": id })))
}

/// GET /_matrix/client/v3/rooms/{roomId}/state
///
/// A former member gets the state as it was when they left.
pub async fn state_route(State(rooms): State<Arc<Rooms>>, Auth(s): Auth, PathParams(room): PathParams<String>) -> ApiResult<Json<Value>> {
    let state = rooms.readable_state(&s.user_id, &room_id(&room)?).await?;
    let events: Vec<Value> = state.events().iter().map(|e| client_event(e, &s, None)).collect();
    Ok(Json(Value::Array(events)))
}

#[derive(Deserialize)]
pub struct StateQuery {
    format: Option<String>,
}

async fn get_state(rooms: &Rooms, s: &Session, room: &str, kind: &str, key: &str, format: Option<String>) -> ApiResult<Json<Value>> {
    let event = match format.as_deref() {
        None | Some("content") => false,
        Some("event") => true,
        Some(_) => return Err(ApiError::invalid_param("format must be content or event")),
    };
    let state = rooms.readable_state(&s.user_id, &room_id(room)?).await?;
    let e = state.get(kind, key).ok_or_else(|| ApiError::not_found("state event not found"))?;
    if event {
        return Ok(Json(client_event(&e, s, None)));
    }
    Ok(Json(e.pdu.content_value()))
}

/// GET /_matrix/client/v3/rooms/{roomId}/state/{eventType}/{stateKey}
pub async fn get_state_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams((room, kind, key)): PathParams<(String, String, String)>,
    QueryParams(q): QueryParams<StateQuery>,
) -> ApiResult<Json<Value>> {
    get_state(&rooms, &s, &room, &kind, &key, q.format).await
}

/// GET /_matrix/client/v3/rooms/{roomId}/state/{eventType}
pub async fn get_state_empty_key_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams((room, kind)): PathParams<(String, String)>,
    QueryParams(q): QueryParams<StateQuery>,
) -> ApiResult<Json<Value>> {
    get_state(&rooms, &s, &room, &kind, "", q.format).await
}

/// PUT /_matrix/client/v3/rooms/{roomId}/redact/{eventId}/{txnId}
pub async fn redact_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams((room, event, txn_id)): PathParams<(String, String, String)>,
    JsonBody(b): JsonBody<ReasonBody>,
) -> ApiResult<Json<Value>> {
    let room_id = room_id(&room)?;
    let target = event_id(&event)?;
    let txn = transaction(&s, txn_id, format!("redact/{target}"))?;
    let id = rooms.redact(&s.user_id, &room_id, &target, b.reason, Some(txn)).await?;
    Ok(Json(json!({ "event_id": id })))
}

/// GET /_matrix/client/v3/rooms/{roomId}/event/{eventId}
pub async fn event_route(
    State(rooms): State<Arc<Rooms>>,
    State(views): State<Arc<ViewCounts>>,
    Auth(s): Auth,
    PathParams((room, event)): PathParams<(String, String)>,
) -> ApiResult<Json<Value>> {
    let room_id = room_id(&room)?;
    let e = rooms.event(&s.user_id, &room_id, &event_id(&event)?).await?;
    let mut out = viewed_events(&rooms, &views, &s, &room_id, std::slice::from_ref(&e)).await?;
    Ok(Json(out.remove(0)))
}

/// The events' client forms; in a channel, each post with its view count
/// in `unsigned` (`kabar.views`).
async fn viewed_events(rooms: &Rooms, views: &ViewCounts, s: &Session, room_id: &RoomId, events: &[VisibleEvent]) -> ApiResult<Vec<Value>> {
    let mut out: Vec<Value> = events.iter().map(|e| visible_client_event(e, s)).collect();
    let at = ChannelAt::read(rooms, room_id, &s.user_id).await?;
    if events.is_empty() || !at.channel {
        return Ok(out);
    }
    let positions: Vec<u64> = events.iter().map(|e| e.event.pos).collect();
    let counts = views.views(room_id, at.upto, &positions).await?;
    for (event, count) in out.iter_mut().zip(counts) {
        if let Some(count) = count {
            event["unsigned"]["kabar.views"] = json!(count);
        }
    }
    Ok(out)
}

/// What view counts need to know of a room for one user.
struct ChannelAt {
    /// The applied position: receipts up to it are counted.
    upto: u64,
    channel: bool,
    /// Whether the user is one of the channel's staff.
    staff: bool,
}

impl ChannelAt {
    async fn read(rooms: &Rooms, room_id: &RoomId, user: &UserId) -> ApiResult<Self> {
        let upto = rooms.applied().position();
        let room = rooms.room(room_id).await?;
        let r = room.read();
        Ok(ChannelAt {
            upto,
            channel: r.is_channel(),
            staff: r.member_visibility(user).is_none(),
        })
    }
}

/// GET /_matrix/client/unstable/kabar/rooms/{roomId}/views/{eventId}
///
/// A channel post's view count, for the channel's staff.
pub async fn post_views_route(
    State(rooms): State<Arc<Rooms>>,
    State(views): State<Arc<ViewCounts>>,
    Auth(s): Auth,
    PathParams((room, event)): PathParams<(String, String)>,
) -> ApiResult<Json<Value>> {
    let room_id = room_id(&room)?;
    let e = rooms.event(&s.user_id, &room_id, &event_id(&event)?).await?;
    let at = ChannelAt::read(&rooms, &room_id, &s.user_id).await?;
    if !at.channel {
        return Err(ApiError::not_found("not a channel"));
    }
    if !at.staff {
        return Err(ApiError::forbidden("only the channel's staff may ask"));
    }
    let count = views.views(&room_id, at.upto, &[e.event.pos]).await?.remove(0);
    let count = count.ok_or_else(|| ApiError::not_found("not a post"))?;
    Ok(Json(json!({ "event_id": e.event.pdu.event_id, "views": count })))
}

#[derive(Deserialize)]
pub struct MessagesQuery {
    from: Option<String>,
    to: Option<String>,
    dir: String,
    limit: Option<usize>,
    filter: Option<String>,
}

fn parse_filter(f: Option<&str>) -> ApiResult<RoomEventFilter> {
    match f {
        None => Ok(RoomEventFilter::default()),
        Some(f) => serde_json::from_str(f).map_err(|e| ApiError::bad_json(format!("invalid filter: {e}"))),
    }
}

fn token(s: &str) -> ApiResult<u64> {
    s.parse::<PaginationToken>()
        .map(|t| t.0)
        .map_err(|e| ApiError::invalid_param(e.to_string()))
}

/// GET /_matrix/client/v3/rooms/{roomId}/messages
pub async fn messages_route(
    State(rooms): State<Arc<Rooms>>,
    State(sync): State<Arc<SyncEngine>>,
    State(views): State<Arc<ViewCounts>>,
    Auth(s): Auth,
    PathParams(room): PathParams<String>,
    QueryParams(q): QueryParams<MessagesQuery>,
) -> ApiResult<Json<Value>> {
    let room_id = room_id(&room)?;
    let dir = match q.dir.as_str() {
        "b" => Dir::Backward,
        "f" => Dir::Forward,
        _ => return Err(ApiError::invalid_param("dir must be b or f")),
    };
    let filter = parse_filter(q.filter.as_deref())?;
    let limit = q.limit.or(filter.limit.map(|l| u64::from(l) as usize)).unwrap_or(10);
    let from = match (&q.from, dir) {
        (Some(f), _) => token(f)?,
        (None, Dir::Backward) => u64::MAX,
        (None, Dir::Forward) => 0,
    };
    let to = q.to.as_deref().map(token).transpose()?;
    let ignored = sync.ignored_users(&s.user_id).await?;
    let hidden = rooms.member_visibility(&s.user_id, &room_id).await?;
    // The limit counts only events the filter lets through.
    let keep = TimelineFilter {
        filter: &filter,
        ignored: &ignored,
        hidden: hidden.as_ref(),
    };
    let (events, end) = rooms.messages(&s.user_id, &room_id, from, to, dir, limit, keep).await?;
    let chunk = viewed_events(&rooms, &views, &s, &room_id, &events).await?;
    let state = lazy_members(&rooms, &s, &room_id, &filter, events.iter().map(|e| &e.event), None).await?;
    let start = if from == u64::MAX { rooms.store().current_position() } else { from };
    let mut out = json!({ "chunk": chunk, "start": PaginationToken(start).to_string(), "state": state });
    if let Some(end) = end {
        out["end"] = json!(PaginationToken(end).to_string());
    }
    Ok(Json(out))
}

/// With lazy-loaded members: the member events of the senders of `events`
/// (and of `also`), as they are in the state the user may see at the
/// newest of them; otherwise none (the client has the members from sync).
async fn lazy_members<'e>(
    rooms: &Rooms,
    s: &Session,
    room_id: &RoomId,
    filter: &RoomEventFilter,
    events: impl Iterator<Item = &'e StoredEvent>,
    also: Option<&UserId>,
) -> ApiResult<Vec<Value>> {
    if filter.lazy_load_options.is_disabled() {
        return Ok(vec![]);
    }
    let mut senders = std::collections::BTreeSet::new();
    let mut newest = 0;
    for e in events {
        senders.insert(e.pdu.sender.clone());
        newest = newest.max(e.pos);
    }
    senders.extend(also.map(UserId::to_owned));
    if senders.is_empty() {
        return Ok(vec![]);
    }
    let state = rooms.state_for_user_at(&s.user_id, room_id, newest).await?;
    Ok(state
        .iter()
        .filter(|e| {
            e.pdu.kind == ruma::events::TimelineEventType::RoomMember
                && e.pdu.state_key.as_deref().is_some_and(|k| senders.iter().any(|u| u.as_str() == k))
        })
        .map(|e| client_event(e, s, None))
        .collect())
}

#[derive(Deserialize)]
pub struct ContextQuery {
    limit: Option<usize>,
    filter: Option<String>,
}

/// GET /_matrix/client/v3/rooms/{roomId}/context/{eventId}
///
/// `state` is the state at the last event returned, as far as the user may
/// see it: for a former member, never what came after they left.
pub async fn context_route(
    State(rooms): State<Arc<Rooms>>,
    State(sync): State<Arc<SyncEngine>>,
    State(views): State<Arc<ViewCounts>>,
    Auth(s): Auth,
    PathParams((room, event)): PathParams<(String, String)>,
    QueryParams(q): QueryParams<ContextQuery>,
) -> ApiResult<Json<Value>> {
    let room_id = room_id(&room)?;
    let filter = parse_filter(q.filter.as_deref())?;
    let ev = rooms.event(&s.user_id, &room_id, &event_id(&event)?).await?;
    let limit = q.limit.unwrap_or(10).min(100);
    let before_n = limit / 2;
    let after_n = limit - before_n;
    let ignored = sync.ignored_users(&s.user_id).await?;
    let hidden = rooms.member_visibility(&s.user_id, &room_id).await?;
    let keep = TimelineFilter {
        filter: &filter,
        ignored: &ignored,
        hidden: hidden.as_ref(),
    };
    let pos = ev.event.pos;
    let (before, _) = if before_n > 0 {
        rooms
            .messages(&s.user_id, &room_id, pos - 1, None, Dir::Backward, before_n, keep)
            .await?
    } else {
        (vec![], None)
    };
    let (after, _) = if after_n > 0 {
        rooms.messages(&s.user_id, &room_id, pos, None, Dir::Forward, after_n, keep).await?
    } else {
        (vec![], None)
    };
    let start = before.last().map(|e| e.event.pos - 1).unwrap_or(pos - 1);
    let end = after.last().map(|e| e.event.pos).unwrap_or(pos);
    let state: Vec<Value> = if filter.lazy_load_options.is_disabled() {
        let mut state = rooms.state_for_user_at(&s.user_id, &room_id, end).await?;
        state.retain(|e| filter_allows(&filter, &e.pdu.kind.to_string(), &e.pdu.sender));
        state.iter().map(|e| client_event(e, &s, None)).collect()
    } else {
        let shown = before.iter().chain(&after).map(|e| &e.event).chain([&ev.event]);
        let mut state = rooms.state_for_user_at(&s.user_id, &room_id, end).await?;
        state.retain(|e| e.pdu.kind != ruma::events::TimelineEventType::RoomMember);
        let mut out: Vec<Value> = state.iter().map(|e| client_event(e, &s, None)).collect();
        out.extend(lazy_members(&rooms, &s, &room_id, &filter, shown, Some(&s.user_id)).await?);
        out
    };
    Ok(Json(json!({
        "event": viewed_events(&rooms, &views, &s, &room_id, std::slice::from_ref(&ev)).await?.remove(0),
        "events_before": viewed_events(&rooms, &views, &s, &room_id, &before).await?,
        "events_after": viewed_events(&rooms, &views, &s, &room_id, &after).await?,
        "start": PaginationToken(start).to_string(),
        "end": PaginationToken(end).to_string(),
        "state": state,
    })))
}

#[derive(Deserialize)]
pub struct MembersQuery {
    membership: Option<String>,
    not_membership: Option<String>,
}

fn membership_param(value: Option<&str>, name: &str) -> ApiResult<Option<Membership>> {
    value
        .map(|v| Membership::parse(v).ok_or_else(|| ApiError::invalid_param(format!("{name} must be join, invite, knock, leave or ban"))))
        .transpose()
}

/// GET /_matrix/client/v3/rooms/{roomId}/members
///
/// A former member gets the members as they were when they left.
pub async fn members_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams(room): PathParams<String>,
    QueryParams(q): QueryParams<MembersQuery>,
) -> ApiResult<Json<Value>> {
    let want = membership_param(q.membership.as_deref(), "membership")?;
    let not = membership_param(q.not_membership.as_deref(), "not_membership")?;
    let state = rooms.readable_state(&s.user_id, &room_id(&room)?).await?;
    let chunk: Vec<Value> = state
        .events()
        .iter()
        .filter(|e| e.pdu.kind == ruma::events::TimelineEventType::RoomMember)
        .filter(|e| {
            let m = Membership::from_content(e.pdu.content.get());
            want.is_none_or(|w| m == Some(w)) && not.is_none_or(|n| m != Some(n))
        })
        .map(|e| client_event(e, &s, None))
        .collect();
    Ok(Json(json!({ "chunk": chunk })))
}

#[derive(Deserialize)]
pub struct MembersPageQuery {
    from: Option<String>,
    limit: Option<usize>,
    membership: Option<String>,
    not_membership: Option<String>,
}

/// Members in a page of [`members_page_route`] unless the client asks.
const MEMBERS_PAGE_DEFAULT: usize = 100;
/// The most members one page of [`members_page_route`] holds.
const MEMBERS_PAGE_MAX: usize = 1000;

/// GET /_matrix/client/unstable/kabar/rooms/{roomId}/members?from=&limit=
///
/// The member events of a room a page at a time, in user id order, with
/// `membership`/`not_membership` as `/members` takes them: how the admins
/// of a channel or a supergroup page through hundreds of thousands of
/// members. `next_batch` (a user id) is the `from` of the next page and is
/// absent on the last. Who sees what is `/members`'s rule: a channel
/// subscriber pages through the staff and themselves.
pub async fn members_page_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams(room): PathParams<String>,
    QueryParams(q): QueryParams<MembersPageQuery>,
) -> ApiResult<Json<Value>> {
    let want = membership_param(q.membership.as_deref(), "membership")?;
    let not = membership_param(q.not_membership.as_deref(), "not_membership")?;
    let limit = q.limit.unwrap_or(MEMBERS_PAGE_DEFAULT);
    if !(1..=MEMBERS_PAGE_MAX).contains(&limit) {
        return Err(ApiError::invalid_param(format!("limit must be between 1 and {MEMBERS_PAGE_MAX}")));
    }
    let state = rooms.readable_state(&s.user_id, &room_id(&room)?).await?;
    let (page, next) = state.members_page(q.from.as_deref(), limit, |m| {
        want.is_none_or(|w| m == Some(w)) && not.is_none_or(|n| m != Some(n))
    });
    let chunk: Vec<Value> = page.iter().map(|e| client_event(e, &s, None)).collect();
    let mut body = json!({ "chunk": chunk });
    if let Some(next) = next {
        body["next_batch"] = json!(next);
    }
    Ok(Json(body))
}

/// GET /_matrix/client/v3/rooms/{roomId}/joined_members
pub async fn joined_members_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams(room): PathParams<String>,
) -> ApiResult<Json<Value>> {
    let room = rooms.check_can_read(&s.user_id, &room_id(&room)?).await?;
    let r = room.read();
    // In a channel a subscriber sees the staff and themselves only.
    let hidden = r.member_visibility(&s.user_id);
    let mut joined = Map::new();
    for user in r
        .members(Membership::Join)
        .filter(|u| hidden.as_ref().is_none_or(|h| h.shows_member(u)))
    {
        let c: Value = r
            .member(user)
            .and_then(|slot| serde_json::from_str(slot.content().get()).ok())
            .unwrap_or_default();
        // Optional fields are left out rather than null.
        let mut member = json!({});
        for (from, to) in [("displayname", "display_name"), ("avatar_url", "avatar_url")] {
            if let Some(v) = c.get(from).and_then(Value::as_str) {
                member[to] = json!(v);
            }
        }
        joined.insert(user.to_owned(), member);
    }
    Ok(Json(json!({ "joined": joined })))
}

#[derive(Deserialize)]
pub struct RelationsQuery {
    limit: Option<usize>,
    dir: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

async fn relations(
    rooms: &Rooms,
    s: &Session,
    room: &str,
    event: &str,
    rel_type: Option<&str>,
    event_type: Option<&str>,
    q: RelationsQuery,
) -> ApiResult<Json<Value>> {
    let mut events = rooms
        .relations(&s.user_id, &room_id(room)?, &event_id(event)?, rel_type, 1000)
        .await?;
    if let Some(t) = event_type {
        events.retain(|e| e.event.pdu.kind.to_string() == t);
    }
    let from = q.from.as_deref().map(token).transpose()?;
    let to = q.to.as_deref().map(token).transpose()?;
    let forward = match q.dir.as_deref() {
        None | Some("b") => false,
        Some("f") => true,
        Some(_) => return Err(ApiError::invalid_param("dir must be b or f")),
    };
    // Same token meaning as /messages: t{n} sits just after the event at position n.
    if forward {
        events.retain(|e| from.is_none_or(|f| e.event.pos > f) && to.is_none_or(|t| e.event.pos <= t));
    } else {
        events.retain(|e| from.is_none_or(|f| e.event.pos <= f) && to.is_none_or(|t| e.event.pos > t));
        events.reverse();
    }
    let limit = q.limit.unwrap_or(50).clamp(1, 1000);
    let more = events.len() > limit;
    events.truncate(limit);
    let mut out = json!({ "chunk": events.iter().map(|e| visible_client_event(e, s)).collect::<Vec<_>>() });
    if let (true, Some(last)) = (more, events.last()) {
        let next = if forward { last.event.pos } else { last.event.pos - 1 };
        out["next_batch"] = json!(PaginationToken(next).to_string());
    }
    Ok(Json(out))
}

#[derive(Deserialize)]
pub struct ThreadsQuery {
    include: Option<String>,
    from: Option<String>,
    limit: Option<usize>,
}

/// GET /_matrix/client/v1/rooms/{roomId}/threads
pub async fn threads_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams(room): PathParams<String>,
    QueryParams(q): QueryParams<ThreadsQuery>,
) -> ApiResult<Json<Value>> {
    let participated = match q.include.as_deref() {
        None | Some("all") => false,
        Some("participated") => true,
        Some(_) => return Err(ApiError::invalid_param("include must be all or participated")),
    };
    let skip: usize = match q.from.as_deref() {
        None => 0,
        Some(f) => f
            .strip_prefix('p')
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| ApiError::invalid_param("invalid from token"))?,
    };
    let limit = q.limit.unwrap_or(20).clamp(1, 100);
    let threads = rooms.threads(&s.user_id, &room_id(&room)?, participated, skip + limit + 1).await?;
    let more = threads.len() > skip + limit;
    let chunk: Vec<Value> = threads
        .iter()
        .skip(skip)
        .take(limit)
        .map(|t| {
            let mut root = visible_client_event(&t.root, &s);
            root["unsigned"]["m.relations"] = json!({ "m.thread": {
                "latest_event": visible_client_event(&t.latest, &s),
                "count": t.count,
                "current_user_participated": t.participated,
            }});
            root
        })
        .collect();
    let mut out = json!({ "chunk": chunk });
    if more {
        out["next_batch"] = json!(format!("p{}", skip + limit));
    }
    Ok(Json(out))
}

/// GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}
pub async fn relations_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams((room, event)): PathParams<(String, String)>,
    QueryParams(q): QueryParams<RelationsQuery>,
) -> ApiResult<Json<Value>> {
    relations(&rooms, &s, &room, &event, None, None, q).await
}

/// GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}/{relType}
pub async fn relations_type_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams((room, event, rel)): PathParams<(String, String, String)>,
    QueryParams(q): QueryParams<RelationsQuery>,
) -> ApiResult<Json<Value>> {
    relations(&rooms, &s, &room, &event, Some(&rel), None, q).await
}

/// GET /_matrix/client/v1/rooms/{roomId}/relations/{eventId}/{relType}/{eventType}
pub async fn relations_type_event_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams((room, event, rel, kind)): PathParams<(String, String, String, String)>,
    QueryParams(q): QueryParams<RelationsQuery>,
) -> ApiResult<Json<Value>> {
    relations(&rooms, &s, &room, &event, Some(&rel), Some(&kind), q).await
}

fn alias_of(s: &str, rooms: &Rooms) -> ApiResult<String> {
    let alias = ruma::RoomAliasId::parse(s).map_err(|_| ApiError::invalid_param("invalid room alias"))?;
    if alias.server_name() != rooms.server_name() {
        return Err(ApiError::invalid_param("aliases on other servers are not supported"));
    }
    Ok(alias.to_string())
}

/// GET /_matrix/client/v3/directory/room/{roomAlias}
pub async fn get_alias_route(State(rooms): State<Arc<Rooms>>, PathParams(alias): PathParams<String>) -> ApiResult<Json<Value>> {
    let alias = alias_of(&alias, &rooms)?;
    let room_id = rooms.resolve(&alias).await?;
    Ok(Json(json!({ "room_id": room_id, "servers": [rooms.server_name()] })))
}

#[derive(Deserialize)]
pub struct AliasBody {
    room_id: String,
}

/// PUT /_matrix/client/v3/directory/room/{roomAlias}
pub async fn put_alias_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams(alias): PathParams<String>,
    JsonBody(b): JsonBody<AliasBody>,
) -> ApiResult<Json<Value>> {
    let alias = alias_of(&alias, &rooms)?;
    let room_id = room_id(&b.room_id)?;
    rooms.check_can_read(&s.user_id, &room_id).await?;
    rooms.store().set_alias(&alias, &room_id, &s.user_id).await.map_err(|e| match e {
        // The spec's answer for a taken alias: 409.
        kabar_store::StoreError::Conflict(_) => ApiError::new(
            axum::http::StatusCode::CONFLICT,
            "M_UNKNOWN",
            format!("room alias {alias} already exists"),
        ),
        other => kabar_core::Error::from(other).into(),
    })?;
    Ok(Json(json!({})))
}

/// DELETE /_matrix/client/v3/directory/room/{roomAlias}
pub async fn delete_alias_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams(alias): PathParams<String>,
) -> ApiResult<Json<Value>> {
    let alias = alias_of(&alias, &rooms)?;
    let (room_id, creator) = rooms
        .store()
        .alias(&alias)
        .await
        .map_err(kabar_core::Error::from)?
        .ok_or_else(|| ApiError::not_found("alias not found"))?;
    if creator != s.user_id {
        let room = rooms.room(&room_id).await?;
        let r = room.read();
        if !r
            .power_levels()
            .user_can_send_state(&s.user_id, ruma::events::StateEventType::RoomCanonicalAlias)
        {
            return Err(ApiError::forbidden("you may not remove this alias"));
        }
    }
    rooms.store().delete_alias(&alias).await.map_err(kabar_core::Error::from)?;
    Ok(Json(json!({})))
}

/// GET /_matrix/client/v3/rooms/{roomId}/aliases
pub async fn room_aliases_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams(room): PathParams<String>,
) -> ApiResult<Json<Value>> {
    let room_id = room_id(&room)?;
    rooms.check_can_read(&s.user_id, &room_id).await?;
    Ok(Json(
        json!({ "aliases": rooms.store().room_aliases(&room_id).await.map_err(kabar_core::Error::from)? }),
    ))
}

/// GET /_matrix/client/v3/directory/list/room/{roomId}
pub async fn get_visibility_route(State(rooms): State<Arc<Rooms>>, PathParams(room): PathParams<String>) -> ApiResult<Json<Value>> {
    let rec = rooms
        .store()
        .room(&room_id(&room)?)
        .await
        .map_err(kabar_core::Error::from)?
        .ok_or_else(|| ApiError::not_found("unknown room"))?;
    Ok(Json(json!({ "visibility": if rec.is_public { "public" } else { "private" } })))
}

#[derive(Deserialize)]
pub struct VisibilityBody {
    visibility: String,
}

/// PUT /_matrix/client/v3/directory/list/room/{roomId}
pub async fn set_visibility_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(s): Auth,
    PathParams(room): PathParams<String>,
    JsonBody(b): JsonBody<VisibilityBody>,
) -> ApiResult<Json<Value>> {
    let room_id = room_id(&room)?;
    let public = match b.visibility.as_str() {
        "public" => true,
        "private" => false,
        _ => return Err(ApiError::invalid_param("visibility must be public or private")),
    };
    let room = rooms.check_can_read(&s.user_id, &room_id).await?;
    if !room
        .read()
        .power_levels()
        .user_can_send_state(&s.user_id, ruma::events::StateEventType::RoomCanonicalAlias)
    {
        return Err(ApiError::forbidden("you may not change this room's visibility"));
    }
    rooms
        .store()
        .set_room_public(&room_id, public)
        .await
        .map_err(kabar_core::Error::from)?;
    Ok(Json(json!({})))
}

#[derive(Deserialize, Default)]
pub struct PublicRoomsBody {
    limit: Option<usize>,
    since: Option<String>,
    filter: Option<PublicRoomsFilter>,
}

#[derive(Deserialize, Default)]
pub struct PublicRoomsFilter {
    generic_search_term: Option<String>,
}

async fn public_rooms(rooms: &Rooms, b: PublicRoomsBody) -> ApiResult<Json<Value>> {
    let ids = rooms.store().public_rooms().await.map_err(kabar_core::Error::from)?;
    let term = b.filter.and_then(|f| f.generic_search_term).map(|t| t.to_lowercase());
    let mut chunk = vec![];
    for id in ids {
        let room = rooms.room(&id).await?;
        let r = room.read();
        let get = |t: &str, f: &str| {
            r.state(t, "")
                .and_then(|e| e.pdu.content_value().get(f).and_then(Value::as_str).map(str::to_owned))
        };
        let name = get("m.room.name", "name");
        let topic = get("m.room.topic", "topic");
        if let Some(t) = &term {
            let hay = format!("{} {} {}", name.clone().unwrap_or_default(), topic.clone().unwrap_or_default(), id).to_lowercase();
            if !hay.contains(t.as_str()) {
                continue;
            }
        }
        let mut entry = json!({
            "room_id": id,
            "num_joined_members": r.member_count(Membership::Join),
            "world_readable": r.history_visibility() == kabar_domain::membership::HistoryVisibility::WorldReadable,
            "guest_can_join": get("m.room.guest_access", "guest_access").as_deref() == Some("can_join"),
        });
        // Optional fields are left out rather than null: strict clients refuse null.
        for (field, value) in [
            ("name", name),
            ("topic", topic),
            ("canonical_alias", get("m.room.canonical_alias", "alias")),
            ("avatar_url", get("m.room.avatar", "url")),
            ("join_rule", get("m.room.join_rules", "join_rule")),
            (
                "room_type",
                r.state("m.room.create", "")
                    .and_then(|e| e.pdu.content_value().get("type").and_then(Value::as_str).map(str::to_owned)),
            ),
        ] {
            if let Some(v) = value {
                entry[field] = json!(v);
            }
        }
        chunk.push(entry);
    }
    let total = chunk.len();
    let skip: usize = b
        .since
        .as_deref()
        .and_then(|s| s.strip_prefix('p'))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let limit = b.limit.unwrap_or(100).clamp(1, 500);
    let page: Vec<Value> = chunk.into_iter().skip(skip).take(limit).collect();
    let mut out = json!({ "chunk": page, "total_room_count_estimate": total });
    if skip + limit < total {
        out["next_batch"] = json!(format!("p{}", skip + limit));
    }
    if skip > 0 {
        out["prev_batch"] = json!(format!("p{}", skip.saturating_sub(limit)));
    }
    Ok(Json(out))
}

/// GET /_matrix/client/v3/publicRooms
pub async fn public_rooms_get_route(
    State(rooms): State<Arc<Rooms>>,
    QueryParams(q): QueryParams<PublicRoomsQuery>,
) -> ApiResult<Json<Value>> {
    public_rooms(
        &rooms,
        PublicRoomsBody {
            limit: q.limit,
            since: q.since,
            filter: None,
        },
    )
    .await
}

#[derive(Deserialize)]
pub struct PublicRoomsQuery {
    limit: Option<usize>,
    since: Option<String>,
}

/// POST /_matrix/client/v3/publicRooms
pub async fn public_rooms_post_route(
    State(rooms): State<Arc<Rooms>>,
    Auth(_): Auth,
    JsonBody(b): JsonBody<PublicRoomsBody>,
) -> ApiResult<Json<Value>> {
    public_rooms(&rooms, b).await
}
