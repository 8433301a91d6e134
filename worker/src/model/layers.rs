//! Building blocks every Qwen generation shares: linear layers, RMSNorm, the gated SiLU MLP,
//! rotary tables, and the decoder stack that runs them over a flat varlen batch.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::attention::{Attention, BatchMeta};
use crate::comm::Comm;
use crate::error::Result;
use crate::kernels::{self, KernelMode};
use crate::weights::Weights;

pub struct Linear {
    weight: LinearWeight,
    bias: Option<Tensor>,
}

enum LinearWeight {
    Dense(Tensor),
    /// Kept quantized; dequantized a tile at a time by each forward.
    Quant(std::sync::Arc<crate::quant::QuantWeight>),
    /// Projections fused by [`Linear::concat`] that cannot share one tensor (quantized parts,
    /// each with its own packing): their outputs side by side.
    Parts(Vec<Linear>),
}

impl Linear {
    /// Loads `{prefix}.weight` as `[out, in]` and, when `bias`, `{prefix}.bias` as `[out]`.
    pub fn load(w: &Weights, prefix: &str, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = w.get(&format!("{prefix}.weight"), &[out_dim, in_dim])?;
        let bias = if bias { Some(w.get(&format!("{prefix}.bias"), &[out_dim])?) } else { None };
        Ok(Linear { weight: LinearWeight::Dense(weight), bias })
    }

    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Linear { weight: LinearWeight::Dense(weight), bias }
    }

    pub fn quantized(weight: crate::quant::QuantWeight, bias: Option<Tensor>) -> Self {
        Linear { weight: LinearWeight::Quant(std::sync::Arc::new(weight)), bias }
    }

    /// `[out, in]`, when the weight is one plain tensor.
    pub fn dense_weight(&self) -> Option<&Tensor> {
        match &self.weight {
            LinearWeight::Dense(w) => Some(w),
            _ => None,
        }
    }

    /// Bytes of quantized weights held (0 for plain tensors).
    pub fn quantized_bytes(&self) -> usize {
        match &self.weight {
            LinearWeight::Dense(_) => 0,
            LinearWeight::Quant(q) => q.resident_bytes(),
            LinearWeight::Parts(parts) => parts.iter().map(Linear::quantized_bytes).sum(),
        }
    }

    /// One projection computing all of `parts` side by side (outputs in order): one GEMM
    /// instead of several. Biases must be all present or all absent.
    pub fn concat(parts: Vec<Linear>) -> Result<Self> {
        if parts.iter().any(|p| p.dense_weight().is_none()) {
            return Ok(Linear { weight: LinearWeight::Parts(parts), bias: None });
        }
        let weights: Vec<&Tensor> = parts.iter().filter_map(|p| p.dense_weight()).collect();
        let biases: Vec<&Tensor> = parts.iter().filter_map(|p| p.bias.as_ref()).collect();
        let bias = match biases.len() {
            0 => None,
            n if n == parts.len() => Some(Tensor::cat(&biases, 0)?),
            _ => {
                return Err(crate::error::Error::Internal {
                    what: "bias",
                    message: "projections to fuse must all have a bias or none".into(),
                })
            }
        };
        Ok(Linear { weight: LinearWeight::Dense(Tensor::cat(&weights, 0)?), bias })
    }

    /// `x`: `[T, in]` → `[T, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = match &self.weight {
            LinearWeight::Dense(w) => x.matmul(&w.t()?)?,
            LinearWeight::Quant(q) => q.matmul(x)?,
            LinearWeight::Parts(parts) => {
                Tensor::cat(&parts.iter().map(|p| p.forward(x)).collect::<Result<Vec<_>>>()?, 1)?
            }
        };
        Ok(match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        })
    }
}

