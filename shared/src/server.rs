//! axum glue shared by every plane: the coded error response, a JSON
//! extractor whose rejections use the error contract, request ids, and a
//! server loop with TCP_NODELAY and graceful shutdown.

use axum::{
    Json, Router,
    extract::{FromRequest, FromRequestParts, Query, Request, rejection::JsonRejection},
    http::request::Parts,
    http::{HeaderValue, StatusCode},
    middleware::Next,
    response::{IntoResponse, Response},
    serve::ListenerExt,
};
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::error::{CodedError, ErrorBody, ErrorCode};
use crate::telemetry::IncomingTrace;

/// The request id header, set on every response and propagated downstream.
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The W3C trace context header, passed on to the next hop.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// The W3C trace state header, passed on with `traceparent`.
pub const TRACESTATE_HEADER: &str = "tracestate";

tokio::task_local! {
    static REQUEST_ID: String;
    static TRACEPARENT: Option<String>;
}

/// The HTTP edge of [`CodedError`]: its code's status and the error body,
/// with the request id.
impl IntoResponse for CodedError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        if status.is_server_error() {
            tracing::warn!(code = self.code.as_str(), message = %self.message, "request failed");
        }
        let body = ErrorBody {
            code: self.code,
            message: self.message,
            request_id: current_request_id(),
            details: self.details,
        };
        (status, Json(body)).into_response()
    }
}

/// The id of the request being handled, if inside [`request_id_layer`].
pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
}

/// The `traceparent` of the request being handled, if it carried one.
pub fn current_traceparent() -> Option<String> {
    TRACEPARENT.try_with(Clone::clone).ok().flatten()
}

/// Middleware: takes `x-request-id` from the request (or makes one), makes it
/// visible to error bodies and logs, and echoes it on the response. The
/// request's span joins the caller's trace (`traceparent`) when an
/// OpenTelemetry layer is installed (see [`crate::telemetry`]).
pub async fn request_id_layer(req: Request, next: Next) -> Response {
    traced_request(IncomingTrace::Parent, req, next).await
}

/// [`request_id_layer`] at the public edge: a caller's `traceparent` is
/// linked, not joined (the request starts a trace of its own).
pub async fn edge_request_id_layer(req: Request, next: Next) -> Response {
    traced_request(IncomingTrace::Link, req, next).await
}

async fn traced_request(incoming: IncomingTrace, req: Request, next: Next) -> Response {
    let id = req
        .headers()
        .get(REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_owned)
        .unwrap_or_else(new_request_id);
    // version-traceid-parentid-flags, 55 characters of hex and dashes.
    let traceparent = req
        .headers()
        .get(TRACEPARENT_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() == 55 && v.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
        .map(str::to_owned);
    let span = if crate::telemetry::otel_installed() {
        let route = req
            .extensions()
            .get::<axum::extract::MatchedPath>()
            .map(|p| p.as_str().to_owned());
        let span = tracing::info_span!("request", request_id = %id, traceparent = traceparent.as_deref().unwrap_or(""),
            method = %req.method(), path = %req.uri().path(),
            otel.name = %format_args!("{} {}", req.method(), route.as_deref().unwrap_or("")),
            otel.kind = "server", tenant_id = tracing::field::Empty, job_id = tracing::field::Empty,
            session_id = tracing::field::Empty, step_id = tracing::field::Empty,
            workflow_id = tracing::field::Empty,
            http.response.status_code = tracing::field::Empty,
            otel.status_code = tracing::field::Empty);
        let tracestate = req
            .headers()
            .get(TRACESTATE_HEADER)
            .and_then(|v| v.to_str().ok())
            .filter(|v| v.len() <= 512);
        crate::telemetry::accept_trace_context(&span, traceparent.as_deref(), tracestate, incoming);
        span
    } else {
        // Without OpenTelemetry: the span as it was before it existed here.
        tracing::info_span!("request", request_id = %id, traceparent = traceparent.as_deref().unwrap_or(""),
            method = %req.method(), path = %req.uri().path())
    };
    let mut resp = REQUEST_ID
        .scope(
            id.clone(),
            TRACEPARENT.scope(
                traceparent,
                tracing::Instrument::instrument(next.run(req), span.clone()),
            ),
        )
        .await;
    if crate::telemetry::otel_installed() {
        span.record("http.response.status_code", resp.status().as_u16());
        if resp.status().is_server_error() {
            span.record("otel.status_code", "ERROR");
        }
    }
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert(REQUEST_ID_HEADER, v);
    }
    resp
}

fn new_request_id() -> String {
    let bytes: [u8; 12] = rand::random();
    hex::encode(bytes)
}

