//! The `kabar` binary: reads the configuration, wires the services, serves,
//! and gives the operator `check-config` and the `admin` channel.

mod admin;
mod config;
mod control;
mod listeners;
mod logging;
mod metrics;
mod migrate;

/// mimalloc returns freed memory to the system far better than glibc's malloc
/// under this workload (19 MiB argon2 buffers on worker threads, many
/// short-lived response buffers), which keeps resident memory near live memory.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::{io::BufRead, net::SocketAddr, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, anyhow};
use clap::{Args, Parser, Subcommand};
use config::{Config, ConfigSource, Overrides};
use control::{ConfigControl, HealthProbe, LiveSettings, WorkGates, public_base_url, rate_limits, registration_policy};
use kabar_core::{
    accounts::Accounts,
    admission::{AddressSlots, Admission, NewcomerAdmission},
    applier::{Applier, ApplierTargets},
    ephemeral::Ephemeral,
    health::Readiness,
    key_backup::KeyBackups,
    keys::Keys,
    load::LoadMetrics,
    media::{LegacyMedia, Media},
    notifier::Notifier,
    password::{HashCost, HashPriority, HashingPool, PasswordHasher},
    push::PushRules,
    rooms::Rooms,
    sync::{SyncEngine, SyncSources},
    to_device::{SenderLimits, ToDevice},
    user_data::{DirectoryScope, UserData},
};
use kabar_domain::EventSigner;
use kabar_store::Store;
use kabar_store_postgres::PostgresStore;
use kabar_store_sqlite::SqliteStore;
use listeners::{ConnectionLimits, Listeners};

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
        listen: Option<SocketAddr>,
        /// Override `data_dir`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Check a configuration without starting anything: lists every problem
    /// and exits with status 1 if any is an error.
    CheckConfig {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Check as if `--data-dir` were given to `serve`.
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Print the reference of every setting (the table in docs/config.md).
    ConfigReference,
    /// Copy an embedded installation (stopped) into an empty PostgreSQL
    /// database, with a progress bar and a row count check at the end.
    Migrate {
        /// `sqlite:PATH`: the data directory, or its `kabar.db`.
        #[arg(long)]
        from: String,
        /// `postgres:URL` (or the `postgres://` URL itself).
        #[arg(long)]
        to: String,
    },
    /// Talk to a running server over its admin socket (works when HTTP does not).
    Admin {
        #[command(flatten)]
        target: AdminTarget,
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Create a registration token for `m.login.registration_token` directly
    /// in the database (also works with the server stopped).
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

/// Which server to talk to: its socket, or the data directory (given or
/// read from a configuration file) holding `admin.sock`.
#[derive(Args)]
struct AdminTarget {
    #[arg(long, global = true)]
    socket: Option<PathBuf>,
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[arg(long, global = true)]
    config: Option<PathBuf>,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Listeners, readiness, load, and the last reload's outcome.
    Status,
    /// The running configuration, as TOML.
    Config,
    /// Read the configuration file again and apply it (same as SIGHUP).
    Reload,
    /// Go back to the configuration before the last applied reload.
    Rollback,
    /// Create an account, whatever the registration policy and limits.
    CreateUser {
        username: String,
        /// The password (visible to other local users in the process list;
        /// prefer --password-stdin).
        #[arg(long)]
        password: Option<String>,
        /// Read the password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    /// Sign out every device of an account and stop it from logging in.
    DeactivateUser { user_id: String },
    /// Issue a registration token.
    CreateRegistrationToken {
        /// How many registrations the token allows (unlimited if unset).
        #[arg(long)]
        uses: Option<u32>,
    },
}

/// The configured storage engine, opened.
struct OpenedStore {
    store: Arc<dyn Store>,
    engine: &'static str,
    /// The embedded engine is closed explicitly at shutdown (queued writes commit).
    sqlite: Option<SqliteStore>,
    /// The PostgreSQL engine, which can also hold media files.
    postgres: Option<Arc<PostgresStore>>,
}

/// What this node's heartbeat says: its version, applied position and the
/// client requests it answered per second since the previous heartbeat.
fn node_status(
    api_metrics: Arc<kabar_api::ApiMetrics>,
    applied: kabar_core::applier::Applied,
) -> impl Fn() -> kabar_bus::NodeStatus + Send + Sync + 'static {
    let last = std::sync::Mutex::new((api_metrics.totals().0, std::time::Instant::now()));
    move || {
        let answered = api_metrics.totals().0;
        let mut last = last.lock().unwrap_or_else(|p| p.into_inner());
        let seconds = last.1.elapsed().as_secs_f64().max(0.001);
        let rate = (answered.saturating_sub(last.0) as f64 / seconds).round() as u64;
        *last = (answered, std::time::Instant::now());
        kabar_bus::NodeStatus {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            applied: applied.position(),
            requests_per_second: rate,
        }
    }
}

/// With `bus.rate_limits = "share"`, keeps each rate limit this node
/// enforces at its part of the configured one: the limit divided by the
/// live nodes, checked at every heartbeat. Returns the current divisor
/// (1 with `per_node`), for `kabar admin status`.
fn share_rate_limits(
    mode: &str,
    peers: Arc<kabar_bus::peers::Peers>,
    admission: Arc<kabar_core::admission::NewcomerAdmission>,
    to_device: Arc<ToDevice>,
) -> Arc<std::sync::atomic::AtomicU32> {
    let shared_by = Arc::new(std::sync::atomic::AtomicU32::new(1));
    if mode == "share" {
        let current = shared_by.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(kabar_bus::peers::HEARTBEAT);
            loop {
                tick.tick().await;
                let nodes = peers.live_count().min(u32::MAX as usize) as u32;
                if current.swap(nodes, std::sync::atomic::Ordering::Relaxed) != nodes {
                    tracing::info!(nodes, "rate limits are now shared by {nodes} live node(s)");
                }
                admission.register.set_share(nodes);
                admission.login.set_share(nodes);
                to_device.set_share(nodes);
            }
        });
    }
    shared_by
}

