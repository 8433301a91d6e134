//! Prefix cache: full KV blocks keyed by a hash chain of their token ids, shared read-only by
//! every sequence whose prompt starts the same way, kept after their sequences finish and evicted
//! least-recently-used when the pool runs dry.
//!
//! The chain's root hashes what else decides a block's contents: the model and, for the original
//! Qwen, the sequence's NTK alpha (rotary is applied before keys are cached).

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

use super::blocks::Block;

/// Hash of a block given its parent's hash and its token ids.
pub fn chain_hash(parent: u64, tokens: &[u32]) -> u64 {
    let mut h = rustc_hash::FxHasher::default();
    parent.hash(&mut h);
    tokens.hash(&mut h);
    h.finish()
}

/// Root of a sequence's chain.
pub fn root_hash(model_salt: u64, rope_alpha: f64) -> u64 {
    let mut h = rustc_hash::FxHasher::default();
    model_salt.hash(&mut h);
    rope_alpha.to_bits().hash(&mut h);
    h.finish()
}

struct Entry {
    block: Block,
    parent: u64,
    /// Kept to rule out hash collisions: a hit must match token for token.
    tokens: Vec<u32>,
    last_used: u64,
    /// Cached blocks whose parent this is. Only leaves are evicted: dropping an inner block
    /// would strand its descendants, unreachable by lookups yet still holding memory.
    children: u32,
    /// Whether this entry is counted in its parent's `children`: not when the parent was
    /// absent at insert time (evicted while a sequence still held its own copy of that block).
    in_parent: bool,
}

#[derive(Default)]
pub struct PrefixCache {
    entries: HashMap<u64, Entry>,
    /// `last_used` tick → hash, oldest first.
    lru: BTreeMap<u64, u64>,
    tick: u64,
    queried_tokens: u64,
    hit_tokens: u64,
}

/// A cache hit: the blocks and their chain hashes, in prompt order.
pub struct Hit {
    pub blocks: Vec<Block>,
    pub hashes: Vec<u64>,
}

impl PrefixCache {
    /// The cached blocks that hold the longest prefix of `tokens` made of full blocks.
    pub fn lookup(&mut self, root: u64, tokens: &[u32], block_size: usize) -> Hit {
        let mut hit = Hit { blocks: Vec::new(), hashes: Vec::new() };
        let mut parent = root;
        for chunk in tokens.chunks_exact(block_size) {
            let h = chain_hash(parent, chunk);
            match self.entries.get(&h) {
                Some(e) if e.parent == parent && e.tokens == chunk => {
                    hit.blocks.push(e.block.clone());
                    hit.hashes.push(h);
                    parent = h;
                }
                _ => break,
            }
        }
        for &h in &hit.hashes {
            self.touch(h);
        }
        hit
    }

    /// Counts one admitted prompt for the hit rate (retried admissions are not counted again).
    pub fn record(&mut self, prompt_tokens: usize, hit_tokens: usize) {
        self.queried_tokens += prompt_tokens as u64;
        self.hit_tokens += hit_tokens as u64;
    }

    /// Records a block a sequence has just filled. A block already cached under the same chain
    /// stays; the sequence keeps its own copy.
    pub fn insert(&mut self, parent: u64, tokens: &[u32], block: &Block) -> u64 {
        let h = chain_hash(parent, tokens);
        if self.entries.contains_key(&h) {
            self.touch(h);
            return h;
        }
        self.tick += 1;
        self.lru.insert(self.tick, h);
        let in_parent = match self.entries.get_mut(&parent) {
            Some(p) => {
                p.children += 1;
                true
            }
            None => false,
        };
        let entry = Entry {
            block: block.clone(),
            parent,
            tokens: tokens.to_vec(),
            last_used: self.tick,
            children: 0,
            in_parent,
        };
        self.entries.insert(h, entry);
        h
    }

    fn touch(&mut self, h: u64) {
        self.tick += 1;
        if let Some(e) = self.entries.get_mut(&h) {
            self.lru.remove(&e.last_used);
            e.last_used = self.tick;
            self.lru.insert(self.tick, h);
        }
    }

