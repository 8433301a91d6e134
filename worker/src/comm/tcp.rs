//! Collectives for CPU ranks over TCP, in a star around rank 0: every rank holds one connection
//! to rank 0, which combines (in rank order, so results are identical on every rank) and sends
//! back. Simple and exact; for the handful of CPU ranks this backend serves, the star's extra hop
//! costs less than a ring's extra round trips.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::{Duration, Instant};

use super::{CommError, Result};

#[derive(Debug, Clone)]
pub struct TcpConfig {
    pub rank: usize,
    pub world_size: usize,
    /// Longest a collective waits on a peer; also bounds connecting at start.
    pub timeout: Duration,
}

pub struct TcpComm {
    rank: usize,
    world_size: usize,
    timeout: Duration,
    /// Rank 0: the streams of ranks 1.., in rank order. Other ranks: the stream to rank 0.
    peers: Vec<TcpStream>,
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
        let mut slots: Vec<Option<TcpStream>> = (1..cfg.world_size).map(|_| None).collect();
        while slots.iter().any(Option::is_none) {
            match listener.accept() {
                Ok((stream, _)) => {
                    stream.set_nonblocking(false).map_err(|e| io(0, 0, e))?;
                    configure(&stream, cfg.timeout).map_err(|e| io(0, 0, e))?;
                    let (hello, rank, world) =
                        (read_u32(&stream, 0, 0)?, read_u32(&stream, 0, 0)?, read_u32(&stream, 0, 0)?);
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
        let peers = slots.into_iter().map(|s| s.expect("all joined")).collect();
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
        let mut hello = Vec::with_capacity(12);
        for v in [HELLO, cfg.rank as u32, cfg.world_size as u32] {
            hello.extend_from_slice(&v.to_le_bytes());
        }
        (&stream).write_all(&hello).map_err(|e| io(cfg.rank, 0, e))?;
        Ok(TcpComm {
            rank: cfg.rank,
            world_size: cfg.world_size,
            timeout: cfg.timeout,
            peers: vec![stream],
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

    /// Rank 0's stream to `peer`, or a non-root rank's stream to rank 0.
    fn stream(&self, peer: usize) -> &TcpStream {
        if self.rank == 0 {
            &self.peers[peer - 1]
        } else {
            &self.peers[0]
        }
    }

    fn send(&self, peer: usize, bytes: &[u8]) -> Result<()> {
        let mut s = self.stream(peer);
        s.write_all(&(bytes.len() as u64).to_le_bytes())
            .and_then(|_| s.write_all(bytes))
            .map_err(|e| self.fail(peer, e))
    }

    fn recv(&self, peer: usize) -> Result<Vec<u8>> {
        let mut s = self.stream(peer);
        let mut len = [0u8; 8];
        s.read_exact(&mut len).map_err(|e| self.fail(peer, e))?;
        let mut buf = vec![0u8; u64::from_le_bytes(len) as usize];
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

fn read_u32(s: &TcpStream, rank: usize, peer: usize) -> Result<u32> {
    let mut b = [0u8; 4];
    let mut r = s;
    r.read_exact(&mut b).map_err(|e| io(rank, peer, e))?;
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
            let cfg = TcpConfig { rank, world_size: world, timeout };
            threads.push(std::thread::spawn(move || f(TcpComm::join(addr, &cfg).unwrap())));
        }
        let root = TcpComm::root(listener, &TcpConfig { rank: 0, world_size: world, timeout }).unwrap();
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
    fn bad_groups_are_refused() {
        let cfg = TcpConfig { rank: 3, world_size: 2, timeout: Duration::from_millis(100) };
        assert!(TcpComm::join("127.0.0.1:1".parse().unwrap(), &cfg).is_err());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let cfg = TcpConfig { rank: 0, world_size: 2, timeout: Duration::from_millis(100) };
        let err = TcpComm::root(listener, &cfg).err().unwrap();
        assert!(matches!(err, CommError::Timeout { peer: 1, .. }), "{err}");
    }
}
