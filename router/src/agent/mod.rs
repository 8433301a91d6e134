//! What an assistant turn's text becomes in a chat response: reasoning (Qwen3's
//! `<think>…</think>`), content, and tool calls (Qwen2.5/Qwen3's `<tool_call>` JSON), from the
//! whole text or incrementally as it streams. Markup split across tokens is held back until it
//! is known to be markup or text, so no tag leaks into content.

mod calls;
mod coder;
pub mod react;
mod reasoning;
pub mod request;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use calls::{Body, ToolCallParser};
pub use coder::ToolSchemas;
use reasoning::ThinkSplitter;

/// The reasoning markup a model's template speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReasoningFormat {
    /// `<think>…</think>` before the answer (Qwen3, QwQ).
    Qwen3,
}

/// The tool-call markup a model's template speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ToolFormat {
    /// `<tool_call>\n{"name": …, "arguments": {…}}\n</tool_call>`, one block per call (Qwen2.5,
    /// Qwen3; the Hermes format).
    Hermes,
    /// `<tool_call>\n<function=NAME>\n<parameter=KEY>\nvalue\n</parameter>…</function>\n</tool_call>`
    /// (Qwen3-Coder), values typed by the tool's JSON schema.
    Qwen3Coder,
    /// ReAct prompting (`Action:` / `Action Input:` / `Observation:`): the original Qwen-Chat,
    /// whose chat has no template for tools.
    React,
}

/// Which output markup to parse for a model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Formats {
    pub reasoning: Option<ReasoningFormat>,
    pub tools: Option<ToolFormat>,
}

impl Formats {
    /// What a chat template's source shows it renders (none: the original Qwen-Chat's ChatML,
    /// which takes tools by ReAct prompting).
    pub fn detect(template: &str) -> Self {
        if template.trim().is_empty() {
            return Formats { reasoning: None, tools: Some(ToolFormat::React) };
        }
        Formats {
            reasoning: template.contains("</think>").then_some(ReasoningFormat::Qwen3),
            tools: if template.contains("<function=") {
                Some(ToolFormat::Qwen3Coder)
            } else {
                template.contains("<tool_call>").then_some(ToolFormat::Hermes)
            },
        }
    }
}

/// An operator's choice for one kind of markup: what the template shows, nothing, or a format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Choice<F> {
    #[default]
    Auto,
    Off,
    Use(F),
}

impl<F: Copy> Choice<F> {
    fn apply(self, detected: Option<F>) -> Option<F> {
        match self {
            Choice::Auto => detected,
            Choice::Off => None,
            Choice::Use(f) => Some(f),
        }
    }
}

/// `--reasoning-parser` and `--tool-parser`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FormatFlags {
    pub reasoning: Choice<ReasoningFormat>,
    pub tools: Choice<ToolFormat>,
}

impl FormatFlags {
    /// The formats to parse for a model whose template shows `detected`.
    pub fn apply(self, detected: Formats) -> Formats {
        Formats { reasoning: self.reasoning.apply(detected.reasoning), tools: self.tools.apply(detected.tools) }
    }
}

/// One request's choices of what to parse.
#[derive(Debug, Clone, Default)]
pub struct TurnOptions {
    pub formats: Formats,
    /// The rendered prompt already opened `<think>`: the turn starts inside reasoning.
    pub reasoning_open: bool,
    /// Parse tool calls (tools were given and `tool_choice` is not `none`).
    pub tools: bool,
    /// At most one call (`parallel_tool_calls: false`); later ones are dropped.
    pub single_call: bool,
    /// The offered tools' parameter types (Qwen3-Coder's values are typed by them).
    pub schemas: Arc<ToolSchemas>,
}

/// A piece of a turn, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    Reasoning(String),
    Content(String),
    /// Tool call `index` of the turn begins.
    CallStart {
        index: usize,
        id: String,
        name: String,
    },
    /// More of call `index`'s arguments (JSON text, as the model wrote it).
    CallArgs {
        index: usize,
        text: String,
    },
}

/// Splits one choice's text into [`Piece`]s as it arrives.
pub struct TurnParser {
    think: Option<ThinkSplitter>,
    calls: Option<ToolCallParser>,
    /// A ReAct turn, held whole: only its end tells a call from an answer.
    react: Option<String>,
    react_called: bool,
}

impl TurnParser {
    pub fn new(opts: TurnOptions) -> Self {
        let tools = opts.formats.tools.filter(|_| opts.tools);
        TurnParser {
            think: opts.formats.reasoning.map(|_| ThinkSplitter::new(opts.reasoning_open)),
            calls: match tools {
                Some(ToolFormat::React) | None => None,
                Some(ToolFormat::Hermes) => {
                    Some(ToolCallParser::new(Body::Json, opts.schemas.clone(), opts.single_call))
                }
                Some(ToolFormat::Qwen3Coder) => {
                    Some(ToolCallParser::new(Body::Xml, opts.schemas.clone(), opts.single_call))
                }
            },
            react: (tools == Some(ToolFormat::React)).then(String::new),
            react_called: false,
        }
    }

