//! Logs: text or JSON lines, with a filter a configuration reload can change.

use anyhow::Context;
use tracing_subscriber::{EnvFilter, Registry, layer::SubscriberExt, reload, util::SubscriberInitExt};

/// ruma libraries that log (or open spans) at `info` on hot paths, kept at
/// warnings unless the filter names them: the state-resolution library logs
/// two lines for every event it authorizes (a tenth of the server's time
/// under load), and `ruma_common` opens a span for every value of every
/// event it flattens for push rules (most of the throughput the push-rule
/// unread counts first cost `messages`; see bench/RESULTS.md).
const QUIETED: &[&str] = &["ruma_state_res", "ruma_common"];

/// The configured log filter, with the [`QUIETED`] libraries at `warn`
/// unless the filter names them.
pub fn directives(configured: &str) -> String {
    let mut out = configured.to_owned();
    for library in QUIETED {
        if !configured.contains(library) {
            out.push_str(&format!(",{library}=warn"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chatty_libraries_are_quieted_unless_named() {
        assert_eq!(directives("info"), "info,ruma_state_res=warn,ruma_common=warn");
        assert_eq!(directives("debug,ruma_common=trace"), "debug,ruma_common=trace,ruma_state_res=warn");
    }
}

/// Changes the running log filter.
#[derive(Clone)]
pub struct LogControl {
    handle: reload::Handle<EnvFilter, Registry>,
}

impl LogControl {
    pub fn set_filter(&self, configured: &str) -> anyhow::Result<()> {
        let filter = EnvFilter::builder()
            .parse(directives(configured))
            .with_context(|| format!("log filter {configured:?}"))?;
        self.handle.reload(filter).context("replacing the log filter")
    }
}

/// Installs the process's logger, writing to standard error (standard
/// output carries only the lines scripts read: where the server listens).
/// `RUST_LOG`, when set, wins over the configured filter until a reload
/// changes `log`.
pub fn init(configured: &str, format: &str) -> LogControl {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(directives(configured)));
    let (filter, handle) = reload::Layer::new(filter);
    let registry = tracing_subscriber::registry().with(filter);
    if format == "json" {
        registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_current_span(true)
                    .with_span_list(false)
                    .with_writer(std::io::stderr),
            )
            .init();
    } else {
        registry.with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr)).init();
    }
    LogControl { handle }
}
