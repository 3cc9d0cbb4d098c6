//! `/v1/sessions`: stateful sandboxes, their steps (sync or SSE) and
//! workspace files (`/v1/artifacts` is in `artifacts.rs`).

use std::convert::Infallible;
use std::sync::Arc;

use axum::{
    Json, Router,
    body::Bytes,
    extract::{State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode, header},
    response::{
        IntoResponse, Response,
        sse::{KeepAlive, Sse},
    },
    routing::get,
};
use futures::StreamExt;
use shared::CodedError;
use shared::ErrorCode;
use shared::agent::{FileList, StepResult};
use shared::client::PathStream;
use shared::controlplane::{SessionRequest, SessionStepRequest};
use shared::dataplane::{SessionView, SessionViewList};
use shared::ids::SessionId;
use shared::server::{ApiJson, ApiPath};

use super::IdentityExt;
use crate::App;
use crate::sessions::StepHistory;

pub(super) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/sessions", get(list).post(create))
        .route("/v1/sessions/{id}", get(get_one).delete(delete))
        .route("/v1/sessions/{id}/steps", get(list_steps).post(run_step))
        .route("/v1/sessions/{id}/files", get(list_files))
        .route(
            "/v1/sessions/{id}/files/{*path}",
            get(read_file).put(write_file).delete(delete_file),
        )
}

/// Create a session: a sandbox from the warm pool, kept for its TTL.
#[utoipa::path(post, path = "/v1/sessions", tag = "sessions", request_body = SessionRequest,
    responses((status = 201, body = SessionView),
        (status = 400, description = "unknown_runtime, limit_exceeded, invalid_json", body = shared::ErrorBody),
        (status = 403, description = "policy_denied, dependency_not_allowed", body = shared::ErrorBody),
        (status = 429, description = "capacity_exhausted", body = shared::ErrorBody),
        (status = 503, description = "data_plane_unavailable", body = shared::ErrorBody)))]
pub async fn create(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    ApiJson(req): ApiJson<SessionRequest>,
) -> Result<Response, CodedError> {
    let view = app.sessions.create(&caller, req).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// One session of the caller's tenant.
#[utoipa::path(get, path = "/v1/sessions/{id}", tag = "sessions", params(("id" = String, Path)),
    responses((status = 200, body = SessionView), (status = 404, body = shared::ErrorBody)))]
pub async fn get_one(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    ApiPath(id): ApiPath<SessionId>,
) -> Result<Json<SessionView>, CodedError> {
    Ok(Json(app.sessions.get(&caller, &id).await?))
}

/// The caller's tenant's live sessions.
#[utoipa::path(get, path = "/v1/sessions", tag = "sessions",
    responses((status = 200, body = SessionViewList)))]
pub async fn list(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
) -> Result<Json<SessionViewList>, CodedError> {
    Ok(Json(SessionViewList {
        sessions: app.sessions.list(&caller).await?,
    }))
}

/// Destroy a session; its workspace and artifacts are securely deleted.
#[utoipa::path(delete, path = "/v1/sessions/{id}", tag = "sessions", params(("id" = String, Path)),
    responses((status = 204), (status = 404, body = shared::ErrorBody)))]
pub async fn delete(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    ApiPath(id): ApiPath<SessionId>,
) -> Result<StatusCode, CodedError> {
    app.sessions.delete(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Run code in the session; variables persist between steps. With
/// `Accept: text/event-stream` the answer is SSE: `stdout`/`stderr` events
/// as output arrives, then one `result` (or `error`).
#[utoipa::path(post, path = "/v1/sessions/{id}/steps", tag = "sessions", params(("id" = String, Path)),
    request_body = SessionStepRequest,
    responses((status = 200, description = "The step's result (or an SSE stream)", body = StepResult),
        (status = 404, body = shared::ErrorBody), (status = 409, description = "session_busy", body = shared::ErrorBody),
        (status = 410, description = "session_lost", body = shared::ErrorBody),
        (status = 429, description = "tenant_quota_exceeded: too many open event streams", body = shared::ErrorBody)))]
