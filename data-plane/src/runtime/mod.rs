//! The runtime registry (which languages exist, with what interpreter,
//! image and limits) and the backend that provisions their sandboxes.

use std::collections::BTreeMap;
use std::path::Path;

use shared::CodedError;
use shared::ErrorCode;
use shared::agent::{EffectiveLimits, Limits, Runtime};
use shared::client::AgentClient;
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

/// Where sandboxes come from. Local: the session agent at
/// `SESSION_AGENT_ENDPOINT`. The Kubernetes variant (one pod, hence one agent
/// endpoint, per session) is the next backend; config refuses it until then.
#[derive(Debug, Clone)]
pub enum RuntimeBackend {
    Local { agent: AgentClient },
}

impl RuntimeBackend {
    /// The agent that serves a session.
    pub fn agent(&self) -> &AgentClient {
        match self {
            RuntimeBackend::Local { agent } => agent,
        }
    }
}
