//! Workspaces' durable side: encrypted artifacts (and their keys).

pub mod artifacts;
pub mod blobs;
pub mod crypto;
pub mod usage;
