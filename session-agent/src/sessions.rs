//! Sessions: one sandboxed kernel and one workspace each, addressed by the
//! session id and guarded by the session's token; ended by DELETE, TTL, idle
//! timeout or agent shutdown, always destroying sandbox and workspace.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use shared::CodedError;
use shared::ErrorCode;
use shared::agent::{
    CreateSessionRequest, EffectiveLimits, Limits, Runtime, SessionInfo, StepMode, StepRequest,
    StepResult, StepStatus, validate_id,
};
use subtle::ConstantTimeEq;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::isolation::{Launcher, SandboxSpec};
use crate::kernels::{ExecRequest, Interpreters, Kernel, OutputEvent};
use crate::pool::{WarmPool, WarmSandbox};
use crate::workspace::Workspace;
use shared::secrets::{Masker, SecretEnv};

/// Minimum length of a session token: a 256-bit token is 43 characters in
/// base64url and 64 in hex. Length is only a floor; the data plane generates
/// tokens from a CSPRNG.
pub const MIN_TOKEN_LEN: usize = 43;

/// A shell command that prints a valid token: 32 random bytes in unpadded
/// base64url, 43 characters. Named in the messages that refuse a short one.
pub const MAKE_TOKEN_COMMAND: &str = "head -c 32 /dev/urandom | base64 | tr '+/' '-_' | tr -d '='";

/// Session policy: defaults, maximums and timeouts.
#[derive(Debug, Clone)]
pub struct Settings {
    pub defaults: EffectiveLimits,
    pub maximums: EffectiveLimits,
    pub auth_bypass: bool,
    /// Digest of `SESSION_AGENT_ADMIN_TOKEN`: creates sessions, lists and
    /// deletes any. `None` (only with auth bypass): nobody holds it.
    pub admin_token: Option<[u8; 32]>,
    pub max_sessions: usize,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub default_idle_timeout: Duration,
    pub ready_timeout: Duration,
    pub interrupt_grace: Duration,
    pub workspace_root: PathBuf,
    /// The only tree a session's `packagesDir` may come from.
    pub package_root: PathBuf,
    /// The interpreters kernels run (their argv is built by `kernels`).
    pub interpreters: Interpreters,
    /// One session in the agent's lifetime (`SESSION_ISOLATION=pod`: the
    /// pod is the sandbox, never reused): once one was created, creation is
    /// refused, even after it ended.
    pub single_use: bool,
}

impl Settings {
    /// See [`SessionManager::authorize_create`].
    fn authorize_create(&self, presented: Option<&str>) -> Result<(), CodedError> {
        if self.auth_bypass || self.is_admin(presented) {
            return Ok(());
        }
        Err(CodedError::new(
            ErrorCode::Unauthorized,
            "creating a session needs the data plane's credential (X-Agent-Admin-Token)",
        ))
    }

    /// Whether `presented` is the admin credential (constant-time compare of
    /// digests); no credential configured admits nobody.
    fn is_admin(&self, presented: Option<&str>) -> bool {
        match (self.admin_token, presented) {
            (Some(want), Some(p)) => bool::from(TokenDigest::of(p).0.ct_eq(&want)),
            _ => false,
        }
    }

    /// Applies defaults and refuses anything above a maximum, naming it.
    pub fn resolve_limits(&self, req: Option<&Limits>) -> Result<EffectiveLimits, CodedError> {
        let req = req.cloned().unwrap_or_default();
        let d = &self.defaults;
        let m = &self.maximums;
        let pick = |name: &str,
                    v: Option<u64>,
                    default: u64,
                    max: u64,
                    min: u64|
         -> Result<u64, CodedError> {
            let v = v.unwrap_or(default);
            if v > max {
                return Err(CodedError::new(
                    ErrorCode::LimitExceeded,
                    format!("limits.{name} = {v} is above the maximum of {max}"),
                ));
            }
            if v < min {
                return Err(CodedError::new(
                    ErrorCode::InvalidArgument,
                    format!("limits.{name} = {v} is below the minimum of {min}"),
                ));
            }
            Ok(v)
        };
        Ok(EffectiveLimits {
            memory_mb: pick("memoryMb", req.memory_mb, d.memory_mb, m.memory_mb, 64)?,
            cpu_millicores: pick(
                "cpuMillicores",
                req.cpu_millicores,
                d.cpu_millicores,
                m.cpu_millicores,
                10,
            )?,
            max_processes: pick(
                "maxProcesses",
                req.max_processes,
                d.max_processes,
                m.max_processes,
                8,
            )?,
            disk_mb: pick("diskMb", req.disk_mb, d.disk_mb, m.disk_mb, 1)?,
            timeout_ms: pick("timeoutMs", req.timeout_ms, d.timeout_ms, m.timeout_ms, 1)?,
            max_output_bytes: pick(
                "maxOutputBytes",
                req.max_output_bytes,
                d.max_output_bytes,
                m.max_output_bytes,
                1,
            )?,
        })
    }
}

