//! Policy (decision 13): Rego evaluated in-process by `regorus`, in two
//! layers. The platform policy (`package sandbox.platform`, bundled in
//! `default.rego` or replaced by `POLICY_DEFAULT_PATH`) holds the guardrails;
//! a tenant may store its own policy (`package sandbox.tenant`, versioned in
//! `tenant_policies`). Each layer yields `deny`, a set of reasons; a request
//! is allowed only when both sets are empty, so a tenant can narrow what the
//! platform allows, never widen it.
//!
//! Compiled engines are cached per tenant and version; the latest version
//! is re-read from the database at most once a second per tenant, so a PUT
//! on another replica takes effect within a second. An evaluation error
//! (a rule that fails, a time limit) denies with the error as the reason:
//! policy fails closed.
//!
//! A tenant's policy is untrusted code (issue 15, section 3), so it is
//! bounded three ways. Statically, at `PUT` and again whenever a stored
//! version is loaded: builtins that can build unbounded values from small
//! inputs are refused (see [`check_bounded`]), independently of any input.
//! At run time, `numbers.range`, `numbers.range_step`, `concat` and
//! `sprintf` are replaced by bounded versions (regorus looks extensions up
//! before builtins), regorus's step timer stops long evaluations, and the
//! evaluation runs off the async threads on a bounded blocking pool, with a
//! global and a per-tenant concurrency limit and a hard wall-clock bound.
//! A policy over a limit fails closed with `policy_limit_exceeded`, is
//! audited (`policy.limit_exceeded`) and shows in the tenant's policy
//! (`lastFault`).

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use regorus::{Engine, Value};
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use shared::CodedError;
use shared::ErrorCode;
use tokio::sync::Semaphore;
use utoipa::ToSchema;

use crate::audit::{self, AuditEvent, AuditLog};
use crate::identity::Identity;
use crate::metrics::{ActionLabel, Metrics};
use crate::storage::{self, Db, now_ms};

/// The bundled platform policy.
pub const DEFAULT_POLICY: &str = include_str!("default.rego");

/// Largest tenant policy accepted.
pub const MAX_POLICY_BYTES: usize = 64 * 1024;

/// How long a tenant's latest version number is trusted.
const VERSION_TTL: Duration = Duration::from_secs(1);

/// Wall-clock bound on one evaluation of a layer (regorus's step timer).
const EVAL_LIMIT: Duration = Duration::from_millis(250);

/// Hard bound on waiting for a tenant evaluation, queueing included: past
/// it the request fails closed even if a builtin never yields to the timer.
const HARD_LIMIT: Duration = Duration::from_secs(1);

/// Most elements `numbers.range` / `numbers.range_step` may produce.
pub const MAX_RANGE: i64 = 10_000;

/// Largest string `concat` / `sprintf` may produce, bytes.
pub const MAX_STRING_BYTES: usize = 64 * 1024;

/// Marks an error raised by a bound of ours, so it is told from a policy bug.
const LIMIT_MARKER: &str = "policy limit:";

/// Builtins a tenant policy may not call: each can build a value far larger
/// than its inputs (or reach outside), and regorus checks no limit inside
/// them. `numbers.range*` are allowed with small literal bounds only.
const REFUSED_BUILTINS: &[&str] = &[
    "array.concat",
    "base64.encode",
    "base64url.encode",
    "base64url.encode_no_pad",
    "bits.lsh",
    "graph.reachable",
    "graph.reachable_paths",
    "hex.encode",
    "http.send",
    "json.marshal",
    "json.marshal_with_options",
    "json.patch",
    "net.cidr_expand",
    "opa.runtime",
    "regex.replace",
    "replace",
    "strings.replace_n",
    "urlquery.encode",
    "urlquery.encode_object",
    "walk",
    "yaml.marshal",
];

/// Bounds on tenant policy evaluation.
#[derive(Debug, Clone, Copy)]
pub struct PolicyLimits {
    /// Tenant evaluations running at once in this replica (blocking pool).
    pub max_concurrent: usize,
    /// Of which one tenant may hold at most this many.
    pub tenant_max_concurrent: usize,
}

impl Default for PolicyLimits {
    fn default() -> Self {
        PolicyLimits {
            max_concurrent: 4,
            tenant_max_concurrent: 2,
        }
    }
}

/// The last time a tenant's policy went over a limit (this replica).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyFault {
    pub version: i64,
    /// Which limit, in words.
    pub reason: String,
    pub at_ms: i64,
}

/// Why a tenant evaluation did not produce a decision.
#[derive(Debug)]
enum Fault {
    /// Over a limit of the policy's own making: fails closed, reported.
    Limit(String),
    /// The tenant (or the replica) has too many evaluations in flight.
    Busy(String),
}

const PLATFORM_DENY: &str = "data.sandbox.platform.deny";
const TENANT_DENY: &str = "data.sandbox.tenant.deny";
/// Per-tenant rate limits and quotas (`crate::limits`): the platform's value
/// replaces the configured default, the tenant's may only lower it.
const PLATFORM_RATE_LIMITS: &str = "data.sandbox.platform.rate_limits";
const TENANT_RATE_LIMITS: &str = "data.sandbox.tenant.rate_limits";

/// An object-valued rule as JSON; `null` when it is undefined, absent,
/// not an object or fails (the caller then keeps its defaults).
fn object_rule(engine: &Engine, input: &Value, rule: &str) -> serde_json::Value {
    let mut engine = engine.clone();
    engine.set_input(input.clone());
    match engine.eval_rule(rule.into()) {
        Ok(v @ Value::Object(_)) => v
            .to_json_str()
            .ok()
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null),
        _ => serde_json::Value::Null,
    }
}

/// The outcome of an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Decision {
    pub allow: bool,
    /// Why not (empty when allowed).
    pub reasons: Vec<String>,
    /// The tenant policy's version that took part; 0 = platform policy only.
    pub policy_version: i64,
}

/// What is being decided (the identity comes separately).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicyInput {
    pub action: String,
    #[schema(value_type = Object)]
    pub resource: serde_json::Value,
    #[schema(value_type = Object)]
    pub request: serde_json::Value,
}

/// A stored tenant policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct TenantPolicy {
    pub tenant: String,
    pub version: i64,
    pub rego: String,
    pub sha256: String,
    pub created_by: String,
    pub created_ms: i64,
    /// Set when the policy last went over an evaluation limit (time, size,
    /// concurrency) in this replica: what the tenant's admin should fix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_fault: Option<PolicyFault>,
}

