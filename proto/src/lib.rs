//! The mesh's shared language, used by every isthmus program: the protobuf definitions and
//! generated gRPC code, the catalog model converted once from them, SPIFFE identity, the only
//! rustls builders in the workspace, gRPC over mTLS, the VM onboarding bundle, and small
//! runtime helpers (config parsing, the program skeleton, drain, admin HTTP, telemetry, the
//! allocator's settings). It depends on no other workspace crate.

pub mod admin;
pub mod allocator;
pub mod backoff;
pub mod bundle;
pub mod certs;
pub mod config;
pub mod drain;
pub mod grpc;
pub mod identity;
pub mod limits;
pub mod model;
pub mod program;
pub mod registration;
pub mod registries;
pub mod sni;
pub mod subscription;
pub mod telemetry;
#[cfg(any(test, feature = "test-pki"))]
pub mod test_pki;
pub mod tls;
pub mod token;
pub use model::traffic;

/// Generated protobuf and gRPC code. Only conversion code at the edges uses it; everything
/// else works with [`model`].
#[allow(clippy::all, missing_docs)]
pub mod pb {
    tonic::include_proto!("isthmus.v1");

    /// The standard gRPC health protocol (`grpc.health.v1`): the client the agent's gRPC
    /// readiness probe calls, and the server its tests answer with.
    pub mod health {
        tonic::include_proto!("grpc.health.v1");
    }
}

pub use identity::{SpiffeId, TrustDomain};
