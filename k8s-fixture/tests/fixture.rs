//! The fixture through the real kube client: API behaviour (hermetic:
//! pods whose image does not pull, or whose configuration the agent
//! refuses, never start an agent) and pods that run the real session agent
//! (need runsc and root, or bwrap with `SESSION_ISOLATION=bwrap`).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use k8s_fixture::{Fixture, FixtureOptions};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, HTTPGetAction, Namespace,
    Pod, PodSecurityContext, PodSpec, Probe, ResourceRequirements, SeccompProfile, SecurityContext,
    Volume, VolumeMount,
};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicySpec};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{
    Api, DeleteParams, ListParams, Patch, PatchParams, PostParams, WatchEvent, WatchParams,
};
use kube::runtime::watcher;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const NS: &str = "agent-sandbox-runtime";
/// The image the fixture pulls (its default set).
const IMAGE: &str = "sandbox-runtime:dev";
/// An image that never pulls: pods with it are scheduled but start no agent.
const MISSING_IMAGE: &str = "registry.invalid/nothing:1";
const ADMIN_TOKEN: &str = "fixture-test-admin-token-0123456789abcdefghijklmn";
const SESSION_TOKEN: &str = "fixture-test-session-token-0123456789abcdefghijkl";

/// The isolation the started agents use, checked as the other integration
/// tests check it: a missing runsc fails with how to install it.
fn isolation() -> String {
    let iso = k8s_fixture::isolation_from_env();
    if iso == "gvisor" {
        assert!(
            session_agent::isolation::resolve_binary(std::path::Path::new("runsc")).is_some(),
            "runsc is not installed: run `make deps` (apt-get install -y runsc)"
        );
    }
    eprintln!("isolation used: {iso}");
    iso
}

fn env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        ..Default::default()
    }
}

