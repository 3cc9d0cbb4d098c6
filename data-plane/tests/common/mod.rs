//! Test harness: a data plane (and usually a real session agent) on
//! ephemeral loopback ports.
#![allow(dead_code, clippy::unwrap_used)]

use std::time::{Duration, Instant};

use clap::Parser;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};
use shared::dataplane::ServiceClaims;
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "test-secret-test-secret-test-secret!";

/// The session agent's admin credential: the agent creates sessions only for
/// its holder, the data plane (both get it, as `make run-local` does).
pub const AGENT_ADMIN: &str = "test-agent-admin-credential-0123456789abcdef";

pub struct Stack {
    pub dp: String,
    pub agent_url: String,
    pub http: reqwest::Client,
    pub shutdown: CancellationToken,
    pub tasks: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub artifacts: std::path::PathBuf,
    pub _state: tempfile::TempDir,
}

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

/// A data plane; with `agent` false it points at a port nobody listens on.
pub async fn stack(agent: bool, extra: &[&str]) -> Stack {
    let state = tempfile::Builder::new()
        .prefix("dp-test-")
        .tempdir_in("/tmp")
        .unwrap();
    let shutdown = CancellationToken::new();
    let mut tasks = Vec::new();
    let agent_url = if agent {
        let iso = isolation();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let config = session_agent::Config::parse_from([
            "session-agent",
            "--isolation",
            &iso,
            "--state-dir",
            &state.path().display().to_string(),
            "--admin-token",
            AGENT_ADMIN,
        ]);
        eprintln!("isolation used: {iso}");
        tasks.push(tokio::spawn(session_agent::serve(
            listener,
            config,
            shutdown.clone(),
        )));
        url
    } else {
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", closed.local_addr().unwrap());
        drop(closed);
        url
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dp = format!("http://{}", listener.local_addr().unwrap());
    let artifact_root = state.path().join("artifacts").display().to_string();
    let mut args = vec![
        "data-plane",
        "--jwt-secret",
        SECRET,
        "--agent-endpoint",
        &agent_url,
        "--agent-admin-token",
        AGENT_ADMIN,
        "--ready-timeout",
        "30s",
        "--artifact-root",
        &artifact_root,
    ];
    args.extend_from_slice(extra);
    let config = data_plane::Config::parse_from(args);
    tasks.push(tokio::spawn(data_plane::serve(
        listener,
        config,
        shutdown.clone(),
    )));
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http.get(format!("{dp}/healthz")).send().await.is_err()
        || (agent
            && http
                .get(format!("{agent_url}/v1/health"))
                .send()
                .await
                .is_err())
    {
        assert!(Instant::now() < deadline, "stack did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Stack {
        dp,
        agent_url,
        http,
        shutdown,
        tasks,
        artifacts: state.path().join("artifacts"),
        _state: state,
    }
}

pub fn credential(tenant: &str) -> String {
    credential_with(tenant, SECRET, "data-plane", 300)
}

pub fn credential_with(tenant: &str, secret: &str, aud: &str, ttl: i64) -> String {
    let now = jsonwebtoken::get_current_timestamp() as i64;
    let claims = ServiceClaims {
        iss: "control-plane".into(),
        aud: aud.into(),
        sub: "cp".into(),
        tenant: tenant.into(),
        exp: (now + ttl) as u64,
        nbf: None,
        iat: Some(now as u64),
    };
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

impl Stack {
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        auth: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        call_at(&self.dp, method, path, auth, body).await
    }

    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        auth: &str,
        body: Vec<u8>,
        content_type: &str,
    ) -> (u16, Value) {
        let resp = self
            .http
            .request(method.parse().unwrap(), format!("{}{path}", self.dp))
            .bearer_auth(auth)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        (
            status,
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&bytes)})),
        )
    }

    pub async fn stop(mut self) {
        self.shutdown.cancel();
        for t in self.tasks.drain(..) {
            t.await.unwrap().unwrap();
        }
    }
}

/// One in-process server (agent or data plane) with its own stop switch.
pub struct Proc {
    pub url: String,
    pub shutdown: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Proc {
    /// An orderly stop.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.task.await.unwrap().unwrap();
    }

    /// An abrupt stop: no shutdown code runs (the nearest thing to kill -9
    /// for an in-process server).
    pub async fn kill(self) {
        self.task.abort();
        let _ = self.task.await;
    }
}

async fn wait_up(url: &str, path: &str) {
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(20);
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

/// A data plane in front of `agent_url`, artifacts and KEK under `state`.
pub async fn dp_proc(agent_url: &str, state: &std::path::Path, extra: &[&str]) -> Proc {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let root = state.join("artifacts").display().to_string();
    let mut args = vec![
        "data-plane",
        "--jwt-secret",
        SECRET,
        "--agent-endpoint",
        agent_url,
        "--agent-admin-token",
        AGENT_ADMIN,
        "--artifact-root",
        &root,
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

/// A JSON call to `base`: (status, body).
pub async fn call_at(
    base: &str,
    method: &str,
    path: &str,
    auth: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let mut rb = reqwest::Client::new().request(method.parse().unwrap(), format!("{base}{path}"));
    if let Some(a) = auth {
        rb = rb.bearer_auth(a);
    }
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let bytes = resp.bytes().await.unwrap();
    (
        status,
        serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&bytes)})),
    )
}
