//! Checking a configuration file: every problem at once, each with the file,
//! line and key it is about, and for a mistyped key the nearest valid one.
//!
//! The file is walked against [`SETTINGS`](super::schema::SETTINGS) before it
//! is turned into a [`Config`], so one run reports every unknown key, wrong
//! type and out-of-range value, not just the first. Then settings that are
//! valid alone but dangerous together are checked on the whole.

use std::{
    collections::HashMap,
    fmt,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};
use toml::{
    Spanned,
    de::{DeTable, DeValue, ValueDeserializer},
};

use super::{
    Config, Overrides,
    schema::{self, Kind, Setting},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    /// The configuration is refused.
    Error,
    /// Allowed, but probably not what the operator wants.
    Warning,
}

/// One thing wrong with a configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Problem {
    pub severity: Severity,
    /// The dotted key it is about (empty for the file as a whole).
    pub key: String,
    /// 1-based line in the file, when the key is written there.
    pub line: Option<usize>,
    pub message: String,
    /// What to write instead, when there is a likely answer.
    pub hint: Option<String>,
}

impl Problem {
    pub fn error(key: &str, line: Option<usize>, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Error,
            key: key.to_owned(),
            line,
            message: message.into(),
            hint: None,
        }
    }

    fn warning(key: &str, line: Option<usize>, message: impl Into<String>) -> Self {
        Self {
            severity: Severity::Warning,
            ..Self::error(key, line, message)
        }
    }

    fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }
}

/// The problems found in one configuration source.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Problems {
    /// The file they were found in (or `(defaults)`).
    pub origin: String,
    pub items: Vec<Problem>,
}

impl Problems {
    pub fn single(origin: String, problem: Problem) -> Self {
        Self {
            origin,
            items: vec![problem],
        }
    }

    pub fn has_errors(&self) -> bool {
        self.items.iter().any(|p| p.severity == Severity::Error)
    }

    pub fn errors(&self) -> usize {
        self.items.iter().filter(|p| p.severity == Severity::Error).count()
    }
}

impl Problems {
    /// One problem as `file:line: error: key: message (hint)`.
    pub fn line(&self, p: &Problem) -> String {
        let mut out = self.origin.clone();
        if let Some(line) = p.line {
            out.push_str(&format!(":{line}"));
        }
        let severity = match p.severity {
            Severity::Error => "error",
            Severity::Warning => "warning",
        };
        out.push_str(&format!(": {severity}: "));
        if !p.key.is_empty() {
            out.push_str(&format!("{}: ", p.key));
        }
        out.push_str(&p.message);
        if let Some(hint) = &p.hint {
            out.push_str(&format!(" ({hint})"));
        }
        out
    }
}

impl fmt::Display for Problems {
    /// One line per problem.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.items {
            writeln!(f, "{}", self.line(p))?;
        }
        Ok(())
    }
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text.as_bytes()[..offset.min(text.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

/// The nearest valid key or section to a key nobody knows.
fn nearest_name(unknown: &str) -> Option<String> {
    let last = unknown.rsplit('.').next().unwrap_or(unknown);
    let mut best: Option<(usize, String)> = None;
    for candidate in schema::all_names() {
        let candidate_last = candidate.rsplit('.').next().unwrap_or(&candidate);
        // The right name in the wrong table is as good as a one-letter slip.
        let distance = if candidate_last == last {
            1
        } else {
            strsim::levenshtein(unknown, &candidate)
        };
        if best.as_ref().is_none_or(|(d, _)| distance < *d) {
            best = Some((distance, candidate));
        }
    }
    let (distance, name) = best?;
    (distance <= (unknown.len() / 3).max(2)).then_some(name)
}

/// Walks the file's tables against the reference, noting each key's line.
struct Walker<'t> {
    text: &'t str,
    lines: HashMap<String, usize>,
    problems: Vec<Problem>,
}

impl Walker<'_> {
    fn table(&mut self, prefix: &str, table: &DeTable<'_>) {
        for (key, value) in table.iter() {
            let full = if prefix.is_empty() {
                key.get_ref().to_string()
            } else {
                format!("{prefix}.{}", key.get_ref())
            };
            let line = line_of(self.text, key.span().start);
            self.lines.insert(full.clone(), line);
            if let Some(setting) = schema::setting_at(&full) {
                if let Err(message) = check_value(setting, value) {
                    self.problems.push(Problem::error(&full, Some(line), message));
                }
            } else if schema::is_section(&full) {
                match value.get_ref() {
                    DeValue::Table(inner) => self.table(&full, inner),
                    other => self.problems.push(Problem::error(
                        &full,
                        Some(line),
                        format!("is a table of settings, not {}", a(other.type_str())),
                    )),
                }
            } else {
                let mut problem = Problem::error(&full, Some(line), "unknown key");
                if let Some(near) = nearest_name(&full) {
                    problem = problem.hint(format!("did you mean `{near}`?"));
                }
                self.problems.push(problem);
            }
        }
    }
}

