//! `QWenLMHeadModel`: the original Qwen (1.8B/7B/14B/72B, Qwen-Chat) of the Qwen Technical
//! Report. Fused QKV projection with bias, multi-head attention, rotary over `kv_channels *
//! rotary_pct` dims, MLP `c_proj(w1(x) * silu(w2(x)))`, untied LM head. Its long-context tricks
//! (dynamic NTK per sequence, LogN query scaling) arrive through [`StepContext`].

use candle_core::Tensor;

use super::attention::Attention;
use super::layers::{apply_rotary, load_stack, DecoderStack, Linear, SelfAttention, StepContext, TensorNames};
use crate::config::ModelConfig;
use crate::error::Result;
use crate::weights::Weights;

const NAMES: TensorNames = TensorNames {
    embed: "transformer.wte.weight",
    layer: "transformer.h.{i}",
    input_norm: "ln_1.weight",
    post_attn_norm: "ln_2.weight",
    // silu is applied to w2: it is the gate.
    gate: "mlp.w2",
    up: "mlp.w1",
    down: "mlp.c_proj",
    final_norm: "transformer.ln_f.weight",
    lm_head: "lm_head",
};

pub struct QWenAttention {
    c_attn: Linear,
    c_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl QWenAttention {
    fn load(w: &Weights, cfg: &ModelConfig, p: &str) -> Result<Self> {
        let proj = cfg.num_heads * cfg.head_dim;
        Ok(QWenAttention {
            c_attn: Linear::load(w, &format!("{p}.attn.c_attn"), cfg.hidden_size, 3 * proj, true)?,
            c_proj: Linear::load(w, &format!("{p}.attn.c_proj"), proj, cfg.hidden_size, false)?,
            heads: cfg.num_heads,
            head_dim: cfg.head_dim,
        })
    }
}

impl SelfAttention for QWenAttention {
    fn forward(&self, x: &Tensor, ctx: &StepContext, layer: usize, attn: &mut dyn Attention) -> Result<Tensor> {
        let t = x.dim(0)?;
        let qkv = self.c_attn.forward(x)?.reshape((t, 3, self.heads, self.head_dim))?;
        let q = qkv.narrow(1, 0, 1)?.squeeze(1)?;
        let k = qkv.narrow(1, 1, 1)?.squeeze(1)?;
        let v = qkv.narrow(1, 2, 1)?.squeeze(1)?.contiguous()?;
        let q = apply_rotary(&q, &ctx.cos, &ctx.sin)?;
        let k = apply_rotary(&k, &ctx.cos, &ctx.sin)?;
        let q = match &ctx.query_scale {
            Some(s) => q.broadcast_mul(s)?,
            None => q,
        };
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = attn.forward(layer, &q, &k, &v, ctx.meta, scale)?;
        self.c_proj.forward(&out.reshape((t, self.heads * self.head_dim))?)
    }
}

pub fn load(w: &Weights, cfg: &ModelConfig) -> Result<DecoderStack<QWenAttention>> {
    load_stack(w, cfg, &NAMES, |p| QWenAttention::load(w, cfg, p))
}
