//! Wire types of the data plane's internal API (`/internal/v1/...` on
//! `DATA_PLANE_ADDR`). camelCase JSON, like the agent's. Only the control
//! plane calls it, with the service credential.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::agent::{EffectiveLimits, Limits, StepMode};

/// A runtime of the registry, as `GET /internal/v1/runtimes` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RuntimeInfo {
    pub name: String,
    /// Interpreter inside the sandbox (local backend).
    pub interpreter: String,
    /// Container image of the session pod (Kubernetes backend).
    pub image: String,
    /// Package ecosystem of its dependencies (`pypi`, `npm`, or none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ecosystem: Option<String>,
    pub default_limits: EffectiveLimits,
    pub max_limits: EffectiveLimits,
}

/// `GET /internal/v1/runtimes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct RuntimeList {
    pub runtimes: Vec<RuntimeInfo>,
}

/// Packages one session or job may ask for, at most (both planes refuse a
/// longer list with 400 `invalid_argument`, before anything is installed).
pub const MAX_PACKAGES: usize = 64;

/// `POST /internal/v1/sessions`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateSession {
    /// Must equal the credential's tenant when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// Runtime name (default `python`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Packages (`name` or `name==version`), checked against the runtime's
    /// allowlist and installed read-only before the session is handed out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packages: Option<Vec<String>>,
}

/// A session as the data plane reports it: never its agent token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct SessionView {
    pub session_id: String,
    pub tenant: String,
    pub runtime: String,
    pub limits: EffectiveLimits,
    pub isolation: String,
    pub warm: bool,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    /// `active`, or `lost` when its sandbox vanished (found at a restart).
    pub state: String,
}

/// `GET /internal/v1/sessions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct SessionViewList {
    pub sessions: Vec<SessionView>,
}

/// `POST /internal/v1/sessions/{id}/steps`: the agent's step request without
/// the session id (it is in the path); the step id is generated when absent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunStep {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_id: Option<String>,
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<StepMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<serde_json::Value>,
}

/// Time the data plane allows a step beyond its own timeout (interrupt
/// grace, an interpreter restart) before it answers 503 itself; a caller's
/// bound on a step must be longer, so the coded answer arrives first.
pub const STEP_MARGIN_MS: u64 = 15_000;

/// `GET /healthz` and `GET /readyz`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProbeStatus {
    /// `ok` (live) or `ready`.
    pub status: String,
    /// Runtimes offered (`/readyz` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtimes: Option<usize>,
}

/// Claims of the service credential the control plane presents.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceClaims {
    pub iss: String,
    pub aud: String,
    pub sub: String,
    pub tenant: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
}

/// An artifact's metadata. Its bytes are encrypted at rest; this is not.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct ArtifactInfo {
    pub artifact_id: String,
    pub tenant: String,
    pub name: String,
    /// The session it belongs to: deleted with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    pub size: u64,
    /// SHA-256 of the plaintext, hex.
    pub sha256: String,
    pub created_at_ms: u64,
}

/// `POST /internal/v1/jobs`: a one-shot run in a fresh sandbox. The job id
/// makes it idempotent: a repeated id returns the first run's result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RunJob {
    pub job_id: String,
    /// Runtime name (default `python`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime: Option<String>,
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<StepMode>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packages: Option<Vec<String>>,
}

/// `error.type` of a cancelled job's result (`status: killed`), as
/// `POST /internal/v1/jobs/{id}/cancel` and every later run or get of that id
/// report it.
pub const JOB_CANCELLED: &str = "Cancelled";

/// The outcome of a job. Files the code wrote under `output/` in its
/// workspace are kept as artifacts (the sandbox itself is destroyed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobResult {
    pub job_id: String,
    pub status: crate::agent::StepStatus,
    pub stdout: String,
    pub stderr: String,
    pub result: Option<serde_json::Value>,
    pub error: Option<crate::agent::StepError>,
    pub duration_ms: u64,
    pub truncated: bool,
    pub artifacts: Vec<ArtifactInfo>,
    /// This answer is the saved result of an earlier run of the same job id.
    #[serde(default)]
    pub replayed: bool,
}

impl JobResult {
    /// Whether this is the outcome of a cancellation (not of the code).
    pub fn is_cancelled(&self) -> bool {
        self.status == crate::agent::StepStatus::Killed
            && self.error.as_ref().is_some_and(|e| e.kind == JOB_CANCELLED)
    }
}

/// The folder of the workspace whose files become a job's artifacts.
pub const JOB_OUTPUT_DIR: &str = "output";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::{StepError, StepStatus};

    fn cancelled() -> JobResult {
        JobResult {
            job_id: "j".into(),
            status: StepStatus::Killed,
            stdout: "started\n".into(),
            stderr: String::new(),
            result: None,
            error: Some(StepError {
                kind: JOB_CANCELLED.into(),
                message: "the job was cancelled".into(),
                traceback: String::new(),
            }),
            duration_ms: 5,
            truncated: false,
            artifacts: Vec::new(),
            replayed: false,
        }
    }

    #[test]
    fn a_cancelled_job_result_is_pinned() {
        expect_test::expect![[r#"{"jobId":"j","status":"killed","stdout":"started\n","stderr":"","result":null,"error":{"type":"Cancelled","message":"the job was cancelled","traceback":""},"durationMs":5,"truncated":false,"artifacts":[],"replayed":false}"#]]
        .assert_eq(&serde_json::to_string(&cancelled()).unwrap());
        assert!(cancelled().is_cancelled());
    }

    #[test]
    fn only_a_cancellation_is_cancelled() {
        // Killed by the memory limit, or a step that raised `Cancelled`.
        let oom = JobResult {
            error: Some(StepError {
                kind: "MemoryError".into(),
                message: "out of memory".into(),
                traceback: String::new(),
            }),
            ..cancelled()
        };
        let raised = JobResult {
            status: StepStatus::Error,
            ..cancelled()
        };
        assert!(!oom.is_cancelled() && !raised.is_cancelled());
    }
}
