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
/// `name=value` (`Debug`, so strings are quoted and escaped) with no styling, by
/// [`PlainFields`].
fn plain_layer<S, W>(writer: W) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    W: for<'w> fmt::MakeWriter<'w> + 'static,
{
    fmt::layer()
        .with_writer(writer)
        .with_ansi(false)
        .with_timer(PlainTime)
        .fmt_fields(PlainFields)
}

/// The plain format's timestamps, as tracing's `SystemTime` writes them
/// (`2026-12-07T11:33:46.741889Z`, UTC). The date and time to the second are formatted once
/// a second and kept per thread; each line writes its microseconds after them.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainTime;

impl fmt::time::FormatTime for PlainTime {
    fn format_time(&self, w: &mut fmt::format::Writer<'_>) -> std::fmt::Result {
        thread_local! {
            static SECOND: std::cell::RefCell<(u64, String)> = const {
                std::cell::RefCell::new((0, String::new()))
            };
        }
        let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) else {
            return fmt::time::SystemTime.format_time(w);
        };
        SECOND.with_borrow_mut(|(second, prefix)| {
            if prefix.is_empty() || *second != now.as_secs() {
                match second_prefix(now.as_secs()) {
                    Some(p) => *prefix = p,
                    None => return fmt::time::SystemTime.format_time(w),
                }
                *second = now.as_secs();
            }
            w.write_str(prefix)?;
            let mut digits = itoa::Buffer::new();
            let micros = digits.format(now.subsec_micros());
            for _ in micros.len()..6 {
                w.write_char('0')?;
            }
            w.write_str(micros)?;
            w.write_char('Z')
        })
    }
}

/// `2026-12-07T11:33:46.` for a time in seconds since the Unix epoch; `None` past year 9999,
/// which tracing's own format writes differently.
fn second_prefix(secs: u64) -> Option<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(i64::try_from(secs).ok()?).ok()?;
    (t.year() <= 9999).then(|| {
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.",
            t.year(),
            u8::from(t.month()),
            t.day(),
            t.hour(),
            t.minute(),
            t.second()
        )
    })
}

/// The plain format's fields: the message first as it is, then `name=value` for each field,
/// a space between, each value as its `Debug` writes it. The result is what tracing's default
/// field formatter writes with colour off; it paints every name and `=` with an empty style
/// even then, and goes through `Debug` for every value. Here the values an access-log line
/// is made of take a short way with the same result: a string with nothing to escape is
/// written between quotes as it is, an integer by `itoa`. A proxy writes a line per
/// connection, so this is on its path.
#[derive(Debug, Clone, Copy, Default)]
pub struct PlainFields;

impl<'w> tracing_subscriber::field::MakeVisitor<fmt::format::Writer<'w>> for PlainFields {
    type Visitor = PlainVisitor<'w>;

    fn make_visitor(&self, writer: fmt::format::Writer<'w>) -> Self::Visitor {
        PlainVisitor {
            writer,
            first: true,
            result: Ok(()),
        }
    }
}

/// Writes one event's or span's fields for [`PlainFields`].
#[derive(Debug)]
pub struct PlainVisitor<'w> {
    writer: fmt::format::Writer<'w>,
    first: bool,
    result: std::fmt::Result,
}

impl<'w> PlainVisitor<'w> {
    /// Writes the separator, `name=` (nothing for the message) and then the value, unless an
    /// earlier write failed.
    fn field(
        &mut self,
        field: &tracing::field::Field,
        value: impl FnOnce(&mut fmt::format::Writer<'w>) -> std::fmt::Result,
    ) {
        if self.result.is_err() {
            return;
        }
        let mut r = Ok(());
        if !self.first {
            r = self.writer.write_char(' ');
        }
        self.first = false;
        let name = field.name();
        if name != "message" {
            r = r
                .and_then(|()| {
                    self.writer
                        .write_str(name.strip_prefix("r#").unwrap_or(name))
                })
                .and_then(|()| self.writer.write_char('='));
        }
        self.result = r.and_then(|()| value(&mut self.writer));
    }
}

/// A string that `Debug` writes as it is, between quotes: printable ASCII with no quote or
/// backslash.
fn needs_no_escape(s: &str) -> bool {
    s.bytes()
        .all(|b| (b' '..=b'~').contains(&b) && b != b'"' && b != b'\\')
}

impl tracing::field::Visit for PlainVisitor<'_> {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        self.field(field, |w| {
            if needs_no_escape(value) {
                w.write_char('"')?;
                w.write_str(value)?;
                w.write_char('"')
            } else {
                write!(w, "{value:?}")
            }
        });
    }

    fn record_u64(&mut self, field: &tracing::field::Field, value: u64) {
        self.field(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_i64(&mut self, field: &tracing::field::Field, value: i64) {
        self.field(field, |w| w.write_str(itoa::Buffer::new().format(value)));
    }

    fn record_bool(&mut self, field: &tracing::field::Field, value: bool) {
        self.field(field, |w| w.write_str(if value { "true" } else { "false" }));
    }

    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        self.field(field, |w| write!(w, "{value:?}"));
    }
}

