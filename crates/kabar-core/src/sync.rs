//! The sync engine: what changed for a user since their token, and the wait
//! for the next change.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kabar_domain::{SyncToken, client_event::to_client_event, membership::Membership};
use kabar_store::{Direction, EventRange, KeyCounts, MembershipRecord, Session, Store, StoredEvent, StreamPos};
use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId, api::client::filter::FilterDefinition};
use serde::Serialize;
use serde_json::{Map, Value, json, value::RawValue};

pub mod sliding;

use crate::{
    changes::{Changes, GenerationCache},
    ephemeral::Ephemeral,
    error::Result,
    filter::{TimelineFilter, excludes_everything, filter_allows},
    keys::{DeviceListDelta, Keys, OneTimeKeyCounts},
    load::Gate,
    notifier::Notifier,
    push::{self, PushRules},
    rooms::{Room, Rooms, TimelineEvent, VisibleEvent},
    to_device::{ToDevice, ToDeviceEvent},
    views::ViewCounts,
};

const DEFAULT_TIMELINE_LIMIT: usize = 10;
const MAX_TIMELINE_LIMIT: usize = 1000;
const MAX_TIMEOUT: Duration = Duration::from_secs(300);
/// How long a sync waits for this process to apply a token another process
/// handed out (one from a node further along the stream) before it treats the
/// token as unknown.
const TOKEN_CATCH_UP: Duration = Duration::from_secs(2);
/// How long a woken sync waits for its rooms' sends in flight to be
/// applied before it answers (see `Room::quiet`).
const BURST_LINGER: Duration = Duration::from_millis(10);
/// How many events a sync reads through (hidden by the timeline filter or
/// from ignored users) looking for a room's timeline before it settles for
/// fewer events and a `limited` timeline.
const TIMELINE_SCAN_LIMIT: usize = 2_000;
/// State a client sees for a room it is invited to, before joining.
const INVITE_STATE_TYPES: &[&str] = &[
    "m.room.create",
    "m.room.join_rules",
    "m.room.name",
    "m.room.avatar",
    "m.room.canonical_alias",
    "m.room.encryption",
    "m.room.topic",
];

/// A `/sync` response. Events are pre-serialized JSON: the same event goes
/// to every member of a room, and is serialized once for all of them.
#[derive(Debug, Serialize)]
pub struct SyncResponse {
    pub next_batch: String,
    rooms: SyncRooms,
    account_data: Events<Value>,
    presence: Events<Value>,
    to_device: Events<ToDeviceEvent>,
    device_lists: DeviceListDelta,
    device_one_time_keys_count: OneTimeKeyCounts,
    device_unused_fallback_key_types: UnusedFallbackKeys,
}

#[derive(Debug)]
struct UnusedFallbackKeys(Arc<KeyCounts>);

impl Serialize for UnusedFallbackKeys {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        self.0.unused_fallback.serialize(serializer)
    }
}

#[derive(Debug, Serialize)]
struct SyncRooms {
    join: BTreeMap<OwnedRoomId, JoinedRoom>,
    invite: Map<String, Value>,
    leave: Map<String, Value>,
    knock: Map<String, Value>,
}

#[derive(Debug, Serialize)]
struct Events<T> {
    events: Vec<T>,
}

#[derive(Debug, Serialize)]
struct JoinedRoom {
    timeline: Timeline,
    state: Events<Box<RawValue>>,
    ephemeral: Events<Value>,
    account_data: Events<Value>,
    unread_notifications: UnreadNotifications,
    summary: RoomSummary,
}

#[derive(Debug, Serialize)]
struct Timeline {
    events: Vec<Box<RawValue>>,
    limited: bool,
    prev_batch: Option<String>,
}

#[derive(Debug, Serialize)]
struct UnreadNotifications {
    notification_count: u64,
    highlight_count: u64,
}

#[derive(Debug, Serialize)]
struct RoomSummary {
    /// Members to name the room by; only for a room without a name or
    /// canonical alias, and only when its members may have changed.
    #[serde(rename = "m.heroes", skip_serializing_if = "Option::is_none")]
    heroes: Option<Vec<OwnedUserId>>,
    #[serde(rename = "m.joined_member_count")]
    joined: usize,
    #[serde(rename = "m.invited_member_count")]
    invited: usize,
}

pub struct SyncRequest {
    pub since: Option<SyncToken>,
    pub full_state: bool,
    pub timeout: Duration,
    pub filter: Arc<FilterDefinition>,
    pub set_presence: Option<String>,
}

/// What the sync engine reads from: the store and the services that keep
/// each section of a response.
pub struct SyncSources {
    pub store: Arc<dyn Store>,
    pub rooms: Arc<Rooms>,
    pub notifier: Arc<Notifier>,
    pub ephemeral: Arc<Ephemeral>,
    pub changes: Arc<Changes>,
    pub keys: Arc<Keys>,
    pub to_device: Arc<ToDevice>,
    pub push_rules: Arc<PushRules>,
    pub views: Arc<ViewCounts>,
}

pub struct SyncEngine {
    store: Arc<dyn Store>,
    rooms: Arc<Rooms>,
    notifier: Arc<Notifier>,
    ephemeral: Arc<Ephemeral>,
    changes: Arc<Changes>,
    keys: Arc<Keys>,
    to_device: Arc<ToDevice>,
    push_rules: Arc<PushRules>,
    views: Arc<ViewCounts>,
    unread: Mutex<HashMap<(OwnedUserId, OwnedRoomId), UnreadEntry>>,
    /// Each user's memberships, kept until their membership tracker moves.
    memberships: GenerationCache<OwnedUserId, Arc<Vec<MembershipRecord>>>,
    /// Each user's ignored users, kept until their account data changes.
    ignored: GenerationCache<OwnedUserId, Arc<HashSet<OwnedUserId>>>,
    /// Each user's direct rooms (`m.direct`), kept until their account data changes.
    direct: GenerationCache<OwnedUserId, Arc<HashSet<OwnedRoomId>>>,
    /// What each sliding-sync connection was told.
    connections: sliding::Connections,
    /// Initial and full-state syncs read every joined room's state: bounded,
    /// so a crowd signing in cannot take the store's readers from the
    /// incremental syncs of people already chatting.
    full_syncs: Arc<Gate>,
    /// Responses being built at once. A post to a room of thousands wakes
    /// thousands of syncs; built all at once, each holding its half-built
    /// response across its store reads, they grew a server past 22 GB
    /// when the machine could not keep up. Queued here, they take turns
    /// and memory stays at what the turns hold.
    builds: tokio::sync::Semaphore,
}

