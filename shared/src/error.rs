//! The one error contract of every plane: a stable machine-readable code, a
//! human message and the request id, mapped to exactly one HTTP status.

use serde::{Deserialize, Serialize};

/// Every error code any plane may return. Adding a variant forces a decision
/// about its HTTP status in [`ErrorCode::http_status`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The body is not valid JSON or does not match the expected shape.
    InvalidJson,
    /// A field has a value outside what is accepted.
    InvalidArgument,
    /// The body is not `application/json`.
    UnsupportedMediaType,
    /// The body is larger than the configured limit.
    PayloadTooLarge,
    /// A single `Range` outside the artifact (416, with `Content-Range: bytes */size`).
    RangeNotSatisfiable,
    /// No or wrong credential.
    Unauthorized,
    /// The credential is valid but does not allow this (another tenant).
    Forbidden,
    /// The route does not exist.
    RouteNotFound,
    /// The method is not allowed on this route.
    MethodNotAllowed,
    /// The session does not exist (or is not visible to the caller).
    SessionNotFound,
    /// A session with this id already exists.
    SessionExists,
    /// The session's sandbox vanished (found at a restart); delete it.
    SessionLost,
    /// The session is running another step.
    SessionBusy,
    /// The runtime is not one the service offers.
    UnknownRuntime,
    /// The step mode is not supported by this runtime.
    UnsupportedMode,
    /// A requested limit is above the maximum allowed.
    LimitExceeded,
    /// A file path escapes the session workspace.
    PathOutsideWorkspace,
    /// The file does not exist in the workspace.
    FileNotFound,
    /// The path names a directory or a special file where a file was expected.
    NotAFile,
    /// The workspace is out of space.
    WorkspaceFull,
    /// A requested package is not on the runtime's allowlist.
    DependencyNotAllowed,
    /// An allowed package cannot be installed (no matching wheel, no index).
    DependencyUnavailable,
    /// A secret the request names has no value for the caller's tenant in
    /// the data plane's secret source (the message names it).
    SecretNotFound,
    /// The artifact does not exist (or is not visible to the caller).
    ArtifactNotFound,
    /// The job does not exist (or is not visible to the caller).
    JobNotFound,
    /// Stored data failed its integrity check (altered at rest).
    IntegrityError,
    /// The agent holds as many sessions as it is allowed to.
    CapacityExhausted,
    /// The sandbox could not be started.
    SandboxStartFailed,
    /// The sandbox or the agent is unreachable or not ready.
    SandboxUnavailable,
    /// The runtime's image cannot be pulled (`ErrImagePull`,
    /// `ImagePullBackOff`): a deployment fault, not the caller's.
    SandboxImageUnavailable,
    /// No node can take the sandbox (unschedulable: not enough CPU or memory,
    /// or no node offers the RuntimeClass).
    SandboxUnschedulable,
    /// The sandbox was not ready within `SESSION_READY_TIMEOUT`.
    SandboxStartTimeout,
    /// The service is shutting down.
    ShuttingDown,
    /// Policy refused the request; the message lists the reasons.
    PolicyDenied,
    /// A submitted policy does not compile or lacks the required rules.
    PolicyInvalid,
    /// The tenant has no policy of its own (or is not the caller's tenant).
    PolicyNotFound,
    /// The `Idempotency-Key` was used before with a different request body.
    IdempotencyKeyReused,
    /// A request with this `Idempotency-Key` is still being processed.
    IdempotencyInProgress,
    /// The job has already finished (it cannot be cancelled).
    JobFinished,
    /// The workflow does not exist (or is not visible to the caller).
    WorkflowNotFound,
    /// The workflow has already finished (it cannot be cancelled).
    WorkflowFinished,
    /// The data plane is unreachable or not ready.
    DataPlaneUnavailable,
    /// The metadata database is unreachable.
    StorageUnavailable,
    /// The audit event could not be written, so the request was refused.
    AuditUnavailable,
    /// The tenant's policy went over an evaluation limit (time, size, an
    /// unbounded builtin): the request is refused, policy fails closed.
    PolicyLimitExceeded,
    /// A per-tenant cap is reached (queued or running jobs, open long polls
    /// or streams, concurrent policy evaluations, concurrent file and
    /// artifact transfers in the data plane): retry later.
    TenantQuotaExceeded,
    /// A per-tenant rate limit (requests, or sandbox creations) is
    /// exhausted: retry after `Retry-After` seconds.
    RateLimited,
    /// The shared rate limiter (Redis) cannot be reached, so sandbox
    /// creation is refused (it fails closed).
    RateLimiterUnavailable,
    /// The route is part of the contract but its feature does not exist yet
    /// (controlled egress and secrets, until they exist).
    NotImplemented,
    /// An unexpected failure inside the service (a bug, never bad input).
    Internal,
}