/// A fresh sandbox id, also the workspace directory's name.
fn new_sandbox_id() -> String {
    format!(
        "{}{}",
        crate::workspace::WORKSPACE_PREFIX,
        hex::encode(rand::random::<[u8; 8]>())
    )
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// SHA-256 of a token: compared in constant time, the token itself is not kept.
#[derive(Clone)]
pub(crate) struct TokenDigest(pub(crate) [u8; 32]);

impl TokenDigest {
    pub(crate) fn of(token: &str) -> Self {
        TokenDigest(Sha256::digest(token.as_bytes()).into())
    }

    fn matches(&self, presented: Option<&str>) -> bool {
        let Some(p) = presented else { return false };
        bool::from(Self::of(p).0.ct_eq(&self.0))
    }
}

/// One live session.
pub struct Session {
    pub id: String,
    pub runtime: Runtime,
    pub limits: EffectiveLimits,
    token: Option<TokenDigest>,
    env: BTreeMap<String, String>,
    /// Secret values (interpreter environment only; kept for restarts).
    secrets: SecretEnv,
    /// Replaces the secret values in everything a step returns.
    masker: Masker,
    pub workspace: Workspace,
    /// Installed packages mounted read-only (kept for restarts).
    packages: Option<PathBuf>,
    /// `None` once the interpreter died and could not be restarted.
    kernel: Arc<AsyncMutex<Option<Kernel>>>,
    /// Cancelled when the session ends; a running step stops.
    ended: CancellationToken,
    created_ms: u64,
    expires_ms: u64,
    idle_timeout_ms: u64,
    last_used_ms: AtomicU64,
    steps: AtomicU64,
    restarts: AtomicU64,
    warm: bool,
    destroyed: AtomicBool,
    isolation: &'static str,
}

impl Session {
    pub fn info(&self) -> SessionInfo {
        SessionInfo {
            session_id: self.id.clone(),
            runtime: self.runtime,
            isolation: self.isolation.to_owned(),
            limits: self.limits,
            created_at_ms: self.created_ms,
            expires_at_ms: self.expires_ms,
            last_used_at_ms: self.last_used_ms.load(Ordering::Relaxed),
            warm: self.warm,
            steps: self.steps.load(Ordering::Relaxed),
            restarts: self.restarts.load(Ordering::Relaxed),
        }
    }

    fn touch(&self) {
        self.last_used_ms.store(now_ms(), Ordering::Relaxed);
    }

    fn expired(&self, now: u64) -> Option<&'static str> {
        if now >= self.expires_ms {
            Some("ttl")
        } else if now.saturating_sub(self.last_used_ms.load(Ordering::Relaxed))
            >= self.idle_timeout_ms
            && self.kernel.try_lock().is_ok()
        {
            Some("idle")
        } else {
            None
        }
    }
}

enum Slot {
    Creating,
    Ready(Arc<Session>),
}

/// All sessions of this agent.
pub struct SessionManager {
    settings: Settings,
    launcher: Launcher,
    pool: Arc<WarmPool>,
    slots: Mutex<HashMap<String, Slot>>,
    /// A session was created; read and written under the `slots` lock.
    /// Only consulted when `settings.single_use`.
    served: AtomicBool,
    tasks: TaskTracker,
    shutdown: CancellationToken,
}

/// A step holding its session's kernel.
pub struct StepRun {
    session: Arc<Session>,
    kernel: OwnedMutexGuard<Option<Kernel>>,
    req: StepRequest,
}

