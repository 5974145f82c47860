//! What the integration tests and benchmark drivers start and drive: the registry under
//! test, network namespaces, child processes, mesh scenarios, the VM agent, a VM on the
//! Registration stream, and real DNS peers.

pub mod agent;
pub mod dns;
pub mod mesh;
pub mod netns;
pub mod process;
pub mod registry;
pub mod vm;
