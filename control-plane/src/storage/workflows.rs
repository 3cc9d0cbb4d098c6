//! The workflows' tables: `workflows` (records, listing, cancellation, the
//! workers' claims and leases) and `workflow_steps` (one row per step of
//! the plan). Every read of a caller's workflow carries its tenant; the
//! workers' statements go by workflow id and are guarded by the lease:
//! a worker that lost its lease changes nothing.

use std::collections::BTreeMap;

use shared::controlplane::{JobFailure, JobStatus};
use shared::dataplane::ArtifactInfo;
use shared::workflow::{
    Teardown, Workflow, WorkflowRequest, WorkflowStep, WorkflowStepOutput, WorkflowStepStatus,
};
use sqlx::Row;

use super::jobs::CancelMark;
use super::{Db, Dialect, StorageError, WriteTx, from_json, on_db, on_tx, to_json};

/// A workflow row, with what the workers need beyond the public view.
#[derive(Debug, Clone)]
pub struct WorkflowRow {
    pub workflow: Workflow,
    pub tenant: String,
    pub subject: String,
    pub app: Option<String>,
    pub agent: Option<String>,
    pub roles: Vec<String>,
    pub spec: WorkflowRequest,
    pub cancel_requested: bool,
    pub max_attempts: u32,
    /// The submitting request's `traceparent`, if one was recorded.
    pub trace_parent: Option<String>,
}

fn failure<R: Row>(row: &R) -> Result<Option<JobFailure>, StorageError>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    Ok(
        match (
            row.try_get::<Option<String>, _>("error_code")?,
            row.try_get::<Option<String>, _>("error_message")?,
        ) {
            (Some(code), message) => Some(JobFailure {
                code,
                message: message.unwrap_or_default(),
            }),
            _ => None,
        },
    )
}

fn workflow_from<R: Row>(row: &R, steps: Vec<WorkflowStep>) -> Result<WorkflowRow, StorageError>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let status: String = row.try_get("status")?;
    let status = JobStatus::parse(&status)
        .ok_or_else(|| StorageError::corrupt("workflow status", &status))?;
    let labels: BTreeMap<String, String> =
        from_json("workflow labels", &row.try_get::<String, _>("labels")?)?;
    let spec: WorkflowRequest = from_json("workflow spec", &row.try_get::<String, _>("spec")?)?;
    let roles: Vec<String> = from_json("workflow roles", &row.try_get::<String, _>("roles")?)?;
    let artifacts: Vec<ArtifactInfo> = from_json(
        "workflow artifacts",
        &row.try_get::<String, _>("artifacts")?,
    )?;
    let teardown = match row.try_get::<Option<String>, _>("teardown")? {
        Some(text) => Some(from_json::<Teardown>("workflow teardown", &text)?),
        None => None,
    };
    Ok(WorkflowRow {
        workflow: Workflow {
            workflow_id: row.try_get("id")?,
            status,
            runtime: row.try_get("runtime")?,
            labels,
            attempts: u32::try_from(row.try_get::<i64, _>("attempts")?).unwrap_or(u32::MAX),
            session_id: row.try_get("session_id")?,
            steps,
            artifacts,
            teardown,
            created_at_ms: row.try_get("created_ms")?,
            updated_at_ms: row.try_get("updated_ms")?,
            started_at_ms: row.try_get("started_ms")?,
            finished_at_ms: row.try_get("finished_ms")?,
            error: failure(row)?,
        },
        tenant: row.try_get("tenant")?,
        subject: row.try_get("subject")?,
        app: row.try_get("app")?,
        agent: row.try_get("agent")?,
        roles,
        spec,
        cancel_requested: row.try_get::<i64, _>("cancel_requested")? != 0,
        max_attempts: u32::try_from(row.try_get::<i64, _>("max_attempts")?).unwrap_or(1),
        trace_parent: row.try_get("trace_parent")?,
    })
}

fn step_from<R: Row>(row: &R) -> Result<WorkflowStep, StorageError>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let status: String = row.try_get("status")?;
    let status = WorkflowStepStatus::parse(&status)
        .ok_or_else(|| StorageError::corrupt("workflow step status", &status))?;
    let output = match row.try_get::<Option<String>, _>("output")? {
        Some(text) => Some(from_json::<WorkflowStepOutput>(
            "workflow step output",
            &text,
        )?),
        None => None,
    };
    Ok(WorkflowStep {
        index: u32::try_from(row.try_get::<i64, _>("idx")?).unwrap_or(u32::MAX),
        status,
        started_at_ms: row.try_get("started_ms")?,
        finished_at_ms: row.try_get("finished_ms")?,
        output,
        error: failure(row)?,
    })
}

