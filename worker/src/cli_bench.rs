//! `qwen-worker bench-gpu`: decode speed of the real engine (scheduler, paged cache, kernels,
//! sampling) on random weights in a named checkpoint's shapes, against the floor set by
//! reading every weight once per step at the device's measured copy bandwidth.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use candle_core::{DType, Device, Tensor};
use clap::{Args, ValueEnum};
use rand::{Rng, SeedableRng};
use serde::Serialize;
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};

use qwen_worker::comm::Comm;
use qwen_worker::config::ModelConfig;
use qwen_worker::device::DeviceSpec;
use qwen_worker::engine::runner::{spawn, EngineConfig, EngineHandle, NewRequest};
use qwen_worker::engine::scheduler::SchedulerConfig;
use qwen_worker::engine::sequence::Event;
use qwen_worker::generate::GenerateParams;
use qwen_worker::kernels::KernelMode;
use qwen_worker::model::Model;
use qwen_worker::sampling::SamplingParams;
use qwen_worker::weights::Weights;

use crate::ComputeDtype;

/// Real checkpoints whose shapes the benchmark builds (values are random).
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Shapes {
    #[value(name = "qwen2.5-7b")]
    Qwen25_7b,
    #[value(name = "qwen2.5-32b")]
    Qwen25_32b,
    /// The original Qwen-7B (QWenLMHeadModel).
    #[value(name = "qwen-7b")]
    Qwen7b,
    /// Qwen3-30B-A3B (Qwen3MoeForCausalLM: 128 experts, 8 per token).
    #[value(name = "qwen3-30b-a3b")]
    Qwen3_30bA3b,
    /// A two-layer toy for checking the command itself on a CPU.
    #[value(name = "tiny")]
    Tiny,
}

impl Shapes {
    fn name(self) -> &'static str {
        match self {
            Shapes::Qwen25_7b => "qwen2.5-7b",
            Shapes::Qwen25_32b => "qwen2.5-32b",
            Shapes::Qwen7b => "qwen-7b",
            Shapes::Qwen3_30bA3b => "qwen3-30b-a3b",
            Shapes::Tiny => "tiny",
        }
    }

    /// The checkpoint's `config.json`, as published (fields the worker reads).
    fn config_json(self) -> &'static str {
        match self {
            Shapes::Qwen25_7b => {
                r#"{"architectures":["Qwen2ForCausalLM"],"hidden_size":3584,"intermediate_size":18944,
                "num_attention_heads":28,"num_hidden_layers":28,"num_key_value_heads":4,"vocab_size":152064,
                "max_position_embeddings":32768,"rms_norm_eps":1e-6,"rope_theta":1000000.0,
                "tie_word_embeddings":false,"torch_dtype":"bfloat16"}"#
            }
            Shapes::Qwen25_32b => {
                r#"{"architectures":["Qwen2ForCausalLM"],"hidden_size":5120,"intermediate_size":27648,
                "num_attention_heads":40,"num_hidden_layers":64,"num_key_value_heads":8,"vocab_size":152064,
                "max_position_embeddings":32768,"rms_norm_eps":1e-6,"rope_theta":1000000.0,
                "tie_word_embeddings":false,"torch_dtype":"bfloat16"}"#
            }
            Shapes::Qwen7b => {
                r#"{"architectures":["QWenLMHeadModel"],"hidden_size":4096,"intermediate_size":22016,
                "num_attention_heads":32,"num_hidden_layers":32,"kv_channels":128,"rotary_pct":1.0,
                "rotary_emb_base":10000,"vocab_size":151936,"seq_length":8192,"max_position_embeddings":8192,
                "layer_norm_epsilon":1e-6,"use_dynamic_ntk":true,"use_logn_attn":true,"no_bias":true,
                "tie_word_embeddings":false,"torch_dtype":"bfloat16"}"#
            }
            Shapes::Qwen3_30bA3b => {
                r#"{"architectures":["Qwen3MoeForCausalLM"],"hidden_size":2048,"intermediate_size":6144,
                "num_attention_heads":32,"num_hidden_layers":48,"num_key_value_heads":4,"head_dim":128,
                "vocab_size":151936,"num_experts":128,"num_experts_per_tok":8,"moe_intermediate_size":768,
                "norm_topk_prob":true,"decoder_sparse_step":1,"mlp_only_layers":[],
                "max_position_embeddings":40960,"rms_norm_eps":1e-6,"rope_theta":1000000.0,
                "tie_word_embeddings":false,"torch_dtype":"bfloat16"}"#
            }
            Shapes::Tiny => {
                r#"{"architectures":["Qwen2ForCausalLM"],"hidden_size":64,"intermediate_size":128,
                "num_attention_heads":4,"num_hidden_layers":2,"num_key_value_heads":2,"vocab_size":512,
                "max_position_embeddings":1024,"rms_norm_eps":1e-6,"rope_theta":10000.0,
                "tie_word_embeddings":true,"torch_dtype":"float32"}"#
            }
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Kernels {
    Plain,
    Fused,
}

