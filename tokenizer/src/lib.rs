//! Qwen tokenizers: `tokenizer.json` (Qwen1.5 and later) through the `tokenizers` crate, and
//! `qwen.tiktoken` (the original Qwen). [`StreamDecoder`] turns generated ids into text pieces
//! that never split a UTF-8 character.

mod error;
pub mod tiktoken;

use std::path::Path;

pub use error::{Error, ErrorKind, Result};
pub use tiktoken::QwenTiktoken;

pub enum Tokenizer {
    Hf(Box<tokenizers::Tokenizer>),
    Tiktoken(Box<QwenTiktoken>),
}

impl Tokenizer {
    /// Loads `tokenizer.json`, else `qwen.tiktoken`, from a model directory.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let json = dir.join("tokenizer.json");
        if json.exists() {
            return Self::from_hf_file(&json);
        }
        let tiktoken = dir.join("qwen.tiktoken");
        if tiktoken.exists() {
            return Ok(Tokenizer::Tiktoken(Box::new(QwenTiktoken::from_file(&tiktoken)?)));
        }
        Err(Error::NoTokenizer { dir: dir.to_path_buf() })
    }

    /// A `tokenizer.json` held in memory (e.g. received from a worker); `origin` names it in errors.
    pub fn from_hf_bytes(bytes: &[u8], origin: &Path) -> Result<Self> {
        let tok = tokenizers::Tokenizer::from_bytes(bytes)
            .map_err(|e| Error::Malformed { path: origin.to_path_buf(), message: e.to_string() })?;
        Ok(Tokenizer::Hf(Box::new(tok)))
    }

    /// `qwen.tiktoken` ranks held in memory; `origin` names them in errors.
    pub fn from_tiktoken_bytes(bytes: &[u8], origin: &Path) -> Result<Self> {
        Ok(Tokenizer::Tiktoken(Box::new(QwenTiktoken::from_bytes(bytes, origin)?)))
    }

    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let tok = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Malformed { path: path.to_path_buf(), message: e.to_string() })?;
        Ok(Tokenizer::Hf(Box::new(tok)))
    }

    /// Encodes `text` without adding BOS/EOS (Qwen prompts have none). With `allow_special`
    /// false, special-token strings in the text are encoded as the plain text they are.
    pub fn encode(&self, text: &str, allow_special: bool) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Hf(t) if allow_special => Ok(t
                .encode(text, false)
                .map_err(|e| Error::InvalidInput { field: "text", message: e.to_string() })?
                .get_ids()
                .to_vec()),
            Tokenizer::Hf(t) => encode_without_added_tokens(t, text),
            Tokenizer::Tiktoken(t) => t.encode(text, allow_special),
        }
    }

    /// Decodes `ids` to text; bytes that do not form UTF-8 become U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Hf(t) => {
                self.check_ids(ids)?;
                t.decode(ids, false).map_err(|e| Error::InvalidInput { field: "token_ids", message: e.to_string() })
            }
            Tokenizer::Tiktoken(t) => Ok(String::from_utf8_lossy(&t.decode_bytes(ids)?).into_owned()),
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Hf(t) => t.get_vocab_size(true),
            Tokenizer::Tiktoken(t) => t.vocab_size(),
        }
    }

    /// An upper bound on the bytes one token stands for (the longest vocabulary entry; for
    /// byte-level vocabularies each stored character is one byte, at most its UTF-8 length).
    /// Walks the vocabulary: call once per tokenizer.
    pub fn max_token_bytes(&self) -> usize {
        match self {
            Tokenizer::Hf(t) => t.get_vocab(true).keys().map(String::len).max().unwrap_or(1),
            Tokenizer::Tiktoken(t) => t.max_token_bytes(),
        }
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        match self {
            Tokenizer::Hf(t) => t.token_to_id(token),
            Tokenizer::Tiktoken(t) => t.token_to_id(token),
        }
    }

    fn check_ids(&self, ids: &[u32]) -> Result<()> {
        let vocab = self.vocab_size();
        match ids.iter().find(|&&id| id as usize >= vocab) {
            Some(&token) => Err(Error::TokenOutOfRange { field: "token_ids", token, vocab }),
            None => Ok(()),
        }
    }

    pub fn stream_decoder(&self) -> StreamDecoder<'_> {
        StreamDecoder { tokenizer: self, ids: Vec::new(), prefix_offset: 0, read_offset: 0, pending: Vec::new() }
    }
}

