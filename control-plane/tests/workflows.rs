//! Workflows through the whole stack (issue 19, section 1): the smallest
//! plan, inputs and outputs as artifacts, a failing step with and without
//! `continueOnError`, teardown, idempotency, malformed plans, cancellation,
//! and a control plane killed mid-step. The malformed-plan and idempotency
//! tests need no sandbox (a data plane without an agent); the rest are the
//! integration tier (real gVisor).
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use control_plane::config::DatabaseDriver;
use serde_json::{Value, json};

/// The smallest plan.
fn smallest() -> Value {
    json!({"runtime": "python", "steps": [{"code": "x = 41"}, {"code": "print(x + 1)"}]})
}

/// Long-polls a workflow until it is final (fails the test after `secs`).
async fn wait_workflow(base: &str, auth: &str, id: &str, secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (status, w) = call_at(
            base,
            "GET",
            &format!("/v1/workflows/{id}?waitMs=2000"),
            Some(auth),
            None,
        )
        .await;
        assert_eq!(status, 200, "{w}");
        let s = w["status"].as_str().unwrap_or_default();
        if matches!(s, "succeeded" | "failed" | "cancelled") {
            return w;
        }
        assert!(
            Instant::now() < deadline,
            "workflow {id} still {s} after {secs}s: {w}"
        );
    }
}