impl tracing_subscriber::field::VisitOutput<std::fmt::Result> for PlainVisitor<'_> {
    fn finish(self) -> std::fmt::Result {
        self.result
    }
}

impl tracing_subscriber::field::VisitFmt for PlainVisitor<'_> {
    fn writer(&mut self) -> &mut dyn std::fmt::Write {
        &mut self.writer
    }
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

    /// `PlainFields` writes what tracing's field formatter wrote with `Debug` for every
    /// value, whatever the value's type and content.
    #[test]
    fn plain_fields_write_what_debug_wrote() {
        use tracing_subscriber::field::MakeExt;
        let reference = fmt::format::debug_fn(|w, field, value| match field.name() {
            "message" => write!(w, "{value:?}"),
            name => write!(w, "{}={value:?}", name.strip_prefix("r#").unwrap_or(name)),
        })
        .delimited(" ");
        let emit = || {
            let addr: std::net::SocketAddr = "[fe80::1]:15008".parse().unwrap();
            let r#type = "raw";
            let span = tracing::info_span!("conn", id = 3u64, client = %addr);
            let _in = span.enter();
            tracing::info!(
                target: "isthmus::access",
                conn = u64::MAX,
                delta = -42i64,
                zero = 0u64,
                ok = true,
                ratio = 0.5f64,
                r#type,
                empty = "",
                plain = "outbound_.9080_._.reviews.shop.svc.cluster.local",
                quoted = "say \"hi\"",
                backslash = "C:\\x",
                tab = "a\tb",
                unicode = "naïve – ok",
                control = "\u{1b}[31m",
                duration_ms = %format_args!("{:.3}", 1.23456),
                client = %addr,
                debug = ?Some("x"),
                "connection {} of {}",
                1,
                2
            );
            tracing::info!(message = "a str message", n = 1u64);
        };
        let capture = |layer: Box<dyn tracing_subscriber::Layer<Registry> + Send + Sync>| {
            let subscriber = tracing_subscriber::registry().with(layer);
            tracing::subscriber::with_default(subscriber, emit);
        };
        let ours = Captured::default();
        let theirs = Captured::default();
        let (o, t) = (ours.clone(), theirs.clone());
        capture(Box::new(
            fmt::layer()
                .with_writer(move || o.clone())
                .with_ansi(false)
                .without_time()
                .fmt_fields(PlainFields),
        ));
        capture(Box::new(
            fmt::layer()
                .with_writer(move || t.clone())
                .with_ansi(false)
                .without_time()
                .fmt_fields(reference),
        ));
        let ours = String::from_utf8(ours.0.lock().unwrap().clone()).unwrap();
        let theirs = String::from_utf8(theirs.0.lock().unwrap().clone()).unwrap();
        assert_eq!(ours.lines().count(), 2, "{ours}");
        assert_eq!(ours, theirs);
    }

    #[test]
    fn plain_time_writes_what_tracing_wrote() {
        use fmt::time::FormatTime;
        assert_eq!(second_prefix(0).unwrap(), "1970-01-01T00:00:00.");
        assert_eq!(second_prefix(951_825_599).unwrap(), "2000-02-29T11:59:59.");
        assert_eq!(
            second_prefix(1_796_643_226).unwrap(),
            "2026-12-07T11:33:46."
        );
        assert_eq!(
            second_prefix(253_402_300_799).unwrap(),
            "9999-12-31T23:59:59."
        );
        assert_eq!(second_prefix(253_402_300_800), None);
        let format = |t: &dyn FormatTime| {
            let mut s = String::new();
            t.format_time(&mut fmt::format::Writer::new(&mut s))
                .unwrap();
            s
        };
        // The same second from both, unless this ran across a second's end: then again.
        for _ in 0..3 {
            let ours = format(&PlainTime);
            let theirs = format(&fmt::time::SystemTime);
            assert_eq!(ours.len(), theirs.len(), "{ours} against {theirs}");
            assert!(ours.ends_with('Z') && ours.as_bytes()[19] == b'.', "{ours}");
            if ours[..20] == theirs[..20] {
                return;
            }
        }
        panic!("PlainTime and tracing's SystemTime never wrote the same second");
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
