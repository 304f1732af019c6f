//! View counts of channel posts (the rule is `kabar_domain::channel::ViewCounter`),
//! worked out from what is committed: a channel's counter catches up from
//! the store (posts, first joins, read receipts after its position) when
//! asked, so every node answers alike and a restart loses nothing.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
};

use kabar_domain::{
    channel::{POST_TYPES, ViewCounter},
    membership::Membership,
};
use kabar_store::{Direction, EventRange, Store, StreamPos};
use ruma::{OwnedEventId, OwnedRoomId, OwnedUserId, RoomId};
use tokio::sync::Mutex as AsyncMutex;

use crate::{changes::Changes, error::Result};

/// Events read from the store per step of a catch-up.
const CATCH_UP_BATCH: usize = 10_000;

/// The view counters of the channels asked about.
pub struct ViewCounts {
    store: Arc<dyn Store>,
    changes: Arc<Changes>,
    channels: Mutex<HashMap<OwnedRoomId, Arc<ChannelSlot>>>,
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
}

#[derive(Default)]
struct Channel {
    /// Events up to here are counted in.
    upto: StreamPos,
    /// Receipts up to here are counted in.
    receipts_upto: StreamPos,
    counter: ViewCounter,
    /// Where each post is, for receipts (which name an event).
    posts: HashMap<OwnedEventId, StreamPos>,
}

/// What a catch-up read from the store, in the order to apply it.
enum Seen {
    Joined(OwnedUserId, StreamPos),
    Post(OwnedEventId, StreamPos),
    Read(OwnedUserId, Option<StreamPos>, OwnedEventId),
}

impl ViewCounts {
    pub fn new(store: Arc<dyn Store>, changes: Arc<Changes>) -> Self {
        Self {
            store,
            changes,
            channels: Mutex::new(HashMap::new()),
        }
    }

    /// The views of the events at `positions` in channel `room_id` as of
    /// `upto` (`None` for events that are not posts). `room_last_pos`, the
    /// room's newest event as far as the caller knows, spares a store read
    /// when nothing happened in the room since the counter last looked.
    pub async fn views(
        &self,
        room_id: &RoomId,
        upto: StreamPos,
        room_last_pos: StreamPos,
        positions: &[StreamPos],
    ) -> Result<Vec<Option<u32>>> {
        let slot = {
            let mut channels = self.channels.lock().expect("view counts lock");
            match channels.get(room_id) {
                Some(slot) => slot.clone(),
                None => channels.entry(room_id.to_owned()).or_default().clone(),
            }
        };
        let answer = |c: &Channel| positions.iter().map(|p| c.counter.views(*p)).collect::<Vec<_>>();
        let turn = loop {
            {
                let channel = slot.counter.read().expect("view counter lock");
                if channel.upto >= upto {
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
        let (from, receipts_from) = {
            let channel = slot.counter.read().expect("view counter lock");
            if channel.upto >= upto {
                return Ok(answer(&channel));
            }
            (channel.upto, channel.receipts_upto)
        };
        let seen = self.read_since(&slot, room_id, (from, receipts_from), upto, room_last_pos).await?;
        let mut channel = slot.counter.write().expect("view counter lock");
        for s in seen {
            match s {
                Seen::Joined(user, pos) => channel.counter.joined(&user, pos),
                Seen::Post(event_id, pos) => {
                    channel.counter.add_post(pos);
                    channel.posts.insert(event_id, pos);
                }
                Seen::Read(user, at, event_id) => {
                    if let Some(at) = at.or_else(|| channel.posts.get(&event_id).copied()) {
                        channel.counter.read_to(&user, at);
                    }
                }
            }
        }
        channel.upto = upto;
        channel.receipts_upto = upto;
        Ok(answer(&channel))
    }

    /// Posts and first joins in `(from, upto]` (none read when the room's
    /// newest event is not past `from`), then read receipts after
    /// `receipts_from`.
    async fn read_since(
        &self,
        slot: &ChannelSlot,
        room_id: &RoomId,
        (from, receipts_from): (StreamPos, StreamPos),
        upto: StreamPos,
        room_last_pos: StreamPos,
    ) -> Result<Vec<Seen>> {
        let kinds: Vec<String> = POST_TYPES.iter().chain(["m.room.member"].iter()).map(|k| k.to_string()).collect();
        let mut seen = vec![];
        let mut after = from;
        let mut posts_here = std::collections::HashSet::new();
        while room_last_pos > after {
            let events = self
                .store
                .room_events(EventRange {
                    room_id,
                    after,
                    until: upto,
                    direction: Direction::Forward,
                    limit: CATCH_UP_BATCH,
                    kinds: Some(&kinds),
                })
                .await?;
            for e in &events {
                if e.pdu.kind == ruma::events::TimelineEventType::RoomMember {
                    let joined = Membership::from_content(e.pdu.content.get()) == Some(Membership::Join);
                    if let Some(user) = e.pdu.state_key.as_deref().and_then(|k| OwnedUserId::try_from(k).ok())
                        && joined
                    {
                        seen.push(Seen::Joined(user, e.pos));
                    }
                } else if e.pdu.state_key.is_none() {
                    posts_here.insert(e.pdu.event_id.clone());
                    seen.push(Seen::Post(e.pdu.event_id.clone(), e.pos));
                }
            }
            match events.last() {
                Some(last) if events.len() == CATCH_UP_BATCH => after = last.pos,
                _ => break,
            }
        }
        let first = receipts_from == 0;
        if first || self.changes.receipts.changed_since(&room_id.to_owned(), receipts_from) {
            let receipts = self.store.receipts_since(room_id, receipts_from).await?;
            for r in receipts.iter().filter(|r| r.pos <= upto) {
                let unthreaded = r.thread_id.as_deref().is_none_or(|t| t == "main");
                if !matches!(r.receipt_type.as_str(), "m.read" | "m.read.private") || !unthreaded {
                    continue;
                }
                // A post the counter knows (or this catch-up found) is
                // placed from memory; any other event from the store.
                let known = || slot.counter.read().expect("view counter lock").posts.contains_key(&r.event_id);
                let at = if posts_here.contains(&r.event_id) || known() {
                    None
                } else {
                    self.store
                        .event(&r.event_id)
                        .await?
                        .filter(|e| e.pdu.room_id == room_id)
                        .map(|e| e.pos)
                };
                seen.push(Seen::Read(r.user_id.clone(), at, r.event_id.clone()));
            }
        }
        Ok(seen)
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
