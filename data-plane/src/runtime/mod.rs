//! The runtime registry (which languages exist, with what interpreter,
//! image and limits) and the backend that provisions their sandboxes.

pub mod k8s;

use std::collections::BTreeMap;
use std::path::Path;

use shared::CodedError;
use shared::ErrorCode;
use shared::agent::{CreateSessionRequest, EffectiveLimits, Limits, Runtime, SessionInfo};
use shared::client::{AgentClient, ClientError};
use shared::dataplane::RuntimeInfo;

use crate::config::Config;

/// Defaults every runtime starts from (the agent's own defaults).
pub const DEFAULT_LIMITS: EffectiveLimits = EffectiveLimits {
    memory_mb: 512,
    cpu_millicores: 1000,
    max_processes: 128,
    disk_mb: 256,
    timeout_ms: 30_000,
    max_output_bytes: 1024 * 1024,
};

/// The largest limits a session may ask for unless the registry file says less.
pub const MAX_LIMITS: EffectiveLimits = EffectiveLimits {
    memory_mb: 4096,
    cpu_millicores: 4000,
    max_processes: 1024,
    disk_mb: 4096,
    timeout_ms: 600_000,
    max_output_bytes: 64 * 1024 * 1024,
};

/// The registry file: `{"runtimes": [RuntimeInfo, ...]}`; an entry replaces
/// the built-in runtime of the same name.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RegistryFile {
    runtimes: Vec<RuntimeInfo>,
}

/// Runtimes by name.
#[derive(Debug, Clone)]
pub struct RuntimeRegistry {
    runtimes: BTreeMap<String, RuntimeInfo>,
}

impl RuntimeRegistry {
    /// Built-in runtimes, images from the config, then the registry file.
    pub fn load(config: &Config) -> Result<Self, String> {
        let image = |specific: &Option<String>| {
            specific
                .clone()
                .unwrap_or_else(|| config.runtime_image.clone())
        };
        let builtin =
            |name: &str, interpreter: &str, image: String, ecosystem: Option<&str>| RuntimeInfo {
                name: name.into(),
                interpreter: interpreter.into(),
                image,
                ecosystem: ecosystem.map(str::to_owned),
                default_limits: DEFAULT_LIMITS,
                max_limits: MAX_LIMITS,
            };
        let mut runtimes = BTreeMap::new();
        for info in [
            builtin(
                "python",
                "/usr/bin/python3",
                image(&config.runtime_image_python),
                Some("pypi"),
            ),
            builtin(
                "node",
                "/usr/bin/node",
                image(&config.runtime_image_node),
                Some("npm"),
            ),
            builtin("bash", "/usr/bin/bash", config.runtime_image.clone(), None),
        ] {
            runtimes.insert(info.name.clone(), info);
        }
        if let Some(path) = &config.runtime_registry_path {
            for info in read_file(path)? {
                runtimes.insert(info.name.clone(), info);
            }
        }
        Ok(RuntimeRegistry { runtimes })
    }

    pub fn list(&self) -> Vec<RuntimeInfo> {
        self.runtimes.values().cloned().collect()
    }

    /// A runtime by name, or 400 naming the available ones.
    pub fn get(&self, name: &str) -> Result<&RuntimeInfo, CodedError> {
        self.runtimes.get(name).ok_or_else(|| {
            let names: Vec<&str> = self.runtimes.keys().map(String::as_str).collect();
            CodedError::new(
                ErrorCode::UnknownRuntime,
                format!("unknown runtime {name:?}; available: {}", names.join(", ")),
            )
        })
    }

    /// Refuses requested limits above the runtime's maximums, naming the limit.
    pub fn check_limits(&self, runtime: &RuntimeInfo, limits: &Limits) -> Result<(), CodedError> {
        let m = &runtime.max_limits;
        for (name, asked, max) in [
            ("memoryMb", limits.memory_mb, m.memory_mb),
            ("cpuMillicores", limits.cpu_millicores, m.cpu_millicores),
            ("maxProcesses", limits.max_processes, m.max_processes),
            ("diskMb", limits.disk_mb, m.disk_mb),
            ("timeoutMs", limits.timeout_ms, m.timeout_ms),
            (
                "maxOutputBytes",
                limits.max_output_bytes,
                m.max_output_bytes,
            ),
        ] {
            if let Some(v) = asked
                && v > max
            {
                return Err(CodedError::new(
                    ErrorCode::LimitExceeded,
                    format!(
                        "limits.{name} = {v} is above runtime {}'s maximum of {max}",
                        runtime.name
                    ),
                ));
            }
        }
        Ok(())
    }
}

