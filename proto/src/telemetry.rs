//! Logging setup shared by every program: `LOG_FORMAT=json|plain`, level from `RUST_LOG`
//! (default `info`).

use tracing_subscriber::{fmt, EnvFilter};

pub const LOG_FORMAT_ENV: &str = "LOG_FORMAT";

pub fn init() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = std::env::var(LOG_FORMAT_ENV)
        .map(|v| v == "json")
        .unwrap_or(false);
    let builder = fmt().with_env_filter(filter).with_writer(std::io::stderr);
    let _ = if json {
        builder.json().flatten_event(true).try_init()
    } else {
        builder.try_init()
    };
}
