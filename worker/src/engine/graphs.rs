//! Decode steps replayed from CUDA graphs. A step where every sequence decodes one token is
//! padded to a batch-size bucket; its inputs (tokens, positions, block tables, slots) are copied
//! into that bucket's static device buffers, and the forward recorded once per (bucket, context
//! bucket) replays with one launch instead of hundreds. Padding rows decode into a scratch
//! block no sequence owns.
//!
//! A graph is kept only if its first replay gives the logits of the same step run eagerly (the
//! check runs once, at capture); a capture that fails or differs leaves that key eager, with a
//! warning. Off CUDA the same static-buffer path runs eagerly, which is how it is tested.
//!
//! Replays are counted where they happen ([`GraphCounts`]), so a run that asked for graphs can
//! prove it got them: a step that fell back to eager is counted as such, never as a replay.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::error::{Error, Result};
use crate::kernels::{AttnBatch, AttnSeq, KernelMode};
use crate::model::paged::PagedKvStore;
use crate::model::{DeviceInputs, Model, SeqChunk};

/// Default batch-size buckets (each step uses the smallest that fits).
pub const DEFAULT_BUCKETS: [usize; 8] = [1, 2, 4, 8, 16, 32, 64, 128];

/// Smallest context bucket: the decode kernel's split count is fixed per graph by its bucket.
const MIN_CONTEXT_BUCKET: usize = 256;

/// One batch bucket's static inputs and output.
struct Buffers {
    inputs: DeviceInputs,
    meta: Tensor,
    slots: Tensor,
    /// Where a graph leaves its logits (CUDA only).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    logits: Option<Tensor>,
}

enum Replay {
    #[cfg(feature = "cuda")]
    Graph(candle_core::cuda_backend::cudarc::driver::CudaGraph),
    /// Capture failed or its replay differed: run from the static buffers eagerly.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    Eager,
}

/// What the runner did, cumulative since it was made.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GraphCounts {
    /// Steps whose logits came from a graph launch (a fresh capture's check replay included).
    pub replays: u64,
    /// Steps run eagerly from the static buffers: off CUDA, or where capture failed or differed.
    pub eager_steps: u64,
    /// Graphs kept after their check replay.
    pub captured: u64,
    /// Captures that failed or whose replay differed from the eager step.
    pub failed_captures: u64,
}

pub struct DecodeGraphs {
    buckets: Vec<usize>,
    block_size: usize,
    /// A cache block outside the scheduler's pool: padding rows read and write only it.
    scratch_block: u32,
    /// Width of a metadata row: 3 + blocks of the longest context.
    meta_width: usize,
    max_context: usize,
    buffers: HashMap<usize, Buffers>,
    replays: HashMap<(usize, usize), Replay>,
    counts: GraphCounts,
}

impl DecodeGraphs {
    /// `scratch_block` must exist in the KV store and never be handed to a sequence.
    pub fn new(model: &mut Model, buckets: &[usize], block_size: usize, scratch_block: u32) -> Result<Self> {
        let mut buckets: Vec<usize> = buckets.iter().copied().filter(|&b| b > 0).collect();
        buckets.sort_unstable();
        buckets.dedup();
        if buckets.is_empty() {
            return Err(Error::Internal { what: "graph buckets", message: "no batch size above 0".into() });
        }
        model.prepare_static_forward()?;
        let max_context = model.config().max_context();
        Ok(DecodeGraphs {
            buckets,
            block_size,
            scratch_block,
            meta_width: 3 + max_context.div_ceil(block_size),
            max_context,
            buffers: HashMap::new(),
            replays: HashMap::new(),
            counts: GraphCounts::default(),
        })
    }

    pub fn counts(&self) -> GraphCounts {
        self.counts
    }

    /// Captures every batch bucket at the smallest context bucket, with padding rows only, so
    /// the first requests of each size do not pay for capture (longer contexts still capture on
    /// first use). Returns how many buckets now replay from a graph.
    pub fn warm_up(&mut self, model: &mut Model, store: &mut PagedKvStore) -> Result<usize> {
        let ctx_bucket = MIN_CONTEXT_BUCKET.min(self.max_context);
        let no_tables: &[Vec<u32>] = &[];
        for size in self.buckets.clone() {
            self.step(model, store, (size, ctx_bucket), &[], &[], no_tables)?;
        }
        // Warm-up steps are no request's: only what they captured is kept.
        self.counts.replays = 0;
        self.counts.eager_steps = 0;
        Ok(self.counts.captured as usize)
    }

    /// Whether a step over `chunks` can run here: fused kernels alone on one device, every
    /// chunk one decode token, a batch within the largest bucket, and a static forward.
    pub fn eligible(&self, model: &Model, chunks: &[SeqChunk]) -> bool {
        model.kernels() == KernelMode::Fused
            && model.comm().world_size() == 1
            && !chunks.is_empty()
            && chunks.len() <= *self.buckets.last().unwrap_or(&0)
            && chunks.iter().all(|c| c.len == 1 && c.context_len < self.max_context)
            && model.is_static_forward(chunks)
    }

