//! The control plane's configuration: one struct, from flags or environment
//! variables, validated before any socket is bound.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

/// Which database holds metadata, jobs and the audit log (`DATABASE_DRIVER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DatabaseDriver {
    /// Embedded, one process (the `make run-local` default).
    Sqlite,
    /// Production; several replicas may share it.
    Postgres,
}

/// Control plane configuration.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "control-plane",
    version,
    args_override_self = true,
    about = "Control plane: the authenticated REST API agents call"
)]
pub struct Config {
    /// Listen address of the REST API (`:8080` binds every interface).
    #[arg(long, env = "CONTROL_PLANE_ADDR", default_value = ":8080")]
    pub addr: String,
    /// Deployment environment; `production` refuses development-only flags.
    #[arg(long = "env", env = "ENV", default_value = "dev")]
    pub environment: String,

    /// HS256 secret that signs callers' JWTs (and/or AUTH_JWKS_PATH).
    #[arg(long, env = "AUTH_JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// A JWKS file with the RS256/ES256 public keys of the identity provider.
    #[arg(long, env = "AUTH_JWKS_PATH")]
    pub jwks_path: Option<PathBuf>,
    /// Expected `iss` of callers' JWTs.
    #[arg(long, env = "AUTH_ISSUER", default_value = "sandbox-dev-idp")]
    pub issuer: String,
    /// Expected `aud` of callers' JWTs.
    #[arg(long, env = "AUTH_AUDIENCE", default_value = "control-plane")]
    pub audience: String,
    /// Clock skew accepted on `exp`/`nbf`, seconds.
    #[arg(long, env = "AUTH_LEEWAY_SECONDS", default_value_t = 30)]
    pub leeway_seconds: u64,
    /// Skip authentication and policy (development only; every request is
    /// audited with `bypass: true`; refused when ENV=production).
    #[arg(long, env = "AUTHZ_BYPASS", default_value_t = false, action = clap::ArgAction::Set)]
    pub authz_bypass: bool,

