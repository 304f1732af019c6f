//! `messages`: U users in R rooms; every user sends into its room for T
//! seconds (as fast as it can, or at a fixed rate) while every member keeps a
//! /sync long-poll open. Measures send throughput, delivery latency (send
//! start to the event appearing in each member's sync), and lost or
//! duplicated deliveries.

use std::{
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use serde::Serialize;

use super::Report;
use crate::{
    DeliveryCheck, Progress,
    chat::{Chat, merge},
    client::Target,
    run_prefix,
    stats::{ErrorCounts, LatencySummary},
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
    /// With `--spread`: the deliveries to a member on another node than
    /// the one the message was sent through (long-polled on another).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cross_node_delivery_latency: Option<LatencySummary>,
    pub deliveries: DeliveryCheck,
    pub sync_errors: ErrorCounts,
}

impl Report for MessagesReport {
    fn human(&self) -> String {
        let cross = self.cross_node_delivery_latency.as_ref().map_or(String::new(), |c| {
            format!(
                "\n  delivery to members on another node than the sender: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} deliveries)",
                c.p50_ms, c.p99_ms, c.max_ms, c.count
            )
        });
        format!(
            "messages: {} users in {} rooms for {:.1}s{}: {} sent = {:.1} msgs/s (send p50 {:.1} ms, p99 {:.1} ms)\n  delivery to every member: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} of {} deliveries, lost {}, duplicated {}{cross}\n  send errors {:?}, sync errors {:?}",
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
    let chat = Chat::start(target, &run_prefix("msg"), p.users, p.rooms, p.setup_concurrency).await?;
    let (s, d) = (chat.sent.clone(), chat.deliveries.clone());
    let progress = Progress::start("messages", move || {
        format!(
            "{} sent, {} delivered",
            s.load(Ordering::Relaxed),
            d.delivered.load(Ordering::Relaxed)
        )
    });
    let start = Instant::now();
    let interval = p.rate_per_sender.map(|r| Duration::from_secs_f64(1.0 / r.max(0.001)));
    let results = chat.send_until(start + Duration::from_secs_f64(p.seconds), interval).await;
    let seconds = start.elapsed().as_secs_f64();
    let expected = chat.expected(&results);
    let (total_sent, send_errors, send_latency) = merge(&results);
    let rooms = chat.rooms.len();
    let deliveries = chat.deliveries.clone();
    let cross_node_delivery_latency = (!target.others.is_empty()).then(|| {
        deliveries
            .latencies_where(|member, sender| chat.node_of(member as usize) != chat.sending_node_of(sender as usize))
            .summary()
    });
    let (check, sync_errors) = chat.finish(&expected).await;
    drop(progress);
    Ok(MessagesReport {
        scenario: "messages",
        users: p.users,
        rooms,
        seconds,
        rate_per_sender: p.rate_per_sender,
        sent: total_sent,
        send_errors,
        sends_per_sec: total_sent as f64 / seconds,
        send_latency: send_latency.summary(),
        delivery_latency: deliveries.latencies().summary(),
        cross_node_delivery_latency,
        deliveries: check,
        sync_errors,
    })
}
