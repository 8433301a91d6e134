//! The group with the lowest [`Load::score`](super::Load::score). Ties are broken from a rotating
//! start so that equally loaded groups (an idle cluster, or between Stats reports) share the work
//! instead of the first one taking every request.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Candidate, Policy, RouteRequest};

#[derive(Debug, Default)]
pub struct LeastLoad {
    start: AtomicUsize,
}

impl LeastLoad {
    pub fn new() -> Self {
        Self::default()
    }

    /// The least loaded candidate, moving the tie-break start on by one per call. Shared by the
    /// policies that fall back to least-load.
    pub(crate) fn pick_least(&self, candidates: &[Candidate]) -> usize {
        let n = candidates.len();
        if n <= 1 {
            return 0;
        }
        let start = self.start.fetch_add(1, Ordering::Relaxed) % n;
        least_loaded_from(candidates, start)
    }
}

/// Lowest score scanning from `start` (wrapping); the first one seen wins ties.
pub(crate) fn least_loaded_from(candidates: &[Candidate], start: usize) -> usize {
    let n = candidates.len();
    let mut best = start.checked_rem(n).unwrap_or(0);
    let mut best_score = usize::MAX;
    for i in 0..n {
        let idx = (start % n + i) % n;
        let score = candidates[idx].load.score();
        if score < best_score {
            best = idx;
            best_score = score;
        }
    }
    best
}

impl Policy for LeastLoad {
    fn name(&self) -> &'static str {
        "least-load"
    }

    fn pick(&self, _request: &RouteRequest<'_>, candidates: &[Candidate]) -> usize {
        self.pick_least(candidates)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_util::candidates;

    const REQ: RouteRequest<'static> = RouteRequest { tokens: &[], session_key: None };

    #[test]
    fn picks_the_lowest() {
        let ll = LeastLoad::new();
        let cands = candidates(&[7, 3, 9, 4]);
        for _ in 0..10 {
            assert_eq!(ll.pick(&REQ, &cands), 1);
        }
    }

    #[test]
    fn rotates_between_ties() {
        let ll = LeastLoad::new();
        let cands = candidates(&[2, 0, 5, 0, 0]);
        let mut counts = [0usize; 5];
        for _ in 0..300 {
            counts[ll.pick(&REQ, &cands)] += 1;
        }
        assert_eq!(counts[0] + counts[2], 0);
        // Five starts spread over three tied groups: each gets at least one start in five.
        for tied in [1, 3, 4] {
            assert!(counts[tied] >= 60, "{counts:?}");
        }
    }

    #[test]
    fn single_and_empty() {
        let ll = LeastLoad::new();
        assert_eq!(ll.pick(&REQ, &candidates(&[4])), 0);
        assert_eq!(ll.pick(&REQ, &[]), 0);
    }
}
