//! `router-scale`: a real `qwen-router` discovering worker groups through a real etcd, first 2
//! groups (two real `qwen-worker` processes on the tiny fixture), then `--groups` in all: the
//! extra records point half at those live workers (healthy groups sharing two addresses) and
//! half at a closed port (groups that never answer). For each: time for membership to settle,
//! unary request throughput and latency (1 new token, so routing dominates), router RSS, open
//! files and `/metrics` size. Markdown table on stdout.
//!
//!     cargo build --release -p qwen-worker -p qwen-router -p qwen-bench
//!     target/release/router-scale --groups 1000 --seconds 5 --concurrency 16

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Parser;
use qwen_cluster::discovery::WorkerRecord;
use qwen_cluster::keys::{self, GroupName};
use qwen_cluster::lease::Lease;
use qwen_cluster::testing::EtcdServer;
use qwen_proto::serve::generation_client::GenerationClient;
use qwen_proto::serve::{generate_request, GenerateRequest, GenerationOptions, ListModelsRequest, TokenIds};
use rand::{Rng, SeedableRng};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
struct Args {
    /// Groups registered in the large run (2 of them the real workers).
    #[arg(long, env = "QWEN_SCALE_GROUPS", default_value_t = 1000)]
    groups: usize,
    #[arg(long, env = "QWEN_SCALE_SECONDS", default_value_t = 5)]
    seconds: u64,
    #[arg(long, env = "QWEN_SCALE_CONCURRENCY", default_value_t = 16)]
    concurrency: usize,
}

const MODEL: &str = "qwen2-gqa";

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sibling(name: &str) -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?.with_file_name(name);
    if !exe.exists() {
        bail!("{} not built: cargo build --release -p qwen-worker -p qwen-router", exe.display());
    }
    Ok(exe)
}

/// Starts `cmd` and returns it with the addresses after each of `prefixes` on its stdout.
fn start(mut cmd: Command, prefixes: &[&str]) -> anyhow::Result<(Proc, Vec<String>)> {
    let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::null()).spawn()?;
    let mut lines = std::io::BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut out = Vec::new();
    for p in prefixes {
        let line = lines.next().transpose()?.unwrap_or_default();
        out.push(line.trim().strip_prefix(p).with_context(|| format!("expected {p:?}, got {line:?}"))?.to_string());
    }
    // Keep draining stdout so the child never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Ok((Proc(child), out))
}

struct Run {
    groups: usize,
    settle_s: f64,
    req_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    rss_mb: f64,
    open_files: usize,
    metrics_kb: f64,
}

