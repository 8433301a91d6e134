//! Tool-call blocks `<tool_call>…</tool_call>`, any number per turn, text possibly before, in
//! two body formats:
//! - Qwen2.5 / Qwen3 (Hermes): `{"name": "f", "arguments": {...}}`. Streamed, a call is
//!   announced once its name is read, then its arguments follow as the model writes them (up to
//!   the last `}` seen, which may still be the outer object's);
//! - Qwen3-Coder: `<function=f><parameter=k>v</parameter>…</function>` (`coder`), arguments
//!   streamed a parameter at a time as JSON.
//!
//! A block that does not parse is content, tags and all (unless it was already announced while
//! streaming: then its arguments end as streamed).

use std::sync::Arc;

use serde_json::Value;

use super::coder::{self, ToolSchemas};
use super::{call_id, safe_len, Piece};

/// What a block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Body {
    /// `{"name": ..., "arguments": {...}}` (Hermes: Qwen2.5, Qwen3).
    Json,
    /// `<function=...><parameter=...>` (Qwen3-Coder).
    Xml,
}

const OPEN: &str = "<tool_call>";
const CLOSE: &str = "</tool_call>";

/// The call being read: where its arguments start in the block, how far they have been sent
/// (bytes of the block for JSON bodies, parameters for Coder's).
#[derive(Default)]
struct Open {
    index: Option<usize>,
    name: String,
    args_start: usize,
    sent: usize,
}

pub struct ToolCallParser {
    format: Body,
    schemas: Arc<ToolSchemas>,
    buf: String,
    call: Option<Open>,
    calls: usize,
    single: bool,
    /// A block just closed: whitespace up to the next block (or the end) is markup.
    after_block: bool,
}

impl ToolCallParser {
    pub fn new(format: Body, schemas: Arc<ToolSchemas>, single: bool) -> Self {
        ToolCallParser { format, schemas, buf: String::new(), call: None, calls: 0, single, after_block: false }
    }

    pub fn called(&self) -> bool {
        self.calls > 0
    }

    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            if self.call.is_none() {
                if self.after_block {
                    let rest = self.buf.trim_start();
                    if rest.is_empty() {
                        break;
                    }
                    if rest.starts_with(OPEN) || OPEN.starts_with(rest) {
                        self.buf = rest.to_string();
                    } else {
                        self.after_block = false;
                    }
                }
                if let Some(at) = self.buf.find(OPEN) {
                    out.push(Piece::Content(self.buf[..at].to_string()));
                    self.buf.drain(..at + OPEN.len());
                    self.call = Some(Open::default());
                    continue;
                }
                let n = safe_len(&self.buf, OPEN);
                out.push(Piece::Content(self.buf.drain(..n).collect()));
                break;
            }
            match self.buf.find(CLOSE) {
                Some(at) => {
                    let body = self.buf[..at].to_string();
                    self.buf.drain(..at + CLOSE.len());
                    out.extend(self.close(&body, true));
                    self.after_block = true;
                }
                None => {
                    out.extend(self.progress());
                    break;
                }
            }
        }
        out.retain(|p| !matches!(p, Piece::Content(s) if s.is_empty()));
        out
    }

    /// At the end of the turn: an unclosed block is a call if it parses (the model stopped at
    /// its length), else content.
    pub fn finish(&mut self) -> Vec<Piece> {
        let body = std::mem::take(&mut self.buf);
        match self.call {
            Some(_) => self.close(&body, false),
            None if body.is_empty() || (self.after_block && body.trim().is_empty()) => Vec::new(),
            None => vec![Piece::Content(body)],
        }
    }

    /// Announces the call once its name is readable and sends the arguments seen so far.
    fn progress(&mut self) -> Vec<Piece> {
        let mut out = Vec::new();
        let Some(call) = &mut self.call else { return out };
        if call.index.is_none() {
            let head = match self.format {
                Body::Json => header(&self.buf),
                Body::Xml => coder::name(&self.buf).map(|n| (n, 0)),
            };
            let Some((name, start)) = head else { return out };
            if self.single && self.calls > 0 {
                return out; // dropped at its close
            }
            call.index = Some(self.calls);
            (call.args_start, call.sent, call.name) = (start, start, name.clone());
            out.push(Piece::CallStart { index: self.calls, id: call_id(), name });
            self.calls += 1;
        }
        let Some(index) = call.index else { return out };
        match self.format {
            // Up to the last `}`: everything before it is surely arguments.
            Body::Json => {
                if let Some(last) = self.buf[call.args_start..].rfind('}') {
                    let end = call.args_start + last;
                    if end > call.sent {
                        out.push(Piece::CallArgs { index, text: self.buf[call.sent..end].to_string() });
                        call.sent = end;
                    }
                }
            }
            Body::Xml => {
                let (text, n) = coder::args_from(&self.buf, &call.name, &self.schemas, call.sent);
                if n > call.sent {
                    out.push(Piece::CallArgs { index, text });
                    call.sent = n;
                }
            }
        }
        out
    }

    /// The block `body` has ended (`closed`: by its tag).
    fn close(&mut self, body: &str, closed: bool) -> Vec<Piece> {
        let call = self.call.take().unwrap_or_default();
        if self.format == Body::Xml {
            return self.close_coder(body, closed, call);
        }
        let parsed = match serde_json::from_str::<Value>(body.trim()) {
            Ok(Value::Object(mut m)) => match (m.remove("name"), m.remove("arguments")) {
                (Some(Value::String(name)), Some(args)) if args.is_object() || args.is_string() => Some((name, args)),
                _ => None,
            },
            _ => None,
        };
        match (call.index, parsed) {
            // Announced while streaming: finish its arguments as written.
            (Some(index), Some(_)) => {
                let end = body.rfind('}').unwrap_or(body.len());
                let end = call.args_start.max(call.sent.max(body[..end].trim_end().len()));
                match body.get(call.sent..end).filter(|s| !s.is_empty()) {
                    Some(rest) => vec![Piece::CallArgs { index, text: rest.to_string() }],
                    None => Vec::new(),
                }
            }
            (Some(_), None) => Vec::new(),
            (None, Some(_)) if self.single && self.calls > 0 => Vec::new(),
            (None, Some((name, args))) => {
                let index = self.calls;
                self.calls += 1;
                let text = match args {
                    Value::String(s) => s,
                    args => args_text(body).unwrap_or_else(|| args.to_string()),
                };
                vec![Piece::CallStart { index, id: call_id(), name }, Piece::CallArgs { index, text }]
            }
            (None, None) => {
                let close = if closed { CLOSE } else { "" };
                vec![Piece::Content(format!("{OPEN}{body}{close}"))]
            }
        }
    }
}

