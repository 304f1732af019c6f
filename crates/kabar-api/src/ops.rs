//! The operations surface on the client listener: liveness and readiness
//! probes, per-request metrics and the edge check on declared body sizes.

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Instant,
};

use axum::{
    Json,
    extract::{MatchedPath, Request, State},
    http::{StatusCode, header},
    middleware::Next,
    response::{IntoResponse, Response},
};
use kabar_core::health::Readiness;
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
use serde_json::json;

use crate::{ServerInfo, error::ApiError};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    endpoint: String,
    method: String,
    status: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: String,
    method: String,
}

/// What the HTTP layer reports: requests by endpoint and status, their
/// latency, and how many syncs are being held open.
pub struct ApiMetrics {
    requests: Family<RequestLabels, Counter>,
    latency: Family<EndpointLabels, Histogram>,
    syncs_open: Gauge,
    /// Totals for the health watch after a configuration reload.
    answered: AtomicU64,
    server_errors: AtomicU64,
}

impl Default for ApiMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            // 100 µs .. ~105 s: a message send and a long-poll on one scale.
            latency: Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.0001, 2.0, 21))),
            syncs_open: Gauge::default(),
            answered: AtomicU64::new(0),
            server_errors: AtomicU64::new(0),
        }
    }
}

impl ApiMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "kabar_http_requests",
            "Requests answered, by endpoint (the route's path pattern), method and status",
            self.requests.clone(),
        );
        registry.register(
            "kabar_http_request_duration_seconds",
            "Time to answer a request, by endpoint and method (long-polling syncs included)",
            self.latency.clone(),
        );
        registry.register(
            "kabar_syncs_open",
            "Sync requests being answered or held open (connected clients waiting for news)",
            self.syncs_open.clone(),
        );
    }

    /// Requests answered and, of them, server errors (5xx), since start.
    pub fn totals(&self) -> (u64, u64) {
        (self.answered.load(Ordering::Relaxed), self.server_errors.load(Ordering::Relaxed))
    }

    /// Counts one sync as open until the returned guard drops.
    pub fn sync_opened(self: &Arc<Self>) -> OpenSync {
        self.syncs_open.inc();
        OpenSync(self.clone())
    }
}

/// A sync being answered; counted in `kabar_syncs_open` while it lives.
pub struct OpenSync(Arc<ApiMetrics>);

impl Drop for OpenSync {
    fn drop(&mut self) {
        self.0.syncs_open.dec();
    }
}

/// Middleware: counts and times every request by its route pattern (never
/// the raw path, so ids do not explode the number of series).
pub async fn record_request(State(metrics): State<Arc<ApiMetrics>>, request: Request, next: Next) -> Response {
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    metrics
        .latency
        .get_or_create(&EndpointLabels {
            endpoint: endpoint.clone(),
            method: method.clone(),
        })
        .observe(started.elapsed().as_secs_f64());
    metrics.requests.get_or_create(&RequestLabels { endpoint, method, status }).inc();
    metrics.answered.fetch_add(1, Ordering::Relaxed);
    if status >= 500 {
        metrics.server_errors.fetch_add(1, Ordering::Relaxed);
    }
    response
}

/// Middleware: refuses a request whose declared body is over the limit
/// before anything reads it.
pub async fn refuse_oversized(State(max): State<usize>, request: Request, next: Next) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > max as u64) {
        return ApiError::too_large(format!("request bodies are limited to {max} bytes")).into_response();
    }
    next.run(request).await
}

/// GET /health: liveness. Answers as long as the process serves HTTP at all;
/// `instance` lets a probe tell this server from another at the same URL.
pub async fn health_route(State(info): State<Arc<ServerInfo>>) -> Json<serde_json::Value> {
    Json(json!({ "status": "ok", "instance": info.instance }))
}

/// GET /ready: readiness. 200 while storage reads and commits and the server
/// is not shutting down; 503 with the reason otherwise.
pub async fn ready_route(State(readiness): State<Arc<Readiness>>) -> Response {
    match readiness.check().await {
        Ok(()) => Json(json!({ "status": "ready" })).into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "status": "not ready", "reason": reason })),
        )
            .into_response(),
    }
}
