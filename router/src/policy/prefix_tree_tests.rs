use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

/// Recomputes everything the tree keeps incrementally and checks the structure.
fn check(t: &PrefixTree) {
    assert!(t.tree_bytes() <= t.max_bytes || t.nodes.is_empty(), "{} > {}", t.tree_bytes(), t.max_bytes);
    if t.nodes.is_empty() {
        assert_eq!(t.tree_bytes(), 0);
        return;
    }
    assert_eq!(t.heap_bytes, t.nodes.iter().map(Node::heap_bytes).sum::<usize>(), "heap bytes drifted");
    assert_eq!(t.nodes[0].parent, NO_PARENT);
    assert!(t.nodes[0].label.is_empty() && t.nodes[0].groups.is_empty());
    let mut tokens = vec![0usize; t.groups.len()];
    for (i, n) in t.nodes.iter().enumerate() {
        assert!(n.children.windows(2).all(|w| w[0].0 < w[1].0), "children unsorted");
        for &(tok, c) in &n.children {
            let child = &t.nodes[c as usize];
            assert_eq!(child.parent as usize, i);
            assert_eq!(child.label[0], tok);
        }
        if i == 0 {
            continue;
        }
        assert!(!n.label.is_empty() && !n.groups.is_empty());
        let parent = &t.nodes[n.parent as usize];
        for &(g, at) in &n.groups {
            tokens[g as usize] += n.label.len();
            assert!(at <= n.last_access);
            if n.parent != ROOT {
                let up = parent.groups.iter().find(|p| p.0 == g).expect("group missing from ancestor");
                assert!(up.1 >= at);
            }
        }
    }
    for (g, entry) in t.groups.iter().enumerate() {
        assert_eq!(entry.as_ref().map_or(0, |e| e.tokens), tokens[g], "group {g} token count drifted");
    }
}

#[cfg(target_pointer_width = "64")]
#[test]
fn node_size_is_as_documented() {
    assert_eq!(size_of::<Node>(), 80);
}

#[test]
fn matches_shared_prefixes_per_group() {
    let mut t = PrefixTree::new(1 << 20);
    t.insert(&[1, 2, 3, 4, 5], "a");
    t.insert(&[1, 2, 3, 9], "b");
    t.insert(&[1, 2, 3, 4, 6, 7], "b");
    check(&t);
    assert_eq!(t.matched_len("a", &[1, 2, 3, 4, 5, 6]), 5);
    assert_eq!(t.matched_len("a", &[1, 2, 3, 9]), 3);
    assert_eq!(t.matched_len("b", &[1, 2, 3, 9, 9]), 4);
    assert_eq!(t.matched_len("b", &[1, 2, 3, 4, 5]), 4);
    // A partial edge counts up to where it diverges.
    assert_eq!(t.matched_len("a", &[1, 2, 7]), 2);
    assert_eq!(t.matched_len("a", &[2]), 0);
    assert_eq!(t.matched_len("c", &[1, 2]), 0);
    assert_eq!(t.matched_len("a", &[]), 0);
    assert_eq!(t.match_lengths(&[1, 2, 3, 4, 6], &["b", "a", "c", "b"]), [5, 4, 0, 5]);
    assert_eq!(t.cached_tokens("a"), 5);
    assert_eq!(t.cached_tokens("b"), 3 + 1 + 1 + 2);
    assert_eq!(t.cached_tokens("c"), 0);
}

#[test]
fn repeated_insert_adds_nothing() {
    let mut t = PrefixTree::new(1 << 20);
    t.insert(&[1, 2, 3], "a");
    let (bytes, nodes) = (t.tree_bytes(), t.node_count());
    assert_eq!((t.tree_bytes(), t.node_count()), (bytes, nodes));
    // A shorter prompt splits the edge but caches no new tokens.
    t.insert(&[1, 2], "a");
    assert_eq!((t.node_count(), t.cached_tokens("a")), (nodes + 1, 3));
    check(&t);
}

#[test]
fn evicts_least_recently_used_first() {
    let mut t = PrefixTree::new(16 << 10);
    let prompt = |i: u32| -> Vec<u32> { (0..100).map(|j| i * 1000 + j).collect() };
    t.insert(&prompt(0), "a");
    t.insert(&prompt(1), "a");
    for i in 2..200 {
        // Keep prompt 0 warm; prompt 1 goes cold.
        t.insert(&prompt(0), "a");
        t.insert(&prompt(i), "a");
        check(&t);
    }
    assert_eq!(t.matched_len("a", &prompt(0)), 100);
    assert_eq!(t.matched_len("a", &prompt(1)), 0);
    assert_eq!(t.matched_len("a", &prompt(199)), 100);
}

