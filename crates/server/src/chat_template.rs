//! The chat template: turns a conversation into the prompt text.
//!
//! Invariants: messages are rendered with the model's own `chat_template` (Jinja, rendered by
//! minijinja with Python-compatible string methods) when it has one, else with ChatML
//! (`<|im_start|>role\ncontent<|im_end|>\n` + `<|im_start|>assistant\n`, as mpt-30b-chat uses).

use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;

use crate::error::ApiError;
use crate::openai::types::ChatMessage;
use crate::openai::validation::message_text;

const TEMPLATE_NAME: &str = "chat";
/// The end-of-turn marker of ChatML.
pub const IM_END: &str = "<|im_end|>";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Option<Environment<'static>>,
}

#[derive(Serialize)]
struct TemplateMessage {
    role: String,
    content: String,
}

impl ChatTemplate {
    /// Compiles the model's template, or falls back to ChatML when there is none.
    pub fn new(source: Option<&str>) -> Result<Self, minijinja::Error> {
        let Some(source) = source else {
            return Ok(Self { env: None });
        };
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, source.to_string())?;
        Ok(Self { env: Some(env) })
    }

    /// True when the model's own template is used.
    pub fn is_custom(&self) -> bool {
        self.env.is_some()
    }

    /// Renders the conversation into the prompt text.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ApiError> {
        let messages: Vec<TemplateMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                Ok(TemplateMessage {
                    role: m.role.clone(),
                    content: message_text(m, i)?,
                })
            })
            .collect::<Result<_, ApiError>>()?;
        let Some(env) = &self.env else {
            let mut out = String::new();
            for m in &messages {
                out.push_str(&format!("<|im_start|>{}\n{}{IM_END}\n", m.role, m.content));
            }
            if add_generation_prompt {
                out.push_str("<|im_start|>assistant\n");
            }
            return Ok(out);
        };
        let template = env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ApiError::Internal(format!("chat template missing: {e}")))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => "<|endoftext|>",
                eos_token => "<|endoftext|>",
            })
            .map_err(|e| {
                ApiError::invalid(
                    "messages",
                    format!("the chat template rejected the messages: {e}"),
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: serde_json::Value::String(content.into()),
            name: None,
        }
    }

    #[test]
    fn chatml_fallback() {
        let t = ChatTemplate::new(None).expect("chatml");
        let out = t
            .render(&[msg("system", "Be brief."), msg("user", "Hi")], true)
            .expect("renders");
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn model_template_with_python_methods() {
        let source = "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}[{{ m.role.upper() }}] {{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}";
        let t = ChatTemplate::new(Some(source)).expect("compiles");
        assert!(t.is_custom());
        assert_eq!(
            t.render(&[msg("user", "  Hi ")], true).expect("renders"),
            "[USER] Hi\n[ASSISTANT]"
        );
        let err = t.render(&[msg("tool", "x")], true).expect_err("raises");
        assert_eq!(err.body().error.param.as_deref(), Some("messages"));
    }
}
