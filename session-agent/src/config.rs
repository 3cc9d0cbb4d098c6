//! The agent's configuration: one struct, from flags or environment
//! variables, validated before any socket is bound.

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use clap::Parser;
use shared::agent::EffectiveLimits;

use crate::isolation::{IsolationKind, LauncherConfig};
use crate::kernels::Interpreters;
use crate::sessions::Settings;

/// A credential from a flag or the environment: `Debug` never shows it
/// (clap's `--help` hides it with `hide_env_values`).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The value itself, for the one place that digests or parses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// Session agent configuration.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "session-agent",
    version,
    args_override_self = true,
    about = "Runs session steps in gVisor sandboxes"
)]
pub struct Config {
    /// Listen address (`:9000` binds every interface).
    #[arg(long, env = "SESSION_AGENT_ADDR", default_value = ":9000")]
    pub addr: String,
    /// Deployment environment; `production` refuses development-only flags.
    #[arg(long = "env", env = "ENV", default_value = "dev")]
    pub environment: String,
    /// Skip session token and creation credential checks (development only;
    /// refused in production).
    #[arg(long, env = "SESSION_AGENT_AUTH_BYPASS", default_value_t = false, action = clap::ArgAction::Set)]
    pub auth_bypass: bool,
    /// The data plane's credential (>= 43 characters): creates sessions,
    /// lists and deletes any (the data plane reaps orphans with it); never
    /// runs code or reads files. Required unless SESSION_AGENT_AUTH_BYPASS.
    #[arg(long, env = "SESSION_AGENT_ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<Secret>,
    /// The same credential given as its SHA-256 (64 hex digits) instead, so
    /// the agent never holds it: a runtime pod's agent gets only the digest.
    /// Exclusive with SESSION_AGENT_ADMIN_TOKEN.
    #[arg(long, env = "SESSION_AGENT_ADMIN_TOKEN_SHA256", hide_env_values = true)]
    pub admin_token_sha256: Option<Secret>,
    /// Sandbox technology: gvisor, bwrap, pod (the agent's container is the
    /// sandbox: a gVisor RuntimeClass pod with one session) or none
    /// (development only).
    #[arg(long, env = "SESSION_ISOLATION", value_enum, default_value = "gvisor")]
    pub isolation: IsolationKind,
    /// Agent state: runsc root, bundles, the sandbox root skeleton.
    #[arg(
        long,
        env = "SESSION_AGENT_STATE_DIR",
        default_value = "/run/session-agent"
    )]
    pub state_dir: PathBuf,
    /// Where session workspaces are mounted (default: <state dir>/workspaces).
    #[arg(long, env = "WORKSPACE_ROOT")]
    pub workspace_root: Option<PathBuf>,
    /// Package directories the data plane prepares; a session may mount only
    /// a directory inside this tree.
    #[arg(
        long,
        env = "SESSION_AGENT_PACKAGE_ROOT",
        default_value = "/var/lib/sandbox-packages"
    )]
    pub package_root: PathBuf,
    /// The runsc binary.
    #[arg(long, env = "SESSION_AGENT_RUNSC", default_value = "runsc")]
    pub runsc: PathBuf,
    /// gVisor platform (`kvm` hangs on these machines).
    #[arg(long, env = "SESSION_AGENT_RUNSC_PLATFORM", default_value = "ptrace")]
    pub runsc_platform: String,
    /// Extra runsc global flags, space-separated; isolation-weakening ones are refused.
    #[arg(
        long,
        env = "SESSION_AGENT_RUNSC_FLAGS",
        default_value = "",
        allow_hyphen_values = true
    )]
    pub runsc_flags: String,
    /// The bwrap binary.
    #[arg(long, env = "SESSION_AGENT_BWRAP", default_value = "bwrap")]
    pub bwrap: PathBuf,
    #[arg(long, env = "SESSION_AGENT_PYTHON", default_value = "/usr/bin/python3")]
    pub python: PathBuf,
    #[arg(long, env = "SESSION_AGENT_NODE", default_value = "/usr/bin/node")]
    pub node: PathBuf,
    #[arg(long, env = "SESSION_AGENT_BASH", default_value = "/usr/bin/bash")]
    pub bash: PathBuf,
    /// Idle sandboxes kept started per runtime, e.g. `python=2,node=1`.
    #[arg(long, env = "SESSION_AGENT_WARM_POOL", default_value = "")]
    pub warm_pool: String,
    /// Maximum live sessions.
    #[arg(long, env = "SESSION_AGENT_MAX_SESSIONS", default_value_t = 64)]
    pub max_sessions: usize,
    /// Default session TTL, seconds.
    #[arg(
        long,
        env = "SESSION_AGENT_DEFAULT_TTL_SECONDS",
        default_value_t = 3600
    )]
    pub default_ttl_seconds: u64,
    /// Longest TTL a session may ask for, seconds.
    #[arg(long, env = "SESSION_AGENT_MAX_TTL_SECONDS", default_value_t = 86_400)]
    pub max_ttl_seconds: u64,
    /// Default idle timeout, seconds.
    #[arg(
        long,
        env = "SESSION_AGENT_IDLE_TIMEOUT_SECONDS",
        default_value_t = 900
    )]
    pub idle_timeout_seconds: u64,
    /// How long a new interpreter may take to answer, milliseconds.
    #[arg(long, env = "SESSION_AGENT_READY_TIMEOUT_MS", default_value_t = 30_000)]
    pub ready_timeout_ms: u64,
    /// After a timeout's SIGINT, how long the interpreter has to stop before it is killed.
    #[arg(
        long,
        env = "SESSION_AGENT_INTERRUPT_GRACE_MS",
        default_value_t = 1_000
    )]
    pub interrupt_grace_ms: u64,
    /// Largest request body (code, files), bytes.
    #[arg(long, env = "SESSION_AGENT_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Default output cap per stream per step, bytes.
    #[arg(long, env = "SESSION_AGENT_OUTPUT_LIMIT_BYTES", default_value_t = 1024 * 1024)]
    pub output_limit_bytes: u64,
    /// Default sandbox memory, MiB.
    #[arg(long, env = "SESSION_AGENT_DEFAULT_MEMORY_MB", default_value_t = 512)]
    pub default_memory_mb: u64,
    /// Largest sandbox memory a session may ask for, MiB.
    #[arg(long, env = "SESSION_AGENT_MAX_MEMORY_MB", default_value_t = 4096)]
    pub max_memory_mb: u64,
    /// Default step timeout, milliseconds.
    #[arg(
        long,
        env = "SESSION_AGENT_DEFAULT_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub default_timeout_ms: u64,
    /// Longest step timeout, milliseconds.
    #[arg(long, env = "SESSION_AGENT_MAX_TIMEOUT_MS", default_value_t = 600_000)]
    pub max_timeout_ms: u64,
    /// OpenTelemetry (`OTEL_EXPORTER_OTLP_ENDPOINT`, ...): see `shared::telemetry`.
    #[command(flatten)]
    pub telemetry: shared::telemetry::TelemetryConfig,
}

