//! Session affinity by consistent hashing with bounded loads (Mirrokni, Thorup, Zadimoghaddam,
//! "Consistent Hashing with Bounded Loads", 2018).
//!
//! Each group owns [`VNODES`] points on a 64-bit ring. A request's session key hashes to a point;
//! walking clockwise, it goes to the first group whose load stays within capacity after taking it:
//! `score + 1 <= ceil((Σ scores + 1) / n × load_factor)`, the paper's rule with this request
//! counted in the average. Capacity is at least the average, so some group always qualifies.
//!
//! The hash is an explicit FNV-1a with a fixed finaliser, so every router replica and every build
//! puts keys in the same place; no per-process random seed. Removing a group only moves the keys
//! that were on it (and, under load, the ones it had overflowed onto others). Requests without a
//! key go to the least loaded group.

use std::sync::{Arc, Mutex, MutexGuard};

use super::least_load::LeastLoad;
use super::{Candidate, Policy, RouteRequest};

/// Points per group: enough that each group's share of the ring is within ~15% of fair.
pub const VNODES: u32 = 64;

struct Ring {
    /// Group names in sorted order: the ring depends on the set, not the order candidates come in.
    names: Vec<Arc<str>>,
    /// (position, index into `names`), sorted by position.
    points: Vec<(u64, u32)>,
}

impl Ring {
    fn build(names: Vec<Arc<str>>) -> Ring {
        let mut points: Vec<(u64, u32)> = Vec::with_capacity(names.len() * VNODES as usize);
        for (rank, name) in names.iter().enumerate() {
            for v in 0..VNODES {
                let mut h = fnv1a(FNV_OFFSET, name.as_bytes());
                h = fnv1a(h, &[0xff]);
                h = fnv1a(h, &v.to_le_bytes());
                points.push((fmix64(h), rank as u32));
            }
        }
        // Ties in position (astronomically rare) resolve by name rank, the same everywhere.
        points.sort_unstable();
        Ring { names, points }
    }
}

/// Rings kept at once: one per distinct candidate set, i.e. roughly per served model.
const MAX_RINGS: usize = 16;

pub struct SessionAffinity {
    load_factor: f64,
    /// Built once per candidate set, most recently used last; cloned out so the walk runs
    /// without the lock.
    rings: Mutex<Vec<Arc<Ring>>>,
    least: LeastLoad,
}

impl SessionAffinity {
    pub fn new(load_factor: f64) -> Self {
        // NaN and values below 1 would leave capacity under the average and possibly no group.
        let load_factor = if load_factor >= 1.0 { load_factor } else { 1.0 };
        SessionAffinity { load_factor, rings: Mutex::new(Vec::new()), least: LeastLoad::new() }
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Arc<Ring>>> {
        self.rings.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ring_for(&self, sorted: &[&Arc<str>]) -> Arc<Ring> {
        let mut rings = self.lock();
        let same = |r: &Arc<Ring>| r.names.len() == sorted.len() && r.names.iter().zip(sorted).all(|(a, b)| a == *b);
        if let Some(i) = rings.iter().rposition(same) {
            let ring = rings.remove(i);
            rings.push(ring.clone());
            return ring;
        }
        let ring = Arc::new(Ring::build(sorted.iter().map(|n| Arc::clone(n)).collect()));
        if rings.len() >= MAX_RINGS {
            rings.remove(0);
        }
        rings.push(ring.clone());
        ring
    }
}

impl Policy for SessionAffinity {
    fn name(&self) -> &'static str {
        "session"
    }

    fn pick(&self, request: &RouteRequest<'_>, candidates: &[Candidate]) -> usize {
        let n = candidates.len();
        let Some(key) = request.session_key.filter(|_| n > 1) else {
            return self.least.pick_least(candidates);
        };
        // order[rank] = index into candidates of the rank-th name in sorted order.
        let mut order: Vec<usize> = (0..n).collect();
        order.sort_by(|&a, &b| candidates[a].group.cmp(&candidates[b].group));
        let sorted: Vec<&Arc<str>> = order.iter().map(|&i| &candidates[i].group).collect();
        let ring = self.ring_for(&sorted);

        let total = candidates.iter().fold(0usize, |acc, c| acc.saturating_add(c.load.score()));
        let capacity = ((total as f64 + 1.0) / n as f64 * self.load_factor).ceil();
        let start = ring.points.partition_point(|p| p.0 < fmix64(fnv1a(FNV_OFFSET, key.as_bytes())));
        let len = ring.points.len();
        for step in 0..len {
            let (_, rank) = ring.points[(start + step) % len];
            let Some(&idx) = order.get(rank as usize) else { continue };
            if (candidates[idx].load.score() as f64 + 1.0) <= capacity {
                return idx;
            }
        }
        // Unreachable with load_factor >= 1 (the least loaded group is at most average), but
        // float rounding at huge scores should not decide between routing and giving up.
        self.least.pick_least(candidates)
    }

    fn remove_group(&self, group: &str) {
        // Rings are keyed by their candidate set, so one with the group would never match again.
        self.lock().retain(|r| r.names.iter().all(|n| &**n != group));
    }
}

const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

fn fnv1a(mut h: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(FNV_PRIME);
    }
    h
}

