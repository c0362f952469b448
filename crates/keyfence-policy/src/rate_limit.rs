//! A lock-free per-key rate limiter (GCRA: one atomic "theoretical arrival time").
//!
//! Time is passed in, so the limiter stays pure and testable. Limits are per replica: a fleet of
//! N replicas admits up to N times the rate, which is stated in the README.

use std::sync::atomic::{AtomicI64, Ordering};

use super::model::RateLimit;

pub struct RateLimiter {
    limit: RateLimit,
    /// Nanoseconds between two requests at the sustained rate.
    interval_nanos: i64,
    /// How far ahead of now the theoretical arrival time may run: burst × interval.
    tolerance_nanos: i64,
    theoretical_arrival_nanos: AtomicI64,
}

impl RateLimiter {
    /// `None` when the limit admits everything (0 requests per second).
    pub fn new(limit: RateLimit) -> Option<RateLimiter> {
        if limit.requests_per_second == 0 {
            return None;
        }
        let burst = if limit.burst == 0 {
            limit.requests_per_second
        } else {
            limit.burst
        };
        let interval_nanos = 1_000_000_000 / i64::from(limit.requests_per_second);
        Some(RateLimiter {
            limit,
            interval_nanos,
            tolerance_nanos: interval_nanos * i64::from(burst),
            theoretical_arrival_nanos: AtomicI64::new(i64::MIN),
        })
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Whether a request at `now_nanos` fits; when `consume`, it also takes its place.
    pub fn admit(&self, now_nanos: i64, consume: bool) -> bool {
        let mut current = self.theoretical_arrival_nanos.load(Ordering::Relaxed);
        loop {
            let next = current.max(now_nanos).saturating_add(self.interval_nanos);
            if next - now_nanos > self.tolerance_nanos {
                return false;
            }
            if !consume {
                return true;
            }
            match self.theoretical_arrival_nanos.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }

    /// Gives back the place an admitted request took, when that request was refused after all
    /// (its nonce was replayed, or could not be checked): a refused request costs no budget.
    pub fn refund(&self) {
        self.theoretical_arrival_nanos
            .fetch_sub(self.interval_nanos, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: i64 = 1_000_000_000;

    #[test]
    fn admits_burst_then_the_sustained_rate() {
        let limiter = RateLimiter::new(RateLimit {
            requests_per_second: 10,
            burst: 3,
        })
        .unwrap();
        let t0 = 1_700_000_000 * SECOND;
        assert!(limiter.admit(t0, true));
        assert!(limiter.admit(t0, true));
        assert!(limiter.admit(t0, true));
        assert!(!limiter.admit(t0, true));
        // A dry run answers without taking a place.
        assert!(!limiter.admit(t0, false));
        assert!(limiter.admit(t0 + SECOND / 10, false));
        assert!(limiter.admit(t0 + SECOND / 10, true));
        assert!(!limiter.admit(t0 + SECOND / 10, true));
        // After a quiet second the full burst is back.
        let later = t0 + 2 * SECOND;
        assert!((0..3).all(|_| limiter.admit(later, true)));
        assert!(!limiter.admit(later, true));
    }

    #[test]
    fn a_refund_gives_the_place_back() {
        let limiter = RateLimiter::new(RateLimit {
            requests_per_second: 1,
            burst: 1,
        })
        .unwrap();
        let t0 = 1_700_000_000 * SECOND;
        assert!(limiter.admit(t0, true));
        assert!(!limiter.admit(t0, true));
        limiter.refund();
        assert!(limiter.admit(t0, true));
        assert!(!limiter.admit(t0, true));
    }

    #[test]
    fn zero_rate_means_unlimited() {
        assert!(
            RateLimiter::new(RateLimit {
                requests_per_second: 0,
                burst: 0
            })
            .is_none()
        );
    }
}
