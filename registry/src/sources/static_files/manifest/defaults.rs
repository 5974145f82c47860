//! What a resource falls back to when it does not say: the registry's own cluster, network,
//! trust domain and DNS domain.

use isthmus_proto::identity::TrustDomain;

/// Values a resource falls back to when it does not say (from the registry's flags).
#[derive(Debug, Clone)]
pub struct SourceDefaults {
    pub cluster: String,
    pub network: String,
    pub trust_domain: TrustDomain,
    /// The clusters' DNS domain (`cluster.local` unless the registry is told otherwise): a
    /// short host in a DestinationRule or VirtualService (`reviews`) is resolved against it
    /// (`reviews.<namespace>.svc.<domain>`), as Istio resolves it.
    pub domain: String,
}
