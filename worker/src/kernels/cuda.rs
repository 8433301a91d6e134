//! Launches of the kernels in `worker/kernels/*.cu` (PTX built by `build.rs`). The one place with
//! `unsafe` for kernel launches: each launch passes device pointers whose extents the callers in
//! `kernels/mod.rs` have checked against the shapes given.
#![allow(unsafe_code)] // kernel launches

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaView, LaunchArgs, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Storage, Tensor};

use super::quant::QuantTensors;
use super::reference::{AttnShape, MoeShape};

const FUSED: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));
const ATTENTION: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));
const SAMPLING: &str = include_str!(concat!(env!("OUT_DIR"), "/sampling.ptx"));
const MOE: &str = include_str!(concat!(env!("OUT_DIR"), "/moe.ptx"));
const QUANT: &str = include_str!(concat!(env!("OUT_DIR"), "/quant.ptx"));

/// Blocks the split-K decode aims for: two per SM of an H100/H200 (132 SMs), so one sequence's
/// long context still fills the GPU.
const DECODE_TARGET_BLOCKS: usize = 264;
/// Fewest context positions a decode split covers.
const MIN_SPLIT_POSITIONS: usize = 32;

type In<'a> = (&'a CudaStorage, &'a Layout);

/// Runs `$body` with `$t` bound to the Rust type of `$dtype`.
macro_rules! with_dtype {
    ($dtype:expr, $t:ident => $body:expr) => {
        match $dtype {
            DType::F32 => {
                type $t = f32;
                $body
            }
            DType::F16 => {
                type $t = half::f16;
                $body
            }
            DType::BF16 => {
                type $t = half::bf16;
                $body
            }
            other => bail!("no CUDA kernel for {other:?}"),
        }
    };
}

fn suffix(dtype: DType) -> Result<&'static str> {
    Ok(match dtype {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        other => bail!("no CUDA kernel for {other:?}"),
    })
}

fn func(dev: &CudaDevice, ptx: &'static str, module: &str, name: &str) -> Result<CudaFunction> {
    Ok(dev.get_or_load_custom_func(name, module, ptx)?.into_cuda_function())
}

/// The contiguous elements of a layout.
fn dense<'a, T: CudaDType>(s: In<'a>) -> Result<CudaView<'a, T>> {
    match s.1.contiguous_offsets() {
        Some((a, b)) => Ok(s.0.as_cuda_slice::<T>()?.slice(a..b)),
        None => bail!("kernel input must be contiguous"),
    }
}

/// A `[T, H, D]` view with contiguous rows: the slice from its first element, and the token and
/// head strides.
fn rows<'a, T: CudaDType>(s: In<'a>) -> Result<(CudaView<'a, T>, i64, i64)> {
    let st = s.1.stride();
    if st.len() != 3 || st[2] != 1 {
        bail!("kernel input needs contiguous head dims, got strides {st:?}");
    }
    Ok((s.0.as_cuda_slice::<T>()?.slice(s.1.start_offset()..), st[0] as i64, st[1] as i64))
}

fn cfg(grid: (u32, u32, u32), threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: grid, block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

pub fn add_rms_norm(eps: f32, x: In, r: In, w: In) -> Result<(CudaStorage, Shape)> {
    let dev = x.0.device().clone();
    let (t, h) = x.1.shape().dims2()?;
    let f = func(&dev, FUSED, "qs_fused", &format!("add_rms_norm_{}", suffix(x.0.dtype())?))?;
    with_dtype!(x.0.dtype(), T => {
        let (xv, rv, wv) = (dense::<T>(x)?, dense::<T>(r)?, dense::<T>(w)?);
        // SAFETY: the kernel writes all 2 * t * h elements.
        let out = unsafe { dev.alloc::<T>(2 * t * h)? };
        if t > 0 {
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&xv);
            b.arg(&rv);
            b.arg(&wv);
            b.arg(&out);
            let (rows, hidden) = (t as i32, h as i32);
            b.arg(&rows);
            b.arg(&hidden);
            b.arg(&eps);
            // SAFETY: x, r are [t, h], w is [h], out holds 2 * t * h; one block per row.
            unsafe { b.launch(cfg((t as u32, 1, 1), 256)) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((2, t, h))))
    })
}

