//! Every setting Kabar knows: its key, type, default, whether it can change
//! while the server runs, and what it means. The checks walk a file against
//! this table, and `docs/config.md` is generated from it (a test keeps the
//! two equal), so the reference cannot drift from the code.

/// What a value must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// One of a fixed set of strings.
    OneOf(&'static [&'static str]),
    /// An integer within `min..=max`.
    Integer {
        min: i64,
        max: i64,
    },
    Bool,
    /// `"host:port"` with an IP address.
    SocketAddr,
    /// One `"ip:port"` or a list of them.
    SocketAddrs,
    Path,
    /// An `http://` or `https://` URL without query or fragment.
    HttpUrl,
    /// A Matrix server name.
    ServerName,
    /// A tracing filter directive (`info`, `kabar_core=debug,warn`, ...).
    LogFilter,
    /// A secret string: never shown in reports or logs.
    Secret,
    /// A list of `turn:` / `turns:` URIs.
    TurnUris,
    /// A list of user-name localparts.
    Localparts,
    /// A list of IP addresses.
    IpAddrs,
    /// A `postgres://` URL; it may hold a password, so it is never shown.
    PostgresUrl,
    /// A list of `nats://` URLs.
    NatsUrls,
    /// A name of letters, digits, `-` and `_` (a NATS subject token, a node name).
    Token,
}

impl Kind {
    /// How the reference names this type.
    pub fn describe(&self) -> String {
        match self {
            Kind::OneOf(options) => options.iter().map(|o| format!("`{o}`")).collect::<Vec<_>>().join(" \\| "),
            Kind::Integer { min, max } if *max == i64::MAX => format!("integer ≥ {min}"),
            Kind::Integer { min, max } => format!("integer {min}–{max}"),
            Kind::Bool => "boolean".into(),
            Kind::SocketAddr => "address (`ip:port`)".into(),
            Kind::SocketAddrs => "address or list of addresses".into(),
            Kind::Path => "path".into(),
            Kind::HttpUrl => "URL (`http` or `https`)".into(),
            Kind::ServerName => "server name".into(),
            Kind::LogFilter => "log filter".into(),
            Kind::Secret => "string (secret)".into(),
            Kind::TurnUris => "list of `turn:`/`turns:` URIs".into(),
            Kind::Localparts => "list of user names".into(),
            Kind::IpAddrs => "list of IP addresses".into(),
            Kind::PostgresUrl => "`postgres://` URL (secret)".into(),
            Kind::NatsUrls => "list of `nats://` URLs".into(),
            Kind::Token => "name (letters, digits, `-`, `_`)".into(),
        }
    }

    /// Whether values of this kind are never shown in reports and logs.
    pub fn is_secret(&self) -> bool {
        matches!(self, Kind::Secret | Kind::PostgresUrl)
    }
}

/// When a new value takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Apply {
    /// On reload (SIGHUP or `kabar admin reload`), without dropping anyone.
    Live,
    /// Only at the next start; a reload reports it as waiting for a restart.
    Restart,
}

#[derive(Debug, Clone, Copy)]
pub struct Setting {
    pub key: &'static str,
    pub kind: Kind,
    /// The default as the reference shows it.
    pub default: &'static str,
    pub apply: Apply,
    pub doc: &'static str,
}

const fn int(min: i64, max: i64) -> Kind {
    Kind::Integer { min, max }
}

const U32: i64 = u32::MAX as i64;
const MAX: i64 = i64::MAX;

const fn setting(key: &'static str, kind: Kind, default: &'static str, apply: Apply, doc: &'static str) -> Setting {
    Setting {
        key,
        kind,
        default,
        apply,
        doc,
    }
}

use Apply::{Live, Restart};

