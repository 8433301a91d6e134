//! Tensor parallelism with CPU ranks (one thread per rank, TCP collectives on loopback): every
//! architecture at TP 1, 2, 3 and 4 where its heads allow, including more ranks than KV heads,
//! gives the unsharded goldens; a size that cannot shard is refused by name.

mod common;
use common::{fixture, ids, FIXTURES};

use std::net::TcpListener;
use std::time::Duration;

use candle_core::{DType, Device};
use qwen_worker::comm::{Comm, TcpComm, TcpConfig};
use qwen_worker::generate::{generate, GenerateParams};
use qwen_worker::model::moe::ExpertSplit;
use qwen_worker::model::{ContiguousKvCache, LoadOptions, Model, SeqChunk};
use qwen_worker::sampling::SamplingParams;
use serde_json::Value;

type Case = (Vec<u32>, Vec<f32>, Vec<u32>);

fn cases(name: &str) -> Vec<Case> {
    let g: Value = serde_json::from_str(&std::fs::read_to_string(fixture(name).join("golden.json")).unwrap()).unwrap();
    g["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            let logits = c["last_logits"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap() as f32).collect();
            (ids(&c["prompt_ids"]), logits, ids(&c["greedy"]))
        })
        .collect()
}

/// One rank: its logits for every case's prompt and its greedy continuations.
fn run_rank(name: &str, comm: Comm, cases: &[Case]) -> Vec<(Vec<f32>, Vec<u32>)> {
    run_rank_in(&fixture(name), comm, cases)
}

fn run_rank_in(dir: &std::path::Path, comm: Comm, cases: &[Case]) -> Vec<(Vec<f32>, Vec<u32>)> {
    run_rank_with(dir, comm, cases, LoadOptions::default())
}

fn run_rank_with(dir: &std::path::Path, comm: Comm, cases: &[Case], options: LoadOptions) -> Vec<(Vec<f32>, Vec<u32>)> {
    let mut model = Model::load_with(dir, DType::F32, &Device::Cpu, comm, options).unwrap();
    cases
        .iter()
        .map(|(prompt, _, greedy)| {
            let mut cache = ContiguousKvCache::new(model.config().num_layers);
            let seq = SeqChunk {
                seq_id: 0,
                context_len: 0,
                len: prompt.len(),
                rope_alpha: model.config().ntk_alpha(prompt.len()),
            };
            let logits =
                model.forward(prompt, &[seq], &mut cache).unwrap().squeeze(0).unwrap().to_vec1::<f32>().unwrap();
            let params = GenerateParams {
                max_new_tokens: greedy.len(),
                sampling: SamplingParams::greedy(),
                stop_token_ids: vec![],
            };
            let out = generate(&mut model, prompt, &params, |_| Ok(())).unwrap();
            (logits, out.token_ids)
        })
        .collect()
}

/// Runs `f` on every rank of a `tp`-rank group (rank 0 first in the result).
fn with_group<T: Send + 'static>(tp: usize, f: impl Fn(Comm) -> T + Clone + Send + 'static) -> Vec<T> {
    let timeout = Duration::from_secs(60);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let peers: Vec<_> = (1..tp)
        .map(|rank| {
            let f = f.clone();
            std::thread::spawn(move || f(Comm::Tcp(TcpComm::join(addr, &TcpConfig::plain(rank, tp, timeout)).unwrap())))
        })
        .collect();
    let root = if tp == 1 {
        Comm::Single
    } else {
        Comm::Tcp(TcpComm::root(listener, &TcpConfig::plain(0, tp, timeout)).unwrap())
    };
    let mut out = vec![f(root)];
    out.extend(peers.into_iter().map(|t| t.join().unwrap()));
    out
}

/// Expert parallelism: each rank holds whole experts (6 over 4 ranks: 2, 2, 1, 1; 10 over 4:
/// 3, 3, 2, 2), attention stays tensor-parallel, and the outputs are the unsharded goldens.
#[test]
fn expert_parallel_groups_match_goldens() {
    let options = LoadOptions { experts: ExpertSplit::Whole };
    for name in ["qwen2-moe", "qwen3-moe", "qwen3-moe-fp8"] {
        let cases = cases(name);
        for tp in [2, 4] {
            let c = cases.clone();
            let ranks = with_group(tp, move |comm| run_rank_with(&fixture(name), comm, &c, options));
            for (r, results) in ranks.iter().enumerate() {
                for ((logits, greedy), (prompt, want_logits, want_greedy)) in results.iter().zip(&cases) {
                    let diff = logits.iter().zip(want_logits).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                    assert!(diff < 1e-4, "{name} ep {tp} rank {r}, prompt {}: max |Δlogit| {diff}", prompt.len());
                    assert_eq!(greedy, want_greedy, "{name} ep {tp} rank {r}, prompt {}", prompt.len());
                }
            }
        }
    }
    // More ranks than experts cannot each hold whole ones: refused at load on every rank.
    let errs = with_group(2, move |comm| {
        let dir = fixture("qwen2-gqa");
        Model::load_with(&dir, DType::F32, &Device::Cpu, comm, options).err().unwrap().to_string()
    });
    for err in errs {
        assert!(err.contains("no experts"), "{err}");
    }
}

