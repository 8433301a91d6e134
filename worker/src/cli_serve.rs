//! `qwen-worker serve`: flags validated once into [`ServeConfig`], then the engine thread and the
//! gRPC server.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use candle_core::{DType, Device};
use clap::Args;

use qwen_cluster::discovery::{Registration, RegistrationConfig, SessionState, WorkerRecord};
use qwen_cluster::keys::GroupName;
use qwen_worker::comm::Comm;
use qwen_worker::config::GenerationConfig;
use qwen_worker::constraint::GrammarCompiler;
use qwen_worker::engine::follower;
use qwen_worker::engine::runner::{spawn, EngineConfig, EngineHandle};
use qwen_worker::engine::scheduler::SchedulerConfig;
use qwen_worker::info::{model_info, InfoSource};
use qwen_worker::metrics::WorkerMetrics;
use qwen_worker::model::paged::KvLayout;
use qwen_worker::model::Model;
use qwen_worker::server::{serve, DrainConfig, ServiceConfig, Stop, WorkerService};
use tokio_util::sync::CancellationToken;

use crate::cli_tp::RankConfig;
use crate::ComputeDtype;
use qwen_worker::device::{free_memory, DeviceSpec};

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
    /// Compute dtype of weights and KV cache (default: f32 on the CPU, bf16 on CUDA).
    #[arg(long, env = "QWEN_DTYPE", value_enum)]
    dtype: Option<ComputeDtype>,
    /// cpu, cuda or cuda:N. Tensor-parallel rank r uses GPU N + r.
    #[arg(long, env = "QWEN_DEVICE", default_value = "cpu")]
    device: DeviceSpec,
    /// Tokens per KV-cache block.
    #[arg(long, env = "QWEN_BLOCK_SIZE", default_value_t = 16)]
    block_size: usize,
    /// KV-cache size in bytes (takes precedence over --kv-cache-fraction).
    #[arg(long, env = "QWEN_KV_CACHE_BYTES")]
    kv_cache_bytes: Option<u64>,
    /// KV-cache size as a fraction of the memory available once the weights are loaded: host
    /// memory on the CPU (default 0.2), free GPU memory on CUDA (default 0.85; the rest is left
    /// for activations and CUDA graphs).
    #[arg(long, env = "QWEN_KV_CACHE_FRACTION")]
    kv_cache_fraction: Option<f64>,
    /// Ranks of this group sharing this host's memory (CPU ranks): the host's KV budget is split
    /// between them, and a start that would overcommit it is refused. `--tp N` sets it to N for
    /// the ranks it starts; 1 otherwise.
    #[arg(long, env = "QWEN_RANKS_ON_HOST", default_value_t = 1)]
    ranks_on_host: usize,
    /// Most tokens in one forward (prefill chunks plus decodes).
    #[arg(long, env = "QWEN_MAX_BATCH_TOKENS", default_value_t = 2048)]
    max_batch_tokens: usize,
    /// Most sequences in one forward.
    #[arg(long, env = "QWEN_MAX_SEQS", default_value_t = 256)]
    max_seqs: usize,
    /// Tensor-parallel size: start this many rank processes on this host and supervise them.
    #[arg(long, env = "QWEN_TP", default_value_t = 1)]
    tp: usize,
    /// This process's rank in its tensor-parallel group (for groups spanning hosts or pods).
    #[arg(long, env = "QWEN_RANK", requires_all = ["world_size", "group"])]
    rank: Option<usize>,
    #[arg(long, env = "QWEN_WORLD_SIZE")]
    world_size: Option<usize>,
    /// Name of the group; its ranks meet under this name in etcd.
    #[arg(long, env = "QWEN_GROUP")]
    group: Option<String>,
    /// etcd (endpoints, TLS, user): where the group registers for routers and where
    /// tensor-parallel ranks meet.
    #[command(flatten)]
    etcd: qwen_cluster::EtcdArgs,
    /// Where rank 0 listens for the other ranks' collectives.
    #[arg(long, env = "QWEN_COMM_LISTEN", default_value = "127.0.0.1:0")]
    comm_listen: SocketAddr,
    /// The address rank 0 publishes for the other ranks: `host` (the bound port is added) or
    /// `host:port`; needed when --comm-listen is 0.0.0.0 (e.g. the pod IP).
    #[arg(long, env = "QWEN_COMM_ADVERTISE")]
    comm_advertise: Option<String>,
    /// Longest any collective waits for a rank before the group is declared broken.
    #[arg(long, env = "QWEN_COLLECTIVE_TIMEOUT_MS", default_value_t = 10_000)]
    collective_timeout_ms: u64,
    /// Health turns NOT_SERVING while an engine step has run longer than this (and four times
    /// the longest recent step): a stopped rank or a hung device leaves routing at once.
    #[arg(long, env = "QWEN_STUCK_AFTER_MS", default_value_t = 5_000)]
    stuck_after_ms: u64,
    /// How long a rank keeps retrying etcd at start (with backoff) before giving up.
    #[arg(long, env = "QWEN_ETCD_START_TIMEOUT_SECS", default_value_t = 60)]
    etcd_start_timeout_secs: u64,
    /// The address routers use to reach this worker (default: the bound --listen address; set it
    /// when listening on 0.0.0.0, e.g. to the pod IP).
    #[arg(long, env = "QWEN_ADVERTISE_ADDR")]
    advertise_addr: Option<String>,
    /// TTL of the etcd lease under which the group is registered for routers.
    #[arg(long, env = "QWEN_REGISTRATION_TTL_SECS", default_value_t = 5)]
    registration_ttl_secs: u64,
    /// Serve Prometheus metrics over HTTP at /metrics on this address (port 0: a free port,
    /// printed on stdout as `metrics on ADDR`).
    #[arg(long, env = "QWEN_METRICS_LISTEN")]
    metrics_listen: Option<SocketAddr>,
    /// Run every decode step eagerly instead of replaying CUDA graphs (on CUDA, alone on a GPU).
    #[arg(long, env = "QWEN_NO_CUDA_GRAPHS")]
    no_cuda_graphs: bool,
    /// On SIGTERM, longest wait for running requests to finish after leaving routing.
    #[arg(long, env = "QWEN_DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    drain_timeout_secs: u64,
    /// Mixture-of-experts models: each rank of the group holds whole experts (as evenly as their
    /// count allows) instead of a slice of every expert; attention stays tensor-parallel.
    #[arg(long, env = "QWEN_EXPERT_PARALLEL")]
    expert_parallel: bool,
    /// TLS on the worker's gRPC port: its certificate (PEM) ...
    #[arg(long, env = "QWEN_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// ... its private key ...
    #[arg(long, env = "QWEN_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// ... and the CA that signs routers' client certificates: with it (mutual TLS), a client
    /// without such a certificate is refused during the handshake.
    #[arg(long, env = "QWEN_TLS_CLIENT_CA")]
    tls_client_ca: Option<PathBuf>,
    /// With --tls-cert and --tls-client-ca, the ranks of a tensor-parallel group connect by
    /// mutual TLS too (the CA signs every rank's certificate); rank 0's certificate must name
    /// this (default: the host of its --comm-advertise address).
    #[arg(long, env = "QWEN_TLS_PEER_NAME")]
    tls_peer_name: Option<String>,
    /// Written once this process is part of a formed group with its shard loaded (removed at
    /// start): the readiness signal of ranks other than 0, which serve no gRPC.
    #[arg(long, env = "QWEN_READY_FILE")]
    ready_file: Option<PathBuf>,
}

