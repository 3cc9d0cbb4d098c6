//! The session agent: runs each session's steps in a persistent Python,
//! Node.js or Bash interpreter inside the session's own gVisor sandbox.
//!
//! `api` (HTTP) -> `sessions` (lifecycle, tokens, limits) -> `kernels`
//! (driver protocol over stdio) -> `isolation` (the only code that spawns
//! processes: runsc, bwrap, pod, none) with `workspace` (tmpfs + files API) and
//! `pool` (warm sandboxes).

pub mod api;
pub mod config;
pub mod isolation;
pub mod kernels;
pub mod pool;
pub mod sessions;
pub mod workspace;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

use crate::isolation::Launcher;
use crate::pool::WarmPool;
use crate::sessions::SessionManager;

/// Binds `SESSION_AGENT_ADDR` and serves until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let addr = shared::server::parse_listen_addr(&config.addr).map_err(anyhow::Error::msg)?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    serve(listener, config, shutdown).await
}

/// Serves the agent on an already bound listener (tests bind port 0) until
/// `shutdown`; then ends every session and destroys every sandbox it started.
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    if config.auth_bypass {
        tracing::warn!(
            "SESSION_AGENT_AUTH_BYPASS=true: session tokens are NOT checked and anyone may create sessions (development only)"
        );
    }
    if config.isolation == isolation::IsolationKind::None {
        tracing::warn!("SESSION_ISOLATION=none: code runs WITHOUT a sandbox (development only)");
    }
    if config.isolation == isolation::IsolationKind::Pod {
        tracing::info!(
            "SESSION_ISOLATION=pod: interpreters run in this container, which must be the sandbox (a gVisor RuntimeClass pod); one session in this agent's lifetime"
        );
    }
    let launcher = Launcher::new(config.launcher_config())
        .await
        .context("preparing the sandbox launcher")?;
    let settings = config.settings();
    std::fs::create_dir_all(&settings.workspace_root).with_context(|| {
        format!(
            "creating WORKSPACE_ROOT {}",
            settings.workspace_root.display()
        )
    })?;
    workspace::reap_workspaces(&settings.workspace_root);
    let targets = pool::parse_targets(&config.warm_pool).map_err(anyhow::Error::msg)?;
    let pool = WarmPool::new(targets);
    let work = shutdown.child_token();
    let sessions = SessionManager::new(settings, launcher.clone(), pool.clone(), work.clone());

    let background = TaskTracker::new();
    background.spawn(sessions.clone().run_reaper());
    {
        let mgr = sessions.clone();
        let defaults = sessions.settings().defaults;
        background.spawn(pool.clone().run_filler(
            move |runtime| {
                let mgr = mgr.clone();
                async move { mgr.start_cold(runtime, defaults, None).await }
            },
            work.clone(),
        ));
    }
    background.close();

    let router = api::router(
        api::AppState {
            sessions: sessions.clone(),
        },
        config.max_body_bytes,
    );
    tracing::info!(addr = %listener.local_addr()?, isolation = config.isolation.as_str(), "session agent listening");
    // On shutdown, end the sessions first: running steps stop at once, so
    // the HTTP drain that follows is not held up by long steps.
    let stopper = {
        let (sessions, work, shutdown) = (sessions.clone(), work.clone(), shutdown.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            tracing::info!("stopping: ending sessions and destroying sandboxes");
            work.cancel();
            sessions.shutdown_all().await;
        })
    };
    let served = shared::server::serve(listener, router, shutdown.clone()).await;
    shutdown.cancel();
    let _ = stopper.await;
    background.wait().await;
    pool.drain().await;
    launcher.cleanup_host_state();
    tracing::info!("session agent stopped");
    served.context("serving HTTP")
}
