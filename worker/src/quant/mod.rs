//! Quantized linears (GPTQ, AWQ, block FP8) kept quantized in memory. Each weight is
//! `(q − zero) · scale` (GPTQ, AWQ) or `e4m3(q) · scale_inv` (FP8), computed exactly as a
//! dequantize-to-f32 reference does, and never stored dequantized beyond one tile:
//! - up to [`GEMV_MAX_TOKENS`] rows (decode): each weight is dequantized in registers and used
//!   for every row at once, output columns split over the CPU's threads;
//! - more rows (prefill): one tile of output columns at a time is dequantized into f32 and
//!   multiplied by candle's GEMM, the dequantizing amortised over the rows.
//!
//! Which linears are quantized is read from the checkpoint itself (a `qweight` tensor, or an
//! FP8 `weight`); routers, norms, embeddings and the LM head stay as they are. This rank's slice
//! of a tensor-parallel group is cut at load ([`load`]); scales and zeros are unpacked there too,
//! so slicing needs no packing alignment except GPTQ's input rows (whole `int32` words).

mod config;
pub mod load;
#[cfg(test)]
mod tests;

pub use config::QuantConfig;

use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use half::f16;

use crate::error::{Error, Result};

/// Output columns dequantized per tile: a tile of a 4,864-wide input is 2.4 MB of f32.
const TILE_COLS: usize = 128;

/// Rows up to which the forward dequantizes in registers instead of into tiles.
pub const GEMV_MAX_TOKENS: usize = 8;

/// Output columns per parallel task of the small-batch path (a multiple of AWQ's 8).
const GEMV_COLS: usize = 256;

/// AWQ packs 8 output columns per `int32`, column `j` in nibble `AWQ_NIBBLE[j]`.
pub const AWQ_NIBBLE: [u32; 8] = [0, 4, 1, 5, 2, 6, 3, 7];

/// One linear's weight (this rank's slice), quantized, on the host.
#[derive(Debug)]
pub struct QuantWeight {
    pub in_dim: usize,
    pub out_dim: usize,
    kind: Kind,
}

#[derive(Debug)]
enum Kind {
    /// GPTQ (packed along inputs) or AWQ (packed along outputs), on the host.
    Int(IntWeight),
    Fp8(Fp8Weight),
    /// Either, on a GPU (`kernels::quant_matmul`).
    Device(crate::kernels::QuantTensors),
}

#[derive(Debug)]
struct IntWeight {
    bits: u32,
    packing: Packing,
    packed: Vec<u32>,
    /// `[groups, out]`: the true zero point (GPTQ's stored zero + 1, up to 256 at 8 bits).
    zeros: Vec<u16>,
    /// `[groups, out]`.
    scales: Vec<f32>,
    /// Group of each input row, indexing `zeros`/`scales`.
    group: Vec<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Packing {
    /// GPTQ: `[in / (32 / bits), out]`, input row `i` in bits `(i % per) * bits`.
    AlongIn,
    /// AWQ: `[in, out / 8]`, output column `o` in nibble `AWQ_NIBBLE[o % 8]`.
    AlongOut,
}

#[derive(Debug)]
struct Fp8Weight {
    /// `[out, in]` float8_e4m3fn bytes.
    weight: Vec<u8>,
    /// The checkpoint's whole `weight_scale_inv` `[ceil(out / br), ceil(in / bc)]`.
    scale_inv: Vec<f32>,
    block: [usize; 2],
    scale_cols: usize,
    /// The checkpoint row of each local row, and the checkpoint column of local column 0.
    rows: Vec<u32>,
    col0: usize,
}

impl QuantWeight {
    /// Bytes this weight holds in memory (packed values, scales, zeros, maps).
    pub fn resident_bytes(&self) -> usize {
        match &self.kind {
            Kind::Device(t) => t.bytes(),
            Kind::Int(w) => w.packed.len() * 4 + w.zeros.len() * 2 + w.scales.len() * 4 + w.group.len() * 4,
            Kind::Fp8(w) => w.weight.len() + w.scale_inv.len() * 4 + w.rows.len() * 4,
        }
    }

