//! Attention over the paged KV store gives the reference results: scattered block tables, small
//! blocks, prompts prefilled in chunks, several sequences batched together.

mod common;
use common::{fixture, ids, FIXTURES};

use candle_core::{DType, Device};
use qwen_worker::kernels::KernelMode;
use qwen_worker::model::paged::{KvLayout, PagedKvStore};
use qwen_worker::model::{Model, SeqChunk};
use serde_json::Value;

struct Seq {
    tokens: Vec<u32>,
    prompt_len: usize,
    computed: usize,
    table: Vec<u32>,
    alpha: f64,
}

/// Where and how a fixture runs.
#[derive(Clone, Copy)]
struct Run<'a> {
    device: &'a Device,
    dtype: DType,
    kernels: KernelMode,
}

/// What a fixture run gives: the generated tokens, the first step's logits (f32, on the host)
/// and the golden tokens.
type Outcome = (Vec<Vec<u32>>, Vec<Vec<f32>>, Vec<Vec<u32>>);

/// Runs every case of fixture `name` through the paged store, prompts in chunks of 5 and all
/// sequences batched, greedily until each has its golden length.
fn run_fixture(name: &str, run: Run) -> Outcome {
    let golden: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture(name).join("golden.json")).unwrap()).unwrap();
    let mut model = Model::load(&fixture(name), run.dtype, run.device).unwrap();
    model.set_kernels(run.kernels);
    let cfg = model.config().clone();
    let block_size = 4;
    let layout = KvLayout {
        num_layers: cfg.num_layers,
        num_kv_heads: cfg.num_kv_heads,
        head_dim: cfg.head_dim,
        block_size,
        dtype: run.dtype,
    };
    let cases = golden["cases"].as_array().unwrap();
    let total_blocks = 64;
    let mut store = PagedKvStore::new(layout, total_blocks, run.device).unwrap();
    store.set_kernels(run.kernels);
    // Hand out block ids in a scrambled order so tables are far from contiguous.
    let mut free: Vec<u32> = (0..total_blocks as u32).map(|i| (i * 37) % total_blocks as u32).collect();
    let mut seqs: Vec<Seq> = cases
        .iter()
        .map(|c| {
            let prompt = ids(&c["prompt_ids"]);
            Seq {
                prompt_len: prompt.len(),
                alpha: cfg.ntk_alpha(prompt.len()),
                tokens: prompt,
                computed: 0,
                table: vec![],
            }
        })
        .collect();
    let want: Vec<Vec<u32>> = cases.iter().map(|c| ids(&c["greedy"])).collect();
    let chunk = 5; // prompts go in several steps
    let mut first_logits = None;
    while seqs.iter().zip(&want).any(|(s, w)| s.tokens.len() - s.prompt_len < w.len()) {
        let active: Vec<usize> =
            (0..seqs.len()).filter(|&i| seqs[i].tokens.len() - seqs[i].prompt_len < want[i].len()).collect();
        let mut tokens = Vec::new();
        let mut chunks = Vec::new();
        for &i in &active {
            let s = &mut seqs[i];
            let len = (s.tokens.len() - s.computed).min(chunk);
            while s.table.len() * block_size < s.computed + len {
                s.table.push(free.pop().unwrap());
            }
            tokens.extend_from_slice(&s.tokens[s.computed..s.computed + len]);
            chunks.push(SeqChunk { seq_id: i as u64, context_len: s.computed, len, rope_alpha: s.alpha });
        }
        let tables: Vec<&[u32]> = active.iter().map(|&i| seqs[i].table.as_slice()).collect();
        let mut step = store.step(&chunks, &tables).unwrap();
        let logits = model.forward(&tokens, &chunks, &mut step).unwrap();
        if first_logits.is_none() {
            first_logits = Some(logits.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap());
        }
        let next: Vec<u32> = logits.argmax(1).unwrap().to_vec1().unwrap();
        for (k, &i) in active.iter().enumerate() {
            let s = &mut seqs[i];
            s.computed += chunks[k].len;
            if s.computed == s.tokens.len() {
                s.tokens.push(next[k]);
            }
        }
    }
    let got = seqs.iter().map(|s| s.tokens[s.prompt_len..].to_vec()).collect();
    (got, first_logits.unwrap(), want)
}

