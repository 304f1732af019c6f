//! kabar-bench: load scenarios against any Matrix homeserver, through the
//! Client-Server API only. Each scenario returns a report that prints as a
//! human summary or as one JSON object.

pub mod chat;
pub mod client;
pub mod scenarios;
pub mod stats;

use std::{
    collections::HashMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use client::{ApiError, SyncMessages, Target, User};
use futures::{StreamExt, stream};
use stats::{ErrorCounts, Latencies, count_error};
use tokio::sync::watch;

/// A sync filter that keeps responses to what the scenarios read.
pub const SYNC_FILTER: &str = r#"{"room":{"timeline":{"limit":1000,"types":["m.room.message"]},"state":{"types":[],"lazy_load_members":true},"ephemeral":{"types":[]},"account_data":{"types":[]}},"presence":{"types":[]},"account_data":{"types":[]}}"#;

/// Prints a progress line to stderr every second until dropped.
pub struct Progress {
    stop: watch::Sender<bool>,
}

impl Progress {
    pub fn start(label: &'static str, read: impl Fn() -> String + Send + 'static) -> Self {
        let (stop, mut rx) = watch::channel(false);
        let started = Instant::now();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(1)) => eprintln!("[{label} {:>4.0}s] {}", started.elapsed().as_secs_f64(), read()),
                    _ = rx.changed() => break,
                }
            }
        });
        Self { stop }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Registers `n` users named `{prefix}{i}` with `concurrency` in flight.
