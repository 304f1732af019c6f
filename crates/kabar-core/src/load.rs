//! Load: bounded work classes that refuse at once when they are full, and
//! what they report.
//!
//! Expensive work (password hashing, initial syncs, joins, thumbnails) runs
//! behind a [`Gate`]: a fixed number of slots, a queue in front of them, and a
//! running estimate of how long one piece of work takes. A request that would
//! wait longer than the class allows is refused before it waits at all, with
//! `M_LIMIT_EXCEEDED` and the time the work already queued needs to drain.
//! So a surge of newcomers costs a few microseconds per refusal and never a
//! queue that grows until everyone times out.
//!
//! Every class reports admitted, refused and queued work and its queue delay
//! through [`LoadMetrics`], and logs one line when it starts refusing and one
//! when it stops.

use std::{
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::sync::{Semaphore, SemaphorePermit};

use crate::error::{Error, Result};

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShedReason {
    /// The class's queue would have made it wait past its deadline.
    Queue,
    /// Its client address used up its allowance.
    AddressRate,
    /// The server-wide allowance for the class is used up.
    GlobalRate,
}

impl ShedReason {
    const ALL: [ShedReason; 3] = [ShedReason::Queue, ShedReason::AddressRate, ShedReason::GlobalRate];

    /// Position in [`Self::ALL`] (and in a class's refusal counters).
    fn index(self) -> usize {
        self as usize
    }

    fn label(self) -> &'static str {
        match self {
            ShedReason::Queue => "queue",
            ShedReason::AddressRate => "address_rate",
            ShedReason::GlobalRate => "global_rate",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ShedLabel {
    class: &'static str,
    reason: &'static str,
}

type DelayFamily = Family<ClassLabel, Histogram, fn() -> Histogram>;

fn delay_histogram() -> Histogram {
    // 1 ms to ~16 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 15))
}

/// Metrics of every work class, registered once in a Prometheus registry.
pub struct LoadMetrics {
    admitted: Family<ClassLabel, Counter>,
    shed: Family<ShedLabel, Counter>,
    queued: Family<ClassLabel, Gauge>,
    queue_delay: DelayFamily,
    classes: Mutex<Vec<WorkClass>>,
}

impl Default for LoadMetrics {
    fn default() -> Self {
        Self {
            admitted: Family::default(),
            shed: Family::default(),
            queued: Family::default(),
            queue_delay: Family::new_with_constructor(delay_histogram as fn() -> Histogram),
            classes: Mutex::default(),
        }
    }
}

impl LoadMetrics {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// Adds the metrics to `registry` under `kabar_load_*`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register("kabar_load_admitted", "Requests admitted, by work class", self.admitted.clone());
        registry.register(
            "kabar_load_shed",
            "Requests refused with M_LIMIT_EXCEEDED, by work class and reason",
            self.shed.clone(),
        );
        registry.register(
            "kabar_load_queued",
            "Requests waiting for a slot, by work class",
            self.queued.clone(),
        );
        registry.register(
            "kabar_load_queue_delay_seconds",
            "Time admitted requests waited for a slot, by work class",
            self.queue_delay.clone(),
        );
    }

    /// The handle a service uses to report one class of work.
    pub fn class(&self, name: &'static str) -> WorkClass {
        let mut classes = self.classes.lock().expect("load classes lock");
        if let Some(c) = classes.iter().find(|c| c.name == name) {
            return c.clone();
        }
        let label = ClassLabel { class: name };
        let shed_counter = |reason: ShedReason| {
            self.shed.get_or_create_owned(&ShedLabel {
                class: name,
                reason: reason.label(),
            })
        };
        let class = WorkClass {
            name,
            admitted: self.admitted.get_or_create_owned(&label),
            shed: ShedReason::ALL.map(shed_counter),
            queued: self.queued.get_or_create_owned(&label),
            queue_delay: self.queue_delay.get_or_create_owned(&label),
            episode: Arc::default(),
        };
        classes.push(class.clone());
        class
    }

    /// Ends the shedding episode of every class that refused nothing since
    /// the last call, logging one line for each. Call about once a second.
    pub fn end_quiet_episodes(&self) {
        for class in self.classes.lock().expect("load classes lock").iter() {
            class.end_episode_if_quiet();
        }
    }

    /// Refusals so far of every class (all reasons), by class name.
    pub fn shed_totals(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.classes
            .lock()
            .expect("load classes lock")
            .iter()
            .map(|c| (c.name, c.shed.iter().map(Counter::get).sum()))
            .collect()
    }

    /// Refusals so far for `class` (all reasons); for tests and reports.
    pub fn shed_total(&self, class: &'static str) -> u64 {
        ShedReason::ALL
            .into_iter()
            .map(|r| self.shed.get_or_create(&ShedLabel { class, reason: r.label() }).get())
            .sum()
    }
}

/// Whether a class is refusing work right now, for the start and stop log lines.
#[derive(Default)]
struct Episode {
    active: AtomicBool,
    refused: AtomicU64,
    refused_at_last_check: AtomicU64,
}

/// One class of work as its metrics see it.
#[derive(Clone)]
pub struct WorkClass {
    name: &'static str,
    admitted: Counter,
    shed: [Counter; 3],
    queued: Gauge,
    queue_delay: Histogram,
    episode: Arc<Episode>,
}

impl WorkClass {
    pub fn admitted(&self, waited: Duration) {
        self.admitted.inc();
        self.queue_delay.observe(waited.as_secs_f64());
    }

    /// Counts a refusal and returns the error the client gets.
    pub fn shed(&self, reason: ShedReason, retry_after: Duration) -> Error {
        self.shed[reason.index()].inc();
        self.episode.refused.fetch_add(1, Ordering::Relaxed);
        if !self.episode.active.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                class = self.name,
                reason = reason.label(),
                retry_after_ms = retry_after.as_millis() as u64,
                "load shedding started"
            );
        }
        Error::LimitExceeded {
            retry_after_ms: (retry_after.as_millis() as u64).max(1),
        }
    }

    fn end_episode_if_quiet(&self) {
        let now = self.episode.refused.load(Ordering::Relaxed);
        let before = self.episode.refused_at_last_check.swap(now, Ordering::Relaxed);
        if now == before && self.episode.active.swap(false, Ordering::Relaxed) {
            tracing::info!(class = self.name, refused_so_far = now, "load shedding stopped");
        }
    }
}

