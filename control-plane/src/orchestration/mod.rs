//! Durable one-shot jobs: idempotent submission, a queue in the database,
//! a bounded worker pool with leases, retries with the same job id (the data
//! plane runs an id at most once), cancellation.

pub mod idempotency;
pub mod jobs;
pub mod worker;
pub mod workflow_worker;
pub mod workflows;

pub use jobs::{JobFilter, JobService, JobSettings, Submitted};
pub use worker::Dispatcher;
pub use workflow_worker::WorkflowDispatcher;
pub use workflows::{WorkflowFilter, WorkflowService, WorkflowSettings};
