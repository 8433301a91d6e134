//! NCCL backend (cargo feature `nccl`): tensor collectives run on the GPU, enqueued on the same
//! CUDA stream as the model's kernels so they order with compute and need no host sync. Step
//! plans and barriers are host bytes, so they keep travelling over the TCP control connection
//! to rank 0 (the same one the NCCL unique id is exchanged on).
//!
//! NCCL calls return as soon as the work is enqueued; a dead or stopped peer shows up as a kernel
//! that never finishes. A watchdog thread therefore follows an event recorded after every
//! collective; when the oldest one has been pending longer than the timeout it aborts the
//! communicator (which makes the stuck kernels return) and every later collective on this rank
//! fails with [`CommError::Timeout`]. This is the only file holding `unsafe` for NCCL.
#![allow(unsafe_code)] // NCCL calls

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{self, CudaEvent, CudaStream, DevicePtr, DevicePtrMut};
use candle_core::cuda_backend::cudarc::nccl::{result as nccl, sys as nccl_sys};
use candle_core::{CpuStorage, CudaStorage, CustomOp1, DType, Layout, Shape, Tensor};

use super::{CommError, Result, TcpComm};

/// How often the watchdog looks at pending collectives.
const WATCH_EVERY: Duration = Duration::from_millis(20);

pub struct NcclConfig {
    /// The stream of the model's CUDA device (`CudaDevice::cuda_stream`).
    pub stream: Arc<CudaStream>,
    /// The group's TCP connections: carries the unique id at start, then plans and barriers.
    pub control: TcpComm,
}

pub struct NcclComm {
    shared: Arc<Shared>,
    control: TcpComm,
}

/// The raw communicator; NCCL communicators may be used from any thread as long as calls on one
/// communicator do not race, which `Shared::inflight`'s mutex guarantees.
struct RawComm(nccl_sys::ncclComm_t);
unsafe impl Send for RawComm {}
unsafe impl Sync for RawComm {}

struct Shared {
    comm: RawComm,
    stream: Arc<CudaStream>,
    rank: usize,
    world_size: usize,
    timeout: Duration,
    aborted: AtomicBool,
    /// Collectives enqueued and not yet seen complete, oldest first; and spare events to reuse.
    /// Locked once per collective (per layer per step), never per token.
    inflight: Mutex<Inflight>,
}

#[derive(Default)]
struct Inflight {
    pending: VecDeque<(CudaEvent, Instant)>,
    spare: Vec<CudaEvent>,
}

impl NcclComm {
    /// Joins the NCCL communicator of the group `cfg.control` connects: rank 0 makes the unique
    /// id and broadcasts it; every rank then initialises its communicator (a blocking call that
    /// returns once all ranks have joined, which the preceding barrier makes prompt).
    pub fn new(cfg: NcclConfig) -> Result<Self> {
        let control = cfg.control;
        let (rank, world_size, timeout) = (control.rank(), control.world_size(), control.timeout());
        let id = if rank == 0 { unique_id()? } else { Vec::new() };
        let id = control.broadcast(0, id)?;
        let id = parse_id(&id)?;
        control.barrier()?;
        cfg.stream.context().bind_to_thread().map_err(|e| nccl_err("bind CUDA context", e))?;
        let mut raw = std::mem::MaybeUninit::uninit();
        // SAFETY: `raw` is written by ncclCommInitRank before it is read; rank < world_size.
        let raw = unsafe {
            nccl::comm_init_rank(raw.as_mut_ptr(), world_size as i32, id, rank as i32)
                .map_err(|e| nccl_err("ncclCommInitRank", e))?;
            raw.assume_init()
        };
        let shared = Arc::new(Shared {
            comm: RawComm(raw),
            stream: cfg.stream,
            rank,
            world_size,
            timeout,
            aborted: AtomicBool::new(false),
            inflight: Mutex::new(Inflight::default()),
        });
        let weak = Arc::downgrade(&shared);
        std::thread::Builder::new()
            .name(format!("nccl-watchdog-{rank}"))
            .spawn(move || watchdog(weak))
            .map_err(|e| CommError::Config(format!("cannot start the NCCL watchdog: {e}")))?;
        Ok(Self { shared, control })
    }

    pub fn rank(&self) -> usize {
        self.shared.rank
    }

    pub fn world_size(&self) -> usize {
        self.shared.world_size
    }

    pub fn timeout(&self) -> Duration {
        self.shared.timeout
    }

    /// Host time in the control channel; GPU time inside NCCL kernels is the profiler's to show.
    pub fn collective_time(&self) -> Duration {
        self.control.collective_time()
    }

    pub fn control(&self) -> &TcpComm {
        &self.control
    }

    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<Tensor> {
        let t = t.contiguous()?;
        Ok(t.apply_op1_no_bwd(&Collective { shared: &self.shared, kind: Kind::AllReduce })?)
    }

