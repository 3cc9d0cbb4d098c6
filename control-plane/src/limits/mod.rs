//! Per-tenant rate limits and quotas (decision 17; issue 19 section 3).
//!
//! Two token buckets per tenant: `requests` (every authenticated `/v1`,
//! `/tools` and MCP call, taken by the API's middleware) and `creations`
//! (every sandbox a session or a job asks for, taken by the domain service
//! that creates it). Two quotas: live sessions (counted in the store) and
//! jobs (`JOB_TENANT_MAX_QUEUED` / `JOB_TENANT_MAX_RUNNING`, enforced where
//! jobs are queued and claimed). Values: the platform defaults from config
//! (`RATE_LIMIT_*`, `TENANT_MAX_SESSIONS`), replaced per tenant by the
//! platform policy's `rate_limits` object and lowered (never raised) by the
//! tenant policy's ([`PolicyRates`]; read through
//! `PolicyService::rate_limits`, cached [`RATES_TTL`] per tenant).
//!
//! With `REDIS_URL` the buckets are shared by every replica ([`store`]);
//! without it each replica keeps its own. When Redis does not answer,
//! creation fails closed (503 `rate_limiter_unavailable`: a sandbox is the
//! expensive, abusable resource) and other requests fail open (counted in
//! `control_plane_rate_limiter_unavailable_total`): they still pass
//! authentication, policy and the per-tenant caps, and a Redis outage
//! should not become an outage of reads and of the sessions already open.
//!
//! A refusal is 429 `rate_limited` with `Retry-After` and the `RateLimit-*`
//! headers (added by `api::ratelimit`); it is counted by limit name (not by
//! tenant: tenants are unbounded label cardinality) and audited once per
//! tenant, limit and minute, never once per request.

pub mod bucket;
pub mod store;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::json;
use shared::{CodedError, ErrorCode};

use crate::Config;
use crate::audit::{AuditEvent, AuditLog};
use crate::identity::Identity;
use crate::metrics::{LimitLabel, Metrics};
use crate::policy::PolicyService;
use crate::storage::{self, Db, now_ms};
use bucket::{LocalBuckets, Rate, Verdict};
use store::{RedisBuckets, Store, StoreError};

/// `RATE_LIMIT_BURST`'s default (also the bucket size when policy turns on
/// a request limit the platform left off).
pub const DEFAULT_BURST: u32 = 500;
/// `RATE_LIMIT_CREATES_BURST`'s default (likewise).
pub const DEFAULT_CREATES_BURST: u32 = 100;

/// How long a tenant's values from policy are used before policy is asked
/// again (a policy change takes effect within this, plus policy's own 1 s).
pub const RATES_TTL: Duration = Duration::from_secs(5);

/// How long one audit record of a tenant's refusals covers.
pub const AUDIT_WINDOW: Duration = Duration::from_secs(60);

/// The two buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LimitName {
    /// Every authenticated call.
    Requests,
    /// Every sandbox asked for (sessions, jobs; workflows when they land).
    Creations,
}

impl LimitName {
    /// The name in metrics, audit records, error details and Redis keys.
    pub fn as_str(self) -> &'static str {
        match self {
            LimitName::Requests => "requests",
            LimitName::Creations => "creations",
        }
    }
}

/// A bucket's state as the `RateLimit-*` headers tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RateInfo {
    /// `RateLimit-Limit`: the bucket's size.
    pub limit: u32,
    /// `RateLimit-Remaining`: tokens left.
    pub remaining: u32,
    /// `RateLimit-Reset`: seconds until the bucket is full again.
    pub reset_seconds: u64,
    /// `Retry-After` (refusals only): seconds until one token is back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_seconds: Option<u64>,
}

impl RateInfo {
    fn of(rate: Rate, v: Verdict) -> RateInfo {
        let secs = |us: u64| us.div_ceil(1_000_000);
        RateInfo {
            limit: rate.burst,
            remaining: v.remaining,
            reset_seconds: secs(v.reset_us),
            retry_after_seconds: (!v.allowed).then(|| secs(v.retry_after_us).max(1)),
        }
    }
}

/// What the request bucket said.
#[derive(Debug, Clone, PartialEq)]
pub enum RequestCheck {
    /// The limit is off (`RATE_LIMIT_REQUESTS_PER_MINUTE=0`).
    Off,
    /// Within the limit.
    Allowed(RateInfo),
    /// Over it: the 429 to answer.
    Limited(RateInfo, CodedError),
    /// The shared store did not answer; the request is let through.
    Unavailable,
}