pub fn silu_mul(x: In) -> Result<(CudaStorage, Shape)> {
    let dev = x.0.device().clone();
    let (rows, two_f) = x.1.shape().dims2()?;
    let f = two_f / 2;
    let func_ = func(&dev, FUSED, "qs_fused", &format!("silu_mul_{}", suffix(x.0.dtype())?))?;
    with_dtype!(x.0.dtype(), T => {
        let xv = dense::<T>(x)?;
        // SAFETY: the kernel writes all rows * f elements.
        let out = unsafe { dev.alloc::<T>(rows * f)? };
        if rows * f > 0 {
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func_);
            b.arg(&xv);
            b.arg(&out);
            let (r, w) = (rows as u64, f as u64);
            b.arg(&r);
            b.arg(&w);
            let blocks = (rows * f).div_ceil(256).min(65_535) as u32;
            // SAFETY: x holds rows * 2f elements, out rows * f; the kernel strides over out.
            unsafe { b.launch(cfg((blocks, 1, 1), 256)) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((rows, f))))
    })
}

pub fn rotary(qscale: Option<&Tensor>, x: (&mut CudaStorage, &Layout), cos: In, sin: In) -> Result<()> {
    let dev = x.0.device().clone();
    let (t, h, d) = x.1.shape().dims3()?;
    let half_rot = cos.1.shape().dims2()?.1;
    let f = func(&dev, FUSED, "qs_fused", &format!("rotary_inplace_{}", suffix(x.0.dtype())?))?;
    let scale_guard = qscale.map(|s| s.storage_and_layout());
    let scale_view = match &scale_guard {
        Some((st, l)) => match &**st {
            Storage::Cuda(s) => Some(dense::<f32>((s, l))?),
            _ => bail!("qscale must be on the GPU"),
        },
        None => None,
    };
    let st = x.1.stride().to_vec();
    if st.len() != 3 || st[2] != 1 {
        bail!("rotary needs contiguous head dims, got strides {st:?}");
    }
    let start = x.1.start_offset();
    with_dtype!(x.0.dtype(), T => {
        let (cv, sv) = (dense::<T>(cos)?, dense::<T>(sin)?);
        let mut xv = x.0.as_cuda_slice_mut::<T>()?.slice_mut(start..);
        if t * h > 0 {
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&mut xv);
            b.arg(&cv);
            b.arg(&sv);
            let null = 0u64;
            match &scale_view {
                Some(s) => b.arg(s),
                None => b.arg(&null),
            };
            let (heads, head_dim, rot) = (h as i32, d as i32, 2 * half_rot as i32);
            let (s0, s1) = (st[0] as i64, st[1] as i64);
            b.arg(&heads);
            b.arg(&head_dim);
            b.arg(&rot);
            b.arg(&s0);
            b.arg(&s1);
            // SAFETY: x spans t tokens at stride s0 and h heads at stride s1 from `start`; cos/sin
            // are [t, rot / 2]; qscale (or null) is [t].
            unsafe { b.launch(cfg(((t * h) as u32, 1, 1), 64)) }.w()?;
        }
        Ok(())
    })
}

pub fn kv_write(cache: (&mut CudaStorage, &Layout), src: In, slots: In) -> Result<()> {
    let dev = cache.0.device().clone();
    let (t, hkv, d) = src.1.shape().dims3()?;
    let f = func(&dev, FUSED, "qs_fused", &format!("kv_write_{}", suffix(cache.0.dtype())?))?;
    let (start, end) = match cache.1.contiguous_offsets() {
        Some(o) => o,
        None => bail!("the KV cache must be contiguous"),
    };
    let slot_view = dense::<u32>(slots)?;
    with_dtype!(cache.0.dtype(), T => {
        let (sv, s0, s1) = rows::<T>(src)?;
        let mut cv = cache.0.as_cuda_slice_mut::<T>()?.slice_mut(start..end);
        if t > 0 {
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&mut cv);
            b.arg(&sv);
            b.arg(&slot_view);
            let (heads, head_dim) = (hkv as i32, d as i32);
            b.arg(&heads);
            b.arg(&head_dim);
            b.arg(&s0);
            b.arg(&s1);
            // SAFETY: slots were checked against the cache's rows by the caller (AttnBatch builds
            // them from block tables the store validated); src is [t, hkv, d].
            unsafe { b.launch(cfg((t as u32, 1, 1), 256)) }.w()?;
        }
        Ok(())
    })
}

