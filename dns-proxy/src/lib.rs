//! isthmus-dns, the smart DNS proxy. It answers mesh hostnames (with Kubernetes short
//! names and ServiceEntry wildcards) from the catalog view it watches, and forwards
//! everything else to upstream resolvers through a TTL-honouring cache.
//!
//! Modules: [`names`] (the name table built from the view), [`server`] (the request path,
//! UDP and TCP), [`forwarder`] (upstreams), [`cache`], [`metrics`], [`config`],
//! [`resolv_conf`] (the one resolv.conf reader, shared with the VM agent), and
//! [`app`], which wires them and is what the binary and the tests start.

pub mod app;
pub mod cache;
pub mod config;
pub mod forwarder;
pub mod metrics;
pub mod names;
pub mod ratelimit;
pub mod resolv_conf;
pub mod server;

pub use app::{run, run_with, DnsHandle, Embedding};
pub use config::Config;
