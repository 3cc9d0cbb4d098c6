//! Session routing: the data plane owns each session's record (tenant,
//! runtime, the agent token it generated) and forwards steps and file calls
//! to the agent with that token. Every lookup is scoped by tenant: another
//! tenant's session is indistinguishable from one that does not exist.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use futures::{Stream, StreamExt};
use shared::CodedError;
use shared::ErrorCode;
use shared::agent::{CreateSessionRequest, EffectiveLimits, FileList, StepRequest, StepResult};
use shared::client::{AgentClient, ClientError, PathStream, StepEvent};
use shared::dataplane::{CreateSession, RunStep, SessionView};
use shared::ids::{StepId, TenantId};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::auth::Caller;
use crate::config::AgentAuthMode;
use crate::dependencies::Dependencies;
use crate::metrics::{Metrics, StartLabels, StepLabels};
use crate::registry::{SessionRegistry, StoredSession};
use crate::runtime::{RuntimeBackend, RuntimeRegistry, SandboxHandle};
use crate::workspace::artifacts::{ArtifactError, ArtifactStore};
use crate::workspace::crypto::{CryptoError, SecretKey};

/// How often expired sessions are swept (their artifacts shredded).
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(5);

/// Time allowed beyond a step's own timeout (interrupt grace, restart).
const STEP_MARGIN: Duration = Duration::from_millis(shared::dataplane::STEP_MARGIN_MS);

struct SessionRecord {
    tenant: TenantId,
    runtime: String,
    /// The agent that serves this session (its handle's endpoint): every
    /// call is routed there. Internal; never returned.
    endpoint: String,
    /// The agent token; never logged, never returned.
    token: Option<String>,
    limits: EffectiveLimits,
    isolation: String,
    warm: bool,
    created_ms: u64,
    expires_ms: u64,
    /// The sandbox vanished (found at a restart).
    lost: bool,
}

/// The associated data a session's agent token is sealed under: the tenant,
/// the session and the agent endpoint it is sent to, so a stored record
/// moved to another tenant (or another id), or pointed at another endpoint,
/// does not open. Records written before they carried an endpoint (`None`)
/// were sealed without it; where a record is routed is the backend's say
/// ([`RuntimeBackend::adopt`]; local: its one agent).
fn token_aad(tenant: &str, session_id: &str, endpoint: Option<&str>) -> String {
    match endpoint {
        Some(endpoint) => format!("session:{tenant}/{session_id}@{endpoint}"),
        None => format!("session:{tenant}/{session_id}"),
    }
}

impl SessionRecord {
    fn stored(&self, id: &str, kek: &SecretKey) -> StoredSession {
        StoredSession {
            session_id: id.to_owned(),
            tenant: self.tenant.to_string(),
            runtime: self.runtime.clone(),
            endpoint: Some(self.endpoint.clone()),
            sealed_token: self
                .token
                .as_deref()
                .map(|t| kek.seal_secret(t, &token_aad(&self.tenant, id, Some(&self.endpoint)))),
            limits: self.limits,
            isolation: self.isolation.clone(),
            warm: self.warm,
            created_ms: self.created_ms,
            expires_ms: self.expires_ms,
            lost: self.lost,
        }
    }

    /// The handle of the session's sandbox.
    fn handle(&self, id: &str) -> SandboxHandle {
        SandboxHandle {
            session_id: id.to_owned(),
            endpoint: self.endpoint.clone(),
            token: self.token.clone(),
        }
    }

    fn view(&self, id: &str) -> SessionView {
        SessionView {
            session_id: id.to_owned(),
            tenant: self.tenant.to_string(),
            runtime: self.runtime.clone(),
            limits: self.limits,
            isolation: self.isolation.clone(),
            warm: self.warm,
            created_at_ms: self.created_ms,
            expires_at_ms: self.expires_ms,
            state: if self.lost { "lost" } else { "active" }.to_owned(),
        }
    }
}

/// Settings of the session service.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub agent_auth: AgentAuthMode,
    pub ready_timeout: Duration,
    pub agent_timeout: Duration,
    pub tenant_max_sessions: usize,
    /// Concurrent file and artifact transfers per tenant.
    pub tenant_max_transfers: usize,
}

/// What a workspace path read gives: a listing, or a file streamed from the
/// agent (the tenant's transfer slot is held until the stream ends).
pub enum PathRead {
    Dir(FileList),
    File {
        size: Option<u64>,
        body: futures::stream::BoxStream<'static, Result<Bytes, ClientError>>,
    },
}

/// Per-tenant caps on concurrent transfers (file reads and writes, artifact
/// uploads and downloads): one tenant cannot hold every connection and
/// buffer of the data plane.
struct Transfers {
    max: usize,
    per_tenant: Mutex<HashMap<TenantId, Arc<Semaphore>>>,
}

impl Transfers {
    fn semaphore(&self, tenant: &TenantId) -> Arc<Semaphore> {
        let mut map = self
            .per_tenant
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Idle tenants are forgotten (no permit out: nothing refers to them).
        let max = self.max;
        map.retain(|_, s| s.available_permits() < max || Arc::strong_count(s) > 1);
        map.entry(tenant.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(max)))
            .clone()
    }

    /// A slot now, or 429.
    fn acquire(&self, tenant: &TenantId) -> Result<OwnedSemaphorePermit, CodedError> {
        let max = self.max;
        self.semaphore(tenant).try_acquire_owned().map_err(|_| {
            CodedError::new(
                ErrorCode::TenantQuotaExceeded,
                format!("tenant {tenant} has its maximum of {max} concurrent transfers; retry when one ends"),
            )
        })
    }

    /// A slot, waiting for one (the data plane's own transfers, such as
    /// collecting a job's output, queue instead of failing).
    async fn acquire_wait(&self, tenant: &TenantId) -> Result<OwnedSemaphorePermit, CodedError> {
        self.semaphore(tenant)
            .acquire_owned()
            .await
            .map_err(|_| CodedError::new(ErrorCode::ShuttingDown, "transfers are closed"))
    }
}

/// Everything a [`SessionRouter`] is built from.
pub struct SessionRouterParts {
    pub registry: RuntimeRegistry,
    pub backend: RuntimeBackend,
    pub artifacts: ArtifactStore,
    pub settings: SessionSettings,
    pub metrics: Arc<Metrics>,
    pub store: SessionRegistry,
    pub kek: SecretKey,
    pub dependencies: Dependencies,
}

/// Sessions of every tenant on this data plane.
pub struct SessionRouter {
    metrics: Arc<Metrics>,
    store: SessionRegistry,
    kek: SecretKey,
    dependencies: Dependencies,
    registry: RuntimeRegistry,
    artifacts: ArtifactStore,
    backend: RuntimeBackend,
    settings: SessionSettings,
    records: Mutex<HashMap<String, SessionRecord>>,
    transfers: Transfers,
    /// Where secret values come from (`crate::secrets`).
    secrets: crate::secrets::SecretSource,
}

