//! The job queue's tables: `jobs` and `job_labels` (records, listing,
//! cancellation), the workers' claims and leases, and `idempotency_keys`.
//! Every read and write of a caller's job carries its tenant; the workers'
//! statements go by job id, which is global.

use std::collections::BTreeMap;

use shared::controlplane::{Job, JobFailure, JobOutput, JobRequest, JobStatus};
use sqlx::Row;

use super::{Db, Dialect, StorageError, WriteTx, from_json, on_db, on_tx, to_json};

/// A job row, with what the workers need beyond the public view.
#[derive(Debug, Clone)]
pub struct JobRow {
    pub job: Job,
    pub tenant: String,
    pub spec: JobRequest,
    pub cancel_requested: bool,
    pub max_attempts: u32,
    /// The submitting request's `traceparent`, if one was recorded.
    pub trace_parent: Option<String>,
}

fn job_from<R: Row>(row: &R) -> Result<JobRow, StorageError>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let status: String = row.try_get("status")?;
    let status =
        JobStatus::parse(&status).ok_or_else(|| StorageError::corrupt("job status", &status))?;
    let labels: BTreeMap<String, String> =
        from_json("job labels", &row.try_get::<String, _>("labels")?)?;
    let spec: JobRequest = from_json("job spec", &row.try_get::<String, _>("spec")?)?;
    let output = match row.try_get::<Option<String>, _>("result")? {
        Some(text) => Some(from_json::<JobOutput>("job result", &text)?),
        None => None,
    };
    let error = match (
        row.try_get::<Option<String>, _>("error_code")?,
        row.try_get::<Option<String>, _>("error_message")?,
    ) {
        (Some(code), message) => Some(JobFailure {
            code,
            message: message.unwrap_or_default(),
        }),
        _ => None,
    };
    Ok(JobRow {
        job: Job {
            job_id: row.try_get("id")?,
            status,
            runtime: row.try_get("runtime")?,
            labels,
            attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(u32::MAX),
            created_at_ms: row.try_get("created_ms")?,
            updated_at_ms: row.try_get("updated_ms")?,
            started_at_ms: row.try_get("started_ms")?,
            finished_at_ms: row.try_get("finished_ms")?,
            output,
            error,
        },
        tenant: row.try_get("tenant")?,
        spec,
        cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
        max_attempts: u32::try_from(row.try_get::<i64, _>("max_attempts")?).unwrap_or(1),
        trace_parent: row.try_get("trace_parent")?,
    })
}

// ---- idempotency keys ----

/// What an earlier request stored under a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredKey {
    pub request_hash: String,
    /// `processing` or `completed`.
    pub state: String,
    pub response_status: Option<i64>,
    pub response_body: Option<String>,
}

/// The result of [`claim_key`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyClaim {
    /// The key is this request's now (state `processing`).
    Claimed,
    /// An earlier request holds the key.
    Taken(StoredKey),
}

/// Claims the tenant's idempotency `key` for a request with fingerprint
/// `request_hash`, kept until `expires_ms`. A key past its time is
/// forgotten first, then reused.
pub async fn claim_key(
    tx: &mut WriteTx,
    tenant: &str,
    key: &str,
    request_hash: &str,
    now: i64,
    expires_ms: i64,
) -> Result<KeyClaim, StorageError> {
    on_tx!(tx, c => sqlx::query(
        "DELETE FROM idempotency_keys WHERE tenant = $1 AND idem_key = $2 AND expires_ms < $3")
        .bind(tenant).bind(key).bind(now)
        .execute(&mut **c).await.map(|_| ()))?;
    let inserted = on_tx!(tx, c => sqlx::query(
        "INSERT INTO idempotency_keys (tenant, idem_key, request_hash, state, created_ms, expires_ms) \
         VALUES ($1, $2, $3, 'processing', $4, $5) ON CONFLICT DO NOTHING")
        .bind(tenant).bind(key).bind(request_hash).bind(now).bind(expires_ms)
        .execute(&mut **c).await.map(|r| r.rows_affected()))?;
    if inserted > 0 {
        return Ok(KeyClaim::Claimed);
    }
    let (request_hash, state, response_status, response_body): (
        String,
        String,
        Option<i64>,
        Option<String>,
    ) = on_tx!(tx, c => sqlx::query_as(
        "SELECT request_hash, state, response_status, response_body FROM idempotency_keys \
         WHERE tenant = $1 AND idem_key = $2")
        .bind(tenant).bind(key)
        .fetch_one(&mut **c).await)?;
    Ok(KeyClaim::Taken(StoredKey {
        request_hash,
        state,
        response_status,
        response_body,
    }))
}

