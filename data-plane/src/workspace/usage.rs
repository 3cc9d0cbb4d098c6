//! Stored artifact bytes per tenant, for the quota (issue 19 §3).
//!
//! The store's metadata records are the truth: a tenant's usage is the sum
//! of its records' sizes, counted by a scan on first use and again once the
//! count is older than [`RECOUNT_AFTER`] (so replicas sharing one bucket
//! converge) or a deletion made it stale. Between scans this replica adds
//! what it stores. An upload reserves its bytes chunk by chunk before they
//! are written, so concurrent uploads of one tenant on one replica can never
//! pass the quota together; across replicas the overshoot is bounded by
//! what the others store within one recount period.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A count older than this is taken again before the next upload.
pub const RECOUNT_AFTER: Duration = Duration::from_secs(60);

/// Tenants whose counts are kept; past it, idle ones are forgotten.
const MAX_TRACKED: usize = 10_000;

#[derive(Debug)]
struct Entry {
    /// Bytes in finished artifacts, as of `counted_at` plus what this
    /// replica stored since; `None` until the first scan.
    stored: Option<u64>,
    counted_at: Instant,
    /// Bytes of uploads in flight.
    reserved: u64,
}

/// Why a reservation was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverQuota {
    pub max: u64,
    pub used: u64,
}

/// The per-tenant counts of one store.
#[derive(Debug, Default)]
pub struct UsageBook {
    tenants: Mutex<HashMap<String, Entry>>,
}

impl UsageBook {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.tenants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// True when the tenant's count must be taken (again) by a scan.
    pub fn needs_count(&self, tenant: &str) -> bool {
        self.lock()
            .get(tenant)
            .is_none_or(|e| e.stored.is_none() || e.counted_at.elapsed() >= RECOUNT_AFTER)
    }

    /// Records a scan's total (taken while `reserved` uploads were in flight:
    /// those are not in the scan, they are added when they finish).
    pub fn set_count(&self, tenant: &str, stored: u64) {
        let mut map = self.lock();
        if map.len() >= MAX_TRACKED && !map.contains_key(tenant) {
            map.retain(|_, e| e.reserved > 0);
        }
        let e = map.entry(tenant.to_owned()).or_insert(Entry {
            stored: None,
            counted_at: Instant::now(),
            reserved: 0,
        });
        e.stored = Some(stored);
        e.counted_at = Instant::now();
    }

    /// Reserves `n` more bytes of an upload under `max`.
    pub fn reserve(&self, tenant: &str, n: u64, max: u64) -> Result<(), OverQuota> {
        let mut map = self.lock();
        let e = map.entry(tenant.to_owned()).or_insert(Entry {
            stored: None,
            counted_at: Instant::now(),
            reserved: 0,
        });
        let used = e.stored.unwrap_or(0).saturating_add(e.reserved);
        if used.saturating_add(n) > max {
            return Err(OverQuota { max, used });
        }
        e.reserved += n;
        Ok(())
    }

    /// An upload ended: its reservation is released, and when it was kept
    /// its bytes join the stored count.
    pub fn finish(&self, tenant: &str, reserved: u64, kept: bool) {
        let mut map = self.lock();
        if let Some(e) = map.get_mut(tenant) {
            e.reserved = e.reserved.saturating_sub(reserved);
            if kept && let Some(s) = e.stored.as_mut() {
                *s = s.saturating_add(reserved);
            }
        }
    }

    /// Something of the tenant's was deleted: the next upload counts again.
    pub fn stale(&self, tenant: &str) {
        if let Some(e) = self.lock().get_mut(tenant) {
            e.stored = None;
        }
    }

    /// Bytes this book holds for the tenant (stored + in flight).
    pub fn used(&self, tenant: &str) -> u64 {
        self.lock()
            .get(tenant)
            .map_or(0, |e| e.stored.unwrap_or(0).saturating_add(e.reserved))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_add_up_under_the_quota() {
        let b = UsageBook::default();
        b.set_count("acme", 400);
        b.reserve("acme", 500, 1000).unwrap();
        // 400 stored + 500 in flight: 101 more would pass 1000.
        assert_eq!(
            b.reserve("acme", 101, 1000),
            Err(OverQuota {
                max: 1000,
                used: 900
            })
        );
        b.reserve("acme", 100, 1000).unwrap();
        // Another tenant has its own count.
        b.reserve("other", 1000, 1000).unwrap();
        // The 500 upload failed: its bytes are free again, not stored.
        b.finish("acme", 500, false);
        assert_eq!(b.used("acme"), 500);
        // The 100 one was kept.
        b.finish("acme", 100, true);
        assert_eq!(b.used("acme"), 500);
        b.reserve("acme", 500, 1000).unwrap();
        assert!(b.reserve("acme", 1, 1000).is_err());
    }

    #[test]
    fn a_deletion_makes_the_count_stale() {
        let b = UsageBook::default();
        assert!(b.needs_count("acme"));
        b.set_count("acme", 10);
        assert!(!b.needs_count("acme"));
        b.stale("acme");
        assert!(b.needs_count("acme"));
    }
}
