//! On the CPU: each op (its reference) against the unfused candle path it replaces. With the
//! `cuda` feature and a GPU: each kernel against its CPU reference on random inputs of several
//! shapes, including ragged block tables and contexts longer than one block.

use candle_core::{DType, Device, Tensor};

use super::*;
use crate::model::attention::{causal_attention, causal_mask};
use crate::model::layers::apply_rotary;

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
    a.iter().zip(&b).map(|(x, y)| (x - y).abs() / scale).fold(0.0, f32::max)
}

use crate::test_util::{randn, unit_roundoff};

/// Tolerance for a result rounded `k` more times (in `dtype`) than its reference; f32 results
/// carry reductions in another order, and get `k_f32` unit roundoffs instead.
fn tol(dtype: DType, k: f32, k_f32: f32) -> f32 {
    unit_roundoff(dtype) * if dtype == DType::F32 { k_f32 } else { k }
}

#[test]
fn add_rms_norm_matches_add_then_rms_norm() -> Result<()> {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::BF16] {
        let (x, r, w) = (randn(&[5, 48], dtype, &dev), randn(&[5, 48], dtype, &dev), randn(&[48], dtype, &dev));
        let (sum, normed) = add_rms_norm(&x, &r, &w, 1e-6)?;
        let want_sum = (&x + &r)?;
        let want = candle_nn::ops::rms_norm(&want_sum, &w, 1e-6)?;
        assert_eq!(max_rel(&sum, &want_sum), 0.0, "{dtype:?}");
        // Both normalise in f32 and round once: a rounding each way, and a 48-long sum in f32.
        assert!(max_rel(&normed, &want) < tol(dtype, 2.0, 64.0), "{dtype:?}");
    }
    Ok(())
}

#[test]
fn silu_mul_matches_silu_times_up() -> Result<()> {
    let dev = Device::Cpu;
    for dtype in [DType::F32, DType::BF16] {
        let gu = randn(&[3, 80], dtype, &dev);
        let want = (candle_nn::ops::silu(&gu.narrow(1, 0, 40)?)? * gu.narrow(1, 40, 40)?)?;
        // candle rounds exp, the sum, the quotient and the product in bf16; the fused op once.
        assert!(max_rel(&silu_mul(&gu)?, &want) < tol(dtype, 8.0, 16.0), "{dtype:?}");
    }
    Ok(())
}

#[test]
fn rotary_in_place_on_a_strided_view_matches_apply_rotary() -> Result<()> {
    let dev = Device::Cpu;
    // A fused qkv [T, 3, H, D] as the original Qwen has it; rotate the q part in place, with a
    // partial rotary (rot 8 of 12) and a LogN scale.
    let (t, h, d, half) = (4, 2, 12, 4);
    let qkv = randn(&[t, 3, h, d], DType::F32, &dev);
    let q = qkv.narrow(1, 0, 1)?.squeeze(1)?;
    let before_k = qkv.narrow(1, 1, 1)?.squeeze(1)?.copy()?;
    let (cos, sin) = (randn(&[t, half], DType::F32, &dev), randn(&[t, half], DType::F32, &dev));
    let scale = Tensor::new(&[1.0f32, 1.1, 1.2, 1.3], &dev)?;
    let want = apply_rotary(&q.copy()?, &cos, &sin)?.broadcast_mul(&scale.reshape((t, 1, 1))?)?;
    rotary_inplace(&q, &cos, &sin, Some(&scale))?;
    assert!(max_rel(&q, &want) < 1e-6);
    assert_eq!(max_rel(&qkv.narrow(1, 1, 1)?.squeeze(1)?, &before_k), 0.0, "k untouched");
    Ok(())
}

/// Sequences with ragged block tables (non-consecutive, out of order), contexts longer than one
/// block, a mid-prompt chunk, and decode rows.
fn ragged_batch(block_size: usize) -> Vec<(usize, usize, Vec<u32>)> {
    // (cached before, new tokens, blocks)
    vec![(0, 7, vec![5, 2]), (11, 1, vec![0, 7, 3]), (5, 4, vec![6, 1, 4]), (2 * block_size, 1, vec![8, 9, 10])]
}

