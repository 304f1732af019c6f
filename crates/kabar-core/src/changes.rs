//! Where each user's and room's data last changed, so a sync can skip store
//! reads for what did not change since its token.
//!
//! A sync wake-up would otherwise read every section (memberships, account
//! data, receipts) from the store for every waiter after every message. With
//! a tracker a section costs one hash lookup when it has not changed.
//!
//! Only the applier records changes, in stream order, before it moves the
//! applied position past them; a sync answers up to the applied position, so
//! for every position it can answer about, the trackers are complete.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    hash::Hash,
    sync::{Arc, Mutex},
};

use kabar_store::StreamPos;
use ruma::{OwnedRoomId, OwnedUserId};

#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    /// The highest stream position of an applied change for this key.
    last: StreamPos,
    /// How many changes for this key were applied.
    generation: u64,
}

/// The position of the latest change per key.
pub struct ChangeTracker<K> {
    /// Changes before this position (from before the process started) are not
    /// tracked: anything older is answered "changed".
    baseline: StreamPos,
    entries: Mutex<HashMap<K, Entry>>,
}

impl<K: Eq + Hash + Clone> ChangeTracker<K> {
    pub fn new(baseline: StreamPos) -> Self {
        Self {
            baseline,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// A change for `key` committed at `pos` (called by the applier).
    pub(crate) fn record(&self, key: &K, pos: StreamPos) {
        let mut entries = self.entries.lock().expect("change tracker lock");
        let entry = entries.entry(key.clone()).or_default();
        entry.last = entry.last.max(pos);
        entry.generation += 1;
    }

    /// A number that changes whenever a change for `key` is applied, for
    /// caches of data without a stream position.
    pub fn generation(&self, key: &K) -> u64 {
        self.entries
            .lock()
            .expect("change tracker lock")
            .get(key)
            .map_or(0, |e| e.generation)
    }

    /// Whether `key` changed after position `since` (as far as applied).
    pub fn changed_since(&self, key: &K, since: StreamPos) -> bool {
        if since < self.baseline {
            return true;
        }
        match self.entries.lock().expect("change tracker lock").get(key) {
            Some(e) => e.last > since,
            None => false,
        }
    }
}

/// Values read from the store, each kept while its key's tracker generation
/// stays the same (see [`ChangeTracker::generation`]), for data a sync reads
/// on every pass and that changes rarely.
///
/// A value read while a change was committing but not yet applied is kept
/// under the generation before the change; applying the change moves the
/// generation, so the value is never served after that.
pub struct GenerationCache<K, V> {
    entries: Mutex<HashMap<K, (u64, V)>>,
    /// Past this many entries the cache starts over.
    max_entries: usize,
}

impl<K: Eq + Hash + Clone, V: Clone> GenerationCache<K, V> {
    pub fn new(max_entries: usize) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            max_entries,
        }
    }

    /// The value for `key`: from memory if `tracker` applied no change for
    /// it since it was read, else from `read`.
    pub async fn get_or_read<E>(&self, tracker: &ChangeTracker<K>, key: &K, read: impl Future<Output = Result<V, E>>) -> Result<V, E> {
        let generation = tracker.generation(key);
        if let Some((cached_at, value)) = self.entries.lock().expect("generation cache lock").get(key)
            && *cached_at == generation
        {
            return Ok(value.clone());
        }
        let value = read.await?;
        let mut entries = self.entries.lock().expect("generation cache lock");
        if entries.len() >= self.max_entries {
            entries.clear();
        }
        entries.insert(key.clone(), (generation, value.clone()));
        Ok(value)
    }
}

/// Bound on remembered changes per log; older ones are answered "unknown"
/// (the store, or a full recomputation, answers instead).
const MAX_LOGGED_CHANGES: usize = 200_000;

struct LogInner<K> {
    /// Changes at or before this position are not all remembered.
    floor: StreamPos,
    by_pos: BTreeMap<StreamPos, K>,
    latest: HashMap<K, StreamPos>,
}

/// Which keys changed, in stream order, each at its latest change: the
/// device-list changes that syncs and `/keys/changes` report, the rooms a
/// sliding-sync room list must look at again.
pub struct ChangeLog<K> {
    inner: Mutex<LogInner<K>>,
}

impl<K: Eq + Hash + Clone> ChangeLog<K> {
    /// A log that knows nothing up to `baseline`, the store's position at start.
    pub fn new(baseline: StreamPos) -> Self {
        Self {
            inner: Mutex::new(LogInner {
                floor: baseline,
                by_pos: BTreeMap::new(),
                latest: HashMap::new(),
            }),
        }
    }

    /// `key` changed at `pos` (called by the applier).
    pub(crate) fn record(&self, key: &K, pos: StreamPos) {
        let mut inner = self.inner.lock().expect("change log lock");
        if inner.latest.get(key).is_some_and(|p| *p >= pos) {
            return;
        }
        if let Some(old) = inner.latest.insert(key.clone(), pos) {
            inner.by_pos.remove(&old);
        }
        inner.by_pos.insert(pos, key.clone());
        while inner.by_pos.len() > MAX_LOGGED_CHANGES {
            let (oldest, key) = inner.by_pos.pop_first().expect("non-empty");
            inner.latest.remove(&key);
            inner.floor = inner.floor.max(oldest);
        }
    }

    /// Keys whose latest change is in `(since, until]`; `None` if `since`
    /// is older than the log.
    pub fn changed_between(&self, since: StreamPos, until: StreamPos) -> Option<Vec<K>> {
        self.changed_between_at_most(since, until, usize::MAX)
    }