/// A workflow to queue.
#[derive(Debug, Clone)]
pub struct NewWorkflow<'a> {
    pub id: &'a str,
    pub tenant: &'a str,
    pub subject: &'a str,
    pub app: Option<&'a str>,
    pub agent: Option<&'a str>,
    pub roles: &'a [String],
    pub runtime: &'a str,
    pub spec: &'a WorkflowRequest,
    pub labels: &'a BTreeMap<String, String>,
    pub max_attempts: u32,
    pub now: i64,
    /// The submitting request's `traceparent` (see [`WorkflowRow::trace_parent`]).
    pub trace_parent: Option<&'a str>,
}

/// Inserts a `queued` workflow, due now, and one `pending` row per step.
pub async fn insert(tx: &mut WriteTx, w: &NewWorkflow<'_>) -> Result<(), StorageError> {
    let spec = to_json("workflow spec", w.spec)?;
    let labels = to_json("workflow labels", w.labels)?;
    let roles = to_json("workflow roles", w.roles)?;
    on_tx!(tx, c => sqlx::query(
        "INSERT INTO workflows (id, tenant, subject, app, agent, roles, status, runtime, spec, labels, \
         artifacts, attempts, max_attempts, next_run_ms, cancel_requested, created_ms, updated_ms, trace_parent) \
         VALUES ($1, $2, $3, $4, $5, $6, 'queued', $7, $8, $9, '[]', 0, $10, $11, 0, $12, $13, $14)")
        .bind(w.id).bind(w.tenant).bind(w.subject).bind(w.app).bind(w.agent).bind(&roles)
        .bind(w.runtime).bind(&spec).bind(&labels)
        .bind(i64::from(w.max_attempts)).bind(w.now).bind(w.now).bind(w.now).bind(w.trace_parent)
        .execute(&mut **c).await.map(|_| ()))?;
    for idx in 0..w.spec.steps.len() {
        on_tx!(tx, c => sqlx::query(
            "INSERT INTO workflow_steps (workflow_id, tenant, idx, status) VALUES ($1, $2, $3, 'pending')")
            .bind(w.id).bind(w.tenant).bind(idx as i64)
            .execute(&mut **c).await.map(|_| ()))?;
    }
    Ok(())
}

async fn steps_of(db: &Db, id: &str) -> Result<Vec<WorkflowStep>, StorageError> {
    on_db!(db, p => {
        let rows = sqlx::query("SELECT * FROM workflow_steps WHERE workflow_id = $1 ORDER BY idx")
            .bind(id)
            .fetch_all(p).await?;
        rows.iter().map(step_from).collect()
    })
}

/// The tenant's workflow `id` with its steps, if it has one.
pub async fn get(db: &Db, tenant: &str, id: &str) -> Result<Option<WorkflowRow>, StorageError> {
    let row = on_db!(db, p => {
        let row = sqlx::query("SELECT * FROM workflows WHERE tenant = $1 AND id = $2")
            .bind(tenant).bind(id)
            .fetch_optional(p).await?;
        row.as_ref().map(|r| workflow_from(r, Vec::new())).transpose()
    })?;
    match row {
        Some(mut row) => {
            row.workflow.steps = steps_of(db, id).await?;
            Ok(Some(row))
        }
        None => Ok(None),
    }
}

/// Filters of [`list`].
#[derive(Debug, Clone, Default)]
pub struct ListQuery<'a> {
    pub status: Option<JobStatus>,
    /// Only workflows after this one in the order of the list.
    pub after: Option<(i64, &'a str)>,
    pub limit: i64,
}

