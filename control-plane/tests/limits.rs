//! Per-tenant rate limits and quotas (issue 19 section 3): the router
//! in-process (`tower::ServiceExt::oneshot`) on a temporary SQLite file, in
//! front of a small stub data plane (runtimes, session create/delete).
//!
//! Hermetic: the request bucket's 429 and headers on `/v1` and on the MCP
//! port, the creation bucket across sessions and jobs, the live-sessions
//! quota, one audit record per tenant, limit and window. Integration tier:
//! two control planes sharing the machine's Redis under a key prefix of the
//! test's own (deleted at the end), and a Redis of the test's own that is
//! killed (creation fails closed with 503, reads fail open).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use clap::Parser;
use common::*;
use control_plane::App;
use control_plane::audit::AuditQuery;
use control_plane::config::DatabaseDriver;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

const REDIS: &str = "redis://127.0.0.1:6379";

/// The stub data plane: runtimes and session create/delete, nothing else.
struct Stub {
    url: String,
    stop: CancellationToken,
}

impl Drop for Stub {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn stub() -> Stub {
    let created = Arc::new(Mutex::new(0u32));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    let app = Router::new().fallback(stub_handle).with_state(created);
    let until = stop.clone();
    tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(until.cancelled_owned())
            .await
            .unwrap();
    });
    Stub { url, stop }
}

fn limits() -> Value {
    json!({"memoryMb": 256, "cpuMillicores": 1000, "maxProcesses": 64, "diskMb": 256,
           "timeoutMs": 30000, "maxOutputBytes": 1048576})
}

async fn stub_handle(State(created): State<Arc<Mutex<u32>>>, req: Request) -> Response {
    let route = format!("{} {}", req.method(), req.uri().path());
    if route == "GET /internal/v1/runtimes" {
        return axum::Json(json!({"runtimes": [{
            "name": "python", "interpreter": "python3", "image": "python:3.12",
            "defaultLimits": limits(), "maxLimits": limits(),
        }]}))
        .into_response();
    }
    let view = |id: &str| {
        let now = jsonwebtoken::get_current_timestamp() * 1000;
        axum::Json(json!({
            "sessionId": id, "tenant": "t",
            "runtime": "python", "limits": limits(), "isolation": "gvisor", "warm": true,
            "createdAtMs": now, "expiresAtMs": now + 600_000, "state": "active",
        }))
    };
    if route == "POST /internal/v1/sessions" {
        let n = {
            let mut c = created.lock().unwrap();
            *c += 1;
            *c
        };
        return (StatusCode::CREATED, view(&format!("ses-stub-{n}"))).into_response();
    }
    if let Some(id) = req.uri().path().strip_prefix("/internal/v1/sessions/") {
        return match req.method().as_str() {
            "GET" => view(id).into_response(),
            "DELETE" => StatusCode::NO_CONTENT.into_response(),
            _ => StatusCode::METHOD_NOT_ALLOWED.into_response(),
        };
    }
    (
        StatusCode::NOT_FOUND,
        axum::Json(
            json!({"code": "route_not_found", "message": format!("not in the stub: {route}")}),
        ),
    )
        .into_response()
}

/// A control plane (router only) on a fresh SQLite file.
struct Cp {
    app: Arc<App>,
    router: Router,
    _db: TestDb,
}

async fn cp(dp_url: &str, extra: &[&str]) -> Cp {
    let db = TestDb::new(DatabaseDriver::Sqlite).await;
    let config = control_plane::Config::parse_from(cp_args(&db, dp_url, extra));
    let app = App::build_with_db(config, db.connect().await).unwrap();
    Cp {
        router: control_plane::api::router(app.clone()),
        app,
        _db: db,
    }
}

/// One answer: status, headers, JSON body.
struct Answer {
    status: u16,
    headers: HeaderMap,
    body: Value,
}

