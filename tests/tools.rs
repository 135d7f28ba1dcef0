//! Black-box tests of chat tool calls on the demo model: `required` and a named function force
//! valid calls in OpenAI's shape, `auto` answers in text or with a valid call, streamed deltas
//! reassemble to the same calls, and conversations carrying calls and results render.

mod common;

use common::*;
use serde_json::{Value, json};

fn weather_params() -> Value {
    json!({"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": false})
}

fn add_params() -> Value {
    json!({"type": "object", "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "b": {"type": "integer", "minimum": 0, "maximum": 99}},
        "required": ["a", "b"], "additionalProperties": false})
}

fn tools() -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather",
            "description": "Current weather in a city", "parameters": weather_params()}},
        {"type": "function", "function": {"name": "add", "parameters": add_params(),
            "strict": true}}
    ])
}

fn body(tool_choice: Value, extra: Value) -> Value {
    let mut b = json!({"model": MODEL, "max_tokens": 120, "temperature": 0.8, "seed": 4,
        "messages": [{"role": "user", "content": "What is the weather in Verona?"}],
        "tools": tools(), "tool_choice": tool_choice});
    for (k, v) in extra.as_object().expect("object") {
        b[k] = v.clone();
    }
    b
}

/// Checks a response's tool calls against the tools' schemas; returns (name, arguments).
fn checked_calls(message: &Value) -> Vec<(String, String)> {
    let calls = message["tool_calls"].as_array().expect("tool_calls");
    let mut ids = std::collections::HashSet::new();
    calls
        .iter()
        .map(|c| {
            let id = c["id"].as_str().expect("id");
            assert!(id.starts_with("call_") && ids.insert(id.to_string()), "{c}");
            assert_eq!(c["type"], "function");
            let name = c["function"]["name"].as_str().expect("name").to_string();
            let arguments = c["function"]["arguments"].as_str().expect("a JSON string");
            let schema = match name.as_str() {
                "get_weather" => weather_params(),
                "add" => add_params(),
                other => panic!("unknown tool {other}"),
            };
            let value: Value = serde_json::from_str(arguments).expect("arguments are JSON");
            let validator = jsonschema::validator_for(&schema).expect("schema");
            assert!(validator.is_valid(&value), "{arguments} breaks {schema}");
            (name, arguments.to_string())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_and_named_force_valid_calls() {
    let server = start(|_| {}).await;
    let one = json!({"parallel_tool_calls": false});
    let (status, v) = post(
        &server,
        "/v1/chat/completions",
        body(json!("required"), one),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    assert!(choice["message"]["content"].is_null(), "{v}");
    assert_eq!(checked_calls(&choice["message"]).len(), 1);

    // Parallel calls (the default): the demo model keeps calling until max_tokens; every call
    // but a cut-short last one is complete and valid.
    let (status, v) = post(
        &server,
        "/v1/chat/completions",
        body(json!("required"), json!({})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    let calls = choice["message"]["tool_calls"]
        .as_array()
        .expect("calls")
        .clone();
    let complete = if choice["finish_reason"] == "length" {
        calls.len() - 1
    } else {
        assert_eq!(choice["finish_reason"], "tool_calls");
        calls.len()
    };
    assert!(complete >= 1, "{v}");
    assert!(choice["message"]["content"].is_null(), "{v}");
    checked_calls(&json!({"tool_calls": calls[..complete]}));

    let named = json!({"type": "function", "function": {"name": "add"}});
    for seed in 0..3 {
        let (status, v) = post(
            &server,
            "/v1/chat/completions",
            body(named.clone(), json!({"seed": seed})),
        )
        .await;
        assert_eq!(status, 200, "{v}");
        let calls = checked_calls(&v["choices"][0]["message"]);
        assert_eq!(calls.len(), 1, "one call of the named function: {v}");
        assert_eq!(calls[0].0, "add");
        assert_eq!(v["choices"][0]["finish_reason"], "tool_calls");
    }

    // parallel_tool_calls false: exactly one call even when required; n = 2 each valid.
    let (status, v) = post(
        &server,
        "/v1/chat/completions",
        body(
            json!("required"),
            json!({"parallel_tool_calls": false, "n": 2}),
        ),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    for c in v["choices"].as_array().expect("choices") {
        assert_eq!(checked_calls(&c["message"]).len(), 1, "{v}");
    }
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_tool_call_deltas_reassemble_to_the_same_calls() {
    let server = start(|_| {}).await;
    let request = body(
        json!("required"),
        json!({"seed": 21, "parallel_tool_calls": false}),
    );
    let (status, v) = post(&server, "/v1/chat/completions", request.clone()).await;
    assert_eq!(status, 200, "{v}");
    let expected = checked_calls(&v["choices"][0]["message"]);
    let mut streamed = request;
    streamed["stream"] = json!(true);
    let chunks = stream_chunks(&server, "/v1/chat/completions", streamed).await;
    let mut calls: Vec<(String, String, String)> = Vec::new();
    let mut finish = None;
    for chunk in &chunks {
        for choice in chunk["choices"].as_array().expect("choices") {
            if let Some(reason) = choice["finish_reason"].as_str() {
                finish = Some(reason.to_string());
            }
            for d in choice["delta"]["tool_calls"]
                .as_array()
                .into_iter()
                .flatten()
            {
                let index = d["index"].as_u64().expect("index") as usize;
                if index == calls.len() {
                    // The first delta of a call carries its id, type and name.
                    assert_eq!(d["type"], "function", "{d}");
                    let id = d["id"].as_str().expect("id").to_string();
                    let name = d["function"]["name"].as_str().expect("name").to_string();
                    calls.push((id, name, String::new()));
                } else {
                    assert!(index < calls.len() && d.get("id").is_none(), "{d}");
                }
                if let Some(piece) = d["function"]["arguments"].as_str() {
                    calls[index].2.push_str(piece);
                }
            }
        }
    }
    assert_eq!(finish.as_deref(), Some("tool_calls"));
    let got: Vec<(String, String)> = calls.into_iter().map(|(_, n, a)| (n, a)).collect();
    assert_eq!(got, expected);
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_answers_in_text_or_with_a_valid_call() {
    let server = start(|_| {}).await;
    // The demo model knows nothing of tools, so it answers in text; the grammar's call branch
    // of `auto` is tested on its own in the server's unit tests (openai/tools_tests.rs).
    let (mut texts, mut called) = (0, 0);
    for seed in 0..4 {
        let request = body(json!("auto"), json!({"seed": seed, "max_tokens": 40}));
        let (status, v) = post(&server, "/v1/chat/completions", request).await;
        assert_eq!(status, 200, "{v}");
        let choice = &v["choices"][0];
        if choice["message"]["tool_calls"].is_array() {
            called += 1;
            if choice["finish_reason"] == "tool_calls" {
                assert!(!checked_calls(&choice["message"]).is_empty());
            }
        } else {
            texts += 1;
            let content = choice["message"]["content"].as_str().expect("content");
            assert!(!content.contains("<tool_call>"), "{content}");
        }
    }
    assert_eq!(texts + called, 4);
    // Without the nudge and with tool_choice none, nothing is parsed or constrained.
    let (status, v) = post(
        &server,
        "/v1/chat/completions",
        body(json!("none"), json!({})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(v["choices"][0]["message"]["tool_calls"].is_null());
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_with_calls_and_results_render() {
    let server = start(|_| {}).await;
    let messages = json!([
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
            "function": {"name": "add", "arguments": "{\"a\":2,\"b\":3}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "5"}
    ]);
    let request = json!({"model": MODEL, "max_tokens": 8, "messages": messages, "tools": tools()});
    let (status, v) = post(&server, "/v1/chat/completions", request).await;
    assert_eq!(status, 200, "{v}");
    let (_, rendered) = post(&server, "/tokenize", json!({"messages": messages})).await;
    assert!(rendered["count"].as_u64().expect("count") > 10);
    let bad = json!({"model": MODEL, "messages": [{"role": "tool", "content": "5"}]});
    let (status, v) = post(&server, "/v1/chat/completions", bad).await;
    assert_error(status, &v, 400, Some("messages[0].tool_call_id"));
    server.shutdown().await.expect("clean shutdown");
}
