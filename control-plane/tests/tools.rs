//! The seed's REST tool endpoints (`/tools/*`) on the MCP port: each answers
//! exactly what its `/v1` twin answers (status, body shape, codes: 401
//! without a token, 404 across tenants, 400 for a bad id), the workflow
//! route is a coded 501, and artifact uploads stream through (round trip,
//! and a 256 MiB upload keeps this process's memory flat).
//!
//! The hermetic tests run a data plane in front of an agent that is not
//! there (artifacts, jobs queued, every refusal need no sandbox); the ones
//! that run code need real sandboxes and are marked
//! `#[ignore = "needs: runsc and root ..."]` (`make test-integration`).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use control_plane::config::DatabaseDriver;
use futures::StreamExt;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

/// The tests of this file run one at a time: the memory test reads the
/// process's peak resident memory, which any concurrent test would move.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The MCP port's router (auth, Host/Origin checks, `/mcp`, `/tools/*`) on
/// an ephemeral port of its own.
async fn serve_mcp_port(app: Arc<control_plane::App>) -> (String, CancellationToken) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(shared::server::serve(
        listener,
        control_plane::mcp::router(app),
        shutdown.clone(),
    ));
    (url, shutdown)
}

/// A data plane (in front of no agent), a control plane on SQLite and its
/// MCP port: everything the `/tools` routes need except sandboxes.
struct NoSandboxes {
    dp: Proc,
    cp: Proc,
    app: Arc<control_plane::App>,
    db: TestDb,
    tools: String,
    tools_stop: CancellationToken,
    _state: tempfile::TempDir,
}

impl NoSandboxes {
    async fn start() -> NoSandboxes {
        let state = tempfile::Builder::new()
            .prefix("cp-tools-")
            .tempdir_in("/tmp")
            .unwrap();
        // A port nothing listens on: no agent, hence no sandbox.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let agent = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        let dp = dp_proc(&agent, &state.path().join("dp"), None).await;
        let db = TestDb::new(DatabaseDriver::Sqlite).await;
        let (cp, app) = cp_proc(&db, &dp.url, &[]).await;
        let (tools, tools_stop) = serve_mcp_port(app.clone()).await;
        NoSandboxes {
            dp,
            cp,
            app,
            db,
            tools,
            tools_stop,
            _state: state,
        }
    }

    async fn stop(self) {
        self.tools_stop.cancel();
        self.cp.stop().await;
        self.dp.stop().await;
        self.db.cleanup().await;
    }
}

/// The two answers are the same: status, error code and message, or (for a
/// success) the same set of fields.
fn assert_twins(what: &str, tools: &(u16, Value), v1: &(u16, Value)) {
    assert_eq!(
        tools.0, v1.0,
        "{what}: status\n/tools: {}\n/v1: {}",
        tools.1, v1.1
    );
    if tools.0 >= 400 {
        assert_eq!(tools.1["code"], v1.1["code"], "{what}: code");
        assert_eq!(tools.1["message"], v1.1["message"], "{what}: message");
        assert!(tools.1["code"].is_string(), "{what}: coded: {}", tools.1);
    } else {
        let keys = |v: &Value| {
            let mut k: Vec<String> = v
                .as_object()
                .map(|o| o.keys().cloned().collect())
                .unwrap_or_default();
            k.sort();
            k
        };
        assert_eq!(keys(&tools.1), keys(&v1.1), "{what}: fields");
    }
}