/// How the projections are stored (random values in the format's layout).
#[derive(Clone, Copy, Debug, ValueEnum)]
enum BenchQuant {
    /// In the compute dtype.
    None,
    /// GPTQ 4-bit, group 128 (Qwen2.5-*-GPTQ-Int4).
    #[value(name = "gptq-int4")]
    GptqInt4,
    /// AWQ 4-bit GEMM, group 128 (Qwen2.5-*-AWQ).
    Awq,
    /// Block FP8 e4m3, 128 x 128 scales (Qwen3-*-FP8).
    Fp8,
}

impl BenchQuant {
    /// Its `quantization_config`, as the published checkpoints write it.
    fn config(self) -> Option<serde_json::Value> {
        Some(match self {
            BenchQuant::None => return None,
            BenchQuant::GptqInt4 => {
                serde_json::json!({"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": false, "sym": true})
            }
            BenchQuant::Awq => {
                serde_json::json!({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"})
            }
            BenchQuant::Fp8 => serde_json::json!({"quant_method": "fp8", "weight_block_size": [128, 128]}),
        })
    }
}

#[derive(Args)]
pub struct BenchGpuArgs {
    /// Whose shapes to build (random weights; no files needed).
    #[arg(long, env = "QWEN_BENCH_SHAPES", value_enum)]
    shapes: Shapes,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "QWEN_DEVICE", default_value = "cuda")]
    device: DeviceSpec,
    #[arg(long, env = "QWEN_DTYPE", value_enum, default_value = "bf16")]
    dtype: ComputeDtype,
    /// Store the projections quantized (the rest stays in the compute dtype).
    #[arg(long, env = "QWEN_BENCH_QUANT", value_enum, default_value = "none")]
    quant: BenchQuant,
    /// Batch sizes to run, each a fresh set of requests.
    #[arg(long, env = "QWEN_BENCH_BATCHES", value_delimiter = ',', default_value = "1,8,32,64")]
    batches: Vec<usize>,
    #[arg(long, env = "QWEN_BENCH_PROMPT_LEN", default_value_t = 128)]
    prompt_len: usize,
    /// Decode steps timed after the prefill.
    #[arg(long, env = "QWEN_BENCH_DECODE_STEPS", default_value_t = 64)]
    decode_steps: usize,
    #[arg(long, env = "QWEN_BLOCK_SIZE", default_value_t = 16)]
    block_size: usize,
    /// Fewer layers than the checkpoint has (a quicker, smaller run).
    #[arg(long, env = "QWEN_BENCH_LAYERS")]
    layers: Option<usize>,
    /// Override the device's default kernels (fused on CUDA, plain on CPU).
    #[arg(long, env = "QWEN_KERNELS", value_enum)]
    kernels: Option<Kernels>,
    /// Run decode steps eagerly instead of replaying CUDA graphs.
    #[arg(long, env = "QWEN_NO_CUDA_GRAPHS")]
    no_graphs: bool,
    /// Also write the results here as JSON.
    #[arg(long, env = "QWEN_BENCH_JSON")]
    json: Option<PathBuf>,
}

#[derive(Serialize)]
struct Row {
    batch: usize,
    ms_per_step: f64,
    tokens_per_s: f64,
    prefill_ms: f64,
    pct_of_floor: f64,
}

/// Greedy tokens of the graph-replayed engine against an eager engine on the same weights.
#[derive(Serialize, Default, Debug, PartialEq)]
struct TokenCheck {
    sequences: usize,
    /// Every token equal.
    identical: usize,
    /// First differing where the eager run's top two were within `tie_tolerance` (a rounding
    /// difference: the kernels sum in another order at another split count).
    diverged_at_near_tie: usize,
    /// First differing where the eager run's choice was clear: a wrong result.
    mismatched: usize,
    tie_tolerance: f32,
}

