//! The worker's gRPC service (`qwen.worker.v1.Worker`) over the engine, plus standard
//! `grpc.health.v1` health. Request translation and validation live in `request.rs`; this file
//! only moves messages between tonic and the engine.

use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use qwen_proto::worker::worker_server::{Worker, WorkerServer};
use qwen_proto::worker::{
    CancelRequest, CancelResponse, Constraint, FinishReason as PbFinish, GenerateRequest, GenerateResponse,
    InfoRequest, InfoResponse, StatsRequest, StatsResponse, TopLogprob,
};
use tokio::sync::mpsc::unbounded_channel;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use crate::config::GenerationConfig;
use crate::constraint::{GrammarCompiler, TokenConstraint};
use crate::engine::runner::{EngineHandle, NewRequest};
use crate::engine::sequence::{Event, FinishReason};
use crate::error::{Error, ErrorKind};
use crate::metrics::WorkerMetrics;
use crate::request::to_generate_params;
use qwen_telemetry::TraceContext;
use std::time::Instant;

pub struct WorkerService {
    engine: EngineHandle,
    defaults: GenerationConfig,
    block_size: usize,
    info: InfoResponse,
    metrics: Arc<WorkerMetrics>,
    grammars: Option<Arc<GrammarCompiler>>,
    /// Compilations at once: one per core, the rest wait their turn (within their deadline).
    compile_slots: Arc<tokio::sync::Semaphore>,
    next_id: AtomicU64,
    owners: Arc<Owners>,
}

/// Who submitted each live request: the peer address of its connection. Cancel is taken only
/// from that connection (or from a peer with a verified client certificate, i.e. a router under
/// mutual TLS), so a guessed or leaked id cannot cancel someone else's request.
#[derive(Default)]
struct Owners(std::sync::Mutex<std::collections::HashMap<String, Option<std::net::SocketAddr>>>);

impl Owners {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, Option<std::net::SocketAddr>>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records `id` as `peer`'s; `None` if a live request already has the id.
    fn claim(self: &Arc<Self>, id: &str, peer: Option<std::net::SocketAddr>) -> Option<Claim> {
        let mut owners = self.lock();
        if owners.contains_key(id) {
            return None;
        }
        owners.insert(id.to_string(), peer);
        Some(Claim { owners: self.clone(), id: id.to_string() })
    }
}

/// A live request's entry in [`Owners`], removed when its stream ends or is dropped.
struct Claim {
    owners: Arc<Owners>,
    id: String,
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.owners.lock().remove(&self.id);
    }
}

pub struct ServiceConfig {
    pub defaults: GenerationConfig,
    pub block_size: usize,
    /// What `Info` answers (see `info::model_info`).
    pub info: InfoResponse,
    pub metrics: Arc<WorkerMetrics>,
    /// Compiles requests' `constraint`s; `None` where the model has no tokenizer.
    pub grammars: Option<Arc<GrammarCompiler>>,
}

impl WorkerService {
    pub fn new(engine: EngineHandle, cfg: ServiceConfig) -> Self {
        WorkerService {
            engine,
            defaults: cfg.defaults,
            block_size: cfg.block_size,
            info: cfg.info,
            metrics: cfg.metrics,
            grammars: cfg.grammars,
            compile_slots: Arc::new(tokio::sync::Semaphore::new(
                std::thread::available_parallelism().map_or(2, std::num::NonZeroUsize::get),
            )),
            next_id: AtomicU64::new(0),
            owners: Arc::default(),
        }
    }
}

impl WorkerService {
    /// A request's grammar, compiled on a blocking thread (it may take milliseconds).
    async fn compile(&self, c: Constraint) -> Result<TokenConstraint, Status> {
        let grammars = self.grammars.clone().ok_or_else(|| {
            Status::invalid_argument(
                "invalid input: constraint: this model has no tokenizer to compile grammars against",
            )
        })?;
        let started = Instant::now();
        let _slot = self.compile_slots.acquire().await.map_err(|_| Status::unavailable("the worker is stopping"))?;
        let compiled = tokio::task::spawn_blocking(move || grammars.compile(&c))
            .await
            .map_err(|e| Status::internal(format!("grammar compilation: {e}")))?
            .map_err(|e| status(&e))?;
        self.metrics.grammar_compiled(started.elapsed().as_secs_f64());
        Ok(compiled)
    }
}

