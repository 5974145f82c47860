//! Catalog sources: where resources come from before they reach the store.

pub mod kubernetes;
pub mod static_files;
pub mod vm_registrations;