/// The platform's values (from config).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defaults {
    pub requests: Option<Rate>,
    pub creations: Option<Rate>,
    pub max_sessions: i64,
    /// Stored artifact bytes; `None` leaves the data plane's
    /// `TENANT_MAX_ARTIFACT_BYTES`, which enforces it where the bytes live.
    pub max_artifact_bytes: Option<u64>,
}

impl Defaults {
    /// From `RATE_LIMIT_*` and `TENANT_MAX_SESSIONS`.
    pub fn from_config(c: &Config) -> Defaults {
        Defaults {
            requests: Rate::new(c.rate_limit_requests_per_minute, c.rate_limit_burst),
            creations: Rate::new(c.rate_limit_creates_per_minute, c.rate_limit_creates_burst),
            max_sessions: c.tenant_max_sessions,
            max_artifact_bytes: None,
        }
    }
}

/// What a policy layer's `rate_limits` object may set (each optional):
///
/// ```rego
/// rate_limits := {"requestsPerMinute": 1200, "burst": 200,
///                 "createsPerMinute": 30, "createsBurst": 10, "maxSessions": 20,
///                 "maxArtifactBytes": 1073741824}
///     if input.identity.tenant == "acme"
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyRates {
    pub requests_per_minute: Option<u32>,
    pub burst: Option<u32>,
    pub creates_per_minute: Option<u32>,
    pub creates_burst: Option<u32>,
    pub max_sessions: Option<i64>,
    pub max_artifact_bytes: Option<u64>,
}

impl PolicyRates {
    fn from_json(v: serde_json::Value) -> PolicyRates {
        serde_json::from_value(v).unwrap_or_default()
    }
}

/// One bucket's values: the platform's replace the default (0 per minute
/// turns it off); the tenant's apply only when lower (and above 0: a tenant
/// cannot turn a limit off).
fn merge_rate(
    default: Option<Rate>,
    default_burst: u32,
    platform: (Option<u32>, Option<u32>),
    tenant: (Option<u32>, Option<u32>),
) -> Option<Rate> {
    let (mut per_minute, mut burst) = match default {
        Some(r) => (r.per_minute, r.burst),
        None => (0, default_burst),
    };
    if let Some(v) = platform.0 {
        per_minute = v;
    }
    if let Some(v) = platform.1 {
        burst = v;
    }
    if let Some(v) = tenant.0
        && v > 0
        && (per_minute == 0 || v < per_minute)
    {
        per_minute = v;
    }
    if let Some(v) = tenant.1
        && v > 0
        && v < burst
    {
        burst = v;
    }
    Rate::new(per_minute, burst)
}

impl Defaults {
    /// A tenant's values: `platform` (the platform policy's `rate_limits`)
    /// replaces these, `tenant` (its own policy's) may only lower them.
    pub fn apply(self, platform: &PolicyRates, tenant: &PolicyRates) -> Defaults {
        let mut max_sessions = platform.max_sessions.unwrap_or(self.max_sessions).max(1);
        if let Some(v) = tenant.max_sessions
            && v > 0
        {
            max_sessions = max_sessions.min(v);
        }
        // Both layers can only lower it: the data plane's
        // TENANT_MAX_ARTIFACT_BYTES is the ceiling (it takes the smaller).
        let max_artifact_bytes = [
            self.max_artifact_bytes,
            platform.max_artifact_bytes,
            tenant.max_artifact_bytes,
        ]
        .into_iter()
        .flatten()
        .min();
        Defaults {
            requests: merge_rate(
                self.requests,
                DEFAULT_BURST,
                (platform.requests_per_minute, platform.burst),
                (tenant.requests_per_minute, tenant.burst),
            ),
            creations: merge_rate(
                self.creations,
                DEFAULT_CREATES_BURST,
                (platform.creates_per_minute, platform.creates_burst),
                (tenant.creates_per_minute, tenant.creates_burst),
            ),
            max_sessions,
            max_artifact_bytes,
        }
    }
}

/// Checks `REDIS_URL` without connecting (and without echoing a password).
pub fn check_redis_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return Err("must be redis://[user:password@]host[:port][/db]".into());
    }
    redis::Client::open(url)
        .map(|_| ())
        .map_err(|_| "is not a valid Redis URL".into())
}

