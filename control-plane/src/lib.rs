//! Control plane: the authenticated multi-tenant REST API agents call.
//!
//! `api` (HTTP; identity middleware) -> `policy` (regorus) -> domain
//! (`orchestration` for durable jobs, `sessions` for the data-plane proxy)
//! -> `audit` (hash chain) and `storage` (sqlx: Postgres or SQLite);
//! `dataplane` is the only way out to the data plane.

pub mod api;
pub mod audit;
pub mod auth_failures;
pub mod config;
pub mod dataplane;
pub mod errors;
pub mod identity;
pub mod limits;
pub mod mcp;
pub mod metrics;
pub mod orchestration;
pub mod policy;
pub mod secrets;
pub mod sessions;
pub mod storage;
pub mod waiters;

use std::sync::Arc;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::Config;

use crate::audit::AuditLog;
use crate::dataplane::DataPlane;
use crate::identity::{Verifier, VerifierConfig};
use crate::metrics::Metrics;
use crate::orchestration::{
    Dispatcher, JobService, JobSettings, WorkflowDispatcher, WorkflowService, WorkflowSettings,
};
use crate::policy::PolicyService;
use crate::sessions::SessionService;
use crate::storage::Db;

/// The runtime used when a request names none.
pub const DEFAULT_RUNTIME: &str = "python";

/// Everything the handlers share.
pub struct App {
    pub config: Config,
    pub db: Db,
    pub verifier: Verifier,
    pub audit: AuditLog,
    pub policy: PolicyService,
    pub dp: DataPlane,
    pub jobs: Arc<JobService>,
    pub sessions: SessionService,
    /// Workflows: plans run in one session by the workflow workers.
    pub workflows: Arc<WorkflowService>,
    pub metrics: Arc<Metrics>,
    /// Open long polls and event streams per tenant.
    pub waiters: Arc<waiters::Waiters>,
    /// Per-tenant rate limits and quotas (in process, or shared via Redis).
    pub limits: Arc<limits::Limits>,
    /// Failed authentications per source (aggregated audit, throttling).
    pub auth_failures: Arc<auth_failures::AuthFailures>,
}

impl App {
    /// Connects the database (applying migrations) and builds every service.
    pub async fn build(config: Config) -> anyhow::Result<Arc<App>> {
        config.validate().map_err(anyhow::Error::msg)?;
        let db = Db::connect(
            config.database_driver,
            &config.database_url,
            config.database_max_connections,
        )
        .await
        .context("DATABASE_URL")?;
        Self::build_with_db(config, db)
    }

    /// As [`App::build`] on an already connected database (tests).
    pub fn build_with_db(config: Config, db: Db) -> anyhow::Result<Arc<App>> {
        config.validate().map_err(anyhow::Error::msg)?;
        let metrics = Metrics::new();
        let verifier = Verifier::new(&VerifierConfig {
            secret: config.jwt_secret.as_deref(),
            jwks_path: config.jwks_path.as_deref(),
            issuer: &config.issuer,
            audience: &config.audience,
            leeway_seconds: config.leeway_seconds,
            bypass: config.authz_bypass,
        })
        .map_err(anyhow::Error::msg)?;
        let audit = AuditLog::new(db.clone(), metrics.clone());
        let default_rego = match &config.policy_default_path {
            Some(p) => Some(
                std::fs::read_to_string(p)
                    .with_context(|| format!("POLICY_DEFAULT_PATH {}", p.display()))?,
            ),
            None => None,
        };
        let policy = PolicyService::new(db.clone(), default_rego, audit.clone(), metrics.clone())
            .map_err(|e| anyhow::anyhow!("POLICY_DEFAULT_PATH: {e}"))?
            .with_limits(crate::policy::PolicyLimits {
                max_concurrent: config.policy_max_concurrent,
                tenant_max_concurrent: config.policy_tenant_max_concurrent,
            });
        let dp = DataPlane::new(&config).map_err(anyhow::Error::msg)?;
        let limits = limits::Limits::new(
            &config,
            db.clone(),
            audit.clone(),
            metrics.clone(),
            policy.clone(),
        )
        .map_err(anyhow::Error::msg)?;
        let jobs = JobService::new(
            db.clone(),
            policy.clone(),
            dp.clone(),
            metrics.clone(),
            JobSettings {
                max_attempts: config.job_max_attempts,
                idempotency_ttl: config.idempotency_ttl,
                lease: config.job_lease,
                poll_interval: config.job_poll_interval,
                workers: config.job_workers,
                tenant_max_queued: config.job_tenant_max_queued,
                tenant_max_running: config.job_tenant_max_running,
            },
            limits.clone(),
        );
        let sessions = SessionService::new(
            db.clone(),
            policy.clone(),
            dp.clone(),
            audit.clone(),
            limits.clone(),
        );
        let workflows = WorkflowService::new(
            db.clone(),
            policy.clone(),
            dp.clone(),
            sessions.clone(),
            audit.clone(),
            limits.clone(),
            WorkflowSettings {
                max_attempts: config.job_max_attempts,
                idempotency_ttl: config.idempotency_ttl,
                lease: config.job_lease,
                poll_interval: config.job_poll_interval,
                workers: config.workflow_workers,
                tenant_max_running: config.workflow_tenant_max_running,
            },
        );
        let waiters = waiters::Waiters::new(config.tenant_max_waiters);
        let auth_failures = Arc::new(auth_failures::AuthFailures::new(
            config.auth_failure_window,
            config.auth_failure_max_per_window,
        ));
        Ok(Arc::new(App {
            waiters,
            limits,
            auth_failures,
            config,
            db,
            verifier,
            audit,
            policy,
            dp,
            jobs,
            sessions,
            workflows,
            metrics,
        }))
    }
}

