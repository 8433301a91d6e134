//! What the router knows about each model it serves, learnt from a worker group's `Info`: the
//! tokenizer, the chat template, the context length and the eos ids.

use std::path::Path;
use std::sync::Arc;

use qwen_proto::worker::{InfoResponse, TokenizerKind};
use qwen_tokenizer::Tokenizer;

use crate::error::{Result, RouterError};
use crate::template::{ChatTemplate, CHATML};

pub struct ModelInfo {
    pub name: String,
    pub max_context: usize,
    pub vocab_size: usize,
    pub eos_token_ids: Vec<u32>,
    /// `None`: the checkpoint ships no tokenizer; only token-id prompts work.
    pub tokenizer: Option<Arc<Tokenizer>>,
    /// `None` when there is no tokenizer to encode a rendered chat with.
    pub chat_template: Option<ChatTemplate>,
    /// When this router learnt the model (Unix seconds): `created` in `/v1/models`.
    pub learned_at: u64,
    /// The tokenizer's longest token in bytes: text longer than `3 × max_context × this` cannot
    /// fit the context (NFC normalisation shrinks text at most threefold) and is refused
    /// without being tokenized.
    pub max_token_bytes: usize,
    /// The Info digest it was learnt from: other groups serving this name must report the same.
    pub digest: String,
    /// The reasoning and tool-call markup its answers are parsed for: what its chat template
    /// renders (ReAct for the original Qwen-Chat, which has none), unless flags say otherwise.
    pub formats: crate::agent::Formats,
}

/// A model's tokenizer and chat template from a local directory (`--tokenizer NAME=DIR`),
/// instead of what the workers send.
pub struct LocalTokenizer {
    /// Shared with the model's `ModelInfo`: loaded once, at start.
    pub tokenizer: Arc<Tokenizer>,
    pub chat_template: Option<String>,
}

impl LocalTokenizer {
    pub fn from_dir(dir: &Path) -> qwen_tokenizer::Result<Self> {
        Ok(LocalTokenizer {
            tokenizer: Arc::new(Tokenizer::from_dir(dir)?),
            chat_template: qwen_tokenizer::chat_template_from_dir(dir)?,
        })
    }
}

impl ModelInfo {
    /// From a worker's `Info`; `local` (loaded from `--tokenizer`) replaces its tokenizer and
    /// template.
    pub fn from_info(
        info: &InfoResponse,
        local: Option<&LocalTokenizer>,
        flags: crate::agent::FormatFlags,
    ) -> Result<Self> {
        let origin = Path::new("<worker Info>");
        let load = |r: qwen_tokenizer::Result<Tokenizer>| {
            r.map(|t| Some(Arc::new(t)))
                .map_err(|e| RouterError::Internal(format!("model `{}`: tokenizer: {e}", info.model_name)))
        };
        let (tokenizer, template) = match local {
            Some(l) => (Some(l.tokenizer.clone()), l.chat_template.clone().unwrap_or_default()),
            None => {
                let kind = TokenizerKind::try_from(info.tokenizer_kind).unwrap_or(TokenizerKind::Unspecified);
                let tokenizer = match kind {
                    TokenizerKind::HfJson => load(Tokenizer::from_hf_bytes(&info.tokenizer, origin))?,
                    TokenizerKind::QwenTiktoken => load(Tokenizer::from_tiktoken_bytes(&info.tokenizer, origin))?,
                    TokenizerKind::Unspecified => None,
                };
                (tokenizer, info.chat_template.clone())
            }
        };
        let chat_template = match (&tokenizer, template.is_empty()) {
            (None, _) => None,
            (Some(_), false) => Some(ChatTemplate::new(&template)?),
            // The original Qwen-Chat and other template-less checkpoints speak ChatML.
            (Some(_), true) => Some(ChatTemplate::new(CHATML)?),
        };
        let max_token_bytes = tokenizer.as_ref().map_or(1, |t| t.max_token_bytes().max(1));
        let formats = flags.apply(crate::agent::Formats::detect(&template));
        Ok(ModelInfo {
            max_token_bytes,
            digest: info.digest.clone(),
            formats,
            name: info.model_name.clone(),
            max_context: info.max_context as usize,
            vocab_size: info.vocab_size as usize,
            eos_token_ids: info.eos_token_ids.clone(),
            tokenizer,
            chat_template,
            learned_at: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
        })
    }

    pub fn tokenizer(&self, field: &str) -> Result<&Tokenizer> {
        self.tokenizer.as_deref().ok_or_else(|| {
            RouterError::invalid(field, format!("model `{}` has no tokenizer: send token ids", self.name))
        })
    }
}

/// A model with the `qwen2-gqa` fixture's tokenizer and `template` (tests).
#[cfg(test)]
pub(crate) fn fixture_chat_model(template: &str) -> (Arc<ModelInfo>, Arc<Tokenizer>) {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/models/qwen2-gqa");
    let tok = Arc::new(Tokenizer::from_dir(&dir).unwrap());
    let model = ModelInfo {
        name: "m".into(),
        max_context: 4096,
        vocab_size: tok.vocab_size(),
        eos_token_ids: vec![],
        tokenizer: Some(tok.clone()),
        chat_template: Some(ChatTemplate::new(template).unwrap()),
        formats: crate::agent::Formats::detect(template),
        learned_at: 0,
        max_token_bytes: tok.max_token_bytes(),
        digest: String::new(),
    };
    (Arc::new(model), tok)
}
