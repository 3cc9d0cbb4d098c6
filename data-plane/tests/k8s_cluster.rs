//! The `k8s` backend against a real cluster: the one `KUBECONFIG` points
//! at (`make test-k8s-cluster`). It needs the runtime namespace and the
//! RuntimeClass (`RUNTIME_NAMESPACE`, `RUNTIME_CLASS`, defaults
//! `agent-sandbox-runtime` and `gvisor`), the runtime image
//! (`SESSION_RUNTIME_IMAGE_PYTHON`, built from
//! `deploy/runtime/python/Dockerfile`), RBAC for pods and NetworkPolicies
//! there, and pod IPs routable from where the test runs (a node, or a pod
//! in the cluster). It creates one session pod and deletes it.
//! `make test-integration` skips it (`--skip real_cluster_`): no cluster
//! can run on the CI machine.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use clap::Parser;
use common::{SECRET, call_at, credential};
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[tokio::test]
#[ignore = "needs: KUBECONFIG (make test-k8s-cluster)"]
async fn real_cluster_a_session_runs_in_a_gvisor_pod() {
    assert!(
        std::env::var_os("KUBECONFIG").is_some(),
        "KUBECONFIG is not set: point it at a cluster with gVisor's RuntimeClass, then run `make test-k8s-cluster`"
    );
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_owned());
    let namespace = env("RUNTIME_NAMESPACE", "agent-sandbox-runtime");
    let class = env("RUNTIME_CLASS", "gvisor");
    let image = env("SESSION_RUNTIME_IMAGE_PYTHON", "runtime-python:dev");
    let state = tempfile::tempdir().unwrap();
    let root = state.path().join("artifacts").display().to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let config = data_plane::Config::parse_from([
        "data-plane",
        "--jwt-secret",
        SECRET,
        "--backend",
        "k8s",
        "--runtime-namespace",
        &namespace,
        "--runtime-class",
        &class,
        "--runtime-image-python",
        &image,
        "--runtime-owner",
        "dp-cluster-test",
        "--ready-timeout",
        "180s",
        "--artifact-root",
        &root,
    ]);
    let stop = CancellationToken::new();
    let task = tokio::spawn(data_plane::serve(listener, config, stop.clone()));
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while http.get(format!("{url}/healthz")).send().await.is_err() {
        assert!(
            !task.is_finished(),
            "the data plane refused to start: {:?}",
            task.await
        );
        assert!(Instant::now() < deadline, "the data plane did not start");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let auth = credential("acme");
    let (s, created) = call_at(
        &url,
        "POST",
        "/internal/v1/sessions",
        Some(&auth),
        Some(json!({"runtime": "python"})),
    )
    .await;
    assert_eq!(s, 201, "{created}");
    let id = created["sessionId"].as_str().unwrap().to_owned();
    let steps = format!("/internal/v1/sessions/{id}/steps");
    let (s, r) = call_at(
        &url,
        "POST",
        &steps,
        Some(&auth),
        Some(json!({"code": "x = 41"})),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    let (s, r) = call_at(
        &url,
        "POST",
        &steps,
        Some(&auth),
        Some(json!({"code": "print(x + 1)"})),
    )
    .await;
    assert_eq!((s, r["stdout"].as_str()), (200, Some("42\n")), "{r}");
    let (s, _) = call_at(
        &url,
        "DELETE",
        &format!("/internal/v1/sessions/{id}"),
        Some(&auth),
        None,
    )
    .await;
    assert_eq!(s, 204);
    stop.cancel();
    task.await.unwrap().unwrap();
}
