//! **A test fixture, not a Kubernetes implementation.** It stands in for a
//! cluster in tests of the data plane's `k8s` runtime backend, because no
//! API server can run on the machines the tests run on.
//!
//! [`Fixture::start`] serves, on `127.0.0.1:<ephemeral>`, the few API
//! endpoints the backend calls (namespaces, RuntimeClasses,
//! SelfSubjectAccessReviews, NetworkPolicies by server-side apply, pods:
//! create, get, patch, delete, list and watch), faithfully enough that the
//! real kube-rs client and `kube::runtime::watcher` work against it: JSON
//! objects with `uid`, a global increasing `resourceVersion` and
//! `creationTimestamp`, errors as Kubernetes `Status` objects with the API
//! server's `reason` and `code`, newline-delimited watch streams with
//! BOOKMARKs.
//!
//! It also plays the node: each created pod is scheduled against a node
//! capacity, its image "pulled" from a set of known images, and its one
//! container "run" by starting the **real** session agent in-process
//! (`session_agent::serve`) on a fresh pod IP `127.x.y.z` (x != 0) at the
//! port of its `SESSION_AGENT_ADDR`. The container's env becomes the
//! agent's flags (an env var the agent does not know fails the pod, naming
//! it); the node overrides the listen address, the isolation (the fixture
//! plays the gVisor RuntimeClass: `gvisor`, or `bwrap` in tests under
//! `SESSION_ISOLATION=bwrap`) and the two emptyDir directories. The pod then
//! goes Running, and Ready once its readiness probe answers; every status
//! change bumps the resourceVersion and is seen by watches.
//!
//! Tests steer it: [`Fixture::fail_next`] injects API errors,
//! [`Fixture::kill_pod`] kills a pod's agent (phase Failed, exit 137),
//! [`Fixture::delete_pod_externally`] deletes as `kubectl delete` would, and
//! [`Fixture::requests`] lists every request for assertions (including ones
//! to paths the fixture does not serve, which answer 404).
//!
//! What it does not do: authentication, admission beyond the RuntimeClass
//! check, cgroup limits (the agent applies the session limits the data
//! plane sends), restarts (`restartPolicy` is treated as `Never`), more
//! than one container per pod, `dryRun`, pagination (`limit` returns
//! everything). Readiness is probed every 100 ms rather than every
//! `periodSeconds`, so tests do not wait for the kubelet's cadence;
//! liveness keeps the pod's own period and threshold.
//! See `architecture/k8s-fixture.md`.

mod api;
mod node;
mod pods;
mod selector;
mod state;
mod status;
mod validation;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::networking::v1::NetworkPolicy;
use serde_json::Value;
use tokio::sync::{Notify, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::state::{Control, Fault, Key, State};

/// What the fake cluster contains and how its node behaves.
#[derive(Debug, Clone)]
pub struct FixtureOptions {
    /// Namespaces that exist (default `agent-sandbox-runtime`, `default`).
    pub namespaces: BTreeSet<String>,
    /// RuntimeClasses that exist, each with handler `runsc` (default `gvisor`).
    pub runtime_classes: BTreeSet<String>,
    /// Images that pull; any other image gets `ErrImagePull`, then
    /// `ImagePullBackOff` (default `sandbox-runtime:dev`, the data plane's
    /// default image).
    pub images: BTreeSet<String>,
    /// Allocatable CPU of the one node, millicores (default 16000). A pod
    /// requesting more than is free stays Pending, `Unschedulable`.
    pub node_cpu_millicores: u64,
    /// Allocatable memory of the node, MiB (default 32768).
    pub node_memory_mib: u64,
    /// The isolation the started agents use in place of what the pod asks
    /// (`pod`): `gvisor` (default: the fixture plays the gVisor
    /// RuntimeClass) or `bwrap`. See [`isolation_from_env`].
    pub isolation: String,
    /// `(verb, resource)` pairs SelfSubjectAccessReviews deny (default none).
    pub denied: BTreeSet<(String, String)>,
    /// How often a watch that asked for bookmarks gets one (default 1 s).
    pub bookmark_interval: Duration,
    /// How long a pod with an unknown image shows `ErrImagePull` before
    /// `ImagePullBackOff` (default 200 ms).
    pub pull_backoff_after: Duration,
    /// Secrets that exist, read-only: `(namespace, name)` -> key -> value
    /// (default none). `GET` serves them; nothing writes them.
    pub secrets: BTreeMap<(String, String), BTreeMap<String, Vec<u8>>>,
}

impl Default for FixtureOptions {
    fn default() -> Self {
        let set = |items: &[&str]| items.iter().map(|s| (*s).to_owned()).collect();
        FixtureOptions {
            namespaces: set(&["agent-sandbox-runtime", "default"]),
            runtime_classes: set(&["gvisor"]),
            images: set(&["sandbox-runtime:dev"]),
            node_cpu_millicores: 16_000,
            node_memory_mib: 32_768,
            isolation: "gvisor".into(),
            denied: BTreeSet::new(),
            bookmark_interval: Duration::from_secs(1),
            pull_backoff_after: Duration::from_millis(200),
            secrets: BTreeMap::new(),
        }
    }
}

impl FixtureOptions {
    /// Adds an image that pulls.
    pub fn image(mut self, image: &str) -> Self {
        self.images.insert(image.to_owned());
        self
    }

    /// Sets the isolation of the started agents (`gvisor` or `bwrap`).
    pub fn isolation(mut self, isolation: &str) -> Self {
        self.isolation = isolation.to_owned();
        self
    }

    /// Makes SelfSubjectAccessReviews deny `verb` on `resource`.
    pub fn deny(mut self, verb: &str, resource: &str) -> Self {
        self.denied.insert((verb.to_owned(), resource.to_owned()));
        self
    }

    /// Adds a Secret `name` in `namespace` with these keys and values.
    pub fn secret(mut self, namespace: &str, name: &str, data: &[(&str, &str)]) -> Self {
        self.secrets.insert(
            (namespace.to_owned(), name.to_owned()),
            data.iter()
                .map(|(k, v)| ((*k).to_owned(), v.as_bytes().to_vec()))
                .collect(),
        );
        self
    }

    /// Sets the node's allocatable CPU (millicores) and memory (MiB).
    pub fn capacity(mut self, cpu_millicores: u64, memory_mib: u64) -> Self {
        self.node_cpu_millicores = cpu_millicores;
        self.node_memory_mib = memory_mib;
        self
    }
}

/// The isolation tests use, as the other integration tests choose it:
/// `SESSION_ISOLATION` from the environment, `gvisor` by default.
pub fn isolation_from_env() -> String {
    std::env::var("SESSION_ISOLATION").unwrap_or_else(|_| "gvisor".into())
}

/// One request the fixture received, in arrival order.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRequest {
    /// `GET`, `POST`, `PATCH`, ...
    pub method: String,
    /// The path without the query.
    pub path: String,
    /// The decoded query parameters.
    pub query: BTreeMap<String, String>,
    /// The `Content-Type` header, when present.
    pub content_type: Option<String>,
    /// The body as JSON; a body that is not JSON is kept as a JSON string;
    /// `None` when empty.
    pub body: Option<Value>,
}

