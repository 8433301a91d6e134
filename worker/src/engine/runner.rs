//! The engine thread: owns the model, the paged KV store and the scheduler, and runs one
//! continuous-batching step after another. The async side talks to it only through
//! [`EngineHandle`]: commands in over a channel, tokens out over each request's own channel, and a
//! stats snapshot refreshed once per step.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor, D};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver, UnboundedSender};

use super::blocks::BlockPool;
use super::graphs::{DecodeGraphs, DEFAULT_BUCKETS};
use super::plan::{Message, StepPlan};
use super::prefix_cache::root_hash;
use super::scheduler::{Planned, Scheduler, SchedulerConfig};
pub use super::sequence::NewRequest;
use super::sequence::{Event, FinishReason, KvKey, Sequence};
use crate::error::{Error, Result};
use crate::kernels::KernelMode;
use crate::model::paged::{KvLayout, PagedKvStore};
use crate::model::{Model, SeqChunk};
use crate::sampling::Scratch;
use llguidance::toktrie::SimpleVob;

/// Told of every engine step (the worker's metrics implement it).
pub trait StepObserver: Send + Sync {
    /// A step over `seqs` sequences took `secs`.
    fn step(&self, seqs: usize, secs: f64);
}

#[derive(Clone)]
pub struct EngineConfig {
    pub scheduler: SchedulerConfig,
    pub num_blocks: usize,
    pub model_name: String,
    /// Told of each step (batch size, step time), when serving.
    pub observer: Option<Arc<dyn StepObserver>>,
    /// Replay decode steps from CUDA graphs (see [`super::graphs`]); with fused kernels only.
    pub decode_graphs: bool,
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
    /// Decode steps whose logits came from a CUDA graph launch.
    pub graph_replays: u64,
    /// Decode steps run eagerly from the graph runner's static buffers (off CUDA, or where a
    /// capture failed or differed from the eager step).
    pub graph_eager_steps: u64,
    /// Cumulative prompt tokens found in / looked up in the prefix cache.
    pub prefix_hit_tokens: u64,
    pub prefix_query_tokens: u64,
    pub model_name: String,
    pub max_context: usize,
    /// MoE models: tokens routed to each expert so far, summed over layers.
    pub expert_tokens: Vec<u64>,
}

/// Whether the engine is getting on with its work, lock-free: when the running step began, and
/// how long steps take. A step that runs far longer than any recent one (a rank stopped, a
/// device hung) means the engine is stuck, which health checks report.
pub struct Progress {
    base: Instant,
    /// Milliseconds since `base` at the start of the running step, +1; 0 between steps.
    step_started: AtomicU64,
    /// The longest recent step, in milliseconds (decays by 1 % a step).
    longest_step_ms: AtomicU64,
}

impl Progress {
    fn new() -> Self {
        Progress { base: Instant::now(), step_started: AtomicU64::new(0), longest_step_ms: AtomicU64::new(0) }
    }

    fn begin(&self) {
        let now = self.base.elapsed().as_millis() as u64 + 1;
        self.step_started.store(now, Ordering::Relaxed);
    }

    fn end(&self, took: Duration) {
        self.step_started.store(0, Ordering::Relaxed);
        let ms = took.as_millis() as u64;
        let decayed = self.longest_step_ms.load(Ordering::Relaxed) * 99 / 100;
        self.longest_step_ms.store(decayed.max(ms), Ordering::Relaxed);
    }

    /// How long the running step has taken so far; `None` between steps.
    pub fn running_for(&self) -> Option<Duration> {
        match self.step_started.load(Ordering::Relaxed) {
            0 => None,
            started => Some(self.base.elapsed().saturating_sub(Duration::from_millis(started - 1))),
        }
    }

    /// Whether the running step has gone on past `floor` and four times the longest recent step.
    pub fn is_stuck(&self, floor: Duration) -> bool {
        let limit = floor.max(Duration::from_millis(4 * self.longest_step_ms.load(Ordering::Relaxed)));
        self.running_for().is_some_and(|d| d > limit)
    }
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
    progress: Arc<Progress>,
    config: Arc<crate::config::ModelConfig>,
    /// Tokens the whole KV cache holds: the longest sequence that can ever be scheduled.
    kv_capacity_tokens: usize,
}

impl EngineHandle {
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

    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    /// True while the engine thread is running.
    pub fn is_alive(&self) -> bool {
        !self.commands.is_closed()
    }
}

