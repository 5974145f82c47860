//! Endpoint selection for one destination: locality first (same zone, then same region,
//! then anywhere; or as a DestinationRule's `localityLbSetting` says: regions to fail over
//! to, a priority of locality levels, or shares per locality), then the load-balancing
//! policy among the closest healthy endpoints, with
//! outlier detection that ejects an endpoint after consecutive connect failures for a
//! back-off that grows with each ejection. Pure logic: `now` is passed in, so it is tested
//! in simulated time, and the data plane calls it without I/O.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use isthmus_proto::model::Locality;
pub use isthmus_proto::traffic::{LocalityLb, LocalityLevel};
use rand::Rng;

/// Consecutive connect failures that eject an endpoint (Envoy's and Istio's default).
pub const DEFAULT_CONSECUTIVE_FAILURES: u32 = 5;
/// First ejection; each further ejection of the same endpoint doubles it.
pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_EJECTION: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Smooth weighted round robin.
    #[default]
    RoundRobin,
    /// Power of two choices: of two random endpoints, the one with fewer open connections
    /// per unit of weight.
    LeastConnections,
    /// An endpoint at random, in proportion to its weight.
    Random,
}

impl Policy {
    /// The name an operator writes (`--lb-policy`).
    pub fn as_str(&self) -> &'static str {
        match self {
            Policy::RoundRobin => "round-robin",
            Policy::LeastConnections => "least-connections",
            Policy::Random => "random",
        }
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy name that is neither `round-robin` nor `least-connections`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?}: use round-robin, least-connections or random")]
pub struct UnknownPolicy(pub String);

impl std::str::FromStr for Policy {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "round-robin" => Ok(Policy::RoundRobin),
            "least-connections" => Ok(Policy::LeastConnections),
            "random" => Ok(Policy::Random),
            other => Err(UnknownPolicy(other.to_string())),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierConfig {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    /// At most this share (percent) of the endpoints ejected at once; a failure that would
    /// eject more is counted and the endpoint stays (Istio's `maxEjectionPercent`).
    pub max_ejection_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: DEFAULT_CONSECUTIVE_FAILURES,
            base_ejection: DEFAULT_BASE_EJECTION,
            max_ejection: DEFAULT_MAX_EJECTION,
            max_ejection_percent: 100,
        }
    }
}

/// One endpoint as the balancer sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Stable across updates (the view's uid), so state survives a catalog change.
    pub id: String,
    pub locality: Locality,
    pub weight: u32,
}

#[derive(Debug, Clone, Default)]
struct State {
    active: u32,
    /// Smooth weighted round robin's running weight.
    current: i64,
    failures: u32,
    ejections: u32,
    ejected_until: Option<Instant>,
}

fn level<'a>(l: &'a Locality, level: &LocalityLevel) -> &'a str {
    match level {
        LocalityLevel::Region => &l.region,
        LocalityLevel::Zone => &l.zone,
        LocalityLevel::Subzone => &l.subzone,
    }
}

/// How close an endpoint is to the caller under `settings`; lower is preferred.
///
/// - Disabled, or shares by locality (`distribute`, which weighs instead): all the same.
/// - `failoverPriority`: the number of its levels, in order, on which the endpoint does not
///   match the caller (a level the caller does not know matches nothing).
/// - Otherwise same zone, then same region, then the regions `failover` names for the
///   caller's region in their order, then any other.
fn tier(settings: &LocalityLb, distributing: bool, caller: &Locality, ep: &Locality) -> usize {
    if settings.disabled || distributing {
        return 0;
    }
    if !settings.failover_priority.is_empty() {
        let matched = settings
            .failover_priority
            .iter()
            .take_while(|l| {
                let want = level(caller, l);
                !want.is_empty() && want == level(ep, l)
            })
            .count();
        return settings.failover_priority.len() - matched;
    }
    if !caller.region.is_empty() && caller.region == ep.region {
        return if !caller.zone.is_empty() && caller.zone == ep.zone {
            0
        } else {
            1
        };
    }
    let to = settings
        .failover
        .iter()
        .filter(|(from, _)| *from == caller.region)
        .position(|(_, to)| *to == ep.region);
    2 + to.unwrap_or(settings.failover.len())
}

