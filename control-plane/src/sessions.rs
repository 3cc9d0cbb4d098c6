//! Sessions: stateful sandboxes in the data plane, fronted here by policy,
//! audit and a record of each session and its steps. The data plane stays
//! the authority on a session's sandbox; this module keeps who created it
//! and the step history (`GET /v1/sessions/{id}/steps`).
//!
//! Audit of a step is written ahead (`step.run`, outcome `started`: refused
//! if it cannot be written, so no code runs unrecorded) and completed
//! (`step.finish` with runtime, status and duration, never the output).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use serde_json::json;
use shared::CodedError;
use shared::ErrorCode;
use shared::agent::{FileList, StepResult};
use shared::client::{ArtifactDownload, ClientError, PathStream, StepEvent};
use shared::controlplane::{SessionRequest, SessionStepRequest};
use shared::dataplane::{
    ArtifactFilter, ArtifactInfo, ArtifactList, ArtifactMeta, CreateSession, RunStep, SessionView,
};
use shared::ids::{ArtifactId, SessionId};
use utoipa::ToSchema;

use crate::audit::{self, AuditEvent, AuditLog};
use crate::dataplane::DataPlane;
use crate::identity::Identity;
use crate::policy::{PolicyInput, PolicyService};
use crate::storage::sessions::{NewSession, NewStep};
use crate::storage::{self, Db, new_id, now_ms};

/// Code and output kept per step in the history (the rest is cut).
const HISTORY_CAP: usize = 64 * 1024;

/// A step as the history keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepRecord {
    pub step_id: String,
    /// Position in the session, from 1.
    pub seq: i64,
    /// `ok`, `error`, `timeout`, `killed`, or `failed` when it never ran.
    pub status: String,
    pub duration_ms: i64,
    /// The code, cut at 64 KiB.
    pub code: String,
    /// The step's result (a `StepResult`, with stdout and stderr cut at 64
    /// KiB each), or the coded error body of a step that never ran.
    pub result: serde_json::Value,
    pub created_at_ms: i64,
}

/// `GET /v1/sessions/{id}/steps`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct StepHistory {
    pub steps: Vec<StepRecord>,
}

/// Sessions of every tenant, scoped per call.
#[derive(Clone)]
pub struct SessionService {
    db: Db,
    policy: PolicyService,
    dp: DataPlane,
    audit: AuditLog,
    limits: std::sync::Arc<crate::limits::Limits>,
}

fn cut(s: &str, cap: usize) -> String {
    if s.len() <= cap {
        return s.to_owned();
    }
    let mut end = cap;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…[cut]", &s[..end])
}

fn session_not_found(id: &str) -> CodedError {
    CodedError::new(ErrorCode::SessionNotFound, format!("no session {id}"))
}

/// The policy input of a session request: what it asks for.
fn policy_request(req: &SessionRequest) -> serde_json::Value {
    json!({
        "runtime": req.runtime.as_deref().unwrap_or(crate::DEFAULT_RUNTIME),
        "limits": req.limits,
        "ttlSeconds": req.ttl_seconds,
        "packages": req.packages.clone().unwrap_or_default(),
        "egress": req.egress.clone().unwrap_or_default(),
        "secrets": req.secrets.clone().unwrap_or_default(),
    })
}

impl SessionService {
    pub fn new(
        db: Db,
        policy: PolicyService,
        dp: DataPlane,
        audit: AuditLog,
        limits: std::sync::Arc<crate::limits::Limits>,
    ) -> SessionService {
        SessionService {
            db,
            policy,
            dp,
            audit,
            limits,
        }
    }

    async fn authorize(
        &self,
        identity: &Identity,
        action: &str,
        resource: serde_json::Value,
        request: serde_json::Value,
    ) -> Result<crate::policy::Decision, CodedError> {
        self.policy
            .authorize(
                identity,
                &PolicyInput {
                    action: action.into(),
                    resource,
                    request,
                },
            )
            .await
    }

    /// Creates a session: policy, then a sandbox in the data plane, then its
    /// record and audit event together. If those cannot be written the
    /// sandbox is destroyed again.
    pub async fn create(
        &self,
        identity: &Identity,
        req: SessionRequest,
    ) -> Result<SessionView, CodedError> {
        self.create_with(identity, req, true).await
    }

