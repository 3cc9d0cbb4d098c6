//! Jobs through the whole stack, on SQLite and on PostgreSQL: results,
//! idempotency, listing, cancellation, an unavailable data plane, several
//! replicas on one queue, and a control plane killed mid-job. Integration
//! tier: every test here runs real sandboxes (`make test-integration`).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use control_plane::config::DatabaseDriver;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root, and PostgreSQL on 127.0.0.1:5432 (make deps; make test-integration)"]
async fn a_job_runs_and_its_output_is_kept() {
    for driver in DRIVERS {
        let s = stack(driver, &[]).await;
        let t = token("acme", &["agent"]);
        let (status, job) = s
            .call(
                "POST",
                "/v1/jobs",
                Some(&t),
                Some(json!({
                    "code": "import os\nos.makedirs('output', exist_ok=True)\nopen('output/r.txt','w').write('hi')\nprint('out')\n6*7",
                    "labels": {"team": "ml"},
                })),
            )
            .await;
        assert_eq!(status, 202, "{driver:?}: {job}");
        assert_eq!(job["status"], "queued");
        let id = job["jobId"].as_str().unwrap().to_owned();
        let done = wait_job(&s.cp.url, &t, &id, 60).await;
        assert_eq!(done["status"], "succeeded", "{driver:?}: {done}");
        assert_eq!(done["output"]["result"], 42);
        assert_eq!(done["output"]["stdout"], "out\n");
        assert_eq!(done["attempts"], 1);
        // The artifact is the caller's to fetch, nobody else's.
        let artifact = done["output"]["artifacts"][0]["artifactId"]
            .as_str()
            .unwrap()
            .to_owned();
        let resp = reqwest::Client::new()
            .get(format!("{}/v1/artifacts/{artifact}", s.cp.url))
            .bearer_auth(&t)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.text().await.unwrap(), "hi");
        let other = token("globex", &["agent"]);
        let (status, body) = s
            .call(
                "GET",
                &format!("/v1/artifacts/{artifact}"),
                Some(&other),
                None,
            )
            .await;
        assert_eq!(status, 404, "{body}");
        let (status, _) = s
            .call("GET", &format!("/v1/jobs/{id}"), Some(&other), None)
            .await;
        assert_eq!(status, 404);
        // A failing job fails with the reason.
        let (_, job) = s
            .call("POST", "/v1/jobs", Some(&t), Some(json!({"code": "1/0"})))
            .await;
        let failed = wait_job(&s.cp.url, &t, job["jobId"].as_str().unwrap(), 60).await;
        assert_eq!(failed["status"], "failed");
        assert_eq!(failed["error"]["code"], "execution_error");
        assert!(
            failed["error"]["message"]
                .as_str()
                .unwrap()
                .contains("ZeroDivisionError")
        );
        // The lifecycle is audited.
        let admin = token("acme", &["admin"]);
        let (_, audit) = s
            .call(
                "GET",
                &format!("/v1/audit?resource=job/{id}"),
                Some(&admin),
                None,
            )
            .await;
        let actions: Vec<&str> = audit["events"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["action"].as_str().unwrap())
            .collect();
        assert_eq!(
            actions,
            ["job.submit", "job.start", "job.finish"],
            "{audit}"
        );
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root, and PostgreSQL on 127.0.0.1:5432 (make deps; make test-integration)"]
async fn idempotency_keys_replay_refuse_and_deduplicate() {
    for driver in DRIVERS {
        let s = stack(driver, &[]).await;
        let t = token("acme", &["agent"]);
        let body = json!({"code": "1+1"});
        let first = call_full(
            &s.cp.url,
            "POST",
            "/v1/jobs",
            Some(&t),
            Some(body.clone()),
            &[("idempotency-key", "k-1")],
        )
        .await;
        assert_eq!(first.0, 202, "{}", first.2);
        assert!(first.1.get("idempotent-replayed").is_none());
        let again = call_full(
            &s.cp.url,
            "POST",
            "/v1/jobs",
            Some(&t),
            Some(body.clone()),
            &[("idempotency-key", "k-1")],
        )
        .await;
        assert_eq!(again.0, 202);
        assert_eq!(again.1["idempotent-replayed"], "true");
        assert_eq!(again.2, first.2, "the replay is the first response");
        // Same key, other body: 422.
        let other = call_full(
            &s.cp.url,
            "POST",
            "/v1/jobs",
            Some(&t),
            Some(json!({"code": "2+2"})),
            &[("idempotency-key", "k-1")],
        )
        .await;
        assert_eq!(other.0, 422, "{}", other.2);
        assert_eq!(other.2["code"], "idempotency_key_reused");
        // The body's requestId is the same key.
        let via_body = call_full(
            &s.cp.url,
            "POST",
            "/v1/jobs",
            Some(&t),
            Some(json!({"code": "1+1", "requestId": "k-2"})),
            &[],
        )
        .await;
        assert_eq!(via_body.0, 202);
        // Keys are per tenant: globex's k-1 is a new job.
        let g = token("globex", &["agent"]);
        let theirs = call_full(
            &s.cp.url,
            "POST",
            "/v1/jobs",
            Some(&g),
            Some(body.clone()),
            &[("idempotency-key", "k-1")],
        )
        .await;
        assert_eq!(theirs.0, 202);
        assert_ne!(theirs.2["jobId"], first.2["jobId"]);
        // A bad key is refused.
        let bad = call_full(
            &s.cp.url,
            "POST",
            "/v1/jobs",
            Some(&t),
            Some(body.clone()),
            &[("idempotency-key", "has space")],
        )
        .await;
        assert_eq!(bad.0, 400);

        // 50 concurrent submissions with one key: exactly one job.
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let url = s.cp.url.clone();
            let t = t.clone();
            tasks.push(tokio::spawn(async move {
                call_full(
                    &url,
                    "POST",
                    "/v1/jobs",
                    Some(&t),
                    Some(json!({"code": "3+3"})),
                    &[("idempotency-key", "burst")],
                )
                .await
            }));
        }
        let mut ids = std::collections::HashSet::new();
        let mut replays = 0;
        for task in tasks {
            let (status, headers, body) = task.await.unwrap();
            match status {
                202 => {
                    ids.insert(body["jobId"].as_str().unwrap().to_owned());
                    if headers.get("idempotent-replayed").is_some() {
                        replays += 1;
                    }
                }
                409 => assert_eq!(body["code"], "idempotency_in_progress"),
                other => panic!("{driver:?}: unexpected {other}: {body}"),
            }
        }
        assert_eq!(ids.len(), 1, "{driver:?}: {ids:?}");
        assert!(replays >= 1);
        let (_, list) = s.call("GET", "/v1/jobs?limit=500", Some(&t), None).await;
        let burst: Vec<&Value> = list["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|j| j["jobId"] == json!(ids.iter().next().unwrap()))
            .collect();
        assert_eq!(burst.len(), 1);
        let total = list["jobs"].as_array().unwrap().len();
        assert_eq!(total, 3, "acme has k-1, k-2 and burst: {list}");
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root, and PostgreSQL on 127.0.0.1:5432 (make deps; make test-integration)"]
async fn listing_filters_and_pages() {
    for driver in DRIVERS {
        let s = stack(driver, &[]).await;
        let t = token("acme", &["agent"]);
        let mut ids = Vec::new();
        for n in 0..5 {
            let team = if n % 2 == 0 { "a" } else { "b" };
            let (status, job) = s
                .call(
                    "POST",
                    "/v1/jobs",
                    Some(&t),
                    Some(json!({"code": format!("{n}"), "labels": {"team": team}})),
                )
                .await;
            assert_eq!(status, 202);
            ids.push(job["jobId"].as_str().unwrap().to_owned());
        }
        for id in &ids {
            wait_job(&s.cp.url, &t, id, 60).await;
        }
        let (_, a) = s.call("GET", "/v1/jobs?label=team=a", Some(&t), None).await;
        assert_eq!(a["jobs"].as_array().unwrap().len(), 3, "{a}");
        let (_, ok) = s
            .call("GET", "/v1/jobs?status=succeeded", Some(&t), None)
            .await;
        assert_eq!(ok["jobs"].as_array().unwrap().len(), 5);
        // Pages of two, newest first, no overlap, all five.
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let path = match &cursor {
                Some(c) => format!("/v1/jobs?limit=2&cursor={c}"),
                None => "/v1/jobs?limit=2".into(),
            };
            let (status, page) = s.call("GET", &path, Some(&t), None).await;
            assert_eq!(status, 200, "{page}");
            for j in page["jobs"].as_array().unwrap() {
                seen.push(j["jobId"].as_str().unwrap().to_owned());
            }
            match page["nextCursor"].as_str() {
                Some(c) => cursor = Some(c.to_owned()),
                None => break,
            }
        }
        let mut expected = ids.clone();
        expected.reverse();
        assert_eq!(seen, expected);
        for (path, code) in [
            ("/v1/jobs?status=done", "invalid_argument"),
            ("/v1/jobs?label=nolabel", "invalid_argument"),
            ("/v1/jobs?cursor=garbage!", "invalid_argument"),
            ("/v1/jobs?limit=0", "invalid_argument"),
            ("/v1/jobs?colour=red", "invalid_argument"),
        ] {
            let (status, body) = s.call("GET", path, Some(&t), None).await;
            assert_eq!(status, 400, "{path}: {body}");
            assert!(
                body["code"] == code || body["code"] == "invalid_json",
                "{path}: {body}"
            );
        }
        // Another tenant sees none of them.
        let (_, none) = s
            .call("GET", "/v1/jobs", Some(&token("globex", &[])), None)
            .await;
        assert_eq!(none["jobs"].as_array().unwrap().len(), 0);
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn cancellation_reaches_the_data_plane() {
    let s = stack(DatabaseDriver::Sqlite, &[]).await;
    let t = token("acme", &["agent"]);
    let (_, job) = s
        .call(
            "POST",
            "/v1/jobs",
            Some(&t),
            Some(json!({"code": "import time\ntime.sleep(60)", "timeoutMs": 90000})),
        )
        .await;
    let id = job["jobId"].as_str().unwrap().to_owned();
    // Wait until it runs.
    wait_running(&s.cp.url, &t, &id).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = std::time::Instant::now();
    let (status, body) = s
        .call("POST", &format!("/v1/jobs/{id}/cancel"), Some(&t), None)
        .await;
    assert_eq!(status, 200, "{body}");
    let done = wait_job(&s.cp.url, &t, &id, 20).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(started.elapsed() < Duration::from_secs(20));
    // No sandbox left behind.
    let (_, sessions) = s.call("GET", "/v1/sessions", Some(&t), None).await;
    assert_eq!(
        sessions["sessions"].as_array().unwrap().len(),
        0,
        "{sessions}"
    );
    // Finished: 409. Unknown: 404.
    let (status, body) = s
        .call("POST", &format!("/v1/jobs/{id}/cancel"), Some(&t), None)
        .await;
    assert_eq!((status, body["code"].as_str()), (409, Some("job_finished")));
    let (status, _) = s
        .call("POST", "/v1/jobs/job_nope/cancel", Some(&t), None)
        .await;
    assert_eq!(status, 404);
    s.stop().await;
}

/// The data plane is down: the job waits in the queue and runs once it is
/// back; the synchronous calls get 503 `data_plane_unavailable`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn a_job_survives_an_unavailable_data_plane() {
    let state = tempfile::Builder::new()
        .prefix("cp-dpdown-")
        .tempdir_in("/tmp")
        .unwrap();
    let agent = agent_proc(&state.path().join("agent"), &[]).await;
    // Reserve an address for the data plane, then leave it closed.
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().to_string()
    };
    let db = TestDb::new(DatabaseDriver::Sqlite).await;
    let (cp, _app) = cp_proc(&db, &format!("http://{addr}"), &[]).await;
    let t = token("acme", &["agent"]);
    let (status, job) = call_at(
        &cp.url,
        "POST",
        "/v1/jobs",
        Some(&t),
        Some(json!({"code": "21*2"})),
    )
    .await;
    assert_eq!(status, 202, "{job}");
    let id = job["jobId"].as_str().unwrap().to_owned();
    let (status, body) = call_at(&cp.url, "POST", "/v1/sessions", Some(&t), Some(json!({}))).await;
    assert_eq!(
        (status, body["code"].as_str()),
        (503, Some("data_plane_unavailable")),
        "{body}"
    );
    let (status, _) = call_at(&cp.url, "GET", "/readyz", None, None).await;
    assert_eq!(status, 503);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, j) = call_at(&cp.url, "GET", &format!("/v1/jobs/{id}"), Some(&t), None).await;
    assert_eq!(
        j["status"], "queued",
        "kept while the data plane is down: {j}"
    );
    assert!(j["attempts"].as_u64().unwrap() >= 1, "{j}");
    let dp = dp_proc(&agent.url, &state.path().join("dp"), Some(&addr)).await;
    let done = wait_job(&cp.url, &t, &id, 60).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["output"]["result"], 42);
    cp.stop().await;
    dp.stop().await;
    agent.stop().await;
}

