//! The engine thread: owns the model, the paged KV store and the scheduler, and runs one
//! continuous-batching step after another. The async side talks to it only through
//! [`EngineHandle`]: commands in over a channel, tokens out over each request's own channel, and a
//! stats snapshot refreshed once per step.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::{DType, D};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::blocks::BlockPool;
use super::graphs::{DecodeGraphs, DEFAULT_BUCKETS};
use super::plan::{Message, StepPlan};
use super::prefix_cache::root_hash;
use super::scheduler::{Planned, Scheduler, SchedulerConfig};
use super::sequence::{Event, FinishReason, Sequence};
use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::generate::GenerateParams;
use crate::kernels::KernelMode;
use crate::model::paged::{KvLayout, PagedKvStore};
use crate::model::{Model, SeqChunk};
use crate::sampling::{Scratch, SeqSampler};

#[derive(Debug, Clone)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    pub num_blocks: usize,
    pub model_name: String,
    /// Step metrics (batch size, step time), when serving.
    pub metrics: Option<Arc<crate::metrics::WorkerMetrics>>,
    /// Replay decode steps from CUDA graphs (see [`super::graphs`]); with fused kernels only.
    pub decode_graphs: bool,
}

/// A request as the engine receives it: already validated by [`EngineHandle::submit`].
pub struct NewRequest {
    pub request_id: String,
    pub prompt: Vec<u32>,
    pub params: GenerateParams,
    pub events: UnboundedSender<Event>,
}

enum Command {
    Submit(Box<NewRequest>),
    Cancel(String),
}

/// What the router's load-aware policies read.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Stats {
    pub running: usize,
    pub waiting: usize,
    /// Blocks no sequence holds (free, or kept only by the prefix cache).
    pub free_blocks: usize,
    pub total_blocks: usize,
    /// Blocks the prefix cache keeps (some may also be in use).
    pub cached_blocks: usize,
    pub prefix_cache_hit_rate: f64,
    /// Generated tokens per second over the last few seconds.
    pub tokens_per_s: f64,
    pub preemptions: u64,
    /// Decode steps run through the CUDA-graph runner's static buffers (replayed on CUDA).
    pub decode_graph_steps: u64,
    /// Cumulative prompt tokens found in / looked up in the prefix cache.
    pub prefix_hit_tokens: u64,
    pub prefix_query_tokens: u64,
    pub model_name: String,
    pub max_context: usize,
}

/// Read-only view of the engine's stats snapshot. Unlike an [`EngineHandle`] it does not keep the
/// engine running (the engine stops when the last handle is dropped).
#[derive(Clone, Default)]
pub struct StatsView(Arc<Mutex<Stats>>);

impl StatsView {
    pub fn get(&self) -> Stats {
        self.0.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Cheap, cloneable access to the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    commands: UnboundedSender<Command>,
    stats: Arc<Mutex<Stats>>,
    config: Arc<ModelConfig>,
    /// Tokens the whole KV cache holds: the longest sequence that can ever be scheduled.
    kv_capacity_tokens: usize,
}

impl EngineHandle {
    pub fn model_config(&self) -> &ModelConfig {
        &self.config
    }

    /// Validates and queues a request; its tokens arrive on `request.events`.
    pub fn submit(&self, request: NewRequest) -> Result<()> {
        request.params.validate(&request.prompt, &self.config)?;
        let total = request.prompt.len() + request.params.max_new_tokens;
        if total > self.kv_capacity_tokens {
            return Err(Error::InvalidInput {
                field: "max_new_tokens",
                message: format!(
                    "prompt + max_new_tokens = {total} tokens exceeds this worker's KV cache ({} tokens)",
                    self.kv_capacity_tokens
                ),
            });
        }
        self.commands.send(Command::Submit(Box::new(request))).map_err(|_| Error::EngineStopped)
    }

    /// Cancels a request by id; unknown ids are ignored (it may have just finished).
    pub fn cancel(&self, request_id: &str) -> Result<()> {
        self.commands.send(Command::Cancel(request_id.to_string())).map_err(|_| Error::EngineStopped)
    }

