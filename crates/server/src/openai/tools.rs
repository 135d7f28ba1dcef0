//! Chat tools: `tools` / `tool_choice` / `parallel_tool_calls` validated into a [`ToolPlan`],
//! the default text that describes the tools in the prompt, and the grammar that makes every
//! call the model starts a valid one.
//!
//! The call syntax (also what the default prompt text teaches, and what
//! [`super::tool_calls`] parses back out):
//!
//! ```text
//! <tool_call>
//! {"name":"get_weather","arguments":{"city":"Paris"}}
//! </tool_call>
//! ```
//!
//! with several calls separated by a newline when `parallel_tool_calls` is true (the default).
//! Invariants: `required` and a named function force at least one call (the named one) whose
//! `arguments` are valid against the function's `parameters`; `auto` allows either an answer
//! in text (containing no `<tool_call>`; or the `response_format` output) or calls from the
//! first character on; `none` (or no tools) constrains nothing and renders no tools.

use serde_json::{Value, json};

use crate::error::ApiError;
use crate::openai::structured::{OutputSpec, valid_name};
use mpt_engine::decode::grammar::with_json_layout;

/// Opens a call in the generated text.
pub const CALL_OPEN: &str = "<tool_call>\n";
/// Closes a call.
pub const CALL_CLOSE: &str = "\n</tool_call>";
/// Between two calls.
pub const CALL_SEPARATOR: &str = "\n";

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct FunctionTool {
    /// Its name.
    pub name: String,
    /// The JSON schema of its arguments.
    pub parameters: Value,
    /// The tool object as the client sent it (for chat templates).
    pub definition: Value,
}

/// How the model must use the tools.
#[derive(Debug, Clone, PartialEq)]
pub enum ToolMode {
    /// Text or calls, the model's choice.
    Auto,
    /// At least one call.
    Required,
    /// Exactly this function (once).
    Named(String),
}

/// Validated tools of a chat request.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolPlan {
    /// The functions.
    pub tools: Vec<FunctionTool>,
    /// `auto`, `required` or a named function.
    pub mode: ToolMode,
    /// More than one call per answer.
    pub parallel: bool,
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

fn function_tool(i: usize, tool: &Value) -> Result<FunctionTool, ApiError> {
    let p = format!("tools[{i}]");
    let map = tool
        .as_object()
        .ok_or_else(|| bad(&p, format!("{p} must be an object")))?;
    if map.get("type").and_then(Value::as_str) != Some("function") {
        return Err(bad(
            &format!("{p}.type"),
            format!("{p}.type must be \"function\" (the only tool type supported)"),
        ));
    }
    if let Some(k) = map
        .keys()
        .find(|k| !["type", "function"].contains(&k.as_str()))
    {
        return Err(bad(
            &format!("{p}.{k}"),
            format!("{p}.{k} is not supported"),
        ));
    }
    let fp = format!("{p}.function");
    let f = map
        .get("function")
        .and_then(Value::as_object)
        .ok_or_else(|| bad(&fp, format!("{fp} must be an object")))?;
    if let Some(k) = f
        .keys()
        .find(|k| !["name", "description", "parameters", "strict"].contains(&k.as_str()))
    {
        return Err(bad(
            &format!("{fp}.{k}"),
            format!("{fp}.{k} is not supported"),
        ));
    }
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| valid_name(n))
        .ok_or_else(|| {
            bad(
                &format!("{fp}.name"),
                format!("{fp}.name must be 1-64 letters, digits, _ or -"),
            )
        })?;
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(Value::Object(schema)) if schema.get("type").is_none_or(|t| t == "object") => {
            let mut schema = schema.clone();
            schema.insert("type".into(), json!("object"));
            Value::Object(schema)
        }
        Some(_) => {
            return Err(bad(
                &format!("{fp}.parameters"),
                format!("{fp}.parameters must be a JSON schema of an object"),
            ));
        }
    };
    if f.get("description")
        .is_some_and(|d| !(d.is_null() || d.is_string()))
    {
        return Err(bad(
            &format!("{fp}.description"),
            format!("{fp}.description must be a string"),
        ));
    }
    Ok(FunctionTool {
        name: name.to_string(),
        parameters,
        definition: tool.clone(),
    })
}