impl SessionManager {
    pub fn new(
        settings: Settings,
        launcher: Launcher,
        pool: Arc<WarmPool>,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        Arc::new(SessionManager {
            settings,
            launcher,
            pool,
            slots: Mutex::new(HashMap::new()),
            served: AtomicBool::new(false),
            tasks: TaskTracker::new(),
            shutdown,
        })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    pub fn pool(&self) -> &Arc<WarmPool> {
        &self.pool
    }

    pub fn launcher(&self) -> &Launcher {
        &self.launcher
    }

    fn slots(&self) -> std::sync::MutexGuard<'_, HashMap<String, Slot>> {
        self.slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Number of live sessions.
    pub fn count(&self) -> usize {
        self.slots()
            .values()
            .filter(|s| matches!(s, Slot::Ready(_)))
            .count()
    }

    /// Starts a sandbox with `limits` and a fresh workspace (a cold start).
    pub async fn start_cold(
        &self,
        runtime: Runtime,
        limits: EffectiveLimits,
        packages: Option<PathBuf>,
    ) -> Result<WarmSandbox, String> {
        let sandbox_id = new_sandbox_id();
        let workspace =
            Workspace::create(&self.settings.workspace_root, &sandbox_id, limits.disk_mb)
                .map_err(|e| format!("workspace: {e}"))?;
        let spec = SandboxSpec {
            sandbox_id,
            runtime,
            argv: self.settings.interpreters.argv(runtime, &limits),
            workspace: workspace.host_path.clone(),
            limits,
            packages,
        };
        match Kernel::start(
            &self.launcher,
            &spec,
            self.settings.ready_timeout,
            self.settings.interrupt_grace,
        )
        .await
        {
            Ok(kernel) => Ok(WarmSandbox { kernel, workspace }),
            Err(e) => {
                workspace.destroy();
                Err(e.to_string())
            }
        }
    }

    /// A packages directory: it must be a directory inside the package root
    /// (after resolving symlinks), so a caller cannot mount any host path.
    fn package_dir(&self, dir: &str) -> Result<PathBuf, CodedError> {
        let bad =
            |m: &str| CodedError::new(ErrorCode::InvalidArgument, format!("packagesDir: {m}"));
        let root = std::fs::canonicalize(&self.settings.package_root)
            .map_err(|_| bad("this agent has no package root (SESSION_AGENT_PACKAGE_ROOT)"))?;
        let path = std::fs::canonicalize(dir).map_err(|_| bad("no such directory"))?;
        if path == root || !path.starts_with(&root) || !path.is_dir() {
            return Err(bad("must be a directory inside the agent's package root"));
        }
        Ok(path)
    }

    /// `POST /v1/sessions`.
    pub async fn create(&self, req: CreateSessionRequest) -> Result<SessionInfo, CodedError> {
        if self.shutdown.is_cancelled() {
            return Err(CodedError::new(
                ErrorCode::ShuttingDown,
                "the agent is shutting down",
            ));
        }
        validate_id("sessionId", &req.session_id)
            .map_err(|m| CodedError::new(ErrorCode::InvalidArgument, m))?;
        let runtime = Runtime::parse(&req.runtime).ok_or_else(|| {
            CodedError::new(
                ErrorCode::UnknownRuntime,
                format!(
                    "unknown runtime {:?}; available: python, node, bash",
                    req.runtime
                ),
            )
        })?;
        let token = match (&req.token, self.settings.auth_bypass) {
            (Some(t), _) if t.len() < MIN_TOKEN_LEN => {
                return Err(CodedError::new(
                    ErrorCode::InvalidArgument,
                    format!(
                        "token must be at least {MIN_TOKEN_LEN} characters (a 256-bit secret); make one with: {MAKE_TOKEN_COMMAND}"
                    ),
                ));
            }
            (Some(t), _) => Some(TokenDigest::of(t)),
            (None, true) => None,
            (None, false) => {
                return Err(CodedError::new(
                    ErrorCode::InvalidArgument,
                    "token is required (auth is enforced)",
                ));
            }
        };
        let limits = self.settings.resolve_limits(req.limits.as_ref())?;
        let env = req.env.clone().unwrap_or_default();
        let packages = match &req.packages_dir {
            Some(dir) => Some(self.package_dir(dir)?),
            None => None,
        };
        validate_env(&env)?;
        let secrets = req.secrets.clone().unwrap_or_default();
        validate_secrets(&secrets, &env)?;
        let ttl = req
            .ttl_seconds
            .map(Duration::from_secs)
            .unwrap_or(self.settings.default_ttl);
        if ttl.is_zero() {
            return Err(CodedError::new(
                ErrorCode::InvalidArgument,
                "ttlSeconds must be at least 1",
            ));
        }
        if ttl > self.settings.max_ttl {
            return Err(CodedError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "ttlSeconds = {} is above the maximum of {}",
                    ttl.as_secs(),
                    self.settings.max_ttl.as_secs()
                ),
            ));
        }
        let idle = req
            .idle_timeout_seconds
            .map(Duration::from_secs)
            .unwrap_or(self.settings.default_idle_timeout);
        if idle.is_zero() {
            return Err(CodedError::new(
                ErrorCode::InvalidArgument,
                "idleTimeoutSeconds must be at least 1",
            ));
        }

