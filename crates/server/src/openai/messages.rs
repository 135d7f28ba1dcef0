//! Chat `messages` as the wire sends them: their text, and the checks every conversation passes
//! before it is rendered (known roles, text content, tool results naming their call).
//!
//! Invariants: every rejection is a 400 whose `param` names the message and field at fault.

use serde_json::Value;

use crate::error::ApiError;
use crate::openai::types::ChatMessage;

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

/// Text of a message's `content`: a string, or the concatenated `text` parts of a list.
pub fn message_text(message: &ChatMessage, index: usize) -> Result<String, ApiError> {
    let param = format!("messages[{index}].content");
    match &message.content {
        Value::String(s) => Ok(s.clone()),
        Value::Null => Ok(String::new()),
        Value::Array(parts) => {
            let mut out = String::new();
            for part in parts {
                match (
                    part.get("type").and_then(Value::as_str),
                    part.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(text)) => out.push_str(text),
                    _ => {
                        return Err(bad(
                            &param,
                            format!(
                                "{param}: only text parts ({{\"type\": \"text\", \"text\": ...}}) are supported"
                            ),
                        ));
                    }
                }
            }
            Ok(out)
        }
        _ => Err(bad(
            &param,
            format!("{param} must be a string or a list of text parts"),
        )),
    }
}

/// Checks `messages` (non-empty, known roles, text content).
pub fn check_messages(messages: Option<&Vec<ChatMessage>>) -> Result<&Vec<ChatMessage>, ApiError> {
    let messages = messages.ok_or_else(|| bad("messages", "messages is required"))?;
    if messages.is_empty() {
        return Err(bad("messages", "messages must not be empty"));
    }
    for (i, m) in messages.iter().enumerate() {
        if !matches!(
            m.role.as_str(),
            "system" | "user" | "assistant" | "tool" | "developer"
        ) {
            return Err(bad(
                &format!("messages[{i}].role"),
                format!("unknown role {:?}", m.role),
            ));
        }
        if m.role == "tool" && m.tool_call_id.as_deref().is_none_or(str::is_empty) {
            return Err(bad(
                &format!("messages[{i}].tool_call_id"),
                "a tool message needs the tool_call_id of the call it answers",
            ));
        }
        if m.tool_calls.is_some() && m.role != "assistant" {
            return Err(bad(
                &format!("messages[{i}].tool_calls"),
                "only assistant messages carry tool_calls",
            ));
        }
        message_text(m, i)?;
    }
    Ok(messages)
}
