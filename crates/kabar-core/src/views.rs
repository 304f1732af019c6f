//! View counts of channel posts (the rule is `kabar_domain::channel::ViewCounter`),
//! worked out from what is committed, so every node answers alike and a
//! restart loses nothing.
//!
//! A channel's counter learns its posts and joins from the applier as they
//! are applied ([`ViewCounts::applied`]): a channel created while the
//! process runs is counted from its creation without a store read, however
//! many subscribers join. A channel first asked about after a restart (or
//! created by another process before this one listened) is read from the
//! store once, while the applier keeps what it applies meanwhile; from then
//! on the applier feeds it. Read receipts, which the stream names only by
//! room, are read from the store when asked, for the rooms whose receipts
//! changed.

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicU64, Ordering},
    },
};

use kabar_domain::{
    channel::{POST_TYPES, ViewCounter, is_channel_create},
    membership::Membership,
};
use kabar_store::{Direction, EventRange, Store, StoredEvent, StreamPos};
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId, events::TimelineEventType};
use tokio::sync::Mutex as AsyncMutex;

use crate::{changes::Changes, error::Result};

/// Events read from the store per step of a catch-up.
const CATCH_UP_BATCH: usize = 10_000;

/// The view counters of the channels known to this process.
pub struct ViewCounts {
    store: Arc<dyn Store>,
    changes: Arc<Changes>,
    channels: Mutex<Channels>,
    /// Ticks at every question: which counter was asked about least recently.
    asked: AtomicU64,
}

struct Channels {
    by_room: HashMap<OwnedRoomId, Arc<ChannelSlot>>,
    /// Members counted for, over every counter.
    members: usize,
    /// Past this many members, the counters asked about least recently
    /// (and not being asked now) are dropped, to be read again from the
    /// store when next asked about.
    budget: usize,
    /// The position of the newest event the applier gave
    /// [`ViewCounts::applied`]: every event at or below it is in the store,
    /// and every later one reaches the counters known then.
    events_applied: StreamPos,
}

/// One channel's counter. Readers answer under a read lock; one catch-up
/// at a time reads the store, without holding the lock, then applies what
/// it read.
#[derive(Default)]
struct ChannelSlot {
    counter: RwLock<Channel>,
    catching_up: AsyncMutex<()>,
    /// Told when a catch-up ends: everyone who waited for it looks again
    /// at once (thousands of subscribers' syncs wake on one post; taking
    /// the catch-up turn one after another would line them up).
    caught_up: tokio::sync::Notify,
    /// When it was last asked about (a tick of `ViewCounts::asked`).
    last_asked: AtomicU64,
}

#[derive(Default)]
struct Channel {
    /// Whether every event the applier applied in the room is counted (the
    /// applier counts each as it applies it). Until then, the store is read
    /// up to `pending_after`, where the applier was when the counter was
    /// made, and `pending` keeps what it applied after that.
    live: bool,
    /// Whether the store was read (for tests: a channel made while the
    /// applier listens never is).
    read_from_store: bool,
    pending_after: StreamPos,
    pending: Vec<Seen>,
    /// Receipts up to here are counted in.
    receipts_upto: StreamPos,
    counter: ViewCounter,
    /// Where each post is, for receipts (which name an event).
    posts: HashMap<OwnedEventId, StreamPos>,
}

/// What counts of a room's events.
enum Seen {
    Joined(OwnedUserId, StreamPos),
    Post(OwnedEventId, StreamPos),
}

impl Seen {
    fn pos(&self) -> StreamPos {
        match self {
            Seen::Joined(_, pos) | Seen::Post(_, pos) => *pos,
        }
    }

    /// What `event` means to a view counter: a first join or a post.
    fn of(event: &StoredEvent) -> Option<Seen> {
        let pdu = &event.pdu;
        if pdu.kind == TimelineEventType::RoomMember {
            let user = pdu.state_key.as_deref().and_then(|k| OwnedUserId::try_from(k).ok())?;
            (Membership::from_content(pdu.content.get()) == Some(Membership::Join)).then_some(Seen::Joined(user, event.pos))
        } else if pdu.state_key.is_none() && POST_TYPES.contains(&pdu.kind.to_string().as_str()) {
            Some(Seen::Post(pdu.event_id.clone(), event.pos))
        } else {
            None
        }
    }
}

impl Channel {
    /// Counts `seen`; whether it was a new member's join.
    fn count(&mut self, seen: Seen) -> bool {
        match seen {
            Seen::Joined(user, pos) => self.counter.joined(&user, pos),
            Seen::Post(event_id, pos) => {
                self.counter.add_post(pos);
                self.posts.insert(event_id, pos);
                false
            }
        }
    }
}

