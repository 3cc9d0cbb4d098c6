//! Pods: what the API server checks on create and patch, graceful
//! deletion, and each pod's lifecycle on the fixture's node (schedule,
//! pull, start the agent, probe, end).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{
    Container, ContainerState, ContainerStateRunning, ContainerStateTerminated,
    ContainerStateWaiting, ContainerStatus, HostIP, Pod, PodCondition, PodIP, PodStatus,
};
use rand::Rng;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::Shared;
use crate::node::{self, ProbeTarget};
use crate::state::{Control, EventType, Key, PodEntry, State, now};
use crate::status::ApiError;
use crate::validation;

/// The one node's name (set as `spec.nodeName` when a pod is scheduled).
const NODE_NAME: &str = "k8s-fixture-node";
/// The node's address (`status.hostIP`).
const HOST_IP: &str = "127.0.0.1";
/// How often readiness is probed until the pod is ready.
const READINESS_EVERY: Duration = Duration::from_millis(100);
/// Exit code of a container killed by SIGKILL.
const KILLED_EXIT_CODE: i32 = 137;

fn random_suffix(len: usize) -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let mut rng = rand::rng();
    (0..len)
        .map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]))
        .collect()
}

/// A random RFC 4122 version 4 UUID, as the API server assigns `uid`s.
pub(crate) fn new_uid() -> String {
    let mut b: [u8; 16] = rand::rng().random();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// CPU (millicores) and memory (MiB) a pod requests, once defaulted.
pub(crate) fn pod_requests(pod: &Pod) -> (u64, u64) {
    let mut cpu = 0u64;
    let mut memory = 0u64;
    for c in pod.spec.iter().flat_map(|s| s.containers.iter()) {
        let requests = c.resources.as_ref().and_then(|r| r.requests.as_ref());
        let get = |r: &str| {
            requests
                .and_then(|q| q.get(r))
                .and_then(|q| validation::parse_quantity(&q.0))
                .unwrap_or(0.0)
        };
        // Both are non-negative and finite (checked on create).
        cpu += (get("cpu") * 1000.0).ceil() as u64;
        memory += (get("memory") / (1024.0 * 1024.0)).ceil() as u64;
    }
    (cpu, memory)
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Failed" | "Succeeded")
    )
}

/// Field errors of a container's resources; requests default to limits.
fn check_resources(i: usize, c: &mut Container, errors: &mut Vec<String>) {
    let Some(res) = c.resources.as_mut() else {
        return;
    };
    for (kind, map) in [("limits", &res.limits), ("requests", &res.requests)] {
        for (name, q) in map.iter().flatten() {
            match validation::parse_quantity(&q.0) {
                None => errors.push(format!(
                    "spec.containers[{i}].resources.{kind}[{name}]: Invalid value: {:?}: quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'",
                    q.0
                )),
                Some(v) if v < 0.0 => errors.push(format!(
                    "spec.containers[{i}].resources.{kind}[{name}]: Invalid value: {:?}: must be greater than or equal to 0",
                    q.0
                )),
                Some(_) => {}
            }
        }
    }
    let limits = res.limits.clone().unwrap_or_default();
    let requests = res.requests.get_or_insert_with(BTreeMap::new);
    for (name, limit) in &limits {
        let request = requests
            .entry(name.clone())
            .or_insert_with(|| limit.clone());
        if let (Some(r), Some(l)) = (
            validation::parse_quantity(&request.0),
            validation::parse_quantity(&limit.0),
        ) && r > l
        {
            errors.push(format!(
                "spec.containers[{i}].resources.requests: Invalid value: {:?}: must be less than or equal to {name} limit of {}",
                request.0, limit.0
            ));
        }
    }
}

