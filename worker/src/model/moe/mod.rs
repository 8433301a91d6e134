//! The mixture-of-experts MLP of Qwen2-MoE and Qwen3-MoE: a router picks `top_k` of
//! `num_experts` gated-SiLU experts per token (softmax in f32, optionally renormalised), the
//! chosen experts' outputs are summed with their routing weights, and Qwen2-MoE adds a shared
//! expert scaled by `sigmoid(shared_expert_gate(x))`.
//!
//! Each layer's experts are stacked (`[local, 2 ff, hidden]` and `[local, hidden, ff]`) and
//! computed one of two ways, the same for prefill and decode, never looping over tokens:
//! - fused ([`KernelMode::Fused`], up to [`FUSED_MAX_ASSIGNMENTS`] token copies): routing stays
//!   on the device and one op groups the copies by expert, runs grouped GEMMs with SiLU·mul and
//!   sums each token's slots (`kernels::moe_experts`); nothing waits for the host;
//! - grouped: the routing ids come to the host (`[T, top_k]`, small), a counting sort orders the
//!   token copies by expert, one `index_select` gathers them, each active expert runs one GEMM
//!   pair (views of the stacked weights) over its contiguous rows, and one weighted `index_add`
//!   scatters the results back. Large prefills take it on every device: per-expert GEMMs use the
//!   tensor cores, and one host round trip is small next to them.
//!
//! Two ways to split experts over a group, both ending in the stack's one all-reduce per layer:
//! - [`ExpertSplit::Sliced`] (tensor parallel): every rank holds a slice of every expert's
//!   hidden dimension and computes a partial sum for every routed token;
//! - [`ExpertSplit::Whole`] (expert parallel): each rank holds whole experts (blocks as even as
//!   the count allows) and computes only the tokens routed to them; the all-reduce sums the
//!   ranks' disjoint contributions. The router and, sliced, the shared expert stay on every rank.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Tensor};

use super::layers::{Linear, Mlp};
use super::parallel::{column, row, Shard};
use crate::config::{ModelConfig, MoeConfig};
use crate::error::{Error, Result};
use crate::kernels::KernelMode;
use crate::kernels::StackedExperts;
use crate::weights::Weights;

/// How a group splits the routed experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ExpertSplit {
    /// Tensor parallel: a slice of every expert on every rank.
    #[default]
    Sliced,
    /// Expert parallel: whole experts per rank.
    Whole,
}

/// Token copies (tokens x top_k) up to which [`KernelMode::Fused`] runs the fused op; larger
/// batches (long prefills) take the grouped path's per-expert GEMMs.
pub const FUSED_MAX_ASSIGNMENTS: usize = 1024;

/// Whether a batch of `tokens` runs every MoE layer of `cfg` through the fused op in
/// [`KernelMode::Fused`] (true for dense models): then nothing in its forward waits for the
/// host, and a CUDA graph can capture it.
pub fn fused_covers(cfg: &ModelConfig, tokens: usize) -> bool {
    cfg.moe
        .as_ref()
        .is_none_or(|m| tokens * m.top_k <= FUSED_MAX_ASSIGNMENTS && m.num_experts <= crate::kernels::MAX_FUSED_EXPERTS)
}

/// Tokens routed to each expert since start, summed over layers (each token counts once per
/// layer and chosen expert). The grouped path adds on the host once per layer; the fused path
/// counts on the device (`device_counts`), which [`ExpertLoad::collect`] folds in between steps. Read
/// by metrics and `Stats`.
#[derive(Debug)]
pub struct ExpertLoad {
    tokens: Vec<AtomicU64>,
    /// The fused path's counter on the model's device: u32 `[num_experts]`, wrapping.
    device_counts: Tensor,
    /// `device_counts` when last collected: the difference is what is new.
    seen: Mutex<Vec<u32>>,
}

impl ExpertLoad {
    pub fn new(num_experts: usize, device: &candle_core::Device) -> Result<Arc<Self>> {
        Ok(Arc::new(ExpertLoad {
            tokens: (0..num_experts).map(|_| AtomicU64::new(0)).collect(),
            device_counts: Tensor::zeros(num_experts, DType::U32, device)?,
            seen: Mutex::new(vec![0; num_experts]),
        }))
    }

    pub fn snapshot(&self) -> Vec<u64> {
        self.tokens.iter().map(|c| c.load(Ordering::Relaxed)).collect()
    }