pub struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub fn load(w: &Weights, name: &str, dim: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm { weight: w.get(name, &[dim])?, eps: eps as f32 })
    }

    /// Normalises over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)?)
    }

    /// `(x + residual, norm(x + residual))` in one kernel.
    pub fn add_forward(&self, x: &Tensor, residual: &Tensor) -> Result<(Tensor, Tensor)> {
        kernels::add_rms_norm(x, residual, &self.weight, self.eps)
    }
}

/// `down(silu(gate(x)) * up(x))`, gate and up computed by one projection. The original Qwen
/// names these `c_proj(w1(x) * silu(w2(x)))`: its `w2` is the gate.
pub struct Mlp {
    /// `[gate | up]`, each `ff` (this rank's share) wide.
    pub gate_up: Linear,
    pub ff: usize,
    pub down: Linear,
}

impl Mlp {
    pub fn forward(&self, x: &Tensor, mode: KernelMode) -> Result<Tensor> {
        let gate_up = self.gate_up.forward(x)?;
        let inner = match mode {
            KernelMode::Plain => {
                (candle_nn::ops::silu(&gate_up.narrow(1, 0, self.ff)?)? * gate_up.narrow(1, self.ff, self.ff)?)?
            }
            KernelMode::Fused => kernels::silu_mul(&gate_up)?,
        };
        self.down.forward(&inner)
    }
}

/// A block's feed-forward part: the dense gated MLP, or routed experts.
pub enum Ffn {
    Dense(Mlp),
    Moe(Box<super::moe::SparseMoe>),
}

impl Ffn {
    /// `[T, hidden]` → `[T, hidden]`; under tensor or expert parallelism a partial sum, which
    /// the stack all-reduces.
    pub fn forward(&self, x: &Tensor, mode: KernelMode) -> Result<Tensor> {
        match self {
            Ffn::Dense(mlp) => mlp.forward(x, mode),
            Ffn::Moe(moe) => moe.forward(x, mode),
        }
    }
}

/// Rotary cos/sin tables, `[positions, rotary_dim / 2]`, one per NTK alpha in use, grown on demand.
pub struct Rotary {
    theta: f64,
    dim: usize,
    tables: HashMap<u64, (Tensor, Tensor)>,
    dtype: DType,
    device: Device,
}

impl Rotary {
    pub fn new(theta: f64, dim: usize, dtype: DType, device: &Device) -> Self {
        Rotary { theta, dim, tables: HashMap::new(), dtype, device: device.clone() }
    }

    /// Makes the table of `alpha` cover `len` positions now.
    pub fn reserve(&mut self, alpha: f64, len: usize) -> Result<()> {
        self.table(alpha, len).map(|_| ())
    }

