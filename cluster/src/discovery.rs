//! Worker discovery. Each serving group registers one leased record under the workers prefix
//! ([`Registration`]); the router follows all of them as a map ([`Membership`]). Both are
//! background tasks built to outlive etcd: a registration re-registers itself after any loss,
//! a membership keeps serving the last map it saw, and both retry forever with capped backoff,
//! because a worker or router that stopped over an etcd outage would turn a control-plane
//! blip into a serving outage.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, LeaseKeepAliveStream, LeaseKeeper, PutOptions, WatchOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::access::{Etcd, Timeouts};
use crate::keys::{self, GroupName};
use crate::{ClusterError, Result};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Bounds every call we wait on. The client's own request timeout does not cover waiting for a
/// usable endpoint, so with etcd down a call could otherwise wait forever.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a stopping worker tries to revoke its lease before leaving it to expire.
const REVOKE_TIMEOUT: Duration = Duration::from_secs(2);
/// HTTP/2 pings on open streams find a dead connection that would never error by itself (a
/// partitioned etcd). etcd refuses pings more often than every 5 s by default.
const PING_INTERVAL: Duration = Duration::from_secs(10);
const PING_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Floor for caller-given periods: a zero period would spin (and panics in `tokio::time`).
const MIN_PERIOD: Duration = Duration::from_millis(100);

/// How the router reaches a serving group; stored as JSON under [`keys::worker`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerRecord {
    /// The group's name; must match the key it is stored under.
    pub group: String,
    /// `host:port` of rank 0's gRPC service.
    pub grpc_addr: String,
    pub model: String,
    /// Tensor-parallel degree: how many ranks serve as this one worker.
    pub tp: u32,
}

/// Registered workers by group name.
pub type Workers = BTreeMap<String, WorkerRecord>;

#[derive(Debug, Clone)]
pub struct RegistrationConfig {
    pub etcd: Etcd,
    pub record: WorkerRecord,
    /// Lease TTL: how long the record outlives a worker that dies without revoking it.
    pub ttl: Duration,
}

/// Where a [`Registration`] stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Not registered yet since it started.
    Connecting,
    /// The record is in etcd under a lease that is being kept alive.
    Registered,
    /// Was registered, then lost etcd or its lease; registering again.
    Lost,
}

/// Keeps a group's [`WorkerRecord`] in etcd for as long as it runs.
///
/// It runs until [`Registration::stop`] or until the token given to `spawn` is cancelled; then
/// it revokes its lease so the record disappears at once. Dropping the handle does neither:
/// the lifetime is the token's, as for [`crate::lease::Lease`].
pub struct Registration {
    cancel: CancellationToken,
    state: watch::Receiver<SessionState>,
    task: JoinHandle<()>,
}

impl Registration {
    /// Starts registering in the background; must be called inside a tokio runtime. Never
    /// fails: etcd being unreachable only delays registration. A record whose `group` is not a
    /// valid [`GroupName`] cannot be stored, is logged as an error, and is never registered:
    /// check it with [`GroupName::new`] first to fail early.
    pub fn spawn(cfg: RegistrationConfig, cancel: CancellationToken) -> Registration {
        // A child token, so that stopping this registration does not cancel the caller's.
        let cancel = cancel.child_token();
        let (state_tx, state) = watch::channel(SessionState::Connecting);
        let task = tokio::spawn(register(cfg, cancel.clone(), state_tx));
        Registration { cancel, state, task }
    }

    /// The registration's state now and as it changes. The sender closes when the task ends.
    pub fn state(&self) -> watch::Receiver<SessionState> {
        self.state.clone()
    }

