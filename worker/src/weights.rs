//! Memory-mapped safetensors checkpoints: one `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`. Tensors are read by name with their expected shape and
//! converted to the compute dtype on the target device; every failure names file and tensor.
#![allow(unsafe_code)] // memory-mapped checkpoints

use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::tensor::{Dtype as StDtype, Metadata, SafeTensors};

use crate::error::{Error, Result};
use crate::quant::QuantConfig;

struct Shard {
    path: PathBuf,
    mmap: Mmap,
    /// Byte offset of the data section (8-byte length + JSON header).
    data_start: usize,
    metadata: Metadata,
}

impl Shard {
    fn open(path: PathBuf) -> Result<Self> {
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, e))?;
        // SAFETY: the checkpoint files are treated as read-only for the process lifetime; a
        // concurrent writer truncating them is outside what any model server can defend against.
        let mmap = unsafe { Mmap::map(&file) }.map_err(|e| Error::io(&path, e))?;
        let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
            .map_err(|e| Error::Safetensors { path: path.clone(), message: e.to_string() })?;
        Ok(Shard { path, data_start: 8 + header_len, mmap, metadata })
    }
}

/// All tensors of a checkpoint directory, by name — or random values in whatever shape the
/// model asks for (benchmarks of real checkpoint shapes need no files).
pub struct Weights {
    shards: Vec<Shard>,
    /// Tensor name → index into `shards`.
    index: HashMap<String, usize>,
    device: Device,
    dtype: DType,
    /// Bytes of random tensors handed out so far, when random.
    random: Option<std::cell::Cell<usize>>,
    /// The checkpoint's quantization format, set from its config before the model loads.
    quant: std::cell::Cell<Option<QuantConfig>>,
}

impl Weights {
    /// Opens the safetensors files of `dir` for loading tensors as `dtype` on `device`.
    pub fn open(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let files = if index_path.exists() {
            shard_files(dir, &index_path)?
        } else if single.exists() {
            vec![single]
        } else {
            return Err(Error::NoWeights { dir: dir.to_path_buf() });
        };
        let mut shards = Vec::with_capacity(files.len());
        let mut index = HashMap::new();
        for path in files {
            let shard = Shard::open(path)?;
            for name in shard.metadata.tensors().into_keys() {
                index.insert(name, shards.len());
            }
            shards.push(shard);
        }
        Ok(Weights { shards, index, device: device.clone(), dtype, random: None, quant: Default::default() })
    }

    /// Random weights, made directly on `device`: N(0, 0.02) for matrices and biases, 1 for
    /// norms (so activations keep a sane scale through many layers). No tensor "exists"
    /// ([`Weights::contains`] is false), so tied checkpoints reuse the embedding as usual.
    pub fn random(dtype: DType, device: &Device) -> Self {
        Weights {
            shards: Vec::new(),
            index: HashMap::new(),
            device: device.clone(),
            dtype,
            random: Some(std::cell::Cell::new(0)),
            quant: Default::default(),
        }
    }

    /// The format of the checkpoint's quantized linears (from `config.json`).
    pub fn quant(&self) -> Option<QuantConfig> {
        self.quant.get()
    }

    pub fn set_quant(&self, quant: Option<QuantConfig>) {
        self.quant.set(quant);
    }

    /// Bytes of the random tensors made so far (the model's weight bytes once it is built).
    pub fn random_bytes(&self) -> usize {
        self.random.as_ref().map_or(0, |c| c.get())
    }

    /// Whether tensors are made up rather than read.
    pub fn is_random(&self) -> bool {
        self.random.is_some()
    }

    /// Counts `bytes` of random weights made elsewhere (quantized linears) in
    /// [`Weights::random_bytes`].
    pub fn note_random_bytes(&self, bytes: usize) {
        if let Some(c) = &self.random {
            c.set(c.get() + bytes);
        }
    }

