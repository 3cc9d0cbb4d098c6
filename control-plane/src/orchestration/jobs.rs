//! Job records: submission (policy, idempotency, audit in one transaction),
//! reads scoped by tenant, listing with filters and a cursor, cancellation.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;
use shared::CodedError;
use shared::ErrorCode;
use shared::controlplane::{Job, JobFailure, JobList, JobOutput, JobRequest, JobStatus};
use shared::ids::JobId;
use sqlx::Row;
use tokio::sync::{Notify, broadcast};

use super::idempotency::{Prior, fingerprint};
use crate::audit::{AuditEvent, append_tx, begin_write};
use crate::dataplane::DataPlane;
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::on_db;
use crate::policy::{PolicyInput, PolicyService};
use crate::storage::{Db, db_error, new_id, now_ms};

/// Tuning of the job queue.
#[derive(Debug, Clone)]
pub struct JobSettings {
    pub max_attempts: u32,
    pub idempotency_ttl: Duration,
    pub lease: Duration,
    pub poll_interval: Duration,
    pub workers: usize,
    /// Jobs one tenant may have queued; one more is refused (429).
    pub tenant_max_queued: i64,
    /// Jobs of one tenant running at once; the claim skips a tenant at it.
    pub tenant_max_running: i64,
}

/// The answer to a submission.
#[derive(Debug, Clone, PartialEq)]
pub struct Submitted {
    /// HTTP status of the (first) response.
    pub status: u16,
    /// The response body: the job as it was when first accepted.
    pub body: String,
    /// This is the saved response of an earlier request with the same key.
    pub replayed: bool,
}

/// Filters of `GET /v1/jobs`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobFilter {
    pub status: Option<JobStatus>,
    /// `name=value`.
    pub label: Option<(String, String)>,
    pub created_after_ms: Option<i64>,
    pub created_before_ms: Option<i64>,
    pub cursor: Option<String>,
    pub limit: Option<i64>,
}

/// Jobs: the records and the signal that wakes the workers.
pub struct JobService {
    pub(crate) db: Db,
    pub(crate) policy: PolicyService,
    pub(crate) dp: DataPlane,
    pub(crate) metrics: Arc<Metrics>,
    pub(crate) settings: JobSettings,
    /// Wakes idle workers of this replica when a job is queued.
    pub(crate) wake: Arc<Notify>,
    /// Job ids that reached a final status on this replica (for long polls).
    pub(crate) finished: broadcast::Sender<String>,
}

/// A job row, with what the workers need beyond the public view.
#[derive(Debug, Clone)]
pub(crate) struct JobRow {
    pub job: Job,
    pub tenant: String,
    pub spec: JobRequest,
    pub cancel_requested: bool,
    pub max_attempts: u32,
}

