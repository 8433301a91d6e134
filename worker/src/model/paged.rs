//! Attention over a paged KV cache: each layer's keys and values live in one tensor of
//! `num_blocks * block_size` slots, and a sequence's tokens sit in the blocks its block table
//! lists, in order. Block ids come from the engine's allocator; this module only reads and
//! writes slots.

use candle_core::{DType, Device, Tensor};

use super::attention::{causal_attention, Attention, BatchMeta, LayerQkv};
use super::SeqChunk;
use crate::error::{Error, Result};
use crate::kernels::{self, AttnBatch, AttnSeq, KernelMode};

/// The KV tensors: per layer, `[num_blocks * block_size, Hkv, D]` for keys and for values.
pub struct PagedKvStore {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
    block_size: usize,
    num_blocks: usize,
    /// Plain: gather each sequence's slots and attend with candle's ops. Fused: the paged
    /// attention and KV-write kernels read and write the blocks in place.
    kernels: KernelMode,
}

/// Shape of the store, from the model config and the cache budget.
#[derive(Debug, Clone, Copy)]
pub struct KvLayout {
    pub num_layers: usize,
    pub num_kv_heads: usize,
    pub head_dim: usize,
    pub block_size: usize,
    pub dtype: DType,
}

impl KvLayout {
    /// The layout of `model`'s cache on this rank (its share of the KV heads, its dtype).
    pub fn for_model(model: &super::Model, block_size: usize) -> Self {
        let cfg = model.config();
        KvLayout {
            num_layers: cfg.num_layers,
            num_kv_heads: model.local_kv_heads(),
            head_dim: cfg.head_dim,
            block_size,
            dtype: model.dtype(),
        }
    }

    /// Bytes one block takes across all layers, keys and values.
    pub fn block_bytes(&self) -> usize {
        2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.size_in_bytes()
    }
}

impl PagedKvStore {
    pub fn new(layout: KvLayout, num_blocks: usize, device: &Device) -> Result<Self> {
        let slots = num_blocks * layout.block_size;
        let shape = (slots, layout.num_kv_heads, layout.head_dim);
        let mut keys = Vec::with_capacity(layout.num_layers);
        let mut values = Vec::with_capacity(layout.num_layers);
        for _ in 0..layout.num_layers {
            keys.push(Tensor::zeros(shape, layout.dtype, device)?);
            values.push(Tensor::zeros(shape, layout.dtype, device)?);
        }
        let kernels = KernelMode::for_device(device);
        Ok(PagedKvStore { keys, values, block_size: layout.block_size, num_blocks, kernels })
    }

    /// Overrides the device's default way of attending (e.g. to run the kernels' CPU references).
    pub fn set_kernels(&mut self, mode: KernelMode) {
        self.kernels = mode;
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn num_blocks(&self) -> usize {
        self.num_blocks
    }

    /// A view for one forward over `seqs` (as passed to `Model::forward`) whose `i`-th sequence
    /// uses block table `tables[i]`.
    pub fn step<'a, T: AsRef<[u32]>>(&'a mut self, seqs: &[SeqChunk], tables: &[T]) -> Result<PagedStep<'a>> {
        if tables.len() != seqs.len() {
            return Err(Error::Internal {
                what: "block_tables",
                message: format!("{} tables for {} sequences", tables.len(), seqs.len()),
            });
        }
        let device = self.keys.first().map(|t| t.device().clone()).unwrap_or(Device::Cpu);
        for (seq, table) in seqs.iter().zip(tables) {
            let table = table.as_ref();
            let total = seq.context_len + seq.len;
            if table.len() * self.block_size < total {
                return Err(Error::Internal {
                    what: "block_tables",
                    message: format!(
                        "sequence {} needs {total} slots but its {} blocks hold {}",
                        seq.seq_id,
                        table.len(),
                        table.len() * self.block_size
                    ),
                });
            }
            if let Some(&bad) = table.iter().find(|&&b| b as usize >= self.num_blocks) {
                return Err(Error::Internal {
                    what: "block_tables",
                    message: format!("block {bad} out of range (0..{})", self.num_blocks),
                });
            }
        }
        let access = match self.kernels {
            KernelMode::Fused => {
                let mut q_start = 0;
                let mut attn = Vec::with_capacity(seqs.len());
                for (seq, table) in seqs.iter().zip(tables) {
                    let total = seq.context_len + seq.len;
                    // Only the blocks the context covers travel to the device.
                    let blocks = table.as_ref()[..total.div_ceil(self.block_size)].to_vec();
                    attn.push(AttnSeq { q_start, q_len: seq.len, context_len: total, blocks });
                    q_start += seq.len;
                }
                Access::Fused(AttnBatch::new(attn, self.block_size, &device)?)
            }
            KernelMode::Plain => {
                let mut writes = Vec::with_capacity(tables.len());
                let mut reads = Vec::with_capacity(tables.len());
                for (seq, table) in seqs.iter().zip(tables) {
                    let table = table.as_ref();
                    let total = seq.context_len + seq.len;
                    let slot =
                        |pos: usize| table[pos / self.block_size] as usize * self.block_size + pos % self.block_size;
                    // New tokens' positions are contiguous: they fill runs of consecutive slots,
                    // one run per block touched.
                    let mut runs = Vec::new();
                    let mut pos = seq.context_len;
                    while pos < total {
                        let run = (self.block_size - pos % self.block_size).min(total - pos);
                        runs.push(Run { slot: slot(pos), token: pos - seq.context_len, len: run });
                        pos += run;
                    }
                    writes.push(runs);
                    let gather: Vec<u32> = (0..total).map(|p| slot(p) as u32).collect();
                    reads.push(Tensor::from_vec(gather, total, &device)?);
                }
                Access::Plain { writes, reads }
            }
        };
        Ok(PagedStep { store: self, access })
    }
}

