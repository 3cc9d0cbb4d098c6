//! The MCP tools: each calls the same domain function as its REST route
//! (same policy action, idempotency and audit), renders the answer as
//! `structuredContent` plus text, and caps output for a model's context.
//! Every call is recorded first (`mcp.tool_call`, transport `mcp`) and
//! refused if that record cannot be written.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use axum::http::request::Parts;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use futures::StreamExt;
use rmcp::handler::server::tool::{schema_for_input, schema_for_output};
use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, Implementation,
    InitializeResult, JsonObject, ListToolsResult, PaginatedRequestParams,
    ProgressNotificationParam, Resource, ResourceContents, ServerCapabilities, ServerConfig, Tool,
    ToolAnnotations,
};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use shared::CodedError;
use shared::ErrorCode;
use shared::agent::{FileEntry, FileList, StepMode, StepResult};
use shared::client::{PathStream, StepEvent};
use shared::controlplane::{Job, JobRequest, JobStatus, SessionRequest, SessionStepRequest};
use shared::dataplane::{RuntimeList, SessionViewList};
use shared::ids::{ArtifactId, JobId, SessionId, WorkflowId};
use shared::workflow::{Workflow, WorkflowRequest};

use crate::App;
use crate::audit::AuditEvent;
use crate::identity::Identity;
use crate::orchestration::JobFilter;
use crate::orchestration::idempotency::resolve_key;
use crate::policy::PolicyInput;

/// `run_code` waits this long for the result unless told otherwise.
const DEFAULT_WAIT_MS: u64 = 30_000;
/// Longest wait of `run_code` / `get_job` (as `GET /v1/jobs/{id}?waitMs=`).
const MAX_WAIT_MS: u64 = 60_000;
/// Images returned per call, and the largest one.
const MAX_IMAGES: usize = 4;
const MAX_IMAGE_BYTES: u64 = 2 * 1024 * 1024;
/// Artifacts up to this size come back embedded; larger ones as a link.
const MAX_EMBED_BYTES: u64 = 256 * 1024;

/// The tool handler; one per request (stateless), cheap to build.
#[derive(Clone)]
pub struct McpTools {
    app: Arc<App>,
}

impl McpTools {
    pub fn new(app: Arc<App>) -> McpTools {
        McpTools { app }
    }
}

// ---------------------------------------------------------------------------
// Arguments

/// How the code runs.
#[derive(Debug, Clone, Copy, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
enum ModeArg {
    /// Run the code; the value of the last expression is the result.
    Eval,
    /// Run the code, then call `handler(event)`; its return value is the result.
    Handler,
}

