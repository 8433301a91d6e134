//! One request as the engine tracks it: its tokens, how many are in the KV cache, the blocks
//! holding them, its sampler, and the channel its tokens stream out on.

use tokio::sync::mpsc::UnboundedSender;

use super::blocks::Block;
use crate::constraint::TokenConstraint;
pub use crate::generate::FinishReason;
use crate::generate::GenerateParams;
use crate::sampling::SeqSampler;

/// A request as the engine receives it: already validated by
/// [`super::runner::EngineHandle::submit`].
pub struct NewRequest {
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    pub events: UnboundedSender<Event>,
    /// Structured output: the grammar its tokens must follow.
    pub constraint: Option<Box<TokenConstraint>>,
}

/// What a request's stream receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Token {
        token: u32,
        /// Set when the request asked for logprobs.
        logprob: Option<f32>,
        top: Vec<(u32, f32)>,
    },
    Finished {
        reason: FinishReason,
        /// Prompt tokens whose KV came from the prefix cache (first admission).
        cached_prompt_tokens: usize,
        message: Option<String>,
    },
}

/// Where a sequence's KV lives in the prefix cache's key space.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct KvKey {
    /// Root of this sequence's prefix-cache chain (model and NTK alpha).
    pub root_hash: u64,
    /// Rotary NTK alpha the sequence keeps for life.
    pub rope_alpha: f64,
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
    pub root_hash: u64,
    pub rope_alpha: f64,
    pub params: GenerateParams,
    pub sampler: SeqSampler,
    pub events: UnboundedSender<Event>,
    pub constraint: Option<Box<TokenConstraint>>,
    pub cached_prompt_tokens: Option<usize>,
}

impl Sequence {
    pub fn new(id: u64, request: NewRequest, kv: KvKey) -> Self {
        let NewRequest { request_id, prompt, params, events, constraint } = request;
        Sequence {
            id,
            request_id,
            prompt_len: prompt.len(),
            sampler: SeqSampler::new(params.sampling.clone(), &prompt),
            tokens: prompt,
            computed: 0,
            blocks: Vec::new(),
            block_hashes: Vec::new(),
            root_hash: kv.root_hash,
            rope_alpha: kv.rope_alpha,
            params,
            events,
            constraint,
            cached_prompt_tokens: None,
        }
    }

    pub fn generated(&self) -> usize {
        self.tokens.len() - self.prompt_len
    }

    /// Tokens not yet in the KV cache.
    pub fn uncomputed(&self) -> usize {
        self.tokens.len() - self.computed
    }

    /// Whether the step that computes `len` more tokens ends the known tokens (and so samples).
    pub fn samples_after(&self, len: usize) -> bool {
        self.computed + len == self.tokens.len()
    }

    /// Appends a generated token and streams it; returns why the sequence ends, if it does.
    pub fn push_token(
        &mut self,
        token: u32,
        logprob: Option<f32>,
        top: Vec<(u32, f32)>,
        max_context: usize,
    ) -> Option<FinishReason> {
        self.tokens.push(token);
        // A closed receiver means the client left; the engine drops it before the next step.
        let _ = self.events.send(Event::Token { token, logprob, top });
        self.params.finish_after(token, self.generated(), self.tokens.len(), max_context)
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
