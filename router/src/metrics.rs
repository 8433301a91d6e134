//! Every metric the router exports, named here and nowhere else (prefix `qwen_serve_router_`).
//! Per-token histograms are lock-free and looked up once per request, never per token.

use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use qwen_telemetry::exposition::{label, render};
use qwen_telemetry::histogram::latency_buckets;
use qwen_telemetry::AtomicHistogram;

use crate::admission::Admission;
use crate::error::RouterError;
use crate::pool::Pool;

/// Which front-end call a request came through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Api {
    GrpcGenerate,
    GrpcChat,
    HttpCompletions,
    HttpChat,
}

impl Api {
    pub fn as_str(self) -> &'static str {
        match self {
            Api::GrpcGenerate => "grpc_generate",
            Api::GrpcChat => "grpc_chat",
            Api::HttpCompletions => "http_completions",
            Api::HttpChat => "http_chat",
        }
    }
}

/// The `model` label of a request whose model is not served: client-chosen names never become
/// label values (they are unbounded).
pub const UNKNOWN_MODEL: &str = "unknown";

/// A public port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Port {
    Grpc,
    Http,
}

impl Port {
    pub fn as_str(self) -> &'static str {
        match self {
            Port::Grpc => "grpc",
            Port::Http => "http",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PortLabels {
    pub port: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KeyLabels {
    /// The key's name from the key file (never the key; at most `auth::MAX_KEYS` of them).
    pub key: String,
    /// admitted, rate_limited or too_large.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeniedLabels {
    pub port: &'static str,
    /// missing or invalid.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// A served model's name, or [`UNKNOWN_MODEL`].
    pub model: String,
    pub api: &'static str,
    /// ok, cancelled (client went away), or the error kind.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ModelLabels {
    pub model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct GroupLabels {
    pub group: String,
}

type Histograms = Family<ModelLabels, AtomicHistogram, fn() -> AtomicHistogram>;

fn latency() -> AtomicHistogram {
    AtomicHistogram::new(latency_buckets())
}

pub struct RouterMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    ttft: Histograms,
    itl: Histograms,
    e2e: Histograms,
    queue: AtomicHistogram,
    prompt_tokens: Family<ModelLabels, Counter>,
    generation_tokens: Family<ModelLabels, Counter>,
    retries: Counter,
    routed: Family<GroupLabels, Counter>,
    in_flight: Gauge,
    queued: Gauge,
    group_healthy: Family<GroupLabels, Gauge>,
    group_in_flight: Family<GroupLabels, Gauge>,
    group_breaker_open: Family<GroupLabels, Gauge>,
    etcd_connected: Gauge<i64, AtomicI64>,
    connections_open: Family<PortLabels, Gauge>,
    connections_refused: Family<PortLabels, Counter>,
    key_requests: Family<KeyLabels, Counter>,
    auth_denied: Family<DeniedLabels, Counter>,
    auth_reloads: Family<OutcomeLabels, Counter>,
    /// Groups with a `group_routed_requests` series, so a group's series leaves with it.
    routed_groups: std::sync::Mutex<std::collections::HashSet<String>>,
}

/// One request's latency handles, fetched once.
pub struct RequestTimers {
    pub ttft: AtomicHistogram,
    pub itl: AtomicHistogram,
    pub e2e: AtomicHistogram,
}

impl RouterMetrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("qwen_serve_router");
        let m = RouterMetrics {
            requests: Family::default(),
            ttft: Family::new_with_constructor(latency),
            itl: Family::new_with_constructor(latency),
            e2e: Family::new_with_constructor(latency),
            queue: latency(),
            prompt_tokens: Family::default(),
            generation_tokens: Family::default(),
            retries: Counter::default(),
            routed: Family::default(),
            in_flight: Gauge::default(),
            queued: Gauge::default(),
            group_healthy: Family::default(),
            group_in_flight: Family::default(),
            group_breaker_open: Family::default(),
            etcd_connected: Gauge::default(),
            connections_open: Family::default(),
            connections_refused: Family::default(),
            key_requests: Family::default(),
            auth_denied: Family::default(),
            auth_reloads: Family::default(),
            routed_groups: Default::default(),
            registry: Registry::default(),
        };
        registry.register("requests", "Requests by model, API and outcome", m.requests.clone());
        registry.register("time_to_first_token_seconds", "Arrival to first token", m.ttft.clone());
        registry.register("inter_token_latency_seconds", "Time between tokens streamed out", m.itl.clone());
        registry.register("request_duration_seconds", "Arrival to the end of the response", m.e2e.clone());
        registry.register("queue_duration_seconds", "Time waiting for an admission slot", m.queue.clone());
        registry.register("prompt_tokens", "Prompt tokens of routed requests", m.prompt_tokens.clone());
        registry.register("generation_tokens", "Tokens streamed to clients", m.generation_tokens.clone());
        registry.register("retries", "Attempts moved to another group before the first token", m.retries.clone());
        registry.register("group_routed_requests", "Attempts sent to each group", m.routed.clone());
        registry.register("requests_in_flight", "Requests holding an admission slot", m.in_flight.clone());
        registry.register("connections_open", "Open client connections per public port", m.connections_open.clone());
        let refused = "Connections closed at once: the port had --max-connections open";
        registry.register("connections_refused", refused, m.connections_refused.clone());
        registry.register("requests_queued", "Requests waiting for an admission slot", m.queued.clone());
        registry.register("group_healthy", "1 when the group passes health checks", m.group_healthy.clone());
        registry.register("group_in_flight", "Requests the router has open on the group", m.group_in_flight.clone());
        registry.register(
            "group_breaker_open",
            "1 while the group's circuit breaker is open or half-open",
            m.group_breaker_open.clone(),
        );
        registry.register("key_requests", "Requests per API key name and outcome", m.key_requests.clone());
        registry.register("auth_denied", "Requests refused for a missing or invalid API key", m.auth_denied.clone());
        let reloads = "Reloads of the key file and TLS certificates (ok or failed)";
        registry.register("credential_reloads", reloads, m.auth_reloads.clone());
        registry.register("etcd_connected", "1 while membership is watched live (static: 0)", m.etcd_connected.clone());
        Arc::new(RouterMetrics { registry, ..m })
    }

    pub fn timers(&self, model: &str) -> RequestTimers {
        let l = ModelLabels { model: label(model) };
        RequestTimers {
            ttft: self.ttft.get_or_create(&l).clone(),
            itl: self.itl.get_or_create(&l).clone(),
            e2e: self.e2e.get_or_create(&l).clone(),
        }
    }

    pub fn queued_for(&self, secs: f64) {
        self.queue.observe(secs);
    }

    pub fn routed(&self, group: &str) {
        let group = label(group);
        self.routed.get_or_create(&GroupLabels { group: group.clone() }).inc();
        self.routed_groups.lock().unwrap_or_else(|p| p.into_inner()).insert(group);
    }

    pub fn connection_opened(&self, port: Port) {
        self.connections_open.get_or_create(&PortLabels { port: port.as_str() }).inc();
    }

    pub fn connection_closed(&self, port: Port) {
        self.connections_open.get_or_create(&PortLabels { port: port.as_str() }).dec();
    }

    pub fn connection_refused(&self, port: Port) {
        self.connections_refused.get_or_create(&PortLabels { port: port.as_str() }).inc();
    }

    pub fn key_request(&self, key: &str, outcome: &'static str) {
        self.key_requests.get_or_create(&KeyLabels { key: label(key), outcome }).inc();
    }

    pub fn auth_denied(&self, port: Port, reason: &'static str) {
        self.auth_denied.get_or_create(&DeniedLabels { port: port.as_str(), reason }).inc();
    }

    pub fn credentials_reloaded(&self, ok: bool) {
        self.auth_reloads.get_or_create(&OutcomeLabels { outcome: if ok { "ok" } else { "failed" } }).inc();
    }

    pub fn retried(&self) {
        self.retries.inc();
    }

    pub fn tokens(&self, model: &str, prompt: u64, generated: u64) {
        let l = ModelLabels { model: label(model) };
        self.prompt_tokens.get_or_create(&l).inc_by(prompt);
        self.generation_tokens.get_or_create(&l).inc_by(generated);
    }

    /// A request ended: `Ok(true)` complete, `Ok(false)` the client left first. `model` is the
    /// served model's name; `None` where the request named none that is served.
    pub fn request(&self, model: Option<&str>, api: Api, result: Result<bool, &RouterError>) {
        let outcome = match result {
            Ok(true) => "ok",
            Ok(false) => "cancelled",
            Err(e) => e.kind().as_str(),
        };
        let model = model.map_or_else(|| UNKNOWN_MODEL.to_string(), label);
        self.requests.get_or_create(&RequestLabels { model, api: api.as_str(), outcome }).inc();
    }

    pub fn set_etcd_connected(&self, yes: bool) {
        self.etcd_connected.set(i64::from(yes));
    }

    /// Gauges read from the live state, just before a scrape renders them.
    pub fn refresh(&self, admission: &Admission, pool: &Pool) {
        self.in_flight.set(admission.in_flight() as i64);
        self.queued.set(admission.queued() as i64);
        self.group_healthy.clear();
        self.group_in_flight.clear();
        self.group_breaker_open.clear();
        let groups = pool.snapshot();
        let current: std::collections::HashSet<String> = groups.iter().map(|g| label(&g.name)).collect();
        self.routed_groups.lock().unwrap_or_else(|p| p.into_inner()).retain(|g| {
            let keep = current.contains(g);
            if !keep {
                self.routed.remove(&GroupLabels { group: g.clone() });
            }
            keep
        });
        for g in groups {
            let l = GroupLabels { group: label(&g.name) };
            self.group_healthy.get_or_create(&l).set(i64::from(g.is_healthy()));
            self.group_in_flight.get_or_create(&l).set(g.load().in_flight as i64);
            let open = g.breaker_state() != crate::breaker::BreakerState::Closed;
            self.group_breaker_open.get_or_create(&l).set(i64::from(open));
        }
    }

    /// The exposition text of every metric.
    pub fn render(&self) -> String {
        render(&self.registry)
    }
}