pub async fn run_step(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    ApiPath(id): ApiPath<SessionId>,
    headers: HeaderMap,
    ApiJson(step): ApiJson<SessionStepRequest>,
) -> Result<Response, CodedError> {
    let streaming = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if !streaming {
        return Ok(Json(app.sessions.step(&caller, &id, step).await?).into_response());
    }
    let slot = app.waiters.enter(&caller.tenant)?;
    let events = app.sessions.step_stream(&caller, &id, step).await?;
    // The slot lives as long as the stream.
    let sse = events.map(move |ev| {
        let _slot = &slot;
        Ok::<_, Infallible>(shared::server::step_sse_event(
            ev,
            ErrorCode::DataPlaneUnavailable,
            "data plane",
        ))
    });
    Ok(Sse::new(sse)
        .keep_alive(KeepAlive::default())
        .into_response())
}

/// The session's steps, oldest first (code and output cut at 64 KiB).
#[utoipa::path(get, path = "/v1/sessions/{id}/steps", tag = "sessions", params(("id" = String, Path)),
    responses((status = 200, body = StepHistory), (status = 404, body = shared::ErrorBody)))]
pub async fn list_steps(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    ApiPath(id): ApiPath<SessionId>,
) -> Result<Json<StepHistory>, CodedError> {
    Ok(Json(app.sessions.steps(&caller, &id).await?))
}

/// The workspace's top directory.
#[utoipa::path(get, path = "/v1/sessions/{id}/files", tag = "sessions", params(("id" = String, Path)),
    responses((status = 200, body = FileList), (status = 404, body = shared::ErrorBody)))]
pub async fn list_files(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    ApiPath(id): ApiPath<SessionId>,
) -> Result<Json<FileList>, CodedError> {
    Ok(Json(app.sessions.list_files(&caller, &id).await?))
}

/// A file's bytes (`application/octet-stream`) or a directory's listing.
#[utoipa::path(get, path = "/v1/sessions/{id}/files/{path}", tag = "sessions",
    params(("id" = String, Path), ("path" = String, Path, description = "Relative to the workspace")),
    responses((status = 200, description = "The bytes, or a FileList for a directory"),
        (status = 400, description = "path_outside_workspace", body = shared::ErrorBody),
        (status = 404, description = "file_not_found", body = shared::ErrorBody)))]
pub async fn read_file(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    ApiPath((id, path)): ApiPath<(SessionId, String)>,
) -> Result<Response, CodedError> {
    Ok(match app.sessions.read_path(&caller, &id, &path).await? {
        PathStream::Dir(list) => Json::<FileList>(list).into_response(),
        // Streamed through as the data plane sends it: never held whole.
        PathStream::File(file) => {
            let size = file.size;
            let mut resp = (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/octet-stream")],
                axum::body::Body::from_stream(file.into_stream()),
            )
                .into_response();
            if let Some(n) = size {
                resp.headers_mut().insert(header::CONTENT_LENGTH, n.into());
            }
            resp
        }
    })
}

/// Write a file (the body is its bytes).
#[utoipa::path(put, path = "/v1/sessions/{id}/files/{path}", tag = "sessions",
    params(("id" = String, Path), ("path" = String, Path)),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 204), (status = 400, body = shared::ErrorBody), (status = 413, body = shared::ErrorBody),
        (status = 507, description = "workspace_full", body = shared::ErrorBody)))]
pub async fn write_file(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    ApiPath((id, path)): ApiPath<(SessionId, String)>,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, CodedError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            CodedError::new(
                ErrorCode::PayloadTooLarge,
                "file is larger than the body limit",
            )
        } else {
            CodedError::new(ErrorCode::InvalidArgument, e.body_text())
        }
    })?;
    app.sessions.write_file(&caller, &id, &path, body).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Delete a file.
#[utoipa::path(delete, path = "/v1/sessions/{id}/files/{path}", tag = "sessions",
    params(("id" = String, Path), ("path" = String, Path)),
    responses((status = 204), (status = 404, body = shared::ErrorBody)))]
pub async fn delete_file(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    ApiPath((id, path)): ApiPath<(SessionId, String)>,
) -> Result<StatusCode, CodedError> {
    app.sessions.delete_file(&caller, &id, &path).await?;
    Ok(StatusCode::NO_CONTENT)
}
