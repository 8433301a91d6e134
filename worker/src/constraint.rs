//! Structured outputs: a request's grammar (JSON schema, regex, choice, Lark), compiled by
//! llguidance against the model's vocabulary into a matcher that says, before each sampled
//! token, which tokens keep the output inside the grammar. The engine computes those masks while
//! the forward runs and applies them to the logits before sampling.

use std::sync::Arc;

use candle_core::Tensor;
use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{ApproximateTokEnv, SimpleVob, TokEnv, TokRxInfo, TokTrie};
use llguidance::{Matcher, ParserFactory};
use qwen_proto::limits::{MAX_CONSTRAINT_BYTES, MAX_CONSTRAINT_CHOICES};
use qwen_proto::worker::{constraint::Kind, Constraint};
use qwen_tokenizer::Tokenizer;

use crate::error::{Error, Result};

fn invalid(message: impl Into<String>) -> Error {
    Error::InvalidInput { field: "constraint", message: message.into() }
}

/// Compiles grammars for one model: the vocabulary's token trie and the grammar engine's shared
/// state, built once at start (a few hundred milliseconds for Qwen's 152k tokens).
pub struct GrammarCompiler {
    factory: ParserFactory,
}

impl GrammarCompiler {
    /// For a model whose logits rows have `vocab_size` entries (ids past the tokenizer's are never
    /// allowed) and whose end-of-sequence ids are `eos` (allowed once the grammar is complete).
    pub fn new(tokenizer: &Tokenizer, vocab_size: usize, eos: &[u32]) -> Result<Self> {
        let load = |message: String| Error::GrammarSetup(message);
        let mut words = match tokenizer {
            Tokenizer::Hf(t) => {
                let json = t.to_string(false).map_err(|e| load(e.to_string()))?;
                let value: serde_json::Value = serde_json::from_str(&json).map_err(|e| load(e.to_string()))?;
                llguidance::token_bytes_from_tokenizer_json(&value).map_err(|e| load(e.to_string()))?
            }
            Tokenizer::Tiktoken(t) => t.token_bytes(),
        };
        if words.len() > vocab_size {
            return Err(load(format!("the tokenizer has {} tokens, the model only {vocab_size}", words.len())));
        }
        words.resize(vocab_size, Vec::new());
        let first_eos = *eos.first().ok_or_else(|| load("the model has no eos token id".into()))?;
        if let Some(bad) = eos.iter().find(|&&e| e as usize >= vocab_size) {
            return Err(load(format!("eos token id {bad} is outside the vocabulary")));
        }
        let info = TokRxInfo::new(vocab_size as u32, first_eos);
        let trie = TokTrie::from(&info, &words).with_eos_tokens(eos);
        let env: TokEnv = Arc::new(ApproximateTokEnv::new(trie));
        let mut factory = ParserFactory::new_simple(&env).map_err(|e| load(e.to_string()))?;
        factory.quiet();
        // Errors go back to the client: no parser state or grammar dump in them.
        factory.limits_mut().verbose_errors = false;
        Ok(GrammarCompiler { factory })
    }

    /// Compiles `c`; a grammar that is too large, malformed or unsatisfiable is an
    /// [`Error::InvalidInput`] naming `constraint`. Bounded by the engine's limits, but may take
    /// milliseconds: call it off the async threads.
    pub fn compile(&self, c: &Constraint) -> Result<TokenConstraint> {
        let grammar = grammar(c)?;
        let parser = self.factory.create_parser(grammar).map_err(|e| invalid(cut(&e.to_string())))?;
        let mut matcher = Matcher::new(Ok(parser));
        // Some grammar errors only show when the first mask is computed.
        let first = matcher.compute_mask().map_err(|e| invalid(cut(&e.to_string())))?;
        if first.is_zero() {
            return Err(invalid("the grammar matches no output"));
        }
        Ok(TokenConstraint { matcher, first: Some(first) })
    }
}