/// `POST /api/v1/namespaces/{ns}/pods`: checks, stores (ADDED) and starts
/// the pod's lifecycle.
pub(crate) fn create(fx: &Arc<Shared>, ns: &str, body: &[u8]) -> Result<Pod, ApiError> {
    let mut pod: Pod = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding the Pod: {e}")))?;
    if !fx.options.namespaces.contains(ns) {
        return Err(ApiError::not_found("namespaces", ns));
    }
    if pod.metadata.namespace.as_deref().is_some_and(|n| n != ns) {
        return Err(ApiError::bad_request(
            "the namespace of the provided object does not match the namespace sent on the request",
        ));
    }
    let name = match (&pod.metadata.name, &pod.metadata.generate_name) {
        (Some(n), _) if !n.is_empty() => n.clone(),
        (_, Some(g)) if !g.is_empty() => format!("{g}{}", random_suffix(5)),
        _ => {
            return Err(ApiError::invalid(
                "Pod",
                "",
                &["metadata.name: Required value: name or generateName is required".into()],
            ));
        }
    };
    // Admission (the RuntimeClass plugin) runs before validation.
    if let Some(class) = pod
        .spec
        .as_ref()
        .and_then(|s| s.runtime_class_name.as_ref())
        && !fx.options.runtime_classes.contains(class)
    {
        return Err(ApiError::forbidden(
            "pods",
            &name,
            &format!("pod rejected: RuntimeClass {class:?} not found"),
        ));
    }
    let mut errors = Vec::new();
    if let Err(e) = validation::check_object_name(&name) {
        errors.push(e);
    }
    errors.extend(validation::check_labels(
        "metadata.labels",
        pod.metadata.labels.as_ref(),
    ));
    errors.extend(validation::check_annotations(
        "metadata.annotations",
        pod.metadata.annotations.as_ref(),
    ));
    match pod.spec.as_mut() {
        None => errors.push("spec: Required value".into()),
        Some(spec) if spec.containers.is_empty() => {
            errors.push("spec.containers: Required value".into());
        }
        Some(spec) => {
            let mut names = Vec::new();
            for (i, c) in spec.containers.iter_mut().enumerate() {
                if !validation::is_dns_label(&c.name) {
                    errors.push(format!(
                        "spec.containers[{i}].name: Invalid value: {:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-'",
                        c.name
                    ));
                }
                if names.contains(&c.name) {
                    errors.push(format!(
                        "spec.containers[{i}].name: Duplicate value: {:?}",
                        c.name
                    ));
                }
                names.push(c.name.clone());
                if c.image.as_deref().is_none_or(str::is_empty) {
                    errors.push(format!("spec.containers[{i}].image: Required value"));
                }
                check_resources(i, c, &mut errors);
            }
        }
    }
    if !errors.is_empty() {
        return Err(ApiError::invalid("Pod", &name, &errors));
    }

    let key = (ns.to_owned(), name.clone());
    let (control, inbox) = mpsc::unbounded_channel();
    let stored = {
        let mut state = fx.state();
        if state.pods.contains_key(&key) {
            return Err(ApiError::already_exists("pods", &name));
        }
        let meta = &mut pod.metadata;
        meta.name = Some(name);
        meta.namespace = Some(ns.to_owned());
        meta.uid = Some(new_uid());
        meta.creation_timestamp = Some(now());
        meta.generation = Some(1);
        meta.deletion_timestamp = None;
        meta.managed_fields = None;
        if let Some(spec) = pod.spec.as_mut() {
            spec.node_name = None;
            spec.restart_policy.get_or_insert_with(|| "Always".into());
            spec.termination_grace_period_seconds.get_or_insert(30);
            spec.scheduler_name
                .get_or_insert_with(|| "default-scheduler".into());
            spec.service_account_name
                .get_or_insert_with(|| "default".into());
            spec.dns_policy.get_or_insert_with(|| "ClusterFirst".into());
        }
        pod.status = Some(PodStatus {
            phase: Some("Pending".into()),
            qos_class: Some(qos_class(&pod).into()),
            ..Default::default()
        });
        let stored = state.emit(EventType::Added, None, pod);
        state.pods.insert(
            key.clone(),
            PodEntry {
                pod: stored.clone(),
                control: Some(control),
            },
        );
        stored
    };
    let task_fx = fx.clone();
    fx.tasks.spawn(lifecycle(task_fx, key, inbox));
    Ok(stored)
}

/// `Guaranteed` when every container's requests equal its limits for CPU and memory.
fn qos_class(pod: &Pod) -> &'static str {
    let containers = pod.spec.iter().flat_map(|s| s.containers.iter());
    let mut any = false;
    let mut guaranteed = true;
    for c in containers {
        let res = c.resources.as_ref();
        let limits = res.and_then(|r| r.limits.as_ref());
        let requests = res.and_then(|r| r.requests.as_ref());
        for r in ["cpu", "memory"] {
            let l = limits.and_then(|m| m.get(r));
            let q = requests.and_then(|m| m.get(r));
            any |= l.is_some() || q.is_some();
            guaranteed &= l.is_some() && l.map(|x| &x.0) == q.map(|x| &x.0);
        }
    }
    match (any, guaranteed) {
        (false, _) => "BestEffort",
        (true, true) => "Guaranteed",
        (true, false) => "Burstable",
    }
}

