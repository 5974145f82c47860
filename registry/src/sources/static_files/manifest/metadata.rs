//! The `metadata` every kind carries: name, namespace, labels and annotations, checked the
//! way Kubernetes checks them.

use std::collections::BTreeMap;

use serde::de::IgnoredAny;
use serde::{Deserialize, Deserializer};

use super::problems::{check_labels, Problems};
use crate::validate::{check_dns_name, check_label_key, check_network_id, dns_label};

/// Kubernetes puts an object without a namespace in `default`; so do we.
const DEFAULT_NAMESPACE: &str = "default";

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase", default)]
pub(super) struct RawMetadata {
    name: Option<String>,
    namespace: Option<String>,
    #[serde(deserialize_with = "nullable")]
    labels: BTreeMap<String, String>,
    /// Accepted so Kubernetes manifests port over; of Istio's, only a WorkloadEntry's
    /// ambient redirection mark is read.
    #[serde(deserialize_with = "nullable")]
    annotations: BTreeMap<String, String>,
    // What a cluster adds to an object (`kubectl get -o yaml` prints it): accepted so such
    // output loads; the values are neither checked nor read.
    #[allow(dead_code)]
    uid: Option<IgnoredAny>,
    #[allow(dead_code)]
    resource_version: Option<IgnoredAny>,
    #[allow(dead_code)]
    generation: Option<IgnoredAny>,
    #[allow(dead_code)]
    creation_timestamp: Option<IgnoredAny>,
    #[allow(dead_code)]
    deletion_timestamp: Option<IgnoredAny>,
    #[allow(dead_code)]
    deletion_grace_period_seconds: Option<IgnoredAny>,
    #[allow(dead_code)]
    managed_fields: Option<IgnoredAny>,
    #[allow(dead_code)]
    owner_references: Option<IgnoredAny>,
    #[allow(dead_code)]
    finalizers: Option<IgnoredAny>,
    #[allow(dead_code)]
    self_link: Option<IgnoredAny>,
    #[allow(dead_code)]
    generate_name: Option<IgnoredAny>,
}

/// Checked metadata. Values that failed their check are kept (so later checks still run) but
/// flagged where a later check would otherwise repeat the same complaint.
pub(super) struct Meta {
    pub(super) name: String,
    pub(super) namespace: String,
    pub(super) namespace_ok: bool,
    pub(super) labels: BTreeMap<String, String>,
    pub(super) annotations: BTreeMap<String, String>,
}

/// How a kind names its objects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Naming {
    /// In a namespace, with a DNS-name name (Istio's kinds).
    Namespaced,
    /// A network: no namespace, and the name is a network id.
    Network,
}

pub(super) fn check_metadata(naming: Naming, raw: RawMetadata, p: &mut Problems) -> Meta {
    let name = match raw.name.filter(|n| !n.is_empty()) {
        None => {
            p.add("metadata.name", "is required");
            String::new()
        }
        Some(name) => {
            let checked = if naming == Naming::Network {
                check_network_id(&name)
            } else {
                check_dns_name("name", &name, false)
            };
            p.check("metadata.name", checked);
            name
        }
    };
    let (namespace, namespace_ok) = if naming == Naming::Network {
        if let Some(ns) = raw.namespace {
            p.add(
                "metadata.namespace",
                format!("{ns:?}: a Network belongs to no namespace; remove metadata.namespace"),
            );
        }
        (String::new(), true)
    } else {
        // Kubernetes reads an empty namespace as the default one.
        let ns = raw
            .namespace
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| DEFAULT_NAMESPACE.into());
        let ok = p.check("metadata.namespace", dns_label("namespace", &ns));
        (ns, ok)
    };
    check_labels(p, "metadata.labels", &raw.labels);
    for key in raw.annotations.keys() {
        p.check(format!("metadata.annotations.{key}"), check_label_key(key));
    }
    Meta {
        name,
        namespace,
        namespace_ok,
        labels: raw.labels,
        annotations: raw.annotations,
    }
}

/// Lets `labels:` with nothing after it mean "no labels", as kubectl does.
pub(super) fn nullable<'de, D: Deserializer<'de>, T: Deserialize<'de> + Default>(
    d: D,
) -> Result<T, D::Error> {
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}
