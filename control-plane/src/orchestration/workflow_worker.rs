//! The workflow workers: `WORKFLOW_WORKERS` loops per replica claim a
//! workflow with a lease (as the job workers do), renew it while they run
//! it, and go through the plan: the session (created through the sessions
//! service, the same path `POST /v1/sessions` takes), the input files, the
//! steps in order, the outputs as artifacts, the teardown.
//!
//! Durability: every step is recorded `running` in a committed transaction
//! before it is sent, and every change is guarded by the lease. A worker
//! that claims a workflow whose previous worker was lost (`attempts` > 1)
//! resumes it: finished steps are never run again, pending ones run in the
//! session that is still there; but a step recorded `running` has an
//! unknown outcome (the data plane keeps no result by step id), so it is
//! not sent again: it and the workflow fail with `workflow_interrupted`,
//! naming the step. The session is torn down on every terminal path.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::json;
use shared::ErrorCode;
use shared::agent::StepStatus;
use shared::client::PathStream;
use shared::controlplane::{JobFailure, JobStatus, SessionRequest, SessionStepRequest};
use shared::dataplane::{ArtifactFilter, ArtifactInfo, ArtifactMeta};
use shared::ids::{SessionId, TenantId};
use shared::workflow::{Teardown, WorkflowStepOutput, WorkflowStepStatus};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::workflows::{WorkflowRow, WorkflowService, file_bytes, output_name};
use crate::audit::{self, AuditEvent};
use crate::identity::Identity;
use crate::storage::workflows::{Finish, StepEnd};
use crate::storage::{self, StorageError, new_id, now_ms};

/// Actor of the events the workers record.
const WORKER_ACTOR: &str = "control-plane/workflow-worker";
/// Longest pause between retries after a transient failure.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Output and errors kept per step (the rest is cut).
const OUTPUT_CAP: usize = 64 * 1024;

/// Runs the workflow workers of this replica.
pub struct WorkflowDispatcher;

impl WorkflowDispatcher {
    /// Starts `settings.workers` loops on `tracker`; they stop when
    /// `shutdown` is cancelled.
    pub fn start(wf: Arc<WorkflowService>, tracker: &TaskTracker, shutdown: CancellationToken) {
        let owner = new_id("wfworker");
        tracing::info!(owner = %owner, workers = wf.settings.workers, "workflow workers started");
        for n in 0..wf.settings.workers {
            let wf = wf.clone();
            let owner = format!("{owner}/{n}");
            let shutdown = shutdown.clone();
            tracker.spawn(async move { worker_loop(wf, owner, shutdown).await });
        }
    }
}

async fn worker_loop(wf: Arc<WorkflowService>, owner: String, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        match claim(&wf, &owner).await {
            Ok(Some(row)) => {
                let span = run_span(&row);
                tracing::Instrument::instrument(run(&wf, &owner, row, &shutdown), span).await;
            }
            Ok(None) => {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = wf.wake.notified() => {}
                    _ = tokio::time::sleep(wf.settings.poll_interval) => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "claiming a workflow failed");
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(wf.settings.poll_interval) => {}
                }
            }
        }
    }
}

/// The span of one run of a workflow: a child of the request that
/// submitted it (its stored `traceparent`), so the session, the steps and
/// the teardown, in all three processes, join the submission's trace.
/// Ids only: never the plan's code, env or outputs.
fn run_span(row: &WorkflowRow) -> tracing::Span {
    let span = tracing::info_span!("workflow.run", tenant_id = %row.tenant,
        workflow_id = %row.workflow.workflow_id, attempt = row.workflow.attempts,
        session_id = tracing::field::Empty, otel.kind = "internal");
    if let Some(sid) = &row.workflow.session_id {
        span.record("session_id", sid.as_str());
    }
    shared::telemetry::accept_trace_context(
        &span,
        row.trace_parent.as_deref(),
        None,
        shared::telemetry::IncomingTrace::Parent,
    );
    span
}

