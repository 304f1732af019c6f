//! Rooms: creation, membership, sending events, reading history.
//!
//! Each room's current state is kept in memory (loaded from the store on first
//! use). A send takes the room's write turn, builds the event on top of the
//! room's head, checks the authorization rules against the cached state,
//! appends it to the store, and only then updates the cache and wakes waiters.
//! The write turn makes each room's history a simple chain; different rooms
//! proceed in parallel and share the store's group commits.
//!
//! Readers (a sync, a membership check) never wait for a writer's store
//! write: they take a short read lock on the committed state. A reader that
//! must see every committed event (a sync building a timeline up to a stream
//! position) first waits for the appends already started to be applied.

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{
        Arc, Mutex, RwLock, RwLockReadGuard,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use kabar_domain::{
    NewEvent, Pdu, StateKey, auth_event_keys, authorize,
    client_event::{client_event_prefix, redact_pdu},
    event::{EventSigner, raw},
    membership::{EventVisibility, HistoryVisibility, Membership, may_see_event},
};
use kabar_store::{AppendOutcome, Direction, EventRange, EventWrite, PrevState, RoomRecord, Store, StoredEvent, StreamPos, TxnRef};
use rand::{Rng, distributions::Alphanumeric};
use ruma::{
    EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UserId,
    events::{
        TimelineEventType,
        room::power_levels::{RoomPowerLevels, RoomPowerLevelsEventContent, RoomPowerLevelsSource},
    },
    room_version_rules::RoomVersionRules,
};
use serde_json::{Value, json};
use tokio::sync::{Mutex as AsyncMutex, MutexGuard as AsyncMutexGuard, watch};

use crate::{
    changes::Changes,
    error::{Error, Result},
    filter::TimelineFilter,
    load::Gate,
    notifier::Notifier,
};

/// Room versions this server creates and serves.
pub const SUPPORTED_ROOM_VERSIONS: [RoomVersionId; 3] = [RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12];

/// How many of a room's newest events stay in memory. A sync that is at most
/// this far behind reads its timeline (and counts unread messages) without the
/// store; one that is further behind goes to the store.
const RECENT_EVENTS: usize = 64;

/// An event with its client form serialized once (see
/// [`client_event_prefix`]), so that a sync waking thousands of members
/// serializes each new event once, not once per member.
#[derive(Debug)]
pub struct TimelineEvent {
    pub event: StoredEvent,
    pub client_prefix: String,
    /// The client form flattened for push rules, made when first asked
    /// for and shared by every member who evaluates the event.
    flat: std::sync::OnceLock<ruma::push::FlattenedJson>,
}

impl TimelineEvent {
    pub fn new(event: StoredEvent) -> Self {
        let client_prefix = client_event_prefix(&event.pdu);
        Self {
            event,
            client_prefix,
            flat: std::sync::OnceLock::new(),
        }
    }

    /// The event flattened for push conditions.
    pub fn flattened(&self) -> &ruma::push::FlattenedJson {
        self.flat.get_or_init(|| crate::push::flatten(&format!("{}}}", self.client_prefix)))
    }
}

/// One piece of current state with the stream position it was set at.
#[derive(Debug, Clone)]
pub struct StateEntry {
    pub pdu: Pdu,
    pub pos: StreamPos,
}

impl StateEntry {
    /// The entry as a stored event, for the client-event serializer.
    pub fn to_stored(&self) -> StoredEvent {
        StoredEvent {
            pos: self.pos,
            pdu: self.pdu.clone(),
            txn: None,
            redacted_by: None,
            prev: None,
        }
    }

    /// What a state event replacing this one shows as its previous state.
    fn as_prev(&self) -> PrevState {
        PrevState {
            event_id: self.pdu.event_id.clone(),
            sender: self.pdu.sender.clone(),
            content: self.pdu.content.get().to_owned(),
        }
    }
}

/// A room's cached current state and head.
pub struct RoomCache {
    pub record: RoomRecord,
    rules: RoomVersionRules,
    state: BTreeMap<StateKey, StateEntry>,
    head: Vec<OwnedEventId>,
    depth: u64,
    /// Stream position of the room's newest event.
    pub last_pos: StreamPos,
    /// How many users hold each membership, kept up to date by `apply` so that
    /// big rooms are not walked on every sync.
    member_counts: HashMap<Membership, usize>,
    /// The room's newest events, oldest first.
    recent: VecDeque<Arc<TimelineEvent>>,
    /// Every event of the room after this position is in `recent`.
    recent_after: StreamPos,
    /// Where `m.room.encryption` was last set: every sync asks, so it is kept
    /// apart from the state map.
    encrypted_at: Option<StreamPos>,
    /// Where the state last changed: the current state is the state at any
    /// position from here on.
    state_changed_at: StreamPos,
    /// Every change of `m.room.history_visibility`, oldest first (a handful
    /// per room), so deciding what a user may see needs no store read for it.
    visibility_changes: Vec<(StreamPos, HistoryVisibility)>,
    /// The power levels as push rules read them, parsed when first asked
    /// for after each change: every member's unread count needs them.
    push_power_levels: std::sync::OnceLock<Arc<ruma::push::PushConditionPowerLevelsCtx>>,
}

impl RoomCache {
    /// A room with no events yet: the start of `create_room`'s chain.
    fn empty(record: RoomRecord, rules: RoomVersionRules) -> Self {
        Self {
            record,
            rules,
            state: BTreeMap::new(),
            head: vec![],
            depth: 0,
            last_pos: 0,
            member_counts: HashMap::new(),
            recent: VecDeque::new(),
            recent_after: 0,
            encrypted_at: None,
            state_changed_at: 0,
            visibility_changes: vec![],
            push_power_levels: std::sync::OnceLock::new(),
        }
    }

    pub fn state(&self, kind: &str, key: &str) -> Option<&StateEntry> {
        self.state.get(&(kind.to_owned(), key.to_owned()))
    }

    pub fn state_entries(&self) -> impl Iterator<Item = &StateEntry> {
        self.state.values()
    }

    pub fn state_len(&self) -> usize {
        self.state.len()
    }

    pub fn membership(&self, user_id: &UserId) -> Option<Membership> {
        self.state("m.room.member", user_id.as_str())
            .and_then(|e| Membership::from_content(e.pdu.content.get()))
    }

    pub fn history_visibility(&self) -> HistoryVisibility {
        HistoryVisibility::from_content(self.state("m.room.history_visibility", "").map(|e| e.pdu.content.get()))
    }

    pub fn members(&self, membership: Membership) -> impl Iterator<Item = &str> {
        self.members_range()
            .filter(move |(_, e)| Membership::from_content(e.pdu.content.get()) == Some(membership))
            .map(|((_, k), _)| k.as_str())
    }

    /// Where end-to-end encryption was turned on, if it was.
    pub fn encrypted_at(&self) -> Option<StreamPos> {
        self.encrypted_at
    }

    /// Users whose membership changed in `(after, until]`, with the latest
    /// membership in that range. From the recent window when it reaches back
    /// far enough (the usual case: a sync a few events behind), else from the
    /// current state's member entries.
    pub fn member_changes(&self, after: StreamPos, until: StreamPos) -> HashMap<OwnedUserId, Membership> {
        let mut changes = HashMap::new();
        let mut note = |pdu: &Pdu| {
            if let (Some(key), Some(m)) = (&pdu.state_key, Membership::from_content(pdu.content.get()))
                && let Ok(user) = OwnedUserId::try_from(key.as_str())
            {
                changes.insert(user, m);
            }
        };
        if after >= self.recent_after {
            self.recent
                .iter()
                .map(|e| &e.event)
                .filter(|e| e.pos > after && e.pos <= until && e.pdu.kind == TimelineEventType::RoomMember)
                .for_each(|e| note(&e.pdu));
        } else {
            self.state
                .iter()
                .filter(|((t, _), e)| t == "m.room.member" && e.pos > after && e.pos <= until)
                .for_each(|(_, e)| note(&e.pdu));
        }
        changes
    }

    fn creators(&self) -> Vec<OwnedUserId> {
        let Some(create) = self.state("m.room.create", "") else {
            return vec![];
        };
        let mut creators = vec![create.pdu.sender.clone()];
        if self.rules.authorization.additional_room_creators
            && let Some(extra) = create.pdu.content_value().get("additional_creators").and_then(Value::as_array)
        {
            creators.extend(
                extra
                    .iter()
                    .filter_map(|v| v.as_str())
                    .filter_map(|s| OwnedUserId::try_from(s).ok()),
            );
        }
        creators
    }

    /// Builds the next event on top of the room's head and checks it against the
    /// current state. `room_id` is what goes in the event (none for a v12 create).
    fn build_authorized(
        &self,
        signer: &EventSigner,
        room_id: Option<&RoomId>,
        sender: &UserId,
        event: NewEvent,
        ts: MilliSecondsSinceUnixEpoch,
    ) -> Result<Pdu> {
        let auth_rules = &self.rules.authorization;
        let content = raw(&event.content);
        let keys = auth_event_keys(auth_rules, &event.kind, sender, event.state_key.as_deref(), &content)?;
        let mut auth_events: Vec<&Pdu> = keys.iter().filter_map(|k| self.state.get(k)).map(|e| &e.pdu).collect();
        // v12 names the create event only through the room id; older versions list it.
        let create = self.state("m.room.create", "").map(|e| &e.pdu);
        if let Some(create) = create
            && !auth_rules.room_create_event_id_as_room_id
            && !auth_events.iter().any(|p| p.event_id == create.event_id)
        {
            auth_events.push(create);
        }
        let pdu = Pdu::build(
            signer,
            &self.record.version,
            room_id,
            sender,
            event,
            self.head.clone(),
            auth_events.iter().map(|p| p.event_id.clone()).collect(),
            self.depth + 1,
            ts,
        )?;
        let by_id: HashMap<&EventId, &Pdu> = auth_events.iter().copied().chain(create).map(|p| (&*p.event_id, p)).collect();
        authorize(
            auth_rules,
            &pdu,
            |t, k| self.state.get(&(t.to_owned(), k.to_owned())).map(|e| &e.pdu),
            |id| by_id.get(id).copied(),
        )?;
        Ok(pdu)
    }

    /// The newest `limit` events in `(after, until]` that `keep` accepts,
    /// oldest first, and whether more such events are in that range; `None`
    /// when the in-memory window does not reach back to `after`.
    pub fn recent_matching(
        &self,
        after: StreamPos,
        until: StreamPos,
        limit: usize,
        keep: impl Fn(&StoredEvent) -> bool,
    ) -> Option<(Vec<Arc<TimelineEvent>>, bool)> {
        if after < self.recent_after {
            return None;
        }
        let in_range = self
            .recent
            .iter()
            .rev()
            .filter(|e| e.event.pos > after && e.event.pos <= until && keep(&e.event));
        let mut events: Vec<Arc<TimelineEvent>> = in_range.take(limit + 1).cloned().collect();
        let more = events.len() > limit;
        events.truncate(limit);
        events.reverse();
        Some((events, more))
    }

    /// Every event in `(after, until]`, oldest first; `None` when the
    /// window does not reach back to `after`.
    pub fn recent_between(&self, after: StreamPos, until: StreamPos) -> Option<Vec<Arc<TimelineEvent>>> {
        if after < self.recent_after {
            return None;
        }
        Some(
            self.recent
                .iter()
                .filter(|e| e.event.pos > after && e.event.pos <= until)
                .cloned()
                .collect(),
        )
    }

    /// The state entries set in `(after, until]`: from the recent window
    /// when it reaches back that far (the usual case), else by a walk over
    /// the state; none at all when the state has not changed since `after`.
    pub fn state_changed_between(&self, after: StreamPos, until: StreamPos) -> Vec<&StateEntry> {
        if self.state_changed_at <= after {
            return vec![];
        }
        let in_range = |e: &&StateEntry| e.pos > after && e.pos <= until;
        if after >= self.recent_after {
            let mut seen = std::collections::HashSet::new();
            return self
                .recent
                .iter()
                .filter_map(|e| e.event.pdu.state_key_pair())
                .filter(|key| seen.insert(key.clone()))
                .filter_map(|key| self.state.get(&key))
                .filter(in_range)
                .collect();
        }
        self.state.values().filter(in_range).collect()
    }

    /// Up to five members to name a room by when it has no name: joined and
    /// invited members other than `user`, in the order they arrived (or, if
    /// there are none, those who left). A big room is not sorted.
    pub fn heroes(&self, user: &UserId) -> Vec<OwnedUserId> {
        const HEROES: usize = 5;
        let mut present: Vec<(StreamPos, &str)> = vec![];
        let mut gone: Vec<(StreamPos, &str)> = vec![];
        let big = self.member_count(Membership::Join) + self.member_count(Membership::Invite) > 1000;
        for ((_, key), entry) in self.members_range() {
            if key == user.as_str() {
                continue;
            }
            match Membership::from_content(entry.pdu.content.get()) {
                Some(Membership::Join | Membership::Invite) => present.push((entry.pos, key)),
                Some(_) if present.is_empty() && gone.len() < HEROES => gone.push((entry.pos, key)),
                _ => {}
            }
            if big && present.len() == HEROES {
                break;
            }
        }
        let mut chosen = if present.is_empty() { gone } else { present };
        chosen.sort_unstable();
        chosen
            .into_iter()
            .take(HEROES)
            .filter_map(|(_, u)| OwnedUserId::try_from(u).ok())
            .collect()
    }

    /// The room's `m.room.member` entries, in user id order.
    fn members_range(&self) -> impl Iterator<Item = (&StateKey, &StateEntry)> {
        let start = ("m.room.member".to_owned(), String::new());
        self.state.range(start..).take_while(|((kind, _), _)| kind == "m.room.member")
    }

    fn remember(&mut self, event: StoredEvent) {
        if event.pdu.kind == ruma::events::TimelineEventType::RoomRedaction {
            // The redacted event may be in the window; rather than rewrite it,
            // start the window afresh after the redaction.
            self.recent.clear();
            self.recent_after = event.pos;
            return;
        }
        self.recent.push_back(Arc::new(TimelineEvent::new(event)));
        while self.recent.len() > RECENT_EVENTS {
            if let Some(old) = self.recent.pop_front() {
                self.recent_after = old.event.pos;
            }
        }
    }

    pub fn member_count(&self, membership: Membership) -> usize {
        self.member_counts.get(&membership).copied().unwrap_or(0)
    }

    fn count_members(state: &BTreeMap<StateKey, StateEntry>) -> HashMap<Membership, usize> {
        let mut counts = HashMap::new();
        for ((t, _), e) in state {
            if t == "m.room.member"
                && let Some(m) = Membership::from_content(e.pdu.content.get())
            {
                *counts.entry(m).or_insert(0) += 1;
            }
        }
        counts
    }

    /// Makes a stored event the room's new head (and state, for a state event).
    fn apply(&mut self, pdu: &Pdu, pos: StreamPos) {
        if pdu.kind == ruma::events::TimelineEventType::RoomMember {
            let key = pdu.state_key.as_deref().unwrap_or_default();
            if let Some(old) = self
                .state("m.room.member", key)
                .and_then(|e| Membership::from_content(e.pdu.content.get()))
                && let Some(n) = self.member_counts.get_mut(&old)
            {
                *n = n.saturating_sub(1);
            }
            if let Some(new) = Membership::from_content(pdu.content.get()) {
                *self.member_counts.entry(new).or_insert(0) += 1;
            }
        }
        if let Some(key) = pdu.state_key_pair() {
            if pdu.kind == ruma::events::TimelineEventType::RoomEncryption {
                self.encrypted_at = Some(pos);
            }
            self.state_changed_at = self.state_changed_at.max(pos);
            if pdu.kind == ruma::events::TimelineEventType::RoomPowerLevels {
                self.push_power_levels = std::sync::OnceLock::new();
            }
            if pdu.kind == ruma::events::TimelineEventType::RoomHistoryVisibility && pos > 0 {
                self.visibility_changes
                    .push((pos, HistoryVisibility::from_content(Some(pdu.content.get()))));
            }
            self.state.insert(key, StateEntry { pdu: pdu.clone(), pos });
        }
        self.head = vec![pdu.event_id.clone()];
        self.depth = pdu.depth;
        self.last_pos = self.last_pos.max(pos);
    }

    /// The power levels as push conditions read them (`@room` needs enough power).
    pub fn push_power_levels(&self) -> Arc<ruma::push::PushConditionPowerLevelsCtx> {
        self.push_power_levels.get_or_init(|| Arc::new(self.power_levels().into())).clone()
    }

    pub fn power_levels(&self) -> RoomPowerLevels {
        let source = self
            .state("m.room.power_levels", "")
            .and_then(|e| serde_json::from_str::<RoomPowerLevelsEventContent>(e.pdu.content.get()).ok())
            .map(RoomPowerLevelsSource::Original)
            .unwrap_or(RoomPowerLevelsSource::None);
        RoomPowerLevels::new(source, &self.rules.authorization, self.creators())
    }
}

/// A room: its cached state behind a read-write lock, and the turn that
/// serializes its writers.
pub struct Room {
    cache: RwLock<RoomCache>,
    /// Held by the one writer appending to the room, across the store write.
    writer: AsyncMutex<()>,
    /// Appends started, and the number of them applied to `cache` (or failed).
    started: AtomicU64,
    applied: watch::Sender<u64>,
}

/// The right to append to a room; see [`Room::write_turn`].
pub struct WriteTurn<'a> {
    room: &'a Room,
    _guard: AsyncMutexGuard<'a, ()>,
}