/// Where and how rank 0 registers the group for routers (when --etcd is given).
struct Registry {
    etcd: qwen_cluster::Etcd,
    group: GroupName,
    advertise_addr: Option<String>,
    ttl: std::time::Duration,
}

/// How this process takes part.
enum Mode {
    Single,
    Supervisor { tp: usize, group: GroupName },
    Rank(Box<RankConfig>),
}

/// Checked serve settings.
pub struct ServeConfig {
    mode: Mode,
    model: PathBuf,
    listen: SocketAddr,
    model_name: String,
    dtype: DType,
    device: DeviceSpec,
    kv_cache: KvBudget,
    scheduler: SchedulerConfig,
    registry: Option<Registry>,
    drain_timeout: std::time::Duration,
    stuck_after: std::time::Duration,
    ranks_on_host: usize,
    metrics_listen: Option<SocketAddr>,
    cuda_graphs: bool,
    /// TLS (and, with a client CA, mutual TLS) on the gRPC port.
    tls: Option<tonic::transport::ServerTlsConfig>,
    load: qwen_worker::model::LoadOptions,
    ready_file: Option<PathBuf>,
}

impl ServeArgs {
    /// The gRPC port's TLS settings, every file read and checked now.
    fn tls(&self) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
        let cert =
            qwen_tls::CertFiles::from_flags(self.tls_cert.clone(), self.tls_key.clone(), ("--tls-cert", "--tls-key"))?;
        match cert {
            Some(cert) => Ok(Some(qwen_tls::tonic_server(&cert, self.tls_client_ca.as_deref())?)),
            None if self.tls_client_ca.is_some() => bail!("--tls-client-ca: needs --tls-cert and --tls-key"),
            None => Ok(None),
        }
    }

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
        let kv_cache = match self.kv_cache_bytes {
            Some(b) => KvBudget::Bytes(b),
            None => {
                let fraction = self.kv_cache_fraction.unwrap_or(if self.device.is_cuda() { 0.85 } else { 0.2 });
                if !(fraction > 0.0 && fraction <= 1.0) {
                    bail!("--kv-cache-fraction {fraction}: must be in (0, 1]");
                }
                KvBudget::Fraction(fraction)
            }
        };
        let timeout = std::time::Duration::from_millis(self.collective_timeout_ms);
        if self.collective_timeout_ms < 100 {
            bail!("--collective-timeout-ms {}: must be at least 100", self.collective_timeout_ms);
        }
        let group = |g: Option<String>| -> anyhow::Result<GroupName> {
            let name = g.unwrap_or_else(|| format!("g-{}", std::process::id()));
            GroupName::new(&name).map_err(|e| anyhow::anyhow!("--group: {e}"))
        };
        if self.registration_ttl_secs == 0 {
            bail!("--registration-ttl-secs: must be at least 1");
        }
        let etcd = self.etcd.clone().validate().map_err(anyhow::Error::msg)?;
        let tls = self.tls()?;
        let peer_tls = match (&self.tls_cert, &self.tls_key, &self.tls_client_ca) {
            (Some(cert), Some(key), Some(ca)) => {
                let files = qwen_tls::CertFiles { cert: cert.clone(), key: key.clone() };
                Some(qwen_tls::PeerTls::load(&files, ca, self.tls_peer_name.clone())?)
            }
            _ if self.tls_peer_name.is_some() => {
                bail!("--tls-peer-name: needs --tls-cert, --tls-key and --tls-client-ca")
            }
            _ => None,
        };
        let registry = match &etcd {
            None => None,
            Some(etcd) => Some(Registry {
                etcd: etcd.clone(),
                group: group(self.group.clone())?,
                advertise_addr: self.advertise_addr.clone(),
                ttl: std::time::Duration::from_secs(self.registration_ttl_secs),
            }),
        };
        let mode = match (self.rank, self.world_size) {
            (Some(rank), Some(world_size)) => {
                if world_size < 2 || rank >= world_size {
                    bail!("--rank {rank} --world-size {world_size}: need world size >= 2 and rank < world size");
                }
                let Some(etcd) = etcd else {
                    bail!("--etcd: tensor-parallel ranks meet through etcd; give its endpoints");
                };
                Mode::Rank(Box::new(RankConfig {
                    rank,
                    world_size,
                    group: group(self.group)?,
                    etcd,
                    comm_listen: self.comm_listen,
                    comm_advertise: self.comm_advertise.clone(),
                    timeout,
                    etcd_start_timeout: std::time::Duration::from_secs(self.etcd_start_timeout_secs),
                    tls: peer_tls,
                }))
            }
            _ if self.tp > 1 => {
                if etcd.is_none() {
                    bail!("--etcd: --tp {} starts ranks that meet through etcd; give its endpoints", self.tp);
                }
                Mode::Supervisor { tp: self.tp, group: group(self.group)? }
            }
            _ if self.tp == 0 => bail!("--tp: must be at least 1"),
            _ => Mode::Single,
        };
        let model_name = match self.model_name {
            Some(n) => n,
            None => self.model.file_name().map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned()),
        };
        Ok(ServeConfig {
            mode,
            model: self.model,
            listen: self.listen,
            model_name,
            dtype: match (self.dtype, self.device.is_cuda()) {
                (Some(d), _) => d.into(),
                (None, true) => DType::BF16,
                (None, false) => DType::F32,
            },
            device: self.device,
            kv_cache,
            scheduler: SchedulerConfig {
                block_size: self.block_size,
                max_batch_tokens: self.max_batch_tokens,
                max_seqs: self.max_seqs,
            },
            registry,
            drain_timeout: std::time::Duration::from_secs(self.drain_timeout_secs),
            stuck_after: std::time::Duration::from_millis(self.stuck_after_ms),
            ranks_on_host: self.ranks_on_host.max(1),
            metrics_listen: self.metrics_listen,
            cuda_graphs: !self.no_cuda_graphs,
            tls,
            ready_file: self.ready_file,
            load: qwen_worker::model::LoadOptions {
                experts: if self.expert_parallel {
                    qwen_worker::model::moe::ExpertSplit::Whole
                } else {
                    qwen_worker::model::moe::ExpertSplit::Sliced
                },
            },
        })
    }
}

