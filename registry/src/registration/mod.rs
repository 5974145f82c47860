//! VM auto-registration (Istio's WorkloadGroup to WorkloadEntry): the Registration gRPC
//! service authenticates a VM agent by its mesh certificate, builds the VM's entry from its
//! WorkloadGroup's template, and holds it in the VM registrations source
//! ([`crate::sources::vm_registrations`]) for as long as the stream lasts, plus a grace
//! period. This module owns who may register what and how an entry is built; the source
//! owns leases and the way to the catalog.

mod entry;
mod error;
pub mod metrics;
mod service;

pub use entry::{entry_from_group, group_identity};
pub use error::{status_of, RegistrationError};
pub use service::{RegistrationService, HELLO_TIMEOUT};