/// Writes random K/V for every position of every sequence through `kv_write`, then attends with
/// `paged_attention`; returns (q, the paged result, the result of `causal_attention` over the
/// gathered contexts).
fn paged_case(dev: &Device, dtype: DType, hq: usize, hkv: usize, d: usize) -> Result<(Tensor, Tensor, Tensor)> {
    let bs = 4;
    let num_blocks = 12;
    let spec = ragged_batch(bs);
    let k_cache = Tensor::zeros((num_blocks * bs, hkv, d), dtype, dev)?;
    let v_cache = Tensor::zeros((num_blocks * bs, hkv, d), dtype, dev)?;
    let mut seqs = Vec::new();
    let mut q_start = 0;
    let mut all_k = Vec::new();
    let mut all_v = Vec::new();
    for (before, new, blocks) in &spec {
        let total = before + new;
        // Fill the cached part through kv_write too (a batch of its own).
        let k = randn(&[total, hkv, d], dtype, dev);
        let v = randn(&[total, hkv, d], dtype, dev);
        let cached = AttnBatch::new(
            vec![AttnSeq { q_start: 0, q_len: total, context_len: total, blocks: blocks.clone() }],
            bs,
            dev,
        )?;
        kv_write(&k_cache, &k, &cached.slots)?;
        kv_write(&v_cache, &v, &cached.slots)?;
        all_k.push(k);
        all_v.push(v);
        seqs.push(AttnSeq { q_start, q_len: *new, context_len: total, blocks: blocks.clone() });
        q_start += new;
    }
    let q = randn(&[q_start, hq, d], dtype, dev);
    let batch = AttnBatch::new(seqs.clone(), bs, dev)?;
    let scale = 1.0 / (d as f32).sqrt();
    let got = paged_attention(&q, &k_cache, &v_cache, &batch, bs, scale)?;
    let mut want = Vec::new();
    for (s, (k, v)) in seqs.iter().zip(all_k.iter().zip(&all_v)) {
        let qs = q.narrow(0, s.q_start, s.q_len)?.transpose(0, 1)?;
        let mask = causal_mask(s.q_len, s.context_len - s.q_len, dev)?;
        let (k, v) = (k.transpose(0, 1)?.contiguous()?, v.transpose(0, 1)?.contiguous()?);
        want.push(causal_attention(&qs, &k, &v, mask.as_ref(), scale as f64)?);
    }
    Ok((q, got, Tensor::cat(&want, 0)?))
}

#[test]
fn paged_attention_reference_matches_dense_causal_attention() -> Result<()> {
    for (hq, hkv, d) in [(4, 2, 16), (4, 4, 24), (8, 1, 8)] {
        let (_, got, want) = paged_case(&Device::Cpu, DType::F32, hq, hkv, d)?;
        assert!(max_rel(&got, &want) < 1e-5, "hq {hq} hkv {hkv} d {d}: {}", max_rel(&got, &want));
    }
    Ok(())
}

#[test]
fn attn_batch_rejects_tables_too_short_for_the_context() {
    let seq = AttnSeq { q_start: 0, q_len: 1, context_len: 9, blocks: vec![0, 1] };
    let err = AttnBatch::new(vec![seq], 4, &Device::Cpu).err().expect("9 tokens do not fit 2 blocks of 4");
    assert!(err.to_string().contains("block_tables"), "{err}");
}

#[test]
fn ops_name_the_bad_input() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((2, 8), DType::F32, &dev).unwrap();
    let err = add_rms_norm(&x, &x, &Tensor::zeros(4, DType::F32, &dev).unwrap(), 1e-6).unwrap_err();
    assert!(err.to_string().contains("residual"), "{err}");
    let err = silu_mul(&Tensor::zeros((2, 5), DType::F32, &dev).unwrap()).unwrap_err();
    assert!(err.to_string().contains("gate_up"), "{err}");
    let err = sample_rows(&x, &[]).unwrap_err();
    assert!(err.to_string().contains("params"), "{err}");
}

fn draw(temperature: f32, top_k: usize, top_p: f32, min_p: f32, u: f32) -> DrawParams {
    DrawParams { temperature, top_k, top_p, min_p, u }
}

