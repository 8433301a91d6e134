//! The engine thread end to end (no network): concurrent staggered requests, preemption,
//! chunked prefill, the prefix cache, cancellation — each checked against the goldens.

mod common;
use common::{fixture, ids};

use std::time::Duration;

use candle_core::{DType, Device};
use qwen_worker::engine::runner::{spawn, EngineConfig, EngineHandle, NewRequest};
use qwen_worker::engine::scheduler::SchedulerConfig;
use qwen_worker::engine::sequence::{Event, FinishReason};
use qwen_worker::generate::GenerateParams;
use qwen_worker::kernels::KernelMode;
use qwen_worker::model::Model;
use qwen_worker::sampling::SamplingParams;
use serde_json::Value;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

/// (prompt, greedy continuation) pairs of a fixture.
fn goldens(name: &str) -> Vec<(Vec<u32>, Vec<u32>)> {
    let g: Value = serde_json::from_str(&std::fs::read_to_string(fixture(name).join("golden.json")).unwrap()).unwrap();
    g["cases"].as_array().unwrap().iter().map(|c| (ids(&c["prompt_ids"]), ids(&c["greedy"]))).collect()
}

fn engine(name: &str, blocks: usize, block_size: usize, max_batch_tokens: usize) -> EngineHandle {
    engine_with(name, (blocks, block_size, max_batch_tokens), KernelMode::Plain, false, &Device::Cpu)
}

/// An engine over fixture `name` in f32 with `(blocks, block_size, max_batch_tokens)`.
fn engine_with(
    name: &str,
    (blocks, block_size, max_batch_tokens): (usize, usize, usize),
    kernels: KernelMode,
    decode_graphs: bool,
    device: &Device,
) -> EngineHandle {
    let mut model = Model::load(&fixture(name), DType::F32, device).unwrap();
    model.set_kernels(kernels);
    let config = EngineConfig {
        scheduler: SchedulerConfig { block_size, max_batch_tokens, max_seqs: 64 },
        num_blocks: blocks,
        model_name: name.to_string(),
        observer: None,
        decode_graphs,
    };
    spawn(model, config).unwrap().0
}

fn submit(e: &EngineHandle, id: &str, prompt: &[u32], n: usize, sampling: SamplingParams) -> UnboundedReceiver<Event> {
    let (tx, rx) = unbounded_channel();
    let params = GenerateParams { max_new_tokens: n, sampling, stop_token_ids: vec![] };
    e.submit(NewRequest { request_id: id.to_string(), prompt: prompt.to_vec(), params, events: tx, constraint: None })
        .unwrap();
    rx
}

/// All tokens of a stream and how it finished.
fn collect(mut rx: UnboundedReceiver<Event>) -> (Vec<u32>, FinishReason, usize) {
    let mut tokens = Vec::new();
    loop {
        match rx.blocking_recv().expect("stream ends with Finished") {
            Event::Token { token, .. } => tokens.push(token),
            Event::Finished { reason, cached_prompt_tokens, .. } => return (tokens, reason, cached_prompt_tokens),
        }
    }
}

/// Submits `n` greedy requests over `name`'s golden cases, `stagger × i` apart, and checks that
/// each gets its golden tokens; returns once the engine is idle.
fn expect_goldens(e: &EngineHandle, name: &str, n: usize, stagger: Duration) {
    let cases = goldens(name);
    let streams: Vec<_> = (0..n)
        .map(|i| {
            let (prompt, want) = &cases[i % cases.len()];
            std::thread::sleep(stagger * i as u32);
            (submit(e, &format!("r{i}"), prompt, want.len(), SamplingParams::greedy()), want.clone())
        })
        .collect();
    for (i, (rx, want)) in streams.into_iter().enumerate() {
        assert_eq!(collect(rx).0, want, "{name}: request {i}");
    }
    wait_idle(e);
}

