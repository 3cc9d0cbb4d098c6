//! The `k8s` backend: one gVisor RuntimeClass pod per session, each running
//! the session agent (`SESSION_ISOLATION=pod`: the pod is the sandbox).
//!
//! - **Tokens.** The data plane makes each pod's token; the pod gets only
//!   its SHA-256 (`SESSION_AGENT_ADMIN_TOKEN_SHA256`). The data plane creates
//!   the session on the pod's agent with that token, which becomes the
//!   session's token (the agent keeps digests only).
//! - **Ready** = pod `Running` with an IP, the agent answering `/v1/health`,
//!   the session registered, all within `SESSION_READY_TIMEOUT`. A failed,
//!   unpullable, unschedulable or late pod gives a coded error and is deleted.
//! - **Warm pool.** `RUNTIME_WARM_POOL` pods per runtime are created and
//!   made ready ahead; a create with the runtime's default limits claims
//!   one (in memory, then one call to its agent), a background task refills,
//!   and a claimed pod is never reused.
//! - **One watch** (`kube::runtime::watcher` on this data plane's labels)
//!   keeps a cache of its pods: a bound pod that dies or vanishes marks its
//!   session lost; a warm pod that dies leaves the pool.
//! - **Crash recovery.** At start the backend deletes its warm pods (their
//!   tokens died with the old process) and keeps bound ones; the session
//!   registry then adopts the pods whose session it has (only pods carrying
//!   this data plane's owner label), and the rest are reaped.
//! - **API errors.** 409, 429, 5xx and broken connections are retried with
//!   backoff, then answered with a clear code.
//! - **Start-up checks.** The namespace, the RuntimeClass and every RBAC
//!   verb the backend uses are checked; a missing one refuses the start,
//!   naming it.

pub mod objects;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher;
use sha2::{Digest, Sha256};
use shared::ErrorCode;
use shared::agent::{CreateSessionRequest, EffectiveLimits, SessionInfo};
use shared::client::{AgentClient, ClientError};
use shared::error::ErrorBody;
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

use self::objects::{AGENT_PORT, LABEL_SESSION, LABEL_STATE, PodParams, STATE_BOUND};
use super::{OwnedSandbox, RuntimeRegistry, SandboxHandle};

/// The field manager of the backend's server-side applies.
const FIELD_MANAGER: &str = "agent-sandbox-data-plane";
/// Attempts of one API call before its error is the caller's.
const API_ATTEMPTS: u32 = 5;
/// The first retry's wait; doubled each time.
const API_BACKOFF: Duration = Duration::from_millis(100);
/// The longest wait between two looks at a pod that is starting (a watch
/// event wakes the waiter sooner).
const READY_POLL: Duration = Duration::from_millis(250);
/// The longest wait between two refills of a pool whose pods keep failing.
const REFILL_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Settings of the `k8s` backend (from `Config`).
#[derive(Debug, Clone)]
pub struct K8sSettings {
    pub namespace: String,
    pub runtime_class: String,
    pub owner: String,
    pub data_plane_namespace: String,
    pub environment: String,
    pub ready_timeout: Duration,
    /// Warm pods per runtime.
    pub warm_pool: BTreeMap<String, usize>,
    /// The Secret in `namespace` holding secret values as `<tenant>.<NAME>`
    /// keys (`RUNTIME_SECRETS_NAME`; `crate::secrets`).
    pub secrets_name: Option<String>,
}

/// A warm pod, ready to be claimed.
#[derive(Clone)]
struct WarmPod {
    name: String,
    endpoint: String,
    token: String,
}

#[derive(Default)]
struct State {
    /// The backend's pods as the watch last saw them, by name.
    cache: HashMap<String, Pod>,
    /// Session id -> pod name, for every session the backend serves.
    sessions: HashMap<String, String>,
    /// Ready warm pods per runtime (claimed from the front).
    warm: BTreeMap<String, VecDeque<WarmPod>>,
    /// Warm pods being created per runtime.
    warming: BTreeMap<String, usize>,
    /// Sessions whose provision the router gave up on: a provision that
    /// still finishes deletes its pod.
    abandoned: HashSet<String>,
}

struct Inner {
    client: kube::Client,
    pods: Api<Pod>,
    settings: K8sSettings,
    registry: RuntimeRegistry,
    http: reqwest::Client,
    state: Mutex<State>,
    /// Woken on every watch event (ready waits).
    changed: Notify,
    /// Woken when a warm pod is claimed or dies (refill).
    refill: Notify,
    /// Sessions whose pod died or vanished.
    lost: mpsc::UnboundedSender<String>,
    stop: CancellationToken,
}

/// The `k8s` backend (cheap to clone: one shared state).
#[derive(Clone)]
pub struct K8sBackend {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for K8sBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("K8sBackend")
            .field("settings", &self.inner.settings)
            .finish_non_exhaustive()
    }
}

/// A coded error in the client's shape (the seam's error type).
fn coded(code: ErrorCode, message: impl Into<String>) -> ClientError {
    ClientError::Api {
        status: code.http_status(),
        body: ErrorBody {
            code,
            message: message.into(),
            request_id: None,
            details: None,
        },
    }
}

/// The status code of an API error (`None`: no answer at all).
fn api_status(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}

/// Whether an API call is worth repeating: conflicts, throttling, server
/// errors and broken connections.
fn retryable(e: &kube::Error) -> bool {
    match api_status(e) {
        Some(code) => code == 409 || code == 429 || (500..=504).contains(&code),
        None => matches!(
            e,
            kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_)
        ),
    }
}