fn read_file(path: &Path) -> Result<Vec<RuntimeInfo>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("RUNTIME_REGISTRY_PATH {}: {e}", path.display()))?;
    let file: RegistryFile = serde_json::from_str(&text)
        .map_err(|e| format!("RUNTIME_REGISTRY_PATH {}: {e}", path.display()))?;
    for info in &file.runtimes {
        // The local backend runs what the session agent has a kernel for.
        if Runtime::parse(&info.name).is_none() {
            return Err(format!(
                "RUNTIME_REGISTRY_PATH: runtime {:?} has no kernel in the session agent (python, node, bash)",
                info.name
            ));
        }
        if info.default_limits.memory_mb > info.max_limits.memory_mb
            || info.default_limits.timeout_ms > info.max_limits.timeout_ms
        {
            return Err(format!(
                "RUNTIME_REGISTRY_PATH: runtime {:?} has defaults above its maximums",
                info.name
            ));
        }
    }
    Ok(file.runtimes)
}

/// One session's sandbox, as the backend that provisioned it hands it out:
/// the agent endpoint that serves it (stored in the session record, so
/// every later call is routed there) and the session's token.
#[derive(Clone)]
pub struct SandboxHandle {
    pub session_id: String,
    /// The agent's base URL (`http://host:port`); internal, never returned.
    pub endpoint: String,
    /// The per-session agent token; never logged, never returned.
    pub token: Option<String>,
}

impl std::fmt::Debug for SandboxHandle {
    // The token is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxHandle")
            .field("session_id", &self.session_id)
            .field("endpoint", &self.endpoint)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish()
    }
}

/// A sandbox this data plane's backend holds, whether or not a session
/// record owns it (orphan reaping and recovery compare the two).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OwnedSandbox {
    pub session_id: String,
    pub endpoint: String,
    /// The pod that holds it (`k8s` backend).
    pub pod: Option<String>,
}

/// The local backend: every sandbox is a session of the one session agent
/// at `SESSION_AGENT_ENDPOINT`.
#[derive(Debug, Clone)]
pub struct LocalBackend {
    /// The agent, with the admin credential (sent on creation).
    agent: AgentClient,
    endpoint: String,
    /// One connection pool shared by every endpoint's client.
    http: reqwest::Client,
    /// `SESSION_AGENT_ADMIN_TOKEN`: lists and destroys orphans.
    admin_token: Option<String>,
}

/// Where sandboxes come from, and the one seam the rest of the data plane
/// uses to reach them: provision a sandbox for a session (a
/// [`SandboxHandle`]), destroy it, list the ones this data plane owns, report
/// pool sizes, and a client for the agent at a handle's endpoint.
#[derive(Debug, Clone)]
pub enum RuntimeBackend {
    /// Every session on the one agent at `SESSION_AGENT_ENDPOINT`.
    Local(LocalBackend),
    /// One gVisor RuntimeClass pod, hence one agent endpoint, per session.
    K8s(k8s::K8sBackend),
}

impl RuntimeBackend {
    /// The local backend at `endpoint`, sharing `http`'s connection pool.
    pub fn local(endpoint: &str, http: reqwest::Client, admin_token: Option<String>) -> Self {
        let agent =
            AgentClient::with_http(endpoint, http.clone()).with_admin_token(admin_token.clone());
        RuntimeBackend::Local(LocalBackend {
            agent,
            endpoint: endpoint.trim_end_matches('/').to_owned(),
            http,
            admin_token,
        })
    }

    /// Where a recovered session record is routed; `None`: its sandbox is
    /// gone (the session is lost). The stored endpoint only had to open the
    /// token's seal: a record can never point the data plane elsewhere.
    /// Local: always its one agent, as before the seam (a data plane
    /// restarted with another `SESSION_AGENT_ENDPOINT` probes that agent,
    /// and a session it does not have is lost). K8s: the running pod this
    /// data plane labelled for the session, if any.
    pub fn adopt(&self, session_id: &str) -> Option<String> {
        match self {
            RuntimeBackend::Local(b) => Some(b.endpoint.clone()),
            RuntimeBackend::K8s(b) => b.adopt(session_id),
        }
    }

    /// Whether sessions may install packages (the local backend mounts the
    /// data plane's package store; pods cannot see it yet).
    pub fn supports_packages(&self) -> bool {
        matches!(self, RuntimeBackend::Local(_))
    }

