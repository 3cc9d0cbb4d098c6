//! Wire types of the control plane's public REST API (`/v1/...` on
//! `CONTROL_PLANE_ADDR`). camelCase JSON. Agents, the MCP tools and the
//! benchmark use them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::agent::{Limits, StepError, StepMode, StepStatus};
use crate::dataplane::ArtifactInfo;

/// Header carrying the client's idempotency key of a `POST /v1/jobs`.
pub const IDEMPOTENCY_KEY_HEADER: &str = "idempotency-key";
/// Response header set on a replayed idempotent response.
pub const IDEMPOTENT_REPLAYED_HEADER: &str = "idempotent-replayed";

/// `POST /v1/jobs`: one-shot code in a fresh sandbox.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct JobRequest {
    /// The code to run.
    pub code: String,
    /// Runtime name (default `python`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    /// `eval` (default) or `handler`: define `handler(event)`, it is called
    /// with `event` and its return value is the result.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<StepMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// Packages (`name` or `name==version`) from the runtime's allowlist.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packages: Option<Vec<String>>,
    /// Environment variables for the interpreter (not secrets).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Hosts the code needs to reach; denied unless policy allows them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<String>>,
    /// Named secrets the code needs; denied unless policy allows them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Vec<String>>,
    /// Free-form labels to find the job by (`GET /v1/jobs?label=k=v`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub labels: Option<BTreeMap<String, String>>,
    /// Idempotency key, when the client cannot set the `Idempotency-Key`
    /// header (the two must agree when both are given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    /// Waiting for a worker (or for the data plane to come back).
    Queued,
    /// Dispatched to the data plane.
    Running,
    /// The code ran to completion.
    Succeeded,
    /// The code failed (exception, timeout, killed) or could not be run;
    /// `error` says why.
    Failed,
    /// Cancelled by the client.
    Cancelled,
}

impl JobStatus {
    /// The status as stored and as filtered on (`queued`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// Parses a stored or filtered status.
    pub fn parse(s: &str) -> Option<JobStatus> {
        Some(match s {
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "succeeded" => JobStatus::Succeeded,
            "failed" => JobStatus::Failed,
            "cancelled" => JobStatus::Cancelled,
            _ => return None,
        })
    }

    /// True once the job will not change again.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

/// What the code produced.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct JobOutput {
    pub status: StepStatus,
    pub stdout: String,
    pub stderr: String,
    pub result: Option<serde_json::Value>,
    pub error: Option<StepError>,
    pub duration_ms: u64,
    pub truncated: bool,
    /// Files the code wrote under `output/`, stored encrypted.
    pub artifacts: Vec<ArtifactInfo>,
}

/// Why a job failed without running to completion, or was cancelled.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct JobFailure {
    /// A stable error code (`data_plane_unavailable`, `lease_expired`, ...).
    pub code: String,
    pub message: String,
}

/// A job, as `GET /v1/jobs/{id}` returns it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct Job {
    pub job_id: String,
    pub status: JobStatus,
    pub runtime: String,
    pub labels: BTreeMap<String, String>,
    /// Dispatches so far (a retry after a crash or an unreachable data plane
    /// reuses the job id, so the data plane runs it at most once).
    pub attempts: u32,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finished_at_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<JobOutput>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<JobFailure>,
}

/// `GET /v1/jobs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct JobList {
    pub jobs: Vec<Job>,
    /// Pass as `cursor` to get the next page; absent on the last page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// `POST /v1/sessions`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionRequest {
    /// Runtime name (default `python`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packages: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub egress: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<Vec<String>>,
}

/// `POST /v1/sessions/{id}/steps`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SessionStepRequest {
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<StepMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<serde_json::Value>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_status_round_trips() {
        for s in [
            JobStatus::Queued,
            JobStatus::Running,
            JobStatus::Succeeded,
            JobStatus::Failed,
            JobStatus::Cancelled,
        ] {
            assert_eq!(JobStatus::parse(s.as_str()), Some(s));
            let json = serde_json::to_value(s).unwrap_or_default();
            assert_eq!(json.as_str(), Some(s.as_str()));
        }
        assert_eq!(JobStatus::parse("done"), None);
    }

    #[test]
    fn job_request_refuses_unknown_fields() {
        let e = serde_json::from_str::<JobRequest>(r#"{"code":"1","colour":"red"}"#)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(e.contains("colour"), "{e}");
    }
}
