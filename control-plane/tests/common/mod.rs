//! Test harness: a session agent (real gVisor sandboxes), a data plane and
//! a control plane on ephemeral loopback ports, on SQLite or on the machine's
//! PostgreSQL in a schema of the test's own.
#![allow(dead_code, clippy::unwrap_used)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use control_plane::config::DatabaseDriver;
use control_plane::storage::Db;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// Signs callers' tokens (the control plane's AUTH_JWT_SECRET).
pub const USER_SECRET: &str = "user-secret-user-secret-user-secret!";
/// Signs the service credential (the data plane's AUTH_JWT_SECRET).
pub const DP_SECRET: &str = "dp-secret-dp-secret-dp-secret-dp-secret";
/// The session agent's admin credential: the agent creates sessions only for
/// its holder, the data plane.
pub const AGENT_ADMIN: &str = "cp-test-agent-admin-credential-0123456789abcdef";

pub fn postgres_url() -> String {
    std::env::var("DATABASE_TEST_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// The drivers every database test runs on.
pub const DRIVERS: [DatabaseDriver; 2] = [DatabaseDriver::Sqlite, DatabaseDriver::Postgres];

/// A database of its own for one test.
pub struct TestDb {
    pub driver: DatabaseDriver,
    /// What DATABASE_URL the control plane gets.
    pub url: String,
    pub schema: Option<String>,
    _dir: Option<tempfile::TempDir>,
}

impl TestDb {
    pub async fn new(driver: DatabaseDriver) -> TestDb {
        match driver {
            DatabaseDriver::Sqlite => {
                let dir = tempfile::Builder::new()
                    .prefix("cp-it-")
                    .tempdir_in("/tmp")
                    .unwrap();
                TestDb {
                    driver,
                    url: format!("file:{}/cp.db?mode=rwc", dir.path().display()),
                    schema: None,
                    _dir: Some(dir),
                }
            }
            DatabaseDriver::Postgres => {
                let schema = format!("cp_it_{}", hex::encode(rand::random::<[u8; 6]>()));
                TestDb {
                    driver,
                    url: postgres_url(),
                    schema: Some(schema),
                    _dir: None,
                }
            }
        }
    }

    /// A pool on this database (migrated).
    pub async fn connect(&self) -> Db {
        Db::connect_in_schema(self.driver, &self.url, 8, self.schema.as_deref())
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "database {:?} unavailable ({e}); PostgreSQL must run on 127.0.0.1:5432: \
                     `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`",
                    self.driver
                )
            })
    }

    /// Drops the Postgres schema.
    pub async fn cleanup(&self) {
        if let Some(schema) = &self.schema {
            let admin = sqlx::PgPool::connect(&postgres_url()).await.unwrap();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "DROP SCHEMA IF EXISTS {schema} CASCADE"
            )))
            .execute(&admin)
            .await
            .unwrap();
            admin.close().await;
        }
    }
}

/// Which isolation the agent uses (gVisor unless SESSION_ISOLATION says).
pub fn isolation() -> String {
    let iso = std::env::var("SESSION_ISOLATION").unwrap_or_else(|_| "gvisor".into());
    if iso == "gvisor" {
        assert!(
            session_agent::isolation::resolve_binary(std::path::Path::new("runsc")).is_some(),
            "runsc is not installed: run `make deps` (apt-get install -y runsc)"
        );
    }
    iso
}

/// One in-process server with its own stop switch.
pub struct Proc {
    pub url: String,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Proc {
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }
}

