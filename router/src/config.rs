//! Router flags (clap, each with an environment variable), validated once into [`RouterConfig`].

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use qwen_tls::{CertFiles, ClientTls};

use crate::admission::AdmissionConfig;
use crate::breaker::BreakerConfig;
use crate::generate::GenerateConfig;
use crate::policy::{CacheAwareConfig, PolicyConfig, PolicyKind};
use crate::pool::{Member, PoolConfig};

#[derive(Parser, Debug)]
#[command(name = "qwen-router", about = "qwen-serve router: public gRPC and OpenAI-compatible HTTP")]
pub struct RouterArgs {
    /// Public gRPC address (port 0: pick a free port; the bound address is printed).
    #[arg(long, env = "QWEN_ROUTER_GRPC_LISTEN", default_value = "127.0.0.1:50050")]
    pub grpc_listen: SocketAddr,
    /// OpenAI-compatible HTTP address.
    #[arg(long, env = "QWEN_ROUTER_HTTP_LISTEN", default_value = "127.0.0.1:8000")]
    pub http_listen: SocketAddr,
    /// A worker group's gRPC address (repeatable); static membership without etcd.
    #[arg(long = "worker", env = "QWEN_ROUTER_WORKERS", value_delimiter = ',')]
    pub workers: Vec<String>,
    /// etcd to discover worker groups in (endpoints, TLS, user).
    #[command(flatten)]
    pub etcd: qwen_cluster::EtcdArgs,
    /// A model's tokenizer and chat template from a local directory instead of from its workers
    /// (`NAME=DIR`, repeatable; DIR holds tokenizer.json or qwen.tiktoken, and optionally
    /// tokenizer_config.json).
    #[arg(long = "tokenizer", env = "QWEN_ROUTER_TOKENIZERS", value_delimiter = ',')]
    pub tokenizers: Vec<String>,
    /// Re-list the membership this often even when the watch is healthy.
    #[arg(long, env = "QWEN_ROUTER_RELIST_SECS", default_value_t = 30)]
    pub relist_secs: u64,
    #[arg(long, env = "QWEN_ROUTER_POLICY", value_enum, default_value = "cache-aware")]
    pub policy: PolicyKind,
    /// Cache-aware: route to the longest prefix match when it covers at least this share of the prompt.
    #[arg(long, env = "QWEN_ROUTER_CACHE_THRESHOLD", default_value_t = 0.5)]
    pub cache_threshold: f64,
    /// Cache-aware: load is imbalanced when max - min exceeds this ...
    #[arg(long, env = "QWEN_ROUTER_BALANCE_ABS", default_value_t = 32)]
    pub balance_abs_threshold: usize,
    /// ... and max exceeds min times this.
    #[arg(long, env = "QWEN_ROUTER_BALANCE_REL", default_value_t = 1.5)]
    pub balance_rel_threshold: f64,
    /// Cache-aware: hard memory bound of the prefix tree, in bytes.
    #[arg(long, env = "QWEN_ROUTER_CACHE_TREE_BYTES", default_value_t = 64 << 20)]
    pub cache_tree_bytes: usize,
    /// Session affinity: a group takes a key while its load is at most this times the average.
    #[arg(long, env = "QWEN_ROUTER_SESSION_LOAD_FACTOR", default_value_t = 1.25)]
    pub session_load_factor: f64,
    /// Groups tried for a request that has not produced a token yet.
    #[arg(long, env = "QWEN_ROUTER_MAX_ATTEMPTS", default_value_t = 3)]
    pub max_attempts: usize,
    /// Requests running at once through this router.
    #[arg(long, env = "QWEN_ROUTER_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub max_in_flight: usize,
    /// Requests waiting for a slot before new ones get RESOURCE_EXHAUSTED / 429.
    #[arg(long, env = "QWEN_ROUTER_MAX_QUEUED", default_value_t = 1024)]
    pub max_queued: usize,
    #[arg(long, env = "QWEN_ROUTER_HEALTH_INTERVAL_MS", default_value_t = 1000)]
    pub health_interval_ms: u64,
    /// Failed probes in a row before a group leaves routing.
    #[arg(long, env = "QWEN_ROUTER_UNHEALTHY_AFTER", default_value_t = 2)]
    pub unhealthy_after: u32,
    /// Failed requests in a row that open a group's circuit breaker.
    #[arg(long, env = "QWEN_ROUTER_BREAKER_FAILURES", default_value_t = 5)]
    pub breaker_failures: u32,
    #[arg(long, env = "QWEN_ROUTER_BREAKER_COOLDOWN_MS", default_value_t = 10_000)]
    pub breaker_cooldown_ms: u64,
    /// Log lines as text or JSON (one object per line) on stderr.
    #[arg(long, env = "QWEN_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: qwen_telemetry::LogFormat,
    /// Export spans over OTLP/gRPC to this collector (e.g. http://otel-collector:4317).
    #[arg(long, env = "QWEN_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// Largest HTTP request body accepted.
    #[arg(long, env = "QWEN_ROUTER_MAX_BODY_BYTES", default_value_t = 4 << 20)]
    pub max_body_bytes: usize,
    /// Longest wait for a request's first token on one group before it moves to another (or
    /// fails UNAVAILABLE). Generous: a long prompt on a large model prefills for minutes.
    #[arg(long, env = "QWEN_ROUTER_FIRST_TOKEN_TIMEOUT_SECS", default_value_t = 600)]
    pub first_token_timeout_secs: u64,
    /// Longest gap between two tokens of a stream before it ends UNAVAILABLE (a frozen worker).
    #[arg(long, env = "QWEN_ROUTER_INTER_TOKEN_TIMEOUT_SECS", default_value_t = 120)]
    pub inter_token_timeout_secs: u64,
    /// Name the serving worker group in an `x-qwen-serve-group` response header (debugging);
    /// off by default, as group names are internal.
    #[arg(long, env = "QWEN_ROUTER_EXPOSE_GROUP")]
    pub expose_group: bool,
    /// Tool-call markup parsed out of chat answers: `auto` (what the model's chat template
    /// renders, ReAct for the original Qwen-Chat), `none`, `hermes` (Qwen2.5/Qwen3's
    /// `<tool_call>` JSON), `qwen3-coder` (`<function=...><parameter=...>`) or `react`.
    #[arg(long, env = "QWEN_ROUTER_TOOL_PARSER", value_enum, default_value = "auto")]
    pub tool_parser: ToolParserArg,
    /// Reasoning markup split into `reasoning_content`: `auto` (from the template), `none`, or
    /// `qwen3` (`<think>...</think>`).
    #[arg(long, env = "QWEN_ROUTER_REASONING_PARSER", value_enum, default_value = "auto")]
    pub reasoning_parser: ReasoningParserArg,
    /// Open connections per public port; one more is refused at once (HTTP 503, gRPC closed).
    /// 0: half of what the open-file limit leaves after 256 for the router's own use.
    #[arg(long, env = "QWEN_ROUTER_MAX_CONNECTIONS", default_value_t = 0)]
    pub max_connections: usize,
    /// HTTP/1 request heads must arrive within this; idle keep-alive connections close after it.
    #[arg(long, env = "QWEN_ROUTER_HEADER_READ_TIMEOUT_SECS", default_value_t = 30)]
    pub header_read_timeout_secs: u64,
    /// A request body must arrive within this (408 otherwise).
    #[arg(long, env = "QWEN_ROUTER_BODY_READ_TIMEOUT_SECS", default_value_t = 30)]
    pub body_read_timeout_secs: u64,
    /// HTTP/2 keep-alive ping interval on both ports; a peer that misses a pong is dropped.
    #[arg(long, env = "QWEN_ROUTER_KEEPALIVE_SECS", default_value_t = 30)]
    pub keepalive_secs: u64,
    /// Require an API key on both public APIs: the file holds `NAME KEY [limits]` lines (see
    /// docs/security.md); re-read on SIGHUP or when it changes. Without it the APIs are open.
    #[arg(long, env = "QWEN_ROUTER_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Requests per minute per key where its line sets none (0: unlimited).
    #[arg(long, env = "QWEN_ROUTER_KEY_REQUESTS_PER_MINUTE", default_value_t = 0)]
    pub key_requests_per_minute: u32,
    /// Tokens (prompt plus max_tokens) per minute per key where its line sets none (0: unlimited).
    #[arg(long, env = "QWEN_ROUTER_KEY_TOKENS_PER_MINUTE", default_value_t = 0)]
    pub key_tokens_per_minute: u32,
    /// Serve /metrics without an API key (for a Prometheus that cannot send one).
    #[arg(long, env = "QWEN_ROUTER_METRICS_WITHOUT_KEY")]
    pub metrics_without_key: bool,
    /// Serve health (HTTP /health, grpc.health.v1) without an API key (for load balancer and
    /// Kubernetes probes).
    #[arg(long, env = "QWEN_ROUTER_HEALTH_WITHOUT_KEY")]
    pub health_without_key: bool,
    /// TLS on both public ports: the certificate chain (PEM); re-read on SIGHUP or change.
    #[arg(long, env = "QWEN_ROUTER_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// The certificate's private key (PEM).
    #[arg(long, env = "QWEN_ROUTER_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Mutual TLS to the workers: the CA that signed their certificates ...
    #[arg(long, env = "QWEN_ROUTER_WORKER_TLS_CA")]
    pub worker_tls_ca: Option<PathBuf>,
    /// ... and the router's client certificate and key, which the workers check.
    #[arg(long, env = "QWEN_ROUTER_WORKER_TLS_CERT")]
    pub worker_tls_cert: Option<PathBuf>,
    #[arg(long, env = "QWEN_ROUTER_WORKER_TLS_KEY")]
    pub worker_tls_key: Option<PathBuf>,
    /// The name to expect in workers' certificates (default: the host of each worker's address).
    #[arg(long, env = "QWEN_ROUTER_WORKER_TLS_SERVER_NAME")]
    pub worker_tls_server_name: Option<String>,
    /// How often the key file and certificates are checked for changes.
    #[arg(long, env = "QWEN_ROUTER_RELOAD_CHECK_SECS", default_value_t = 10)]
    pub reload_check_secs: u64,
}

