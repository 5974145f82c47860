//! Small helpers shared by every program's configuration.

use std::fmt;
use std::time::Duration;

/// One problem at one place in a configuration file; `field` is a path such as
/// `allow[0].principals[1]`, empty when the problem is with the document as a whole.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldProblem {
    pub field: String,
    pub message: String,
}

impl FieldProblem {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// Every problem on one line, `; `-separated.
    pub fn join(problems: &[FieldProblem]) -> String {
        problems
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join("; ")
    }
}

impl fmt::Display for FieldProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

/// Every problem found in one configuration, collected in one pass and reported at once:
/// the one configuration-error type of every program (flags, config files, bundles).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConfigProblems {
    /// What was checked (`the gateway's flags`, `agent.yaml`), when it helps to say.
    pub source: String,
    pub problems: Vec<FieldProblem>,
}

impl ConfigProblems {
    pub fn new(source: impl Into<String>) -> Self {
        Self {
            source: source.into(),
            problems: Vec::new(),
        }
    }

    /// Records a problem with `field` (a flag such as `--connect-timeout`, or a path such
    /// as `ports[0].number`).
    pub fn push(&mut self, field: &str, message: impl Into<String>) {
        self.problems.push(FieldProblem::new(field, message));
    }

    /// Records a problem unless `ok`.
    pub fn check(&mut self, ok: bool, field: &str, message: impl FnOnce() -> String) {
        if !ok {
            self.push(field, message());
        }
    }

    pub fn extend(&mut self, problems: impl IntoIterator<Item = FieldProblem>) {
        self.problems.extend(problems);
    }

    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn len(&self) -> usize {
        self.problems.len()
    }

    /// `Ok` when nothing was found, else every problem at once.
    pub fn into_result(self) -> Result<(), ConfigProblems> {
        if self.problems.is_empty() {
            Ok(())
        } else {
            Err(self)
        }
    }
}

impl fmt::Display for ConfigProblems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.source.is_empty() {
            write!(f, "{}: ", self.source)?;
        }
        let n = self.problems.len();
        if n > 1 {
            write!(f, "{n} problems: ")?;
        }
        f.write_str(&FieldProblem::join(&self.problems))
    }
}

impl std::error::Error for ConfigProblems {}

#[derive(Debug, thiserror::Error)]
#[error("{value:?} is not a duration: {why} (examples: 500ms, 30s, 10m, 1h, 7d)")]
pub struct DurationError {
    value: String,
    why: &'static str,
}

/// Parses `500ms`, `30s`, `10m`, `1h`, `7d`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, DurationError> {
    let err = |why| DurationError {
        value: s.to_string(),
        why,
    };
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(err("it does not start with a number"));
    }
    let n: u64 = num.parse().map_err(|_| err("the number is too large"))?;
    let secs = |mult: u64| {
        n.checked_mul(mult)
            .map(Duration::from_secs)
            .ok_or_else(|| err("it is too long"))
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "" | "s" => secs(1),
        "m" => secs(60),
        "h" => secs(3600),
        "d" => secs(86400),
        _ => Err(err("unknown unit")),
    }
}

/// The deepest YAML nesting a configuration or resource file may have. Real manifests nest
/// a few dozen levels; the YAML parser's cost grows much faster than linearly with depth
/// (a 200 KB file of 100,000 nested brackets takes seconds of CPU), so deeper input is
/// refused before it is parsed.
pub const MAX_YAML_DEPTH: usize = 128;

/// An upper estimate of how deeply `text` nests, without parsing it: the deepest flow
/// nesting (`[`/`{` outside quotes and comments) or block nesting (a line's indentation plus
/// its leading `- ` markers), whichever is more.
pub fn yaml_depth(text: &str) -> usize {
    let mut flow: usize = 0;
    let mut deepest = 0;
    for line in text.lines() {
        let body = line.trim_start_matches(' ');
        let mut block = line.len() - body.len();
        let mut rest = body;
        while let Some(r) = rest.strip_prefix("- ").or_else(|| rest.strip_prefix("? ")) {
            block += 1;
            rest = r.trim_start_matches(' ');
        }
        deepest = deepest.max(block);
        let (mut single, mut double, mut prev) = (false, false, ' ');
        for c in body.chars() {
            match c {
                '#' if !single && !double && (prev == ' ' || prev == '\t') => break,
                '\'' if !double => single = !single,
                '"' if !single && prev != '\\' => double = !double,
                '[' | '{' if !single && !double => {
                    flow += 1;
                    deepest = deepest.max(flow);
                }
                ']' | '}' if !single && !double => flow = flow.saturating_sub(1),
                _ => {}
            }
            prev = c;
        }
    }
    deepest
}

