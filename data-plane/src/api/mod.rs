//! The internal HTTP API (`/internal/v1`). Handlers are thin: extract the
//! caller and the input, call the session service, map the result.

use std::convert::Infallible;
use std::sync::Arc;

use axum::{
    Extension, Json, Router,
    body::Body,
    body::Bytes,
    extract::{DefaultBodyLimit, State, rejection::BytesRejection},
    http::{HeaderMap, StatusCode, header},
    middleware,
    response::{
        IntoResponse, Response,
        sse::{KeepAlive, Sse},
    },
    routing::get,
};
use futures::StreamExt;
use shared::CodedError;
use shared::ErrorCode;
use shared::agent::FileList;
use shared::dataplane::{
    CreateSession, JobResult, ProbeStatus, RunJob, RunStep, RuntimeList, SessionViewList,
};
use shared::ids::{JobId, SessionId};
use shared::server::{ApiJson, ApiPath};

use crate::auth::{Authenticator, Caller, require_credential};
use crate::execution::JobService;
use crate::sessions::{PathRead, SessionRouter};

mod artifacts;

/// Shared state of the handlers.
#[derive(Clone)]
pub struct AppState {
    pub sessions: Arc<SessionRouter>,
    pub jobs: Arc<JobService>,
}

/// All routes: probes without credential, everything under `/internal/v1`
/// behind the service credential.
pub fn router(state: AppState, auth: Authenticator, max_body_bytes: usize) -> Router {
    let internal = Router::new()
        .route("/internal/v1/runtimes", get(runtimes))
        .route(
            "/internal/v1/sessions",
            get(list_sessions).post(create_session),
        )
        .route(
            "/internal/v1/sessions/{id}",
            get(get_session).delete(delete_session),
        )
        .route(
            "/internal/v1/sessions/{id}/steps",
            axum::routing::post(run_step),
        )
        .route("/internal/v1/sessions/{id}/files", get(list_root))
        .route(
            "/internal/v1/sessions/{id}/files/{*path}",
            get(read_path).put(write_file).delete(delete_file),
        )
        // Artifacts stream: no body limit here, the store enforces ARTIFACT_MAX_BYTES.
        .route(
            "/internal/v1/artifacts",
            axum::routing::post(artifacts::upload)
                .layer(DefaultBodyLimit::disable())
                .get(artifacts::list),
        )
        .route(
            "/internal/v1/artifacts/{id}",
            get(artifacts::download).delete(artifacts::delete),
        )
        .route("/internal/v1/artifacts/{id}/info", get(artifacts::info))
        .route("/internal/v1/jobs", axum::routing::post(run_job))
        .route("/internal/v1/jobs/{id}", get(get_job))
        .route(
            "/internal/v1/jobs/{id}/cancel",
            axum::routing::post(cancel_job),
        )
        .layer(middleware::from_fn_with_state(auth, require_credential));
    let probes = Router::new()
        .route(
            "/healthz",
            get(|| async {
                Json(ProbeStatus {
                    status: "ok".into(),
                    runtimes: None,
                })
            }),
        )
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    let http = state.sessions.metrics().http.clone();
    shared::server::with_common_layers(
        internal
            .merge(probes)
            .route_layer(middleware::from_fn_with_state(
                http,
                shared::metrics::track_http,
            ))
            .layer(DefaultBodyLimit::max(max_body_bytes))
            .with_state(state),
    )
}

async fn readyz(State(app): State<AppState>) -> Result<Json<ProbeStatus>, CodedError> {
    app.sessions.agent_ready().await?;
    app.sessions.registry_ready().await?;
    Ok(Json(ProbeStatus {
        status: "ready".into(),
        runtimes: Some(app.sessions.registry().list().len()),
    }))
}

