//! Structured outputs as clients ask for them: OpenAI's `response_format`, vLLM's `guided_*` and
//! `structured_outputs`, the gRPC `constraint`, and a `tool_choice` that forces a call. Each
//! becomes the worker's `Constraint` (the worker compiles it with llguidance and masks tokens);
//! this module only checks sizes and shapes, naming the client's field, and writes the grammar
//! of a forced tool call in the model's own call format.

use qwen_proto::limits::{MAX_CONSTRAINT_BYTES, MAX_CONSTRAINT_CHOICES};
use qwen_proto::worker::{constraint::Kind, Choices, Constraint};
use serde_json::Value;

use crate::agent::ToolFormat;
use crate::error::{Result, RouterError};

/// What a request asks its output to follow.
#[derive(Debug, Clone, PartialEq)]
pub enum ConstraintSpec {
    /// A grammar as the client gave it; `field` names it in errors (the worker's too).
    Grammar { field: String, constraint: Constraint },
    /// `tool_choice: required` (`name` None) or a named function: one call (more unless
    /// `single`) in the model's tool-call format, arguments following the tool's schema.
    ToolCall { name: Option<String>, single: bool },
}

impl ConstraintSpec {
    /// The field that errors about the constraint name.
    pub fn field(&self) -> &str {
        match self {
            ConstraintSpec::Grammar { field, .. } => field,
            ConstraintSpec::ToolCall { .. } => "tool_choice",
        }
    }
}

/// Adds the call a `tool_choice` forces to a request's `constraint`, which must then hold no
/// grammar of its own (the error names that grammar's field).
pub fn force_call(constraint: &mut Option<ConstraintSpec>, forced: Option<ConstraintSpec>) -> Result<()> {
    let Some(forced) = forced else { return Ok(()) };
    if let Some(own) = constraint {
        return Err(RouterError::invalid(own.field(), "cannot be combined with a tool_choice that forces a call"));
    }
    *constraint = Some(forced);
    Ok(())
}

/// The HTTP body's structured-output fields (any one of them).
#[derive(Debug, Default, serde::Deserialize)]
pub struct HttpFields {
    pub response_format: Option<Value>,
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
    /// vLLM's newer spelling: `{"json": ..., "regex": ..., "choice": [...], "grammar": ...}`.
    pub structured_outputs: Option<Value>,
}

fn grammar(field: impl Into<String>, kind: Kind) -> Result<Option<ConstraintSpec>> {
    let spec = ConstraintSpec::Grammar { field: field.into(), constraint: Constraint { kind: Some(kind) } };
    check(&spec)?;
    Ok(Some(spec))
}

/// A JSON schema given as an object (or, as vLLM allows, as JSON text).
fn schema_text(field: &str, v: &Value) -> Result<String> {
    match v {
        Value::Object(_) | Value::Bool(_) => Ok(v.to_string()),
        Value::String(s) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(_)) => Ok(s.clone()),
            _ => Err(RouterError::invalid(field, "must be a JSON Schema object")),
        },
        _ => Err(RouterError::invalid(field, "must be a JSON Schema object")),
    }
}

fn string_list(field: &str, v: &Value) -> Result<Vec<String>> {
    v.as_array()
        .and_then(|a| a.iter().map(|s| s.as_str().map(str::to_string)).collect::<Option<Vec<_>>>())
        .ok_or_else(|| RouterError::invalid(field, "must be a list of strings"))
}

impl HttpFields {
    /// The one constraint these fields ask for, if any.
    pub fn constraint(self) -> Result<Option<ConstraintSpec>> {
        let given: Vec<&str> = [
            ("response_format", self.response_format.as_ref().is_some_and(|f| f["type"] != "text")),
            ("guided_json", self.guided_json.is_some()),
            ("guided_regex", self.guided_regex.is_some()),
            ("guided_choice", self.guided_choice.is_some()),
            ("guided_grammar", self.guided_grammar.is_some()),
            ("structured_outputs", self.structured_outputs.is_some()),
        ]
        .into_iter()
        .filter_map(|(f, set)| set.then_some(f))
        .collect();
        if given.len() > 1 {
            return Err(RouterError::invalid(given[1], format!("cannot be combined with `{}`", given[0])));
        }
        if let Some(f) = self.response_format {
            return response_format(&f);
        }
        if let Some(v) = self.guided_json {
            return grammar("guided_json", Kind::JsonSchema(schema_text("guided_json", &v)?));
        }
        if let Some(rx) = self.guided_regex {
            return grammar("guided_regex", Kind::Regex(rx));
        }
        if let Some(choices) = self.guided_choice {
            return grammar("guided_choice", Kind::Choice(Choices { choices }));
        }
        if let Some(g) = self.guided_grammar {
            return grammar("guided_grammar", Kind::Lark(g));
        }
        match self.structured_outputs {
            Some(s) => structured_outputs(&s),
            None => Ok(None),
        }
    }
}

