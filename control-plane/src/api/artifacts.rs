//! `/v1/artifacts`: streamed upload (raw body or one multipart file part),
//! listing, download (whole, one range, or 304 on a matching ETag), info
//! and delete. The bytes and the metadata live in the data plane (its
//! encrypted store and the record beside each object); these handlers add
//! policy, audit and the HTTP caching and range semantics.

use std::sync::Arc;

use axum::{
    Json, Router,
    body::Body,
    extract::{RawQuery, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};
use bytes::Bytes;
use futures::{Stream, StreamExt};
use shared::CodedError;
use shared::ErrorCode;
use shared::dataplane::{ArtifactInfo, ArtifactList, ArtifactQuery, RangeAsk, etag_matches};
use shared::ids::ArtifactId;
use shared::server::ApiPath;
use utoipa::IntoParams;

use super::IdentityExt;
use crate::App;
use crate::identity::Identity;

/// The artifact routes (upload is also served on `/tools/artifacts/upload`).
pub(super) fn routes() -> Router<Arc<App>> {
    Router::new()
        .route("/v1/artifacts", get(list).post(upload))
        .route("/v1/artifacts/{id}", get(download).delete(delete))
        .route("/v1/artifacts/{id}/info", get(info))
}

fn bad(message: impl Into<String>) -> CodedError {
    CodedError::new(ErrorCode::InvalidArgument, message)
}

/// A multipart parse error as the caller's 400, with its cause (the
/// parser says only "failed to read stream" for a refused body).
fn multipart_error(e: multer::Error) -> CodedError {
    match std::error::Error::source(&e) {
        Some(cause) => bad(format!("multipart/form-data: {e}: {cause}")),
        None => bad(format!("multipart/form-data: {e}")),
    }
}

/// The most a multipart body may carry outside the file's data: preamble,
/// boundaries, part headers and skipped parts. The multipart parser holds
/// a part's headers whole until their end, so without this bound a body
/// of one endless header would be buffered in memory.
pub const MULTIPART_FRAMING_MAX: u64 = 4 * 1024 * 1024;

/// Counts the bytes handed to the multipart parser outside the file part
/// and fails the stream past [`MULTIPART_FRAMING_MAX`].
#[derive(Debug, Default)]
struct Framing {
    /// The file part's data is streaming (not counted).
    in_file: std::sync::atomic::AtomicBool,
    counted: std::sync::atomic::AtomicU64,
}

impl Framing {
    fn take(&self, n: usize) -> Result<(), std::io::Error> {
        use std::sync::atomic::Ordering;
        if self.in_file.load(Ordering::SeqCst) {
            return Ok(());
        }
        let total = self.counted.fetch_add(n as u64, Ordering::SeqCst) + n as u64;
        if total > MULTIPART_FRAMING_MAX {
            return Err(std::io::Error::other(format!(
                "more than {MULTIPART_FRAMING_MAX} bytes of multipart framing (preamble, part headers, other parts)"
            )));
        }
        Ok(())
    }
}

/// Query of `POST /v1/artifacts`.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // documents the parameters; parsed by `ArtifactQuery`.
pub struct UploadQuery {
    /// The artifact's file name (default: the multipart part's file name,
    /// else `artifact`): no `/`, no control characters, at most 255 bytes.
    name: Option<String>,
    /// A session of the caller's tenant: the artifact is deleted with it.
    #[param(rename = "sessionId")]
    session_id: Option<String>,
    /// A job id to file it under (list with `jobId=`).
    #[param(rename = "jobId")]
    job_id: Option<String>,
    /// A workflow id to file it under (list with `workflowId=`).
    #[param(rename = "workflowId")]
    workflow_id: Option<String>,
    /// `k=v`, repeatable (at most 16): labels to list by.
    label: Option<Vec<String>>,
    /// The declared size in bytes (default: `Content-Length`). Policy sees
    /// it as `input.request.size`; a body larger than it is cut off (413).
    size: Option<u64>,
}

/// Query of `GET /v1/artifacts`.
#[derive(Debug, IntoParams)]
#[into_params(parameter_in = Query)]
#[allow(dead_code)] // documents the parameters; parsed by `ArtifactQuery`.
pub struct ListQuery {
    #[param(rename = "sessionId")]
    session_id: Option<String>,
    #[param(rename = "jobId")]
    job_id: Option<String>,
    #[param(rename = "workflowId")]
    workflow_id: Option<String>,
    /// `k=v`, repeatable: every one must match.
    label: Option<Vec<String>>,
    /// Page size, 1-1000 (default 100).
    limit: Option<usize>,
    /// `nextCursor` of the previous page.
    cursor: Option<String>,
}

/// Store an artifact, streamed through to the data plane as the bytes
/// arrive (never held whole) and stored encrypted. The body is the raw bytes
/// (any content type), or `multipart/form-data` whose first part with a file
/// name (or named `file`) is the artifact; parts before it are skipped, a
/// second file part is refused (400, nothing kept). The size is bounded by
/// the data plane's `ARTIFACT_MAX_BYTES` and by the declared `size` (or
/// `Content-Length`), which policy may limit (`input.request.size`). Policy
/// action `artifact.write`; audited.
#[utoipa::path(post, path = "/v1/artifacts", tag = "artifacts", params(UploadQuery),
    request_body(description = "The raw bytes, or a multipart form with one file part",
        content((Vec<u8> = "application/octet-stream"), (Vec<u8> = "multipart/form-data"))),
    responses((status = 201, description = "Stored", body = ArtifactInfo),
        (status = 400, description = "invalid_argument (name, ids, labels, multipart, a broken-off body)", body = shared::ErrorBody),
        (status = 401, body = shared::ErrorBody), (status = 403, description = "policy_denied", body = shared::ErrorBody),
        (status = 404, description = "session_not_found (also another tenant's)", body = shared::ErrorBody),
        (status = 413, description = "payload_too_large: above ARTIFACT_MAX_BYTES or the declared size", body = shared::ErrorBody),
        (status = 429, description = "tenant_quota_exceeded: too many concurrent transfers, or the tenant's stored artifact bytes would pass its quota (details.quota artifactBytes)", body = shared::ErrorBody),
        (status = 503, description = "data_plane_unavailable, audit_unavailable", body = shared::ErrorBody)))]
