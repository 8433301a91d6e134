//! The fused mixture-of-experts ops: every routed expert of a layer in one op that never brings
//! the routing to the host (grouping, grouped GEMMs with SiLU·mul, weighted un-permute; the
//! kernels are in `worker/kernels/moe.cu`), and the per-expert load counter it feeds.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, InplaceOp2, Layout, Shape, Tensor};

use super::reference::{self, MoeShape};
use super::{invalid, read, read_u32, same_dtype, store};
use crate::error::Result;

/// Most experts one rank holds for the fused op (the grouping kernel keeps a counter per local
/// expert in one block's shared memory; Qwen's largest MoE has 160).
pub const MAX_FUSED_EXPERTS: usize = 1024;

/// The stacked experts of one layer that a rank holds: `gate_up` `[local, 2 ff, hidden]` (each
/// expert's gate rows, then its up rows), `down` `[local, hidden, ff]`, for experts
/// `first..first + local`.
pub struct StackedExperts<'a> {
    pub gate_up: &'a Tensor,
    pub down: &'a Tensor,
    pub first: usize,
}

/// The weighted sum of the routed experts this rank holds, for every token: `x` `[T, hidden]`,
/// `ids` (u32) and `weights` (f32) `[T, top_k]` on `x`'s device. Returns `[T, hidden]`; slots
/// routed to other ranks' experts add nothing.
pub fn moe_experts(x: &Tensor, ids: &Tensor, weights: &Tensor, experts: &StackedExperts) -> Result<Tensor> {
    let (t, h) = x.dims2()?;
    let (local, two_f, gh) = experts.gate_up.dims3()?;
    let ff = two_f / 2;
    if gh != h || two_f % 2 != 0 || experts.down.dims() != [local, h, ff] {
        return Err(invalid(
            "experts",
            format!("gate_up {:?} and down {:?} for hidden {h}", experts.gate_up.dims(), experts.down.dims()),
        ));
    }
    let top_k = ids.dims2()?.1;
    if ids.dims() != [t, top_k] || weights.dims() != [t, top_k] || ids.dtype() != DType::U32 {
        return Err(invalid("ids", format!("ids {:?} / weights {:?} for {t} tokens", ids.dims(), weights.dims())));
    }
    if weights.dtype() != DType::F32 {
        return Err(invalid("weights", format!("dtype {:?}, want f32", weights.dtype())));
    }
    if local > MAX_FUSED_EXPERTS || t * top_k > i32::MAX as usize / 2 {
        return Err(invalid("experts", format!("{local} local experts, {t} x {top_k} assignments")));
    }
    same_dtype("gate_up", x, experts.gate_up)?;
    same_dtype("down", x, experts.down)?;
    let op = MoeExperts {
        ids: ids.contiguous()?,
        weights: weights.contiguous()?,
        shape: MoeShape { top_k, first: experts.first, local, hidden: h, ff },
    };
    Ok(x.contiguous()?.apply_op3_no_bwd(&experts.gate_up.contiguous()?, &experts.down.contiguous()?, &op)?)
}

/// `counts[e] += ` how many of `ids` are `e`, in place (u32 `[num_experts]`, wrapping), on the
/// device the ids are on: the load counter the host reads between steps.
pub fn count_experts(counts: &Tensor, ids: &Tensor) -> Result<()> {
    if counts.dtype() != DType::U32 || ids.dtype() != DType::U32 || counts.rank() != 1 || !counts.is_contiguous() {
        return Err(invalid(
            "counts",
            format!("counts {:?} {:?}, ids {:?}", counts.dims(), counts.dtype(), ids.dtype()),
        ));
    }
    counts.inplace_op2(&ids.flatten_all()?.contiguous()?, &CountExperts { experts: counts.dim(0)? })?;
    Ok(())
}

struct MoeExperts {
    ids: Tensor,
    weights: Tensor,
    shape: MoeShape,
}

impl CustomOp3 for MoeExperts {
    fn name(&self) -> &'static str {
        "moe-experts"
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
        let ids = self.ids.flatten_all()?.to_vec1::<u32>()?;
        let weights = self.weights.flatten_all()?.to_vec1::<f32>()?;
        let (x, gate_up, down) = (read(s1, l1)?, read(s2, l2)?, read(s3, l3)?);
        let out = reference::moe_experts(&x, &ids, &weights, &gate_up, &down, self.shape, s1.dtype());
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
        let call = super::cuda::MoeCall { ids: &self.ids, weights: &self.weights, shape: self.shape };
        super::cuda::moe_experts(&call, (s1, l1), (s2, l2), (s3, l3))
    }
}

struct CountExperts {
    experts: usize,
}

impl InplaceOp2 for CountExperts {
    fn name(&self) -> &'static str {
        "moe-count"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        let ids = read_u32(s2, l2)?;
        let CpuStorage::U32(counts) = s1 else { candle_core::bail!("counts must be u32") };
        let start = l1.start_offset();
        for id in ids.into_iter().filter(|&id| (id as usize) < self.experts) {
            let c = &mut counts[start + id as usize];
            *c = c.wrapping_add(1);
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
    ) -> candle_core::Result<()> {
        super::cuda::moe_count(self.experts, (s1, l1), (s2, l2))
    }
}
