//! The data plane's configuration: one struct, from flags or environment
//! variables, validated before any socket is bound.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Where sandboxes come from (`SESSION_RUNTIME_BACKEND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// A session agent on this host (`SESSION_AGENT_ENDPOINT`).
    Local,
    /// One gVisor RuntimeClass pod per session, through the Kubernetes API.
    K8s,
}

/// How the data plane authenticates to the session agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum AgentAuthMode {
    /// A fresh 256-bit token per session, registered with the agent.
    Enforced,
    /// No token (the agent must run with `SESSION_AGENT_AUTH_BYPASS=true`).
    Bypass,
}

/// Where session records live (`SESSION_REGISTRY_BACKEND`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RegistryKind {
    Memory,
    File,
    Redis,
}

/// Where artifacts are stored (`ARTIFACT_STORE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ArtifactBackend {
    Fs,
    S3,
}

/// Data plane configuration.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "data-plane",
    version,
    args_override_self = true,
    about = "Data plane: runtime registry and session routing (internal API)"
)]
pub struct Config {
    /// Listen address (`:8081` binds every interface).
    #[arg(long, env = "DATA_PLANE_ADDR", default_value = ":8081")]
    pub addr: String,
    /// Deployment environment; `production` refuses development-only flags.
    #[arg(long = "env", env = "ENV", default_value = "dev")]
    pub environment: String,
    /// HS256 secret of the service credential (required unless AUTHZ_BYPASS).
    #[arg(long, env = "AUTH_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// Expected `iss` of the service credential.
    #[arg(long, env = "AUTH_ISSUER", default_value = "control-plane")]
    pub issuer: String,
    /// Expected `aud` of the service credential.
    #[arg(long, env = "AUTH_AUDIENCE", default_value = "data-plane")]
    pub audience: String,
    /// Skip the service credential (development only; every call is audited).
    #[arg(long, env = "AUTHZ_BYPASS", default_value_t = false, action = clap::ArgAction::Set)]
    pub authz_bypass: bool,
    #[arg(
        long,
        env = "SESSION_RUNTIME_BACKEND",
        value_enum,
        default_value = "local"
    )]
    pub backend: BackendKind,
    /// The session agent of the local backend.
    #[arg(
        long,
        env = "SESSION_AGENT_ENDPOINT",
        default_value = "http://127.0.0.1:9000"
    )]
    pub agent_endpoint: String,
    /// The agent's admin credential, the data plane's own: the agent creates
    /// sessions only with it (unless it runs with SESSION_AGENT_AUTH_BYPASS),
    /// and recovery destroys sandboxes that no session record owns.
    #[arg(long, env = "SESSION_AGENT_ADMIN_TOKEN", hide_env_values = true)]
    pub agent_admin_token: Option<String>,
    #[arg(
        long,
        env = "SESSION_AGENT_AUTH_MODE",
        value_enum,
        default_value = "enforced"
    )]
    pub agent_auth_mode: AgentAuthMode,
    /// How long a new session's sandbox may take to be ready (`60s`, `500ms`, `2m`).
    #[arg(long, env = "SESSION_READY_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub ready_timeout: Duration,
    /// Bound on every other call to the agent (files, deletes, health).
    #[arg(long, env = "DATA_PLANE_AGENT_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub agent_timeout: Duration,
    /// Route execution through the session agent. The data plane has no other
    /// execution path, so only `true` is accepted (the seed's variable).
    #[arg(long, env = "SESSION_AGENT_PREFER", default_value_t = true, action = clap::ArgAction::Set)]
    pub agent_prefer: bool,
    #[arg(
        long,
        env = "SESSION_REGISTRY_BACKEND",
        value_enum,
        default_value = "memory"
    )]
    pub registry: RegistryKind,
    /// Directory of the `file` session registry.
    #[arg(
        long,
        env = "SESSION_REGISTRY_PATH",
        default_value = "/var/lib/data-plane/sessions"
    )]
    pub registry_path: PathBuf,
    /// Redis of the `redis` session registry.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379")]
    pub redis_url: String,
    /// Prefix of every Redis key the data plane writes.
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "dp:")]
    pub redis_key_prefix: String,
    /// A JSON file of runtimes that extends or overrides the built-in ones.
    #[arg(long, env = "RUNTIME_REGISTRY_PATH")]
    pub runtime_registry_path: Option<PathBuf>,
    /// Session pod image fallback (Kubernetes backend).
    #[arg(
        long,
        env = "SESSION_RUNTIME_IMAGE",
        default_value = "sandbox-runtime:dev"
    )]
    pub runtime_image: String,
    #[arg(long, env = "SESSION_RUNTIME_IMAGE_PYTHON")]
    pub runtime_image_python: Option<String>,
    #[arg(long, env = "SESSION_RUNTIME_IMAGE_NODE")]
    pub runtime_image_node: Option<String>,
    /// Namespace of the session pods (Kubernetes backend).
    #[arg(
        long,
        env = "RUNTIME_NAMESPACE",
        default_value = "agent-sandbox-runtime"
    )]
    pub runtime_namespace: String,
    /// RuntimeClass of the session pods (Kubernetes backend).
    #[arg(long, env = "RUNTIME_CLASS", default_value = "gvisor")]
    pub runtime_class: String,
    /// Warm pods per runtime, `python=2,node=1` (Kubernetes backend; the
    /// local backend's pool is the agent's `SESSION_AGENT_WARM_POOL`).
    #[arg(long, env = "RUNTIME_WARM_POOL", default_value = "")]
    pub runtime_warm_pool: String,
    /// The label value that marks this data plane's pods as its own
    /// (Kubernetes backend): it adopts, reaps and routes to no other pods.
    #[arg(long, env = "RUNTIME_OWNER", default_value = "data-plane")]
    pub runtime_owner: String,
    /// Namespace of the data plane's own pods: the only source the runtime
    /// NetworkPolicy lets in (Kubernetes backend).
    #[arg(long, env = "DATA_PLANE_NAMESPACE", default_value = "default")]
    pub data_plane_namespace: String,
    /// Concurrent sessions per tenant; more -> 429.
    #[arg(long, env = "TENANT_MAX_SESSIONS", default_value_t = 20)]
    pub tenant_max_sessions: usize,
    /// Concurrent file and artifact transfers per tenant; more -> 429.
    #[arg(long, env = "TENANT_MAX_TRANSFERS", default_value_t = 4)]
    pub tenant_max_transfers: usize,
    #[arg(long, env = "ARTIFACT_STORE", value_enum, default_value = "fs")]
    pub artifact_store: ArtifactBackend,
    /// Root of the `fs` artifact store.
    #[arg(
        long,
        env = "ARTIFACT_ROOT",
        default_value = "/var/lib/data-plane/artifacts"
    )]
    pub artifact_root: PathBuf,
    /// The key-encryption key: 64 hex characters or base64 of 32 bytes.
    /// Required when ENV=production; in development a key file is generated.
    #[arg(long, env = "ARTIFACT_KEK", hide_env_values = true)]
    pub artifact_kek: Option<String>,
    /// Development KEK file (mode 0600), used when ARTIFACT_KEK is unset.
    #[arg(long, env = "ARTIFACT_KEK_FILE")]
    pub artifact_kek_file: Option<PathBuf>,
    /// The dependency allowlist: `{"python": {"six": ">=1.16,<2"}}`. Without
    /// it no package is allowed.
    #[arg(long, env = "DEPENDENCY_ALLOWLIST_PATH")]
    pub dependency_allowlist: Option<PathBuf>,
    /// A directory of wheels, the package index the data plane installs from.
    #[arg(long, env = "DEPENDENCY_INDEX_DIR")]
    pub dependency_index: Option<PathBuf>,
    /// Content-addressed installs; must be inside the agent's SESSION_AGENT_PACKAGE_ROOT.
    #[arg(
        long,
        env = "DEPENDENCY_CACHE_DIR",
        default_value = "/var/lib/sandbox-packages"
    )]
    pub dependency_cache: PathBuf,
    /// Bucket of the `s3` artifact store.
    #[arg(long, env = "S3_BUCKET")]
    pub s3_bucket: Option<String>,
    /// S3 endpoint (MinIO, Ceph, a test server); AWS when unset.
    #[arg(long, env = "S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    #[arg(long, env = "S3_REGION", default_value = "us-east-1")]
    pub s3_region: String,
    /// Path-style addressing (`endpoint/bucket/key`), what most S3 servers but AWS expect.
    #[arg(long, env = "S3_FORCE_PATH_STYLE", default_value_t = true, action = clap::ArgAction::Set)]
    pub s3_force_path_style: bool,
    /// Prefix of every key the data plane writes to the bucket.
    #[arg(long, env = "S3_PREFIX", default_value = "")]
    pub s3_prefix: String,
    #[arg(long, env = "AWS_ACCESS_KEY_ID", hide_env_values = true)]
    pub s3_access_key_id: Option<String>,
    #[arg(long, env = "AWS_SECRET_ACCESS_KEY", hide_env_values = true)]
    pub s3_secret_access_key: Option<String>,
    /// Largest artifact, bytes (-> 413 above).
    #[arg(long, env = "ARTIFACT_MAX_BYTES", default_value_t = 4 * 1024 * 1024 * 1024)]
    pub artifact_max_bytes: u64,
    /// Quota on a tenant's stored artifact bytes (uploads and job outputs;
    /// -> 429 `tenant_quota_exceeded` past it). The control plane's policy
    /// (`rate_limits.maxArtifactBytes`) replaces it per tenant.
    #[arg(long, env = "TENANT_MAX_ARTIFACT_BYTES", default_value_t = 10 * 1024 * 1024 * 1024)]
    pub tenant_max_artifact_bytes: u64,
    /// Largest request body, bytes (-> 413 above).
    #[arg(long, env = "DATA_PLANE_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Finished jobs' outcomes kept per tenant for replays (results and
    /// cancel markers); a tenant's flood evicts only its own.
    #[arg(long, env = "JOB_KEEP_PER_TENANT", default_value_t = 10_000)]
    pub job_keep_per_tenant: usize,
    /// Bytes of job output kept per tenant for replays.
    #[arg(long, env = "JOB_KEEP_TENANT_BYTES", default_value_t = 128 * 1024 * 1024)]
    pub job_keep_tenant_bytes: u64,
    /// Bytes of job output kept for all tenants together.
    #[arg(long, env = "JOB_KEEP_TOTAL_BYTES", default_value_t = 512 * 1024 * 1024)]
    pub job_keep_total_bytes: u64,
    /// How long a finished job's outcome is kept (in memory and saved).
    #[arg(long, env = "JOB_RESULT_TTL", default_value = "24h", value_parser = parse_duration)]
    pub job_result_ttl: Duration,
    /// OpenTelemetry (`OTEL_EXPORTER_OTLP_ENDPOINT`, ...): see `shared::telemetry`.
    #[command(flatten)]
    pub telemetry: shared::telemetry::TelemetryConfig,
    /// Secret values as files `<dir>/<tenant>/<NAME>` (development; local
    /// backend). Without it and RUNTIME_SECRETS_NAME, a named secret is 404.
    #[arg(long, env = "SECRETS_DIR")]
    pub secrets_dir: Option<PathBuf>,
    /// The Kubernetes Secret in RUNTIME_NAMESPACE holding secret values as
    /// keys `<tenant>.<NAME>` (`k8s` backend; the Role needs `get` on it).
    #[arg(long, env = "RUNTIME_SECRETS_NAME")]
    pub runtime_secrets_name: Option<String>,
}