/// A raw (non-JSON) body call: (status, headers, body bytes).
async fn raw(
    method: &str,
    url: &str,
    auth: Option<&str>,
    body: Option<reqwest::Body>,
) -> (u16, reqwest::header::HeaderMap, bytes::Bytes) {
    let mut rb = reqwest::Client::new().request(method.parse().unwrap(), url);
    if let Some(a) = auth {
        rb = rb.bearer_auth(a);
    }
    if let Some(b) = body {
        rb = rb
            .header("content-type", "application/octet-stream")
            .body(b);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    (status, headers, resp.bytes().await.unwrap())
}

fn json_of(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(bytes)}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_tools_route_needs_a_token_like_v1() {
    let _serial = SERIAL.lock().await;
    let s = NoSandboxes::start().await;
    let pairs = [
        ("POST", "/tools/jobs", "/v1/jobs"),
        ("GET", "/tools/jobs/job-1", "/v1/jobs/job-1"),
        ("POST", "/tools/sessions", "/v1/sessions"),
        (
            "POST",
            "/tools/sessions/ses-1/steps",
            "/v1/sessions/ses-1/steps",
        ),
        ("POST", "/tools/artifacts/upload", "/v1/artifacts"),
        (
            "GET",
            "/tools/artifacts/art-1/download",
            "/v1/artifacts/art-1",
        ),
    ];
    for (method, tools, v1) in pairs {
        let t = call_at(&s.tools, method, tools, None, Some(json!({}))).await;
        let v = call_at(&s.cp.url, method, v1, None, Some(json!({}))).await;
        assert_eq!(t.0, 401, "{method} {tools}: {}", t.1);
        assert_eq!(t.1["code"], "unauthorized", "{method} {tools}");
        assert_eq!(v.0, 401, "{method} {v1}");
        // A forged token too.
        let forged = token_with(
            "acme",
            &["agent"],
            "not-the-secret-not-the-secret!!",
            "control-plane",
            600,
        );
        let t = call_at(&s.tools, method, tools, Some(&forged), Some(json!({}))).await;
        assert_eq!(t.0, 401, "{method} {tools} forged: {}", t.1);
    }
    let t = call_at(&s.tools, "POST", "/tools/workflows", None, Some(json!({}))).await;
    assert_eq!(t.0, 401, "workflows without a token: {}", t.1);
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tools_jobs_answer_like_v1_jobs() {
    let _serial = SERIAL.lock().await;
    let s = NoSandboxes::start().await;
    let acme = token("acme", &["agent"]);
    let other = token("other", &["agent"]);
    let body = json!({"code": "6 * 7", "labels": {"via": "tools"}});

    // Submit: 202 with the same Job shape.
    let t = call_at(
        &s.tools,
        "POST",
        "/tools/jobs",
        Some(&acme),
        Some(body.clone()),
    )
    .await;
    let v = call_at(
        &s.cp.url,
        "POST",
        "/v1/jobs",
        Some(&acme),
        Some(body.clone()),
    )
    .await;
    assert_eq!(t.0, 202, "{}", t.1);
    assert_twins("submit", &t, &v);
    let tid = t.1["jobId"].as_str().unwrap().to_owned();
    let vid = v.1["jobId"].as_str().unwrap().to_owned();

    // Read: one domain behind both (a /tools job is a /v1 job). A worker is
    // dispatching the job meanwhile (to a data plane without an agent), so
    // its state may move between two reads: compare a /tools read with a
    // /v1 read only when the /v1 reads on either side of it agree.
    for id in [&tid, &vid] {
        let v1 = |id: String| {
            let url = s.cp.url.clone();
            let acme = acme.clone();
            async move { call_at(&url, "GET", &format!("/v1/jobs/{id}"), Some(&acme), None).await }
        };
        let mut compared = false;
        for _ in 0..50 {
            let before = v1(id.to_string()).await;
            let t = call_at(
                &s.tools,
                "GET",
                &format!("/tools/jobs/{id}"),
                Some(&acme),
                None,
            )
            .await;
            let after = v1(id.to_string()).await;
            assert_eq!(t.0, 200, "{}", t.1);
            assert_eq!(t.1["jobId"], id.as_str());
            if before == after {
                assert_twins("get", &t, &after);
                compared = true;
                break;
            }
        }
        assert!(compared, "job {id} never held still for two reads");
    }

    // Another tenant's job: 404, as in /v1.
    let t = call_at(
        &s.tools,
        "GET",
        &format!("/tools/jobs/{tid}"),
        Some(&other),
        None,
    )
    .await;
    let v = call_at(
        &s.cp.url,
        "GET",
        &format!("/v1/jobs/{tid}"),
        Some(&other),
        None,
    )
    .await;
    assert_eq!(t.0, 404, "{}", t.1);
    assert_eq!(t.1["code"], "job_not_found");
    assert_twins("cross-tenant get", &t, &v);

    // Bad ids, bad bodies, bad query: the same coded 400s.
    for (what, tools, v1) in [
        ("bad id", "/tools/jobs/..%2Fx", "/v1/jobs/..%2Fx"),
        (
            "bad waitMs",
            "/tools/jobs/job-1?waitMs=x",
            "/v1/jobs/job-1?waitMs=x",
        ),
    ] {
        let t = call_at(&s.tools, "GET", tools, Some(&acme), None).await;
        let v = call_at(&s.cp.url, "GET", v1, Some(&acme), None).await;
        assert_eq!(t.0, 400, "{what}: {}", t.1);
        assert_eq!(t.1["code"], "invalid_argument", "{what}");
        assert_twins(what, &t, &v);
    }
    for (what, bad) in [
        ("unknown field", json!({"code": "1", "nope": 1})),
        ("no code", json!({"runtime": "python"})),
        ("egress", json!({"code": "1", "egress": ["example.com"]})),
    ] {
        let t = call_at(
            &s.tools,
            "POST",
            "/tools/jobs",
            Some(&acme),
            Some(bad.clone()),
        )
        .await;
        let v = call_at(&s.cp.url, "POST", "/v1/jobs", Some(&acme), Some(bad)).await;
        assert!(t.0 >= 400 && t.0 < 500, "{what}: {}", t.1);
        assert_twins(what, &t, &v);
    }

    // Idempotency is the same store: a /tools submit replays through /v1.
    let key = [("Idempotency-Key", "tools-replay-1")];
    let (ts, th, tb) = call_full(
        &s.tools,
        "POST",
        "/tools/jobs",
        Some(&acme),
        Some(body.clone()),
        &key,
    )
    .await;
    let (vs, vh, vb) = call_full(
        &s.cp.url,
        "POST",
        "/v1/jobs",
        Some(&acme),
        Some(body.clone()),
        &key,
    )
    .await;
    assert_eq!((ts, vs), (202, 202), "{tb} {vb}");
    assert_eq!(tb["jobId"], vb["jobId"]);
    assert!(th.get("idempotent-replayed").is_none());
    assert_eq!(vh.get("idempotent-replayed").unwrap(), "true");
    let (ts, th, _) = call_full(
        &s.tools,
        "POST",
        "/tools/jobs",
        Some(&acme),
        Some(json!({"code": "7"})),
        &key,
    )
    .await;
    assert_eq!(ts, 422, "same key, another body");
    assert!(th.get("idempotent-replayed").is_none());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tools_session_refusals_match_v1() {
    let _serial = SERIAL.lock().await;
    let s = NoSandboxes::start().await;
    let acme = token("acme", &["agent"]);
    let step = json!({"code": "1"});
    for (what, tools, v1, status) in [
        (
            "bad id",
            "/tools/sessions/..%2Fx/steps",
            "/v1/sessions/..%2Fx/steps",
            400,
        ),
        (
            "unknown session",
            "/tools/sessions/ses-nope/steps",
            "/v1/sessions/ses-nope/steps",
            404,
        ),
    ] {
        let t = call_at(&s.tools, "POST", tools, Some(&acme), Some(step.clone())).await;
        let v = call_at(&s.cp.url, "POST", v1, Some(&acme), Some(step.clone())).await;
        assert_eq!(t.0, status, "{what}: {}", t.1);
        assert_twins(what, &t, &v);
    }
    for (what, bad) in [
        ("unknown field", json!({"nope": 1})),
        ("egress", json!({"egress": ["example.com"]})),
        ("unknown runtime", json!({"runtime": "cobol"})),
    ] {
        let t = call_at(
            &s.tools,
            "POST",
            "/tools/sessions",
            Some(&acme),
            Some(bad.clone()),
        )
        .await;
        let v = call_at(&s.cp.url, "POST", "/v1/sessions", Some(&acme), Some(bad)).await;
        assert!(t.0 >= 400 && t.0 < 500, "{what}: {}", t.1);
        assert_twins(what, &t, &v);
    }
    // A body that is not JSON.
    let (ts, _, tb) = raw(
        "POST",
        &format!("{}/tools/sessions", s.tools),
        Some(&acme),
        Some("{".into()),
    )
    .await;
    let (vs, _, vb) = raw(
        "POST",
        &format!("{}/v1/sessions", s.cp.url),
        Some(&acme),
        Some("{".into()),
    )
    .await;
    assert_twins("not json", &(ts, json_of(&tb)), &(vs, json_of(&vb)));
    assert!((400..500).contains(&ts), "{}", json_of(&tb));
    s.stop().await;
}

/// `POST /tools/workflows` is `POST /v1/workflows`: the same refusal of a
/// malformed plan (naming the step), the same policy.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tools_workflows_is_v1_workflows() {
    let _serial = SERIAL.lock().await;
    let s = NoSandboxes::start().await;
    let acme = token("acme", &["agent"]);
    for plan in [
        json!({"steps": []}),
        json!({"steps": [{"code": "1"}, {"code": ""}]}),
        json!({"steps": [{"code": "1"}], "files": [{"path": "../x", "content": ""}]}),
        json!({"runtime": "cobol", "steps": [{"code": "1"}]}),
    ] {
        let tools = call_at(
            &s.tools,
            "POST",
            "/tools/workflows",
            Some(&acme),
            Some(plan.clone()),
        )
        .await;
        let v1 = call_at(
            &s.cp.url,
            "POST",
            "/v1/workflows",
            Some(&acme),
            Some(plan.clone()),
        )
        .await;
        assert_eq!(tools.0, 400, "{plan}: {}", tools.1);
        assert_eq!(tools.1["code"], v1.1["code"], "{plan}");
        assert_eq!(tools.1["message"], v1.1["message"], "{plan}");
    }
    // A valid plan is queued (nothing can run here).
    let (status, w) = call_at(
        &s.tools,
        "POST",
        "/tools/workflows",
        Some(&acme),
        Some(json!({"steps": [{"code": "x = 41"}, {"code": "print(x + 1)"}]})),
    )
    .await;
    assert_eq!(status, 202, "{w}");
    assert!(w["workflowId"].as_str().unwrap().starts_with("wf_"));
    // Only POST is routed.
    let (status, body) = call_at(&s.tools, "GET", "/tools/workflows", Some(&acme), None).await;
    assert_eq!(status, 405, "{body}");
    s.stop().await;
}

/// Upload through `/tools` and `/v1`, download through the other one: the
/// bytes and digests match, another tenant gets 404, bad input a coded 400,
/// and each upload is audited with the artifact's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn upload_then_download_round_trip() {
    let _serial = SERIAL.lock().await;
    let s = NoSandboxes::start().await;
    let acme = token("acme", &["agent", "admin"]);
    let other = token("other", &["agent"]);
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 31 % 251) as u8).collect();
    let digest = hex::encode(Sha256::digest(&data));

    let mut ids = Vec::new();
    for (up, down) in [
        (
            format!("{}/tools/artifacts/upload?name=data.bin", s.tools),
            format!("{}/v1/artifacts", s.cp.url),
        ),
        (
            format!("{}/v1/artifacts?name=data.bin", s.cp.url),
            format!("{}/tools/artifacts", s.tools),
        ),
    ] {
        let (status, _, body) = raw("POST", &up, Some(&acme), Some(data.clone().into())).await;
        let info = json_of(&body);
        assert_eq!(status, 201, "{up}: {info}");
        assert_eq!(info["name"], "data.bin");
        assert_eq!(info["size"], data.len() as u64);
        assert_eq!(info["sha256"], digest.as_str());
        assert_eq!(info["tenant"], "acme");
        let id = info["artifactId"].as_str().unwrap().to_owned();
        let url = if down.ends_with("/tools/artifacts") {
            format!("{down}/{id}/download")
        } else {
            format!("{down}/{id}")
        };
        let (status, headers, got) = raw("GET", &url, Some(&acme), None).await;
        assert_eq!(status, 200, "{url}");
        assert_eq!(got.as_ref(), data.as_slice(), "{url}: bytes");
        assert_eq!(headers.get("x-artifact-sha256").unwrap(), digest.as_str());
        assert_eq!(
            headers.get("content-length").unwrap(),
            &data.len().to_string()
        );
        ids.push(id);
    }

    // Another tenant: 404 on both downloads, as on /v1.
    let id = &ids[0];
    let t = raw(
        "GET",
        &format!("{}/tools/artifacts/{id}/download", s.tools),
        Some(&other),
        None,
    )
    .await;
    let v = raw(
        "GET",
        &format!("{}/v1/artifacts/{id}", s.cp.url),
        Some(&other),
        None,
    )
    .await;
    assert_eq!(t.0, 404);
    assert_eq!(json_of(&t.2)["code"], "artifact_not_found");
    assert_twins(
        "cross-tenant download",
        &(t.0, json_of(&t.2)),
        &(v.0, json_of(&v.2)),
    );

    // Bad ids, names and sessions: coded 4xx, the same on both routes.
    for (what, tools, v1) in [
        (
            "bad id",
            "/tools/artifacts/..%2Fx/download",
            "/v1/artifacts/..%2Fx",
        ),
        (
            "unknown id",
            "/tools/artifacts/art-nope/download",
            "/v1/artifacts/art-nope",
        ),
    ] {
        let t = raw("GET", &format!("{}{tools}", s.tools), Some(&acme), None).await;
        let v = raw("GET", &format!("{}{v1}", s.cp.url), Some(&acme), None).await;
        assert!((400..500).contains(&t.0), "{what}: {}", json_of(&t.2));
        assert_twins(what, &(t.0, json_of(&t.2)), &(v.0, json_of(&v.2)));
    }
    for (what, query, status, code) in [
        (
            "bad session id",
            "?sessionId=..%2Fx",
            400,
            "invalid_argument",
        ),
        (
            "unknown session",
            "?sessionId=ses-nope",
            404,
            "session_not_found",
        ),
        ("unknown parameter", "?nope=1", 400, "invalid_argument"),
        ("bad name", "?name=a%2Fb", 400, "invalid_argument"),
    ] {
        let t = raw(
            "POST",
            &format!("{}/tools/artifacts/upload{query}", s.tools),
            Some(&acme),
            Some("x".into()),
        )
        .await;
        let v = raw(
            "POST",
            &format!("{}/v1/artifacts{query}", s.cp.url),
            Some(&acme),
            Some("x".into()),
        )
        .await;
        assert_eq!(t.0, status, "{what}: {}", json_of(&t.2));
        assert_eq!(json_of(&t.2)["code"], code, "{what}");
        assert_twins(what, &(t.0, json_of(&t.2)), &(v.0, json_of(&v.2)));
    }

    // Audited: each stored artifact has its `artifact.write` event.
    let (status, audit) = call_at(
        &s.cp.url,
        "GET",
        "/v1/audit?action=artifact.write&limit=100",
        Some(&acme),
        None,
    )
    .await;
    assert_eq!(status, 200, "{audit}");
    let events = audit["events"].as_array().unwrap();
    for id in &ids {
        assert!(
            events
                .iter()
                .any(|e| e["resource"] == format!("artifact/{id}").as_str()
                    && e["outcome"] == "succeeded"),
            "no artifact.write event for {id}: {audit}"
        );
    }
    assert!(events.iter().any(|e| e["outcome"] == "started"), "{audit}");
    let _ = &s.app;
    s.stop().await;
}

