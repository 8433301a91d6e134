//! The fused path's kernels as candle ops: residual-add + RMSNorm, SiLU-and-multiply, rotary in
//! place, writing new K/V into cache blocks, paged attention (varlen prefill and split-K decode),
//! and sampling. On CUDA tensors each launches one of the kernels in `worker/kernels/*.cu`
//! (compiled to PTX by nvcc at build time, loaded on first use); on CPU tensors each runs its
//! [`reference`], so the fused model path runs, and is tested, without a GPU.

#[cfg(feature = "cuda")]
mod cuda;
mod moe;
mod quant;
pub mod reference;

use std::sync::Arc;

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, InplaceOp3, Layout, Shape, Tensor};

use crate::error::{Error, Result};
pub use moe::{count_experts, moe_experts, StackedExperts, MAX_FUSED_EXPERTS};
pub use quant::{quant_matmul, QuantTensors, QGEMV_MAX_ROWS};
pub use reference::{AttnSeq, AttnShape, DrawParams};

/// Which implementation of the model's inner ops runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum KernelMode {
    /// candle's ops, one per step of the math (the CPU default).
    #[default]
    Plain,
    /// This module's fused ops and paged attention (the CUDA default).
    Fused,
}

impl KernelMode {
    /// The default for a device: fused kernels on CUDA, candle's ops on the CPU.
    pub fn for_device(device: &Device) -> Self {
        if device.is_cuda() {
            KernelMode::Fused
        } else {
            KernelMode::Plain
        }
    }
}

/// Most query heads per KV head, and the largest head dim, the attention kernels handle.
pub const MAX_GQA_GROUP: usize = 8;
pub const MAX_HEAD_DIM: usize = 256;

/// Whether the paged-attention kernels handle this GQA group size and head dim.
pub fn supports_attention(group: usize, head_dim: usize) -> bool {
    (1..=MAX_GQA_GROUP).contains(&group) && (1..=MAX_HEAD_DIM).contains(&head_dim)
}

fn invalid(field: &'static str, message: String) -> Error {
    Error::Internal { what: field, message }
}

fn same_dtype(field: &'static str, a: &Tensor, b: &Tensor) -> Result<()> {
    if a.dtype() != b.dtype() {
        return Err(invalid(field, format!("dtype {:?} where {:?} is expected", b.dtype(), a.dtype())));
    }
    Ok(())
}

/// `x + residual` (the new residual stream) and its RMSNorm times `weight`, in one pass.
/// `x`, `residual`: `[T, H]`; `weight`: `[H]`.
pub fn add_rms_norm(x: &Tensor, residual: &Tensor, weight: &Tensor, eps: f32) -> Result<(Tensor, Tensor)> {
    let (t, h) = x.dims2()?;
    if residual.dims() != [t, h] || weight.dims() != [h] {
        return Err(invalid(
            "residual",
            format!("shapes {:?} + {:?} with weight {:?}", x.dims(), residual.dims(), weight.dims()),
        ));
    }
    same_dtype("residual", x, residual)?;
    same_dtype("weight", x, weight)?;
    let (x, residual, weight) = (x.contiguous()?, residual.contiguous()?, weight.contiguous()?);
    let both = x.apply_op3_no_bwd(&residual, &weight, &AddRmsNorm { eps })?;
    Ok((both.get(0)?, both.get(1)?))
}

/// `silu(gate) * up` from the fused gate/up projection `[T, 2F]` (gate in the first half) →
/// `[T, F]`.
pub fn silu_mul(gate_up: &Tensor) -> Result<Tensor> {
    let (_, two_f) = gate_up.dims2()?;
    if two_f % 2 != 0 {
        return Err(invalid("gate_up", format!("width {two_f} is not gate and up side by side")));
    }
    Ok(gate_up.contiguous()?.apply_op1_no_bwd(&SiluMul)?)
}

