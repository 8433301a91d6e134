//! Chat templates: the model's own Jinja template from `tokenizer_config.json` (received from the
//! worker), rendered with minijinja and Python-compatible string methods (Qwen's templates call
//! `.startswith`, `.split`, ...). The original Qwen-Chat has no template: it gets ChatML with its
//! default system prompt, as its `make_context` builds.

use minijinja::{context, Environment};
use serde::{Deserialize, Serialize};

use crate::error::{Result, RouterError};

/// ChatML as the original Qwen-Chat's `make_context` lays it out.
pub const CHATML: &str = "{% for m in messages %}\
{% if loop.first and m.role != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}\
<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}\
{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}";

/// Who speaks a chat message; templates see the lowercase name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    #[default]
    User,
    Assistant,
    Tool,
}

impl Role {
    pub const NAMES: &'static str = "system, user, assistant, tool";

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "system" => Some(Role::System),
            "user" => Some(Role::User),
            "assistant" => Some(Role::Assistant),
            "tool" => Some(Role::Tool),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// An assistant turn's calls as templates read them: `{"id", "type", "function": {"name",
    /// "arguments"}}` with `arguments` an object (Qwen's templates `tojson` it).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<serde_json::Value>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reasoning_content: Option<String>,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Message { role, content: content.into(), ..Default::default() }
    }
}

/// A chat to render: its messages, the tools offered (OpenAI's `tools` entries), and extra
/// template variables (`chat_template_kwargs`).
#[derive(Debug, Clone, Default)]
pub struct Chat {
    pub messages: Vec<Message>,
    pub tools: Option<Vec<serde_json::Value>>,
    pub kwargs: serde_json::Map<String, serde_json::Value>,
}

/// Template variables a client's `chat_template_kwargs` may not replace.
pub const RESERVED_VARIABLES: [&str; 3] = ["messages", "tools", "add_generation_prompt"];

pub struct ChatTemplate {
    env: Environment<'static>,
}

impl ChatTemplate {
    /// Compiles `source` once; a template that does not parse is the checkpoint's fault, reported
    /// when the model is first seen.
    pub fn new(source: &str) -> Result<Self> {
        let mut env = Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(minijinja::ErrorKind::InvalidOperation, msg))
        });
        env.add_template_owned("chat", source.to_string())
            .map_err(|e| RouterError::Internal(format!("chat template does not compile: {e}")))?;
        Ok(ChatTemplate { env })
    }

    /// The prompt text for `messages` (in place of `chat`'s own: the caller may mark them),
    /// with `chat`'s tools and variables, ending with the assistant's turn opener.
    pub fn render(&self, messages: &[Message], chat: &Chat) -> Result<String> {
        let template = self.env.get_template("chat").map_err(|e| RouterError::Internal(e.to_string()))?;
        let mut vars = chat.kwargs.clone();
        vars.retain(|k, _| !RESERVED_VARIABLES.contains(&k.as_str()));
        let ctx = context! {
            messages => messages,
            tools => chat.tools.as_ref(),
            add_generation_prompt => true,
            ..minijinja::Value::from_serialize(&vars)
        };
        template
            .render(ctx)
            // A template raising on the conversation (e.g. roles out of order) is the caller's
            // input being refused.
            .map_err(|e| RouterError::invalid("messages", format!("the chat template refused them: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl ChatTemplate {
        fn render_all(&self, messages: &[Message]) -> Result<String> {
            self.render(messages, &Chat::default())
        }
    }

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs.iter().map(|(r, c)| Message::new(Role::parse(r).unwrap(), *c)).collect()
    }

    #[test]
    fn chatml_matches_qwen_chat_make_context() {
        let t = ChatTemplate::new(CHATML).unwrap();
        let out = t.render_all(&msgs(&[("user", "hi")])).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t.render_all(&msgs(&[("system", "S"), ("user", "a"), ("assistant", "b"), ("user", "c")])).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_raise_exception() {
        let src = "{% for m in messages %}{% if m.content.startswith('!') %}{{ raise_exception('no bangs') }}{% endif %}{{ m.content.strip() }}{% endfor %}";
        let t = ChatTemplate::new(src).unwrap();
        assert_eq!(t.render_all(&msgs(&[("user", "  x ")])).unwrap(), "x");
        let err = t.render_all(&msgs(&[("user", "!x")])).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("no bangs"), "{err}");
        assert!(ChatTemplate::new("{% for %}").is_err());
    }
}
