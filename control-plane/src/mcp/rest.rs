//! The seed's REST tool endpoints (`/tools/*`), served on the MCP port
//! beside `/mcp`. Each is the twin of a `/v1` route and is served by the
//! very same handler: same body, same answer, same codes, same policy
//! action and audit. The caller's [`crate::identity::Identity`] must be in
//! the request extensions: the MCP port's authentication middleware puts it
//! there (no or a bad token is a 401 before any of these runs).
//!
//! | `/tools` route                                | `/v1` twin                              |
//! |-----------------------------------------------|-----------------------------------------|
//! | `POST /tools/jobs`                            | `POST /v1/jobs`                         |
//! | `GET /tools/jobs/{jobId}`                     | `GET /v1/jobs/{id}`                     |
//! | `POST /tools/sessions`                        | `POST /v1/sessions`                     |
//! | `POST /tools/sessions/{sessionId}/steps`      | `POST /v1/sessions/{id}/steps`          |
//! | `POST /tools/workflows`                       | `POST /v1/workflows`                    |
//! | `POST /tools/artifacts/upload`                | `POST /v1/artifacts` (streamed)         |
//! | `GET /tools/artifacts/{artifactId}/download`  | `GET /v1/artifacts/{id}`                |

use std::sync::Arc;

use axum::{
    Router,
    extract::DefaultBodyLimit,
    routing::{get, post},
};

use crate::App;
use crate::api::{artifacts, jobs, sessions, workflows};

/// The `/tools/*` routes, state applied. Merge them behind the MCP port's
/// authentication middleware.
pub fn router(app: Arc<App>) -> Router {
    Router::new()
        .route("/tools/jobs", post(jobs::submit))
        .route("/tools/jobs/{jobId}", get(jobs::get))
        .route("/tools/sessions", post(sessions::create))
        .route(
            "/tools/sessions/{sessionId}/steps",
            post(sessions::run_step),
        )
        .route("/tools/workflows", post(workflows::submit))
        // Streamed: the raw body is never held whole, so the JSON body limit
        // below does not apply to it (the data plane's ARTIFACT_MAX_BYTES does).
        .route("/tools/artifacts/upload", post(artifacts::upload))
        .route(
            "/tools/artifacts/{artifactId}/download",
            get(artifacts::download),
        )
        .layer(DefaultBodyLimit::max(app.config.max_body_bytes))
        .with_state(app)
}