/// Marks an append as applied when dropped, whether it succeeded or not, so
/// that readers waiting for it never wait forever.
struct AppendInProgress<'a> {
    room: &'a Room,
    seq: u64,
}

impl Drop for AppendInProgress<'_> {
    fn drop(&mut self) {
        let seq = self.seq;
        self.room.applied.send_if_modified(|applied| {
            let moved = *applied < seq;
            *applied = (*applied).max(seq);
            moved
        });
    }
}

impl Room {
    fn new(cache: RoomCache) -> Self {
        Self {
            cache: RwLock::new(cache),
            writer: AsyncMutex::new(()),
            started: AtomicU64::new(0),
            applied: watch::channel(0).0,
        }
    }

    /// The committed state as applied so far. Never hold it across an await.
    pub fn read(&self) -> RwLockReadGuard<'_, RoomCache> {
        self.cache.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The state once every append started before this call is applied: it
    /// then holds every event of the room up to the store's current position.
    ///
    /// While appends keep arriving, it lingers (up to `linger`) until the room
    /// is quiet, so that a burst of sends reaches a waiting member in one
    /// response rather than one response per send: under load that halves the
    /// responses per message, and an idle room answers at once.
    pub async fn settled(&self, linger: Duration) -> RwLockReadGuard<'_, RoomCache> {
        let needed = self.started.load(Ordering::SeqCst);
        if *self.applied.borrow() < needed {
            let mut applied = self.applied.subscribe();
            // The sender lives as long as the room, so these waits cannot fail.
            let _ = applied.wait_for(|a| *a >= needed).await;
            let deadline = tokio::time::Instant::now() + linger;
            loop {
                let started = self.started.load(Ordering::SeqCst);
                if *applied.borrow() >= started {
                    break;
                }
                if tokio::time::timeout_at(deadline, applied.wait_for(|a| *a >= started))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        }
        self.read()
    }

