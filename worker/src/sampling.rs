//! Per-request sampling: penalties, temperature, top-k, top-p, min-p, a seeded draw, and the
//! logprobs of the chosen token and its top alternatives.
//!
//! Each draw uses an RNG derived from (seed, index of the generated token) alone, so a request's
//! tokens do not depend on what else shares its batch, nor on preemption and recompute.

use std::collections::HashMap;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::error::{Error, Result};
pub use crate::kernels::reference::argmax;

/// How one request's next tokens are chosen. Neutral values switch each stage off.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f64,
    /// 0 means off.
    pub top_k: usize,
    /// 1 means off.
    pub top_p: f64,
    /// Keep tokens at least `min_p` times as likely as the most likely one; 0 means off.
    pub min_p: f64,
    /// HF-style: divides positive logits (multiplies negative ones) of every token seen in the
    /// prompt or output; 1 means off.
    pub repetition_penalty: f64,
    /// OpenAI-style, over generated tokens: subtracted once per distinct token.
    pub presence_penalty: f64,
    /// OpenAI-style, over generated tokens: subtracted per occurrence.
    pub frequency_penalty: f64,
    pub seed: u64,
    /// How many top alternatives to report with each token's logprob; `None` reports none.
    pub logprobs: Option<usize>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: 0,
            logprobs: None,
        }
    }
}

const GREEDY_BELOW: f64 = 1e-5;

/// Most alternatives a request may ask for with each token.
pub const MAX_TOP_LOGPROBS: usize = qwen_proto::limits::MAX_TOP_LOGPROBS as usize;

impl SamplingParams {
    pub fn greedy() -> Self {
        Self::default()
    }

    /// Temperatures this small are greedy (as in vLLM): dividing by them overflows f32.
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW
    }

    /// Whether the chosen token is the plain argmax of the raw logits (no penalties, greedy),
    /// so the engine may take it on the device without copying the row.
    pub fn is_plain_greedy(&self) -> bool {
        self.is_greedy()
            && self.repetition_penalty == 1.0
            && self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
            && self.logprobs.is_none()
    }

    /// Whether a device-side sampler can choose the tokens: penalties need the request's
    /// history and logprobs the whole row, both on the host.
    pub fn is_device_samplable(&self) -> bool {
        self.repetition_penalty == 1.0
            && self.presence_penalty == 0.0
            && self.frequency_penalty == 0.0
            && self.logprobs.is_none()
    }

    /// Rejects out-of-range values, naming the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &'static str, message: String| Err(Error::InvalidInput { field, message });
        if !(self.temperature.is_finite() && self.temperature >= 0.0) {
            return bad("temperature", format!("{} must be a finite number >= 0 (0 is greedy)", self.temperature));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("{} must be in (0, 1]", self.top_p));
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", format!("{} must be in [0, 1]", self.min_p));
        }
        if !(self.repetition_penalty.is_finite() && self.repetition_penalty > 0.0) {
            return bad("repetition_penalty", format!("{} must be a positive number", self.repetition_penalty));
        }
        for (field, v) in [("presence_penalty", self.presence_penalty), ("frequency_penalty", self.frequency_penalty)] {
            if !(-2.0..=2.0).contains(&v) {
                return bad(field, format!("{v} must be in [-2, 2]"));
            }
        }
        if let Some(n) = self.logprobs.filter(|&n| n > MAX_TOP_LOGPROBS) {
            return bad("top_logprobs", format!("{n} is more than the {MAX_TOP_LOGPROBS} supported"));
        }
        Ok(())
    }
}

/// A chosen token with its log-probability under the model (raw logits, before any penalty or
/// temperature) and the most likely alternatives.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Set when the request asked for logprobs.
    pub logprob: Option<f32>,
    pub top: Vec<(u32, f32)>,
}

/// Buffers reused across rows and steps.
#[derive(Default)]
pub struct Scratch {
    logits: Vec<f32>,
    probs: Vec<(f32, u32)>,
}