/// Rotates the first `2 * cos.dim(1)` dims of every head of `x` `[T, H, D]` in place (rotate-half
/// form), then multiplies the head by `qscale[t]` (f32 `[T]`) when given. `x` may be a strided
/// view (e.g. the q part of a fused QKV projection) as long as its last dim is contiguous.
pub fn rotary_inplace(x: &Tensor, cos: &Tensor, sin: &Tensor, qscale: Option<&Tensor>) -> Result<()> {
    let (t, _, d) = x.dims3()?;
    let (ct, half) = cos.dims2()?;
    if ct != t || sin.dims() != [t, half] || 2 * half > d {
        return Err(invalid("cos", format!("cos {:?} / sin {:?} do not fit x {:?}", cos.dims(), sin.dims(), x.dims())));
    }
    same_dtype("cos", x, cos)?;
    same_dtype("sin", x, sin)?;
    let qscale = match qscale {
        Some(s) if s.dims() != [t] => return Err(invalid("qscale", format!("shape {:?}, want [{t}]", s.dims()))),
        Some(s) => Some(s.to_dtype(DType::F32)?.contiguous()?),
        None => None,
    };
    x.inplace_op3(&cos.contiguous()?, &sin.contiguous()?, &Rotary { qscale })?;
    Ok(())
}

/// `cache[slots[t]] = src[t]`: new keys or values `[T, Hkv, D]` (a strided view is fine) into the
/// cache `[slots, Hkv, D]`, in place; `slots`: u32 `[T]`.
pub fn kv_write(cache: &Tensor, src: &Tensor, slots: &Tensor) -> Result<()> {
    let (t, hkv, d) = src.dims3()?;
    let (n, chkv, cd) = cache.dims3()?;
    if (chkv, cd) != (hkv, d) || slots.dims() != [t] || slots.dtype() != DType::U32 {
        return Err(invalid(
            "slots",
            format!("src {:?} and slots {:?} do not fit cache {:?}", src.dims(), slots.dims(), cache.dims()),
        ));
    }
    same_dtype("src", cache, src)?;
    if !cache.is_contiguous() {
        return Err(invalid("cache", "must be contiguous".into()));
    }
    cache.inplace_op3(src, &slots.contiguous()?, &KvWrite { num_slots: n })?;
    Ok(())
}

/// One forward's paged-attention layout, built once and shared by every layer: the sequences
/// (host) and their metadata rows `[q_start, q_len, context_len, blocks...]` (u32, on the
/// device), plus the cache slot of every new token.
#[derive(Clone)]
pub struct AttnBatch {
    pub seqs: Arc<Vec<AttnSeq>>,
    pub meta: Tensor,
    pub slots: Tensor,
    pub num_tokens: usize,
    pub max_context: usize,
    pub max_q_len: usize,
}

impl AttnBatch {
    pub fn new(seqs: Vec<AttnSeq>, block_size: usize, device: &Device) -> Result<Self> {
        let width = 3 + seqs.iter().map(|s| s.blocks.len()).max().unwrap_or(0);
        let mut meta = Vec::with_capacity(seqs.len() * width);
        let mut slots = Vec::new();
        for s in &seqs {
            if s.q_len == 0 || s.q_len > s.context_len || s.blocks.len() * block_size < s.context_len {
                return Err(invalid(
                    "block_tables",
                    format!("{} new of {} tokens in {} blocks", s.q_len, s.context_len, s.blocks.len()),
                ));
            }
            meta.extend([s.q_start as u32, s.q_len as u32, s.context_len as u32]);
            meta.extend_from_slice(&s.blocks);
            meta.resize(meta.len() + width - 3 - s.blocks.len(), 0);
            for p in s.context_len - s.q_len..s.context_len {
                slots.push(s.blocks[p / block_size] * block_size as u32 + (p % block_size) as u32);
            }
        }
        let rows = seqs.len();
        let num_tokens = slots.len();
        Ok(AttnBatch {
            max_context: seqs.iter().map(|s| s.context_len).max().unwrap_or(0),
            max_q_len: seqs.iter().map(|s| s.q_len).max().unwrap_or(0),
            seqs: Arc::new(seqs),
            meta: Tensor::from_vec(meta, (rows, width), device)?,
            slots: Tensor::from_vec(slots, num_tokens, device)?,
            num_tokens,
        })
    }
}