    fn table(&mut self, alpha: f64, min_len: usize) -> Result<&(Tensor, Tensor)> {
        let key = alpha.to_bits();
        let have = self.tables.get(&key).map_or(0, |(c, _)| c.dim(0).unwrap_or(0));
        if have < min_len {
            let len = min_len.next_power_of_two().max(256);
            let dim = self.dim;
            // Dynamic NTK (original Qwen): base * alpha^(dim / (dim - 2)).
            let base = self.theta * alpha.powf(dim as f64 / (dim as f64 - 2.0));
            let inv_freq: Vec<f64> = (0..dim / 2).map(|i| 1.0 / base.powf((2 * i) as f64 / dim as f64)).collect();
            let mut cos = Vec::with_capacity(len * dim / 2);
            let mut sin = Vec::with_capacity(len * dim / 2);
            for p in 0..len {
                for f in &inv_freq {
                    let angle = p as f64 * f;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
            let to = |v: Vec<f32>| -> Result<Tensor> {
                Ok(Tensor::from_vec(v, (len, dim / 2), &self.device)?.to_dtype(self.dtype)?)
            };
            let entry = (to(cos)?, to(sin)?);
            self.tables.insert(key, entry);
        }
        Ok(&self.tables[&key])
    }

    /// cos and sin, `[T, rotary_dim / 2]`, for every token of the batch.
    pub fn for_batch(&mut self, meta: &BatchMeta, positions: &Tensor) -> Result<(Tensor, Tensor)> {
        let max_len = meta.seqs.iter().map(|s| s.context_len + s.len).max().unwrap_or(0);
        let first_alpha = meta.seqs.first().map_or(1.0, |s| s.rope_alpha);
        if meta.seqs.iter().all(|s| s.rope_alpha == first_alpha) {
            let (cos, sin) = self.table(first_alpha, max_len)?;
            return Ok((cos.index_select(positions, 0)?, sin.index_select(positions, 0)?));
        }
        // Sequences with different NTK alphas: each reads its own table. Only the original Qwen
        // with dynamic NTK gets here; its positions within a chunk are contiguous.
        let (mut cos_parts, mut sin_parts) = (Vec::new(), Vec::new());
        for s in &meta.seqs {
            let (cos, sin) = self.table(s.rope_alpha, max_len)?;
            cos_parts.push(cos.narrow(0, s.context_len, s.len)?);
            sin_parts.push(sin.narrow(0, s.context_len, s.len)?);
        }
        Ok((Tensor::cat(&cos_parts, 0)?, Tensor::cat(&sin_parts, 0)?))
    }
}

/// Applies rotate-half rotary to the first `cos.dim(1) * 2` dims of each head of `x` `[T, H, D]`.
pub fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let rot = cos.dim(1)? * 2;
    let head_dim = x.dim(2)?;
    if rot == head_dim {
        return Ok(candle_nn::rotary_emb::rope_thd(&x.unsqueeze(0)?.contiguous()?, cos, sin)?.squeeze(0)?);
    }
    let rotated =
        candle_nn::rotary_emb::rope_thd(&x.narrow(2, 0, rot)?.unsqueeze(0)?.contiguous()?, cos, sin)?.squeeze(0)?;
    Ok(Tensor::cat(&[rotated, x.narrow(2, rot, head_dim - rot)?], 2)?)
}

/// What one forward's layers share: the batch layout, rotary values and per-token query scales.
pub struct StepContext<'a> {
    pub meta: &'a BatchMeta,
    pub cos: Tensor,
    pub sin: Tensor,
    /// Per-token query multiplier (the original Qwen's LogN attention), if any: f32 `[T]` for
    /// the fused kernel, `[T, 1, 1]` in the model's dtype for the plain path (see
    /// [`StepContext::query_scale_for`]).
    pub query_scale: Option<Tensor>,
    /// The tensor-parallel group (`Comm::Single` when unsharded).
    pub comm: &'a Comm,
    pub kernels: KernelMode,
    /// Index of each sequence's last token in the flat batch, `[seqs]` u32 on the device.
    pub last: &'a Tensor,
}

impl StepContext<'_> {
    /// LogN multipliers (f32 `[T]`) in the form `mode`'s rotary path reads, converted once per
    /// forward rather than per layer.
    pub fn query_scale_for(scale: Option<Tensor>, mode: KernelMode, dtype: DType) -> Result<Option<Tensor>> {
        Ok(match (scale, mode) {
            (Some(s), KernelMode::Plain) => Some(s.to_dtype(dtype)?.reshape((s.dim(0)?, 1, 1))?),
            (s, _) => s,
        })
    }

    /// Rotary (and LogN scaling) for queries `[T, Hq, D]`. The fused kernel rotates in place, so
    /// `q` must not be read elsewhere afterwards (a view of a fresh projection is fine).
    pub fn rotate_queries(&self, q: Tensor) -> Result<Tensor> {
        match self.kernels {
            KernelMode::Fused => {
                kernels::rotary_inplace(&q, &self.cos, &self.sin, self.query_scale.as_ref())?;
                Ok(q)
            }
            KernelMode::Plain => {
                let q = apply_rotary(&q, &self.cos, &self.sin)?;
                Ok(match &self.query_scale {
                    Some(s) => q.broadcast_mul(s)?,
                    None => q,
                })
            }
        }
    }

    /// Rotary for keys `[T, Hkv, D]`; in place with the fused kernel, as for queries.
    pub fn rotate_keys(&self, k: Tensor) -> Result<Tensor> {
        match self.kernels {
            KernelMode::Fused => {
                kernels::rotary_inplace(&k, &self.cos, &self.sin, None)?;
                Ok(k)
            }
            KernelMode::Plain => apply_rotary(&k, &self.cos, &self.sin),
        }
    }
}