/// Stores the response of the request that claimed `key`.
pub async fn complete_key(
    tx: &mut WriteTx,
    tenant: &str,
    key: &str,
    status: u16,
    body: &str,
) -> Result<(), StorageError> {
    on_tx!(tx, c => sqlx::query(
        "UPDATE idempotency_keys SET state = 'completed', response_status = $1, response_body = $2 \
         WHERE tenant = $3 AND idem_key = $4")
        .bind(i64::from(status)).bind(body).bind(tenant).bind(key)
        .execute(&mut **c).await.map(|_| ()))?;
    Ok(())
}

/// Forgets every key that expired before `now` (their jobs stay).
pub async fn expire_keys(db: &Db, now: i64) -> Result<u64, StorageError> {
    let n = on_db!(db, p => sqlx::query("DELETE FROM idempotency_keys WHERE expires_ms < $1")
        .bind(now).execute(p).await.map(|r| r.rows_affected()))?;
    Ok(n)
}

// ---- records ----

/// A job to queue.
#[derive(Debug, Clone)]
pub struct NewJob<'a> {
    pub id: &'a str,
    pub tenant: &'a str,
    pub subject: &'a str,
    pub app: Option<&'a str>,
    pub agent: Option<&'a str>,
    pub runtime: &'a str,
    pub spec: &'a JobRequest,
    pub labels: &'a BTreeMap<String, String>,
    pub max_attempts: u32,
    pub now: i64,
    /// The submitting request's `traceparent` (see [`JobRow::trace_parent`]).
    pub trace_parent: Option<&'a str>,
}

/// How many jobs the tenant has queued.
pub async fn count_queued(tx: &mut WriteTx, tenant: &str) -> Result<i64, StorageError> {
    let n: i64 = on_tx!(tx, c => sqlx::query_scalar(
        "SELECT COUNT(*) FROM jobs WHERE tenant = $1 AND status = 'queued'")
        .bind(tenant)
        .fetch_one(&mut **c).await)?;
    Ok(n)
}

/// Inserts a `queued` job, due now, and its labels.
pub async fn insert(tx: &mut WriteTx, job: &NewJob<'_>) -> Result<(), StorageError> {
    let spec = to_json("job spec", job.spec)?;
    let labels = to_json("job labels", job.labels)?;
    on_tx!(tx, c => sqlx::query(
        "INSERT INTO jobs (id, tenant, subject, app, agent, status, runtime, spec, labels, \
         attempts, max_attempts, next_run_ms, cancel_requested, created_ms, updated_ms, trace_parent) \
         VALUES ($1, $2, $3, $4, $5, 'queued', $6, $7, $8, 0, $9, $10, 0, $11, $12, $13)")
        .bind(job.id).bind(job.tenant).bind(job.subject)
        .bind(job.app).bind(job.agent).bind(job.runtime)
        .bind(&spec).bind(&labels)
        .bind(i64::from(job.max_attempts)).bind(job.now).bind(job.now).bind(job.now)
        .bind(job.trace_parent)
        .execute(&mut **c).await.map(|_| ()))?;
    for (name, value) in job.labels {
        on_tx!(tx, c => sqlx::query(
            "INSERT INTO job_labels (job_id, tenant, name, value) VALUES ($1, $2, $3, $4)")
            .bind(job.id).bind(job.tenant).bind(name).bind(value)
            .execute(&mut **c).await.map(|_| ()))?;
    }
    Ok(())
}

/// The tenant's job `id`, if it has one.
pub async fn get(db: &Db, tenant: &str, id: &str) -> Result<Option<JobRow>, StorageError> {
    on_db!(db, p => {
        let row = sqlx::query("SELECT * FROM jobs WHERE tenant = $1 AND id = $2")
            .bind(tenant).bind(id)
            .fetch_optional(p).await?;
        row.as_ref().map(job_from).transpose()
    })
}

/// Filters of [`list`]; every one optional but the limit.
#[derive(Debug, Clone, Default)]
pub struct ListQuery<'a> {
    pub status: Option<JobStatus>,
    /// `name`, `value`.
    pub label: Option<(&'a str, &'a str)>,
    pub created_after_ms: Option<i64>,
    pub created_before_ms: Option<i64>,
    /// Only jobs after this one in the order of the list (`created_ms`,
    /// `id` of the last job of the previous page).
    pub after: Option<(i64, &'a str)>,
    pub limit: i64,
}

