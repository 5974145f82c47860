//! isthmus-vm-agent: the agent a VM owner installs. It gives the VM a mesh identity,
//! registers its app from a WorkloadGroup template, keeps its health honest, captures its
//! traffic, answers its DNS, and keeps working from its last catalog snapshot when the
//! registry is unreachable. See `ARCHITECTURE.md`.

/// Traffic capture with nftables: the rules, the mesh address sets, the cleanup.
pub mod capture;
/// Telling systemd READY, STATUS, STOPPING and watchdog pings, without libsystemd.
pub mod notify;
