//! Where each user's and room's data last changed, so a sync can skip store
//! reads for what did not change since its token.
//!
//! A sync wake-up would otherwise read every section (memberships, account
//! data, receipts) from the store for every waiter after every message. With
//! a tracker a section costs one hash lookup when it has not changed.
//!
//! The answer is conservative: "changed" may be said of something that did
//! not change (a failed write, a position rounded up), never the reverse. A
//! write registers itself before it starts and records its position after it
//! commits, so a reader in between sees "changed" and goes to the store.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    hash::Hash,
    sync::{Arc, Mutex},
};

use kabar_store::StreamPos;
use ruma::{OwnedRoomId, OwnedUserId, UserId};

#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    /// Writes for this key that started and have not finished.
    in_flight: u32,
    /// The highest stream position a finished write for this key had.
    last: StreamPos,
    /// How many writes for this key ever started.
    generation: u64,
}

/// The position of the latest change per key.
pub struct ChangeTracker<K> {
    /// Changes before this position (from before the process started) are not
    /// tracked: anything older is answered "changed".
    baseline: StreamPos,
    entries: Mutex<HashMap<K, Entry>>,
}

/// A write in progress; `finish` records its position. Dropped unfinished (the
/// write failed), it only ends the in-flight mark.
#[must_use = "a change must be finished with its position"]
pub struct PendingChange<'a, K: Eq + Hash + Clone> {
    tracker: &'a ChangeTracker<K>,
    key: Option<K>,
}

impl<K: Eq + Hash + Clone> PendingChange<'_, K> {
    /// The write committed at `pos` (or earlier: a later position is safe).
    pub fn finish(mut self, pos: StreamPos) {
        if let Some(key) = self.key.take() {
            self.tracker.end(&key, Some(pos));
        }
    }
}

impl<K: Eq + Hash + Clone> Drop for PendingChange<'_, K> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.tracker.end(&key, None);
        }
    }
}

impl<K: Eq + Hash + Clone> ChangeTracker<K> {
    pub fn new(baseline: StreamPos) -> Self {
        Self {
            baseline,
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Marks a write for `key` as started; call before the write begins.
    pub fn begin(&self, key: &K) -> PendingChange<'_, K> {
        let mut entries = self.entries.lock().expect("change tracker lock");
        let entry = entries.entry(key.clone()).or_default();
        entry.in_flight += 1;
        entry.generation += 1;
        drop(entries);
        PendingChange {
            tracker: self,
            key: Some(key.clone()),
        }
    }

    fn end(&self, key: &K, pos: Option<StreamPos>) {
        let mut entries = self.entries.lock().expect("change tracker lock");
        if let Some(e) = entries.get_mut(key) {
            e.in_flight = e.in_flight.saturating_sub(1);
            if let Some(pos) = pos {
                e.last = e.last.max(pos);
            }
        }
    }

    /// A number that changes whenever a write for `key` starts, for caches of
    /// data without a stream position; `None` while a write is in flight (a
    /// read now might or might not see it, so it must not be cached).
    pub fn generation(&self, key: &K) -> Option<u64> {
        match self.entries.lock().expect("change tracker lock").get(key) {
            Some(e) if e.in_flight > 0 => None,
            Some(e) => Some(e.generation),
            None => Some(0),
        }
    }

    /// Whether `key` may have changed after position `since`.
    pub fn changed_since(&self, key: &K, since: StreamPos) -> bool {
        if since < self.baseline {
            return true;
        }
        match self.entries.lock().expect("change tracker lock").get(key) {
            Some(e) => e.in_flight > 0 || e.last > since,
            None => false,
        }
    }
}

/// Values read from the store, each kept while its key's tracker generation
/// stays the same (see [`ChangeTracker::generation`]), for data a sync reads
/// on every pass and that changes rarely.
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

    /// The value for `key`: from memory if `tracker` saw no write for it
    /// since it was read, else from `read` (kept unless a write is in flight).
    pub async fn get_or_read<E>(&self, tracker: &ChangeTracker<K>, key: &K, read: impl Future<Output = Result<V, E>>) -> Result<V, E> {
        let generation = tracker.generation(key);
        if let Some(generation) = generation
            && let Some((cached_at, value)) = self.entries.lock().expect("generation cache lock").get(key)
            && *cached_at == generation
        {
            return Ok(value.clone());
        }
        let value = read.await?;
        if let Some(generation) = generation {
            let mut entries = self.entries.lock().expect("generation cache lock");
            if entries.len() >= self.max_entries {
                entries.clear();
            }
            entries.insert(key.clone(), (generation, value.clone()));
        }
        Ok(value)
    }
}

/// Bound on remembered device-list changes; older ones are read from the store.
const MAX_LOGGED_CHANGES: usize = 200_000;

#[derive(Default)]
struct LogInner {
    /// Changes at or before this position are not all remembered.
    floor: StreamPos,
    by_pos: BTreeMap<StreamPos, OwnedUserId>,
    latest: HashMap<OwnedUserId, StreamPos>,
    in_flight: HashMap<OwnedUserId, u32>,
}

/// Which users changed, in stream order: the device-list changes that syncs
/// and `/keys/changes` report. Like [`ChangeTracker`] it is conservative: a
/// user whose change is being written counts as changed.
pub struct ChangeLog {
    inner: Mutex<LogInner>,
}

/// A logged change in progress; see [`PendingChange`].
#[must_use = "a change must be finished with its position"]
pub struct PendingLogEntry<'a> {
    log: &'a ChangeLog,
    user: Option<OwnedUserId>,
}

