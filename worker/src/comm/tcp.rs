//! Collectives for CPU ranks over TCP, in a star around rank 0: every rank holds one connection
//! to rank 0, which combines (in rank order, so results are identical on every rank) and sends
//! back. Simple and exact; for the handful of CPU ranks this backend serves, the star's extra hop
//! costs less than a ring's extra round trips.
//!
//! With [`TcpConfig::tls`] every connection is mutual TLS: rank 0 admits only peers with a
//! certificate from the group's CA (anyone else is dropped and the wait goes on), and joining
//! ranks check rank 0's certificate.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rustls::{ClientConnection, ServerConnection, StreamOwned};

use super::{CommError, Result};

#[derive(Debug, Clone)]
pub struct TcpConfig {
    pub rank: usize,
    pub world_size: usize,
    /// Longest a collective waits on a peer; also bounds connecting at start.
    pub timeout: Duration,
    /// Mutual TLS between the ranks; `None`: plain TCP (one host, or a trusted network).
    pub tls: Option<qwen_tls::PeerTls>,
}

impl TcpConfig {
    pub fn plain(rank: usize, world_size: usize, timeout: Duration) -> Self {
        TcpConfig { rank, world_size, timeout, tls: None }
    }
}

/// Largest message a peer may announce: a frame header claiming more is a broken or hostile
/// peer, not a reason to allocate.
const MAX_MESSAGE_BYTES: u64 = 1 << 30;

/// One connection to a peer.
enum Link {
    Plain(TcpStream),
    Server(Box<StreamOwned<ServerConnection, TcpStream>>),
    Client(Box<StreamOwned<ClientConnection, TcpStream>>),
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Link::Plain(s) => s.read(buf),
            Link::Server(s) => s.read(buf),
            Link::Client(s) => s.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Link::Plain(s) => s.write(buf),
            Link::Server(s) => s.write(buf),
            Link::Client(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Link::Plain(s) => s.flush(),
            Link::Server(s) => s.flush(),
            Link::Client(s) => s.flush(),
        }
    }
}

/// Finishes a TLS handshake on a blocking socket (its read timeout bounds a stalled peer).
fn handshake<C, D>(conn: &mut C, tcp: &mut TcpStream) -> std::io::Result<()>
where
    C: std::ops::DerefMut<Target = rustls::ConnectionCommon<D>>,
{
    while conn.is_handshaking() {
        conn.complete_io(tcp)?;
    }
    Ok(())
}

/// Rank 0's side of a new connection: TLS first when configured.
fn accept_link(stream: TcpStream, tls: Option<&qwen_tls::PeerTls>) -> std::io::Result<Link> {
    let Some(tls) = tls else { return Ok(Link::Plain(stream)) };
    let mut tcp = stream;
    let mut conn = ServerConnection::new(tls.server.clone()).map_err(std::io::Error::other)?;
    handshake(&mut conn, &mut tcp)?;
    Ok(Link::Server(Box::new(StreamOwned::new(conn, tcp))))
}

/// A joining rank's side: TLS first when configured, checking rank 0's certificate for
/// `server_name` or else the host of `root`.
fn connect_link(stream: TcpStream, root: SocketAddr, tls: Option<&qwen_tls::PeerTls>) -> std::io::Result<Link> {
    let Some(tls) = tls else { return Ok(Link::Plain(stream)) };
    let name = match &tls.server_name {
        Some(n) => rustls::pki_types::ServerName::try_from(n.clone()).map_err(std::io::Error::other)?,
        None => rustls::pki_types::ServerName::IpAddress(root.ip().into()),
    };
    let mut tcp = stream;
    let mut conn = ClientConnection::new(tls.client.clone(), name).map_err(std::io::Error::other)?;
    handshake(&mut conn, &mut tcp)?;
    Ok(Link::Client(Box::new(StreamOwned::new(conn, tcp))))
}