impl Answer {
    fn header(&self, name: &str) -> Option<u64> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().parse().unwrap())
    }

    fn code(&self) -> &str {
        self.body["code"].as_str().unwrap_or_default()
    }
}

async fn call_router(
    router: &Router,
    method: &str,
    path: &str,
    tenant: Option<&str>,
    body: Option<Value>,
) -> Answer {
    let mut rb = axum::http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    if let Some(t) = tenant {
        rb = rb.header("authorization", format!("Bearer {}", token(t, &[])));
    }
    let req = match body {
        Some(b) => rb
            .header("content-type", "application/json")
            .body(Body::from(b.to_string())),
        None => rb.body(Body::empty()),
    }
    .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    Answer {
        status,
        headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    }
}

impl Cp {
    async fn call(&self, method: &str, path: &str, tenant: &str, body: Option<Value>) -> Answer {
        call_router(&self.router, method, path, Some(tenant), body).await
    }

    /// Audit records of `action` for `tenant`.
    async fn audited(&self, tenant: &str, action: &str) -> Vec<Value> {
        let q = AuditQuery {
            action: Some(action.into()),
            ..Default::default()
        };
        self.app
            .audit
            .list(tenant, &q)
            .await
            .unwrap()
            .into_iter()
            .map(|r| serde_json::to_value(r).unwrap())
            .collect()
    }
}

fn job() -> Value {
    json!({"code": "print(1)"})
}

#[tokio::test]
async fn over_the_request_limit_is_429_with_retry_after_and_ratelimit_headers() {
    let dp = stub().await;
    let cp = cp(
        &dp.url,
        &[
            "--rate-limit-requests-per-minute",
            "6",
            "--rate-limit-burst",
            "3",
        ],
    )
    .await;
    for left in [2, 1, 0] {
        let a = cp.call("GET", "/v1/jobs", "acme", None).await;
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.header("ratelimit-limit"), Some(3));
        assert_eq!(a.header("ratelimit-remaining"), Some(left));
        let reset = a.header("ratelimit-reset").unwrap();
        assert!((1..=30).contains(&reset), "reset {reset}");
        assert_eq!(a.header("retry-after"), None, "only on a refusal");
    }
    let a = cp.call("GET", "/v1/jobs", "acme", None).await;
    assert_eq!((a.status, a.code()), (429, "rate_limited"), "{}", a.body);
    let retry = a.header("retry-after").unwrap();
    assert!((1..=10).contains(&retry), "one token every 10 s: {retry}");
    assert_eq!(a.header("ratelimit-limit"), Some(3));
    assert_eq!(a.header("ratelimit-remaining"), Some(0));
    assert!(a.header("ratelimit-reset").unwrap() >= retry);
    assert!(a.body["request_id"].is_string(), "{}", a.body);
    assert_eq!(a.body["details"]["limit"], "requests");
    // Another tenant has a bucket of its own.
    let b = cp.call("GET", "/v1/jobs", "globex", None).await;
    assert_eq!(b.status, 200, "{}", b.body);
    assert_eq!(b.header("ratelimit-remaining"), Some(2));
    // Unauthenticated requests never reach a tenant's bucket.
    let anon = call_router(&cp.router, "GET", "/v1/jobs", None, None).await;
    assert_eq!(anon.status, 401);
    assert_eq!(anon.header("ratelimit-limit"), None);
    // Probes are not limited.
    let probe = call_router(&cp.router, "GET", "/healthz", None, None).await;
    assert_eq!(probe.status, 200);
    let text = cp.app.metrics.encode();
    assert!(
        text.contains("control_plane_rate_limited_total{limit=\"requests\"} 1"),
        "{text}"
    );
}