/// The span of one step of a run (a child of [`run_span`]'s); the
/// sessions service records the step's `step_id` on it.
fn step_span(row: &WorkflowRow, sid: &SessionId, index: u32) -> tracing::Span {
    tracing::info_span!("workflow.step", tenant_id = %row.tenant,
        workflow_id = %row.workflow.workflow_id, session_id = %sid, step_index = index,
        step_id = tracing::field::Empty, otel.kind = "internal")
}

/// Takes the next runnable workflow; the claim and its `workflow.start`
/// event commit together.
async fn claim(wf: &WorkflowService, owner: &str) -> Result<Option<WorkflowRow>, StorageError> {
    let now = now_ms();
    let lease_until = now + wf.settings.lease.as_millis() as i64;
    let mut tx = wf.db.begin_write().await?;
    let Some(row) = storage::workflows::claim(
        &mut tx,
        owner,
        lease_until,
        now,
        wf.settings.tenant_max_running,
    )
    .await?
    else {
        tx.rollback().await?;
        return Ok(None);
    };
    let ev = worker_event(
        &row,
        "workflow.start",
        "succeeded",
        json!({"attempt": row.workflow.attempts, "worker": owner}),
    );
    audit::append(&mut tx, ev).await?;
    tx.commit().await?;
    Ok(Some(row))
}

fn worker_event(
    row: &WorkflowRow,
    action: &str,
    outcome: &str,
    details: serde_json::Value,
) -> AuditEvent {
    AuditEvent {
        tenant: row.tenant.clone(),
        actor: WORKER_ACTOR.into(),
        action: action.into(),
        resource: format!("workflow/{}", row.workflow.workflow_id),
        outcome: outcome.into(),
        bypass: false,
        details,
    }
}

/// Runs a claimed workflow while its lease holds. If the lease is lost
/// or the replica shuts down mid-step, the run is dropped where it is:
/// the next claimer finds the step `running` and fails it (never reruns).
async fn run(
    wf: &Arc<WorkflowService>,
    owner: &str,
    row: WorkflowRow,
    shutdown: &CancellationToken,
) {
    let id = row.workflow.workflow_id.clone();
    let in_step = AtomicBool::new(false);
    let work = execute(wf, owner, &row, shutdown, &in_step);
    let renew = renew_lease(wf, owner, &id);
    tokio::pin!(work);
    let stopped = tokio::select! {
        r = &mut work => {
            if let Err(e) = r {
                // The lease will expire and the workflow will be claimed again.
                tracing::warn!(workflow = %id, error = %e, "recording the workflow's progress failed");
            }
            false
        }
        _ = renew => {
            tracing::warn!(workflow = %id, "the workflow's lease was lost; another worker takes over");
            false
        }
        _ = shutdown.cancelled() => true,
    };
    // Shutting down with no step in flight: hand it back now rather than
    // after the lease (the flag is set before a step is recorded `running`,
    // so a step that may have been sent is left to the lease).
    if stopped
        && !in_step.load(Ordering::SeqCst)
        && let Err(e) = requeue(
            wf,
            owner,
            &row,
            "the control plane shut down",
            Duration::ZERO,
        )
        .await
    {
        tracing::warn!(workflow = %id, error = %e, "handing the workflow back failed; its lease will expire");
    }
}

/// Extends the lease every third of its length; returns only when it is
/// lost (the row changed hands, or the database is gone for longer).
async fn renew_lease(wf: &WorkflowService, owner: &str, id: &str) {
    let period = wf.settings.lease / 3;
    let mut failures = 0u32;
    loop {
        tokio::time::sleep(period).await;
        let now = now_ms();
        let until = now + wf.settings.lease.as_millis() as i64;
        match storage::workflows::renew_lease(&wf.db, id, owner, until, now).await {
            Ok(false) => return,
            Ok(true) => failures = 0,
            Err(e) => {
                failures += 1;
                tracing::warn!(workflow = %id, error = %e, "workflow lease renewal failed");
                if failures >= 2 {
                    return;
                }
            }
        }
    }
}

