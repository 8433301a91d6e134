//! Backpressure: at most `max_in_flight` requests run at once and at most `max_queued` wait for
//! a slot; beyond that a request is refused at once (RESOURCE_EXHAUSTED / HTTP 429 with
//! Retry-After) instead of piling up.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::error::{Result, RouterError};

#[derive(Debug, Clone, Copy)]
pub struct AdmissionConfig {
    pub max_in_flight: usize,
    pub max_queued: usize,
    pub retry_after: Duration,
}

pub struct Admission {
    cfg: AdmissionConfig,
    slots: Arc<Semaphore>,
    queued: AtomicUsize,
}

/// A running request's slot; freed on drop.
pub struct Slot(#[allow(dead_code)] OwnedSemaphorePermit);

impl Admission {
    pub fn new(cfg: AdmissionConfig) -> Self {
        Admission { cfg, slots: Arc::new(Semaphore::new(cfg.max_in_flight)), queued: AtomicUsize::new(0) }
    }

    pub async fn admit(&self) -> Result<Slot> {
        if let Ok(p) = self.slots.clone().try_acquire_owned() {
            return Ok(Slot(p));
        }
        let queued = self.queued.fetch_add(1, Ordering::SeqCst);
        let _unqueue = scopeguard(|| {
            self.queued.fetch_sub(1, Ordering::SeqCst);
        });
        if queued >= self.cfg.max_queued {
            return Err(RouterError::Overloaded { retry_after: self.cfg.retry_after });
        }
        let permit = self.slots.clone().acquire_owned().await.map_err(|_| RouterError::Internal("closed".into()))?;
        Ok(Slot(permit))
    }

    pub fn in_flight(&self) -> usize {
        self.cfg.max_in_flight - self.slots.available_permits()
    }

    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::SeqCst)
    }
}

struct Guard<F: FnMut()>(F);
impl<F: FnMut()> Drop for Guard<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}
fn scopeguard<F: FnMut()>(f: F) -> Guard<F> {
    Guard(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn queue_then_refuse() {
        let a = Arc::new(Admission::new(AdmissionConfig {
            max_in_flight: 1,
            max_queued: 1,
            retry_after: Duration::from_secs(2),
        }));
        let first = a.admit().await.unwrap();
        let a2 = a.clone();
        let waiter = tokio::spawn(async move { a2.admit().await.map(|_| ()) });
        while a.queued() == 0 {
            tokio::task::yield_now().await;
        }
        let refused = a.admit().await.err().unwrap();
        assert!(matches!(refused, RouterError::Overloaded { retry_after } if retry_after == Duration::from_secs(2)));
        drop(first);
        waiter.await.unwrap().unwrap();
        assert_eq!(a.queued(), 0);
        assert_eq!(a.in_flight(), 0);
    }
}
