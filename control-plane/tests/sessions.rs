//! Sessions through the control plane: create, steps that keep state (sync
//! and SSE), the step history, files, tenancy, deletion, audit. Integration
//! tier: every test here runs real sandboxes (`make test-integration`).
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root, and PostgreSQL on 127.0.0.1:5432 (make deps; make test-integration)"]
async fn a_session_keeps_state_across_steps() {
    for driver in DRIVERS {
        let s = stack(driver, &[]).await;
        let t = token("acme", &["agent"]);
        let (status, session) = s
            .call(
                "POST",
                "/v1/sessions",
                Some(&t),
                Some(json!({"ttlSeconds": 300})),
            )
            .await;
        assert_eq!(status, 201, "{driver:?}: {session}");
        assert_eq!(session["runtime"], "python");
        let id = session["sessionId"].as_str().unwrap().to_owned();
        let (status, r) = s
            .call(
                "POST",
                &format!("/v1/sessions/{id}/steps"),
                Some(&t),
                Some(json!({"code": "x = 20"})),
            )
            .await;
        assert_eq!(status, 200, "{r}");
        let (_, r) = s
            .call(
                "POST",
                &format!("/v1/sessions/{id}/steps"),
                Some(&t),
                Some(json!({"code": "print('hi')\nx + 22"})),
            )
            .await;
        assert_eq!(r["status"], "ok", "{r}");
        assert_eq!(r["result"], 42);
        assert_eq!(r["stdout"], "hi\n");
        // Streamed: output events, then the result.
        let resp = reqwest::Client::new()
            .post(format!("{}/v1/sessions/{id}/steps", s.cp.url))
            .bearer_auth(&t)
            .header("accept", "text/event-stream")
            .json(&json!({"code": "for i in range(3): print(i)\nx"}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let text = resp.text().await.unwrap();
        assert!(text.contains("event: stdout"), "{text}");
        assert!(text.contains("event: result"), "{text}");
        assert!(text.contains("\"result\":20"), "{text}");
        // The history, in order, without another tenant seeing it.
        let (status, history) = s
            .call("GET", &format!("/v1/sessions/{id}/steps"), Some(&t), None)
            .await;
        assert_eq!(status, 200);
        let steps = history["steps"].as_array().unwrap();
        assert_eq!(steps.len(), 3, "{history}");
        assert_eq!(steps[0]["code"], "x = 20");
        assert_eq!(steps[1]["seq"], 2);
        assert_eq!(steps[2]["status"], "ok");
        let other = token("globex", &["agent"]);
        for (method, path) in [
            ("GET", format!("/v1/sessions/{id}")),
            ("GET", format!("/v1/sessions/{id}/steps")),
            ("GET", format!("/v1/sessions/{id}/files")),
            ("DELETE", format!("/v1/sessions/{id}")),
        ] {
            let (status, body) = s.call(method, &path, Some(&other), None).await;
            assert_eq!(status, 404, "{method} {path}: {body}");
        }
        let (status, body) = s
            .call(
                "POST",
                &format!("/v1/sessions/{id}/steps"),
                Some(&other),
                Some(json!({"code": "x"})),
            )
            .await;
        assert_eq!(
            (status, body["code"].as_str()),
            (404, Some("session_not_found"))
        );
        // Files.
        let put = reqwest::Client::new()
            .put(format!("{}/v1/sessions/{id}/files/data/in.txt", s.cp.url))
            .bearer_auth(&t)
            .body("payload")
            .send()
            .await
            .unwrap();
        assert_eq!(put.status(), 204);
        let (_, r) = s
            .call(
                "POST",
                &format!("/v1/sessions/{id}/steps"),
                Some(&t),
                Some(json!({"code": "open('data/in.txt').read()"})),
            )
            .await;
        assert_eq!(r["result"], "payload");
        let got = reqwest::Client::new()
            .get(format!("{}/v1/sessions/{id}/files/data/in.txt", s.cp.url))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(got.text().await.unwrap(), "payload");
        let (status, body) = s
            .call(
                "GET",
                &format!("/v1/sessions/{id}/files/..%2F..%2Fetc%2Fpasswd"),
                Some(&t),
                None,
            )
            .await;
        assert_eq!(status, 400, "{body}");
        // Deleted: gone for good.
        let (status, _) = s
            .call("DELETE", &format!("/v1/sessions/{id}"), Some(&t), None)
            .await;
        assert_eq!(status, 204);
        let (status, _) = s
            .call("GET", &format!("/v1/sessions/{id}"), Some(&t), None)
            .await;
        assert_eq!(status, 404);
        // Audited: create, steps (ahead and after), file write, delete.
        let admin = token("acme", &["admin"]);
        let (_, audit) = s
            .call("GET", "/v1/audit?limit=1000", Some(&admin), None)
            .await;
        let actions: Vec<&str> = audit["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["action"].as_str().unwrap())
            .collect();
        for a in [
            "session.create",
            "step.run",
            "step.finish",
            "file.write",
            "session.delete",
        ] {
            assert!(actions.contains(&a), "{a} missing: {actions:?}");
        }
        let finish = audit["events"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["action"] == "step.finish")
            .unwrap();
        assert_eq!(finish["details"]["runtime"], "python");
        assert!(finish["details"]["durationMs"].is_number());
        assert!(
            !finish.to_string().contains("x = 20"),
            "a step's audit event never holds its code or output"
        );
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn bad_session_input_gets_coded_errors() {
    let s = stack(control_plane::config::DatabaseDriver::Sqlite, &[]).await;
    let t = token("acme", &["agent"]);
    for (body, status, code) in [
        (json!({"runtime": "cobol"}), 400, "unknown_runtime"),
        (
            json!({"limits": {"memoryMb": 1_000_000}}),
            400,
            "limit_exceeded",
        ),
        (json!({"colour": "red"}), 400, "invalid_json"),
        (json!({"egress": ["example.com"]}), 403, "policy_denied"),
    ] {
        let (got, resp) = s
            .call("POST", "/v1/sessions", Some(&t), Some(body.clone()))
            .await;
        assert_eq!(
            (got, resp["code"].as_str()),
            (status, Some(code)),
            "{body}: {resp}"
        );
    }
    let (status, resp) = s.call("GET", "/v1/sessions", Some(&t), None).await;
    assert_eq!(status, 200);
    assert_eq!(
        resp["sessions"].as_array().unwrap().len(),
        0,
        "nothing half-made"
    );
    s.stop().await;
}

/// Issue 15, section 6: one tenant's open event streams are capped (429
/// `tenant_quota_exceeded`), and the slot is freed when the stream ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn event_streams_are_capped_per_tenant() {
    let s = stack(
        control_plane::config::DatabaseDriver::Sqlite,
        &["--tenant-max-waiters", "1"],
    )
    .await;
    let t = token("acme", &["agent"]);
    let (status, session) = s
        .call(
            "POST",
            "/v1/sessions",
            Some(&t),
            Some(json!({"ttlSeconds": 300})),
        )
        .await;
    assert_eq!(status, 201, "{session}");
    let id = session["sessionId"].as_str().unwrap().to_owned();
    let stream = |code: &str| {
        reqwest::Client::new()
            .post(format!("{}/v1/sessions/{id}/steps", s.cp.url))
            .bearer_auth(&t)
            .header("accept", "text/event-stream")
            .json(&json!({"code": code}))
            .send()
    };
    let first = stream("import time\nprint('a', flush=True)\ntime.sleep(2)\n1")
        .await
        .unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(s.app.waiters.open("acme"), 1);
    let second = stream("2").await.unwrap();
    assert_eq!(second.status(), 429);
    let e: serde_json::Value = second.json().await.unwrap();
    assert_eq!(e["code"], "tenant_quota_exceeded", "{e}");
    let text = first.text().await.unwrap();
    assert!(text.contains("event: result"), "{text}");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while s.app.waiters.open("acme") > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the slot was never freed"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    s.stop().await;
}
