//! Mixture-of-experts groups as real rank processes meeting through etcd, behind a router: a
//! Qwen2-MoE group with tensor-parallel experts (`--tp 2`) and a Qwen3-MoE group with expert
//! parallelism over four ranks (`--tp 4 --expert-parallel`, 10 experts as 3, 3, 2, 2) serve the
//! transformers goldens to concurrent clients, and count tokens per expert in Stats and metrics.
//! Quantized groups (GPTQ Int4 at `--tp 2`, FP8 experts at `--tp 2 --expert-parallel`, the
//! original Qwen's GPTQ Int4) do the same with their checkpoints kept quantized.

use std::time::{Duration, Instant};

use qwen_cluster::testing::EtcdServer;
use qwen_proto::serve::generation_client::GenerationClient;
use qwen_proto::serve::{
    generate_request, GenerateRequest, GenerationOptions, ListModelsRequest, SamplingParams, TokenIds,
};
use qwen_proto::worker::worker_client::WorkerClient;
use qwen_proto::worker::StatsRequest;
use qwen_tests::{golden, ids, RouterProcess, WorkerProcess};

fn start_group(etcd: &EtcdServer, model: &str, extra: &[&str]) -> WorkerProcess {
    let mut args = vec![
        "--etcd",
        &etcd.endpoint,
        "--group",
        model,
        "--block-size",
        "4",
        "--kv-cache-bytes",
        "2000000",
        "--collective-timeout-ms",
        "20000",
        "--metrics-listen",
        "127.0.0.1:0",
    ];
    args.extend_from_slice(extra);
    WorkerProcess::start(model, &args)
}

fn request(model: &str, prompt: Vec<u32>, n: usize) -> GenerateRequest {
    GenerateRequest {
        model: model.into(),
        prompt: Some(generate_request::Prompt::TokenIds(TokenIds { ids: prompt })),
        options: Some(GenerationOptions {
            sampling: Some(SamplingParams {
                temperature: Some(0.0),
                repetition_penalty: Some(1.0),
                ..Default::default()
            }),
            max_tokens: Some(n as u32),
            ignore_eos: true,
            ..Default::default()
        }),
    }
}

async fn wait_models(router: &RouterProcess, want: usize, limit: Duration) {
    let start = Instant::now();
    loop {
        if let Ok(mut c) = GenerationClient::connect(router.grpc.clone()).await {
            if let Ok(r) = c.list_models(ListModelsRequest {}).await {
                if r.into_inner().models.iter().filter(|m| m.groups > 0).count() == want {
                    return;
                }
            }
        }
        assert!(start.elapsed() < limit, "the router did not find {want} groups within {limit:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Every golden case of every model at once, through the router.
async fn expect_goldens(router: &RouterProcess, models: &[&str]) {
    let mut calls = Vec::new();
    for model in models {
        for case in golden(model)["cases"].as_array().unwrap() {
            let (prompt, want) = (ids(&case["prompt_ids"]), ids(&case["greedy"]));
            let grpc = router.grpc.clone();
            let model = model.to_string();
            calls.push(tokio::spawn(async move {
                let mut c = GenerationClient::connect(grpc).await.unwrap();
                let got = c.generate(request(&model, prompt.clone(), want.len())).await.unwrap().into_inner();
                (model, prompt.len(), got.token_ids, want)
            }));
        }
    }
    for call in calls {
        let (model, len, got, want) = call.await.unwrap();
        assert_eq!(got, want, "{model}, prompt of {len}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quantized_groups_serve_goldens_through_etcd_and_the_router() {
    let etcd = EtcdServer::start().expect("etcd");
    let _groups = [
        start_group(&etcd, "qwen2-gptq-int4", &["--tp", "2"]),
        start_group(&etcd, "qwen3-moe-fp8", &["--tp", "2", "--expert-parallel"]),
        start_group(&etcd, "qwen1-gptq-int4", &[]),
    ];
    let router = RouterProcess::start(&["--etcd", &etcd.endpoint]);
    wait_models(&router, 3, Duration::from_secs(60)).await;
    expect_goldens(&router, &["qwen2-gptq-int4", "qwen3-moe-fp8", "qwen1-gptq-int4"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moe_groups_serve_goldens_through_etcd_and_the_router() {
    let etcd = EtcdServer::start().expect("etcd");
    let groups = [
        ("qwen2-moe", 6usize, start_group(&etcd, "qwen2-moe", &["--tp", "2"])),
        ("qwen3-moe", 10, start_group(&etcd, "qwen3-moe", &["--tp", "4", "--expert-parallel"])),
    ];
    let router = RouterProcess::start(&["--etcd", &etcd.endpoint]);
    wait_models(&router, 2, Duration::from_secs(60)).await;

    expect_goldens(&router, &["qwen2-moe", "qwen3-moe"]).await;

    // Tokens per expert: in Stats (one entry per expert) and in the metrics.
    for (model, experts, worker) in &groups {
        let stats = WorkerClient::connect(worker.addr.clone())
            .await
            .unwrap()
            .stats(StatsRequest {})
            .await
            .unwrap()
            .into_inner();
        assert_eq!(stats.expert_tokens.len(), *experts, "{model}");
        assert!(stats.expert_tokens.iter().sum::<u64>() > 0, "{model}: {:?}", stats.expert_tokens);
        let metrics = worker.metrics.as_ref().expect("--metrics-listen");
        let text = reqwest::get(format!("http://{metrics}/metrics")).await.unwrap().text().await.unwrap();
        let series = format!("qwen_serve_worker_moe_expert_tokens_total{{model=\"{model}\",expert=\"0\"}}");
        assert!(text.contains(&series), "{model}: {text}");
    }
}
