use std::collections::HashMap;

use candle_core::Device;

use super::*;
use crate::config::Architecture;
use crate::test_util::randn;

const H: usize = 16;
const FF: usize = 8;
const SHARED_FF: usize = 12;

fn moe_config(num_experts: usize, top_k: usize, norm: bool, shared: bool) -> MoeConfig {
    MoeConfig {
        num_experts,
        top_k,
        expert_hidden: FF,
        norm_topk_prob: norm,
        shared_expert_hidden: shared.then_some(SHARED_FF),
        sparse_step: 1,
        dense_layers: vec![],
    }
}

fn model_config(moe: MoeConfig) -> ModelConfig {
    ModelConfig {
        architecture: Architecture::Qwen2Moe,
        vocab_size: 32,
        hidden_size: H,
        num_layers: 1,
        num_heads: 2,
        num_kv_heads: 2,
        head_dim: 8,
        mlp_hidden: 24,
        rms_norm_eps: 1e-6,
        rope_theta: 1e4,
        rotary_dim: 8,
        max_position_embeddings: 64,
        tie_word_embeddings: false,
        qkv_bias: true,
        qk_norm: false,
        declared_dtype: None,
        long_context: None,
        moe: Some(moe),
        quant: None,
    }
}

/// One layer's MoE tensors in the Hub's layout, seeded, as a checkpoint directory.
fn checkpoint(moe: &MoeConfig) -> (tempfile::TempDir, HashMap<String, Tensor>) {
    let dev = Device::Cpu;
    let mut t = HashMap::new();
    let p = "model.layers.0.mlp";
    t.insert(format!("{p}.gate.weight"), randn(&[moe.num_experts, H], DType::F32, &dev));
    let mut add_mlp = |prefix: String, ff: usize| {
        t.insert(format!("{prefix}.gate_proj.weight"), (randn(&[ff, H], DType::F32, &dev) * 0.3).unwrap());
        t.insert(format!("{prefix}.up_proj.weight"), (randn(&[ff, H], DType::F32, &dev) * 0.3).unwrap());
        t.insert(format!("{prefix}.down_proj.weight"), (randn(&[H, ff], DType::F32, &dev) * 0.3).unwrap());
    };
    for e in 0..moe.num_experts {
        add_mlp(format!("{p}.experts.{e}"), FF);
    }
    if let Some(ff) = moe.shared_expert_hidden {
        add_mlp(format!("{p}.shared_expert"), ff);
        t.insert(format!("{p}.shared_expert_gate.weight"), randn(&[1, H], DType::F32, &dev));
    }
    let dir = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(&t, dir.path().join("model.safetensors")).unwrap();
    (dir, t)
}

fn layer(dir: &std::path::Path, moe: &MoeConfig, shard: Shard, split: ExpertSplit) -> SparseMoe {
    let w = Weights::open(dir, DType::F32, &Device::Cpu).unwrap();
    let plan = ExpertPlan { split, load: ExpertLoad::new(moe.num_experts, &Device::Cpu).unwrap() };
    SparseMoe::load(&w, &model_config(moe.clone()), moe, "model.layers.0", shard, &plan).unwrap()
}