/// A tenant's compiled layer (platform + tenant module), or none.
#[derive(Clone)]
struct Cached {
    version: i64,
    checked: Instant,
    engine: Option<Engine>,
    /// The stored policy no longer compiles (the platform policy changed
    /// under it): every request of the tenant is denied with this reason.
    broken: Option<String>,
}

/// Evaluates and stores policies.
#[derive(Clone)]
pub struct PolicyService {
    db: Db,
    audit: AuditLog,
    metrics: Arc<Metrics>,
    platform: Engine,
    /// Its source: a tenant policy is compiled together with it.
    platform_rego: Arc<str>,
    tenants: Arc<Mutex<HashMap<String, Cached>>>,
    limits: PolicyLimits,
    /// Bounds tenant evaluations on the blocking pool, all tenants together.
    pool: Arc<Semaphore>,
    /// Per-tenant share of `pool`.
    tenant_slots: Arc<Mutex<HashMap<String, Arc<Semaphore>>>>,
    faults: Arc<Mutex<HashMap<String, PolicyFault>>>,
}

fn limit_error(message: String) -> anyhow::Error {
    anyhow::anyhow!("{LIMIT_MARKER} {message}")
}

fn int_arg(v: &Value, name: &str) -> anyhow::Result<i64> {
    v.as_i64()
        .map_err(|_| limit_error(format!("{name} takes integer bounds")))
}

/// Bounded `numbers.range` (the builtin allocates the whole range first).
fn bounded_range(args: Vec<Value>) -> anyhow::Result<Value> {
    let (a, b) = (
        int_arg(&args[0], "numbers.range")?,
        int_arg(&args[1], "numbers.range")?,
    );
    if b.abs_diff(a) >= MAX_RANGE as u64 {
        return Err(limit_error(format!(
            "numbers.range({a}, {b}) has more than {MAX_RANGE} elements"
        )));
    }
    let values: Vec<Value> = if a <= b {
        (a..=b).map(Value::from).collect()
    } else {
        (b..=a).rev().map(Value::from).collect()
    };
    Ok(Value::from(values))
}

/// Bounded `numbers.range_step`.
fn bounded_range_step(args: Vec<Value>) -> anyhow::Result<Value> {
    let name = "numbers.range_step";
    let (a, b, step) = (
        int_arg(&args[0], name)?,
        int_arg(&args[1], name)?,
        int_arg(&args[2], name)?,
    );
    if step <= 0 {
        return Err(anyhow::anyhow!("{name}: step must be a positive integer"));
    }
    if b.abs_diff(a) / step.unsigned_abs() >= MAX_RANGE as u64 {
        return Err(limit_error(format!(
            "{name}({a}, {b}, {step}) has more than {MAX_RANGE} elements"
        )));
    }
    let step = step as usize;
    let values: Vec<Value> = if a <= b {
        (a..=b).step_by(step).map(Value::from).collect()
    } else {
        (b..=a).rev().step_by(step).map(Value::from).collect()
    };
    Ok(Value::from(values))
}

/// Bounded `concat(delimiter, array or set of strings)`.
fn bounded_concat(args: Vec<Value>) -> anyhow::Result<Value> {
    let delim = args[0]
        .as_string()
        .map_err(|_| anyhow::anyhow!("concat: the delimiter must be a string"))?;
    let items: Vec<Value> = match (&args[1].as_array(), &args[1].as_set()) {
        (Ok(a), _) => a.to_vec(),
        (_, Ok(s)) => s.iter().cloned().collect(),
        _ => {
            return Err(anyhow::anyhow!(
                "concat: expects an array or a set of strings"
            ));
        }
    };
    let mut out = String::new();
    for (i, item) in items.iter().enumerate() {
        let s = item
            .as_string()
            .map_err(|_| anyhow::anyhow!("concat: expects an array or a set of strings"))?;
        if out.len() + delim.len() + s.len() > MAX_STRING_BYTES {
            return Err(limit_error(format!(
                "concat would build more than {MAX_STRING_BYTES} bytes"
            )));
        }
        if i > 0 {
            out.push_str(delim);
        }
        out.push_str(s);
    }
    Ok(Value::from(out))
}

/// An upper bound of `v`'s printed size, or `None` once past `budget`
/// (values share structure, so a small value may print as a huge one).
fn printed_size(v: &Value, budget: usize) -> Option<usize> {
    let mut size = 0usize;
    let mut stack = vec![v];
    while let Some(v) = stack.pop() {
        size += match v {
            Value::String(s) => s.len() * 6 + 2,
            Value::Array(a) => {
                stack.extend(a.iter());
                2 + a.len()
            }
            Value::Set(set) => {
                stack.extend(set.iter());
                5 + set.len()
            }
            Value::Object(o) => {
                for (k, v) in o.iter() {
                    stack.push(k);
                    stack.push(v);
                }
                2 + 2 * o.len()
            }
            _ => 32,
        };
        if size > budget {
            return None;
        }
    }
    Some(size)
}

/// Bounded `sprintf`: refuses widths above 999 and output that could pass
/// [`MAX_STRING_BYTES`], then formats with the real builtin.
fn bounded_sprintf(args: Vec<Value>) -> anyhow::Result<Value> {
    let format = args[0]
        .as_string()
        .map_err(|_| anyhow::anyhow!("sprintf: the format must be a string"))?
        .to_string();
    let mut digits = 0;
    let mut verbs = 0usize;
    for c in format.chars() {
        if c == '%' {
            verbs += 1;
        }
        digits = if c.is_ascii_digit() { digits + 1 } else { 0 };
        if digits > 3 {
            return Err(limit_error("sprintf widths are limited to 999".into()));
        }
    }
    let budget = MAX_STRING_BYTES.saturating_sub(format.len() + verbs * 1000);
    if printed_size(&args[1], budget).is_none() {
        return Err(limit_error(format!(
            "sprintf would build more than {MAX_STRING_BYTES} bytes"
        )));
    }
    // The real builtin, in an engine without these overrides.
    let mut engine = Engine::new();
    engine.set_input(Value::from(vec![Value::from(format), args[1].clone()]));
    let results = engine.eval_query("x := sprintf(input[0], input[1])".into(), false)?;
    Ok(results
        .result
        .first()
        .and_then(|r| r.bindings.as_object().ok())
        .and_then(|b| b.get(&Value::from("x")).cloned())
        .unwrap_or(Value::Undefined))
}

