//! Every metric the worker exports, named here and nowhere else. Prefix `qwen_serve_worker_`,
//! label `model` on all. Per-token latencies go into lock-free histograms; engine gauges and
//! cumulative counters are copied from the engine's stats snapshot when Prometheus scrapes.

use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use qwen_telemetry::exposition::{render, Scrape};
use qwen_telemetry::histogram::latency_buckets;
use qwen_telemetry::AtomicHistogram;

use crate::engine::runner::{Stats, StatsView, StepObserver};
use crate::generate::FinishReason;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ExpertLabels {
    /// The expert's index (bounded by the model's `num_experts`).
    pub expert: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// length, stop, cancelled, error
    pub outcome: &'static str,
}

pub struct WorkerMetrics {
    registry: Registry,
    requests: Family<OutcomeLabels, Counter>,
    ttft: AtomicHistogram,
    itl: AtomicHistogram,
    e2e: AtomicHistogram,
    prompt_tokens: Counter,
    generation_tokens: Counter,
    batch_size: AtomicHistogram,
    step: AtomicHistogram,
    grammar_compile: AtomicHistogram,
    running: Gauge,
    waiting: Gauge,
    kv_used: Gauge,
    kv_total: Gauge,
    kv_cached: Gauge,
    prefix_hit_tokens: Counter,
    prefix_query_tokens: Counter,
    preemptions: Counter,
    graph_replays: Counter,
    graph_eager_steps: Counter,
    registered: Gauge<i64, AtomicI64>,
    expert_tokens: Family<ExpertLabels, Counter>,
    /// Expert counts already exported.
    experts_exported: Mutex<Vec<u64>>,
    /// Engine counters already exported, to turn cumulative snapshots into increments.
    exported: Mutex<[u64; 5]>,
    stats: Mutex<Option<StatsView>>,
}

fn outcome(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::Stop => "stop",
        FinishReason::Cancelled => "cancelled",
        FinishReason::Error => "error",
    }
}

impl WorkerMetrics {
    pub fn new(model: &str) -> Arc<Self> {
        let mut registry = Registry::with_prefix_and_labels(
            "qwen_serve_worker",
            [(std::borrow::Cow::Borrowed("model"), std::borrow::Cow::Owned(qwen_telemetry::exposition::label(model)))]
                .into_iter(),
        );
        let m = WorkerMetrics {
            requests: Family::default(),
            ttft: AtomicHistogram::new(latency_buckets()),
            itl: AtomicHistogram::new(latency_buckets()),
            e2e: AtomicHistogram::new(latency_buckets()),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            batch_size: AtomicHistogram::new([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0]),
            step: AtomicHistogram::new(latency_buckets()),
            grammar_compile: AtomicHistogram::new(latency_buckets()),
            running: Gauge::default(),
            waiting: Gauge::default(),
            kv_used: Gauge::default(),
            kv_total: Gauge::default(),
            kv_cached: Gauge::default(),
            prefix_hit_tokens: Counter::default(),
            prefix_query_tokens: Counter::default(),
            preemptions: Counter::default(),
            graph_replays: Counter::default(),
            graph_eager_steps: Counter::default(),
            registered: Gauge::default(),
            expert_tokens: Family::default(),
            experts_exported: Mutex::new(Vec::new()),
            exported: Mutex::new([0; 5]),
            stats: Mutex::new(None),
            registry: Registry::default(),
        };
        registry.register("requests", "Requests finished, by outcome", m.requests.clone());
        registry.register("time_to_first_token_seconds", "Time from arrival to the first token", m.ttft.clone());
        registry.register("inter_token_latency_seconds", "Time between consecutive tokens", m.itl.clone());
        registry.register("request_duration_seconds", "Time from arrival to the last token", m.e2e.clone());
        registry.register("prompt_tokens", "Prompt tokens of finished requests", m.prompt_tokens.clone());
        registry.register("generation_tokens", "Generated tokens", m.generation_tokens.clone());
        registry.register("batch_size", "Sequences per engine step", m.batch_size.clone());
        registry.register("step_duration_seconds", "Engine step time (forward and sampling)", m.step.clone());
        let compile = "Structured outputs: time to compile a request's grammar";
        registry.register("grammar_compile_seconds", compile, m.grammar_compile.clone());
        registry.register("sequences_running", "Sequences in the running batch", m.running.clone());
        registry.register("sequences_waiting", "Sequences waiting to start", m.waiting.clone());
        registry.register("kv_blocks_used", "KV-cache blocks held by sequences", m.kv_used.clone());
        registry.register("kv_blocks_capacity", "KV-cache blocks in all", m.kv_total.clone());
        registry.register("kv_blocks_cached", "KV-cache blocks kept by the prefix cache", m.kv_cached.clone());
        registry.register(
            "prefix_cache_hit_tokens",
            "Prompt tokens found in the prefix cache",
            m.prefix_hit_tokens.clone(),
        );
        registry.register(
            "prefix_cache_query_tokens",
            "Prompt tokens looked up in the prefix cache",
            m.prefix_query_tokens.clone(),
        );
        registry.register("preemptions", "Sequences preempted for KV space", m.preemptions.clone());
        registry.register("decode_graph_replays", "Decode steps replayed from a CUDA graph", m.graph_replays.clone());
        let eager = "Decode steps run eagerly from the CUDA-graph buffers (no graph for them, or no GPU)";
        registry.register("decode_graph_eager_steps", eager, m.graph_eager_steps.clone());
        let experts = "MoE models: tokens routed to each expert (summed over layers)";
        registry.register("moe_expert_tokens", experts, m.expert_tokens.clone());
        registry.register("etcd_registered", "1 while the group's record is in etcd", m.registered.clone());
        Arc::new(WorkerMetrics { registry, ..m })
    }