/// Whether locality `l` is in `pattern`: `region/zone/subzone`, where `*` matches the rest
/// and a pattern of fewer levels matches everything under it.
pub fn locality_in(pattern: &str, l: &Locality) -> bool {
    let levels = [&l.region, &l.zone, &l.subzone];
    for (i, part) in pattern.split('/').enumerate() {
        if part == "*" {
            return true;
        }
        if i >= levels.len() || levels[i] != part {
            return false;
        }
    }
    true
}

/// Each endpoint's weight under `distribute` for a caller at `caller`: the share of the
/// first `to` pattern its locality is in, split among that pattern's endpoints by their
/// own weights (none: 0, never picked). `None` when no `from` pattern holds the caller.
fn distributed(
    settings: &LocalityLb,
    caller: &Locality,
    endpoints: &[Endpoint],
) -> Option<Vec<u32>> {
    let (_, to) = settings
        .distribute
        .iter()
        .find(|(from, _)| locality_in(from, caller))?;
    let group = |e: &Endpoint| {
        to.iter()
            .position(|(pattern, _)| locality_in(pattern, &e.locality))
    };
    let mut totals = vec![0u64; to.len()];
    for e in endpoints {
        if let Some(g) = group(e) {
            totals[g] += u64::from(e.weight);
        }
    }
    // Shares in ten-thousandths of the group's weight, so small groups keep their share.
    Some(
        endpoints
            .iter()
            .map(|e| match group(e) {
                Some(g) if totals[g] > 0 && e.weight > 0 => {
                    let w = u64::from(to[g].1) * u64::from(e.weight) * 10_000 / totals[g];
                    u32::try_from(w.max(1)).unwrap_or(u32::MAX)
                }
                _ => 0,
            })
            .collect(),
    )
}

/// What happened to an endpoint after a failed connect.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureOutcome {
    Counted,
    /// Ejected until this instant.
    Ejected(Instant),
}

#[derive(Debug)]
pub struct Balancer {
    policy: Policy,
    outlier: OutlierConfig,
    /// Shared by the destinations of one routing table.
    caller: Arc<Locality>,
    locality: LocalityLb,
    endpoints: Vec<Endpoint>,
    /// The weight each endpoint is picked by: its own, or its share under `distribute`.
    weights: Vec<u32>,
    /// Whether `distribute` applies to this caller.
    distributing: bool,
    state: Vec<State>,
}

impl Balancer {
    pub fn new(
        policy: Policy,
        outlier: OutlierConfig,
        caller: impl Into<Arc<Locality>>,
        endpoints: Vec<Endpoint>,
    ) -> Self {
        let state = vec![State::default(); endpoints.len()];
        let mut b = Self {
            policy,
            outlier,
            caller: caller.into(),
            locality: LocalityLb::default(),
            endpoints,
            weights: Vec::new(),
            distributing: false,
            state,
        };
        b.reweigh();
        b
    }

    fn reweigh(&mut self) {
        match distributed(&self.locality, &self.caller, &self.endpoints) {
            Some(w) => {
                self.weights = w;
                self.distributing = true;
            }
            None => {
                self.weights = self.endpoints.iter().map(|e| e.weight).collect();
                self.distributing = false;
            }
        }
    }

    fn tier(&self, i: usize) -> usize {
        tier(
            &self.locality,
            self.distributing,
            &self.caller,
            &self.endpoints[i].locality,
        )
    }

    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// The locality settings in force.
    pub fn locality(&self) -> &LocalityLb {
        &self.locality
    }

    /// Changes the policy, the outlier and the locality settings, keeping every endpoint's
    /// state.
    pub fn configure(&mut self, policy: Policy, outlier: OutlierConfig, locality: LocalityLb) {
        self.policy = policy;
        self.outlier = outlier;
        if locality != self.locality {
            self.locality = locality;
            self.reweigh();
        }
    }

    /// Replaces the endpoint set, keeping the state (connections, ejections) of endpoints
    /// whose id is still there.
    pub fn update(&mut self, endpoints: Vec<Endpoint>) {
        let mut old: HashMap<String, State> = self
            .endpoints
            .drain(..)
            .map(|e| e.id)
            .zip(self.state.drain(..))
            .collect();
        self.state = endpoints
            .iter()
            .map(|e| old.remove(&e.id).unwrap_or_default())
            .collect();
        self.endpoints = endpoints;
        self.reweigh();
    }

    fn available(&self, i: usize, now: Instant) -> bool {
        self.weights[i] > 0 && self.state[i].ejected_until.is_none_or(|t| now >= t)
    }