/// How a PATCH body is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PatchKind {
    /// `application/merge-patch+json`, and strategic merge (the same for
    /// the metadata maps a pod patch may change).
    Merge,
    /// `application/json-patch+json`.
    Json,
}

/// `PATCH /api/v1/namespaces/{ns}/pods/{name}`: only metadata may change
/// (labels, annotations, owner references, finalizers); a
/// `metadata.resourceVersion` in the patch is a precondition.
pub(crate) fn patch(
    fx: &Arc<Shared>,
    key: &Key,
    kind: PatchKind,
    body: &[u8],
) -> Result<Pod, ApiError> {
    let patch: Value = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding the patch: {e}")))?;
    let name = key.1.as_str();
    let mut state = fx.state();
    let current = state
        .pods
        .get(key)
        .map(|e| e.pod.clone())
        .ok_or_else(|| ApiError::not_found("pods", name))?;
    let mut doc = serde_json::to_value(&current)
        .map_err(|e| ApiError::new(500, "InternalError", e.to_string()))?;
    match kind {
        PatchKind::Merge => json_patch::merge(&mut doc, &patch),
        PatchKind::Json => {
            let ops: json_patch::Patch = serde_json::from_value(patch).map_err(|e| {
                ApiError::bad_request(format!("error decoding the JSON patch: {e}"))
            })?;
            json_patch::patch(&mut doc, &ops).map_err(|e| {
                ApiError::invalid("Pod", name, &[format!("the JSON patch did not apply: {e}")])
            })?;
        }
    }
    let patched: Pod = serde_json::from_value(doc)
        .map_err(|e| ApiError::bad_request(format!("the patched Pod does not decode: {e}")))?;
    let (old, new) = (&current.metadata, &patched.metadata);
    if new.resource_version.is_some() && new.resource_version != old.resource_version {
        return Err(ApiError::conflict(
            "pods",
            name,
            "the object has been modified; please apply your changes to the latest version and try again",
        ));
    }
    let mut errors = Vec::new();
    if new.name != old.name || new.namespace != old.namespace || new.uid != old.uid {
        errors.push("metadata: Invalid value: name, namespace and uid are immutable".into());
    }
    if patched.spec != current.spec {
        errors.push(
            "spec: Forbidden: pod updates may not change fields other than `spec.containers[*].image`, `spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, `spec.tolerations` (only additions to existing tolerations), `spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative) (the fixture refuses every spec change)".into(),
        );
    }
    errors.extend(validation::check_labels(
        "metadata.labels",
        new.labels.as_ref(),
    ));
    errors.extend(validation::check_annotations(
        "metadata.annotations",
        new.annotations.as_ref(),
    ));
    if !errors.is_empty() {
        return Err(ApiError::invalid("Pod", name, &errors));
    }
    let (labels, annotations) = (new.labels.clone(), new.annotations.clone());
    let (owners, finalizers) = (new.owner_references.clone(), new.finalizers.clone());
    state
        .update_pod(key, |pod| {
            pod.metadata.labels = labels.filter(|l| !l.is_empty());
            pod.metadata.annotations = annotations.filter(|a| !a.is_empty());
            pod.metadata.owner_references = owners.filter(|o| !o.is_empty());
            pod.metadata.finalizers = finalizers.filter(|f| !f.is_empty());
        })
        .ok_or_else(|| ApiError::not_found("pods", name))
}

/// Preconditions and grace period of a DELETE (`DeleteOptions` body or query).
#[derive(Debug, Default, Clone)]
pub(crate) struct DeleteOptions {
    pub uid: Option<String>,
    pub resource_version: Option<String>,
}

