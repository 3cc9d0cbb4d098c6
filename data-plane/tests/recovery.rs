//! Durable session registries: after a data-plane restart (orderly or
//! abrupt) sessions keep working, and sessions whose sandbox vanished are
//! marked lost. `file` and `redis` (the Redis on 127.0.0.1:6379, under a
//! key prefix of this test's own, removed afterwards).
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use common::{agent_proc, call_at, credential, dp_proc};
use serde_json::json;

/// Runs `code` once the session is free: a step that was running when the
/// previous data plane died finishes first (409 until then).
async fn step_when_free(
    url: &str,
    steps: &str,
    cred: &str,
    code: &str,
) -> (u16, serde_json::Value) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let (st, r) = call_at(
            url,
            "POST",
            steps,
            Some(cred),
            Some(json!({ "code": code })),
        )
        .await;
        if st != 409 || std::time::Instant::now() > deadline {
            return (st, r);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

async fn survives_restarts_and_marks_lost_sessions(
    registry: &[&str],
    file_dir: Option<&std::path::Path>,
) {
    let state = tempfile::Builder::new()
        .prefix("dp-rec-")
        .tempdir_in("/tmp")
        .unwrap();
    let acme = credential("acme");
    let agent = agent_proc(&state.path().join("agent"), &[]).await;

    // First data plane: two sessions, state in one of them.
    let dp = dp_proc(&agent.url, state.path(), registry).await;
    let (st, a) = call_at(
        &dp.url,
        "POST",
        "/internal/v1/sessions",
        Some(&acme),
        Some(json!({"runtime": "python"})),
    )
    .await;
    assert_eq!(st, 201, "{a}");
    let a = a["sessionId"].as_str().unwrap().to_owned();
    if let Some(dir) = file_dir {
        // One record per session, owner-only, the agent token sealed.
        let rec = dir.join(format!("{a}.json"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&rec).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let stored: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&rec).unwrap()).unwrap();
        assert!(
            stored["sealedToken"]
                .as_str()
                .is_some_and(|t| t.len() > 100),
            "{stored}"
        );
        assert!(stored.get("token").is_none());
    }
    let steps = format!("/internal/v1/sessions/{a}/steps");
    let (_, r) = call_at(
        &dp.url,
        "POST",
        &steps,
        Some(&acme),
        Some(json!({"code": "kept = 'yes'"})),
    )
    .await;
    assert_eq!(r["status"], json!("ok"), "{r}");
    // Killed abruptly while a step runs: no shutdown code, nothing lost.
    let slow = {
        let (url, acme, steps) = (dp.url.clone(), acme.clone(), steps.clone());
        tokio::spawn(async move {
            call_at(
                &url,
                "POST",
                &steps,
                Some(&acme),
                Some(json!({"code": "import time\ntime.sleep(1)"})),
            )
            .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    dp.kill().await;
    slow.abort();

    // A new data plane on the same registry: the session works, with its state.
    let dp = dp_proc(&agent.url, state.path(), registry).await;
    let (st, r) = step_when_free(&dp.url, &steps, &acme, "kept").await;
    assert_eq!((st, r["result"].clone()), (200, json!("yes")), "{r}");
    let (_, got) = call_at(
        &dp.url,
        "GET",
        &format!("/internal/v1/sessions/{a}"),
        Some(&acme),
        None,
    )
    .await;
    assert_eq!(got["state"], json!("active"));
    dp.stop().await;

    // The agent restarts empty: the sandbox vanished.
    agent.stop().await;
    let agent = agent_proc(&state.path().join("agent2"), &[]).await;
    let dp = dp_proc(&agent.url, state.path(), registry).await;
    let (st, got) = call_at(
        &dp.url,
        "GET",
        &format!("/internal/v1/sessions/{a}"),
        Some(&acme),
        None,
    )
    .await;
    assert_eq!(
        (st, got["code"].as_str()),
        (410, Some("session_lost")),
        "{got}"
    );
    let (st, e) = call_at(
        &dp.url,
        "POST",
        &steps,
        Some(&acme),
        Some(json!({"code": "1"})),
    )
    .await;
    assert_eq!((st, e["code"].as_str()), (410, Some("session_lost")), "{e}");
    let (_, list) = call_at(&dp.url, "GET", "/internal/v1/sessions", Some(&acme), None).await;
    assert_eq!(list["sessions"][0]["state"], json!("lost"), "{list}");
    // Deleting a lost session clears it.
    assert_eq!(
        call_at(
            &dp.url,
            "DELETE",
            &format!("/internal/v1/sessions/{a}"),
            Some(&acme),
            None
        )
        .await
        .0,
        204
    );
    let (st, _) = call_at(
        &dp.url,
        "GET",
        &format!("/internal/v1/sessions/{a}"),
        Some(&acme),
        None,
    )
    .await;
    assert_eq!(st, 404);
    dp.stop().await;
    agent.stop().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn file_registry() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sessions").display().to_string();
    let args = ["--registry", "file", "--registry-path", &path];
    survives_restarts_and_marks_lost_sessions(&args, Some(&dir.path().join("sessions"))).await;
    assert_eq!(
        std::fs::read_dir(&path).unwrap().count(),
        0,
        "a deleted session's record remains"
    );
}

#[tokio::test]
#[ignore = "needs: runsc, root and Redis on 127.0.0.1:6379 (make test-integration)"]
async fn redis_registry() {
    let prefix = format!("dp-test-{}:", hex::encode(rand::random::<[u8; 6]>()));
    let client = redis::Client::open("redis://127.0.0.1:6379").unwrap();
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("Redis must run on 127.0.0.1:6379 (redis-server --daemonize yes --port 6379)");
    let args = ["--registry", "redis", "--redis-key-prefix", &prefix];
    survives_restarts_and_marks_lost_sessions(&args, None).await;
    let key = format!("{prefix}sessions");
    let left: usize = redis::cmd("HLEN")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 0, "a deleted session's record remains in Redis");
    // Clean up this test's key, whatever is left in it.
    let _: () = redis::cmd("DEL")
        .arg(&key)
        .query_async(&mut conn)
        .await
        .unwrap();
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn orphan_sandboxes_are_destroyed_at_recovery() {
    let state = tempfile::Builder::new()
        .prefix("dp-orph-")
        .tempdir_in("/tmp")
        .unwrap();
    let admin = "a".repeat(48);
    let agent = agent_proc(&state.path().join("agent"), &["--admin-token", &admin]).await;
    let path = state.path().join("sessions").display().to_string();
    let args = [
        "--registry",
        "file",
        "--registry-path",
        &path,
        "--agent-admin-token",
        &admin,
    ];
    let acme = credential("acme");
    let dp = dp_proc(&agent.url, state.path(), &args).await;
    let (st, owned) = call_at(
        &dp.url,
        "POST",
        "/internal/v1/sessions",
        Some(&acme),
        Some(json!({"runtime": "bash"})),
    )
    .await;
    assert_eq!(st, 201, "{owned}");
    dp.stop().await;
    // A sandbox nobody's record owns (left by a data plane whose state was lost).
    let client = shared::client::AgentClient::new(&agent.url)
        .unwrap()
        .with_admin_token(Some(admin.clone()));
    let orphan = shared::agent::CreateSessionRequest {
        session_id: "orphan".into(),
        runtime: "bash".into(),
        token: Some("o".repeat(48)),
        limits: None,
        env: None,
        ttl_seconds: None,
        idle_timeout_seconds: None,
        packages_dir: None,
        secrets: None,
    };
    client.create_session(&orphan).await.unwrap();
    assert_eq!(
        client
            .list_all_sessions(&admin)
            .await
            .unwrap()
            .sessions
            .len(),
        2
    );
    let dp = dp_proc(&agent.url, state.path(), &args).await;
    let left: Vec<String> = client
        .list_all_sessions(&admin)
        .await
        .unwrap()
        .sessions
        .into_iter()
        .map(|s| s.session_id)
        .collect();
    assert_eq!(
        left,
        vec![owned["sessionId"].as_str().unwrap().to_owned()],
        "the orphan survived recovery"
    );
    dp.stop().await;
    agent.stop().await;
}

/// The data plane as a real process, killed with SIGKILL during a step.
#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn kill_9_during_a_step_loses_no_registry_state() {
    #![allow(clippy::disallowed_methods)] // this test runs the data-plane binary
    let state = tempfile::Builder::new()
        .prefix("dp-kill-")
        .tempdir_in("/tmp")
        .unwrap();
    let agent = agent_proc(&state.path().join("agent"), &[]).await;
    let registry = state.path().join("sessions");
    let spawn = || {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_data-plane"))
            .env_clear()
            .env("DATA_PLANE_ADDR", format!("127.0.0.1:{port}"))
            .env("AUTH_JWT_SECRET", common::SECRET)
            .env("SESSION_AGENT_ENDPOINT", &agent.url)
            .env("SESSION_AGENT_ADMIN_TOKEN", common::AGENT_ADMIN)
            .env("SESSION_REGISTRY_BACKEND", "file")
            .env("SESSION_REGISTRY_PATH", &registry)
            .env("ARTIFACT_ROOT", state.path().join("artifacts"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        (child, format!("http://127.0.0.1:{port}"))
    };
    let up = |url: String| async move {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while reqwest::get(format!("{url}/healthz")).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "data plane did not start"
            );
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    };
    let acme = credential("acme");
    let (mut child, url) = spawn();
    up(url.clone()).await;
    let (st, sess) = call_at(
        &url,
        "POST",
        "/internal/v1/sessions",
        Some(&acme),
        Some(json!({"runtime": "python"})),
    )
    .await;
    assert_eq!(st, 201, "{sess}");
    let steps = format!(
        "/internal/v1/sessions/{}/steps",
        sess["sessionId"].as_str().unwrap()
    );
    call_at(
        &url,
        "POST",
        &steps,
        Some(&acme),
        Some(json!({"code": "n = 7"})),
    )
    .await;
    let job = json!({"jobId": "job-k", "code": "import os\nos.makedirs('output')\nopen('output/r.txt', 'w').write('1')\n5"});
    let (st, first) = call_at(
        &url,
        "POST",
        "/internal/v1/jobs",
        Some(&acme),
        Some(job.clone()),
    )
    .await;
    assert_eq!(
        (st, first["replayed"].clone()),
        (200, json!(false)),
        "{first}"
    );
    let slow = {
        let (url, acme, steps) = (url.clone(), acme.clone(), steps.clone());
        tokio::spawn(async move {
            call_at(
                &url,
                "POST",
                &steps,
                Some(&acme),
                Some(json!({"code": "import time\ntime.sleep(1)"})),
            )
            .await
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    slow.abort();

    let (mut child, url) = spawn();
    up(url.clone()).await;
    let (st, r) = step_when_free(&url, &steps, &acme, "n * 6").await;
    assert_eq!((st, r["result"].clone()), (200, json!(42)), "{r}");
    // The job ran once: after the restart its id replays the saved result.
    let (st, again) = call_at(&url, "POST", "/internal/v1/jobs", Some(&acme), Some(job)).await;
    assert_eq!(
        (st, again["replayed"].clone()),
        (200, json!(true)),
        "{again}"
    );
    assert_eq!(again["artifacts"], first["artifacts"]);
    child.kill().unwrap();
    child.wait().unwrap();
    agent.stop().await;
}
