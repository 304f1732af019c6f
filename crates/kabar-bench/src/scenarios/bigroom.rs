//! `bigroom`: J users join one room; K messages go out, one every interval
//! (overlapping when a send takes longer), from one sender or from several
//! members in turns; measures joins/s, send latency and the delivery
//! latency of each message to every member online (all of them, or the
//! first `online`: the rest joined and stay offline). With `channel`, the
//! room is a broadcast channel (`kabar.channel`): the members are
//! subscribers, the owner posts, and at the end each subscriber marks the
//! last post read, and the post's view count must equal their number.

use std::{
    collections::HashMap,
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
    Deliveries, DeliveryCheck, Progress,
    client::Target,
    follow, initial_since, run_prefix, setup_users,
    stats::{ErrorCounts, LatencySummary, count_error},
};

#[derive(Debug, Clone)]
pub struct Params {
    pub members: usize,
    pub messages: usize,
    pub interval: Duration,
    pub concurrency: usize,
    pub channel: bool,
    /// Members following their sync during the messages (`None`: all).
    pub online: Option<usize>,
    /// Members the messages come from, in turns (a channel: its owner).
    pub senders: usize,
    /// The members online multiplex their long-polls over HTTP/2
    /// (cleartext, prior knowledge) from `HTTP2_SOURCES` source addresses:
    /// more of them than one process may open sockets for.
    pub http2: bool,
}

/// Source addresses (127.0.0.2 and on) the HTTP/2 followers come from.
const HTTP2_SOURCES: usize = 4;

#[derive(Debug, Serialize)]
pub struct BigroomReport {
    pub scenario: &'static str,
    pub members: usize,
    pub joined: usize,
    pub join_seconds: f64,
    pub joins_per_sec: f64,
    pub join_latency: LatencySummary,
    pub join_errors: ErrorCounts,
    pub messages: usize,
    pub online: usize,
    pub send_latency: LatencySummary,
    pub delivery_latency: LatencySummary,
    /// Each message's delivery p99 in milliseconds, in the order sent: a
    /// tail from one slow message (the first after a start, say) shows here.
    pub delivery_p99_by_message_ms: Vec<f64>,
    pub deliveries: DeliveryCheck,
    pub sync_errors: ErrorCounts,
    /// A channel's last post: its view count once every subscriber read
    /// it, and the number it should be.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub views: Option<ViewCheck>,
}

#[derive(Debug, Serialize)]
pub struct ViewCheck {
    pub counted: u64,
    pub expected: usize,
    pub receipt_errors: ErrorCounts,
}

impl Report for BigroomReport {
    fn human(&self) -> String {
        format!(
            "bigroom: {}/{} joined in {:.1}s = {:.1} joins/s (join p50 {:.0} ms, p99 {:.0} ms), join errors {:?}\n  {} messages (send p50 {:.1} ms, p99 {:.1} ms) to {} members online: delivery p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; {} of {} deliveries, lost {}, duplicated {}; sync errors {:?}",
            self.joined,
            self.members,
            self.join_seconds,
            self.joins_per_sec,
            self.join_latency.p50_ms,
            self.join_latency.p99_ms,
            self.join_errors,
            self.messages,
            self.send_latency.p50_ms,
            self.send_latency.p99_ms,
            self.online,
            self.delivery_latency.p50_ms,
            self.delivery_latency.p99_ms,
            self.delivery_latency.max_ms,
            self.deliveries.delivered,
            self.deliveries.expected,
            self.deliveries.lost,
            self.deliveries.duplicated,
            self.sync_errors,
        ) + &format!(
            "\n  delivery p99 by message (ms): {}",
            self.delivery_p99_by_message_ms
                .iter()
                .map(|ms| format!("{ms:.0}"))
                .collect::<Vec<_>>()
                .join(" ")
        ) + &self.views.as_ref().map_or(String::new(), |v| {
            format!(
                "\n  views of the last post: {} counted, {} subscribers read it; receipt errors {:?}",
                v.counted, v.expected, v.receipt_errors
            )
        })
    }
}

