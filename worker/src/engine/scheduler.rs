//! Iteration-level continuous batching. Each step the scheduler picks, within a token budget and
//! a sequence cap, which sequences advance and by how many tokens: running sequences first
//! (decodes and unfinished chunked prefills, oldest first), then waiting ones in arrival order.
//! When blocks run out it evicts unused prefix-cache blocks, then preempts the youngest running
//! sequence, which frees its blocks and later recomputes. It never touches tensors.

use std::collections::VecDeque;

use super::blocks::{Block, BlockPool};
use super::prefix_cache::PrefixCache;
use super::sequence::Sequence;
use crate::constraint::TokenConstraint;

#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    pub block_size: usize,
    /// Most tokens one forward may carry (prefill chunks plus decodes).
    pub max_batch_tokens: usize,
    /// Most sequences one forward may carry.
    pub max_seqs: usize,
}

/// Sequence `running[index]` advances by `len` tokens this step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Planned {
    pub index: usize,
    pub len: usize,
}

/// Blocks and the prefix cache: everything a sequence's KV memory comes from.
pub struct BlockManager {
    pub pool: BlockPool,
    pub prefix: PrefixCache,
    pub block_size: usize,
}

impl BlockManager {
    fn allocate(&mut self) -> Option<Block> {
        loop {
            if let Some(b) = self.pool.allocate() {
                return Some(b);
            }
            if !self.prefix.evict_one() {
                return None;
            }
        }
    }

    /// Gives `seq` blocks for its first `tokens` tokens; false (keeping what it got) if the
    /// pool runs out.
    fn ensure(&mut self, seq: &mut Sequence, tokens: usize) -> bool {
        while seq.blocks.len() * self.block_size < tokens {
            match self.allocate() {
                Some(b) => seq.blocks.push(b),
                None => return false,
            }
        }
        true
    }

    /// Blocks a new sequence could get: free ones and those only the prefix cache holds.
    pub fn available(&self) -> usize {
        self.pool.free_count() + self.prefix.evictable()
    }

    /// Registers the blocks `seq` has filled completely since the last call.
    pub fn register_full_blocks(&mut self, seq: &mut Sequence) {
        let bs = self.block_size;
        while (seq.block_hashes.len() + 1) * bs <= seq.computed {
            let k = seq.block_hashes.len();
            let parent = seq.block_hashes.last().copied().unwrap_or(seq.root_hash);
            let h = self.prefix.insert(parent, &seq.tokens[k * bs..(k + 1) * bs], &seq.blocks[k]);
            seq.block_hashes.push(h);
        }
    }
}

pub struct Scheduler {
    config: SchedulerConfig,
    blocks: BlockManager,
    waiting: VecDeque<Sequence>,
    /// In admission order: the last is the first to be preempted.
    running: Vec<Sequence>,
    preemptions: u64,
}

impl Scheduler {
    pub fn new(config: SchedulerConfig, pool: BlockPool) -> Self {
        Scheduler {
            blocks: BlockManager { pool, prefix: PrefixCache::default(), block_size: config.block_size },
            config,
            waiting: VecDeque::new(),
            running: Vec::new(),
            preemptions: 0,
        }
    }

    pub fn is_idle(&self) -> bool {
        self.waiting.is_empty() && self.running.is_empty()
    }

    /// Queues a new sequence behind the waiting ones.
    pub fn enqueue(&mut self, seq: Sequence) {
        self.waiting.push_back(seq);
    }

    /// The running sequences; a [`Planned`] index points here.
    pub fn running(&self) -> &[Sequence] {
        &self.running
    }

    /// The grammar state of each running sequence that has one, by index in [`Self::running`]
    /// (the engine computes token masks from them while a forward runs).
    pub fn constraints_mut(&mut self) -> impl Iterator<Item = (usize, &mut TokenConstraint)> {
        self.running.iter_mut().enumerate().filter_map(|(i, s)| s.constraint.as_deref_mut().map(|c| (i, c)))
    }

    pub fn waiting_len(&self) -> usize {
        self.waiting.len()
    }

    /// Every live sequence, running then waiting.
    pub fn sequences(&self) -> impl Iterator<Item = &Sequence> {
        self.running.iter().chain(&self.waiting)
    }

