//! `Qwen2ForCausalLM`: Qwen1.5, Qwen2 and Qwen2.5. Separate q/k/v projections with bias,
//! grouped-query attention, rotate-half rotary over the whole head, tied or untied embeddings.

use candle_core::Tensor;

use super::attention::{Attention, LayerQkv};
use super::layers::{DecoderStack, Linear, SelfAttention, StepContext};
use super::moe::ExpertPlan;
use super::parallel::{self, column, load_stack, row, rows, Shard, TensorNames};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::weights::Weights;

/// Tensor names shared by the Hugging Face Qwen2 and Qwen3 checkpoints.
pub const NAMES: TensorNames = TensorNames {
    embed: "model.embed_tokens.weight",
    layer: "model.layers.{i}",
    input_norm: "input_layernorm.weight",
    post_attn_norm: "post_attention_layernorm.weight",
    gate: "mlp.gate_proj",
    up: "mlp.up_proj",
    down: "mlp.down_proj",
    final_norm: "model.norm.weight",
    lm_head: "lm_head",
};

pub struct Qwen2Attention {
    /// q, k and v projections side by side: one GEMM.
    qkv: Linear,
    o: Linear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Qwen2Attention {
    fn load(w: &Weights, cfg: &ModelConfig, p: &str, shard: Shard) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let heads = parallel::heads(cfg, shard);
        let (q_rows, kv_rows) = ([rows(&heads.q, d, 0)], [rows(&heads.kv, d, 0)]);
        let (qd, kvd) = (cfg.num_heads * d, cfg.num_kv_heads * d);
        Ok(Qwen2Attention {
            qkv: Linear::concat(vec![
                column(w, &format!("{p}.self_attn.q_proj"), h, qd, &q_rows, true)?,
                column(w, &format!("{p}.self_attn.k_proj"), h, kvd, &kv_rows, true)?,
                column(w, &format!("{p}.self_attn.v_proj"), h, kvd, &kv_rows, true)?,
            ])?,
            o: row(w, &format!("{p}.self_attn.o_proj"), qd, h, rows(&heads.q, d, 0), false, shard)?,
            heads: heads.q_len(),
            kv_heads: heads.kv_len(),
            head_dim: d,
        })
    }
}

impl SelfAttention for Qwen2Attention {
    fn forward(&self, x: &Tensor, ctx: &StepContext, layer: usize, attn: &mut dyn Attention) -> Result<Tensor> {
        let t = x.dim(0)?;
        let (q, k, v) = split_qkv(&self.qkv.forward(x)?, t, self.heads, self.kv_heads, self.head_dim)?;
        let q = ctx.rotate_queries(q)?;
        let k = ctx.rotate_keys(k)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = attn.forward(LayerQkv { layer, q: &q, k: &k, v: &v, scale }, ctx.meta)?;
        self.o.forward(&out.reshape((t, self.heads * self.head_dim))?)
    }
}

/// Views of q `[T, Hq, D]`, k and v `[T, Hkv, D]` in a fused projection's output `[T, (Hq + 2 Hkv) D]`.
pub fn split_qkv(qkv: &Tensor, t: usize, heads: usize, kv_heads: usize, d: usize) -> Result<(Tensor, Tensor, Tensor)> {
    // Reshape first (a free view of the contiguous output), then narrow: strided views, no copies.
    let qkv = qkv.reshape((t, heads + 2 * kv_heads, d))?;
    Ok((qkv.narrow(1, 0, heads)?, qkv.narrow(1, heads, kv_heads)?, qkv.narrow(1, heads + kv_heads, kv_heads)?))
}

pub fn load(
    w: &Weights,
    cfg: &ModelConfig,
    shard: Shard,
    experts: &ExpertPlan,
) -> Result<DecoderStack<Qwen2Attention>> {
    load_stack(w, cfg, &NAMES, (shard, experts), |p| Qwen2Attention::load(w, cfg, p, shard))
}