#[tokio::test]
async fn the_mcp_port_takes_from_the_same_bucket() {
    let dp = stub().await;
    let cp = cp(
        &dp.url,
        &[
            "--rate-limit-requests-per-minute",
            "6",
            "--rate-limit-burst",
            "2",
        ],
    )
    .await;
    let mcp = control_plane::mcp::router(cp.app.clone());
    let a = call_router(&mcp, "GET", "/tools/jobs/job_nope", Some("acme"), None).await;
    assert_eq!(a.header("ratelimit-limit"), Some(2), "{}", a.body);
    assert_eq!(a.header("ratelimit-remaining"), Some(1));
    let a = cp.call("GET", "/v1/jobs", "acme", None).await;
    assert_eq!(a.header("ratelimit-remaining"), Some(0));
    let a = call_router(&mcp, "POST", "/tools/jobs", Some("acme"), Some(job())).await;
    assert_eq!((a.status, a.code()), (429, "rate_limited"), "{}", a.body);
    assert!(a.header("retry-after").is_some());
}

#[tokio::test]
async fn sessions_and_jobs_share_the_creation_bucket() {
    let dp = stub().await;
    let cp = cp(
        &dp.url,
        &[
            "--rate-limit-creates-per-minute",
            "2",
            "--rate-limit-creates-burst",
            "2",
        ],
    )
    .await;
    let a = cp.call("POST", "/v1/jobs", "acme", Some(job())).await;
    assert_eq!(a.status, 202, "{}", a.body);
    let a = cp
        .call("POST", "/v1/sessions", "acme", Some(json!({})))
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    // The request bucket's headers on a success.
    assert_eq!(
        a.header("ratelimit-limit"),
        Some(u64::from(control_plane::limits::DEFAULT_BURST))
    );
    for (path, body) in [("/v1/jobs", job()), ("/v1/sessions", json!({}))] {
        let a = cp.call("POST", path, "acme", Some(body)).await;
        assert_eq!(
            (a.status, a.code()),
            (429, "rate_limited"),
            "{path}: {}",
            a.body
        );
        assert_eq!(a.body["details"]["limit"], "creations");
        // The headers tell the creation bucket, not the request bucket.
        assert_eq!(a.header("ratelimit-limit"), Some(2), "{path}");
        assert_eq!(a.header("ratelimit-remaining"), Some(0));
        let retry = a.header("retry-after").unwrap();
        assert!(
            (1..=30).contains(&retry),
            "one creation every 30 s: {retry}"
        );
    }
    // Reads are not creations.
    let a = cp.call("GET", "/v1/jobs", "acme", None).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(
        a.body["jobs"].as_array().map(Vec::len),
        Some(1),
        "{}",
        a.body
    );
    // A refused request costs no creation token: bad input first.
    let other = cp
        .call("POST", "/v1/jobs", "globex", Some(json!({"code": " "})))
        .await;
    assert_eq!(other.status, 400);
    for _ in 0..2 {
        let a = cp.call("POST", "/v1/jobs", "globex", Some(job())).await;
        assert_eq!(a.status, 202, "{}", a.body);
    }
}

#[tokio::test]
async fn live_sessions_are_capped_per_tenant() {
    let dp = stub().await;
    let cp = cp(&dp.url, &["--tenant-max-sessions", "2"]).await;
    let mut ids = Vec::new();
    for _ in 0..2 {
        let a = cp
            .call("POST", "/v1/sessions", "acme", Some(json!({})))
            .await;
        assert_eq!(a.status, 201, "{}", a.body);
        ids.push(a.body["sessionId"].as_str().unwrap().to_owned());
    }
    let a = cp
        .call("POST", "/v1/sessions", "acme", Some(json!({})))
        .await;
    assert_eq!(
        (a.status, a.code()),
        (429, "tenant_quota_exceeded"),
        "{}",
        a.body
    );
    assert_eq!(a.body["details"]["quota"], "sessions");
    // Another tenant is not affected.
    let b = cp
        .call("POST", "/v1/sessions", "globex", Some(json!({})))
        .await;
    assert_eq!(b.status, 201, "{}", b.body);
    // Deleting one makes room.
    let d = cp
        .call("DELETE", &format!("/v1/sessions/{}", ids[0]), "acme", None)
        .await;
    assert_eq!(d.status, 204, "{}", d.body);
    let a = cp
        .call("POST", "/v1/sessions", "acme", Some(json!({})))
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
}

