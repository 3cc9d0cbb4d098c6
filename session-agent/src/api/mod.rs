//! HTTP API of the session agent (camelCase JSON, coded errors). Handlers
//! are thin: extract, call the session manager, map the result.

use std::convert::Infallible;
use std::sync::Arc;

use axum::{
    Json, Router,
    body::Bytes,
    extract::{DefaultBodyLimit, Path, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode, header},
    response::{
        IntoResponse, Response,
        sse::{Event, KeepAlive, Sse},
    },
    routing::{get, post},
};
use futures::StreamExt;
use shared::CodedError;
use shared::ErrorCode;
use shared::agent::{
    ADMIN_TOKEN_HEADER, CreateSessionRequest, FileList, Health, OutputChunk, SESSION_TOKEN_HEADER,
    SessionList, StepRequest, StepResult, sse_event, validate_id,
};
use shared::server::ApiJson;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::kernels::OutputEvent;
use crate::sessions::SessionManager;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub sessions: Arc<SessionManager>,
}

/// The agent's routes.
pub fn router(state: AppState, max_body_bytes: usize) -> Router {
    let api = Router::new()
        // POST too: the seed's Kubernetes flow probes with POST.
        .route("/v1/health", get(health).post(health))
        .route("/v1/sessions", post(create_session).get(list_sessions))
        .route(
            "/v1/sessions/{session_id}",
            get(get_session).delete(delete_session),
        )
        .route("/v1/steps", post(run_step))
        .route("/v1/sessions/{session_id}/files", get(list_root))
        .route(
            "/v1/sessions/{session_id}/files/{*path}",
            get(read_path).put(write_file).delete(delete_file),
        )
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state);
    shared::server::with_common_layers(api)
}

fn token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(SESSION_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
}

fn admin_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(ADMIN_TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
}

