//! What the inbound does with a connection the authorization policy allowed, per calling
//! identity: connection quotas (a rate of new connections and a number open at once) and
//! fault injection for resilience drills (a delay before the app is connected to, or a
//! reset instead of it). Both are rules of the inbound policy file, beside `allow` and
//! `deny`, matched like them on the peer's verified identity (`principals`, `namespaces`)
//! and, where a rule names them, on the app port the connection is for (`ports`):
//!
//! ```yaml
//! quotas:
//!   - namespaces: [shop]          # each identity of the namespace has its own quota
//!     ports: [9080]
//!     connectionsPerSecond: 20    # new connections; bursts up to `burst` (default: the rate)
//!     maxConnections: 10          # open at once
//! faults:
//!   - principals: ["cluster.local/ns/shop/sa/web"]
//!     delay:
//!       fixedDelay: 500ms
//!       percentage: {value: 10}
//!     abort:
//!       percentage: {value: 1}
//! ```
//!
//! Quotas: every rule that matches a connection applies, and each calling identity has its
//! own allowance under each rule (the plaintext peers of a PERMISSIVE listener share one).
//! The rate is a token bucket; the open count is released when the connection ends. A
//! connection over either is closed right after the handshake, before the app sees it,
//! and counted by rule and limit. Quotas hold in one program: every inbound listener of a
//! VM agent shares them.
//!
//! Faults: the first rule that matches applies. `percentage` is the share of that rule's
//! connections a fault is applied to, spread evenly over them (10 % is every tenth
//! connection, exactly), not drawn at random, so a drill hits the share it asks for. A
//! delay holds the connection after the handshake for `fixedDelay` before the app is
//! connected to; an abort resets it (TCP RST) instead of connecting the app. Both may
//! apply to one connection: the delay first. Istio's `fault` is HTTP-only and applied by
//! the calling sidecar; here it is applied at the destination, at L4, where the caller's
//! identity is verified, and an abort has no status to carry.
//!
//! Pure logic with its own clock argument, no I/O: the inbound asks [`Admission::admit`]
//! once per allowed connection.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use isthmus_proto::config::{parse_duration, FieldProblem};
use isthmus_proto::identity::SpiffeId;
use serde::{Deserialize, Deserializer};

use super::{check_source, source_matches, AuthorizationPolicy};

/// Callers whose allowances are tracked at once; beyond it, the ones at rest (nothing open,
/// a full bucket) are forgotten, which changes nothing for them.
const MAX_TRACKED: usize = 65_536;

/// A limit on new connections from each calling identity.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct QuotaRule {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    /// App ports the rule applies to; empty: every port.
    #[serde(default)]
    pub ports: Vec<u16>,
    /// New connections per second, on average.
    pub connections_per_second: Option<f64>,
    /// New connections at once above the rate (the bucket's size); default: the rate,
    /// at least 1.
    pub burst: Option<u32>,
    /// Connections open at once.
    pub max_connections: Option<u32>,
}

/// Delay or reset a share of the matching connections.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct FaultRule {
    #[serde(default)]
    pub principals: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<String>,
    #[serde(default)]
    pub ports: Vec<u16>,
    pub delay: Option<DelayFault>,
    pub abort: Option<AbortFault>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct DelayFault {
    #[serde(deserialize_with = "duration")]
    pub fixed_delay: Duration,
    /// Default: every matching connection.
    pub percentage: Option<Percent>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct AbortFault {
    /// Default: every matching connection.
    pub percentage: Option<Percent>,
}

/// Istio's `Percent`: `{value: 0.0–100.0}`.
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Percent {
    pub value: f64,
}

fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    parse_duration(&s).map_err(serde::de::Error::custom)
}

impl QuotaRule {
    fn check(&self, i: usize, problems: &mut Vec<FieldProblem>) {
        let field = |name: &str| format!("quotas[{i}].{name}");
        check_source(
            &format!("quotas[{i}]."),
            &self.principals,
            &self.namespaces,
            problems,
        );
        if self.connections_per_second.is_none() && self.max_connections.is_none() {
            problems.push(FieldProblem::new(
                &format!("quotas[{i}]"),
                "a quota needs connectionsPerSecond, maxConnections or both",
            ));
        }
        if let Some(rate) = self.connections_per_second {
            if !(rate.is_finite() && rate > 0.0) {
                problems.push(FieldProblem::new(
                    &field("connectionsPerSecond"),
                    format!("{rate} is not a positive number of connections per second"),
                ));
            }
        } else if self.burst.is_some() {
            problems.push(FieldProblem::new(
                &field("burst"),
                "a burst needs connectionsPerSecond",
            ));
        }
        if self.burst == Some(0) {
            problems.push(FieldProblem::new(
                &field("burst"),
                "0 would refuse every connection; leave it out for the rate itself",
            ));
        }
        if self.max_connections == Some(0) {
            problems.push(FieldProblem::new(
                &field("maxConnections"),
                "0 would refuse every connection; use a deny rule for that",
            ));
        }
    }