    pub fn stats(&self) -> Stats {
        self.stats_view().get()
    }

    pub fn stats_view(&self) -> StatsView {
        StatsView(self.stats.clone())
    }

    /// True while the engine thread is running.
    pub fn is_alive(&self) -> bool {
        !self.commands.is_closed()
    }
}

/// Starts the engine thread; it runs until every handle is dropped.
pub fn spawn(model: Model, config: EngineConfig) -> Result<(EngineHandle, JoinHandle<()>)> {
    let sc = &config.scheduler;
    for (field, v) in [
        ("block_size", sc.block_size),
        ("max_batch_tokens", sc.max_batch_tokens),
        ("max_seqs", sc.max_seqs),
        ("num_blocks", config.num_blocks),
    ] {
        if v == 0 {
            return Err(Error::InvalidInput { field, message: "must be at least 1".into() });
        }
    }
    let cfg = model.config().clone();
    let layout = KvLayout {
        num_layers: cfg.num_layers,
        num_kv_heads: model.local_kv_heads(),
        head_dim: cfg.head_dim,
        block_size: config.scheduler.block_size,
        dtype: model.dtype(),
    };
    // One block more than the scheduler hands out: padding rows of graph-replayed steps use it.
    let mut store = PagedKvStore::new(layout, config.num_blocks + 1, model.device())?;
    store.set_kernels(model.kernels());
    tracing::info!(
        blocks = config.num_blocks,
        block_size = layout.block_size,
        mib = (config.num_blocks * layout.block_bytes()) >> 20,
        "KV cache allocated"
    );
    let (tx, rx) = unbounded_channel();
    let stats = Arc::new(Mutex::new(Stats {
        total_blocks: config.num_blocks,
        free_blocks: config.num_blocks,
        model_name: config.model_name.clone(),
        max_context: cfg.max_context(),
        ..Stats::default()
    }));
    let handle = EngineHandle {
        commands: tx,
        stats: stats.clone(),
        kv_capacity_tokens: config.num_blocks * config.scheduler.block_size,
        config: Arc::new(cfg),
    };
    let thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            let mut model = model;
            let graphs = if config.decode_graphs && model.kernels() == KernelMode::Fused {
                let (bs, scratch) = (config.scheduler.block_size, config.num_blocks as u32);
                match DecodeGraphs::new(&mut model, &DEFAULT_BUCKETS, bs, scratch) {
                    Ok(g) => Some(g),
                    Err(e) => {
                        tracing::warn!(error = %e, "decode graphs off");
                        None
                    }
                }
            } else {
                None
            };
            let scheduler = Scheduler::new(config.scheduler, BlockPool::new(config.num_blocks));
            let model_salt = {
                use std::hash::{Hash, Hasher};
                let mut h = rustc_hash::FxHasher::default();
                config.model_name.hash(&mut h);
                h.finish()
            };
            Engine {
                model,
                store,
                graphs,
                decode_graph_steps: 0,
                scheduler,
                commands: rx,
                stats,
                config,
                model_salt,
                next_id: 0,
                scratch: Scratch::default(),
                recent: VecDeque::new(),
                group_broken: false,
            }
            .run()
        })
        .map_err(|e| Error::io("engine thread", e))?;
    Ok((handle, thread))
}

/// How one sampled row's token is chosen.
#[derive(Clone, Copy)]
enum Pick {
    /// Chosen on the device.
    Id(u32),
    /// By the host sampler, from this index of the copied rows.
    Row(usize),
}

struct Engine {
    model: Model,
    store: PagedKvStore,
    /// Decode steps from CUDA graphs, when on.
    graphs: Option<DecodeGraphs>,
    decode_graph_steps: u64,
    scheduler: Scheduler,
    commands: UnboundedReceiver<Command>,
    stats: Arc<Mutex<Stats>>,
    config: EngineConfig,
    model_salt: u64,
    next_id: u64,
    scratch: Scratch,
    /// (when, tokens generated) of recent steps, for tokens/s.
    recent: VecDeque<(Instant, usize)>,
    /// A collective failed: some rank is gone and no further forward can complete.
    group_broken: bool,
}

