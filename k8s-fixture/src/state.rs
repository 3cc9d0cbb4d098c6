//! The fixture's store: pods, NetworkPolicies, the global resourceVersion,
//! every pod change (the watch history), open watches, the request log and
//! injected faults. One mutex guards it all: a change, its resourceVersion
//! and its delivery to every watch happen together, so no watch misses or
//! reorders an event.

use std::collections::{BTreeMap, HashSet};
use std::net::Ipv4Addr;

use bytes::Bytes;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::selector::{FieldSelector, LabelSelector};
use crate::{RecordedRequest, Termination};

/// `(namespace, name)`.
pub(crate) type Key = (String, String);

/// A message to a pod's lifecycle task.
#[derive(Debug)]
pub(crate) enum Control {
    /// Stop the agent, remove the pod, emit DELETED; then signal `done`.
    Delete { done: Option<oneshot::Sender<()>> },
    /// Stop the agent and leave the pod Failed (exit 137).
    Kill {
        how: Termination,
        done: oneshot::Sender<()>,
    },
}

/// A stored pod and the channel to its lifecycle task (`None` once the task ended).
pub(crate) struct PodEntry {
    pub pod: Pod,
    pub control: Option<mpsc::UnboundedSender<Control>>,
}

/// The kind of a watch event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

/// One pod change, kept for watches that start from an older resourceVersion.
pub(crate) struct Change {
    pub rv: u64,
    pub kind: EventType,
    /// The pod before the change (to tell a watch with a selector that a pod
    /// left or entered its selection).
    pub old: Option<Pod>,
    pub new: Pod,
}

/// What a watch selects.
#[derive(Debug, Clone)]
pub(crate) struct WatchFilter {
    pub namespace: String,
    pub labels: LabelSelector,
    pub fields: FieldSelector,
}

impl WatchFilter {
    pub fn matches(&self, pod: &Pod) -> bool {
        pod.metadata.namespace.as_deref() == Some(self.namespace.as_str())
            && self.labels.matches(pod.metadata.labels.as_ref())
            && self.fields.matches(pod)
    }

    /// The event this watch sees for a change, as the API server computes
    /// it: a pod entering the selection is ADDED, one leaving it DELETED.
    pub fn event_for(&self, change: &Change) -> Option<EventType> {
        let now = self.matches(&change.new);
        let before = change.old.as_ref().is_some_and(|o| self.matches(o));
        match change.kind {
            EventType::Added => now.then_some(EventType::Added),
            EventType::Deleted => (now || before).then_some(EventType::Deleted),
            EventType::Modified => match (before, now) {
                (true, true) => Some(EventType::Modified),
                (false, true) => Some(EventType::Added),
                (true, false) => Some(EventType::Deleted),
                (false, false) => None,
            },
        }
    }
}

/// An open watch: its selection and where its lines go.
pub(crate) struct Watcher {
    pub filter: WatchFilter,
    pub tx: mpsc::UnboundedSender<Bytes>,
}

/// One newline-terminated watch event line.
pub(crate) fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({ "type": kind, "object": object }).to_string();
    line.push('\n');
    Bytes::from(line)
}

/// A fault armed by `Fixture::fail_next`.
#[derive(Debug, Clone)]
pub(crate) struct Fault {
    pub method: String,
    pub path_prefix: String,
    pub code: u16,
    pub reason: String,
    pub remaining: u32,
}

/// Everything the fixture stores.
#[derive(Default)]
pub(crate) struct State {
    /// The last resourceVersion handed out (global, increasing).
    pub rv: u64,
    pub pods: BTreeMap<Key, PodEntry>,
    pub policies: BTreeMap<Key, Value>,
    pub history: Vec<Change>,
    pub watchers: Vec<Watcher>,
    pub requests: Vec<RecordedRequest>,
    pub faults: Vec<Fault>,
    /// Pod IPs in use (released when the pod's agent has stopped).
    pub ips: HashSet<Ipv4Addr>,
}

/// The current time as the API's `Time`.
pub(crate) fn now() -> Time {
    Time(k8s_openapi::jiff::Timestamp::now())
}

impl State {
    /// The next resourceVersion.
    pub fn bump(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    /// Records a pod change under a fresh resourceVersion (written into the
    /// object) and delivers it to every matching watch.
    pub fn emit(&mut self, kind: EventType, old: Option<Pod>, mut new: Pod) -> Pod {
        let rv = self.bump();
        new.metadata.resource_version = Some(rv.to_string());
        let change = Change { rv, kind, old, new };
        let object = serde_json::to_value(&change.new).unwrap_or(Value::Null);
        self.watchers.retain(|w| match w.filter.event_for(&change) {
            Some(seen) => w.tx.send(event_line(seen.as_str(), &object)).is_ok(),
            None => !w.tx.is_closed(),
        });
        let pod = change.new.clone();
        self.history.push(change);
        pod
    }

    /// Applies `mutate` to a stored pod and emits MODIFIED when it changed
    /// anything; returns the pod as stored afterwards.
    pub fn update_pod(&mut self, key: &Key, mutate: impl FnOnce(&mut Pod)) -> Option<Pod> {
        let entry = self.pods.get_mut(key)?;
        let old = entry.pod.clone();
        let mut new = old.clone();
        mutate(&mut new);
        if new == old {
            return Some(old);
        }
        let stored = self.emit(EventType::Modified, Some(old), new);
        if let Some(entry) = self.pods.get_mut(key) {
            entry.pod = stored.clone();
        }
        Some(stored)
    }

    /// Removes a pod and emits DELETED (with the last state of the object).
    pub fn remove_pod(&mut self, key: &Key) -> Option<Pod> {
        let entry = self.pods.remove(key)?;
        let old = entry.pod.clone();
        Some(self.emit(EventType::Deleted, Some(old), entry.pod))
    }

    /// Replays, for a new watch, the changes after `since` it selects.
    pub fn replay(&self, since: u64, filter: &WatchFilter) -> Vec<Bytes> {
        let start = self.history.partition_point(|c| c.rv <= since);
        self.history[start..]
            .iter()
            .filter_map(|c| {
                let seen = filter.event_for(c)?;
                let object = serde_json::to_value(&c.new).ok()?;
                Some(event_line(seen.as_str(), &object))
            })
            .collect()
    }

    /// The first armed fault matching a request, consumed by one.
    pub fn take_fault(&mut self, method: &str, path: &str) -> Option<Fault> {
        let fault = self.faults.iter_mut().find(|f| {
            f.remaining > 0
                && f.method.eq_ignore_ascii_case(method)
                && path.starts_with(&f.path_prefix)
        })?;
        fault.remaining -= 1;
        let taken = fault.clone();
        self.faults.retain(|f| f.remaining > 0);
        Some(taken)
    }
}
