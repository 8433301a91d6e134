//! One-sequence generation: prefill, then decode until a stop token or the token limit. This is
//! the foundation's path for the `generate` command and for golden tests; the batching engine
//! drives [`Model::forward`] the same way for many sequences at once.

use std::time::{Duration, Instant};

use candle_core::{DType, Tensor, D};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::error::{Error, Result};
use crate::model::{ContiguousKvCache, Model, SeqChunk};

/// How the next token is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Sampling {
    Greedy,
    /// Softmax at `temperature`, restricted to the smallest set of tokens whose probability
    /// reaches `top_p` (and to the `top_k` most likely when set), drawn with a seeded RNG.
    Random {
        temperature: f64,
        top_p: f64,
        top_k: Option<usize>,
        seed: u64,
    },
}

#[derive(Debug, Clone)]
pub struct GenerateParams {
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Generation stops after emitting one of these (the model's eos ids by default).
    pub stop_token_ids: Vec<u32>,
}

impl GenerateParams {
    /// Checks the request against the model; every error names the offending field.
    pub fn validate(&self, prompt: &[u32], model: &Model) -> Result<()> {
        let cfg = model.config();
        if prompt.is_empty() {
            return Err(Error::InvalidInput { field: "prompt", message: "must contain at least one token".into() });
        }
        if let Some(&token) = prompt.iter().find(|&&t| t as usize >= cfg.vocab_size) {
            return Err(Error::TokenOutOfRange { field: "prompt", token, vocab: cfg.vocab_size });
        }
        if self.max_new_tokens == 0 {
            return Err(Error::InvalidInput { field: "max_new_tokens", message: "must be at least 1".into() });
        }
        let max_ctx = model.config().max_context();
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
        if let Sampling::Random { temperature, top_p, top_k, .. } = self.sampling {
            if !(temperature.is_finite() && temperature > 0.0) {
                return Err(Error::InvalidInput {
                    field: "temperature",
                    message: format!("{temperature} must be a positive number (omit it for greedy)"),
                });
            }
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(Error::InvalidInput { field: "top_p", message: format!("{top_p} must be in (0, 1]") });
            }
            if top_k == Some(0) {
                return Err(Error::InvalidInput { field: "top_k", message: "must be at least 1 when set".into() });
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_new_tokens` reached.
    Length,
    /// A stop token was generated.
    Stop,
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

/// Chooses next tokens from `[batch, vocab]` logits.
pub struct Sampler {
    sampling: Sampling,
    rng: ChaCha20Rng,
    /// Reused across steps: (probability, token id) of the host-side candidates.
    scratch: Vec<(f32, u32)>,
}

impl Sampler {
    pub fn new(sampling: Sampling) -> Self {
        let seed = match sampling {
            Sampling::Random { seed, .. } => seed,
            Sampling::Greedy => 0,
        };
        Sampler { sampling, rng: ChaCha20Rng::seed_from_u64(seed), scratch: Vec::new() }
    }

    /// One token per row of `logits`.
    pub fn sample(&mut self, logits: &Tensor) -> Result<Vec<u32>> {
        match self.sampling {
            // Greedy needs no logits on the host: argmax on the device, one id per row back.
            Sampling::Greedy => Ok(logits.argmax(D::Minus1)?.to_vec1::<u32>()?),
            Sampling::Random { temperature, top_p, top_k, .. } => {
                let rows = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                Ok(rows.iter().map(|row| self.sample_row(row, temperature, top_p, top_k)).collect())
            }
        }
    }

    fn sample_row(&mut self, row: &[f32], temperature: f64, top_p: f64, top_k: Option<usize>) -> u32 {
        let inv_t = (1.0 / temperature) as f32;
        let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        self.scratch.clear();
        self.scratch.extend(row.iter().enumerate().map(|(i, &l)| (((l - max) * inv_t).exp(), i as u32)));
        // Only truncation needs an order; full-vocabulary sampling draws from the weights as they
        // are. Descending by probability, ties by lower id, so the order is deterministic.
        if top_k.is_some() || top_p < 1.0 {
            let by_prob = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
            if let Some(k) = top_k.filter(|&k| k < self.scratch.len()) {
                self.scratch.select_nth_unstable_by(k, by_prob);
                self.scratch.truncate(k);
            }
            self.scratch.sort_unstable_by(by_prob);
            let total: f32 = self.scratch.iter().map(|p| p.0).sum();
            let mut kept = 0;
            let mut mass = 0.0;
            for &(p, _) in &self.scratch {
                mass += p / total;
                kept += 1;
                if mass as f64 >= top_p {
                    break;
                }
            }
            self.scratch.truncate(kept.max(1));
        }
        let kept_total: f32 = self.scratch.iter().map(|p| p.0).sum();
        let mut r = self.rng.random::<f32>() * kept_total;
        for &(p, id) in &self.scratch {
            if r < p {
                return id;
            }
            r -= p;
        }
        self.scratch.last().map_or(0, |p| p.1)
    }
}

/// Generates a continuation of `prompt`, calling `on_token` as each token is chosen.
pub fn generate(
    model: &mut Model,
    prompt: &[u32],
    params: &GenerateParams,
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<Generation> {
    params.validate(prompt, model)?;
    let start = Instant::now();
    let mut cache = ContiguousKvCache::new(model.config().num_layers);
    let mut sampler = Sampler::new(params.sampling);
    let rope_alpha = model.config().ntk_alpha(prompt.len());
    let mut seq = SeqChunk { seq_id: 0, context_len: 0, len: prompt.len(), rope_alpha };
    let mut input = prompt.to_vec();
    let mut tokens = Vec::with_capacity(params.max_new_tokens.min(model.config().max_context()));
    let mut ttft = None;
    let finish_reason = loop {
        let logits = model.forward(&input, &[seq], &mut cache)?;
        let next = sampler.sample(&logits)?[0];
        ttft.get_or_insert_with(|| start.elapsed());
        tokens.push(next);
        on_token(next)?;
        if params.stop_token_ids.contains(&next) {
            break FinishReason::Stop;
        }
        if tokens.len() >= params.max_new_tokens {
            break FinishReason::Length;
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn logits(rows: &[&[f32]]) -> Tensor {
        let v: Vec<f32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(v, (rows.len(), rows[0].len()), &Device::Cpu).unwrap()
    }

    #[test]
    fn greedy_takes_the_argmax_of_each_row() {
        let mut s = Sampler::new(Sampling::Greedy);
        assert_eq!(s.sample(&logits(&[&[0.1, 3.0, -1.0], &[5.0, 0.0, 4.9]])).unwrap(), vec![1, 0]);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // Probabilities ~ [0.665, 0.245, 0.090]: top_p 0.5 leaves only token 0.
        let row = [2.0f32, 1.0, 0.0];
        let mut s = Sampler::new(Sampling::Random { temperature: 1.0, top_p: 0.5, top_k: None, seed: 7 });
        for _ in 0..200 {
            assert_eq!(s.sample(&logits(&[&row])).unwrap(), vec![0]);
        }
        // top_p 0.8 keeps tokens 0 and 1, never 2.
        let mut s = Sampler::new(Sampling::Random { temperature: 1.0, top_p: 0.8, top_k: None, seed: 7 });
        let seen: Vec<u32> = (0..300).map(|_| s.sample(&logits(&[&row])).unwrap()[0]).collect();
        assert!(seen.contains(&0) && seen.contains(&1) && !seen.contains(&2));
    }

    #[test]
    fn top_k_and_seed_are_respected() {
        let row = [1.0f32, 1.0, 1.0, 1.0];
        let draw = |seed| {
            let mut s = Sampler::new(Sampling::Random { temperature: 1.0, top_p: 1.0, top_k: Some(2), seed });
            (0..64).map(|_| s.sample(&logits(&[&row])).unwrap()[0]).collect::<Vec<_>>()
        };
        let a = draw(1);
        assert!(a.iter().all(|&t| t < 2), "top_k 2 keeps ids 0 and 1 (ties by id)");
        assert_eq!(a, draw(1));
        assert_ne!(a, draw(2));
    }

    #[test]
    fn low_temperature_concentrates_on_the_max() {
        let row = [1.0f32, 1.2, 0.9];
        let mut s = Sampler::new(Sampling::Random { temperature: 0.01, top_p: 1.0, top_k: None, seed: 3 });
        for _ in 0..100 {
            assert_eq!(s.sample(&logits(&[&row])).unwrap(), vec![1]);
        }
    }
}