/// Starts the engine thread; it runs until every handle is dropped, and then hands its model
/// back through the join handle (a benchmark runs the same weights through a second engine).
pub fn spawn(model: Model, config: EngineConfig) -> Result<(EngineHandle, JoinHandle<Model>)> {
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
    let layout = KvLayout::for_model(&model, config.scheduler.block_size);
    // One block more than the scheduler hands out: padding rows of graph-replayed steps use it.
    let mut store = PagedKvStore::new(layout, config.num_blocks + 1, model.device())?;
    store.set_kernels(model.kernels());
    // Weights and cache were made on this thread; the engine thread uses them next. The device
    // has one stream for every thread (see DeviceSpec::open), so stream order already keeps them
    // in order: this wait makes it explicit, once, before any step.
    model.device().synchronize()?;
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
    let progress = Arc::new(Progress::new());
    let handle = EngineHandle {
        commands: tx,
        stats: stats.clone(),
        progress: progress.clone(),
        kv_capacity_tokens: config.num_blocks * config.scheduler.block_size,
        config: Arc::new(cfg),
    };
    let thread = std::thread::Builder::new()
        .name("engine".into())
        .spawn(move || {
            let mut model = model;
            let mut store = store;
            let graphs = if config.decode_graphs && model.kernels() == KernelMode::Fused {
                start_graphs(&mut model, &mut store, &config)
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
                scheduler,
                commands: rx,
                stats,
                progress,
                config,
                model_salt,
                next_id: 0,
                scratch: Scratch::default(),
                mask_scratch: Vec::new(),
                recent: VecDeque::new(),
                group_broken: false,
            }
            .run()
        })
        .map_err(|e| Error::io("engine thread", e))?;
    Ok((handle, thread))
}

/// The decode-graph runner, with every batch bucket captured up front on CUDA (a capture costs
/// several eager steps; paying it at start keeps it out of the first requests' latency).
fn start_graphs(model: &mut Model, store: &mut PagedKvStore, config: &EngineConfig) -> Option<DecodeGraphs> {
    let largest = DEFAULT_BUCKETS[DEFAULT_BUCKETS.len() - 1];
    if model.device().is_cuda() && !crate::model::moe::fused_covers(model.config(), largest) {
        // The grouped MoE path reads expert ids on the host, which a graph cannot capture.
        tracing::info!("mixture-of-experts layers beyond the fused kernel: decode steps run eagerly (no CUDA graphs)");
        return None;
    }
    let (bs, scratch) = (config.scheduler.block_size, config.num_blocks as u32);
    let mut graphs = match DecodeGraphs::new(model, &DEFAULT_BUCKETS, bs, scratch) {
        Ok(g) => g,
        Err(e) => {
            tracing::warn!(error = %e, "decode graphs off");
            return None;
        }
    };
    if model.device().is_cuda() {
        let started = Instant::now();
        match graphs.warm_up(model, store) {
            Ok(n) => tracing::info!(
                captured = n,
                buckets = DEFAULT_BUCKETS.len(),
                ms = started.elapsed().as_millis() as u64,
                "decode graphs captured"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "decode graph warm-up failed; decode graphs off");
                return None;
            }
        }
    }
    Some(graphs)
}

/// How one sampled row's token is chosen.
#[derive(Clone, Copy)]
enum Pick {
    /// Chosen on the device.
    Id(u32),
    /// By the host sampler, from this index of the copied rows.
    Row(usize),
}

/// A step's choices: per planned row, its pick (`None` where the chunk samples nothing).
struct Picks {
    rows: Vec<Option<Pick>>,
    /// The rows the host sampler reads, copied from the device.
    host_rows: Vec<Vec<f32>>,
    /// Rows whose grammar failed before sampling, with why: their sequences end in an error.
    failed: Vec<(usize, String)>,
}

/// Per planned row, the tokens its grammar allows (`None` where unconstrained or not sampling).
type RowMasks = Vec<Option<Result<SimpleVob>>>;

struct Engine {
    model: Model,
    store: PagedKvStore,
    /// Decode steps from CUDA graphs, when on.
    graphs: Option<DecodeGraphs>,
    scheduler: Scheduler,
    commands: UnboundedReceiver<Command>,
    stats: Arc<Mutex<Stats>>,
    progress: Arc<Progress>,
    config: EngineConfig,
    model_salt: u64,
    next_id: u64,
    scratch: Scratch,
    /// Expanded token masks of constrained rows, reused across steps.
    mask_scratch: Vec<u8>,
    /// (when, tokens generated) of recent steps, for tokens/s.
    recent: VecDeque<(Instant, usize)>,
    /// A collective failed: some rank is gone and no further forward can complete.
    group_broken: bool,
}