impl Config {
    /// Outside production and without `SESSION_AGENT_AUTH_BYPASS`, fills
    /// an unset `SESSION_AGENT_ADMIN_TOKEN` with the development credential in
    /// `.local/` (the one `make run-local` and a data plane started alone
    /// use). Production is untouched and `validate` refuses it.
    /// A digest (`SESSION_AGENT_ADMIN_TOKEN_SHA256`) counts as set.
    pub fn use_dev_keys(&mut self) -> Result<(), String> {
        if self.auth_bypass || self.admin_token_sha256.is_some() {
            return Ok(());
        }
        let mut token = self.admin_token.take().map(|t| t.0);
        let filled = shared::env::dev_key_fallback(
            &mut token,
            &self.environment,
            "SESSION_AGENT_ADMIN_TOKEN",
            std::path::Path::new(shared::env::DEV_KEY_DIR),
            shared::env::dev_keys::AGENT_ADMIN,
        );
        self.admin_token = token.map(Secret);
        filled
    }

    /// Refuses unsafe or malformed settings, naming the variable.
    pub fn validate(&self) -> Result<(), String> {
        shared::server::parse_listen_addr(&self.addr)
            .map_err(|e| format!("SESSION_AGENT_ADDR: {e}"))?;
        shared::env::refuse_in_production(
            &self.environment,
            "SESSION_AGENT_AUTH_BYPASS",
            self.auth_bypass,
        )?;
        shared::env::refuse_in_production(
            &self.environment,
            "SESSION_ISOLATION=none",
            self.isolation == IsolationKind::None,
        )?;
        let admin = self.admin_digest()?;
        if self.isolation == IsolationKind::Pod && shared::env::is_production(&self.environment) {
            // The pod is the sandbox: a second session would share it.
            if self.max_sessions != 1 {
                return Err(format!(
                    "SESSION_ISOLATION=pod with ENV={} needs SESSION_AGENT_MAX_SESSIONS=1 \
                     (it is {}): the pod is the sandbox of one session, and sessions in \
                     the same pod would share it",
                    self.environment, self.max_sessions
                ));
            }
            if admin.is_none() {
                return Err(format!(
                    "SESSION_ISOLATION=pod with ENV={} needs the data plane's credential: \
                     set SESSION_AGENT_ADMIN_TOKEN_SHA256 (or SESSION_AGENT_ADMIN_TOKEN)",
                    self.environment
                ));
            }
        }
        crate::pool::parse_targets(&self.warm_pool)?;
        for flag in self.runsc_flag_list() {
            crate::isolation::flags::check_runsc_flag(&flag)
                .map_err(|e| format!("SESSION_AGENT_RUNSC_FLAGS: {e}"))?;
        }
        // A pod runs the interpreter of its own image, wherever it lives.
        if !self.isolation.shares_host_paths() {
            for (var, path) in [
                ("SESSION_AGENT_PYTHON", &self.python),
                ("SESSION_AGENT_NODE", &self.node),
                ("SESSION_AGENT_BASH", &self.bash),
            ] {
                if !path.starts_with("/usr") {
                    return Err(format!(
                        "{var}={} must be under /usr: only /usr is visible inside sandboxes",
                        path.display()
                    ));
                }
            }
        }
        // Without it nobody could create a session, or everybody could.
        if admin.is_none() && !self.auth_bypass {
            return Err(
                "SESSION_AGENT_ADMIN_TOKEN is required (or its digest, SESSION_AGENT_ADMIN_TOKEN_SHA256): only the data plane, holding it, may create sessions (or SESSION_AGENT_AUTH_BYPASS=true outside production)"
                    .into(),
            );
        }
        if self.max_sessions == 0 {
            return Err("SESSION_AGENT_MAX_SESSIONS must be at least 1".into());
        }
        if self.default_memory_mb < 64 {
            return Err("SESSION_AGENT_DEFAULT_MEMORY_MB must be at least 64".into());
        }
        if self.default_memory_mb > self.max_memory_mb {
            return Err(
                "SESSION_AGENT_DEFAULT_MEMORY_MB is above SESSION_AGENT_MAX_MEMORY_MB".into(),
            );
        }
        if self.default_timeout_ms > self.max_timeout_ms {
            return Err(
                "SESSION_AGENT_DEFAULT_TIMEOUT_MS is above SESSION_AGENT_MAX_TIMEOUT_MS".into(),
            );
        }
        if self.default_ttl_seconds > self.max_ttl_seconds {
            return Err(
                "SESSION_AGENT_DEFAULT_TTL_SECONDS is above SESSION_AGENT_MAX_TTL_SECONDS".into(),
            );
        }
        if self.output_limit_bytes == 0 || self.output_limit_bytes > 64 * 1024 * 1024 {
            return Err("SESSION_AGENT_OUTPUT_LIMIT_BYTES must be between 1 and 64 MiB".into());
        }
        Ok(())
    }

