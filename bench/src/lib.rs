//! Shared by the bench binaries: random checkpoints in real Qwen shapes, written as Hugging Face
//! directories so they load through the same path as a real model.

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::ValueEnum;
use rand::{Rng, SeedableRng};
use safetensors::tensor::{Dtype, TensorView};
use serde_json::json;

#[derive(Clone, Copy, ValueEnum, Debug)]
pub enum Shape {
    /// Qwen2.5-0.5B: hidden 896, 24 layers, 14 heads / 2 kv heads, MLP 4864, tied.
    #[value(name = "qwen2.5-0.5b")]
    Qwen25_05b,
    /// Qwen3-0.6B: hidden 1024, 28 layers, 16 heads / 8 kv heads of 128, MLP 3072, tied.
    #[value(name = "qwen3-0.6b")]
    Qwen3_06b,
    /// Original Qwen-1.8B: hidden 2048, 24 layers, 16 heads of 128, MLP 5504, untied.
    #[value(name = "qwen-1.8b")]
    Qwen1_8b,
    /// Qwen3-30B-A3B's layers (hidden 2048, 32 heads / 4 kv heads of 128, 128 experts of 768,
    /// top 8 renormalised), 2 of its 48 layers: an MoE shape a CPU can run.
    #[value(name = "qwen3-30b-a3b-2l")]
    Qwen3_30bA3b2l,
}

impl Shape {
    /// Default directory for its random checkpoint.
    pub fn default_dir(self) -> PathBuf {
        PathBuf::from(format!("target/bench-models/{self:?}").to_lowercase())
    }
}

/// Attention heads of a Qwen2/Qwen3 block.
#[derive(Clone, Copy)]
struct Heads {
    hidden: usize,
    q: usize,
    kv: usize,
    dim: usize,
    /// q/k norms and no q/k/v bias (Qwen3), else biases (Qwen2).
    qwen3: bool,
}

/// Block `p`'s norms and attention tensors in the Qwen2 / Qwen3 layout.
fn attention_block(add: &mut impl FnMut(String, Vec<usize>, bool), p: &str, heads: Heads) {
    let Heads { hidden: h, q: nh, kv: nkv, dim: d, qwen3 } = heads;
    add(format!("{p}.input_layernorm.weight"), vec![h], true);
    add(format!("{p}.post_attention_layernorm.weight"), vec![h], true);
    for (proj, out) in [("q", nh * d), ("k", nkv * d), ("v", nkv * d)] {
        add(format!("{p}.self_attn.{proj}_proj.weight"), vec![out, h], false);
        if !qwen3 {
            add(format!("{p}.self_attn.{proj}_proj.bias"), vec![out], false);
        }
    }
    add(format!("{p}.self_attn.o_proj.weight"), vec![h, nh * d], false);
    if qwen3 {
        add(format!("{p}.self_attn.q_norm.weight"), vec![d], true);
        add(format!("{p}.self_attn.k_norm.weight"), vec![d], true);
    }
}

