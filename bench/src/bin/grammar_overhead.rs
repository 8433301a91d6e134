//! What structured outputs cost: engine decode steps at one batch size with no request
//! constrained and with half of them under a JSON schema, on a random checkpoint in real Qwen
//! shapes with the real original-Qwen vocabulary (`qwen.tiktoken`, 151,851 tokens, as large as
//! any Qwen's); then the grammar engine's own costs measured alone (compile, one mask, masking
//! the rows), so the figures carry over to a GPU whose steps are far shorter than this CPU's.
//!
//! `cargo run --release -p qwen-bench --bin grammar-overhead -- --batch 32 --steps 12`

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use clap::Parser;
use qwen_bench::{ensure_checkpoint, Quant, Shape};
use qwen_proto::worker::{constraint::Kind, Constraint};
use qwen_worker::constraint::{mask_rows, GrammarCompiler};
use qwen_worker::engine::runner::{spawn, EngineConfig, EngineHandle, NewRequest, StepObserver};
use qwen_worker::engine::scheduler::SchedulerConfig;
use qwen_worker::engine::sequence::Event;
use qwen_worker::generate::GenerateParams;
use qwen_worker::model::Model;
use qwen_worker::sampling::SamplingParams;
use qwen_worker::tokenizer::Tokenizer;
use rand::{Rng, SeedableRng};

#[derive(Parser)]
struct Args {
    #[arg(long, env = "QWEN_BENCH_SHAPE", value_enum, default_value = "qwen2.5-0.5b")]
    shape: Shape,
    /// Directory holding `qwen.tiktoken` (scripts/fetch_qwen_tiktoken.sh puts it in .cache).
    #[arg(long, env = "QWEN_TIKTOKEN_DIR", default_value = ".cache")]
    tiktoken_dir: PathBuf,
    #[arg(long, env = "QWEN_BENCH_BATCH", default_value_t = 32)]
    batch: usize,
    #[arg(long, env = "QWEN_BENCH_DECODE_STEPS", default_value_t = 12)]
    steps: usize,
    #[arg(long, env = "QWEN_BENCH_PROMPT_LEN", default_value_t = 16)]
    prompt_len: usize,
}

/// A schema whose output is long (a constrained request stays in the batch for every step) and
/// spends its steps inside a JSON string, the commonest state of real structured outputs.
const SCHEMA: &str = r#"{"type": "object", "properties": {"summary": {"type": "string", "minLength": 400},
  "score": {"type": "integer"}}, "required": ["summary", "score"], "additionalProperties": false}"#;

#[derive(Default)]
struct Steps(Mutex<Vec<(usize, f64)>>);

impl StepObserver for Steps {
    fn step(&self, seqs: usize, secs: f64) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).push((seqs, secs));
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn schema() -> Constraint {
    Constraint { kind: Some(Kind::JsonSchema(SCHEMA.into())) }
}