    /// Runs the decode step (`tokens[i]` of `chunks[i]`, whose blocks are `tables[i]`) and returns
    /// logits `[chunks.len(), vocab]`, a view of the bucket's output buffer valid until the next
    /// call. Call only when [`DecodeGraphs::eligible`].
    pub fn run<T: AsRef<[u32]>>(
        &mut self,
        model: &mut Model,
        store: &mut PagedKvStore,
        tokens: &[u32],
        chunks: &[SeqChunk],
        tables: &[T],
    ) -> Result<Tensor> {
        let b = chunks.len();
        let size = self.buckets.iter().copied().find(|&s| s >= b).unwrap_or(b);
        let longest = chunks.iter().map(|c| c.context_len + 1).max().unwrap_or(1);
        let ctx_bucket = longest.next_power_of_two().max(MIN_CONTEXT_BUCKET).min(self.max_context);
        self.step(model, store, (size, ctx_bucket), tokens, chunks, tables)
    }

    /// One step under `key` = (batch bucket, context bucket), the key its graph is kept under;
    /// rows past `chunks` are padding.
    fn step<T: AsRef<[u32]>>(
        &mut self,
        model: &mut Model,
        store: &mut PagedKvStore,
        key: (usize, usize),
        tokens: &[u32],
        chunks: &[SeqChunk],
        tables: &[T],
    ) -> Result<Tensor> {
        let (size, ctx_bucket) = key;
        let b = chunks.len();
        let (padded, batch) = self.load_inputs(model.device(), size, ctx_bucket, tokens, chunks, tables)?;
        let buffers = &self.buffers[&size];
        if !model.device().is_cuda() {
            let logits = eager(model, store, &padded, &buffers.inputs, &batch)?;
            self.counts.eager_steps += 1;
            return Ok(logits.narrow(0, 0, b)?);
        }
        #[cfg(feature = "cuda")]
        {
            // A fresh capture's check replay has already left this step's logits in the buffer.
            let fresh = !self.replays.contains_key(&key);
            if fresh {
                let replay = capture(model, store, &padded, self.buffers.get_mut(&size).expect("loaded"), &batch)?;
                match replay {
                    Replay::Graph(_) => self.counts.captured += 1,
                    Replay::Eager => self.counts.failed_captures += 1,
                }
                self.replays.insert(key, replay);
            }
            let buffers = &self.buffers[&size];
            if let (Some(Replay::Graph(g)), Some(out)) = (self.replays.get(&key), &buffers.logits) {
                if !fresh {
                    g.launch().map_err(|e| graph_err("launch", e))?;
                }
                self.counts.replays += 1;
                return Ok(out.narrow(0, 0, b)?);
            }
            let logits = eager(model, store, &padded, &buffers.inputs, &batch)?;
            self.counts.eager_steps += 1;
            Ok(logits.narrow(0, 0, b)?)
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = (key, &self.replays);
            Err(Error::Internal { what: "cuda graphs", message: "CUDA graphs need the `cuda` feature".into() })
        }
    }

    /// Fills bucket `size`'s static buffers for this step (padding rows point at the scratch
    /// block) and returns the padded chunks and the attention batch over the buffers.
    fn load_inputs<T: AsRef<[u32]>>(
        &mut self,
        device: &Device,
        size: usize,
        ctx_bucket: usize,
        tokens: &[u32],
        chunks: &[SeqChunk],
        tables: &[T],
    ) -> Result<(Vec<SeqChunk>, AttnBatch)> {
        let (bs, width) = (self.block_size, self.meta_width);
        let mut tok = vec![0u32; size];
        let mut pos = vec![0u32; size];
        let mut meta = vec![0u32; size * width];
        let mut slots = vec![self.scratch_block * bs as u32; size];
        let mut seqs = Vec::with_capacity(size);
        let mut padded = Vec::with_capacity(size);
        for i in 0..size {
            let (chunk, blocks) = match chunks.get(i) {
                Some(c) => {
                    let ctx = c.context_len + 1;
                    let table = tables[i].as_ref();
                    let blocks = table.get(..ctx.div_ceil(bs)).ok_or_else(|| Error::Internal {
                        what: "block tables",
                        message: format!("sequence {} needs {ctx} slots in {} blocks", c.seq_id, table.len()),
                    })?;
                    tok[i] = tokens[i];
                    pos[i] = c.context_len as u32;
                    slots[i] = blocks[c.context_len / bs] * bs as u32 + (c.context_len % bs) as u32;
                    (*c, blocks.to_vec())
                }
                None => {
                    let pad = SeqChunk { seq_id: u64::MAX - i as u64, context_len: 0, len: 1, rope_alpha: 1.0 };
                    (pad, vec![self.scratch_block])
                }
            };
            let ctx = chunk.context_len + 1;
            let row = &mut meta[i * width..(i + 1) * width];
            row[..3].copy_from_slice(&[i as u32, 1, ctx as u32]);
            row[3..3 + blocks.len()].copy_from_slice(&blocks);
            seqs.push(AttnSeq { q_start: i, q_len: 1, context_len: ctx, blocks });
            padded.push(chunk);
        }
        if let std::collections::hash_map::Entry::Vacant(slot) = self.buffers.entry(size) {
            let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::U32, device);
            let last: Vec<u32> = (0..size as u32).collect();
            slot.insert(Buffers {
                inputs: DeviceInputs {
                    tokens: zeros(&[size])?,
                    positions: zeros(&[size])?,
                    last: Tensor::from_vec(last, size, device)?,
                },
                meta: zeros(&[size, width])?,
                slots: zeros(&[size])?,
                logits: None,
            });
        }
        let buf = &self.buffers[&size];
        write(&buf.inputs.tokens, tok)?;
        write(&buf.inputs.positions, pos)?;
        write(&buf.meta, meta)?;
        write(&buf.slots, slots)?;
        let batch = AttnBatch {
            seqs: Arc::new(seqs),
            meta: buf.meta.clone(),
            slots: buf.slots.clone(),
            num_tokens: size,
            max_context: ctx_bucket,
            max_q_len: 1,
        };
        Ok((padded, batch))
    }
}

