//! Tensor-parallel process management for `qwen-worker serve`: a `--tp N` supervisor that starts
//! N rank processes on this host and stops them all when one dies, and the rendezvous through
//! etcd by which ranks of a group find rank 0.

use std::io::BufRead;
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context};
use qwen_cluster::keys::GroupName;
use qwen_cluster::lease::Lease;
use qwen_cluster::rendezvous::{self, Record};
use qwen_worker::comm::{Comm, TcpComm, TcpConfig};
use tokio_util::sync::CancellationToken;

/// One rank's place, from `--rank/--world-size/--group/--etcd`.
#[derive(Debug, Clone)]
pub struct RankConfig {
    pub rank: usize,
    pub world_size: usize,
    pub group: GroupName,
    pub etcd: qwen_cluster::Etcd,
    pub comm_listen: std::net::SocketAddr,
    /// What rank 0 publishes for the other ranks (default: the bound --comm-listen address).
    pub comm_advertise: Option<String>,
    pub timeout: Duration,
    /// How long to keep trying etcd at start.
    pub etcd_start_timeout: Duration,
    /// Mutual TLS between the ranks.
    pub tls: Option<qwen_tls::PeerTls>,
}

/// Set on the ranks a `--tp` supervisor starts: its PID, so they can follow it out.
const SUPERVISOR_PID: &str = "QWEN_SUPERVISOR_PID";

/// A rank started by a supervisor exits when the supervisor is gone (killed outright, it could
/// not stop its ranks), so no orphan keeps a port or a stale group alive.
pub fn exit_with_supervisor() {
    let Some(pid) = std::env::var(SUPERVISOR_PID).ok().and_then(|p| p.parse::<u32>().ok()) else { return };
    std::thread::spawn(move || loop {
        if std::os::unix::process::parent_id() != pid {
            tracing::error!("supervisor {pid} is gone; exiting");
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(200));
    });
}

/// How long rank 0's rendezvous record outlives a rank 0 that died without revoking it.
const LEASE_TTL: Duration = Duration::from_secs(3);

/// Meets the rest of the group: rank 0 publishes its collective address under a lease and waits
/// for everyone; the others wait for the record and connect. Returns the group handle and, on
/// rank 0, the lease to revoke at shutdown.
pub fn join_group(
    rt: &tokio::runtime::Runtime,
    r: &RankConfig,
    device: &candle_core::Device,
) -> anyhow::Result<(Comm, Option<Lease>)> {
    let client = rt
        .block_on(qwen_cluster::connect_with_retry(&r.etcd, r.etcd_start_timeout))
        .with_context(|| format!("--etcd {:?}", r.etcd))?;
    let tcp = TcpConfig { rank: r.rank, world_size: r.world_size, timeout: r.timeout, tls: r.tls.clone() };
    if r.rank == 0 {
        let listener = TcpListener::bind(r.comm_listen).with_context(|| format!("--comm-listen {}", r.comm_listen))?;
        let addr = match &r.comm_advertise {
            // Bound to 0.0.0.0 in a pod: the others need the pod's address, with the bound port.
            Some(host) if !host.contains(':') => format!("{host}:{}", listener.local_addr()?.port()),
            Some(addr) => addr.clone(),
            None => listener.local_addr()?.to_string(),
        };
        let lease = rt.block_on(async {
            let lease = Lease::grant(&client, LEASE_TTL, CancellationToken::new()).await?;
            rendezvous::publish(&client, &r.group, &Record { addr, world_size: r.world_size as u32 }, &lease).await?;
            anyhow::Ok(lease)
        })?;
        let comm = TcpComm::root(listener, &tcp).context("waiting for the other ranks")?;
        tracing::info!(group = r.group.as_str(), world_size = r.world_size, "tensor-parallel group formed");
        Ok((collectives_for(comm, device)?, Some(lease)))
    } else {
        let record = rt.block_on(rendezvous::wait_for(&client, &r.group, r.timeout * 3))?;
        if record.world_size as usize != r.world_size {
            bail!("--world-size {} but rank 0 of group {} runs {}", r.world_size, r.group.as_str(), record.world_size);
        }
        let addr = resolve(&record.addr, r.timeout * 3)?;
        Ok((collectives_for(TcpComm::join(addr, &tcp)?, device)?, None))
    }
}

/// Rank 0's published address: an IP and port, or a stable DNS name and port (a LeaderWorkerSet
/// leader's), looked up until it resolves (a new pod's name takes a moment to appear in DNS).
fn resolve(addr: &str, wait: Duration) -> anyhow::Result<std::net::SocketAddr> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = addr.parse() {
        return Ok(a);
    }
    let give_up = std::time::Instant::now() + wait;
    loop {
        match addr.to_socket_addrs().map(|mut it| it.next()) {
            Ok(Some(a)) => return Ok(a),
            result if std::time::Instant::now() >= give_up => {
                let why = result.err().map_or_else(|| "no address".to_string(), |e| e.to_string());
                bail!("rank 0's address {addr:?} did not resolve within {wait:?}: {why}");
            }
            _ => std::thread::sleep(Duration::from_millis(500)),
        }
    }
}