/// JSON body extractor whose every rejection is a coded [`CodedError`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

impl<S, T> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = CodedError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(ApiJson(v)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// Query-string extractor whose rejection is a coded 400
/// (`invalid_argument`) naming the field, like every other error.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiQuery<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = CodedError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(v)) => Ok(ApiQuery(v)),
            Err(rejection) => Err(CodedError::new(
                ErrorCode::InvalidArgument,
                rejection.body_text(),
            )),
        }
    }
}

/// Path extractor whose rejection is a coded 400 (`invalid_argument`) with
/// the id's own message. Used with the validated ids of [`crate::ids`], so a
/// traversal form (`..%2F`, `%2e%2e`, NUL, ...) never reaches a handler.
#[derive(Debug, Clone, Default)]
pub struct ApiPath<T>(pub T);

impl<S, T> FromRequestParts<S> for ApiPath<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = CodedError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        match axum::extract::Path::<T>::from_request_parts(parts, state).await {
            Ok(axum::extract::Path(v)) => Ok(ApiPath(v)),
            Err(rejection) => Err(path_rejection(rejection)),
        }
    }
}

fn path_rejection(rejection: axum::extract::rejection::PathRejection) -> CodedError {
    use axum::extract::path::ErrorKind;
    use axum::extract::rejection::PathRejection;
    let message = match &rejection {
        PathRejection::FailedToDeserializePathParams(e) => match e.kind() {
            ErrorKind::Message(m) => m.clone(),
            ErrorKind::InvalidUtf8InPathParam { key } => format!("{key} is not valid UTF-8"),
            _ => e.body_text(),
        },
        other => other.body_text(),
    };
    CodedError::new(ErrorCode::InvalidArgument, message)
}

fn json_rejection(rejection: JsonRejection) -> CodedError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => CodedError::new(
            ErrorCode::UnsupportedMediaType,
            "expected a body with Content-Type: application/json",
        ),
        JsonRejection::JsonDataError(e) => CodedError::new(ErrorCode::InvalidJson, e.body_text()),
        JsonRejection::JsonSyntaxError(e) => CodedError::new(ErrorCode::InvalidJson, e.body_text()),
        JsonRejection::BytesRejection(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            CodedError::new(
                ErrorCode::PayloadTooLarge,
                "request body is larger than the limit",
            )
        }
        other => CodedError::new(ErrorCode::InvalidJson, other.body_text()),
    }
}

/// One streamed step event as SSE (`stdout`, `stderr`, `result` or `error`).
/// A broken upstream stream becomes an `error` event with `broken` and a
/// message naming `upstream`.
#[cfg(feature = "client")]
pub fn step_sse_event(
    ev: Result<crate::client::StepEvent, crate::client::ClientError>,
    broken: ErrorCode,
    upstream: &str,
) -> axum::response::sse::Event {
    use crate::agent::{OutputChunk, sse_event};
    use crate::client::StepEvent;
    use axum::response::sse::Event;
    let event = match ev {
        Ok(StepEvent::Stdout(data)) => Event::default()
            .event(sse_event::STDOUT)
            .json_data(OutputChunk { data }),
        Ok(StepEvent::Stderr(data)) => Event::default()
            .event(sse_event::STDERR)
            .json_data(OutputChunk { data }),
        Ok(StepEvent::Result(r)) => Event::default().event(sse_event::RESULT).json_data(r),
        Ok(StepEvent::Error(body)) => Event::default().event(sse_event::ERROR).json_data(body),
        Err(e) => Event::default()
            .event(sse_event::ERROR)
            .json_data(ErrorBody {
                code: broken,
                message: format!("the step stream from the {upstream} broke: {e}"),
                request_id: None,
                details: None,
            }),
    };
    event.unwrap_or_default()
}

/// Fallback for unknown routes.
pub async fn route_not_found() -> CodedError {
    CodedError::new(ErrorCode::RouteNotFound, "no such route")
}

/// Rewrites axum's plain-text 405 into the error contract.
pub async fn method_not_allowed_layer(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    if resp.status() == StatusCode::METHOD_NOT_ALLOWED
        && !resp
            .headers()
            .contains_key(axum::http::header::CONTENT_TYPE)
    {
        let allow = resp.headers().get(axum::http::header::ALLOW).cloned();
        let mut out = CodedError::new(
            ErrorCode::MethodNotAllowed,
            "method not allowed on this route",
        )
        .into_response();
        if let Some(allow) = allow {
            out.headers_mut().insert(axum::http::header::ALLOW, allow);
        }
        return out;
    }
    resp
}