impl Channels {
    /// Drops the counters asked about least recently, but `keep` and those
    /// being asked about now, until the members counted for are a tenth
    /// under the budget (so one more join does not drop another).
    fn drop_past_budget(&mut self, keep: &RoomId) {
        if self.members <= self.budget {
            return;
        }
        let mut idle: Vec<(u64, OwnedRoomId)> = self
            .by_room
            .iter()
            .filter(|(room_id, slot)| **room_id != keep && Arc::strong_count(slot) == 1)
            .map(|(room_id, slot)| (slot.last_asked.load(Ordering::Relaxed), room_id.clone()))
            .collect();
        idle.sort_unstable();
        let target = self.budget - self.budget / 10;
        for (_, room_id) in idle {
            if self.members <= target {
                break;
            }
            if let Some(slot) = self.by_room.remove(&room_id) {
                let members = slot.counter.read().expect("view counter lock").counter.members();
                self.members = self.members.saturating_sub(members);
            }
        }
    }
}

impl ViewCounts {
    pub fn new(store: Arc<dyn Store>, changes: Arc<Changes>) -> Self {
        Self {
            store,
            changes,
            channels: Mutex::new(Channels {
                by_room: HashMap::new(),
                members: 0,
                budget: usize::MAX,
                events_applied: 0,
            }),
            asked: AtomicU64::new(0),
        }
    }

    /// At most this many members counted for over every channel's counter
    /// (see `Channels::budget`).
    pub fn set_budget(&self, members: usize) {
        self.channels.lock().expect("view counts lock").budget = members;
    }

    /// The applier starts after `pos`: every event up to it is in the store
    /// and is not given to [`ViewCounts::applied`].
    pub fn applier_starts_after(&self, pos: StreamPos) {
        let mut channels = self.channels.lock().expect("view counts lock");
        channels.events_applied = channels.events_applied.max(pos);
    }

    /// The applier applied `event`: a channel's creation starts its counter
    /// (nothing came before it), and a post or a join in a channel with a
    /// counter is counted. Called in position order, for every event.
    pub fn applied(&self, event: &StoredEvent) {
        let pdu = &event.pdu;
        let mut channels = self.channels.lock().expect("view counts lock");
        channels.events_applied = event.pos;
        if pdu.kind == TimelineEventType::RoomCreate {
            let content: serde_json::Value = serde_json::from_str(pdu.content.get()).unwrap_or_default();
            if is_channel_create(&content) {
                let slot = ChannelSlot::default();
                slot.counter.write().expect("view counter lock").live = true;
                channels.by_room.entry(pdu.room_id.clone()).or_insert_with(|| Arc::new(slot));
            }
            return;
        }
        let Some(slot) = channels.by_room.get(&pdu.room_id) else {
            return;
        };
        let Some(seen) = Seen::of(event) else {
            return;
        };
        let mut channel = slot.counter.write().expect("view counter lock");
        if !channel.live {
            channel.pending.push(seen);
            return;
        }
        let new_member = channel.count(seen);
        drop(channel);
        if new_member {
            channels.members += 1;
            channels.drop_past_budget(&pdu.room_id);
        }
    }