    /// Drops the least recently used leaf block that no sequence holds, returning it to the pool.
    pub fn evict_one(&mut self) -> bool {
        let victim = self
            .lru
            .iter()
            .find(|(_, h)| {
                let e = &self.entries[h];
                e.children == 0 && e.block.owners() == 1
            })
            .map(|(&t, &h)| (t, h));
        let Some((tick, h)) = victim else { return false };
        self.lru.remove(&tick);
        if let Some(e) = self.entries.remove(&h).filter(|e| e.in_parent) {
            if let Some(p) = self.entries.get_mut(&e.parent) {
                p.children -= 1;
            }
        }
        true
    }

    /// Blocks held only by the cache: free for the taking.
    pub fn evictable(&self) -> usize {
        self.entries.values().filter(|e| e.block.owners() == 1).count()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn hit_tokens(&self) -> u64 {
        self.hit_tokens
    }

    pub fn queried_tokens(&self) -> u64 {
        self.queried_tokens
    }

    /// Share of looked-up prompt tokens found cached.
    pub fn hit_rate(&self) -> f64 {
        if self.queried_tokens == 0 {
            0.0
        } else {
            self.hit_tokens as f64 / self.queried_tokens as f64
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::blocks::BlockPool;
    use super::*;

    #[test]
    fn hits_follow_the_chain_and_eviction_is_lru_over_unused_blocks() {
        let pool = BlockPool::new(4);
        let mut cache = PrefixCache::default();
        let root = root_hash(1, 1.0);
        let (a, b) = (pool.allocate().unwrap(), pool.allocate().unwrap());
        let ha = cache.insert(root, &[1, 2], &a);
        cache.insert(ha, &[3, 4], &b);
        drop((a, b));
        assert_eq!(pool.free_count(), 2, "the cache keeps both blocks alive");

        let hit = cache.lookup(root, &[1, 2, 3, 4, 5], 2);
        assert_eq!(hit.blocks.len(), 2);
        assert_eq!(cache.lookup(root, &[1, 2, 9, 9], 2).blocks.len(), 1, "stops at the first miss");
        assert_eq!(cache.lookup(root_hash(1, 3.0), &[1, 2], 2).blocks.len(), 0, "another NTK alpha, another chain");
        assert_eq!(cache.lookup(root, &[3, 4], 2).blocks.len(), 0, "a block only matches after its parent");

        // Held by `hit`: nothing can be evicted.
        assert_eq!(cache.evictable(), 0);
        assert!(!cache.evict_one());
        drop(hit);
        assert_eq!(cache.evictable(), 2);
        // [1,2] is older but has a cached child: the leaf [3,4] goes first, never stranding it.
        assert!(cache.evict_one());
        assert_eq!(cache.lookup(root, &[1, 2, 3, 4], 2).blocks.len(), 1);
        assert!(cache.evict_one());
        assert!(cache.is_empty());
        assert_eq!(pool.free_count(), 4);
        cache.record(10, 4);
        assert_eq!(cache.hit_rate(), 0.4);
    }

    /// A block whose parent entry was evicted (and later cached again) while a sequence still
    /// held its own copy: evicting it must not touch the new parent's child count.
    #[test]
    fn a_child_inserted_under_an_absent_parent_evicts_cleanly() {
        let pool = BlockPool::new(4);
        let mut cache = PrefixCache::default();
        let root = root_hash(1, 1.0);
        let a = pool.allocate().unwrap();
        let ha = cache.insert(root, &[1, 2], &a);
        drop(a);
        assert!(cache.evict_one(), "the parent goes while its sequence's copy lives on");
        let b = pool.allocate().unwrap();
        cache.insert(ha, &[3, 4], &b);
        let c = pool.allocate().unwrap();
        cache.insert(root, &[1, 2], &c);
        drop((b, c));
        while cache.evict_one() {}
        assert!(cache.is_empty());
        assert_eq!(pool.free_count(), 4);
    }
}
