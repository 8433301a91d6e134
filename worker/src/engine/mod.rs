//! The serving engine: paged KV blocks, the prefix cache, the continuous-batching scheduler and
//! the loop that runs them on the model thread.

pub mod blocks;
pub mod follower;
pub mod graphs;
pub mod plan;
pub mod prefix_cache;
pub mod runner;
pub mod scheduler;
pub mod sequence;
