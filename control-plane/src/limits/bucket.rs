//! The token bucket, as GCRA (the generic cell rate algorithm): a bucket of
//! `burst` tokens refilled at `per_minute`, stored as one number per key,
//! the "theoretical arrival time" (TAT) after which the bucket is full
//! again. One function holds the arithmetic; the in-process store calls it
//! and the Redis script ([`super::store::BUCKET_LUA`]) is its line-by-line
//! twin, so both stores answer alike (a unit test pins the cases).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// A sustained rate and a bucket size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Tokens added per minute; never 0 (a limit that is off has no `Rate`).
    pub per_minute: u32,
    /// Tokens the bucket holds (requests that may come at once); at least 1.
    pub burst: u32,
}

impl Rate {
    /// A rate, or `None` when `per_minute` is 0 (the limit is off).
    pub fn new(per_minute: u32, burst: u32) -> Option<Rate> {
        (per_minute > 0).then_some(Rate {
            per_minute,
            burst: burst.max(1),
        })
    }

    /// Microseconds between two tokens.
    pub fn interval_us(&self) -> u64 {
        (60_000_000 / u64::from(self.per_minute)).max(1)
    }
}

/// What a bucket answered to one request (all times in microseconds).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    /// Tokens left after this request.
    pub remaining: u32,
    /// When refused: how long until one token is back.
    pub retry_after_us: u64,
    /// How long until the bucket is full again.
    pub reset_us: u64,
}

/// One request against a bucket whose stored TAT is `stored` (`None`: never
/// used or expired) at time `now`. Returns the verdict and, when allowed,
/// the TAT to store (it may expire `reset_us` from now: an expired key is a
/// full bucket).
pub fn gcra(stored: Option<u64>, now: u64, rate: Rate) -> (Verdict, Option<u64>) {
    // Signed: `allow_at` is before the clock's zero while a young clock
    // (the in-process one starts at 0) has a full bucket.
    let t = i128::from(rate.interval_us());
    let now_i = i128::from(now);
    let tat = i128::from(stored.unwrap_or(now).max(now));
    let new_tat = tat + t;
    let allow_at = new_tat - t * i128::from(rate.burst);
    let us = |d: i128| d.clamp(0, i128::from(u64::MAX)) as u64;
    if now_i < allow_at {
        let v = Verdict {
            allowed: false,
            remaining: 0,
            retry_after_us: us(allow_at - now_i),
            reset_us: us(tat - now_i),
        };
        return (v, None);
    }
    let remaining = ((now_i - allow_at) / t).min(i128::from(rate.burst)) as u32;
    let v = Verdict {
        allowed: true,
        remaining,
        retry_after_us: 0,
        reset_us: us(new_tat - now_i),
    };
    (v, Some(us(new_tat)))
}

/// Buckets in this process (no `REDIS_URL`): one TAT per key, pruned of
/// full buckets when the map grows, so idle tenants cost nothing.
pub struct LocalBuckets {
    epoch: Instant,
    state: Mutex<LocalState>,
}

struct LocalState {
    tats: HashMap<String, u64>,
    prune_at: usize,
}

const PRUNE_FLOOR: usize = 4096;

impl Default for LocalBuckets {
    fn default() -> Self {
        LocalBuckets {
            epoch: Instant::now(),
            state: Mutex::new(LocalState {
                tats: HashMap::new(),
                prune_at: PRUNE_FLOOR,
            }),
        }
    }
}

impl LocalBuckets {
    /// Microseconds since this store was made (a monotonic clock).
    pub fn now_us(&self) -> u64 {
        self.epoch.elapsed().as_micros() as u64
    }

    /// Takes one token from `key`'s bucket, if there is one.
    pub fn take(&self, key: &str, rate: Rate) -> Verdict {
        self.take_at(key, rate, self.now_us())
    }

