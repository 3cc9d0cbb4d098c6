//! Component tier: the control plane's router, driven in-process with
//! `tower::ServiceExt::oneshot`, on a temporary SQLite file, in front of a
//! stub data plane: a small axum server on an ephemeral loopback port that
//! implements the internal routes these flows call, checks the service
//! credential like the data plane does and records every request. The tests
//! assert what the control plane sends (the tenant in the credential, the
//! typed ids, the body mapping) and how it maps each answer to its own codes.
//! No sandbox, no PostgreSQL, no job worker: hermetic (`make test-unit`).
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use clap::Parser;
use common::*;
use control_plane::config::DatabaseDriver;
use serde_json::{Value, json};
use shared::dataplane::{CreateSession, RunStep, ServiceClaims};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

/// One request the stub received.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path: String,
    /// The tenant of a credential the stub accepted (`None`: refused).
    tenant: Option<String>,
    claims: Option<ServiceClaims>,
    request_id: Option<String>,
    body: Value,
}

#[derive(Default)]
struct StubState {
    seen: Vec<Seen>,
    /// Live sessions: id -> (tenant, view).
    sessions: HashMap<String, (String, Value)>,
    /// Answers given once instead of the honest one, by route
    /// (`POST /internal/v1/sessions/{id}/steps`): (status, raw body).
    scripted: HashMap<String, VecDeque<(u16, String)>>,
    created: u32,
}

/// The stub data plane.
struct Stub {
    url: String,
    state: Arc<Mutex<StubState>>,
    stop: CancellationToken,
}

impl Stub {
    async fn start() -> Stub {
        let state = Arc::new(Mutex::new(StubState::default()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let stop = CancellationToken::new();
        let app = Router::new()
            .fallback(stub_handle)
            .with_state(state.clone());
        let until = stop.clone();
        tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(until.cancelled_owned())
                .await
                .unwrap();
        });
        Stub { url, state, stop }
    }

    /// The next call of `route` (e.g. `POST /internal/v1/sessions`) gets
    /// this answer.
    fn script(&self, route: &str, status: u16, body: Value) {
        self.script_raw(route, status, &body.to_string());
    }

    fn script_raw(&self, route: &str, status: u16, body: &str) {
        self.state
            .lock()
            .unwrap()
            .scripted
            .entry(route.to_owned())
            .or_default()
            .push_back((status, body.to_owned()));
    }

    /// The requests received so far, runtime lookups left out (the control
    /// plane checks runtimes before creating anything).
    fn seen(&self) -> Vec<Seen> {
        self.state
            .lock()
            .unwrap()
            .seen
            .iter()
            .filter(|s| s.path != "/internal/v1/runtimes")
            .cloned()
            .collect()
    }

    fn all_seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    fn forget(&self) {
        self.state.lock().unwrap().seen.clear();
    }
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn coded(status: u16, code: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(status).unwrap(),
        axum::Json(json!({"code": code, "message": message})),
    )
        .into_response()
}

fn limits() -> Value {
    json!({"memoryMb": 256, "cpuMillicores": 1000, "maxProcesses": 64, "diskMb": 256,
           "timeoutMs": 30000, "maxOutputBytes": 1048576})
}

/// The route of a path with its id replaced by `{id}`.
fn route(method: &str, path: &str) -> String {
    let parts: Vec<&str> = path.split('/').collect();
    let templated: Vec<&str> = parts
        .iter()
        .enumerate()
        .map(|(i, p)| if i == 4 && parts.len() > 4 { "{id}" } else { p })
        .collect();
    format!("{method} {}", templated.join("/"))
}

/// Verifies the service credential as the data plane does (HS256 with its
/// AUTH_JWT_SECRET, `iss` control-plane, `aud` data-plane).
fn verify(headers: &HeaderMap) -> Option<ServiceClaims> {
    let token = headers
        .get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")?;
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    v.set_audience(&["data-plane"]);
    v.set_issuer(&["control-plane"]);
    jsonwebtoken::decode::<ServiceClaims>(
        token,
        &jsonwebtoken::DecodingKey::from_secret(DP_SECRET.as_bytes()),
        &v,
    )
    .ok()
    .map(|d| d.claims)
}