/// Causal attention over the paged cache for every new token of `batch` (whose keys and values
/// are already written): `q` `[T, Hq, D]` (a strided view is fine), caches `[slots, Hkv, D]`.
/// Returns `[T, Hq, D]`. Decode-only batches use the split-K kernel, others the varlen one.
pub fn paged_attention(
    q: &Tensor,
    k_cache: &Tensor,
    v_cache: &Tensor,
    batch: &AttnBatch,
    block_size: usize,
    scale: f32,
) -> Result<Tensor> {
    let (t, hq, d) = q.dims3()?;
    let (_, hkv, cd) = k_cache.dims3()?;
    if t != batch.num_tokens || cd != d || v_cache.dims() != k_cache.dims() || hkv == 0 || hq % hkv != 0 {
        return Err(invalid(
            "q",
            format!("q {:?} with caches {:?} for a batch of {} tokens", q.dims(), k_cache.dims(), batch.num_tokens),
        ));
    }
    same_dtype("k_cache", q, k_cache)?;
    same_dtype("v_cache", q, v_cache)?;
    let op = PagedAttention {
        shape: AttnShape { q_heads: hq, kv_heads: hkv, head_dim: d, block_size, scale },
        seqs: batch.seqs.clone(),
        meta: batch.meta.clone(),
        max_context: batch.max_context,
        max_q_len: batch.max_q_len,
    };
    Ok(q.apply_op3_no_bwd(k_cache, v_cache, &op)?)
}

/// Token ids `[B]` (u32) chosen from `logits` `[B, V]` with one [`DrawParams`] per row; only the
/// ids leave the device.
pub fn sample_rows(logits: &Tensor, params: &[DrawParams]) -> Result<Vec<u32>> {
    let (b, _) = logits.dims2()?;
    if params.len() != b {
        return Err(invalid("params", format!("{} rows of parameters for {b} rows of logits", params.len())));
    }
    let rows: Vec<f32> = params.iter().flat_map(|p| p.to_row()).collect();
    let rows = Tensor::from_vec(rows, (b, 5), logits.device())?;
    Ok(logits.contiguous()?.apply_op2_no_bwd(&rows, &SampleRows)?.to_vec1()?)
}

// ---- the ops: CPU references here, CUDA launches in `cuda.rs` ----

/// Storage indices of a layout's elements in logical (row-major) order.
fn offsets(l: &Layout) -> Vec<usize> {
    if let Some((a, b)) = l.contiguous_offsets() {
        return (a..b).collect();
    }
    let (dims, strides) = (l.dims(), l.stride());
    let n: usize = dims.iter().product();
    let mut out = Vec::with_capacity(n);
    let mut idx = vec![0usize; dims.len()];
    for _ in 0..n {
        out.push(l.start_offset() + idx.iter().zip(strides).map(|(i, s)| i * s).sum::<usize>());
        for k in (0..dims.len()).rev() {
            idx[k] += 1;
            if idx[k] < dims[k] {
                break;
            }
            idx[k] = 0;
        }
    }
    out
}

fn read(s: &CpuStorage, l: &Layout) -> candle_core::Result<Vec<f32>> {
    let o = offsets(l);
    Ok(match s {
        CpuStorage::F32(v) => o.iter().map(|&i| v[i]).collect(),
        CpuStorage::BF16(v) => o.iter().map(|&i| v[i].to_f32()).collect(),
        CpuStorage::F16(v) => o.iter().map(|&i| v[i].to_f32()).collect(),
        other => candle_core::bail!("unsupported dtype {:?}", other.dtype()),
    })
}

fn read_u32(s: &CpuStorage, l: &Layout) -> candle_core::Result<Vec<u32>> {
    match s {
        CpuStorage::U32(v) => Ok(offsets(l).iter().map(|&i| v[i]).collect()),
        other => candle_core::bail!("expected u32, got {:?}", other.dtype()),
    }
}

fn store(v: &[f32], dtype: DType) -> candle_core::Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(v.to_vec()),
        DType::BF16 => CpuStorage::BF16(v.iter().map(|&x| half::bf16::from_f32(x)).collect()),
        DType::F16 => CpuStorage::F16(v.iter().map(|&x| half::f16::from_f32(x)).collect()),
        other => candle_core::bail!("unsupported dtype {other:?}"),
    })
}

/// Writes logical element `k` of `l` from `v[k]`, for every `k` with `keep(k)`.
fn write(s: &mut CpuStorage, l: &Layout, v: &[f32], keep: impl Fn(usize) -> bool) -> candle_core::Result<()> {
    let o = offsets(l);
    match s {
        CpuStorage::F32(d) => o.iter().enumerate().filter(|(k, _)| keep(*k)).for_each(|(k, &i)| d[i] = v[k]),
        CpuStorage::BF16(d) => {
            o.iter().enumerate().filter(|(k, _)| keep(*k)).for_each(|(k, &i)| d[i] = half::bf16::from_f32(v[k]))
        }
        CpuStorage::F16(d) => {
            o.iter().enumerate().filter(|(k, _)| keep(*k)).for_each(|(k, &i)| d[i] = half::f16::from_f32(v[k]))
        }
        other => candle_core::bail!("unsupported dtype {:?}", other.dtype()),
    }
    Ok(())
}

