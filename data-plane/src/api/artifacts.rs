//! Artifact handlers: streamed upload and download (whole or one range),
//! listing, info, delete.

use axum::{
    Extension, Json,
    body::Body,
    extract::{RawQuery, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};
use shared::CodedError;
use shared::ErrorCode;
use shared::dataplane::{
    ArtifactFilter, ArtifactInfo, ArtifactList, ArtifactQuery, RangeAsk, etag_matches,
};
use shared::ids::{ArtifactId, SessionId};
use shared::server::ApiPath;

use super::AppState;
use crate::auth::Caller;
use crate::metrics::DirectionLabel;
use crate::sessions::artifact_error;
use crate::workspace::artifacts::check_name;

fn bad(message: impl Into<String>) -> CodedError {
    CodedError::new(ErrorCode::InvalidArgument, message)
}

/// `POST /internal/v1/artifacts?name=&sessionId=&jobId=&workflowId=&label=k=v&quotaBytes=`
/// with the raw bytes as body. `quotaBytes` (from the control plane's
/// policy) replaces `TENANT_MAX_ARTIFACT_BYTES` for this upload.
pub async fn upload(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    RawQuery(raw): RawQuery,
    body: Body,
) -> Result<Response, CodedError> {
    let q = ArtifactQuery::parse(
        raw.as_deref(),
        &[
            "name",
            "sessionId",
            "jobId",
            "workflowId",
            "label",
            "quotaBytes",
        ],
    )
    .map_err(bad)?;
    let name = q.name.unwrap_or_else(|| "artifact".into());
    check_name(&name).map_err(artifact_error)?;
    if let Some(sid) = &q.meta.session_id {
        // Only the caller's own session can own it.
        let sid = SessionId::parse(sid.as_str()).map_err(|e| bad(format!("sessionId: {e}")))?;
        app.sessions.get(&caller, &sid)?;
    }
    let _slot = app.sessions.transfer(&caller)?;
    let info = app
        .sessions
        .artifacts()
        .put_meta_within(
            &caller.tenant,
            &name,
            &q.meta,
            q.quota_bytes,
            body.into_data_stream(),
        )
        .await
        .map_err(|e| {
            if matches!(
                e,
                crate::workspace::artifacts::ArtifactError::QuotaExceeded { .. }
            ) {
                app.sessions.metrics().artifact_quota_refusals.inc();
            }
            artifact_error(e)
        })?;
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

/// `GET /internal/v1/artifacts?sessionId=&jobId=&workflowId=&label=k=v&limit=&cursor=`.
pub async fn list(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    RawQuery(raw): RawQuery,
) -> Result<Json<ArtifactList>, CodedError> {
    let q = ArtifactQuery::parse(
        raw.as_deref(),
        &[
            "sessionId",
            "jobId",
            "workflowId",
            "label",
            "limit",
            "cursor",
        ],
    )
    .map_err(bad)?;
    let filter = ArtifactFilter {
        session_id: q.meta.session_id,
        job_id: q.meta.job_id,
        workflow_id: q.meta.workflow_id,
        labels: q.meta.labels,
        limit: q.limit,
        cursor: q.cursor,
    };
    Ok(Json(
        app.sessions
            .artifacts()
            .list(&caller.tenant, &filter)
            .await
            .map_err(artifact_error)?,
    ))
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

/// The `ETag` of an artifact: its SHA-256, quoted.
fn etag(info: &ArtifactInfo) -> String {
    format!("\"{}\"", info.sha256)
}

/// `GET /internal/v1/artifacts/{id}`: the whole artifact (200), one range
/// (`Range: bytes=a-b | a- | -n`: 206, only the chunks holding it are
/// read and opened), 416 for a range outside it, 304 for a matching
/// `If-None-Match`. Several ranges are answered with the whole body.
pub async fn download(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<ArtifactId>,
    headers: HeaderMap,
) -> Result<Response, CodedError> {
    let store = app.sessions.artifacts();
    let info = store
        .info(&caller.tenant, &id)
        .await
        .map_err(artifact_error)?;
    let tag = etag(&info);
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    if etag_matches(text(header::IF_NONE_MATCH), &tag) {
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        put_tag(resp.headers_mut(), &tag);
        return Ok(resp);
    }
    let ask = RangeAsk::parse(text(header::RANGE), info.size);
    if ask == RangeAsk::Unsatisfiable {
        let mut resp = artifact_error(crate::workspace::artifacts::ArtifactError::Range(info.size))
            .into_response();
        if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", info.size)) {
            resp.headers_mut().insert(header::CONTENT_RANGE, v);
        }
        return Ok(resp);
    }
    let slot = app.sessions.transfer(&caller)?;
    let (status, len, content_range, stream) = match ask {
        RangeAsk::Part { start, end } => {
            let (_, s) = store
                .get_range(&caller.tenant, &id, start, end)
                .await
                .map_err(artifact_error)?;
            let cr = format!("bytes {start}-{end}/{}", info.size);
            (
                StatusCode::PARTIAL_CONTENT,
                end - start + 1,
                Some(cr),
                futures::StreamExt::boxed(s),
            )
        }
        _ => {
            let (_, s) = store
                .get(&caller.tenant, &id)
                .await
                .map_err(artifact_error)?;
            (
                StatusCode::OK,
                info.size,
                None,
                futures::StreamExt::boxed(s),
            )
        }
    };
    // The slot is held until the body has been sent (or dropped).
    let stream = futures::StreamExt::map(stream, move |chunk| {
        let _slot = &slot;
        chunk
    });
    tracing::info!(target: "audit", tenant = %caller.tenant, artifact = %id, bytes = len, "artifact read");
    app.sessions
        .metrics()
        .artifact_bytes
        .get_or_create(&DirectionLabel {
            direction: "out".into(),
        })
        .inc_by(len);
    let mut resp = (
        status,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(stream),
    )
        .into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, len.into());
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    put_tag(h, &tag);
    if let Some(v) = content_range.and_then(|c| HeaderValue::from_str(&c).ok()) {
        h.insert(header::CONTENT_RANGE, v);
    }
    if let Ok(v) = info.sha256.parse() {
        h.insert("x-artifact-sha256", v);
    }
    Ok(resp)
}

fn put_tag(h: &mut HeaderMap, tag: &str) {
    if let Ok(v) = HeaderValue::from_str(tag) {
        h.insert(header::ETAG, v);
    }
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