    /// Waits for the room's write turn: appends are made one at a time.
    pub async fn write_turn(&self) -> WriteTurn<'_> {
        WriteTurn {
            room: self,
            _guard: self.writer.lock().await,
        }
    }

    fn begin_append(&self) -> AppendInProgress<'_> {
        AppendInProgress {
            room: self,
            seq: self.started.fetch_add(1, Ordering::SeqCst) + 1,
        }
    }
}

/// What `/createRoom` asks for, already parsed.
#[derive(Debug, Default, Clone)]
pub struct CreateRoom {
    pub preset: Option<String>,
    pub visibility_public: bool,
    pub room_version: Option<RoomVersionId>,
    pub creation_content: Option<serde_json::Map<String, Value>>,
    pub initial_state: Vec<(String, String, Value)>,
    pub invite: Vec<OwnedUserId>,
    pub is_direct: bool,
    pub name: Option<String>,
    pub topic: Option<String>,
    pub room_alias_name: Option<String>,
    pub power_level_content_override: Option<serde_json::Map<String, Value>>,
}

/// How far one `/messages` request reads through events it must not
/// return (hidden by a filter or history visibility) before answering.
const MESSAGES_SCAN_LIMIT: usize = 5_000;

/// An event a user may see, with their membership at it.
#[derive(Debug, Clone)]
pub struct VisibleEvent {
    pub event: StoredEvent,
    pub membership: Membership,
}

/// The state of a room a user may read (see [`Rooms::readable_state`]).
pub enum ReadableState {
    /// The current state, in the room's cache.
    Current(Arc<Room>),
    /// The state at a point of the past, in stream order.
    At(Vec<StoredEvent>),
}

impl ReadableState {
    /// Every state event, in stream order for a past state.
    pub fn events(&self) -> Vec<StoredEvent> {
        match self {
            ReadableState::Current(room) => room.read().state_entries().map(StateEntry::to_stored).collect(),
            ReadableState::At(events) => events.clone(),
        }
    }

    /// The state event of one (type, state key).
    pub fn get(&self, kind: &str, state_key: &str) -> Option<StoredEvent> {
        match self {
            ReadableState::Current(room) => room.read().state(kind, state_key).map(StateEntry::to_stored),
            ReadableState::At(events) => events
                .iter()
                .find(|e| e.pdu.kind.to_string() == kind && e.pdu.state_key.as_deref() == Some(state_key))
                .cloned(),
        }
    }
}

/// What one user may see of one room's history: their membership changes
/// and the room's history visibility changes, each oldest first.
pub struct HistoryView {
    user: OwnedUserId,
    memberships: Vec<(StreamPos, Membership)>,
    visibility: Vec<(StreamPos, HistoryVisibility)>,
}

impl HistoryView {
    /// The user's membership right after the event at `pos`.
    fn membership_at(&self, pos: StreamPos) -> Option<Membership> {
        self.memberships.iter().take_while(|(p, _)| *p <= pos).last().map(|(_, m)| *m)
    }

    /// The history visibility in force right after the event at `pos`.
    fn visibility_at(&self, pos: StreamPos) -> HistoryVisibility {
        self.visibility
            .iter()
            .take_while(|(p, _)| *p <= pos)
            .last()
            .map_or(HistoryVisibility::Shared, |(_, v)| *v)
    }