/// How many sync responses (`/sync` and sliding sync) are built at once;
/// the others wait for a turn (FIFO). Building is CPU work with a few
/// store reads in between: more than this cannot finish sooner on any
/// machine Kabar runs on, and each one in progress holds its response.
const CONCURRENT_BUILDS: usize = 64;

/// Unread counts and the stream position they were counted up to.
#[derive(Debug, Clone, Copy)]
struct UnreadEntry {
    counted_upto: StreamPos,
    notifications: u64,
    highlights: u64,
}

/// Unread counts stop at this; clients show "999+".
const UNREAD_CAP: usize = 1000;
/// How many of a room's newest events an unread count read from the store
/// looks through at most (the count is a lower bound past them).
const UNREAD_SCAN: usize = 5_000;
/// Bound on remembered unread counts; past it they are recounted from the store.
const MAX_UNREAD_ENTRIES: usize = 1_000_000;
/// Bound on users whose memberships are remembered; past it they are read again.
const MAX_CACHED_MEMBERSHIPS: usize = 1_000_000;

fn room_allowed(filter: &FilterDefinition, room_id: &RoomId) -> bool {
    !filter.room.not_rooms.iter().any(|r| r == room_id) && filter.room.rooms.as_ref().is_none_or(|rs| rs.iter().any(|r| r == room_id))
}

/// An event's `unsigned` object as one viewer sees it.
#[derive(Serialize)]
struct Unsigned<'a> {
    age: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    transaction_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    redacted_because: Option<RedactedBecause<'a>>,
    /// The viewer's membership at the event, where it is known.
    #[serde(skip_serializing_if = "Option::is_none")]
    membership: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev_content: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev_sender: Option<&'a UserId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    replaces_state: Option<&'a ruma::EventId>,
    /// A channel post's view count (see `kabar_domain::channel::ViewCounter`).
    #[serde(rename = "kabar.views", skip_serializing_if = "Option::is_none")]
    views: Option<u32>,
}

#[derive(Serialize)]
struct RedactedBecause<'a> {
    event_id: &'a ruma::EventId,
    #[serde(rename = "type")]
    kind: &'static str,
}

impl<'a> Unsigned<'a> {
    /// The transaction id is shown only to the device that sent the event.
    fn for_viewer(e: &'a StoredEvent, viewer: &Session, membership: Option<Membership>) -> Self {
        let age = ruma::MilliSecondsSinceUnixEpoch::now()
            .get()
            .saturating_sub(e.pdu.origin_server_ts.get());
        let prev = e.prev.as_ref();
        Self {
            age: age.into(),
            transaction_id: e
                .txn
                .as_ref()
                .filter(|txn| e.pdu.sender == viewer.user_id && txn.device_id == viewer.device_id)
                .map(|txn| txn.txn_id.as_str()),
            redacted_because: e.redacted_by.as_deref().map(|event_id| RedactedBecause {
                event_id,
                kind: "m.room.redaction",
            }),
            membership: membership.map(Membership::as_str),
            prev_content: prev.and_then(|p| serde_json::from_str(&p.content).ok()),
            prev_sender: prev.map(|p| &*p.sender),
            replaces_state: prev.map(|p| &*p.event_id),
            views: None,
        }
    }
}

/// The client form of a stored event, with `unsigned` for this viewer
/// (their membership at the event, when the caller knows it).
pub fn client_event(e: &StoredEvent, viewer: &Session, membership: Option<Membership>) -> Value {
    let mut obj = to_client_event(&e.pdu);
    obj.insert(
        "unsigned".into(),
        serde_json::to_value(Unsigned::for_viewer(e, viewer, membership)).unwrap_or_default(),
    );
    Value::Object(obj)
}

/// [`client_event`] of an event the viewer may see.
pub fn visible_client_event(v: &VisibleEvent, viewer: &Session) -> Value {
    client_event(&v.event, viewer, Some(v.membership))
}

/// [`client_event`] from an event's pre-serialized client form: only the
/// viewer's `unsigned` object is written per viewer.
fn client_event_json(event: &TimelineEvent, viewer: &Session, membership: Option<Membership>) -> Box<RawValue> {
    viewed_client_event_json(event, viewer, membership, None)
}

/// [`client_event_json`] with a channel post's view count in `unsigned`.
fn viewed_client_event_json(event: &TimelineEvent, viewer: &Session, membership: Option<Membership>, views: Option<u32>) -> Box<RawValue> {
    let mut unsigned = Unsigned::for_viewer(&event.event, viewer, membership);
    unsigned.views = views;
    let unsigned = serde_json::to_string(&unsigned).unwrap_or_else(|_| "{}".into());
    let mut out = String::with_capacity(event.client_prefix().len() + unsigned.len() + 16);
    out.push_str(event.client_prefix());
    out.push_str(",\"unsigned\":");
    out.push_str(&unsigned);
    out.push('}');
    // The prefix is valid JSON up to its closing brace and `unsigned` is
    // serialized above; a failure here would be a bug, not bad input.
    RawValue::from_string(out).unwrap_or_else(|e| {
        tracing::error!(error = %e, "client event serialization produced invalid JSON");
        RawValue::from_string("{}".into()).expect("valid JSON")
    })
}

fn stripped(e: &kabar_domain::Pdu) -> Value {
    json!({
        "type": e.kind.to_string(),
        "state_key": e.state_key,
        "sender": e.sender,
        "content": serde_json::from_str::<Value>(e.content.get()).unwrap_or(Value::Null),
    })
}