/// What a session-scoped call needs from its record.
struct Route {
    agent: AgentClient,
    runtime: String,
    token: Option<String>,
    limits: EffectiveLimits,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A 256-bit token, base64url (43 characters).
fn new_token() -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

/// The agent's answer, mapped to the error contract: its coded errors pass
/// through; an unreachable, failing or slow agent is 503 `sandbox_unavailable`.
fn agent_error(e: ClientError) -> CodedError {
    match e {
        ClientError::Api { body, .. } => CodedError::new(body.code, body.message),
        ClientError::Protocol { status, detail } => CodedError::new(
            ErrorCode::SandboxUnavailable,
            format!("the session agent answered outside its contract ({status}): {detail}"),
        ),
        // Without the agent's address: internal addresses never reach a caller.
        ClientError::Transport(e) => CodedError::new(
            ErrorCode::SandboxUnavailable,
            format!("the session agent is unreachable: {}", e.without_url()),
        ),
    }
}

/// An artifact store failure, mapped to the error contract.
pub fn artifact_error(e: ArtifactError) -> CodedError {
    match e {
        ArtifactError::NotFound | ArtifactError::Crypto(CryptoError::KeyDestroyed) => {
            CodedError::new(ErrorCode::ArtifactNotFound, "no such artifact")
        }
        // A key the backend refused (outside the id alphabet): as missing.
        ArtifactError::Io(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
            CodedError::new(ErrorCode::ArtifactNotFound, "no such artifact")
        }
        ArtifactError::BadName(m) => CodedError::new(ErrorCode::InvalidArgument, m),
        ArtifactError::Range(size) => CodedError::new(
            ErrorCode::RangeNotSatisfiable,
            format!("the range is outside the artifact's {size} bytes"),
        ),
        ArtifactError::TooLarge(max) => CodedError::new(
            ErrorCode::PayloadTooLarge,
            format!("the artifact is larger than {max} bytes"),
        ),
        ArtifactError::QuotaExceeded { max, used } => CodedError::new(
            ErrorCode::TenantQuotaExceeded,
            format!(
                "the tenant's stored artifacts would pass their quota of {max} bytes ({used} stored or in flight): delete artifacts first"
            ),
        )
        .with_details(serde_json::json!({"quota": "artifactBytes", "max": max, "used": used})),
        ArtifactError::Crypto(e) => CodedError::new(ErrorCode::IntegrityError, e.to_string()),
        ArtifactError::Upload(m) => CodedError::new(
            ErrorCode::InvalidArgument,
            format!("the upload broke off: {m}"),
        ),
        // The detail (an S3 endpoint, a path) is logged, never returned.
        ArtifactError::Io(e) => {
            tracing::warn!(error = %e, "artifact storage failed");
            CodedError::new(ErrorCode::Internal, "artifact storage failed")
        }
    }
}

/// Bounds a call to the agent in time.
async fn bounded<T>(
    limit: Duration,
    fut: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, CodedError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(agent_error),
        Err(_) => Err(CodedError::new(
            ErrorCode::SandboxUnavailable,
            format!(
                "the session agent did not answer within {} ms",
                limit.as_millis()
            ),
        )),
    }
}

impl SessionRouter {
    pub fn new(parts: SessionRouterParts) -> Self {
        let SessionRouterParts {
            registry,
            backend,
            artifacts,
            settings,
            metrics,
            store,
            kek,
            dependencies,
        } = parts;
        SessionRouter {
            metrics,
            store,
            kek,
            dependencies,
            registry,
            artifacts,
            backend,
            transfers: Transfers {
                max: settings.tenant_max_transfers.max(1),
                per_tenant: Mutex::new(HashMap::new()),
            },
            settings,
            records: Mutex::new(HashMap::new()),
            secrets: crate::secrets::SecretSource::None,
        }
    }

    /// Resolves named secrets from `source` (none without it).
    pub fn with_secrets(mut self, source: crate::secrets::SecretSource) -> Self {
        self.secrets = source;
        self
    }