    /// As [`SessionService::create`]; `take_creation_token` is false for a
    /// workflow's session, whose submission took the creation token
    /// already (the session quota is checked either way).
    pub(crate) async fn create_with(
        &self,
        identity: &Identity,
        req: SessionRequest,
        take_creation_token: bool,
    ) -> Result<SessionView, CodedError> {
        crate::orchestration::jobs::validate_packages(req.packages.as_deref())?;
        crate::secrets::validate(req.secrets.as_deref(), req.env.as_ref())?;
        let runtime = req
            .runtime
            .clone()
            .unwrap_or_else(|| crate::DEFAULT_RUNTIME.to_owned());
        self.dp
            .check_runtime(
                &runtime,
                req.limits.as_ref(),
                req.limits.as_ref().and_then(|l| l.timeout_ms),
            )
            .await?;
        let decision = self
            .authorize(
                identity,
                "session.create",
                json!({"type": "session"}),
                policy_request(&req),
            )
            .await?;
        crate::policy::refuse_unbuilt(req.egress.as_deref())?;
        // Quotas after validation and policy, so a refused request costs
        // the tenant no token (crate::limits).
        self.limits.admit_session(identity).await?;
        if take_creation_token {
            self.limits.admit_creation(identity).await?;
        }
        let view = self
            .dp
            .create_session(
                &identity.tenant,
                CreateSession {
                    tenant: None,
                    runtime: Some(runtime.clone()),
                    ttl_seconds: req.ttl_seconds,
                    limits: req.limits.clone(),
                    env: req.env.clone(),
                    packages: req.packages.clone(),
                    secrets: req.secrets.clone(),
                },
            )
            .await?;
        let ev = AuditEvent::by(
            identity,
            "session.create",
            format!("session/{}", view.session_id),
        )
        .details(json!({
            "runtime": view.runtime,
            "isolation": view.isolation,
            "warm": view.warm,
            "packages": req.packages.clone().unwrap_or_default(),
            "secrets": req.secrets.clone().unwrap_or_default(),
            "policyVersion": decision.policy_version,
        }));
        let record = NewSession {
            id: &view.session_id,
            tenant: identity.tenant.as_str(),
            subject: &identity.subject,
            app: identity.app.as_deref(),
            agent: identity.agent.as_deref(),
            runtime: &view.runtime,
            timeout_ms: view.limits.timeout_ms as i64,
            created_ms: view.created_at_ms as i64,
            expires_ms: view.expires_at_ms as i64,
        };
        let recorded: Result<(), CodedError> = async {
            let mut tx = self.db.begin_write().await?;
            storage::sessions::insert(&mut tx, &record).await?;
            audit::append(&mut tx, ev).await?;
            tx.commit().await?;
            Ok(())
        }
        .await;
        if let Err(e) = recorded {
            let undone = match SessionId::parse(view.session_id.as_str()) {
                Ok(sid) => self.dp.delete_session(&identity.tenant, &sid).await,
                Err(e) => Err(CodedError::new(
                    ErrorCode::DataPlaneUnavailable,
                    e.to_string(),
                )),
            };
            if let Err(cleanup) = undone {
                tracing::error!(session = %view.session_id, error = %cleanup,
                    "an unrecorded session could not be destroyed; the data plane's TTL will reap it");
            }
            return Err(if e.code == ErrorCode::Internal {
                CodedError::new(ErrorCode::AuditUnavailable, e.message)
            } else {
                e
            });
        }
        Ok(view)
    }

    /// One session of the caller's tenant.
    pub async fn get(
        &self,
        identity: &Identity,
        id: &SessionId,
    ) -> Result<SessionView, CodedError> {
        self.authorize(
            identity,
            "session.read",
            json!({"type": "session", "id": id}),
            json!({}),
        )
        .await?;
        self.dp.get_session(&identity.tenant, id).await
    }

    /// The caller's tenant's live sessions.
    pub async fn list(&self, identity: &Identity) -> Result<Vec<SessionView>, CodedError> {
        self.authorize(
            identity,
            "session.read",
            json!({"type": "session"}),
            json!({}),
        )
        .await?;
        self.dp.list_sessions(&identity.tenant).await
    }

