//! The Qwen model family over a flat, unpadded batch: many sequences' new tokens concatenated,
//! each sequence described by a [`SeqChunk`], attention delegated to an [`Attention`]
//! implementation that owns the KV cache.

pub mod attention;
pub mod layers;
pub mod moe;
pub mod paged;
pub mod parallel;
pub mod qwen;
pub mod qwen2;
pub mod qwen3;

use std::path::Path;

use candle_core::{DType, Device, Tensor};

pub use attention::{Attention, BatchMeta, ContiguousKvCache, LayerQkv};
use layers::{DecoderStack, Rotary, StepContext};
use parallel::Shard;

use crate::comm::Comm;
use crate::config::{Architecture, ModelConfig};
use crate::error::{Error, Result};
use crate::kernels::KernelMode;
use crate::weights::Weights;

/// Per-token inputs of a forward, on the model's device: the new tokens and their positions
/// (flat, `[T]` u32) and, per sequence, the index of its last token (`[seqs]` u32).
pub struct DeviceInputs {
    pub tokens: Tensor,
    pub positions: Tensor,
    pub last: Tensor,
}

/// One sequence's part of a flat batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SeqChunk {
    /// Key of the sequence in the KV cache.
    pub seq_id: u64,
    /// Tokens of this sequence already cached: the chunk starts at this position.
    pub context_len: usize,
    /// New tokens of this sequence in the batch (at least 1).
    pub len: usize,
    /// Rotary NTK alpha the sequence keeps for life; see [`ModelConfig::ntk_alpha`].
    pub rope_alpha: f64,
}

/// How a rank loads its share beyond the group size.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// How an MoE model's experts split over the group (`--expert-parallel`: whole experts).
    pub experts: moe::ExpertSplit,
}

enum Stack {
    QWen(DecoderStack<qwen::QWenAttention>),
    Qwen2(DecoderStack<qwen2::Qwen2Attention>),
    Qwen3(DecoderStack<qwen3::Qwen3Attention>),
}

pub struct Model {
    config: ModelConfig,
    stack: Stack,
    comm: Comm,
    /// KV heads this rank stores (all of them when unsharded).
    local_kv_heads: usize,
    rotary: Rotary,
    device: Device,
    dtype: DType,
    kernels: KernelMode,
    /// Tokens routed per expert (MoE models).
    expert_load: Option<std::sync::Arc<moe::ExpertLoad>>,
}