fn failure(code: &str, message: impl Into<String>) -> JobFailure {
    JobFailure {
        code: code.into(),
        message: message.into(),
    }
}

/// Codes after which the same call may well succeed later.
fn transient(code: ErrorCode) -> bool {
    matches!(
        code,
        ErrorCode::DataPlaneUnavailable
            | ErrorCode::SandboxUnavailable
            | ErrorCode::CapacityExhausted
            | ErrorCode::StorageUnavailable
            | ErrorCode::ShuttingDown
            | ErrorCode::RateLimiterUnavailable
    )
}

/// 1 s, 2 s, 4 s, ... up to 30 s.
fn backoff(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(5);
    (Duration::from_secs(1) * 2u32.pow(exp)).min(MAX_BACKOFF)
}

fn cut(s: &str) -> String {
    if s.len() <= OUTPUT_CAP {
        return s.to_owned();
    }
    let mut end = OUTPUT_CAP;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[cut]", &s[..end])
}

/// The end of a run, before teardown.
struct Verdict {
    status: JobStatus,
    error: Option<JobFailure>,
    artifacts: Vec<ArtifactInfo>,
}

impl Verdict {
    fn failed(error: JobFailure) -> Verdict {
        Verdict {
            status: JobStatus::Failed,
            error: Some(error),
            artifacts: Vec::new(),
        }
    }

    fn cancelled() -> Verdict {
        Verdict {
            status: JobStatus::Cancelled,
            error: Some(failure("cancelled", "cancelled by the client")),
            artifacts: Vec::new(),
        }
    }
}

/// What to do after trying to get the session.
enum Sandbox {
    Ready(SessionId),
    /// Give up: the workflow ends with this verdict (no session to tear down).
    Fail(Verdict),
    /// Try again later (a transient failure), or stop (lease lost).
    Requeue(String),
    Stop,
}