    /// `x` `[T, in]` (CPU, any float dtype) times this weight → `[T, out]` in `x`'s dtype.
    pub fn matmul(&self, x: &Tensor) -> Result<Tensor> {
        if let Kind::Device(w) = &self.kind {
            return crate::kernels::quant_matmul(x, w, (self.in_dim, self.out_dim));
        }
        if !matches!(x.device(), Device::Cpu) {
            return Err(Error::Internal { what: "quantized matmul", message: "host weights, device input".into() });
        }
        let (t, k) = x.dims2()?;
        if k != self.in_dim {
            return Err(Error::Internal { what: "quantized matmul", message: format!("x {:?}, in {}", x.dims(), k) });
        }
        let xf = x.to_dtype(DType::F32)?;
        if t <= GEMV_MAX_TOKENS {
            return self.gemv(&xf.flatten_all()?.to_vec1()?, t)?.to_dtype(x.dtype()).map_err(Into::into);
        }
        let mut tile = Vec::new();
        let mut parts = Vec::with_capacity(self.out_dim.div_ceil(TILE_COLS));
        for o0 in (0..self.out_dim).step_by(TILE_COLS) {
            let n = TILE_COLS.min(self.out_dim - o0);
            let part = match &self.kind {
                Kind::Int(w) => {
                    w.dequant_t(self.out_dim, o0, n, &mut tile);
                    xf.matmul(&Tensor::from_slice(&tile, (k, n), &Device::Cpu)?)?
                }
                Kind::Fp8(w) => {
                    w.dequant(self.in_dim, o0, n, &mut tile);
                    xf.matmul(&Tensor::from_slice(&tile, (n, k), &Device::Cpu)?.t()?)?
                }
                Kind::Device(_) => unreachable!("device weights returned above"),
            };
            parts.push(part);
        }
        let y =
            if parts.is_empty() { Tensor::zeros((t, 0), DType::F32, &Device::Cpu)? } else { Tensor::cat(&parts, 1)? };
        Ok(y.to_dtype(x.dtype())?)
    }

    /// The whole weight dequantized, `[out, in]` f32: the reference the tiles are checked
    /// against, and what tests compare with a format's hand-written reading.
    pub fn dequantize(&self) -> Result<Tensor> {
        let mut tile = Vec::new();
        Ok(match &self.kind {
            Kind::Int(w) => {
                w.dequant_t(self.out_dim, 0, self.out_dim, &mut tile);
                Tensor::from_slice(&tile, (self.in_dim, self.out_dim), &Device::Cpu)?.t()?.contiguous()?
            }
            Kind::Fp8(w) => {
                w.dequant(self.in_dim, 0, self.out_dim, &mut tile);
                Tensor::from_slice(&tile, (self.out_dim, self.in_dim), &Device::Cpu)?
            }
            Kind::Device(_) => {
                return Err(Error::Internal { what: "dequantize", message: "weights are on the device".into() })
            }
        })
    }