fn add_bounds(engine: &mut Engine) -> Result<(), String> {
    for (name, nargs, f) in [
        (
            "numbers.range",
            2u8,
            bounded_range as fn(Vec<Value>) -> anyhow::Result<Value>,
        ),
        ("numbers.range_step", 3, bounded_range_step),
        ("concat", 2, bounded_concat),
        ("sprintf", 2, bounded_sprintf),
    ] {
        engine
            .add_extension(name.into(), nargs, Box::new(f))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The dotted names a Rego source refers to, with the text after each
/// (comments and string literals skipped).
fn refs(rego: &str) -> Vec<(String, &str)> {
    let bytes = rego.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    let mut prev = b' ';
    while i < bytes.len() {
        let c = bytes[i];
        match c {
            b'#' => {
                while i < bytes.len() && bytes[i] != b'\n' {
                    i += 1;
                }
            }
            b'"' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
                i += 1;
                prev = b'"';
            }
            b'`' => {
                i += 1;
                while i < bytes.len() && bytes[i] != b'`' {
                    i += 1;
                }
                i += 1;
                prev = b'`';
            }
            c if c.is_ascii_alphabetic() || c == b'_' => {
                let start = i;
                while i < bytes.len()
                    && (bytes[i].is_ascii_alphanumeric()
                        || bytes[i] == b'_'
                        || (bytes[i] == b'.'
                            && bytes
                                .get(i + 1)
                                .is_some_and(|n| n.is_ascii_alphabetic() || *n == b'_')))
                {
                    i += 1;
                }
                // `x.replace` or `a[0].replace` is a field, not the builtin.
                if prev != b'.' {
                    out.push((rego[start..i].to_owned(), &rego[i..]));
                }
                prev = b'a';
            }
            _ => {
                if !c.is_ascii_whitespace() {
                    prev = c;
                }
                i += 1;
            }
        }
    }
    out
}

/// The literal integer arguments of a call, if every argument is one.
fn literal_args(after: &str) -> Option<Vec<i64>> {
    let rest = after.trim_start().strip_prefix('(')?;
    let inner = &rest[..rest.find(')')?];
    inner.split(',').map(|a| a.trim().parse().ok()).collect()
}

/// Refuses a tenant policy that calls a builtin able to build unbounded
/// values ([`REFUSED_BUILTINS`], or `numbers.range*` without small literal
/// bounds). Depends on the source only, never on an input.
/// What policy may allow but this build cannot do yet is refused with a
/// clear code after policy has allowed it, never silently dropped: egress
/// (until controlled egress exists the sandbox has no network). Secrets
/// that policy allows are built (`crate::secrets`, the data plane's secret
/// source). Called by every path that starts code.
pub fn refuse_unbuilt(egress: Option<&[String]>) -> Result<(), CodedError> {
    if let Some(hosts) = egress.filter(|e| !e.is_empty()) {
        return Err(CodedError::new(
            ErrorCode::NotImplemented,
            format!(
                "egress: policy allows {hosts:?}, but controlled egress is not available yet; sandboxes have no network"
            ),
        ));
    }
    Ok(())
}

pub fn check_bounded(rego: &str) -> Result<(), String> {
    for (name, after) in refs(rego) {
        if REFUSED_BUILTINS.contains(&name.as_str()) {
            return Err(format!(
                "`{name}` is not allowed in a tenant policy (it can build unbounded values)"
            ));
        }
        let bounded = match (name.as_str(), literal_args(after).as_deref()) {
            ("numbers.range", Some([a, b])) => b.abs_diff(*a) < MAX_RANGE as u64,
            ("numbers.range_step", Some([a, b, s])) if *s > 0 => {
                b.abs_diff(*a) / s.unsigned_abs() < MAX_RANGE as u64
            }
            ("numbers.range" | "numbers.range_step", _) => false,
            _ => true,
        };
        if !bounded {
            return Err(format!(
                "`{name}` needs integer literal bounds at most {MAX_RANGE} elements apart in a tenant policy"
            ));
        }
    }
    Ok(())
}

fn compile(platform_rego: &str, tenant_rego: Option<&str>) -> Result<Engine, String> {
    let mut engine = Engine::new();
    engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
        limit: EVAL_LIMIT,
        check_interval: NonZeroU32::new(16).unwrap_or(NonZeroU32::MIN),
    });
    add_bounds(&mut engine)?;
    engine
        .add_policy("platform.rego".into(), platform_rego.into())
        .map_err(|e| e.to_string())?;
    if let Some(rego) = tenant_rego {
        check_bounded(rego)?;
        let package = engine
            .add_policy("tenant.rego".into(), rego.into())
            .map_err(|e| e.to_string())?;
        if package != "data.sandbox.tenant" {
            return Err(format!(
                "a tenant policy must be `package sandbox.tenant`, not {}",
                package.trim_start_matches("data.")
            ));
        }
    }
    Ok(engine)
}

/// Reasons kept from one `deny` set, and the length kept of each.
const MAX_REASONS: usize = 32;
const MAX_REASON_CHARS: usize = 1024;

/// True when an evaluation error is one of the limits (not a policy bug).
fn is_limit(e: &anyhow::Error) -> bool {
    e.chain()
        .any(|c| c.downcast_ref::<regorus::LimitError>().is_some())
        || e.to_string().contains(LIMIT_MARKER)
        || e.to_string().contains("exceeded time limit")
}

/// The reasons of one layer's `deny` set; an error denies with its message;
/// a limit is a [`Fault::Limit`].
fn deny_reasons(engine: &Engine, input: &Value, rule: &str) -> Result<Vec<String>, Fault> {
    let mut engine = engine.clone();
    engine.set_input(input.clone());
    Ok(match engine.eval_rule(rule.into()) {
        Ok(Value::Undefined) => Vec::new(),
        Ok(v) => match v.as_set() {
            Ok(set) => set
                .iter()
                .take(MAX_REASONS)
                .map(|r| match r.as_string() {
                    Ok(s) => s.chars().take(MAX_REASON_CHARS).collect(),
                    // Never printed: a shared-structure value prints huge.
                    Err(_) => format!("denied (a reason of type {})", type_name(r)),
                })
                .collect(),
            Err(_) => vec![format!("{rule} is not a set of reasons")],
        },
        Err(e) if is_limit(&e) => return Err(Fault::Limit(e.to_string())),
        Err(e) => vec![format!("policy evaluation failed: {e}")],
    })
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Array(_) => "array",
        Value::Set(_) => "set",
        Value::Object(_) => "object",
        Value::Number(_) => "number",
        Value::Bool(_) => "boolean",
        Value::Null => "null",
        _ => "other",
    }
}

