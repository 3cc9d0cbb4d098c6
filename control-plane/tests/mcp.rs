//! The MCP server end to end with the rmcp client: auth (401 + challenge),
//! Host/Origin allowlist, tool catalogue, every tool, tenancy, policy,
//! idempotency, progress, images and output caps. Tests without sandboxes
//! run a control plane in front of a closed data-plane port; the others
//! need runsc (`make test-integration`).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use common::*;
use control_plane::config::DatabaseDriver;
use rmcp::model::{
    CallToolRequestParams, CallToolResult, ClientRequest, ProgressNotificationParam, Request,
    ServerResult,
};
use rmcp::service::{NotificationContext, PeerRequestOptions, RunningService};
use rmcp::transport::StreamableHttpClientTransport;
use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
use rmcp::{ClientHandler, RoleClient, ServiceExt};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// A control plane with its MCP port.
struct Cp {
    rest: String,
    mcp: String,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Cp {
    async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

async fn start_cp(db: &TestDb, dp_url: &str, extra: &[&str]) -> Cp {
    let config = control_plane::Config::parse_from(cp_args(db, dp_url, extra));
    let app = control_plane::App::build_with_db(config, db.connect().await).unwrap();
    let rest = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (rest_url, mcp_url) = (
        format!("http://{}", rest.local_addr().unwrap()),
        format!("http://{}", mcp.local_addr().unwrap()),
    );
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(control_plane::serve_all(
        rest,
        Some(mcp),
        app,
        shutdown.clone(),
    ));
    let http = reqwest::Client::new();
    for _ in 0..600 {
        if http.get(format!("{mcp_url}/healthz")).send().await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Cp {
        rest: rest_url,
        mcp: mcp_url,
        shutdown,
        task,
    }
}

/// A control plane whose data plane is a closed port (no sandboxes).
async fn lone(extra: &[&str]) -> (Cp, TestDb) {
    let db = TestDb::new(DatabaseDriver::Sqlite).await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    (start_cp(&db, &closed, extra).await, db)
}

/// Agent, data plane and a control plane with its MCP port.
struct Full {
    agent: Proc,
    dp: Proc,
    cp: Cp,
    db: TestDb,
    _state: tempfile::TempDir,
}

async fn full(extra: &[&str]) -> Full {
    let state = tempfile::Builder::new()
        .prefix("cp-mcp-")
        .tempdir_in("/tmp")
        .unwrap();
    let agent = agent_proc(&state.path().join("agent"), &[]).await;
    let dp = dp_proc(&agent.url, &state.path().join("dp"), None).await;
    let db = TestDb::new(DatabaseDriver::Sqlite).await;
    let cp = start_cp(&db, &dp.url, extra).await;
    Full {
        agent,
        dp,
        cp,
        db,
        _state: state,
    }
}

impl Full {
    async fn stop(self) {
        self.cp.stop().await;
        self.dp.stop().await;
        self.agent.stop().await;
        self.db.cleanup().await;
    }
}

/// Collects progress notifications.
#[derive(Clone, Default)]
struct Client {
    progress: Arc<Mutex<Vec<ProgressNotificationParam>>>,
}

impl ClientHandler for Client {
    async fn on_progress(
        &self,
        params: ProgressNotificationParam,
        _context: NotificationContext<RoleClient>,
    ) {
        self.progress.lock().unwrap().push(params);
    }
}

type Session = RunningService<RoleClient, Client>;

async fn connect(mcp: &str, token: &str) -> Session {
    let transport = StreamableHttpClientTransport::with_client(
        reqwest::Client::new(),
        StreamableHttpClientTransportConfig::with_uri(format!("{mcp}/mcp")).auth_header(token),
    );
    Client::default().serve(transport).await.unwrap()
}

async fn call(c: &Session, tool: &str, args: Value) -> CallToolResult {
    let Value::Object(args) = args else {
        panic!("arguments must be an object")
    };
    c.call_tool(CallToolRequestParams::new(tool.to_owned()).with_arguments(args))
        .await
        .unwrap_or_else(|e| panic!("{tool}: protocol error {e}"))
}

fn structured(r: &CallToolResult) -> &Value {
    r.structured_content.as_ref().expect("structuredContent")
}

fn ok(r: CallToolResult) -> Value {
    assert_ne!(r.is_error, Some(true), "tool error: {r:?}");
    assert!(
        r.content.first().and_then(|c| c.as_text()).is_some(),
        "a text rendering comes first: {r:?}"
    );
    structured(&r).clone()
}

fn err_code(r: &CallToolResult) -> String {
    assert_eq!(r.is_error, Some(true), "expected a tool error: {r:?}");
    structured(r)["code"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn probes_metadata_and_unauthenticated_calls() {
    let (cp, db) = lone(&[]).await;
    let http = reqwest::Client::new();
    let r = http
        .get(format!("{}/healthz", cp.mcp))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // The protected-resource metadata names the configured issuer.
    let meta: Value = http
        .get(format!("{}/.well-known/oauth-protected-resource", cp.mcp))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(meta["authorization_servers"], json!(["sandbox-dev-idp"]));
    assert_eq!(meta["resource"], format!("{}/mcp", cp.mcp));
    assert_eq!(meta["bearer_methods_supported"], json!(["header"]));
    // No token, a bad token: 401 with the challenge, before any MCP message.
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"}}});
    for auth in [None, Some("Bearer not-a-jwt")] {
        let mut req = http
            .post(format!("{}/mcp", cp.mcp))
            .header("accept", "application/json, text/event-stream")
            .json(&init);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 401, "{auth:?}");
        let challenge = r
            .headers()
            .get("www-authenticate")
            .unwrap()
            .to_str()
            .unwrap()
            .to_owned();
        assert_eq!(
            challenge,
            format!(
                "Bearer resource_metadata=\"{}/.well-known/oauth-protected-resource\"",
                cp.mcp
            )
        );
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "unauthorized");
    }
    // The rmcp client sees the refusal too.
    let transport = StreamableHttpClientTransport::with_client(
        reqwest::Client::new(),
        StreamableHttpClientTransportConfig::with_uri(format!("{}/mcp", cp.mcp)),
    );
    assert!(Client::default().serve(transport).await.is_err());
    cp.stop().await;
    db.cleanup().await;
}

#[tokio::test]
async fn dns_rebinding_hosts_and_origins_are_refused() {
    let (cp, db) = lone(&[]).await;
    let http = reqwest::Client::new();
    let tok = token("acme", &["agent"]);
    let port = cp.mcp.rsplit(':').next().unwrap().to_owned();
    for (host, origin) in [
        (format!("evil.example:{port}"), None),
        (format!("localhost:{port}"), Some("http://evil.example")),
        (format!("localhost:{port}"), Some("null")),
    ] {
        let mut req = http
            .post(format!("{}/mcp", cp.mcp))
            .header("host", &host)
            .header("authorization", format!("Bearer {tok}"))
            .header("accept", "application/json, text/event-stream")
            .json(&json!({"jsonrpc": "2.0", "id": 1, "method": "ping"}));
        if let Some(o) = origin {
            req = req.header("origin", o);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 403, "{host} {origin:?}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["code"], "forbidden", "{body}");
    }
    // A local browser origin is fine.
    let r = http
        .get(format!("{}/.well-known/oauth-protected-resource", cp.mcp))
        .header("origin", "http://localhost:5173")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    cp.stop().await;
    db.cleanup().await;
}

#[tokio::test]
async fn tools_are_described_and_guarded_like_rest() {
    let (cp, db) = lone(&[]).await;
    let acme = connect(&cp.mcp, &token("acme", &["agent"])).await;
    let info = acme.peer_info().unwrap();
    assert!(info.capabilities.tools.is_some());
    let tools = acme.list_all_tools().await.unwrap();
    let names: Vec<&str> = tools.iter().map(|t| t.name.as_ref()).collect();
    for want in [
        "run_code",
        "get_job",
        "cancel_job",
        "list_jobs",
        "create_session",
        "run_step",
        "list_sessions",
        "close_session",
        "list_files",
        "read_file",
        "write_file",
        "list_runtimes",
        "get_artifact",
        "upload_artifact",
        "run_workflow",
        "get_workflow",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for t in &tools {
        assert!(
            t.description.as_ref().is_some_and(|d| d.len() > 20),
            "{}",
            t.name
        );
        assert_eq!(t.input_schema["type"], "object", "{}", t.name);
        let out = t
            .output_schema
            .as_ref()
            .unwrap_or_else(|| panic!("{}", t.name));
        assert_eq!(out["type"], "object", "{}", t.name);
        let a = t.annotations.as_ref().unwrap();
        assert!(a.read_only_hint.is_some() && a.destructive_hint.is_some());
        assert!(a.idempotent_hint.is_some());
        assert_eq!(a.open_world_hint, Some(false));
    }
    let run_code = tools.iter().find(|t| t.name == "run_code").unwrap();
    assert!(run_code.input_schema["properties"]["idempotencyKey"].is_object());
    assert_eq!(run_code.input_schema["required"], json!(["code"]));
    // The job schema's references resolve inside the schema.
    let job = serde_json::to_string(run_code.output_schema.as_ref().unwrap()).unwrap();
    assert!(!job.contains("#/components/"), "{job}");

    // Malformed arguments: a tool error naming the argument, never a
    // protocol failure.
    for (tool, args, names) in [
        ("run_code", json!({}), "code"),
        (
            "run_code",
            json!({"code": "1", "timeoutMs": "soon"}),
            "timeoutMs",
        ),
        ("run_code", json!({"code": "1", "bogus": true}), "bogus"),
        ("get_job", json!({"jobId": "../etc"}), "jobId"),
        (
            "run_step",
            json!({"sessionId": "a/b", "code": "1"}),
            "sessionId",
        ),
        (
            "write_file",
            json!({"sessionId": "s", "path": "x", "content": "!", "encoding": "base64"}),
            "content",
        ),
        ("list_jobs", json!({"limit": 0}), "limit"),
        (
            "run_workflow",
            json!({"steps": [{"code": "1", "bogus": 1}]}),
            "bogus",
        ),
        ("get_workflow", json!({"workflowId": "../x"}), "workflowId"),
        (
            "upload_artifact",
            json!({"name": "a.bin", "content": "!", "encoding": "base64"}),
            "content",
        ),
        (
            "upload_artifact",
            json!({"name": "a", "content": "x", "sessionId": "../x"}),
            "sessionId",
        ),
    ] {
        let r = call(&acme, tool, args.clone()).await;
        assert_eq!(err_code(&r), "invalid_argument", "{tool} {args}");
        let msg = structured(&r)["message"].as_str().unwrap().to_owned();
        assert!(msg.contains(names), "{tool} {args}: {msg}");
    }

    // Idempotency: the same key and arguments give the same job, without
    // waiting (the data plane is down: the job stays queued).
    let args = json!({"code": "print(1)", "idempotencyKey": "mcp-key-1", "waitMs": 0});
    let first = ok(call(&acme, "run_code", args.clone()).await);
    let again = ok(call(&acme, "run_code", args).await);
    assert_eq!(first["jobId"], again["jobId"]);
    assert_eq!(first["status"], "queued");
    let reused = call(
        &acme,
        "run_code",
        json!({"code": "print(2)", "idempotencyKey": "mcp-key-1", "waitMs": 0}),
    )
    .await;
    assert_eq!(err_code(&reused), "idempotency_key_reused");
    let job_id = first["jobId"].as_str().unwrap().to_owned();

    // Tenancy: another tenant's job does not exist.
    let globex = connect(&cp.mcp, &token("globex", &["agent"])).await;
    for tool in ["get_job", "cancel_job"] {
        let r = call(&globex, tool, json!({"jobId": job_id})).await;
        assert_eq!(err_code(&r), "job_not_found", "{tool}");
    }
    let r = call(&globex, "close_session", json!({"sessionId": "ses_nope"})).await;
    assert_eq!(err_code(&r), "session_not_found");
    let listed = ok(call(&globex, "list_jobs", json!({})).await);
    assert_eq!(listed["jobs"], json!([]));
    let listed = ok(call(&acme, "list_jobs", json!({"status": "queued"})).await);
    assert_eq!(listed["jobs"][0]["jobId"], job_id.as_str());

    // Policy: same action, same code as REST (secrets are denied by default,
    // and a tenant policy narrows further).
    let r = call(
        &acme,
        "run_code",
        json!({"code": "1", "runtime": "python", "packages": []}),
    )
    .await;
    assert_ne!(r.is_error, Some(true), "{r:?}");
    let admin = token("acme", &["admin"]);
    let (status, body) = call_at(
        &cp.rest,
        "PUT",
        "/v1/tenants/acme/policy",
        Some(&admin),
        Some(json!({"rego": "package sandbox.tenant\n\ndeny contains \"no jobs via mcp today\" if input.action == \"job.submit\"\n"})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let r = call(&acme, "run_code", json!({"code": "1", "waitMs": 0})).await;
    assert_eq!(err_code(&r), "policy_denied");
    let (status, rest) = call_at(
        &cp.rest,
        "POST",
        "/v1/jobs",
        Some(&token("acme", &["agent"])),
        Some(json!({"code": "1"})),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(
        structured(&r)["message"],
        rest["message"],
        "same message as REST"
    );

    // Audit: every call is an event naming the tool and the transport.
    let (status, audit) = call_at(
        &cp.rest,
        "GET",
        "/v1/audit?action=mcp.tool_call",
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(status, 200, "{audit}");
    let events = audit["events"].as_array().unwrap();
    assert!(
        events.iter().any(|e| e["resource"] == "tool/run_code"
            && e["details"]["transport"] == "mcp"
            && e["details"]["tool"] == "run_code"),
        "{audit}"
    );
    acme.cancel().await.unwrap();
    globex.cancel().await.unwrap();
    cp.stop().await;
    db.cleanup().await;
}

/// The smallest valid PNG (1x1, grey), written by plain Python.
const PNG_CODE: &str = r#"
import base64, os
os.makedirs("output", exist_ok=True)
png = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAAAAAA6fptVAAAACklEQVR4nGNgAAAAAgABSK+kcQAAAABJRU5ErkJggg==")
open("output/dot.png", "wb").write(png)
len(png)
"#;

#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn every_tool_against_real_sandboxes() {
    let s = full(&["--mcp-max-output-chars", "500"]).await;
    let c = connect(&s.cp.mcp, &token("acme", &["agent"])).await;

    let rt = ok(call(&c, "list_runtimes", json!({})).await);
    assert!(
        rt["runtimes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["name"] == "python"),
        "{rt}"
    );

    // One-shot code: the result, and a PNG under output/ as an image.
    let r = call(&c, "run_code", json!({"code": PNG_CODE})).await;
    let job = ok(r.clone());
    assert_eq!(job["status"], "succeeded", "{job}");
    assert!(
        r.content
            .iter()
            .any(|c| c.as_image().is_some_and(|i| i.mime_type == "image/png")),
        "{r:?}"
    );
    let artifact = job["output"]["artifacts"][0]["artifactId"]
        .as_str()
        .unwrap()
        .to_owned();
    let a = call(&c, "get_artifact", json!({"artifactId": artifact})).await;
    let av = ok(a.clone());
    assert_eq!(av["embedded"], true);
    assert!(av["downloadUrl"].as_str().unwrap().ends_with("/download"));
    assert!(a.content.iter().any(|c| c.as_resource().is_some()), "{a:?}");
    let id = job["jobId"].as_str().unwrap();
    let got = ok(call(&c, "get_job", json!({"jobId": id})).await);
    assert_eq!(got["jobId"], id);
    let r = call(&c, "cancel_job", json!({"jobId": id})).await;
    assert_eq!(err_code(&r), "job_finished");

    // An upload, read back through get_artifact (the same store as REST).
    let up = ok(call(
        &c,
        "upload_artifact",
        json!({"name": "notes.txt", "content": "hello from mcp"}),
    )
    .await);
    let uploaded = up["artifactId"].as_str().unwrap().to_owned();
    assert_eq!(up["size"], 14, "{up}");
    let a = call(&c, "get_artifact", json!({"artifactId": uploaded})).await;
    assert!(
        a.content.iter().any(|c| c
            .as_resource()
            .is_some_and(|r| format!("{r:?}").contains("hello from mcp"))),
        "{a:?}"
    );

    // Output capping, with the rest reachable through get_job.
    let big = ok(call(&c, "run_code", json!({"code": "print('x' * 5000)"})).await);
    let out = big["output"]["stdout"].as_str().unwrap();
    assert!(out.len() < 1000, "{}", out.len());
    assert!(out.contains("[truncated, 4501 more bytes"), "{out}");
    let next = ok(call(
        &c,
        "get_job",
        json!({"jobId": big["jobId"], "outputOffset": 4800}),
    )
    .await);
    assert_eq!(
        next["output"]["stdout"].as_str().unwrap(),
        format!("{}\n", "x".repeat(200))
    );

    // A session across several calls.
    let ses = ok(call(&c, "create_session", json!({})).await);
    let sid = ses["sessionId"].as_str().unwrap().to_owned();
    ok(call(&c, "run_step", json!({"sessionId": sid, "code": "x = 41"})).await);
    let step = ok(call(&c, "run_step", json!({"sessionId": sid, "code": "x + 1"})).await);
    assert_eq!(step["result"], 42, "{step}");
    let listed = ok(call(&c, "list_sessions", json!({})).await);
    assert!(
        listed["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["sessionId"] == sid.as_str())
    );

    // Files: text and base64 round trips, paging.
    ok(call(
        &c,
        "write_file",
        json!({"sessionId": sid, "path": "notes/a.txt", "content": "hello"}),
    )
    .await);
    ok(call(
        &c,
        "write_file",
        json!({"sessionId": sid, "path": "b.bin", "content": "AAEC/w==", "encoding": "base64"}),
    )
    .await);
    let f = ok(call(
        &c,
        "read_file",
        json!({"sessionId": sid, "path": "notes/a.txt"}),
    )
    .await);
    assert_eq!(
        (f["content"].as_str(), f["encoding"].as_str()),
        (Some("hello"), Some("text"))
    );
    let f = ok(call(
        &c,
        "read_file",
        json!({"sessionId": sid, "path": "notes/a.txt", "encoding": "base64"}),
    )
    .await);
    assert_eq!(f["content"], "aGVsbG8=");
    let f = ok(call(&c, "read_file", json!({"sessionId": sid, "path": "b.bin"})).await);
    assert_eq!(
        (f["content"].as_str(), f["encoding"].as_str()),
        (Some("AAEC/w=="), Some("base64"))
    );
    ok(call(
        &c,
        "run_step",
        json!({"sessionId": sid, "code": "open('big.txt','w').write('y' * 2000)"}),
    )
    .await);
    let f = ok(call(
        &c,
        "read_file",
        json!({"sessionId": sid, "path": "big.txt"}),
    )
    .await);
    assert_eq!(
        (f["truncated"].as_bool(), f["nextOffset"].as_u64()),
        (Some(true), Some(500))
    );
    let files = ok(call(&c, "list_files", json!({"sessionId": sid})).await);
    assert!(
        files["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["path"] == "b.bin"),
        "{files}"
    );
    let files = ok(call(&c, "list_files", json!({"sessionId": sid, "path": "notes"})).await);
    assert!(
        files["files"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["path"] == "notes/a.txt"),
        "{files}"
    );

    // An image from a step.
    let r = call(&c, "run_step", json!({"sessionId": sid, "code": PNG_CODE})).await;
    assert!(r.content.iter().any(|c| c.as_image().is_some()), "{r:?}");

    // Progress notifications carry output while the step runs.
    let code = "import time, sys\nfor i in range(5):\n    print('tick', i, flush=True)\n    time.sleep(0.25)\n'done'";
    let Value::Object(args) = json!({"sessionId": sid, "code": code}) else {
        unreachable!()
    };
    let handle = c
        .send_cancellable_request(
            ClientRequest::CallToolRequest(Request::new(
                CallToolRequestParams::new("run_step").with_arguments(args),
            )),
            PeerRequestOptions::no_options(),
        )
        .await
        .unwrap();
    let ServerResult::CallToolResult(r) = handle.await_response().await.unwrap() else {
        panic!("not a tool result")
    };
    assert_eq!(ok(r)["result"], "done");
    let progress = c.service().progress.lock().unwrap().clone();
    let text: String = progress.iter().filter_map(|p| p.message.clone()).collect();
    assert!(
        text.contains("[stdout] tick 0") && text.contains("tick 4"),
        "{progress:?}"
    );

    // Another tenant cannot touch the session.
    let g = connect(&s.cp.mcp, &token("globex", &["agent"])).await;
    for (tool, args) in [
        ("run_step", json!({"sessionId": sid, "code": "x"})),
        (
            "read_file",
            json!({"sessionId": sid, "path": "notes/a.txt"}),
        ),
        ("close_session", json!({"sessionId": sid})),
    ] {
        let r = call(&g, tool, args).await;
        assert_eq!(err_code(&r), "session_not_found", "{tool}");
    }
    let r = call(&g, "get_artifact", json!({"artifactId": artifact})).await;
    assert_eq!(err_code(&r), "artifact_not_found");
    let r = call(&g, "get_artifact", json!({"artifactId": uploaded})).await;
    assert_eq!(err_code(&r), "artifact_not_found");

    let closed = ok(call(&c, "close_session", json!({"sessionId": sid})).await);
    assert_eq!(closed["closed"], true);
    let r = call(&c, "run_step", json!({"sessionId": sid, "code": "x"})).await;
    assert_eq!(err_code(&r), "session_not_found");
    c.cancel().await.unwrap();
    g.cancel().await.unwrap();
    s.stop().await;
}

/// The MCP tools `run_workflow` and `get_workflow` run the smallest plan
/// (the same domain function as `POST /v1/workflows`).
#[tokio::test]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn run_workflow_runs_the_smallest_plan() {
    let s = full(&[]).await;
    let c = connect(&s.cp.mcp, &token("acme", &["agent"])).await;
    let r = call(
        &c,
        "run_workflow",
        json!({"runtime": "python", "steps": [{"code": "x = 41"}, {"code": "print(x + 1)"}], "waitMs": 60000}),
    )
    .await;
    let w = ok(r.clone());
    assert_eq!(w["status"], "succeeded", "{w}");
    assert_eq!(w["steps"][1]["output"]["stdout"], "42\n", "{w}");
    let text = r.content[0].as_text().unwrap().text.clone();
    assert!(text.contains("steps[1]: succeeded"), "{text}");
    let id = w["workflowId"].as_str().unwrap();
    let got = ok(call(&c, "get_workflow", json!({"workflowId": id})).await);
    assert_eq!(got["workflowId"], id);
    // A malformed plan: the same code and field as REST.
    let r = call(&c, "run_workflow", json!({"steps": []})).await;
    assert_eq!(err_code(&r), "invalid_argument");
    assert!(
        structured(&r)["message"]
            .as_str()
            .unwrap()
            .contains("steps")
    );
    let g = connect(&s.cp.mcp, &token("globex", &["agent"])).await;
    let r = call(&g, "get_workflow", json!({"workflowId": id})).await;
    assert_eq!(err_code(&r), "workflow_not_found");
    c.cancel().await.unwrap();
    g.cancel().await.unwrap();
    s.stop().await;
}
