//! The store: where the registry keeps what must survive a restart (the catalog, redeemed
//! bootstrap tokens, VIP allocations). The registry reaches it only through the [`Store`]
//! trait, which has two implementations: [`EmbeddedStore`] (one redb file under
//! `--data-dir`, the default) and [`EtcdStore`] (keys under a prefix in an etcd cluster, for
//! several registries sharing one state). The test battery (`battery.rs`) is written
//! against the trait, and both run it.

mod backend;
#[cfg(test)]
pub(crate) mod battery;
mod embedded;
mod etcd;

pub use backend::{Op, Store, StoreChange, StoreError, Table, VipWrite, WriteHealth};
pub use embedded::{EmbeddedStore, RECOVERY_INTERVAL};
pub use etcd::{EtcdConfig, EtcdStore, EtcdTls, DEFAULT_PREFIX as DEFAULT_ETCD_PREFIX};