struct AddRmsNorm {
    eps: f32,
}

impl CustomOp3 for AddRmsNorm {
    fn name(&self) -> &'static str {
        "add-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (sum, normed) =
            reference::add_rms_norm(&read(s1, l1)?, &read(s2, l2)?, &read(s3, l3)?, self.eps, s1.dtype());
        let (t, h) = l1.shape().dims2()?;
        Ok((store(&[sum, normed].concat(), s1.dtype())?, Shape::from((2, t, h))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::add_rms_norm(self.eps, (s1, l1), (s2, l2), (s3, l3))
    }
}

struct SiluMul;

impl CustomOp1 for SiluMul {
    fn name(&self) -> &'static str {
        "silu-mul"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (t, two_f) = l1.shape().dims2()?;
        let out = reference::silu_mul(&read(s1, l1)?, two_f / 2, s1.dtype());
        Ok((store(&out, s1.dtype())?, Shape::from((t, two_f / 2))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::silu_mul((s1, l1))
    }
}

struct Rotary {
    qscale: Option<Tensor>,
}

impl InplaceOp3 for Rotary {
    fn name(&self) -> &'static str {
        "rotary-inplace"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let (t, h, d) = l1.shape().dims3()?;
        let mut x = read(s1, l1)?;
        let qscale = match &self.qscale {
            Some(s) => Some(s.to_vec1::<f32>()?),
            None => None,
        };
        reference::rotary(&mut x, &read(s2, l2)?, &read(s3, l3)?, qscale.as_deref(), [t, h, d], s1.dtype());
        write(s1, l1, &x, |_| true)
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        cuda::rotary(self.qscale.as_ref(), (s1, l1), (s2, l2), (s3, l3))
    }
}

struct KvWrite {
    num_slots: usize,
}

impl InplaceOp3 for KvWrite {
    fn name(&self) -> &'static str {
        "kv-write"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        let slots = read_u32(s3, l3)?;
        if let Some(&bad) = slots.iter().find(|&&s| s as usize >= self.num_slots) {
            candle_core::bail!("slot {bad} out of range (0..{})", self.num_slots);
        }
        let src = read(s2, l2)?;
        let row = src.len() / slots.len().max(1);
        // Scatter each source row to its slot's row of the (contiguous) cache.
        let (start, _) =
            l1.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("cache not contiguous".into()))?;
        for (t, &slot) in slots.iter().enumerate() {
            let at = start + slot as usize * row;
            let layout = Layout::contiguous_with_offset((row,), at);
            write(s1, &layout, &src[t * row..(t + 1) * row], |_| true)?;
        }
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        cuda::kv_write((s1, l1), (s2, l2), (s3, l3))
    }
}

struct PagedAttention {
    shape: AttnShape,
    seqs: Arc<Vec<AttnSeq>>,
    // Read by the CUDA launch only; the CPU reference walks `seqs`.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    meta: Tensor,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    max_context: usize,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    max_q_len: usize,
}

impl CustomOp3 for PagedAttention {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = reference::paged_attention(&read(s1, l1)?, &read(s2, l2)?, &read(s3, l3)?, &self.seqs, self.shape);
        Ok((store(&out, s1.dtype())?, l1.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let call = cuda::AttnCall {
            shape: self.shape,
            meta: &self.meta,
            seqs: self.seqs.len(),
            max_context: self.max_context,
            max_q_len: self.max_q_len,
        };
        cuda::paged_attention(&call, (s1, l1), (s2, l2), (s3, l3))
    }
}

struct SampleRows;

impl CustomOp2 for SampleRows {
    fn name(&self) -> &'static str {
        "sample-rows"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (b, v) = l1.shape().dims2()?;
        let (logits, params) = (read(s1, l1)?, read(s2, l2)?);
        let ids = (0..b)
            .map(|r| {
                let p = &params[r * 5..r * 5 + 5];
                let draw = DrawParams { temperature: p[0], top_k: p[1] as usize, top_p: p[2], min_p: p[3], u: p[4] };
                reference::sample_row(&logits[r * v..(r + 1) * v], draw)
            })
            .collect();
        Ok((CpuStorage::U32(ids), Shape::from(b)))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        cuda::sample_rows((s1, l1), (s2, l2))
    }
}

#[cfg(test)]
mod tests;