/// Polls until step `idx` is recorded `running` (fails after 60 s).
async fn wait_step_running(base: &str, auth: &str, id: &str, idx: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, w) = call_at(
            base,
            "GET",
            &format!("/v1/workflows/{id}"),
            Some(auth),
            None,
        )
        .await;
        if w["steps"][idx]["status"] == "running" {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "steps[{idx}] of {id} never ran: {w}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn statuses(w: &Value) -> Vec<String> {
    w["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["status"].as_str().unwrap().to_owned())
        .collect()
}

/// The session is gone from the data plane (asked through the API).
async fn assert_torn_down(base: &str, auth: &str, w: &Value) {
    let sid = w["sessionId"].as_str().unwrap();
    let (status, body) = call_at(
        base,
        "GET",
        &format!("/v1/sessions/{sid}"),
        Some(auth),
        None,
    )
    .await;
    assert_eq!(status, 404, "the session outlived its workflow: {body}");
    assert_eq!(body["code"], "session_not_found");
    assert!(
        matches!(w["teardown"]["outcome"].as_str(), Some("deleted" | "gone")),
        "{w}"
    );
}

/// A data plane without an agent in front of a control plane: plans are
/// checked against the real runtime registry, nothing can run.
struct NoSandboxes {
    dp: Proc,
    cp: Proc,
    db: TestDb,
    _state: tempfile::TempDir,
}

impl NoSandboxes {
    async fn start() -> NoSandboxes {
        let state = tempfile::Builder::new()
            .prefix("cp-wf-")
            .tempdir_in("/tmp")
            .unwrap();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let agent = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let dp = dp_proc(&agent, &state.path().join("dp"), None).await;
        let db = TestDb::new(DatabaseDriver::Sqlite).await;
        let (cp, _) = cp_proc(&db, &dp.url, &[]).await;
        NoSandboxes {
            dp,
            cp,
            db,
            _state: state,
        }
    }

    async fn stop(self) {
        self.cp.stop().await;
        self.dp.stop().await;
        self.db.cleanup().await;
    }
}

/// Every malformed plan the issue names is a 400 with a stable code whose
/// message (and `details.field`) names the bad step, file or field; none
/// leaves a workflow behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_plans_are_400_naming_the_step() {
    let s = NoSandboxes::start().await;
    let t = token("acme", &["agent"]);
    let step = |code: &str| json!({"code": code});
    let many: Vec<Value> = (0..65).map(|_| step("1")).collect();
    let cases: Vec<(Value, &str, &str)> = vec![
        (json!({"steps": []}), "invalid_argument", "steps"),
        (json!({"runtime": "python"}), "invalid_json", "steps"),
        (json!({"steps": many}), "invalid_argument", "steps"),
        (
            json!({"steps": [step("1"), step("")]}),
            "invalid_argument",
            "steps[1].code",
        ),
        (
            json!({"steps": [step("1"), step("1"), step("1"), step(&"x".repeat(256 * 1024 + 1))]}),
            "invalid_argument",
            "steps[3].code",
        ),
        (
            json!({"steps": [step("1"), {"code": "1", "colour": "red"}]}),
            "invalid_json",
            "steps[1]",
        ),
        (
            json!({"steps": [step("1")], "colour": "red"}),
            "invalid_json",
            "colour",
        ),
        (
            json!({"runtime": "cobol", "steps": [step("1")]}),
            "unknown_runtime",
            "cobol",
        ),
        (
            json!({"steps": [step("1"), {"code": "1", "timeoutMs": 0}]}),
            "invalid_argument",
            "steps[1].timeoutMs",
        ),
        (
            json!({"steps": [step("1"), step("2"), {"code": "1", "timeoutMs": 3_600_000}]}),
            "limit_exceeded",
            "steps[2].timeoutMs",
        ),
        (
            json!({"steps": [step("1")], "files": [{"path": "../x", "content": "a"}]}),
            "path_outside_workspace",
            "files[0].path",
        ),
        (
            json!({"steps": [step("1")], "outputs": ["ok.txt", "/etc/passwd"]}),
            "path_outside_workspace",
            "outputs[1]",
        ),
        (
            json!({"steps": [step("1")], "files": [{"path": "a", "content": "***", "encoding": "base64"}]}),
            "invalid_argument",
            "files[0].content",
        ),
    ];
    for (body, code, names) in cases {
        let (status, e) = s.call_v1(&t, body.clone()).await;
        assert_eq!(status, 400, "{body}: {e}");
        assert_eq!(e["code"], code, "{body}: {e}");
        let msg = e["message"].as_str().unwrap();
        assert!(msg.contains(names), "{names} not named: {msg}");
    }
    // Egress and secrets are refused by the bundled policy (a secret name
    // that is not an env var name is a 400 before policy: unit tests).
    for extra in [
        json!({"egress": ["example.com"]}),
        json!({"secrets": ["DB"]}),
    ] {
        let mut body = smallest();
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (status, e) = s.call_v1(&t, body).await;
        assert_eq!(status, 403, "{e}");
        assert_eq!(e["code"], "policy_denied");
    }
    // Nothing was queued by any of them.
    let (status, list) = call_at(&s.cp.url, "GET", "/v1/workflows", Some(&t), None).await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["workflows"], json!([]), "{list}");
    s.stop().await;
}

impl NoSandboxes {
    async fn call_v1(&self, t: &str, body: Value) -> (u16, Value) {
        call_at(&self.cp.url, "POST", "/v1/workflows", Some(t), Some(body)).await
    }
}

