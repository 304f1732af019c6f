//! The configuration file: its types ([`Config`]), the reference of every
//! setting ([`schema`]) and the checks that refuse a bad file ([`check`]).
//! Every key has a default, so no file is needed.

pub mod check;
pub mod schema;

use std::{
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::{Deserialize, Deserializer, Serialize};

pub use check::{Problem, Problems, Severity};

/// Kabar's configuration (`kabar.toml`). Reference: `docs/config.md`,
/// generated from [`schema::SETTINGS`].
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server_name: String,
    #[serde(deserialize_with = "one_or_many")]
    pub listen: Vec<SocketAddr>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_base_url: Option<String>,
    pub data_dir: PathBuf,
    pub log: String,
    pub log_format: String,
    pub shutdown_deadline_ms: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
    pub registration: RegistrationConfig,
    pub rooms: RoomsConfig,
    pub limits: LimitsConfig,
    pub password_hashing: PasswordHashingConfig,
    pub admission: AdmissionConfig,
    pub work: WorkConfig,
    pub media: MediaConfig,
    pub user_directory: UserDirectoryConfig,
    pub voip: VoipConfig,
    pub storage: StorageConfig,
    pub bus: BusConfig,
}

/// How nodes hear of each other's commits (see `kabar_bus`).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BusConfig {
    pub engine: String,
    pub nats: NatsConfig,
    pub subject_prefix: String,
    pub node_name: String,
    pub catch_up_interval_ms: u64,
    /// `share` or `per_node`: how the nodes hold the configured rate limits.
    pub rate_limits: String,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    pub urls: Vec<String>,
}

impl Default for BusConfig {
    fn default() -> Self {
        Self {
            engine: "local".into(),
            nats: NatsConfig::default(),
            subject_prefix: "kabar".into(),
            node_name: default_node_name(),
            catch_up_interval_ms: 250,
            rate_limits: "share".into(),
        }
    }
}

/// The host name, made a valid node name; `kabar` if there is none.
fn default_node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let name: String = host
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .take(64)
        .collect();
    if name.is_empty() { "kabar".into() } else { name }
}

/// Where the data lives: the embedded SQLite file in the data directory, or
/// a PostgreSQL database.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    pub engine: String,
    pub postgres: PostgresConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PostgresConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub pool_size: u32,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            engine: "sqlite".into(),
            postgres: PostgresConfig::default(),
        }
    }
}

impl Default for PostgresConfig {
    fn default() -> Self {
        Self { url: None, pool_size: 16 }
    }
}

/// `listen = "addr"` or `listen = ["addr", ...]`.
fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<SocketAddr>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(SocketAddr),
        Many(Vec<SocketAddr>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(a) => vec![a],
        OneOrMany::Many(v) => v,
    })
}

/// Rate limits for newcomers, per client address and for the whole server.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdmissionConfig {
    pub register: RateLimitConfig,
    pub login: RateLimitConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    pub per_address_per_minute: u32,
    pub per_address_burst: u32,
    pub global_per_second: u32,
    pub global_burst: u32,
}

/// Bounded classes of expensive work. Unset values take each class's default.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct WorkConfig {
    pub initial_sync: WorkClassConfig,
    pub join: WorkClassConfig,
    pub thumbnail: WorkClassConfig,
}

#[derive(Debug, Clone, Copy, PartialEq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct WorkClassConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub slots: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queued: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queue_delay_ms: Option<u64>,
}

/// A work class's settings once defaults are filled in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WorkClassLimits {
    pub slots: usize,
    pub max_queued: usize,
    pub max_queue_delay_ms: u64,
}

