//! The public REST API (`/v1`). Handlers are thin: extract the identity and
//! the input, call one domain function, map the result. Every route but the
//! probes and the API description goes through [`authenticate`].

use std::sync::Arc;

use axum::{
    Extension, Json, Router,
    extract::{DefaultBodyLimit, Request, State},
    http::{HeaderMap, StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use serde_json::json;
use shared::CodedError;
use shared::ErrorCode;
use utoipa::OpenApi;

use crate::App;
use crate::audit::AuditEvent;
use crate::identity::{ADMIN_ROLE, BYPASS_TENANT_HEADER, Identity, bypass_identity};

mod admin;
pub(crate) mod artifacts;
pub(crate) mod jobs;
pub mod ratelimit;
pub(crate) mod sessions;
pub(crate) mod workflows;

/// The routes, the middleware and the API description.
pub fn router(app: Arc<App>) -> Router {
    let v1 = Router::new()
        .route("/v1/jobs", post(jobs::submit).get(jobs::list))
        .route("/v1/jobs/{id}", get(jobs::get))
        .route("/v1/jobs/{id}/cancel", post(jobs::cancel))
        .merge(sessions::routes())
        .merge(artifacts::routes())
        .merge(workflows::routes())
        .route("/v1/runtimes", get(admin::runtimes))
        .route(
            "/v1/tenants/{tenant}/policy",
            get(admin::get_policy).put(admin::put_policy),
        )
        .route("/v1/policy/evaluate", post(admin::evaluate_policy))
        .route("/v1/audit", get(admin::audit_list))
        .route("/v1/audit/verify", get(admin::audit_verify))
        // Inside authentication: the request bucket is the caller's tenant's.
        .layer(middleware::from_fn_with_state(
            app.clone(),
            ratelimit::enforce,
        ))
        .layer(middleware::from_fn_with_state(app.clone(), authenticate))
        .layer(DefaultBodyLimit::max(app.config.max_body_bytes));
    let probes = Router::new()
        .route("/healthz", get(|| async { Json(json!({"status": "ok"})) }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    let docs = utoipa_swagger_ui::SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi());
    let http = app.metrics.http.clone();
    shared::server::with_edge_layers(v1.merge(probes).merge(docs).with_state(app).layer(
        middleware::from_fn_with_state(http, shared::metrics::track_http),
    ))
}

/// Authenticates the caller and attaches its [`Identity`]. A failure is
/// audited and answered 401. Under `AUTHZ_BYPASS` every request is audited
/// with `bypass: true`, and refused if that record cannot be written.
pub async fn authenticate(State(app): State<Arc<App>>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    let method = req.method().to_string();
    let identity = if app.verifier.bypassed() {
        let tenant = req
            .headers()
            .get(BYPASS_TENANT_HEADER)
            .and_then(|v| v.to_str().ok());
        let identity = match bypass_identity(tenant) {
            Ok(i) => i,
            Err(e) => return e.into_response(),
        };
        let ev = AuditEvent::by(&identity, "request.bypass", path.clone())
            .details(json!({"method": method}));
        if let Err(e) = app.audit.record(ev).await {
            return e.into_response();
        }
        identity
    } else {
        // Failures are counted per source. A valid token is always let
        // through, even from a source over its allowance (behind a proxy
        // many callers share one source: a flood of bad tokens must not
        // lock the others out); past the allowance a bad one is a 429.
        let peer = req
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0);
        let source = crate::auth_failures::source_of(
            req.headers(),
            peer,
            app.config.auth_failure_trust_forwarded,
        );
        let token = bearer(req.headers());
        let verified = match token {
            Some(t) => app.verifier.verify(t),
            None => Err(CodedError::new(
                ErrorCode::Unauthorized,
                "missing bearer token (Authorization: Bearer <JWT>)",
            )),
        };
        match verified {
            Ok(identity) => identity,
            Err(e) => {
                let throttled = app.auth_failures.admit(&source);
                // The window's first failure from this source is audited
                // now; the rest go into one aggregated event per window.
                if app.auth_failures.note(&source, &path, &e.message)
                    == crate::auth_failures::Noted::AuditNow
                {
                    let ev = AuditEvent {
                        tenant: "-".into(),
                        actor: "anonymous".into(),
                        action: "auth.failure".into(),
                        resource: path,
                        outcome: "refused".into(),
                        bypass: false,
                        details: json!({"method": method, "reason": e.message, "source": source}),
                    };
                    // The 401 stands even if the record cannot be written.
                    let _ = app.audit.record(ev).await;
                }
                if let crate::auth_failures::Admit::Throttled(wait) = throttled {
                    let mut resp = CodedError::new(
                        ErrorCode::RateLimited,
                        "too many failed authentications from this source; retry later",
                    )
                    .into_response();
                    if let Ok(v) = header::HeaderValue::from_str(&wait.as_secs().max(1).to_string())
                    {
                        resp.headers_mut().insert(header::RETRY_AFTER, v);
                    }
                    return resp;
                }
                return e.into_response();
            }
        }
    };
    // The request's span (shared::server) carries the verified tenant.
    tracing::Span::current().record("tenant_id", identity.tenant.as_str());
    req.extensions_mut().insert(identity);
    next.run(req).await
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
        .filter(|t| !t.is_empty())
}

/// Refuses callers without the admin role (403 `forbidden`).
pub(crate) fn require_admin(identity: &Identity) -> Result<(), CodedError> {
    if identity.has_role(ADMIN_ROLE) {
        Ok(())
    } else {
        Err(CodedError::new(
            ErrorCode::Forbidden,
            format!("this needs the {ADMIN_ROLE} role"),
        ))
    }
}

/// `GET /readyz`: the database and the data plane answer.
#[utoipa::path(get, path = "/readyz", tag = "probes",
    responses((status = 200, description = "ready"), (status = 503, description = "not ready", body = shared::ErrorBody)))]