    /// The user's membership at `event` (`leave` before they ever had one)
    /// if they may see it, else `None`.
    pub fn check(&self, event: &StoredEvent) -> Option<Membership> {
        let pos = event.pos;
        let membership = self.membership_at(pos);
        let own_member = event.pdu.kind == TimelineEventType::RoomMember && event.pdu.state_key.as_deref() == Some(self.user.as_str());
        let mut visibility = self.visibility_at(pos);
        if event.pdu.kind == TimelineEventType::RoomHistoryVisibility && event.pdu.state_key.as_deref() == Some("") {
            // A change is judged by the visibility before it and the one it sets, whichever shows more.
            visibility = visibility.most_open(self.visibility_at(pos.saturating_sub(1)));
        }
        let joined_after = self.memberships.iter().any(|(p, m)| *p > pos && *m == Membership::Join);
        let visible = own_member
            || may_see_event(EventVisibility {
                visibility,
                membership_at_event: membership,
                joined_after,
            });
        visible.then(|| membership.unwrap_or(Membership::Leave))
    }
}

/// A new room's state events in order, one per (type, state key): putting
/// an event for a key already there replaces it in its place.
#[derive(Default)]
struct InitialEvents(Vec<NewEvent>);

impl InitialEvents {
    fn put(&mut self, event: NewEvent) {
        match self.0.iter_mut().find(|e| e.kind == event.kind && e.state_key == event.state_key) {
            Some(existing) => *existing = event,
            None => self.0.push(event),
        }
    }
}

/// A thread as `/threads` lists it.
pub struct ThreadSummary {
    pub root: VisibleEvent,
    pub latest: VisibleEvent,
    pub count: usize,
    pub participated: bool,
}

/// Which way `/messages` reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Forward,
    Backward,
}

pub struct Rooms {
    store: Arc<dyn Store>,
    signer: Arc<EventSigner>,
    notifier: Arc<Notifier>,
    changes: Arc<Changes>,
    default_version: RoomVersionId,
    rooms: Mutex<HashMap<OwnedRoomId, Arc<Room>>>,
    /// The timestamp of the newest create event made here.
    last_create_ms: AtomicU64,
    /// Joins are bounded: a crowd joining one huge room queues here, and is
    /// refused once the wait would pass the deadline, instead of piling up
    /// behind the room's write turn.
    joins: Arc<Gate>,
}

/// Refuses an event type or state key with control characters: they are
/// identifiers, shown to people and used in paths, never text.
fn check_event_names(event: &NewEvent) -> Result<()> {
    let bad = |s: &str| kabar_domain::names::has_control_chars(s);
    if event.kind.is_empty() || bad(&event.kind) || event.state_key.as_deref().is_some_and(bad) {
        return Err(Error::InvalidParam(
            "event types and state keys must not contain control characters".into(),
        ));
    }
    Ok(())
}

fn now() -> MilliSecondsSinceUnixEpoch {
    MilliSecondsSinceUnixEpoch::now()
}

fn relation_of(content: &Value) -> Option<(OwnedEventId, String)> {
    let rel = content.get("m.relates_to")?;
    if let (Some(t), Some(id)) = (
        rel.get("rel_type").and_then(Value::as_str),
        rel.get("event_id").and_then(Value::as_str),
    ) {
        return Some((OwnedEventId::try_from(id).ok()?, t.to_owned()));
    }
    let reply = rel.get("m.in_reply_to")?.get("event_id")?.as_str()?;
    Some((OwnedEventId::try_from(reply).ok()?, "m.in_reply_to".to_owned()))
}

impl Rooms {
    pub fn new(
        store: Arc<dyn Store>,
        signer: Arc<EventSigner>,
        notifier: Arc<Notifier>,
        changes: Arc<Changes>,
        default_version: RoomVersionId,
        joins: Arc<Gate>,
    ) -> Self {
        Self {
            store,
            signer,
            notifier,
            changes,
            default_version,
            rooms: Mutex::new(HashMap::new()),
            last_create_ms: AtomicU64::new(0),
            joins,
        }
    }

    pub fn server_name(&self) -> &ruma::ServerName {
        self.signer.server_name()
    }

    pub fn default_version(&self) -> &RoomVersionId {
        &self.default_version
    }

    /// The room's cache, loading it from the store on first use.
    pub async fn room(&self, room_id: &RoomId) -> Result<Arc<Room>> {
        if let Some(r) = self.rooms.lock().expect("rooms lock").get(room_id) {
            return Ok(r.clone());
        }
        let record = self
            .store
            .room(room_id)
            .await?
            .ok_or_else(|| Error::NotFound("unknown room".into()))?;
        let rules = record
            .version
            .rules()
            .ok_or_else(|| Error::Internal(format!("stored room has unknown version {}", record.version)))?;
        let mut state = BTreeMap::new();
        for e in self.store.current_state(room_id).await? {
            if let Some(k) = e.pdu.state_key_pair() {
                state.insert(k, StateEntry { pdu: e.pdu, pos: e.pos });
            }
        }
        let last = self
            .store
            .room_events(EventRange {
                room_id,
                after: 0,
                until: u64::MAX,
                direction: Direction::Backward,
                limit: 1,
                kinds: None,
            })
            .await?;
        let (head, depth, last_pos) = match last.first() {
            Some(e) => (vec![e.pdu.event_id.clone()], e.pdu.depth, e.pos),
            None => (vec![], 0, 0),
        };
        let member_counts = RoomCache::count_members(&state);
        let encrypted_at = state.get(&("m.room.encryption".to_owned(), String::new())).map(|e| e.pos);
        let state_changed_at = state.values().map(|e| e.pos).max().unwrap_or(0);
        let visibility_changes = self
            .store
            .state_history(room_id, "m.room.history_visibility", "")
            .await?
            .into_iter()
            .map(|e| (e.pos, HistoryVisibility::from_content(Some(e.pdu.content.get()))))
            .collect();
        let cache = Arc::new(Room::new(RoomCache {
            record,
            rules,
            state,
            head,
            depth,
            last_pos,
            member_counts,
            recent: VecDeque::new(),
            recent_after: last_pos,
            encrypted_at,
            state_changed_at,
            visibility_changes,
            push_power_levels: std::sync::OnceLock::new(),
        }));
        Ok(self
            .rooms
            .lock()
            .expect("rooms lock")
            .entry(room_id.to_owned())
            .or_insert(cache)
            .clone())
    }