/// MurmurHash3's finaliser: FNV-1a alone barely changes the high bits for keys differing in their
/// last bytes ("user-1", "user-2"), which would bunch such keys and a group's points on the ring.
fn fmix64(mut h: u64) -> u64 {
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::test_util::candidates;

    fn route(p: &SessionAffinity, key: Option<&str>, cands: &[Candidate]) -> usize {
        p.pick(&RouteRequest { tokens: &[1, 2, 3], session_key: key }, cands)
    }

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("user-{i}")).collect()
    }

    #[test]
    fn hash_is_fixed() {
        // Pinned so a change that would remap every session across a rolling upgrade is noticed.
        assert_eq!(fnv1a(FNV_OFFSET, b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fmix64(fnv1a(FNV_OFFSET, b"")), fmix64(FNV_OFFSET));
    }

    #[test]
    fn same_key_same_group_regardless_of_candidate_order() {
        let p = SessionAffinity::new(1.25);
        let cands = candidates(&[0; 6]);
        let mut reversed = cands.clone();
        reversed.reverse();
        let other = SessionAffinity::new(1.25);
        for key in keys(500) {
            let g = route(&p, Some(&key), &cands);
            assert_eq!(route(&p, Some(&key), &cands), g);
            assert_eq!(reversed[route(&p, Some(&key), &reversed)].group, cands[g].group);
            // Another replica agrees.
            assert_eq!(route(&other, Some(&key), &cands), g);
        }
    }

    #[test]
    fn keys_spread_over_groups() {
        let p = SessionAffinity::new(1.25);
        let cands = candidates(&[0; 8]);
        let mut counts = [0usize; 8];
        for key in keys(16_000) {
            counts[route(&p, Some(&key), &cands)] += 1;
        }
        // A fair share is 2000.
        assert!(counts.iter().all(|&c| (1000..3000).contains(&c)), "{counts:?}");
    }

    #[test]
    fn overloaded_group_diverts_within_bound() {
        let p = SessionAffinity::new(1.25);
        let idle = candidates(&[0; 4]);
        let key = "user-42";
        let home = route(&p, Some(key), &idle);
        let with_home_load = |home_load: usize, others: usize| {
            let mut loads = vec![others; 4];
            loads[home] = home_load;
            candidates(&loads)
        };
        // 5 + 1 <= ceil(18 / 4 * 1.25) = 6: within the bound, stays.
        assert_eq!(route(&p, Some(key), &with_home_load(5, 4)), home);
        // 7 + 1 > ceil(20 / 4 * 1.25) = 7: over, diverts, to the same place each time.
        let away = route(&p, Some(key), &with_home_load(7, 4));
        assert_ne!(away, home);
        assert_eq!(route(&p, Some(key), &with_home_load(7, 4)), away);
        assert_eq!(route(&p, Some(key), &with_home_load(100, 0)), away);
        // Load back to normal: back home.
        assert_eq!(route(&p, Some(key), &idle), home);
    }

    #[test]
    fn removing_a_group_moves_only_its_keys() {
        let p = SessionAffinity::new(1.25);
        let cands = candidates(&[0; 10]);
        let keys = keys(10_000);
        let before: Vec<Arc<str>> = keys.iter().map(|k| cands[route(&p, Some(k), &cands)].group.clone()).collect();
        let gone = cands[3].group.clone();
        p.remove_group(&gone);
        let rest: Vec<Candidate> = cands.iter().filter(|c| c.group != gone).cloned().collect();
        let mut moved = 0;
        for (key, was) in keys.iter().zip(&before) {
            let now = &rest[route(&p, Some(key), &rest)].group;
            if *was == gone {
                moved += 1;
            } else {
                assert_eq!(now, was, "{key} moved though its group stayed");
            }
        }
        assert!((500..2000).contains(&moved), "{moved} keys were on the removed group");
    }

    #[test]
    fn candidate_sets_keep_their_own_rings() {
        let p = SessionAffinity::new(1.25);
        // Two models served by overlapping groups, requests alternating between them.
        let all = candidates(&[0; 6]);
        let (a, b) = (all[..4].to_vec(), all[2..].to_vec());
        let expect: Vec<(usize, usize)> = keys(200)
            .iter()
            .map(|k| (route(&SessionAffinity::new(1.25), Some(k), &a), route(&SessionAffinity::new(1.25), Some(k), &b)))
            .collect();
        for _ in 0..3 {
            for (k, want) in keys(200).iter().zip(&expect) {
                assert_eq!((route(&p, Some(k), &a), route(&p, Some(k), &b)), *want);
            }
        }
        assert_eq!(p.lock().len(), 2);
        p.remove_group(&all[0].group);
        assert_eq!(p.lock().len(), 1);
        for i in 0..3 * MAX_RINGS {
            route(&p, Some("k"), &candidates(&vec![0; 2 + i]));
        }
        assert_eq!(p.lock().len(), MAX_RINGS);
    }

    #[test]
    fn missing_key_falls_back_to_least_load() {
        let p = SessionAffinity::new(1.25);
        let cands = candidates(&[5, 2, 9]);
        for _ in 0..10 {
            assert_eq!(route(&p, None, &cands), 1);
        }
    }

    #[test]
    fn degenerate_inputs() {
        for factor in [f64::NAN, 0.0, -3.0, f64::INFINITY] {
            let p = SessionAffinity::new(factor);
            assert_eq!(route(&p, Some("k"), &[]), 0);
            assert_eq!(route(&p, Some("k"), &candidates(&[7])), 0);
            assert!(route(&p, Some(""), &candidates(&[usize::MAX, usize::MAX, 0])) < 3);
            assert!(route(&p, Some("k"), &candidates(&[1, 1, 1])) < 3);
        }
    }
}
