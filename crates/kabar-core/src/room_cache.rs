//! The rooms this process keeps in memory: each room's current state, member
//! counts and newest events, loaded from the store on first use and advanced
//! only by the applier (see `applier.rs`), for this process's writes and
//! every other writer's alike.
//!
//! Readers (a sync, a membership check) never wait for a writer: they take a
//! short read lock on the state as applied so far.

use std::{
    borrow::Cow,
    collections::{BTreeMap, HashMap, VecDeque},
    sync::{
        Arc, Mutex, RwLock, RwLockReadGuard,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
};

use kabar_domain::{
    NewEvent, Pdu, StateKey, auth_event_keys, authorize,
    channel::{ChannelRoles, MemberVisibility, is_channel_create},
    client_event::client_event_prefix,
    event::{EventSigner, raw},
    membership::{HistoryVisibility, Membership},
};
use kabar_store::{Direction, EventRange, PrevState, RoomRecord, Store, StoredEvent, StreamPos};
use ruma::{
    EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, UserId,
    events::{
        TimelineEventType,
        room::power_levels::{RoomPowerLevels, RoomPowerLevelsEventContent, RoomPowerLevelsSource},
    },
    room_version_rules::RoomVersionRules,
};
use serde_json::{Value, value::RawValue};
use tokio::sync::{Mutex as AsyncMutex, MutexGuard as AsyncMutexGuard, watch};

use crate::error::{Error, Result};

/// How many of a room's newest events stay in memory. A sync that is at most
/// this far behind reads its timeline (and counts unread messages) without the
/// store; one that is further behind goes to the store.
const RECENT_EVENTS: usize = 64;
/// How many of a room's newest events loading it looks through for the
/// newest that may count as unread.
const UNREAD_CANDIDATE_SCAN: usize = 2_000;

/// An event with its client form serialized once (see
/// [`client_event_prefix`]), so that a sync waking thousands of members
/// serializes each new event once, not once per member.
#[derive(Debug)]
pub struct TimelineEvent {
    /// Shared with the stream update it came from: the applier stores it
    /// without copying.
    pub event: Arc<StoredEvent>,
    /// Made when first asked for: the applier stores every event, and only
    /// events some sync serves need their client form.
    prefix: std::sync::OnceLock<String>,
    /// The client form flattened for push rules, made when first asked
    /// for and shared by every member who evaluates the event.
    flat: std::sync::OnceLock<ruma::push::FlattenedJson>,
    /// What the server-default push rules make of the event for members it
    /// does not name, in the room as it was when worked out
    /// (`push::notification`): one evaluation for all such members.
    default_push: std::sync::Mutex<Option<crate::push::DefaultOutcome>>,
}

impl TimelineEvent {
    pub fn new(event: StoredEvent) -> Self {
        Self::shared(Arc::new(event))
    }

    /// A state entry as served, taken over when it was made for the caller
    /// (a member's, parsed from its slot), else copied.
    pub fn from_state(entry: Cow<'_, StateEntry>) -> Self {
        Self::new(entry.into_owned().into_stored())
    }

    pub fn shared(event: Arc<StoredEvent>) -> Self {
        Self {
            event,
            prefix: std::sync::OnceLock::new(),
            flat: std::sync::OnceLock::new(),
            default_push: std::sync::Mutex::new(None),
        }
    }

    /// The client form without its closing brace (see [`client_event_prefix`]).
    pub fn client_prefix(&self) -> &str {
        self.prefix.get_or_init(|| client_event_prefix(&self.event.pdu))
    }

    /// The event flattened for push conditions.
    pub fn flattened(&self) -> &ruma::push::FlattenedJson {
        self.flat
            .get_or_init(|| crate::push::flatten(&format!("{}}}", self.client_prefix())))
    }

    /// The remembered outcome of the server-default rules (see
    /// `push::notification`).
    pub(crate) fn default_push(&self) -> std::sync::MutexGuard<'_, Option<crate::push::DefaultOutcome>> {
        self.default_push.lock().expect("default push lock")
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
    pub fn into_stored(self) -> StoredEvent {
        StoredEvent {
            pos: self.pos,
            pdu: self.pdu,
            txn: None,
            redacted_by: None,
            prev: None,
        }
    }

    /// What a state event replacing this one shows as its previous state.
    pub(crate) fn as_prev(&self) -> PrevState {
        PrevState::of(&self.pdu)
    }
}

/// A member's current `m.room.member` event, kept compact: what clients
/// are shown of it (membership, content, sender, time, event id) and where
/// it was set. The signed event (hashes, signatures, auth and prev events:
/// two thirds of its JSON) stays in the store; the room cache serves a
/// member event in its client form, with `Pdu::json` holding that form too
/// (see [`MemberSlot::entry`]). A supergroup's state is mostly these, so
/// a member costs about 400 bytes here (see ARCHITECTURE.md, "Memory per
/// member and per room").
#[derive(Debug, Clone)]
pub struct MemberSlot {
    pub pos: StreamPos,
    pub membership: Option<Membership>,
    event_id: OwnedEventId,
    /// The content as parsed when the event was built or read, shared
    /// with that parse rather than copied.
    content: Arc<RawValue>,
    /// Who sent it, when not the member themselves (an invite, a kick, a ban).
    other_sender: Option<OwnedUserId>,
    origin_server_ts: MilliSecondsSinceUnixEpoch,
}

impl MemberSlot {
    fn of(pdu: &Pdu, pos: StreamPos) -> Self {
        Self {
            pos,
            membership: Membership::from_content(pdu.content.get()),
            event_id: pdu.event_id.clone(),
            content: pdu.content.clone(),
            other_sender: (pdu.state_key.as_deref() != Some(pdu.sender.as_str())).then(|| pdu.sender.clone()),
            origin_server_ts: pdu.origin_server_ts,
        }
    }

    pub fn event_id(&self) -> &EventId {
        &self.event_id
    }

    pub fn content(&self) -> &RawValue {
        &self.content
    }

    /// The event of member `user` as clients and the authorization rules
    /// read it. Its server-only fields (auth and prev events, depth) are
    /// empty, and `json` is its client form, not the signed PDU: whatever
    /// needs the signed event reads it from the store.
    pub fn entry(&self, room_id: &RoomId, user: &str) -> Option<StateEntry> {
        let sender = match &self.other_sender {
            Some(sender) => sender.clone(),
            None => OwnedUserId::try_from(user).ok()?,
        };
        let mut pdu = Pdu {
            event_id: self.event_id.clone(),
            room_id: room_id.to_owned(),
            sender,
            origin_server_ts: self.origin_server_ts,
            kind: TimelineEventType::RoomMember,
            content: self.content.clone(),
            state_key: Some(user.to_owned()),
            prev_events: vec![],
            auth_events: vec![],
            redacts: None,
            depth: 0,
            has_room_id: true,
            json: Arc::from(""),
        };
        pdu.json = Arc::from(client_event_prefix(&pdu) + "}");
        Some(StateEntry { pdu, pos: self.pos })
    }
}

/// A key of [`RoomCache::changed`]: a member's by their user id alone, so
/// the index costs a member one small string.
#[derive(Debug, Clone)]
enum ChangedKey {
    Member(Box<str>),
    Other(Box<StateKey>),
}

/// How many of a room's latest senders keep their member event parsed and
/// serialized (see [`RoomCache::member_event`]).
const HOT_MEMBERS: usize = 256;

/// Events whose arrival moves a room up a room list (MSC4186's default
/// set for sliding sync's `bump_stamp`).
pub const BUMP_TYPES: &[&str] = &[
    "m.room.create",
    "m.room.message",
    "m.room.encrypted",
    "m.sticker",
    "m.call.invite",
    "m.poll.start",
    "m.beacon_info",
];

/// Where a backwards read of a room's events up to `until` that passes
/// over some types stops: just before the room's `scan`-th newest event
/// at or before `until`, or `None` when it has fewer. The store skips
/// types in its index, but still walks the skipped events one by one.
pub(crate) async fn scan_floor(store: &dyn Store, room_id: &RoomId, until: StreamPos, scan: usize) -> Result<Option<StreamPos>> {
    Ok(store
        .room_position(room_id, until, Direction::Backward, scan)
        .await?
        .map(|oldest| oldest - 1))
}

/// A room's cached current state and head.
pub struct RoomCache {
    pub record: RoomRecord,
    rules: RoomVersionRules,
    /// The current state but the members'.
    state: BTreeMap<StateKey, StateEntry>,
    /// The current `m.room.member` events, by user id.
    members: BTreeMap<Box<str>, MemberSlot>,
    /// The member events of the room's latest senders, parsed and with
    /// their client form made once: every lazy-loading member woken by a
    /// message is sent its sender's member event, which would otherwise be
    /// parsed again for each of them.
    hot_members: HashMap<Box<str>, (StreamPos, Arc<TimelineEvent>)>,
    /// Each state entry by the position it was set at: what changed
    /// between two positions is a range of this, never a walk of the whole
    /// state (a supergroup's state is mostly its members).
    changed: BTreeMap<StreamPos, ChangedKey>,
    head: Vec<OwnedEventId>,
    depth: u64,
    /// Stream position of the room's newest event.
    pub last_pos: StreamPos,
    /// Stream position of its newest event of a [`BUMP_TYPES`] type: where a
    /// room list places it (0: none, the list falls back to `last_pos`).
    pub last_bump: StreamPos,
    /// No event after this position may count as unread: only member
    /// events (which never do, see `push::may_count`) came after it. A
    /// channel subscriber's first sync after joining has nothing to count
    /// behind a million joins, and learns so without reading them.
    unread_candidates_upto: StreamPos,
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
    pub(crate) state_changed_at: StreamPos,
    /// Every change of `m.room.history_visibility`, oldest first (a handful
    /// per room), so deciding what a user may see needs no store read for it.
    pub(crate) visibility_changes: Vec<(StreamPos, HistoryVisibility)>,
    /// The power levels as push rules read them, parsed when first asked
    /// for after each change: every member's unread count needs them.
    push_power_levels: std::sync::OnceLock<Arc<ruma::push::PushConditionPowerLevelsCtx>>,
    /// In a channel, who may post (and so sees every member) and what
    /// subscribers may send, worked out when first asked for after each
    /// change of the power levels; `None` inside for a room that is not a
    /// channel.
    channel_roles: std::sync::OnceLock<Option<Arc<ChannelRoles>>>,
}

impl RoomCache {
    /// A room with no events yet: the start of `create_room`'s chain.
    pub(crate) fn empty(record: RoomRecord, rules: RoomVersionRules) -> Self {
        Self {
            record,
            rules,
            state: BTreeMap::new(),
            members: BTreeMap::new(),
            hot_members: HashMap::new(),
            changed: BTreeMap::new(),
            head: vec![],
            depth: 0,
            last_pos: 0,
            last_bump: 0,
            unread_candidates_upto: 0,
            member_counts: HashMap::new(),
            recent: VecDeque::new(),
            recent_after: 0,
            encrypted_at: None,
            state_changed_at: 0,
            visibility_changes: vec![],
            push_power_levels: std::sync::OnceLock::new(),
            channel_roles: std::sync::OnceLock::new(),
        }
    }

    /// The current state event of a type and key; a member's is parsed
    /// from its compact slot (see [`MemberSlot`]).
    pub fn state(&self, kind: &str, key: &str) -> Option<Cow<'_, StateEntry>> {
        if kind == "m.room.member" {
            return self.member(key)?.entry(&self.record.room_id, key).map(Cow::Owned);
        }
        self.state.get(&(kind.to_owned(), key.to_owned())).map(Cow::Borrowed)
    }

    /// A current state event of a type other than `m.room.member`.
    fn other_state(&self, kind: &str, key: &str) -> Option<&StateEntry> {
        debug_assert_ne!(kind, "m.room.member", "members are read through member()");
        self.state.get(&(kind.to_owned(), key.to_owned()))
    }

    /// Every current state entry, the members' parsed one by one.
    pub fn state_entries(&self) -> impl Iterator<Item = Cow<'_, StateEntry>> {
        self.state.values().map(Cow::Borrowed).chain(
            self.members
                .iter()
                .filter_map(|(user, slot)| slot.entry(&self.record.room_id, user))
                .map(Cow::Owned),
        )
    }

    /// Every state entry but the members': what a lazy-loading client's
    /// full state holds before the members it is sent.
    pub fn state_entries_but_members(&self) -> impl Iterator<Item = &StateEntry> {
        self.state.values()
    }

    pub fn state_len(&self) -> usize {
        self.state.len() + self.members.len()
    }

    /// A member's current member event, compact.
    pub fn member(&self, user_id: &str) -> Option<&MemberSlot> {
        self.members.get(user_id)
    }

    /// A member's current member event as served: from the latest
    /// senders' (made once for everyone who is sent it), else parsed.
    pub fn member_event(&self, user_id: &str) -> Option<Arc<TimelineEvent>> {
        if let Some((_, event)) = self.hot_members.get(user_id) {
            return Some(event.clone());
        }
        let entry = self.member(user_id)?.entry(&self.record.room_id, user_id)?;
        Some(Arc::new(TimelineEvent::new(entry.into_stored())))
    }

    pub fn membership(&self, user_id: &UserId) -> Option<Membership> {
        self.member(user_id.as_str()).and_then(|slot| slot.membership)
    }

    pub fn history_visibility(&self) -> HistoryVisibility {
        HistoryVisibility::from_content(self.other_state("m.room.history_visibility", "").map(|e| e.pdu.content.get()))
    }

    pub fn members(&self, membership: Membership) -> impl Iterator<Item = &str> {
        self.members_after(None)
            .filter(move |(_, slot)| slot.membership == Some(membership))
            .map(|(user, _)| user)
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
            for (_, key) in self.changed_between(after, until) {
                if let ChangedKey::Member(user) = key
                    && let Some(m) = self.member(user).and_then(|slot| slot.membership)
                    && let Ok(user) = OwnedUserId::try_from(&**user)
                {
                    changes.insert(user, m);
                }
            }
        }
        changes
    }

    fn creators(&self) -> Vec<OwnedUserId> {
        let Some(create) = self.other_state("m.room.create", "") else {
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
    /// The room's newest applied event, which a new event is built on.
    pub(crate) fn base(&self) -> Option<Base> {
        self.head.first().map(|id| Base {
            event_id: id.clone(),
            depth: self.depth,
        })
    }

    /// Builds an event on `on` (the room's newest event; `None` for the
    /// first events of a new room), with its auth events from the cached
    /// state with `pending` member events over it (the member events of
    /// this process's appends in flight that `on` comes after), and checks
    /// it against the authorization rules.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn build_authorized(
        &self,
        pending: &PendingMembers,
        signer: &EventSigner,
        room_id: Option<&RoomId>,
        sender: &UserId,
        event: NewEvent,
        ts: MilliSecondsSinceUnixEpoch,
        on: Option<&Base>,
    ) -> Result<Pdu> {
        let auth_rules = &self.rules.authorization;
        let content = raw(&event.content);
        let keys = auth_event_keys(auth_rules, &event.kind, sender, event.state_key.as_deref(), &content)?;
        // The member events the rules read (the sender's, the target's, an
        // authorising member's: all among the auth event keys, and the
        // sender's and target's in case a shape leaves them out), unless
        // one is in flight: a latest sender's as the room keeps it, any
        // other parsed from its slot once.
        let target = event.state_key.as_deref().filter(|_| event.kind == "m.room.member");
        let applied_members: HashMap<String, Arc<TimelineEvent>> = keys
            .iter()
            .filter(|(kind, _)| kind == "m.room.member")
            .map(|(_, key)| key.as_str())
            .chain([sender.as_str()])
            .chain(target)
            .filter(|user| pending.get(user).is_none())
            .filter_map(|user| Some((user.to_owned(), self.member_event(user)?)))
            .collect();
        let state = |kind: &str, key: &str| -> Option<&Pdu> {
            if kind == "m.room.member" {
                return pending.get(key).or_else(|| applied_members.get(key).map(|e| &e.event.pdu));
            }
            self.other_state(kind, key).map(|e| &e.pdu)
        };
        let mut auth_events: Vec<&Pdu> = keys.iter().filter_map(|(kind, key)| state(kind, key)).collect();
        // v12 names the create event only through the room id; older versions list it.
        let create = self.other_state("m.room.create", "").map(|e| &e.pdu);
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
            on.map(|b| vec![b.event_id.clone()]).unwrap_or_default(),
            auth_events.iter().map(|p| p.event_id.clone()).collect(),
            on.map_or(0, |b| b.depth) + 1,
            ts,
        )?;
        let by_id: HashMap<&EventId, &Pdu> = auth_events.iter().copied().chain(create).map(|p| (&*p.event_id, p)).collect();
        authorize(auth_rules, &pdu, state, |id| by_id.get(id).copied())?;
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

    /// The current state entries set in `(after, until]`, read from the
    /// by-position index (a member's parsed from its slot); none at all
    /// when the state has not changed since `after`.
    pub fn state_changed_between(&self, after: StreamPos, until: StreamPos) -> Vec<Cow<'_, StateEntry>> {
        if self.state_changed_at <= after {
            return vec![];
        }
        self.changed_between(after, until)
            .filter_map(|(_, key)| match key {
                ChangedKey::Member(user) => self.member(user)?.entry(&self.record.room_id, user).map(Cow::Owned),
                ChangedKey::Other(key) => self.state.get(&**key).map(Cow::Borrowed),
            })
            .collect()
    }

    /// The keys of the current state set in `(after, until]`, by position.
    fn changed_between(&self, after: StreamPos, until: StreamPos) -> impl Iterator<Item = (&StreamPos, &ChangedKey)> {
        (after < until).then(|| self.changed.range(after + 1..=until)).into_iter().flatten()
    }

    /// Up to five members to name a room by when it has no name: joined and
    /// invited members other than `user`, in the order they arrived (or, if
    /// there are none, those who left). A big room is not sorted.
    pub fn heroes(&self, user: &UserId) -> Vec<OwnedUserId> {
        const HEROES: usize = 5;
        let mut present: Vec<(StreamPos, &str)> = vec![];
        let mut gone: Vec<(StreamPos, &str)> = vec![];
        let big = self.member_count(Membership::Join) + self.member_count(Membership::Invite) > 1000;
        for (key, slot) in self.members_after(None) {
            if key == user.as_str() {
                continue;
            }
            match slot.membership {
                Some(Membership::Join | Membership::Invite) => present.push((slot.pos, key)),
                Some(_) if present.is_empty() && gone.len() < HEROES => gone.push((slot.pos, key)),
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

    /// The room's `m.room.member` entries after the user id `after` (from
    /// the first with none), in user id order: a page of members costs the
    /// page, not the room.
    pub fn members_after(&self, after: Option<&str>) -> impl Iterator<Item = (&str, &MemberSlot)> {
        use std::ops::Bound;
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.members
            .range::<str, _>((start, Bound::Unbounded))
            .map(|(user, slot)| (&**user, slot))
    }

    fn remember(&mut self, event: Arc<StoredEvent>) {
        if event.pdu.kind == ruma::events::TimelineEventType::RoomRedaction {
            // The redacted event may be in the window; rather than rewrite it,
            // start the window afresh after the redaction.
            self.recent.clear();
            self.recent_after = event.pos;
            return;
        }
        self.recent.push_back(Arc::new(TimelineEvent::shared(event)));
        while self.recent.len() > RECENT_EVENTS {
            if let Some(old) = self.recent.pop_front() {
                self.recent_after = old.event.pos;
            }
        }
    }

    /// Whether an event after `pos` may count as unread (one that is not
    /// a member event came after it).
    pub fn may_have_unread_after(&self, pos: StreamPos) -> bool {
        self.unread_candidates_upto > pos
    }

    pub fn member_count(&self, membership: Membership) -> usize {
        self.member_counts.get(&membership).copied().unwrap_or(0)
    }

    fn count_members(members: &BTreeMap<Box<str>, MemberSlot>) -> HashMap<Membership, usize> {
        let mut counts = HashMap::new();
        for m in members.values().filter_map(|slot| slot.membership) {
            *counts.entry(m).or_insert(0) += 1;
        }
        counts
    }

    /// Keeps `sender`'s member event parsed and served once for everyone
    /// (see `hot_members`); past the limit, the half who sent least
    /// recently are let go.
    fn note_sender(&mut self, sender: &str, pos: StreamPos) {
        if let Some((last, _)) = self.hot_members.get_mut(sender) {
            *last = pos;
            return;
        }
        let Some(entry) = self.member(sender).and_then(|slot| slot.entry(&self.record.room_id, sender)) else {
            return;
        };
        if self.hot_members.len() >= 2 * HOT_MEMBERS {
            let mut sent: Vec<StreamPos> = self.hot_members.values().map(|(last, _)| *last).collect();
            let (_, cutoff, _) = sent.select_nth_unstable_by(HOT_MEMBERS, |a, b| b.cmp(a));
            let cutoff = *cutoff;
            self.hot_members.retain(|_, (last, _)| *last > cutoff);
        }
        self.hot_members
            .insert(sender.into(), (pos, Arc::new(TimelineEvent::new(entry.into_stored()))));
    }

    /// Makes a stored event the room's new head (and state, for a state
    /// event). Shared caches are advanced only by the applier (through
    /// [`Room::apply_committed`]); room creation uses it on a private cache
    /// to build the room's first events.
    pub(crate) fn apply(&mut self, pdu: &Pdu, pos: StreamPos) {
        if pdu.kind == ruma::events::TimelineEventType::RoomMember
            && let Some(user) = pdu.state_key.as_deref()
        {
            let slot = MemberSlot::of(pdu, pos);
            if let Some(new) = slot.membership {
                *self.member_counts.entry(new).or_insert(0) += 1;
            }
            self.changed.insert(pos, ChangedKey::Member(user.into()));
            if let Some(old) = self.members.insert(user.into(), slot) {
                if let Some(old) = old.membership
                    && let Some(n) = self.member_counts.get_mut(&old)
                {
                    *n = n.saturating_sub(1);
                }
                if old.pos != pos {
                    self.changed.remove(&old.pos);
                }
            }
            if let Some((_, served)) = self.hot_members.get_mut(user) {
                *served = Arc::new(TimelineEvent::new(StateEntry { pdu: pdu.clone(), pos }.into_stored()));
            }
        } else if let Some(key) = pdu.state_key_pair() {
            if pdu.kind == ruma::events::TimelineEventType::RoomEncryption {
                self.encrypted_at = Some(pos);
            }
            if matches!(
                pdu.kind,
                ruma::events::TimelineEventType::RoomPowerLevels | ruma::events::TimelineEventType::RoomCreate
            ) {
                self.push_power_levels = std::sync::OnceLock::new();
                self.channel_roles = std::sync::OnceLock::new();
            }
            if pdu.kind == ruma::events::TimelineEventType::RoomHistoryVisibility && pos > 0 {
                self.visibility_changes
                    .push((pos, HistoryVisibility::from_content(Some(pdu.content.get()))));
            }
            self.changed.insert(pos, ChangedKey::Other(Box::new(key.clone())));
            if let Some(old) = self.state.insert(key, StateEntry { pdu: pdu.clone(), pos })
                && old.pos != pos
            {
                self.changed.remove(&old.pos);
            }
        }
        match pdu.state_key {
            Some(_) => self.state_changed_at = self.state_changed_at.max(pos),
            None => self.note_sender(pdu.sender.as_str(), pos),
        }
        self.head = vec![pdu.event_id.clone()];
        self.depth = pdu.depth;
        self.last_pos = self.last_pos.max(pos);
        if pdu.kind != ruma::events::TimelineEventType::RoomMember {
            self.unread_candidates_upto = self.unread_candidates_upto.max(pos);
        }
        if BUMP_TYPES.contains(&pdu.kind.to_string().as_str()) {
            self.last_bump = self.last_bump.max(pos);
        }
    }

    /// The power levels as push conditions read them (`@room` needs enough power).
    pub fn push_power_levels(&self) -> Arc<ruma::push::PushConditionPowerLevelsCtx> {
        self.push_power_levels.get_or_init(|| Arc::new(self.power_levels().into())).clone()
    }

    /// Whether the room is a broadcast channel (see `kabar_domain::channel`).
    pub fn is_channel(&self) -> bool {
        self.channel_roles().is_some()
    }

    /// Whether each member's receipts are told to that member only (a
    /// channel, or a room too big to share them: `kabar_domain::receipts`).
    pub fn receipts_private(&self) -> bool {
        !kabar_domain::receipts::receipts_shared(self.is_channel(), self.member_count(Membership::Join))
    }

    /// In a channel, what `viewer` may not see of its members; `None` in
    /// other rooms and for the channel's staff.
    pub fn member_visibility(&self, viewer: &UserId) -> Option<MemberVisibility> {
        MemberVisibility::for_viewer(viewer, self.channel_roles()?)
    }

    /// In a channel, who is on its staff and what subscribers may send;
    /// `None` in other rooms.
    pub fn channel_roles(&self) -> Option<Arc<ChannelRoles>> {
        self.channel_roles
            .get_or_init(|| {
                let create = self.other_state("m.room.create", "")?;
                if !is_channel_create(&create.pdu.content_value()) {
                    return None;
                }
                ChannelRoles::from_power_levels(&self.power_levels(), self.creators()).map(Arc::new)
            })
            .clone()
    }

    pub fn power_levels(&self) -> RoomPowerLevels {
        let source = self
            .other_state("m.room.power_levels", "")
            .and_then(|e| serde_json::from_str::<RoomPowerLevelsEventContent>(e.pdu.content.get()).ok())
            .map(RoomPowerLevelsSource::Original)
            .unwrap_or(RoomPowerLevelsSource::None);
        RoomPowerLevels::new(source, &self.rules.authorization, self.creators())
    }
}

/// The event a new event is built on (its `prev_events` and depth).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Base {
    pub(crate) event_id: OwnedEventId,
    pub(crate) depth: u64,
}

/// This process's newest append to a room that is still being committed,
/// when the next event may be built on it (see [`Room::next_base`]).
#[derive(Default)]
struct PipelineTip {
    base: Option<Base>,
    /// Counts the times the tip was dropped because an append in it did
    /// not land: an event built in an older chain cannot drop a newer one.
    chain: u64,
}

/// The member events of this process's appends to a room that are queued
/// and not yet applied, by user: the next event is authorized against the
/// cached state with these over it. Kept in the write turn, so only the
/// writer building the next event reads or changes it.
#[derive(Default)]
pub(crate) struct PendingMembers {
    by_user: HashMap<String, Pdu>,
}

impl PendingMembers {
    pub(crate) fn get(&self, user: &str) -> Option<&Pdu> {
        self.by_user.get(user)
    }

    /// Forgets what the cache holds now (or, with no tip, everything: all
    /// that was built on the tip is applied or did not land).
    fn prune(&mut self, tip_in_flight: bool, cache: &RoomCache) {
        if !tip_in_flight {
            self.by_user.clear();
            return;
        }
        self.by_user
            .retain(|user, pdu| cache.member(user).is_none_or(|applied| applied.event_id() != pdu.event_id));
    }
}

/// A room: its cached state behind a read-write lock, the turn that
/// serializes this process's writers, and the tip of its appends in flight.
///
/// **Pipelined appends.** A writer takes the turn, builds its event on the
/// room's newest event and queues the append (the store commits queued
/// appends in order). An event that changes nothing but a membership
/// (a plain event, or an `m.room.member` event: sends, joins and leaves)
/// gives the turn back as soon as it is queued and becomes the tip: the
/// next writer builds on it while it is being committed, with the cached
/// state and the member events still in flight over it
/// ([`PendingMembers`]). Each append names the event it was built on
/// (`expected_head`), so if one does not land, none built on it does:
/// the store refuses them as `HeadMoved`, and their writers drop the tip
/// and rebuild on the applied head. Any other state event, and a
/// redaction, keeps the turn until it is applied: they change what the
/// authorization rules read (power levels, join rules) or what is shown,
/// and are rare enough that waiting for them costs nothing measurable.
pub struct Room {
    cache: RwLock<RoomCache>,
    /// Held by the one writer of this process building an event for the
    /// room, until it is queued (a plain or member event) or applied (any
    /// other). Writers in other processes are kept off the same head by
    /// the store's `expected_head` check instead.
    writer: AsyncMutex<PendingMembers>,
    tip: Mutex<PipelineTip>,
    /// This process's appends to the room that started and are not yet
    /// applied (or failed): a woken sync lingers while there are some, so a
    /// burst of sends reaches it in one response.
    in_flight: watch::Sender<u32>,
}

/// An append in progress; see [`Room::begin_append`].
pub(crate) struct AppendInFlight<'a> {
    room: &'a Room,
}