impl Model {
    /// Loads the checkpoint in `dir` with weights converted to `dtype` on `device`.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_sharded(dir, dtype, device, Comm::Single)
    }

    /// Loads this rank's shard of the checkpoint; `comm` is its tensor-parallel group, whose
    /// ranks must run the same forwards in the same order.
    pub fn load_sharded(dir: &Path, dtype: DType, device: &Device, comm: Comm) -> Result<Self> {
        Self::load_with(dir, dtype, device, comm, LoadOptions::default())
    }

    /// [`Model::load_sharded`] with `options` (expert parallelism).
    pub fn load_with(dir: &Path, dtype: DType, device: &Device, comm: Comm, options: LoadOptions) -> Result<Self> {
        let config = ModelConfig::from_dir(dir)?;
        let weights = Weights::open(dir, dtype, device)?;
        Self::from_weights_with(config, &weights, comm, options)
    }

    /// Builds this rank's model from `weights` (a checkpoint, or random values in its shapes),
    /// on the weights' device and dtype, with the device's default [`KernelMode`].
    pub fn from_weights(config: ModelConfig, weights: &Weights, comm: Comm) -> Result<Self> {
        Self::from_weights_with(config, weights, comm, LoadOptions::default())
    }

    pub fn from_weights_with(config: ModelConfig, weights: &Weights, comm: Comm, options: LoadOptions) -> Result<Self> {
        let (dtype, device) = (weights.dtype(), weights.device().clone());
        let shard = Shard { rank: comm.rank(), world: comm.world_size() };
        parallel::check(&config, shard)?;
        moe::check(&config, shard, options.experts)?;
        weights.set_quant(config.quant);
        let load = moe::ExpertLoad::new(config.moe.as_ref().map_or(0, |m| m.num_experts), &device)?;
        let experts = moe::ExpertPlan { split: options.experts, load: load.clone() };
        let stack = match config.architecture {
            Architecture::QWen => Stack::QWen(qwen::load(weights, &config, shard, &experts)?),
            Architecture::Qwen2 | Architecture::Qwen2Moe => {
                Stack::Qwen2(qwen2::load(weights, &config, shard, &experts)?)
            }
            Architecture::Qwen3 | Architecture::Qwen3Moe => {
                Stack::Qwen3(qwen3::load(weights, &config, shard, &experts)?)
            }
        };
        let expert_load = config.moe.is_some().then_some(load);
        let local_kv_heads = parallel::heads(&config, shard).kv_len();
        let rotary = Rotary::new(config.rope_theta, config.rotary_dim, dtype, &device);
        let mut kernels = KernelMode::for_device(&device);
        let group = parallel::heads(&config, shard).q_len() / local_kv_heads.max(1);
        if kernels == KernelMode::Fused && !crate::kernels::supports_attention(group, config.head_dim) {
            tracing::warn!(group, head_dim = config.head_dim, "shapes beyond the fused kernels: using candle's ops");
            kernels = KernelMode::Plain;
        }
        Ok(Model { config, stack, comm, local_kv_heads, rotary, device, dtype, kernels, expert_load })
    }

    /// Tokens routed to each expert so far (summed over layers); `None` for dense models.
    pub fn expert_load(&self) -> Option<std::sync::Arc<moe::ExpertLoad>> {
        self.expert_load.clone()
    }

    /// Which implementation of the inner ops the forward uses (and the KV store must match).
    pub fn kernels(&self) -> KernelMode {
        self.kernels
    }

    /// Overrides the device's default, e.g. to run the fused path's CPU references.
    pub fn set_kernels(&mut self, mode: KernelMode) {
        self.kernels = mode;
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The tensor-parallel group this rank belongs to.
    pub fn comm(&self) -> &Comm {
        &self.comm
    }

    /// KV heads this rank's cache must hold per layer.
    pub fn local_kv_heads(&self) -> usize {
        self.local_kv_heads
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Runs `tokens` (all sequences' new tokens, in `seqs` order) and returns logits
    /// `[seqs.len(), vocab]` for the last token of each sequence, on the model's device.
    pub fn forward(&mut self, tokens: &[u32], seqs: &[SeqChunk], attn: &mut dyn Attention) -> Result<Tensor> {
        self.check_batch(tokens, seqs)?;
        let positions: Vec<u32> =
            seqs.iter().flat_map(|s| (s.context_len..s.context_len + s.len).map(|p| p as u32)).collect();
        let mut last = Vec::with_capacity(seqs.len());
        let mut end = 0;
        for s in seqs {
            end += s.len;
            last.push(end as u32 - 1);
        }
        let inputs = DeviceInputs {
            tokens: Tensor::from_slice(tokens, tokens.len(), &self.device)?,
            positions: Tensor::from_vec(positions, tokens.len(), &self.device)?,
            last: Tensor::from_vec(last, seqs.len(), &self.device)?,
        };
        self.forward_on_device(seqs, &inputs, attn)
    }

    /// [`Model::forward`] with the per-token inputs already on the device and checked. When no
    /// sequence needs the LogN scale and the rotary table already covers every position (see
    /// [`Model::prepare_static_forward`]), nothing is copied from the host: the forward can be
    /// captured into a CUDA graph.
    pub fn forward_on_device(
        &mut self,
        seqs: &[SeqChunk],
        inputs: &DeviceInputs,
        attn: &mut dyn Attention,
    ) -> Result<Tensor> {
        let meta = BatchMeta::new(seqs, &self.device)?;
        let query_scale = StepContext::query_scale_for(self.query_scale(seqs)?, self.kernels, self.dtype)?;
        let (cos, sin) = self.rotary.for_batch(&meta, &inputs.positions)?;
        let ctx = StepContext {
            meta: &meta,
            cos,
            sin,
            query_scale,
            comm: &self.comm,
            kernels: self.kernels,
            last: &inputs.last,
        };
        let logits = match &self.stack {
            Stack::QWen(s) => s.forward(&inputs.tokens, &ctx, attn)?,
            Stack::Qwen2(s) => s.forward(&inputs.tokens, &ctx, attn)?,
            Stack::Qwen3(s) => s.forward(&inputs.tokens, &ctx, attn)?,
        };
        Ok(logits)
    }

    /// Grows the rotary table of NTK alpha 1 to the whole context now, so later forwards of
    /// sequences with that alpha allocate nothing for it.
    pub fn prepare_static_forward(&mut self) -> Result<()> {
        self.rotary.reserve(1.0, self.config.max_context())
    }

    /// Whether a forward over `seqs` reads only device inputs and prepared tables (no LogN
    /// scales, NTK alpha 1): the condition for replaying it from a CUDA graph.
    pub fn is_static_forward(&self, seqs: &[SeqChunk]) -> bool {
        let logn = self.config.long_context.filter(|lc| lc.logn_attn);
        seqs.iter().all(|s| s.rope_alpha == 1.0 && logn.is_none_or(|lc| s.context_len + s.len <= lc.seq_length))
    }

    fn check_batch(&self, tokens: &[u32], seqs: &[SeqChunk]) -> Result<()> {
        if seqs.is_empty() || seqs.iter().any(|s| s.len == 0) {
            return Err(Error::Internal {
                what: "seqs",
                message: "a batch needs at least one sequence, each with at least one token".into(),
            });
        }
        let total: usize = seqs.iter().map(|s| s.len).sum();
        if total != tokens.len() {
            return Err(Error::Internal {
                what: "token_ids",
                message: format!("{} tokens given but the sequences cover {total}", tokens.len()),
            });
        }
        let max_ctx = self.config.max_context();
        let mut ids = std::collections::HashSet::with_capacity(seqs.len());
        for s in seqs {
            if !ids.insert(s.seq_id) {
                return Err(Error::Internal {
                    what: "seqs",
                    message: format!("sequence {} appears twice in one batch", s.seq_id),
                });
            }
            if s.context_len.saturating_add(s.len) > max_ctx {
                return Err(Error::Internal {
                    what: "seqs",
                    message: format!(
                        "sequence {} would reach {} tokens; the model's context length is {max_ctx}",
                        s.seq_id,
                        s.context_len.saturating_add(s.len)
                    ),
                });
            }
            if !(s.rope_alpha.is_finite() && s.rope_alpha >= 1.0) {
                return Err(Error::Internal {
                    what: "rope_alpha",
                    message: format!("{} must be a finite number >= 1", s.rope_alpha),
                });
            }
        }
        let vocab = self.config.vocab_size;
        if let Some(&token) = tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::TokenOutOfRange { field: "token_ids", token, vocab });
        }
        Ok(())
    }

    /// The original Qwen's LogN attention: f32 `[T]` query multipliers, or `None` when every
    /// token of the batch is within the training length (the factor is then 1).
    fn query_scale(&self, seqs: &[SeqChunk]) -> Result<Option<Tensor>> {
        let Some(lc) = self.config.long_context.filter(|lc| lc.logn_attn) else {
            return Ok(None);
        };
        if seqs.iter().all(|s| s.context_len + s.len <= lc.seq_length) {
            return Ok(None);
        }
        let scales: Vec<f32> =
            seqs.iter().flat_map(|s| (s.context_len..s.context_len + s.len).map(|p| lc.logn_scale(p) as f32)).collect();
        let n = scales.len();
        Ok(Some(Tensor::from_vec(scales, n, &self.device)?))
    }
}