/// Deletes a pod: one still on the node is marked terminating (MODIFIED)
/// and removed (DELETED) by its lifecycle once its agent has stopped; one
/// whose lifecycle ended is removed at once. Returns the object as the API
/// server does. `done` is signalled once the pod is gone.
pub(crate) fn delete(
    fx: &Arc<Shared>,
    key: &Key,
    options: Option<DeleteOptions>,
    done: Option<oneshot::Sender<()>>,
) -> Result<Pod, ApiError> {
    let name = key.1.as_str();
    let mut state = fx.state();
    let entry = state
        .pods
        .get(key)
        .ok_or_else(|| ApiError::not_found("pods", name))?;
    if let Some(o) = options {
        let meta = &entry.pod.metadata;
        if o.uid.is_some() && o.uid != meta.uid {
            return Err(ApiError::conflict(
                "pods",
                name,
                "Precondition failed: UID in precondition does not match the UID in record",
            ));
        }
        if o.resource_version.is_some() && o.resource_version != meta.resource_version {
            return Err(ApiError::conflict(
                "pods",
                name,
                "Precondition failed: ResourceVersion in precondition does not match the ResourceVersion in record",
            ));
        }
    }
    let control = entry.control.clone();
    let running = control.is_some();
    let pod = if running {
        let grace = entry
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds);
        state
            .update_pod(key, |pod| {
                if pod.metadata.deletion_timestamp.is_none() {
                    pod.metadata.deletion_timestamp = Some(now());
                    pod.metadata.deletion_grace_period_seconds = grace;
                }
            })
            .ok_or_else(|| ApiError::not_found("pods", name))?
    } else {
        entry.pod.clone()
    };
    let mut done = done;
    if let Some(control) = control {
        match control.send(Control::Delete { done: done.take() }) {
            Ok(()) => return Ok(pod),
            Err(mpsc::error::SendError(Control::Delete { done: back })) => done = back,
            Err(_) => {}
        }
    }
    let removed = state.remove_pod(key).unwrap_or(pod);
    drop(state);
    fx.capacity_freed.notify_waiters();
    if let Some(done) = done {
        let _ = done.send(());
    }
    Ok(removed)
}

fn status_mut(pod: &mut Pod) -> &mut PodStatus {
    pod.status.get_or_insert_with(PodStatus::default)
}

/// Sets a condition; its transition time moves only when its status does.
fn set_condition(pod: &mut Pod, kind: &str, ok: bool, reason: Option<&str>, message: Option<&str>) {
    let value = if ok { "True" } else { "False" };
    let conditions = status_mut(pod).conditions.get_or_insert_with(Vec::new);
    let fresh = PodCondition {
        type_: kind.into(),
        status: value.into(),
        reason: reason.map(Into::into),
        message: message.map(Into::into),
        last_transition_time: Some(now()),
        ..Default::default()
    };
    match conditions.iter_mut().find(|c| c.type_ == kind) {
        Some(c) if c.status == value => {
            c.reason = fresh.reason;
            c.message = fresh.message;
        }
        Some(c) => *c = fresh,
        None => conditions.push(fresh),
    }
}

fn set_container(pod: &mut Pod, state: ContainerState, ready: bool, started: bool) {
    let container = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .cloned()
        .unwrap_or_default();
    let image = container.image.clone().unwrap_or_default();
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let running = !matches!(
        state,
        ContainerState {
            waiting: Some(_),
            ..
        }
    );
    let status = ContainerStatus {
        name: container.name.clone(),
        image: image.clone(),
        image_id: if running {
            format!("k8s-fixture/{image}")
        } else {
            String::new()
        },
        container_id: running.then(|| format!("fixture://{uid}")),
        ready,
        started: Some(started),
        restart_count: 0,
        state: Some(state),
        ..Default::default()
    };
    status_mut(pod).container_statuses = Some(vec![status]);
    set_condition(
        pod,
        "ContainersReady",
        ready,
        (!ready).then_some("ContainersNotReady"),
        (!ready)
            .then(|| format!("containers with unready status: [{}]", container.name))
            .as_deref(),
    );
    set_condition(
        pod,
        "Ready",
        ready,
        (!ready).then_some("ContainersNotReady"),
        (!ready)
            .then(|| format!("containers with unready status: [{}]", container.name))
            .as_deref(),
    );
}

fn waiting(reason: &str, message: &str) -> ContainerState {
    ContainerState {
        waiting: Some(ContainerStateWaiting {
            reason: Some(reason.into()),
            message: Some(message.into()),
        }),
        ..Default::default()
    }
}

fn terminated(exit_code: i32, reason: &str, message: Option<String>, pod: &Pod) -> ContainerState {
    let started_at = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.first())
        .and_then(|c| c.state.as_ref())
        .and_then(|s| s.running.as_ref())
        .and_then(|r| r.started_at.clone());
    ContainerState {
        terminated: Some(ContainerStateTerminated {
            exit_code,
            reason: Some(reason.into()),
            message,
            started_at,
            finished_at: Some(now()),
            container_id: pod.metadata.uid.as_ref().map(|u| format!("fixture://{u}")),
            signal: None,
        }),
        ..Default::default()
    }
}