async fn readyz(State(app): State<Arc<App>>) -> Response {
    if let Err(e) = app.db.ping().await {
        return CodedError::from(e).into_response();
    }
    if let Err(e) = app.dp.ready().await {
        return e.into_response();
    }
    (StatusCode::OK, Json(json!({"status": "ready"}))).into_response()
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        app.metrics.encode(),
    )
        .into_response()
}

/// The OpenAPI description of `/v1` (served at `/openapi.json`, committed
/// under `specs/001-sandboxed-code-execution/contracts/`).
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Sandboxed code execution: control plane",
        description = "Run untrusted code for AI agents in gVisor sandboxes: one-shot jobs, stateful sessions, policy and a tamper-evident audit log. Every /v1 call needs `Authorization: Bearer <JWT>`; every error is `{code, message, request_id}`."
    ),
    paths(
        jobs::submit, jobs::get, jobs::list, jobs::cancel,
        sessions::create, sessions::get_one, sessions::list, sessions::delete,
        sessions::run_step, sessions::list_steps,
        sessions::list_files, sessions::read_file, sessions::write_file, sessions::delete_file,
        workflows::submit, workflows::get_one, workflows::list, workflows::cancel,
        artifacts::upload, artifacts::list, artifacts::info, artifacts::download, artifacts::delete,
        admin::runtimes, admin::get_policy, admin::put_policy, admin::evaluate_policy,
        admin::audit_list, admin::audit_verify, readyz,
    ),
    components(schemas(shared::ErrorBody, shared::ErrorCode)),
    modifiers(&BearerAuth),
    security(("bearer" = [])),
    tags(
        (name = "jobs", description = "One-shot code in a fresh sandbox; idempotent, durable"),
        (name = "sessions", description = "Stateful sandboxes: steps keep their variables"),
        (name = "workflows", description = "Ordered plans run in one session: inputs, steps, outputs as artifacts, teardown; idempotent, durable"),
        (name = "artifacts", description = "Files stored encrypted: uploaded, or left by jobs in output/"),
        (name = "policy", description = "Rego policy per tenant"),
        (name = "audit", description = "The hash-chained audit log"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

/// The API description as pretty JSON (what `control-plane openapi` prints).
pub fn openapi_json() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

/// The verified identity the authentication middleware attached to the request.
pub(crate) type IdentityExt = Extension<Identity>;