/// What an API error means to the caller: the API server's own words stay
/// in the log; the answer names the operation and the status.
fn api_error(what: &str, e: &kube::Error) -> ClientError {
    tracing::warn!(error = %e, "Kubernetes API: {what} failed");
    match api_status(e) {
        Some(code) => coded(
            ErrorCode::SandboxUnavailable,
            format!("the Kubernetes API refused to {what} (HTTP {code})"),
        ),
        None => coded(
            ErrorCode::SandboxUnavailable,
            format!("the Kubernetes API server could not be reached to {what}"),
        ),
    }
}

/// Runs an API call, repeating it with backoff while its error is
/// retryable (at most [`API_ATTEMPTS`] attempts).
async fn with_retry<T, F, Fut>(mut call: F) -> Result<T, kube::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, kube::Error>>,
{
    let mut wait = API_BACKOFF;
    let mut attempt = 1;
    loop {
        match call().await {
            Ok(v) => return Ok(v),
            Err(e) if attempt < API_ATTEMPTS && retryable(&e) => {
                tracing::debug!(error = %e, attempt, "Kubernetes API call failed; retrying");
                tokio::time::sleep(wait).await;
                wait *= 2;
                attempt += 1;
            }
            Err(e) => return Err(e),
        }
    }
}

/// What a pod's status says about a sandbox that is starting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodState {
    /// Not there yet (scheduling, pulling, starting).
    Pending,
    /// Running with an IP: the agent should answer there.
    Running { ip: String },
    /// The image cannot be pulled.
    ImageUnavailable { reason: String },
    /// No node can take it.
    Unschedulable,
    /// It ended (failed, or succeeded, which an agent never should).
    Ended { reason: String },
    /// It is being deleted.
    Deleting,
}

/// Reads a pod's status.
pub fn pod_state(pod: &Pod) -> PodState {
    if pod.metadata.deletion_timestamp.is_some() {
        return PodState::Deleting;
    }
    let Some(status) = &pod.status else {
        return PodState::Pending;
    };
    let phase = status.phase.as_deref().unwrap_or("Pending");
    for c in status.container_statuses.iter().flatten() {
        if let Some(waiting) = c.state.as_ref().and_then(|s| s.waiting.as_ref()) {
            let reason = waiting.reason.clone().unwrap_or_default();
            if matches!(
                reason.as_str(),
                "ErrImagePull" | "ImagePullBackOff" | "InvalidImageName" | "ErrImageNeverPull"
            ) {
                return PodState::ImageUnavailable { reason };
            }
            if matches!(
                reason.as_str(),
                "CreateContainerConfigError" | "CreateContainerError" | "CrashLoopBackOff"
            ) {
                return PodState::Ended { reason };
            }
        }
        if let Some(t) = c.state.as_ref().and_then(|s| s.terminated.as_ref()) {
            return PodState::Ended {
                reason: t
                    .reason
                    .clone()
                    .unwrap_or_else(|| format!("exit code {}", t.exit_code)),
            };
        }
    }
    match phase {
        "Running" => match status.pod_ip.as_deref() {
            Some(ip) if !ip.is_empty() => PodState::Running { ip: ip.to_owned() },
            _ => PodState::Pending,
        },
        "Failed" | "Succeeded" => PodState::Ended {
            reason: status.reason.clone().unwrap_or_else(|| phase.to_owned()),
        },
        _ => {
            let unschedulable = status.conditions.iter().flatten().any(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            });
            if unschedulable {
                PodState::Unschedulable
            } else {
                PodState::Pending
            }
        }
    }
}

/// The agent endpoint of a pod IP (v6 addresses in brackets).
fn endpoint_of(ip: &str) -> String {
    if ip.contains(':') {
        format!("http://[{ip}]:{AGENT_PORT}")
    } else {
        format!("http://{ip}:{AGENT_PORT}")
    }
}

fn new_token() -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>())
}

