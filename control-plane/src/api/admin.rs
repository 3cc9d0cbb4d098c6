//! Runtimes, tenant policy and the audit log.

use std::sync::Arc;

use axum::{
    Json,
    body::Bytes,
    extract::State,
    http::{HeaderMap, header},
};
use serde::{Deserialize, Serialize};
use serde_json::json;
use shared::CodedError;
use shared::ErrorCode;
use shared::dataplane::RuntimeList;
use shared::ids::TenantId;
use shared::server::{ApiJson, ApiPath, ApiQuery};
use utoipa::{IntoParams, ToSchema};

use super::{IdentityExt, require_admin};
use crate::App;
use crate::audit::{Anchor, AuditQuery, AuditRecord, VerifyReport};
use crate::policy::{Decision, PolicyInput, TenantPolicy};

/// The runtimes jobs and sessions may use, with their default and maximum
/// limits.
#[utoipa::path(get, path = "/v1/runtimes", tag = "sessions",
    responses((status = 200, body = RuntimeList), (status = 503, description = "data_plane_unavailable", body = shared::ErrorBody)))]
pub async fn runtimes(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
) -> Result<Json<RuntimeList>, CodedError> {
    app.policy
        .authorize(
            &caller,
            &PolicyInput {
                action: "runtime.list".into(),
                resource: json!({"type": "runtime"}),
                request: json!({}),
            },
        )
        .await?;
    Ok(Json(RuntimeList {
        runtimes: app.dp.runtimes(&caller.tenant).await?,
    }))
}

/// Only the caller's own tenant exists for it: another tenant -> 404.
fn own_tenant(caller: &IdentityExt, tenant: &str) -> Result<(), CodedError> {
    if caller.tenant != tenant {
        return Err(CodedError::new(
            ErrorCode::PolicyNotFound,
            format!("no policy for tenant {tenant}"),
        ));
    }
    Ok(())
}

/// The tenant's current policy (admin role only).
#[utoipa::path(get, path = "/v1/tenants/{tenant}/policy", tag = "policy",
    params(("tenant" = String, Path)),
    responses((status = 200, body = TenantPolicy), (status = 403, body = shared::ErrorBody),
        (status = 404, description = "no policy stored, or another tenant", body = shared::ErrorBody)))]
pub async fn get_policy(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    ApiPath(tenant): ApiPath<TenantId>,
) -> Result<Json<TenantPolicy>, CodedError> {
    own_tenant(&caller, &tenant)?;
    require_admin(&caller)?;
    app.policy
        .get_tenant_policy(&tenant)
        .await?
        .map(|mut p| {
            p.last_fault = app
                .policy
                .last_fault(&tenant)
                .filter(|f| f.version == p.version);
            Json(p)
        })
        .ok_or_else(|| {
            CodedError::new(
                ErrorCode::PolicyNotFound,
                format!("tenant {tenant} has no policy of its own; the platform default applies"),
            )
        })
}

/// Body of `PUT /v1/tenants/{tenant}/policy` as JSON; `text/plain` (the
/// Rego itself) is accepted too.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyBody {
    /// A Rego module in `package sandbox.tenant`.
    pub rego: String,
}

/// Replace the tenant's policy with a new version (admin role only).
#[utoipa::path(put, path = "/v1/tenants/{tenant}/policy", tag = "policy",
    params(("tenant" = String, Path)),
    request_body(content = PolicyBody, description = "JSON `{\"rego\": ...}` or the Rego as text/plain"),
    responses((status = 200, body = TenantPolicy), (status = 400, description = "policy_invalid", body = shared::ErrorBody),
        (status = 403, body = shared::ErrorBody), (status = 404, body = shared::ErrorBody)))]
pub async fn put_policy(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    ApiPath(tenant): ApiPath<TenantId>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<Json<TenantPolicy>, CodedError> {
    own_tenant(&caller, &tenant)?;
    require_admin(&caller)?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let rego = if content_type.starts_with("application/json") {
        serde_json::from_slice::<PolicyBody>(&body)
            .map_err(|e| CodedError::new(ErrorCode::InvalidJson, e.to_string()))?
            .rego
    } else if content_type.starts_with("text/plain") {
        String::from_utf8(body.to_vec())
            .map_err(|_| CodedError::new(ErrorCode::InvalidArgument, "the policy is not UTF-8"))?
    } else {
        return Err(CodedError::new(
            ErrorCode::UnsupportedMediaType,
            "send application/json {\"rego\": ...} or text/plain",
        ));
    };
    Ok(Json(
        app.policy
            .put_tenant_policy(&caller, &tenant, &rego)
            .await?,
    ))
}

/// Body of `POST /v1/policy/evaluate`.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EvaluateBody {
    /// `job.submit`, `session.create`, `step.run`, ...
    pub action: String,
    #[serde(default)]
    #[schema(value_type = Object)]
    pub resource: serde_json::Value,
    /// What the request would ask for: runtime, limits, packages, egress, secrets.
    #[serde(default)]
    #[schema(value_type = Object)]
    pub request: serde_json::Value,
}

