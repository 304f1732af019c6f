//! Rooms: creation, membership, sending events, reading history.
//!
//! Each room's current state is kept in memory (`room_cache.rs`). A send
//! takes the room's write turn, builds the event on top of the room's head,
//! checks the authorization rules against the cached state, and appends it
//! to the store on the condition that the head has not moved (another
//! process may append to the same room). The applier then applies it to the
//! cache and wakes waiters; the send answers once that is done. The write
//! turn keeps this process's sends to a room from racing each other; the
//! head check keeps other processes' off the same head (the loser rebuilds
//! on the new head). Different rooms proceed in parallel and share the
//! store's group commits.

use std::{
    borrow::Cow,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use kabar_domain::{
    NewEvent, Pdu,
    channel::MemberVisibility,
    client_event::redact_pdu,
    event::EventSigner,
    membership::{EventVisibility, HistoryVisibility, Membership, may_see_event},
};
use kabar_store::{AppendOutcome, Direction, EventRange, EventWrite, PrevState, RoomRecord, Store, StoredEvent, StreamPos, TxnRef};
use rand::{Rng, distributions::Alphanumeric};
use ruma::{
    EventId, MilliSecondsSinceUnixEpoch, OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, RoomVersionId, UserId, events::TimelineEventType,
    room_version_rules::RoomVersionRules,
};
use serde_json::{Value, json};

pub use crate::room_cache::{DEFAULT_CACHED_STATE_ENTRIES, MemberSlot, Room, RoomCache, StateEntry, TimelineEvent, WriteTurn};
use crate::{
    applier::Applied,
    error::{Error, Result},
    filter::TimelineFilter,
    load::Gate,
    room_cache::{Base, PendingMembers, RoomCaches},
};

/// How long a send keeps rebuilding its event on a head that moved before
/// it gives up; each retry first applies the events that moved it. A
/// budget of time rather than of tries: while another process streams
/// appends into the room, a writer here may lose several races in a row.
const HEAD_RETRY_BUDGET: Duration = Duration::from_secs(10);
/// How long a send waits for another process's events to be applied.
const CATCH_UP_WAIT: Duration = Duration::from_secs(5);

/// Room versions this server creates and serves.
pub const SUPPORTED_ROOM_VERSIONS: [RoomVersionId; 3] = [RoomVersionId::V10, RoomVersionId::V11, RoomVersionId::V12];

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

/// The state of a room a user may read (see [`Rooms::readable_state`]),
/// less what a channel hides from them (other subscribers' member events).
pub struct ReadableState {
    source: StateSource,
    hidden: Option<MemberVisibility>,
}

enum StateSource {
    /// The current state, in the room's cache.
    Current(Arc<Room>),
    /// The state at a point of the past, in stream order.
    At(Vec<StoredEvent>),
}

impl ReadableState {
    fn shows(&self, pdu: &Pdu) -> bool {
        self.hidden.as_ref().is_none_or(|h| h.shows(pdu))
    }

    /// Every state event, in stream order for a past state.
    pub fn events(&self) -> Vec<StoredEvent> {
        match &self.source {
            StateSource::Current(room) => room
                .read()
                .state_entries()
                .filter(|e| self.shows(&e.pdu))
                .map(|e| e.into_owned().into_stored())
                .collect(),
            StateSource::At(events) => events.iter().filter(|e| self.shows(&e.pdu)).cloned().collect(),
        }
    }

    /// One page of the member events, in user id order: those after the
    /// user id `from` whose membership `keep` accepts, at most `limit`;
    /// and the user id the next page starts after, when there are more.
    /// Reads the page and what `keep` skips on the way, never every member
    /// of a big room; a channel subscriber's pages look up only the staff.
    pub fn members_page(
        &self,
        from: Option<&str>,
        limit: usize,
        keep: impl Fn(Option<Membership>) -> bool,
    ) -> (Vec<StoredEvent>, Option<String>) {
        let wanted = |pdu: &Pdu| self.shows(pdu) && keep(Membership::from_content(pdu.content.get()));
        let after = |user: &str| from.is_none_or(|f| user > f);
        // A slot's membership is read before its event is parsed: a page
        // parses what it returns, not what `keep` skips.
        let slot_event =
            |room_id: &RoomId, user: &str, slot: &MemberSlot| keep(slot.membership).then(|| slot.entry(room_id, user)).flatten();
        let mut page: Vec<StoredEvent> = match (&self.source, &self.hidden) {
            (StateSource::Current(room), Some(hidden)) => {
                let r = room.read();
                let mut visible: Vec<&str> = hidden.visible_members().map(|u| u.as_str()).filter(|u| after(u)).collect();
                visible.sort_unstable();
                visible.dedup();
                visible
                    .into_iter()
                    .filter_map(|u| slot_event(&r.record.room_id, u, r.member(u)?))
                    .filter(|e| self.shows(&e.pdu))
                    .take(limit + 1)
                    .map(StateEntry::into_stored)
                    .collect()
            }
            (StateSource::Current(room), None) => {
                let r = room.read();
                r.members_after(from)
                    .filter_map(|(user, slot)| slot_event(&r.record.room_id, user, slot))
                    .filter(|e| self.shows(&e.pdu))
                    .take(limit + 1)
                    .map(StateEntry::into_stored)
                    .collect()
            }
            (StateSource::At(events), _) => {
                let mut members: Vec<&StoredEvent> = events
                    .iter()
                    .filter(|e| e.pdu.kind == TimelineEventType::RoomMember && e.pdu.state_key.as_deref().is_some_and(after))
                    .filter(|e| wanted(&e.pdu))
                    .collect();
                members.sort_by(|a, b| a.pdu.state_key.cmp(&b.pdu.state_key));
                members.into_iter().take(limit + 1).cloned().collect()
            }
        };
        let next = if page.len() > limit {
            page.truncate(limit);
            page.last().and_then(|e| e.pdu.state_key.clone())
        } else {
            None
        };
        (page, next)
    }

    /// The state event of one (type, state key).
    pub fn get(&self, kind: &str, state_key: &str) -> Option<StoredEvent> {
        let event = match &self.source {
            StateSource::Current(room) => room.read().state(kind, state_key).map(|e| e.into_owned().into_stored()),
            StateSource::At(events) => events
                .iter()
                .find(|e| e.pdu.kind.to_string() == kind && e.pdu.state_key.as_deref() == Some(state_key))
                .cloned(),
        };
        event.filter(|e| self.shows(&e.pdu))
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
    /// The rooms in memory; the applier advances them.
    caches: Arc<RoomCaches>,
    applied: Applied,
    default_version: RoomVersionId,
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
        caches: Arc<RoomCaches>,
        applied: Applied,
        default_version: RoomVersionId,
        joins: Arc<Gate>,
    ) -> Self {
        Self {
            store,
            signer,
            caches,
            applied,
            default_version,
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
        self.caches.get(room_id).await
    }

    /// The room's cache if it is in memory already (nothing is loaded).
    pub fn loaded_room(&self, room_id: &RoomId) -> Option<Arc<Room>> {
        self.caches.loaded(room_id)
    }

    /// Builds, authorizes and stores one event, starting in the caller's
    /// write turn, and returns once the applier has applied it (so the
    /// sender's next sync sees it). An event that changes no state gives the
    /// turn back once its append is queued, so the room's next event can be
    /// built on it meanwhile (see [`Room`]'s pipelined appends).
    async fn append(
        &self,
        turn: WriteTurn<'_>,
        sender: &UserId,
        event: NewEvent,
        txn: Option<TxnRef>,
    ) -> Result<(OwnedEventId, StreamPos)> {
        let room = turn.room;
        check_event_names(&event)?;
        let _in_flight = room.begin_append();
        // See `Room`'s pipelined appends: only what changes more than a
        // membership keeps the turn until it is applied.
        let is_member = event.kind == "m.room.member" && event.state_key.is_some();
        let keeps_turn = (event.state_key.is_some() && !is_member) || event.redacts.is_some();
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
        let redacted_target = original
            .as_ref()
            .and_then(|o| redact_pdu(&o.pdu, &version).map(|json| (o.pdu.event_id.clone(), json)));
        let mut turn = Some(turn);
        let give_up = tokio::time::Instant::now() + HEAD_RETRY_BUDGET;
        while tokio::time::Instant::now() < give_up {
            let mut held = match turn.take() {
                Some(t) => t,
                None => room.write_turn().await,
            };
            let (pdu, prev, base, chain) = {
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
                let (base, chain) = room.next_base(&mut held, &r);
                let pdu = r.build_authorized(
                    held.pending(),
                    &self.signer,
                    Some(&room_id),
                    sender,
                    event.clone(),
                    now(),
                    base.as_ref(),
                )?;
                let prev = match pdu.state_key_pair() {
                    Some((_, key)) if is_member => held.member_event(&r, &key).map(|pdu| PrevState::of(&pdu)),
                    Some((kind, key)) => r.state(&kind, &key).map(|e| e.as_prev()),
                    None => None,
                };
                (pdu, prev, base, chain)
            };
            let (event_id, depth) = (pdu.event_id.clone(), pdu.depth);
            let member = is_member.then(|| pdu.clone());
            let queued = self.store.queue_append(EventWrite {
                pdu,
                txn: txn.clone(),
                relation: relation.clone(),
                redacted_target: redacted_target.clone(),
                prev,
                expected_head: base.map(|b| b.event_id),
            });
            let mut held = if keeps_turn {
                Some(held)
            } else {
                room.extend_tip(
                    &mut held,
                    Base {
                        event_id: event_id.clone(),
                        depth,
                    },
                    member,
                );
                drop(held);
                None
            };
            match queued.await {
                Ok(AppendOutcome::Appended(pos)) => {
                    self.applied.reached(pos).await;
                    match &mut held {
                        Some(held) => room.clear_tip(held),
                        None => room.applied_tip(&event_id),
                    }
                    return Ok((event_id, pos));
                }
                Ok(AppendOutcome::Duplicate(id)) => {
                    room.not_landed(held, chain).await;
                    return Ok((id, 0));
                }
                Err(e) => {
                    room.not_landed(held, chain).await;
                    return Err(e.into());
                }
                Ok(AppendOutcome::HeadMoved { head }) => {
                    let held = room.not_landed(held, chain).await;
                    // Another process appended first (or an event this one
                    // was built on did not land): apply what is committed,
                    // then build again on the new head and check again.
                    tracing::debug!(room = %room_id, head, "room head moved; rebuilding the event");
                    if !self.applied.catch_up_to(head, CATCH_UP_WAIT).await {
                        return Err(Error::Unavailable("the room's newest events could not be read in time".into()));
                    }
                    turn = Some(held);
                }
            }
        }
        Err(Error::Unavailable("the room is too busy; try again".into()))
    }

    /// Sends an event as `sender`; with a transaction id, a repeat returns the first event.
    ///
    /// The store recognises a repeated transaction inside the write itself, so
    /// the common case (a new transaction) costs no extra read.
    pub async fn send(&self, sender: &UserId, room_id: &RoomId, event: NewEvent, txn: Option<TxnRef>) -> Result<OwnedEventId> {
        let room = self.room(room_id).await?;
        let turn = room.write_turn().await;
        match self.append(turn, sender, event, txn.clone()).await {
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
        // The target's member event as the next event is built on: one of
        // this process's in flight, else the applied one.
        let current = {
            let r = room.read();
            turn.member_event(&r, target.as_str()).map(Cow::into_owned)
        };
        // Joining a room one is in already changes nothing (a retried
        // /join). A member event with content of its own (a per-room
        // nickname) is a new event, and anyone else's attempt goes to the
        // authorization rules.
        if membership == Membership::Join
            && sender == target
            && extra.is_none()
            && let Some(current) = &current
            && Membership::from_content(current.content.get()) == Some(Membership::Join)
        {
            return Ok(current.event_id.clone());
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
            && let Some(current) = &current
            && current.content_value() == Value::Object(content.clone())
        {
            // The same member event again changes nothing: no new event.
            return Ok(current.event_id.clone());
        }
        let ev = NewEvent::state("m.room.member", target.as_str(), Value::Object(content));
        Ok(self.append(turn, sender, ev, None).await?.0)
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
        let room_id = loop {
            attempts += 1;
            let (room, pdus) = self.build_room(creator, &req, &version, &rules, &events)?;
            let writes = pdus
                .iter()
                .map(|(p, prev)| EventWrite {
                    pdu: p.clone(),
                    txn: None,
                    relation: None,
                    redacted_target: None,
                    prev: prev.clone(),
                    expected_head: None,
                })
                .collect();
            match self.store.create_room(room.record.clone(), writes).await {
                Ok(positions) => {
                    // The applier wakes the creator and the invitees; the
                    // room's cache is read from the store when first used.
                    self.applied.reached(positions.iter().copied().max().unwrap_or_default()).await;
                    break room.record.room_id;
                }
                Err(kabar_store::StoreError::Conflict(m)) if attempts < 3 => {
                    tracing::warn!(reason = %m, "room id taken; creating the room again with a new create event");
                }
                Err(e) => return Err(e.into()),
            }
        };
        if let Some(a) = alias {
            self.store.set_alias(&a, &room_id, creator).await?;
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
        let channel = create.get("type").and_then(Value::as_str) == Some(kabar_domain::channel::CHANNEL_TYPE);
        let mut power = initial_power.unwrap_or_else(|| {
            let ordinary = json!({
                "users": {},
                "users_default": 0,
                "events": {
                    "m.room.name": 50, "m.room.power_levels": 100, "m.room.history_visibility": 100,
                    "m.room.canonical_alias": 50, "m.room.avatar": 50, "m.room.tombstone": 100,
                    "m.room.server_acl": 100, "m.room.encryption": 100,
                },
                "events_default": 0, "state_default": 50, "ban": 50, "kick": 50, "redact": 50, "invite": 0,
                "notifications": { "room": 50 },
            });
            if channel {
                kabar_domain::channel::channel_power_levels(ordinary)
            } else {
                ordinary
            }
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
            let base = room.base();
            let pdu = room
                .build_authorized(
                    &PendingMembers::default(),
                    &self.signer,
                    target_room.as_deref(),
                    creator,
                    ev.clone(),
                    created_at,
                    base.as_ref(),
                )
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
                .map(|e| e.as_prev());
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
                if let Err(e) = self.append(turn, user, ev, None).await {
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
        let (current, left_at, hidden) = {
            let r = room.read();
            let member = r.membership(user) == Some(Membership::Join);
            let left_at = match r.member(user.as_str()) {
                Some(
                    slot @ MemberSlot {
                        membership: Some(Membership::Leave | Membership::Ban),
                        ..
                    },
                ) => Some(slot.pos),
                _ => None,
            };
            (
                member || r.history_visibility() == HistoryVisibility::WorldReadable,
                left_at,
                r.member_visibility(user),
            )
        };
        if current {
            return Ok(ReadableState {
                source: StateSource::Current(room),
                hidden,
            });
        }
        let left_at = left_at.ok_or_else(not_in_room)?;
        let history = self.store.membership_history(room_id, user).await?;
        if !history.iter().any(|m| m.membership == Membership::Join) {
            // Invited and declined, or banned without ever joining: nothing to read.
            return Err(not_in_room());
        }
        Ok(ReadableState {
            source: StateSource::At(self.state_at(&room, left_at).await?),
            hidden,
        })
    }

    /// The state `user` may be shown at the event at `at` (`/context`): the
    /// state right after it, or right after the user left if that came
    /// first (a former member never sees what happened since).
    pub async fn state_for_user_at(&self, user: &UserId, room_id: &RoomId, at: StreamPos) -> Result<Vec<StoredEvent>> {
        let room = self.room(room_id).await?;
        let (at, hidden) = {
            let r = room.read();
            let current = r.membership(user) == Some(Membership::Join) || r.history_visibility() == HistoryVisibility::WorldReadable;
            let at = match r.member(user.as_str()) {
                Some(me) if !current => at.min(me.pos),
                _ => at,
            };
            (at, r.member_visibility(user))
        };
        let mut state = self.state_at(&room, at).await?;
        if let Some(hidden) = hidden {
            state.retain(|e| hidden.shows(&e.pdu));
        }
        Ok(state)
    }

    /// In a channel, the member events `user` may not see; `None` in other
    /// rooms and for the channel's staff.
    pub async fn member_visibility(&self, user: &UserId, room_id: &RoomId) -> Result<Option<MemberVisibility>> {
        Ok(self.room(room_id).await?.read().member_visibility(user))
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
                return Ok(r.state_entries().map(|e| e.into_owned().into_stored()).collect());
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
    /// their membership at each, with that membership (`unsigned.membership`),
    /// less what a channel hides from them (other subscribers' member
    /// events, reactions and redactions).
    pub async fn filter_visible(&self, user: &UserId, room_id: &RoomId, events: Vec<StoredEvent>) -> Result<Vec<VisibleEvent>> {
        let view = self.history_view(user, room_id).await?;
        let hidden = self.room(room_id).await?.read().member_visibility(user);
        Ok(events
            .into_iter()
            .filter(|event| hidden.as_ref().is_none_or(|h| h.shows(&event.pdu)))
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
        // With a filter of types, the scan above counts only what matched:
        // bound what the store's index passes over too, in either direction
        // (a forward read from the start of a channel would otherwise walk
        // every join to find its posts). The read stops at the bound, and
        // the client goes on from there.
        let bound = match (dir, filter.exact_types()) {
            (Dir::Backward, Some(_)) => self.typed_scan_floor(room_id, (to.unwrap_or(0), from), MESSAGES_SCAN_LIMIT).await?,
            (Dir::Forward, Some(_)) => self
                .store
                .room_position(room_id, from, Direction::Forward, MESSAGES_SCAN_LIMIT)
                .await?
                .filter(|ceiling| to.is_none_or(|to| *ceiling < to)),
            (_, None) => None,
        };
        loop {
            let range = match dir {
                Dir::Backward => EventRange {
                    room_id,
                    after: bound.or(to).unwrap_or(0),
                    until: cursor,
                    direction: Direction::Backward,
                    limit: batch,
                    kinds: filter.exact_types(),
                    not_kinds: &[],
                },
                Dir::Forward => EventRange {
                    room_id,
                    after: cursor,
                    until: bound.or(to).unwrap_or(u64::MAX),
                    direction: Direction::Forward,
                    limit: batch,
                    kinds: filter.exact_types(),
                    not_kinds: &[],
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
                // At the bound rather than the room's edge: the client goes
                // on from there.
                return Ok((out, bound));
            }
            if scanned >= MESSAGES_SCAN_LIMIT {
                return Ok((out, Some(cursor)));
            }
        }
    }

    /// Where a backwards read of `(after, until]` filtered by type stops
    /// (`room_cache::scan_floor`), or `None` when the range holds fewer
    /// than `scan` events: a filter for messages in a room of a million
    /// joins reads through the newest events only, and says where to go on.
    pub async fn typed_scan_floor(
        &self,
        room_id: &RoomId,
        (after, until): (StreamPos, StreamPos),
        scan: usize,
    ) -> Result<Option<StreamPos>> {
        Ok(crate::room_cache::scan_floor(&*self.store, room_id, until, scan)
            .await?
            .filter(|floor| *floor > after))
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
        let pos = self.store.forget_room(user, room_id).await?;
        self.applied.reached(pos).await;
        Ok(())
    }

    /// Where the applier stands: every update up to here is in the caches.
    pub fn applied(&self) -> &Applied {
        &self.applied
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }
}