/// How [`Fixture::kill_pod`] reports the container's end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// `reason: OOMKilled`, exit 137: the memory limit was hit.
    OomKilled,
    /// `reason: Error`, exit 137: killed by a signal.
    Error,
}

impl Termination {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Termination::OomKilled => "OOMKilled",
            Termination::Error => "Error",
        }
    }
}

/// A test helper call that could not act.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FixtureError {
    /// No pod of that name in any namespace.
    #[error("pod {0:?} not found")]
    NotFound(String),
    /// The pod's lifecycle already ended (Failed or being deleted).
    #[error("pod {0:?} is not running (its lifecycle already ended)")]
    NotRunning(String),
}

/// State shared by the HTTP handlers, the pod lifecycles and [`Fixture`].
pub(crate) struct Shared {
    pub options: FixtureOptions,
    state: Mutex<State>,
    pub tasks: TaskTracker,
    pub shutdown: CancellationToken,
    /// Woken when a pod stops holding node capacity (Pending pods retry).
    pub capacity_freed: Notify,
    /// The kubelet's HTTP client for probes (no proxy: pod IPs are local).
    pub http: reqwest::Client,
}

impl Shared {
    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A running fake cluster; see the crate documentation.
pub struct Fixture {
    shared: Arc<Shared>,
    url: String,
}

impl Fixture {
    /// Starts the fake API server on `127.0.0.1:0`.
    ///
    /// # Panics
    /// When `options.isolation` is not an isolation the session agent
    /// knows, or the loopback port cannot be bound (test set-up errors).
    pub async fn start(options: FixtureOptions) -> Fixture {
        assert!(
            <session_agent::isolation::IsolationKind as clap::ValueEnum>::from_str(
                &options.isolation,
                false
            )
            .is_ok(),
            "FixtureOptions::isolation {:?} is not an isolation of the session agent",
            options.isolation
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("binding the fixture's API port on 127.0.0.1");
        let url = format!(
            "http://{}",
            listener
                .local_addr()
                .expect("a bound listener has an address")
        );
        let http = reqwest::Client::builder()
            .no_proxy()
            .build()
            .expect("a plain HTTP client builds");
        let shared = Arc::new(Shared {
            options,
            // A real cluster never lists at resourceVersion 0 (that means
            // "any" to a watch): the built-in objects hold version 1.
            state: Mutex::new(State {
                rv: 1,
                ..State::default()
            }),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
            capacity_freed: Notify::new(),
            http,
        });
        let router = api::router(shared.clone());
        let stop = shared.shutdown.clone();
        shared.tasks.spawn(async move {
            let served = axum::serve(listener, router)
                .with_graceful_shutdown(stop.cancelled_owned())
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "k8s fixture: the API server stopped");
            }
        });
        tracing::info!(%url, "k8s fixture listening");
        Fixture { shared, url }
    }

