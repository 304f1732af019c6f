//! The stream of committed changes: what every write changed, at its
//! position, in commit order.
//!
//! Everything the server keeps in memory about stored data (room caches,
//! change trackers, the token cache) and every wake-up of a waiting sync is
//! derived from this stream and nothing else. A store hands the batches it
//! commits to its listener as they commit ([`StreamStore::set_commit_listener`]) and
//! replays them from the database after any position
//! ([`StreamStore::updates_after`]), so updates written by another process on
//! the same database arrive the same way, only later.
//!
//! A store hands its own commits to its listener synchronously, before it
//! answers the writers: a writer that gets its answer finds its change
//! already applied, with no task switch on the way.

use std::sync::Arc;

use async_trait::async_trait;
use ruma::{OwnedRoomId, OwnedUserId};

use crate::{StoreResult, StoredEvent, StreamPos};

/// What one committed write changed, as the rest of the server must learn it.
#[derive(Debug, Clone)]
pub enum Change {
    /// An event was appended to a room (membership changes are events too).
    Event(Arc<StoredEvent>),
    /// The user's global or per-room account data.
    AccountData { user_id: OwnedUserId },
    /// A receipt in the room, by `user_id` (`None` in records written before
    /// receipts named their user: whose it was is unknown).
    Receipt {
        room_id: OwnedRoomId,
        user_id: Option<OwnedUserId>,
    },
    /// What `/keys/query` shows of the user: devices, their keys, cross-signing
    /// keys, signatures.
    DeviceList { user_id: OwnedUserId },
    /// A device's one-time or fallback keys (an upload or a claim).
    OneTimeKeys { user_id: OwnedUserId, device_id: String },
    /// Messages were queued for a device.
    ToDevice { user_id: OwnedUserId, device_id: String },
    /// The user's list of rooms changed without an event (a forgotten room).
    Memberships { user_id: OwnedUserId },
    /// The user's access tokens changed: a device signed in, was replaced,
    /// removed, or the user was deactivated. Cached tokens must be checked again.
    Sessions { user_id: OwnedUserId },
}

impl Change {
    /// A short name for logs and tests.
    pub fn kind(&self) -> &'static str {
        match self {
            Change::Event(_) => "event",
            Change::AccountData { .. } => "account_data",
            Change::Receipt { .. } => "receipt",
            Change::DeviceList { .. } => "device_list",
            Change::OneTimeKeys { .. } => "one_time_keys",
            Change::ToDevice { .. } => "to_device",
            Change::Memberships { .. } => "memberships",
            Change::Sessions { .. } => "sessions",
        }
    }

    /// What a change that is not an event is recorded under: its user,
    /// room and device (`None` for an event, whose row is its record).
    pub fn record(&self) -> Option<(Option<&str>, Option<&str>, Option<&str>)> {
        Some(match self {
            Change::Event(_) => return None,
            Change::AccountData { user_id }
            | Change::DeviceList { user_id }
            | Change::Memberships { user_id }
            | Change::Sessions { user_id } => (Some(user_id.as_str()), None, None),
            Change::Receipt { room_id, user_id } => (user_id.as_ref().map(|u| u.as_str()), Some(room_id.as_str()), None),
            Change::OneTimeKeys { user_id, device_id } | Change::ToDevice { user_id, device_id } => {
                (Some(user_id.as_str()), None, Some(device_id.as_str()))
            }
        })
    }

    /// A change read back from its record (see [`record`](Self::record)).
    pub fn from_record(kind: &str, user: Option<String>, room: Option<String>, device: Option<String>) -> Result<Change, String> {
        let named_user = user.is_some();
        let user = || OwnedUserId::try_from(user.clone().unwrap_or_default()).map_err(|e| format!("{kind}: {e}"));
        let device = || device.clone().unwrap_or_default();
        Ok(match kind {
            "account_data" => Change::AccountData { user_id: user()? },
            "receipt" => Change::Receipt {
                room_id: OwnedRoomId::try_from(room.clone().unwrap_or_default()).map_err(|e| format!("{kind}: {e}"))?,
                user_id: named_user.then(user).transpose()?,
            },
            "device_list" => Change::DeviceList { user_id: user()? },
            "one_time_keys" => Change::OneTimeKeys {
                user_id: user()?,
                device_id: device(),
            },
            "to_device" => Change::ToDevice {
                user_id: user()?,
                device_id: device(),
            },
            "memberships" => Change::Memberships { user_id: user()? },
            "sessions" => Change::Sessions { user_id: user()? },
            other => return Err(format!("unknown stream change kind {other}")),
        })
    }
}

