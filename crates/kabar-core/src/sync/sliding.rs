//! Simplified sliding sync (MSC4186, what Element X and matrix-sdk-ui use):
//! the same engine as `/v3/sync` (the same memberships, room caches, change
//! trackers, to-device queue, key counts and unread counts) answering in
//! the sliding-sync shape: lists of the user's rooms by recent activity, a
//! window of each list, rooms asked for by id, and extensions.
//!
//! A connection (user, device, `conn_id`) remembers, per `pos` it handed
//! out, what it told the client of each room, so the next answer carries
//! only what changed since. The memory is bounded: a few positions per
//! connection, a cap on connections (the least recently used go first).
//! A `pos` this process does not know (another node, a restart, an evicted
//! connection) is answered with `M_UNKNOWN_POS`, and the client starts the
//! connection again.

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kabar_domain::{SyncToken, membership::Membership};
use kabar_store::{MembershipRecord, Session, StreamPos};
use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json, value::RawValue};

use super::{INVITE_STATE_TYPES, MAX_TIMEOUT, SyncEngine, UnusedFallbackKeys, client_event_json, stripped};
use crate::{
    error::{Error, Result},
    filter::TimelineFilter,
    keys::{DeviceListDelta, OneTimeKeyCounts},
    room_cache::BUMP_TYPES,
    rooms::TimelineEvent,
};

/// Lists one request may ask for.
pub const MAX_LISTS: usize = 100;
/// Rooms one request may subscribe to by id.
pub const MAX_SUBSCRIPTIONS: usize = 1000;
/// Ranges one list may have.
pub const MAX_RANGES: usize = 100;
/// Timeline events one room may ask for.
pub const MAX_TIMELINE_LIMIT: u64 = 1000;
/// `required_state` entries one list or subscription may have.
pub const MAX_REQUIRED_STATE: usize = 1000;
/// Connections kept in memory at most (the least recently used go first).
const MAX_CONNECTIONS: usize = 100_000;
/// Positions kept per connection: the newest, and the one before it (a
/// retried request repeats it).
const POSITIONS_KEPT: usize = 2;
/// Memory the kept room lists may take together (about 400 users of 2,000
/// rooms each, or 8,000 of 100); past it the least recently used go.
const ROOM_LIST_BUDGET: usize = 128 << 20;

/// How a room is to be shown: the state it needs and how much timeline.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct RoomConfig {
    /// `(event type, state key)`, with `*` for any, `$ME` for the user and
    /// `$LAZY` (members) for the timeline's senders.
    #[serde(default)]
    pub required_state: Vec<(String, String)>,
    #[serde(default)]
    pub timeline_limit: u64,
}

impl RoomConfig {
    /// Both: the union of the state, the larger timeline.
    fn merge(&mut self, other: &RoomConfig) {
        for entry in &other.required_state {
            if !self.required_state.contains(entry) {
                self.required_state.push(entry.clone());
            }
        }
        self.timeline_limit = self.timeline_limit.max(other.timeline_limit);
    }
}

/// Which of the user's rooms a list holds (all given must hold).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct ListFilters {
    pub is_dm: Option<bool>,
    pub is_encrypted: Option<bool>,
    pub is_invite: Option<bool>,
    /// Room types (`m.space`; `null` for rooms without a type).
    #[serde(default)]
    pub room_types: Vec<Option<String>>,
    #[serde(default)]
    pub not_room_types: Vec<Option<String>>,
    /// Only rooms these spaces (that the user is in) name as children.
    #[serde(default)]
    pub spaces: Vec<OwnedRoomId>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ListRequest {
    /// Inclusive index ranges of the sorted list.
    #[serde(default)]
    pub ranges: Vec<(u64, u64)>,
    #[serde(flatten)]
    pub room: RoomConfig,
    #[serde(default)]
    pub filters: Option<ListFilters>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct Toggle {
    pub enabled: Option<bool>,
}

/// An extension that speaks of rooms: on or off, and for which rooms.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RoomExtension {
    pub enabled: Option<bool>,
    /// The lists whose windows' rooms it covers; `*` or absent for all.
    pub lists: Option<Vec<String>>,
    /// The subscribed rooms it covers; `*` or absent for all.
    pub rooms: Option<Vec<String>>,
}

impl RoomExtension {
    fn on(&self) -> bool {
        self.enabled == Some(true)
    }

    /// The rooms of this answer it covers.
    fn rooms<'a>(&self, windows: &'a BTreeMap<String, Vec<OwnedRoomId>>, subscribed: &'a [OwnedRoomId]) -> Vec<&'a RoomId> {
        let all_lists = self.lists.as_ref().is_none_or(|l| l.iter().any(|n| n == "*"));
        let all_rooms = self.rooms.as_ref().is_none_or(|r| r.iter().any(|r| r.as_str() == "*"));
        let mut covered: BTreeSet<&RoomId> = BTreeSet::new();
        for (name, window) in windows {
            if all_lists || self.lists.as_ref().is_some_and(|l| l.contains(name)) {
                covered.extend(window.iter().map(|r| &**r));
            }
        }
        for room_id in subscribed {
            if all_rooms || self.rooms.as_ref().is_some_and(|r| r.iter().any(|r| r == room_id.as_str())) {
                covered.insert(room_id);
            }
        }
        covered.into_iter().collect()
    }
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ToDeviceRequest {
    pub enabled: Option<bool>,
    pub limit: Option<u64>,
    pub since: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ExtensionsRequest {
    #[serde(default)]
    pub to_device: ToDeviceRequest,
    #[serde(default)]
    pub e2ee: Toggle,
    #[serde(default)]
    pub account_data: RoomExtension,
    #[serde(default)]
    pub receipts: RoomExtension,
    #[serde(default)]
    pub typing: RoomExtension,
}

/// The body of a sliding-sync request.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SlidingBody {
    pub conn_id: Option<String>,
    pub txn_id: Option<String>,
    #[serde(default)]
    pub lists: BTreeMap<String, ListRequest>,
    #[serde(default)]
    pub room_subscriptions: BTreeMap<OwnedRoomId, RoomConfig>,
    #[serde(default)]
    pub extensions: ExtensionsRequest,
}

pub struct SlidingRequest {
    pub pos: Option<String>,
    pub timeout: Duration,
    pub set_presence: Option<String>,
    pub body: SlidingBody,
}

impl SlidingBody {
    /// Refuses what would cost more than a client can need.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidParam(m));
        if self.conn_id.as_ref().is_some_and(|c| c.len() > 64) {
            return bad("conn_id is longer than 64 characters".into());
        }
        if self.lists.len() > MAX_LISTS {
            return bad(format!("at most {MAX_LISTS} lists"));
        }
        if self.room_subscriptions.len() > MAX_SUBSCRIPTIONS {
            return bad(format!("at most {MAX_SUBSCRIPTIONS} room subscriptions"));
        }
        let configs = self.lists.values().map(|l| &l.room).chain(self.room_subscriptions.values());
        for config in configs {
            if config.timeline_limit > MAX_TIMELINE_LIMIT {
                return bad(format!("timeline_limit is at most {MAX_TIMELINE_LIMIT}"));
            }
            if config.required_state.len() > MAX_REQUIRED_STATE {
                return bad(format!("at most {MAX_REQUIRED_STATE} required_state entries"));
            }
        }
        for (name, list) in &self.lists {
            if name.len() > 64 {
                return bad("a list name is longer than 64 characters".into());
            }
            if list.ranges.len() > MAX_RANGES {
                return bad(format!("at most {MAX_RANGES} ranges per list"));
            }
            if list.ranges.iter().any(|(from, to)| from > to) {
                return bad(format!("list {name}: a range ends before it starts"));
            }
        }
        Ok(())
    }
}

