//! One request as the engine tracks it: its tokens, how many are in the KV cache, the blocks
//! holding them, its sampler, and the channel its tokens stream out on.

use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::blocks::Block;
use crate::sampling::SeqSampler;

/// Why a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` or the context length reached.
    Length,
    /// A stop token was generated.
    Stop,
    /// The client cancelled or went away.
    Cancelled,
    /// The engine failed while running it.
    Error,
}

/// What a request's stream receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token {
        token: u32,
        /// NaN unless the request asked for logprobs.
        logprob: f32,
        top: Vec<(u32, f32)>,
    },
    Finished {
        reason: FinishReason,
        /// Prompt tokens whose KV came from the prefix cache (first admission).
        cached_prompt_tokens: usize,
        message: Option<String>,
    },
}

pub struct Sequence {
    /// Engine-internal id; also the request's KV identity.
    pub id: u64,
    pub request_id: String,
    /// Prompt followed by generated tokens.
    pub tokens: Vec<u32>,
    pub prompt_len: usize,
    /// Leading tokens whose keys and values are in `blocks`.
    pub computed: usize,
    pub blocks: Vec<Block>,
    /// Chain hashes of the leading full blocks registered in (or taken from) the prefix cache.
    pub block_hashes: Vec<u64>,
    /// Root of this sequence's prefix-cache chain (model and NTK alpha).
    pub root_hash: u64,
    pub rope_alpha: f64,
    pub max_new_tokens: usize,
    pub stop_token_ids: Vec<u32>,
    pub sampler: SeqSampler,
    pub events: UnboundedSender<Event>,
    pub arrived: Instant,
    pub cached_prompt_tokens: Option<usize>,
}

impl Sequence {
    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens not yet in the KV cache.
    pub fn uncomputed(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// Frees its KV blocks and starts over from the first token (preemption by recompute; the
    /// generated tokens are kept, so the output continues exactly where it was).
    pub fn reset_kv(&mut self) {
        self.blocks.clear();
        self.block_hashes.clear();
        self.computed = 0;
    }

    pub fn finish(&self, reason: FinishReason, message: Option<String>) {
        // A closed receiver means the client left; nothing else to tell it.
        let _ = self.events.send(Event::Finished {
            reason,
            cached_prompt_tokens: self.cached_prompt_tokens.unwrap_or(0),
            message,
        });
    }
}