fn digest_hex(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

impl K8sBackend {
    /// Checks the cluster (namespace, RuntimeClass, RBAC), applies the
    /// runtime NetworkPolicy, deletes the warm pods of a previous run, and
    /// starts the watch and the warm pool. Errors name what is missing; the
    /// data plane refuses to start on them. Sessions whose pod dies are
    /// sent on the returned channel.
    pub async fn start(
        client: kube::Client,
        settings: K8sSettings,
        registry: RuntimeRegistry,
        http: reqwest::Client,
        stop: CancellationToken,
    ) -> Result<(Self, mpsc::UnboundedReceiver<String>), String> {
        for runtime in settings.warm_pool.keys() {
            registry.get(runtime).map_err(|_| {
                format!(
                    "RUNTIME_WARM_POOL names runtime {runtime:?}, which the registry does not have"
                )
            })?;
        }
        check_cluster(&client, &settings).await?;
        let (lost, lost_rx) = mpsc::unbounded_channel();
        let backend = K8sBackend {
            inner: Arc::new(Inner {
                pods: Api::namespaced(client.clone(), &settings.namespace),
                client,
                settings,
                registry,
                http,
                state: Mutex::new(State::default()),
                changed: Notify::new(),
                refill: Notify::new(),
                lost,
                stop,
            }),
        };
        backend.apply_network_policy().await?;
        backend.load_pods().await?;
        tokio::spawn(backend.clone().watch());
        tokio::spawn(backend.clone().keep_warm());
        Ok((backend, lost_rx))
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn settings(&self) -> &K8sSettings {
        &self.inner.settings
    }

    /// The value of secret `name` for `tenant`: the key `<tenant>.<NAME>` of
    /// the `RUNTIME_SECRETS_NAME` Secret, read through the API at each call
    /// (a rotated value is used by the next session). `None` when there is
    /// no such key (or no Secret). Both parts are validated, and neither
    /// holds a `.`, so one tenant's key is never another's.
    pub async fn read_secret(
        &self,
        tenant: &shared::ids::TenantId,
        name: &str,
    ) -> Result<Option<shared::secrets::SecretValue>, shared::CodedError> {
        let Some(secret) = self.settings().secrets_name.as_deref() else {
            return Ok(None);
        };
        let api: Api<Secret> =
            Api::namespaced(self.inner.client.clone(), &self.settings().namespace);
        let found = with_retry(|| api.get_opt(secret)).await.map_err(|e| {
            // The error names the Secret, never a value (a GET error has none).
            tracing::warn!(error = %e, secret, "Kubernetes API: reading the secrets Secret failed");
            shared::CodedError::new(
                ErrorCode::SandboxUnavailable,
                "the Kubernetes API could not be read for the session's secrets; nothing was started",
            )
        })?;
        let Some(mut found) = found else {
            tracing::warn!(secret, "RUNTIME_SECRETS_NAME: the Secret does not exist");
            return Ok(None);
        };
        let key = format!("{tenant}.{name}");
        let value = found.data.as_mut().and_then(|d| d.remove(&key));
        // The rest of the Secret (other names, other tenants) is wiped, not
        // just dropped.
        if let Some(data) = found.data.as_mut() {
            for v in data.values_mut() {
                zeroize::Zeroize::zeroize(&mut v.0);
            }
        }
        value
            .map(|v| crate::secrets::value_of(name, v.0))
            .transpose()
    }

    async fn apply_network_policy(&self) -> Result<(), String> {
        let s = self.settings();
        let policy =
            objects::runtime_network_policy(&s.namespace, &s.owner, &s.data_plane_namespace);
        let name = objects::network_policy_name(&s.owner);
        let api: Api<NetworkPolicy> = Api::namespaced(self.inner.client.clone(), &s.namespace);
        let params = PatchParams::apply(FIELD_MANAGER).force();
        let patch = Patch::Apply(&policy);
        with_retry(|| api.patch(&name, &params, &patch))
            .await
            .map_err(|e| {
                format!(
                    "applying the runtime NetworkPolicy {name} in namespace {}: {e}",
                    s.namespace
                )
            })?;
        Ok(())
    }

    /// The pods a previous run left: warm ones are deleted (their tokens
    /// are gone), bound ones are cached for adoption.
    async fn load_pods(&self) -> Result<(), String> {
        let selector = objects::owner_selector(&self.settings().owner);
        let params = ListParams::default().labels(&selector);
        let list = with_retry(|| self.inner.pods.list(&params))
            .await
            .map_err(|e| format!("listing pods in RUNTIME_NAMESPACE: {e}"))?;
        let mut stale = Vec::new();
        {
            let mut st = self.state();
            for pod in list.items {
                let Some(name) = pod.metadata.name.clone() else {
                    continue;
                };
                if label(&pod, LABEL_STATE) == Some(STATE_BOUND) {
                    st.cache.insert(name, pod);
                } else {
                    stale.push(name);
                }
            }
        }
        for name in stale {
            tracing::info!(pod = %name, "deleting a warm pod of a previous run");
            self.delete_pod(&name).await;
        }
        Ok(())
    }

    /// Deletes a pod (retried; already gone is fine); best effort.
    async fn delete_pod(&self, name: &str) -> bool {
        let params = DeleteParams::default().grace_period(0);
        match with_retry(|| self.inner.pods.delete(name, &params)).await {
            Ok(_) => true,
            Err(e) if api_status(&e) == Some(404) => true,
            Err(e) => {
                tracing::warn!(pod = %name, error = %e, "could not delete a pod; its deadline will end it");
                false
            }
        }
    }

    /// The watch: keeps the cache, wakes ready waits, reports lost sessions
    /// and dead warm pods.
    async fn watch(self) {
        let selector = objects::owner_selector(&self.settings().owner);
        let stream = watcher(
            self.inner.pods.clone(),
            watcher::Config::default().labels(&selector),
        )
        .default_backoff();
        let mut stream = std::pin::pin!(stream);
        loop {
            let event = tokio::select! {
                _ = self.inner.stop.cancelled() => return,
                event = stream.next() => event,
            };
            match event {
                None => return,
                Some(Err(e)) => tracing::warn!(error = %e, "pod watch failed; retrying"),
                Some(Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod))) => {
                    self.observe(pod, false);
                }
                Some(Ok(watcher::Event::Delete(pod))) => self.observe(pod, true),
                Some(Ok(watcher::Event::Init | watcher::Event::InitDone)) => {}
            }
            self.inner.changed.notify_waiters();
        }
    }

    /// One watched pod: cached, and if it is gone or ended, its session is
    /// lost or its warm slot is dropped.
    fn observe(&self, pod: Pod, deleted: bool) {
        let Some(name) = pod.metadata.name.clone() else {
            return;
        };
        let dead = deleted || matches!(pod_state(&pod), PodState::Ended { .. });
        let mut st = self.state();
        if deleted {
            st.cache.remove(&name);
        } else {
            st.cache.insert(name.clone(), pod);
        }
        if !dead {
            return;
        }
        let session = st
            .sessions
            .iter()
            .find(|(_, p)| **p == name)
            .map(|(s, _)| s.clone());
        if let Some(session) = session {
            st.sessions.remove(&session);
            tracing::warn!(pod = %name, session = %session, "a session's pod ended; the session is lost");
            let _ = self.inner.lost.send(session);
        }
        let mut dropped = false;
        for queue in st.warm.values_mut() {
            let before = queue.len();
            queue.retain(|w| w.name != name);
            dropped |= queue.len() != before;
        }
        drop(st);
        if dropped {
            tracing::warn!(pod = %name, "a warm pod ended; refilling");
            self.inner.refill.notify_one();
        }
    }

    /// Keeps each runtime's pool at its size, backing off while its pods
    /// keep failing.
    async fn keep_warm(self) {
        let mut failures: BTreeMap<String, u32> = BTreeMap::new();
        let mut retry_at: BTreeMap<String, Instant> = BTreeMap::new();
        loop {
            let wanted = self.settings().warm_pool.clone();
            for (runtime, size) in wanted {
                if retry_at.get(&runtime).is_some_and(|t| *t > Instant::now()) {
                    continue;
                }
                let missing = {
                    let mut st = self.state();
                    let have = st.warm.get(&runtime).map_or(0, VecDeque::len)
                        + st.warming.get(&runtime).copied().unwrap_or(0);
                    let missing = size.saturating_sub(have);
                    *st.warming.entry(runtime.clone()).or_default() += missing;
                    missing
                };
                for _ in 0..missing {
                    let (me, runtime) = (self.clone(), runtime.clone());
                    let ok = me.warm_one(&runtime).await;
                    let count = failures.entry(runtime.clone()).or_default();
                    if ok {
                        *count = 0;
                    } else {
                        *count += 1;
                        let wait = (API_BACKOFF * 2u32.saturating_pow((*count).min(10)))
                            .min(REFILL_BACKOFF_MAX);
                        retry_at.insert(runtime.clone(), Instant::now() + wait);
                    }
                }
            }
            tokio::select! {
                _ = self.inner.stop.cancelled() => return,
                _ = self.inner.refill.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    /// Creates one warm pod and waits for it (its `warming` slot is
    /// released either way).
    async fn warm_one(&self, runtime: &str) -> bool {
        let token = new_token();
        let made = self.start_pod(runtime, None, &token, None).await;
        let mut st = self.state();
        if let Some(n) = st.warming.get_mut(runtime) {
            *n = n.saturating_sub(1);
        }
        match made {
            Ok((name, endpoint)) => {
                st.warm
                    .entry(runtime.to_owned())
                    .or_default()
                    .push_back(WarmPod {
                        name,
                        endpoint,
                        token,
                    });
                true
            }
            Err(e) => {
                tracing::warn!(runtime, error = %e, "could not warm a pod");
                false
            }
        }
    }

    /// Creates a pod and waits until its agent answers; deletes it on any
    /// failure. Returns its name and agent endpoint.
    async fn start_pod(
        &self,
        runtime: &str,
        binding: Option<(&str, &str)>,
        token: &str,
        limits: Option<EffectiveLimits>,
    ) -> Result<(String, String), ClientError> {
        let info = self
            .inner
            .registry
            .get(runtime)
            .map_err(|e| coded(e.code, e.message))?;
        let s = self.settings();
        let digest = digest_hex(token);
        let deadline = Instant::now() + s.ready_timeout;
        // A name collision (409 AlreadyExists) gets a fresh name; other
        // errors are retried inside.
        let mut created = None;
        for _ in 0..3 {
            let name = objects::new_pod_name();
            let pod = objects::runtime_pod(&PodParams {
                name: &name,
                namespace: &s.namespace,
                owner: &s.owner,
                runtime,
                image: &info.image,
                interpreter: &info.interpreter,
                runtime_class: &s.runtime_class,
                environment: &s.environment,
                token_sha256: &digest,
                limits: limits.unwrap_or(info.default_limits),
                binding,
            });
            if let Some((session, _)) = binding {
                self.state()
                    .sessions
                    .insert(session.to_owned(), name.clone());
            }
            let params = PostParams::default();
            match with_retry(|| async {
                match self.inner.pods.create(&params, &pod).await {
                    // A create that failed with 409 after a retry may be
                    // our own first attempt having landed.
                    Err(e) if api_status(&e) == Some(409) => {
                        match self.inner.pods.get_opt(&name).await {
                            Ok(Some(p))
                                if label(&p, objects::LABEL_OWNER) == Some(&s.owner)
                                    && p.spec.as_ref().map(|sp| &sp.containers[0].env)
                                        == pod.spec.as_ref().map(|sp| &sp.containers[0].env) =>
                            {
                                Ok(p)
                            }
                            _ => Err(e),
                        }
                    }
                    r => r,
                }
            })
            .await
            {
                Ok(_) => {
                    created = Some(name);
                    break;
                }
                Err(e) if api_status(&e) == Some(409) => continue,
                Err(e) => {
                    if let Some((session, _)) = binding {
                        self.state().sessions.remove(session);
                    }
                    return Err(match api_status(&e) {
                        Some(403) => {
                            tracing::error!(error = %e, "the API server refused a runtime pod");
                            coded(
                                ErrorCode::SandboxStartFailed,
                                "the cluster refused the sandbox pod (admission or RBAC); see the data plane's log",
                            )
                        }
                        Some(422 | 400) => {
                            tracing::error!(error = %e, "the API server found a runtime pod invalid");
                            coded(
                                ErrorCode::Internal,
                                "the sandbox pod was invalid; see the data plane's log",
                            )
                        }
                        _ => api_error("create the sandbox pod", &e),
                    });
                }
            }
        }
        let Some(name) = created else {
            return Err(coded(
                ErrorCode::SandboxUnavailable,
                "could not name a sandbox pod (three name collisions)",
            ));
        };
        let warm_runtime = binding.is_none().then_some(runtime);
        match self.wait_ready(&name, deadline, warm_runtime).await {
            Ok(endpoint) => Ok((name, endpoint)),
            Err(e) => {
                if let Some((session, _)) = binding {
                    self.state().sessions.remove(session);
                }
                self.delete_pod(&name).await;
                Err(e)
            }
        }
    }

    /// Waits for a pod to run and its agent to answer (for a warm pod:
    /// with its interpreter pre-started), until `deadline`.
    async fn wait_ready(
        &self,
        name: &str,
        deadline: Instant,
        warm_runtime: Option<&str>,
    ) -> Result<String, ClientError> {
        let timeout_message = || {
            coded(
                ErrorCode::SandboxStartTimeout,
                format!(
                    "the sandbox was not ready within {} ms (SESSION_READY_TIMEOUT)",
                    self.settings().ready_timeout.as_millis()
                ),
            )
        };
        let mut ip = None;
        while ip.is_none() {
            // Registered before reading, so an event in between still wakes us.
            let changed = self.inner.changed.notified();
            let cached = self.state().cache.get(name).cloned();
            let pod = match cached {
                Some(p) => Some(p),
                None => match self.inner.pods.get_opt(name).await {
                    Ok(p) => p,
                    Err(e) if retryable(&e) => None,
                    Err(e) => return Err(api_error("read the sandbox pod", &e)),
                },
            };
            let Some(pod) = pod else {
                if Instant::now() >= deadline {
                    return Err(timeout_message());
                }
                tokio::select! {
                    _ = changed => {}
                    _ = tokio::time::sleep(READY_POLL) => {}
                }
                continue;
            };
            match pod_state(&pod) {
                PodState::Running { ip: found } => ip = Some(found),
                PodState::Pending => {}
                PodState::ImageUnavailable { reason } => {
                    return Err(coded(
                        ErrorCode::SandboxImageUnavailable,
                        format!("the runtime's image cannot be pulled ({reason})"),
                    ));
                }
                PodState::Unschedulable => {
                    return Err(coded(
                        ErrorCode::SandboxUnschedulable,
                        "no node can run the sandbox now (Unschedulable)",
                    ));
                }
                PodState::Ended { reason } => {
                    return Err(coded(
                        ErrorCode::SandboxStartFailed,
                        format!("the sandbox pod ended while starting ({reason})"),
                    ));
                }
                PodState::Deleting => {
                    return Err(coded(
                        ErrorCode::SandboxStartFailed,
                        "the sandbox pod was deleted while starting",
                    ));
                }
            }
            if ip.is_none() {
                if Instant::now() >= deadline {
                    return Err(timeout_message());
                }
                tokio::select! {
                    _ = changed => {}
                    _ = tokio::time::sleep(READY_POLL) => {}
                }
            }
        }
        let endpoint = endpoint_of(&ip.unwrap_or_default());
        // The kubelet's readiness probe runs every few seconds; the data
        // plane asks the agent itself, so a ready pod is used at once.
        let agent = AgentClient::with_http(&endpoint, self.inner.http.clone());
        let mut wait = Duration::from_millis(10);
        loop {
            if let Ok(health) = agent.health().await {
                let primed =
                    warm_runtime.is_none_or(|r| health.warm_pool.get(r).is_some_and(|n| *n >= 1));
                if primed {
                    return Ok(endpoint);
                }
            }
            if Instant::now() >= deadline {
                return Err(timeout_message());
            }
            tokio::time::sleep(wait).await;
            wait = (wait * 2).min(Duration::from_millis(200));
        }
    }

    /// Whether a request can take a warm pod: warm pods have the runtime's
    /// default resources.
    fn warm_eligible(&self, req: &CreateSessionRequest) -> bool {
        let Ok(info) = self.inner.registry.get(&req.runtime) else {
            return false;
        };
        let d = info.default_limits;
        let Some(l) = &req.limits else {
            return true;
        };
        l.memory_mb.is_none_or(|v| v == d.memory_mb)
            && l.cpu_millicores.is_none_or(|v| v == d.cpu_millicores)
            && l.disk_mb.is_none_or(|v| v == d.disk_mb)
    }

    /// The pod resources of a cold request: the defaults, overridden.
    fn limits_for(&self, req: &CreateSessionRequest) -> Option<EffectiveLimits> {
        let info = self.inner.registry.get(&req.runtime).ok()?;
        let mut l = info.default_limits;
        let Some(asked) = &req.limits else {
            return Some(l);
        };
        if let Some(v) = asked.memory_mb {
            l.memory_mb = v;
        }
        if let Some(v) = asked.cpu_millicores {
            l.cpu_millicores = v;
        }
        if let Some(v) = asked.disk_mb {
            l.disk_mb = v;
        }
        Some(l)
    }

    /// Provisions a sandbox for a session of `tenant`: a warm pod when one
    /// fits, otherwise a new pod. Runs to its end (or clean-up) even when
    /// the caller stops waiting; see [`K8sBackend::abandon`].
    pub async fn provision(
        &self,
        req: &CreateSessionRequest,
        tenant: &str,
    ) -> Result<(SandboxHandle, SessionInfo), ClientError> {
        if req.packages_dir.is_some() {
            return Err(coded(
                ErrorCode::NotImplemented,
                "packages are not yet available with SESSION_RUNTIME_BACKEND=k8s",
            ));
        }
        let (me, req, tenant) = (self.clone(), req.clone(), tenant.to_owned());
        let task = tokio::spawn(async move { me.provision_inner(req, tenant).await });
        task.await
            .unwrap_or_else(|_| Err(coded(ErrorCode::Internal, "the provision task failed")))
    }

    async fn provision_inner(
        &self,
        req: CreateSessionRequest,
        tenant: String,
    ) -> Result<(SandboxHandle, SessionInfo), ClientError> {
        let session = req.session_id.clone();
        let claimed = if self.warm_eligible(&req) {
            let mut st = self.state();
            let pod = st.warm.get_mut(&req.runtime).and_then(VecDeque::pop_front);
            if let Some(pod) = &pod {
                st.sessions.insert(session.clone(), pod.name.clone());
            }
            pod
        } else {
            None
        };
        let (name, endpoint, token, warm) = match claimed {
            Some(pod) => {
                self.inner.refill.notify_one();
                // The labels follow in the background: until they land a
                // crash leaves a warm-labelled pod, which the next start
                // deletes (the session is then lost, as any crash's).
                let (me, name, session, tenant) = (
                    self.clone(),
                    pod.name.clone(),
                    session.clone(),
                    tenant.clone(),
                );
                let runtime = req.runtime.clone();
                tokio::spawn(
                    async move { me.label_bound(&name, &runtime, &session, &tenant).await },
                );
                (pod.name, pod.endpoint, pod.token, true)
            }
            None => {
                let token = new_token();
                let (name, endpoint) = self
                    .start_pod(
                        &req.runtime,
                        Some((&session, &tenant)),
                        &token,
                        self.limits_for(&req),
                    )
                    .await?;
                (name, endpoint, token, false)
            }
        };
        // The session is registered with the pod's token; the agent keeps
        // only its digest, as the pod's environment does.
        let agent = AgentClient::with_http(&endpoint, self.inner.http.clone())
            .with_admin_token(Some(token.clone()));
        let mut agent_req = req.clone();
        agent_req.token = Some(token.clone());
        let created = agent.create_session(&agent_req).await;
        let abandoned = self.state().abandoned.remove(&session);
        match created {
            Ok(mut info) if !abandoned => {
                info.warm = warm;
                Ok((
                    SandboxHandle {
                        session_id: session,
                        endpoint,
                        token: Some(token),
                    },
                    info,
                ))
            }
            other => {
                self.state().sessions.remove(&session);
                self.delete_pod(&name).await;
                match other {
                    Err(e) => Err(e),
                    Ok(_) => Err(coded(
                        ErrorCode::SandboxUnavailable,
                        "the session was abandoned while its sandbox started",
                    )),
                }
            }
        }
    }

    /// Labels a claimed warm pod with its session and tenant.
    async fn label_bound(&self, name: &str, runtime: &str, session: &str, tenant: &str) {
        let labels = objects::pod_labels(&self.settings().owner, runtime, Some((session, tenant)));
        let patch = Patch::Merge(serde_json::json!({ "metadata": { "labels": labels } }));
        let params = PatchParams::default();
        if let Err(e) = with_retry(|| self.inner.pods.patch(name, &params, &patch)).await {
            tracing::warn!(pod = %name, error = %e, "could not label a claimed pod");
        }
    }

    /// Deletes a session's pod.
    pub async fn destroy(&self, handle: &SandboxHandle) -> Result<(), ClientError> {
        let name = self.state().sessions.remove(&handle.session_id);
        let name = match name {
            Some(n) => Some(n),
            None => self.find_session_pod(&handle.session_id),
        };
        if let Some(name) = name {
            self.delete_pod(&name).await;
        }
        Ok(())
    }

    /// A provision the router gave up on: its pod is deleted now if it is
    /// known, and by the provision itself when it finishes.
    pub async fn abandon(&self, session_id: &str) -> Result<(), ClientError> {
        let name = {
            let mut st = self.state();
            st.abandoned.insert(session_id.to_owned());
            st.sessions.remove(session_id)
        };
        if let Some(name) = name {
            self.delete_pod(&name).await;
        }
        Ok(())
    }

    /// The cached pod bound to a session, by its label.
    fn find_session_pod(&self, session_id: &str) -> Option<String> {
        let want = objects::session_label(session_id);
        self.state()
            .cache
            .iter()
            .find(|(_, p)| label(p, LABEL_SESSION) == Some(want.as_str()))
            .map(|(n, _)| n.clone())
    }

    /// Where a recovered session is routed: its pod's agent, if this data
    /// plane labelled a running pod for it; `None` (lost) otherwise. A
    /// stored endpoint is never trusted on its own.
    pub fn adopt(&self, session_id: &str) -> Option<String> {
        let want = objects::session_label(session_id);
        let mut st = self.state();
        let (name, ip) = st.cache.iter().find_map(|(n, p)| {
            if label(p, LABEL_SESSION) != Some(want.as_str()) {
                return None;
            }
            match pod_state(p) {
                PodState::Running { ip } => Some((n.clone(), ip)),
                _ => None,
            }
        })?;
        st.sessions.insert(session_id.to_owned(), name);
        Some(endpoint_of(&ip))
    }

    /// This data plane's bound pods (warm pods are no session's).
    pub fn list_owned(&self) -> Vec<OwnedSandbox> {
        let st = self.state();
        st.cache
            .iter()
            .filter(|(_, p)| label(p, LABEL_STATE) == Some(STATE_BOUND))
            .map(|(name, p)| {
                let session = st
                    .sessions
                    .iter()
                    .find(|(_, n)| *n == name)
                    .map(|(s, _)| s.clone())
                    .or_else(|| label(p, LABEL_SESSION).map(str::to_owned))
                    .unwrap_or_default();
                let endpoint = match pod_state(p) {
                    PodState::Running { ip } => endpoint_of(&ip),
                    _ => String::new(),
                };
                OwnedSandbox {
                    session_id: session,
                    endpoint,
                    pod: Some(name.clone()),
                }
            })
            .collect()
    }

    /// Deletes a pod no session record owns.
    pub async fn destroy_orphan(&self, sandbox: &OwnedSandbox) -> Result<(), ClientError> {
        if let Some(name) = &sandbox.pod {
            self.delete_pod(name).await;
        }
        Ok(())
    }

    /// Ready warm pods per runtime.
    pub fn pool_sizes(&self) -> BTreeMap<String, usize> {
        let st = self.state();
        self.settings()
            .warm_pool
            .keys()
            .map(|r| (r.clone(), st.warm.get(r).map_or(0, VecDeque::len)))
            .collect()
    }

    /// Whether the API server answers (for `/readyz`).
    pub async fn health(&self) -> Result<(), ClientError> {
        let api: Api<Namespace> = Api::all(self.inner.client.clone());
        api.get(&self.settings().namespace)
            .await
            .map(|_| ())
            .map_err(|e| api_error("read the runtime namespace", &e))
    }

    /// A client for a pod's agent (shares the connection pool).
    pub fn agent_for(&self, endpoint: &str) -> AgentClient {
        AgentClient::with_http(endpoint, self.inner.http.clone())
    }

    /// The warm pod names (tests and the bench).
    pub fn warm_pods(&self, runtime: &str) -> Vec<String> {
        self.state()
            .warm
            .get(runtime)
            .map(|q| q.iter().map(|w| w.name.clone()).collect())
            .unwrap_or_default()
    }
}

/// The objects the backend would create with `config`, as a pretty JSON
/// Kubernetes `List`: the runtime NetworkPolicy, a warm pod and a pod
/// bound to an example session (the token digest is a placeholder).
pub fn example_objects(config: &crate::Config) -> Result<String, String> {
    let registry = RuntimeRegistry::load(config)?;
    let python = registry.get("python").map_err(|e| e.message)?;
    let placeholder = "0".repeat(64);
    let pod = |name: &str, binding| {
        objects::runtime_pod(&PodParams {
            name,
            namespace: &config.runtime_namespace,
            owner: &config.runtime_owner,
            runtime: &python.name,
            image: &python.image,
            interpreter: &python.interpreter,
            runtime_class: &config.runtime_class,
            environment: &config.environment,
            token_sha256: &placeholder,
            limits: python.default_limits,
            binding,
        })
    };
    let list = serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": [
            with_kind(serde_json::to_value(objects::runtime_network_policy(
                &config.runtime_namespace,
                &config.runtime_owner,
                &config.data_plane_namespace,
            )), "networking.k8s.io/v1", "NetworkPolicy")?,
            with_kind(serde_json::to_value(pod("sbx-warm000000", None)), "v1", "Pod")?,
            with_kind(
                serde_json::to_value(pod("sbx-bound00000", Some(("ses_example", "acme")))),
                "v1",
                "Pod",
            )?,
        ],
    });
    serde_json::to_string_pretty(&list).map_err(|e| e.to_string())
}