#[tokio::test]
async fn refusals_are_audited_once_per_tenant_limit_and_window() {
    let dp = stub().await;
    let cp = cp(
        &dp.url,
        &[
            "--rate-limit-requests-per-minute",
            "1",
            "--rate-limit-burst",
            "1",
            "--rate-limit-creates-per-minute",
            "1",
            "--rate-limit-creates-burst",
            "1",
        ],
    )
    .await;
    let mut refused = 0;
    for _ in 0..25 {
        if cp.call("GET", "/v1/jobs", "acme", None).await.status == 429 {
            refused += 1;
        }
    }
    assert_eq!(refused, 24);
    let events = cp.audited("acme", "rate_limit.exceeded").await;
    // At most two: a run that crosses a minute boundary opens a new window.
    assert!(
        (1..=2).contains(&events.len()),
        "{} records for {refused} refusals: {events:?}",
        events.len()
    );
    assert_eq!(events[0]["outcome"], "refused");
    assert_eq!(events[0]["resource"], "limit/requests");
    assert_eq!(events[0]["details"]["limit"], "requests");
    // The refusals are all counted.
    let text = cp.app.metrics.encode();
    assert!(
        text.contains("control_plane_rate_limited_total{limit=\"requests\"} 24"),
        "{text}"
    );
    // Another tenant gets a record of its own.
    cp.call("GET", "/v1/jobs", "globex", None).await;
    cp.call("GET", "/v1/jobs", "globex", None).await;
    assert_eq!(cp.audited("globex", "rate_limit.exceeded").await.len(), 1);
}

