//! `QWenLMHeadModel`: the original Qwen (1.8B/7B/14B/72B, Qwen-Chat) of the Qwen Technical
//! Report. Fused QKV projection with bias, multi-head attention, rotary over `kv_channels *
//! rotary_pct` dims, MLP `c_proj(w1(x) * silu(w2(x)))`, untied LM head. Its long-context tricks
//! (dynamic NTK per sequence, LogN query scaling) arrive through [`StepContext`].

use candle_core::Tensor;

use super::attention::{Attention, LayerQkv};
use super::layers::{DecoderStack, Linear, SelfAttention, StepContext};
use super::moe::ExpertPlan;
use super::parallel::{self, column, load_stack, row, rows, Shard, TensorNames};
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
    fn load(w: &Weights, cfg: &ModelConfig, p: &str, shard: Shard) -> Result<Self> {
        let (h, d) = (cfg.hidden_size, cfg.head_dim);
        let proj = cfg.num_heads * d;
        // The fused projection stacks all q rows, then k, then v: a rank takes its heads' rows
        // from each third.
        let heads = parallel::heads(cfg, shard);
        let qkv_rows = [rows(&heads.q, d, 0), rows(&heads.q, d, proj), rows(&heads.q, d, 2 * proj)];
        Ok(QWenAttention {
            c_attn: column(w, &format!("{p}.attn.c_attn"), h, 3 * proj, &qkv_rows, true)?,
            c_proj: row(w, &format!("{p}.attn.c_proj"), proj, h, rows(&heads.q, d, 0), false, shard)?,
            heads: heads.q_len(),
            head_dim: d,
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
        let q = ctx.rotate_queries(q)?;
        let k = ctx.rotate_keys(k)?;
        let scale = 1.0 / (self.head_dim as f64).sqrt();
        let out = attn.forward(LayerQkv { layer, q: &q, k: &k, v: &v, scale }, ctx.meta)?;
        self.c_proj.forward(&out.reshape((t, self.heads * self.head_dim))?)
    }
}

pub fn load(w: &Weights, cfg: &ModelConfig, shard: Shard, experts: &ExpertPlan) -> Result<DecoderStack<QWenAttention>> {
    load_stack(w, cfg, &NAMES, (shard, experts), |p| QWenAttention::load(w, cfg, p, shard))
}