/// Each class's defaults (0 slots: one per core).
pub const INITIAL_SYNC_DEFAULTS: WorkClassLimits = WorkClassLimits {
    slots: 0,
    max_queued: 1024,
    max_queue_delay_ms: 10_000,
};
pub const JOIN_DEFAULTS: WorkClassLimits = WorkClassLimits {
    slots: 64,
    max_queued: 4096,
    max_queue_delay_ms: 5_000,
};
pub const THUMBNAIL_DEFAULTS: WorkClassLimits = WorkClassLimits {
    slots: 0,
    max_queued: 64,
    max_queue_delay_ms: 5_000,
};

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrationConfig {
    pub mode: String,
    pub allow_open_on_public_address: bool,
    pub reserved_localparts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MediaConfig {
    pub legacy_unauthenticated: String,
    pub max_downloads_per_address: usize,
    pub storage: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub directory: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct UserDirectoryConfig {
    pub search_all_users: bool,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct VoipConfig {
    pub turn_uris: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub turn_shared_secret: Option<String>,
    pub turn_user_lifetime_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RoomsConfig {
    pub default_version: String,
    pub cached_state_entries: usize,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_request_body_bytes: usize,
    pub max_json_body_bytes: usize,
    pub max_upload_bytes: usize,
    pub header_read_timeout_ms: u64,
    pub max_connections_per_address: usize,
    pub unlimited_addresses: Vec<IpAddr>,
    pub to_device_messages_per_second: u32,
    pub to_device_burst: u32,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PasswordHashingConfig {
    pub memory_kib: u32,
    pub iterations: u32,
    pub threads: usize,
    pub queue: usize,
    pub max_queue_delay_ms: u64,
    pub priority: String,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            server_name: "localhost".into(),
            listen: vec!["127.0.0.1:8008".parse().expect("valid address")],
            public_base_url: None,
            data_dir: PathBuf::from("./kabar-data"),
            log: "info".into(),
            log_format: "text".into(),
            shutdown_deadline_ms: 10_000,
            metrics_listen: None,
            registration: RegistrationConfig::default(),
            rooms: RoomsConfig::default(),
            limits: LimitsConfig::default(),
            password_hashing: PasswordHashingConfig::default(),
            admission: AdmissionConfig::default(),
            work: WorkConfig::default(),
            media: MediaConfig::default(),
            user_directory: UserDirectoryConfig::default(),
            voip: VoipConfig::default(),
            storage: StorageConfig::default(),
            bus: BusConfig::default(),
        }
    }
}

/// User names reserved by default: the names people trust as a server's staff.
pub const RESERVED_LOCALPARTS: &[&str] = &[
    "admin",
    "administrator",
    "root",
    "postmaster",
    "abuse",
    "support",
    "security",
    "hostmaster",
    "webmaster",
    "noreply",
    "kabar",
];

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            legacy_unauthenticated: "frozen".into(),
            max_downloads_per_address: 16,
            storage: "directory".into(),
            directory: None,
        }
    }
}

impl Default for VoipConfig {
    fn default() -> Self {
        Self {
            turn_uris: vec![],
            turn_shared_secret: None,
            turn_user_lifetime_ms: 86_400_000,
        }
    }
}

impl Default for RegistrationConfig {
    fn default() -> Self {
        Self {
            mode: "auto".into(),
            allow_open_on_public_address: false,
            reserved_localparts: RESERVED_LOCALPARTS.iter().map(|s| s.to_string()).collect(),
        }
    }
}

impl Default for RoomsConfig {
    fn default() -> Self {
        Self {
            default_version: "12".into(),
            cached_state_entries: kabar_core::rooms::DEFAULT_CACHED_STATE_ENTRIES,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_request_body_bytes: 64 * 1024 * 1024,
            max_json_body_bytes: 1024 * 1024,
            max_upload_bytes: 50 * 1024 * 1024,
            header_read_timeout_ms: 10_000,
            max_connections_per_address: 1024,
            // A reverse proxy on the same machine speaks for every client.
            unlimited_addresses: vec![IpAddr::from([127, 0, 0, 1]), IpAddr::from(std::net::Ipv6Addr::LOCALHOST)],
            to_device_messages_per_second: 1000,
            to_device_burst: 20_000,
        }
    }
}