impl Drop for AppendInFlight<'_> {
    fn drop(&mut self) {
        self.room.in_flight.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// The right to append to a room; see [`Room::write_turn`].
pub struct WriteTurn<'a> {
    pub(crate) room: &'a Room,
    pending: AsyncMutexGuard<'a, PendingMembers>,
}

impl WriteTurn<'_> {
    /// The member event of `user` as the next event is built: the newest
    /// one in flight, else the applied one.
    pub(crate) fn member_event<'c>(&'c self, cache: &'c RoomCache, user: &str) -> Option<Cow<'c, Pdu>> {
        match self.pending.get(user) {
            Some(pdu) => Some(Cow::Borrowed(pdu)),
            None => Some(Cow::Owned(cache.member(user)?.entry(&cache.record.room_id, user)?.pdu)),
        }
    }

    /// The member events in flight (see [`PendingMembers`]).
    pub(crate) fn pending(&self) -> &PendingMembers {
        &self.pending
    }
}

impl Room {
    fn new(cache: RoomCache) -> Self {
        Self {
            cache: RwLock::new(cache),
            writer: AsyncMutex::new(PendingMembers::default()),
            tip: Mutex::new(PipelineTip::default()),
            in_flight: watch::channel(0).0,
        }
    }

    /// Marks an append as started until the returned guard is dropped (once
    /// it is applied, or failed).
    pub(crate) fn begin_append(&self) -> AppendInFlight<'_> {
        self.in_flight.send_modify(|n| *n += 1);
        AppendInFlight { room: self }
    }

    /// Waits until no append of this process to the room is in flight, or
    /// `deadline` passes. Under a burst of sends that halves the responses
    /// per message a member gets; an idle room answers at once.
    pub async fn quiet(&self, deadline: tokio::time::Instant) {
        if *self.in_flight.borrow() == 0 {
            return;
        }
        let mut rx = self.in_flight.subscribe();
        let _ = tokio::time::timeout_at(deadline, rx.wait_for(|n| *n == 0)).await;
    }

    /// The committed state as applied so far. Never hold it across an await.
    pub fn read(&self) -> RwLockReadGuard<'_, RoomCache> {
        self.cache.read().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Waits for the room's write turn: this process builds one event of a
    /// room at a time.
    pub async fn write_turn(&self) -> WriteTurn<'_> {
        WriteTurn {
            room: self,
            pending: self.writer.lock().await,
        }
    }

    fn tip(&self) -> std::sync::MutexGuard<'_, PipelineTip> {
        self.tip.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// What the next event is built on, in the write turn: the tip of this
    /// process's appends in flight, or else the newest applied event; and
    /// the chain it belongs to. Forgets the member events in flight that
    /// `cache` holds by now.
    pub(crate) fn next_base(&self, turn: &mut WriteTurn<'_>, cache: &RoomCache) -> (Option<Base>, u64) {
        let tip = self.tip();
        turn.pending.prune(tip.base.is_some(), cache);
        (tip.base.clone().or_else(|| cache.base()), tip.chain)
    }

    /// Makes `event` the tip: the next event is built on it (in the turn,
    /// once its append is queued). A member event is authorized against
    /// from then on, until it is applied.
    pub(crate) fn extend_tip(&self, turn: &mut WriteTurn<'_>, event: Base, member: Option<Pdu>) {
        if let Some(pdu) = member
            && let Some(user) = pdu.state_key.clone()
        {
            turn.pending.by_user.insert(user, pdu);
        }
        self.tip().base = Some(event);
    }

    /// After `event` was applied: the applied head has caught up with the
    /// tip if the tip was this event.
    pub(crate) fn applied_tip(&self, event: &EventId) {
        let mut tip = self.tip();
        if tip.base.as_ref().is_some_and(|b| b.event_id == event) {
            tip.base = None;
        }
    }

    /// After an event that changes state was applied (built in the turn,
    /// on the tip if there was one): the applied head is the newest event.
    pub(crate) fn clear_tip(&self, turn: &mut WriteTurn<'_>) {
        turn.pending.by_user.clear();
        self.tip().base = None;
    }

    /// An append of `chain` did not land, so neither will anything built on
    /// it: in the write turn (`held`, or taken again), the next event is
    /// built on the applied head, in a new chain. Returns the turn.
    pub(crate) async fn not_landed<'a>(&'a self, held: Option<WriteTurn<'a>>, chain: u64) -> WriteTurn<'a> {
        let mut turn = match held {
            Some(turn) => turn,
            None => self.write_turn().await,
        };
        let mut tip = self.tip();
        if tip.chain == chain {
            tip.base = None;
            tip.chain += 1;
            turn.pending.by_user.clear();
        }
        drop(tip);
        turn
    }

    /// Applies a committed event; one the cache holds already is skipped.
    /// Only the applier calls it, in stream order. Returns how many state
    /// entries the room gained (one for a new state key, else none).
    fn apply_committed(&self, event: &Arc<StoredEvent>) -> usize {
        let mut r = self.cache.write().unwrap_or_else(|poisoned| poisoned.into_inner());
        if event.pos <= r.last_pos {
            return 0;
        }
        let before = r.state_len();
        r.apply(&event.pdu, event.pos);
        r.remember(event.clone());
        r.state_len() - before
    }

    /// Whether nothing but the cache refers to the room and no append of
    /// this process to it is in flight: it can be dropped and read again
    /// from the store when next used.
    fn idle(self: &Arc<Self>) -> bool {
        Arc::strong_count(self) == 1 && *self.in_flight.borrow() == 0
    }
}