/// `kind` with its article: "an integer", "a string".
fn a(kind: &str) -> String {
    if kind.starts_with(['a', 'e', 'i', 'o', 'u']) {
        format!("an {kind}")
    } else {
        format!("a {kind}")
    }
}

fn integer(value: &Spanned<DeValue<'_>>) -> Result<i64, String> {
    match value.get_ref() {
        DeValue::Integer(_) => i64::deserialize(ValueDeserializer::from(value.clone())).map_err(|e| e.message().to_owned()),
        other => Err(format!("expected an integer, found {}", a(other.type_str()))),
    }
}

fn string<'v>(value: &'v Spanned<DeValue<'_>>) -> Result<&'v str, String> {
    value
        .get_ref()
        .as_str()
        .ok_or_else(|| format!("expected a string, found {}", a(value.get_ref().type_str())))
}

fn strings<'v>(value: &'v Spanned<DeValue<'_>>) -> Result<Vec<&'v str>, String> {
    match value.get_ref() {
        DeValue::Array(items) => items.iter().map(string).collect(),
        other => Err(format!("expected a list of strings, found {}", a(other.type_str()))),
    }
}

fn socket_addr(s: &str) -> Result<SocketAddr, String> {
    s.parse()
        .map_err(|_| format!("{s:?} is not an address of the form ip:port (for example \"127.0.0.1:8008\" or \"[::]:8008\")"))
}

