//! Shared contracts of the sandboxed code execution service: the error enum,
//! wire types, ids, typed clients and server glue used by every plane.

pub mod agent;
pub mod controlplane;
pub mod dataplane;
pub mod env;
pub mod error;
pub mod ids;
pub mod secrets;
pub mod telemetry;
pub mod workflow;

#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod server;

#[cfg(feature = "client")]
pub mod client;

pub use error::{CodedError, ErrorBody, ErrorCode};