    /// `sqlite` or `postgres`.
    #[arg(long, env = "DATABASE_DRIVER", value_enum, default_value = "sqlite")]
    pub database_driver: DatabaseDriver,
    /// Connection URL. SQLite accepts `file:NAME.db?mode=rwc`, `sqlite://...`
    /// and `sqlite::memory:`; Postgres `postgres://...`.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "file:control-plane.db?cache=shared&mode=rwc"
    )]
    pub database_url: String,
    /// Connections in the pool.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 10)]
    pub database_max_connections: u32,

    /// Base URL of the data plane's internal API.
    #[arg(long, env = "DATA_PLANE_URL", default_value = "http://127.0.0.1:8081")]
    pub data_plane_url: String,
    /// HS256 secret of the service credential the data plane checks (its
    /// `AUTH_JWT_SECRET`).
    #[arg(long, env = "DATA_PLANE_JWT_SECRET", hide_env_values = true)]
    pub data_plane_secret: Option<String>,
    /// `iss` of the service credential (the data plane's `AUTH_ISSUER`).
    #[arg(long, env = "DATA_PLANE_ISSUER", default_value = "control-plane")]
    pub data_plane_issuer: String,
    /// `aud` of the service credential (the data plane's `AUTH_AUDIENCE`).
    #[arg(long, env = "DATA_PLANE_AUDIENCE", default_value = "data-plane")]
    pub data_plane_audience: String,
    /// Bound on one data-plane call beyond the step's own timeout, e.g. `10s`.
    #[arg(long, env = "DATA_PLANE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub data_plane_timeout: Duration,

    /// Jobs dispatched at once by this replica.
    #[arg(long, env = "JOB_WORKERS", default_value_t = 4)]
    pub job_workers: usize,
    /// Workflows run at once by this replica (each holds one session while
    /// it runs; leases, attempts and polling are the jobs' settings).
    #[arg(long, env = "WORKFLOW_WORKERS", default_value_t = 2)]
    pub workflow_workers: usize,
    /// Workflows of one tenant running at once (all replicas); its others
    /// wait while other tenants' workflows are claimed.
    #[arg(long, env = "WORKFLOW_TENANT_MAX_RUNNING", default_value_t = 1)]
    pub workflow_tenant_max_running: i64,
    /// How long a worker owns a job before another replica may take it over;
    /// renewed while the job runs.
    #[arg(long, env = "JOB_LEASE", default_value = "30s", value_parser = parse_duration)]
    pub job_lease: Duration,
    /// Attempts (dispatches) before a job fails with a reason.
    #[arg(long, env = "JOB_MAX_ATTEMPTS", default_value_t = 5)]
    pub job_max_attempts: u32,
    /// How often idle workers look for jobs queued by other replicas.
    #[arg(long, env = "JOB_POLL_INTERVAL", default_value = "500ms", value_parser = parse_duration)]
    pub job_poll_interval: Duration,
    /// Jobs one tenant may have queued (not yet running); one more -> 429
    /// `tenant_quota_exceeded`.
    #[arg(long, env = "JOB_TENANT_MAX_QUEUED", default_value_t = 100)]
    pub job_tenant_max_queued: i64,
    /// Jobs of one tenant running at once across replicas; the rest wait
    /// while other tenants' jobs are claimed.
    #[arg(long, env = "JOB_TENANT_MAX_RUNNING", default_value_t = 2)]
    pub job_tenant_max_running: i64,
    /// Long polls (`waitMs`) and event streams one tenant may hold open at
    /// once in this replica; one more -> 429 `tenant_quota_exceeded`.
    #[arg(long, env = "TENANT_MAX_WAITERS", default_value_t = 32)]
    pub tenant_max_waiters: usize,
    /// Tenant policy evaluations running at once in this replica.
    #[arg(long, env = "POLICY_MAX_CONCURRENT", default_value_t = 4)]
    pub policy_max_concurrent: usize,
    /// Of which one tenant may hold at most this many.
    #[arg(long, env = "POLICY_TENANT_MAX_CONCURRENT", default_value_t = 2)]
    pub policy_tenant_max_concurrent: usize,
    /// How long an `Idempotency-Key` is remembered (at least 24 h).
    #[arg(long, env = "IDEMPOTENCY_TTL", default_value = "24h", value_parser = parse_duration)]
    pub idempotency_ttl: Duration,

    /// A Rego file replacing the bundled default policy.
    #[arg(long, env = "POLICY_DEFAULT_PATH")]
    pub policy_default_path: Option<PathBuf>,
    /// Largest request body accepted, bytes.
    #[arg(long, env = "CONTROL_PLANE_MAX_BODY_BYTES", default_value_t = 2 * 1024 * 1024)]
    pub max_body_bytes: usize,

    /// Listen address of the MCP server (Streamable HTTP at `/mcp`, the
    /// `/tools/*` routes); empty disables it.
    #[arg(long, env = "MCP_ADDR", default_value = ":8090")]
    pub mcp_addr: String,
    /// `Host` names the MCP port answers (DNS rebinding), comma-separated;
    /// `*` stands for one DNS label. Default: localhost, 127.0.0.1, [::1]
    /// and the Kubernetes service names `control-plane`,
    /// `control-plane.*.svc`, `control-plane.*.svc.cluster.local`.
    #[arg(long, env = "MCP_ALLOWED_HOSTS")]
    pub mcp_allowed_hosts: Option<String>,
    /// Browser `Origin`s allowed on the MCP port (`scheme://host[:port]`,
    /// comma-separated). Default: http(s) origins on an allowed host.
    /// Requests without `Origin` (non-browser clients) pass.
    #[arg(long, env = "MCP_ALLOWED_ORIGINS")]
    pub mcp_allowed_origins: Option<String>,
    /// Characters of stdout, stderr or file text one MCP tool result carries
    /// before it is cut with a "[truncated, N more bytes ...]" marker.
    #[arg(long, env = "MCP_MAX_OUTPUT_CHARS", default_value_t = 20_000)]
    pub mcp_max_output_chars: usize,
    /// Public URL of the MCP endpoint (`https://sandbox.example.com/mcp`),
    /// named by the protected-resource metadata; default: from the request's
    /// `Host`.
    #[arg(long, env = "MCP_RESOURCE_URL")]
    pub mcp_resource_url: Option<String>,

    /// Requests (every authenticated `/v1`, `/tools` and MCP call) one
    /// tenant may make per minute, sustained; 0 turns the request limit off.
    /// A platform policy's `rate_limits` may set another value per tenant.
    #[arg(long, env = "RATE_LIMIT_REQUESTS_PER_MINUTE", default_value_t = 6000)]
    pub rate_limit_requests_per_minute: u32,
    /// Requests one tenant may make at once before the per-minute rate
    /// applies (the bucket's size).
    #[arg(long, env = "RATE_LIMIT_BURST", default_value_t = crate::limits::DEFAULT_BURST)]
    pub rate_limit_burst: u32,
    /// Sandbox creations (sessions, jobs) one tenant may make per minute,
    /// sustained; 0 turns the creation limit off.
    #[arg(long, env = "RATE_LIMIT_CREATES_PER_MINUTE", default_value_t = 600)]
    pub rate_limit_creates_per_minute: u32,
    /// Sandbox creations one tenant may make at once (the bucket's size).
    #[arg(long, env = "RATE_LIMIT_CREATES_BURST", default_value_t = crate::limits::DEFAULT_CREATES_BURST)]
    pub rate_limit_creates_burst: u32,
    /// Live sessions one tenant may hold at once (counted in the control
    /// plane's store); one more -> 429 `tenant_quota_exceeded`.
    #[arg(long, env = "TENANT_MAX_SESSIONS", default_value_t = 100)]
    pub tenant_max_sessions: i64,
    /// Redis shared by the replicas' rate limiters (`redis://host:6379/0`);
    /// unset: each replica limits on its own, in process.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Prefix of every Redis key the control plane writes.
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "cp:")]
    pub redis_key_prefix: String,
    /// Bound on one Redis call of the rate limiter; past it the limiter
    /// counts as unavailable (creation refused, other requests let through).
    #[arg(long, env = "REDIS_TIMEOUT", default_value = "250ms", value_parser = parse_duration)]
    pub redis_timeout: Duration,
    /// The window of failed-authentication counting: per source, the first
    /// failure is audited at once, the rest as one aggregated event per window.
    #[arg(long, env = "AUTH_FAILURE_WINDOW", default_value = "60s", value_parser = parse_duration)]
    pub auth_failure_window: Duration,
    /// Failed authentications one source may have per window; past it the
    /// source gets 429 `rate_limited` before its token is verified.
    #[arg(long, env = "AUTH_FAILURE_MAX_PER_WINDOW", default_value_t = 100)]
    pub auth_failure_max_per_window: u64,
    /// Take the source of a request from the last `X-Forwarded-For` hop
    /// (only behind a proxy that appends it); else the peer address.
    #[arg(long, env = "AUTH_FAILURE_TRUST_FORWARDED", default_value_t = false, action = clap::ArgAction::Set)]
    pub auth_failure_trust_forwarded: bool,
    /// OpenTelemetry (`OTEL_EXPORTER_OTLP_ENDPOINT`, ...): see `shared::telemetry`.
    #[command(flatten)]
    pub telemetry: shared::telemetry::TelemetryConfig,
}

