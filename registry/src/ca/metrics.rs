//! CA metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuedLabels {
    /// "token", "kubernetes" or "renewal".
    pub auth: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RefusedLabels {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Debug, Clone, Default)]
pub struct CaMetrics {
    pub issued: Family<IssuedLabels, Counter>,
    pub refused: Family<RefusedLabels, Counter>,
    pub reloads: Family<ResultLabels, Counter>,
}

impl CaMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Self::default();
        registry.register(
            "ca_certificates_issued",
            "Leaf certificates issued, by how the caller authenticated",
            m.issued.clone(),
        );
        registry.register(
            "ca_certificates_refused",
            "Certificate requests refused, by reason",
            m.refused.clone(),
        );
        registry.register(
            "ca_reloads",
            "Reloads of the CA files after a change on disk",
            m.reloads.clone(),
        );
        m
    }
}
