//! `qwen-worker serve` as a real process, driven over gRPC: concurrency against the goldens,
//! the prefix cache in Stats, preemption and chunked prefill, cancellation and disconnects,
//! health, and INVALID_ARGUMENT for bad requests.

use std::time::Duration;

use qwen_proto::worker::worker_client::WorkerClient;
use qwen_proto::worker::{
    CancelRequest, FinishReason, GenerateRequest, GenerateResponse, SamplingParams, StatsRequest, StatsResponse,
};
use qwen_tests::{golden, ids, WorkerProcess};
use tokio_stream::StreamExt;
use tonic::transport::Channel;
use tonic::Code;

async fn client(w: &WorkerProcess) -> WorkerClient<Channel> {
    WorkerClient::connect(w.addr.clone()).await.expect("connect")
}

/// Plain greedy: temperature 0 and no repetition penalty (the fixtures' generation_config.json,
/// like Qwen2.5's, sets 1.05, which applies to requests that leave it unset).
fn greedy(prompt: &[u32], n: usize) -> GenerateRequest {
    GenerateRequest {
        prompt_token_ids: prompt.to_vec(),
        max_new_tokens: n as u32,
        ignore_eos: true,
        sampling: Some(SamplingParams { temperature: Some(0.0), repetition_penalty: Some(1.0), ..Default::default() }),
        ..Default::default()
    }
}

/// Runs a request to the end: its tokens and its last message.
async fn run(mut c: WorkerClient<Channel>, req: GenerateRequest) -> (Vec<u32>, GenerateResponse) {
    let mut stream = c.generate(req).await.expect("generate").into_inner();
    let mut tokens = Vec::new();
    let mut last = None;
    while let Some(msg) = stream.next().await {
        let msg = msg.expect("stream message");
        tokens.extend(msg.token_id);
        last = Some(msg);
    }
    (tokens, last.expect("at least one message"))
}

async fn stats(w: &WorkerProcess) -> StatsResponse {
    client(w).await.stats(StatsRequest {}).await.unwrap().into_inner()
}

