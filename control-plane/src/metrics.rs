//! Prometheus metrics of the control plane (`GET /metrics`, text format).

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use shared::metrics::{Histograms, HttpMetrics, latency};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ActionLabel {
    pub action: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: String,
}

/// A rate limit or quota by name (`requests`, `creations`, `sessions`).
/// Never by tenant: tenants are unbounded label cardinality, and which
/// tenant was refused is in the audit log.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct LimitLabel {
    pub limit: String,
}

/// Every metric, registered once.
pub struct Metrics {
    registry: Registry,
    pub http: HttpMetrics,
    /// Submit-to-finish latency of jobs, by final status.
    pub job_duration: Histograms<StatusLabel>,
    /// Jobs that reached a final status.
    pub jobs_finished: Family<StatusLabel, Counter>,
    /// Jobs waiting to be dispatched (queued), as last counted.
    pub job_queue_depth: Gauge,
    /// Jobs this replica is running now.
    pub jobs_running: Gauge,
    pub policy_denials: Family<ActionLabel, Counter>,
    pub audit_write_failures: Counter,
    /// Requests refused by a rate limit or quota, by limit name.
    pub rate_limited: Family<LimitLabel, Counter>,
    /// Checks the shared rate limiter (Redis) could not answer, by limit
    /// name: `requests` were let through, `creations` refused.
    pub rate_limiter_unavailable: Family<LimitLabel, Counter>,
}

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("control_plane");
        let m = Metrics {
            http: HttpMetrics::default(),
            job_duration: Family::new_with_constructor(latency),
            jobs_finished: Family::default(),
            job_queue_depth: Gauge::default(),
            jobs_running: Gauge::default(),
            policy_denials: Family::default(),
            audit_write_failures: Counter::default(),
            rate_limited: Family::default(),
            rate_limiter_unavailable: Family::default(),
            registry: Registry::default(),
        };
        m.http.register(&mut registry);
        registry.register(
            "job_duration_seconds",
            "Job latency from submission to a final status",
            m.job_duration.clone(),
        );
        registry.register(
            "jobs_finished",
            "Jobs that reached a final status",
            m.jobs_finished.clone(),
        );
        registry.register(
            "job_queue_depth",
            "Jobs queued and waiting for a worker",
            m.job_queue_depth.clone(),
        );
        registry.register(
            "jobs_running",
            "Jobs this replica is dispatching now",
            m.jobs_running.clone(),
        );
        registry.register(
            "policy_denials",
            "Requests refused by policy, by action",
            m.policy_denials.clone(),
        );
        registry.register(
            "audit_write_failures",
            "Audit events that could not be written (the request was refused)",
            m.audit_write_failures.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused by a per-tenant rate limit or quota, by limit",
            m.rate_limited.clone(),
        );
        registry.register(
            "rate_limiter_unavailable",
            "Rate-limit checks the shared store could not answer (requests let through, creations refused), by limit",
            m.rate_limiter_unavailable.clone(),
        );
        Arc::new(Metrics { registry, ..m })
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
        m.job_queue_depth.set(3);
        m.audit_write_failures.inc();
        m.policy_denials
            .get_or_create(&ActionLabel {
                action: "job.submit".into(),
            })
            .inc();
        m.jobs_finished
            .get_or_create(&StatusLabel {
                status: "succeeded".into(),
            })
            .inc();
        m.job_duration
            .get_or_create(&StatusLabel {
                status: "succeeded".into(),
            })
            .observe(0.05);
        m.http.observe("/healthz", "GET", 200, 0.001);
        m.rate_limited
            .get_or_create(&LimitLabel {
                limit: "requests".into(),
            })
            .inc();
        m.rate_limiter_unavailable
            .get_or_create(&LimitLabel {
                limit: "creations".into(),
            })
            .inc();
        let text = m.encode();
        for name in [
            "control_plane_http_request_duration_seconds",
            "control_plane_job_duration_seconds",
            "control_plane_jobs_finished_total",
            "control_plane_job_queue_depth 3",
            "control_plane_jobs_running",
            "control_plane_policy_denials_total",
            "control_plane_audit_write_failures_total 1",
            "control_plane_rate_limited_total{limit=\"requests\"} 1",
            "control_plane_rate_limiter_unavailable_total{limit=\"creations\"} 1",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
