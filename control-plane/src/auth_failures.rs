//! Failed authentications, counted per source and audited in aggregate.
//!
//! Every refused credential used to write one audit row, so an
//! unauthenticated flood grew the append-only log without bound. Now, per
//! source (the peer address, or the last `X-Forwarded-For` hop when
//! `AUTH_FAILURE_TRUST_FORWARDED=true`) and per window
//! (`AUTH_FAILURE_WINDOW`):
//! - the first failure is audited at once (`auth.failure`, as before);
//! - the rest are counted in memory and written as one
//!   `auth.failure.aggregate` event (count, first and last reason) when the
//!   window closes;
//! - past `AUTH_FAILURE_MAX_PER_WINDOW` failures a bad token from the
//!   source gets 429 `rate_limited` with `Retry-After` instead of 401. A
//!   valid token is always let through: behind a proxy many callers share
//!   one source, and a flood of bad tokens must not lock them out.
//!
//! At most [`MAX_SOURCES`] sources are tracked per window; failures from
//! sources beyond that share one overflow entry (`source: "*"`), so the
//! memory and the audit rows per window are bounded whatever the flood.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::audit::{AuditEvent, AuditLog};

/// Sources tracked per window before they share the overflow entry.
pub const MAX_SOURCES: usize = 10_000;
/// The overflow entry's source.
pub const OVERFLOW: &str = "*";

#[derive(Debug, Clone)]
struct Entry {
    /// Failures in this window, the audited first one included.
    count: u64,
    first_reason: String,
    last_reason: String,
    last_path: String,
}

#[derive(Debug)]
struct Window {
    started: Instant,
    sources: HashMap<String, Entry>,
}

/// Whether a source is over its allowance of failures in this window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admit {
    /// Within its allowance: a failure is a 401.
    Yes,
    /// Too many failures from this source in this window: a failure is a
    /// 429, retry after this long.
    Throttled(Duration),
}

/// Whether a failure should be audited on its own (the window's first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Noted {
    AuditNow,
    Counted,
}

/// The failure counters of one control-plane replica.
#[derive(Debug)]
pub struct AuthFailures {
    window: Duration,
    max_per_window: u64,
    state: Mutex<Window>,
}