/// Copies `host` into the device tensor `dst` in place (its address stays what graphs recorded).
fn write(dst: &Tensor, host: Vec<u32>) -> Result<()> {
    let src = Tensor::from_vec(host, dst.shape(), dst.device())?;
    dst.slice_set(&src, 0, 0)?;
    Ok(())
}

fn eager(
    model: &mut Model,
    store: &mut PagedKvStore,
    padded: &[SeqChunk],
    inputs: &DeviceInputs,
    batch: &AttnBatch,
) -> Result<Tensor> {
    let mut step = store.step_prepared(batch.clone())?;
    model.forward_on_device(padded, inputs, &mut step)
}

#[cfg(feature = "cuda")]
fn graph_err(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Internal { what: "cuda graph", message: format!("{what}: {e:?}") }
}

/// Records the step into a graph, replays it once and keeps it if it reproduces the eager
/// logits; otherwise the key stays eager.
#[cfg(feature = "cuda")]
fn capture(
    model: &mut Model,
    store: &mut PagedKvStore,
    padded: &[SeqChunk],
    buffers: &mut Buffers,
    batch: &AttnBatch,
) -> Result<Replay> {
    use candle_core::cuda_backend::cudarc::driver::sys;
    let Device::Cuda(dev) = model.device().clone() else { return Ok(Replay::Eager) };
    // Small host-to-device uploads inside candle's ops (shapes, strides) come from a cache the
    // eager run fills, so the capture records no host copy.
    let _cache = dev.enable_cuda_graph_htod_cache();
    let reference = eager(model, store, padded, &buffers.inputs, batch)?.to_dtype(DType::F32)?;
    if buffers.logits.is_none() {
        buffers.logits = Some(Tensor::zeros(reference.shape(), model.dtype(), model.device())?);
    }
    let out = buffers.logits.clone().expect("allocated above");
    let stream = dev.cuda_stream();
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_RELAXED)
        .map_err(|e| graph_err("begin capture", e))?;
    let recorded = eager(model, store, padded, &buffers.inputs, batch).and_then(|l| Ok(out.slice_set(&l, 0, 0)?));
    // Capture must end even when recording failed, or the stream stays unusable. A failed
    // recording may have left an error stored by a drop (a free on an invalidated capture),
    // which would make end_capture return before ending it: clear it first.
    let stored = stream.context().check_err();
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags::CUDA_GRAPH_INSTANTIATE_FLAG_AUTO_FREE_ON_LAUNCH);
    let capturing = stream.capture_status().map_err(|e| graph_err("capture status", e))?;
    if capturing != sys::CUstreamCaptureStatus::CU_STREAM_CAPTURE_STATUS_NONE {
        return Err(graph_err("the stream is still capturing after end_capture", capturing));
    }
    let size = padded.len();
    let graph = match (recorded, graph) {
        (Ok(()), Ok(Some(g))) => g,
        (recorded, graph) => {
            let graph = graph.err();
            tracing::warn!(
                batch = size,
                ?recorded,
                ?stored,
                ?graph,
                "CUDA graph capture failed; this bucket runs eagerly"
            );
            return Ok(Replay::Eager);
        }
    };
    graph.launch().map_err(|e| graph_err("launch", e))?;
    let replayed = out.to_dtype(DType::F32)?;
    let diff = (&replayed - &reference)?.abs()?.max_all()?.to_scalar::<f32>()?;
    let scale = reference.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
    if diff.is_finite() && diff <= 1e-3 * scale {
        tracing::info!(batch = size, context = batch.max_context, "decode step captured as a CUDA graph");
        Ok(Replay::Graph(graph))
    } else {
        tracing::warn!(batch = size, diff, "CUDA graph replay differs from the eager step; this bucket runs eagerly");
        Ok(Replay::Eager)
    }
}
