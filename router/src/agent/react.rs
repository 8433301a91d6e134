//! The original Qwen-Chat's tool use: ReAct prompting as the Qwen repository documents it (its
//! chat has no template for tools). The tools are described in the first user turn, the model
//! writes `Thought:` / `Action:` / `Action Input:`, stops at `Observation:`, and answers after
//! `Final Answer:`. A conversation whose last message is a tool result continues the same
//! assistant turn, as Qwen-Chat's own API does.

use serde_json::Value;

use super::{call_id, Piece};
use crate::template::{Chat, Message, Role};

/// The model stops here: the caller supplies the observation.
pub const STOP: &str = "Observation:";

/// The chat with tools and calls written as ReAct text, and the text that continues an open
/// assistant turn (after a tool result), which the caller appends to the prompt as plain text.
pub fn prompt(chat: Chat) -> (Chat, Option<String>) {
    let Chat { messages, tools, kwargs } = chat;
    let instruction = tools.as_deref().map(instruction);
    let mut out: Vec<Message> = Vec::with_capacity(messages.len());
    // The ReAct transcript of the assistant turn being built (calls and observations).
    let mut open: Option<String> = None;
    let mut instructed = false;
    for m in messages {
        match m.role {
            Role::User if !instructed && instruction.is_some() => {
                instructed = true;
                let content = format!("{}\n\nQuestion: {}", instruction.as_deref().unwrap_or_default(), m.content);
                flush(&mut out, &mut open);
                out.push(Message::new(Role::User, content));
            }
            Role::Assistant if m.tool_calls.as_ref().is_some_and(|c| !c.is_empty()) => {
                let t = open.get_or_insert_with(String::new);
                if !m.content.trim().is_empty() {
                    push_line(t, &format!("Thought: {}", m.content.trim()));
                }
                for call in m.tool_calls.iter().flatten() {
                    let f = &call["function"];
                    let args = match &f["arguments"] {
                        Value::String(s) => s.clone(),
                        v => v.to_string(),
                    };
                    push_line(t, &format!("Action: {}\nAction Input: {args}", f["name"].as_str().unwrap_or_default()));
                }
            }
            Role::Tool => {
                let t = open.get_or_insert_with(String::new);
                push_line(t, &format!("{STOP} {}", m.content));
            }
            Role::Assistant if open.is_some() => {
                let mut t = open.take().unwrap_or_default();
                push_line(&mut t, &format!("Thought: I now know the final answer\nFinal Answer: {}", m.content));
                out.push(Message::new(Role::Assistant, t));
            }
            _ => {
                flush(&mut out, &mut open);
                out.push(Message { tool_calls: None, tool_call_id: None, ..m });
            }
        }
    }
    // A turn left open by a tool result: the model continues it with its next thought.
    let continuation = open.map(|mut t| {
        push_line(&mut t, "Thought:");
        t
    });
    (Chat { messages: out, tools: None, kwargs }, continuation)
}

fn push_line(t: &mut String, line: &str) {
    if !t.is_empty() {
        t.push('\n');
    }
    t.push_str(line);
}

/// An assistant transcript that ended without a final answer, kept as the turn it was.
fn flush(out: &mut Vec<Message>, open: &mut Option<String>) {
    if let Some(t) = open.take() {
        out.push(Message::new(Role::Assistant, t));
    }
}

/// The ReAct instruction for `tools` (OpenAI `tools` entries), in the Qwen repository's words.
fn instruction(tools: &[Value]) -> String {
    let mut descs = Vec::new();
    let mut names = Vec::new();
    for t in tools {
        let f = &t["function"];
        let name = f["name"].as_str().unwrap_or_default();
        let params = f.get("parameters").map_or_else(|| "{}".to_string(), Value::to_string);
        descs.push(format!(
            "{name}: Call this tool to interact with the {name} API. What is the {name} API useful for? {} Parameters: {params} Format the arguments as a JSON object.",
            f["description"].as_str().unwrap_or_default()
        ));
        names.push(name);
    }
    format!(
        "Answer the following questions as best you can. You have access to the following tools:\n\n{}\n\n\
Use the following format:\n\n\
Question: the input question you must answer\n\
Thought: you should always think about what to do\n\
Action: the action to take, should be one of [{}]\n\
Action Input: the input to the action\n\
Observation: the result of the action\n\
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)\n\
Thought: I now know the final answer\n\
Final Answer: the final answer to the original input question\n\n\
Begin!",
        descs.join("\n\n"),
        names.join(", ")
    )
}

/// A whole ReAct turn (it is short, and only its end tells a call from an answer): a final
/// answer is the content and the thoughts before it the reasoning; else the last
/// `Action:` / `Action Input:` is a call; else it is all content.
pub fn parse(text: &str) -> Vec<Piece> {
    let reasoning = |s: &str| {
        let s = s.trim();
        (!s.is_empty()).then(|| Piece::Reasoning(s.to_string()))
    };
    if let Some(at) = text.rfind("Final Answer:") {
        let mut out: Vec<Piece> = reasoning(&text[..at]).into_iter().collect();
        out.push(Piece::Content(text[at + "Final Answer:".len()..].trim().to_string()));
        return out;
    }
    let action = text.rfind("Action:").filter(|&a| text[a..].contains("Action Input:"));
    let Some(at) = action else { return vec![Piece::Content(text.to_string())] };
    let rest = &text[at + "Action:".len()..];
    let input = rest.find("Action Input:").unwrap_or(rest.len());
    let name = rest[..input].trim().to_string();
    let args = rest[input..].trim_start_matches("Action Input:").trim().to_string();
    if name.is_empty() || name.contains('\n') {
        return vec![Piece::Content(text.to_string())];
    }
    let mut out: Vec<Piece> = reasoning(&text[..at]).into_iter().collect();
    out.push(Piece::CallStart { index: 0, id: call_id(), name });
    out.push(Piece::CallArgs { index: 0, text: if args.is_empty() { "{}".into() } else { args } });
    out
}