async fn stub_handle(State(state): State<Arc<Mutex<StubState>>>, req: Request) -> Response {
    let method = req.method().to_string();
    let path = req.uri().path().to_owned();
    let claims = verify(req.headers());
    let request_id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let bytes = axum::body::to_bytes(req.into_body(), 1 << 20)
        .await
        .unwrap();
    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    let mut st = state.lock().unwrap();
    st.seen.push(Seen {
        method: method.clone(),
        path: path.clone(),
        tenant: claims.as_ref().map(|c| c.tenant.clone()),
        claims: claims.clone(),
        request_id,
        body: body.clone(),
    });
    let Some(claims) = claims else {
        return coded(401, "unauthorized", "invalid service credential");
    };
    let tenant = claims.tenant;
    let route = route(&method, &path);
    if let Some((status, raw)) = st.scripted.get_mut(&route).and_then(VecDeque::pop_front) {
        return (
            StatusCode::from_u16(status).unwrap(),
            [("content-type", "application/json")],
            raw,
        )
            .into_response();
    }
    let id = path.split('/').nth(4).unwrap_or_default().to_owned();
    let own = |st: &StubState| {
        st.sessions
            .get(&id)
            .filter(|(t, _)| *t == tenant)
            .map(|(_, v)| v.clone())
    };
    match route.as_str() {
        "GET /internal/v1/runtimes" => axum::Json(json!({"runtimes": [{
            "name": "python", "interpreter": "python3", "image": "python:3.12",
            "defaultLimits": limits(), "maxLimits": limits(),
        }]}))
        .into_response(),
        "POST /internal/v1/sessions" => {
            let Ok(create) = serde_json::from_value::<CreateSession>(body) else {
                return coded(400, "invalid_json", "not a CreateSession");
            };
            if create.tenant.as_ref().is_some_and(|t| *t != tenant) {
                return coded(403, "forbidden", "another tenant");
            }
            st.created += 1;
            let sid = format!("ses-stub-{}", st.created);
            let view = json!({
                "sessionId": sid, "tenant": tenant,
                "runtime": create.runtime.unwrap_or_else(|| "python".into()),
                "limits": limits(), "isolation": "gvisor", "warm": true,
                "createdAtMs": 1_000, "expiresAtMs": 601_000, "state": "active",
            });
            st.sessions.insert(sid, (tenant, view.clone()));
            (StatusCode::CREATED, axum::Json(view)).into_response()
        }
        "GET /internal/v1/sessions/{id}" => match own(&st) {
            Some(view) => axum::Json(view).into_response(),
            None => coded(404, "session_not_found", "no such session"),
        },
        "DELETE /internal/v1/sessions/{id}" => match own(&st) {
            Some(_) => {
                st.sessions.remove(&id);
                StatusCode::NO_CONTENT.into_response()
            }
            None => coded(404, "session_not_found", "no such session"),
        },
        "POST /internal/v1/sessions/{id}/steps" => {
            if own(&st).is_none() {
                return coded(404, "session_not_found", "no such session");
            }
            let Ok(step) = serde_json::from_value::<RunStep>(body) else {
                return coded(400, "invalid_json", "not a RunStep");
            };
            axum::Json(json!({
                "sessionId": id, "stepId": step.step_id.unwrap_or_default(),
                "status": "ok", "stdout": format!("ran: {}", step.code), "stderr": "",
                "result": 42, "error": null, "durationMs": 3, "truncated": false, "stateLost": false,
            }))
            .into_response()
        }
        _ => coded(404, "route_not_found", "the stub has no such route"),
    }
}

/// A control plane (router only: no listener, no job worker) on a fresh
/// SQLite file, in front of `dp_url`.
struct Cp {
    router: Router,
    _db: TestDb,
}

async fn cp(dp_url: &str, extra: &[&str]) -> Cp {
    let db = TestDb::new(DatabaseDriver::Sqlite).await;
    let config = control_plane::Config::parse_from(cp_args(&db, dp_url, extra));
    let app = control_plane::App::build_with_db(config, db.connect().await).unwrap();
    Cp {
        router: control_plane::api::router(app),
        _db: db,
    }
}