/// (architecture, config.json fields, tensors as (name, shape, is_norm)).
fn checkpoint(shape: Shape) -> (serde_json::Value, Vec<(String, Vec<usize>, bool)>) {
    let v = 151_936;
    let mut t: Vec<(String, Vec<usize>, bool)> = Vec::new();
    let mut add = |name: String, shape: Vec<usize>, norm: bool| t.push((name, shape, norm));
    match shape {
        Shape::Qwen25_05b | Shape::Qwen3_06b => {
            let qwen3 = matches!(shape, Shape::Qwen3_06b);
            let (h, l, nh, nkv, d, i) = if qwen3 { (1024, 28, 16, 8, 128, 3072) } else { (896, 24, 14, 2, 64, 4864) };
            add("model.embed_tokens.weight".into(), vec![v, h], false);
            for n in 0..l {
                let p = format!("model.layers.{n}");
                let heads = Heads { hidden: h, q: nh, kv: nkv, dim: d, qwen3 };
                attention_block(&mut add, &p, heads);
                add(format!("{p}.mlp.gate_proj.weight"), vec![i, h], false);
                add(format!("{p}.mlp.up_proj.weight"), vec![i, h], false);
                add(format!("{p}.mlp.down_proj.weight"), vec![h, i], false);
            }
            add("model.norm.weight".into(), vec![h], true);
            let arch = if qwen3 { "Qwen3ForCausalLM" } else { "Qwen2ForCausalLM" };
            let cfg = json!({
                "architectures": [arch], "model_type": arch.trim_end_matches("ForCausalLM").to_lowercase(), "vocab_size": v, "hidden_size": h, "num_hidden_layers": l,
                "num_attention_heads": nh, "num_key_value_heads": nkv, "head_dim": d, "intermediate_size": i,
                "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "tie_word_embeddings": true,
                "max_position_embeddings": 32768, "torch_dtype": "bfloat16",
            });
            (cfg, t)
        }
        Shape::Qwen3_30bA3b2l => {
            let (h, l, nh, nkv, d, experts, ff) = (2048, 2, 32, 4, 128, 128, 768);
            add("model.embed_tokens.weight".into(), vec![v, h], false);
            for n in 0..l {
                let p = format!("model.layers.{n}");
                attention_block(&mut add, &p, Heads { hidden: h, q: nh, kv: nkv, dim: d, qwen3: true });
                add(format!("{p}.mlp.gate.weight"), vec![experts, h], false);
                for e in 0..experts {
                    add(format!("{p}.mlp.experts.{e}.gate_proj.weight"), vec![ff, h], false);
                    add(format!("{p}.mlp.experts.{e}.up_proj.weight"), vec![ff, h], false);
                    add(format!("{p}.mlp.experts.{e}.down_proj.weight"), vec![h, ff], false);
                }
            }
            add("model.norm.weight".into(), vec![h], true);
            add("lm_head.weight".into(), vec![v, h], false);
            let cfg = json!({
                "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": v, "hidden_size": h,
                "num_hidden_layers": l, "num_attention_heads": nh, "num_key_value_heads": nkv, "head_dim": d,
                "intermediate_size": 6144, "moe_intermediate_size": ff, "num_experts": experts,
                "num_experts_per_tok": 8, "norm_topk_prob": true, "decoder_sparse_step": 1, "mlp_only_layers": [],
                "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "tie_word_embeddings": false,
                "max_position_embeddings": 40960, "torch_dtype": "bfloat16",
            });
            (cfg, t)
        }
        Shape::Qwen1_8b => {
            let (h, l, nh, d, i) = (2048, 24, 16, 128, 11008);
            add("transformer.wte.weight".into(), vec![v, h], false);
            for n in 0..l {
                let p = format!("transformer.h.{n}");
                add(format!("{p}.ln_1.weight"), vec![h], true);
                add(format!("{p}.ln_2.weight"), vec![h], true);
                add(format!("{p}.attn.c_attn.weight"), vec![3 * nh * d, h], false);
                add(format!("{p}.attn.c_attn.bias"), vec![3 * nh * d], false);
                add(format!("{p}.attn.c_proj.weight"), vec![h, nh * d], false);
                add(format!("{p}.mlp.w1.weight"), vec![i / 2, h], false);
                add(format!("{p}.mlp.w2.weight"), vec![i / 2, h], false);
                add(format!("{p}.mlp.c_proj.weight"), vec![h, i / 2], false);
            }
            add("transformer.ln_f.weight".into(), vec![h], true);
            add("lm_head.weight".into(), vec![v, h], false);
            let cfg = json!({
                "architectures": ["QWenLMHeadModel"], "model_type": "qwen", "vocab_size": v, "hidden_size": h, "num_hidden_layers": l,
                "num_attention_heads": nh, "kv_channels": d, "intermediate_size": i, "rotary_pct": 1.0,
                "rotary_emb_base": 10000, "layer_norm_epsilon": 1e-6, "seq_length": 8192,
                "max_position_embeddings": 8192, "use_dynamic_ntk": true, "use_logn_attn": true, "bf16": true,
            });
            (cfg, t)
        }
    }
}

/// Writes a random bf16 checkpoint of `shape` into `dir`; weights already there are reused.
pub fn ensure_checkpoint(shape: Shape, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (cfg, tensors) = checkpoint(shape);
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    if dir.join("model.safetensors").exists() {
        return Ok(());
    }
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0);
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, shape, norm)| {
            let n: usize = shape.iter().product();
            (0..n)
                .flat_map(|_| {
                    let x = if *norm { 1.0 } else { (rng.random::<f32>() - 0.5) * 0.04 };
                    half::bf16::from_f32(x).to_le_bytes()
                })
                .collect()
        })
        .collect();
    let views = tensors
        .iter()
        .zip(&data)
        .map(|((name, shape, _), bytes)| Ok((name.clone(), TensorView::new(Dtype::BF16, shape.clone(), bytes)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors"))?;
    Ok(())
}
