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
use super::destination_rule::{destination_rule, DestinationRuleSpec};
use super::metadata::{check_metadata, Naming, RawMetadata};
use super::network::{network, NetworkSpec};
use super::problems::{Problems, ResourceError};
use super::service_entry::{service_entry, ServiceEntrySpec};
use super::virtual_service::{virtual_service, VirtualServiceSpec};
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

/// What reading one file found, document by document: the resources of the documents that
/// loaded, and for every document whether it loaded, was ignored or was refused (and why).
#[derive(Debug, Default)]
pub(crate) struct FileReading {
    pub located: Vec<Located>,
    pub documents: Vec<DocumentReport>,
}

impl FileReading {
    /// Every problem of every refused document, in file order.
    pub(crate) fn errors(&self) -> Vec<ResourceError> {
        self.documents
            .iter()
            .flat_map(|d| match &d.outcome {
                Outcome::Refused(errors) => errors.clone(),
                _ => Vec::new(),
            })
            .collect()
    }
}

/// One document of a file (or one item of a `List` document) and what became of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DocumentReport {
    /// 1-based position of the YAML document in the file.
    pub document: usize,
    /// The item's index when the document is a `List`.
    pub item: Option<usize>,
    /// What the document says it is, as far as it could be read: `kind namespace/name`.
    pub object: String,
    pub outcome: Outcome,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// Read; it defined `resources` catalog resources, with what Istio would warn about.
    Loaded {
        resources: usize,
        warnings: Vec<ResourceError>,
    },
    /// A kind isthmus does not read (a Gateway, a Deployment, …); why, in words.
    Ignored(String),
    /// Invalid; nothing of it was taken.
    Refused(Vec<ResourceError>),
}

/// Reads every document of one file. Each document stands alone: an invalid one is refused
/// with its problems and the others still load, and a kind isthmus does not read is reported
/// as ignored. The file is split into documents at its `---` and `...` markers before YAML
/// parsing, so that even a syntax error costs only the document it is in (YAML forbids those
/// markers at the start of a line inside a scalar, so the split is exact).
pub(crate) fn parse(path: &Path, text: &str, defaults: &SourceDefaults) -> FileReading {
    let mut reading = FileReading::default();
    let mut seen: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for (i, chunk) in split_documents(text).into_iter().enumerate() {
        let number = i + 1;
        let mut problems = Problems::new(path);
        problems.document = Some(number);
        let Some(value) = read_yaml(&chunk, &mut problems) else {
            reading.documents.push(DocumentReport {
                document: number,
                item: None,
                object: "a document".into(),
                outcome: Outcome::Refused(problems.errors),
            });
            continue;
        };
        for (item, value) in items(value, &mut problems) {
            problems.prefix = item.map_or_else(String::new, |i| format!("items[{i}]."));
            let object = describe_object(&value);
            let outcome = match parse_document(value, defaults, &mut problems) {
                _ if !problems.errors.is_empty() => {
                    problems.warnings.clear();
                    Outcome::Refused(std::mem::take(&mut problems.errors))
                }
                Read::Ignored(why) => Outcome::Ignored(why),
                Read::Loaded(found) => {
                    let mut located = Vec::new();
                    for (resource, field) in found {
                        let field = format!("{}{field}", problems.prefix);
                        let key = resource.key();
                        if let Some((first_doc, first_field)) = seen.get(&key) {
                            problems.add(
                                field.trim_start_matches(&problems.prefix).to_string(),
                                format!(
                                    "{key} is already defined in document {first_doc} ({first_field})"
                                ),
                            );
                            continue;
                        }
                        located.push((key, field, resource));
                    }
                    if problems.errors.is_empty() {
                        let n = located.len();
                        for (key, field, resource) in located {
                            seen.insert(key, (number, field.clone()));
                            reading.located.push(Located {
                                resource: Arc::new(resource),
                                document: Some(number),
                                field,
                            });
                        }
                        Outcome::Loaded {
                            resources: n,
                            warnings: std::mem::take(&mut problems.warnings),
                        }
                    } else {
                        problems.warnings.clear();
                        Outcome::Refused(std::mem::take(&mut problems.errors))
                    }
                }
            };
            reading.documents.push(DocumentReport {
                document: number,
                item,
                object,
                outcome,
            });
        }
    }
    reading
}

