//! `router-overhead`: what the router adds. An in-process worker double that answers at once
//! (its only use: to measure the router, not the model) serves `qwen.worker.v1.Worker`; a real
//! `qwen-router` process routes to it. The same unary requests go straight to the double and
//! through the router at several concurrencies; the table gives requests/s and p50/p99 latency of
//! both, and the latency the router adds.
//!
//!     cargo build --release -p qwen-router -p qwen-bench
//!     target/release/router-overhead --concurrency 1,16,64 --seconds 5

use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use qwen_proto::serve::generation_client::GenerationClient;
use qwen_proto::serve::{
    generate_request, GenerateRequest as PublicRequest, GenerationOptions, SamplingParams, TokenIds,
};
use qwen_proto::worker::worker_client::WorkerClient;
use qwen_proto::worker::worker_server::{Worker, WorkerServer};
use qwen_proto::worker::{
    CancelRequest, CancelResponse, FinishReason, GenerateRequest, GenerateResponse, InfoRequest, InfoResponse,
    StatsRequest, StatsResponse, TokenizerKind,
};
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

#[derive(Parser)]
struct Args {
    /// Concurrent clients per run (comma-separated).
    #[arg(long, env = "ROUTER_BENCH_CONCURRENCY", value_delimiter = ',', default_value = "1,16,64")]
    concurrency: Vec<usize>,
    /// Seconds per run and path.
    #[arg(long, env = "ROUTER_BENCH_SECONDS", default_value_t = 5)]
    seconds: u64,
    /// Tokens the double returns per request.
    #[arg(long, env = "ROUTER_BENCH_TOKENS", default_value_t = 4)]
    tokens: u32,
    /// A tokenizer.json for the double's Info (the router detokenizes with it).
    #[arg(long, env = "ROUTER_BENCH_TOKENIZER", default_value = "fixtures/models/qwen2-gqa/tokenizer.json")]
    tokenizer: std::path::PathBuf,
}

/// Answers every Generate with `tokens` tokens at once.
struct Instant_ {
    tokens: u32,
    info: InfoResponse,
}

type Tokens = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for Instant_ {
    type GenerateStream = Tokens;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<Tokens>, Status> {
        let r = request.into_inner();
        let n = r.max_new_tokens.min(self.tokens);
        let prompt_tokens = r.prompt_token_ids.len() as u32;
        let msgs: Vec<Result<GenerateResponse, Status>> = (0..=n)
            .map(|i| {
                Ok(if i < n {
                    GenerateResponse { token_id: Some(100 + i), prompt_tokens, ..Default::default() }
                } else {
                    GenerateResponse { finish_reason: FinishReason::Length as i32, prompt_tokens, ..Default::default() }
                })
            })
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(msgs))))
    }

    async fn cancel(&self, _: Request<CancelRequest>) -> Result<Response<CancelResponse>, Status> {
        Ok(Response::new(CancelResponse {}))
    }

    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        Ok(Response::new(StatsResponse { model_name: self.info.model_name.clone(), ..Default::default() }))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(self.info.clone()))
    }
}

struct Router(Child);

