//! Existing users chatting: U users in R rooms, every member following its
//! /sync, senders posting benchmark messages. Shared by the scenarios that
//! measure what people already chatting experience (`messages`, `surge`).

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::future::join_all;
use serde_json::json;
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    Deliveries, DeliveryCheck,
    client::{ApiError, Target, User},
    follow, initial_since, setup_users,
    stats::{ErrorCounts, Latencies, count_error},
};

/// A /sync follower per user, all feeding one delivery tracker; user i is member i.
pub struct Followers {
    pub deliveries: Arc<Deliveries>,
    pub sync_errors: Arc<Mutex<ErrorCounts>>,
    stop: watch::Sender<bool>,
    handles: Vec<JoinHandle<()>>,
}

impl Followers {
    /// Runs each user's first sync (to learn where its stream stands) and
    /// starts following from there.
    pub async fn start(users: &[User]) -> Result<Self, String> {
        let deliveries = Arc::new(Deliveries::default());
        let (stop, stop_rx) = watch::channel(false);
        let held = Arc::new(AtomicU64::new(0));
        let sync_errors = Arc::new(Mutex::new(ErrorCounts::new()));
        let mut handles = Vec::new();
        for (i, u) in users.iter().enumerate() {
            let since = initial_since(u).await.map_err(|e| format!("initial sync: {e}"))?;
            handles.push(tokio::spawn(follow(
                u.clone(),
                i as u32,
                since,
                deliveries.clone(),
                stop_rx.clone(),
                held.clone(),
                sync_errors.clone(),
            )));
        }
        Ok(Self {
            deliveries,
            sync_errors,
            stop,
            handles,
        })
    }

    /// Waits up to 30 s for every expected delivery, stops the followers, and
    /// says what arrived and which syncs failed.
    pub async fn finish(self, expected: &[(u32, u64)]) -> (DeliveryCheck, ErrorCounts) {
        self.deliveries.wait_for(expected.len() as u64, Duration::from_secs(30)).await;
        let _ = self.stop.send(true);
        for f in self.handles {
            let _ = f.await;
        }
        let check = self.deliveries.check(expected);
        let errors = self.sync_errors.lock().expect("errors lock").clone();
        (check, errors)
    }
}

/// The people chatting, their rooms, and their followers.
pub struct Chat {
    pub users: Vec<User>,
    /// How many nodes the users are spread over.
    nodes: usize,
    /// Each room's sends through one node (see [`Target::writes_by_room`]).
    writes_by_room: bool,
    /// The server as given: its nodes by index.
    server: Target,
    pub rooms: Vec<String>,
    pub deliveries: Arc<Deliveries>,
    pub sync_errors: Arc<Mutex<ErrorCounts>>,
    /// Benchmark messages acknowledged so far, by all senders.
    pub sent: Arc<AtomicU64>,
    followers: Followers,
}

/// What one sender did.
pub struct SenderResult {
    pub sender: usize,
    pub acked: Vec<u64>,
    pub errors: ErrorCounts,
    pub latencies: Latencies,
}

impl Chat {
    /// Registers `users` users named `{prefix}{i}`, puts user i in room i % R
    /// (room r created by user r), and starts every member's sync follower.
    pub async fn start(target: &Target, prefix: &str, users: usize, rooms: usize, setup_concurrency: usize) -> Result<Self, String> {
        let rooms_n = rooms.clamp(1, users.max(1));
        let mut users = setup_users(target, prefix, users, setup_concurrency).await?;
        // Room r's members are users r, r + R, r + 2R, ...: with several
        // nodes, consecutive members of a room use different nodes.
        let nodes = target.others.len() + 1;
        for (i, u) in users.iter_mut().enumerate() {
            u.target = target.node(i / rooms_n);
        }
        let mut room_ids = Vec::with_capacity(rooms_n);
        for creator in users.iter().take(rooms_n) {
            room_ids.push(
                creator
                    .create_room(json!({ "preset": "public_chat" }))
                    .await
                    .map_err(|e| format!("create room: {e}"))?,
            );
        }
        let joins = users.iter().enumerate().skip(rooms_n).map(|(i, u)| {
            let room = room_ids[i % rooms_n].clone();
            async move { u.join(&room).await }
        });
        for r in join_all(joins).await {
            r.map_err(|e| format!("join: {e}"))?;
        }
        let followers = Followers::start(&users).await?;
        Ok(Self {
            users,
            nodes,
            writes_by_room: target.writes_by_room,
            server: target.clone(),
            rooms: room_ids,
            deliveries: followers.deliveries.clone(),
            sync_errors: followers.sync_errors.clone(),
            sent: Arc::default(),
            followers,
        })
    }

