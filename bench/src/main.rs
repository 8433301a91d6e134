//! `qwen-bench`: prefill and decode speed of the worker's model code on real Qwen checkpoint
//! shapes. Weights are random (speed depends on shapes, not values), written once as a Hugging
//! Face checkpoint directory and loaded through the same path as a real model.
//!
//!     cargo run --release -p qwen-bench -- --shape qwen2.5-0.5b --prompt-len 128 --decode-steps 32 --batch 1,8

use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device};
use clap::Parser;
use qwen_bench::{ensure_checkpoint, Shape};
use rand::{Rng, SeedableRng};

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
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = args.dir.clone().unwrap_or_else(|| args.shape.default_dir());
    ensure_checkpoint(args.shape, &dir)?;
    let t0 = Instant::now();
    let mut model = Model::load(&dir, DType::F32, &Device::Cpu)?;
    let load_s = t0.elapsed().as_secs_f64();
    let cfg = model.config().clone();
    println!(
        "shape {:?}: {} layers, hidden {}, load {load_s:.2} s (bf16 file → f32)",
        args.shape, cfg.num_layers, cfg.hidden_size
    );
    println!("| shape | batch | prompt | prefill tok/s | decode ms/step | decode tok/s |");
    println!("|---|---|---|---|---|---|");
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
        let t = Instant::now();
        for _ in 0..args.decode_steps {
            for s in seqs.iter_mut() {
                s.context_len += s.len;
                s.len = 1;
            }
            next = model.forward(&next, &seqs, &mut cache)?.argmax(1)?.to_vec1()?;
        }
        let decode_s = t.elapsed().as_secs_f64();
        println!(
            "| {:?} | {batch} | {} | {:.0} | {:.1} | {:.1} |",
            args.shape,
            args.prompt_len,
            (batch * args.prompt_len) as f64 / prefill_s,
            decode_s * 1e3 / args.decode_steps as f64,
            (batch * args.decode_steps) as f64 / decode_s,
        );
    }
    Ok(())
}
