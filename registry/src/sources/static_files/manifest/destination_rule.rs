//! `DestinationRule`: the subsets of one host, which a VirtualService's routes name. Its
//! traffic policies (connection pools, load balancing, TLS, outlier detection) are accepted
//! and reported as not honoured yet, a field at a time.

use std::collections::BTreeMap;

use isthmus_proto::model::{DestinationRule, Resource, Subset};
use serde::Deserialize;
use serde_yaml_ng::Mapping;

use super::defaults::SourceDefaults;
use super::metadata::{nullable, Meta};
use super::problems::{check_labels, Problems};
use super::service_entry::export_to;
use super::traffic::{resolve_host, warn_not_honoured, HostContext, NOT_HONOURED};
use crate::validate::dns_label;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct DestinationRuleSpec {
    host: Option<String>,
    #[serde(deserialize_with = "nullable")]
    subsets: Vec<SubsetSpec>,
    /// Checked only for being a mapping; each of its fields is warned about.
    traffic_policy: Option<Mapping>,
    /// Which callers the rule applies to; not honoured, so the rule applies to every caller.
    workload_selector: Option<Mapping>,
    #[serde(deserialize_with = "nullable")]
    export_to: Vec<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct SubsetSpec {
    name: Option<String>,
    #[serde(deserialize_with = "nullable")]
    labels: BTreeMap<String, String>,
    traffic_policy: Option<Mapping>,
}

pub(super) fn destination_rule(
    meta: &Meta,
    spec: DestinationRuleSpec,
    d: &SourceDefaults,
    p: &mut Problems,
) -> Vec<(Resource, String)> {
    let at = HostContext {
        namespace: &meta.namespace,
        domain: &d.domain,
    };
    let host = resolve_host("spec.host", spec.host.as_deref(), at, p);
    if let Some(policy) = &spec.traffic_policy {
        warn_not_honoured(p, "spec.trafficPolicy", policy);
    }
    let subsets = subsets(spec.subsets, p);
    if spec.workload_selector.is_some() {
        p.warn(
            "spec.workloadSelector",
            format!("{NOT_HONOURED}: the rule applies to every caller"),
        );
    }
    let export_to = export_to(&spec.export_to, &meta.namespace, p);
    let Some(host) = host else {
        return Vec::new();
    };
    vec![(
        Resource::DestinationRule(Box::new(DestinationRule {
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            host,
            subsets,
            export_to,
        })),
        "metadata.name".into(),
    )]
}

/// `spec.subsets`: each named by a DNS label (the name routes refer to, and part of the
/// cluster names Istio derives from it), unique within the rule, with valid labels.
fn subsets(specs: Vec<SubsetSpec>, p: &mut Problems) -> Vec<Subset> {
    let mut subsets: Vec<(Subset, String)> = Vec::new();
    for (i, spec) in specs.into_iter().enumerate() {
        let field = format!("spec.subsets[{i}]");
        if let Some(policy) = &spec.traffic_policy {
            warn_not_honoured(p, &format!("{field}.trafficPolicy"), policy);
        }
        check_labels(p, &format!("{field}.labels"), &spec.labels);
        let Some(name) = subset_name(&field, spec.name, p) else {
            continue;
        };
        if let Some((_, first)) = subsets.iter().find(|(s, _)| s.name == name) {
            p.add(
                format!("{field}.name"),
                format!(
                    "{name:?} is the name of another subset ({first}); subset names must be unique"
                ),
            );
            continue;
        }
        let subset = Subset {
            name,
            labels: spec.labels,
        };
        subsets.push((subset, field));
    }
    subsets.into_iter().map(|(s, _)| s).collect()
}

/// A subset's name, required and a DNS label, or `None` with its problem recorded.
fn subset_name(field: &str, name: Option<String>, p: &mut Problems) -> Option<String> {
    match name.filter(|n| !n.is_empty()) {
        None => {
            p.add(format!("{field}.name"), "is required");
            None
        }
        Some(name) => p
            .check(format!("{field}.name"), dns_label("subset name", &name))
            .then_some(name),
    }
}
