//! The agent under test, served in this process on an ephemeral port, and
//! the waits for its warm pool that every phase with a pool shares.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail, ensure};
use clap::Parser;
use shared::agent::CreateSessionRequest;
use shared::client::AgentClient;
use tokio_util::sync::CancellationToken;

use crate::Args;
use crate::memory::{all_pids, cmdline};

pub(crate) struct Agent {
    pub(crate) url: String,
    /// Creates sessions with `admin_token`, as the data plane does.
    pub(crate) client: AgentClient,
    /// The agent's creation credential; the benched data plane holds it too.
    pub(crate) admin_token: String,
    pub(crate) state: tempfile::TempDir,
    pub(crate) shutdown: CancellationToken,
    pub(crate) handle: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Agent {
    /// Starts `session_agent::serve` on an ephemeral loopback port with a
    /// fresh state directory and waits for its health check.
    pub(crate) async fn start(args: &Args, warm_pool: &str) -> anyhow::Result<Agent> {
        let state = tempfile::Builder::new()
            .prefix("sa-bench-")
            .tempdir_in("/tmp")
            .context("state dir")?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding")?;
        let port = listener.local_addr()?.port();
        let admin_token = hex::encode(rand::random::<[u8; 32]>());
        // Every setting that matters is explicit so SESSION_AGENT_* variables
        // in the environment cannot change what is measured.
        let argv: Vec<String> = vec![
            "session-agent".into(),
            "--env".into(),
            "dev".into(),
            "--isolation".into(),
            args.isolation.clone(),
            "--state-dir".into(),
            state.path().display().to_string(),
            "--warm-pool".into(),
            warm_pool.into(),
            "--auth-bypass".into(),
            "false".into(),
            "--admin-token".into(),
            admin_token.clone(),
            "--python".into(),
            args.python.display().to_string(),
            "--idle-timeout-seconds".into(),
            "3600".into(),
        ];
        let config =
            <session_agent::Config as Parser>::try_parse_from(argv).context("agent config")?;
        config
            .validate()
            .map_err(|e| anyhow!("agent config: {e}"))?;
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(session_agent::serve(listener, config, shutdown.clone()));
        let client = AgentClient::new(format!("http://127.0.0.1:{port}"))?
            .with_admin_token(Some(admin_token.clone()));
        let mut agent = Agent {
            url: format!("http://127.0.0.1:{port}"),
            client,
            admin_token,
            state,
            shutdown,
            handle: Some(handle),
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match agent.client.health().await {
                Ok(h) => {
                    ensure!(
                        h.isolation == args.isolation,
                        "agent runs {} not {}",
                        h.isolation,
                        args.isolation
                    );
                    return Ok(agent);
                }
                Err(e) if Instant::now() > deadline => {
                    let _ = agent.stop_inner().await;
                    bail!("agent did not come up: {e}");
                }
                Err(_) => {
                    if agent.handle.as_ref().is_some_and(|h| h.is_finished()) {
                        agent.stop_inner().await?;
                        bail!("agent stopped during start-up");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
        }
    }

    pub(crate) fn workspace_root(&self) -> PathBuf {
        self.state.path().join("workspaces")
    }

    /// Sandboxes alive (each has a workspace until its teardown finished).
    pub(crate) fn sandbox_ids(&self) -> BTreeSet<String> {
        std::fs::read_dir(self.workspace_root())
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits (untimed) until exactly `n` sandboxes exist, so a teardown in
    /// the background does not compete with the next sample.
    pub(crate) async fn wait_sandboxes(&self, n: usize) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.sandbox_ids().len() != n {
            ensure!(
                Instant::now() < deadline,
                "{} sandboxes after 60 s, expected {n}",
                self.sandbox_ids().len()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    pub(crate) async fn create(
        &self,
        id: &str,
        token: &str,
    ) -> anyhow::Result<shared::agent::SessionInfo> {
        let req = CreateSessionRequest {
            session_id: id.into(),
            runtime: "python".into(),
            token: Some(token.into()),
            limits: None,
            env: None,
            ttl_seconds: None,
            idle_timeout_seconds: None,
            packages_dir: None,
            secrets: None,
        };
        self.client
            .create_session(&req)
            .await
            .with_context(|| format!("creating session {id}"))
    }

    pub(crate) async fn delete(&self, id: &str, token: &str) -> anyhow::Result<()> {
        self.client
            .delete_session(id, Some(token))
            .await
            .with_context(|| format!("deleting session {id}"))
    }

    /// Cancels the agent, waits for it to destroy every sandbox, then checks
    /// that no process of this agent's state directory is left.
    pub(crate) async fn stop(mut self) -> anyhow::Result<()> {
        self.stop_inner().await
    }

    async fn stop_inner(&mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        if let Some(h) = self.handle.take() {
            h.await
                .context("agent task panicked")?
                .context("agent stopped with an error")?;
        }
        let marker = self.state.path().display().to_string();
        let left: Vec<u32> = all_pids()
            .into_iter()
            .filter(|p| cmdline(*p).contains(&marker))
            .collect();
        ensure!(
            left.is_empty(),
            "processes left behind by the agent: {left:?}"
        );
        Ok(())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub(crate) fn token() -> String {
    hex::encode(rand::random::<[u8; 32]>())
}

pub(crate) async fn wait_pool_full(agent: &Agent) -> anyhow::Result<Duration> {
    wait_pool(agent, 2).await
}

/// Waits (untimed) until the python pool holds `n` idle sandboxes and no
/// session or teardown is left.
pub(crate) async fn wait_pool(agent: &Agent, n: usize) -> anyhow::Result<Duration> {
    let t = Instant::now();
    loop {
        let h = agent.client.health().await?;
        // Full pool and no teardown still running in the background.
        if h.warm_pool.get("python") == Some(&n)
            && h.sessions == 0
            && agent.sandbox_ids().len() == n
        {
            return Ok(t.elapsed());
        }
        ensure!(
            t.elapsed() < Duration::from_secs(60),
            "the warm pool did not refill in 60 s: {h:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