impl Drop for Router {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_router(worker: &str) -> anyhow::Result<(Router, String)> {
    use std::io::BufRead;
    let exe = std::env::current_exe()?.with_file_name("qwen-router");
    if !exe.exists() {
        bail!("{} not built: cargo build --release -p qwen-router", exe.display());
    }
    let mut child = Command::new(exe)
        .args(["--worker", worker, "--grpc-listen", "127.0.0.1:0", "--http-listen", "127.0.0.1:0"])
        .args(["--max-in-flight", "100000", "--policy", "round-robin"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let addr = line.trim().strip_prefix("grpc listening on ").context("router did not start")?.to_string();
    Ok((Router(child), format!("http://{addr}")))
}

#[derive(Clone, Copy)]
enum Path {
    Direct,
    Router,
}

/// `clients` tasks issuing requests back to back for `secs`; every latency.
async fn run(path: Path, addr: &str, clients: usize, secs: u64, tokens: u32) -> anyhow::Result<Vec<Duration>> {
    let until = Instant::now() + Duration::from_secs(secs);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let addr = addr.to_string();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let channel = tonic::transport::Endpoint::from_shared(addr)?.connect().await?;
            let mut worker = WorkerClient::new(channel.clone());
            let mut router = GenerationClient::new(channel);
            let prompt = vec![1, 2, 3, (c % 50) as u32];
            while Instant::now() < until {
                let start = Instant::now();
                match path {
                    Path::Direct => {
                        let req = GenerateRequest {
                            prompt_token_ids: prompt.clone(),
                            max_new_tokens: tokens,
                            ..Default::default()
                        };
                        let mut s = worker.generate(req).await?.into_inner();
                        while s.next().await.transpose()?.is_some() {}
                    }
                    Path::Router => {
                        router.generate(request(tokens, prompt.clone())).await?;
                    }
                }
                lat.push(start.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await??);
    }
    all.sort();
    Ok(all)
}

fn request(tokens: u32, ids: Vec<u32>) -> PublicRequest {
    PublicRequest {
        model: "instant".into(),
        prompt: Some(generate_request::Prompt::TokenIds(TokenIds { ids })),
        options: Some(GenerationOptions {
            max_tokens: Some(tokens),
            sampling: Some(SamplingParams { temperature: Some(0.0), ..Default::default() }),
            ..Default::default()
        }),
    }
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    sorted.get(((sorted.len().max(1) - 1) as f64 * p).round() as usize).map_or(f64::NAN, |d| d.as_secs_f64() * 1e3)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let tokenizer =
        std::fs::read(&args.tokenizer).with_context(|| format!("--tokenizer {}", args.tokenizer.display()))?;
    let info = InfoResponse {
        model_name: "instant".into(),
        architecture: "Qwen2ForCausalLM".into(),
        max_context: 4096,
        vocab_size: 512,
        eos_token_ids: vec![],
        tokenizer_kind: TokenizerKind::HfJson as i32,
        tokenizer,
        chat_template: String::new(),
        tp: 1,
        // Empty: the router then checks no digest for this double.
        digest: String::new(),
    };
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let worker_addr = listener.local_addr()?.to_string();
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<WorkerServer<Instant_>>().await;
        let service = WorkerServer::new(Instant_ { tokens: args.tokens, info });
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))),
        );
        let (_router, router_addr) = start_router(&worker_addr)?;
        // Wait until the router has learnt the model.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ok = match GenerationClient::connect(router_addr.clone()).await {
                Ok(mut c) => c.generate(request(1, vec![1])).await.is_ok(),
                Err(_) => false,
            };
            if ok {
                break;
            }
            if Instant::now() > deadline {
                bail!("router never routed to the double");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        println!("unary Generate, {} tokens per response, {} s per run; worker double answers at once", args.tokens, args.seconds);
        println!("| clients | direct req/s | router req/s | direct p50 ms | router p50 ms | direct p99 ms | router p99 ms | added p50 ms | added p99 ms |");
        println!("|---|---|---|---|---|---|---|---|---|");
        for &c in &args.concurrency {
            // Connections, the router's per-model tables and the allocator warm up first.
            run(Path::Direct, &format!("http://{worker_addr}"), c, 1, args.tokens).await?;
            run(Path::Router, &router_addr, c, 1, args.tokens).await?;
            let direct = run(Path::Direct, &format!("http://{worker_addr}"), c, args.seconds, args.tokens).await?;
            let routed = run(Path::Router, &router_addr, c, args.seconds, args.tokens).await?;
            let rate = |v: &[Duration]| v.len() as f64 / args.seconds as f64;
            println!(
                "| {c} | {:.0} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} | {:.3} |",
                rate(&direct),
                rate(&routed),
                pct(&direct, 0.5),
                pct(&routed, 0.5),
                pct(&direct, 0.99),
                pct(&routed, 0.99),
                pct(&routed, 0.5) - pct(&direct, 0.5),
                pct(&routed, 0.99) - pct(&direct, 0.99),
            );
        }
        anyhow::Ok(())
    })
}