/// The tenant's workflows with their steps, newest first (then by id).
pub async fn list(
    db: &Db,
    tenant: &str,
    q: &ListQuery<'_>,
) -> Result<Vec<WorkflowRow>, StorageError> {
    let sql = "SELECT * FROM workflows WHERE tenant = $1 \
               AND ($2 IS NULL OR status = $2) \
               AND ($3 IS NULL OR created_ms < $3 OR (created_ms = $3 AND id < $4)) \
               ORDER BY created_ms DESC, id DESC LIMIT $5";
    let rows = on_db!(db, p => {
        let rows = sqlx::query(sql)
            .bind(tenant)
            .bind(q.status.map(|s| s.as_str()))
            .bind(q.after.map(|(ms, _)| ms))
            .bind(q.after.map(|(_, id)| id))
            .bind(q.limit)
            .fetch_all(p).await?;
        rows.iter().map(|r| workflow_from(r, Vec::new())).collect::<Result<Vec<_>, _>>()
    })?;
    if rows.is_empty() {
        return Ok(rows);
    }
    // The steps of the whole page in one statement (ids bound, never
    // spliced: only the placeholders are generated).
    let marks: Vec<String> = (2..rows.len() + 2).map(|n| format!("${n}")).collect();
    let sql = format!(
        "SELECT * FROM workflow_steps WHERE tenant = $1 AND workflow_id IN ({}) ORDER BY workflow_id, idx",
        marks.join(", ")
    );
    let mut by_id: BTreeMap<String, Vec<WorkflowStep>> = BTreeMap::new();
    on_db!(db, p => {
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql.clone())).bind(tenant);
        for r in &rows {
            q = q.bind(r.workflow.workflow_id.as_str());
        }
        for r in q.fetch_all(p).await? {
            let id: String = r.try_get("workflow_id")?;
            by_id.entry(id).or_default().push(step_from(&r)?);
        }
        Ok::<_, StorageError>(())
    })?;
    Ok(rows
        .into_iter()
        .map(|mut row| {
            row.workflow.steps = by_id.remove(&row.workflow.workflow_id).unwrap_or_default();
            row
        })
        .collect())
}