/// k8s-openapi's types serialize without `apiVersion`/`kind` unless they
/// are set; a `List`'s items need them.
fn with_kind(
    value: Result<serde_json::Value, serde_json::Error>,
    api_version: &str,
    kind: &str,
) -> Result<serde_json::Value, String> {
    let mut value = value.map_err(|e| e.to_string())?;
    if let Some(obj) = value.as_object_mut() {
        obj.insert("apiVersion".into(), api_version.into());
        obj.insert("kind".into(), kind.into());
    }
    Ok(value)
}

fn label<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(key))
        .map(String::as_str)
}

/// The verbs the backend uses, per resource (checked at start).
const RBAC: &[(&str, &str, &[&str])] = &[
    (
        "",
        "pods",
        &["create", "get", "list", "watch", "delete", "patch"],
    ),
    ("networking.k8s.io", "networkpolicies", &["get", "patch"]),
];

/// Whether the service account may `verb` `resource` (named `name`, when
/// given) in the runtime namespace: one SelfSubjectAccessReview.
async fn allowed(
    reviews: &Api<SelfSubjectAccessReview>,
    namespace: &str,
    (group, resource, verb, name): (&str, &str, &str, Option<&str>),
) -> Result<bool, String> {
    let review = SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                group: Some(group.into()),
                namespace: Some(namespace.into()),
                resource: Some(resource.into()),
                verb: Some(verb.into()),
                name: name.map(Into::into),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let post = PostParams::default();
    let answer = with_retry(|| reviews.create(&post, &review))
        .await
        .map_err(|e| format!("checking RBAC ({verb} {resource}): {e}"))?;
    Ok(answer.status.is_some_and(|st| st.allowed))
}

