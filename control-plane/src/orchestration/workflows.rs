//! Workflow records: submission (plan validation, policy, idempotency,
//! quotas and audit in one transaction), reads scoped by tenant, listing
//! with a status filter and a cursor, cancellation. The workers that run
//! them are in `workflow_worker`.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::json;
use shared::CodedError;
use shared::ErrorCode;
use shared::controlplane::JobStatus;
use shared::ids::{SessionId, WorkflowId};
use shared::workflow::{
    FileEncoding, MAX_STEP_CODE_BYTES, MAX_STEP_TIMEOUT_MS, MAX_WORKFLOW_FILE_BYTES,
    MAX_WORKFLOW_FILES, MAX_WORKFLOW_FILES_TOTAL, MAX_WORKFLOW_OUTPUTS, MAX_WORKFLOW_PATH_BYTES,
    MAX_WORKFLOW_STEPS, Workflow, WorkflowList, WorkflowRequest, WorkflowStep, WorkflowStepStatus,
};
use tokio::sync::{Notify, broadcast};

use super::idempotency::{Prior, fingerprint};
use super::jobs::{Submitted, validate_labels, validate_packages};
use crate::audit::{self, AuditEvent, AuditLog};
use crate::dataplane::DataPlane;
use crate::identity::Identity;
use crate::policy::{PolicyInput, PolicyService};
use crate::sessions::SessionService;
use crate::storage::jobs::{CancelMark, KeyClaim};
use crate::storage::workflows::{ListQuery, NewWorkflow};
use crate::storage::{self, Db, new_id, now_ms};

pub(crate) use crate::storage::workflows::WorkflowRow;

/// Tuning of the workflow workers (the job queue's lease, attempts and
/// polling, `WORKFLOW_WORKERS` loops).
#[derive(Debug, Clone)]
pub struct WorkflowSettings {
    pub max_attempts: u32,
    pub idempotency_ttl: Duration,
    pub lease: Duration,
    pub poll_interval: Duration,
    pub workers: usize,
    /// Workflows one tenant may have running (WORKFLOW_TENANT_MAX_RUNNING).
    pub tenant_max_running: i64,
}

/// Filters of `GET /v1/workflows`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkflowFilter {
    pub status: Option<JobStatus>,
    pub cursor: Option<String>,
    pub limit: Option<i64>,
}

/// Workflows: the records, the services the workers use, and the signals.
pub struct WorkflowService {
    pub(crate) db: Db,
    pub(crate) policy: PolicyService,
    pub(crate) dp: DataPlane,
    pub(crate) sessions: SessionService,
    pub(crate) audit: AuditLog,
    pub(crate) limits: Arc<crate::limits::Limits>,
    pub(crate) settings: WorkflowSettings,
    /// Wakes idle workers of this replica when a workflow is queued.
    pub(crate) wake: Arc<Notify>,
    /// Workflow ids that reached a final status on this replica.
    pub(crate) finished: broadcast::Sender<String>,
}

fn not_found(id: &str) -> CodedError {
    CodedError::new(ErrorCode::WorkflowNotFound, format!("no workflow {id}"))
}

/// Idempotency keys of workflows live beside the jobs' in one table, in a
/// space of their own: a job's key never replays a workflow.
fn key_space(key: &str) -> String {
    format!("workflow:{key}")
}

/// A 400 naming the offending field (`steps[3].code`), also in
/// `details.field` for programs.
fn bad_field(code: ErrorCode, field: &str, msg: impl std::fmt::Display) -> CodedError {
    CodedError::new(code, format!("{field}: {msg}")).with_details(json!({ "field": field }))
}

/// Checks a workspace path of a plan: relative, inside the workspace,
/// no empty, `.` or `..` component, no backslash or control character.
fn validate_path(field: &str, path: &str) -> Result<(), CodedError> {
    if path.is_empty() || path.len() > MAX_WORKFLOW_PATH_BYTES {
        return Err(bad_field(
            ErrorCode::InvalidArgument,
            field,
            format!("a path is 1-{MAX_WORKFLOW_PATH_BYTES} bytes"),
        ));
    }
    if path.chars().any(char::is_control) || path.contains('\\') {
        return Err(bad_field(
            ErrorCode::InvalidArgument,
            field,
            "no control characters or backslashes in a path",
        ));
    }
    if path.starts_with('/')
        || path
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad_field(
            ErrorCode::PathOutsideWorkspace,
            field,
            format!("{path:?} must be relative to the workspace, without empty, '.' or '..' parts"),
        ));
    }
    Ok(())
}

