//! Wake-ups by interest.
//!
//! Every room and every user has a watch channel holding a change counter. A
//! waiting sync subscribes to its own user's channel and the channels of the
//! rooms it is in; a change wakes exactly the waiters subscribed to that room or
//! user. The cost of a send is one channel update, whatever the number of
//! rooms on the server; a big room has one channel, not one per member.

use std::{
    collections::HashMap,
    hash::Hash,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use futures::future::select_all;
use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};
use tokio::sync::watch;

struct Channels<K> {
    map: Mutex<HashMap<K, watch::Sender<u64>>>,
}

impl<K: Eq + Hash + Clone> Channels<K> {
    fn new() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
        }
    }

    fn bump(&self, key: &K, serial: u64) {
        let map = self.map.lock().expect("notifier lock");
        if let Some(tx) = map.get(key) {
            tx.send_replace(serial);
        }
    }

    fn subscribe(&self, key: &K) -> watch::Receiver<u64> {
        let mut map = self.map.lock().expect("notifier lock");
        if map.len() > 4096 && map.len().is_power_of_two() {
            // Drop channels nobody listens to any more, so the map stays bounded
            // by the number of live waiters rather than every room ever seen.
            map.retain(|_, tx| tx.receiver_count() > 0);
        }
        map.entry(key.clone()).or_insert_with(|| watch::channel(0).0).subscribe()
    }
}

pub struct Notifier {
    rooms: Channels<OwnedRoomId>,
    users: Channels<OwnedUserId>,
    serial: AtomicU64,
    /// Set once at shutdown: every wait ends and none starts.
    closing: watch::Sender<bool>,
}

impl Default for Notifier {
    fn default() -> Self {
        Self::new()
    }
}

/// A set of subscriptions taken before the caller checks for news, so that no
/// change between the check and the wait is missed.
pub struct Interest {
    receivers: Vec<watch::Receiver<u64>>,
    closing: watch::Receiver<bool>,
}

impl Interest {
    /// Waits until any subscribed room or user changes, or `timeout` passes,
    /// or the server starts shutting down. Returns whether something changed.
    pub async fn wait(mut self, timeout: Duration) -> bool {
        let changed = async {
            if self.receivers.is_empty() {
                std::future::pending::<()>().await;
            }
            let _ = select_all(self.receivers.iter_mut().map(|r| Box::pin(r.changed()))).await;
        };
        tokio::select! {
            _ = changed => true,
            _ = self.closing.wait_for(|c| *c) => false,
            _ = tokio::time::sleep(timeout) => false,
        }
    }
}

impl Notifier {
    pub fn new() -> Self {
        Self {
            rooms: Channels::new(),
            users: Channels::new(),
            serial: AtomicU64::new(1),
            closing: watch::channel(false).0,
        }
    }

    /// Ends every wait now and every later one at once: the server is
    /// shutting down, and waiting syncs should be answered, not dropped.
    pub fn close(&self) {
        self.closing.send_replace(true);
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closing(&self) -> bool {
        *self.closing.borrow()
    }

    fn next(&self) -> u64 {
        self.serial.fetch_add(1, Ordering::Relaxed)
    }

    pub fn room_changed(&self, room_id: &RoomId) {
        self.rooms.bump(&room_id.to_owned(), self.next());
    }

    pub fn user_changed(&self, user_id: &UserId) {
        self.users.bump(&user_id.to_owned(), self.next());
    }

    pub fn interest<'a>(&self, user_id: &UserId, rooms: impl IntoIterator<Item = &'a RoomId>) -> Interest {
        let mut receivers = vec![self.users.subscribe(&user_id.to_owned())];
        receivers.extend(rooms.into_iter().map(|r| self.rooms.subscribe(&r.to_owned())));
        for r in &mut receivers {
            r.mark_unchanged();
        }
        Interest {
            receivers,
            closing: self.closing.subscribe(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::{room_id, user_id};

    #[tokio::test]
    async fn a_room_change_wakes_its_waiters_only() {
        let n = std::sync::Arc::new(Notifier::new());
        let in_room = n.interest(user_id!("@a:x"), [room_id!("!r:x")]);
        let elsewhere = n.interest(user_id!("@b:x"), [room_id!("!other:x")]);
        let n2 = n.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            n2.room_changed(room_id!("!r:x"));
        });
        let start = std::time::Instant::now();
        assert!(in_room.wait(Duration::from_secs(5)).await);
        assert!(start.elapsed() < Duration::from_secs(1));
        assert!(!elsewhere.wait(Duration::from_millis(50)).await);
    }

    #[tokio::test]
    async fn a_change_before_waiting_is_not_lost() {
        let n = Notifier::new();
        let interest = n.interest(user_id!("@a:x"), []);
        n.user_changed(user_id!("@a:x"));
        assert!(interest.wait(Duration::from_millis(10)).await);
    }

    #[tokio::test]
    async fn closing_ends_waits_at_once() {
        let n = std::sync::Arc::new(Notifier::new());
        let waiting = n.interest(user_id!("@a:x"), [room_id!("!r:x")]);
        let n2 = n.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            n2.close();
        });
        let start = std::time::Instant::now();
        assert!(!waiting.wait(Duration::from_secs(30)).await, "nothing changed");
        assert!(start.elapsed() < Duration::from_secs(5));
        let later = n.interest(user_id!("@a:x"), []);
        let start = std::time::Instant::now();
        assert!(!later.wait(Duration::from_secs(30)).await);
        assert!(start.elapsed() < Duration::from_secs(1), "a wait after closing ends at once");
        assert!(n.is_closing());
    }
}