async fn execute(
    wf: &Arc<WorkflowService>,
    owner: &str,
    row: &WorkflowRow,
    shutdown: &CancellationToken,
    in_step: &AtomicBool,
) -> Result<(), StorageError> {
    let id = row.workflow.workflow_id.as_str();
    let Ok(tenant) = TenantId::parse(row.tenant.as_str()) else {
        let v = Verdict::failed(failure("internal", "the stored tenant does not parse"));
        return conclude(wf, owner, row, None, v).await;
    };
    let identity = Identity {
        tenant,
        subject: row.subject.clone(),
        app: row.app.clone(),
        agent: row.agent.clone(),
        roles: row.roles.clone(),
        bypass: false,
    };
    let session = row
        .workflow
        .session_id
        .as_deref()
        .and_then(|s| SessionId::parse(s).ok());
    if row.cancel_requested {
        return conclude(wf, owner, row, session.as_ref(), Verdict::cancelled()).await;
    }
    // A step whose worker was lost mid-run: its outcome is unknown.
    if let Some(step) = row
        .workflow
        .steps
        .iter()
        .find(|s| s.status == WorkflowStepStatus::Running)
    {
        let i = step.index;
        let reason = failure(
            "workflow_interrupted",
            format!(
                "steps[{i}] was running when its worker was lost; its outcome is unknown, so it is not run again"
            ),
        );
        let mut tx = wf.db.begin_write().await?;
        let end = StepEnd {
            idx: i,
            status: WorkflowStepStatus::Failed,
            output: None,
            error: Some(&reason),
            now: now_ms(),
        };
        if !storage::workflows::finish_step(&mut tx, id, owner, &end).await? {
            return tx.rollback().await;
        }
        tx.commit().await?;
        return conclude(wf, owner, row, session.as_ref(), Verdict::failed(reason)).await;
    }
    if row.workflow.attempts > row.max_attempts {
        let v = Verdict::failed(failure(
            "lease_expired",
            format!(
                "its worker was lost {} times; not tried again",
                row.workflow.attempts - 1
            ),
        ));
        return conclude(wf, owner, row, session.as_ref(), v).await;
    }
    let fresh = row
        .workflow
        .steps
        .iter()
        .all(|s| s.status == WorkflowStepStatus::Pending);
    let sid = match sandbox(wf, owner, row, &identity, session, fresh).await? {
        Sandbox::Ready(sid) => {
            tracing::Span::current().record("session_id", sid.as_str());
            sid
        }
        Sandbox::Fail(v) => return conclude(wf, owner, row, None, v).await,
        Sandbox::Stop => return Ok(()),
        Sandbox::Requeue(reason) => {
            if storage::workflows::cancel_requested(&wf.db, id).await? {
                return conclude(wf, owner, row, None, Verdict::cancelled()).await;
            }
            if row.workflow.attempts >= row.max_attempts {
                let v = Verdict::failed(failure(
                    ErrorCode::DataPlaneUnavailable.as_str(),
                    format!(
                        "gave up after {} attempts; last failure: {reason}",
                        row.workflow.attempts
                    ),
                ));
                return conclude(wf, owner, row, None, v).await;
            }
            return requeue(wf, owner, row, &reason, backoff(row.workflow.attempts)).await;
        }
    };
    // Inputs, before the first step only (a step may have changed them).
    if fresh {
        for (i, f) in row.spec.files.iter().flatten().enumerate() {
            let written = match file_bytes(i, f) {
                Ok(bytes) => {
                    wf.sessions
                        .write_file(&identity, &sid, &f.path, bytes.into())
                        .await
                }
                Err(e) => Err(e),
            };
            if let Err(e) = written {
                let v = Verdict::failed(failure(
                    e.code.as_str(),
                    format!("files[{i}] ({}): {}", f.path, e.message),
                ));
                return conclude(wf, owner, row, Some(&sid), v).await;
            }
        }
    }
    // The steps, in order; finished ones are not run again.
    let mut stopped: Option<JobFailure> = None;
    for step in &row.workflow.steps {
        if step.status != WorkflowStepStatus::Pending {
            continue;
        }
        let i = step.index;
        let Some(spec) = row.spec.steps.get(i as usize) else {
            continue;
        };
        if storage::workflows::cancel_requested(&wf.db, id).await? {
            return conclude(wf, owner, row, Some(&sid), Verdict::cancelled()).await;
        }
        if shutdown.is_cancelled() {
            // Between steps: hand it back, nothing is in flight.
            return requeue(
                wf,
                owner,
                row,
                "the control plane shut down",
                Duration::ZERO,
            )
            .await;
        }
        in_step.store(true, Ordering::SeqCst);
        {
            let mut tx = wf.db.begin_write().await?;
            if !storage::workflows::start_step(&mut tx, id, owner, i, now_ms()).await? {
                return tx.rollback().await;
            }
            tx.commit().await?;
        }
        let outcome = tracing::Instrument::instrument(
            wf.sessions.step(
                &identity,
                &sid,
                SessionStepRequest {
                    code: spec.code.clone(),
                    timeout_ms: spec.timeout_ms,
                    mode: None,
                    event: None,
                },
            ),
            step_span(row, &sid, i),
        )
        .await;
        let cancelled = storage::workflows::cancel_requested(&wf.db, id).await?;
        let (error, output) = match outcome {
            Ok(r) => {
                let error = match r.status {
                    StepStatus::Ok => None,
                    StepStatus::Error => Some(failure(
                        "execution_error",
                        r.error
                            .as_ref()
                            .map(|e| format!("{}: {}", e.kind, e.message))
                            .unwrap_or_default(),
                    )),
                    StepStatus::Timeout => {
                        Some(failure("timeout", "the step ran past its timeout"))
                    }
                    StepStatus::Killed => {
                        Some(failure("killed", "the sandbox was killed during the step"))
                    }
                };
                let output = WorkflowStepOutput {
                    status: r.status,
                    stdout: cut(&r.stdout),
                    stderr: cut(&r.stderr),
                    result: r.result,
                    error: r.error,
                    duration_ms: r.duration_ms,
                    truncated: r.truncated,
                };
                (error, Some(output))
            }
            Err(e) => (Some(failure(e.code.as_str(), e.message)), None),
        };
        // A step that failed because its session was deleted by a cancel
        // says so.
        let error = match error {
            Some(_) if cancelled => Some(failure(
                "cancelled",
                "the workflow was cancelled during this step",
            )),
            other => other,
        };
        let status = if error.is_some() {
            WorkflowStepStatus::Failed
        } else {
            WorkflowStepStatus::Succeeded
        };
        {
            let mut tx = wf.db.begin_write().await?;
            let end = StepEnd {
                idx: i,
                status,
                output: output.as_ref(),
                error: error.as_ref(),
                now: now_ms(),
            };
            if !storage::workflows::finish_step(&mut tx, id, owner, &end).await? {
                return tx.rollback().await;
            }
            tx.commit().await?;
        }
        in_step.store(false, Ordering::SeqCst);
        if cancelled {
            return conclude(wf, owner, row, Some(&sid), Verdict::cancelled()).await;
        }
        if let Some(e) = error
            && !spec.continue_on_error
        {
            stopped = Some(failure(
                "step_failed",
                format!("steps[{i}] failed ({}): {}", e.code, e.message),
            ));
            break;
        }
    }
    if let Some(reason) = stopped {
        return conclude(wf, owner, row, Some(&sid), Verdict::failed(reason)).await;
    }
    if storage::workflows::cancel_requested(&wf.db, id).await? {
        return conclude(wf, owner, row, Some(&sid), Verdict::cancelled()).await;
    }
    let collected = collect_outputs(wf, row, &identity, &sid).await;
    // A cancel that arrived while the outputs were read (it deletes the
    // session under them) is a cancel, not an output failure.
    if storage::workflows::cancel_requested(&wf.db, id).await? {
        let mut v = Verdict::cancelled();
        v.artifacts = match collected {
            Ok(a) | Err((a, _)) => a,
        };
        return conclude(wf, owner, row, Some(&sid), v).await;
    }
    let verdict = match collected {
        Ok(artifacts) => Verdict {
            status: JobStatus::Succeeded,
            error: None,
            artifacts,
        },
        Err((artifacts, reason)) => Verdict {
            status: JobStatus::Failed,
            error: Some(reason),
            artifacts,
        },
    };
    conclude(wf, owner, row, Some(&sid), verdict).await
}