#[test]
fn bound_holds_for_100k_distinct_prefixes() {
    let max = 4 << 20;
    let mut t = PrefixTree::new(max);
    let mut rng = StdRng::seed_from_u64(7);
    let groups: Vec<String> = (0..8).map(|g| format!("group-{g}")).collect();
    let start = Instant::now();
    let mut prompt = vec![0u32; 64];
    for i in 0..100_000 {
        prompt.iter_mut().for_each(|t| *t = rng.random_range(0..152_000));
        t.insert(&prompt, &groups[i % 8]);
        assert!(t.tree_bytes() <= max, "{} bytes after insert {i}", t.tree_bytes());
    }
    check(&t);
    assert_eq!(t.matched_len(&groups[(100_000 - 1) % 8], &prompt), 64);
    // Most of the bound is still in use: eviction stops at 90%, not at empty.
    assert!(t.tree_bytes() > max / 2);
    assert!(start.elapsed() < Duration::from_secs(20), "took {:?}", start.elapsed());
}

#[test]
fn prompt_larger_than_the_bound_is_truncated() {
    let max = 64 << 10;
    let mut t = PrefixTree::new(max);
    t.insert(&[5, 6, 7], "b");
    let huge: Vec<u32> = (0..100_000).collect();
    t.insert(&huge, "a");
    check(&t);
    let matched = t.matched_len("a", &huge);
    assert!(matched > 1000 && matched <= max / 8, "{matched}");
    // Bigger than the bound even after truncation would be: the small prompt survives.
    assert_eq!(t.matched_len("b", &[5, 6, 7]), 3);
}

#[test]
fn remove_group_forgets_it_and_prunes() {
    let mut t = PrefixTree::new(1 << 20);
    t.insert(&[1, 2, 3, 4], "a");
    t.insert(&[1, 2, 3, 5], "b");
    t.insert(&[8, 9], "a");
    let bytes = t.tree_bytes();
    t.remove_group("a");
    check(&t);
    assert_eq!(t.matched_len("a", &[1, 2, 3, 4]), 0);
    assert_eq!(t.matched_len("a", &[8, 9]), 0);
    assert_eq!(t.matched_len("b", &[1, 2, 3, 5]), 4);
    assert_eq!(t.cached_tokens("a"), 0);
    // Root, [1 2 3] and [5] remain.
    assert_eq!(t.node_count(), 3);
    assert!(t.tree_bytes() < bytes);
    t.remove_group("nobody");
    // The freed id is reused without inheriting anything.
    t.insert(&[8], "c");
    assert_eq!(t.matched_len("c", &[1, 2, 3]), 0);
    assert_eq!(t.matched_len("c", &[8, 9]), 1);
    check(&t);
}

#[test]
fn tiny_bound_disables_the_tree() {
    for max in [0, 1, MIN_TREE_BYTES - 1] {
        let mut t = PrefixTree::new(max);
        t.insert(&[1, 2, 3], "a");
        assert_eq!(t.matched_len("a", &[1, 2, 3]), 0);
        assert_eq!(t.tree_bytes(), 0);
        t.remove_group("a");
        check(&t);
    }
    let mut t = PrefixTree::new(MIN_TREE_BYTES);
    t.insert(&(0..10_000).collect::<Vec<_>>(), "a");
    check(&t);
}

#[test]
fn random_operations_keep_the_invariants() {
    let mut rng = StdRng::seed_from_u64(11);
    for max in [2 << 10, 8 << 10, 64 << 10] {
        let mut t = PrefixTree::new(max);
        for step in 0..3000 {
            let group = format!("g{}", rng.random_range(0..5));
            // A small alphabet and shared stems produce many splits and partial matches.
            let stem = rng.random_range(0..4u32);
            let len = rng.random_range(0..40);
            let mut prompt = vec![stem; rng.random_range(0..8)];
            prompt.extend((0..len).map(|_| rng.random_range(0..4u32)));
            if rng.random_range(0..50) == 0 {
                t.remove_group(&group);
            } else {
                t.insert(&prompt, &group);
                // Small bounds may evict part of a just-inserted path made of many short edges.
                if max >= 64 << 10 {
                    assert_eq!(t.matched_len(&group, &prompt), prompt.len(), "step {step}");
                }
            }
            check(&t);
        }
    }
}

#[test]
fn match_lengths_fills_repeated_and_unknown_groups() {
    let mut t = PrefixTree::new(1 << 20);
    t.insert(&[1, 2, 3, 4], "a");
    t.insert(&[1, 2, 9], "b");
    let got = t.match_lengths(&[1, 2, 3, 4, 5], &["b", "a", "zz", "a", "b"]);
    assert_eq!(got, vec![2, 4, 0, 4, 2]);
    // A thousand candidates, most unknown to the tree: one walk, one pass over the names.
    let names: Vec<String> = (0..1000).map(|i| format!("g{i}")).collect();
    let mut refs: Vec<&str> = names.iter().map(String::as_str).collect();
    refs.push("a");
    let got = t.match_lengths(&[1, 2, 3], &refs);
    assert_eq!((got[..1000].iter().sum::<usize>(), got[1000]), (0, 3));
}
