//! isthmus-vm-agent: the agent a VM owner installs. It gives the VM a mesh identity,
//! registers its app from a WorkloadGroup template, keeps its health honest, captures its
//! traffic, answers its DNS, and keeps working from its last catalog snapshot when the
//! registry is unreachable. See `ARCHITECTURE.md`.
//!
//! - `identity`: enrolment with the bundle's token, renewal at half-life.
//! - `pod`: sidecar mode (a Kubernetes pod's identity from its service-account token, the
//!   app's rewritten probes, the init step's capture).
//! - `registration`: the Registration stream (entry, health, lease, deregistration).
//! - `probe`: the WorkloadGroup's readiness probe.
//! - `snapshot`: the last catalog view on disk.
//! - `capture`: the nftables rules (outbound, inbound, DNS) and their removal.
//! - `notify`: the systemd notify protocol (READY, WATCHDOG, STATUS, STOPPING).
//! - `config`: the one typed configuration, every bad flag reported at once.
//! - `app`: the wiring, one file per start-up phase, on the proxy core (`isthmus-proxy`), the
//!   DNS proxy and the program skeleton of `isthmus-proto`. The modules above never import
//!   it.

pub mod app;
pub mod capture;
pub mod config;
pub mod identity;
pub mod metrics;
pub mod notify;
pub mod pod;
pub mod probe;
pub mod registration;
pub mod snapshot;

pub use app::{run, AgentHandle};
pub use config::AgentConfig;