impl PendingLogEntry<'_> {
    /// The write committed at `pos`; `None` if it turned out to change nothing.
    pub fn finish(mut self, pos: Option<StreamPos>) {
        if let Some(user) = self.user.take() {
            self.log.end(user, pos);
        }
    }
}

impl Drop for PendingLogEntry<'_> {
    fn drop(&mut self) {
        if let Some(user) = self.user.take() {
            self.log.end(user, None);
        }
    }
}

impl ChangeLog {
    /// A log that knows nothing up to `baseline`, the store's position at start.
    pub fn new(baseline: StreamPos) -> Self {
        Self {
            inner: Mutex::new(LogInner {
                floor: baseline,
                ..LogInner::default()
            }),
        }
    }

    pub fn begin(&self, user: &UserId) -> PendingLogEntry<'_> {
        *self
            .inner
            .lock()
            .expect("change log lock")
            .in_flight
            .entry(user.to_owned())
            .or_default() += 1;
        PendingLogEntry {
            log: self,
            user: Some(user.to_owned()),
        }
    }

    fn end(&self, user: OwnedUserId, pos: Option<StreamPos>) {
        let mut inner = self.inner.lock().expect("change log lock");
        if let Some(n) = inner.in_flight.get_mut(&user) {
            *n -= 1;
            if *n == 0 {
                inner.in_flight.remove(&user);
            }
        }
        let Some(pos) = pos else { return };
        if let Some(old) = inner.latest.insert(user.clone(), pos) {
            inner.by_pos.remove(&old);
        }
        inner.by_pos.insert(pos, user);
        while inner.by_pos.len() > MAX_LOGGED_CHANGES {
            let (oldest, user) = inner.by_pos.pop_first().expect("non-empty");
            inner.latest.remove(&user);
            inner.floor = inner.floor.max(oldest);
        }
    }

    /// Users whose latest change is in `(since, until]`, and users with a
    /// change being written; `None` if `since` is older than the log.
    pub fn changed_between(&self, since: StreamPos, until: StreamPos) -> Option<Vec<OwnedUserId>> {
        let inner = self.inner.lock().expect("change log lock");
        if since < inner.floor {
            return None;
        }
        let mut users: Vec<OwnedUserId> = inner.in_flight.keys().cloned().collect();
        if since < until {
            users.extend(inner.by_pos.range(since + 1..=until).map(|(_, u)| u.clone()));
        }
        Some(users)
    }
}

/// The trackers the sync engine consults, shared with the services that write.
pub struct Changes {
    /// A user's memberships (joins, invites, leaves, forgets).
    pub memberships: ChangeTracker<OwnedUserId>,
    /// A user's global and per-room account data.
    pub account_data: ChangeTracker<OwnedUserId>,
    /// Receipts in a room.
    pub receipts: ChangeTracker<OwnedRoomId>,
    /// Users whose devices or keys changed (what `/keys/query` shows of them).
    pub device_lists: ChangeLog,
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
    fn a_write_in_flight_counts_as_a_change() {
        let t: ChangeTracker<&str> = ChangeTracker::new(0);
        let pending = t.begin(&"a");
        assert!(t.changed_since(&"a", 100));
        assert!(!t.changed_since(&"b", 100));
        pending.finish(7);
        assert!(t.changed_since(&"a", 6));
        assert!(!t.changed_since(&"a", 7));
    }

    #[test]
    fn a_failed_write_ends_its_mark_without_a_position() {
        let t: ChangeTracker<&str> = ChangeTracker::new(0);
        t.begin(&"a").finish(5);
        drop(t.begin(&"a"));
        assert!(!t.changed_since(&"a", 5));
    }

    #[test]
    fn generations_move_on_every_write_and_are_withheld_while_one_runs() {
        let t: ChangeTracker<&str> = ChangeTracker::new(0);
        assert_eq!(t.generation(&"a"), Some(0));
        let pending = t.begin(&"a");
        assert_eq!(t.generation(&"a"), None);
        pending.finish(3);
        assert_eq!(t.generation(&"a"), Some(1));
        drop(t.begin(&"a"));
        assert_eq!(t.generation(&"a"), Some(2), "a failed write may still have changed something");
    }

    #[test]
    fn the_change_log_lists_each_user_once_at_their_latest_change() {
        let log = ChangeLog::new(10);
        let (a, b) = (ruma::owned_user_id!("@a:x"), ruma::owned_user_id!("@b:x"));
        assert_eq!(log.changed_between(9, 20), None, "before the baseline the store must answer");
        log.begin(&a).finish(Some(11));
        let pending = log.begin(&b);
        assert_eq!(
            log.changed_between(10, 20).unwrap(),
            vec![b.clone(), a.clone()],
            "a write in flight counts"
        );
        pending.finish(Some(12));
        log.begin(&a).finish(Some(13));
        assert_eq!(log.changed_between(10, 20).unwrap(), vec![b.clone(), a.clone()]);
        assert_eq!(log.changed_between(12, 20).unwrap(), vec![a.clone()]);
        assert_eq!(log.changed_between(10, 12).unwrap(), vec![b.clone()], "until bounds the range");
        log.begin(&b).finish(None);
        assert_eq!(
            log.changed_between(13, 20).unwrap(),
            Vec::<OwnedUserId>::new(),
            "a write that changed nothing"
        );
    }

    #[test]
    fn overlapping_writes_stay_changed_until_both_end() {
        let t: ChangeTracker<&str> = ChangeTracker::new(0);
        let first = t.begin(&"a");
        let second = t.begin(&"a");
        second.finish(9);
        assert!(t.changed_since(&"a", 9), "the first write is still running");
        first.finish(8);
        assert!(!t.changed_since(&"a", 9));
        assert!(t.changed_since(&"a", 8));
    }
}
