//! Workspaces' durable side: encrypted artifacts (and their keys).

pub mod artifacts;
pub mod crypto;