/// Validates `tools`, `tool_choice` and `parallel_tool_calls`; `None` when nothing is to be
/// called (no tools, or `tool_choice: "none"`).
pub fn tool_plan(
    tools: Option<&Value>,
    tool_choice: Option<&Value>,
    parallel: Option<bool>,
) -> Result<Option<ToolPlan>, ApiError> {
    let list = match tools {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, t)| function_tool(i, t))
            .collect::<Result<Vec<_>, _>>()?,
        Some(_) => return Err(bad("tools", "tools must be a list of function tools")),
    };
    for (i, t) in list.iter().enumerate() {
        if list[..i].iter().any(|o| o.name == t.name) {
            return Err(bad(
                &format!("tools[{i}].function.name"),
                format!("two tools are named {:?}", t.name),
            ));
        }
    }
    let choice_error = || {
        bad(
            "tool_choice",
            "tool_choice must be \"none\", \"auto\", \"required\" or {\"type\": \"function\", \"function\": {\"name\": ...}}",
        )
    };
    let mode = match tool_choice {
        None | Some(Value::Null) => (!list.is_empty()).then_some(ToolMode::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "none" => None,
            "auto" => (!list.is_empty()).then_some(ToolMode::Auto),
            "required" => Some(ToolMode::Required),
            _ => return Err(choice_error()),
        },
        Some(Value::Object(o)) => {
            if o.get("type").and_then(Value::as_str) != Some("function") {
                return Err(choice_error());
            }
            let name = o
                .get("function")
                .and_then(|f| f.get("name"))
                .and_then(Value::as_str)
                .ok_or_else(choice_error)?;
            if !list.iter().any(|t| t.name == name) {
                return Err(bad(
                    "tool_choice",
                    format!("tool_choice names {name:?}, which is not in tools"),
                ));
            }
            Some(ToolMode::Named(name.to_string()))
        }
        Some(_) => return Err(choice_error()),
    };
    let Some(mode) = mode else {
        return Ok(None);
    };
    if list.is_empty() {
        return Err(bad(
            "tool_choice",
            "tool_choice requires a non-empty tools list",
        ));
    }
    Ok(Some(ToolPlan {
        tools: list,
        parallel: parallel.unwrap_or(true) && !matches!(mode, ToolMode::Named(_)),
        mode,
    }))
}

impl ToolPlan {
    /// The tools a call may use in this mode.
    fn callable(&self) -> Vec<&FunctionTool> {
        match &self.mode {
            ToolMode::Named(name) => self.tools.iter().filter(|t| &t.name == name).collect(),
            _ => self.tools.iter().collect(),
        }
    }

    /// The schema of one call's JSON body: `{"name": <const>, "arguments": <parameters>}`.
    fn call_schema(&self) -> Value {
        let alternatives: Vec<Value> = self
            .callable()
            .into_iter()
            .map(|t| {
                json!({
                    "type": "object",
                    "properties": {
                        "name": {"const": t.name},
                        "arguments": t.parameters,
                    },
                    "required": ["name", "arguments"],
                    "additionalProperties": false,
                })
            })
            .collect();
        match <[Value; 1]>::try_from(alternatives) {
            Ok([one]) => one,
            Err(many) => json!({ "anyOf": many }),
        }
    }

    /// The Lark grammar of the assistant's answer; `text` constrains the text answer of
    /// `auto` (from `response_format`), free text (without `<tool_call>`) otherwise.
    pub fn grammar(&self, text: Option<&OutputSpec>) -> String {
        let q = |s: &str| Value::String(s.to_string()).to_string();
        let calls = if self.parallel {
            format!("calls: call ({} call)*", q(CALL_SEPARATOR))
        } else {
            "calls: call".to_string()
        };
        let mut lark = format!(
            "{calls}\ncall: {} body {}\nbody: %json {}\n",
            q(CALL_OPEN),
            q(CALL_CLOSE),
            with_json_layout(&self.call_schema()),
        );
        match (&self.mode, text) {
            (ToolMode::Auto, Some(spec)) => {
                lark.push_str(&format!(
                    "start: answer | calls\nanswer: {}\n",
                    spec.to_lark_rule()
                ));
            }
            (ToolMode::Auto, None) => {
                lark.push_str(&format!(
                    "start: TEXT | calls\nTEXT: /(?s:.+)/ & ~/(?s:.*{}.*)/\n",
                    CALL_OPEN.trim_end().replace('/', "\\/"),
                ));
            }
            _ => lark.push_str("start: calls\n"),
        }
        lark
    }

    /// The default prompt text describing the tools and the call syntax (used when the chat
    /// template does not render `tools` itself).
    pub fn prompt_text(&self) -> String {
        let mut out = String::from(
            "# Tools\n\nYou can call the following functions. Each line is one function, with \
             the JSON schema of its arguments:\n",
        );
        for t in &self.tools {
            out.push_str(&t.definition.to_string());
            out.push('\n');
        }
        out.push_str(&format!(
            "\nTo call a function, answer with its name and arguments as JSON, like this:\n\
             {CALL_OPEN}{{\"name\":\"FUNCTION\",\"arguments\":{{...}}}}{CALL_CLOSE}\n"
        ));
        if self.parallel {
            out.push_str("Several calls go one after the other, each on its own lines.\n");
        }
        out
    }
}

#[cfg(test)]
#[path = "tools_tests.rs"]
mod tests;
