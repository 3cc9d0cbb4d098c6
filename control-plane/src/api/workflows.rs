//! `/v1/workflows`: submit (idempotent), read (long poll), list, cancel.

use std::sync::Arc;
use std::time::Duration;

use axum::{
    Json, Router,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde::Deserialize;
use shared::CodedError;
use shared::ErrorCode;
use shared::controlplane::{IDEMPOTENCY_KEY_HEADER, IDEMPOTENT_REPLAYED_HEADER, JobStatus};
use shared::ids::WorkflowId;
use shared::server::{ApiJson, ApiPath, ApiQuery};
use shared::workflow::{Workflow, WorkflowList, WorkflowRequest};
use utoipa::IntoParams;

use super::IdentityExt;
use crate::App;
use crate::orchestration::WorkflowFilter;
use crate::orchestration::idempotency::resolve_key;

/// Longest long poll of `GET /v1/workflows/{id}?waitMs=`.
const MAX_WAIT_MS: u64 = 60_000;

/// The `/v1/workflows` routes.
pub fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/workflows", post(submit).get(list))
        .route("/v1/workflows/{id}", get(get_one))
        .route("/v1/workflows/{id}/cancel", post(cancel))
}

/// Queue a workflow: one session, input files, the steps in order, outputs
/// as artifacts, teardown. With `Idempotency-Key` (or `requestId`), a
/// repeat of the same plan returns the first response
/// (`Idempotent-Replayed: true`).
#[utoipa::path(post, path = "/v1/workflows", tag = "workflows",
    request_body = WorkflowRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Client key: the same key and plan are accepted once (kept 24 h)")),
    responses(
        (status = 202, description = "Queued (or the replay of the first response)", body = Workflow),
        (status = 400, description = "A malformed plan, naming the field (`steps[3].code`, also in `details.field`): invalid_json, invalid_argument, path_outside_workspace, unknown_runtime, limit_exceeded", body = shared::ErrorBody),
        (status = 401, body = shared::ErrorBody), (status = 403, description = "policy_denied", body = shared::ErrorBody),
        (status = 409, description = "idempotency_in_progress", body = shared::ErrorBody),
        (status = 413, body = shared::ErrorBody),
        (status = 422, description = "idempotency_key_reused: same key, another plan", body = shared::ErrorBody),
        (status = 429, description = "rate_limited (sandbox creations), tenant_quota_exceeded (sessions)", body = shared::ErrorBody),
        (status = 501, description = "not_implemented: egress or secrets that policy allowed", body = shared::ErrorBody),
        (status = 503, description = "storage_unavailable, audit_unavailable, rate_limiter_unavailable", body = shared::ErrorBody),
    ))]
pub async fn submit(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    headers: HeaderMap,
    ApiJson(req): ApiJson<WorkflowRequest>,
) -> Result<Response, CodedError> {
    let header_key = match headers.get(IDEMPOTENCY_KEY_HEADER) {
        Some(v) => Some(v.to_str().map_err(|_| {
            CodedError::new(
                ErrorCode::InvalidArgument,
                "Idempotency-Key must be visible ASCII",
            )
        })?),
        None => None,
    };
    let key = resolve_key(header_key, req.request_id.as_deref())?;
    let submitted = app.workflows.submit(&caller, key, req).await?;
    let status = StatusCode::from_u16(submitted.status).unwrap_or(StatusCode::ACCEPTED);
    let mut resp = (
        status,
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        submitted.body,
    )
        .into_response();
    if submitted.replayed {
        resp.headers_mut()
            .insert(IDEMPOTENT_REPLAYED_HEADER, HeaderValue::from_static("true"));
    }
    Ok(resp)
}

/// Query of `GET /v1/workflows/{id}`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Wait up to this long (ms, at most 60000) for a final status.
    wait_ms: Option<u64>,
}

/// A workflow of the caller's tenant with its steps; `waitMs` long-polls
/// for its end.
#[utoipa::path(get, path = "/v1/workflows/{id}", tag = "workflows",
    params(("id" = String, Path), WaitQuery),
    responses((status = 200, body = Workflow), (status = 404, description = "workflow_not_found (also another tenant's)", body = shared::ErrorBody),
        (status = 429, description = "tenant_quota_exceeded: too many open long polls", body = shared::ErrorBody)))]
pub async fn get_one(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    ApiPath(id): ApiPath<WorkflowId>,
    ApiQuery(q): ApiQuery<WaitQuery>,
) -> Result<Json<Workflow>, CodedError> {
    let w = match q.wait_ms {
        Some(ms) if ms > 0 => {
            let _slot = app.waiters.enter(&caller.tenant)?;
            app.workflows
                .wait(&caller, &id, Duration::from_millis(ms.min(MAX_WAIT_MS)))
                .await?
        }
        _ => app.workflows.get(&caller, &id).await?,
    };
    Ok(Json(w))
}

/// Query of `GET /v1/workflows`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    status: Option<String>,
    /// `nextCursor` of the previous page.
    cursor: Option<String>,
    /// Page size, 1-500 (default 50).
    limit: Option<i64>,
}

/// The caller's tenant's workflows, newest first.
#[utoipa::path(get, path = "/v1/workflows", tag = "workflows", params(ListQuery),
    responses((status = 200, body = WorkflowList), (status = 400, body = shared::ErrorBody)))]
pub async fn list(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<WorkflowList>, CodedError> {
    let bad = |m: String| CodedError::new(ErrorCode::InvalidArgument, m);
    let status = match q.status.as_deref() {
        Some(s) => Some(JobStatus::parse(s).ok_or_else(|| {
            bad(format!(
                "status {s:?}: one of queued, running, succeeded, failed, cancelled"
            ))
        })?),
        None => None,
    };
    if let Some(limit) = q.limit
        && !(1..=500).contains(&limit)
    {
        return Err(bad("limit must be 1-500".into()));
    }
    let filter = WorkflowFilter {
        status,
        cursor: q.cursor,
        limit: q.limit,
    };
    Ok(Json(app.workflows.list(&caller, &filter).await?))
}

/// Cancel a queued or running workflow (a finished one -> 409
/// `workflow_finished`). A running one's step is interrupted (its session
/// is deleted) and the workflow ends `cancelled` after teardown.
#[utoipa::path(post, path = "/v1/workflows/{id}/cancel", tag = "workflows",
    params(("id" = String, Path)),
    responses((status = 200, description = "The workflow after cancellation", body = Workflow),
        (status = 404, body = shared::ErrorBody), (status = 409, description = "workflow_finished", body = shared::ErrorBody)))]
pub async fn cancel(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    ApiPath(id): ApiPath<WorkflowId>,
) -> Result<Json<Workflow>, CodedError> {
    Ok(Json(app.workflows.cancel(&caller, &id).await?))
}
