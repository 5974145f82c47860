//! Catalog sources: where resources come from before they reach the store.

pub mod static_files;
pub mod vm_registrations;