    fn make_random(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = if name.contains("norm") || name.contains(".ln_") || name.ends_with("ln_f.weight") {
            Tensor::ones(shape, self.dtype, &self.device)?
        } else {
            Tensor::randn(0f32, 0.02, shape, &self.device)?.to_dtype(self.dtype)?
        };
        if let Some(c) = &self.random {
            c.set(c.get() + t.elem_count() * self.dtype.size_in_bytes());
        }
        Ok(t)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.index.contains_key(name)
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Loads tensor `name`, checking it has exactly `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        if self.random.is_some() {
            return self.make_random(name, shape);
        }
        let (data, dtype) = self.raw(name, shape, false)?;
        self.finish(data, dtype, shape)
    }

    /// Loads only index ranges `ranges` along `dim` of tensor `name` (whose full shape must be
    /// `shape`), concatenated in order: a tensor-parallel rank's slice, read straight from the
    /// memory map without materialising the rest. Tensors of up to two dimensions.
    pub fn get_ranges(&self, name: &str, shape: &[usize], dim: usize, ranges: &[Range<usize>]) -> Result<Tensor> {
        check_ranges(name, shape, dim, ranges)?;
        if self.random.is_some() {
            let mut sliced = shape.to_vec();
            sliced[dim] = ranges.iter().map(|r| r.end - r.start).sum();
            return self.make_random(name, &sliced);
        }
        let (out, dtype, sliced) = self.stored_ranges(name, shape, dim, ranges)?;
        self.finish(&out, dtype, &sliced)
    }

    /// The stored dtype and shape of tensor `name`, if the checkpoint has it.
    pub fn stored_info(&self, name: &str) -> Option<(DType, Vec<usize>)> {
        let info = self.shard_of(name).ok()?.metadata.info(name)?;
        Some((stored_dtype(info.dtype)?, info.shape.clone()))
    }

    /// [`Weights::get_ranges`] without any conversion: the bytes as stored (integers and FP8
    /// included, for quantized linears), their dtype and the sliced shape, on the host.
    pub fn stored_ranges(
        &self,
        name: &str,
        shape: &[usize],
        dim: usize,
        ranges: &[Range<usize>],
    ) -> Result<(Vec<u8>, DType, Vec<usize>)> {
        check_ranges(name, shape, dim, ranges)?;
        let (data, dtype) = self.raw(name, shape, true)?;
        let el = dtype.size_in_bytes();
        let cols = if shape.len() == 2 { shape[1] } else { 1 };
        let mut out = Vec::new();
        if dim == 0 {
            for r in ranges {
                out.extend_from_slice(&data[r.start * cols * el..r.end * cols * el]);
            }
        } else {
            for row in 0..shape[0] {
                for r in ranges {
                    out.extend_from_slice(&data[(row * cols + r.start) * el..(row * cols + r.end) * el]);
                }
            }
        }
        let mut sliced = shape.to_vec();
        sliced[dim] = ranges.iter().map(|r| r.end - r.start).sum();
        Ok((out, dtype, sliced))
    }

    /// The bytes and stored dtype of tensor `name`, checked against `shape`. Only float
    /// tensors, unless `any_dtype` (the integer and FP8 parts of quantized linears, which must
    /// never be converted as if they were values).
    fn raw(&self, name: &str, shape: &[usize], any_dtype: bool) -> Result<(&[u8], DType)> {
        let shard = self.shard_of(name)?;
        let info = shard.metadata.info(name).ok_or_else(|| self.missing(name))?;
        if info.shape != shape {
            return Err(Error::TensorShape {
                path: shard.path.clone(),
                name: name.to_string(),
                expected: shape.to_vec(),
                found: info.shape.clone(),
            });
        }
        let dtype = match stored_dtype(info.dtype) {
            Some(d @ (DType::F32 | DType::F16 | DType::BF16)) => d,
            Some(d) if any_dtype => d,
            _ => {
                let other = info.dtype;
                return Err(Error::TensorDtype {
                    path: shard.path.clone(),
                    name: name.to_string(),
                    found: format!("{other:?}"),
                });
            }
        };
        let (start, end) = info.data_offsets;
        let data =
            shard.mmap.get(shard.data_start + start..shard.data_start + end).ok_or_else(|| Error::Safetensors {
                path: shard.path.clone(),
                message: format!("tensor `{name}` lies past the end of the file"),
            })?;
        let expected = shape.iter().product::<usize>() * dtype.size_in_bytes();
        if data.len() != expected {
            return Err(Error::Safetensors {
                path: shard.path.clone(),
                message: format!("tensor `{name}` holds {} bytes, its shape needs {expected}", data.len()),
            });
        }
        Ok((data, dtype))
    }

    /// Bytes on the host → a tensor in the compute dtype on the device. Converting on the CPU
    /// first means only the final tensor crosses to the device and no device holds both copies.
    fn finish(&self, data: &[u8], dtype: DType, shape: &[usize]) -> Result<Tensor> {
        let tensor = Tensor::from_raw_buffer(data, dtype, shape, &Device::Cpu)?;
        Ok(tensor.to_dtype(self.dtype)?.to_device(&self.device)?)
    }

    fn shard_of(&self, name: &str) -> Result<&Shard> {
        self.index.get(name).map(|&i| &self.shards[i]).ok_or_else(|| self.missing(name))
    }

    fn missing(&self, name: &str) -> Error {
        let searched = self.shards.iter().map(|s| s.path.display().to_string()).collect::<Vec<_>>().join(", ");
        Error::MissingTensor { name: name.to_string(), searched }
    }
}

/// Ranges along `dim` of a tensor of `shape` that [`Weights::get_ranges`] can cut: tensors of up
/// to two dimensions, ranges inside the dimension.
fn check_ranges(name: &str, shape: &[usize], dim: usize, ranges: &[Range<usize>]) -> Result<()> {
    let bad = |message: String| Error::InvalidInput { field: "shard", message: format!("`{name}`: {message}") };
    if shape.len() > 2 || dim >= shape.len() {
        return Err(bad(format!("cannot slice dim {dim} of a tensor of shape {shape:?}")));
    }
    if let Some(r) = ranges.iter().find(|r| r.start > r.end || r.end > shape[dim]) {
        return Err(bad(format!("range {r:?} outside 0..{}", shape[dim])));
    }
    Ok(())
}

fn stored_dtype(d: StDtype) -> Option<DType> {
    Some(match d {
        StDtype::F32 => DType::F32,
        StDtype::F16 => DType::F16,
        StDtype::BF16 => DType::BF16,
        StDtype::I32 => DType::I32,
        StDtype::U8 => DType::U8,
        StDtype::F8_E4M3 => DType::F8E4M3,
        _ => return None,
    })
}

/// The distinct shard files named by an index's `weight_map`, in a stable order.
fn shard_files(dir: &Path, index_path: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(index_path).map_err(|e| Error::io(index_path, e))?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|source| Error::Json { path: index_path.to_path_buf(), source })?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::field(index_path, "weight_map", "missing or not an object"))?;
    let mut files: Vec<String> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            Error::field(index_path, "weight_map", format!("entry for `{tensor}` is not a file name"))
        })?;
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(Error::field(index_path, "weight_map", format!("shard {file:?} is not a plain file name")));
        }
        if !files.iter().any(|f| f == file) {
            files.push(file.to_string());
        }
    }
    files.sort();
    Ok(files.into_iter().map(|f| dir.join(f)).collect())
}
