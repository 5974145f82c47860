//! Manifests: YAML documents in Istio's shape (`ServiceEntry`, `WorkloadEntry`,
//! `WorkloadGroup`, `DestinationRule`, `VirtualService`) and the isthmus `Network` kind,
//! turned into catalog resources.
//!
//! Reading happens in two passes per document. The first is structural: serde with
//! `deny_unknown_fields`, through `serde_path_to_error` so every type error and unknown field
//! names its path. The second checks values (ports, names, labels, addresses, Istio's rules
//! across fields) and converts. Both passes report everything they find; the second runs only
//! on documents whose structure is sound, because values guessed around a structural error
//! produce follow-on errors that point the operator at the wrong line.
//!
//! The tree: [`document`] reads a file's documents and their envelope (apiVersion, kind,
//! metadata, spec) and hands each spec to its kind's module ([`service_entry`],
//! [`workload_entry`], [`workload_group`] with its [`probe`], [`destination_rule`] and
//! [`virtual_service`] with what they share in [`traffic`], [`network`]); [`metadata`]
//! checks the metadata every kind shares; [`problems`] collects what is wrong, by file,
//! document and field. The value checks themselves (names, labels, ports, CIDRs) are
//! [`crate::validate`]'s, shared with the VM registrations. The tests (`tests.rs`) read documents the way the source does,
//! through [`super::parse_file`], kind by kind and then error by error.

mod defaults;
mod destination_rule;
mod document;
mod metadata;
mod network;
mod probe;
mod problems;
mod service_entry;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_probe;
mod traffic;
mod virtual_service;
mod workload_entry;
mod workload_group;

pub use defaults::SourceDefaults;
pub(crate) use document::{parse, FileReading, Located, Outcome};
pub use problems::ResourceError;
