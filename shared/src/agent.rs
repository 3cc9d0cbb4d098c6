//! Wire types of the session agent API (`/v1/...` on `SESSION_AGENT_ADDR`).
//! camelCase JSON, following the seed README's session-agent contract.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The header that carries the per-session token.
pub const SESSION_TOKEN_HEADER: &str = "x-session-token";

/// The header of the agent's admin credential, the data plane's own: it
/// creates sessions, lists and deletes any (lifecycle only: never steps or
/// files, which need the session's token).
pub const ADMIN_TOKEN_HEADER: &str = "x-agent-admin-token";

/// A language runtime a session can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Runtime {
    Python,
    Node,
    Bash,
}

impl Runtime {
    /// Every runtime, in a stable order.
    pub const ALL: [Runtime; 3] = [Runtime::Python, Runtime::Node, Runtime::Bash];

    /// The lowercase wire name.
    pub const fn as_str(self) -> &'static str {
        match self {
            Runtime::Python => "python",
            Runtime::Node => "node",
            Runtime::Bash => "bash",
        }
    }

    /// Parses a wire name; `None` for anything unknown.
    pub fn parse(name: &str) -> Option<Runtime> {
        Runtime::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl std::fmt::Display for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Resource limits of a session. Every field is optional on input; the agent
/// fills defaults and refuses values above its maximums.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Limits {
    /// Memory of the whole sandbox, MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u64>,
    /// CPU quota in millicores (1000 = one core).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_millicores: Option<u64>,
    /// Maximum number of processes/threads inside the sandbox.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_processes: Option<u64>,
    /// Size of the workspace, MiB (also the largest file that can be written).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_mb: Option<u64>,
    /// Default step timeout, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Output cap per stream per step, bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_bytes: Option<u64>,
}

/// Limits after defaults were applied: what the sandbox actually runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct EffectiveLimits {
    pub memory_mb: u64,
    pub cpu_millicores: u64,
    pub max_processes: u64,
    pub disk_mb: u64,
    pub timeout_ms: u64,
    pub max_output_bytes: u64,
}

/// `POST /v1/sessions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CreateSessionRequest {
    pub session_id: String,
    /// Runtime name; kept as a string so an unknown one gets a coded 400.
    pub runtime: String,
    /// The per-session token; required unless the agent runs with auth bypass.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<Limits>,
    /// Environment variables for the interpreter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub env: Option<BTreeMap<String, String>>,
    /// Lifetime of the session, seconds (agent default when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    /// The session ends after this long without a request, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_seconds: Option<u64>,
    /// A host directory of installed packages (prepared by the data plane
    /// under the agent's `SESSION_AGENT_PACKAGE_ROOT`), mounted read-only on
    /// the interpreter's import path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub packages_dir: Option<String>,
    /// Secret values by name (resolved by the data plane): set only in the
    /// interpreter's environment, never in a file, an argument or a log,
    /// and masked in everything a step returns. `Debug` prints `***`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secrets: Option<crate::secrets::SecretEnv>,
}

/// A session as the agent reports it. Never carries the token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionInfo {
    pub session_id: String,
    pub runtime: Runtime,
    /// `gvisor`, `bwrap`, `pod` or `none`.
    pub isolation: String,
    pub limits: EffectiveLimits,
    /// Unix milliseconds.
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
    pub last_used_at_ms: u64,
    /// Whether the sandbox came from the warm pool.
    pub warm: bool,
    /// Steps run so far.
    pub steps: u64,
    /// Times the interpreter was restarted (state lost) in this session.
    pub restarts: u64,
}

/// `GET /v1/sessions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SessionList {
    pub sessions: Vec<SessionInfo>,
}

/// How a step's code is run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum StepMode {
    /// Run the code; the value of a final expression is the result.
    #[default]
    Eval,
    /// Run the code, then call `handler(event)`; its return value is the result.
    Handler,
}

/// `POST /v1/steps`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StepRequest {
    pub session_id: String,
    pub step_id: String,
    pub code: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<StepMode>,
    /// The argument of `handler(event)` in handler mode.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event: Option<serde_json::Value>,
}

/// How a step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    /// The code ran to completion.
    Ok,
    /// The code raised an exception (or bash exited non-zero); the session is usable.
    Error,
    /// The step ran past its timeout and was interrupted.
    Timeout,
    /// The sandbox died during the step (memory limit, crash) and was
    /// restarted, or the session ended while the step ran.
    Killed,
}