pub struct TcpComm {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    /// Rank 0: the links to ranks 1.., in rank order. Other ranks: the link to rank 0. Locked
    /// per message (uncontended: one collective at a time), as TLS streams read through `&mut`.
    peers: Vec<Mutex<Link>>,
    /// Nanoseconds spent inside collectives (waiting included), for benchmarks.
    spent_ns: std::sync::atomic::AtomicU64,
}

const HELLO: u32 = 0x5157_454e; // "QWEN"

impl TcpComm {
    /// Rank 0: waits on `listener` for ranks `1..world_size` to join.
    pub fn root(listener: TcpListener, cfg: &TcpConfig) -> Result<Self> {
        check(cfg)?;
        if cfg.rank != 0 {
            return Err(CommError::Config(format!("root() is for rank 0, not rank {}", cfg.rank)));
        }
        let deadline = Instant::now() + cfg.timeout;
        listener.set_nonblocking(true).map_err(|e| io(0, 0, e))?;
        let mut slots: Vec<Option<Link>> = (1..cfg.world_size).map(|_| None).collect();
        while slots.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((stream, from)) => {
                    stream.set_nonblocking(false).map_err(|e| io(0, 0, e))?;
                    configure(&stream, cfg.timeout).map_err(|e| io(0, 0, e))?;
                    let mut stream = match accept_link(stream, cfg.tls.as_ref()) {
                        Ok(link) => link,
                        Err(e) => {
                            // Not one of ours (no certificate from the CA): ignore it and go on
                            // waiting for the ranks, so a stranger cannot break the group.
                            tracing::warn!(peer = %from, error = %e, "refused a rank connection: TLS handshake failed");
                            continue;
                        }
                    };
                    let (hello, rank, world) =
                        (read_u32(&mut stream, 0, 0)?, read_u32(&mut stream, 0, 0)?, read_u32(&mut stream, 0, 0)?);
                    let rank = rank as usize;
                    if hello != HELLO || world as usize != cfg.world_size || rank == 0 || rank >= cfg.world_size {
                        return Err(CommError::Config(format!(
                            "a peer introduced itself as rank {rank} of {world}; this group has {} ranks",
                            cfg.world_size
                        )));
                    }
                    if slots[rank - 1].replace(stream).is_some() {
                        return Err(CommError::Config(format!("rank {rank} joined twice")));
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if Instant::now() >= deadline {
                        let missing = slots.iter().position(Option::is_none).map_or(0, |i| i + 1);
                        return Err(CommError::Timeout { rank: 0, peer: missing, timeout: cfg.timeout });
                    }
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => return Err(io(0, 0, e)),
            }
        }
        let peers = slots.into_iter().map(|s| Mutex::new(s.expect("all joined"))).collect();
        Ok(TcpComm { rank: 0, world_size: cfg.world_size, timeout: cfg.timeout, peers, spent_ns: Default::default() })
    }

