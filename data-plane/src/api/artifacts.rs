//! Artifact handlers: streamed upload and download, info, delete.

use axum::{
    Extension, Json,
    body::Body,
    extract::{Query, State},
    http::{StatusCode, header},
    response::{IntoResponse, Response},
};
use serde::Deserialize;
use shared::CodedError;
use shared::ErrorCode;
use shared::dataplane::ArtifactInfo;
use shared::ids::{ArtifactId, SessionId};
use shared::server::ApiPath;

use super::AppState;
use crate::auth::Caller;
use crate::metrics::DirectionLabel;
use crate::sessions::artifact_error;
use crate::workspace::artifacts::check_name;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct UploadParams {
    name: Option<String>,
    session_id: Option<SessionId>,
}

/// `POST /internal/v1/artifacts?name=&sessionId=` with the raw bytes as body.
pub async fn upload(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    params: Result<Query<UploadParams>, axum::extract::rejection::QueryRejection>,
    body: Body,
) -> Result<Response, CodedError> {
    let Query(params) =
        params.map_err(|e| CodedError::new(ErrorCode::InvalidArgument, e.body_text()))?;
    let name = params.name.unwrap_or_else(|| "artifact".into());
    check_name(&name).map_err(artifact_error)?;
    if let Some(sid) = &params.session_id {
        // Only the caller's own session can own it.
        app.sessions.get(&caller, sid)?;
    }
    let _slot = app.sessions.transfer(&caller)?;
    let info = app
        .sessions
        .artifacts()
        .put(
            &caller.tenant,
            &name,
            params.session_id.as_ref(),
            body.into_data_stream(),
        )
        .await
        .map_err(artifact_error)?;
    tracing::info!(target: "audit", tenant = %caller.tenant, artifact = %info.artifact_id, size = info.size, "artifact stored");
    app.sessions
        .metrics()
        .artifact_bytes
        .get_or_create(&DirectionLabel {
            direction: "in".into(),
        })
        .inc_by(info.size);
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

pub async fn info(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<ArtifactId>,
) -> Result<Json<ArtifactInfo>, CodedError> {
    Ok(Json(
        app.sessions
            .artifacts()
            .info(&caller.tenant, &id)
            .await
            .map_err(artifact_error)?,
    ))
}

pub async fn download(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<ArtifactId>,
) -> Result<Response, CodedError> {
    let slot = app.sessions.transfer(&caller)?;
    let (info, stream) = app
        .sessions
        .artifacts()
        .get(&caller.tenant, &id)
        .await
        .map_err(artifact_error)?;
    // The slot is held until the body has been sent (or dropped).
    let stream = futures::StreamExt::map(stream, move |chunk| {
        let _slot = &slot;
        chunk
    });
    tracing::info!(target: "audit", tenant = %caller.tenant, artifact = %id, "artifact read");
    app.sessions
        .metrics()
        .artifact_bytes
        .get_or_create(&DirectionLabel {
            direction: "out".into(),
        })
        .inc_by(info.size);
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(stream),
    )
        .into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, info.size.into());
    if let Ok(v) = info.sha256.parse() {
        h.insert("x-artifact-sha256", v);
    }
    Ok(resp)
}

pub async fn delete(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<ArtifactId>,
) -> Result<StatusCode, CodedError> {
    app.sessions
        .artifacts()
        .delete(&caller.tenant, &id)
        .await
        .map_err(artifact_error)?;
    tracing::info!(target: "audit", tenant = %caller.tenant, artifact = %id, "artifact deleted (key shredded)");
    Ok(StatusCode::NO_CONTENT)
}
