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

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use regorus::Engine;
use serde::{Deserialize, Serialize};
use serde_json::json;
use sha2::{Digest, Sha256};
use shared::ErrorCode;
use shared::server::ApiError;
use sqlx::Row;
use utoipa::ToSchema;

use crate::audit::{AuditEvent, AuditLog, append_tx, begin_write};
use crate::identity::Identity;
use crate::on_db;
use crate::storage::{Db, db_error, now_ms};
use crate::telemetry::{ActionLabel, Metrics};

/// The bundled platform policy.
pub const DEFAULT_POLICY: &str = include_str!("default.rego");

/// Largest tenant policy accepted.
pub const MAX_POLICY_BYTES: usize = 64 * 1024;

/// How long a tenant's latest version number is trusted.
const VERSION_TTL: Duration = Duration::from_secs(1);

/// Wall-clock bound on one evaluation of a layer.
const EVAL_LIMIT: Duration = Duration::from_millis(250);

const PLATFORM_DENY: &str = "data.sandbox.platform.deny";
const TENANT_DENY: &str = "data.sandbox.tenant.deny";

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
}

fn compile(platform_rego: &str, tenant_rego: Option<&str>) -> Result<Engine, String> {
    let mut engine = Engine::new();
    engine.set_execution_timer_config(regorus::utils::limits::ExecutionTimerConfig {
        limit: EVAL_LIMIT,
        check_interval: NonZeroU32::new(64).unwrap_or(NonZeroU32::MIN),
    });
    engine
        .add_policy("platform.rego".into(), platform_rego.into())
        .map_err(|e| e.to_string())?;
    if let Some(rego) = tenant_rego {
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

/// The reasons of one layer's `deny` set; an error denies with its message.
fn deny_reasons(engine: &Engine, input: &regorus::Value, rule: &str) -> Vec<String> {
    let mut engine = engine.clone();
    engine.set_input(input.clone());
    match engine.eval_rule(rule.into()) {
        Ok(regorus::Value::Undefined) => Vec::new(),
        Ok(v) => match v.as_set() {
            Ok(set) => set
                .iter()
                .map(|r| match r.as_string() {
                    Ok(s) => s.to_string(),
                    Err(_) => r.to_json_str().unwrap_or_else(|_| "denied".into()),
                })
                .collect(),
            Err(_) => vec![format!("{rule} is not a set of reasons")],
        },
        Err(e) => vec![format!("policy evaluation failed: {e}")],
    }
}

/// Evaluates a new tenant policy once on a plain job submission: regorus
/// finds a misspelt builtin or a wrongly typed `deny` only when it runs, and
/// such a policy is refused now rather than denying everything later.
fn trial(engine: &Engine) -> Result<(), String> {
    let mut engine = engine.clone();
    engine.set_input(regorus::Value::from(json!({
        "identity": {"tenant": "trial", "subject": "trial", "app": null, "agent": null, "roles": []},
        "action": "job.submit",
        "resource": {"type": "job"},
        "request": {"runtime": "python", "limits": {}, "packages": [], "egress": [], "secrets": []},
    })));
    match engine.eval_rule(TENANT_DENY.into()) {
        Ok(regorus::Value::Undefined) => Ok(()),
        Ok(v) if v.as_set().is_ok() => Ok(()),
        Ok(_) => Err("`deny` must be a set of reasons".into()),
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
        })
    }

    fn input(identity: &Identity, input: &PolicyInput) -> regorus::Value {
        regorus::Value::from(json!({
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
    async fn tenant_layer(&self, tenant: &str) -> Result<Cached, ApiError> {
        if let Some(c) = self
            .tenants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(tenant)
            && c.checked.elapsed() < VERSION_TTL
        {
            return Ok(c.clone());
        }
        let latest: Option<i64> = on_db!(&self.db, p => sqlx::query_scalar(
            "SELECT MAX(version) FROM tenant_policies WHERE tenant = $1")
            .bind(tenant)
            .fetch_one(p).await.map_err(db_error))?;
        let latest = latest.unwrap_or(0);
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
                let policy = self
                    .get_tenant_policy(tenant)
                    .await?
                    .ok_or_else(|| ApiError::new(ErrorCode::Internal, "tenant policy vanished"))?;
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
    ) -> Result<Decision, ApiError> {
        let layer = self.tenant_layer(&identity.tenant).await?;
        let value = Self::input(identity, input);
        let mut reasons = deny_reasons(&self.platform, &value, PLATFORM_DENY);
        if let Some(engine) = &layer.engine {
            reasons.extend(deny_reasons(engine, &value, TENANT_DENY));
        }
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
    ) -> Result<Decision, ApiError> {
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
        Err(ApiError::new(
            ErrorCode::PolicyDenied,
            format!("denied by policy: {}", decision.reasons.join("; ")),
        )
        .with_details(json!({
            "reasons": decision.reasons,
            "policyVersion": decision.policy_version,
        })))
    }

    /// Stores a new version of the tenant's policy after compiling it with
    /// the platform policy; the version and its audit event commit together.
    pub async fn put_tenant_policy(
        &self,
        identity: &Identity,
        tenant: &str,
        rego: &str,
    ) -> Result<TenantPolicy, ApiError> {
        let invalid = |m: String| ApiError::new(ErrorCode::PolicyInvalid, m);
        if rego.len() > MAX_POLICY_BYTES {
            return Err(invalid(format!(
                "the policy is {} bytes; at most {MAX_POLICY_BYTES}",
                rego.len()
            )));
        }
        let engine = compile(&self.platform_rego, Some(rego)).map_err(invalid)?;
        trial(&engine).map_err(invalid)?;
        let sha = hex::encode(Sha256::digest(rego.as_bytes()));
        let now = now_ms();
        let dialect = self.db.dialect();
        let actor = identity.actor();
        let policy = on_db!(&self.db, p => async {
            let mut tx = begin_write!(p, dialect)?;
            if dialect == crate::storage::Dialect::Postgres {
                // Serializes versions of one tenant across replicas.
                sqlx::query("SELECT pg_advisory_xact_lock(hashtext($1))")
                    .bind(format!("policy:{tenant}"))
                    .execute(&mut *tx).await.map_err(db_error)?;
            }
            let version: i64 = sqlx::query_scalar(
                "SELECT COALESCE(MAX(version), 0) + 1 FROM tenant_policies WHERE tenant = $1")
                .bind(tenant)
                .fetch_one(&mut *tx).await.map_err(db_error)?;
            sqlx::query(
                "INSERT INTO tenant_policies (tenant, version, rego, sha256, created_by, created_ms) \
                 VALUES ($1, $2, $3, $4, $5, $6)")
                .bind(tenant).bind(version).bind(rego).bind(&sha).bind(&actor).bind(now)
                .execute(&mut *tx).await.map_err(db_error)?;
            append_tx!(&mut tx, dialect, AuditEvent::by(identity, "policy.update", format!("policy/{tenant}"))
                .details(json!({"version": version, "sha256": sha})))?;
            tx.commit().await.map_err(db_error)?;
            Ok::<_, ApiError>(TenantPolicy {
                tenant: tenant.to_owned(),
                version,
                rego: rego.to_owned(),
                sha256: sha.clone(),
                created_by: actor.clone(),
                created_ms: now,
            })
        }.await)?;
        self.tenants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(tenant);
        Ok(policy)
    }

    /// The tenant's latest policy, if it has one.
    pub async fn get_tenant_policy(&self, tenant: &str) -> Result<Option<TenantPolicy>, ApiError> {
        Ok(self.list_versions(tenant, 1).await?.into_iter().next())
    }

    /// The tenant's policies, newest first.
    pub async fn list_versions(
        &self,
        tenant: &str,
        limit: i64,
    ) -> Result<Vec<TenantPolicy>, ApiError> {
        on_db!(&self.db, p => {
            let rows = sqlx::query(
                "SELECT * FROM tenant_policies WHERE tenant = $1 ORDER BY version DESC LIMIT $2")
                .bind(tenant).bind(limit)
                .fetch_all(p).await.map_err(db_error)?;
            rows.iter().map(|r| Ok(TenantPolicy {
                tenant: r.try_get("tenant").map_err(db_error)?,
                version: r.try_get("version").map_err(db_error)?,
                rego: r.try_get("rego").map_err(db_error)?,
                sha256: r.try_get("sha256").map_err(db_error)?,
                created_by: r.try_get("created_by").map_err(db_error)?,
                created_ms: r.try_get("created_ms").map_err(db_error)?,
            })).collect::<Result<Vec<_>, ApiError>>()
        })
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
            tenant: tenant.into(),
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
            .evaluate(&me, &ask("session.create", json!({"secrets": ["db"]})))
            .await
            .unwrap();
        assert!(d.reasons[0].contains("secrets"), "{d:?}");
        let d = policy
            .evaluate(&me, &ask("cluster.destroy", json!({})))
            .await
            .unwrap();
        assert!(d.reasons[0].contains("unknown action"), "{d:?}");
        t.cleanup().await;
    }

    #[tokio::test]
    async fn a_tenant_policy_narrows_for_its_tenant_only_and_never_widens() {
        for driver in [DatabaseDriver::Sqlite, DatabaseDriver::Postgres] {
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
    }

    #[tokio::test]
    async fn bad_policies_are_refused_and_versions_are_never_lost() {
        for driver in [DatabaseDriver::Sqlite, DatabaseDriver::Postgres] {
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
                    let rego =
                        format!("package sandbox.tenant\n\ndeny contains \"v{n}\" if false\n");
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