/// transformers' Qwen2MoeSparseMoeBlock, one token at a time on the host.
fn reference(t: &HashMap<String, Tensor>, moe: &MoeConfig, x: &Tensor) -> Vec<Vec<f32>> {
    let p = "model.layers.0.mlp";
    let m = |name: &str| -> Vec<Vec<f32>> { t[name].to_vec2().unwrap() };
    let dot = |a: &[f32], b: &[f32]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f32>();
    let silu = |v: f32| v / (1.0 + (-v).exp());
    let mlp = |prefix: String, xt: &[f32]| -> Vec<f32> {
        let (g, u, d) = (
            m(&format!("{prefix}.gate_proj.weight")),
            m(&format!("{prefix}.up_proj.weight")),
            m(&format!("{prefix}.down_proj.weight")),
        );
        let inner: Vec<f32> = g.iter().zip(&u).map(|(gr, ur)| silu(dot(gr, xt)) * dot(ur, xt)).collect();
        d.iter().map(|dr| dot(dr, &inner)).collect()
    };
    let router = m(&format!("{p}.gate.weight"));
    x.to_vec2::<f32>()
        .unwrap()
        .iter()
        .map(|xt| {
            let logits: Vec<f32> = router.iter().map(|r| dot(r, xt)).collect();
            let max = logits.iter().cloned().fold(f32::MIN, f32::max);
            let z: f32 = logits.iter().map(|l| (l - max).exp()).sum();
            let mut probs: Vec<(usize, f32)> = logits.iter().map(|l| (l - max).exp() / z).enumerate().collect();
            probs.sort_by(|a, b| b.1.total_cmp(&a.1));
            let top = &probs[..moe.top_k];
            let norm: f32 = if moe.norm_topk_prob { top.iter().map(|p| p.1).sum() } else { 1.0 };
            let mut out = vec![0f32; H];
            for &(e, w) in top {
                for (o, v) in out.iter_mut().zip(mlp(format!("{p}.experts.{e}"), xt)) {
                    *o += w / norm * v;
                }
            }
            if moe.shared_expert_hidden.is_some() {
                let g = 1.0 / (1.0 + (-dot(&m(&format!("{p}.shared_expert_gate.weight"))[0], xt)).exp());
                for (o, v) in out.iter_mut().zip(mlp(format!("{p}.shared_expert"), xt)) {
                    *o += g * v;
                }
            }
            out
        })
        .collect()
}