/// Parses `500ms`, `30s`, `5m`, `24h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 30s, 5m, 24h)"))?;
    let d = match unit {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    Ok(d)
}

impl Config {
    /// Outside production, fills unset signing keys with the development
    /// keys in `.local/` (the ones `make run-local` uses), so the seed's
    /// "run locally" commands give a working stack. Production is untouched
    /// and `validate` refuses it without real keys.
    pub fn use_dev_keys(&mut self) -> Result<(), String> {
        let dir = std::path::Path::new(shared::env::DEV_KEY_DIR);
        if !self.authz_bypass && self.jwks_path.is_none() {
            shared::env::dev_key_fallback(
                &mut self.jwt_secret,
                &self.environment,
                "AUTH_JWT_SECRET",
                dir,
                shared::env::dev_keys::USER,
            )?;
        }
        shared::env::dev_key_fallback(
            &mut self.data_plane_secret,
            &self.environment,
            "DATA_PLANE_JWT_SECRET",
            dir,
            shared::env::dev_keys::SERVICE,
        )
    }

    /// Checks the configuration before any socket is bound; the message
    /// names the variable at fault.
    pub fn validate(&self) -> Result<(), String> {
        shared::server::parse_listen_addr(&self.addr)
            .map_err(|e| format!("CONTROL_PLANE_ADDR: {e}"))?;
        shared::env::refuse_in_production(&self.environment, "AUTHZ_BYPASS", self.authz_bypass)?;
        if !self.authz_bypass && self.jwt_secret.is_none() && self.jwks_path.is_none() {
            return Err(
                "set AUTH_JWT_SECRET or AUTH_JWKS_PATH to verify callers (or AUTHZ_BYPASS=true in development)"
                    .into(),
            );
        }
        if let Some(s) = &self.jwt_secret
            && s.len() < 32
        {
            return Err("AUTH_JWT_SECRET must be at least 32 bytes".into());
        }
        if let Some(s) = &self.data_plane_secret
            && s.len() < 32
        {
            return Err("DATA_PLANE_JWT_SECRET must be at least 32 bytes".into());
        }
        if self.data_plane_secret.is_none() {
            return Err(
                "DATA_PLANE_JWT_SECRET is required: the data plane accepts only the service credential"
                    .into(),
            );
        }
        if !(self.data_plane_url.starts_with("http://")
            || self.data_plane_url.starts_with("https://"))
        {
            return Err(format!(
                "DATA_PLANE_URL {:?} must start with http:// or https://",
                self.data_plane_url
            ));
        }
        match self.database_driver {
            DatabaseDriver::Postgres
                if !(self.database_url.starts_with("postgres://")
                    || self.database_url.starts_with("postgresql://")) =>
            {
                return Err(format!(
                    "DATABASE_URL must be a postgres:// URL with DATABASE_DRIVER=postgres (got {:?})",
                    redact_url(&self.database_url)
                ));
            }
            DatabaseDriver::Sqlite
                if self.database_url.starts_with("postgres://")
                    || self.database_url.starts_with("postgresql://") =>
            {
                return Err("DATABASE_URL is a postgres URL but DATABASE_DRIVER=sqlite".into());
            }
            _ => {}
        }
        if self.database_max_connections == 0 {
            return Err("DATABASE_MAX_CONNECTIONS must be at least 1".into());
        }
        if self.job_workers == 0 {
            return Err("JOB_WORKERS must be at least 1".into());
        }
        if self.workflow_workers == 0 {
            return Err("WORKFLOW_WORKERS must be at least 1".into());
        }
        if self.job_max_attempts == 0 {
            return Err("JOB_MAX_ATTEMPTS must be at least 1".into());
        }
        if self.job_lease < Duration::from_secs(2) {
            return Err("JOB_LEASE must be at least 2s".into());
        }
        if self.idempotency_ttl < Duration::from_secs(24 * 3600) {
            return Err("IDEMPOTENCY_TTL must be at least 24h".into());
        }
        for (name, v) in [
            ("JOB_TENANT_MAX_QUEUED", self.job_tenant_max_queued),
            ("JOB_TENANT_MAX_RUNNING", self.job_tenant_max_running),
            (
                "WORKFLOW_TENANT_MAX_RUNNING",
                self.workflow_tenant_max_running,
            ),
            ("TENANT_MAX_WAITERS", self.tenant_max_waiters as i64),
            ("POLICY_MAX_CONCURRENT", self.policy_max_concurrent as i64),
            (
                "POLICY_TENANT_MAX_CONCURRENT",
                self.policy_tenant_max_concurrent as i64,
            ),
        ] {
            if v < 1 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if self.max_body_bytes < 1024 {
            return Err("CONTROL_PLANE_MAX_BODY_BYTES must be at least 1024".into());
        }
        if !self.mcp_addr.is_empty() {
            shared::server::parse_listen_addr(&self.mcp_addr)
                .map_err(|e| format!("MCP_ADDR: {e}"))?;
        }
        if self.mcp_max_output_chars < 200 {
            return Err("MCP_MAX_OUTPUT_CHARS must be at least 200".into());
        }
        if let Some(u) = &self.mcp_resource_url
            && !(u.starts_with("http://") || u.starts_with("https://"))
        {
            return Err(format!(
                "MCP_RESOURCE_URL {u:?} must start with http:// or https://"
            ));
        }
        for (name, rate, burst) in [
            (
                "RATE_LIMIT_BURST",
                self.rate_limit_requests_per_minute,
                self.rate_limit_burst,
            ),
            (
                "RATE_LIMIT_CREATES_BURST",
                self.rate_limit_creates_per_minute,
                self.rate_limit_creates_burst,
            ),
        ] {
            if rate > 0 && burst < 1 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if self.tenant_max_sessions < 1 {
            return Err("TENANT_MAX_SESSIONS must be at least 1".into());
        }
        if let Some(url) = &self.redis_url {
            crate::limits::check_redis_url(url).map_err(|e| format!("REDIS_URL: {e}"))?;
        }
        if self.redis_timeout < Duration::from_millis(1) {
            return Err("REDIS_TIMEOUT must be at least 1ms".into());
        }
        if let Some(list) = &self.mcp_allowed_origins {
            for o in list.split(',').map(str::trim).filter(|o| !o.is_empty()) {
                if !(o.starts_with("http://") || o.starts_with("https://")) {
                    return Err(format!(
                        "MCP_ALLOWED_ORIGINS: {o:?} must be scheme://host[:port]"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A database URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{}:***{}", &url[..scheme + 3], user, &url[at..])
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn base() -> Vec<&'static str> {
        vec![
            "control-plane",
            "--jwt-secret",
            SECRET,
            "--data-plane-secret",
            SECRET,
        ]
    }

    fn with(extra: &[&'static str]) -> Result<(), String> {
        let mut args = base();
        args.extend_from_slice(extra);
        Config::parse_from(args).validate()
    }

    #[test]
    fn defaults_are_valid() {
        with(&[]).unwrap();
    }

    #[test]
    fn bypass_is_refused_in_production() {
        with(&["--authz-bypass", "true"]).unwrap();
        let e = with(&["--authz-bypass", "true", "--env", "production"]).unwrap_err();
        assert!(e.contains("AUTHZ_BYPASS"), "{e}");
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (args, var) in [
            (vec!["--addr", "nonsense"], "CONTROL_PLANE_ADDR"),
            (vec!["--jwt-secret", "short"], "AUTH_JWT_SECRET"),
            (
                vec![
                    "--database-driver",
                    "postgres",
                    "--database-url",
                    "file:x.db",
                ],
                "DATABASE_URL",
            ),
            (
                vec!["--database-url", "postgres://u:pw@h/db"],
                "DATABASE_DRIVER",
            ),
            (vec!["--job-workers", "0"], "JOB_WORKERS"),
            (vec!["--workflow-workers", "0"], "WORKFLOW_WORKERS"),
            (vec!["--idempotency-ttl", "1h"], "IDEMPOTENCY_TTL"),
            (vec!["--data-plane-url", "ftp://x"], "DATA_PLANE_URL"),
            (vec!["--mcp-addr", "nonsense"], "MCP_ADDR"),
            (vec!["--mcp-max-output-chars", "10"], "MCP_MAX_OUTPUT_CHARS"),
            (
                vec!["--mcp-allowed-origins", "evil.com"],
                "MCP_ALLOWED_ORIGINS",
            ),
            (vec!["--rate-limit-burst", "0"], "RATE_LIMIT_BURST"),
            (vec!["--tenant-max-sessions", "0"], "TENANT_MAX_SESSIONS"),
            (vec!["--redis-url", "http://u:pw@h"], "REDIS_URL"),
        ] {
            let e = with(&args).unwrap_err();
            assert!(e.contains(var), "{args:?}: {e}");
            assert!(!e.contains("pw@"), "password leaked: {e}");
        }
        let e = Config::parse_from(["control-plane", "--data-plane-secret", SECRET])
            .validate()
            .unwrap_err();
        assert!(e.contains("AUTH_JWT_SECRET"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("24h").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5d").is_err());
    }

    #[test]
    fn urls_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:pw@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("file:x.db"), "file:x.db");
    }
}
