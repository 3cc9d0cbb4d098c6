//! The fixture's "node": turns a pod's container into a running session
//! agent (its env translated to the agent's flags, the node's overrides
//! applied), gives it a pod IP on loopback, and probes it.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use clap::{CommandFactory, FromArgMatches};
use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use rand::Rng;
use tempfile::TempDir;
use tokio::net::TcpListener;

/// The env names the fixture sets itself, because it plays the node: the
/// listen address (the pod IP), the isolation (the node's RuntimeClass) and
/// the two emptyDir mounts (fresh directories per pod).
const ADDR_VAR: &str = "SESSION_AGENT_ADDR";
const ISOLATION_VAR: &str = "SESSION_ISOLATION";
const WORKSPACE_VAR: &str = "WORKSPACE_ROOT";
const STATE_VAR: &str = "SESSION_AGENT_STATE_DIR";

/// The agent's default listen port (its `SESSION_AGENT_ADDR` default is `:9000`).
const DEFAULT_PORT: u16 = 9000;

/// A session agent ready to start for one pod: its configuration and the
/// directories standing in for the pod's emptyDirs (removed on drop).
pub(crate) struct AgentLaunch {
    pub config: session_agent::Config,
    pub dirs: Vec<TempDir>,
}

/// The agent's env names, each with its long flag.
fn agent_env_flags() -> HashMap<String, String> {
    session_agent::Config::command()
        .get_arguments()
        .filter_map(|arg| {
            let env = arg.get_env()?.to_str()?.to_owned();
            Some((env, arg.get_long()?.to_owned()))
        })
        .collect()
}

/// The port in a listen address (`0.0.0.0:9000`, `:9000`, `[::]:9000`).
fn listen_port(addr: &str) -> Result<u16, String> {
    addr.rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .ok_or_else(|| format!("{ADDR_VAR}={addr:?} has no port"))
}

/// The port the container's agent listens on: that of its
/// `SESSION_AGENT_ADDR` (the last one set), else the agent's default.
pub(crate) fn agent_port(container: &Container) -> Result<u16, String> {
    let addr = container
        .env
        .iter()
        .flatten()
        .rfind(|v| v.name == ADDR_VAR)
        .and_then(|v| v.value.as_deref());
    addr.map_or(Ok(DEFAULT_PORT), listen_port)
}

fn temp_dir(what: &str) -> Result<TempDir, String> {
    tempfile::Builder::new()
        .prefix(&format!("k8s-fixture-{what}-"))
        .tempdir()
        .map_err(|e| format!("creating the {what} directory: {e}"))
}

/// The agent configuration for a pod's container at `ip`: every env var
/// becomes the flag the agent declares for it; one the agent does not know,
/// or one taken from elsewhere (`valueFrom`, `envFrom`), is an error naming
/// it, as a misconfigured container would fail to start.
pub(crate) fn agent_launch(
    container: &Container,
    ip: Ipv4Addr,
    isolation: &str,
) -> Result<AgentLaunch, String> {
    if container.env_from.as_ref().is_some_and(|e| !e.is_empty()) {
        return Err("envFrom is not supported: the fixture passes plain env values only".into());
    }
    let flags = agent_env_flags();
    let flag_of = |name: &str| {
        flags.get(name).ok_or_else(|| {
            format!("environment variable {name} is not a setting of the session agent")
        })
    };
    // The container's env, last value winning as in a container runtime.
    let mut env: Vec<(String, String)> = Vec::new();
    for var in container.env.iter().flatten() {
        if var.value_from.is_some() {
            return Err(format!(
                "environment variable {} uses valueFrom: the fixture passes plain values only",
                var.name
            ));
        }
        flag_of(&var.name)?;
        env.retain(|(n, _)| n != &var.name);
        env.push((var.name.clone(), var.value.clone().unwrap_or_default()));
    }
    let port = agent_port(container)?;
    let state = temp_dir("state")?;
    let workspace = temp_dir("workspace")?;
    let node = [
        (ADDR_VAR, format!("{ip}:{port}")),
        (WORKSPACE_VAR, workspace.path().display().to_string()),
        (STATE_VAR, state.path().display().to_string()),
    ];
    env.retain(|(n, _)| !node.iter().any(|(o, _)| o == n));
    env.extend(node.map(|(n, v)| (n.to_owned(), v)));
    // First the configuration as the pod has it (e.g. SESSION_ISOLATION=pod):
    // what a real container would refuse, the fixture refuses too.
    parse_config(&flags, &env)
        .map_err(|e| format!("the session agent refused the pod's configuration: {e}"))?;
    // Then as the fixture runs it, in the isolation that plays the RuntimeClass.
    env.retain(|(n, _)| n != ISOLATION_VAR);
    env.push((ISOLATION_VAR.to_owned(), isolation.to_owned()));
    let config = parse_config(&flags, &env).map_err(|e| {
        format!(
            "the session agent refused its configuration under SESSION_ISOLATION={isolation}: {e}"
        )
    })?;
    Ok(AgentLaunch {
        config,
        dirs: vec![state, workspace],
    })
}

