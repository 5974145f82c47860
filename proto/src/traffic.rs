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
}

impl Subset {
    /// Whether an endpoint with `labels` belongs to this subset.
    pub fn selects(&self, labels: &BTreeMap<String, String>) -> bool {
        self.labels.iter().all(|(k, v)| labels.get(k) == Some(v))
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
        }
    }
}

impl From<pb::Subset> for Subset {
    fn from(s: pb::Subset) -> Self {
        Self {
            name: s.name,
            labels: s.labels.into_iter().collect(),
        }
    }
}

impl From<&DestinationRule> for pb::DestinationRule {
    fn from(d: &DestinationRule) -> Self {
        Self {
            name: d.name.clone(),
            namespace: d.namespace.clone(),
            host: d.host.clone(),
            subsets: d.subsets.iter().map(Into::into).collect(),
            export_to: d.export_to.to_wire(),
        }
    }
}

impl From<pb::DestinationRule> for DestinationRule {
    fn from(d: pb::DestinationRule) -> Self {
        Self {
            export_to: ExportTo::from_wire(&d.export_to, &d.namespace),
            name: d.name,
            namespace: d.namespace,
            host: d.host,
            subsets: d.subsets.into_iter().map(Into::into).collect(),
        }
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
            }],
            export_to: ExportTo::Public,
        };
        assert_eq!(DestinationRule::from(pb::DestinationRule::from(&dr)), dr);
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
