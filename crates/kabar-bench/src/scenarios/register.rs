//! `register`: N new accounts at concurrency C.

use std::time::Instant;

use serde::Serialize;

use super::Report;
use crate::{
    client::Target,
    register_many, run_prefix,
    stats::{ErrorCounts, LatencySummary},
};

#[derive(Debug, Clone)]
pub struct Params {
    pub accounts: usize,
    pub concurrency: usize,
}

#[derive(Debug, Serialize)]
pub struct RegisterReport {
    pub scenario: &'static str,
    pub accounts: usize,
    pub concurrency: usize,
    pub registered: usize,
    pub seconds: f64,
    pub signups_per_sec: f64,
    pub latency: LatencySummary,
    pub errors: ErrorCounts,
}

impl Report for RegisterReport {
    fn human(&self) -> String {
        format!(
            "register: {}/{} accounts in {:.1}s at concurrency {} = {:.1} signups/s; latency p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms; errors {:?}",
            self.registered,
            self.accounts,
            self.seconds,
            self.concurrency,
            self.signups_per_sec,
            self.latency.p50_ms,
            self.latency.p99_ms,
            self.latency.max_ms,
            self.errors
        )
    }
}

pub async fn run(target: &Target, p: Params) -> RegisterReport {
    let prefix = run_prefix("reg");
    let start = Instant::now();
    let (users, lat, errors) = register_many(target, &prefix, p.accounts, p.concurrency).await;
    let seconds = start.elapsed().as_secs_f64();
    let registered = users.iter().filter(|u| u.is_some()).count();
    RegisterReport {
        scenario: "register",
        accounts: p.accounts,
        concurrency: p.concurrency,
        registered,
        seconds,
        signups_per_sec: registered as f64 / seconds,
        latency: lat.summary(),
        errors,
    }
}
