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

/// How the checkpoint's linears (attention and MLP projections) are stored.
#[derive(Clone, Copy, ValueEnum, Debug, PartialEq, Eq)]
pub enum Quant {
    /// bf16, like the published full-precision checkpoints.
    None,
    /// GPTQ 4-bit, group 128, symmetric (as Qwen2.5-*-GPTQ-Int4).
    #[value(name = "gptq-int4")]
    GptqInt4,
    /// Block FP8 e4m3 with 128 x 128 scales (as Qwen3-*-FP8).
    Fp8,
}

impl Shape {
    /// Default directory for its random checkpoint.
    pub fn default_dir(self) -> PathBuf {
        PathBuf::from(format!("target/bench-models/{self:?}").to_lowercase())
    }

    /// Default directory for its random checkpoint stored as `quant`.
    pub fn dir_for(self, quant: Quant) -> PathBuf {
        match quant {
            Quant::None => self.default_dir(),
            q => PathBuf::from(format!("target/bench-models/{self:?}-{q:?}").to_lowercase()),
        }
    }
}

/// Whether tensor `name` is a projection a quantized checkpoint stores quantized.
fn quantizable(name: &str) -> bool {
    const PROJ: [&str; 12] = [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
        "c_attn",
        "attn.c_proj",
        "w1",
        "w2",
        "mlp.c_proj",
    ];
    name.strip_suffix(".weight").is_some_and(|p| PROJ.iter().any(|s| p.ends_with(s)) && !p.contains(".experts."))
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

/// Writes a random checkpoint of `shape` into `dir` (bf16, or its projections stored as
/// `quant`); weights already there are reused.
pub fn ensure_checkpoint(shape: Shape, quant: Quant, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let (mut cfg, tensors) = checkpoint(shape);
    match quant {
        Quant::None => {}
        Quant::GptqInt4 => {
            cfg["quantization_config"] =
                json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": false, "sym": true});
        }
        Quant::Fp8 => {
            cfg["quantization_config"] =
                json!({"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]});
        }
    }
    std::fs::write(dir.join("config.json"), serde_json::to_string_pretty(&cfg)?)?;
    if dir.join("model.safetensors").exists() {
        return Ok(());
    }
    let mut rng = rand::rngs::SmallRng::seed_from_u64(0);
    let mut out: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, shape, norm) in &tensors {
        let n: usize = shape.iter().product();
        if quant != Quant::None && quantizable(name) {
            let p = name.trim_end_matches(".weight");
            let (o, i) = (shape[0], shape[1]);
            out.extend(quantized(quant, p, (o, i), &mut rng));
            continue;
        }
        let bytes = (0..n)
            .flat_map(|_| {
                let x = if *norm { 1.0 } else { (rng.random::<f32>() - 0.5) * 0.04 };
                half::bf16::from_f32(x).to_le_bytes()
            })
            .collect();
        out.push((name.clone(), Dtype::BF16, shape.clone(), bytes));
    }
    let views = out
        .iter()
        .map(|(name, dtype, shape, bytes)| Ok((name.clone(), TensorView::new(*dtype, shape.clone(), bytes)?)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    safetensors::serialize_to_file(views, None, &dir.join("model.safetensors"))?;
    Ok(())
}

/// Random tensors of projection `p` (`[out, in]`) in `quant`'s layout: GPTQ's packed 4-bit
/// words with zero 8 and small scales, or FP8 bytes (never NaN) with 128 x 128 scales.
fn quantized(
    quant: Quant,
    p: &str,
    (o, i): (usize, usize),
    rng: &mut impl Rng,
) -> Vec<(String, Dtype, Vec<usize>, Vec<u8>)> {
    let words = |n: usize, rng: &mut dyn rand::RngCore| (0..n).flat_map(|_| rng.next_u32().to_le_bytes()).collect();
    match quant {
        Quant::None => Vec::new(),
        Quant::GptqInt4 => {
            let groups = i.div_ceil(128);
            let scales = (0..groups * o).flat_map(|_| half::f16::from_f32(0.003).to_le_bytes()).collect();
            let zeros = (0..groups * o / 8).flat_map(|_| 0x7777_7777u32.to_le_bytes()).collect();
            let g_idx = (0..i).flat_map(|r| ((r / 128) as u32).to_le_bytes()).collect();
            vec![
                (format!("{p}.qweight"), Dtype::I32, vec![i / 8, o], words(i / 8 * o, rng)),
                (format!("{p}.qzeros"), Dtype::I32, vec![groups, o / 8], zeros),
                (format!("{p}.scales"), Dtype::F16, vec![groups, o], scales),
                (format!("{p}.g_idx"), Dtype::I32, vec![i], g_idx),
            ]
        }
        Quant::Fp8 => {
            let (r, c) = (o.div_ceil(128), i.div_ceil(128));
            // Exponent bits below all-ones: no NaN.
            let bytes = (0..o * i).map(|_| rng.random::<u8>() & 0xEF).collect();
            let scales = (0..r * c).flat_map(|_| 1e-4f32.to_le_bytes()).collect();
            vec![
                (format!("{p}.weight"), Dtype::F8_E4M3, vec![o, i], bytes),
                (format!("{p}.weight_scale_inv"), Dtype::F32, vec![r, c], scales),
            ]
        }
    }
}