    /// Whether the endpoint is ejected at `now`.
    pub fn is_ejected(&self, i: usize, now: Instant) -> bool {
        self.state[i].ejected_until.is_some_and(|t| now < t)
    }

    /// Picks an endpoint, skipping `exclude` (those already tried for this connection).
    /// None when no endpoint is available at all.
    pub fn pick(&mut self, now: Instant, exclude: &[usize]) -> Option<usize> {
        // The closest tier that has anything available; failover to farther tiers only
        // when the closer ones are empty or ejected.
        let best_tier = (0..self.endpoints.len())
            .filter(|&i| self.available(i, now) && !exclude.contains(&i))
            .map(|i| self.tier(i))
            .min()?;
        let candidates: Vec<usize> = (0..self.endpoints.len())
            .filter(|&i| {
                self.available(i, now) && !exclude.contains(&i) && self.tier(i) == best_tier
            })
            .collect();
        Some(match self.policy {
            Policy::RoundRobin => self.smooth_round_robin(&candidates),
            Policy::LeastConnections => self.two_choices(&candidates),
            Policy::Random => self.weighted_random(&candidates),
        })
    }

    fn smooth_round_robin(&mut self, candidates: &[usize]) -> usize {
        let total: i64 = candidates.iter().map(|&i| i64::from(self.weights[i])).sum();
        let mut best = candidates[0];
        for &i in candidates {
            self.state[i].current += i64::from(self.weights[i]);
            if self.state[i].current > self.state[best].current {
                best = i;
            }
        }
        self.state[best].current -= total;
        best
    }

    fn weighted_random(&self, candidates: &[usize]) -> usize {
        let total: u64 = candidates.iter().map(|&i| u64::from(self.weights[i])).sum();
        let mut at = rand::thread_rng().gen_range(0..total.max(1));
        for &i in candidates {
            let w = u64::from(self.weights[i]);
            if at < w {
                return i;
            }
            at -= w;
        }
        candidates[candidates.len() - 1]
    }

    fn two_choices(&self, candidates: &[usize]) -> usize {
        if candidates.len() == 1 {
            return candidates[0];
        }
        let mut rng = rand::thread_rng();
        let a = candidates[rng.gen_range(0..candidates.len())];
        let mut b = candidates[rng.gen_range(0..candidates.len() - 1)];
        if b == a {
            b = candidates[candidates.len() - 1];
        }
        // Compare active/weight without division: a.active * b.weight vs b.active * a.weight.
        let load = |x: usize, y: usize| {
            u64::from(self.state[x].active) * u64::from(self.weights[y].max(1))
        };
        if load(a, b) <= load(b, a) {
            a
        } else {
            b
        }
    }

    /// A connection to `i` succeeded: it is open until [`Self::on_close`].
    pub fn on_connected(&mut self, i: usize) {
        let s = &mut self.state[i];
        s.active += 1;
        s.failures = 0;
    }

    pub fn on_close(&mut self, i: usize) {
        self.state[i].active = self.state[i].active.saturating_sub(1);
    }

    /// A connect to `i` failed (refused, timed out): counts towards ejection.
    pub fn on_connect_failed(&mut self, i: usize, now: Instant) -> FailureOutcome {
        let cfg = self.outlier;
        let s = &mut self.state[i];
        s.failures += 1;
        if s.failures < cfg.consecutive_failures {
            return FailureOutcome::Counted;
        }
        let ejected = (0..self.endpoints.len())
            .filter(|&j| j != i && self.is_ejected(j, now))
            .count();
        if (ejected + 1) * 100 > cfg.max_ejection_percent as usize * self.endpoints.len() {
            // Ejecting this one too would leave fewer endpoints than the share allowed.
            return FailureOutcome::Counted;
        }
        let s = &mut self.state[i];
        s.failures = 0;
        let factor = 1u32.checked_shl(s.ejections.min(16)).unwrap_or(u32::MAX);
        let ejection = cfg
            .base_ejection
            .saturating_mul(factor)
            .min(cfg.max_ejection);
        s.ejections += 1;
        let until = now + ejection;
        s.ejected_until = Some(until);
        FailureOutcome::Ejected(until)
    }