    /// Rank `cfg.rank > 0`: connects to rank 0 at `root`, retrying until the timeout.
    pub fn join(root: SocketAddr, cfg: &TcpConfig) -> Result<Self> {
        check(cfg)?;
        if cfg.rank == 0 {
            return Err(CommError::Config("rank 0 is the root; it does not join".into()));
        }
        let deadline = Instant::now() + cfg.timeout;
        let stream = loop {
            match TcpStream::connect_timeout(&root, cfg.timeout) {
                Ok(s) => break s,
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(io(cfg.rank, 0, e)),
            }
        };
        configure(&stream, cfg.timeout).map_err(|e| io(cfg.rank, 0, e))?;
        let mut link = connect_link(stream, root, cfg.tls.as_ref()).map_err(|e| io(cfg.rank, 0, e))?;
        let mut hello = Vec::with_capacity(12);
        for v in [HELLO, cfg.rank as u32, cfg.world_size as u32] {
            hello.extend_from_slice(&v.to_le_bytes());
        }
        link.write_all(&hello).and_then(|()| link.flush()).map_err(|e| io(cfg.rank, 0, e))?;
        Ok(TcpComm {
            rank: cfg.rank,
            world_size: cfg.world_size,
            timeout: cfg.timeout,
            peers: vec![Mutex::new(link)],
            spent_ns: Default::default(),
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// Total time spent in collectives so far.
    pub fn collective_time(&self) -> Duration {
        Duration::from_nanos(self.spent_ns.load(std::sync::atomic::Ordering::Relaxed))
    }

    fn timed<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let start = Instant::now();
        let out = f();
        self.spent_ns.fetch_add(start.elapsed().as_nanos() as u64, std::sync::atomic::Ordering::Relaxed);
        out
    }

    /// Rank 0's link to `peer`, or a non-root rank's link to rank 0.
    fn stream(&self, peer: usize) -> MutexGuard<'_, Link> {
        let link = if self.rank == 0 { &self.peers[peer - 1] } else { &self.peers[0] };
        link.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, peer: usize, bytes: &[u8]) -> Result<()> {
        let mut s = self.stream(peer);
        s.write_all(&(bytes.len() as u64).to_le_bytes())
            .and_then(|_| s.write_all(bytes))
            .and_then(|_| s.flush())
            .map_err(|e| self.fail(peer, e))
    }

    fn recv(&self, peer: usize) -> Result<Vec<u8>> {
        let mut s = self.stream(peer);
        let mut len = [0u8; 8];
        s.read_exact(&mut len).map_err(|e| self.fail(peer, e))?;
        let len = u64::from_le_bytes(len);
        if len > MAX_MESSAGE_BYTES {
            let what = format!("announced a {len}-byte message (at most {MAX_MESSAGE_BYTES})");
            return Err(io(self.rank, peer, std::io::Error::new(ErrorKind::InvalidData, what)));
        }
        let mut buf = vec![0u8; len as usize];
        s.read_exact(&mut buf).map_err(|e| self.fail(peer, e))?;
        Ok(buf)
    }

    fn fail(&self, peer: usize, e: std::io::Error) -> CommError {
        match e.kind() {
            ErrorKind::WouldBlock | ErrorKind::TimedOut => {
                CommError::Timeout { rank: self.rank, peer, timeout: self.timeout }
            }
            _ => io(self.rank, peer, e),
        }
    }

    pub fn all_reduce_sum_f32(&self, data: &[f32]) -> Result<Vec<f32>> {
        self.timed(|| self.all_reduce_inner(data))
    }

    fn all_reduce_inner(&self, data: &[f32]) -> Result<Vec<f32>> {
        if self.rank != 0 {
            self.send(0, &f32_bytes(data))?;
            return self.recv_f32(0, data.len());
        }
        let mut acc = data.to_vec();
        for peer in 1..self.world_size {
            for (a, b) in acc.iter_mut().zip(self.recv_f32(peer, data.len())?) {
                *a += b;
            }
        }
        let bytes = f32_bytes(&acc);
        for peer in 1..self.world_size {
            self.send(peer, &bytes)?;
        }
        Ok(acc)
    }

    pub fn all_gather_f32(&self, data: &[f32]) -> Result<Vec<Vec<f32>>> {
        self.timed(|| self.all_gather_inner(data))
    }

    fn all_gather_inner(&self, data: &[f32]) -> Result<Vec<Vec<f32>>> {
        let n = data.len();
        let all = if self.rank != 0 {
            self.send(0, &f32_bytes(data))?;
            self.recv_f32(0, n * self.world_size)?
        } else {
            let mut all = data.to_vec();
            for peer in 1..self.world_size {
                all.extend(self.recv_f32(peer, n)?);
            }
            let bytes = f32_bytes(&all);
            for peer in 1..self.world_size {
                self.send(peer, &bytes)?;
            }
            all
        };
        Ok(all.chunks(n.max(1)).map(<[f32]>::to_vec).take(self.world_size).collect())
    }

    pub fn broadcast(&self, root: usize, data: Vec<u8>) -> Result<Vec<u8>> {
        self.timed(|| self.broadcast_inner(root, data))
    }

    fn broadcast_inner(&self, root: usize, data: Vec<u8>) -> Result<Vec<u8>> {
        if root >= self.world_size {
            return Err(CommError::Config(format!("broadcast root {root} outside 0..{}", self.world_size)));
        }
        if self.rank != 0 {
            if self.rank == root {
                self.send(0, &data)?;
            }
            return self.recv(0);
        }
        let data = if root == 0 { data } else { self.recv(root)? };
        for peer in 1..self.world_size {
            self.send(peer, &data)?;
        }
        Ok(data)
    }

    pub fn barrier(&self) -> Result<()> {
        self.all_reduce_sum_f32(&[]).map(|_| ())
    }

    fn recv_f32(&self, peer: usize, expected: usize) -> Result<Vec<f32>> {
        let bytes = self.recv(peer)?;
        if bytes.len() != expected * 4 {
            return Err(CommError::Protocol { rank: self.rank, peer, got: bytes.len(), expected: expected * 4 });
        }
        Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
    }
}

fn check(cfg: &TcpConfig) -> Result<()> {
    if cfg.world_size == 0 || cfg.rank >= cfg.world_size {
        return Err(CommError::Config(format!("rank {} outside world size {}", cfg.rank, cfg.world_size)));
    }
    Ok(())
}

fn configure(s: &TcpStream, timeout: Duration) -> std::io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))
}