    /// The SHA-256 of the admin credential, from either form, or `None`
    /// when neither is set. Errors name the variable, never echo a value.
    pub fn admin_digest(&self) -> Result<Option<[u8; 32]>, String> {
        match (&self.admin_token, &self.admin_token_sha256) {
            (Some(_), Some(_)) => Err(
                "SESSION_AGENT_ADMIN_TOKEN and SESSION_AGENT_ADMIN_TOKEN_SHA256 are both set: \
                 give the credential one way (the digest keeps the token itself out of the agent)"
                    .into(),
            ),
            (Some(t), None) if t.expose().len() < crate::sessions::MIN_TOKEN_LEN => Err(format!(
                "SESSION_AGENT_ADMIN_TOKEN must be at least {} characters (a 256-bit secret); make one with: {}",
                crate::sessions::MIN_TOKEN_LEN,
                crate::sessions::MAKE_TOKEN_COMMAND
            )),
            (Some(t), None) => Ok(Some(crate::sessions::TokenDigest::of(t.expose()).0)),
            (None, Some(h)) => parse_sha256_hex(h.expose()).map(Some).ok_or_else(|| {
                format!(
                    "SESSION_AGENT_ADMIN_TOKEN_SHA256 must be 64 hex digits, the SHA-256 of the \
                     admin token (`printf %s \"$TOKEN\" | sha256sum`); got {} characters{}",
                    h.expose().len(),
                    if h.expose().len() == 64 {
                        " with a non-hex one"
                    } else {
                        ""
                    }
                )
            }),
            (None, None) => Ok(None),
        }
    }

