//! Istio's traffic resources as isthmus reads them, for the L4 traffic it carries: a
//! DestinationRule's subsets and a VirtualService's `tcp` and `tls` routes, in the catalog
//! and (resolved for one hostname) in the views, with their wire forms.
//!
//! Hostnames here are always fully qualified: a short name is resolved where the resource
//! enters the catalog, against the resource's own namespace, as Istio resolves it.

use std::collections::BTreeMap;

use crate::model::{ExportTo, ModelError};
use crate::pb;

/// A named part of a service's endpoints: those whose labels include `labels`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Subset {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    /// Overrides the rule's policy for this subset's connections (field by field).
    pub policy: TrafficPolicy,
}

/// How a caller picks among a destination's endpoints (Istio's `loadBalancer.simple`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoadBalancer {
    RoundRobin,
    /// `LEAST_REQUEST` and `LEAST_CONN`: at L4 both are the fewest open connections.
    LeastConnections,
    Random,
}

/// Istio's `outlierDetection`, at L4: a connect failure is the gateway error a connection
/// can have.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OutlierPolicy {
    /// `consecutiveGatewayErrors` or `consecutive5xxErrors` (the smaller where both are
    /// set): failed connects in a row that eject an endpoint; 0, as in Istio, never.
    pub consecutive_errors: Option<u32>,
    /// `baseEjectionTime`: the first ejection; each further one of the same endpoint
    /// doubles it.
    pub base_ejection_ms: Option<u64>,
    /// `maxEjectionPercent`: at most this share of the endpoints ejected at once.
    pub max_ejection_percent: Option<u32>,
}

/// `connectionPool.tcp.tcpKeepalive`: keepalive on the caller's upstream sockets; a field
/// left out keeps the system's value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TcpKeepalive {
    /// Unanswered probes before the connection is dropped.
    pub probes: Option<u32>,
    /// Idle time before the first probe.
    pub time_ms: Option<u64>,
    /// Time between probes.
    pub interval_ms: Option<u64>,
}

/// Istio's `localityLbSetting`: how near endpoints are preferred.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LocalityLb {
    /// `enabled: false`: every endpoint is as near as any other.
    pub disabled: bool,
    /// `failover`: (from region, to region); a caller of `from` whose own region has
    /// nothing available goes to `to` before any other region.
    pub failover: Vec<(String, String)>,
    /// `failoverPriority`, of the locality labels: endpoints matching the caller on more
    /// of them, in order, are preferred.
    pub failover_priority: Vec<LocalityLevel>,
    /// `distribute`: callers in the first locality pattern send each locality pattern of
    /// the list its share (percent) of connections.
    pub distribute: Vec<(String, Vec<(String, u32)>)>,
}

/// A level of a locality, as `failoverPriority` names it by its label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalityLevel {
    Region,
    Zone,
    Subzone,
}

impl LocalityLevel {
    pub fn as_str(&self) -> &'static str {
        match self {
            LocalityLevel::Region => "region",
            LocalityLevel::Zone => "zone",
            LocalityLevel::Subzone => "subzone",
        }
    }

    /// The level of `region`, `zone` or `subzone`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "region" => Some(LocalityLevel::Region),
            "zone" => Some(LocalityLevel::Zone),
            "subzone" => Some(LocalityLevel::Subzone),
            _ => None,
        }
    }
}

/// What of a DestinationRule's `trafficPolicy` isthmus honours at L4. Every field is
/// optional: unset, the proxy's own setting applies (or an enclosing policy's).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TrafficPolicy {
    pub load_balancer: Option<LoadBalancer>,
    /// `connectionPool.tcp.maxConnections`: connections open at once from one caller.
    pub max_connections: Option<u32>,
    /// `connectionPool.tcp.connectTimeout`.
    pub connect_timeout_ms: Option<u64>,
    pub outlier: Option<OutlierPolicy>,
    /// `loadBalancer.localityLbSetting`, whole (a nearer level's replaces it).
    pub locality: Option<LocalityLb>,
    /// `connectionPool.tcp.tcpKeepalive`, whole.
    pub tcp_keepalive: Option<TcpKeepalive>,
    /// `portLevelSettings`: by service port, overriding the above field by field.
    pub ports: BTreeMap<u16, TrafficPolicy>,
}

