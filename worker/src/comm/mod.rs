//! Collectives between the ranks of a tensor-parallel group. [`Comm`] is an enum so model code
//! calls one API whatever the backend: `Single` (world size 1, every collective a no-op), `Tcp`
//! (CPU ranks over loopback or a network) and `Nccl` (GPU ranks, feature `nccl`). Every collective
//! has a timeout: a dead or stopped peer turns into an error, never a hang.

#[cfg(feature = "nccl")]
pub mod nccl;
pub mod tcp;

use std::time::Duration;

use candle_core::{DType, Tensor};

#[cfg(feature = "nccl")]
pub use nccl::{NcclComm, NcclConfig};
pub use tcp::{TcpComm, TcpConfig};

#[derive(Debug, thiserror::Error)]
pub enum CommError {
    #[error("rank {rank}: collective timed out after {timeout:?} waiting for rank {peer}")]
    Timeout { rank: usize, peer: usize, timeout: Duration },
    #[error("rank {rank}: connection to rank {peer} failed: {source}")]
    Io {
        rank: usize,
        peer: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("rank {rank}: peer {peer} sent {got} bytes where {expected} were expected")]
    Protocol { rank: usize, peer: usize, got: usize, expected: usize },
    #[error("invalid group: {0}")]
    Config(String),
    #[error("NCCL: {0}")]
    Nccl(String),
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = CommError> = std::result::Result<T, E>;

/// A rank's handle on its group.
pub enum Comm {
    /// World size 1: nothing to exchange.
    Single,
    Tcp(TcpComm),
    /// GPU ranks: tensors over NCCL, step plans over the TCP control connection.
    #[cfg(feature = "nccl")]
    Nccl(NcclComm),
}

impl Comm {
    pub fn rank(&self) -> usize {
        match self {
            Comm::Single => 0,
            Comm::Tcp(c) => c.rank(),
            #[cfg(feature = "nccl")]
            Comm::Nccl(c) => c.rank(),
        }
    }

    pub fn world_size(&self) -> usize {
        match self {
            Comm::Single => 1,
            Comm::Tcp(c) => c.world_size(),
            #[cfg(feature = "nccl")]
            Comm::Nccl(c) => c.world_size(),
        }
    }

    /// Time this rank has spent inside collectives (zero alone).
    pub fn collective_time(&self) -> Duration {
        match self {
            Comm::Single => Duration::ZERO,
            Comm::Tcp(c) => c.collective_time(),
            #[cfg(feature = "nccl")]
            Comm::Nccl(c) => c.collective_time(),
        }
    }

    /// How long a collective waits on a peer before failing.
    pub fn timeout(&self) -> Duration {
        match self {
            Comm::Single => Duration::MAX,
            Comm::Tcp(c) => c.timeout(),
            #[cfg(feature = "nccl")]
            Comm::Nccl(c) => c.timeout(),
        }
    }

    /// Element-wise sum of `t` over all ranks, returned on every rank. Summation runs in rank
    /// order, so every rank gets bit-identical results.
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        match self {
            Comm::Single => Ok(t.clone()),
            Comm::Tcp(c) => {
                let (data, dtype) = to_f32(t)?;
                let summed = c.all_reduce_sum_f32(&data)?;
                Ok(Tensor::from_vec(summed, t.shape(), t.device())?.to_dtype(dtype)?)
            }
            #[cfg(feature = "nccl")]
            Comm::Nccl(c) => c.all_reduce_sum(t),
        }
    }

    /// Every rank's `t` concatenated along `dim` in rank order; all ranks' tensors must have the
    /// same shape.
    pub fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        match self {
            Comm::Single => Ok(t.clone()),
            Comm::Tcp(c) => {
                let (data, dtype) = to_f32(t)?;
                let parts = c.all_gather_f32(&data)?;
                let parts = parts
                    .into_iter()
                    .map(|p| Ok(Tensor::from_vec(p, t.shape(), t.device())?.to_dtype(dtype)?))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Tensor::cat(&parts, dim)?)
            }
            #[cfg(feature = "nccl")]
            Comm::Nccl(c) => c.all_gather(t, dim),
        }
    }

    /// `data` from rank `root`, delivered to every rank (others pass anything, e.g. empty).
    pub fn broadcast_bytes(&self, root: usize, data: Vec<u8>) -> Result<Vec<u8>> {
        match self {
            Comm::Single => Ok(data),
            Comm::Tcp(c) => c.broadcast(root, data),
            #[cfg(feature = "nccl")]
            Comm::Nccl(c) => c.control().broadcast(root, data),
        }
    }

    /// Returns once every rank has reached it.
    pub fn barrier(&self) -> Result<()> {
        match self {
            Comm::Single => Ok(()),
            Comm::Tcp(c) => c.barrier(),
            #[cfg(feature = "nccl")]
            Comm::Nccl(c) => c.control().barrier(),
        }
    }
}

fn to_f32(t: &Tensor) -> Result<(Vec<f32>, DType)> {
    Ok((t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?, t.dtype()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use std::net::TcpListener;

    #[test]
    fn tensor_collectives_keep_shape_and_dtype() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let timeout = Duration::from_secs(10);
        let run = |comm: Comm| -> (Vec<Vec<f32>>, Vec<Vec<f32>>, DType) {
            let r = comm.rank() as f32;
            let t = Tensor::new(&[[r, 1.0], [2.0, r]], &Device::Cpu).unwrap().to_dtype(DType::BF16).unwrap();
            let sum = comm.all_reduce_sum(&t).unwrap();
            let gathered = comm.all_gather(&t, 1).unwrap();
            let f = |x: &Tensor| x.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
            (f(&sum), f(&gathered), sum.dtype())
        };
        let peer =
            std::thread::spawn(move || run(Comm::Tcp(TcpComm::join(addr, &TcpConfig::plain(1, 2, timeout)).unwrap())));
        let root = run(Comm::Tcp(TcpComm::root(listener, &TcpConfig::plain(0, 2, timeout)).unwrap()));
        assert_eq!(root, peer.join().unwrap());
        assert_eq!(root.0, vec![vec![1.0, 2.0], vec![4.0, 1.0]]);
        assert_eq!(root.1, vec![vec![0.0, 1.0, 1.0, 1.0], vec![2.0, 0.0, 2.0, 1.0]]);
        assert_eq!(root.2, DType::BF16);
        let single = run(Comm::Single);
        assert_eq!(single.0, vec![vec![0.0, 1.0], vec![2.0, 0.0]]);
    }
}
