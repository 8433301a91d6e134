//! `Qwen3ForCausalLM` (dense): like Qwen2 but without q/k/v bias (unless `attention_bias`), a
//! per-head RMSNorm on q and on k before rotary, and a `head_dim` independent of `hidden_size`.

use candle_core::Tensor;

use super::attention::{Attention, LayerQkv};
use super::layers::{DecoderStack, Linear, RmsNorm, SelfAttention, StepContext};
use super::moe::ExpertPlan;
use super::parallel::{self, column, load_stack, row, rows, Shard};
use super::qwen2::{split_qkv, NAMES};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::weights::Weights;

pub struct Qwen3Attention {
    /// q, k and v projections side by side: one GEMM.
    qkv: Linear,
    o: Linear,
    q_norm: RmsNorm,
    k_norm: RmsNorm,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Qwen3Attention {
    fn load(w: &Weights, cfg: &ModelConfig, p: &str, shard: Shard) -> Result<Self> {
        let (h, d, bias) = (cfg.hidden_size, cfg.head_dim, cfg.qkv_bias);
        let heads = parallel::heads(cfg, shard);
        let (q_rows, kv_rows) = ([rows(&heads.q, d, 0)], [rows(&heads.kv, d, 0)]);
        let (qd, kvd) = (cfg.num_heads * d, cfg.num_kv_heads * d);
        Ok(Qwen3Attention {
            qkv: Linear::concat(vec![
                column(w, &format!("{p}.self_attn.q_proj"), h, qd, &q_rows, bias)?,
                column(w, &format!("{p}.self_attn.k_proj"), h, kvd, &kv_rows, bias)?,
                column(w, &format!("{p}.self_attn.v_proj"), h, kvd, &kv_rows, bias)?,
            ])?,
            o: row(w, &format!("{p}.self_attn.o_proj"), qd, h, rows(&heads.q, d, 0), bias, shard)?,
            q_norm: RmsNorm::load(w, &format!("{p}.self_attn.q_norm.weight"), d, cfg.rms_norm_eps)?,
            k_norm: RmsNorm::load(w, &format!("{p}.self_attn.k_norm.weight"), d, cfg.rms_norm_eps)?,
            heads: heads.q_len(),
            kv_heads: heads.kv_len(),
            head_dim: d,
        })
    }
}

impl SelfAttention for Qwen3Attention {
    fn forward(&self, x: &Tensor, ctx: &StepContext, layer: usize, attn: &mut dyn Attention) -> Result<Tensor> {
        let t = x.dim(0)?;
        let (q, k, v) = split_qkv(&self.qkv.forward(x)?, t, self.heads, self.kv_heads, self.head_dim)?;
        let q = ctx.rotate_queries(self.q_norm.forward(&q)?)?;
        let k = ctx.rotate_keys(self.k_norm.forward(&k)?)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = attn.forward(LayerQkv { layer, q: &q, k: &k, v: &v, scale }, ctx.meta)?;
        self.o.forward(&out.reshape((t, self.heads * self.head_dim))?)
    }
}

pub fn load(
    w: &Weights,
    cfg: &ModelConfig,
    shard: Shard,
    experts: &ExpertPlan,
) -> Result<DecoderStack<Qwen3Attention>> {
    load_stack(w, cfg, &NAMES, (shard, experts), |p| Qwen3Attention::load(w, cfg, p, shard))
}