/// One document's text as YAML, or `None` with its problem recorded. Deeply nested text is
/// refused before the parser sees it, and a parser panic (serde_yaml_ng has some reachable
/// from malformed input) refuses the document instead of taking the registry down.
fn read_yaml(chunk: &Chunk<'_>, p: &mut Problems) -> Option<Value> {
    let depth = yaml_depth(chunk.text);
    if depth > MAX_YAML_DEPTH {
        p.add(
            "",
            format!(
                "nests {depth} levels deep, more than the {MAX_YAML_DEPTH} a resource may: \
                 refused before parsing"
            ),
        );
        return None;
    }
    let parsed = std::panic::catch_unwind(|| {
        let mut documents = serde_yaml_ng::Deserializer::from_str(chunk.text);
        match documents.next() {
            None => Ok(Value::Null),
            Some(document) => Value::deserialize(document),
        }
    });
    match parsed {
        Ok(Ok(value)) => Some(value),
        Ok(Err(e)) => {
            // The parser counts lines from the document's start; the operator counts from
            // the file's. Some errors (duplicate keys) know their line but do not print it.
            let mut message = shift_lines(&format!("invalid YAML: {e}"), chunk.first_line - 1);
            if let (Some(at), false) = (e.location(), message.contains(" at line ")) {
                message += &format!(
                    " at line {} column {}",
                    at.line() + chunk.first_line - 1,
                    at.column()
                );
            }
            p.add("", message);
            None
        }
        Err(_) => {
            p.add(
                "",
                "the YAML parser could not read this document; check its syntax",
            );
            None
        }
    }
}

/// `message` with every "line N" in it moved down by `by` lines.
fn shift_lines(message: &str, by: usize) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(at) = rest.find("line ") {
        let (before, after) = rest.split_at(at + "line ".len());
        out.push_str(before);
        let digits = after.bytes().take_while(u8::is_ascii_digit).count();
        match after[..digits].parse::<usize>() {
            Ok(n) => out.push_str(&(n + by).to_string()),
            Err(_) => out.push_str(&after[..digits]),
        }
        rest = &after[digits..];
    }
    out.push_str(rest);
    out
}

/// One document's text and the file line it starts on (1-based).
struct Chunk<'a> {
    text: &'a str,
    first_line: usize,
}

/// Splits a YAML stream at its document markers: a line starting with `---` begins a document
/// (what follows the marker on that line is part of it), a line `...` ends one. Text before
/// the first marker is a document only when it holds more than comments, blank lines and
/// directives; directives are kept with the document they precede.
fn split_documents<'a>(text: &'a str) -> Vec<Chunk<'a>> {
    let marker = |line: &str, m: &str| {
        line.strip_prefix(m)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with([' ', '\t', '\r']))
    };
    let mut chunks = Vec::new();
    // (byte offset, line) where the current chunk starts, and whether a marker opened it.
    let mut start = (0usize, 1usize);
    let mut opened = false;
    let mut offset = 0;
    let close = |from: (usize, usize), to: usize, opened: bool, chunks: &mut Vec<Chunk<'a>>| {
        let body = &text[from.0..to];
        if opened || has_content(body) {
            chunks.push(Chunk {
                text: body,
                first_line: from.1,
            });
        }
    };
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let line_no = n + 1;
        let bare = line.trim_end_matches(['\n', '\r']);
        if marker(bare, "---") {
            // Directives and comments before the marker go with the document it opens.
            if opened || has_content(&text[start.0..offset]) {
                close(start, offset, opened, &mut chunks);
                start = (offset, line_no);
            }
            opened = true;
        } else if marker(bare, "...") {
            close(start, offset, opened, &mut chunks);
            start = (offset + line.len(), line_no + 1);
            opened = false;
        }
        offset += line.len();
    }
    close(start, text.len(), opened, &mut chunks);
    chunks
}

/// Whether YAML text holds anything but blank lines, comments and directives.
fn has_content(text: &str) -> bool {
    text.lines().any(|l| {
        let l = l.trim();
        !(l.is_empty() || l.starts_with('#') || l.starts_with('%'))
    })
}

/// The objects of a document: the document itself, or each item of a `List` (what
/// `kubectl get -o yaml` prints for more than one object), with its index.
fn items(value: Value, p: &mut Problems) -> Vec<(Option<usize>, Value)> {
    let is_list = value.get("kind").and_then(Value::as_str) == Some("List")
        && value.get("apiVersion").and_then(Value::as_str) == Some("v1");
    if !is_list {
        return vec![(None, value)];
    }
    match value.get("items") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Sequence(items)) => items
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, v)| (Some(i), v))
            .collect(),
        Some(other) => {
            p.add(
                "items",
                format!("must be a list; found {}", describe(other)),
            );
            vec![(None, Value::Null)]
        }
    }
}