    pub fn blocks(&self) -> &BlockManager {
        &self.blocks
    }

    pub fn preemptions(&self) -> u64 {
        self.preemptions
    }

    /// Records that `running[index]` computed `len` more tokens (its full blocks join the prefix
    /// cache) and returns it.
    pub fn advance(&mut self, index: usize, len: usize) -> &mut Sequence {
        let seq = &mut self.running[index];
        seq.computed += len;
        self.blocks.register_full_blocks(seq);
        seq
    }

    /// Removes every sequence `drop_if` selects, from both queues, handing each to `on_removed`.
    pub fn remove_where(&mut self, mut drop_if: impl FnMut(&Sequence) -> bool, mut on_removed: impl FnMut(Sequence)) {
        let mut keep = |s: Sequence| {
            if drop_if(&s) {
                on_removed(s);
                None
            } else {
                Some(s)
            }
        };
        self.running = std::mem::take(&mut self.running).into_iter().filter_map(&mut keep).collect();
        self.waiting = std::mem::take(&mut self.waiting).into_iter().filter_map(&mut keep).collect();
    }

    /// Chooses this step's work; admitted sequences move from `waiting` to `running`.
    pub fn schedule(&mut self) -> Vec<Planned> {
        let SchedulerConfig { max_batch_tokens, max_seqs, .. } = self.config;
        let mut budget = max_batch_tokens;
        let mut plan = Vec::new();
        let mut preempted = false;
        let mut i = 0;
        while i < self.running.len() && plan.len() < max_seqs && budget > 0 {
            let seq = &mut self.running[i];
            let len = seq.uncomputed().min(budget);
            let upto = seq.computed + len;
            if self.blocks.ensure(seq, upto) {
                plan.push(Planned { index: i, len });
                budget -= len;
                i += 1;
                continue;
            }
            // Out of blocks: the youngest running sequence gives its blocks back and waits.
            let mut victim = self.running.pop().expect("running is not empty");
            victim.reset_kv();
            self.waiting.push_front(victim);
            self.preemptions += 1;
            preempted = true;
        }
        // New work only when nothing had to be preempted: admitting now would preempt again.
        while !preempted && plan.len() < max_seqs && budget > 0 {
            let Some(mut seq) = self.waiting.pop_front() else { break };
            if seq.blocks.is_empty() {
                self.attach_cached_prefix(&mut seq);
            }
            let len = seq.uncomputed().min(budget);
            let upto = seq.computed + len;
            // Check before allocating: a failed admission must not evict cached blocks for nothing.
            let needed = upto.div_ceil(self.config.block_size).saturating_sub(seq.blocks.len());
            if needed <= self.blocks.available() && self.blocks.ensure(&mut seq, upto) {
                if seq.cached_prompt_tokens.is_none() {
                    let hit = seq.computed.min(seq.prompt_len);
                    seq.cached_prompt_tokens = Some(hit);
                    self.blocks.prefix.record(seq.prompt_len, hit);
                }
                self.running.push(seq);
                plan.push(Planned { index: self.running.len() - 1, len });
                budget -= len;
            } else {
                seq.reset_kv();
                self.waiting.push_front(seq);
                break;
            }
        }
        plan
    }