/// Where uploaded files live (`media.storage`).
fn media_content(config: &Config, opened: &OpenedStore) -> anyhow::Result<Arc<dyn kabar_store::MediaContent>> {
    match (config.media.storage.as_str(), &opened.postgres) {
        ("database", Some(pg)) => Ok(pg.clone()),
        ("database", None) => anyhow::bail!("media.storage \"database\" needs storage.engine \"postgres\""),
        _ => {
            let dir = config.media.directory.clone().unwrap_or_else(|| config.data_dir.join("media"));
            Ok(Arc::new(kabar_store::media_content::DirectoryContent::open(dir)?))
        }
    }
}

/// The configured bus: none for one node, NATS for several.
async fn open_bus(config: &Config) -> anyhow::Result<Arc<dyn kabar_bus::Bus>> {
    let bus = &config.bus;
    match bus.engine.as_str() {
        "nats" => {
            let nats = kabar_bus::nats::NatsBus::connect(&bus.nats.urls, &bus.subject_prefix, &bus.node_name).await?;
            tracing::info!(node = %bus.node_name, "the bus (NATS) is connected");
            Ok(Arc::new(nats))
        }
        _ => Ok(Arc::new(kabar_bus::LocalBus::new(bus.node_name.clone()))),
    }
}

/// A PostgreSQL URL without its password, for messages.
fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "(the configured URL)".into(),
    }
}

async fn open_store(config: &Config, observer: Option<Arc<dyn kabar_store::StoreObserver>>) -> anyhow::Result<OpenedStore> {
    std::fs::create_dir_all(&config.data_dir).with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    match config.storage.engine.as_str() {
        "postgres" => {
            let url = config
                .storage
                .postgres
                .url
                .as_deref()
                .context("storage.engine is \"postgres\" but storage.postgres.url is not set")?;
            let pg = PostgresStore::connect_observed(url, config.storage.postgres.pool_size, observer)
                .await
                .map_err(|e| anyhow::anyhow!("cannot use PostgreSQL at {}: {e}", redacted(url)))?;
            let pg = Arc::new(pg);
            Ok(OpenedStore {
                store: pg.clone(),
                engine: "postgres",
                sqlite: None,
                postgres: Some(pg),
            })
        }
        _ => {
            let sqlite = SqliteStore::open_observed(&config.data_dir.join("kabar.db"), observer)?;
            Ok(OpenedStore {
                store: Arc::new(sqlite.clone()),
                engine: "sqlite",
                sqlite: Some(sqlite),
                postgres: None,
            })
        }
    }
}

fn load(source: &ConfigSource) -> anyhow::Result<Config> {
    match source.load() {
        Ok((config, warnings)) => {
            eprint!("{warnings}");
            Ok(config)
        }
        Err(problems) => Err(anyhow!(
            "the configuration has {} error(s); nothing was started:\n{problems}",
            problems.errors()
        )),
    }
}

