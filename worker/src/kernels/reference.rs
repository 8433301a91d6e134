//! CPU references of the CUDA kernels in `worker/kernels/`: the same steps in the same order, in
//! f32 over plain slices, with the same roundings to the storage dtype. They run the fused path
//! on the CPU (so the whole path is tested without a GPU against the unfused model) and are
//! what each kernel is checked against on the GPU.

use candle_core::DType;
use half::{bf16, f16};

/// `x` as stored in `dtype` and read back.
pub fn round_to(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => bf16::from_f32(x).to_f32(),
        DType::F16 => f16::from_f32(x).to_f32(),
        _ => x,
    }
}

/// `(x + res, rmsnorm(x + res) * w)` per row of `hidden`; the sum is rounded to `dtype` before
/// it is normalised, as the unfused path stores it.
pub fn add_rms_norm(x: &[f32], res: &[f32], w: &[f32], eps: f32, dtype: DType) -> (Vec<f32>, Vec<f32>) {
    let hidden = w.len();
    let sum: Vec<f32> = x.iter().zip(res).map(|(a, b)| round_to(a + b, dtype)).collect();
    let mut normed = Vec::with_capacity(sum.len());
    for row in sum.chunks(hidden) {
        let ss: f32 = row.iter().map(|v| v * v).sum();
        let inv = 1.0 / (ss / hidden as f32 + eps).sqrt();
        normed.extend(row.iter().zip(w).map(|(v, w)| round_to(v * inv * w, dtype)));
    }
    (sum, normed)
}

/// `silu(gate) * up` for rows of `[gate | up]` (each half `f` wide), silu rounded to `dtype`.
pub fn silu_mul(x: &[f32], f: usize, dtype: DType) -> Vec<f32> {
    let mut out = Vec::with_capacity(x.len() / 2);
    for row in x.chunks(2 * f) {
        let (gate, up) = row.split_at(f);
        out.extend(gate.iter().zip(up).map(|(&g, &u)| round_to(round_to(g / (1.0 + (-g).exp()), dtype) * u, dtype)));
    }
    out
}

/// Rotate-half rotary over the first `rot` dims of each head of `x` `[tokens, heads, head_dim]`
/// (contiguous), in place; `cos`/`sin` are `[tokens, rot / 2]`. The optional per-token `qscale`
/// multiplies the whole head after rotation.
pub fn rotary(x: &mut [f32], cos: &[f32], sin: &[f32], qscale: Option<&[f32]>, shape: [usize; 3], dtype: DType) {
    let [tokens, heads, head_dim] = shape;
    let half = cos.len().checked_div(tokens).unwrap_or(0);
    for t in 0..tokens {
        let scale = qscale.map(|s| s[t]);
        for h in 0..heads {
            let row = &mut x[(t * heads + h) * head_dim..][..head_dim];
            for i in 0..half {
                let (c, s) = (cos[t * half + i], sin[t * half + i]);
                let (x1, x2) = (row[i], row[i + half]);
                let (mut a, mut b) = (round_to(x1 * c - x2 * s, dtype), round_to(x2 * c + x1 * s, dtype));
                if let Some(q) = scale {
                    a *= q;
                    b *= q;
                }
                row[i] = round_to(a, dtype);
                row[i + half] = round_to(b, dtype);
            }
            if let Some(q) = scale {
                for v in &mut row[2 * half..] {
                    *v = round_to(*v * q, dtype);
                }
            }
        }
    }
}

/// One sequence of a paged-attention batch, as the kernels' metadata row describes it.
#[derive(Debug, Clone, PartialEq)]
pub struct AttnSeq {
    /// First new token of the sequence in the flat batch.
    pub q_start: usize,
    /// New tokens (queries) of the sequence.
    pub q_len: usize,
    /// Cached plus new tokens: the keys the last query sees.
    pub context_len: usize,
    /// Cache blocks holding positions `0..context_len`, in order.
    pub blocks: Vec<u32>,
}