#[derive(Serialize)]
struct Report {
    shapes: &'static str,
    device: String,
    dtype: String,
    quant: String,
    kernels: String,
    /// Graphs asked for on a CUDA device.
    cuda_graphs: bool,
    /// Decode steps of the timed runs whose logits came from a graph launch / ran eagerly
    /// from the graph buffers (counted where they happen, not inferred from the flag).
    graph_replays: u64,
    graph_eager_steps: u64,
    token_check: Option<TokenCheck>,
    layers: usize,
    weight_bytes: usize,
    copy_bandwidth_gb_s: f64,
    floor_ms: f64,
    prompt_len: usize,
    decode_steps: usize,
    rows: Vec<Row>,
}

pub fn run(args: BenchGpuArgs) -> anyhow::Result<()> {
    if args.batches.is_empty() || args.batches.contains(&0) || args.prompt_len == 0 || args.decode_steps == 0 {
        bail!("--batches, --prompt-len and --decode-steps must all be at least 1");
    }
    let mut json: serde_json::Value = serde_json::from_str(args.shapes.config_json())?;
    if let Some(n) = args.layers {
        if n == 0 {
            bail!("--layers must be at least 1");
        }
        json["num_hidden_layers"] = n.into();
    }
    if let Some(q) = args.quant.config() {
        json["quantization_config"] = q;
    }
    let config = ModelConfig::from_json_str(args.shapes.name(), &json.to_string())?;
    if args.prompt_len + args.decode_steps + 1 > config.max_context() {
        bail!("--prompt-len + --decode-steps exceeds the model's context of {}", config.max_context());
    }
    let device = args.device.open()?;
    let dtype: DType = args.dtype.into();
    let built = Instant::now();
    let weights = Weights::random(dtype, &device);
    let mut model = Model::from_weights(config.clone(), &weights, Comm::Single).context("building the model")?;
    let weight_bytes = weights.random_bytes();
    drop(weights);
    if let Some(k) = args.kernels {
        model.set_kernels(match k {
            Kernels::Plain => KernelMode::Plain,
            Kernels::Fused => KernelMode::Fused,
        });
    }
    let kernels = model.kernels();
    device.synchronize()?;
    eprintln!(
        "built {} ({:.2} GB of weights) in {:.1?}",
        args.shapes.name(),
        weight_bytes as f64 / 1e9,
        built.elapsed()
    );
    let bandwidth = copy_bandwidth(&device, dtype)?;
    let floor_ms = weight_bytes as f64 / bandwidth * 1e3;

    let max_batch = *args.batches.iter().max().unwrap_or(&1);
    let per_seq_blocks = (args.prompt_len + args.decode_steps + 1).div_ceil(args.block_size);
    let engine_config = EngineConfig {
        scheduler: SchedulerConfig {
            block_size: args.block_size,
            // Every prompt of the largest batch in one prefill step.
            max_batch_tokens: max_batch * args.prompt_len,
            max_seqs: max_batch,
        },
        num_blocks: max_batch * per_seq_blocks + 8,
        model_name: args.shapes.name().to_string(),
        observer: None,
        decode_graphs: !args.no_graphs,
    };
    let (engine, thread) = spawn(model, engine_config.clone())?;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
    let vocab = config.vocab_size as u32;
    let sets: Vec<Vec<Vec<u32>>> = args
        .batches
        .iter()
        .map(|&b| (0..b).map(|_| (0..args.prompt_len).map(|_| rng.random_range(0..vocab)).collect()).collect())
        .collect();
    // Warm up untimed with every batch at its full length: first launches load kernels and set
    // up cuBLAS, and every (batch, context) bucket the timed steps use gets its graph captured
    // here (the engine captured each batch bucket at the smallest context when it started).
    for (set, &b) in sets.iter().zip(&args.batches) {
        measure(&engine, set, args.decode_steps, &format!("warm-b{b}"), None)?;
    }
    let before = idle_stats(&engine)?;
    let mut rows = Vec::new();
    for (set, &b) in sets.iter().zip(&args.batches) {
        let (prefill, decode) = measure(&engine, set, args.decode_steps, &format!("b{b}"), None)?;
        let step = decode.as_secs_f64() * 1e3 / args.decode_steps as f64;
        rows.push(Row {
            batch: b,
            ms_per_step: step,
            tokens_per_s: b as f64 * 1e3 / step,
            prefill_ms: prefill.as_secs_f64() * 1e3,
            pct_of_floor: floor_ms / step * 100.0,
        });
    }
    let after = idle_stats(&engine)?;
    // Off CUDA the graph runner's static-buffer path runs eagerly: its tokens are checked too.
    // MoE layers beyond the fused kernel sync with the host: those models run eagerly.
    let graphs_asked =
        !args.no_graphs && kernels == KernelMode::Fused && qwen_worker::model::moe::fused_covers(&config, max_batch);
    let token_check = if graphs_asked {
        // The same prompts, untimed, through this engine and through an eager one on the same
        // weights (the engine hands its model back when its last handle goes).
        let with = token_pass(&engine, &sets, args.decode_steps)?;
        drop(engine);
        let model = thread.join().map_err(|_| anyhow::anyhow!("the engine thread panicked"))?;
        let (eager, _thread) = spawn(model, EngineConfig { decode_graphs: false, ..engine_config })?;
        let without = token_pass(&eager, &sets, args.decode_steps)?;
        Some(compare_tokens(&with, &without, tie_tolerance(dtype)))
    } else {
        None
    };
    let report = Report {
        shapes: args.shapes.name(),
        device: args.device.to_string(),
        dtype: format!("{dtype:?}").to_lowercase(),
        quant: format!("{:?}", args.quant).to_lowercase(),
        kernels: format!("{kernels:?}").to_lowercase(),
        cuda_graphs: graphs_asked && device.is_cuda(),
        graph_replays: after.graph_replays - before.graph_replays,
        graph_eager_steps: after.graph_eager_steps - before.graph_eager_steps,
        token_check,
        layers: config.num_layers,
        weight_bytes,
        copy_bandwidth_gb_s: bandwidth / 1e9,
        floor_ms,
        prompt_len: args.prompt_len,
        decode_steps: args.decode_steps,
        rows,
    };
    print_table(&report);
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    // The evidence is written first; then a run that did not do what it claims fails.
    if report.cuda_graphs && report.graph_replays == 0 {
        bail!("CUDA graphs were asked for but no decode step replayed from one (see the capture warnings)");
    }
    if let Some(c) = report.token_check.as_ref().filter(|c| c.mismatched > 0) {
        bail!("graph-replayed tokens differ from eager ones beyond rounding: {c:?}");
    }
    Ok(())
}