    /// Every rank's `t` concatenated along `dim` in rank order.
    pub fn all_gather(&self, t: &Tensor, dim: usize) -> Result<Tensor> {
        let t = t.contiguous()?;
        // NCCL lays the ranks' buffers end to end: [world, ..shape], then each rank's part is
        // moved next to the others along `dim`.
        let stacked = t.apply_op1_no_bwd(&Collective { shared: &self.shared, kind: Kind::AllGather })?;
        let parts = (0..self.shared.world_size).map(|r| stacked.get(r)).collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Tensor::cat(&parts, dim)?)
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if !self.aborted.swap(true, Ordering::SeqCst) {
            // SAFETY: the communicator is live (not aborted) and no call can race: we own the
            // last reference. Abort rather than destroy: destroy would wait on a dead peer.
            let _ = unsafe { nccl::comm_abort(self.comm.0) };
        }
    }
}

#[derive(Clone, Copy)]
enum Kind {
    AllReduce,
    AllGather,
}

struct Collective<'a> {
    shared: &'a Shared,
    kind: Kind,
}

impl CustomOp1 for Collective<'_> {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::AllReduce => "nccl-all-reduce",
            Kind::AllGather => "nccl-all-gather",
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("NCCL collectives need tensors on a CUDA device")
    }

    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> candle_core::Result<(CudaStorage, Shape)> {
        use half::{bf16, f16};
        let n = l.shape().elem_count();
        match l.contiguous_offsets() {
            Some((0, end)) if end == n => {}
            _ => candle_core::bail!("NCCL input must be contiguous from offset 0"),
        }
        let world = self.shared.world_size;
        let (out_len, out_shape) = match self.kind {
            Kind::AllReduce => (n, l.shape().clone()),
            Kind::AllGather => {
                let mut dims = vec![world];
                dims.extend_from_slice(l.dims());
                (n * world, Shape::from(dims))
            }
        };
        let dev = s.device().clone();
        macro_rules! run {
            ($t:ty, $nccl_t:expr) => {{
                let src = s.as_cuda_slice::<$t>()?;
                let mut dst = dev.alloc_zeros::<$t>(out_len)?;
                self.shared.enqueue(|comm, stream| {
                    let (src_ptr, _src_guard) = src.device_ptr(stream);
                    let (dst_ptr, _dst_guard) = dst.device_ptr_mut(stream);
                    let cu_stream = stream.cu_stream() as nccl_sys::cudaStream_t;
                    // SAFETY: both buffers live on `stream`'s device for the call and are sized
                    // for it (n in, out_len out); the comm is live (checked under the lock).
                    unsafe {
                        match self.kind {
                            Kind::AllReduce => nccl::all_reduce(
                                src_ptr as _,
                                dst_ptr as _,
                                n,
                                $nccl_t,
                                nccl_sys::ncclRedOp_t::ncclSum,
                                comm,
                                cu_stream,
                            ),
                            Kind::AllGather => {
                                nccl::all_gather(src_ptr as _, dst_ptr as _, n, $nccl_t, comm, cu_stream)
                            }
                        }
                    }
                })?;
                CudaStorage::wrap_cuda_slice(dst, dev.clone())
            }};
        }
        let out = match s.dtype() {
            DType::BF16 => run!(bf16, nccl_sys::ncclDataType_t::ncclBfloat16),
            DType::F16 => run!(f16, nccl_sys::ncclDataType_t::ncclFloat16),
            DType::F32 => run!(f32, nccl_sys::ncclDataType_t::ncclFloat32),
            dt => candle_core::bail!("NCCL collectives: unsupported dtype {dt:?}"),
        };
        Ok((out, out_shape))
    }
}

