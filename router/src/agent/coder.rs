//! Qwen3-Coder's tool calls: inside `<tool_call>…</tool_call>`,
//! `<function=NAME>` then `<parameter=KEY>\nvalue\n</parameter>` per argument, then
//! `</function>`. Values are text; each is typed by the tool's JSON schema (integer, number,
//! boolean, object and array values parsed, the rest strings), and the arguments become one
//! JSON object, streamed a parameter at a time as each closes.

use std::collections::HashMap;

use serde_json::Value;

/// Each offered function's parameter types (`parameters.properties.KEY.type`).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct ToolSchemas(HashMap<String, HashMap<String, String>>);

impl ToolSchemas {
    /// From OpenAI `tools` entries.
    pub fn from_tools(tools: &[Value]) -> Self {
        let mut out = HashMap::new();
        for t in tools {
            let f = &t["function"];
            let Some(name) = f["name"].as_str() else { continue };
            let props = f["parameters"]["properties"].as_object();
            let types = props
                .into_iter()
                .flatten()
                .filter_map(|(k, v)| Some((k.clone(), v["type"].as_str()?.to_string())))
                .collect();
            out.insert(name.to_string(), types);
        }
        ToolSchemas(out)
    }

    /// `text` as the JSON value parameter `key` of `function` declares.
    fn typed(&self, function: &str, key: &str, text: &str) -> Value {
        let ty = self.0.get(function).and_then(|p| p.get(key)).map(String::as_str);
        let parsed = match ty {
            Some("integer") => text.trim().parse::<i64>().ok().map(Value::from),
            Some("number") => {
                text.trim().parse::<f64>().ok().and_then(|n| serde_json::Number::from_f64(n).map(Value::Number))
            }
            Some("boolean") => match text.trim().to_ascii_lowercase().as_str() {
                "true" => Some(Value::Bool(true)),
                "false" => Some(Value::Bool(false)),
                _ => None,
            },
            Some("object" | "array") => serde_json::from_str(text.trim()).ok(),
            _ => None,
        };
        parsed.unwrap_or_else(|| Value::String(text.to_string()))
    }
}

/// The function's name, once `<function=NAME>` is complete in `body`.
pub fn name(body: &str) -> Option<String> {
    let start = body.find("<function=")? + "<function=".len();
    let end = start + body[start..].find('>')?;
    Some(body[start..end].trim().to_string())
}

/// The complete `(key, raw value)` parameters in `body` so far, in order.
fn params(body: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = body;
    while let Some(at) = rest.find("<parameter=") {
        let after = &rest[at + "<parameter=".len()..];
        let (Some(gt), Some(close)) = (after.find('>'), after.find("</parameter>")) else { break };
        if close < gt {
            break;
        }
        let value = &after[gt + 1..close];
        // The newlines around a value are the format's.
        let value = value.strip_prefix('\n').unwrap_or(value);
        let value = value.strip_suffix('\n').unwrap_or(value);
        out.push((after[..gt].trim().to_string(), value.to_string()));
        rest = &after[close + "</parameter>".len()..];
    }
    out
}

/// The JSON text of parameters `from..` of `body` (as members: `{` before the first, `, `
/// between), and how many parameters it covers.
pub fn args_from(body: &str, function: &str, schemas: &ToolSchemas, from: usize) -> (String, usize) {
    let all = params(body);
    let mut text = String::new();
    for (i, (k, v)) in all.iter().enumerate().skip(from) {
        text.push_str(if i == 0 { "{" } else { ", " });
        text.push_str(&Value::String(k.clone()).to_string());
        text.push_str(": ");
        text.push_str(&schemas.typed(function, k, v).to_string());
    }
    (text, all.len())
}