/// Two control planes on one PostgreSQL queue: every job runs exactly once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root, and PostgreSQL on 127.0.0.1:5432 (make deps; make test-integration)"]
async fn replicas_share_the_postgres_queue() {
    let state = tempfile::Builder::new()
        .prefix("cp-replicas-")
        .tempdir_in("/tmp")
        .unwrap();
    let agent = agent_proc(&state.path().join("agent"), &["--warm-pool", "python=4"]).await;
    let dp = dp_proc(&agent.url, &state.path().join("dp"), None).await;
    let db = TestDb::new(DatabaseDriver::Postgres).await;
    let (a, _) = cp_proc(&db, &dp.url, &["--job-workers", "2"]).await;
    let (b, _) = cp_proc(&db, &dp.url, &["--job-workers", "2"]).await;
    let t = token("acme", &["agent"]);
    let mut ids = Vec::new();
    for n in 0..12 {
        let base = if n % 2 == 0 { &a.url } else { &b.url };
        let (status, job) = call_at(
            base,
            "POST",
            "/v1/jobs",
            Some(&t),
            Some(json!({"code": format!("{n}*2")})),
        )
        .await;
        assert_eq!(status, 202);
        ids.push(job["jobId"].as_str().unwrap().to_owned());
    }
    for (n, id) in ids.iter().enumerate() {
        let done = wait_job(&a.url, &t, id, 90).await;
        assert_eq!(done["status"], "succeeded", "{done}");
        assert_eq!(done["output"]["result"], json!(n * 2));
        assert_eq!(done["attempts"], 1, "dispatched once: {done}");
    }
    // The audit shows one start per job, from either replica.
    let admin = token("acme", &["admin"]);
    let (_, audit) = call_at(
        &a.url,
        "GET",
        "/v1/audit?action=job.start&limit=1000",
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(audit["events"].as_array().unwrap().len(), 12);
    let (_, verify) = call_at(&b.url, "GET", "/v1/audit/verify", Some(&admin), None).await;
    assert_eq!(verify["ok"], true, "{verify}");
    a.stop().await;
    b.stop().await;
    dp.stop().await;
    agent.stop().await;
    db.cleanup().await;
}

/// kill -9 of the control plane while a job runs; after a restart the job
/// ends exactly once, with its result.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root, and PostgreSQL on 127.0.0.1:5432 (make deps; make test-integration)"]
async fn a_killed_control_plane_finishes_the_job_once() {
    for driver in DRIVERS {
        let state = tempfile::Builder::new()
            .prefix("cp-kill-")
            .tempdir_in("/tmp")
            .unwrap();
        let agent = agent_proc(&state.path().join("agent"), &[]).await;
        let dp = dp_proc(&agent.url, &state.path().join("dp"), None).await;
        let db = TestDb::new(driver).await;
        // Creates the Postgres schema the process will use.
        db.connect().await.close().await;
        let mut cp = CpProcess::start(&db, &dp.url).await;
        let t = token("acme", &["agent"]);
        let (status, job) = call_at(
            &cp.url,
            "POST",
            "/v1/jobs",
            Some(&t),
            Some(json!({"code": "import time\ntime.sleep(3)\nprint('ran')\n7"})),
        )
        .await;
        assert_eq!(status, 202, "{job}");
        let id = job["jobId"].as_str().unwrap().to_owned();
        // Kill it while the job runs in the data plane.
        wait_running(&cp.url, &t, &id).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        cp.kill9();
        // Restart: the lease (3 s) expires, the job is claimed again with the
        // same id, and the data plane replays the first run's result.
        let cp2 = CpProcess::start(&db, &dp.url).await;
        let done = wait_job(&cp2.url, &t, &id, 60).await;
        assert_eq!(done["status"], "succeeded", "{driver:?}: {done}");
        assert_eq!(done["output"]["result"], 7);
        assert_eq!(done["output"]["stdout"], "ran\n");
        assert_eq!(done["attempts"], 2, "{done}");
        let admin = token("acme", &["admin"]);
        let (_, audit) = call_at(
            &cp2.url,
            "GET",
            &format!("/v1/audit?resource=job/{id}"),
            Some(&admin),
            None,
        )
        .await;
        let finishes = audit["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "job.finish")
            .count();
        assert_eq!(finishes, 1, "{audit}");
        let (_, verify) = call_at(&cp2.url, "GET", "/v1/audit/verify", Some(&admin), None).await;
        assert_eq!(verify["ok"], true, "{verify}");
        drop(cp2);
        dp.stop().await;
        agent.stop().await;
        db.cleanup().await;
    }
}

/// A job whose worker was lost as many times as it may be dispatched fails
/// with a reason instead of running again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn a_job_out_of_attempts_fails_with_a_reason() {
    let state = tempfile::Builder::new()
        .prefix("cp-attempts-")
        .tempdir_in("/tmp")
        .unwrap();
    let agent = agent_proc(&state.path().join("agent"), &[]).await;
    let dp = dp_proc(&agent.url, &state.path().join("dp"), None).await;
    let db = TestDb::new(DatabaseDriver::Sqlite).await;
    let mut cp = CpProcess::start_with(&db, &dp.url, &["--job-max-attempts", "1"]).await;
    let t = token("acme", &["agent"]);
    let (_, job) = call_at(
        &cp.url,
        "POST",
        "/v1/jobs",
        Some(&t),
        Some(json!({"code": "import time\ntime.sleep(2)\n1"})),
    )
    .await;
    let id = job["jobId"].as_str().unwrap().to_owned();
    wait_running(&cp.url, &t, &id).await;
    cp.kill9();
    let cp2 = CpProcess::start_with(&db, &dp.url, &["--job-max-attempts", "1"]).await;
    let done = wait_job(&cp2.url, &t, &id, 60).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "lease_expired", "{done}");
    assert_eq!(done["attempts"], 1);
    drop(cp2);
    dp.stop().await;
    agent.stop().await;
}