/// Shapes of a paged-attention call.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttnShape {
    pub q_heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub scale: f32,
}

/// Causal attention of each new token over its sequence's cached and new keys, read through the
/// block table. `q`: `[T, q_heads, head_dim]`; caches `[slots, kv_heads, head_dim]`; returns
/// `[T, q_heads, head_dim]` (unrounded). Online softmax in position order, as the kernels do.
pub fn paged_attention(q: &[f32], k_cache: &[f32], v_cache: &[f32], seqs: &[AttnSeq], s: AttnShape) -> Vec<f32> {
    let AttnShape { q_heads, kv_heads, head_dim: d, block_size, scale } = s;
    let group = q_heads / kv_heads;
    let tokens = q.len() / (q_heads * d);
    let mut out = vec![0f32; tokens * q_heads * d];
    let mut acc = vec![0f32; d];
    for seq in seqs {
        let before = seq.context_len - seq.q_len;
        for i in 0..seq.q_len {
            let t = seq.q_start + i;
            for h in 0..q_heads {
                let kvh = h / group;
                let qv: Vec<f32> = q[(t * q_heads + h) * d..][..d].iter().map(|v| v * scale).collect();
                let (mut m, mut l) = (f32::NEG_INFINITY, 0f32);
                acc.iter_mut().for_each(|a| *a = 0.0);
                for j in 0..=before + i {
                    let slot = seq.blocks[j / block_size] as usize * block_size + j % block_size;
                    let row = (slot * kv_heads + kvh) * d;
                    let score: f32 = qv.iter().zip(&k_cache[row..row + d]).map(|(a, b)| a * b).sum();
                    let mn = m.max(score);
                    let (c, p) = ((m - mn).exp(), (score - mn).exp());
                    l = l * c + p;
                    for (a, v) in acc.iter_mut().zip(&v_cache[row..row + d]) {
                        *a = *a * c + p * v;
                    }
                    m = mn;
                }
                for (o, a) in out[(t * q_heads + h) * d..][..d].iter_mut().zip(&acc) {
                    *o = a / l;
                }
            }
        }
    }
    out
}

/// Index of the largest value; the lowest index among equals.
pub fn argmax(row: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in row.iter().enumerate() {
        if v > row[best] {
            best = i;
        }
    }
    best as u32
}

/// Per-row sampling parameters, as the sampling kernel reads them.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrawParams {
    pub temperature: f32,
    pub top_k: usize,
    pub top_p: f32,
    pub min_p: f32,
    /// Uniform draw in `[0, 1)`.
    pub u: f32,
}

impl DrawParams {
    /// The five f32s of the kernel's parameter row.
    pub fn to_row(self) -> [f32; 5] {
        [self.temperature, self.top_k as f32, self.top_p, self.min_p, self.u]
    }
}

/// Steps of the threshold bisections (as `QS_BISECT_STEPS` in sampling.cu).
const BISECT_STEPS: usize = 30;

/// The sampling kernel's choice for one row: greedy below temperature 1e-5, otherwise top-k,
/// min-p and top-p as one threshold on `p = exp((x - max) / temperature)` and the first token, in
/// id order, at which the running kept mass passes `u` times the kept mass.
pub fn sample_row(logits: &[f32], params: DrawParams) -> u32 {
    let best = argmax(logits);
    let Some((p, thr)) = kept_probs(logits, params) else { return best };
    let r = params.u * p.iter().filter(|&&v| v >= thr).sum::<f32>();
    let mut running = 0f32;
    let mut last = best;
    for (i, &v) in p.iter().enumerate() {
        if v >= thr && v > 0.0 {
            running += v;
            last = i as u32;
            if r < running {
                return i as u32;
            }
        }
    }
    last
}