/// One YAML document as a value, for a configuration file: refused before parsing when it
/// nests deeper than [`MAX_YAML_DEPTH`], and a parser panic (serde_yaml_ng has some reachable
/// from malformed input) becomes an error rather than taking the program down.
pub fn yaml_value(text: &str) -> Result<serde_yaml_ng::Value, String> {
    let depth = yaml_depth(text);
    if depth > MAX_YAML_DEPTH {
        return Err(format!(
            "nests {depth} levels deep, more than the {MAX_YAML_DEPTH} a configuration file may: refused before parsing"
        ));
    }
    std::panic::catch_unwind(|| serde_yaml_ng::from_str::<serde_yaml_ng::Value>(text))
        .map_err(|_| "the YAML parser could not read this file; check its syntax".to_string())?
        .map_err(|e| e.to_string())
}

/// A duration given as a flag: read with [`parse_duration`] and shown with
/// [`format_duration`], so a flag's default is written once, as its constant
/// (`#[arg(default_value_t = DurationFlag(DEFAULT_DRAIN_DEADLINE))]`), and `--help` shows it
/// the way an operator types it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DurationFlag(pub Duration);

impl std::str::FromStr for DurationFlag {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_duration(s).map(DurationFlag)
    }
}

impl fmt::Display for DurationFlag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

impl From<DurationFlag> for Duration {
    fn from(d: DurationFlag) -> Duration {
        d.0
    }
}

/// Formats a duration the way [`parse_duration`] reads it.
pub fn format_duration(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_millis() != 0 || s == 0 {
        format!("{}ms", d.as_millis())
    } else if s.is_multiple_of(86400) {
        format!("{}d", s / 86400)
    } else if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("42").unwrap(), Duration::from_secs(42));
        assert!(parse_duration("h").is_err());
        assert!(parse_duration("5 parsecs").is_err());
        assert!(parse_duration("99999999999999999999d").is_err());
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
    }

    #[test]
    fn yaml_depth_is_estimated_without_parsing() {
        let manifest = "apiVersion: v1\nkind: ServiceEntry\nspec:\n  hosts: [a.example]\n  ports:\n  - number: 80\n    name: http\n";
        assert!(yaml_depth(manifest) < 10, "{}", yaml_depth(manifest));
        let brackets = format!("a: {}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert_eq!(yaml_depth(&brackets), 100_000);
        assert!(yaml_depth(&"- ".repeat(1_000)) >= 1_000);
        // Brackets in quotes and comments do not nest.
        assert_eq!(yaml_depth("a: '[[[' # {{{\nb: \"{{\""), 0);
        // A configuration file that nests too deep is refused, named, before parsing.
        let err = yaml_value(&brackets).unwrap_err();
        assert!(err.contains("100000 levels deep"), "{err}");
        assert!(yaml_value("a: [1, {b: 2}]").is_ok());
    }

    #[test]
    fn a_duration_flag_shows_its_default_as_it_is_typed() {
        let d: DurationFlag = "90s".parse().unwrap();
        assert_eq!(d.0, Duration::from_secs(90));
        assert_eq!(DurationFlag(Duration::from_secs(20)).to_string(), "20s");
        assert!("soon".parse::<DurationFlag>().is_err());
    }

    #[test]
    fn problems_are_reported_together() {
        let mut p = ConfigProblems::new("the gateway's flags");
        assert!(p.clone().into_result().is_ok());
        p.push("--connect-timeout", "must be above 0");
        p.check(false, "--network", || "must not be empty".into());
        p.check(true, "--cluster", || unreachable!());
        let err = p.into_result().unwrap_err();
        assert_eq!(
            err.to_string(),
            "the gateway's flags: 2 problems: --connect-timeout: must be above 0; --network: must not be empty"
        );
    }
}
