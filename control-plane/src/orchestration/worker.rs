//! The worker pool: `JOB_WORKERS` loops per replica claim queued jobs from
//! the database (`FOR UPDATE SKIP LOCKED` on Postgres, the single writer on
//! SQLite), hold a lease they renew while the data plane runs the job, and
//! record the outcome only while they still own it.
//!
//! A replica that dies leaves its leases to expire; another worker (or the
//! same replica restarted) claims the job again with the same id, and the
//! data plane returns the first run's saved result instead of running it
//! twice. After `JOB_MAX_ATTEMPTS` dispatches a job fails with a reason.

use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use shared::CodedError;
use shared::ErrorCode;
use shared::agent::StepStatus;
use shared::client::ClientError;
use shared::controlplane::{JobFailure, JobOutput, JobStatus};
use shared::dataplane::{JobResult, RunJob};
use shared::ids::{JobId, TenantId};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::jobs::{JobRow, JobService};
use crate::audit::{self, AuditEvent};
use crate::metrics::StatusLabel;
use crate::storage::jobs::Finish;
use crate::storage::{self, StorageError, new_id, now_ms};

/// Actor of the events the workers record.
const WORKER_ACTOR: &str = "control-plane/worker";

/// Longest pause between retries after a transient failure.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Runs the worker loops of this replica.
pub struct Dispatcher;

/// How one dispatch ended.
enum Dispatch {
    /// The data plane answered with the job's result.
    Done(JobResult),
    /// A failure that will not change on retry (bad runtime, policy of the
    /// data plane, allowlist): the job fails with this code.
    Refused(CodedError),
    /// The data plane was unreachable or failed on its side: retry later.
    Transient(String),
    /// This replica is shutting down: hand the job back.
    Interrupted,
}

impl Dispatcher {
    /// Starts `settings.workers` loops and the sweeper on `tracker`; they
    /// stop when `shutdown` is cancelled.
    pub fn start(jobs: Arc<JobService>, tracker: &TaskTracker, shutdown: CancellationToken) {
        let owner = new_id("worker");
        tracing::info!(owner = %owner, workers = jobs.settings.workers, "job workers started");
        for n in 0..jobs.settings.workers {
            let jobs = jobs.clone();
            let owner = format!("{owner}/{n}");
            let shutdown = shutdown.clone();
            tracker.spawn(async move { worker_loop(jobs, owner, shutdown).await });
        }
        tracker.spawn(sweeper_loop(jobs, shutdown));
    }
}

async fn worker_loop(jobs: Arc<JobService>, owner: String, shutdown: CancellationToken) {
    while !shutdown.is_cancelled() {
        match claim(&jobs, &owner).await {
            Ok(Some(row)) => {
                jobs.metrics.jobs_running.inc();
                let span = dispatch_span(&row);
                tracing::Instrument::instrument(run(&jobs, &owner, row, &shutdown), span).await;
                jobs.metrics.jobs_running.dec();
            }
            Ok(None) => {
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = jobs.wake.notified() => {}
                    _ = tokio::time::sleep(jobs.settings.poll_interval) => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "claiming a job failed");
                tokio::select! {
                    _ = shutdown.cancelled() => {}
                    _ = tokio::time::sleep(jobs.settings.poll_interval) => {}
                }
            }
        }
    }
}

/// The span of one dispatch: a child of the request that submitted the job
/// (its stored `traceparent`), so the data plane's run and the agent's step
/// join the submission's trace.
fn dispatch_span(row: &JobRow) -> tracing::Span {
    let span = tracing::info_span!("job.dispatch", tenant_id = %row.tenant, job_id = %row.job.job_id,
        attempt = row.job.attempts, otel.kind = "internal");
    shared::telemetry::accept_trace_context(
        &span,
        row.trace_parent.as_deref(),
        None,
        shared::telemetry::IncomingTrace::Parent,
    );
    span
}

