//! The `kabar` binary: reads the configuration, wires the services, serves.

mod config;
mod metrics;

/// mimalloc returns freed memory to the system far better than glibc's malloc
/// under this workload (19 MiB argon2 buffers on worker threads, many
/// short-lived response buffers), which keeps resident memory near live memory.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::Context;
use clap::{Parser, Subcommand};
use config::Config;
use kabar_core::{
    accounts::{Accounts, RegistrationPolicy},
    admission::{Admission, NewcomerAdmission, RateLimits},
    changes::Changes,
    ephemeral::Ephemeral,
    load::{Gate, GateLimits, LoadMetrics},
    media::Media,
    notifier::Notifier,
    password::{HashCost, HashPriority, HashingPool, PasswordHasher},
    rooms::Rooms,
    sync::SyncEngine,
    user_data::UserData,
};
use kabar_domain::EventSigner;
use kabar_store::{ServerStore, Store};
use kabar_store_sqlite::SqliteStore;
use tracing_subscriber::EnvFilter;

fn rate_limits(c: &config::RateLimitConfig) -> RateLimits {
    RateLimits {
        per_address_per_minute: c.per_address_per_minute,
        per_address_burst: c.per_address_burst,
        global_per_second: c.global_per_second,
        global_burst: c.global_burst,
    }
}

/// How long shutdown waits for requests in flight.
const SHUTDOWN_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Parser)]
#[command(name = "kabar", version, about = "A Matrix homeserver built to stay up")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the homeserver.
    Serve {
        /// Configuration file (TOML). Without one, every setting takes its default.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override `listen` (port 0 picks a free port; the bound address is printed).
        #[arg(long)]
        listen: Option<std::net::SocketAddr>,
        /// Override `data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Create a registration token for `m.login.registration_token`.
    CreateRegistrationToken {
        #[arg(long)]
        config: Option<PathBuf>,
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// How many registrations the token allows (unlimited if unset).
        #[arg(long)]
        uses: Option<u32>,
    },
}

/// The configured log filter, with ruma's state-resolution library quieted to
/// warnings unless the filter names it: at `info` it logs two lines for every
/// event it authorizes, which cost a tenth of the server's time under load.
fn log_directives(configured: &str) -> String {
    if configured.contains("ruma_state_res") {
        configured.to_owned()
    } else {
        format!("{configured},ruma_state_res=warn")
    }
}

fn open_store(config: &Config) -> anyhow::Result<SqliteStore> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    Ok(SqliteStore::open(&config.data_dir.join("kabar.db"))?)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Serve { config, listen, data_dir } => {
            let mut config = Config::load(config.as_deref())?;
            if let Some(l) = listen {
                config.listen = l;
            }
            if let Some(d) = data_dir {
                config.data_dir = d;
            }
            tracing_subscriber::fmt()
                .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(log_directives(&config.log))))
                .init();
            runtime.block_on(serve(config))
        }
        Command::CreateRegistrationToken { config, data_dir, uses } => {
            let mut config = Config::load(config.as_deref())?;
            if let Some(d) = data_dir {
                config.data_dir = d;
            }
            runtime.block_on(async {
                let store = open_store(&config)?;
                let token = kabar_core::accounts::random_token(24);
                store.create_registration_token(&token, uses, None).await?;
                println!("{token}");
                Ok(())
            })
        }
    }
}

