//! Changing the configuration of a running server, safely.
//!
//! A reload reads the file again and checks it whole; a file with any error
//! changes nothing. Of a good file, the settings marked live in the
//! reference are applied and the rest are reported as waiting for a restart,
//! never half-applied. After applying, the server probes itself (storage, its
//! listeners, the public URL) and compares with the same probes taken just
//! before: anything that worked before and fails after rolls the change back
//! to the last known good configuration by itself. The operator can also roll
//! back by hand to the configuration before the last applied reload.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::Arc,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use kabar_api::ServerInfo;
use kabar_core::{
    accounts::{Accounts, RegistrationPolicy},
    admission::RateLimits,
    health::Readiness,
    load::{Gate, GateLimits, LoadMetrics},
};
use serde::Serialize;
use tokio::sync::Mutex;

use crate::{
    config::{
        self, Config, ConfigSource, INITIAL_SYNC_DEFAULTS, JOIN_DEFAULTS, Problems, THUMBNAIL_DEFAULTS, WorkClassConfig, WorkClassLimits,
        schema::{self, Apply},
    },
    listeners::Listeners,
    logging::LogControl,
};

/// How many known-good configurations are kept for rolling back.
const KNOWN_GOOD_KEPT: usize = 16;
/// How long one self-probe may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(3);

pub fn rate_limits(c: &config::RateLimitConfig) -> RateLimits {
    RateLimits {
        per_address_per_minute: c.per_address_per_minute,
        per_address_burst: c.per_address_burst,
        global_per_second: c.global_per_second,
        global_burst: c.global_burst,
    }
}

/// Who may register under `config` (`auto`: open while every listener is on loopback).
pub fn registration_policy(config: &Config) -> RegistrationPolicy {
    match config.registration.mode.as_str() {
        "open" => RegistrationPolicy::Open,
        "token" => RegistrationPolicy::TokenRequired,
        "closed" => RegistrationPolicy::Closed,
        _ if config.listen.iter().all(|a| a.ip().is_loopback()) => RegistrationPolicy::Open,
        _ => RegistrationPolicy::TokenRequired,
    }
}

/// The URL clients are told to use: the configured one, or the first
/// listener's bound address.
pub fn public_base_url(config: &Config, listeners: &Listeners) -> String {
    let first = config.listen.first().and_then(|a| listeners.bound_for(*a).or(Some(*a)));
    match (&config.public_base_url, first) {
        (Some(url), _) => url.clone(),
        (None, Some(addr)) => format!("http://{addr}"),
        (None, None) => String::new(),
    }
}

fn gate_limits(limits: WorkClassLimits) -> GateLimits {
    GateLimits {
        slots: limits.slots,
        max_queued: limits.max_queued,
        max_queue_delay: Duration::from_millis(limits.max_queue_delay_ms),
    }
}

/// The bounded work classes a reload can resize.
pub struct WorkGates {
    pub initial_sync: Arc<Gate>,
    pub join: Arc<Gate>,
    pub thumbnail: Arc<Gate>,
}

/// Where a work class's settings sit in the configuration.
type ClassSettings = fn(&config::WorkConfig) -> &WorkClassConfig;

impl WorkGates {
    /// The gates as `work` and each class's defaults size them, with a first
    /// guess of one piece of work's duration until real ones are measured.
    pub fn new(load: &LoadMetrics, work: &config::WorkConfig, cores: usize) -> Self {
        let gate = |name: &'static str, defaults: WorkClassLimits, class: ClassSettings, expected_ms: u64| {
            Arc::new(Gate::new(
                load.class(name),
                gate_limits(class(work).resolve(defaults, cores)),
                Duration::from_millis(expected_ms),
            ))
        };
        Self {
            initial_sync: gate("initial_sync", INITIAL_SYNC_DEFAULTS, |w| &w.initial_sync, 5),
            join: gate("join", JOIN_DEFAULTS, |w| &w.join, 2),
            thumbnail: gate("thumbnail", THUMBNAIL_DEFAULTS, |w| &w.thumbnail, 50),
        }
    }

    fn each(&self) -> [(&Gate, WorkClassLimits, ClassSettings); 3] {
        [
            (&self.initial_sync, INITIAL_SYNC_DEFAULTS, |w| &w.initial_sync),
            (&self.join, JOIN_DEFAULTS, |w| &w.join),
            (&self.thumbnail, THUMBNAIL_DEFAULTS, |w| &w.thumbnail),
        ]
    }
}