    /// The views of the events at `positions` in channel `room_id` as of
    /// `upto`, an applied position (`None` for events that are not posts).
    pub async fn views(&self, room_id: &RoomId, upto: StreamPos, positions: &[StreamPos]) -> Result<Vec<Option<u32>>> {
        let slot = self.slot(room_id);
        slot.last_asked.store(self.asked.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        let answer = |c: &Channel| positions.iter().map(|p| c.counter.views(*p)).collect::<Vec<_>>();
        let turn = loop {
            {
                let channel = slot.counter.read().expect("view counter lock");
                if channel.live && channel.receipts_upto >= upto {
                    return Ok(answer(&channel));
                }
            }
            let caught_up = slot.caught_up.notified();
            tokio::pin!(caught_up);
            caught_up.as_mut().enable();
            match slot.catching_up.try_lock() {
                Ok(turn) => break turn,
                Err(_) => caught_up.await,
            }
        };
        let _turn = Turn {
            turn: Some(turn),
            caught_up: &slot.caught_up,
        };
        let (live, pending_after, receipts_from) = {
            let channel = slot.counter.read().expect("view counter lock");
            if channel.live && channel.receipts_upto >= upto {
                return Ok(answer(&channel));
            }
            (channel.live, channel.pending_after, channel.receipts_upto)
        };
        if !live {
            // Everything up to `pending_after` is in the store; what the
            // applier applied after it is in `pending`.
            let read = self.read_events(room_id, pending_after).await?;
            let members = {
                let mut channel = slot.counter.write().expect("view counter lock");
                for seen in read.into_iter().chain(std::mem::take(&mut channel.pending)) {
                    channel.count(seen);
                }
                channel.live = true;
                channel.read_from_store = true;
                channel.counter.members()
            };
            let mut channels = self.channels.lock().expect("view counts lock");
            channels.members += members;
            channels.drop_past_budget(room_id);
        }
        self.count_receipts(&slot, room_id, receipts_from, upto).await?;
        let channel = slot.counter.read().expect("view counter lock");
        Ok(answer(&channel))
    }

    /// The counter of `room_id`, made if there is none: it keeps what the
    /// applier applies from now on until the store is read up to here.
    fn slot(&self, room_id: &RoomId) -> Arc<ChannelSlot> {
        let mut channels = self.channels.lock().expect("view counts lock");
        let events_applied = channels.events_applied;
        let slot = channels.by_room.entry(room_id.to_owned()).or_insert_with(|| {
            let slot = ChannelSlot::default();
            slot.counter.write().expect("view counter lock").pending_after = events_applied;
            Arc::new(slot)
        });
        slot.clone()
    }

    /// Makes `room_id`'s counter without reading the store yet, as a first
    /// question does just before its read.
    #[cfg(test)]
    pub(crate) fn make_counter(&self, room_id: &RoomId) {
        self.slot(room_id);
    }

    /// Whether `room_id` has a counter.
    #[cfg(test)]
    pub(crate) fn has_counter(&self, room_id: &RoomId) -> bool {
        self.channels.lock().expect("view counts lock").by_room.contains_key(room_id)
    }

    /// Whether `room_id` has a counter that never read the store.
    #[cfg(test)]
    pub(crate) fn counts_without_reading(&self, room_id: &RoomId) -> bool {
        let channels = self.channels.lock().expect("view counts lock");
        channels
            .by_room
            .get(room_id)
            .is_some_and(|slot| !slot.counter.read().expect("view counter lock").read_from_store)
    }

    /// The posts and joins of `room_id` up to `upto`, from the store, in
    /// stream order. Joins come as (user, position) pairs: a channel's
    /// million joins are not read back as events.
    async fn read_events(&self, room_id: &RoomId, upto: StreamPos) -> Result<Vec<Seen>> {
        let kinds: Vec<String> = POST_TYPES.iter().map(|k| k.to_string()).collect();
        let mut seen = vec![];
        let mut after = 0;
        while after < upto {
            let events = self
                .store
                .room_events(EventRange {
                    room_id,
                    after,
                    until: upto,
                    direction: Direction::Forward,
                    limit: CATCH_UP_BATCH,
                    kinds: Some(&kinds),
                    not_kinds: &[],
                })
                .await?;
            seen.extend(events.iter().filter_map(Seen::of));
            match events.last() {
                Some(last) if events.len() == CATCH_UP_BATCH => after = last.pos,
                _ => break,
            }
        }
        let mut after = 0;
        while after < upto {
            let joins = self.store.member_joins(room_id, after, upto, CATCH_UP_BATCH).await?;
            let full = joins.len() == CATCH_UP_BATCH;
            after = joins.last().map_or(upto, |(_, pos)| *pos);
            seen.extend(joins.into_iter().map(|(user, pos)| Seen::Joined(user, pos)));
            if !full {
                break;
            }
        }
        seen.sort_by_key(Seen::pos);
        Ok(seen)
    }

    /// Counts the read receipts after `receipts_from` up to `upto` (when the
    /// room's receipts changed since), with every event up to `upto` counted.
    async fn count_receipts(&self, slot: &ChannelSlot, room_id: &RoomId, receipts_from: StreamPos, upto: StreamPos) -> Result<()> {
        let first = receipts_from == 0;
        let mut reads = vec![];
        if first || self.changes.receipts.changed_since(&room_id.to_owned(), receipts_from) {
            let receipts = self.store.receipts_since(room_id, receipts_from, None).await?;
            for r in receipts.iter().filter(|r| r.pos <= upto) {
                let unthreaded = r.thread_id.as_deref().is_none_or(|t| t == "main");
                if !matches!(r.receipt_type.as_str(), "m.read" | "m.read.private") || !unthreaded {
                    continue;
                }
                // A post is placed from memory; any other event from the store.
                let post = slot.counter.read().expect("view counter lock").posts.get(&r.event_id).copied();
                let at = match post {
                    Some(pos) => Some(pos),
                    None => self
                        .store
                        .event(&r.event_id)
                        .await?
                        .filter(|e| e.pdu.room_id == room_id)
                        .map(|e| e.pos),
                };
                if let Some(at) = at {
                    reads.push((r.user_id.clone(), at));
                }
            }
        }
        let mut channel = slot.counter.write().expect("view counter lock");
        for (user, at) in reads {
            channel.counter.read_to(&user, at);
        }
        channel.receipts_upto = channel.receipts_upto.max(upto);
        Ok(())
    }
}

/// The catch-up turn: however it ends, it is given back first and then the
/// waiters look again (a waiter that needs a further catch-up finds the
/// turn free).
struct Turn<'a> {
    turn: Option<tokio::sync::MutexGuard<'a, ()>>,
    caught_up: &'a tokio::sync::Notify,
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.turn.take();
        self.caught_up.notify_waiters();
    }
}
