//! Data plane: the runtime registry and session routing behind an internal
//! API that only the control plane calls, with the service credential.
//!
//! `api` (HTTP, `auth` middleware) -> `sessions` (tenant-scoped records,
//! agent tokens) -> `runtime` (registry; backend: the local session agent).

pub mod api;
pub mod auth;
pub mod config;
pub mod dependencies;
pub mod execution;
pub mod metrics;
pub mod registry;
pub mod runtime;
pub mod secrets;
pub mod sessions;
pub mod workspace;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub use config::Config;

use crate::auth::Authenticator;
use crate::execution::JobService;
use crate::runtime::{RuntimeBackend, RuntimeRegistry};
use crate::sessions::{SessionRouter, SessionRouterParts, SessionSettings};
use crate::workspace::artifacts::ArtifactStore;

/// Binds `DATA_PLANE_ADDR` and serves until `shutdown`.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    let addr = shared::server::parse_listen_addr(&config.addr).map_err(anyhow::Error::msg)?;
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding {addr}"))?;
    serve(listener, config, shutdown).await
}

/// Serves on an already bound listener (tests bind port 0) until `shutdown`.
/// The `k8s` backend finds its cluster as kubectl does (in-cluster service
/// account, or `KUBECONFIG`).
pub async fn serve(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    serve_with_cluster(listener, config, shutdown, None).await
}