    /// Starts `seq` after the longest cached prefix of its tokens, keeping at least one token to
    /// compute so the step yields logits.
    fn attach_cached_prefix(&mut self, seq: &mut Sequence) {
        let lookup_len = seq.tokens.len() - 1;
        let hit = self.blocks.prefix.lookup(seq.root_hash, &seq.tokens[..lookup_len], self.config.block_size);
        seq.computed = hit.blocks.len() * self.config.block_size;
        seq.blocks = hit.blocks;
        seq.block_hashes = hit.hashes;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::prefix_cache::root_hash;
    use crate::engine::sequence::{KvKey, NewRequest};
    use crate::generate::GenerateParams;
    use crate::sampling::SamplingParams;

    fn seq(id: u64, prompt: Vec<u32>) -> Sequence {
        let (events, _rx) = tokio::sync::mpsc::unbounded_channel();
        let params = GenerateParams { max_new_tokens: 100, sampling: SamplingParams::greedy(), stop_token_ids: vec![] };
        let request = NewRequest { request_id: id.to_string(), prompt, params, events, constraint: None };
        Sequence::new(id, request, KvKey { root_hash: root_hash(0, 1.0), rope_alpha: 1.0 })
    }

    fn sched(blocks: usize, max_batch_tokens: usize, max_seqs: usize) -> Scheduler {
        Scheduler::new(SchedulerConfig { block_size: 4, max_batch_tokens, max_seqs }, BlockPool::new(blocks))
    }

    /// Applies a plan as the engine would: the chunk is computed; a finished prefill or a decode
    /// yields one new token.
    fn run(s: &mut Scheduler, plan: &[Planned]) {
        for p in plan {
            let seq = s.advance(p.index, p.len);
            if seq.computed == seq.tokens.len() {
                seq.tokens.push(7);
            }
        }
    }

    #[test]
    fn long_prompts_are_chunked_and_mixed_with_decodes() {
        let mut s = sched(64, 8, 16);
        s.waiting.push_back(seq(1, vec![1; 3]));
        s.waiting.push_back(seq(2, vec![2; 20]));
        let plan = s.schedule();
        assert_eq!(plan, vec![Planned { index: 0, len: 3 }, Planned { index: 1, len: 5 }]);
        run(&mut s, &plan);
        // Sequence 1 decodes (1 token) while sequence 2's prompt continues in 7-token chunks.
        let plan = s.schedule();
        assert_eq!(plan, vec![Planned { index: 0, len: 1 }, Planned { index: 1, len: 7 }]);
    }

    #[test]
    fn out_of_blocks_preempts_the_youngest_and_frees_its_blocks() {
        // 3 blocks of 4: two sequences of 5 tokens need 2 blocks each.
        let mut s = sched(3, 64, 16);
        s.waiting.push_back(seq(1, vec![1; 5]));
        s.waiting.push_back(seq(2, vec![2; 3]));
        let plan = s.schedule();
        assert_eq!(plan.len(), 2);
        run(&mut s, &plan); // prefills done: seq 2 has 4 tokens
        let plan = s.schedule();
        run(&mut s, &plan); // seq 2 now has 5 tokens, 4 computed: its next step needs a second block
        let plan = s.schedule();
        assert_eq!(s.preemptions, 1);
        assert_eq!(s.running.len(), 1);
        assert_eq!(s.waiting.front().map(|q| q.id), Some(2));
        assert_eq!(s.waiting[0].computed, 0);
        assert_eq!(s.waiting[0].tokens.len(), 5, "its 2 generated tokens survive preemption");
        assert_eq!(plan, vec![Planned { index: 0, len: 1 }]);
        // The victim's block came back: sequence 1 holds 2 of 3, and its next block is free.
        assert_eq!(s.running[0].blocks.len(), 2);
        assert_eq!(s.blocks.available(), 1);
    }

    #[test]
    fn a_cached_prefix_skips_prefill_and_blocks_come_back() {
        let mut s = sched(16, 64, 16);
        let prompt: Vec<u32> = (0..10).collect();
        s.waiting.push_back(seq(1, prompt.clone()));
        let plan = s.schedule();
        run(&mut s, &plan);
        s.remove_where(|_| true, drop);
        assert_eq!(s.blocks.pool.free_count() + s.blocks.prefix.len(), 16);
        assert_eq!(s.blocks.prefix.len(), 2, "two full blocks of the first prompt stay cached");
        s.waiting.push_back(seq(2, prompt));
        let plan = s.schedule();
        assert_eq!(plan, vec![Planned { index: 0, len: 2 }], "8 of 10 tokens came from the cache");
        assert_eq!(s.running[0].cached_prompt_tokens, Some(8));
        s.remove_where(|_| true, drop);
        assert_eq!(s.blocks.available(), 16);
    }

    #[test]
    fn sequence_cap_and_fcfs_hold() {
        let mut s = sched(64, 64, 2);
        for id in 1..=3 {
            s.waiting.push_back(seq(id, vec![1; 2]));
        }
        let plan = s.schedule();
        assert_eq!(plan.len(), 2);
        assert_eq!(s.running.iter().map(|q| q.id).collect::<Vec<_>>(), vec![1, 2]);
        assert_eq!(s.waiting.front().map(|q| q.id), Some(3));
    }
}
