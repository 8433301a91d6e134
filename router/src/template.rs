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
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
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

#[derive(Debug, Clone, Serialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
}

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

    /// The prompt text for `messages`, ending with the assistant's turn opener.
    pub fn render(&self, messages: &[Message]) -> Result<String> {
        let template = self.env.get_template("chat").map_err(|e| RouterError::Internal(e.to_string()))?;
        template
            .render(context! { messages => messages, add_generation_prompt => true })
            // A template raising on the conversation (e.g. roles out of order) is the caller's
            // input being refused.
            .map_err(|e| RouterError::invalid("messages", format!("the chat template refused them: {e}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msgs(pairs: &[(&str, &str)]) -> Vec<Message> {
        pairs.iter().map(|(r, c)| Message { role: Role::parse(r).unwrap(), content: c.to_string() }).collect()
    }

    #[test]
    fn chatml_matches_qwen_chat_make_context() {
        let t = ChatTemplate::new(CHATML).unwrap();
        let out = t.render(&msgs(&[("user", "hi")])).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
        let out = t.render(&msgs(&[("system", "S"), ("user", "a"), ("assistant", "b"), ("user", "c")])).unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn python_methods_and_raise_exception() {
        let src = "{% for m in messages %}{% if m.content.startswith('!') %}{{ raise_exception('no bangs') }}{% endif %}{{ m.content.strip() }}{% endfor %}";
        let t = ChatTemplate::new(src).unwrap();
        assert_eq!(t.render(&msgs(&[("user", "  x ")])).unwrap(), "x");
        let err = t.render(&msgs(&[("user", "!x")])).unwrap_err();
        assert_eq!(err.kind(), crate::error::ErrorKind::InvalidArgument);
        assert!(err.to_string().contains("no bangs"), "{err}");
        assert!(ChatTemplate::new("{% for %}").is_err());
    }
}