    /// The pieces `text` completes (some of it may be held back until more arrives).
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        if let Some(buf) = &mut self.react {
            buf.push_str(text);
            return Vec::new();
        }
        let mut out = Vec::new();
        match &mut self.think {
            Some(t) => {
                for (reasoning, s) in t.push(text) {
                    self.route(reasoning, s, &mut out);
                }
            }
            None => self.route(false, text.to_string(), &mut out),
        }
        out
    }

    /// Whatever is still held back, at the end of the turn.
    pub fn finish(&mut self) -> Vec<Piece> {
        if let Some(buf) = self.react.take() {
            let pieces = react::parse(&buf);
            self.react_called = pieces.iter().any(|p| matches!(p, Piece::CallStart { .. }));
            return pieces;
        }
        let mut out = Vec::new();
        if let Some(t) = &mut self.think {
            for (reasoning, s) in t.finish() {
                self.route(reasoning, s, &mut out);
            }
        }
        if let Some(c) = &mut self.calls {
            out.extend(c.finish());
        }
        merge(out)
    }

    /// Whether the turn has made a tool call.
    pub fn called(&self) -> bool {
        self.react_called || self.calls.as_ref().is_some_and(ToolCallParser::called)
    }

    fn route(&mut self, reasoning: bool, text: String, out: &mut Vec<Piece>) {
        if text.is_empty() {
            return;
        }
        match (&mut self.calls, reasoning) {
            (_, true) => out.push(Piece::Reasoning(text)),
            (Some(c), false) => out.extend(c.push(&text)),
            (None, false) => out.push(Piece::Content(text)),
        }
    }
}

/// Adjacent pieces of the same kind joined.
fn merge(pieces: Vec<Piece>) -> Vec<Piece> {
    let mut out: Vec<Piece> = Vec::with_capacity(pieces.len());
    for p in pieces {
        match (out.last_mut(), p) {
            (Some(Piece::Reasoning(a)), Piece::Reasoning(b)) | (Some(Piece::Content(a)), Piece::Content(b)) => {
                a.push_str(&b)
            }
            (Some(Piece::CallArgs { index: i, text: a }), Piece::CallArgs { index: j, text: b }) if *i == j => {
                a.push_str(&b)
            }
            (_, p) => out.push(p),
        }
    }
    out
}

/// A whole turn: what a unary response carries.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Turn {
    pub reasoning: Option<String>,
    pub content: Option<String>,
    pub calls: Vec<ToolCall>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct ToolCall {
    pub id: String,
    pub name: String,
    /// JSON text.
    pub arguments: String,
}

impl Turn {
    /// Parses a whole turn's `text`.
    pub fn parse(opts: &TurnOptions, text: &str) -> Turn {
        let mut p = TurnParser::new(opts.clone());
        let mut pieces = p.push(text);
        pieces.extend(p.finish());
        Turn::from_pieces(pieces)
    }

    /// A turn's pieces, in order, gathered into one.
    pub fn from_pieces(pieces: Vec<Piece>) -> Turn {
        let mut turn = Turn::default();
        for piece in merge(pieces) {
            match piece {
                Piece::Reasoning(s) => turn.reasoning.get_or_insert_with(String::new).push_str(&s),
                Piece::Content(s) => turn.content.get_or_insert_with(String::new).push_str(&s),
                Piece::CallStart { id, name, .. } => turn.calls.push(ToolCall { id, name, arguments: String::new() }),
                Piece::CallArgs { index, text } => {
                    if let Some(c) = turn.calls.get_mut(index) {
                        c.arguments.push_str(&text);
                    }
                }
            }
        }
        // Whitespace around calls is the markup's, not an answer.
        if !turn.calls.is_empty() && turn.content.as_deref().is_some_and(|c| c.trim().is_empty()) {
            turn.content = None;
        }
        turn
    }
}

/// A new tool call id, as OpenAI shapes them (`call_` and 24 random characters).
fn call_id() -> String {
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let suffix: String = (0..24).map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char).collect();
    format!("call_{suffix}")
}

/// How much of `buf` can be let go: all of it but a tail that could begin `tag`.
fn safe_len(buf: &str, tag: &str) -> usize {
    let max = tag.len().saturating_sub(1).min(buf.len());
    for keep in (1..=max).rev() {
        let at = buf.len() - keep;
        if buf.is_char_boundary(at) && tag.starts_with(&buf[at..]) {
            return at;
        }
    }
    buf.len()
}
