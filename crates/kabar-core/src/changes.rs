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
    /// The generation of the key's latest change (see [`ChangeTracker::generation`]).
    generation: u64,
}

/// Keys a tracker remembers at most; past it, the half changed longest ago
/// are let go (a million subscribers joining a channel each changed their
/// memberships once).
const MAX_TRACKED_KEYS: usize = 200_000;

/// The position of the latest change per key.
pub struct ChangeTracker<K> {
    inner: Mutex<TrackerInner<K>>,
    max_keys: usize,
}

struct TrackerInner<K> {
    /// Changes at or before this position are not all remembered: a key
    /// without an entry is answered "changed" after any earlier position.
    /// The store's position at start (nothing before it is tracked), raised
    /// when keys are let go.
    floor: StreamPos,
    entries: HashMap<K, Entry>,
    /// The last generation handed out. Generations come from one counter,
    /// so a key that was let go and changes again never gets one it had.
    generations: u64,
    /// The generation of a key without an entry: moved on whenever keys
    /// are let go, so what was cached under a let-go key is read again.
    absent_generation: u64,
}

impl<K: Eq + Hash + Clone> ChangeTracker<K> {
    pub fn new(baseline: StreamPos) -> Self {
        Self::with_max_keys(baseline, MAX_TRACKED_KEYS)
    }

    /// A tracker that remembers at most `max_keys` keys.
    pub fn with_max_keys(baseline: StreamPos, max_keys: usize) -> Self {
        Self {
            inner: Mutex::new(TrackerInner {
                floor: baseline,
                entries: HashMap::new(),
                generations: 0,
                absent_generation: 0,
            }),
            max_keys: max_keys.max(2),
        }
    }

    /// A change for `key` committed at `pos` (called by the applier).
    pub(crate) fn record(&self, key: &K, pos: StreamPos) {
        let mut inner = self.inner.lock().expect("change tracker lock");
        inner.generations += 1;
        let generation = inner.generations;
        let entry = inner.entries.entry(key.clone()).or_default();
        entry.last = entry.last.max(pos);
        entry.generation = generation;
        if inner.entries.len() > self.max_keys {
            inner.let_go_oldest_half();
        }
    }

    /// A number that changes whenever a change for `key` is applied, for
    /// caches of data without a stream position.
    pub fn generation(&self, key: &K) -> u64 {
        let inner = self.inner.lock().expect("change tracker lock");
        inner.entries.get(key).map_or(inner.absent_generation, |e| e.generation)
    }

    /// Whether `key` changed after position `since` (as far as applied).
    pub fn changed_since(&self, key: &K, since: StreamPos) -> bool {
        let inner = self.inner.lock().expect("change tracker lock");
        match inner.entries.get(key) {
            Some(e) => e.last > since,
            None => since < inner.floor,
        }
    }
}

impl<K: Eq + Hash> TrackerInner<K> {
    /// Lets go of the keys whose latest change is at or before the median
    /// one, raising the floor to it: what is asked of them from before it
    /// is answered "changed" (the store answers instead).
    fn let_go_oldest_half(&mut self) {
        let mut lasts: Vec<StreamPos> = self.entries.values().map(|e| e.last).collect();
        let middle = lasts.len() / 2;
        let (_, median, _) = lasts.select_nth_unstable(middle);
        let median = *median;
        self.entries.retain(|_, e| e.last > median);
        self.floor = self.floor.max(median);
        self.generations += 1;
        self.absent_generation = self.generations;
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
    /// Receipts in a room, anyone's.
    pub receipts: ChangeTracker<OwnedRoomId>,
    /// A user's own receipts in a room: in a channel, the only ones they
    /// are told of (`SyncEngine::receipts_told`).
    pub own_receipts: ChangeTracker<(OwnedRoomId, OwnedUserId)>,
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
            own_receipts: ChangeTracker::new(baseline),
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
    async fn keys_let_go_past_the_limit_are_changed_since_before_the_floor_and_read_again() {
        let t: ChangeTracker<u32> = ChangeTracker::with_max_keys(0, 4);
        let cache: GenerationCache<u32, u32> = GenerationCache::new(10);
        let read = |v: u32| async move { Ok::<_, ()>(v) };
        assert_eq!(cache.get_or_read(&t, &1, read(10)).await, Ok(10), "cached before key 1 changes");
        for key in 1..=5 {
            t.record(&key, u64::from(key) * 10);
        }
        // Past 4 keys, those changed at or before the median (30) go.
        for key in [1, 2, 3] {
            assert!(t.changed_since(&key, 29), "key {key}: not known, so changed");
            assert!(!t.changed_since(&key, 30), "key {key}: nothing after the floor");
        }
        assert!(t.changed_since(&4, 39) && !t.changed_since(&4, 40), "kept keys answer exactly");
        assert!(t.changed_since(&4, 5), "from before the floor, a kept key still answers exactly");
        assert!(
            t.changed_since(&9, 0) && !t.changed_since(&9, 30),
            "a key never seen is like one let go"
        );
        assert_eq!(
            cache.get_or_read(&t, &1, read(11)).await,
            Ok(11),
            "a key let go after it changed is read again, not served from before its change"
        );
        t.record(&1, 60);
        assert!(t.changed_since(&1, 50));
        assert_eq!(cache.get_or_read(&t, &1, read(12)).await, Ok(12), "and again after its next change");
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