/// One answer of the control plane: status, headers, JSON body.
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    /// Asserts a coded error and returns its message.
    fn coded(&self, status: u16, code: &str) -> String {
        assert_eq!(
            (self.status, self.body["code"].as_str()),
            (status, Some(code)),
            "{}",
            self.body
        );
        self.body["message"].as_str().unwrap_or_default().to_owned()
    }
}

impl Cp {
    async fn call(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        self.call_with(method, path, auth, body, &[]).await
    }

    async fn call_with(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: Option<Value>,
        headers: &[(&str, &str)],
    ) -> Answer {
        let mut rb = axum::http::Request::builder().method(method).uri(path);
        if let Some(t) = auth {
            rb = rb.header("authorization", format!("Bearer {t}"));
        }
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        let req = match body {
            Some(b) => rb
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => rb.body(Body::empty()),
        }
        .unwrap();
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
            .await
            .unwrap();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&bytes)}));
        Answer {
            status,
            headers,
            body,
        }
    }
}

/// Create, step, read, delete: what reaches the data plane, under which
/// tenant, and how its answers come back.
#[tokio::test]
async fn a_session_flow_is_mapped_to_the_data_plane_under_the_callers_tenant() {
    let stub = Stub::start().await;
    let cp = cp(&stub.url, &[]).await;
    let acme = token("acme", &["agent"]);

    let a = cp
        .call_with(
            "POST",
            "/v1/sessions",
            Some(&acme),
            Some(json!({"ttlSeconds": 60, "limits": {"memoryMb": 128},
                        "env": {"K": "v"}})),
            &[("x-request-id", "component-req-1")],
        )
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let sid = a.body["sessionId"].as_str().unwrap().to_owned();
    assert_eq!(a.body["tenant"], "acme");
    let seen = stub.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let create = &seen[0];
    assert_eq!(
        (create.method.as_str(), create.path.as_str()),
        ("POST", "/internal/v1/sessions")
    );
    assert_eq!(create.tenant.as_deref(), Some("acme"));
    let claims = create.claims.as_ref().unwrap();
    assert_eq!(
        (claims.sub.as_str(), claims.aud.as_str()),
        ("control-plane", "data-plane")
    );
    assert!(claims.exp <= jsonwebtoken::get_current_timestamp() + 300);
    assert_eq!(create.request_id.as_deref(), Some("component-req-1"));
    assert_eq!(
        a.headers.get("x-request-id").unwrap(),
        "component-req-1",
        "the caller's request id is echoed"
    );
    // The runtime is named (the default filled in); the tenant is never in
    // the body, only in the credential.
    assert_eq!(
        create.body,
        json!({"runtime": "python", "ttlSeconds": 60, "limits": {"memoryMb": 128},
               "env": {"K": "v"}})
    );

    stub.forget();
    let a = cp
        .call(
            "POST",
            &format!("/v1/sessions/{sid}/steps"),
            Some(&acme),
            Some(json!({"code": "6 * 7", "timeoutMs": 5000})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        (&a.body["result"], &a.body["stdout"]),
        (&json!(42), &json!("ran: 6 * 7"))
    );
    let seen = stub.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path, format!("/internal/v1/sessions/{sid}/steps"));
    assert_eq!(seen[0].tenant.as_deref(), Some("acme"));
    let step_id = seen[0].body["stepId"].as_str().unwrap().to_owned();
    assert!(step_id.starts_with("stp_"), "{step_id}");
    assert_eq!(
        seen[0].body,
        json!({"stepId": step_id, "code": "6 * 7", "timeoutMs": 5000})
    );
    assert_eq!(a.body["stepId"], step_id.as_str());

    // The history is the control plane's own record.
    let a = cp
        .call(
            "GET",
            &format!("/v1/sessions/{sid}/steps"),
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.body["steps"][0]["stepId"], step_id.as_str());
    assert_eq!(a.body["steps"][0]["status"], "ok");

    // Another tenant: 404 from the control plane's own records, the data
    // plane is not even asked.
    stub.forget();
    let globex = token("globex", &["agent", "admin"]);
    for (method, path, body) in [
        (
            "POST",
            format!("/v1/sessions/{sid}/steps"),
            Some(json!({"code": "1"})),
        ),
        ("DELETE", format!("/v1/sessions/{sid}"), None),
    ] {
        cp.call(method, &path, Some(&globex), body)
            .await
            .coded(404, "session_not_found");
    }
    // A read is the data plane's to scope: it is asked as globex, says 404.
    cp.call("GET", &format!("/v1/sessions/{sid}"), Some(&globex), None)
        .await
        .coded(404, "session_not_found");
    let seen = stub.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].tenant.as_deref(), Some("globex"));

    // Delete: checked, then destroyed, under acme.
    stub.forget();
    let a = cp
        .call("DELETE", &format!("/v1/sessions/{sid}"), Some(&acme), None)
        .await;
    assert_eq!(a.status, 204, "{}", a.body);
    let calls: Vec<(String, String, Option<String>)> = stub
        .seen()
        .into_iter()
        .map(|s| (s.method, s.path, s.tenant))
        .collect();
    let path = format!("/internal/v1/sessions/{sid}");
    let acme_t = Some("acme".to_owned());
    assert_eq!(
        calls,
        vec![
            ("GET".into(), path.clone(), acme_t.clone()),
            ("DELETE".into(), path, acme_t)
        ]
    );
    // Gone: a step is refused here, without a data-plane call.
    stub.forget();
    cp.call(
        "POST",
        &format!("/v1/sessions/{sid}/steps"),
        Some(&acme),
        Some(json!({"code": "1"})),
    )
    .await
    .coded(404, "session_not_found");
    assert!(stub.seen().is_empty(), "{:?}", stub.seen());
}