    /// A transfer slot of the caller's tenant, held while bytes flow; 429
    /// `tenant_quota_exceeded` when the tenant has all of its slots in use.
    pub fn transfer(&self, caller: &Caller) -> Result<OwnedSemaphorePermit, CodedError> {
        self.transfers.acquire(&caller.tenant)
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Live sessions (all tenants).
    pub fn count(&self) -> usize {
        let now = now_ms();
        self.records()
            .values()
            .filter(|r| r.expires_ms > now && !r.isolation.is_empty())
            .count()
    }

    /// The durable registry (jobs keep their results there too).
    pub fn store(&self) -> &SessionRegistry {
        &self.store
    }

    pub fn artifacts(&self) -> &ArtifactStore {
        &self.artifacts
    }

    /// The key-encryption key (jobs seal their saved results with it).
    pub fn kek(&self) -> &SecretKey {
        &self.kek
    }

    pub fn registry(&self) -> &RuntimeRegistry {
        &self.registry
    }

    pub fn backend(&self) -> &RuntimeBackend {
        &self.backend
    }

    fn records(&self) -> std::sync::MutexGuard<'_, HashMap<String, SessionRecord>> {
        self.records
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The record of `id` if it belongs to the caller's tenant and is alive.
    fn route(&self, caller: &Caller, id: &str) -> Result<Route, CodedError> {
        let records = self.records();
        let not_found = || CodedError::new(ErrorCode::SessionNotFound, format!("no session {id}"));
        let rec = records.get(id).ok_or_else(not_found)?;
        if rec.tenant != caller.tenant {
            return Err(not_found());
        }
        if rec.expires_ms <= now_ms() {
            // The agent ended it on its TTL; the sweep (or a DELETE) removes
            // the record and shreds its artifacts.
            return Err(not_found());
        }
        if rec.lost {
            return Err(CodedError::new(
                ErrorCode::SessionLost,
                format!(
                    "session {id}'s sandbox is gone (it ended, or vanished while the data plane restarted); delete it"
                ),
            ));
        }
        Ok(Route {
            // The session's own agent (its handle's endpoint); the caller's
            // request id and trace context travel on to it.
            agent: self.backend.agent_for(&rec.endpoint).with_context(
                shared::server::current_request_id(),
                shared::server::current_traceparent(),
            ),
            runtime: rec.runtime.clone(),
            token: rec.token.clone(),
            limits: rec.limits,
        })
    }

    /// `POST /internal/v1/sessions`.
    pub async fn create(
        &self,
        caller: &Caller,
        req: CreateSession,
    ) -> Result<SessionView, CodedError> {
        if let Some(t) = &req.tenant
            && t.as_str() != caller.tenant.as_str()
        {
            return Err(CodedError::new(
                ErrorCode::Forbidden,
                "the body's tenant is not the credential's tenant",
            ));
        }
        let runtime = self
            .registry
            .get(req.runtime.as_deref().unwrap_or("python"))?
            .clone();
        if let Some(l) = &req.limits {
            self.registry.check_limits(&runtime, l)?;
        }
        // Packages: allowlisted (each decision audited and counted; a long
        // or repeated list refused before anything is read), then, once the
        // tenant's quota holds a slot, installed outside the sandbox before
        // it exists.
        let packages = match req.packages.as_deref() {
            Some(pkgs) if !pkgs.is_empty() && !self.backend.supports_packages() => {
                return Err(CodedError::new(
                    ErrorCode::NotImplemented,
                    "packages are not yet available with SESSION_RUNTIME_BACKEND=k8s",
                ));
            }
            Some(pkgs) if !pkgs.is_empty() => {
                let checked = self.dependencies.check(&caller.tenant, &runtime.name, pkgs);
                let decision = if checked.is_ok() { "allow" } else { "deny" };
                self.metrics
                    .dependency_decisions
                    .get_or_create(&StepLabels {
                        runtime: runtime.name.clone(),
                        status: decision.into(),
                    })
                    .inc();
                Some(checked?)
            }
            _ => None,
        };
        // Secret values for the caller's tenant, before anything exists: a
        // name without a value is 404 `secret_not_found` naming it.
        let secrets = match req.secrets.as_deref() {
            Some(names) if !names.is_empty() => {
                shared::secrets::check_no_env_clash(names, req.env.as_ref()).map_err(|m| {
                    CodedError::new(ErrorCode::InvalidArgument, format!("secrets: {m}"))
                })?;
                Some(self.secrets.resolve(&caller.tenant, names).await?)
            }
            _ => None,
        };
        let id = format!("ses-{}", hex_id());
        // Expired sessions go first (their artifacts shredded), so they do
        // not count against the quota.
        self.sweep_expired().await;
        {
            let mut records = self.records();
            let now = now_ms();
            let live = records
                .values()
                .filter(|r| r.tenant == caller.tenant && r.expires_ms > now)
                .count();
            if live >= self.settings.tenant_max_sessions {
                return Err(CodedError::new(
                    ErrorCode::CapacityExhausted,
                    format!(
                        "tenant {} has its maximum of {} sessions",
                        caller.tenant, self.settings.tenant_max_sessions
                    ),
                ));
            }
            // Reserve the slot so concurrent creates respect the quota.
            records.insert(
                id.clone(),
                SessionRecord {
                    tenant: caller.tenant.clone(),
                    runtime: runtime.name.clone(),
                    endpoint: String::new(),
                    token: None,
                    limits: runtime.default_limits,
                    isolation: String::new(),
                    warm: false,
                    created_ms: now,
                    expires_ms: u64::MAX,
                    lost: false,
                },
            );
        }
        // Installed only now, with the slot held: a tenant at its quota
        // never gets as far as reading the index.
        let packages_dir = match packages {
            Some(checked) => {
                let (deps, name) = (self.dependencies.clone(), runtime.name.clone());
                let installed = tokio::task::spawn_blocking(move || deps.install(&name, &checked))
                    .await
                    .map_err(|_| CodedError::new(ErrorCode::Internal, "the install task failed"))
                    .and_then(|r| r);
                match installed {
                    Ok(dir) => Some(dir.display().to_string()),
                    Err(e) => {
                        self.records().remove(&id);
                        return Err(e);
                    }
                }
            }
            None => None,
        };
        let token = match self.settings.agent_auth {
            AgentAuthMode::Enforced => Some(new_token()),
            AgentAuthMode::Bypass => None,
        };
        let agent_req = CreateSessionRequest {
            session_id: id.clone(),
            runtime: runtime.name.clone(),
            token: token.clone(),
            limits: req.limits.clone(),
            env: req.env.clone(),
            ttl_seconds: req.ttl_seconds,
            idle_timeout_seconds: None,
            packages_dir,
            secrets,
        };
        let started = std::time::Instant::now();
        // A pod backend bounds its own start by the ready timeout and then
        // registers the session: the outer bound leaves it room to say which.
        let limit = match &self.backend {
            RuntimeBackend::Local(_) => self.settings.ready_timeout,
            RuntimeBackend::K8s(_) => self.settings.ready_timeout + self.settings.agent_timeout,
        };
        let created = bounded(
            limit,
            self.backend.provision(&agent_req, caller.tenant.as_str()),
        )
        .await;
        let (handle, info) = match created {
            Ok(created) => created,
            Err(e) => {
                self.records().remove(&id);
                // A create that timed out may still finish on the agent.
                if e.code == ErrorCode::SandboxUnavailable {
                    self.abandon(&id, token);
                }
                // The agent refused the data plane's own credential: a
                // deployment fault, not the caller's (whose credential was good).
                if e.code == ErrorCode::Unauthorized {
                    tracing::error!(
                        "the session agent refused SESSION_AGENT_ADMIN_TOKEN; sessions cannot be created"
                    );
                    return Err(CodedError::new(
                        ErrorCode::SandboxUnavailable,
                        "the session agent refused the data plane's credential",
                    ));
                }
                return Err(e);
            }
        };
        let kind = if info.warm { "warm" } else { "cold" };
        self.metrics
            .sandbox_start
            .get_or_create(&StartLabels {
                kind: kind.into(),
                runtime: runtime.name.clone(),
            })
            .observe(started.elapsed().as_secs_f64());
        let rec = SessionRecord {
            tenant: caller.tenant.clone(),
            runtime: runtime.name,
            endpoint: handle.endpoint,
            token: handle.token,
            limits: info.limits,
            isolation: info.isolation,
            warm: info.warm,
            created_ms: info.created_at_ms,
            expires_ms: info.expires_at_ms,
            lost: false,
        };
        // Durable before it is handed out: a restart must find it.
        if let Err(e) = self.store.put(&rec.stored(&id, &self.kek)).await {
            self.records().remove(&id);
            self.forget(rec.handle(&id));
            return Err(CodedError::new(
                ErrorCode::Internal,
                format!("could not record the session: {e}"),
            ));
        }
        let view = rec.view(&id);
        self.records().insert(id.clone(), rec);
        tracing::info!(session = %id, tenant = %caller.tenant, runtime = %view.runtime, warm = view.warm, "session created");
        Ok(view)
    }

    /// Destroys a session's sandbox in the background (best effort).
    fn forget(&self, handle: SandboxHandle) {
        let backend = self.backend.clone();
        let limit = self.settings.agent_timeout;
        tokio::spawn(async move {
            let _ = tokio::time::timeout(limit, backend.destroy(&handle)).await;
        });
    }

    /// Destroys, in the background, whatever a failed or timed-out
    /// provision may still create (best effort).
    fn abandon(&self, id: &str, token: Option<String>) {
        let backend = self.backend.clone();
        let limit = self.settings.agent_timeout;
        let id = id.to_owned();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(limit, backend.abandon(&id, token.as_deref())).await;
        });
    }

    /// Destroys the backend's sandboxes no record owns (with the backend's
    /// own credential).
    async fn reap_orphans(&self) -> usize {
        let listed =
            tokio::time::timeout(self.settings.agent_timeout, self.backend.list_owned()).await;
        let owned = match listed {
            // The backend cannot tell (local: no admin credential).
            Ok(Ok(None)) => return 0,
            Ok(Ok(Some(owned))) => owned,
            _ => {
                tracing::warn!(
                    "could not list the backend's sandboxes; orphans are left to their TTL"
                );
                return 0;
            }
        };
        let mut reaped = 0;
        for s in owned {
            if self.records().contains_key(&s.session_id) {
                continue;
            }
            tracing::warn!(session = %s.session_id, "destroying a sandbox no session record owns");
            if tokio::time::timeout(self.settings.agent_timeout, self.backend.destroy_orphan(&s))
                .await
                .is_ok_and(|r| r.is_ok())
            {
                reaped += 1;
            }
        }
        reaped
    }

    /// At start-up: reload stored sessions; those the agent no longer has
    /// are marked lost, expired ones are dropped.
    pub async fn recover(&self) -> Result<(), CodedError> {
        let stored = self.store.load().await.map_err(|e| {
            CodedError::new(
                ErrorCode::Internal,
                format!("loading the session registry: {e}"),
            )
        })?;
        let now = now_ms();
        let (mut kept, mut lost) = (0, 0);
        for st in stored {
            let id = st.session_id.clone();
            let (Ok(tenant), Ok(_)) = (
                TenantId::parse(st.tenant.as_str()),
                shared::ids::SessionId::parse(id.as_str()),
            ) else {
                tracing::warn!(session = %id, "stored session has a malformed tenant or id; dropping the record");
                let _ = self.store.remove(&id).await;
                continue;
            };
            if st.expires_ms <= now {
                // Expired while the data plane was down: its artifacts go too.
                self.shred_expired(&id, &tenant).await;
                continue;
            }
            let aad = token_aad(&st.tenant, &id, st.endpoint.as_deref());
            let token = match &st.sealed_token {
                Some(sealed) => match self.kek.open_secret(sealed, &aad) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        tracing::warn!(session = %id, error = %e, "stored session token does not open; dropping the record");
                        let _ = self.store.remove(&id).await;
                        continue;
                    }
                },
                None => None,
            };
            // Routed where the backend says the sandbox is (local: its
            // one agent; k8s: the pod it labelled for the session; the
            // stored endpoint only had to match the token's seal).
            let endpoint = self.backend.adopt(&id);
            let gone = endpoint.is_none();
            let mut rec = SessionRecord {
                tenant,
                runtime: st.runtime,
                endpoint: endpoint.unwrap_or_default(),
                token,
                limits: st.limits,
                isolation: st.isolation,
                warm: st.warm,
                created_ms: st.created_ms,
                expires_ms: st.expires_ms,
                lost: st.lost,
            };
            if !rec.lost && gone {
                rec.lost = true;
                lost += 1;
                if let Err(e) = self.store.put(&rec.stored(&id, &self.kek)).await {
                    tracing::warn!(session = %id, error = %e, "could not mark the session lost");
                }
                tracing::warn!(session = %id, tenant = %rec.tenant, "session lost: the backend has no sandbox for it");
            } else if !rec.lost {
                let probe = bounded(
                    self.settings.agent_timeout,
                    self.backend.probe(&rec.handle(&id)),
                )
                .await;
                match probe {
                    Ok(_) => kept += 1,
                    Err(e)
                        if matches!(
                            e.code,
                            ErrorCode::SessionNotFound | ErrorCode::Unauthorized
                        ) =>
                    {
                        rec.lost = true;
                        lost += 1;
                        if let Err(e) = self.store.put(&rec.stored(&id, &self.kek)).await {
                            tracing::warn!(session = %id, error = %e, "could not mark the session lost");
                        }
                        tracing::warn!(session = %id, tenant = %rec.tenant, "session lost: its sandbox vanished");
                    }
                    // The agent is down: keep the session; a step will say.
                    Err(_) => kept += 1,
                }
            }
            self.records().insert(id, rec);
        }
        let orphans = self.reap_orphans().await;
        tracing::info!(kept, lost, orphans, "session registry recovered");
        Ok(())
    }

    /// A session whose sandbox died or vanished (the backend's watch): later
    /// calls answer 410 `session_lost`; the record stays until deleted.
    pub async fn mark_lost(&self, id: &str) {
        let stored = {
            let mut records = self.records();
            let Some(rec) = records.get_mut(id) else {
                return;
            };
            if rec.lost || rec.isolation.is_empty() {
                return;
            }
            rec.lost = true;
            tracing::warn!(session = %id, tenant = %rec.tenant, "session lost: its sandbox ended");
            rec.stored(id, &self.kek)
        };
        if let Err(e) = self.store.put(&stored).await {
            tracing::warn!(session = %id, error = %e, "could not record the session as lost");
        }
    }

    pub fn get(&self, caller: &Caller, id: &str) -> Result<SessionView, CodedError> {
        self.route(caller, id)?;
        let records = self.records();
        let rec = records.get(id).ok_or_else(|| {
            CodedError::new(ErrorCode::SessionNotFound, format!("no session {id}"))
        })?;
        Ok(rec.view(id))
    }

    pub fn list(&self, caller: &Caller) -> Vec<SessionView> {
        let now = now_ms();
        let records = self.records();
        let mut out: Vec<SessionView> = records
            .iter()
            .filter(|(_, r)| {
                r.tenant == caller.tenant && r.expires_ms > now && !r.isolation.is_empty()
            })
            .map(|(id, r)| r.view(id))
            .collect();
        out.sort_by(|a, b| a.session_id.cmp(&b.session_id));
        out
    }

    /// Removes every expired session (record, stored record) and shreds
    /// its artifacts; returns how many went. Run periodically and before a
    /// create.
    pub async fn sweep_expired(&self) -> usize {
        let now = now_ms();
        let expired: Vec<(String, TenantId)> = {
            let mut records = self.records();
            let ids: Vec<String> = records
                .iter()
                .filter(|(_, r)| r.expires_ms <= now)
                .map(|(id, _)| id.clone())
                .collect();
            ids.into_iter()
                .filter_map(|id| records.remove(&id).map(|r| (id, r.tenant)))
                .collect()
        };
        for (id, tenant) in &expired {
            self.shred_expired(id, tenant).await;
        }
        expired.len()
    }

    /// An expired session's stored record and artifacts (keys first).
    async fn shred_expired(&self, id: &str, tenant: &TenantId) {
        if let Err(e) = self.store.remove(id).await {
            tracing::warn!(session = %id, error = %e, "could not remove the stored session record");
        }
        match self.artifacts.delete_session(tenant, id).await {
            Ok(n) => {
                tracing::info!(target: "audit", session = %id, tenant = %tenant, artifacts = n, "session expired; its artifacts were shredded")
            }
            Err(e) => {
                tracing::warn!(session = %id, tenant = %tenant, error = %e, "could not shred an expired session's artifacts")
            }
        }
    }

    /// Ends a session: the agent destroys its sandbox and workspace. An
    /// expired session of the caller's is still deleted (its artifacts
    /// shredded), not 404.
    pub async fn delete(&self, caller: &Caller, id: &str) -> Result<(), CodedError> {
        let expired = {
            let records = self.records();
            records
                .get(id)
                .is_some_and(|r| r.tenant == caller.tenant && r.expires_ms <= now_ms())
        };
        if expired {
            let removed = self.records().remove(id);
            if let Some(rec) = removed {
                self.forget(rec.handle(id));
            }
            self.shred_expired(id, &caller.tenant).await;
            tracing::info!(session = %id, tenant = %caller.tenant, "expired session deleted");
            return Ok(());
        }
        let lost = match self.route(caller, id) {
            Err(e) if e.code == ErrorCode::SessionLost => true,
            other => {
                other?;
                false
            }
        };
        let handle = self.records().get(id).map(|r| r.handle(id));
        if let (Some(handle), true) = (&handle, lost) {
            // A lost session can (only) be deleted: whatever is left of its
            // sandbox (a failed pod) goes in the background.
            self.forget(handle.clone());
        }
        if let (Some(handle), false) = (handle, lost) {
            let result = bounded(self.settings.agent_timeout, self.backend.destroy(&handle)).await;
            match result {
                Ok(()) => {}
                // Already gone on the agent (TTL, restart): the record goes too.
                Err(e) if e.code == ErrorCode::SessionNotFound => {}
                Err(e) => return Err(e),
            }
        }
        self.records().remove(id);
        if let Err(e) = self.store.remove(id).await {
            tracing::warn!(session = %id, error = %e, "could not remove the stored session record");
        }
        // The session's artifacts go with it, keys first (crypto-shredding).
        let shredded = self
            .artifacts
            .delete_session(&caller.tenant, id)
            .await
            .map_err(artifact_error)?;
        tracing::info!(session = %id, tenant = %caller.tenant, artifacts = shredded, "session deleted");
        Ok(())
    }

    fn step_request(id: &str, step: RunStep) -> Result<StepRequest, CodedError> {
        let step_id = step.step_id.unwrap_or_else(|| format!("step-{}", hex_id()));
        let step_id =
            StepId::parse(step_id).map_err(|m| CodedError::new(ErrorCode::InvalidArgument, m.0))?;
        Ok(StepRequest {
            session_id: id.to_owned(),
            step_id: step_id.into_string(),
            code: step.code,
            timeout_ms: step.timeout_ms,
            mode: step.mode,
            event: step.event,
        })
    }

    fn step_bound(route: &Route, req: &StepRequest) -> Duration {
        Duration::from_millis(req.timeout_ms.unwrap_or(route.limits.timeout_ms)) + STEP_MARGIN
    }

    /// Runs a step and waits for its result.
    pub async fn step(
        &self,
        caller: &Caller,
        id: &str,
        step: RunStep,
    ) -> Result<StepResult, CodedError> {
        let route = self.route(caller, id)?;
        let req = Self::step_request(id, step)?;
        let started = std::time::Instant::now();
        let result = tracing::Instrument::instrument(
            bounded(
                Self::step_bound(&route, &req),
                route.agent.step(&req, route.token.as_deref()),
            ),
            step_span(caller, &req),
        )
        .await;
        let status = match &result {
            Ok(r) => format!("{:?}", r.status).to_lowercase(),
            Err(e) => e.code.as_str().to_owned(),
        };
        self.metrics
            .step
            .get_or_create(&StepLabels {
                runtime: route.runtime.clone(),
                status,
            })
            .observe(started.elapsed().as_secs_f64());
        result
    }

    /// Runs a step, streaming its output.
    pub async fn step_stream(
        &self,
        caller: &Caller,
        id: &str,
        step: RunStep,
    ) -> Result<impl Stream<Item = Result<StepEvent, ClientError>> + use<>, CodedError> {
        let route = self.route(caller, id)?;
        let req = Self::step_request(id, step)?;
        tracing::Instrument::instrument(
            bounded(
                self.settings.agent_timeout,
                route.agent.step_stream(&req, route.token.as_deref()),
            ),
            step_span(caller, &req),
        )
        .await
    }

    /// Reads a workspace path: a listing, or the file streamed from the
    /// agent as it arrives (never held whole), in one of the tenant's
    /// transfer slots.
    pub async fn read_path(
        &self,
        caller: &Caller,
        id: &str,
        path: &str,
    ) -> Result<PathRead, CodedError> {
        self.open_path(caller, id, path, false).await
    }

    /// [`Self::read_path`] that waits for a transfer slot instead of 429
    /// (job output collection).
    pub async fn read_path_queued(
        &self,
        caller: &Caller,
        id: &str,
        path: &str,
    ) -> Result<PathRead, CodedError> {
        self.open_path(caller, id, path, true).await
    }

    async fn open_path(
        &self,
        caller: &Caller,
        id: &str,
        path: &str,
        wait: bool,
    ) -> Result<PathRead, CodedError> {
        let route = self.route(caller, id)?;
        // Bounded up to the response head; the body takes as long as it takes.
        let opened = bounded(
            self.settings.agent_timeout,
            route.agent.open_path(id, path, route.token.as_deref()),
        )
        .await?;
        Ok(match opened {
            PathStream::Dir(list) => PathRead::Dir(list),
            // A refused file read drops the response unread.
            PathStream::File(file) => {
                let permit = if wait {
                    self.transfers.acquire_wait(&caller.tenant).await?
                } else {
                    self.transfer(caller)?
                };
                PathRead::File {
                    size: file.size,
                    body: file
                        .into_stream()
                        .map(move |chunk| {
                            let _slot = &permit;
                            chunk
                        })
                        .boxed(),
                }
            }
        })
    }

    pub async fn write_file(
        &self,
        caller: &Caller,
        id: &str,
        path: &str,
        body: Bytes,
    ) -> Result<(), CodedError> {
        let route = self.route(caller, id)?;
        let _slot = self.transfer(caller)?;
        bounded(
            self.settings.agent_timeout,
            route
                .agent
                .write_file(id, path, body, route.token.as_deref()),
        )
        .await
    }

    pub async fn delete_file(
        &self,
        caller: &Caller,
        id: &str,
        path: &str,
    ) -> Result<(), CodedError> {
        let route = self.route(caller, id)?;
        bounded(
            self.settings.agent_timeout,
            route.agent.delete_file(id, path, route.token.as_deref()),
        )
        .await
    }

    /// Whether the session registry answers (for `/readyz`).
    pub async fn registry_ready(&self) -> Result<(), CodedError> {
        match tokio::time::timeout(Duration::from_secs(2), self.store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(CodedError::new(
                ErrorCode::SandboxUnavailable,
                format!("the session registry is unavailable: {e}"),
            )),
            Err(_) => Err(CodedError::new(
                ErrorCode::SandboxUnavailable,
                "the session registry did not answer within 2 s",
            )),
        }
    }

    /// Whether the backend answers (for `/readyz`).
    pub async fn agent_ready(&self) -> Result<(), CodedError> {
        bounded(Duration::from_secs(2), self.backend.health()).await
    }
}

