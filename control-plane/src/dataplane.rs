//! The way out to the data plane: the typed client from `shared`, a
//! short-lived service credential per tenant (HS256, the data plane's
//! `AUTH_JWT_SECRET`), and the mapping of its failures to this API's codes.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::Stream;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use shared::CodedError;
use shared::ErrorCode;
use shared::agent::{FileList, Limits, StepResult};
use shared::client::{
    ArtifactDownload, ClientError, DataPlaneClient, PathStream, StepEvent, TenantClient,
};
use shared::dataplane::{
    ArtifactFilter, ArtifactInfo, ArtifactList, ArtifactMeta, CreateSession, JobResult, RunJob,
    RunStep, RuntimeInfo, ServiceClaims, SessionView,
};
use shared::ids::{ArtifactId, JobId, SessionId, TenantId};

use crate::Config;

/// Lifetime of a minted service credential; reused until a minute is left.
const CREDENTIAL_TTL: Duration = Duration::from_secs(300);
/// How long the runtime list is trusted before it is fetched again.
const RUNTIMES_TTL: Duration = Duration::from_secs(30);

/// The data plane, as the control plane uses it.
#[derive(Clone)]
pub struct DataPlane {
    client: DataPlaneClient,
    key: Arc<EncodingKey>,
    issuer: String,
    audience: String,
    timeout: Duration,
    credentials: Arc<Mutex<HashMap<String, (String, Instant)>>>,
    runtimes: Arc<Mutex<Option<CachedRuntimes>>>,
}

/// The runtime list and when it was fetched.
type CachedRuntimes = (Instant, Vec<RuntimeInfo>);

/// Maps a data-plane failure to this API. Its coded errors pass through
/// (they are the same contract); a refused credential is our
/// misconfiguration, not the caller's fault; anything else means the data
/// plane is unavailable.
pub fn dp_error(e: ClientError) -> CodedError {
    match e {
        ClientError::Api { body, .. } if body.code == ErrorCode::Unauthorized => {
            tracing::error!(message = %body.message, "the data plane refused our service credential: check DATA_PLANE_JWT_SECRET/ISSUER/AUDIENCE");
            CodedError::new(
                ErrorCode::DataPlaneUnavailable,
                "the data plane refused the control plane's credential",
            )
        }
        ClientError::Api { body, .. } => {
            let mut err = CodedError::new(body.code, body.message);
            err.details = body.details;
            err
        }
        ClientError::Protocol { status, detail } => CodedError::new(
            ErrorCode::DataPlaneUnavailable,
            format!("the data plane answered outside its contract ({status}): {detail}"),
        ),
        // Never the data plane's address: internal URLs stay inside.
        ClientError::Transport(e) => CodedError::new(
            ErrorCode::DataPlaneUnavailable,
            format!("the data plane cannot be reached: {}", e.without_url()),
        ),
    }
}