/// The limiter every replica's API and domain services share.
pub struct Limits {
    defaults: Defaults,
    store: Store,
    prefix: String,
    db: Db,
    audit: AuditLog,
    metrics: Arc<Metrics>,
    policy: PolicyService,
    /// tenant -> (when read, its values).
    rates: Mutex<HashMap<String, (Instant, Defaults)>>,
    /// (tenant, limit) -> the window last audited, when Redis cannot say.
    audited: Mutex<HashMap<(String, LimitName), u64>>,
    last_warning_ms: AtomicU64,
}

impl Limits {
    /// In-process buckets, or Redis ones when `REDIS_URL` is set (connected
    /// on first use).
    pub fn new(
        config: &Config,
        db: Db,
        audit: AuditLog,
        metrics: Arc<Metrics>,
        policy: PolicyService,
    ) -> Result<Arc<Limits>, String> {
        let store = match &config.redis_url {
            Some(url) => Store::Redis(Box::new(
                RedisBuckets::new(url, config.redis_timeout)
                    .map_err(|e| format!("REDIS_URL: {e}"))?,
            )),
            None => Store::Local(LocalBuckets::default()),
        };
        Ok(Arc::new(Limits {
            defaults: Defaults::from_config(config),
            store,
            prefix: config.redis_key_prefix.clone(),
            db,
            audit,
            metrics,
            policy,
            rates: Mutex::new(HashMap::new()),
            audited: Mutex::new(HashMap::new()),
            last_warning_ms: AtomicU64::new(0),
        }))
    }

    /// The platform's values.
    pub fn defaults(&self) -> Defaults {
        self.defaults
    }

    /// The caller's tenant's values: the defaults as its policies set them
    /// (cached [`RATES_TTL`]). A policy that cannot be read leaves the
    /// platform defaults, which are limits too.
    pub async fn rates_for(&self, identity: &Identity) -> Defaults {
        let tenant = identity.tenant.as_str();
        if let Some((at, d)) = self
            .rates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(tenant)
            && at.elapsed() < RATES_TTL
        {
            return *d;
        }
        let rates = match self.policy.rate_limits(identity).await {
            Ok((platform, own)) => self.defaults.apply(
                &PolicyRates::from_json(platform),
                &PolicyRates::from_json(own),
            ),
            Err(e) => {
                tracing::debug!(tenant, error = %e.message, "rate limits from policy unavailable; defaults apply");
                self.defaults
            }
        };
        let mut cache = self
            .rates
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if cache.len() > 10_000 {
            cache.retain(|_, (at, _)| at.elapsed() < RATES_TTL);
        }
        cache.insert(tenant.to_owned(), (Instant::now(), rates));
        rates
    }

    /// A tenant's quota on stored artifact bytes where no caller is at hand
    /// (a job's dispatch by a worker). The rate-limit rules see the tenant
    /// (and a subject naming the worker, with no roles): the values are per
    /// tenant, as their cache already is.
    pub async fn artifact_quota(&self, tenant: &shared::ids::TenantId) -> Option<u64> {
        let worker = Identity {
            tenant: tenant.clone(),
            subject: "system:job-worker".into(),
            app: None,
            agent: None,
            roles: Vec::new(),
            bypass: false,
        };
        self.rates_for(&worker).await.max_artifact_bytes
    }

    /// True when the buckets are shared through Redis.
    pub fn shared(&self) -> bool {
        matches!(self.store, Store::Redis(_))
    }

    fn key(&self, name: LimitName, tenant: &str) -> String {
        // The tenant id is validated and comes last, after the limit name
        // (ours), so no tenant can name another tenant's or limit's key.
        format!("{}rl:{}:{tenant}", self.prefix, name.as_str())
    }

    async fn take(&self, name: LimitName, tenant: &str, rate: Rate) -> Result<Verdict, StoreError> {
        let key = self.key(name, tenant);
        match &self.store {
            Store::Local(b) => Ok(b.take(&key, rate)),
            Store::Redis(r) => r.take(&key, rate).await,
        }
    }