/// Marks the pod Failed with its container terminated.
fn fail(pod: &mut Pod, exit_code: i32, reason: &str, message: Option<String>) {
    let state = terminated(exit_code, reason, message, pod);
    set_container(pod, state, false, false);
    status_mut(pod).phase = Some("Failed".into());
}

/// Why a pod's lifecycle stopped waiting.
enum Interrupt {
    Control(Control),
    Shutdown,
}

/// Waits for a control message or the fixture's shutdown.
async fn interrupted(
    inbox: &mut mpsc::UnboundedReceiver<Control>,
    shutdown: &CancellationToken,
) -> Interrupt {
    tokio::select! {
        msg = inbox.recv() => match msg {
            Some(m) => Interrupt::Control(m),
            None => Interrupt::Shutdown,
        },
        () = shutdown.cancelled() => Interrupt::Shutdown,
    }
}

/// A running agent of one pod.
struct Agent {
    ip: Ipv4Addr,
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Outcome>,
    /// The pod's emptyDirs, removed after the agent stopped.
    _dirs: Vec<tempfile::TempDir>,
}

/// How an agent's `serve` ended: Ok, or its error as text.
type Outcome = Result<(), String>;

impl Agent {
    /// An orderly stop (the agent ends its sessions and destroys its
    /// sandboxes, so nothing leaks on the test machine); frees the IP.
    async fn stop(self, fx: &Shared) -> Outcome {
        self.stop.cancel();
        let outcome = self
            .task
            .await
            .unwrap_or_else(|e| Err(format!("the agent task failed: {e}")));
        fx.state().ips.remove(&self.ip);
        outcome
    }
}

/// What ends a pod's lifecycle.
enum End {
    /// Delete requested: remove the pod (then signal).
    Delete(Option<oneshot::Sender<()>>),
    /// The pod is left as it is (terminal, or the fixture stops).
    Keep,
}

/// A pod's life on the node, from Pending to its end.
async fn lifecycle(fx: Arc<Shared>, key: Key, mut inbox: mpsc::UnboundedReceiver<Control>) {
    let (end, agent) = run(&fx, &key, &mut inbox).await;
    if let Some(agent) = agent {
        let _ = agent.stop(&fx).await;
    }
    finish(&fx, &key, end, &mut inbox);
}

/// Applies the end and answers what is still queued: this lifecycle no
/// longer takes messages (the pod's `control` is cleared under the lock,
/// so nothing new arrives after the drain).
fn finish(fx: &Shared, key: &Key, end: End, inbox: &mut mpsc::UnboundedReceiver<Control>) {
    let mut signals = Vec::new();
    let mut remove = false;
    if let End::Delete(done) = end {
        remove = true;
        signals.extend(done);
    }
    {
        let mut state = fx.state();
        if let Some(entry) = state.pods.get_mut(key) {
            entry.control = None;
        }
        inbox.close();
        while let Ok(msg) = inbox.try_recv() {
            match msg {
                Control::Delete { done } => {
                    remove = true;
                    signals.extend(done);
                }
                Control::Kill { done, .. } => signals.push(done),
            }
        }
        if remove && !fx.shutdown.is_cancelled() {
            state.remove_pod(key);
        }
    }
    fx.capacity_freed.notify_waiters();
    for done in signals {
        let _ = done.send(());
    }
}

/// Handles a control message that arrives while no agent runs.
fn on_control_idle(fx: &Shared, key: &Key, msg: Control) -> End {
    match msg {
        Control::Delete { done } => End::Delete(done),
        Control::Kill { how, done } => {
            fx.state().update_pod(key, |pod| {
                fail(pod, KILLED_EXIT_CODE, how.reason(), None);
            });
            let _ = done.send(());
            End::Keep
        }
    }
}