/// The tenant's jobs, newest first (then by id, descending), filtered.
pub async fn list(db: &Db, tenant: &str, q: &ListQuery<'_>) -> Result<Vec<JobRow>, StorageError> {
    // Parameters appear in numeric order (SQLite binds `$N` by first use).
    let sql = "SELECT * FROM jobs WHERE tenant = $1 \
               AND ($2 IS NULL OR status = $2) \
               AND ($3 IS NULL OR created_ms >= $3) \
               AND ($4 IS NULL OR created_ms < $4) \
               AND ($5 IS NULL OR EXISTS (SELECT 1 FROM job_labels l WHERE l.job_id = jobs.id \
                    AND l.tenant = $1 AND l.name = $5 AND l.value = $6)) \
               AND ($7 IS NULL OR created_ms < $7 OR (created_ms = $7 AND id < $8)) \
               ORDER BY created_ms DESC, id DESC LIMIT $9";
    on_db!(db, p => {
        let rows = sqlx::query(sql)
            .bind(tenant)
            .bind(q.status.map(|s| s.as_str()))
            .bind(q.created_after_ms)
            .bind(q.created_before_ms)
            .bind(q.label.map(|(name, _)| name))
            .bind(q.label.map(|(_, value)| value))
            .bind(q.after.map(|(ms, _)| ms))
            .bind(q.after.map(|(_, id)| id))
            .bind(q.limit)
            .fetch_all(p).await?;
        rows.iter().map(job_from).collect()
    })
}

/// What [`mark_cancelled`] changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelMark {
    /// The job was queued: it is `cancelled` now.
    Queued,
    /// The job is running: flagged for its worker.
    Running,
    /// The job had already finished (or does not exist): nothing changed.
    Finished,
}

/// Cancels the tenant's job `id`: a queued one at once, a running one by
/// setting the flag its worker reads.
pub async fn mark_cancelled(
    tx: &mut WriteTx,
    tenant: &str,
    id: &str,
    now: i64,
) -> Result<CancelMark, StorageError> {
    let queued = on_tx!(tx, c => sqlx::query(
        "UPDATE jobs SET status = 'cancelled', cancel_requested = 1, finished_ms = $1, updated_ms = $1, \
         error_code = 'cancelled', error_message = 'cancelled by the client' \
         WHERE tenant = $2 AND id = $3 AND status = 'queued'")
        .bind(now).bind(tenant).bind(id)
        .execute(&mut **c).await.map(|r| r.rows_affected()))?;
    if queued > 0 {
        return Ok(CancelMark::Queued);
    }
    let running = on_tx!(tx, c => sqlx::query(
        "UPDATE jobs SET cancel_requested = 1, updated_ms = $1 \
         WHERE tenant = $2 AND id = $3 AND status = 'running'")
        .bind(now).bind(tenant).bind(id)
        .execute(&mut **c).await.map(|r| r.rows_affected()))?;
    Ok(if running > 0 {
        CancelMark::Running
    } else {
        CancelMark::Finished
    })
}

// ---- the workers ----

/// Claims the next runnable job for `owner` until `lease_until`: queued
/// and due, or running with an expired lease (its worker died), and not
/// out of attempts or cancelled. Fair across tenants (issue 15, section
/// 5): a tenant already running `tenant_max_running` jobs is skipped, and
/// the tenant with the fewest running jobs goes first; within a tenant,
/// the job due first, then the oldest. One statement; Postgres also skips
/// rows other replicas have locked (`FOR UPDATE SKIP LOCKED`), SQLite's
/// single writer serializes claims.
pub async fn claim(
    tx: &mut WriteTx,
    owner: &str,
    lease_until: i64,
    now: i64,
    tenant_max_running: i64,
) -> Result<Option<JobRow>, StorageError> {
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
    let sql = match tx.dialect() {
        Dialect::Postgres => claim_sql!(" FOR UPDATE SKIP LOCKED"),
        Dialect::Sqlite => claim_sql!(""),
    };
    on_tx!(tx, c => {
        let row = sqlx::query(sql)
            .bind(owner).bind(lease_until).bind(now).bind(tenant_max_running)
            .fetch_optional(&mut **c).await?;
        row.as_ref().map(job_from).transpose()
    })
}