    /// Destroys a session and its workspace (recorded first: a deletion that
    /// cannot be audited does not happen).
    pub async fn delete(&self, identity: &Identity, id: &SessionId) -> Result<(), CodedError> {
        self.authorize(
            identity,
            "session.delete",
            json!({"type": "session", "id": id}),
            json!({}),
        )
        .await?;
        // 404 before anything is recorded for a session that is not there.
        self.session_runtime(&identity.tenant, id).await?;
        self.dp.get_session(&identity.tenant, id).await?;
        self.audit
            .record(AuditEvent::by(
                identity,
                "session.delete",
                format!("session/{id}"),
            ))
            .await?;
        self.dp.delete_session(&identity.tenant, id).await?;
        let r = storage::sessions::mark_deleted(&self.db, &identity.tenant, id.as_str(), now_ms())
            .await;
        if let Err(e) = r {
            tracing::warn!(session = %id, error = %e, "could not mark the session deleted");
        }
        Ok(())
    }

    /// Runs a step: write-ahead audit, the step in the data plane, then the
    /// history row and the completion event together.
    pub async fn step(
        &self,
        identity: &Identity,
        session_id: &SessionId,
        req: SessionStepRequest,
    ) -> Result<StepResult, CodedError> {
        let (step_id, run, runtime, timeout) = self.begin_step(identity, session_id, &req).await?;
        let outcome = self
            .dp
            .step(&identity.tenant, session_id, run, timeout)
            .await;
        self.finish_step(
            identity, session_id, &step_id, &req.code, &runtime, &outcome,
        )
        .await?;
        outcome
    }

    /// As [`SessionService::step`], streaming stdout and stderr as they
    /// come; the completion is recorded when the result event passes.
    pub async fn step_stream(
        &self,
        identity: &Identity,
        session_id: &SessionId,
        req: SessionStepRequest,
    ) -> Result<impl Stream<Item = Result<StepEvent, ClientError>> + Send + 'static, CodedError>
    {
        use futures::StreamExt;
        let (step_id, run, runtime, timeout) = self.begin_step(identity, session_id, &req).await?;
        let events = self
            .dp
            .step_stream(&identity.tenant, session_id, run, timeout)
            .await?;
        let this = self.clone();
        let identity = identity.clone();
        let session_id = session_id.to_owned();
        let code = req.code;
        Ok(events.then(move |ev| {
            let this = this.clone();
            let identity = identity.clone();
            let session_id = session_id.clone();
            let step_id = step_id.clone();
            let code = code.clone();
            let runtime = runtime.clone();
            async move {
                let outcome = match &ev {
                    Ok(StepEvent::Result(r)) => Some(Ok((**r).clone())),
                    Ok(StepEvent::Error(body)) => {
                        Some(Err(CodedError::new(body.code, body.message.clone())))
                    }
                    Err(e) => Some(Err(CodedError::new(
                        ErrorCode::DataPlaneUnavailable,
                        e.to_string(),
                    ))),
                    _ => None,
                };
                if let Some(outcome) = outcome
                    && let Err(e) = this
                        .finish_step(&identity, &session_id, &step_id, &code, &runtime, &outcome)
                        .await
                {
                    return Ok(StepEvent::Error(shared::ErrorBody {
                        code: e.code,
                        message: e.message,
                        request_id: shared::server::current_request_id(),
                        details: None,
                    }));
                }
                ev
            }
        }))
    }

    /// Policy and the write-ahead audit event of a step; returns its id, the
    /// data-plane request and the session's runtime.
    async fn begin_step(
        &self,
        identity: &Identity,
        session_id: &str,
        req: &SessionStepRequest,
    ) -> Result<(String, RunStep, String, Duration), CodedError> {
        if req.code.is_empty() {
            return Err(CodedError::new(ErrorCode::InvalidArgument, "code is empty"));
        }
        let (runtime, session_timeout) = self.session_runtime(&identity.tenant, session_id).await?;
        let timeout = req
            .timeout_ms
            .map_or(session_timeout, Duration::from_millis);
        let decision = self
            .authorize(
                identity,
                "step.run",
                json!({"type": "session", "id": session_id}),
                json!({"runtime": runtime, "timeoutMs": req.timeout_ms, "mode": req.mode}),
            )
            .await?;
        let step_id = new_id("stp");
        // The request's span (shared::server) carries the step's ids.
        tracing::Span::current()
            .record("session_id", session_id)
            .record("step_id", step_id.as_str());
        self.audit
            .record(
                AuditEvent::by(
                    identity,
                    "step.run",
                    format!("session/{session_id}/step/{step_id}"),
                )
                .outcome("started")
                .details(json!({
                    "runtime": runtime,
                    "codeBytes": req.code.len(),
                    "policyVersion": decision.policy_version,
                })),
            )
            .await?;
        let run = RunStep {
            step_id: Some(step_id.clone()),
            code: req.code.clone(),
            timeout_ms: req.timeout_ms,
            mode: req.mode,
            event: req.event.clone(),
        };
        Ok((step_id, run, runtime, timeout))
    }

