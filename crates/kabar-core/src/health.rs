//! Readiness: whether this server can take requests now.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use kabar_store::Store;

use crate::notifier::Notifier;

/// How long one readiness verdict is reused: `/ready` is public, and each
/// fresh check commits a write, so a flood of probes must not become a flood
/// of commits.
const VERDICT_TTL: Duration = Duration::from_secs(1);
/// A store that takes longer than this to read and commit is not ready.
const STORE_DEADLINE: Duration = Duration::from_secs(2);

pub struct Readiness {
    store: Arc<dyn Store>,
    notifier: Arc<Notifier>,
    bus: Arc<dyn kabar_bus::Bus>,
    last: Mutex<Option<(Instant, Result<(), String>)>>,
}

impl Readiness {
    pub fn new(store: Arc<dyn Store>, notifier: Arc<Notifier>, bus: Arc<dyn kabar_bus::Bus>) -> Self {
        Self {
            store,
            notifier,
            bus,
            last: Mutex::new(None),
        }
    }

    /// `Ok` when the server is not shutting down, storage reads and commits
    /// within the deadline and the bus reaches the other nodes; otherwise
    /// why not.
    pub async fn check(&self) -> Result<(), String> {
        if self.notifier.is_closing() {
            return Err("shutting down".into());
        }
        if let Some((at, verdict)) = &*self.last.lock().expect("readiness")
            && at.elapsed() < VERDICT_TTL
        {
            return verdict.clone();
        }
        let mut verdict = self.check_store().await;
        if verdict.is_ok() && !self.bus.connected() {
            // Without the bus this node still serves correctly, but other
            // nodes' messages reach its clients only at each catch-up: a
            // load balancer should prefer the nodes that have it.
            verdict = Err("the bus (NATS) is disconnected".into());
        }
        *self.last.lock().expect("readiness") = Some((Instant::now(), verdict.clone()));
        verdict
    }

    /// Storage alone, never cached: reads and commits within the deadline.
    pub async fn check_store(&self) -> Result<(), String> {
        match tokio::time::timeout(STORE_DEADLINE, self.store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("storage: {e}")),
            Err(_) => Err(format!("storage did not answer within {STORE_DEADLINE:?}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ready_until_shutdown_and_while_storage_answers() {
        let dir = tempfile::tempdir().unwrap();
        let sqlite = kabar_store_sqlite::SqliteStore::open(&dir.path().join("db")).unwrap();
        let notifier = Arc::new(Notifier::new());
        let readiness = Readiness::new(
            Arc::new(sqlite.clone()),
            notifier.clone(),
            Arc::new(kabar_bus::LocalBus::new("test")),
        );
        readiness.check().await.expect("ready");
        // A store that no longer commits is not ready (once the cached
        // verdict has expired).
        sqlite.close();
        assert!(readiness.check_store().await.is_err());
        tokio::time::sleep(VERDICT_TTL + Duration::from_millis(50)).await;
        let reason = readiness.check().await.expect_err("storage closed");
        assert!(reason.starts_with("storage"), "{reason}");
        notifier.close();
        assert_eq!(readiness.check().await, Err("shutting down".to_owned()));
    }
}