/// The start-up checks: the namespace and RuntimeClass exist, and the
/// service account may do everything the backend does.
async fn check_cluster(client: &kube::Client, s: &K8sSettings) -> Result<(), String> {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    match with_retry(|| namespaces.get_opt(&s.namespace)).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(format!(
                "RUNTIME_NAMESPACE {:?} does not exist (create it, labelled for Pod Security `restricted`)",
                s.namespace
            ));
        }
        Err(e) => return Err(format!("reading RUNTIME_NAMESPACE {:?}: {e}", s.namespace)),
    }
    let classes: Api<RuntimeClass> = Api::all(client.clone());
    match with_retry(|| classes.get_opt(&s.runtime_class)).await {
        Ok(Some(_)) => {}
        Ok(None) => {
            return Err(format!(
                "RUNTIME_CLASS {:?} does not exist (install gVisor and its RuntimeClass, or set RUNTIME_CLASS)",
                s.runtime_class
            ));
        }
        Err(e) => return Err(format!("reading RUNTIME_CLASS {:?}: {e}", s.runtime_class)),
    }
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    for (group, resource, verbs) in RBAC {
        for verb in *verbs {
            if !allowed(&reviews, &s.namespace, (group, resource, verb, None)).await? {
                return Err(format!(
                    "RBAC: the data plane's service account may not {verb} {resource} in namespace {:?} (see deploy/helm: the data plane's Role)",
                    s.namespace
                ));
            }
        }
    }
    // Secrets: `get` on the one Secret (RUNTIME_SECRETS_NAME), no other.
    if let Some(name) = s.secrets_name.as_deref()
        && !allowed(&reviews, &s.namespace, ("", "secrets", "get", Some(name))).await?
    {
        return Err(format!(
            "RBAC: the data plane's service account may not get secret {name:?} (RUNTIME_SECRETS_NAME) in namespace {:?} (see deploy/helm: the data plane's Role)",
            s.namespace
        ));
    }
    Ok(())
}