/// Peak resident memory of this process (kB), reset first where the kernel
/// allows it (`clear_refs` 5), so the growth is the upload's alone.
fn vm_hwm_kb() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// 256 MiB streamed from a generator through `/tools/artifacts/upload`: the
/// control plane (and the data plane, both in this process) never hold it,
/// so the peak resident memory grows by far less than the upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_upload_streams_through_with_flat_memory() {
    let _serial = SERIAL.lock().await;
    const MIB: usize = 1024 * 1024;
    const TOTAL: usize = 256 * MIB;
    let s = NoSandboxes::start().await;
    let acme = token("acme", &["agent"]);
    // Warm the path (pools, first allocations) with a small upload.
    let (status, _, _) = raw(
        "POST",
        &format!("{}/tools/artifacts/upload?name=warm", s.tools),
        Some(&acme),
        Some("w".into()),
    )
    .await;
    assert_eq!(status, 201);

    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let before = vm_hwm_kb();
    let chunk = bytes::Bytes::from(vec![0x5a_u8; MIB]);
    let generator =
        futures::stream::iter(0..TOTAL / MIB).map(move |_| Ok::<_, std::io::Error>(chunk.clone()));
    let (status, _, body) = raw(
        "POST",
        &format!("{}/tools/artifacts/upload?name=big.bin", s.tools),
        Some(&acme),
        Some(reqwest::Body::wrap_stream(generator)),
    )
    .await;
    let after = vm_hwm_kb();
    let info = json_of(&body);
    assert_eq!(status, 201, "{info}");
    assert_eq!(info["size"], TOTAL as u64);
    let growth_mib = after.saturating_sub(before) / 1024;
    eprintln!("VmHWM before {before} kB, after {after} kB: +{growth_mib} MiB for a 256 MiB upload");
    // Generous (allocator slack, both planes' buffers), yet far below the
    // upload: buffering it whole would add at least 256 MiB.
    assert!(
        growth_mib < 64,
        "peak memory grew by {growth_mib} MiB for a 256 MiB upload"
    );
    s.stop().await;
}

