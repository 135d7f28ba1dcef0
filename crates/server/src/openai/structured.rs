//! Output constraints as requested on the wire: OpenAI's `response_format` and vLLM's
//! `structured_outputs`, turned into an [`OutputSpec`] (still data; the engine compiles it).
//!
//! Invariants: `{"type": "text"}`, `null` and an absent field mean "unconstrained"; at most one
//! of the two fields constrains a request; every rejection names the field at fault
//! (`response_format...` or `structured_outputs...`); nothing accepted here is ignored.

use mpt_engine::Constraint;
use mpt_engine::decode::grammar::{lark_regex, with_json_layout};
use serde_json::{Map, Value, json};

use crate::error::ApiError;

/// What the output must be.
#[derive(Debug, Clone, PartialEq)]
pub enum OutputSpec {
    /// One JSON value valid against this schema.
    Json(Value),
    /// A match of this regular expression.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// A match of this llguidance Lark grammar.
    Lark(String),
}

impl OutputSpec {
    /// The engine constraint.
    pub fn to_constraint(&self) -> Constraint {
        match self {
            Self::Json(schema) => Constraint::JsonSchema(schema.to_string()),
            Self::Regex(r) => Constraint::Regex(r.clone()),
            Self::Choice(c) => Constraint::Choice(c.clone()),
            Self::Lark(l) => Constraint::Lark(l.clone()),
        }
    }

    /// The same, as a Lark rule body to embed in a larger grammar.
    pub fn to_lark_rule(&self) -> String {
        match self {
            Self::Json(schema) => format!("%json {}", with_json_layout(schema)),
            Self::Regex(r) => lark_regex(r),
            Self::Choice(c) => c
                .iter()
                .map(|s| Value::String(s.clone()).to_string())
                .collect::<Vec<_>>()
                .join(" | "),
            Self::Lark(l) => format!("%lark {{\n{l}\n}}"),
        }
    }
}

/// The requested constraint and the field it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct RequestedOutput {
    /// What the output must be.
    pub spec: OutputSpec,
    /// `response_format` or `structured_outputs`.
    pub param: &'static str,
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

fn object<'a>(value: &'a Value, param: &str) -> Result<&'a Map<String, Value>, ApiError> {
    value
        .as_object()
        .ok_or_else(|| bad(param, format!("{param} must be an object")))
}

fn only_keys(map: &Map<String, Value>, param: &str, allowed: &[&str]) -> Result<(), ApiError> {
    match map.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(bad(
            &format!("{param}.{k}"),
            format!("{param}.{k} is not supported (expected one of {allowed:?})"),
        )),
        None => Ok(()),
    }
}

/// A JSON schema given as an object, `true`, or (vLLM) a string holding one.
fn schema(value: &Value, param: &str) -> Result<Value, ApiError> {
    let parsed = match value {
        Value::String(text) => serde_json::from_str(text)
            .map_err(|e| bad(param, format!("{param} is not valid JSON: {e}")))?,
        other => other.clone(),
    };
    match parsed {
        Value::Object(_) => Ok(parsed),
        Value::Bool(true) => Ok(json!({})),
        _ => Err(bad(param, format!("{param} must be a JSON schema object"))),
    }
}

/// `response_format`.
fn response_format(value: &Value) -> Result<Option<OutputSpec>, ApiError> {
    const P: &str = "response_format";
    let map = object(value, P)?;
    match map.get("type").and_then(Value::as_str) {
        Some("text") => {
            only_keys(map, P, &["type"])?;
            Ok(None)
        }
        Some("json_object") => {
            only_keys(map, P, &["type"])?;
            Ok(Some(OutputSpec::Json(json!({"type": "object"}))))
        }
        Some("json_schema") => {
            only_keys(map, P, &["type", "json_schema"])?;
            let param = "response_format.json_schema";
            let inner = object(
                map.get("json_schema")
                    .ok_or_else(|| bad(param, format!("{param} is required")))?,
                param,
            )?;
            only_keys(inner, param, &["name", "description", "schema", "strict"])?;
            if let Some(name) = inner.get("name")
                && !name.as_str().is_some_and(valid_name)
            {
                return Err(bad(
                    "response_format.json_schema.name",
                    "response_format.json_schema.name must be 1-64 letters, digits, _ or -",
                ));
            }
            // `strict` false or true: the output follows the schema either way.
            match inner.get("schema") {
                None | Some(Value::Null) => Ok(Some(OutputSpec::Json(json!({})))),
                Some(s) => Ok(Some(OutputSpec::Json(schema(
                    s,
                    "response_format.json_schema.schema",
                )?))),
            }
        }
        _ => Err(bad(
            "response_format.type",
            "response_format.type must be \"text\", \"json_object\" or \"json_schema\"",
        )),
    }
}

