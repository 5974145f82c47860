//! The document envelope: a file is a stream of YAML documents, each a mapping of
//! `apiVersion`, `kind`, `metadata` and `spec`. The envelope is checked by hand, so a wrong
//! `kind` does not hide a wrong `metadata`; each section then goes through serde on its own,
//! and the spec to its kind's conversion.

use isthmus_proto::config::{yaml_depth, MAX_YAML_DEPTH};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use isthmus_proto::model::Resource;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_path_to_error::Segment;
use serde_yaml_ng::Value;

use super::defaults::SourceDefaults;
use super::metadata::{check_metadata, Naming, RawMetadata};
use super::network::{network, NetworkSpec};
use super::problems::{Problems, ResourceError};
use super::service_entry::{service_entry, ServiceEntrySpec};
use super::workload_entry::{workload_entry, WorkloadEntrySpec};
use super::workload_group::{workload_group, WorkloadGroupSpec};

/// Istio's API versions for its networking kinds; a manifest ports over unchanged.
const ISTIO_API_VERSIONS: &[&str] = &[
    "networking.istio.io/v1",
    "networking.istio.io/v1beta1",
    "networking.istio.io/v1alpha3",
];
/// isthmus' own API version, accepted for every kind.
const ISTHMUS_API_VERSION: &str = "isthmus.io/v1alpha1";

/// How many structural errors one section may report before we stop looking; each one costs a
/// re-run of the deserializer, and an operator will not read more than this at once.
const MAX_STRUCTURE_ERRORS: usize = 32;

/// A resource and where it was defined, so a later conflict can point at the definition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Located {
    /// Shared with the effective set and the catalog.
    pub resource: Arc<Resource>,
    /// `None` for resources that came from the store rather than from a file.
    pub document: Option<usize>,
    pub field: String,
}

/// Parses every document of one file. Stops at the first YAML syntax error: after one, the
/// parser's idea of where the next document starts cannot be trusted (and serde_yaml_ng can
/// panic when asked to continue).
pub(crate) fn parse(
    path: &Path,
    text: &str,
    defaults: &SourceDefaults,
) -> Result<Vec<Located>, Vec<ResourceError>> {
    let mut problems = Problems::new(path);
    let mut out: Vec<Located> = Vec::new();
    let mut seen: BTreeMap<String, (usize, String)> = BTreeMap::new();
    let depth = yaml_depth(text);
    if depth > MAX_YAML_DEPTH {
        problems.add(
            "",
            format!(
                "nests {depth} levels deep, more than the {MAX_YAML_DEPTH} a resource file may: \
                 refused before parsing"
            ),
        );
        return Err(problems.errors);
    }
    for (i, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
        let number = i + 1;
        problems.document = Some(number);
        let value = match Value::deserialize(document) {
            Ok(v) => v,
            Err(e) => {
                let mut message = format!("invalid YAML: {e}");
                // Some errors (duplicate keys) know their line but do not print it.
                if let (Some(at), false) = (e.location(), message.contains(" at line ")) {
                    message += &format!(" at line {} column {}", at.line(), at.column());
                }
                problems.add("", message);
                break;
            }
        };
        for (resource, field) in parse_document(value, defaults, &mut problems) {
            let key = resource.key();
            if let Some((first_doc, first_field)) = seen.get(&key) {
                problems.add(
                    field,
                    format!("{key} is already defined in document {first_doc} ({first_field})"),
                );
                continue;
            }
            seen.insert(key, (number, field.clone()));
            out.push(Located {
                resource: Arc::new(resource),
                document: Some(number),
                field,
            });
        }
    }
    if problems.errors.is_empty() {
        Ok(out)
    } else {
        Err(problems.errors)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ServiceEntry,
    WorkloadEntry,
    WorkloadGroup,
    Network,
}

impl Kind {
    const ALL: [Kind; 4] = [
        Kind::ServiceEntry,
        Kind::WorkloadEntry,
        Kind::WorkloadGroup,
        Kind::Network,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::ServiceEntry => "ServiceEntry",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::WorkloadGroup => "WorkloadGroup",
            Kind::Network => "Network",
        }
    }

    fn accepts(self, api_version: &str) -> bool {
        api_version == ISTHMUS_API_VERSION
            || (self != Kind::Network && ISTIO_API_VERSIONS.contains(&api_version))
    }

    fn api_versions(self) -> String {
        if self == Kind::Network {
            ISTHMUS_API_VERSION.to_string()
        } else {
            format!(
                "{}, or {ISTHMUS_API_VERSION}",
                ISTIO_API_VERSIONS.join(", ")
            )
        }
    }
}

