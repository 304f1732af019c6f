//! The break-glass admin channel: a Unix socket in the data directory
//! (`admin.sock`, owner-only) that `kabar admin ...` talks to.
//!
//! It is served by its own thread with its own runtime, so it answers while
//! the HTTP listeners are misconfigured, unreachable or saturated, and it
//! takes nothing from the client-facing limits: an operator can always look,
//! reload, roll back, and create or deactivate accounts. The protocol is one
//! JSON request per line and one JSON response per line.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Instant,
};

use anyhow::{Context, bail};
use kabar_api::{ApiMetrics, ServerInfo};
use kabar_core::{accounts::Accounts, health::Readiness, load::LoadMetrics};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
};

use crate::{control::ConfigControl, listeners::Listeners};

/// The socket's file name inside the data directory.
pub const SOCKET_NAME: &str = "admin.sock";
/// Largest request line accepted.
const MAX_REQUEST_BYTES: u64 = 64 * 1024;

/// What the operator can ask.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "kebab-case")]
pub enum Request {
    Status,
    Config,
    Reload,
    Rollback,
    CreateUser { username: String, password: Option<String> },
    DeactivateUser { user_id: String },
    CreateRegistrationToken { uses: Option<u32> },
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// What the admin channel works with.
pub struct AdminContext {
    pub control: Arc<ConfigControl>,
    pub accounts: Arc<Accounts>,
    pub readiness: Arc<Readiness>,
    pub info: Arc<ServerInfo>,
    pub api_metrics: Arc<ApiMetrics>,
    pub load: Arc<LoadMetrics>,
    pub listeners: Arc<Listeners>,
    pub metrics_listening: Option<SocketAddr>,
    pub started: Instant,
    pub storage: StorageStatus,
    pub bus: BusStatus,
}

/// What `status` tells of the storage engine.
pub struct StorageStatus {
    pub engine: &'static str,
    pub store: Arc<dyn kabar_store::Store>,
    pub applied: kabar_core::applier::Applied,
}

impl StorageStatus {
    async fn report(&self) -> Value {
        let ping = tokio::time::timeout(std::time::Duration::from_secs(2), self.store.ping()).await;
        let health = match ping {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("no answer within 2 s".to_owned()),
        };
        let head = self.store.committed_position().await.ok();
        json!({
            "engine": self.engine,
            "healthy": health.is_ok(),
            "problem": health.err(),
            "committed_position": head,
            "applied_position": self.applied.position(),
        })
    }
}

/// What `status` tells of the bus between nodes.
pub struct BusStatus {
    pub engine: &'static str,
    pub bus: Arc<dyn kabar_bus::Bus>,
    pub peers: Arc<kabar_bus::peers::Peers>,
    /// `bus.rate_limits`.
    pub rate_limits: &'static str,
    /// How many nodes this node's rate limits are divided by now.
    pub limits_shared_by: Arc<std::sync::atomic::AtomicU32>,
}

impl BusStatus {
    /// The bus, and every live node with what its last heartbeat said.
    fn report(&self) -> Value {
        let nodes: Vec<Value> = self
            .peers
            .live()
            .into_iter()
            .map(|p| {
                json!({
                    "node": p.node,
                    "this_node": p.this_node,
                    "version": p.status.version,
                    "applied_position": p.status.applied,
                    "requests_per_second": p.status.requests_per_second,
                    "heard_ms_ago": p.heard_ago.as_millis() as u64,
                })
            })
            .collect();
        json!({
            "engine": self.engine,
            "node": self.bus.node(),
            "connected": self.bus.connected(),
            "nodes": nodes,
            "rate_limits": self.rate_limits,
            "rate_limits_shared_by": self.limits_shared_by.load(std::sync::atomic::Ordering::Relaxed),
        })
    }
}

impl AdminContext {
    async fn handle(&self, request: Request) -> Result<Value, String> {
        match request {
            Request::Status => Ok(self.status().await),
            Request::Config => Ok(json!({ "toml": self.control.running().await.to_toml() })),
            Request::Reload => serde_json::to_value(self.control.reload().await).map_err(|e| e.to_string()),
            Request::Rollback => serde_json::to_value(self.control.rollback().await?).map_err(|e| e.to_string()),
            Request::CreateUser { username, password } => {
                let user_id = self
                    .accounts
                    .create_user_as_operator(&username, password)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(json!({ "user_id": user_id }))
            }
            Request::DeactivateUser { user_id } => {
                let user_id = ruma::OwnedUserId::try_from(user_id.as_str()).map_err(|e| format!("{user_id:?}: {e}"))?;
                self.accounts.deactivate_as_operator(&user_id).await.map_err(|e| e.to_string())?;
                Ok(json!({ "deactivated": user_id }))
            }
            Request::CreateRegistrationToken { uses } => {
                let token = kabar_core::accounts::random_token(24);
                self.accounts
                    .store()
                    .create_registration_token(&token, uses, None)
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(json!({ "token": token, "uses": uses }))
            }
        }
    }

