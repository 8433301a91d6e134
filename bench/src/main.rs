//! `qwen-bench`: prefill and decode speed of the worker's model code on real Qwen checkpoint
//! shapes. Weights are random (speed depends on shapes, not values), written once as a Hugging
//! Face checkpoint directory and loaded through the same path as a real model.
//!
//!     cargo run --release -p qwen-bench -- --shape qwen2.5-0.5b --prompt-len 128 --decode-steps 32 --batch 1,8
//!     cargo run --release -p qwen-bench -- --shape qwen2.5-0.5b --quant gptq-int4 --dtype bf16

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use clap::Parser;
use qwen_bench::{ensure_checkpoint, Quant, Shape};
use rand::{Rng, SeedableRng};

use qwen_worker::comm::{Comm, TcpComm, TcpConfig};
use qwen_worker::model::{ContiguousKvCache, Model, SeqChunk};

#[derive(Parser)]
struct Args {
    #[arg(long, env = "QWEN_BENCH_SHAPE", value_enum, default_value = "qwen2.5-0.5b")]
    shape: Shape,
    /// Where the random checkpoint is written (reused when present).
    #[arg(long, env = "QWEN_BENCH_DIR")]
    dir: Option<PathBuf>,
    #[arg(long, env = "QWEN_BENCH_PROMPT_LEN", default_value_t = 128)]
    prompt_len: usize,
    #[arg(long, env = "QWEN_BENCH_DECODE_STEPS", default_value_t = 32)]
    decode_steps: usize,
    /// Batch sizes to measure decode at (comma-separated).
    #[arg(long, env = "QWEN_BENCH_BATCH", value_delimiter = ',', default_value = "1,8")]
    batch: Vec<usize>,
    /// How the checkpoint stores its projections.
    #[arg(long, env = "QWEN_BENCH_QUANT", value_enum, default_value = "none")]
    quant: Quant,
    /// Compute dtype (weights not quantized, activations, KV cache).
    #[arg(long, env = "QWEN_BENCH_DTYPE", value_enum, default_value = "f32")]
    dtype: ComputeDtype,
    /// Tensor-parallel ranks (threads of this process, TCP collectives on loopback).
    #[arg(long, env = "QWEN_BENCH_TP", default_value_t = 1)]
    tp: usize,
}

#[derive(Clone, Copy, clap::ValueEnum, Debug)]
enum ComputeDtype {
    F32,
    Bf16,
}

/// This process's resident and peak resident memory (`VmRSS`, `VmHWM`), in MiB.
fn resident_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |key: &str| {
        status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
    };
    (field("VmRSS:").unwrap_or(0.0) / 1024.0, field("VmHWM:").unwrap_or(0.0) / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = args.dir.clone().unwrap_or_else(|| args.shape.dir_for(args.quant));
    ensure_checkpoint(args.shape, args.quant, &dir)?;
    if args.tp <= 1 {
        return bench_rank(&args, &dir, Comm::Single);
    }
    // Every rank runs the same forwards; rank 0 reports.
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let timeout = std::time::Duration::from_secs(600);
    let args = std::sync::Arc::new(args);
    let peers: Vec<_> = (1..args.tp)
        .map(|rank| {
            let (args, dir) = (args.clone(), dir.clone());
            std::thread::spawn(move || -> anyhow::Result<()> {
                let comm = TcpComm::join(addr, &TcpConfig::plain(rank, args.tp, timeout))?;
                bench_rank(&args, &dir, Comm::Tcp(comm))
            })
        })
        .collect();
    let root = TcpComm::root(listener, &TcpConfig::plain(0, args.tp, timeout))?;
    bench_rank(&args, &dir, Comm::Tcp(root))?;
    for p in peers {
        p.join().map_err(|_| anyhow::anyhow!("a rank panicked"))??;
    }
    Ok(())
}

fn bench_rank(args: &Args, dir: &std::path::Path, comm: Comm) -> anyhow::Result<()> {
    let report = comm.rank() == 0;
    let t0 = Instant::now();
    let dtype = match args.dtype {
        ComputeDtype::F32 => DType::F32,
        ComputeDtype::Bf16 => DType::BF16,
    };
    let mut model = Model::load_sharded(dir, dtype, &Device::Cpu, comm)?;
    let load_s = t0.elapsed().as_secs_f64();
    let cfg = model.config().clone();
    if report {
        let (rss, _) = resident_mib();
        println!(
            "shape {:?} ({:?}, {:?}): {} layers, hidden {}, tp {}, load {load_s:.2} s, resident after load {rss:.0} MiB",
            args.shape, args.quant, args.dtype, cfg.num_layers, cfg.hidden_size, args.tp
        );
        println!("| shape | tp | batch | prompt | prefill tok/s | decode ms/step | decode tok/s | collectives |");
        println!("|---|---|---|---|---|---|---|---|");
    }
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    for &batch in &args.batch {
        let mut cache = ContiguousKvCache::new(cfg.num_layers);
        let mut seqs: Vec<SeqChunk> = (0..batch)
            .map(|i| SeqChunk {
                seq_id: i as u64,
                context_len: 0,
                len: args.prompt_len,
                rope_alpha: cfg.ntk_alpha(args.prompt_len),
            })
            .collect();
        let prompt: Vec<u32> = (0..batch * args.prompt_len).map(|_| rng.random_range(0..150_000)).collect();
        let t = Instant::now();
        let logits = model.forward(&prompt, &seqs, &mut cache)?;
        let mut next: Vec<u32> = logits.argmax(1)?.to_vec1()?;
        let prefill_s = t.elapsed().as_secs_f64();
        let comm_before = model.comm().collective_time();
        let t = Instant::now();
        for _ in 0..args.decode_steps {
            for s in seqs.iter_mut() {
                s.context_len += s.len;
                s.len = 1;
            }
            next = model.forward(&next, &seqs, &mut cache)?.argmax(1)?.to_vec1()?;
        }
        let decode_s = t.elapsed().as_secs_f64();
        let comm_s = (model.comm().collective_time() - comm_before).as_secs_f64();
        if report {
            println!(
                "| {:?} | {} | {batch} | {} | {:.0} | {:.1} | {:.1} | {:.0} % |",
                args.shape,
                args.tp,
                args.prompt_len,
                (batch * args.prompt_len) as f64 / prefill_s,
                decode_s * 1e3 / args.decode_steps as f64,
                (batch * args.decode_steps) as f64 / decode_s,
                100.0 * comm_s / decode_s,
            );
        }
    }
    if report {
        let (rss, peak) = resident_mib();
        println!("resident at the end {rss:.0} MiB, peak {peak:.0} MiB");
    }
    Ok(())
}