/// The unnormalised probabilities `p` of a sampled row and the threshold a token's `p` must
/// reach to be kept; `None` for a greedy row.
pub fn kept_probs(logits: &[f32], params: DrawParams) -> Option<(Vec<f32>, f32)> {
    if params.temperature < 1e-5 || logits.is_empty() {
        return None;
    }
    let max = logits[argmax(logits) as usize];
    let inv_t = 1.0 / params.temperature;
    let p: Vec<f32> = logits.iter().map(|&x| ((x - max) * inv_t).exp()).collect();
    let bisect = |mut lo: f32, keep: &dyn Fn(f32) -> bool| {
        let mut hi = 2f32;
        for _ in 0..BISECT_STEPS {
            let mid = 0.5 * (lo + hi);
            if keep(mid) {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        lo
    };
    let mut base = 0f32;
    if params.top_k > 0 && params.top_k < p.len() {
        base = bisect(0.0, &|t| p.iter().filter(|&&v| v >= t).count() >= params.top_k);
    }
    if params.min_p > 0.0 {
        base = base.max(params.min_p);
    }
    let mass_from = |t: f32| p.iter().filter(|&&v| v >= t).sum::<f32>();
    let thr = if params.top_p < 1.0 {
        let target = params.top_p * mass_from(base);
        bisect(base, &|t| mass_from(t) >= target)
    } else {
        base
    };
    Some((p, thr))
}

/// One MoE layer's expert shapes for [`moe_experts`].
#[derive(Debug, Clone, Copy)]
pub struct MoeShape {
    pub top_k: usize,
    /// The first expert this rank holds, and how many.
    pub first: usize,
    pub local: usize,
    pub hidden: usize,
    /// Each local expert's (this rank's share of the) intermediate width.
    pub ff: usize,
}

/// The routed experts' weighted sum for every token: `x` `[T, hidden]`, `ids`/`weights`
/// `[T, top_k]`, `gate_up` `[local, 2 ff, hidden]` (gate rows first), `down`
/// `[local, hidden, ff]`. Slots routed to experts outside `first..first + local` add nothing.
/// Per (token, slot) as the kernel's grouped rows: gate and up rounded to `dtype`, silu rounded,
/// their product rounded, the down projection rounded; the slots summed in f32 in slot order and
/// rounded once. Dot products run over the inner dimension in order.
pub fn moe_experts(
    x: &[f32],
    ids: &[u32],
    weights: &[f32],
    gate_up: &[f32],
    down: &[f32],
    s: MoeShape,
    dtype: DType,
) -> Vec<f32> {
    let (h, f) = (s.hidden, s.ff);
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).fold(0.0f32, |acc, (x, y)| acc + x * y);
    let tokens = x.len() / h;
    let mut out = Vec::with_capacity(x.len());
    let (mut act, mut acc) = (vec![0.0f32; f], vec![0.0f32; h]);
    for t in 0..tokens {
        let row = &x[t * h..(t + 1) * h];
        acc.fill(0.0);
        for j in 0..s.top_k {
            let Some(e) = (ids[t * s.top_k + j] as usize).checked_sub(s.first).filter(|&e| e < s.local) else {
                continue;
            };
            let gu = &gate_up[e * 2 * f * h..(e + 1) * 2 * f * h];
            for (n, a) in act.iter_mut().enumerate() {
                let gate = round_to(dot(row, &gu[n * h..(n + 1) * h]), dtype);
                let up = round_to(dot(row, &gu[(f + n) * h..(f + n + 1) * h]), dtype);
                *a = round_to(round_to(gate / (1.0 + (-gate).exp()), dtype) * up, dtype);
            }
            let d = &down[e * h * f..(e + 1) * h * f];
            let w = weights[t * s.top_k + j];
            for (n, a) in acc.iter_mut().enumerate() {
                *a += w * round_to(dot(&act, &d[n * f..(n + 1) * f]), dtype);
            }
        }
        out.extend(acc.iter().map(|&v| round_to(v, dtype)));
    }
    out
}