impl ToolCallParser {
    /// A Coder block has ended: a call if it names a function (parameters so far, when the
    /// length limit cut it), else content.
    fn close_coder(&mut self, body: &str, closed: bool, call: Open) -> Vec<Piece> {
        let Some(name) = coder::name(body) else {
            let close = if closed { CLOSE } else { "" };
            return vec![Piece::Content(format!("{OPEN}{body}{close}"))];
        };
        let (index, mut out) = match call.index {
            Some(index) => (index, Vec::new()),
            None if self.single && self.calls > 0 => return Vec::new(),
            None => {
                self.calls += 1;
                (self.calls - 1, vec![Piece::CallStart { index: self.calls - 1, id: call_id(), name: name.clone() }])
            }
        };
        let (mut text, n) = coder::args_from(body, &name, &self.schemas, call.sent);
        text.push_str(if n == 0 { "{}" } else { "}" });
        out.push(Piece::CallArgs { index, text });
        out
    }
}

/// The arguments object exactly as written in a complete block, when the block is in the
/// usual `{"name": ..., "arguments": {...}}` order.
fn args_text(body: &str) -> Option<String> {
    let (_, start) = header(body)?;
    let end = body.rfind('}')?;
    Some(body[start..end].trim_end().to_string())
}

/// In a block's text so far: the function's name and where its arguments object starts, once
/// `{"name": "...", "arguments": {` has been written.
fn header(s: &str) -> Option<(String, usize)> {
    let mut i = skip_ws(s, 0);
    for token in ["{", "\"name\"", ":"] {
        i = skip_ws(s, s.get(i..)?.strip_prefix(token).map(|_| i + token.len())?);
    }
    let end = string_end(s, i)?;
    let name: String = serde_json::from_str(&s[i..end]).ok()?;
    i = skip_ws(s, end);
    for token in [",", "\"arguments\"", ":"] {
        i = skip_ws(s, s.get(i..)?.strip_prefix(token).map(|_| i + token.len())?);
    }
    s.get(i..)?.starts_with('{').then_some((name, i))
}

fn skip_ws(s: &str, i: usize) -> usize {
    i + s.get(i..).map_or(0, |r| r.len() - r.trim_start().len())
}

/// The end (exclusive) of the JSON string literal starting at `i`, once it is complete.
fn string_end(s: &str, i: usize) -> Option<usize> {
    let bytes = s.as_bytes();
    if bytes.get(i) != Some(&b'"') {
        return None;
    }
    let mut k = i + 1;
    while k < bytes.len() {
        match bytes[k] {
            b'\\' => k += 2,
            b'"' => return Some(k + 1),
            _ => k += 1,
        }
    }
    None
}
