//! Issue 19 §5: OpenTelemetry end to end. An OTLP/HTTP receiver runs in this
//! process on a loopback port; the three binaries (agent, data plane,
//! control plane) export to it; a job submitted through the REST API must
//! arrive as one trace with spans from all three processes, its ids as
//! attributes, and the data plane's JSON log lines must carry that trace id.
#![allow(clippy::disallowed_methods)] // the test runs the three real binaries
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;

/// One span as the receiver got it.
#[derive(Debug, Clone)]
struct Received {
    service: String,
    trace_id: String,
    name: String,
    attributes: HashMap<String, String>,
    /// Trace ids of the span's links.
    links: Vec<String>,
    /// The whole span as received (attributes, events and their
    /// attributes, status message), for searches a field list would miss.
    dump: String,
}

fn text(v: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

/// An OTLP/HTTP (protobuf) trace receiver on an ephemeral loopback port.
async fn receiver() -> (String, Arc<Mutex<Vec<Received>>>) {
    let spans: Arc<Mutex<Vec<Received>>> = Arc::default();
    let sink = spans.clone();
    let app = axum::Router::new().route(
        "/v1/traces",
        axum::routing::post(move |body: Bytes| {
            let sink = sink.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).unwrap();
                let mut out = sink.lock().unwrap();
                for rs in req.resource_spans {
                    let service = rs
                        .resource
                        .as_ref()
                        .and_then(|r| r.attributes.iter().find(|a| a.key == "service.name"))
                        .map(|a| text(a.value.as_ref()))
                        .unwrap_or_default();
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            out.push(Received {
                                service: service.clone(),
                                trace_id: hex::encode(&s.trace_id),
                                name: s.name.clone(),
                                attributes: s
                                    .attributes
                                    .iter()
                                    .map(|a| (a.key.clone(), text(a.value.as_ref())))
                                    .collect(),
                                links: s.links.iter().map(|l| hex::encode(&l.trace_id)).collect(),
                                dump: format!("{s:?}"),
                            });
                        }
                    }
                }
                // An empty ExportTraceServiceResponse.
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, spans)
}

/// Another plane's binary, next to this crate's (`make test` builds every
/// binary first).
fn sibling_binary(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_BIN_EXE_control-plane")).with_file_name(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (`cargo build -p session-agent -p data-plane`, or run `make test`)",
        path.display()
    );
    path.display().to_string()
}

fn free_ports() -> [u16; 4] {
    let l: Vec<std::net::TcpListener> = (0..4)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    [0, 1, 2, 3].map(|i| l[i].local_addr().unwrap().port())
}

/// A plane's process; stopped with SIGTERM (its graceful path, which
/// flushes the exporter), killed if the test ends first.
struct Plane(Option<std::process::Child>);