/// Returns the users that made it, their latencies, and errors by errcode.
pub async fn register_many(target: &Target, prefix: &str, n: usize, concurrency: usize) -> (Vec<Option<User>>, Latencies, ErrorCounts) {
    let done = Arc::new(AtomicU64::new(0));
    let d = done.clone();
    let _p = Progress::start("register", move || format!("{}/{n} accounts", d.load(Ordering::Relaxed)));
    let results: Vec<(usize, Result<User, ApiError>, u64)> = stream::iter(0..n)
        .map(|i| {
            let target = target.clone();
            let name = format!("{prefix}{i}");
            let done = done.clone();
            async move {
                let t = Instant::now();
                let r = target.register(&name, &format!("{name}-pw")).await;
                done.fetch_add(1, Ordering::Relaxed);
                (i, r, t.elapsed().as_micros() as u64)
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut users = vec![None; n];
    let mut lat = Latencies::default();
    let mut errors = ErrorCounts::new();
    for (i, r, micros) in results {
        match r {
            Ok(u) => {
                lat.push(micros);
                users[i] = Some(u);
            }
            Err(e) => count_error(&mut errors, e.kind()),
        }
    }
    (users, lat, errors)
}

/// Registers users, retrying refusals (`M_LIMIT_EXCEEDED`) so setup always completes.
pub async fn setup_users(target: &Target, prefix: &str, n: usize, concurrency: usize) -> Result<Vec<User>, String> {
    let (mut users, _, _) = register_many(target, prefix, n, concurrency).await;
    for _round in 0..20 {
        let missing: Vec<usize> = users.iter().enumerate().filter(|(_, u)| u.is_none()).map(|(i, _)| i).collect();
        if missing.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        for i in missing {
            let name = format!("{prefix}{i}");
            if let Ok(u) = target.register(&name, &format!("{name}-pw")).await {
                users[i] = Some(u);
            }
        }
    }
    users
        .into_iter()
        .enumerate()
        .map(|(i, u)| u.ok_or_else(|| format!("could not register {prefix}{i}")))
        .collect()
}

/// Who received which benchmark message, and how long it took.
pub struct Deliveries {
    clock: Instant,
    state: Mutex<DeliveryState>,
    pub delivered: AtomicU64,
}

struct Timed {
    sent_us: u64,
    latency_us: u64,
    member: u32,
    sender: u32,
}

#[derive(Default)]
struct DeliveryState {
    seen: HashMap<(u32, u64), u32>,
    /// Each first delivery: send time and latency in µs on the tracker's
    /// clock, the member it reached and the sender (the id's upper half).
    timed: Vec<Timed>,
}

/// The outcome of a delivery check.
#[derive(Debug, Clone, Copy, serde::Serialize, PartialEq, Eq)]
pub struct DeliveryCheck {
    pub expected: u64,
    pub delivered: u64,
    pub lost: u64,
    pub duplicated: u64,
}

impl Default for Deliveries {
    fn default() -> Self {
        Self {
            clock: Instant::now(),
            state: Mutex::default(),
            delivered: AtomicU64::new(0),
        }
    }
}

impl Deliveries {
    /// Microseconds since the tracker was made: the timestamps in message bodies.
    pub fn now_us(&self) -> u64 {
        self.clock.elapsed().as_micros() as u64
    }

    /// The body of benchmark message `id`, stamped now.
    pub fn body(&self, id: u64) -> String {
        format!("kb {id} {}", self.now_us())
    }

    /// Records every benchmark message in a sync response for `member`.
    pub fn record_sync(&self, member: u32, sync: &SyncMessages) {
        let now = self.now_us();
        let mut st = self.state.lock().expect("deliveries lock");
        for body in sync.bodies() {
            let mut parts = body.split(' ');
            if parts.next() != Some("kb") {
                continue;
            }
            let (Some(Ok(id)), Some(Ok(ts))) = (parts.next().map(str::parse::<u64>), parts.next().map(str::parse::<u64>)) else {
                continue;
            };
            let n = st.seen.entry((member, id)).or_insert(0);
            *n += 1;
            if *n == 1 {
                st.timed.push(Timed {
                    sent_us: ts,
                    latency_us: now.saturating_sub(ts),
                    member,
                    sender: (id >> 32) as u32,
                });
                self.delivered.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Compares what arrived with what should have: `expected` lists, per
    /// member, the message ids it must see.
    pub fn check(&self, expected: &[(u32, u64)]) -> DeliveryCheck {
        let st = self.state.lock().expect("deliveries lock");
        let lost = expected.iter().filter(|k| !st.seen.contains_key(k)).count() as u64;
        let duplicated = st.seen.values().filter(|n| **n > 1).map(|n| u64::from(*n - 1)).sum();
        DeliveryCheck {
            expected: expected.len() as u64,
            delivered: st.seen.len() as u64,
            lost,
            duplicated,
        }
    }

    pub fn latencies(&self) -> Latencies {
        self.latencies_sent_between(0, u64::MAX)
    }

    /// Latencies of the messages sent in `[from_us, to_us)` (tracker clock).
    pub fn latencies_sent_between(&self, from_us: u64, to_us: u64) -> Latencies {
        let st = self.state.lock().expect("deliveries lock");
        let mut out = Latencies::default();
        for t in &st.timed {
            if (from_us..to_us).contains(&t.sent_us) {
                out.push(t.latency_us);
            }
        }
        out
    }

    /// The latencies of each message, in the order they were sent.
    pub fn latencies_by_message(&self) -> Vec<Latencies> {
        let st = self.state.lock().expect("deliveries lock");
        let mut by_sent: std::collections::BTreeMap<u64, Latencies> = std::collections::BTreeMap::new();
        for t in &st.timed {
            by_sent.entry(t.sent_us).or_default().push(t.latency_us);
        }
        by_sent.into_values().collect()
    }

    /// Latencies of the deliveries from a sender to a member for which
    /// `pick(member, sender)` holds (ids as `(sender << 32) | seq`).
    pub fn latencies_where(&self, pick: impl Fn(u32, u32) -> bool) -> Latencies {
        let st = self.state.lock().expect("deliveries lock");
        let mut out = Latencies::default();
        for t in st.timed.iter().filter(|t| pick(t.member, t.sender)) {
            out.push(t.latency_us);
        }
        out
    }

    /// Waits until `expected` deliveries arrived or `timeout` passed.
    pub async fn wait_for(&self, expected: u64, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// Long-polls /sync for `user` until `stop`, feeding `deliveries`.
/// `held` counts requests in flight, `errors` failed syncs.
pub async fn follow(
    user: User,
    member: u32,
    start: SyncStart,
    deliveries: Arc<Deliveries>,
    mut stop: watch::Receiver<bool>,
    held: Arc<AtomicU64>,
    errors: Arc<Mutex<ErrorCounts>>,
) {
    let SyncStart {
        mut since,
        filter_id,
        conn,
    } = start;
    loop {
        if *stop.borrow() {
            return;
        }
        held.fetch_add(1, Ordering::Relaxed);
        let follow = async {
            if user.target.sliding {
                user.sliding_messages(&conn, Some(&since), 30_000).await
            } else {
                user.sync_messages(&since, 30_000, &filter_id).await
            }
        };
        let result = tokio::select! {
            r = follow => r,
            _ = stop.changed() => { held.fetch_sub(1, Ordering::Relaxed); return; }
        };
        held.fetch_sub(1, Ordering::Relaxed);
        match result {
            Ok(v) => {
                deliveries.record_sync(member, &v);
                since = v.next_batch;
            }
            Err(e) => {
                {
                    let mut errors = errors.lock().expect("errors lock");
                    if errors.get(&e.kind()).copied().unwrap_or(0) < 3 {
                        // A few samples on stderr say what the counts mean.
                        eprintln!("sync error for member {member}: {e}");
                    }
                    count_error(&mut errors, e.kind());
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

/// Where a user's long-polls start: the stream position and the uploaded filter.
#[derive(Debug, Clone)]
pub struct SyncStart {
    pub since: String,
    pub filter_id: String,
    /// The sliding-sync connection (`conn_id`) `since` belongs to.
    pub conn: String,
}

/// Uploads the benchmark's sync filter, as clients do once per session, and
/// runs one sync to learn where the user's stream stands now.
pub async fn initial_since(user: &User) -> Result<SyncStart, ApiError> {
    if user.target.sliding {
        return initial_sliding(user, "bench").await;
    }
    let filter_id = user.upload_filter(SYNC_FILTER).await?;
    let v = user.sync(None, 0, &filter_id).await?;
    Ok(SyncStart {
        since: v["next_batch"].as_str().unwrap_or_default().to_owned(),
        filter_id,
        conn: String::new(),
    })
}

/// A new sliding-sync connection `conn` for `user`: its first answer's `pos`.
/// Each client following at once needs a connection of its own.
pub async fn initial_sliding(user: &User, conn: &str) -> Result<SyncStart, ApiError> {
    let first = user.sliding_messages(conn, None, 0).await?;
    Ok(SyncStart {
        since: first.next_batch,
        filter_id: String::new(),
        conn: conn.to_owned(),
    })
}

/// A run-unique user name prefix, so repeated runs against one server do not collide.
pub fn run_prefix(scenario: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("kb{scenario}{:x}{:x}_", std::process::id() % 4096, nanos % 65536)
}

/// Resident memory of a process in bytes, from /proc (Linux).
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