/// Evaluates a new tenant policy once on a plain job submission: regorus
/// finds a misspelt builtin or a wrongly typed `deny` only when it runs, and
/// such a policy is refused now rather than denying everything later.
fn trial(engine: &Engine) -> Result<(), String> {
    let mut engine = engine.clone();
    engine.set_input(Value::from(json!({
        "identity": {"tenant": "trial", "subject": "trial", "app": null, "agent": null, "roles": []},
        "action": "job.submit",
        "resource": {"type": "job"},
        "request": {"runtime": "python", "limits": {}, "packages": [], "egress": [], "secrets": []},
    })));
    match engine.eval_rule(TENANT_DENY.into()) {
        Ok(Value::Undefined) => Ok(()),
        Ok(v) if v.as_set().is_ok() => Ok(()),
        Ok(_) => Err("`deny` must be a set of reasons".into()),
        Err(e) if is_limit(&e) => Err(format!(
            "the policy goes over an evaluation limit on a plain job submission: {e}"
        )),
        Err(e) => Err(format!("the policy fails on a plain job submission: {e}")),
    }
}

impl PolicyService {
    /// Compiles the platform policy (`default_rego`, else the bundled one);
    /// one that does not compile stops start-up.
    pub fn new(
        db: Db,
        default_rego: Option<String>,
        audit: AuditLog,
        metrics: Arc<Metrics>,
    ) -> Result<PolicyService, String> {
        let rego = default_rego.as_deref().unwrap_or(DEFAULT_POLICY);
        let platform = compile(rego, None)?;
        if !platform
            .get_packages()
            .map_err(|e| e.to_string())?
            .iter()
            .any(|p| p == "data.sandbox.platform")
        {
            return Err("the platform policy must be `package sandbox.platform`".into());
        }
        Ok(PolicyService {
            db,
            audit,
            metrics,
            platform,
            platform_rego: rego.into(),
            tenants: Default::default(),
            limits: PolicyLimits::default(),
            pool: Arc::new(Semaphore::new(PolicyLimits::default().max_concurrent)),
            tenant_slots: Default::default(),
            faults: Default::default(),
        })
    }

    /// The same service with other evaluation bounds.
    pub fn with_limits(mut self, limits: PolicyLimits) -> PolicyService {
        self.pool = Arc::new(Semaphore::new(limits.max_concurrent.max(1)));
        self.limits = limits;
        self
    }