    /// As [`Self::changed_between`], and `None` too when more than `limit`
    /// keys changed (the caller would do better to start over).
    pub fn changed_between_at_most(&self, since: StreamPos, until: StreamPos, limit: usize) -> Option<Vec<K>> {
        let inner = self.inner.lock().expect("change log lock");
        if since < inner.floor {
            return None;
        }
        if since >= until {
            return Some(vec![]);
        }
        let mut changed = vec![];
        for (_, key) in inner.by_pos.range(since + 1..=until) {
            if changed.len() == limit {
                return None;
            }
            changed.push(key.clone());
        }
        Some(changed)
    }
}

/// The trackers the sync engine consults, advanced by the applier alone.
pub struct Changes {
    /// A user's memberships (joins, invites, leaves, forgets).
    pub memberships: ChangeTracker<OwnedUserId>,
    /// A user's global and per-room account data.
    pub account_data: ChangeTracker<OwnedUserId>,
    /// Receipts in a room.
    pub receipts: ChangeTracker<OwnedRoomId>,
    /// Users whose devices or keys changed (what `/keys/query` shows of them).
    pub device_lists: ChangeLog<OwnedUserId>,
    /// Rooms with new events (sliding sync's room lists re-read these only).
    pub room_events: ChangeLog<OwnedRoomId>,
    /// A device's one-time and fallback keys (uploads and claims).
    pub one_time_keys: ChangeTracker<DeviceKey>,
    /// A device's queue of to-device messages.
    pub to_device: ChangeTracker<DeviceKey>,
}

/// A user's device, as a map key: a session's fields, so that a sync looks
/// its own device up without building a key.
pub type DeviceKey = kabar_store::Session;

impl Changes {
    /// Trackers that know of no change up to `baseline`, the store's position at start.
    pub fn new(baseline: StreamPos) -> Arc<Self> {
        Arc::new(Self {
            memberships: ChangeTracker::new(baseline),
            account_data: ChangeTracker::new(baseline),
            receipts: ChangeTracker::new(baseline),
            device_lists: ChangeLog::new(baseline),
            room_events: ChangeLog::new(baseline),
            one_time_keys: ChangeTracker::new(baseline),
            to_device: ChangeTracker::new(baseline),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_unchanged_after_the_baseline_only() {
        let t: ChangeTracker<&str> = ChangeTracker::new(10);
        assert!(!t.changed_since(&"a", 10));
        assert!(!t.changed_since(&"a", 50));
        assert!(t.changed_since(&"a", 9), "before the baseline nothing is known");
    }

    #[test]
    fn a_recorded_change_is_a_change_after_earlier_positions_only() {
        let t: ChangeTracker<&str> = ChangeTracker::new(0);
        t.record(&"a", 7);
        assert!(t.changed_since(&"a", 6));
        assert!(!t.changed_since(&"a", 7));
        assert!(!t.changed_since(&"b", 0));
        t.record(&"a", 5);
        assert!(!t.changed_since(&"a", 7), "an older position never moves the latest back");
    }

    #[test]
    fn generations_move_on_every_change() {
        let t: ChangeTracker<&str> = ChangeTracker::new(0);
        assert_eq!(t.generation(&"a"), 0);
        t.record(&"a", 3);
        assert_eq!(t.generation(&"a"), 1);
        t.record(&"a", 4);
        assert_eq!(t.generation(&"a"), 2);
        assert_eq!(t.generation(&"b"), 0);
    }

    #[tokio::test]
    async fn a_cached_value_is_served_until_its_key_changes() {
        let t: ChangeTracker<&str> = ChangeTracker::new(0);
        let cache: GenerationCache<&str, u32> = GenerationCache::new(10);
        let read = |v: u32| async move { Ok::<_, ()>(v) };
        assert_eq!(cache.get_or_read(&t, &"a", read(1)).await, Ok(1));
        assert_eq!(cache.get_or_read(&t, &"a", read(2)).await, Ok(1), "unchanged: from memory");
        t.record(&"a", 9);
        assert_eq!(cache.get_or_read(&t, &"a", read(3)).await, Ok(3), "changed: read again");
    }

    #[test]
    fn a_change_log_asked_for_at_most_n_keys_says_unknown_past_n() {
        let log: ChangeLog<u32> = ChangeLog::new(0);
        for (key, pos) in [(1, 1), (2, 2), (3, 3), (1, 4)] {
            log.record(&key, pos);
        }
        assert_eq!(
            log.changed_between_at_most(0, 4, 3),
            Some(vec![2, 3, 1]),
            "each key once, at its latest"
        );
        assert_eq!(log.changed_between_at_most(0, 4, 2), None);
        assert_eq!(log.changed_between_at_most(2, 4, 2), Some(vec![3, 1]));
        assert_eq!(log.changed_between_at_most(4, 4, 0), Some(vec![]));
    }

    #[test]
    fn the_change_log_lists_each_user_once_at_their_latest_change() {
        let log = ChangeLog::new(10);
        let (a, b) = (ruma::owned_user_id!("@a:x"), ruma::owned_user_id!("@b:x"));
        assert_eq!(log.changed_between(9, 20), None, "before the baseline the store must answer");
        log.record(&a, 11);
        log.record(&b, 12);
        assert_eq!(log.changed_between(10, 20).unwrap(), vec![a.clone(), b.clone()]);
        log.record(&a, 13);
        assert_eq!(log.changed_between(10, 20).unwrap(), vec![b.clone(), a.clone()]);
        assert_eq!(log.changed_between(12, 20).unwrap(), vec![a.clone()]);
        assert_eq!(log.changed_between(10, 12).unwrap(), vec![b.clone()], "until bounds the range");
        assert_eq!(log.changed_between(13, 20).unwrap(), Vec::<OwnedUserId>::new());
    }
}