fn hex_id() -> String {
    rand::random::<[u8; 12]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The span of one step sent to the agent (its ids as attributes; never the
/// code or its output).
fn step_span(caller: &Caller, req: &StepRequest) -> tracing::Span {
    tracing::info_span!("session.step", tenant_id = %caller.tenant, session_id = %req.session_id,
        step_id = %req.step_id, otel.kind = "client")
}

#[cfg(test)]
mod token_aad_tests {
    use super::*;

    /// Issue 15 §7: a stored session record moved to another tenant (its
    /// `tenant` field rewritten at rest) must not yield the agent token.
    #[test]
    fn a_sealed_token_opens_only_for_its_tenant_and_session() {
        let kek = SecretKey::generate();
        let ep = Some("http://127.0.0.1:9000");
        let sealed = kek.seal_secret("agent-token", &token_aad("a", "ses-1", ep));
        assert_eq!(
            kek.open_secret(&sealed, &token_aad("a", "ses-1", ep))
                .unwrap(),
            "agent-token"
        );
        assert!(
            kek.open_secret(&sealed, &token_aad("b", "ses-1", ep))
                .is_err()
        );
        assert!(
            kek.open_secret(&sealed, &token_aad("a", "ses-2", ep))
                .is_err()
        );
        // Pointed at another agent, or stripped of its endpoint: no token.
        let other = Some("http://attacker.example:9000");
        assert!(
            kek.open_secret(&sealed, &token_aad("a", "ses-1", other))
                .is_err()
        );
        assert!(
            kek.open_secret(&sealed, &token_aad("a", "ses-1", None))
                .is_err()
        );
        // The former associated data (no tenant) does not open it either.
        assert!(kek.open_secret(&sealed, "session:ses-1").is_err());
    }
}

/// An honest fake session agent for the unit tests of this module and of
/// `execution`: the routes the data plane calls, with the agent's own checks
/// (the admin credential to create, the session's token for everything
/// else, coded errors) and a log of what it was asked. No sandbox runs: a
/// step answers the code it was given as its result.
#[cfg(test)]
pub(crate) mod fake_agent {
    #![allow(clippy::unwrap_used)]

    use std::collections::{BTreeMap, HashMap};
    use std::path::Path;
    use std::sync::{Arc, Mutex, MutexGuard};
    use std::time::Duration;

    use axum::extract::{Path as UrlPath, State};
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::{IntoResponse, Response};
    use axum::routing::{get, post};
    use axum::{Json, Router};
    use clap::Parser;
    use shared::CodedError;
    use shared::ErrorCode;
    use shared::agent::{
        ADMIN_TOKEN_HEADER, CreateSessionRequest, FileEntry, FileList, Runtime,
        SESSION_TOKEN_HEADER, SessionInfo, SessionList, StepRequest, StepResult, StepStatus,
    };
    use shared::ids::TenantId;
    use tokio_util::sync::CancellationToken;

    use super::{SessionRouter, SessionRouterParts, SessionSettings};
    use crate::auth::Caller;
    use crate::config::AgentAuthMode;
    use crate::dependencies::Dependencies;
    use crate::metrics::Metrics;
    use crate::registry::SessionRegistry;
    use crate::runtime::{RuntimeBackend, RuntimeRegistry};
    use crate::workspace::artifacts::ArtifactStore;
    use crate::workspace::crypto::SecretKey;

    /// The agent's admin credential (the data plane's own).
    pub const ADMIN: &str = "fake-agent-admin-credential-0123456789abcdef";

    pub struct FakeSession {
        /// The token the data plane generated for the session.
        pub token: Option<String>,
        pub info: SessionInfo,
    }

    #[derive(Default)]
    pub struct FakeState {
        pub sessions: HashMap<String, FakeSession>,
        /// Sessions created (accepted creates).
        pub creates: usize,
        /// Steps run.
        pub steps: usize,
        pub deletes: usize,
        /// Every request as `METHOD /path` (the path as sent, encoded).
        pub log: Vec<String>,
        /// Every token presented (`x-session-token`), for leak checks.
        pub tokens_seen: Vec<String>,
        /// Creates answer this error (the request still counts in `log`).
        pub create_error: Option<ErrorCode>,
        /// Steps answer this error instead of running.
        pub step_error: Option<ErrorCode>,
        /// Every session's workspace: path -> content (`output/a.txt`).
        pub files: BTreeMap<String, Vec<u8>>,
        /// The secrets of each accepted create, by session id.
        pub secrets: BTreeMap<String, shared::secrets::SecretEnv>,
    }

    type Shared = Arc<Mutex<FakeState>>;

    pub struct FakeAgent {
        pub url: String,
        pub state: Shared,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
    }

    impl FakeAgent {
        pub async fn start() -> FakeAgent {
            let state: Shared = Arc::default();
            let app = Router::new()
                .route("/v1/health", get(|| async { "ok" }))
                .route("/v1/sessions", post(create).get(list))
                .route("/v1/sessions/{id}", get(info).delete(delete))
                .route("/v1/sessions/{id}/files", get(files_root))
                .route("/v1/sessions/{id}/files/{*path}", get(files))
                .route("/v1/steps", post(step))
                .layer(axum::middleware::from_fn_with_state(state.clone(), record))
                .with_state(state.clone());
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}", listener.local_addr().unwrap());
            let stop = CancellationToken::new();
            let shutdown = stop.clone();
            let task = tokio::spawn(async move {
                axum::serve(listener, app)
                    .with_graceful_shutdown(shutdown.cancelled_owned())
                    .await
                    .unwrap();
            });
            FakeAgent {
                url,
                state,
                stop,
                task,
            }
        }

        pub fn state(&self) -> MutexGuard<'_, FakeState> {
            self.state.lock().unwrap()
        }

        /// Stops listening and closes every connection: the agent is down.
        pub async fn stop(self) {
            self.stop.cancel();
            self.task.await.unwrap();
        }
    }

    async fn record(
        State(state): State<Shared>,
        req: axum::extract::Request,
        next: axum::middleware::Next,
    ) -> Response {
        {
            let mut s = state.lock().unwrap();
            s.log.push(format!("{} {}", req.method(), req.uri().path()));
            if let Some(t) = req.headers().get(SESSION_TOKEN_HEADER) {
                s.tokens_seen
                    .push(t.to_str().unwrap_or_default().to_owned());
            }
        }
        next.run(req).await
    }

    fn header<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
        headers.get(name).and_then(|v| v.to_str().ok())
    }

    fn is_admin(headers: &HeaderMap) -> bool {
        header(headers, ADMIN_TOKEN_HEADER) == Some(ADMIN)
    }

    fn unauthorized() -> CodedError {
        CodedError::new(ErrorCode::Unauthorized, "missing or wrong token")
    }

    /// The session, when the request carries its token (or the admin
    /// credential, for lifecycle calls).
    fn authorized<'a>(
        s: &'a mut FakeState,
        id: &str,
        headers: &HeaderMap,
        admin_ok: bool,
    ) -> Result<&'a mut FakeSession, CodedError> {
        let session = s.sessions.get_mut(id).ok_or_else(|| {
            CodedError::new(ErrorCode::SessionNotFound, format!("no session {id}"))
        })?;
        let token_ok = session.token.as_deref().is_some()
            && header(headers, SESSION_TOKEN_HEADER) == session.token.as_deref();
        if token_ok || (admin_ok && is_admin(headers)) {
            Ok(session)
        } else {
            Err(unauthorized())
        }
    }

    async fn create(
        State(state): State<Shared>,
        headers: HeaderMap,
        Json(req): Json<CreateSessionRequest>,
    ) -> Result<(StatusCode, Json<SessionInfo>), CodedError> {
        if !is_admin(&headers) {
            return Err(unauthorized());
        }
        let token = req.token.clone().ok_or_else(unauthorized)?;
        if header(&headers, SESSION_TOKEN_HEADER) != Some(token.as_str()) || token.len() < 43 {
            return Err(CodedError::new(ErrorCode::InvalidArgument, "bad token"));
        }
        let mut s = state.lock().unwrap();
        if let Some(code) = s.create_error {
            return Err(CodedError::new(code, "the fake agent refuses creates"));
        }
        if s.sessions.contains_key(&req.session_id) {
            return Err(CodedError::new(ErrorCode::SessionExists, "exists"));
        }
        let now = super::now_ms();
        let info = SessionInfo {
            session_id: req.session_id.clone(),
            runtime: Runtime::parse(&req.runtime).unwrap(),
            isolation: "fake".into(),
            limits: crate::runtime::DEFAULT_LIMITS,
            created_at_ms: now,
            expires_at_ms: now + req.ttl_seconds.unwrap_or(600) * 1000,
            last_used_at_ms: now,
            warm: false,
            steps: 0,
            restarts: 0,
        };
        s.creates += 1;
        if let Some(secrets) = req.secrets.clone() {
            s.secrets.insert(req.session_id.clone(), secrets);
        }
        s.sessions.insert(
            req.session_id,
            FakeSession {
                token: Some(token),
                info: info.clone(),
            },
        );
        Ok((StatusCode::CREATED, Json(info)))
    }

    async fn list(
        State(state): State<Shared>,
        headers: HeaderMap,
    ) -> Result<Json<SessionList>, CodedError> {
        if !is_admin(&headers) {
            return Err(unauthorized());
        }
        let s = state.lock().unwrap();
        let sessions = s.sessions.values().map(|f| f.info.clone()).collect();
        Ok(Json(SessionList { sessions }))
    }

    async fn info(
        State(state): State<Shared>,
        UrlPath(id): UrlPath<String>,
        headers: HeaderMap,
    ) -> Result<Json<SessionInfo>, CodedError> {
        let mut s = state.lock().unwrap();
        Ok(Json(authorized(&mut s, &id, &headers, false)?.info.clone()))
    }

    async fn delete(
        State(state): State<Shared>,
        UrlPath(id): UrlPath<String>,
        headers: HeaderMap,
    ) -> Result<StatusCode, CodedError> {
        let mut s = state.lock().unwrap();
        authorized(&mut s, &id, &headers, true)?;
        s.sessions.remove(&id);
        s.deletes += 1;
        Ok(StatusCode::NO_CONTENT)
    }

    async fn step(
        State(state): State<Shared>,
        headers: HeaderMap,
        Json(req): Json<StepRequest>,
    ) -> Result<Json<StepResult>, CodedError> {
        let mut s = state.lock().unwrap();
        authorized(&mut s, &req.session_id, &headers, false)?
            .info
            .steps += 1;
        if let Some(code) = s.step_error {
            return Err(CodedError::new(code, "the fake agent refuses steps"));
        }
        s.steps += 1;
        Ok(Json(StepResult {
            session_id: req.session_id,
            step_id: req.step_id,
            status: StepStatus::Ok,
            stdout: format!("ran: {}\n", req.code),
            stderr: String::new(),
            result: Some(serde_json::Value::String(req.code)),
            error: None,
            duration_ms: 1,
            truncated: false,
            state_lost: false,
            output_files: None,
        }))
    }

    async fn files_root(
        state: State<Shared>,
        UrlPath(id): UrlPath<String>,
        headers: HeaderMap,
    ) -> Result<Response, CodedError> {
        files(state, UrlPath((id, String::new())), headers).await
    }

    /// A directory's entries (one level), or a file's bytes.
    async fn files(
        State(state): State<Shared>,
        UrlPath((id, path)): UrlPath<(String, String)>,
        headers: HeaderMap,
    ) -> Result<Response, CodedError> {
        let mut s = state.lock().unwrap();
        authorized(&mut s, &id, &headers, false)?;
        if let Some(bytes) = s.files.get(&path) {
            return Ok((
                [(header::CONTENT_TYPE, "application/octet-stream")],
                bytes.clone(),
            )
                .into_response());
        }
        let prefix = if path.is_empty() {
            String::new()
        } else {
            format!("{path}/")
        };
        let mut entries: BTreeMap<String, FileEntry> = BTreeMap::new();
        for (p, bytes) in &s.files {
            let Some(rest) = p.strip_prefix(&prefix) else {
                continue;
            };
            let (name, kind, size) = match rest.split_once('/') {
                Some((dir, _)) => (dir, "dir", 0),
                None => (rest, "file", bytes.len() as u64),
            };
            entries.insert(
                name.to_owned(),
                FileEntry {
                    path: format!("{prefix}{name}"),
                    kind: kind.into(),
                    size,
                    modified_ms: 0,
                },
            );
        }
        if entries.is_empty() && !path.is_empty() {
            return Err(CodedError::new(
                ErrorCode::FileNotFound,
                format!("no {path}"),
            ));
        }
        Ok(Json(FileList {
            files: entries.into_values().collect(),
        })
        .into_response())
    }

    pub fn caller(tenant: &str) -> Caller {
        Caller {
            tenant: TenantId::parse(tenant).unwrap(),
            subject: "control-plane".into(),
            bypass: false,
        }
    }

    /// A session router in front of `agent_url` with the memory registry,
    /// artifacts under `dir`, and `tenant_max_sessions`.
    pub fn router(agent_url: &str, dir: &Path, tenant_max_sessions: usize) -> SessionRouter {
        router_with(agent_url, dir, tenant_max_sessions, ADMIN)
    }

    pub fn router_with(
        agent_url: &str,
        dir: &Path,
        tenant_max_sessions: usize,
        admin: &str,
    ) -> SessionRouter {
        let kek = SecretKey::generate();
        router_on(
            agent_url,
            dir,
            tenant_max_sessions,
            admin,
            SessionRegistry::Memory,
            kek,
        )
    }

    /// A session router with the given session registry and KEK (two
    /// routers sharing them see each other's records at recovery).
    pub fn router_on(
        agent_url: &str,
        dir: &Path,
        tenant_max_sessions: usize,
        admin: &str,
        store: SessionRegistry,
        kek: SecretKey,
    ) -> SessionRouter {
        let config = crate::Config::parse_from(["data-plane", "--agent-endpoint", agent_url]);
        SessionRouter::new(SessionRouterParts {
            registry: RuntimeRegistry::load(&config).unwrap(),
            backend: RuntimeBackend::local(
                agent_url,
                reqwest::Client::new(),
                Some(admin.to_owned()),
            ),
            artifacts: ArtifactStore::new(dir.join("artifacts"), kek.clone(), 1 << 20).unwrap(),
            settings: SessionSettings {
                agent_auth: AgentAuthMode::Enforced,
                ready_timeout: Duration::from_secs(10),
                agent_timeout: Duration::from_secs(10),
                tenant_max_sessions,
                tenant_max_transfers: 4,
            },
            metrics: Metrics::new(),
            store,
            kek,
            dependencies: Dependencies::new(
                Dependencies::load_allowlist(None).unwrap(),
                None,
                dir.join("cache"),
            ),
        })
    }

    /// A URL nobody listens on.
    pub fn closed_url() -> String {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        url
    }
}