/// The handles through which live settings reach the running services.
pub struct LiveSettings {
    pub accounts: Arc<Accounts>,
    pub gates: WorkGates,
    pub info: Arc<ServerInfo>,
    pub log: LogControl,
    pub listeners: Arc<Listeners>,
    pub cores: usize,
}

impl LiveSettings {
    /// Applies what differs between `from` and `to` among the live settings.
    /// New listeners start here; listeners `to` drops keep serving until
    /// [`settle`](Self::settle), so a failed health check can go back.
    pub fn apply(&self, from: &Config, to: &Config) -> anyhow::Result<()> {
        if from.listen != to.listen {
            self.listeners.add_missing(&to.listen)?;
        }
        if from.log != to.log {
            self.log.set_filter(&to.log)?;
        }
        self.accounts.set_policy(registration_policy(to));
        if from.registration.reserved_localparts != to.registration.reserved_localparts {
            self.accounts.set_reserved_localparts(to.registration.reserved_localparts.clone());
        }
        let admission = self.accounts.admission();
        admission.register.set_limits(rate_limits(&to.admission.register));
        admission.login.set_limits(rate_limits(&to.admission.login));
        let hashing = &to.password_hashing;
        self.accounts
            .hasher()
            .set_queue(hashing.queue, Duration::from_millis(hashing.max_queue_delay_ms));
        for (gate, defaults, class) in self.gates.each() {
            if class(&from.work) != class(&to.work) {
                gate.set_limits(gate_limits(class(&to.work).resolve(defaults, self.cores)));
            }
        }
        self.info.set_public_base_url(public_base_url(to, &self.listeners));
        Ok(())
    }

    /// Makes `to` final: listeners it does not name stop accepting.
    pub fn settle(&self, to: &Config) {
        self.listeners.retain(&to.listen);
    }
}

/// `running` with the live settings of `file`: what a reload applies.
pub fn with_live_settings(running: &Config, file: &Config) -> Config {
    let mut next = running.clone();
    next.listen = file.listen.clone();
    next.public_base_url = file.public_base_url.clone();
    next.log = file.log.clone();
    next.shutdown_deadline_ms = file.shutdown_deadline_ms;
    next.registration = file.registration.clone();
    next.password_hashing.queue = file.password_hashing.queue;
    next.password_hashing.max_queue_delay_ms = file.password_hashing.max_queue_delay_ms;
    next.admission = file.admission.clone();
    next.work = file.work.clone();
    next
}

/// A setting the file changes that takes effect only at the next start.
#[derive(Debug, Clone, Serialize)]
pub struct PendingRestart {
    pub key: String,
    pub running: String,
    pub file: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The live changes are in effect and passed the health check.
    Applied,
    /// Nothing live changed.
    Unchanged,
    /// The file has errors; nothing changed.
    Refused,
    /// Applied, failed the health check, and undone.
    RolledBack,
    /// The operator asked to go back to the configuration before the last reload.
    RolledBackByOperator,
}

/// What one reload (or rollback) did.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    pub at_ms: u64,
    pub outcome: Outcome,
    /// Live settings that changed (applied, or applied and undone).
    pub changed: Vec<String>,
    pub needs_restart: Vec<PendingRestart>,
    /// Errors (when refused) and warnings.
    pub problems: Problems,
    /// Why the health check failed, when it did.
    pub health_failure: Option<String>,
}

impl ReloadReport {
    fn new(outcome: Outcome, problems: Problems) -> Self {
        Self {
            at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            outcome,
            changed: vec![],
            needs_restart: vec![],
            problems,
            health_failure: None,
        }
    }
}

/// The server probing itself before and after a change.
pub struct HealthProbe {
    readiness: Arc<Readiness>,
    info: Arc<ServerInfo>,
    listeners: Arc<Listeners>,
    metrics: Option<SocketAddr>,
    client: reqwest::Client,
}

/// Each probe's verdict, by name.
type Verdicts = Vec<(String, Result<(), String>)>;

impl HealthProbe {
    pub fn new(
        readiness: Arc<Readiness>,
        info: Arc<ServerInfo>,
        listeners: Arc<Listeners>,
        metrics: Option<SocketAddr>,
    ) -> anyhow::Result<Self> {
        Ok(Self {
            readiness,
            info,
            listeners,
            metrics,
            client: reqwest::Client::builder().timeout(PROBE_TIMEOUT).no_proxy().build()?,
        })
    }