/// Binds `CONTROL_PLANE_ADDR` and serves until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let addr = shared::server::parse_listen_addr(&config.addr).map_err(anyhow::Error::msg)?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    let mcp = if config.mcp_addr.is_empty() {
        None
    } else {
        let addr =
            shared::server::parse_listen_addr(&config.mcp_addr).map_err(anyhow::Error::msg)?;
        Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("binding MCP_ADDR {addr}"))?,
        )
    };
    let app = App::build(config).await?;
    serve_all(listener, mcp, app, shutdown).await
}

/// Serves on a bound listener with the job workers running, until
/// `shutdown`; then drains requests and workers.
pub async fn serve(
    listener: TcpListener,
    app: Arc<App>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_all(listener, None, app, shutdown).await
}

/// As [`serve`], with the MCP server (`mcp::router`) on a second listener
/// when one is given; both drain on `shutdown`.
pub async fn serve_all(
    listener: TcpListener,
    mcp_listener: Option<TcpListener>,
    app: Arc<App>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    if app.config.authz_bypass {
        tracing::warn!(
            "AUTHZ_BYPASS=true: callers are NOT authenticated (development only; every request is audited with bypass: true)"
        );
    }
    let tracker = TaskTracker::new();
    Dispatcher::start(app.jobs.clone(), &tracker, shutdown.clone());
    WorkflowDispatcher::start(app.workflows.clone(), &tracker, shutdown.clone());
    tracker.spawn(
        app.auth_failures
            .clone()
            .run(app.audit.clone(), shutdown.clone()),
    );
    tracker.close();
    tracing::info!(
        addr = %listener.local_addr()?,
        database = ?app.config.database_driver,
        data_plane = %app.config.data_plane_url,
        "control-plane listening"
    );
    let rest = shared::server::serve(listener, api::router(app.clone()), shutdown.clone());
    let served = match mcp_listener {
        Some(l) => {
            tracing::info!(addr = %l.local_addr()?, "MCP server listening (/mcp, /tools)");
            let mcp = shared::server::serve(
                l,
                mcp::router_with_shutdown(app.clone(), shutdown.clone()),
                shutdown.clone(),
            );
            // Either server failing stops both.
            let mcp = async {
                let r = mcp.await;
                shutdown.cancel();
                r
            };
            let rest = async {
                let r = rest.await;
                shutdown.cancel();
                r
            };
            let (a, b) = tokio::join!(rest, mcp);
            a.and(b)
        }
        None => rest.await,
    };
    shutdown.cancel();
    tracker.wait().await;
    app.db.close().await;
    tracing::info!("control-plane stopped");
    served.map_err(Into::into)
}
