//! Reading one quantized linear's slice for this rank: column-parallel cuts output ranges,
//! row-parallel cuts one input range. Scales become f32 and zero points bytes here, so the
//! forward never unpacks them; every tensor is checked against the shape the format implies,
//! and an impossible cut is refused naming the tensor.

use std::ops::Range;

use candle_core::DType;

use super::{f16s, u32s, Fp8Weight, IntWeight, Kind, Packing, QuantConfig, QuantWeight};
use crate::error::{Error, Result};
use crate::weights::Weights;

/// This rank's part of a linear `[out, in]`.
#[derive(Debug, Clone, Copy)]
pub enum Cut<'a> {
    /// Output ranges, concatenated (column-parallel, or all of it).
    Columns(&'a [Range<usize>]),
    /// One input range (row-parallel).
    Rows(&'a Range<usize>),
}

/// `{prefix}` as a quantized linear cut per `cut`, or `None` when the checkpoint stores it as
/// a plain `weight` (routers, LM heads, layers a format leaves alone).
pub fn load(w: &Weights, prefix: &str, (in_dim, out_dim): (usize, usize), cut: Cut) -> Result<Option<QuantWeight>> {
    if let Some(q) = w.quant().filter(|_| w.is_random()) {
        let dims = match cut {
            Cut::Columns(r) => (in_dim, r.iter().map(|r| r.len()).sum()),
            Cut::Rows(r) => (r.len(), out_dim),
        };
        let weight = random(q, dims, prefix)?.to_device(w.device())?;
        w.note_random_bytes(weight.resident_bytes());
        return Ok(Some(weight));
    }
    let stored_fp8 = w.stored_info(&format!("{prefix}.weight")).is_some_and(|(d, _)| d == DType::F8E4M3);
    let packed = w.contains(&format!("{prefix}.qweight"));
    if !stored_fp8 && !packed {
        return Ok(None);
    }
    let q = w.quant().ok_or_else(|| Error::InvalidInput {
        field: "quantization_config",
        message: format!("`{prefix}` is quantized but config.json has no quantization_config"),
    })?;
    let (out_local, in_local) = match cut {
        Cut::Columns(r) => (r.iter().map(|r| r.len()).sum(), in_dim),
        Cut::Rows(r) => (out_dim, r.len()),
    };
    let part = Part { w, prefix, in_dim, out_dim, cut };
    let kind = match (q, stored_fp8) {
        (QuantConfig::Gptq { bits, group_size, .. }, false) => Kind::Int(part.gptq(bits, group_size)?),
        (QuantConfig::Awq { group_size }, false) => Kind::Int(part.awq(group_size)?),
        (QuantConfig::Fp8 { block }, true) => Kind::Fp8(part.fp8(block)?),
        (q, _) => {
            return Err(Error::InvalidInput {
                field: "quantization_config",
                message: format!("`{prefix}` is not stored as {} says", q.method()),
            })
        }
    };
    QuantWeight { in_dim: in_local, out_dim: out_local, kind }.to_device(w.device()).map(Some)
}

/// A random weight `(in, out)` in `q`'s format, seeded by `prefix` (benchmarks of real shapes):
/// uniform codes, the middle zero point, scales that keep activations near unit size.
fn random(q: QuantConfig, (i, o): (usize, usize), prefix: &str) -> Result<QuantWeight> {
    use rand::{Rng, SeedableRng};
    let seed = prefix.bytes().fold(0u64, |h, b| h.wrapping_mul(31).wrapping_add(u64::from(b)));
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut words = |n: usize| (0..n).map(|_| rng.random::<u32>()).collect::<Vec<_>>();
    let int = |bits: u32, group: Option<usize>, packing: Packing, packed: Vec<u32>| {
        let groups = group.map_or(1, |g| i.div_ceil(g));
        // Scale so a weight's spread is about 1/sqrt(in): activations keep their size.
        let scale = 2.0 / (((1u32 << bits) as f32) * (i as f32).sqrt());
        IntWeight {
            bits,
            packing,
            packed,
            zeros: vec![1u16 << (bits - 1); groups * o],
            scales: vec![scale; groups * o],
            group: (0..i).map(|r| group.map_or(0, |g| r / g) as u32).collect(),
        }
    };
    let kind = match q {
        QuantConfig::Gptq { bits, group_size, .. } => {
            let per = (32 / bits) as usize;
            Kind::Int(int(bits, group_size, Packing::AlongIn, words(i.div_ceil(per) * o)))
        }
        QuantConfig::Awq { group_size } => {
            Kind::Int(int(4, Some(group_size), Packing::AlongOut, words(i * o.div_ceil(8))))
        }
        QuantConfig::Fp8 { block } => {
            // Any byte but the two NaNs (exponent and mantissa all ones).
            let weight = words(i * o).into_iter().map(|w| (w as u8) & 0xF7).collect();
            let (r, c) = (o.div_ceil(block[0]), i.div_ceil(block[1]));
            let scale = 1.0 / (64.0 * (i as f32).sqrt());
            Kind::Fp8(Fp8Weight {
                weight,
                scale_inv: vec![scale; r * c],
                block,
                scale_cols: c,
                rows: (0..o as u32).collect(),
                col0: 0,
            })
        }
    };
    Ok(QuantWeight { in_dim: i, out_dim: o, kind })
}

struct Part<'a> {
    w: &'a Weights,
    prefix: &'a str,
    in_dim: usize,
    out_dim: usize,
    cut: Cut<'a>,
}

