//! What the worker tells routers about its model (the `Info` RPC): the tokenizer file as it is on
//! disk, the chat template and the limits, so a router needs no copy of the checkpoint.

use std::path::Path;

use qwen_proto::worker::{InfoResponse, TokenizerKind};

use crate::config::{GenerationConfig, ModelConfig};
use crate::error::{Error, Result};

pub struct InfoSource<'a> {
    pub dir: &'a Path,
    pub model_name: &'a str,
    pub config: &'a ModelConfig,
    pub generation: &'a GenerationConfig,
    pub tp: usize,
}

/// Reads the tokenizer and `tokenizer_config.json` (optional) of `src.dir`.
pub fn model_info(src: &InfoSource<'_>) -> Result<InfoResponse> {
    let read = |name: &str| {
        let path = src.dir.join(name);
        std::fs::read(&path).map_err(|e| Error::io(path, e))
    };
    let (tokenizer_kind, tokenizer) = if src.dir.join("tokenizer.json").exists() {
        (TokenizerKind::HfJson, read("tokenizer.json")?)
    } else if src.dir.join("qwen.tiktoken").exists() {
        (TokenizerKind::QwenTiktoken, read("qwen.tiktoken")?)
    } else {
        // Token ids still work without a tokenizer; the router refuses text for this model.
        (TokenizerKind::Unspecified, Vec::new())
    };
    let chat_template = qwen_tokenizer::chat_template_from_dir(src.dir)?.unwrap_or_default();
    let mut info = InfoResponse {
        model_name: src.model_name.to_string(),
        architecture: src.config.architecture.hf_name().to_string(),
        max_context: src.config.max_position_embeddings as u32,
        vocab_size: src.config.vocab_size as u32,
        eos_token_ids: src.generation.eos_token_ids.clone(),
        tokenizer_kind: tokenizer_kind as i32,
        tokenizer,
        chat_template,
        tp: src.tp as u32,
        digest: String::new(),
    };
    info.digest = digest(&info);
    Ok(info)
}

/// What a router learns from Info, hashed: the fields in order, each length-prefixed.
fn digest(info: &InfoResponse) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let mut field = |bytes: &[u8]| {
        h.update((bytes.len() as u64).to_le_bytes());
        h.update(bytes);
    };
    field(info.model_name.as_bytes());
    field(info.architecture.as_bytes());
    field(&info.max_context.to_le_bytes());
    field(&info.vocab_size.to_le_bytes());
    field(&info.eos_token_ids.iter().flat_map(|t| t.to_le_bytes()).collect::<Vec<u8>>());
    field(&info.tokenizer_kind.to_le_bytes());
    field(&info.tokenizer);
    field(info.chat_template.as_bytes());
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}