#[tokio::test]
async fn a_tenant_policy_lowers_its_limits_but_cannot_raise_them() {
    let dp = stub().await;
    let cp = cp(
        &dp.url,
        &[
            "--rate-limit-requests-per-minute",
            "60",
            "--rate-limit-burst",
            "5",
        ],
    )
    .await;
    let admin = token("acme", &["admin"]);
    let put = |rego: &str| {
        let req = axum::http::Request::builder()
            .method("PUT")
            .uri("/v1/tenants/acme/policy")
            .header("authorization", format!("Bearer {admin}"))
            .header("content-type", "application/json")
            .body(Body::from(json!({ "rego": rego }).to_string()))
            .unwrap();
        cp.router.clone().oneshot(req)
    };
    // Asking for more than the platform gives changes nothing.
    let r = put("package sandbox.tenant\nimport rego.v1\ndeny := set()\nrate_limits := {\"requestsPerMinute\": 6000, \"burst\": 500}\n")
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let a = cp.call("GET", "/v1/jobs", "acme", None).await;
    assert_eq!(a.header("ratelimit-limit"), Some(5), "{}", a.body);
    // Lowering works (once the cached values are stale).
    let r = put(
        "package sandbox.tenant\nimport rego.v1\ndeny := set()\nrate_limits := {\"burst\": 2}\n",
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    tokio::time::sleep(control_plane::limits::RATES_TTL + Duration::from_millis(1100)).await;
    let a = cp.call("GET", "/v1/jobs", "acme", None).await;
    assert_eq!(a.header("ratelimit-limit"), Some(2), "{}", a.body);
    // Another tenant keeps the platform's values.
    let b = cp.call("GET", "/v1/jobs", "globex", None).await;
    assert_eq!(b.header("ratelimit-limit"), Some(5), "{}", b.body);
}

/// Deletes the test's keys from the machine's Redis when dropped.
struct Keys(String);

impl Drop for Keys {
    fn drop(&mut self) {
        if let Ok(client) = redis::Client::open(REDIS)
            && let Ok(mut c) = client.get_connection()
        {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg(format!("{}*", self.0))
                .query(&mut c)
                .unwrap_or_default();
            if !keys.is_empty() {
                let _: Result<i64, _> = redis::cmd("DEL").arg(keys).query(&mut c);
            }
        }
    }
}

fn redis_keys(prefix: &str) -> Vec<String> {
    let client = redis::Client::open(REDIS).unwrap();
    let mut c = client.get_connection().unwrap_or_else(|e| {
        panic!("Redis must run on 127.0.0.1:6379 ({e}): `redis-server --daemonize yes`")
    });
    redis::cmd("KEYS")
        .arg(format!("{prefix}*"))
        .query(&mut c)
        .unwrap()
}

#[tokio::test]
#[ignore = "needs: Redis on 127.0.0.1:6379 (make test-integration)"]
async fn two_replicas_share_the_limits_through_redis() {
    let prefix = format!("cp-test-{}:", hex::encode(rand::random::<[u8; 6]>()));
    let _cleanup = Keys(prefix.clone());
    let dp = stub().await;
    let args = [
        "--redis-url",
        REDIS,
        "--redis-key-prefix",
        prefix.as_str(),
        "--rate-limit-requests-per-minute",
        "6",
        "--rate-limit-burst",
        "4",
        "--rate-limit-creates-per-minute",
        "2",
        "--rate-limit-creates-burst",
        "2",
    ];
    let a = cp(&dp.url, &args).await;
    let b = cp(&dp.url, &args).await;
    assert!(a.app.limits.shared());
    // Eight requests alternating between the replicas: four tokens in all
    // (one comes back every 10 s), whichever replica answers.
    let mut statuses = Vec::new();
    for i in 0..8 {
        let r = if i % 2 == 0 { &a } else { &b };
        statuses.push(r.call("GET", "/v1/jobs", "acme", None).await.status);
    }
    assert_eq!(statuses, [200, 200, 200, 200, 429, 429, 429, 429]);
    assert!(!redis_keys(&prefix).is_empty(), "the buckets are in Redis");
    // The creation bucket too: two creations across both replicas (the
    // request bucket of another tenant, so it does not get in the way).
    let c1 = a.call("POST", "/v1/jobs", "globex", Some(job())).await;
    let c2 = b
        .call("POST", "/v1/sessions", "globex", Some(json!({})))
        .await;
    let c3 = a
        .call("POST", "/v1/sessions", "globex", Some(json!({})))
        .await;
    assert_eq!(
        (c1.status, c2.status, c3.status, c3.code()),
        (202, 201, 429, "rate_limited"),
        "{} {} {}",
        c1.body,
        c2.body,
        c3.body
    );
    // One audit record for both replicas' refusals of acme's requests.
    let audited = a.audited("acme", "rate_limit.exceeded").await.len()
        + b.audited("acme", "rate_limit.exceeded").await.len();
    assert_eq!(audited, 1);
    drop(_cleanup);
    assert!(
        redis_keys(&prefix).is_empty(),
        "the test's keys are deleted"
    );
}

/// A Redis of the test's own on an ephemeral port.
struct OwnRedis {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl OwnRedis {
    fn start() -> OwnRedis {
        #![allow(clippy::disallowed_methods)] // the test runs its own redis-server to kill it
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = tempfile::tempdir().unwrap();
        let child = std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("redis-server ({e}): `apt-get install redis-server`"));
        let url = format!("redis://127.0.0.1:{port}");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let up = redis::Client::open(url.as_str())
                .and_then(|c| c.get_connection())
                .and_then(|mut c| redis::cmd("PING").query::<String>(&mut c));
            if up.is_ok() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "redis-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        OwnRedis {
            child,
            url,
            _dir: dir,
        }
    }

    fn kill(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test]
#[ignore = "needs: redis-server installed (make test-integration)"]
async fn redis_gone_fails_creation_closed_and_reads_open() {
    let mut redis = OwnRedis::start();
    let dp = stub().await;
    let cp = cp(
        &dp.url,
        &[
            "--redis-url",
            redis.url.as_str(),
            "--redis-timeout",
            "200ms",
        ],
    )
    .await;
    let a = cp.call("POST", "/v1/jobs", "acme", Some(job())).await;
    assert_eq!(a.status, 202, "through the live Redis: {}", a.body);
    assert!(a.header("ratelimit-limit").is_some());
    redis.kill();
    for (path, body) in [("/v1/jobs", job()), ("/v1/sessions", json!({}))] {
        let started = std::time::Instant::now();
        let a = cp.call("POST", path, "acme", Some(body)).await;
        assert_eq!(
            (a.status, a.code()),
            (503, "rate_limiter_unavailable"),
            "{path}: {}",
            a.body
        );
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "a dead Redis answers fast: {:?}",
            started.elapsed()
        );
    }
    // Reads fail open, without RateLimit headers (nothing was counted).
    let r = cp.call("GET", "/v1/jobs", "acme", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("ratelimit-limit"), None);
    let text = cp.app.metrics.encode();
    assert!(
        text.contains("control_plane_rate_limiter_unavailable_total{limit=\"creations\"} 2"),
        "{text}"
    );
    assert!(
        text.contains("control_plane_rate_limiter_unavailable_total{limit=\"requests\"}"),
        "{text}"
    );
    // Nothing was created while the limiter was away.
    let list = cp.call("GET", "/v1/jobs", "acme", None).await;
    assert_eq!(
        list.body["jobs"].as_array().map(Vec::len),
        Some(1),
        "{}",
        list.body
    );
}

