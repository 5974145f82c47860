//! isthmus-gateway: the proxy core that the east-west gateway and the VM agent share, and
//! the east-west gateway's wiring.
//!
//! - `routes`: the routing table built from a network view (destinations, their endpoints,
//!   balancers and connection limits); `balancer`: endpoint selection; `upstream`:
//!   connecting with timeout, retry on another endpoint and outlier reporting;
//!   `relay`: moving bytes both ways until both sides close (`splice(2)` between two TCP
//!   sockets, a copy loop with growing buffers for TLS streams); `connection`: the shared
//!   accept loop, drain tracking and the access log.
//! - `passthrough`: the SNI passthrough listener (the gateway's data path).
//! - `inbound`: the workload side's mTLS termination in front of a local app (STRICT or
//!   PERMISSIVE), with `authz`, the authorization policy applied to each verified peer;
//!   `outbound`: mTLS origination towards a service, verified against its identities;
//!   `original_dst`: the destination a captured (redirected) connection was made to.
//! - `app` and `config`: the east-west gateway program.
//!
//! The SNI routing key and the ClientHello reader live in `isthmus_proto::sni`.

pub mod app;
pub mod authz;
pub mod balancer;
pub mod config;
pub mod connection;
pub mod inbound;
pub mod metrics;
pub mod original_dst;
pub mod outbound;
pub mod passthrough;
pub mod relay;
pub mod routes;
pub mod upstream;

#[cfg(test)]
pub(crate) mod test_pki;

pub use app::{run, GatewayHandle};
pub use config::GatewayConfig;
