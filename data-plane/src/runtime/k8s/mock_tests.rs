//! The `k8s` backend against a mock API server (`tower_test::mock::pair`,
//! as kube-rs's `controller-rs` tests do): every request the backend sends
//! is recorded and checked (verb, path, query, body), and every answer is
//! scripted per test. The pods' agents are small stubs on `127.x.y.z:9000`
//! that record what the backend tells them. Hermetic: no cluster, no
//! sandbox. The end-to-end run against real agents is `tests/k8s.rs`.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::http::HeaderMap;
use axum::routing::{get, post};
use clap::Parser;
use serde_json::{Value, json};
use shared::ErrorCode;
use shared::agent::{ADMIN_TOKEN_HEADER, CreateSessionRequest, Limits};
use tokio_util::sync::CancellationToken;

use super::objects::{self, LABEL_SESSION, LABEL_STATE, LABEL_TENANT};
use super::{K8sBackend, K8sSettings};
use crate::runtime::{RuntimeRegistry, SandboxHandle};

/// One request as the mock API server saw it.
#[derive(Debug, Clone)]
struct Req {
    method: String,
    path: String,
    query: String,
    content_type: String,
    body: Value,
}

/// What happens to a runtime pod once created.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fate {
    /// Running at the stub agent's IP.
    Runs,
    ImagePullBackOff,
    Unschedulable,
    /// Terminated with OOMKilled.
    Dies,
    /// Stays Pending forever.
    Hangs,
}

/// The scripted cluster behind the mock.
struct Cluster {
    namespace_exists: bool,
    class_exists: bool,
    deny: BTreeSet<(String, String)>,
    /// Answers for the next pod creates (status code, reason); then 201.
    create_errors: VecDeque<(u16, &'static str)>,
    fate: Fate,
    /// Pods by name (what a list returns).
    pods: BTreeMap<String, Value>,
    /// The IP every running pod reports (the stub agent's).
    ip: String,
    requests: Vec<Req>,
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": format!("scripted {reason}"), "reason": reason, "code": code})
}

impl Cluster {
    fn new(ip: &str) -> Self {
        Cluster {
            namespace_exists: true,
            class_exists: true,
            deny: BTreeSet::new(),
            create_errors: VecDeque::new(),
            fate: Fate::Runs,
            pods: BTreeMap::new(),
            ip: ip.to_owned(),
            requests: Vec::new(),
        }
    }

