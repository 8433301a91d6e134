//! A chat request's agent fields, as both front ends hand them over: checked once into the
//! [`Chat`] the template renders and the [`AgentRequest`] that says what to parse from the
//! answer. Errors name the field in the HTTP spelling (gRPC's are the same names).

use std::sync::Arc;

use serde_json::Value;

use super::{Formats, ToolSchemas, TurnOptions};
use crate::error::RouterError;
use crate::models::ModelInfo;
use crate::structured::ConstraintSpec;
use crate::template::{Chat, Message, Role, RESERVED_VARIABLES};

/// Most tools one request may offer.
pub const MAX_TOOLS: usize = 128;
/// Most `chat_template_kwargs` entries.
pub const MAX_TEMPLATE_KWARGS: usize = 32;

/// What a chat request asks of the turn's parsing.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AgentRequest {
    /// Tools were offered and `tool_choice` is not `none`.
    pub tools: bool,
    /// `parallel_tool_calls: false`.
    pub single_call: bool,
    /// Decoding follows a grammar (structured output or a forced call) from the first token, so
    /// nothing of the answer is reasoning even where the prompt opened `<think>`.
    pub constrained: bool,
}

impl AgentRequest {
    /// The parse options for a choice of `model` whose prompt is `prompt`, with the offered
    /// tools' `schemas`.
    pub fn turn_options(self, model: &ModelInfo, prompt: &[u32], schemas: Arc<ToolSchemas>) -> TurnOptions {
        self.with_formats(model.formats, !self.constrained && reasoning_open(model, prompt), schemas)
    }

    /// Options for a model whose formats are given (tests, and callers without a model).
    pub fn with_formats(self, formats: Formats, reasoning_open: bool, schemas: Arc<ToolSchemas>) -> TurnOptions {
        TurnOptions { formats, reasoning_open, tools: self.tools, single_call: self.single_call, schemas }
    }
}

/// `tool_choice`, as either API spells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToolChoiceIn {
    Auto,
    None,
    /// A call is forced (decoding constrained to it).
    Required,
    /// A call of this function is forced.
    Named(String),
    Invalid,
}

/// One message as either API hands it over.
#[derive(Debug, Default)]
pub struct MessageIn {
    pub role: Role,
    pub content: String,
    pub tool_calls: Option<Vec<CallIn>>,
    pub tool_call_id: Option<String>,
    pub reasoning_content: Option<String>,
}

#[derive(Debug, Default)]
pub struct CallIn {
    pub id: Option<String>,
    /// `type`, when given: must be `function`.
    pub kind: Option<String>,
    pub name: String,
    /// JSON text.
    pub arguments: String,
}

/// Everything agent-related a chat request carries.
#[derive(Debug, Default)]
pub struct ChatIn {
    pub messages: Vec<MessageIn>,
    /// OpenAI `tools` entries (`{"type": "function", "function": {...}}`).
    pub tools: Option<Vec<Value>>,
    pub tool_choice: Option<ToolChoiceIn>,
    pub single_call: bool,
    pub kwargs: serde_json::Map<String, Value>,
}

