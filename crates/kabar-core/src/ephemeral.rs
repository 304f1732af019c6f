//! Typing notifications and presence: in memory, never stored.
//!
//! Both change often and matter only while fresh, so they live in memory with
//! their own serial counter, which sync tokens carry next to the stream position.
//!
//! With several nodes, each change is also sent on the bus, and every node
//! applies what it hears as if it were its own (with its own serial). That
//! is best effort: a client whose long-poll moves to another node gets that
//! node's whole current typing and presence state when its token is ahead
//! of the node's counter (duplicates, never harmful), and may miss a change
//! that reached the two nodes at different moments; the next change (typing
//! is refreshed every few seconds while someone types) repairs it.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ruma::{OwnedRoomId, OwnedUserId, RoomId, UserId};

use kabar_bus::{Bus, BusMessage, FromNode};
use tokio::sync::broadcast;

use crate::notifier::Notifier;

const MAX_TYPING_TIMEOUT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone)]
pub struct PresenceState {
    pub presence: String,
    pub status_msg: Option<String>,
    pub last_active: Instant,
    pub serial: u64,
}

struct RoomTyping {
    users: BTreeMap<OwnedUserId, Instant>,
    serial: u64,
}

pub struct Ephemeral {
    serial: AtomicU64,
    /// The serial of the latest presence change of anyone, so that a sync can
    /// skip looking at its rooms' members when nobody's presence changed.
    last_presence_change: AtomicU64,
    typing: Mutex<HashMap<OwnedRoomId, RoomTyping>>,
    presence: Mutex<HashMap<OwnedUserId, PresenceState>>,
    notifier: Arc<Notifier>,
    /// Tells the other nodes of this node's changes.
    bus: Arc<dyn Bus>,
}

impl Ephemeral {
    pub fn new(notifier: Arc<Notifier>, bus: Arc<dyn Bus>) -> Self {
        Self {
            serial: AtomicU64::new(1),
            last_presence_change: AtomicU64::new(0),
            typing: Mutex::default(),
            presence: Mutex::default(),
            notifier,
            bus,
        }
    }

