//! The operations surface on the client listener: liveness and readiness
//! probes, and the edge every request passes (request id, declared body
//! size, metrics).

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
    http::{HeaderValue, StatusCode, header},
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
use tracing::Instrument;

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

    fn record(&self, endpoint: String, method: String, status: u16, took: std::time::Duration) {
        self.latency
            .get_or_create(&EndpointLabels {
                endpoint: endpoint.clone(),
                method: method.clone(),
            })
            .observe(took.as_secs_f64());
        self.requests.get_or_create(&RequestLabels { endpoint, method, status }).inc();
        self.answered.fetch_add(1, Ordering::Relaxed);
        if status >= 500 {
            self.server_errors.fetch_add(1, Ordering::Relaxed);
        }
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

/// The edge every request passes first: gives it an id (the client's own
/// `X-Request-Id` when it sends a sane one) that every log line about it
/// carries and the response returns, refuses a declared body over the limit
/// before anything reads it, and counts and times it by its route pattern
/// (never the raw path, so ids do not explode the number of series). One
/// middleware instead of a stack of layers: it runs on every request.
pub struct Edge {
    metrics: Arc<ApiMetrics>,
    max_request_body: u64,
    /// Ids are `<instance>-<counter>`: unique across restarts, and made
    /// without a system call or a random number per request.
    id_prefix: String,
    next_id: AtomicU64,
}

impl Edge {
    pub fn new(metrics: Arc<ApiMetrics>, max_request_body: usize, instance: &str) -> Self {
        Self {
            metrics,
            max_request_body: max_request_body as u64,
            id_prefix: instance.to_owned(),
            next_id: AtomicU64::new(1),
        }
    }

    fn request_id(&self, request: &Request) -> HeaderValue {
        match request.headers().get(X_REQUEST_ID) {
            Some(given) if given.len() <= 128 && given.as_bytes().iter().all(|b| b.is_ascii_graphic()) => given.clone(),
            _ => {
                let n = self.next_id.fetch_add(1, Ordering::Relaxed);
                HeaderValue::from_str(&format!("{}-{n}", self.id_prefix)).expect("ascii request id")
            }
        }
    }
}

const X_REQUEST_ID: &str = "x-request-id";

/// The method as a metrics label: the methods HTTP defines, and one bucket
/// for anything else. A client picks the method; were it the label, every
/// made-up method would add series (and memory) forever.
fn method_label(method: &axum::http::Method) -> &'static str {
    use axum::http::Method as M;
    match *method {
        M::GET => "GET",
        M::POST => "POST",
        M::PUT => "PUT",
        M::DELETE => "DELETE",
        M::OPTIONS => "OPTIONS",
        M::HEAD => "HEAD",
        M::PATCH => "PATCH",
        M::CONNECT => "CONNECT",
        M::TRACE => "TRACE",
        _ => "other",
    }
}

pub async fn edge(State(edge): State<Arc<Edge>>, request: Request, next: Next) -> Response {
    let id = edge.request_id(&request);
    let span = tracing::info_span!("request", request_id = id.to_str().unwrap_or_default());
    let endpoint = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = method_label(request.method()).to_owned();
    let started = Instant::now();
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut response = if declared.is_some_and(|n| n > edge.max_request_body) {
        ApiError::too_large(format!("request bodies are limited to {} bytes", edge.max_request_body)).into_response()
    } else {
        next.run(request).instrument(span.clone()).await
    };
    let status = response.status().as_u16();
    if status >= 500 {
        span.in_scope(|| tracing::error!(status, endpoint, method, "request failed"));
    }
    edge.metrics.record(endpoint, method, status, started.elapsed());
    response.headers_mut().insert(X_REQUEST_ID, id);
    response
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
            // Matrix error JSON like every other non-2xx answer, plus the
            // fields a load balancer's probe reads.
            Json(json!({ "errcode": "M_UNKNOWN", "error": format!("not ready: {reason}"), "status": "not ready", "reason": reason })),
        )
            .into_response(),
    }
}
