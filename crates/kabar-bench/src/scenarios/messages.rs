//! `messages`: U users in R rooms; every user sends into its room for T
//! seconds (as fast as it can, or at a fixed rate) while every member keeps a
//! /sync long-poll open. Measures send throughput, delivery latency (send
//! start to the event appearing in each member's sync), and lost or
//! duplicated deliveries.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::future::join_all;
use serde::Serialize;
use serde_json::json;
use tokio::sync::watch;

use super::Report;
use crate::{
    Deliveries, DeliveryCheck, Progress,
    client::Target,
    follow, initial_since, run_prefix, setup_users,
    stats::{ErrorCounts, LatencySummary, count_error},
};

#[derive(Debug, Clone)]
pub struct Params {
    pub users: usize,
    pub rooms: usize,
    pub seconds: f64,
    /// Messages per second per sender; `None` sends as fast as each can.
    pub rate_per_sender: Option<f64>,
    pub setup_concurrency: usize,
}

#[derive(Debug, Serialize)]
pub struct MessagesReport {
    pub scenario: &'static str,
    pub users: usize,
    pub rooms: usize,
    pub seconds: f64,
    pub rate_per_sender: Option<f64>,
    pub sent: u64,
    pub send_errors: ErrorCounts,
    pub sends_per_sec: f64,
    pub send_latency: LatencySummary,
    pub delivery_latency: LatencySummary,
    pub deliveries: DeliveryCheck,
    pub sync_errors: ErrorCounts,
}

impl Report for MessagesReport {
    fn human(&self) -> String {
        format!(
            "messages: {} users in {} rooms for {:.1}s{}: {} sent = {:.1} msgs/s (send p50 {:.1} ms, p99 {:.1} ms)\n  delivery to every member: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} of {} deliveries, lost {}, duplicated {}\n  send errors {:?}, sync errors {:?}",
            self.users,
            self.rooms,
            self.seconds,
            self.rate_per_sender.map(|r| format!(" at {r}/s per sender")).unwrap_or_default(),
            self.sent,
            self.sends_per_sec,
            self.send_latency.p50_ms,
            self.send_latency.p99_ms,
            self.delivery_latency.p50_ms,
            self.delivery_latency.p99_ms,
            self.delivery_latency.max_ms,
            self.deliveries.delivered,
            self.deliveries.expected,
            self.deliveries.lost,
            self.deliveries.duplicated,
            self.send_errors,
            self.sync_errors,
        )
    }
}

pub async fn run(target: &Target, p: Params) -> Result<MessagesReport, String> {
    let rooms_n = p.rooms.clamp(1, p.users.max(1));
    let prefix = run_prefix("msg");
    let users = setup_users(target, &prefix, p.users, p.setup_concurrency).await?;

    // Room r is created by user r; user i sits in room i % R.
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

    // Every member follows its sync from now on.
    let deliveries = Arc::new(Deliveries::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let held = Arc::new(AtomicU64::new(0));
    let sync_errors = Arc::new(Mutex::new(ErrorCounts::new()));
    let mut followers = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let since = initial_since(u).await.map_err(|e| format!("initial sync: {e}"))?;
        followers.push(tokio::spawn(follow(
            u.clone(),
            i as u32,
            since,
            deliveries.clone(),
            stop_rx.clone(),
            held.clone(),
            sync_errors.clone(),
        )));
    }

    // Senders.
    let sent = Arc::new(AtomicU64::new(0));
    let (s, d) = (sent.clone(), deliveries.clone());
    let progress = Progress::start("messages", move || {
        format!(
            "{} sent, {} delivered",
            s.load(Ordering::Relaxed),
            d.delivered.load(Ordering::Relaxed)
        )
    });
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(p.seconds);
    let senders = users.iter().enumerate().map(|(i, u)| {
        let (u, room, deliveries, sent) = (u.clone(), room_ids[i % rooms_n].clone(), deliveries.clone(), sent.clone());
        let interval = p.rate_per_sender.map(|r| Duration::from_secs_f64(1.0 / r.max(0.001)));
        async move {
            let mut acked = Vec::new();
            let mut errors = ErrorCounts::new();
            let mut latencies = crate::stats::Latencies::default();
            let mut next = Instant::now();
            let mut seq: u64 = 0;
            while Instant::now() < deadline {
                if let Some(iv) = interval {
                    tokio::time::sleep_until(next.into()).await;
                    next += iv;
                    if Instant::now() >= deadline {
                        break;
                    }
                }
                let id = ((i as u64) << 32) | seq;
                seq += 1;
                let t = Instant::now();
                match u.send_text(&room, &format!("kb{id}"), &deliveries.body(id)).await {
                    Ok(_) => {
                        latencies.push(t.elapsed().as_micros() as u64);
                        acked.push(id);
                        sent.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => count_error(&mut errors, e.kind()),
                }
            }
            (i, acked, errors, latencies)
        }
    });
    let results = join_all(senders).await;
    let seconds = start.elapsed().as_secs_f64();

    // Who must see what: every member of the sender's room, the sender included.
    let mut expected = Vec::new();
    let mut send_errors = ErrorCounts::new();
    let mut send_latency = crate::stats::Latencies::default();
    let mut total_sent = 0u64;
    for (i, acked, errors, lat) in results {
        total_sent += acked.len() as u64;
        for (k, v) in errors {
            *send_errors.entry(k).or_insert(0) += v;
        }
        send_latency.extend(lat);
        for member in (0..users.len()).filter(|m| m % rooms_n == i % rooms_n) {
            expected.extend(acked.iter().map(|id| (member as u32, *id)));
        }
    }
    deliveries.wait_for(expected.len() as u64, Duration::from_secs(30)).await;
    drop(progress);
    let _ = stop_tx.send(true);
    for f in followers {
        let _ = f.await;
    }
    let check = deliveries.check(&expected);
    let sync_errors = sync_errors.lock().expect("errors lock").clone();
    Ok(MessagesReport {
        scenario: "messages",
        users: p.users,
        rooms: rooms_n,
        seconds,
        rate_per_sender: p.rate_per_sender,
        sent: total_sent,
        send_errors,
        sends_per_sec: total_sent as f64 / seconds,
        send_latency: send_latency.summary(),
        delivery_latency: deliveries.latencies().summary(),
        deliveries: check,
        sync_errors,
    })
}