/// Takes the next runnable job (see [`storage::jobs::claim`]: due or
/// abandoned, fair across tenants). The claim and its audit event commit
/// together.
async fn claim(jobs: &JobService, owner: &str) -> Result<Option<JobRow>, StorageError> {
    let now = now_ms();
    let lease_until = now + jobs.settings.lease.as_millis() as i64;
    let mut tx = jobs.db.begin_write().await?;
    let claimed = storage::jobs::claim(
        &mut tx,
        owner,
        lease_until,
        now,
        jobs.settings.tenant_max_running,
    )
    .await?;
    let Some(row) = claimed else {
        tx.rollback().await?;
        return Ok(None);
    };
    let ev = AuditEvent {
        tenant: row.tenant.clone(),
        actor: WORKER_ACTOR.into(),
        action: "job.start".into(),
        resource: format!("job/{}", row.job.job_id),
        outcome: "succeeded".into(),
        bypass: false,
        details: json!({"attempt": row.job.attempts, "worker": owner}),
    };
    audit::append(&mut tx, ev).await?;
    tx.commit().await?;
    jobs.metrics
        .job_queue_depth
        .set(storage::jobs::queue_depth(&jobs.db).await.unwrap_or(0));
    Ok(Some(row))
}

async fn run(jobs: &Arc<JobService>, owner: &str, row: JobRow, shutdown: &CancellationToken) {
    let id = row.job.job_id.clone();
    let tenant = row.tenant.clone();
    let spec = row.spec.clone();
    let request = RunJob {
        job_id: id.clone(),
        runtime: Some(row.job.runtime.clone()),
        code: spec.code.clone(),
        mode: spec.mode,
        event: spec.event.clone(),
        timeout_ms: spec.timeout_ms,
        limits: spec.limits.clone(),
        env: spec.env.clone(),
        packages: spec.packages.clone(),
        artifact_quota_bytes: match TenantId::parse(tenant.as_str()) {
            Ok(t) => jobs.limits.artifact_quota(&t).await,
            Err(_) => None,
        },
        secrets: spec.secrets.clone(),
    };
    // The call may take as long as the step, plus sandbox start and packages.
    let budget =
        Duration::from_millis(spec.timeout_ms.unwrap_or(30_000)) + jobs.dp.call_timeout() * 2;
    let dispatch = {
        // Stored ids are parsed again before they reach the data plane.
        let call = async {
            match TenantId::parse(tenant.as_str()) {
                Ok(t) => jobs.dp.run_job(&t, request, budget).await,
                Err(e) => Err(ClientError::Protocol {
                    status: 400,
                    detail: e.to_string(),
                }),
            }
        };
        let renew = renew_lease(jobs, owner, &tenant, &id);
        tokio::pin!(call);
        tokio::select! {
            r = &mut call => classify(r),
            _ = renew => Dispatch::Transient("the lease could not be kept".into()),
            _ = shutdown.cancelled() => Dispatch::Interrupted,
        }
    };
    let outcome = match dispatch {
        Dispatch::Done(result) => {
            let cancelled = is_cancel_requested(jobs, &id).await;
            let (status, error) = if cancelled {
                (
                    JobStatus::Cancelled,
                    Some(JobFailure {
                        code: "cancelled".into(),
                        message: "cancelled by the client".into(),
                    }),
                )
            } else {
                verdict(&result)
            };
            finalize(jobs, &row, Some(owner), status, Some(output(result)), error).await
        }
        Dispatch::Refused(e) => {
            let status = if is_cancel_requested(jobs, &id).await {
                JobStatus::Cancelled
            } else {
                JobStatus::Failed
            };
            let failure = JobFailure {
                code: e.code.as_str().into(),
                message: e.message,
            };
            finalize(jobs, &row, Some(owner), status, None, Some(failure)).await
        }
        Dispatch::Transient(reason) => {
            if row.job.attempts >= row.max_attempts {
                let failure = JobFailure {
                    code: ErrorCode::DataPlaneUnavailable.as_str().into(),
                    message: format!(
                        "gave up after {} attempts; last failure: {reason}",
                        row.job.attempts
                    ),
                };
                finalize(
                    jobs,
                    &row,
                    Some(owner),
                    JobStatus::Failed,
                    None,
                    Some(failure),
                )
                .await
            } else {
                requeue(jobs, &row, owner, &reason, backoff(row.job.attempts)).await
            }
        }
        Dispatch::Interrupted => {
            requeue(
                jobs,
                &row,
                owner,
                "the control plane shut down",
                Duration::ZERO,
            )
            .await
        }
    };
    if let Err(e) = outcome {
        // The lease will expire and the job will be claimed again.
        tracing::warn!(job = %id, error = %e, "recording the job's outcome failed");
    }
}

