//! Black-box tests of structured outputs on the demo model: every output is checked against
//! its schema by a JSON Schema validator (the `jsonschema` crate), regex / choice / grammar
//! outputs by hand; bad or hostile grammars are 400s naming the field; unknown request fields
//! are refused unless the server allows them.

mod common;

use common::*;
use serde_json::{Value, json};

fn assert_valid(schema: &Value, output: &str) -> Value {
    let value: Value = serde_json::from_str(output)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {output:?} for {schema}"));
    let validator = jsonschema::validator_for(schema).expect("the test's schema is valid");
    let errors: Vec<String> = validator
        .iter_errors(&value)
        .map(|e| e.to_string())
        .collect();
    assert!(errors.is_empty(), "{output} breaks {schema}: {errors:?}");
    value
}

fn schemas() -> Vec<(&'static str, Value)> {
    vec![
        (
            "nested objects",
            json!({"type": "object", "properties": {
                "person": {"type": "object", "properties": {
                    "name": {"type": "string", "maxLength": 12},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120}},
                    "required": ["name", "age"], "additionalProperties": false}},
                "required": ["person"], "additionalProperties": false}),
        ),
        (
            "array with minItems and maxItems",
            json!({"type": "object", "properties": {
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 6},
                         "minItems": 2, "maxItems": 3}},
                "required": ["tags"], "additionalProperties": false}),
        ),
        (
            "enum and const",
            json!({"type": "object", "properties": {
                "colour": {"enum": ["red", "green", "blue"]},
                "version": {"const": 2}},
                "required": ["colour", "version"], "additionalProperties": false}),
        ),
        (
            "anyOf",
            json!({"type": "object", "properties": {
                "value": {"anyOf": [{"type": "integer", "minimum": 1, "maximum": 9},
                                    {"type": "boolean"}]}},
                "required": ["value"], "additionalProperties": false}),
        ),
        (
            "$ref and $defs",
            json!({"$defs": {"point": {"type": "object", "properties": {
                    "x": {"type": "integer", "minimum": -5, "maximum": 5},
                    "y": {"type": "integer", "minimum": -5, "maximum": 5}},
                    "required": ["x", "y"], "additionalProperties": false}},
                "type": "object",
                "properties": {"from": {"$ref": "#/$defs/point"}, "to": {"$ref": "#/$defs/point"}},
                "required": ["from", "to"], "additionalProperties": false}),
        ),
        (
            "string pattern and maxLength",
            json!({"type": "object", "properties": {
                "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
                "note": {"type": "string", "maxLength": 8}},
                "required": ["code", "note"], "additionalProperties": false}),
        ),
        (
            "integer ranges",
            json!({"type": "object", "properties": {
                "n": {"type": "integer", "minimum": 10, "maximum": 20},
                "m": {"type": "integer", "exclusiveMinimum": 0, "exclusiveMaximum": 4}},
                "required": ["n", "m"], "additionalProperties": false}),
        ),
        (
            "required with an optional property, no additional ones",
            json!({"type": "object", "properties": {
                "a": {"type": "boolean"}, "b": {"enum": [1, 2, 3]}},
                "required": ["a"], "additionalProperties": false}),
        ),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_schema_feature_gives_valid_json_on_both_endpoints() {
    let server = start(|_| {}).await;
    for (i, (what, schema)) in schemas().into_iter().enumerate() {
        // Chat with OpenAI's response_format, sampled with a seed.
        let body = json!({"model": MODEL, "max_tokens": 200, "temperature": 0.8, "seed": i,
            "messages": [{"role": "user", "content": format!("Give me {what} as JSON.")}],
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "answer", "schema": schema, "strict": true}}});
        let (status, v) = post(&server, "/v1/chat/completions", body).await;
        assert_eq!(status, 200, "{what}: {v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{what}: {v}");
        let content = v["choices"][0]["message"]["content"]
            .as_str()
            .expect("content");
        assert_valid(&schema, content);
        // Completions with vLLM's structured_outputs, greedy.
        let body = json!({"model": MODEL, "prompt": "KING.\nSpeak:", "max_tokens": 200,
                          "temperature": 0, "structured_outputs": {"json": schema}});
        let (status, v) = post(&server, "/v1/completions", body).await;
        assert_eq!(status, 200, "{what}: {v}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{what}: {v}");
        assert_valid(&schema, v["choices"][0]["text"].as_str().expect("text"));
    }
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn regex_choice_grammar_and_json_object() {
    let server = start(|_| {}).await;
    let completion = |constraint: Value| {
        json!({"model": MODEL, "prompt": "HAMLET.\n", "max_tokens": 60, "temperature": 0.9,
               "seed": 3, "structured_outputs": constraint})
    };
    let (status, v) = post(
        &server,
        "/v1/completions",
        completion(json!({"regex": "[0-9]{3}-[a-z]{2,4}"})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().expect("text");
    let (digits, letters) = text.split_once('-').expect("a dash");
    assert!(
        digits.len() == 3 && digits.bytes().all(|b| b.is_ascii_digit()),
        "{text}"
    );
    assert!(
        (2..=4).contains(&letters.len()) && letters.bytes().all(|b| b.is_ascii_lowercase()),
        "{text}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");

    let names = ["Romeo", "Juliet", "Mercutio"];
    let body = json!({"model": MODEL, "max_tokens": 20, "n": 3, "temperature": 1.2, "seed": 5,
        "messages": [{"role": "user", "content": "Who?"}],
        "structured_outputs": {"choice": names}});
    let (status, v) = post(&server, "/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{v}");
    for c in v["choices"].as_array().expect("choices") {
        let text = c["message"]["content"].as_str().expect("content");
        assert!(names.contains(&text), "{text:?}");
        assert_eq!(c["finish_reason"], "stop");
    }

    let lark = "start: \"Hark, \" NAME \"!\"\nNAME: /[A-Z][a-z]{2,8}/\n";
    let (status, v) = post(
        &server,
        "/v1/completions",
        completion(json!({"grammar": lark})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().expect("text");
    let name = text
        .strip_prefix("Hark, ")
        .and_then(|t| t.strip_suffix('!'))
        .unwrap_or_else(|| panic!("{text:?}"));
    assert!((3..=9).contains(&name.len()), "{text:?}");
    assert!(
        name.starts_with(|c: char| c.is_ascii_uppercase()),
        "{text:?}"
    );

    let body = json!({"model": MODEL, "max_tokens": 300, "temperature": 0,
        "messages": [{"role": "user", "content": "JSON please"}],
        "response_format": {"type": "json_object"}});
    let (status, v) = post(&server, "/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{v}");
    if v["choices"][0]["finish_reason"] == "stop" {
        let content = v["choices"][0]["message"]["content"]
            .as_str()
            .expect("content");
        assert_valid(&json!({"type": "object"}), content);
    } else {
        assert_eq!(v["choices"][0]["finish_reason"], "length", "{v}");
        let content = v["choices"][0]["message"]["content"]
            .as_str()
            .expect("content");
        assert!(content.starts_with('{'), "{content}");
    }
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn n_streaming_logprobs_echo_and_length_under_a_schema() {
    let server = start(|_| {}).await;
    let schema = &schemas()[1].1;
    let body = json!({"model": MODEL, "max_tokens": 200, "n": 3, "temperature": 1.0, "seed": 11,
        "logprobs": true, "top_logprobs": 2,
        "messages": [{"role": "user", "content": "Tags?"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "t", "schema": schema}}});
    let (status, v) = post(&server, "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{v}");
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 3);
    let mut plain = Vec::new();
    for c in choices {
        let content = c["message"]["content"].as_str().expect("content");
        assert_valid(schema, content);
        assert!(
            !c["logprobs"]["content"]
                .as_array()
                .expect("logprobs")
                .is_empty()
        );
        plain.push(content.to_string());
    }
    // Streamed with the same seed: the same three answers, reassembled from deltas.
    let mut streamed = body;
    streamed["stream"] = json!(true);
    let chunks = stream_chunks(&server, "/v1/chat/completions", streamed).await;
    assert_eq!(
        joined_text(&chunks, |c| c["delta"]["content"].as_str()),
        plain
    );

    // echo: the prompt, then the constrained completion.
    let body = json!({"model": MODEL, "prompt": "ROMEO.\n", "max_tokens": 200, "echo": true,
        "temperature": 0, "structured_outputs": {"json": schema}});
    let (status, v) = post(&server, "/v1/completions", body).await;
    assert_eq!(status, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().expect("text");
    assert_valid(
        schema,
        text.strip_prefix("ROMEO.\n").expect("echoed prompt"),
    );

    // Cut short before the value is complete: length, and a prefix of valid JSON.
    let body = json!({"model": MODEL, "prompt": "ROMEO.\n", "max_tokens": 3,
        "structured_outputs": {"json": schema}});
    let (status, v) = post(&server, "/v1/completions", body).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert!(
        v["choices"][0]["text"]
            .as_str()
            .expect("text")
            .starts_with("{\"tags\""),
        "{v}"
    );
    wait_idle(&server).await;
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_and_hostile_grammars_are_400s_naming_the_field() {
    let server = start(|_| {}).await;
    let chat = |extra: Value| {
        let mut body = json!({"model": MODEL, "max_tokens": 5,
                              "messages": [{"role": "user", "content": "x"}]});
        for (k, v) in extra.as_object().expect("object") {
            body[k] = v.clone();
        }
        body
    };
    let cases = [
        (
            json!({"response_format": {"type": "json_schema", "json_schema": {"name": "x",
                "schema": {"type": "object", "properties": {"a": {"$ref": "#/$defs/nowhere"}}}}}}),
            "response_format",
        ),
        (
            json!({"response_format": {"type": "xml"}}),
            "response_format.type",
        ),
        (
            json!({"structured_outputs": {"regex": "(unclosed"}}),
            "structured_outputs",
        ),
        (
            json!({"structured_outputs": {"grammar": "start: missing_rule"}}),
            "structured_outputs",
        ),
        (
            json!({"structured_outputs": {"choice": []}}),
            "structured_outputs.choice",
        ),
        (
            json!({"tools": [{"type": "function", "function": {"name": "f",
                "parameters": {"type": "object", "properties": {"a": {"$ref": "#/nope"}}}}}],
                "tool_choice": "required"}),
            "tools",
        ),
    ];
    for (extra, param) in cases {
        let (status, v) = post(&server, "/v1/chat/completions", chat(extra.clone())).await;
        assert_error(status, &v, 400, Some(param));
        assert_eq!(v["error"]["type"], "invalid_request_error", "{extra}: {v}");
    }
    // A 3 MB enum: the grammar engine's size limit refuses it instead of building it.
    let values: Vec<String> = (0..200_000).map(|i| format!("v{i}x{}", i * 7919)).collect();
    let hostile = json!({"model": MODEL, "prompt": "x", "max_tokens": 5,
                         "response_format": {"type": "json_schema",
                                             "json_schema": {"name": "h", "schema": {"enum": values}}}});
    let (status, v) = post(&server, "/v1/completions", hostile).await;
    assert_error(status, &v, 400, Some("response_format"));
    // The server still serves.
    assert_serves(&server).await;
    server.shutdown().await.expect("clean shutdown");
}

/// A grammar that compiles but that the grammar engine cannot follow past its first token
/// (3000 alternatives in one row; its limit is 2000) fails the request as the client's error:
/// a 400, or an `invalid_request_error` event then `[DONE]` in a stream, never a 500.
#[tokio::test]
async fn a_grammar_beyond_the_engines_limits_mid_generation_is_the_clients_error() {
    let server = start(|_| {}).await;
    let alternatives: Vec<Value> = (0..3000)
        .map(|i| {
            json!({"type": "object", "properties": {format!("k{i}"): {"type": "string"}},
                        "required": [format!("k{i}")]})
        })
        .collect();
    let body = json!({"model": MODEL, "prompt": "x", "max_tokens": 20,
                      "response_format": {"type": "json_schema",
                                          "json_schema": {"name": "wide",
                                                          "schema": {"anyOf": alternatives}}}});
    let (status, v) = post(&server, "/v1/completions", body.clone()).await;
    assert_error(status, &v, 400, None);
    let message = v["error"]["message"].as_str().expect("message");
    assert!(message.starts_with("structured output: "), "{v}");
    assert!(message.contains("max is 2000"), "{v}");

    let mut streamed = body;
    streamed["stream"] = json!(true);
    let response = client()
        .post(url(&server, "/v1/completions"))
        .json(&streamed)
        .send()
        .await
        .expect("sent");
    assert_eq!(response.status(), 200);
    let data = sse_data(response).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    let event: Value = serde_json::from_str(&data[data.len() - 2]).expect("an error event");
    assert_eq!(event["error"]["type"], "invalid_request_error", "{event}");
    // Nothing is left behind: the KV cache is empty again and the server serves.
    wait_idle(&server).await;
    assert_serves(&server).await;
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_fields_are_refused_unless_allowed() {
    let strict = start(|_| {}).await;
    let typo = json!({"model": MODEL, "prompt": "Hello", "max_token": 4});
    let (status, v) = post(&strict, "/v1/completions", typo.clone()).await;
    assert_error(status, &v, 400, Some("max_token"));
    assert_eq!(
        v["error"]["message"],
        "Unrecognized request argument supplied: max_token"
    );
    // OpenAI fields that change nothing here, and null defaults, are accepted.
    let chat = json!({"model": MODEL, "max_tokens": 2, "store": false, "metadata": {"k": "v"},
        "service_tier": "auto", "user": "u1", "audio": null, "modalities": ["text"],
        "messages": [{"role": "user", "content": "Hi"}]});
    let (status, v) = post(&strict, "/v1/chat/completions", chat).await;
    assert_eq!(status, 200, "{v}");
    // One whose being ignored would change the answer is refused, naming it.
    let audio = json!({"model": MODEL, "modalities": ["text", "audio"],
        "messages": [{"role": "user", "content": "Hi"}]});
    let (status, v) = post(&strict, "/v1/chat/completions", audio).await;
    assert_error(status, &v, 400, Some("modalities"));
    strict.shutdown().await.expect("clean shutdown");

    let lenient = start(|c| c.allow_unknown_fields = true).await;
    let (status, v) = post(&lenient, "/v1/completions", typo).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v["usage"]["completion_tokens"], 16,
        "max_token was ignored: default 16"
    );
    lenient.shutdown().await.expect("clean shutdown");
}