/// The data plane's coded errors keep their code and status; a refused
/// credential or an answer outside the contract is the control plane's
/// 503, never passed on as the caller's fault.
#[tokio::test]
async fn data_plane_answers_map_to_the_control_planes_codes() {
    let stub = Stub::start().await;
    let cp = cp(&stub.url, &[]).await;
    let acme = token("acme", &["agent"]);

    // Session creation.
    for (status, code, want_status, want_code) in [
        (429, "capacity_exhausted", 429, "capacity_exhausted"),
        (403, "dependency_not_allowed", 403, "dependency_not_allowed"),
        (424, "dependency_unavailable", 424, "dependency_unavailable"),
        (404, "secret_not_found", 404, "secret_not_found"),
        (503, "sandbox_unavailable", 503, "sandbox_unavailable"),
        (400, "limit_exceeded", 400, "limit_exceeded"),
        // The data plane refusing our credential: our misconfiguration.
        (401, "unauthorized", 503, "data_plane_unavailable"),
    ] {
        stub.script(
            "POST /internal/v1/sessions",
            status,
            json!({"code": code, "message": format!("dp says {code}")}),
        );
        let a = cp
            .call("POST", "/v1/sessions", Some(&acme), Some(json!({})))
            .await;
        a.coded(want_status, want_code);
    }
    // Outside the contract: an HTML error page, a success that is not JSON.
    stub.script_raw(
        "POST /internal/v1/sessions",
        502,
        "<html>bad gateway</html>",
    );
    cp.call("POST", "/v1/sessions", Some(&acme), Some(json!({})))
        .await
        .coded(503, "data_plane_unavailable");
    stub.script_raw("POST /internal/v1/sessions", 201, "not json");
    cp.call("POST", "/v1/sessions", Some(&acme), Some(json!({})))
        .await
        .coded(503, "data_plane_unavailable");
    // None of the failed creations left a session behind.
    let a = cp
        .call(
            "GET",
            "/v1/audit?action=session.create",
            Some(&token("acme", &["admin"])),
            None,
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        a.body["events"].as_array().map(Vec::len),
        Some(0),
        "{}",
        a.body
    );

    // Steps.
    let a = cp
        .call("POST", "/v1/sessions", Some(&acme), Some(json!({})))
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let sid = a.body["sessionId"].as_str().unwrap().to_owned();
    let step = format!("/v1/sessions/{sid}/steps");
    for (status, code) in [
        (409, "session_busy"),
        (410, "session_lost"),
        (404, "session_not_found"),
        (503, "sandbox_unavailable"),
    ] {
        stub.script(
            "POST /internal/v1/sessions/{id}/steps",
            status,
            json!({"code": code, "message": "dp"}),
        );
        cp.call("POST", &step, Some(&acme), Some(json!({"code": "1"})))
            .await
            .coded(status, code);
    }
    // Each failed step is in the history with its code.
    let a = cp.call("GET", &step, Some(&acme), None).await;
    let history: Vec<(&str, &str)> = a.body["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["status"].as_str().unwrap(),
                s["result"]["code"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        history,
        [
            ("failed", "session_busy"),
            ("failed", "session_lost"),
            ("failed", "session_not_found"),
            ("failed", "sandbox_unavailable"),
        ]
    );
}

/// A data plane that is down is a coded 503 whose message names no internal
/// address; so is one that refuses the control plane's credential.
#[tokio::test]
async fn an_unreachable_or_misconfigured_data_plane_is_a_503_without_its_address() {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let port = closed.rsplit(':').next().unwrap().to_owned();
    let cp_down = cp(&closed, &[]).await;
    let acme = token("acme", &["agent"]);
    for (method, path, body) in [
        ("POST", "/v1/sessions", Some(json!({}))),
        ("GET", "/v1/runtimes", None),
        ("GET", "/v1/sessions", None),
    ] {
        let a = cp_down.call(method, path, Some(&acme), body).await;
        let message = a.coded(503, "data_plane_unavailable");
        let text = a.body.to_string();
        for leak in ["127.0.0.1", "http://", port.as_str()] {
            assert!(!text.contains(leak), "{method} {path} leaks {leak}: {text}");
        }
        assert!(!message.is_empty());
    }

    // The wrong service secret: the stub refuses every call; the caller sees
    // a 503, not a 401 that would blame its own token.
    let stub = Stub::start().await;
    let wrong = cp(
        &stub.url,
        &[
            "--data-plane-secret",
            "not-the-data-planes-secret-0123456789",
        ],
    )
    .await;
    let a = wrong.call("GET", "/v1/runtimes", Some(&acme), None).await;
    let message = a.coded(503, "data_plane_unavailable");
    assert!(!message.contains(&stub.url), "{message}");
    let seen = stub.all_seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].tenant, None, "the stub refused the credential");
}