fn classify(r: Result<JobResult, ClientError>) -> Dispatch {
    match r {
        Ok(result) => Dispatch::Done(result),
        Err(ClientError::Api { status, body }) if status < 500 && status != 429 => {
            Dispatch::Refused(CodedError::new(body.code, body.message))
        }
        Err(e) => Dispatch::Transient(e.to_string()),
    }
}

/// 1 s, 2 s, 4 s, ... up to 30 s.
fn backoff(attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(5);
    (Duration::from_secs(1) * 2u32.pow(exp)).min(MAX_BACKOFF)
}

fn verdict(r: &JobResult) -> (JobStatus, Option<JobFailure>) {
    let message = || {
        r.error
            .as_ref()
            .map(|e| format!("{}: {}", e.kind, e.message))
            .unwrap_or_default()
    };
    match r.status {
        StepStatus::Ok => (JobStatus::Succeeded, None),
        StepStatus::Error => (
            JobStatus::Failed,
            Some(JobFailure {
                code: "execution_error".into(),
                message: message(),
            }),
        ),
        StepStatus::Timeout => (
            JobStatus::Failed,
            Some(JobFailure {
                code: "timeout".into(),
                message: "the code ran past its timeout".into(),
            }),
        ),
        StepStatus::Killed => (
            JobStatus::Failed,
            Some(JobFailure {
                code: "killed".into(),
                message: format!("the sandbox was killed: {}", message()),
            }),
        ),
    }
}

fn output(r: JobResult) -> JobOutput {
    JobOutput {
        status: r.status,
        stdout: r.stdout,
        stderr: r.stderr,
        result: r.result,
        error: r.error,
        duration_ms: r.duration_ms,
        truncated: r.truncated,
        artifacts: r.artifacts,
    }
}

/// Extends the lease every third of its length while the job runs; returns
/// only when the lease is lost (the row changed hands or the database is
/// gone for longer than the lease). Pushes a pending cancellation to the
/// data plane again, in case the first push did not arrive.
async fn renew_lease(jobs: &JobService, owner: &str, tenant: &str, id: &str) {
    let period = jobs.settings.lease / 3;
    let mut failures = 0u32;
    loop {
        tokio::time::sleep(period).await;
        let now = now_ms();
        let until = now + jobs.settings.lease.as_millis() as i64;
        match storage::jobs::renew_lease(&jobs.db, id, owner, until, now).await {
            Ok(false) => return,
            Ok(true) => failures = 0,
            Err(e) => {
                failures += 1;
                tracing::warn!(job = %id, error = %e, "lease renewal failed");
                if failures >= 2 {
                    return;
                }
            }
        }
        if is_cancel_requested(jobs, id).await
            && let (Ok(t), Ok(j)) = (TenantId::parse(tenant), JobId::parse(id))
            && let Err(e) = jobs.dp.cancel_job(&t, &j).await
        {
            tracing::debug!(job = %id, error = %e, "cancel push failed; will retry");
        }
    }
}

async fn is_cancel_requested(jobs: &JobService, id: &str) -> bool {
    matches!(
        storage::jobs::cancel_requested(&jobs.db, id).await,
        Ok(true)
    )
}