pub enum Discovery {
    Static(Vec<Member>),
    Etcd { etcd: qwen_cluster::Etcd, relist_every: Duration },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ToolParserArg {
    Auto,
    None,
    Hermes,
    Qwen3Coder,
    React,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ReasoningParserArg {
    Auto,
    None,
    Qwen3,
}

fn format_flags(tools: ToolParserArg, reasoning: ReasoningParserArg) -> crate::agent::FormatFlags {
    use crate::agent::{Choice, ReasoningFormat, ToolFormat};
    crate::agent::FormatFlags {
        tools: match tools {
            ToolParserArg::Auto => Choice::Auto,
            ToolParserArg::None => Choice::Off,
            ToolParserArg::Hermes => Choice::Use(ToolFormat::Hermes),
            ToolParserArg::Qwen3Coder => Choice::Use(ToolFormat::Qwen3Coder),
            ToolParserArg::React => Choice::Use(ToolFormat::React),
        },
        reasoning: match reasoning {
            ReasoningParserArg::Auto => Choice::Auto,
            ReasoningParserArg::None => Choice::Off,
            ReasoningParserArg::Qwen3 => Choice::Use(ReasoningFormat::Qwen3),
        },
    }
}

pub struct RouterConfig {
    /// `--tokenizer NAME=DIR`, loaded.
    pub local_tokenizers: std::collections::HashMap<String, crate::models::LocalTokenizer>,
    pub grpc_listen: SocketAddr,
    pub http_listen: SocketAddr,
    pub discovery: Discovery,
    pub policy: PolicyConfig,
    pub pool: PoolConfig,
    pub generate: GenerateConfig,
    pub max_body_bytes: usize,
    pub conn: crate::conn::ConnConfig,
    pub security: Security,
}

/// Keys and certificates, checked.
#[derive(Debug, Clone, Default)]
pub struct Security {
    pub auth: Option<crate::auth::AuthConfig>,
    /// The public ports' certificate.
    pub tls: Option<CertFiles>,
    /// Mutual TLS to the workers.
    pub workers: Option<ClientTls>,
    pub reload_every: Duration,
}

impl RouterArgs {
    pub fn validate(self) -> Result<RouterConfig, String> {
        let security = self.security()?;
        let etcd = self.etcd.clone().validate()?;
        let discovery = match (self.workers.is_empty(), etcd.is_none()) {
            (true, true) => {
                return Err("give --worker ADDR (repeatable) or --etcd ENDPOINTS to find worker groups".into())
            }
            (false, false) => {
                return Err("--worker and --etcd exclude each other: pick static or etcd membership".into())
            }
            (false, true) => {
                let mut members = Vec::new();
                for addr in &self.workers {
                    if addr.parse::<SocketAddr>().is_err() && !addr.contains(':') {
                        return Err(format!("--worker {addr:?}: expected host:port"));
                    }
                    members.push(Member { group: addr.clone(), addr: addr.clone() });
                }
                Discovery::Static(members)
            }
            (true, false) => {
                if self.relist_secs == 0 {
                    return Err("--relist-secs: must be at least 1".into());
                }
                let etcd = etcd.unwrap_or_default();
                Discovery::Etcd { etcd, relist_every: Duration::from_secs(self.relist_secs) }
            }
        };
        if !(0.0..=1.0).contains(&self.cache_threshold) {
            return Err(format!("--cache-threshold {}: must be in [0, 1]", self.cache_threshold));
        }
        if self.balance_rel_threshold < 1.0 {
            return Err(format!("--balance-rel-threshold {}: must be at least 1", self.balance_rel_threshold));
        }
        if self.session_load_factor < 1.0 {
            return Err(format!("--session-load-factor {}: must be at least 1", self.session_load_factor));
        }
        if self.cache_tree_bytes < 4096 {
            return Err(format!("--cache-tree-bytes {}: must be at least 4096", self.cache_tree_bytes));
        }
        for (flag, v) in [
            ("--max-attempts", self.max_attempts as u64),
            ("--max-in-flight", self.max_in_flight as u64),
            ("--health-interval-ms", self.health_interval_ms),
            ("--unhealthy-after", self.unhealthy_after as u64),
            ("--breaker-failures", self.breaker_failures as u64),
            ("--max-body-bytes", self.max_body_bytes as u64),
            ("--first-token-timeout-secs", self.first_token_timeout_secs),
            ("--header-read-timeout-secs", self.header_read_timeout_secs),
            ("--body-read-timeout-secs", self.body_read_timeout_secs),
            ("--keepalive-secs", self.keepalive_secs),
            ("--inter-token-timeout-secs", self.inter_token_timeout_secs),
        ] {
            if v == 0 {
                return Err(format!("{flag}: must be at least 1"));
            }
        }
        let mut local_tokenizers = std::collections::HashMap::new();
        for spec in &self.tokenizers {
            let Some((name, dir)) = spec.split_once('=') else {
                return Err(format!("--tokenizer {spec:?}: expected NAME=DIR"));
            };
            // Loaded here, once: a bad directory stops the router at start, naming the file.
            let local = crate::models::LocalTokenizer::from_dir(std::path::Path::new(dir))
                .map_err(|e| format!("--tokenizer {spec}: {e}"))?;
            local_tokenizers.insert(name.to_string(), local);
        }
        let health_interval = Duration::from_millis(self.health_interval_ms);
        Ok(RouterConfig {
            local_tokenizers,
            grpc_listen: self.grpc_listen,
            http_listen: self.http_listen,
            discovery,
            policy: PolicyConfig {
                kind: self.policy,
                cache: CacheAwareConfig {
                    cache_threshold: self.cache_threshold,
                    balance_abs_threshold: self.balance_abs_threshold,
                    balance_rel_threshold: self.balance_rel_threshold,
                    max_tree_bytes: self.cache_tree_bytes,
                },
                session_load_factor: self.session_load_factor,
            },
            pool: PoolConfig {
                worker_tls: security.workers.as_ref().map(ClientTls::tonic).transpose().map_err(|e| e.to_string())?,
                health_interval,
                health_timeout: health_interval.clamp(Duration::from_millis(200), Duration::from_secs(2)),
                unhealthy_after: self.unhealthy_after,
                breaker: BreakerConfig {
                    failures: self.breaker_failures,
                    cooldown: Duration::from_millis(self.breaker_cooldown_ms),
                },
                formats: format_flags(self.tool_parser, self.reasoning_parser),
            },
            generate: GenerateConfig {
                max_attempts: self.max_attempts,
                first_token_timeout: Duration::from_secs(self.first_token_timeout_secs),
                inter_token_timeout: Duration::from_secs(self.inter_token_timeout_secs),
                expose_group: self.expose_group,
                admission: AdmissionConfig {
                    max_in_flight: self.max_in_flight,
                    max_queued: self.max_queued,
                    retry_after: Duration::from_secs(1),
                },
            },
            max_body_bytes: self.max_body_bytes,
            conn: crate::conn::ConnConfig {
                max_connections: crate::conn::ConnConfig::auto_max_connections(self.max_connections),
                header_read_timeout: Duration::from_secs(self.header_read_timeout_secs),
                body_read_timeout: Duration::from_secs(self.body_read_timeout_secs),
                keepalive_interval: Duration::from_secs(self.keepalive_secs),
            },
            security,
        })
    }

    fn security(&self) -> Result<Security, String> {
        if self.reload_check_secs == 0 {
            return Err("--reload-check-secs: must be at least 1".into());
        }
        let auth = self.api_key_file.clone().map(|key_file| crate::auth::AuthConfig {
            key_file,
            defaults: crate::auth::KeyLimits {
                requests_per_minute: NonZeroU32::new(self.key_requests_per_minute),
                tokens_per_minute: NonZeroU32::new(self.key_tokens_per_minute),
            },
            open_metrics: self.metrics_without_key,
            open_health: self.health_without_key,
        });
        if auth.is_none() && (self.metrics_without_key || self.health_without_key) {
            return Err("--metrics-without-key / --health-without-key: only meaningful with --api-key-file".into());
        }
        let tls = CertFiles::from_flags(self.tls_cert.clone(), self.tls_key.clone(), ("--tls-cert", "--tls-key"))
            .map_err(|e| e.to_string())?;
        let identity = CertFiles::from_flags(
            self.worker_tls_cert.clone(),
            self.worker_tls_key.clone(),
            ("--worker-tls-cert", "--worker-tls-key"),
        )
        .map_err(|e| e.to_string())?;
        let workers = match (&self.worker_tls_ca, identity) {
            (Some(ca), identity) => {
                Some(ClientTls { ca: ca.clone(), identity, server_name: self.worker_tls_server_name.clone() })
            }
            (None, None) if self.worker_tls_server_name.is_none() => None,
            (None, _) => return Err("--worker-tls-cert/--worker-tls-server-name: need --worker-tls-ca".into()),
        };
        Ok(Security { auth, tls, workers, reload_every: Duration::from_secs(self.reload_check_secs) })
    }
}