/// No token, a bad one, another audience, an expired one: 401 `unauthorized`,
/// and nothing reaches the data plane.
#[tokio::test]
async fn callers_without_a_valid_token_get_401_and_reach_nothing() {
    let stub = Stub::start().await;
    let cp = cp(&stub.url, &[]).await;
    let forged = token_with(
        "acme",
        &["admin"],
        "another-secret-another-secret-0123",
        "control-plane",
        600,
    );
    let other_audience = token_with("acme", &["admin"], USER_SECRET, "data-plane", 600);
    let expired = token_with("acme", &["admin"], USER_SECRET, "control-plane", -3600);
    for auth in [
        None,
        Some("not-a-jwt"),
        Some(forged.as_str()),
        Some(other_audience.as_str()),
        Some(expired.as_str()),
    ] {
        for (method, path, body) in [
            ("POST", "/v1/sessions", Some(json!({}))),
            ("GET", "/v1/jobs", None),
            ("POST", "/v1/jobs", Some(json!({"code": "1"}))),
            ("GET", "/v1/runtimes", None),
        ] {
            cp.call(method, path, auth, body)
                .await
                .coded(401, "unauthorized");
        }
    }
    // A malformed Authorization header too.
    let a = cp
        .call_with(
            "GET",
            "/v1/jobs",
            None,
            None,
            &[("authorization", "Basic YTpi")],
        )
        .await;
    a.coded(401, "unauthorized");
    assert!(stub.all_seen().is_empty(), "{:?}", stub.all_seen());
}