/// The arguments both attention kernels begin with, in their C order: q (with its token and
/// head strides), the K and V caches, the metadata rows and their width, head counts, head dim,
/// block size and score scale.
struct AttnArgs<'a, T> {
    q: CudaView<'a, T>,
    q_strides: (i64, i64),
    k: CudaView<'a, T>,
    v: CudaView<'a, T>,
    meta: CudaView<'a, u32>,
    ints: [i32; 5],
    scale: f32,
}

impl<'a, T> AttnArgs<'a, T> {
    fn push<'s>(&'s self, b: &mut LaunchArgs<'s>) {
        b.arg(&self.q);
        b.arg(&self.q_strides.0);
        b.arg(&self.q_strides.1);
        b.arg(&self.k);
        b.arg(&self.v);
        b.arg(&self.meta);
        for i in &self.ints {
            b.arg(i);
        }
        b.arg(&self.scale);
    }
}

/// A paged-attention launch's host-side facts.
pub struct AttnCall<'a> {
    pub shape: AttnShape,
    pub meta: &'a Tensor,
    pub seqs: usize,
    pub max_context: usize,
    pub max_q_len: usize,
}

pub fn paged_attention(call: &AttnCall, q: In, kc: In, vc: In) -> Result<(CudaStorage, Shape)> {
    let dev = q.0.device().clone();
    let (t, hq, d) = q.1.shape().dims3()?;
    let AttnShape { kv_heads: hkv, block_size, scale, .. } = call.shape;
    let e = match d {
        1..=32 => 1,
        33..=64 => 2,
        65..=128 => 4,
        129..=256 => 8,
        _ => bail!("paged attention supports head_dim up to 256, got {d}"),
    };
    if !super::supports_attention(hq / hkv, d) {
        bail!("paged attention supports up to {} query heads per KV head, got {}", super::MAX_GQA_GROUP, hq / hkv);
    }
    let (meta_storage, meta_layout) = call.meta.storage_and_layout();
    let meta = match &*meta_storage {
        Storage::Cuda(s) => dense::<u32>((s, meta_layout))?,
        _ => bail!("attention metadata must be on the GPU"),
    };
    let meta_w = meta_layout.dims()[1] as i32;
    let sfx = suffix(q.0.dtype())?;
    let nseq = call.seqs;
    with_dtype!(q.0.dtype(), T => {
        let (qv, qs0, qs1) = rows::<T>(q)?;
        let args = AttnArgs {
            q: qv,
            q_strides: (qs0, qs1),
            k: dense::<T>(kc)?,
            v: dense::<T>(vc)?,
            meta,
            // meta width, q heads, kv heads, head dim, block size
            ints: [meta_w, hq as i32, hkv as i32, d as i32, block_size as i32],
            scale,
        };
        // SAFETY: every token of the batch belongs to one sequence, whose rows the kernels write.
        let out = unsafe { dev.alloc::<T>(t * hq * d)? };
        if t == 0 || nseq == 0 {
            return Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((t, hq, d))));
        }
        let stream = dev.cuda_stream();
        if call.max_q_len == 1 {
            let want = DECODE_TARGET_BLOCKS.div_ceil(nseq * hkv);
            let splits = want.clamp(1, call.max_context.div_ceil(MIN_SPLIT_POSITIONS).max(1));
            let part = call.max_context.div_ceil(splits);
            let splits = call.max_context.div_ceil(part);
            let n_part = if splits > 1 { nseq * hq * splits } else { 1 };
            let part_acc = dev.alloc_zeros::<f32>(n_part * d)?;
            let part_ml = dev.alloc_zeros::<f32>(n_part * 2)?;
            let (part_i, splits_i) = (part as i32, splits as i32);
            let f = func(&dev, ATTENTION, "qs_attention", &format!("paged_decode_{sfx}_e{e}"))?;
            let mut b = stream.launch_builder(&f);
            args.push(&mut b);
            b.arg(&part_i);
            b.arg(&splits_i);
            b.arg(&out);
            b.arg(&part_acc);
            b.arg(&part_ml);
            // SAFETY: meta holds nseq rows of meta_w u32 whose block ids the store validated;
            // the partial buffers hold nseq * hq * splits entries when splits > 1.
            unsafe { b.launch(cfg((splits as u32, hkv as u32, nseq as u32), 128)) }.w()?;
            if splits > 1 {
                let f = func(&dev, ATTENTION, "qs_attention", &format!("paged_decode_reduce_{sfx}"))?;
                let mut b = stream.launch_builder(&f);
                let (hq_i, d_i) = (hq as i32, d as i32);
                b.arg(&part_acc);
                b.arg(&part_ml);
                b.arg(&args.meta);
                b.arg(&meta_w);
                b.arg(&hq_i);
                b.arg(&d_i);
                b.arg(&part_i);
                b.arg(&splits_i);
                b.arg(&out);
                // SAFETY: as above; one thread per head dim.
                unsafe { b.launch(cfg((hq as u32, nseq as u32, 1), d.div_ceil(32) as u32 * 32)) }.w()?;
            }
        } else {
            let tiles = (call.max_q_len * (hq / hkv)).div_ceil(16);
            let f = func(&dev, ATTENTION, "qs_attention", &format!("paged_prefill_{sfx}_e{e}"))?;
            let mut b = stream.launch_builder(&f);
            args.push(&mut b);
            b.arg(&out);
            // SAFETY: as for decode; blocks past a sequence's tokens return at once.
            unsafe { b.launch(cfg((tiles as u32, hkv as u32, nseq as u32), 128)) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((t, hq, d))))
    })
}