impl Shared {
    /// Runs `call` (one NCCL enqueue) under the lock, then records an event behind it for the
    /// watchdog. Fails without calling NCCL once the communicator has been aborted.
    fn enqueue(
        &self,
        call: impl FnOnce(nccl_sys::ncclComm_t, &Arc<CudaStream>) -> Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> candle_core::Result<()> {
        let mut inflight = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
        if self.aborted.load(Ordering::SeqCst) {
            return Err(candle_core::Error::wrap(self.timed_out()));
        }
        call(self.comm.0, &self.stream).map_err(|e| candle_core::Error::wrap(nccl_err("NCCL collective", e)))?;
        let event = match inflight.spare.pop() {
            Some(e) => e,
            None => {
                self.stream.context().new_event(None).map_err(|e| candle_core::Error::wrap(nccl_err("event", e)))?
            }
        };
        event.record(&self.stream).map_err(|e| candle_core::Error::wrap(nccl_err("event record", e)))?;
        inflight.pending.push_back((event, Instant::now()));
        Ok(())
    }

    fn timed_out(&self) -> CommError {
        // The watchdog cannot tell which peer stalled; rank 0 is the hub of the control channel.
        let peer = if self.rank == 0 { 1 } else { 0 };
        CommError::Timeout { rank: self.rank, peer, timeout: self.timeout }
    }
}

/// Retires completed collectives and aborts the communicator when the oldest pending one is
/// older than the timeout. Ends when the communicator is dropped.
fn watchdog(shared: Weak<Shared>) {
    let mut bound = false;
    loop {
        std::thread::sleep(WATCH_EVERY);
        let Some(shared) = shared.upgrade() else { return };
        if !bound {
            if shared.stream.context().bind_to_thread().is_err() {
                continue;
            }
            bound = true;
        }
        let mut inflight = shared.inflight.lock().unwrap_or_else(|p| p.into_inner());
        while let Some((event, since)) = inflight.pending.front() {
            // SAFETY: the event is live (we own it) and belongs to the bound context.
            let status = unsafe { driver::sys::cuEventQuery(event.cu_event()) };
            if status == driver::sys::cudaError_enum::CUDA_SUCCESS {
                let (event, _) = inflight.pending.pop_front().expect("front exists");
                inflight.spare.push(event);
                continue;
            }
            if since.elapsed() > shared.timeout && !shared.aborted.swap(true, Ordering::SeqCst) {
                tracing::error!(rank = shared.rank, timeout = ?shared.timeout, "NCCL collective stuck; aborting the communicator");
                // SAFETY: the lock is held, so no enqueue races the abort; `aborted` keeps Drop
                // from aborting twice.
                let _ = unsafe { nccl::comm_abort(shared.comm.0) };
                inflight.pending.clear();
            }
            break;
        }
    }
}

fn unique_id() -> Result<Vec<u8>> {
    let id = nccl::get_uniqueid().map_err(|e| nccl_err("ncclGetUniqueId", e))?;
    Ok(id.internal.iter().map(|&c| c as u8).collect())
}

fn parse_id(bytes: &[u8]) -> Result<nccl_sys::ncclUniqueId> {
    let mut internal = [0 as std::ffi::c_char; 128];
    if bytes.len() != internal.len() {
        return Err(CommError::Config(format!("NCCL unique id of {} bytes; expected 128", bytes.len())));
    }
    for (dst, &b) in internal.iter_mut().zip(bytes) {
        *dst = b as std::ffi::c_char;
    }
    Ok(nccl_sys::ncclUniqueId { internal })
}

fn nccl_err(what: &str, e: impl std::fmt::Debug) -> CommError {
    CommError::Nccl(format!("{what}: {e:?}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unique_id_bytes_round_trip() {
        let bytes: Vec<u8> = (0..128u32).map(|i| (i * 7 % 256) as u8).collect();
        let id = parse_id(&bytes).unwrap();
        assert_eq!(id.internal.iter().map(|&c| c as u8).collect::<Vec<_>>(), bytes);
        assert!(matches!(parse_id(&bytes[..127]), Err(CommError::Config(m)) if m.contains("127 bytes")));
    }

    /// Needs a GPU (NCCL refuses two ranks on one device, so world size 1); run by the GPU
    /// check script with `QWEN_REQUIRE_GPU=1`, which turns a missing device into a failure.
    #[test]
    fn world_size_one_collectives_on_the_gpu() {
        use crate::comm::TcpConfig;
        let device = match crate::device::DeviceSpec::Cuda(0).open() {
            Ok(d) => d,
            Err(e) if std::env::var_os("QWEN_REQUIRE_GPU").is_none() => {
                eprintln!("skipped: no CUDA device ({e})");
                return;
            }
            Err(e) => panic!("QWEN_REQUIRE_GPU set but no CUDA device: {e}"),
        };
        let stream = device.as_cuda_device().unwrap().cuda_stream();
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let cfg = TcpConfig::plain(0, 1, Duration::from_secs(5));
        let comm = NcclComm::new(NcclConfig { stream, control: TcpComm::root(listener, &cfg).unwrap() }).unwrap();
        let t = Tensor::arange(0f32, 24.0, &device).unwrap().reshape((4, 6)).unwrap();
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            let t = t.to_dtype(dtype).unwrap();
            let sum = comm.all_reduce_sum(&t).unwrap();
            let gathered = comm.all_gather(&t, 1).unwrap();
            let host = |x: &Tensor| x.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap();
            assert_eq!(host(&sum), host(&t), "{dtype:?}");
            assert_eq!(host(&gathered), host(&t), "{dtype:?}");
        }
        // Non-contiguous input is made contiguous first.
        let tt = comm.all_reduce_sum(&t.t().unwrap()).unwrap();
        assert_eq!(tt.dims(), &[6, 4]);
        assert!(comm.shared.inflight.lock().unwrap().pending.len() <= 7);
    }
}