    async fn status(&self) -> Value {
        let (answered, server_errors) = self.api_metrics.totals();
        let ready = self.readiness.check().await;
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "instance": self.info.instance,
            "server_name": self.info.server_name,
            "uptime_seconds": self.started.elapsed().as_secs(),
            "listening": self.listeners.bound(),
            "metrics_listening": self.metrics_listening,
            "public_base_url": self.info.public_base_url(),
            "registration": format!("{:?}", self.accounts.policy()),
            "ready": ready.is_ok(),
            "not_ready_because": ready.err(),
            "requests_answered": answered,
            "server_errors": server_errors,
            "refused_by_class": self.load.shed_totals(),
            "configuration": self.control.summary().await,
            "storage": self.storage.report().await,
            "bus": self.bus.report(),
        })
    }
}

/// Binds the socket in `data_dir`. Refuses when another live server already
/// answers there (two servers on one data directory would corrupt it); a
/// socket file left by a crash is replaced.
pub fn bind(data_dir: &Path) -> anyhow::Result<(std::os::unix::net::UnixListener, PathBuf)> {
    let path = data_dir.join(SOCKET_NAME);
    if path.exists() {
        if std::os::unix::net::UnixStream::connect(&path).is_ok() {
            bail!("another kabar is running on {} (its admin socket answers)", data_dir.display());
        }
        std::fs::remove_file(&path).with_context(|| format!("removing stale {}", path.display()))?;
    }
    let listener = std::os::unix::net::UnixListener::bind(&path).with_context(|| format!("binding {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    listener.set_nonblocking(true)?;
    Ok((listener, path))
}

/// Serves the admin channel on a thread of its own until the process ends.
pub fn serve(listener: std::os::unix::net::UnixListener, context: AdminContext) -> anyhow::Result<()> {
    std::thread::Builder::new().name("kabar-admin".into()).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "the admin channel could not start");
                return;
            }
        };
        runtime.block_on(async move {
            let listener = match UnixListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "the admin channel could not start");
                    return;
                }
            };
            let context = Arc::new(context);
            loop {
                match listener.accept().await {
                    Ok((stream, _)) => {
                        let context = context.clone();
                        tokio::spawn(async move {
                            if let Err(e) = session(stream, &context).await {
                                tracing::debug!(error = %e, "admin session ended");
                            }
                        });
                    }
                    Err(e) => tracing::warn!(error = %e, "admin socket accept failed"),
                }
            }
        });
    })?;
    Ok(())
}

async fn session(stream: UnixStream, context: &AdminContext) -> anyhow::Result<()> {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST_BYTES)).lines();
    while let Some(line) = lines.next_line().await? {
        let response = match serde_json::from_str::<Request>(&line) {
            Ok(request) => {
                tracing::info!(command = request_kind(&request), "admin command");
                match context.handle(request).await {
                    Ok(result) => Response {
                        ok: true,
                        result: Some(result),
                        error: None,
                    },
                    Err(error) => Response {
                        ok: false,
                        result: None,
                        error: Some(error),
                    },
                }
            }
            Err(e) => Response {
                ok: false,
                result: None,
                error: Some(format!("not a request: {e}")),
            },
        };
        let mut out = serde_json::to_vec(&response)?;
        out.push(b'\n');
        write.write_all(&out).await?;
    }
    Ok(())
}

/// The command's name, for the log (never its password).
fn request_kind(request: &Request) -> &'static str {
    match request {
        Request::Status => "status",
        Request::Config => "config",
        Request::Reload => "reload",
        Request::Rollback => "rollback",
        Request::CreateUser { .. } => "create-user",
        Request::DeactivateUser { .. } => "deactivate-user",
        Request::CreateRegistrationToken { .. } => "create-registration-token",
    }
}

/// Sends one request to the socket at `path` and returns the response.
pub async fn call(path: &Path, request: &Request) -> anyhow::Result<Response> {
    let stream = UnixStream::connect(path)
        .await
        .with_context(|| format!("connecting to {} (is the server running on this data directory?)", path.display()))?;
    let (read, mut write) = stream.into_split();
    let mut line = serde_json::to_vec(request)?;
    line.push(b'\n');
    write.write_all(&line).await?;
    let mut lines = BufReader::new(read).lines();
    let answer = lines
        .next_line()
        .await?
        .context("the server closed the admin connection without answering")?;
    Ok(serde_json::from_str(&answer)?)
}