/// Parses and validates the agent's configuration from `env` alone.
fn parse_config(
    flags: &HashMap<String, String>,
    env: &[(String, String)],
) -> Result<session_agent::Config, String> {
    let mut args = vec!["session-agent".to_owned()];
    for (name, value) in env {
        let flag = flags.get(name).ok_or_else(|| {
            format!("environment variable {name} is not a setting of the session agent")
        })?;
        args.push(format!("--{flag}={value}"));
    }
    // The agent reads nothing from the test process's environment: a
    // container sees only its own env.
    let command = session_agent::Config::command().mut_args(|arg| arg.env(None::<&'static str>));
    let matches = command
        .try_get_matches_from(&args)
        .map_err(|e| e.to_string())?;
    let config = session_agent::Config::from_arg_matches(&matches).map_err(|e| e.to_string())?;
    config.validate()?;
    Ok(config)
}

/// A listener on a fresh pod IP `127.x.y.z` (x != 0, so never 127.0.0.1 of
/// a `make run-local`) not in `taken`; returns it with the IP.
pub(crate) async fn bind_pod_ip(
    taken: impl Fn(Ipv4Addr) -> bool,
    port: u16,
) -> Result<(Ipv4Addr, TcpListener), String> {
    let mut last = String::new();
    for _ in 0..64 {
        let ip = {
            let mut rng = rand::rng();
            Ipv4Addr::new(
                127,
                rng.random_range(1..=254),
                rng.random_range(0..=255),
                rng.random_range(1..=254),
            )
        };
        if taken(ip) {
            continue;
        }
        match TcpListener::bind(SocketAddr::from((ip, port))).await {
            Ok(listener) => return Ok((ip, listener)),
            Err(e) => last = format!("binding {ip}:{port}: {e}"),
        }
    }
    Err(format!("no free pod IP: {last}"))
}

/// What a probe checks, resolved against the container.
#[derive(Debug, Clone)]
pub(crate) enum ProbeTarget {
    Http { port: u16, path: String },
    Tcp { port: u16 },
    Unsupported(String),
}

fn resolve_port(container: &Container, port: &IntOrString) -> Option<u16> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).ok(),
        IntOrString::String(name) => container
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok()),
    }
}

/// The target of a probe (None: no probe).
pub(crate) fn probe_target(container: &Container, probe: Option<&Probe>) -> Option<ProbeTarget> {
    let probe = probe?;
    Some(if let Some(http) = &probe.http_get {
        match resolve_port(container, &http.port) {
            Some(port) => ProbeTarget::Http {
                port,
                path: http.path.clone().unwrap_or_else(|| "/".into()),
            },
            None => ProbeTarget::Unsupported(format!(
                "probe port {:?} is not a container port",
                http.port
            )),
        }
    } else if let Some(tcp) = &probe.tcp_socket {
        match resolve_port(container, &tcp.port) {
            Some(port) => ProbeTarget::Tcp { port },
            None => ProbeTarget::Unsupported(format!(
                "probe port {:?} is not a container port",
                tcp.port
            )),
        }
    } else {
        ProbeTarget::Unsupported("only httpGet and tcpSocket probes are supported".into())
    })
}

