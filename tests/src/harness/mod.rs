//! What the integration tests and benchmark drivers start and drive: the registry under
//! test, network namespaces, child processes, mesh scenarios, the VM agent, a VM on the
//! Registration stream, real DNS peers, real etcd clusters, and real Kubernetes API servers.

pub mod agent;
pub mod dns;
pub mod etcd;
pub mod kube;
pub mod mesh;
pub mod netns;
pub mod pod;
pub mod process;
pub mod registry;
pub mod vm;