pub fn sample_rows(logits: In, params: In) -> Result<(CudaStorage, Shape)> {
    let dev = logits.0.device().clone();
    let (n_rows, vocab) = logits.1.shape().dims2()?;
    let f = func(&dev, SAMPLING, "qs_sampling", &format!("sample_rows_{}", suffix(logits.0.dtype())?))?;
    let pv = dense::<f32>(params)?;
    with_dtype!(logits.0.dtype(), T => {
        let lv = dense::<T>(logits)?;
        // SAFETY: a sampling row writes its probabilities before reading them; greedy rows
        // never touch theirs.
        let scratch = unsafe { dev.alloc::<f32>(n_rows * vocab)? };
        let out = dev.alloc_zeros::<u32>(n_rows)?;
        if n_rows > 0 {
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&f);
            b.arg(&lv);
            let v = vocab as i32;
            b.arg(&v);
            b.arg(&pv);
            b.arg(&scratch);
            b.arg(&out);
            // SAFETY: logits are [rows, vocab], params [rows, 5], scratch [rows, vocab].
            unsafe { b.launch(cfg((n_rows as u32, 1, 1), 1024)) }.w()?;
        }
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from(n_rows)))
    })
}

/// Token copies up to which the grouped GEMMs use 16-row tiles: decode-sized batches, where
/// most experts get a row or two and larger tiles would multiply zeros.
const MOE_SMALL_TILE_MAX_ASSIGNMENTS: usize = 256;

/// The routing half of a fused MoE call (device tensors held by the op).
pub struct MoeCall<'a> {
    pub ids: &'a Tensor,
    pub weights: &'a Tensor,
    pub shape: MoeShape,
}

/// A device tensor's storage, for inputs that ride in an op's struct.
fn on_gpu<'a>(storage: &'a Storage, layout: &'a Layout) -> Result<In<'a>> {
    match storage {
        Storage::Cuda(s) => Ok((s, layout)),
        _ => bail!("fused MoE inputs must be on the GPU"),
    }
}