/// The decoded bytes of input file `i`.
pub(crate) fn file_bytes(
    i: usize,
    f: &shared::workflow::WorkflowFile,
) -> Result<Vec<u8>, CodedError> {
    match f.encoding.unwrap_or_default() {
        FileEncoding::Utf8 => Ok(f.content.as_bytes().to_vec()),
        FileEncoding::Base64 => STANDARD.decode(f.content.as_bytes()).map_err(|e| {
            bad_field(
                ErrorCode::InvalidArgument,
                &format!("files[{i}].content"),
                format!("not base64: {e}"),
            )
        }),
    }
}

/// The artifact name of an output path: its last component.
pub(crate) fn output_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Checks a plan's shape and bounds, naming the first bad field. Hermetic:
/// the runtime and its limits are checked against the data plane after.
pub fn validate_plan(req: &WorkflowRequest) -> Result<(), CodedError> {
    let invalid = |field: &str, msg: String| bad_field(ErrorCode::InvalidArgument, field, msg);
    if req.steps.is_empty() {
        return Err(invalid(
            "steps",
            "a workflow needs at least one step".into(),
        ));
    }
    if req.steps.len() > MAX_WORKFLOW_STEPS {
        return Err(invalid(
            "steps",
            format!("{} steps; at most {MAX_WORKFLOW_STEPS}", req.steps.len()),
        ));
    }
    for (i, step) in req.steps.iter().enumerate() {
        if step.code.trim().is_empty() {
            return Err(invalid(&format!("steps[{i}].code"), "is empty".into()));
        }
        if step.code.len() > MAX_STEP_CODE_BYTES {
            return Err(invalid(
                &format!("steps[{i}].code"),
                format!("{} bytes; at most {MAX_STEP_CODE_BYTES}", step.code.len()),
            ));
        }
        if let Some(t) = step.timeout_ms
            && !(1..=MAX_STEP_TIMEOUT_MS).contains(&t)
        {
            return Err(invalid(
                &format!("steps[{i}].timeoutMs"),
                format!("{t}; must be 1-{MAX_STEP_TIMEOUT_MS}"),
            ));
        }
    }
    // Secret names, as a session's (crate::secrets): the env var names
    // the code reads; values never come here.
    if let Some(names) = req.secrets.as_deref() {
        shared::secrets::check_names(names)
            .and_then(|()| shared::secrets::check_no_env_clash(names, req.env.as_ref()))
            .map_err(|m| invalid("secrets", m))?;
    }
    let files = req.files.as_deref().unwrap_or_default();
    if files.len() > MAX_WORKFLOW_FILES {
        return Err(invalid(
            "files",
            format!("{} files; at most {MAX_WORKFLOW_FILES}", files.len()),
        ));
    }
    let mut total = 0usize;
    let mut paths = BTreeSet::new();
    for (i, f) in files.iter().enumerate() {
        validate_path(&format!("files[{i}].path"), &f.path)?;
        if !paths.insert(f.path.as_str()) {
            return Err(invalid(
                &format!("files[{i}].path"),
                format!("{:?} is listed more than once", f.path),
            ));
        }
        let n = file_bytes(i, f)?.len();
        if n > MAX_WORKFLOW_FILE_BYTES {
            return Err(invalid(
                &format!("files[{i}].content"),
                format!("{n} bytes; at most {MAX_WORKFLOW_FILE_BYTES}"),
            ));
        }
        total += n;
        if total > MAX_WORKFLOW_FILES_TOTAL {
            return Err(invalid(
                &format!("files[{i}].content"),
                format!("the input files exceed {MAX_WORKFLOW_FILES_TOTAL} bytes together"),
            ));
        }
    }
    let outputs = req.outputs.as_deref().unwrap_or_default();
    if outputs.len() > MAX_WORKFLOW_OUTPUTS {
        return Err(invalid(
            "outputs",
            format!("{} outputs; at most {MAX_WORKFLOW_OUTPUTS}", outputs.len()),
        ));
    }
    let mut names = BTreeSet::new();
    for (i, p) in outputs.iter().enumerate() {
        validate_path(&format!("outputs[{i}]"), p)?;
        // The artifact is named after the file: two outputs may not share it.
        if !names.insert(output_name(p)) {
            return Err(invalid(
                &format!("outputs[{i}]"),
                format!(
                    "another output has the file name {:?} (artifacts are named after it)",
                    output_name(p)
                ),
            ));
        }
    }
    if let Some(labels) = &req.labels {
        validate_labels(labels).map_err(|e| invalid("labels", e.message))?;
    }
    validate_packages(req.packages.as_deref()).map_err(|e| invalid("packages", e.message))?;
    Ok(())
}

