//! `POST /v1/artifacts`: a streamed upload (download, info and delete are in
//! `sessions.rs` beside the other workspace routes).

use std::sync::Arc;

use axum::{
    Json,
    body::Body,
    extract::State,
    http::StatusCode,
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use shared::CodedError;
use shared::dataplane::ArtifactInfo;
use shared::ids::SessionId;
use shared::server::ApiQuery;
use utoipa::IntoParams;

use super::IdentityExt;
use crate::App;

/// Query of `POST /v1/artifacts` (the data plane's upload contract).
#[derive(Debug, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct UploadQuery {
    /// The artifact's file name (default `artifact`): no `/`, no control
    /// characters, at most 255 bytes.
    name: Option<String>,
    /// A session of the caller's tenant: the artifact is deleted with it.
    session_id: Option<SessionId>,
}

/// Store an artifact: the raw body is its bytes, streamed through to the
/// data plane as they arrive (never held whole) and stored encrypted. The
/// size is bounded by the data plane's `ARTIFACT_MAX_BYTES`, not by the
/// JSON body limit. Policy action `artifact.write`; audited.
#[utoipa::path(post, path = "/v1/artifacts", tag = "jobs", params(UploadQuery),
    request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, description = "Stored", body = ArtifactInfo),
        (status = 400, description = "invalid_argument (name, sessionId)", body = shared::ErrorBody),
        (status = 401, body = shared::ErrorBody), (status = 403, description = "policy_denied", body = shared::ErrorBody),
        (status = 404, description = "session_not_found (also another tenant's)", body = shared::ErrorBody),
        (status = 413, description = "payload_too_large: above ARTIFACT_MAX_BYTES", body = shared::ErrorBody),
        (status = 429, description = "tenant_quota_exceeded: too many concurrent transfers", body = shared::ErrorBody),
        (status = 503, description = "data_plane_unavailable, audit_unavailable", body = shared::ErrorBody)))]
pub async fn upload(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    ApiQuery(q): ApiQuery<UploadQuery>,
    body: Body,
) -> Result<Response, CodedError> {
    let name = q.name.unwrap_or_else(|| "artifact".into());
    let info: ArtifactInfo = app
        .sessions
        .artifact_upload(
            &caller,
            &name,
            q.session_id.as_ref(),
            body.into_data_stream(),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}
