//! `roomlist`: a user in R rooms opens sliding-sync connections (what
//! Element X does at start) and asks for the first page of the room list
//! (20 rooms, each with its newest event and name), then for the next page
//! on the same connection. Measures how long each takes.

use std::time::Instant;

use futures::future::join_all;
use serde::Serialize;
use serde_json::{Value, json};

use super::Report;
use crate::{
    Progress,
    client::{ApiError, Target, User},
    run_prefix, setup_users,
    stats::{Latencies, LatencySummary},
};

#[derive(Debug, Clone)]
pub struct Params {
    pub rooms: usize,
    /// How many connections open (and ask for both pages).
    pub requests: usize,
    pub setup_concurrency: usize,
}

#[derive(Debug, Serialize)]
pub struct RoomlistReport {
    pub scenario: &'static str,
    pub rooms: usize,
    pub requests: usize,
    /// A new connection's first 20 rooms.
    pub first_page: LatencySummary,
    /// The next 20 on the same connection.
    pub next_page: LatencySummary,
    /// Answers whose list count or page was not what the user's rooms make.
    pub wrong_answers: usize,
    pub errors: usize,
}

impl Report for RoomlistReport {
    fn human(&self) -> String {
        format!(
            "roomlist: a user in {} rooms, {} sliding-sync connections: first page p50 {:.1} ms, p99 {:.1} ms; next page p50 {:.1} ms, p99 {:.1} ms; {} wrong answers, {} errors",
            self.rooms,
            self.requests,
            self.first_page.p50_ms,
            self.first_page.p99_ms,
            self.next_page.p50_ms,
            self.next_page.p99_ms,
            self.wrong_answers,
            self.errors
        )
    }
}

const PATH: &str = "/_matrix/client/unstable/org.matrix.simplified_msc3575/sync";

fn page(conn: &str, last: usize) -> Value {
    json!({
        "conn_id": conn,
        "lists": {"all": {
            "ranges": [[0, last]],
            "timeline_limit": 1,
            "required_state": [["m.room.name", ""], ["m.room.avatar", ""], ["m.room.encryption", ""], ["m.room.member", "$LAZY"]]
        }}
    })
}

async fn ask(user: &User, query: &str, body: &Value) -> Result<Value, ApiError> {
    user.post(&format!("{PATH}{query}"), body).await
}

pub async fn run(target: &Target, p: Params) -> Result<RoomlistReport, String> {
    let prefix = run_prefix("rl");
    let owner = setup_users(target, &prefix, 1, 1).await?.remove(0);
    let made = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let m = made.clone();
    let progress = Progress::start("roomlist", move || {
        format!("{} rooms made", m.load(std::sync::atomic::Ordering::Relaxed))
    });
    let mut created = 0;
    while created < p.rooms {
        let batch = (p.rooms - created).min(p.setup_concurrency.max(1));
        let results = join_all((0..batch).map(|i| owner.create_room(json!({"name": format!("room {}", created + i)})))).await;
        for r in results {
            r.map_err(|e| format!("create room: {e}"))?;
        }
        created += batch;
        made.store(created, std::sync::atomic::Ordering::Relaxed);
    }
    drop(progress);

    let (mut first, mut next) = (Latencies::default(), Latencies::default());
    let (mut wrong, mut errors) = (0, 0);
    for n in 0..p.requests {
        let conn = format!("rl{n}");
        let started = Instant::now();
        let answer = match ask(&owner, "", &page(&conn, 19)).await {
            Ok(v) => v,
            Err(_) => {
                errors += 1;
                continue;
            }
        };
        first.push(started.elapsed().as_micros() as u64);
        let count = answer["lists"]["all"]["count"].as_u64().unwrap_or(0) as usize;
        let shown = answer["rooms"].as_object().map_or(0, |r| r.len());
        if count != p.rooms || shown != p.rooms.min(20) {
            wrong += 1;
        }
        let pos = answer["pos"].as_str().unwrap_or_default().to_owned();
        let started = Instant::now();
        match ask(&owner, &format!("?pos={}", crate::client::enc(&pos)), &page(&conn, 39)).await {
            Ok(v) => {
                next.push(started.elapsed().as_micros() as u64);
                let shown = v["rooms"].as_object().map_or(0, |r| r.len());
                if shown != p.rooms.saturating_sub(20).min(20) {
                    wrong += 1;
                }
            }
            Err(_) => errors += 1,
        }
    }
    Ok(RoomlistReport {
        scenario: "roomlist",
        rooms: p.rooms,
        requests: p.requests,
        first_page: first.summary(),
        next_page: next.summary(),
        wrong_answers: wrong,
        errors,
    })
}