impl Default for PasswordHashingConfig {
    fn default() -> Self {
        Self {
            memory_kib: 19 * 1024,
            iterations: 2,
            threads: 0,
            queue: 256,
            max_queue_delay_ms: 2_000,
            priority: "idle".into(),
        }
    }
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        Self {
            per_address_per_minute: 30,
            per_address_burst: 10,
            global_per_second: 0,
            global_burst: 100,
        }
    }
}

impl WorkClassConfig {
    /// This class's settings with `defaults` filling what is unset; 0 slots
    /// means one per core.
    pub fn resolve(&self, defaults: WorkClassLimits, cores: usize) -> WorkClassLimits {
        let slots = self.slots.unwrap_or(defaults.slots);
        WorkClassLimits {
            slots: if slots == 0 { cores } else { slots },
            max_queued: self.max_queued.unwrap_or(defaults.max_queued),
            max_queue_delay_ms: self.max_queue_delay_ms.unwrap_or(defaults.max_queue_delay_ms),
        }
    }
}

/// Command-line settings that replace the file's.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub data_dir: Option<PathBuf>,
}

impl Overrides {
    pub fn apply(&self, config: &mut Config) {
        if let Some(l) = self.listen {
            config.listen = vec![l];
        }
        if let Some(d) = &self.data_dir {
            config.data_dir = d.clone();
        }
    }
}

/// Where a configuration comes from: a file (or none: all defaults) and the
/// command line's overrides. Reloads read the same source again.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    pub file: Option<PathBuf>,
    pub overrides: Overrides,
}

impl ConfigSource {
    /// Reads and checks the configuration. `Err` holds every problem found
    /// (errors, and warnings alongside them); `Ok` holds the configuration and
    /// its warnings.
    pub fn load(&self) -> Result<(Config, Problems), Problems> {
        let (text, origin) = match &self.file {
            None => (String::new(), "(defaults)".to_owned()),
            Some(p) => match std::fs::read_to_string(p) {
                Ok(t) => (t, p.display().to_string()),
                Err(e) => {
                    return Err(Problems::single(
                        p.display().to_string(),
                        Problem::error("", None, format!("cannot read the configuration file: {e}")),
                    ));
                }
            },
        };
        check::parse_and_check(&text, &origin, &self.overrides)
    }

    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }
}

impl Config {
    /// Every setting as `dotted.key -> TOML value`, for comparing two
    /// configurations key by key.
    pub fn flatten(&self) -> std::collections::BTreeMap<String, toml::Value> {
        fn walk(prefix: &str, v: &toml::Value, out: &mut std::collections::BTreeMap<String, toml::Value>) {
            match v {
                toml::Value::Table(t) => {
                    for (k, v) in t {
                        let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                        walk(&key, v, out);
                    }
                }
                other => {
                    out.insert(prefix.to_owned(), other.clone());
                }
            }
        }
        let mut out = std::collections::BTreeMap::new();
        walk("", &toml::Value::try_from(self).expect("a configuration serializes"), &mut out);
        out
    }

