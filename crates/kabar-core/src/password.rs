//! Password hashing on a bounded pool of dedicated threads.
//!
//! argon2id at m=19 MiB, t=2 costs tens of milliseconds of one core. Running it
//! on the async runtime's threads would stall every other request, so it runs
//! on its own threads behind a bounded queue; when the queue is full the caller
//! is told to come back rather than left waiting.

use std::{
    sync::{Arc, Mutex, mpsc},
    thread,
};

use argon2::{
    Algorithm, Argon2, Params, Version,
    password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier, SaltString, rand_core::OsRng},
};
use tokio::sync::oneshot;

use crate::error::{Error, Result};

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

type Job = Box<dyn FnOnce(&Argon2<'static>) + Send>;

pub struct PasswordHasher {
    queue: mpsc::SyncSender<Job>,
    /// Rough cost of one hash, used to tell a refused caller when to retry.
    retry_after_ms: u64,
}

impl PasswordHasher {
    /// Starts `threads` hashing threads with room for `queue` waiting jobs.
    pub fn new(cost: HashCost, threads: usize, queue: usize) -> Result<Self> {
        let params = Params::new(cost.memory_kib, cost.iterations, cost.parallelism, None).map_err(|e| Error::Internal(e.to_string()))?;
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let (tx, rx) = mpsc::sync_channel::<Job>(queue);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let rx = rx.clone();
            let argon = argon.clone();
            thread::Builder::new()
                .name(format!("kabar-hash-{i}"))
                .spawn(move || {
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
        let retry_after_ms =
            (u64::from(cost.memory_kib) / 512 * u64::from(cost.iterations)).max(10) * (queue as u64 + 1) / threads.max(1) as u64;
        Ok(Self { queue: tx, retry_after_ms })
    }

    async fn run<R: Send + 'static>(&self, f: impl FnOnce(&Argon2<'static>) -> R + Send + 'static) -> Result<R> {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |a| {
            let _ = tx.send(f(a));
        });
        self.queue.try_send(job).map_err(|e| match e {
            mpsc::TrySendError::Full(_) => Error::LimitExceeded {
                retry_after_ms: self.retry_after_ms,
            },
            mpsc::TrySendError::Disconnected(_) => Error::Internal("password hashing pool stopped".into()),
        })?;
        rx.await.map_err(|_| Error::Internal("password hashing pool stopped".into()))
    }

    /// A PHC string for `password`.
    pub async fn hash(&self, password: String) -> Result<String> {
        self.run(move |a| {
            let salt = SaltString::generate(&mut OsRng);
            a.hash_password(password.as_bytes(), &salt).map(|h| h.to_string())
        })
        .await?
        .map_err(|e| Error::Internal(e.to_string()))
    }

    /// Whether `password` matches the PHC string `hash`.
    pub async fn verify(&self, password: String, hash: String) -> Result<bool> {
        self.run(move |a| {
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

    fn cheap() -> HashCost {
        HashCost {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
        }
    }

    #[tokio::test]
    async fn hash_then_verify() {
        let h = PasswordHasher::new(cheap(), 1, 4).unwrap();
        let hash = h.hash("correct horse".into()).await.unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(h.verify("correct horse".into(), hash.clone()).await.unwrap());
        assert!(!h.verify("wrong".into(), hash).await.unwrap());
        assert!(!h.verify("x".into(), "not a hash".into()).await.unwrap());
    }

    #[tokio::test]
    async fn a_full_queue_refuses_with_retry_after() {
        let h = Arc::new(PasswordHasher::new(HashCost::default(), 1, 1).unwrap());
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
    }
}
