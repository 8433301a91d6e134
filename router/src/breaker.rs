//! A circuit breaker per worker group: after `failures` consecutive failures the group gets no
//! traffic for `cooldown`; then one trial request decides whether it closes again.

use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy)]
pub struct BreakerConfig {
    pub failures: u32,
    pub cooldown: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Debug)]
enum Inner {
    Closed {
        failures: u32,
    },
    Open {
        until: Instant,
    },
    /// One trial is out; nothing else passes until it reports.
    HalfOpen,
}

/// Locked once per request attempt, never per token.
pub struct Breaker {
    cfg: BreakerConfig,
    inner: Mutex<Inner>,
}

impl Breaker {
    pub fn new(cfg: BreakerConfig) -> Self {
        Breaker { cfg, inner: Mutex::new(Inner::Closed { failures: 0 }) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a request may go to the group now (without taking the half-open trial).
    pub fn allows(&self, now: Instant) -> bool {
        match *self.lock() {
            Inner::Closed { .. } => true,
            Inner::Open { until } => now >= until,
            Inner::HalfOpen => false,
        }
    }

    /// Claims passage for one request: false if the breaker is open, or half-open with its trial
    /// already out.
    pub fn try_pass(&self, now: Instant) -> bool {
        let mut inner = self.lock();
        match *inner {
            Inner::Closed { .. } => true,
            Inner::Open { until } if now >= until => {
                *inner = Inner::HalfOpen;
                true
            }
            Inner::Open { .. } | Inner::HalfOpen => false,
        }
    }

    pub fn success(&self) {
        *self.lock() = Inner::Closed { failures: 0 };
    }

    pub fn failure(&self, now: Instant) {
        let mut inner = self.lock();
        *inner = match *inner {
            Inner::Closed { failures } if failures + 1 < self.cfg.failures => Inner::Closed { failures: failures + 1 },
            _ => Inner::Open { until: now + self.cfg.cooldown },
        };
    }

    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            Inner::Closed { .. } => BreakerState::Closed,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen => BreakerState::HalfOpen,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_failures_then_one_trial_decides() {
        let b = Breaker::new(BreakerConfig { failures: 3, cooldown: Duration::from_secs(10) });
        let t0 = Instant::now();
        b.failure(t0);
        b.failure(t0);
        assert!(b.try_pass(t0));
        b.failure(t0);
        assert_eq!(b.state(), BreakerState::Open);
        assert!(!b.try_pass(t0 + Duration::from_secs(9)));
        let later = t0 + Duration::from_secs(10);
        assert!(b.allows(later));
        assert!(b.try_pass(later));
        assert_eq!(b.state(), BreakerState::HalfOpen);
        assert!(!b.try_pass(later), "only one trial while half-open");
        b.failure(later);
        assert_eq!(b.state(), BreakerState::Open);
        let again = later + Duration::from_secs(10);
        assert!(b.try_pass(again));
        b.success();
        assert_eq!(b.state(), BreakerState::Closed);
        // A success resets the count.
        b.failure(again);
        b.failure(again);
        b.success();
        b.failure(again);
        assert_eq!(b.state(), BreakerState::Closed);
    }
}