/// The whole reference, in the order `docs/config.md` shows it.
pub const SETTINGS: &[Setting] = &[
    setting(
        "server_name",
        Kind::ServerName,
        "`\"localhost\"`",
        Restart,
        "The name in user ids (`@alice:<server_name>`). Cannot change once users exist.",
    ),
    setting(
        "listen",
        Kind::SocketAddrs,
        "`\"127.0.0.1:8008\"`",
        Live,
        "Where the client API listens: one address or a list. Port 0 picks a free port; each bound address is printed as `kabar listening on http://ADDR`. An empty list is refused (no way in). On reload, new addresses are bound and checked first, and removed ones stop accepting only after the check passes (requests in flight finish); a bind failure keeps the old listeners. `--listen` on the command line replaces it at every reload.",
    ),
    setting(
        "public_base_url",
        Kind::HttpUrl,
        "`http://<first listen address>`",
        Live,
        "The URL clients are told to use (`/.well-known/matrix/client`). After a reload that changes it, the server checks that the new URL reaches this server; when the old one did and the new one does not, the change is rolled back.",
    ),
    setting(
        "data_dir",
        Kind::Path,
        "`\"./kabar-data\"`",
        Restart,
        "Holds `kabar.db` (SQLite), `media/` and the admin socket `admin.sock`. Must be writable.",
    ),
    setting(
        "storage.engine",
        Kind::OneOf(&["sqlite", "postgres"]),
        "`\"sqlite\"`",
        Restart,
        "Where the data lives: `sqlite`, the embedded database `kabar.db` in the data directory; or `postgres`, the database at `storage.postgres.url` (which several Kabar processes may share). `kabar migrate` copies an embedded installation into PostgreSQL.",
    ),
    setting(
        "storage.postgres.url",
        Kind::PostgresUrl,
        "unset",
        Restart,
        "The PostgreSQL database, e.g. `postgres://kabar:PASSWORD@db.example.org:5432/kabar`. Needed with `storage.engine = \"postgres\"`. The schema is created or migrated at start. Kabar starts only if the database answers; while it is down later, `/ready` says so and requests that need it get `503` with `Retry-After`, and service resumes by itself when it is back.",
    ),
    setting(
        "storage.postgres.pool_size",
        int(1, 1000),
        "`16`",
        Restart,
        "Connections for reads (writes use one more, with group commit).",
    ),
    setting(
        "bus.engine",
        Kind::OneOf(&["local", "nats"]),
        "`\"local\"`",
        Restart,
        "How this node hears of other nodes' commits at once: `local` for a single node (nothing to hear), `nats` for several nodes on one PostgreSQL database, through the NATS servers at `bus.nats.urls`. The store stays the source of truth: a message lost on the bus delays a delivery by at most `bus.catch_up_interval_ms`, never loses or reorders one.",
    ),
    setting(
        "bus.nats.urls",
        Kind::NatsUrls,
        "`[]`",
        Restart,
        "The NATS servers, e.g. `[\"nats://10.0.0.5:4222\"]`; needed with `bus.engine = \"nats\"`. Kabar starts only if one answers; while NATS is away later it reconnects by itself and `/ready` reports the node not ready.",
    ),
    setting(
        "bus.subject_prefix",
        Kind::Token,
        "`\"kabar\"`",
        Restart,
        "The NATS subjects this cluster uses start with it, so several clusters can share a NATS server.",
    ),
    setting(
        "bus.node_name",
        Kind::Token,
        "the host name",
        Restart,
        "This node's name among the cluster's nodes (in logs, on the bus and in `kabar admin status`). Give each node its own.",
    ),
    setting(
        "bus.catch_up_interval_ms",
        int(10, 600_000),
        "`250`",
        Restart,
        "How often this node reads the stream for commits it was not told of (another process's, or a lost bus message): the bound on how late a change made through another node can reach this node's clients when the bus fails.",
    ),
    setting(
        "bus.rate_limits",
        Kind::OneOf(&["share", "per_node"]),
        "`\"share\"`",
        Restart,
        "How the nodes of a cluster hold the rate limits (`admission.*`, `limits.to_device_messages_per_second`), which are configured for the whole server: `share`, each node enforces its part, the limit divided by the number of live nodes (heard on the bus within 3 s), right behind a balancer that spreads every client's requests over the nodes (round-robin, least connections); `per_node`, each node enforces the whole limit, right behind a balancer that sends each client address to one node (`balance source`, `ip_hash`). Concurrency limits (connections, downloads per address) and load shedding are always per node.",
    ),
    setting(
        "log",
        Kind::LogFilter,
        "`\"info\"`",
        Live,
        "Log filter (`error` … `trace`, or a tracing directive such as `info,kabar_core=debug`). `RUST_LOG` overrides it at start. The ruma libraries `ruma_state_res` and `ruma_common`, which log or open spans on hot paths at `info`, are kept at `warn` unless the filter names them.",
    ),
    setting(
        "log_format",
        Kind::OneOf(&["text", "json"]),
        "`\"text\"`",
        Restart,
        "`text` for people, `json` (one object per line) for log collectors. Every request's log lines carry its `request_id`, which is also returned in the `X-Request-Id` header.",
    ),
    setting(
        "shutdown_deadline_ms",
        int(100, 600_000),
        "`10000`",
        Live,
        "On SIGTERM or Ctrl-C: how long requests in flight may take to finish. Waiting syncs are answered at once; writes in flight complete; then the process exits.",
    ),
    setting(
        "metrics_listen",
        Kind::SocketAddr,
        "unset (off)",
        Restart,
        "Where Prometheus scrapes `GET /metrics`. Port 0 picks a free port; the bound address is printed as `kabar metrics on http://ADDR/metrics`. Keep it off public networks (a public address is warned about). Must differ from every `listen` address.",
    ),
    setting(
        "registration.mode",
        Kind::OneOf(&["auto", "open", "token", "closed"]),
        "`\"auto\"`",
        Live,
        "`auto`: open while every listener is on loopback, otherwise a registration token is required; `open`: anyone may register; `token`: a registration token is required; `closed`: nobody may register.",
    ),
    setting(
        "registration.allow_open_on_public_address",
        Kind::Bool,
        "`false`",
        Live,
        "`mode = \"open\"` on a non-loopback listener is refused unless this is `true`: an open server on the internet is a spam relay within hours.",
    ),
    setting(
        "registration.reserved_localparts",
        Kind::Localparts,
        "`[\"admin\", \"administrator\", \"root\", \"postmaster\", \"abuse\", \"support\", \"security\", \"hostmaster\", \"webmaster\", \"noreply\", \"kabar\"]`",
        Live,
        "User names nobody may register (an operator can still create them with `kabar admin create-user`), so that nobody can pose as the server's staff. Names starting with `_` (reserved for bridges) are refused too.",
    ),
    setting(
        "rooms.default_version",
        Kind::OneOf(&["10", "11", "12"]),
        "`\"12\"`",
        Restart,
        "Room version for new rooms.",
    ),
    setting(
        "rooms.cached_state_entries",
        int(1_000, MAX),
        "`2000000`",
        Restart,
        "State entries (a big room's are mostly its members) the rooms kept in memory may hold; past it, loading a room drops the least recently used rooms nobody is using, which are read again from the store when next used. A room in use is never dropped. The channels' view counters keep at most as many subscribers the same way. ARCHITECTURE.md gives the memory per entry.",
    ),
    setting(
        "limits.max_request_body_bytes",
        int(65_536, MAX),
        "`67108864`",
        Restart,
        "Largest request body of any kind; larger is `413 M_TOO_LARGE`. The JSON and upload limits must not exceed it.",
    ),
    setting(
        "limits.max_json_body_bytes",
        int(65_536, MAX),
        "`1048576`",
        Restart,
        "Largest JSON request body (at least one event's worth).",
    ),
    setting(
        "limits.max_upload_bytes",
        int(1, MAX),
        "`52428800`",
        Restart,
        "Largest media upload. At most `max_request_body_bytes`.",
    ),
    setting(
        "limits.header_read_timeout_ms",
        int(1_000, 600_000),
        "`10000`",
        Restart,
        "How long a client may take to send a request's headers; slower connections are closed (a slowloris defence).",
    ),
    setting(
        "limits.max_connections_per_address",
        int(0, 1_000_000),
        "`1024`",
        Restart,
        "Open connections one client address may hold (an IPv6 client counts by its /64); more are closed at once. 0 turns the limit off. Addresses in `unlimited_addresses` are not limited.",
    ),
    setting(
        "limits.unlimited_addresses",
        Kind::IpAddrs,
        "`[\"127.0.0.1\", \"::1\"]`",
        Restart,
        "Client addresses that `max_connections_per_address` and `media.max_downloads_per_address` do not limit: a reverse proxy speaks for every client it serves (an IPv6 entry covers its /64). Add the proxy's address when it runs on another machine.",
    ),
    setting(
        "limits.to_device_messages_per_second",
        int(1, 1_000_000),
        "`1000`",
        Restart,
        "Send-to-device messages one user may queue per second, sustained (a message to `*` counts once per device).",
    ),
    setting(
        "limits.to_device_burst",
        int(1, 1_000_000),
        "`20000`",
        Restart,
        "Send-to-device messages one user may queue in a burst (sharing a room key with every device of a big encrypted room).",
    ),
    setting(
        "password_hashing.memory_kib",
        int(19_456, 4_194_304),
        "`19456`",
        Restart,
        "argon2id memory cost (19456 is OWASP's minimum).",
    ),
    setting("password_hashing.iterations", int(2, 100), "`2`", Restart, "argon2id passes."),
    setting(
        "password_hashing.threads",
        int(0, 1024),
        "`0`",
        Restart,
        "Threads that hash passwords (0: one per core).",
    ),
    setting(
        "password_hashing.queue",
        int(1, 1_000_000),
        "`256`",
        Live,
        "Hashes that may wait for a thread; past this, clients get `M_LIMIT_EXCEEDED` with `retry_after_ms`.",
    ),
    setting(
        "password_hashing.max_queue_delay_ms",
        int(1, 600_000),
        "`2000`",
        Live,
        "The longest a hash may wait for a thread. A sign-up or login predicted to wait longer is refused at once with `M_LIMIT_EXCEEDED` and the time the queue ahead needs to drain; the first step of a sign-up is refused the same way, so a client is told before it starts.",
    ),
    setting(
        "password_hashing.priority",
        Kind::OneOf(&["idle", "low", "normal"]),
        "`\"idle\"`",
        Restart,
        "CPU priority of the hashing threads: `idle` (Linux's idle class: hashing uses only CPU nothing else wants, so people already signed in are served first), `low` (nice 19), `normal`.",
    ),
    setting(
        "media.legacy_unauthenticated",
        Kind::OneOf(&["frozen", "all", "off"]),
        "`\"frozen\"`",
        Restart,
        "The unauthenticated `/_matrix/media/v3` downloads and thumbnails (deprecated by Matrix 1.11's freeze): `frozen` serves only media uploaded before this server first ran a version with authenticated media, `all` serves everything, `off` nothing (clients use `/_matrix/client/v1/media`).",
    ),
    setting(
        "media.max_downloads_per_address",
        int(1, 100_000),
        "`16`",
        Restart,
        "Media downloads one client address may have in flight; more are refused with `M_LIMIT_EXCEEDED`. A download from `media.directory` streams with a small buffer; one from the database (`media.storage = \"database\"`) holds the whole file in memory while it is sent.",
    ),
    setting(
        "media.storage",
        Kind::OneOf(&["directory", "database"]),
        "`\"directory\"`",
        Restart,
        "Where uploaded files live: `directory`, files in `media.directory` (several nodes share media only if they share that directory, for example over NFS); `database`, in the PostgreSQL database (`storage.engine = \"postgres\"`), which every node reaches with nothing else shared. Thumbnails are cached in each node's data directory either way.",
    ),
    setting(
        "media.directory",
        Kind::Path,
        "`<data_dir>/media`",
        Restart,
        "The directory of uploaded files with `media.storage = \"directory\"`.",
    ),
    setting(
        "user_directory.search_all_users",
        Kind::Bool,
        "`false`",
        Restart,
        "`false`: the user directory finds only users who share a room with the searcher or are in a public room; `true`: every user on the server.",
    ),
    setting(
        "voip.turn_uris",
        Kind::TurnUris,
        "`[]`",
        Restart,
        "TURN servers handed to clients for calls (`GET /voip/turnServer`), e.g. `[\"turn:turn.example.org:3478?transport=udp\"]`. Empty: clients are told of none.",
    ),
    setting(
        "voip.turn_shared_secret",
        Kind::Secret,
        "unset",
        Restart,
        "The secret shared with the TURN server (coturn's `static-auth-secret`), from which time-limited credentials are made. Needed with `turn_uris`.",
    ),
    setting(
        "voip.turn_user_lifetime_ms",
        int(60_000, 604_800_000),
        "`86400000`",
        Restart,
        "How long handed-out TURN credentials stay valid.",
    ),
    setting(
        "admission.register.per_address_per_minute",
        int(0, U32),
        "`30`",
        Live,
        "Sign-ups one client address may complete per minute, sustained (an IPv6 client counts by its /64). The attempt that completes authentication counts. 0 turns the limit off.",
    ),
    setting(
        "admission.register.per_address_burst",
        int(0, U32),
        "`10`",
        Live,
        "Sign-ups one address may make in a burst before the sustained rate applies. At least 1 when the rate is set.",
    ),
    setting(
        "admission.register.global_per_second",
        int(0, U32),
        "`0`",
        Live,
        "Sign-ups per second for the whole server. 0: no fixed limit; the measured capacity of the hashing pool sets the pace.",
    ),
    setting(
        "admission.register.global_burst",
        int(0, U32),
        "`100`",
        Live,
        "Burst for the global limit. At least 1 when the global rate is set.",
    ),
    setting(
        "admission.login.per_address_per_minute",
        int(0, U32),
        "`30`",
        Live,
        "The same as for sign-ups, for password logins (every attempt counts, right or wrong).",
    ),
    setting(
        "admission.login.per_address_burst",
        int(0, U32),
        "`10`",
        Live,
        "Burst of logins from one address.",
    ),
    setting(
        "admission.login.global_per_second",
        int(0, U32),
        "`0`",
        Live,
        "Logins per second for the whole server (0: no fixed limit).",
    ),
    setting(
        "admission.login.global_burst",
        int(0, U32),
        "`100`",
        Live,
        "Burst for the global login limit.",
    ),
    setting(
        "work.initial_sync.slots",
        int(0, 4096),
        "`0`",
        Live,
        "Initial and full-state syncs computed at once (0: one per core).",
    ),
    setting(
        "work.initial_sync.max_queued",
        int(0, 1_000_000),
        "`1024`",
        Live,
        "Initial syncs that may wait for a slot.",
    ),
    setting(
        "work.initial_sync.max_queue_delay_ms",
        int(1, 600_000),
        "`10000`",
        Live,
        "Longest predicted wait before an initial sync is refused with `M_LIMIT_EXCEEDED`.",
    ),
    setting("work.join.slots", int(0, 4096), "`64`", Live, "Room joins processed at once."),
    setting("work.join.max_queued", int(0, 1_000_000), "`4096`", Live, "Joins that may wait."),
    setting(
        "work.join.max_queue_delay_ms",
        int(1, 600_000),
        "`5000`",
        Live,
        "Longest predicted wait for a join.",
    ),
    setting(
        "work.thumbnail.slots",
        int(0, 4096),
        "`0`",
        Live,
        "Thumbnails generated at once (0: one per core).",
    ),
    setting(
        "work.thumbnail.max_queued",
        int(0, 1_000_000),
        "`64`",
        Live,
        "Thumbnails that may wait.",
    ),
    setting(
        "work.thumbnail.max_queue_delay_ms",
        int(1, 600_000),
        "`5000`",
        Live,
        "Longest predicted wait for a thumbnail.",
    ),
];

