//! Logs: text or JSON lines, with a filter a configuration reload can change.

use anyhow::Context;
use tracing_subscriber::{EnvFilter, Registry, layer::SubscriberExt, reload, util::SubscriberInitExt};

/// The configured log filter, with ruma's state-resolution library quieted to
/// warnings unless the filter names it: at `info` it logs two lines for every
/// event it authorizes, which cost a tenth of the server's time under load.
pub fn directives(configured: &str) -> String {
    if configured.contains("ruma_state_res") {
        configured.to_owned()
    } else {
        format!("{configured},ruma_state_res=warn")
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
