//! The worker groups the router can use. Membership comes from etcd or `--worker` flags
//! ([`Pool::sync`]); a health loop probes every group (gRPC health, then Stats, then Info once
//! per model) so routing sees which groups are up, how loaded they are and what they serve.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use qwen_proto::worker::worker_client::WorkerClient;
use qwen_proto::worker::{InfoRequest, StatsRequest};
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::breaker::{Breaker, BreakerConfig, BreakerState};
use crate::error::{Result, RouterError};
use crate::models::{LocalTokenizer, ModelInfo};
use crate::policy::{Candidate, Load, Policy, RouteRequest};

/// The gRPC health service name the worker reports on; NOT_SERVING while it drains.
pub const WORKER_SERVICE: &str = "qwen.worker.v1.Worker";

#[derive(Debug, Clone)]
pub struct PoolConfig {
    /// Mutual TLS to the workers (`https://` to every address); `None`: plain HTTP/2.
    pub worker_tls: Option<tonic::transport::ClientTlsConfig>,
    pub health_interval: Duration,
    /// Per probe RPC.
    pub health_timeout: Duration,
    /// Consecutive failed probes before a group leaves routing.
    pub unhealthy_after: u32,
    pub breaker: BreakerConfig,
    /// `--tool-parser` / `--reasoning-parser`: what each model's chat answers are parsed for.
    pub formats: crate::agent::FormatFlags,
}

/// A member as discovery reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub group: String,
    pub addr: String,
}

pub struct Group {
    pub name: Arc<str>,
    pub addr: String,
    /// Shared with every group at the same address.
    channel: Channel,
    client: WorkerClient<Channel>,
    health: HealthClient<Channel>,
    healthy: AtomicBool,
    failed_probes: AtomicU32,
    in_flight: AtomicUsize,
    running: AtomicU32,
    waiting: AtomicU32,
    model: RwLock<Option<String>>,
    pub breaker: Breaker,
}

/// Counts a request against its group while it lives.
pub struct InFlight(Arc<Group>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A (lazy) channel to `addr`, over TLS when `tls` is set.
fn channel(member: &Member, tls: Option<&tonic::transport::ClientTlsConfig>) -> Result<Channel> {
    let bad = |e: tonic::transport::Error| {
        RouterError::Internal(format!("group {}: address {}: {e}", member.group, member.addr))
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", member.addr))
        .map_err(bad)?
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true);
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.clone()).map_err(bad)?;
    }
    Ok(endpoint.connect_lazy())
}

impl Group {
    fn new(member: &Member, channel: Channel, breaker: BreakerConfig) -> Self {
        Group {
            name: member.group.as_str().into(),
            addr: member.addr.clone(),
            client: WorkerClient::new(channel.clone()),
            health: HealthClient::new(channel.clone()),
            channel,
            healthy: AtomicBool::new(false),
            failed_probes: AtomicU32::new(0),
            in_flight: AtomicUsize::new(0),
            running: AtomicU32::new(0),
            waiting: AtomicU32::new(0),
            model: RwLock::new(None),
            breaker: Breaker::new(breaker),
        }
    }

    pub fn client(&self) -> WorkerClient<Channel> {
        self.client.clone()
    }

    pub fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    pub fn model(&self) -> Option<String> {
        self.model.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn load(&self) -> Load {
        Load {
            in_flight: self.in_flight.load(Ordering::Relaxed),
            running: self.running.load(Ordering::Relaxed),
            waiting: self.waiting.load(Ordering::Relaxed),
        }
    }

    pub fn breaker_state(&self) -> BreakerState {
        self.breaker.state()
    }
}

pub struct Pool {
    cfg: PoolConfig,
    /// `--tokenizer NAME=DIR`: models whose tokenizer and template come from a local directory.
    local_tokenizers: HashMap<String, LocalTokenizer>,
    groups: RwLock<BTreeMap<Arc<str>, Arc<Group>>>,
    models: RwLock<HashMap<String, Arc<ModelInfo>>>,
    policy: Box<dyn Policy>,
    /// Held while a model's Info is fetched: a model first seen on many groups at once is
    /// learnt from one of them (Info carries megabytes of tokenizer).
    learning: tokio::sync::Mutex<()>,
}

impl Pool {
    pub fn new(cfg: PoolConfig, policy: Box<dyn Policy>, local_tokenizers: HashMap<String, LocalTokenizer>) -> Self {
        Pool {
            cfg,
            local_tokenizers,
            groups: RwLock::default(),
            models: RwLock::default(),
            policy,
            learning: tokio::sync::Mutex::new(()),
        }
    }