/// Sizes of one gate.
#[derive(Debug, Clone, Copy)]
pub struct GateLimits {
    /// Pieces of work running at once.
    pub slots: usize,
    /// Requests that may wait for a slot; beyond this, refused.
    pub max_queued: usize,
    /// The longest a request may wait for a slot; a request predicted to wait
    /// longer is refused at once. One already waiting is refused only once it
    /// has waited twice this long.
    pub max_queue_delay: Duration,
}

/// A bounded work class: `slots` run at once, a bounded queue waits, and
/// arrivals that would wait past the deadline are refused at once.
pub struct Gate {
    class: WorkClass,
    slots: Semaphore,
    /// Changed by a configuration reload ([`Gate::set_limits`]).
    limits: Mutex<GateLimits>,
    /// Slots removed by a reload while in use: the passes holding them give
    /// them up instead of returning them.
    slots_owed: AtomicUsize,
    waiting: AtomicUsize,
    /// Moving average of how long a piece of work holds its slot, in µs.
    service_us: AtomicU64,
}

/// A slot held; dropping it frees the slot and teaches the gate how long the work took.
pub struct Pass<'a> {
    gate: &'a Gate,
    permit: Option<SemaphorePermit<'a>>,
    started: Instant,
}

impl Drop for Pass<'_> {
    fn drop(&mut self) {
        self.gate.learn(self.started.elapsed());
        let owed = self
            .gate
            .slots_owed
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1));
        if owed.is_ok()
            && let Some(permit) = self.permit.take()
        {
            permit.forget();
        }
    }
}

impl Gate {
    /// `expected_service` seeds the estimate of one piece of work's duration
    /// until real ones are measured.
    pub fn new(class: WorkClass, limits: GateLimits, expected_service: Duration) -> Self {
        let limits = GateLimits {
            slots: limits.slots.max(1),
            ..limits
        };
        Self {
            class,
            slots: Semaphore::new(limits.slots),
            limits: Mutex::new(limits),
            slots_owed: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            service_us: AtomicU64::new((expected_service.as_micros() as u64).max(1)),
        }
    }

    /// The sizes in force.
    pub fn limits(&self) -> GateLimits {
        *self.limits.lock().expect("gate limits")
    }

