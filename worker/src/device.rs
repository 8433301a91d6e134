//! Which device a worker computes on, as given on the command line: `cpu`, `cuda` (GPU 0) or
//! `cuda:N`.
#![allow(unsafe_code)] // turning off candle's event tracking

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(i)) => Ok(DeviceSpec::Cuda(i)),
                _ => Err(format!("{s:?} is not a device: use cpu, cuda or cuda:N")),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Cpu => write!(f, "cpu"),
            DeviceSpec::Cuda(i) => write!(f, "cuda:{i}"),
        }
    }
}

impl DeviceSpec {
    /// The same kind of device with its ordinal moved by `offset` (a tensor-parallel rank's GPU).
    pub fn offset(self, offset: usize) -> Self {
        match self {
            DeviceSpec::Cpu => DeviceSpec::Cpu,
            DeviceSpec::Cuda(i) => DeviceSpec::Cuda(i + offset),
        }
    }

    pub fn is_cuda(self) -> bool {
        matches!(self, DeviceSpec::Cuda(_))
    }

    /// Opens the device; a CUDA device in a build without the `cuda` feature, or one the driver
    /// cannot open, is an error naming `--device`.
    pub fn open(self) -> Result<Device> {
        match self {
            DeviceSpec::Cpu => Ok(Device::Cpu),
            DeviceSpec::Cuda(i) => {
                if !cfg!(feature = "cuda") {
                    return Err(Error::InvalidInput {
                        field: "device",
                        message: format!("{self}: this worker was built without the `cuda` feature"),
                    });
                }
                // One stream made for this device, not candle's default per-thread stream: the
                // weights and cache are made on the main thread and used on the engine thread,
                // and with a per-thread stream each thread would issue to a different stream
                // with nothing ordering them.
                let device = Device::new_cuda_with_stream(i).map_err(|e| Error::InvalidInput {
                    field: "device",
                    message: format!("{self}: cannot open the GPU: {e}"),
                })?;
                #[cfg(feature = "cuda")]
                if let Device::Cuda(d) = &device {
                    // SAFETY: the worker issues all its device work (candle's ops, its kernels,
                    // NCCL), from every thread, on this device's one stream (made above), so
                    // stream order alone keeps every buffer's uses in order; no cross-stream events are needed. Without them a
                    // decode step can be captured into a CUDA graph (no waits on events recorded
                    // outside the capture). Called before any tensor exists on the device.
                    unsafe { d.disable_event_tracking() };
                }
                Ok(device)
            }
        }
    }
}

/// Memory a KV cache may come from: MemAvailable of the host for the CPU, free memory of the
/// GPU (after the weights, when called after loading) for CUDA.
pub fn free_memory(device: &Device) -> Result<u64> {
    match device {
        #[cfg(feature = "cuda")]
        Device::Cuda(d) => {
            use candle_core::cuda_backend::cudarc::driver::result;
            let err = |e: &dyn std::fmt::Display| Error::InvalidInput {
                field: "device",
                message: format!("cannot read the GPU's free memory: {e}"),
            };
            d.cuda_stream().context().bind_to_thread().map_err(|e| err(&format!("{e:?}")))?;
            let (free, _total) = result::mem_get_info().map_err(|e| err(&format!("{e:?}")))?;
            Ok(free as u64)
        }
        _ => host_available_memory(),
    }
}

/// MemAvailable from /proc/meminfo, in bytes.
fn host_available_memory() -> Result<u64> {
    let path = "/proc/meminfo";
    let info = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    info.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kib| kib * 1024)
        .ok_or_else(|| Error::InvalidInput {
            field: "kv_cache_fraction",
            message: format!("no MemAvailable in {path}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_by_name() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("cuda".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert!("gpu".parse::<DeviceSpec>().unwrap_err().contains("cpu, cuda or cuda:N"));
        assert_eq!(DeviceSpec::Cuda(1).offset(2), DeviceSpec::Cuda(3));
        #[cfg(not(feature = "cuda"))]
        assert!(DeviceSpec::Cuda(0).open().unwrap_err().to_string().contains("without the `cuda` feature"));
    }

    #[test]
    fn the_host_has_free_memory() {
        assert!(free_memory(&Device::Cpu).unwrap() > 0);
    }
}