impl SyncEngine {
    pub fn new(sources: SyncSources, full_syncs: Arc<Gate>) -> Self {
        let SyncSources {
            store,
            rooms,
            notifier,
            ephemeral,
            changes,
            keys,
            to_device,
            push_rules,
            views,
        } = sources;
        Self {
            store,
            rooms,
            notifier,
            ephemeral,
            changes,
            keys,
            to_device,
            push_rules,
            views,
            unread: Mutex::new(HashMap::new()),
            memberships: GenerationCache::new(MAX_CACHED_MEMBERSHIPS),
            ignored: GenerationCache::new(MAX_CACHED_MEMBERSHIPS),
            direct: GenerationCache::new(MAX_CACHED_MEMBERSHIPS),
            connections: sliding::Connections::default(),
            full_syncs,
            builds: tokio::sync::Semaphore::new(CONCURRENT_BUILDS),
        }
    }

    /// The user's memberships, from memory unless they changed since last read.
    async fn memberships(&self, user: &UserId) -> Result<Arc<Vec<MembershipRecord>>> {
        let read = async { self.store.memberships(user).await.map(Arc::new) };
        Ok(self
            .memberships
            .get_or_read(&self.changes.memberships, &user.to_owned(), read)
            .await?)
    }

    /// The users `user` ignores (`m.ignored_user_list`), from memory unless
    /// their account data changed.
    pub async fn ignored_users(&self, user: &UserId) -> Result<Arc<HashSet<OwnedUserId>>> {
        let read = async {
            let json = self.store.account_data(user, None, "m.ignored_user_list").await?;
            let ignored = json
                .and_then(|j| serde_json::from_str::<Value>(&j).ok())
                .and_then(|v| v.get("ignored_users").and_then(Value::as_object).cloned())
                .map(|users| users.keys().filter_map(|u| OwnedUserId::try_from(u.as_str()).ok()).collect())
                .unwrap_or_default();
            Ok::<_, kabar_store::StoreError>(Arc::new(ignored))
        };
        Ok(self.ignored.get_or_read(&self.changes.account_data, &user.to_owned(), read).await?)
    }

    /// Answers a `/sync`: at once if there is news (or this is an initial or
    /// full-state sync), else when the next relevant change arrives or the
    /// timeout ends.
    pub async fn sync(&self, session: &Session, mut req: SyncRequest) -> Result<SyncResponse> {
        if let Some(since) = req.since.map(|t| t.stream)
            && since > self.rooms.applied().position()
        {
            // A token from further along the stream than applied here: another
            // process on the same database handed it out, and this one catches
            // up to it. A token past everything committed (another server, a
            // restored backup) cannot say what the client has seen; the client
            // starts over with an initial sync.
            let committed = self.store.committed_position().await?;
            if since > committed || !self.rooms.applied().catch_up_to(since, TOKEN_CATCH_UP).await {
                req.since = None;
            }
        }
        let _full_sync_pass = if req.since.is_none() || req.full_state {
            Some(self.full_syncs.enter().await?)
        } else {
            None
        };
        self.mark_presence(&session.user_id, req.set_presence.as_deref());
        let deadline = Instant::now() + req.timeout.min(MAX_TIMEOUT);
        loop {
            let (memberships, interest) = self.watch(&session.user_id).await?;
            let watched = watched_rooms(&memberships);
            // A token for exactly what is applied now cannot have news: the
            // long-poll a client sends right after an answer (half of all
            // requests when a post wakes a crowd) waits without a build.
            let caught_up = !req.full_state && req.since == Some(self.position());
            let mut built = None;
            if !caught_up || Instant::now() >= deadline {
                let (response, has_news) = self.build_in_turn(session, &req, &memberships).await?;
                if req.since.is_none() || req.full_state || has_news || Instant::now() >= deadline {
                    return Ok(response);
                }
                built = Some(response);
            }
            if !interest.wait(deadline.saturating_duration_since(Instant::now())).await {
                return match built {
                    Some(response) => Ok(response),
                    None => Ok(self.build_in_turn(session, &req, &memberships).await?.0),
                };
            }
            // Woken: while a burst of sends to its rooms goes on, wait a
            // moment for the rest of it, so that it arrives in one response.
            let linger = tokio::time::Instant::now() + BURST_LINGER;
            for room_id in &watched {
                if let Ok(room) = self.rooms.room(room_id).await {
                    room.quiet(linger).await;
                }
            }
        }
    }

    /// The position a response built now would end at (unless queued
    /// to-device messages make it stop earlier).
    fn position(&self) -> SyncToken {
        SyncToken {
            stream: self.rooms.applied().position(),
            ephemeral: self.ephemeral.serial(),
        }
    }