/// Normaliser, pre-tokenizer and BPE model of `tokenizer.json` without its added-token
/// matching: what `tokenizers` would produce if the text contained no special tokens, so a
/// user's `<|im_start|>` is plain characters.
fn encode_without_added_tokens(t: &tokenizers::Tokenizer, text: &str) -> Result<Vec<u32>> {
    use tokenizers::{
        Model as _, Normalizer as _, OffsetReferential, OffsetType, PreTokenizedString, PreTokenizer as _,
    };
    let fail = |e: tokenizers::Error| Error::InvalidInput { field: "text", message: e.to_string() };
    let mut pre = PreTokenizedString::from(text);
    if let Some(n) = t.get_normalizer() {
        pre.normalize(|s| n.normalize(s)).map_err(fail)?;
    }
    if let Some(p) = t.get_pre_tokenizer() {
        p.pre_tokenize(&mut pre).map_err(fail)?;
    }
    pre.tokenize(|s| t.get_model().tokenize(s.get())).map_err(fail)?;
    Ok(pre
        .get_splits(OffsetReferential::Original, OffsetType::Byte)
        .into_iter()
        .flat_map(|(_, _, tokens)| tokens.iter().flatten().map(|tok| tok.id))
        .collect())
}

/// Incremental detokenization for streaming. Text is released only once it is complete UTF-8,
/// so a character split across tokens (common for CJK and emoji under byte-level BPE) arrives
/// whole in one piece.
pub struct StreamDecoder<'a> {
    tokenizer: &'a Tokenizer,
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
    /// Byte-level (tiktoken) path: bytes not yet released.
    pending: Vec<u8>,
}

impl StreamDecoder<'_> {
    /// Adds one token; returns the text it completes, if any. Ids past the tokenizer's
    /// vocabulary (checkpoints pad their embedding matrix beyond it, e.g. 151936 vs 151851 ids)
    /// can still be sampled from a model and decode to no text, as in `tokenizers`.
    pub fn step(&mut self, id: u32) -> Result<Option<String>> {
        if id as usize >= self.tokenizer.vocab_size() {
            return Ok(None);
        }
        match self.tokenizer {
            Tokenizer::Tiktoken(t) => {
                self.pending.extend(t.decode_bytes(&[id])?);
                Ok(take_complete_utf8(&mut self.pending))
            }
            Tokenizer::Hf(_) => {
                // Decoding a window with some earlier context keeps decoders that depend on
                // neighbours (byte fallback, leading-space rules) exact; the text is released
                // when it no longer ends in a replacement character.
                self.ids.push(id);
                let prefix = self.tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
                let full = self.tokenizer.decode(&self.ids[self.prefix_offset..])?;
                if full.len() > prefix.len() && !full.ends_with('\u{FFFD}') && full.is_char_boundary(prefix.len()) {
                    let piece = full[prefix.len()..].to_string();
                    self.prefix_offset = self.read_offset;
                    self.read_offset = self.ids.len();
                    Ok(Some(piece))
                } else {
                    Ok(None)
                }
            }
        }
    }

    /// Whatever is still held back at the end of generation (lossy if the model stopped inside a
    /// character).
    pub fn finish(&mut self) -> Result<Option<String>> {
        let rest = match self.tokenizer {
            Tokenizer::Tiktoken(_) => String::from_utf8_lossy(&std::mem::take(&mut self.pending)).into_owned(),
            Tokenizer::Hf(_) => {
                let prefix = self.tokenizer.decode(&self.ids[self.prefix_offset..self.read_offset])?;
                let full = self.tokenizer.decode(&self.ids[self.prefix_offset..])?;
                self.prefix_offset = self.ids.len();
                self.read_offset = self.ids.len();
                full.get(prefix.len()..).unwrap_or_default().to_string()
            }
        };
        Ok((!rest.is_empty()).then_some(rest))
    }
}