    /// The weight moved to `device` (unchanged for the CPU): the packed words and FP8 bytes as
    /// they are, zero points and scales as f32 for the kernels.
    pub fn to_device(self, device: &Device) -> Result<Self> {
        use crate::kernels::QuantTensors;
        if matches!(device, Device::Cpu) {
            return Ok(self);
        }
        let on = |t: Tensor| t.to_device(device);
        let kind = match self.kind {
            Kind::Int(w) => {
                let (groups, out) = (w.zeros.len() / self.out_dim.max(1), self.out_dim);
                let zeros: Vec<f32> = w.zeros.iter().map(|&z| f32::from(z)).collect();
                let words = w.packed.len();
                let packed_shape = match w.packing {
                    Packing::AlongIn => (words / out.max(1), out),
                    Packing::AlongOut => (self.in_dim, out / 8),
                };
                Kind::Device(QuantTensors::Int {
                    bits: w.bits,
                    along_out: w.packing == Packing::AlongOut,
                    packed: on(Tensor::from_vec(w.packed, packed_shape, &Device::Cpu)?)?,
                    zeros: on(Tensor::from_vec(zeros, (groups, out), &Device::Cpu)?)?,
                    scales: on(Tensor::from_vec(w.scales, (groups, out), &Device::Cpu)?)?,
                    group: on(Tensor::from_vec(w.group, self.in_dim, &Device::Cpu)?)?,
                })
            }
            Kind::Fp8(w) => {
                let scale_rows = w.scale_inv.len() / w.scale_cols.max(1);
                Kind::Device(QuantTensors::Fp8 {
                    weight: on(Tensor::from_vec(w.weight, (self.out_dim, self.in_dim), &Device::Cpu)?)?,
                    scale_inv: on(Tensor::from_vec(w.scale_inv, (scale_rows, w.scale_cols), &Device::Cpu)?)?,
                    rows: on(Tensor::from_vec(w.rows, self.out_dim, &Device::Cpu)?)?,
                    block: w.block,
                    scale_cols: w.scale_cols,
                    col0: w.col0,
                })
            }
            Kind::Device(t) => Kind::Device(t),
        };
        Ok(QuantWeight { kind, ..self })
    }
}

impl QuantWeight {
    /// `x` (`t` rows of `in_dim`, row-major) times the weight, each weight dequantized once and
    /// applied to every row; `[t, out]`.
    fn gemv(&self, x: &[f32], t: usize) -> Result<Tensor> {
        use rayon::prelude::*;
        // Column-major [out, t] so each task owns a contiguous run of outputs.
        let mut y = vec![0f32; self.out_dim * t];
        let xt: Vec<f32> = match &self.kind {
            Kind::Int(_) => (0..self.in_dim).flat_map(|i| (0..t).map(move |r| x[r * self.in_dim + i])).collect(),
            _ => Vec::new(),
        };
        y.par_chunks_mut(GEMV_COLS * t).enumerate().for_each(|(c, chunk)| {
            let (o0, n) = (c * GEMV_COLS, chunk.len() / t);
            match &self.kind {
                Kind::Int(w) => w.gemv(&xt, (t, self.in_dim, self.out_dim), o0..o0 + n, chunk),
                Kind::Fp8(w) => w.gemv(x, (t, self.in_dim), o0..o0 + n, chunk),
                Kind::Device(_) => {}
            }
        });
        Ok(Tensor::from_vec(y, (self.out_dim, t), &Device::Cpu)?.t()?.contiguous()?)
    }
}

impl IntWeight {
    /// Input row `i`'s weights for output columns `cols` into `dst`.
    fn row(&self, i: usize, out: usize, cols: Range<usize>, dst: &mut [f32]) {
        let g = self.group[i] as usize;
        let zeros = &self.zeros[g * out + cols.start..g * out + cols.end];
        let scales = &self.scales[g * out + cols.start..g * out + cols.end];
        match self.packing {
            Packing::AlongIn => {
                let per = (32 / self.bits) as usize;
                let (shift, mask) = ((i % per) as u32 * self.bits, (1u32 << self.bits) - 1);
                let words = &self.packed[(i / per) * out + cols.start..(i / per) * out + cols.end];
                for (((d, &q), &z), &s) in dst.iter_mut().zip(words).zip(zeros).zip(scales) {
                    *d = (((q >> shift) & mask) as i32 - i32::from(z)) as f32 * s;
                }
            }
            Packing::AlongOut => {
                let words = &self.packed[i * (out / 8)..(i + 1) * (out / 8)];
                for (j, ((d, &z), &s)) in dst.iter_mut().zip(zeros).zip(scales).enumerate() {
                    let o = cols.start + j;
                    *d = (((words[o / 8] >> (4 * AWQ_NIBBLE[o % 8])) & 0xF) as i32 - i32::from(z)) as f32 * s;
                }
            }
        }
    }