    /// A client for the agent at `endpoint` (a handle's). Cheap: every
    /// client shares the backend's connection pool; it carries no admin
    /// credential (session calls use the session's token only).
    pub fn agent_for(&self, endpoint: &str) -> AgentClient {
        match self {
            RuntimeBackend::Local(b) => AgentClient::with_http(endpoint, b.http.clone()),
            RuntimeBackend::K8s(b) => b.agent_for(endpoint),
        }
    }

    /// Provisions a sandbox for `req.session_id` (its token in `req.token`):
    /// the handle to route the session's calls to, and what the agent says
    /// about it (limits, isolation, warm or cold).
    pub async fn provision(
        &self,
        req: &CreateSessionRequest,
        tenant: &str,
    ) -> Result<(SandboxHandle, SessionInfo), ClientError> {
        match self {
            RuntimeBackend::K8s(b) => b.provision(req, tenant).await,
            RuntimeBackend::Local(b) => {
                let info = b.agent.create_session(req).await?;
                let handle = SandboxHandle {
                    session_id: req.session_id.clone(),
                    endpoint: b.endpoint.clone(),
                    token: req.token.clone(),
                };
                Ok((handle, info))
            }
        }
    }

    /// Destroys a session's sandbox (with the session's own token).
    pub async fn destroy(&self, handle: &SandboxHandle) -> Result<(), ClientError> {
        match self {
            RuntimeBackend::Local(_) => {
                self.agent_for(&handle.endpoint)
                    .delete_session(&handle.session_id, handle.token.as_deref())
                    .await
            }
            RuntimeBackend::K8s(b) => b.destroy(handle).await,
        }
    }

    /// A provision that failed or timed out may still finish: whatever it
    /// created for `session_id` is destroyed (best effort).
    pub async fn abandon(&self, session_id: &str, token: Option<&str>) -> Result<(), ClientError> {
        match self {
            RuntimeBackend::Local(b) => b.agent.delete_session(session_id, token).await,
            RuntimeBackend::K8s(b) => b.abandon(session_id).await,
        }
    }

    /// Whether a session's sandbox still exists (recovery's probe).
    pub async fn probe(&self, handle: &SandboxHandle) -> Result<SessionInfo, ClientError> {
        self.agent_for(&handle.endpoint)
            .get_session(&handle.session_id, handle.token.as_deref())
            .await
    }

    /// Every sandbox this data plane's backend holds, or `None` when it
    /// cannot tell (local: no admin credential configured).
    pub async fn list_owned(&self) -> Result<Option<Vec<OwnedSandbox>>, ClientError> {
        match self {
            RuntimeBackend::Local(b) => {
                let Some(admin) = b.admin_token.as_deref() else {
                    return Ok(None);
                };
                let list = b.agent.list_all_sessions(admin).await?;
                Ok(Some(
                    list.sessions
                        .into_iter()
                        .map(|s| OwnedSandbox {
                            session_id: s.session_id,
                            endpoint: b.endpoint.clone(),
                            pod: None,
                        })
                        .collect(),
                ))
            }
            RuntimeBackend::K8s(b) => Ok(Some(b.list_owned())),
        }
    }

    /// Destroys a sandbox no session record owns (with the backend's own
    /// credential: the session's token is not known).
    pub async fn destroy_orphan(&self, sandbox: &OwnedSandbox) -> Result<(), ClientError> {
        match self {
            RuntimeBackend::Local(b) => match b.admin_token.as_deref() {
                Some(admin) => {
                    self.agent_for(&sandbox.endpoint)
                        .admin_delete_session(&sandbox.session_id, admin)
                        .await
                }
                None => Ok(()),
            },
            RuntimeBackend::K8s(b) => b.destroy_orphan(sandbox).await,
        }
    }

    /// Idle sandboxes per runtime in the warm pool.
    pub async fn pool_sizes(&self) -> Result<BTreeMap<String, usize>, ClientError> {
        match self {
            RuntimeBackend::Local(b) => Ok(b.agent.health().await?.warm_pool),
            RuntimeBackend::K8s(b) => Ok(b.pool_sizes()),
        }
    }

    /// Whether the backend can provision (for `/readyz`).
    pub async fn health(&self) -> Result<(), ClientError> {
        match self {
            RuntimeBackend::Local(b) => b.agent.health().await.map(|_| ()),
            RuntimeBackend::K8s(b) => b.health().await,
        }
    }
}