    /// The runtime and default step timeout of a session recorded for this
    /// tenant (another tenant's or an unknown id -> 404).
    async fn session_runtime(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<(String, Duration), CodedError> {
        let (runtime, timeout_ms) = storage::sessions::live_runtime(&self.db, tenant, id)
            .await?
            .ok_or_else(|| session_not_found(id))?;
        Ok((
            runtime,
            Duration::from_millis(u64::try_from(timeout_ms).unwrap_or(30_000)),
        ))
    }

    async fn finish_step(
        &self,
        identity: &Identity,
        session_id: &str,
        step_id: &str,
        code: &str,
        runtime: &str,
        outcome: &Result<StepResult, CodedError>,
    ) -> Result<(), CodedError> {
        let (status, duration, result) = match outcome {
            Ok(r) => {
                let mut kept = r.clone();
                kept.stdout = cut(&r.stdout, HISTORY_CAP);
                kept.stderr = cut(&r.stderr, HISTORY_CAP);
                let status = serde_json::to_value(r.status)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default();
                (
                    status,
                    r.duration_ms as i64,
                    serde_json::to_value(&kept).unwrap_or_default(),
                )
            }
            Err(e) => (
                "failed".to_owned(),
                0,
                json!({"code": e.code, "message": e.message}),
            ),
        };
        let ev = AuditEvent::by(
            identity,
            "step.finish",
            format!("session/{session_id}/step/{step_id}"),
        )
        .outcome(if outcome.is_ok() {
            "succeeded"
        } else {
            "failed"
        })
        .details(json!({
            "runtime": runtime,
            "status": status,
            "durationMs": duration,
            "error": outcome.as_ref().err().map(|e| e.code),
        }));
        let code = cut(code, HISTORY_CAP);
        let result = result.to_string();
        let step = NewStep {
            id: step_id,
            session_id,
            tenant: identity.tenant.as_str(),
            status: &status,
            duration_ms: duration,
            code: &code,
            result: &result,
            created_ms: now_ms(),
        };
        let recorded: Result<(), CodedError> = async {
            let mut tx = self.db.begin_write().await?;
            storage::sessions::insert_step(&mut tx, &step).await?;
            audit::append(&mut tx, ev).await?;
            tx.commit().await?;
            Ok(())
        }
        .await;
        recorded.map_err(|e| {
            CodedError::new(
                ErrorCode::AuditUnavailable,
                format!(
                    "the step ran but its record could not be written: {}",
                    e.message
                ),
            )
        })
    }

    /// The step history of a session of the caller's tenant.
    pub async fn steps(
        &self,
        identity: &Identity,
        session_id: &SessionId,
    ) -> Result<StepHistory, CodedError> {
        self.authorize(
            identity,
            "step.read",
            json!({"type": "session", "id": session_id}),
            json!({}),
        )
        .await?;
        if !storage::sessions::exists(&self.db, &identity.tenant, session_id.as_str()).await? {
            return Err(session_not_found(session_id));
        }
        let steps =
            storage::sessions::steps(&self.db, &identity.tenant, session_id.as_str()).await?;
        Ok(StepHistory { steps })
    }

    /// Lists the workspace's top directory.
    pub async fn list_files(
        &self,
        identity: &Identity,
        id: &SessionId,
    ) -> Result<FileList, CodedError> {
        self.file_policy(identity, "file.read", id, "").await?;
        self.session_runtime(&identity.tenant, id).await?;
        self.dp.list_files(&identity.tenant, id).await
    }

    /// A file's bytes (streamed), or a directory's listing.
    pub async fn read_path(
        &self,
        identity: &Identity,
        id: &str,
        path: &str,
    ) -> Result<PathStream, CodedError> {
        self.file_policy(identity, "file.read", id, path).await?;
        self.session_runtime(&identity.tenant, id).await?;
        self.dp.read_path(&identity.tenant, id, path).await
    }

    /// Writes a file (recorded first).
    pub async fn write_file(
        &self,
        identity: &Identity,
        id: &SessionId,
        path: &str,
        body: Bytes,
    ) -> Result<(), CodedError> {
        self.file_policy(identity, "file.write", id, path).await?;
        self.session_runtime(&identity.tenant, id).await?;
        self.audit
            .record(
                AuditEvent::by(identity, "file.write", format!("session/{id}/files/{path}"))
                    .details(json!({"bytes": body.len()})),
            )
            .await?;
        self.dp.write_file(&identity.tenant, id, path, body).await
    }

    /// Deletes a file (recorded first).
    pub async fn delete_file(
        &self,
        identity: &Identity,
        id: &SessionId,
        path: &str,
    ) -> Result<(), CodedError> {
        self.file_policy(identity, "file.delete", id, path).await?;
        self.session_runtime(&identity.tenant, id).await?;
        self.audit
            .record(AuditEvent::by(
                identity,
                "file.delete",
                format!("session/{id}/files/{path}"),
            ))
            .await?;
        self.dp.delete_file(&identity.tenant, id, path).await
    }

    async fn file_policy(
        &self,
        identity: &Identity,
        action: &str,
        id: &str,
        path: &str,
    ) -> Result<(), CodedError> {
        self.authorize(
            identity,
            action,
            json!({"type": "file", "session": id, "path": path}),
            json!({}),
        )
        .await
        .map(|_| ())
    }

    /// An artifact's metadata (recorded: artifact access is audited).
    pub async fn artifact_info(
        &self,
        identity: &Identity,
        id: &ArtifactId,
    ) -> Result<ArtifactInfo, CodedError> {
        self.authorize(
            identity,
            "artifact.read",
            json!({"type": "artifact", "id": id}),
            json!({}),
        )
        .await?;
        let info = self.dp.artifact_info(&identity.tenant, id).await?;
        Ok(info)
    }

    /// An artifact's bytes, streamed; the access is recorded first.
    pub async fn artifact_download(
        &self,
        identity: &Identity,
        id: &ArtifactId,
    ) -> Result<
        (
            ArtifactInfo,
            impl Stream<Item = Result<Bytes, ClientError>> + Send + 'static,
        ),
        CodedError,
    > {
        let info = self.artifact_info(identity, id).await?;
        self.audit
            .record(
                AuditEvent::by(identity, "artifact.read", format!("artifact/{id}"))
                    .details(json!({"name": info.name, "size": info.size})),
            )
            .await?;
        let body = self.dp.artifact_download(&identity.tenant, id).await?;
        Ok((info, body))
    }

    /// An artifact's bytes, all or `start..=end` of `info` (which
    /// [`Self::artifact_info`] gave, policy checked), streamed; the access
    /// is recorded first.
    pub async fn artifact_open(
        &self,
        identity: &Identity,
        info: &ArtifactInfo,
        range: Option<(u64, u64)>,
    ) -> Result<ArtifactDownload, CodedError> {
        let id = ArtifactId::parse(info.artifact_id.as_str())
            .map_err(|e| CodedError::new(ErrorCode::ArtifactNotFound, e.to_string()))?;
        self.audit
            .record(
                AuditEvent::by(identity, "artifact.read", format!("artifact/{id}"))
                    .details(json!({"name": info.name, "size": info.size, "range": range})),
            )
            .await?;
        self.dp.artifact_open(&identity.tenant, &id, range).await
    }

    /// One page of the caller's artifacts (policy action `artifact.read`,
    /// the filters as its request).
    pub async fn artifact_list(
        &self,
        identity: &Identity,
        filter: &ArtifactFilter,
    ) -> Result<ArtifactList, CodedError> {
        self.authorize(
            identity,
            "artifact.read",
            json!({"type": "artifact"}),
            json!({
                "sessionId": filter.session_id,
                "jobId": filter.job_id,
                "workflowId": filter.workflow_id,
                "labels": filter.labels,
            }),
        )
        .await?;
        self.dp.artifact_list(&identity.tenant, filter).await
    }

    /// Stores an artifact whose bytes are streamed through to the data plane
    /// (never held whole; its `ARTIFACT_MAX_BYTES` bounds the size). Policy
    /// action `artifact.write`; recorded first (`started`, refused if the
    /// record fails), then completed with the id, size and digest.
    pub async fn artifact_upload<S, E>(
        &self,
        identity: &Identity,
        name: &str,
        session_id: Option<&SessionId>,
        body: S,
    ) -> Result<ArtifactInfo, CodedError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
    {
        let meta = ArtifactMeta {
            session_id: session_id.map(SessionId::to_string),
            ..ArtifactMeta::default()
        };
        self.artifact_upload_with(identity, name, &meta, None, body)
            .await
    }

    /// As [`Self::artifact_upload`], attached to what `meta` names, with
    /// the size the caller declared (the `size` parameter or the body's
    /// `Content-Length`). Policy sees it as `input.request.size` (`null`
    /// when undeclared; the data plane's `ARTIFACT_MAX_BYTES` bounds every
    /// upload), and a body that outgrows it is cut off: 413.
    pub async fn artifact_upload_with<S, E>(
        &self,
        identity: &Identity,
        name: &str,
        meta: &ArtifactMeta,
        declared: Option<u64>,
        body: S,
    ) -> Result<ArtifactInfo, CodedError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
    {
        let session_id = meta.session_id.as_deref();
        let request = json!({
            "name": name,
            "sessionId": session_id,
            "jobId": meta.job_id,
            "workflowId": meta.workflow_id,
            "labels": meta.labels,
            "size": declared,
        });
        self.authorize(
            identity,
            "artifact.write",
            json!({"type": "artifact", "name": name, "session": session_id}),
            request,
        )
        .await?;
        self.audit
            .record(
                AuditEvent::by(identity, "artifact.write", "artifact")
                    .outcome("started")
                    .details(json!({"name": name, "session": session_id, "size": declared})),
            )
            .await?;
        let over = Arc::new(AtomicBool::new(false));
        let flag = over.clone();
        let mut seen: u64 = 0;
        let body = body.map(move |piece| {
            let piece = piece.map_err(Into::into)?;
            seen += piece.len() as u64;
            match declared {
                Some(max) if seen > max => {
                    flag.store(true, Ordering::Relaxed);
                    Err(Box::<dyn std::error::Error + Send + Sync>::from(
                        "the body is larger than its declared size",
                    ))
                }
                _ => Ok(piece),
            }
        });
        // The tenant's quota on stored bytes (policy may lower the data
        // plane's TENANT_MAX_ARTIFACT_BYTES); the data plane enforces it.
        let quota = self.limits.rates_for(identity).await.max_artifact_bytes;
        let mut result = self
            .dp
            .artifact_upload(&identity.tenant, name, meta, quota, body)
            .await;
        if over.load(Ordering::Relaxed) {
            result = Err(CodedError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "the body is larger than its declared size of {} bytes (size or Content-Length)",
                    declared.unwrap_or(0)
                ),
            ));
        }
        let ev = match &result {
            Ok(info) => AuditEvent::by(
                identity,
                "artifact.write",
                format!("artifact/{}", info.artifact_id),
            )
            .details(json!({"name": name, "session": session_id, "size": info.size, "sha256": info.sha256})),
            Err(e) => AuditEvent::by(identity, "artifact.write", "artifact")
                .outcome("failed")
                .details(json!({"name": name, "session": session_id, "error": e.code})),
        };
        // The bytes are stored (or refused) already: the `started` record
        // stands for them if this one cannot be written.
        if let Err(e) = self.audit.record(ev).await {
            tracing::warn!(code = ?e.code, "artifact.write completion not recorded");
        }
        result
    }

    /// Deletes an artifact (crypto-shredded by the data plane; recorded first).
    pub async fn artifact_delete(
        &self,
        identity: &Identity,
        id: &ArtifactId,
    ) -> Result<(), CodedError> {
        self.authorize(
            identity,
            "artifact.delete",
            json!({"type": "artifact", "id": id}),
            json!({}),
        )
        .await?;
        self.dp.artifact_info(&identity.tenant, id).await?;
        self.audit
            .record(AuditEvent::by(
                identity,
                "artifact.delete",
                format!("artifact/{id}"),
            ))
            .await?;
        self.dp.artifact_delete(&identity.tenant, id).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn history_cuts_on_a_char_boundary() {
        let s = "é".repeat(10);
        let c = cut(&s, 5);
        assert!(c.starts_with("éé"));
        assert!(c.ends_with("[cut]"));
        assert_eq!(cut("short", 10), "short");
    }
}