async fn serve(config: Config) -> anyhow::Result<()> {
    let store = open_store(&config)?;
    let store: Arc<dyn Store> = Arc::new(store);
    let server_name = ruma::OwnedServerName::try_from(config.server_name.as_str())?;
    let key = store.signing_key(EventSigner::generate_key()).await?;
    let signer = Arc::new(EventSigner::new(server_name.clone(), &key, "kabar1")?);

    let listener = bind(config.listen).with_context(|| format!("binding {}", config.listen))?;
    let bound = listener.local_addr()?;
    let policy = match config.registration.mode.as_str() {
        "open" => RegistrationPolicy::Open,
        "token" => RegistrationPolicy::TokenRequired,
        "closed" => RegistrationPolicy::Closed,
        _ if bound.ip().is_loopback() => RegistrationPolicy::Open,
        _ => RegistrationPolicy::TokenRequired,
    };

    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(2);
    let load = LoadMetrics::new();
    let hashing = &config.password_hashing;
    let hasher = Arc::new(PasswordHasher::new(
        HashCost {
            memory_kib: hashing.memory_kib,
            iterations: hashing.iterations,
            parallelism: 1,
        },
        HashingPool {
            threads: if hashing.threads == 0 { cores } else { hashing.threads },
            max_queued: hashing.queue,
            max_queue_delay: Duration::from_millis(hashing.max_queue_delay_ms),
            priority: match hashing.priority.as_str() {
                "normal" => HashPriority::Normal,
                "low" => HashPriority::Low,
                _ => HashPriority::Idle,
            },
        },
        load.class("password_hashing"),
    )?);
    tracing::info!(hash_ms = hasher.hash_time().as_secs_f64() * 1000.0, "password hashing calibrated");
    let admission = NewcomerAdmission {
        register: Admission::new(load.class("register"), rate_limits(&config.admission.register)),
        login: Admission::new(load.class("login"), rate_limits(&config.admission.login)),
    };
    let gate = |name: &'static str, class: &config::WorkClassConfig, defaults: (usize, usize, u64), expected: Duration| {
        let (slots, max_queued, delay_ms) = class.resolve(defaults, cores);
        Gate::new(
            load.class(name),
            GateLimits {
                slots,
                max_queued,
                max_queue_delay: Duration::from_millis(delay_ms),
            },
            expected,
        )
    };
    let work = &config.work;
    let full_syncs = gate("initial_sync", &work.initial_sync, (0, 1024, 10_000), Duration::from_millis(5));
    let joins = gate("join", &work.join, (64, 4096, 5_000), Duration::from_millis(2));
    let thumbnails = gate("thumbnail", &work.thumbnail, (0, 64, 5_000), Duration::from_millis(50));
    let notifier = Arc::new(Notifier::new());
    let ephemeral = Arc::new(Ephemeral::new(notifier.clone()));
    let accounts = Arc::new(Accounts::new(store.clone(), hasher, admission, server_name.clone(), policy));
    let default_version = ruma::RoomVersionId::try_from(config.rooms.default_version.as_str())?;
    let changes = Changes::new(store.current_position());
    let rooms = Arc::new(Rooms::new(
        store.clone(),
        signer,
        notifier.clone(),
        changes.clone(),
        default_version,
        joins,
    ));
    let sync = Arc::new(SyncEngine::new(
        store.clone(),
        rooms.clone(),
        notifier.clone(),
        ephemeral.clone(),
        changes.clone(),
        full_syncs,
    ));
    let user_data = Arc::new(UserData::new(store.clone(), notifier.clone(), changes, rooms.clone()));
    let media = Arc::new(Media::new(
        store.clone(),
        config.data_dir.join("media"),
        config.limits.max_upload_bytes as u64,
        thumbnails,
    )?);
    let info = Arc::new(kabar_api::ServerInfo {
        server_name: server_name.to_string(),
        public_base_url: config.public_base_url(bound),
    });
    let state = kabar_api::AppState {
        accounts,
        rooms,
        sync,
        ephemeral,
        user_data,
        media,
        info,
    };
    let app = kabar_api::router(
        state,
        kabar_api::EdgeLimits {
            max_json_body: config.limits.max_json_body_bytes,
            max_upload: config.limits.max_upload_bytes,
        },
    );

    // Shedding episodes end (and say so) after a second without refusals.
    let episodes = load.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            episodes.end_quiet_episodes();
        }
    });
    if let Some(addr) = config.metrics_listen {
        let mut registry = prometheus_client::registry::Registry::default();
        load.register(&mut registry);
        let bound = metrics::serve(addr, registry)
            .await
            .with_context(|| format!("binding metrics_listen {addr}"))?;
        println!("kabar metrics on http://{bound}/metrics");
    }

    tracing::info!(server_name = %server_name, address = %bound, registration = ?policy, "kabar is serving");
    // Tests and scripts read this line to learn the port.
    println!("kabar listening on http://{bound}");
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(async move {
        let mut stop_rx = stop_rx;
        // A make-service shares the one router among connections: a plain
        // `Router` is re-specialised with its state for every connection,
        // which costs memory in proportion to the number of routes (about
        // 400 KiB a connection here). The peer address it records feeds the
        // per-address admission limits.
        axum::serve(listener, app.into_make_service_with_connect_info::<std::net::SocketAddr>())
            .with_graceful_shutdown(async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            })
            .await
    });
    shutdown_signal().await;
    tracing::info!("shutting down: no new connections, waiting for requests in flight");
    let _ = stop_tx.send(true);
    // Long-polling syncs could hold shutdown for minutes; writes are durable
    // once acknowledged, so after the deadline the process simply ends.
    match tokio::time::timeout(SHUTDOWN_DEADLINE, server).await {
        Ok(result) => result??,
        Err(_) => tracing::warn!("requests still in flight after {SHUTDOWN_DEADLINE:?}; exiting"),
    }
    tracing::info!("shut down");
    Ok(())
}

/// How many connections may wait to be accepted. tokio's default (1024) is
/// too small for a crowd arriving at once: the kernel drops the excess SYNs
/// and clients stall for seconds in TCP retransmission. The kernel caps this
/// at `net.core.somaxconn`.
const LISTEN_BACKLOG: u32 = 65_535;

fn bind(addr: std::net::SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            s.recv().await;
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