/// `60s`, `500ms`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, mult_ms) = if let Some(n) = s.strip_suffix("ms") {
        (n, 1)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000)
    } else {
        (s, 1000)
    };
    let n: u64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 60s, 500ms or 2m"))?;
    Ok(Duration::from_millis(n.saturating_mul(mult_ms)))
}

impl Config {
    /// The artifact backend this configuration names.
    pub fn blobs(&self) -> Result<crate::workspace::blobs::Blobs, String> {
        use crate::workspace::blobs::Blobs;
        match self.artifact_store {
            ArtifactBackend::Fs => {
                // Private: 0700 directories (the objects in them are 0600).
                for d in ["", "objects", "meta", "keys"] {
                    crate::workspace::blobs::private_dir_all(&self.artifact_root.join(d)).map_err(
                        |e| format!("ARTIFACT_ROOT {}: {e}", self.artifact_root.display()),
                    )?;
                }
                Ok(Blobs::Fs {
                    root: self.artifact_root.clone(),
                })
            }
            ArtifactBackend::S3 => {
                use aws_sdk_s3::config::{BehaviorVersion, Credentials, Region};
                let creds = Credentials::new(
                    self.s3_access_key_id.clone().unwrap_or_default(),
                    self.s3_secret_access_key.clone().unwrap_or_default(),
                    None,
                    None,
                    "data-plane-config",
                );
                let mut b = aws_sdk_s3::Config::builder()
                    .behavior_version(BehaviorVersion::latest())
                    .region(Region::new(self.s3_region.clone()))
                    .credentials_provider(creds)
                    .force_path_style(self.s3_force_path_style)
                    // The AEAD of every chunk is the integrity check; S3's
                    // own response checksum would turn tampering into an
                    // opaque transport error instead of `integrity_error`.
                    .response_checksum_validation(
                        aws_sdk_s3::config::ResponseChecksumValidation::WhenRequired,
                    );
                if let Some(e) = &self.s3_endpoint {
                    b = b.endpoint_url(e);
                }
                Ok(Blobs::S3 {
                    client: aws_sdk_s3::Client::from_conf(b.build()),
                    bucket: self.s3_bucket.clone().unwrap_or_default(),
                    prefix: self.s3_prefix.clone(),
                })
            }
        }
    }