impl DataPlane {
    /// A client of `DATA_PLANE_URL` holding the service-credential key.
    pub fn new(config: &Config) -> Result<DataPlane, String> {
        let secret = config
            .data_plane_secret
            .as_deref()
            .ok_or("DATA_PLANE_JWT_SECRET is required")?;
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(2))
            .pool_idle_timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| format!("building the data-plane client: {e}"))?;
        Ok(DataPlane {
            client: DataPlaneClient::with_http(&config.data_plane_url, http)
                .with_timeout(config.data_plane_timeout),
            key: Arc::new(EncodingKey::from_secret(secret.as_bytes())),
            issuer: config.data_plane_issuer.clone(),
            audience: config.data_plane_audience.clone(),
            timeout: config.data_plane_timeout,
            credentials: Default::default(),
            runtimes: Default::default(),
        })
    }

    /// Bound on one call, beyond a step's own timeout.
    pub fn call_timeout(&self) -> Duration {
        self.timeout
    }

    /// The service credential for `tenant`, minted or reused.
    fn credential(&self, tenant: &str) -> Result<String, CodedError> {
        let mut cache = self
            .credentials
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some((token, until)) = cache.get(tenant)
            && *until > Instant::now() + Duration::from_secs(60)
        {
            return Ok(token.clone());
        }
        let now = jsonwebtoken::get_current_timestamp();
        let claims = ServiceClaims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: "control-plane".into(),
            tenant: tenant.to_owned(),
            exp: now + CREDENTIAL_TTL.as_secs(),
            nbf: None,
            iat: Some(now),
        };
        let token = jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &self.key)
            .map_err(|e| CodedError::new(ErrorCode::Internal, format!("signing: {e}")))?;
        if cache.len() > 10_000 {
            cache.clear();
        }
        cache.insert(
            tenant.to_owned(),
            (token.clone(), Instant::now() + CREDENTIAL_TTL),
        );
        Ok(token)
    }

    fn scoped(&self, tenant: &str) -> Result<TenantClient, CodedError> {
        let token = self.credential(tenant)?;
        Ok(self
            .client
            .with_context(
                shared::server::current_request_id(),
                shared::server::current_traceparent(),
            )
            .as_tenant(&token))
    }

    /// The data plane answers its readiness probe.
    pub async fn ready(&self) -> Result<(), CodedError> {
        self.client.ready().await.map(|_| ()).map_err(dp_error)
    }

    /// The runtimes offered (cached for a short while).
    pub async fn runtimes(&self, tenant: &str) -> Result<Vec<RuntimeInfo>, CodedError> {
        if let Some((at, list)) = self
            .runtimes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            && at.elapsed() < RUNTIMES_TTL
        {
            return Ok(list.clone());
        }
        let list = self
            .scoped(tenant)?
            .runtimes()
            .await
            .map_err(dp_error)?
            .runtimes;
        *self
            .runtimes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) =
            Some((Instant::now(), list.clone()));
        Ok(list)
    }

    /// Refuses an unknown runtime or a limit above its maximum with a 400,
    /// before anything is queued or created. When the data plane cannot be
    /// asked, the check is left to it (a job then fails with the code).
    pub async fn check_runtime(
        &self,
        runtime: &str,
        limits: Option<&Limits>,
        timeout_ms: Option<u64>,
    ) -> Result<(), CodedError> {
        let list = match self.runtimes("control-plane").await {
            Ok(list) => list,
            Err(e) if e.code == ErrorCode::DataPlaneUnavailable => return Ok(()),
            Err(e) => return Err(e),
        };
        let Some(info) = list.iter().find(|r| r.name == runtime) else {
            let names: Vec<&str> = list.iter().map(|r| r.name.as_str()).collect();
            return Err(CodedError::new(
                ErrorCode::UnknownRuntime,
                format!(
                    "unknown runtime {runtime:?}; available: {}",
                    names.join(", ")
                ),
            ));
        };
        let max = &info.max_limits;
        let mut over = Vec::new();
        if let Some(l) = limits {
            for (name, asked, max) in [
                ("memoryMb", l.memory_mb, max.memory_mb),
                ("cpuMillicores", l.cpu_millicores, max.cpu_millicores),
                ("maxProcesses", l.max_processes, max.max_processes),
                ("diskMb", l.disk_mb, max.disk_mb),
                ("timeoutMs", l.timeout_ms, max.timeout_ms),
                ("maxOutputBytes", l.max_output_bytes, max.max_output_bytes),
            ] {
                if let Some(v) = asked
                    && v > max
                {
                    over.push(format!("{name} {v} > {max}"));
                }
            }
        }
        if let Some(t) = timeout_ms
            && t > max.timeout_ms
        {
            over.push(format!("timeoutMs {t} > {}", max.timeout_ms));
        }
        if !over.is_empty() {
            return Err(CodedError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "above the maximum of runtime {runtime}: {}",
                    over.join(", ")
                ),
            ));
        }
        Ok(())
    }

    /// Runs a job (idempotent by its id in the data plane).
    pub async fn run_job(
        &self,
        tenant: &TenantId,
        job: RunJob,
        timeout: Duration,
    ) -> Result<JobResult, ClientError> {
        let scoped = match self.scoped(tenant) {
            Ok(s) => s,
            Err(e) => {
                return Err(ClientError::Protocol {
                    status: 500,
                    detail: e.message,
                });
            }
        };
        scoped.run_job(&job, timeout).await
    }

    /// Stops a running job.
    pub async fn cancel_job(&self, tenant: &TenantId, id: &JobId) -> Result<(), CodedError> {
        self.scoped(tenant)?
            .cancel_job(id)
            .await
            .map(|_| ())
            .map_err(dp_error)
    }

    pub async fn create_session(
        &self,
        tenant: &TenantId,
        req: CreateSession,
    ) -> Result<SessionView, CodedError> {
        self.scoped(tenant)?
            .create_session(&req)
            .await
            .map_err(dp_error)
    }

    pub async fn get_session(
        &self,
        tenant: &TenantId,
        id: &SessionId,
    ) -> Result<SessionView, CodedError> {
        self.scoped(tenant)?.get_session(id).await.map_err(dp_error)
    }

    pub async fn list_sessions(&self, tenant: &TenantId) -> Result<Vec<SessionView>, CodedError> {
        Ok(self
            .scoped(tenant)?
            .list_sessions()
            .await
            .map_err(dp_error)?
            .sessions)
    }

    pub async fn delete_session(
        &self,
        tenant: &TenantId,
        id: &SessionId,
    ) -> Result<(), CodedError> {
        self.scoped(tenant)?
            .delete_session(id)
            .await
            .map_err(dp_error)
    }

    pub async fn step(
        &self,
        tenant: &TenantId,
        id: &SessionId,
        step: RunStep,
        step_timeout: Duration,
    ) -> Result<StepResult, CodedError> {
        self.scoped(tenant)?
            .step(id, &step, step_timeout)
            .await
            .map_err(dp_error)
    }

    pub async fn step_stream(
        &self,
        tenant: &TenantId,
        id: &SessionId,
        step: RunStep,
        step_timeout: Duration,
    ) -> Result<impl Stream<Item = Result<StepEvent, ClientError>> + Send + 'static, CodedError>
    {
        self.scoped(tenant)?
            .step_stream(id, &step, step_timeout)
            .await
            .map_err(dp_error)
    }

    pub async fn list_files(
        &self,
        tenant: &TenantId,
        id: &SessionId,
    ) -> Result<FileList, CodedError> {
        self.scoped(tenant)?
            .list_files(id, "")
            .await
            .map_err(dp_error)
    }

    pub async fn read_path(
        &self,
        tenant: &str,
        id: &str,
        path: &str,
    ) -> Result<PathStream, CodedError> {
        // Streamed: a file's bytes are passed on as they arrive, never held whole.
        self.scoped(tenant)?
            .open_path(id, path)
            .await
            .map_err(dp_error)
    }

    pub async fn write_file(
        &self,
        tenant: &TenantId,
        id: &SessionId,
        path: &str,
        body: Bytes,
    ) -> Result<(), CodedError> {
        self.scoped(tenant)?
            .write_file(id, path, body)
            .await
            .map_err(dp_error)
    }

    pub async fn delete_file(
        &self,
        tenant: &TenantId,
        id: &SessionId,
        path: &str,
    ) -> Result<(), CodedError> {
        self.scoped(tenant)?
            .delete_file(id, path)
            .await
            .map_err(dp_error)
    }

    pub async fn artifact_info(
        &self,
        tenant: &TenantId,
        id: &ArtifactId,
    ) -> Result<ArtifactInfo, CodedError> {
        self.scoped(tenant)?
            .artifact_info(id)
            .await
            .map_err(dp_error)
    }

    pub async fn artifact_download(
        &self,
        tenant: &TenantId,
        id: &ArtifactId,
    ) -> Result<impl Stream<Item = Result<Bytes, ClientError>> + Send + 'static, CodedError> {
        self.scoped(tenant)?
            .download_artifact(id)
            .await
            .map(|d| d.into_stream())
            .map_err(dp_error)
    }

    /// Opens an artifact's bytes, all of them or `start..=end` (a range the
    /// caller has checked against the size): the data plane reads and
    /// decrypts only the chunks that hold it.
    pub async fn artifact_open(
        &self,
        tenant: &TenantId,
        id: &ArtifactId,
        range: Option<(u64, u64)>,
    ) -> Result<ArtifactDownload, CodedError> {
        self.scoped(tenant)?
            .download_artifact_range(id, range)
            .await
            .map_err(dp_error)
    }

    /// One page of the tenant's artifacts.
    pub async fn artifact_list(
        &self,
        tenant: &TenantId,
        filter: &ArtifactFilter,
    ) -> Result<ArtifactList, CodedError> {
        self.scoped(tenant)?
            .list_artifacts(filter)
            .await
            .map_err(dp_error)
    }

    /// Stores an artifact: `body` is passed on to the data plane chunk by
    /// chunk as it arrives, never held whole (the data plane bounds it by
    /// its `ARTIFACT_MAX_BYTES`: 413 `payload_too_large`, and by the
    /// tenant's quota, `quota_bytes` or its `TENANT_MAX_ARTIFACT_BYTES`:
    /// 429 `tenant_quota_exceeded`).
    pub async fn artifact_upload<S, E>(
        &self,
        tenant: &TenantId,
        name: &str,
        meta: &ArtifactMeta,
        quota_bytes: Option<u64>,
        body: S,
    ) -> Result<ArtifactInfo, CodedError>
    where
        S: Stream<Item = Result<Bytes, E>> + Send + 'static,
        E: Into<Box<dyn std::error::Error + Send + Sync>> + 'static,
    {
        self.scoped(tenant)?
            .upload_artifact_within(name, meta, quota_bytes, reqwest::Body::wrap_stream(body))
            .await
            .map_err(dp_error)
    }

    pub async fn artifact_delete(
        &self,
        tenant: &TenantId,
        id: &ArtifactId,
    ) -> Result<(), CodedError> {
        self.scoped(tenant)?
            .delete_artifact(id)
            .await
            .map_err(dp_error)
    }
}

#[cfg(test)]
mod error_tests {
    use super::*;

    /// An unreachable data plane is a coded 503 whose message names no
    /// internal address (issue 15 §4: the URL once reached the caller).
    #[tokio::test]
    async fn unreachable_data_plane_names_no_address() {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let err = DataPlaneClient::new(&base)
            .unwrap()
            .as_tenant("jwt")
            .open_path("ses-1", "a.txt")
            .await
            .unwrap_err();
        let api = dp_error(err);
        assert_eq!(api.code, ErrorCode::DataPlaneUnavailable);
        assert!(!api.message.contains("127.0.0.1"), "{}", api.message);
        assert!(!api.message.contains("http://"), "{}", api.message);
    }
}