    /// Which node user `i` syncs through (see [`Chat::start`]).
    pub fn node_of(&self, i: usize) -> usize {
        (i / self.rooms.len().max(1)) % self.nodes
    }

    /// Which node user `i`'s messages are sent through.
    pub fn sending_node_of(&self, i: usize) -> usize {
        if self.writes_by_room {
            (i % self.rooms.len().max(1)) % self.nodes
        } else {
            self.node_of(i)
        }
    }

    /// Every user sends into its room until `deadline`, as fast as it can or
    /// one message per `interval` (see [`send_paced`]).
    pub async fn send_until(&self, deadline: Instant, interval: Option<Duration>) -> Vec<SenderResult> {
        let pacing = Pacing {
            start: Instant::now(),
            deadline,
            interval,
            senders: self.users.len(),
        };
        let writers: Vec<User> = self
            .users
            .iter()
            .enumerate()
            .map(|(i, u)| User {
                target: self.server.node(self.sending_node_of(i)),
                ..u.clone()
            })
            .collect();
        let senders = writers.iter().enumerate().map(|(i, u)| {
            let room = &self.rooms[i % self.rooms.len()];
            let deliveries = &self.deliveries;
            send_paced(i, &pacing, &self.sent, move |id| async move {
                u.send_text(room, &format!("kb{id}"), &deliveries.body(id)).await.map(|_| ())
            })
        });
        join_all(senders).await
    }

    /// Who must see what: every member of the sender's room, the sender included.
    pub fn expected(&self, results: &[SenderResult]) -> Vec<(u32, u64)> {
        let rooms_n = self.rooms.len();
        let mut expected = Vec::new();
        for r in results {
            for member in (0..self.users.len()).filter(|m| m % rooms_n == r.sender % rooms_n) {
                expected.extend(r.acked.iter().map(|id| (member as u32, *id)));
            }
        }
        expected
    }

    /// See [`Followers::finish`].
    pub async fn finish(self, expected: &[(u32, u64)]) -> (DeliveryCheck, ErrorCounts) {
        self.followers.finish(expected).await
    }
}

/// When senders send: from `start` until `deadline`, as fast as each can or
/// one message per `interval`.
pub struct Pacing {
    pub start: Instant,
    pub deadline: Instant,
    pub interval: Option<Duration>,
    /// How many senders share the pacing: paced senders start spread over
    /// the first interval, as people do, rather than all in the same instant.
    pub senders: usize,
}

/// Sender `sender` sends benchmark messages `(sender << 32) | seq` through
/// `send` as `pacing` says, counting each acknowledged one in `sent`.
pub async fn send_paced<F, Fut>(sender: usize, pacing: &Pacing, sent: &AtomicU64, mut send: F) -> SenderResult
where
    F: FnMut(u64) -> Fut,
    Fut: std::future::Future<Output = Result<(), ApiError>>,
{
    let mut result = SenderResult {
        sender,
        acked: Vec::new(),
        errors: ErrorCounts::new(),
        latencies: Latencies::default(),
    };
    let spread = pacing.senders.max(1) as u32;
    let mut next = pacing.start + pacing.interval.map_or(Duration::ZERO, |iv| iv * sender as u32 / spread);
    let mut seq: u64 = 0;
    while Instant::now() < pacing.deadline {
        if let Some(iv) = pacing.interval {
            tokio::time::sleep_until(next.into()).await;
            next += iv;
            if Instant::now() >= pacing.deadline {
                break;
            }
        }
        let id = ((sender as u64) << 32) | seq;
        seq += 1;
        let t = Instant::now();
        match send(id).await {
            Ok(()) => {
                result.latencies.push(t.elapsed().as_micros() as u64);
                result.acked.push(id);
                sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => count_error(&mut result.errors, e.kind()),
        }
    }
    result
}

/// Sums the senders' errors and send latencies.
pub fn merge(results: &[SenderResult]) -> (u64, ErrorCounts, Latencies) {
    let mut sent = 0;
    let mut errors = ErrorCounts::new();
    let mut latencies = Latencies::default();
    for r in results {
        sent += r.acked.len() as u64;
        for (k, v) in &r.errors {
            *errors.entry(k.clone()).or_insert(0) += v;
        }
        latencies.extend(r.latencies.clone());
    }
    (sent, errors, latencies)
}