/// A runtime pod as the contract (architecture/k8s-fixture.md) describes
/// it. The readiness probe asks the agent's health route.
fn runtime_pod(name: &str, image: &str, labels: &[(&str, &str)]) -> Pod {
    let digest = hex::encode(Sha256::digest(ADMIN_TOKEN.as_bytes()));
    let resources: BTreeMap<String, Quantity> = [
        ("cpu", "1000m"),
        ("memory", "512Mi"),
        ("ephemeral-storage", "256Mi"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), Quantity(v.to_owned())))
    .collect();
    let mut all_labels: BTreeMap<String, String> = [
        ("app.kubernetes.io/managed-by", "agent-sandbox-data-plane"),
        ("agentsandbox.dev/role", "runtime"),
        ("agentsandbox.dev/owner", "data-plane"),
        ("agentsandbox.dev/runtime", "python"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    for (k, v) in labels {
        all_labels.insert((*k).to_owned(), (*v).to_owned());
    }
    let memory_dir = |size: &str| EmptyDirVolumeSource {
        medium: Some("Memory".into()),
        size_limit: Some(Quantity(size.into())),
    };
    Pod {
        metadata: ObjectMeta {
            name: Some(name.into()),
            namespace: Some(NS.into()),
            labels: Some(all_labels),
            ..Default::default()
        },
        spec: Some(PodSpec {
            runtime_class_name: Some("gvisor".into()),
            restart_policy: Some("Never".into()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            host_network: Some(false),
            host_pid: Some(false),
            host_ipc: Some(false),
            termination_grace_period_seconds: Some(1),
            active_deadline_seconds: Some(86_700),
            security_context: Some(PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(65534),
                run_as_group: Some(65534),
                fs_group: Some(65534),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".into(),
                    localhost_profile: None,
                }),
                ..Default::default()
            }),
            containers: vec![Container {
                name: "agent".into(),
                image: Some(image.into()),
                ports: Some(vec![ContainerPort {
                    name: Some("agent".into()),
                    container_port: 9000,
                    protocol: Some("TCP".into()),
                    ..Default::default()
                }]),
                env: Some(vec![
                    env("ENV", "production"),
                    env("SESSION_AGENT_ADDR", "0.0.0.0:9000"),
                    env("SESSION_ISOLATION", "pod"),
                    env("SESSION_AGENT_ADMIN_TOKEN_SHA256", &digest),
                    env("SESSION_AGENT_MAX_SESSIONS", "1"),
                    env("WORKSPACE_ROOT", "/workspace"),
                    env("SESSION_AGENT_STATE_DIR", "/tmp/agent"),
                    env("SESSION_AGENT_PYTHON", "/usr/bin/python3"),
                ]),
                resources: Some(ResourceRequirements {
                    limits: Some(resources.clone()),
                    requests: Some(resources),
                    ..Default::default()
                }),
                security_context: Some(SecurityContext {
                    allow_privilege_escalation: Some(false),
                    read_only_root_filesystem: Some(true),
                    run_as_non_root: Some(true),
                    privileged: Some(false),
                    capabilities: Some(Capabilities {
                        drop: Some(vec!["ALL".into()]),
                        add: None,
                    }),
                    ..Default::default()
                }),
                readiness_probe: Some(Probe {
                    http_get: Some(HTTPGetAction {
                        path: Some("/v1/health".into()),
                        port: IntOrString::String("agent".into()),
                        ..Default::default()
                    }),
                    period_seconds: Some(2),
                    ..Default::default()
                }),
                volume_mounts: Some(vec![
                    VolumeMount {
                        name: "workspace".into(),
                        mount_path: "/workspace".into(),
                        ..Default::default()
                    },
                    VolumeMount {
                        name: "tmp".into(),
                        mount_path: "/tmp".into(),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }],
            volumes: Some(vec![
                Volume {
                    name: "workspace".into(),
                    empty_dir: Some(memory_dir("256Mi")),
                    ..Default::default()
                },
                Volume {
                    name: "tmp".into(),
                    empty_dir: Some(memory_dir("64Mi")),
                    ..Default::default()
                },
            ]),
            ..Default::default()
        }),
        status: None,
    }
}

fn pods(fx: &Fixture) -> Api<Pod> {
    Api::namespaced(fx.client(), NS)
}

/// The API error of a failed call: (code, reason, message).
fn api_error<T: std::fmt::Debug>(result: kube::Result<T>) -> (u16, String, String) {
    match result {
        Err(kube::Error::Api(s)) => (s.code, s.reason.clone(), s.message.clone()),
        other => panic!("expected an API error, got {other:?}"),
    }
}

/// Polls the pod until `check` holds (or fails after `within`).
async fn wait_for(
    api: &Api<Pod>,
    name: &str,
    within: Duration,
    check: impl Fn(&Pod) -> bool,
) -> Pod {
    let deadline = Instant::now() + within;
    loop {
        let pod = api.get(name).await.expect("the pod exists");
        if check(&pod) {
            return pod;
        }
        assert!(
            Instant::now() < deadline,
            "pod {name} did not reach the expected state: {:#?}",
            pod.status
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn condition<'a>(pod: &'a Pod, kind: &str) -> Option<&'a k8s_openapi::api::core::v1::PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
}

fn container_status(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::ContainerStatus> {
    pod.status.as_ref()?.container_statuses.as_ref()?.first()
}

fn waiting_reason(pod: &Pod) -> Option<&str> {
    container_status(pod)?
        .state
        .as_ref()?
        .waiting
        .as_ref()?
        .reason
        .as_deref()
}

fn terminated(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::ContainerStateTerminated> {
    container_status(pod)?.state.as_ref()?.terminated.as_ref()
}

fn is_ready(pod: &Pod) -> bool {
    condition(pod, "Ready").is_some_and(|c| c.status == "True")
}

#[tokio::test]
async fn start_up_checks_namespace_runtime_class_and_access_reviews() {
    let fx = Fixture::start(FixtureOptions::default().deny("delete", "pods")).await;
    let client = fx.client();
    let ns: Namespace = Api::all(client.clone()).get(NS).await.expect("namespace");
    assert_eq!(ns.metadata.name.as_deref(), Some(NS));
    let (code, reason, message) =
        api_error(Api::<Namespace>::all(client.clone()).get("nope").await);
    assert_eq!((code, reason.as_str()), (404, "NotFound"), "{message}");
    assert!(
        message.contains("namespaces \"nope\" not found"),
        "{message}"
    );

    let rc: RuntimeClass = Api::all(client.clone())
        .get("gvisor")
        .await
        .expect("runtime class");
    assert_eq!(rc.handler, "runsc");
    let (code, reason, _) = api_error(Api::<RuntimeClass>::all(client.clone()).get("kata").await);
    assert_eq!((code, reason.as_str()), (404, "NotFound"));

    let reviews: Api<SelfSubjectAccessReview> = Api::all(client.clone());
    let review = |verb: &str, resource: &str| SelfSubjectAccessReview {
        spec: SelfSubjectAccessReviewSpec {
            resource_attributes: Some(ResourceAttributes {
                namespace: Some(NS.into()),
                verb: Some(verb.into()),
                resource: Some(resource.into()),
                ..Default::default()
            }),
            ..Default::default()
        },
        ..Default::default()
    };
    let pp = PostParams::default();
    let allowed = reviews
        .create(&pp, &review("create", "pods"))
        .await
        .expect("review");
    assert!(allowed.status.expect("status").allowed);
    let denied = reviews
        .create(&pp, &review("delete", "pods"))
        .await
        .expect("review");
    let status = denied.status.expect("status");
    assert!(!status.allowed && status.denied == Some(true), "{status:?}");
    fx.shutdown().await;
}

#[tokio::test]
async fn secrets_are_served_read_only_as_configured() {
    let fx = Fixture::start(FixtureOptions::default().secret(
        NS,
        "sandbox-secrets",
        &[("acme.API_TOKEN", "v1\n"), ("globex.API_TOKEN", "v2")],
    ))
    .await;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(fx.client(), NS);
    let s = secrets.get("sandbox-secrets").await.unwrap();
    let data = s.data.unwrap();
    assert_eq!(data["acme.API_TOKEN"].0, b"v1\n");
    assert_eq!(data["globex.API_TOKEN"].0, b"v2");
    assert_eq!(s.metadata.namespace.as_deref(), Some(NS));
    // Another name or namespace: 404 NotFound like the API server.
    let (code, reason, _) = api_error(secrets.get("other").await);
    assert_eq!((code, reason.as_str()), (404, "NotFound"));
    let elsewhere: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(fx.client(), "default");
    assert_eq!(api_error(elsewhere.get("sandbox-secrets").await).0, 404);
    assert_eq!(secrets.get_opt("other").await.unwrap(), None);
    fx.shutdown().await;
}

#[tokio::test]
async fn network_policies_by_server_side_apply() {
    let fx = Fixture::start(FixtureOptions::default()).await;
    let api: Api<NetworkPolicy> = Api::namespaced(fx.client(), NS);
    let policy = |ports: Option<Vec<Value>>| {
        let mut p = json!({
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": { "name": "agent-sandbox-runtime-data-plane", "labels": { "app.kubernetes.io/managed-by": "agent-sandbox-data-plane" } },
            "spec": {
                "podSelector": { "matchLabels": { "agentsandbox.dev/role": "runtime" } },
                "policyTypes": ["Ingress", "Egress"],
                "egress": [],
            },
        });
        if let Some(ports) = ports {
            p["spec"]["ingress"] = json!([{ "ports": ports }]);
        }
        p
    };
    let pp = PatchParams::apply("agent-sandbox-data-plane").force();
    let name = "agent-sandbox-runtime-data-plane";
    let first = api
        .patch(name, &pp, &Patch::Apply(policy(None)))
        .await
        .expect("apply creates");
    let meta = &first.metadata;
    assert!(meta.uid.is_some() && meta.creation_timestamp.is_some());
    let rv1: u64 = meta
        .resource_version
        .as_deref()
        .expect("rv")
        .parse()
        .expect("numeric rv");
    let second = api
        .patch(
            name,
            &pp,
            &Patch::Apply(policy(Some(vec![json!({"port": 9000, "protocol": "TCP"})]))),
        )
        .await
        .expect("apply replaces");
    assert_eq!(second.metadata.uid, first.metadata.uid);
    let rv2: u64 = second
        .metadata
        .resource_version
        .as_deref()
        .expect("rv")
        .parse()
        .expect("numeric");
    assert!(rv2 > rv1);
    assert_eq!(second.metadata.generation, Some(2));
    let got = api.get(name).await.expect("get");
    let spec: NetworkPolicySpec = got.spec.expect("spec");
    assert_eq!(spec.egress, Some(vec![]));
    assert_eq!(
        spec.pod_selector
            .as_ref()
            .and_then(|s: &LabelSelector| s.match_labels.clone())
            .map(|m| m.len()),
        Some(1)
    );
    assert_eq!(
        api.list(&ListParams::default())
            .await
            .expect("list")
            .items
            .len(),
        1
    );
    assert_eq!(fx.network_policies().len(), 1);

    // Without a field manager, or in a namespace that does not exist: refused.
    let http = reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client");
    let url = format!(
        "{}/apis/networking.k8s.io/v1/namespaces/{NS}/networkpolicies/{name}",
        fx.url()
    );
    let resp = http
        .patch(&url)
        .header("content-type", "application/apply-patch+yaml")
        .body(policy(None).to_string())
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 400);
    let missing: Api<NetworkPolicy> = Api::namespaced(fx.client(), "missing");
    let (code, _, message) = api_error(missing.patch(name, &pp, &Patch::Apply(policy(None))).await);
    assert_eq!(code, 404, "{message}");
    let applies: Vec<_> = fx
        .requests()
        .into_iter()
        .filter(|r| r.method == "PATCH")
        .collect();
    assert_eq!(applies.len(), 4);
    assert_eq!(
        applies[0].content_type.as_deref(),
        Some("application/apply-patch+yaml")
    );
    assert_eq!(
        applies[0].query.get("fieldManager").map(String::as_str),
        Some("agent-sandbox-data-plane")
    );
    assert_eq!(
        applies[0].query.get("force").map(String::as_str),
        Some("true")
    );
    fx.shutdown().await;
}

#[tokio::test]
async fn pod_creation_is_validated_like_the_api_server() {
    let fx = Fixture::start(FixtureOptions::default()).await;
    let api = pods(&fx);
    let pp = PostParams::default();

    let (code, reason, message) = api_error(
        api.create(&pp, &runtime_pod("Bad_Name", MISSING_IMAGE, &[]))
            .await,
    );
    assert_eq!((code, reason.as_str()), (422, "Invalid"), "{message}");
    assert!(message.contains("metadata.name"), "{message}");

    let (code, reason, message) = api_error(
        api.create(
            &pp,
            &runtime_pod(
                "sbx-labels",
                MISSING_IMAGE,
                &[("agentsandbox.dev/session", "not a label!")],
            ),
        )
        .await,
    );
    assert_eq!((code, reason.as_str()), (422, "Invalid"), "{message}");
    assert!(message.contains("metadata.labels"), "{message}");

    let mut odd = runtime_pod("sbx-annotated", MISSING_IMAGE, &[]);
    odd.metadata.annotations = Some(BTreeMap::from([("bad key/x/y".to_owned(), "v".to_owned())]));
    let (code, _, message) = api_error(api.create(&pp, &odd).await);
    assert_eq!(code, 422, "{message}");

    let mut class = runtime_pod("sbx-class", MISSING_IMAGE, &[]);
    class.spec.as_mut().expect("spec").runtime_class_name = Some("kata".into());
    let (code, reason, message) = api_error(api.create(&pp, &class).await);
    assert_eq!((code, reason.as_str()), (403, "Forbidden"), "{message}");
    assert!(
        message.contains("pod rejected: RuntimeClass \"kata\" not found"),
        "{message}"
    );

    let elsewhere: Api<Pod> = Api::namespaced(fx.client(), "missing");
    let (code, _, message) = api_error(
        elsewhere
            .create(&pp, &runtime_pod("sbx-x", MISSING_IMAGE, &[]))
            .await,
    );
    assert_eq!(code, 404, "{message}");
    assert!(
        message.contains("namespaces \"missing\" not found"),
        "{message}"
    );

    let created = api
        .create(&pp, &runtime_pod("sbx-first", MISSING_IMAGE, &[]))
        .await
        .expect("created");
    let meta = &created.metadata;
    assert!(
        meta.uid.is_some() && meta.creation_timestamp.is_some() && meta.resource_version.is_some()
    );
    assert_eq!(phase(&created), "Pending");
    let (code, reason, _) = api_error(
        api.create(&pp, &runtime_pod("sbx-first", MISSING_IMAGE, &[]))
            .await,
    );
    assert_eq!((code, reason.as_str()), (409, "AlreadyExists"));

    // Nothing but the one valid pod was stored.
    assert_eq!(fx.pods().len(), 1);
    fx.shutdown().await;
}

#[tokio::test]
async fn an_image_that_does_not_pull_backs_off() {
    let fx = Fixture::start(FixtureOptions::default()).await;
    let api = pods(&fx);
    api.create(
        &PostParams::default(),
        &runtime_pod("sbx-pull", MISSING_IMAGE, &[]),
    )
    .await
    .expect("created");
    let pod = wait_for(&api, "sbx-pull", Duration::from_secs(10), |p| {
        waiting_reason(p) == Some("ImagePullBackOff")
    })
    .await;
    assert_eq!(phase(&pod), "Pending");
    assert!(condition(&pod, "PodScheduled").is_some_and(|c| c.status == "True"));
    assert!(!is_ready(&pod));
    assert!(
        pod.status
            .as_ref()
            .and_then(|s| s.pod_ip.as_ref())
            .is_none()
    );
    fx.shutdown().await;
}

#[tokio::test]
async fn a_pod_larger_than_the_free_capacity_is_unschedulable_until_room_is_freed() {
    let fx = Fixture::start(FixtureOptions::default().capacity(1500, 4096)).await;
    let api = pods(&fx);
    let pp = PostParams::default();
    api.create(&pp, &runtime_pod("sbx-a", MISSING_IMAGE, &[]))
        .await
        .expect("a");
    wait_for(&api, "sbx-a", Duration::from_secs(10), |p| {
        condition(p, "PodScheduled").is_some_and(|c| c.status == "True")
    })
    .await;
    api.create(&pp, &runtime_pod("sbx-b", MISSING_IMAGE, &[]))
        .await
        .expect("b");
    let b = wait_for(&api, "sbx-b", Duration::from_secs(10), |p| {
        condition(p, "PodScheduled").is_some_and(|c| c.reason.as_deref() == Some("Unschedulable"))
    })
    .await;
    let scheduled = condition(&b, "PodScheduled").expect("condition");
    assert_eq!(scheduled.status, "False");
    assert!(
        scheduled
            .message
            .as_deref()
            .unwrap_or("")
            .contains("Insufficient cpu"),
        "{scheduled:?}"
    );
    assert_eq!(phase(&b), "Pending");

    api.delete("sbx-a", &DeleteParams::default())
        .await
        .expect("deleted");
    wait_for(&api, "sbx-b", Duration::from_secs(10), |p| {
        condition(p, "PodScheduled").is_some_and(|c| c.status == "True")
    })
    .await;
    fx.shutdown().await;
}

#[tokio::test]
async fn label_and_field_selectors_on_lists() {
    let fx = Fixture::start(FixtureOptions::default()).await;
    let api = pods(&fx);
    let pp = PostParams::default();
    for (name, labels) in [
        ("sbx-warm1", vec![("agentsandbox.dev/state", "warm")]),
        (
            "sbx-warm2",
            vec![
                ("agentsandbox.dev/state", "warm"),
                ("agentsandbox.dev/runtime", "node"),
            ],
        ),
        (
            "sbx-bound",
            vec![
                ("agentsandbox.dev/state", "bound"),
                ("agentsandbox.dev/session", "ses_1"),
            ],
        ),
    ] {
        api.create(&pp, &runtime_pod(name, MISSING_IMAGE, &labels))
            .await
            .expect("created");
    }
    let names = |sel: &'static str| {
        let api = api.clone();
        async move {
            let mut n: Vec<String> = api
                .list(&ListParams::default().labels(sel))
                .await
                .expect("list")
                .items
                .into_iter()
                .filter_map(|p| p.metadata.name)
                .collect();
            n.sort();
            n
        }
    };
    assert_eq!(
        names("agentsandbox.dev/state=warm").await,
        ["sbx-warm1", "sbx-warm2"]
    );
    assert_eq!(names("agentsandbox.dev/state!=warm").await, ["sbx-bound"]);
    assert_eq!(names("agentsandbox.dev/session").await, ["sbx-bound"]);
    assert_eq!(
        names("!agentsandbox.dev/session,agentsandbox.dev/runtime=python").await,
        ["sbx-warm1"]
    );
    assert_eq!(
        names("agentsandbox.dev/role=runtime,agentsandbox.dev/owner=data-plane")
            .await
            .len(),
        3
    );
    let list = api
        .list(&ListParams::default().fields("metadata.name=sbx-warm2"))
        .await
        .expect("field selector");
    assert_eq!(list.items.len(), 1);
    assert!(list.metadata.resource_version.is_some());
    let (code, _, _) = api_error(api.list(&ListParams::default().labels("a b")).await);
    assert_eq!(code, 400);
    fx.shutdown().await;
}

#[tokio::test]
async fn watches_see_added_modified_and_deleted() {
    let fx = Fixture::start(FixtureOptions::default()).await;
    let api = pods(&fx);
    let warm = "agentsandbox.dev/state=warm";
    let wp = WatchParams::default().labels(warm).timeout(30);
    let rv = api
        .list(&ListParams::default().labels(warm))
        .await
        .expect("list")
        .metadata
        .resource_version
        .expect("rv");
    let mut raw = api.watch(&wp, &rv).await.expect("watch").boxed();
    let mut runtime_watcher = watcher(api.clone(), watcher::Config::default().labels(warm)).boxed();
    // The watcher lists first (empty).
    loop {
        match tokio::time::timeout(Duration::from_secs(10), runtime_watcher.try_next()).await {
            Ok(Ok(Some(watcher::Event::InitDone))) => break,
            Ok(Ok(Some(_))) => {}
            other => panic!("watcher: {other:?}"),
        }
    }

    api.create(
        &PostParams::default(),
        &runtime_pod(
            "sbx-w",
            MISSING_IMAGE,
            &[("agentsandbox.dev/state", "warm")],
        ),
    )
    .await
    .expect("created");
    // Claim it: relabel to bound, so it leaves the `warm` selection.
    wait_for(&api, "sbx-w", Duration::from_secs(10), |p| {
        waiting_reason(p) == Some("ImagePullBackOff")
    })
    .await;
    let patch = json!({"metadata": {"labels": {"agentsandbox.dev/state": "bound"}}});
    api.patch("sbx-w", &PatchParams::default(), &Patch::Merge(&patch))
        .await
        .expect("relabelled");

    let mut kinds = Vec::new();
    let mut last_rv = 0u64;
    while kinds.last().map(String::as_str) != Some("DELETED") {
        let event = tokio::time::timeout(Duration::from_secs(10), raw.try_next())
            .await
            .expect("an event in time")
            .expect("no error")
            .expect("stream open");
        let (kind, pod) = match event {
            WatchEvent::Added(p) => ("ADDED", p),
            WatchEvent::Modified(p) => ("MODIFIED", p),
            WatchEvent::Deleted(p) => ("DELETED", p),
            WatchEvent::Bookmark(_) => continue,
            WatchEvent::Error(e) => panic!("watch error {e:?}"),
        };
        let rv: u64 = pod
            .metadata
            .resource_version
            .as_deref()
            .expect("rv")
            .parse()
            .expect("numeric");
        assert!(rv > last_rv, "resourceVersions increase");
        last_rv = rv;
        kinds.push(kind.to_owned());
    }
    assert_eq!(kinds.first().map(String::as_str), Some("ADDED"));
    assert!(kinds.contains(&"MODIFIED".to_owned()), "{kinds:?}");

    // The runtime watcher saw it applied, then deleted (it left the selection).
    let mut applied = false;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), runtime_watcher.try_next()).await {
            Ok(Ok(Some(watcher::Event::Apply(p)))) => {
                assert_eq!(p.metadata.name.as_deref(), Some("sbx-w"));
                applied = true;
            }
            Ok(Ok(Some(watcher::Event::Delete(p)))) => {
                assert_eq!(p.metadata.name.as_deref(), Some("sbx-w"));
                break;
            }
            other => panic!("watcher: {other:?} after {:#?}", fx.requests()),
        }
    }
    assert!(applied);

    // A pod deleted from outside: a watch on every pod sees DELETED.
    let all = api
        .watch(&WatchParams::default().timeout(30), &last_rv.to_string())
        .await
        .expect("watch");
    let mut all = all.boxed();
    fx.delete_pod_externally("sbx-w").await.expect("deleted");
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), all.try_next())
            .await
            .expect("an event in time")
            .expect("no error")
            .expect("open");
        if let WatchEvent::Deleted(p) = event {
            assert_eq!(p.metadata.name.as_deref(), Some("sbx-w"));
            break;
        }
    }
    assert!(fx.pods().is_empty());
    fx.shutdown().await;
}