/// A request the policy denies is a 403 with the reasons, and no sandbox is
/// asked for; bad ids are a coded 400 at the edge.
#[tokio::test]
async fn policy_denials_and_bad_ids_stop_before_the_data_plane() {
    let stub = Stub::start().await;
    let cp = cp(&stub.url, &[]).await;
    let acme = token("acme", &["agent"]);
    for (path, body) in [
        ("/v1/sessions", json!({"egress": ["example.com"]})),
        ("/v1/sessions", json!({"secrets": ["DB_PASSWORD"]})),
        ("/v1/jobs", json!({"code": "1", "egress": ["example.com"]})),
        ("/v1/jobs", json!({"code": "1", "secrets": ["DB_PASSWORD"]})),
    ] {
        let a = cp.call("POST", path, Some(&acme), Some(body)).await;
        a.coded(403, "policy_denied");
        let reasons = a.body["details"]["reasons"].as_array().unwrap();
        assert!(!reasons.is_empty(), "{}", a.body);
        assert!(reasons.iter().all(Value::is_string), "{}", a.body);
    }
    // Before any of that, a runtime the data plane does not offer and a
    // limit above its maximum are 400s named after the data plane's list.
    let a = cp
        .call(
            "POST",
            "/v1/sessions",
            Some(&acme),
            Some(json!({"runtime": "cobol"})),
        )
        .await;
    let message = a.coded(400, "unknown_runtime");
    assert!(message.contains("python"), "{message}");
    cp.call(
        "POST",
        "/v1/jobs",
        Some(&acme),
        Some(json!({"code": "1", "limits": {"memoryMb": 4096}})),
    )
    .await
    .coded(400, "limit_exceeded");

    for (method, path) in [
        ("GET", "/v1/sessions/bad$id"),
        ("GET", "/v1/sessions/..%2F..%2Fetc"),
        ("DELETE", "/v1/sessions/.hidden"),
        ("POST", "/v1/sessions/a%00b/steps"),
        ("GET", "/v1/jobs/..%2Fjob"),
        ("POST", "/v1/jobs/bad%20id/cancel"),
        ("GET", "/v1/artifacts/%2e%2e"),
    ] {
        let body = (method == "POST").then(|| json!({"code": "1"}));
        cp.call(method, path, Some(&acme), body)
            .await
            .coded(400, "invalid_argument");
    }
    let reached: Vec<Seen> = stub.seen();
    assert!(reached.is_empty(), "{reached:?}");
}

/// A platform policy that allows egress does not make it silently
/// disappear: until controlled egress exists, such a request is 501
/// `not_implemented` naming the field, and nothing reaches the data plane or
/// the queue.
#[tokio::test]
async fn egress_that_policy_allows_is_refused_clearly_not_dropped() {
    let stub = Stub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let permissive = dir.path().join("platform.rego");
    std::fs::write(
        &permissive,
        "package sandbox.platform\n\ndeny contains msg if {\n\tfalse\n\tmsg := \"never\"\n}\n",
    )
    .unwrap();
    let cp = cp(
        &stub.url,
        &["--policy-default-path", permissive.to_str().unwrap()],
    )
    .await;
    let acme = token("acme", &["agent"]);
    for (path, body) in [
        ("/v1/sessions", json!({"egress": ["pypi.org"]})),
        ("/v1/jobs", json!({"code": "1", "egress": ["pypi.org"]})),
    ] {
        let a = cp.call("POST", path, Some(&acme), Some(body)).await;
        let message = a.coded(501, "not_implemented");
        assert!(message.starts_with("egress"), "{message}");
    }
    // Nothing reached the data plane; the same request without them does.
    let creates = |stub: &Stub| {
        stub.seen()
            .iter()
            .filter(|s| s.method == "POST" && s.path == "/internal/v1/sessions")
            .count()
    };
    assert_eq!(creates(&stub), 0);
    cp.call("POST", "/v1/sessions", Some(&acme), Some(json!({})))
        .await;
    assert_eq!(creates(&stub), 1);
    let jobs = cp.call("GET", "/v1/jobs", Some(&acme), None).await.body;
    assert_eq!(jobs["jobs"].as_array().map(Vec::len), Some(0), "{jobs}");
}