    fn runsc_flag_list(&self) -> Vec<String> {
        self.runsc_flags
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    pub fn workspace_root(&self) -> PathBuf {
        self.workspace_root
            .clone()
            .unwrap_or_else(|| self.state_dir.join("workspaces"))
    }

    pub fn launcher_config(&self) -> LauncherConfig {
        LauncherConfig {
            kind: self.isolation,
            state_dir: self.state_dir.clone(),
            runsc_path: self.runsc.clone(),
            runsc_platform: self.runsc_platform.clone(),
            runsc_extra_flags: self.runsc_flag_list(),
            bwrap_path: self.bwrap.clone(),
        }
    }

    /// The interpreter binaries kernels run.
    pub fn interpreters(&self) -> Interpreters {
        Interpreters {
            python: self.python.clone(),
            node: self.node.clone(),
            bash: self.bash.clone(),
        }
    }

    pub fn settings(&self) -> Settings {
        let defaults = EffectiveLimits {
            memory_mb: self.default_memory_mb,
            cpu_millicores: 1000,
            max_processes: 128,
            disk_mb: 256,
            timeout_ms: self.default_timeout_ms,
            max_output_bytes: self.output_limit_bytes,
        };
        let maximums = EffectiveLimits {
            memory_mb: self.max_memory_mb,
            cpu_millicores: 4000,
            max_processes: 1024,
            disk_mb: 4096,
            timeout_ms: self.max_timeout_ms,
            max_output_bytes: 64 * 1024 * 1024,
        };
        Settings {
            defaults,
            maximums,
            auth_bypass: self.auth_bypass,
            max_sessions: self.max_sessions,
            default_ttl: Duration::from_secs(self.default_ttl_seconds),
            max_ttl: Duration::from_secs(self.max_ttl_seconds),
            default_idle_timeout: Duration::from_secs(self.idle_timeout_seconds),
            ready_timeout: Duration::from_millis(self.ready_timeout_ms),
            interrupt_grace: Duration::from_millis(self.interrupt_grace_ms),
            workspace_root: self.workspace_root(),
            package_root: self.package_root.clone(),
            interpreters: self.interpreters(),
            // Validated before: an invalid one here admits nobody.
            admin_token: self.admin_digest().ok().flatten(),
            single_use: self.isolation == IsolationKind::Pod,
        }
    }
}

/// 64 hex digits (either case) as 32 bytes; anything else is `None`.
fn parse_sha256_hex(text: &str) -> Option<[u8; 32]> {
    if text.len() != 64 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    hex::decode_to_slice(text, &mut out).ok()?;
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        let mut v = vec!["session-agent"];
        v.extend_from_slice(args);
        Config::parse_from(v)
    }

    #[test]
    fn bypass_and_none_are_refused_in_production() {
        let e = parse(&["--env", "production", "--auth-bypass", "true"])
            .validate()
            .unwrap_err();
        assert!(e.contains("SESSION_AGENT_AUTH_BYPASS"), "{e}");
        let e = parse(&["--env", "production", "--isolation", "none"])
            .validate()
            .unwrap_err();
        assert!(e.contains("SESSION_ISOLATION"), "{e}");
        assert!(
            parse(&["--env", "dev", "--auth-bypass", "true"])
                .validate()
                .is_ok()
        );
        let admin = "a".repeat(43);
        assert!(
            parse(&["--env", "production", "--admin-token", &admin])
                .validate()
                .is_ok()
        );
    }

    #[test]
    fn without_the_creation_credential_start_up_is_refused() {
        for env in ["dev", "production"] {
            let e = parse(&["--env", env]).validate().unwrap_err();
            assert!(e.contains("SESSION_AGENT_ADMIN_TOKEN is required"), "{e}");
        }
        let e = parse(&["--admin-token", "short"]).validate().unwrap_err();
        assert!(e.contains("at least 43"), "{e}");
        assert!(e.contains(crate::sessions::MAKE_TOKEN_COMMAND), "{e}");
        // Only bypass (development) starts without it.
        assert!(parse(&["--auth-bypass", "true"]).validate().is_ok());
    }

    #[test]
    fn a_digest_is_64_hex_digits_in_either_case() {
        let lower = "0123456789abcdef".repeat(4);
        let want = parse_sha256_hex(&lower).unwrap();
        assert_eq!(parse_sha256_hex(&lower.to_uppercase()), Some(want));
        assert_eq!(want[0], 0x01);
        for bad in [
            &lower[1..],
            &format!("{lower}0"),
            &format!("{}g", &lower[1..]),
            &format!("+{}", &lower[1..]),
            "",
        ] {
            assert_eq!(parse_sha256_hex(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn weakening_runsc_flags_are_refused_at_start() {
        let e = parse(&["--runsc-flags=--overlay --network=host"])
            .validate()
            .unwrap_err();
        assert!(e.contains("SESSION_AGENT_RUNSC_FLAGS"), "{e}");
    }

    #[test]
    fn bad_pool_and_addr() {
        assert!(
            parse(&["--warm-pool", "cobol=1"])
                .validate()
                .unwrap_err()
                .contains("WARM_POOL")
        );
        assert!(
            parse(&["--addr", "x"])
                .validate()
                .unwrap_err()
                .contains("SESSION_AGENT_ADDR")
        );
    }
}
