//! isthmus-registry: the control plane. Sources feed one store; the store feeds per-network
//! views; views feed Watch subscribers. VM agents register their VMs over the Registration
//! service. Also the mesh CA and the admin HTTP server.

pub mod admin;
pub mod app;
pub mod ca;
pub mod catalog;
pub mod ctl;
pub mod ingest;
pub mod inject;
pub mod metrics;
pub mod onboard;
pub mod registration;
pub mod render;
pub mod sources;
pub mod store;
pub mod validate;
pub mod views;
pub mod vips;
pub mod watch;