/// Median decode-step time (ms) of `batch` requests of which the first `constrained` follow the
/// schema; steps that ran fewer than all of them (prefill, the tail) are left out.
fn decode_ms(
    engine: &EngineHandle,
    steps: &Steps,
    grammars: &GrammarCompiler,
    args: &Args,
    constrained: usize,
) -> anyhow::Result<f64> {
    steps.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
    let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
    let mut streams = Vec::new();
    for i in 0..args.batch {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let prompt: Vec<u32> = (0..args.prompt_len).map(|_| rng.random_range(0..150_000)).collect();
        let params = GenerateParams {
            max_new_tokens: args.steps + 1,
            sampling: SamplingParams::greedy(),
            stop_token_ids: vec![],
        };
        let constraint = if i < constrained { Some(Box::new(grammars.compile(&schema())?)) } else { None };
        engine.submit(NewRequest { request_id: format!("r{i}"), prompt, params, events: tx, constraint })?;
        streams.push(rx);
    }
    for mut rx in streams {
        while let Some(e) = rx.blocking_recv() {
            if let Event::Finished { message: Some(m), .. } = &e {
                anyhow::bail!("a request failed: {m}");
            }
            if matches!(e, Event::Finished { .. }) {
                break;
            }
        }
    }
    let taken = std::mem::take(&mut *steps.0.lock().unwrap_or_else(|p| p.into_inner()));
    // The first full step is the prefill; the rest are decodes.
    let decode: Vec<f64> = taken.iter().filter(|(n, _)| *n == args.batch).skip(1).map(|(_, s)| s * 1e3).collect();
    Ok(median(decode))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let dir = args.shape.dir_for(Quant::None);
    ensure_checkpoint(args.shape, Quant::None, &dir)?;
    let tokenizer = Tokenizer::from_dir(&args.tiktoken_dir)?;
    let model = Model::load(&dir, DType::F32, &Device::Cpu)?;
    let vocab = model.config().vocab_size;
    let eos = tokenizer.token_to_id("<|endoftext|>").unwrap_or(0);
    let t = Instant::now();
    let grammars = Arc::new(GrammarCompiler::new(&tokenizer, vocab, &[eos])?);
    let setup_ms = t.elapsed().as_secs_f64() * 1e3;
    let steps = Arc::new(Steps::default());
    let config = EngineConfig {
        scheduler: SchedulerConfig {
            block_size: 16,
            max_batch_tokens: args.batch * args.prompt_len,
            max_seqs: args.batch,
        },
        num_blocks: args.batch * (args.prompt_len + args.steps + 32) / 16 + 8,
        model_name: "bench".into(),
        observer: Some(steps.clone()),
        decode_graphs: false,
    };
    let (engine, _thread) = spawn(model, config)?;
    let free = decode_ms(&engine, &steps, &grammars, &args, 0)?;
    let half = decode_ms(&engine, &steps, &grammars, &args, args.batch / 2)?;

    // The grammar engine alone: compile, one mask per step per row (on the mask thread, in
    // parallel with the forward), and masking the sampled rows (on the engine thread).
    let t = Instant::now();
    let n = 20;
    for _ in 0..n {
        grammars.compile(&schema())?;
    }
    let compile_ms = t.elapsed().as_secs_f64() * 1e3 / n as f64;
    let mut c = grammars.compile(&schema())?;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(2);
    let (mut mask_s, mut masks) = (0.0, 0);
    for _ in 0..200 {
        let t = Instant::now();
        let allowed = c.allowed()?;
        mask_s += t.elapsed().as_secs_f64();
        masks += 1;
        let list = allowed.to_list();
        if c.consume(list[rng.random_range(0..list.len())])? {
            c = grammars.compile(&schema())?;
        }
    }
    let mask_us = mask_s * 1e6 / masks as f64;
    let rows = args.batch / 2;
    let allowed = grammars.compile(&schema())?.allowed()?;
    let logits = Tensor::randn(0f32, 1.0, (rows, vocab), &Device::Cpu)?;
    let mut scratch = Vec::new();
    let t = Instant::now();
    for _ in 0..n {
        mask_rows(&logits, &vec![&allowed; rows], &mut scratch)?;
    }
    let apply_ms = t.elapsed().as_secs_f64() * 1e3 / n as f64;

    println!(
        "shape {:?}, vocab {vocab}, batch {}, {} decode steps, grammar setup {setup_ms:.0} ms",
        args.shape, args.batch, args.steps
    );
    println!(
        "| batch | constrained | decode ms/step | overhead | compile ms | mask µs/row | mask-apply ms ({rows} rows) |"
    );
    println!("|---|---|---|---|---|---|---|");
    println!("| {} | 0 | {free:.1} | | | | |", args.batch);
    println!(
        "| {} | {rows} | {half:.1} | {:+.1} % | {compile_ms:.2} | {mask_us:.0} | {apply_ms:.2} |",
        args.batch,
        (half / free - 1.0) * 100.0
    );
    Ok(())
}