/// How many state entries (a big room's are mostly its members) the loaded
/// rooms of a process may hold before the least recently used idle rooms
/// are dropped. A room in use is never dropped, however big.
pub const DEFAULT_CACHED_STATE_ENTRIES: usize = 2_000_000;

/// A room's place in [`RoomCaches`]: loaded, or being loaded while events
/// keep committing.
enum Slot {
    /// Events the applier saw while the room was being read from the store.
    Loading(Vec<Arc<StoredEvent>>),
    Loaded(Arc<Room>),
}

struct RoomSlot {
    state: Mutex<Slot>,
    /// One loader at a time.
    load: AsyncMutex<()>,
    /// When the room was last asked for, on the caches' use counter.
    last_used: AtomicU64,
}

/// The rooms this process keeps in memory. Rooms are loaded from the store on
/// first use and from then on advanced only by the applier, whoever wrote
/// the event. Their state entries are counted; past the budget, loading a
/// room drops the least recently used rooms that nobody is using (a sync
/// or a send holding the room keeps it), which are read again
/// from the store when next asked for.
pub struct RoomCaches {
    store: Arc<dyn Store>,
    rooms: Mutex<HashMap<OwnedRoomId, Arc<RoomSlot>>>,
    /// Counts uses, to order rooms by their last.
    uses: AtomicU64,
    /// State entries in the loaded rooms (approximately: rooms being
    /// loaded are counted once loaded).
    entries: AtomicUsize,
    budget: AtomicUsize,
    evicted: AtomicU64,
}

