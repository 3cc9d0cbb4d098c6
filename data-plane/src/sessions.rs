//! Session routing: the data plane owns each session's record (tenant,
//! runtime, the agent token it generated) and forwards steps and file calls
//! to the agent with that token. Every lookup is scoped by tenant: another
//! tenant's session is indistinguishable from one that does not exist.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use bytes::Bytes;
use futures::Stream;
use shared::ErrorCode;
use shared::agent::{CreateSessionRequest, EffectiveLimits, StepRequest, StepResult, validate_id};
use shared::client::{AgentClient, ClientError, PathContent, StepEvent};
use shared::dataplane::{CreateSession, RunStep, SessionView};
use shared::server::ApiError;

use crate::auth::Caller;
use crate::config::AgentAuthMode;
use crate::dependencies::Dependencies;
use crate::registry::{SessionRegistry, StoredSession};
use crate::runtime::{RuntimeBackend, RuntimeRegistry};
use crate::telemetry::{Metrics, StartLabels, StepLabels};
use crate::workspace::artifacts::{ArtifactError, ArtifactStore};
use crate::workspace::crypto::{CryptoError, SecretKey};

/// Time allowed beyond a step's own timeout (interrupt grace, restart).
const STEP_MARGIN: Duration = Duration::from_millis(shared::dataplane::STEP_MARGIN_MS);

struct SessionRecord {
    tenant: String,
    runtime: String,
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

impl SessionRecord {
    fn stored(&self, id: &str, kek: &SecretKey) -> StoredSession {
        StoredSession {
            session_id: id.to_owned(),
            tenant: self.tenant.clone(),
            runtime: self.runtime.clone(),
            sealed_token: self
                .token
                .as_deref()
                .map(|t| kek.seal_secret(t, &format!("session:{id}"))),
            limits: self.limits,
            isolation: self.isolation.clone(),
            warm: self.warm,
            created_ms: self.created_ms,
            expires_ms: self.expires_ms,
            lost: self.lost,
        }
    }

