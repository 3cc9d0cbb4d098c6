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

use super::jobs::{JobRow, JobService, row_to_job};
use crate::audit::{AuditEvent, append_tx, begin_write};
use crate::metrics::StatusLabel;
use crate::on_db;
use crate::storage::{Dialect, db_error, new_id, now_ms};

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
                run(&jobs, &owner, row, &shutdown).await;
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

/// Takes the oldest runnable job: queued and due, or running with an
/// expired lease (its worker died). The claim and its audit event commit
/// together.
async fn claim(jobs: &JobService, owner: &str) -> Result<Option<JobRow>, CodedError> {
    let now = now_ms();
    let lease_until = now + jobs.settings.lease.as_millis() as i64;
    let dialect = jobs.db.dialect();
    // One statement; Postgres also skips rows other replicas have locked.
    // Fair across tenants (issue 15, section 5): a tenant already running
    // `tenant_max_running` jobs is skipped, and the tenant with the fewest
    // running jobs goes first; within a tenant, oldest first.
    macro_rules! running_of_tenant {
        () => {
            "(SELECT COUNT(*) FROM jobs r WHERE r.tenant = j.tenant AND r.status = 'running' AND r.lease_expires_ms >= $3)"
        };
    }
    macro_rules! claim_sql {
        ($lock:literal) => {
            concat!(
                "UPDATE jobs SET status = 'running', lease_owner = $1, lease_expires_ms = $2, ",
                "attempts = attempts + 1, started_ms = COALESCE(started_ms, $3), updated_ms = $3 ",
                "WHERE id = (SELECT j.id FROM jobs j WHERE ((j.status = 'queued' AND j.next_run_ms <= $3) ",
                "OR (j.status = 'running' AND j.lease_expires_ms < $3)) ",
                "AND j.attempts < j.max_attempts AND j.cancel_requested = 0 ",
                "AND ",
                running_of_tenant!(),
                " < $4 ORDER BY ",
                running_of_tenant!(),
                ", j.next_run_ms, j.created_ms LIMIT 1",
                $lock,
                ") RETURNING *"
            )
        };
    }
    let sql = match dialect {
        Dialect::Postgres => claim_sql!(" FOR UPDATE SKIP LOCKED"),
        Dialect::Sqlite => claim_sql!(""),
    };
    let claimed = on_db!(&jobs.db, p => async {
        let mut tx = begin_write!(p, dialect)?;
        let Some(row) = sqlx::query(sql)
            .bind(owner).bind(lease_until).bind(now).bind(jobs.settings.tenant_max_running)
            .fetch_optional(&mut *tx).await.map_err(db_error)? else {
            tx.rollback().await.map_err(db_error)?;
            return Ok::<_, CodedError>(None);
        };
        let row = row_to_job(&row)?;
        let ev = AuditEvent {
            tenant: row.tenant.clone(),
            actor: WORKER_ACTOR.into(),
            action: "job.start".into(),
            resource: format!("job/{}", row.job.job_id),
            outcome: "succeeded".into(),
            bypass: false,
            details: json!({"attempt": row.job.attempts, "worker": owner}),
        };
        append_tx!(&mut tx, dialect, ev)?;
        tx.commit().await.map_err(db_error)?;
        Ok(Some(row))
    }.await)?;
    if claimed.is_some() {
        jobs.metrics
            .job_queue_depth
            .set(queue_depth(jobs).await.unwrap_or(0));
    }
    Ok(claimed)
}