/// Maps an engine error to a gRPC status: the caller's mistakes are INVALID_ARGUMENT.
pub fn status(e: &Error) -> Status {
    match e.kind() {
        ErrorKind::InvalidInput => Status::invalid_argument(e.to_string()),
        ErrorKind::Unavailable => Status::unavailable(e.to_string()),
        _ => Status::internal(e.to_string()),
    }
}

fn finish_reason(r: FinishReason) -> PbFinish {
    match r {
        FinishReason::Length => PbFinish::Length,
        FinishReason::Stop => PbFinish::Stop,
        FinishReason::Cancelled => PbFinish::Cancelled,
        FinishReason::Error => PbFinish::Error,
    }
}

type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Worker for WorkerService {
    type GenerateStream = GenerateStream;

    async fn generate(&self, request: Request<GenerateRequest>) -> Result<Response<GenerateStream>, Status> {
        let arrived = Instant::now();
        // The router's trace context, so this request's log lines (and exported spans) join its trace.
        let trace = TraceContext::from_metadata(request.metadata()).unwrap_or_else(TraceContext::new_root);
        let peer = request.remote_addr();
        let req = request.into_inner();
        let params = to_generate_params(&req, &self.defaults).map_err(|e| status(&e))?;
        let request_id = if req.request_id.is_empty() {
            format!("req-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
        } else {
            req.request_id.clone()
        };
        let prompt_tokens = req.prompt_token_ids.len() as u32;
        let claim = self.owners.claim(&request_id, peer).ok_or_else(|| {
            Status::already_exists(format!("request_id {request_id:?}: a request with this id is running"))
        })?;
        let constraint = match req.constraint {
            Some(c) => Some(Box::new(self.compile(c).await?)),
            None => None,
        };
        let (tx, rx) = unbounded_channel();
        self.engine
            .submit(NewRequest {
                request_id: request_id.clone(),
                prompt: req.prompt_token_ids,
                params,
                events: tx,
                constraint,
            })
            .map_err(|e| status(&e))?;
        // Dropping this stream (client gone) drops the receiver; the engine sees the closed
        // channel and frees the request's blocks within one step.
        let finished = Arc::new(AtomicBool::new(false));
        let seen_finish = finished.clone();
        let span = tracing::info_span!("generate", request_id = %request_id, trace_id = %trace.trace_id_hex());
        qwen_telemetry::logging::set_remote_parent(&span, &trace);
        let metrics = self.metrics.clone();
        let (mut last, mut generated) = (arrived, 0u64);
        let stream = UnboundedReceiverStream::new(rx).map(move |event| {
            let _owned = &claim;
            let mut msg = GenerateResponse { request_id: request_id.clone(), prompt_tokens, ..Default::default() };
            match event {
                Event::Token { token, logprob, top } => {
                    let now = Instant::now();
                    if generated == 0 {
                        metrics.first_token((now - arrived).as_secs_f64());
                    } else {
                        metrics.next_token((now - last).as_secs_f64());
                    }
                    (last, generated) = (now, generated + 1);
                    msg.token_id = Some(token);
                    msg.logprob = logprob;
                    msg.top_logprobs =
                        top.into_iter().map(|(token_id, logprob)| TopLogprob { token_id, logprob }).collect();
                }
                Event::Finished { reason, cached_prompt_tokens, message } => {
                    seen_finish.store(true, Ordering::Relaxed);
                    let secs = arrived.elapsed().as_secs_f64();
                    metrics.finished(reason, secs, u64::from(prompt_tokens), generated);
                    span.in_scope(|| {
                        tracing::info!(
                            ?reason,
                            prompt_tokens,
                            generated,
                            cached_prompt_tokens,
                            secs,
                            "request finished"
                        )
                    });
                    msg.finish_reason = finish_reason(reason) as i32;
                    msg.cached_prompt_tokens = cached_prompt_tokens as u32;
                    msg.error = message.unwrap_or_default();
                }
            }
            Ok(msg)
        });
        // A stream that ends without its finish message lost the engine: say so.
        let tail = tokio_stream::once(()).filter_map(move |_| {
            (!finished.load(Ordering::Relaxed)).then(|| Err(Status::unavailable("the engine stopped")))
        });
        Ok(Response::new(Box::pin(stream.chain(tail))))
    }

    async fn cancel(&self, request: Request<CancelRequest>) -> Result<Response<CancelResponse>, Status> {
        let (peer, router) = (request.remote_addr(), request.peer_certs().is_some());
        let id = request.into_inner().request_id;
        crate::request::check_request_id(&id).map_err(|e| status(&e))?;
        match self.owners.lock().get(&id) {
            // Finished, or never here: nothing to cancel (and nothing to tell a stranger).
            None => return Ok(Response::new(CancelResponse {})),
            Some(owner) if router || (owner.is_some() && *owner == peer) => {}
            Some(_) => {
                return Err(Status::permission_denied(format!(
                    "request_id {id:?}: only the connection that submitted it may cancel it"
                )))
            }
        }
        self.engine.cancel(&id).map_err(|e| status(&e))?;
        Ok(Response::new(CancelResponse {}))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(self.info.clone()))
    }

    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let s = self.engine.stats();
        Ok(Response::new(StatsResponse {
            running: s.running as u32,
            waiting: s.waiting as u32,
            free_kv_blocks: s.free_blocks as u32,
            total_kv_blocks: s.total_blocks as u32,
            cached_kv_blocks: s.cached_blocks as u32,
            prefix_cache_hit_rate: s.prefix_cache_hit_rate,
            tokens_per_s: s.tokens_per_s,
            model_name: s.model_name,
            max_context: s.max_context as u32,
            preemptions: s.preemptions,
            kv_block_size: self.block_size as u32,
            info_digest: self.info.digest.clone(),
            expert_tokens: s.expert_tokens,
        }))
    }
}

