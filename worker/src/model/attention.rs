//! The attention interface between model code and KV-cache storage, and a contiguous
//! per-sequence CPU implementation. The model hands over rotated q/k and v for a flat varlen
//! batch; the implementation stores k/v and computes causal attention over each sequence's past
//! and present. A paged-KV store and CUDA kernels implement the same trait.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};

use super::SeqChunk;
use crate::error::{Error, Result};

/// Per-forward facts every layer's attention shares: where each sequence sits in the flat batch.
pub struct BatchMeta {
    pub seqs: Vec<SeqChunk>,
    /// Offset of each sequence's first token in the flat token dimension.
    pub offsets: Vec<usize>,
    pub num_tokens: usize,
    /// Additive causal mask `[len, context_len + len]` per sequence, built on first use (only
    /// implementations that materialise scores need them) and then shared by every layer.
    causal_masks: Vec<std::cell::OnceCell<Option<Tensor>>>,
    device: Device,
}

impl BatchMeta {
    pub fn new(seqs: &[SeqChunk], device: &Device) -> Result<Self> {
        let mut offsets = Vec::with_capacity(seqs.len());
        let mut num_tokens = 0;
        for s in seqs {
            offsets.push(num_tokens);
            num_tokens += s.len;
        }
        let causal_masks = seqs.iter().map(|_| std::cell::OnceCell::new()).collect();
        Ok(BatchMeta { seqs: seqs.to_vec(), offsets, num_tokens, causal_masks, device: device.clone() })
    }

    /// Sequence `i`'s causal mask (see [`causal_mask`]); `None` for a single-token chunk.
    pub fn causal_mask(&self, i: usize) -> Result<Option<&Tensor>> {
        let cell = &self.causal_masks[i];
        if cell.get().is_none() {
            let s = &self.seqs[i];
            let _ = cell.set(causal_mask(s.len, s.context_len, &self.device)?);
        }
        Ok(cell.get().and_then(|m| m.as_ref()))
    }
}

/// Stores one layer's new keys/values and attends over them.
pub trait Attention {
    /// `q`: `[T, Hq, D]`, `k` and `v`: `[T, Hkv, D]` for the batch's new tokens (rotary already
    /// applied). Returns `[T, Hq, D]`: causal attention of each token over its own sequence's
    /// cached tokens plus the new ones up to itself, with scores scaled by `scale`.
    fn forward(&mut self, input: LayerQkv<'_>, meta: &BatchMeta) -> Result<Tensor>;
}

/// One layer's new queries, keys and values for the whole batch, and the score scale.
pub struct LayerQkv<'a> {
    pub layer: usize,
    pub q: &'a Tensor,
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    pub scale: f64,
}

/// One sequence's keys and values for one layer, `[Hkv, capacity, D]`, filled up to `len`.
struct LayerKv {
    k: Tensor,
    v: Tensor,
    len: usize,
}

/// KV cache with one growable contiguous buffer per sequence and layer. Simple and exact; it is
/// the reference the paged cache is checked against.
pub struct ContiguousKvCache {
    num_layers: usize,
    seqs: HashMap<u64, Vec<Option<LayerKv>>>,
}

impl ContiguousKvCache {
    pub fn new(num_layers: usize) -> Self {
        ContiguousKvCache { num_layers, seqs: HashMap::new() }
    }

    /// Tokens cached for `seq_id` (0 when unknown).
    pub fn seq_len(&self, seq_id: u64) -> usize {
        self.seqs.get(&seq_id).and_then(|layers| layers.first()).and_then(|l| l.as_ref()).map_or(0, |l| l.len)
    }

    fn layer_len(&self, seq_id: u64, layer: usize) -> usize {
        self.seqs.get(&seq_id).and_then(|layers| layers.get(layer)).and_then(|l| l.as_ref()).map_or(0, |l| l.len)
    }

    /// Drops a finished sequence's cache.
    pub fn remove(&mut self, seq_id: u64) {
        self.seqs.remove(&seq_id);
    }