/// OpenAI's `response_format`: `text`, `json_object`, or `json_schema` (`{name, schema, strict}`).
fn response_format(f: &Value) -> Result<Option<ConstraintSpec>> {
    match f["type"].as_str() {
        Some("text") => Ok(None),
        Some("json_object") => grammar("response_format", Kind::JsonObject(true)),
        Some("json_schema") => {
            let field = "response_format.json_schema.schema";
            let schema = f["json_schema"].get("schema").ok_or_else(|| RouterError::invalid(field, "is required"))?;
            grammar(field, Kind::JsonSchema(schema_text(field, schema)?))
        }
        _ => Err(RouterError::invalid("response_format.type", "must be \"text\", \"json_object\" or \"json_schema\"")),
    }
}

fn structured_outputs(s: &Value) -> Result<Option<ConstraintSpec>> {
    let obj = s.as_object().ok_or_else(|| RouterError::invalid("structured_outputs", "must be an object"))?;
    let keys: Vec<&str> = obj.keys().map(String::as_str).filter(|k| *k != "json_object").collect();
    match (keys.as_slice(), obj.get("json_object")) {
        ([], Some(Value::Bool(true))) => grammar("structured_outputs.json_object", Kind::JsonObject(true)),
        (["json"], _) => {
            grammar("structured_outputs.json", Kind::JsonSchema(schema_text("structured_outputs.json", &s["json"])?))
        }
        (["regex"], _) => match s["regex"].as_str() {
            Some(rx) => grammar("structured_outputs.regex", Kind::Regex(rx.into())),
            None => Err(RouterError::invalid("structured_outputs.regex", "must be a string")),
        },
        (["choice"], _) => {
            let choices = string_list("structured_outputs.choice", &s["choice"])?;
            grammar("structured_outputs.choice", Kind::Choice(Choices { choices }))
        }
        (["grammar"], _) => match s["grammar"].as_str() {
            Some(g) => grammar("structured_outputs.grammar", Kind::Lark(g.into())),
            None => Err(RouterError::invalid("structured_outputs.grammar", "must be a string")),
        },
        _ => Err(RouterError::invalid(
            "structured_outputs",
            "must hold exactly one of json, regex, choice, grammar or json_object: true",
        )),
    }
}

/// Sizes and counts, before anything travels to a worker.
pub fn check(spec: &ConstraintSpec) -> Result<()> {
    let ConstraintSpec::Grammar { field, constraint } = spec else { return Ok(()) };
    let size = match &constraint.kind {
        Some(Kind::JsonSchema(s) | Kind::Regex(s) | Kind::Lark(s)) => s.len(),
        Some(Kind::Choice(c)) => {
            if c.choices.is_empty() || c.choices.len() > MAX_CONSTRAINT_CHOICES {
                return Err(RouterError::invalid(field, format!("must hold 1 to {MAX_CONSTRAINT_CHOICES} strings")));
            }
            if c.choices.iter().any(String::is_empty) {
                return Err(RouterError::invalid(field, "choices must not be empty strings"));
            }
            c.choices.iter().map(String::len).sum()
        }
        Some(Kind::JsonObject(_)) => 0,
        None => return Err(RouterError::invalid(field, "no grammar given")),
    };
    if size == 0 && !matches!(constraint.kind, Some(Kind::JsonObject(_))) {
        return Err(RouterError::invalid(field, "must not be empty"));
    }
    if size > MAX_CONSTRAINT_BYTES {
        return Err(RouterError::invalid(field, format!("{size} bytes; at most {MAX_CONSTRAINT_BYTES}")));
    }
    Ok(())
}

/// The worker's constraint for `spec`, given the model's tool-call `format` and the request's
/// checked `tools` (`{"type": "function", "function": {...}}` entries).
pub fn resolve(spec: ConstraintSpec, format: Option<ToolFormat>, tools: Option<&[Value]>) -> Result<Constraint> {
    let (name, single) = match spec {
        ConstraintSpec::Grammar { constraint, .. } => return Ok(constraint),
        ConstraintSpec::ToolCall { name, single } => (name, single),
    };
    let tools = tools.filter(|t| !t.is_empty()).ok_or_else(|| RouterError::invalid("tool_choice", "needs `tools`"))?;
    let offered = |t: &&Value| name.as_deref().is_none_or(|n| t["function"]["name"] == n);
    let chosen: Vec<&Value> = tools.iter().filter(offered).collect();
    if chosen.is_empty() {
        return Err(RouterError::invalid("tool_choice.function.name", "is not one of the offered `tools`"));
    }
    let lark = match format {
        Some(ToolFormat::Hermes) => hermes(&chosen, single || name.is_some()),
        Some(ToolFormat::React) => react(&chosen),
        Some(ToolFormat::Qwen3Coder) => coder(&chosen, single || name.is_some()),
        None => return Err(RouterError::invalid("tool_choice", "this model's chat template renders no tool calls")),
    };
    let c = Constraint { kind: Some(Kind::Lark(lark)) };
    check(&ConstraintSpec::Grammar { field: "tools".into(), constraint: c.clone() })?;
    Ok(c)
}