    /// Builds, authorizes, stores and announces one event, in the caller's write turn.
    async fn append(
        &self,
        turn: &WriteTurn<'_>,
        sender: &UserId,
        event: NewEvent,
        txn: Option<TxnRef>,
    ) -> Result<(OwnedEventId, StreamPos)> {
        let room = turn.room;
        check_event_names(&event)?;
        let in_progress = room.begin_append();
        let relation = relation_of(&event.content);
        let redacts = event.redacts.clone();
        let (room_id, version) = {
            let r = room.read();
            (r.record.room_id.clone(), r.record.version.clone())
        };
        let original = match &redacts {
            Some(target) => match self.store.event(target).await? {
                Some(e) if e.pdu.room_id == room_id => Some(e),
                Some(_) => return Err(Error::InvalidParam("the event to redact is in another room".into())),
                None => return Err(Error::NotFound("event to redact not found in this room".into())),
            },
            None => None,
        };
        let (pdu, prev) = {
            let r = room.read();
            if let Some(original) = &original {
                let pl = r.power_levels();
                let allowed = if original.pdu.sender == sender {
                    pl.user_can_redact_own_event(sender)
                } else {
                    pl.user_can_redact_event_of_other(sender)
                };
                if !allowed {
                    return Err(Error::Forbidden("you may not redact this event".into()));
                }
            }
            let pdu = r.build_authorized(&self.signer, Some(&room_id), sender, event, now())?;
            let prev = pdu
                .state_key_pair()
                .and_then(|(kind, key)| r.state(&kind, &key))
                .map(StateEntry::as_prev);
            (pdu, prev)
        };
        let redacted_target = original.and_then(|o| redact_pdu(&o.pdu, &version).map(|json| (o.pdu.event_id.clone(), json)));

        let member_target = match pdu.kind {
            TimelineEventType::RoomMember => pdu.state_key.as_deref().and_then(|k| OwnedUserId::try_from(k).ok()),
            _ => None,
        };
        let membership_change = member_target.as_ref().map(|t| self.changes.memberships.begin(t));
        let outcome = self
            .store
            .append_event(EventWrite {
                pdu: pdu.clone(),
                txn: txn.clone(),
                relation,
                redacted_target,
                prev: prev.clone(),
            })
            .await?;
        let pos = match outcome {
            AppendOutcome::Appended(pos) => pos,
            AppendOutcome::Duplicate(id) => return Ok((id, 0)),
        };
        if let Some(change) = membership_change {
            change.finish(pos);
        }
        let event_id = pdu.event_id.clone();
        {
            let mut r = room.cache.write().unwrap_or_else(|poisoned| poisoned.into_inner());
            r.apply(&pdu, pos);
            r.remember(StoredEvent {
                pos,
                pdu,
                txn,
                redacted_by: None,
                prev,
            });
        }
        drop(in_progress);
        self.notifier.room_changed(&room_id);
        if let Some(target) = &member_target {
            self.notifier.user_changed(target);
        }
        Ok((event_id, pos))
    }

    /// Sends an event as `sender`; with a transaction id, a repeat returns the first event.
    ///
    /// The store recognises a repeated transaction inside the write itself, so
    /// the common case (a new transaction) costs no extra read.
    pub async fn send(&self, sender: &UserId, room_id: &RoomId, event: NewEvent, txn: Option<TxnRef>) -> Result<OwnedEventId> {
        let room = self.room(room_id).await?;
        let turn = room.write_turn().await;
        match self.append(&turn, sender, event, txn.clone()).await {
            Ok((event_id, _)) => Ok(event_id),
            Err(e) => {
                // A retry of a send that succeeded gets the first event, even if
                // the sender could no longer send it (they left the room since).
                if let Some(t) = &txn
                    && let Some(id) = self.store.event_by_txn(room_id, sender, t).await?
                {
                    return Ok(id);
                }
                Err(e)
            }
        }
    }

    pub async fn redact(
        &self,
        sender: &UserId,
        room_id: &RoomId,
        target: &EventId,
        reason: Option<String>,
        txn: Option<TxnRef>,
    ) -> Result<OwnedEventId> {
        let mut content = json!({ "redacts": target });
        if let Some(r) = reason {
            content["reason"] = json!(r);
        }
        let mut ev = NewEvent::message("m.room.redaction", content);
        ev.redacts = Some(target.to_owned());
        self.send(sender, room_id, ev, txn).await
    }

    /// Sends a membership event for `target`, keeping the target's profile in a join.
    pub async fn set_membership(
        &self,
        sender: &UserId,
        room_id: &RoomId,
        target: &UserId,
        membership: Membership,
        reason: Option<String>,
        extra: Option<serde_json::Map<String, Value>>,
    ) -> Result<OwnedEventId> {
        if target.server_name() != self.server_name() {
            return Err(Error::Forbidden("this server does not federate".into()));
        }
        let profile = self.store.user(target).await?;
        if profile.is_none() {
            return Err(Error::NotFound(format!("unknown user {target}")));
        }
        let _join_pass = match membership {
            Membership::Join => Some(self.joins.enter().await?),
            _ => None,
        };
        let room = self.room(room_id).await?;
        let turn = room.write_turn().await;
        {
            // Joining a room one is in already changes nothing (a retried
            // /join). A member event with content of its own (a per-room
            // nickname) is a new event, and anyone else's attempt goes to
            // the authorization rules.
            let r = room.read();
            if membership == Membership::Join
                && sender == target
                && extra.is_none()
                && r.membership(target) == Some(Membership::Join)
                && let Some(e) = r.state("m.room.member", target.as_str())
            {
                return Ok(e.pdu.event_id.clone());
            }
        }
        let mut content = serde_json::Map::new();
        if let (Membership::Join | Membership::Invite, Some(p)) = (membership, &profile) {
            if let Some(d) = &p.displayname {
                content.insert("displayname".into(), json!(d));
            }
            if let Some(a) = &p.avatar_url {
                content.insert("avatar_url".into(), json!(a));
            }
        }
        if let Some(r) = reason {
            content.insert("reason".into(), json!(r));
        }
        // What the client wrote wins over the profile (a per-room nickname).
        content.extend(extra.unwrap_or_default());
        content.insert("membership".into(), json!(membership.as_str()));
        if sender == target
            && let Some(current) = room.read().state("m.room.member", target.as_str())
            && current.pdu.content_value() == Value::Object(content.clone())
        {
            // The same member event again changes nothing: no new event.
            return Ok(current.pdu.event_id.clone());
        }
        let ev = NewEvent::state("m.room.member", target.as_str(), Value::Object(content));
        Ok(self.append(&turn, sender, ev, None).await?.0)
    }

    /// Resolves a room id or alias to a room id.
    pub async fn resolve(&self, id_or_alias: &str) -> Result<OwnedRoomId> {
        if id_or_alias.starts_with('#') {
            return self
                .store
                .alias(id_or_alias)
                .await?
                .map(|(r, _)| r)
                .ok_or_else(|| Error::NotFound("room alias not found".into()));
        }
        OwnedRoomId::try_from(id_or_alias).map_err(|_| Error::InvalidParam("not a room id or alias".into()))
    }

    pub async fn create_room(&self, creator: &UserId, req: CreateRoom) -> Result<OwnedRoomId> {
        let version = req.room_version.clone().unwrap_or_else(|| self.default_version.clone());
        if !SUPPORTED_ROOM_VERSIONS.contains(&version) {
            return Err(Error::UnsupportedRoomVersion(format!("room version {version} is not supported")));
        }
        let rules = version.rules().ok_or_else(|| Error::UnsupportedRoomVersion(version.to_string()))?;
        let alias = match &req.room_alias_name {
            Some(name) => {
                let alias = format!("#{name}:{}", self.server_name());
                if ruma::RoomAliasId::parse(&alias).is_err() || name.contains(':') || name.is_empty() {
                    return Err(Error::InvalidParam("invalid room alias name".into()));
                }
                if self.store.alias(&alias).await?.is_some() {
                    return Err(Error::RoomInUse("room alias already taken".into()));
                }
                Some(alias)
            }
            None => None,
        };
        for u in &req.invite {
            if self.store.user(u).await?.is_none() {
                return Err(Error::NotFound(format!("unknown user {u}")));
            }
        }
        let events = self.initial_events(creator, &req, &version, alias.as_deref()).await?;

        // Room version 12 names a room by its create event's hash: two equal
        // requests in the same millisecond would name the same room, so each
        // create event gets its own timestamp, and a room id that is taken
        // anyway (another process) is retried with the next one.
        let mut attempts = 0;
        let mut room = loop {
            attempts += 1;
            let (mut room, pdus) = self.build_room(creator, &req, &version, &rules, &events)?;
            let writes = pdus
                .iter()
                .map(|(p, prev)| EventWrite {
                    pdu: p.clone(),
                    txn: None,
                    relation: None,
                    redacted_target: None,
                    prev: prev.clone(),
                })
                .collect();
            let members: Vec<OwnedUserId> = std::iter::once(creator.to_owned()).chain(req.invite.iter().cloned()).collect();
            let membership_changes: Vec<_> = members.iter().map(|u| self.changes.memberships.begin(u)).collect();
            match self.store.create_room(room.record.clone(), writes).await {
                Ok(positions) => {
                    let last = positions.iter().copied().max().unwrap_or_default();
                    for change in membership_changes {
                        change.finish(last);
                    }
                    for ((pdu, _), pos) in pdus.iter().zip(&positions) {
                        room.apply(pdu, *pos);
                    }
                    break room;
                }
                Err(kabar_store::StoreError::Conflict(m)) if attempts < 3 => {
                    tracing::warn!(reason = %m, "room id taken; creating the room again with a new create event");
                }
                Err(e) => return Err(e.into()),
            }
        };
        room.recent_after = room.last_pos;
        let room_id = room.record.room_id.clone();
        if let Some(a) = alias {
            self.store.set_alias(&a, &room_id, creator).await?;
        }
        self.rooms
            .lock()
            .expect("rooms lock")
            .insert(room_id.clone(), Arc::new(Room::new(room)));
        self.notifier.user_changed(creator);
        for u in &req.invite {
            self.notifier.user_changed(u);
        }
        tracing::info!(room = %room_id, %version, "room created");
        Ok(room_id)
    }