    /// Applies the typing and presence changes other nodes tell of, until
    /// the bus closes.
    pub async fn hear_other_nodes(self: Arc<Self>) {
        let mut heard = self.bus.news();
        loop {
            match heard.recv().await {
                Ok(FromNode { message, .. }) => self.apply_remote(message),
                // Missed changes are repaired by the next ones (best effort).
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "typing or presence changes from other nodes were missed")
                }
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    fn apply_remote(&self, message: BusMessage) {
        match message {
            BusMessage::Typing {
                room_id,
                user_id,
                typing,
                timeout_ms,
            } => {
                if let (Ok(room), Ok(user)) = (OwnedRoomId::try_from(room_id), OwnedUserId::try_from(user_id)) {
                    self.apply_typing(&room, &user, typing, Duration::from_millis(timeout_ms));
                }
            }
            BusMessage::Presence {
                user_id,
                presence,
                status_msg,
            } => {
                if let Ok(user) = OwnedUserId::try_from(user_id) {
                    self.apply_presence(&user, &presence, status_msg);
                }
            }
            BusMessage::Committed { .. } | BusMessage::Heartbeat(_) | BusMessage::Missed => {}
        }
    }

    pub fn serial(&self) -> u64 {
        self.serial.load(Ordering::Acquire)
    }

    fn bump(&self) -> u64 {
        self.serial.fetch_add(1, Ordering::AcqRel) + 1
    }

    pub fn set_typing(&self, room_id: &RoomId, user_id: &UserId, typing: bool, timeout: Duration) {
        self.apply_typing(room_id, user_id, typing, timeout);
        self.bus.publish(BusMessage::Typing {
            room_id: room_id.to_string(),
            user_id: user_id.to_string(),
            typing,
            timeout_ms: timeout.min(MAX_TYPING_TIMEOUT).as_millis() as u64,
        });
    }

    fn apply_typing(&self, room_id: &RoomId, user_id: &UserId, typing: bool, timeout: Duration) {
        let serial = self.bump();
        {
            let mut map = self.typing.lock().expect("typing lock");
            let room = map.entry(room_id.to_owned()).or_insert_with(|| RoomTyping {
                users: BTreeMap::new(),
                serial,
            });
            if typing {
                room.users
                    .insert(user_id.to_owned(), Instant::now() + timeout.min(MAX_TYPING_TIMEOUT));
            } else {
                room.users.remove(user_id);
            }
            room.serial = serial;
        }
        self.notifier.room_changed(room_id);
    }

    /// Users typing in the room now, if that changed after `since`.
    pub fn typing_since(&self, room_id: &RoomId, since: u64) -> Option<Vec<OwnedUserId>> {
        let mut map = self.typing.lock().expect("typing lock");
        let room = map.get_mut(room_id)?;
        let now = Instant::now();
        let before = room.users.len();
        room.users.retain(|_, until| *until > now);
        if room.users.len() != before {
            // An expiry is a change too; give it a serial so every client sees it.
            room.serial = self.serial.fetch_add(1, Ordering::AcqRel) + 1;
        }
        // A token from before a restart can be ahead of the counter; then send all.
        (room.serial > since || since > self.serial()).then(|| room.users.keys().cloned().collect())
    }

    pub fn set_presence(&self, user_id: &UserId, presence: &str, status_msg: Option<String>) {
        if self.apply_presence(user_id, presence, status_msg.clone()) {
            self.bus.publish(BusMessage::Presence {
                user_id: user_id.to_string(),
                presence: presence.to_owned(),
                status_msg,
            });
        }
    }

    /// Applies a presence; returns whether it was news.
    fn apply_presence(&self, user_id: &UserId, presence: &str, status_msg: Option<String>) -> bool {
        let mut map = self.presence.lock().expect("presence lock");
        if let Some(p) = map.get_mut(user_id)
            && p.presence == presence
            && (status_msg.is_none() || p.status_msg == status_msg)
        {
            // Being active again is not news: only a change moves the serial.
            p.last_active = Instant::now();
            return false;
        }
        // Marked as changing before the serial moves: a sync that reads the new
        // serial must not find the old `last_presence_change` and skip this.
        self.last_presence_change.store(u64::MAX, Ordering::Release);
        let serial = self.bump();
        let entry = map.entry(user_id.to_owned()).or_insert_with(|| PresenceState {
            presence: presence.to_owned(),
            status_msg: None,
            last_active: Instant::now(),
            serial,
        });
        entry.last_active = Instant::now();
        entry.presence = presence.to_owned();
        if status_msg.is_some() {
            entry.status_msg = status_msg;
        }
        entry.serial = serial;
        self.last_presence_change.store(serial, Ordering::Release);
        true
    }

    /// Whether anyone's presence may have changed after `since`.
    pub fn presence_changed_since(&self, since: u64) -> bool {
        since > self.serial() || self.last_presence_change.load(Ordering::Acquire) > since
    }

    pub fn presence(&self, user_id: &UserId) -> Option<PresenceState> {
        self.presence.lock().expect("presence lock").get(user_id).cloned()
    }

    /// Presence of these users changed after `since`.
    pub fn presence_since<'a>(&self, users: impl IntoIterator<Item = &'a UserId>, since: u64) -> Vec<(OwnedUserId, PresenceState)> {
        let map = self.presence.lock().expect("presence lock");
        let reset = since > self.serial();
        users
            .into_iter()
            .filter_map(|u| map.get(u).filter(|p| reset || p.serial > since).map(|p| (u.to_owned(), p.clone())))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ruma::{room_id, user_id};

    #[test]
    fn typing_appears_then_expires() {
        let e = Ephemeral::new(Arc::new(Notifier::new()), Arc::new(kabar_bus::LocalBus::new("test")));
        let start = e.serial();
        e.set_typing(room_id!("!r:x"), user_id!("@a:x"), true, Duration::from_millis(30));
        assert_eq!(e.typing_since(room_id!("!r:x"), start).unwrap().len(), 1);
        let seen = e.serial();
        assert!(e.typing_since(room_id!("!r:x"), seen).is_none(), "nothing new since");
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(e.typing_since(room_id!("!r:x"), seen).unwrap().len(), 0, "expiry is reported");
    }

    #[test]
    fn only_a_presence_change_is_news() {
        let e = Ephemeral::new(Arc::new(Notifier::new()), Arc::new(kabar_bus::LocalBus::new("test")));
        e.set_presence(user_id!("@a:x"), "online", None);
        let seen = e.serial();
        assert!(!e.presence_changed_since(seen));
        e.set_presence(user_id!("@a:x"), "online", None);
        assert!(!e.presence_changed_since(seen), "being active again is not a change");
        assert_eq!(e.serial(), seen);
        e.set_presence(user_id!("@a:x"), "unavailable", None);
        assert!(e.presence_changed_since(seen));
        assert_eq!(e.presence_since([user_id!("@a:x")], seen).len(), 1);
    }
}
