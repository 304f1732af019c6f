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
    collections::HashMap,
    hash::Hash,
    sync::{Arc, Mutex},
};

use kabar_store::StreamPos;
use ruma::{OwnedRoomId, OwnedUserId};

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

/// The trackers the sync engine consults, shared with the services that write.
pub struct Changes {
    /// A user's memberships (joins, invites, leaves, forgets).
    pub memberships: ChangeTracker<OwnedUserId>,
    /// A user's global and per-room account data.
    pub account_data: ChangeTracker<OwnedUserId>,
    /// Receipts in a room.
    pub receipts: ChangeTracker<OwnedRoomId>,
}

impl Changes {
    /// Trackers that know of no change up to `baseline`, the store's position at start.
    pub fn new(baseline: StreamPos) -> Arc<Self> {
        Arc::new(Self {
            memberships: ChangeTracker::new(baseline),
            account_data: ChangeTracker::new(baseline),
            receipts: ChangeTracker::new(baseline),
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