        {
            let mut slots = self.slots();
            if slots.contains_key(&req.session_id) {
                return Err(CodedError::new(
                    ErrorCode::SessionExists,
                    format!("session {} already exists", req.session_id),
                ));
            }
            if slots.len() >= self.settings.max_sessions {
                return Err(CodedError::new(
                    ErrorCode::CapacityExhausted,
                    format!(
                        "the agent holds its maximum of {} sessions",
                        self.settings.max_sessions
                    ),
                ));
            }
            if self.settings.single_use && (self.served.load(Ordering::SeqCst) || !slots.is_empty())
            {
                return Err(CodedError::new(
                    ErrorCode::CapacityExhausted,
                    "this agent serves one session in its lifetime: with SESSION_ISOLATION=pod \
                     the pod is the sandbox and is never reused (start a new pod)",
                ));
            }
            slots.insert(req.session_id.clone(), Slot::Creating);
        }
        match self
            .provision(runtime, limits, (&env, &secrets), packages.clone())
            .await
        {
            Ok((warm, sandbox)) => {
                let now = now_ms();
                let session = Arc::new(Session {
                    id: req.session_id.clone(),
                    runtime,
                    limits,
                    token,
                    env,
                    masker: Masker::new(secrets.values()),
                    secrets,
                    workspace: sandbox.workspace,
                    packages,
                    kernel: Arc::new(AsyncMutex::new(Some(sandbox.kernel))),
                    ended: CancellationToken::new(),
                    created_ms: now,
                    expires_ms: now + ttl.as_millis() as u64,
                    idle_timeout_ms: idle.as_millis() as u64,
                    last_used_ms: AtomicU64::new(now),
                    steps: AtomicU64::new(0),
                    restarts: AtomicU64::new(0),
                    warm,
                    destroyed: AtomicBool::new(false),
                    isolation: self.launcher.kind().as_str(),
                });
                if self.launcher.kind() == crate::isolation::IsolationKind::None {
                    tracing::warn!(session = %session.id, "INSECURE: session runs without isolation (SESSION_ISOLATION=none)");
                }
                if session.token.is_none() {
                    tracing::warn!(session = %session.id, "session created without a token (SESSION_AGENT_AUTH_BYPASS=true)");
                }
                tracing::info!(session = %session.id, runtime = %runtime, warm, "session created");
                let info = session.info();
                {
                    let mut slots = self.slots();
                    slots.insert(req.session_id, Slot::Ready(session));
                    self.served.store(true, Ordering::SeqCst);
                }
                if self.shutdown.is_cancelled() {
                    // Shutdown raced the creation: tear it down like the rest.
                    let _ = self.end(&info.session_id, "shutdown").await;
                    return Err(CodedError::new(
                        ErrorCode::ShuttingDown,
                        "the agent is shutting down",
                    ));
                }
                Ok(info)
            }
            Err(e) => {
                // No session code ran: a retry on the same pod may create it.
                self.slots().remove(&req.session_id);
                Err(e)
            }
        }
    }

    /// A sandbox for a new session: from the warm pool when the session uses
    /// the default limits, otherwise (or when the pool is empty) a cold start.
    async fn provision(
        &self,
        runtime: Runtime,
        limits: EffectiveLimits,
        (env, secrets): (&BTreeMap<String, String>, &SecretEnv),
        packages: Option<PathBuf>,
    ) -> Result<(bool, WarmSandbox), CodedError> {
        // A single-use agent's pool held its one pre-started interpreter:
        // whatever this session takes, no other is started.
        if self.settings.single_use {
            self.pool.retire();
        }
        // Pooled sandboxes have the default limits and no packages.
        if limits == self.settings.defaults
            && packages.is_none()
            && let Some(mut warm) = self.pool.claim(runtime)
        {
            match warm
                .kernel
                .set_env(env, secrets, self.settings.ready_timeout)
                .await
            {
                Ok(()) => return Ok((true, warm)),
                Err(e) => {
                    tracing::warn!(error = %e, "a warm sandbox was dead; starting a cold one");
                    warm.kernel.destroy().await;
                    warm.workspace.destroy();
                }
            }
        }
        let mut sandbox = self
            .start_cold(runtime, limits, packages)
            .await
            .map_err(|e| {
                CodedError::new(
                    ErrorCode::SandboxStartFailed,
                    format!("could not start the sandbox: {e}"),
                )
            })?;
        if !(env.is_empty() && secrets.is_empty())
            && let Err(e) = sandbox
                .kernel
                .set_env(env, secrets, self.settings.ready_timeout)
                .await
        {
            sandbox.kernel.destroy().await;
            sandbox.workspace.destroy();
            return Err(CodedError::new(
                ErrorCode::SandboxStartFailed,
                e.to_string(),
            ));
        }
        Ok((false, sandbox))
    }

    /// Finds a session and checks the presented token.
    pub fn authorize(&self, id: &str, token: Option<&str>) -> Result<Arc<Session>, CodedError> {
        let session = match self.slots().get(id) {
            Some(Slot::Ready(s)) => s.clone(),
            _ => {
                return Err(CodedError::new(
                    ErrorCode::SessionNotFound,
                    format!("no session {id}"),
                ));
            }
        };
        if let Some(digest) = &session.token
            && !self.settings.auth_bypass
            && !digest.matches(token)
        {
            return Err(CodedError::new(
                ErrorCode::Unauthorized,
                "missing or wrong X-Session-Token",
            ));
        }
        // Any authorized request (steps, files, reads) keeps a session alive.
        session.touch();
        Ok(session)
    }

    /// Who may create a session (and so choose its limits and `packagesDir`):
    /// only the holder of the admin credential, the data plane, unless auth
    /// is bypassed. Checked before anything is parsed or started.
    pub fn authorize_create(&self, presented: Option<&str>) -> Result<(), CodedError> {
        self.settings.authorize_create(presented)
    }

    /// Whether `presented` is the admin credential (constant-time compare).
    pub fn is_admin(&self, presented: Option<&str>) -> bool {
        self.settings.is_admin(presented)
    }

    /// Every session (admin).
    pub fn list_all(&self) -> Vec<SessionInfo> {
        let mut out: Vec<SessionInfo> = self
            .slots()
            .values()
            .filter_map(|s| match s {
                Slot::Ready(s) => Some(s.info()),
                Slot::Creating => None,
            })
            .collect();
        out.sort_by(|a, b| a.session_id.cmp(&b.session_id));
        out
    }

    /// Sessions visible to the caller: all with auth bypass, otherwise the
    /// ones the presented token opens (a token is scoped to one session).
    pub fn list(&self, token: Option<&str>) -> Vec<SessionInfo> {
        let slots = self.slots();
        let mut out: Vec<SessionInfo> = slots
            .values()
            .filter_map(|s| match s {
                Slot::Ready(s) => Some(s),
                Slot::Creating => None,
            })
            .filter(|s| {
                self.settings.auth_bypass || s.token.as_ref().is_some_and(|d| d.matches(token))
            })
            .map(|s| s.info())
            .collect();
        out.sort_by(|a, b| a.session_id.cmp(&b.session_id));
        out
    }

    /// Validates a step and takes the session's kernel for it.
    pub fn begin_step(&self, req: StepRequest, token: Option<&str>) -> Result<StepRun, CodedError> {
        validate_id("stepId", &req.step_id)
            .map_err(|m| CodedError::new(ErrorCode::InvalidArgument, m))?;
        let session = self.authorize(&req.session_id, token)?;
        let mode = req.mode.unwrap_or_default();
        if mode == StepMode::Handler && session.runtime == Runtime::Bash {
            return Err(CodedError::new(
                ErrorCode::UnsupportedMode,
                "handler mode is available for python and node",
            ));
        }
        if session.runtime == Runtime::Bash && req.code.contains('\0') {
            return Err(CodedError::new(
                ErrorCode::InvalidArgument,
                "bash code cannot contain NUL bytes",
            ));
        }
        if req.timeout_ms == Some(0) {
            return Err(CodedError::new(
                ErrorCode::InvalidArgument,
                "timeoutMs must be at least 1",
            ));
        }
        if let Some(t) = req.timeout_ms
            && t > self.settings.maximums.timeout_ms
        {
            return Err(CodedError::new(
                ErrorCode::LimitExceeded,
                format!(
                    "timeoutMs = {t} is above the maximum of {}",
                    self.settings.maximums.timeout_ms
                ),
            ));
        }
        let kernel = session.kernel.clone().try_lock_owned().map_err(|_| {
            CodedError::new(
                ErrorCode::SessionBusy,
                format!("session {} is running another step", session.id),
            )
        })?;
        if kernel.is_none() {
            return Err(CodedError::new(
                ErrorCode::SandboxUnavailable,
                format!(
                    "session {}'s sandbox is gone and could not be restarted; delete it",
                    session.id
                ),
            ));
        }
        session.touch();
        Ok(StepRun {
            session,
            kernel,
            req,
        })
    }

    /// Runs a step to its end, restarting the interpreter when it died.
    pub async fn run_step(
        &self,
        mut run: StepRun,
        sink: Option<mpsc::UnboundedSender<OutputEvent>>,
    ) -> StepResult {
        let started = std::time::Instant::now();
        let session = run.session.clone();
        let limits = session.limits;
        let timeout = Duration::from_millis(run.req.timeout_ms.unwrap_or(limits.timeout_ms));
        let exec = ExecRequest {
            code: &run.req.code,
            mode: run.req.mode.unwrap_or_default(),
            event: run.req.event.as_ref(),
            timeout,
            max_output: usize::try_from(limits.max_output_bytes).unwrap_or(usize::MAX),
        };
        let output_before = session.workspace.output_snapshot();
        // With secrets, the stream passes through a masker on its way out,
        // run beside the step (no task of its own); it ends, flushing what
        // it held back, once the step drops its sender.
        let (sink, forward) = match sink {
            Some(outer) if !session.masker.is_empty() => {
                let (tx, rx) = mpsc::unbounded_channel();
                let forward = forward_masked(session.masker.clone(), rx, outer);
                (Some(tx), Some(forward))
            }
            other => (other, None),
        };
        let (kernel, ended) = (run.kernel.as_mut(), &session.ended);
        let exec = &exec;
        let step = async move {
            let outcome = match kernel {
                Some(kernel) => kernel.execute(exec, sink.as_ref(), ended).await,
                None => unreachable_kernel(),
            };
            drop(sink);
            outcome
        };
        let mut outcome = match forward {
            Some(forward) => tokio::join!(step, forward).0,
            None => step.await,
        };
        mask_result(&session.masker, &mut outcome);
        let mut state_lost = false;
        if outcome.kernel_dead {
            state_lost = true;
            if let Some(old) = run.kernel.take() {
                // Teardown of the dead sandbox overlaps the restart.
                self.tasks.spawn(old.destroy());
            }
            if !session.ended.is_cancelled() {
                session.restarts.fetch_add(1, Ordering::Relaxed);
                *run.kernel = self.restart(&session).await;
            }
        }
        session.steps.fetch_add(1, Ordering::Relaxed);
        session.touch();
        let result = StepResult {
            session_id: session.id.clone(),
            step_id: run.req.step_id.clone(),
            status: outcome.status,
            stdout: outcome.stdout,
            stderr: outcome.stderr,
            result: outcome.result,
            error: outcome.error,
            duration_ms: started.elapsed().as_millis() as u64,
            truncated: outcome.truncated,
            state_lost,
            output_files: session.workspace.output_changes(&output_before),
        };
        tracing::debug!(session = %session.id, step = %result.step_id, status = ?result.status,
            duration_ms = result.duration_ms, "step finished");
        result
    }

    /// A fresh interpreter on the session's existing workspace.
    async fn restart(&self, session: &Session) -> Option<Kernel> {
        let spec = SandboxSpec {
            sandbox_id: new_sandbox_id(),
            runtime: session.runtime,
            argv: self
                .settings
                .interpreters
                .argv(session.runtime, &session.limits),
            workspace: session.workspace.host_path.clone(),
            limits: session.limits,
            packages: session.packages.clone(),
        };
        let started = Kernel::start(
            &self.launcher,
            &spec,
            self.settings.ready_timeout,
            self.settings.interrupt_grace,
        )
        .await;
        match started {
            Ok(mut k) => {
                if let Err(e) = k
                    .set_env(&session.env, &session.secrets, self.settings.ready_timeout)
                    .await
                {
                    tracing::warn!(session = %session.id, error = %e, "restarted interpreter refused its environment");
                    k.destroy().await;
                    return None;
                }
                tracing::warn!(session = %session.id, "interpreter restarted; session state was lost");
                Some(k)
            }
            Err(e) => {
                tracing::error!(session = %session.id, error = %e, "could not restart the interpreter");
                None
            }
        }
    }

    /// Ends a session: stops a running step, destroys sandbox and workspace.
    pub async fn end(&self, id: &str, reason: &'static str) -> Result<(), CodedError> {
        let session = match self.slots().remove(id) {
            Some(Slot::Ready(s)) => s,
            Some(Slot::Creating) => {
                // Not ours to remove yet: put it back.
                self.slots().insert(id.to_owned(), Slot::Creating);
                return Err(CodedError::new(
                    ErrorCode::SessionNotFound,
                    format!("no session {id}"),
                ));
            }
            None => {
                return Err(CodedError::new(
                    ErrorCode::SessionNotFound,
                    format!("no session {id}"),
                ));
            }
        };
        self.destroy(session, reason).await;
        Ok(())
    }

    /// Stops the session at once (a running step ends) and tears its sandbox
    /// and workspace down in a tracked task; agent shutdown waits for it.
    async fn destroy(&self, session: Arc<Session>, reason: &'static str) {
        if session.destroyed.swap(true, Ordering::SeqCst) {
            return;
        }
        session.ended.cancel();
        tracing::info!(session = %session.id, reason, "session ended");
        self.tasks.spawn(async move {
            let kernel = session.kernel.lock().await.take();
            if let Some(k) = kernel {
                k.destroy().await;
            }
            session.workspace.destroy();
            tracing::debug!(session = %session.id, "session sandbox and workspace destroyed");
        });
    }

    /// Ends sessions past their TTL or idle timeout; runs until shutdown.
    pub async fn run_reaper(self: Arc<Self>) {
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = self.shutdown.cancelled() => return,
            }
            let now = now_ms();
            let due: Vec<(String, &'static str)> = self
                .slots()
                .values()
                .filter_map(|s| match s {
                    Slot::Ready(s) => s.expired(now).map(|why| (s.id.clone(), why)),
                    Slot::Creating => None,
                })
                .collect();
            for (id, why) in due {
                let _ = self.end(&id, why).await;
            }
        }
    }

    /// Spawns a tracked task.
    pub fn spawn<F>(&self, fut: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(fut);
    }

    /// Ends every session (agent shutdown) and waits for tracked tasks.
    pub async fn shutdown_all(&self) {
        let all: Vec<Arc<Session>> = self
            .slots()
            .drain()
            .filter_map(|(_, s)| match s {
                Slot::Ready(s) => Some(s),
                Slot::Creating => None,
            })
            .collect();
        futures::future::join_all(all.into_iter().map(|s| self.destroy(s, "shutdown"))).await;
        self.tasks.close();
        self.tasks.wait().await;
    }
}