    /// Scrapes read the engine's stats from here.
    pub fn attach(&self, stats: StatsView) {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = Some(stats);
    }

    pub fn first_token(&self, secs: f64) {
        self.ttft.observe(secs);
    }

    pub fn grammar_compiled(&self, secs: f64) {
        self.grammar_compile.observe(secs);
    }

    pub fn next_token(&self, gap_secs: f64) {
        self.itl.observe(gap_secs);
    }

    pub fn finished(&self, reason: FinishReason, secs: f64, prompt_tokens: u64, generated: u64) {
        self.requests.get_or_create(&OutcomeLabels { outcome: outcome(reason) }).inc();
        self.e2e.observe(secs);
        self.prompt_tokens.inc_by(prompt_tokens);
        self.generation_tokens.inc_by(generated);
    }

    pub fn set_registered(&self, yes: bool) {
        self.registered.set(i64::from(yes));
    }

    fn refresh(&self, s: &Stats) {
        self.running.set(s.running as i64);
        self.waiting.set(s.waiting as i64);
        self.kv_total.set(s.total_blocks as i64);
        self.kv_used.set(s.total_blocks.saturating_sub(s.free_blocks) as i64);
        self.kv_cached.set(s.cached_blocks as i64);
        let mut last = self.exported.lock().unwrap_or_else(|p| p.into_inner());
        let now = [s.prefix_hit_tokens, s.prefix_query_tokens, s.preemptions, s.graph_replays, s.graph_eager_steps];
        let counters = [
            &self.prefix_hit_tokens,
            &self.prefix_query_tokens,
            &self.preemptions,
            &self.graph_replays,
            &self.graph_eager_steps,
        ];
        for ((counter, now), last) in counters.into_iter().zip(now).zip(last.iter()) {
            counter.inc_by(now.saturating_sub(*last));
        }
        *last = now;
        let mut experts = self.experts_exported.lock().unwrap_or_else(|p| p.into_inner());
        experts.resize(s.expert_tokens.len(), 0);
        for (e, (now, last)) in s.expert_tokens.iter().zip(experts.iter_mut()).enumerate() {
            self.expert_tokens.get_or_create(&ExpertLabels { expert: e.to_string() }).inc_by(now.saturating_sub(*last));
            *last = *now;
        }
    }
}

impl StepObserver for WorkerMetrics {
    fn step(&self, seqs: usize, secs: f64) {
        self.batch_size.observe(seqs as f64);
        self.step.observe(secs);
    }
}

impl std::fmt::Debug for WorkerMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WorkerMetrics")
    }
}

impl Scrape for WorkerMetrics {
    fn render(&self) -> String {
        let engine = self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(stats) = engine {
            self.refresh(&stats.get());
        }
        render(&self.registry)
    }
}
