//! gRPC contracts of qwen-serve. `worker.proto`: the worker service the router calls;
//! `serve.proto`: the public API the router serves.

pub mod codec;

/// `qwen.worker.v1`: generation on one model replica.
pub mod worker {
    tonic::include_proto!("qwen.worker.v1");
}

/// `qwen.serve.v1`: the public API.
pub mod serve {
    tonic::include_proto!("qwen.serve.v1");
}

/// Encoded `FileDescriptorSet` of every service here, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("qwen_descriptor");