#[tokio::test]
async fn a_watch_from_an_old_version_replays_and_bookmarks_arrive() {
    let options = FixtureOptions {
        bookmark_interval: Duration::from_millis(100),
        ..FixtureOptions::default()
    };
    let fx = Fixture::start(options).await;
    let api = pods(&fx);
    let created = api
        .create(
            &PostParams::default(),
            &runtime_pod("sbx-r", MISSING_IMAGE, &[]),
        )
        .await
        .expect("created");
    wait_for(&api, "sbx-r", Duration::from_secs(10), |p| {
        waiting_reason(p) == Some("ImagePullBackOff")
    })
    .await;
    let mut stream = api
        .watch(&WatchParams::default().timeout(5), "0")
        .await
        .expect("watch")
        .boxed();
    let first = stream.try_next().await.expect("ok").expect("event");
    assert!(matches!(first, WatchEvent::Added(_)), "{first:?}");
    let since = created.metadata.resource_version.expect("rv");
    let mut replay = api
        .watch(&WatchParams::default().timeout(5), &since)
        .await
        .expect("watch")
        .boxed();
    let mut modified = 0;
    loop {
        match replay.try_next().await.expect("ok").expect("open") {
            WatchEvent::Modified(_) => modified += 1,
            WatchEvent::Bookmark(b) => {
                assert!(modified >= 2, "the scheduling and pull changes came first");
                assert!(!b.metadata.resource_version.is_empty());
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    // The watch ends at its timeout.
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        while replay.try_next().await.expect("ok").is_some() {}
    })
    .await;
    assert!(ended.is_ok(), "the watch ended at timeoutSeconds");
    fx.shutdown().await;
}

#[tokio::test]
async fn patches_change_labels_with_preconditions() {
    let fx = Fixture::start(FixtureOptions::default()).await;
    let api = pods(&fx);
    let created = api
        .create(
            &PostParams::default(),
            &runtime_pod(
                "sbx-p",
                MISSING_IMAGE,
                &[("agentsandbox.dev/state", "warm")],
            ),
        )
        .await
        .expect("created");
    let pp = PatchParams::default();
    let claim = json!({"metadata": {"labels": {"agentsandbox.dev/state": "bound", "agentsandbox.dev/session": "ses_9"}}});
    let claimed = api
        .patch("sbx-p", &pp, &Patch::Merge(&claim))
        .await
        .expect("merge patch");
    let labels = claimed.metadata.labels.expect("labels");
    assert_eq!(labels["agentsandbox.dev/state"], "bound");
    assert_eq!(labels["agentsandbox.dev/session"], "ses_9");

    // A stale resourceVersion in the patch: 409 Conflict, nothing changed.
    let stale = json!({"metadata": {"resourceVersion": created.metadata.resource_version, "labels": {"x": "y"}}});
    let (code, reason, _) = api_error(api.patch("sbx-p", &pp, &Patch::Merge(&stale)).await);
    assert_eq!((code, reason.as_str()), (409, "Conflict"));
    // A JSON patch whose test fails: refused.
    let test = json_patch::Patch(
        serde_json::from_value(json!([
            {"op": "test", "path": "/metadata/labels/agentsandbox.dev~1state", "value": "warm"},
            {"op": "replace", "path": "/metadata/labels/agentsandbox.dev~1state", "value": "bound"},
        ]))
        .expect("ops"),
    );
    let (code, _, _) = api_error(api.patch("sbx-p", &pp, &Patch::<()>::Json(test)).await);
    assert_eq!(code, 422);
    // The spec of a pod does not change.
    let spec = json!({"spec": {"runtimeClassName": "other"}});
    let (code, reason, _) = api_error(api.patch("sbx-p", &pp, &Patch::Merge(&spec)).await);
    assert_eq!((code, reason.as_str()), (422, "Invalid"));
    // Bad label syntax.
    let bad = json!({"metadata": {"labels": {"x": "no spaces allowed"}}});
    let (code, _, _) = api_error(api.patch("sbx-p", &pp, &Patch::Merge(&bad)).await);
    assert_eq!(code, 422);
    let now = api.get("sbx-p").await.expect("get");
    assert!(!now.metadata.labels.expect("labels").contains_key("x"));
    let (code, _, _) = api_error(api.patch("sbx-none", &pp, &Patch::Merge(&claim)).await);
    assert_eq!(code, 404);
    fx.shutdown().await;
}

#[tokio::test]
async fn injected_faults_answer_a_status_without_effect() {
    let fx = Fixture::start(FixtureOptions::default()).await;
    let api = pods(&fx);
    let pp = PostParams::default();
    let path = format!("/api/v1/namespaces/{NS}/pods");
    fx.fail_next("POST", &path, 409, "Conflict", 1);
    let (code, reason, message) = api_error(
        api.create(&pp, &runtime_pod("sbx-f", MISSING_IMAGE, &[]))
            .await,
    );
    assert_eq!((code, reason.as_str()), (409, "Conflict"), "{message}");
    assert!(fx.pods().is_empty());
    fx.fail_next("POST", &path, 500, "InternalError", 1);
    let (code, reason, _) = api_error(
        api.create(&pp, &runtime_pod("sbx-f", MISSING_IMAGE, &[]))
            .await,
    );
    assert_eq!((code, reason.as_str()), (500, "InternalError"));
    assert!(fx.pods().is_empty());
    // The fixture's client has kube's own retries off (as the data plane's
    // has): a 429 reaches the caller, whose retry then lands.
    fx.fail_next("POST", &path, 429, "TooManyRequests", 1);
    let (code, reason, _) = api_error(
        api.create(&pp, &runtime_pod("sbx-f", MISSING_IMAGE, &[]))
            .await,
    );
    assert_eq!((code, reason.as_str()), (429, "TooManyRequests"));
    assert!(fx.pods().is_empty());
    api.create(&pp, &runtime_pod("sbx-f", MISSING_IMAGE, &[]))
        .await
        .expect("created on the next try");
    let posts = fx
        .requests()
        .iter()
        .filter(|r| r.method == "POST" && r.path == path)
        .count();
    assert_eq!(posts, 4);
    // Faults are per method and path prefix.
    fx.fail_next("DELETE", &format!("{path}/sbx-f"), 500, "InternalError", 1);
    api.get("sbx-f").await.expect("GET is not affected");
    let (code, _, _) = api_error(api.delete("sbx-f", &DeleteParams::default()).await);
    assert_eq!(code, 500);
    assert_eq!(fx.pods().len(), 1);
    api.delete("sbx-f", &DeleteParams::default())
        .await
        .expect("then deleted");
    assert!(fx.pods().is_empty());
    let (code, _, _) = api_error(api.delete("sbx-f", &DeleteParams::default()).await);
    assert_eq!(code, 404);
    fx.shutdown().await;
}

#[tokio::test]
async fn unknown_calls_answer_404_and_are_recorded() {
    let fx = Fixture::start(FixtureOptions::default()).await;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(fx.client());
    let (code, reason, _) = api_error(nodes.list(&ListParams::default()).await);
    assert_eq!((code, reason.as_str()), (404, "NotFound"));
    let requests = fx.requests();
    let last = requests.last().expect("recorded");
    assert_eq!(
        (last.method.as_str(), last.path.as_str()),
        ("GET", "/api/v1/nodes")
    );
    fx.shutdown().await;
}

#[tokio::test]
async fn a_pod_whose_env_the_agent_does_not_know_fails() {
    let fx = Fixture::start(FixtureOptions::default()).await;
    let api = pods(&fx);
    let mut pod = runtime_pod("sbx-env", IMAGE, &[]);
    let container = &mut pod.spec.as_mut().expect("spec").containers[0];
    container
        .env
        .get_or_insert_with(Vec::new)
        .push(env("SESSION_AGENT_NOT_A_SETTING", "1"));
    api.create(&PostParams::default(), &pod)
        .await
        .expect("created");
    let failed = wait_for(&api, "sbx-env", Duration::from_secs(10), |p| {
        phase(p) == "Failed"
    })
    .await;
    let t = terminated(&failed).expect("terminated");
    assert_eq!(t.reason.as_deref(), Some("Error"));
    assert!(
        t.message
            .as_deref()
            .unwrap_or("")
            .contains("SESSION_AGENT_NOT_A_SETTING"),
        "{t:?}"
    );

    // What the agent itself refuses fails the pod too, with its message.
    let mut pod = runtime_pod("sbx-sessions", IMAGE, &[]);
    let container = &mut pod.spec.as_mut().expect("spec").containers[0];
    for var in container.env.iter_mut().flatten() {
        if var.name == "SESSION_AGENT_MAX_SESSIONS" {
            var.value = Some("2".into());
        }
    }
    api.create(&PostParams::default(), &pod)
        .await
        .expect("created");
    let failed = wait_for(&api, "sbx-sessions", Duration::from_secs(10), |p| {
        phase(p) == "Failed"
    })
    .await;
    let message = terminated(&failed)
        .and_then(|t| t.message.clone())
        .unwrap_or_default();
    assert!(message.contains("SESSION_AGENT_MAX_SESSIONS"), "{message}");
    fx.shutdown().await;
}

#[tokio::test]
async fn killing_a_pending_pod_fails_it() {
    let fx = Fixture::start(FixtureOptions::default()).await;
    let api = pods(&fx);
    api.create(
        &PostParams::default(),
        &runtime_pod("sbx-k", MISSING_IMAGE, &[]),
    )
    .await
    .expect("created");
    fx.oom_kill_pod("sbx-k").await.expect("killed");
    let pod = api.get("sbx-k").await.expect("still there");
    assert_eq!(phase(&pod), "Failed");
    let t = terminated(&pod).expect("terminated");
    assert_eq!((t.exit_code, t.reason.as_deref()), (137, Some("OOMKilled")));
    assert_eq!(
        fx.kill_pod("sbx-k").await,
        Err(k8s_fixture::FixtureError::NotRunning("sbx-k".into()))
    );
    assert_eq!(
        fx.kill_pod("sbx-nope").await,
        Err(k8s_fixture::FixtureError::NotFound("sbx-nope".into()))
    );
    // A terminal pod is deleted at once.
    api.delete("sbx-k", &DeleteParams::default())
        .await
        .expect("deleted");
    assert!(fx.pods().is_empty());
    fx.shutdown().await;
}

/// An HTTP client that never goes through a proxy (pod IPs are loopback).
fn http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client")
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn a_pod_runs_the_real_agent_at_its_pod_ip() {
    let iso = isolation();
    let fx = Fixture::start(FixtureOptions::default().isolation(&iso)).await;
    let api = pods(&fx);
    api.create(&PostParams::default(), &runtime_pod("sbx-run", IMAGE, &[]))
        .await
        .expect("created");
    let pod = wait_for(&api, "sbx-run", Duration::from_secs(60), |p| {
        assert_ne!(phase(p), "Failed", "the pod failed: {:#?}", p.status);
        phase(p) == "Running" && is_ready(p)
    })
    .await;
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod IP");
    let addr: std::net::Ipv4Addr = ip.parse().expect("an IPv4 pod IP");
    assert!(addr.is_loopback() && addr.octets()[1] != 0, "{addr}");
    let agent = format!("http://{ip}:9000");
    let health: Value = http()
        .get(format!("{agent}/v1/health"))
        .send()
        .await
        .expect("the agent answers at podIP:9000")
        .json()
        .await
        .expect("json");
    assert_eq!(health["isolation"], json!(iso));

    // A session, as the data plane creates it: admin header, token in the body.
    let resp = http()
        .post(format!("{agent}/v1/sessions"))
        .header("x-agent-admin-token", ADMIN_TOKEN)
        .json(&json!({"sessionId": "ses_fixture", "runtime": "python", "token": SESSION_TOKEN}))
        .send()
        .await
        .expect("sent");
    assert_eq!(resp.status().as_u16(), 201, "{:?}", resp.text().await);
    let step: Value = http()
        .post(format!("{agent}/v1/steps"))
        .header("x-session-token", SESSION_TOKEN)
        .json(&json!({"sessionId": "ses_fixture", "stepId": "s1", "code": "print(6*7)"}))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(step["stdout"], json!("42\n"), "{step}");

    // Killed: the agent stops, the pod is Failed with exit 137.
    let mut watch = api
        .watch(
            &WatchParams::default().timeout(30),
            pod.metadata.resource_version.as_deref().expect("rv"),
        )
        .await
        .expect("watch")
        .boxed();
    fx.kill_pod("sbx-run").await.expect("killed");
    let killed = api.get("sbx-run").await.expect("still listed");
    assert_eq!(phase(&killed), "Failed");
    let t = terminated(&killed).expect("terminated");
    assert_eq!((t.exit_code, t.reason.as_deref()), (137, Some("Error")));
    assert!(
        http()
            .get(format!("{agent}/v1/health"))
            .send()
            .await
            .is_err(),
        "the agent stopped"
    );
    loop {
        let event = tokio::time::timeout(Duration::from_secs(10), watch.try_next())
            .await
            .expect("in time")
            .expect("ok")
            .expect("open");
        if let WatchEvent::Modified(p) = event
            && phase(&p) == "Failed"
        {
            break;
        }
    }
    fx.shutdown().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn deleting_a_running_pod_stops_its_agent() {
    let iso = isolation();
    let fx = Fixture::start(FixtureOptions::default().isolation(&iso)).await;
    let api = pods(&fx);
    api.create(&PostParams::default(), &runtime_pod("sbx-del", IMAGE, &[]))
        .await
        .expect("created");
    let pod = wait_for(&api, "sbx-del", Duration::from_secs(60), |p| {
        assert_ne!(phase(p), "Failed", "the pod failed: {:#?}", p.status);
        is_ready(p)
    })
    .await;
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .expect("pod IP");
    let mut events = watcher(api.clone(), watcher::Config::default()).boxed();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), events.try_next()).await {
            Ok(Ok(Some(watcher::Event::InitDone))) => break,
            Ok(Ok(Some(_))) => {}
            other => panic!("watcher: {other:?}"),
        }
    }
    let started = Instant::now();
    let deleted = api
        .delete("sbx-del", &DeleteParams::default())
        .await
        .expect("deleted");
    let object = deleted
        .left()
        .expect("the API answers the terminating object");
    assert!(object.metadata.deletion_timestamp.is_some());
    loop {
        match tokio::time::timeout(Duration::from_secs(30), events.try_next()).await {
            Ok(Ok(Some(watcher::Event::Delete(p)))) => {
                assert_eq!(p.metadata.name.as_deref(), Some("sbx-del"));
                eprintln!("deleted after {:?}", started.elapsed());
                break;
            }
            Ok(Ok(Some(_))) => {}
            other => panic!("watcher: {other:?}"),
        }
    }
    assert!(
        http()
            .get(format!("http://{ip}:9000/v1/health"))
            .send()
            .await
            .is_err()
    );
    let (code, _, _) = api_error(api.get("sbx-del").await);
    assert_eq!(code, 404);
    fx.shutdown().await;
}
