//! `surge`: what people already chatting feel when a crowd of newcomers
//! arrives at once.
//!
//! 1. Capacity: sign-ups alone, closed loop, to learn the sustained maximum.
//! 2. U users in R rooms chat at a steady rate (every member following its
//!    sync) for the whole run: `before` seconds of calm, `flood` seconds during
//!    which new people try to register at `multiplier` x capacity (open loop,
//!    spread over several source addresses, each person trying once), then
//!    `after` seconds of calm again.
//!
//! Reports the chatters' delivery latency before, during and after the flood
//! (and per second after it, to see recovery), the newcomers' admitted
//! sign-ups/s, how many were refused with `M_LIMIT_EXCEEDED` and how fast,
//! how many failed otherwise or timed out, lost and duplicated messages, and
//! the server's resident memory at each phase.

use std::{
    net::{IpAddr, Ipv4Addr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use futures::{StreamExt, stream};
use serde::Serialize;

use super::Report;
use crate::{
    DeliveryCheck, Progress,
    chat::{Chat, merge},
    client::{SignupOutcome, Target},
    resident_bytes, run_prefix,
    stats::{ErrorCounts, Latencies, LatencySummary, count_error},
};

#[derive(Debug, Clone)]
pub struct Params {
    pub users: usize,
    pub rooms: usize,
    /// Messages per second per chatting user.
    pub rate_per_sender: f64,
    /// Seconds of sign-ups alone to measure capacity; skipped when `capacity` is given.
    pub capacity_seconds: f64,
    /// Known sustained sign-ups/s, instead of measuring it.
    pub capacity: Option<f64>,
    /// People signing up back to back while capacity is measured: enough to
    /// keep every hashing thread busy, few enough that the queue stays within
    /// its deadline.
    pub capacity_concurrency: usize,
    pub before_seconds: f64,
    pub flood_seconds: f64,
    pub after_seconds: f64,
    /// Flood arrival rate as a multiple of capacity.
    pub multiplier: f64,
    /// Source addresses 127.0.0.2 .. 127.0.0.(1+sources) for the newcomers.
    pub sources: usize,
    /// How long a newcomer waits for an answer before counting a timeout.
    pub newcomer_timeout: Duration,
    pub server_pid: Option<u32>,
    pub setup_concurrency: usize,
}

#[derive(Debug, Default, Serialize)]
pub struct Newcomers {
    pub attempts: u64,
    pub registered: u64,
    pub refused: u64,
    /// Refusals that carried no `retry_after_ms` (a defect if not zero).
    pub refused_without_retry_after: u64,
    /// How long refusing responses took.
    pub refusal_latency: Option<LatencySummary>,
    /// Refusals that took longer than 50 ms.
    pub refused_after_50ms: u64,
    pub retry_after_ms_min: Option<u64>,
    pub retry_after_ms_median: Option<u64>,
    pub retry_after_ms_max: Option<u64>,
    pub timed_out: u64,
    /// Other failures, by errcode.
    pub failed: ErrorCounts,
}

#[derive(Debug, Serialize)]
pub struct PhaseLatency {
    pub before: LatencySummary,
    pub flood: LatencySummary,
    pub after: LatencySummary,
    /// The after phase without its first 5 seconds.
    pub after_settled: LatencySummary,
    /// p99 of each second before the flood, in ms (null: nothing sent that second).
    pub before_p99_by_second_ms: Vec<Option<f64>>,
    /// p99 of each second after the flood, in ms (null: nothing sent that second).
    pub after_p99_by_second_ms: Vec<Option<f64>>,
}

#[derive(Debug, Serialize)]
pub struct SurgeReport {
    pub scenario: &'static str,
    pub users: usize,
    pub rooms: usize,
    pub rate_per_sender: f64,
    /// Sustained sign-ups/s alone (measured unless given).
    pub capacity_signups_per_sec: f64,
    pub capacity_measured: bool,
    pub flood_seconds: f64,
    pub flood_offered_per_sec: f64,
    pub flood_admitted_per_sec: f64,
    /// Admitted during the flood as a share of capacity.
    pub admitted_share_of_capacity: f64,
    pub newcomers: Newcomers,
    pub sent: u64,
    pub delivery_latency: PhaseLatency,
    /// The first whole second after the flood from which the p99 of all the
    /// later deliveries is within 1.5x the before-flood p99 (null: never
    /// within the after phase). Judged on everything from that second on,
    /// not second by second: a second of a light chat holds a few dozen
    /// deliveries, and its p99 is its slowest one.
    pub recovery_seconds: Option<f64>,
    pub send_errors: ErrorCounts,
    pub sync_errors: ErrorCounts,
    pub deliveries: DeliveryCheck,
    pub server_rss_before_mib: Option<f64>,
    pub server_rss_flood_end_mib: Option<f64>,
    pub server_rss_end_mib: Option<f64>,
}

impl Report for SurgeReport {
    fn human(&self) -> String {
        let l = &self.delivery_latency;
        let mib = |v: Option<f64>| v.map(|m| format!("{m:.0} MiB")).unwrap_or_else(|| "?".into());
        let n = &self.newcomers;
        format!(
            "surge: {} users in {} rooms at {}/s each; sign-up capacity {:.1}/s ({}); flood {:.0}s at {:.0} attempts/s\n  \
             chatters' delivery p50/p99: before {:.1}/{:.1} ms, flood {:.1}/{:.1} ms, after {:.1}/{:.1} ms (settled {:.1}/{:.1} ms); recovery {}\n  \
             newcomers: {} attempts, {} registered = {:.1}/s ({:.0}% of capacity), {} refused (answered p50 {} ms, p99 {} ms, max {} ms, {} after 50 ms; retry_after_ms {}..{}), {} without retry_after, {} timed out, other failures {:?}\n  \
             {} sent; deliveries {} of {}, lost {}, duplicated {}; send errors {:?}, sync errors {:?}; server RSS {} before, {} at flood end, {} at end",
            self.users,
            self.rooms,
            self.rate_per_sender,
            self.capacity_signups_per_sec,
            if self.capacity_measured { "measured alone" } else { "given" },
            self.flood_seconds,
            self.flood_offered_per_sec,
            l.before.p50_ms,
            l.before.p99_ms,
            l.flood.p50_ms,
            l.flood.p99_ms,
            l.after.p50_ms,
            l.after.p99_ms,
            l.after_settled.p50_ms,
            l.after_settled.p99_ms,
            self.recovery_seconds
                .map(|s| format!("{s:.0} s"))
                .unwrap_or_else(|| "not reached".into()),
            n.attempts,
            n.registered,
            self.flood_admitted_per_sec,
            self.admitted_share_of_capacity * 100.0,
            n.refused,
            n.refusal_latency.map(|r| format!("{:.1}", r.p50_ms)).unwrap_or_else(|| "-".into()),
            n.refusal_latency.map(|r| format!("{:.1}", r.p99_ms)).unwrap_or_else(|| "-".into()),
            n.refusal_latency.map(|r| format!("{:.1}", r.max_ms)).unwrap_or_else(|| "-".into()),
            n.refused_after_50ms,
            n.retry_after_ms_min.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
            n.retry_after_ms_max.map(|v| v.to_string()).unwrap_or_else(|| "-".into()),
            n.refused_without_retry_after,
            n.timed_out,
            n.failed,
            self.sent,
            self.deliveries.delivered,
            self.deliveries.expected,
            self.deliveries.lost,
            self.deliveries.duplicated,
            self.send_errors,
            self.sync_errors,
            mib(self.server_rss_before_mib),
            mib(self.server_rss_flood_end_mib),
            mib(self.server_rss_end_mib),
        )
    }
}

fn rss_mib(pid: Option<u32>) -> Option<f64> {
    pid.and_then(resident_bytes).map(|b| b as f64 / (1024.0 * 1024.0))
}

/// Sign-ups/s with `concurrency` people registering back to back for `seconds`.
async fn measure_capacity(targets: &[Target], prefix: &str, seconds: f64, concurrency: usize) -> f64 {
    let registered = Arc::new(AtomicU64::new(0));
    let r = registered.clone();
    let _progress = Progress::start("surge capacity", move || format!("{} registered", r.load(Ordering::Relaxed)));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(seconds);
    let concurrency = concurrency.max(1);
    let next = Arc::new(AtomicU64::new(0));
    stream::iter(0..concurrency)
        .for_each_concurrent(concurrency, |w| {
            let target = targets[w % targets.len()].clone();
            let (registered, next) = (registered.clone(), next.clone());
            async move {
                while Instant::now() < deadline {
                    let name = format!("{prefix}cap{}", next.fetch_add(1, Ordering::Relaxed));
                    match target.try_signup(&name, &format!("{name}-pw")).await {
                        SignupOutcome::Registered => {
                            registered.fetch_add(1, Ordering::Relaxed);
                        }
                        SignupOutcome::Refused { retry_after_ms, .. } => {
                            tokio::time::sleep(Duration::from_millis(retry_after_ms.unwrap_or(100))).await;
                        }
                        SignupOutcome::Failed(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                    }
                }
            }
        })
        .await;
    registered.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Newcomers arriving at `rate` per second for `seconds`, each trying once.
async fn flood(targets: &[Target], prefix: &str, rate: f64, seconds: f64, timeout: Duration) -> (Newcomers, Vec<u64>, Latencies) {
    let registered = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let (g, f) = (registered.clone(), refused.clone());
    let _progress = Progress::start("surge flood", move || {
        format!("{} registered, {} refused", g.load(Ordering::Relaxed), f.load(Ordering::Relaxed))
    });
    let start = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / rate.max(0.001));
    let total = (rate * seconds).round().max(1.0) as u64;
    let mut attempts = Vec::with_capacity(total as usize);
    for k in 0..total {
        tokio::time::sleep_until((start + interval * k as u32).into()).await;
        let target = targets[k as usize % targets.len()].clone();
        let name = format!("{prefix}new{k}");
        let (registered, refused) = (registered.clone(), refused.clone());
        attempts.push(tokio::spawn(async move {
            let outcome = tokio::time::timeout(timeout, target.try_signup(&name, &format!("{name}-pw"))).await;
            match &outcome {
                Ok(SignupOutcome::Registered) => {
                    registered.fetch_add(1, Ordering::Relaxed);
                }
                Ok(SignupOutcome::Refused { .. }) => {
                    refused.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
            outcome
        }));
    }
    let mut out = Newcomers {
        attempts: total,
        ..Default::default()
    };
    let mut retry_afters = Vec::new();
    let mut refusal_latency = Latencies::default();
    for a in attempts {
        match a.await {
            Ok(Ok(SignupOutcome::Registered)) => out.registered += 1,
            Ok(Ok(SignupOutcome::Refused {
                answered_in_us,
                retry_after_ms,
            })) => {
                out.refused += 1;
                refusal_latency.push(answered_in_us);
                if answered_in_us > 50_000 {
                    out.refused_after_50ms += 1;
                }
                match retry_after_ms {
                    Some(ms) => retry_afters.push(ms),
                    None => out.refused_without_retry_after += 1,
                }
            }
            Ok(Ok(SignupOutcome::Failed(e))) if e.kind() == "TIMEOUT" => out.timed_out += 1,
            Ok(Ok(SignupOutcome::Failed(e))) => count_error(&mut out.failed, e.kind()),
            Ok(Err(_elapsed)) => out.timed_out += 1,
            Err(join) => count_error(&mut out.failed, format!("PANIC {join}")),
        }
    }
    (out, retry_afters, refusal_latency)
}

pub async fn run(target: &Target, p: Params) -> Result<SurgeReport, String> {
    let prefix = run_prefix("surge");
    let newcomer_targets: Vec<Target> = (0..p.sources.max(1))
        .map(|k| {
            let b = Target::builder()
                .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (k % 250) as u8)))
                .timeout(p.newcomer_timeout);
            Target::with_client(&target.base, b.build().expect("http client"))
        })
        .collect();

    let chat = Chat::start(target, &prefix, p.users, p.rooms, p.setup_concurrency).await?;
    let (capacity, capacity_measured) = match p.capacity {
        Some(c) => (c, false),
        None => (
            measure_capacity(&newcomer_targets, &prefix, p.capacity_seconds, p.capacity_concurrency).await,
            true,
        ),
    };
    if capacity <= 0.0 {
        return Err("no sign-up succeeded while measuring capacity".into());
    }

    let (s, d) = (chat.sent.clone(), chat.deliveries.clone());
    let progress = Progress::start("surge chat", move || {
        format!(
            "{} sent, {} delivered",
            s.load(Ordering::Relaxed),
            d.delivered.load(Ordering::Relaxed)
        )
    });
    let second = Duration::from_secs(1);
    let t0 = chat.deliveries.now_us();
    let flood_start_us = t0 + (p.before_seconds * 1e6) as u64;
    let flood_end_us = flood_start_us + (p.flood_seconds * 1e6) as u64;
    let end_us = flood_end_us + (p.after_seconds * 1e6) as u64;
    let started = Instant::now();
    let chat_end = started + Duration::from_micros(end_us - t0);
    let interval = Some(Duration::from_secs_f64(1.0 / p.rate_per_sender.max(0.001)));

    let newcomers_run = async {
        tokio::time::sleep(Duration::from_micros(flood_start_us - t0)).await;
        let rss_before = rss_mib(p.server_pid);
        let (newcomers, retry_afters, refusal_latency) = flood(
            &newcomer_targets,
            &prefix,
            capacity * p.multiplier,
            p.flood_seconds,
            p.newcomer_timeout,
        )
        .await;
        (newcomers, retry_afters, refusal_latency, rss_before, rss_mib(p.server_pid))
    };
    let (results, (mut newcomers, mut retry_afters, refusal_latency, rss_before, rss_flood_end)) =
        tokio::join!(chat.send_until(chat_end, interval), newcomers_run);
    drop(progress);
    let rss_end = rss_mib(p.server_pid);

    let expected = chat.expected(&results);
    let (sent, send_errors, _) = merge(&results);
    let deliveries = chat.deliveries.clone();
    let (check, sync_errors) = chat.finish(&expected).await;

    let phase = |from: u64, to: u64| deliveries.latencies_sent_between(from, to).summary();
    let before = phase(t0, flood_start_us);
    let by_second = |from: u64, to: u64| -> Vec<Option<f64>> {
        (from..to)
            .step_by(second.as_micros() as usize)
            .map(|start| {
                let window = deliveries.latencies_sent_between(start, (start + second.as_micros() as u64).min(to));
                (!window.is_empty()).then(|| window.summary().p99_ms)
            })
            .collect()
    };
    let before_by_second = by_second(t0, flood_start_us);
    let after_by_second = by_second(flood_end_us, end_us);
    let threshold = before.p99_ms * 1.5;
    let recovery_seconds = (0..p.after_seconds.floor() as u64)
        .find(|&k| {
            let rest = deliveries.latencies_sent_between(flood_end_us + k * second.as_micros() as u64, end_us);
            rest.len() >= 20 && rest.summary().p99_ms <= threshold
        })
        .map(|k| k as f64);
    retry_afters.sort_unstable();
    newcomers.retry_after_ms_min = retry_afters.first().copied();
    newcomers.retry_after_ms_median = retry_afters.get(retry_afters.len() / 2).copied();
    newcomers.retry_after_ms_max = retry_afters.last().copied();
    newcomers.refusal_latency = (!refusal_latency.is_empty()).then(|| refusal_latency.summary());
    let admitted_per_sec = newcomers.registered as f64 / p.flood_seconds;
    Ok(SurgeReport {
        scenario: "surge",
        users: p.users,
        rooms: p.rooms.clamp(1, p.users.max(1)),
        rate_per_sender: p.rate_per_sender,
        capacity_signups_per_sec: capacity,
        capacity_measured,
        flood_seconds: p.flood_seconds,
        flood_offered_per_sec: capacity * p.multiplier,
        flood_admitted_per_sec: admitted_per_sec,
        admitted_share_of_capacity: admitted_per_sec / capacity,
        newcomers,
        sent,
        delivery_latency: PhaseLatency {
            before,
            flood: phase(flood_start_us, flood_end_us),
            after: phase(flood_end_us, end_us),
            after_settled: phase(flood_end_us + 5_000_000, end_us),
            before_p99_by_second_ms: before_by_second,
            after_p99_by_second_ms: after_by_second,
        },
        recovery_seconds,
        send_errors,
        sync_errors,
        deliveries: check,
        server_rss_before_mib: rss_before,
        server_rss_flood_end_mib: rss_flood_end,
        server_rss_end_mib: rss_end,
    })
}