async fn health(State(app): State<AppState>) -> Json<Health> {
    Json(Health {
        status: "ok".into(),
        isolation: app.sessions.launcher().kind().as_str().into(),
        sessions: app.sessions.count(),
        warm_pool: app.sessions.pool().sizes(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

async fn create_session(
    State(app): State<AppState>,
    headers: HeaderMap,
    body: Result<ApiJson<CreateSessionRequest>, CodedError>,
) -> Result<Response, CodedError> {
    // The caller first: an unauthenticated one learns nothing of the body's
    // validation and starts no sandbox.
    app.sessions.authorize_create(admin_token(&headers))?;
    let ApiJson(req) = body?;
    // The request's span carries the session's id once it is known to be
    // one (an invalid id is refused below and never becomes an attribute).
    if validate_id("sessionId", &req.session_id).is_ok() {
        tracing::Span::current().record("session_id", req.session_id.as_str());
    }
    // When both are given, the header must be the token being registered.
    if let (Some(h), Some(b)) = (token(&headers), req.token.as_deref())
        && h != b
    {
        return Err(CodedError::new(
            ErrorCode::Unauthorized,
            "X-Session-Token does not match the body's token",
        ));
    }
    // Creation runs in its own task: a client that disconnects midway
    // leaves either a whole session or nothing, never a half-made one.
    let (tx, rx) = oneshot::channel();
    let mgr = app.sessions.clone();
    app.sessions.spawn(async move {
        let _ = tx.send(mgr.create(req).await);
    });
    let info = rx.await.map_err(|_| {
        CodedError::new(
            ErrorCode::Internal,
            "session creation ended without a result",
        )
    })??;
    Ok((StatusCode::CREATED, Json(info)).into_response())
}

async fn list_sessions(State(app): State<AppState>, headers: HeaderMap) -> Json<SessionList> {
    let sessions = if app.sessions.is_admin(admin_token(&headers)) {
        app.sessions.list_all()
    } else {
        app.sessions.list(token(&headers))
    };
    Json(SessionList { sessions })
}

async fn get_session(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, CodedError> {
    let s = app.sessions.authorize(&id, token(&headers))?;
    Ok(Json(s.info()).into_response())
}

async fn delete_session(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<StatusCode, CodedError> {
    if !app.sessions.is_admin(admin_token(&headers)) {
        app.sessions.authorize(&id, token(&headers))?;
    }
    app.sessions.end(&id, "deleted").await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn run_step(
    State(app): State<AppState>,
    headers: HeaderMap,
    ApiJson(req): ApiJson<StepRequest>,
) -> Result<Response, CodedError> {
    let streaming = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    let (session_id, step_id) = (req.session_id.clone(), req.step_id.clone());
    let run = app.sessions.begin_step(req, token(&headers))?;
    // The ids are validated now: the step's span carries them (never the
    // code or its output).
    let span = tracing::info_span!("step.run", session_id = %session_id, step_id = %step_id);
    let (done_tx, done_rx) = oneshot::channel::<StepResult>();
    let (out_tx, out_rx) = if streaming {
        // Unbounded, yet bounded by the output cap: a slow reader must not
        // stall the step's reads (and its timeout) inside the kernel.
        let (tx, rx) = mpsc::unbounded_channel::<OutputEvent>();
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };
    // The step runs in its own task: a client that disconnects does not
    // leave the interpreter mid-request.
    let mgr = app.sessions.clone();
    app.sessions.spawn(tracing::Instrument::instrument(
        async move {
            let result = mgr.run_step(run, out_tx).await;
            let _ = done_tx.send(result);
        },
        span,
    ));
    let Some(out_rx) = out_rx else {
        let result = done_rx.await.map_err(|_| {
            CodedError::new(ErrorCode::Internal, "the step task ended without a result")
        })?;
        return Ok(Json(result).into_response());
    };
    let chunks = UnboundedReceiverStream::new(out_rx).map(|ev| {
        let (name, data) = match ev {
            OutputEvent::Stdout(d) => (sse_event::STDOUT, d),
            OutputEvent::Stderr(d) => (sse_event::STDERR, d),
        };
        Event::default()
            .event(name)
            .json_data(OutputChunk { data })
            .unwrap_or_default()
    });
    let last = futures::stream::once(async move {
        match done_rx.await {
            Ok(result) => Event::default()
                .event(sse_event::RESULT)
                .json_data(result)
                .unwrap_or_default(),
            Err(_) => Event::default()
                .event(sse_event::ERROR)
                .json_data(shared::ErrorBody {
                    code: ErrorCode::Internal,
                    message: "the step task ended without a result".into(),
                    request_id: None,
                    details: None,
                })
                .unwrap_or_default(),
        }
    });
    let stream = chunks.chain(last).map(Ok::<_, Infallible>);
    Ok(Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn list_root(
    State(app): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Json<FileList>, CodedError> {
    let s = app.sessions.authorize(&id, token(&headers))?;
    Ok(Json(FileList {
        files: s.workspace.list("")?,
    }))
}

async fn read_path(
    State(app): State<AppState>,
    Path((id, path)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, CodedError> {
    let s = app.sessions.authorize(&id, token(&headers))?;
    if s.workspace.is_dir(&path)? {
        return Ok(Json(FileList {
            files: s.workspace.list(&path)?,
        })
        .into_response());
    }
    let file = tokio::fs::File::from_std(s.workspace.open_read(&path)?);
    let len = file.metadata().await.map(|m| m.len()).ok();
    let body = axum::body::Body::from_stream(tokio_util::io::ReaderStream::new(file));
    let mut resp = (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/octet-stream")],
        body,
    )
        .into_response();
    if let Some(len) = len {
        resp.headers_mut()
            .insert(header::CONTENT_LENGTH, len.into());
    }
    Ok(resp)
}

async fn write_file(
    State(app): State<AppState>,
    Path((id, path)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<StatusCode, CodedError> {
    let s = app.sessions.authorize(&id, token(&headers))?;
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
    s.workspace.write(&path, &body)?;
    Ok(StatusCode::NO_CONTENT)
}

async fn delete_file(
    State(app): State<AppState>,
    Path((id, path)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<StatusCode, CodedError> {
    let s = app.sessions.authorize(&id, token(&headers))?;
    s.workspace.delete(&path)?;
    Ok(StatusCode::NO_CONTENT)
}