/// Largest top-two logprob gap a rounding difference can flip: 32 units in the last place at
/// 1.0 (logits of these random weights are of order 1).
fn tie_tolerance(dtype: DType) -> f32 {
    match dtype {
        DType::BF16 => 32.0 * 2f32.powi(-8),
        DType::F16 => 32.0 * 2f32.powi(-11),
        _ => 32.0 * f32::EPSILON,
    }
}

/// One greedy pass over every batch, each token with the gap between its run's top two
/// logprobs: `[batch][sequence][step]`.
type Pass = Vec<Vec<Vec<(u32, f32)>>>;

fn token_pass(engine: &EngineHandle, sets: &[Vec<Vec<u32>>], decode_steps: usize) -> anyhow::Result<Pass> {
    let mut pass = Vec::with_capacity(sets.len());
    for (i, set) in sets.iter().enumerate() {
        let mut seqs = Vec::new();
        measure(engine, set, decode_steps, &format!("check-{i}"), Some(&mut seqs))?;
        pass.push(seqs);
    }
    Ok(pass)
}

fn compare_tokens(with: &Pass, without: &Pass, tol: f32) -> TokenCheck {
    let mut c = TokenCheck { tie_tolerance: tol, ..TokenCheck::default() };
    for (a, b) in with.iter().flatten().zip(without.iter().flatten()) {
        c.sequences += 1;
        match a.iter().zip(b).position(|(x, y)| x.0 != y.0) {
            None if a.len() == b.len() => c.identical += 1,
            Some(k) if b[k].1 <= tol => c.diverged_at_near_tie += 1,
            _ => c.mismatched += 1,
        }
    }
    c
}