/// GPU ranks move tensors over NCCL (the TCP connections stay for plans and barriers); CPU
/// ranks over TCP.
fn collectives_for(control: TcpComm, device: &candle_core::Device) -> anyhow::Result<Comm> {
    #[cfg(feature = "nccl")]
    if let candle_core::Device::Cuda(d) = device {
        use qwen_worker::comm::nccl::{NcclComm, NcclConfig};
        if !std::path::Path::new("/dev/infiniband").exists() {
            // NCCL picks its transport itself; this says what it will find between nodes.
            tracing::warn!(
                "no RDMA devices (/dev/infiniband): NCCL between nodes falls back to TCP sockets, a \
                 fraction of the bandwidth; give multi-node ranks RDMA resources or host networking \
                 (ranks on one node still use NVLink / PCIe)"
            );
        }
        let comm = NcclComm::new(NcclConfig { stream: d.cuda_stream(), control }).context("starting NCCL")?;
        return Ok(Comm::Nccl(comm));
    }
    if device.is_cuda() {
        // Without NCCL the TCP collectives still work, through host copies.
        tracing::warn!("GPU ranks without the `nccl` feature: collectives go over TCP through the host");
    }
    Ok(Comm::Tcp(control))
}

/// `serve --tp N`: runs N copies of this command as ranks 0..N of one group and forwards rank
/// 0's stdout ("listening on", "metrics on"). If any rank exits, the others are stopped and this
/// fails, so the group never limps on with a missing shard. SIGTERM drains: rank 0 first (it
/// leaves routing and finishes its requests, up to `drain`), then the rest.
pub fn supervise(argv: &[String], tp: usize, group: &GroupName, drain: Duration) -> anyhow::Result<()> {
    let exe = std::env::current_exe()?;
    let base = strip_flags(&argv[1..], &["--tp", "--group", "--rank", "--world-size"]);
    let mut children: Vec<Child> = Vec::with_capacity(tp);
    for rank in 0..tp {
        let mut cmd = Command::new(&exe);
        cmd.env_remove("QWEN_TP")
            .env(SUPERVISOR_PID, std::process::id().to_string())
            // Every rank runs on this host: they split its memory.
            .env("QWEN_RANKS_ON_HOST", tp.to_string())
            .args(&base)
            .args(["--rank", &rank.to_string(), "--world-size", &tp.to_string(), "--group", group.as_str()]);
        if rank == 0 {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(Stdio::null());
        }
        children.push(cmd.spawn().with_context(|| format!("starting rank {rank}"))?);
    }
    let stdout = children[0].stdout.take().context("rank 0 stdout")?;
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout).lines().map_while(Result::ok) {
            crate::emit(&format!("{line}\n"));
        }
    });
    let result = watch(&mut children, drain);
    for c in children.iter_mut() {
        let _ = c.kill();
        let _ = c.wait();
    }
    result
}

/// Waits until a rank exits (an error) or a termination signal arrives (a clean stop).
fn watch(children: &mut [Child], drain: Duration) -> anyhow::Result<()> {
    let term = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = term.clone();
    // Signals arrive through a small runtime so the watch loop itself stays synchronous.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let _signals = std::thread::spawn(move || {
        rt.block_on(async {
            if let Ok(mut s) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                tokio::select! { _ = s.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
                flag.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        })
    });
    loop {
        if term.load(std::sync::atomic::Ordering::SeqCst) {
            // Rank 0 drains while the others keep serving its forwards; when its engine stops it
            // tells them to stop too. Whatever is left after that gets TERM, then KILL.
            let term = |c: &Child| {
                let _ = Command::new("kill").args(["-TERM", &c.id().to_string()]).stderr(Stdio::null()).status();
            };
            term(&children[0]);
            wait_exit(&mut children[..1], drain + Duration::from_secs(5));
            children[1..].iter().for_each(term);
            wait_exit(children, Duration::from_secs(2));
            return Ok(());
        }
        for (rank, c) in children.iter_mut().enumerate() {
            if let Some(status) = c.try_wait()? {
                bail!("rank {rank} exited ({status}); stopping the group");
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until every child has exited, or `limit`.
fn wait_exit(children: &mut [Child], limit: Duration) {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if children.iter_mut().all(|c| matches!(c.try_wait(), Ok(Some(_)) | Err(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The command line without `flags` (as `--flag value` or `--flag=value`); the supervisor sets
/// those itself for each rank.
fn strip_flags(args: &[String], flags: &[&str]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut skip = false;
    for a in args {
        if skip {
            skip = false;
        } else if flags.contains(&a.as_str()) {
            skip = true;
        } else if !flags.iter().any(|f| a.starts_with(&format!("{f}="))) {
            out.push(a.clone());
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{resolve, strip_flags};
    use std::time::Duration;

    #[test]
    fn rank_zero_addresses_resolve_by_ip_or_name() {
        assert_eq!(resolve("127.0.0.1:29500", Duration::ZERO).unwrap().port(), 29500);
        let by_name = resolve("localhost:29501", Duration::from_secs(1)).unwrap();
        assert!(by_name.ip().is_loopback() && by_name.port() == 29501, "{by_name}");
        let e = resolve("no-such-leader.invalid:1", Duration::from_millis(600)).unwrap_err().to_string();
        assert!(e.contains("did not resolve"), "{e}");
    }

    #[test]
    fn supervisor_flags_are_removed() {
        let args: Vec<String> = ["serve", "--tp", "2", "--model", "m", "--tp=3", "--group", "g", "--listen", "x"]
            .map(String::from)
            .to_vec();
        assert_eq!(strip_flags(&args, &["--tp", "--group"]), ["serve", "--model", "m", "--listen", "x"]);
    }
}