async fn metrics(State(app): State<AppState>) -> Response {
    let m = app.sessions.metrics();
    m.sessions_active.set(app.sessions.count() as i64);
    // The backend's pools, asked with a short bound: a slow agent never stalls a scrape.
    if let Ok(Ok(pools)) = tokio::time::timeout(
        std::time::Duration::from_millis(500),
        app.sessions.backend().pool_sizes(),
    )
    .await
    {
        for (runtime, idle) in pools {
            m.warm_pool_idle
                .get_or_create(&crate::metrics::RuntimeLabel { runtime })
                .set(idle as i64);
        }
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        m.encode(),
    )
        .into_response()
}

async fn runtimes(State(app): State<AppState>) -> Json<RuntimeList> {
    Json(RuntimeList {
        runtimes: app.sessions.registry().list(),
    })
}

async fn create_session(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<CreateSession>,
) -> Result<Response, CodedError> {
    let view = app.sessions.create(&caller, req).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

async fn list_sessions(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
) -> Json<SessionViewList> {
    Json(SessionViewList {
        sessions: app.sessions.list(&caller),
    })
}

async fn get_session(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<SessionId>,
) -> Result<Response, CodedError> {
    Ok(Json(app.sessions.get(&caller, &id)?).into_response())
}

async fn delete_session(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<SessionId>,
) -> Result<StatusCode, CodedError> {
    app.sessions.delete(&caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn run_step(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<SessionId>,
    headers: HeaderMap,
    ApiJson(step): ApiJson<RunStep>,
) -> Result<Response, CodedError> {
    let streaming = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.contains("text/event-stream"));
    if !streaming {
        return Ok(Json(app.sessions.step(&caller, &id, step).await?).into_response());
    }
    let events = app.sessions.step_stream(&caller, &id, step).await?;
    let sse = events.map(|ev| {
        Ok::<_, Infallible>(shared::server::step_sse_event(
            ev,
            ErrorCode::SandboxUnavailable,
            "session agent",
        ))
    });
    Ok(Sse::new(sse)
        .keep_alive(KeepAlive::default())
        .into_response())
}

async fn run_job(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiJson(req): ApiJson<RunJob>,
) -> Result<Json<JobResult>, CodedError> {
    // The body's id is checked at the edge like a path's.
    JobId::parse(req.job_id.as_str())
        .map_err(|e| CodedError::new(ErrorCode::InvalidArgument, e.0))?;
    Ok(Json(app.jobs.run(&caller, req).await?))
}

async fn get_job(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<JobId>,
) -> Result<Json<JobResult>, CodedError> {
    Ok(Json(app.jobs.get(&caller, &id).await?))
}

async fn cancel_job(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<JobId>,
) -> Result<Json<JobResult>, CodedError> {
    Ok(Json(app.jobs.cancel(&caller, &id).await?))
}

async fn list_root(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath(id): ApiPath<SessionId>,
) -> Result<Response, CodedError> {
    path_response(app.sessions.read_path(&caller, &id, "").await?)
}

async fn read_path(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath((id, path)): ApiPath<(SessionId, String)>,
) -> Result<Response, CodedError> {
    path_response(app.sessions.read_path(&caller, &id, &path).await?)
}

/// A listing as JSON, a file streamed through as it comes from the agent.
fn path_response(content: PathRead) -> Result<Response, CodedError> {
    Ok(match content {
        PathRead::Dir(list) => Json::<FileList>(list).into_response(),
        PathRead::File { size, body } => {
            let mut resp = (
                StatusCode::OK,
                [(header::CONTENT_TYPE, "application/octet-stream")],
                Body::from_stream(body),
            )
                .into_response();
            if let Some(n) = size {
                resp.headers_mut().insert(header::CONTENT_LENGTH, n.into());
            }
            resp
        }
    })
}

async fn write_file(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
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

async fn delete_file(
    State(app): State<AppState>,
    Extension(caller): Extension<Caller>,
    ApiPath((id, path)): ApiPath<(SessionId, String)>,
) -> Result<StatusCode, CodedError> {
    app.sessions.delete_file(&caller, &id, &path).await?;
    Ok(StatusCode::NO_CONTENT)
}
