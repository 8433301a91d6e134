//! Power of two choices: sample two distinct groups at random and take the less loaded. Nearly as
//! balanced as least-load, but replicas acting on the same stale loads do not all pile onto the
//! one group that looked idlest.

use std::sync::Mutex;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{Candidate, Policy, RouteRequest};

#[derive(Debug, Default)]
pub struct PowerOfTwo {
    /// A fixed sequence of draws (tests); `None` draws from the thread's generator.
    seeded: Option<Mutex<StdRng>>,
}

impl PowerOfTwo {
    pub fn new() -> Self {
        PowerOfTwo { seeded: None }
    }

    /// Draws from a generator seeded with `seed`: the same picks on every run.
    pub fn with_seed(seed: u64) -> Self {
        PowerOfTwo { seeded: Some(Mutex::new(StdRng::seed_from_u64(seed))) }
    }

    fn two_of(&self, n: usize) -> (usize, usize) {
        let draw = |rng: &mut dyn rand::RngCore| {
            let a = rng.random_range(0..n);
            // Draw from the n - 1 others and skip over `a`, so the two are distinct without retrying.
            let b = rng.random_range(0..n - 1);
            (a, if b >= a { b + 1 } else { b })
        };
        match &self.seeded {
            Some(rng) => draw(&mut *rng.lock().unwrap_or_else(|p| p.into_inner())),
            None => draw(&mut rand::rng()),
        }
    }
}

impl Policy for PowerOfTwo {
    fn name(&self) -> &'static str {
        "power-of-two"
    }

    fn pick(&self, _request: &RouteRequest<'_>, candidates: &[Candidate]) -> usize {
        let n = candidates.len();
        if n <= 1 {
            return 0;
        }
        let (a, b) = self.two_of(n);
        if candidates[b].load.score() < candidates[a].load.score() {
            b
        } else {
            a
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_util::candidates;

    const REQ: RouteRequest<'static> = RouteRequest { tokens: &[], session_key: None };

    #[test]
    fn heaviest_is_rarely_chosen() {
        let p2c = PowerOfTwo::with_seed(1);
        let cands = candidates(&[3, 10, 4]);
        let mut counts = [0usize; 3];
        let rounds = 3000;
        for _ in 0..rounds {
            counts[p2c.pick(&REQ, &cands)] += 1;
        }
        // The heaviest always loses its comparison; the lightest wins every pair it is in (2/3).
        assert!(counts[1] < rounds / 20, "{counts:?}");
        assert!(counts[0] > rounds / 2, "{counts:?}");
        assert!(counts[2] > rounds / 6, "{counts:?}");
    }

    #[test]
    fn equal_loads_use_every_group() {
        let p2c = PowerOfTwo::with_seed(2);
        let cands = candidates(&[1, 1, 1, 1]);
        let mut counts = [0usize; 4];
        for _ in 0..2000 {
            counts[p2c.pick(&REQ, &cands)] += 1;
        }
        assert!(counts.iter().all(|&c| c > 300), "{counts:?}");
    }

    #[test]
    fn single_and_empty() {
        let p2c = PowerOfTwo::new();
        assert_eq!(p2c.pick(&REQ, &candidates(&[4])), 0);
        assert_eq!(p2c.pick(&REQ, &[]), 0);
    }
}