    /// Connections open to `i`.
    pub fn active(&self, i: usize) -> u32 {
        self.state[i].active
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_names_round_trip() {
        for p in [Policy::RoundRobin, Policy::LeastConnections, Policy::Random] {
            assert_eq!(p.to_string().parse::<Policy>(), Ok(p));
        }
        let err = "fastest".parse::<Policy>().unwrap_err().to_string();
        assert!(err.contains("least-connections"), "{err}");
    }

    fn ep(id: &str, region: &str, zone: &str, weight: u32) -> Endpoint {
        Endpoint {
            id: id.into(),
            locality: Locality {
                region: region.into(),
                zone: zone.into(),
                subzone: String::new(),
            },
            weight,
        }
    }

    fn caller() -> Locality {
        Locality::parse("eu/eu-1a")
    }

    #[test]
    fn round_robin_follows_weights_smoothly() {
        let mut b = Balancer::new(
            Policy::RoundRobin,
            OutlierConfig::default(),
            Locality::default(),
            vec![ep("a", "", "", 3), ep("b", "", "", 1)],
        );
        let now = Instant::now();
        let picks: Vec<usize> = (0..8).map(|_| b.pick(now, &[]).unwrap()).collect();
        assert_eq!(picks.iter().filter(|&&i| i == 0).count(), 6);
        assert_eq!(picks.iter().filter(|&&i| i == 1).count(), 2);
        // Smooth: never three of "b"'s share in a row at the start, and b appears within 4.
        assert!(picks[..4].contains(&1), "{picks:?}");
    }

    #[test]
    fn locality_first_then_failover() {
        let eps = vec![
            ep("far", "us", "us-1a", 1),
            ep("region", "eu", "eu-1b", 1),
            ep("zone", "eu", "eu-1a", 1),
        ];
        let mut b = Balancer::new(Policy::RoundRobin, OutlierConfig::default(), caller(), eps);
        let now = Instant::now();
        for _ in 0..5 {
            assert_eq!(b.pick(now, &[]), Some(2), "same zone first");
        }
        // The zone's endpoint tried already (retry on another endpoint): same region next.
        assert_eq!(b.pick(now, &[2]), Some(1));
        assert_eq!(b.pick(now, &[2, 1]), Some(0));
        assert_eq!(b.pick(now, &[2, 1, 0]), None);
    }

    #[test]
    fn no_more_than_the_max_ejection_percent_is_ejected_at_once() {
        let cfg = OutlierConfig {
            consecutive_failures: 1,
            max_ejection_percent: 50,
            ..OutlierConfig::default()
        };
        let eps = (0..4).map(|i| ep(&format!("e{i}"), "", "", 1)).collect();
        let mut b = Balancer::new(Policy::RoundRobin, cfg, Locality::default(), eps);
        let t0 = Instant::now();
        assert!(matches!(
            b.on_connect_failed(0, t0),
            FailureOutcome::Ejected(_)
        ));
        assert!(matches!(
            b.on_connect_failed(1, t0),
            FailureOutcome::Ejected(_)
        ));
        // A third of four would be 75%.
        assert_eq!(b.on_connect_failed(2, t0), FailureOutcome::Counted);
        assert!(!b.is_ejected(2, t0));
        assert_eq!(b.pick(t0, &[]).map(|i| i >= 2), Some(true));
    }

    #[test]
    fn random_follows_weights() {
        let mut b = Balancer::new(
            Policy::Random,
            OutlierConfig::default(),
            Locality::default(),
            vec![ep("a", "", "", 3), ep("b", "", "", 1), ep("c", "", "", 0)],
        );
        let now = Instant::now();
        let mut counts = [0usize; 3];
        for _ in 0..4000 {
            counts[b.pick(now, &[]).unwrap()] += 1;
        }
        assert_eq!(counts[2], 0, "weight 0 is never picked");
        assert!((2700..3300).contains(&counts[0]), "{counts:?}");
    }

    #[test]
    fn consecutive_failures_eject_with_growing_back_off() {
        let cfg = OutlierConfig {
            consecutive_failures: 3,
            base_ejection: Duration::from_secs(10),
            max_ejection: Duration::from_secs(35),
            ..OutlierConfig::default()
        };
        let mut b = Balancer::new(
            Policy::RoundRobin,
            cfg,
            caller(),
            vec![ep("zone", "eu", "eu-1a", 1), ep("region", "eu", "eu-1b", 1)],
        );
        let t0 = Instant::now();
        assert_eq!(b.on_connect_failed(0, t0), FailureOutcome::Counted);
        b.on_connected(0); // a success resets the count
        b.on_close(0);
        assert_eq!(b.on_connect_failed(0, t0), FailureOutcome::Counted);
        assert_eq!(b.on_connect_failed(0, t0), FailureOutcome::Counted);
        assert_eq!(
            b.on_connect_failed(0, t0),
            FailureOutcome::Ejected(t0 + Duration::from_secs(10))
        );
        assert!(b.is_ejected(0, t0));
        // Ejected: traffic fails over to the region.
        assert_eq!(b.pick(t0, &[]), Some(1));
        // Back after the ejection.
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.pick(t1, &[]), Some(0));
        // Ejected again: twice as long; the third time capped at the maximum.
        for _ in 0..3 {
            b.on_connect_failed(0, t1);
        }
        assert!(b.is_ejected(0, t1 + Duration::from_secs(19)));
        assert!(!b.is_ejected(0, t1 + Duration::from_secs(20)));
        let t2 = t1 + Duration::from_secs(20);
        let mut last = FailureOutcome::Counted;
        for _ in 0..3 {
            last = b.on_connect_failed(0, t2);
        }
        assert_eq!(last, FailureOutcome::Ejected(t2 + Duration::from_secs(35)));
    }