    /// A turn to build a response (see [`CONCURRENT_BUILDS`]).
    async fn build_turn(&self) -> Result<tokio::sync::SemaphorePermit<'_>> {
        self.builds
            .acquire()
            .await
            .map_err(|_| crate::Error::Unavailable("the server is shutting down".into()))
    }

    async fn build_in_turn(&self, session: &Session, req: &SyncRequest, memberships: &[MembershipRecord]) -> Result<(SyncResponse, bool)> {
        let _turn = self.build_turn().await?;
        self.build(session, req, memberships).await
    }

    /// A sync marks its user present as `set_presence` says (online unless
    /// it says offline or unavailable).
    fn mark_presence(&self, user: &UserId, set_presence: Option<&str>) {
        match set_presence {
            Some("offline") => {}
            Some(p @ ("online" | "unavailable")) => self.ephemeral.set_presence(user, p, None),
            _ => self.ephemeral.set_presence(user, "online", None),
        }
    }

    /// The user's memberships, and an interest in every change to them and
    /// their rooms, taken before anything is looked at, so that a change
    /// between the look and the wait still wakes the sync.
    async fn watch(&self, user: &UserId) -> Result<(Arc<Vec<MembershipRecord>>, crate::notifier::Interest)> {
        let memberships = self.memberships(user).await?;
        let interest = self.notifier.interest(user, watched_rooms(&memberships));
        Ok((memberships, interest))
    }

    /// The receipts of `receipts` a user may see (others' private ones and
    /// ignored users' are not), as an `m.receipt` content by event.
    fn receipt_content(
        receipts: &[kabar_store::ReceiptRecord],
        user: &UserId,
        upto: StreamPos,
        ignored: &HashSet<OwnedUserId>,
    ) -> Map<String, Value> {
        let mut content: Map<String, Value> = Map::new();
        for rc in receipts.iter().filter(|r| r.pos <= upto) {
            if (rc.receipt_type == "m.read.private" && rc.user_id != user) || ignored.contains(&rc.user_id) {
                continue;
            }
            let mut data = json!({ "ts": rc.ts_ms });
            if let Some(t) = &rc.thread_id {
                data["thread_id"] = json!(t);
            }
            let by_event = content.entry(rc.event_id.to_string()).or_insert_with(|| json!({}));
            by_event[&rc.receipt_type][rc.user_id.as_str()] = data;
        }
        content
    }

    /// Whether receipts `user` is told of in `room_id` changed after `from`
    /// (where receipts are private, their own: see [`Self::receipts_told`]).
    fn receipts_moved(&self, user: &UserId, room_id: &RoomId, own_only: bool, from: StreamPos) -> bool {
        // No receipt in the room since `from`: not theirs either.
        self.changes.receipts.changed_since(&room_id.to_owned(), from)
            && (!own_only
                || self
                    .changes
                    .own_receipts
                    .changed_since(&(room_id.to_owned(), user.to_owned()), from))
    }

    /// The receipts in `room_id` after `from` (0: all of them) that `user`
    /// is told of; none when none changed. With `own_only` (a channel, a
    /// room too big to share receipts: `kabar_domain::receipts`) only their
    /// own: in a channel anyone else's would name a subscriber to everyone
    /// (its readers are shown as the view counts of its posts), and in both
    /// every member's receipt would wake every member.
    async fn receipts_told(
        &self,
        user: &UserId,
        room_id: &RoomId,
        own_only: bool,
        from: StreamPos,
    ) -> Result<Vec<kabar_store::ReceiptRecord>> {
        if from > 0 && !self.receipts_moved(user, room_id, own_only, from) {
            return Ok(vec![]);
        }
        Ok(self.store.receipts_since(room_id, from, own_only.then_some(user)).await?)
    }

    async fn build(&self, session: &Session, req: &SyncRequest, memberships: &[MembershipRecord]) -> Result<(SyncResponse, bool)> {
        let user = &*session.user_id;
        // Only up to what is applied: every cache and tracker below covers it,
        // and an event that commits late can never be skipped.
        let mut upto = self.position();
        let initial = req.since.is_none();
        let since = req.since.unwrap_or_default();
        // First, because more queued messages than one response carries
        // make the whole response stop at the last one it carries.
        let to_device = self.to_device.for_sync(session, req.since.map(|t| t.stream), upto.stream).await?;
        if let Some(stop_at) = to_device.stop_at {
            upto.stream = stop_at;
        }
        let key_counts = self.keys.key_counts(session).await?;
        let device_lists = if initial {
            DeviceListDelta::default()
        } else {
            self.keys.device_list_delta(user, memberships, since.stream, upto.stream).await?
        };
        let filter = &req.filter;
        let limit = filter
            .room
            .timeline
            .limit
            .map(|l| u64::from(l) as usize)
            .unwrap_or(DEFAULT_TIMELINE_LIMIT)
            .clamp(1, MAX_TIMELINE_LIMIT);

        let account_data = if initial || self.changes.account_data.changed_since(&user.to_owned(), since.stream) {
            self.store.account_data_since(user, if initial { 0 } else { since.stream }).await?
        } else {
            vec![]
        };
        let mut room_account_data: BTreeMap<OwnedRoomId, Vec<Value>> = BTreeMap::new();
        let mut global_account_data = vec![];
        for a in account_data.iter().filter(|a| a.pos <= upto.stream) {
            let ev = json!({ "type": a.kind, "content": serde_json::from_str::<Value>(&a.content).unwrap_or_default() });
            match &a.room_id {
                Some(r) => room_account_data.entry(r.clone()).or_default().push(ev),
                None => global_account_data.push(ev),
            }
        }

        let ignored = self.ignored_users(user).await?;
        let mut join = BTreeMap::new();
        let mut invite = Map::new();
        let mut leave = Map::new();
        let mut shared_rooms = Vec::new();
        // Whose presence a client must hear about even if it did not change:
        // members it meets for the first time.
        let mut met: HashSet<OwnedUserId> = HashSet::new();
        for m in memberships {
            if m.pos > upto.stream || !room_allowed(filter, &m.room_id) {
                continue;
            }
            match m.membership {
                Membership::Join => {
                    shared_rooms.push(m.room_id.clone());
                    let newly_joined = !initial && m.pos > since.stream;
                    let view = RoomView {
                        since,
                        upto,
                        joined_at: m.pos,
                        initial: initial || newly_joined,
                        full_state: initial || newly_joined || req.full_state,
                        limit,
                        filter,
                        ignored: &ignored,
                    };
                    if let Some((room, joiners)) = self
                        .joined_room(session, &m.room_id, view, room_account_data.remove(&m.room_id))
                        .await?
                    {
                        join.insert(m.room_id.clone(), room);
                        met.extend(joiners);
                    }
                }
                Membership::Invite if initial || m.pos > since.stream => {
                    let room = self.rooms.room(&m.room_id).await?;
                    let r = room.read();
                    let Some(me) = r.state("m.room.member", user.as_str()) else {
                        continue;
                    };
                    // Invites from ignored users are not shown (the spec's rule).
                    if ignored.contains(&me.pdu.sender) {
                        continue;
                    }
                    let mut events: Vec<Value> = INVITE_STATE_TYPES
                        .iter()
                        .filter_map(|t| r.state(t, ""))
                        .map(|e| stripped(&e.pdu))
                        .collect();
                    // Who invited: clients show "Alice invited you" rather than an empty room.
                    if let Some(inviter) = r.state("m.room.member", me.pdu.sender.as_str()) {
                        events.push(stripped(&inviter.pdu));
                    }
                    events.push(stripped(&me.pdu));
                    invite.insert(m.room_id.to_string(), json!({ "invite_state": { "events": events } }));
                }
                Membership::Leave | Membership::Ban if m.pos > since.stream && (!initial || filter.room.include_leave) => {
                    let hidden = self.rooms.room(&m.room_id).await?.read().member_visibility(user);
                    let timeline_filter = TimelineFilter {
                        filter: &filter.room.timeline,
                        ignored: &ignored,
                        hidden: hidden.as_ref(),
                    };
                    let (events, limited, _) = self
                        .timeline_from_store(user, &m.room_id, (since.stream, m.pos), limit, timeline_filter, true)
                        .await?;
                    let prev_batch = events.first().map(|e| format!("t{}", e.event.pos - 1));
                    let timeline: Vec<Value> = events.iter().map(|e| visible_client_event(e, session)).collect();
                    leave.insert(
                        m.room_id.to_string(),
                        json!({ "timeline": { "events": timeline, "limited": limited, "prev_batch": prev_batch }, "state": { "events": [] } }),
                    );
                }
                _ => {}
            }
        }

        let presence_since = if initial { 0 } else { since.ephemeral };
        let presence_filter = &filter.presence;
        let presence = if excludes_everything(presence_filter.types.as_deref(), &presence_filter.not_types)
            || (!initial && met.is_empty() && !self.ephemeral.presence_changed_since(presence_since))
        {
            vec![]
        } else {
            self.presence(user, &shared_rooms, presence_since, &met).await
        };
        let has_news = !join.is_empty()
            || !invite.is_empty()
            || !leave.is_empty()
            || !global_account_data.is_empty()
            || !presence.is_empty()
            || !to_device.events.is_empty()
            || !device_lists.is_empty();
        let response = SyncResponse {
            next_batch: upto.to_string(),
            rooms: SyncRooms {
                join,
                invite,
                leave,
                knock: Map::new(),
            },
            account_data: Events {
                events: global_account_data,
            },
            presence: Events { events: presence },
            to_device: Events { events: to_device.events },
            device_lists,
            device_one_time_keys_count: OneTimeKeyCounts(key_counts.clone()),
            device_unused_fallback_key_types: UnusedFallbackKeys(key_counts),
        };
        Ok((response, has_news))
    }

    /// One joined room's section, or `None` when nothing in it is news;
    /// with it, the members the client meets for the first time (whose
    /// presence it must be told).
    async fn joined_room(
        &self,
        session: &Session,
        room_id: &RoomId,
        view: RoomView<'_>,
        account_data: Option<Vec<Value>>,
    ) -> Result<Option<(JoinedRoom, Vec<OwnedUserId>)>> {
        let user = &*session.user_id;
        let RoomView {
            since,
            upto,
            joined_at,
            initial,
            full_state,
            limit,
            filter,
            ignored,
        } = view;
        let room = self.rooms.room(room_id).await?;
        let hidden = room.read().member_visibility(user);
        let timeline_filter = TimelineFilter {
            filter: &filter.room.timeline,
            ignored,
            hidden: hidden.as_ref(),
        };
        // Settled: every event up to `upto` is in the cache, so `last_pos`
        // cannot miss one that committed a moment ago.
        let last_pos = room.read().last_pos;
        let timeline_changed = initial || full_state || last_pos > since.stream;

        // The timeline: the newest `limit` events the filter lets through
        // (the limit counts only those). An incremental sync's events came
        // while the user was joined; a room seen for the first time may show
        // history from before, as its history visibility allows.
        let (events, limited, resume) = if timeline_changed {
            let seen_from = (!initial).then_some(since.stream);
            self.timeline(user, room_id, &room, seen_from, upto.stream, limit, timeline_filter)
                .await?
        } else {
            (vec![], false, upto.stream)
        };
        let prev_batch = timeline_changed.then(|| format!("t{resume}"));
        let timeline_ids: HashSet<&ruma::EventId> = events.iter().map(|(e, _)| &*e.event.pdu.event_id).collect();
        let timeline_senders: BTreeSet<&str> = events.iter().map(|(e, _)| e.event.pdu.sender.as_str()).collect();
        let timeline = self.timeline_json(session, room_id, &room, upto.stream, &events).await?;

        // State: everything for a full-state sync; otherwise every state
        // change since the token that the timeline does not show (a gap, or
        // events the timeline filter hides), so a client's state is never
        // left behind. With lazy-loaded members, member events only for the
        // timeline's senders (and, in a full sync, the user and the room's
        // heroes), so a huge room costs what its timeline does.
        let state_filter = &filter.room.state;
        let lazy_members = !state_filter.lazy_load_options.is_disabled();
        // Who the room is named by, and who the client meets for the first
        // time: looked at only when something happened in the room.
        let (heroes, joiners) = if timeline_changed {
            let r = room.read();
            let name_known = ["m.room.name", "m.room.canonical_alias"].iter().any(|t| {
                r.state(t, "").is_some_and(|e| {
                    e.pdu
                        .content_value()
                        .as_object()
                        .is_some_and(|c| c.values().any(|v| v.as_str().is_some_and(|s| !s.is_empty())))
                })
            });
            let member_changes = if full_state {
                HashMap::new()
            } else {
                r.member_changes(since.stream, upto.stream)
            };
            let heroes = (!name_known && (full_state || !member_changes.is_empty())).then(|| {
                let mut heroes = r.heroes(user);
                heroes.retain(|u| hidden.as_ref().is_none_or(|h| h.shows_member(u.as_str())));
                heroes
            });
            // Everyone, in a room just joined (a small one); else whoever joined since the token.
            let joiners: Vec<OwnedUserId> = if initial && since.stream > 0 {
                if r.member_count(Membership::Join) <= PRESENCE_ROOM_LIMIT {
                    r.members(Membership::Join)
                        .filter(|u| hidden.as_ref().is_none_or(|h| h.shows_member(u)))
                        .filter_map(|u| OwnedUserId::try_from(u).ok())
                        .collect()
                } else {
                    vec![]
                }
            } else {
                member_changes
                    .into_iter()
                    .filter(|(u, m)| *m == Membership::Join && u != user)
                    .filter(|(u, _)| hidden.as_ref().is_none_or(|h| h.shows_member(u.as_str())))
                    .map(|(u, _)| u)
                    .collect()
            };
            (heroes, joiners)
        } else {
            (None, vec![])
        };
        let mut state = vec![];
        {
            let r = room.read();
            let wanted = |pos: StreamPos, pdu: &kabar_domain::Pdu| {
                pos <= upto.stream
                    && hidden.as_ref().is_none_or(|h| h.shows(pdu))
                    && !timeline_ids.contains(&*pdu.event_id)
                    && filter_allows(state_filter, pdu.kind.to_string().as_str(), &pdu.sender)
            };
            let mut add = |entry: Cow<'_, crate::rooms::StateEntry>| {
                if wanted(entry.pos, &entry.pdu) {
                    state.push(client_event_json(&TimelineEvent::from_state(entry), session, None));
                }
            };
            let is_member = |e: &crate::rooms::StateEntry| e.pdu.kind == ruma::events::TimelineEventType::RoomMember;
            if full_state && lazy_members {
                r.state_entries_but_members().map(Cow::Borrowed).for_each(&mut add);
            } else if full_state {
                r.state_entries().for_each(&mut add);
            } else {
                for entry in r.state_changed_between(since.stream, upto.stream) {
                    if !(lazy_members && is_member(&entry)) {
                        add(entry);
                    }
                }
            }
            if lazy_members && (full_state || !timeline_senders.is_empty()) {
                // Looked up one by one: walking every member of a huge room on
                // every wake-up would make a send cost members squared. A
                // sender's member event is served from the room's latest
                // senders', made once for everyone woken by their message.
                let mut wanted_members: BTreeSet<&str> = timeline_senders.clone();
                if full_state {
                    wanted_members.insert(user.as_str());
                    wanted_members.extend(heroes.iter().flatten().map(|u| u.as_str()));
                }
                for key in wanted_members {
                    if let Some(member) = r.member_event(key)
                        && wanted(member.event.pos, &member.event.pdu)
                    {
                        state.push(client_event_json(&member, session, None));
                    }
                }
            }
        }

        let mut ephemeral = vec![];
        let typing = self.ephemeral.typing_since(room_id, if initial { 0 } else { since.ephemeral });
        if let Some(typing) = typing
            && !(initial && typing.is_empty())
        {
            let typing: Vec<OwnedUserId> = typing.into_iter().filter(|u| !ignored.contains(u)).collect();
            ephemeral.push(json!({ "type": "m.typing", "content": { "user_ids": typing } }));
        }
        let own_receipts_only = room.read().receipts_private();
        let receipts = self
            .receipts_told(user, room_id, own_receipts_only, if initial { 0 } else { since.stream })
            .await?;
        let receipt_content = Self::receipt_content(&receipts, user, upto.stream, ignored);
        if !receipt_content.is_empty() {
            ephemeral.push(json!({ "type": "m.receipt", "content": receipt_content }));
        }
        let account_data = account_data.unwrap_or_default();

        if !initial
            && !full_state
            && timeline.is_empty()
            && state.is_empty()
            && ephemeral.is_empty()
            && account_data.is_empty()
            && heroes.is_none()
        {
            // Nothing changed, or only what this filter hides: nothing to tell.
            return Ok(None);
        }

        // Unread counts: what the user's push rules make of others' events
        // after the user's own read receipt.
        let my_receipt_moved = initial
            || receipts
                .iter()
                .any(|r| r.user_id == user && r.thread_id.is_none() && matches!(r.receipt_type.as_str(), "m.read" | "m.read.private"));
        let unread = self
            .unread_counts(user, room_id, &room, (joined_at, upto.stream), my_receipt_moved, ignored)
            .await?;

        let (joined, invited) = {
            let r = room.read();
            (r.member_count(Membership::Join), r.member_count(Membership::Invite))
        };
        Ok(Some((
            JoinedRoom {
                timeline: Timeline {
                    events: timeline,
                    limited,
                    prev_batch,
                },
                state: Events { events: state },
                ephemeral: Events { events: ephemeral },
                account_data: Events { events: account_data },
                unread_notifications: UnreadNotifications {
                    notification_count: unread.notifications,
                    highlight_count: unread.highlights,
                },
                summary: RoomSummary { heroes, joined, invited },
            },
            joiners,
        )))
    }

    /// A timeline's events in their client form; in a channel, each post
    /// with its view count.
    async fn timeline_json(
        &self,
        session: &Session,
        room_id: &RoomId,
        room: &Room,
        upto: StreamPos,
        events: &[(Arc<TimelineEvent>, Membership)],
    ) -> Result<Vec<Box<RawValue>>> {
        let channel = room.read().is_channel();
        let views = if channel && !events.is_empty() {
            let positions: Vec<StreamPos> = events.iter().map(|(e, _)| e.event.pos).collect();
            self.views.views(room_id, upto, &positions).await?
        } else {
            vec![None; events.len()]
        };
        Ok(events
            .iter()
            .zip(views)
            .map(|((e, m), views)| viewed_client_event_json(e, session, Some(*m), views))
            .collect())
    }

    /// A room's timeline for a sync: the newest `limit` events up to `upto`
    /// that `filter` keeps, after `seen_from` (from the room's in-memory
    /// window when it reaches back that far), or, for a room the client
    /// sees for the first time (`None`), from its start as its history
    /// visibility allows; oldest first, whether more were left out, and
    /// where paging back goes on from (before the oldest event, or where
    /// the read stopped when it found none).
    #[allow(clippy::too_many_arguments)]
    async fn timeline(
        &self,
        user: &UserId,
        room_id: &RoomId,
        room: &Room,
        seen_from: Option<StreamPos>,
        upto: StreamPos,
        limit: usize,
        filter: TimelineFilter<'_>,
    ) -> Result<(Vec<(Arc<TimelineEvent>, Membership)>, bool, StreamPos)> {
        let before_first =
            |events: &[(Arc<TimelineEvent>, Membership)], otherwise: StreamPos| events.first().map_or(otherwise, |(e, _)| e.event.pos - 1);
        if let Some(after) = seen_from
            && let Some((found, more)) = room.read().recent_matching(after, upto, limit, |e| filter.keeps(e))
        {
            let events: Vec<_> = found.into_iter().map(|e| (e, Membership::Join)).collect();
            let resume = before_first(&events, upto);
            return Ok((events, more, resume));
        }
        let after = seen_from.unwrap_or(0);
        let (found, more, stopped_at) = self
            .timeline_from_store(user, room_id, (after, upto), limit, filter, seen_from.is_none())
            .await?;
        let events: Vec<_> = found
            .into_iter()
            .map(|v| (Arc::new(TimelineEvent::new(v.event)), v.membership))
            .collect();
        let resume = before_first(&events, stopped_at);
        Ok((events, more, resume))
    }

    /// The newest `limit` events in `(after, until]` that `filter` keeps and
    /// the user may see, oldest first, and whether more of them were left
    /// out (`limited`), and the position the read stopped at. Reads back in
    /// pages, through at most [`TIMELINE_SCAN_LIMIT`] events; with a filter
    /// of types, which the store applies in its index, through the room's
    /// newest [`TIMELINE_SCAN_LIMIT`] events only (a filter for messages in
    /// a supergroup of 200,000 joins must not pass over every join on each
    /// initial sync). `check_visibility` is for rooms seen for the first
    /// time, which may hold history from before the user came.
    async fn timeline_from_store(
        &self,
        user: &UserId,
        room_id: &RoomId,
        (after, until): (StreamPos, StreamPos),
        limit: usize,
        filter: TimelineFilter<'_>,
        check_visibility: bool,
    ) -> Result<(Vec<VisibleEvent>, bool, StreamPos)> {
        let view = if check_visibility {
            Some(self.rooms.history_view(user, room_id).await?)
        } else {
            None
        };
        let kinds = filter.exact_types();
        let floor = match kinds {
            Some(_) => self.rooms.typed_scan_floor(room_id, (after, until), TIMELINE_SCAN_LIMIT).await?,
            None => None,
        };
        let batch = (limit + 1).max(50);
        let mut found: Vec<VisibleEvent> = Vec::with_capacity(limit + 1);
        let mut cursor = until;
        let mut scanned = 0;
        loop {
            let page = self
                .store
                .room_events(EventRange {
                    room_id,
                    after: floor.unwrap_or(after),
                    until: cursor,
                    direction: Direction::Backward,
                    limit: batch,
                    kinds,
                    not_kinds: &[],
                })
                .await?;
            let at_start = page.len() < batch;
            scanned += page.len();
            for event in page {
                cursor = event.pos - 1;
                if !filter.keeps(&event) {
                    continue;
                }
                let membership = match &view {
                    Some(v) => match v.check(&event) {
                        Some(m) => m,
                        None => continue,
                    },
                    None => Membership::Join,
                };
                found.push(VisibleEvent { event, membership });
                if found.len() > limit {
                    found.truncate(limit);
                    found.reverse();
                    return Ok((found, true, cursor));
                }
            }
            if at_start {
                found.reverse();
                // Stopped at the floor rather than the room's start: more
                // may lie before it, for paging back.
                return Ok(match floor {
                    Some(floor) => (found, true, floor),
                    None => (found, false, until),
                });
            }
            if scanned >= TIMELINE_SCAN_LIMIT {
                found.reverse();
                return Ok((found, true, cursor));
            }
        }
    }

    /// Unread counts, kept per user and room and extended by judging only
    /// the events since the last count, until the user's read receipt moves.
    /// Events from before the user joined (`span.0`) are never unread.
    async fn unread_counts(
        &self,
        user: &UserId,
        room_id: &RoomId,
        room: &Room,
        (joined_at, upto): (StreamPos, StreamPos),
        receipt_moved: bool,
        ignored: &HashSet<OwnedUserId>,
    ) -> Result<UnreadEntry> {
        let key = (user.to_owned(), room_id.to_owned());
        let cached = self.unread.lock().expect("unread lock").get(&key).copied();
        let mut rules = None;
        let (start, base) = match cached {
            Some(e) if !receipt_moved && e.counted_upto <= upto => (e.counted_upto, e),
            _ => {
                // Read with the receipts, when a client's first sync starts
                // the count: else every member's first post after a start
                // (a crowd's, at once) would read them.
                rules = Some(self.push_rules.rules(user).await?);
                let mut read_pos: StreamPos = joined_at;
                for kind in ["m.read", "m.read.private"] {
                    if let Some(r) = self.store.receipt(room_id, user, kind).await?
                        && let Some(e) = self.store.event(&r.event_id).await?
                    {
                        read_pos = read_pos.max(e.pos);
                    }
                }
                let zero = UnreadEntry {
                    counted_upto: read_pos,
                    notifications: 0,
                    highlights: 0,
                };
                (read_pos, zero)
            }
        };
        let mut entry = UnreadEntry {
            counted_upto: upto,
            ..base
        };
        let candidates = upto > start && room.read().may_have_unread_after(start);
        if candidates && entry.notifications < UNREAD_CAP as u64 {
            let counts = |e: &StoredEvent| push::may_count(e, user) && !ignored.contains(&e.pdu.sender);
            let recent = room.read().recent_between(start, upto);
            let others: Vec<Arc<TimelineEvent>> = match recent {
                Some(events) => events.into_iter().filter(|e| counts(&e.event)).collect(),
                None => {
                    // The store passes member events over one by one in its
                    // index: it looks through the newest `UNREAD_SCAN` at most.
                    let floor = self
                        .rooms
                        .typed_scan_floor(room_id, (start, upto), UNREAD_SCAN)
                        .await?
                        .unwrap_or(start);
                    let member_events = [ruma::events::TimelineEventType::RoomMember.to_string()];
                    self.store
                        .room_events(EventRange {
                            room_id,
                            after: floor,
                            until: upto,
                            direction: Direction::Backward,
                            limit: UNREAD_CAP,
                            kinds: None,
                            // Never counted (see `push::may_count`), and a big
                            // room's joins would fill the read.
                            not_kinds: &member_events,
                        })
                        .await?
                        .into_iter()
                        .rev()
                        .filter(|e| counts(e))
                        .map(|e| Arc::new(TimelineEvent::new(e)))
                        .collect()
                }
            };
            if !others.is_empty() {
                let rules = match rules {
                    Some(rules) => rules,
                    None => self.push_rules.rules(user).await?,
                };
                for e in &others {
                    let n = push::notification(&rules, e, user, room).await;
                    entry.notifications += u64::from(n.notify);
                    entry.highlights += u64::from(n.highlight);
                }
                entry.notifications = entry.notifications.min(UNREAD_CAP as u64);
                entry.highlights = entry.highlights.min(UNREAD_CAP as u64);
            }
        }
        let mut map = self.unread.lock().expect("unread lock");
        if map.len() >= MAX_UNREAD_ENTRIES {
            map.clear();
        }
        map.insert(key, entry);
        Ok(entry)
    }

    /// Presence changed since `since` of the user and the members of their
    /// rooms, and of `met` (members they meet for the first time) whatever
    /// its age.
    async fn presence(&self, user: &UserId, shared_rooms: &[OwnedRoomId], since: u64, met: &HashSet<OwnedUserId>) -> Vec<Value> {
        let mut users = HashSet::new();
        users.insert(user.to_owned());
        for room_id in shared_rooms {
            if let Ok(room) = self.rooms.room(room_id).await {
                let r = room.read();
                // Presence of members in huge rooms is skipped: it would cost a
                // walk of every member on every sync.
                if r.member_count(Membership::Join) <= PRESENCE_ROOM_LIMIT {
                    users.extend(r.members(Membership::Join).filter_map(|u| ruma::OwnedUserId::try_from(u).ok()));
                }
            }
        }
        let changed = self.ephemeral.presence_since(users.iter().map(|u| &**u), since);
        let mut seen: HashSet<OwnedUserId> = changed.iter().map(|(u, _)| u.clone()).collect();
        let mut all = changed;
        let first_met = met.iter().filter(|u| seen.insert((*u).clone()));
        all.extend(self.ephemeral.presence_since(first_met.map(|u| &**u), 0));
        all.into_iter()
            .map(|(u, p)| {
                let mut content = json!({ "presence": p.presence, "last_active_ago": p.last_active.elapsed().as_millis() as u64, "currently_active": p.presence == "online" });
                if let Some(s) = p.status_msg {
                    content["status_msg"] = json!(s);
                }
                json!({ "type": "m.presence", "sender": u, "content": content })
            })
            .collect()
    }
}