/// Jobs queued, all tenants.
pub async fn queue_depth(db: &Db) -> Result<i64, StorageError> {
    let n: i64 = on_db!(db, p => sqlx::query_scalar(
        "SELECT COUNT(*) FROM jobs WHERE status = 'queued'")
        .fetch_one(p).await)?;
    Ok(n)
}

/// Extends `owner`'s lease on the running job `id` to `until`; false when
/// the job is no longer `owner`'s.
pub async fn renew_lease(
    db: &Db,
    id: &str,
    owner: &str,
    until: i64,
    now: i64,
) -> Result<bool, StorageError> {
    let n = on_db!(db, p => sqlx::query(
        "UPDATE jobs SET lease_expires_ms = $1, updated_ms = $2 \
         WHERE id = $3 AND lease_owner = $4 AND status = 'running'")
        .bind(until).bind(now).bind(id).bind(owner)
        .execute(p).await.map(|r| r.rows_affected()))?;
    Ok(n > 0)
}

/// Whether the client asked to cancel job `id` (false for an unknown id).
pub async fn cancel_requested(db: &Db, id: &str) -> Result<bool, StorageError> {
    let flag: Option<i64> = on_db!(db, p => sqlx::query_scalar(
        "SELECT cancel_requested FROM jobs WHERE id = $1")
        .bind(id).fetch_optional(p).await)?;
    Ok(flag == Some(1))
}

/// A final status to record with [`finish`].
#[derive(Debug, Clone)]
pub struct Finish<'a> {
    pub id: &'a str,
    /// The worker that must still hold the lease; `None` (the sweeper):
    /// the lease must have expired instead.
    pub owner: Option<&'a str>,
    pub status: JobStatus,
    pub output: Option<&'a JobOutput>,
    pub error: Option<&'a JobFailure>,
    pub now: i64,
}

/// Records a running job's final status and releases its lease, if the
/// guard of [`Finish::owner`] holds; false when it does not.
pub async fn finish(tx: &mut WriteTx, f: &Finish<'_>) -> Result<bool, StorageError> {
    let result = f.output.map(|o| to_json("job result", o)).transpose()?;
    let n = on_tx!(tx, c => sqlx::query(
        "UPDATE jobs SET status = $1, result = $2, error_code = $3, error_message = $4, \
         finished_ms = $5, updated_ms = $5, lease_owner = NULL, lease_expires_ms = NULL \
         WHERE id = $6 AND status = 'running' \
         AND (($7 IS NOT NULL AND lease_owner = $7) OR ($7 IS NULL AND lease_expires_ms < $5))")
        .bind(f.status.as_str())
        .bind(&result)
        .bind(f.error.map(|e| e.code.as_str()))
        .bind(f.error.map(|e| e.message.as_str()))
        .bind(f.now)
        .bind(f.id)
        .bind(f.owner)
        .execute(&mut **c).await.map(|r| r.rows_affected()))?;
    Ok(n > 0)
}

/// Puts `owner`'s running job `id` back in the queue, due at
/// `next_run_ms`; false when the job is no longer `owner`'s.
pub async fn requeue(
    tx: &mut WriteTx,
    id: &str,
    owner: &str,
    next_run_ms: i64,
    now: i64,
) -> Result<bool, StorageError> {
    let n = on_tx!(tx, c => sqlx::query(
        "UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_expires_ms = NULL, \
         next_run_ms = $1, updated_ms = $2 WHERE id = $3 AND lease_owner = $4 AND status = 'running'")
        .bind(next_run_ms).bind(now).bind(id).bind(owner)
        .execute(&mut **c).await.map(|r| r.rows_affected()))?;
    Ok(n > 0)
}

/// Up to `limit` running jobs whose lease expired before `now` and that
/// may not be tried again (attempts used up, or cancelled).
pub async fn abandoned(db: &Db, now: i64, limit: i64) -> Result<Vec<JobRow>, StorageError> {
    on_db!(db, p => {
        let rows = sqlx::query(
            "SELECT * FROM jobs WHERE status = 'running' AND lease_expires_ms < $1 \
             AND (attempts >= max_attempts OR cancel_requested = 1) LIMIT $2")
            .bind(now).bind(limit)
            .fetch_all(p).await?;
        rows.iter().map(job_from).collect()
    })
}