    #[test]
    fn least_connections_prefers_the_less_loaded() {
        let mut b = Balancer::new(
            Policy::LeastConnections,
            OutlierConfig::default(),
            Locality::default(),
            vec![ep("busy", "", "", 1), ep("idle", "", "", 1)],
        );
        for _ in 0..10 {
            b.on_connected(0);
        }
        let now = Instant::now();
        // With two endpoints the two choices are both of them: always the idle one.
        for _ in 0..50 {
            assert_eq!(b.pick(now, &[]), Some(1));
        }
        // Weight counts: 10 open on weight 20 is lighter than 1 open on weight 1.
        let mut w = Balancer::new(
            Policy::LeastConnections,
            OutlierConfig::default(),
            Locality::default(),
            vec![ep("big", "", "", 20), ep("small", "", "", 1)],
        );
        for _ in 0..10 {
            w.on_connected(0);
        }
        w.on_connected(1);
        assert_eq!(w.pick(now, &[]), Some(0));
    }

    #[test]
    fn updates_keep_the_state_of_endpoints_that_stay() {
        let mut b = Balancer::new(
            Policy::RoundRobin,
            OutlierConfig::default(),
            caller(),
            vec![ep("a", "eu", "eu-1a", 1), ep("b", "eu", "eu-1a", 1)],
        );
        let t0 = Instant::now();
        for _ in 0..DEFAULT_CONSECUTIVE_FAILURES {
            b.on_connect_failed(1, t0);
        }
        b.on_connected(0);
        b.update(vec![ep("b", "eu", "eu-1a", 1), ep("c", "eu", "eu-1a", 1)]);
        assert!(
            b.is_ejected(0, t0),
            "b is still ejected at its new position"
        );
        assert_eq!(b.active(0), 0);
        assert_eq!(b.pick(t0, &[]), Some(1));
        // Zero weight is never picked.
        b.update(vec![ep("z", "eu", "eu-1a", 0)]);
        assert_eq!(b.pick(t0, &[]), None);
    }

    /// Which endpoints (by id) `n` picks choose, counted.
    fn picks(
        b: &mut Balancer,
        n: usize,
        exclude: &[usize],
    ) -> std::collections::BTreeMap<String, usize> {
        let now = Instant::now();
        let mut counts = std::collections::BTreeMap::new();
        for _ in 0..n {
            let i = b.pick(now, exclude).unwrap();
            *counts.entry(b.endpoints()[i].id.clone()).or_insert(0) += 1;
        }
        counts
    }

    fn with_locality(locality: LocalityLb, eps: Vec<Endpoint>) -> Balancer {
        let mut b = Balancer::new(Policy::RoundRobin, OutlierConfig::default(), caller(), eps);
        b.configure(Policy::RoundRobin, OutlierConfig::default(), locality);
        b
    }

    #[test]
    fn failover_goes_to_the_named_region_before_any_other() {
        let eps = vec![
            ep("eu", "eu", "eu-1a", 1),
            ep("us", "us", "us-1a", 1),
            ep("ap", "ap", "ap-1a", 1),
        ];
        let failover = LocalityLb {
            failover: vec![("eu".into(), "ap".into()), ("us".into(), "eu".into())],
            ..Default::default()
        };
        let mut b = with_locality(failover, eps.clone());
        assert_eq!(
            picks(&mut b, 4, &[]).into_keys().collect::<Vec<_>>(),
            ["eu"]
        );
        // eu gone: ap, which eu fails over to, and not us (the rule from us does not apply).
        assert_eq!(
            picks(&mut b, 4, &[0]).into_keys().collect::<Vec<_>>(),
            ["ap"]
        );
        assert_eq!(
            picks(&mut b, 4, &[0, 2]).into_keys().collect::<Vec<_>>(),
            ["us"]
        );
        // Without the setting, ap and us are as far as each other.
        let mut plain = with_locality(LocalityLb::default(), eps);
        assert_eq!(picks(&mut plain, 4, &[0]).len(), 2);
    }