/// A workflow is a sandbox creation (issue 19 §1): it takes a token from
/// the creation bucket, and the tenant's session quota refuses it as it
/// refuses a session; a replay of an accepted one costs nothing.
#[tokio::test]
async fn workflows_are_creations_and_count_as_sessions() {
    let dp = stub().await;
    let plan = || json!({"steps": [{"code": "x = 41"}, {"code": "print(x + 1)"}]});
    let cp1 = cp(
        &dp.url,
        &[
            "--rate-limit-creates-per-minute",
            "2",
            "--rate-limit-creates-burst",
            "2",
        ],
    )
    .await;
    for _ in 0..2 {
        let a = cp1
            .call("POST", "/v1/workflows", "acme", Some(plan()))
            .await;
        assert_eq!(a.status, 202, "{}", a.body);
    }
    let a = cp1
        .call("POST", "/v1/workflows", "acme", Some(plan()))
        .await;
    assert_eq!((a.status, a.code()), (429, "rate_limited"), "{}", a.body);
    assert_eq!(a.body["details"]["limit"], "creations");
    assert!(a.header("retry-after").is_some());
    let a = cp1
        .call("POST", "/v1/sessions", "acme", Some(json!({})))
        .await;
    assert_eq!((a.status, a.code()), (429, "rate_limited"), "{}", a.body);
    // A malformed plan costs no token.
    let a = cp1
        .call(
            "POST",
            "/v1/workflows",
            "globex",
            Some(json!({"steps": []})),
        )
        .await;
    assert_eq!(a.status, 400, "{}", a.body);
    for _ in 0..2 {
        let a = cp1
            .call("POST", "/v1/workflows", "globex", Some(plan()))
            .await;
        assert_eq!(a.status, 202, "{}", a.body);
    }

    let cp2 = cp(&dp.url, &["--tenant-max-sessions", "1"]).await;
    let a = cp2
        .call("POST", "/v1/sessions", "initech", Some(json!({})))
        .await;
    assert_eq!(a.status, 201, "{}", a.body);
    let a = cp2
        .call("POST", "/v1/workflows", "initech", Some(plan()))
        .await;
    assert_eq!(
        (a.status, a.code()),
        (429, "tenant_quota_exceeded"),
        "{}",
        a.body
    );
    assert_eq!(a.body["details"]["quota"], "sessions");
}