/// The chat to render, what to parse from its answer, and the call it must make when
/// `tool_choice` forces one.
pub fn chat_request(c: ChatIn) -> Result<(Chat, AgentRequest, Option<ConstraintSpec>), RouterError> {
    let tools = c.tools.filter(|t| !t.is_empty()).map(check_tools).transpose()?;
    let parse_tools =
        match c.tool_choice {
            None => tools.is_some(),
            Some(ToolChoiceIn::None) => false,
            Some(ToolChoiceIn::Auto) if tools.is_none() => {
                return Err(RouterError::invalid("tool_choice", "\"auto\" needs `tools`"))
            }
            Some(ToolChoiceIn::Auto) => true,
            Some(ToolChoiceIn::Required | ToolChoiceIn::Named(_)) if tools.is_none() => {
                return Err(RouterError::invalid("tool_choice", "forcing a call needs `tools`"))
            }
            Some(ToolChoiceIn::Required | ToolChoiceIn::Named(_)) => true,
            Some(ToolChoiceIn::Invalid) => return Err(RouterError::invalid(
                "tool_choice",
                "must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
            )),
        };
    if c.kwargs.len() > MAX_TEMPLATE_KWARGS {
        return Err(RouterError::invalid("chat_template_kwargs", format!("more than {MAX_TEMPLATE_KWARGS} entries")));
    }
    if let Some(k) = c.kwargs.keys().find(|k| RESERVED_VARIABLES.contains(&k.as_str())) {
        return Err(RouterError::invalid(format!("chat_template_kwargs.{k}"), "is set by the request itself"));
    }
    let forced = match c.tool_choice {
        Some(ToolChoiceIn::Required) => Some(ConstraintSpec::ToolCall { name: None, single: c.single_call }),
        Some(ToolChoiceIn::Named(name)) => Some(ConstraintSpec::ToolCall { name: Some(name), single: true }),
        _ => None,
    };
    let messages = c.messages.into_iter().enumerate().map(|(i, m)| message(i, m)).collect::<Result<_, _>>()?;
    let agent = AgentRequest { tools: parse_tools, single_call: c.single_call, constrained: forced.is_some() };
    Ok((Chat { messages, tools, kwargs: c.kwargs }, agent, forced))
}

fn check_tools(tools: Vec<Value>) -> Result<Vec<Value>, RouterError> {
    if tools.len() > MAX_TOOLS {
        return Err(RouterError::invalid("tools", format!("more than {MAX_TOOLS} tools")));
    }
    tools
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            if t["type"] != "function" {
                return Err(RouterError::invalid(format!("tools[{i}].type"), "must be \"function\""));
            }
            let name = t["function"]["name"].as_str().unwrap_or_default();
            let ok = (1..=64).contains(&name.len())
                && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b));
            if !ok {
                return Err(RouterError::invalid(
                    format!("tools[{i}].function.name"),
                    "must be 1 to 64 of a-z, A-Z, 0-9, _, - and .",
                ));
            }
            Ok(serde_json::json!({"type": "function", "function": t["function"]}))
        })
        .collect()
}

/// Message `i` as the template reads it: call arguments parsed from their JSON text.
fn message(i: usize, m: MessageIn) -> Result<Message, RouterError> {
    let tool_calls = match m.tool_calls {
        Some(_) if m.role != Role::Assistant => {
            return Err(RouterError::invalid(format!("messages[{i}].tool_calls"), "only assistant messages make calls"))
        }
        Some(calls) => Some(
            calls
                .into_iter()
                .enumerate()
                .map(|(j, c)| {
                    let field = |f: &str| format!("messages[{i}].tool_calls[{j}].{f}");
                    if c.kind.as_deref().is_some_and(|k| k != "function") {
                        return Err(RouterError::invalid(field("type"), "must be \"function\""));
                    }
                    let arguments: Value = serde_json::from_str(&c.arguments)
                        .map_err(|e| RouterError::invalid(field("function.arguments"), format!("is not JSON: {e}")))?;
                    Ok(serde_json::json!({
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": arguments},
                    }))
                })
                .collect::<Result<Vec<_>, _>>()?,
        ),
        None => None,
    };
    Ok(Message {
        role: m.role,
        content: m.content,
        tool_calls,
        tool_call_id: m.tool_call_id,
        reasoning_content: m.reasoning_content,
    })
}

/// Whether the prompt `ids` end inside an opened `<think>` (Qwen3-2507 thinking templates).
pub fn reasoning_open(model: &ModelInfo, ids: &[u32]) -> bool {
    // Enough tokens for `<think>\n` in any vocabulary (one or two in Qwen's).
    let tail = &ids[ids.len().saturating_sub(16)..];
    model.tokenizer.as_ref().and_then(|t| t.decode(tail).ok()).is_some_and(|s| s.trim_end().ends_with("<think>"))
}