fn unreachable_kernel() -> crate::kernels::ExecOutcome {
    // begin_step refuses sessions without a kernel; keep a coded answer anyway.
    crate::kernels::ExecOutcome {
        status: StepStatus::Killed,
        stdout: String::new(),
        stderr: String::new(),
        result: None,
        error: None,
        truncated: false,
        kernel_dead: true,
    }
}

/// Secrets: names as every plane checks them, values bounded and without
/// NUL, no name also in `env`. The message names, never shows, a value.
fn validate_secrets(secrets: &SecretEnv, env: &BTreeMap<String, String>) -> Result<(), CodedError> {
    let names: Vec<String> = secrets.keys().cloned().collect();
    let bad = |m: String| CodedError::new(ErrorCode::InvalidArgument, format!("secrets: {m}"));
    shared::secrets::check_names(&names).map_err(bad)?;
    shared::secrets::check_no_env_clash(&names, Some(env)).map_err(bad)?;
    for (name, value) in secrets {
        let v = value.expose();
        if v.is_empty() || v.len() > shared::secrets::MAX_SECRET_VALUE_BYTES || v.contains('\0') {
            return Err(bad(format!(
                "the value of {name} must be 1-{} bytes without NUL",
                shared::secrets::MAX_SECRET_VALUE_BYTES
            )));
        }
    }
    Ok(())
}