    /// The API server's base URL (`http://127.0.0.1:<port>`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// A kube client for the fixture (no TLS, no credentials; default
    /// namespace `default`).
    pub fn client(&self) -> kube::Client {
        let uri = self
            .url
            .parse()
            .expect("the fixture's own URL is a valid URI");
        let mut config = kube::Config::new(uri);
        // As the data plane builds its own: the backend's bounded retries
        // are the only ones, so a test's scripted faults reach it.
        config.default_retry = false;
        kube::Client::try_from(config).expect("a kube client for a plain http URL builds")
    }

    /// Every request so far, in order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.shared.state().requests.clone()
    }

    /// The next `count` requests with this method whose path starts with
    /// `path_prefix` answer a `Status` error (`status_code`, `reason`, e.g.
    /// 409 `Conflict`, 429 `TooManyRequests`, 500 `InternalError`) and have
    /// no effect. Note that the kube client itself retries 429, 503 and 504.
    pub fn fail_next(
        &self,
        method: &str,
        path_prefix: &str,
        status_code: u16,
        reason: &str,
        count: u32,
    ) {
        self.shared.state().faults.push(Fault {
            method: method.to_owned(),
            path_prefix: path_prefix.to_owned(),
            code: status_code,
            reason: reason.to_owned(),
            remaining: count,
        });
    }

    /// Every pod as stored now (all namespaces).
    pub fn pods(&self) -> Vec<Pod> {
        self.shared
            .state()
            .pods
            .values()
            .map(|e| e.pod.clone())
            .collect()
    }

    /// One pod by name (any namespace).
    pub fn pod(&self, name: &str) -> Option<Pod> {
        let state = self.shared.state();
        let key = find(&state, name)?;
        state.pods.get(&key).map(|e| e.pod.clone())
    }

    /// Every NetworkPolicy as stored now.
    pub fn network_policies(&self) -> Vec<NetworkPolicy> {
        self.shared
            .state()
            .policies
            .values()
            .filter_map(|v| serde_json::from_value(v.clone()).ok())
            .collect()
    }

    /// Kills a pod's container as a signal would (`reason: Error`, exit
    /// 137): its agent stops, the pod goes to phase Failed (a MODIFIED
    /// event). Returns once the agent has stopped.
    pub async fn kill_pod(&self, name: &str) -> Result<(), FixtureError> {
        self.terminate(name, Termination::Error).await
    }

    /// As [`Fixture::kill_pod`], reported as the memory limit's kill
    /// (`reason: OOMKilled`, exit 137).
    pub async fn oom_kill_pod(&self, name: &str) -> Result<(), FixtureError> {
        self.terminate(name, Termination::OomKilled).await
    }

    async fn terminate(&self, name: &str, how: Termination) -> Result<(), FixtureError> {
        let (done, wait) = oneshot::channel();
        {
            let state = self.shared.state();
            let key = find(&state, name).ok_or_else(|| FixtureError::NotFound(name.into()))?;
            let entry = state
                .pods
                .get(&key)
                .ok_or_else(|| FixtureError::NotFound(name.into()))?;
            let sent = entry
                .control
                .as_ref()
                .is_some_and(|c| c.send(Control::Kill { how, done }).is_ok());
            if !sent {
                return Err(FixtureError::NotRunning(name.into()));
            }
        }
        wait.await
            .map_err(|_| FixtureError::NotRunning(name.into()))
    }

    /// Deletes a pod as `kubectl delete` would (not through the recorded
    /// API): watches see it terminate, then a DELETED event. Returns once
    /// the pod is gone.
    pub async fn delete_pod_externally(&self, name: &str) -> Result<(), FixtureError> {
        let key =
            find(&self.shared.state(), name).ok_or_else(|| FixtureError::NotFound(name.into()))?;
        let (done, wait) = oneshot::channel();
        pods::delete(&self.shared, &key, None, Some(done))
            .map_err(|_| FixtureError::NotFound(name.into()))?;
        // The sender is dropped unsignalled only when the pod was removed at once.
        let _ = wait.await;
        Ok(())
    }

    /// Stops the API server and every agent, and waits until all have
    /// stopped (their sandboxes destroyed).
    pub async fn shutdown(self) {
        self.shared.shutdown.cancel();
        self.shared.tasks.close();
        self.shared.tasks.wait().await;
    }
}

impl Drop for Fixture {
    /// Stops everything without waiting; prefer [`Fixture::shutdown`],
    /// which waits for the agents to have destroyed their sandboxes.
    fn drop(&mut self) {
        self.shared.shutdown.cancel();
    }
}

/// The key of the first pod named `name` (names are unique per namespace;
/// tests use one namespace).
fn find(state: &State, name: &str) -> Option<Key> {
    state.pods.keys().find(|(_, n)| n == name).cloned()
}