    /// `GET url` must answer 200 with this process's instance id.
    async fn reaches_this_server(&self, url: String) -> Result<(), String> {
        let response = self.client.get(&url).send().await.map_err(|e| format!("{url}: {e}"))?;
        if !response.status().is_success() {
            return Err(format!("{url}: status {}", response.status()));
        }
        let body: serde_json::Value = response.json().await.map_err(|e| format!("{url}: {e}"))?;
        if body.get("instance").and_then(|i| i.as_str()) != Some(self.info.instance.as_str()) {
            return Err(format!("{url} answers, but it is not this server"));
        }
        Ok(())
    }

    async fn answers(&self, url: String) -> Result<(), String> {
        let response = self.client.get(&url).send().await.map_err(|e| format!("{url}: {e}"))?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(format!("{url}: status {}", response.status()))
        }
    }

    /// Every probe of the server as `config` has it: its listeners and its
    /// public base URL.
    async fn probe(&self, config: &Config) -> Verdicts {
        let mut names = vec!["storage".to_owned()];
        let mut checks: Vec<futures::future::BoxFuture<'_, Result<(), String>>> = vec![Box::pin(self.readiness.check_store())];
        for configured in &config.listen {
            names.push(format!("listener {configured}"));
            let Some(mut addr) = self.listeners.bound_for(*configured) else {
                checks.push(Box::pin(async { Err("not listening".to_owned()) }));
                continue;
            };
            if addr.ip().is_unspecified() {
                addr.set_ip(if addr.is_ipv4() {
                    std::net::Ipv4Addr::LOCALHOST.into()
                } else {
                    std::net::Ipv6Addr::LOCALHOST.into()
                });
            }
            checks.push(Box::pin(self.reaches_this_server(format!("http://{addr}/health"))));
        }
        let public = public_base_url(config, &self.listeners);
        names.push("public_base_url".to_owned());
        checks.push(Box::pin(
            self.reaches_this_server(format!("{}/health", public.trim_end_matches('/'))),
        ));
        if let Some(metrics) = self.metrics {
            names.push(format!("metrics {metrics}"));
            checks.push(Box::pin(self.answers(format!("http://{metrics}/metrics"))));
        }
        names.into_iter().zip(futures::future::join_all(checks).await).collect()
    }
}

/// What broke: probes that passed `before` and fail `after`, and new probes
/// (a listener just added) that fail. A probe that already failed before
/// (a public URL this machine cannot reach, say) decides nothing.
fn regressions(before: &Verdicts, after: &Verdicts) -> Vec<String> {
    after
        .iter()
        .filter_map(|(name, result)| {
            let was_ok = before.iter().find(|(b, _)| b == name).is_none_or(|(_, r)| r.is_ok());
            match result {
                Err(e) if was_ok => Some(format!("{name}: {e}")),
                _ => None,
            }
        })
        .collect()
}

struct ControlState {
    running: Config,
    /// Configurations that passed their health check, oldest first; the
    /// last is the running one.
    known_good: Vec<Config>,
    pending_restart: Vec<PendingRestart>,
    last: Option<ReloadReport>,
}

/// The running configuration and the only way to change it.
pub struct ConfigControl {
    source: ConfigSource,
    live: LiveSettings,
    probe: HealthProbe,
    /// Held for a whole reload, so two never interleave.
    state: Mutex<ControlState>,
}

/// The keys whose values differ between two flattened configurations, sorted.
fn changed_keys(a: &BTreeMap<String, toml::Value>, b: &BTreeMap<String, toml::Value>) -> Vec<String> {
    let mut keys: Vec<String> = a.keys().chain(b.keys()).filter(|k| a.get(*k) != b.get(*k)).cloned().collect();
    keys.sort();
    keys.dedup();
    keys
}

/// A setting's value for reports and logs; secrets only say whether they are set.
fn show(key: &str, v: Option<&toml::Value>) -> String {
    let secret = schema::setting_at(key).is_some_and(|s| s.kind.is_secret());
    match v {
        None => "(unset)".to_owned(),
        Some(_) if secret => "(set)".to_owned(),
        Some(v) => v.to_string(),
    }
}

impl ConfigControl {
    pub fn new(source: ConfigSource, running: Config, live: LiveSettings, probe: HealthProbe) -> Self {
        Self {
            source,
            live,
            probe,
            state: Mutex::new(ControlState {
                known_good: vec![running.clone()],
                running,
                pending_restart: vec![],
                last: None,
            }),
        }
    }

    pub async fn running(&self) -> Config {
        self.state.lock().await.running.clone()
    }