    fn groups(&self) -> Vec<Arc<Group>> {
        self.groups.read().unwrap_or_else(|p| p.into_inner()).values().cloned().collect()
    }

    /// Makes the pool's membership `members`: new groups join (unhealthy until their first probe
    /// answers), missing ones leave, a group whose address changed is replaced. Returns the groups
    /// that joined, so the caller can probe them at once.
    pub fn sync(&self, members: &[Member]) -> Vec<Arc<Group>> {
        let mut groups = self.groups.write().unwrap_or_else(|p| p.into_inner());
        let wanted: HashMap<&str, &Member> = members.iter().map(|m| (m.group.as_str(), m)).collect();
        let gone: Vec<Arc<str>> = groups
            .iter()
            .filter(|(name, g)| wanted.get(name.as_ref()).is_none_or(|m| m.addr != g.addr))
            .map(|(name, _)| name.clone())
            .collect();
        for name in gone {
            groups.remove(&name);
            self.policy.remove_group(&name);
            tracing::info!(group = %name, "group left the pool");
        }
        // Groups at one address share one connection (one open file, however many groups).
        let mut channels: HashMap<String, Channel> =
            groups.values().map(|g| (g.addr.clone(), g.channel.clone())).collect();
        let mut joined = Vec::new();
        for m in members {
            if groups.contains_key(m.group.as_str()) {
                continue;
            }
            let shared = match channels.get(&m.addr) {
                Some(c) => Ok(c.clone()),
                None => channel(m, self.cfg.worker_tls.as_ref()).inspect(|c| {
                    channels.insert(m.addr.clone(), c.clone());
                }),
            };
            match shared.map(|c| Group::new(m, c, self.cfg.breaker)) {
                Ok(g) => {
                    let g = Arc::new(g);
                    tracing::info!(group = %m.group, addr = %m.addr, "group joined the pool");
                    groups.insert(g.name.clone(), g.clone());
                    joined.push(g);
                }
                Err(e) => tracing::warn!(group = %m.group, error = %e, "ignoring group"),
            }
        }
        joined
    }

    /// The model's tokenizer and limits, once some group serving it has answered Info.
    pub fn model(&self, name: &str) -> Result<Arc<ModelInfo>> {
        if name.is_empty() {
            return Err(RouterError::invalid("model", "must not be empty"));
        }
        self.models
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| RouterError::UnknownModel(crate::error::echo(name)))
    }

    /// Models with at least one healthy group, with that count.
    pub fn models(&self) -> Vec<(Arc<ModelInfo>, usize)> {
        let groups = self.groups();
        let models = self.models.read().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<_> = models
            .values()
            .map(|m| {
                let n = groups.iter().filter(|g| g.is_healthy() && g.model().as_deref() == Some(&m.name)).count();
                (m.clone(), n)
            })
            .filter(|(_, n)| *n > 0)
            .collect();
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        out
    }

    /// Every group, for status and metrics.
    pub fn snapshot(&self) -> Vec<Arc<Group>> {
        self.groups()
    }

    /// A group for `model` by the policy, among the healthy ones whose breaker lets a request
    /// through, skipping groups this request already tried.
    pub fn pick(&self, model: &str, request: &RouteRequest<'_>, tried: &[Arc<str>]) -> Result<Arc<Group>> {
        let now = Instant::now();
        let mut eligible: Vec<Arc<Group>> = self
            .groups()
            .into_iter()
            .filter(|g| g.is_healthy() && g.model().as_deref() == Some(model) && !tried.contains(&g.name))
            .filter(|g| g.breaker.allows(now))
            .collect();
        while !eligible.is_empty() {
            let candidates: Vec<Candidate> =
                eligible.iter().map(|g| Candidate { group: g.name.clone(), load: g.load() }).collect();
            let i = self.policy.pick(request, &candidates).min(eligible.len() - 1);
            let g = eligible.swap_remove(i);
            // A half-open breaker admits one trial; a group that lost that race is skipped.
            if g.breaker.try_pass(now) {
                return Ok(g);
            }
        }
        Err(RouterError::NoGroup(model.to_string()))
    }