impl ErrorCode {
    /// The HTTP status this code is always returned with.
    pub const fn http_status(self) -> u16 {
        match self {
            Self::InvalidJson
            | Self::InvalidArgument
            | Self::UnknownRuntime
            | Self::UnsupportedMode
            | Self::LimitExceeded
            | Self::PathOutsideWorkspace
            | Self::NotAFile
            | Self::PolicyInvalid => 400,
            Self::Unauthorized => 401,
            Self::Forbidden
            | Self::DependencyNotAllowed
            | Self::PolicyDenied
            | Self::PolicyLimitExceeded => 403,
            Self::DependencyUnavailable => 424,
            Self::RouteNotFound
            | Self::SessionNotFound
            | Self::FileNotFound
            | Self::ArtifactNotFound
            | Self::JobNotFound
            | Self::WorkflowNotFound
            | Self::SecretNotFound
            | Self::PolicyNotFound => 404,
            Self::MethodNotAllowed => 405,
            Self::SessionExists
            | Self::SessionBusy
            | Self::IdempotencyInProgress
            | Self::JobFinished
            | Self::WorkflowFinished => 409,
            Self::SessionLost => 410,
            Self::PayloadTooLarge => 413,
            Self::RangeNotSatisfiable => 416,
            Self::IdempotencyKeyReused => 422,
            Self::UnsupportedMediaType => 415,
            Self::WorkspaceFull => 507,
            Self::CapacityExhausted | Self::TenantQuotaExceeded | Self::RateLimited => 429,
            Self::Internal | Self::SandboxStartFailed | Self::IntegrityError => 500,
            Self::SandboxUnavailable
            | Self::ShuttingDown
            | Self::DataPlaneUnavailable
            | Self::StorageUnavailable
            | Self::AuditUnavailable
            | Self::SandboxImageUnavailable
            | Self::SandboxUnschedulable
            | Self::RateLimiterUnavailable => 503,
            Self::SandboxStartTimeout => 504,
            Self::NotImplemented => 501,
        }
    }

    /// The snake_case wire name of the code (pinned against serde by a test).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::InvalidArgument => "invalid_argument",
            Self::UnsupportedMediaType => "unsupported_media_type",
            Self::PayloadTooLarge => "payload_too_large",
            Self::RangeNotSatisfiable => "range_not_satisfiable",
            Self::Unauthorized => "unauthorized",
            Self::Forbidden => "forbidden",
            Self::RouteNotFound => "route_not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::SessionNotFound => "session_not_found",
            Self::SessionExists => "session_exists",
            Self::SessionLost => "session_lost",
            Self::SessionBusy => "session_busy",
            Self::UnknownRuntime => "unknown_runtime",
            Self::UnsupportedMode => "unsupported_mode",
            Self::LimitExceeded => "limit_exceeded",
            Self::PathOutsideWorkspace => "path_outside_workspace",
            Self::FileNotFound => "file_not_found",
            Self::NotAFile => "not_a_file",
            Self::WorkspaceFull => "workspace_full",
            Self::DependencyNotAllowed => "dependency_not_allowed",
            Self::DependencyUnavailable => "dependency_unavailable",
            Self::SecretNotFound => "secret_not_found",
            Self::ArtifactNotFound => "artifact_not_found",
            Self::JobNotFound => "job_not_found",
            Self::IntegrityError => "integrity_error",
            Self::CapacityExhausted => "capacity_exhausted",
            Self::SandboxStartFailed => "sandbox_start_failed",
            Self::SandboxUnavailable => "sandbox_unavailable",
            Self::SandboxImageUnavailable => "sandbox_image_unavailable",
            Self::SandboxUnschedulable => "sandbox_unschedulable",
            Self::SandboxStartTimeout => "sandbox_start_timeout",
            Self::ShuttingDown => "shutting_down",
            Self::PolicyDenied => "policy_denied",
            Self::PolicyInvalid => "policy_invalid",
            Self::PolicyNotFound => "policy_not_found",
            Self::IdempotencyKeyReused => "idempotency_key_reused",
            Self::IdempotencyInProgress => "idempotency_in_progress",
            Self::JobFinished => "job_finished",
            Self::WorkflowNotFound => "workflow_not_found",
            Self::WorkflowFinished => "workflow_finished",
            Self::DataPlaneUnavailable => "data_plane_unavailable",
            Self::StorageUnavailable => "storage_unavailable",
            Self::AuditUnavailable => "audit_unavailable",
            Self::PolicyLimitExceeded => "policy_limit_exceeded",
            Self::TenantQuotaExceeded => "tenant_quota_exceeded",
            Self::RateLimited => "rate_limited",
            Self::RateLimiterUnavailable => "rate_limiter_unavailable",
            Self::NotImplemented => "not_implemented",
            Self::Internal => "internal",
        }
    }
}

/// The JSON body of every error response.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
    /// Machine-readable detail, for codes that have some (`policy_denied`:
    /// `{"reasons": [...]}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "openapi", schema(value_type = Option<Object>))]
    pub details: Option<serde_json::Value>,
}

/// A failure with a stable code: what domain code in every plane returns.
/// It knows nothing of a transport: the REST edge turns it into a status and
/// an [`ErrorBody`] (`shared::server`), the MCP edge into a tool error with
/// the same code and message.
#[derive(Debug, Clone, PartialEq)]
pub struct CodedError {
    pub code: ErrorCode,
    pub message: String,
    /// Machine-readable detail (the reasons of a policy denial, ...).
    pub details: Option<serde_json::Value>,
}

