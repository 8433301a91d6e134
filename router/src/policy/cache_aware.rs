//! Cache-aware routing in the manner of SGLang's router: send a prompt where its prefix is most
//! likely still in the KV cache, unless that would overload a group.
//!
//! Per request, with scores from [`Load::score`](super::Load::score):
//! 1. Imbalanced (max − min > `balance_abs_threshold` and max > min × `balance_rel_threshold`):
//!    the least loaded group, whatever it caches. Cache hits are worth less than a queue.
//! 2. Otherwise the group with the longest prefix match in the [`PrefixTree`], if it covers at
//!    least `cache_threshold` of the prompt (ties to the less loaded).
//! 3. Otherwise the group holding the fewest tokens in the tree (ties to the less loaded), so that
//!    unrelated prefixes spread over the groups instead of all competing for one cache.
//!
//! The prompt is then recorded for the chosen group. The tree is the router's guess, not the
//! engines' truth: it never hears about engine-side evictions, which its own LRU bound stands in for.

use std::sync::{Mutex, MutexGuard};

use super::least_load::LeastLoad;
use super::prefix_tree::PrefixTree;
use super::{Candidate, Policy, RouteRequest};

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CacheAwareConfig {
    /// Fraction of the prompt the best match must cover to decide the route.
    pub cache_threshold: f64,
    /// Load (score) difference between the busiest and idlest group that may count as imbalanced.
    pub balance_abs_threshold: usize,
    /// Ratio busiest / idlest above which the load may count as imbalanced.
    pub balance_rel_threshold: f64,
    /// Hard bound on the prefix tree's memory (see [`PrefixTree`]); below 1 KiB disables it.
    pub max_tree_bytes: usize,
}

impl Default for CacheAwareConfig {
    fn default() -> Self {
        CacheAwareConfig {
            cache_threshold: 0.5,
            balance_abs_threshold: 32,
            balance_rel_threshold: 1.5,
            max_tree_bytes: 64 << 20,
        }
    }
}

pub struct CacheAware {
    cfg: CacheAwareConfig,
    /// Matching and inserting happen under one lock so concurrent requests with a new shared
    /// prefix see each other's choice rather than each spreading to another group.
    tree: Mutex<PrefixTree>,
    least: LeastLoad,
}

impl CacheAware {
    pub fn new(cfg: CacheAwareConfig) -> Self {
        CacheAware { cfg, tree: Mutex::new(PrefixTree::new(cfg.max_tree_bytes)), least: LeastLoad::new() }
    }

    fn lock(&self) -> MutexGuard<'_, PrefixTree> {
        self.tree.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The tree's current memory, never above `max_tree_bytes`.
    pub fn tree_bytes(&self) -> usize {
        self.lock().tree_bytes()
    }

    /// How many leading tokens of `tokens` the tree believes `group` has cached.
    pub fn matched_len(&self, group: &str, tokens: &[u32]) -> usize {
        self.lock().matched_len(group, tokens)
    }

    fn imbalanced(&self, candidates: &[Candidate]) -> bool {
        let scores = candidates.iter().map(|c| c.load.score());
        let (min, max) = scores.fold((usize::MAX, 0), |(lo, hi), s| (lo.min(s), hi.max(s)));
        max.saturating_sub(min) > self.cfg.balance_abs_threshold
            && max as f64 > min as f64 * self.cfg.balance_rel_threshold
    }

    fn choose(&self, tree: &PrefixTree, tokens: &[u32], candidates: &[Candidate]) -> usize {
        if self.imbalanced(candidates) {
            return self.least.pick_least(candidates);
        }
        let names: Vec<&str> = candidates.iter().map(|c| &*c.group).collect();
        let matched = tree.match_lengths(tokens, &names);
        let score = |i: usize| candidates[i].load.score();
        let best =
            (0..candidates.len()).max_by_key(|&i| (matched[i], std::cmp::Reverse(score(i)), std::cmp::Reverse(i)));
        if let Some(best) = best {
            if matched[best] > 0 && matched[best] as f64 >= self.cfg.cache_threshold * tokens.len() as f64 {
                return best;
            }
        }
        (0..candidates.len()).min_by_key(|&i| (tree.cached_tokens(names[i]), score(i))).unwrap_or(0)
    }
}

