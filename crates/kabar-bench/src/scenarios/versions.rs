//! `versions`: the rate at which the server answers its most trivial request,
//! `GET /_matrix/client/versions`. This bounds what its HTTP stack can do.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use serde::Serialize;

use super::Report;
use crate::{Progress, client::Target};

#[derive(Debug, Clone)]
pub struct Params {
    pub seconds: f64,
    pub concurrency: usize,
}

#[derive(Debug, Serialize)]
pub struct VersionsReport {
    pub scenario: &'static str,
    pub seconds: f64,
    pub concurrency: usize,
    pub requests: u64,
    pub errors: u64,
    pub requests_per_sec: f64,
}

impl Report for VersionsReport {
    fn human(&self) -> String {
        format!(
            "versions: {} requests in {:.1}s at concurrency {} = {:.0} req/s ({} errors)",
            self.requests, self.seconds, self.concurrency, self.requests_per_sec, self.errors
        )
    }
}

pub async fn run(target: &Target, p: Params) -> VersionsReport {
    let ok = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let o = ok.clone();
    let _progress = Progress::start("versions", move || format!("{} requests", o.load(Ordering::Relaxed)));
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(p.seconds);
    let workers: Vec<_> = (0..p.concurrency.max(1))
        .map(|_| {
            let (target, ok, errors) = (target.clone(), ok.clone(), errors.clone());
            tokio::spawn(async move {
                while Instant::now() < deadline {
                    match target.versions().await {
                        Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                        Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for w in workers {
        let _ = w.await;
    }
    let seconds = start.elapsed().as_secs_f64();
    let requests = ok.load(Ordering::Relaxed);
    VersionsReport {
        scenario: "versions",
        seconds,
        concurrency: p.concurrency,
        requests,
        errors: errors.load(Ordering::Relaxed),
        requests_per_sec: requests as f64 / seconds,
    }
}