/// The rooms whose changes wake a user's sync: every room they have not
/// left or been banned from.
fn watched_rooms(memberships: &[MembershipRecord]) -> Vec<&RoomId> {
    memberships
        .iter()
        .filter(|m| m.membership != Membership::Leave && m.membership != Membership::Ban)
        .map(|m| &*m.room_id)
        .collect()
}

/// What one joined room's section is built from.
#[derive(Clone, Copy)]
struct RoomView<'a> {
    since: SyncToken,
    upto: SyncToken,
    /// Where the user's membership became `join`: nothing before it is unread.
    joined_at: StreamPos,
    /// The room is seen for the first time (an initial sync, or joined since the token).
    initial: bool,
    /// The whole current state goes in `state`.
    full_state: bool,
    limit: usize,
    filter: &'a FilterDefinition,
    ignored: &'a HashSet<OwnedUserId>,
}

/// Rooms with more joined members than this are skipped for presence.
const PRESENCE_ROOM_LIMIT: usize = 1000;

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::user_id;

    #[test]
    fn both_client_forms_agree_and_show_the_transaction_id_to_the_sending_device_only() {
        use kabar_domain::{NewEvent, Pdu, event::EventSigner};
        use kabar_store::TxnRef;
        let signer = EventSigner::new(ruma::owned_server_name!("x"), &EventSigner::generate_key(), "k").unwrap();
        let pdu = Pdu::build(
            &signer,
            &ruma::RoomVersionId::V11,
            Some(ruma::room_id!("!r:x")),
            user_id!("@a:x"),
            NewEvent::message("m.room.message", json!({"body": "hi \"there\"", "msgtype": "m.text"})),
            vec![],
            vec![],
            1,
            ruma::MilliSecondsSinceUnixEpoch::now(),
        )
        .unwrap();
        let stored = StoredEvent {
            pos: 3,
            pdu,
            txn: Some(TxnRef {
                device_id: "PHONE".into(),
                txn_id: "t\"1".into(),
                scope: "send/m.room.message".into(),
            }),
            redacted_by: None,
            prev: None,
        };
        let sender = Session {
            user_id: ruma::owned_user_id!("@a:x"),
            device_id: "PHONE".into(),
        };
        let other_device = Session {
            user_id: ruma::owned_user_id!("@a:x"),
            device_id: "LAPTOP".into(),
        };
        let event = TimelineEvent::new(stored.clone());
        for viewer in [&sender, &other_device] {
            let mut once: Value = serde_json::from_str(client_event_json(&event, viewer, Some(Membership::Join)).get()).unwrap();
            let mut value = client_event(&stored, viewer, Some(Membership::Join));
            // Ages are read from the clock separately.
            once["unsigned"]["age"] = json!(0);
            value["unsigned"]["age"] = json!(0);
            assert_eq!(once, value);
        }
        assert_eq!(client_event(&stored, &sender, None)["unsigned"]["transaction_id"], "t\"1");
        assert!(
            client_event(&stored, &other_device, None)["unsigned"]
                .get("transaction_id")
                .is_none()
        );
        assert_eq!(
            client_event(&stored, &sender, Some(Membership::Join))["unsigned"]["membership"],
            "join"
        );
    }
}
