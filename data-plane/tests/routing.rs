//! The data plane in front of a real session agent (real gVisor sandboxes)
//! on loopback: the service credential, tenancy, routing of sessions, steps
//! and files, bad input, and an agent that is down.
#![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

use std::time::{Duration, Instant};

use clap::Parser;
use common::{SECRET, credential, credential_with, stack};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

mod common;

#[tokio::test]
async fn the_service_credential_is_required() {
    let s = stack(false, &[]).await;
    let good = credential("acme");
    let (st, body) = s
        .call("GET", "/internal/v1/runtimes", Some(&good), None)
        .await;
    assert_eq!(st, 200, "{body}");
    let names: Vec<&str> = body["runtimes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["bash", "node", "python"]);
    for (why, token) in [
        ("missing", None),
        (
            "expired",
            Some(credential_with("acme", SECRET, "data-plane", -3600)),
        ),
        (
            "wrong audience",
            Some(credential_with("acme", SECRET, "someone-else", 300)),
        ),
        (
            "wrong secret",
            Some(credential_with(
                "acme",
                "another-secret-another-secret-xx",
                "data-plane",
                300,
            )),
        ),
        ("garbage", Some("x.y.z".to_owned())),
    ] {
        for (m, p) in [
            ("GET", "/internal/v1/runtimes"),
            ("GET", "/internal/v1/sessions"),
            ("POST", "/internal/v1/sessions"),
        ] {
            let (st, e) = s.call(m, p, token.as_deref(), Some(json!({}))).await;
            assert_eq!(
                (st, e["code"].as_str()),
                (401, Some("unauthorized")),
                "{why} {m} {p}: {e}"
            );
        }
    }
    // Probes need no credential.
    assert_eq!(s.call("GET", "/healthz", None, None).await.0, 200);
    s.stop().await;
}

#[tokio::test]
async fn an_agent_that_is_down_gives_a_bounded_503() {
    let s = stack(false, &["--agent-timeout", "3s", "--ready-timeout", "3s"]).await;
    let cred = credential("acme");
    let started = Instant::now();
    let (st, e) = s
        .call(
            "POST",
            "/internal/v1/sessions",
            Some(&cred),
            Some(json!({"runtime": "python"})),
        )
        .await;
    assert_eq!(
        (st, e["code"].as_str()),
        (503, Some("sandbox_unavailable")),
        "{e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    let (st, e) = s.call("GET", "/readyz", None, None).await;
    assert_eq!(
        (st, e["code"].as_str()),
        (503, Some("sandbox_unavailable")),
        "{e}"
    );
    // Nothing half-made: no session was recorded.
    let (_, list) = s
        .call("GET", "/internal/v1/sessions", Some(&cred), None)
        .await;
    assert_eq!(list["sessions"], json!([]));
    s.stop().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn sessions_steps_and_files_are_routed_and_tenant_scoped() {
    let s = stack(true, &["--tenant-max-sessions", "2"]).await;
    assert_eq!(s.call("GET", "/readyz", None, None).await.0, 200);
    let acme = credential("acme");
    let globex = credential("globex");
    let (st, sess) = s
        .call(
            "POST",
            "/internal/v1/sessions",
            Some(&acme),
            Some(json!({"runtime": "python", "env": {"GREETING": "hej"}})),
        )
        .await;
    assert_eq!(st, 201, "{sess}");
    assert!(
        sess.get("token").is_none(),
        "the agent token must not leave the data plane: {sess}"
    );
    assert_eq!(sess["tenant"], json!("acme"));
    let id = sess["sessionId"].as_str().unwrap().to_owned();
    let steps = format!("/internal/v1/sessions/{id}/steps");

    let (st, r) = s
        .call(
            "POST",
            &steps,
            Some(&acme),
            Some(json!({"code": "x = 41\nimport os\nos.environ['GREETING']"})),
        )
        .await;
    assert_eq!((st, r["result"].clone()), (200, json!("hej")), "{r}");
    let (_, r) = s
        .call("POST", &steps, Some(&acme), Some(json!({"code": "x + 1"})))
        .await;
    assert_eq!(r["result"], json!(42));

    // Streaming passes through.
    let resp = s
        .http
        .post(format!("{}{steps}", s.dp))
        .bearer_auth(&acme)
        .header("accept", "text/event-stream")
        .json(&json!({"code": "print('a')\nprint('b')\n7"}))
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    assert!(text.contains("event: stdout"), "{text}");
    assert!(text.contains("event: result"), "{text}");
    assert!(text.contains("\"result\":7"), "{text}");

    // Files.
    let file = format!("{}/internal/v1/sessions/{id}/files/data/in.txt", s.dp);
    let st = s
        .http
        .put(&file)
        .bearer_auth(&acme)
        .body("from the dp")
        .send()
        .await
        .unwrap()
        .status();
    assert_eq!(st, 204);
    let (_, r) = s
        .call(
            "POST",
            &steps,
            Some(&acme),
            Some(json!({"code": "open('data/in.txt').read()"})),
        )
        .await;
    assert_eq!(r["result"], json!("from the dp"));
    let body = s
        .http
        .get(&file)
        .bearer_auth(&acme)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert_eq!(body, "from the dp");
    let (st, listing) = s
        .call(
            "GET",
            &format!("/internal/v1/sessions/{id}/files"),
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(
        (st, listing["files"][0]["path"].clone()),
        (200, json!("data")),
        "{listing}"
    );
    let (st, e) = s
        .call(
            "GET",
            &format!("/internal/v1/sessions/{id}/files/..%2f..%2fetc%2fpasswd"),
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(
        (st, e["code"].as_str()),
        (400, Some("path_outside_workspace")),
        "{e}"
    );

    // Another tenant sees nothing, touches nothing.
    for (m, p) in [
        ("GET", format!("/internal/v1/sessions/{id}")),
        ("POST", steps.clone()),
        (
            "GET",
            format!("/internal/v1/sessions/{id}/files/data/in.txt"),
        ),
        ("DELETE", format!("/internal/v1/sessions/{id}")),
    ] {
        let (st, e) = s
            .call(m, &p, Some(&globex), Some(json!({"code": "1"})))
            .await;
        assert_eq!(
            (st, e["code"].as_str()),
            (404, Some("session_not_found")),
            "{m} {p}: {e}"
        );
    }
    let (_, list) = s
        .call("GET", "/internal/v1/sessions", Some(&globex), None)
        .await;
    assert_eq!(list["sessions"], json!([]));
    let (_, list) = s
        .call("GET", "/internal/v1/sessions", Some(&acme), None)
        .await;
    assert_eq!(list["sessions"].as_array().unwrap().len(), 1);

    // The agent itself refuses calls without the session's token.
    let (st, _) = {
        let r = s
            .http
            .post(format!("{}/v1/steps", s.agent_url))
            .json(&json!({"sessionId": id, "stepId": "x", "code": "1"}))
            .send()
            .await
            .unwrap();
        (r.status().as_u16(), ())
    };
    assert_eq!(st, 401);

    // Quota: two sessions per tenant here.
    let (st, _) = s
        .call(
            "POST",
            "/internal/v1/sessions",
            Some(&acme),
            Some(json!({"runtime": "bash"})),
        )
        .await;
    assert_eq!(st, 201);
    let (st, e) = s
        .call(
            "POST",
            "/internal/v1/sessions",
            Some(&acme),
            Some(json!({"runtime": "bash"})),
        )
        .await;
    assert_eq!(
        (st, e["code"].as_str()),
        (429, Some("capacity_exhausted")),
        "{e}"
    );

    // Delete, then the session is gone.
    assert_eq!(
        s.call(
            "DELETE",
            &format!("/internal/v1/sessions/{id}"),
            Some(&acme),
            None
        )
        .await
        .0,
        204
    );
    let (st, e) = s
        .call("POST", &steps, Some(&acme), Some(json!({"code": "1"})))
        .await;
    assert_eq!(
        (st, e["code"].as_str()),
        (404, Some("session_not_found")),
        "{e}"
    );
    // Metrics saw all of it, labelled by route template, never by id.
    let metrics = s
        .http
        .get(format!("{}/metrics", s.dp))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "data_plane_sandbox_start_seconds_count{kind=\"cold\",runtime=\"python\"}",
        "data_plane_step_duration_seconds_count{runtime=\"python\",status=\"ok\"}",
        "route=\"/internal/v1/sessions/{id}/steps\"",
        "data_plane_sessions_active 1",
    ] {
        assert!(metrics.contains(needle), "{needle} not in:\n{metrics}");
    }
    assert!(
        !metrics.contains(&id),
        "a session id leaked into metric labels"
    );
    s.stop().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn bad_input_gets_coded_4xx() {
    let s = stack(true, &["--max-body-bytes", "65536"]).await;
    let cred = credential("acme");
    let cases: Vec<(Value, u16, &str, &str)> = vec![
        (
            json!({"runtime": "cobol"}),
            400,
            "unknown_runtime",
            "python",
        ),
        (
            json!({"runtime": "python", "limits": {"memoryMb": 1_000_000}}),
            400,
            "limit_exceeded",
            "memoryMb",
        ),
        (
            // No allowlist configured here: nothing is allowed.
            json!({"runtime": "python", "packages": ["requests"]}),
            403,
            "dependency_not_allowed",
            "requests",
        ),
        (
            json!({"runtime": "python", "gpus": 1}),
            400,
            "invalid_json",
            "gpus",
        ),
        (json!({"tenant": "globex"}), 403, "forbidden", "tenant"),
    ];
    for (body, status, code, mentions) in cases {
        let (st, e) = s
            .call(
                "POST",
                "/internal/v1/sessions",
                Some(&cred),
                Some(body.clone()),
            )
            .await;
        assert_eq!(
            (st, e["code"].as_str()),
            (status, Some(code)),
            "{body}: {e}"
        );
        assert!(
            e["message"].as_str().unwrap().contains(mentions),
            "{body}: {e}"
        );
    }
    let (st, e) = s
        .raw(
            "POST",
            "/internal/v1/sessions",
            &cred,
            b"{nope".to_vec(),
            "application/json",
        )
        .await;
    assert_eq!((st, e["code"].as_str()), (400, Some("invalid_json")), "{e}");
    let big = serde_json::to_vec(&json!({"code": "x".repeat(70_000)})).unwrap();
    let (st, e) = s
        .raw(
            "POST",
            "/internal/v1/sessions/ses-x/steps",
            &cred,
            big,
            "application/json",
        )
        .await;
    assert_eq!(
        (st, e["code"].as_str()),
        (413, Some("payload_too_large")),
        "{e}"
    );
    let (st, e) = s
        .call(
            "POST",
            "/internal/v1/sessions/ses-unknown/steps",
            Some(&cred),
            Some(json!({"code": "1"})),
        )
        .await;
    assert_eq!(
        (st, e["code"].as_str()),
        (404, Some("session_not_found")),
        "{e}"
    );
    // Nothing was created by any of it.
    let (_, list) = s
        .call("GET", "/internal/v1/sessions", Some(&cred), None)
        .await;
    assert_eq!(list["sessions"], json!([]));
    s.stop().await;
}

#[tokio::test]
async fn authz_bypass_takes_the_tenant_from_a_header() {
    let state = tempfile::tempdir().unwrap();
    let root = state.path().display().to_string();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dp = format!("http://{}", listener.local_addr().unwrap());
    let config = data_plane::Config::parse_from([
        "data-plane",
        "--authz-bypass",
        "true",
        "--artifact-root",
        &root,
    ]);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(data_plane::serve(listener, config, shutdown.clone()));
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let resp = loop {
        if let Ok(r) = http
            .get(format!("{dp}/internal/v1/sessions"))
            .header("x-tenant-id", "team-a")
            .send()
            .await
        {
            break r;
        }
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(resp.status().as_u16(), 200);
    shutdown.cancel();
    task.await.unwrap().unwrap();
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn artifacts_are_encrypted_streamed_tenant_scoped_and_shredded() {
    // A small body limit: artifacts are streamed and not bound by it.
    let s = stack(
        true,
        &[
            "--max-body-bytes",
            "65536",
            "--artifact-max-bytes",
            "1000000",
        ],
    )
    .await;
    let acme = credential("acme");
    let globex = credential("globex");
    let data: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let up = |name: &str, session: Option<&str>, body: Vec<u8>, cred: &str| {
        let mut url = format!("{}/internal/v1/artifacts?name={name}", s.dp);
        if let Some(sid) = session {
            url.push_str(&format!("&sessionId={sid}"));
        }
        s.http.post(url).bearer_auth(cred).body(body).send()
    };
    let resp = up("report.bin", None, data.clone(), &acme).await.unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let info: Value = resp.json().await.unwrap();
    let id = info["artifactId"].as_str().unwrap().to_owned();
    assert_eq!(info["size"], json!(300_000));
    use sha2::Digest;
    assert_eq!(
        info["sha256"].as_str().unwrap(),
        hex::encode(sha2::Sha256::digest(&data))
    );

    let resp = s
        .http
        .get(format!("{}/internal/v1/artifacts/{id}", s.dp))
        .bearer_auth(&acme)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert_eq!(
        resp.headers()["x-artifact-sha256"].to_str().unwrap(),
        info["sha256"].as_str().unwrap()
    );
    assert_eq!(resp.bytes().await.unwrap().to_vec(), data);

    // At rest: not the plaintext.
    let object = s.artifacts.join("objects/acme").join(&id);
    let raw = std::fs::read(&object).unwrap();
    assert!(!raw.windows(64).any(|w| w == &data[1000..1064]));

    // Another tenant: not found, whatever it tries.
    for (m, p) in [
        ("GET", format!("/internal/v1/artifacts/{id}")),
        ("GET", format!("/internal/v1/artifacts/{id}/info")),
        ("DELETE", format!("/internal/v1/artifacts/{id}")),
    ] {
        let (st, e) = s.call(m, &p, Some(&globex), None).await;
        assert_eq!(
            (st, e["code"].as_str()),
            (404, Some("artifact_not_found")),
            "{m} {p}: {e}"
        );
    }

    // Too large, and nothing left of it.
    let resp = up("big", None, vec![0u8; 1_200_000], &acme).await.unwrap();
    assert_eq!(resp.status().as_u16(), 413);
    assert_eq!(
        std::fs::read_dir(s.artifacts.join("objects/acme"))
            .unwrap()
            .count(),
        1
    );

    // Tampered at rest: an integrity error, never wrong bytes.
    let mut altered = raw.clone();
    altered[100] ^= 1;
    std::fs::write(&object, &altered).unwrap();
    let (st, e) = s
        .call(
            "GET",
            &format!("/internal/v1/artifacts/{id}"),
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(
        (st, e["code"].as_str()),
        (500, Some("integrity_error")),
        "{e}"
    );
    std::fs::write(&object, &raw).unwrap();

    // Delete: the key is destroyed, the object gone.
    assert_eq!(
        s.call(
            "DELETE",
            &format!("/internal/v1/artifacts/{id}"),
            Some(&acme),
            None
        )
        .await
        .0,
        204
    );
    let (st, _) = s
        .call(
            "GET",
            &format!("/internal/v1/artifacts/{id}"),
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(st, 404);
    assert!(!s.artifacts.join(format!("keys/acme/{id}.dek")).exists());
    assert!(!object.exists());

    // A session's artifacts go with the session; another tenant's upload
    // cannot claim the session.
    let (_, sess) = s
        .call(
            "POST",
            "/internal/v1/sessions",
            Some(&acme),
            Some(json!({"runtime": "bash"})),
        )
        .await;
    let sid = sess["sessionId"].as_str().unwrap().to_owned();
    let resp = up("out.txt", Some(&sid), b"session output".to_vec(), &globex)
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 404);
    let owned: Value = up("out.txt", Some(&sid), b"session output".to_vec(), &acme)
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let owned_id = owned["artifactId"].as_str().unwrap().to_owned();
    assert!(
        s.artifacts
            .join(format!("keys/acme/{owned_id}.dek"))
            .exists()
    );
    assert_eq!(
        s.call(
            "DELETE",
            &format!("/internal/v1/sessions/{sid}"),
            Some(&acme),
            None
        )
        .await
        .0,
        204
    );
    let (st, _) = s
        .call(
            "GET",
            &format!("/internal/v1/artifacts/{owned_id}/info"),
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(st, 404);
    assert!(
        !s.artifacts
            .join(format!("keys/acme/{owned_id}.dek"))
            .exists(),
        "the data key was not shredded"
    );
    s.stop().await;
}

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn one_shot_jobs_run_once_and_keep_their_output() {
    let s = stack(true, &[]).await;
    let acme = credential("acme");
    let globex = credential("globex");
    let code = "import os\nos.makedirs('output/sub', exist_ok=True)\nopen('output/report.txt', 'w').write('done')\nopen('output/sub/data.csv', 'w').write('a,b\\n1,2\\n')\nprint('working')\n6 * 7";
    let job = json!({"jobId": "job-1", "runtime": "python", "code": code});
    let (st, first) = s
        .call("POST", "/internal/v1/jobs", Some(&acme), Some(job.clone()))
        .await;
    assert_eq!(st, 200, "{first}");
    assert_eq!(first["status"], json!("ok"));
    assert_eq!(first["result"], json!(42));
    assert_eq!(first["stdout"], json!("working\n"));
    assert_eq!(first["replayed"], json!(false));
    let names: Vec<&str> = first["artifacts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["report.txt", "sub_data.csv"]);
    let report = first["artifacts"][0]["artifactId"].as_str().unwrap();
    let body = s
        .http
        .get(format!("{}/internal/v1/artifacts/{report}", s.dp))
        .bearer_auth(&acme)
        .send()
        .await
        .unwrap();
    assert_eq!(body.text().await.unwrap(), "done");

    // The sandbox is gone.
    let health: Value = s
        .http
        .get(format!("{}/v1/health", s.agent_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["sessions"], json!(0));

    // The same id again: the first result, not a second run.
    let (st, again) = s
        .call("POST", "/internal/v1/jobs", Some(&acme), Some(job.clone()))
        .await;
    assert_eq!(st, 200);
    assert_eq!(again["replayed"], json!(true));
    assert_eq!(again["artifacts"], first["artifacts"]);
    let (st, got) = s
        .call("GET", "/internal/v1/jobs/job-1", Some(&acme), None)
        .await;
    assert_eq!((st, got["result"].clone()), (200, json!(42)));

    // Another tenant: its own namespace of job ids.
    let (st, e) = s
        .call("GET", "/internal/v1/jobs/job-1", Some(&globex), None)
        .await;
    assert_eq!(
        (st, e["code"].as_str()),
        (404, Some("job_not_found")),
        "{e}"
    );
    let (_, theirs) = s
        .call("POST", "/internal/v1/jobs", Some(&globex), Some(job))
        .await;
    assert_eq!(theirs["replayed"], json!(false));
    assert_ne!(
        theirs["artifacts"][0]["artifactId"],
        first["artifacts"][0]["artifactId"]
    );

    // Concurrent submissions of one new id: exactly one run.
    let handler = json!({"jobId": "job-2", "runtime": "node", "mode": "handler",
        "code": "function handler(e) { return { sum: e.a + e.b }; }", "event": {"a": 2, "b": 3}});
    let calls = (0..5).map(|_| {
        s.call(
            "POST",
            "/internal/v1/jobs",
            Some(&acme),
            Some(handler.clone()),
        )
    });
    let results = futures::future::join_all(calls).await;
    let fresh = results
        .iter()
        .filter(|(_, r)| r["replayed"] == json!(false))
        .count();
    assert_eq!(fresh, 1, "{results:?}");
    for (st, r) in &results {
        assert_eq!((*st, r["result"].clone()), (200, json!({"sum": 5})), "{r}");
    }
    // Bad ids are refused before anything runs.
    let (st, e) = s
        .call(
            "POST",
            "/internal/v1/jobs",
            Some(&acme),
            Some(json!({"jobId": "../x", "code": "1"})),
        )
        .await;
    assert_eq!(
        (st, e["code"].as_str()),
        (400, Some("invalid_argument")),
        "{e}"
    );
    s.stop().await;
}

/// A caller that goes away mid-run (a control plane killed with -9) does
/// not cut the run short: the retry with the same id gets its result.
#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn a_job_outlives_a_caller_that_disconnects() {
    let s = stack(true, &[]).await;
    let acme = credential("acme");
    let job =
        json!({"jobId": "job-gone", "code": "import time\ntime.sleep(2)\nprint('finished')\n7"});
    let impatient = reqwest::Client::builder()
        .timeout(std::time::Duration::from_millis(700))
        .build()
        .unwrap();
    let dropped = impatient
        .post(format!("{}/internal/v1/jobs", s.dp))
        .bearer_auth(&acme)
        .json(&job)
        .send()
        .await;
    assert!(dropped.is_err(), "the first caller gave up before the end");
    let (status, r) = s
        .call("POST", "/internal/v1/jobs", Some(&acme), Some(job))
        .await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["stdout"], "finished\n", "{r}");
    assert_eq!(r["result"], 7);
    assert_eq!(
        r["replayed"], true,
        "the first run's result, not a second run"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_slow_agent_gives_a_bounded_503() {
    // An "agent" that accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let agent_url = format!("http://{}", silent.local_addr().unwrap());
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((sock, _)) = silent.accept().await {
            held.push(sock);
        }
    });
    let tmp = tempfile::tempdir().unwrap();
    let dp = common::dp_proc(
        &agent_url,
        tmp.path(),
        &["--ready-timeout", "2s", "--agent-timeout", "2s"],
    )
    .await;
    let cred = credential("acme");
    let started = Instant::now();
    let (st, e) = common::call_at(
        &dp.url,
        "POST",
        "/internal/v1/sessions",
        Some(&cred),
        Some(json!({})),
    )
    .await;
    assert_eq!(
        (st, e["code"].as_str()),
        (503, Some("sandbox_unavailable")),
        "{e}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "took {:?}",
        started.elapsed()
    );
    let started = Instant::now();
    let (st, _) = common::call_at(&dp.url, "GET", "/readyz", None, None).await;
    assert_eq!(st, 503);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "readyz took {:?}",
        started.elapsed()
    );
    dp.stop().await;
    hold.abort();
}

/// Issue 15: the agent creates sessions only for the data plane's credential.
/// A data plane holding the wrong one gets a 503 naming no secret (the
/// caller's credential was fine: never a 401), and leaves nothing behind.
#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn the_agent_refuses_a_data_plane_with_the_wrong_credential() {
    let wrong = "not-the-agent-admin-credential-0123456789abcdef";
    let s = stack(true, &["--agent-admin-token", wrong]).await;
    let cred = credential("acme");
    let (st, e) = s
        .call(
            "POST",
            "/internal/v1/sessions",
            Some(&cred),
            Some(json!({"runtime": "bash"})),
        )
        .await;
    assert_eq!(
        (st, e["code"].as_str()),
        (503, Some("sandbox_unavailable")),
        "{e}"
    );
    let text = e.to_string();
    assert!(!text.contains(wrong) && !text.contains(common::AGENT_ADMIN));
    let (_, list) = s
        .call("GET", "/internal/v1/sessions", Some(&cred), None)
        .await;
    assert_eq!(list["sessions"], json!([]));
    let health: Value = s
        .http
        .get(format!("{}/v1/health", s.agent_url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(health["sessions"], json!(0));
    s.stop().await;
}