    /// Folds the device counter into the totals: one copy of `num_experts` u32 to the host. Call
    /// it on the thread that runs the forwards, between steps.
    pub fn collect(&self) -> Result<()> {
        let now: Vec<u32> = self.device_counts.to_vec1()?;
        let mut seen = self
            .seen
            .lock()
            .map_err(|_| Error::Internal { what: "expert load", message: "a collect panicked".into() })?;
        // Wrapping: a u32 counter turns over every 4 billion copies; one interval stays far below.
        let new: Vec<u32> = now.iter().zip(seen.iter()).map(|(n, s)| n.wrapping_sub(*s)).collect();
        *seen = now;
        self.add(&new);
        Ok(())
    }

    fn add(&self, counts: &[u32]) {
        for (c, &n) in self.tokens.iter().zip(counts) {
            if n > 0 {
                c.fetch_add(u64::from(n), Ordering::Relaxed);
            }
        }
    }
}

/// The experts a rank owns under `split`: all of them when sliced, else a block of
/// `num_experts / world` (the first `num_experts % world` ranks one more).
pub fn owned_experts(num_experts: usize, shard: Shard, split: ExpertSplit) -> Range<usize> {
    match split {
        ExpertSplit::Sliced => 0..num_experts,
        ExpertSplit::Whole => {
            let (per, extra) = (num_experts / shard.world, num_experts % shard.world);
            let start = shard.rank * per + shard.rank.min(extra);
            start..start + per + usize::from(shard.rank < extra)
        }
    }
}

/// Checks that `shard.world` ranks can split the experts as `split` asks, naming the field.
pub fn check(cfg: &ModelConfig, shard: Shard, split: ExpertSplit) -> Result<()> {
    let Some(moe) = &cfg.moe else {
        return match split {
            ExpertSplit::Sliced => Ok(()),
            ExpertSplit::Whole => {
                Err(Error::InvalidInput { field: "expert_parallel", message: "the model has no experts".into() })
            }
        };
    };
    let tp = shard.world;
    let refuse = |field: &'static str, message: String| Err(Error::InvalidInput { field, message });
    if split == ExpertSplit::Sliced && moe.expert_hidden % tp != 0 {
        return refuse(
            "tp",
            format!(
                "tensor-parallel size {tp} does not divide moe_intermediate_size = {} (try --expert-parallel)",
                moe.expert_hidden
            ),
        );
    }
    if split == ExpertSplit::Whole && moe.num_experts < tp {
        return refuse(
            "expert_parallel",
            format!("{tp} ranks cannot each hold whole experts of num_experts = {}", moe.num_experts),
        );
    }
    if let Some(shared) = moe.shared_expert_hidden.filter(|s| s % tp != 0) {
        return refuse(
            "tp",
            format!("tensor-parallel size {tp} does not divide shared_expert_intermediate_size = {shared}"),
        );
    }
    Ok(())
}

/// What a stack's MoE layers share: how experts split, and the load counters.
#[derive(Debug, Clone)]
pub struct ExpertPlan {
    pub split: ExpertSplit,
    pub load: Arc<ExpertLoad>,
}

struct SharedExpert {
    mlp: Mlp,
    /// `[1, hidden]`: the shared expert's scale is `sigmoid(gate(x))` per token.
    gate: Linear,
}

/// The routed experts a rank holds, stacked for the fused op; the grouped path computes through
/// per-expert views of the same storage. Quantized experts are not stacked (no fused op for
/// them): the grouped path runs them one by one.
struct Experts {
    /// `[local, 2 ff, hidden]` (each expert's gate rows, then its up rows) and
    /// `[local, hidden, ff]`.
    stacked: Option<(Tensor, Tensor)>,
    /// Expert id of local expert 0.
    first: usize,
    /// By local index.
    views: Vec<Mlp>,
}

impl Experts {
    /// Local expert `e` (a global id), if this rank holds it.
    fn get(&self, e: usize) -> Option<&Mlp> {
        e.checked_sub(self.first).and_then(|i| self.views.get(i))
    }
}

/// One sparse MLP layer.
pub struct SparseMoe {
    /// `[num_experts, hidden]`, on every rank.
    router: Linear,
    num_experts: usize,
    top_k: usize,
    norm_topk_prob: bool,
    experts: Experts,
    shared: Option<SharedExpert>,
    load: Arc<ExpertLoad>,
    /// Only rank 0 counts (every rank routes the same way).
    counts: bool,
    /// The fused path's device counter (rank 0).
    device_counts: Option<Tensor>,
}

