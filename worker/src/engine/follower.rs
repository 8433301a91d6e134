//! Ranks other than 0 of a tensor-parallel group: no scheduler, no sampling, no network service.
//! Each step they receive rank 0's plan and run the same forward on their shard of the model
//! and of the KV cache, which keeps every collective inside the forward matched.

use candle_core::Device;

use super::plan::Message;
use crate::error::Result;
use crate::model::paged::{KvLayout, PagedKvStore};
use crate::model::Model;

/// Serves rank 0's plans until it says stop; an error (a dead or silent rank 0 surfaces as a
/// collective timeout) ends the follower.
pub fn run(mut model: Model, block_size: usize, num_blocks: usize, device: &Device) -> Result<()> {
    let layout = KvLayout::for_model(&model, block_size);
    let mut store = PagedKvStore::new(layout, num_blocks, device)?;
    store.set_kernels(model.kernels());
    loop {
        let bytes = model.comm().broadcast_bytes(0, Vec::new())?;
        match Message::decode(&bytes)? {
            Message::Stop => return Ok(()),
            Message::Heartbeat => {}
            Message::Step(plan) => {
                let mut step = store.step(&plan.chunks, &plan.tables)?;
                model.forward(&plan.tokens, &plan.chunks, &mut step)?;
            }
        }
    }
}