impl TrafficPolicy {
    /// `self` with what `over` sets replacing it, field by field (a subset's policy over the
    /// rule's, a port's over either).
    pub fn overridden_by(&self, over: &TrafficPolicy) -> TrafficPolicy {
        let outlier = match (&self.outlier, &over.outlier) {
            (Some(a), Some(b)) => Some(OutlierPolicy {
                consecutive_errors: b.consecutive_errors.or(a.consecutive_errors),
                base_ejection_ms: b.base_ejection_ms.or(a.base_ejection_ms),
                max_ejection_percent: b.max_ejection_percent.or(a.max_ejection_percent),
            }),
            (a, b) => b.clone().or_else(|| a.clone()),
        };
        TrafficPolicy {
            load_balancer: over.load_balancer.or(self.load_balancer),
            max_connections: over.max_connections.or(self.max_connections),
            connect_timeout_ms: over.connect_timeout_ms.or(self.connect_timeout_ms),
            outlier,
            locality: over.locality.clone().or_else(|| self.locality.clone()),
            tcp_keepalive: over.tcp_keepalive.or(self.tcp_keepalive),
            ports: BTreeMap::new(),
        }
    }

    /// The policy for connections to `port` of `subset` (None: the whole service): the
    /// rule's, then the subset's, each with its own port-level settings on top, Istio's
    /// order of precedence.
    pub fn effective(&self, subset: Option<&TrafficPolicy>, port: u16) -> TrafficPolicy {
        let mut p = self.clone();
        if let Some(at_port) = self.ports.get(&port) {
            p = p.overridden_by(at_port);
        }
        if let Some(s) = subset {
            p = p.overridden_by(s);
            if let Some(at_port) = s.ports.get(&port) {
                p = p.overridden_by(at_port);
            }
        }
        p.ports.clear();
        p
    }

    pub fn is_empty(&self) -> bool {
        *self == TrafficPolicy::default()
    }
}

/// A service's traffic policy held out of line: most services have none, and a view then
/// holds a null pointer rather than the policy's 208 bytes for each of them. It reads as
/// the policy it holds (the empty one when none).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PolicyBox(Option<Box<TrafficPolicy>>);

/// What a [`PolicyBox`] without a policy reads as.
static NO_POLICY: TrafficPolicy = TrafficPolicy {
    load_balancer: None,
    max_connections: None,
    connect_timeout_ms: None,
    outlier: None,
    locality: None,
    tcp_keepalive: None,
    ports: BTreeMap::new(),
};

impl From<TrafficPolicy> for PolicyBox {
    fn from(policy: TrafficPolicy) -> Self {
        Self((!policy.is_empty()).then(|| Box::new(policy)))
    }
}

impl std::ops::Deref for PolicyBox {
    type Target = TrafficPolicy;
    fn deref(&self) -> &TrafficPolicy {
        self.0.as_deref().unwrap_or(&NO_POLICY)
    }
}

impl Subset {
    /// Whether an endpoint with `labels` belongs to this subset.
    pub fn selects(&self, labels: &(impl super::LabelLookup + ?Sized)) -> bool {
        self.labels
            .iter()
            .all(|(k, v)| labels.label(k) == Some(v.as_str()))
    }
}

/// Istio's DestinationRule, as far as isthmus honours it: the subsets of one host.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DestinationRule {
    pub name: String,
    pub namespace: String,
    /// The fully qualified hostname it applies to.
    pub host: String,
    pub subsets: Vec<Subset>,
    /// The rule's `trafficPolicy`, as far as isthmus honours it.
    pub policy: TrafficPolicy,
    pub export_to: ExportTo,
}

/// Where a route sends its share of connections.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RouteDestination {
    /// Fully qualified.
    pub host: String,
    /// Empty: every endpoint of the host.
    pub subset: String,
    /// 0: the port the connection was made to.
    pub port: u16,
    /// Relative to the route's other destinations.
    pub weight: u32,
}

/// One `tcp` or `tls` route: the first route whose match holds takes the connection.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct L4Route {
    /// Destination ports matched; empty: any.
    pub ports: Vec<u16>,
    /// SNI names matched (`tls` routes); empty: any.
    pub sni_hosts: Vec<String>,
    /// Labels the calling workload must carry; empty: any caller.
    pub source_labels: BTreeMap<String, String>,
    pub destinations: Vec<RouteDestination>,
}

impl L4Route {
    /// Whether a connection to `port` from a workload labelled `source` (with `sni`, when
    /// the caller names one) takes this route.
    pub fn matches(&self, port: u16, source: &BTreeMap<String, String>, sni: Option<&str>) -> bool {
        (self.ports.is_empty() || self.ports.contains(&port))
            && self
                .source_labels
                .iter()
                .all(|(k, v)| source.get(k) == Some(v))
            && (self.sni_hosts.is_empty()
                || sni.is_some_and(|s| self.sni_hosts.iter().any(|h| host_matches(h, s))))
    }
}