    fn view(&self, id: &str) -> SessionView {
        SessionView {
            session_id: id.to_owned(),
            tenant: self.tenant.clone(),
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
    /// The agent's admin credential, for reaping orphan sandboxes.
    pub agent_admin_token: Option<String>,
    pub ready_timeout: Duration,
    pub agent_timeout: Duration,
    pub tenant_max_sessions: usize,
}

/// Everything a [`SessionService`] is built from.
pub struct SessionServiceParts {
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
pub struct SessionService {
    metrics: Arc<Metrics>,
    store: SessionRegistry,
    kek: SecretKey,
    dependencies: Dependencies,
    registry: RuntimeRegistry,
    artifacts: ArtifactStore,
    backend: RuntimeBackend,
    settings: SessionSettings,
    records: Mutex<HashMap<String, SessionRecord>>,
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
fn agent_error(e: ClientError) -> ApiError {
    match e {
        ClientError::Api { body, .. } => ApiError::new(body.code, body.message),
        ClientError::Protocol { status, detail } => ApiError::new(
            ErrorCode::SandboxUnavailable,
            format!("the session agent answered outside its contract ({status}): {detail}"),
        ),
        ClientError::Transport(e) => ApiError::new(
            ErrorCode::SandboxUnavailable,
            format!("the session agent is unreachable: {e}"),
        ),
    }
}

/// An artifact store failure, mapped to the error contract.
pub fn artifact_error(e: ArtifactError) -> ApiError {
    match e {
        ArtifactError::NotFound | ArtifactError::Crypto(CryptoError::KeyDestroyed) => {
            ApiError::new(ErrorCode::ArtifactNotFound, "no such artifact")
        }
        ArtifactError::TooLarge(max) => ApiError::new(
            ErrorCode::PayloadTooLarge,
            format!("the artifact is larger than {max} bytes"),
        ),
        ArtifactError::Crypto(e) => ApiError::new(ErrorCode::IntegrityError, e.to_string()),
        ArtifactError::Upload(m) => ApiError::new(
            ErrorCode::InvalidArgument,
            format!("the upload broke off: {m}"),
        ),
        ArtifactError::Io(e) => {
            ApiError::new(ErrorCode::Internal, format!("artifact storage failed: {e}"))
        }
    }
}

/// Bounds a call to the agent in time.
async fn bounded<T>(
    limit: Duration,
    fut: impl Future<Output = Result<T, ClientError>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(limit, fut).await {
        Ok(r) => r.map_err(agent_error),
        Err(_) => Err(ApiError::new(
            ErrorCode::SandboxUnavailable,
            format!(
                "the session agent did not answer within {} ms",
                limit.as_millis()
            ),
        )),
    }
}

impl SessionService {
    pub fn new(parts: SessionServiceParts) -> Self {
        let SessionServiceParts {
            registry,
            backend,
            artifacts,
            settings,
            metrics,
            store,
            kek,
            dependencies,
        } = parts;
        SessionService {
            metrics,
            store,
            kek,
            dependencies,
            registry,
            artifacts,
            backend,
            settings,
            records: Mutex::new(HashMap::new()),
        }
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
    fn route(&self, caller: &Caller, id: &str) -> Result<Route, ApiError> {
        let mut records = self.records();
        let not_found = || ApiError::new(ErrorCode::SessionNotFound, format!("no session {id}"));
        let rec = records.get(id).ok_or_else(not_found)?;
        if rec.tenant != caller.tenant {
            return Err(not_found());
        }
        if rec.expires_ms <= now_ms() {
            // The agent ended it on its TTL; forget it here too (the stored
            // record goes at the next restart's recovery).
            records.remove(id);
            return Err(not_found());
        }
        if rec.lost {
            return Err(ApiError::new(
                ErrorCode::SessionLost,
                format!(
                    "session {id}'s sandbox vanished while the data plane restarted; delete it"
                ),
            ));
        }
        Ok(Route {
            // The caller's request id and trace context travel on to the agent.
            agent: self.backend.agent().with_context(
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
    ) -> Result<SessionView, ApiError> {
        if let Some(t) = &req.tenant
            && *t != caller.tenant
        {
            return Err(ApiError::new(
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
        // Packages: allowlisted (each decision audited and counted), then
        // installed outside the sandbox before it exists.
        let packages_dir = match req.packages.as_deref() {
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
                let checked = checked?;
                let (deps, name) = (self.dependencies.clone(), runtime.name.clone());
                let dir = tokio::task::spawn_blocking(move || deps.install(&name, &checked))
                    .await
                    .map_err(|_| ApiError::new(ErrorCode::Internal, "the install task failed"))??;
                Some(dir.display().to_string())
            }
            _ => None,
        };
        let id = format!("ses-{}", hex_id());
        {
            let mut records = self.records();
            let now = now_ms();
            records.retain(|_, r| r.expires_ms > now);
            let live = records
                .values()
                .filter(|r| r.tenant == caller.tenant)
                .count();
            if live >= self.settings.tenant_max_sessions {
                return Err(ApiError::new(
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
        };
        let started = std::time::Instant::now();
        let created = bounded(
            self.settings.ready_timeout,
            self.backend.agent().create_session(&agent_req),
        )
        .await;
        let info = match created {
            Ok(info) => info,
            Err(e) => {
                self.records().remove(&id);
                // A create that timed out may still finish on the agent.
                if e.code == ErrorCode::SandboxUnavailable {
                    self.forget_on_agent(&id, token);
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
            token,
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
            self.forget_on_agent(&id, rec.token);
            return Err(ApiError::new(
                ErrorCode::Internal,
                format!("could not record the session: {e}"),
            ));
        }
        let view = rec.view(&id);
        self.records().insert(id.clone(), rec);
        tracing::info!(session = %id, tenant = %caller.tenant, runtime = %view.runtime, warm = view.warm, "session created");
        Ok(view)
    }

    /// Deletes a session on the agent in the background (best effort).
    fn forget_on_agent(&self, id: &str, token: Option<String>) {
        let agent = self.backend.agent().clone();
        let limit = self.settings.agent_timeout;
        let id = id.to_owned();
        tokio::spawn(async move {
            let _ = tokio::time::timeout(limit, agent.delete_session(&id, token.as_deref())).await;
        });
    }

    /// Destroys agent sessions no record owns (with the admin credential).
    async fn reap_orphans(&self) -> usize {
        let Some(admin) = self.settings.agent_admin_token.as_deref() else {
            return 0;
        };
        let agent = self.backend.agent();
        let Ok(Ok(list)) =
            tokio::time::timeout(self.settings.agent_timeout, agent.list_all_sessions(admin)).await
        else {
            tracing::warn!("could not list the agent's sessions; orphans are left to their TTL");
            return 0;
        };
        let mut reaped = 0;
        for s in list.sessions {
            if self.records().contains_key(&s.session_id) {
                continue;
            }
            tracing::warn!(session = %s.session_id, "destroying a sandbox no session record owns");
            if tokio::time::timeout(
                self.settings.agent_timeout,
                agent.admin_delete_session(&s.session_id, admin),
            )
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
    pub async fn recover(&self) -> Result<(), ApiError> {
        let stored = self.store.load().await.map_err(|e| {
            ApiError::new(
                ErrorCode::Internal,
                format!("loading the session registry: {e}"),
            )
        })?;
        let now = now_ms();
        let (mut kept, mut lost) = (0, 0);
        for st in stored {
            let id = st.session_id.clone();
            if st.expires_ms <= now {
                let _ = self.store.remove(&id).await;
                continue;
            }
            let token = match &st.sealed_token {
                Some(sealed) => match self.kek.open_secret(sealed, &format!("session:{id}")) {
                    Ok(t) => Some(t),
                    Err(e) => {
                        tracing::warn!(session = %id, error = %e, "stored session token does not open; dropping the record");
                        let _ = self.store.remove(&id).await;
                        continue;
                    }
                },
                None => None,
            };
            let mut rec = SessionRecord {
                tenant: st.tenant,
                runtime: st.runtime,
                token,
                limits: st.limits,
                isolation: st.isolation,
                warm: st.warm,
                created_ms: st.created_ms,
                expires_ms: st.expires_ms,
                lost: st.lost,
            };
            if !rec.lost {
                let probe = bounded(
                    self.settings.agent_timeout,
                    self.backend.agent().get_session(&id, rec.token.as_deref()),
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

    pub fn get(&self, caller: &Caller, id: &str) -> Result<SessionView, ApiError> {
        self.route(caller, id)?;
        let records = self.records();
        let rec = records
            .get(id)
            .ok_or_else(|| ApiError::new(ErrorCode::SessionNotFound, format!("no session {id}")))?;
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

    /// Ends a session: the agent destroys its sandbox and workspace.
    pub async fn delete(&self, caller: &Caller, id: &str) -> Result<(), ApiError> {
        let route = match self.route(caller, id) {
            // A lost session can (only) be deleted: nothing to tear down.
            Err(e) if e.code == ErrorCode::SessionLost => None,
            other => Some(other?),
        };
        if let Some(route) = route {
            let result = bounded(
                self.settings.agent_timeout,
                route.agent.delete_session(id, route.token.as_deref()),
            )
            .await;
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

    fn step_request(id: &str, step: RunStep) -> Result<StepRequest, ApiError> {
        let step_id = step.step_id.unwrap_or_else(|| format!("step-{}", hex_id()));
        validate_id("stepId", &step_id)
            .map_err(|m| ApiError::new(ErrorCode::InvalidArgument, m))?;
        Ok(StepRequest {
            session_id: id.to_owned(),
            step_id,
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
    ) -> Result<StepResult, ApiError> {
        let route = self.route(caller, id)?;
        let req = Self::step_request(id, step)?;
        let started = std::time::Instant::now();
        let result = bounded(
            Self::step_bound(&route, &req),
            route.agent.step(&req, route.token.as_deref()),
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
    ) -> Result<impl Stream<Item = Result<StepEvent, ClientError>> + use<>, ApiError> {
        let route = self.route(caller, id)?;
        let req = Self::step_request(id, step)?;
        bounded(
            self.settings.agent_timeout,
            route.agent.step_stream(&req, route.token.as_deref()),
        )
        .await
    }

    pub async fn read_path(
        &self,
        caller: &Caller,
        id: &str,
        path: &str,
    ) -> Result<PathContent, ApiError> {
        let route = self.route(caller, id)?;
        bounded(
            self.settings.agent_timeout,
            route.agent.read_path(id, path, route.token.as_deref()),
        )
        .await
    }

    pub async fn write_file(
        &self,
        caller: &Caller,
        id: &str,
        path: &str,
        body: Bytes,
    ) -> Result<(), ApiError> {
        let route = self.route(caller, id)?;
        bounded(
            self.settings.agent_timeout,
            route
                .agent
                .write_file(id, path, body, route.token.as_deref()),
        )
        .await
    }

    pub async fn delete_file(&self, caller: &Caller, id: &str, path: &str) -> Result<(), ApiError> {
        let route = self.route(caller, id)?;
        bounded(
            self.settings.agent_timeout,
            route.agent.delete_file(id, path, route.token.as_deref()),
        )
        .await
    }

    /// Whether the session registry answers (for `/readyz`).
    pub async fn registry_ready(&self) -> Result<(), ApiError> {
        match tokio::time::timeout(Duration::from_secs(2), self.store.ping()).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(ApiError::new(
                ErrorCode::SandboxUnavailable,
                format!("the session registry is unavailable: {e}"),
            )),
            Err(_) => Err(ApiError::new(
                ErrorCode::SandboxUnavailable,
                "the session registry did not answer within 2 s",
            )),
        }
    }

    /// Whether the agent answers (for `/readyz`).
    pub async fn agent_ready(&self) -> Result<(), ApiError> {
        bounded(Duration::from_secs(2), self.backend.agent().health())
            .await
            .map(|_| ())
    }
}

fn hex_id() -> String {
    rand::random::<[u8; 12]>()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}