    fn pod_status(&self) -> Value {
        match self.fate {
            Fate::Runs => json!({"phase": "Running", "podIP": self.ip,
                "containerStatuses": [{"name": "agent", "ready": true, "restartCount": 0,
                    "image": "x", "imageID": "", "state": {"running": {}}}]}),
            Fate::ImagePullBackOff => json!({"phase": "Pending",
                "containerStatuses": [{"name": "agent", "ready": false, "restartCount": 0,
                    "image": "x", "imageID": "",
                    "state": {"waiting": {"reason": "ImagePullBackOff", "message": "back-off"}}}]}),
            Fate::Unschedulable => {
                json!({"phase": "Pending", "conditions": [{"type": "PodScheduled",
                "status": "False", "reason": "Unschedulable", "message": "0/3 nodes are available"}]})
            }
            Fate::Dies => json!({"phase": "Failed", "podIP": self.ip,
                "containerStatuses": [{"name": "agent", "ready": false, "restartCount": 0,
                    "image": "x", "imageID": "",
                    "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}),
            Fate::Hangs => json!({"phase": "Pending"}),
        }
    }

    /// The API server's answer; `None`: never answer (a watch).
    fn answer(&mut self, r: &Req) -> Option<(u16, Value)> {
        let pods = "/api/v1/namespaces/agent-sandbox-runtime/pods";
        let m = r.method.as_str();
        if m == "GET" && r.path == "/api/v1/namespaces/agent-sandbox-runtime" {
            return Some(if self.namespace_exists {
                (
                    200,
                    json!({"apiVersion": "v1", "kind": "Namespace",
                             "metadata": {"name": "agent-sandbox-runtime"}}),
                )
            } else {
                (404, status(404, "NotFound"))
            });
        }
        if m == "GET" && r.path == "/apis/node.k8s.io/v1/runtimeclasses/gvisor" {
            return Some(if self.class_exists {
                (
                    200,
                    json!({"apiVersion": "node.k8s.io/v1", "kind": "RuntimeClass",
                             "metadata": {"name": "gvisor"}, "handler": "runsc"}),
                )
            } else {
                (404, status(404, "NotFound"))
            });
        }
        if m == "POST" && r.path == "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews" {
            let attrs = &r.body["spec"]["resourceAttributes"];
            let key = (
                attrs["verb"].as_str().unwrap_or("").to_owned(),
                attrs["resource"].as_str().unwrap_or("").to_owned(),
            );
            let mut review = r.body.clone();
            review["status"] = json!({"allowed": !self.deny.contains(&key)});
            return Some((201, review));
        }
        if m == "PATCH"
            && r.path.starts_with(
                "/apis/networking.k8s.io/v1/namespaces/agent-sandbox-runtime/networkpolicies/",
            )
        {
            return Some((200, r.body.clone()));
        }
        if m == "GET" && r.path == pods {
            if r.query.contains("watch=true") {
                return None;
            }
            let items: Vec<Value> = self.pods.values().cloned().collect();
            return Some((
                200,
                json!({"apiVersion": "v1", "kind": "PodList",
                "metadata": {"resourceVersion": "1"}, "items": items}),
            ));
        }
        if m == "POST" && r.path == pods {
            if let Some((code, reason)) = self.create_errors.pop_front() {
                return Some((code, status(code, reason)));
            }
            let mut pod = r.body.clone();
            pod["metadata"]["resourceVersion"] = json!("2");
            pod["status"] = json!({"phase": "Pending"});
            let name = pod["metadata"]["name"].as_str().unwrap().to_owned();
            self.pods.insert(name, pod.clone());
            return Some((201, pod));
        }
        if let Some(name) = r.path.strip_prefix(&format!("{pods}/")) {
            let Some(pod) = self.pods.get(name).cloned() else {
                return Some((404, status(404, "NotFound")));
            };
            return Some(match m {
                "GET" => {
                    let mut pod = pod;
                    pod["status"] = self.pod_status();
                    self.pods.insert(name.to_owned(), pod.clone());
                    (200, pod)
                }
                "DELETE" => {
                    self.pods.remove(name);
                    (200, pod)
                }
                "PATCH" => {
                    let mut pod = pod;
                    for (k, v) in r.body["metadata"]["labels"].as_object().unwrap() {
                        pod["metadata"]["labels"][k] = v.clone();
                    }
                    self.pods.insert(name.to_owned(), pod.clone());
                    (200, pod)
                }
                _ => (405, status(405, "MethodNotAllowed")),
            });
        }
        Some((404, status(404, "NotFound")))
    }
}

type Shared = Arc<Mutex<Cluster>>;

/// A kube client whose every request goes to `cluster`.
fn client(cluster: Shared) -> kube::Client {
    let (service, mut handle) = tower_test::mock::pair::<
        http::Request<kube::client::Body>,
        http::Response<kube::client::Body>,
    >();
    tokio::spawn(async move {
        let mut hung = Vec::new();
        while let Some((request, send)) = handle.next_request().await {
            let (parts, body) = request.into_parts();
            let bytes = body.collect_bytes().await.unwrap();
            let req = Req {
                method: parts.method.to_string(),
                path: parts.uri.path().to_owned(),
                query: parts.uri.query().unwrap_or("").to_owned(),
                content_type: parts
                    .headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("")
                    .to_owned(),
                body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
            };
            let answer = {
                let mut c = cluster.lock().unwrap();
                c.requests.push(req.clone());
                c.answer(&req)
            };
            match answer {
                Some((code, body)) => send.send_response(
                    http::Response::builder()
                        .status(code)
                        .header("content-type", "application/json")
                        .body(kube::client::Body::from(serde_json::to_vec(&body).unwrap()))
                        .unwrap(),
                ),
                None => hung.push(send),
            }
        }
    });
    kube::Client::new(service, "default")
}

/// What the stub agents were told.
#[derive(Default)]
struct AgentLog {
    /// (admin header, create body) of each session create.
    creates: Vec<(String, CreateSessionRequest)>,
}

/// A stub agent on a fresh `127.x.y.z:9000` (never 127.0.0.1, where a
/// `make run-local` agent may listen).
async fn stub_agent(log: Arc<Mutex<AgentLog>>) -> String {
    for _ in 0..20 {
        let ip = format!(
            "127.{}.{}.{}",
            rand::random_range(1..=254u8),
            rand::random_range(0..=254u8),
            rand::random_range(1..=254u8)
        );
        let Ok(listener) = tokio::net::TcpListener::bind((ip.as_str(), objects::AGENT_PORT)).await
        else {
            continue;
        };
        let app = axum::Router::new()
            .route(
                "/v1/health",
                get(|| async {
                    Json(json!({"status": "ok", "isolation": "pod", "sessions": 0,
                                "warmPool": {"python": 1}, "version": "stub"}))
                }),
            )
            .route(
                "/v1/sessions",
                post(
                    move |headers: HeaderMap, Json(req): Json<CreateSessionRequest>| async move {
                        let admin = headers
                            .get(ADMIN_TOKEN_HEADER)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or("")
                            .to_owned();
                        log.lock().unwrap().creates.push((admin, req.clone()));
                        Json(json!({"sessionId": req.session_id, "runtime": "python",
                            "isolation": "pod", "limits": crate::runtime::DEFAULT_LIMITS,
                            "createdAtMs": 1, "expiresAtMs": u64::MAX / 2, "lastUsedAtMs": 1,
                            "warm": false, "steps": 0, "restarts": 0}))
                    },
                ),
            );
        tokio::spawn(async move { axum::serve(listener, app).await });
        return ip;
    }
    panic!("no free 127.x.y.z:9000 found");
}

struct Setup {
    cluster: Shared,
    agents: Arc<Mutex<AgentLog>>,
    ip: String,
}

async fn setup() -> Setup {
    let agents = Arc::new(Mutex::new(AgentLog::default()));
    let ip = stub_agent(agents.clone()).await;
    Setup {
        cluster: Arc::new(Mutex::new(Cluster::new(&ip))),
        agents,
        ip,
    }
}

fn settings(warm: &[(&str, usize)], ready: Duration) -> K8sSettings {
    K8sSettings {
        namespace: "agent-sandbox-runtime".into(),
        runtime_class: "gvisor".into(),
        owner: "dp-test".into(),
        data_plane_namespace: "sandbox-system".into(),
        environment: "production".into(),
        ready_timeout: ready,
        warm_pool: warm.iter().map(|(r, n)| ((*r).to_owned(), *n)).collect(),
        secrets_name: None,
    }
}

fn registry() -> RuntimeRegistry {
    let config = crate::Config::parse_from(["data-plane"]);
    RuntimeRegistry::load(&config).unwrap()
}

async fn start(s: &Setup, warm: &[(&str, usize)], ready: Duration) -> Result<K8sBackend, String> {
    K8sBackend::start(
        client(s.cluster.clone()),
        settings(warm, ready),
        registry(),
        reqwest::Client::new(),
        CancellationToken::new(),
    )
    .await
    .map(|(b, _lost)| b)
}

fn requests(s: &Setup) -> Vec<Req> {
    s.cluster.lock().unwrap().requests.clone()
}

fn calls(s: &Setup, method: &str, path_prefix: &str) -> Vec<Req> {
    requests(s)
        .into_iter()
        .filter(|r| r.method == method && r.path.starts_with(path_prefix))
        .collect()
}

const PODS: &str = "/api/v1/namespaces/agent-sandbox-runtime/pods";

fn request(session: &str) -> CreateSessionRequest {
    CreateSessionRequest {
        session_id: session.into(),
        runtime: "python".into(),
        token: Some("the-router-token-is-not-used-by-k8s-0123456789".into()),
        limits: None,
        env: None,
        ttl_seconds: None,
        idle_timeout_seconds: None,
        packages_dir: None,
        secrets: None,
    }
}

#[tokio::test]
async fn start_checks_the_cluster_and_applies_the_network_policy() {
    let s = setup().await;
    start(&s, &[], Duration::from_secs(5)).await.unwrap();
    let reqs = requests(&s);
    assert_eq!(reqs[0].method, "GET");
    assert_eq!(reqs[0].path, "/api/v1/namespaces/agent-sandbox-runtime");
    assert_eq!(reqs[1].path, "/apis/node.k8s.io/v1/runtimeclasses/gvisor");
    // One review per verb the backend uses, scoped to the runtime namespace.
    let reviews: BTreeSet<(String, String, String)> = calls(
        &s,
        "POST",
        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
    )
    .iter()
    .map(|r| {
        let a = &r.body["spec"]["resourceAttributes"];
        assert_eq!(a["namespace"], "agent-sandbox-runtime");
        (
            a["group"].as_str().unwrap().to_owned(),
            a["resource"].as_str().unwrap().to_owned(),
            a["verb"].as_str().unwrap().to_owned(),
        )
    })
    .collect();
    for verb in ["create", "get", "list", "watch", "delete", "patch"] {
        assert!(
            reviews.contains(&(String::new(), "pods".into(), verb.into())),
            "{verb}"
        );
    }
    assert!(reviews.contains(&(
        "networking.k8s.io".into(),
        "networkpolicies".into(),
        "patch".into()
    )));
    // The NetworkPolicy: server-side apply, default deny, data plane in on 9000 only.
    let np = calls(
        &s,
        "PATCH",
        "/apis/networking.k8s.io/v1/namespaces/agent-sandbox-runtime/networkpolicies/",
    );
    assert_eq!(np.len(), 1);
    let np = &np[0];
    assert!(
        np.path.ends_with("/agent-sandbox-runtime-dp-test"),
        "{}",
        np.path
    );
    assert_eq!(np.content_type, "application/apply-patch+yaml");
    assert!(
        np.query.contains("fieldManager=agent-sandbox-data-plane")
            && np.query.contains("force=true")
    );
    let spec = &np.body["spec"];
    assert_eq!(spec["policyTypes"], json!(["Ingress", "Egress"]));
    assert_eq!(spec["egress"], json!([]), "no egress at all");
    assert_eq!(
        spec["podSelector"]["matchLabels"],
        json!({"agentsandbox.dev/role": "runtime", "agentsandbox.dev/owner": "dp-test"})
    );
    let from = &spec["ingress"][0]["from"][0];
    assert_eq!(
        from["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "sandbox-system"
    );
    assert_eq!(
        from["podSelector"]["matchLabels"]["agentsandbox.dev/data-plane"],
        "dp-test"
    );
    assert_eq!(
        spec["ingress"][0]["ports"],
        json!([{"port": 9000, "protocol": "TCP"}])
    );
    // Its own pods only.
    let lists = calls(&s, "GET", PODS);
    assert!(
        lists[0].query.contains(
            "labelSelector=agentsandbox.dev%2Frole%3Druntime%2Cagentsandbox.dev%2Fowner%3Ddp-test"
        ),
        "{}",
        lists[0].query
    );
}

#[tokio::test]
async fn start_refuses_a_missing_namespace_runtime_class_or_permission() {
    let s = setup().await;
    s.cluster.lock().unwrap().namespace_exists = false;
    let e = start(&s, &[], Duration::from_secs(5)).await.unwrap_err();
    assert!(
        e.contains("RUNTIME_NAMESPACE") && e.contains("does not exist"),
        "{e}"
    );

    let s = setup().await;
    s.cluster.lock().unwrap().class_exists = false;
    let e = start(&s, &[], Duration::from_secs(5)).await.unwrap_err();
    assert!(e.contains("RUNTIME_CLASS") && e.contains("gvisor"), "{e}");

    let s = setup().await;
    s.cluster
        .lock()
        .unwrap()
        .deny
        .insert(("delete".into(), "pods".into()));
    let e = start(&s, &[], Duration::from_secs(5)).await.unwrap_err();
    assert!(e.contains("RBAC") && e.contains("delete pods"), "{e}");
    assert!(calls(&s, "POST", PODS).is_empty(), "nothing created");

    let s = setup().await;
    s.cluster
        .lock()
        .unwrap()
        .deny
        .insert(("patch".into(), "networkpolicies".into()));
    let e = start(&s, &[], Duration::from_secs(5)).await.unwrap_err();
    assert!(e.contains("patch networkpolicies"), "{e}");
}

#[tokio::test]
async fn a_cold_session_gets_a_hardened_pod_and_only_a_token_digest() {
    let s = setup().await;
    let b = start(&s, &[], Duration::from_secs(5)).await.unwrap();
    let (handle, info) = b.provision(&request("ses_cold1"), "acme").await.unwrap();
    assert!(!info.warm);
    assert_eq!(handle.endpoint, format!("http://{}:9000", s.ip));
    let token = handle.token.clone().unwrap();
    let created = calls(&s, "POST", PODS);
    assert_eq!(created.len(), 1);
    let pod = &created[0].body;
    assert_eq!(pod["spec"]["runtimeClassName"], "gvisor");
    assert_eq!(pod["spec"]["automountServiceAccountToken"], false);
    assert_eq!(pod["spec"]["enableServiceLinks"], false);
    assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
    assert_eq!(pod["spec"]["securityContext"]["runAsUser"], 65534);
    assert_eq!(
        pod["spec"]["securityContext"]["seccompProfile"]["type"],
        "RuntimeDefault"
    );
    let c = &pod["spec"]["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(
        c["resources"]["limits"],
        json!({"cpu": "1000m", "memory": "512Mi", "ephemeral-storage": "256Mi"})
    );
    assert_eq!(c["resources"]["limits"], c["resources"]["requests"]);
    let volumes = &pod["spec"]["volumes"];
    assert_eq!(
        volumes[0]["emptyDir"],
        json!({"medium": "Memory", "sizeLimit": "256Mi"})
    );
    let labels = &pod["metadata"]["labels"];
    assert_eq!(labels[LABEL_SESSION], "ses_cold1");
    assert_eq!(labels[LABEL_TENANT], "acme");
    assert_eq!(labels[LABEL_STATE], "bound");
    assert_eq!(labels["agentsandbox.dev/runtime"], "python");
    assert!(pod["metadata"].get("annotations").is_none());
    // The pod holds the digest; the token itself appears nowhere in it.
    let env: BTreeMap<String, String> = c["env"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["value"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        env["SESSION_AGENT_ADMIN_TOKEN_SHA256"],
        super::digest_hex(&token)
    );
    assert_eq!(env["SESSION_ISOLATION"], "pod");
    assert_eq!(env["SESSION_AGENT_MAX_SESSIONS"], "1");
    assert!(
        !env.contains_key("SESSION_AGENT_WARM_POOL"),
        "cold pods pre-start nothing"
    );
    assert!(!pod.to_string().contains(&token));
    // The agent was asked, with that token, to create the session.
    let (admin, body) = s.agents.lock().unwrap().creates.last().cloned().unwrap();
    assert_eq!(admin, token);
    assert_eq!(body.token.as_deref(), Some(token.as_str()));
    assert_eq!(body.session_id, "ses_cold1");
    // Destroy deletes that pod.
    b.destroy(&handle).await.unwrap();
    let name = pod["metadata"]["name"].as_str().unwrap();
    let deleted = calls(&s, "DELETE", PODS);
    assert_eq!(deleted.len(), 1);
    assert_eq!(deleted[0].path, format!("{PODS}/{name}"));
}

#[tokio::test]
async fn tenant_input_never_reaches_the_pod_object() {
    let s = setup().await;
    let b = start(&s, &[], Duration::from_secs(5)).await.unwrap();
    // Keys an attacker would like to see as annotations, labels or spec
    // fields; the values carry a marker so any leak is found.
    let crafted = [
        "dev.gvisor.spec.rootfs.overlay",
        "dev.gvisor.internal.nvproxy",
        "io.kubernetes.cri.untrusted-workload",
        "agentsandbox.dev/owner",
        "kube-system.serviceAccountName",
    ];
    let mut req = request("ses_crafted");
    req.env = Some(
        crafted
            .iter()
            .map(|k| {
                (
                    (*k).to_owned(),
                    format!("XLEAKX {k}=true; runtimeClassName: runc"),
                )
            })
            .collect(),
    );
    req.limits = Some(Limits {
        memory_mb: Some(256),
        ..Default::default()
    });
    // A secret value: to the agent's create call only, never the pod.
    req.secrets = Some(
        [(
            "API_TOKEN".to_owned(),
            shared::secrets::SecretValue::new("XSECRETX-value".into()),
        )]
        .into(),
    );
    b.provision(&req, "acme").await.unwrap();
    let pod = calls(&s, "POST", PODS)[0].body.clone();
    let text = pod.to_string();
    assert!(
        !text.contains("XSECRETX") && !text.contains("API_TOKEN"),
        "{text}"
    );
    for call in requests(&s) {
        assert!(!call.body.to_string().contains("XSECRETX"), "{}", call.path);
    }
    for k in crafted
        .iter()
        .filter(|k| !k.starts_with("agentsandbox.dev/"))
    {
        assert!(!text.contains(k), "{k} reached the pod: {text}");
    }
    assert!(!text.contains("XLEAKX") && !text.contains("runc"), "{text}");
    assert_eq!(
        pod["metadata"]["labels"]["agentsandbox.dev/owner"],
        "dp-test"
    );
    assert_eq!(pod["spec"]["hostNetwork"], false);
    assert!(pod["metadata"].get("annotations").is_none());
    assert_eq!(pod["spec"]["runtimeClassName"], "gvisor");
    assert!(pod["spec"].get("serviceAccountName").is_none());
    assert!(pod["spec"].get("nodeName").is_none());
    // Only the limits, as numbers, shape the pod.
    assert_eq!(
        pod["spec"]["containers"][0]["resources"]["limits"]["memory"],
        "256Mi"
    );
    // The env went to the agent (for the interpreter), not to the pod.
    let log = s.agents.lock().unwrap();
    assert_eq!(
        log.creates.last().unwrap().1.env.as_ref().unwrap().len(),
        crafted.len()
    );
    assert_eq!(
        log.creates.last().unwrap().1.secrets.as_ref().unwrap()["API_TOKEN"].expose(),
        "XSECRETX-value"
    );
}

async fn failing(fate: Fate, ready: Duration) -> (Setup, shared::client::ClientError) {
    let s = setup().await;
    s.cluster.lock().unwrap().fate = fate;
    let b = start(&s, &[], ready).await.unwrap();
    let e = b
        .provision(&request("ses_fails"), "acme")
        .await
        .unwrap_err();
    (s, e)
}

fn code(e: &shared::client::ClientError) -> ErrorCode {
    match e {
        shared::client::ClientError::Api { body, .. } => body.code,
        other => panic!("not a coded error: {other}"),
    }
}

#[tokio::test]
async fn failed_pods_give_a_clear_code_and_are_deleted() {
    for (fate, want) in [
        (Fate::ImagePullBackOff, ErrorCode::SandboxImageUnavailable),
        (Fate::Unschedulable, ErrorCode::SandboxUnschedulable),
        (Fate::Dies, ErrorCode::SandboxStartFailed),
        (Fate::Hangs, ErrorCode::SandboxStartTimeout),
    ] {
        let (s, e) = failing(fate, Duration::from_millis(600)).await;
        assert_eq!(code(&e), want, "{fate:?}: {e}");
        let created = calls(&s, "POST", PODS);
        let name = created[0].body["metadata"]["name"]
            .as_str()
            .unwrap()
            .to_owned();
        let deleted = calls(&s, "DELETE", PODS);
        assert_eq!(deleted.len(), 1, "{fate:?}: the pod is deleted");
        assert_eq!(deleted[0].path, format!("{PODS}/{name}"));
        assert!(s.agents.lock().unwrap().creates.is_empty(), "{fate:?}");
    }
}

#[tokio::test]
async fn api_errors_are_retried_then_answered_clearly() {
    // Two 5xx and a 429, then the create lands.
    let s = setup().await;
    s.cluster.lock().unwrap().create_errors = VecDeque::from([
        (500, "InternalError"),
        (429, "TooManyRequests"),
        (503, "ServiceUnavailable"),
    ]);
    let b = start(&s, &[], Duration::from_secs(5)).await.unwrap();
    b.provision(&request("ses_retry"), "acme").await.unwrap();
    assert_eq!(calls(&s, "POST", PODS).len(), 4);

    // Always 503: five attempts, then 503 sandbox_unavailable naming the status.
    let s = setup().await;
    s.cluster.lock().unwrap().create_errors = VecDeque::from([(503, "ServiceUnavailable"); 5]);
    let b = start(&s, &[], Duration::from_secs(5)).await.unwrap();
    let e = b.provision(&request("ses_down"), "acme").await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::SandboxUnavailable, "{e}");
    assert!(e.to_string().contains("503"), "{e}");
    assert_eq!(calls(&s, "POST", PODS).len(), 5);

    // A name collision (409 AlreadyExists) gets a fresh name.
    let s = setup().await;
    s.cluster.lock().unwrap().create_errors = VecDeque::from([(409, "AlreadyExists")]);
    let b = start(&s, &[], Duration::from_secs(5)).await.unwrap();
    b.provision(&request("ses_collide"), "acme").await.unwrap();
    let names: BTreeSet<String> = calls(&s, "POST", PODS)
        .iter()
        .map(|r| r.body["metadata"]["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(!names.is_empty());

    // Admission refusing the pod (403) is not retried.
    let s = setup().await;
    s.cluster.lock().unwrap().create_errors = VecDeque::from([(403, "Forbidden")]);
    let b = start(&s, &[], Duration::from_secs(5)).await.unwrap();
    let e = b
        .provision(&request("ses_refused"), "acme")
        .await
        .unwrap_err();
    assert_eq!(code(&e), ErrorCode::SandboxStartFailed, "{e}");
    assert_eq!(calls(&s, "POST", PODS).len(), 1);
}

fn leftover(name: &str, state: &str, session: Option<&str>, ip: &str) -> Value {
    let mut labels = json!({"app.kubernetes.io/managed-by": "agent-sandbox-data-plane",
        "agentsandbox.dev/role": "runtime", "agentsandbox.dev/owner": "dp-test",
        "agentsandbox.dev/runtime": "python", "agentsandbox.dev/state": state});
    if let Some(s) = session {
        labels["agentsandbox.dev/session"] = json!(s);
        labels["agentsandbox.dev/tenant"] = json!("acme");
    }
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "agent-sandbox-runtime", "labels": labels},
        "spec": {"containers": [{"name": "agent", "image": "x"}]},
        "status": {"phase": "Running", "podIP": ip}})
}

#[tokio::test]
async fn after_a_crash_warm_pods_go_and_bound_pods_are_adopted_or_reaped() {
    let s = setup().await;
    {
        let mut c = s.cluster.lock().unwrap();
        let ip = s.ip.clone();
        c.pods.insert(
            "sbx-warmold001".into(),
            leftover("sbx-warmold001", "warm", None, &ip),
        );
        c.pods.insert(
            "sbx-keep000001".into(),
            leftover("sbx-keep000001", "bound", Some("ses_keep"), &ip),
        );
        c.pods.insert(
            "sbx-orphan0001".into(),
            leftover("sbx-orphan0001", "bound", Some("ses_orphan"), &ip),
        );
    }
    let b = start(&s, &[], Duration::from_secs(5)).await.unwrap();
    let deleted: Vec<String> = calls(&s, "DELETE", PODS)
        .iter()
        .map(|r| r.path.clone())
        .collect();
    assert_eq!(
        deleted,
        vec![format!("{PODS}/sbx-warmold001")],
        "warm pods of the last run go"
    );
    assert_eq!(b.adopt("ses_keep"), Some(format!("http://{}:9000", s.ip)));
    assert_eq!(b.adopt("ses_unknown"), None, "no pod: lost");
    let owned = b.list_owned();
    assert_eq!(owned.len(), 2);
    let orphan = owned.iter().find(|o| o.session_id == "ses_orphan").unwrap();
    assert_eq!(orphan.pod.as_deref(), Some("sbx-orphan0001"));
    b.destroy_orphan(orphan).await.unwrap();
    assert!(
        calls(&s, "DELETE", PODS)
            .iter()
            .any(|r| r.path.ends_with("/sbx-orphan0001"))
    );
    // A session is destroyed through the pod it was adopted on.
    b.destroy(&SandboxHandle {
        session_id: "ses_keep".into(),
        endpoint: String::new(),
        token: None,
    })
    .await
    .unwrap();
    assert!(
        calls(&s, "DELETE", PODS)
            .iter()
            .any(|r| r.path.ends_with("/sbx-keep000001"))
    );
}

#[tokio::test]
async fn the_warm_pool_is_claimed_without_a_pod_create_and_refilled() {
    let s = setup().await;
    let b = start(&s, &[("python", 1)], Duration::from_secs(5))
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while b.pool_sizes().get("python") != Some(&1) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the pool never filled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let warm = calls(&s, "POST", PODS);
    assert_eq!(warm.len(), 1);
    assert_eq!(warm[0].body["metadata"]["labels"][LABEL_STATE], "warm");
    // It pre-starts its one interpreter; cold pods do not.
    assert!(
        warm[0].body["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .contains(&json!({"name": "SESSION_AGENT_WARM_POOL", "value": "python=1"}))
    );
    assert!(
        warm[0].body["metadata"]["labels"]
            .get(LABEL_SESSION)
            .is_none()
    );
    let warm_name = warm[0].body["metadata"]["name"]
        .as_str()
        .unwrap()
        .to_owned();

    let (handle, info) = b.provision(&request("ses_warm1"), "acme").await.unwrap();
    assert!(info.warm);
    assert_eq!(handle.endpoint, format!("http://{}:9000", s.ip));
    // The claimed pod is labelled for its session and tenant (in the
    // background), and a new warm pod replaces it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let patched = calls(&s, "PATCH", &format!("{PODS}/{warm_name}"));
        let refilled = calls(&s, "POST", PODS).len() == 2;
        if let (Some(p), true) = (patched.first(), refilled) {
            assert_eq!(p.content_type, "application/merge-patch+json");
            assert_eq!(p.body["metadata"]["labels"][LABEL_SESSION], "ses_warm1");
            assert_eq!(p.body["metadata"]["labels"][LABEL_TENANT], "acme");
            assert_eq!(p.body["metadata"]["labels"][LABEL_STATE], "bound");
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no label patch or refill"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Limits other than the defaults never take a warm pod.
    let mut big = request("ses_big");
    big.limits = Some(Limits {
        memory_mb: Some(1024),
        ..Default::default()
    });
    let (_, info) = b.provision(&big, "acme").await.unwrap();
    assert!(!info.warm);
    // Never reused: destroying the warm session deletes its pod.
    b.destroy(&handle).await.unwrap();
    assert!(
        calls(&s, "DELETE", PODS)
            .iter()
            .any(|r| r.path.ends_with(&warm_name))
    );
}

#[tokio::test]
async fn packages_are_refused_clearly() {
    let s = setup().await;
    let b = start(&s, &[], Duration::from_secs(5)).await.unwrap();
    let mut req = request("ses_pkgs");
    req.packages_dir = Some("/x".into());
    let e = b.provision(&req, "acme").await.unwrap_err();
    assert_eq!(code(&e), ErrorCode::NotImplemented);
    assert!(calls(&s, "POST", PODS).is_empty());
}
