//! Each request to the next group in turn, blind to load and prompt.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Candidate, Policy, RouteRequest};

#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    pub fn new() -> Self {
        Self::default()
    }
}

impl Policy for RoundRobin {
    fn name(&self) -> &'static str {
        "round-robin"
    }

    fn pick(&self, _request: &RouteRequest<'_>, candidates: &[Candidate]) -> usize {
        // The counter wraps at usize::MAX; the one uneven step there does not matter.
        self.next.fetch_add(1, Ordering::Relaxed).checked_rem(candidates.len()).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_util::candidates;

    #[test]
    fn cycles_through_candidates() {
        let rr = RoundRobin::new();
        let cands = candidates(&[5, 0, 9]);
        let req = RouteRequest { tokens: &[], session_key: None };
        let picks: Vec<usize> = (0..7).map(|_| rr.pick(&req, &cands)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2, 0]);
    }

    #[test]
    fn empty_candidates_do_not_panic() {
        let req = RouteRequest { tokens: &[], session_key: None };
        assert_eq!(RoundRobin::new().pick(&req, &[]), 0);
    }
}