/// A sliding-sync response.
#[derive(Debug, Serialize)]
pub struct SlidingResponse {
    pub pos: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub txn_id: Option<String>,
    lists: BTreeMap<String, ListOut>,
    rooms: BTreeMap<OwnedRoomId, RoomOut>,
    extensions: ExtensionsOut,
}

#[derive(Debug, Serialize)]
struct ListOut {
    count: usize,
}

#[derive(Debug, Default, Serialize)]
struct RoomOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    avatar: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    heroes: Option<Vec<Value>>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    initial: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    is_dm: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    invite_state: Option<Vec<Value>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    required_state: Vec<Box<RawValue>>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    timeline: Vec<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    prev_batch: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    limited: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    num_live: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bump_stamp: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    joined_count: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    invited_count: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    notification_count: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    highlight_count: Option<u64>,
}

#[derive(Debug, Default, Serialize)]
struct ExtensionsOut {
    #[serde(skip_serializing_if = "Option::is_none")]
    to_device: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    e2ee: Option<E2eeOut>,
    #[serde(skip_serializing_if = "Option::is_none")]
    account_data: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    receipts: Option<Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    typing: Option<Value>,
}

#[derive(Debug, Serialize)]
struct E2eeOut {
    #[serde(skip_serializing_if = "DeviceListDelta::is_empty")]
    device_lists: DeviceListDelta,
    device_one_time_keys_count: OneTimeKeyCounts,
    device_unused_fallback_key_types: UnusedFallbackKeys,
}

/// What one position of a connection told the client.
#[derive(Debug, Clone, Default)]
struct Told {
    /// The stream and ephemeral positions the answer covered.
    upto: SyncToken,
    /// Per room: up to where, and with which configuration.
    rooms: HashMap<OwnedRoomId, ToldRoom>,
    /// Each list's count.
    counts: BTreeMap<String, usize>,
}

#[derive(Debug, Clone)]
struct ToldRoom {
    upto: StreamPos,
    /// Shared by every room told with the same configuration: a user with
    /// thousands of rooms keeps a handful of configurations, not thousands.
    config: Arc<RoomConfig>,
    membership: Membership,
}

struct Connection {
    /// Tells this connection's positions from an earlier one's with the same id.
    serial: u64,
    positions: VecDeque<(u64, Arc<Told>)>,
    next: u64,
    used: Instant,
}

type ConnectionKey = (OwnedUserId, String, String);

/// Every sliding-sync connection this process answers.
pub struct Connections {
    /// Tells this process's positions from another's (a node, a restart).
    instance: u64,
    serials: std::sync::atomic::AtomicU64,
    by_key: Mutex<HashMap<ConnectionKey, Connection>>,
    room_lists: Mutex<KeptRoomLists>,
}

impl Default for Connections {
    fn default() -> Self {
        Self::with_room_list_budget(ROOM_LIST_BUDGET)
    }
}