/// A tool's arguments schema: always an object (OpenAI's rule for `parameters`), any object
/// where the tool gives no schema.
fn parameters(tool: &Value) -> Value {
    let mut p = match &tool["function"]["parameters"] {
        Value::Object(p) => p.clone(),
        _ => serde_json::Map::new(),
    };
    p.entry("type").or_insert_with(|| Value::from("object"));
    Value::Object(p)
}

/// Lark string literal (JSON's escaping is Lark's).
fn literal(s: &str) -> String {
    Value::from(s).to_string()
}

/// Qwen2.5 / Qwen3: `<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>` blocks.
fn hermes(tools: &[&Value], single: bool) -> String {
    let calls: Vec<Value> = tools
        .iter()
        .map(|t| {
            serde_json::json!({
                "type": "object",
                "properties": {"name": {"const": t["function"]["name"]}, "arguments": parameters(t)},
                "required": ["name", "arguments"],
                "additionalProperties": false,
            })
        })
        .collect();
    let schema = serde_json::json!({"anyOf": calls, "x-guidance": {"whitespace_flexible": false}});
    let start = if single { "start: call" } else { "start: call (\"\\n\" call)*" };
    format!("{start}\ncall: \"<tool_call>\\n\" body \"\\n</tool_call>\"\nbody: %json {schema}\n")
}

/// Qwen3-Coder: `<tool_call>\n<function=NAME>\n<parameter=KEY>\nVALUE\n</parameter>\n...</function>\n</tool_call>`.
/// Required parameters always, the others optionally, in the schema's order; typed values
/// (numbers, booleans, objects, arrays) as JSON of their schema, enums of strings as one of them,
/// other strings as any text up to the closing tag.
fn coder(tools: &[&Value], single: bool) -> String {
    let start = if single { "start: call" } else { "start: call (\"\\n\" call)*" };
    let mut rules = format!("{start}\ncall: \"<tool_call>\\n\" function \"\\n</tool_call>\"\nfunction: ");
    let mut defs = String::new();
    for (i, t) in tools.iter().enumerate() {
        let name = t["function"]["name"].as_str().unwrap_or_default();
        rules.push_str(&format!("{}f{i}", if i > 0 { " | " } else { "" }));
        let params = parameters(t);
        let required: Vec<&str> =
            params["required"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        let mut body = vec![literal(&format!("<function={name}>\n"))];
        for (j, (key, schema)) in params["properties"].as_object().into_iter().flatten().enumerate() {
            let value = format!("v{i}_{j}");
            let open = literal(&format!("<parameter={key}>\n"));
            let close = literal("\n</parameter>\n");
            let param = match coder_value(schema) {
                // Text runs until the closing tag (lazily: it may hold anything else).
                None => {
                    defs.push_str(&format!("{value}[suffix={close}]: /(?s:.*)/\n"));
                    format!("{open} {value}")
                }
                Some(grammar) => {
                    defs.push_str(&format!("{value}: {grammar}\n"));
                    format!("{open} {value} {close}")
                }
            };
            body.push(if required.contains(&key.as_str()) { param } else { format!("({param})?") });
        }
        body.push(literal("</function>"));
        defs.push_str(&format!("f{i}: {}\n", body.join(" ")));
    }
    format!("{rules}\n{defs}")
}

/// One Qwen3-Coder parameter value's grammar; `None` for free text.
fn coder_value(schema: &Value) -> Option<String> {
    let strings: Option<Vec<&str>> = schema["enum"].as_array().and_then(|e| e.iter().map(Value::as_str).collect());
    match (schema["type"].as_str(), strings) {
        (_, Some(choices)) if !choices.is_empty() => {
            Some(choices.iter().map(|c| literal(c)).collect::<Vec<_>>().join(" | "))
        }
        (Some("string") | None, _) if schema.get("enum").is_none() => None,
        _ => {
            let mut schema = schema.clone();
            schema["x-guidance"] = serde_json::json!({"whitespace_flexible": false});
            Some(format!("%json {schema}"))
        }
    }
}

/// The original Qwen-Chat's ReAct: a short thought, then `Action:` and `Action Input:` (the
/// model would next write `Observation:`, where generation ends).
fn react(tools: &[&Value]) -> String {
    let mut rules = String::from("start: \"Thought: \" /[^\\n]{0,200}/ \"\\nAction: \" call\ncall: ");
    let mut args = String::new();
    for (i, t) in tools.iter().enumerate() {
        let name = t["function"]["name"].as_str().unwrap_or_default();
        if i > 0 {
            rules.push_str(" | ");
        }
        rules.push_str(&format!("{} a{i}", literal(&format!("{name}\nAction Input: "))));
        let mut schema = parameters(t);
        schema["x-guidance"] = serde_json::json!({"whitespace_flexible": false});
        args.push_str(&format!("a{i}: %json {schema}\n"));
    }
    format!("{rules}\n{args}")
}

#[cfg(test)]
mod tests;