/// The policy input of a workflow: what its session asks for (the same
/// fields as `session.create`, so one platform rule governs both), plus
/// the plan's size. Never its code or files.
pub(crate) fn policy_request(req: &WorkflowRequest) -> serde_json::Value {
    json!({
        "runtime": req.runtime.as_deref().unwrap_or(crate::DEFAULT_RUNTIME),
        "limits": req.limits,
        "ttlSeconds": null,
        "packages": req.packages.clone().unwrap_or_default(),
        "egress": req.egress.clone().unwrap_or_default(),
        "secrets": req.secrets.clone().unwrap_or_default(),
        "labels": req.labels.clone().unwrap_or_default(),
        "steps": req.steps.len(),
        "files": req.files.as_ref().map_or(0, Vec::len),
        "outputs": req.outputs.clone().unwrap_or_default(),
    })
}

fn encode_cursor(created_ms: i64, id: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{created_ms}:{id}"))
}

fn decode_cursor(cursor: &str) -> Result<(i64, String), CodedError> {
    let bad = || {
        CodedError::new(
            ErrorCode::InvalidArgument,
            "cursor is not one this API issued",
        )
    };
    let raw = URL_SAFE_NO_PAD.decode(cursor).map_err(|_| bad())?;
    let raw = String::from_utf8(raw).map_err(|_| bad())?;
    let (ms, id) = raw.split_once(':').ok_or_else(bad)?;
    Ok((ms.parse().map_err(|_| bad())?, id.to_owned()))
}

impl WorkflowService {
    pub fn new(
        db: Db,
        policy: PolicyService,
        dp: DataPlane,
        sessions: SessionService,
        audit: AuditLog,
        limits: Arc<crate::limits::Limits>,
        settings: WorkflowSettings,
    ) -> Arc<WorkflowService> {
        let (finished, _) = broadcast::channel(1024);
        Arc::new(WorkflowService {
            db,
            policy,
            dp,
            sessions,
            audit,
            limits,
            settings,
            wake: Arc::new(Notify::new()),
            finished,
        })
    }

