//! `qwen-soak`: the client side of `scripts/soak.sh`. Keeps `--streams` concurrent streaming
//! requests going through a router's public gRPC API for `--seconds`, each bounded on the client
//! side by `--hang-secs` (a request not ended by then, neither finished nor failed, counts as
//! lost), and prints one JSON object: requests started / completed / failed by status, latency
//! p50/p99 of completed ones, the longest any request waited, and how many were lost.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use clap::Parser;
use qwen_proto::serve::generation_client::GenerationClient;
use qwen_proto::serve::{generate_request, GenerateRequest, GenerationOptions, SamplingParams, TokenIds};
use rand::{Rng, SeedableRng};
use tokio_stream::StreamExt;

#[derive(Parser)]
struct Args {
    /// The router's gRPC address, e.g. http://127.0.0.1:50050.
    #[arg(long, env = "QWEN_SOAK_GRPC")]
    grpc: String,
    #[arg(long, env = "QWEN_SOAK_MODEL")]
    model: String,
    #[arg(long, env = "QWEN_SOAK_STREAMS", default_value_t = 32)]
    streams: usize,
    #[arg(long, env = "QWEN_SOAK_SECONDS", default_value_t = 60)]
    seconds: u64,
    #[arg(long, env = "QWEN_SOAK_MAX_TOKENS", default_value_t = 24)]
    max_tokens: u32,
    /// A request still open after this is lost (the router's timeouts must end it sooner).
    #[arg(long, env = "QWEN_SOAK_HANG_SECS", default_value_t = 60)]
    hang_secs: u64,
    /// Vocabulary of the model (prompt ids are drawn below it).
    #[arg(long, env = "QWEN_SOAK_VOCAB", default_value_t = 500)]
    vocab: u32,
}

#[derive(Default)]
struct Tally {
    started: u64,
    completed: u64,
    failed: BTreeMap<String, u64>,
    lost: u64,
    latencies_ms: Vec<f64>,
    longest_ms: f64,
}

enum Outcome {
    Completed,
    Failed(tonic::Code),
    Lost,
}

async fn one(
    client: &mut GenerationClient<tonic::transport::Channel>,
    req: GenerateRequest,
    hang: Duration,
) -> Outcome {
    let run = async {
        let mut stream = match client.generate_stream(req).await {
            Ok(r) => r.into_inner(),
            Err(s) => return Outcome::Failed(s.code()),
        };
        loop {
            match stream.next().await {
                Some(Ok(m)) if m.finish_reason != 0 => return Outcome::Completed,
                Some(Ok(_)) => {}
                Some(Err(s)) => return Outcome::Failed(s.code()),
                None => return Outcome::Failed(tonic::Code::Unknown),
            }
        }
    };
    tokio::time::timeout(hang, run).await.unwrap_or(Outcome::Lost)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let hang = Duration::from_secs(args.hang_secs);
    let mut tasks = Vec::new();
    for s in 0..args.streams {
        let (grpc, model, max_tokens, vocab) = (args.grpc.clone(), args.model.clone(), args.max_tokens, args.vocab);
        tasks.push(tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(s as u64);
            let mut tally = Tally::default();
            let mut client = None;
            while Instant::now() < until {
                let c = match &mut client {
                    Some(c) => c,
                    None => match GenerationClient::connect(grpc.clone()).await {
                        Ok(c) => client.insert(c),
                        Err(_) => {
                            *tally.failed.entry("connect".into()).or_default() += 1;
                            tokio::time::sleep(Duration::from_millis(200)).await;
                            continue;
                        }
                    },
                };
                let prompt: Vec<u32> = (0..rng.random_range(4..40)).map(|_| rng.random_range(1..vocab)).collect();
                let req = GenerateRequest {
                    model: model.clone(),
                    prompt: Some(generate_request::Prompt::TokenIds(TokenIds { ids: prompt })),
                    options: Some(GenerationOptions {
                        sampling: Some(SamplingParams {
                            temperature: Some(0.8),
                            seed: Some(rng.random()),
                            ..Default::default()
                        }),
                        max_tokens: Some(max_tokens),
                        ignore_eos: true,
                        ..Default::default()
                    }),
                };
                tally.started += 1;
                let began = Instant::now();
                let outcome = one(c, req, hang).await;
                let ms = began.elapsed().as_secs_f64() * 1e3;
                tally.longest_ms = tally.longest_ms.max(ms);
                match outcome {
                    Outcome::Completed => {
                        tally.completed += 1;
                        tally.latencies_ms.push(ms);
                    }
                    Outcome::Failed(code) => {
                        *tally.failed.entry(format!("{code:?}")).or_default() += 1;
                        // Back off a little so a group restart is not hammered by 32 loops.
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    Outcome::Lost => tally.lost += 1,
                }
            }
            tally
        }));
    }
    let mut all = Tally::default();
    for t in tasks {
        let t = t.await?;
        all.started += t.started;
        all.completed += t.completed;
        all.lost += t.lost;
        all.longest_ms = all.longest_ms.max(t.longest_ms);
        all.latencies_ms.extend(t.latencies_ms);
        for (k, v) in t.failed {
            *all.failed.entry(k).or_default() += v;
        }
    }
    all.latencies_ms.sort_by(f64::total_cmp);
    let q = |p: f64| -> f64 {
        let n = all.latencies_ms.len();
        if n == 0 {
            return 0.0;
        }
        all.latencies_ms[((n - 1) as f64 * p).round() as usize]
    };
    let summary = serde_json::json!({
        "streams": args.streams,
        "seconds": args.seconds,
        "started": all.started,
        "completed": all.completed,
        "failed": all.failed,
        "lost": all.lost,
        "p50_ms": q(0.5),
        "p99_ms": q(0.99),
        "longest_wait_ms": all.longest_ms,
    });
    println!("{summary}");
    Ok(())
}