/// One sequence's sampling state: its parameters and the tokens penalties look at.
pub struct SeqSampler {
    params: SamplingParams,
    /// Every token of prompt and output (repetition penalty).
    seen: HashMap<u32, ()>,
    /// Occurrences of each generated token (presence and frequency penalties).
    counts: HashMap<u32, u32>,
    generated: u64,
}

impl SeqSampler {
    pub fn new(params: SamplingParams, prompt: &[u32]) -> Self {
        let seen =
            if params.repetition_penalty != 1.0 { prompt.iter().map(|&t| (t, ())).collect() } else { HashMap::new() };
        SeqSampler { params, seen, counts: HashMap::new(), generated: 0 }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Chooses the next token from one row of raw logits and records it.
    pub fn sample(&mut self, raw: &[f32], scratch: &mut Scratch) -> Sampled {
        let (logprob_of, top) = match self.params.logprobs {
            Some(n) => log_softmax_top(raw, n),
            None => (None, Vec::new()),
        };
        scratch.logits.clear();
        scratch.logits.extend_from_slice(raw);
        self.apply_penalties(&mut scratch.logits);
        let token = if self.params.is_greedy() { argmax(&scratch.logits) } else { self.draw(scratch) };
        let logprob = logprob_of.map(|lse| raw[token as usize] - lse);
        self.accept(token);
        Sampled { token, logprob, top }
    }

    /// The next token's parameters for [`crate::kernels::sample_rows`], with the uniform the host
    /// draw would use for it (same seed and stream), so a seeded request stays reproducible.
    pub fn device_draw(&self) -> crate::kernels::DrawParams {
        let p = &self.params;
        let mut rng = ChaCha20Rng::seed_from_u64(p.seed);
        rng.set_stream(self.generated);
        crate::kernels::DrawParams {
            temperature: if p.is_greedy() { 0.0 } else { p.temperature as f32 },
            top_k: p.top_k,
            top_p: p.top_p as f32,
            min_p: p.min_p as f32,
            u: rng.random::<f32>(),
        }
    }

    /// Records a token chosen elsewhere (e.g. a device-side argmax).
    pub fn accept(&mut self, token: u32) {
        self.generated += 1;
        if self.params.repetition_penalty != 1.0 {
            self.seen.insert(token, ());
        }
        if self.params.presence_penalty != 0.0 || self.params.frequency_penalty != 0.0 {
            *self.counts.entry(token).or_default() += 1;
        }
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let rp = self.params.repetition_penalty as f32;
        if rp != 1.0 {
            for &t in self.seen.keys() {
                if let Some(l) = logits.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / rp } else { *l * rp };
                }
            }
        }
        let (presence, frequency) = (self.params.presence_penalty as f32, self.params.frequency_penalty as f32);
        for (&t, &n) in &self.counts {
            if let Some(l) = logits.get_mut(t as usize) {
                *l -= presence + frequency * n as f32;
            }
        }
    }

    fn draw(&self, scratch: &mut Scratch) -> u32 {
        let p = &self.params;
        let inv_t = (1.0 / p.temperature) as f32;
        let max = scratch.logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        scratch.probs.clear();
        scratch.probs.extend(scratch.logits.iter().enumerate().map(|(i, &l)| (((l - max) * inv_t).exp(), i as u32)));
        let probs = &mut scratch.probs;
        // Descending probability, ties by lower id: a deterministic order for truncation.
        let by_prob = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if p.top_k > 0 && p.top_k < probs.len() {
            probs.select_nth_unstable_by(p.top_k, by_prob);
            probs.truncate(p.top_k);
        }
        if p.top_p < 1.0 || p.min_p > 0.0 {
            probs.sort_unstable_by(by_prob);
            if p.min_p > 0.0 {
                let floor = probs[0].0 * p.min_p as f32;
                let keep = probs.iter().take_while(|x| x.0 >= floor).count();
                probs.truncate(keep.max(1));
            }
            if p.top_p < 1.0 {
                let total: f32 = probs.iter().map(|x| x.0).sum();
                let mut mass = 0.0;
                let mut keep = 0;
                for x in probs.iter() {
                    mass += x.0 / total;
                    keep += 1;
                    if mass as f64 >= p.top_p {
                        break;
                    }
                }
                probs.truncate(keep.max(1));
            }
        }
        let total: f32 = probs.iter().map(|x| x.0).sum();
        let mut rng = ChaCha20Rng::seed_from_u64(p.seed);
        rng.set_stream(self.generated);
        let mut r = rng.random::<f32>() * total;
        for &(q, id) in probs.iter() {
            if r < q {
                return id;
            }
            r -= q;
        }
        probs.last().map_or(0, |x| x.1)
    }
}