/// Secrets (issue 19 §4): a platform policy allows names per tenant, a
/// tenant policy can only narrow, bad names are a 400 before policy, and an
/// allowed session carries the names (never a value: the control plane has
/// none) to the data plane; the names are audited.
#[tokio::test]
async fn secret_names_are_checked_allowed_per_tenant_and_forwarded() {
    let stub = Stub::start().await;
    let dir = tempfile::tempdir().unwrap();
    let platform = dir.path().join("platform.rego");
    std::fs::write(
        &platform,
        r#"package sandbox.platform

allowed_secrets := {"acme": {"DB_PASSWORD", "API_KEY"}}

deny contains msg if {
	some name in object.get(input.request, "secrets", [])
	not object.get(allowed_secrets, input.identity.tenant, set())[name]
	msg := sprintf("secret %q is not allowed for this tenant", [name])
}
"#,
    )
    .unwrap();
    let cp = cp(
        &stub.url,
        &["--policy-default-path", platform.to_str().unwrap()],
    )
    .await;
    let acme = token("acme", &["agent"]);
    let globex = token("globex", &["agent"]);
    let creates = |stub: &Stub| -> Vec<Value> {
        stub.seen()
            .into_iter()
            .filter(|s| s.method == "POST" && s.path == "/internal/v1/sessions")
            .map(|s| s.body)
            .collect()
    };
    // Bad names: 400 before policy, nothing reaches the data plane.
    let many: Vec<String> = (0..17).map(|i| format!("S{i}")).collect();
    for (body, needle) in [
        (json!({"secrets": ["db_password"]}), "must match"),
        (json!({"secrets": ["DB-PASSWORD"]}), "must match"),
        (json!({"secrets": ["../../etc/passwd"]}), "must match"),
        (json!({"secrets": [""]}), "must match"),
        (json!({"secrets": many}), "at most 16"),
        (json!({"secrets": ["API_KEY", "API_KEY"]}), "twice"),
        (
            json!({"secrets": ["API_KEY"], "env": {"API_KEY": "x"}}),
            "both a secret and an env",
        ),
    ] {
        for path in ["/v1/sessions", "/v1/jobs"] {
            let mut body = body.clone();
            if path == "/v1/jobs" {
                body["code"] = json!("1");
            }
            let a = cp.call("POST", path, Some(&acme), Some(body)).await;
            let message = a.coded(400, "invalid_argument");
            assert!(
                message.starts_with("secrets: ") && message.contains(needle),
                "{message}"
            );
        }
    }
    // A name the platform does not allow for this tenant: 403, nothing started.
    for (who, name) in [(&globex, "DB_PASSWORD"), (&acme, "OTHER")] {
        let a = cp
            .call(
                "POST",
                "/v1/sessions",
                Some(who),
                Some(json!({"secrets": [name]})),
            )
            .await;
        a.coded(403, "policy_denied");
        assert!(
            a.body["details"]["reasons"][0]
                .as_str()
                .unwrap()
                .contains(name),
            "{}",
            a.body
        );
        cp.call(
            "POST",
            "/v1/jobs",
            Some(who),
            Some(json!({"code": "1", "secrets": [name]})),
        )
        .await
        .coded(403, "policy_denied");
    }
    assert!(creates(&stub).is_empty(), "{:?}", creates(&stub));
    let jobs = cp.call("GET", "/v1/jobs", Some(&acme), None).await.body;
    assert_eq!(jobs["jobs"].as_array().map(Vec::len), Some(0), "{jobs}");

    // Allowed: the names (only) go to the data plane and into the audit.
    let a = cp
        .call(
            "POST",
            "/v1/sessions",
            Some(&acme),
            Some(json!({"secrets": ["DB_PASSWORD", "API_KEY"]})),
        )
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let sent = creates(&stub);
    assert_eq!(sent.len(), 1);
    assert_eq!(
        sent[0]["secrets"],
        json!(["DB_PASSWORD", "API_KEY"]),
        "{}",
        sent[0]
    );
    let a = cp
        .call(
            "POST",
            "/v1/jobs",
            Some(&acme),
            Some(json!({"code": "1", "secrets": ["API_KEY"]})),
        )
        .await;
    assert_eq!(a.status, 202, "{}", a.body);
    let audit = cp
        .call("GET", "/v1/audit", Some(&token("acme", &["admin"])), None)
        .await
        .body;
    let events = audit["events"].as_array().unwrap();
    let detail = |action: &str| {
        events
            .iter()
            .find(|e| e["action"] == action && e["outcome"] == "succeeded")
            .map(|e| e["details"]["secrets"].clone())
    };
    assert_eq!(
        detail("session.create"),
        Some(json!(["DB_PASSWORD", "API_KEY"])),
        "{audit}"
    );
    assert_eq!(detail("job.submit"), Some(json!(["API_KEY"])), "{audit}");

    // A tenant policy narrows: acme refuses its own API_KEY.
    let admin = token("acme", &["admin"]);
    let a = cp
        .call(
            "PUT",
            "/v1/tenants/acme/policy",
            Some(&admin),
            Some(json!({"rego": "package sandbox.tenant\n\ndeny contains \"no API_KEY here\" if \"API_KEY\" in input.request.secrets\n"})),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    cp.call(
        "POST",
        "/v1/sessions",
        Some(&acme),
        Some(json!({"secrets": ["API_KEY"]})),
    )
    .await
    .coded(403, "policy_denied");
    let a = cp
        .call(
            "POST",
            "/v1/sessions",
            Some(&acme),
            Some(json!({"secrets": ["DB_PASSWORD"]})),
        )
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    assert_eq!(creates(&stub).len(), 2);
}

/// Jobs are queued in the database (no worker runs here): the same key and
/// body give the same job, another body under that key is a 422, and the
/// listing is per tenant. Nothing is sent to the data plane to queue a job.
#[tokio::test]
async fn job_submission_is_idempotent_and_listed_per_tenant() {
    let stub = Stub::start().await;
    let cp = cp(&stub.url, &[]).await;
    let acme = token("acme", &["agent"]);
    let key = [("idempotency-key", "component-key-1")];
    let body = json!({"code": "1 + 1", "labels": {"team": "a"}});

    let first = cp
        .call_with("POST", "/v1/jobs", Some(&acme), Some(body.clone()), &key)
        .await;
    assert_eq!(first.status, 202, "{}", first.body);
    assert_eq!(first.body["status"], "queued");
    assert!(first.headers.get("idempotent-replayed").is_none());
    let id = first.body["jobId"].as_str().unwrap().to_owned();

    let again = cp
        .call_with("POST", "/v1/jobs", Some(&acme), Some(body.clone()), &key)
        .await;
    assert_eq!(again.status, 202, "{}", again.body);
    assert_eq!(again.body, first.body, "the first response, replayed");
    assert_eq!(again.headers.get("idempotent-replayed").unwrap(), "true");

    cp.call_with(
        "POST",
        "/v1/jobs",
        Some(&acme),
        Some(json!({"code": "2 + 2"})),
        &key,
    )
    .await
    .coded(422, "idempotency_key_reused");

    // The same key is another tenant's own.
    let globex = token("globex", &["agent"]);
    let theirs = cp
        .call_with("POST", "/v1/jobs", Some(&globex), Some(body.clone()), &key)
        .await;
    assert_eq!(theirs.status, 202, "{}", theirs.body);
    assert_ne!(theirs.body["jobId"], id.as_str());

    let a = cp.call("GET", "/v1/jobs", Some(&acme), None).await;
    assert_eq!(a.status, 200, "{}", a.body);
    let ids: Vec<&str> = a.body["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["jobId"].as_str().unwrap())
        .collect();
    assert_eq!(ids, [id.as_str()]);
    let a = cp
        .call(
            "GET",
            "/v1/jobs?label=team=a&status=queued",
            Some(&acme),
            None,
        )
        .await;
    assert_eq!(
        a.body["jobs"].as_array().map(Vec::len),
        Some(1),
        "{}",
        a.body
    );
    let a = cp
        .call("GET", &format!("/v1/jobs/{id}"), Some(&acme), None)
        .await;
    assert_eq!((a.status, &a.body["status"]), (200, &json!("queued")));
    cp.call("GET", &format!("/v1/jobs/{id}"), Some(&globex), None)
        .await
        .coded(404, "job_not_found");
    cp.call("GET", "/v1/jobs?status=sleeping", Some(&acme), None)
        .await
        .coded(400, "invalid_argument");

    let queued: Vec<Seen> = stub.seen();
    assert!(
        queued.is_empty(),
        "queueing reached the data plane: {queued:?}"
    );
}