impl ServeConfig {
    fn tp_size(&self) -> usize {
        match &self.mode {
            Mode::Single => 1,
            Mode::Supervisor { tp, .. } => *tp,
            Mode::Rank(r) => r.world_size,
        }
    }
}

/// How large the KV cache is: fixed, or a share of the memory left after loading.
#[derive(Clone, Copy)]
enum KvBudget {
    Bytes(u64),
    Fraction(f64),
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    let cfg = args.validate()?;
    if let Mode::Supervisor { tp, group } = &cfg.mode {
        let argv: Vec<String> = std::env::args().collect();
        return crate::cli_tp::supervise(&argv, *tp, group, cfg.drain_timeout);
    }
    crate::cli_tp::exit_with_supervisor();
    if let Some(f) = &cfg.ready_file {
        // Kept across container restarts in a pod's volume: a restarted rank is not ready yet.
        match std::fs::remove_file(f) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                return Err(e).with_context(|| format!("--ready-file {}", f.display()));
            }
            _ => {}
        }
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let rank = match &cfg.mode {
        Mode::Rank(r) => r.rank,
        _ => 0,
    };
    let device_spec = cfg.device.offset(rank);
    let device = device_spec.open().with_context(|| format!("--device {}", cfg.device))?;
    let (comm, lease) = match &cfg.mode {
        Mode::Rank(r) => crate::cli_tp::join_group(&runtime, r, &device)?,
        _ => (Comm::Single, None),
    };
    let result = serve_rank(&runtime, &cfg, comm, &device);
    if let Some(lease) = lease {
        // Gone at once on a clean stop; on a crash the lease expires instead.
        runtime.block_on(lease.revoke());
    }
    result
}