    /// Validates, authorizes and queues a workflow; with an idempotency
    /// key a repeat gets the first response back. The row, its steps, the
    /// key and the audit event commit together or not at all.
    pub async fn submit(
        &self,
        identity: &Identity,
        key: Option<String>,
        req: WorkflowRequest,
    ) -> Result<Submitted, CodedError> {
        validate_plan(&req)?;
        let runtime = req
            .runtime
            .clone()
            .unwrap_or_else(|| crate::DEFAULT_RUNTIME.to_owned());
        self.dp
            .check_runtime(&runtime, req.limits.as_ref(), None)
            .await?;
        for (i, step) in req.steps.iter().enumerate() {
            if let Some(t) = step.timeout_ms {
                self.dp
                    .check_runtime(&runtime, None, Some(t))
                    .await
                    .map_err(|e| {
                        let field = format!("steps[{i}].timeoutMs");
                        CodedError::new(e.code, format!("{field}: {}", e.message))
                            .with_details(json!({ "field": field }))
                    })?;
            }
        }
        let decision = self
            .policy
            .authorize(
                identity,
                &PolicyInput {
                    action: "workflow.create".into(),
                    resource: json!({"type": "workflow"}),
                    request: policy_request(&req),
                },
            )
            .await?;
        crate::policy::refuse_unbuilt(req.egress.as_deref())?;
        let hash = fingerprint(&serde_json::to_value(&req).map_err(|e| {
            CodedError::new(
                ErrorCode::Internal,
                format!("request does not serialize: {e}"),
            )
        })?);
        let now = now_ms();
        let id = new_id("wf");
        tracing::Span::current().record("workflow_id", id.as_str());
        let labels = req.labels.clone().unwrap_or_default();
        let workflow = Workflow {
            workflow_id: id.clone(),
            status: JobStatus::Queued,
            runtime: runtime.clone(),
            labels: labels.clone(),
            attempts: 0,
            session_id: None,
            steps: (0..req.steps.len())
                .map(|i| WorkflowStep {
                    index: i as u32,
                    status: WorkflowStepStatus::Pending,
                    started_at_ms: None,
                    finished_at_ms: None,
                    output: None,
                    error: None,
                })
                .collect(),
            artifacts: Vec::new(),
            teardown: None,
            created_at_ms: now,
            updated_at_ms: now,
            started_at_ms: None,
            finished_at_ms: None,
            error: None,
        };
        let body = serde_json::to_string(&workflow)
            .map_err(|e| CodedError::new(ErrorCode::Internal, e.to_string()))?;
        let ttl_ms = self.settings.idempotency_ttl.as_millis() as i64;
        let event =
            AuditEvent::by(identity, "workflow.submit", format!("workflow/{id}")).details(json!({
                "runtime": runtime,
                "labels": labels,
                "steps": req.steps.len(),
                "files": req.files.as_ref().map_or(0, Vec::len),
                "outputs": req.outputs.as_ref().map_or(0, Vec::len),
                "policyVersion": decision.policy_version,
                "idempotencyKey": key.is_some(),
            }));
        let tenant = identity.tenant.as_str();
        // The worker that runs the workflow continues this request's trace.
        let trace_parent = shared::telemetry::current_traceparent();
        let outcome: Result<Submitted, CodedError> = async {
            let mut tx = self.db.begin_write().await?;
            if let Some(key) = &key {
                let claim = storage::jobs::claim_key(
                    &mut tx,
                    tenant,
                    &key_space(key),
                    &hash,
                    now,
                    now + ttl_ms,
                )
                .await?;
                if let KeyClaim::Taken(stored) = claim {
                    tx.rollback().await?;
                    let prior = Prior::judge(
                        &stored.request_hash,
                        &stored.state,
                        stored.response_status,
                        stored.response_body,
                        &hash,
                    );
                    return match prior {
                        Prior::Replay { status, body } => Ok(Submitted {
                            status,
                            body,
                            replayed: true,
                        }),
                        other => Err(other.error().unwrap_or_else(|| {
                            CodedError::new(ErrorCode::Internal, "idempotency")
                        })),
                    };
                }
            }
            // A workflow is a session: the tenant's session quota and the
            // creation bucket, after the key (a replay costs nothing).
            let admitted = async {
                self.limits.admit_session(identity).await?;
                self.limits.admit_creation(identity).await
            }
            .await;
            if let Err(e) = admitted {
                tx.rollback().await?;
                return Err(e);
            }
            storage::workflows::insert(
                &mut tx,
                &NewWorkflow {
                    id: &id,
                    tenant,
                    subject: &identity.subject,
                    app: identity.app.as_deref(),
                    agent: identity.agent.as_deref(),
                    roles: &identity.roles,
                    runtime: &runtime,
                    spec: &req,
                    labels: &labels,
                    max_attempts: self.settings.max_attempts,
                    now,
                    trace_parent: trace_parent.as_deref(),
                },
            )
            .await?;
            audit::append(&mut tx, event).await?;
            if let Some(key) = &key {
                storage::jobs::complete_key(&mut tx, tenant, &key_space(key), 202, &body).await?;
            }
            tx.commit().await?;
            Ok(Submitted {
                status: 202,
                body: body.clone(),
                replayed: false,
            })
        }
        .await;
        if matches!(&outcome, Ok(s) if !s.replayed) {
            self.wake.notify_one();
        }
        outcome
    }

