//! The chat template: turns a conversation into the prompt text.
//!
//! Invariants: messages are rendered with the model's own `chat_template` (Jinja, rendered by
//! minijinja with Python-compatible string methods) when it has one, else with ChatML
//! (`<|im_start|>role\ncontent<|im_end|>\n` + `<|im_start|>assistant\n`, as mpt-30b-chat uses).
//! Tools reach a model template as `tools` (the tool objects as sent) and assistant calls as
//! `message.tool_calls` with `arguments` parsed into an object, as Hugging Face templates
//! expect; a template that never mentions `tools`, and ChatML, get the tools described in the
//! system message ([`ToolPlan::prompt_text`]) and calls written in the call syntax of
//! [`crate::openai::tools`]; tool results are `tool` turns.

use minijinja::{Environment, ErrorKind, context};
use serde::Serialize;
use serde_json::Value;

use crate::error::ApiError;
use crate::openai::messages::message_text;
use crate::openai::tools::{CALL_CLOSE, CALL_OPEN, CALL_SEPARATOR, ToolPlan};
use crate::openai::types::ChatMessage;

const TEMPLATE_NAME: &str = "chat";
/// The end-of-turn marker of ChatML.
pub const IM_END: &str = "<|im_end|>";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Option<Environment<'static>>,
    /// The model's template renders `tools` itself.
    renders_tools: bool,
}

#[derive(Serialize)]
struct TemplateMessage {
    role: String,
    content: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_calls: Option<Vec<TemplateToolCall>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tool_call_id: Option<String>,
}

#[derive(Serialize)]
struct TemplateToolCall {
    id: Option<String>,
    #[serde(rename = "type")]
    kind: &'static str,
    function: TemplateFunction,
}

#[derive(Serialize)]
struct TemplateFunction {
    name: String,
    /// Parsed from the wire's JSON string when it is JSON (templates `tojson` it).
    arguments: Value,
}

impl TemplateToolCall {
    /// The call in our call syntax (ChatML and templates without tool support).
    fn as_text(&self) -> String {
        let body =
            serde_json::json!({"name": self.function.name, "arguments": self.function.arguments});
        format!("{CALL_OPEN}{body}{CALL_CLOSE}")
    }
}

fn template_message(m: &ChatMessage, i: usize) -> Result<TemplateMessage, ApiError> {
    let tool_calls = m.tool_calls.as_ref().map(|calls| {
        calls
            .iter()
            .map(|c| TemplateToolCall {
                id: c.id.clone(),
                kind: "function",
                function: TemplateFunction {
                    name: c.function.name.clone(),
                    arguments: match &c.function.arguments {
                        Value::String(s) => {
                            serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone()))
                        }
                        other => other.clone(),
                    },
                },
            })
            .collect()
    });
    Ok(TemplateMessage {
        role: m.role.clone(),
        content: message_text(m, i)?,
        tool_calls,
        tool_call_id: m.tool_call_id.clone(),
    })
}

/// `messages` with the tools described in the system message (a new one when there is none).
fn with_tools_described(
    mut messages: Vec<TemplateMessage>,
    tools: &ToolPlan,
) -> Vec<TemplateMessage> {
    let text = tools.prompt_text();
    match messages.first_mut() {
        Some(first) if first.role == "system" => {
            first.content = format!("{}\n\n{text}", first.content);
        }
        _ => messages.insert(
            0,
            TemplateMessage {
                role: "system".into(),
                content: text,
                tool_calls: None,
                tool_call_id: None,
            },
        ),
    }
    messages
}