impl PagedKvStore {
    /// A fused-kernel view for one forward over an attention batch built elsewhere (the static
    /// buffers of a CUDA graph); its block ids are checked against the store.
    pub fn step_prepared(&mut self, batch: AttnBatch) -> Result<PagedStep<'_>> {
        if let Some(&bad) = batch.seqs.iter().flat_map(|s| &s.blocks).find(|&&b| b as usize >= self.num_blocks) {
            return Err(Error::Internal {
                what: "block_tables",
                message: format!("block {bad} out of range (0..{})", self.num_blocks),
            });
        }
        Ok(PagedStep { store: self, access: Access::Fused(batch) })
    }
}

/// `len` new tokens starting at batch token `token` go to slots `slot..slot + len`.
struct Run {
    slot: usize,
    token: usize,
    len: usize,
}

/// How one forward reaches the blocks, computed once and reused by every layer.
enum Access {
    /// Where each sequence's new tokens go and which slots hold its whole context.
    Plain { writes: Vec<Vec<Run>>, reads: Vec<Tensor> },
    /// The kernels' metadata: block tables, context lengths and new tokens' slots.
    Fused(AttnBatch),
}

/// One forward's access to the store.
pub struct PagedStep<'a> {
    store: &'a mut PagedKvStore,
    access: Access,
}

impl Attention for PagedStep<'_> {
    fn forward(&mut self, input: LayerQkv<'_>, meta: &BatchMeta) -> Result<Tensor> {
        let LayerQkv { layer, q, k, v, scale } = input;
        let (keys, values) = (&self.store.keys[layer], &self.store.values[layer]);
        let (writes, reads) = match &self.access {
            Access::Fused(batch) => {
                kernels::kv_write(keys, k, &batch.slots)?;
                kernels::kv_write(values, v, &batch.slots)?;
                return kernels::paged_attention(q, keys, values, batch, self.store.block_size, scale as f32);
            }
            Access::Plain { writes, reads } => (writes, reads),
        };
        for (runs, &off) in writes.iter().zip(&meta.offsets) {
            for r in runs {
                keys.slice_set(&k.narrow(0, off + r.token, r.len)?.contiguous()?, 0, r.slot)?;
                values.slice_set(&v.narrow(0, off + r.token, r.len)?.contiguous()?, 0, r.slot)?;
            }
        }
        let mut outs = Vec::with_capacity(meta.seqs.len());
        for (i, (seq, &off)) in meta.seqs.iter().zip(&meta.offsets).enumerate() {
            let q_s = q.narrow(0, off, seq.len)?.transpose(0, 1)?;
            let k_s = keys.index_select(&reads[i], 0)?.transpose(0, 1)?;
            let v_s = values.index_select(&reads[i], 0)?.transpose(0, 1)?;
            outs.push(causal_attention(&q_s, &k_s, &v_s, meta.causal_mask(i)?, scale)?);
        }
        Ok(Tensor::cat(&outs, 0)?)
    }
}
