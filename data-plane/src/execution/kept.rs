//! Finished jobs' outcomes (results and cancel markers), kept so a repeated
//! job id replays instead of running again. Bounded per tenant, so one
//! tenant can only ever evict its own: at most `per_tenant` outcomes and
//! `tenant_bytes` of output each, and every outcome is forgotten after
//! `lifetime`. Across tenants, `total_bytes` bounds the output held: a
//! tenant whose insert goes over it gives up its own oldest output.
//!
//! Under byte pressure the oldest outcome's output goes first: in memory
//! only (nothing durable behind it), it is slimmed to a summary (status,
//! error kind, artifacts; `truncated`), so the id still never runs again;
//! with a durable registry it is dropped (the saved copy answers replays).

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use shared::agent::StepError;
use shared::dataplane::JobResult;

/// The bounds of what is kept (`JOB_KEEP_*`, `JOB_RESULT_TTL`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeepLimits {
    /// Outcomes kept per tenant (results and cancel markers).
    pub per_tenant: usize,
    /// Bytes of output kept per tenant.
    pub tenant_bytes: u64,
    /// Bytes of output kept for all tenants together.
    pub total_bytes: u64,
    /// How long an outcome is kept (in memory and saved).
    pub lifetime: Duration,
}

impl Default for KeepLimits {
    fn default() -> Self {
        KeepLimits {
            per_tenant: 10_000,
            tenant_bytes: 128 * 1024 * 1024,
            total_bytes: 512 * 1024 * 1024,
            lifetime: Duration::from_secs(24 * 3600),
        }
    }
}

/// What an outcome costs to keep, roughly.
pub fn size_of(r: &JobResult) -> u64 {
    let result = r
        .result
        .as_ref()
        .map_or(0, |v| serde_json::to_vec(v).map_or(0, |b| b.len()));
    let error = r
        .error
        .as_ref()
        .map_or(0, |e| e.kind.len() + e.message.len() + e.traceback.len());
    let artifacts: usize = r
        .artifacts
        .iter()
        .map(|a| 128 + a.name.len() + a.artifact_id.len())
        .sum();
    (256 + r.job_id.len() + r.stdout.len() + r.stderr.len() + result + error + artifacts) as u64
}

/// The outcome without its output: what a replay gets once the output is
/// no longer kept.
fn slim(r: &JobResult) -> JobResult {
    JobResult {
        job_id: r.job_id.clone(),
        status: r.status,
        stdout: String::new(),
        stderr: String::new(),
        result: None,
        error: r.error.as_ref().map(|e| StepError {
            kind: e.kind.clone(),
            message: e.message.chars().take(512).collect(),
            traceback: String::new(),
        }),
        duration_ms: r.duration_ms,
        truncated: r.truncated
            || !r.stdout.is_empty()
            || !r.stderr.is_empty()
            || r.result.is_some(),
        artifacts: r.artifacts.clone(),
        replayed: r.replayed,
    }
}

struct Done {
    result: JobResult,
    bytes: u64,
    at: Instant,
    /// Which insert this is (queue pairs of a replaced outcome are stale).
    seq: u64,
    full: bool,
}

#[derive(Default)]
struct Tenant {
    done: HashMap<String, Done>,
    /// Every kept outcome, oldest first (stale pairs are skipped).
    order: VecDeque<(String, u64)>,
    /// Outcomes still holding their output, oldest first.
    full: VecDeque<(String, u64)>,
    bytes: u64,
}

/// Kept outcomes of every tenant.
pub struct Kept {
    limits: KeepLimits,
    /// A durable registry holds every saved outcome too.
    durable: bool,
    tenants: HashMap<String, Tenant>,
    total: u64,
    seq: u64,
    swept: Instant,
}

impl Kept {
    pub fn new(limits: KeepLimits, durable: bool) -> Self {
        Kept {
            limits,
            durable,
            tenants: HashMap::new(),
            total: 0,
            seq: 0,
            swept: Instant::now(),
        }
    }

    pub fn limits(&self) -> KeepLimits {
        self.limits
    }

    /// A kept outcome (expired ones are forgotten first).
    pub fn get(&mut self, tenant: &str, job_id: &str) -> Option<&JobResult> {
        self.expire(tenant, Instant::now());
        self.tenants
            .get(tenant)?
            .done
            .get(job_id)
            .map(|d| &d.result)
    }