impl Engine {
    fn run(mut self) {
        loop {
            if self.scheduler.is_idle() {
                self.publish_stats(0);
                // Nothing to do until a request arrives; no handles left means shut down.
                match self.wait_for_command() {
                    Some(c) => self.handle(c),
                    None => {
                        self.tell_followers(&Message::Stop);
                        return;
                    }
                }
            }
            while let Ok(c) = self.commands.try_recv() {
                self.handle(c);
            }
            self.drop_disconnected();
            let plan = self.scheduler.schedule();
            if plan.is_empty() {
                continue;
            }
            let started = Instant::now();
            let generated = self.step(&plan);
            if let Some(m) = &self.config.metrics {
                m.step(plan.len(), started.elapsed().as_secs_f64());
            }
            self.publish_stats(generated);
            if self.group_broken {
                // A rank is gone: this engine can no longer run a forward. Stopping drops the
                // command channel, which the server sees and exits on.
                self.scheduler.remove_where(
                    |_| true,
                    |s| s.finish(FinishReason::Error, Some("a tensor-parallel rank failed".into())),
                );
                return;
            }
        }
    }

    /// The next command. Alone, just waits; in a tensor-parallel group, also sends heartbeats
    /// so idle followers' collectives do not time out.
    fn wait_for_command(&mut self) -> Option<Command> {
        if self.model.comm().world_size() == 1 {
            return self.commands.blocking_recv();
        }
        let beat = self.model.comm().timeout() / 4;
        let mut last = Instant::now();
        loop {
            match self.commands.try_recv() {
                Ok(c) => return Some(c),
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => return None,
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => {
                    if last.elapsed() >= beat {
                        if !self.tell_followers(&Message::Heartbeat) {
                            return None;
                        }
                        last = Instant::now();
                    }
                    std::thread::sleep(Duration::from_millis(2));
                }
            }
        }
    }