    /// Appends `k`/`v` (`[Hkv, n, D]`) at `at` and returns views of everything cached.
    fn append(&mut self, layer: usize, seq: &SeqChunk, k: &Tensor, v: &Tensor) -> Result<(Tensor, Tensor)> {
        let layers = self.seqs.entry(seq.seq_id).or_insert_with(|| (0..self.num_layers).map(|_| None).collect());
        let slot = layers
            .get_mut(layer)
            .ok_or(Error::Internal { what: "layer", message: format!("layer {layer} out of range") })?;
        let have = slot.as_ref().map_or(0, |l| l.len);
        let (hkv, n, d) = k.dims3()?;
        let needed = have + n;
        let capacity = slot.as_ref().map_or(0, |l| l.k.dim(1).unwrap_or(0));
        if needed > capacity {
            // Doubling keeps appends amortised O(1) per token.
            let new_cap = needed.max(capacity * 2).max(16);
            let grow = |old: Option<&Tensor>| -> Result<Tensor> {
                let t = Tensor::zeros((hkv, new_cap, d), k.dtype(), k.device())?;
                if let Some(old) = old {
                    t.slice_set(&old.narrow(1, 0, have)?.contiguous()?, 1, 0)?;
                }
                Ok(t)
            };
            let (nk, nv) = (grow(slot.as_ref().map(|l| &l.k))?, grow(slot.as_ref().map(|l| &l.v))?);
            *slot = Some(LayerKv { k: nk, v: nv, len: have });
        }
        let entry = slot.as_mut().expect("allocated above");
        entry.k.slice_set(&k.contiguous()?, 1, have)?;
        entry.v.slice_set(&v.contiguous()?, 1, have)?;
        entry.len = needed;
        Ok((entry.k.narrow(1, 0, needed)?, entry.v.narrow(1, 0, needed)?))
    }
}

impl Attention for ContiguousKvCache {
    fn forward(&mut self, input: LayerQkv<'_>, meta: &BatchMeta) -> Result<Tensor> {
        let LayerQkv { layer, q, k, v, scale } = input;
        // Check every sequence before appending any, so a bad batch leaves the cache untouched.
        for seq in &meta.seqs {
            let have = self.layer_len(seq.seq_id, layer);
            if have != seq.context_len {
                return Err(Error::Internal {
                    what: "context_len",
                    message: format!(
                        "sequence {} claims {} cached tokens but the cache holds {have}",
                        seq.seq_id, seq.context_len
                    ),
                });
            }
        }
        let mut outs = Vec::with_capacity(meta.seqs.len());
        for (i, (seq, &off)) in meta.seqs.iter().zip(&meta.offsets).enumerate() {
            let q_s = q.narrow(0, off, seq.len)?.transpose(0, 1)?; // [Hq, n, D]
            let k_s = k.narrow(0, off, seq.len)?.transpose(0, 1)?; // [Hkv, n, D]
            let v_s = v.narrow(0, off, seq.len)?.transpose(0, 1)?;
            let (keys, values) = self.append(layer, seq, &k_s, &v_s)?;
            outs.push(causal_attention(&q_s, &keys, &values, meta.causal_mask(i)?, scale)?);
        }
        Ok(Tensor::cat(&outs, 0)?)
    }
}

/// Causal attention for one sequence: `q` `[Hq, n, D]` holds the queries at positions
/// `context_len..context_len + n`; `keys`/`values` `[Hkv, context_len + n, D]`; `mask` from
/// [`causal_mask`]. Grouped-query heads share kv heads in consecutive groups (q head `h` reads kv
/// head `h / (Hq / Hkv)`). Returns `[n, Hq, D]`.
pub fn causal_attention(
    q: &Tensor,
    keys: &Tensor,
    values: &Tensor,
    mask: Option<&Tensor>,
    scale: f64,
) -> Result<Tensor> {
    let (hq, n, d) = q.dims3()?;
    let (hkv, total, _) = keys.dims3()?;
    let group = hq / hkv;
    let dtype = q.dtype();
    // Grouping consecutive q heads onto their kv head makes GQA one batched matmul per kv head.
    let q = (q.contiguous()?.reshape((hkv, group * n, d))? * scale)?;
    // The cache views are strided along the token axis; matmul reads them in place.
    let scores = q.matmul(&keys.t()?)?.reshape((hq, n, total))?;
    let scores = scores.to_dtype(DType::F32)?;
    let scores = match mask {
        Some(mask) => scores.broadcast_add(mask)?,
        None => scores,
    };
    let probs = candle_nn::ops::softmax_last_dim(&scores)?.to_dtype(dtype)?;
    let out = probs.reshape((hkv, group * n, total))?.matmul(values)?;
    Ok(out.reshape((hq, n, d))?.transpose(0, 1)?.contiguous()?)
}

