//! Data plane: runtime registry, sandbox provisioning and session routing (internal API).
//!
//! This crate only builds, serves `/healthz` and stops cleanly for now; the
//! issues that follow the execution core fill it in.

use axum::{Json, Router, routing::get};
use clap::Parser;
use serde_json::json;
use tokio_util::sync::CancellationToken;

/// Configuration, from flags or environment variables.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "data-plane",
    version,
    about = "Data plane: runtime registry, sandbox provisioning and session routing (internal API)"
)]
pub struct Config {
    /// Listen address (`:8081` binds every interface).
    #[arg(long, env = "DATA_PLANE_ADDR", default_value = ":8081")]
    pub addr: String,
    /// Deployment environment; `production` refuses development-only flags.
    #[arg(long = "env", env = "ENV", default_value = "dev")]
    pub environment: String,
}

impl Config {
    /// Checks the configuration before any socket is bound.
    pub fn validate(&self) -> Result<(), String> {
        shared::server::parse_listen_addr(&self.addr).map(|_| ())
    }
}

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
    tracing::info!(addr = %listener.local_addr()?, "data-plane listening");
    shared::server::serve(listener, router(), shutdown).await?;
    tracing::info!("data-plane stopped");
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
        let c = Config::parse_from(["x", "--addr", "nonsense"]);
        assert!(c.validate().unwrap_err().contains("nonsense"));
    }
}