    /// This configuration as TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string(self).expect("a configuration serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(text: &str) -> Result<(Config, Problems), Problems> {
        check::parse_and_check(text, "kabar.toml", &Overrides::default())
    }

    #[test]
    fn defaults_are_valid_and_match_the_reference() {
        let (config, warnings) = check("").expect("an empty file is valid");
        assert_eq!(config, Config::default());
        assert!(warnings.items.is_empty(), "{warnings}");
        let flat = config.flatten();
        for key in flat.keys() {
            assert!(schema::setting_at(key).is_some(), "{key} is missing from the reference");
        }
        for setting in schema::SETTINGS {
            // Defaults written as TOML in backquotes must be the real ones.
            if let Some(literal) = setting.default.strip_prefix('`').and_then(|d| d.strip_suffix('`'))
                && !literal.contains('<')
            {
                let expected: toml::Value = toml::from_str::<toml::Table>(&format!("v = {literal}")).expect("default literal")["v"].clone();
                let actual = match flat.get(setting.key) {
                    Some(toml::Value::Array(a)) if a.len() == 1 => a[0].clone(),
                    Some(v) => v.clone(),
                    None => class_default(setting.key)
                        .unwrap_or_else(|| panic!("{} has a default in the reference but none in the code", setting.key)),
                };
                assert_eq!(actual, expected, "default of {}", setting.key);
            }
        }
    }

    /// A work class's default, which the code keeps outside `Config`.
    fn class_default(key: &str) -> Option<toml::Value> {
        let (class, field) = key.strip_prefix("work.")?.split_once('.')?;
        let limits = match class {
            "initial_sync" => INITIAL_SYNC_DEFAULTS,
            "join" => JOIN_DEFAULTS,
            "thumbnail" => THUMBNAIL_DEFAULTS,
            _ => return None,
        };
        let value = match field {
            "slots" => limits.slots as i64,
            "max_queued" => limits.max_queued as i64,
            "max_queue_delay_ms" => limits.max_queue_delay_ms as i64,
            _ => return None,
        };
        Some(toml::Value::Integer(value))
    }

    #[test]
    fn the_reference_in_docs_is_generated_from_the_code() {
        let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/config.md")).expect("docs/config.md");
        let start = doc.find("<!-- settings:begin -->\n").expect("begin marker") + "<!-- settings:begin -->\n".len();
        let end = doc.find("<!-- settings:end -->").expect("end marker");
        assert_eq!(
            &doc[start..end],
            schema::reference_table(),
            "docs/config.md is stale: replace its table with `kabar config-reference`"
        );
    }

    #[test]
    fn the_bus_settings_are_checked_alone_and_together() {
        let text = "[bus]\nengine = \"nats\"\nnats.urls = [\"http://nats.example.org\"]\nnode_name = \"node one\"\n";
        let problems = check(text).expect_err("two errors");
        let keys: Vec<&str> = problems.items.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["bus.nats.urls", "bus.node_name"], "{problems}");
        // Each value valid, the whole not: NATS for several nodes needs a shared database.
        let problems = check("[bus]\nengine = \"nats\"\n").expect_err("the whole is wrong");
        let shown = problems.to_string();
        assert!(
            shown.contains("bus.nats.urls") && shown.contains("no NATS server is named"),
            "{shown}"
        );
        assert!(shown.contains("needs storage.engine \"postgres\""), "{shown}");
        let good = "[storage]\nengine = \"postgres\"\npostgres.url = \"postgres://kabar@db/kabar\"\n[bus]\nengine = \"nats\"\nnats.urls = [\"nats://10.0.0.5:4222\"]\nnode_name = \"node-1\"\n";
        let config = check(good).expect("a valid cluster node");
        assert!(config.1.items.is_empty(), "{}", config.1);
        assert_eq!(config.0.bus.node_name, "node-1");
    }

    #[test]
    fn media_in_the_database_needs_postgres() {
        let problems = check("[media]\nstorage = \"database\"\n").expect_err("the embedded store holds no media");
        assert!(problems.to_string().contains("needs storage.engine \"postgres\""), "{problems}");
        let config =
            check("[storage]\nengine = \"postgres\"\npostgres.url = \"postgres://kabar@db/kabar\"\n[media]\nstorage = \"database\"\n")
                .expect("PostgreSQL holds media");
        assert_eq!(config.0.media.storage, "database");
    }

    #[test]
    fn every_problem_is_reported_with_its_line_and_key() {
        let text = "server_name = \"chat.example.org\"\n\n[admission.register]\nper_address_brust = 3\n\n[password_hashing]\nqueue = \"many\"\npriority = \"urgent\"\n\n[work.join]\nslots = -1\n";
        let problems = check(text).expect_err("four errors");
        let found: Vec<(String, Option<usize>)> = problems.items.iter().map(|p| (p.key.clone(), p.line)).collect();
        assert_eq!(
            found,
            vec![
                ("admission.register.per_address_brust".into(), Some(4)),
                ("password_hashing.priority".into(), Some(8)),
                ("password_hashing.queue".into(), Some(7)),
                ("work.join.slots".into(), Some(11)),
            ]
        );
        let shown = problems.to_string();
        assert!(shown.contains("kabar.toml:4: error: admission.register.per_address_brust: unknown key (did you mean `admission.register.per_address_burst`?)"), "{shown}");
        assert!(
            shown.contains("kabar.toml:7: error: password_hashing.queue: expected an integer, found a string"),
            "{shown}"
        );
        assert!(shown.contains("\"urgent\" is not one of idle, low, normal"), "{shown}");
        assert!(shown.contains("-1 is out of range: 0 to 4096"), "{shown}");
    }

    #[test]
    fn suggestions_find_typos_and_keys_in_the_wrong_table() {
        let hint = |text: &str| check(text).expect_err("refused").items[0].hint.clone().unwrap_or_default();
        assert_eq!(hint("sever_name = \"x\""), "did you mean `server_name`?");
        assert_eq!(hint("[registration]\nmdoe = \"open\""), "did you mean `registration.mode`?");
        assert_eq!(
            hint("per_address_burst = 3"),
            "did you mean `admission.register.per_address_burst`?"
        );
        assert_eq!(hint("[work.jion]\nslots = 1"), "did you mean `work.join`?");
        assert!(
            check("completely_unrelated_setting = 1").expect_err("refused").items[0]
                .hint
                .is_none()
        );
    }

    #[test]
    fn dangerous_combinations_are_refused() {
        for (text, key) in [
            ("listen = []", "listen"),
            ("listen = \"0.0.0.0:8008\"\n[registration]\nmode = \"open\"", "registration.mode"),
            (
                "[limits]\nmax_request_body_bytes = 100000\nmax_upload_bytes = 200000",
                "limits.max_upload_bytes",
            ),
            ("metrics_listen = \"127.0.0.1:8008\"", "metrics_listen"),
            (
                "[admission.login]\nglobal_per_second = 5\nglobal_burst = 0",
                "admission.login.global_burst",
            ),
        ] {
            let problems = check(text).expect_err(text);
            assert!(problems.items.iter().any(|p| p.key == key), "{text}: {problems}");
        }
        // A data directory whose admin socket path is too long for Unix sockets.
        let long = format!("data_dir = \"/tmp/{}\"", "d".repeat(100));
        let problems = check(&long).expect_err("socket path too long");
        assert!(
            problems
                .items
                .iter()
                .any(|p| p.key == "data_dir" && p.message.contains("Unix sockets allow")),
            "{problems}"
        );
        let opted_in = "listen = \"0.0.0.0:8008\"\n[registration]\nmode = \"open\"\nallow_open_on_public_address = true";
        let (_, warnings) = check(opted_in).expect("an explicit opt-in is allowed");
        assert!(
            warnings.items.iter().any(|p| p.key == "server_name"),
            "localhost on a public address is warned about"
        );
    }

    #[test]
    fn listen_takes_one_address_or_a_list_and_overrides_replace_it() {
        let (c, _) = check("listen = [\"127.0.0.1:8100\", \"[::1]:8100\"]").unwrap();
        assert_eq!(c.listen.len(), 2);
        let overrides = Overrides {
            listen: Some("127.0.0.1:0".parse().unwrap()),
            data_dir: None,
        };
        let (c, _) = check::parse_and_check("listen = [\"127.0.0.1:8100\"]", "x", &overrides).unwrap();
        assert_eq!(c.listen, vec!["127.0.0.1:0".parse::<SocketAddr>().unwrap()]);
    }

    #[test]
    fn work_classes_fill_unset_values_from_their_defaults() {
        let (c, _) = check("[work.join]\nslots = 8").unwrap();
        assert_eq!(
            c.work.join.resolve(JOIN_DEFAULTS, 2),
            WorkClassLimits {
                slots: 8,
                max_queued: 4096,
                max_queue_delay_ms: 5000
            }
        );
        assert_eq!(
            c.work.initial_sync.resolve(INITIAL_SYNC_DEFAULTS, 2).slots,
            2,
            "0 slots: one per core"
        );
    }
}