    /// `y[(o - o0) * t + r] += Σ_i x[i, r] · w(i, o)` for outputs `cols`, inputs in order;
    /// `xt` is `x` transposed (`[in, t]`), so each input's `t` values sit together.
    fn gemv(&self, xt: &[f32], (t, in_dim, out): (usize, usize, usize), cols: Range<usize>, y: &mut [f32]) {
        let n = cols.len();
        let (mut w, mut acc) = (vec![0f32; n], vec![0f32; t * n]);
        for i in 0..in_dim {
            self.row(i, out, cols.clone(), &mut w);
            // One axpy per row over this task's outputs: each vectorizes over the outputs.
            for (r, acc) in acc.chunks_exact_mut(n).enumerate() {
                let xr = xt[i * t + r];
                acc.iter_mut().zip(&w).for_each(|(a, &w)| *a += xr * w);
            }
        }
        for (j, yj) in y.chunks_exact_mut(t).enumerate() {
            for (r, y) in yj.iter_mut().enumerate() {
                *y += acc[r * n + j];
            }
        }
    }

    /// Columns `o0..o0 + n` of the transposed weight into `tile` `[in, n]`, rows in parallel.
    fn dequant_t(&self, out: usize, o0: usize, n: usize, tile: &mut Vec<f32>) {
        use rayon::prelude::*;
        tile.clear();
        tile.resize(self.group.len() * n, 0.0);
        tile.par_chunks_mut(n).enumerate().for_each(|(i, dst)| self.row(i, out, o0..o0 + n, dst));
    }
}

/// `a · b` in eight interleaved f32 partial sums (vectorizable).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    acc.iter().sum::<f32>() + tail
}

impl Fp8Weight {
    /// Output row `o`'s weights into `dst` (`in` long), block by block: the scale changes
    /// every `block[1]` checkpoint columns.
    fn row(&self, o: usize, dst: &mut [f32]) {
        let (lut, bc) = (fp8_table(), self.block[1]);
        let scales = &self.scale_inv[(self.rows[o] as usize / self.block[0]) * self.scale_cols..];
        let src = &self.weight[o * dst.len()..(o + 1) * dst.len()];
        let mut i = 0;
        while i < dst.len() {
            let end = dst.len().min(i + bc - (self.col0 + i) % bc);
            let s = scales[(self.col0 + i) / bc];
            for (d, &q) in dst[i..end].iter_mut().zip(&src[i..end]) {
                *d = lut[q as usize] * s;
            }
            i = end;
        }
    }

    /// `y[(o - o0) * t + r] = x[r] · w(o)` for output rows `rows`.
    fn gemv(&self, x: &[f32], (t, in_dim): (usize, usize), rows: Range<usize>, y: &mut [f32]) {
        let mut w = vec![0f32; in_dim];
        for (j, o) in rows.enumerate() {
            self.row(o, &mut w);
            for r in 0..t {
                y[j * t + r] = dot(&x[r * in_dim..(r + 1) * in_dim], &w);
            }
        }
    }

    /// Rows `o0..o0 + n` of the weight into `tile` `[n, in]`, in parallel.
    fn dequant(&self, in_dim: usize, o0: usize, n: usize, tile: &mut Vec<f32>) {
        use rayon::prelude::*;
        tile.clear();
        tile.resize(n * in_dim, 0.0);
        tile.par_chunks_mut(in_dim).enumerate().for_each(|(r, dst)| self.row(o0 + r, dst));
    }
}

/// float8_e4m3fn → f32 for every byte: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no
/// infinities, NaN at `S.1111.111`; subnormals at exponent 0.
pub fn fp8_e4m3_to_f32(b: u8) -> f32 {
    let sign = if b & 0x80 != 0 { -1.0 } else { 1.0 };
    let (e, m) = (i32::from((b >> 3) & 0xF), f32::from(b & 0x7));
    if e == 0xF && b & 0x7 == 0x7 {
        return f32::NAN;
    }
    sign * if e == 0 { m / 8.0 * 2f32.powi(-6) } else { (1.0 + m / 8.0) * 2f32.powi(e - 7) }
}

fn fp8_table() -> &'static [f32; 256] {
    static TABLE: std::sync::OnceLock<[f32; 256]> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| std::array::from_fn(|b| fp8_e4m3_to_f32(b as u8)))
}

/// f16 bytes (little-endian) → f32 values.
fn f16s(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(2).map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
}

fn u32s(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}