/// The setting at `key`.
pub fn setting_at(key: &str) -> Option<&'static Setting> {
    SETTINGS.iter().find(|s| s.key == key)
}

/// Whether `key` names a table of settings (`admission`, `work.join`, ...).
pub fn is_section(key: &str) -> bool {
    SETTINGS
        .iter()
        .any(|s| s.key.len() > key.len() && s.key.starts_with(key) && s.key.as_bytes()[key.len()] == b'.')
}

/// Every key and section name, for suggestions.
pub fn all_names() -> impl Iterator<Item = String> {
    SETTINGS.iter().flat_map(|s| {
        let parts: Vec<&str> = s.key.split('.').collect();
        (1..=parts.len()).map(move |n| parts[..n].join("."))
    })
}

/// The settings table of `docs/config.md`.
pub fn reference_table() -> String {
    let mut out = String::from("| key | type | default | on reload | meaning |\n| --- | --- | --- | --- | --- |\n");
    for s in SETTINGS {
        let apply = match s.apply {
            Apply::Live => "applied",
            Apply::Restart => "restart",
        };
        out.push_str(&format!(
            "| `{}` | {} | {} | {} | {} |\n",
            s.key,
            s.kind.describe(),
            s.default,
            apply,
            s.doc
        ));
    }
    out
}
