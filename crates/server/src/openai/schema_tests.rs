//! The numeric ranges the request schemas document are the ones validation enforces: each
//! bound is accepted and the value just past it is refused, naming the field.

use serde_json::{Map, Value, json};
use utoipa::PartialSchema;

use crate::error::{ApiError, CONTEXT_LENGTH_EXCEEDED};
use crate::openai::types::{ChatCompletionRequest, CompletionRequest};
use crate::openai::validation::{ValidationContext, validate_chat, validate_completion};
use mpt_engine::Tokenizer;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_bytes(mpt_engine::model::demo::TOKENIZER_JSON).expect("demo tokenizer")
}

fn ctx(t: &Tokenizer) -> ValidationContext<'_> {
    ValidationContext {
        model_name: "m",
        max_model_len: 64,
        vocab_size: 50432,
        tokenizer: t,
        chat_stop_token: None,
    }
}

/// A range refusal of `field` (a context-length error is not one: it is about the sum).
fn refused_for(result: Result<(), ApiError>, field: &str) -> bool {
    match result {
        Ok(()) => false,
        Err(e) => {
            let body = e.body().error;
            body.param.as_deref() == Some(field)
                && body.code.as_deref() != Some(CONTEXT_LENGTH_EXCEEDED)
        }
    }
}

/// (field, value at a bound, value past it) for every bound in `schema`'s properties.
fn bounds(schema: &Value) -> Vec<(String, Value, Value)> {
    let mut out = Vec::new();
    for (field, property) in schema["properties"].as_object().expect("properties") {
        let integer = property["type"]
            .as_array()
            .is_some_and(|t| t.contains(&json!("integer")));
        let step = if integer { 1.0 } else { 0.5 };
        let value = |x: f64| {
            if integer { json!(x as i64) } else { json!(x) }
        };
        if let Some(lo) = property["minimum"].as_f64() {
            out.push((field.clone(), value(lo), value(lo - step)));
        }
        if let Some(hi) = property["maximum"].as_f64() {
            out.push((field.clone(), value(hi), value(hi + step)));
        }
        if let Some(lo) = property["exclusiveMinimum"].as_f64() {
            out.push((field.clone(), value(lo + 1e-3), value(lo)));
        }
        if let Some(hi) = property["exclusiveMaximum"].as_f64() {
            out.push((field.clone(), value(hi - 1e-3), value(hi)));
        }
    }
    out
}

fn with(base: &Value, field: &str, value: &Value) -> Value {
    let mut body: Map<String, Value> = base.as_object().expect("object").clone();
    body.insert(field.to_string(), value.clone());
    Value::Object(body)
}

fn check(schema: Value, base: Value, validate: impl Fn(&Value) -> Result<(), ApiError>) {
    let cases = bounds(&schema);
    assert!(cases.len() >= 15, "too few bounds found: {cases:?}");
    for (field, inside, outside) in cases {
        assert!(
            !refused_for(validate(&with(&base, &field, &inside)), &field),
            "{field} = {inside} is documented as valid"
        );
        assert!(
            refused_for(validate(&with(&base, &field, &outside)), &field),
            "{field} = {outside} is documented as invalid"
        );
    }
}

#[test]
fn completion_ranges_are_the_validated_ones() {
    let t = tokenizer();
    let schema = serde_json::to_value(CompletionRequest::schema()).expect("schema");
    check(schema, json!({"prompt": "hi", "max_tokens": 4}), |body| {
        let req: CompletionRequest = serde_json::from_value(body.clone()).expect("wire");
        validate_completion(&req, &ctx(&t), "x").map(|_| ())
    });
}

#[test]
fn chat_ranges_are_the_validated_ones() {
    let t = tokenizer();
    let schema = serde_json::to_value(ChatCompletionRequest::schema()).expect("schema");
    let base = json!({"messages": [{"role": "user", "content": "hi"}], "logprobs": true,
                      "max_tokens": 4});
    check(schema, base, |body| {
        let req: ChatCompletionRequest = serde_json::from_value(body.clone()).expect("wire");
        validate_chat(&req, &ctx(&t), "x", "hi", None).map(|_| ())
    });
}