    /// The key-encryption key: ARTIFACT_KEK, or (development only) a key
    /// file generated once with mode 0600.
    pub fn load_kek(&self) -> Result<crate::workspace::crypto::SecretKey, String> {
        use crate::workspace::crypto::SecretKey;
        if let Some(k) = &self.artifact_kek {
            return SecretKey::parse(k).map_err(|e| format!("ARTIFACT_KEK: {e}"));
        }
        let path = self
            .artifact_kek_file
            .clone()
            .unwrap_or_else(|| self.artifact_root.join("dev-kek"));
        match std::fs::read_to_string(&path) {
            Ok(text) => SecretKey::parse(&text)
                .map_err(|e| format!("ARTIFACT_KEK_FILE {}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                if let Some(dir) = path.parent() {
                    crate::workspace::blobs::private_dir_all(dir)
                        .map_err(|e| format!("{}: {e}", dir.display()))?;
                }
                let key = SecretKey::generate();
                let opened = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&path);
                let mut f = match opened {
                    Ok(f) => f,
                    // Another process created it first: use that one.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        return self.load_kek();
                    }
                    Err(e) => return Err(format!("ARTIFACT_KEK_FILE {}: {e}", path.display())),
                };
                f.write_all(key.to_hex().as_bytes())
                    .map_err(|e| e.to_string())?;
                tracing::warn!(path = %path.display(),
                    "ARTIFACT_KEK is not set: generated a development key-encryption key (never use this in production)");
                Ok(key)
            }
            Err(e) => Err(format!("ARTIFACT_KEK_FILE {}: {e}", path.display())),
        }
    }

    /// Outside production, fills an unset service-credential secret and
    /// agent credential with the development keys in `.local/` (the ones
    /// `make run-local` uses), so the seed's "run locally" commands give a
    /// working stack. Production is untouched and `validate` refuses it.
    pub fn use_dev_keys(&mut self) -> Result<(), String> {
        let dir = std::path::Path::new(shared::env::DEV_KEY_DIR);
        if !self.authz_bypass {
            shared::env::dev_key_fallback(
                &mut self.jwt_secret,
                &self.environment,
                "AUTH_JWT_SECRET",
                dir,
                shared::env::dev_keys::SERVICE,
            )?;
        }
        shared::env::dev_key_fallback(
            &mut self.agent_admin_token,
            &self.environment,
            "SESSION_AGENT_ADMIN_TOKEN",
            dir,
            shared::env::dev_keys::AGENT_ADMIN,
        )
    }

    /// Refuses unsafe or unavailable settings, naming the variable.
    pub fn validate(&self) -> Result<(), String> {
        shared::server::parse_listen_addr(&self.addr)
            .map_err(|e| format!("DATA_PLANE_ADDR: {e}"))?;
        shared::env::refuse_in_production(&self.environment, "AUTHZ_BYPASS", self.authz_bypass)?;
        if !self.authz_bypass {
            match self.jwt_secret.as_deref() {
                None | Some("") => {
                    return Err(
                        "AUTH_JWT_SECRET is required (or AUTHZ_BYPASS=true outside production)"
                            .into(),
                    );
                }
                Some(s) if s.len() < 32 => {
                    return Err("AUTH_JWT_SECRET must be at least 32 bytes".into());
                }
                Some(_) => {}
            }
        }
        if self.agent_auth_mode == AgentAuthMode::Bypass
            && shared::env::is_production(&self.environment)
        {
            return Err(
                "SESSION_AGENT_AUTH_MODE=bypass must not be used when ENV=production".into(),
            );
        }
        if self.backend == BackendKind::K8s {
            self.validate_k8s()?;
        }
        if !self.agent_endpoint.starts_with("http://")
            && !self.agent_endpoint.starts_with("https://")
        {
            return Err(format!(
                "SESSION_AGENT_ENDPOINT={} must be an http(s) URL",
                self.agent_endpoint
            ));
        }
        if self.artifact_store == ArtifactBackend::S3 {
            if self.s3_bucket.as_deref().is_none_or(str::is_empty) {
                return Err("ARTIFACT_STORE=s3 needs S3_BUCKET".into());
            }
            if self.s3_access_key_id.is_none() || self.s3_secret_access_key.is_none() {
                return Err(
                    "ARTIFACT_STORE=s3 needs AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY".into(),
                );
            }
        }
        if let Some(k) = &self.artifact_kek {
            crate::workspace::crypto::SecretKey::parse(k)
                .map_err(|e| format!("ARTIFACT_KEK: {e}"))?;
        } else if shared::env::is_production(&self.environment) {
            return Err("ARTIFACT_KEK is required when ENV=production".into());
        }
        // A production agent creates sessions only for this credential (its
        // bypass is refused there): fail at start, naming it, not per request.
        if shared::env::is_production(&self.environment)
            && self.backend == BackendKind::Local
            && self.agent_admin_token.as_deref().is_none_or(str::is_empty)
        {
            return Err("SESSION_AGENT_ADMIN_TOKEN is required when ENV=production: the session agent creates sessions only for its holder".into());
        }
        if !self.agent_prefer {
            return Err("SESSION_AGENT_PREFER=false: this data plane executes only through the session agent".into());
        }
        if self.tenant_max_sessions == 0 {
            return Err("TENANT_MAX_SESSIONS must be at least 1".into());
        }
        if self.job_keep_per_tenant == 0 {
            return Err("JOB_KEEP_PER_TENANT must be at least 1".into());
        }
        if self.job_keep_tenant_bytes > self.job_keep_total_bytes {
            return Err("JOB_KEEP_TENANT_BYTES must not exceed JOB_KEEP_TOTAL_BYTES".into());
        }
        if self.job_result_ttl.is_zero() {
            return Err("JOB_RESULT_TTL must be positive".into());
        }
        if self.tenant_max_transfers == 0 {
            return Err("TENANT_MAX_TRANSFERS must be at least 1".into());
        }
        self.validate_secrets()
    }

    /// One secret source at most, each with the backend it serves.
    fn validate_secrets(&self) -> Result<(), String> {
        use crate::runtime::k8s::objects::is_dns_subdomain;
        if let Some(name) = &self.runtime_secrets_name {
            if self.backend != BackendKind::K8s {
                return Err(
                    "RUNTIME_SECRETS_NAME needs SESSION_RUNTIME_BACKEND=k8s (use SECRETS_DIR with the local backend)".into(),
                );
            }
            if !is_dns_subdomain(name) {
                return Err(format!(
                    "RUNTIME_SECRETS_NAME={name:?} is not a valid Secret name"
                ));
            }
            if self.secrets_dir.is_some() {
                return Err("set SECRETS_DIR or RUNTIME_SECRETS_NAME, not both".into());
            }
        }
        if let Some(dir) = &self.secrets_dir
            && !dir.is_dir()
        {
            return Err(format!("SECRETS_DIR={} is not a directory", dir.display()));
        }
        Ok(())
    }

    /// The Kubernetes backend's settings: names the API server would refuse
    /// are refused here, naming the variable.
    fn validate_k8s(&self) -> Result<(), String> {
        use crate::runtime::k8s::objects::{is_dns_label, is_dns_subdomain, is_label_value};
        if self.agent_auth_mode == AgentAuthMode::Bypass {
            return Err("SESSION_AGENT_AUTH_MODE=bypass cannot be used with SESSION_RUNTIME_BACKEND=k8s: every pod gets its own token".into());
        }
        if !is_dns_label(&self.runtime_namespace) {
            return Err(format!(
                "RUNTIME_NAMESPACE={:?} is not a valid namespace name (a DNS label)",
                self.runtime_namespace
            ));
        }
        if !is_dns_label(&self.data_plane_namespace) {
            return Err(format!(
                "DATA_PLANE_NAMESPACE={:?} is not a valid namespace name (a DNS label)",
                self.data_plane_namespace
            ));
        }
        if !is_dns_subdomain(&self.runtime_class) {
            return Err(format!(
                "RUNTIME_CLASS={:?} is not a valid RuntimeClass name",
                self.runtime_class
            ));
        }
        if self.runtime_owner.is_empty() || !is_label_value(&self.runtime_owner) {
            return Err(format!(
                "RUNTIME_OWNER={:?} must be a non-empty Kubernetes label value (63 characters of [A-Za-z0-9._-])",
                self.runtime_owner
            ));
        }
        self.warm_pool_sizes()?;
        Ok(())
    }

    /// `RUNTIME_WARM_POOL` parsed: runtime name -> pods kept warm.
    pub fn warm_pool_sizes(&self) -> Result<std::collections::BTreeMap<String, usize>, String> {
        let mut sizes = std::collections::BTreeMap::new();
        for part in self.runtime_warm_pool.split(',').map(str::trim) {
            if part.is_empty() {
                continue;
            }
            let parsed = part
                .split_once('=')
                .and_then(|(name, n)| Some((name.trim(), n.trim().parse::<usize>().ok()?)));
            match parsed {
                Some((name, n)) if !name.is_empty() && n <= 64 => {
                    sizes.insert(name.to_owned(), n);
                }
                _ => {
                    return Err(format!(
                        "RUNTIME_WARM_POOL: {part:?} is not `runtime=count` (count at most 64)"
                    ));
                }
            }
        }
        Ok(sizes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Config {
        let mut v = vec!["data-plane"];
        v.extend_from_slice(args);
        Config::parse_from(v)
    }

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    #[test]
    fn durations() {
        assert_eq!(parse_duration("60s").unwrap(), Duration::from_secs(60));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn credential_is_required_and_bypass_refused_in_production() {
        assert!(
            parse(&[])
                .validate()
                .unwrap_err()
                .contains("AUTH_JWT_SECRET")
        );
        assert!(
            parse(&["--jwt-secret", "short"])
                .validate()
                .unwrap_err()
                .contains("32 bytes")
        );
        assert!(parse(&["--jwt-secret", SECRET]).validate().is_ok());
        assert!(parse(&["--authz-bypass", "true"]).validate().is_ok());
        let e = parse(&["--env", "production", "--authz-bypass", "true"])
            .validate()
            .unwrap_err();
        assert!(e.contains("AUTHZ_BYPASS"), "{e}");
        let e = parse(&[
            "--env",
            "production",
            "--jwt-secret",
            SECRET,
            "--agent-auth-mode",
            "bypass",
        ])
        .validate()
        .unwrap_err();
        assert!(e.contains("SESSION_AGENT_AUTH_MODE"), "{e}");
    }

    #[test]
    fn the_agent_credential_is_required_in_production() {
        let kek = "ab".repeat(32);
        let prod = [
            "--env",
            "production",
            "--jwt-secret",
            SECRET,
            "--artifact-kek",
            &kek,
        ];
        let e = parse(&prod).validate().unwrap_err();
        assert!(e.contains("SESSION_AGENT_ADMIN_TOKEN"), "{e}");
        let admin = "a".repeat(43);
        let mut with = prod.to_vec();
        with.extend(["--agent-admin-token", &admin]);
        assert!(parse(&with).validate().is_ok());
    }

    #[test]
    fn kek_is_required_in_production_and_generated_in_development() {
        let e = parse(&["--env", "production", "--jwt-secret", SECRET])
            .validate()
            .unwrap_err();
        assert!(e.contains("ARTIFACT_KEK"), "{e}");
        let e = parse(&["--jwt-secret", SECRET, "--artifact-kek", "nope"])
            .validate()
            .unwrap_err();
        assert!(e.contains("ARTIFACT_KEK"), "{e}");
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("kek");
        let c = parse(&[
            "--jwt-secret",
            SECRET,
            "--artifact-kek-file",
            file.to_str().unwrap(),
        ]);
        let k1 = c.load_kek().unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(
            c.load_kek().unwrap().to_hex(),
            k1.to_hex(),
            "the same key on the next start"
        );
    }

    #[test]
    fn secret_sources_are_checked_naming_the_variable() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_str().unwrap();
        assert!(
            parse(&["--jwt-secret", SECRET, "--secrets-dir", dir])
                .validate()
                .is_ok()
        );
        for (args, var) in [
            (vec!["--secrets-dir", "/nonexistent/secrets"], "SECRETS_DIR"),
            (
                vec!["--runtime-secrets-name", "s"],
                "SESSION_RUNTIME_BACKEND=k8s",
            ),
            (
                vec!["--backend", "k8s", "--runtime-secrets-name", "Bad_Name"],
                "RUNTIME_SECRETS_NAME",
            ),
            (
                vec![
                    "--backend",
                    "k8s",
                    "--runtime-secrets-name",
                    "s",
                    "--secrets-dir",
                    dir,
                ],
                "not both",
            ),
        ] {
            let mut all = vec!["--jwt-secret", SECRET];
            all.extend(args);
            let e = parse(&all).validate().unwrap_err();
            assert!(e.contains(var), "{e}");
        }
        let k8s = [
            "--jwt-secret",
            SECRET,
            "--backend",
            "k8s",
            "--runtime-secrets-name",
            "sandbox-secrets",
        ];
        assert!(parse(&k8s).validate().is_ok());
    }

    #[test]
    fn agent_prefer_false_is_refused() {
        let e = parse(&["--jwt-secret", SECRET, "--agent-prefer", "false"])
            .validate()
            .unwrap_err();
        assert!(e.contains("SESSION_AGENT_PREFER"), "{e}");
    }

    #[test]
    fn unavailable_backends_are_refused_by_name() {
        let e = parse(&["--jwt-secret", SECRET, "--artifact-store", "s3"])
            .validate()
            .unwrap_err();
        assert!(e.contains("S3_BUCKET"), "{e}");
    }

    #[test]
    fn k8s_settings_are_checked_naming_the_variable() {
        let k8s = ["--jwt-secret", SECRET, "--backend", "k8s"];
        assert!(parse(&k8s).validate().is_ok(), "the defaults are valid");
        for (flag, value, var) in [
            ("--runtime-namespace", "Bad_NS", "RUNTIME_NAMESPACE"),
            ("--runtime-namespace", "", "RUNTIME_NAMESPACE"),
            ("--data-plane-namespace", "a/b", "DATA_PLANE_NAMESPACE"),
            ("--runtime-class", "gvisor!", "RUNTIME_CLASS"),
            ("--runtime-owner", "", "RUNTIME_OWNER"),
            ("--runtime-owner", "has space", "RUNTIME_OWNER"),
            ("--runtime-warm-pool", "python", "RUNTIME_WARM_POOL"),
            ("--runtime-warm-pool", "python=-1", "RUNTIME_WARM_POOL"),
            ("--runtime-warm-pool", "python=1000", "RUNTIME_WARM_POOL"),
            ("--agent-auth-mode", "bypass", "SESSION_AGENT_AUTH_MODE"),
        ] {
            let mut args = k8s.to_vec();
            args.extend([flag, value]);
            let e = parse(&args).validate().unwrap_err();
            assert!(e.contains(var), "{flag}={value:?}: {e}");
        }
        let mut args = k8s.to_vec();
        args.extend(["--runtime-warm-pool", " python=2, node=0 "]);
        let sizes = parse(&args).warm_pool_sizes().unwrap();
        assert_eq!(sizes.get("python"), Some(&2));
        assert_eq!(sizes.get("node"), Some(&0));
        // Production with k8s needs no agent admin credential: each pod has its own.
        let kek = "ab".repeat(32);
        let mut prod = k8s.to_vec();
        prod.extend(["--env", "production", "--artifact-kek", &kek]);
        assert!(parse(&prod).validate().is_ok());
    }
}
