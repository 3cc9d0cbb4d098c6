//! Control plane: the authenticated REST API agents call.
//!
//! `api` (HTTP; identity middleware) -> `policy` (regorus) -> `audit`
//! (hash chain) -> `orchestration` (durable jobs) / `sessions` (data-plane
//! proxy) -> `storage` (sqlx: Postgres or SQLite).

pub mod audit;
pub mod config;
pub mod identity;
pub mod storage;
pub mod telemetry;

use axum::{Json, Router, routing::get};
use serde_json::json;
use tokio_util::sync::CancellationToken;

pub use config::Config;

/// The HTTP routes.
pub fn router() -> Router {
    shared::server::with_common_layers(
        Router::new().route("/healthz", get(|| async { Json(json!({"status": "ok"})) })),
    )
}

/// Serves until `shutdown` is cancelled.
pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let addr = shared::server::parse_listen_addr(&config.addr).map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(addr = %listener.local_addr()?, "control-plane listening");
    shared::server::serve(listener, router(), shutdown).await?;
    tracing::info!("control-plane stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use tower::ServiceExt;

    #[tokio::test]
    async fn healthz_and_coded_404() {
        let resp = router()
            .oneshot(Request::get("/healthz").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let resp = router()
            .oneshot(Request::get("/nope").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
    }

    #[test]
    fn bad_addr_is_refused() {
        use clap::Parser;
        let c = Config::parse_from(["x", "--addr", "nonsense"]);
        assert!(c.validate().unwrap_err().contains("nonsense"));
    }
}