    fn unavailable(&self, name: LimitName, e: &StoreError) {
        self.metrics
            .rate_limiter_unavailable
            .get_or_create(&LimitLabel {
                limit: name.as_str().into(),
            })
            .inc();
        // One line every ten seconds at most: an outage under load must
        // not flood the log.
        let now = now_ms() as u64;
        let last = self.last_warning_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 10_000
            && self
                .last_warning_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(limit = name.as_str(), error = %e,
                "rate limiter unavailable: creations are refused, other requests let through");
        }
    }

    /// Takes a token from the caller's request bucket.
    pub async fn check_request(&self, identity: &Identity) -> RequestCheck {
        let Some(rate) = self.rates_for(identity).await.requests else {
            return RequestCheck::Off;
        };
        match self
            .take(LimitName::Requests, identity.tenant.as_str(), rate)
            .await
        {
            Ok(v) if v.allowed => RequestCheck::Allowed(RateInfo::of(rate, v)),
            Ok(v) => {
                let info = RateInfo::of(rate, v);
                let e = self.refuse(identity, LimitName::Requests, rate, info).await;
                RequestCheck::Limited(info, e)
            }
            Err(e) => {
                self.unavailable(LimitName::Requests, &e);
                RequestCheck::Unavailable
            }
        }
    }

    /// Admits one sandbox creation (a session, a job): a token from the
    /// creation bucket, or 429 `rate_limited` (details: the bucket state
    /// the REST edge turns into headers); 503 `rate_limiter_unavailable`
    /// when the shared store does not answer (fails closed).
    pub async fn admit_creation(&self, identity: &Identity) -> Result<(), CodedError> {
        let Some(rate) = self.rates_for(identity).await.creations else {
            return Ok(());
        };
        match self
            .take(LimitName::Creations, identity.tenant.as_str(), rate)
            .await
        {
            Ok(v) if v.allowed => Ok(()),
            Ok(v) => Err(self
                .refuse(identity, LimitName::Creations, rate, RateInfo::of(rate, v))
                .await),
            Err(e) => {
                self.unavailable(LimitName::Creations, &e);
                Err(CodedError::new(
                    ErrorCode::RateLimiterUnavailable,
                    "the rate limiter cannot be reached, so no sandbox is created; retry shortly",
                ))
            }
        }
    }

    /// Admits one more live session of the caller's tenant (counted in the
    /// control plane's store; concurrent creations on several replicas may
    /// pass the count together, so the cap can be overshot by those in
    /// flight, never by more).
    pub async fn admit_session(&self, identity: &Identity) -> Result<(), CodedError> {
        let max = self.rates_for(identity).await.max_sessions;
        let live =
            storage::sessions::count_live(&self.db, identity.tenant.as_str(), now_ms()).await?;
        if live >= max {
            self.metrics
                .rate_limited
                .get_or_create(&LimitLabel {
                    limit: "sessions".into(),
                })
                .inc();
            return Err(CodedError::new(
                ErrorCode::TenantQuotaExceeded,
                format!(
                    "the tenant has {live} live sessions, at most {max}; delete one (DELETE /v1/sessions/{{id}}) and retry"
                ),
            )
            .with_details(json!({"quota": "sessions", "live": live, "max": max})));
        }
        Ok(())
    }

    /// The 429 of a refusal: counted, audited once per window.
    async fn refuse(
        &self,
        identity: &Identity,
        name: LimitName,
        rate: Rate,
        info: RateInfo,
    ) -> CodedError {
        self.metrics
            .rate_limited
            .get_or_create(&LimitLabel {
                limit: name.as_str().into(),
            })
            .inc();
        if self.first_in_window(name, identity.tenant.as_str()).await {
            let ev = AuditEvent::by(identity, "rate_limit.exceeded", format!("limit/{}", name.as_str()))
                .outcome("refused")
                .details(json!({
                    "limit": name.as_str(),
                    "perMinute": rate.per_minute,
                    "burst": rate.burst,
                    "windowSeconds": AUDIT_WINDOW.as_secs(),
                    "note": "recorded once per tenant, limit and window; later refusals in the window are counted in metrics only",
                }));
            if let Err(e) = self.audit.record(ev).await {
                tracing::warn!(tenant = %identity.tenant, error = %e.message, "rate-limit refusal not audited");
            }
        }
        let what = match name {
            LimitName::Requests => "requests",
            LimitName::Creations => "sandbox creations",
        };
        let retry = info.retry_after_seconds.unwrap_or(1);
        CodedError::new(
            ErrorCode::RateLimited,
            format!(
                "too many {what} for this tenant (at most {} a minute, {} at once); retry in {retry} s",
                rate.per_minute, rate.burst
            ),
        )
        .with_details(json!({"limit": name.as_str(), "rateLimit": info}))
    }

    /// True for the first refusal of `tenant` on `name` in this window,
    /// across replicas when Redis is there (one `SET NX`), else per replica.
    async fn first_in_window(&self, name: LimitName, tenant: &str) -> bool {
        let window = now_ms() as u64 / AUDIT_WINDOW.as_millis() as u64;
        if let Store::Redis(r) = &self.store {
            let key = format!(
                "{}rl-audited:{}:{tenant}:{window}",
                self.prefix,
                name.as_str()
            );
            if let Ok(first) = r.set_once(&key, AUDIT_WINDOW).await {
                return first;
            }
        }
        let mut audited = self
            .audited
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if audited.len() > 10_000 {
            audited.retain(|_, w| *w == window);
        }
        audited.insert((tenant.to_owned(), name), window) != Some(window)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Defaults {
        Defaults {
            requests: Rate::new(600, 100),
            creations: Rate::new(60, 20),
            max_sessions: 50,
            max_artifact_bytes: None,
        }
    }

    fn rates(v: serde_json::Value) -> PolicyRates {
        PolicyRates::from_json(v)
    }

    #[test]
    fn the_artifact_quota_can_only_be_lowered_by_each_layer() {
        let d = defaults();
        let none = PolicyRates::default();
        // No layer sets it: the data plane's default applies.
        assert_eq!(d.apply(&none, &none).max_artifact_bytes, None);
        let platform = rates(json!({"maxArtifactBytes": 1000}));
        assert_eq!(d.apply(&platform, &none).max_artifact_bytes, Some(1000));
        // A tenant asking for more keeps the platform's value; less applies.
        let more = rates(json!({"maxArtifactBytes": 5000}));
        let less = rates(json!({"maxArtifactBytes": 10}));
        assert_eq!(d.apply(&platform, &more).max_artifact_bytes, Some(1000));
        assert_eq!(d.apply(&platform, &less).max_artifact_bytes, Some(10));
        // A tenant value alone is sent; the data plane takes the smaller of
        // it and its TENANT_MAX_ARTIFACT_BYTES, so it cannot raise it.
        assert_eq!(d.apply(&none, &more).max_artifact_bytes, Some(5000));
    }

    #[test]
    fn without_policy_the_defaults_apply() {
        let d = defaults();
        assert_eq!(d.apply(&PolicyRates::default(), &PolicyRates::default()), d);
        assert_eq!(rates(serde_json::Value::Null), PolicyRates::default());
        assert_eq!(rates(json!("nonsense")), PolicyRates::default());
    }

    #[test]
    fn the_platform_replaces_and_the_tenant_only_lowers() {
        let platform = rates(json!({"requestsPerMinute": 1200, "burst": 300, "maxSessions": 80}));
        let d = defaults().apply(&platform, &PolicyRates::default());
        assert_eq!(d.requests, Rate::new(1200, 300));
        assert_eq!(d.creations, Rate::new(60, 20));
        assert_eq!(d.max_sessions, 80);
        // A tenant asking for more gets the platform's value; less is kept.
        let tenant = rates(json!({"requestsPerMinute": 5000, "burst": 10,
                                  "createsPerMinute": 6, "maxSessions": 500}));
        let d = defaults().apply(&platform, &tenant);
        assert_eq!(d.requests, Rate::new(1200, 10));
        assert_eq!(d.creations, Rate::new(6, 20));
        assert_eq!(d.max_sessions, 80);
        // A tenant cannot turn a limit off; the platform can.
        let off = rates(json!({"requestsPerMinute": 0, "createsPerMinute": 0}));
        assert_eq!(defaults().apply(&PolicyRates::default(), &off), defaults());
        let d = defaults().apply(&off, &PolicyRates::default());
        assert_eq!((d.requests, d.creations), (None, None));
        // Under a limit the platform turned off, a tenant may set its own.
        let own = rates(json!({"requestsPerMinute": 30}));
        assert_eq!(
            defaults().apply(&off, &own).requests,
            Rate::new(30, 100),
            "the configured burst stays"
        );
    }

    #[test]
    fn rate_info_rounds_up_to_whole_seconds() {
        let r = Rate::new(60, 5).expect("a rate");
        let v = Verdict {
            allowed: false,
            remaining: 0,
            retry_after_us: 1,
            reset_us: 4_000_001,
        };
        let info = RateInfo::of(r, v);
        assert_eq!(
            (
                info.limit,
                info.remaining,
                info.reset_seconds,
                info.retry_after_seconds
            ),
            (5, 0, 5, Some(1))
        );
        let ok = Verdict {
            allowed: true,
            remaining: 4,
            retry_after_us: 0,
            reset_us: 1_000_000,
        };
        assert_eq!(RateInfo::of(r, ok).retry_after_seconds, None);
    }
}