impl Connections {
    fn with_room_list_budget(budget: usize) -> Self {
        Self {
            instance: rand::random::<u32>() as u64,
            serials: std::sync::atomic::AtomicU64::new(1),
            by_key: Mutex::new(HashMap::new()),
            room_lists: Mutex::new(KeptRoomLists {
                by_user: HashMap::new(),
                bytes: 0,
                budget,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ConnectionKey, Connection>> {
        self.by_key.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lists(&self) -> std::sync::MutexGuard<'_, KeptRoomLists> {
        self.room_lists.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The user's newest room list, if kept.
    fn room_list(&self, user: &UserId) -> Option<Arc<RoomList>> {
        self.lists().get(user)
    }

    /// Keeps `list` as the user's newest room list (unless a newer one is kept).
    fn keep_room_list(&self, user: &UserId, list: &Arc<RoomList>) {
        self.lists().keep(user, list);
    }

    /// What `pos` told the client on this connection; `None` for no `pos`
    /// (a new connection, which forgets the old one).
    fn resume(&self, key: &ConnectionKey, pos: Option<&str>) -> Result<Option<Arc<Told>>> {
        let Some(pos) = pos else {
            self.lock().remove(key);
            return Ok(None);
        };
        let unknown = || Error::UnknownPos;
        let mut parts = pos.split('_');
        let (Some(instance), Some(serial), Some(n), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(unknown());
        };
        let parse = |s: &str| u64::from_str_radix(s, 16).map_err(|_| unknown());
        let (instance, serial, n) = (parse(instance)?, parse(serial)?, parse(n)?);
        let mut connections = self.lock();
        let connection = connections.get_mut(key).filter(|c| instance == self.instance && c.serial == serial);
        let Some(connection) = connection else {
            return Err(unknown());
        };
        connection.used = Instant::now();
        connection
            .positions
            .iter()
            .find(|(p, _)| *p == n)
            .map(|(_, told)| Some(told.clone()))
            .ok_or_else(unknown)
    }

    /// Records what the answer told and returns its `pos`. Positions older
    /// than `after` are forgotten: the client moved past them.
    fn record(&self, key: ConnectionKey, after: Option<&str>, told: Told) -> String {
        let mut connections = self.lock();
        if connections.len() >= MAX_CONNECTIONS && !connections.contains_key(&key) {
            let oldest = connections.iter().min_by_key(|(_, c)| c.used).map(|(k, _)| k.clone());
            if let Some(oldest) = oldest {
                connections.remove(&oldest);
            }
        }
        let connection = connections.entry(key).or_insert_with(|| Connection {
            serial: self.serials.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            positions: VecDeque::new(),
            next: 1,
            used: Instant::now(),
        });
        if after.is_none() {
            connection.positions.clear();
        }
        let n = connection.next;
        connection.next += 1;
        connection.used = Instant::now();
        connection.positions.push_back((n, Arc::new(told)));
        while connection.positions.len() > POSITIONS_KEPT {
            connection.positions.pop_front();
        }
        format!("{:x}_{:x}_{:x}", self.instance, connection.serial, n)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().len()
    }
}

/// Each user's newest room list, shared by the user's connections (a new
/// connection, another device, a long-poll woken up all start from it),
/// within a memory budget: past it the least recently used go.
struct KeptRoomLists {
    by_user: HashMap<OwnedUserId, KeptRoomList>,
    /// What the kept lists take together.
    bytes: usize,
    budget: usize,
}

struct KeptRoomList {
    list: Arc<RoomList>,
    bytes: usize,
    used: Instant,
}

impl KeptRoomLists {
    fn get(&mut self, user: &UserId) -> Option<Arc<RoomList>> {
        let kept = self.by_user.get_mut(user)?;
        kept.used = Instant::now();
        Some(kept.list.clone())
    }

    fn keep(&mut self, user: &UserId, list: &Arc<RoomList>) {
        if let Some(kept) = self.by_user.get_mut(user)
            && (Arc::ptr_eq(&kept.list, list) || kept.list.upto > list.upto)
        {
            kept.used = Instant::now();
            return;
        }
        let bytes = list.bytes();
        let kept = KeptRoomList {
            list: list.clone(),
            bytes,
            used: Instant::now(),
        };
        let freed = self.by_user.insert(user.to_owned(), kept).map_or(0, |old| old.bytes);
        self.bytes = self.bytes + bytes - freed;
        if self.bytes > self.budget {
            // Down to three quarters at once, so that the next few keeps
            // do not each walk every user.
            let mut by_age: Vec<(Instant, OwnedUserId)> = self.by_user.iter().map(|(u, k)| (k.used, u.clone())).collect();
            by_age.sort_unstable_by_key(|(used, _)| *used);
            for (_, user) in by_age {
                if self.bytes <= self.budget / 4 * 3 {
                    break;
                }
                if let Some(gone) = self.by_user.remove(&user) {
                    self.bytes -= gone.bytes;
                }
            }
        }
    }
}

/// The user's rooms and each list's order at one position, kept with the
/// connection: the next request (the next page, the same window after a
/// message, a long-poll woken up) re-reads only the rooms that changed
/// since and moves them in the orders, instead of reading and sorting every
/// room again. One per user, within [`ROOM_LIST_BUDGET`] (see
/// [`KeptRoomLists`]); a user whose list was let go has their rooms read in
/// full next time.
#[derive(Debug, Default)]
struct RoomList {
    upto: StreamPos,
    /// The generation of the user's account data (`m.direct`, ignored
    /// users) the rooms were read with: a change reads them all again.
    account_data: u64,
    rooms: HashSet<ByRoom>,
    orders: BTreeMap<String, ListOrder>,
}

impl RoomList {
    fn get(&self, room_id: &RoomId) -> Option<&Candidate> {
        self.rooms.get(room_id).map(|r| &*r.0)
    }

    /// About how much memory the list holds.
    fn bytes(&self) -> usize {
        let per_room = std::mem::size_of::<Candidate>() + 2 * std::mem::size_of::<usize>() + std::mem::size_of::<ByRoom>() + 1;
        let ids: usize = self.rooms.iter().map(|r| r.0.room_id.as_str().len()).sum();
        let orders: usize = self.orders.values().map(|o| o.rooms.len()).sum();
        std::mem::size_of::<Self>() + self.rooms.len() * per_room + ids + orders * std::mem::size_of::<Arc<Candidate>>()
    }
}

/// A candidate in a set looked up by its room id, so that the id is not
/// stored twice.
#[derive(Debug, Clone)]
struct ByRoom(Arc<Candidate>);

impl std::borrow::Borrow<RoomId> for ByRoom {
    fn borrow(&self) -> &RoomId {
        &self.0.room_id
    }
}

impl std::hash::Hash for ByRoom {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let id: &RoomId = &self.0.room_id;
        id.hash(state);
    }
}

impl PartialEq for ByRoom {
    fn eq(&self, other: &Self) -> bool {
        self.0.room_id == other.0.room_id
    }
}

impl Eq for ByRoom {}

/// A list's rooms, newest bump first (ties by room id, so the order is
/// the same on every request).
#[derive(Debug, Clone)]
struct ListOrder {
    rule: ListRule,
    rooms: Vec<Arc<Candidate>>,
}

/// Which rooms a list keeps: its filters, and for a `spaces` filter the
/// children those spaces name.
#[derive(Debug, Clone, Default)]
struct ListRule {
    filters: Option<ListFilters>,
    space_children: Option<Arc<HashSet<OwnedRoomId>>>,
}

impl ListRule {
    fn keeps(&self, c: &Candidate) -> bool {
        list_keeps(self.filters.as_ref(), c) && self.space_children.as_ref().is_none_or(|children| children.contains(&c.room_id))
    }

    /// Whether the list's spaces are among `changed` (their children may have).
    fn spaces_changed(&self, changed: &HashSet<OwnedRoomId>) -> bool {
        self.filters.as_ref().is_some_and(|f| f.spaces.iter().any(|s| changed.contains(s)))
    }
}

fn order_key(c: &Candidate) -> (std::cmp::Reverse<StreamPos>, &RoomId) {
    (std::cmp::Reverse(c.bump), &c.room_id)
}

impl ListOrder {
    fn new(rule: ListRule, rooms: &HashSet<ByRoom>) -> Self {
        let mut order: Vec<Arc<Candidate>> = rooms.iter().filter(|r| rule.keeps(&r.0)).map(|r| r.0.clone()).collect();
        order.sort_unstable_by(|a, b| order_key(a).cmp(&order_key(b)));
        ListOrder { rule, rooms: order }
    }

    /// The order with the `changed` rooms taken out and put back where they
    /// now belong (if they still do).
    fn updated(&self, changed: &HashSet<OwnedRoomId>, rooms: &HashSet<ByRoom>) -> Self {
        let mut order = self.rooms.clone();
        order.retain(|c| !changed.contains(&c.room_id));
        for room_id in changed {
            let Some(c) = rooms.get(&**room_id).filter(|c| self.rule.keeps(&c.0)) else {
                continue;
            };
            let at = order.partition_point(|o| order_key(o) < order_key(&c.0));
            order.insert(at, c.0.clone());
        }
        ListOrder {
            rule: self.rule.clone(),
            rooms: order,
        }
    }
}

/// One of the user's rooms as the lists see it.
#[derive(Debug, Clone)]
struct Candidate {
    room_id: OwnedRoomId,
    membership: Membership,
    membership_pos: StreamPos,
    bump: StreamPos,
    is_dm: bool,
    encrypted: bool,
    room_type: Option<String>,
}

impl SyncEngine {
    /// Answers a sliding-sync request: at once for a new connection or when
    /// something changed since `pos`, else when the next change comes or
    /// the timeout ends.
    pub async fn sliding_sync(&self, session: &Session, req: SlidingRequest) -> Result<SlidingResponse> {
        req.body.check()?;
        let key: ConnectionKey = (
            session.user_id.clone(),
            session.device_id.clone(),
            req.body.conn_id.clone().unwrap_or_default(),
        );
        let told = self.connections.resume(&key, req.pos.as_deref())?;
        let mut room_list = self.connections.room_list(&session.user_id);
        self.mark_presence(&session.user_id, req.set_presence.as_deref());
        let deadline = Instant::now() + req.timeout.min(MAX_TIMEOUT);
        loop {
            let (memberships, interest) = self.watch(&session.user_id).await?;
            let (mut response, now_told, now_list, has_news) = {
                let _turn = self.build_turn().await?;
                self.build_sliding(session, &req.body, told.as_deref(), room_list.as_ref(), &memberships)
                    .await?
            };
            self.connections.keep_room_list(&session.user_id, &now_list);
            room_list = Some(now_list);
            let now = Instant::now();
            if told.is_none() || has_news || now >= deadline || !interest.wait(deadline - now).await {
                response.pos = self.connections.record(key, req.pos.as_deref(), now_told);
                response.txn_id = req.body.txn_id.clone();
                return Ok(response);
            }
        }
    }

    async fn build_sliding(
        &self,
        session: &Session,
        body: &SlidingBody,
        told: Option<&Told>,
        previous_list: Option<&Arc<RoomList>>,
        memberships: &[MembershipRecord],
    ) -> Result<(SlidingResponse, Told, Arc<RoomList>, bool)> {
        let user = &*session.user_id;
        let mut upto = SyncToken {
            stream: self.rooms.applied().position(),
            ephemeral: self.ephemeral.serial(),
        };
        let since = told.map(|t| t.upto);
        // Before the reads below: a change that lands during them moves the
        // generation past this one, so the list is read again next time.
        let account_data = self.changes.account_data.generation(&user.to_owned());
        let ignored = self.ignored_users(user).await?;
        let direct = self.direct_rooms(user).await?;

        // The extensions' to-device batch first: like `/v3/sync`, more
        // queued messages than one answer carries stop the whole answer at
        // the last one it carries.
        let mut extensions = ExtensionsOut::default();
        let to_device_ext = &body.extensions.to_device;
        if to_device_ext.enabled == Some(true) {
            let since_td = to_device_ext.since.as_deref().and_then(|s| s.parse::<StreamPos>().ok());
            let batch = self.to_device.for_sync(session, since_td, upto.stream).await?;
            if let Some(stop) = batch.stop_at {
                upto.stream = stop;
            }
            let events = serde_json::to_value(&batch.events).map_err(|e| Error::Internal(e.to_string()))?;
            extensions.to_device = Some(json!({ "next_batch": upto.stream.to_string(), "events": events }));
        }

        let room_list = self
            .room_list(
                user,
                memberships,
                upto.stream,
                account_data,
                (&ignored, &direct),
                &body.lists,
                previous_list,
            )
            .await?;
        let mut lists = BTreeMap::new();
        let mut counts = BTreeMap::new();
        let mut wanted: BTreeMap<OwnedRoomId, RoomConfig> = BTreeMap::new();
        // Each list's window and the subscribed rooms, for the extensions.
        let mut windows: BTreeMap<String, Vec<OwnedRoomId>> = BTreeMap::new();
        let mut subscribed = vec![];
        for (name, list) in &body.lists {
            let members = &room_list.orders.get(name).expect("an order per list").rooms;
            for (from, to) in &list.ranges {
                let from = (*from).min(usize::MAX as u64) as usize;
                let to = (*to).min(usize::MAX as u64 - 1) as usize;
                for c in members.iter().skip(from).take(to.saturating_sub(from).saturating_add(1)) {
                    wanted.entry(c.room_id.clone()).or_default().merge(&list.room);
                    windows.entry(name.clone()).or_default().push(c.room_id.clone());
                }
            }
            counts.insert(name.clone(), members.len());
            lists.insert(name.clone(), ListOut { count: members.len() });
        }
        for (room_id, config) in &body.room_subscriptions {
            if room_list.get(room_id).is_some() {
                subscribed.push(room_id.clone());
                wanted.entry(room_id.clone()).or_default().merge(config);
            }
        }

        let mut now_told = Told {
            upto,
            rooms: told.map(|t| t.rooms.clone()).unwrap_or_default(),
            counts: counts.clone(),
        };
        let mut rooms = BTreeMap::new();
        let mut configs: Vec<Arc<RoomConfig>> = told
            .map(|t| {
                let mut seen: Vec<Arc<RoomConfig>> = vec![];
                for room in t.rooms.values() {
                    if !seen.iter().any(|c| Arc::ptr_eq(c, &room.config)) {
                        seen.push(room.config.clone());
                    }
                }
                seen
            })
            .unwrap_or_default();
        for (room_id, config) in &wanted {
            let Some(candidate) = room_list.get(room_id) else { continue };
            let before = told.and_then(|t| t.rooms.get(room_id));
            let fresh = before.is_none_or(|b| *b.config != *config || b.membership != candidate.membership);
            let out = match candidate.membership {
                Membership::Invite if fresh || since.is_none_or(|s| candidate.membership_pos > s.stream) => {
                    Some(self.invited_room(user, room_id, candidate.bump).await?)
                }
                Membership::Invite => None,
                _ => {
                    let from = if fresh { None } else { before.map(|b| b.upto) };
                    self.sliding_room(session, candidate, config, from, since, upto, &ignored).await?
                }
            };
            if let Some(mut out) = out {
                out.is_dm = candidate.is_dm.then_some(true);
                rooms.insert(room_id.clone(), out);
            }
            let shared = match configs.iter().find(|c| ***c == *config) {
                Some(c) => c.clone(),
                None => {
                    configs.push(Arc::new(config.clone()));
                    configs.last().expect("just pushed").clone()
                }
            };
            now_told.rooms.insert(
                room_id.clone(),
                ToldRoom {
                    upto: upto.stream,
                    config: shared,
                    membership: candidate.membership,
                },
            );
        }
        // Rooms told before that the user left (or was removed from) since:
        // told once more, with the membership event, so the client moves
        // them out of its lists; then forgotten (if the user comes back,
        // they are told afresh).
        if let Some(told) = told {
            for m in memberships {
                let left = matches!(m.membership, Membership::Leave | Membership::Ban) && m.pos <= upto.stream;
                if !left || told.rooms.get(&m.room_id).is_none_or(|t| t.upto >= m.pos) {
                    continue;
                }
                if let Some(event) = self.store.event(&m.event_id).await? {
                    let json = client_event_json(&TimelineEvent::new(event), session, Some(m.membership));
                    rooms.insert(
                        m.room_id.clone(),
                        RoomOut {
                            required_state: vec![json.clone()],
                            timeline: vec![json],
                            bump_stamp: Some(m.pos),
                            ..RoomOut::default()
                        },
                    );
                }
            }
        }
        now_told.rooms.retain(|room_id, _| room_list.get(room_id).is_some());

        if body.extensions.e2ee.enabled == Some(true) {
            let device_lists = match since {
                Some(s) => self.keys.device_list_delta(user, memberships, s.stream, upto.stream).await?,
                None => DeviceListDelta::default(),
            };
            let counts = self.keys.key_counts(session).await?;
            extensions.e2ee = Some(E2eeOut {
                device_lists,
                device_one_time_keys_count: OneTimeKeyCounts(counts.clone()),
                device_unused_fallback_key_types: UnusedFallbackKeys(counts),
            });
        }
        let ext = &body.extensions;
        if ext.account_data.on() {
            let rooms = ext.account_data.rooms(&windows, &subscribed);
            extensions.account_data = self.account_data_ext(user, since, upto, &rooms).await?;
        }
        if ext.receipts.on() {
            let rooms = ext.receipts.rooms(&windows, &subscribed);
            extensions.receipts = self.receipts_ext(user, since, upto, &rooms, told, &ignored).await?;
        }
        if ext.typing.on() {
            let rooms = ext.typing.rooms(&windows, &subscribed);
            extensions.typing = self.typing_ext(since, &rooms, told, &ignored);
        }

        let counts_moved = told.is_none_or(|t| t.counts != counts);
        let e2ee_news = extensions.e2ee.as_ref().is_some_and(|e| !e.device_lists.is_empty());
        let to_device_news = extensions
            .to_device
            .as_ref()
            .is_some_and(|t| t["events"].as_array().is_some_and(|e| !e.is_empty()));
        let has_news = !rooms.is_empty()
            || counts_moved
            || e2ee_news
            || to_device_news
            || extensions.account_data.is_some()
            || extensions.receipts.is_some()
            || extensions.typing.is_some();
        let response = SlidingResponse {
            pos: String::new(),
            txn_id: None,
            lists,
            rooms,
            extensions,
        };
        Ok((response, now_told, room_list, has_news))
    }

    /// The user's rooms and each list's order at `upto`: the `previous`
    /// ones updated with the rooms that changed since (new events, the
    /// user's membership), when there are and the user's account data
    /// (generation `account_data`, read before `ignored` and `direct`) did
    /// not change; else read in full.
    #[allow(clippy::too_many_arguments)]
    async fn room_list(
        &self,
        user: &UserId,
        memberships: &[MembershipRecord],
        upto: StreamPos,
        account_data: u64,
        (ignored, direct): (&HashSet<OwnedUserId>, &HashSet<OwnedRoomId>),
        lists: &BTreeMap<String, ListRequest>,
        previous: Option<&Arc<RoomList>>,
    ) -> Result<Arc<RoomList>> {
        let changed = previous.filter(|p| p.account_data == account_data && p.upto <= upto).and_then(|p| {
            // Past as many changed rooms as the user has, reading them all is no dearer.
            let limit = memberships.len().max(64);
            let rooms = self.changes.room_events.changed_between_at_most(p.upto, upto, limit)?;
            let mut changed: HashSet<OwnedRoomId> = rooms.into_iter().collect();
            // Memberships against the list itself, not against positions:
            // the memberships read may lag the applied position (an invite
            // applied between the two reads), and a room missed that way
            // must come in on the next request.
            let mut still_there = 0;
            for m in memberships {
                let listed = matches!(m.membership, Membership::Join | Membership::Invite) && m.pos <= upto;
                match p.get(&m.room_id) {
                    Some(c) => {
                        still_there += 1;
                        if !listed || c.membership_pos != m.pos {
                            changed.insert(m.room_id.clone());
                        }
                    }
                    None if listed => {
                        changed.insert(m.room_id.clone());
                    }
                    None => {}
                }
            }
            // A room of the list with no membership at all any more.
            if still_there != p.rooms.len() {
                return None;
            }
            Some((p, changed))
        });
        let Some((previous, changed)) = changed else {
            let rooms: HashSet<ByRoom> = self
                .candidates(user, memberships, upto, ignored, direct)
                .await?
                .into_iter()
                .map(|c| ByRoom(Arc::new(c)))
                .collect();
            let mut orders = BTreeMap::new();
            for (name, list) in lists {
                let rule = self.list_rule(list, &rooms).await?;
                orders.insert(name.clone(), ListOrder::new(rule, &rooms));
            }
            return Ok(Arc::new(RoomList {
                upto,
                account_data,
                rooms,
                orders,
            }));
        };
        let same_lists = lists.len() == previous.orders.len()
            && lists
                .iter()
                .all(|(name, list)| previous.orders.get(name).is_some_and(|o| o.rule.filters == list.filters));
        if changed.is_empty() && same_lists {
            return Ok(previous.clone());
        }
        let mut rooms = previous.rooms.clone();
        for room_id in &changed {
            rooms.remove(&**room_id);
        }
        let again: Vec<MembershipRecord> = memberships.iter().filter(|m| changed.contains(&m.room_id)).cloned().collect();
        for c in self.candidates(user, &again, upto, ignored, direct).await? {
            rooms.insert(ByRoom(Arc::new(c)));
        }
        let mut orders = BTreeMap::new();
        for (name, list) in lists {
            let order = match previous.orders.get(name) {
                Some(order) if order.rule.filters == list.filters && !order.rule.spaces_changed(&changed) => {
                    order.updated(&changed, &rooms)
                }
                _ => ListOrder::new(self.list_rule(list, &rooms).await?, &rooms),
            };
            orders.insert(name.clone(), order);
        }
        Ok(Arc::new(RoomList {
            upto,
            account_data,
            rooms,
            orders,
        }))
    }

    /// A list's rule; for a `spaces` filter, with the rooms that the spaces
    /// the user is in name as children (`m.space.child` with a `via`).
    async fn list_rule(&self, list: &ListRequest, rooms: &HashSet<ByRoom>) -> Result<ListRule> {
        let spaces = list.filters.as_ref().map(|f| f.spaces.as_slice()).unwrap_or_default();
        let mut rule = ListRule {
            filters: list.filters.clone(),
            space_children: None,
        };
        if spaces.is_empty() {
            return Ok(rule);
        }
        let mut children = HashSet::new();
        for space in spaces {
            if !rooms.get(&**space).is_some_and(|c| c.0.membership == Membership::Join) {
                continue;
            }
            let room = self.rooms.room(space).await?;
            let r = room.read();
            for entry in r.state_entries().filter(|e| e.pdu.kind.to_string() == "m.space.child") {
                let names_a_way = entry
                    .pdu
                    .content_value()
                    .get("via")
                    .and_then(Value::as_array)
                    .is_some_and(|v| !v.is_empty());
                if let Some(child) = entry.pdu.state_key.as_deref().and_then(|k| OwnedRoomId::try_from(k).ok())
                    && names_a_way
                {
                    children.insert(child);
                }
            }
        }
        rule.space_children = Some(Arc::new(children));
        Ok(rule)
    }

    /// The user's rooms a list may hold: joined, and invited (not by
    /// someone they ignore), with what the filters and the order need.
    /// Rooms in memory answer from their caches; the others from one store
    /// read of a compact summary each (ordering a list must not load the
    /// whole state of every room a user is in), except invites, whose
    /// inviter is looked at.
    async fn candidates(
        &self,
        user: &UserId,
        memberships: &[MembershipRecord],
        upto: StreamPos,
        ignored: &HashSet<OwnedUserId>,
        direct: &HashSet<OwnedRoomId>,
    ) -> Result<Vec<Candidate>> {
        let mut out = Vec::with_capacity(memberships.len());
        let mut cold: HashMap<OwnedRoomId, &MembershipRecord> = HashMap::new();
        for m in memberships {
            if m.pos > upto || !matches!(m.membership, Membership::Join | Membership::Invite) {
                continue;
            }
            let room = match self.rooms.loaded_room(&m.room_id) {
                Some(room) => room,
                None if m.membership == Membership::Join => {
                    cold.insert(m.room_id.clone(), m);
                    continue;
                }
                None => self.rooms.room(&m.room_id).await?,
            };
            let r = room.read();
            if m.membership == Membership::Invite
                && r.state("m.room.member", user.as_str())
                    .is_some_and(|me| ignored.contains(&me.pdu.sender))
            {
                continue;
            }
            // An invite is placed where it came; a joined room by its newest
            // bumping event (or its newest event, if none bumps).
            let bump = match m.membership {
                Membership::Invite => m.pos,
                _ if r.last_bump > 0 => r.last_bump,
                _ => r.last_pos,
            };
            let room_type = r
                .state("m.room.create", "")
                .and_then(|e| e.pdu.content_value().get("type").and_then(Value::as_str).map(str::to_owned));
            out.push(Candidate {
                room_id: m.room_id.clone(),
                membership: m.membership,
                membership_pos: m.pos,
                bump: bump.max(m.pos).min(upto.max(m.pos)),
                is_dm: direct.contains(&m.room_id),
                encrypted: r.encrypted_at().is_some(),
                room_type,
            });
        }
        if !cold.is_empty() {
            let ids: Vec<OwnedRoomId> = cold.keys().cloned().collect();
            // Their caches load in the background, so the user's next
            // answers order the list from memory; this one does not wait.
            let (rooms, loading) = (self.rooms.clone(), ids.clone());
            tokio::spawn(async move {
                for room_id in loading {
                    if rooms.loaded_room(&room_id).is_none() {
                        let _ = rooms.room(&room_id).await;
                    }
                }
            });
            for entry in self.store.room_list_entries(&ids, BUMP_TYPES).await? {
                let Some(m) = cold.get(&entry.room_id) else { continue };
                out.push(Candidate {
                    is_dm: direct.contains(&entry.room_id),
                    room_id: entry.room_id,
                    membership: m.membership,
                    membership_pos: m.pos,
                    bump: entry.bump.max(m.pos).min(upto.max(m.pos)),
                    encrypted: entry.encrypted,
                    room_type: entry.room_type,
                });
            }
        }
        Ok(out)
    }

    /// Rooms the user's `m.direct` account data names, from memory unless
    /// their account data changed.
    async fn direct_rooms(&self, user: &UserId) -> Result<Arc<HashSet<OwnedRoomId>>> {
        let read = async {
            let json = self.store.account_data(user, None, "m.direct").await?;
            let value: Value = json.and_then(|j| serde_json::from_str(&j).ok()).unwrap_or_default();
            let rooms = value
                .as_object()
                .into_iter()
                .flat_map(|o| o.values())
                .filter_map(Value::as_array)
                .flatten()
                .filter_map(|r| r.as_str().and_then(|r| OwnedRoomId::try_from(r).ok()))
                .collect();
            Ok::<_, kabar_store::StoreError>(Arc::new(rooms))
        };
        Ok(self.direct.get_or_read(&self.changes.account_data, &user.to_owned(), read).await?)
    }

    async fn invited_room(&self, user: &UserId, room_id: &RoomId, bump: StreamPos) -> Result<RoomOut> {
        let room = self.rooms.room(room_id).await?;
        {
            let r = room.read();
            let mut events: Vec<Value> = INVITE_STATE_TYPES
                .iter()
                .filter_map(|t| r.state(t, ""))
                .map(|e| stripped(&e.pdu))
                .collect();
            if let Some(me) = r.state("m.room.member", user.as_str()) {
                if let Some(inviter) = r.state("m.room.member", me.pdu.sender.as_str()) {
                    events.push(stripped(&inviter.pdu));
                }
                events.push(stripped(&me.pdu));
            }
            Ok(RoomOut {
                initial: true,
                bump_stamp: Some(bump),
                name: room_name(&r),
                avatar: room_avatar(&r),
                invite_state: Some(events),
                ..RoomOut::default()
            })
        }
    }

    /// A joined room's part of the answer: everything when `from` is
    /// `None` (told for the first time, or asked with another
    /// configuration), else what changed after `from`; `None` when nothing did.
    #[allow(clippy::too_many_arguments)]
    async fn sliding_room(
        &self,
        session: &Session,
        candidate: &Candidate,
        config: &RoomConfig,
        from: Option<StreamPos>,
        since: Option<SyncToken>,
        upto: SyncToken,
        ignored: &HashSet<OwnedUserId>,
    ) -> Result<Option<RoomOut>> {
        let room_id = &candidate.room_id;
        let room = self.rooms.room(room_id).await?;
        let (last_pos, own_receipts_only) = (room.read().last_pos, room.read().receipts_private());
        let receipts_moved = from.is_some_and(|f| self.receipts_moved(&session.user_id, room_id, own_receipts_only, f));
        if let Some(f) = from
            && last_pos <= f
            && !receipts_moved
        {
            return Ok(None);
        }
        let (membership_pos, bump) = (candidate.membership_pos, candidate.bump);
        {
            let user = &*session.user_id;
            let limit = config.timeline_limit as usize;
            let empty_filter = ruma::api::client::filter::RoomEventFilter::default();
            let hidden = room.read().member_visibility(user);
            let timeline_filter = TimelineFilter {
                filter: &empty_filter,
                ignored,
                hidden: hidden.as_ref(),
            };
            let (events, limited) = if limit > 0 {
                let (events, limited, _) = self
                    .timeline(user, room_id, &room, from, upto.stream, limit, timeline_filter)
                    .await?;
                (events, limited)
            } else {
                (vec![], false)
            };
            let num_live = since.map(|s| events.iter().filter(|(e, _)| e.event.pos > s.stream).count());
            let prev_batch = events.first().map(|(e, _)| format!("t{}", e.event.pos - 1));
            let senders: BTreeSet<&str> = events.iter().map(|(e, _)| e.event.pdu.sender.as_str()).collect();
            let timeline = self.timeline_json(session, room_id, &room, upto.stream, &events).await?;

            let mut required_state = vec![];
            let (name, avatar, heroes, joined, invited) = {
                let r = room.read();
                let wants = StateWants::new(&config.required_state, user, &senders);
                // The state at the end of the timeline, whether or not the
                // timeline shows the event too (clients read room names and
                // the like from here, not from the timeline).
                // Each state event once, however many wants name it (`$LAZY`
                // and `$ME` both name the user; a wildcard may name either).
                let mut added = HashSet::new();
                // A latest sender's member event comes with its client form
                // made already, once for everyone it is sent to.
                let mut add = |event: &TimelineEvent| {
                    let (pos, pdu) = (event.event.pos, &event.event.pdu);
                    if pos <= upto.stream && hidden.as_ref().is_none_or(|h| h.shows(pdu)) && added.insert(pos) {
                        required_state.push(client_event_json(event, session, None));
                    }
                };
                // The timeline's senders' member events come with every
                // timeline (a client may not have seen them); the rest of
                // the state only when the room is told afresh or changed.
                let asked: Vec<(&str, &str)> = match from {
                    None => wants.exact().chain(wants.lazy_members()).collect(),
                    Some(_) => wants.lazy_members().collect(),
                };
                for (kind, key) in asked {
                    if kind == "m.room.member" {
                        if let Some(member) = r.member_event(key) {
                            add(&member);
                        }
                    } else if let Some(entry) = r.state(kind, key) {
                        add(&TimelineEvent::from_state(entry));
                    }
                }
                match from {
                    None if wants.any_wildcard() => {
                        for entry in r.state_entries().filter(|e| wants.wildcard_keeps(e)) {
                            add(&TimelineEvent::from_state(entry));
                        }
                    }
                    None => {}
                    Some(f) => {
                        for entry in r.state_changed_between(f, upto.stream) {
                            if wants.keeps(&entry) {
                                add(&TimelineEvent::from_state(entry));
                            }
                        }
                    }
                }
                let name = room_name(&r);
                // Heroes name a room without a name: told afresh, or when
                // its members changed.
                let members_moved = from.is_none_or(|f| !r.member_changes(f, upto.stream).is_empty());
                let heroes = (name.is_none() && members_moved).then(|| {
                    r.heroes(user)
                        .into_iter()
                        .filter(|u| hidden.as_ref().is_none_or(|h| h.shows_member(u.as_str())))
                        .map(|u| {
                            let content: Value = r
                                .member(u.as_str())
                                .and_then(|slot| serde_json::from_str(slot.content().get()).ok())
                                .unwrap_or_default();
                            let mut hero = json!({ "user_id": u });
                            for (field, out) in [("displayname", "displayname"), ("avatar_url", "avatar_url")] {
                                if let Some(v) = content.get(field).filter(|v| v.is_string()) {
                                    hero[out] = v.clone();
                                }
                            }
                            hero
                        })
                        .collect::<Vec<_>>()
                });
                (
                    name,
                    room_avatar(&r),
                    heroes,
                    r.member_count(Membership::Join),
                    r.member_count(Membership::Invite),
                )
            };
            let unread = self
                .unread_counts(
                    user,
                    room_id,
                    &room,
                    (membership_pos, upto.stream),
                    receipts_moved || from.is_none(),
                    ignored,
                )
                .await?;
            Ok(Some(RoomOut {
                name,
                avatar,
                heroes,
                initial: from.is_none(),
                is_dm: None,
                invite_state: None,
                required_state,
                timeline,
                prev_batch,
                limited,
                num_live,
                bump_stamp: Some(bump),
                joined_count: Some(joined),
                invited_count: Some(invited),
                notification_count: Some(unread.notifications),
                highlight_count: Some(unread.highlights),
            }))
        }
    }

    async fn account_data_ext(&self, user: &UserId, since: Option<SyncToken>, upto: SyncToken, rooms: &[&RoomId]) -> Result<Option<Value>> {
        let from = since.map_or(0, |s| s.stream);
        if since.is_some() && !self.changes.account_data.changed_since(&user.to_owned(), from) {
            return Ok(None);
        }
        let records = self.store.account_data_since(user, from).await?;
        let mut global = vec![];
        let mut by_room: Map<String, Value> = Map::new();
        for a in records.iter().filter(|a| a.pos <= upto.stream) {
            let ev = json!({ "type": a.kind, "content": serde_json::from_str::<Value>(&a.content).unwrap_or_default() });
            match &a.room_id {
                Some(r) if rooms.contains(&&**r) => by_room
                    .entry(r.to_string())
                    .or_insert_with(|| json!([]))
                    .as_array_mut()
                    .expect("an array")
                    .push(ev),
                Some(_) => {}
                None => global.push(ev),
            }
        }
        if global.is_empty() && by_room.is_empty() {
            return Ok(None);
        }
        Ok(Some(json!({ "global": global, "rooms": by_room })))
    }

    async fn receipts_ext(
        &self,
        user: &UserId,
        since: Option<SyncToken>,
        upto: SyncToken,
        rooms: &[&RoomId],
        told: Option<&Told>,
        ignored: &HashSet<OwnedUserId>,
    ) -> Result<Option<Value>> {
        let mut out = Map::new();
        for room_id in rooms {
            // A room told before gets what changed since; a new one all of it.
            let from = told
                .and_then(|t| t.rooms.get(*room_id))
                .map(|_| since.map_or(0, |s| s.stream))
                .unwrap_or(0);
            if from > 0 && !self.changes.receipts.changed_since(&(*room_id).to_owned(), from) {
                // No receipt in the room at all: no need to look at the room.
                continue;
            }
            let own_only = self.rooms.room(room_id).await?.read().receipts_private();
            let receipts = self.receipts_told(user, room_id, own_only, from).await?;
            let content = Self::receipt_content(&receipts, user, upto.stream, ignored);
            if !content.is_empty() {
                out.insert(room_id.to_string(), json!({ "type": "m.receipt", "content": content }));
            }
        }
        Ok((!out.is_empty()).then(|| json!({ "rooms": out })))
    }

    fn typing_ext(
        &self,
        since: Option<SyncToken>,
        rooms: &[&RoomId],
        told: Option<&Told>,
        ignored: &HashSet<OwnedUserId>,
    ) -> Option<Value> {
        let mut out = Map::new();
        for room_id in rooms {
            let known = told.is_some_and(|t| t.rooms.contains_key(*room_id));
            let from = if known { since.map_or(0, |s| s.ephemeral) } else { 0 };
            if let Some(typing) = self.ephemeral.typing_since(room_id, from) {
                if !known && typing.is_empty() {
                    continue;
                }
                let typing: Vec<OwnedUserId> = typing.into_iter().filter(|u| !ignored.contains(u)).collect();
                out.insert(
                    room_id.to_string(),
                    json!({ "type": "m.typing", "content": { "user_ids": typing } }),
                );
            }
        }
        (!out.is_empty()).then(|| json!({ "rooms": out }))
    }
}

/// Whether `list`'s filters keep room `c`.
fn list_keeps(filters: Option<&ListFilters>, c: &Candidate) -> bool {
    let Some(f) = filters else { return true };
    let wanted_type = |types: &[Option<String>]| types.contains(&c.room_type);
    f.is_dm.is_none_or(|dm| dm == c.is_dm)
        && f.is_encrypted.is_none_or(|e| e == c.encrypted)
        && f.is_invite.is_none_or(|i| i == (c.membership == Membership::Invite))
        && (f.room_types.is_empty() || wanted_type(&f.room_types))
        && !wanted_type(&f.not_room_types)
}

fn room_name(r: &crate::room_cache::RoomCache) -> Option<String> {
    r.state("m.room.name", "")
        .and_then(|e| e.pdu.content_value().get("name").and_then(Value::as_str).map(str::to_owned))
        .filter(|n| !n.is_empty())
}

fn room_avatar(r: &crate::room_cache::RoomCache) -> Option<String> {
    r.state("m.room.avatar", "")
        .and_then(|e| e.pdu.content_value().get("url").and_then(Value::as_str).map(str::to_owned))
        .filter(|n| !n.is_empty())
}

/// A room configuration's `required_state`, resolved for one user and one
/// timeline.
struct StateWants<'a> {
    exact: Vec<(&'a str, &'a str)>,
    /// The members `$LAZY` asks for: the timeline's senders and the user.
    lazy: Vec<&'a str>,
    /// `(type, *)`: every state key of the type.
    any_key: Vec<&'a str>,
    /// `(*, key)`: the key in every type; `(*, *)` puts `*` here.
    any_type: Vec<&'a str>,
    lazy_members: bool,
}

impl<'a> StateWants<'a> {
    fn new(entries: &'a [(String, String)], user: &'a UserId, senders: &BTreeSet<&'a str>) -> Self {
        let mut wants = StateWants {
            exact: vec![],
            lazy: vec![],
            any_key: vec![],
            any_type: vec![],
            lazy_members: false,
        };
        for (kind, key) in entries {
            let key = match key.as_str() {
                "$ME" => user.as_str(),
                other => other,
            };
            match (kind.as_str(), key) {
                ("m.room.member", "$LAZY") => {
                    wants.lazy_members = true;
                    wants.lazy.extend(senders.iter().copied());
                    wants.lazy.push(user.as_str());
                }
                ("*", key) => wants.any_type.push(key),
                (kind, "*") => wants.any_key.push(kind),
                (kind, key) => wants.exact.push((kind, key)),
            }
        }
        wants
    }

    fn exact(&self) -> impl Iterator<Item = (&'a str, &'a str)> + '_ {
        self.exact.iter().copied()
    }

    fn lazy_members(&self) -> impl Iterator<Item = (&'a str, &'a str)> + '_ {
        self.lazy.iter().map(|u| ("m.room.member", *u))
    }

    fn any_wildcard(&self) -> bool {
        !self.any_key.is_empty() || !self.any_type.is_empty()
    }

    fn wildcard_keeps(&self, e: &crate::rooms::StateEntry) -> bool {
        let kind = e.pdu.kind.to_string();
        let key = e.pdu.state_key.as_deref().unwrap_or_default();
        // Every member of a huge room only when asked for by name: `*` with
        // lazy members leaves members to `$LAZY`.
        if self.lazy_members && kind == "m.room.member" {
            return false;
        }
        self.any_key.contains(&kind.as_str()) || self.any_type.iter().any(|k| *k == "*" || *k == key)
    }

    fn keeps(&self, e: &crate::rooms::StateEntry) -> bool {
        let kind = e.pdu.kind.to_string();
        let key = e.pdu.state_key.as_deref().unwrap_or_default();
        self.exact.iter().any(|(k, s)| *k == kind && *s == key) || self.wildcard_keeps(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_resume_only_on_their_own_connection_and_old_ones_are_forgotten() {
        let connections = Connections::default();
        let key: ConnectionKey = (ruma::owned_user_id!("@a:x"), "D".into(), "room-list".into());
        assert!(connections.resume(&key, None).unwrap().is_none(), "no pos: a new connection");
        let first = connections.record(key.clone(), None, Told::default());
        assert!(connections.resume(&key, Some(&first)).unwrap().is_some());
        let second = connections.record(key.clone(), Some(&first), Told::default());
        let third = connections.record(key.clone(), Some(&second), Told::default());
        assert!(connections.resume(&key, Some(&third)).is_ok());
        assert!(
            connections.resume(&key, Some(&second)).is_ok(),
            "a retried request repeats the one before"
        );
        assert!(matches!(connections.resume(&key, Some(&first)), Err(Error::UnknownPos)));
        let other: ConnectionKey = (ruma::owned_user_id!("@a:x"), "D".into(), "encryption".into());
        assert!(
            matches!(connections.resume(&other, Some(&third)), Err(Error::UnknownPos)),
            "another connection's pos"
        );
        for junk in ["", "x", "1_2", "zz_1_1", "1_1_1_1"] {
            assert!(matches!(connections.resume(&key, Some(junk)), Err(Error::UnknownPos)), "{junk}");
        }
        assert!(connections.resume(&key, None).unwrap().is_none());
        assert!(
            matches!(connections.resume(&key, Some(&third)), Err(Error::UnknownPos)),
            "a new connection forgets the old"
        );
        assert_eq!(connections.len(), 0);
    }

    #[test]
    fn kept_room_lists_stay_within_their_budget_and_the_least_recently_used_go_first() {
        let list = |upto: StreamPos| {
            let rooms: HashSet<ByRoom> = (0..1000).map(|n| ByRoom(Arc::new(candidate(n, n as u64, false)))).collect();
            let orders = BTreeMap::from([("all".to_owned(), ListOrder::new(ListRule::default(), &rooms))]);
            Arc::new(RoomList {
                upto,
                rooms,
                orders,
                ..RoomList::default()
            })
        };
        let one = list(1).bytes();
        let connections = Connections::with_room_list_budget(one * 3);
        let user = |n: u32| OwnedUserId::try_from(format!("@u{n}:x")).unwrap();
        for n in 0..3 {
            connections.keep_room_list(&user(n), &list(10));
        }
        assert_eq!(connections.lists().bytes, one * 3, "three fit");
        // The first user's list is used again: the second's is now the least recent.
        let first = connections.room_list(&user(0)).expect("kept");
        connections.keep_room_list(&user(0), &first);
        assert_eq!(connections.lists().bytes, one * 3, "the same list again costs nothing more");
        connections.keep_room_list(&user(0), &list(5));
        assert_eq!(
            connections.room_list(&user(0)).unwrap().upto,
            10,
            "an older list does not replace a newer"
        );
        connections.keep_room_list(&user(3), &list(10));
        assert!(connections.lists().bytes <= one * 3 / 4 * 3, "{}", connections.lists().bytes);
        assert!(connections.room_list(&user(1)).is_none(), "the least recently used go first");
        assert!(connections.room_list(&user(3)).is_some(), "the newest stays");
        connections.keep_room_list(&user(3), &list(11));
        assert!(connections.lists().bytes <= one * 3, "a newer list replaces the user's own");
    }

    fn candidate(n: u32, bump: StreamPos, is_dm: bool) -> Candidate {
        Candidate {
            room_id: OwnedRoomId::try_from(format!("!r{n}:x")).unwrap(),
            membership: Membership::Join,
            membership_pos: 1,
            bump,
            is_dm,
            encrypted: false,
            room_type: None,
        }
    }

    #[test]
    fn a_list_order_updated_with_the_changed_rooms_is_the_order_read_afresh() {
        // A small deterministic generator: the same cases on every run.
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = move |below: u64| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed % below
        };
        let dms = ListFilters {
            is_dm: Some(true),
            ..ListFilters::default()
        };
        let mut rooms: HashSet<ByRoom> = (0..200).map(|n| ByRoom(Arc::new(candidate(n, next(50), next(3) == 0)))).collect();
        let dms = ListRule {
            filters: Some(dms),
            space_children: None,
        };
        let mut orders = [ListOrder::new(ListRule::default(), &rooms), ListOrder::new(dms.clone(), &rooms)];
        for round in 0..50u64 {
            let mut changed = HashSet::new();
            for _ in 0..next(8) {
                let n = next(220) as u32;
                let room_id = OwnedRoomId::try_from(format!("!r{n}:x")).unwrap();
                match next(4) {
                    // Left: out of every list.
                    0 => {
                        rooms.remove(&*room_id);
                    }
                    // A new message, a join, a room marked direct or not.
                    _ => {
                        rooms.replace(ByRoom(Arc::new(candidate(n, 50 + round * 10 + next(10), next(3) == 0))));
                    }
                }
                changed.insert(room_id);
            }
            orders = [orders[0].updated(&changed, &rooms), orders[1].updated(&changed, &rooms)];
            let ids = |o: &ListOrder| o.rooms.iter().map(|c| (c.bump, c.room_id.clone())).collect::<Vec<_>>();
            assert_eq!(ids(&orders[0]), ids(&ListOrder::new(ListRule::default(), &rooms)), "round {round}");
            assert_eq!(ids(&orders[1]), ids(&ListOrder::new(dms.clone(), &rooms)), "round {round}");
        }
        let newest = &orders[0].rooms[0];
        assert!(orders[0].rooms.iter().all(|c| c.bump <= newest.bump), "newest bump first");
    }

    #[test]
    fn a_room_extension_covers_the_lists_and_subscriptions_it_names() {
        let id = |n: u32| OwnedRoomId::try_from(format!("!r{n}:x")).unwrap();
        let windows = BTreeMap::from([("all".to_owned(), vec![id(1), id(2)]), ("dms".to_owned(), vec![id(2), id(3)])]);
        let subscribed = vec![id(4), id(5)];
        let covered = |ext: Value| {
            let ext: RoomExtension = serde_json::from_value(ext).unwrap();
            ext.rooms(&windows, &subscribed)
                .iter()
                .map(|r| r.as_str().to_owned())
                .collect::<Vec<_>>()
        };
        let names = |ns: &[u32]| ns.iter().map(|n| id(*n).to_string()).collect::<Vec<_>>();
        assert_eq!(covered(json!({"enabled": true})), names(&[1, 2, 3, 4, 5]), "everything by default");
        assert_eq!(covered(json!({"lists": ["*"], "rooms": ["*"]})), names(&[1, 2, 3, 4, 5]));
        assert_eq!(covered(json!({"lists": ["dms"], "rooms": []})), names(&[2, 3]));
        assert_eq!(
            covered(json!({"lists": [], "rooms": ["!r5:x", "!r9:x"]})),
            names(&[5]),
            "only subscribed rooms"
        );
        assert_eq!(covered(json!({"lists": ["nope"], "rooms": []})), Vec::<String>::new());
    }

    #[test]
    fn requests_that_would_cost_too_much_are_refused() {
        let ok: SlidingBody = serde_json::from_value(json!({
            "lists": {"all": {"ranges": [[0, 19]], "timeline_limit": 1, "required_state": [["m.room.name", ""]]}},
            "unknown_field": true
        }))
        .unwrap();
        assert!(ok.check().is_ok());
        for bad in [
            json!({"lists": {"a": {"ranges": [[5, 1]]}}}),
            json!({"lists": {"a": {"ranges": [[0, 1]], "timeline_limit": 100000}}}),
            json!({"conn_id": "x".repeat(100)}),
        ] {
            let body: SlidingBody = serde_json::from_value(bad.clone()).unwrap();
            assert!(matches!(body.check(), Err(Error::InvalidParam(_))), "{bad}");
        }
        assert!(serde_json::from_value::<SlidingBody>(json!({"lists": {"a": {"ranges": [[-1, 1]]}}})).is_err());
    }
}
