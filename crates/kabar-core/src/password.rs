//! Password hashing on a bounded pool of dedicated threads.
//!
//! argon2id at m=19 MiB, t=2 costs tens of milliseconds of one core. Running it
//! on the async runtime's threads would stall every other request, so it runs
//! on its own threads behind a [`Gate`]: a hash that would wait past the
//! deadline is refused at once, with the time the queue needs to drain.
//! The threads run at the lowest CPU priority (Linux `SCHED_IDLE`) unless told
//! otherwise: when the machine is saturated, signed-in users' requests run
//! first and sign-ups take what is left, which is all of it when nobody else
//! needs the CPU.

use std::{
    sync::{Arc, Mutex, mpsc},
    thread,
    time::{Duration, Instant},
};

use argon2::{
    Algorithm, Argon2, Params, Version,
    password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier, SaltString, rand_core::OsRng},
};
use tokio::sync::oneshot;

use crate::{
    error::{Error, Result},
    load::{Gate, GateLimits, Pass, WorkClass},
};

/// Cost parameters; the defaults are OWASP's minimum for argon2id.
#[derive(Debug, Clone, Copy)]
pub struct HashCost {
    pub memory_kib: u32,
    pub iterations: u32,
    pub parallelism: u32,
}

impl Default for HashCost {
    fn default() -> Self {
        Self {
            memory_kib: 19 * 1024,
            iterations: 2,
            parallelism: 1,
        }
    }
}

/// How the hashing pool is sized and scheduled.
#[derive(Debug, Clone, Copy)]
pub struct HashingPool {
    /// Hashing threads (and hashes running at once).
    pub threads: usize,
    /// Hashes that may wait for a thread.
    pub max_queued: usize,
    /// The longest a hash may wait for a thread before it is refused.
    pub max_queue_delay: Duration,
    /// The threads' CPU priority against the threads serving everyone else.
    pub priority: HashPriority,
}

/// How hashing competes for the CPU with the threads that serve requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HashPriority {
    /// Linux's idle scheduling class: hashing gets only CPU nobody else wants.
    Idle,
    /// The lowest normal priority (nice 19): a small share when the machine
    /// is saturated, and every request thread preempts it on wake-up.
    Low,
    /// The same priority as everything else.
    Normal,
}

type Job = Box<dyn FnOnce(&Argon2<'static>) + Send>;

pub struct PasswordHasher {
    jobs: mpsc::SyncSender<Job>,
    gate: Gate,
    /// For hashes outside the pool (the operator's admin channel).
    argon: Argon2<'static>,
}

/// Sets the calling thread's CPU priority. Where the idle class does not
/// exist, `Idle` falls back to the lowest priority offered.
fn set_priority(priority: HashPriority) -> std::result::Result<(), thread_priority::Error> {
    use thread_priority::*;
    match priority {
        HashPriority::Normal => Ok(()),
        #[cfg(target_os = "linux")]
        HashPriority::Idle => set_thread_priority_and_policy(
            thread_native_id(),
            ThreadPriority::Min,
            ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
        ),
        _ => set_current_thread_priority(ThreadPriority::Min),
    }
}

impl PasswordHasher {
    /// Starts the pool. One hash is timed first, so the first refusals
    /// already carry an honest retry time.
    pub fn new(cost: HashCost, pool: HashingPool, class: WorkClass) -> Result<Self> {
        let params = Params::new(cost.memory_kib, cost.iterations, cost.parallelism, None).map_err(|e| Error::Internal(e.to_string()))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let threads = pool.threads.max(1);
        // The gate lets at most `threads` jobs in, so this queue never fills.
        let (tx, rx) = mpsc::sync_channel::<Job>(threads);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads {
            let rx = rx.clone();
            let argon = argon.clone();
            thread::Builder::new()
                .name(format!("kabar-hash-{i}"))
                .spawn(move || {
                    if let Err(e) = set_priority(pool.priority) {
                        tracing::warn!(error = ?e, "could not lower the password hashing threads' priority");
                    }
                    loop {
                        let job = match rx.lock() {
                            Ok(guard) => guard.recv(),
                            Err(_) => return,
                        };
                        match job {
                            Ok(job) => job(&argon),
                            Err(_) => return,
                        }
                    }
                })
                .map_err(|e| Error::Internal(e.to_string()))?;
        }
        let started = Instant::now();
        let salt = SaltString::generate(&mut OsRng);
        argon
            .hash_password(b"calibration", &salt)
            .map_err(|e| Error::Internal(e.to_string()))?;
        let gate = Gate::new(
            class,
            GateLimits {
                slots: threads,
                max_queued: pool.max_queued,
                max_queue_delay: pool.max_queue_delay,
            },
            started.elapsed(),
        );
        Ok(Self { jobs: tx, gate, argon })
    }

    /// Changes how many hashes may wait and for how long (a configuration
    /// reload); the number of threads stays.
    pub fn set_queue(&self, max_queued: usize, max_queue_delay: Duration) {
        let limits = self.gate.limits();
        self.gate.set_limits(GateLimits {
            max_queued,
            max_queue_delay,
            ..limits
        });
    }

    /// Hashes on the calling thread, outside the pool and its queue: for the
    /// operator's admin channel, which must work while the pool is saturated.
    /// Blocks for one hash's time.
    pub fn hash_blocking(&self, password: &str) -> Result<String> {
        let salt = SaltString::generate(&mut OsRng);
        self.argon
            .hash_password(password.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| Error::Internal(e.to_string()))
    }

    /// The estimated time of one hash, measured.
    pub fn hash_time(&self) -> Duration {
        self.gate.service_time()
    }

    /// Refuses at once if a hash asked for now would be refused; takes nothing.
    pub fn check_room(&self) -> Result<()> {
        self.gate.check_room()
    }

    /// Takes a hashing slot now, before the caller does anything it cannot
    /// undo (spending a registration token, say): refused at once if the
    /// queue would make it wait past the deadline.
    pub async fn slot(&self) -> Result<HashSlot<'_>> {
        Ok(HashSlot {
            hasher: self,
            _pass: self.gate.enter().await?,
        })
    }

    /// A PHC string for `password`.
    pub async fn hash(&self, password: String) -> Result<String> {
        self.slot().await?.hash(password).await
    }

    /// Whether `password` matches the PHC string `hash`.
    pub async fn verify(&self, password: String, hash: String) -> Result<bool> {
        self.slot().await?.verify(password, hash).await
    }

    async fn run<R: Send + 'static>(&self, f: impl FnOnce(&Argon2<'static>) -> R + Send + 'static) -> Result<R> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |a| {
            let _ = tx.send(f(a));
        });
        self.jobs
            .try_send(job)
            .map_err(|_| Error::Internal("password hashing pool stopped".into()))?;
        rx.await.map_err(|_| Error::Internal("password hashing pool stopped".into()))
    }
}

