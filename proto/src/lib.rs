//! gRPC contracts of qwen-serve. `worker.proto`: the worker service the router calls.

pub mod codec;

/// `qwen.worker.v1`: generation on one model replica.
pub mod worker {
    tonic::include_proto!("qwen.worker.v1");
}