/// State entries read from the store at a time when a room loads (a few
/// in unit tests, so that every room they load takes several pages).
#[cfg(not(test))]
const STATE_PAGE: usize = 5_000;
#[cfg(test)]
const STATE_PAGE: usize = 3;

impl RoomCaches {
    pub fn new(store: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Self {
            store,
            rooms: Mutex::new(HashMap::new()),
            uses: AtomicU64::new(0),
            entries: AtomicUsize::new(0),
            budget: AtomicUsize::new(DEFAULT_CACHED_STATE_ENTRIES),
            evicted: AtomicU64::new(0),
        })
    }

    /// Sets how many state entries the loaded rooms may hold (see
    /// [`RoomCaches`]); the next load enforces it.
    pub fn set_budget(&self, state_entries: usize) {
        self.budget.store(state_entries, Ordering::Relaxed);
    }

    /// Rooms loaded, state entries they hold, rooms dropped so far.
    pub fn usage(&self) -> (usize, usize, u64) {
        let loaded = self.rooms.lock().expect("rooms lock").len();
        (loaded, self.entries.load(Ordering::Relaxed), self.evicted.load(Ordering::Relaxed))
    }

    /// Drops the least recently used idle rooms (never `keep`) until the
    /// loaded rooms' state entries fit the budget.
    fn evict_over_budget(&self, keep: &RoomId) {
        let budget = self.budget.load(Ordering::Relaxed);
        if self.entries.load(Ordering::Relaxed) <= budget {
            return;
        }
        let mut rooms = self.rooms.lock().expect("rooms lock");
        let mut candidates: Vec<(u64, OwnedRoomId)> = rooms
            .iter()
            .filter(|(id, _)| id.as_str() != keep.as_str())
            .map(|(id, slot)| (slot.last_used.load(Ordering::Relaxed), id.clone()))
            .collect();
        candidates.sort_unstable();
        for (_, id) in candidates {
            if self.entries.load(Ordering::Relaxed) <= budget {
                break;
            }
            let Some(slot) = rooms.get(&id) else { continue };
            // Under the rooms lock nobody can start using the room: every
            // use clones the slot from the map first.
            if Arc::strong_count(slot) > 1 {
                continue;
            }
            let size = match &*slot.state.lock().expect("room slot lock") {
                Slot::Loaded(room) if room.idle() => room.read().state_len(),
                _ => continue,
            };
            rooms.remove(&id);
            self.entries
                .fetch_sub(size.min(self.entries.load(Ordering::Relaxed)), Ordering::Relaxed);
            self.evicted.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// For an event in a loaded channel that only the staff and one member
    /// may see (`ChannelRoles::private_to`): the staff, and that member.
    /// `None` when everyone in the room may see it.
    pub fn private_news(&self, pdu: &kabar_domain::Pdu) -> Option<(Arc<ChannelRoles>, OwnedUserId)> {
        let roles = self.loaded(&pdu.room_id)?.read().channel_roles()?;
        let member = OwnedUserId::try_from(roles.private_to(pdu)?).ok()?;
        Some((roles, member))
    }

    /// Whether `room_id` is loaded and tells each member's receipts to that
    /// member only (see [`RoomCache::receipts_private`]).
    pub fn loaded_with_private_receipts(&self, room_id: &RoomId) -> bool {
        self.loaded(room_id).is_some_and(|room| room.read().receipts_private())
    }

    /// The room's cache if it is loaded.
    pub fn loaded(&self, room_id: &RoomId) -> Option<Arc<Room>> {
        let slot = self.rooms.lock().expect("rooms lock").get(room_id)?.clone();
        match &*slot.state.lock().expect("room slot lock") {
            Slot::Loaded(room) => Some(room.clone()),
            _ => None,
        }
    }

    /// The room's cache, loading it from the store on first use.
    pub async fn get(&self, room_id: &RoomId) -> Result<Arc<Room>> {
        let slot = {
            let mut rooms = self.rooms.lock().expect("rooms lock");
            match rooms.get(room_id) {
                Some(slot) => slot.clone(),
                None => {
                    let slot = Arc::new(RoomSlot {
                        state: Mutex::new(Slot::Loading(vec![])),
                        load: AsyncMutex::new(()),
                        last_used: AtomicU64::new(0),
                    });
                    rooms.insert(room_id.to_owned(), slot.clone());
                    slot
                }
            }
        };
        slot.last_used.store(self.uses.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        if let Slot::Loaded(room) = &*slot.state.lock().expect("room slot lock") {
            return Ok(room.clone());
        }
        let _loading = slot.load.lock().await;
        if let Slot::Loaded(room) = &*slot.state.lock().expect("room slot lock") {
            return Ok(room.clone());
        }
        let cache = match self.load(room_id).await {
            Ok(cache) => cache,
            Err(e) => {
                // Nothing waits on a room that could not be read; the next
                // use starts over.
                self.rooms.lock().expect("rooms lock").remove(room_id);
                return Err(e);
            }
        };
        let room = Arc::new(Room::new(cache));
        let mut state = slot.state.lock().expect("room slot lock");
        if let Slot::Loading(seen) = &*state {
            // Events that committed while the store was read: those newer
            // than what the read saw are applied now.
            for event in seen {
                room.apply_committed(event);
            }
        }
        self.entries.fetch_add(room.read().state_len(), Ordering::Relaxed);
        *state = Slot::Loaded(room.clone());
        drop(state);
        drop(_loading);
        drop(slot);
        self.evict_over_budget(room_id);
        Ok(room)
    }

    /// Reads a room's cache from the store: its newest event, and the state
    /// and history-visibility changes up to exactly that event, so that the
    /// events committed after it can be applied on top.
    async fn load(&self, room_id: &RoomId) -> Result<RoomCache> {
        let record = self
            .store
            .room(room_id)
            .await?
            .ok_or_else(|| Error::NotFound("unknown room".into()))?;
        let rules = record
            .version
            .rules()
            .ok_or_else(|| Error::Internal(format!("stored room has unknown version {}", record.version)))?;
        let last = self
            .store
            .room_events(EventRange {
                room_id,
                after: 0,
                until: u64::MAX,
                direction: Direction::Backward,
                limit: 1,
                kinds: None,
                not_kinds: &[],
            })
            .await?;
        let (head, depth, last_pos) = match last.first() {
            Some(e) => (vec![e.pdu.event_id.clone()], e.pdu.depth, e.pos),
            None => (vec![], 0, 0),
        };
        let mut state = BTreeMap::new();
        let mut members = BTreeMap::new();
        let mut changed = BTreeMap::new();
        let mut state_changed_at = 0;
        // A page at a time: a million members read at once were a million
        // full events in memory beside the slots made of them (2.8 GB at
        // the peak of loading such a channel).
        let mut after: Option<(String, String)> = None;
        loop {
            let page = self
                .store
                .state_at_page(room_id, last_pos, after.as_ref().map(|(k, s)| (k.as_str(), s.as_str())), STATE_PAGE)
                .await?;
            let full = page.len() == STATE_PAGE;
            after = page.last().and_then(|e| Some((e.pdu.kind.to_string(), e.pdu.state_key.clone()?)));
            for e in page {
                state_changed_at = state_changed_at.max(e.pos);
                if e.pdu.kind == TimelineEventType::RoomMember
                    && let Some(user) = e.pdu.state_key.as_deref()
                {
                    changed.insert(e.pos, ChangedKey::Member(user.into()));
                    members.insert(user.into(), MemberSlot::of(&e.pdu, e.pos));
                } else if let Some(key) = e.pdu.state_key_pair() {
                    changed.insert(e.pos, ChangedKey::Other(Box::new(key.clone())));
                    state.insert(key, StateEntry { pdu: e.pdu, pos: e.pos });
                }
            }
            if !full || after.is_none() {
                break;
            }
        }
        let member_counts = RoomCache::count_members(&members);
        let encrypted_at = state.get(&("m.room.encryption".to_owned(), String::new())).map(|e| e.pos);
        let visibility_changes = self
            .store
            .state_history(room_id, "m.room.history_visibility", "")
            .await?
            .into_iter()
            .filter(|e| e.pos <= last_pos)
            .map(|e| (e.pos, HistoryVisibility::from_content(Some(e.pdu.content.get()))))
            .collect();
        let last_bump = self
            .store
            .room_list_entries(&[room_id.to_owned()], BUMP_TYPES)
            .await?
            .first()
            .map_or(0, |e| e.bump.min(last_pos));
        let unread_candidates_upto = self.newest_but_members(room_id, last_pos).await?;
        Ok(RoomCache {
            record,
            rules,
            state,
            members,
            hot_members: HashMap::new(),
            changed,
            head,
            depth,
            last_pos,
            last_bump,
            unread_candidates_upto,
            member_counts,
            recent: VecDeque::new(),
            recent_after: last_pos,
            encrypted_at,
            state_changed_at,
            visibility_changes,
            push_power_levels: std::sync::OnceLock::new(),
            channel_roles: std::sync::OnceLock::new(),
        })
    }

    /// The position of the room's newest event that is not a member event,
    /// looked for among its newest [`UNREAD_CANDIDATE_SCAN`] up to
    /// `last_pos` (past them, the oldest of those: none came after it).
    async fn newest_but_members(&self, room_id: &RoomId, last_pos: StreamPos) -> Result<StreamPos> {
        let floor = scan_floor(&*self.store, room_id, last_pos, UNREAD_CANDIDATE_SCAN)
            .await?
            .unwrap_or(0);
        let members = [TimelineEventType::RoomMember.to_string()];
        let newest = self
            .store
            .room_events(EventRange {
                room_id,
                after: floor,
                until: last_pos,
                direction: Direction::Backward,
                limit: 1,
                kinds: None,
                not_kinds: &members,
            })
            .await?;
        Ok(newest.first().map_or(floor, |e| e.pos))
    }

    /// Applies a committed event to its room if this process holds it (a
    /// room nobody here used is read from the store when first used).
    /// Only the applier calls it, in stream order.
    pub(crate) fn apply(&self, event: &Arc<StoredEvent>) {
        let Some(slot) = self.rooms.lock().expect("rooms lock").get(&event.pdu.room_id).cloned() else {
            return;
        };
        match &mut *slot.state.lock().expect("room slot lock") {
            Slot::Loaded(room) => {
                let gained = room.apply_committed(event);
                self.entries.fetch_add(gained, Ordering::Relaxed);
            }
            Slot::Loading(seen) => seen.push(event.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use ruma::RoomVersionId;

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

    /// A v11 event of room `!r:x` at depth `pos`, on no earlier event.
    fn event_at(signer: &EventSigner, sender: &str, event: NewEvent, pos: StreamPos) -> Pdu {
        let sender = <&UserId>::try_from(sender).expect("a user id");
        let now = MilliSecondsSinceUnixEpoch::now();
        Pdu::build(
            signer,
            &RoomVersionId::V11,
            Some(ruma::room_id!("!r:x")),
            sender,
            event,
            vec![],
            vec![],
            pos,
            now,
        )
        .expect("a buildable event")
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

    #[test]
    fn what_changed_between_two_positions_is_read_from_the_changes_beyond_the_recent_window() {
        let signer = EventSigner::new(ruma::owned_server_name!("x"), &EventSigner::generate_key(), "k").unwrap();
        let room = empty_room();
        let mut r = room.cache.write().expect("lock");
        let apply_state = |r: &mut RoomCache, pos: StreamPos, kind: &str, key: &str, content: Value| {
            let pdu = event_at(&signer, "@a:x", NewEvent::state(kind, key, content), pos);
            r.apply(&pdu, pos);
            r.remember(Arc::new(StoredEvent {
                pos,
                pdu,
                txn: None,
                redacted_by: None,
                prev: None,
            }));
        };
        let apply = |r: &mut RoomCache, pos: StreamPos, user: &str, membership: &str| {
            apply_state(r, pos, "m.room.member", user, serde_json::json!({ "membership": membership }))
        };
        for n in 1..=300 {
            apply(&mut r, n, &format!("@u{n}:x"), "join");
        }
        apply(&mut r, 301, "@u150:x", "leave");
        assert!(r.recent_after > 200, "the recent window does not reach back to position 200");

        let positions = |entries: Vec<Cow<'_, StateEntry>>| entries.iter().map(|e| e.pos).collect::<Vec<_>>();
        let expected: Vec<StreamPos> = (101..=300).filter(|p| *p != 150).chain([301]).collect();
        assert_eq!(
            positions(r.state_changed_between(100, 301)),
            expected,
            "each key once, at the position it was last set"
        );
        assert_eq!(positions(r.state_changed_between(301, 400)), Vec::<StreamPos>::new());
        assert_eq!(positions(r.state_changed_between(299, 300)), vec![300]);

        let changes = r.member_changes(200, 301);
        assert_eq!(changes.len(), 101, "{changes:?}");
        assert_eq!(changes.get(ruma::user_id!("@u150:x")), Some(&Membership::Leave));
        assert_eq!(changes.get(ruma::user_id!("@u300:x")), Some(&Membership::Join));
        assert_eq!(changes.get(ruma::user_id!("@u200:x")), None);

        // Types that sort just before and just after the members'.
        for (pos, kind) in [(302, "m.room.memben"), (303, "m.room.membership_rules"), (304, "m.room.name")] {
            apply_state(&mut r, pos, kind, "", serde_json::json!({}));
        }
        let but_members: Vec<String> = r.state_entries_but_members().map(|e| e.pdu.kind.to_string()).collect();
        assert_eq!(but_members, ["m.room.memben", "m.room.membership_rules", "m.room.name"]);
        assert_eq!(r.state_entries().count(), 303);
    }

    #[test]
    fn members_are_kept_compact_and_served_as_they_were_applied() {
        let signer = EventSigner::new(ruma::owned_server_name!("x"), &EventSigner::generate_key(), "k").unwrap();
        let room = empty_room();
        let mut r = room.cache.write().expect("lock");
        let mut pos = 0;
        let mut apply = |r: &mut RoomCache, sender: &str, event: NewEvent| {
            pos += 1;
            let pdu = event_at(&signer, sender, event, pos);
            r.apply(&pdu, pos);
            pdu
        };
        let join = |user: &str, name: &str| {
            NewEvent::state(
                "m.room.member",
                user,
                serde_json::json!({"membership": "join", "displayname": name}),
            )
        };
        let mut joins = vec![];
        for n in 0..(3 * HOT_MEMBERS) {
            let user = format!("@u{n}:x");
            joins.push(apply(&mut r, &user, join(&user, &format!("U{n}"))));
        }
        assert_eq!(r.member_count(Membership::Join), 3 * HOT_MEMBERS);
        assert_eq!(r.state_len(), 3 * HOT_MEMBERS);
        assert!(r.state_entries_but_members().next().is_none());

        // Made from the slot: the applied event as clients see it.
        let first = r.state("m.room.member", "@u0:x").expect("u0 is a member");
        assert_eq!(first.pdu.event_id, joins[0].event_id);
        assert_eq!(client_event_prefix(&first.pdu), client_event_prefix(&joins[0]));
        assert_eq!(*first.pdu.json, client_event_prefix(&joins[0]) + "}", "no signed JSON is kept");
        assert_eq!(first.pdu.content.get(), joins[0].content.get());
        assert_eq!(first.pos, 1);
        // Sent by someone else (an invite): the sender is kept.
        let invite = apply(
            &mut r,
            "@u1:x",
            NewEvent::state("m.room.member", "@guest:x", serde_json::json!({"membership": "invite"})),
        );
        let served = r.state("m.room.member", "@guest:x").expect("invited");
        assert_eq!(served.pdu.sender, "@u1:x");
        assert_eq!(client_event_prefix(&served.pdu), client_event_prefix(&invite));
        assert!(r.hot_members.is_empty(), "joining makes nobody a sender");

        // A sender's member event is made once and shared.
        apply(
            &mut r,
            "@u7:x",
            NewEvent::message("m.room.message", serde_json::json!({"body": "hi"})),
        );
        let a = r.member_event("@u7:x").expect("u7 is a member");
        let b = r.member_event("@u7:x").expect("u7 is a member");
        assert!(Arc::ptr_eq(&a, &b), "served from the latest senders'");
        assert_eq!(a.event.pdu.event_id, joins[7].event_id);
        // A new member event of a latest sender replaces what is served.
        let renamed = apply(&mut r, "@u7:x", join("@u7:x", "Seven"));
        let c = r.member_event("@u7:x").expect("u7 is a member");
        assert_eq!(c.event.pdu.event_id, renamed.event_id);
        assert!(c.client_prefix().contains("Seven"));
        assert_eq!(
            r.state("m.room.member", "@u7:x").map(|e| e.pdu.event_id.clone()),
            Some(renamed.event_id.clone())
        );
        // One who never sent is parsed afresh, the same event each time.
        let d = r.member_event("@u9:x").expect("u9 is a member");
        assert!(!Arc::ptr_eq(&d, &r.member_event("@u9:x").unwrap()));
        assert_eq!(d.event.pdu.event_id, joins[9].event_id);

        // Many senders: the latest stay, the list stays bounded.
        for n in 0..(3 * HOT_MEMBERS) {
            apply(
                &mut r,
                &format!("@u{n}:x"),
                NewEvent::message("m.room.message", serde_json::json!({"body": "hi"})),
            );
        }
        assert!(r.hot_members.len() <= 2 * HOT_MEMBERS, "{}", r.hot_members.len());
        let latest = format!("@u{}:x", 3 * HOT_MEMBERS - 1);
        assert!(r.hot_members.contains_key(latest.as_str()));
        assert!(!r.hot_members.contains_key("@u0:x"), "the earliest sender was let go");

        // Leaving moves the counts and the slot, not the index's size.
        apply(
            &mut r,
            "@u3:x",
            NewEvent::state("m.room.member", "@u3:x", serde_json::json!({"membership": "leave"})),
        );
        assert_eq!(r.member_count(Membership::Join), 3 * HOT_MEMBERS - 1);
        assert_eq!(r.member_count(Membership::Leave), 1);
        assert_eq!(r.membership(ruma::user_id!("@u3:x")), Some(Membership::Leave));
        assert_eq!(r.changed.len(), r.state_len(), "one index entry per state entry");
    }
}
