//! `qwen-worker`: load a Qwen checkpoint and generate or tokenize.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::DType;
use clap::{Args, Parser, Subcommand, ValueEnum};
use qwen_telemetry::{LogConfig, LogFormat};

use qwen_worker::config::GenerationConfig;
use qwen_worker::generate::{generate, GenerateParams};
use qwen_worker::model::Model;
use qwen_worker::sampling::SamplingParams;
use qwen_worker::tokenizer::Tokenizer;

mod cli_bench;
mod cli_serve;
mod cli_tp;

#[derive(Parser)]
#[command(name = "qwen-worker", version, about = "qwen-serve worker: one Qwen model replica")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text or JSON (one object per line) on stderr.
    #[arg(long, global = true, env = "QWEN_LOG_FORMAT", value_enum, default_value = "text")]
    log_format: LogFormat,
    /// Export spans over OTLP/gRPC to this collector (e.g. http://otel-collector:4317).
    #[arg(long, global = true, env = "QWEN_OTLP_ENDPOINT")]
    otlp_endpoint: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt, streaming tokens as they come.
    Generate(GenerateArgs),
    /// Print the token ids of a text.
    Tokenize(TokenizeArgs),
    /// Serve the model over gRPC with continuous batching.
    Serve(Box<cli_serve::ServeArgs>),
    /// Decode speed of the engine on random weights in a real checkpoint's shapes, against the
    /// weight-bandwidth floor.
    BenchGpu(Box<cli_bench::BenchGpuArgs>),
}

#[derive(Clone, Copy, ValueEnum)]
enum ComputeDtype {
    F32,
    Bf16,
    F16,
}

impl From<ComputeDtype> for DType {
    fn from(d: ComputeDtype) -> Self {
        match d {
            ComputeDtype::F32 => DType::F32,
            ComputeDtype::Bf16 => DType::BF16,
            ComputeDtype::F16 => DType::F16,
        }
    }
}

#[derive(Args)]
struct GenerateArgs {
    /// Hugging Face model directory (config.json, safetensors, tokenizer).
    #[arg(long, env = "QWEN_MODEL")]
    model: PathBuf,
    /// Prompt text (needs tokenizer.json or qwen.tiktoken in the model directory).
    #[arg(long, env = "QWEN_PROMPT", conflicts_with = "prompt_ids", required_unless_present = "prompt_ids")]
    prompt: Option<String>,
    /// Prompt as comma-separated token ids, e.g. 1,2,3.
    #[arg(long, env = "QWEN_PROMPT_IDS", value_delimiter = ',')]
    prompt_ids: Option<Vec<u32>>,
    /// Let special-token strings in --prompt encode as special tokens.
    #[arg(long, env = "QWEN_ALLOW_SPECIAL")]
    allow_special: bool,
    #[arg(long, env = "QWEN_MAX_NEW_TOKENS", default_value_t = 64)]
    max_new_tokens: usize,
    /// Sampling temperature; greedy when not given (or 0).
    #[arg(long, env = "QWEN_TEMPERATURE")]
    temperature: Option<f64>,
    /// Nucleus sampling mass (with --temperature); defaults to generation_config.json's, else 1.
    #[arg(long, env = "QWEN_TOP_P")]
    top_p: Option<f64>,
    /// Keep only the k most likely tokens (with --temperature; 0 = all); defaults to generation_config.json's.
    #[arg(long, env = "QWEN_TOP_K")]
    top_k: Option<usize>,
    #[arg(long, env = "QWEN_SEED", default_value_t = 0)]
    seed: u64,
    /// Keep generating past end-of-sequence tokens.
    #[arg(long, env = "QWEN_IGNORE_EOS")]
    ignore_eos: bool,
    /// Compute dtype.
    #[arg(long, env = "QWEN_DTYPE", value_enum, default_value = "f32")]
    dtype: ComputeDtype,
    /// cpu, cuda or cuda:N.
    #[arg(long, env = "QWEN_DEVICE", default_value = "cpu")]
    device: qwen_worker::device::DeviceSpec,
    /// Print one JSON object {token_ids, text, ttft_ms, tokens_per_s} instead of streaming.
    #[arg(long, env = "QWEN_JSON")]
    json: bool,
}