    /// The bucket's size: `burst`, or the rate rounded up (at least one connection).
    fn capacity(&self) -> f64 {
        match (self.burst, self.connections_per_second) {
            (Some(b), _) => f64::from(b),
            (None, Some(rate)) => rate.ceil().max(1.0),
            (None, None) => 0.0,
        }
    }
}

impl FaultRule {
    fn check(&self, i: usize, problems: &mut Vec<FieldProblem>) {
        let field = |name: &str| format!("faults[{i}].{name}");
        check_source(
            &format!("faults[{i}]."),
            &self.principals,
            &self.namespaces,
            problems,
        );
        if self.delay.is_none() && self.abort.is_none() {
            problems.push(FieldProblem::new(
                &format!("faults[{i}]"),
                "a fault needs a delay, an abort or both",
            ));
        }
        let shares = [
            (
                "delay.percentage.value",
                self.delay.as_ref().map(|d| d.percentage),
            ),
            (
                "abort.percentage.value",
                self.abort.as_ref().map(|a| a.percentage),
            ),
        ];
        for (name, share) in shares {
            if let Some(Some(p)) = share {
                if !(p.value.is_finite() && (0.0..=100.0).contains(&p.value)) {
                    problems.push(FieldProblem::new(
                        &field(name),
                        format!("{} is not a percentage from 0 to 100", p.value),
                    ));
                }
            }
        }
    }
}

/// Every problem of the quota and fault rules, with their fields named.
pub(crate) fn check(quotas: &[QuotaRule], faults: &[FaultRule], problems: &mut Vec<FieldProblem>) {
    for (i, q) in quotas.iter().enumerate() {
        q.check(i, problems);
    }
    for (i, f) in faults.iter().enumerate() {
        f.check(i, problems);
    }
}

fn applies(
    principals: &[String],
    namespaces: &[String],
    ports: &[u16],
    peer: Option<&SpiffeId>,
    port: u16,
) -> bool {
    (ports.is_empty() || ports.contains(&port)) && source_matches(principals, namespaces, peer)
}

/// Which limit a connection was over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `connectionsPerSecond` (with its burst).
    Rate,
    /// `maxConnections`.
    Concurrent,
}

impl Limit {
    pub fn as_str(&self) -> &'static str {
        match self {
            Limit::Rate => "rate",
            Limit::Concurrent => "concurrent",
        }
    }
}

/// A connection refused by a quota: which rule, which limit, and what it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OverQuota {
    pub rule: usize,
    pub limit: Limit,
    pub detail: String,
}

/// A fault to apply to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// The index of the rule in `faults`.
    pub rule: usize,
    pub delay: Option<Duration>,
    pub abort: bool,
}

/// What an admitted connection carries: its places in the open-at-once quotas (released on
/// drop) and the fault to apply, if any.
#[must_use]
pub struct Admitted {
    held: Vec<Held>,
    pub fault: Option<Fault>,
}

impl fmt::Debug for Admitted {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Admitted")
            .field("held", &self.held.len())
            .field("fault", &self.fault)
            .finish()
    }
}

/// One open connection counted against a caller's `maxConnections`.
struct Held {
    admission: Arc<Admission>,
    key: Key,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut callers = self.admission.lock();
        if let Some(a) = callers.get_mut(&self.key) {
            a.open = a.open.saturating_sub(1);
        }
    }
}

/// A rule and a caller (`None`: a plaintext peer).
type Key = (usize, Option<Arc<str>>);

/// One caller's allowance under one quota rule.
#[derive(Debug)]
struct Allowance {
    tokens: f64,
    refilled: Instant,
    open: u32,
}