/// Removes and returns the longest valid UTF-8 prefix of `buf`, keeping an incomplete trailing
/// character for later. Invalid bytes (never completable) are released as U+FFFD.
fn take_complete_utf8(buf: &mut Vec<u8>) -> Option<String> {
    let mut out = String::new();
    loop {
        match std::str::from_utf8(buf) {
            Ok(s) => {
                out.push_str(s);
                buf.clear();
                break;
            }
            Err(e) => {
                let valid = e.valid_up_to();
                out.push_str(std::str::from_utf8(&buf[..valid]).expect("checked valid"));
                match e.error_len() {
                    // Incomplete character at the end: wait for more bytes.
                    None => {
                        buf.drain(..valid);
                        break;
                    }
                    Some(bad) => {
                        out.push('\u{FFFD}');
                        buf.drain(..valid + bad);
                    }
                }
            }
        }
    }
    (!out.is_empty()).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::take_complete_utf8;

    #[test]
    fn utf8_is_released_only_when_complete() {
        let bytes = "你😀".as_bytes();
        let mut buf = Vec::new();
        let mut out = String::new();
        for (i, b) in bytes.iter().enumerate() {
            buf.push(*b);
            if let Some(s) = take_complete_utf8(&mut buf) {
                assert!(i == 2 || i == 6, "released early at byte {i}");
                out.push_str(&s);
            }
        }
        assert_eq!(out, "你😀");
        let mut bad = vec![b'a', 0xff, b'b'];
        assert_eq!(take_complete_utf8(&mut bad).as_deref(), Some("a\u{FFFD}b"));
    }
}

/// The `chat_template` of a model directory's `tokenizer_config.json`: a string, or (some
/// checkpoints) a list of named templates of which `default` serves plain chat. `None` when the
/// file or the field is absent.
pub fn chat_template_from_dir(dir: &Path) -> Result<Option<String>> {
    let path = dir.join("tokenizer_config.json");
    if !path.exists() {
        return Ok(None);
    }
    let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
    let bad = |message: String| Error::Malformed { path: path.clone(), message };
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("invalid JSON: {e}")))?;
    match value.get("chat_template") {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
        Some(serde_json::Value::Array(list)) => Ok(list
            .iter()
            .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
            .and_then(|t| t.get("template")?.as_str())
            .map(str::to_string)),
        Some(_) => Err(bad("field `chat_template`: must be a string or a list of named templates".into())),
    }
}

#[cfg(test)]
mod chat_template_tests {
    use super::*;

    #[test]
    fn chat_template_forms() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(chat_template_from_dir(dir.path()).unwrap(), None);
        let write = |v: serde_json::Value| {
            std::fs::write(dir.path().join("tokenizer_config.json"), v.to_string()).unwrap();
        };
        write(serde_json::json!({"chat_template": "{{ x }}"}));
        assert_eq!(chat_template_from_dir(dir.path()).unwrap().as_deref(), Some("{{ x }}"));
        write(
            serde_json::json!({"chat_template": [{"name": "tool_use", "template": "t"}, {"name": "default", "template": "d"}]}),
        );
        assert_eq!(chat_template_from_dir(dir.path()).unwrap().as_deref(), Some("d"));
        write(serde_json::json!({"model_max_length": 8}));
        assert_eq!(chat_template_from_dir(dir.path()).unwrap(), None);
        write(serde_json::json!({"chat_template": 3}));
        let err = chat_template_from_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains("chat_template") && err.contains("tokenizer_config.json"), "{err}");
    }
}