/// Checks one value against its setting; the message says what is wrong.
fn check_value(setting: &Setting, value: &Spanned<DeValue<'_>>) -> Result<(), String> {
    match setting.kind {
        Kind::Integer { min, max } => {
            let n = integer(value)?;
            if n < min || n > max {
                return Err(if max == i64::MAX {
                    format!("{n} is out of range: at least {min}")
                } else {
                    format!("{n} is out of range: {min} to {max}")
                });
            }
        }
        Kind::Bool => {
            if !value.get_ref().is_bool() {
                return Err(format!("expected true or false, found {}", a(value.get_ref().type_str())));
            }
        }
        Kind::OneOf(options) => {
            let s = string(value)?;
            if !options.contains(&s) {
                return Err(format!("{s:?} is not one of {}", options.join(", ")));
            }
        }
        Kind::SocketAddr => {
            socket_addr(string(value)?)?;
        }
        Kind::SocketAddrs => match value.get_ref() {
            DeValue::Array(items) => {
                for item in items.iter() {
                    socket_addr(string(item)?)?;
                }
            }
            _ => {
                socket_addr(string(value)?)?;
            }
        },
        Kind::Path => {
            if string(value)?.is_empty() {
                return Err("an empty path".into());
            }
        }
        Kind::HttpUrl => {
            let s = string(value)?;
            let url = url::Url::parse(s).map_err(|e| format!("{s:?} is not a URL: {e}"))?;
            if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
                return Err(format!("{s:?} must be an http:// or https:// URL with a host"));
            }
            if url.query().is_some() || url.fragment().is_some() {
                return Err(format!("{s:?} must not have a query or fragment"));
            }
        }
        Kind::ServerName => {
            let s = string(value)?;
            if ruma::ServerName::parse(s).is_err() {
                return Err(format!(
                    "{s:?} is not a valid server name (a host name or IP, with an optional port)"
                ));
            }
        }
        Kind::LogFilter => {
            let s = string(value)?;
            tracing_subscriber::EnvFilter::builder()
                .parse(s)
                .map_err(|e| format!("{s:?} is not a log filter: {e}"))?;
        }
        Kind::Secret => {
            if string(value)?.is_empty() {
                return Err("an empty secret".into());
            }
        }
        Kind::TurnUris => {
            for item in strings(value)? {
                if !(item.starts_with("turn:") || item.starts_with("turns:")) || item.len() < 7 {
                    return Err(format!("{item:?} is not a turn: or turns: URI"));
                }
            }
        }
        Kind::PostgresUrl => {
            let s = string(value)?;
            // Not echoed: the URL may hold a password.
            let url = url::Url::parse(s).map_err(|e| format!("not a URL: {e}"))?;
            if !matches!(url.scheme(), "postgres" | "postgresql") || url.host().is_none() {
                return Err("must be a postgres:// URL with a host (postgres://user:password@host:port/database)".into());
            }
        }
        Kind::NatsUrls => {
            for item in strings(value)? {
                let url = url::Url::parse(item).map_err(|e| format!("{item:?} is not a URL: {e}"))?;
                if url.scheme() != "nats" || url.host().is_none() {
                    return Err(format!("{item:?} is not a nats:// URL with a host (nats://host:4222)"));
                }
            }
        }
        Kind::Token => {
            let s = string(value)?;
            if s.is_empty() || s.len() > 64 || !s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
                return Err(format!("{s:?} must be 1 to 64 letters, digits, - or _"));
            }
        }
        Kind::IpAddrs => {
            for item in strings(value)? {
                if item.parse::<std::net::IpAddr>().is_err() {
                    return Err(format!("{item:?} is not an IP address"));
                }
            }
        }
        Kind::Localparts => {
            for item in strings(value)? {
                // The server name's length does not matter here, only the characters.
                if !kabar_domain::names::is_valid_new_localpart(item, "") {
                    return Err(format!("{item:?} is not a user name (lower-case a-z, 0-9 and . _ = - / +)"));
                }
            }
        }
    }
    Ok(())
}

/// Parses `text` (from `origin`) and checks it, with the command line's
/// `overrides` applied before the checks of the whole.
pub fn parse_and_check(text: &str, origin: &str, overrides: &Overrides) -> Result<(Config, Problems), Problems> {
    let mut problems = Problems {
        origin: origin.to_owned(),
        items: vec![],
    };
    let (document, syntax) = DeTable::parse_recoverable(text);
    if !syntax.is_empty() {
        problems.items = syntax
            .iter()
            .map(|e| {
                Problem::error(
                    "",
                    e.span().map(|s| line_of(text, s.start)),
                    format!("not valid TOML: {}", e.message()),
                )
            })
            .collect();
        return Err(problems);
    }
    let mut walker = Walker {
        text,
        lines: HashMap::new(),
        problems: vec![],
    };
    walker.table("", document.get_ref());
    problems.items = walker.problems;
    if problems.has_errors() {
        return Err(problems);
    }
    let mut config = match Config::deserialize(toml::de::Deserializer::from(document)) {
        Ok(c) => c,
        Err(e) => {
            // The walk checks what this would; reaching here is a gap in the reference.
            problems
                .items
                .push(Problem::error("", e.span().map(|s| line_of(text, s.start)), e.message().to_owned()));
            return Err(problems);
        }
    };
    overrides.apply(&mut config);
    problems.items.extend(check_whole(&config, &walker.lines));
    if problems.has_errors() {
        Err(problems)
    } else {
        Ok((config, problems))
    }
}

fn is_public(addr: &SocketAddr) -> bool {
    !addr.ip().is_loopback()
}