/// How serving ends: `Drain` (SIGTERM, Kubernetes preStop) first tells routers to stop sending
/// work, then lets what is running finish; `Now` (the engine is gone) stops at once.
pub enum Stop {
    Drain,
    Now,
}

pub struct DrainConfig {
    /// Longest wait for running requests to finish once draining.
    pub timeout: std::time::Duration,
    /// Health turns NOT_SERVING while a step has run longer than this and four times the
    /// longest recent step (a stopped rank, a hung device), and SERVING again when it ends.
    pub stuck_after: std::time::Duration,
    /// Runs first when draining, e.g. removing the group's record from etcd.
    pub deregister: Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
}

/// Serves the worker and health services on `listener` (over `tls` when given) until `stop`
/// resolves.
pub async fn serve(
    service: WorkerService,
    listener: tokio::net::TcpListener,
    stop: impl std::future::Future<Output = Stop> + Send + 'static,
    drain: DrainConfig,
    tls: Option<tonic::transport::ServerTlsConfig>,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<WorkerServer<WorkerService>>().await;
    let engine = service.engine.clone();
    let draining = Arc::new(AtomicBool::new(false));
    let watch = tokio::spawn(watch_progress(engine.progress(), health.clone(), drain.stuck_after, draining.clone()));
    let shutdown = async move {
        if let Stop::Drain = stop.await {
            tracing::info!("draining: leaving routing, then finishing running requests");
            draining.store(true, Ordering::Relaxed);
            health.set_not_serving::<WorkerServer<WorkerService>>().await;
            drain.deregister.await;
            let deadline = tokio::time::Instant::now() + drain.timeout;
            loop {
                let s = engine.stats();
                if s.running + s.waiting == 0 || !engine.is_alive() {
                    break;
                }
                if tokio::time::Instant::now() >= deadline {
                    tracing::warn!(running = s.running, waiting = s.waiting, "drain timeout: stopping anyway");
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    };
    // Token messages are small writes: without TCP_NODELAY, Nagle holds them for the peer's ACK.
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls)?;
    }
    let served = builder
        .add_service(health_service)
        .add_service(WorkerServer::new(service))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    watch.abort();
    served
}

/// Health follows the engine's progress: NOT_SERVING while it is stuck in a step, so routers
/// stop sending work (and move what waits for a first token) within about `stuck_after`
/// instead of the whole collective timeout; SERVING again once steps complete (unless draining).
async fn watch_progress(
    progress: Arc<crate::engine::runner::Progress>,
    health: tonic_health::server::HealthReporter,
    stuck_after: std::time::Duration,
    draining: Arc<AtomicBool>,
) {
    let mut stuck = false;
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let now = progress.is_stuck(stuck_after);
        if now == stuck || draining.load(Ordering::Relaxed) {
            continue;
        }
        stuck = now;
        if stuck {
            let secs = progress.running_for().unwrap_or_default().as_secs_f64();
            tracing::warn!(step_secs = secs, "engine step is stuck: health NOT_SERVING");
            health.set_not_serving::<WorkerServer<WorkerService>>().await;
        } else {
            tracing::info!("engine steps again: health SERVING");
            health.set_serving::<WorkerServer<WorkerService>>().await;
        }
    }
}
