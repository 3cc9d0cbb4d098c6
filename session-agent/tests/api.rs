//! The agent's HTTP contract against real sandboxes: tokens, bad input,
//! files and traversal, busy sessions, TTL and idle timeouts, the warm pool.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

mod common;

use std::time::Duration;

use common::{TestAgent, token};
use serde_json::json;
use shared::ErrorCode;
use shared::agent::{CreateSessionRequest, StepRequest, StepStatus};

fn step_body(session: &str, code: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({"sessionId": session, "stepId": "x1", "code": code})).unwrap()
}

const JSON: (&str, &str) = ("content-type", "application/json");

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn token_checks() {
    let agent = TestAgent::start(&[]).await;
    let (ta, tb) = (token(), token());
    agent.session("a", "python", &ta).await;
    agent.session("b", "python", &tb).await;
    let body = step_body("a", "1 + 1");

    let wrong = token();
    for (presented, why) in [
        (None, "missing token"),
        (Some(&wrong), "wrong token"),
        (Some(&tb), "another session's token"),
    ] {
        let mut headers = vec![JSON];
        if let Some(t) = presented {
            headers.push(("x-session-token", t.as_str()));
        }
        let (s, e) = agent
            .raw("POST", "/v1/steps", &headers, Some(body.clone()))
            .await;
        assert_eq!(
            (s, e["code"].as_str()),
            (401, Some("unauthorized")),
            "{why}: {e}"
        );
    }
    let (s, r) = agent
        .raw(
            "POST",
            "/v1/steps",
            &[JSON, ("x-session-token", &ta)],
            Some(body),
        )
        .await;
    assert_eq!((s, r["result"].clone()), (200, json!(2)));

    // Files, get and delete need the token too.
    for (m, p) in [
        ("GET", "/v1/sessions/a"),
        ("GET", "/v1/sessions/a/files"),
        ("PUT", "/v1/sessions/a/files/x"),
        ("DELETE", "/v1/sessions/a"),
    ] {
        let (s, _) = agent
            .raw(m, p, &[("x-session-token", &tb)], Some(b"x".to_vec()))
            .await;
        assert_eq!(s, 401, "{m} {p} with another session's token");
    }
    // A listing shows only the session the token opens.
    let list = agent.client.list_sessions(Some(&ta)).await.unwrap();
    assert_eq!(
        list.sessions
            .iter()
            .map(|s| s.session_id.as_str())
            .collect::<Vec<_>>(),
        vec!["a"]
    );
    assert!(
        agent
            .client
            .list_sessions(None)
            .await
            .unwrap()
            .sessions
            .is_empty()
    );

    // Tokens are required and must be long; header and body must agree.
    let admin = ("x-agent-admin-token", agent.admin_token.as_str());
    let (s, e) = agent
        .raw(
            "POST",
            "/v1/sessions",
            &[JSON, admin],
            Some(br#"{"sessionId":"c","runtime":"python"}"#.to_vec()),
        )
        .await;
    assert_eq!((s, e["code"].as_str()), (400, Some("invalid_argument")));
    let (s, _) = agent
        .raw(
            "POST",
            "/v1/sessions",
            &[JSON, admin],
            Some(br#"{"sessionId":"c","runtime":"python","token":"short"}"#.to_vec()),
        )
        .await;
    assert_eq!(s, 400);
    let b = serde_json::to_vec(&json!({"sessionId": "c", "runtime": "python", "token": token()}))
        .unwrap();
    let (s, _) = agent
        .raw(
            "POST",
            "/v1/sessions",
            &[JSON, admin, ("x-session-token", &ta)],
            Some(b),
        )
        .await;
    assert_eq!(s, 401);
    agent.stop().await;
}

/// The seed's example token (`"token-1"`) is refused on purpose (tokens are
/// 256-bit secrets); the refusal says how to make one, and what the command
/// prints is accepted.
#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn a_short_token_is_refused_with_the_command_that_makes_one() {
    let agent = TestAgent::start(&[]).await;
    let admin = ("x-agent-admin-token", agent.admin_token.as_str());
    let (s, e) = agent
        .raw(
            "POST",
            "/v1/sessions",
            &[JSON, admin, ("x-session-token", "token-1")],
            Some(br#"{"sessionId":"session-1","runtime":"python","token":"token-1"}"#.to_vec()),
        )
        .await;
    assert_eq!((s, e["code"].as_str()), (400, Some("invalid_argument")));
    let command = session_agent::sessions::MAKE_TOKEN_COMMAND;
    let message = e["message"].as_str().unwrap();
    assert!(message.contains(command), "{message}");

    // Run the command the message names, exactly as a user would paste it.
    #[allow(clippy::disallowed_methods)] // runs the documented shell command, no sandbox
    let out = std::process::Command::new("sh")
        .args(["-c", command])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let made = String::from_utf8(out.stdout).unwrap();
    let made = made.trim_end_matches('\n');
    assert_eq!(made.len(), 43, "{made:?}");
    assert!(
        made.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "{made:?}"
    );
    let body =
        serde_json::to_vec(&json!({"sessionId": "session-1", "runtime": "python", "token": made}))
            .unwrap();
    let (s, r) = agent
        .raw(
            "POST",
            "/v1/sessions",
            &[JSON, admin, ("x-session-token", made)],
            Some(body),
        )
        .await;
    assert_eq!(s, 201, "{r}");
    let r = agent.step("session-1", made, "1 + 1").await;
    assert_eq!(r.result, Some(json!(2)));
    agent.stop().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn auth_bypass_accepts_tokenless_sessions() {
    let agent = TestAgent::start(&["--auth-bypass", "true"]).await;
    let (s, _) = agent
        .raw(
            "POST",
            "/v1/sessions",
            &[JSON],
            Some(br#"{"sessionId":"c","runtime":"bash"}"#.to_vec()),
        )
        .await;
    assert_eq!(s, 201);
    let (s, r) = agent
        .raw(
            "POST",
            "/v1/steps",
            &[JSON],
            Some(step_body("c", "echo hi")),
        )
        .await;
    assert_eq!((s, r["stdout"].as_str()), (200, Some("hi\n")));
    assert_eq!(
        agent
            .client
            .list_sessions(None)
            .await
            .unwrap()
            .sessions
            .len(),
        1
    );
    agent.stop().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn bad_input_gets_coded_4xx() {
    let agent = TestAgent::start(&["--max-body-bytes", "65536"]).await;
    let t = token();
    agent.session("a", "python", &t).await;
    let auth = ("x-session-token", t.as_str());
    let admin = ("x-agent-admin-token", agent.admin_token.as_str());
    // (method, path, headers, body, expected status, expected code)
    type Case<'a> = (
        &'a str,
        &'a str,
        Vec<(&'a str, &'a str)>,
        Vec<u8>,
        u16,
        &'a str,
    );
    let cases: Vec<Case<'_>> = vec![
        ("POST", "/v1/steps", vec![JSON, auth], b"{not json".to_vec(), 400, "invalid_json"),
        ("POST", "/v1/steps", vec![JSON, auth], br#"{"sessionId":"a"}"#.to_vec(), 400, "invalid_json"),
        ("POST", "/v1/steps", vec![JSON, auth], br#"{"sessionId":"a","stepId":"s","code":"1","bogus":1}"#.to_vec(), 400, "invalid_json"),
        ("POST", "/v1/steps", vec![auth], step_body("a", "1"), 415, "unsupported_media_type"),
        ("POST", "/v1/steps", vec![JSON, auth], step_body("nope", "1"), 404, "session_not_found"),
        ("POST", "/v1/steps", vec![JSON, auth], serde_json::to_vec(&json!({"sessionId":"a","stepId":"../x","code":"1"})).unwrap(), 400, "invalid_argument"),
        ("POST", "/v1/steps", vec![JSON, auth], serde_json::to_vec(&json!({"sessionId":"a","stepId":"s","code":"1","timeoutMs": 100_000_000})).unwrap(), 400, "limit_exceeded"),
        ("POST", "/v1/steps", vec![JSON, auth], step_body("a", &"x".repeat(70_000)), 413, "payload_too_large"),
        ("POST", "/v1/sessions", vec![JSON, admin], serde_json::to_vec(&json!({"sessionId":"r","runtime":"cobol","token":token()})).unwrap(), 400, "unknown_runtime"),
        ("POST", "/v1/sessions", vec![JSON, admin], serde_json::to_vec(&json!({"sessionId":"a","runtime":"python","token":token()})).unwrap(), 409, "session_exists"),
        ("POST", "/v1/sessions", vec![JSON, admin], serde_json::to_vec(&json!({"sessionId":"m","runtime":"python","token":token(),"limits":{"memoryMb": 1_000_000}})).unwrap(), 400, "limit_exceeded"),
        ("POST", "/v1/sessions", vec![JSON, admin], serde_json::to_vec(&json!({"sessionId":"m","runtime":"python","token":token(),"limits":{"gpus": 1}})).unwrap(), 400, "invalid_json"),
        ("POST", "/v1/sessions", vec![JSON, admin], serde_json::to_vec(&json!({"sessionId":"a/b","runtime":"python","token":token()})).unwrap(), 400, "invalid_argument"),
        ("POST", "/v1/sessions", vec![JSON, admin], serde_json::to_vec(&json!({"sessionId":"e","runtime":"python","token":token(),"env":{"BAD NAME":"1"}})).unwrap(), 400, "invalid_argument"),
        // The caller is checked before the body: no credential, no validation.
        ("POST", "/v1/sessions", vec![JSON], b"{not json".to_vec(), 401, "unauthorized"),
        ("GET", "/v1/sessions/nope", vec![auth], vec![], 404, "session_not_found"),
        ("DELETE", "/v1/sessions/nope", vec![auth], vec![], 404, "session_not_found"),
        ("GET", "/v1/nothing", vec![], vec![], 404, "route_not_found"),
        ("PATCH", "/v1/steps", vec![], vec![], 405, "method_not_allowed"),
    ];
    for (method, path, headers, body, status, code) in cases {
        let (s, e) = agent.raw(method, path, &headers, Some(body)).await;
        assert_eq!(s, status, "{method} {path}: {e}");
        assert_eq!(e["code"].as_str(), Some(code), "{method} {path}: {e}");
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "{e}");
        assert!(e["request_id"].as_str().is_some(), "{e}");
    }
    // Nothing was left half-done, and the agent still works.
    let list = agent.client.list_sessions(Some(&t)).await.unwrap();
    assert_eq!(list.sessions.len(), 1);
    assert_eq!(agent.client.health().await.unwrap().sessions, 1);
    assert_eq!(agent.step("a", &t, "6 * 7").await.result, Some(json!(42)));
    agent.stop().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn files_api_and_traversal() {
    let agent = TestAgent::start(&[]).await;
    let t = token();
    agent.session("f", "python", &t).await;
    let c = &agent.client;
    c.write_file("f", "data/in.txt", "from the api", Some(&t))
        .await
        .unwrap();
    let r = agent.step("f", &t, "open('data/in.txt').read()").await;
    assert_eq!(r.result, Some(json!("from the api")));
    let r = agent
        .step(
            "f",
            &t,
            "open('data/in.txt', 'a').write('!')\nopen('out.bin', 'wb').write(bytes(range(256)))",
        )
        .await;
    assert_eq!(r.status, StepStatus::Ok, "{r:?}");
    assert_eq!(
        c.read_file("f", "data/in.txt", Some(&t)).await.unwrap(),
        "from the api!".as_bytes()
    );
    assert_eq!(
        c.read_file("f", "out.bin", Some(&t))
            .await
            .unwrap()
            .to_vec(),
        (0..=255u8).collect::<Vec<_>>()
    );
    let root = c.list_files("f", "", Some(&t)).await.unwrap();
    let names: Vec<_> = root
        .files
        .iter()
        .map(|f| (f.path.as_str(), f.kind.as_str()))
        .collect();
    assert_eq!(names, vec![("data", "dir"), ("out.bin", "file")]);
    let sub = c.list_files("f", "data", Some(&t)).await.unwrap();
    assert_eq!(sub.files[0].path, "data/in.txt");
    assert_eq!(sub.files[0].size, 13);
    // The sandbox sees host-side changes at once (no stale cache).
    c.write_file("f", "data/in.txt", "replaced", Some(&t))
        .await
        .unwrap();
    let r = agent.step("f", &t, "open('data/in.txt').read()").await;
    assert_eq!(r.result, Some(json!("replaced")));
    c.delete_file("f", "out.bin", Some(&t)).await.unwrap();
    let r = agent
        .step("f", &t, "import os\nos.path.exists('out.bin')")
        .await;
    assert_eq!(r.result, Some(json!(false)));
    assert_eq!(
        c.read_file("f", "out.bin", Some(&t))
            .await
            .unwrap_err()
            .code(),
        Some(ErrorCode::FileNotFound)
    );

    // Escapes, in every encoding, planted symlinks and special files.
    agent
        .step(
            "f",
            &t,
            "import os\nos.symlink('/etc/passwd', 'abs')\nos.symlink('../../..', 'up')",
        )
        .await;
    for path in [
        "/v1/sessions/f/files/..%2F..%2Fetc%2Fpasswd",
        "/v1/sessions/f/files/%2e%2e/%2e%2e/etc/passwd",
        "/v1/sessions/f/files/data/..%2f..%2f..%2fetc%2fshadow",
        "/v1/sessions/f/files/%2Fetc%2Fpasswd",
        "/v1/sessions/f/files/abs",
        "/v1/sessions/f/files/up/etc/passwd",
    ] {
        for method in ["GET", "PUT", "DELETE"] {
            if method == "DELETE" && path.ends_with("/abs") {
                continue; // deleting the link itself is allowed
            }
            let (s, e) = agent.raw_tcp(method, path, &t, b"pwned").await;
            assert_eq!(s, 400, "{method} {path}: {e}");
            assert_eq!(
                e["code"].as_str(),
                Some("path_outside_workspace"),
                "{method} {path}: {e}"
            );
        }
    }
    // gVisor keeps FIFOs inside the sandbox; plant one on the host side, as
    // a bwrap or `none` sandbox could, and check the agent does not hang.
    let ws = std::fs::read_dir(agent.state.path().join("workspaces"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    rustix::fs::mknodat(
        rustix::fs::CWD,
        ws.join("fifo"),
        rustix::fs::FileType::Fifo,
        rustix::fs::Mode::from(0o644),
        0,
    )
    .unwrap();
    let (s, e) = agent
        .raw(
            "GET",
            "/v1/sessions/f/files/fifo",
            &[("x-session-token", t.as_str())],
            None,
        )
        .await;
    assert_eq!((s, e["code"].as_str()), (400, Some("not_a_file")), "{e}");
    // The host's files are untouched.
    assert!(
        std::fs::read_to_string("/etc/passwd")
            .unwrap()
            .contains("root:")
    );
    // Deleting a symlink removes the link, not its target.
    c.delete_file("f", "abs", Some(&t)).await.unwrap();
    assert!(std::path::Path::new("/etc/passwd").exists());
    agent.stop().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn a_second_concurrent_step_is_refused_and_delete_stops_a_running_step() {
    let agent = TestAgent::start(&[]).await;
    let t = token();
    agent.session("busy", "python", &t).await;
    let slow = {
        let client = agent.client.clone();
        let t = t.clone();
        tokio::spawn(async move {
            let req = StepRequest {
                step_id: "slow".into(),
                ..common::step_request("busy", "import time\ntime.sleep(20)")
            };
            client.step(&req, Some(&t)).await
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (s, e) = agent
        .raw(
            "POST",
            "/v1/steps",
            &[JSON, ("x-session-token", &t)],
            Some(step_body("busy", "1")),
        )
        .await;
    assert_eq!((s, e["code"].as_str()), (409, Some("session_busy")), "{e}");
    let started = std::time::Instant::now();
    agent.client.delete_session("busy", Some(&t)).await.unwrap();
    let r = slow.await.unwrap().unwrap();
    assert_eq!(r.status, StepStatus::Killed, "{r:?}");
    assert_eq!(r.error.unwrap().kind, "SessionEnded");
    assert!(started.elapsed() < Duration::from_secs(15));
    let e = agent
        .client
        .get_session("busy", Some(&t))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::SessionNotFound));
    agent.stop().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn ttl_and_idle_timeout_end_sessions() {
    let agent = TestAgent::start(&[]).await;
    let t = token();
    for (id, ttl, idle) in [
        ("ttl", Some(2), None),
        ("idle", None, Some(2)),
        ("kept", None, Some(2)),
    ] {
        let req = CreateSessionRequest {
            ttl_seconds: ttl,
            idle_timeout_seconds: idle,
            ..common::create_request(id, "bash", &t)
        };
        agent.client.create_session(&req).await.unwrap();
    }
    let ws_root = agent.state.path().join("workspaces");
    assert_eq!(std::fs::read_dir(&ws_root).unwrap().count(), 3);
    let started = std::time::Instant::now();
    let deadline = started + Duration::from_secs(20);
    loop {
        // "kept" is used (any authorized request counts), so it stays.
        agent
            .client
            .get_session("kept", Some(&t))
            .await
            .expect("a used session must not go idle");
        // A listing does not touch sessions.
        let ids: Vec<String> = agent
            .client
            .list_sessions(Some(&t))
            .await
            .unwrap()
            .sessions
            .into_iter()
            .map(|s| s.session_id)
            .collect();
        if !ids.contains(&"ttl".to_owned()) && !ids.contains(&"idle".to_owned()) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "sessions did not expire: {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "expired too early"
    );
    agent.client.delete_session("kept", Some(&t)).await.unwrap();
    // Workspaces are wiped once teardown finishes.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(&ws_root).unwrap().count() > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "workspaces were not removed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    agent.stop().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn warm_pool_is_claimed_once_and_refilled() {
    let agent = TestAgent::start(&["--warm-pool", "python=1,bash=1"]).await;
    let wait_full = || async {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        loop {
            let h = agent.client.health().await.unwrap();
            if h.warm_pool.get("python") == Some(&1) && h.warm_pool.get("bash") == Some(&1) {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "pool did not fill: {:?}",
                h.warm_pool
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    wait_full().await;
    let t = token();
    let info = agent.session("w1", "python", &t).await;
    assert_eq!(info["warm"], json!(true));
    // Custom limits never take a pooled sandbox.
    let limits = shared::agent::Limits {
        memory_mb: Some(256),
        ..Default::default()
    };
    let info = agent.session_with("w2", "python", &t, Some(limits)).await;
    assert_eq!(info["warm"], json!(false));
    // The pool refills, and a session's env reaches a warm interpreter.
    wait_full().await;
    let req = CreateSessionRequest {
        env: Some([("GREETING".to_owned(), "hej".to_owned())].into()),
        ..common::create_request("w3", "python", &t)
    };
    let info = agent.client.create_session(&req).await.unwrap();
    assert!(info.warm);
    let r = agent
        .step("w3", &t, "import os\nos.environ['GREETING']")
        .await;
    assert_eq!(r.result, Some(json!("hej")));
    // Each session has its own sandbox: w1's state is not in w3.
    agent.step("w1", &t, "secret = 1").await;
    assert_eq!(
        agent.step("w3", &t, "secret").await.error.unwrap().kind,
        "NameError"
    );
    agent.stop().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn the_admin_credential_lists_and_deletes_but_runs_nothing() {
    let admin = token();
    let agent = TestAgent::start(&["--admin-token", &admin]).await;
    let (ta, tb) = (token(), token());
    agent.session("a", "bash", &ta).await;
    agent.session("b", "bash", &tb).await;
    let all = agent.client.list_all_sessions(&admin).await.unwrap();
    assert_eq!(all.sessions.len(), 2);
    // A wrong admin token is just no token: nothing listed.
    assert!(
        agent
            .client
            .list_all_sessions(&token())
            .await
            .unwrap()
            .sessions
            .is_empty()
    );
    // It cannot run code or read files.
    let (s, _) = agent
        .raw(
            "POST",
            "/v1/steps",
            &[JSON, ("x-agent-admin-token", &admin)],
            Some(step_body("a", "echo hi")),
        )
        .await;
    assert_eq!(s, 401);
    let (s, _) = agent
        .raw(
            "GET",
            "/v1/sessions/a/files",
            &[("x-agent-admin-token", &admin)],
            None,
        )
        .await;
    assert_eq!(s, 401);
    // It can delete any session; a wrong one cannot.
    let e = agent
        .client
        .admin_delete_session("a", &token())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Some(ErrorCode::Unauthorized));
    agent
        .client
        .admin_delete_session("a", &admin)
        .await
        .unwrap();
    assert_eq!(
        agent
            .client
            .list_all_sessions(&admin)
            .await
            .unwrap()
            .sessions
            .len(),
        1
    );
    agent.stop().await;
}