    /// For `kabar admin status`.
    pub async fn summary(&self) -> serde_json::Value {
        let state = self.state.lock().await;
        serde_json::json!({
            "config_file": self.source.file().map(|p| p.display().to_string()),
            "known_good_configurations": state.known_good.len(),
            "pending_restart": state.pending_restart,
            "last_reload": state.last,
        })
    }

    /// Reads the file again and applies it if it is good and healthy.
    pub async fn reload(&self) -> ReloadReport {
        let mut state = self.state.lock().await;
        let report = self.reload_locked(&mut state).await;
        log_report(&report);
        state.last = Some(report.clone());
        report
    }

    async fn reload_locked(&self, state: &mut ControlState) -> ReloadReport {
        let (file, warnings) = match self.source.load() {
            Ok(loaded) => loaded,
            Err(problems) => return ReloadReport::new(Outcome::Refused, problems),
        };
        let running_keys = state.running.flatten();
        let file_keys = file.flatten();
        let mut report = ReloadReport::new(Outcome::Unchanged, warnings);
        for key in changed_keys(&running_keys, &file_keys) {
            let apply = schema::setting_at(&key).map_or(Apply::Restart, |s| s.apply);
            match apply {
                Apply::Live => report.changed.push(key),
                Apply::Restart => report.needs_restart.push(PendingRestart {
                    running: show(&key, running_keys.get(&key)),
                    file: show(&key, file_keys.get(&key)),
                    key,
                }),
            }
        }
        state.pending_restart = report.needs_restart.clone();
        if report.changed.is_empty() {
            return report;
        }
        let next = with_live_settings(&state.running, &file);
        let whole = config::check::check_whole(&next, &Default::default());
        if whole.iter().any(|p| p.severity == config::Severity::Error) {
            report.outcome = Outcome::Refused;
            report.problems.items.extend(whole);
            return report;
        }
        let previous = state.running.clone();
        match self.apply_checked(&previous, &next).await {
            Ok(()) => {
                report.outcome = Outcome::Applied;
                state.running = next.clone();
                state.known_good.push(next);
                if state.known_good.len() > KNOWN_GOOD_KEPT {
                    state.known_good.remove(0);
                }
            }
            Err(why) => {
                report.outcome = Outcome::RolledBack;
                report.health_failure = Some(why);
            }
        }
        report
    }

    /// Applies `next` over `previous`; if the health check finds something
    /// broken that worked before, puts `previous` back and says what broke.
    async fn apply_checked(&self, previous: &Config, next: &Config) -> Result<(), String> {
        let before = self.probe.probe(previous).await;
        if let Err(e) = self.live.apply(previous, next) {
            self.undo(next, previous);
            return Err(format!("applying failed: {e:#}"));
        }
        let after = self.probe.probe(next).await;
        let broken = regressions(&before, &after);
        if broken.is_empty() {
            self.live.settle(next);
            return Ok(());
        }
        self.undo(next, previous);
        Err(broken.join("; "))
    }

    /// Puts `previous` back over a partly or wholly applied `next`.
    fn undo(&self, next: &Config, previous: &Config) {
        if let Err(e) = self.live.apply(next, previous) {
            tracing::error!(error = %e, "rolling back the configuration failed");
        }
        self.live.settle(previous);
    }

    /// Goes back to the configuration before the last applied reload.
    pub async fn rollback(&self) -> Result<ReloadReport, String> {
        let mut state = self.state.lock().await;
        if state.known_good.len() < 2 {
            return Err("there is no earlier known-good configuration: nothing was reloaded since start".into());
        }
        let target = state.known_good[state.known_good.len() - 2].clone();
        let current = state.running.clone();
        let mut report = ReloadReport::new(
            Outcome::RolledBackByOperator,
            Problems {
                origin: "(last known good)".into(),
                items: vec![],
            },
        );
        report.changed = changed_keys(&current.flatten(), &target.flatten());
        // Going back to a configuration that was good is not refused for a
        // failing probe: the operator is undoing, and the probe says why.
        if let Err(e) = self.live.apply(&current, &target) {
            self.undo(&target, &current);
            return Err(format!("{e:#}"));
        }
        self.live.settle(&target);
        let after = self.probe.probe(&target).await;
        let failing: Vec<String> = after
            .into_iter()
            .filter_map(|(name, r)| r.err().map(|e| format!("{name}: {e}")))
            .collect();
        if !failing.is_empty() {
            report.health_failure = Some(failing.join("; "));
        }
        state.known_good.pop();
        state.running = target;
        log_report(&report);
        state.last = Some(report.clone());
        Ok(report)
    }
}