fn max_diff(a: &Tensor, b: &[Vec<f32>]) -> f32 {
    let a: Vec<Vec<f32>> = a.to_vec2().unwrap();
    a.iter().flatten().zip(b.iter().flatten()).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn experts_match_the_per_token_reference() {
    for (experts, top_k, norm, shared) in [(6, 2, false, true), (5, 3, true, false), (4, 4, true, true)] {
        let moe = moe_config(experts, top_k, norm, shared);
        let (dir, tensors) = checkpoint(&moe);
        let x = randn(&[9, H], DType::F32, &Device::Cpu);
        let want = reference(&tensors, &moe, &x);
        for mode in [KernelMode::Plain, KernelMode::Fused] {
            let got = layer(dir.path(), &moe, Shard::SINGLE, ExpertSplit::Sliced).forward(&x, mode).unwrap();
            let d = max_diff(&got, &want);
            assert!(d < 1e-5, "{experts} experts top {top_k} norm {norm} shared {shared} {mode:?}: {d}");
        }
    }
}

#[test]
fn split_experts_sum_to_the_whole_layer() {
    let moe = moe_config(10, 3, false, true);
    let (dir, tensors) = checkpoint(&moe);
    let x = randn(&[7, H], DType::F32, &Device::Cpu);
    let want = reference(&tensors, &moe, &x);
    for (world, split) in
        [(2, ExpertSplit::Sliced), (4, ExpertSplit::Sliced), (2, ExpertSplit::Whole), (4, ExpertSplit::Whole)]
    {
        for mode in [KernelMode::Plain, KernelMode::Fused] {
            let mut sum: Option<Tensor> = None;
            for rank in 0..world {
                let part = layer(dir.path(), &moe, Shard { rank, world }, split).forward(&x, mode).unwrap();
                sum = Some(match sum {
                    Some(s) => (s + part).unwrap(),
                    None => part,
                });
            }
            let d = max_diff(&sum.unwrap(), &want);
            assert!(d < 1e-5, "{split:?} over {world} {mode:?}: {d}");
        }
    }
}

#[test]
fn whole_experts_are_spread_as_evenly_as_the_count_allows() {
    let blocks: Vec<_> = (0..4).map(|r| owned_experts(10, Shard { rank: r, world: 4 }, ExpertSplit::Whole)).collect();
    assert_eq!(blocks, vec![0..3, 3..6, 6..8, 8..10]);
    assert_eq!(owned_experts(10, Shard { rank: 2, world: 4 }, ExpertSplit::Sliced), 0..10);
}

#[test]
fn grouping_orders_by_expert_and_keeps_token_order() {
    // 3 tokens, top 2: (0: e2, e0), (1: e0, e1), (2: e2, e1).
    let g = group_by_expert(&[2, 0, 0, 1, 2, 1], 2, 4).unwrap();
    assert_eq!(g.counts, vec![2, 2, 2, 0]);
    assert_eq!(g.offsets, vec![0, 2, 4, 6]);
    assert_eq!(g.tokens, vec![0, 1, 1, 2, 0, 2]);
    assert_eq!(g.assignment, vec![1, 2, 3, 5, 0, 4]);
    assert!(group_by_expert(&[7], 1, 4).is_err());
}

#[test]
fn load_counts_tokens_per_expert_on_rank_zero() {
    let moe = moe_config(4, 2, true, false);
    let (dir, _) = checkpoint(&moe);
    let l = layer(dir.path(), &moe, Shard::SINGLE, ExpertSplit::Sliced);
    let x = randn(&[5, H], DType::F32, &Device::Cpu);
    l.forward(&x, KernelMode::Plain).unwrap();
    assert_eq!(l.load.snapshot().iter().sum::<u64>(), 10, "5 tokens x top 2");
    // The fused path counts on the device; collecting folds only what is new.
    l.forward(&x, KernelMode::Fused).unwrap();
    assert_eq!(l.load.snapshot().iter().sum::<u64>(), 10, "not yet collected");
    l.load.collect().unwrap();
    let once = l.load.snapshot();
    assert_eq!(once.iter().sum::<u64>(), 20);
    l.load.collect().unwrap();
    assert_eq!(l.load.snapshot(), once, "a second collect adds nothing");
    let other = layer(dir.path(), &moe, Shard { rank: 1, world: 2 }, ExpertSplit::Sliced);
    other.forward(&x, KernelMode::Fused).unwrap();
    other.load.collect().unwrap();
    assert_eq!(other.load.snapshot().iter().sum::<u64>(), 0, "only rank 0 counts");
}

#[test]
fn a_long_prefill_in_fused_mode_takes_the_grouped_path_with_the_same_result() {
    let moe = moe_config(6, 2, false, true);
    let (dir, tensors) = checkpoint(&moe);
    let t = FUSED_MAX_ASSIGNMENTS / moe.top_k + 3;
    let x = randn(&[t, H], DType::F32, &Device::Cpu);
    let l = layer(dir.path(), &moe, Shard::SINGLE, ExpertSplit::Sliced);
    let d = max_diff(&l.forward(&x, KernelMode::Fused).unwrap(), &reference(&tensors, &moe, &x));
    assert!(d < 1e-5, "{d}");
    assert_eq!(l.load.snapshot().iter().sum::<u64>(), (t * moe.top_k) as u64, "counted on the host");
}

#[test]
fn splits_that_cannot_work_are_refused_by_name() {
    let cfg = model_config(moe_config(3, 2, false, true));
    let err = check(&cfg, Shard { rank: 0, world: 4 }, ExpertSplit::Whole).unwrap_err().to_string();
    assert!(err.contains("num_experts = 3"), "{err}");
    let err = check(&cfg, Shard { rank: 0, world: 3 }, ExpertSplit::Sliced).unwrap_err().to_string();
    assert!(err.contains("moe_intermediate_size = 8"), "{err}");
    assert!(check(&cfg, Shard { rank: 0, world: 2 }, ExpertSplit::Whole).is_ok());
    let dense = ModelConfig { moe: None, ..cfg };
    assert!(check(&dense, Shard { rank: 0, world: 2 }, ExpertSplit::Whole).is_err());
}

#[test]
fn a_missing_expert_tensor_is_named() {
    let moe = moe_config(4, 2, false, false);
    let (dir, mut tensors) = checkpoint(&moe);
    tensors.remove("model.layers.0.mlp.experts.3.down_proj.weight");
    candle_core::safetensors::save(&tensors, dir.path().join("model.safetensors")).unwrap();
    let w = Weights::open(dir.path(), DType::F32, &Device::Cpu).unwrap();
    let plan = ExpertPlan { split: ExpertSplit::Sliced, load: ExpertLoad::new(4, &Device::Cpu).unwrap() };
    let err = SparseMoe::load(&w, &model_config(moe.clone()), &moe, "model.layers.0", Shard::SINGLE, &plan)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("model.layers.0.mlp.experts.3.down_proj.weight"), "{err}");
}