pub async fn run(target: &Target, p: Params) -> Result<BigroomReport, String> {
    let prefix = run_prefix("big");
    let users = setup_users(target, &prefix, p.members.max(1), p.concurrency).await?;
    let creation = if p.channel {
        json!({ "preset": "public_chat", "creation_content": { "type": "kabar.channel" } })
    } else {
        json!({ "preset": "public_chat" })
    };
    let room = users[0].create_room(creation).await.map_err(|e| format!("create room: {e}"))?;

    // Joins, timed.
    let joined_n = Arc::new(AtomicU64::new(0));
    let j = joined_n.clone();
    let progress = Progress::start("bigroom joins", move || format!("{} joined", j.load(Ordering::Relaxed)));
    let start = Instant::now();
    let results: Vec<(usize, Result<(), crate::client::ApiError>, u64)> = stream::iter(users.iter().enumerate().skip(1))
        .map(|(i, u)| {
            let (room, joined_n) = (room.clone(), joined_n.clone());
            async move {
                let t = Instant::now();
                let r = u.join(&room).await;
                joined_n.fetch_add(1, Ordering::Relaxed);
                (i, r, t.elapsed().as_micros() as u64)
            }
        })
        .buffer_unordered(p.concurrency.max(1))
        .collect()
        .await;
    let join_seconds = start.elapsed().as_secs_f64();
    drop(progress);
    let mut join_errors = ErrorCounts::new();
    let mut join_latency = crate::stats::Latencies::default();
    let mut members = vec![0usize];
    for (i, r, micros) in results {
        match r {
            Ok(()) => {
                join_latency.push(micros);
                members.push(i);
            }
            Err(e) => count_error(&mut join_errors, e.kind()),
        }
    }

    // The members online follow their sync, each over a connection of its
    // own that stays open between long-polls, as a real client's does (the
    // setup's pool keeps few idle connections: past them, a long-poll
    // answered in a burst of thousands would close its connection and the
    // next one open a new one).
    let online: Vec<usize> = members.iter().copied().take(p.online.unwrap_or(usize::MAX)).collect();
    let follow_http: Vec<reqwest::Client> = if p.http2 {
        (0..HTTP2_SOURCES)
            .map(|k| {
                Target::builder()
                    .local_address(std::net::IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, 2 + k as u8)))
                    .http2_prior_knowledge()
                    .build()
            })
            .collect::<Result<_, _>>()
    } else {
        Target::builder().pool_max_idle_per_host(online.len() + 64).build().map(|c| vec![c])
    }
    .map_err(|e| format!("http client: {e}"))?;
    let followers_as: HashMap<usize, crate::client::User> = online
        .iter()
        .enumerate()
        .map(|(n, &i)| (i, users[i].via(&users[i].target.over(follow_http[n % follow_http.len()].clone()))))
        .collect();
    let deliveries = Arc::new(Deliveries::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let held = Arc::new(AtomicU64::new(0));
    let sync_errors = Arc::new(Mutex::new(ErrorCounts::new()));
    let sinces: Vec<Result<crate::SyncStart, crate::client::ApiError>> =
        stream::iter(online.iter().map(|i| initial_since(&followers_as[i])))
            .buffered(p.concurrency.max(1))
            .collect()
            .await;
    let mut followers = Vec::new();
    for (&i, since) in online.iter().zip(sinces) {
        let since = since.map_err(|e| format!("initial sync: {e}"))?;
        followers.push(tokio::spawn(follow(
            followers_as[&i].clone(),
            i as u32,
            since,
            deliveries.clone(),
            stop_rx.clone(),
            held.clone(),
            sync_errors.clone(),
        )));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while held.load(Ordering::Relaxed) < online.len() as u64 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    // K messages, one every interval, from the senders in turns; a send
    // that takes longer than the interval overlaps the next.
    let senders: Vec<usize> = if p.channel || p.senders <= 1 {
        vec![0]
    } else {
        // Spread over the members (joined in no particular order).
        let n = p.senders.min(members.len());
        (0..n).map(|k| members[k * members.len() / n]).collect()
    };
    let d = deliveries.clone();
    let progress = Progress::start("bigroom messages", move || {
        format!("{} delivered", d.delivered.load(Ordering::Relaxed))
    });
    let posts = send_posts(
        senders.iter().map(|&i| users[i].clone()).collect(),
        room.clone(),
        p.messages as u64,
        p.interval,
        deliveries.clone(),
    );
    let mut sent = posts.await.map_err(|_| "the senders' thread stopped".to_owned())?;
    sent.sort_by_key(|(k, _, _)| *k);
    let mut expected = Vec::new();
    let mut last_post = None;
    let mut send_latency = crate::stats::Latencies::default();
    for (k, r, micros) in sent {
        match r {
            Ok(event_id) => {
                send_latency.push(micros);
                expected.extend(online.iter().map(|&m| (m as u32, k)));
                last_post = Some(event_id);
            }
            Err(e) => count_error(&mut sync_errors.lock().expect("errors lock"), format!("SEND_{}", e.kind())),
        }
    }
    deliveries.wait_for(expected.len() as u64, Duration::from_secs(60)).await;
    drop(progress);
    let _ = stop_tx.send(true);
    for f in followers {
        let _ = f.await;
    }
    let sync_errors = sync_errors.lock().expect("errors lock").clone();
    let views = match (p.channel, last_post) {
        (true, Some(post)) => Some(count_views(&users, &members, &room, &post, p.concurrency).await),
        _ => None,
    };
    Ok(BigroomReport {
        scenario: "bigroom",
        members: p.members,
        joined: members.len(),
        join_seconds,
        joins_per_sec: (members.len() - 1) as f64 / join_seconds,
        join_latency: join_latency.summary(),
        join_errors,
        messages: p.messages,
        online: online.len(),
        send_latency: send_latency.summary(),
        delivery_latency: deliveries.latencies().summary(),
        delivery_p99_by_message_ms: deliveries.latencies_by_message().into_iter().map(|l| l.summary().p99_ms).collect(),
        deliveries: deliveries.check(&expected),
        sync_errors,
        views,
    })
}

/// One send: its number, its outcome (the event id) and its latency (µs).
type Sent = (u64, Result<String, crate::client::ApiError>, u64);

/// Sends `messages` posts, one every `interval`, from `senders` in turns
/// (a send that takes longer than the interval overlaps the next), from a
/// thread and runtime of their own: a sender's device is not the one busy
/// parsing every follower's sync, and a send timed on the followers'
/// runtime would also count the time its answer waited for a turn there.
fn send_posts(
    senders: Vec<crate::client::User>,
    room: String,
    messages: u64,
    interval: Duration,
    deliveries: Arc<Deliveries>,
) -> tokio::sync::oneshot::Receiver<Vec<Sent>> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("the senders' runtime");
        runtime.block_on(async move {
            // Connections of this runtime, not the followers'.
            let http = Target::builder().build().expect("http client");
            let senders: Vec<_> = senders.iter().map(|u| u.via(&u.target.over(http.clone()))).collect();
            let mut tick = tokio::time::interval(interval.max(Duration::from_micros(100)));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut sends = tokio::task::JoinSet::new();
            for k in 0..messages {
                tick.tick().await;
                let (user, room, body) = (senders[k as usize % senders.len()].clone(), room.clone(), deliveries.body(k));
                sends.spawn(async move {
                    let t = Instant::now();
                    let r = user.send_text(&room, &format!("kb{k}"), &body).await;
                    (k, r, t.elapsed().as_micros() as u64)
                });
            }
            let _ = done_tx.send(sends.join_all().await);
        });
    });
    done_rx
}