pub async fn upload(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, CodedError> {
    let q = ArtifactQuery::parse(
        raw.as_deref(),
        &["name", "sessionId", "jobId", "workflowId", "label", "size"],
    )
    .map_err(bad)?;
    let content_length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let declared = q.size.or(content_length);
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let multipart = content_type
        .split(';')
        .next()
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("multipart/form-data"));
    let info = if multipart {
        let boundary = multer::parse_boundary(content_type).map_err(multipart_error)?;
        let framing = Arc::new(Framing::default());
        let counter = framing.clone();
        let body = body.into_data_stream().map(move |chunk| {
            let chunk = chunk.map_err(std::io::Error::other)?;
            counter.take(chunk.len())?;
            Ok::<_, std::io::Error>(chunk)
        });
        let mut parts = multer::Multipart::new(body, boundary);
        let field = loop {
            let field = parts
                .next_field()
                .await
                .map_err(multipart_error)?
                .ok_or_else(|| bad("multipart/form-data: no file part (a part with a filename, or named `file`)"))?;
            if field.file_name().is_some() || field.name() == Some("file") {
                break field;
            }
            // Skipped without being held: drained chunk by chunk.
            let mut field = field;
            while let Some(chunk) = field.next().await {
                chunk.map_err(multipart_error)?;
            }
        };
        let name = q
            .name
            .clone()
            .or_else(|| field.file_name().map(str::to_owned))
            .unwrap_or_else(|| "artifact".into());
        framing
            .in_file
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let info = store(&app, &caller, &name, &q, declared, field).await?;
        framing
            .in_file
            .store(false, std::sync::atomic::Ordering::SeqCst);
        // One file per upload: a second one undoes the first.
        let more = loop {
            match parts.next_field().await {
                Ok(Some(f)) if f.file_name().is_some() || f.name() == Some("file") => {
                    break Some("a second file part".to_owned());
                }
                Ok(Some(_)) => continue,
                Ok(None) => break None,
                Err(e) => break Some(e.to_string()),
            }
        };
        if let Some(why) = more {
            if let Ok(id) = ArtifactId::parse(info.artifact_id.as_str()) {
                let _ = app.sessions.artifact_delete(&caller, &id).await;
            }
            return Err(bad(format!(
                "multipart/form-data: one file part per upload ({why}); nothing was kept"
            )));
        }
        info
    } else {
        let name = q.name.clone().unwrap_or_else(|| "artifact".into());
        store(&app, &caller, &name, &q, declared, body.into_data_stream()).await?
    };
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

/// Streams `body` to the data plane; a body that breaks off on the way in
/// (a client gone, a malformed multipart part) is the caller's 400.
async fn store<S, E>(
    app: &App,
    caller: &Identity,
    name: &str,
    q: &ArtifactQuery,
    declared: Option<u64>,
    body: S,
) -> Result<ArtifactInfo, CodedError>
where
    S: Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: std::fmt::Display + Send + 'static,
{
    let broke = Arc::new(std::sync::Mutex::new(None::<String>));
    let seen = broke.clone();
    let body = body.map(move |piece| {
        piece.map_err(|e| {
            let msg = e.to_string();
            *seen
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(msg.clone());
            std::io::Error::other(msg)
        })
    });
    let result = app
        .sessions
        .artifact_upload_with(caller, name, &q.meta, declared, body)
        .await;
    let why = broke
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .take();
    match (result, why) {
        (Err(e), Some(why)) if e.code != ErrorCode::PayloadTooLarge => {
            Err(bad(format!("the upload broke off: {why}")))
        }
        (other, _) => other,
    }
}

/// List the caller's artifacts: by session, job, workflow or labels (all
/// given must match), one page at a time in id order. Policy action
/// `artifact.read`.
#[utoipa::path(get, path = "/v1/artifacts", tag = "artifacts", params(ListQuery),
    responses((status = 200, body = ArtifactList),
        (status = 400, description = "invalid_argument", body = shared::ErrorBody),
        (status = 401, body = shared::ErrorBody), (status = 403, description = "policy_denied", body = shared::ErrorBody),
        (status = 503, description = "data_plane_unavailable", body = shared::ErrorBody)))]