impl Plane {
    /// SIGTERM, then wait for the exit (bounded).
    fn stop(&mut self) {
        let Some(mut child) = self.0.take() else {
            return;
        };
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                assert!(status.success(), "exit status {status}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the plane did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

async fn wait_http(url: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = reqwest::get(url).await
            && r.status().is_success()
        {
            return;
        }
        assert!(Instant::now() < deadline, "{url} did not come up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The three planes on loopback, exporting to a receiver in this process,
/// and a token of `tenant` for the control plane's REST API.
struct Planes {
    _dir: tempfile::TempDir,
    spans: Arc<Mutex<Vec<Received>>>,
    base: String,
    /// The control plane's MCP port.
    mcp: String,
    token: String,
    dp_log: std::path::PathBuf,
    cp: Plane,
    dp: Plane,
    agent: Plane,
}

impl Planes {
    async fn start(tenant: &str) -> Planes {
        Planes::start_with(tenant, None).await
    }

    /// With `secret` (name, value) in the data plane's `SECRETS_DIR` for
    /// `tenant`, and a platform policy allowing that name to it.
    async fn start_with(tenant: &str, secret: Option<(&str, &str)>) -> Planes {
        let dir = tempfile::Builder::new()
            .prefix("cp-otel-")
            .tempdir_in("/tmp")
            .unwrap();
        let cwd = dir.path();
        let (otlp, spans) = receiver().await;
        let [agent_port, dp_port, cp_port, mcp_port] = free_ports();
        let isolation = std::env::var("SESSION_ISOLATION").unwrap_or_else(|_| "gvisor".into());
        let dp_log = cwd.join("data-plane.log");
        // Every plane on the development keys of one directory (.local/).
        let spawn = |bin: &str, envs: &[(&str, String)], log: Option<&std::path::Path>| {
            let mut cmd = Command::new(bin);
            cmd.current_dir(cwd)
                .env_remove("AUTH_JWT_SECRET")
                .env_remove("DATA_PLANE_JWT_SECRET")
                .env_remove("SESSION_AGENT_ADMIN_TOKEN")
                .env_remove("OTEL_SERVICE_NAME")
                .env("ENV", "dev")
                .env("RUST_LOG", "info")
                .env("LOG_FORMAT", "json")
                .env("OTEL_EXPORTER_OTLP_ENDPOINT", &otlp);
            for (k, v) in envs {
                cmd.env(k, v);
            }
            match log {
                Some(path) => {
                    cmd.stdout(std::fs::File::create(path).unwrap());
                }
                None => {
                    cmd.stdout(Stdio::null());
                }
            }
            Plane(Some(cmd.spawn().unwrap()))
        };
        let state = |name: &str| cwd.join(name).display().to_string();
        if let Some((name, value)) = secret {
            let d = cwd.join("secrets").join(tenant);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(name), value).unwrap();
            std::fs::write(
                cwd.join("platform.rego"),
                format!(
                    "package sandbox.platform\n\nallowed_secrets := {{\"{tenant}\": {{\"{name}\"}}}}\n\n\
                     deny contains msg if {{\n\tsome n in object.get(input.request, \"secrets\", [])\n\
                     \tnot object.get(allowed_secrets, input.identity.tenant, set())[n]\n\
                     \tmsg := sprintf(\"secret %q is not allowed\", [n])\n}}\n"
                ),
            )
            .unwrap();
        }
        let agent = spawn(
            &sibling_binary("session-agent"),
            &[
                ("SESSION_AGENT_ADDR", format!("127.0.0.1:{agent_port}")),
                ("SESSION_ISOLATION", isolation),
                ("SESSION_AGENT_STATE_DIR", state("agent")),
            ],
            None,
        );
        wait_http(&format!("http://127.0.0.1:{agent_port}/v1/health")).await;
        let dp = spawn(
            &sibling_binary("data-plane"),
            &[
                (
                    "SESSION_AGENT_ENDPOINT",
                    format!("http://127.0.0.1:{agent_port}"),
                ),
                ("SESSION_RUNTIME_BACKEND", "local".into()),
                ("DATA_PLANE_ADDR", format!("127.0.0.1:{dp_port}")),
                ("ARTIFACT_ROOT", state("artifacts")),
            ]
            .into_iter()
            .chain(secret.map(|_| ("SECRETS_DIR", state("secrets"))))
            .collect::<Vec<_>>(),
            Some(&dp_log),
        );
        wait_http(&format!("http://127.0.0.1:{dp_port}/healthz")).await;
        let cp = spawn(
            env!("CARGO_BIN_EXE_control-plane"),
            &[
                ("DATA_PLANE_URL", format!("http://127.0.0.1:{dp_port}")),
                ("CONTROL_PLANE_ADDR", format!("127.0.0.1:{cp_port}")),
                ("MCP_ADDR", format!("127.0.0.1:{mcp_port}")),
            ]
            .into_iter()
            .chain(secret.map(|_| ("POLICY_DEFAULT_PATH", state("platform.rego"))))
            .collect::<Vec<_>>(),
            None,
        );
        let base = format!("http://127.0.0.1:{cp_port}");
        let mcp = format!("http://127.0.0.1:{mcp_port}");
        wait_http(&format!("{base}/readyz")).await;

        let out = Command::new(env!("CARGO_BIN_EXE_control-plane"))
            .current_dir(cwd)
            .env_remove("AUTH_JWT_SECRET")
            .env("ENV", "dev")
            .args(["token", "--tenant", tenant, "--roles", "agent"])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let token = String::from_utf8(out.stdout).unwrap().trim().to_owned();
        Planes {
            _dir: dir,
            spans,
            base,
            mcp,
            token,
            dp_log,
            cp,
            dp,
            agent,
        }
    }

    /// Stops the planes on their graceful path (which flushes each
    /// exporter); every span received, and the data plane's log.
    async fn stop(self) -> (Vec<Received>, String) {
        let Planes {
            _dir,
            spans,
            dp_log,
            mut cp,
            mut dp,
            mut agent,
            ..
        } = self;
        tokio::task::spawn_blocking(move || {
            cp.stop();
            dp.stop();
            agent.stop();
        })
        .await
        .unwrap();
        let log = std::fs::read_to_string(&dp_log).unwrap();
        (spans.lock().unwrap().clone(), log)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn a_jobs_spans_from_all_three_processes_share_one_trace() {
    let planes = Planes::start("otel-tenant").await;
    let (base, token) = (planes.base.clone(), planes.token.clone());

    // An outside caller's trace context: linked by the public edge, never
    // joined.
    let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let code = "print('otel-canary-' + str(6 * 7))";
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{base}/v1/jobs"))
        .bearer_auth(&token)
        .header(
            "traceparent",
            format!("00-{caller_trace}-00f067aa0ba902b7-01"),
        )
        .json(&serde_json::json!({ "code": code }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let job: serde_json::Value = resp.json().await.unwrap();
    let id = job["jobId"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(120);
    let done = loop {
        let j: serde_json::Value = http
            .get(format!("{base}/v1/jobs/{id}?waitMs=5000"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if matches!(
            j["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            break j;
        }
        assert!(Instant::now() < deadline, "job still {j}");
    };
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(
        done["output"]["stdout"]
            .as_str()
            .unwrap()
            .contains("otel-canary-42"),
        "{done}"
    );

    // A session step, streamed (SSE through both hops): a trace of its own.
    let resp = http
        .post(format!("{base}/v1/sessions"))
        .bearer_auth(&token)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 201);
    let session: serde_json::Value = resp.json().await.unwrap();
    let sid = session["sessionId"].as_str().unwrap().to_owned();
    let streamed = http
        .post(format!("{base}/v1/sessions/{sid}/steps"))
        .bearer_auth(&token)
        .header("accept", "text/event-stream")
        .json(&serde_json::json!({ "code": "print('otel-canary-stream')" }))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(streamed.contains("event: result"), "{streamed}");
    let resp = http
        .delete(format!("{base}/v1/sessions/{sid}"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 204);

    // The graceful path of each plane flushes its exporter.
    let (spans, log) = planes.stop().await;
    let submit = spans
        .iter()
        .find(|s| s.service == "control-plane" && s.name == "POST /v1/jobs")
        .unwrap_or_else(|| panic!("no span of the submission: {spans:#?}"));
    assert_eq!(submit.attributes.get("job_id"), Some(&id), "{submit:?}");
    assert_eq!(
        submit.attributes.get("tenant_id").map(String::as_str),
        Some("otel-tenant"),
        "{submit:?}"
    );
    let trace = submit.trace_id.clone();
    assert_ne!(trace, caller_trace, "the edge joined an outside trace");
    assert!(
        submit.links.contains(&caller_trace.to_owned()),
        "the caller's trace is linked: {submit:?}"
    );

    let in_trace: Vec<&Received> = spans.iter().filter(|s| s.trace_id == trace).collect();
    let services: BTreeSet<&str> = in_trace.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        services,
        BTreeSet::from(["control-plane", "data-plane", "session-agent"]),
        "{in_trace:#?}"
    );
    let find = |service: &str, name: &str| {
        in_trace
            .iter()
            .find(|s| s.service == service && s.name == name)
            .unwrap_or_else(|| panic!("no {service} span {name} in the job's trace: {in_trace:#?}"))
    };
    let dispatch = find("control-plane", "job.dispatch");
    assert_eq!(dispatch.attributes.get("job_id"), Some(&id));
    let run = find("data-plane", "job.run");
    assert_eq!(run.attributes.get("job_id"), Some(&id));
    assert_eq!(
        run.attributes.get("tenant_id").map(String::as_str),
        Some("otel-tenant")
    );
    let step = find("data-plane", "session.step");
    let session = step.attributes.get("session_id").cloned().unwrap();
    assert!(session.starts_with("ses"), "{step:?}");
    // A job's one step carries the job's id.
    assert_eq!(step.attributes.get("step_id"), Some(&id));
    let agent_step = find("session-agent", "step.run");
    assert_eq!(agent_step.attributes.get("session_id"), Some(&session));
    assert_eq!(agent_step.attributes.get("step_id"), Some(&id));
    // The agent's request spans joined too (POST /v1/sessions, /v1/steps).
    assert!(
        in_trace
            .iter()
            .any(|s| s.service == "session-agent" && s.name == "POST /v1/steps"),
        "{in_trace:#?}"
    );

    // The streamed step: one trace from the control plane to the agent,
    // not the job's.
    let step_request = spans
        .iter()
        .find(|s| s.service == "control-plane" && s.name == "POST /v1/sessions/{id}/steps")
        .unwrap_or_else(|| panic!("no span of the step request: {spans:#?}"));
    assert_eq!(step_request.attributes.get("session_id"), Some(&sid));
    let step_id = step_request.attributes.get("step_id").cloned().unwrap();
    assert_ne!(step_request.trace_id, trace);
    let step_trace: Vec<&Received> = spans
        .iter()
        .filter(|s| s.trace_id == step_request.trace_id)
        .collect();
    assert!(
        step_trace.iter().any(|s| s.service == "data-plane"
            && s.name == "session.step"
            && s.attributes.get("step_id") == Some(&step_id)),
        "{step_trace:#?}"
    );
    assert!(
        step_trace.iter().any(|s| s.service == "session-agent"
            && s.name == "step.run"
            && s.attributes.get("session_id") == Some(&sid)),
        "{step_trace:#?}"
    );

    // Never the code or its output in any span.
    for s in &spans {
        for (k, v) in &s.attributes {
            assert!(
                !v.contains("otel-canary") && !v.contains("6 * 7"),
                "{k}={v} in {s:?}"
            );
        }
    }

    // The data plane's JSON log lines inside the job carry its trace id.
    let finished = log
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|l| l["fields"]["message"] == "job finished")
        .unwrap_or_else(|| panic!("no `job finished` line: {log}"));
    assert_eq!(finished["trace_id"], trace.as_str(), "{finished}");
    assert_eq!(
        finished["span_id"].as_str().unwrap().len(),
        16,
        "{finished}"
    );
}

/// Issue 19 §5 for workflows: the smallest plan's worker continues the
/// POST's trace (kept on the workflow's row), so its session, both steps
/// and the teardown arrive from all three processes under the POST's trace
/// id, the worker's spans carrying the workflow's, tenant's and session's
/// ids and the step's index, never the plan's code or output.
/// The secrets canary's "traces" place (issue 19 §4; the other places are
/// searched by `tests/secrets.rs`): a job, a streamed session step and a
/// workflow that print or raise a secret's value export spans from all
/// three processes, and no span (attributes, events, status) holds it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn a_secrets_value_reaches_no_span() {
    let value = format!("canary-{}", hex::encode(rand::random::<[u8; 12]>()));
    let planes = Planes::start_with("otel-secret-tenant", Some(("API_TOKEN", &value))).await;
    let (base, token) = (planes.base.clone(), planes.token.clone());
    let http = reqwest::Client::new();
    let post = |path: &str, body: serde_json::Value| {
        http.post(format!("{base}{path}"))
            .bearer_auth(&token)
            .json(&body)
            .send()
    };
    let get = |path: String| http.get(format!("{base}{path}")).bearer_auth(&token).send();
    // Jobs: one prints it, one raises it.
    for code in [
        "import os\nprint(os.environ['API_TOKEN'])",
        "import os\nraise RuntimeError(os.environ['API_TOKEN'])",
    ] {
        let r = post(
            "/v1/jobs",
            serde_json::json!({"code": code, "secrets": ["API_TOKEN"]}),
        )
        .await
        .unwrap();
        assert_eq!(r.status().as_u16(), 202);
        let id = r.json::<serde_json::Value>().await.unwrap()["jobId"]
            .as_str()
            .unwrap()
            .to_owned();
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let j: serde_json::Value = get(format!("/v1/jobs/{id}?waitMs=5000"))
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            if matches!(j["status"].as_str(), Some("succeeded" | "failed")) {
                assert!(!j.to_string().contains(&value), "{j}");
                break;
            }
            assert!(Instant::now() < deadline, "job still {j}");
        }
    }
    // A session whose step streams it (SSE through both hops).
    let r = post(
        "/v1/sessions",
        serde_json::json!({"secrets": ["API_TOKEN"]}),
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    let sid = r.json::<serde_json::Value>().await.unwrap()["sessionId"]
        .as_str()
        .unwrap()
        .to_owned();
    let streamed = http
        .post(format!("{base}/v1/sessions/{sid}/steps"))
        .bearer_auth(&token)
        .header("accept", "text/event-stream")
        .json(&serde_json::json!({"code": "import os\nprint(os.environ['API_TOKEN'])"}))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(streamed.contains("***"), "{streamed}");
    assert!(!streamed.contains(&value), "{streamed}");
    // A workflow whose second step prints it.
    let r = post(
        "/v1/workflows",
        serde_json::json!({"secrets": ["API_TOKEN"], "steps": [
            {"code": "import os\nt = os.environ['API_TOKEN']"}, {"code": "print(t)"}]}),
    )
    .await
    .unwrap();
    assert_eq!(r.status().as_u16(), 202);
    let wid = r.json::<serde_json::Value>().await.unwrap()["workflowId"]
        .as_str()
        .unwrap()
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let w: serde_json::Value = get(format!("/v1/workflows/{wid}?waitMs=5000"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if !matches!(w["status"].as_str(), Some("queued" | "running")) {
            assert_eq!(w["status"], "succeeded", "{w}");
            assert_eq!(w["steps"][1]["output"]["stdout"], "***\n", "{w}");
            break;
        }
        assert!(Instant::now() < deadline, "workflow still {w}");
    }

    let (spans, dp_log) = planes.stop().await;
    let services: std::collections::BTreeSet<&str> =
        spans.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        services,
        ["control-plane", "data-plane", "session-agent"].into(),
        "spans from all three processes were searched"
    );
    for s in &spans {
        assert!(
            !s.dump.contains(&value),
            "the secret's value is in a {} span {:?}",
            s.service,
            s.name
        );
    }
    assert!(
        !dp_log.contains(&value),
        "the value is in the data plane's log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn a_workflows_spans_from_all_three_processes_share_the_posts_trace() {
    let planes = Planes::start("otel-wf-tenant").await;
    let (base, token) = (planes.base.clone(), planes.token.clone());
    let http = reqwest::Client::new();
    let resp = http
        .post(format!("{base}/v1/workflows"))
        .bearer_auth(&token)
        .json(&serde_json::json!({
            "runtime": "python",
            "steps": [{"code": "x = 41"}, {"code": "print('otel-canary-' + str(x + 1))"}],
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 202);
    let wf: serde_json::Value = resp.json().await.unwrap();
    let id = wf["workflowId"].as_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(180);
    let done = loop {
        let w: serde_json::Value = http
            .get(format!("{base}/v1/workflows/{id}?waitMs=5000"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if matches!(
            w["status"].as_str(),
            Some("succeeded" | "failed" | "cancelled")
        ) {
            break w;
        }
        assert!(Instant::now() < deadline, "workflow still {w}");
    };
    assert_eq!(done["status"], "succeeded", "{done}");
    assert!(
        done["steps"][1]["output"]["stdout"]
            .as_str()
            .unwrap()
            .contains("otel-canary-42"),
        "{done}"
    );
    let sid = done["sessionId"].as_str().unwrap().to_owned();

    let (spans, _) = planes.stop().await;
    let submit = spans
        .iter()
        .find(|s| s.service == "control-plane" && s.name == "POST /v1/workflows")
        .unwrap_or_else(|| panic!("no span of the submission: {spans:#?}"));
    assert_eq!(
        submit.attributes.get("workflow_id"),
        Some(&id),
        "{submit:?}"
    );
    assert_eq!(
        submit.attributes.get("tenant_id").map(String::as_str),
        Some("otel-wf-tenant"),
        "{submit:?}"
    );
    let trace = submit.trace_id.clone();
    let in_trace: Vec<&Received> = spans.iter().filter(|s| s.trace_id == trace).collect();
    let services: BTreeSet<&str> = in_trace.iter().map(|s| s.service.as_str()).collect();
    assert_eq!(
        services,
        BTreeSet::from(["control-plane", "data-plane", "session-agent"]),
        "{in_trace:#?}"
    );
    let run = in_trace
        .iter()
        .find(|s| s.service == "control-plane" && s.name == "workflow.run")
        .unwrap_or_else(|| panic!("no workflow.run in the POST's trace: {in_trace:#?}"));
    assert_eq!(run.attributes.get("workflow_id"), Some(&id), "{run:?}");
    assert_eq!(
        run.attributes.get("tenant_id").map(String::as_str),
        Some("otel-wf-tenant")
    );
    assert_eq!(run.attributes.get("session_id"), Some(&sid), "{run:?}");
    // One worker span per step, in the POST's trace, each with its index;
    // the step ids they carry are the ones the data plane and the agent ran.
    for index in ["0", "1"] {
        let step = in_trace
            .iter()
            .find(|s| {
                s.service == "control-plane"
                    && s.name == "workflow.step"
                    && s.attributes.get("step_index").map(String::as_str) == Some(index)
            })
            .unwrap_or_else(|| panic!("no workflow.step {index}: {in_trace:#?}"));
        assert_eq!(step.attributes.get("workflow_id"), Some(&id), "{step:?}");
        assert_eq!(step.attributes.get("session_id"), Some(&sid), "{step:?}");
        assert_eq!(
            step.attributes.get("tenant_id").map(String::as_str),
            Some("otel-wf-tenant")
        );
        let step_id = step.attributes.get("step_id").cloned().unwrap();
        assert!(
            in_trace.iter().any(|s| s.service == "data-plane"
                && s.name == "session.step"
                && s.attributes.get("step_id") == Some(&step_id)),
            "{in_trace:#?}"
        );
        assert!(
            in_trace.iter().any(|s| s.service == "session-agent"
                && s.name == "step.run"
                && s.attributes.get("step_id") == Some(&step_id)
                && s.attributes.get("session_id") == Some(&sid)),
            "{in_trace:#?}"
        );
    }
    // The session's creation (the agent's span names it) and its teardown
    // are in the trace too.
    assert!(
        in_trace.iter().any(|s| s.service == "session-agent"
            && s.name == "POST /v1/sessions"
            && s.attributes.get("session_id") == Some(&sid)),
        "{in_trace:#?}"
    );
    assert!(
        in_trace
            .iter()
            .any(|s| s.service == "data-plane" && s.name.starts_with("DELETE ")),
        "{in_trace:#?}"
    );
    for s in &spans {
        for (k, v) in &s.attributes {
            assert!(
                !v.contains("otel-canary") && !v.contains("x + 1") && !v.contains("x = 41"),
                "{k}={v} in {s:?}"
            );
        }
    }
}

/// A bad OpenTelemetry value stops start-up (exit 2) with one line naming
/// the variable, before any socket is bound.
#[test]
fn a_bad_otel_value_stops_start_up_naming_the_variable() {
    for (var, value) in [
        ("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
        ("OTEL_TRACES_SAMPLER", "sometimes"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_control-plane"))
            .env("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
            .env(var, value)
            .env("CONTROL_PLANE_ADDR", "127.0.0.1:0")
            .env("MCP_ADDR", "")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{var}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(var), "{var}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_control-plane"))
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", "https://collector:4318")
        .env("MCP_ADDR", "")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("OTEL_EXPORTER_OTLP_ENDPOINT"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Issue 19 §5 through the MCP port: a `run_code` tool call's job joins
/// the MCP request's trace, and the job's id lands on the call's
/// `mcp.tool` span (rmcp runs the tool under a span of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs: runsc and root (make deps; make test-integration)"]
async fn an_mcp_tool_calls_job_joins_the_mcp_requests_trace() {
    let planes = Planes::start("otel-mcp-tenant").await;
    let http = reqwest::Client::new();
    let call = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call",
        "params": {"name": "run_code", "arguments": {"code": "print('otel-canary-' + str(6 * 7))"}}});
    let resp = http
        .post(format!("{}/mcp", planes.mcp))
        .bearer_auth(&planes.token)
        .header("accept", "application/json, text/event-stream")
        .json(&call)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    let body: serde_json::Value = resp.json().await.unwrap();
    let job = &body["result"]["structuredContent"];
    assert_eq!(job["status"], "succeeded", "{body}");
    let id = job["jobId"].as_str().unwrap().to_owned();

    let (spans, _) = planes.stop().await;
    let tool = spans
        .iter()
        .find(|s| s.service == "control-plane" && s.name == "mcp.tool run_code")
        .unwrap_or_else(|| panic!("no mcp.tool span: {spans:#?}"));
    assert_eq!(tool.attributes.get("job_id"), Some(&id), "{tool:?}");
    assert_eq!(
        tool.attributes.get("tenant_id").map(String::as_str),
        Some("otel-mcp-tenant")
    );
    let in_trace: Vec<&Received> = spans
        .iter()
        .filter(|s| s.trace_id == tool.trace_id)
        .collect();
    assert!(
        in_trace.iter().any(|s| s.service == "control-plane"
            && s.name == "POST /mcp"
            && s.attributes.get("tenant_id").map(String::as_str) == Some("otel-mcp-tenant")),
        "{in_trace:#?}"
    );
    assert!(
        in_trace.iter().any(|s| s.service == "control-plane"
            && s.name == "job.dispatch"
            && s.attributes.get("job_id") == Some(&id)),
        "{in_trace:#?}"
    );
    assert!(
        in_trace
            .iter()
            .any(|s| s.service == "session-agent" && s.name == "step.run"),
        "{in_trace:#?}"
    );
    for s in &spans {
        for (k, v) in &s.attributes {
            assert!(
                !v.contains("otel-canary") && !v.contains("6 * 7"),
                "{k}={v} in {s:?}"
            );
        }
    }
}

/// Issue 19 §5 on the MCP port: its request spans carry the verified
/// tenant, as the REST port's do (its requests pass `mcp::guard`, then the
/// REST API's authentication); a refused caller's span has none. A tool
/// call runs under an `mcp.tool` span in the request's trace, with the
/// tenant and the tool's name (where the services record the ids they make).
#[tokio::test(flavor = "current_thread")]
async fn mcp_port_spans_carry_the_tenant() {
    use tower::ServiceExt;
    let capture = shared::telemetry::testing::SpanCapture::start();
    let db = common::TestDb::new(control_plane::config::DatabaseDriver::Sqlite).await;
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let config =
        <control_plane::Config as clap::Parser>::parse_from(common::cp_args(&db, &closed, &[]));
    let app = control_plane::App::build_with_db(config, db.connect().await).unwrap();
    let router = control_plane::mcp::router(app);
    let call = |auth: Option<&str>, body: serde_json::Value| {
        let mut req = axum::http::Request::post("/mcp")
            .header("host", "localhost")
            .header("content-type", "application/json")
            .header("accept", "application/json, text/event-stream");
        if let Some(token) = auth {
            req = req.header("authorization", format!("Bearer {token}"));
        }
        let router = router.clone();
        async move {
            let resp = router
                .oneshot(req.body(axum::body::Body::from(body.to_string())).unwrap())
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
                .await
                .unwrap();
            (status, String::from_utf8_lossy(&body).into_owned())
        }
    };
    let init = serde_json::json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {},
        "clientInfo": {"name": "t", "version": "1"}}});
    let tok = common::token("otel-mcp-tenant", &["agent"]);
    let (status, body) = call(Some(&tok), init.clone()).await;
    assert_eq!(status, 200, "{body}");
    let list = serde_json::json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call",
        "params": {"name": "list_jobs", "arguments": {}}});
    let (status, body) = call(Some(&tok), list).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("\"isError\":false"), "{body}");
    let (status, body) = call(None, init).await;
    assert_eq!(status, 401, "{body}");

    // The list_jobs request's span can end well after its response under
    // load (a handle is held by the database driver's worker): at most 30 s
    // are waited for it. The initialize and the refused request touch no
    // database and always end with their responses.
    let requests = capture.wait_named("POST /mcp", 3).await;
    let status = |r: &shared::telemetry::testing::CapturedSpan| {
        r.attributes
            .get("http.response.status_code")
            .cloned()
            .unwrap_or_default()
    };
    assert!(
        requests.iter().any(|r| status(r) == "200") && requests.iter().any(|r| status(r) == "401"),
        "{requests:#?}"
    );
    for r in &requests {
        let tenant = r.attributes.get("tenant_id").map(String::as_str);
        match r
            .attributes
            .get("http.response.status_code")
            .map(String::as_str)
        {
            Some("200") => assert_eq!(tenant, Some("otel-mcp-tenant"), "{r:?}"),
            Some("401") => assert_eq!(tenant, None, "{r:?}"),
            other => panic!("status {other:?}: {r:?}"),
        }
    }
    let tools = capture.wait_named("mcp.tool list_jobs", 1).await;
    let [tool] = tools.as_slice() else {
        panic!("one mcp.tool span: {:#?}", capture.spans());
    };
    assert_eq!(
        tool.attributes.get("tenant_id").map(String::as_str),
        Some("otel-mcp-tenant")
    );
    assert_eq!(
        tool.attributes.get("tool").map(String::as_str),
        Some("list_jobs")
    );
    // That the tool's span is in its request's trace is shown across
    // processes by an_mcp_tool_calls_job_joins_the_mcp_requests_trace.
    drop(capture);
    db.cleanup().await;
}
