//! The engine over a tensor-parallel group: rank 0 schedules and broadcasts step plans, a
//! follower rank runs the same forwards on its shard. Outputs equal the unsharded goldens; a
//! follower that dies breaks the group loudly instead of hanging.

mod common;
use common::{fixture, ids};

use std::net::TcpListener;
use std::time::Duration;

use candle_core::{DType, Device};
use qwen_worker::comm::{Comm, TcpComm, TcpConfig};
use qwen_worker::engine::runner::{spawn, EngineConfig, EngineHandle, NewRequest};
use qwen_worker::engine::scheduler::SchedulerConfig;
use qwen_worker::engine::sequence::{Event, FinishReason};
use qwen_worker::engine::{follower, sequence};
use qwen_worker::generate::GenerateParams;
use qwen_worker::model::Model;
use qwen_worker::sampling::SamplingParams;
use serde_json::Value;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

const BLOCKS: usize = 128;
const BLOCK_SIZE: usize = 4;

/// Rank 0's engine plus follower threads for ranks 1..tp; the followers' join handles report
/// how each ended.
fn group(name: &'static str, tp: usize, timeout: Duration) -> (EngineHandle, Vec<std::thread::JoinHandle<String>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let followers = (1..tp)
        .map(|rank| {
            std::thread::spawn(move || {
                let comm = Comm::Tcp(TcpComm::join(addr, &TcpConfig::plain(rank, tp, timeout)).unwrap());
                let model = Model::load_sharded(&fixture(name), DType::F32, &Device::Cpu, comm).unwrap();
                match follower::run(model, BLOCK_SIZE, BLOCKS, &Device::Cpu) {
                    Ok(()) => "stopped".to_string(),
                    Err(e) => e.to_string(),
                }
            })
        })
        .collect();
    let comm = Comm::Tcp(TcpComm::root(listener, &TcpConfig::plain(0, tp, timeout)).unwrap());
    let model = Model::load_sharded(&fixture(name), DType::F32, &Device::Cpu, comm).unwrap();
    let config = EngineConfig {
        scheduler: SchedulerConfig { block_size: BLOCK_SIZE, max_batch_tokens: 16, max_seqs: 8 },
        num_blocks: BLOCKS,
        model_name: name.into(),
        observer: None,
        decode_graphs: false,
    };
    (spawn(model, config).unwrap().0, followers)
}

fn submit(e: &EngineHandle, id: &str, prompt: &[u32], n: usize) -> UnboundedReceiver<Event> {
    let (tx, rx) = unbounded_channel();
    let params = GenerateParams { max_new_tokens: n, sampling: SamplingParams::greedy(), stop_token_ids: vec![] };
    e.submit(NewRequest { request_id: id.into(), prompt: prompt.to_vec(), params, events: tx, constraint: None })
        .unwrap();
    rx
}

fn collect(mut rx: UnboundedReceiver<Event>) -> (Vec<u32>, sequence::FinishReason) {
    let mut tokens = Vec::new();
    loop {
        match rx.blocking_recv().expect("finished event") {
            Event::Token { token, .. } => tokens.push(token),
            Event::Finished { reason, .. } => return (tokens, reason),
        }
    }
}

#[test]
fn a_two_and_four_rank_engine_matches_goldens_and_stops_its_followers() {
    for (name, tp) in [("qwen2-gqa", 2), ("qwen1-ntk-logn", 2), ("qwen3", 4)] {
        let g: Value =
            serde_json::from_str(&std::fs::read_to_string(fixture(name).join("golden.json")).unwrap()).unwrap();
        let (engine, followers) = group(name, tp, Duration::from_secs(3));
        if tp == 2 {
            // Idle past the collective timeout: heartbeats (every timeout / 4) keep the followers
            // from timing out while there is no work.
            std::thread::sleep(Duration::from_secs(4));
        }
        let streams: Vec<_> = g["cases"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .map(|(i, c)| (submit(&engine, &format!("r{i}"), &ids(&c["prompt_ids"]), 32), ids(&c["greedy"])))
            .collect();
        for (rx, want) in streams {
            let (got, reason) = collect(rx);
            assert_eq!((got, reason), (want, FinishReason::Length), "{name} tp {tp}");
        }
        drop(engine);
        for f in followers {
            assert_eq!(f.join().unwrap(), "stopped");
        }
    }
}

#[test]
fn a_dead_follower_fails_requests_instead_of_hanging() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let timeout = Duration::from_secs(2);
    // A "follower" that joins and then dies at once, like a SIGKILLed rank.
    let dead = std::thread::spawn(move || drop(TcpComm::join(addr, &TcpConfig::plain(1, 2, timeout)).unwrap()));
    let comm = Comm::Tcp(TcpComm::root(listener, &TcpConfig::plain(0, 2, timeout)).unwrap());
    dead.join().unwrap();
    let model = Model::load_sharded(&fixture("qwen2-gqa"), DType::F32, &Device::Cpu, comm).unwrap();
    let config = EngineConfig {
        scheduler: SchedulerConfig { block_size: BLOCK_SIZE, max_batch_tokens: 16, max_seqs: 8 },
        num_blocks: BLOCKS,
        model_name: "x".into(),
        observer: None,
        decode_graphs: false,
    };
    let (engine, thread) = spawn(model, config).unwrap();
    let (tokens, reason) = collect(submit(&engine, "a", &[1, 2, 3], 4));
    assert_eq!((tokens.len(), reason), (0, FinishReason::Error));
    thread.join().unwrap();
    assert!(!engine.is_alive(), "the engine stops once its group is broken");
}