/// Records a final status, if `owner` still holds the job (or, for the
/// sweeper, if its lease has expired). Audit event in the same transaction.
async fn finalize(
    jobs: &JobService,
    row: &JobRow,
    owner: Option<&str>,
    status: JobStatus,
    output: Option<JobOutput>,
    error: Option<JobFailure>,
) -> Result<(), StorageError> {
    let id = &row.job.job_id;
    let now = now_ms();
    let ev = AuditEvent {
        tenant: row.tenant.clone(),
        actor: WORKER_ACTOR.into(),
        action: "job.finish".into(),
        resource: format!("job/{id}"),
        outcome: status.as_str().into(),
        bypass: false,
        details: json!({
            "runtime": row.job.runtime,
            "attempts": row.job.attempts,
            "stepStatus": output.as_ref().map(|o| o.status),
            "durationMs": output.as_ref().map(|o| o.duration_ms),
            "error": error.as_ref().map(|e| &e.code),
        }),
    };
    let finish = Finish {
        id,
        owner,
        status,
        output: output.as_ref(),
        error: error.as_ref(),
        now,
    };
    let mut tx = jobs.db.begin_write().await?;
    if !storage::jobs::finish(&mut tx, &finish).await? {
        return tx.rollback().await;
    }
    audit::append(&mut tx, ev).await?;
    tx.commit().await?;
    jobs.metrics
        .jobs_finished
        .get_or_create(&StatusLabel {
            status: status.as_str().into(),
        })
        .inc();
    jobs.metrics
        .job_duration
        .get_or_create(&StatusLabel {
            status: status.as_str().into(),
        })
        .observe((now - row.job.created_at_ms).max(0) as f64 / 1000.0);
    let _ = jobs.finished.send(id.clone());
    Ok(())
}

/// Hands a job back to the queue after a transient failure (or a shutdown),
/// to be retried with the same id after `delay`.
async fn requeue(
    jobs: &JobService,
    row: &JobRow,
    owner: &str,
    reason: &str,
    delay: Duration,
) -> Result<(), StorageError> {
    let id = &row.job.job_id;
    let now = now_ms();
    let ev = AuditEvent {
        tenant: row.tenant.clone(),
        actor: WORKER_ACTOR.into(),
        action: "job.retry".into(),
        resource: format!("job/{id}"),
        outcome: "queued".into(),
        bypass: false,
        details: json!({"attempts": row.job.attempts, "reason": reason, "delayMs": delay.as_millis() as u64}),
    };
    let mut tx = jobs.db.begin_write().await?;
    let next_run_ms = now + delay.as_millis() as i64;
    if !storage::jobs::requeue(&mut tx, id, owner, next_run_ms, now).await? {
        tx.rollback().await?;
        return Ok(());
    }
    audit::append(&mut tx, ev).await?;
    tx.commit().await?;
    tracing::info!(job = %id, reason, delay_ms = delay.as_millis() as u64, "job requeued");
    jobs.metrics.job_queue_depth.inc();
    jobs.wake.notify_one();
    Ok(())
}

/// Every few seconds: jobs whose worker vanished and that may not be tried
/// again (attempts used up, or cancelled) get their final status.
async fn sweeper_loop(jobs: Arc<JobService>, shutdown: CancellationToken) {
    let period = (jobs.settings.lease / 2).max(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        if let Err(e) = sweep(&jobs).await {
            tracing::warn!(error = %e, "sweeping abandoned jobs failed");
        }
        if let Ok(depth) = storage::jobs::queue_depth(&jobs.db).await {
            jobs.metrics.job_queue_depth.set(depth);
        }
        // Keys past IDEMPOTENCY_TTL are forgotten (their jobs stay).
        let now = now_ms();
        if let Err(e) = storage::jobs::expire_keys(&jobs.db, now).await {
            tracing::warn!(error = %e, "expiring idempotency keys failed");
        }
    }
}

/// One pass of the sweeper; returns how many jobs it closed.
pub(crate) async fn sweep(jobs: &JobService) -> Result<usize, StorageError> {
    let rows = storage::jobs::abandoned(&jobs.db, now_ms(), 100).await?;
    let mut closed = 0;
    for row in rows {
        let (status, failure) = if row.cancel_requested {
            (
                JobStatus::Cancelled,
                JobFailure {
                    code: "cancelled".into(),
                    message: "cancelled by the client".into(),
                },
            )
        } else {
            (
                JobStatus::Failed,
                JobFailure {
                    code: "lease_expired".into(),
                    message: format!(
                        "the worker running this job was lost {} times (crash or restart); giving up",
                        row.job.attempts
                    ),
                },
            )
        };
        finalize(jobs, &row, None, status, None, Some(failure)).await?;
        closed += 1;
    }
    Ok(closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        assert_eq!(backoff(1), Duration::from_secs(1));
        assert_eq!(backoff(2), Duration::from_secs(2));
        assert_eq!(backoff(4), Duration::from_secs(8));
        assert_eq!(backoff(50), MAX_BACKOFF);
    }
}
