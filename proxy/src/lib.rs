//! isthmus-proxy: the proxy core that the east-west gateway and the VM agent share. It
//! depends on `isthmus-proto` and on no program; each program composes the parts it needs
//! (the gateway: routes, upstream, relay and connection behind its SNI passthrough listener;
//! the VM agent: inbound and outbound in front of its app) and passes its own settings in,
//! falling back on the defaults named here.
//!
//! - `routes`: the routing table built from a network view (destinations, their endpoints,
//!   balancers and connection limits) and the follower that rebuilds it when the view
//!   changes; `balancer`: endpoint selection (locality, round robin or least connections,
//!   outlier ejection), pure logic in simulated time; `upstream`: connecting with a timeout,
//!   retry on another endpoint and outlier reporting.
//! - `relay`: moving bytes both ways until both sides close: `splice(2)` between two TCP
//!   sockets, a copy loop (its buffer grows from 8 KiB to 256 KiB) where one side is a TLS
//!   session in this process.
//! - `connection`: the accept loop every listener shares, the tracker that drain waits on,
//!   and the access log.
//! - `client_hello`: reads the server name from a client's first bytes without terminating
//!   TLS (the gateway's passthrough routes on it; the SNI key itself is
//!   `isthmus_proto::sni::SniKey`).
//! - `inbound`: mTLS termination in front of a local app (STRICT or PERMISSIVE), with
//!   `authz`, the authorization policy applied to each verified peer, and `authz::admission`, the
//!   quotas and injected faults per calling identity of an allowed connection; `outbound`: mTLS
//!   origination towards a service, verified against its identities; `original_dst`: the
//!   destination a captured (redirected) connection was made to.
//! - `tunnel`: pooled tunnels between proxies (HBONE: HTTP/2 `CONNECT` streams over one
//!   mTLS connection per peer), the client's pool and the stream type both sides relay;
//!   `inbound::hbone` is the server side, in front of the same inbound path.
//! - `metrics`: the core's metrics, registered under the prefix the program picks
//!   (`isthmus_gateway_`, `isthmus_vm_agent_`), and `metrics::istio`, Istio's standard TCP
//!   metrics under Istio's names, which the same connections count into.

pub mod authz;
pub use authz::admission;
pub mod balancer;
pub mod client_hello;
pub mod connection;
pub mod inbound;
pub mod metrics;
pub mod original_dst;
pub mod outbound;
pub mod relay;
pub mod routes;
pub mod tunnel;
pub mod upstream;