    pub fn contains(&mut self, tenant: &str, job_id: &str) -> bool {
        self.get(tenant, job_id).is_some()
    }

    /// Output bytes kept, all tenants.
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// (outcomes, output bytes) kept for `tenant`.
    pub fn usage(&self, tenant: &str) -> (usize, u64) {
        self.tenants
            .get(tenant)
            .map_or((0, 0), |t| (t.done.len(), t.bytes))
    }

    /// Keeps `result` for replays, then restores the bounds, taking only
    /// from `tenant`'s own outcomes.
    pub fn insert(&mut self, tenant: &str, job_id: &str, result: JobResult) {
        let now = Instant::now();
        if now.duration_since(self.swept) > Duration::from_secs(60) {
            self.swept = now;
            let all: Vec<String> = self.tenants.keys().cloned().collect();
            for t in all {
                self.expire(&t, now);
            }
        } else {
            self.expire(tenant, now);
        }
        let bytes = size_of(&result);
        self.seq += 1;
        let seq = self.seq;
        let t = self.tenants.entry(tenant.to_owned()).or_default();
        if let Some(old) = t.done.remove(job_id) {
            t.bytes -= old.bytes;
            self.total -= old.bytes;
        }
        t.done.insert(
            job_id.to_owned(),
            Done {
                result,
                bytes,
                at: now,
                seq,
                full: true,
            },
        );
        t.order.push_back((job_id.to_owned(), seq));
        t.full.push_back((job_id.to_owned(), seq));
        t.bytes += bytes;
        self.total += bytes;
        // Count: the tenant's oldest outcomes go.
        while t.done.len() > self.limits.per_tenant {
            let Some((id, seq)) = t.order.pop_front() else {
                break;
            };
            if t.done.get(&id).is_some_and(|d| d.seq == seq)
                && let Some(d) = t.done.remove(&id)
            {
                t.bytes -= d.bytes;
                self.total -= d.bytes;
            }
        }
        // Bytes: the tenant's oldest output goes, its own bound first, then
        // the shared one (never another tenant's).
        let (tenant_bytes, total_bytes, durable) = (
            self.limits.tenant_bytes,
            self.limits.total_bytes,
            self.durable,
        );
        let mut total = self.total;
        while t.bytes > tenant_bytes || total > total_bytes {
            let Some((id, seq)) = t.full.pop_front() else {
                break;
            };
            let Some(d) = t.done.get_mut(&id).filter(|d| d.seq == seq && d.full) else {
                continue;
            };
            let before = d.bytes;
            if durable {
                t.done.remove(&id);
                t.bytes -= before;
                total -= before;
            } else {
                d.result = slim(&d.result);
                d.full = false;
                d.bytes = size_of(&d.result);
                t.bytes = t.bytes - before + d.bytes;
                total = total - before + d.bytes;
            }
        }
        // Only summaries left and still over the tenant's own bound: its
        // oldest summaries go.
        while t.bytes > tenant_bytes {
            let Some((id, seq)) = t.order.pop_front() else {
                break;
            };
            if t.done.get(&id).is_some_and(|d| d.seq == seq)
                && let Some(d) = t.done.remove(&id)
            {
                t.bytes -= d.bytes;
                total -= d.bytes;
            }
        }
        self.total = total;
    }

