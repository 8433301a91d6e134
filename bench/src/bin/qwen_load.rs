//! `qwen-load`: N concurrent gRPC streams against a real `qwen-worker serve` on a random-weight
//! checkpoint in real Qwen shapes; output tokens/s, time to first token and inter-token latency.
//! With `--hf-python`, the same prompts go through Hugging Face transformers' `generate` on the
//! same weights (bench/hf_generate.py) and the ratio is printed.
//!
//!     cargo build --release -p qwen-worker -p qwen-bench
//!     target/release/qwen-load --shape qwen2.5-0.5b --concurrency 1,8,32,64 --hf-python python3

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use qwen_bench::{ensure_checkpoint, Quant, Shape};
use qwen_proto::worker::worker_client::WorkerClient;
use qwen_proto::worker::{GenerateRequest, SamplingParams};
use rand::{Rng, SeedableRng};
use tokio_stream::StreamExt;

#[derive(Parser)]
struct Args {
    #[arg(long, env = "QWEN_LOAD_SHAPE", value_enum, default_value = "qwen2.5-0.5b")]
    shape: Shape,
    #[arg(long, env = "QWEN_LOAD_DIR")]
    dir: Option<PathBuf>,
    /// Concurrent streams per run (comma-separated).
    #[arg(long, env = "QWEN_LOAD_CONCURRENCY", value_delimiter = ',', default_value = "1,8,32,64")]
    concurrency: Vec<usize>,
    #[arg(long, env = "QWEN_LOAD_PROMPT_LEN", default_value_t = 32)]
    prompt_len: usize,
    #[arg(long, env = "QWEN_LOAD_MAX_NEW_TOKENS", default_value_t = 32)]
    max_new_tokens: usize,
    /// Worker flags (KV cache, batch limits).
    #[arg(long, env = "QWEN_LOAD_KV_BYTES", default_value_t = 1 << 29)]
    kv_cache_bytes: u64,
    #[arg(long, env = "QWEN_LOAD_MAX_BATCH_TOKENS", default_value_t = 2048)]
    max_batch_tokens: usize,
    /// A Python with torch + transformers: also run HF generate on the same prompts.
    #[arg(long, env = "QWEN_LOAD_HF_PYTHON")]
    hf_python: Option<String>,
}

struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_worker(args: &Args, dir: &std::path::Path) -> anyhow::Result<(Worker, String)> {
    use std::io::BufRead;
    let exe = std::env::current_exe()?.with_file_name("qwen-worker");
    if !exe.exists() {
        bail!("{} not built: cargo build --release -p qwen-worker", exe.display());
    }
    let max_seqs = args.concurrency.iter().max().copied().unwrap_or(1).to_string();
    let mut child = Command::new(exe)
        .args(["serve", "--model", &dir.to_string_lossy(), "--listen", "127.0.0.1:0"])
        .args(["--kv-cache-bytes", &args.kv_cache_bytes.to_string()])
        .args(["--max-batch-tokens", &args.max_batch_tokens.to_string(), "--max-seqs", &max_seqs])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().context("stdout")?).read_line(&mut line)?;
    let addr = line.trim().strip_prefix("listening on ").context("worker did not start")?.to_string();
    Ok((Worker(child), format!("http://{addr}")))
}

/// Per request: time to first token and the gaps between later tokens.
struct Timing {
    ttft: Duration,
    gaps: Vec<Duration>,
    tokens: usize,
}

async fn one(addr: String, prompt: Vec<u32>, n: usize) -> anyhow::Result<Timing> {
    let mut c = WorkerClient::connect(addr).await?;
    let req = GenerateRequest {
        prompt_token_ids: prompt,
        max_new_tokens: n as u32,
        ignore_eos: true,
        sampling: Some(SamplingParams { temperature: Some(0.0), repetition_penalty: Some(1.0), ..Default::default() }),
        ..Default::default()
    };
    let start = Instant::now();
    let mut stream = c.generate(req).await?.into_inner();
    let mut last = start;
    let mut timing = Timing { ttft: Duration::ZERO, gaps: Vec::new(), tokens: 0 };
    while let Some(msg) = stream.next().await {
        if msg?.token_id.is_some() {
            let now = Instant::now();
            if timing.tokens == 0 {
                timing.ttft = now - start;
            } else {
                timing.gaps.push(now - last);
            }
            last = now;
            timing.tokens += 1;
        }
    }
    Ok(timing)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn hf_tokens_per_s(python: &str, dir: &std::path::Path, prompts: &[Vec<u32>], n: usize) -> anyhow::Result<f64> {
    let file = std::env::temp_dir().join(format!("qwen-load-prompts-{}.json", std::process::id()));
    std::fs::write(&file, serde_json::to_string(prompts)?)?;
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("hf_generate.py");
    let out = Command::new(python)
        .arg(script)
        .arg(dir)
        .arg(&file)
        .arg(n.to_string())
        .stderr(Stdio::inherit())
        .output()
        .context("running bench/hf_generate.py")?;
    let _ = std::fs::remove_file(&file);
    let text = String::from_utf8(out.stdout)?;
    let json: serde_json::Value =
        serde_json::from_str(text.trim().lines().last().unwrap_or("")).context("hf output")?;
    json["tokens_per_s"].as_f64().context("tokens_per_s")
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = args.dir.clone().unwrap_or_else(|| args.shape.default_dir());
    ensure_checkpoint(args.shape, Quant::None, &dir)?;
    let (_worker, addr) = start_worker(&args, &dir)?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(7);
    println!(
        "{:?}, prompt {} tokens, {} new tokens per stream, greedy, f32 on CPU",
        args.shape, args.prompt_len, args.max_new_tokens
    );
    println!(
        "| streams | output tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms | HF generate tok/s | ratio |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &n in &args.concurrency {
        let prompts: Vec<Vec<u32>> =
            (0..n).map(|_| (0..args.prompt_len).map(|_| rng.random_range(0..150_000)).collect()).collect();
        let start = Instant::now();
        let timings = rt.block_on(async {
            let tasks: Vec<_> =
                prompts.iter().map(|p| tokio::spawn(one(addr.clone(), p.clone(), args.max_new_tokens))).collect();
            let mut out = Vec::new();
            for t in tasks {
                out.push(t.await??);
            }
            anyhow::Ok(out)
        })?;
        let wall = start.elapsed().as_secs_f64();
        let tokens: usize = timings.iter().map(|t| t.tokens).sum();
        let mut ttft: Vec<Duration> = timings.iter().map(|t| t.ttft).collect();
        let mut itl: Vec<Duration> = timings.iter().flat_map(|t| t.gaps.iter().copied()).collect();
        ttft.sort();
        itl.sort();
        let ours = tokens as f64 / wall;
        let (hf, ratio) = match &args.hf_python {
            Some(py) => {
                let hf = hf_tokens_per_s(py, &dir, &prompts, args.max_new_tokens)?;
                (format!("{hf:.1}"), format!("{:.2}", ours / hf))
            }
            None => ("-".into(), "-".into()),
        };
        println!(
            "| {n} | {ours:.1} | {:.0} | {:.0} | {:.0} | {:.0} | {hf} | {ratio} |",
            percentile(&ttft, 0.5),
            percentile(&ttft, 0.99),
            percentile(&itl, 0.5),
            percentile(&itl, 0.99)
        );
    }
    Ok(())
}
