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
use shared::controlplane::{Job, JobList, JobRequest, JobStatus};
use shared::ids::JobId;
use tokio::sync::{Notify, broadcast};

use super::idempotency::{Prior, fingerprint};
use crate::audit::{self, AuditEvent};
use crate::dataplane::DataPlane;
use crate::identity::Identity;
use crate::metrics::Metrics;
use crate::policy::{PolicyInput, PolicyService};
use crate::storage::jobs::{CancelMark, KeyClaim, ListQuery, NewJob};
use crate::storage::{self, Db, new_id, now_ms};

pub(crate) use crate::storage::jobs::JobRow;

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
    /// The creation bucket every submission takes a token from.
    pub(crate) limits: Arc<crate::limits::Limits>,
    /// Wakes idle workers of this replica when a job is queued.
    pub(crate) wake: Arc<Notify>,
    /// Job ids that reached a final status on this replica (for long polls).
    pub(crate) finished: broadcast::Sender<String>,
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
        limits: Arc<crate::limits::Limits>,
    ) -> Arc<JobService> {
        let (finished, _) = broadcast::channel(1024);
        Arc::new(JobService {
            db,
            policy,
            dp,
            metrics,
            settings,
            limits,
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
        crate::secrets::validate(req.secrets.as_deref(), req.env.as_ref())?;
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
        crate::policy::refuse_unbuilt(req.egress.as_deref())?;
        let hash = fingerprint(&serde_json::to_value(&req).map_err(|e| {
            CodedError::new(
                ErrorCode::Internal,
                format!("request does not serialize: {e}"),
            )
        })?);
        let now = now_ms();
        let id = new_id("job");
        tracing::Span::current().record("job_id", id.as_str());
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
        let ttl_ms = self.settings.idempotency_ttl.as_millis() as i64;
        let event = AuditEvent::by(identity, "job.submit", format!("job/{id}")).details(json!({
            "runtime": runtime,
            "labels": labels,
            "secrets": req.secrets.clone().unwrap_or_default(),
            "policyVersion": decision.policy_version,
            "idempotencyKey": key.is_some(),
        }));
        let tenant = identity.tenant.as_str();
        // The worker that dispatches the job continues this request's trace.
        let trace_parent = shared::telemetry::current_traceparent();
        let outcome: Result<Submitted, CodedError> = async {
            let mut tx = self.db.begin_write().await?;
            if let Some(key) = &key {
                let claim =
                    storage::jobs::claim_key(&mut tx, tenant, key, &hash, now, now + ttl_ms)
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
            // The creation bucket (crate::limits): after validation, policy
            // and the key, so a replay costs no token; a refusal rolls the
            // key's claim back, so a retry with the same key is a new try.
            if let Err(e) = self.limits.admit_creation(identity).await {
                tx.rollback().await?;
                return Err(e);
            }
            // One tenant cannot fill the queue for everyone (issue 15, s. 5).
            let queued = storage::jobs::count_queued(&mut tx, tenant).await?;
            if queued >= self.settings.tenant_max_queued {
                tx.rollback().await?;
                return Err(CodedError::new(
                    ErrorCode::TenantQuotaExceeded,
                    format!(
                        "the tenant has {queued} jobs queued, at most {}; retry when some have started",
                        self.settings.tenant_max_queued
                    ),
                ));
            }
            storage::jobs::insert(
                &mut tx,
                &NewJob {
                    id: &id,
                    tenant,
                    subject: &identity.subject,
                    app: identity.app.as_deref(),
                    agent: identity.agent.as_deref(),
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
                storage::jobs::complete_key(&mut tx, tenant, key, 202, &body).await?;
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
        storage::jobs::get(&self.db, tenant, id)
            .await?
            .ok_or_else(|| not_found(id))
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
        let cursor = f.cursor.as_deref().map(decode_cursor).transpose()?;
        let rows = storage::jobs::list(
            &self.db,
            identity.tenant.as_str(),
            &ListQuery {
                status: f.status,
                label: f.label.as_ref().map(|(n, v)| (n.as_str(), v.as_str())),
                created_after_ms: f.created_after_ms,
                created_before_ms: f.created_before_ms,
                after: cursor.as_ref().map(|(ms, id)| (*ms, id.as_str())),
                // One more than a page: whether there is a next page.
                limit: limit + 1,
            },
        )
        .await?;
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
        let event = AuditEvent::by(identity, "job.cancel", format!("job/{id}"));
        let tenant = identity.tenant.as_str();
        let changed = async {
            let mut tx = self.db.begin_write().await?;
            let mark = storage::jobs::mark_cancelled(&mut tx, tenant, id.as_str(), now).await?;
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
        match changed {
            CancelMark::Finished => {
                // It finished between the read and the update.
                let job = self.row(&identity.tenant, id).await?.job;
                Err(CodedError::new(
                    ErrorCode::JobFinished,
                    format!("job {id} already {}", job.status.as_str()),
                ))
            }
            CancelMark::Running => {
                // Running: stop it in the data plane. If the data plane cannot
                // be reached the flag stays, and the job's worker records the
                // cancellation when its run returns.
                if let Err(e) = self.dp.cancel_job(&identity.tenant, id).await {
                    tracing::warn!(job = %id, error = %e, "cancel did not reach the data plane yet");
                }
                self.wait(identity, id, Duration::from_secs(5)).await
            }
            CancelMark::Queued => {
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
pub(crate) fn validate_labels(labels: &BTreeMap<String, String>) -> Result<(), CodedError> {
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