    /// Revokes the lease (best effort, up to ~2 s) and waits for the task to end.
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

/// The registration task: one [`Session`] after another until cancelled, then a revoke.
async fn register(cfg: RegistrationConfig, cancel: CancellationToken, state: watch::Sender<SessionState>) {
    let group = cfg.record.group.clone();
    let (key, value) = match GroupName::new(&group)
        .and_then(|g| Ok((keys::worker(&g), serde_json::to_vec(&cfg.record).map_err(invalid)?)))
    {
        Ok(kv) => kv,
        Err(e) => {
            tracing::error!(group, error = %e, "worker record cannot be registered");
            return;
        }
    };
    let mut session = Session { client: None, lease: None };
    let mut backoff = Backoff::default();
    loop {
        let err = tokio::select! {
            _ = cancel.cancelled() => break,
            Err(e) = session.run(&cfg, &key, &value, &state, &mut backoff) => e,
        };
        // A fresh connection next time: the old one may be what failed.
        session.client = None;
        state.send_if_modified(|s| {
            let lost = *s == SessionState::Registered;
            if lost {
                *s = SessionState::Lost;
            }
            lost
        });
        if backoff.is_reset() {
            tracing::warn!(group, error = %err, "worker registration lost; registering again");
        } else {
            tracing::debug!(group, error = %err, "worker registration attempt failed");
        }
        if !backoff.sleep(&cancel).await {
            break;
        }
    }
    session.revoke(&cfg.etcd, &group).await;
}

/// What outlives one registration attempt: the client, for the revoke at the end, and the
/// lease, which the next attempt renews rather than replaces while etcd still has it (after an
/// etcd restart it usually does), so a blip does not churn the lease.
struct Session {
    client: Option<Client>,
    lease: Option<i64>,
}

impl Session {
    /// Registers, then keeps the lease alive; returns only when that fails.
    async fn run(
        &mut self,
        cfg: &RegistrationConfig,
        key: &str,
        value: &[u8],
        state: &watch::Sender<SessionState>,
        backoff: &mut Backoff,
    ) -> Result<Infallible> {
        let mut client = match &self.client {
            Some(c) => c.clone(),
            None => connect(&cfg.etcd).await?,
        };
        self.client = Some(client.clone());
        let ttl_s = cfg.ttl.as_secs_f64().ceil().max(1.0) as i64;
        let (mut keeper, mut replies) = self.lease(&mut client, ttl_s).await?;
        let lease = keeper.id();
        // Put even when the lease was renewed: the key may be gone (deleted by hand, or etcd
        // restored from an older snapshot), and an identical put is harmless.
        let put = client.put(key, value, Some(PutOptions::new().with_lease(lease)));
        bounded("put worker record", put).await?;
        state.send_replace(SessionState::Registered);
        backoff.reset();
        tracing::info!(key, lease, "worker registered");

        let period = (cfg.ttl / 3).max(MIN_PERIOD);
        let reply_timeout = cfg.ttl.clamp(MIN_PERIOD, REQUEST_TIMEOUT);
        let mut tick = tokio::time::interval_at(Instant::now() + period, period);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            keeper.keep_alive().await?;
            let reply = tokio::time::timeout(reply_timeout, replies.message())
                .await
                .map_err(|_| ClusterError::Timeout(reply_timeout, "a lease keep-alive reply".into()))??;
            match reply {
                Some(r) if r.ttl() > 0 => {}
                Some(_) => {
                    // Expired or revoked: the record went with it. Grant a new one.
                    self.lease = None;
                    return Err(etcd_client::Error::LeaseKeepAliveError(format!("lease {lease:x} is gone")).into());
                }
                None => return Err(etcd_client::Error::LeaseKeepAliveError("keep-alive stream ended".into()).into()),
            }
        }
    }

    /// Keeps the previous lease if etcd still has it, else grants a new one.
    async fn lease(&mut self, client: &mut Client, ttl_s: i64) -> Result<(LeaseKeeper, LeaseKeepAliveStream)> {
        if let Some(id) = self.lease {
            match bounded("lease keep-alive", client.lease_keep_alive(id)).await {
                Ok(kept) => return Ok(kept),
                // etcd-client's word for "etcd answered: no such lease".
                Err(ClusterError::Etcd(etcd_client::Error::LeaseKeepAliveError(_))) => {
                    tracing::debug!(lease = id, "previous lease expired; granting a new one");
                    self.lease = None;
                }
                Err(e) => return Err(e),
            }
        }
        let id = bounded("lease grant", client.lease_grant(ttl_s, None)).await?.id();
        // Remembered before anything else can fail, so a cancel from here on revokes it.
        self.lease = Some(id);
        bounded("lease keep-alive", client.lease_keep_alive(id)).await
    }

    /// Revokes the lease, if any, so the record disappears now rather than after the TTL.
    async fn revoke(self, etcd: &Etcd, group: &str) {
        let Some(id) = self.lease else { return };
        let revoke = async {
            let mut client = match self.client {
                Some(c) => c,
                None => connect(etcd).await?,
            };
            client.lease_revoke(id).await?;
            Ok::<_, ClusterError>(())
        };
        match tokio::time::timeout(REVOKE_TIMEOUT, revoke).await {
            Ok(Ok(())) => tracing::info!(group, lease = id, "worker deregistered"),
            Ok(Err(e)) => tracing::warn!(group, lease = id, error = %e, "lease revoke failed; the record will expire"),
            Err(_) => tracing::warn!(group, lease = id, "lease revoke timed out; the record will expire"),
        }
    }
}

