//! isthmus-dns, the smart DNS proxy. It answers mesh hostnames (with Kubernetes short
//! names and ServiceEntry wildcards) from the catalog view it watches, and forwards
//! everything else to upstream resolvers through a TTL-honouring cache.
//!
//! Modules: [`names`] (the name table built from the view), [`server`] (the request path
//! and DNS over TCP), [`udp`] (DNS over UDP, in batches), [`fast`] (a plain query of a mesh
//! name answered on the wire), [`forwarder`] (upstreams), [`cache`], [`metrics`], [`config`], [`ratelimit`] (per-client
//! limits), [`resolv_conf`] (the one resolv.conf reader, shared with the VM agent), and
//! [`app`], which wires them and is what the binary and the tests start.

pub mod app;
pub mod cache;
pub mod config;
pub mod fast;
pub mod forwarder;
pub mod metrics;
pub mod names;
pub mod ratelimit;
pub mod resolv_conf;
pub mod server;
pub mod udp;

pub use app::{run, run_with, DnsHandle, Embedding};
pub use config::Config;
