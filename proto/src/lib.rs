//! gRPC contracts of qwen-serve. `worker.proto`: the worker service the router calls;
//! `serve.proto`: the public API the router serves.

pub mod codec;

/// Limits both sides of the worker contract enforce: the router refuses a request beyond them
/// with the field's name, and the worker refuses it again should one arrive directly.
pub mod limits {
    /// Most alternatives a request may ask for per token (`top_logprobs`).
    pub const MAX_TOP_LOGPROBS: u32 = 20;
    /// Most `stop_token_ids` of one request (each sampled token is checked against them).
    pub const MAX_STOP_TOKEN_IDS: usize = 256;
    /// Longest `request_id`; it may hold only ASCII letters, digits and `-_.:`, so that it can
    /// be logged and echoed as it is.
    pub const MAX_REQUEST_ID_LEN: usize = 128;
    /// Largest grammar text of a `constraint` (a JSON schema, regex or Lark grammar), in bytes.
    /// Compilation is also bounded in work by the grammar engine's own limits.
    pub const MAX_CONSTRAINT_BYTES: usize = 128 * 1024;
    /// Most strings of a `choice` constraint.
    pub const MAX_CONSTRAINT_CHOICES: usize = 1024;

    /// Whether `id` is a `request_id` both sides accept.
    pub fn valid_request_id(id: &str) -> bool {
        !id.is_empty()
            && id.len() <= MAX_REQUEST_ID_LEN
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
    }
}

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