/// Largest difference relative to the largest magnitude of `want`.
fn max_rel(got: &[Vec<f32>], want: &[Vec<f32>]) -> f32 {
    let scale = want.iter().flatten().fold(1e-6f32, |m, v| m.max(v.abs()));
    got.iter().flatten().zip(want.iter().flatten()).map(|(a, b)| (a - b).abs() / scale).fold(0.0, f32::max)
}

const CPU_F32: Run = Run { device: &Device::Cpu, dtype: DType::F32, kernels: KernelMode::Plain };

#[test]
fn paged_chunked_batched_greedy_matches_reference() {
    for name in FIXTURES {
        let (got, _, want) = run_fixture(name, CPU_F32);
        assert_eq!(got, want, "{name}");
    }
}

/// The fused path (its kernels' CPU references) against the plain one: same greedy tokens, and
/// logits equal to f32 rounding.
#[test]
fn fused_path_on_the_cpu_matches_the_plain_path() {
    for name in FIXTURES {
        let (got, logits, want) = run_fixture(name, Run { kernels: KernelMode::Fused, ..CPU_F32 });
        assert_eq!(got, want, "{name}");
        let (_, plain, _) = run_fixture(name, CPU_F32);
        assert!(max_rel(&logits, &plain) < 1e-4, "{name}: {}", max_rel(&logits, &plain));
    }
}

/// On a GPU (feature `cuda`): the fused kernels give the golden greedy tokens in f32, and bf16
/// logits within 1e-2 (relative to the largest) of the CPU's f32. Skipped without a GPU unless
/// `QWEN_REQUIRE_GPU=1`.
#[cfg(feature = "cuda")]
#[test]
fn fused_path_on_the_gpu_matches_the_cpu() {
    let Some(gpu) = common::gpu() else { return };
    for name in FIXTURES {
        let (_, cpu_logits, want) = run_fixture(name, CPU_F32);
        let f32_run = Run { device: &gpu, dtype: DType::F32, kernels: KernelMode::Fused };
        let (got, logits, _) = run_fixture(name, f32_run);
        assert_eq!(got, want, "{name} f32 on the GPU");
        assert!(max_rel(&logits, &cpu_logits) < 1e-4, "{name} f32: {}", max_rel(&logits, &cpu_logits));
        let (_, bf16_logits, _) = run_fixture(name, Run { dtype: DType::BF16, ..f32_run });
        let err = max_rel(&bf16_logits, &cpu_logits);
        assert!(err < 1e-2, "{name} bf16 logits off by {err}");
    }
}

#[test]
fn a_table_too_short_or_out_of_range_is_refused() {
    let layout = KvLayout { num_layers: 1, num_kv_heads: 1, head_dim: 4, block_size: 4, dtype: DType::F32 };
    let mut store = PagedKvStore::new(layout, 2, &Device::Cpu).unwrap();
    let seqs = [SeqChunk { seq_id: 0, context_len: 0, len: 5, rope_alpha: 1.0 }];
    let err = store.step(&seqs, &[[0]]).err().unwrap();
    assert!(err.to_string().contains("needs 5 slots"), "{err}");
    let err = store.step(&seqs, &[[0, 7]]).err().unwrap();
    assert!(err.to_string().contains("block 7 out of range"), "{err}");
    // The engine builds the tables: a bad one is the worker's bug, never the client's
    // INVALID_ARGUMENT.
    assert_eq!(err.kind(), qwen_worker::error::ErrorKind::Internal);
    assert_eq!(qwen_worker::server::status(&err).code(), tonic::Code::Internal);
}