/// The workflow's session: the one recorded if it is still there (a
/// resume), else a new one through the sessions service, recorded before
/// anything runs in it.
async fn sandbox(
    wf: &WorkflowService,
    owner: &str,
    row: &WorkflowRow,
    identity: &Identity,
    recorded: Option<SessionId>,
    fresh: bool,
) -> Result<Sandbox, StorageError> {
    let id = row.workflow.workflow_id.as_str();
    if let Some(sid) = recorded {
        match wf.dp.get_session(&identity.tenant, &sid).await {
            Ok(_) => return Ok(Sandbox::Ready(sid)),
            Err(e) if transient(e.code) => return Ok(Sandbox::Requeue(e.message)),
            Err(e) if !fresh => {
                // Its variables were the workflow's state: gone with it.
                return Ok(Sandbox::Fail(Verdict::failed(failure(
                    "session_lost",
                    format!(
                        "the workflow's session {sid} is gone ({}); finished steps are not run again",
                        e.code.as_str()
                    ),
                ))));
            }
            // Nothing ran in it yet: a new session will do.
            Err(_) => {}
        }
    }
    let spec = &row.spec;
    let req = SessionRequest {
        runtime: Some(row.workflow.runtime.clone()),
        ttl_seconds: None,
        limits: spec.limits.clone(),
        packages: spec.packages.clone(),
        env: spec.env.clone(),
        egress: spec.egress.clone(),
        secrets: spec.secrets.clone(),
    };
    let view = match wf.sessions.create_with(identity, req, false).await {
        Ok(v) => v,
        Err(e) if transient(e.code) => return Ok(Sandbox::Requeue(e.message)),
        Err(e) => {
            return Ok(Sandbox::Fail(Verdict::failed(failure(
                e.code.as_str(),
                format!("the session could not be created: {}", e.message),
            ))));
        }
    };
    let Ok(sid) = SessionId::parse(view.session_id.as_str()) else {
        return Ok(Sandbox::Fail(Verdict::failed(failure(
            "internal",
            "the data plane returned a session id that does not parse",
        ))));
    };
    let mut tx = wf.db.begin_write().await?;
    if !storage::workflows::set_session(&mut tx, id, owner, sid.as_str(), now_ms()).await? {
        tx.rollback().await?;
        // Not ours any more: the session must not outlive this.
        let _ = teardown(wf, row, &sid).await;
        return Ok(Sandbox::Stop);
    }
    tx.commit().await?;
    Ok(Sandbox::Ready(sid))
}

