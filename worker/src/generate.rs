//! One-sequence generation: prefill, then decode until a stop token or the token limit. This is
//! the foundation's path for the `generate` command and for golden tests; the batching engine
//! drives [`Model::forward`] the same way for many sequences at once.

use std::time::{Duration, Instant};

use candle_core::{DType, D};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::model::{ContiguousKvCache, Model, SeqChunk};
use crate::sampling::{SamplingParams, Scratch, SeqSampler};

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    pub sampling: SamplingParams,
    /// Generation stops after emitting one of these (the model's eos ids by default).
    pub stop_token_ids: Vec<u32>,
}

impl GenerateParams {
    /// Checks a request against the model; every error names the offending field.
    pub fn validate(&self, prompt: &[u32], cfg: &ModelConfig) -> Result<()> {
        if prompt.is_empty() {
            return Err(Error::InvalidInput { field: "prompt", message: "must contain at least one token".into() });
        }
        if let Some(&token) = prompt.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(Error::TokenOutOfRange { field: "prompt", token, vocab: cfg.vocab_size });
        }
        if self.max_new_tokens == 0 {
            return Err(Error::InvalidInput { field: "max_new_tokens", message: "must be at least 1".into() });
        }
        let max_ctx = cfg.max_context();
        if prompt.len().saturating_add(self.max_new_tokens) > max_ctx {
            return Err(Error::InvalidInput {
                field: "max_new_tokens",
                message: format!(
                    "prompt ({} tokens) + max_new_tokens ({}) exceeds the model's context length {max_ctx}",
                    prompt.len(),
                    self.max_new_tokens
                ),
            });
        }
        self.sampling.validate()
    }

    /// Why a sequence ends after emitting `token` as its `generated`-th new token, with
    /// `total` tokens (prompt included) against the model's `max_context`; `None` to go on.
    /// The one rule for the engine and [`generate`].
    pub fn finish_after(&self, token: u32, generated: usize, total: usize, max_context: usize) -> Option<FinishReason> {
        if self.stop_token_ids.contains(&token) {
            Some(FinishReason::Stop)
        } else if generated >= self.max_new_tokens || total >= max_context {
            Some(FinishReason::Length)
        } else {
            None
        }
    }
}

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

#[derive(Debug, Clone)]
pub struct Generation {
    pub token_ids: Vec<u32>,
    pub finish_reason: FinishReason,
    /// From the start of the prefill to the first generated token.
    pub time_to_first_token: Duration,
    /// From the start of the prefill to the last generated token.
    pub total: Duration,
}

impl Generation {
    /// Decode speed: tokens after the first over the time after the first (the prefill is
    /// reported separately as time to first token). With one token, that token over its time.
    pub fn tokens_per_second(&self) -> f64 {
        let n = self.token_ids.len();
        let decode = self.total.saturating_sub(self.time_to_first_token).as_secs_f64();
        if n > 1 && decode > 0.0 {
            (n - 1) as f64 / decode
        } else {
            n as f64 / self.total.as_secs_f64().max(f64::MIN_POSITIVE)
        }
    }
}

/// Generates a continuation of `prompt`, calling `on_token` as each token is chosen.
pub fn generate(
    model: &mut Model,
    prompt: &[u32],
    params: &GenerateParams,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    params.validate(prompt, model.config())?;
    let start = Instant::now();
    let mut cache = ContiguousKvCache::new(model.config().num_layers);
    let mut sampler = SeqSampler::new(params.sampling.clone(), prompt);
    let mut scratch = Scratch::default();
    let rope_alpha = model.config().ntk_alpha(prompt.len());
    let mut seq = SeqChunk { seq_id: 0, context_len: 0, len: prompt.len(), rope_alpha };
    let mut input = prompt.to_vec();
    let mut tokens = Vec::with_capacity(params.max_new_tokens.min(model.config().max_context()));
    let mut ttft = None;
    let finish_reason = loop {
        let logits = model.forward(&input, &[seq], &mut cache)?;
        let next = if params.sampling.is_plain_greedy() {
            // No need for the row on the host: argmax where the logits are.
            let t = logits.argmax(D::Minus1)?.to_vec1::<u32>()?[0];
            sampler.accept(t);
            t
        } else {
            let row = logits.squeeze(0)?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
            sampler.sample(&row, &mut scratch).token
        };
        ttft.get_or_insert_with(|| start.elapsed());
        tokens.push(next);
        on_token(next)?;
        let total = prompt.len() + tokens.len();
        if let Some(reason) = params.finish_after(next, tokens.len(), total, model.config().max_context()) {
            break reason;
        }
        seq.context_len += seq.len;
        seq.len = 1;
        input.clear();
        input.push(next);
    };
    Ok(Generation {
        token_ids: tokens,
        finish_reason,
        time_to_first_token: ttft.unwrap_or_default(),
        total: start.elapsed(),
    })
}