/// An architecture's attention block: projections, norms and rotary around [`Attention`].
pub trait SelfAttention {
    /// `x`: `[T, hidden]` → `[T, hidden]`; under tensor parallelism a partial sum over this
    /// rank's heads, which the stack all-reduces.
    fn forward(&self, x: &Tensor, ctx: &StepContext, layer: usize, attn: &mut dyn Attention) -> Result<Tensor>;
}

pub struct Block<A> {
    pub input_norm: RmsNorm,
    pub attn: A,
    pub post_attn_norm: RmsNorm,
    pub mlp: Ffn,
}

/// Embedding, pre-norm decoder blocks, final norm and LM head: the shape of every Qwen.
pub struct DecoderStack<A> {
    pub embed: Tensor,
    pub blocks: Vec<Block<A>>,
    pub final_norm: RmsNorm,
    /// This rank's block of the vocabulary (padded with zero rows where it does not divide).
    pub lm_head: Linear,
    /// The real vocabulary: gathered logits past it are padding.
    pub vocab: usize,
}

impl<A: SelfAttention> DecoderStack<A> {
    /// Logits `[num_seqs, vocab]` for the last token of each sequence in the batch.
    pub fn forward(&self, tokens: &Tensor, ctx: &StepContext, attn: &mut dyn Attention) -> Result<Tensor> {
        let mut x = self.embed.index_select(tokens, 0)?;
        // Row-parallel outputs (o_proj, down) are partial sums: the one place they are summed.
        let reduce = |h: Tensor| -> Result<Tensor> { Ok(ctx.comm.all_reduce_sum(&h)?) };
        // Only each sequence's last position needs logits: selecting first saves the LM head's
        // vocab-wide matmul on every prompt token.
        let last = ctx.last;
        let normed_last = match ctx.kernels {
            KernelMode::Plain => {
                for (i, block) in self.blocks.iter().enumerate() {
                    let h = block.attn.forward(&block.input_norm.forward(&x)?, ctx, i, attn)?;
                    x = (x + reduce(h)?)?;
                    let h = block.mlp.forward(&block.post_attn_norm.forward(&x)?, ctx.kernels)?;
                    x = (x + reduce(h)?)?;
                }
                self.final_norm.forward(&x.index_select(last, 0)?)?
            }
            KernelMode::Fused => {
                // Each residual add is fused with the norm that follows it (the next block's
                // input norm, or the final norm after the last block).
                let mut h = match self.blocks.first() {
                    Some(b) => b.input_norm.forward(&x)?,
                    None => self.final_norm.forward(&x)?,
                };
                for (i, block) in self.blocks.iter().enumerate() {
                    let a = reduce(block.attn.forward(&h, ctx, i, attn)?)?;
                    let (x1, h1) = block.post_attn_norm.add_forward(&x, &a)?;
                    let m = reduce(block.mlp.forward(&h1, ctx.kernels)?)?;
                    let next = self.blocks.get(i + 1).map_or(&self.final_norm, |b| &b.input_norm);
                    (x, h) = next.add_forward(&x1, &m)?;
                }
                h.index_select(last, 0)?
            }
        };
        // Vocab-parallel head: each rank's block of the vocabulary, gathered in rank order, and
        // the padding of a vocabulary that does not divide cut off.
        let logits = ctx.comm.all_gather(&self.lm_head.forward(&normed_last)?, 1)?;
        match logits.dim(1)? {
            n if n > self.vocab => Ok(logits.narrow(1, 0, self.vocab)?.contiguous()?),
            _ => Ok(logits),
        }
    }
}