/// The grammar a constraint asks for. JSON is compact (`{"a":1}`): with free whitespace a model
/// may pad forever, and Qwen writes compact JSON anyway. A schema's own `x-guidance` options win.
fn grammar(c: &Constraint) -> Result<TopLevelGrammar> {
    let size = match &c.kind {
        Some(Kind::JsonSchema(s) | Kind::Regex(s) | Kind::Lark(s)) => s.len(),
        Some(Kind::Choice(ch)) => {
            if ch.choices.is_empty() || ch.choices.len() > MAX_CONSTRAINT_CHOICES {
                return Err(invalid(format!("choice: 1 to {MAX_CONSTRAINT_CHOICES} strings")));
            }
            ch.choices.iter().map(String::len).sum()
        }
        Some(Kind::JsonObject(_)) => 0,
        None => return Err(invalid("no grammar given")),
    };
    if size > MAX_CONSTRAINT_BYTES {
        return Err(invalid(format!("{size} bytes of grammar; at most {MAX_CONSTRAINT_BYTES}")));
    }
    let compact = serde_json::json!({"whitespace_flexible": false});
    Ok(match c.kind.as_ref().expect("checked above") {
        Kind::JsonSchema(text) => {
            let mut schema: serde_json::Value =
                serde_json::from_str(text).map_err(|e| invalid(format!("json_schema is not JSON: {e}")))?;
            // `true` / `false` are schemas too; they stay as they are.
            if !schema.is_boolean() {
                let obj = schema.as_object_mut().ok_or_else(|| invalid("json_schema must be a JSON object"))?;
                obj.entry("x-guidance").or_insert(compact);
            }
            TopLevelGrammar::from_json_schema(schema)
        }
        Kind::JsonObject(_) => {
            TopLevelGrammar::from_json_schema(serde_json::json!({"type": "object", "x-guidance": compact}))
        }
        Kind::Regex(rx) => TopLevelGrammar::from_regex(rx),
        Kind::Choice(ch) => {
            // Each choice as a Lark string literal (JSON escaping is Lark's).
            let alts: Vec<String> =
                ch.choices.iter().map(|s| serde_json::Value::from(s.as_str()).to_string()).collect();
            TopLevelGrammar::from_lark(format!("start: {}", alts.join(" | ")))
        }
        Kind::Lark(text) => TopLevelGrammar::from_lark(text.clone()),
    })
}

/// Error text from the grammar engine, bounded (it may quote the grammar).
fn cut(s: &str) -> String {
    const MAX: usize = 500;
    match s.char_indices().nth(MAX) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_string(),
    }
}

/// One request's grammar state.
pub struct TokenConstraint {
    matcher: Matcher,
    /// The mask compiling already computed, used for the first token.
    first: Option<SimpleVob>,
}

impl TokenConstraint {
    /// The tokens that may come next; an error when the grammar admits none.
    pub fn allowed(&mut self) -> Result<SimpleVob> {
        let mask = match self.first.take() {
            Some(m) => m,
            None => self.matcher.compute_mask().map_err(|e| Error::Grammar(cut(&e.to_string())))?,
        };
        if mask.is_zero() {
            return Err(Error::Grammar("the grammar allows no further token".into()));
        }
        Ok(mask)
    }

    /// Records the sampled token. True when the grammar is complete (the output must end).
    pub fn consume(&mut self, token: u32) -> Result<bool> {
        self.first = None;
        self.matcher.consume_token(token).map_err(|e| Error::Grammar(cut(&e.to_string())))?;
        Ok(self.matcher.is_stopped())
    }
}

/// Sets every logit `mask` forbids to -inf, on the host.
pub fn mask_host_row(mask: &SimpleVob, row: &mut [f32]) {
    let words = mask.as_slice();
    for (i, chunk) in row.chunks_mut(32).enumerate() {
        // Past the mask (never, for a mask built for this model) nothing is allowed.
        let word = words.get(i).copied().unwrap_or(0);
        if word == u32::MAX {
            continue;
        }
        for (b, x) in chunk.iter_mut().enumerate() {
            if (word >> b) & 1 == 0 {
                *x = f32::NEG_INFINITY;
            }
        }
    }
}

/// `rows` (one per mask) with every forbidden logit set to -inf, where the rows are (on the
/// device). Only the expanded mask travels, one byte per token; `scratch` is reused across steps.
pub fn mask_rows(rows: &Tensor, masks: &[&SimpleVob], scratch: &mut Vec<u8>) -> Result<Tensor> {
    let (n, vocab) = rows.dims2()?;
    debug_assert_eq!(n, masks.len());
    scratch.clear();
    scratch.resize(n * vocab, 0);
    // A byte of mask bits becomes eight 0/1 bytes in one copy.
    const SPREAD: [[u8; 8]; 256] = {
        let mut t = [[0u8; 8]; 256];
        let mut byte = 0;
        while byte < 256 {
            let mut bit = 0;
            while bit < 8 {
                t[byte][bit] = ((byte >> bit) & 1) as u8;
                bit += 1;
            }
            byte += 1;
        }
        t
    };
    for (mask, out) in masks.iter().zip(scratch.chunks_mut(vocab)) {
        for (word, bits) in mask.as_slice().iter().zip(out.chunks_mut(32)) {
            if *word == 0 {
                continue;
            }
            for (i, eight) in bits.chunks_mut(8).enumerate() {
                let spread = &SPREAD[((word >> (8 * i)) & 0xFF) as usize];
                eight.copy_from_slice(&spread[..eight.len()]);
            }
        }
    }
    let keep = Tensor::from_slice(scratch.as_slice(), (n, vocab), rows.device())?;
    let forbidden = Tensor::new(f32::NEG_INFINITY, rows.device())?.to_dtype(rows.dtype())?.broadcast_as((n, vocab))?;
    Ok(keep.where_cond(rows, &forbidden)?)
}

/// Logits as f32 for checks in tests.
#[cfg(test)]
fn f32_rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_dtype(candle_core::DType::F32).unwrap().to_vec2().unwrap()
}

#[cfg(test)]
mod tests;
