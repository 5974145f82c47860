//! isthmus-vm-agent: the agent a VM owner installs. It gives the VM a mesh identity,
//! registers its app from a WorkloadGroup template, keeps its health honest, captures its
//! traffic, answers its DNS, and keeps working from its last catalog snapshot when the
//! registry is unreachable. See `ARCHITECTURE.md`.
//!
//! - `identity`: enrolment with the bundle's token, renewal at half-life.
//! - `registration`: the Registration stream (entry, health, lease, deregistration).
//! - `probe`: the WorkloadGroup's readiness probe.
//! - `snapshot`: the last catalog view on disk.
//! - `capture`: the nftables rules (outbound, inbound, DNS) and their removal.
//! - `notify`: the systemd notify protocol (READY, WATCHDOG, STATUS, STOPPING).
//! - `app` and `config`: the wiring, on the gateway crate's proxy core and the DNS proxy.

pub mod app;
pub mod capture;
pub mod config;
pub mod identity;
pub mod metrics;
pub mod notify;
pub mod probe;
pub mod registration;
pub mod snapshot;

pub use app::{run, AgentHandle};
pub use config::AgentConfig;
