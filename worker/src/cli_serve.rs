//! `qwen-worker serve`: flags validated once into [`ServeConfig`], then the engine thread and the
//! gRPC server.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use clap::Args;

use qwen_worker::config::GenerationConfig;
use qwen_worker::engine::runner::{spawn, EngineConfig};
use qwen_worker::engine::scheduler::SchedulerConfig;
use qwen_worker::model::paged::KvLayout;
use qwen_worker::model::Model;
use qwen_worker::server::{serve, WorkerService};

use crate::ComputeDtype;

#[derive(Args)]
pub struct ServeArgs {
    /// Hugging Face model directory.
    #[arg(long, env = "QWEN_MODEL")]
    model: PathBuf,
    /// Address for the gRPC service; port 0 picks a free port (printed on stdout).
    #[arg(long, env = "QWEN_LISTEN", default_value = "127.0.0.1:50051")]
    listen: SocketAddr,
    /// Name reported in Stats (default: the model directory's name).
    #[arg(long, env = "QWEN_MODEL_NAME")]
    model_name: Option<String>,
    #[arg(long, env = "QWEN_DTYPE", value_enum, default_value = "f32")]
    dtype: ComputeDtype,
    /// Tokens per KV-cache block.
    #[arg(long, env = "QWEN_BLOCK_SIZE", default_value_t = 16)]
    block_size: usize,
    /// KV-cache size in bytes (takes precedence over --kv-cache-fraction).
    #[arg(long, env = "QWEN_KV_CACHE_BYTES")]
    kv_cache_bytes: Option<u64>,
    /// KV-cache size as a fraction of the memory available at start.
    #[arg(long, env = "QWEN_KV_CACHE_FRACTION", default_value_t = 0.2)]
    kv_cache_fraction: f64,
    /// Most tokens in one forward (prefill chunks plus decodes).
    #[arg(long, env = "QWEN_MAX_BATCH_TOKENS", default_value_t = 2048)]
    max_batch_tokens: usize,
    /// Most sequences in one forward.
    #[arg(long, env = "QWEN_MAX_SEQS", default_value_t = 256)]
    max_seqs: usize,
}

/// Checked serve settings.
pub struct ServeConfig {
    model: PathBuf,
    listen: SocketAddr,
    model_name: String,
    dtype: DType,
    kv_cache_bytes: u64,
    scheduler: SchedulerConfig,
}

impl ServeArgs {
    pub fn validate(self) -> anyhow::Result<ServeConfig> {
        if !(1..=1024).contains(&self.block_size) {
            bail!("--block-size {}: must be between 1 and 1024", self.block_size);
        }
        if self.max_batch_tokens == 0 {
            bail!("--max-batch-tokens: must be at least 1");
        }
        if self.max_seqs == 0 {
            bail!("--max-seqs: must be at least 1");
        }
        let kv_cache_bytes = match self.kv_cache_bytes {
            Some(b) => b,
            None => {
                if !(self.kv_cache_fraction > 0.0 && self.kv_cache_fraction <= 1.0) {
                    bail!("--kv-cache-fraction {}: must be in (0, 1]", self.kv_cache_fraction);
                }
                (available_memory().context("--kv-cache-fraction needs /proc/meminfo")? as f64 * self.kv_cache_fraction)
                    as u64
            }
        };
        let model_name = match self.model_name {
            Some(n) => n,
            None => self.model.file_name().map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned()),
        };
        Ok(ServeConfig {
            model: self.model,
            listen: self.listen,
            model_name,
            dtype: self.dtype.into(),
            kv_cache_bytes,
            scheduler: SchedulerConfig {
                block_size: self.block_size,
                max_batch_tokens: self.max_batch_tokens,
                max_seqs: self.max_seqs,
            },
        })
    }
}

/// MemAvailable from /proc/meminfo, in bytes.
fn available_memory() -> anyhow::Result<u64> {
    let info = std::fs::read_to_string("/proc/meminfo")?;
    let kib = info
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .context("no MemAvailable line")?;
    Ok(kib * 1024)
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = args.validate()?;
    let model = Model::load(&cfg.model, cfg.dtype, &Device::Cpu)
        .with_context(|| format!("loading model from {}", cfg.model.display()))?;
    let defaults = GenerationConfig::from_dir(&cfg.model)?;
    let mc = model.config();
    let layout = KvLayout {
        num_layers: mc.num_layers,
        num_kv_heads: model.local_kv_heads(),
        head_dim: mc.head_dim,
        block_size: cfg.scheduler.block_size,
        dtype: cfg.dtype,
    };
    let num_blocks = (cfg.kv_cache_bytes / layout.block_bytes() as u64) as usize;
    if num_blocks == 0 {
        bail!(
            "--kv-cache-bytes {}: too small for one block of {} bytes ({} tokens)",
            cfg.kv_cache_bytes,
            layout.block_bytes(),
            cfg.scheduler.block_size
        );
    }
    let (engine, engine_thread) =
        spawn(model, EngineConfig { scheduler: cfg.scheduler, num_blocks, model_name: cfg.model_name.clone() })?;
    let watch = engine.clone();
    let service = WorkerService::new(engine, defaults, cfg.scheduler.block_size);

    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("--listen {}: cannot bind", cfg.listen))?;
        let addr = listener.local_addr()?;
        crate::emit(&format!("listening on {addr}\n"));
        tracing::info!(%addr, model = %cfg.model_name, num_blocks, "serving");
        let (engine_died_tx, mut engine_died) = tokio::sync::oneshot::channel::<()>();
        let stop = async move {
            tokio::select! {
                _ = shutdown_signal() => {}
                _ = &mut engine_died => {}
            }
        };
        // An engine thread that is gone takes the worker down with an error, so a supervisor
        // (Kubernetes) restarts it instead of routing to a process that cannot generate.
        let watcher = tokio::spawn(async move {
            while watch.is_alive() {
                tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            }
            let _ = engine_died_tx.send(());
        });
        serve(service, listener, stop).await?;
        if watcher.is_finished() {
            bail!("the engine thread stopped");
        }
        watcher.abort();
        anyhow::Ok(())
    })?;
    // The service (and with it the last engine handle) is gone: the engine thread winds down.
    let _ = engine_thread.join();
    Ok(())
}

async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