#[derive(Debug, Clone)]
pub struct MembershipConfig {
    pub etcd: Etcd,
    /// Re-reads the whole prefix this often even while the watch is healthy, in case it
    /// silently missed something.
    pub relist_every: Duration,
}

/// A live view of every registered worker.
///
/// Runs until [`Membership::stop`] or until the token given to `start` is cancelled. While etcd
/// is unreachable the last known map stays published: stale workers are better than none, and
/// the router finds dead ones by their failing calls anyway.
pub struct Membership {
    cancel: CancellationToken,
    workers: watch::Receiver<Arc<Workers>>,
    connected: watch::Receiver<bool>,
    task: JoinHandle<()>,
}

impl Membership {
    /// Starts following the workers prefix in the background; must be called inside a tokio
    /// runtime. Starts with an empty map.
    pub fn start(cfg: MembershipConfig, cancel: CancellationToken) -> Membership {
        let cancel = cancel.child_token();
        let (workers_tx, workers) = watch::channel(Arc::new(Workers::new()));
        let (connected_tx, connected) = watch::channel(false);
        let task = tokio::spawn(follow(cfg, cancel.clone(), workers_tx, connected_tx));
        Membership { cancel, workers, connected, task }
    }

    /// Every new map as it is published.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Workers>> {
        self.workers.clone()
    }

    /// The map now.
    pub fn snapshot(&self) -> Arc<Workers> {
        self.workers.borrow().clone()
    }

    /// Whether the map is being kept current: listed, and watched since, without error.
    pub fn connected(&self) -> bool {
        *self.connected.borrow()
    }

    /// [`Membership::connected`] now and as it changes.
    pub fn connection(&self) -> watch::Receiver<bool> {
        self.connected.clone()
    }

    /// Stops following and waits for the task to end; the last map stays readable through
    /// receivers taken before.
    pub async fn stop(self) {
        self.cancel.cancel();
        let _ = self.task.await;
    }
}

async fn follow(
    cfg: MembershipConfig,
    cancel: CancellationToken,
    workers: watch::Sender<Arc<Workers>>,
    connected: watch::Sender<bool>,
) {
    let relist_every = cfg.relist_every.max(MIN_PERIOD);
    let mut backoff = Backoff::default();
    loop {
        let err = tokio::select! {
            _ = cancel.cancelled() => break,
            Err(e) = follow_session(&cfg.etcd, relist_every, &workers, &connected, &mut backoff) => e,
        };
        connected.send_if_modified(|c| std::mem::replace(c, false));
        if backoff.is_reset() {
            tracing::warn!(error = %err, "lost the worker membership watch; keeping the last map and reconnecting");
        } else {
            tracing::debug!(error = %err, "worker membership reconnect failed");
        }
        if !backoff.sleep(&cancel).await {
            break;
        }
    }
    connected.send_replace(false);
}

/// One connection: list and watch, again every `relist_every`, until something fails.
async fn follow_session(
    etcd: &Etcd,
    relist_every: Duration,
    workers: &watch::Sender<Arc<Workers>>,
    connected: &watch::Sender<bool>,
    backoff: &mut Backoff,
) -> Result<Infallible> {
    let mut client = connect(etcd).await?;
    loop {
        list_and_watch(&mut client, relist_every, workers, connected, backoff).await?;
    }
}