/// A gated-SiLU MLP `{prefix}.{gate,up,down}_proj` of width `ff`, sliced per `shard`.
fn mlp(w: &Weights, prefix: &str, hidden: usize, ff: usize, shard: Shard) -> Result<Mlp> {
    let part = [shard.split(ff)];
    Ok(Mlp {
        gate_up: Linear::concat(vec![
            column(w, &format!("{prefix}.gate_proj"), hidden, ff, &part, false)?,
            column(w, &format!("{prefix}.up_proj"), hidden, ff, &part, false)?,
        ])?,
        ff: part[0].len(),
        down: row(w, &format!("{prefix}.down_proj"), ff, hidden, part[0].clone(), false, shard)?,
    })
}

impl SparseMoe {
    /// Loads layer `prefix`'s experts (`{prefix}.mlp.*`), reading only what this rank owns.
    pub fn load(
        w: &Weights,
        cfg: &ModelConfig,
        moe: &MoeConfig,
        prefix: &str,
        shard: Shard,
        plan: &ExpertPlan,
    ) -> Result<Self> {
        let h = cfg.hidden_size;
        let router = Linear::load(w, &format!("{prefix}.mlp.gate"), h, moe.num_experts, false)?;
        let owned = owned_experts(moe.num_experts, shard, plan.split);
        // Whole experts are not sliced: each is computed by the one rank that holds it.
        let expert_shard = match plan.split {
            ExpertSplit::Sliced => shard,
            ExpertSplit::Whole => Shard::SINGLE,
        };
        let mlps = owned
            .clone()
            .map(|e| mlp(w, &format!("{prefix}.mlp.experts.{e}"), h, moe.expert_hidden, expert_shard))
            .collect::<Result<Vec<_>>>()?;
        let experts = stack(mlps, owned.start)?;
        let shared = match moe.shared_expert_hidden {
            Some(ff) => Some(SharedExpert {
                mlp: mlp(w, &format!("{prefix}.mlp.shared_expert"), h, ff, shard)?,
                gate: Linear::load(w, &format!("{prefix}.mlp.shared_expert_gate"), h, 1, false)?,
            }),
            None => None,
        };
        let counts = shard.rank == 0;
        Ok(SparseMoe {
            router,
            num_experts: moe.num_experts,
            top_k: moe.top_k,
            norm_topk_prob: moe.norm_topk_prob,
            experts,
            shared,
            load: plan.load.clone(),
            counts,
            device_counts: counts.then(|| plan.load.device_counts.clone()),
        })
    }

    /// `x`: `[T, hidden]` → this rank's part of the layer's output `[T, hidden]`.
    pub fn forward(&self, x: &Tensor, mode: KernelMode) -> Result<Tensor> {
        let (t, h) = x.dims2()?;
        let (ids, weights) = self.route(x)?;
        let fits = t * self.top_k <= FUSED_MAX_ASSIGNMENTS && self.num_experts <= crate::kernels::MAX_FUSED_EXPERTS;
        let mut out = if let Some((gate_up, down)) =
            self.experts.stacked.as_ref().filter(|_| mode == KernelMode::Fused && fits)
        {
            if let Some(counts) = &self.device_counts {
                crate::kernels::count_experts(counts, &ids)?;
            }
            let stacked = StackedExperts { gate_up, down, first: self.experts.first };
            crate::kernels::moe_experts(x, &ids, &weights, &stacked)?
        } else {
            let routes = Routes { ids: ids.flatten_all()?.to_vec1()?, weights: weights.flatten_all()?.to_vec1()? };
            match self.experts_forward(x, &routes, mode)? {
                Some(out) => out,
                None => Tensor::zeros((t, h), x.dtype(), x.device())?,
            }
        };
        if let Some(shared) = &self.shared {
            let scale = candle_nn::ops::sigmoid(&shared.gate.forward(x)?)?;
            out = (out + shared.mlp.forward(x, mode)?.broadcast_mul(&scale)?)?;
        }
        Ok(out)
    }

    /// Each token's experts (u32) and routing weights (f32), `[T, top_k]` on the device.
    fn route(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let logits = self.router.forward(x)?.to_dtype(DType::F32)?;
        let probs = candle_nn::ops::softmax_last_dim(&logits)?;
        let ids = probs.arg_sort_last_dim(false)?.narrow(1, 0, self.top_k)?.contiguous()?;
        let mut weights = probs.gather(&ids, 1)?;
        if self.norm_topk_prob {
            weights = weights.broadcast_div(&weights.sum_keepdim(1)?)?;
        }
        Ok((ids, weights.contiguous()?))
    }