pub fn moe_experts(call: &MoeCall, x: In, gate_up: In, down: In) -> Result<(CudaStorage, Shape)> {
    let dev = x.0.device().clone();
    let s = call.shape;
    let (t, h, f, k) = (x.1.shape().dims2()?.0, s.hidden, s.ff, s.top_k);
    let assignments = t * k;
    let bm = if assignments <= MOE_SMALL_TILE_MAX_ASSIGNMENTS { 16 } else { 64 };
    // Each active local expert pads its rows up to a whole tile.
    let capacity = (assignments + assignments.min(s.local) * (bm - 1)).div_ceil(bm) * bm;
    let (ids_guard, w_guard) = (call.ids.storage_and_layout(), call.weights.storage_and_layout());
    let ids = dense::<u32>(on_gpu(&ids_guard.0, ids_guard.1)?)?;
    let weights = dense::<f32>(on_gpu(&w_guard.0, w_guard.1)?)?;
    let sfx = suffix(x.0.dtype())?;
    with_dtype!(x.0.dtype(), T => {
        if assignments == 0 || s.local == 0 {
            let out = dev.alloc_zeros::<T>(t * h)?;
            return Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((t, h))));
        }
        // SAFETY: the un-permute writes every token's row.
        let out = unsafe { dev.alloc::<T>(t * h)? };
        let (xv, guv, dv) = (dense::<T>(x)?, dense::<T>(gate_up)?, dense::<T>(down)?);
        // SAFETY: moe_align writes all of rows, tile_expert and inv before the GEMMs read them.
        let rows = unsafe { dev.alloc::<i32>(capacity)? };
        let tile_expert = unsafe { dev.alloc::<i32>(capacity / bm)? };
        let inv = unsafe { dev.alloc::<i32>(assignments)? };
        // SAFETY: the gate/up GEMM writes every row of every used tile; the down GEMM reads only
        // those, and the un-permute only rows that inv names.
        let act = unsafe { dev.alloc::<T>(capacity * f)? };
        let y = unsafe { dev.alloc::<T>(capacity * h)? };
        let stream = dev.cuda_stream();
        let (a_i, first, local, bm_i, cap_i) =
            (assignments as i32, s.first as i32, s.local as i32, bm as i32, capacity as i32);
        let (k_i, h_i, f_i) = (k as i32, h as i32, f as i32);
        let align = func(&dev, MOE, "qs_moe", "moe_align")?;
        let mut b = stream.launch_builder(&align);
        b.arg(&ids);
        b.arg(&a_i);
        b.arg(&first);
        b.arg(&local);
        b.arg(&bm_i);
        b.arg(&rows);
        b.arg(&cap_i);
        b.arg(&tile_expert);
        b.arg(&inv);
        // SAFETY: ids holds `assignments` u32; rows `capacity`, tile_expert capacity / bm and
        // inv `assignments` i32; local <= MAX_FUSED_EXPERTS (checked by the caller).
        unsafe { b.launch(cfg((1, 1, 1), 1024)) }.w()?;
        let tiles = (capacity / bm) as u32;
        let gate_up_f = func(&dev, MOE, "qs_moe", &format!("moe_gate_up_bm{bm}_{sfx}"))?;
        let mut b = stream.launch_builder(&gate_up_f);
        b.arg(&xv);
        b.arg(&guv);
        b.arg(&rows);
        b.arg(&tile_expert);
        b.arg(&act);
        b.arg(&k_i);
        b.arg(&h_i);
        b.arg(&f_i);
        // SAFETY: x is [t, h]; gate_up [local, 2f, h]; rows name assignments < t * k; act holds
        // capacity rows of f.
        unsafe { b.launch(cfg((tiles, f.div_ceil(64) as u32, 1), 256)) }.w()?;
        let down_f = func(&dev, MOE, "qs_moe", &format!("moe_down_bm{bm}_{sfx}"))?;
        let mut b = stream.launch_builder(&down_f);
        b.arg(&act);
        b.arg(&dv);
        b.arg(&rows);
        b.arg(&tile_expert);
        b.arg(&y);
        b.arg(&k_i);
        b.arg(&f_i);
        b.arg(&h_i);
        // SAFETY: act is [capacity, f]; down [local, h, f]; y holds capacity rows of h.
        unsafe { b.launch(cfg((tiles, h.div_ceil(64) as u32, 1), 256)) }.w()?;
        let unpermute = func(&dev, MOE, "qs_moe", &format!("moe_unpermute_{sfx}"))?;
        let mut b = stream.launch_builder(&unpermute);
        b.arg(&y);
        b.arg(&inv);
        b.arg(&weights);
        b.arg(&out);
        b.arg(&k_i);
        b.arg(&h_i);
        // SAFETY: inv holds t * k entries, each -1 or a row < capacity of y; weights [t, k];
        // out [t, h], one block per token.
        unsafe { b.launch(cfg((t as u32, 1, 1), 256)) }.w()?;
        Ok((CudaStorage::wrap_cuda_slice(out, dev.clone()), Shape::from((t, h))))
    })
}