/// Turns transparent huge pages off for this process (Linux). Where the
/// system has them on ("always", the default of many distributions), every
/// fault on memory the allocator gave back and takes again zeroes 2 MiB: in
/// the delivery phase of a 19,000-subscriber channel that zeroing was a third
/// of the server's samples, delivery p99 went from 4.6 s to 1.5 s without it,
/// and peak memory fell from 0.93 to 0.69 GB (bench/RESULTS.md, "Huge pages
/// off"). A failure (an old kernel) is only logged: nothing depends on it.
fn without_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    if let Err(e) = rustix::thread::disable_transparent_huge_pages(true) {
        eprintln!("kabar: could not turn transparent huge pages off ({e}); going on with them");
    }
}

fn main() -> anyhow::Result<()> {
    without_transparent_huge_pages();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Command::Serve { config, listen, data_dir } => {
            let source = ConfigSource {
                file: config,
                overrides: Overrides { listen, data_dir },
            };
            let config = load(&source)?;
            let log = logging::init(&config.log, &config.log_format);
            runtime.block_on(serve(source, config, log))
        }
        Command::CheckConfig { config, data_dir } => {
            let source = ConfigSource {
                file: config,
                overrides: Overrides { listen: None, data_dir },
            };
            match source.load() {
                Ok((_, warnings)) => {
                    print!("{warnings}");
                    println!("configuration is valid ({} warning(s))", warnings.items.len());
                    Ok(())
                }
                Err(problems) => {
                    print!("{problems}");
                    println!(
                        "configuration is invalid: {} error(s), {} warning(s)",
                        problems.errors(),
                        problems.items.len() - problems.errors()
                    );
                    std::process::exit(1);
                }
            }
        }
        Command::Migrate { from, to } => {
            let (from, to) = (migrate::parse_from(&from)?, migrate::parse_to(&to)?);
            runtime.block_on(migrate::run(from, to))
        }
        Command::ConfigReference => {
            print!("{}", config::schema::reference_table());
            Ok(())
        }
        Command::Admin { target, command } => runtime.block_on(admin_command(target, command)),
        Command::CreateRegistrationToken { config, data_dir, uses } => {
            let config = load(&ConfigSource {
                file: config,
                overrides: Overrides { listen: None, data_dir },
            })?;
            runtime.block_on(async {
                let store = open_store(&config, None).await?.store;
                let token = kabar_core::accounts::random_token(24);
                store.create_registration_token(&token, uses, None).await?;
                println!("{token}");
                Ok(())
            })
        }
    }
}

async fn admin_command(target: AdminTarget, command: AdminCommand) -> anyhow::Result<()> {
    let socket = match (target.socket, target.data_dir) {
        (Some(s), _) => s,
        (None, Some(d)) => d.join(admin::SOCKET_NAME),
        (None, None) => {
            // The data directory as the configuration (or the default) says.
            let source = ConfigSource {
                file: target.config,
                overrides: Overrides::default(),
            };
            let data_dir = match source.load() {
                Ok((c, _)) => c.data_dir,
                Err(_) => Config::default().data_dir,
            };
            data_dir.join(admin::SOCKET_NAME)
        }
    };
    let request = match command {
        AdminCommand::Status => admin::Request::Status,
        AdminCommand::Config => admin::Request::Config,
        AdminCommand::Reload => admin::Request::Reload,
        AdminCommand::Rollback => admin::Request::Rollback,
        AdminCommand::CreateUser {
            username,
            password,
            password_stdin,
        } => {
            let password = if password_stdin {
                let mut line = String::new();
                std::io::stdin().lock().read_line(&mut line)?;
                Some(line.trim_end_matches(['\r', '\n']).to_owned())
            } else {
                password
            };
            admin::Request::CreateUser { username, password }
        }
        AdminCommand::DeactivateUser { user_id } => admin::Request::DeactivateUser { user_id },
        AdminCommand::CreateRegistrationToken { uses } => admin::Request::CreateRegistrationToken { uses },
    };
    let response = admin::call(&socket, &request).await?;
    if !response.ok {
        anyhow::bail!("{}", response.error.unwrap_or_default());
    }
    let result = response.result.unwrap_or_default();
    match request {
        admin::Request::Config => print!("{}", result["toml"].as_str().unwrap_or_default()),
        admin::Request::CreateRegistrationToken { .. } => println!("{}", result["token"].as_str().unwrap_or_default()),
        admin::Request::CreateUser { .. } => println!("{}", result["user_id"].as_str().unwrap_or_default()),
        _ => println!("{}", serde_json::to_string_pretty(&result)?),
    }
    // A reload that did not apply is a failure for scripts.
    let outcome = result.get("outcome").and_then(|o| o.as_str());
    if matches!(outcome, Some("refused" | "rolled_back")) {
        std::process::exit(1);
    }
    Ok(())
}