/// Dry run: what policy would decide for the caller (nothing is recorded).
#[utoipa::path(post, path = "/v1/policy/evaluate", tag = "policy",
    request_body = EvaluateBody,
    responses((status = 200, body = Decision), (status = 400, body = shared::ErrorBody)))]
pub async fn evaluate_policy(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    ApiJson(body): ApiJson<EvaluateBody>,
) -> Result<Json<Decision>, CodedError> {
    let input = PolicyInput {
        action: body.action,
        resource: body.resource,
        request: body.request,
    };
    Ok(Json(app.policy.evaluate(&caller, &input).await?))
}

/// Filters of `GET /v1/audit`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct AuditParams {
    action: Option<String>,
    resource: Option<String>,
    outcome: Option<String>,
    /// At or after (Unix ms).
    since_ms: Option<i64>,
    /// Before (Unix ms).
    until_ms: Option<i64>,
    /// Only events after this `seq` (the last `seq` of the previous page).
    after: Option<i64>,
    /// 1-1000, default 100.
    limit: Option<i64>,
}

/// A page of the audit log.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuditPage {
    pub events: Vec<AuditRecord>,
}

/// The caller's tenant's audit events, oldest first (admin or auditor role).
#[utoipa::path(get, path = "/v1/audit", tag = "audit", params(AuditParams),
    responses((status = 200, body = AuditPage), (status = 403, body = shared::ErrorBody)))]
pub async fn audit_list(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    ApiQuery(q): ApiQuery<AuditParams>,
) -> Result<Json<AuditPage>, CodedError> {
    require_auditor(&caller)?;
    if let Some(limit) = q.limit
        && !(1..=1000).contains(&limit)
    {
        return Err(CodedError::new(
            ErrorCode::InvalidArgument,
            "limit must be 1-1000",
        ));
    }
    let query = AuditQuery {
        action: q.action,
        resource: q.resource,
        outcome: q.outcome,
        since_ms: q.since_ms,
        until_ms: q.until_ms,
        after: q.after,
        limit: q.limit,
    };
    Ok(Json(AuditPage {
        events: app.audit.list(&caller.tenant, &query).await?,
    }))
}

/// An anchor for `GET /v1/audit/verify`: both fields or neither.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct VerifyParams {
    /// `headSeq` of a report saved earlier outside the database.
    anchor_seq: Option<i64>,
    /// `head` of that report (64 hex digits): the event at `anchorSeq` must
    /// still carry it.
    anchor_hash: Option<String>,
}

/// Walks the whole hash chain and reports the first broken link. A tenant's
/// admin or auditor gets the tenant's view: its own events counted, a break
/// located only at its own event, no global `headSeq`/`head`. The
/// `platform-admin` role gets the global report and may pass an anchor
/// from an earlier report, which also catches a chain rewritten with
/// recomputed hashes, or cut short.
#[utoipa::path(get, path = "/v1/audit/verify", tag = "audit", params(VerifyParams),
    responses((status = 200, description = "`ok: false` names the first broken link", body = VerifyReport),
        (status = 400, description = "`invalid_argument`: half an anchor, or a malformed one", body = shared::ErrorBody),
        (status = 403, description = "not an admin or auditor; an anchor without the platform-admin role", body = shared::ErrorBody)))]
pub async fn audit_verify(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    ApiQuery(q): ApiQuery<VerifyParams>,
) -> Result<Json<VerifyReport>, CodedError> {
    let platform = caller.has_role(crate::identity::PLATFORM_ADMIN_ROLE);
    if !platform {
        require_auditor(&caller)?;
    }
    let anchor = match (q.anchor_seq, q.anchor_hash.as_deref()) {
        (None, None) => None,
        (Some(seq), Some(hash)) => Some(
            Anchor::new(seq, hash).map_err(|m| CodedError::new(ErrorCode::InvalidArgument, m))?,
        ),
        _ => {
            return Err(CodedError::new(
                ErrorCode::InvalidArgument,
                "anchorSeq and anchorHash go together",
            ));
        }
    };
    if platform {
        return Ok(Json(app.audit.verify_against(anchor.as_ref()).await?));
    }
    if anchor.is_some() {
        return Err(CodedError::new(
            ErrorCode::Forbidden,
            "anchors name global positions of the chain: the platform-admin role only",
        ));
    }
    Ok(Json(app.audit.verify_for_tenant(&caller.tenant).await?))
}

fn require_auditor(caller: &IdentityExt) -> Result<(), CodedError> {
    if caller.has_role("auditor") {
        return Ok(());
    }
    require_admin(caller)
}