/// A replay's answer from what an engine read after `after` and up to
/// `head`: at most `limit` events and at most `limit` other changes, each in
/// position order. A list the limit cut is complete only up to its last
/// position (for changes, the one before it: several may share it), and
/// the answer stops there.
pub fn replay_batch(
    after: StreamPos,
    head: StreamPos,
    limit: usize,
    events: Vec<StoredEvent>,
    changes: Vec<StreamUpdate>,
) -> CommittedBatch {
    let mut complete = head;
    if events.len() == limit {
        complete = complete.min(events.last().map_or(head, |e| e.pos));
    }
    if changes.len() == limit {
        complete = complete.min(changes.last().map_or(head, |u| u.pos.saturating_sub(1)).max(after));
    }
    let mut updates: Vec<StreamUpdate> = events
        .into_iter()
        .map(|e| StreamUpdate {
            pos: e.pos,
            change: Change::Event(Arc::new(e)),
        })
        .chain(changes)
        .filter(|u| u.pos <= complete)
        .collect();
    updates.sort_by_key(|u| u.pos);
    CommittedBatch {
        after,
        head: complete,
        updates,
    }
}

/// One change at its stream position. One write may make several changes at
/// one position (a signature upload changes several users' device lists).
#[derive(Debug, Clone)]
pub struct StreamUpdate {
    pub pos: StreamPos,
    pub change: Change,
}

/// The updates at positions in `(after, head]`, in position order. Every
/// position in that range that holds an update is in `updates`; positions
/// without one were never used.
#[derive(Debug, Clone, Default)]
pub struct CommittedBatch {
    pub after: StreamPos,
    pub head: StreamPos,
    pub updates: Vec<StreamUpdate>,
}

/// Told of every batch a store handle commits, in commit order.
pub trait CommitListener: Send + Sync {
    /// Called once per committed batch, after the commit and before any
    /// writer in it is answered, on the engine's writing thread: it must not
    /// block, and a writer answered afterwards finds its change applied.
    fn committed(&self, batch: &CommittedBatch);
}

/// The stream as the store keeps it.
///
/// **Position invariant:** a position is visible to readers (returned by
/// [`committed_position`](Self::committed_position), replayed by
/// [`updates_after`](Self::updates_after)) only once every position below it
/// is committed or will never be used. A reader can therefore take "I have
/// everything up to `n`" literally, however many writers there are.
#[async_trait]
pub trait StreamStore: Send + Sync {
    /// The highest position this handle knows to be committed (its own
    /// commits, and the database's head as last read).
    fn current_position(&self) -> StreamPos;
    /// The database's committed head now, other writers' commits included.
    async fn committed_position(&self) -> StoreResult<StreamPos>;
    /// The updates after `after`, oldest first, covering at most about
    /// `limit` positions: `head` says how far the answer is complete.
    async fn updates_after(&self, after: StreamPos, limit: usize) -> StoreResult<CommittedBatch>;
    /// From now on, every batch this handle commits is handed to `listener`
    /// (see [`CommitListener`]). One listener: a second call replaces the first.
    fn set_commit_listener(&self, listener: std::sync::Arc<dyn CommitListener>);
}