/// The control-plane binary as a child process (so it can be killed -9).
struct CpProcess {
    url: String,
    child: std::process::Child,
}

impl CpProcess {
    async fn start(db: &TestDb, dp_url: &str) -> CpProcess {
        Self::start_with(db, dp_url, &[]).await
    }

    async fn start_with(db: &TestDb, dp_url: &str, extra: &[&str]) -> CpProcess {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr = format!("127.0.0.1:{port}");
        let mut flags = vec!["--addr", addr.as_str()];
        flags.extend_from_slice(extra);
        let mut args = cp_args(db, dp_url, &flags);
        args.remove(0);
        let mut url = db.url.clone();
        if let Some(schema) = &db.schema {
            url = format!("{url}?options=-c%20search_path%3D{schema}");
        }
        // The URL with the schema replaces the plain one.
        let pos = args.iter().position(|a| a == "--database-url").unwrap();
        args[pos + 1] = url;
        #[allow(
            clippy::disallowed_methods,
            reason = "the test runs the real binary to kill it"
        )]
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_control-plane"))
            .args(&args)
            .env("RUST_LOG", "warn")
            .spawn()
            .unwrap();
        let url = format!("http://{addr}");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while reqwest::get(format!("{url}/healthz")).await.is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "control plane did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        CpProcess { url, child }
    }

    fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for CpProcess {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Issue 15, section 5: one tenant flooding the queue neither fills it for
/// everyone (its queued jobs are capped: 429 `tenant_quota_exceeded`) nor
/// starves another tenant: with two workers and one tenant at its running
/// cap, the other tenant's `1+1` is claimed ahead of the flood's older
/// queued jobs and finishes while they still wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root, and PostgreSQL on 127.0.0.1:5432 (make deps; make test-integration)"]
async fn one_tenant_cannot_starve_the_others() {
    for driver in DRIVERS {
        let s = stack(
            driver,
            &[
                "--job-workers",
                "2",
                "--job-tenant-max-running",
                "1",
                "--job-tenant-max-queued",
                "3",
            ],
        )
        .await;
        let flood = token("mallory", &["agent"]);
        let victim = token("acme", &["agent"]);
        let submit = |t: String, code: &'static str| {
            let url = s.cp.url.clone();
            async move {
                call_at(
                    &url,
                    "POST",
                    "/v1/jobs",
                    Some(&t),
                    Some(json!({"code": code})),
                )
                .await
            }
        };
        let (status, first) = submit(flood.clone(), "import time\ntime.sleep(4)").await;
        assert_eq!(status, 202, "{first}");
        let first = first["jobId"].as_str().unwrap().to_owned();
        wait_running(&s.cp.url, &flood, &first).await;
        let mut queued = Vec::new();
        for _ in 0..3 {
            let (status, job) = submit(flood.clone(), "import time\ntime.sleep(4)").await;
            assert_eq!(status, 202, "{driver:?}: {job}");
            queued.push(job["jobId"].as_str().unwrap().to_owned());
        }
        let (status, e) = submit(flood.clone(), "1").await;
        assert_eq!(
            (status, e["code"].as_str()),
            (429, Some("tenant_quota_exceeded")),
            "{driver:?}: {e}"
        );
        let (status, job) = submit(victim.clone(), "1+1").await;
        assert_eq!(status, 202, "{job}");
        let done = wait_job(&s.cp.url, &victim, job["jobId"].as_str().unwrap(), 60).await;
        assert_eq!(done["status"], "succeeded", "{driver:?}: {done}");
        assert_eq!(done["output"]["result"], 2);
        // Structural: the flood's queued jobs had not even started.
        for id in &queued {
            let (_, j) = call_at(
                &s.cp.url,
                "GET",
                &format!("/v1/jobs/{id}"),
                Some(&flood),
                None,
            )
            .await;
            assert_eq!(j["status"], "queued", "{driver:?}: {j}");
        }
        s.stop().await;
    }
}