/// Whether the GPU's pick `got` agrees with the CPU reference's `want` up to f32 summation
/// order: the same token, or (the sums run in another order) a kept token whose slice of the
/// kept mass lies within a rounding step of the draw. For greedy rows, another token only where
/// its logit ties the reference's.
#[cfg_attr(not(feature = "cuda"), allow(dead_code))]
fn agrees(row: &[f32], params: DrawParams, got: u32, want: u32) -> bool {
    if got == want {
        return true;
    }
    let Some(g) = row.get(got as usize) else { return false };
    let Some((p, thr)) = reference::kept_probs(row, params) else { return *g == row[want as usize] };
    // Relative error of an f32 sum over n terms in any order is at most ~n·eps; a block-wide
    // tree sum is far tighter, and 1e-4 of the mass covers it for any vocabulary here.
    let total: f64 = p.iter().filter(|&&v| v >= thr).map(|&v| v as f64).sum();
    let tol = 1e-4 * total;
    // The threshold itself comes from bisections over such sums: allow a token just under it.
    if p[got as usize] < thr * (1.0 - 1e-3) || p[got as usize] <= 0.0 {
        return false;
    }
    let r = params.u as f64 * total;
    let before: f64 = p[..got as usize].iter().filter(|&&v| v >= thr).map(|&v| v as f64).sum();
    let slice = (before - tol)..=(before + p[got as usize] as f64 + tol);
    slice.contains(&r)
}

#[test]
fn the_rounding_rule_accepts_only_boundary_picks() -> Result<()> {
    let row: Vec<f32> = (0..100).map(|i| ((i * 37 % 100) as f32) / 25.0).collect();
    let params = draw(1.0, 0, 1.0, 0.0, 0.5);
    let want = reference::sample_row(&row, params);
    assert!(agrees(&row, params, want, want));
    // The neighbour in the kept order, where the draw falls inside `want`'s slice far from its
    // edges, is not a rounding difference; a token far away never is.
    let far = (want + 50) % 100;
    assert!(!agrees(&row, params, far, want));
    // A draw placed exactly on the boundary between two kept tokens accepts both.
    let (p, thr) = reference::kept_probs(&row, params).unwrap();
    let total: f64 = p.iter().filter(|&&v| v >= thr).map(|&v| v as f64).sum();
    let before: f64 = p[..10].iter().map(|&v| v as f64).sum();
    let edge = draw(1.0, 0, 1.0, 0.0, (before / total) as f32);
    assert!(agrees(&row, edge, 9, 10) && agrees(&row, edge, 10, 9));
    // Greedy: only an exact tie.
    let greedy = draw(0.0, 0, 1.0, 0.0, 0.5);
    let best = reference::sample_row(&row, greedy);
    let mut tied = row.clone();
    tied[3] = row[best as usize];
    assert!(agrees(&tied, greedy, 3, best) && !agrees(&row, greedy, 3, best));
    Ok(())
}

#[test]
fn sampling_reference_keeps_what_the_host_sampler_keeps() -> Result<()> {
    use crate::sampling::{argmax, SamplingParams, Scratch, SeqSampler};
    let dev = Device::Cpu;
    let logits = randn(&[3, 300], DType::F32, &dev).affine(3.0, 0.0)?;
    let rows: Vec<Vec<f32>> = logits.to_vec2()?;
    // Greedy and top-k 1 are the argmax.
    let ids = sample_rows(&logits, &[draw(0.0, 0, 1.0, 0.0, 0.5); 3])?;
    assert_eq!(ids, rows.iter().map(|r| argmax(r)).collect::<Vec<_>>());
    assert_eq!(sample_rows(&logits, &[draw(1.0, 1, 1.0, 0.0, 0.99); 3])?, ids);
    // Every truncation: what the kernel's steps can return, over many draws, is exactly the set
    // the host sampler keeps.
    for (top_k, top_p, min_p) in [(5, 1.0, 0.0), (0, 0.6, 0.0), (0, 1.0, 0.05), (20, 0.8, 0.01)] {
        let row = &rows[0];
        let host = SamplingParams { temperature: 0.7, top_k, top_p: top_p as f64, min_p, ..SamplingParams::default() };
        let mut sampler = SeqSampler::new(host.clone(), &[]);
        let mut scratch = Scratch::default();
        let mut host_seen = std::collections::BTreeSet::new();
        let mut ours = std::collections::BTreeSet::new();
        for i in 0..2000 {
            host_seen.insert(sampler.sample(row, &mut scratch).token);
            let u = (i as f32 + 0.5) / 2000.0;
            ours.insert(reference::sample_row(row, draw(0.7, top_k, top_p, min_p as f32, u)));
        }
        assert!(ours.is_superset(&host_seen), "top_k {top_k} top_p {top_p} min_p {min_p}");
        assert!(ours.len() <= host_seen.len() + 1, "{ours:?} vs {host_seen:?}");
    }
    Ok(())
}