    /// Forgets `tenant`'s outcomes older than the lifetime.
    fn expire(&mut self, tenant: &str, now: Instant) {
        let lifetime = self.limits.lifetime;
        let Some(t) = self.tenants.get_mut(tenant) else {
            return;
        };
        while let Some((id, seq)) = t.order.front() {
            match t.done.get(id) {
                Some(d) if d.seq == *seq => {
                    if now.duration_since(d.at) < lifetime {
                        break;
                    }
                    t.bytes -= d.bytes;
                    self.total -= d.bytes;
                    t.done.remove(id);
                }
                // Stale: replaced or evicted already.
                _ => {}
            }
            t.order.pop_front();
        }
        while t
            .full
            .front()
            .is_some_and(|(id, seq)| t.done.get(id).is_none_or(|d| d.seq != *seq || !d.full))
        {
            t.full.pop_front();
        }
        if t.done.is_empty() {
            self.tenants.remove(tenant);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::agent::StepStatus;

    fn result(id: &str, out: usize) -> JobResult {
        JobResult {
            job_id: id.into(),
            status: StepStatus::Ok,
            stdout: "x".repeat(out),
            stderr: String::new(),
            result: None,
            error: None,
            duration_ms: 1,
            truncated: false,
            artifacts: Vec::new(),
            replayed: false,
        }
    }

    fn limits() -> KeepLimits {
        KeepLimits {
            per_tenant: 100,
            tenant_bytes: 10_000,
            total_bytes: 25_000,
            lifetime: Duration::from_secs(3600),
        }
    }

    /// A tenant over its byte bound loses its own oldest output, never
    /// another tenant's; the outcome stays (in memory only), slimmed, so
    /// the id still does not run again.
    #[test]
    fn bytes_bound_takes_the_same_tenants_oldest_output() {
        let mut k = Kept::new(limits(), false);
        k.insert("b", "b1", result("b1", 4_000));
        for i in 0..3 {
            k.insert("a", &format!("a{i}"), result(&format!("a{i}"), 4_000));
        }
        assert!(k.usage("a").1 <= 10_000, "{:?}", k.usage("a"));
        let a0 = k.get("a", "a0").unwrap().clone();
        assert!(a0.stdout.is_empty() && a0.truncated, "slimmed: {a0:?}");
        assert_eq!(k.get("a", "a2").unwrap().stdout.len(), 4_000);
        // b's output is untouched.
        assert_eq!(k.get("b", "b1").unwrap().stdout.len(), 4_000);
        // One result larger than the bound is kept as a summary.
        k.insert("a", "huge", result("huge", 50_000));
        assert!(k.get("a", "huge").unwrap().stdout.is_empty());
        assert!(k.usage("a").1 <= 10_000);
        assert_eq!(k.get("b", "b1").unwrap().stdout.len(), 4_000);
    }

    /// With a durable registry behind it, evicted output is dropped whole.
    #[test]
    fn durable_eviction_drops_the_oldest() {
        let mut k = Kept::new(limits(), true);
        for i in 0..3 {
            k.insert("a", &format!("a{i}"), result(&format!("a{i}"), 4_000));
        }
        assert!(k.get("a", "a0").is_none());
        assert!(k.get("a", "a2").is_some());
    }

    /// The shared bound is restored from the inserting tenant's output only.
    #[test]
    fn total_bound_never_takes_another_tenants_output() {
        let mut k = Kept::new(limits(), false);
        for t in ["a", "b"] {
            for i in 0..2 {
                k.insert(t, &format!("{t}{i}"), result("x", 4_500));
            }
        }
        // 4 x ~4.7 KB = ~19 KB; c's two push the total over 25 KB.
        k.insert("c", "c0", result("c0", 4_500));
        k.insert("c", "c1", result("c1", 4_500));
        assert!(k.total_bytes() <= 25_000, "{}", k.total_bytes());
        for t in ["a", "b"] {
            for i in 0..2 {
                assert_eq!(
                    k.get(t, &format!("{t}{i}")).unwrap().stdout.len(),
                    4_500,
                    "{t}{i}"
                );
            }
        }
        assert!(k.get("c", "c0").unwrap().stdout.is_empty());
    }

    /// One tenant's flood of outcomes (cancel markers) evicts only its own.
    #[test]
    fn count_bound_is_per_tenant() {
        let mut k = Kept::new(
            KeepLimits {
                tenant_bytes: 1 << 20,
                total_bytes: 1 << 24,
                ..limits()
            },
            false,
        );
        k.insert("b", "b-done", result("b-done", 10));
        for i in 0..1_000 {
            k.insert("a", &format!("a{i}"), result("x", 0));
        }
        assert_eq!(k.usage("a").0, 100);
        assert!(k.get("a", "a0").is_none());
        assert!(k.get("a", "a999").is_some());
        assert_eq!(k.get("b", "b-done").unwrap().stdout.len(), 10);
    }

    #[test]
    fn outcomes_expire() {
        let mut k = Kept::new(
            KeepLimits {
                lifetime: Duration::ZERO,
                ..limits()
            },
            false,
        );
        k.insert("a", "a0", result("a0", 10));
        assert!(k.get("a", "a0").is_none());
        assert_eq!(k.total_bytes(), 0);
        assert_eq!(k.usage("a"), (0, 0));
    }
}