/// log-sum-exp of `row` and its `n` most likely entries as (id, logprob).
fn log_softmax_top(row: &[f32], n: usize) -> (Option<f32>, Vec<(u32, f32)>) {
    let max = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + row.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(n + 1);
    for (i, &l) in row.iter().enumerate() {
        if top.len() < n || top.last().is_some_and(|&(_, v)| l > v) {
            let at = top.partition_point(|&(_, v)| v >= l);
            top.insert(at, (i as u32, l));
            top.truncate(n);
        }
    }
    (Some(lse), top.into_iter().map(|(i, l)| (i, l - lse)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams { temperature: 1.0, ..SamplingParams::default() };
        f(&mut p);
        p
    }

    fn draws(p: SamplingParams, row: &[f32], n: usize) -> Vec<u32> {
        let mut s = SeqSampler::new(p, &[]);
        let mut scratch = Scratch::default();
        (0..n).map(|_| s.sample(row, &mut scratch).token).collect()
    }

    #[test]
    fn greedy_is_the_argmax() {
        assert_eq!(draws(SamplingParams::greedy(), &[0.1, 3.0, -1.0, 3.0], 3), vec![1, 1, 1]);
    }

    #[test]
    fn top_p_keeps_only_the_nucleus() {
        // softmax([2, 1, 0]) ~ [0.665, 0.245, 0.090].
        let row = [2.0f32, 1.0, 0.0];
        assert!(draws(params(|p| p.top_p = 0.5), &row, 200).iter().all(|&t| t == 0));
        let seen = draws(params(|p| p.top_p = 0.8), &row, 300);
        assert!(seen.contains(&0) && seen.contains(&1) && !seen.contains(&2));
    }

    #[test]
    fn top_k_keeps_the_k_most_likely() {
        let seen = draws(params(|p| p.top_k = 2), &[1.0, 3.0, 2.9, 0.5], 300);
        assert!(seen.contains(&1) && seen.contains(&2) && !seen.contains(&0) && !seen.contains(&3));
    }

    #[test]
    fn min_p_drops_tokens_far_below_the_best() {
        // probabilities ~ [0.50, 0.30, 0.18, 0.02]: min_p 0.2 keeps p >= 0.1.
        let row = [0.0f32, -0.51, -1.02, -3.2];
        let seen = draws(params(|p| p.min_p = 0.2), &row, 400);
        assert!(seen.contains(&0) && seen.contains(&1) && seen.contains(&2) && !seen.contains(&3));
    }

    #[test]
    fn a_vanishing_temperature_is_greedy_not_garbage() {
        assert_eq!(draws(params(|p| p.temperature = 1e-39), &[0.0, 5.0, 1.0], 3), vec![1, 1, 1]);
    }

    #[test]
    fn temperature_sharpens_and_flattens() {
        let row = [1.0f32, 1.2, 0.9];
        assert!(draws(params(|p| p.temperature = 0.01), &row, 100).iter().all(|&t| t == 1));
        let hot = draws(params(|p| p.temperature = 100.0), &row, 300);
        assert!((0..3).all(|t| hot.contains(&t)));
    }

    #[test]
    fn repetition_penalty_follows_hf() {
        // Token 0 is in the prompt: its positive logit 2.0 becomes 2.0 / 4 = 0.5 < 1.0.
        let mut s = SeqSampler::new(SamplingParams { repetition_penalty: 4.0, ..SamplingParams::greedy() }, &[0]);
        assert_eq!(s.sample(&[2.0, 1.0], &mut Scratch::default()).token, 1);
        // A negative logit is multiplied: -1 * 4 = -4 < -2.
        let mut s = SeqSampler::new(SamplingParams { repetition_penalty: 4.0, ..SamplingParams::greedy() }, &[0]);
        assert_eq!(s.sample(&[-1.0, -2.0], &mut Scratch::default()).token, 1);
    }

    #[test]
    fn presence_and_frequency_penalties_count_generated_tokens() {
        let row = [2.0f32, 1.5, 0.0];
        let mut scratch = Scratch::default();
        // Presence 1.0: after token 0 once, 2.0 - 1.0 = 1.0 < 1.5 → token 1, then 1.5 - 1 = 0.5 < 1.0 → token 0.
        let mut s = SeqSampler::new(SamplingParams { presence_penalty: 1.0, ..SamplingParams::greedy() }, &[]);
        let got: Vec<u32> = (0..3).map(|_| s.sample(&row, &mut scratch).token).collect();
        assert_eq!(got, vec![0, 1, 0]);
        // Frequency 0.3: token 0 stays ahead until 2.0 - 0.3n < 1.5, i.e. after 2 uses.
        let mut s = SeqSampler::new(SamplingParams { frequency_penalty: 0.3, ..SamplingParams::greedy() }, &[]);
        let got: Vec<u32> = (0..3).map(|_| s.sample(&row, &mut scratch).token).collect();
        assert_eq!(got, vec![0, 0, 1]);
    }

    #[test]
    fn seeded_draws_depend_only_on_seed_and_position() {
        let row = [1.0f32; 8];
        let a = draws(params(|p| p.seed = 5), &row, 32);
        assert_eq!(a, draws(params(|p| p.seed = 5), &row, 32));
        assert_ne!(a, draws(params(|p| p.seed = 6), &row, 32));
        // A sampler interleaved with another gives the same tokens.
        let (mut x, mut y) =
            (SeqSampler::new(params(|p| p.seed = 5), &[]), SeqSampler::new(params(|p| p.seed = 9), &[]));
        let mut scratch = Scratch::default();
        let mixed: Vec<u32> = (0..32)
            .map(|_| {
                y.sample(&row, &mut scratch);
                x.sample(&row, &mut scratch).token
            })
            .collect();
        assert_eq!(a, mixed);
    }

    #[test]
    fn logprobs_are_of_the_raw_distribution() {
        let row = [2.0f32, 1.0, 0.0];
        let lse = (2f32.exp() + 1f32.exp() + 1.0).ln();
        let mut s = SeqSampler::new(SamplingParams { logprobs: Some(2), ..SamplingParams::greedy() }, &[]);
        let out = s.sample(&row, &mut Scratch::default());
        assert_eq!(out.token, 0);
        assert!((out.logprob.unwrap() - (2.0 - lse)).abs() < 1e-6);
        assert_eq!(out.top.iter().map(|t| t.0).collect::<Vec<_>>(), vec![0, 1]);
        assert!((out.top[1].1 - (1.0 - lse)).abs() < 1e-6);
    }

    #[test]
    fn validation_names_the_field() {
        let cases = [
            (params(|p| p.temperature = -1.0), "temperature"),
            (params(|p| p.top_p = 0.0), "top_p"),
            (params(|p| p.top_p = 1.5), "top_p"),
            (params(|p| p.min_p = 2.0), "min_p"),
            (params(|p| p.repetition_penalty = 0.0), "repetition_penalty"),
            (params(|p| p.presence_penalty = 3.0), "presence_penalty"),
            (params(|p| p.logprobs = Some(100)), "top_logprobs"),
        ];
        for (p, field) in cases {
            let err = p.validate().unwrap_err();
            assert!(err.to_string().contains(field), "{field}: {err}");
        }
        assert!(params(|_| {}).validate().is_ok());
    }
}
