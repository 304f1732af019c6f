//! `idle`: S clients each hold a /sync long-poll open, spread over several
//! 127.0.0.x source addresses; reports how many were held, the server's
//! resident memory per held client, and the delivery latency of one message
//! to a room they all sit in.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;

use super::Report;
use crate::{
    Deliveries, DeliveryCheck, Progress, SyncStart,
    client::Target,
    follow, initial_since, initial_sliding, resident_bytes, run_prefix, setup_users,
    stats::{ErrorCounts, LatencySummary},
};

#[derive(Debug, Clone)]
pub struct Params {
    pub clients: usize,
    /// Distinct accounts the clients are spread over.
    pub users: usize,
    /// Source addresses 127.0.0.2 .. 127.0.0.(1+sources).
    pub sources: usize,
    /// Multiplex long-polls over HTTP/2 (prior knowledge) instead of one TCP connection each.
    pub http2: bool,
    pub server_pid: Option<u32>,
    pub concurrency: usize,
}

#[derive(Debug, Serialize)]
pub struct IdleReport {
    pub scenario: &'static str,
    pub clients: usize,
    pub held: u64,
    pub http2: bool,
    pub server_rss_before_mib: Option<f64>,
    pub server_rss_held_mib: Option<f64>,
    /// (RSS held - RSS before) / held; can be near zero or negative noise when
    /// the allocator returned setup memory in between.
    pub rss_per_client_kib: Option<f64>,
    /// The whole process's RSS while held, divided by the clients held: an
    /// upper bound that counts the server's baseline against the clients.
    pub rss_held_per_client_kib: Option<f64>,
    pub delivery_latency: LatencySummary,
    pub deliveries: DeliveryCheck,
    pub sync_errors: ErrorCounts,
}

impl Report for IdleReport {
    fn human(&self) -> String {
        let mib = |v: Option<f64>| v.map(|m| format!("{m:.0} MiB")).unwrap_or_else(|| "?".into());
        format!(
            "idle: {} of {} long-polls held{}; server RSS {} before, {} held = {} per client\n  one message to all: delivery p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; {} of {} deliveries, lost {}, duplicated {}; sync errors {:?}",
            self.held,
            self.clients,
            if self.http2 { " over HTTP/2" } else { "" },
            mib(self.server_rss_before_mib),
            mib(self.server_rss_held_mib),
            self.rss_per_client_kib.map(|k| format!("{k:.1} KiB")).unwrap_or_else(|| "?".into()),
            self.delivery_latency.p50_ms,
            self.delivery_latency.p99_ms,
            self.delivery_latency.max_ms,
            self.deliveries.delivered,
            self.deliveries.expected,
            self.deliveries.lost,
            self.deliveries.duplicated,
            self.sync_errors,
        )
    }
}

pub async fn run(target: &Target, p: Params) -> Result<IdleReport, String> {
    let prefix = run_prefix("idle");
    let users = setup_users(target, &prefix, p.users.clamp(1, p.clients.max(1)), p.concurrency).await?;
    let room = users[0]
        .create_room(json!({ "preset": "public_chat" }))
        .await
        .map_err(|e| format!("create room: {e}"))?;
    for u in users.iter().skip(1) {
        u.join(&room).await.map_err(|e| format!("join: {e}"))?;
    }

    // One connection pool per source address.
    let targets: Vec<Target> = (0..p.sources.max(1))
        .map(|k| {
            let mut b = Target::builder().local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + k as u8)));
            if p.http2 {
                b = b.http2_prior_knowledge();
            }
            let mut t = Target::with_client(&target.base, b.build().expect("http client"));
            t.sliding = target.sliding;
            t
        })
        .collect();

    let rss_before = p.server_pid.and_then(resident_bytes);
    let deliveries = Arc::new(Deliveries::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let held = Arc::new(AtomicU64::new(0));
    let sync_errors = Arc::new(Mutex::new(ErrorCounts::new()));
    let h = held.clone();
    let progress = Progress::start("idle", move || format!("{} long-polls held", h.load(Ordering::Relaxed)));
    // `/v3/sync` clients of one user may share a token; sliding-sync
    // clients each open a connection of their own.
    let starts: Vec<Result<SyncStart, crate::client::ApiError>> = if target.sliding {
        stream::iter((0..p.clients).map(|c| {
            let user = users[c % users.len()].clone();
            async move { initial_sliding(&user, &format!("c{c}")).await }
        }))
        .buffered(p.concurrency.max(1))
        .collect()
        .await
    } else {
        stream::iter(users.iter().map(initial_since))
            .buffered(p.concurrency.max(1))
            .collect()
            .await
    };
    let sinces: Vec<SyncStart> = starts
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(|e| format!("initial sync: {e}"))?;
    let mut followers = Vec::with_capacity(p.clients);
    for c in 0..p.clients {
        let u = c % users.len();
        let user = users[u].via(&targets[c % targets.len()]);
        followers.push(tokio::spawn(follow(
            user,
            c as u32,
            if target.sliding { sinces[c].clone() } else { sinces[u].clone() },
            deliveries.clone(),
            stop_rx.clone(),
            held.clone(),
            sync_errors.clone(),
        )));
        if c % 1000 == 999 {
            tokio::task::yield_now().await;
        }
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while held.load(Ordering::Relaxed) < p.clients as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let the server settle with every request parked.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let held_now = held.load(Ordering::Relaxed);
    let rss_held = p.server_pid.and_then(resident_bytes);
    drop(progress);

    let mut expected = Vec::new();
    if users[0].send_text(&room, "kb0", &deliveries.body(0)).await.is_ok() {
        expected.extend((0..p.clients as u32).map(|c| (c, 0u64)));
    }
    let d = deliveries.clone();
    let progress = Progress::start("idle delivery", move || {
        format!("{} delivered", d.delivered.load(Ordering::Relaxed))
    });
    deliveries.wait_for(expected.len() as u64, Duration::from_secs(60)).await;
    drop(progress);
    let _ = stop_tx.send(true);
    for f in followers {
        let _ = f.await;
    }
    let mib = |b: Option<u64>| b.map(|b| b as f64 / (1024.0 * 1024.0));
    let per_client = match (rss_before, rss_held) {
        (Some(b), Some(a)) if held_now > 0 => Some((a.saturating_sub(b)) as f64 / 1024.0 / held_now as f64),
        _ => None,
    };
    let sync_errors = sync_errors.lock().expect("errors lock").clone();
    Ok(IdleReport {
        scenario: "idle",
        clients: p.clients,
        held: held_now,
        http2: p.http2,
        server_rss_before_mib: mib(rss_before),
        server_rss_held_mib: mib(rss_held),
        rss_per_client_kib: per_client,
        rss_held_per_client_kib: rss_held.filter(|_| held_now > 0).map(|a| a as f64 / 1024.0 / held_now as f64),
        delivery_latency: deliveries.latencies().summary(),
        deliveries: deliveries.check(&expected),
        sync_errors,
    })
}