fn read_u32(s: &mut Link, rank: usize, peer: usize) -> Result<u32> {
    let mut b = [0u8; 4];
    s.read_exact(&mut b).map_err(|e| io(rank, peer, e))?;
    Ok(u32::from_le_bytes(b))
}

fn io(rank: usize, peer: usize, source: std::io::Error) -> CommError {
    CommError::Io { rank, peer, source }
}

fn f32_bytes(data: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len() * 4);
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f(comm)` on `world` ranks, one thread each, and returns their results by rank.
    fn group<T: Send + 'static>(world: usize, timeout: Duration, f: fn(TcpComm) -> T) -> Vec<T> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut threads = Vec::new();
        for rank in 1..world {
            let cfg = TcpConfig::plain(rank, world, timeout);
            threads.push(std::thread::spawn(move || f(TcpComm::join(addr, &cfg).unwrap())));
        }
        let root = TcpComm::root(listener, &TcpConfig::plain(0, world, timeout)).unwrap();
        let mut out = vec![f(root)];
        out.extend(threads.into_iter().map(|t| t.join().unwrap()));
        out
    }

    #[test]
    fn collectives_give_every_rank_the_same_answer() {
        for world in [2, 3, 4] {
            let results = group(world, Duration::from_secs(10), |c| {
                let r = c.rank() as f32;
                let sum = c.all_reduce_sum_f32(&[r, 10.0 * r, 1.0]).unwrap();
                let gathered = c.all_gather_f32(&[r, r + 0.5]).unwrap();
                let from_last = c.broadcast(c.world_size() - 1, vec![c.rank() as u8; 3]).unwrap();
                c.barrier().unwrap();
                (sum, gathered, from_last)
            });
            let n = world as f32;
            let total = n * (n - 1.0) / 2.0;
            for (sum, gathered, from_last) in results {
                assert_eq!(sum, vec![total, 10.0 * total, n]);
                assert_eq!(gathered, (0..world).map(|r| vec![r as f32, r as f32 + 0.5]).collect::<Vec<_>>());
                assert_eq!(from_last, vec![(world - 1) as u8; 3]);
            }
        }
    }

    #[test]
    fn a_silent_peer_is_a_timeout_not_a_hang() {
        let start = Instant::now();
        let results = group(2, Duration::from_millis(300), |c| {
            if c.rank() == 1 {
                // Connected but never joins the collective, like a SIGSTOPped process.
                std::thread::sleep(Duration::from_millis(800));
                return None;
            }
            Some(c.all_reduce_sum_f32(&[1.0]).unwrap_err())
        });
        let err = results[0].as_ref().unwrap();
        assert!(matches!(err, CommError::Timeout { rank: 0, peer: 1, .. }), "{err}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_dead_peer_is_an_error_at_once() {
        let results = group(3, Duration::from_secs(30), |c| {
            if c.rank() == 2 {
                drop(c); // like SIGKILL: the socket closes
                return None;
            }
            let start = Instant::now();
            let err = c.all_reduce_sum_f32(&[1.0]).unwrap_err();
            Some((err.to_string(), start.elapsed()))
        });
        for (msg, took) in results.into_iter().flatten() {
            assert!(took < Duration::from_secs(5), "{msg} after {took:?}");
        }
    }

    #[test]
    fn mutual_tls_ranks_form_a_group_and_strangers_are_ignored() {
        use qwen_tls::dev::{DevCa, Usage};
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::create(dir.path(), "rank CA").unwrap();
        let cert = ca.issue("rank", &["127.0.0.1"], Usage::Server).unwrap();
        let tls = qwen_tls::PeerTls::load(&cert, &ca.ca_file(), None).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let timeout = Duration::from_secs(10);
        // A stranger connects first, in plain text, and says nothing useful.
        let stranger = std::thread::spawn(move || {
            let mut s = TcpStream::connect(addr).unwrap();
            let _ = s.write_all(&HELLO.to_le_bytes());
            std::thread::sleep(Duration::from_millis(300));
        });
        std::thread::sleep(Duration::from_millis(50));
        let mut threads = Vec::new();
        for rank in 1..3 {
            let cfg = TcpConfig { tls: Some(tls.clone()), ..TcpConfig::plain(rank, 3, timeout) };
            threads.push(std::thread::spawn(move || {
                let c = TcpComm::join(addr, &cfg).unwrap();
                c.all_reduce_sum_f32(&[rank as f32]).unwrap()
            }));
        }
        let root_cfg = TcpConfig { tls: Some(tls.clone()), ..TcpConfig::plain(0, 3, timeout) };
        let root = TcpComm::root(listener, &root_cfg).unwrap();
        assert_eq!(root.all_reduce_sum_f32(&[0.0]).unwrap(), vec![3.0]);
        for t in threads {
            assert_eq!(t.join().unwrap(), vec![3.0]);
        }
        stranger.join().unwrap();

        // A rank whose certificate comes from another CA cannot join.
        let other_dir = tempfile::tempdir().unwrap();
        let other = DevCa::create(other_dir.path(), "other CA").unwrap();
        let foreign = other.issue("rank", &["127.0.0.1"], Usage::Server).unwrap();
        let foreign = qwen_tls::PeerTls::load(&foreign, &other.ca_file(), None).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let joiner = std::thread::spawn(move || {
            let cfg = TcpConfig { tls: Some(foreign), ..TcpConfig::plain(1, 2, Duration::from_secs(2)) };
            TcpComm::join(addr, &cfg).and_then(|c| c.barrier())
        });
        let root_cfg = TcpConfig { tls: Some(tls), ..TcpConfig::plain(0, 2, Duration::from_millis(1500)) };
        assert!(matches!(TcpComm::root(listener, &root_cfg), Err(CommError::Timeout { .. })));
        assert!(joiner.join().unwrap().is_err());
    }

    #[test]
    fn a_huge_announced_message_is_an_error_not_an_allocation() {
        let results = group(2, Duration::from_secs(5), |c| {
            if c.rank() == 1 {
                let mut s = c.stream(0);
                s.write_all(&u64::MAX.to_le_bytes()).unwrap();
                s.flush().unwrap();
                return None;
            }
            Some(c.recv(1).unwrap_err().to_string())
        });
        assert!(results[0].as_ref().unwrap().contains("byte message"), "{:?}", results[0]);
    }

    #[test]
    fn bad_groups_are_refused() {
        let cfg = TcpConfig::plain(3, 2, Duration::from_millis(100));
        assert!(TcpComm::join("127.0.0.1:1".parse().unwrap(), &cfg).is_err());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let cfg = TcpConfig::plain(0, 2, Duration::from_millis(100));
        let err = TcpComm::root(listener, &cfg).err().unwrap();
        assert!(matches!(err, CommError::Timeout { peer: 1, .. }), "{err}");
    }
}
