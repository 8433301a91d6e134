//! The original Qwen tokenizer: byte-level BPE over the base64 ranks of `qwen.tiktoken`, with
//! Qwen's pre-tokenization pattern (digits split one by one) and 208 special tokens after the
//! ranks. Encoding runs on tiktoken-rs's `CoreBPE`.

use std::collections::HashSet;
use std::path::Path;

use base64::Engine;
use rustc_hash::FxHashMap;
use tiktoken_rs::CoreBPE;

use crate::error::{Error, Result};

/// Qwen's pre-tokenization pattern (from its `tokenization_qwen.py`).
pub const PATTERN: &str =
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Special tokens in id order, starting right after the last rank (151643 for `qwen.tiktoken`).
pub fn special_tokens() -> Vec<String> {
    let mut specials = vec!["<|endoftext|>".to_string(), "<|im_start|>".to_string(), "<|im_end|>".to_string()];
    specials.extend((0..205).map(|i| format!("<|extra_{i}|>")));
    specials
}

pub struct QwenTiktoken {
    bpe: CoreBPE,
    specials: FxHashMap<String, u32>,
    vocab_size: usize,
    max_token_bytes: usize,
}

impl QwenTiktoken {
    pub fn from_file(path: &Path) -> Result<Self> {
        let data = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        Self::from_bytes(&data, path)
    }

    /// Parses the ranks in `data`; `origin` names them in errors (a file, or where they came from).
    pub fn from_bytes(data: &[u8], origin: &Path) -> Result<Self> {
        let path = origin;
        let bad = |line: usize, message: String| Error::Malformed {
            path: path.to_path_buf(),
            message: format!("line {line}: {message}"),
        };
        let mut ranks: FxHashMap<Vec<u8>, u32> = FxHashMap::default();
        for (i, line) in data.split(|&b| b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let line_no = i + 1;
            let text = std::str::from_utf8(line).map_err(|_| bad(line_no, "not UTF-8".into()))?;
            let (token, rank) =
                text.split_once(' ').ok_or_else(|| bad(line_no, "expected `<base64 token> <rank>`".into()))?;
            let token = base64::engine::general_purpose::STANDARD
                .decode(token)
                .map_err(|e| bad(line_no, format!("bad base64 token: {e}")))?;
            let rank: u32 = rank.trim().parse().map_err(|_| bad(line_no, format!("bad rank {rank:?}")))?;
            if ranks.insert(token, rank).is_some() {
                return Err(bad(line_no, "duplicate token".into()));
            }
        }
        let n = ranks.len();
        if n == 0 {
            return Err(bad(1, "no ranks".into()));
        }
        // Byte-level BPE needs every single byte as a token; tiktoken-rs indexes them unchecked.
        if let Some(b) = (0..=255u8).find(|b| !ranks.contains_key(&[*b][..])) {
            return Err(bad(0, format!("no rank for the single byte 0x{b:02x}; byte-level BPE needs all 256")));
        }
        let mut seen = vec![false; n];
        for &r in ranks.values() {
            match seen.get_mut(r as usize) {
                Some(s) if !*s => *s = true,
                _ => return Err(bad(0, format!("ranks must be exactly 0..{n} without repeats; found rank {r}"))),
            }
        }
        let specials: FxHashMap<String, u32> =
            special_tokens().into_iter().enumerate().map(|(i, s)| (s, (n + i) as u32)).collect();
        let vocab_size = n + specials.len();
        let max_token_bytes = ranks.keys().map(Vec::len).chain(specials.keys().map(String::len)).max().unwrap_or(1);
        let bpe = CoreBPE::new(ranks, specials.clone(), PATTERN)
            .map_err(|e| Error::Malformed { path: path.to_path_buf(), message: e.to_string() })?;
        Ok(QwenTiktoken { bpe, specials, vocab_size, max_token_bytes })
    }

    /// Encodes `text` after NFC normalisation (as Qwen's `tokenization_qwen.py` does);
    /// special-token strings in it are plain text unless `allow_special`.
    pub fn encode(&self, text: &str, allow_special: bool) -> Result<Vec<u32>> {
        use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};
        let normalized: String;
        let text = if is_nfc_quick(text.chars()) == IsNormalized::Yes {
            text
        } else {
            normalized = text.nfc().collect();
            &normalized
        };
        let none = HashSet::new();
        let all: HashSet<&str>;
        let allowed = if allow_special {
            all = self.specials.keys().map(String::as_str).collect();
            &all
        } else {
            &none
        };
        let (ids, _) =
            self.bpe.encode(text, allowed).map_err(|e| Error::InvalidInput { field: "text", message: e.message })?;
        Ok(ids)
    }

    /// The bytes of `ids`; may end inside a UTF-8 character.
    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>> {
        self.bpe.decode_bytes(ids).map_err(|e| Error::TokenOutOfRange {
            field: "token_ids",
            token: e.token,
            vocab: self.vocab_size,
        })
    }

    /// Every token's bytes in id order, special tokens as `0xFF` followed by their name (the
    /// marker grammar engines use to keep them apart from text).
    pub fn token_bytes(&self) -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = (0..self.vocab_size - self.specials.len())
            .map(|id| self.bpe.decode_bytes(&[id as u32]).unwrap_or_default())
            .collect();
        out.resize(self.vocab_size, Vec::new());
        for (name, &id) in &self.specials {
            out[id as usize] = [&[0xFF], name.as_bytes()].concat();
        }
        out
    }

    /// Bytes of the longest token.
    pub fn max_token_bytes(&self) -> usize {
        self.max_token_bytes
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.specials.get(token).copied()
    }
}