/// Issue 15, section 6: one tenant's long polls are capped (429
/// `tenant_quota_exceeded`), a plain read and other tenants are not, and a
/// slot is freed when its poll ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn long_polls_are_capped_per_tenant() {
    let s = stack(DatabaseDriver::Sqlite, &["--tenant-max-waiters", "2"]).await;
    let t = token("mallory", &["agent"]);
    let (status, job) = s
        .call(
            "POST",
            "/v1/jobs",
            Some(&t),
            Some(json!({"code": "import time\ntime.sleep(30)"})),
        )
        .await;
    assert_eq!(status, 202, "{job}");
    let id = job["jobId"].as_str().unwrap().to_owned();
    let polls: Vec<_> = (0..2)
        .map(|_| {
            let (url, t, id) = (s.cp.url.clone(), t.clone(), id.clone());
            tokio::spawn(async move {
                call_at(
                    &url,
                    "GET",
                    &format!("/v1/jobs/{id}?waitMs=60000"),
                    Some(&t),
                    None,
                )
                .await
            })
        })
        .collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while s.app.waiters.open("mallory") < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "the polls never opened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (status, e) = s
        .call("GET", &format!("/v1/jobs/{id}?waitMs=1000"), Some(&t), None)
        .await;
    assert_eq!(
        (status, e["code"].as_str()),
        (429, Some("tenant_quota_exceeded")),
        "{e}"
    );
    let (status, _) = s
        .call("GET", &format!("/v1/jobs/{id}"), Some(&t), None)
        .await;
    assert_eq!(status, 200);
    let other = token("acme", &["agent"]);
    let (status, e) = s
        .call(
            "GET",
            &format!("/v1/jobs/{id}?waitMs=100"),
            Some(&other),
            None,
        )
        .await;
    assert_eq!(
        (status, e["code"].as_str()),
        (404, Some("job_not_found")),
        "{e}"
    );
    let (status, _) = s
        .call("POST", &format!("/v1/jobs/{id}/cancel"), Some(&t), None)
        .await;
    assert!(status < 300, "{status}");
    for p in polls {
        let (status, _) = p.await.unwrap();
        assert_eq!(status, 200);
    }
    assert_eq!(s.app.waiters.open("mallory"), 0);
    s.stop().await;
}