    /// The state events a new room starts with, in the spec's order: create,
    /// the creator's join, power levels, canonical alias, the preset's
    /// events, `initial_state`, name, topic, invites. A later event for the
    /// same (type, state key) replaces an earlier one in its place, so each
    /// piece of state is written once.
    async fn initial_events(
        &self,
        creator: &UserId,
        req: &CreateRoom,
        version: &RoomVersionId,
        alias: Option<&str>,
    ) -> Result<Vec<NewEvent>> {
        let rules = version.rules().ok_or_else(|| Error::UnsupportedRoomVersion(version.to_string()))?;
        let mut create = req.creation_content.clone().unwrap_or_default();
        create.insert("room_version".into(), json!(version.as_str()));
        if rules.authorization.use_room_create_sender {
            create.remove("creator");
        } else {
            create.insert("creator".into(), json!(creator));
        }

        let preset = req.preset.clone().unwrap_or_else(|| {
            if req.visibility_public {
                "public_chat".into()
            } else {
                "private_chat".into()
            }
        });
        let (join_rule, history, guest) = match preset.as_str() {
            "public_chat" => ("public", "shared", "forbidden"),
            "private_chat" | "trusted_private_chat" => ("invite", "shared", "can_join"),
            other => return Err(Error::InvalidParam(format!("unknown preset {other}"))),
        };
        for (kind, _, _) in &req.initial_state {
            if kind == "m.room.create" || kind == "m.room.member" {
                return Err(Error::InvalidParam(format!("{kind} cannot be set in initial_state")));
            }
        }
        let initial_power = req
            .initial_state
            .iter()
            .rev()
            .find(|(kind, key, _)| kind == "m.room.power_levels" && key.is_empty())
            .map(|(_, _, content)| content.clone());

        let creators_privileged = rules.authorization.explicitly_privilege_room_creators;
        let mut power = initial_power.unwrap_or_else(|| {
            json!({
                "users": {},
                "users_default": 0,
                "events": {
                    "m.room.name": 50, "m.room.power_levels": 100, "m.room.history_visibility": 100,
                    "m.room.canonical_alias": 50, "m.room.avatar": 50, "m.room.tombstone": 100,
                    "m.room.server_acl": 100, "m.room.encryption": 100,
                },
                "events_default": 0, "state_default": 50, "ban": 50, "kick": 50, "redact": 50, "invite": 0,
                "notifications": { "room": 50 },
            })
        });
        if !power.get("users").is_some_and(Value::is_object) {
            power["users"] = json!({});
        }
        if let Some(users) = power["users"].as_object_mut() {
            // Room versions that privilege creators give them infinite power;
            // older ones need the creator at 100 to go on building the room.
            if !creators_privileged {
                users.insert(creator.to_string(), json!(100));
            }
            // Invitees of a trusted private chat get the creator's power (the
            // highest a power level can say).
            if preset == "trusted_private_chat" {
                for u in &req.invite {
                    users.insert(u.to_string(), json!(100));
                }
            }
        }
        if let Some(o) = &req.power_level_content_override {
            for (k, v) in o {
                power[k] = v.clone();
            }
        }
        if creators_privileged && let Some(users) = power.get_mut("users").and_then(Value::as_object_mut) {
            users.remove(creator.as_str());
        }

        let mut events = InitialEvents::default();
        events.put(NewEvent::state("m.room.create", "", Value::Object(create)));
        events.put(NewEvent::state(
            "m.room.member",
            creator.as_str(),
            self.join_content(creator).await?,
        ));
        events.put(NewEvent::state("m.room.power_levels", "", power));
        if let Some(a) = alias {
            events.put(NewEvent::state("m.room.canonical_alias", "", json!({ "alias": a })));
        }
        events.put(NewEvent::state("m.room.join_rules", "", json!({ "join_rule": join_rule })));
        events.put(NewEvent::state(
            "m.room.history_visibility",
            "",
            json!({ "history_visibility": history }),
        ));
        events.put(NewEvent::state("m.room.guest_access", "", json!({ "guest_access": guest })));
        for (kind, key, content) in &req.initial_state {
            if kind == "m.room.power_levels" && key.is_empty() {
                continue; // merged into the power levels above
            }
            events.put(NewEvent::state(kind.clone(), key.clone(), content.clone()));
        }
        if let Some(n) = &req.name {
            events.put(NewEvent::state("m.room.name", "", json!({ "name": n })));
        }
        if let Some(t) = &req.topic {
            events.put(NewEvent::state("m.room.topic", "", json!({ "topic": t })));
        }
        for u in &req.invite {
            let mut content = json!({ "membership": "invite" });
            if req.is_direct {
                content["is_direct"] = json!(true);
            }
            if let Some(p) = self.store.user(u).await? {
                if let Some(d) = p.displayname {
                    content["displayname"] = json!(d);
                }
                if let Some(a) = p.avatar_url {
                    content["avatar_url"] = json!(a);
                }
            }
            events.put(NewEvent::state("m.room.member", u.as_str(), content));
        }
        Ok(events.0)
    }

    /// Builds a new room's whole chain in memory, checking each event
    /// against the state so far. Each call gives the create event a new
    /// timestamp, so a room version 12 room id is never made twice.
    #[allow(clippy::type_complexity)]
    fn build_room(
        &self,
        creator: &UserId,
        req: &CreateRoom,
        version: &RoomVersionId,
        rules: &RoomVersionRules,
        events: &[NewEvent],
    ) -> Result<(RoomCache, Vec<(Pdu, Option<PrevState>)>)> {
        let room_id = if rules.authorization.room_create_event_id_as_room_id {
            None
        } else {
            let local: String = rand::thread_rng().sample_iter(&Alphanumeric).take(18).map(char::from).collect();
            Some(OwnedRoomId::try_from(format!("!{local}:{}", self.server_name())).map_err(|e| Error::Internal(e.to_string()))?)
        };
        let mut room = RoomCache::empty(
            RoomRecord {
                room_id: room_id
                    .clone()
                    .unwrap_or_else(|| OwnedRoomId::try_from("!placeholder:localhost").expect("valid")),
                version: version.clone(),
                creator: creator.to_owned(),
                is_public: req.visibility_public,
            },
            rules.clone(),
        );
        let created_at = self.unique_create_timestamp();
        let mut pdus = Vec::with_capacity(events.len());
        for ev in events {
            check_event_names(ev)?;
            let is_create = ev.kind == "m.room.create";
            let target_room = if is_create {
                room_id.clone()
            } else {
                Some(room.record.room_id.clone())
            };
            let pdu = room
                .build_authorized(&self.signer, target_room.as_deref(), creator, ev.clone(), created_at)
                .map_err(|e| match e {
                    Error::Forbidden(m) => Error::InvalidParam(format!("room creation event rejected: {m}")),
                    other => other,
                })?;
            if is_create {
                room.record.room_id = pdu.room_id.clone();
            }
            let prev = pdu
                .state_key_pair()
                .and_then(|(kind, key)| room.state(&kind, &key))
                .map(StateEntry::as_prev);
            room.apply(&pdu, 0);
            pdus.push((pdu, prev));
        }
        Ok((room, pdus))
    }