/// Cancels the tenant's workflow `id`: a queued one at once (its pending
/// steps `skipped`), a running one by setting the flag its worker reads.
pub async fn mark_cancelled(
    tx: &mut WriteTx,
    tenant: &str,
    id: &str,
    now: i64,
) -> Result<CancelMark, StorageError> {
    let queued = on_tx!(tx, c => sqlx::query(
        "UPDATE workflows SET status = 'cancelled', cancel_requested = 1, finished_ms = $1, updated_ms = $1, \
         error_code = 'cancelled', error_message = 'cancelled by the client' \
         WHERE tenant = $2 AND id = $3 AND status = 'queued'")
        .bind(now).bind(tenant).bind(id)
        .execute(&mut **c).await.map(|r| r.rows_affected()))?;
    if queued > 0 {
        skip_pending(tx, id).await?;
        return Ok(CancelMark::Queued);
    }
    let running = on_tx!(tx, c => sqlx::query(
        "UPDATE workflows SET cancel_requested = 1, updated_ms = $1 \
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

/// Claims the next runnable workflow for `owner` until `lease_until`:
/// queued and due, or running with an expired lease (its worker died).
/// Postgres skips rows other replicas have locked; SQLite's single writer
/// serializes claims. The steps are read in the same transaction.
pub async fn claim(
    tx: &mut WriteTx,
    owner: &str,
    lease_until: i64,
    now: i64,
    tenant_max_running: i64,
) -> Result<Option<WorkflowRow>, StorageError> {
    // Fair across tenants, as the jobs' claim: a tenant at its cap of
    // running workflows is skipped, the one with the fewest goes first.
    macro_rules! running_of_tenant {
        () => {
            "(SELECT COUNT(*) FROM workflows r WHERE r.tenant = w.tenant AND r.status = 'running' AND r.lease_expires_ms >= $3)"
        };
    }
    macro_rules! claim_sql {
        ($lock:literal) => {
            concat!(
                "UPDATE workflows SET status = 'running', lease_owner = $1, lease_expires_ms = $2, ",
                "attempts = attempts + 1, started_ms = COALESCE(started_ms, $3), updated_ms = $3 ",
                "WHERE id = (SELECT w.id FROM workflows w WHERE ((w.status = 'queued' AND w.next_run_ms <= $3) ",
                "OR (w.status = 'running' AND w.lease_expires_ms < $3)) AND ",
                running_of_tenant!(),
                " < $4 ORDER BY ",
                running_of_tenant!(),
                ", w.next_run_ms, w.created_ms LIMIT 1",
                $lock,
                ") RETURNING *"
            )
        };
    }
    let sql = match tx.dialect() {
        Dialect::Postgres => claim_sql!(" FOR UPDATE SKIP LOCKED"),
        Dialect::Sqlite => claim_sql!(""),
    };
    let row = on_tx!(tx, c => {
        let row = sqlx::query(sql)
            .bind(owner).bind(lease_until).bind(now).bind(tenant_max_running)
            .fetch_optional(&mut **c).await?;
        row.as_ref().map(|r| workflow_from(r, Vec::new())).transpose()
    })?;
    let Some(mut row) = row else {
        return Ok(None);
    };
    let id = row.workflow.workflow_id.clone();
    row.workflow.steps = on_tx!(tx, c => {
        let rows = sqlx::query("SELECT * FROM workflow_steps WHERE workflow_id = $1 ORDER BY idx")
            .bind(&id)
            .fetch_all(&mut **c).await?;
        rows.iter().map(step_from).collect::<Result<Vec<_>, _>>()
    })?;
    Ok(Some(row))
}

/// Extends `owner`'s lease on the running workflow `id`; false when it is
/// no longer `owner`'s.
pub async fn renew_lease(
    db: &Db,
    id: &str,
    owner: &str,
    until: i64,
    now: i64,
) -> Result<bool, StorageError> {
    let n = on_db!(db, p => sqlx::query(
        "UPDATE workflows SET lease_expires_ms = $1, updated_ms = $2 \
         WHERE id = $3 AND lease_owner = $4 AND status = 'running'")
        .bind(until).bind(now).bind(id).bind(owner)
        .execute(p).await.map(|r| r.rows_affected()))?;
    Ok(n > 0)
}

/// Whether the client asked to cancel workflow `id`.
pub async fn cancel_requested(db: &Db, id: &str) -> Result<bool, StorageError> {
    let flag: Option<i64> = on_db!(db, p => sqlx::query_scalar(
        "SELECT cancel_requested FROM workflows WHERE id = $1")
        .bind(id).fetch_optional(p).await)?;
    Ok(flag == Some(1))
}

/// The session of workflow `id` (for a cancel to interrupt it).
pub async fn session_of(db: &Db, tenant: &str, id: &str) -> Result<Option<String>, StorageError> {
    let s: Option<Option<String>> = on_db!(db, p => sqlx::query_scalar(
        "SELECT session_id FROM workflows WHERE tenant = $1 AND id = $2")
        .bind(tenant).bind(id).fetch_optional(p).await)?;
    Ok(s.flatten())
}

/// Inside `tx`: true when `owner` still holds the running workflow `id`
/// (touching its `updated_ms`), so the changes that follow are its own.
async fn holds(tx: &mut WriteTx, id: &str, owner: &str, now: i64) -> Result<bool, StorageError> {
    let n = on_tx!(tx, c => sqlx::query(
        "UPDATE workflows SET updated_ms = $1 WHERE id = $2 AND lease_owner = $3 AND status = 'running'")
        .bind(now).bind(id).bind(owner)
        .execute(&mut **c).await.map(|r| r.rows_affected()))?;
    Ok(n > 0)
}

/// Records the session the workflow runs in; false when the lease is lost.
pub async fn set_session(
    tx: &mut WriteTx,
    id: &str,
    owner: &str,
    session_id: &str,
    now: i64,
) -> Result<bool, StorageError> {
    if !holds(tx, id, owner, now).await? {
        return Ok(false);
    }
    on_tx!(tx, c => sqlx::query("UPDATE workflows SET session_id = $1 WHERE id = $2")
        .bind(session_id).bind(id)
        .execute(&mut **c).await.map(|_| ()))?;
    Ok(true)
}

/// Marks step `idx` `running` (it must be `pending`); false when the
/// lease is lost or the step is not pending.
pub async fn start_step(
    tx: &mut WriteTx,
    id: &str,
    owner: &str,
    idx: u32,
    now: i64,
) -> Result<bool, StorageError> {
    if !holds(tx, id, owner, now).await? {
        return Ok(false);
    }
    let n = on_tx!(tx, c => sqlx::query(
        "UPDATE workflow_steps SET status = 'running', started_ms = $1 \
         WHERE workflow_id = $2 AND idx = $3 AND status = 'pending'")
        .bind(now).bind(id).bind(i64::from(idx))
        .execute(&mut **c).await.map(|r| r.rows_affected()))?;
    Ok(n > 0)
}

/// A step's end, for [`finish_step`].
#[derive(Debug, Clone)]
pub struct StepEnd<'a> {
    pub idx: u32,
    pub status: WorkflowStepStatus,
    pub output: Option<&'a WorkflowStepOutput>,
    pub error: Option<&'a JobFailure>,
    pub now: i64,
}

/// Records the end of step `idx` (`running` or, for an interrupted one
/// found at a resume, `running` too). `owner` must hold the workflow.
pub async fn finish_step(
    tx: &mut WriteTx,
    id: &str,
    owner: &str,
    end: &StepEnd<'_>,
) -> Result<bool, StorageError> {
    if !holds(tx, id, owner, end.now).await? {
        return Ok(false);
    }
    let output = end
        .output
        .map(|o| to_json("workflow step output", o))
        .transpose()?;
    let n = on_tx!(tx, c => sqlx::query(
        "UPDATE workflow_steps SET status = $1, output = $2, error_code = $3, error_message = $4, \
         finished_ms = $5 WHERE workflow_id = $6 AND idx = $7 AND status = 'running'")
        .bind(end.status.as_str())
        .bind(&output)
        .bind(end.error.map(|e| e.code.as_str()))
        .bind(end.error.map(|e| e.message.as_str()))
        .bind(end.now)
        .bind(id)
        .bind(i64::from(end.idx))
        .execute(&mut **c).await.map(|r| r.rows_affected()))?;
    Ok(n > 0)
}

/// Every `pending` step of workflow `id` becomes `skipped`.
pub async fn skip_pending(tx: &mut WriteTx, id: &str) -> Result<(), StorageError> {
    on_tx!(tx, c => sqlx::query(
        "UPDATE workflow_steps SET status = 'skipped' WHERE workflow_id = $1 AND status = 'pending'")
        .bind(id)
        .execute(&mut **c).await.map(|_| ()))?;
    Ok(())
}

/// A final status to record with [`finish`].
#[derive(Debug, Clone)]
pub struct Finish<'a> {
    pub id: &'a str,
    pub owner: &'a str,
    pub status: JobStatus,
    pub artifacts: &'a [ArtifactInfo],
    pub teardown: Option<&'a Teardown>,
    pub error: Option<&'a JobFailure>,
    pub now: i64,
}

/// Records a running workflow's final status (its pending steps become
/// `skipped`, a step left `running` by a lost worker `failed`) and
/// releases the lease, if `owner` still holds it.
pub async fn finish(tx: &mut WriteTx, f: &Finish<'_>) -> Result<bool, StorageError> {
    let artifacts = to_json("workflow artifacts", f.artifacts)?;
    let teardown = f
        .teardown
        .map(|t| to_json("workflow teardown", t))
        .transpose()?;
    let n = on_tx!(tx, c => sqlx::query(
        "UPDATE workflows SET status = $1, artifacts = $2, teardown = $3, error_code = $4, \
         error_message = $5, finished_ms = $6, updated_ms = $6, lease_owner = NULL, \
         lease_expires_ms = NULL WHERE id = $7 AND lease_owner = $8 AND status = 'running'")
        .bind(f.status.as_str())
        .bind(&artifacts)
        .bind(&teardown)
        .bind(f.error.map(|e| e.code.as_str()))
        .bind(f.error.map(|e| e.message.as_str()))
        .bind(f.now)
        .bind(f.id)
        .bind(f.owner)
        .execute(&mut **c).await.map(|r| r.rows_affected()))?;
    if n == 0 {
        return Ok(false);
    }
    // A step still `running` here was lost with an earlier worker (the
    // workflow is being cancelled or given up): its outcome is unknown.
    on_tx!(tx, c => sqlx::query(
        "UPDATE workflow_steps SET status = 'failed', error_code = 'workflow_interrupted', \
         error_message = 'its worker was lost while it ran; its outcome is unknown', finished_ms = $1 \
         WHERE workflow_id = $2 AND status = 'running'")
        .bind(f.now).bind(f.id)
        .execute(&mut **c).await.map(|_| ()))?;
    skip_pending(tx, f.id).await?;
    Ok(true)
}

/// Puts `owner`'s running workflow `id` back in the queue, due at
/// `next_run_ms`; false when it is no longer `owner`'s.
pub async fn requeue(
    tx: &mut WriteTx,
    id: &str,
    owner: &str,
    next_run_ms: i64,
    now: i64,
) -> Result<bool, StorageError> {
    let n = on_tx!(tx, c => sqlx::query(
        "UPDATE workflows SET status = 'queued', lease_owner = NULL, lease_expires_ms = NULL, \
         next_run_ms = $1, updated_ms = $2 WHERE id = $3 AND lease_owner = $4 AND status = 'running'")
        .bind(next_run_ms).bind(now).bind(id).bind(owner)
        .execute(&mut **c).await.map(|r| r.rows_affected()))?;
    Ok(n > 0)
}