/// A random MoE layer's inputs: `x` `[t, h]`, seeded routing over `experts` ids, and `local`
/// stacked experts.
struct MoeCase {
    x: Tensor,
    ids: Tensor,
    weights: Tensor,
    gate_up: Tensor,
    down: Tensor,
}

fn moe_case(t: usize, top_k: usize, experts: usize, local: usize, (h, f): (usize, usize), dtype: DType) -> MoeCase {
    let dev = Device::Cpu;
    let ids = crate::test_util::uniform(0.0, experts as f32 - 0.01, &[t, top_k], &dev).to_dtype(DType::U32).unwrap();
    MoeCase {
        x: randn(&[t, h], dtype, &dev),
        ids,
        weights: crate::test_util::uniform(0.0, 1.0, &[t, top_k], &dev),
        // Scaled as a checkpoint's (~1/sqrt(fan-in)), so sums stay near 1.
        gate_up: (randn(&[local, 2 * f, h], DType::F32, &dev) / (h as f64).sqrt()).unwrap().to_dtype(dtype).unwrap(),
        down: (randn(&[local, h, f], DType::F32, &dev) / (f as f64).sqrt()).unwrap().to_dtype(dtype).unwrap(),
    }
}

impl MoeCase {
    fn run(&self, dev: &Device, first: usize) -> Result<Tensor> {
        let on = |t: &Tensor| t.to_device(dev).unwrap();
        let (gate_up, down) = (on(&self.gate_up), on(&self.down));
        moe_experts(
            &on(&self.x),
            &on(&self.ids),
            &on(&self.weights),
            &StackedExperts { gate_up: &gate_up, down: &down, first },
        )
    }

    /// The unfused path's math with candle's ops, one (token, slot) at a time.
    fn unfused(&self, first: usize) -> Result<Tensor> {
        let (t, top_k) = self.ids.dims2()?;
        let (local, two_f, _) = self.gate_up.dims3()?;
        let f = two_f / 2;
        let (ids, weights): (Vec<Vec<u32>>, Vec<Vec<f32>>) = (self.ids.to_vec2()?, self.weights.to_vec2()?);
        let mut rows = Vec::new();
        for tok in 0..t {
            let x = self.x.narrow(0, tok, 1)?;
            let mut acc = x.zeros_like()?.to_dtype(DType::F32)?;
            for j in 0..top_k {
                let Some(e) = (ids[tok][j] as usize).checked_sub(first).filter(|&e| e < local) else { continue };
                let gu = x.matmul(&self.gate_up.get(e)?.t()?)?;
                let inner = (candle_nn::ops::silu(&gu.narrow(1, 0, f)?)? * gu.narrow(1, f, f)?)?;
                let y = inner.matmul(&self.down.get(e)?.t()?)?.to_dtype(DType::F32)?;
                acc = (acc + (y * f64::from(weights[tok][j]))?)?;
            }
            rows.push(acc.to_dtype(self.x.dtype())?);
        }
        Ok(Tensor::cat(&rows, 0)?)
    }
}

#[test]
fn fused_moe_reference_matches_the_unfused_experts() -> Result<()> {
    for dtype in [DType::F32, DType::BF16] {
        // All experts here; then expert parallel: experts 2..5 of 8, the other slots skipped.
        for (experts, local, first) in [(6, 6, 0), (8, 3, 2)] {
            let case = moe_case(9, 3, experts, local, (40, 24), dtype);
            let (got, want) = (case.run(&Device::Cpu, first)?, case.unfused(first)?);
            // candle rounds gate, up, silu, the product and each expert's output, then sums.
            assert!(max_rel(&got, &want) < tol(dtype, 16.0, 64.0), "{dtype:?} {local} of {experts}");
        }
    }
    let case = moe_case(4, 2, 4, 4, (16, 8), DType::F32);
    let bad = StackedExperts { gate_up: &case.down, down: &case.gate_up, first: 0 };
    assert!(moe_experts(&case.x, &case.ids, &case.weights, &bad).is_err(), "swapped stacks");
    Ok(())
}

#[test]
fn expert_counts_add_up_in_place() -> Result<()> {
    let counts = Tensor::zeros(5, DType::U32, &Device::Cpu)?;
    let ids = Tensor::new(&[[4u32, 0], [4, 1], [9, 4]], &Device::Cpu)?;
    count_experts(&counts, &ids)?;
    count_experts(&counts, &ids.narrow(0, 0, 1)?)?;
    assert_eq!(counts.to_vec1::<u32>()?, vec![2, 1, 0, 0, 4], "id 9 is out of range and ignored");
    assert!(count_experts(&counts.to_dtype(DType::F32)?, &ids).is_err());
    Ok(())
}