fn kind_names() -> String {
    Kind::ALL.map(Kind::name).join(", ")
}

/// One document: its envelope is checked by hand (so a wrong `kind` does not hide a wrong
/// `metadata`), then `metadata` and `spec` go through serde separately, then the spec is
/// converted by its kind.
fn parse_document(
    mut value: Value,
    defaults: &SourceDefaults,
    p: &mut Problems,
) -> Vec<(Resource, String)> {
    if value.is_null() {
        return Vec::new();
    }
    if let Err(e) = value.apply_merge() {
        p.add("", format!("invalid YAML merge key (<<): {e}"));
        return Vec::new();
    }
    let Value::Mapping(map) = value else {
        p.add(
            "",
            format!(
                "a resource is a mapping with apiVersion, kind, metadata and spec; found {}",
                describe(&value)
            ),
        );
        return Vec::new();
    };
    let before = p.errors.len();
    let envelope = Envelope::split(map, p);
    let kind = kind(envelope.kind, p);
    check_api_version(envelope.api_version, kind, p);
    let Some(kind) = kind else {
        return Vec::new();
    };
    let Some((metadata, spec)) = sections(kind, envelope.metadata, envelope.spec, p) else {
        return Vec::new();
    };
    let naming = if kind == Kind::Network {
        Naming::Network
    } else {
        Naming::Namespaced
    };
    let meta = check_metadata(naming, metadata, p);
    let resources = match spec {
        Spec::ServiceEntry(spec) => service_entry(&meta, spec, defaults, p),
        Spec::WorkloadEntry(spec) => workload_entry(&meta, spec, defaults, p),
        Spec::WorkloadGroup(spec) => workload_group(&meta, spec, defaults, p),
        Spec::Network(spec) => network(&meta, spec, p),
    };
    if p.errors.len() > before {
        // Resources built around an error would only produce duplicate-key noise.
        return Vec::new();
    }
    resources
}

/// A document's four top-level fields, each as written.
struct Envelope {
    api_version: Option<Value>,
    kind: Option<Value>,
    metadata: Option<Value>,
    spec: Option<Value>,
}

impl Envelope {
    /// Takes the four fields out of the document, reporting any other.
    fn split(map: serde_yaml_ng::Mapping, p: &mut Problems) -> Self {
        let mut e = Envelope {
            api_version: None,
            kind: None,
            metadata: None,
            spec: None,
        };
        for (key, v) in map {
            match key.as_str() {
                Some("apiVersion") => e.api_version = Some(v),
                Some("kind") => e.kind = Some(v),
                Some("metadata") => e.metadata = Some(v),
                Some("spec") => e.spec = Some(v),
                Some(other) => p.add(
                    other,
                    "unknown field; a resource has only apiVersion, kind, metadata and spec",
                ),
                None => p.add("", format!("unknown field {}", describe(&key))),
            }
        }
        e
    }
}

fn kind(value: Option<Value>, p: &mut Problems) -> Option<Kind> {
    match value {
        None | Some(Value::Null) => {
            p.add("kind", format!("is required (one of {})", kind_names()));
            None
        }
        Some(Value::String(k)) => match Kind::ALL.into_iter().find(|c| c.name() == k) {
            Some(kind) => Some(kind),
            None => {
                p.add(
                    "kind",
                    format!(
                        "{k:?} is not a kind this source reads; use one of {}",
                        kind_names()
                    ),
                );
                None
            }
        },
        Some(other) => {
            p.add(
                "kind",
                format!("must be a string; found {}", describe(&other)),
            );
            None
        }
    }
}

