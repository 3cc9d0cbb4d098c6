//! Prometheus metrics of the data plane (`GET /metrics`, text format).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use shared::metrics::HttpMetrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StartLabels {
    /// `warm` (claimed from the agent's pool) or `cold`.
    pub kind: String,
    pub runtime: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    pub runtime: String,
    pub status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuntimeLabel {
    pub runtime: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `in` (upload) or `out` (download).
    pub direction: String,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

/// Sandbox starts and steps: 0.5 ms .. ~16 s.
fn latency() -> Histogram {
    Histogram::new(exponential_buckets(0.0005, 2.0, 16))
}

/// Every metric, registered once.
pub struct Metrics {
    registry: Registry,
    pub http: HttpMetrics,
    pub sandbox_start: Histograms<StartLabels>,
    pub step: Histograms<StepLabels>,
    pub sessions_active: Gauge,
    pub jobs_running: Gauge,
    pub warm_pool_idle: Family<RuntimeLabel, Gauge>,
    pub artifact_bytes: Family<DirectionLabel, Counter>,
    /// Uploads and job output files refused by a tenant's stored-bytes quota
    /// (not by tenant: unbounded label cardinality; the control plane audits who).
    pub artifact_quota_refusals: Counter,
    /// Allowlist decisions by runtime and `status` = allow | deny.
    pub dependency_decisions: Family<StepLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("data_plane");
        let http = HttpMetrics::default();
        let sandbox_start: Histograms<StartLabels> = Family::new_with_constructor(latency);
        let step: Histograms<StepLabels> = Family::new_with_constructor(latency);
        let sessions_active = Gauge::default();
        let jobs_running = Gauge::default();
        let warm_pool_idle = Family::<RuntimeLabel, Gauge>::default();
        let artifact_bytes = Family::<DirectionLabel, Counter>::default();
        let artifact_quota_refusals = Counter::default();
        let dependency_decisions = Family::<StepLabels, Counter>::default();
        http.register(&mut registry);
        registry.register(
            "sandbox_start_seconds",
            "Time to a ready session, cold or warm",
            sandbox_start.clone(),
        );
        registry.register(
            "step_duration_seconds",
            "Step latency through the data plane",
            step.clone(),
        );
        registry.register("sessions_active", "Live sessions", sessions_active.clone());
        registry.register(
            "jobs_running",
            "One-shot jobs in progress (the queue depth)",
            jobs_running.clone(),
        );
        registry.register(
            "warm_pool_idle",
            "Idle warm sandboxes per runtime, as the agent reports",
            warm_pool_idle.clone(),
        );
        registry.register(
            "artifact_bytes",
            "Artifact bytes stored (in) and served (out)",
            artifact_bytes.clone(),
        );
        registry.register(
            "artifact_quota_refusals",
            "Artifacts refused by the tenant's stored-bytes quota (uploads and job output files)",
            artifact_quota_refusals.clone(),
        );
        registry.register(
            "dependency_decisions",
            "Dependency allowlist decisions (status = allow | deny)",
            dependency_decisions.clone(),
        );
        Arc::new(Metrics {
            registry,
            http,
            sandbox_start,
            step,
            sessions_active,
            jobs_running,
            warm_pool_idle,
            artifact_bytes,
            artifact_quota_refusals,
            dependency_decisions,
        })
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        shared::metrics::encode(&self.registry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposition_names_every_metric() {
        let m = Metrics::new();
        m.sessions_active.set(2);
        m.step
            .get_or_create(&StepLabels {
                runtime: "python".into(),
                status: "ok".into(),
            })
            .observe(0.001);
        m.http.observe("/healthz", "GET", 200, 0.001);
        m.sandbox_start
            .get_or_create(&StartLabels {
                kind: "cold".into(),
                runtime: "python".into(),
            })
            .observe(0.2);
        m.warm_pool_idle
            .get_or_create(&RuntimeLabel {
                runtime: "python".into(),
            })
            .set(1);
        m.dependency_decisions
            .get_or_create(&StepLabels {
                runtime: "python".into(),
                status: "deny".into(),
            })
            .inc();
        m.artifact_bytes
            .get_or_create(&DirectionLabel {
                direction: "in".into(),
            })
            .inc_by(10);
        // Families with no series yet are omitted by the exposition.
        let text = m.encode();
        for name in [
            "data_plane_http_request_duration_seconds",
            "data_plane_sandbox_start_seconds",
            "data_plane_step_duration_seconds",
            "data_plane_sessions_active 2",
            "data_plane_jobs_running",
            "data_plane_warm_pool_idle",
            "data_plane_artifact_bytes",
            "data_plane_dependency_decisions",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