fn wait_idle(e: &EngineHandle) {
    for _ in 0..200 {
        let s = e.stats();
        if s.running == 0 && s.waiting == 0 {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("engine did not go idle: {:?}", e.stats());
}

/// 16 requests of different prompt lengths arriving at staggered times each get exactly the
/// tokens they get alone — on every architecture.
#[test]
fn concurrent_staggered_requests_match_goldens() {
    let quantized = ["qwen2-gptq-int4", "qwen3-gptq-int8-actorder", "qwen2-awq", "qwen3-moe-fp8", "qwen1-gptq-int4"];
    for name in ["qwen2-gqa", "qwen3", "qwen1-ntk-logn", "qwen2-moe", "qwen3-moe"].into_iter().chain(quantized) {
        let e = engine(name, 256, 4, 64);
        let cases = goldens(name);
        let mut streams = Vec::new();
        for i in 0..16 {
            let (prompt, want) = &cases[i % cases.len()];
            streams.push((submit(&e, &format!("r{i}"), prompt, want.len(), SamplingParams::greedy()), want.clone()));
            std::thread::sleep(Duration::from_millis(3 * (i as u64 % 4)));
        }
        for (i, (rx, want)) in streams.into_iter().enumerate() {
            let (got, reason, _) = collect(rx);
            assert_eq!(got, want, "{name}: request {i}");
            assert_eq!(reason, FinishReason::Length);
        }
        wait_idle(&e);
        assert_eq!(e.stats().free_blocks, 256, "{name}: every block is free again");
    }
}

/// A KV cache too small for everyone (forcing preemption) and a tiny token budget (forcing
/// chunked prefill) change nothing in the output.
#[test]
fn preemption_and_chunked_prefill_keep_outputs_identical() {
    let name = "qwen2-gqa";
    let cases = goldens(name);
    // 16 blocks of 4 tokens: the longest request (29 + 32 = 61 tokens) fits alone, several at once do not.
    for (blocks, budget) in [(16, 64), (256, 3), (16, 5)] {
        let e = engine(name, blocks, 4, budget);
        let streams: Vec<_> = (0..8)
            .map(|i| {
                let (prompt, want) = &cases[i % cases.len()];
                (submit(&e, &format!("r{i}"), prompt, want.len(), SamplingParams::greedy()), want.clone())
            })
            .collect();
        for (i, (rx, want)) in streams.into_iter().enumerate() {
            assert_eq!(collect(rx).0, want, "blocks {blocks}, budget {budget}: request {i}");
        }
        wait_idle(&e);
        let stats = e.stats();
        if blocks == 16 {
            assert!(stats.preemptions > 0, "blocks {blocks}: expected preemption, got {stats:?}");
        }
        assert_eq!(stats.free_blocks, blocks);
    }
}

#[test]
fn prefix_cache_hit_gives_identical_output_and_shows_in_stats() {
    let name = "qwen3";
    let (prompt, want) = goldens(name).into_iter().max_by_key(|(p, _)| p.len()).unwrap();
    let e = engine(name, 256, 4, 64);
    let (first, _, cached) = collect(submit(&e, "a", &prompt, want.len(), SamplingParams::greedy()));
    assert_eq!((first.as_slice(), cached), (want.as_slice(), 0));
    let (second, _, cached) = collect(submit(&e, "b", &prompt, want.len(), SamplingParams::greedy()));
    assert_eq!(second, want);
    assert_eq!(cached, (prompt.len() - 1) / 4 * 4, "every full block but the last token's came from the cache");
    let stats = e.stats();
    assert!(stats.prefix_cache_hit_rate > 0.0 && stats.cached_blocks > 0, "{stats:?}");
}

#[test]
fn seeded_sampling_is_the_same_alone_and_in_a_crowd() {
    let name = "qwen2-gqa";
    let sampling = SamplingParams { temperature: 1.2, top_p: 0.9, seed: 42, ..SamplingParams::default() };
    let prompt = [5u32, 6, 7, 8];
    let e = engine(name, 256, 4, 64);
    let (alone, ..) = collect(submit(&e, "alone", &prompt, 20, sampling.clone()));
    let crowd: Vec<_> = (0..6)
        .map(|i| {
            let other = SamplingParams { temperature: 1.0, seed: i, ..SamplingParams::default() };
            submit(&e, &format!("o{i}"), &[1, 2, 3][..(i as usize % 3 + 1)], 20, other)
        })
        .collect();
    let (together, ..) = collect(submit(&e, "crowd", &prompt, 20, sampling));
    assert_eq!(alone, together);
    for rx in crowd {
        collect(rx);
    }
}

/// The fused path through the engine (the kernels' CPU references, device-side sampling): greedy
/// requests match the goldens next to seeded sampling ones, a request with logprobs (sampled on
/// the host) in the same batch still gets its golden tokens, and seeded sampling is reproducible.
#[test]
fn fused_kernels_and_device_sampling_through_the_engine() {
    let name = "qwen2-gqa";
    let cases = goldens(name);
    let e = engine_with(name, (128, 4, 16), KernelMode::Fused, false, &Device::Cpu);
    let sampled = SamplingParams { temperature: 0.9, top_k: 20, top_p: 0.9, seed: 7, ..SamplingParams::default() };
    let first = collect(submit(&e, "s0", &[3, 4, 5], 12, sampled.clone())).0;
    let mut streams = Vec::new();
    for (i, (prompt, want)) in cases.iter().take(4).enumerate() {
        let greedy = SamplingParams { logprobs: (i == 1).then_some(2), ..SamplingParams::greedy() };
        streams.push((submit(&e, &format!("g{i}"), prompt, want.len(), greedy), want.clone()));
    }
    let again = submit(&e, "s1", &[3, 4, 5], 12, sampled);
    for (i, (rx, want)) in streams.into_iter().enumerate() {
        assert_eq!(collect(rx).0, want, "request {i}");
    }
    assert_eq!(collect(again).0, first, "the same seed gives the same tokens in a crowd");
    assert_eq!(first.len(), 12);
    wait_idle(&e);
    assert_eq!(e.stats().free_blocks, 128);
}

/// Decode steps through the static buffers of the CUDA-graph runner (run eagerly on the CPU):
/// batches padded to buckets with scratch-block rows, sequences joining and leaving, contexts
/// crossing block boundaries — every request still gets its golden tokens, and the scratch
/// block never leaks into the pool.
#[test]
fn decode_graph_buffers_keep_outputs_identical() {
    for name in ["qwen2-gqa", "qwen3"] {
        let e = engine_with(name, (96, 4, 64), KernelMode::Fused, true, &Device::Cpu);
        expect_goldens(&e, name, 5, Duration::from_millis(2));
        let stats = e.stats();
        assert_eq!(stats.free_blocks, 96);
        assert!(stats.graph_eager_steps > 10 && stats.graph_replays == 0, "{name}: {stats:?}");
    }
}

/// On a GPU (feature `cuda`): decode steps really replay from CUDA graphs (counted where the
/// launch happens) and every request still gets its golden tokens in f32. Skipped without a GPU
/// unless `QWEN_REQUIRE_GPU=1`.
#[cfg(feature = "cuda")]
#[test]
fn decode_graphs_on_the_gpu_replay_and_keep_goldens() {
    let Some(gpu) = common::gpu() else { return };
    // The MoE fixtures run the fused MoE kernels, which keep routing on the device.
    for name in ["qwen2-gqa", "qwen3", "qwen2-tied-bf16-sharded", "qwen2-moe", "qwen3-moe"] {
        let e = engine_with(name, (96, 4, 64), KernelMode::Fused, true, &gpu);
        expect_goldens(&e, name, 6, Duration::ZERO);
        let stats = e.stats();
        assert!(stats.graph_replays > 0, "{name}: graphs asked for, none replayed: {stats:?}");
        assert_eq!(stats.graph_eager_steps, 0, "{name}: a capture fell back to eager: {stats:?}");
    }
}

/// Many requests, some cancelled, some with their client gone: the cancelled ones end as
/// Cancelled, the rest run to their length, and afterwards every block is free.
#[test]
fn cancellations_and_disconnects_free_every_block() {
    let name = "qwen2-gqa";
    let e = engine(name, 64, 4, 32);
    let (mut kept, mut cancelled) = (Vec::new(), Vec::new());
    for i in 0..200u32 {
        let prompt: Vec<u32> = (0..(i % 13 + 1)).map(|t| (t * 7 + i) % 400).collect();
        let rx = submit(&e, &format!("r{i}"), &prompt, 8 + (i as usize % 5) * 4, SamplingParams::greedy());
        match i % 4 {
            // Commands apply in order, and a request needs several steps: the cancel lands first.
            0 => {
                e.cancel(&format!("r{i}")).unwrap();
                cancelled.push((i, rx));
            }
            1 => drop(rx),
            _ => kept.push((i, rx)),
        }
    }
    for (i, rx) in kept {
        let (tokens, reason, _) = collect(rx);
        assert!(reason == FinishReason::Length && !tokens.is_empty(), "request {i}: {reason:?}");
    }
    for (i, rx) in cancelled {
        assert_eq!(collect(rx).1, FinishReason::Cancelled, "request {i}");
    }
    wait_idle(&e);
    assert_eq!(e.stats().free_blocks, 64);
}

/// Cancel finds requests by id: a live id cannot be taken twice, and after a cancel the id is
/// free for a new request, which the earlier cancel does not touch.
#[test]
fn request_ids_are_unique_while_live() {
    let e = engine("qwen2-gqa", 64, 4, 32);
    let first = submit(&e, "same", &[1, 2, 3], 30, SamplingParams::greedy());
    let (tokens, reason, _) = collect(submit(&e, "same", &[4, 5], 3, SamplingParams::greedy()));
    assert_eq!((tokens.len(), reason), (0, FinishReason::Error));
    e.cancel("same").unwrap();
    let again = submit(&e, "same", &[4, 5], 3, SamplingParams::greedy());
    assert_eq!(collect(first).1, FinishReason::Cancelled);
    assert_eq!(
        collect(again),
        (collect(submit(&e, "other", &[4, 5], 3, SamplingParams::greedy())).0, FinishReason::Length, 0)
    );
}

#[test]
fn bad_requests_are_refused_naming_the_field() {
    let e = engine("qwen2-gqa", 16, 4, 64);
    let (tx, _rx) = unbounded_channel();
    let req = |prompt: Vec<u32>, n: usize, sampling: SamplingParams| NewRequest {
        request_id: "x".into(),
        prompt,
        params: GenerateParams { max_new_tokens: n, sampling, stop_token_ids: vec![] },
        events: tx.clone(),
        constraint: None,
    };
    let cases = [
        (req(vec![], 4, SamplingParams::greedy()), "prompt"),
        (req(vec![1], 0, SamplingParams::greedy()), "max_new_tokens"),
        (req(vec![1, 999], 4, SamplingParams::greedy()), "token id 999"),
        (req(vec![1; 60], 10, SamplingParams::greedy()), "KV cache (64 tokens)"),
        (req(vec![1], 4, SamplingParams { top_p: 0.0, ..SamplingParams::default() }), "top_p"),
    ];
    for (r, what) in cases {
        let err = e.submit(r).unwrap_err();
        assert!(err.to_string().contains(what), "{what}: {err}");
    }
}
