//! Tensor-parallel sharding of the Qwen models: which slice of each weight a rank loads, and
//! the checks that a group size can shard a model at all. Megatron-style: column-parallel q/k/v
//! and gate/up (each rank owns whole heads and a slice of the MLP), row-parallel o_proj/down
//! (partial sums, all-reduced by the decoder stack), vocab-parallel LM head (logits all-gathered).
//! KV heads split across ranks, or are replicated when the group outnumbers them.

use std::ops::Range;

use candle_core::Tensor;

use super::layers::{Block, DecoderStack, Ffn, Linear, Mlp, RmsNorm};
use super::moe::{ExpertPlan, SparseMoe};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::quant;
use crate::weights::Weights;

/// This rank's place in its tensor-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub rank: usize,
    pub world: usize,
}

impl Shard {
    pub const SINGLE: Shard = Shard { rank: 0, world: 1 };

    /// This rank's even share of `n` items (`n` divisible by the world size).
    pub fn split(&self, n: usize) -> Range<usize> {
        let per = n / self.world;
        self.rank * per..(self.rank + 1) * per
    }

    /// This rank's share of `n` items in blocks of `ceil(n / world)`, for sizes that need not
    /// divide (a vocabulary resized to its tokenizer): the real items it owns, and how many
    /// padding items complete its block (only the last ranks have any).
    pub fn split_padded(&self, n: usize) -> (Range<usize>, usize) {
        let per = n.div_ceil(self.world);
        let start = (self.rank * per).min(n);
        let end = ((self.rank + 1) * per).min(n);
        (start..end, per - (end - start))
    }
}

/// The attention heads a rank owns: query heads, and the KV heads they read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Heads {
    pub q: Range<usize>,
    pub kv: Range<usize>,
}

impl Heads {
    pub fn q_len(&self) -> usize {
        self.q.len()
    }

    pub fn kv_len(&self) -> usize {
        self.kv.len()
    }
}

/// Checks that `shard.world` ranks can split `cfg`, naming what does not divide.
pub fn check(cfg: &ModelConfig, shard: Shard) -> Result<()> {
    let tp = shard.world;
    let refuse = |what: &str, n: usize| {
        Err(Error::InvalidInput {
            field: "tp",
            message: format!("tensor-parallel size {tp} does not divide {what} = {n}"),
        })
    };
    if tp == 0 || shard.rank >= tp {
        return Err(Error::InvalidInput { field: "tp", message: format!("rank {} outside group of {tp}", shard.rank) });
    }
    if cfg.num_heads % tp != 0 {
        return refuse("num_attention_heads", cfg.num_heads);
    }
    if cfg.num_kv_heads % tp != 0 && tp % cfg.num_kv_heads != 0 {
        return Err(Error::InvalidInput {
            field: "tp",
            message: format!(
                "tensor-parallel size {tp} and num_key_value_heads = {} must divide one another",
                cfg.num_kv_heads
            ),
        });
    }
    // MoE models check their experts in `moe::check`; their dense MLP width matters only where
    // a layer keeps one.
    let dense_layer = cfg.moe.as_ref().is_none_or(|m| (0..cfg.num_layers).any(|l| !m.is_sparse(l)));
    if dense_layer && cfg.mlp_hidden % tp != 0 {
        return refuse("the MLP width", cfg.mlp_hidden);
    }
    // Any vocabulary size shards: the LM head is padded to equal blocks (see `load_stack`).
    Ok(())
}

/// The heads `shard` owns. With more ranks than KV heads, each KV head is replicated on the
/// ranks whose query heads read it.
pub fn heads(cfg: &ModelConfig, shard: Shard) -> Heads {
    let q = shard.split(cfg.num_heads);
    let kv = if cfg.num_kv_heads >= shard.world {
        shard.split(cfg.num_kv_heads)
    } else {
        let ranks_per_kv = shard.world / cfg.num_kv_heads;
        let k = shard.rank / ranks_per_kv;
        k..k + 1
    };
    Heads { q, kv }
}

/// Scales head ranges to row ranges of a projection with `head_dim` rows per head.
pub fn rows(heads: &Range<usize>, head_dim: usize, offset: usize) -> Range<usize> {
    offset + heads.start * head_dim..offset + heads.end * head_dim
}

/// Column-parallel: the output rows `ranges` of `{prefix}.weight` (`[out, in]`) and its bias.
pub fn column(
    w: &Weights,
    prefix: &str,
    in_dim: usize,
    out_dim: usize,
    ranges: &[Range<usize>],
    bias: bool,
) -> Result<Linear> {
    let bias = if bias { Some(w.get_ranges(&format!("{prefix}.bias"), &[out_dim], 0, ranges)?) } else { None };
    if let Some(q) = quant::load::load(w, prefix, (in_dim, out_dim), quant::load::Cut::Columns(ranges))? {
        return Ok(Linear::quantized(q, bias));
    }
    let weight = w.get_ranges(&format!("{prefix}.weight"), &[out_dim, in_dim], 0, ranges)?;
    Ok(Linear::new(weight, bias))
}

/// Row-parallel: the input columns `cols` of `{prefix}.weight`. Outputs are partial sums; a bias
/// is added on rank 0 only, so the all-reduce adds it once.
pub fn row(
    w: &Weights,
    prefix: &str,
    in_dim: usize,
    out_dim: usize,
    cols: Range<usize>,
    bias: bool,
    shard: Shard,
) -> Result<Linear> {
    let bias = if bias && shard.rank == 0 { Some(w.get(&format!("{prefix}.bias"), &[out_dim])?) } else { None };
    if let Some(q) = quant::load::load(w, prefix, (in_dim, out_dim), quant::load::Cut::Rows(&cols))? {
        return Ok(Linear::quantized(q, bias));
    }
    let weight = w.get_ranges(&format!("{prefix}.weight"), &[out_dim, in_dim], 1, &[cols])?;
    Ok(Linear::new(weight, bias))
}

