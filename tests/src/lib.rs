//! isthmus's cross-crate tests and the tools they share, in three parts kept apart:
//!
//! - [`harness`]: what tests start and drive — the in-process registry ([`harness::registry`],
//!   re-exported here, as almost every test starts one), the network-namespace topologies
//!   ([`harness::netns`]), child processes ([`harness::process`]), mesh scenarios
//!   ([`harness::mesh`]), the VM agent in a namespace ([`harness::agent`]), a VM on the
//!   Registration stream ([`harness::vm`]) and real DNS peers ([`harness::dns`]);
//! - the integration tests themselves, in `tests/` (one file per subject);
//! - the benchmark drivers, `src/bin/*-bench.rs`, and what they share
//!   ([`bench`](mod@bench));
//!
//! and the fuzz bodies ([`fuzz`]), run under `cargo test` by `tests/fuzz_smoke.rs` and by
//! the fuzz targets in `fuzz/`. The sample app the VM tests and the quick start run lives
//! with the quick start, in `deploy/sample-app` (package `isthmus-sample-app`). Test
//! certificates that need no registry come from `isthmus_proto::test_pki`.

pub mod bench;
pub mod fuzz;
pub mod harness;

pub use harness::registry::*;
