//! Attention over the paged KV store gives the reference results: scattered block tables, small
//! blocks, prompts prefilled in chunks, several sequences batched together.

mod common;
use common::{fixture, ids};

use candle_core::{DType, Device};
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

#[test]
fn paged_chunked_batched_greedy_matches_reference() {
    for name in ["qwen2-gqa", "qwen2-tied-bf16-sharded", "qwen3", "qwen1-ntk-logn", "qwen1-partial-rotary"] {
        let golden: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(name).join("golden.json")).unwrap()).unwrap();
        let mut model = Model::load(&fixture(name), DType::F32, &Device::Cpu).unwrap();
        let cfg = model.config().clone();
        let block_size = 4;
        let layout = KvLayout {
            num_layers: cfg.num_layers,
            num_kv_heads: cfg.num_kv_heads,
            head_dim: cfg.head_dim,
            block_size,
            dtype: DType::F32,
        };
        let cases = golden["cases"].as_array().unwrap();
        let total_blocks = 64;
        let mut store = PagedKvStore::new(layout, total_blocks, &Device::Cpu).unwrap();
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
            let next: Vec<u32> = logits.argmax(1).unwrap().to_vec1().unwrap();
            for (k, &i) in active.iter().enumerate() {
                let s = &mut seqs[i];
                s.computed += chunks[k].len;
                if s.computed == s.tokens.len() {
                    s.tokens.push(next[k]);
                }
            }
        }
        for (i, s) in seqs.iter().enumerate() {
            assert_eq!(&s.tokens[s.prompt_len..], want[i].as_slice(), "{name}: sequence {i}");
        }
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
}
