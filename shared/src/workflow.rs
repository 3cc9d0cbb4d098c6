//! Wire types of workflows (`/v1/workflows`): an ordered plan run as one
//! unit in one session: create it, write input files, run the steps, file
//! named outputs as artifacts, tear the session down. camelCase JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::agent::{Limits, StepError, StepStatus};
use crate::controlplane::{JobFailure, JobStatus};
use crate::dataplane::ArtifactInfo;

/// Steps in one plan, at most.
pub const MAX_WORKFLOW_STEPS: usize = 64;
/// Bytes of one step's code, at most.
pub const MAX_STEP_CODE_BYTES: usize = 256 * 1024;
/// Longest `timeoutMs` of a step (the runtime's own maximum may be lower).
pub const MAX_STEP_TIMEOUT_MS: u64 = 3_600_000;
/// Input files per plan, at most.
pub const MAX_WORKFLOW_FILES: usize = 32;
/// Decoded bytes of one input file, at most.
pub const MAX_WORKFLOW_FILE_BYTES: usize = 1024 * 1024;
/// Decoded bytes of all input files together, at most.
pub const MAX_WORKFLOW_FILES_TOTAL: usize = 4 * 1024 * 1024;
/// Output paths per plan, at most.
pub const MAX_WORKFLOW_OUTPUTS: usize = 16;
/// Bytes of a workspace path (an input or an output), at most.
pub const MAX_WORKFLOW_PATH_BYTES: usize = 255;

/// `POST /v1/workflows`: the plan.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkflowRequest {
    /// Runtime name (default `python`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// Packages (`name` or `name==version`) from the runtime's allowlist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packages: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// Environment variables for the interpreter (not secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Named secrets (env var names), checked against policy and resolved by
    /// the data plane for the workflow's session, as a session's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Vec<String>>,
    /// Hosts to reach; refused until controlled egress exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<String>>,
    /// Free-form labels, kept with the workflow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Input files written into the workspace before the first step.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<WorkflowFile>>,
    /// The steps, run in order in one session (variables persist).
    pub steps: Vec<WorkflowStepSpec>,
    /// Workspace paths stored as artifacts (filed under the workflow id)
    /// once every step has run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs: Option<Vec<String>>,
    /// Idempotency key, when the client cannot set the `Idempotency-Key`
    /// header (the two must agree when both are given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// How an input file's `content` is carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum FileEncoding {
    /// UTF-8 text (the default).
    #[default]
    Utf8,
    /// Standard base64 of the bytes.
    Base64,
}

/// An input file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkflowFile {
    /// Relative to the workspace; parent directories are created.
    pub path: String,
    pub content: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub encoding: Option<FileEncoding>,
}

/// One step of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkflowStepSpec {
    pub code: String,
    /// This step's time limit (default: the session's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// A failure of this step does not stop the workflow.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub continue_on_error: bool,
}

/// Where one step of a workflow is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum WorkflowStepStatus {
    /// Not started.
    Pending,
    /// Dispatched to the data plane (recorded before it was sent).
    Running,
    Succeeded,
    /// It raised, timed out, was killed, could not run, or was interrupted.
    Failed,
    /// Not run: an earlier step failed, or the workflow was cancelled.
    Skipped,
}

impl WorkflowStepStatus {
    /// The status as stored.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Skipped => "skipped",
        }
    }

    /// Parses a stored status.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "pending" => Self::Pending,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "skipped" => Self::Skipped,
            _ => return None,
        })
    }
}

/// What one step produced (stdout and stderr cut at 64 KiB each).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct WorkflowStepOutput {
    pub status: StepStatus,
    pub stdout: String,
    pub stderr: String,
    pub result: Option<serde_json::Value>,
    pub error: Option<StepError>,
    pub duration_ms: u64,
    pub truncated: bool,
}

/// One step of a workflow, as `GET /v1/workflows/{id}` shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct WorkflowStep {
    /// Position in the plan, from 0 (`steps[index]`).
    pub index: u32,
    pub status: WorkflowStepStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<WorkflowStepOutput>,
    /// Why it failed (`execution_error`, `timeout`, `killed`,
    /// `workflow_interrupted`, or the code of a call that failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobFailure>,
}

/// How the session was torn down.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Teardown {
    /// `deleted`, `gone` (the data plane no longer had it), or `failed`
    /// (`message` says why; the session's TTL reaps it).
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// A workflow, as `GET /v1/workflows/{id}` returns it. Same lifecycle as
/// a job: `queued`, `running`, then `succeeded`, `failed` or `cancelled`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Workflow {
    pub workflow_id: String,
    pub status: JobStatus,
    pub runtime: String,
    pub labels: BTreeMap<String, String>,
    /// Claims by a worker (more than 1: a replica was lost and another
    /// resumed it).
    pub attempts: u32,
    /// The session the steps run in, once created.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    pub steps: Vec<WorkflowStep>,
    /// The outputs stored as artifacts.
    #[serde(default)]
    pub artifacts: Vec<ArtifactInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub teardown: Option<Teardown>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<i64>,
    /// Why it failed or was cancelled (`step_failed`, `workflow_interrupted`,
    /// `output_missing`, `session_lost`, `cancelled`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobFailure>,
}

/// `GET /v1/workflows`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct WorkflowList {
    pub workflows: Vec<Workflow>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_smallest_plan_parses_and_unknown_fields_are_named() {
        let plan: Result<WorkflowRequest, _> = serde_json::from_str(
            r#"{"runtime": "python", "steps": [{"code": "x = 41"}, {"code": "print(x + 1)"}]}"#,
        );
        assert!(matches!(plan, Ok(p) if p.steps.len() == 2));
        let e = serde_json::from_str::<WorkflowRequest>(r#"{"steps":[{"code":"1","colour":1}]}"#)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("colour"), "{e}");
    }

    #[test]
    fn step_status_round_trips() {
        for s in [
            WorkflowStepStatus::Pending,
            WorkflowStepStatus::Running,
            WorkflowStepStatus::Succeeded,
            WorkflowStepStatus::Failed,
            WorkflowStepStatus::Skipped,
        ] {
            assert_eq!(WorkflowStepStatus::parse(s.as_str()), Some(s));
            let json = serde_json::to_value(s).unwrap_or_default();
            assert_eq!(json.as_str(), Some(s.as_str()));
        }
    }
}