/// Jobs and sessions that really run code: `/tools` and `/v1` give the same
/// results, and a session is reachable through both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn tools_run_code_like_v1() {
    let _serial = SERIAL.lock().await;
    let st = stack(DatabaseDriver::Sqlite, &[]).await;
    let (tools, tools_stop) = serve_mcp_port(st.app.clone()).await;
    let acme = token("acme", &["agent"]);
    let other = token("other", &["agent"]);

    // A job: submitted through /tools, long-polled through /tools.
    let (status, job) = call_at(
        &tools,
        "POST",
        "/tools/jobs",
        Some(&acme),
        Some(json!({"code": "6 * 7"})),
    )
    .await;
    assert_eq!(status, 202, "{job}");
    let id = job["jobId"].as_str().unwrap().to_owned();
    let mut done = Value::Null;
    for _ in 0..60 {
        let (status, j) = call_at(
            &tools,
            "GET",
            &format!("/tools/jobs/{id}?waitMs=2000"),
            Some(&acme),
            None,
        )
        .await;
        assert_eq!(status, 200, "{j}");
        if matches!(
            j["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            done = j;
            break;
        }
    }
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["output"]["result"], json!(42), "{done}");
    let v = call_at(
        &st.cp.url,
        "GET",
        &format!("/v1/jobs/{id}"),
        Some(&acme),
        None,
    )
    .await;
    assert_eq!(v.1, done, "the same job through /v1");

    // A session: created through /tools (201), steps through both.
    let t = call_at(
        &tools,
        "POST",
        "/tools/sessions",
        Some(&acme),
        Some(json!({})),
    )
    .await;
    assert_eq!(t.0, 201, "{}", t.1);
    let sid = t.1["sessionId"].as_str().unwrap().to_owned();
    let v = call_at(
        &st.cp.url,
        "POST",
        "/v1/sessions",
        Some(&acme),
        Some(json!({})),
    )
    .await;
    assert_twins("create session", &t, &v);
    let vsid = v.1["sessionId"].as_str().unwrap().to_owned();

    let (status, r) = call_at(
        &tools,
        "POST",
        &format!("/tools/sessions/{sid}/steps"),
        Some(&acme),
        Some(json!({"code": "x = 6 * 7"})),
    )
    .await;
    assert_eq!(status, 200, "{r}");
    let t = call_at(
        &tools,
        "POST",
        &format!("/tools/sessions/{sid}/steps"),
        Some(&acme),
        Some(json!({"code": "x"})),
    )
    .await;
    assert_eq!(t.0, 200, "{}", t.1);
    assert_eq!(t.1["result"], json!(42), "{}", t.1);
    let v = call_at(
        &st.cp.url,
        "POST",
        &format!("/v1/sessions/{sid}/steps"),
        Some(&acme),
        Some(json!({"code": "x"})),
    )
    .await;
    assert_twins("step", &t, &v);
    assert_eq!(v.1["result"], json!(42));

    // Streamed (SSE) through /tools, as on /v1.
    let resp = reqwest::Client::new()
        .post(format!("{tools}/tools/sessions/{sid}/steps"))
        .bearer_auth(&acme)
        .header("accept", "text/event-stream")
        .json(&json!({"code": "print('streamed')"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/event-stream")
    );
    let text = resp.text().await.unwrap();
    assert!(
        text.contains("streamed") && text.contains("event: result"),
        "{text}"
    );

    // Another tenant's session: 404, as on /v1.
    let t = call_at(
        &tools,
        "POST",
        &format!("/tools/sessions/{sid}/steps"),
        Some(&other),
        Some(json!({"code": "x"})),
    )
    .await;
    let v = call_at(
        &st.cp.url,
        "POST",
        &format!("/v1/sessions/{sid}/steps"),
        Some(&other),
        Some(json!({"code": "x"})),
    )
    .await;
    assert_eq!(t.0, 404, "{}", t.1);
    assert_eq!(t.1["code"], "session_not_found");
    assert_twins("cross-tenant step", &t, &v);

    // An artifact owned by the session, downloaded through /tools.
    let (status, _, body) = raw(
        "POST",
        &format!("{tools}/tools/artifacts/upload?name=s.txt&sessionId={sid}"),
        Some(&acme),
        Some("owned".into()),
    )
    .await;
    assert_eq!(status, 201, "{}", json_of(&body));
    assert_eq!(json_of(&body)["sessionId"], sid.as_str());

    for s in [&sid, &vsid] {
        let (status, _) = call_at(
            &st.cp.url,
            "DELETE",
            &format!("/v1/sessions/{s}"),
            Some(&acme),
            None,
        )
        .await;
        assert_eq!(status, 204);
    }
    tools_stop.cancel();
    tokio::time::sleep(Duration::from_millis(10)).await;
    st.stop().await;
}

/// `POST /tools/workflows` runs the smallest plan; the result is the same
/// workflow through `/v1`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn tools_workflows_run_the_smallest_plan() {
    let _serial = SERIAL.lock().await;
    let st = stack(DatabaseDriver::Sqlite, &[]).await;
    let (tools, tools_stop) = serve_mcp_port(st.app.clone()).await;
    let acme = token("acme", &["agent"]);
    let (status, w) = call_at(
        &tools,
        "POST",
        "/tools/workflows",
        Some(&acme),
        Some(json!({"runtime": "python", "steps": [{"code": "x = 41"}, {"code": "print(x + 1)"}]})),
    )
    .await;
    assert_eq!(status, 202, "{w}");
    let id = w["workflowId"].as_str().unwrap().to_owned();
    let mut done = Value::Null;
    for _ in 0..60 {
        let (status, w) = call_at(
            &st.cp.url,
            "GET",
            &format!("/v1/workflows/{id}?waitMs=2000"),
            Some(&acme),
            None,
        )
        .await;
        assert_eq!(status, 200, "{w}");
        if matches!(
            w["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            done = w;
            break;
        }
    }
    assert_eq!(done["status"], "succeeded", "{done}");
    assert_eq!(done["steps"][1]["output"]["stdout"], "42\n", "{done}");
    tools_stop.cancel();
    tokio::time::sleep(Duration::from_millis(10)).await;
    st.stop().await;
}