/// Waits until the worker has nothing running or waiting.
async fn idle_stats(w: &WorkerProcess) -> StatsResponse {
    for _ in 0..500 {
        let s = stats(w).await;
        if s.running == 0 && s.waiting == 0 {
            return s;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("worker never went idle: {:?}", stats(w).await);
}

fn cases(name: &str) -> Vec<(Vec<u32>, Vec<u32>)> {
    golden(name)["cases"].as_array().unwrap().iter().map(|c| (ids(&c["prompt_ids"]), ids(&c["greedy"]))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_staggered_streams_match_goldens_and_health_is_serving() {
    let w = WorkerProcess::start("qwen1-ntk-logn", &["--block-size", "4", "--kv-cache-bytes", "4000000"]);
    let channel = Channel::from_shared(w.addr.clone()).unwrap().connect().await.unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let status = health
        .check(tonic_health::pb::HealthCheckRequest { service: "qwen.worker.v1.Worker".into() })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(status, tonic_health::pb::health_check_response::ServingStatus::Serving as i32);

    let cases = cases("qwen1-ntk-logn");
    let mut tasks = Vec::new();
    for i in 0..16 {
        let (prompt, want) = cases[i % cases.len()].clone();
        let c = client(&w).await;
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(5 * (i as u64 % 5))).await;
            let (got, last) = run(c, greedy(&prompt, want.len())).await;
            assert_eq!(last.finish_reason, FinishReason::Length as i32);
            (i, got, want)
        }));
    }
    for t in tasks {
        let (i, got, want) = t.await.unwrap();
        assert_eq!(got, want, "request {i}");
    }
    let s = idle_stats(&w).await;
    assert_eq!(s.free_kv_blocks, s.total_kv_blocks);
    assert_eq!(s.model_name, "qwen1-ntk-logn");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tiny_kv_and_token_budgets_and_the_prefix_cache_change_nothing() {
    // qwen2-gqa: 2 layers x 2 kv heads x 16 dims x 4 B x 2 = 512 B per token; 16 blocks of 4.
    let w = WorkerProcess::start(
        "qwen2-gqa",
        &["--block-size", "4", "--kv-cache-bytes", "32768", "--max-batch-tokens", "5"],
    );
    let cases = cases("qwen2-gqa");
    let mut tasks = Vec::new();
    for i in 0..8 {
        let (prompt, want) = cases[i % cases.len()].clone();
        let c = client(&w).await;
        tasks.push(tokio::spawn(async move { (run(c, greedy(&prompt, want.len())).await.0, want) }));
    }
    for t in tasks {
        let (got, want) = t.await.unwrap();
        assert_eq!(got, want);
    }
    let s = idle_stats(&w).await;
    assert!(s.preemptions > 0, "{s:?}");
    assert_eq!(s.free_kv_blocks, 16);

    // The longest prompt again: served from the prefix cache where its blocks survived.
    let (prompt, want) = cases.iter().max_by_key(|c| c.0.len()).unwrap().clone();
    let (first, _) = run(client(&w).await, greedy(&prompt, 4)).await;
    let (again, last) = run(client(&w).await, greedy(&prompt, 4)).await;
    assert_eq!((&first[..], &again[..]), (&want[..4], &want[..4]));
    // All full blocks but the one holding the last prompt token (always recomputed for logits).
    assert_eq!(last.cached_prompt_tokens as usize, (prompt.len() - 1) / 4 * 4, "{last:?}");
    assert!(stats(&w).await.prefix_cache_hit_rate > 0.0);
}

/// 1,000 requests; a third cancelled through Cancel, a third dropped by their client mid-stream.
/// Afterwards every block is free.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_requests_with_cancels_and_disconnects_leave_every_block_free() {
    let w = WorkerProcess::start("qwen2-gqa", &["--block-size", "4", "--kv-cache-bytes", "131072", "--max-seqs", "32"]);
    let cancelled = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for i in 0..1000u32 {
        let mut c = client(&w).await;
        let cancelled = cancelled.clone();
        tasks.push(tokio::spawn(async move {
            let prompt: Vec<u32> = (0..(i % 17 + 1)).map(|t| (t * 31 + i) % 400).collect();
            let mut req = greedy(&prompt, 16);
            req.request_id = format!("r{i}");
            let mut stream = c.generate(req).await.unwrap().into_inner();
            match i % 3 {
                0 => {
                    let first = stream.next().await;
                    c.cancel(CancelRequest { request_id: format!("r{i}") }).await.unwrap();
                    let mut last = first.and_then(|m| m.ok());
                    while let Some(m) = stream.next().await {
                        last = Some(m.unwrap());
                    }
                    let reason = last.unwrap().finish_reason;
                    // It may have finished before the cancel arrived.
                    assert!(reason == FinishReason::Cancelled as i32 || reason == FinishReason::Length as i32);
                    if reason == FinishReason::Cancelled as i32 {
                        cancelled.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                1 => {
                    let _ = stream.next().await;
                    drop(stream);
                }
                _ => while stream.next().await.is_some() {},
            }
        }));
        if i % 50 == 0 {
            tokio::task::yield_now().await;
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let s = idle_stats(&w).await;
    assert_eq!(s.free_kv_blocks, s.total_kv_blocks, "{s:?}");
    let cancelled = cancelled.load(std::sync::atomic::Ordering::Relaxed);
    assert!(cancelled > 100, "only {cancelled} of 334 cancels took effect");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_invalid_argument_naming_the_field() {
    let w = WorkerProcess::start("qwen2-gqa", &["--block-size", "4", "--kv-cache-bytes", "1000000"]);
    let base = greedy(&[1, 2, 3], 4);
    let sampled = |s: SamplingParams| GenerateRequest { sampling: Some(s), ..base.clone() };
    let cases = [
        (GenerateRequest { prompt_token_ids: vec![], ..base.clone() }, "prompt"),
        (GenerateRequest { prompt_token_ids: vec![1; 300], ..base.clone() }, "context length 256"),
        (GenerateRequest { max_new_tokens: 0, ..base.clone() }, "max_new_tokens"),
        (GenerateRequest { max_new_tokens: 1000, ..base.clone() }, "max_new_tokens"),
        (GenerateRequest { prompt_token_ids: vec![1, 512], ..base.clone() }, "token id 512"),
        (sampled(SamplingParams { top_p: Some(0.0), ..Default::default() }), "top_p"),
        (sampled(SamplingParams { top_p: Some(1.01), ..Default::default() }), "top_p"),
        (sampled(SamplingParams { temperature: Some(-1.0), ..Default::default() }), "temperature"),
        (sampled(SamplingParams { top_k: Some(-3), ..Default::default() }), "top_k"),
        (GenerateRequest { top_logprobs: 50, logprobs: true, ..base.clone() }, "top_logprobs"),
    ];
    let mut c = client(&w).await;
    for (req, field) in cases {
        let err = c.generate(req).await.err().unwrap_or_else(|| panic!("{field}: accepted"));
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(err.message().contains(field), "{field}: {}", err.message());
    }
    let err = c.cancel(CancelRequest { request_id: String::new() }).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // Still serving after all that.
    assert_eq!(run(c, greedy(&[1, 2, 3], 2)).await.0.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_and_eos_stop() {
    let w = WorkerProcess::start("qwen2-gqa", &["--kv-cache-bytes", "1000000"]);
    let g = golden("qwen2-gqa");
    let tp = &g["text_prompt"];
    let (prompt, want) = (ids(&tp["prompt_ids"]), ids(&tp["greedy"]));
    // Without ignore_eos the fixture's greedy path stops at its eos id (425).
    let mut req = greedy(&prompt, want.len());
    req.ignore_eos = false;
    req.logprobs = true;
    req.top_logprobs = 3;
    let mut stream = client(&w).await.generate(req).await.unwrap().into_inner();
    let mut got = Vec::new();
    let mut last = None;
    while let Some(m) = stream.next().await {
        let m = m.unwrap();
        if let Some(t) = m.token_id {
            let lp = m.logprob.expect("logprob requested");
            assert!(lp <= 0.0);
            assert_eq!(m.top_logprobs.len(), 3);
            assert_eq!(m.top_logprobs[0].token_id, t, "greedy picks the most likely");
            assert!((m.top_logprobs[0].logprob - lp).abs() < 1e-6);
            got.push(t);
        }
        last = Some(m);
    }
    let stop_at = want.iter().position(|&t| t == 425).unwrap();
    assert_eq!(got, want[..=stop_at]);
    assert_eq!(last.unwrap().finish_reason, FinishReason::Stop as i32);
}

/// A body that is not a GenerateRequest (a StatsResponse whose field 1 is a varint where
/// request_id's string belongs) is INVALID_ARGUMENT, and the worker keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_request_is_invalid_argument() {
    let w = WorkerProcess::start("qwen2-gqa", &["--kv-cache-bytes", "1000000"]);
    let channel = Channel::from_shared(w.addr.clone()).unwrap().connect().await.unwrap();
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.unwrap();
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/qwen.worker.v1.Worker/Generate");
    let codec = tonic_prost::ProstCodec::<StatsResponse, GenerateResponse>::default();
    let garbage = StatsResponse { running: 7, model_name: "x".into(), ..Default::default() };
    let err = grpc.server_streaming(tonic::Request::new(garbage), path, codec).await.expect_err("rejected");
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().contains("malformed request"), "{}", err.message());
    assert_eq!(run(client(&w).await, greedy(&[1, 2], 2)).await.0.len(), 2);
}
