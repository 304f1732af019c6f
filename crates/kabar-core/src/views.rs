//! View counts of channel posts (the rule is `kabar_domain::channel::ViewCounter`),
//! worked out from what is committed: a channel's counter catches up from
//! the store (posts, first joins, read receipts after its position) when
//! asked, so every node answers alike and a restart loses nothing.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
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
    channels: Mutex<HashMap<OwnedRoomId, Arc<AsyncMutex<Channel>>>>,
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
        let channel = self
            .channels
            .lock()
            .expect("view counts lock")
            .entry(room_id.to_owned())
            .or_default()
            .clone();
        let mut channel = channel.lock().await;
        if channel.upto < upto {
            self.catch_up(room_id, &mut channel, upto, room_last_pos).await?;
        }
        Ok(positions.iter().map(|p| channel.counter.views(*p)).collect())
    }

    async fn catch_up(&self, room_id: &RoomId, channel: &mut Channel, upto: StreamPos, room_last_pos: StreamPos) -> Result<()> {
        let kinds: Vec<String> = POST_TYPES.iter().chain(["m.room.member"].iter()).map(|k| k.to_string()).collect();
        while room_last_pos > channel.upto {
            let events = self
                .store
                .room_events(EventRange {
                    room_id,
                    after: channel.upto,
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
                        channel.counter.joined(&user, e.pos);
                    }
                } else if e.pdu.state_key.is_none() {
                    channel.counter.add_post(e.pos);
                    channel.posts.insert(e.pdu.event_id.clone(), e.pos);
                }
            }
            match events.last() {
                Some(last) if events.len() == CATCH_UP_BATCH => channel.upto = last.pos,
                _ => break,
            }
        }
        channel.upto = upto;
        let first = channel.receipts_upto == 0;
        if first || self.changes.receipts.changed_since(&room_id.to_owned(), channel.receipts_upto) {
            let receipts = self.store.receipts_since(room_id, channel.receipts_upto).await?;
            for r in receipts.iter().filter(|r| r.pos <= upto) {
                let unthreaded = r.thread_id.as_deref().is_none_or(|t| t == "main");
                if !matches!(r.receipt_type.as_str(), "m.read" | "m.read.private") || !unthreaded {
                    continue;
                }
                let at = match channel.posts.get(&r.event_id) {
                    Some(pos) => Some(*pos),
                    None => self
                        .store
                        .event(&r.event_id)
                        .await?
                        .filter(|e| e.pdu.room_id == room_id)
                        .map(|e| e.pos),
                };
                if let Some(at) = at {
                    channel.counter.read_to(&r.user_id, at);
                }
            }
        }
        channel.receipts_upto = upto;
        Ok(())
    }
}