#[derive(Args)]
struct TokenizeArgs {
    #[arg(long, env = "QWEN_MODEL")]
    model: PathBuf,
    #[arg(long, env = "QWEN_TEXT")]
    text: String,
    /// Let special-token strings in the text encode as special tokens.
    #[arg(long, env = "QWEN_ALLOW_SPECIAL")]
    allow_special: bool,
    /// Print {"token_ids": [...]}.
    #[arg(long, env = "QWEN_JSON")]
    json: bool,
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // Info by default, so `serve` reports its KV-cache size; RUST_LOG overrides.
    let log = LogConfig { format: cli.log_format, otlp_endpoint: cli.otlp_endpoint.clone(), service: "qwen-worker" };
    let _telemetry = match qwen_telemetry::logging::init(&log) {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = match cli.command {
        Command::Generate(args) => run_generate(args),
        Command::Tokenize(args) => run_tokenize(args),
        Command::Serve(args) => cli_serve::run(*args),
        Command::BenchGpu(args) => cli_bench::run(*args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// Writes to stdout and flushes. A closed stdout (piped into `head`, say) is ignored rather than
/// a panic, as `print!` would.
pub(crate) fn emit(text: &str) {
    let mut out = std::io::stdout().lock();
    let _ = out.write_all(text.as_bytes()).and_then(|_| out.flush());
}

/// The tokenizer of a model directory, or `None` when it has none.
fn optional_tokenizer(dir: &Path) -> anyhow::Result<Option<Tokenizer>> {
    match Tokenizer::from_dir(dir) {
        Ok(t) => Ok(Some(t)),
        Err(qwen_worker::tokenizer::Error::NoTokenizer { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

fn run_generate(args: GenerateArgs) -> anyhow::Result<()> {
    let tokenizer = optional_tokenizer(&args.model)?;
    let prompt = match (&args.prompt, &args.prompt_ids) {
        (Some(text), _) => match &tokenizer {
            Some(t) => t.encode(text, args.allow_special)?,
            None => bail!(
                "--prompt needs a tokenizer, but {} has neither tokenizer.json nor qwen.tiktoken; use --prompt-ids",
                args.model.display()
            ),
        },
        (None, Some(ids)) => ids.clone(),
        (None, None) => bail!("give --prompt or --prompt-ids"),
    };
    let gen_cfg = GenerationConfig::from_dir(&args.model)?;
    let sampling = match args.temperature {
        None => SamplingParams::greedy(),
        Some(temperature) => SamplingParams {
            temperature,
            top_p: args.top_p.or(gen_cfg.top_p).unwrap_or(1.0),
            top_k: args.top_k.or(gen_cfg.top_k).unwrap_or(0),
            seed: args.seed,
            ..SamplingParams::default()
        },
    };
    let params = GenerateParams {
        max_new_tokens: args.max_new_tokens,
        sampling,
        stop_token_ids: if args.ignore_eos { Vec::new() } else { gen_cfg.eos_token_ids },
    };
    let device = args.device.open().with_context(|| format!("--device {}", args.device))?;
    let mut model = Model::load(&args.model, args.dtype.into(), &device)
        .with_context(|| format!("loading model from {}", args.model.display()))?;

    let mut decoder = tokenizer.as_ref().map(|t| t.stream_decoder());
    let mut text = String::new();
    let json = args.json;
    let generation = generate(&mut model, &prompt, &params, |id| {
        let piece = match decoder.as_mut() {
            Some(d) => d.step(id)?,
            None => Some(format!("{id} ")),
        };
        if let Some(piece) = piece {
            if !json {
                emit(&piece);
            }
            text.push_str(&piece);
        }
        Ok(())
    })?;
    if let Some(rest) = decoder.as_mut().map(|d| d.finish()).transpose()?.flatten() {
        if !json {
            emit(&rest);
        }
        text.push_str(&rest);
    }
    let ttft_ms = generation.time_to_first_token.as_secs_f64() * 1e3;
    let tokens_per_s = generation.tokens_per_second();
    if json {
        let obj = serde_json::json!({
            "token_ids": generation.token_ids,
            "text": tokenizer.as_ref().map(|_| text),
            "finish_reason": format!("{:?}", generation.finish_reason).to_lowercase(),
            "ttft_ms": ttft_ms,
            "tokens_per_s": tokens_per_s,
        });
        emit(&format!("{obj}\n"));
    } else {
        emit("\n");
        eprintln!(
            "{} tokens ({:?}), time to first token {ttft_ms:.1} ms, {tokens_per_s:.1} tokens/s",
            generation.token_ids.len(),
            generation.finish_reason
        );
    }
    Ok(())
}

fn run_tokenize(args: TokenizeArgs) -> anyhow::Result<()> {
    let tokenizer = Tokenizer::from_dir(&args.model)?;
    let ids = tokenizer.encode(&args.text, args.allow_special)?;
    if args.json {
        emit(&format!("{}\n", serde_json::json!({ "token_ids": ids })));
    } else {
        emit(&format!("{}\n", ids.iter().map(u32::to_string).collect::<Vec<_>>().join(",")));
    }
    Ok(())
}