/// Whether `pattern` (a hostname, or `*.suffix`) names `host`.
pub fn host_matches(pattern: &str, host: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => host
            .strip_suffix(suffix)
            .is_some_and(|rest| rest.ends_with('.') && rest.len() > 1),
        None => pattern == "*" || pattern == host,
    }
}

/// Istio's VirtualService, as far as isthmus honours it: its `tcp` and `tls` routes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct VirtualService {
    pub name: String,
    pub namespace: String,
    /// Fully qualified hostnames it routes.
    pub hosts: Vec<String>,
    pub routes: Vec<L4Route>,
    pub export_to: ExportTo,
}

// ---- wire forms ----------------------------------------------------------------------------

fn port(field: &str, p: u32) -> Result<u16, ModelError> {
    u16::try_from(p).map_err(|_| ModelError::Invalid {
        field: field.into(),
        why: format!("{p} is not a port"),
    })
}

impl From<&Subset> for pb::Subset {
    fn from(s: &Subset) -> Self {
        Self {
            name: s.name.clone(),
            labels: s.labels.clone().into_iter().collect(),
            policy: (!s.policy.is_empty()).then(|| (&s.policy).into()),
        }
    }
}

impl TryFrom<pb::Subset> for Subset {
    type Error = ModelError;
    fn try_from(s: pb::Subset) -> Result<Self, ModelError> {
        Ok(Self {
            name: s.name,
            labels: s.labels.into_iter().collect(),
            policy: s
                .policy
                .map(TryInto::try_into)
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

impl From<&TrafficPolicy> for pb::TrafficPolicy {
    fn from(p: &TrafficPolicy) -> Self {
        Self {
            load_balancer: match p.load_balancer {
                None => pb::LoadBalancer::Unset,
                Some(LoadBalancer::RoundRobin) => pb::LoadBalancer::RoundRobin,
                Some(LoadBalancer::LeastConnections) => pb::LoadBalancer::LeastConnections,
                Some(LoadBalancer::Random) => pb::LoadBalancer::Random,
            }
            .into(),
            max_connections: p.max_connections,
            connect_timeout_ms: p.connect_timeout_ms,
            outlier: p.outlier.as_ref().map(|o| pb::OutlierPolicy {
                consecutive_errors: o.consecutive_errors,
                base_ejection_ms: o.base_ejection_ms,
                max_ejection_percent: o.max_ejection_percent,
            }),
            ports: p
                .ports
                .iter()
                .map(|(port, at)| (u32::from(*port), at.into()))
                .collect(),
            locality: p.locality.as_ref().map(|l| pb::LocalityLb {
                disabled: l.disabled,
                failover: l
                    .failover
                    .iter()
                    .map(|(from, to)| pb::LocalityFailover {
                        from: from.clone(),
                        to: to.clone(),
                    })
                    .collect(),
                failover_priority: l
                    .failover_priority
                    .iter()
                    .map(|level| level.as_str().to_string())
                    .collect(),
                distribute: l
                    .distribute
                    .iter()
                    .map(|(from, to)| pb::LocalityDistribute {
                        from: from.clone(),
                        to: to.iter().cloned().collect(),
                    })
                    .collect(),
            }),
            tcp_keepalive: p.tcp_keepalive.map(|k| pb::TcpKeepalive {
                probes: k.probes,
                time_ms: k.time_ms,
                interval_ms: k.interval_ms,
            }),
        }
    }
}

impl TryFrom<pb::TrafficPolicy> for TrafficPolicy {
    type Error = ModelError;
    fn try_from(p: pb::TrafficPolicy) -> Result<Self, ModelError> {
        Ok(Self {
            load_balancer: match p.load_balancer() {
                pb::LoadBalancer::Unset => None,
                pb::LoadBalancer::RoundRobin => Some(LoadBalancer::RoundRobin),
                pb::LoadBalancer::LeastConnections => Some(LoadBalancer::LeastConnections),
                pb::LoadBalancer::Random => Some(LoadBalancer::Random),
            },
            max_connections: p.max_connections,
            connect_timeout_ms: p.connect_timeout_ms,
            outlier: p.outlier.map(|o| OutlierPolicy {
                consecutive_errors: o.consecutive_errors,
                base_ejection_ms: o.base_ejection_ms,
                max_ejection_percent: o.max_ejection_percent,
            }),
            ports: p
                .ports
                .into_iter()
                .map(|(port_no, at)| Ok((port("policy.ports", port_no)?, at.try_into()?)))
                .collect::<Result<_, ModelError>>()?,
            locality: p.locality.map(locality_lb).transpose()?,
            tcp_keepalive: p.tcp_keepalive.map(|k| TcpKeepalive {
                probes: k.probes,
                time_ms: k.time_ms,
                interval_ms: k.interval_ms,
            }),
        })
    }
}

fn locality_lb(l: pb::LocalityLb) -> Result<LocalityLb, ModelError> {
    let failover_priority = l
        .failover_priority
        .iter()
        .map(|s| {
            LocalityLevel::parse(s).ok_or_else(|| ModelError::Invalid {
                field: "policy.locality.failover_priority".into(),
                why: format!("{s:?} is not region, zone or subzone"),
            })
        })
        .collect::<Result<_, _>>()?;
    Ok(LocalityLb {
        disabled: l.disabled,
        failover: l.failover.into_iter().map(|f| (f.from, f.to)).collect(),
        failover_priority,
        distribute: l
            .distribute
            .into_iter()
            .map(|d| (d.from, d.to.into_iter().collect()))
            .collect(),
    })
}

impl From<&DestinationRule> for pb::DestinationRule {
    fn from(d: &DestinationRule) -> Self {
        Self {
            name: d.name.clone(),
            namespace: d.namespace.clone(),
            host: d.host.clone(),
            subsets: d.subsets.iter().map(Into::into).collect(),
            policy: (!d.policy.is_empty()).then(|| (&d.policy).into()),
            export_to: d.export_to.to_wire(),
        }
    }
}

impl TryFrom<pb::DestinationRule> for DestinationRule {
    type Error = ModelError;
    fn try_from(d: pb::DestinationRule) -> Result<Self, ModelError> {
        Ok(Self {
            export_to: ExportTo::from_wire(&d.export_to, &d.namespace),
            name: d.name,
            namespace: d.namespace,
            host: d.host,
            subsets: d
                .subsets
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
            policy: d
                .policy
                .map(TryInto::try_into)
                .transpose()?
                .unwrap_or_default(),
        })
    }
}

impl From<&L4Route> for pb::L4Route {
    fn from(r: &L4Route) -> Self {
        Self {
            ports: r.ports.iter().map(|p| u32::from(*p)).collect(),
            sni_hosts: r.sni_hosts.clone(),
            source_labels: r.source_labels.clone().into_iter().collect(),
            destinations: r
                .destinations
                .iter()
                .map(|d| pb::RouteDestination {
                    host: d.host.clone(),
                    subset: d.subset.clone(),
                    port: d.port.into(),
                    weight: d.weight,
                })
                .collect(),
        }
    }
}

impl TryFrom<pb::L4Route> for L4Route {
    type Error = ModelError;
    fn try_from(r: pb::L4Route) -> Result<Self, ModelError> {
        Ok(Self {
            ports: r
                .ports
                .iter()
                .map(|p| port("routes.ports", *p))
                .collect::<Result<_, _>>()?,
            sni_hosts: r.sni_hosts,
            source_labels: r.source_labels.into_iter().collect(),
            destinations: r
                .destinations
                .into_iter()
                .map(|d| {
                    Ok(RouteDestination {
                        port: port("routes.destinations.port", d.port)?,
                        host: d.host,
                        subset: d.subset,
                        weight: d.weight,
                    })
                })
                .collect::<Result<_, ModelError>>()?,
        })
    }
}

impl From<&VirtualService> for pb::VirtualService {
    fn from(v: &VirtualService) -> Self {
        Self {
            name: v.name.clone(),
            namespace: v.namespace.clone(),
            hosts: v.hosts.clone(),
            routes: v.routes.iter().map(Into::into).collect(),
            export_to: v.export_to.to_wire(),
        }
    }
}

impl TryFrom<pb::VirtualService> for VirtualService {
    type Error = ModelError;
    fn try_from(v: pb::VirtualService) -> Result<Self, ModelError> {
        Ok(Self {
            export_to: ExportTo::from_wire(&v.export_to, &v.namespace),
            routes: v
                .routes
                .into_iter()
                .map(TryInto::try_into)
                .collect::<Result<_, _>>()?,
            name: v.name,
            namespace: v.namespace,
            hosts: v.hosts,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_effective_policy_is_rule_then_rule_port_then_subset_then_subset_port() {
        let rule = TrafficPolicy {
            max_connections: Some(100),
            connect_timeout_ms: Some(1000),
            outlier: Some(OutlierPolicy {
                consecutive_errors: Some(5),
                base_ejection_ms: Some(30_000),
                ..Default::default()
            }),
            ports: [(
                80,
                TrafficPolicy {
                    max_connections: Some(50),
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        };
        let subset = TrafficPolicy {
            connect_timeout_ms: Some(200),
            outlier: Some(OutlierPolicy {
                consecutive_errors: Some(2),
                ..Default::default()
            }),
            ports: [(
                80,
                TrafficPolicy {
                    max_connections: Some(7),
                    ..Default::default()
                },
            )]
            .into(),
            ..Default::default()
        };
        let e = rule.effective(Some(&subset), 80);
        assert_eq!(e.max_connections, Some(7));
        assert_eq!(e.connect_timeout_ms, Some(200));
        let o = e.outlier.unwrap();
        assert_eq!(o.consecutive_errors, Some(2));
        assert_eq!(o.base_ejection_ms, Some(30_000), "kept from the rule");
        assert_eq!(rule.effective(None, 80).max_connections, Some(50));
        assert_eq!(rule.effective(None, 81).max_connections, Some(100));
        assert_eq!(rule.effective(Some(&subset), 81).max_connections, Some(100));
    }

    #[test]
    fn wildcard_hosts_match_one_or_more_labels_below_the_suffix() {
        assert!(host_matches(
            "*.shop.svc.cluster.local",
            "web.shop.svc.cluster.local"
        ));
        assert!(!host_matches(
            "*.shop.svc.cluster.local",
            "shop.svc.cluster.local"
        ));
        assert!(host_matches("web.example", "web.example"));
        assert!(!host_matches("web.example", "www.example"));
        assert!(host_matches("*", "anything.example"));
    }

    #[test]
    fn a_route_matches_port_source_labels_and_sni() {
        let r = L4Route {
            ports: vec![9080],
            source_labels: [("app".to_string(), "web".to_string())].into(),
            ..Default::default()
        };
        let web = [("app".to_string(), "web".to_string())].into();
        assert!(r.matches(9080, &web, None));
        assert!(!r.matches(9081, &web, None));
        assert!(!r.matches(9080, &BTreeMap::new(), None));
        let tls = L4Route {
            sni_hosts: vec!["*.example".into()],
            ..Default::default()
        };
        assert!(tls.matches(443, &BTreeMap::new(), Some("a.example")));
        assert!(!tls.matches(443, &BTreeMap::new(), None));
    }

    #[test]
    fn resources_survive_their_wire_form() {
        let dr = DestinationRule {
            name: "web".into(),
            namespace: "shop".into(),
            host: "web.shop.svc.cluster.local".into(),
            subsets: vec![Subset {
                name: "v1".into(),
                labels: [("version".to_string(), "v1".to_string())].into(),
                policy: TrafficPolicy {
                    max_connections: Some(5),
                    ..Default::default()
                },
            }],
            policy: TrafficPolicy {
                load_balancer: Some(LoadBalancer::Random),
                connect_timeout_ms: Some(250),
                outlier: Some(OutlierPolicy {
                    consecutive_errors: Some(2),
                    base_ejection_ms: Some(1000),
                    max_ejection_percent: Some(50),
                }),
                ports: [(
                    9080,
                    TrafficPolicy {
                        max_connections: Some(9),
                        ..Default::default()
                    },
                )]
                .into(),
                locality: Some(LocalityLb {
                    disabled: false,
                    failover: vec![("eu".into(), "us".into())],
                    failover_priority: vec![LocalityLevel::Region, LocalityLevel::Subzone],
                    distribute: vec![(
                        "eu/*".into(),
                        vec![("eu/a/*".into(), 60), ("eu/b/*".into(), 40)],
                    )],
                }),
                tcp_keepalive: Some(TcpKeepalive {
                    probes: Some(3),
                    time_ms: Some(60_000),
                    interval_ms: None,
                }),
                ..Default::default()
            },
            export_to: ExportTo::Public,
        };
        assert_eq!(
            DestinationRule::try_from(pb::DestinationRule::from(&dr)).unwrap(),
            dr
        );
        let vs = VirtualService {
            name: "web".into(),
            namespace: "shop".into(),
            hosts: vec!["web.shop.svc.cluster.local".into()],
            routes: vec![L4Route {
                ports: vec![9080],
                destinations: vec![
                    RouteDestination {
                        host: "web.shop.svc.cluster.local".into(),
                        subset: "v1".into(),
                        port: 0,
                        weight: 90,
                    },
                    RouteDestination {
                        host: "web.shop.svc.cluster.local".into(),
                        subset: "v2".into(),
                        port: 9090,
                        weight: 10,
                    },
                ],
                ..Default::default()
            }],
            export_to: ExportTo::Nobody,
        };
        assert_eq!(
            VirtualService::try_from(pb::VirtualService::from(&vs)).unwrap(),
            vs
        );
    }
}