    /// Runs `work` (a tenant evaluation) on the blocking pool, within the
    /// global and per-tenant concurrency limits and [`HARD_LIMIT`]. The
    /// permits travel with the work: a builtin that ignores the timer keeps
    /// its tenant's slot, never another tenant's.
    async fn run_bounded<T: Send + 'static>(
        &self,
        tenant: &str,
        work: impl FnOnce() -> Result<T, Fault> + Send + 'static,
    ) -> Result<T, Fault> {
        let deadline = tokio::time::Instant::now() + HARD_LIMIT;
        let slots = self
            .tenant_slots
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(tenant.to_owned())
            .or_insert_with(|| Arc::new(Semaphore::new(self.limits.tenant_max_concurrent.max(1))))
            .clone();
        let busy = |what: &str| {
            Fault::Busy(format!(
                "too many policy evaluations in flight {what}; retry later"
            ))
        };
        let tenant_permit = tokio::time::timeout_at(deadline, slots.acquire_owned())
            .await
            .map_err(|_| busy("for this tenant"))?
            .map_err(|_| busy("for this tenant"))?;
        let permit = tokio::time::timeout_at(deadline, self.pool.clone().acquire_owned())
            .await
            .map_err(|_| busy("in this replica"))?
            .map_err(|_| busy("in this replica"))?;
        let task = tokio::task::spawn_blocking(move || {
            let _permits = (tenant_permit, permit);
            work()
        });
        match tokio::time::timeout_at(deadline, task).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) => Err(Fault::Limit(format!("policy evaluation aborted: {e}"))),
            Err(_) => Err(Fault::Limit(format!(
                "policy evaluation took longer than {} ms",
                HARD_LIMIT.as_millis()
            ))),
        }
    }

    /// Turns a fault into the request's error; a limit is remembered for
    /// the tenant's admin and audited (at most once a minute per tenant).
    async fn fail_closed(&self, identity: &Identity, version: i64, fault: Fault) -> CodedError {
        let reason = match fault {
            Fault::Busy(m) => return CodedError::new(ErrorCode::TenantQuotaExceeded, m),
            Fault::Limit(m) => m,
        };
        let now = now_ms();
        let report = {
            let mut faults = self
                .faults
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let stale = faults
                .get(identity.tenant.as_str())
                .is_none_or(|f| f.version != version || now - f.at_ms > 60_000);
            if stale {
                faults.insert(
                    identity.tenant.to_string(),
                    PolicyFault {
                        version,
                        reason: reason.clone(),
                        at_ms: now,
                    },
                );
            }
            stale
        };
        if report {
            let event = AuditEvent::by(
                identity,
                "policy.limit_exceeded",
                format!("policy/{}", identity.tenant),
            )
            .outcome("error")
            .details(json!({"version": version, "reason": reason}));
            if let Err(e) = self.audit.record(event).await {
                tracing::warn!(tenant = %identity.tenant, error = %e.message, "policy fault not audited");
            }
        }
        CodedError::new(
            ErrorCode::PolicyLimitExceeded,
            format!(
                "the tenant policy (version {version}) went over an evaluation limit: {reason}"
            ),
        )
        .with_details(json!({"policyVersion": version, "reason": reason}))
    }

    /// The tenant policy's last fault in this replica, if any.
    pub fn last_fault(&self, tenant: &str) -> Option<PolicyFault> {
        self.faults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(tenant)
            .cloned()
    }

    fn input(identity: &Identity, input: &PolicyInput) -> Value {
        Value::from(json!({
            "identity": {
                "tenant": identity.tenant,
                "subject": identity.subject,
                "app": identity.app,
                "agent": identity.agent,
                "roles": identity.roles,
            },
            "action": input.action,
            "resource": input.resource,
            "request": input.request,
        }))
    }

    /// The tenant's compiled layer, from the cache or the database.
    async fn tenant_layer(&self, tenant: &str) -> Result<Cached, CodedError> {
        if let Some(c) = self
            .tenants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(tenant)
            && c.checked.elapsed() < VERSION_TTL
        {
            return Ok(c.clone());
        }
        let latest = storage::policy::latest_version(&self.db, tenant).await?;
        let known = self
            .tenants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(tenant)
            .cloned();
        let cached = match known {
            Some(c) if c.version == latest => Cached {
                checked: Instant::now(),
                ..c
            },
            _ if latest == 0 => Cached {
                version: 0,
                checked: Instant::now(),
                engine: None,
                broken: None,
            },
            _ => {
                let policy = self.get_tenant_policy(tenant).await?.ok_or_else(|| {
                    CodedError::new(ErrorCode::Internal, "tenant policy vanished")
                })?;
                // Compiled when stored; a failure now means the platform
                // policy changed under it: deny everything for the tenant.
                let compiled = compile(&self.platform_rego, Some(&policy.rego));
                Cached {
                    version: policy.version,
                    checked: Instant::now(),
                    broken: compiled.as_ref().err().map(|e| {
                        format!(
                            "tenant policy version {} no longer compiles: {e}",
                            policy.version
                        )
                    }),
                    engine: compiled.ok(),
                }
            }
        };
        self.tenants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(tenant.to_owned(), cached.clone());
        Ok(cached)
    }

    /// What policy decides, with nothing recorded (the dry run).
    pub async fn evaluate(
        &self,
        identity: &Identity,
        input: &PolicyInput,
    ) -> Result<Decision, CodedError> {
        let layer = self.tenant_layer(&identity.tenant).await?;
        let value = Self::input(identity, input);
        let platform = self.platform.clone();
        let outcome = match layer.engine.clone() {
            // The platform policy alone is trusted: evaluated in place.
            None => deny_reasons(&platform, &value, PLATFORM_DENY),
            Some(engine) => {
                self.run_bounded(&identity.tenant, move || {
                    let mut reasons = deny_reasons(&platform, &value, PLATFORM_DENY)?;
                    reasons.extend(deny_reasons(&engine, &value, TENANT_DENY)?);
                    Ok(reasons)
                })
                .await
            }
        };
        let mut reasons = match outcome {
            Ok(reasons) => reasons,
            Err(fault) => return Err(self.fail_closed(identity, layer.version, fault).await),
        };
        if let Some(broken) = &layer.broken {
            reasons.push(broken.clone());
        }
        reasons.sort();
        reasons.dedup();
        Ok(Decision {
            allow: reasons.is_empty(),
            reasons,
            policy_version: layer.version,
        })
    }

    /// Decides; a denial is counted, audited (fail-closed) and returned as
    /// 403 `policy_denied` with the reasons.
    pub async fn authorize(
        &self,
        identity: &Identity,
        input: &PolicyInput,
    ) -> Result<Decision, CodedError> {
        let decision = self.evaluate(identity, input).await?;
        if decision.allow {
            return Ok(decision);
        }
        self.metrics
            .policy_denials
            .get_or_create(&ActionLabel {
                action: input.action.clone(),
            })
            .inc();
        let resource = match (
            input.resource.get("type").and_then(|v| v.as_str()),
            input.resource.get("id").and_then(|v| v.as_str()),
        ) {
            (Some(t), Some(id)) => format!("{t}/{id}"),
            (Some(t), None) => t.to_owned(),
            _ => "-".to_owned(),
        };
        self.audit
            .record(
                AuditEvent::by(identity, &input.action, resource)
                    .outcome("denied")
                    .details(json!({
                        "reasons": decision.reasons,
                        "policyVersion": decision.policy_version,
                        "request": input.request,
                    })),
            )
            .await?;
        Err(CodedError::new(
            ErrorCode::PolicyDenied,
            format!("denied by policy: {}", decision.reasons.join("; ")),
        )
        .with_details(json!({
            "reasons": decision.reasons,
            "policyVersion": decision.policy_version,
        })))
    }

    /// The `rate_limits` objects of the platform layer and of the tenant's
    /// layer for `identity` (JSON `null` where a layer defines none or its
    /// rule fails): the hook `crate::limits` reads per-tenant rate limits
    /// and quotas from. The tenant layer runs within its evaluation bounds.
    pub async fn rate_limits(
        &self,
        identity: &Identity,
    ) -> Result<(serde_json::Value, serde_json::Value), CodedError> {
        let layer = self.tenant_layer(&identity.tenant).await?;
        let input = Self::input(
            identity,
            &PolicyInput {
                action: "limits.read".into(),
                resource: json!({"type": "limits"}),
                request: json!({}),
            },
        );
        let platform = object_rule(&self.platform, &input, PLATFORM_RATE_LIMITS);
        let tenant = match layer.engine.clone() {
            None => serde_json::Value::Null,
            Some(engine) => self
                .run_bounded(&identity.tenant, move || {
                    Ok(object_rule(&engine, &input, TENANT_RATE_LIMITS))
                })
                .await
                .unwrap_or(serde_json::Value::Null),
        };
        Ok((platform, tenant))
    }

    /// Stores a new version of the tenant's policy after compiling it with
    /// the platform policy; the version and its audit event commit together.
    pub async fn put_tenant_policy(
        &self,
        identity: &Identity,
        tenant: &str,
        rego: &str,
    ) -> Result<TenantPolicy, CodedError> {
        let invalid = |m: String| CodedError::new(ErrorCode::PolicyInvalid, m);
        if rego.len() > MAX_POLICY_BYTES {
            return Err(invalid(format!(
                "the policy is {} bytes; at most {MAX_POLICY_BYTES}",
                rego.len()
            )));
        }
        let platform_rego = self.platform_rego.clone();
        let source = rego.to_owned();
        // Compiled and tried on the bounded pool too: the trial is untrusted
        // code like any evaluation.
        self.run_bounded(&identity.tenant, move || {
            Ok(compile(&platform_rego, Some(&source)).and_then(|engine| trial(&engine)))
        })
        .await
        .map_err(|fault| match fault {
            Fault::Busy(m) => CodedError::new(ErrorCode::TenantQuotaExceeded, m),
            Fault::Limit(m) => invalid(format!("the policy goes over an evaluation limit: {m}")),
        })?
        .map_err(invalid)?;
        let sha = hex::encode(Sha256::digest(rego.as_bytes()));
        let now = now_ms();
        let policy = async {
            let mut tx = self.db.begin_write().await?;
            let policy = TenantPolicy {
                tenant: tenant.to_owned(),
                version: storage::policy::next_version(&mut tx, tenant).await?,
                rego: rego.to_owned(),
                sha256: sha,
                created_by: identity.actor(),
                created_ms: now,
                last_fault: None,
            };
            storage::policy::insert(&mut tx, &policy).await?;
            let ev = AuditEvent::by(identity, "policy.update", format!("policy/{tenant}"))
                .details(json!({"version": policy.version, "sha256": policy.sha256}));
            audit::append(&mut tx, ev).await?;
            tx.commit().await?;
            Ok::<_, CodedError>(policy)
        }
        .await?;
        self.tenants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(tenant);
        self.faults
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(tenant);
        Ok(policy)
    }

    /// The tenant's latest policy, if it has one.
    pub async fn get_tenant_policy(
        &self,
        tenant: &str,
    ) -> Result<Option<TenantPolicy>, CodedError> {
        Ok(self.list_versions(tenant, 1).await?.into_iter().next())
    }

    /// The tenant's policies, newest first.
    pub async fn list_versions(
        &self,
        tenant: &str,
        limit: i64,
    ) -> Result<Vec<TenantPolicy>, CodedError> {
        Ok(storage::policy::versions(&self.db, tenant, limit).await?)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::audit::AuditQuery;
    use crate::config::DatabaseDriver;
    use crate::storage::testing::TestDb;

    fn who(tenant: &str, roles: &[&str]) -> Identity {
        Identity {
            tenant: shared::ids::TenantId::parse(tenant).unwrap(),
            subject: "alice".into(),
            app: None,
            agent: None,
            roles: roles.iter().map(|r| r.to_string()).collect(),
            bypass: false,
        }
    }

    fn ask(action: &str, request: serde_json::Value) -> PolicyInput {
        PolicyInput {
            action: action.into(),
            resource: json!({"type": "job"}),
            request,
        }
    }

    fn service(db: &Db) -> (PolicyService, AuditLog, Arc<Metrics>) {
        let metrics = Metrics::new();
        let audit = AuditLog::new(db.clone(), metrics.clone());
        (
            PolicyService::new(db.clone(), None, audit.clone(), metrics.clone()).unwrap(),
            audit,
            metrics,
        )
    }

    const NARROW: &str = r#"package sandbox.tenant

deny contains "node is not allowed here" if input.request.runtime == "node"

deny contains "agents get at most 256 MiB" if {
	"agent" in input.identity.roles
	input.request.limits.memoryMb > 256
}
"#;

    #[tokio::test]
    async fn the_default_allows_work_and_denies_egress_secrets_unknown() {
        let t = TestDb::new(DatabaseDriver::Sqlite).await;
        let (policy, _, _) = service(&t.db);
        let me = who("acme", &["agent"]);
        let d = policy
            .evaluate(&me, &ask("job.submit", json!({"runtime": "python"})))
            .await
            .unwrap();
        assert!(d.allow, "{d:?}");
        assert_eq!(d.policy_version, 0);
        let d = policy
            .evaluate(&me, &ask("job.submit", json!({"egress": ["example.com"]})))
            .await
            .unwrap();
        assert!(!d.allow);
        assert!(d.reasons[0].contains("egress is denied"), "{d:?}");
        let d = policy
            .evaluate(&me, &ask("session.create", json!({"secrets": ["DB"]})))
            .await
            .unwrap();
        assert!(
            d.reasons[0].contains(r#"secret "DB" is not allowed"#),
            "{d:?}"
        );
        let d = policy
            .evaluate(&me, &ask("cluster.destroy", json!({})))
            .await
            .unwrap();
        assert!(d.reasons[0].contains("unknown action"), "{d:?}");
        t.cleanup().await;
    }

    crate::both_databases!(a_tenant_policy_narrows_for_its_tenant_only_and_never_widens);
    async fn a_tenant_policy_narrows_for_its_tenant_only_and_never_widens(driver: DatabaseDriver) {
        let t = TestDb::new(driver).await;
        let (policy, _, _) = service(&t.db);
        let admin = who("acme", &["admin"]);
        let stored = policy
            .put_tenant_policy(&admin, "acme", NARROW)
            .await
            .unwrap();
        assert_eq!(stored.version, 1);
        let agent = who("acme", &["agent"]);
        let d = policy
            .evaluate(&agent, &ask("job.submit", json!({"runtime": "node"})))
            .await
            .unwrap();
        assert_eq!(d.reasons, vec!["node is not allowed here"]);
        assert_eq!(d.policy_version, 1);
        let d = policy
            .evaluate(
                &agent,
                &ask(
                    "job.submit",
                    json!({"runtime": "python", "limits": {"memoryMb": 512}}),
                ),
            )
            .await
            .unwrap();
        assert_eq!(d.reasons, vec!["agents get at most 256 MiB"]);
        // The admin role is not capped; another tenant is untouched.
        let d = policy
            .evaluate(
                &admin,
                &ask(
                    "job.submit",
                    json!({"runtime": "python", "limits": {"memoryMb": 512}}),
                ),
            )
            .await
            .unwrap();
        assert!(d.allow, "{d:?}");
        let other = who("globex", &["agent"]);
        let d = policy
            .evaluate(&other, &ask("job.submit", json!({"runtime": "node"})))
            .await
            .unwrap();
        assert!(d.allow);
        // A tenant cannot widen: an empty deny set leaves egress denied.
        policy
            .put_tenant_policy(&admin, "acme", "package sandbox.tenant\n\ndeny := set()\n")
            .await
            .unwrap();
        let d = policy
            .evaluate(&agent, &ask("job.submit", json!({"egress": ["x.com"]})))
            .await
            .unwrap();
        assert!(!d.allow, "{d:?}");
        assert_eq!(d.policy_version, 2);
        t.cleanup().await;
    }

    crate::both_databases!(bad_policies_are_refused_and_versions_are_never_lost);
    async fn bad_policies_are_refused_and_versions_are_never_lost(driver: DatabaseDriver) {
        let t = TestDb::new(driver).await;
        let (policy, _, _) = service(&t.db);
        let admin = who("acme", &["admin"]);
        for bad in [
            "package sandbox.tenant\ndeny contains".to_owned(),
            "package sandbox.platform\ndeny contains \"x\" if true\n".to_owned(),
            "package other\nallow := true\n".to_owned(),
            "package sandbox.tenant\ndeny contains msg if { msg := no_such_builtin(1) }\n"
                .to_owned(),
            "package sandbox.tenant\ndeny := 5\n".to_owned(),
            format!(
                "package sandbox.tenant\n# {}\n",
                "x".repeat(MAX_POLICY_BYTES)
            ),
        ] {
            let e = policy
                .put_tenant_policy(&admin, "acme", &bad)
                .await
                .unwrap_err();
            assert_eq!(e.code, ErrorCode::PolicyInvalid, "{}", &bad[..30]);
        }
        assert!(policy.get_tenant_policy("acme").await.unwrap().is_none());
        let mut tasks = Vec::new();
        for n in 0..10 {
            let policy = policy.clone();
            let admin = admin.clone();
            tasks.push(tokio::spawn(async move {
                let rego = format!("package sandbox.tenant\n\ndeny contains \"v{n}\" if false\n");
                policy.put_tenant_policy(&admin, "acme", &rego).await
            }));
        }
        let mut versions: Vec<i64> = Vec::new();
        for task in tasks {
            versions.push(task.await.unwrap().unwrap().version);
        }
        versions.sort_unstable();
        assert_eq!(versions, (1..=10).collect::<Vec<_>>(), "{driver:?}");
        assert_eq!(
            policy
                .get_tenant_policy("acme")
                .await
                .unwrap()
                .unwrap()
                .version,
            10
        );
        assert_eq!(policy.list_versions("acme", 100).await.unwrap().len(), 10);
        t.cleanup().await;
    }

    #[tokio::test]
    async fn a_denial_is_counted_and_audited_and_fails_closed() {
        let t = TestDb::new(DatabaseDriver::Sqlite).await;
        let (policy, audit, metrics) = service(&t.db);
        let me = who("acme", &["agent"]);
        let e = policy
            .authorize(&me, &ask("job.submit", json!({"egress": ["x.com"]})))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyDenied);
        assert!(
            e.details.unwrap()["reasons"][0]
                .as_str()
                .unwrap()
                .contains("egress")
        );
        let denied = audit
            .list(
                "acme",
                &AuditQuery {
                    outcome: Some("denied".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(denied.len(), 1);
        assert_eq!(denied[0].action, "job.submit");
        assert!(
            metrics
                .encode()
                .contains("control_plane_policy_denials_total{action=\"job.submit\"} 1")
        );
        // No audit, no denial answer either: the request fails as unavailable.
        t.db.close().await;
        let e = policy
            .authorize(&me, &ask("job.submit", json!({"egress": ["x.com"]})))
            .await
            .unwrap_err();
        assert!(
            matches!(
                e.code,
                ErrorCode::AuditUnavailable | ErrorCode::StorageUnavailable
            ),
            "{e:?}"
        );
    }

    /// The two policies of issue 15 (section 3), the second dodging the
    /// trial evaluation at PUT.
    const RANGE_FILTER: &str = "package sandbox.tenant\n\ndeny contains \"x\" if {\n\tinput.identity.tenant != \"trial\"\n\tcount([x | some x in numbers.range(1, 3000000); x % 7 == 0]) < 0\n}\n";
    const RANGE_COUNT: &str = "package sandbox.tenant\n\ndeny contains \"x\" if {\n\tinput.identity.tenant != \"trial\"\n\tcount(numbers.range(1, 20000000)) < 0\n}\n";

    #[tokio::test]
    async fn unbounded_builtins_are_refused_at_put_whatever_the_input() {
        let t = TestDb::new(DatabaseDriver::Sqlite).await;
        let (policy, _, _) = service(&t.db);
        let admin = who("acme", &["admin"]);
        let body = |expr: &str| {
            format!(
                "package sandbox.tenant\n\ndeny contains \"x\" if {{\n\tinput.identity.tenant != \"trial\"\n\t{expr}\n}}\n"
            )
        };
        for bad in [
            RANGE_FILTER.to_owned(),
            RANGE_COUNT.to_owned(),
            body("count(numbers.range(1, count(input.request.packages))) < 0"),
            body("count(numbers.range_step(1, 90000000, 2)) < 0"),
            body("count(net.cidr_expand(\"10.0.0.0/8\")) < 0"),
            body("s := replace(\"aaaa\", \"a\", \"aaaa\"); count(s) < 0"),
            body("s := strings.replace_n({\"a\": \"aa\"}, \"aaaa\"); count(s) < 0"),
            body("f(1) with f as numbers.range"),
            body("count(walk(input)) < 0"),
        ] {
            let e = policy
                .put_tenant_policy(&admin, "acme", &bad)
                .await
                .unwrap_err();
            assert_eq!(e.code, ErrorCode::PolicyInvalid, "{bad}: {e:?}");
        }
        // Small literal ranges, a field called like a builtin, comments and
        // strings are fine.
        for good in [
            body("count(numbers.range(1, 100)) < 0"),
            body("input.request.replace == \"walk\" # replace(x) walk"),
        ] {
            policy
                .put_tenant_policy(&admin, "acme", &good)
                .await
                .unwrap_or_else(|e| panic!("{good}: {e:?}"));
        }
        t.cleanup().await;
    }

    #[tokio::test]
    async fn a_stored_unbounded_policy_is_refused_at_load() {
        let t = TestDb::new(DatabaseDriver::Sqlite).await;
        let (policy, _, _) = service(&t.db);
        // Stored before these checks existed (or written around the API).
        let mut tx = t.db.begin_write().await.unwrap();
        let stored = TenantPolicy {
            tenant: "acme".into(),
            version: 1,
            rego: RANGE_COUNT.into(),
            sha256: "x".into(),
            created_by: "old".into(),
            created_ms: 0,
            last_fault: None,
        };
        storage::policy::insert(&mut tx, &stored).await.unwrap();
        tx.commit().await.unwrap();
        let before = std::time::Instant::now();
        let d = policy
            .evaluate(&who("acme", &["agent"]), &ask("job.submit", json!({})))
            .await
            .unwrap();
        assert!(!d.allow, "{d:?}");
        assert!(d.reasons[0].contains("numbers.range"), "{d:?}");
        assert!(before.elapsed() < Duration::from_secs(1));
        t.cleanup().await;
    }

    fn unchecked(rego: &str) -> Engine {
        let mut engine = compile(DEFAULT_POLICY, None).unwrap();
        engine.add_policy("t.rego".into(), rego.into()).unwrap();
        engine
    }

    fn rss_mb() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
        line.split_whitespace()
            .nth(1)
            .unwrap()
            .parse::<u64>()
            .unwrap()
            / 1024
    }

    #[test]
    fn bounds_hold_inside_builtins_when_the_static_check_is_bypassed() {
        let input = Value::from(json!({"identity": {"tenant": "acme"}}));
        let doubling = {
            let mut rego = String::from(
                "package sandbox.tenant\n\ndeny contains \"x\" if {\n\ts0 := \"aaaaaaaaaaaaaaaa\"\n",
            );
            for i in 0..40 {
                rego.push_str(&format!("\ts{} := concat(\"\", [s{i}, s{i}])\n", i + 1));
            }
            rego.push_str("\tcount(s40) < 0\n}\n");
            rego
        };
        let sprintf_doubling = doubling.replace("concat(\"\", [", "sprintf(\"%s%s\", [");
        let rss = rss_mb();
        for rego in [RANGE_FILTER, RANGE_COUNT, &doubling, &sprintf_doubling] {
            let before = std::time::Instant::now();
            let out = deny_reasons(&unchecked(rego), &input, TENANT_DENY);
            assert!(matches!(out, Err(Fault::Limit(_))), "{rego}: {out:?}");
            assert!(before.elapsed() < Duration::from_secs(2), "{rego}");
        }
        assert!(rss_mb() < rss + 100, "grew from {rss} to {} MB", rss_mb());
        // The overrides still answer like the builtins.
        let ok = unchecked(
            "package sandbox.tenant\n\ndeny contains msg if {\n\tnumbers.range(3, 1) == [3, 2, 1]\n\tnumbers.range_step(0, 6, 3) == [0, 3, 6]\n\tconcat(\"-\", {\"b\", \"a\"}) == \"a-b\"\n\tmsg := sprintf(\"%v and %d\", [\"x\", 5])\n}\n",
        );
        assert_eq!(
            deny_reasons(&ok, &input, TENANT_DENY).unwrap(),
            vec!["x and 5".to_owned()]
        );
    }

    #[tokio::test]
    async fn a_policy_over_a_limit_fails_closed_is_audited_and_reported() {
        let t = TestDb::new(DatabaseDriver::Sqlite).await;
        let (policy, audit, _) = service(&t.db);
        let admin = who("acme", &["admin"]);
        // Passes the static check and the (dodged) trial; 10^8 steps.
        let slow = "package sandbox.tenant\n\ndeny contains \"x\" if {\n\tinput.identity.tenant != \"trial\"\n\tcount([x | some i in numbers.range(1, 9999); some j in numbers.range(1, 9999); x := i * j; x % 7 == 0]) < 0\n}\n";
        policy
            .put_tenant_policy(&admin, "acme", slow)
            .await
            .unwrap();
        let e = policy
            .authorize(&who("acme", &["agent"]), &ask("job.submit", json!({})))
            .await
            .unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyLimitExceeded, "{e:?}");
        let fault = policy.last_fault("acme").unwrap();
        assert_eq!(fault.version, 1);
        let events = audit
            .list(
                "acme",
                &AuditQuery {
                    action: Some("policy.limit_exceeded".into()),
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        assert_eq!(events.len(), 1);
        // Another tenant is not affected.
        let d = policy
            .evaluate(&who("globex", &["agent"]), &ask("job.submit", json!({})))
            .await
            .unwrap();
        assert!(d.allow);
        t.cleanup().await;
    }

    /// Structural: on a one-thread runtime, a task spawned next to a slow
    /// tenant evaluation still runs before the evaluation ends, so the
    /// evaluation does not hold the async thread (it did, before).
    #[tokio::test(flavor = "current_thread")]
    async fn a_tenant_evaluation_never_holds_the_async_thread() {
        let t = TestDb::new(DatabaseDriver::Sqlite).await;
        let (policy, _, _) = service(&t.db);
        let admin = who("acme", &["admin"]);
        let slow = "package sandbox.tenant\n\ndeny contains \"x\" if {\n\tinput.identity.tenant != \"trial\"\n\tcount([x | some i in numbers.range(1, 9999); some j in numbers.range(1, 9999); x := i * j; x % 7 == 0]) < 0\n}\n";
        policy
            .put_tenant_policy(&admin, "acme", slow)
            .await
            .unwrap();
        // Once, so the compiled layer is cached: no database wait below.
        let _ = policy
            .evaluate(&who("acme", &["agent"]), &ask("job.submit", json!({})))
            .await;
        let eval = {
            let policy = policy.clone();
            tokio::spawn(async move {
                policy
                    .evaluate(&who("acme", &["agent"]), &ask("job.submit", json!({})))
                    .await
            })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(
            !eval.is_finished(),
            "the evaluation ran on the async thread"
        );
        let e = eval.await.unwrap().unwrap_err();
        assert_eq!(e.code, ErrorCode::PolicyLimitExceeded);
        t.cleanup().await;
    }

    #[tokio::test]
    async fn an_erroring_rule_denies() {
        let t = TestDb::new(DatabaseDriver::Sqlite).await;
        let (policy, _, _) = service(&t.db);
        let admin = who("acme", &["admin"]);
        // Division by zero at evaluation time, for one package only (the
        // trial run at PUT, with none, passes).
        policy
            .put_tenant_policy(
                &admin,
                "acme",
                "package sandbox.tenant\n\ndeny contains msg if {\n\tx := 1 / (count(input.request.packages) - 1)\n\tmsg := sprintf(\"%v\", [x])\n}\n",
            )
            .await
            .unwrap();
        let d = policy
            .evaluate(&admin, &ask("job.submit", json!({"packages": ["one"]})))
            .await
            .unwrap();
        assert!(!d.allow, "an error must deny: {d:?}");
        t.cleanup().await;
    }
}