/// Lists the prefix and publishes it, then applies the watch from just past the listing's
/// revision, so nothing between the two is missed. Returns `Ok` after `relist_every`; a fresh
/// listing then replaces the map, which also undoes anything the watch got wrong.
async fn list_and_watch(
    client: &mut Client,
    relist_every: Duration,
    workers: &watch::Sender<Arc<Workers>>,
    connected: &watch::Sender<bool>,
    backoff: &mut Backoff,
) -> Result<()> {
    let prefix = keys::workers_prefix();
    let listed = bounded("list workers", client.get(prefix.as_str(), Some(GetOptions::new().with_prefix()))).await?;
    let revision = listed.header().map_or(0, |h| h.revision());
    let mut map = Workers::new();
    for kv in listed.kvs() {
        if let Some(group) = group_of(kv.key()) {
            if let Some(record) = parse(&group, kv.value()) {
                map.insert(group, record);
            }
        }
    }
    workers.send_if_modified(|cur| {
        let changed = **cur != map;
        if changed {
            *cur = Arc::new(map.clone());
        }
        changed
    });

    let options = WatchOptions::new().with_prefix().with_start_revision(revision + 1);
    let mut stream = bounded("watch workers", client.watch(prefix.as_str(), Some(options))).await?;
    connected.send_if_modified(|c| !std::mem::replace(c, true));
    backoff.reset();
    let relist = tokio::time::sleep(relist_every);
    tokio::pin!(relist);
    loop {
        let msg = tokio::select! {
            _ = &mut relist => return Ok(()),
            msg = stream.message() => msg?,
        };
        let Some(msg) = msg else {
            return Err(etcd_client::Error::WatchError("watch stream ended".into()).into());
        };
        if msg.canceled() {
            // E.g. compacted past our revision: only a new listing can catch up.
            let reason = format!("watch cancelled by etcd: {}", msg.cancel_reason());
            return Err(etcd_client::Error::WatchError(reason).into());
        }
        let mut changed = false;
        for event in msg.events() {
            let Some(kv) = event.kv() else { continue };
            let Some(group) = group_of(kv.key()) else { continue };
            let record = match event.event_type() {
                EventType::Put => parse(&group, kv.value()),
                EventType::Delete => None,
            };
            // A record overwritten with garbage no longer describes a worker: drop it too.
            changed |= match record {
                Some(r) => map.insert(group, r.clone()).as_ref() != Some(&r),
                None => map.remove(&group).is_some(),
            };
        }
        if changed {
            workers.send_replace(Arc::new(map.clone()));
        }
    }
}

impl WorkerRecord {
    /// Whether the record is usable as written: an address the router can dial (`host:port`,
    /// no scheme, path or spaces), a model name without control characters, a sane TP degree.
    pub fn check(&self) -> std::result::Result<(), String> {
        let addr = &self.grpc_addr;
        let Some((host, port)) = addr.rsplit_once(':') else {
            return Err(format!("grpc_addr {addr:?}: expected host:port"));
        };
        let host_ok = !host.is_empty()
            && host.len() <= 253
            && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'));
        if !host_ok || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(format!("grpc_addr {addr:?}: expected host:port"));
        }
        if self.model.is_empty() || self.model.len() > 256 || self.model.chars().any(char::is_control) {
            return Err("model: must be 1 to 256 characters without control characters".into());
        }
        if !(1..=1024).contains(&self.tp) {
            return Err(format!("tp {}: must be in 1..=1024", self.tp));
        }
        Ok(())
    }
}

/// The group a key under the workers prefix registers; anything else there is skipped.
fn group_of(key: &[u8]) -> Option<String> {
    let key = String::from_utf8_lossy(key);
    let group = keys::worker_group(&key);
    if group.is_none() {
        tracing::warn!(?key, "skipping a key under the workers prefix that names no group");
    }
    group.map(|g| g.as_str().to_string())
}

/// A record is only believed under its own group's key, so one group cannot pose as another.
fn parse(group: &str, value: &[u8]) -> Option<WorkerRecord> {
    match serde_json::from_slice::<WorkerRecord>(value) {
        Ok(r) if r.group == group => match r.check() {
            Ok(()) => Some(r),
            Err(e) => {
                tracing::warn!(group, error = %e, "skipping an invalid worker record");
                None
            }
        },
        Ok(r) => {
            tracing::warn!(group, claims = ?r.group, "skipping a worker record stored under another group's key");
            None
        }
        Err(e) => {
            tracing::warn!(group, error = %e, "skipping an unparsable worker record");
            None
        }
    }
}

async fn connect(etcd: &Etcd) -> Result<Client> {
    let timeouts = Timeouts {
        connect: CONNECT_TIMEOUT,
        request: REQUEST_TIMEOUT,
        ping_every: PING_INTERVAL,
        ping_timeout: PING_TIMEOUT,
    };
    let options = etcd.options(Some(timeouts))?;
    bounded("connect", Client::connect(&etcd.endpoints, Some(options))).await
}