/// The lifecycle proper; returns how it ended and the agent still to stop.
async fn run(
    fx: &Arc<Shared>,
    key: &Key,
    inbox: &mut mpsc::UnboundedReceiver<Control>,
) -> (End, Option<Agent>) {
    // Schedule: wait until the node has room.
    loop {
        let freed = fx.capacity_freed.notified();
        tokio::pin!(freed);
        freed.as_mut().enable();
        if schedule(fx, key) {
            break;
        }
        tokio::select! {
            i = interrupted(inbox, &fx.shutdown) => return (idle_end(fx, key, i), None),
            () = &mut freed => {}
        }
    }
    let Some(pod) = fx.state().pods.get(key).map(|e| e.pod.clone()) else {
        return (End::Keep, None);
    };
    let Some(container) = pod
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .cloned()
    else {
        return (End::Keep, None);
    };
    fx.state().update_pod(key, |pod| {
        set_condition(pod, "Initialized", true, None, None);
    });

    // Pull.
    let image = container.image.clone().unwrap_or_default();
    if !fx.options.images.contains(&image) {
        let message = format!(
            "failed to pull and unpack image {image:?}: not found (the k8s fixture pulls only FixtureOptions::images)"
        );
        fx.state().update_pod(key, |pod| {
            set_container(pod, waiting("ErrImagePull", &message), false, false);
        });
        tokio::select! {
            i = interrupted(inbox, &fx.shutdown) => return (idle_end(fx, key, i), None),
            () = tokio::time::sleep(fx.options.pull_backoff_after) => {}
        }
        fx.state().update_pod(key, |pod| {
            set_container(
                pod,
                waiting(
                    "ImagePullBackOff",
                    &format!("Back-off pulling image {image:?}"),
                ),
                false,
                false,
            );
        });
        let i = interrupted(inbox, &fx.shutdown).await;
        return (idle_end(fx, key, i), None);
    }
    let containers = pod.spec.as_ref().map_or(0, |s| s.containers.len());
    if containers != 1 {
        fx.state().update_pod(key, |pod| {
            fail(
                pod,
                1,
                "Error",
                Some(format!(
                    "the k8s fixture runs pods of exactly one container (this one has {containers})"
                )),
            );
        });
        return (End::Keep, None);
    }

    // Start the agent.
    let agent = match start_agent(fx, &container).await {
        Ok(agent) => agent,
        Err(message) => {
            fx.state().update_pod(key, |pod| {
                fail(pod, 1, "Error", Some(message));
            });
            return (End::Keep, None);
        }
    };
    let ip = agent.ip.to_string();
    let readiness = node::probe_target(&container, container.readiness_probe.as_ref());
    fx.state().update_pod(key, |pod| {
        let started_at = now();
        let status = status_mut(pod);
        status.phase = Some("Running".into());
        status.pod_ip = Some(ip.clone());
        status.pod_ips = Some(vec![PodIP { ip: ip.clone() }]);
        status.host_ip = Some(HOST_IP.into());
        status.host_ips = Some(vec![HostIP { ip: HOST_IP.into() }]);
        status.start_time = Some(started_at.clone());
        let running = ContainerState {
            running: Some(ContainerStateRunning {
                started_at: Some(started_at),
            }),
            ..Default::default()
        };
        set_container(pod, running, readiness.is_none(), true);
    });
    supervise(fx, key, inbox, agent, &container, readiness, &pod).await
}

/// The end for an interruption while no agent runs.
fn idle_end(fx: &Shared, key: &Key, i: Interrupt) -> End {
    match i {
        Interrupt::Control(msg) => on_control_idle(fx, key, msg),
        Interrupt::Shutdown => End::Keep,
    }
}

/// Binds the pod IP and starts the agent with the pod's configuration.
async fn start_agent(fx: &Arc<Shared>, container: &Container) -> Result<Agent, String> {
    let port = node::agent_port(container)?;
    let (ip, listener) = {
        let taken = |ip| fx.state().ips.contains(&ip);
        node::bind_pod_ip(taken, port).await?
    };
    fx.state().ips.insert(ip);
    let launch = match node::agent_launch(container, ip, &fx.options.isolation) {
        Ok(l) => l,
        Err(e) => {
            fx.state().ips.remove(&ip);
            return Err(e);
        }
    };
    let stop = fx.shutdown.child_token();
    let serve = session_agent::serve(listener, launch.config, stop.clone());
    let task = tokio::spawn(async move { serve.await.map_err(|e| format!("{e:#}")) });
    Ok(Agent {
        ip,
        stop,
        task,
        _dirs: launch.dirs,
    })
}