/// `[n, context_len + n]` additive mask hiding keys after each query; `None` for a single query,
/// which sees everything cached.
pub fn causal_mask(n: usize, context_len: usize, device: &Device) -> Result<Option<Tensor>> {
    if n == 1 {
        return Ok(None);
    }
    let total = context_len + n;
    let mask: Vec<f32> = (0..n)
        .flat_map(|i| (0..total).map(move |j| if j > context_len + i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Ok(Some(Tensor::from_vec(mask, (n, total), device)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attention by definition, one head and query at a time, in f64 on the host.
    #[allow(clippy::needless_range_loop)]
    fn naive(
        q: &[Vec<Vec<f32>>],
        k: &[Vec<Vec<f32>>],
        v: &[Vec<Vec<f32>>],
        ctx: usize,
        scale: f64,
    ) -> Vec<Vec<Vec<f32>>> {
        let (hq, hkv) = (q.len(), k.len());
        let mut out = vec![];
        for i in 0..q[0].len() {
            let mut heads = vec![];
            for h in 0..hq {
                let kh = h / (hq / hkv);
                let visible = ctx + i + 1;
                let s: Vec<f64> = (0..visible)
                    .map(|j| q[h][i].iter().zip(&k[kh][j]).map(|(a, b)| *a as f64 * *b as f64).sum::<f64>() * scale)
                    .collect();
                let m = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                let d = v[0][0].len();
                heads.push(
                    (0..d).map(|c| (0..visible).map(|j| e[j] / z * v[kh][j][c] as f64).sum::<f64>() as f32).collect(),
                );
            }
            out.push(heads);
        }
        out
    }

    #[test]
    fn matches_definition_with_gqa_and_context() -> Result<()> {
        let dev = Device::Cpu;
        let (hq, hkv, n, ctx, d) = (4, 2, 3, 5, 8);
        let q = crate::test_util::randn(&[hq, n, d], DType::F32, &dev);
        let k = crate::test_util::randn(&[hkv, ctx + n, d], DType::F32, &dev);
        let v = crate::test_util::randn(&[hkv, ctx + n, d], DType::F32, &dev);
        let mask = causal_mask(n, ctx, &dev)?;
        let got = causal_attention(&q, &k, &v, mask.as_ref(), 0.3)?.to_vec3::<f32>()?;
        let want = naive(&q.to_vec3()?, &k.to_vec3()?, &v.to_vec3()?, ctx, 0.3);
        for (a, b) in got.iter().flatten().flatten().zip(want.iter().flatten().flatten()) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        Ok(())
    }

    #[test]
    fn a_bad_batch_leaves_the_cache_untouched() -> Result<()> {
        let dev = Device::Cpu;
        let mut cache = ContiguousKvCache::new(1);
        let t = Tensor::zeros((2, 2, 4), DType::F32, &dev)?;
        let good = SeqChunk { seq_id: 1, context_len: 0, len: 1, rope_alpha: 1.0 };
        let bad = SeqChunk { seq_id: 2, context_len: 3, len: 1, rope_alpha: 1.0 };
        let meta = BatchMeta::new(&[good, bad], &dev)?;
        let qkv = |t| LayerQkv { layer: 0, q: t, k: t, v: t, scale: 1.0 };
        let err = cache.forward(qkv(&t), &meta).unwrap_err();
        assert!(err.to_string().contains("sequence 2 claims 3 cached tokens but the cache holds 0"), "{err}");
        assert_eq!(cache.seq_len(1), 0, "the good sequence was not appended");
        // The same good sequence then runs normally.
        let one = Tensor::zeros((1, 2, 4), DType::F32, &dev)?;
        cache.forward(qkv(&one), &BatchMeta::new(&[good], &dev)?)?;
        assert_eq!(cache.seq_len(1), 1);
        Ok(())
    }
}