    #[test]
    fn failover_priority_prefers_matching_levels_in_order() {
        let eps = vec![
            ep("same-zone-other-region", "us", "eu-1a", 1),
            ep("same-region", "eu", "eu-1b", 1),
            ep("nothing", "ap", "ap-1a", 1),
        ];
        let by_region = LocalityLb {
            failover_priority: vec![LocalityLevel::Region, LocalityLevel::Zone],
            ..Default::default()
        };
        let mut b = with_locality(by_region, eps.clone());
        assert_eq!(
            picks(&mut b, 3, &[]).into_keys().collect::<Vec<_>>(),
            ["same-region"]
        );
        // A zone named like the caller's does not count when the region differs: the
        // levels match in order, so the other two are equally far.
        assert_eq!(picks(&mut b, 4, &[1]).len(), 2);
        // Zone first: the zone match wins over the region match.
        let by_zone = LocalityLb {
            failover_priority: vec![LocalityLevel::Zone],
            ..Default::default()
        };
        let mut b = with_locality(by_zone, eps);
        assert_eq!(
            picks(&mut b, 3, &[]).into_keys().collect::<Vec<_>>(),
            ["same-zone-other-region"]
        );
    }

    #[test]
    fn distribute_gives_each_locality_its_share() {
        let eps = vec![
            ep("a1", "eu", "eu-1a", 1),
            ep("a2", "eu", "eu-1a", 3),
            ep("b", "eu", "eu-1b", 1),
            ep("us", "us", "us-1a", 1),
        ];
        let split = LocalityLb {
            distribute: vec![
                ("us/*".into(), vec![("us".into(), 100)]),
                (
                    "eu/eu-1a/*".into(),
                    vec![("eu/eu-1a/*".into(), 80), ("eu/eu-1b/*".into(), 20)],
                ),
            ],
            ..Default::default()
        };
        let mut b = with_locality(split, eps.clone());
        let got = picks(&mut b, 1000, &[]);
        // eu-1a's 80 % split 1:3 by the endpoints' own weights; us, in no share, none.
        assert_eq!(got.get("a1"), Some(&200));
        assert_eq!(got.get("a2"), Some(&600));
        assert_eq!(got.get("b"), Some(&200));
        assert_eq!(got.get("us"), None);
        // A caller no `from` holds keeps the usual preference.
        let mut elsewhere = Balancer::new(
            Policy::RoundRobin,
            OutlierConfig::default(),
            Locality::parse("ap/ap-1a"),
            eps,
        );
        elsewhere.configure(
            Policy::RoundRobin,
            OutlierConfig::default(),
            LocalityLb {
                distribute: vec![("eu/*".into(), vec![("eu".into(), 100)])],
                ..Default::default()
            },
        );
        assert_eq!(picks(&mut elsewhere, 6, &[]).len(), 4);
    }

    #[test]
    fn locality_patterns() {
        let l = Locality::parse("eu/eu-1a/rack-1");
        for yes in [
            "*",
            "eu",
            "eu/*",
            "eu/eu-1a",
            "eu/eu-1a/*",
            "eu/eu-1a/rack-1",
        ] {
            assert!(locality_in(yes, &l), "{yes}");
        }
        for no in [
            "us",
            "us/*",
            "eu/eu-1b/*",
            "eu/eu-1a/rack-2",
            "eu/eu-1a/rack-1/x",
        ] {
            assert!(!locality_in(no, &l), "{no}");
        }
    }

    #[test]
    fn disabled_locality_treats_every_endpoint_alike() {
        let eps = vec![ep("near", "eu", "eu-1a", 1), ep("far", "us", "us-1a", 1)];
        let off = LocalityLb {
            disabled: true,
            ..Default::default()
        };
        let mut b = with_locality(off, eps);
        let got = picks(&mut b, 10, &[]);
        assert_eq!((got["near"], got["far"]), (5, 5));
    }
}