impl Part<'_> {
    fn refuse(&self, tensor: &str, message: String) -> Error {
        Error::InvalidInput { field: "shard", message: format!("`{}.{tensor}`: {message}", self.prefix) }
    }

    /// Ranges along `dim` of `{prefix}.{tensor}` (full shape `shape`), stored bytes.
    fn read(&self, tensor: &str, shape: &[usize], dim: usize, ranges: &[Range<usize>]) -> Result<(Vec<u8>, DType)> {
        let (bytes, dtype, _) = self.w.stored_ranges(&format!("{}.{tensor}", self.prefix), shape, dim, ranges)?;
        Ok((bytes, dtype))
    }

    fn ints(&self, tensor: &str, shape: &[usize], dim: usize, ranges: &[Range<usize>]) -> Result<Vec<u32>> {
        match self.read(tensor, shape, dim, ranges)? {
            (b, DType::I32 | DType::U32) => Ok(u32s(&b)),
            (_, d) => Err(self.refuse(tensor, format!("stored as {d:?}, expected int32"))),
        }
    }

    fn floats(&self, tensor: &str, shape: &[usize], dim: usize, ranges: &[Range<usize>]) -> Result<Vec<f32>> {
        let (b, d) = self.read(tensor, shape, dim, ranges)?;
        Ok(match d {
            DType::F16 => f16s(&b),
            DType::BF16 => b.chunks_exact(2).map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
            DType::F32 => b.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            d => return Err(self.refuse(tensor, format!("stored as {d:?}, expected a float"))),
        })
    }

    /// The output ranges this rank keeps (all of them for a row cut).
    fn out_ranges(&self) -> Vec<Range<usize>> {
        match self.cut {
            Cut::Columns(r) => r.to_vec(),
            Cut::Rows(_) => std::iter::once(0..self.out_dim).collect(),
        }
    }

    fn gptq(&self, bits: u32, group_size: Option<usize>) -> Result<IntWeight> {
        let (per, mask) = ((32 / bits) as usize, (1u32 << bits) - 1);
        let (i, o) = (self.in_dim, self.out_dim);
        if i % per != 0 || o % per != 0 {
            return Err(self.refuse("qweight", format!("in {i} and out {o} must be multiples of {per} for {bits}-bit")));
        }
        let groups = group_size.map_or(1, |g| i.div_ceil(g));
        let g_idx = if self.w.contains(&format!("{}.g_idx", self.prefix)) {
            self.ints("g_idx", &[i], 0, std::slice::from_ref(&(0..i)))?
        } else {
            (0..i).map(|r| group_size.map_or(0, |g| r / g) as u32).collect()
        };
        if let Some(&bad) = g_idx.iter().find(|&&g| g as usize >= groups) {
            return Err(self.refuse("g_idx", format!("group {bad} of {groups}")));
        }
        let (rows, outs) = match self.cut {
            Cut::Columns(r) => (0..i, r.to_vec()),
            Cut::Rows(r) if r.start % per == 0 && r.end % per == 0 => (r.clone(), std::iter::once(0..o).collect()),
            Cut::Rows(r) => {
                return Err(self.refuse("qweight", format!("input rows {r:?} split a packed int32 ({per} rows)")));
            }
        };
        let packed = match self.cut {
            Cut::Columns(_) => self.ints("qweight", &[i / per, o], 1, &outs)?,
            Cut::Rows(_) => {
                self.ints("qweight", &[i / per, o], 0, std::slice::from_ref(&(rows.start / per..rows.end / per)))?
            }
        };
        // Only the groups this rank's rows use (all of them under act-order, usually).
        let local = &g_idx[rows.clone()];
        let (g0, g1) = (local.iter().min().copied().unwrap_or(0), local.iter().max().map_or(0, |g| g + 1));
        let gr = g0 as usize..g1 as usize;
        let qzeros = self.ints("qzeros", &[groups, o / per], 0, std::slice::from_ref(&gr))?;
        let all_scales = self.floats("scales", &[groups, o], 0, std::slice::from_ref(&gr))?;
        let keep: Vec<usize> = outs.iter().flat_map(|r| r.clone()).collect();
        let zeros = (0..gr.len())
            .flat_map(|g| {
                let row = &qzeros[g * (o / per)..(g + 1) * (o / per)];
                // v1 checkpoints store zero − 1.
                keep.iter().map(move |&c| (((row[c / per] >> ((c % per) as u32 * bits)) & mask) + 1) as u16)
            })
            .collect();
        let scales =
            (0..gr.len()).flat_map(|g| keep.iter().map(|&c| all_scales[g * o + c]).collect::<Vec<_>>()).collect();
        Ok(IntWeight {
            bits,
            packing: Packing::AlongIn,
            packed,
            zeros,
            scales,
            group: local.iter().map(|g| g - g0).collect(),
        })
    }

    fn awq(&self, group_size: usize) -> Result<IntWeight> {
        let (i, o) = (self.in_dim, self.out_dim);
        if o % 8 != 0 {
            return Err(self.refuse("qweight", format!("out {o} is not a multiple of 8")));
        }
        let groups = i.div_ceil(group_size);
        let outs = self.out_ranges();
        if let Some(r) = outs.iter().find(|r| r.start % 8 != 0 || r.end % 8 != 0) {
            return Err(self.refuse("qweight", format!("output columns {r:?} split a packed int32 (8 columns)")));
        }
        let packed_outs: Vec<_> = outs.iter().map(|r| r.start / 8..r.end / 8).collect();
        let rows = match self.cut {
            Cut::Rows(r) => r.clone(),
            Cut::Columns(_) => 0..i,
        };
        let gr = rows.start / group_size..(rows.end.max(1) - 1) / group_size + 1;
        let packed = match self.cut {
            Cut::Columns(_) => self.ints("qweight", &[i, o / 8], 1, &packed_outs)?,
            Cut::Rows(r) => self.ints("qweight", &[i, o / 8], 0, std::slice::from_ref(r))?,
        };
        let qzeros = self.ints("qzeros", &[groups, o / 8], 1, &packed_outs)?;
        let zrow = qzeros.len() / groups.max(1);
        let scales_all = self.floats("scales", &[groups, o], 1, &outs)?;
        let width: usize = outs.iter().map(|r| r.len()).sum();
        let zeros = gr
            .clone()
            .flat_map(|g| {
                let row = &qzeros[g * zrow..(g + 1) * zrow];
                (0..width).map(move |c| ((row[c / 8] >> (4 * super::AWQ_NIBBLE[c % 8])) & 0xF) as u16)
            })
            .collect();
        let scales = gr.clone().flat_map(|g| scales_all[g * width..(g + 1) * width].iter().copied()).collect();
        Ok(IntWeight {
            bits: 4,
            packing: Packing::AlongOut,
            packed,
            zeros,
            scales,
            group: rows.map(|r| (r / group_size - gr.start) as u32).collect(),
        })
    }

    fn fp8(&self, block: [usize; 2]) -> Result<Fp8Weight> {
        let (i, o) = (self.in_dim, self.out_dim);
        let (sr, sc) = (o.div_ceil(block[0]), i.div_ceil(block[1]));
        let scale_inv = self.floats("weight_scale_inv", &[sr, sc], 0, std::slice::from_ref(&(0..sr)))?;
        let (weight, rows, col0) = match self.cut {
            Cut::Columns(r) => {
                let (b, _) = self.read("weight", &[o, i], 0, r)?;
                (b, r.iter().flat_map(|r| r.clone()).map(|x| x as u32).collect(), 0)
            }
            Cut::Rows(r) => {
                let (b, _) = self.read("weight", &[o, i], 1, std::slice::from_ref(r))?;
                (b, (0..o as u32).collect(), r.start)
            }
        };
        Ok(Fp8Weight { weight, scale_inv, block, scale_cols: sc, rows, col0 })
    }
}