/// Every subscriber marks `post` read; then the channel's owner asks for
/// its view count.
async fn count_views(users: &[crate::client::User], members: &[usize], room: &str, post: &str, concurrency: usize) -> ViewCheck {
    let path = format!(
        "/_matrix/client/v3/rooms/{}/receipt/m.read/{}",
        crate::client::enc(room),
        crate::client::enc(post)
    );
    let subscribers: Vec<usize> = members.iter().copied().filter(|&i| i != 0).collect();
    let empty = json!({});
    let results: Vec<Result<serde_json::Value, crate::client::ApiError>> =
        stream::iter(subscribers.iter().map(|&i| users[i].post(&path, &empty)))
            .buffer_unordered(concurrency.max(1))
            .collect()
            .await;
    let mut receipt_errors = ErrorCounts::new();
    let mut expected = 0;
    for r in results {
        match r {
            Ok(_) => expected += 1,
            Err(e) => count_error(&mut receipt_errors, e.kind()),
        }
    }
    let views = users[0]
        .get(&format!(
            "/_matrix/client/unstable/kabar/rooms/{}/views/{}",
            crate::client::enc(room),
            crate::client::enc(post)
        ))
        .await;
    ViewCheck {
        counted: views.ok().and_then(|v| v["views"].as_u64()).unwrap_or(0),
        expected,
        receipt_errors,
    }
}