async fn queue_depth(jobs: &JobService) -> Result<i64, CodedError> {
    on_db!(&jobs.db, p => sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM jobs WHERE status = 'queued'")
        .fetch_one(p).await.map_err(db_error))
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
        let r = on_db!(&jobs.db, p => sqlx::query(
            "UPDATE jobs SET lease_expires_ms = $1, updated_ms = $2 WHERE id = $3 AND lease_owner = $4 AND status = 'running'")
            .bind(until).bind(now).bind(id).bind(owner)
            .execute(p).await.map(|r| r.rows_affected()));
        match r {
            Ok(0) => return,
            Ok(_) => failures = 0,
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
    let r = on_db!(&jobs.db, p => sqlx::query_scalar::<_, i64>("SELECT cancel_requested FROM jobs WHERE id = $1")
        .bind(id).fetch_optional(p).await);
    matches!(r, Ok(Some(1)))
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
) -> Result<(), CodedError> {
    let id = &row.job.job_id;
    let now = now_ms();
    let result = output
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| CodedError::new(ErrorCode::Internal, e.to_string()))?;
    let dialect = jobs.db.dialect();
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
    let guard_owner = owner.map(str::to_owned);
    let changed = on_db!(&jobs.db, p => async {
        let mut tx = begin_write!(p, dialect)?;
        let n = sqlx::query(
            "UPDATE jobs SET status = $1, result = $2, error_code = $3, error_message = $4, \
             finished_ms = $5, updated_ms = $5, lease_owner = NULL, lease_expires_ms = NULL \
             WHERE id = $6 AND status = 'running' \
             AND (($7 IS NOT NULL AND lease_owner = $7) OR ($7 IS NULL AND lease_expires_ms < $5))")
            .bind(status.as_str())
            .bind(&result)
            .bind(error.as_ref().map(|e| e.code.clone()))
            .bind(error.as_ref().map(|e| e.message.clone()))
            .bind(now)
            .bind(id)
            .bind(&guard_owner)
            .execute(&mut *tx).await.map_err(db_error)?.rows_affected();
        if n == 0 {
            tx.rollback().await.map_err(db_error)?;
            return Ok::<bool, CodedError>(false);
        }
        append_tx!(&mut tx, dialect, ev)?;
        tx.commit().await.map_err(db_error)?;
        Ok(true)
    }.await)?;
    if changed {
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
    }
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
) -> Result<(), CodedError> {
    let id = &row.job.job_id;
    let now = now_ms();
    let dialect = jobs.db.dialect();
    let ev = AuditEvent {
        tenant: row.tenant.clone(),
        actor: WORKER_ACTOR.into(),
        action: "job.retry".into(),
        resource: format!("job/{id}"),
        outcome: "queued".into(),
        bypass: false,
        details: json!({"attempts": row.job.attempts, "reason": reason, "delayMs": delay.as_millis() as u64}),
    };
    on_db!(&jobs.db, p => async {
        let mut tx = begin_write!(p, dialect)?;
        let n = sqlx::query(
            "UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_expires_ms = NULL, \
             next_run_ms = $1, updated_ms = $2 WHERE id = $3 AND lease_owner = $4 AND status = 'running'")
            .bind(now + delay.as_millis() as i64).bind(now).bind(id).bind(owner)
            .execute(&mut *tx).await.map_err(db_error)?.rows_affected();
        if n == 0 {
            tx.rollback().await.map_err(db_error)?;
            return Ok::<(), CodedError>(());
        }
        append_tx!(&mut tx, dialect, ev)?;
        tx.commit().await.map_err(db_error)?;
        Ok(())
    }.await)?;
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
        if let Ok(depth) = queue_depth(&jobs).await {
            jobs.metrics.job_queue_depth.set(depth);
        }
        // Keys past IDEMPOTENCY_TTL are forgotten (their jobs stay).
        let now = now_ms();
        if let Err(e) = on_db!(&jobs.db, p => sqlx::query("DELETE FROM idempotency_keys WHERE expires_ms < $1")
            .bind(now).execute(p).await.map(|_| ()))
        {
            tracing::warn!(error = %e, "expiring idempotency keys failed");
        }
    }
}

/// One pass of the sweeper; returns how many jobs it closed.
pub(crate) async fn sweep(jobs: &JobService) -> Result<usize, CodedError> {
    let now = now_ms();
    let rows: Vec<JobRow> = on_db!(&jobs.db, p => {
        let rows = sqlx::query(
            "SELECT * FROM jobs WHERE status = 'running' AND lease_expires_ms < $1 \
             AND (attempts >= max_attempts OR cancel_requested = 1) LIMIT 100")
            .bind(now)
            .fetch_all(p).await.map_err(db_error)?;
        rows.iter().map(row_to_job).collect::<Result<Vec<_>, _>>()?
    });
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
