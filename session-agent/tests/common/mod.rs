//! Test harness: a real session agent on an ephemeral loopback port, real
//! sandboxes (gVisor unless SESSION_ISOLATION says otherwise).
#![allow(dead_code, clippy::unwrap_used)]

use std::time::Duration;

use clap::Parser;
use serde_json::{Value, json};
use shared::agent::{CreateSessionRequest, Limits, StepRequest, StepResult};
use shared::client::AgentClient;
use tokio_util::sync::CancellationToken;

pub struct TestAgent {
    pub base: String,
    pub port: u16,
    /// Creates sessions with `admin_token`, as the data plane does.
    pub client: AgentClient,
    /// The agent's admin credential (the data plane's), unless `extra` set one.
    pub admin_token: String,
    pub http: reqwest::Client,
    pub isolation: String,
    shutdown: CancellationToken,
    handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
    pub state: tempfile::TempDir,
}

/// The isolation the tests use: SESSION_ISOLATION, default gvisor. A missing
/// runsc fails the test with the way to install it, never a silent skip.
pub fn isolation() -> String {
    let iso = std::env::var("SESSION_ISOLATION").unwrap_or_else(|_| "gvisor".into());
    let needed = match iso.as_str() {
        "gvisor" => Some(("runsc", "runsc")),
        "bwrap" => Some(("bwrap", "bubblewrap")),
        _ => None,
    };
    if let Some((bin, pkg)) = needed {
        assert!(
            session_agent::isolation::resolve_binary(std::path::Path::new(bin)).is_some(),
            "{bin} is not installed: run `make deps` (apt-get install -y {pkg}) or set SESSION_ISOLATION"
        );
    }
    iso
}

impl TestAgent {
    pub async fn start(extra: &[&str]) -> TestAgent {
        let iso = isolation();
        let state = tempfile::Builder::new()
            .prefix("sa-test-")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().unwrap().port();
        // Creating a session needs the admin credential; a test may pass its own.
        let admin_token = extra
            .iter()
            .position(|a| *a == "--admin-token")
            .and_then(|i| extra.get(i + 1))
            .map_or_else(token, |t| (*t).to_owned());
        let mut args = vec![
            "session-agent".to_owned(),
            "--admin-token".into(),
            admin_token.clone(),
            "--isolation".into(),
            iso.clone(),
            "--state-dir".into(),
            state.path().display().to_string(),
            "--interrupt-grace-ms".into(),
            "3000".into(),
        ];
        args.extend(extra.iter().map(|s| (*s).to_owned()));
        let config = session_agent::Config::parse_from(args);
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(session_agent::serve(listener, config, shutdown.clone()));
        let base = format!("http://127.0.0.1:{port}");
        let client = AgentClient::new(&base)
            .unwrap()
            .with_admin_token(Some(admin_token.clone()));
        let http = reqwest::Client::builder()
            .tcp_nodelay(true)
            .build()
            .unwrap();
        for _ in 0..200 {
            if client.health().await.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let health = client.health().await.expect("agent did not come up");
        eprintln!("isolation used: {}", health.isolation);
        assert_eq!(health.isolation, iso);
        TestAgent {
            base,
            port,
            client,
            admin_token,
            http,
            isolation: iso,
            shutdown,
            handle: Some(handle),
            state,
        }
    }

    /// Stops the agent and returns once every sandbox is destroyed.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.await
                .expect("agent task")
                .expect("agent stopped with an error");
        }
    }

    pub async fn session(&self, id: &str, runtime: &str, token: &str) -> Value {
        self.session_with(id, runtime, token, None).await
    }

    pub async fn session_with(
        &self,
        id: &str,
        runtime: &str,
        token: &str,
        limits: Option<Limits>,
    ) -> Value {
        let req = CreateSessionRequest {
            limits,
            ..create_request(id, runtime, token)
        };
        let info = self
            .client
            .create_session(&req)
            .await
            .unwrap_or_else(|e| panic!("create {id}: {e}"));
        serde_json::to_value(info).unwrap()
    }

    pub async fn step(&self, session: &str, token: &str, code: &str) -> StepResult {
        self.step_req(session, token, code, None).await
    }

    pub async fn step_req(
        &self,
        session: &str,
        token: &str,
        code: &str,
        timeout_ms: Option<u64>,
    ) -> StepResult {
        let req = StepRequest {
            timeout_ms,
            ..step_request(session, code)
        };
        self.client
            .step(&req, Some(token))
            .await
            .unwrap_or_else(|e| panic!("step on {session}: {e}"))
    }

    /// A raw request, for bad-input tests: (status, json body).
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Vec<u8>>,
    ) -> (u16, Value) {
        let mut rb = self
            .http
            .request(method.parse().unwrap(), format!("{}{}", self.base, path));
        for (k, v) in headers {
            rb = rb.header(*k, *v);
        }
        if let Some(b) = body {
            rb = rb.body(b);
        }
        let resp = rb.send().await.expect("request");
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.unwrap();
        let json = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| json!({"raw": String::from_utf8_lossy(&bytes)}));
        (status, json)
    }
}

impl TestAgent {
    /// A request written byte for byte on a TCP socket, so no client library
    /// normalizes the path (`%2e%2e` stays as sent): (status, json body).
    pub async fn raw_tcp(
        &self,
        method: &str,
        path: &str,
        token: &str,
        body: &[u8],
    ) -> (u16, Value) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut sock = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("connect");
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nx-session-token: {token}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
            body.len()
        );
        sock.write_all(head.as_bytes()).await.unwrap();
        sock.write_all(body).await.unwrap();
        let mut resp = Vec::new();
        sock.read_to_end(&mut resp).await.unwrap();
        let text = String::from_utf8_lossy(&resp).into_owned();
        let status: u16 = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status line");
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        (
            status,
            serde_json::from_str(body).unwrap_or_else(|_| json!({"raw": body})),
        )
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A step request with every optional field left to the agent's defaults.
pub fn step_request(session: &str, code: &str) -> StepRequest {
    StepRequest {
        session_id: session.into(),
        step_id: format!("st-{}", rand_id()),
        code: code.into(),
        timeout_ms: None,
        mode: None,
        event: None,
    }
}

/// A session request with a token and every optional field left to defaults.
pub fn create_request(id: &str, runtime: &str, token: &str) -> CreateSessionRequest {
    CreateSessionRequest {
        session_id: id.into(),
        runtime: runtime.into(),
        token: Some(token.into()),
        limits: None,
        env: None,
        ttl_seconds: None,
        idle_timeout_seconds: None,
        packages_dir: None,
        secrets: None,
    }
}

pub fn rand_id() -> String {
    hex::encode(rand::random::<[u8; 6]>())
}

/// A fresh 256-bit token.
pub fn token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}