fn log_report(report: &ReloadReport) {
    for p in &report.problems.items {
        let line = report.problems.line(p);
        match p.severity {
            config::Severity::Error => tracing::error!("{line}"),
            config::Severity::Warning => tracing::warn!("{line}"),
        }
    }
    for p in &report.needs_restart {
        tracing::warn!(key = %p.key, running = %p.running, file = %p.file, "setting changed in the file takes effect only after a restart");
    }
    match report.outcome {
        Outcome::Applied => tracing::info!(changed = ?report.changed, "configuration reloaded"),
        Outcome::Unchanged => tracing::info!("configuration reloaded: no live setting changed"),
        Outcome::Refused => tracing::error!("configuration reload refused: the running configuration stays"),
        Outcome::RolledBack => tracing::error!(
            changed = ?report.changed,
            reason = report.health_failure.as_deref().unwrap_or(""),
            "configuration reload failed its health check and was rolled back to the last known good configuration"
        ),
        Outcome::RolledBackByOperator => tracing::warn!(changed = ?report.changed, "configuration rolled back by the operator"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reports_never_show_a_secret() {
        let secret = toml::Value::String("hunter2".into());
        assert_eq!(show("voip.turn_shared_secret", Some(&secret)), "(set)");
        assert_eq!(show("voip.turn_shared_secret", None), "(unset)");
        assert_eq!(show("log", Some(&secret)), "\"hunter2\"", "other settings are shown as they are");
    }

    /// The reference's live/restart marks and what a reload copies agree:
    /// for every setting, a file that changes only it changes the running
    /// configuration exactly when the setting is marked live.
    #[test]
    fn live_marks_match_what_a_reload_applies() {
        let base = Config::default();
        for setting in schema::SETTINGS {
            let value = match setting.kind {
                schema::Kind::Integer { min, max } => {
                    let current = base.flatten().get(setting.key).and_then(|v| v.as_integer());
                    let v = if current == Some(min) { min + 1 } else { min };
                    toml::Value::Integer(v.min(max))
                }
                schema::Kind::Bool => toml::Value::Boolean(true),
                schema::Kind::OneOf(options) => {
                    let current = base.flatten().get(setting.key).and_then(|v| v.as_str().map(str::to_owned));
                    toml::Value::String(
                        options
                            .iter()
                            .find(|o| Some(o.to_string()) != current)
                            .expect("two options")
                            .to_string(),
                    )
                }
                schema::Kind::SocketAddr | schema::Kind::SocketAddrs => toml::Value::String("127.0.0.1:9999".into()),
                schema::Kind::Path => toml::Value::String("/elsewhere".into()),
                schema::Kind::HttpUrl => toml::Value::String("https://chat.example.org".into()),
                schema::Kind::ServerName => toml::Value::String("example.org".into()),
                schema::Kind::LogFilter => toml::Value::String("debug".into()),
                schema::Kind::Secret => toml::Value::String("hunter2".into()),
                schema::Kind::TurnUris => toml::Value::Array(vec![toml::Value::String("turn:turn.example.org".into())]),
                schema::Kind::Localparts => toml::Value::Array(vec![toml::Value::String("staff".into())]),
                schema::Kind::IpAddrs => toml::Value::Array(vec![toml::Value::String("10.0.0.1".into())]),
                schema::Kind::PostgresUrl => toml::Value::String("postgres://kabar@db.example.org/kabar".into()),
                schema::Kind::NatsUrls => toml::Value::Array(vec![toml::Value::String("nats://nats.example.org:4222".into())]),
                schema::Kind::Token => toml::Value::String("node-2".into()),
            };
            let mut doc = toml::Table::new();
            let parts: Vec<&str> = setting.key.split('.').collect();
            let mut table = &mut doc;
            for part in &parts[..parts.len() - 1] {
                table = table
                    .entry(part.to_string())
                    .or_insert_with(|| toml::Value::Table(Default::default()))
                    .as_table_mut()
                    .expect("table");
            }
            table.insert(parts[parts.len() - 1].to_owned(), value);
            let file: Config = toml::Value::Table(doc)
                .try_into()
                .unwrap_or_else(|e| panic!("{}: {e}", setting.key));
            assert_ne!(file, base, "{} changed", setting.key);
            let next = with_live_settings(&base, &file);
            match setting.apply {
                Apply::Live => assert_eq!(next, file, "{} is marked live: a reload must apply it", setting.key),
                Apply::Restart => assert_eq!(next, base, "{} needs a restart: a reload must not apply it", setting.key),
            }
        }
    }
}