async fn wait_up(url: &str, path: &str) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while http.get(format!("{url}{path}")).send().await.is_err() {
        assert!(Instant::now() < deadline, "{url} did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A session agent with its state under `state`.
pub async fn agent_proc(state: &std::path::Path, extra: &[&str]) -> Proc {
    let iso = isolation();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let state = state.display().to_string();
    let mut args = vec![
        "session-agent",
        "--isolation",
        &iso,
        "--state-dir",
        &state,
        "--admin-token",
        AGENT_ADMIN,
    ];
    args.extend_from_slice(extra);
    let config = session_agent::Config::parse_from(args);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(session_agent::serve(listener, config, shutdown.clone()));
    wait_up(&url, "/v1/health").await;
    Proc {
        url,
        shutdown,
        task,
    }
}

/// A data plane in front of `agent_url`; `addr` pins its port (to restart
/// it on the same address), else an ephemeral one.
pub async fn dp_proc(agent_url: &str, state: &std::path::Path, addr: Option<&str>) -> Proc {
    dp_proc_with(agent_url, state, addr, &[]).await
}

/// [`dp_proc`] with extra arguments (`--secrets-dir`, ...).
pub async fn dp_proc_with(
    agent_url: &str,
    state: &std::path::Path,
    addr: Option<&str>,
    extra: &[&str],
) -> Proc {
    let listener = tokio::net::TcpListener::bind(addr.unwrap_or("127.0.0.1:0"))
        .await
        .unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let root = state.join("artifacts").display().to_string();
    let registry = state.join("registry").display().to_string();
    let mut args = vec![
        "data-plane",
        "--jwt-secret",
        DP_SECRET,
        "--agent-endpoint",
        agent_url,
        "--agent-admin-token",
        AGENT_ADMIN,
        "--artifact-root",
        &root,
        "--ready-timeout",
        "30s",
        "--registry",
        "file",
        "--registry-path",
        &registry,
    ];
    args.extend_from_slice(extra);
    let config = data_plane::Config::parse_from(args);
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(data_plane::serve(listener, config, shutdown.clone()));
    wait_up(&url, "/healthz").await;
    Proc {
        url,
        shutdown,
        task,
    }
}

/// The control plane's arguments for a database and a data plane.
pub fn cp_args(db: &TestDb, dp_url: &str, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "control-plane",
        "--jwt-secret",
        USER_SECRET,
        "--data-plane-secret",
        DP_SECRET,
        "--data-plane-url",
        dp_url,
        "--database-driver",
        match db.driver {
            DatabaseDriver::Sqlite => "sqlite",
            DatabaseDriver::Postgres => "postgres",
        },
        "--database-url",
        &db.url,
        "--job-lease",
        "3s",
        "--job-poll-interval",
        "200ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// A control plane in this process.
pub async fn cp_proc(db: &TestDb, dp_url: &str, extra: &[&str]) -> (Proc, Arc<control_plane::App>) {
    let config = control_plane::Config::parse_from(cp_args(db, dp_url, extra));
    let pool = db.connect().await;
    let app = control_plane::App::build_with_db(config, pool).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    let task = tokio::spawn(control_plane::serve(
        listener,
        app.clone(),
        shutdown.clone(),
    ));
    wait_up(&url, "/healthz").await;
    (
        Proc {
            url,
            shutdown,
            task,
        },
        app,
    )
}

/// Agent, data plane and control plane.
pub struct Stack {
    pub agent: Proc,
    pub dp: Proc,
    pub cp: Proc,
    pub app: Arc<control_plane::App>,
    pub db: TestDb,
    pub state: tempfile::TempDir,
}

pub async fn stack(driver: DatabaseDriver, extra: &[&str]) -> Stack {
    let state = tempfile::Builder::new()
        .prefix("cp-stack-")
        .tempdir_in("/tmp")
        .unwrap();
    let agent = agent_proc(&state.path().join("agent"), &[]).await;
    let dp = dp_proc(&agent.url, &state.path().join("dp"), None).await;
    let db = TestDb::new(driver).await;
    let (cp, app) = cp_proc(&db, &dp.url, extra).await;
    Stack {
        agent,
        dp,
        cp,
        app,
        db,
        state,
    }
}

impl Stack {
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        call_at(&self.cp.url, method, path, auth, body).await
    }

    pub async fn stop(self) {
        self.cp.stop().await;
        self.dp.stop().await;
        self.agent.stop().await;
        self.db.cleanup().await;
    }
}

/// A caller's token.
pub fn token(tenant: &str, roles: &[&str]) -> String {
    token_with(tenant, roles, USER_SECRET, "control-plane", 600)
}

pub fn token_with(tenant: &str, roles: &[&str], secret: &str, aud: &str, ttl: i64) -> String {
    let now = jsonwebtoken::get_current_timestamp() as i64;
    let claims = control_plane::identity::Claims {
        iss: "sandbox-dev-idp".into(),
        aud: aud.into(),
        sub: format!("{tenant}-user"),
        exp: (now + ttl) as u64,
        nbf: None,
        iat: Some(now as u64),
        tenant: tenant.into(),
        app: Some("tests".into()),
        agent: Some("harness".into()),
        roles: roles.iter().map(|r| r.to_string()).collect(),
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A JSON call to `base`: (status, body).
pub async fn call_at(
    base: &str,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let (status, _, body) = call_full(base, method, path, auth, body, &[]).await;
    (status, body)
}

/// A JSON call with extra headers: (status, headers, body).
pub async fn call_full(
    base: &str,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<Value>,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Value) {
    let mut rb = reqwest::Client::new().request(method.parse().unwrap(), format!("{base}{path}"));
    if let Some(a) = auth {
        rb = rb.bearer_auth(a);
    }
    for (k, v) in headers {
        rb = rb.header(*k, *v);
    }
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.bytes().await.unwrap();
    (
        status,
        headers,
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&bytes)})),
    )
}

/// Polls a job until it is final (or fails the test after `secs`).
pub async fn wait_job(base: &str, auth: &str, id: &str, secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (status, job) = call_at(
            base,
            "GET",
            &format!("/v1/jobs/{id}?waitMs=2000"),
            Some(auth),
            None,
        )
        .await;
        assert_eq!(status, 200, "{job}");
        let s = job["status"].as_str().unwrap_or_default();
        if matches!(s, "succeeded" | "failed" | "cancelled") {
            return job;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} still {s} after {secs}s: {job}"
        );
    }
}

/// Polls a job until it is `running` (fails the test after 30 s).
pub async fn wait_running(base: &str, auth: &str, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, job) = call_at(base, "GET", &format!("/v1/jobs/{id}"), Some(auth), None).await;
        if job["status"] == "running" {
            return;
        }
        assert!(Instant::now() < deadline, "job {id} never ran: {job}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