    /// Resizes the gate (a configuration reload). Work running or queued
    /// keeps going; fewer slots take effect as running work finishes.
    pub fn set_limits(&self, new: GateLimits) {
        let new = GateLimits {
            slots: new.slots.max(1),
            ..new
        };
        let mut limits = self.limits.lock().expect("gate limits");
        if new.slots > limits.slots {
            let more = new.slots - limits.slots;
            // Slots still owed from an earlier shrink are simply not taken.
            let owed = self
                .slots_owed
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |owed| Some(owed - owed.min(more)))
                .unwrap_or(0);
            self.slots.add_permits(more - owed.min(more));
        } else if new.slots < limits.slots {
            let fewer = limits.slots - new.slots;
            let forgotten = self.slots.forget_permits(fewer);
            self.slots_owed.fetch_add(fewer - forgotten, Ordering::AcqRel);
        }
        *limits = new;
    }

    /// The estimated duration of one piece of work.
    pub fn service_time(&self) -> Duration {
        Duration::from_micros(self.service_us.load(Ordering::Relaxed))
    }

    /// The refusal for an arrival behind `ahead` waiting requests, if the
    /// queue is full or the predicted wait passes the deadline.
    fn refusal(&self, ahead: usize) -> Option<Error> {
        let limits = self.limits();
        let predicted = self.predicted_wait(ahead);
        (ahead >= limits.max_queued || predicted > limits.max_queue_delay).then(|| self.class.shed(ShedReason::Queue, predicted))
    }

    /// How long an arrival behind `ahead` waiting requests would wait for a slot.
    fn predicted_wait(&self, ahead: usize) -> Duration {
        let rounds = (ahead + 1) as u64;
        Duration::from_micros(rounds * self.service_us.load(Ordering::Relaxed) / self.limits().slots as u64)
    }

    fn learn(&self, took: Duration) {
        // An exponential moving average with weight 1/8 for the newest sample:
        // it follows a machine that slows down within a few dozen requests.
        let sample = took.as_micros() as u64;
        let _ = self
            .service_us
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |old| Some(((old * 7 + sample) / 8).max(1)));
    }

    /// Refuses at once, as [`enter`](Self::enter) would, if a request arriving
    /// now would not be let in; takes nothing. For the first step of a
    /// multi-request flow, so a client is told to come back before it starts.
    pub fn check_room(&self) -> Result<()> {
        if self.slots.available_permits() > 0 {
            return Ok(());
        }
        match self.refusal(self.waiting.load(Ordering::Acquire)) {
            Some(refused) => Err(refused),
            None => Ok(()),
        }
    }

    /// Takes a slot, waiting in the queue if the wait is predicted to be
    /// within the deadline; otherwise refuses at once with the time the queue
    /// ahead needs to drain.
    pub async fn enter(&self) -> Result<Pass<'_>> {
        let arrived = Instant::now();
        if let Ok(permit) = self.slots.try_acquire() {
            self.class.admitted(Duration::ZERO);
            return Ok(Pass {
                gate: self,
                permit: Some(permit),
                started: arrived,
            });
        }
        let ahead = self.waiting.fetch_add(1, Ordering::AcqRel);
        if let Some(refused) = self.refusal(ahead) {
            self.waiting.fetch_sub(1, Ordering::AcqRel);
            return Err(refused);
        }
        self.class.queued.inc();
        // The estimate decided at arrival; a request let into the queue is
        // served even if it runs a little late. The cap only ends waits the
        // estimate was far wrong about (work stuck or suddenly much slower).
        let acquired = tokio::time::timeout(self.limits().max_queue_delay * 2, self.slots.acquire()).await;
        self.class.queued.dec();
        let ahead_now = self.waiting.fetch_sub(1, Ordering::AcqRel) - 1;
        match acquired {
            Ok(Ok(permit)) => {
                let started = Instant::now();
                self.class.admitted(started - arrived);
                Ok(Pass {
                    gate: self,
                    permit: Some(permit),
                    started,
                })
            }
            // The estimate was too hopeful: the deadline passed in the queue.
            Ok(Err(_)) | Err(_) => Err(self.class.shed(ShedReason::Queue, self.predicted_wait(ahead_now))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gate(metrics: &LoadMetrics, slots: usize, max_queued: usize, max_delay_ms: u64, service_ms: u64) -> Arc<Gate> {
        Arc::new(Gate::new(
            metrics.class("test"),
            GateLimits {
                slots,
                max_queued,
                max_queue_delay: Duration::from_millis(max_delay_ms),
            },
            Duration::from_millis(service_ms),
        ))
    }

    #[tokio::test]
    async fn a_free_slot_admits_at_once() {
        let m = LoadMetrics::default();
        let g = gate(&m, 2, 10, 100, 10);
        let a = g.enter().await.unwrap();
        let b = g.enter().await.unwrap();
        drop((a, b));
        assert_eq!(m.shed_total("test"), 0);
        assert_eq!(m.class("test").admitted.get(), 2);
    }

    #[tokio::test]
    async fn a_wait_past_the_deadline_is_refused_at_once_with_the_drain_time() {
        let m = LoadMetrics::default();
        // One slot, 40 ms per job, 100 ms allowed in the queue: with the slot
        // busy, two may wait (40, 80 ms), a third (120 ms) is refused.
        let g = gate(&m, 1, 100, 100, 40);
        let held = g.enter().await.unwrap();
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let g = g.clone();
                tokio::spawn(async move { g.enter().await.map(|_| ()) })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(10)).await;
        let t = Instant::now();
        match g.enter().await {
            Err(Error::LimitExceeded { retry_after_ms }) => assert_eq!(retry_after_ms, 120),
            other => panic!("expected a refusal, got {:?}", other.map(|_| ())),
        }
        // Waiting would last until the slot is freed below or the 200 ms cap.
        assert!(t.elapsed() < Duration::from_millis(100), "refused without waiting");
        drop(held);
        for w in waiters {
            w.await.unwrap().unwrap();
        }
        assert_eq!(m.shed_total("test"), 1);
    }

    #[tokio::test]
    async fn check_room_answers_as_enter_would_without_taking_anything() {
        let m = LoadMetrics::default();
        let g = gate(&m, 1, 100, 50, 40);
        g.check_room().unwrap();
        let held = g.enter().await.unwrap();
        g.check_room().unwrap(); // one could wait 40 ms
        let g2 = g.clone();
        let waiter = tokio::spawn(async move { g2.enter().await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(matches!(g.check_room(), Err(Error::LimitExceeded { retry_after_ms: 80 })));
        drop(held);
        waiter.await.unwrap().unwrap();
        g.check_room().unwrap();
    }

    #[tokio::test]
    async fn a_full_queue_refuses_whatever_the_estimate() {
        let m = LoadMetrics::default();
        let g = gate(&m, 1, 1, 10_000, 1);
        let held = g.enter().await.unwrap();
        let g2 = g.clone();
        let waiter = tokio::spawn(async move { g2.enter().await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(matches!(g.enter().await, Err(Error::LimitExceeded { .. })));
        drop(held);
        waiter.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn a_wrong_estimate_still_ends_the_wait_at_the_deadline() {
        let m = LoadMetrics::default();
        // The gate believes work takes 1 ms; it really holds the slot for good.
        let g = gate(&m, 1, 10, 50, 1);
        let _held = g.enter().await.unwrap();
        let t = Instant::now();
        assert!(matches!(g.enter().await, Err(Error::LimitExceeded { .. })));
        let waited = t.elapsed();
        assert!(
            waited >= Duration::from_millis(100) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        assert_eq!(m.class("test").queued.get(), 0, "the waiter left the queue");
    }

    #[tokio::test]
    async fn the_estimate_follows_measured_work() {
        let m = LoadMetrics::default();
        let g = gate(&m, 1, 10, 1000, 1);
        for _ in 0..30 {
            let _pass = g.enter().await.unwrap();
            tokio::time::sleep(Duration::from_millis(8)).await;
        }
        let est = g.service_time();
        // From the 1 ms seed towards the ~8 ms measured (more on a loaded machine).
        assert!(est >= Duration::from_millis(6) && est < Duration::from_secs(1), "{est:?}");
    }

    #[test]
    fn an_episode_ends_after_a_quiet_interval() {
        let m = LoadMetrics::default();
        let c = m.class("test");
        let _ = c.shed(ShedReason::AddressRate, Duration::from_millis(5));
        assert!(c.episode.active.load(Ordering::Relaxed));
        m.end_quiet_episodes(); // a refusal since the last check: still shedding
        assert!(c.episode.active.load(Ordering::Relaxed));
        m.end_quiet_episodes(); // nothing new: over
        assert!(!c.episode.active.load(Ordering::Relaxed));
        assert_eq!(m.shed_total("test"), 1);
    }

    #[tokio::test]
    async fn resizing_takes_effect_without_dropping_work() {
        let m = LoadMetrics::default();
        let g = gate(&m, 2, 0, 100, 10);
        let a = g.enter().await.unwrap();
        let b = g.enter().await.unwrap();
        assert!(g.check_room().is_err(), "both slots busy, no queue");
        g.set_limits(GateLimits {
            slots: 3,
            max_queued: 0,
            max_queue_delay: Duration::from_millis(100),
        });
        let c = g.enter().await.expect("a third slot after growing");
        // Shrink to one while three run: nothing is taken from running work,
        // and slots come back only down to the new size.
        g.set_limits(GateLimits {
            slots: 1,
            max_queued: 0,
            max_queue_delay: Duration::from_millis(100),
        });
        drop(a);
        assert!(g.check_room().is_err(), "a freed slot is given up while over the new size");
        drop(b);
        assert!(g.check_room().is_err());
        drop(c);
        let d = g.enter().await.expect("one slot left");
        assert!(g.check_room().is_err(), "and only one");
        drop(d);
        assert_eq!(g.limits().slots, 1);
    }
}