impl From<ModeArg> for StepMode {
    fn from(m: ModeArg) -> StepMode {
        match m {
            ModeArg::Eval => StepMode::Eval,
            ModeArg::Handler => StepMode::Handler,
        }
    }
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RunCodeArgs {
    /// The program to run.
    code: String,
    /// Runtime name from `list_runtimes` (default `python`).
    runtime: Option<String>,
    /// `eval` (default) or `handler` (define `handler(event)`).
    mode: Option<ModeArg>,
    /// The argument of `handler(event)` in `handler` mode.
    event: Option<Value>,
    /// Time limit of the code, milliseconds.
    timeout_ms: Option<u64>,
    /// Packages (`name` or `name==version`) from the runtime's allowlist.
    packages: Option<Vec<String>>,
    /// Free-form labels to find the job by (`list_jobs`).
    labels: Option<BTreeMap<String, String>>,
    /// Retry-safe key: the same key and arguments run once; a repeat
    /// returns the same job (kept 24 h; another body with the same key is
    /// refused with `idempotency_key_reused`).
    idempotency_key: Option<String>,
    /// How long to wait for the result, ms (default 30000, at most 60000;
    /// 0 returns at once). Past it the job keeps running: poll `get_job`.
    wait_ms: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GetJobArgs {
    /// The `jobId` from `run_code`.
    job_id: String,
    /// Wait up to this long (ms, at most 60000) for the job to finish.
    wait_ms: Option<u64>,
    /// Return stdout and stderr from this byte offset (to page through
    /// output that was truncated).
    output_offset: Option<usize>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct JobIdArgs {
    /// The `jobId` from `run_code`.
    job_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ListJobsArgs {
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    status: Option<String>,
    /// `name=value`.
    label: Option<String>,
    /// Page size, 1-500 (default 50).
    limit: Option<i64>,
    /// `nextCursor` of the previous page.
    cursor: Option<String>,
}

/// An input file of `run_workflow`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WorkflowFileArg {
    /// Path relative to the workspace; parent directories are created.
    path: String,
    /// The file's content.
    content: String,
    /// `utf8` (default) or `base64`.
    encoding: Option<String>,
}

/// A step of `run_workflow`.
#[derive(Debug, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WorkflowStepArg {
    /// Code to run; variables from earlier steps are still defined.
    code: String,
    /// Time limit of this step, milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    timeout_ms: Option<u64>,
    /// Go on with the next step even if this one fails.
    #[serde(default)]
    continue_on_error: bool,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RunWorkflowArgs {
    /// The steps, run in order in one session (at most 64).
    steps: Vec<WorkflowStepArg>,
    /// Runtime name from `list_runtimes` (default `python`).
    runtime: Option<String>,
    /// Packages (`name` or `name==version`) from the runtime's allowlist.
    packages: Option<Vec<String>>,
    /// Environment variables of the interpreter (not secrets).
    env: Option<BTreeMap<String, String>>,
    /// Input files written before the first step.
    files: Option<Vec<WorkflowFileArg>>,
    /// Workspace paths stored as artifacts after the last step.
    outputs: Option<Vec<String>>,
    /// Free-form labels kept with the workflow.
    labels: Option<BTreeMap<String, String>>,
    /// Retry-safe key: the same key and plan run once.
    idempotency_key: Option<String>,
    /// How long to wait for the end, ms (default 30000, at most 60000;
    /// 0 returns at once). Past it the workflow keeps running: poll
    /// `get_workflow`.
    wait_ms: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct GetWorkflowArgs {
    /// The `workflowId` from `run_workflow`.
    workflow_id: String,
    /// Wait up to this long (ms, at most 60000) for the workflow to finish.
    wait_ms: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct CreateSessionArgs {
    /// Runtime name from `list_runtimes` (default `python`).
    runtime: Option<String>,
    /// Idle lifetime, seconds (the platform default when absent).
    ttl_seconds: Option<u64>,
    /// Packages (`name` or `name==version`) from the runtime's allowlist.
    packages: Option<Vec<String>>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct RunStepArgs {
    /// The `sessionId` from `create_session`.
    session_id: String,
    /// Code to run; variables from earlier steps are still defined.
    code: String,
    /// Time limit of this step, milliseconds.
    timeout_ms: Option<u64>,
    /// `eval` (default) or `handler`.
    mode: Option<ModeArg>,
    /// The argument of `handler(event)` in `handler` mode.
    event: Option<Value>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct NoArgs {}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct SessionArgs {
    /// The `sessionId` from `create_session`.
    session_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ListFilesArgs {
    /// The `sessionId` from `create_session`.
    session_id: String,
    /// A directory relative to the workspace (default: its top).
    path: Option<String>,
}

/// How file content is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
enum Encoding {
    /// UTF-8 text.
    Text,
    /// Base64 of the bytes.
    Base64,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ReadFileArgs {
    /// The `sessionId` from `create_session`.
    session_id: String,
    /// File path relative to the workspace, e.g. `output/result.csv`.
    path: String,
    /// `text` or `base64`; default: text when the bytes are UTF-8.
    encoding: Option<Encoding>,
    /// Start at this byte offset (to page through a large file).
    offset: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct WriteFileArgs {
    /// The `sessionId` from `create_session`.
    session_id: String,
    /// File path relative to the workspace; parent directories are created.
    path: String,
    /// The file's content.
    content: String,
    /// `text` (default) or `base64`.
    encoding: Option<Encoding>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct UploadArtifactArgs {
    /// The artifact's file name (no `/`, `\\`, control characters, `.` or `..`).
    name: String,
    /// The content.
    content: String,
    /// `text` (default) or `base64`.
    encoding: Option<Encoding>,
    /// Attach it to a session: it is then shredded with the session.
    session_id: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ArtifactArgs {
    /// An `artifactId` from a job's `output.artifacts`.
    artifact_id: String,
}

// ---------------------------------------------------------------------------
// Outputs of our own (the others are the REST API's types)

#[derive(Debug, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
struct ClosedOutput {
    session_id: String,
    closed: bool,
}

#[derive(Debug, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
struct ReadFileOutput {
    path: String,
    /// The file's size in bytes.
    size: u64,
    /// Byte offset `content` starts at.
    offset: u64,
    encoding: Encoding,
    content: String,
    /// Part of the file is not in `content`: read on from `nextOffset`.
    truncated: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_offset: Option<u64>,
}

#[derive(Debug, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
struct WriteFileOutput {
    path: String,
    bytes: u64,
}

#[derive(Debug, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
struct ArtifactOutput {
    artifact_id: String,
    name: String,
    size: u64,
    /// SHA-256 of the bytes, hex.
    sha256: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    session_id: Option<String>,
    /// The bytes over HTTP (same bearer token).
    download_url: String,
    /// The bytes are in this result as an embedded resource.
    embedded: bool,
}

// ---------------------------------------------------------------------------
// The catalogue

/// The output schema of a REST API type, from the OpenAPI description, with
/// the components it references as `$defs`.
fn api_schema(name: &str) -> Arc<JsonObject> {
    static COMPONENTS: LazyLock<JsonObject> = LazyLock::new(|| {
        use utoipa::OpenApi;
        let doc = crate::api::ApiDoc::openapi();
        let schemas = doc.components.map(|c| c.schemas).unwrap_or_default();
        let text = serde_json::to_string(&schemas)
            .unwrap_or_default()
            .replace("#/components/schemas/", "#/$defs/");
        serde_json::from_str(&text).unwrap_or_default()
    });
    let mut root = match COMPONENTS.get(name) {
        Some(Value::Object(o)) => o.clone(),
        _ => JsonObject::new(),
    };
    let mut defs = JsonObject::new();
    let mut todo = vec![Value::Object(root.clone())];
    while let Some(v) = todo.pop() {
        collect_refs(&v, &mut |r| {
            if !defs.contains_key(r)
                && let Some(s) = COMPONENTS.get(r)
            {
                defs.insert(r.to_owned(), s.clone());
                todo.push(s.clone());
            }
        });
    }
    root.entry("type").or_insert_with(|| json!("object"));
    if !defs.is_empty() {
        root.insert("$defs".into(), Value::Object(defs));
    }
    Arc::new(root)
}

fn collect_refs(v: &Value, f: &mut impl FnMut(&str)) {
    match v {
        Value::Object(o) => {
            for (k, v) in o {
                if k == "$ref"
                    && let Some(r) = v.as_str().and_then(|r| r.strip_prefix("#/$defs/"))
                {
                    f(r);
                }
                collect_refs(v, f);
            }
        }
        Value::Array(a) => a.iter().for_each(|v| collect_refs(v, f)),
        _ => {}
    }
}

fn input<T: JsonSchema + 'static>() -> Arc<JsonObject> {
    schema_for_input::<T>().unwrap_or_default()
}

/// (read-only, destructive, idempotent); openWorld is always false: tools
/// act on this service only.
fn hints(read_only: bool, destructive: bool, idempotent: bool) -> ToolAnnotations {
    ToolAnnotations::new()
        .read_only(read_only)
        .destructive(destructive)
        .idempotent(idempotent)
        .open_world(false)
}

fn tool(
    name: &'static str,
    title: &str,
    description: &'static str,
    input: Arc<JsonObject>,
    output: Arc<JsonObject>,
    annotations: ToolAnnotations,
) -> Tool {
    Tool::new(name, description, input)
        .with_title(title)
        .with_raw_output_schema(output)
        .with_annotations(annotations.with_title(title))
}

trait WithTitle {
    fn with_title(self, t: &str) -> Self;
}

impl WithTitle for ToolAnnotations {
    fn with_title(mut self, t: &str) -> Self {
        self.title = Some(t.to_owned());
        self
    }
}

static CATALOG: LazyLock<Vec<Tool>> = LazyLock::new(|| {
    vec![
        tool(
            "run_code",
            "Run code once",
            "Run code once in a fresh, isolated sandbox (gVisor) and return its result: status, stdout, stderr, the value of the last expression (`result`) and files written under `output/` (as artifacts; PNG images come back as images). Nothing persists between calls: use create_session + run_step to keep variables. Waits up to `waitMs` (default 30 s); if the job is still running, returns its `jobId` and status: poll get_job. Pass `idempotencyKey` to make a retry safe. Cost: one sandbox per call.",
            input::<RunCodeArgs>(),
            api_schema("Job"),
            hints(false, false, false),
        ),
        tool(
            "get_job",
            "Get a job",
            "A job started by run_code: its status and, once finished, its output. `waitMs` waits for the end; `outputOffset` pages through stdout/stderr that were truncated.",
            input::<GetJobArgs>(),
            api_schema("Job"),
            hints(true, false, true),
        ),
        tool(
            "cancel_job",
            "Cancel a job",
            "Cancel a queued or running job (a finished one gives `job_finished`).",
            input::<JobIdArgs>(),
            api_schema("Job"),
            hints(false, true, true),
        ),
        tool(
            "list_jobs",
            "List jobs",
            "Your jobs, newest first, optionally filtered by status or label; page with `cursor`.",
            input::<ListJobsArgs>(),
            api_schema("JobList"),
            hints(true, false, true),
        ),
        tool(
            "run_workflow",
            "Run a workflow",
            "Run an ordered plan as one unit in one fresh sandbox session: write input `files`, run `steps` in order (variables persist between them; a failing step stops the rest unless it has `continueOnError`), store `outputs` (workspace paths) as artifacts, then destroy the session. Returns each step's status and output. Waits up to `waitMs` (default 30 s); if still running, poll get_workflow. Pass `idempotencyKey` to make a retry safe. Cost: one sandbox for the workflow's duration.",
            input::<RunWorkflowArgs>(),
            api_schema("Workflow"),
            hints(false, false, false),
        ),
        tool(
            "get_workflow",
            "Get a workflow",
            "A workflow started by run_workflow: its status, each step's status and output, and its artifacts. `waitMs` waits for the end.",
            input::<GetWorkflowArgs>(),
            api_schema("Workflow"),
            hints(true, false, true),
        ),
        tool(
            "create_session",
            "Create a session",
            "Start a stateful sandbox: variables, imports and files persist across run_step calls until close_session or the TTL. Returns the `sessionId`. Cost: one sandbox held until closed; close it when done.",
            input::<CreateSessionArgs>(),
            api_schema("SessionView"),
            hints(false, false, false),
        ),
        tool(
            "run_step",
            "Run a step in a session",
            "Run code in an existing session; earlier variables are still defined. Returns status, stdout, stderr and `result` (the last expression's value); PNG files the step writes under `output/` come back as images. With a progress token, stdout/stderr stream as progress notifications while the step runs. Cost: a step in an existing session (no new sandbox).",
            input::<RunStepArgs>(),
            api_schema("StepResult"),
            hints(false, false, false),
        ),
        tool(
            "list_sessions",
            "List sessions",
            "Your live sessions (id, runtime, expiry): pass a `sessionId` to run_step, the file tools or close_session.",
            input::<NoArgs>(),
            api_schema("SessionViewList"),
            hints(true, false, true),
        ),
        tool(
            "close_session",
            "Close a session",
            "Destroy a session and securely delete its workspace and artifacts.",
            input::<SessionArgs>(),
            schema_for_output::<ClosedOutput>(),
            hints(false, true, true),
        ),
        tool(
            "list_files",
            "List files",
            "Files in a session's workspace (its top directory, or `path`).",
            input::<ListFilesArgs>(),
            api_schema("FileList"),
            hints(true, false, true),
        ),
        tool(
            "read_file",
            "Read a file",
            "Read a file from a session's workspace as text or base64; large files are cut: continue from `nextOffset`.",
            input::<ReadFileArgs>(),
            schema_for_output::<ReadFileOutput>(),
            hints(true, false, true),
        ),
        tool(
            "write_file",
            "Write a file",
            "Write a file into a session's workspace (text, or base64 for binary); replaces an existing file.",
            input::<WriteFileArgs>(),
            schema_for_output::<WriteFileOutput>(),
            hints(false, true, true),
        ),
        tool(
            "list_runtimes",
            "List runtimes",
            "The runtimes (languages) run_code and create_session accept, with their default and maximum limits and allowed packages.",
            input::<NoArgs>(),
            api_schema("RuntimeList"),
            hints(true, false, true),
        ),
        tool(
            "upload_artifact",
            "Upload an artifact",
            "Store a file as an encrypted artifact (text, or base64 for binary), optionally attached to a session (then deleted with it); returns its `artifactId`, size and sha256. The same as REST `POST /v1/artifacts`; for large files use that route, which streams. Cost: storage only, no sandbox.",
            input::<UploadArtifactArgs>(),
            api_schema("ArtifactInfo"),
            hints(false, false, false),
        ),
        tool(
            "get_artifact",
            "Get an artifact",
            "A file a job left in `output/`: metadata, the bytes embedded when small (up to 256 KiB), else a download link.",
            input::<ArtifactArgs>(),
            schema_for_output::<ArtifactOutput>(),
            hints(true, false, true),
        ),
    ]
});

// ---------------------------------------------------------------------------
// Errors and rendering

/// The one mapping of a domain error to an MCP tool error: the same stable
/// code and message as REST, `isError: true`.
pub fn tool_error(e: CodedError) -> CallToolResult {
    let mut body = json!({"code": e.code, "message": e.message});
    if let Some(d) = e.details {
        body["details"] = d;
    }
    let text = format!("error {}: {}", e.code.as_str(), e.message);
    let mut r = CallToolResult::structured_error(body);
    r.content = vec![ContentBlock::text(text)];
    r
}

/// A tool's `content` argument as bytes, refused past `max` bytes.
fn decode_content(
    content: String,
    encoding: Option<Encoding>,
    max: usize,
) -> Result<bytes::Bytes, CodedError> {
    let bytes = match encoding.unwrap_or(Encoding::Text) {
        Encoding::Text => bytes::Bytes::from(content.into_bytes()),
        Encoding::Base64 => bytes::Bytes::from(
            B64.decode(content.trim())
                .map_err(|e| bad(format!("invalid argument `content`: not base64: {e}")))?,
        ),
    };
    if bytes.len() > max {
        return Err(CodedError::new(
            ErrorCode::PayloadTooLarge,
            format!("invalid argument `content`: larger than {max} bytes"),
        ));
    }
    Ok(bytes)
}

fn bad(m: impl Into<String>) -> CodedError {
    CodedError::new(ErrorCode::InvalidArgument, m.into())
}

/// Arguments into `T`; a failure names the argument at fault.
fn parse<T: DeserializeOwned>(args: JsonObject) -> Result<T, CodedError> {
    serde_path_to_error::deserialize(Value::Object(args)).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if path.is_empty() || path == "." {
            bad(format!("invalid arguments: {inner}"))
        } else {
            bad(format!("invalid argument `{path}`: {inner}"))
        }
    })
}

fn job_id(v: &str) -> Result<JobId, CodedError> {
    JobId::parse(v).map_err(|e| bad(format!("invalid argument `jobId`: {}", e.0)))
}

fn session_id(v: &str) -> Result<SessionId, CodedError> {
    SessionId::parse(v).map_err(|e| bad(format!("invalid argument `sessionId`: {}", e.0)))
}

fn to_value<T: Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

/// A success: `structured` as `structuredContent` and `text` first.
fn ok(structured: Value, text: String, extra: Vec<ContentBlock>) -> CallToolResult {
    let mut r = CallToolResult::structured(structured);
    let mut content = vec![ContentBlock::text(text)];
    content.extend(extra);
    r.content = content;
    r
}

/// Cuts `s` at `max` characters with the marker; true when cut.
fn cap(s: &mut String, max: usize, hint: &str) -> bool {
    let Some((end, _)) = s.char_indices().nth(max) else {
        return false;
    };
    let more = s.len() - end;
    s.truncate(end);
    s.push_str(&format!(
        "\n[truncated, {more} more bytes; full output: {hint}]"
    ));
    true
}

/// From byte `offset` on (at a char boundary at or before it).
fn from_offset(s: &str, offset: usize) -> String {
    let mut start = offset.min(s.len());
    while !s.is_char_boundary(start) {
        start -= 1;
    }
    s[start..].to_owned()
}

fn cap_result(v: &mut Option<Value>, max: usize, hint: &str) {
    if let Some(r) = v {
        let mut text = r.to_string();
        if cap(&mut text, max, hint) {
            *r = Value::String(text);
        }
    }
}

fn render_output(
    status: &str,
    result: Option<&Value>,
    error: Option<&Value>,
    stdout: &str,
    stderr: &str,
) -> String {
    let mut t = format!("status: {status}\n");
    if let Some(r) = result.filter(|r| !r.is_null()) {
        t.push_str(&format!("result: {r}\n"));
    }
    if let Some(e) = error.filter(|e| !e.is_null()) {
        t.push_str(&format!("error: {e}\n"));
    }
    if !stdout.is_empty() {
        t.push_str(&format!("stdout:\n{stdout}\n"));
    }
    if !stderr.is_empty() {
        t.push_str(&format!("stderr:\n{stderr}\n"));
    }
    t
}

impl McpTools {
    fn max(&self) -> usize {
        self.app.config.mcp_max_output_chars
    }

    /// A job with stdout/stderr from `offset` and capped.
    fn render_job(&self, mut job: Job, offset: usize) -> (Value, String) {
        let max = self.max();
        let hint = |stream: &str, from: usize| {
            format!(
                "get_job jobId={} outputOffset={from} ({stream})",
                job.job_id
            )
        };
        let (h_out, h_err, h_res) = (
            hint("stdout", offset + max),
            hint("stderr", offset + max),
            format!("GET /v1/jobs/{}", job.job_id),
        );
        if let Some(o) = &mut job.output {
            o.stdout = from_offset(&o.stdout, offset);
            o.stderr = from_offset(&o.stderr, offset);
            cap(&mut o.stdout, max, &h_out);
            cap(&mut o.stderr, max, &h_err);
            cap_result(&mut o.result, max, &h_res);
        }
        let mut text = match &job.output {
            Some(o) => render_output(
                job.status.as_str(),
                o.result.as_ref(),
                o.error.as_ref().map(to_value).as_ref(),
                &o.stdout,
                &o.stderr,
            ),
            None => format!("status: {}\n", job.status.as_str()),
        };
        text = format!("jobId: {}\n{text}", job.job_id);
        if let Some(e) = &job.error {
            text.push_str(&format!("error {}: {}\n", e.code, e.message));
        }
        if !job.status.is_final() {
            text.push_str(
                "The job is still running: call get_job with this jobId (waitMs) for the result.\n",
            );
        }
        if let Some(o) = &job.output {
            for a in &o.artifacts {
                text.push_str(&format!(
                    "artifact: {} ({} bytes) artifactId={}\n",
                    a.name, a.size, a.artifact_id
                ));
            }
        }
        (to_value(&job), text)
    }

    /// PNG artifacts of a finished job, as image content (bounded).
    async fn job_images(&self, who: &Identity, job: &Job) -> Vec<ContentBlock> {
        let mut images = Vec::new();
        let Some(o) = &job.output else {
            return images;
        };
        for a in o
            .artifacts
            .iter()
            .filter(|a| is_png(&a.name) && a.size <= MAX_IMAGE_BYTES)
            .take(MAX_IMAGES)
        {
            let Ok(id) = ArtifactId::parse(a.artifact_id.clone()) else {
                continue;
            };
            match self.artifact_bytes(who, &id, MAX_IMAGE_BYTES).await {
                Ok(bytes) => images.push(ContentBlock::image(B64.encode(&bytes), "image/png")),
                Err(e) => tracing::debug!(error = %e.message, "artifact image not returned"),
            }
        }
        images
    }

    async fn artifact_bytes(
        &self,
        who: &Identity,
        id: &ArtifactId,
        max: u64,
    ) -> Result<Vec<u8>, CodedError> {
        let (_info, mut body) = self.app.sessions.artifact_download(who, id).await?;
        let mut out = Vec::new();
        while let Some(chunk) = body.next().await {
            let chunk = chunk
                .map_err(|e| CodedError::new(ErrorCode::DataPlaneUnavailable, e.to_string()))?;
            out.extend_from_slice(&chunk);
            if out.len() as u64 > max {
                return Err(CodedError::new(
                    ErrorCode::PayloadTooLarge,
                    "artifact too large",
                ));
            }
        }
        Ok(out)
    }

    /// The PNG files the step wrote under `output/`: the agent lists what a
    /// step created or changed there in its result (`outputFiles`), so a
    /// step that wrote none costs no extra call.
    async fn step_images(
        &self,
        who: &Identity,
        id: &SessionId,
        written: &[FileEntry],
    ) -> Vec<ContentBlock> {
        let mut images = Vec::new();
        for f in written
            .iter()
            .filter(|f| f.kind == "file" && is_png(&f.path) && f.size <= MAX_IMAGE_BYTES)
            .take(MAX_IMAGES)
        {
            let path = if f.path.starts_with("output/") {
                f.path.clone()
            } else {
                format!("output/{}", f.path)
            };
            if let Ok(PathStream::File(file)) = self.app.sessions.read_path(who, id, &path).await
                && let Ok(bytes) = file.bytes_limited(MAX_IMAGE_BYTES as usize).await
                && bytes.starts_with(b"\x89PNG\r\n\x1a\n")
            {
                images.push(ContentBlock::image(B64.encode(&bytes), "image/png"));
            }
        }
        images
    }

    fn render_step(&self, mut r: StepResult, session: &str) -> (Value, String) {
        let max = self.max();
        let hint = format!(
            "write it to a file and read_file sessionId={session} (offset), or GET /v1/sessions/{session}/steps"
        );
        cap(&mut r.stdout, max, &hint);
        cap(&mut r.stderr, max, &hint);
        cap_result(&mut r.result, max, &hint);
        let mut text = render_output(
            to_value(&r.status).as_str().unwrap_or(""),
            r.result.as_ref(),
            r.error.as_ref().map(to_value).as_ref(),
            &r.stdout,
            &r.stderr,
        );
        if r.state_lost {
            text.push_str("note: the interpreter was restarted; variables from earlier steps are gone (files remain)\n");
        }
        (to_value(&r), text)
    }
}

fn is_png(name: &str) -> bool {
    name.to_ascii_lowercase().ends_with(".png")
}

// ---------------------------------------------------------------------------
// The tools

impl McpTools {
    async fn dispatch(
        &self,
        who: &Identity,
        name: &str,
        args: JsonObject,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, CodedError> {
        let app = &self.app;
        match name {
            "run_code" => self.run_code(who, parse(args)?).await,
            "get_job" => {
                let a: GetJobArgs = parse(args)?;
                let id = job_id(&a.job_id)?;
                let job = match a.wait_ms {
                    Some(ms) if ms > 0 => {
                        let _slot = app.waiters.enter(&who.tenant)?;
                        app.jobs
                            .wait(who, &id, Duration::from_millis(ms.min(MAX_WAIT_MS)))
                            .await?
                    }
                    _ => app.jobs.get(who, &id).await?,
                };
                let images = self.job_images(who, &job).await;
                let (v, t) = self.render_job(job, a.output_offset.unwrap_or(0));
                Ok(ok(v, t, images))
            }
            "run_workflow" => self.run_workflow(who, parse(args)?).await,
            "get_workflow" => {
                let a: GetWorkflowArgs = parse(args)?;
                let id = WorkflowId::parse(a.workflow_id.as_str())
                    .map_err(|e| bad(format!("invalid argument `workflowId`: {e}")))?;
                let w = match a.wait_ms {
                    Some(ms) if ms > 0 => {
                        let _slot = app.waiters.enter(&who.tenant)?;
                        app.workflows
                            .wait(who, &id, Duration::from_millis(ms.min(MAX_WAIT_MS)))
                            .await?
                    }
                    _ => app.workflows.get(who, &id).await?,
                };
                let (v, t) = self.render_workflow(w);
                Ok(ok(v, t, vec![]))
            }
            "cancel_job" => {
                let a: JobIdArgs = parse(args)?;
                let job = app.jobs.cancel(who, &job_id(&a.job_id)?).await?;
                let (v, t) = self.render_job(job, 0);
                Ok(ok(v, t, vec![]))
            }
            "list_jobs" => {
                let a: ListJobsArgs = parse(args)?;
                let status = match a.status.as_deref() {
                    Some(s) => Some(JobStatus::parse(s).ok_or_else(|| {
                        bad(format!(
                            "invalid argument `status`: {s:?}: one of queued, running, succeeded, failed, cancelled"
                        ))
                    })?),
                    None => None,
                };
                let label = match a.label.as_deref() {
                    Some(l) => {
                        let (n, v) = l.split_once('=').ok_or_else(|| {
                            bad(format!(
                                "invalid argument `label`: {l:?}: expected name=value"
                            ))
                        })?;
                        Some((n.to_owned(), v.to_owned()))
                    }
                    None => None,
                };
                if let Some(limit) = a.limit
                    && !(1..=500).contains(&limit)
                {
                    return Err(bad("invalid argument `limit`: must be 1-500"));
                }
                let filter = JobFilter {
                    status,
                    label,
                    cursor: a.cursor,
                    limit: a.limit,
                    ..JobFilter::default()
                };
                let mut list = app.jobs.list(who, &filter).await?;
                for j in &mut list.jobs {
                    if let Some(o) = &mut j.output {
                        let hint = format!("get_job jobId={}", j.job_id);
                        cap(&mut o.stdout, self.max() / 10, &hint);
                        cap(&mut o.stderr, self.max() / 10, &hint);
                        cap_result(&mut o.result, self.max() / 10, &hint);
                    }
                }
                let text = list
                    .jobs
                    .iter()
                    .map(|j| format!("{} {} {}", j.job_id, j.status.as_str(), j.runtime))
                    .collect::<Vec<_>>()
                    .join("\n");
                let text = format!(
                    "{} job(s){}\n{text}",
                    list.jobs.len(),
                    list.next_cursor
                        .as_deref()
                        .map(|c| format!(" (more: cursor={c})"))
                        .unwrap_or_default()
                );
                Ok(ok(to_value(&list), text, vec![]))
            }
            "create_session" => {
                let a: CreateSessionArgs = parse(args)?;
                let req: SessionRequest = serde_json::from_value(json!({
                    "runtime": a.runtime, "ttlSeconds": a.ttl_seconds, "packages": a.packages,
                }))
                .map_err(|e| bad(e.to_string()))?;
                let view = app.sessions.create(who, req).await?;
                let v = to_value(&view);
                let text = format!(
                    "sessionId: {}\nUse run_step with this sessionId; close_session when done.\n{v}",
                    v["sessionId"].as_str().unwrap_or("")
                );
                Ok(ok(v, text, vec![]))
            }
            "run_step" => self.run_step(who, parse(args)?, ctx).await,
            "list_sessions" => {
                let _: NoArgs = parse(args)?;
                let list = SessionViewList {
                    sessions: app.sessions.list(who).await?,
                };
                let v = to_value(&list);
                Ok(ok(v.clone(), v.to_string(), vec![]))
            }
            "close_session" => {
                let a: SessionArgs = parse(args)?;
                let id = session_id(&a.session_id)?;
                app.sessions.delete(who, &id).await?;
                let out = ClosedOutput {
                    session_id: id.to_string(),
                    closed: true,
                };
                Ok(ok(to_value(&out), format!("session {id} closed"), vec![]))
            }
            "list_files" => {
                let a: ListFilesArgs = parse(args)?;
                let id = session_id(&a.session_id)?;
                let list: FileList = match a.path.as_deref().filter(|p| !p.is_empty()) {
                    None => app.sessions.list_files(who, &id).await?,
                    Some(p) => match app.sessions.read_path(who, &id, p).await? {
                        PathStream::Dir(l) => l,
                        PathStream::File(_) => {
                            return Err(bad(format!(
                                "invalid argument `path`: {p:?} is a file: use read_file"
                            )));
                        }
                    },
                };
                let text = list
                    .files
                    .iter()
                    .map(|f| format!("{} {} {}", f.kind, f.size, f.path))
                    .collect::<Vec<_>>()
                    .join("\n");
                Ok(ok(to_value(&list), text, vec![]))
            }
            "read_file" => self.read_file(who, parse(args)?).await,
            "write_file" => {
                let a: WriteFileArgs = parse(args)?;
                let id = session_id(&a.session_id)?;
                let bytes = decode_content(a.content, a.encoding, app.config.max_body_bytes)?;
                let n = bytes.len() as u64;
                app.sessions.write_file(who, &id, &a.path, bytes).await?;
                let out = WriteFileOutput {
                    path: a.path.clone(),
                    bytes: n,
                };
                Ok(ok(
                    to_value(&out),
                    format!("wrote {n} bytes to {}", a.path),
                    vec![],
                ))
            }
            "upload_artifact" => {
                let a: UploadArtifactArgs = parse(args)?;
                let session = match a.session_id.as_deref() {
                    Some(s) => Some(session_id(s)?),
                    None => None,
                };
                let bytes = decode_content(a.content, a.encoding, app.config.max_body_bytes)?;
                let body = futures::stream::once(async move { Ok::<_, std::io::Error>(bytes) });
                let info = app
                    .sessions
                    .artifact_upload(who, &a.name, session.as_ref(), body)
                    .await?;
                let text = format!(
                    "stored {} as artifactId {} ({} bytes, sha256 {})",
                    info.name, info.artifact_id, info.size, info.sha256
                );
                Ok(ok(to_value(&info), text, vec![]))
            }
            "list_runtimes" => {
                let _: NoArgs = parse(args)?;
                app.policy
                    .authorize(
                        who,
                        &PolicyInput {
                            action: "runtime.list".into(),
                            resource: json!({"type": "runtime"}),
                            request: json!({}),
                        },
                    )
                    .await?;
                let list = RuntimeList {
                    runtimes: app.dp.runtimes(&who.tenant).await?,
                };
                let v = to_value(&list);
                Ok(ok(v.clone(), v.to_string(), vec![]))
            }
            "get_artifact" => {
                let a: ArtifactArgs = parse(args)?;
                let id = ArtifactId::parse(a.artifact_id.clone())
                    .map_err(|e| bad(format!("invalid argument `artifactId`: {}", e.0)))?;
                let info = app.sessions.artifact_info(who, &id).await?;
                let base = ctx
                    .extensions
                    .get::<Parts>()
                    .map(|p| super::public_base(app, &p.headers))
                    .unwrap_or_default();
                let url = format!("{base}/tools/artifacts/{id}/download");
                let mut extra = Vec::new();
                let mut embedded = false;
                if info.size <= MAX_EMBED_BYTES {
                    let bytes = self.artifact_bytes(who, &id, MAX_EMBED_BYTES).await?;
                    let uri = format!("artifact://{id}/{}", info.name);
                    let res = match String::from_utf8(bytes) {
                        Ok(text) => ResourceContents::text(text, uri),
                        Err(e) => ResourceContents::blob(B64.encode(e.as_bytes()), uri)
                            .with_mime_type(if is_png(&info.name) {
                                "image/png"
                            } else {
                                "application/octet-stream"
                            }),
                    };
                    extra.push(ContentBlock::resource(res));
                    embedded = true;
                } else {
                    extra.push(ContentBlock::resource_link(
                        Resource::new(url.clone(), info.name.clone()).with_size(info.size),
                    ));
                }
                let out = ArtifactOutput {
                    artifact_id: info.artifact_id.clone(),
                    name: info.name.clone(),
                    size: info.size,
                    sha256: info.sha256.clone(),
                    session_id: info.session_id.clone(),
                    download_url: url.clone(),
                    embedded,
                };
                let text = format!(
                    "{} ({} bytes, sha256 {}){}",
                    info.name,
                    info.size,
                    info.sha256,
                    if embedded {
                        " embedded below".to_owned()
                    } else {
                        format!(": download {url} with the same bearer token")
                    }
                );
                Ok(ok(to_value(&out), text, extra))
            }
            other => Err(bad(format!("unknown tool {other:?}: see tools/list"))),
        }
    }

    async fn run_code(&self, who: &Identity, a: RunCodeArgs) -> Result<CallToolResult, CodedError> {
        let app = &self.app;
        let key = resolve_key(a.idempotency_key.as_deref(), None)
            .map_err(|e| bad(format!("invalid argument `idempotencyKey`: {}", e.message)))?;
        let req: JobRequest = serde_json::from_value(json!({
            "code": a.code,
            "runtime": a.runtime,
            "mode": a.mode.map(StepMode::from),
            "event": a.event,
            "timeoutMs": a.timeout_ms,
            "packages": a.packages,
            "labels": a.labels,
        }))
        .map_err(|e| bad(e.to_string()))?;
        let submitted = app.jobs.submit(who, key, req).await?;
        if submitted.status >= 400 {
            let body: shared::ErrorBody = serde_json::from_str(&submitted.body).map_err(|e| {
                CodedError::new(ErrorCode::Internal, format!("stored response: {e}"))
            })?;
            return Err(CodedError::new(body.code, body.message));
        }
        let mut job: Job = serde_json::from_str(&submitted.body)
            .map_err(|e| CodedError::new(ErrorCode::Internal, format!("stored response: {e}")))?;
        let wait = a.wait_ms.unwrap_or(DEFAULT_WAIT_MS).min(MAX_WAIT_MS);
        if !job.status.is_final() && wait > 0 {
            let id = job_id(&job.job_id)?;
            let _slot = app.waiters.enter(&who.tenant)?;
            job = app.jobs.wait(who, &id, Duration::from_millis(wait)).await?;
        }
        let images = self.job_images(who, &job).await;
        let (v, mut t) = self.render_job(job, 0);
        if submitted.replayed {
            t = format!("(replayed: this idempotencyKey was already used; same job)\n{t}");
        }
        Ok(ok(v, t, images))
    }

    async fn run_workflow(
        &self,
        who: &Identity,
        a: RunWorkflowArgs,
    ) -> Result<CallToolResult, CodedError> {
        let app = &self.app;
        let key = resolve_key(a.idempotency_key.as_deref(), None)
            .map_err(|e| bad(format!("invalid argument `idempotencyKey`: {}", e.message)))?;
        let req: WorkflowRequest = serde_json::from_value(json!({
            "runtime": a.runtime,
            "packages": a.packages,
            "env": a.env,
            "labels": a.labels,
            "files": a.files,
            "steps": a.steps,
            "outputs": a.outputs,
        }))
        .map_err(|e| bad(e.to_string()))?;
        let submitted = app.workflows.submit(who, key, req).await?;
        let mut w: Workflow = serde_json::from_str(&submitted.body)
            .map_err(|e| CodedError::new(ErrorCode::Internal, format!("stored response: {e}")))?;
        let wait = a.wait_ms.unwrap_or(DEFAULT_WAIT_MS).min(MAX_WAIT_MS);
        if !w.status.is_final() && wait > 0 {
            let id = WorkflowId::parse(w.workflow_id.as_str())
                .map_err(|e| CodedError::new(ErrorCode::Internal, e.to_string()))?;
            let _slot = app.waiters.enter(&who.tenant)?;
            w = app
                .workflows
                .wait(who, &id, Duration::from_millis(wait))
                .await?;
        }
        let (v, mut t) = self.render_workflow(w);
        if submitted.replayed {
            t = format!("(replayed: this idempotencyKey was already used; same workflow)\n{t}");
        }
        Ok(ok(v, t, vec![]))
    }

    /// A workflow with each step's output capped (the budget shared).
    fn render_workflow(&self, mut w: Workflow) -> (Value, String) {
        let per_step = (self.max() / w.steps.len().max(1)).max(256);
        let hint = format!("GET /v1/workflows/{}", w.workflow_id);
        let mut text = format!(
            "workflowId: {}\nstatus: {}\n",
            w.workflow_id,
            w.status.as_str()
        );
        for step in &mut w.steps {
            text.push_str(&format!(
                "steps[{}]: {}\n",
                step.index,
                step.status.as_str()
            ));
            if let Some(o) = &mut step.output {
                cap(&mut o.stdout, per_step, &hint);
                cap(&mut o.stderr, per_step, &hint);
                cap_result(&mut o.result, per_step, &hint);
                if !o.stdout.is_empty() {
                    text.push_str(&format!("  stdout: {}\n", o.stdout));
                }
                if !o.stderr.is_empty() {
                    text.push_str(&format!("  stderr: {}\n", o.stderr));
                }
            }
            if let Some(e) = &step.error {
                text.push_str(&format!("  error {}: {}\n", e.code, e.message));
            }
        }
        for a in &w.artifacts {
            text.push_str(&format!(
                "artifact: {} ({} bytes) artifactId={}\n",
                a.name, a.size, a.artifact_id
            ));
        }
        if let Some(e) = &w.error {
            text.push_str(&format!("error {}: {}\n", e.code, e.message));
        }
        if !w.status.is_final() {
            text.push_str(
                "The workflow is still running: call get_workflow with this workflowId (waitMs).\n",
            );
        }
        (to_value(&w), text)
    }

    async fn run_step(
        &self,
        who: &Identity,
        a: RunStepArgs,
        ctx: &RequestContext<RoleServer>,
    ) -> Result<CallToolResult, CodedError> {
        let app = &self.app;
        let id = session_id(&a.session_id)?;
        let step: SessionStepRequest = serde_json::from_value(json!({
            "code": a.code,
            "timeoutMs": a.timeout_ms,
            "mode": a.mode.map(StepMode::from),
            "event": a.event,
        }))
        .map_err(|e| bad(e.to_string()))?;
        let result = match ctx.meta.get_progress_token() {
            None => app.sessions.step(who, &id, step).await?,
            Some(token) => {
                let _slot = app.waiters.enter(&who.tenant)?;
                let events = app.sessions.step_stream(who, &id, step).await?;
                futures::pin_mut!(events);
                let max = self.max();
                let (mut n, mut streamed) = (0u32, 0usize);
                let mut result = None;
                while let Some(ev) = events.next().await {
                    let (stream, s) = match ev {
                        Ok(StepEvent::Stdout(s)) => ("stdout", s),
                        Ok(StepEvent::Stderr(s)) => ("stderr", s),
                        Ok(StepEvent::Result(r)) => {
                            result = Some(*r);
                            break;
                        }
                        Ok(StepEvent::Error(body)) => {
                            return Err(CodedError::new(body.code, body.message));
                        }
                        Err(e) => {
                            return Err(CodedError::new(
                                ErrorCode::DataPlaneUnavailable,
                                e.to_string(),
                            ));
                        }
                    };
                    // Past the cap, output still arrives but is not relayed.
                    if streamed >= max {
                        continue;
                    }
                    n += 1;
                    streamed += s.len();
                    let mut m = format!("[{stream}] {s}");
                    cap(&mut m, max, "the step's result");
                    let _ = ctx
                        .peer
                        .notify_progress(
                            ProgressNotificationParam::new(token.clone(), f64::from(n))
                                .with_message(m),
                        )
                        .await;
                }
                result.ok_or_else(|| {
                    CodedError::new(
                        ErrorCode::DataPlaneUnavailable,
                        "the step's event stream ended without a result",
                    )
                })?
            }
        };
        let images = match result.output_files.as_deref() {
            Some(written) => self.step_images(who, &id, written).await,
            None => Vec::new(),
        };
        let (v, t) = self.render_step(result, &id);
        Ok(ok(v, t, images))
    }

    async fn read_file(
        &self,
        who: &Identity,
        a: ReadFileArgs,
    ) -> Result<CallToolResult, CodedError> {
        let id = session_id(&a.session_id)?;
        let file = match self.app.sessions.read_path(who, &id, &a.path).await? {
            PathStream::File(f) => f,
            PathStream::Dir(_) => {
                return Err(bad(format!(
                    "invalid argument `path`: {:?} is a directory: use list_files",
                    a.path
                )));
            }
        };
        let size = file.size;
        let offset = a.offset.unwrap_or(0);
        // Read no further than the window this answer can carry.
        let max = self.max() as u64;
        let window = match a.encoding {
            Some(Encoding::Base64) => max / 4 * 3,
            _ => max * 4,
        };
        let mut stream = std::pin::pin!(file.into_stream());
        let (mut seen, mut buf) = (0u64, Vec::new());
        let mut more = false;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk
                .map_err(|e| CodedError::new(ErrorCode::DataPlaneUnavailable, e.to_string()))?;
            let start = seen;
            seen += chunk.len() as u64;
            if seen <= offset {
                continue;
            }
            let from = offset.saturating_sub(start) as usize;
            buf.extend_from_slice(&chunk[from..]);
            if buf.len() as u64 > window {
                more = true;
                break;
            }
        }
        let total = size.unwrap_or(seen);
        let is_text = is_text_prefix(&buf);
        let encoding = match a.encoding {
            Some(Encoding::Text) if !is_text => {
                return Err(bad(format!(
                    "invalid argument `encoding`: {:?} is not UTF-8 text: use encoding=base64",
                    a.path
                )));
            }
            Some(e) => e,
            None if is_text => Encoding::Text,
            None => Encoding::Base64,
        };
        let (content, consumed) = match encoding {
            Encoding::Base64 => {
                let n = buf.len().min(window as usize);
                (B64.encode(&buf[..n]), n as u64)
            }
            Encoding::Text => {
                // Up to a character cut by the window's end.
                let valid = match std::str::from_utf8(&buf) {
                    Ok(t) => t,
                    Err(e) => std::str::from_utf8(&buf[..e.valid_up_to()]).unwrap_or(""),
                };
                let end = valid
                    .char_indices()
                    .nth(self.max())
                    .map_or(valid.len(), |(i, _)| i);
                (valid[..end].to_owned(), end as u64)
            }
        };
        let next = offset + consumed;
        let truncated = more || next < total;
        let out = ReadFileOutput {
            path: a.path.clone(),
            size: total,
            offset,
            encoding,
            content,
            truncated,
            next_offset: truncated.then_some(next),
        };
        let mut text = match encoding {
            Encoding::Text => out.content.clone(),
            Encoding::Base64 => format!("(base64) {}", out.content),
        };
        if truncated {
            text.push_str(&format!(
                "\n[truncated, {} more bytes; full output: read_file path={} offset={next}]",
                total.saturating_sub(next),
                a.path
            ));
        }
        Ok(ok(to_value(&out), text, vec![]))
    }
}

/// UTF-8 but for a character cut at the end of the window.
fn is_text_prefix(buf: &[u8]) -> bool {
    match std::str::from_utf8(buf) {
        Ok(_) => true,
        Err(e) => e.error_len().is_none() && buf.len() - e.valid_up_to() < 4,
    }
}

impl ServerHandler for McpTools {
    fn get_info(&self) -> ServerConfig {
        InitializeResult::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new(
                "sandbox-control-plane",
                env!("CARGO_PKG_VERSION"),
            ))
            .with_instructions(
                "Run untrusted code in isolated sandboxes. run_code for one-shot programs; \
                 create_session + run_step to keep state across steps (close_session when done); \
                 files with list_files/read_file/write_file. Errors carry a stable `code`.",
            )
    }

    async fn list_tools(
        &self,
        _request: Option<PaginatedRequestParams>,
        _context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult::with_all_items(CATALOG.clone()))
    }

    fn get_tool(&self, name: &str) -> Option<Tool> {
        CATALOG.iter().find(|t| t.name == name).cloned()
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        let name = request.name.to_string();
        if !CATALOG.iter().any(|t| t.name == name) {
            return Err(ErrorData::invalid_params(
                format!("unknown tool {name:?}: see tools/list"),
                None,
            ));
        }
        // Set by the authentication middleware before rmcp saw the request.
        let identity = context
            .extensions
            .get::<Parts>()
            .and_then(|p| p.extensions.get::<Identity>())
            .cloned();
        let Some(who) = identity else {
            return Ok(tool_error(CodedError::new(
                ErrorCode::Unauthorized,
                "no verified identity on this request",
            ))
            .into());
        };
        // Recorded first; no record, no call (as REST's write-ahead audit).
        let ev = AuditEvent::by(&who, "mcp.tool_call", format!("tool/{name}"))
            .details(json!({"tool": name, "transport": "mcp"}));
        if let Err(e) = self.app.audit.record(ev).await {
            return Ok(tool_error(e).into());
        }
        let args = request.arguments.unwrap_or_default();
        // rmcp runs the call in a task of its own, under its own span: the
        // ids the services record on the current span (job, session, step,
        // workflow) land on this one, a child of the request's.
        let span = tracing::info_span!("mcp.tool", otel.name = %format_args!("mcp.tool {name}"),
            otel.kind = "internal", tool = %name, tenant_id = %who.tenant,
            job_id = tracing::field::Empty, workflow_id = tracing::field::Empty,
            session_id = tracing::field::Empty, step_id = tracing::field::Empty);
        let dispatched =
            tracing::Instrument::instrument(self.dispatch(&who, &name, args, &context), span);
        let result = match dispatched.await {
            Ok(r) => r,
            Err(e) => tool_error(e),
        };
        Ok(result.into())
    }
}
