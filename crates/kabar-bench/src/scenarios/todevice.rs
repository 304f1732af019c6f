//! `todevice`: P pairs of users; each sender sends send-to-device messages
//! to its partner's device for T seconds (as fast as it can, or at a fixed
//! rate) while every receiver long-polls /sync. Measures sends per second,
//! delivery latency (send start to the message in the receiver's sync), and
//! lost or duplicated messages (the receiver always syncs from its newest
//! token, so any message seen twice is a duplicate).

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use futures::future::join_all;
use serde::Serialize;
use serde_json::json;

use super::Report;
use crate::{
    DeliveryCheck, Progress,
    chat::{Followers, Pacing, merge, send_paced},
    client::Target,
    run_prefix, setup_users,
    stats::{ErrorCounts, LatencySummary},
};

#[derive(Debug, Clone)]
pub struct Params {
    pub pairs: usize,
    pub seconds: f64,
    /// Messages per second per sender; `None` sends as fast as each can.
    pub rate_per_sender: Option<f64>,
    pub setup_concurrency: usize,
}

#[derive(Debug, Serialize)]
pub struct ToDeviceReport {
    pub scenario: &'static str,
    pub pairs: usize,
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

impl Report for ToDeviceReport {
    fn human(&self) -> String {
        format!(
            "todevice: {} pairs for {:.1}s{}: {} sent = {:.1} msgs/s (send p50 {:.1} ms, p99 {:.1} ms)\n  delivery: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} of {} delivered, lost {}, duplicated {}\n  send errors {:?}, sync errors {:?}",
            self.pairs,
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

pub async fn run(target: &Target, p: Params) -> Result<ToDeviceReport, String> {
    let pairs = p.pairs.max(1);
    let users = setup_users(target, &run_prefix("td"), pairs * 2, p.setup_concurrency).await?;
    let (senders, receivers) = users.split_at(pairs);
    let followers = Followers::start(receivers).await?;
    let sent = AtomicU64::new(0);
    let d = followers.deliveries.clone();
    let progress = Progress::start("todevice", {
        let d = d.clone();
        move || format!("{} delivered", d.delivered.load(Ordering::Relaxed))
    });
    let pacing = Pacing {
        start: Instant::now(),
        deadline: Instant::now() + Duration::from_secs_f64(p.seconds),
        interval: p.rate_per_sender.map(|r| Duration::from_secs_f64(1.0 / r.max(0.001))),
        senders: pairs,
    };
    let sends = senders.iter().zip(receivers).enumerate().map(|(i, (sender, receiver))| {
        let (deliveries, pacing, sent) = (&d, &pacing, &sent);
        send_paced(i, pacing, sent, move |id| async move {
            let content = json!({ "body": deliveries.body(id) });
            sender
                .send_to_device("m.kabar.bench", &format!("kb{id}"), &receiver.user_id, &receiver.device_id, content)
                .await
        })
    });
    let results = join_all(sends).await;
    let seconds = pacing.start.elapsed().as_secs_f64();
    // Sender i's messages go to receiver i only.
    let expected: Vec<(u32, u64)> = results
        .iter()
        .flat_map(|r| r.acked.iter().map(move |id| (r.sender as u32, *id)))
        .collect();
    let (total_sent, send_errors, send_latency) = merge(&results);
    let (check, sync_errors) = followers.finish(&expected).await;
    drop(progress);
    Ok(ToDeviceReport {
        scenario: "todevice",
        pairs,
        seconds,
        rate_per_sender: p.rate_per_sender,
        sent: total_sent,
        send_errors,
        sends_per_sec: total_sent as f64 / seconds,
        send_latency: send_latency.summary(),
        delivery_latency: d.latencies().summary(),
        deliveries: check,
        sync_errors,
    })
}
