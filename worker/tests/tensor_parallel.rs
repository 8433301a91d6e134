//! Tensor parallelism with CPU ranks (one thread per rank, TCP collectives on loopback): every
//! architecture at TP 1, 2, 3 and 4 where its heads allow, including more ranks than KV heads,
//! gives the unsharded goldens; a size that cannot shard is refused by name.

mod common;
use common::{fixture, ids};

use std::net::TcpListener;
use std::time::Duration;

use candle_core::{DType, Device};
use qwen_worker::comm::{Comm, TcpComm, TcpConfig};
use qwen_worker::generate::{generate, GenerateParams};
use qwen_worker::model::{ContiguousKvCache, Model, SeqChunk};
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
    let mut model = Model::load_sharded(&fixture(name), DType::F32, &Device::Cpu, comm).unwrap();
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
            std::thread::spawn(move || {
                f(Comm::Tcp(TcpComm::join(addr, &TcpConfig { rank, world_size: tp, timeout }).unwrap()))
            })
        })
        .collect();
    let root = if tp == 1 {
        Comm::Single
    } else {
        Comm::Tcp(TcpComm::root(listener, &TcpConfig { rank: 0, world_size: tp, timeout }).unwrap())
    };
    let mut out = vec![f(root)];
    out.extend(peers.into_iter().map(|t| t.join().unwrap()));
    out
}

#[test]
fn every_architecture_matches_goldens_at_every_shardable_tp() {
    for name in ["qwen2-gqa", "qwen2-tied-bf16-sharded", "qwen3", "qwen1-ntk-logn", "qwen1-partial-rotary"] {
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