/// Stores each output as an artifact filed under the workflow. One that
/// is already filed (stored before a lost worker could record it) is not
/// stored twice. The first that cannot be stored fails the workflow.
async fn collect_outputs(
    wf: &WorkflowService,
    row: &WorkflowRow,
    identity: &Identity,
    sid: &SessionId,
) -> Result<Vec<ArtifactInfo>, (Vec<ArtifactInfo>, JobFailure)> {
    let id = row.workflow.workflow_id.as_str();
    let outputs = row.spec.outputs.as_deref().unwrap_or_default();
    let mut stored = Vec::new();
    if outputs.is_empty() {
        return Ok(stored);
    }
    let filter = ArtifactFilter {
        workflow_id: Some(id.to_owned()),
        limit: Some(100),
        ..ArtifactFilter::default()
    };
    let existing = match wf.dp.artifact_list(&identity.tenant, &filter).await {
        Ok(list) => list.artifacts,
        Err(e) => {
            return Err((
                stored,
                failure(
                    e.code.as_str(),
                    format!("listing the workflow's artifacts: {}", e.message),
                ),
            ));
        }
    };
    for (i, path) in outputs.iter().enumerate() {
        let name = output_name(path);
        if let Some(info) = existing.iter().find(|a| a.name == name) {
            stored.push(info.clone());
            continue;
        }
        let fail = |code: &str, msg: String| failure(code, format!("outputs[{i}] ({path}): {msg}"));
        let file = match wf.sessions.read_path(identity, sid, path).await {
            Ok(PathStream::File(f)) => f,
            Ok(PathStream::Dir(_)) => {
                return Err((
                    stored,
                    fail("output_missing", "is a directory, not a file".into()),
                ));
            }
            Err(e) if e.code == ErrorCode::FileNotFound => {
                return Err((
                    stored,
                    fail("output_missing", "no such file in the workspace".into()),
                ));
            }
            Err(e) => return Err((stored, fail(e.code.as_str(), e.message))),
        };
        let meta = ArtifactMeta {
            workflow_id: Some(id.to_owned()),
            ..ArtifactMeta::default()
        };
        let size = file.size;
        match wf
            .sessions
            .artifact_upload_with(identity, name, &meta, size, file.into_stream())
            .await
        {
            Ok(info) => stored.push(info),
            Err(e) => return Err((stored, fail(e.code.as_str(), e.message))),
        }
    }
    Ok(stored)
}