#[test]
fn every_architecture_matches_goldens_at_every_shardable_tp() {
    for name in FIXTURES {
        let cases = cases(name);
        let heads = qwen_worker::config::ModelConfig::from_dir(&fixture(name)).unwrap().num_heads;
        for tp in [1, 2, 3, 4] {
            if heads % tp != 0 {
                // Every rank refuses at load, before any collective runs.
                let errs = with_group(tp, move |comm| {
                    Model::load_sharded(&fixture(name), DType::F32, &Device::Cpu, comm).err().unwrap().to_string()
                });
                for err in errs {
                    assert!(err.contains(&format!("tensor-parallel size {tp} does not divide")), "{err}");
                }
                continue;
            }
            let c = cases.clone();
            let ranks = with_group(tp, move |comm| run_rank(name, comm, &c));
            for (r, results) in ranks.iter().enumerate() {
                for ((logits, greedy), (prompt, want_logits, want_greedy)) in results.iter().zip(&cases) {
                    let diff = logits.iter().zip(want_logits).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                    assert!(diff < 1e-4, "{name} tp {tp} rank {r}, prompt {}: max |Δlogit| {diff}", prompt.len());
                    assert_eq!(greedy, want_greedy, "{name} tp {tp} rank {r}, prompt {}", prompt.len());
                }
            }
        }
    }
}

/// `name`'s checkpoint with its vocabulary cut to `vocab` rows (as a fine-tune resized to its
/// tokenizer, e.g. 151,665 tokens, which no power of two divides).
fn resized_vocab(name: &str, vocab: usize) -> tempfile::TempDir {
    use safetensors::tensor::TensorView;
    let src = fixture(name);
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(src.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: Vec<(String, safetensors::Dtype, Vec<usize>, Vec<u8>)> = Vec::new();
    for (tensor, view) in st.tensors() {
        let (mut shape, mut data) = (view.shape().to_vec(), view.data().to_vec());
        if tensor.contains("embed_tokens") || tensor.contains("lm_head") {
            data.truncate(data.len() / shape[0] * vocab);
            shape[0] = vocab;
        }
        tensors.push((tensor, view.dtype(), shape, data));
    }
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, None, &dir.path().join("model.safetensors")).unwrap();
    let mut config: Value = serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    config["vocab_size"] = vocab.into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    dir
}

/// A vocabulary that no group size divides is padded on the last ranks: TP 2 and 4 give the
/// unsharded logits and greedy tokens (which never pick a padding id).
#[test]
fn a_vocabulary_that_does_not_divide_shards_with_padding() {
    let dir = resized_vocab("qwen2-gqa", 509);
    let path = std::sync::Arc::new(dir.path().to_path_buf());
    let prompts: Vec<Case> =
        cases("qwen2-gqa").into_iter().map(|(p, _, g)| (p.iter().map(|t| t % 509).collect(), vec![], g)).collect();
    let (p, c) = (path.clone(), prompts.clone());
    let reference = with_group(1, move |comm| run_rank_in(&p, comm, &c)).remove(0);
    for tp in [2, 4] {
        let (p, c) = (path.clone(), prompts.clone());
        let ranks = with_group(tp, move |comm| run_rank_in(&p, comm, &c));
        for (r, results) in ranks.iter().enumerate() {
            for ((logits, greedy), (want_logits, want_greedy)) in results.iter().zip(&reference) {
                assert_eq!(logits.len(), 509, "tp {tp} rank {r}");
                let diff = logits.iter().zip(want_logits).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
                assert!(diff < 1e-4, "tp {tp} rank {r}: max |Δlogit| {diff}");
                assert_eq!(greedy, want_greedy, "tp {tp} rank {r}");
                assert!(greedy.iter().all(|&t| t < 509));
            }
        }
    }
}