/// Schedules the pod when the node has room (PodScheduled True), or marks
/// it Unschedulable. Returns whether it is scheduled.
fn schedule(fx: &Shared, key: &Key) -> bool {
    let mut state = fx.state();
    let Some(pod) = state.pods.get(key).map(|e| e.pod.clone()) else {
        return false;
    };
    let (cpu, memory) = pod_requests(&pod);
    let (used_cpu, used_memory) = used(&state, key);
    let o = &fx.options;
    let cpu_free = o.node_cpu_millicores.saturating_sub(used_cpu);
    let memory_free = o.node_memory_mib.saturating_sub(used_memory);
    if cpu <= cpu_free && memory <= memory_free {
        state.update_pod(key, |pod| {
            if let Some(spec) = pod.spec.as_mut() {
                spec.node_name = Some(NODE_NAME.into());
            }
            set_condition(pod, "PodScheduled", true, None, None);
        });
        return true;
    }
    let mut short = Vec::new();
    if cpu > cpu_free {
        short.push("1 Insufficient cpu");
    }
    if memory > memory_free {
        short.push("1 Insufficient memory");
    }
    let message = format!(
        "0/1 nodes are available: {}. preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod.",
        short.join(", ")
    );
    state.update_pod(key, |pod| {
        set_condition(
            pod,
            "PodScheduled",
            false,
            Some("Unschedulable"),
            Some(&message),
        );
    });
    false
}

/// CPU and memory held by the scheduled, not yet terminal pods other than `key`.
fn used(state: &State, key: &Key) -> (u64, u64) {
    state
        .pods
        .iter()
        .filter(|(k, e)| {
            *k != key
                && e.pod.spec.as_ref().is_some_and(|s| s.node_name.is_some())
                && !is_terminal(&e.pod)
        })
        .map(|(_, e)| pod_requests(&e.pod))
        .fold((0, 0), |(c, m), (c2, m2)| (c + c2, m + m2))
}