fn random_instance_id() -> String {
    kabar_core::accounts::random_token(16)
}

async fn serve(source: ConfigSource, config: Config, log: logging::LogControl) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    std::fs::create_dir_all(&config.data_dir).with_context(|| format!("creating data directory {}", config.data_dir.display()))?;
    // The admin socket comes first: it also stops a second server on this data directory.
    let (admin_listener, admin_path) = admin::bind(&config.data_dir)?;
    let storage_metrics = metrics::StorageMetrics::new();
    let opened = open_store(&config, Some(storage_metrics.clone())).await?;
    let store: Arc<dyn Store> = opened.store.clone();
    tracing::info!(engine = opened.engine, "storage opened");
    let bus = open_bus(&config).await?;
    let server_name = ruma::OwnedServerName::try_from(config.server_name.as_str())?;
    let key = store.signing_key(EventSigner::generate_key()).await?;
    let signer = Arc::new(EventSigner::new(server_name.clone(), &key, "kabar1")?);

    let policy = registration_policy(&config);

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
    let gates = WorkGates::new(&load, &config.work, cores);
    let notifier = Arc::new(Notifier::new());
    let ephemeral = Arc::new(Ephemeral::new(notifier.clone(), bus.clone()));
    tokio::spawn(ephemeral.clone().hear_other_nodes());
    // The applier is the only path from a committed write (this process's
    // or another's on the same database) to the caches, trackers and
    // wake-ups below.
    let targets = ApplierTargets::fresh(&store, notifier.clone());
    let (changes, sessions, room_caches, views) = (
        targets.changes.clone(),
        targets.sessions.clone(),
        targets.rooms.clone(),
        targets.views.clone(),
    );
    room_caches.set_budget(config.rooms.cached_state_entries);
    // The channels' view counters keep at most as many subscribers.
    views.set_budget(config.rooms.cached_state_entries);
    // It reads the stream for writes other processes committed every
    // `bus.catch_up_interval_ms` (one small query), and at once when the
    // bus tells of one: the interval bounds how stale this process's caches
    // (a revoked token above all) can get when the bus fails.
    let applier = Applier::spawn(
        store.clone(),
        targets,
        bus.clone(),
        Duration::from_millis(config.bus.catch_up_interval_ms),
    );
    let accounts = Arc::new(Accounts::new(
        store.clone(),
        hasher,
        admission,
        server_name.clone(),
        policy,
        sessions,
        applier.applied(),
    ));
    accounts.set_reserved_localparts(config.registration.reserved_localparts.clone());
    let default_version = ruma::RoomVersionId::try_from(config.rooms.default_version.as_str())?;
    let rooms = Arc::new(Rooms::new(
        store.clone(),
        signer,
        room_caches,
        applier.applied(),
        default_version,
        gates.join.clone(),
    ));
    let keys = Arc::new(Keys::new(store.clone(), rooms.clone(), changes.clone()));
    let to_device = Arc::new(ToDevice::new(
        store.clone(),
        changes.clone(),
        applier.applied(),
        SenderLimits {
            per_second: config.limits.to_device_messages_per_second,
            burst: config.limits.to_device_burst,
        },
    ));
    let sync = Arc::new(SyncEngine::new(
        SyncSources {
            store: store.clone(),
            rooms: rooms.clone(),
            notifier: notifier.clone(),
            ephemeral: ephemeral.clone(),
            changes: changes.clone(),
            keys: keys.clone(),
            to_device: to_device.clone(),
            push_rules: Arc::new(PushRules::new(store.clone(), changes.clone())),
            views: views.clone(),
        },
        gates.initial_sync.clone(),
    ));
    let directory = if config.user_directory.search_all_users {
        DirectoryScope::AllUsers
    } else {
        DirectoryScope::KnownUsers
    };
    let user_data = Arc::new(UserData::new(store.clone(), rooms.clone(), directory));
    let legacy_media = match config.media.legacy_unauthenticated.as_str() {
        "all" => LegacyMedia::All,
        "off" => LegacyMedia::Off,
        _ => LegacyMedia::FrozenAt(store.media_freeze_ms().await?),
    };
    let media = Arc::new(Media::new(
        store.clone(),
        media_content(&config, &opened)?,
        config.data_dir.join("media").join("thumbnails"),
        config.limits.max_upload_bytes as u64,
        gates.thumbnail.clone(),
        legacy_media,
        AddressSlots::new(config.media.max_downloads_per_address, &config.limits.unlimited_addresses),
    )?);
    // The public URL may name the first listener's bound port; it is set
    // once the listeners are bound, before they are announced to anyone
    // who could ask.
    let info = Arc::new(
        kabar_api::ServerInfo::new(server_name.to_string(), String::new(), random_instance_id()).with_turn(kabar_core::voip::TurnConfig {
            uris: config.voip.turn_uris.clone(),
            shared_secret: config.voip.turn_shared_secret.clone(),
            lifetime: Duration::from_millis(config.voip.turn_user_lifetime_ms),
        }),
    );
    let readiness = Arc::new(Readiness::new(store.clone(), notifier.clone(), bus.clone()));
    let api_metrics = Arc::new(kabar_api::ApiMetrics::default());
    let peers = kabar_bus::peers::Peers::spawn(bus.clone(), node_status(api_metrics.clone(), applier.applied()));
    let limits_shared_by = share_rate_limits(
        &config.bus.rate_limits,
        peers.clone(),
        accounts.admission().clone(),
        to_device.clone(),
    );
    let state = kabar_api::AppState::new(kabar_api::Services {
        accounts: accounts.clone(),
        rooms,
        sync,
        views,
        ephemeral,
        user_data,
        keys,
        to_device,
        key_backups: Arc::new(KeyBackups::new(store.clone())),
        media,
        info: info.clone(),
        readiness: readiness.clone(),
        metrics: api_metrics.clone(),
    });
    let app = kabar_api::router(
        state,
        kabar_api::EdgeLimits {
            max_request_body: config.limits.max_request_body_bytes,
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
    let mut metrics_bound = None;
    if let Some(addr) = config.metrics_listen {
        let mut registry = prometheus_client::registry::Registry::default();
        load.register(&mut registry);
        api_metrics.register(&mut registry);
        storage_metrics.register(&mut registry);
        let addr = metrics::serve(addr, registry)
            .await
            .with_context(|| format!("binding metrics_listen {addr}"))?;
        println!("kabar metrics on http://{addr}/metrics");
        metrics_bound = Some(addr);
    }

    let listeners = Arc::new(Listeners::start(
        app,
        &config.listen,
        ConnectionLimits {
            header_read_timeout: Duration::from_millis(config.limits.header_read_timeout_ms),
            max_per_address: config.limits.max_connections_per_address,
            unlimited: config.limits.unlimited_addresses.clone(),
        },
    )?);
    info.set_public_base_url(public_base_url(&config, &listeners));
    let probe = HealthProbe::new(readiness.clone(), info.clone(), listeners.clone(), metrics_bound)?;
    let live = LiveSettings {
        accounts: accounts.clone(),
        gates,
        info: info.clone(),
        log,
        listeners: listeners.clone(),
        cores,
    };
    let control = Arc::new(ConfigControl::new(source, config.clone(), live, probe));
    admin::serve(
        admin_listener,
        admin::AdminContext {
            control: control.clone(),
            accounts,
            readiness,
            info,
            api_metrics,
            load,
            listeners: listeners.clone(),
            metrics_listening: metrics_bound,
            started,
            storage: admin::StorageStatus {
                engine: opened.engine,
                store: store.clone(),
                applied: applier.applied(),
            },
            bus: admin::BusStatus {
                engine: if config.bus.engine == "nats" { "nats" } else { "local" },
                bus: bus.clone(),
                peers,
                rate_limits: if config.bus.rate_limits == "share" { "share" } else { "per_node" },
                limits_shared_by,
            },
        },
    )?;
    println!("kabar admin socket at {}", admin_path.display());
    #[cfg(unix)]
    {
        let control = control.clone();
        let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(async move {
            while hangups.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the configuration");
                control.reload().await;
            }
        });
    }

    tracing::info!(server_name = %server_name, addresses = ?listeners.bound(), registration = ?policy, "kabar is serving");

    shutdown_signal().await;
    // Waiting syncs are answered now (not dropped), readiness turns false,
    // the listeners stop accepting, and requests in flight get the deadline.
    notifier.close();
    let deadline = Duration::from_millis(control.running().await.shutdown_deadline_ms);
    tracing::info!(
        ?deadline,
        "shutting down: no new connections, answering waiting syncs, finishing requests in flight"
    );
    if !listeners.shutdown(deadline).await {
        tracing::warn!("requests still in flight after {deadline:?}; exiting (writes are durable once acknowledged)");
    }
    // Writes already queued still commit; nothing new is taken.
    if let Some(sqlite) = &opened.sqlite {
        sqlite.close();
    }
    let _ = std::fs::remove_file(&admin_path);
    tracing::info!("shut down");
    Ok(())
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