/// An exception or failure raised by the step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct StepError {
    /// Exception type (`ZeroDivisionError`, `TypeError`), or one of the
    /// agent's codes: `Timeout`, `MemoryError`, `SandboxExited`, `ExitStatus`
    /// (bash), `SessionEnded`, `ResultTooLarge`, `KernelProtocolError`; a
    /// cancelled data-plane job reports `Cancelled`.
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    #[serde(default)]
    pub traceback: String,
}

/// The result of one step.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct StepResult {
    pub session_id: String,
    pub step_id: String,
    pub status: StepStatus,
    pub stdout: String,
    pub stderr: String,
    /// The value of the final expression (eval) or of `handler(event)`.
    pub result: Option<serde_json::Value>,
    pub error: Option<StepError>,
    pub duration_ms: u64,
    /// stdout or stderr went over the cap and was cut.
    pub truncated: bool,
    /// The interpreter was restarted: variables from earlier steps are gone
    /// (workspace files remain).
    pub state_lost: bool,
    /// Files directly under `output/` that the step created or changed
    /// (at most [`MAX_OUTPUT_FILES`]); absent when there are none. New files
    /// are always listed; under gVisor an in-place change to an existing
    /// file can reach the host only after the step has answered (the Sentry
    /// caches file data), and is then not listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_files: Option<Vec<FileEntry>>,
}

/// Most files a step result lists in `outputFiles`.
pub const MAX_OUTPUT_FILES: usize = 64;

/// One event of a streamed step (`Accept: text/event-stream`). The SSE event
/// name is the variant name; `data` is this JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct OutputChunk {
    pub data: String,
}

/// SSE event names of a streamed step.
pub mod sse_event {
    pub const STDOUT: &str = "stdout";
    pub const STDERR: &str = "stderr";
    pub const RESULT: &str = "result";
    pub const ERROR: &str = "error";
}

/// `GET /v1/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    pub status: String,
    pub isolation: String,
    pub sessions: usize,
    /// Idle sandboxes per runtime in the warm pool.
    pub warm_pool: BTreeMap<String, usize>,
    pub version: String,
}

/// An entry of a workspace directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct FileEntry {
    /// Path relative to the workspace root, `/`-separated.
    pub path: String,
    /// `file`, `dir` or `other` (symlinks and special files are listed, never followed).
    pub kind: String,
    pub size: u64,
    /// Unix milliseconds.
    pub modified_ms: u64,
}

/// `GET /v1/sessions/{id}/files[/{dir}]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct FileList {
    pub files: Vec<FileEntry>,
}

/// Checks a client-chosen id (session or step): 1-128 of `[A-Za-z0-9._-]`,
/// not starting with `.`. Ids become file and cgroup names, so nothing else.
pub fn validate_id(kind: &str, id: &str) -> Result<(), String> {
    crate::ids::check_id(kind, id).map_err(|e| e.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids() {
        assert!(validate_id("sessionId", "session-1").is_ok());
        assert!(validate_id("sessionId", "a.b_c-D9").is_ok());
        for bad in ["", "..", ".x", "a/b", "a b", "ä", &"x".repeat(129)] {
            assert!(validate_id("sessionId", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn step_result_wire_format_is_pinned() {
        let r = StepResult {
            session_id: "s".into(),
            step_id: "1".into(),
            status: StepStatus::Error,
            stdout: "a\n".into(),
            stderr: String::new(),
            result: None,
            error: Some(StepError {
                kind: "ZeroDivisionError".into(),
                message: "division by zero".into(),
                traceback: "tb".into(),
            }),
            duration_ms: 3,
            truncated: false,
            state_lost: false,
            output_files: None,
        };
        expect_test::expect![[r#"{"sessionId":"s","stepId":"1","status":"error","stdout":"a\n","stderr":"","result":null,"error":{"type":"ZeroDivisionError","message":"division by zero","traceback":"tb"},"durationMs":3,"truncated":false,"stateLost":false}"#]]
        .assert_eq(&serde_json::to_string(&r).unwrap());
    }

    #[test]
    fn create_request_refuses_unknown_fields() {
        let err = serde_json::from_str::<CreateSessionRequest>(
            r#"{"sessionId":"s","runtime":"python","tokn":"x"}"#,
        );
        assert!(err.is_err());
        let ok: CreateSessionRequest = serde_json::from_str(
            r#"{"sessionId":"s","runtime":"python","limits":{"memoryMb":64}}"#,
        )
        .unwrap();
        assert_eq!(ok.limits.unwrap().memory_mb, Some(64));
    }
}