/// `kind namespace/name` as far as the document says, for reports.
fn describe_object(value: &Value) -> String {
    let kind = value
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or("object");
    let meta = value.get("metadata");
    let name = meta.and_then(|m| m.get("name")).and_then(Value::as_str);
    let namespace = meta
        .and_then(|m| m.get("namespace"))
        .and_then(Value::as_str);
    match (namespace, name) {
        (_, None) => kind.to_string(),
        (Some(ns), Some(name)) => format!("{kind} {ns}/{name}"),
        (None, Some(name)) => format!("{kind} {name}"),
    }
}

/// The kinds this source reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    ServiceEntry,
    WorkloadEntry,
    WorkloadGroup,
    DestinationRule,
    VirtualService,
    Network,
}

impl Kind {
    const ALL: [Kind; 6] = [
        Kind::ServiceEntry,
        Kind::WorkloadEntry,
        Kind::WorkloadGroup,
        Kind::DestinationRule,
        Kind::VirtualService,
        Kind::Network,
    ];

    fn name(self) -> &'static str {
        match self {
            Kind::ServiceEntry => "ServiceEntry",
            Kind::WorkloadEntry => "WorkloadEntry",
            Kind::WorkloadGroup => "WorkloadGroup",
            Kind::DestinationRule => "DestinationRule",
            Kind::VirtualService => "VirtualService",
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

/// Istio's API groups and the kinds each serves; a kind of these groups that isthmus does not
/// read is ignored, and a name that is none of them (a typo) is refused.
const ISTIO_KINDS: &[(&str, &[&str])] = &[
    (
        "networking.istio.io",
        &[
            "ServiceEntry",
            "WorkloadEntry",
            "WorkloadGroup",
            "VirtualService",
            "DestinationRule",
            "Gateway",
            "Sidecar",
            "EnvoyFilter",
            "ProxyConfig",
        ],
    ),
    (
        "security.istio.io",
        &[
            "AuthorizationPolicy",
            "PeerAuthentication",
            "RequestAuthentication",
        ],
    ),
    ("telemetry.istio.io", &["Telemetry"]),
    ("extensions.istio.io", &["WasmPlugin"]),
    ("install.istio.io", &["IstioOperator"]),
];

/// What a document's `apiVersion` and `kind` make of it.
enum Classified {
    Read(Kind),
    Ignore(String),
    /// Refused; the problem is recorded.
    Refuse,
}

/// Decides from `apiVersion` and `kind` whether the document is read, ignored or refused.
/// Both are required. The kinds this source reads are read under the API versions they are
/// served at; other kinds of Istio's groups and every kind of other groups (Kubernetes' own,
/// Gateway API, an operator's CRDs) are ignored; an unknown kind of Istio's or isthmus' group
/// is refused as the typo it most likely is.
fn classify(api_version: Option<Value>, kind: Option<Value>, p: &mut Problems) -> Classified {
    let api_version = required_string("apiVersion", api_version, p);
    let kind_name = required_string("kind", kind, p);
    let (Some(api_version), Some(kind_name)) = (api_version, kind_name) else {
        return Classified::Refuse;
    };
    let group = api_version.split_once('/').map_or("", |(g, _)| g);
    if let Some(kind) = Kind::ALL.into_iter().find(|k| k.name() == kind_name) {
        let ours = group == "isthmus.io" || ISTIO_KINDS.iter().any(|(g, _)| *g == group);
        if !ours {
            return Classified::Ignore(format!(
                "{api_version} {kind_name} is not Istio's or isthmus' {kind_name}"
            ));
        }
        if !kind.accepts(&api_version) {
            p.add(
                "apiVersion",
                format!(
                    "{api_version:?} is not an API version of {kind_name}; use {}",
                    kind.api_versions()
                ),
            );
            return Classified::Refuse;
        }
        return Classified::Read(kind);
    }
    if group == "isthmus.io" {
        p.add(
            "kind",
            format!(
                "{kind_name:?} is not a kind of isthmus.io; use one of {}",
                kind_names()
            ),
        );
        return Classified::Refuse;
    }
    if let Some((_, kinds)) = ISTIO_KINDS.iter().find(|(g, _)| *g == group) {
        if !kinds.contains(&kind_name.as_str()) {
            p.add(
                "kind",
                format!(
                    "{kind_name:?} is not a kind of {group} (it has {})",
                    kinds.join(", ")
                ),
            );
            return Classified::Refuse;
        }
    }
    Classified::Ignore(format!(
        "{kind_name} ({api_version}) is not a kind isthmus reads; it reads {}",
        kind_names()
    ))
}

/// A required string field of the envelope, or `None` with the problem recorded.
fn required_string(field: &str, value: Option<Value>, p: &mut Problems) -> Option<String> {
    match value {
        None | Some(Value::Null) => {
            p.add(field, "is required");
            None
        }
        Some(Value::String(s)) if s.is_empty() => {
            p.add(field, "is required");
            None
        }
        Some(Value::String(s)) => Some(s),
        Some(other) => {
            p.add(
                field,
                format!("must be a string; found {}", describe(&other)),
            );
            None
        }
    }
}

/// What became of one document when its problems are not counted.
enum Read {
    Loaded(Vec<(Resource, String)>),
    Ignored(String),
}

/// One document: its envelope is checked by hand (so a wrong `kind` does not hide a wrong
/// `metadata`), then `metadata` and `spec` go through serde separately, then the spec is
/// converted by its kind.
fn parse_document(mut value: Value, defaults: &SourceDefaults, p: &mut Problems) -> Read {
    if value.is_null() {
        return Read::Loaded(Vec::new());
    }
    if let Err(e) = value.apply_merge() {
        p.add("", format!("invalid YAML merge key (<<): {e}"));
        return Read::Loaded(Vec::new());
    }
    let Value::Mapping(map) = value else {
        p.add(
            "",
            format!(
                "a resource is a mapping with apiVersion, kind, metadata and spec; found {}",
                describe(&value)
            ),
        );
        return Read::Loaded(Vec::new());
    };
    let kind = match classify(map.get("apiVersion").cloned(), map.get("kind").cloned(), p) {
        Classified::Read(kind) => kind,
        Classified::Ignore(why) => return Read::Ignored(why),
        Classified::Refuse => return Read::Loaded(Vec::new()),
    };
    let envelope = Envelope::split(map, p);
    let Some((metadata, spec)) = sections(kind, envelope.metadata, envelope.spec, p) else {
        return Read::Loaded(Vec::new());
    };
    let naming = if kind == Kind::Network {
        Naming::Network
    } else {
        Naming::Namespaced
    };
    let meta = check_metadata(naming, metadata, p);
    Read::Loaded(match spec {
        Spec::ServiceEntry(spec) => service_entry(&meta, spec, defaults, p),
        Spec::WorkloadEntry(spec) => workload_entry(&meta, spec, defaults, p),
        Spec::WorkloadGroup(spec) => workload_group(&meta, spec, defaults, p),
        Spec::DestinationRule(spec) => destination_rule(&meta, spec, defaults, p),
        Spec::VirtualService(spec) => virtual_service(&meta, spec, defaults, p),
        Spec::Network(spec) => network(&meta, spec, p),
    })
}

/// A document's sections, each as written.
struct Envelope {
    metadata: Option<Value>,
    spec: Option<Value>,
}

impl Envelope {
    /// Takes `metadata` and `spec` out of the document, reporting any unknown field.
    fn split(map: serde_yaml_ng::Mapping, p: &mut Problems) -> Self {
        let mut e = Envelope {
            metadata: None,
            spec: None,
        };
        for (key, v) in map {
            match key.as_str() {
                // Read by `classify` before the split.
                Some("apiVersion" | "kind") => {}
                Some("metadata") => e.metadata = Some(v),
                Some("spec") => e.spec = Some(v),
                // What a cluster reports back (`kubectl get -o yaml`); nothing to read.
                Some("status") => {}
                Some(other) => p.add(
                    other,
                    "unknown field; a resource has only apiVersion, kind, metadata, spec and status",
                ),
                None => p.add("", format!("unknown field {}", describe(&key))),
            }
        }
        e
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
        Kind::DestinationRule => {
            section::<DestinationRuleSpec>(p, "spec", spec, required).map(Spec::DestinationRule)
        }
        Kind::VirtualService => {
            section::<VirtualServiceSpec>(p, "spec", spec, required).map(Spec::VirtualService)
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
    DestinationRule(DestinationRuleSpec),
    VirtualService(VirtualServiceSpec),
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