impl ChatTemplate {
    /// Compiles the model's template, or falls back to ChatML when there is none.
    pub fn new(source: Option<&str>) -> Result<Self, minijinja::Error> {
        let Some(source) = source else {
            return Ok(Self {
                env: None,
                renders_tools: false,
            });
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
        Ok(Self {
            env: Some(env),
            renders_tools: source.contains("tools"),
        })
    }

    /// True when the model's own template is used.
    pub fn is_custom(&self) -> bool {
        self.env.is_some()
    }

    /// Renders the conversation into the prompt text; `tools` are described to the model when
    /// it may call them.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
        tools: Option<&ToolPlan>,
    ) -> Result<String, ApiError> {
        let mut messages: Vec<TemplateMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| template_message(m, i))
            .collect::<Result<_, ApiError>>()?;
        let template_tools = match tools {
            Some(plan) if self.renders_tools => Some(
                plan.tools
                    .iter()
                    .map(|t| t.definition.clone())
                    .collect::<Vec<_>>(),
            ),
            Some(plan) => {
                messages = with_tools_described(messages, plan);
                None
            }
            None => None,
        };
        let Some(env) = &self.env else {
            let mut out = String::new();
            for m in &messages {
                let mut content = m.content.clone();
                if let Some(calls) = &m.tool_calls {
                    let calls: Vec<String> = calls.iter().map(TemplateToolCall::as_text).collect();
                    if !content.is_empty() {
                        content.push('\n');
                    }
                    content.push_str(&calls.join(CALL_SEPARATOR));
                }
                out.push_str(&format!("<|im_start|>{}\n{content}{IM_END}\n", m.role));
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
                tools => template_tools,
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
            tool_calls: None,
            tool_call_id: None,
        }
    }

    fn conversation_with_a_call() -> Vec<ChatMessage> {
        let call: Vec<crate::openai::types::MessageToolCall> =
            serde_json::from_value(serde_json::json!([{"id": "call_1", "type": "function",
                "function": {"name": "add", "arguments": "{\"a\":1}"}}]))
            .expect("wire call");
        let mut assistant = msg("assistant", "");
        assistant.content = Value::Null;
        assistant.tool_calls = Some(call);
        let mut result = msg("tool", "2");
        result.tool_call_id = Some("call_1".into());
        vec![msg("user", "1+1?"), assistant, result]
    }

    fn plan() -> ToolPlan {
        let tools = serde_json::json!([{"type": "function", "function": {"name": "add"}}]);
        crate::openai::tools::tool_plan(Some(&tools), None, None)
            .expect("valid")
            .expect("auto")
    }

    #[test]
    fn chatml_renders_tools_calls_and_results() {
        let t = ChatTemplate::new(None).expect("chatml");
        let out = t
            .render(&conversation_with_a_call(), true, Some(&plan()))
            .expect("renders");
        assert!(out.starts_with("<|im_start|>system\n# Tools"), "{out}");
        assert!(
            out.contains("{\"type\":\"function\",\"function\":{\"name\":\"add\"}}"),
            "{out}"
        );
        assert!(
            out.contains("<|im_start|>assistant\n<tool_call>\n{\"name\":\"add\",\"arguments\":{\"a\":1}}\n</tool_call><|im_end|>\n<|im_start|>tool\n2<|im_end|>\n<|im_start|>assistant\n"),
            "{out}"
        );
    }

    #[test]
    fn model_template_gets_tools_and_parsed_arguments() {
        let source = "{% for t in tools %}T:{{ t.function.name }};{% endfor %}{% for m in messages %}{{ m.role }}:{% if m.tool_calls %}{% for c in m.tool_calls %}{{ c.function.name }}({{ c.function.arguments.a }}){% endfor %}{% else %}{{ m.content }}{% endif %}{% if m.tool_call_id %}[{{ m.tool_call_id }}]{% endif %};{% endfor %}";
        let t = ChatTemplate::new(Some(source)).expect("compiles");
        let out = t
            .render(&conversation_with_a_call(), false, Some(&plan()))
            .expect("renders");
        assert_eq!(out, "T:add;user:1+1?;assistant:add(1);tool:2[call_1];");
    }

    #[test]
    fn chatml_fallback() {
        let t = ChatTemplate::new(None).expect("chatml");
        let out = t
            .render(&[msg("system", "Be brief."), msg("user", "Hi")], true, None)
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
            t.render(&[msg("user", "  Hi ")], true, None)
                .expect("renders"),
            "[USER] Hi\n[ASSISTANT]"
        );
        let err = t
            .render(&[msg("tool", "x")], true, None)
            .expect_err("raises");
        assert_eq!(err.body().error.param.as_deref(), Some("messages"));
    }
}
