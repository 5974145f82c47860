//! isthmus-gateway: the east-west gateway, a program that composes the proxy core
//! (`isthmus-proxy`) into one data path from other networks to this network's workloads,
//! reached by SNI passthrough or through tunnels, the way linkerd2-proxy's gateway
//! composes its inbound and outbound stacks. The core (routing, balancing, connect, relay,
//! connection accounting) is a crate of its own that the VM agent links too; nothing here
//! is shared with the agent.
//!
//! - `passthrough`: the SNI passthrough listener (15443): reads the ClientHello with the
//!   core's `client_hello` reader, routes on the SNI key, connects through the core's
//!   `upstream` and relays with the core's `splice(2)` relay (`relay::relay_tcp_metered`);
//!   what follows the routing is shared with the tunnel listener.
//! - `tunnel`: the tunnel listener (HBONE, 15008): the core's tunnel server loop, each
//!   `CONNECT` stream to `hostname:port` routed and relayed by passthrough's data path.
//! - `config`: the gateway's settings, their defaults (its own; the core's for what the
//!   core does) and the one-pass check that reports every problem.
//! - `app`: the wiring, as phases: bind, credentials, catalog, data path, admin, health; it
//!   returns a [`GatewayHandle`] that tests start and stop in-process.

pub mod app;
pub mod config;
pub mod passthrough;
pub mod tunnel;

pub use app::{run, GatewayHandle};
pub use config::GatewayConfig;
