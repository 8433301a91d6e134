//! Quantized linears on the GPU (`worker/kernels/quant.cu`): the weights stay packed in device
//! memory; decode-sized batches multiply through a GEMV that dequantizes each weight once for
//! all rows, larger ones dequantize the weight into the compute dtype for cuBLAS. The CPU runs
//! `quant::QuantWeight`'s own host path, so these ops have no CPU side.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};

use super::invalid;
use crate::error::Result;

/// Rows up to which the GEMV kernels run (one register accumulator per row).
pub const QGEMV_MAX_ROWS: usize = 8;

/// A quantized weight's tensors on the device, as `quant.cu` reads them.
#[derive(Debug, Clone)]
pub enum QuantTensors {
    /// GPTQ (`along_out` false: words `[in / (32 / bits), out]`) or AWQ (`along_out`: words
    /// `[in, out / 8]`); f32 `zeros` and `scales` `[groups, out]`, u32 `group` `[in]`.
    Int { bits: u32, along_out: bool, packed: Tensor, zeros: Tensor, scales: Tensor, group: Tensor },
    /// u8 e4m3 `weight` `[out, in]`, the checkpoint's f32 `scale_inv` (`scale_cols` wide, in
    /// `block` blocks), u32 `rows` (checkpoint row of each output), `col0` (checkpoint column of
    /// input 0).
    Fp8 { weight: Tensor, scale_inv: Tensor, rows: Tensor, block: [usize; 2], scale_cols: usize, col0: usize },
}

impl QuantTensors {
    pub fn bytes(&self) -> usize {
        let b = |t: &Tensor| t.elem_count() * t.dtype().size_in_bytes();
        match self {
            QuantTensors::Int { packed, zeros, scales, group, .. } => b(packed) + b(zeros) + b(scales) + b(group),
            QuantTensors::Fp8 { weight, scale_inv, rows, .. } => b(weight) + b(scale_inv) + b(rows),
        }
    }
}

/// `x` `[T, in]` times the weight `(in, out)` → `[T, out]` in `x`'s dtype.
pub fn quant_matmul(x: &Tensor, w: &QuantTensors, (in_dim, out_dim): (usize, usize)) -> Result<Tensor> {
    let (t, k) = x.dims2()?;
    if k != in_dim {
        return Err(invalid("x", format!("{:?} for a weight of {in_dim} inputs", x.dims())));
    }
    let x = x.contiguous()?;
    if t <= QGEMV_MAX_ROWS {
        return Ok(x.apply_op1_no_bwd(&QuantOp { w: w.clone(), dims: (in_dim, out_dim), gemv: true })?);
    }
    // The op takes x for its dtype and device; the result is the dequantized weight.
    let weight = x.apply_op1_no_bwd(&QuantOp { w: w.clone(), dims: (in_dim, out_dim), gemv: false })?;
    Ok(match w {
        QuantTensors::Int { .. } => x.matmul(&weight)?,
        QuantTensors::Fp8 { .. } => x.matmul(&weight.t()?)?,
    })
}

struct QuantOp {
    // Read by the CUDA launches only.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    w: QuantTensors,
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    dims: (usize, usize),
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    gemv: bool,
}

impl CustomOp1 for QuantOp {
    fn name(&self) -> &'static str {
        "quant-matmul"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        candle_core::bail!("quantized weights on the CPU use the host path, not this op")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let call = super::cuda::QuantCall { w: &self.w, dims: self.dims };
        if self.gemv {
            super::cuda::qgemv(&call, (s1, l1))
        } else {
            super::cuda::qdequant(&call, (s1, l1))
        }
    }
}