/// Whether two listeners would want the same port.
fn overlaps(a: &SocketAddr, b: &SocketAddr) -> bool {
    a.port() != 0 && a.port() == b.port() && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// Settings that are valid one by one but wrong together, and the data
/// directory's state on disk.
pub fn check_whole(config: &Config, lines: &HashMap<String, usize>) -> Vec<Problem> {
    let at = |key: &str| lines.get(key).copied();
    let mut out = vec![];
    if config.storage.engine == "postgres" && config.storage.postgres.url.is_none() {
        out.push(
            Problem::error(
                "storage.postgres.url",
                at("storage.engine"),
                "storage.engine is \"postgres\" but no database is named",
            )
            .hint("set storage.postgres.url, for example \"postgres://kabar@127.0.0.1:5432/kabar\""),
        );
    }
    if config.bus.engine == "nats" && config.bus.nats.urls.is_empty() {
        out.push(
            Problem::error(
                "bus.nats.urls",
                at("bus.engine"),
                "bus.engine is \"nats\" but no NATS server is named",
            )
            .hint("set bus.nats.urls, for example [\"nats://127.0.0.1:4222\"]"),
        );
    }
    if config.bus.engine == "nats" && config.storage.engine != "postgres" {
        out.push(
            Problem::error(
                "bus.engine",
                at("bus.engine"),
                "several nodes need one shared database: bus.engine \"nats\" needs storage.engine \"postgres\"",
            )
            .hint("set storage.engine = \"postgres\", or bus.engine = \"local\" for a single node"),
        );
    }
    if config.media.storage == "database" && config.storage.engine != "postgres" {
        out.push(
            Problem::error(
                "media.storage",
                at("media.storage"),
                "media.storage \"database\" keeps files in PostgreSQL: it needs storage.engine \"postgres\"",
            )
            .hint("set media.storage = \"directory\" for the embedded store"),
        );
    }
    if config.listen.is_empty() {
        out.push(
            Problem::error("listen", at("listen"), "no listener left: clients could not reach the server")
                .hint("give at least one address, for example \"127.0.0.1:8008\""),
        );
    }
    for addr in &config.listen {
        if let Some(why) = not_on_this_machine(addr) {
            out.push(Problem::error("listen", at("listen"), why));
        }
    }
    if let Some(addr) = &config.metrics_listen
        && let Some(why) = not_on_this_machine(addr)
    {
        out.push(Problem::error("metrics_listen", at("metrics_listen"), why));
    }
    for (i, a) in config.listen.iter().enumerate() {
        if config.listen[..i].iter().any(|b| overlaps(a, b)) {
            out.push(Problem::error(
                "listen",
                at("listen"),
                format!("{a} is listed twice or overlaps another listener"),
            ));
        }
    }
    if let Some(metrics) = &config.metrics_listen {
        if config.listen.iter().any(|l| overlaps(l, metrics)) {
            out.push(
                Problem::error(
                    "metrics_listen",
                    at("metrics_listen"),
                    format!("{metrics} is also a client listener; the two cannot share a port"),
                )
                .hint("give metrics its own port"),
            );
        }
        if is_public(metrics) {
            out.push(Problem::warning(
                "metrics_listen",
                at("metrics_listen"),
                format!("{metrics} is not a loopback address: anyone who reaches it can read the server's metrics"),
            ));
        }
    }
    let public = config.listen.iter().any(is_public);
    if config.registration.mode == "open" && public && !config.registration.allow_open_on_public_address {
        out.push(
            Problem::error(
                "registration.mode",
                at("registration.mode"),
                "registration is open to anyone while listening on a public address",
            )
            .hint(
                "use mode = \"token\" and `kabar admin create-registration-token`, or set registration.allow_open_on_public_address = true",
            ),
        );
    }
    let limits = &config.limits;
    for (key, value) in [
        ("limits.max_upload_bytes", limits.max_upload_bytes),
        ("limits.max_json_body_bytes", limits.max_json_body_bytes),
    ] {
        if value > limits.max_request_body_bytes {
            out.push(
                Problem::error(
                    key,
                    at(key),
                    format!(
                        "{value} is larger than limits.max_request_body_bytes ({}): such a request would be cut off before it is read",
                        limits.max_request_body_bytes
                    ),
                )
                .hint("raise limits.max_request_body_bytes or lower this"),
            );
        }
    }
    for name in ["register", "login"] {
        let r = if name == "register" {
            &config.admission.register
        } else {
            &config.admission.login
        };
        if r.per_address_per_minute > 0 && r.per_address_burst == 0 {
            let key = format!("admission.{name}.per_address_burst");
            out.push(Problem::error(
                &key,
                at(&key),
                "must be at least 1 when per_address_per_minute is set: nobody could ever get in",
            ));
        }
        if r.global_per_second > 0 && r.global_burst == 0 {
            let key = format!("admission.{name}.global_burst");
            out.push(Problem::error(
                &key,
                at(&key),
                "must be at least 1 when global_per_second is set: nobody could ever get in",
            ));
        }
    }
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
    if config.password_hashing.threads > cores * 4 {
        out.push(Problem::warning(
            "password_hashing.threads",
            at("password_hashing.threads"),
            format!(
                "{} hashing threads on {cores} cores only adds memory (each hash holds memory_kib)",
                config.password_hashing.threads
            ),
        ));
    }
    if public && config.server_name == "localhost" {
        out.push(Problem::warning(
            "server_name",
            at("server_name"),
            "\"localhost\" on a public listener: user ids will read @name:localhost, and server_name cannot change once users exist",
        ));
    }
    let voip = &config.voip;
    if !voip.turn_uris.is_empty() && voip.turn_shared_secret.is_none() {
        out.push(
            Problem::error(
                "voip.turn_shared_secret",
                at("voip.turn_uris"),
                "TURN servers are listed but no shared secret: clients would get credentials the TURN server refuses",
            )
            .hint("set voip.turn_shared_secret to the TURN server's static-auth-secret"),
        );
    }
    if let Some(problem) = data_dir_problem(&config.data_dir) {
        out.push(Problem::error("data_dir", at("data_dir"), problem));
    }
    // The admin socket lives in the data directory; Unix socket paths are
    // limited to 107 bytes, and a server without its way in must not start.
    let socket = config.data_dir.join(crate::admin::SOCKET_NAME);
    if socket.as_os_str().len() > MAX_SOCKET_PATH {
        out.push(
            Problem::error(
                "data_dir",
                at("data_dir"),
                format!(
                    "the admin socket {} would be {} bytes long; Unix sockets allow {MAX_SOCKET_PATH}",
                    socket.display(),
                    socket.as_os_str().len()
                ),
            )
            .hint("use a shorter data_dir path"),
        );
    }
    out
}

/// The longest path a Unix socket can be bound at (`sun_path` less its NUL).
const MAX_SOCKET_PATH: usize = 107;

/// Why nothing could listen on `addr`'s IP here, if so: the address
/// belongs to no interface of this machine (a typo, or another host's).
fn not_on_this_machine(addr: &SocketAddr) -> Option<String> {
    if addr.ip().is_unspecified() {
        return None;
    }
    match std::net::TcpListener::bind(SocketAddr::new(addr.ip(), 0)) {
        Err(e) if e.kind() == std::io::ErrorKind::AddrNotAvailable => Some(format!(
            "{} is not an address of this machine: nothing could listen there",
            addr.ip()
        )),
        _ => None,
    }
}

/// Why `dir` cannot hold the server's data, if it cannot: it must be a
/// directory this process can write to, or be creatable.
fn data_dir_problem(dir: &Path) -> Option<String> {
    let shown = dir.display();
    if dir.exists() {
        if !dir.is_dir() {
            return Some(format!("{shown} exists and is not a directory"));
        }
        return probe_write(dir).err().map(|e| format!("{shown} is not writable: {e}"));
    }
    // It will be created: its nearest existing ancestor must be writable.
    let mut ancestor: PathBuf = dir.to_owned();
    while !ancestor.exists() {
        match ancestor.parent() {
            Some(p) if !p.as_os_str().is_empty() => ancestor = p.to_owned(),
            _ => ancestor = PathBuf::from("."),
        }
    }
    if !ancestor.is_dir() {
        return Some(format!("{shown} cannot be created: {} is not a directory", ancestor.display()));
    }
    probe_write(&ancestor)
        .err()
        .map(|e| format!("{shown} cannot be created: {} is not writable: {e}", ancestor.display()))
}

/// Creates (and removes) a uniquely named file in `dir`.
fn probe_write(dir: &Path) -> std::io::Result<()> {
    tempfile::Builder::new().prefix(".kabar-write-check").tempfile_in(dir).map(drop)
}