impl Policy for CacheAware {
    fn name(&self) -> &'static str {
        "cache-aware"
    }

    fn pick(&self, request: &RouteRequest<'_>, candidates: &[Candidate]) -> usize {
        let mut tree = self.lock();
        let choice = if candidates.len() <= 1 { 0 } else { self.choose(&tree, request.tokens, candidates) };
        if let Some(c) = candidates.get(choice) {
            tree.insert(request.tokens, &c.group);
        }
        choice
    }

    fn remove_group(&self, group: &str) {
        self.lock().remove_group(group);
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;
    use crate::policy::test_util::candidates;

    fn route(p: &CacheAware, tokens: &[u32], cands: &[Candidate]) -> usize {
        p.pick(&RouteRequest { tokens, session_key: None }, cands)
    }

    fn doc(d: u32, len: u32) -> Vec<u32> {
        (0..len).map(|i| d * 10_000 + i).collect()
    }

    #[test]
    fn shared_prefixes_stick_and_distinct_ones_spread() {
        let p = CacheAware::new(CacheAwareConfig::default());
        let mut rng = StdRng::seed_from_u64(3);
        let mut home = [None; 12];
        let (mut hits, mut repeats) = (0, 0);
        for _ in 0..600 {
            // Loads wobble but stay within the balance thresholds.
            let loads: Vec<usize> = (0..4).map(|_| rng.random_range(0..10)).collect();
            let cands = candidates(&loads);
            let d = rng.random_range(0..12);
            let mut prompt = doc(d as u32, 200);
            prompt.extend((0..50).map(|_| rng.random_range(500_000..600_000)));
            let g = route(&p, &prompt, &cands);
            match home[d] {
                None => home[d] = Some(g),
                Some(h) => {
                    repeats += 1;
                    hits += usize::from(h == g);
                }
            }
        }
        assert_eq!(hits, repeats, "every repeat of a document goes to where it went first");
        let mut used: Vec<usize> = home.iter().flatten().copied().collect();
        used.sort_unstable();
        used.dedup();
        assert_eq!(used.len(), 4, "new documents spread over all groups: {home:?}");
    }

    #[test]
    fn short_match_does_not_decide() {
        let p = CacheAware::new(CacheAwareConfig::default());
        let cands = candidates(&[0, 0]);
        let first = route(&p, &doc(1, 100), &cands);
        // 40 shared tokens of 140 is under the 0.5 threshold: the less cached group gets it.
        let mut prompt = doc(1, 40);
        prompt.extend(doc(2, 100));
        assert_ne!(route(&p, &prompt, &cands), first);
    }

    #[test]
    fn imbalance_beyond_thresholds_routes_to_least_loaded() {
        let p = CacheAware::new(CacheAwareConfig::default());
        let prompt = doc(7, 300);
        let home = route(&p, &prompt, &candidates(&[0, 0, 0]));
        let with_home_load = |home_load: usize, others: usize| {
            let mut loads = vec![others; 3];
            loads[home] = home_load;
            loads[(home + 1) % 3] += 1;
            candidates(&loads)
        };
        // Within the absolute threshold: stays with the cache.
        assert_eq!(route(&p, &prompt, &with_home_load(20, 0)), home);
        // Beyond the absolute but not the relative threshold: stays.
        assert_eq!(route(&p, &prompt, &with_home_load(150, 110)), home);
        // Beyond both: the least loaded group, never the home one.
        let picked = route(&p, &prompt, &with_home_load(100, 0));
        assert_eq!(picked, (home + 2) % 3);
    }

    #[test]
    fn bound_holds_through_the_policy() {
        let max = 4 << 20;
        let p = CacheAware::new(CacheAwareConfig { max_tree_bytes: max, ..CacheAwareConfig::default() });
        let cands = candidates(&[0; 8]);
        let mut rng = StdRng::seed_from_u64(5);
        let start = Instant::now();
        let mut prompt = vec![0u32; 64];
        for _ in 0..100_000 {
            prompt.iter_mut().for_each(|t| *t = rng.random_range(0..152_000));
            route(&p, &prompt, &cands);
            assert!(p.tree_bytes() <= max);
        }
        assert!(start.elapsed() < Duration::from_secs(30), "took {:?}", start.elapsed());
    }

    #[test]
    fn removed_group_is_forgotten() {
        let p = CacheAware::new(CacheAwareConfig::default());
        let cands = candidates(&[0, 0, 0]);
        let prompt = doc(3, 100);
        let home = route(&p, &prompt, &cands);
        let name = cands[home].group.clone();
        assert_eq!(p.matched_len(&name, &prompt), 100);
        p.remove_group(&name);
        assert_eq!(p.matched_len(&name, &prompt), 0);
        let rest: Vec<Candidate> = cands.iter().filter(|c| c.group != name).cloned().collect();
        let next = route(&p, &prompt, &rest);
        assert_eq!(p.matched_len(&rest[next].group, &prompt), 100);
    }

    #[test]
    fn degenerate_inputs() {
        let p = CacheAware::new(CacheAwareConfig {
            cache_threshold: f64::NAN,
            balance_rel_threshold: f64::NAN,
            max_tree_bytes: 0,
            ..CacheAwareConfig::default()
        });
        assert_eq!(route(&p, &[], &[]), 0);
        assert_eq!(route(&p, &[1, 2], &candidates(&[usize::MAX])), 0);
        assert!(route(&p, &[], &candidates(&[usize::MAX, 0, 3])) < 3);
        let p = CacheAware::new(CacheAwareConfig::default());
        assert!(route(&p, &[], &candidates(&[0, 0])) < 2);
    }
}
