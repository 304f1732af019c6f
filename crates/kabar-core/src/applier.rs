//! The applier: the one path from a committed write to everything kept in
//! memory about it.
//!
//! The store hands every batch it commits to the applier before it answers
//! the batch's writers (the applier is its [`CommitListener`]); the applier
//! sends it on the bus, and applies the batches other nodes send the same
//! way. Batches apply only in position order: one that does not continue
//! the applied position waits (briefly) for the ones before it. The applier
//! also reads the stream back from the store by position (its catch-up
//! task) for whatever the bus did not bring: a gap that stays open, a batch
//! too big to carry, a lost message, another process without a bus, and
//! every `bus.catch_up_interval_ms` in any case. Either way the updates are
//! applied in position order, and only here: room caches, channels' view
//! counters, change trackers (and so the caches keyed by their generations),
//! the token cache, and then
//! the wake-ups of waiting syncs. No service does any of that by hand.
//!
//! Applying a batch takes microseconds and no I/O, so it runs right on the
//! store's writing thread: a writer's own change is applied by the time it
//! is answered, with no task switch in between (a room's next append, which
//! builds on the cache, waits for nothing).
//!
//! **Applied-position invariant:** once [`Applied::position`] reads `n`,
//! every update at or below `n` has been applied, and none is applied twice.
//! Syncs answer up to the applied position, so they can never skip an event
//! that commits late; a writer that waits for its own position
//! ([`Applied::reached`]) before answering its client makes its write
//! visible to that client's next request.