pub async fn list(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
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
    Ok(Json(
        app.sessions
            .artifact_list(&caller, &q.into_filter())
            .await?,
    ))
}

/// An artifact's metadata.
#[utoipa::path(get, path = "/v1/artifacts/{id}/info", tag = "artifacts", params(("id" = String, Path)),
    responses((status = 200, body = ArtifactInfo),
        (status = 404, description = "artifact_not_found (also another tenant's)", body = shared::ErrorBody)))]
pub async fn info(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    ApiPath(id): ApiPath<ArtifactId>,
) -> Result<Json<ArtifactInfo>, CodedError> {
    Ok(Json(app.sessions.artifact_info(&caller, &id).await?))
}

/// An artifact's bytes, decrypted and authenticated chunk by chunk.
/// `ETag` is its SHA-256 (quoted); `If-None-Match` with it answers 304.
/// `Range: bytes=a-b`, `bytes=a-` or `bytes=-n` answers 206 with
/// `Content-Range`, the data plane reading only the encrypted chunks that
/// hold the range; a range outside it answers 416 with `Content-Range:
/// bytes */size`. Several ranges (or a malformed header) get the whole body
/// (200); `If-Range` is not supported (the ETag never changes: artifacts
/// are immutable).
#[utoipa::path(get, path = "/v1/artifacts/{id}", tag = "artifacts",
    params(("id" = String, Path), ("Range" = Option<String>, Header, description = "bytes=a-b | bytes=a- | bytes=-n"),
        ("If-None-Match" = Option<String>, Header, description = "the ETag of a copy the caller has")),
    responses((status = 200, description = "The bytes", content_type = "application/octet-stream"),
        (status = 206, description = "The asked range", content_type = "application/octet-stream"),
        (status = 304, description = "Not modified (the ETag matched)"),
        (status = 404, description = "artifact_not_found (also another tenant's)", body = shared::ErrorBody),
        (status = 416, description = "range_not_satisfiable", body = shared::ErrorBody)))]
pub async fn download(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    ApiPath(id): ApiPath<ArtifactId>,
    headers: HeaderMap,
) -> Result<Response, CodedError> {
    let info = app.sessions.artifact_info(&caller, &id).await?;
    let tag = format!("\"{}\"", info.sha256);
    let text = |name: header::HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let tag_value = HeaderValue::from_str(&tag).ok();
    if etag_matches(text(header::IF_NONE_MATCH), &tag) {
        let mut resp = StatusCode::NOT_MODIFIED.into_response();
        if let Some(v) = tag_value {
            resp.headers_mut().insert(header::ETAG, v);
        }
        return Ok(resp);
    }
    let range = match RangeAsk::parse(text(header::RANGE), info.size) {
        RangeAsk::Full => None,
        RangeAsk::Part { start, end } => Some((start, end)),
        RangeAsk::Unsatisfiable => {
            let mut resp = CodedError::new(
                ErrorCode::RangeNotSatisfiable,
                format!("the range is outside the artifact's {} bytes", info.size),
            )
            .into_response();
            if let Ok(v) = HeaderValue::from_str(&format!("bytes */{}", info.size)) {
                resp.headers_mut().insert(header::CONTENT_RANGE, v);
            }
            return Ok(resp);
        }
    };
    let opened = app.sessions.artifact_open(&caller, &info, range).await?;
    let (status, len) = match range {
        Some((start, end)) => (StatusCode::PARTIAL_CONTENT, end - start + 1),
        None => (StatusCode::OK, info.size),
    };
    let body = Body::from_stream(
        opened
            .into_stream()
            .map(|r| r.map_err(std::io::Error::other)),
    );
    let mut resp = (
        status,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        body,
    )
        .into_response();
    let h = resp.headers_mut();
    h.insert(header::CONTENT_LENGTH, len.into());
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    if let Some(v) = tag_value {
        h.insert(header::ETAG, v);
    }
    if let Ok(v) = HeaderValue::from_str(&info.sha256) {
        h.insert(header::HeaderName::from_static("x-artifact-sha256"), v);
    }
    if let Some((start, end)) = range
        && let Ok(v) = HeaderValue::from_str(&format!("bytes {start}-{end}/{}", info.size))
    {
        h.insert(header::CONTENT_RANGE, v);
    }
    Ok(resp)
}

/// Delete an artifact: its data key is destroyed first (crypto-shredding),
/// then the object and its record. Policy action `artifact.delete`; audited.
#[utoipa::path(delete, path = "/v1/artifacts/{id}", tag = "artifacts", params(("id" = String, Path)),
    responses((status = 204),
        (status = 404, description = "artifact_not_found (also another tenant's)", body = shared::ErrorBody)))]
pub async fn delete(
    State(app): State<Arc<App>>,
    caller: IdentityExt,
    ApiPath(id): ApiPath<ArtifactId>,
) -> Result<StatusCode, CodedError> {
    app.sessions.artifact_delete(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