/// On a GPU (feature `cuda`): every kernel against its CPU reference. Skipped without a GPU
/// unless `QWEN_REQUIRE_GPU=1`, which makes a missing GPU a failure.
#[cfg(feature = "cuda")]
mod gpu {
    use super::*;
    use crate::test_util::uniform;

    fn gpu() -> Option<Device> {
        match crate::device::DeviceSpec::Cuda(0).open() {
            Ok(d) => Some(d),
            Err(e) => {
                assert!(std::env::var("QWEN_REQUIRE_GPU").as_deref() != Ok("1"), "no GPU: {e}");
                eprintln!("skipped: no GPU ({e})");
                None
            }
        }
    }

    /// GPU against CPU reference: both round once in `dtype`; in f32, reductions up to 5120
    /// long in another order.
    fn gpu_tol(dtype: DType) -> f32 {
        tol(dtype, 4.0, 168.0)
    }

    #[test]
    fn fused_elementwise_kernels_match_the_references() -> Result<()> {
        let Some(g) = gpu() else { return Ok(()) };
        let c = Device::Cpu;
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            for (t, h) in [(1, 64), (7, 3584), (33, 5120)] {
                let (x, r, w) = (randn(&[t, h], dtype, &c), randn(&[t, h], dtype, &c), randn(&[h], dtype, &c));
                let (s_c, n_c) = add_rms_norm(&x, &r, &w, 1e-6)?;
                let (s_g, n_g) = add_rms_norm(&x.to_device(&g)?, &r.to_device(&g)?, &w.to_device(&g)?, 1e-6)?;
                assert_eq!(max_rel(&s_g, &s_c), 0.0, "sum {dtype:?} {t}x{h}");
                assert!(max_rel(&n_g, &n_c) < gpu_tol(dtype), "norm {dtype:?} {t}x{h}");
                let got = silu_mul(&x.to_device(&g)?)?;
                assert!(max_rel(&got, &silu_mul(&x)?) < gpu_tol(dtype), "silu {dtype:?}");
            }
            for (t, h, d, half, scaled) in [(3, 4, 16, 8, false), (5, 28, 128, 64, true), (2, 2, 24, 6, true)] {
                let x = randn(&[t, h, d], dtype, &c);
                let (cos, sin) = (randn(&[t, half], dtype, &c), randn(&[t, half], dtype, &c));
                let scale = scaled.then(|| uniform(1.0, 2.0, &[t], &c));
                let xg = x.to_device(&g)?;
                let sg = scale.as_ref().map(|s| s.to_device(&g).unwrap());
                rotary_inplace(&xg, &cos.to_device(&g)?, &sin.to_device(&g)?, sg.as_ref())?;
                rotary_inplace(&x, &cos, &sin, scale.as_ref())?;
                assert!(max_rel(&xg, &x) < gpu_tol(dtype), "rotary {dtype:?} d {d}");
            }
        }
        Ok(())
    }

    #[test]
    fn paged_attention_kernels_match_the_reference() -> Result<()> {
        let Some(g) = gpu() else { return Ok(()) };
        for dtype in [DType::F32, DType::BF16] {
            // GQA 1, 2, 4, 7 and 8; head_dim 16 to 256.
            for (hq, hkv, d) in
                [(4, 4, 24), (4, 2, 16), (16, 4, 64), (32, 8, 128), (28, 4, 128), (8, 1, 64), (16, 2, 256)]
            {
                // The same random case on both devices: build on the CPU, replay on the GPU.
                let (_, got_cpu, want) = paged_case(&Device::Cpu, dtype, hq, hkv, d)?;
                // Softmax weights and sums over the whole context: 16 roundings, 1e-4 in f32.
                let attn_tol = tol(dtype, 16.0, 1680.0);
                assert!(max_rel(&got_cpu, &want) < attn_tol);
                let (_, got_gpu, want_gpu) = paged_case(&g, dtype, hq, hkv, d)?;
                assert!(
                    max_rel(&got_gpu, &want_gpu) < attn_tol,
                    "{dtype:?} hq {hq} hkv {hkv} d {d}: {}",
                    max_rel(&got_gpu, &want_gpu)
                );
            }
        }
        Ok(())
    }

    #[test]
    fn long_context_decode_splits_match_the_reference() -> Result<()> {
        let Some(g) = gpu() else { return Ok(()) };
        let (hq, hkv, d, bs) = (28, 4, 128, 16);
        for ctx in [1usize, 17, 700, 5000] {
            let blocks: Vec<u32> = (0..ctx.div_ceil(bs) as u32).rev().collect();
            let slots = blocks.len() * bs;
            let (kc, vc) = (randn(&[slots, hkv, d], DType::BF16, &g), randn(&[slots, hkv, d], DType::BF16, &g));
            let q = randn(&[2, hq, d], DType::BF16, &g);
            let seqs = vec![
                AttnSeq { q_start: 0, q_len: 1, context_len: ctx, blocks: blocks.clone() },
                AttnSeq { q_start: 1, q_len: 1, context_len: ctx.div_ceil(2), blocks: blocks.clone() },
            ];
            let run = |dev: &Device| -> Result<Tensor> {
                let batch = AttnBatch::new(seqs.clone(), bs, dev)?;
                paged_attention(&q.to_device(dev)?, &kc.to_device(dev)?, &vc.to_device(dev)?, &batch, bs, 0.088)
            };
            let (got, want) = (run(&g)?, run(&Device::Cpu)?);
            let t = tol(DType::BF16, 4.0, 0.0);
            assert!(max_rel(&got, &want) < t, "ctx {ctx}: {}", max_rel(&got, &want));
        }
        Ok(())
    }

    #[test]
    fn sampling_kernel_matches_the_reference() -> Result<()> {
        let Some(g) = gpu() else { return Ok(()) };
        let logits = randn(&[6, 151_936], DType::F32, &Device::Cpu).affine(4.0, 0.0)?;
        let params = [
            draw(0.0, 0, 1.0, 0.0, 0.3),
            draw(0.8, 50, 1.0, 0.0, 0.42),
            draw(1.0, 0, 0.9, 0.0, 0.77),
            draw(0.6, 0, 1.0, 0.05, 0.1),
            draw(1.2, 40, 0.7, 0.01, 0.93),
            draw(1.0, 0, 1.0, 0.0, 0.5),
        ];
        for dtype in [DType::F32, DType::BF16] {
            let l = logits.to_dtype(dtype)?;
            let want = sample_rows(&l, &params)?;
            let got = sample_rows(&l.to_device(&g)?, &params)?;
            let rows: Vec<Vec<f32>> = l.to_dtype(DType::F32)?.to_vec2()?;
            for (i, p) in params.iter().enumerate() {
                assert!(agrees(&rows[i], *p, got[i], want[i]), "{dtype:?} row {i}: gpu {} cpu {}", got[i], want[i]);
            }
        }
        Ok(())
    }

    #[test]
    fn fused_moe_kernels_match_the_reference() -> Result<()> {
        let Some(g) = gpu() else { return Ok(()) };
        for dtype in [DType::F32, DType::BF16, DType::F16] {
            // (tokens, top_k, experts, local, first, (hidden, ff)): decode-sized (16-row tiles),
            // odd widths, expert parallel, and a prefill past the small-tile limit (64-row tiles).
            for (t, k, e, local, first, hf) in [
                (1, 2, 4, 4, 0, (64, 48)),
                (5, 8, 16, 16, 0, (200, 72)),
                (7, 4, 10, 3, 3, (96, 40)),
                (100, 8, 64, 64, 0, (256, 96)),
                (130, 2, 8, 5, 3, (128, 64)),
            ] {
                let case = moe_case(t, k, e, local, hf, dtype);
                let (got, want) = (case.run(&g, first)?, case.run(&Device::Cpu, first)?);
                // Inner dims up to 256 summed in another order (FMA), then the slot sum.
                assert!(
                    max_rel(&got, &want) < tol(dtype, 4.0, 512.0),
                    "{dtype:?} {t}x{k} of {e}: {}",
                    max_rel(&got, &want)
                );
            }
        }
        let ids = crate::test_util::uniform(0.0, 8.99, &[300, 8], &Device::Cpu).to_dtype(DType::U32)?;
        let (cpu, gpu_counts) = (Tensor::zeros(9, DType::U32, &Device::Cpu)?, Tensor::zeros(9, DType::U32, &g)?);
        count_experts(&cpu, &ids)?;
        count_experts(&gpu_counts, &ids.to_device(&g)?)?;
        assert_eq!(gpu_counts.to_vec1::<u32>()?, cpu.to_vec1::<u32>()?);
        Ok(())
    }
}