pub(crate) fn row_to_job<R: Row>(row: &R) -> Result<JobRow, CodedError>
where
    for<'a> &'a str: sqlx::ColumnIndex<R>,
    for<'a> i64: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<i64>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> String: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
    for<'a> Option<String>: sqlx::Decode<'a, R::Database> + sqlx::Type<R::Database>,
{
    let corrupt = |what: &str, e: String| {
        tracing::error!(what, error = %e, "a stored job does not parse");
        CodedError::new(ErrorCode::Internal, format!("stored job {what} is corrupt"))
    };
    let status: String = row.try_get("status").map_err(db_error)?;
    let status = JobStatus::parse(&status).ok_or_else(|| corrupt("status", status.clone()))?;
    let labels: String = row.try_get("labels").map_err(db_error)?;
    let labels: BTreeMap<String, String> =
        serde_json::from_str(&labels).map_err(|e| corrupt("labels", e.to_string()))?;
    let spec: String = row.try_get("spec").map_err(db_error)?;
    let spec: JobRequest =
        serde_json::from_str(&spec).map_err(|e| corrupt("spec", e.to_string()))?;
    let output = match row
        .try_get::<Option<String>, _>("result")
        .map_err(db_error)?
    {
        Some(text) => Some(
            serde_json::from_str::<JobOutput>(&text)
                .map_err(|e| corrupt("result", e.to_string()))?,
        ),
        None => None,
    };
    let error = match (
        row.try_get::<Option<String>, _>("error_code")
            .map_err(db_error)?,
        row.try_get::<Option<String>, _>("error_message")
            .map_err(db_error)?,
    ) {
        (Some(code), message) => Some(JobFailure {
            code,
            message: message.unwrap_or_default(),
        }),
        _ => None,
    };
    Ok(JobRow {
        job: Job {
            job_id: row.try_get("id").map_err(db_error)?,
            status,
            runtime: row.try_get("runtime").map_err(db_error)?,
            labels,
            attempts: u32::try_from(row.try_get::<i64, _>("attempts").map_err(db_error)?)
                .unwrap_or(u32::MAX),
            created_at_ms: row.try_get("created_ms").map_err(db_error)?,
            updated_at_ms: row.try_get("updated_ms").map_err(db_error)?,
            started_at_ms: row.try_get("started_ms").map_err(db_error)?,
            finished_at_ms: row.try_get("finished_ms").map_err(db_error)?,
            output,
            error,
        },
        tenant: row.try_get("tenant").map_err(db_error)?,
        spec,
        cancel_requested: row
            .try_get::<i64, _>("cancel_requested")
            .map_err(db_error)?
            != 0,
        max_attempts: u32::try_from(row.try_get::<i64, _>("max_attempts").map_err(db_error)?)
            .unwrap_or(1),
    })
}

fn not_found(id: &str) -> CodedError {
    CodedError::new(ErrorCode::JobNotFound, format!("no job {id}"))
}