/// [`serve`] with the Kubernetes client given (tests: a fixture's or a mock's).
pub async fn serve_with_cluster(
    listener: TcpListener,
    config: Config,
    shutdown: CancellationToken,
    cluster: Option<kube::Client>,
) -> anyhow::Result<()> {
    config.validate().map_err(anyhow::Error::msg)?;
    if config.authz_bypass {
        tracing::warn!(
            "AUTHZ_BYPASS=true: the service credential is NOT checked (development only; every call is audited)"
        );
    }
    let registry = RuntimeRegistry::load(&config).map_err(anyhow::Error::msg)?;
    let http = reqwest::Client::builder()
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(2))
        .pool_idle_timeout(Duration::from_secs(60))
        .build()
        .context("building the agent client")?;
    let backend_stop = shutdown.child_token();
    let (backend, lost_sessions) = match config.backend {
        // The agent creates sessions only for the holder of this credential.
        config::BackendKind::Local => (
            RuntimeBackend::local(
                &config.agent_endpoint,
                http,
                config.agent_admin_token.clone(),
            ),
            None,
        ),
        config::BackendKind::K8s => {
            let client = match cluster {
                Some(c) => c,
                None => {
                    let mut cluster = kube::Config::infer().await.context(
                        "SESSION_RUNTIME_BACKEND=k8s: no Kubernetes credentials (in-cluster service account or KUBECONFIG)",
                    )?;
                    // One retry policy, the backend's own (bounded, then a
                    // coded error), not kube's 15 server retries beneath it.
                    cluster.default_retry = false;
                    kube::Client::try_from(cluster)
                        .context("SESSION_RUNTIME_BACKEND=k8s: building the Kubernetes client")?
                }
            };
            let settings = runtime::k8s::K8sSettings {
                namespace: config.runtime_namespace.clone(),
                runtime_class: config.runtime_class.clone(),
                owner: config.runtime_owner.clone(),
                data_plane_namespace: config.data_plane_namespace.clone(),
                environment: config.environment.clone(),
                ready_timeout: config.ready_timeout,
                warm_pool: config.warm_pool_sizes().map_err(anyhow::Error::msg)?,
                secrets_name: config.runtime_secrets_name.clone(),
            };
            let (backend, lost) = runtime::k8s::K8sBackend::start(
                client,
                settings,
                registry.clone(),
                http,
                backend_stop.clone(),
            )
            .await
            .map_err(|e| anyhow::anyhow!("SESSION_RUNTIME_BACKEND=k8s: {e}"))?;
            (RuntimeBackend::K8s(backend), Some(lost))
        }
    };
    let secret_source = match (&backend, &config.secrets_dir) {
        (RuntimeBackend::K8s(k8s), _) if config.runtime_secrets_name.is_some() => {
            secrets::SecretSource::K8s(k8s.clone())
        }
        (_, Some(dir)) => secrets::SecretSource::Dir(dir.clone()),
        _ => secrets::SecretSource::None,
    };
    tracing::info!(source = %secret_source.describe(), "secret source");
    let metrics = metrics::Metrics::new();
    let kek = config.load_kek().map_err(anyhow::Error::msg)?;
    let store = match config.registry {
        config::RegistryKind::Memory => registry::SessionRegistry::Memory,
        config::RegistryKind::File => registry::SessionRegistry::file(config.registry_path.clone())
            .with_context(|| format!("SESSION_REGISTRY_PATH {}", config.registry_path.display()))?,
        config::RegistryKind::Redis => {
            registry::SessionRegistry::redis(&config.redis_url, &config.redis_key_prefix)
                .await
                .with_context(|| format!("REDIS_URL {}", config.redis_url))?
        }
    };
    let artifacts = ArtifactStore::with_blobs(
        config.blobs().map_err(anyhow::Error::msg)?,
        kek.clone(),
        config.artifact_max_bytes,
    )
    .with_tenant_quota(config.tenant_max_artifact_bytes);
    let sessions = SessionRouter::new(SessionRouterParts {
        registry,
        backend,
        artifacts,
        settings: SessionSettings {
            agent_auth: config.agent_auth_mode,
            ready_timeout: config.ready_timeout,
            agent_timeout: config.agent_timeout,
            tenant_max_sessions: config.tenant_max_sessions,
            tenant_max_transfers: config.tenant_max_transfers,
        },
        metrics: metrics.clone(),
        store,
        kek,
        dependencies: dependencies::Dependencies::new(
            dependencies::Dependencies::load_allowlist(config.dependency_allowlist.as_deref())
                .map_err(anyhow::Error::msg)?,
            config.dependency_index.clone(),
            config.dependency_cache.clone(),
        ),
    });
    let sessions = Arc::new(sessions.with_secrets(secret_source));
    sessions
        .recover()
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;
    // Sessions whose pod died are marked lost as the watch sees it.
    if let Some(mut lost) = lost_sessions {
        let sessions = sessions.clone();
        tokio::spawn(async move {
            while let Some(id) = lost.recv().await {
                sessions.mark_lost(&id).await;
            }
        });
    }
    // Expired sessions are swept: records removed, artifacts shredded.
    let sweep_stop = shutdown.child_token();
    let sweeper = {
        let (sessions, stop) = (sessions.clone(), sweep_stop.clone());
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(sessions::SWEEP_INTERVAL) => {
                        sessions.sweep_expired().await;
                    }
                }
            }
        })
    };
    let auth = Authenticator::new(
        if config.authz_bypass {
            None
        } else {
            config.jwt_secret.as_deref()
        },
        &config.issuer,
        &config.audience,
    );
    let jobs = Arc::new(JobService::new(
        sessions.clone(),
        execution::KeepLimits {
            per_tenant: config.job_keep_per_tenant,
            tenant_bytes: config.job_keep_tenant_bytes,
            total_bytes: config.job_keep_total_bytes,
            lifetime: config.job_result_ttl,
        },
    ));
    let router = api::router(
        api::AppState { sessions, jobs },
        auth,
        config.max_body_bytes,
    );
    match config.backend {
        config::BackendKind::Local => {
            tracing::info!(addr = %listener.local_addr()?, agent = %config.agent_endpoint, "data-plane listening")
        }
        config::BackendKind::K8s => {
            tracing::info!(addr = %listener.local_addr()?, namespace = %config.runtime_namespace, runtime_class = %config.runtime_class, "data-plane listening (k8s backend)")
        }
    }
    let served = shared::server::serve(listener, router, shutdown).await;
    sweep_stop.cancel();
    backend_stop.cancel();
    let _ = sweeper.await;
    served?;
    tracing::info!("data-plane stopped");
    Ok(())
}
