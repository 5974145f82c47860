//! `WorkloadGroup`: the template a VM registers from, and its readiness probe.

use std::collections::BTreeMap;

use isthmus_proto::model::{Origin, Resource, WorkloadGroup};
use serde::Deserialize;

use super::defaults::SourceDefaults;
use super::metadata::{nullable, Meta};
use super::probe::{readiness_probe, ProbeSpec};
use super::problems::{check_labels, Problems};
use super::workload_entry::{workload, AddressRule, WorkloadContext, WorkloadEntrySpec};
use crate::validate::check_label_key;

/// A WorkloadEntry whose `address` is not used: a VM brings its own when it registers.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct WorkloadTemplateSpec {
    /// Tolerated, as Istio tolerates it, and not used.
    address: Option<String>,
    #[serde(deserialize_with = "nullable")]
    ports: BTreeMap<String, u32>,
    #[serde(deserialize_with = "nullable")]
    labels: BTreeMap<String, String>,
    network: Option<String>,
    locality: Option<String>,
    weight: Option<u32>,
    service_account: Option<String>,
}

impl From<WorkloadTemplateSpec> for WorkloadEntrySpec {
    fn from(t: WorkloadTemplateSpec) -> Self {
        Self {
            address: None,
            ports: t.ports,
            labels: t.labels,
            network: t.network,
            locality: t.locality,
            weight: t.weight,
            service_account: t.service_account,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct WorkloadGroupSpec {
    metadata: Option<GroupMetadataSpec>,
    template: Option<WorkloadTemplateSpec>,
    // Boxed: the probe is the largest part of a group, and most groups have none.
    probe: Option<Box<ProbeSpec>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
struct GroupMetadataSpec {
    #[serde(deserialize_with = "nullable")]
    labels: BTreeMap<String, String>,
    #[serde(deserialize_with = "nullable")]
    annotations: BTreeMap<String, String>,
}

pub(super) fn workload_group(
    meta: &Meta,
    spec: WorkloadGroupSpec,
    d: &SourceDefaults,
    p: &mut Problems,
) -> Vec<(Resource, String)> {
    let group_meta = spec.metadata.unwrap_or_default();
    check_labels(p, "spec.metadata.labels", &group_meta.labels);
    for key in group_meta.annotations.keys() {
        p.check(
            format!("spec.metadata.annotations.{key}"),
            check_label_key(key),
        );
    }
    let Some(template) = spec.template else {
        p.add("spec.template", "is required");
        return Vec::new();
    };
    if template.address.as_deref().is_some_and(|a| !a.is_empty()) {
        p.warn(
            "spec.template.address",
            "is not used: each VM registers with its own address",
        );
    }
    let ctx = WorkloadContext {
        field: "spec.template",
        // A VM brings its own name and address when it registers.
        name: String::new(),
        meta,
        base_labels: Some(("spec.metadata.labels", &group_meta.labels)),
        services: Vec::new(),
        origin: Origin::Vm,
        address: AddressRule::Absent,
    };
    let Some(template) = workload(&ctx, template.into(), d, p) else {
        return Vec::new();
    };
    let probe = spec.probe.and_then(|probe| readiness_probe(*probe, p));
    vec![(
        Resource::WorkloadGroup(Box::new(WorkloadGroup {
            name: meta.name.clone(),
            namespace: meta.namespace.clone(),
            labels: meta.labels.clone(),
            template,
            probe,
        })),
        "metadata.name".into(),
    )]
}
