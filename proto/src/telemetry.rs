//! Logging setup shared by every program: `LOG_FORMAT=json|plain`, level from `RUST_LOG`
//! (default `info`), changeable at runtime through the admin port's `/logging`.
//!
//! A filter is a comma-separated list of `level` and `target=level` directives, as
//! `RUST_LOG` reads them without span and field filters (tracing's `Targets`, which needs no
//! regular-expression engine in every program).

use std::sync::OnceLock;

use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{fmt, reload, Registry};

pub const LOG_FORMAT_ENV: &str = "LOG_FORMAT";
pub const LOG_FILTER_ENV: &str = "RUST_LOG";
const DEFAULT_FILTER: &str = "info";

static FILTER: OnceLock<reload::Handle<Targets, Registry>> = OnceLock::new();

pub fn init() {
    let from_env = std::env::var(LOG_FILTER_ENV)
        .ok()
        .filter(|spec| !spec.trim().is_empty());
    let (filter, refused) = match from_env.as_deref().map(parse_filter) {
        Some(Ok(filter)) => (filter, None),
        Some(Err(e)) => (default_filter(), Some(e)),
        None => (default_filter(), None),
    };
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
    } else if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        // Colour only for a person at a terminal, never into files or journals.
        registry
            .with(fmt::layer().with_writer(std::io::stderr).with_ansi(true))
            .try_init()
    } else {
        registry.with(plain_layer(std::io::stderr)).try_init()
    };
    if installed.is_ok() {
        let _ = FILTER.set(handle);
        if let Some(e) = refused {
            tracing::warn!("{LOG_FILTER_ENV}: {e}; logging at {DEFAULT_FILTER}");
        }
    }
}

/// Plain text for files and journals: tracing's text format, its fields written as
/// `name=value` (`Debug`, so strings are quoted and escaped) by a formatter with no styling.
/// tracing's default field formatter paints every name and `=` with an empty style when
/// colour is off, which was about a third of the instructions of a gateway's access-log line.
fn plain_layer<S, W>(writer: W) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> fmt::MakeWriter<'w> + 'static,
{
    use tracing_subscriber::field::MakeExt;
    let fields = fmt::format::debug_fn(|w, field, value| match field.name() {
        "message" => write!(w, "{value:?}"),
        name => write!(w, "{}={value:?}", name.strip_prefix("r#").unwrap_or(name)),
    })
    .delimited(" ");
    fmt::layer()
        .with_writer(writer)
        .with_ansi(false)
        .fmt_fields(fields)
}

fn default_filter() -> Targets {
    DEFAULT_FILTER.parse().expect("the default filter parses")
}

/// `spec` as a filter. Empty directives are skipped (`info,` is `info`), where tracing's
/// parser would read one as a target that enables everything.
fn parse_filter(spec: &str) -> Result<Targets, LogLevelError> {
    let bad = |why: String| LogLevelError::BadFilter {
        spec: spec.to_string(),
        why,
    };
    let directives: Vec<&str> = spec
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
        .collect();
    if directives.is_empty() {
        return Err(bad("it has no directive".into()));
    }
    directives
        .join(",")
        .parse::<Targets>()
        .map_err(|e| bad(e.to_string()))
}

#[derive(Debug, thiserror::Error)]
pub enum LogLevelError {
    #[error("logging was not set up by this process")]
    NotInitialized,
    #[error(
        "{spec:?} is not a log filter: {why} (examples: info, debug, isthmus_registry=debug,info)"
    )]
    BadFilter { spec: String, why: String },
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
    let filter = parse_filter(spec)?;
    let shown = filter.to_string();
    handle
        .reload(filter)
        .map_err(|_| LogLevelError::NotInitialized)?;
    tracing::info!(filter = %shown, "log filter changed");
    Ok(shown)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Log lines written while a test runs (a writer for a test's subscriber).
    #[derive(Clone, Default)]
    pub(crate) struct Captured(pub(crate) std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// What the plain format writes, as tracing's default field formatter wrote it.
    #[test]
    fn plain_lines_write_fields_as_name_equals_value() {
        let lines = Captured::default();
        let sink = lines.clone();
        let subscriber = tracing_subscriber::registry().with(plain_layer(move || sink.clone()));
        tracing::subscriber::with_default(subscriber, || {
            let addr: std::net::SocketAddr = "10.0.0.1:443".parse().unwrap();
            tracing::info!(
                target: "isthmus::access",
                conn = 7u64,
                client = %addr,
                service = "reviews.shop.svc",
                error = "bad\nline",
                "connection"
            );
        });
        let text = String::from_utf8(lines.0.lock().unwrap().clone()).unwrap();
        assert!(
            text.ends_with(
                " INFO isthmus::access: connection conn=7 client=10.0.0.1:443 \
                 service=\"reviews.shop.svc\" error=\"bad\\nline\"\n"
            ),
            "{text}"
        );
        assert_eq!(text.lines().count(), 1, "a newline in a value is escaped");
    }

    #[test]
    fn a_filter_is_levels_by_target_and_an_empty_directive_is_skipped() {
        let shown = |spec: &str| parse_filter(spec).map(|f| f.to_string());
        assert_eq!(shown("info").unwrap(), "info");
        assert_eq!(
            shown("info,").unwrap(),
            "info",
            "not a target enabling everything"
        );
        let both = shown(" isthmus_registry::watch=debug , warn").unwrap();
        assert!(
            both.contains("isthmus_registry::watch=debug") && both.contains("warn"),
            "{both}"
        );
        for bad in ["", " , ", "x=y=z", "isthmus_proxy=loud"] {
            let e = parse_filter(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?} is not a log filter: ")), "{e}");
        }
    }
}