/// Probing and waiting while the agent runs, until it ends, is killed,
/// deleted, exceeds the pod's deadline, fails liveness, or the fixture stops.
async fn supervise(
    fx: &Arc<Shared>,
    key: &Key,
    inbox: &mut mpsc::UnboundedReceiver<Control>,
    mut agent: Agent,
    container: &Container,
    readiness: Option<ProbeTarget>,
    pod: &Pod,
) -> (End, Option<Agent>) {
    let deadline = pod
        .spec
        .as_ref()
        .and_then(|s| s.active_deadline_seconds)
        .map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0)));
    let deadline = async move {
        match deadline {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let liveness = container.liveness_probe.clone();
    let liveness_target = node::probe_target(container, liveness.as_ref());
    let live_period = Duration::from_secs(
        liveness
            .as_ref()
            .and_then(|p| p.period_seconds)
            .map_or(10, |s| u64::try_from(s.max(1)).unwrap_or(10)),
    );
    let live_delay = Duration::from_secs(
        liveness
            .as_ref()
            .and_then(|p| p.initial_delay_seconds)
            .map_or(0, |s| u64::try_from(s.max(0)).unwrap_or(0)),
    );
    let live_threshold = liveness
        .as_ref()
        .and_then(|p| p.failure_threshold)
        .map_or(3, |t| t.max(1));
    let timeout_of = |p: Option<&k8s_openapi::api::core::v1::Probe>| {
        Duration::from_secs(
            p.and_then(|p| p.timeout_seconds)
                .map_or(1, |s| u64::try_from(s.max(1)).unwrap_or(1)),
        )
    };
    let ready_timeout = timeout_of(container.readiness_probe.as_ref());
    let live_timeout = timeout_of(liveness.as_ref());
    let mut ready_tick = tokio::time::interval(READINESS_EVERY);
    let mut live_tick = tokio::time::interval_at(
        tokio::time::Instant::now() + live_delay + live_period,
        live_period,
    );
    let mut ready = readiness.is_none();
    let mut live_failures = 0;
    loop {
        tokio::select! {
            outcome = &mut agent.task => {
                let outcome = outcome.unwrap_or_else(|e| Err(format!("the agent task failed: {e}")));
                fx.state().ips.remove(&agent.ip);
                fx.state().update_pod(key, |pod| match outcome {
                    Ok(()) => {
                        let state = terminated(0, "Completed", None, pod);
                        set_container(pod, state, false, false);
                        status_mut(pod).phase = Some("Succeeded".into());
                    }
                    Err(e) => fail(pod, 1, "Error", Some(e)),
                });
                return (End::Keep, None);
            }
            msg = inbox.recv() => {
                let Some(msg) = msg else { return (End::Keep, Some(agent)) };
                match msg {
                    Control::Delete { done } => return (End::Delete(done), Some(agent)),
                    Control::Kill { how, done } => {
                        let _ = agent.stop(fx).await;
                        fx.state().update_pod(key, |pod| {
                            fail(pod, KILLED_EXIT_CODE, how.reason(), None);
                        });
                        let _ = done.send(());
                        return (End::Keep, None);
                    }
                }
            }
            () = fx.shutdown.cancelled() => return (End::Keep, Some(agent)),
            () = &mut deadline => {
                let _ = agent.stop(fx).await;
                fx.state().update_pod(key, |pod| {
                    fail(pod, KILLED_EXIT_CODE, "Error", None);
                    let status = status_mut(pod);
                    status.reason = Some("DeadlineExceeded".into());
                    status.message = Some("Pod was active on the node longer than the specified deadline".into());
                });
                return (End::Keep, None);
            }
            _ = ready_tick.tick(), if !ready => {
                if let Some(target) = &readiness
                    && node::probe(&fx.http, agent.ip, target, ready_timeout).await.is_ok()
                {
                    ready = true;
                    fx.state().update_pod(key, |pod| {
                        let state = pod
                            .status
                            .as_ref()
                            .and_then(|s| s.container_statuses.as_ref())
                            .and_then(|c| c.first())
                            .and_then(|c| c.state.clone())
                            .unwrap_or_default();
                        set_container(pod, state, true, true);
                    });
                }
            }
            _ = live_tick.tick(), if liveness_target.is_some() => {
                let Some(target) = &liveness_target else { continue };
                match node::probe(&fx.http, agent.ip, target, live_timeout).await {
                    Ok(()) => live_failures = 0,
                    Err(e) => {
                        live_failures += 1;
                        if live_failures >= live_threshold {
                            let _ = agent.stop(fx).await;
                            fx.state().update_pod(key, |pod| {
                                fail(pod, KILLED_EXIT_CODE, "Error", Some(format!("Liveness probe failed: {e}")));
                            });
                            return (End::Keep, None);
                        }
                    }
                }
            }
        }
    }
}

/// The effective requests (after defaulting) of a pod, as quantities; for tests.
#[cfg(test)]
fn requests_of(
    pod: &Pod,
) -> BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity> {
    pod.spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.resources.as_ref())
        .and_then(|r| r.requests.clone())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{PodSpec, ResourceRequirements};
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    fn pod_with(limits: &[(&str, &str)], requests: Option<&[(&str, &str)]>) -> Pod {
        let map = |pairs: &[(&str, &str)]| {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
                .collect::<BTreeMap<_, _>>()
        };
        Pod {
            spec: Some(PodSpec {
                containers: vec![Container {
                    name: "agent".into(),
                    image: Some("img".into()),
                    resources: Some(ResourceRequirements {
                        limits: Some(map(limits)),
                        requests: requests.map(map),
                        ..Default::default()
                    }),
                    ..Default::default()
                }],
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn requests_default_to_limits_and_may_not_exceed_them() {
        let mut pod = pod_with(&[("cpu", "500m"), ("memory", "512Mi")], None);
        let mut errors = Vec::new();
        if let Some(spec) = pod.spec.as_mut() {
            check_resources(0, &mut spec.containers[0], &mut errors);
        }
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(requests_of(&pod)["cpu"].0, "500m");
        assert_eq!(pod_requests(&pod), (500, 512));
        assert_eq!(qos_class(&pod), "Guaranteed");

        let mut pod = pod_with(&[("cpu", "1")], Some(&[("cpu", "2")]));
        let mut errors = Vec::new();
        if let Some(spec) = pod.spec.as_mut() {
            check_resources(0, &mut spec.containers[0], &mut errors);
        }
        assert_eq!(errors.len(), 1, "{errors:?}");

        let mut pod = pod_with(&[("memory", "lots")], None);
        let mut errors = Vec::new();
        if let Some(spec) = pod.spec.as_mut() {
            check_resources(0, &mut spec.containers[0], &mut errors);
        }
        assert!(errors[0].contains("lots"), "{errors:?}");
    }

    #[test]
    fn uids_are_version_4() {
        let u = new_uid();
        assert_eq!(u.len(), 36);
        assert_eq!(&u[14..15], "4");
        assert_ne!(u, new_uid());
    }
}
