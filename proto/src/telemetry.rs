//! Logging setup shared by every program: `LOG_FORMAT=json|plain`, level from `RUST_LOG`
//! (default `info`), changeable at runtime through the admin port's `/logging`.

use std::sync::OnceLock;

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, EnvFilter, Registry};

pub const LOG_FORMAT_ENV: &str = "LOG_FORMAT";

static FILTER: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let json = std::env::var(LOG_FORMAT_ENV)
        .map(|v| v == "json")
        .unwrap_or(false);
    let registry = tracing_subscriber::registry().with(filter);
    let installed = if json {
        registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_writer(std::io::stderr),
            )
            .try_init()
    } else {
        registry
            .with(
                fmt::layer()
                    .with_writer(std::io::stderr)
                    // Colour only for a person at a terminal, never into files or journals.
                    .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr())),
            )
            .try_init()
    };
    if installed.is_ok() {
        let _ = FILTER.set(handle);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    #[error("logging was not set up by this process")]
    NotInitialized,
    #[error("{0:?} is not a log filter (examples: info, debug, isthmus_registry=debug,info)")]
    BadFilter(String),
}

/// The current log filter, e.g. `info` or `isthmus_registry::watch=debug,info`.
pub fn current_level() -> Option<String> {
    FILTER
        .get()
        .and_then(|h| h.with_current(|f| f.to_string()).ok())
}

/// Replaces the log filter (same syntax as `RUST_LOG`).
pub fn set_level(spec: &str) -> Result<String, LogLevelError> {
    let handle = FILTER.get().ok_or(LogLevelError::NotInitialized)?;
    let filter =
        EnvFilter::try_new(spec).map_err(|_| LogLevelError::BadFilter(spec.to_string()))?;
    let shown = filter.to_string();
    handle
        .reload(filter)
        .map_err(|_| LogLevelError::NotInitialized)?;
    tracing::info!(filter = %shown, "log filter changed");
    Ok(shown)
}