async fn measure(args: &Args, etcd: &str, groups: usize, healthy: u32) -> anyhow::Result<Run> {
    let mut cmd = Command::new(sibling("qwen-router")?);
    cmd.args([
        "--etcd",
        etcd,
        "--grpc-listen",
        "127.0.0.1:0",
        "--http-listen",
        "127.0.0.1:0",
        "--policy",
        "cache-aware",
    ]);
    let started = Instant::now();
    let (router, addrs) = start(cmd, &["grpc listening on ", "http listening on "])?;
    let grpc = format!("http://{}", addrs[0]);
    let mut client = GenerationClient::connect(grpc.clone()).await?;
    loop {
        let models = client.list_models(ListModelsRequest {}).await?.into_inner().models;
        if models.iter().any(|m| m.id == MODEL && m.groups >= healthy) {
            break;
        }
        if started.elapsed() > Duration::from_secs(120) {
            bail!("the router did not see {healthy} healthy groups: {models:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let settle_s = started.elapsed().as_secs_f64();
    let until = Instant::now() + Duration::from_secs(args.seconds);
    let loops = (0..args.concurrency).map(|i| {
        let mut client = client.clone();
        tokio::spawn(async move {
            let mut rng = rand::rngs::StdRng::seed_from_u64(i as u64);
            let mut latencies = Vec::new();
            while Instant::now() < until {
                let ids: Vec<u32> = (0..8).map(|_| rng.random_range(1..500)).collect();
                let req = GenerateRequest {
                    model: MODEL.into(),
                    prompt: Some(generate_request::Prompt::TokenIds(TokenIds { ids })),
                    options: Some(GenerationOptions { max_tokens: Some(1), ..Default::default() }),
                };
                let t = Instant::now();
                if client.generate(req).await.is_ok() {
                    latencies.push(t.elapsed().as_secs_f64() * 1e3);
                }
            }
            latencies
        })
    });
    let mut latencies = Vec::new();
    for l in loops.collect::<Vec<_>>() {
        latencies.extend(l.await?);
    }
    latencies.sort_by(f64::total_cmp);
    let q = |p: f64| latencies.get(((latencies.len().max(1) - 1) as f64 * p) as usize).copied().unwrap_or(0.0);
    let pid = router.0.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let rss_kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0.0);
    let open_files = std::fs::read_dir(format!("/proc/{pid}/fd"))?.count();
    let metrics = reqwest_get(&format!("http://{}/metrics", addrs[1])).await?;
    Ok(Run {
        groups,
        settle_s,
        req_per_s: latencies.len() as f64 / args.seconds as f64,
        p50_ms: q(0.5),
        p99_ms: q(0.99),
        rss_mb: rss_kb / 1024.0,
        open_files,
        metrics_kb: metrics.len() as f64 / 1024.0,
    })
}

/// A plain HTTP/1.1 GET over a TCP socket (the benchmark needs no HTTP client crate).
async fn reqwest_get(url: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let rest = url.strip_prefix("http://").context("http URL")?;
    let (host, path) = rest.split_once('/').map(|(h, p)| (h, format!("/{p}"))).unwrap_or((rest, "/".into()));
    let mut s = tokio::net::TcpStream::connect(host).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n").as_bytes()).await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    Ok(body.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.groups < 2 {
        bail!("--groups must be at least 2");
    }
    let etcd = EtcdServer::start().map_err(anyhow::Error::msg)?;
    let model = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models").join(MODEL);
    let mut workers = Vec::new();
    let mut live = Vec::new();
    for i in 0..2 {
        let mut cmd = Command::new(sibling("qwen-worker")?);
        cmd.arg("serve").arg("--model").arg(&model);
        cmd.args(["--listen", "127.0.0.1:0", "--etcd", &etcd.endpoint, "--group", &format!("live-{i}")]);
        cmd.args(["--kv-cache-bytes", "8000000", "--max-seqs", "64"]);
        let (w, addr) = start(cmd, &["listening on "])?;
        workers.push(w);
        live.push(addr[0].clone());
    }
    let small = measure(&args, &etcd.endpoint, 2, 2).await?;

    let client = qwen_cluster::connect(&etcd.access()).await?;
    let lease = Lease::grant(&client, Duration::from_secs(60), CancellationToken::new()).await?;
    let dead = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.to_string(); // closed on drop
    let extra = args.groups - 2;
    let mut kv = client.clone();
    for i in 0..extra {
        let name = format!("scale-{i}");
        let addr = if i % 2 == 0 { live[i / 2 % 2].clone() } else { dead.clone() };
        let record = WorkerRecord { group: name.clone(), grpc_addr: addr, model: MODEL.into(), tp: 1 };
        let key = keys::worker(&GroupName::new(&name)?);
        let opts = etcd_client::PutOptions::new().with_lease(lease.id());
        kv.put(key, serde_json::to_vec(&record)?, Some(opts)).await?;
    }
    let healthy = 2 + extra.div_ceil(2) as u32;
    let large = measure(&args, &etcd.endpoint, args.groups, healthy).await?;

    println!("| groups registered | settle s | req/s | p50 ms | p99 ms | router RSS MB | open files | /metrics KB |");
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in [&small, &large] {
        println!(
            "| {} | {:.2} | {:.0} | {:.2} | {:.2} | {:.1} | {} | {:.0} |",
            r.groups, r.settle_s, r.req_per_s, r.p50_ms, r.p99_ms, r.rss_mb, r.open_files, r.metrics_kb
        );
    }
    drop(workers);
    Ok(())
}