impl Engine {
    fn run(mut self) -> Model {
        loop {
            if self.scheduler.is_idle() {
                self.publish_stats(0);
                // Nothing to do until a request arrives; no handles left means shut down.
                match self.wait_for_command() {
                    Some(c) => self.handle(c),
                    None => {
                        self.tell_followers(&Message::Stop);
                        return self.model;
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
            self.progress.begin();
            let generated = self.step(&plan);
            self.progress.end(started.elapsed());
            if let Some(o) = &self.config.observer {
                o.step(plan.len(), started.elapsed().as_secs_f64());
            }
            self.publish_stats(generated);
            if self.group_broken {
                // A rank is gone: this engine can no longer run a forward. Stopping drops the
                // command channel, which the server sees and exits on.
                self.scheduler.remove_where(
                    |_| true,
                    |s| s.finish(FinishReason::Error, Some("a tensor-parallel rank failed".into())),
                );
                return self.model;
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
                if self.scheduler.sequences().any(|q| q.request_id == req.request_id) {
                    // Cancel finds requests by id, so two live requests may not share one.
                    let _ = req.events.send(Event::Finished {
                        reason: FinishReason::Error,
                        cached_prompt_tokens: 0,
                        message: Some(format!("request_id {:?} is already in use", req.request_id)),
                    });
                    return;
                }
                let rope_alpha = self.model.config().ntk_alpha(req.prompt.len());
                let kv = KvKey { root_hash: root_hash(self.model_salt, rope_alpha), rope_alpha };
                self.next_id += 1;
                self.scheduler.enqueue(Sequence::new(self.next_id, *req, kv));
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
        if self.scheduler.sequences().any(|s| s.events.is_closed()) {
            self.scheduler.remove_where(|s| s.events.is_closed(), drop);
        }
    }

    /// Runs one forward over `plan`, samples where a sequence's chunk ends its known tokens, and
    /// streams and finishes. Returns how many tokens were generated.
    fn step(&mut self, plan: &[Planned]) -> usize {
        let result = self.forward(plan).and_then(|(logits, masks)| {
            let picks = self.pick_tokens(plan, &logits, masks)?;
            Ok(self.advance(plan, picks))
        });
        match result {
            Ok(n) => n,
            Err(e) => {
                if e.kind() == crate::error::ErrorKind::Unavailable {
                    self.group_broken = true;
                }
                tracing::error!(error = %e, "step failed; failing its sequences");
                let ids: HashSet<u64> = plan.iter().map(|p| self.scheduler.running()[p.index].id).collect();
                let msg = e.to_string();
                self.scheduler
                    .remove_where(|s| ids.contains(&s.id), |s| s.finish(FinishReason::Error, Some(msg.clone())));
                0
            }
        }
    }

    /// The step's logits, one row per planned sequence, and the grammar masks of its constrained
    /// rows, computed on another thread while the forward runs. In a tensor-parallel group the
    /// batch goes to the followers first.
    fn forward(&mut self, plan: &[Planned]) -> Result<(Tensor, RowMasks)> {
        let running = self.scheduler.running();
        let mut tokens = Vec::with_capacity(plan.iter().map(|p| p.len).sum::<usize>());
        let mut chunks = Vec::with_capacity(plan.len());
        let mut tables = Vec::with_capacity(plan.len());
        let mut row_of = vec![None; running.len()];
        for (k, p) in plan.iter().enumerate() {
            let s = &running[p.index];
            tokens.extend_from_slice(&s.tokens[s.computed..s.computed + p.len]);
            chunks.push(SeqChunk { seq_id: s.id, context_len: s.computed, len: p.len, rope_alpha: s.rope_alpha });
            tables.push(s.blocks.iter().map(|b| b.id()).collect::<Vec<u32>>());
            if s.samples_after(p.len) {
                row_of[p.index] = Some(k);
            }
        }
        let batch = StepPlan { tokens, chunks, tables };
        if self.model.comm().world_size() > 1 {
            // Followers run the same forward on their shards; the plan travels first.
            self.model.comm().broadcast_bytes(0, batch.encode())?;
        }
        let Engine { model, store, graphs, scheduler, .. } = self;
        let wanted: Vec<_> = scheduler.constraints_mut().filter_map(|(i, c)| row_of[i].map(|k| (k, c))).collect();
        let mut masks: RowMasks = (0..plan.len()).map(|_| None).collect();
        if wanted.is_empty() {
            return Ok((run_forward(model, store, graphs.as_mut(), &batch)?, masks));
        }
        let logits = std::thread::scope(|scope| {
            let masker = scope.spawn(move || wanted.into_iter().map(|(k, c)| (k, c.allowed())).collect::<Vec<_>>());
            let logits = run_forward(model, store, graphs.as_mut(), &batch);
            let computed = masker
                .join()
                .map_err(|_| Error::Internal { what: "grammar masks", message: "the mask thread panicked".into() })?;
            for (k, m) in computed {
                masks[k] = Some(m);
            }
            logits
        })?;
        Ok((logits, masks))
    }

    /// A token for each row whose chunk completes its sequence's known tokens. A row is chosen
    /// on the device when the fused kernels run and its request needs nothing of the host (so
    /// a request's tokens never depend on its batch); the rest go by argmax on the device, or by
    /// the host sampler on a copy of just their rows. Constrained rows are masked first, where
    /// they are sampled.
    fn pick_tokens(&mut self, plan: &[Planned], logits: &Tensor, masks: RowMasks) -> Result<Picks> {
        let mut scratch = std::mem::take(&mut self.mask_scratch);
        let result = self.pick_tokens_with(plan, logits, masks, &mut scratch);
        self.mask_scratch = scratch;
        result
    }

    fn pick_tokens_with(
        &self,
        plan: &[Planned],
        logits: &Tensor,
        masks: RowMasks,
        mask_scratch: &mut Vec<u8>,
    ) -> Result<Picks> {
        let running = self.scheduler.running();
        let mut picks = Picks { rows: vec![None; plan.len()], host_rows: Vec::new(), failed: Vec::new() };
        let mut allowed: Vec<Option<SimpleVob>> = Vec::with_capacity(plan.len());
        let mut sampled = Vec::new();
        for (k, mask) in masks.into_iter().enumerate() {
            let p = plan[k];
            match &mask {
                Some(Err(e)) => picks.failed.push((k, e.to_string())),
                _ if !running[p.index].samples_after(p.len) => {}
                _ => sampled.push(k),
            }
            allowed.push(mask.and_then(Result::ok));
        }
        let fused = self.model.kernels() == KernelMode::Fused;
        let (on_device, on_host): (Vec<usize>, Vec<usize>) =
            sampled.iter().partition(|&&k| fused && running[plan[k].index].sampler.params().is_device_samplable());
        let select = |ks: &[usize]| -> Result<Tensor> {
            if ks.len() == plan.len() {
                return Ok(logits.clone());
            }
            let idx: Vec<u32> = ks.iter().map(|&k| k as u32).collect();
            Ok(logits.index_select(&Tensor::from_vec(idx, ks.len(), logits.device())?, 0)?)
        };
        let (masked, free): (Vec<usize>, Vec<usize>) = on_device.iter().partition(|&&k| allowed[k].is_some());
        for ks in [free, masked] {
            if ks.is_empty() {
                continue;
            }
            let mut rows = select(&ks)?;
            if allowed[ks[0]].is_some() {
                let m: Vec<&SimpleVob> = ks.iter().filter_map(|&k| allowed[k].as_ref()).collect();
                rows = crate::constraint::mask_rows(&rows, &m, mask_scratch)?;
            }
            let draws: Vec<_> = ks.iter().map(|&k| running[plan[k].index].sampler.device_draw()).collect();
            let ids = crate::kernels::sample_rows(&rows, &draws)?;
            for (&k, id) in ks.iter().zip(ids) {
                picks.rows[k] = Some(Pick::Id(id));
            }
        }
        if !on_host.is_empty() {
            let rows = select(&on_host)?;
            let plain = |k: usize| running[plan[k].index].sampler.params().is_plain_greedy() && allowed[k].is_none();
            if on_host.iter().all(|&k| plain(k)) {
                let ids: Vec<u32> = rows.argmax(D::Minus1)?.to_vec1()?;
                for (&k, id) in on_host.iter().zip(ids) {
                    picks.rows[k] = Some(Pick::Id(id));
                }
            } else {
                picks.host_rows = rows.to_dtype(DType::F32)?.to_vec2::<f32>()?;
                for (i, &k) in on_host.iter().enumerate() {
                    if let Some(mask) = &allowed[k] {
                        crate::constraint::mask_host_row(mask, &mut picks.host_rows[i]);
                    }
                    picks.rows[k] = Some(Pick::Row(i));
                }
            }
        }
        Ok(picks)
    }

    /// Moves every planned sequence past its chunk, streams the picked tokens and finishes the
    /// sequences that are done. Returns how many tokens were generated.
    fn advance(&mut self, plan: &[Planned], picks: Picks) -> usize {
        let max_context = self.model.config().max_context();
        let mut finished: Vec<(u64, FinishReason, Option<String>)> = Vec::new();
        let mut generated = 0;
        for (k, (p, pick)) in plan.iter().zip(picks.rows).enumerate() {
            let seq = self.scheduler.advance(p.index, p.len);
            if let Some((_, why)) = picks.failed.iter().find(|(row, _)| *row == k) {
                finished.push((seq.id, FinishReason::Error, Some(why.clone())));
                continue;
            }
            let Some(pick) = pick else { continue };
            let (token, logprob, top) = match pick {
                Pick::Id(id) => {
                    seq.sampler.accept(id);
                    (id, None, Vec::new())
                }
                Pick::Row(i) => {
                    let s = seq.sampler.sample(&picks.host_rows[i], &mut self.scratch);
                    (s.token, s.logprob, s.top)
                }
            };
            generated += 1;
            // The grammar sees the token first; a complete grammar ends the output.
            let grammar = seq.constraint.as_mut().map(|c| c.consume(token)).transpose();
            let reason = seq.push_token(token, logprob, top, max_context);
            match grammar {
                Err(e) => finished.push((seq.id, FinishReason::Error, Some(e.to_string()))),
                Ok(done) => {
                    if let Some(reason) = reason.or((done == Some(true)).then_some(FinishReason::Stop)) {
                        finished.push((seq.id, reason, None));
                    }
                }
            }
        }
        if !finished.is_empty() {
            self.scheduler.remove_where(
                |s| finished.iter().any(|(id, ..)| *id == s.id),
                |s| match finished.iter().find(|(id, ..)| *id == s.id) {
                    Some((_, reason, message)) => s.finish(*reason, message.clone()),
                    None => s.finish(FinishReason::Length, None),
                },
            );
        }
        generated
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
        let graphs = self.graphs.as_ref().map(DecodeGraphs::counts).unwrap_or_default();
        let blocks = s.blocks();
        let snapshot = Stats {
            running: s.running().len(),
            waiting: s.waiting_len(),
            free_blocks: blocks.available(),
            total_blocks: blocks.pool.total(),
            cached_blocks: blocks.prefix.len(),
            prefix_cache_hit_rate: blocks.prefix.hit_rate(),
            prefix_hit_tokens: blocks.prefix.hit_tokens(),
            prefix_query_tokens: blocks.prefix.queried_tokens(),
            tokens_per_s: if span > 0.0 { tokens as f64 / span } else { 0.0 },
            preemptions: s.preemptions(),
            graph_replays: graphs.replays,
            graph_eager_steps: graphs.eager_steps,
            model_name: self.config.model_name.clone(),
            max_context: self.model.config().max_context(),
            expert_tokens: self.model.expert_load().map(|l| collected(&l)).unwrap_or_default(),
        };
        if let Ok(mut st) = self.stats.lock() {
            *st = snapshot;
        }
    }
}

/// One forward over `batch`: replayed from a decode graph where eligible.
fn run_forward(
    model: &mut Model,
    store: &mut PagedKvStore,
    graphs: Option<&mut DecodeGraphs>,
    batch: &StepPlan,
) -> Result<Tensor> {
    match graphs.filter(|g| g.eligible(model, &batch.chunks)) {
        Some(graphs) => graphs.run(model, store, &batch.tokens, &batch.chunks, &batch.tables),
        None => {
            let mut step = store.step(&batch.chunks, &batch.tables)?;
            model.forward(&batch.tokens, &batch.chunks, &mut step)
        }
    }
}

/// The per-expert totals with the fused path's device counts folded in.
fn collected(load: &crate::model::moe::ExpertLoad) -> Vec<u64> {
    if let Err(e) = load.collect() {
        tracing::warn!(error = %e, "expert load: device counts unread");
    }
    load.snapshot()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_far_longer_than_recent_ones_is_stuck() {
        let p = Progress::new();
        assert!(!p.is_stuck(Duration::ZERO) && p.running_for().is_none());
        p.end(Duration::from_millis(5));
        p.begin();
        std::thread::sleep(Duration::from_millis(30));
        assert!(p.is_stuck(Duration::from_millis(10)), "30 ms > max(10 ms, 4 x 5 ms)");
        assert!(!p.is_stuck(Duration::from_secs(1)));
        p.end(Duration::from_millis(30));
        assert!(!p.is_stuck(Duration::ZERO), "between steps nothing is stuck");
    }
}