/// `apiVersion` is required, and must be one the kind (when known) is served under.
fn check_api_version(value: Option<Value>, kind: Option<Kind>, p: &mut Problems) {
    match (value, kind) {
        (None | Some(Value::Null), _) => p.add("apiVersion", "is required"),
        (Some(Value::String(v)), Some(kind)) if !kind.accepts(&v) => p.add(
            "apiVersion",
            format!(
                "{v:?} is not an API version of {}; use {}",
                kind.name(),
                kind.api_versions()
            ),
        ),
        (Some(Value::String(_)), _) => {}
        (Some(other), _) => p.add(
            "apiVersion",
            format!("must be a string; found {}", describe(&other)),
        ),
    }
}

/// The structural pass over `metadata` and `spec`; `None` when either has an error, since
/// values guessed around it would only produce follow-on errors.
fn sections(
    kind: Kind,
    metadata: Option<Value>,
    spec: Option<Value>,
    p: &mut Problems,
) -> Option<(RawMetadata, Spec)> {
    let structure_before = p.errors.len();
    let metadata: Option<RawMetadata> = section(p, "metadata", metadata, false);
    let required = kind != Kind::Network;
    let built = match kind {
        Kind::ServiceEntry => {
            section::<ServiceEntrySpec>(p, "spec", spec, required).map(Spec::ServiceEntry)
        }
        Kind::WorkloadEntry => {
            section::<WorkloadEntrySpec>(p, "spec", spec, required).map(Spec::WorkloadEntry)
        }
        Kind::WorkloadGroup => {
            section::<WorkloadGroupSpec>(p, "spec", spec, required).map(Spec::WorkloadGroup)
        }
        Kind::Network => section::<NetworkSpec>(p, "spec", spec, required).map(Spec::Network),
    };
    let (Some(metadata), Some(spec)) = (metadata, built) else {
        return None;
    };
    (p.errors.len() == structure_before).then_some((metadata, spec))
}

enum Spec {
    ServiceEntry(ServiceEntrySpec),
    WorkloadEntry(WorkloadEntrySpec),
    WorkloadGroup(WorkloadGroupSpec),
    Network(NetworkSpec),
}

/// Deserializes one section, reporting every structural error in it rather than the first:
/// after each error the offending key is removed and the section deserialized again. Every
/// field of the section types is optional, so removing one never causes another error.
fn section<T: DeserializeOwned + Default>(
    p: &mut Problems,
    name: &str,
    value: Option<Value>,
    required: bool,
) -> Option<T> {
    let mut value = match value {
        None | Some(Value::Null) if required => {
            p.add(name, "is required");
            return None;
        }
        None | Some(Value::Null) => return Some(T::default()),
        Some(v) => v,
    };
    let mut failed = false;
    for _ in 0..MAX_STRUCTURE_ERRORS {
        match serde_path_to_error::deserialize::<_, T>(value.clone()) {
            Ok(t) => return (!failed).then_some(t),
            Err(e) => {
                failed = true;
                let path = e.path().to_string();
                let field = if path == "." {
                    name.to_string()
                } else {
                    format!("{name}.{path}")
                };
                p.add(field, e.inner().to_string());
                if !remove_at(&mut value, e.path()) {
                    return None;
                }
            }
        }
    }
    None
}

/// Removes the deepest mapping key on `path`, so the next attempt gets past this error.
fn remove_at(root: &mut Value, path: &serde_path_to_error::Path) -> bool {
    let segments: Vec<&Segment> = path.iter().collect();
    let Some(last_key) = segments
        .iter()
        .rposition(|s| matches!(s, Segment::Map { .. }))
    else {
        return false;
    };
    let mut node = root;
    for segment in &segments[..last_key] {
        let next = match segment {
            Segment::Map { key } => node.get_mut(key.as_str()),
            Segment::Seq { index } => node.get_mut(*index),
            _ => None,
        };
        match next {
            Some(n) => node = n,
            None => return false,
        }
    }
    let Segment::Map { key } = segments[last_key] else {
        return false;
    };
    match node.as_mapping_mut() {
        Some(map) => map.remove(key.as_str()).is_some(),
        None => false,
    }
}

fn describe(v: &Value) -> String {
    match v {
        Value::Null => "nothing".into(),
        Value::Bool(b) => format!("the boolean {b}"),
        Value::Number(n) => format!("the number {n}"),
        Value::String(s) => format!("the string {s:?}"),
        Value::Sequence(_) => "a list".into(),
        Value::Mapping(_) => "a mapping".into(),
        Value::Tagged(t) => format!("a value tagged {}", t.tag),
    }
}
