//! What a resource falls back to when it does not say: the registry's own cluster, network
//! and trust domain.

use isthmus_proto::identity::TrustDomain;

/// Values a resource falls back to when it does not say (from the registry's flags).
#[derive(Debug, Clone)]
pub struct SourceDefaults {
    pub cluster: String,
    pub network: String,
    pub trust_domain: TrustDomain,
}