/// Loads this rank's shard; rank 0 runs the engine and the gRPC service, the others follow it.
fn serve_rank(runtime: &tokio::runtime::Runtime, cfg: &ServeConfig, comm: Comm, device: &Device) -> anyhow::Result<()> {
    let model = Model::load_with(&cfg.model, cfg.dtype, device, comm, cfg.load)
        .with_context(|| format!("loading model from {}", cfg.model.display()))?;
    let num_blocks = agree_on_blocks(&model, cfg, device)?;
    if model.comm().rank() != 0 {
        if let Some(f) = &cfg.ready_file {
            // Every rank has loaded and agreed on the cache: the group is formed.
            std::fs::write(f, b"ready\n").with_context(|| format!("--ready-file {}", f.display()))?;
        }
        follower::run(model, cfg.scheduler.block_size, num_blocks, device)?;
        return Ok(());
    }
    let defaults = GenerationConfig::from_dir(&cfg.model)?;
    let info = model_info(&InfoSource {
        dir: &cfg.model,
        model_name: &cfg.model_name,
        config: model.config(),
        generation: &defaults,
        tp: model.comm().world_size(),
    })?;
    let grammars = grammar_compiler(&cfg.model, model.config().vocab_size, &defaults.eos_token_ids);
    let metrics = WorkerMetrics::new(&cfg.model_name);
    let (engine, engine_thread) = spawn(
        model,
        EngineConfig {
            scheduler: cfg.scheduler,
            num_blocks,
            model_name: cfg.model_name.clone(),
            observer: Some(metrics.clone()),
            decode_graphs: cfg.cuda_graphs && device.is_cuda(),
        },
    )?;
    metrics.attach(engine.stats_view());
    let watch = engine.clone();
    let service = WorkerService::new(
        engine,
        ServiceConfig { defaults, block_size: cfg.scheduler.block_size, info, metrics: metrics.clone(), grammars },
    );
    runtime.block_on(serve_rank0(cfg, service, watch, metrics, num_blocks))?;
    // The service (and with it the last engine handle) is gone: the engine thread winds down and
    // tells any followers to stop.
    let _ = engine_thread.join();
    Ok(())
}

