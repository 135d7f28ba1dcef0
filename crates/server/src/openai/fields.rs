//! Which top-level request fields are accepted, before a body becomes a wire type.
//!
//! Invariants: a field the wire type declares is always accepted (its value is checked later);
//! an OpenAI field that changes nothing here (`store`, `metadata`, ...) is accepted with any
//! value; an OpenAI field we do not implement is accepted only as `null` or its default and is
//! otherwise a 400 naming it, since ignoring it would change what the client gets; any other
//! field is a 400 "Unrecognized request argument supplied: NAME" (OpenAI's sentence) with
//! `param` the field, unless the server runs with `--allow-unknown-fields`, which logs and
//! ignores it instead.

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde_json::{Map, Value};

use crate::error::ApiError;
use crate::openai::types::{
    ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest,
};

/// How an OpenAI field the server does not implement is treated.
#[derive(Debug, Clone, Copy)]
pub enum Unimplemented {
    /// It changes nothing here (billing, storage, routing hints): any value is accepted.
    NoEffect,
    /// Accepted only when `null` or equal to one of these defaults (JSON text).
    Default(&'static [&'static str]),
}

/// A request body type: its declared fields come from its `Deserialize` derive.
pub trait WireRequest: DeserializeOwned {
    /// OpenAI fields of this endpoint that the type does not declare.
    const UNIMPLEMENTED: &'static [(&'static str, Unimplemented)] = &[];
}

impl WireRequest for CompletionRequest {}

impl WireRequest for ChatCompletionRequest {
    const UNIMPLEMENTED: &'static [(&'static str, Unimplemented)] = &[
        ("store", Unimplemented::NoEffect),
        ("metadata", Unimplemented::NoEffect),
        ("service_tier", Unimplemented::NoEffect),
        ("safety_identifier", Unimplemented::NoEffect),
        ("prompt_cache_key", Unimplemented::NoEffect),
        ("prompt_cache_retention", Unimplemented::NoEffect),
        ("audio", Unimplemented::Default(&[])),
        ("modalities", Unimplemented::Default(&[r#"["text"]"#])),
        ("prediction", Unimplemented::Default(&[])),
        ("reasoning_effort", Unimplemented::Default(&[])),
        ("verbosity", Unimplemented::Default(&[])),
        ("web_search_options", Unimplemented::Default(&[])),
        ("functions", Unimplemented::Default(&["[]"])),
        ("function_call", Unimplemented::Default(&[r#""none""#])),
    ];
}

impl WireRequest for TokenizeRequest {}

impl WireRequest for DetokenizeRequest {}

/// Checks the top-level keys of `body` against `T`'s fields.
pub fn check_fields<T: WireRequest>(
    body: &Map<String, Value>,
    allow_unknown: bool,
) -> Result<(), ApiError> {
    let declared = declared_fields::<T>();
    for (name, value) in body {
        if declared.contains(&name.as_str()) {
            continue;
        }
        match T::UNIMPLEMENTED.iter().find(|(n, _)| n == name) {
            Some((_, Unimplemented::NoEffect)) => {}
            Some((_, Unimplemented::Default(defaults))) => {
                let is_default = value.is_null()
                    || defaults
                        .iter()
                        .any(|d| serde_json::from_str::<Value>(d).is_ok_and(|d| &d == value));
                if !is_default {
                    return Err(ApiError::invalid(
                        name,
                        format!("{name} is not supported by this server"),
                    ));
                }
            }
            None if allow_unknown => {
                tracing::warn!(field = %name, "ignoring an unrecognized request field");
            }
            None => {
                return Err(ApiError::invalid(
                    name,
                    format!("Unrecognized request argument supplied: {name}"),
                ));
            }
        }
    }
    Ok(())
}

/// The wire names of the fields `T`'s derived `Deserialize` reads (serde hands them to
/// `deserialize_struct`; nothing is deserialized).
pub fn declared_fields<T: DeserializeOwned>() -> &'static [&'static str] {
    let mut fields: &'static [&'static str] = &[];
    let _ = T::deserialize(FieldNames(&mut fields));
    fields
}

struct FieldNames<'a>(&'a mut &'static [&'static str]);

impl<'de> Deserializer<'de> for FieldNames<'_> {
    type Error = de::value::Error;

    fn deserialize_any<V: Visitor<'de>>(self, _visitor: V) -> Result<V::Value, Self::Error> {
        Err(de::Error::custom("not a struct"))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _visitor: V,
    ) -> Result<V::Value, Self::Error> {
        *self.0 = fields;
        Err(de::Error::custom("field names read"))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
        option unit unit_struct newtype_struct seq tuple tuple_struct map enum identifier
        ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check<T: WireRequest>(body: Value, allow: bool) -> Result<(), ApiError> {
        check_fields::<T>(body.as_object().expect("object"), allow)
    }

    #[test]
    fn declared_fields_come_from_the_derive() {
        let fields = declared_fields::<ChatCompletionRequest>();
        for f in [
            "messages",
            "max_completion_tokens",
            "tools",
            "structured_outputs",
        ] {
            assert!(fields.contains(&f), "{f} in {fields:?}");
        }
        assert!(declared_fields::<CompletionRequest>().contains(&"prompt"));
    }

    #[test]
    fn unknown_fields_are_refused_unless_allowed() {
        let err = check::<CompletionRequest>(json!({"prompt": "x", "max_token": 5}), false)
            .expect_err("typo");
        let body = err.body();
        assert_eq!(body.error.param.as_deref(), Some("max_token"));
        assert_eq!(
            body.error.message,
            "Unrecognized request argument supplied: max_token"
        );
        assert!(check::<CompletionRequest>(json!({"max_token": 5}), true).is_ok());
        assert!(check::<CompletionRequest>(json!({"top_k": 5, "ignore_eos": true}), false).is_ok());
    }

    #[test]
    fn unimplemented_openai_fields_only_as_null_or_default() {
        let ok = json!({"store": true, "metadata": {"a": "b"}, "service_tier": "auto",
                        "audio": null, "modalities": ["text"], "functions": [],
                        "reasoning_effort": null});
        assert!(check::<ChatCompletionRequest>(ok, false).is_ok());
        for (field, value) in [
            ("modalities", json!(["text", "audio"])),
            ("reasoning_effort", json!("high")),
            ("functions", json!([{"name": "f"}])),
        ] {
            let err = check::<ChatCompletionRequest>(json!({ field: value }), true)
                .expect_err("changes the answer");
            assert_eq!(err.body().error.param.as_deref(), Some(field));
        }
    }
}