/// The policy input of a submission: what it asks for, never its code.
pub(crate) fn policy_request(req: &JobRequest) -> serde_json::Value {
    json!({
        "runtime": req.runtime.as_deref().unwrap_or(crate::DEFAULT_RUNTIME),
        "limits": req.limits,
        "timeoutMs": req.timeout_ms,
        "packages": req.packages.clone().unwrap_or_default(),
        "egress": req.egress.clone().unwrap_or_default(),
        "secrets": req.secrets.clone().unwrap_or_default(),
        "labels": req.labels.clone().unwrap_or_default(),
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

impl JobService {
    pub fn new(
        db: Db,
        policy: PolicyService,
        dp: DataPlane,
        metrics: Arc<Metrics>,
        settings: JobSettings,
    ) -> Arc<JobService> {
        let (finished, _) = broadcast::channel(1024);
        Arc::new(JobService {
            db,
            policy,
            dp,
            metrics,
            settings,
            wake: Arc::new(Notify::new()),
            finished,
        })
    }

    /// Validates, authorizes and queues a job; with an idempotency key, a
    /// repeat gets the first response back. The job row, the key and the
    /// audit event commit together or not at all.
    pub async fn submit(
        &self,
        identity: &Identity,
        key: Option<String>,
        req: JobRequest,
    ) -> Result<Submitted, CodedError> {
        if req.code.trim().is_empty() {
            return Err(CodedError::new(ErrorCode::InvalidArgument, "code is empty"));
        }
        if let Some(labels) = &req.labels {
            validate_labels(labels)?;
        }
        validate_packages(req.packages.as_deref())?;
        let runtime = req
            .runtime
            .clone()
            .unwrap_or_else(|| crate::DEFAULT_RUNTIME.to_owned());
        self.dp
            .check_runtime(&runtime, req.limits.as_ref(), req.timeout_ms)
            .await?;
        let decision = self
            .policy
            .authorize(
                identity,
                &PolicyInput {
                    action: "job.submit".into(),
                    resource: json!({"type": "job"}),
                    request: policy_request(&req),
                },
            )
            .await?;
        let hash = fingerprint(&serde_json::to_value(&req).map_err(|e| {
            CodedError::new(
                ErrorCode::Internal,
                format!("request does not serialize: {e}"),
            )
        })?);
        let now = now_ms();
        let id = new_id("job");
        let labels = req.labels.clone().unwrap_or_default();
        let job = Job {
            job_id: id.clone(),
            status: JobStatus::Queued,
            runtime: runtime.clone(),
            labels: labels.clone(),
            attempts: 0,
            created_at_ms: now,
            updated_at_ms: now,
            started_at_ms: None,
            finished_at_ms: None,
            output: None,
            error: None,
        };
        let body = serde_json::to_string(&job)
            .map_err(|e| CodedError::new(ErrorCode::Internal, e.to_string()))?;
        let spec = serde_json::to_string(&req)
            .map_err(|e| CodedError::new(ErrorCode::Internal, e.to_string()))?;
        let labels_json = serde_json::to_string(&labels)
            .map_err(|e| CodedError::new(ErrorCode::Internal, e.to_string()))?;
        let ttl_ms = self.settings.idempotency_ttl.as_millis() as i64;
        let dialect = self.db.dialect();
        let event = AuditEvent::by(identity, "job.submit", format!("job/{id}")).details(json!({
            "runtime": runtime,
            "labels": labels,
            "policyVersion": decision.policy_version,
            "idempotencyKey": key.is_some(),
        }));
        let outcome: Result<Submitted, CodedError> = on_db!(&self.db, p => async {
            let mut tx = begin_write!(p, dialect)?;
            if let Some(key) = &key {
                // A key past its time is forgotten, then reused.
                sqlx::query("DELETE FROM idempotency_keys WHERE tenant = $1 AND idem_key = $2 AND expires_ms < $3")
                    .bind(identity.tenant.as_str()).bind(key).bind(now)
                    .execute(&mut *tx).await.map_err(db_error)?;
                let inserted = sqlx::query(
                    "INSERT INTO idempotency_keys (tenant, idem_key, request_hash, state, created_ms, expires_ms) \
                     VALUES ($1, $2, $3, 'processing', $4, $5) ON CONFLICT DO NOTHING")
                    .bind(identity.tenant.as_str()).bind(key).bind(&hash).bind(now).bind(now + ttl_ms)
                    .execute(&mut *tx).await.map_err(db_error)?
                    .rows_affected();
                if inserted == 0 {
                    let row = sqlx::query(
                        "SELECT request_hash, state, response_status, response_body FROM idempotency_keys \
                         WHERE tenant = $1 AND idem_key = $2")
                        .bind(identity.tenant.as_str()).bind(key)
                        .fetch_one(&mut *tx).await.map_err(db_error)?;
                    let prior = Prior::judge(
                        &row.try_get::<String, _>("request_hash").map_err(db_error)?,
                        &row.try_get::<String, _>("state").map_err(db_error)?,
                        row.try_get("response_status").map_err(db_error)?,
                        row.try_get("response_body").map_err(db_error)?,
                        &hash,
                    );
                    tx.rollback().await.map_err(db_error)?;
                    return match prior {
                        Prior::Replay { status, body } => Ok(Submitted { status, body, replayed: true }),
                        other => Err(other.error().unwrap_or_else(|| CodedError::new(ErrorCode::Internal, "idempotency"))),
                    };
                }
            }
            // One tenant cannot fill the queue for everyone (issue 15, s. 5).
            let queued: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM jobs WHERE tenant = $1 AND status = 'queued'")
                .bind(identity.tenant.as_str())
                .fetch_one(&mut *tx).await.map_err(db_error)?;
            if queued >= self.settings.tenant_max_queued {
                tx.rollback().await.map_err(db_error)?;
                return Err(CodedError::new(
                    ErrorCode::TenantQuotaExceeded,
                    format!("the tenant has {queued} jobs queued, at most {}; retry when some have started", self.settings.tenant_max_queued),
                ));
            }
            sqlx::query(
                "INSERT INTO jobs (id, tenant, subject, app, agent, status, runtime, spec, labels, \
                 attempts, max_attempts, next_run_ms, cancel_requested, created_ms, updated_ms) \
                 VALUES ($1, $2, $3, $4, $5, 'queued', $6, $7, $8, 0, $9, $10, 0, $11, $12)")
                .bind(&id).bind(identity.tenant.as_str()).bind(&identity.subject)
                .bind(&identity.app).bind(&identity.agent).bind(&runtime)
                .bind(&spec).bind(&labels_json)
                .bind(i64::from(self.settings.max_attempts)).bind(now).bind(now).bind(now)
                .execute(&mut *tx).await.map_err(db_error)?;
            for (name, value) in &labels {
                sqlx::query("INSERT INTO job_labels (job_id, tenant, name, value) VALUES ($1, $2, $3, $4)")
                    .bind(&id).bind(identity.tenant.as_str()).bind(name).bind(value)
                    .execute(&mut *tx).await.map_err(db_error)?;
            }
            append_tx!(&mut tx, dialect, event.clone())?;
            if let Some(key) = &key {
                sqlx::query(
                    "UPDATE idempotency_keys SET state = 'completed', response_status = 202, response_body = $1 \
                     WHERE tenant = $2 AND idem_key = $3")
                    .bind(&body).bind(identity.tenant.as_str()).bind(key)
                    .execute(&mut *tx).await.map_err(db_error)?;
            }
            tx.commit().await.map_err(db_error)?;
            Ok(Submitted { status: 202, body: body.clone(), replayed: false })
        }.await);
        if matches!(&outcome, Ok(s) if !s.replayed) {
            self.metrics.job_queue_depth.inc();
            self.wake.notify_one();
        }
        outcome
    }

    /// One job of the caller's tenant (another tenant's -> 404).
    pub async fn get(&self, identity: &Identity, id: &JobId) -> Result<Job, CodedError> {
        self.authorize_on(identity, "job.read", id).await?;
        Ok(self.row(&identity.tenant, id).await?.job)
    }

    /// Policy for an action on one existing job.
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
                    resource: json!({"type": "job", "id": id}),
                    request: json!({}),
                },
            )
            .await
            .map(|_| ())
    }

    pub(crate) async fn row(&self, tenant: &str, id: &str) -> Result<JobRow, CodedError> {
        let row = on_db!(&self.db, p => {
            match sqlx::query("SELECT * FROM jobs WHERE tenant = $1 AND id = $2")
                .bind(tenant).bind(id)
                .fetch_optional(p).await.map_err(db_error)? {
                Some(r) => Some(row_to_job(&r)?),
                None => None,
            }
        });
        row.ok_or_else(|| not_found(id))
    }

    /// Waits up to `timeout` for the job to reach a final status, then
    /// returns it as it is (a long poll).
    pub async fn wait(
        &self,
        identity: &Identity,
        id: &JobId,
        timeout: Duration,
    ) -> Result<Job, CodedError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut finished = self.finished.subscribe();
        self.authorize_on(identity, "job.read", id).await?;
        loop {
            let job = self.row(&identity.tenant, id).await?.job;
            if job.status.is_final() || tokio::time::Instant::now() >= deadline {
                return Ok(job);
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

    /// The tenant's jobs, newest first, filtered, one page at a time.
    pub async fn list(&self, identity: &Identity, f: &JobFilter) -> Result<JobList, CodedError> {
        self.policy
            .authorize(
                identity,
                &PolicyInput {
                    action: "job.read".into(),
                    resource: json!({"type": "job"}),
                    request: json!({}),
                },
            )
            .await?;
        let limit = f.limit.unwrap_or(50).clamp(1, 500);
        let (cursor_ms, cursor_id) = match &f.cursor {
            Some(c) => {
                let (ms, id) = decode_cursor(c)?;
                (Some(ms), Some(id))
            }
            None => (None, None),
        };
        let (label_name, label_value) = match &f.label {
            Some((n, v)) => (Some(n.clone()), Some(v.clone())),
            None => (None, None),
        };
        let status = f.status.map(|s| s.as_str());
        // Parameters appear in numeric order (SQLite binds `$N` by first use).
        let sql = "SELECT * FROM jobs WHERE tenant = $1 \
                   AND ($2 IS NULL OR status = $2) \
                   AND ($3 IS NULL OR created_ms >= $3) \
                   AND ($4 IS NULL OR created_ms < $4) \
                   AND ($5 IS NULL OR EXISTS (SELECT 1 FROM job_labels l WHERE l.job_id = jobs.id \
                        AND l.tenant = $1 AND l.name = $5 AND l.value = $6)) \
                   AND ($7 IS NULL OR created_ms < $7 OR (created_ms = $7 AND id < $8)) \
                   ORDER BY created_ms DESC, id DESC LIMIT $9";
        let rows: Vec<JobRow> = on_db!(&self.db, p => {
            let rows = sqlx::query(sql)
                .bind(identity.tenant.as_str())
                .bind(status)
                .bind(f.created_after_ms)
                .bind(f.created_before_ms)
                .bind(&label_name)
                .bind(&label_value)
                .bind(cursor_ms)
                .bind(&cursor_id)
                .bind(limit + 1)
                .fetch_all(p).await.map_err(db_error)?;
            rows.iter().map(row_to_job).collect::<Result<Vec<_>, _>>()?
        });
        let more = rows.len() as i64 > limit;
        let jobs: Vec<Job> = rows
            .into_iter()
            .take(limit as usize)
            .map(|r| r.job)
            .collect();
        let next_cursor = if more {
            jobs.last()
                .map(|j| encode_cursor(j.created_at_ms, &j.job_id))
        } else {
            None
        };
        Ok(JobList { jobs, next_cursor })
    }

    /// Cancels a job: a queued one at once; a running one by asking the data
    /// plane to stop it (its worker then records `cancelled`). A finished
    /// job -> 409 `job_finished`.
    pub async fn cancel(&self, identity: &Identity, id: &JobId) -> Result<Job, CodedError> {
        let row = self.row(&identity.tenant, id).await?;
        self.authorize_on(identity, "job.cancel", id).await?;
        if row.job.status.is_final() {
            return Err(CodedError::new(
                ErrorCode::JobFinished,
                format!("job {id} already {}", row.job.status.as_str()),
            ));
        }
        let now = now_ms();
        let dialect = self.db.dialect();
        let event = AuditEvent::by(identity, "job.cancel", format!("job/{id}"));
        let changed: u64 = on_db!(&self.db, p => async {
            let mut tx = begin_write!(p, dialect)?;
            // Queued: cancelled here and now. Running: flagged for its worker.
            let queued = sqlx::query(
                "UPDATE jobs SET status = 'cancelled', cancel_requested = 1, finished_ms = $1, updated_ms = $1, \
                 error_code = 'cancelled', error_message = 'cancelled by the client' \
                 WHERE tenant = $2 AND id = $3 AND status = 'queued'")
                .bind(now).bind(identity.tenant.as_str()).bind(id.as_str())
                .execute(&mut *tx).await.map_err(db_error)?.rows_affected();
            let running = sqlx::query(
                "UPDATE jobs SET cancel_requested = 1, updated_ms = $1 \
                 WHERE tenant = $2 AND id = $3 AND status = 'running'")
                .bind(now).bind(identity.tenant.as_str()).bind(id.as_str())
                .execute(&mut *tx).await.map_err(db_error)?.rows_affected();
            if queued + running == 0 {
                tx.rollback().await.map_err(db_error)?;
                return Ok::<u64, CodedError>(0);
            }
            append_tx!(&mut tx, dialect, event.clone().details(json!({
                "state": if queued > 0 { "queued" } else { "running" },
            })))?;
            tx.commit().await.map_err(db_error)?;
            Ok(queued * 2 + running)
        }.await)?;
        match changed {
            0 => {
                // It finished between the read and the update.
                let job = self.row(&identity.tenant, id).await?.job;
                Err(CodedError::new(
                    ErrorCode::JobFinished,
                    format!("job {id} already {}", job.status.as_str()),
                ))
            }
            1 => {
                // Running: stop it in the data plane. If the data plane cannot
                // be reached the flag stays, and the job's worker records the
                // cancellation when its run returns.
                if let Err(e) = self.dp.cancel_job(&identity.tenant, id).await {
                    tracing::warn!(job = %id, error = %e, "cancel did not reach the data plane yet");
                }
                self.wait(identity, id, Duration::from_secs(5)).await
            }
            _ => {
                self.metrics.job_queue_depth.dec();
                let _ = self.finished.send(id.to_string());
                self.metrics
                    .jobs_finished
                    .get_or_create(&crate::metrics::StatusLabel {
                        status: "cancelled".into(),
                    })
                    .inc();
                Ok(self.row(&identity.tenant, id).await?.job)
            }
        }
    }
}

/// Packages: at most `MAX_PACKAGES` (the data plane's cap too), each
/// named once and at most 200 bytes; the data plane checks the rest
/// (syntax, allowlist, normalised duplicates) before installing anything.
pub(crate) fn validate_packages(packages: Option<&[String]>) -> Result<(), CodedError> {
    use shared::dataplane::MAX_PACKAGES;
    let bad = |m: String| CodedError::new(ErrorCode::InvalidArgument, m);
    let Some(packages) = packages else {
        return Ok(());
    };
    if packages.len() > MAX_PACKAGES {
        return Err(bad(format!(
            "{} packages requested; at most {MAX_PACKAGES} are allowed",
            packages.len()
        )));
    }
    let mut seen = std::collections::BTreeSet::new();
    for p in packages {
        if p.len() > 200 {
            return Err(bad("a package entry is longer than 200 bytes".into()));
        }
        if !seen.insert(p.trim()) {
            return Err(bad(format!("package {p:?} is listed more than once")));
        }
    }
    Ok(())
}

/// Labels: at most 32, names 1-63 of `[A-Za-z0-9._-]`, values up to 256.
fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), CodedError> {
    let bad = |m: String| CodedError::new(ErrorCode::InvalidArgument, m);
    if labels.len() > 32 {
        return Err(bad("at most 32 labels".into()));
    }
    for (k, v) in labels {
        if k.is_empty()
            || k.len() > 63
            || !k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        {
            return Err(bad(format!(
                "label name {k:?}: 1-63 characters of letters, digits, '.', '_', '-'"
            )));
        }
        if v.len() > 256 {
            return Err(bad(format!("label {k}: value longer than 256 bytes")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let c = encode_cursor(1700, "job_abc");
        assert_eq!(decode_cursor(&c).unwrap(), (1700, "job_abc".into()));
        for bad in ["", "!!!", "bm8tY29sb24"] {
            assert_eq!(
                decode_cursor(bad).unwrap_err().code,
                ErrorCode::InvalidArgument,
                "{bad}"
            );
        }
    }

    /// Issue 15 §7: 1,500 copies of one package name reached the data
    /// plane; the list is capped and duplicates refused here too.
    #[test]
    fn package_lists_are_capped() {
        let ok: Vec<String> = (0..shared::dataplane::MAX_PACKAGES)
            .map(|i| format!("p{i}"))
            .collect();
        validate_packages(Some(&ok)).unwrap();
        validate_packages(None).unwrap();
        let over: Vec<String> = (0..=shared::dataplane::MAX_PACKAGES)
            .map(|i| format!("p{i}"))
            .collect();
        let dups = vec!["six".to_owned(); 1500];
        for bad in [over, dups, vec!["x".repeat(201)]] {
            assert_eq!(
                validate_packages(Some(&bad)).unwrap_err().code,
                ErrorCode::InvalidArgument
            );
        }
    }

    #[test]
    fn labels_are_checked() {
        let ok: BTreeMap<String, String> = [("team".into(), "ml".into())].into();
        validate_labels(&ok).unwrap();
        for (k, v) in [("", "x"), ("has space", "x"), ("k", &"v".repeat(300)[..])] {
            let m: BTreeMap<String, String> = [(k.to_string(), v.to_string())].into();
            assert!(validate_labels(&m).is_err(), "{k:?}");
        }
    }
}
