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
    chat::{Followers, SenderResult, merge},
    client::Target,
    run_prefix, setup_users,
    stats::{ErrorCounts, Latencies, LatencySummary, count_error},
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
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(p.seconds);
    let interval = p.rate_per_sender.map(|r| Duration::from_secs_f64(1.0 / r.max(0.001)));
    let sends = senders.iter().zip(receivers).enumerate().map(|(i, (sender, receiver))| {
        let (deliveries, sent) = (&d, &sent);
        async move {
            let mut result = SenderResult {
                sender: i,
                acked: Vec::new(),
                errors: ErrorCounts::new(),
                latencies: Latencies::default(),
            };
            // Paced senders start spread over the first interval.
            let mut next = start + interval.map_or(Duration::ZERO, |iv| iv * i as u32 / pairs as u32);
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
                let content = json!({ "body": deliveries.body(id) });
                match sender
                    .send_to_device("m.kabar.bench", &format!("kb{id}"), &receiver.user_id, &receiver.device_id, content)
                    .await
                {
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
    });
    let results = join_all(sends).await;
    let seconds = start.elapsed().as_secs_f64();
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