/// A function or schema name as OpenAI accepts it.
pub fn valid_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// vLLM's `structured_outputs`.
fn structured_outputs(value: &Value) -> Result<Option<OutputSpec>, ApiError> {
    const P: &str = "structured_outputs";
    let map = object(value, P)?;
    only_keys(
        map,
        P,
        &[
            "json",
            "regex",
            "choice",
            "grammar",
            "json_object",
            "disable_fallback",
            "disable_any_whitespace",
            "disable_additional_properties",
            "whitespace_pattern",
        ],
    )?;
    // Always true here (we never fall back, never emit optional whitespace): either is fine.
    for flag in ["disable_fallback", "disable_any_whitespace"] {
        if map
            .get(flag)
            .is_some_and(|v| !(v.is_null() || v.is_boolean()))
        {
            return Err(bad(
                &format!("{P}.{flag}"),
                format!("{P}.{flag} must be a boolean"),
            ));
        }
    }
    for (flag, default) in [
        ("disable_additional_properties", Value::Bool(false)),
        ("whitespace_pattern", Value::Null),
    ] {
        if let Some(v) = map.get(flag)
            && !v.is_null()
            && *v != default
        {
            return Err(bad(
                &format!("{P}.{flag}"),
                format!("{P}.{flag} is not supported by this server"),
            ));
        }
    }
    let given: Vec<&str> = ["json", "regex", "choice", "grammar", "json_object"]
        .into_iter()
        .filter(|k| {
            map.get(*k)
                .is_some_and(|v| !v.is_null() && *v != Value::Bool(false))
        })
        .collect();
    let key = match given.as_slice() {
        [] => return Ok(None),
        [one] => *one,
        more => {
            return Err(bad(
                P,
                format!(
                    "structured_outputs takes exactly one of json, regex, choice, grammar; got {more:?}"
                ),
            ));
        }
    };
    let param = format!("{P}.{key}");
    let v = &map[key];
    let text = |what: &str| -> Result<String, ApiError> {
        match v.as_str() {
            Some(s) if !s.is_empty() => Ok(s.to_string()),
            _ => Err(bad(&param, format!("{param} must be a non-empty {what}"))),
        }
    };
    Ok(Some(match key {
        "json" => OutputSpec::Json(schema(v, &param)?),
        "json_object" => OutputSpec::Json(json!({"type": "object"})),
        "regex" => OutputSpec::Regex(text("regular expression")?),
        "grammar" => OutputSpec::Lark(text("grammar")?),
        _ => {
            let list: Option<Vec<String>> = v.as_array().and_then(|items| {
                items
                    .iter()
                    .map(|s| s.as_str().filter(|s| !s.is_empty()).map(str::to_string))
                    .collect()
            });
            match list {
                Some(list) if !list.is_empty() => OutputSpec::Choice(list),
                _ => {
                    return Err(bad(
                        &param,
                        format!("{param} must be a non-empty list of non-empty strings"),
                    ));
                }
            }
        }
    }))
}

/// The output constraint of a request, if it asks for one.
pub fn requested_output(
    response_format_field: Option<&Value>,
    structured_outputs_field: Option<&Value>,
) -> Result<Option<RequestedOutput>, ApiError> {
    let from_format = match response_format_field {
        None | Some(Value::Null) => None,
        Some(v) => response_format(v)?,
    };
    let from_structured = match structured_outputs_field {
        None | Some(Value::Null) => None,
        Some(v) => structured_outputs(v)?,
    };
    match (from_format, from_structured) {
        (Some(_), Some(_)) => Err(bad(
            "structured_outputs",
            "give either response_format or structured_outputs, not both",
        )),
        (Some(spec), None) => Ok(Some(RequestedOutput {
            spec,
            param: "response_format",
        })),
        (None, Some(spec)) => Ok(Some(RequestedOutput {
            spec,
            param: "structured_outputs",
        })),
        (None, None) => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param_of(r: Result<Option<RequestedOutput>, ApiError>) -> String {
        r.expect_err("rejected")
            .body()
            .error
            .param
            .unwrap_or_default()
    }

    #[test]
    fn response_format_kinds() {
        assert_eq!(
            requested_output(Some(&json!({"type": "text"})), None),
            Ok(None)
        );
        let got = requested_output(Some(&json!({"type": "json_object"})), None)
            .expect("ok")
            .expect("constrained");
        assert_eq!(got.spec, OutputSpec::Json(json!({"type": "object"})));
        assert_eq!(got.param, "response_format");
        let s = json!({"type": "object", "properties": {"a": {"type": "string"}}});
        let got = requested_output(
            Some(&json!({"type": "json_schema", "json_schema": {"name": "x", "schema": s, "strict": true}})),
            None,
        )
        .expect("ok")
        .expect("constrained");
        assert_eq!(got.spec, OutputSpec::Json(s));
        assert_eq!(
            param_of(requested_output(Some(&json!({"type": "yaml"})), None)),
            "response_format.type"
        );
        assert_eq!(
            param_of(requested_output(
                Some(&json!({"type": "json_schema", "json_schema": {"schema": 3}})),
                None
            )),
            "response_format.json_schema.schema"
        );
    }

    #[test]
    fn structured_outputs_exactly_one() {
        let got = requested_output(None, Some(&json!({"choice": ["a", "b"]})))
            .expect("ok")
            .expect("constrained");
        assert_eq!(got.spec, OutputSpec::Choice(vec!["a".into(), "b".into()]));
        let got = requested_output(None, Some(&json!({"json": "{\"type\":\"integer\"}"})))
            .expect("ok")
            .expect("constrained");
        assert_eq!(got.spec, OutputSpec::Json(json!({"type": "integer"})));
        assert_eq!(
            param_of(requested_output(
                None,
                Some(&json!({"regex": "a", "grammar": "b"}))
            )),
            "structured_outputs"
        );
        assert_eq!(
            param_of(requested_output(None, Some(&json!({"choice": []})))),
            "structured_outputs.choice"
        );
        assert_eq!(
            param_of(requested_output(None, Some(&json!({"regexp": "a"})))),
            "structured_outputs.regexp"
        );
        assert_eq!(
            param_of(requested_output(
                Some(&json!({"type": "json_object"})),
                Some(&json!({"regex": "a"}))
            )),
            "structured_outputs"
        );
    }
}
