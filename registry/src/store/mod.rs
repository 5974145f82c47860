//! The store: where the registry keeps what must survive a restart (the catalog, redeemed
//! bootstrap tokens, VIP allocations). The registry reaches it only through the [`Store`]
//! trait, which has one implementation today, [`EmbeddedStore`] (one redb file under
//! `--data-dir`); the test battery (`battery.rs`) is written against the trait, so a second
//! implementation (etcd, for an HA set of registries) can run the same tests when it comes.

mod backend;
#[cfg(test)]
pub(crate) mod battery;
mod embedded;

pub use backend::{Op, Store, StoreError, Table, WriteHealth};
pub use embedded::{EmbeddedStore, RECOVERY_INTERVAL};