/// Adds the shared layers (request ids, coded 404/405) to a router.
pub fn with_common_layers(router: Router) -> Router {
    router
        .fallback(route_not_found)
        .layer(axum::middleware::from_fn(method_not_allowed_layer))
        .layer(axum::middleware::from_fn(request_id_layer))
}

/// [`with_common_layers`] for a public edge (the control plane's REST and
/// MCP ports): a caller's trace context is linked, not joined.
pub fn with_edge_layers(router: Router) -> Router {
    router
        .fallback(route_not_found)
        .layer(axum::middleware::from_fn(method_not_allowed_layer))
        .layer(axum::middleware::from_fn(edge_request_id_layer))
}

/// Serves `router` on `listener` with TCP_NODELAY on every accepted socket
/// until `shutdown` is cancelled, then drains in-flight requests.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let listener = listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY");
        }
    });
    // The peer address is available to handlers as `ConnectInfo`.
    axum::serve(
        listener,
        router.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move { shutdown.cancelled().await })
    .await
}

/// Parses `:9000`, `0.0.0.0:9000` or `127.0.0.1:9000` into a bindable address
/// (a bare `:port` binds every interface, as Go's listeners do).
pub fn parse_listen_addr(addr: &str) -> Result<std::net::SocketAddr, String> {
    let full = if let Some(port) = addr.strip_prefix(':') {
        format!("0.0.0.0:{port}")
    } else {
        addr.to_owned()
    };
    full.parse()
        .map_err(|e| format!("invalid listen address {addr:?}: {e} (expected host:port or :port)"))
}

/// Resolves when the process receives SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
                _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
            }
        }
        _ => {
            // Without signal handlers, Ctrl-C is still honoured.
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addr() {
        assert_eq!(
            parse_listen_addr(":9000").unwrap().to_string(),
            "0.0.0.0:9000"
        );
        assert_eq!(
            parse_listen_addr("127.0.0.1:1").unwrap().to_string(),
            "127.0.0.1:1"
        );
        assert!(parse_listen_addr("nope").is_err());
    }

    /// The trace id a handler sees for a request with `traceparent`.
    async fn trace_seen(router: Router, traceparent: Option<&str>) -> (StatusCode, String) {
        use tower::ServiceExt;
        let mut req = axum::http::Request::builder().uri("/t");
        if let Some(tp) = traceparent {
            req = req.header(TRACEPARENT_HEADER, tp);
        }
        let resp = router
            .oneshot(req.body(axum::body::Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1024).await.unwrap();
        let seen = String::from_utf8(body.to_vec()).unwrap();
        // version-TRACEID-parent-flags
        (
            status,
            seen.split('-').nth(1).unwrap_or_default().to_owned(),
        )
    }

    /// Issue 19 §5: with an OpenTelemetry layer, an inner plane's request
    /// joins the caller's trace; a malformed `traceparent` never errors (the
    /// request starts a trace of its own); the public edge never joins a
    /// caller's trace (it links it).
    #[tokio::test(flavor = "current_thread")]
    async fn trace_context_is_joined_inside_linked_at_the_edge_and_malformed_is_ignored() {
        use opentelemetry::trace::TracerProvider as _;
        use tracing_subscriber::prelude::*;
        let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
        let subscriber = tracing_subscriber::registry()
            .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")));
        let _guard = tracing::subscriber::set_default(subscriber);
        crate::telemetry::mark_installed_for_tests();
        let app = || {
            Router::new().route(
                "/t",
                axum::routing::get(|| async {
                    crate::telemetry::current_traceparent().unwrap_or_default()
                }),
            )
        };
        let caller_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
        let valid = format!("00-{caller_trace}-00f067aa0ba902b7-01");

        let (status, seen) = trace_seen(with_common_layers(app()), Some(&valid)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            seen, caller_trace,
            "an inner plane joins the caller's trace"
        );

        let (status, seen) = trace_seen(with_edge_layers(app()), Some(&valid)).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(seen.len(), 32);
        assert_ne!(seen, caller_trace, "the edge starts a trace of its own");

        for bad in [
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra-extra",
            "------------------------------------------------------b",
        ] {
            for router in [with_common_layers(app()), with_edge_layers(app())] {
                let (status, seen) = trace_seen(router, Some(bad)).await;
                assert_eq!(status, StatusCode::OK, "{bad}");
                assert_eq!(seen.len(), 32, "{bad}: a trace of its own, got {seen:?}");
                assert_ne!(seen, caller_trace, "{bad}");
                assert_ne!(seen, "0".repeat(32), "{bad}");
            }
        }
        let (status, seen) = trace_seen(with_common_layers(app()), None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(seen.len(), 32);
        let _ = provider.shutdown();
    }
}