/// A hashing thread reserved for one hash or verification.
pub struct HashSlot<'a> {
    hasher: &'a PasswordHasher,
    _pass: Pass<'a>,
}

impl HashSlot<'_> {
    /// A PHC string for `password`.
    pub async fn hash(self, password: String) -> Result<String> {
        self.hasher
            .run(move |a| {
                let salt = SaltString::generate(&mut OsRng);
                a.hash_password(password.as_bytes(), &salt).map(|h| h.to_string())
            })
            .await?
            .map_err(|e| Error::Internal(e.to_string()))
    }

    /// Whether `password` matches the PHC string `hash`.
    pub async fn verify(self, password: String, hash: String) -> Result<bool> {
        self.hasher
            .run(move |a| {
                PasswordHash::new(&hash)
                    .map(|parsed| a.verify_password(password.as_bytes(), &parsed).is_ok())
                    .unwrap_or(false)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::load::LoadMetrics;

    fn pool(threads: usize, max_queued: usize) -> HashingPool {
        HashingPool {
            threads,
            max_queued,
            max_queue_delay: Duration::from_secs(10),
            priority: HashPriority::Idle,
        }
    }

    fn cheap() -> HashCost {
        HashCost {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        }
    }

    #[tokio::test]
    async fn hash_then_verify() {
        let h = PasswordHasher::new(cheap(), pool(1, 4), LoadMetrics::default().class("hash")).unwrap();
        let hash = h.hash("correct horse".into()).await.unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(h.verify("correct horse".into(), hash.clone()).await.unwrap());
        assert!(!h.verify("wrong".into(), hash).await.unwrap());
        assert!(!h.verify("x".into(), "not a hash".into()).await.unwrap());
    }

    #[tokio::test]
    async fn a_full_queue_refuses_with_retry_after() {
        let metrics = LoadMetrics::default();
        let h = Arc::new(PasswordHasher::new(HashCost::default(), pool(1, 1), metrics.class("hash")).unwrap());
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let h = h.clone();
                tokio::spawn(async move { h.hash("pw".into()).await })
            })
            .collect();
        let mut refused = 0;
        for t in tasks {
            if let Err(Error::LimitExceeded { retry_after_ms }) = t.await.unwrap() {
                assert!(retry_after_ms > 0);
                refused += 1;
            }
        }
        assert!(refused > 0, "eight hashes at once cannot all fit one thread and one queue slot");
        assert_eq!(metrics.shed_total("hash"), refused);
    }

    /// The hashing threads run in the idle scheduling class, behind the
    /// threads that serve signed-in users.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn hashing_threads_run_in_the_background() {
        let h = PasswordHasher::new(cheap(), pool(1, 4), LoadMetrics::default().class("hash")).unwrap();
        h.hash("pw".into()).await.unwrap();
        const SCHED_IDLE: &str = "5";
        let mut seen = 0;
        for task in std::fs::read_dir("/proc/self/task").unwrap() {
            let dir = task.unwrap().path();
            if std::fs::read_to_string(dir.join("comm")).unwrap_or_default().trim() != "kabar-hash-0" {
                continue;
            }
            let sched = std::fs::read_to_string(dir.join("sched")).unwrap();
            let policy = sched.lines().find(|l| l.starts_with("policy")).unwrap();
            assert_eq!(policy.split(':').nth(1).unwrap().trim(), SCHED_IDLE, "{policy}");
            seen += 1;
        }
        assert!(seen >= 1, "found the hashing thread");
    }
}
