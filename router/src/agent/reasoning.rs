//! Qwen3's reasoning markup: the turn opens with `<think>` (or the prompt already opened it,
//! as Qwen3-2507's thinking templates do), reasons, closes with `</think>`, then answers. The
//! blank lines after `</think>` belong to the markup.

use super::safe_len;

const OPEN: &str = "<think>";
const CLOSE: &str = "</think>";

#[derive(Debug, PartialEq, Eq)]
enum State {
    /// Not yet known whether the turn opens with `<think>`.
    Start,
    Reasoning,
    /// Just closed: leading newlines are dropped.
    Closed,
    Answer,
}

pub struct ThinkSplitter {
    state: State,
    buf: String,
}

impl ThinkSplitter {
    pub fn new(reasoning_open: bool) -> Self {
        ThinkSplitter { state: if reasoning_open { State::Reasoning } else { State::Start }, buf: String::new() }
    }

    /// `(is_reasoning, text)` runs that `text` completes.
    pub fn push(&mut self, text: &str) -> Vec<(bool, String)> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            match self.state {
                State::Start => {
                    let trimmed = self.buf.trim_start();
                    if let Some(rest) = trimmed.strip_prefix(OPEN) {
                        self.buf = rest.to_string();
                        self.state = State::Reasoning;
                    } else if OPEN.starts_with(trimmed) {
                        return out; // still maybe `<think>`
                    } else {
                        self.state = State::Answer;
                    }
                }
                State::Reasoning => match self.buf.find(CLOSE) {
                    Some(at) => {
                        out.push((true, self.buf[..at].to_string()));
                        self.buf.drain(..at + CLOSE.len());
                        self.state = State::Closed;
                    }
                    None => {
                        let n = safe_len(&self.buf, CLOSE);
                        out.push((true, self.buf.drain(..n).collect()));
                        return out;
                    }
                },
                State::Closed => {
                    let rest = self.buf.trim_start_matches('\n');
                    if rest.is_empty() {
                        self.buf.clear();
                        return out;
                    }
                    self.buf = rest.to_string();
                    self.state = State::Answer;
                }
                State::Answer => {
                    out.push((false, std::mem::take(&mut self.buf)));
                    return out;
                }
            }
        }
    }

    /// What is held back at the end of the turn: an unclosed `<think>`'s text is reasoning.
    pub fn finish(&mut self) -> Vec<(bool, String)> {
        let text = std::mem::take(&mut self.buf);
        match self.state {
            State::Reasoning => vec![(true, text)],
            State::Start | State::Answer => vec![(false, text)],
            State::Closed => Vec::new(),
        }
    }
}