    /// Now, or just after the last create event's timestamp if that is not
    /// in the past yet: every create event this process makes has its own.
    fn unique_create_timestamp(&self) -> MilliSecondsSinceUnixEpoch {
        let now: u64 = now().get().into();
        let mut last = self.last_create_ms.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self
                .last_create_ms
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return MilliSecondsSinceUnixEpoch(ruma::UInt::new_saturating(next)),
                Err(seen) => last = seen,
            }
        }
    }

    async fn join_content(&self, user: &UserId) -> Result<Value> {
        let mut content = json!({ "membership": "join" });
        if let Some(p) = self.store.user(user).await? {
            if let Some(d) = p.displayname {
                content["displayname"] = json!(d);
            }
            if let Some(a) = p.avatar_url {
                content["avatar_url"] = json!(a);
            }
        }
        Ok(content)
    }

    /// Sends an updated member event into every room the user has joined.
    pub async fn propagate_profile(&self, user: &UserId) -> Result<()> {
        let content = self.join_content(user).await?;
        for m in self.store.memberships(user).await? {
            if m.membership == Membership::Join {
                let room = self.room(&m.room_id).await?;
                let turn = room.write_turn().await;
                let ev = NewEvent::state("m.room.member", user.as_str(), content.clone());
                if let Err(e) = self.append(&turn, user, ev, None).await {
                    tracing::warn!(room = %m.room_id, error = %e, "could not update profile in room");
                }
            }
        }
        Ok(())
    }

    /// Fails unless `user` may read the room's current state (a member, or the room is world-readable).
    pub async fn check_can_read(&self, user: &UserId, room_id: &RoomId) -> Result<Arc<Room>> {
        let room = self.room(room_id).await.map_err(|e| match e {
            Error::NotFound(_) => Error::Forbidden("you are not in this room".into()),
            other => other,
        })?;
        {
            let r = room.read();
            let member = r.membership(user) == Some(Membership::Join);
            if !member && r.history_visibility() != HistoryVisibility::WorldReadable {
                return Err(Error::Forbidden("you are not in this room".into()));
            }
        }
        Ok(room)
    }

    /// The room state `user` may read: the current state for a member (or
    /// anyone, in a world-readable room); for a former member, the state
    /// right after they left (never what happened since).
    pub async fn readable_state(&self, user: &UserId, room_id: &RoomId) -> Result<ReadableState> {
        let not_in_room = || Error::Forbidden("you are not in this room".into());
        let room = self.room(room_id).await.map_err(|e| match e {
            Error::NotFound(_) => not_in_room(),
            other => other,
        })?;
        let (current, left_at) = {
            let r = room.read();
            let member = r.membership(user) == Some(Membership::Join);
            let left_at = match (r.membership(user), r.state("m.room.member", user.as_str())) {
                (Some(Membership::Leave | Membership::Ban), Some(e)) => Some(e.pos),
                _ => None,
            };
            (member || r.history_visibility() == HistoryVisibility::WorldReadable, left_at)
        };
        if current {
            return Ok(ReadableState::Current(room));
        }
        let left_at = left_at.ok_or_else(not_in_room)?;
        let history = self.store.membership_history(room_id, user).await?;
        if !history.iter().any(|m| m.membership == Membership::Join) {
            // Invited and declined, or banned without ever joining: nothing to read.
            return Err(not_in_room());
        }
        Ok(ReadableState::At(self.state_at(&room, left_at).await?))
    }

    /// The state `user` may be shown at the event at `at` (`/context`): the
    /// state right after it, or right after the user left if that came
    /// first (a former member never sees what happened since).
    pub async fn state_for_user_at(&self, user: &UserId, room_id: &RoomId, at: StreamPos) -> Result<Vec<StoredEvent>> {
        let room = self.room(room_id).await?;
        let at = {
            let r = room.read();
            let current = r.membership(user) == Some(Membership::Join) || r.history_visibility() == HistoryVisibility::WorldReadable;
            match r.state("m.room.member", user.as_str()) {
                Some(me) if !current => at.min(me.pos),
                _ => at,
            }
        };
        self.state_at(&room, at).await
    }

    /// Fails unless `user` may page through the room's history at all: they
    /// have (or had) a membership, or the room is world-readable.
    pub async fn check_history_access(&self, user: &UserId, room_id: &RoomId) -> Result<()> {
        let room = self.room(room_id).await.map_err(|e| match e {
            Error::NotFound(_) => Error::Forbidden("you are not in this room".into()),
            other => other,
        })?;
        let r = room.read();
        if r.membership(user).is_none() && r.history_visibility() != HistoryVisibility::WorldReadable {
            return Err(Error::Forbidden("you are not in this room".into()));
        }
        Ok(())
    }

    /// The room's state right after the event at `at`: from memory when the
    /// state has not changed since, else from the store.
    pub async fn state_at(&self, room: &Room, at: StreamPos) -> Result<Vec<StoredEvent>> {
        let room_id = {
            let r = room.read();
            if r.state_changed_at <= at {
                return Ok(r.state_entries().map(StateEntry::to_stored).collect());
            }
            r.record.room_id.clone()
        };
        Ok(self.store.state_at(&room_id, at).await?)
    }

    /// What `user` may see of the room's history: their memberships over
    /// time and the room's history visibility over time.
    pub async fn history_view(&self, user: &UserId, room_id: &RoomId) -> Result<HistoryView> {
        let room = self.room(room_id).await?;
        let visibility = room.read().visibility_changes.clone();
        let memberships = self
            .store
            .membership_history(room_id, user)
            .await?
            .into_iter()
            .map(|m| (m.pos, m.membership))
            .collect();
        Ok(HistoryView {
            user: user.to_owned(),
            memberships,
            visibility,
        })
    }

    /// Which of `events` the user may see, by the history visibility and
    /// their membership at each, with that membership (`unsigned.membership`).
    pub async fn filter_visible(&self, user: &UserId, room_id: &RoomId, events: Vec<StoredEvent>) -> Result<Vec<VisibleEvent>> {
        let view = self.history_view(user, room_id).await?;
        Ok(events
            .into_iter()
            .filter_map(|event| view.check(&event).map(|membership| VisibleEvent { event, membership }))
            .collect())
    }

    /// `/messages`: up to `limit` events the user may see that `filter`
    /// keeps, from `from` in `dir` (not past `to`), and the token to go
    /// on from: `None` once no further events are available (the edge of
    /// the room, or of what the user may see).
    #[allow(clippy::too_many_arguments)]
    pub async fn messages(
        &self,
        user: &UserId,
        room_id: &RoomId,
        from: StreamPos,
        to: Option<StreamPos>,
        dir: Dir,
        limit: usize,
        filter: TimelineFilter<'_>,
    ) -> Result<(Vec<VisibleEvent>, Option<StreamPos>)> {
        self.check_history_access(user, room_id).await?;
        let view = self.history_view(user, room_id).await?;
        let limit = limit.clamp(1, 1000);
        // Filters and history visibility may hide events: read on until
        // `limit` are found, the edge is reached, or enough was read for
        // one request (then the client goes on from where this stopped).
        let batch = (limit + 1).max(50);
        let mut scanned = 0;
        let mut cursor = from;
        let mut out = Vec::with_capacity(limit);
        loop {
            let range = match dir {
                Dir::Backward => EventRange {
                    room_id,
                    after: to.unwrap_or(0),
                    until: cursor,
                    direction: Direction::Backward,
                    limit: batch,
                    kinds: filter.exact_types(),
                },
                Dir::Forward => EventRange {
                    room_id,
                    after: cursor,
                    until: to.unwrap_or(u64::MAX),
                    direction: Direction::Forward,
                    limit: batch,
                    kinds: filter.exact_types(),
                },
            };
            let page = self.store.room_events(range).await?;
            let at_edge = page.len() < batch;
            scanned += page.len();
            for event in page {
                // The token after an event: backwards it stands just before it.
                let after_this = match dir {
                    Dir::Backward => event.pos - 1,
                    Dir::Forward => event.pos,
                };
                if out.len() == limit {
                    // One more exists beyond the page: the client may go on.
                    return Ok((out, Some(cursor)));
                }
                cursor = after_this;
                if !filter.keeps(&event) {
                    continue;
                }
                if let Some(membership) = view.check(&event) {
                    out.push(VisibleEvent { event, membership });
                }
            }
            if at_edge {
                return Ok((out, None));
            }
            if scanned >= MESSAGES_SCAN_LIMIT {
                return Ok((out, Some(cursor)));
            }
        }
    }

    pub async fn event(&self, user: &UserId, room_id: &RoomId, event_id: &EventId) -> Result<VisibleEvent> {
        self.check_history_access(user, room_id).await?;
        let not_found = || Error::NotFound("event not found".into());
        let ev = self
            .store
            .event(event_id)
            .await?
            .filter(|e| e.pdu.room_id == room_id)
            .ok_or_else(not_found)?;
        self.filter_visible(user, room_id, vec![ev]).await?.pop().ok_or_else(not_found)
    }

    pub async fn relations(
        &self,
        user: &UserId,
        room_id: &RoomId,
        event_id: &EventId,
        rel_type: Option<&str>,
        limit: usize,
    ) -> Result<Vec<VisibleEvent>> {
        self.event(user, room_id, event_id).await?;
        let rel = self.store.relations(room_id, event_id, rel_type, limit.clamp(1, 1000)).await?;
        self.filter_visible(user, room_id, rel).await
    }

    /// Threads in the room the user can see: each root with its reply count,
    /// latest reply and whether the user took part, most recently active first.
    pub async fn threads(&self, user: &UserId, room_id: &RoomId, participated_only: bool, limit: usize) -> Result<Vec<ThreadSummary>> {
        self.check_can_read(user, room_id).await?;
        let mut out = vec![];
        for (root_id, _) in self.store.thread_roots(room_id, limit.clamp(1, 1000)).await? {
            let Some(root) = self.store.event(&root_id).await? else { continue };
            let replies = self.store.relations(room_id, &root_id, Some("m.thread"), 10_000).await?;
            let replies = self.filter_visible(user, room_id, replies).await?;
            let roots = self.filter_visible(user, room_id, vec![root]).await?;
            let (Some(root), Some(latest)) = (roots.into_iter().next(), replies.last().cloned()) else {
                continue;
            };
            let participated = root.event.pdu.sender == user || replies.iter().any(|r| r.event.pdu.sender == user);
            if participated_only && !participated {
                continue;
            }
            out.push(ThreadSummary {
                root,
                latest,
                count: replies.len(),
                participated,
            });
        }
        Ok(out)
    }

    /// Whether `a` and `b` are both joined to some room.
    pub async fn share_a_room(&self, a: &UserId, b: &UserId) -> Result<bool> {
        for m in self.store.memberships(a).await? {
            if m.membership == Membership::Join && self.room(&m.room_id).await?.read().membership(b) == Some(Membership::Join) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Forgets a room the user has left: it no longer appears in their sync.
    pub async fn forget(&self, user: &UserId, room_id: &RoomId) -> Result<()> {
        let change = self.changes.memberships.begin(&user.to_owned());
        self.store.forget_room(user, room_id).await?;
        change.finish(self.store.current_position());
        Ok(())
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty_room() -> Room {
        Room::new(RoomCache::empty(
            RoomRecord {
                room_id: ruma::owned_room_id!("!r:x"),
                version: RoomVersionId::V12,
                creator: ruma::owned_user_id!("@a:x"),
                is_public: false,
            },
            RoomVersionId::V12.rules().expect("known version"),
        ))
    }

    #[tokio::test]
    async fn a_settled_read_waits_for_appends_already_started_and_a_plain_read_does_not() {
        let room = Arc::new(empty_room());
        let in_progress = room.begin_append();
        assert_eq!(room.read().last_pos, 0, "a plain read does not wait");
        let reader = {
            let room = room.clone();
            tokio::spawn(async move { room.settled(Duration::ZERO).await.last_pos })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!reader.is_finished(), "the settled read waits for the append");
        room.cache.write().expect("lock").last_pos = 7;
        drop(in_progress);
        let seen = tokio::time::timeout(Duration::from_secs(5), reader)
            .await
            .expect("woken")
            .expect("joined");
        assert_eq!(seen, 7, "and then sees what the append applied");
    }

    #[tokio::test]
    async fn a_settled_read_lingers_through_a_burst_but_not_past_its_limit() {
        let room = Arc::new(empty_room());
        let first = room.begin_append();
        let reader = {
            let room = room.clone();
            tokio::spawn(async move { room.settled(Duration::from_secs(5)).await.last_pos })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let second = room.begin_append();
        drop(first);
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!reader.is_finished(), "the burst goes on, so the reader lingers");
        drop(second);
        tokio::time::timeout(Duration::from_secs(1), reader)
            .await
            .expect("answered when the room is quiet")
            .expect("joined");

        // A room that never goes quiet is answered at the limit.
        let endless = room.begin_append();
        let started = std::time::Instant::now();
        let reader = {
            let room = room.clone();
            tokio::spawn(async move { room.settled(Duration::from_millis(100)).await.last_pos })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        let next = room.begin_append();
        drop(endless);
        tokio::time::timeout(Duration::from_secs(2), reader)
            .await
            .expect("answered at the limit")
            .expect("joined");
        assert!(started.elapsed() >= Duration::from_millis(100));
        drop(next);
    }

    #[tokio::test]
    async fn a_failed_append_still_releases_settled_readers() {
        let room = empty_room();
        drop(room.begin_append());
        let read = tokio::time::timeout(Duration::from_secs(1), room.settled(Duration::from_secs(10))).await;
        assert!(read.is_ok());
    }

    #[test]
    fn the_recent_window_answers_only_for_positions_it_covers() {
        let room = empty_room();
        let mut r = room.cache.write().expect("lock");
        let all = |_: &StoredEvent| true;
        assert!(
            r.recent_matching(0, 10, 5, all)
                .is_some_and(|(events, more)| events.is_empty() && !more)
        );
        r.recent_after = 5;
        assert!(
            r.recent_matching(4, 10, 5, all).is_none(),
            "events at or before 5 are not in memory"
        );
        assert!(r.recent_matching(5, 10, 5, all).is_some());
    }
}
