//! Per-tenant cap on requests that hold a connection open while waiting:
//! long polls (`GET /v1/jobs/{id}?waitMs=`) and event streams (steps with
//! `Accept: text/event-stream`). One tenant's hundreds of pollers would
//! otherwise hold the replica's CPU and connections (issue 15, section 6).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde_json::json;
use shared::CodedError;
use shared::ErrorCode;

/// Open waiters per tenant in this replica.
pub struct Waiters {
    max: usize,
    open: Mutex<HashMap<String, usize>>,
}

/// One open waiter; dropping it (the response ends) frees the slot.
pub struct WaiterGuard {
    waiters: Arc<Waiters>,
    tenant: String,
}

impl Waiters {
    /// At most `max` open waiters per tenant (`TENANT_MAX_WAITERS`).
    pub fn new(max: usize) -> Arc<Waiters> {
        Arc::new(Waiters {
            max,
            open: Mutex::default(),
        })
    }

    /// Takes a slot for `tenant`, or 429 `tenant_quota_exceeded`.
    pub fn enter(self: &Arc<Self>, tenant: &str) -> Result<WaiterGuard, CodedError> {
        let mut open = self
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = open.entry(tenant.to_owned()).or_default();
        if *n >= self.max {
            return Err(CodedError::new(
                ErrorCode::TenantQuotaExceeded,
                format!(
                    "the tenant already holds {} long polls or event streams open, at most {}; retry later",
                    *n, self.max
                ),
            )
            .with_details(json!({"limit": "waiters", "max": self.max})));
        }
        *n += 1;
        Ok(WaiterGuard {
            waiters: self.clone(),
            tenant: tenant.to_owned(),
        })
    }

    /// Open waiters of `tenant` now.
    pub fn open(&self, tenant: &str) -> usize {
        self.open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(tenant)
            .copied()
            .unwrap_or(0)
    }
}

impl Drop for WaiterGuard {
    fn drop(&mut self) {
        let mut open = self
            .waiters
            .open
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.tenant);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_tenant_is_capped_and_others_are_not() {
        let w = Waiters::new(2);
        let a = w.enter("acme").unwrap();
        let _b = w.enter("acme").unwrap();
        assert_eq!(
            w.enter("acme").err().unwrap().code,
            ErrorCode::TenantQuotaExceeded
        );
        let _c = w.enter("globex").unwrap();
        drop(a);
        let _d = w.enter("acme").unwrap();
        assert_eq!(w.open("acme"), 2);
    }
}