    /// Broadcasts `msg` to the other ranks; false (and the group marked broken) on failure.
    fn tell_followers(&mut self, msg: &Message) -> bool {
        if self.model.comm().world_size() == 1 {
            return true;
        }
        match self.model.comm().broadcast_bytes(0, msg.encode()) {
            Ok(_) => true,
            Err(e) => {
                tracing::error!(error = %e, "tensor-parallel group broken");
                self.group_broken = true;
                false
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Submit(req) => {
                let NewRequest { request_id, prompt, params, events } = *req;
                let s = &self.scheduler;
                if s.running.iter().chain(&s.waiting).any(|q| q.request_id == request_id) {
                    // Cancel finds requests by id, so two live requests may not share one.
                    let _ = events.send(Event::Finished {
                        reason: FinishReason::Error,
                        cached_prompt_tokens: 0,
                        message: Some(format!("request_id {request_id:?} is already in use")),
                    });
                    return;
                }
                let rope_alpha = self.model.config().ntk_alpha(prompt.len());
                self.next_id += 1;
                self.scheduler.waiting.push_back(Sequence {
                    id: self.next_id,
                    request_id,
                    prompt_len: prompt.len(),
                    sampler: SeqSampler::new(params.sampling, &prompt),
                    tokens: prompt,
                    computed: 0,
                    blocks: Vec::new(),
                    block_hashes: Vec::new(),
                    root_hash: root_hash(self.model_salt, rope_alpha),
                    rope_alpha,
                    max_new_tokens: params.max_new_tokens,
                    stop_token_ids: params.stop_token_ids,
                    events,
                    arrived: Instant::now(),
                    cached_prompt_tokens: None,
                });
            }
            // Applied at once, in command order: a cancel cannot reach a later request that
            // reuses the id.
            Command::Cancel(id) => {
                self.scheduler.remove_where(|s| s.request_id == id, |s| s.finish(FinishReason::Cancelled, None));
            }
        }
    }

    /// Requests whose client went away leave within one step; dropping them returns their
    /// blocks.
    fn drop_disconnected(&mut self) {
        if self.scheduler.running.iter().chain(&self.scheduler.waiting).any(|s| s.events.is_closed()) {
            self.scheduler.remove_where(|s| s.events.is_closed(), drop);
        }
    }

    /// Runs one forward over `plan`, samples where a sequence's chunk ends its known tokens, and
    /// streams and finishes. Returns how many tokens were generated.
    fn step(&mut self, plan: &[Planned]) -> usize {
        match self.forward_and_sample(plan) {
            Ok(n) => n,
            Err(e) => {
                if e.kind() == crate::error::ErrorKind::Unavailable {
                    self.group_broken = true;
                }
                tracing::error!(error = %e, "step failed; failing its sequences");
                let ids: HashSet<u64> = plan.iter().map(|p| self.scheduler.running[p.index].id).collect();
                let msg = e.to_string();
                self.scheduler
                    .remove_where(|s| ids.contains(&s.id), |s| s.finish(FinishReason::Error, Some(msg.clone())));
                0
            }
        }
    }

    fn forward_and_sample(&mut self, plan: &[Planned]) -> Result<usize> {
        let running = &self.scheduler.running;
        let mut tokens = Vec::with_capacity(plan.iter().map(|p| p.len).sum::<usize>());
        let mut chunks = Vec::with_capacity(plan.len());
        let mut tables = Vec::with_capacity(plan.len());
        for p in plan {
            let s = &running[p.index];
            tokens.extend_from_slice(&s.tokens[s.computed..s.computed + p.len]);
            chunks.push(SeqChunk { seq_id: s.id, context_len: s.computed, len: p.len, rope_alpha: s.rope_alpha });
            tables.push(s.blocks.iter().map(|b| b.id()).collect::<Vec<u32>>());
        }
        let step_plan = StepPlan { tokens, chunks, tables };
        if self.model.comm().world_size() > 1 {
            // Followers run the same forward on their shards; the plan travels first.
            self.model.comm().broadcast_bytes(0, step_plan.encode())?;
        }
        let logits = match self.graphs.as_mut().filter(|g| g.eligible(&self.model, &step_plan.chunks)) {
            Some(graphs) => {
                self.decode_graph_steps += 1;
                let (tokens, chunks, tables) = (&step_plan.tokens, &step_plan.chunks, &step_plan.tables);
                graphs.run(&mut self.model, &mut self.store, tokens, chunks, tables)?
            }
            None => {
                let mut step = self.store.step(&step_plan.chunks, &step_plan.tables)?;
                self.model.forward(&step_plan.tokens, &step_plan.chunks, &mut step)?
            }
        };
        // Rows whose chunk completes the sequence's known tokens produce a token.
        let sampled: Vec<usize> = (0..plan.len())
            .filter(|&k| running[plan[k].index].computed + plan[k].len == running[plan[k].index].tokens.len())
            .collect();
        // Each sampled row is chosen on the device when the fused kernels run and its request
        // needs nothing of the host (so a request's tokens never depend on its batch); the rest
        // go by argmax on the device, or by the host sampler on a copy of just their rows.
        let fused = self.model.kernels() == KernelMode::Fused;
        let (on_device, on_host): (Vec<usize>, Vec<usize>) =
            sampled.iter().partition(|&&k| fused && running[plan[k].index].sampler.params().is_device_samplable());
        let select = |ks: &[usize]| -> Result<candle_core::Tensor> {
            if ks.len() == plan.len() {
                return Ok(logits.clone());
            }
            let idx: Vec<u32> = ks.iter().map(|&k| k as u32).collect();
            Ok(logits.index_select(&candle_core::Tensor::from_vec(idx, ks.len(), logits.device())?, 0)?)
        };
        let mut picks: Vec<Option<Pick>> = vec![None; plan.len()];
        if !on_device.is_empty() {
            let draws: Vec<_> = on_device.iter().map(|&k| running[plan[k].index].sampler.device_draw()).collect();
            let ids = crate::kernels::sample_rows(&select(&on_device)?, &draws)?;
            for (&k, id) in on_device.iter().zip(ids) {
                picks[k] = Some(Pick::Id(id));
            }
        }
        let mut host_rows = Vec::new();
        if !on_host.is_empty() {
            let rows = select(&on_host)?;
            if on_host.iter().all(|&k| running[plan[k].index].sampler.params().is_plain_greedy()) {
                let ids: Vec<u32> = rows.argmax(D::Minus1)?.to_vec1()?;
                for (&k, id) in on_host.iter().zip(ids) {
                    picks[k] = Some(Pick::Id(id));
                }
            } else {
                host_rows = rows.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                for (i, &k) in on_host.iter().enumerate() {
                    picks[k] = Some(Pick::Row(i));
                }
            }
        }

        let max_context = self.model.config().max_context();
        let mut finished = Vec::new();
        for (k, p) in plan.iter().enumerate() {
            let seq = &mut self.scheduler.running[p.index];
            seq.computed += p.len;
            self.scheduler.blocks.register_full_blocks(seq);
            if seq.computed != seq.tokens.len() {
                continue;
            }
            let (token, logprob, top) = match picks[k] {
                Some(Pick::Id(id)) => {
                    seq.sampler.accept(id);
                    (id, f32::NAN, Vec::new())
                }
                Some(Pick::Row(i)) => {
                    let s = seq.sampler.sample(&host_rows[i], &mut self.scratch);
                    (s.token, s.logprob, s.top)
                }
                None => unreachable!("every sampled row has a pick"),
            };
            seq.tokens.push(token);
            let _ = seq.events.send(Event::Token { token, logprob, top });
            let reason = if seq.stop_token_ids.contains(&token) {
                Some(FinishReason::Stop)
            } else if seq.generated() >= seq.max_new_tokens || seq.tokens.len() >= max_context {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(r) = reason {
                finished.push((seq.id, r));
            }
        }
        let generated = sampled.len();
        if !finished.is_empty() {
            self.scheduler.remove_where(
                |s| finished.iter().any(|(id, _)| *id == s.id),
                |s| {
                    let reason = finished.iter().find(|(id, _)| *id == s.id).map_or(FinishReason::Length, |f| f.1);
                    s.finish(reason, None)
                },
            );
        }
        Ok(generated)
    }

    fn publish_stats(&mut self, generated: usize) {
        let now = Instant::now();
        self.recent.push_back((now, generated));
        let window = Duration::from_secs(5);
        while self.recent.front().is_some_and(|(t, _)| now.duration_since(*t) > window) {
            self.recent.pop_front();
        }
        let span = self.recent.front().map_or(0.0, |(t, _)| now.duration_since(*t).as_secs_f64());
        let tokens: usize = self.recent.iter().map(|(_, n)| n).sum();
        let s = &self.scheduler;
        let snapshot = Stats {
            running: s.running.len(),
            waiting: s.waiting.len(),
            free_blocks: s.blocks.available(),
            total_blocks: s.blocks.pool.total(),
            cached_blocks: s.blocks.prefix.len(),
            prefix_cache_hit_rate: s.blocks.prefix.hit_rate(),
            prefix_hit_tokens: s.blocks.prefix.hit_tokens(),
            prefix_query_tokens: s.blocks.prefix.queried_tokens(),
            tokens_per_s: if span > 0.0 { tokens as f64 / span } else { 0.0 },
            preemptions: s.preemptions,
            decode_graph_steps: self.decode_graph_steps,
            model_name: self.config.model_name.clone(),
            max_context: self.model.config().max_context(),
        };
        if let Ok(mut st) = self.stats.lock() {
            *st = snapshot;
        }
    }
}