use std::{
    collections::{BTreeMap, HashSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use kabar_bus::{Bus, BusMessage, CarriedBatch, FromNode};
use kabar_store::{Change, CommitListener, CommittedBatch, Store, StreamPos, StreamUpdate};
use ruma::{OwnedRoomId, OwnedUserId, events::TimelineEventType};
use tokio::sync::{Notify, broadcast, watch};

use crate::{
    changes::{Changes, DeviceKey},
    notifier::Notifier,
    room_cache::RoomCaches,
    sessions::SessionCache,
    views::ViewCounts,
};

/// How many positions one catch-up read asks the store for.
const CATCH_UP_PAGE: usize = 1000;

/// Everything the applier advances.
pub struct ApplierTargets {
    pub rooms: Arc<RoomCaches>,
    pub changes: Arc<Changes>,
    pub sessions: Arc<SessionCache>,
    pub notifier: Arc<Notifier>,
    pub views: Arc<ViewCounts>,
}

impl ApplierTargets {
    /// Empty caches and trackers that know nothing before the store's
    /// position now (everything older is read from the store when asked).
    pub fn fresh(store: &Arc<dyn Store>, notifier: Arc<Notifier>) -> Self {
        let changes = Changes::new(store.current_position());
        Self {
            rooms: RoomCaches::new(store.clone()),
            views: Arc::new(ViewCounts::new(store.clone(), changes.clone())),
            changes,
            sessions: Arc::new(SessionCache::new()),
            notifier,
        }
    }
}

/// How long the applier waits after another node's commit announcement
/// without its batch to read the store for it together with the
/// announcements that follow.
const BUS_COALESCE: Duration = Duration::from_millis(3);
/// How long a batch that does not continue the applied position waits for
/// the batches before it to come on the bus (another node's commit that
/// took its positions first is usually a millisecond or two away) before
/// the gap is read from the store.
const GAP_WAIT: Duration = Duration::from_millis(5);
/// Batches waiting for a gap at most; past that they are dropped (the
/// catch-up reads them from the store).
const MAX_WAITING_BATCHES: usize = 1024;

pub struct Applier {
    store: Arc<dyn Store>,
    targets: ApplierTargets,
    /// Announces this process's commits to the other nodes, and tells of
    /// theirs (so they are read at once rather than at the next tick).
    bus: Arc<dyn Bus>,
    applied: watch::Sender<StreamPos>,
    /// Held while a batch is applied: the store's writing thread, the bus
    /// and the catch-up task all apply, one batch at a time. Holds the
    /// batches that wait for a gap before them, by the position they follow.
    applying: Mutex<BTreeMap<StreamPos, CommittedBatch>>,
    /// Asks for a catch-up from the store now rather than at the next tick.
    poke: Arc<Notify>,
    /// A batch waits for a gap: read the store if the bus does not fill it.
    gap: Notify,
    /// For work a wake-up needs that reads the store (off the writing thread).
    runtime: tokio::runtime::Handle,
    /// Whether the last catch-up could not read the store: an outage is
    /// logged when it starts and when it ends, not at every tick.
    store_unreachable: std::sync::atomic::AtomicBool,
}

/// A handle on the applied position, for services that must wait for their
/// writes (or another process's) to be applied.
#[derive(Clone)]
pub struct Applied {
    position: watch::Receiver<StreamPos>,
    poke: Arc<Notify>,
}

impl Applied {
    /// Every update up to here is applied.
    pub fn position(&self) -> StreamPos {
        *self.position.borrow()
    }

    /// Waits until every update up to `pos` is applied (at once if it is).
    pub async fn reached(&self, pos: StreamPos) {
        if self.position() >= pos {
            return;
        }
        let mut rx = self.position.clone();
        // An error means the applier stopped (shutdown): nothing more comes.
        let _ = rx.wait_for(|applied| *applied >= pos).await;
    }

    /// Like [`reached`](Self::reached) for a position another process
    /// committed: asks the applier to read the store now instead of at its
    /// next tick. Gives up after `limit`, returning whether it got there.
    pub async fn catch_up_to(&self, pos: StreamPos, limit: Duration) -> bool {
        self.poke.notify_one();
        tokio::time::timeout(limit, self.reached(pos)).await.is_ok()
    }
}

/// What one batch asks to be woken, gathered while applying and sent only
/// once the applied position covers the batch: a sync woken earlier could
/// read the old position, find nothing, and sleep through the news.
#[derive(Default)]
struct Wakes {
    rooms: HashSet<OwnedRoomId>,
    users: HashSet<OwnedUserId>,
    /// Users whose device list changed: everyone sharing a room with them wakes.
    device_lists: Vec<OwnedUserId>,
}

impl Applier {
    /// An applier that has applied everything up to `start` (the store's
    /// position when the process started: the caches begin empty).
    /// Must be called on a tokio runtime, which wake-ups use.
    pub fn new(store: Arc<dyn Store>, targets: ApplierTargets, bus: Arc<dyn Bus>, start: StreamPos) -> Arc<Self> {
        targets.views.applier_starts_after(start);
        Arc::new(Self {
            store,
            targets,
            bus,
            applied: watch::channel(start).0,
            applying: Mutex::new(BTreeMap::new()),
            poke: Arc::new(Notify::new()),
            gap: Notify::new(),
            runtime: tokio::runtime::Handle::current(),
            store_unreachable: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Listens to the store's commits and runs the catch-up task on the
    /// current runtime, starting from the store's position now.
    pub fn spawn(store: Arc<dyn Store>, targets: ApplierTargets, bus: Arc<dyn Bus>, catch_up: Duration) -> Arc<Self> {
        let start = store.current_position();
        let applier = Self::new(store.clone(), targets, bus, start);
        // A batch committed between reading the start and listening is
        // caught up from the store; one at or below the start needs nothing
        // (the caches begin empty and the trackers at the start).
        store.set_commit_listener(applier.clone());
        tokio::spawn(applier.clone().run(catch_up));
        applier
    }

    pub fn applied(&self) -> Applied {
        Applied {
            position: self.applied.subscribe(),
            poke: self.poke.clone(),
        }
    }

    fn position(&self) -> StreamPos {
        *self.applied.borrow()
    }

    /// Reads what other processes committed every `catch_up`, and at once
    /// when poked (a writer that saw a newer head); applies the batches
    /// other nodes send on the bus, and reads the store for what they
    /// announce but do not carry, or for a gap the bus leaves open.
    pub async fn run(self: Arc<Self>, catch_up: Duration) {
        let mut tick = tokio::time::interval(catch_up);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut others = Some(self.bus.commits());
        // The newest head another node announced, and when to read the
        // store if it is still not applied by then.
        let mut heard_head: StreamPos = 0;
        let mut read_store_at: Option<tokio::time::Instant> = None;
        loop {
            let heard = async {
                match others.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let deadline = read_store_at.unwrap_or_else(tokio::time::Instant::now);
            tokio::select! {
                _ = tick.tick() => self.catch_up().await,
                _ = self.poke.notified() => self.catch_up().await,
                _ = self.gap.notified() => {
                    read_store_at.get_or_insert_with(|| tokio::time::Instant::now() + GAP_WAIT);
                }
                _ = tokio::time::sleep_until(deadline), if read_store_at.is_some() => {
                    read_store_at = None;
                    if self.position() < heard_head || self.has_waiting_batches() {
                        self.catch_up().await;
                    }
                }
                heard = heard => match heard {
                    Ok(FromNode { message: BusMessage::Committed { head, batches }, .. }) => {
                        heard_head = heard_head.max(head);
                        if head <= self.position() {
                            continue;
                        }
                        let carried = !batches.is_empty();
                        self.apply_carried(batches);
                        if self.position() < head {
                            // Not all of it came with the announcement: read
                            // the store soon, for every announcement until then.
                            let at = tokio::time::Instant::now() + if carried { GAP_WAIT } else { BUS_COALESCE };
                            read_store_at = Some(read_store_at.map_or(at, |t| t.min(at)));
                        }
                    }
                    // The bus was away: what it would have said is in the store.
                    Ok(FromNode { message: BusMessage::Missed, .. }) => self.catch_up().await,
                    // Typing, presence and heartbeats are for others.
                    Ok(_) => {}
                    // Missed announcements: whatever they said is in the store.
                    Err(broadcast::error::RecvError::Lagged(_)) => self.catch_up().await,
                    Err(broadcast::error::RecvError::Closed) => others = None,
                },
            }
        }
    }

    /// Applies the batches another node sent, in order, as far as they
    /// continue what is applied (the rest waits for its gap).
    fn apply_carried(&self, batches: Vec<CarriedBatch>) {
        for carried in batches {
            match CommittedBatch::from_wire(carried.json()) {
                Ok(batch) => self.apply_batch(&batch),
                Err(e) => {
                    // The store has it: the announcement's head is read from there.
                    tracing::warn!(error = %e, "an unreadable batch on the bus");
                    return;
                }
            }
        }
    }

    fn has_waiting_batches(&self) -> bool {
        !self.applying.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).is_empty()
    }

    /// Reads and applies everything committed after the applied position.
    async fn catch_up(&self) {
        use std::sync::atomic::Ordering::Relaxed;
        let outcome = async {
            loop {
                // It reads the committed head first (one small query when
                // there is nothing new).
                let applied = self.position();
                let batch = self.store.updates_after(applied, CATCH_UP_PAGE).await?;
                if batch.head <= applied {
                    return Ok::<(), kabar_store::StoreError>(());
                }
                self.apply_batch(&batch);
                // Done once the page reached the head the store last read.
                if batch.head >= self.store.current_position() {
                    return Ok(());
                }
            }
        }
        .await;
        match outcome {
            Ok(()) => {
                if self.store_unreachable.swap(false, Relaxed) {
                    tracing::info!(applied = self.position(), "the stream can be read again");
                }
            }
            Err(e) => {
                if !self.store_unreachable.swap(true, Relaxed) {
                    tracing::warn!(error = %e, applied = self.position(), "cannot read the stream; retrying until it can be read");
                }
            }
        }
    }

    /// Applies the updates of `batch` not applied yet, then every waiting
    /// batch it lets continue. A batch that starts past the applied position
    /// waits: applying it would skip the updates in between.
    fn apply_batch(&self, batch: &CommittedBatch) {
        let mut waiting = self.applying.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let applied = self.position();
        if batch.head <= applied {
            return;
        }
        if batch.after > applied {
            // Another node committed in between. Its batch usually comes on
            // the bus in a moment; the catch-up reads it from the store
            // otherwise (at once when no bus could bring it).
            if waiting.len() < MAX_WAITING_BATCHES {
                let longest = waiting.get(&batch.after).is_none_or(|w| w.head < batch.head);
                if longest {
                    waiting.insert(batch.after, batch.clone());
                }
            }
            if self.bus.reaches_others() {
                self.gap.notify_one();
            } else {
                self.poke.notify_one();
            }
            return;
        }
        let mut wakes = Wakes::default();
        let mut head = self.apply_updates(batch, applied, &mut wakes);
        // The batches that waited for this one.
        while let Some(next) = waiting.first_entry() {
            if next.get().head <= head {
                next.remove();
            } else if *next.key() <= head {
                head = self.apply_updates(&next.remove(), head, &mut wakes);
            } else {
                break;
            }
        }
        drop(waiting);
        self.applied.send_replace(head);
        self.wake(wakes);
    }

    /// Applies the updates of `batch` past `applied`; returns the batch's head.
    fn apply_updates(&self, batch: &CommittedBatch, applied: StreamPos, wakes: &mut Wakes) -> StreamPos {
        for update in batch.updates.iter().filter(|u| u.pos > applied) {
            self.apply(update, wakes);
        }
        batch.head
    }

    fn apply(&self, update: &StreamUpdate, wakes: &mut Wakes) {
        let t = &self.targets;
        let pos = update.pos;
        match &update.change {
            Change::Event(event) => {
                t.rooms.apply(event);
                t.views.applied(event);
                t.changes.room_events.record(&event.pdu.room_id, pos);
                let target = (event.pdu.kind == TimelineEventType::RoomMember)
                    .then(|| event.pdu.state_key.as_deref().and_then(|k| OwnedUserId::try_from(k).ok()))
                    .flatten();
                if let Some(target) = target {
                    t.changes.memberships.record(&target, pos);
                    wakes.users.insert(target);
                }
                // In a channel, a subscriber's join, leave or reaction is
                // news to them and the staff only: the other subscribers'
                // syncs are not woken for what they may not see.
                match t.rooms.private_news(&event.pdu) {
                    Some((roles, member)) => {
                        wakes.users.extend(roles.staff.iter().cloned());
                        wakes.users.insert(member);
                    }
                    None => {
                        wakes.rooms.insert(event.pdu.room_id.clone());
                    }
                }
            }
            Change::AccountData { user_id } => {
                t.changes.account_data.record(user_id, pos);
                wakes.users.insert(user_id.clone());
            }
            Change::Receipt { room_id, user_id } => {
                t.changes.receipts.record(room_id, pos);
                match user_id {
                    Some(user) => {
                        t.changes.own_receipts.record(&(room_id.clone(), user.clone()), pos);
                        // Where a receipt is told to its author only (a
                        // channel, a big room: `kabar_domain::receipts`), the
                        // other members' syncs are not woken for it.
                        if t.rooms.loaded_with_private_receipts(room_id) {
                            wakes.users.insert(user.clone());
                        } else {
                            wakes.rooms.insert(room_id.clone());
                        }
                    }
                    None => {
                        wakes.rooms.insert(room_id.clone());
                    }
                }
            }
            Change::DeviceList { user_id } => {
                t.changes.device_lists.record(user_id, pos);
                wakes.users.insert(user_id.clone());
                wakes.device_lists.push(user_id.clone());
            }
            Change::OneTimeKeys { user_id, device_id } => {
                let device = DeviceKey {
                    user_id: user_id.clone(),
                    device_id: device_id.clone(),
                };
                t.changes.one_time_keys.record(&device, pos);
            }
            Change::ToDevice { user_id, device_id } => {
                let device = DeviceKey {
                    user_id: user_id.clone(),
                    device_id: device_id.clone(),
                };
                t.changes.to_device.record(&device, pos);
                wakes.users.insert(user_id.clone());
            }
            Change::Memberships { user_id } => {
                t.changes.memberships.record(user_id, pos);
                wakes.users.insert(user_id.clone());
            }
            Change::Sessions { user_id } => t.sessions.forget_user(user_id),
        }
    }

    fn wake(&self, wakes: Wakes) {
        let notifier = &self.targets.notifier;
        for room in &wakes.rooms {
            notifier.room_changed(room);
        }
        for user in &wakes.users {
            notifier.user_changed(user);
        }
        if wakes.device_lists.is_empty() {
            return;
        }
        // Who shares a room with them is a store read: made off the
        // applier's path, since a late wake-up only delays a sync that the
        // next change or its timeout answers anyway.
        let (store, notifier) = (self.store.clone(), notifier.clone());
        self.runtime.spawn(async move {
            for user in wakes.device_lists {
                match store.memberships(&user).await {
                    Ok(memberships) => memberships
                        .iter()
                        .filter(|m| m.membership == kabar_store::Membership::Join)
                        .for_each(|m| notifier.room_changed(&m.room_id)),
                    Err(e) => tracing::warn!(error = %e, %user, "could not wake the rooms of a device-list change"),
                }
            }
        });
    }
}

impl CommitListener for Applier {
    fn committed(&self, batch: &CommittedBatch) {
        self.apply_batch(batch);
        if batch.head > batch.after {
            let batches = if self.bus.reaches_others() {
                vec![CarriedBatch::from_raw(batch.to_wire())]
            } else {
                vec![]
            };
            self.bus.publish(BusMessage::Committed { head: batch.head, batches });
        }
    }
}

#[cfg(test)]
mod tests {
    use kabar_domain::{EventSigner, NewEvent, membership::Membership};
    use kabar_store::{Direction, EventRange, NewDevice, NewUser, Session};
    use ruma::{RoomVersionId, owned_user_id};
    use serde_json::json;

    use super::*;
    use crate::{
        load::{Gate, GateLimits, LoadMetrics},
        rooms::{CreateRoom, Rooms},
    };

    /// One process's view of a shared store: its caches, trackers and
    /// services, advanced only by its own applier.
    struct Node {
        caches: Arc<RoomCaches>,
        rooms: Arc<Rooms>,
        changes: Arc<Changes>,
        sessions: Arc<SessionCache>,
        notifier: Arc<Notifier>,
        views: Arc<ViewCounts>,
        applier: Arc<Applier>,
    }

    impl Node {
        /// Whether the node applied everything `store` committed so far
        /// (reading the store for it now) within 5 s.
        async fn caught_up_with(&self, store: &Arc<dyn Store>) -> bool {
            self.applier
                .applied()
                .catch_up_to(store.current_position(), Duration::from_secs(5))
                .await
        }
    }

    /// Listening, the node hears its own commits at once; not listening, it
    /// learns every write as another process would: from the store, by
    /// catch-up every `catch_up` (or when poked).
    fn node(store: &Arc<dyn Store>, listening: bool, catch_up: Duration) -> Node {
        let start = store.current_position();
        let targets = ApplierTargets::fresh(store, Arc::new(Notifier::new()));
        let (caches, changes, sessions, notifier, views) = (
            targets.rooms.clone(),
            targets.changes.clone(),
            targets.sessions.clone(),
            targets.notifier.clone(),
            targets.views.clone(),
        );
        let applier = Applier::new(store.clone(), targets, Arc::new(kabar_bus::LocalBus::new("test")), start);
        if listening {
            store.set_commit_listener(applier.clone());
        }
        tokio::spawn(applier.clone().run(catch_up));
        let rooms = Arc::new(rooms_on(store, caches.clone(), applier.applied()));
        Node {
            caches,
            rooms,
            changes,
            sessions,
            notifier,
            views,
            applier,
        }
    }

    /// The room service of a node whose caches are `caches`.
    fn rooms_on(store: &Arc<dyn Store>, caches: Arc<RoomCaches>, applied: Applied) -> Rooms {
        let signer = Arc::new(EventSigner::new(ruma::owned_server_name!("localhost"), &EventSigner::generate_key(), "k").unwrap());
        let limits = GateLimits {
            slots: 4,
            max_queued: 16,
            max_queue_delay: Duration::from_secs(5),
        };
        let joins = Arc::new(Gate::new(LoadMetrics::default().class("join"), limits, Duration::from_millis(1)));
        Rooms::new(store.clone(), signer, caches, applied, RoomVersionId::V11, joins)
    }

    /// A new embedded store with one user, `@alice:localhost`.
    async fn store_with_alice() -> (tempfile::TempDir, Arc<dyn Store>, ruma::OwnedUserId) {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(kabar_store_sqlite::SqliteStore::open(&dir.path().join("db")).unwrap());
        let alice = owned_user_id!("@alice:localhost");
        store
            .create_user(NewUser {
                user_id: alice.clone(),
                password_hash: None,
                created_ms: 1,
            })
            .await
            .unwrap();
        (dir, store, alice)
    }

    /// Users `@u0:localhost`, `@u1:localhost`... in `store`.
    async fn new_users(store: &Arc<dyn Store>, count: usize) -> Vec<ruma::OwnedUserId> {
        let mut users = vec![];
        for n in 0..count {
            let user = ruma::OwnedUserId::try_from(format!("@u{n}:localhost")).unwrap();
            let new_user = NewUser {
                user_id: user.clone(),
                password_hash: None,
                created_ms: 1,
            };
            store.create_user(new_user).await.unwrap();
            users.push(user);
        }
        users
    }

    /// Users `@bob:localhost` and `@carl:localhost` in `store`.
    async fn with_bob_and_carl(store: &Arc<dyn Store>) -> (ruma::OwnedUserId, ruma::OwnedUserId) {
        let (bob, carl) = (owned_user_id!("@bob:localhost"), owned_user_id!("@carl:localhost"));
        for user in [&bob, &carl] {
            let new = NewUser {
                user_id: user.clone(),
                password_hash: None,
                created_ms: 1,
            };
            store.create_user(new).await.unwrap();
        }
        (bob, carl)
    }

    /// A public room.
    fn a_public_room() -> CreateRoom {
        CreateRoom {
            preset: Some("public_chat".into()),
            ..CreateRoom::default()
        }
    }

    /// Which of `interests` are woken, each given 200 ms.
    async fn woken(interests: [crate::notifier::Interest; 3]) -> Vec<bool> {
        let mut woken = vec![];
        for interest in interests {
            woken.push(interest.wait(Duration::from_millis(200)).await);
        }
        woken
    }

    /// A public broadcast channel.
    fn a_channel() -> CreateRoom {
        let mut create = serde_json::Map::new();
        create.insert("type".into(), json!("kabar.channel"));
        CreateRoom {
            creation_content: Some(create),
            ..a_public_room()
        }
    }

    /// `user`'s public read receipt on `event_id`.
    fn read_receipt(room_id: &ruma::RoomId, user: &ruma::UserId, event_id: &ruma::EventId) -> kabar_store::ReceiptRecord {
        kabar_store::ReceiptRecord {
            room_id: room_id.to_owned(),
            user_id: user.to_owned(),
            receipt_type: "m.read".into(),
            event_id: event_id.to_owned(),
            thread_id: None,
            ts_ms: 1,
            pos: 0,
        }
    }

    /// The whole of a (small) room's history, oldest first.
    fn everything(room_id: &ruma::RoomId) -> EventRange<'_> {
        EventRange {
            room_id,
            after: 0,
            until: u64::MAX,
            direction: Direction::Forward,
            limit: 1000,
            kinds: None,
            not_kinds: &[],
        }
    }

    /// Every event of the room, oldest first, checked to be one chain
    /// (each built on the one before it).
    async fn one_chain(store: &Arc<dyn Store>, room_id: &ruma::RoomId) -> Vec<kabar_store::StoredEvent> {
        let events = store.room_events(everything(room_id)).await.unwrap();
        for pair in events.windows(2) {
            assert_eq!(pair[1].pdu.prev_events, vec![pair[0].pdu.event_id.clone()], "one chain");
        }
        events
    }

    #[tokio::test]
    async fn another_writers_commits_reach_caches_trackers_tokens_and_waiters_through_the_stream() {
        let (_dir, store, alice) = store_with_alice().await;
        let a = node(&store, true, Duration::from_secs(3600));
        let b = node(&store, false, Duration::from_millis(100));
        let start = b.applier.applied().position();

        let room_id = a.rooms.create_room(&alice, CreateRoom::default()).await.unwrap();
        let b_room = b.rooms.room(&room_id).await.unwrap();
        // b has applied the room's creation before it waits: only a's send
        // below may wake it.
        b.applier.applied().reached(a.applier.applied().position()).await;
        let waiting = b.notifier.interest(&alice, [&*room_id]);
        a.rooms
            .send(
                &alice,
                &room_id,
                NewEvent::message("m.room.message", json!({"body": "from a"})),
                None,
            )
            .await
            .unwrap();
        let a_pos = a.applier.applied().position();
        assert!(
            waiting.wait(Duration::from_secs(10)).await,
            "a sync waiting on b is woken by a's send"
        );
        assert!(b.applier.applied().position() >= a_pos);
        assert_eq!(b_room.read().last_pos, a_pos, "b's room cache has a's event");
        assert!(
            b.changes.memberships.changed_since(&alice, start),
            "b's trackers saw the creator's join"
        );

        // b's cache is behind a's next send (b catches up only every 100 ms):
        // b's send is refused on the stale head and rebuilt on the new one.
        for n in 0..5 {
            a.rooms
                .send(&alice, &room_id, NewEvent::message("m.room.message", json!({"body": n})), None)
                .await
                .unwrap();
            b.rooms
                .send(&alice, &room_id, NewEvent::message("m.room.message", json!({"body": n})), None)
                .await
                .unwrap();
        }
        one_chain(&store, &room_id).await;

        // A token b cached is refused once a removes the device.
        store
            .upsert_device(NewDevice {
                user_id: alice.clone(),
                device_id: "D".into(),
                display_name: None,
                token_hash: "h".into(),
                now_ms: 1,
                ip: None,
            })
            .await
            .unwrap();
        assert!(b.caught_up_with(&store).await);
        let session = Session {
            user_id: alice.clone(),
            device_id: "D".into(),
        };
        b.sessions.insert(b.sessions.epoch(), "h".into(), session);
        assert!(b.sessions.get("h").is_some());
        let removed = store.delete_devices(&alice, &["D".into()]).await.unwrap();
        let pos = removed.list_changed_at.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while b.sessions.get("h").is_some() {
            assert!(
                std::time::Instant::now() < deadline,
                "b drops the token within its catch-up interval"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(b.applier.applied().position() >= pos);
    }

    /// Hands each batch to the applier and notes how many events it held.
    struct CountingEvents {
        applier: Arc<Applier>,
        per_batch: std::sync::Mutex<Vec<usize>>,
    }

    impl CommitListener for CountingEvents {
        fn committed(&self, batch: &CommittedBatch) {
            let events = batch.updates.iter().filter(|u| matches!(u.change, Change::Event(_))).count();
            self.per_batch.lock().unwrap().push(events);
            self.applier.committed(batch);
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_sends_to_one_room_share_commits_and_stay_one_chain_across_two_writers() {
        let (_dir, store, alice) = store_with_alice().await;
        let a = node(&store, false, Duration::from_secs(3600));
        let tap = Arc::new(CountingEvents {
            applier: a.applier.clone(),
            per_batch: std::sync::Mutex::new(vec![]),
        });
        store.set_commit_listener(tap.clone());
        // b learns a's commits only from the store, every 20 ms: its sends
        // are often built on a head that moved.
        let b = node(&store, false, Duration::from_millis(20));
        let room_id = a.rooms.create_room(&alice, CreateRoom::default()).await.unwrap();
        let created = store.room_events(everything(&room_id)).await.unwrap().len();
        tap.per_batch.lock().unwrap().clear();

        let mut sends = vec![];
        for (rooms, senders, each) in [(a.rooms.clone(), 8, 10), (b.rooms.clone(), 2, 5)] {
            for sender in 0..senders {
                let (rooms, room_id, alice) = (rooms.clone(), room_id.clone(), alice.clone());
                sends.push(tokio::spawn(async move {
                    let mut ids = vec![];
                    for n in 0..each {
                        let event = if sender == 0 && n == each / 2 {
                            // A state change in the middle of the pipelines.
                            NewEvent::state("m.room.topic", "", json!({"topic": format!("{n}")}))
                        } else {
                            NewEvent::message("m.room.message", json!({"body": format!("{sender}/{n}")}))
                        };
                        ids.push(rooms.send(&alice, &room_id, event, None).await.unwrap());
                    }
                    ids
                }));
            }
        }
        let mut sent = vec![];
        for s in sends {
            sent.extend(s.await.unwrap());
        }
        assert_eq!(sent.len(), 8 * 10 + 2 * 5);
        let events = store.room_events(everything(&room_id)).await.unwrap();
        for pair in events.windows(2) {
            assert_eq!(pair[1].pdu.prev_events, vec![pair[0].pdu.event_id.clone()], "one chain");
            assert_eq!(pair[1].pdu.depth, pair[0].pdu.depth + 1);
        }
        let stored: std::collections::HashSet<_> = events.iter().map(|e| e.pdu.event_id.clone()).collect();
        assert_eq!(stored.len(), events.len());
        assert!(sent.iter().all(|id| stored.contains(id)), "every acknowledged send is stored");
        assert_eq!(events.len(), created + sent.len(), "nothing but the room's creation and the sends");
        let most = tap.per_batch.lock().unwrap().iter().copied().max().unwrap_or(0);
        assert!(
            most >= 2,
            "sends to one room were committed together (at most {most} events in a commit)"
        );
        let a_room = a.rooms.room(&room_id).await.unwrap();
        assert!(
            a.applier
                .applied()
                .catch_up_to(store.current_position(), Duration::from_secs(5))
                .await,
            "a catches up"
        );
        assert_eq!(
            a_room.read().last_pos,
            events.last().unwrap().pos,
            "a's cache holds the newest event"
        );
    }

    /// Joins to one room are built on each other while they commit; when
    /// one fails in the store, what was built on it is refused and rebuilt,
    /// and the room, its state and the cache hold exactly what landed.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn joins_to_one_room_share_commits_and_a_failed_one_takes_nothing_with_it() {
        let (dir, store, alice) = store_with_alice().await;
        let a = node(&store, false, Duration::from_secs(3600));
        let tap = Arc::new(CountingEvents {
            applier: a.applier.clone(),
            per_batch: std::sync::Mutex::new(vec![]),
        });
        store.set_commit_listener(tap.clone());
        let room_id = a.rooms.create_room(&alice, a_public_room()).await.unwrap();
        let users = new_users(&store, 32).await;
        let join = |user: ruma::OwnedUserId, extra: Option<serde_json::Map<String, serde_json::Value>>| {
            let (rooms, room_id) = (a.rooms.clone(), room_id.clone());
            tokio::spawn(async move { rooms.set_membership(&user, &room_id, &user, Membership::Join, None, extra).await })
        };

        // Sixteen joins at once (the test gate's slots and queue) share commits.
        tap.per_batch.lock().unwrap().clear();
        let first: Vec<_> = users[..16].iter().map(|u| join(u.clone(), None)).collect();
        for j in first {
            j.await.unwrap().unwrap();
        }
        let most = tap.per_batch.lock().unwrap().iter().copied().max().unwrap_or(0);
        assert!(most >= 2, "joins to one room were committed together (at most {most} in a commit)");

        // A fault in the store: the next join is refused by a trigger, and
        // while the writer waits for a lock held here, the joins and sends
        // after it are built on it.
        let blocker = rusqlite::Connection::open(dir.path().join("db")).unwrap();
        blocker.busy_timeout(Duration::from_secs(5)).unwrap();
        blocker
            .execute_batch(
                "CREATE TRIGGER injected_fault BEFORE INSERT ON events WHEN NEW.json LIKE '%poisoned%'
                 BEGIN SELECT RAISE(ABORT, 'injected fault'); END;
                 BEGIN IMMEDIATE;",
            )
            .unwrap();
        let mut nickname = serde_json::Map::new();
        nickname.insert("displayname".into(), json!("poisoned"));
        let poisoned = join(users[16].clone(), Some(nickname));
        tokio::time::sleep(Duration::from_millis(100)).await;
        let after: Vec<_> = users[17..].iter().map(|u| join(u.clone(), None)).collect();
        let mut sends = vec![];
        for n in 0..4 {
            let (rooms, room_id, alice) = (a.rooms.clone(), room_id.clone(), alice.clone());
            sends.push(tokio::spawn(async move {
                let body = NewEvent::message("m.room.message", json!({"body": format!("after the fault {n}")}));
                rooms.send(&alice, &room_id, body, None).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        blocker.execute_batch("COMMIT").unwrap();
        assert!(poisoned.await.unwrap().is_err(), "the join the store refused fails");
        for j in after {
            j.await.unwrap().expect("a join built on the failed one is rebuilt and lands");
        }
        for s in sends {
            s.await.unwrap().expect("a send built on the failed join is rebuilt and lands");
        }

        let events = one_chain(&store, &room_id).await;
        assert!(
            events.iter().all(|e| !e.pdu.json.contains("poisoned")),
            "the refused join is not stored"
        );
        let stored: std::collections::HashSet<&str> = events.iter().map(|e| e.pdu.event_id.as_str()).collect();
        assert!(
            events
                .iter()
                .flat_map(|e| &e.pdu.auth_events)
                .all(|id| stored.contains(id.as_str())),
            "no stored event names the refused one"
        );
        assert!(
            a.applier
                .applied()
                .catch_up_to(store.current_position(), Duration::from_secs(5))
                .await
        );
        let room = a.rooms.room(&room_id).await.unwrap();
        {
            let cache = room.read();
            assert_eq!(cache.membership(&users[16]), None, "the refused join is not in the cache");
            assert_eq!(cache.last_pos, events.last().unwrap().pos, "the cache holds the newest event");
        }
        join(users[16].clone(), None)
            .await
            .unwrap()
            .expect("the user whose join failed can join again");
        for user in &users {
            let in_store = store
                .memberships(user)
                .await
                .unwrap()
                .into_iter()
                .find(|m| m.room_id == room_id)
                .map(|m| m.membership);
            assert_eq!(in_store, Some(Membership::Join), "{user}'s membership in the store");
            assert_eq!(
                room.read().membership(user),
                Some(Membership::Join),
                "{user}'s membership in the cache"
            );
        }
        let cache = room.read();
        assert_eq!(cache.member_count(Membership::Join), 1 + 32, "the cache counts what landed");
    }

    /// `/messages` with a filter of types reads through a bounded number
    /// of the room's events a page at a time, backwards and forwards, not
    /// on to the room's edge: with nothing matching there it answers an
    /// empty chunk and where to go on from, and going on finds the match.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_filtered_history_page_stops_at_its_scan_and_goes_on_from_there() {
        let (_dir, store, alice) = store_with_alice().await;
        let a = node(&store, true, Duration::from_secs(3600));
        let room_id = a.rooms.create_room(&alice, CreateRoom::default()).await.unwrap();
        let text = |body: &str| NewEvent::message("m.room.message", json!({ "body": body }));
        let old = a.rooms.send(&alice, &room_id, text("the old one"), None).await.unwrap();
        let noise: Vec<_> = (0..8)
            .map(|task| {
                let (rooms, room_id, alice) = (a.rooms.clone(), room_id.clone(), alice.clone());
                tokio::spawn(async move {
                    for n in 0..700 {
                        let event = NewEvent::message("org.example.noise", json!({ "n": task * 1000 + n }));
                        rooms.send(&alice, &room_id, event, None).await.unwrap();
                    }
                })
            })
            .collect();
        for task in noise {
            task.await.unwrap();
        }
        a.rooms.send(&alice, &room_id, text("the new one"), None).await.unwrap();
        let mut messages_only = ruma::api::client::filter::RoomEventFilter::default();
        messages_only.types = Some(vec!["m.room.message".to_owned()]);
        let ignored = std::collections::HashSet::new();
        let filter = || crate::filter::TimelineFilter {
            filter: &messages_only,
            ignored: &ignored,
            hidden: None,
        };
        let page = |from, dir| a.rooms.messages(&alice, &room_id, from, None, dir, 10, filter());
        let bodies = |found: Vec<crate::rooms::VisibleEvent>| -> Vec<String> {
            found
                .iter()
                .filter_map(|e| e.event.pdu.content_value()["body"].as_str().map(str::to_owned))
                .collect()
        };
        use crate::rooms::Dir::{Backward, Forward};

        let head = store.current_position();
        let (found, end) = page(head, Backward).await.unwrap();
        assert_eq!(bodies(found), ["the new one"], "the old message is 5,601 events back");
        let (found, _) = page(end.expect("the page says where to go on from"), Backward).await.unwrap();
        assert_eq!(bodies(found), ["the old one"]);

        let after_old = store.event(&old).await.unwrap().unwrap().pos;
        let (found, end) = page(after_old, Forward).await.unwrap();
        assert!(bodies(found).is_empty(), "the new message is 5,601 events on");
        let end = end.expect("the page says where to go on from");
        assert!(end > after_old && end < head);
        let (found, _) = page(end, Forward).await.unwrap();
        assert_eq!(bodies(found), ["the new one"]);
    }

    /// Past their budget, the caches drop the least recently used rooms
    /// nobody is using, never one in use; a dropped room is read again
    /// from the store when next asked for, and keeps working.
    #[tokio::test]
    async fn idle_rooms_are_dropped_past_the_budget_and_read_again_when_used() {
        let (_dir, store, alice) = store_with_alice().await;
        let a = node(&store, true, Duration::from_secs(3600));
        let mut ids = vec![];
        for _ in 0..3 {
            ids.push(a.rooms.create_room(&alice, CreateRoom::default()).await.unwrap());
        }
        let entries = |id| {
            let room = a.caches.loaded(id).expect("loaded");
            room.read().state_len()
        };
        // The first room alone fits the budget; the second does not fit beside it.
        let first = a.rooms.room(&ids[0]).await.unwrap();
        let per_room = first.read().state_len();
        a.caches.set_budget(per_room + 1);
        drop(first);
        a.rooms.room(&ids[1]).await.unwrap();
        assert!(a.caches.loaded(&ids[0]).is_none(), "the least recently used idle room was dropped");
        assert_eq!(entries(&ids[1]), per_room);
        assert_eq!(a.caches.usage(), (1, per_room, 1));

        // A room in use stays, over budget.
        let in_use = a.rooms.room(&ids[1]).await.unwrap();
        a.rooms.room(&ids[2]).await.unwrap();
        assert!(a.caches.loaded(&ids[1]).is_some(), "a room in use is never dropped");
        drop(in_use);

        // The dropped room is read again and keeps working.
        a.rooms
            .send(&alice, &ids[0], NewEvent::message("m.room.message", json!({"body": "back"})), None)
            .await
            .unwrap();
        let again = a.rooms.room(&ids[0]).await.unwrap();
        let r = again.read();
        assert_eq!(r.last_pos, store.current_position(), "it holds the newest event");
        assert_eq!(r.membership(&alice), Some(Membership::Join));
        assert_eq!(r.state_len(), per_room);
    }

    #[tokio::test]
    async fn a_subscribers_join_wakes_the_staff_and_themselves_not_the_other_subscribers() {
        let (_dir, store, alice) = store_with_alice().await;
        let (bob, carl) = with_bob_and_carl(&store).await;
        let a = node(&store, true, Duration::from_secs(3600));
        let room_id = a.rooms.create_room(&alice, a_channel()).await.unwrap();
        a.rooms
            .set_membership(&bob, &room_id, &bob, kabar_domain::membership::Membership::Join, None, None)
            .await
            .unwrap();

        let bob_waits = a.notifier.interest(&bob, [&*room_id]);
        let alice_waits = a.notifier.interest(&alice, [&*room_id]);
        let carl_waits = a.notifier.interest(&carl, []);
        a.rooms
            .set_membership(&carl, &room_id, &carl, kabar_domain::membership::Membership::Join, None, None)
            .await
            .unwrap();
        assert!(alice_waits.wait(Duration::from_secs(5)).await, "the staff see who joins");
        assert!(carl_waits.wait(Duration::from_secs(5)).await, "the subscriber sees their own join");
        let bob_waits_for_a_post = a.notifier.interest(&bob, [&*room_id]);
        assert!(
            !bob_waits.wait(Duration::from_millis(300)).await,
            "another subscriber's join is nothing to bob"
        );
        a.rooms
            .send(&alice, &room_id, NewEvent::message("m.room.message", json!({"body": "news"})), None)
            .await
            .unwrap();
        assert!(bob_waits_for_a_post.wait(Duration::from_secs(5)).await, "a post is");
    }

    /// What the server-default push rules make of an event is worked out
    /// once for every member it does not name, and comes out as each
    /// member's own defaults would: for a plain message, a mention of one
    /// member, a mention of the room, and in a room of two.
    #[tokio::test]
    async fn default_push_rules_are_walked_once_for_everyone_an_event_does_not_name() {
        let (_dir, store, alice) = store_with_alice().await;
        let (bob, carl) = with_bob_and_carl(&store).await;
        let a = node(&store, true, Duration::from_secs(3600));
        let room_id = a.rooms.create_room(&alice, a_public_room()).await.unwrap();
        for user in [&bob, &carl] {
            a.rooms
                .set_membership(user, &room_id, user, Membership::Join, None, None)
                .await
                .unwrap();
        }
        let room = a.rooms.room(&room_id).await.unwrap();
        let say = |content: serde_json::Value| {
            let (rooms, store) = (a.rooms.clone(), store.clone());
            let (alice, room_id) = (alice.clone(), room_id.clone());
            async move {
                let id = rooms
                    .send(&alice, &room_id, NewEvent::message("m.room.message", content), None)
                    .await
                    .unwrap();
                crate::rooms::TimelineEvent::new(store.event(&id).await.unwrap().unwrap())
            }
        };
        // Each member's outcome, and what their own default rules say.
        async fn judged_for(
            room: &crate::rooms::Room,
            users: &[ruma::OwnedUserId],
            event: &crate::rooms::TimelineEvent,
        ) -> Vec<(crate::push::Notification, crate::push::Notification)> {
            let mut out = vec![];
            for user in users {
                let memo = crate::push::notification(&crate::push::UserRules::ServerDefault, event, user, room).await;
                let ctx = crate::push::room_context(&room.read(), user);
                let rules = ruma::push::Ruleset::server_default(user);
                let own = crate::push::evaluate(&rules, event.flattened(), &event.event.pdu.sender, &ctx).await;
                out.push((memo, own));
            }
            out
        }
        let users = [bob.clone(), carl.clone()];
        let judged = |event| judged_for(&room, &users, event);

        let plain = say(json!({"msgtype": "m.text", "body": "hello"})).await;
        for (memo, own) in judged(&plain).await {
            assert_eq!(memo, own);
            assert!(memo.notify && !memo.highlight);
        }
        assert!(plain.default_push().is_some(), "worked out once, kept on the event");

        let to_bob = say(json!({"msgtype": "m.text", "body": "look", "m.mentions": {"user_ids": [bob.as_str()]}})).await;
        let outcomes = judged(&to_bob).await;
        assert!(outcomes.iter().all(|(memo, own)| memo == own), "{outcomes:?}");
        assert!(outcomes[0].0.highlight && !outcomes[1].0.highlight, "bob is named, carl is not");
        assert!(to_bob.default_push().is_none(), "an event that names someone is judged for each");

        let to_room = say(json!({"msgtype": "m.text", "body": "all", "m.mentions": {"room": true}})).await;
        for (memo, own) in judged(&to_room).await {
            assert_eq!(memo, own);
            assert!(memo.highlight, "the creator may mention the room");
        }

        // A room of two now: what was kept for a room of three is not reused.
        a.rooms
            .set_membership(&carl, &room_id, &carl, Membership::Leave, None, None)
            .await
            .unwrap();
        let kept = plain.default_push().as_ref().map(|d| format!("{d:?}"));
        let (memo, own) = judged(&plain).await.remove(0);
        assert_eq!(memo, own);
        assert_ne!(plain.default_push().as_ref().map(|d| format!("{d:?}")), kept, "worked out again");
    }

    /// In a channel, a subscriber's reaction wakes the staff and them, and
    /// their receipt them alone: the other subscribers' syncs sleep on.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_subscribers_reaction_and_receipt_wake_no_other_subscriber() {
        let (_dir, store, alice) = store_with_alice().await;
        let (bob, carl) = with_bob_and_carl(&store).await;
        let a = node(&store, true, Duration::from_secs(3600));
        let room_id = a.rooms.create_room(&alice, a_channel()).await.unwrap();
        for user in [&bob, &carl] {
            a.rooms
                .set_membership(user, &room_id, user, Membership::Join, None, None)
                .await
                .unwrap();
        }
        let post = NewEvent::message("m.room.message", json!({"msgtype": "m.text", "body": "news"}));
        let post = a.rooms.send(&alice, &room_id, post, None).await.unwrap();
        let interests = || [&alice, &bob, &carl].map(|u| a.notifier.interest(u, [&*room_id]));

        let waiting = interests();
        let reaction = json!({"m.relates_to": {"rel_type": "m.annotation", "event_id": post, "key": "👍"}});
        a.rooms
            .send(&bob, &room_id, NewEvent::message("m.reaction", reaction), None)
            .await
            .unwrap();
        assert_eq!(woken(waiting).await, [true, true, false], "the staff and bob, not carl");

        let waiting = interests();
        let receipt = read_receipt(&room_id, &bob, &post);
        store.put_receipt(receipt).await.unwrap();
        assert_eq!(woken(waiting).await, [false, true, false], "bob alone");

        // A post wakes everyone.
        let waiting = interests();
        let post = NewEvent::message("m.room.message", json!({"msgtype": "m.text", "body": "more"}));
        a.rooms.send(&alice, &room_id, post, None).await.unwrap();
        assert_eq!(woken(waiting).await, [true, true, true]);
    }

    #[tokio::test]
    async fn past_the_shared_receipts_limit_a_receipt_wakes_its_author_only() {
        use futures::StreamExt;
        use kabar_domain::receipts::SHARED_RECEIPTS_ROOM_LIMIT;
        let (_dir, store, alice) = store_with_alice().await;
        let a = node(&store, true, Duration::from_secs(3600));
        let room_id = a.rooms.create_room(&alice, a_public_room()).await.unwrap();
        // Alice and all but the last of them: exactly at the limit.
        let users = new_users(&store, SHARED_RECEIPTS_ROOM_LIMIT).await;
        let (last, first) = users.split_last().unwrap();
        let join = |user: &ruma::OwnedUserId| {
            let (rooms, room_id, user) = (a.rooms.clone(), room_id.clone(), user.clone());
            async move { rooms.set_membership(&user, &room_id, &user, Membership::Join, None, None).await }
        };
        // Sixteen at once: the test gate's slots.
        let joined: Vec<_> = futures::stream::iter(first).map(join).buffer_unordered(16).collect().await;
        if let Some(Err(e)) = joined.iter().find(|j| j.is_err()) {
            panic!("a join failed: {e}");
        }
        let post = NewEvent::message("m.room.message", json!({"msgtype": "m.text", "body": "hi"}));
        let post = a.rooms.send(&alice, &room_id, post, None).await.unwrap();
        let (bob, carl) = (&users[0], &users[1]);
        let interests = || [&alice, bob, carl].map(|u| a.notifier.interest(u, [&*room_id]));

        let waiting = interests();
        store.put_receipt(read_receipt(&room_id, bob, &post)).await.unwrap();
        assert_eq!(woken(waiting).await, [true, true, true], "at the limit: everyone");

        join(last).await.unwrap();
        let waiting = interests();
        store.put_receipt(read_receipt(&room_id, carl, &post)).await.unwrap();
        assert_eq!(woken(waiting).await, [false, false, true], "past it: carl alone");
    }

    #[tokio::test]
    async fn a_channels_views_are_counted_as_applied_and_alike_when_read_from_the_store_later() {
        let (_dir, store, alice) = store_with_alice().await;
        let (bob, carl) = with_bob_and_carl(&store).await;
        let a = node(&store, true, Duration::from_secs(3600));
        let room_id = a.rooms.create_room(&alice, a_channel()).await.unwrap();
        let post = || NewEvent::message("m.room.message", json!({"msgtype": "m.text", "body": "news"}));
        a.rooms
            .set_membership(&bob, &room_id, &bob, Membership::Join, None, None)
            .await
            .unwrap();
        let first = a.rooms.send(&alice, &room_id, post(), None).await.unwrap();

        // b is another process that started here (what came before is in
        // the store, never applied by b), whose counter is made before it
        // applies what follows: that is kept until the store is read.
        let b = node(&store, false, Duration::from_secs(3600));
        b.views.make_counter(&room_id);
        a.rooms
            .set_membership(&carl, &room_id, &carl, Membership::Join, None, None)
            .await
            .unwrap();
        let second = a.rooms.send(&alice, &room_id, post(), None).await.unwrap();
        for reader in [&bob, &carl] {
            let receipt = read_receipt(&room_id, reader, &second);
            store.put_receipt(receipt).await.unwrap();
        }
        let head = store.current_position();
        assert!(b.caught_up_with(&store).await);
        // c started after all of it: its counter is read from the store.
        let c = node(&store, false, Duration::from_secs(3600));

        let first_pos = store.event(&first).await.unwrap().unwrap().pos;
        let second_pos = store.event(&second).await.unwrap().unwrap().pos;
        let carls_join = one_chain(&store, &room_id)
            .await
            .iter()
            .find(|e| e.pdu.state_key.as_deref() == Some(carl.as_str()))
            .unwrap()
            .pos;
        for (how, node) in [
            ("fed since its creation", &a),
            ("made before the rest was applied", &b),
            ("read from the store", &c),
        ] {
            let upto = node.applier.applied().position();
            assert_eq!(upto, head, "{how}");
            let views = node
                .views
                .views(&room_id, upto, &[first_pos, second_pos, carls_join])
                .await
                .unwrap();
            // Carl joined after the first post: only bob counts for it.
            assert_eq!(views, vec![Some(1), Some(2), None], "{how}");
        }
        assert!(
            a.views.counts_without_reading(&room_id),
            "a channel made while listening is never read"
        );
    }

    #[tokio::test]
    async fn a_room_knows_when_only_joins_came_after_a_position_whether_applied_or_loaded() {
        let (_dir, store, alice) = store_with_alice().await;
        let a = node(&store, true, Duration::from_secs(3600));
        let room_id = a.rooms.create_room(&alice, a_public_room()).await.unwrap();
        let created = store.current_position();
        for user in new_users(&store, 30).await {
            a.rooms
                .set_membership(&user, &room_id, &user, Membership::Join, None, None)
                .await
                .unwrap();
        }
        // Loaded from the store by a process that starts now.
        let b = node(&store, false, Duration::from_secs(3600));
        for (how, node) in [("applied", &a), ("loaded", &b)] {
            let room = node.rooms.room(&room_id).await.unwrap();
            let r = room.read();
            assert!(!r.may_have_unread_after(created), "{how}: only joins since the room was made");
            assert!(r.may_have_unread_after(created - 1), "{how}: the room's last setting before them");
            // Loaded a few state entries a page (see `STATE_PAGE`): all of them.
            assert_eq!(r.member_count(Membership::Join), 31, "{how}: alice and the thirty");
            assert_eq!(r.members(Membership::Join).count(), 31, "{how}");
        }
        a.rooms
            .send(&alice, &room_id, NewEvent::message("m.room.message", json!({"body": "hi"})), None)
            .await
            .unwrap();
        assert!(b.caught_up_with(&store).await);
        for (how, node) in [("applied", &a), ("loaded", &b)] {
            let room = node.rooms.room(&room_id).await.unwrap();
            assert!(room.read().may_have_unread_after(created), "{how}: a message came");
        }
    }

    #[tokio::test]
    async fn view_counters_past_their_budget_are_dropped_least_recently_asked_first_and_read_again() {
        let (_dir, store, alice) = store_with_alice().await;
        let (bob, carl) = with_bob_and_carl(&store).await;
        let a = node(&store, true, Duration::from_secs(3600));
        a.views.set_budget(3);
        // Each counts its creator: two members in all.
        let (x, y) = (
            a.rooms.create_room(&alice, a_channel()).await.unwrap(),
            a.rooms.create_room(&alice, a_channel()).await.unwrap(),
        );
        a.rooms.set_membership(&bob, &x, &bob, Membership::Join, None, None).await.unwrap();
        let post = a
            .rooms
            .send(&alice, &x, NewEvent::message("m.room.message", json!({"body": "news"})), None)
            .await
            .unwrap();
        let receipt = read_receipt(&x, &bob, &post);
        store.put_receipt(receipt).await.unwrap();
        let post_pos = store.event(&post).await.unwrap().unwrap().pos;
        let upto = || a.applier.applied().position();
        assert_eq!(a.views.views(&x, upto(), &[post_pos]).await.unwrap(), vec![Some(1)]);
        assert_eq!(a.views.views(&y, upto(), &[]).await.unwrap(), vec![]);
        assert!(a.views.counts_without_reading(&x) && a.views.counts_without_reading(&y));

        // A fourth member is past the budget: x, asked about longest ago, goes.
        a.rooms
            .set_membership(&carl, &y, &carl, Membership::Join, None, None)
            .await
            .unwrap();
        assert!(!a.views.has_counter(&x), "the counter asked about least recently is dropped");
        assert!(a.views.counts_without_reading(&y), "the one that grew is kept");
        assert_eq!(
            a.views.views(&x, upto(), &[post_pos]).await.unwrap(),
            vec![Some(1)],
            "read again from the store, it counts the same"
        );
        assert!(a.views.has_counter(&x) && !a.views.counts_without_reading(&x));
    }

    #[tokio::test]
    async fn a_batch_after_a_gap_is_not_applied_over_it() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(kabar_store_sqlite::SqliteStore::open(&dir.path().join("db")).unwrap());
        let n = node(&store, false, Duration::from_secs(3600));
        let before = n.applier.position();
        n.applier.apply_batch(&CommittedBatch {
            after: before + 2,
            head: before + 5,
            updates: vec![StreamUpdate {
                pos: before + 3,
                change: Change::AccountData {
                    user_id: owned_user_id!("@a:localhost"),
                },
            }],
        });
        assert_eq!(n.applier.position(), before, "positions in between were never applied");
        assert!(!n.changes.account_data.changed_since(&owned_user_id!("@a:localhost"), before));
        n.applier.apply_batch(&CommittedBatch {
            after: before,
            head: before + 1,
            updates: vec![StreamUpdate {
                pos: before + 1,
                change: Change::AccountData {
                    user_id: owned_user_id!("@a:localhost"),
                },
            }],
        });
        assert_eq!(n.applier.position(), before + 1);
        assert!(n.changes.account_data.changed_since(&owned_user_id!("@a:localhost"), before));
        assert!(!n.changes.account_data.changed_since(&owned_user_id!("@a:localhost"), before + 1));
        // The batch that fills the gap lets the waiting one follow.
        n.applier.apply_batch(&CommittedBatch {
            after: before + 1,
            head: before + 2,
            updates: vec![],
        });
        assert_eq!(
            n.applier.position(),
            before + 5,
            "the waiting batch was applied once the gap filled"
        );
        assert!(n.changes.account_data.changed_since(&owned_user_id!("@a:localhost"), before + 2));
    }

    /// One end of an in-process bus between two appliers.
    struct PairBus {
        node: &'static str,
        to_other: broadcast::Sender<FromNode>,
        mine: broadcast::Sender<FromNode>,
    }

    fn bus_pair() -> (Arc<PairBus>, Arc<PairBus>) {
        let (a, b) = (broadcast::channel(64).0, broadcast::channel(64).0);
        (
            Arc::new(PairBus {
                node: "a",
                to_other: b.clone(),
                mine: a.clone(),
            }),
            Arc::new(PairBus {
                node: "b",
                to_other: a,
                mine: b,
            }),
        )
    }

    impl Bus for PairBus {
        fn node(&self) -> &str {
            self.node
        }
        fn publish(&self, message: BusMessage) {
            let _ = self.to_other.send(FromNode {
                node: self.node.into(),
                message,
            });
        }
        fn reaches_others(&self) -> bool {
            true
        }
        fn commits(&self) -> broadcast::Receiver<FromNode> {
            self.mine.subscribe()
        }
        fn news(&self) -> broadcast::Receiver<FromNode> {
            self.mine.subscribe()
        }
        fn connected(&self) -> bool {
            true
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn another_nodes_batches_apply_from_the_bus_without_reading_the_store() {
        let (_dir, store, alice) = store_with_alice().await;
        let (bus_a, bus_b) = bus_pair();
        let start = store.current_position();
        let a = Applier::new(
            store.clone(),
            ApplierTargets::fresh(&store, Arc::new(Notifier::new())),
            bus_a,
            start,
        );
        store.set_commit_listener(a.clone());
        // b's store is another, empty database: whatever b applies of a's
        // writes can only have come on the bus.
        let elsewhere = tempfile::tempdir().unwrap();
        let empty: Arc<dyn Store> = Arc::new(kabar_store_sqlite::SqliteStore::open(&elsewhere.path().join("db")).unwrap());
        let targets = ApplierTargets::fresh(&empty, Arc::new(Notifier::new()));
        let (b_changes, b_notifier) = (targets.changes.clone(), targets.notifier.clone());
        let b = Applier::new(empty, targets, bus_b, start);
        tokio::spawn(b.clone().run(Duration::from_secs(3600)));
        let waiting = b_notifier.interest(&alice, std::iter::empty::<&ruma::RoomId>());

        let rooms = rooms_on(&store, a.targets.rooms.clone(), a.applied());
        let room_id = rooms.create_room(&alice, CreateRoom::default()).await.unwrap();
        rooms
            .send(&alice, &room_id, NewEvent::message("m.room.message", json!({"body": "hi"})), None)
            .await
            .unwrap();
        let a_pos = a.applied().position();
        assert!(
            tokio::time::timeout(Duration::from_secs(5), b.applied().reached(a_pos))
                .await
                .is_ok(),
            "b applies a's batches as they come on the bus"
        );
        assert!(
            waiting.wait(Duration::from_secs(5)).await,
            "a sync of alice's waiting on b is woken"
        );
        assert!(b_changes.memberships.changed_since(&alice, start), "b's trackers saw alice join");
        assert!(!b.has_waiting_batches());
    }
}