/// One probe of the pod at `ip`, as the kubelet does it: HTTP 200-399 or a
/// TCP connect within `timeout`. Err carries the failure for the status.
pub(crate) async fn probe(
    http: &reqwest::Client,
    ip: Ipv4Addr,
    target: &ProbeTarget,
    timeout: Duration,
) -> Result<(), String> {
    match target {
        ProbeTarget::Http { port, path } => {
            let url = format!("http://{ip}:{port}{path}");
            let resp = http
                .get(&url)
                .timeout(timeout)
                .send()
                .await
                .map_err(|e| format!("Get {url:?}: {e}"))?;
            let code = resp.status().as_u16();
            if (200..400).contains(&code) {
                Ok(())
            } else {
                Err(format!("HTTP probe failed with statuscode: {code}"))
            }
        }
        ProbeTarget::Tcp { port } => {
            tokio::time::timeout(timeout, tokio::net::TcpStream::connect((ip, *port)))
                .await
                .map_err(|_| format!("dial tcp {ip}:{port}: i/o timeout"))?
                .map(drop)
                .map_err(|e| format!("dial tcp {ip}:{port}: {e}"))
        }
        ProbeTarget::Unsupported(why) => Err(why.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::{EnvVar, EnvVarSource};

    fn container(env: &[(&str, &str)]) -> Container {
        Container {
            name: "agent".into(),
            env: Some(
                env.iter()
                    .map(|(n, v)| EnvVar {
                        name: (*n).into(),
                        value: Some((*v).into()),
                        ..Default::default()
                    })
                    .collect(),
            ),
            ..Default::default()
        }
    }

    const ADMIN: &str = "fixture-admin-credential-0123456789abcdefghijk";

    #[test]
    fn env_becomes_flags_with_the_node_overrides() {
        let c = container(&[
            ("ENV", "production"),
            ("SESSION_AGENT_ADDR", "0.0.0.0:9000"),
            ("SESSION_ISOLATION", "gvisor"),
            ("SESSION_AGENT_ADMIN_TOKEN", ADMIN),
            ("SESSION_AGENT_MAX_SESSIONS", "1"),
            ("WORKSPACE_ROOT", "/workspace"),
            ("SESSION_AGENT_STATE_DIR", "/tmp/agent"),
            ("SESSION_AGENT_PYTHON", "/usr/bin/python3"),
        ]);
        let ip = Ipv4Addr::new(127, 3, 4, 5);
        let launch = agent_launch(&c, ip, "bwrap").expect("a valid pod");
        let cfg = &launch.config;
        assert_eq!(cfg.addr, "127.3.4.5:9000");
        assert_eq!(cfg.environment, "production");
        assert_eq!(cfg.isolation.as_str(), "bwrap");
        assert_eq!(cfg.max_sessions, 1);
        assert_eq!(cfg.admin_token.as_ref().map(|t| t.expose()), Some(ADMIN));
        assert_eq!(cfg.state_dir, launch.dirs[0].path());
        assert_eq!(cfg.workspace_root.as_deref(), Some(launch.dirs[1].path()));
    }

    #[test]
    fn unknown_or_indirect_env_fails_naming_it() {
        let c = container(&[("SESSION_AGENT_NO_SUCH_THING", "1")]);
        let e = agent_launch(&c, Ipv4Addr::new(127, 1, 1, 1), "bwrap")
            .err()
            .expect("refused");
        assert!(e.contains("SESSION_AGENT_NO_SUCH_THING"), "{e}");

        let mut c = container(&[]);
        c.env = Some(vec![EnvVar {
            name: "SESSION_AGENT_ADMIN_TOKEN".into(),
            value_from: Some(EnvVarSource::default()),
            ..Default::default()
        }]);
        let e = agent_launch(&c, Ipv4Addr::new(127, 1, 1, 1), "bwrap")
            .err()
            .expect("refused");
        assert!(e.contains("valueFrom"), "{e}");
    }

    #[test]
    fn an_invalid_configuration_fails_with_the_agents_message() {
        // No admin credential: the agent refuses to start.
        let c = container(&[("SESSION_AGENT_MAX_SESSIONS", "1")]);
        let e = agent_launch(&c, Ipv4Addr::new(127, 1, 1, 1), "bwrap")
            .err()
            .expect("refused");
        assert!(e.contains("SESSION_AGENT_ADMIN_TOKEN"), "{e}");
        let c = container(&[
            ("SESSION_AGENT_MAX_SESSIONS", "many"),
            ("SESSION_AGENT_ADMIN_TOKEN", ADMIN),
        ]);
        let e = agent_launch(&c, Ipv4Addr::new(127, 1, 1, 1), "bwrap")
            .err()
            .expect("refused");
        assert!(e.contains("max-sessions"), "{e}");
    }
}