/// Where a family keeps its tensors; `{i}` in `layer` is the block index.
pub struct TensorNames {
    pub embed: &'static str,
    pub layer: &'static str,
    pub input_norm: &'static str,
    pub post_attn_norm: &'static str,
    pub gate: &'static str,
    pub up: &'static str,
    pub down: &'static str,
    pub final_norm: &'static str,
    pub lm_head: &'static str,
}

/// The dense gated MLP of block `p`, split per `shard`.
fn dense_mlp(w: &Weights, cfg: &ModelConfig, names: &TensorNames, p: &str, shard: Shard) -> Result<Mlp> {
    let (h, ff) = (cfg.hidden_size, cfg.mlp_hidden);
    let ff_part = [shard.split(ff)];
    Ok(Mlp {
        gate_up: Linear::concat(vec![
            column(w, &format!("{p}.{}", names.gate), h, ff, &ff_part, false)?,
            column(w, &format!("{p}.{}", names.up), h, ff, &ff_part, false)?,
        ])?,
        ff: ff_part[0].len(),
        down: row(w, &format!("{p}.{}", names.down), ff, h, ff_part[0].clone(), false, shard)?,
    })
}

/// Loads this rank's part of a decoder stack whose attention blocks come from
/// `load_attn(prefix)`, `prefix` being the block's tensor-name prefix. The embedding is
/// replicated; the MLP (or, in sparse layers of an MoE model, the experts as `experts` splits
/// them) and the LM head are split per `shard`.
pub fn load_stack<A>(
    w: &Weights,
    cfg: &crate::config::ModelConfig,
    names: &TensorNames,
    (shard, experts): (Shard, &ExpertPlan),
    load_attn: impl Fn(&str) -> Result<A>,
) -> Result<DecoderStack<A>> {
    let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
    let embed = w.get(names.embed, &[cfg.vocab_size, h])?;
    let mut blocks = Vec::with_capacity(cfg.num_layers);
    for i in 0..cfg.num_layers {
        let p = names.layer.replace("{i}", &i.to_string());
        let mlp = match &cfg.moe {
            Some(moe) if moe.is_sparse(i) => Ffn::Moe(Box::new(SparseMoe::load(w, cfg, moe, &p, shard, experts)?)),
            _ => Ffn::Dense(dense_mlp(w, cfg, names, &p, shard)?),
        };
        blocks.push(Block {
            input_norm: RmsNorm::load(w, &format!("{p}.{}", names.input_norm), h, eps)?,
            attn: load_attn(&p)?,
            post_attn_norm: RmsNorm::load(w, &format!("{p}.{}", names.post_attn_norm), h, eps)?,
            mlp,
        });
    }
    // Tied checkpoints usually omit lm_head (it is the embedding); some still store a copy.
    // Vocab-parallel in equal blocks: a vocabulary that does not divide by the group size is
    // padded with zero rows on the last ranks, and the gathered logits are cut back to it.
    let (range, pad) = shard.split_padded(cfg.vocab_size);
    let vocab_part = [range];
    let weight = if cfg.tie_word_embeddings && !w.contains(&format!("{}.weight", names.lm_head)) {
        w.get_ranges(names.embed, &[cfg.vocab_size, h], 0, &vocab_part)?
    } else {
        w.get_ranges(&format!("{}.weight", names.lm_head), &[cfg.vocab_size, h], 0, &vocab_part)?
    };
    let weight = match pad {
        0 => weight,
        _ => Tensor::cat(&[&weight, &Tensor::zeros((pad, h), weight.dtype(), weight.device())?], 0)?,
    };
    let lm_head = Linear::new(weight, None);
    let final_norm = RmsNorm::load(w, names.final_norm, h, eps)?;
    Ok(DecoderStack { embed, blocks, final_norm, lm_head, vocab: cfg.vocab_size })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Architecture;

    fn cfg(heads: usize, kv: usize) -> ModelConfig {
        ModelConfig {
            architecture: Architecture::Qwen2,
            vocab_size: 512,
            hidden_size: 64,
            num_layers: 1,
            num_heads: heads,
            num_kv_heads: kv,
            head_dim: 16,
            mlp_hidden: 96,
            rms_norm_eps: 1e-6,
            rope_theta: 1e4,
            rotary_dim: 16,
            max_position_embeddings: 256,
            tie_word_embeddings: false,
            qkv_bias: true,
            qk_norm: false,
            declared_dtype: None,
            long_context: None,
            moe: None,
            quant: None,
        }
    }

    #[test]
    fn heads_split_or_replicate_kv() {
        let c = cfg(4, 2);
        assert_eq!(heads(&c, Shard { rank: 1, world: 2 }), Heads { q: 2..4, kv: 1..2 });
        // tp 4 > 2 KV heads: ranks 0,1 read KV head 0; ranks 2,3 read KV head 1.
        let kv: Vec<_> = (0..4).map(|r| heads(&c, Shard { rank: r, world: 4 }).kv).collect();
        assert_eq!(kv, vec![0..1, 0..1, 1..2, 1..2]);
    }

    #[test]
    fn unshardable_groups_are_refused_by_name() {
        let err = check(&cfg(4, 2), Shard { rank: 0, world: 3 }).unwrap_err();
        assert!(err.to_string().contains("num_attention_heads = 4"), "{err}");
        let err = check(&cfg(8, 3), Shard { rank: 0, world: 2 }).unwrap_err();
        assert!(err.to_string().contains("num_key_value_heads = 3"), "{err}");
        assert!(check(&cfg(4, 2), Shard { rank: 3, world: 4 }).is_ok());
    }
}