/// Destroys the workflow's session (audited first; done even if the event
/// cannot be written: a sandbox must not outlive its workflow). A session
/// the data plane no longer has is `gone`.
async fn teardown(wf: &WorkflowService, row: &WorkflowRow, sid: &SessionId) -> Teardown {
    let mut ev = worker_event(
        row,
        "session.delete",
        "succeeded",
        json!({"workflow": row.workflow.workflow_id}),
    );
    ev.resource = format!("session/{sid}");
    let unrecorded = wf.audit.record(ev).await.err();
    let Ok(tenant) = TenantId::parse(row.tenant.as_str()) else {
        return Teardown {
            outcome: "failed".into(),
            message: Some("the stored tenant does not parse".into()),
        };
    };
    let mut t = match wf.dp.delete_session(&tenant, sid).await {
        Ok(()) => Teardown {
            outcome: "deleted".into(),
            message: None,
        },
        Err(e) if matches!(e.code, ErrorCode::SessionNotFound | ErrorCode::SessionLost) => {
            Teardown {
                outcome: "gone".into(),
                message: None,
            }
        }
        Err(e) => {
            tracing::warn!(session = %sid, error = %e, "a workflow's session could not be deleted; its TTL will reap it");
            Teardown {
                outcome: "failed".into(),
                message: Some(format!("{}: {}", e.code.as_str(), e.message)),
            }
        }
    };
    if t.outcome != "failed"
        && let Err(e) =
            storage::sessions::mark_deleted(&wf.db, &row.tenant, sid.as_str(), now_ms()).await
    {
        tracing::warn!(session = %sid, error = %e, "could not mark the session deleted");
    }
    if let Some(e) = unrecorded {
        let note = format!("the session.delete event was not written: {}", e.message);
        t.message = Some(match t.message.take() {
            Some(m) => format!("{m}; {note}"),
            None => note,
        });
    }
    t
}

/// Tears the session down (if any), then records the final status with
/// its `workflow.finish` event, if `owner` still holds the workflow.
async fn conclude(
    wf: &WorkflowService,
    owner: &str,
    row: &WorkflowRow,
    sid: Option<&SessionId>,
    v: Verdict,
) -> Result<(), StorageError> {
    let torn = match sid {
        Some(sid) => Some(teardown(wf, row, sid).await),
        None => None,
    };
    let id = row.workflow.workflow_id.as_str();
    let now = now_ms();
    let ev = worker_event(
        row,
        "workflow.finish",
        v.status.as_str(),
        json!({
            "attempts": row.workflow.attempts,
            "error": v.error.as_ref().map(|e| &e.code),
            "artifacts": v.artifacts.len(),
            "teardown": torn.as_ref().map(|t| &t.outcome),
        }),
    );
    let mut tx = wf.db.begin_write().await?;
    let done = storage::workflows::finish(
        &mut tx,
        &Finish {
            id,
            owner,
            status: v.status,
            artifacts: &v.artifacts,
            teardown: torn.as_ref(),
            error: v.error.as_ref(),
            now,
        },
    )
    .await?;
    if !done {
        return tx.rollback().await;
    }
    audit::append(&mut tx, ev).await?;
    tx.commit().await?;
    let _ = wf.finished.send(id.to_owned());
    Ok(())
}

/// Hands a workflow back to the queue (a transient failure before any
/// step ran, or a shutdown between steps), due after `delay`.
async fn requeue(
    wf: &WorkflowService,
    owner: &str,
    row: &WorkflowRow,
    reason: &str,
    delay: Duration,
) -> Result<(), StorageError> {
    let id = row.workflow.workflow_id.as_str();
    let now = now_ms();
    let ev = worker_event(
        row,
        "workflow.retry",
        "queued",
        json!({"attempts": row.workflow.attempts, "reason": reason, "delayMs": delay.as_millis() as u64}),
    );
    let mut tx = wf.db.begin_write().await?;
    if !storage::workflows::requeue(&mut tx, id, owner, now + delay.as_millis() as i64, now).await?
    {
        return tx.rollback().await;
    }
    audit::append(&mut tx, ev).await?;
    tx.commit().await?;
    wf.wake.notify_one();
    Ok(())
}
