//! The `k8s` backend end to end: the data plane's API -> the backend ->
//! `k8s-fixture` (a test fixture standing in for the API server and the
//! node; see `architecture/k8s-fixture.md`) -> a pod "run" as the real
//! session agent with real gVisor isolation -> the interpreter.
//!
//! Tests that start pods need runsc and root (`make test-integration`); the
//! start-up refusals are hermetic.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use clap::Parser;
use common::{SECRET, call_at, credential};
use k8s_fixture::{Fixture, FixtureOptions};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

struct K8sDataPlane {
    url: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl K8sDataPlane {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// A data plane with the `k8s` backend on `fixture`.
async fn data_plane(fixture: &Fixture, state: &std::path::Path, extra: &[&str]) -> K8sDataPlane {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let root = state.join("artifacts").display().to_string();
    let mut args = vec![
        "data-plane",
        "--jwt-secret",
        SECRET,
        "--backend",
        "k8s",
        "--runtime-owner",
        "dp-e2e",
        "--ready-timeout",
        "60s",
        "--artifact-root",
        &root,
    ];
    args.extend_from_slice(extra);
    let config = data_plane::Config::parse_from(args);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(data_plane::serve_with_cluster(
        listener,
        config,
        shutdown.clone(),
        Some(fixture.client()),
    ));
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(format!("{url}/healthz")).send().await.is_err() {
        assert!(!task.is_finished(), "the data plane stopped at start-up");
        assert!(Instant::now() < deadline, "the data plane did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    K8sDataPlane {
        url,
        shutdown,
        task,
    }
}

fn state() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("dp-k8s-")
        .tempdir_in("/tmp")
        .unwrap()
}

async fn fixture() -> Fixture {
    Fixture::start(FixtureOptions::default().isolation(&k8s_fixture::isolation_from_env())).await
}

fn runtime_pods(fixture: &Fixture, state: &str) -> Vec<String> {
    fixture
        .pods()
        .into_iter()
        .filter(|p| {
            p.metadata
                .labels
                .as_ref()
                .is_some_and(|l| l.get("agentsandbox.dev/state").map(String::as_str) == Some(state))
        })
        .filter_map(|p| p.metadata.name)
        .collect()
}

/// `POST /internal/v1/sessions` with `body`.
async fn create(dp: &str, auth: &str, body: Value) -> (u16, Value) {
    call_at(dp, "POST", "/internal/v1/sessions", Some(auth), Some(body)).await
}

async fn step(dp: &str, auth: &str, session: &str, code: &str) -> (u16, Value) {
    call_at(
        dp,
        "POST",
        &format!("/internal/v1/sessions/{session}/steps"),
        Some(auth),
        Some(json!({"code": code})),
    )
    .await
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn a_session_runs_in_its_own_pod_and_the_pod_goes_with_it() {
    let fx = fixture().await;
    let st = state();
    let dp = data_plane(&fx, st.path(), &[]).await;
    let auth = credential("acme");
    let (status, created) = create(&dp.url, &auth, json!({"runtime": "python"})).await;
    assert_eq!(status, 201, "{created}");
    let id = created["sessionId"].as_str().unwrap().to_owned();
    assert_eq!(created["warm"], false);
    let bound = runtime_pods(&fx, "bound");
    assert_eq!(bound.len(), 1, "one pod for the session");
    let pod = fx.pod(&bound[0]).unwrap();
    let labels = pod.metadata.labels.unwrap();
    assert_eq!(labels["agentsandbox.dev/tenant"], "acme");
    assert_eq!(
        pod.spec.unwrap().runtime_class_name.as_deref(),
        Some("gvisor")
    );
    // State persists across steps in the pod's interpreter.
    let (s, r) = step(&dp.url, &auth, &id, "x = 41").await;
    assert_eq!(s, 200, "{r}");
    let (s, r) = step(&dp.url, &auth, &id, "print(x + 1)").await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["stdout"], "42\n", "{r}");
    // Another tenant cannot reach it.
    let (s, _) = step(&dp.url, &credential("other"), &id, "print(1)").await;
    assert_eq!(s, 404);
    // Deleting the session deletes the pod.
    let (s, _) = call_at(
        &dp.url,
        "DELETE",
        &format!("/internal/v1/sessions/{id}"),
        Some(&auth),
        None,
    )
    .await;
    assert_eq!(s, 204);
    wait_for("the pod to be deleted", || fx.pod(&bound[0]).is_none()).await;
    dp.stop().await;
    fx.shutdown().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn a_warm_pod_is_claimed_and_the_pool_refilled() {
    let fx = fixture().await;
    let st = state();
    let dp = data_plane(&fx, st.path(), &["--runtime-warm-pool", "python=1"]).await;
    wait_for("a warm pod", || runtime_pods(&fx, "warm").len() == 1).await;
    let http = reqwest::Client::new();
    // The metrics report the pool once the pod's agent answers.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let metrics = http
            .get(format!("{}/metrics", dp.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if metrics.lines().any(|l| {
            l.contains("warm_pool_idle") && l.contains("runtime=\"python\"") && l.ends_with(" 1")
        }) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the pool never filled: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let warm = runtime_pods(&fx, "warm")[0].clone();
    let auth = credential("acme");
    let (status, created) = create(&dp.url, &auth, json!({"runtime": "python"})).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(created["warm"], true, "{created}");
    let id = created["sessionId"].as_str().unwrap().to_owned();
    let (s, r) = step(&dp.url, &auth, &id, "print(6 * 7)").await;
    assert_eq!((s, r["stdout"].as_str()), (200, Some("42\n")), "{r}");
    // The claimed pod is relabelled for its session; a new one is warmed.
    wait_for("the claimed pod's labels", || {
        fx.pod(&warm)
            .is_some_and(|p| p.metadata.labels.unwrap()["agentsandbox.dev/state"] == "bound")
    })
    .await;
    wait_for("a refill", || {
        runtime_pods(&fx, "warm").iter().any(|n| *n != warm)
    })
    .await;
    dp.stop().await;
    fx.shutdown().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn a_pod_that_dies_makes_its_session_lost() {
    let fx = fixture().await;
    let st = state();
    let dp = data_plane(&fx, st.path(), &[]).await;
    let auth = credential("acme");
    let (_, created) = create(&dp.url, &auth, json!({"runtime": "python"})).await;
    let id = created["sessionId"].as_str().unwrap().to_owned();
    let pod = runtime_pods(&fx, "bound")[0].clone();
    fx.kill_pod(&pod).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, s) = call_at(
            &dp.url,
            "GET",
            &format!("/internal/v1/sessions/{id}"),
            Some(&auth),
            None,
        )
        .await;
        if s["state"] == "lost" || s["code"] == "session_lost" {
            break;
        }
        assert!(Instant::now() < deadline, "never marked lost: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (s, body) = step(&dp.url, &auth, &id, "print(1)").await;
    assert_eq!(
        (s, body["code"].as_str()),
        (410, Some("session_lost")),
        "{body}"
    );
    dp.stop().await;
    fx.shutdown().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn an_unpullable_image_is_a_clear_error_and_leaves_no_pod() {
    let fx = fixture().await;
    let st = state();
    let dp = data_plane(
        &fx,
        st.path(),
        &["--runtime-image-python", "registry.invalid/nope:1"],
    )
    .await;
    let (status, body) = create(&dp.url, &credential("acme"), json!({"runtime": "python"})).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["code"], "sandbox_image_unavailable", "{body}");
    wait_for("the pod to be deleted", || {
        runtime_pods(&fx, "bound").is_empty()
    })
    .await;
    dp.stop().await;
    fx.shutdown().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn after_a_restart_the_session_is_adopted_and_old_warm_pods_deleted() {
    let fx = fixture().await;
    let st = state();
    let registry = st.path().join("sessions").display().to_string();
    let kek = st.path().join("kek").display().to_string();
    let args = [
        "--registry",
        "file",
        "--registry-path",
        &registry,
        "--artifact-kek-file",
        &kek,
        "--runtime-warm-pool",
        "python=1",
    ];
    let dp = data_plane(&fx, st.path(), &args).await;
    let auth = credential("acme");
    let (_, created) = create(
        &dp.url,
        &auth,
        json!({"runtime": "python", "limits": {"memoryMb": 256}}),
    )
    .await;
    let id = created["sessionId"].as_str().unwrap().to_owned();
    let (s, _) = step(&dp.url, &auth, &id, "x = 41").await;
    assert_eq!(s, 200);
    wait_for("a warm pod", || runtime_pods(&fx, "warm").len() == 1).await;
    let old_warm = runtime_pods(&fx, "warm")[0].clone();
    // The data plane goes away; its pods stay.
    dp.task.abort();
    let _ = dp.task.await;
    let dp = data_plane(&fx, st.path(), &args).await;
    let (s, r) = step(&dp.url, &auth, &id, "print(x + 1)").await;
    assert_eq!(
        (s, r["stdout"].as_str()),
        (200, Some("42\n")),
        "adopted: {r}"
    );
    wait_for("the old warm pod to go", || fx.pod(&old_warm).is_none()).await;
    dp.stop().await;
    fx.shutdown().await;
}

#[tokio::test]
async fn start_up_refuses_a_missing_namespace_or_runtime_class_naming_it() {
    let fx = Fixture::start(FixtureOptions {
        namespaces: ["default".to_owned()].into(),
        ..Default::default()
    })
    .await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config =
        data_plane::Config::parse_from(["data-plane", "--jwt-secret", SECRET, "--backend", "k8s"]);
    let e = data_plane::serve_with_cluster(
        listener,
        config,
        CancellationToken::new(),
        Some(fx.client()),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("RUNTIME_NAMESPACE") && e.contains("agent-sandbox-runtime"),
        "{e}"
    );

    let fx = Fixture::start(FixtureOptions::default().deny("watch", "pods")).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = data_plane::Config::parse_from([
        "data-plane",
        "--jwt-secret",
        SECRET,
        "--backend",
        "k8s",
        "--runtime-class",
        "kata",
    ]);
    let e = data_plane::serve_with_cluster(
        listener,
        config,
        CancellationToken::new(),
        Some(fx.client()),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("RUNTIME_CLASS") && e.contains("kata"), "{e}");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config =
        data_plane::Config::parse_from(["data-plane", "--jwt-secret", SECRET, "--backend", "k8s"]);
    let e = data_plane::serve_with_cluster(
        listener,
        config,
        CancellationToken::new(),
        Some(fx.client()),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("RBAC") && e.contains("watch pods"), "{e}");
    assert!(fx.pods().is_empty(), "nothing was created");
}

/// Secrets in the `k8s` backend (issue 19 §4): the data plane reads the
/// `RUNTIME_SECRETS_NAME` Secret through the API, hands the caller's
/// tenant's value to the pod's agent, which sets it in the interpreter's
/// environment only: no pod object, no request the API server saw, carries
/// the value; printed, it is masked.
#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn a_secret_is_read_through_the_api_and_never_reaches_the_pod_object() {
    let canary = format!("k8s-canary-{}", hex::encode(rand::random::<[u8; 8]>()));
    let other = format!("k8s-other-{}", hex::encode(rand::random::<[u8; 8]>()));
    let fx = Fixture::start(
        FixtureOptions::default()
            .isolation(&k8s_fixture::isolation_from_env())
            .secret(
                "agent-sandbox-runtime",
                "sandbox-secrets",
                &[("acme.API_TOKEN", &canary), ("globex.API_TOKEN", &other)],
            ),
    )
    .await;
    let st = state();
    let dp = data_plane(
        &fx,
        st.path(),
        &["--runtime-secrets-name", "sandbox-secrets"],
    )
    .await;
    let acme = credential("acme");
    let (status, created) = create(
        &dp.url,
        &acme,
        json!({"runtime": "python", "secrets": ["API_TOKEN"]}),
    )
    .await;
    assert_eq!(status, 201, "{created}");
    let id = created["sessionId"].as_str().unwrap().to_owned();
    let hash = |v: &str| hex::encode(<sha2::Sha256 as sha2::Digest>::digest(v.as_bytes()));
    let (_, r) = step(
        &dp.url,
        &acme,
        &id,
        "import hashlib, os\nhashlib.sha256(os.environ['API_TOKEN'].encode()).hexdigest()",
    )
    .await;
    assert_eq!(r["result"], json!(hash(&canary)), "acme's own value: {r}");
    let (_, r) = step(
        &dp.url,
        &acme,
        &id,
        "import os\nprint(os.environ['API_TOKEN'])",
    )
    .await;
    assert_eq!(r["stdout"], "***\n", "{r}");
    // The pod's own environment (what /proc/1/environ shows) lacks it.
    let (_, r) = step(
        &dp.url,
        &acme,
        &id,
        "open('/proc/1/environ', 'rb').read().count(b'API_TOKEN=')",
    )
    .await;
    assert_eq!(r["result"], json!(0), "{r}");
    // Nothing the API server holds or received carries the value.
    let reads = fx
        .requests()
        .into_iter()
        .filter(|r| r.method == "GET" && r.path.ends_with("/secrets/sandbox-secrets"))
        .count();
    assert!(reads >= 1, "the Secret was read through the API");
    for pod in fx.pods() {
        let text = serde_json::to_string(&pod).unwrap();
        assert!(
            !text.contains(&canary) && !text.contains("API_TOKEN"),
            "{text}"
        );
    }
    for r in fx.requests() {
        let text = format!("{r:?}");
        assert!(!text.contains(&canary), "{text}");
    }
    // Another tenant gets its own value under the same name; a tenant
    // without a key gets 404 naming the name, and no pod.
    let (status, g) = create(
        &dp.url,
        &credential("globex"),
        json!({"runtime": "python", "secrets": ["API_TOKEN"]}),
    )
    .await;
    assert_eq!(status, 201, "{g}");
    let gid = g["sessionId"].as_str().unwrap();
    let (_, r) = step(
        &dp.url,
        &credential("globex"),
        gid,
        "import hashlib, os\nhashlib.sha256(os.environ['API_TOKEN'].encode()).hexdigest()",
    )
    .await;
    assert_eq!(r["result"], json!(hash(&other)), "{r}");
    let pods = fx.pods().len();
    let (status, e) = create(
        &dp.url,
        &credential("initech"),
        json!({"runtime": "python", "secrets": ["API_TOKEN"]}),
    )
    .await;
    assert_eq!(
        (status, e["code"].as_str()),
        (404, Some("secret_not_found")),
        "{e}"
    );
    assert!(e["message"].as_str().unwrap().contains("API_TOKEN"), "{e}");
    assert_eq!(fx.pods().len(), pods, "no pod for a missing secret");
    dp.stop().await;
    fx.shutdown().await;
}

#[tokio::test]
async fn start_up_refuses_a_secret_it_may_not_read_naming_it() {
    let fx = Fixture::start(FixtureOptions::default().deny("get", "secrets")).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let config = data_plane::Config::parse_from([
        "data-plane",
        "--jwt-secret",
        SECRET,
        "--backend",
        "k8s",
        "--runtime-secrets-name",
        "sandbox-secrets",
    ]);
    let e = data_plane::serve_with_cluster(
        listener,
        config,
        CancellationToken::new(),
        Some(fx.client()),
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("RBAC") && e.contains("RUNTIME_SECRETS_NAME") && e.contains("sandbox-secrets"),
        "{e}"
    );
    assert!(fx.pods().is_empty(), "nothing was created");
    fx.shutdown().await;
}