impl AuthFailures {
    pub fn new(window: Duration, max_per_window: u64) -> AuthFailures {
        AuthFailures {
            window,
            max_per_window,
            state: Mutex::new(Window {
                started: Instant::now(),
                sources: HashMap::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Window> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a source's next failure is answered 429 (it is over its allowance).
    pub fn admit(&self, source: &str) -> Admit {
        let w = self.lock();
        let over = w
            .sources
            .get(source)
            .is_some_and(|e| e.count >= self.max_per_window);
        if over {
            Admit::Throttled(
                self.window
                    .saturating_sub(w.started.elapsed())
                    .max(Duration::from_secs(1)),
            )
        } else {
            Admit::Yes
        }
    }

    /// Counts a failure; the window's first from a source is audited now.
    pub fn note(&self, source: &str, path: &str, reason: &str) -> Noted {
        let mut w = self.lock();
        let key = if w.sources.contains_key(source) || w.sources.len() < MAX_SOURCES {
            source
        } else {
            OVERFLOW
        };
        match w.sources.get_mut(key) {
            Some(e) => {
                e.count += 1;
                e.last_reason = reason.to_owned();
                e.last_path = path.to_owned();
                Noted::Counted
            }
            None => {
                w.sources.insert(
                    key.to_owned(),
                    Entry {
                        count: 1,
                        first_reason: reason.to_owned(),
                        last_reason: reason.to_owned(),
                        last_path: path.to_owned(),
                    },
                );
                Noted::AuditNow
            }
        }
    }

    /// Closes the window if it is over: the aggregated events to write
    /// (one per source that failed more than once).
    pub fn roll(&self) -> Vec<AuditEvent> {
        if self.lock().started.elapsed() < self.window {
            return Vec::new();
        }
        self.close()
    }

    /// Closes the current window now (at shutdown: nothing counted is
    /// lost): its aggregated events.
    pub fn close(&self) -> Vec<AuditEvent> {
        let mut w = self.lock();
        let seconds = self.window.as_secs();
        let sources = std::mem::take(&mut w.sources);
        w.started = Instant::now();
        drop(w);
        let mut events: Vec<AuditEvent> = sources
            .into_iter()
            .filter(|(_, e)| e.count > 1)
            .map(|(source, e)| AuditEvent {
                tenant: "-".into(),
                actor: "anonymous".into(),
                action: "auth.failure.aggregate".into(),
                resource: e.last_path,
                outcome: "refused".into(),
                bypass: false,
                details: json!({
                    "source": source,
                    "failures": e.count,
                    "notAuditedSeparately": e.count - 1,
                    "windowSeconds": seconds,
                    "firstReason": e.first_reason,
                    "lastReason": e.last_reason,
                }),
            })
            .collect();
        events.sort_by_key(|e| e.details.to_string());
        events
    }

    /// Writes the closed windows' aggregates until `stop` (every tenth of
    /// a window), then those of the window still open.
    pub async fn run(
        self: std::sync::Arc<Self>,
        audit: AuditLog,
        stop: tokio_util::sync::CancellationToken,
    ) {
        let tick = (self.window / 10).max(Duration::from_millis(100));
        loop {
            let stopping = tokio::select! {
                _ = stop.cancelled() => true,
                _ = tokio::time::sleep(tick) => false,
            };
            let events = if stopping { self.close() } else { self.roll() };
            for ev in events {
                if let Err(e) = audit.record(ev).await {
                    tracing::warn!(error = %e.message, "could not write an auth.failure.aggregate event");
                }
            }
            if stopping {
                break;
            }
        }
    }
}

/// The source of a request: the last `X-Forwarded-For` hop when the
/// deployment trusts its proxy (the proxy appends the real peer), else the
/// peer address; `unknown` when neither is known.
pub fn source_of(
    headers: &axum::http::HeaderMap,
    peer: Option<std::net::SocketAddr>,
    trust_forwarded: bool,
) -> String {
    if trust_forwarded
        && let Some(hop) = headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .and_then(|h| h.trim().parse::<IpAddr>().ok())
    {
        return hop.to_string();
    }
    peer.map_or_else(|| "unknown".to_owned(), |p| p.ip().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_is_audited_the_rest_counted_then_throttled() {
        let f = AuthFailures::new(Duration::from_secs(60), 3);
        assert_eq!(f.admit("10.0.0.1"), Admit::Yes);
        assert_eq!(f.note("10.0.0.1", "/v1/jobs", "bad"), Noted::AuditNow);
        assert_eq!(f.note("10.0.0.1", "/v1/jobs", "bad"), Noted::Counted);
        assert_eq!(f.admit("10.0.0.1"), Admit::Yes);
        assert_eq!(f.note("10.0.0.1", "/v1/jobs", "expired"), Noted::Counted);
        assert!(matches!(f.admit("10.0.0.1"), Admit::Throttled(d) if d > Duration::ZERO));
        // Another source is untouched.
        assert_eq!(f.admit("10.0.0.2"), Admit::Yes);
        assert_eq!(f.note("10.0.0.2", "/v1/jobs", "bad"), Noted::AuditNow);
        assert!(f.roll().is_empty(), "the window is still open");
    }

    #[test]
    fn a_closed_window_gives_one_aggregate_per_repeating_source() {
        let f = AuthFailures::new(Duration::from_millis(1), 1000);
        for _ in 0..50 {
            f.note("10.0.0.1", "/v1/jobs", "bad signature");
        }
        f.note("10.0.0.2", "/v1/sessions", "missing bearer token");
        std::thread::sleep(Duration::from_millis(5));
        let events = f.roll();
        assert_eq!(events.len(), 1, "a single failure was already audited");
        assert_eq!(events[0].action, "auth.failure.aggregate");
        assert_eq!(events[0].details["failures"], 50);
        assert_eq!(events[0].details["notAuditedSeparately"], 49);
        assert_eq!(events[0].details["source"], "10.0.0.1");
        // The next window starts empty.
        assert_eq!(f.note("10.0.0.1", "/v1/jobs", "bad"), Noted::AuditNow);
        // Closing early (shutdown) loses nothing counted.
        f.note("10.0.0.1", "/v1/jobs", "bad");
        let closed = f.close();
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].details["failures"], 2);
    }

    #[test]
    fn sources_beyond_the_cap_share_the_overflow_entry() {
        let f = AuthFailures::new(Duration::from_secs(60), u64::MAX);
        for i in 0..MAX_SOURCES + 500 {
            f.note(&format!("src-{i}"), "/", "bad");
        }
        let w = f.lock();
        assert_eq!(w.sources.len(), MAX_SOURCES + 1);
        assert_eq!(w.sources[OVERFLOW].count, 499 + 1);
    }

    #[test]
    fn forwarded_is_used_only_when_trusted() {
        let mut h = axum::http::HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            "1.2.3.4, 10.9.8.7".parse().expect("header"),
        );
        let peer = Some("127.0.0.1:5000".parse().expect("addr"));
        assert_eq!(source_of(&h, peer, false), "127.0.0.1");
        assert_eq!(source_of(&h, peer, true), "10.9.8.7");
        h.insert("x-forwarded-for", "not-an-ip".parse().expect("header"));
        assert_eq!(source_of(&h, peer, true), "127.0.0.1");
        assert_eq!(
            source_of(&axum::http::HeaderMap::new(), None, false),
            "unknown"
        );
    }
}