/// The quota and fault rules of one program's inbound policy, with what they count.
#[derive(Debug, Default)]
pub struct Admission {
    quotas: Vec<QuotaRule>,
    faults: Vec<FaultRule>,
    callers: Mutex<HashMap<Key, Allowance>>,
    /// Per fault rule: matching connections seen, for the delay's and the abort's share.
    seen: Vec<AtomicU64>,
}

impl Admission {
    /// The rules of `policy` (already checked when it was read).
    pub fn new(policy: &AuthorizationPolicy) -> Arc<Self> {
        Arc::new(Self {
            quotas: policy.quotas.clone(),
            faults: policy.faults.clone(),
            callers: Mutex::default(),
            seen: policy.faults.iter().map(|_| AtomicU64::new(0)).collect(),
        })
    }

    /// Whether there is anything to do: a program without rules skips [`Self::admit`].
    pub fn is_empty(&self) -> bool {
        self.quotas.is_empty() && self.faults.is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, Allowance>> {
        self.callers.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits or refuses a connection from `peer` to the app's `port`, now.
    pub fn admit(
        self: &Arc<Self>,
        peer: Option<&SpiffeId>,
        port: u16,
    ) -> Result<Admitted, OverQuota> {
        self.admit_at(peer, port, Instant::now())
    }

    /// [`Self::admit`] at `now`.
    pub fn admit_at(
        self: &Arc<Self>,
        peer: Option<&SpiffeId>,
        port: u16,
        now: Instant,
    ) -> Result<Admitted, OverQuota> {
        let held = self.take_quotas(peer, port, now)?;
        Ok(Admitted {
            held,
            fault: self.fault(peer, port),
        })
    }

    /// Takes a token and an open place under every matching quota, or none of them.
    fn take_quotas(
        self: &Arc<Self>,
        peer: Option<&SpiffeId>,
        port: u16,
        now: Instant,
    ) -> Result<Vec<Held>, OverQuota> {
        let matching: Vec<usize> = (0..self.quotas.len())
            .filter(|&i| {
                let q = &self.quotas[i];
                applies(&q.principals, &q.namespaces, &q.ports, peer, port)
            })
            .collect();
        if matching.is_empty() {
            return Ok(Vec::new());
        }
        let caller: Option<Arc<str>> = peer.map(|id| Arc::from(id.as_str()));
        let mut callers = self.lock();
        if callers.len() >= MAX_TRACKED {
            self.forget_resting(&mut callers, now);
        }
        // First check every rule, then take: a refused connection uses up nothing.
        for &i in &matching {
            let q = &self.quotas[i];
            let a = callers
                .entry((i, caller.clone()))
                .or_insert_with(|| Allowance {
                    tokens: q.capacity(),
                    refilled: now,
                    open: 0,
                });
            if let Some(rate) = q.connections_per_second {
                let elapsed = now.saturating_duration_since(a.refilled).as_secs_f64();
                a.tokens = (a.tokens + elapsed * rate).min(q.capacity());
                a.refilled = now;
                if a.tokens < 1.0 {
                    return Err(OverQuota {
                        rule: i,
                        limit: Limit::Rate,
                        detail: format!(
                            "quotas[{i}]: {} is over its {rate} new connections per second (burst {})",
                            who(peer),
                            q.capacity()
                        ),
                    });
                }
            }
            if let Some(max) = q.max_connections {
                if a.open >= max {
                    return Err(OverQuota {
                        rule: i,
                        limit: Limit::Concurrent,
                        detail: format!(
                            "quotas[{i}]: {} already has {max} connections open, its maximum",
                            who(peer)
                        ),
                    });
                }
            }
        }
        let mut held = Vec::new();
        for &i in &matching {
            let q = &self.quotas[i];
            let key = (i, caller.clone());
            let Some(a) = callers.get_mut(&key) else {
                continue;
            };
            if q.connections_per_second.is_some() {
                a.tokens -= 1.0;
            }
            if q.max_connections.is_some() {
                a.open += 1;
                held.push(Held {
                    admission: self.clone(),
                    key,
                });
            }
        }
        Ok(held)
    }

    /// Forgets the callers whose allowance is as if they had never called.
    fn forget_resting(&self, callers: &mut HashMap<Key, Allowance>, now: Instant) {
        callers.retain(|(i, _), a| {
            let q = &self.quotas[*i];
            let refill = q.connections_per_second.unwrap_or(0.0)
                * now.saturating_duration_since(a.refilled).as_secs_f64();
            a.open > 0 || a.tokens + refill < q.capacity()
        });
    }

    /// The first matching fault rule's fault for this connection, if its share picks it.
    fn fault(&self, peer: Option<&SpiffeId>, port: u16) -> Option<Fault> {
        let (i, rule) = self
            .faults
            .iter()
            .enumerate()
            .find(|(_, f)| applies(&f.principals, &f.namespaces, &f.ports, peer, port))?;
        let n = self.seen[i].fetch_add(1, Ordering::Relaxed);
        let delay = rule
            .delay
            .as_ref()
            .filter(|d| picked(n, d.percentage))
            .map(|d| d.fixed_delay);
        let abort = rule.abort.as_ref().is_some_and(|a| picked(n, a.percentage));
        (delay.is_some() || abort).then_some(Fault {
            rule: i,
            delay,
            abort,
        })
    }
}

/// Whether the `n`th connection (from 0) is in the share: the share's running total steps
/// up on it, so over any run of connections the count is within one of the share.
fn picked(n: u64, share: Option<Percent>) -> bool {
    let Some(p) = share else {
        return true;
    };
    // Parts per million, so 0.1 % is still exact.
    let ppm = (p.value.clamp(0.0, 100.0) * 10_000.0).round() as u128;
    let total = |k: u64| u128::from(k) * ppm / 1_000_000;
    total(n + 1) > total(n)
}

fn who(peer: Option<&SpiffeId>) -> String {
    match peer {
        Some(id) => id.to_string(),
        None => "a plaintext peer".into(),
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
    const CART: &str = "spiffe://cluster.local/ns/shop/sa/cart";
    const OPS: &str = "spiffe://cluster.local/ns/ops/sa/admin";

    fn id(s: &str) -> SpiffeId {
        SpiffeId::parse(s).unwrap()
    }

    fn admission(yaml: &str) -> Arc<Admission> {
        Admission::new(&AuthorizationPolicy::from_yaml(Path::new("p.yaml"), yaml).unwrap())
    }

    #[test]
    fn a_share_is_exact_and_spread_evenly() {
        let ten = Some(Percent { value: 10.0 });
        let picks: Vec<u64> = (0..100).filter(|&n| picked(n, ten)).collect();
        assert_eq!(picks, vec![9, 19, 29, 39, 49, 59, 69, 79, 89, 99]);
        for value in [0.0, 0.1, 1.0, 33.3, 50.0, 99.9, 100.0] {
            let share = Some(Percent { value });
            let count = (0..100_000).filter(|&n| picked(n, share)).count() as f64;
            assert!(
                (count - value * 1000.0).abs() <= 1.0,
                "{value}%: {count} of 100000"
            );
        }
        assert!((0..10).all(|n| picked(n, None)));
    }

    #[test]
    fn the_rate_is_per_caller_with_its_burst() {
        let a = admission(
            "quotas:\n  - namespaces: [shop]\n    connectionsPerSecond: 2\n    burst: 3\n",
        );
        let (web, cart, ops) = (id(WEB), id(CART), id(OPS));
        let t0 = Instant::now();
        for _ in 0..3 {
            drop(a.admit_at(Some(&web), 80, t0).unwrap());
        }
        let over = a.admit_at(Some(&web), 80, t0).unwrap_err();
        assert_eq!((over.rule, over.limit), (0, Limit::Rate));
        assert!(
            over.detail.contains("ns/shop/sa/web")
                && over.detail.contains("2 new connections per second"),
            "{}",
            over.detail
        );
        // Another identity of the namespace has its own allowance; one outside it has none.
        drop(a.admit_at(Some(&cart), 80, t0).unwrap());
        for _ in 0..10 {
            drop(a.admit_at(Some(&ops), 80, t0).unwrap());
        }
        // Half a second later one token is back, and only one.
        let later = t0 + Duration::from_millis(500);
        drop(a.admit_at(Some(&web), 80, later).unwrap());
        assert!(a.admit_at(Some(&web), 80, later).is_err());
    }

    #[test]
    fn open_connections_are_counted_until_they_end() {
        let a = admission(
            "quotas:\n  - principals: [\"*/sa/web\"]\n    ports: [9080]\n    maxConnections: 2\n",
        );
        let web = id(WEB);
        let now = Instant::now();
        let first = a.admit_at(Some(&web), 9080, now).unwrap();
        let _second = a.admit_at(Some(&web), 9080, now).unwrap();
        let over = a.admit_at(Some(&web), 9080, now).unwrap_err();
        assert_eq!(over.limit, Limit::Concurrent);
        // Another port is not under the rule.
        let _other_port = a.admit_at(Some(&web), 9081, now).unwrap();
        drop(first);
        let _third = a.admit_at(Some(&web), 9080, now).unwrap();
    }

    #[test]
    fn a_refused_connection_uses_up_nothing() {
        // Rule 0 has tokens to spare, rule 1 is full: the refusal must not spend rule 0's.
        let a = admission(
            "quotas:\n  - connectionsPerSecond: 1\n    burst: 2\n  - maxConnections: 1\n",
        );
        let web = id(WEB);
        let now = Instant::now();
        let held = a.admit_at(Some(&web), 80, now).unwrap();
        assert_eq!(a.admit_at(Some(&web), 80, now).unwrap_err().rule, 1);
        drop(held);
        drop(a.admit_at(Some(&web), 80, now).unwrap());
        assert_eq!(
            a.admit_at(Some(&web), 80, now).unwrap_err().limit,
            Limit::Rate
        );
    }

    #[test]
    fn plaintext_peers_share_one_allowance() {
        let a = admission("quotas:\n  - maxConnections: 1\n");
        let now = Instant::now();
        let _held = a.admit_at(None, 80, now).unwrap();
        let over = a.admit_at(None, 80, now).unwrap_err();
        assert!(over.detail.contains("a plaintext peer"), "{}", over.detail);
    }

    #[test]
    fn faults_apply_to_their_share_of_the_first_matching_rule() {
        let a = admission(
            r#"
faults:
  - principals: ["cluster.local/ns/shop/sa/web"]
    delay: {fixedDelay: 250ms, percentage: {value: 50}}
    abort: {percentage: {value: 25}}
  - namespaces: [shop]
    abort: {}
"#,
        );
        let (web, cart, ops) = (id(WEB), id(CART), id(OPS));
        let now = Instant::now();
        let faults: Vec<Option<Fault>> = (0..4)
            .map(|_| a.admit_at(Some(&web), 80, now).unwrap().fault)
            .collect();
        let delayed = |d: bool, abort: bool| {
            Some(Fault {
                rule: 0,
                delay: d.then_some(Duration::from_millis(250)),
                abort,
            })
        };
        assert_eq!(
            faults,
            vec![None, delayed(true, false), None, delayed(true, true)]
        );
        // The second rule aborts every connection it gets; the first took web's.
        assert!(
            a.admit_at(Some(&cart), 80, now)
                .unwrap()
                .fault
                .unwrap()
                .abort
        );
        assert!(a.admit_at(Some(&ops), 80, now).unwrap().fault.is_none());
    }

    #[test]
    fn rule_errors_name_their_field() {
        let bad = r#"
quotas:
  - namespaces: ["Not A Label"]
    connectionsPerSecond: -1
  - principals: [web]
  - maxConnections: 0
    burst: 5
faults:
  - delay: {fixedDelay: 5s, percentage: {value: 120}}
  - principals: ["a*b"]
"#;
        let err = AuthorizationPolicy::from_yaml(Path::new("p.yaml"), bad)
            .unwrap_err()
            .to_string();
        for needle in [
            "quotas[0].namespaces[0]",
            "quotas[0].connectionsPerSecond: -1 is not a positive number",
            "quotas[1]: a quota needs connectionsPerSecond, maxConnections or both",
            "quotas[2].maxConnections: 0 would refuse every connection",
            "quotas[2].burst: a burst needs connectionsPerSecond",
            "faults[0].delay.percentage.value: 120 is not a percentage",
            "faults[1]: a fault needs a delay, an abort or both",
            "faults[1].principals[0]",
        ] {
            assert!(err.contains(needle), "{needle:?} not in {err}");
        }
        let err = AuthorizationPolicy::from_yaml(
            Path::new("p.yaml"),
            "faults:\n  - delay: {fixedDelay: soon}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("faults[0].delay.fixedDelay") && err.contains("not a duration"),
            "{err}"
        );
        let err = AuthorizationPolicy::from_yaml(
            Path::new("p.yaml"),
            "faults:\n  - abort: {httpStatus: 503}\n",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("httpStatus"), "{err}");
    }
}