/// Masks what a step returns: output, error and result.
fn mask_result(masker: &Masker, r: &mut crate::kernels::ExecOutcome) {
    if masker.is_empty() {
        return;
    }
    masker.mask_in_place(&mut r.stdout);
    masker.mask_in_place(&mut r.stderr);
    if let Some(e) = r.error.as_mut() {
        masker.mask_in_place(&mut e.kind);
        masker.mask_in_place(&mut e.message);
        masker.mask_in_place(&mut e.traceback);
    }
    if let Some(v) = r.result.as_mut() {
        masker.mask_json(v);
    }
}

/// Forwards streamed output to `sink`, masked: a value split between two
/// chunks is held back until the next chunk (or the end) shows it whole.
async fn forward_masked(
    masker: Masker,
    mut rx: mpsc::UnboundedReceiver<OutputEvent>,
    sink: mpsc::UnboundedSender<OutputEvent>,
) {
    let (mut out, mut err) = (masker.stream(), masker.stream());
    while let Some(ev) = rx.recv().await {
        let ev = match ev {
            OutputEvent::Stdout(d) => OutputEvent::Stdout(out.push(&d)),
            OutputEvent::Stderr(d) => OutputEvent::Stderr(err.push(&d)),
        };
        if !matches!(&ev, OutputEvent::Stdout(d) | OutputEvent::Stderr(d) if d.is_empty()) {
            let _ = sink.send(ev);
        }
    }
    for ev in [
        OutputEvent::Stdout(out.finish()),
        OutputEvent::Stderr(err.finish()),
    ] {
        if !matches!(&ev, OutputEvent::Stdout(d) | OutputEvent::Stderr(d) if d.is_empty()) {
            let _ = sink.send(ev);
        }
    }
}