/// Runs an etcd call with [`REQUEST_TIMEOUT`], so an unreachable etcd is an error, not a hang.
async fn bounded<T>(what: &str, call: impl Future<Output = Result<T, etcd_client::Error>>) -> Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, call).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(ClusterError::Timeout(REQUEST_TIMEOUT, what.to_string())),
    }
}

fn invalid(e: impl std::fmt::Display) -> ClusterError {
    ClusterError::Invalid(e.to_string())
}

/// Retry delays from [`BACKOFF_MIN`] doubling to [`BACKOFF_MAX`].
struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff { next: BACKOFF_MIN }
    }
}

impl Backoff {
    fn reset(&mut self) {
        self.next = BACKOFF_MIN;
    }

    /// True until a retry has failed since the last success: the first failure is news, the
    /// rest of an outage is not.
    fn is_reset(&self) -> bool {
        self.next == BACKOFF_MIN
    }

    /// Each delay is drawn from the upper half of its step so that a fleet that lost etcd
    /// together does not retry in lockstep.
    fn next_delay(&mut self) -> Duration {
        let delay = jitter(self.next);
        self.next = (self.next * 2).min(BACKOFF_MAX);
        delay
    }

    /// Sleeps the next delay; false if cancelled first.
    async fn sleep(&mut self, cancel: &CancellationToken) -> bool {
        let delay = self.next_delay();
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
    }
}

/// Between half and all of `d`. `RandomState` is randomly seeded per instance: enough entropy
/// for spreading retries without a dependency.
fn jitter(d: Duration) -> Duration {
    use std::hash::BuildHasher;
    let r = std::collections::hash_map::RandomState::new().hash_one(0u8) % 1024;
    d / 2 + d.mul_f64(r as f64 / 2048.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_are_checked_against_their_key() {
        let r = WorkerRecord { group: "g0".into(), grpc_addr: "10.0.0.1:50051".into(), model: "qwen".into(), tp: 2 };
        let json = serde_json::to_vec(&r).unwrap();
        assert_eq!(parse("g0", &json), Some(r));
        assert_eq!(parse("g1", &json), None, "a record under another group's key");
        assert_eq!(parse("g0", b"not json"), None);
        assert_eq!(parse("g0", br#"{"group":"g0"}"#), None, "missing fields");
        assert_eq!(group_of(keys::workers_prefix().as_bytes()), None);
        assert_eq!(group_of(format!("{}g0", keys::workers_prefix()).as_bytes()).as_deref(), Some("g0"));
    }

    #[test]
    fn records_that_cannot_be_used_are_refused() {
        let ok = WorkerRecord { group: "g0".into(), grpc_addr: "worker-0.qwen:50051".into(), model: "q".into(), tp: 1 };
        assert_eq!(ok.check(), Ok(()));
        assert!(WorkerRecord { grpc_addr: "[::1]:50051".into(), ..ok.clone() }.check().is_ok());
        for addr in ["", "host", "http://h:1", "h:0", "h:99999", "h :1", "h/x:1", ":1"] {
            let r = WorkerRecord { grpc_addr: addr.into(), ..ok.clone() };
            assert!(r.check().unwrap_err().contains("grpc_addr"), "{addr:?}");
            assert_eq!(parse("g0", &serde_json::to_vec(&r).unwrap()), None, "{addr:?}");
        }
        assert!(WorkerRecord { model: "a\nb".into(), ..ok.clone() }.check().is_err());
        assert!(WorkerRecord { model: String::new(), ..ok.clone() }.check().is_err());
        assert!(WorkerRecord { tp: 0, ..ok.clone() }.check().is_err());
    }

    #[test]
    fn backoff_doubles_to_its_cap_and_resets() {
        let mut b = Backoff::default();
        for i in 0..8 {
            let nominal = (BACKOFF_MIN * 2u32.pow(i)).min(BACKOFF_MAX);
            let d = b.next_delay();
            assert!(d >= nominal / 2 && d <= nominal, "delay {i}: {d:?} vs {nominal:?}");
        }
        assert!(!b.is_reset());
        b.reset();
        assert!(b.is_reset());
        assert!(b.next_delay() <= BACKOFF_MIN);
    }

    #[tokio::test]
    async fn backoff_sleep_ends_on_cancel() {
        let cancel = CancellationToken::new();
        let mut b = Backoff { next: Duration::from_secs(3600) };
        cancel.cancel();
        assert!(!b.sleep(&cancel).await);
    }
}