#[cfg(test)]
mod mock_tests;

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{
        ContainerState, ContainerStateTerminated, ContainerStateWaiting, ContainerStatus,
        PodCondition, PodStatus,
    };

    fn with_status(status: PodStatus) -> Pod {
        Pod {
            status: Some(status),
            ..Default::default()
        }
    }

    fn waiting(reason: &str) -> PodStatus {
        PodStatus {
            phase: Some("Pending".into()),
            container_statuses: Some(vec![ContainerStatus {
                name: "agent".into(),
                state: Some(ContainerState {
                    waiting: Some(ContainerStateWaiting {
                        reason: Some(reason.into()),
                        message: None,
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn pod_states_are_read_from_the_status() {
        assert_eq!(pod_state(&Pod::default()), PodState::Pending);
        let running = with_status(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some("10.0.0.7".into()),
            ..Default::default()
        });
        assert_eq!(
            pod_state(&running),
            PodState::Running {
                ip: "10.0.0.7".into()
            }
        );
        for r in ["ErrImagePull", "ImagePullBackOff", "InvalidImageName"] {
            assert!(matches!(
                pod_state(&with_status(waiting(r))),
                PodState::ImageUnavailable { .. }
            ));
        }
        assert!(matches!(
            pod_state(&with_status(waiting("CreateContainerConfigError"))),
            PodState::Ended { .. }
        ));
        let unschedulable = with_status(PodStatus {
            phase: Some("Pending".into()),
            conditions: Some(vec![PodCondition {
                type_: "PodScheduled".into(),
                status: "False".into(),
                reason: Some("Unschedulable".into()),
                ..Default::default()
            }]),
            ..Default::default()
        });
        assert_eq!(pod_state(&unschedulable), PodState::Unschedulable);
        let oom = with_status(PodStatus {
            phase: Some("Running".into()),
            pod_ip: Some("10.0.0.7".into()),
            container_statuses: Some(vec![ContainerStatus {
                name: "agent".into(),
                state: Some(ContainerState {
                    terminated: Some(ContainerStateTerminated {
                        exit_code: 137,
                        reason: Some("OOMKilled".into()),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }]),
            ..Default::default()
        });
        assert_eq!(
            pod_state(&oom),
            PodState::Ended {
                reason: "OOMKilled".into()
            }
        );
        assert_eq!(endpoint_of("fd00::1"), "http://[fd00::1]:9000");
    }

    #[test]
    fn only_conflicts_throttling_and_server_errors_are_retried() {
        let status = |code: u16| {
            kube::Error::Api(Box::new(kube::core::Status {
                code,
                ..Default::default()
            }))
        };
        for code in [409, 429, 500, 502, 503, 504] {
            assert!(retryable(&status(code)), "{code}");
        }
        for code in [400, 401, 403, 404, 410, 422] {
            assert!(!retryable(&status(code)), "{code}");
        }
    }
}
