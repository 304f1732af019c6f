//! The Prometheus listener: `GET /metrics` on its own address, so scraping
//! never competes with clients for the client listener and the numbers are
//! not published to the world.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use axum::{Router, extract::State, http::header, response::IntoResponse, routing::get};
use kabar_store::{StoreObserver, StoreOp};
use prometheus_client::{
    encoding::{EncodeLabelSet, text::encode},
    metrics::{
        family::Family,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};

async fn metrics_route(State(registry): State<Arc<Registry>>) -> impl IntoResponse {
    let mut body = String::new();
    match encode(&mut body, &registry) {
        Ok(()) => (
            [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
            body,
        )
            .into_response(),
        Err(e) => (axum::http::StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Binds `addr` and serves the registry until the process ends; returns the bound address.
pub async fn serve(addr: SocketAddr, registry: Registry) -> anyhow::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new().route("/metrics", get(metrics_route)).with_state(Arc::new(registry));
    tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app.into_make_service()).await {
            tracing::error!(error = %e, "metrics listener stopped");
        }
    });
    Ok(bound)
}

/// Storage latency as callers see it, by operation.
pub struct StorageMetrics {
    latency: Family<StoreOpLabel, Histogram>,
    /// The family's two series, looked up once: they are hit on every
    /// storage operation.
    read: Histogram,
    write: Histogram,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreOpLabel {
    op: &'static str,
}

impl StorageMetrics {
    pub fn new() -> Arc<Self> {
        // 10 µs .. ~10 s.
        let latency: Family<StoreOpLabel, Histogram> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.00001, 2.0, 20)));
        let series = |op: StoreOp| latency.get_or_create_owned(&StoreOpLabel { op: op.as_str() });
        Arc::new(Self {
            read: series(StoreOp::Read),
            write: series(StoreOp::Write),
            latency,
        })
    }

    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kabar_storage_duration_seconds",
            "Time a storage read or write took as its caller saw it (writes until durable)",
            self.latency.clone(),
        );
    }
}

impl StoreObserver for StorageMetrics {
    fn observe(&self, op: StoreOp, elapsed: Duration) {
        let series = match op {
            StoreOp::Read => &self.read,
            StoreOp::Write => &self.write,
        };
        series.observe(elapsed.as_secs_f64());
    }
}
