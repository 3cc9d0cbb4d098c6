//! Prometheus pieces every plane's `/metrics` shares: the latency histogram
//! buckets and the HTTP request-latency family with its middleware.

use std::time::Instant;

use axum::{
    extract::{MatchedPath, Request, State},
    middleware::Next,
    response::Response,
};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Histograms by label set, each with [`latency`] buckets.
pub type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets: 0.25 ms to ~8 s, doubling.
pub fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.00025, 2.0, 16))
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    /// The matched route template (`/v1/jobs/{id}`), never the raw path, so
    /// ids do not explode the label set; `unmatched` for a 404.
    pub route: String,
    pub method: String,
    pub status: u16,
}

/// `http_request_duration_seconds`, by route, method and status.
#[derive(Clone, Debug)]
pub struct HttpMetrics(Histograms<HttpLabels>);

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics(Family::new_with_constructor(latency))
    }
}

impl HttpMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "http_request_duration_seconds",
            "HTTP request latency by route and status",
            self.0.clone(),
        );
    }

    pub fn observe(
        &self,
        route: impl Into<String>,
        method: impl Into<String>,
        status: u16,
        seconds: f64,
    ) {
        self.0
            .get_or_create(&HttpLabels {
                route: route.into(),
                method: method.into(),
                status,
            })
            .observe(seconds);
    }
}

/// Middleware (`axum::middleware::from_fn_with_state`) that times every
/// request into [`HttpMetrics`].
pub async fn track_http(State(http): State<HttpMetrics>, req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let method = req.method().to_string();
    let started = Instant::now();
    let resp = next.run(req).await;
    http.observe(
        route,
        method,
        resp.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    resp
}

/// The text exposition of a registry (empty if encoding fails).
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    if prometheus_client::encoding::text::encode(&mut out, registry).is_err() {
        out.clear();
    }
    out
}