    /// Probes every group once (concurrently).
    pub async fn probe_all(self: &Arc<Self>) {
        let probes = self.groups().into_iter().map(|g| {
            let pool = self.clone();
            async move { pool.probe(&g).await }
        });
        futures::future::join_all(probes).await;
    }

    /// Health, then Stats; Info the first time a model is seen.
    pub async fn probe(&self, g: &Arc<Group>) {
        let timeout = self.cfg.health_timeout;
        let ok = match self.try_probe(g, timeout).await {
            Ok(()) => true,
            Err(reason) => {
                tracing::debug!(group = %g.name, %reason, "probe failed");
                false
            }
        };
        if ok {
            g.failed_probes.store(0, Ordering::Relaxed);
            if !g.healthy.swap(true, Ordering::Relaxed) {
                tracing::info!(group = %g.name, "group healthy");
            }
        } else {
            let failed = g.failed_probes.fetch_add(1, Ordering::Relaxed) + 1;
            if failed >= self.cfg.unhealthy_after && g.healthy.swap(false, Ordering::Relaxed) {
                tracing::warn!(group = %g.name, failed, "group unhealthy: out of routing");
            }
        }
    }

    async fn try_probe(&self, g: &Arc<Group>, timeout: Duration) -> std::result::Result<(), String> {
        let mut health = g.health.clone();
        let check = tokio::time::timeout(timeout, health.check(HealthCheckRequest { service: WORKER_SERVICE.into() }))
            .await
            .map_err(|_| "health check timed out".to_string())?
            .map_err(|s| format!("health: {}", s.message()))?;
        if check.into_inner().status != ServingStatus::Serving as i32 {
            return Err("not serving (draining?)".into());
        }
        let mut client = g.client();
        let stats = tokio::time::timeout(timeout, client.stats(StatsRequest {}))
            .await
            .map_err(|_| "stats timed out".to_string())?
            .map_err(|s| format!("stats: {}", s.message()))?
            .into_inner();
        g.running.store(stats.running, Ordering::Relaxed);
        g.waiting.store(stats.waiting, Ordering::Relaxed);
        let learnt =
            |pool: &Self| pool.models.read().unwrap_or_else(|p| p.into_inner()).get(&stats.model_name).cloned();
        if let Some(model) = learnt(self) {
            // Known from another group: the same name must mean the same tokenizer and limits.
            if !model.digest.is_empty() && model.digest != stats.info_digest {
                return Err(format!(
                    "serves model {:?} with other weights' tokenizer, template or limits than its other groups",
                    stats.model_name
                ));
            }
        }
        let known = |pool: &Self| learnt(pool).is_some();
        // One Info per model: the rest wait for it, then find the model known.
        let _learning = if known(self) { None } else { Some(self.learning.lock().await) };
        if !known(self) {
            let info = tokio::time::timeout(timeout * 10, client.info(InfoRequest {}))
                .await
                .map_err(|_| "info timed out".to_string())?
                .map_err(|s| format!("info: {}", s.message()))?
                .into_inner();
            let local = self.local_tokenizers.get(&info.model_name);
            let model = ModelInfo::from_info(&info, local, self.cfg.formats).map_err(|e| e.to_string())?;
            tracing::info!(group = %g.name, model = %model.name, "learnt model");
            self.models.write().unwrap_or_else(|p| p.into_inner()).insert(model.name.clone(), Arc::new(model));
        }
        *g.model.write().unwrap_or_else(|p| p.into_inner()) = Some(stats.model_name);
        Ok(())
    }

    /// Probes every `health_interval` until `cancel`.
    pub fn spawn_health(self: &Arc<Self>, cancel: CancellationToken) -> tokio::task::JoinHandle<()> {
        let pool = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(pool.cfg.health_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tick.tick() => pool.probe_all().await,
                }
            }
        })
    }
}