/// `SessionRouter` in front of the fake agent: tenant scoping, the
/// per-tenant quota, the agent's errors mapped to the contract.
#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::fake_agent::{self, FakeAgent, caller};
    use super::*;

    fn step(code: &str) -> RunStep {
        RunStep {
            step_id: None,
            code: code.into(),
            timeout_ms: None,
            mode: None,
            event: None,
        }
    }

    fn python() -> CreateSession {
        CreateSession {
            tenant: None,
            runtime: Some("python".into()),
            ttl_seconds: None,
            limits: None,
            env: None,
            packages: None,
            secrets: None,
        }
    }

    /// Named secrets: each tenant's own value goes to the agent in the
    /// create call, nowhere else; a missing one is 404 naming it, and no
    /// sandbox is asked for.
    #[tokio::test]
    async fn secrets_are_resolved_per_tenant_and_only_sent_to_the_agent() {
        let agent = FakeAgent::start().await;
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("secrets");
        for (t, v) in [("acme", "acme-value-1"), ("globex", "globex-value-1")] {
            std::fs::create_dir_all(src.join(t)).unwrap();
            std::fs::write(src.join(t).join("API_TOKEN"), v).unwrap();
        }
        let router = fake_agent::router(&agent.url, dir.path(), 4)
            .with_secrets(crate::secrets::SecretSource::Dir(src));
        let with = |names: &[&str]| CreateSession {
            secrets: Some(names.iter().map(|n| (*n).to_owned()).collect()),
            ..python()
        };
        let a = router
            .create(&caller("acme"), with(&["API_TOKEN"]))
            .await
            .unwrap();
        let g = router
            .create(&caller("globex"), with(&["API_TOKEN"]))
            .await
            .unwrap();
        {
            let st = agent.state();
            assert_eq!(
                st.secrets[&a.session_id]["API_TOKEN"].expose(),
                "acme-value-1"
            );
            assert_eq!(
                st.secrets[&g.session_id]["API_TOKEN"].expose(),
                "globex-value-1"
            );
        }
        let shown = format!("{a:?} {g:?} {}", serde_json::to_string(&a).unwrap());
        assert!(!shown.contains("value-1"), "{shown}");
        let creates = agent.state().creates;
        for (names, code) in [
            (vec!["API_TOKEN", "NOPE"], ErrorCode::SecretNotFound),
            (vec!["api_token"], ErrorCode::InvalidArgument),
        ] {
            let e = router
                .create(&caller("acme"), with(&names))
                .await
                .unwrap_err();
            assert_eq!(e.code, code, "{e}");
            assert!(!e.message.contains("value-1"), "{e}");
        }
        let clash = CreateSession {
            env: Some([("API_TOKEN".to_owned(), "x".to_owned())].into()),
            ..with(&["API_TOKEN"])
        };
        let e = router.create(&caller("acme"), clash).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument, "{e}");
        // A tenant without a value of its own gets none, whatever exists.
        let e = router
            .create(&caller("initech"), with(&["API_TOKEN"]))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::SecretNotFound, "{e}");
        assert!(e.message.contains("API_TOKEN"), "{e}");
        assert_eq!(agent.state().creates, creates, "no sandbox was asked for");
        assert_eq!(router.list(&caller("acme")).len(), 1);
    }

    #[tokio::test]
    async fn another_tenants_session_is_not_found_and_never_reaches_the_agent() {
        let agent = FakeAgent::start().await;
        let dir = tempfile::tempdir().unwrap();
        let router = fake_agent::router(&agent.url, dir.path(), 4);
        let (acme, globex) = (caller("acme"), caller("globex"));
        let view = router.create(&acme, python()).await.unwrap();
        let id = view.session_id.clone();
        assert_eq!(view.tenant, "acme");
        let token = agent.state().sessions[&id].token.clone().unwrap();
        assert!(
            !serde_json::to_string(&view).unwrap().contains(&token),
            "the agent token is never returned"
        );
        // The owner reaches the agent with the session's token.
        let r = router.step(&acme, &id, step("1 + 1")).await.unwrap();
        assert_eq!(r.result, Some(serde_json::json!("1 + 1")));
        let before = agent.state().log.len();

        let not_found = |e: CodedError| {
            assert_eq!(e.code, ErrorCode::SessionNotFound, "{}", e.message);
            assert_eq!(e.code.http_status(), 404);
        };
        not_found(router.get(&globex, &id).unwrap_err());
        not_found(router.step(&globex, &id, step("x")).await.unwrap_err());
        not_found(
            router
                .step_stream(&globex, &id, step("x"))
                .await
                .err()
                .unwrap(),
        );
        not_found(router.read_path(&globex, &id, "").await.err().unwrap());
        let body = Bytes::from_static(b"x");
        not_found(
            router
                .write_file(&globex, &id, "a", body)
                .await
                .unwrap_err(),
        );
        not_found(router.delete_file(&globex, &id, "a").await.unwrap_err());
        not_found(router.delete(&globex, &id).await.unwrap_err());
        // Unknown ids look the same as another tenant's.
        not_found(router.get(&acme, "ses-nope").unwrap_err());
        assert!(router.list(&globex).is_empty());
        assert_eq!(router.list(&acme).len(), 1);
        assert_eq!(
            agent.state().log.len(),
            before,
            "nothing reached the agent: {:?}",
            &agent.state().log[before..]
        );
        assert!(agent.state().sessions.contains_key(&id), "still alive");

        router.delete(&acme, &id).await.unwrap();
        assert!(agent.state().sessions.is_empty());
        not_found(router.get(&acme, &id).unwrap_err());
        // The fake only ever saw the session's own token, never in a path.
        let st = agent.state();
        assert!(st.tokens_seen.iter().all(|t| *t == token));
        assert!(!st.log.iter().any(|l| l.contains(&token)));
    }

    #[tokio::test]
    async fn the_session_quota_is_per_tenant() {
        let agent = FakeAgent::start().await;
        let dir = tempfile::tempdir().unwrap();
        let router = fake_agent::router(&agent.url, dir.path(), 2);
        let (acme, globex) = (caller("acme"), caller("globex"));
        let a1 = router.create(&acme, python()).await.unwrap().session_id;
        router.create(&acme, python()).await.unwrap();
        let e = router.create(&acme, python()).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::CapacityExhausted, "{}", e.message);
        assert_eq!(e.code.http_status(), 429);
        assert_eq!(
            agent.state().creates,
            2,
            "the refused create never reached the agent"
        );
        // Another tenant has its own quota.
        router.create(&globex, python()).await.unwrap();
        router.create(&globex, python()).await.unwrap();
        assert_eq!(
            router.create(&globex, python()).await.unwrap_err().code,
            ErrorCode::CapacityExhausted
        );
        // A deleted session frees its slot.
        router.delete(&acme, &a1).await.unwrap();
        router.create(&acme, python()).await.unwrap();
        assert_eq!(agent.state().creates, 5);
        assert_eq!(router.count(), 4);
    }

    #[tokio::test]
    async fn the_agents_coded_errors_are_mapped() {
        let agent = FakeAgent::start().await;
        let dir = tempfile::tempdir().unwrap();
        let router = fake_agent::router(&agent.url, dir.path(), 2);
        let acme = caller("acme");
        let id = router.create(&acme, python()).await.unwrap().session_id;

        // A step while another runs: the agent's 409 passes through.
        agent.state().step_error = Some(ErrorCode::SessionBusy);
        let e = router.step(&acme, &id, step("1")).await.unwrap_err();
        assert_eq!(
            (e.code, e.code.http_status()),
            (ErrorCode::SessionBusy, 409)
        );

        // The agent lost the session (TTL, restart): 404 session_not_found.
        agent.state().step_error = None;
        agent.state().sessions.remove(&id);
        let e = router.step(&acme, &id, step("1")).await.unwrap_err();
        assert_eq!(
            (e.code, e.code.http_status()),
            (ErrorCode::SessionNotFound, 404)
        );
        // ... and a DELETE still removes the record.
        router.delete(&acme, &id).await.unwrap();
        assert!(router.list(&acme).is_empty());

        // The agent at capacity: its 429 passes through, nothing is left
        // half-done (the quota slot is released).
        agent.state().create_error = Some(ErrorCode::CapacityExhausted);
        for _ in 0..3 {
            let e = router.create(&acme, python()).await.unwrap_err();
            assert_eq!(e.code, ErrorCode::CapacityExhausted);
        }
        agent.state().create_error = None;
        router.create(&acme, python()).await.unwrap();
        router.create(&acme, python()).await.unwrap();

        // Invalid input from the caller is refused before the agent.
        let before = agent.state().log.len();
        let e = router
            .step(
                &acme,
                &router.list(&acme)[0].session_id,
                RunStep {
                    step_id: Some("../x".into()),
                    ..step("1")
                },
            )
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::InvalidArgument);
        let mut other = python();
        other.tenant = Some("globex".into());
        assert_eq!(
            router.create(&acme, other).await.unwrap_err().code,
            ErrorCode::Forbidden
        );
        assert_eq!(agent.state().log.len(), before);
    }

    #[tokio::test]
    async fn an_agent_refusing_the_data_planes_credential_is_503_not_401() {
        let agent = FakeAgent::start().await;
        let dir = tempfile::tempdir().unwrap();
        let wrong = "w".repeat(43);
        let router = fake_agent::router_with(&agent.url, dir.path(), 1, &wrong);
        let acme = caller("acme");
        let e = router.create(&acme, python()).await.unwrap_err();
        assert_eq!(
            (e.code, e.code.http_status()),
            (ErrorCode::SandboxUnavailable, 503),
            "{}",
            e.message
        );
        assert!(!e.message.contains(&wrong));
        // The refused create left no slot held.
        assert!(router.list(&acme).is_empty());
        assert_eq!(router.count(), 0);
        assert_eq!(agent.state().creates, 0);
    }

    #[tokio::test]
    async fn an_agent_that_is_down_is_503_without_its_address() {
        let dir = tempfile::tempdir().unwrap();
        let url = fake_agent::closed_url();
        let port = url.rsplit(':').next().unwrap().to_owned();
        let no_address = |e: &CodedError| {
            assert_eq!(
                (e.code, e.code.http_status()),
                (ErrorCode::SandboxUnavailable, 503),
                "{}",
                e.message
            );
            assert!(
                !e.message.contains("127.0.0.1") && !e.message.contains(&port),
                "the agent's address leaked: {}",
                e.message
            );
        };
        let router = fake_agent::router(&url, dir.path(), 1);
        let acme = caller("acme");
        no_address(&router.create(&acme, python()).await.unwrap_err());
        // The failed create released its quota slot.
        assert!(router.list(&acme).is_empty());
        no_address(&router.agent_ready().await.unwrap_err());

        // A session whose agent goes away: its steps and files are 503 too.
        let agent = FakeAgent::start().await;
        let router = fake_agent::router(&agent.url, dir.path(), 1);
        let id = router.create(&acme, python()).await.unwrap().session_id;
        let port = agent.url.rsplit(':').next().unwrap().to_owned();
        agent.stop().await;
        for e in [
            router.step(&acme, &id, step("1")).await.unwrap_err(),
            router.read_path(&acme, &id, "").await.err().unwrap(),
            router.delete(&acme, &id).await.unwrap_err(),
        ] {
            assert_eq!(e.code, ErrorCode::SandboxUnavailable, "{}", e.message);
            assert!(
                !e.message.contains("127.0.0.1") && !e.message.contains(&port),
                "{}",
                e.message
            );
        }
        // A delete that could not reach the agent keeps the record.
        assert_eq!(router.list(&acme).len(), 1);
    }

    /// Two agents (two endpoints): a session is routed to the agent its
    /// record names (its handle's endpoint), not to the backend's own; this
    /// is what a backend with one agent per session (Kubernetes: one pod
    /// each) relies on. The local backend's handles all name its one agent,
    /// so a record provisioned on A is moved into a router whose backend is B.
    #[tokio::test]
    async fn each_session_is_routed_to_its_own_handles_endpoint() {
        let (a, b) = (FakeAgent::start().await, FakeAgent::start().await);
        let dir = tempfile::tempdir().unwrap();
        let acme = caller("acme");
        let on_a = fake_agent::router(&a.url, dir.path(), 4);
        let on_b = fake_agent::router(&b.url, dir.path(), 4);
        let s1 = on_a.create(&acme, python()).await.unwrap().session_id;
        let rec = on_a.records().remove(&s1).unwrap();
        assert_eq!(rec.endpoint, a.url, "the handle named A");
        on_b.records().insert(s1.clone(), rec);
        let s2 = on_b.create(&acme, python()).await.unwrap().session_id;
        assert_eq!(on_b.records()[&s2].endpoint, b.url);
        assert!(b.state().sessions.contains_key(&s2));
        assert!(!a.state().sessions.contains_key(&s2));

        let t1 = a.state().sessions[&s1].token.clone().unwrap();
        a.state().files.insert("on-a.txt".into(), b"a".to_vec());
        on_b.step(&acme, &s1, step("on a")).await.unwrap();
        on_b.step(&acme, &s2, step("on b")).await.unwrap();
        assert_eq!((a.state().steps, b.state().steps), (1, 1));
        let read = on_b.read_path(&acme, &s1, "on-a.txt").await.unwrap();
        assert!(matches!(read, PathRead::File { .. }), "read from A");
        let e = on_b.read_path(&acme, &s2, "on-a.txt").await.err().unwrap();
        assert_eq!(e.code, ErrorCode::FileNotFound, "B has no such file");
        on_b.delete(&acme, &s1).await.unwrap();
        assert_eq!((a.state().deletes, b.state().deletes), (1, 0));
        assert!(!a.state().sessions.contains_key(&s1));
        // B never heard of s1, nor saw its token.
        assert!(!b.state().log.iter().any(|l| l.contains(&s1)));
        assert!(!b.state().tokens_seen.contains(&t1));
    }

    /// A record written before records carried an endpoint (token sealed
    /// without it) still loads and routes to the local agent; a record whose
    /// endpoint was rewritten at rest does not open, so the token is never
    /// sent to the endpoint an attacker chose.
    #[tokio::test]
    async fn old_records_route_to_the_local_agent_and_a_rewritten_endpoint_does_not_open() {
        let agent = FakeAgent::start().await;
        let thief = FakeAgent::start().await;
        let dir = tempfile::tempdir().unwrap();
        let kek = SecretKey::generate();
        let store = || SessionRegistry::file(dir.path().join("registry")).unwrap();
        let acme = caller("acme");
        let first = fake_agent::router_on(
            &agent.url,
            dir.path(),
            4,
            fake_agent::ADMIN,
            store(),
            kek.clone(),
        );
        let old = first.create(&acme, python()).await.unwrap().session_id;
        let moved = first.create(&acme, python()).await.unwrap().session_id;
        drop(first);
        let rewrite = |id: &str, endpoint: Option<&str>, aad_endpoint: Option<&str>| {
            let path = dir.path().join("registry").join(format!("{id}.json"));
            let mut st: StoredSession =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            assert_eq!(st.endpoint.as_deref(), Some(agent.url.as_str()));
            let token = agent.state().sessions[id].token.clone().unwrap();
            st.endpoint = endpoint.map(str::to_owned);
            st.sealed_token = Some(kek.seal_secret(&token, &token_aad("acme", id, aad_endpoint)));
            std::fs::write(&path, serde_json::to_vec(&st).unwrap()).unwrap();
        };
        // The old format: no endpoint, sealed without one.
        rewrite(&old, None, None);
        // Pointed at another endpoint (the seal is the genuine one).
        rewrite(&moved, Some(&thief.url), Some(&agent.url));
        let again = fake_agent::router_on(
            &agent.url,
            dir.path(),
            4,
            fake_agent::ADMIN,
            store(),
            kek.clone(),
        );
        again.recover().await.unwrap();
        again.step(&acme, &old, step("1")).await.unwrap();
        assert_eq!(agent.state().steps, 1);
        let e = again.step(&acme, &moved, step("1")).await.unwrap_err();
        assert_eq!(e.code, ErrorCode::SessionNotFound);
        assert!(
            thief.state().log.is_empty(),
            "nothing reaches the rewritten endpoint"
        );
    }
}