/// Environment names must be shell identifiers; values must not hold NUL.
fn validate_env(env: &BTreeMap<String, String>) -> Result<(), CodedError> {
    for (k, v) in env {
        let ok_name = !k.is_empty()
            && k.len() <= 256
            && !k.as_bytes()[0].is_ascii_digit()
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !ok_name {
            return Err(CodedError::new(
                ErrorCode::InvalidArgument,
                format!("env name {k:?} is not [A-Za-z_][A-Za-z0-9_]*"),
            ));
        }
        if v.contains('\0') {
            return Err(CodedError::new(
                ErrorCode::InvalidArgument,
                format!("env {k} contains a NUL byte"),
            ));
        }
    }
    if env.len() > 256 {
        return Err(CodedError::new(
            ErrorCode::InvalidArgument,
            "at most 256 env variables",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        let l = EffectiveLimits {
            memory_mb: 512,
            cpu_millicores: 1000,
            max_processes: 64,
            disk_mb: 256,
            timeout_ms: 30_000,
            max_output_bytes: 1 << 20,
        };
        Settings {
            defaults: l,
            maximums: EffectiveLimits {
                memory_mb: 2048,
                ..l
            },
            auth_bypass: false,
            max_sessions: 4,
            default_ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(600),
            default_idle_timeout: Duration::from_secs(60),
            ready_timeout: Duration::from_secs(5),
            interrupt_grace: Duration::from_secs(1),
            workspace_root: PathBuf::from("/nonexistent"),
            package_root: PathBuf::from("/nonexistent"),
            interpreters: Interpreters {
                python: PathBuf::from("/usr/bin/python3"),
                node: PathBuf::from("/usr/bin/node"),
                bash: PathBuf::from("/usr/bin/bash"),
            },
            admin_token: None,
            single_use: false,
        }
    }

    #[test]
    fn limits_above_maximum_name_the_limit() {
        let s = settings();
        let e = s
            .resolve_limits(Some(&Limits {
                memory_mb: Some(4096),
                ..Default::default()
            }))
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::LimitExceeded);
        assert!(e.message.contains("memoryMb"), "{}", e.message);
        let ok = s
            .resolve_limits(Some(&Limits {
                memory_mb: Some(1024),
                ..Default::default()
            }))
            .unwrap();
        assert_eq!(ok.memory_mb, 1024);
        assert_eq!(ok.timeout_ms, 30_000);
    }

    #[test]
    fn only_the_admin_credential_creates_unless_bypassed() {
        let admin = "c".repeat(43);
        let mut s = settings();
        // No credential configured: nobody may create (never open).
        for presented in [None, Some(""), Some(admin.as_str())] {
            let e = s.authorize_create(presented).unwrap_err();
            assert_eq!(e.code, ErrorCode::Unauthorized);
        }
        s.admin_token = Some(TokenDigest::of(&admin).0);
        assert!(s.authorize_create(Some(&admin)).is_ok());
        let other = "d".repeat(43);
        for wrong in [None, Some(""), Some(&admin[1..]), Some(other.as_str())] {
            let e = s.authorize_create(wrong).unwrap_err();
            assert_eq!(e.code, ErrorCode::Unauthorized);
        }
        s.auth_bypass = true;
        assert!(s.authorize_create(None).is_ok());
    }

    #[test]
    fn token_digest_compare() {
        let d = TokenDigest::of("a".repeat(40).as_str());
        assert!(d.matches(Some(&"a".repeat(40))));
        assert!(!d.matches(Some(&"a".repeat(39))));
        assert!(!d.matches(None));
    }

    #[test]
    fn env_names() {
        let mut env = BTreeMap::new();
        env.insert("GOOD_1".to_owned(), "v".to_owned());
        assert!(validate_env(&env).is_ok());
        env.insert("1BAD".to_owned(), "v".to_owned());
        assert!(validate_env(&env).is_err());
        let mut env = BTreeMap::new();
        env.insert("X; rm -rf /".to_owned(), "v".to_owned());
        assert!(validate_env(&env).is_err());
    }
}