/// Idempotency like jobs (replay with `Idempotent-Replayed: true`, another
/// plan -> 422, keys per tenant), reads scoped by tenant, listing with a
/// cursor and a status filter, and cancellation of a queued workflow.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idempotent_submission_tenancy_listing_and_cancel() {
    let s = NoSandboxes::start().await;
    let t = token("acme", &["agent"]);
    let first = call_full(
        &s.cp.url,
        "POST",
        "/v1/workflows",
        Some(&t),
        Some(smallest()),
        &[("idempotency-key", "wf-1")],
    )
    .await;
    assert_eq!(first.0, 202, "{}", first.2);
    assert_eq!(first.2["status"], "queued");
    assert_eq!(statuses(&first.2), ["pending", "pending"]);
    assert!(first.1.get("idempotent-replayed").is_none());
    let again = call_full(
        &s.cp.url,
        "POST",
        "/v1/workflows",
        Some(&t),
        Some(smallest()),
        &[("idempotency-key", "wf-1")],
    )
    .await;
    assert_eq!(again.0, 202);
    assert_eq!(again.1["idempotent-replayed"], "true");
    assert_eq!(again.2, first.2, "the replay is the first response");
    let other_plan = call_full(
        &s.cp.url,
        "POST",
        "/v1/workflows",
        Some(&t),
        Some(json!({"steps": [{"code": "print(1)"}]})),
        &[("idempotency-key", "wf-1")],
    )
    .await;
    assert_eq!(other_plan.0, 422, "{}", other_plan.2);
    assert_eq!(other_plan.2["code"], "idempotency_key_reused");
    // The body's requestId is the same key.
    let mut with_id = smallest();
    with_id["requestId"] = json!("wf-1");
    let via_body = call_full(
        &s.cp.url,
        "POST",
        "/v1/workflows",
        Some(&t),
        Some(with_id),
        &[],
    )
    .await;
    assert_eq!(
        via_body.0, 422,
        "requestId is part of the body: {}",
        via_body.2
    );
    // Keys are per tenant, and a job's key space is not a workflow's.
    let g = token("globex", &["agent"]);
    let theirs = call_full(
        &s.cp.url,
        "POST",
        "/v1/workflows",
        Some(&g),
        Some(smallest()),
        &[("idempotency-key", "wf-1")],
    )
    .await;
    assert_eq!(theirs.0, 202);
    assert_ne!(theirs.2["workflowId"], first.2["workflowId"]);
    let id = first.2["workflowId"].as_str().unwrap().to_owned();
    // Another tenant does not see it.
    let (status, body) = call_at(
        &s.cp.url,
        "GET",
        &format!("/v1/workflows/{id}"),
        Some(&g),
        None,
    )
    .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["code"], "workflow_not_found");
    let (status, _) = call_at(
        &s.cp.url,
        "POST",
        &format!("/v1/workflows/{id}/cancel"),
        Some(&g),
        None,
    )
    .await;
    assert_eq!(status, 404);
    let (status, body) = call_at(&s.cp.url, "GET", "/v1/workflows/..%2Fx", Some(&t), None).await;
    assert_eq!(status, 400, "{body}");
    // A second workflow, then pages of one.
    let (status, second) = call_at(
        &s.cp.url,
        "POST",
        "/v1/workflows",
        Some(&t),
        Some(smallest()),
    )
    .await;
    assert_eq!(status, 202, "{second}");
    let (_, page) = call_at(&s.cp.url, "GET", "/v1/workflows?limit=1", Some(&t), None).await;
    assert_eq!(page["workflows"].as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page["workflows"][0]["workflowId"], second["workflowId"]);
    assert_eq!(
        page["workflows"][0]["steps"].as_array().unwrap().len(),
        2,
        "{page}"
    );
    let cursor = page["nextCursor"].as_str().unwrap().to_owned();
    let (_, next) = call_at(
        &s.cp.url,
        "GET",
        &format!("/v1/workflows?limit=1&cursor={cursor}"),
        Some(&t),
        None,
    )
    .await;
    assert_eq!(next["workflows"][0]["workflowId"], id.as_str(), "{next}");
    assert!(next.get("nextCursor").is_none(), "{next}");
    let (status, _) = call_at(
        &s.cp.url,
        "GET",
        "/v1/workflows?status=done",
        Some(&t),
        None,
    )
    .await;
    assert_eq!(status, 400);
    let (_, none) = call_at(
        &s.cp.url,
        "GET",
        "/v1/workflows?status=succeeded",
        Some(&t),
        None,
    )
    .await;
    assert_eq!(none["workflows"], json!([]), "nothing can run here: {none}");
    // Cancel: it ends cancelled (queued, or retrying its session), and a
    // second cancel is 409.
    let (status, c) = call_at(
        &s.cp.url,
        "POST",
        &format!("/v1/workflows/{id}/cancel"),
        Some(&t),
        None,
    )
    .await;
    assert_eq!(status, 200, "{c}");
    let done = wait_workflow(&s.cp.url, &t, &id, 60).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(statuses(&done), ["skipped", "skipped"], "{done}");
    let (status, again) = call_at(
        &s.cp.url,
        "POST",
        &format!("/v1/workflows/{id}/cancel"),
        Some(&t),
        None,
    )
    .await;
    assert_eq!(status, 409, "{again}");
    assert_eq!(again["code"], "workflow_finished");
    let (_, cancelled) = call_at(
        &s.cp.url,
        "GET",
        "/v1/workflows?status=cancelled",
        Some(&t),
        None,
    )
    .await;
    assert_eq!(
        cancelled["workflows"][0]["workflowId"],
        id.as_str(),
        "{cancelled}"
    );
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root, and PostgreSQL on 127.0.0.1:5432 (make deps; make test-integration)"]
async fn the_smallest_plan_runs_and_is_torn_down() {
    for driver in DRIVERS {
        let s = stack(driver, &[]).await;
        let t = token("acme", &["agent"]);
        let (status, w) = s
            .call("POST", "/v1/workflows", Some(&t), Some(smallest()))
            .await;
        assert_eq!(status, 202, "{driver:?}: {w}");
        let id = w["workflowId"].as_str().unwrap().to_owned();
        let done = wait_workflow(&s.cp.url, &t, &id, 120).await;
        assert_eq!(done["status"], "succeeded", "{driver:?}: {done}");
        assert_eq!(statuses(&done), ["succeeded", "succeeded"]);
        assert_eq!(done["steps"][1]["output"]["stdout"], "42\n", "{done}");
        assert_eq!(done["attempts"], 1);
        assert_torn_down(&s.cp.url, &t, &done).await;
        // Another tenant: 404.
        let g = token("globex", &["agent"]);
        let (status, _) = s
            .call("GET", &format!("/v1/workflows/{id}"), Some(&g), None)
            .await;
        assert_eq!(status, 404);
        let (_, listed) = s
            .call("GET", "/v1/workflows?status=succeeded", Some(&t), None)
            .await;
        assert_eq!(listed["workflows"][0]["workflowId"], id.as_str());
        assert_eq!(listed["workflows"][0]["steps"], done["steps"], "{listed}");
        // The lifecycle is audited.
        let admin = token("acme", &["admin"]);
        let (_, audit) = s
            .call(
                "GET",
                &format!("/v1/audit?resource=workflow/{id}"),
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
            ["workflow.submit", "workflow.start", "workflow.finish"],
            "{audit}"
        );
        s.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn inputs_are_written_and_outputs_become_artifacts() {
    let s = stack(DatabaseDriver::Sqlite, &[]).await;
    let t = token("acme", &["agent"]);
    let bin = base64::engine::general_purpose::STANDARD.encode([0u8, 1, 2, 255]);
    let plan = json!({
        "files": [
            {"path": "in/data.txt", "content": "hello"},
            {"path": "in/raw.bin", "content": bin, "encoding": "base64"},
        ],
        "steps": [
            {"code": "data = open('in/data.txt').read()\nraw = open('in/raw.bin','rb').read()"},
            {"code": "import os\nos.makedirs('out', exist_ok=True)\nopen('out/result.txt','w').write(data.upper() + ' ' + str(list(raw)))"},
        ],
        "outputs": ["out/result.txt"],
        "labels": {"team": "ml"},
    });
    let (status, w) = s.call("POST", "/v1/workflows", Some(&t), Some(plan)).await;
    assert_eq!(status, 202, "{w}");
    let id = w["workflowId"].as_str().unwrap().to_owned();
    let done = wait_workflow(&s.cp.url, &t, &id, 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["labels"]["team"], "ml");
    let artifact = done["artifacts"][0]["artifactId"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(done["artifacts"][0]["name"], "result.txt");
    assert_eq!(done["artifacts"][0]["workflowId"], id.as_str());
    // Downloadable, and listed by workflowId; the session's end did not
    // take it along.
    assert_torn_down(&s.cp.url, &t, &done).await;
    let resp = reqwest::Client::new()
        .get(format!("{}/v1/artifacts/{artifact}", s.cp.url))
        .bearer_auth(&t)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "HELLO [0, 1, 2, 255]");
    let (status, list) = s
        .call(
            "GET",
            &format!("/v1/artifacts?workflowId={id}"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(status, 200, "{list}");
    assert_eq!(list["artifacts"].as_array().unwrap().len(), 1, "{list}");
    assert_eq!(list["artifacts"][0]["artifactId"], artifact.as_str());
    // Another tenant: 404 on the workflow and the artifact, nothing listed.
    let g = token("globex", &["agent"]);
    for path in [
        format!("/v1/workflows/{id}"),
        format!("/v1/artifacts/{artifact}"),
    ] {
        let (status, body) = s.call("GET", &path, Some(&g), None).await;
        assert_eq!(status, 404, "{path}: {body}");
    }
    let (_, theirs) = s
        .call(
            "GET",
            &format!("/v1/artifacts?workflowId={id}"),
            Some(&g),
            None,
        )
        .await;
    assert_eq!(theirs["artifacts"], json!([]), "{theirs}");
    // A missing output fails the workflow, naming it.
    let (_, w) = s
        .call(
            "POST",
            "/v1/workflows",
            Some(&t),
            Some(json!({"steps": [{"code": "1"}], "outputs": ["out/none.txt"]})),
        )
        .await;
    let done = wait_workflow(&s.cp.url, &t, w["workflowId"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(done["error"]["code"], "output_missing", "{done}");
    assert!(
        done["error"]["message"]
            .as_str()
            .unwrap()
            .contains("outputs[0]")
    );
    assert_torn_down(&s.cp.url, &t, &done).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn a_failing_step_stops_the_workflow_unless_it_may_continue() {
    let s = stack(DatabaseDriver::Sqlite, &[]).await;
    let t = token("acme", &["agent"]);
    let (_, w) = s
        .call(
            "POST",
            "/v1/workflows",
            Some(&t),
            Some(
                json!({"steps": [{"code": "x = 1"}, {"code": "1/0"}, {"code": "print('never')"}]}),
            ),
        )
        .await;
    let id = w["workflowId"].as_str().unwrap().to_owned();
    let done = wait_workflow(&s.cp.url, &t, &id, 120).await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(
        statuses(&done),
        ["succeeded", "failed", "skipped"],
        "{done}"
    );
    assert_eq!(done["error"]["code"], "step_failed");
    assert!(
        done["error"]["message"]
            .as_str()
            .unwrap()
            .contains("steps[1]"),
        "{done}"
    );
    assert_eq!(done["steps"][1]["error"]["code"], "execution_error");
    assert!(
        done["steps"][1]["error"]["message"]
            .as_str()
            .unwrap()
            .contains("ZeroDivisionError")
    );
    assert!(done["steps"][2].get("output").is_none(), "{done}");
    assert_torn_down(&s.cp.url, &t, &done).await;
    // continueOnError: the next step runs, and the workflow succeeds.
    let (_, w) = s
        .call(
            "POST",
            "/v1/workflows",
            Some(&t),
            Some(json!({"steps": [
                {"code": "x = 1"},
                {"code": "1/0", "continueOnError": true},
                {"code": "print(x + 1)"},
            ]})),
        )
        .await;
    let done = wait_workflow(&s.cp.url, &t, w["workflowId"].as_str().unwrap(), 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(
        statuses(&done),
        ["succeeded", "failed", "succeeded"],
        "{done}"
    );
    assert_eq!(done["steps"][2]["output"]["stdout"], "2\n");
    assert_torn_down(&s.cp.url, &t, &done).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn cancel_interrupts_the_running_step_and_tears_down() {
    let s = stack(DatabaseDriver::Sqlite, &[]).await;
    let t = token("acme", &["agent"]);
    let (_, w) = s
        .call(
            "POST",
            "/v1/workflows",
            Some(&t),
            Some(json!({"steps": [
                {"code": "x = 1"},
                {"code": "import time\ntime.sleep(300)"},
                {"code": "print('never')"},
            ]})),
        )
        .await;
    let id = w["workflowId"].as_str().unwrap().to_owned();
    wait_step_running(&s.cp.url, &t, &id, 1).await;
    let (status, c) = s
        .call(
            "POST",
            &format!("/v1/workflows/{id}/cancel"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(status, 200, "{c}");
    let done = wait_workflow(&s.cp.url, &t, &id, 60).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(
        statuses(&done),
        ["succeeded", "failed", "skipped"],
        "{done}"
    );
    assert_eq!(done["steps"][1]["error"]["code"], "cancelled", "{done}");
    assert_torn_down(&s.cp.url, &t, &done).await;
    let (status, again) = s
        .call(
            "POST",
            &format!("/v1/workflows/{id}/cancel"),
            Some(&t),
            None,
        )
        .await;
    assert_eq!(status, 409, "{again}");
    assert_eq!(again["code"], "workflow_finished");
    s.stop().await;
}

/// A workflow whose worker was lost between steps resumes where it was:
/// the state such a worker leaves (step 0 finished in a live session, step
/// 1 pending, the lease expired) is planted in the database; a worker
/// claims it, does not run step 0 again, runs step 1 in the same session
/// (its variable is still there), and tears the session down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn a_workflow_lost_between_steps_resumes_in_its_session() {
    let s = stack(DatabaseDriver::Sqlite, &[]).await;
    let t = token("acme", &["agent"]);
    let (status, session) = s
        .call("POST", "/v1/sessions", Some(&t), Some(json!({})))
        .await;
    assert_eq!(status, 201, "{session}");
    let sid = session["sessionId"].as_str().unwrap().to_owned();
    let (status, r) = s
        .call(
            "POST",
            &format!("/v1/sessions/{sid}/steps"),
            Some(&t),
            Some(json!({"code": "x = 41"})),
        )
        .await;
    assert_eq!(status, 200, "{r}");
    let id = "wf_resumed000000000000001";
    let spec = json!({"steps": [{"code": "x = 41"}, {"code": "print(x + 1)"}]}).to_string();
    let planted = json!({"status": "ok", "stdout": "planted\n", "stderr": "", "result": null,
        "error": null, "durationMs": 1, "truncated": false})
    .to_string();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let db = s.db.connect().await;
    let control_plane::storage::Db::Sqlite(pool) = &db else {
        panic!("sqlite")
    };
    sqlx::query(
        "INSERT INTO workflows (id, tenant, subject, app, agent, roles, status, runtime, spec, labels, \
         session_id, artifacts, attempts, max_attempts, lease_owner, lease_expires_ms, next_run_ms, \
         cancel_requested, created_ms, updated_ms, started_ms) VALUES ($1, 'acme', 'acme-user', 'tests', \
         'harness', '[\"agent\"]', 'running', 'python', $2, '{}', $3, '[]', 1, 5, 'a-lost-worker', $4, $5, 0, $5, $5, $5)",
    )
    .bind(id)
    .bind(&spec)
    .bind(&sid)
    .bind(now - 1000)
    .bind(now)
    .execute(pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO workflow_steps (workflow_id, tenant, idx, status, output, started_ms, finished_ms) \
         VALUES ($1, 'acme', 0, 'succeeded', $2, $3, $3), ($1, 'acme', 1, 'pending', NULL, NULL, NULL)",
    )
    .bind(id)
    .bind(&planted)
    .bind(now)
    .execute(pool)
    .await
    .unwrap();
    db.close().await;
    let done = wait_workflow(&s.cp.url, &t, id, 120).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["attempts"], 2, "{done}");
    assert_eq!(done["sessionId"], sid.as_str());
    assert_eq!(statuses(&done), ["succeeded", "succeeded"], "{done}");
    assert_eq!(
        done["steps"][0]["output"]["stdout"], "planted\n",
        "step 0 ran again: {done}"
    );
    assert_eq!(done["steps"][1]["output"]["stdout"], "42\n", "{done}");
    assert_torn_down(&s.cp.url, &t, &done).await;
    // Two steps were sent to the session: the planted one and step 1.
    let admin = token("acme", &["admin"]);
    let (_, audit) = s
        .call(
            "GET",
            "/v1/audit?action=step.run&limit=500",
            Some(&admin),
            None,
        )
        .await;
    let runs = audit["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| {
            e["resource"]
                .as_str()
                .unwrap()
                .starts_with(&format!("session/{sid}/"))
        })
        .count();
    assert_eq!(runs, 2, "{audit}");
    s.stop().await;
}

/// kill -9 of the control plane while a step runs: after a restart the
/// workflow fails with `workflow_interrupted` naming that step; the step
/// before it is not run again, the interrupted one is not sent again, the
/// one after never runs, and the session is torn down.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root, and PostgreSQL on 127.0.0.1:5432 (make deps; make test-integration)"]
async fn a_killed_control_plane_never_runs_a_step_twice() {
    for driver in DRIVERS {
        let state = tempfile::Builder::new()
            .prefix("cp-wf-kill-")
            .tempdir_in("/tmp")
            .unwrap();
        let agent = agent_proc(&state.path().join("agent"), &[]).await;
        let dp = dp_proc(&agent.url, &state.path().join("dp"), None).await;
        let db = TestDb::new(driver).await;
        db.connect().await.close().await;
        let mut cp = CpProcess::start(&db, &dp.url).await;
        let t = token("acme", &["agent"]);
        let (status, w) = call_at(
            &cp.url,
            "POST",
            "/v1/workflows",
            Some(&t),
            Some(json!({"steps": [
                {"code": "print('first')"},
                {"code": "import time\ntime.sleep(5)\nprint('second')"},
                {"code": "print('third')"},
            ]})),
        )
        .await;
        assert_eq!(status, 202, "{w}");
        let id = w["workflowId"].as_str().unwrap().to_owned();
        wait_step_running(&cp.url, &t, &id, 1).await;
        cp.kill9();
        // Restart: the lease (3 s) expires, another worker claims it.
        let cp2 = CpProcess::start(&db, &dp.url).await;
        let done = wait_workflow(&cp2.url, &t, &id, 120).await;
        assert_eq!(done["status"], "failed", "{driver:?}: {done}");
        assert_eq!(done["error"]["code"], "workflow_interrupted", "{done}");
        assert!(
            done["error"]["message"]
                .as_str()
                .unwrap()
                .contains("steps[1]"),
            "{done}"
        );
        assert_eq!(
            statuses(&done),
            ["succeeded", "failed", "skipped"],
            "{done}"
        );
        assert_eq!(done["steps"][0]["output"]["stdout"], "first\n");
        assert_eq!(done["steps"][1]["error"]["code"], "workflow_interrupted");
        assert_eq!(done["attempts"], 2, "{done}");
        assert_torn_down(&cp2.url, &t, &done).await;
        // Exactly two steps were ever sent to the session: audited
        // write-ahead (`step.run`) for each dispatch.
        let sid = done["sessionId"].as_str().unwrap();
        let admin = token("acme", &["admin"]);
        let (_, audit) = call_at(
            &cp2.url,
            "GET",
            "/v1/audit?action=step.run&limit=500",
            Some(&admin),
            None,
        )
        .await;
        let runs = audit["events"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| {
                e["resource"]
                    .as_str()
                    .unwrap()
                    .starts_with(&format!("session/{sid}/"))
            })
            .count();
        // Step 1 is recorded `running` before its `step.run` is written
        // ahead and sent: a kill between the two leaves one event. Never a
        // third (the interrupted step is not sent again).
        assert!((1..=2).contains(&runs), "{runs} step.run events: {audit}");
        let (_, finishes) = call_at(
            &cp2.url,
            "GET",
            &format!("/v1/audit?resource=workflow/{id}&action=workflow.finish"),
            Some(&admin),
            None,
        )
        .await;
        assert_eq!(
            finishes["events"].as_array().unwrap().len(),
            1,
            "{finishes}"
        );
        let (_, verify) = call_at(&cp2.url, "GET", "/v1/audit/verify", Some(&admin), None).await;
        assert_eq!(verify["ok"], true, "{verify}");
        drop(cp2);
        dp.stop().await;
        agent.stop().await;
        db.cleanup().await;
    }
}

/// The control-plane binary as a child process (so it can be killed -9).
struct CpProcess {
    url: String,
    child: std::process::Child,
}

impl CpProcess {
    async fn start(db: &TestDb, dp_url: &str) -> CpProcess {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let addr = format!("127.0.0.1:{port}");
        let mut args = cp_args(db, dp_url, &["--addr", addr.as_str()]);
        args.remove(0);
        let mut url = db.url.clone();
        if let Some(schema) = &db.schema {
            url = format!("{url}?options=-c%20search_path%3D{schema}");
        }
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
        let deadline = Instant::now() + Duration::from_secs(30);
        while reqwest::get(format!("{url}/healthz")).await.is_err() {
            assert!(Instant::now() < deadline, "control plane did not start");
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

/// A hostile tenant's long workflows cannot hold every worker: one tenant
/// runs at most WORKFLOW_TENANT_MAX_RUNNING (default 1) at once, so with
/// two workers another tenant's workflow runs while the first tenant's
/// second one waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn one_tenants_workflows_cannot_take_every_worker() {
    let s = stack(DatabaseDriver::Sqlite, &["--workflow-workers", "2"]).await;
    let a = token("acme", &["agent"]);
    let slow = json!({"steps": [{"code": "import time\ntime.sleep(30)"}]});
    let mut slow_ids = Vec::new();
    for _ in 0..2 {
        let (status, w) = s
            .call("POST", "/v1/workflows", Some(&a), Some(slow.clone()))
            .await;
        assert_eq!(status, 202, "{w}");
        slow_ids.push(w["workflowId"].as_str().unwrap().to_owned());
    }
    wait_step_running(&s.cp.url, &a, &slow_ids[0], 0).await;
    let b = token("globex", &["agent"]);
    let (status, w) = s
        .call("POST", "/v1/workflows", Some(&b), Some(smallest()))
        .await;
    assert_eq!(status, 202, "{w}");
    let id = w["workflowId"].as_str().unwrap().to_owned();
    let done = wait_workflow(&s.cp.url, &b, &id, 25).await;
    assert_eq!(done["status"], "succeeded", "{done}");
    // The first tenant's second workflow is still waiting for its turn.
    let (_, second) = s
        .call(
            "GET",
            &format!("/v1/workflows/{}", slow_ids[1]),
            Some(&a),
            None,
        )
        .await;
    assert_eq!(second["status"], "queued", "{second}");
    for id in &slow_ids {
        s.call(
            "POST",
            &format!("/v1/workflows/{id}/cancel"),
            Some(&a),
            None,
        )
        .await;
        wait_workflow(&s.cp.url, &a, id, 60).await;
    }
    s.stop().await;
}
