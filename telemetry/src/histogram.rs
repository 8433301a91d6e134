//! A histogram whose `observe` is a few atomic adds: prometheus-client's own takes a lock per
//! observation, which per-token latency (inter-token latency is observed once per token) must not.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

#[derive(Debug)]
struct Inner {
    /// Upper bounds, ascending; +Inf is implicit.
    bounds: Vec<f64>,
    /// Non-cumulative counts per bucket, the last one for +Inf.
    counts: Vec<AtomicU64>,
    /// f64 bits of the sum.
    sum: AtomicU64,
}

/// Cheap to clone (shared); register a clone, observe through another.
#[derive(Debug, Clone)]
pub struct AtomicHistogram(Arc<Inner>);

impl AtomicHistogram {
    pub fn new(bounds: impl IntoIterator<Item = f64>) -> Self {
        let mut bounds: Vec<f64> = bounds.into_iter().filter(|b| b.is_finite()).collect();
        bounds.sort_by(f64::total_cmp);
        bounds.dedup();
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        AtomicHistogram(Arc::new(Inner { bounds, counts, sum: AtomicU64::new(0f64.to_bits()) }))
    }

    pub fn observe(&self, v: f64) {
        let i = self.0.bounds.partition_point(|&b| b < v);
        self.0.counts[i].fetch_add(1, Ordering::Relaxed);
        let mut cur = self.0.sum.load(Ordering::Relaxed);
        loop {
            let next = (f64::from_bits(cur) + v).to_bits();
            match self.0.sum.compare_exchange_weak(cur, next, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
    }

    /// (sum, count, cumulative buckets ending with +Inf).
    pub fn snapshot(&self) -> (f64, u64, Vec<(f64, u64)>) {
        let mut total = 0;
        let mut buckets = Vec::with_capacity(self.0.counts.len());
        for (i, c) in self.0.counts.iter().enumerate() {
            total += c.load(Ordering::Relaxed);
            // prometheus-client prints an upper bound of f64::MAX as `+Inf`.
            buckets.push((self.0.bounds.get(i).copied().unwrap_or(f64::MAX), total));
        }
        (f64::from_bits(self.0.sum.load(Ordering::Relaxed)), total, buckets)
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let (sum, count, buckets) = self.snapshot();
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// Buckets for latencies from 1 ms to ~1 min.
pub fn latency_buckets() -> Vec<f64> {
    vec![0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_sum_adds_up() {
        let h = AtomicHistogram::new([1.0, 0.1, 10.0]);
        for v in [0.05, 0.1, 0.5, 2.0, 20.0] {
            h.observe(v);
        }
        let (sum, count, buckets) = h.snapshot();
        assert_eq!(count, 5);
        assert!((sum - 22.65).abs() < 1e-9);
        assert_eq!(buckets, vec![(0.1, 2), (1.0, 3), (10.0, 4), (f64::MAX, 5)]);
        let clone = h.clone();
        clone.observe(0.0);
        assert_eq!(h.snapshot().1, 6);
    }
}