    async fn authorize_on(
        &self,
        identity: &Identity,
        action: &str,
        id: &str,
    ) -> Result<(), CodedError> {
        self.policy
            .authorize(
                identity,
                &PolicyInput {
                    action: action.into(),
                    resource: json!({"type": "workflow", "id": id}),
                    request: json!({}),
                },
            )
            .await
            .map(|_| ())
    }

    async fn row(&self, tenant: &str, id: &str) -> Result<WorkflowRow, CodedError> {
        storage::workflows::get(&self.db, tenant, id)
            .await?
            .ok_or_else(|| not_found(id))
    }

    /// One workflow of the caller's tenant (another tenant's -> 404).
    pub async fn get(&self, identity: &Identity, id: &WorkflowId) -> Result<Workflow, CodedError> {
        self.authorize_on(identity, "workflow.read", id).await?;
        Ok(self.row(&identity.tenant, id).await?.workflow)
    }

    /// Waits up to `timeout` for the workflow to reach a final status, then
    /// returns it as it is (a long poll).
    pub async fn wait(
        &self,
        identity: &Identity,
        id: &WorkflowId,
        timeout: Duration,
    ) -> Result<Workflow, CodedError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut finished = self.finished.subscribe();
        self.authorize_on(identity, "workflow.read", id).await?;
        loop {
            let w = self.row(&identity.tenant, id).await?.workflow;
            if w.status.is_final() || tokio::time::Instant::now() >= deadline {
                return Ok(w);
            }
            // Woken by this replica's workers; polled for other replicas'.
            let poll = tokio::time::sleep(Duration::from_millis(250));
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                _ = poll => {}
                _ = async {
                    loop {
                        match finished.recv().await {
                            Ok(done) if done == id.as_str() => break,
                            Ok(_) => continue,
                            Err(broadcast::error::RecvError::Lagged(_)) => break,
                            Err(broadcast::error::RecvError::Closed) => {
                                std::future::pending::<()>().await;
                            }
                        }
                    }
                } => {}
            }
        }
    }

    /// The tenant's workflows, newest first, one page at a time.
    pub async fn list(
        &self,
        identity: &Identity,
        f: &WorkflowFilter,
    ) -> Result<WorkflowList, CodedError> {
        self.policy
            .authorize(
                identity,
                &PolicyInput {
                    action: "workflow.read".into(),
                    resource: json!({"type": "workflow"}),
                    request: json!({}),
                },
            )
            .await?;
        let limit = f.limit.unwrap_or(50).clamp(1, 500);
        let cursor = f.cursor.as_deref().map(decode_cursor).transpose()?;
        let rows = storage::workflows::list(
            &self.db,
            identity.tenant.as_str(),
            &ListQuery {
                status: f.status,
                after: cursor.as_ref().map(|(ms, id)| (*ms, id.as_str())),
                limit: limit + 1,
            },
        )
        .await?;
        let more = rows.len() as i64 > limit;
        let workflows: Vec<Workflow> = rows
            .into_iter()
            .take(limit as usize)
            .map(|r| r.workflow)
            .collect();
        let next_cursor = if more {
            workflows
                .last()
                .map(|w| encode_cursor(w.created_at_ms, &w.workflow_id))
        } else {
            None
        };
        Ok(WorkflowList {
            workflows,
            next_cursor,
        })
    }

    /// Cancels a workflow: a queued one at once; a running one by deleting
    /// its session in the data plane (which interrupts the step), after
    /// which its worker tears down and records `cancelled`. A finished
    /// one -> 409 `workflow_finished`.
    pub async fn cancel(
        &self,
        identity: &Identity,
        id: &WorkflowId,
    ) -> Result<Workflow, CodedError> {
        let row = self.row(&identity.tenant, id).await?;
        self.authorize_on(identity, "workflow.cancel", id).await?;
        let finished = |status: JobStatus| {
            CodedError::new(
                ErrorCode::WorkflowFinished,
                format!("workflow {id} already {}", status.as_str()),
            )
        };
        if row.workflow.status.is_final() {
            return Err(finished(row.workflow.status));
        }
        let now = now_ms();
        let event = AuditEvent::by(identity, "workflow.cancel", format!("workflow/{id}"));
        let tenant = identity.tenant.as_str();
        let mark = async {
            let mut tx = self.db.begin_write().await?;
            let mark =
                storage::workflows::mark_cancelled(&mut tx, tenant, id.as_str(), now).await?;
            let state = match mark {
                CancelMark::Queued => "queued",
                CancelMark::Running => "running",
                CancelMark::Finished => {
                    tx.rollback().await?;
                    return Ok::<_, CodedError>(mark);
                }
            };
            audit::append(&mut tx, event.details(json!({ "state": state }))).await?;
            tx.commit().await?;
            Ok(mark)
        }
        .await?;
        match mark {
            CancelMark::Finished => {
                let w = self.row(&identity.tenant, id).await?.workflow;
                Err(finished(w.status))
            }
            CancelMark::Queued => {
                let _ = self.finished.send(id.to_string());
                Ok(self.row(&identity.tenant, id).await?.workflow)
            }
            CancelMark::Running => {
                // The step in flight ends when its sandbox goes; the worker
                // reads the flag before every step, so one not yet started
                // never starts.
                if let Some(sid) =
                    storage::workflows::session_of(&self.db, tenant, id.as_str()).await?
                    && let Ok(sid) = SessionId::parse(sid.as_str())
                    && let Err(e) = self.dp.delete_session(&identity.tenant, &sid).await
                    && e.code != ErrorCode::SessionNotFound
                {
                    tracing::warn!(workflow = %id, error = %e, "cancel could not delete the session yet");
                }
                self.wait(identity, id, Duration::from_secs(10)).await
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use shared::workflow::{WorkflowFile, WorkflowStepSpec};

    fn plan(v: serde_json::Value) -> WorkflowRequest {
        serde_json::from_value(v).unwrap()
    }

    fn refused(v: serde_json::Value) -> (ErrorCode, String, String) {
        let e = validate_plan(&plan(v)).unwrap_err();
        let field = e.details.as_ref().unwrap()["field"]
            .as_str()
            .unwrap()
            .to_owned();
        assert_eq!(e.code.http_status(), 400, "{e:?}");
        (e.code, field, e.message)
    }

    #[test]
    fn the_smallest_plan_is_valid() {
        validate_plan(&plan(json!({"runtime": "python", "steps": [
            {"code": "x = 41"}, {"code": "print(x + 1)"}]})))
        .unwrap();
    }

    #[test]
    fn every_bad_field_is_named() {
        let step = |code: &str| json!({"code": code});
        let many: Vec<_> = (0..=MAX_WORKFLOW_STEPS).map(|_| step("1")).collect();
        let cases = [
            (json!({"steps": []}), ErrorCode::InvalidArgument, "steps"),
            (json!({"steps": many}), ErrorCode::InvalidArgument, "steps"),
            (
                json!({"steps": [step("1"), step("  ")]}),
                ErrorCode::InvalidArgument,
                "steps[1].code",
            ),
            (
                json!({"steps": [step("1"), step("1"), step("1"), step(&"x".repeat(MAX_STEP_CODE_BYTES + 1))]}),
                ErrorCode::InvalidArgument,
                "steps[3].code",
            ),
            (
                json!({"steps": [step("1")], "secrets": ["db_password"]}),
                ErrorCode::InvalidArgument,
                "secrets",
            ),
            (
                json!({"steps": [step("1")], "secrets": ["TOKEN"], "env": {"TOKEN": "x"}}),
                ErrorCode::InvalidArgument,
                "secrets",
            ),
            (
                json!({"steps": [{"code": "1", "timeoutMs": 0}]}),
                ErrorCode::InvalidArgument,
                "steps[0].timeoutMs",
            ),
            (
                json!({"steps": [step("1"), {"code": "1", "timeoutMs": MAX_STEP_TIMEOUT_MS + 1}]}),
                ErrorCode::InvalidArgument,
                "steps[1].timeoutMs",
            ),
            (
                json!({"steps": [step("1")], "files": [{"path": "../x", "content": ""}]}),
                ErrorCode::PathOutsideWorkspace,
                "files[0].path",
            ),
            (
                json!({"steps": [step("1")], "files": [{"path": "a", "content": ""}, {"path": "/etc/passwd", "content": ""}]}),
                ErrorCode::PathOutsideWorkspace,
                "files[1].path",
            ),
            (
                json!({"steps": [step("1")], "files": [{"path": "a//b", "content": ""}]}),
                ErrorCode::PathOutsideWorkspace,
                "files[0].path",
            ),
            (
                json!({"steps": [step("1")], "files": [{"path": "a", "content": ""}, {"path": "a", "content": ""}]}),
                ErrorCode::InvalidArgument,
                "files[1].path",
            ),
            (
                json!({"steps": [step("1")], "files": [{"path": "a", "content": "!!", "encoding": "base64"}]}),
                ErrorCode::InvalidArgument,
                "files[0].content",
            ),
            (
                json!({"steps": [step("1")], "files": [{"path": "a", "content": "x".repeat(MAX_WORKFLOW_FILE_BYTES + 1)}]}),
                ErrorCode::InvalidArgument,
                "files[0].content",
            ),
            (
                json!({"steps": [step("1")], "outputs": ["out/a.txt", "../b"]}),
                ErrorCode::PathOutsideWorkspace,
                "outputs[1]",
            ),
            (
                json!({"steps": [step("1")], "outputs": ["x/a.txt", "y/a.txt"]}),
                ErrorCode::InvalidArgument,
                "outputs[1]",
            ),
            (
                json!({"steps": [step("1")], "outputs": (0..=MAX_WORKFLOW_OUTPUTS).map(|i| format!("o{i}")).collect::<Vec<_>>()}),
                ErrorCode::InvalidArgument,
                "outputs",
            ),
            (
                json!({"steps": [step("1")], "labels": {"has space": "x"}}),
                ErrorCode::InvalidArgument,
                "labels",
            ),
            (
                json!({"steps": [step("1")], "packages": ["six", "six"]}),
                ErrorCode::InvalidArgument,
                "packages",
            ),
        ];
        for (body, code, field) in cases {
            let (c, f, message) = refused(body.clone());
            assert_eq!((c, f.as_str()), (code, field), "{body}: {message}");
            assert!(message.starts_with(field), "{message}");
        }
    }

    #[test]
    fn too_many_input_bytes_together_are_refused() {
        let file = |i: usize| WorkflowFile {
            path: format!("f{i}"),
            content: "x".repeat(MAX_WORKFLOW_FILE_BYTES),
            encoding: None,
        };
        let req = WorkflowRequest {
            steps: vec![WorkflowStepSpec {
                code: "1".into(),
                timeout_ms: None,
                continue_on_error: false,
            }],
            files: Some((0..5).map(file).collect()),
            ..WorkflowRequest::default()
        };
        let e = validate_plan(&req).unwrap_err();
        assert!(e.message.starts_with("files[4].content"), "{e:?}");
        let too_many = WorkflowRequest {
            files: Some(
                (0..=MAX_WORKFLOW_FILES)
                    .map(|i| WorkflowFile {
                        path: format!("f{i}"),
                        content: String::new(),
                        encoding: None,
                    })
                    .collect(),
            ),
            ..req
        };
        assert!(
            validate_plan(&too_many)
                .unwrap_err()
                .message
                .starts_with("files:")
        );
    }

    #[test]
    fn base64_inputs_decode_and_cursors_round_trip() {
        let f = WorkflowFile {
            path: "a.bin".into(),
            content: STANDARD.encode([0u8, 255, 7]),
            encoding: Some(FileEncoding::Base64),
        };
        assert_eq!(file_bytes(0, &f).unwrap(), vec![0u8, 255, 7]);
        assert_eq!(output_name("out/deep/r.csv"), "r.csv");
        let c = encode_cursor(5, "wf_1");
        assert_eq!(decode_cursor(&c).unwrap(), (5, "wf_1".into()));
        assert!(decode_cursor("!!").is_err());
    }
}
