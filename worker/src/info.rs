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
    Ok(InfoResponse {
        model_name: src.model_name.to_string(),
        architecture: src.config.architecture.hf_name().to_string(),
        max_context: src.config.max_position_embeddings as u32,
        vocab_size: src.config.vocab_size as u32,
        eos_token_ids: src.generation.eos_token_ids.clone(),
        tokenizer_kind: tokenizer_kind as i32,
        tokenizer,
        chat_template,
        tp: src.tp as u32,
    })
}