pub fn moe_count(experts: usize, counts: (&mut CudaStorage, &Layout), ids: In) -> Result<()> {
    let dev = ids.0.device().clone();
    let n = ids.1.shape().elem_count();
    if n == 0 {
        return Ok(());
    }
    let idv = dense::<u32>(ids)?;
    let start = counts.1.start_offset();
    let mut cv = counts.0.as_cuda_slice_mut::<u32>()?.slice_mut(start..start + experts);
    let f = func(&dev, MOE, "qs_moe", "moe_count")?;
    let stream = dev.cuda_stream();
    let mut b = stream.launch_builder(&f);
    b.arg(&idv);
    let (n_i, e_i) = (n as i32, experts as i32);
    b.arg(&n_i);
    b.arg(&e_i);
    b.arg(&mut cv);
    // SAFETY: ids holds n u32; counts `experts` u32, indexed only below that.
    unsafe { b.launch(cfg((n.div_ceil(256).min(1024) as u32, 1, 1), 256)) }.w()?;
    Ok(())
}

/// A quantized weight and its `(in, out)`.
pub struct QuantCall<'a> {
    pub w: &'a QuantTensors,
    pub dims: (usize, usize),
}

/// The device view of a tensor held by an op.
macro_rules! held {
    ($guard:ident = $t:expr, $ty:ty => $view:ident) => {
        let $guard = $t.storage_and_layout();
        let $view = dense::<$ty>(on_gpu(&$guard.0, $guard.1)?)?;
    };
}

/// Threads per block of the integer GEMV: 32 columns x 8 slices of the inputs (quant.cu).
const QGEMV_INT_THREADS: u32 = 256;
/// Output rows per block of the FP8 GEMV (a warp each).
const QGEMV_FP8_ROWS: usize = 8;

pub fn qgemv(call: &QuantCall, x: In) -> Result<(CudaStorage, Shape)> {
    let dev = x.0.device().clone();
    let (rows, _) = x.1.shape().dims2()?;
    let (i, o) = call.dims;
    let sfx = suffix(x.0.dtype())?;
    with_dtype!(x.0.dtype(), T => {
        let xv = dense::<T>(x)?;
        // SAFETY: the kernel writes every (row, output) entry.
        let y = unsafe { dev.alloc::<T>(rows * o)? };
        if rows * o == 0 {
            return Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), Shape::from((rows, o))));
        }
        let stream = dev.cuda_stream();
        let (rows_i, in_i, out_i) = (rows as i32, i as i32, o as i32);
        match call.w {
            QuantTensors::Int { bits, along_out, packed, zeros, scales, group } => {
                held!(pg = packed, u32 => pv);
                held!(zg = zeros, f32 => zv);
                held!(sg = scales, f32 => sv);
                held!(gg = group, u32 => gv);
                let f = func(&dev, QUANT, "qs_quant", &format!("qgemv_int_{sfx}"))?;
                let (bits_i, along_i) = (*bits as i32, i32::from(*along_out));
                let mut b = stream.launch_builder(&f);
                b.arg(&xv);
                b.arg(&pv);
                b.arg(&zv);
                b.arg(&sv);
                b.arg(&gv);
                b.arg(&y);
                b.arg(&rows_i);
                b.arg(&in_i);
                b.arg(&out_i);
                b.arg(&bits_i);
                b.arg(&along_i);
                // SAFETY: x is [rows <= 8, in]; the packed words, zeros/scales and groups match
                // (in, out) as `quant::load` built them; y is [rows, out].
                unsafe { b.launch(cfg((o.div_ceil(32) as u32, 1, 1), QGEMV_INT_THREADS)) }.w()?;
            }
            QuantTensors::Fp8 { weight, scale_inv, rows: wrows, block, scale_cols, col0 } => {
                held!(wg = weight, u8 => wv);
                held!(sg = scale_inv, f32 => sv);
                held!(rg = wrows, u32 => rv);
                let f = func(&dev, QUANT, "qs_quant", &format!("qgemv_fp8_{sfx}"))?;
                let (br, bc, sc, c0) = (block[0] as i32, block[1] as i32, *scale_cols as i32, *col0 as i32);
                let mut b = stream.launch_builder(&f);
                b.arg(&xv);
                b.arg(&wv);
                b.arg(&sv);
                b.arg(&rv);
                b.arg(&y);
                b.arg(&rows_i);
                b.arg(&in_i);
                b.arg(&out_i);
                b.arg(&br);
                b.arg(&bc);
                b.arg(&sc);
                b.arg(&c0);
                // SAFETY: weight is [out, in] bytes, rows [out] checkpoint rows within scale_inv's
                // block rows, col0 + in within its columns; one warp per output row.
                let blocks = o.div_ceil(QGEMV_FP8_ROWS) as u32;
                unsafe { b.launch(cfg((blocks, 1, 1), 32 * QGEMV_FP8_ROWS as u32)) }.w()?;
            }
        }
        Ok((CudaStorage::wrap_cuda_slice(y, dev.clone()), Shape::from((rows, o))))
    })
}