/// The stats once the engine has gone idle (so they include its last step).
fn idle_stats(engine: &EngineHandle) -> anyhow::Result<qwen_worker::engine::runner::Stats> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = engine.stats();
        if s.running == 0 && s.waiting == 0 {
            return Ok(s);
        }
        if Instant::now() > deadline {
            bail!("the engine did not go idle within 30 s: {s:?}");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn print_table(r: &Report) {
    println!(
        "{} on {} ({}, projections {}, {} kernels, CUDA graphs {}, {} layers): weights {:.2} GB, copy bandwidth {:.0} GB/s, floor {:.2} ms/step",
        r.shapes,
        r.device,
        r.dtype,
        r.quant,
        r.kernels,
        if r.cuda_graphs { "on" } else { "off" },
        r.layers,
        r.weight_bytes as f64 / 1e9,
        r.copy_bandwidth_gb_s,
        r.floor_ms
    );
    println!("prompt {} tokens, {} decode steps", r.prompt_len, r.decode_steps);
    println!("| batch | ms/step | tokens/s | prefill ms | % of floor |");
    println!("|------:|--------:|---------:|-----------:|-----------:|");
    for row in &r.rows {
        println!(
            "| {} | {:.2} | {:.0} | {:.1} | {:.0} % |",
            row.batch, row.ms_per_step, row.tokens_per_s, row.prefill_ms, row.pct_of_floor
        );
    }
}

/// Device-to-device copy bandwidth, bytes read plus written per second, over a 1 GiB buffer
/// (256 MiB on the CPU).
fn copy_bandwidth(device: &Device, dtype: DType) -> anyhow::Result<f64> {
    let bytes: usize = if device.is_cuda() { 1 << 30 } else { 1 << 28 };
    let src = Tensor::zeros(bytes / dtype.size_in_bytes(), dtype, device)?;
    let _ = src.copy()?;
    device.synchronize()?;
    let reps = 10;
    let start = Instant::now();
    for _ in 0..reps {
        let _ = src.copy()?;
    }
    device.synchronize()?;
    Ok(2.0 * (bytes * reps) as f64 / start.elapsed().as_secs_f64())
}

/// Runs one request per prompt, all at once, each to `decode_steps` tokens past its first;
/// returns (time to every first token, time from then to every last token). With `record`,
/// the requests ask for their top two logprobs and each sequence's (token, top-two gap) lands
/// there.
fn measure(
    engine: &EngineHandle,
    prompts: &[Vec<u32>],
    decode_steps: usize,
    tag: &str,
    mut record: Option<&mut Vec<Vec<(u32, f32)>>>,
) -> anyhow::Result<(Duration, Duration)> {
    let start = Instant::now();
    let mut streams: Vec<UnboundedReceiver<Event>> = Vec::with_capacity(prompts.len());
    let logprobs = record.is_some().then_some(2);
    for (i, prompt) in prompts.iter().enumerate() {
        let (tx, rx) = unbounded_channel();
        let params = GenerateParams {
            max_new_tokens: decode_steps + 1,
            sampling: SamplingParams { logprobs, ..SamplingParams::greedy() },
            stop_token_ids: vec![],
        };
        engine.submit(NewRequest {
            request_id: format!("{tag}-{i}"),
            prompt: prompt.clone(),
            params,
            events: tx,
            constraint: None,
        })?;
        streams.push(rx);
    }
    if let Some(r) = record.as_deref_mut() {
        r.clear();
        r.resize(prompts.len(), Vec::with_capacity(decode_steps + 1));
    }
    // First tokens of all (they come from the one prefill step), then the rest.
    for (i, rx) in streams.iter_mut().enumerate() {
        let t = next_token(rx)?;
        if let Some(r) = record.as_deref_mut() {
            r[i].push(t);
        }
    }
    let prefilled = start.elapsed();
    for (i, rx) in streams.iter_mut().enumerate() {
        for _ in 0..decode_steps {
            let t = next_token(rx)?;
            if let Some(r) = record.as_deref_mut() {
                r[i].push(t);
            }
        }
    }
    Ok((prefilled, start.elapsed() - prefilled))
}

/// The next token and the gap between the top two logprobs (infinite when not reported).
fn next_token(rx: &mut UnboundedReceiver<Event>) -> anyhow::Result<(u32, f32)> {
    match rx.blocking_recv() {
        Some(Event::Token { token, top, .. }) => {
            let gap = match top.as_slice() {
                [a, b, ..] => (a.1 - b.1).abs(),
                _ => f32::INFINITY,
            };
            Ok((token, gap))
        }
        Some(Event::Finished { reason, message, .. }) => {
            bail!("request finished early ({reason:?}): {}", message.unwrap_or_default())
        }
        None => bail!("the engine stopped"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shape_is_a_valid_config() {
        for shapes in Shapes::value_variants() {
            let cfg = ModelConfig::from_json_str(shapes.name(), shapes.config_json())
                .unwrap_or_else(|e| panic!("{}: {e}", shapes.name()));
            assert_eq!(cfg.moe.is_some(), matches!(shapes, Shapes::Qwen3_30bA3b), "{}", shapes.name());
        }
    }
}