    /// The routed experts' weighted sum for every token (the experts this rank holds); `None`
    /// when no token reached them.
    fn experts_forward(&self, x: &Tensor, routes: &Routes, mode: KernelMode) -> Result<Option<Tensor>> {
        let (t, h) = x.dims2()?;
        let groups = group_by_expert(&routes.ids, self.top_k, self.num_experts)?;
        if self.counts {
            self.load.add(&groups.counts);
        }
        // This rank's experts, in expert order, and their rows of the sorted assignment list.
        let mut tokens = Vec::new();
        let mut weights = Vec::new();
        let mut active = Vec::new();
        for e in 0..self.num_experts {
            let (Some(expert), n) = (self.experts.get(e), groups.counts[e] as usize) else { continue };
            if n == 0 {
                continue;
            }
            let rows = groups.offsets[e]..groups.offsets[e] + n;
            tokens.extend(rows.clone().map(|r| groups.tokens[r]));
            weights.extend(rows.map(|r| routes.weights[groups.assignment[r]]));
            active.push((expert, n));
        }
        if tokens.is_empty() {
            return Ok(None);
        }
        let n = tokens.len();
        let index = Tensor::from_vec(tokens, n, x.device())?;
        let gathered = x.index_select(&index, 0)?;
        let mut outputs = Vec::with_capacity(active.len());
        let mut start = 0;
        for (expert, len) in active {
            outputs.push(expert.forward(&gathered.narrow(0, start, len)?, mode)?);
            start += len;
        }
        let weights = Tensor::from_vec(weights, (n, 1), x.device())?.to_dtype(x.dtype())?;
        let weighted = Tensor::cat(&outputs, 0)?.broadcast_mul(&weights)?;
        Ok(Some(Tensor::zeros((t, h), x.dtype(), x.device())?.index_add(&index, &weighted, 0)?))
    }
}

/// Stacks a rank's experts (`first` is the id of `mlps[0]`) and rebuilds each as a view of the
/// stacks, so the per-expert copies are freed.
fn stack(mlps: Vec<Mlp>, first: usize) -> Result<Experts> {
    let ff = mlps.first().map_or(0, |m| m.ff);
    let dense = |get: fn(&Mlp) -> Option<&Tensor>| mlps.iter().map(get).collect::<Option<Vec<_>>>();
    let (Some(gate_ups), Some(downs)) = (dense(|m| m.gate_up.dense_weight()), dense(|m| m.down.dense_weight())) else {
        return Ok(Experts { stacked: None, first, views: mlps });
    };
    let (gate_up, down) = (Tensor::stack(&gate_ups, 0)?, Tensor::stack(&downs, 0)?);
    let views = (0..mlps.len())
        .map(|i| Ok(Mlp { gate_up: Linear::new(gate_up.get(i)?, None), ff, down: Linear::new(down.get(i)?, None) }))
        .collect::<Result<Vec<_>>>()?;
    Ok(Experts { stacked: Some((gate_up, down)), first, views })
}

/// Routing decisions on the host.
struct Routes {
    /// Expert of each (token, slot), token-major.
    ids: Vec<u32>,
    /// Routing weight of each (token, slot).
    weights: Vec<f32>,
}

/// Assignments ordered by expert (stable: token order within an expert).
struct Groups {
    counts: Vec<u32>,
    /// Start of each expert's rows.
    offsets: Vec<usize>,
    /// Token of each sorted row.
    tokens: Vec<u32>,
    /// Index into the token-major routes of each sorted row.
    assignment: Vec<usize>,
}

/// Counting sort of `(token, slot)` assignments by expert.
fn group_by_expert(ids: &[u32], top_k: usize, num_experts: usize) -> Result<Groups> {
    let mut counts = vec![0u32; num_experts];
    for &e in ids {
        let slot = counts.get_mut(e as usize).ok_or_else(|| Error::Internal {
            what: "moe routing",
            message: format!("expert id {e} of {num_experts}"),
        })?;
        *slot += 1;
    }
    let mut offsets = Vec::with_capacity(num_experts);
    let mut next = 0usize;
    for &c in &counts {
        offsets.push(next);
        next += c as usize;
    }
    let mut fill = offsets.clone();
    let (mut tokens, mut assignment) = (vec![0u32; ids.len()], vec![0usize; ids.len()]);
    for (a, &e) in ids.iter().enumerate() {
        let row = fill[e as usize];
        fill[e as usize] += 1;
        tokens[row] = (a / top_k) as u32;
        assignment[row] = a;
    }
    Ok(Groups { counts, offsets, tokens, assignment })
}

#[cfg(test)]
mod tests;
