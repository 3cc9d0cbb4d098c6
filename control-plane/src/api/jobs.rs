//! `/v1/jobs`: submit (idempotent), read, list, cancel.

use std::sync::Arc;
use std::time::Duration;

use axum::{
    Json,
    extract::State,
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use shared::CodedError;
use shared::ErrorCode;
use shared::controlplane::{
    IDEMPOTENCY_KEY_HEADER, IDEMPOTENT_REPLAYED_HEADER, Job, JobList, JobRequest, JobStatus,
};
use shared::ids::JobId;
use shared::server::{ApiJson, ApiPath, ApiQuery};
use utoipa::IntoParams;

use super::IdentityExt;
use crate::App;
use crate::orchestration::JobFilter;
use crate::orchestration::idempotency::resolve_key;

/// Longest long poll of `GET /v1/jobs/{id}?waitMs=`.
const MAX_WAIT_MS: u64 = 60_000;

/// Queue a job. With `Idempotency-Key` (or `requestId`), a repeat of the same
/// request returns the first response (header `Idempotent-Replayed: true`).
#[utoipa::path(post, path = "/v1/jobs", tag = "jobs",
    request_body = JobRequest,
    params(("Idempotency-Key" = Option<String>, Header, description = "Client key: the same key and body are accepted once (kept 24 h)")),
    responses(
        (status = 202, description = "Queued (or the replay of the first response)", body = Job),
        (status = 400, description = "Bad input: invalid_json, invalid_argument, unknown_runtime, limit_exceeded", body = shared::ErrorBody),
        (status = 401, body = shared::ErrorBody), (status = 403, description = "policy_denied", body = shared::ErrorBody),
        (status = 409, description = "idempotency_in_progress", body = shared::ErrorBody),
        (status = 413, body = shared::ErrorBody),
        (status = 422, description = "idempotency_key_reused: same key, another body", body = shared::ErrorBody),
        (status = 503, description = "storage_unavailable, audit_unavailable", body = shared::ErrorBody),
    ))]
pub async fn submit(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    headers: HeaderMap,
    ApiJson(req): ApiJson<JobRequest>,
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
    let submitted = app.jobs.submit(&caller, key, req).await?;
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

/// Query of `GET /v1/jobs/{id}`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct WaitQuery {
    /// Wait up to this long (ms, at most 60000) for a final status.
    wait_ms: Option<u64>,
}

/// A job of the caller's tenant; `waitMs` long-polls for its end.
#[utoipa::path(get, path = "/v1/jobs/{id}", tag = "jobs",
    params(("id" = String, Path), WaitQuery),
    responses((status = 200, body = Job), (status = 404, description = "job_not_found (also another tenant's)", body = shared::ErrorBody),
        (status = 429, description = "tenant_quota_exceeded: too many open long polls", body = shared::ErrorBody)))]
pub async fn get(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    ApiPath(id): ApiPath<JobId>,
    ApiQuery(q): ApiQuery<WaitQuery>,
) -> Result<Json<Job>, CodedError> {
    let job = match q.wait_ms {
        Some(ms) if ms > 0 => {
            let _slot = app.waiters.enter(&caller.tenant)?;
            app.jobs
                .wait(&caller, &id, Duration::from_millis(ms.min(MAX_WAIT_MS)))
                .await?
        }
        _ => app.jobs.get(&caller, &id).await?,
    };
    Ok(Json(job))
}

/// Query of `GET /v1/jobs`.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct ListQuery {
    /// `queued`, `running`, `succeeded`, `failed` or `cancelled`.
    status: Option<String>,
    /// `name=value`.
    label: Option<String>,
    /// Created at or after (Unix ms).
    created_after_ms: Option<i64>,
    /// Created before (Unix ms).
    created_before_ms: Option<i64>,
    /// `nextCursor` of the previous page.
    cursor: Option<String>,
    /// Page size, 1-500 (default 50).
    limit: Option<i64>,
}

/// The caller's tenant's jobs, newest first.
#[utoipa::path(get, path = "/v1/jobs", tag = "jobs", params(ListQuery),
    responses((status = 200, body = JobList), (status = 400, body = shared::ErrorBody)))]
pub async fn list(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    ApiQuery(q): ApiQuery<ListQuery>,
) -> Result<Json<JobList>, CodedError> {
    let bad = |m: String| CodedError::new(ErrorCode::InvalidArgument, m);
    let status = match q.status.as_deref() {
        Some(s) => Some(JobStatus::parse(s).ok_or_else(|| {
            bad(format!(
                "status {s:?}: one of queued, running, succeeded, failed, cancelled"
            ))
        })?),
        None => None,
    };
    let label = match q.label.as_deref() {
        Some(l) => {
            let (n, v) = l
                .split_once('=')
                .ok_or_else(|| bad(format!("label {l:?}: expected name=value")))?;
            Some((n.to_owned(), v.to_owned()))
        }
        None => None,
    };
    if let Some(limit) = q.limit
        && !(1..=500).contains(&limit)
    {
        return Err(bad("limit must be 1-500".into()));
    }
    let filter = JobFilter {
        status,
        label,
        created_after_ms: q.created_after_ms,
        created_before_ms: q.created_before_ms,
        cursor: q.cursor,
        limit: q.limit,
    };
    Ok(Json(app.jobs.list(&caller, &filter).await?))
}

/// Cancel a queued or running job (a finished one -> 409 `job_finished`).
#[utoipa::path(post, path = "/v1/jobs/{id}/cancel", tag = "jobs",
    params(("id" = String, Path)),
    responses((status = 200, description = "The job after cancellation (running ones end as `cancelled` when the data plane confirms)", body = Job),
        (status = 404, body = shared::ErrorBody), (status = 409, description = "job_finished", body = shared::ErrorBody)))]
pub async fn cancel(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    ApiPath(id): ApiPath<JobId>,
) -> Result<Json<Job>, CodedError> {
    Ok(Json(app.jobs.cancel(&caller, &id).await?))
}