pub fn qdequant(call: &QuantCall, x: In) -> Result<(CudaStorage, Shape)> {
    let dev = x.0.device().clone();
    let (i, o) = call.dims;
    let sfx = suffix(x.0.dtype())?;
    let blocks = (i * o).div_ceil(256).clamp(1, 65_535) as u32;
    let (in_i, out_i) = (i as i32, o as i32);
    with_dtype!(x.0.dtype(), T => {
        // SAFETY: the kernel writes all in * out elements (grid-stride).
        let w_out = unsafe { dev.alloc::<T>(i * o)? };
        let stream = dev.cuda_stream();
        let shape = match call.w {
            QuantTensors::Int { bits, along_out, packed, zeros, scales, group } => {
                held!(pg = packed, u32 => pv);
                held!(zg = zeros, f32 => zv);
                held!(sg = scales, f32 => sv);
                held!(gg = group, u32 => gv);
                let f = func(&dev, QUANT, "qs_quant", &format!("qdequant_int_{sfx}"))?;
                let (bits_i, along_i) = (*bits as i32, i32::from(*along_out));
                let mut b = stream.launch_builder(&f);
                b.arg(&pv);
                b.arg(&zv);
                b.arg(&sv);
                b.arg(&gv);
                b.arg(&w_out);
                b.arg(&in_i);
                b.arg(&out_i);
                b.arg(&bits_i);
                b.arg(&along_i);
                // SAFETY: as for qgemv; w_out holds in * out elements.
                unsafe { b.launch(cfg((blocks, 1, 1), 256)) }.w()?;
                Shape::from((i, o))
            }
            QuantTensors::Fp8 { weight, scale_inv, rows, block, scale_cols, col0 } => {
                held!(wg = weight, u8 => wv);
                held!(sg = scale_inv, f32 => sv);
                held!(rg = rows, u32 => rv);
                let f = func(&dev, QUANT, "qs_quant", &format!("qdequant_fp8_{sfx}"))?;
                let (br, bc, sc, c0) = (block[0] as i32, block[1] as i32, *scale_cols as i32, *col0 as i32);
                let mut b = stream.launch_builder(&f);
                b.arg(&wv);
                b.arg(&sv);
                b.arg(&rv);
                b.arg(&w_out);
                b.arg(&in_i);
                b.arg(&out_i);
                b.arg(&br);
                b.arg(&bc);
                b.arg(&sc);
                b.arg(&c0);
                // SAFETY: as for qgemv; w_out holds out * in elements.
                unsafe { b.launch(cfg((blocks, 1, 1), 256)) }.w()?;
                Shape::from((o, i))
            }
        };
        Ok((CudaStorage::wrap_cuda_slice(w_out, dev.clone()), shape))
    })
}