impl CodedError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            details: None,
        }
    }

    /// Adds machine-readable detail.
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.details = Some(details);
        self
    }
}

impl std::fmt::Display for CodedError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code.as_str(), self.message)
    }
}

impl std::error::Error for CodedError {}

#[cfg(test)]
mod tests {
    use super::*;

    const ALL: &[ErrorCode] = &[
        ErrorCode::InvalidJson,
        ErrorCode::InvalidArgument,
        ErrorCode::UnsupportedMediaType,
        ErrorCode::PayloadTooLarge,
        ErrorCode::RangeNotSatisfiable,
        ErrorCode::Unauthorized,
        ErrorCode::Forbidden,
        ErrorCode::RouteNotFound,
        ErrorCode::MethodNotAllowed,
        ErrorCode::SessionNotFound,
        ErrorCode::SessionExists,
        ErrorCode::SessionLost,
        ErrorCode::SessionBusy,
        ErrorCode::UnknownRuntime,
        ErrorCode::UnsupportedMode,
        ErrorCode::LimitExceeded,
        ErrorCode::PathOutsideWorkspace,
        ErrorCode::FileNotFound,
        ErrorCode::NotAFile,
        ErrorCode::WorkspaceFull,
        ErrorCode::DependencyNotAllowed,
        ErrorCode::DependencyUnavailable,
        ErrorCode::SecretNotFound,
        ErrorCode::ArtifactNotFound,
        ErrorCode::JobNotFound,
        ErrorCode::IntegrityError,
        ErrorCode::CapacityExhausted,
        ErrorCode::SandboxStartFailed,
        ErrorCode::SandboxUnavailable,
        ErrorCode::SandboxImageUnavailable,
        ErrorCode::SandboxUnschedulable,
        ErrorCode::SandboxStartTimeout,
        ErrorCode::ShuttingDown,
        ErrorCode::PolicyDenied,
        ErrorCode::PolicyInvalid,
        ErrorCode::PolicyNotFound,
        ErrorCode::IdempotencyKeyReused,
        ErrorCode::IdempotencyInProgress,
        ErrorCode::JobFinished,
        ErrorCode::WorkflowNotFound,
        ErrorCode::WorkflowFinished,
        ErrorCode::DataPlaneUnavailable,
        ErrorCode::StorageUnavailable,
        ErrorCode::AuditUnavailable,
        ErrorCode::PolicyLimitExceeded,
        ErrorCode::TenantQuotaExceeded,
        ErrorCode::RateLimited,
        ErrorCode::RateLimiterUnavailable,
        ErrorCode::NotImplemented,
        ErrorCode::Internal,
    ];

    #[test]
    fn as_str_matches_serde_name() {
        for code in ALL {
            let json = serde_json::to_value(code).unwrap();
            assert_eq!(json.as_str().unwrap(), code.as_str());
        }
    }

    #[test]
    fn wire_names_and_statuses_are_pinned() {
        let table: Vec<String> = ALL
            .iter()
            .map(|c| format!("{} {}", c.http_status(), c.as_str()))
            .collect();
        expect_test::expect![[r#"
            400 invalid_json
            400 invalid_argument
            415 unsupported_media_type
            413 payload_too_large
            416 range_not_satisfiable
            401 unauthorized
            403 forbidden
            404 route_not_found
            405 method_not_allowed
            404 session_not_found
            409 session_exists
            410 session_lost
            409 session_busy
            400 unknown_runtime
            400 unsupported_mode
            400 limit_exceeded
            400 path_outside_workspace
            404 file_not_found
            400 not_a_file
            507 workspace_full
            403 dependency_not_allowed
            424 dependency_unavailable
            404 secret_not_found
            404 artifact_not_found
            404 job_not_found
            500 integrity_error
            429 capacity_exhausted
            500 sandbox_start_failed
            503 sandbox_unavailable
            503 sandbox_image_unavailable
            503 sandbox_unschedulable
            504 sandbox_start_timeout
            503 shutting_down
            403 policy_denied
            400 policy_invalid
            404 policy_not_found
            422 idempotency_key_reused
            409 idempotency_in_progress
            409 job_finished
            404 workflow_not_found
            409 workflow_finished
            503 data_plane_unavailable
            503 storage_unavailable
            503 audit_unavailable
            403 policy_limit_exceeded
            429 tenant_quota_exceeded
            429 rate_limited
            503 rate_limiter_unavailable
            501 not_implemented
            500 internal"#]]
        .assert_eq(&table.join("\n"));
    }

    #[test]
    fn only_internal_failures_are_5xx_below_503() {
        for code in ALL {
            let status = code.http_status();
            // Server-side faults only: a bug, a sandbox that would not start,
            // stored data altered at rest. Never bad input.
            if status == 500 {
                assert!(matches!(
                    code,
                    ErrorCode::Internal | ErrorCode::SandboxStartFailed | ErrorCode::IntegrityError
                ));
            }
        }
    }
}