/// The grammar compiler for structured outputs over the model directory's tokenizer; `None` (the
/// worker still serves, refusing constrained requests) where there is no tokenizer or it cannot
/// be turned into the grammar engine's vocabulary.
fn grammar_compiler(dir: &std::path::Path, vocab_size: usize, eos: &[u32]) -> Option<Arc<GrammarCompiler>> {
    let tokenizer = match qwen_worker::tokenizer::Tokenizer::from_dir(dir) {
        Ok(t) => t,
        Err(e) => {
            tracing::info!(error = %e, "no tokenizer: structured outputs off");
            return None;
        }
    };
    let started = std::time::Instant::now();
    match GrammarCompiler::new(&tokenizer, vocab_size, eos) {
        Ok(g) => {
            tracing::info!(ms = started.elapsed().as_millis() as u64, "structured outputs ready");
            Some(Arc::new(g))
        }
        Err(e) => {
            tracing::warn!(error = %e, "structured outputs off");
            None
        }
    }
}

/// KV blocks every rank of the group allocates. Block ids come from rank 0's allocator, so every
/// rank must hold as many blocks: rank 0's count (its memory reading) is the group's.
fn agree_on_blocks(model: &Model, cfg: &ServeConfig, device: &Device) -> anyhow::Result<usize> {
    let layout = KvLayout::for_model(model, cfg.scheduler.block_size);
    // CPU ranks of one host share its memory: the budget is the host's, split between them. A
    // GPU rank's memory is its own device's.
    let sharing = if device.is_cuda() { 1 } else { cfg.ranks_on_host as u64 };
    let available = free_memory(device)?;
    let kv_cache_bytes = match cfg.kv_cache {
        KvBudget::Bytes(b) => {
            if b.saturating_mul(sharing) > available {
                bail!(
                    "--kv-cache-bytes {b} for each of {sharing} rank(s) on this host exceeds the {available} bytes available"
                );
            }
            b
        }
        KvBudget::Fraction(f) => (available as f64 * f) as u64 / sharing,
    };
    let mine = (kv_cache_bytes / layout.block_bytes() as u64) as usize;
    let agreed = model.comm().broadcast_bytes(0, (mine as u64).to_le_bytes().to_vec())?;
    let num_blocks = u64::from_le_bytes(agreed.as_slice().try_into().context("block count from rank 0")?) as usize;
    if num_blocks == 0 {
        bail!(
            "KV cache of {} bytes (--kv-cache-bytes or --kv-cache-fraction): too small for one block of {} bytes ({} tokens)",
            kv_cache_bytes,
            layout.block_bytes(),
            cfg.scheduler.block_size
        );
    }
    Ok(num_blocks)
}

