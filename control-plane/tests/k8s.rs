//! The whole path with the `k8s` backend: control plane -> data plane
//! (`SESSION_RUNTIME_BACKEND=k8s`) -> a pod of `k8s-fixture` (the test
//! fixture standing in for the cluster, `architecture/k8s-fixture.md`) ->
//! the real session agent in that pod -> gVisor. A job and a two-step
//! session, through the control plane's public API.
#![allow(clippy::unwrap_used)]

mod common;

use clap::Parser;
use common::*;
use control_plane::config::DatabaseDriver;
use k8s_fixture::{Fixture, FixtureOptions};
use serde_json::json;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn jobs_and_sessions_run_in_pods_through_the_control_plane() {
    let fx = Fixture::start(FixtureOptions::default().isolation(&isolation())).await;
    let state = tempfile::Builder::new()
        .prefix("cp-k8s-")
        .tempdir_in("/tmp")
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dp_url = format!("http://{}", listener.local_addr().unwrap());
    let root = state.path().join("artifacts").display().to_string();
    let config = data_plane::Config::parse_from([
        "data-plane",
        "--jwt-secret",
        DP_SECRET,
        "--backend",
        "k8s",
        "--runtime-owner",
        "cp-e2e",
        "--runtime-warm-pool",
        "python=1",
        "--artifact-root",
        &root,
    ]);
    let dp_stop = CancellationToken::new();
    let dp = tokio::spawn(data_plane::serve_with_cluster(
        listener,
        config,
        dp_stop.clone(),
        Some(fx.client()),
    ));
    let db = TestDb::new(DatabaseDriver::Sqlite).await;
    let (cp, _app) = cp_proc(&db, &dp_url, &[]).await;
    let t = token("acme", &["agent"]);

    // A job: its own pod (warm or cold), its result back through both planes.
    let (status, job) = call_at(
        &cp.url,
        "POST",
        "/v1/jobs",
        Some(&t),
        Some(json!({"code": "print('from a pod')\n6*7"})),
    )
    .await;
    assert_eq!(status, 202, "{job}");
    let done = wait_job(&cp.url, &t, job["jobId"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["output"]["result"], 42, "{done}");
    assert_eq!(done["output"]["stdout"], "from a pod\n", "{done}");

    // A session: state kept between steps in its pod.
    let (status, session) = call_at(
        &cp.url,
        "POST",
        "/v1/sessions",
        Some(&t),
        Some(json!({"runtime": "python"})),
    )
    .await;
    assert_eq!(status, 201, "{session}");
    let id = session["sessionId"].as_str().unwrap().to_owned();
    let steps = format!("/v1/sessions/{id}/steps");
    let (s, r) = call_at(
        &cp.url,
        "POST",
        &steps,
        Some(&t),
        Some(json!({"code": "x = 41"})),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    let (s, r) = call_at(
        &cp.url,
        "POST",
        &steps,
        Some(&t),
        Some(json!({"code": "print(x + 1)"})),
    )
    .await;
    assert_eq!(s, 200, "{r}");
    assert_eq!(r["stdout"], "42\n", "{r}");
    // Every pod the planes made is the data plane's, in its namespace, gVisor.
    for pod in fx.pods() {
        let labels = pod.metadata.labels.clone().unwrap();
        assert_eq!(labels["agentsandbox.dev/owner"], "cp-e2e");
        assert_eq!(
            pod.metadata.namespace.as_deref(),
            Some("agent-sandbox-runtime")
        );
        assert_eq!(
            pod.spec.unwrap().runtime_class_name.as_deref(),
            Some("gvisor")
        );
    }
    let (s, _) = call_at(
        &cp.url,
        "DELETE",
        &format!("/v1/sessions/{id}"),
        Some(&t),
        None,
    )
    .await;
    assert!(s == 204 || s == 200, "{s}");

    cp.stop().await;
    dp_stop.cancel();
    dp.await.unwrap().unwrap();
    db.cleanup().await;
    fx.shutdown().await;
}