    /// As [`LocalBuckets::take`] at a given time (tests).
    pub fn take_at(&self, key: &str, rate: Rate, now: u64) -> Verdict {
        let mut s = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let stored = s.tats.get(key).copied().filter(|tat| *tat > now);
        let (verdict, store) = gcra(stored, now, rate);
        if let Some(tat) = store {
            s.tats.insert(key.to_owned(), tat);
            if s.tats.len() > s.prune_at {
                s.tats.retain(|_, tat| *tat > now);
                s.prune_at = (s.tats.len() * 2).max(PRUNE_FLOOR);
            }
        }
        verdict
    }

    /// Keys held (tests).
    pub fn len(&self) -> usize {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .tats
            .len()
    }

    /// True when no bucket is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(per_minute: u32, burst: u32) -> Rate {
        Rate::new(per_minute, burst).expect("a rate above 0")
    }

    #[test]
    fn zero_per_minute_is_off() {
        assert_eq!(Rate::new(0, 10), None);
        assert_eq!(rate(60, 0).burst, 1, "a bucket holds at least one token");
        assert_eq!(rate(60, 5).interval_us(), 1_000_000);
        assert_eq!(rate(600, 5).interval_us(), 100_000);
    }

    #[test]
    fn a_full_bucket_allows_burst_then_refuses() {
        let r = rate(60, 3);
        let now = 1_000_000_000;
        let mut tat = None;
        for left in [2, 1, 0] {
            let (v, stored) = gcra(tat, now, r);
            assert!(v.allowed);
            assert_eq!(v.remaining, left);
            tat = stored;
        }
        let (v, stored) = gcra(tat, now, r);
        assert!(!v.allowed);
        assert_eq!(stored, None, "a refusal stores nothing");
        assert_eq!(v.remaining, 0);
        assert_eq!(v.retry_after_us, 1_000_000, "one token a second");
        assert_eq!(v.reset_us, 3_000_000, "full again after three tokens");
    }

    #[test]
    fn a_young_clock_has_a_full_bucket() {
        // The in-process clock starts at 0: the first requests must still
        // see the whole burst.
        let r = rate(6, 3);
        let (v, _) = gcra(None, 5, r);
        assert!(v.allowed);
        assert_eq!(v.remaining, 2);
    }

    #[test]
    fn tokens_come_back_at_the_rate() {
        let r = rate(60, 2);
        let l = LocalBuckets::default();
        let t0 = 5_000_000;
        assert!(l.take_at("k", r, t0).allowed);
        assert!(l.take_at("k", r, t0).allowed);
        assert!(!l.take_at("k", r, t0).allowed);
        assert!(!l.take_at("k", r, t0 + 999_999).allowed);
        let v = l.take_at("k", r, t0 + 1_000_000);
        assert!(v.allowed, "one token back after a second");
        assert_eq!(v.remaining, 0);
        // After a long idle time the bucket is full, never fuller.
        let v = l.take_at("k", r, t0 + 3_600_000_000);
        assert!(v.allowed);
        assert_eq!(v.remaining, 1);
    }

    #[test]
    fn keys_are_independent() {
        let r = rate(1, 1);
        let l = LocalBuckets::default();
        assert!(l.take_at("a", r, 10).allowed);
        assert!(!l.take_at("a", r, 10).allowed);
        assert!(l.take_at("b", r, 10).allowed);
    }

    #[test]
    fn the_sustained_rate_holds() {
        // 120/min with a burst of 10, hammered every 10 ms for a minute:
        // the burst plus one token every 500 ms.
        let r = rate(120, 10);
        let l = LocalBuckets::default();
        let allowed = (0..6000u64)
            .filter(|i| l.take_at("k", r, 1 + i * 10_000).allowed)
            .count();
        assert!((129..=131).contains(&allowed), "{allowed}");
    }

    #[test]
    fn full_buckets_are_pruned() {
        let r = rate(60_000, 1);
        let l = LocalBuckets::default();
        for i in 0..(PRUNE_FLOOR as u64 + 10) {
            // Each key's bucket is full again 1 ms after its use.
            l.take_at(&format!("k{i}"), r, i * 1_000);
        }
        assert!(l.len() < 100, "{} keys held", l.len());
    }
}