/// Rank 0's servers: gRPC until a signal (drain) or the engine's death (at once), the metrics
/// endpoint, and the registration routers discover it by.
async fn serve_rank0(
    cfg: &ServeConfig,
    service: WorkerService,
    engine: EngineHandle,
    metrics: Arc<WorkerMetrics>,
    num_blocks: usize,
) -> anyhow::Result<()> {
    let listen = cfg.listen;
    let listener =
        tokio::net::TcpListener::bind(listen).await.with_context(|| format!("--listen {listen}: cannot bind"))?;
    let addr = listener.local_addr()?;
    crate::emit(&format!("listening on {addr}\n"));
    tracing::info!(%addr, model = %cfg.model_name, num_blocks, "serving");
    let stop_metrics = CancellationToken::new();
    if let Some(listen) = cfg.metrics_listen {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("--metrics-listen {listen}: cannot bind"))?;
        crate::emit(&format!("metrics on {}\n", listener.local_addr()?));
        let source: std::sync::Arc<dyn qwen_telemetry::exposition::Scrape> = metrics.clone();
        tokio::spawn(qwen_telemetry::exposition::serve(listener, source, stop_metrics.clone()));
    }
    let deregister = register(cfg, &addr.to_string(), metrics);
    let (engine_died_tx, mut engine_died) = tokio::sync::oneshot::channel::<()>();
    let stop = async move {
        tokio::select! {
            _ = qwen_telemetry::shutdown_signal() => Stop::Drain,
            _ = &mut engine_died => Stop::Now,
        }
    };
    // An engine thread that is gone takes the worker down with an error, so a supervisor
    // (Kubernetes, or `--tp`) restarts it instead of routing to a process that cannot generate.
    let watch = engine.clone();
    let watcher = tokio::spawn(async move {
        while watch.is_alive() {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        }
        let _ = engine_died_tx.send(());
    });
    let drain = DrainConfig { timeout: cfg.drain_timeout, stuck_after: cfg.stuck_after, deregister };
    serve(service, listener, stop, drain, cfg.tls.clone()).await?;
    stop_metrics.cancel();
    watcher.abort();
    if !engine.is_alive() {
        bail!("the engine thread stopped");
    }
    Ok(())
}

/// Registers this worker for routers when `--etcd` is given (its state mirrored in the
/// `registered` gauge); returns what deregisters it.
fn register(cfg: &ServeConfig, addr: &str, metrics: std::sync::Arc<WorkerMetrics>) -> Deregister {
    let Some(r) = cfg.registry.as_ref() else { return Box::pin(async {}) };
    let record = WorkerRecord {
        group: r.group.as_str().to_string(),
        grpc_addr: r.advertise_addr.clone().unwrap_or_else(|| addr.to_string()),
        model: cfg.model_name.clone(),
        tp: cfg.tp_size() as u32,
    };
    tracing::info!(group = %record.group, addr = %record.grpc_addr, "registering for routers");
    let registration =
        Registration::spawn(RegistrationConfig { etcd: r.etcd.clone(), record, ttl: r.ttl }, CancellationToken::new());
    let mut state = registration.state();
    tokio::spawn(async move {
        loop {
            metrics.set_registered(*state.borrow_and_update() == SessionState::Registered);
            if state.changed().await.is_err() {
                metrics.set_registered(false);
                return;
            }
        }
    });
    Box::pin(registration.stop())
}

type Deregister = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;
