//! Black-box tests of `GET /openapi.json` on the demo server: real responses of every endpoint
//! (plain, streamed, with logprobs and tool calls, and errors) have a documented status and
//! content type and validate against the documented schema; stream events and their JSON
//! `data` validate against the event and chunk schemas; with `--api-key` the 401 does too.

mod common;

use common::*;
use mpt_server::RunningServer;
use serde_json::{Value, json};

/// `s` as one JSON-pointer token.
fn token(s: &str) -> String {
    s.replace('~', "~0").replace('/', "~1")
}

/// Validates `instance` against the schema at `pointer` inside `doc` (so `$ref`s resolve).
fn validate(doc: &Value, pointer: &str, instance: &Value) {
    let mut root = doc.clone();
    root["$ref"] = json!(format!("#{pointer}"));
    let validator = jsonschema::draft202012::new(&root).expect("the document's schemas compile");
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "{instance}\nagainst {pointer}:\n{errors:#?}"
    );
}

/// A response as received.
struct Received {
    status: u16,
    content_type: Option<String>,
    body: String,
}

async fn send(request: reqwest::RequestBuilder) -> Received {
    let response = request.send().await.expect("sent");
    let status = response.status().as_u16();
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().expect("ascii").to_string());
    let body = response.text().await.expect("read");
    Received {
        status,
        content_type,
        body,
    }
}

/// Checks `received` against the operation `method path` of `doc`; returns how many stream
/// events it checked (0 for a plain body).
fn conforms(doc: &Value, method: &str, path: &str, received: &Received) -> usize {
    let response_pointer = format!(
        "/paths/{}/{method}/responses/{}",
        token(path),
        received.status
    );
    let Some(response) = doc.pointer(&response_pointer) else {
        panic!(
            "{method} {path} answered an undocumented {}",
            received.status
        );
    };
    let Some(content_type) = &received.content_type else {
        assert!(
            response.get("content").is_none(),
            "{response_pointer}: no body sent"
        );
        assert!(received.body.is_empty());
        return 0;
    };
    let media = content_type.split(';').next().expect("split").trim();
    let schema_pointer = format!("{response_pointer}/content/{}/schema", token(media));
    let Some(schema) = doc.pointer(&schema_pointer) else {
        panic!(
            "{method} {path} {} sent undocumented {media}",
            received.status
        );
    };
    match media {
        "application/json" => {
            let body: Value = serde_json::from_str(&received.body).expect("JSON body");
            validate(doc, &schema_pointer, &body);
            0
        }
        "text/event-stream" => {
            let event_schema = schema["$ref"].as_str().expect("an event component");
            let data_schema = format!(
                "{}/properties/data/anyOf/0/contentSchema",
                event_schema.trim_start_matches('#')
            );
            let data = parse_sse(&received.body);
            assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
            for d in &data {
                validate(
                    doc,
                    &schema_pointer,
                    &json!({"data": d, "event": "message"}),
                );
                if d != "[DONE]" {
                    let chunk: Value = serde_json::from_str(d).expect("JSON data");
                    validate(doc, &data_schema, &chunk);
                }
            }
            data.len()
        }
        "text/plain" => {
            assert_eq!(schema["type"], "string");
            0
        }
        other => panic!("no check for {other}"),
    }
}

async fn document(server: &RunningServer) -> Value {
    let received = send(client().get(url(server, "/openapi.json"))).await;
    let doc: Value = serde_json::from_str(&received.body).expect("the document is JSON");
    // The document describes its own response too.
    conforms(&doc, "get", "/openapi.json", &received);
    doc
}

async fn post_checked(server: &RunningServer, doc: &Value, path: &str, body: Value) -> Received {
    let received = send(client().post(url(server, path)).json(&body)).await;
    conforms(doc, "post", path, &received);
    received
}

#[tokio::test]
async fn completions_responses_and_streams_match_the_document() {
    let server = start(|_| {}).await;
    let doc = document(&server).await;
    let path = "/v1/completions";
    for body in [
        json!({"prompt": "Hello", "max_tokens": 5, "seed": 1}),
        json!({"prompt": ["To be", "or not"], "n": 2, "logprobs": 2, "echo": true,
               "max_tokens": 3, "seed": 2}),
        json!({"prompt": [9, 10, 11], "max_tokens": 0, "echo": true, "logprobs": 1}),
        json!({"prompt": "A", "max_tokens": 8, "structured_outputs": {"choice": ["yes", "no"]}}),
    ] {
        let received = post_checked(&server, &doc, path, body.clone()).await;
        assert_eq!(received.status, 200, "{body}: {}", received.body);
    }
    let streamed = post_checked(
        &server,
        &doc,
        path,
        json!({"prompt": "Once", "max_tokens": 6, "stream": true, "logprobs": 2,
               "stream_options": {"include_usage": true}, "seed": 3}),
    )
    .await;
    assert_eq!(streamed.status, 200);
    assert!(conforms(&doc, "post", path, &streamed) >= 3);
    for (body, status) in [
        (json!({"prompt": "x", "temperature": 3}), 400),
        (json!({"prompt": "x", "max_tokens": 4096}), 400),
        (json!({"prompt": "x", "max_token": 3}), 400),
        (json!({"prompt": "x", "model": "nope"}), 404),
    ] {
        assert_eq!(post_checked(&server, &doc, path, body).await.status, status);
    }
    let not_json = send(
        client()
            .post(url(&server, path))
            .header("content-type", "text/plain")
            .body("{}"),
    )
    .await;
    assert_eq!(not_json.status, 415);
    conforms(&doc, "post", path, &not_json);
    let too_large = send(
        client()
            .post(url(&server, path))
            .header("content-type", "application/json")
            .body(vec![b' '; 5 * 1024 * 1024]),
    )
    .await;
    assert_eq!(too_large.status, 413);
    conforms(&doc, "post", path, &too_large);
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn chat_responses_streams_and_tool_calls_match_the_document() {
    let server = start(|_| {}).await;
    let doc = document(&server).await;
    let path = "/v1/chat/completions";
    let messages = json!([{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]);
    let tools = json!([{"type": "function", "function": {"name": "add",
        "parameters": {"type": "object", "properties": {"a": {"type": "integer"}},
                       "required": ["a"], "additionalProperties": false}}}]);
    let bodies = [
        json!({"messages": messages, "max_tokens": 6, "seed": 1}),
        json!({"messages": messages, "max_tokens": 4, "logprobs": true, "top_logprobs": 3, "n": 2}),
        json!({"messages": messages, "max_tokens": 40, "tools": tools, "tool_choice": "required",
               "seed": 4}),
        json!({"messages": messages, "max_tokens": 20, "response_format": {"type": "json_object"}}),
    ];
    let mut saw_tool_call = false;
    for body in bodies {
        let received = post_checked(&server, &doc, path, body.clone()).await;
        assert_eq!(received.status, 200, "{body}: {}", received.body);
        saw_tool_call |= received.body.contains("\"tool_calls\"");
    }
    assert!(saw_tool_call, "tool_choice required answers with a call");
    for body in [
        json!({"messages": messages, "max_tokens": 6, "stream": true, "logprobs": true,
               "top_logprobs": 1, "stream_options": {"include_usage": true}}),
        json!({"messages": messages, "max_tokens": 40, "stream": true, "tools": tools,
               "tool_choice": {"type": "function", "function": {"name": "add"}}, "seed": 5}),
    ] {
        let received = post_checked(&server, &doc, path, body).await;
        assert_eq!(received.status, 200);
    }
    for (body, status) in [
        (json!({"messages": []}), 400),
        (json!({"messages": [{"role": "tool", "content": "4"}]}), 400),
        (
            json!({"messages": messages, "tool_choice": "required"}),
            400,
        ),
        (json!({"messages": messages, "model": "nope"}), 404),
    ] {
        assert_eq!(post_checked(&server, &doc, path, body).await.status, status);
    }
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn the_other_endpoints_match_the_document() {
    let server = start(|_| {}).await;
    let doc = document(&server).await;
    for path in ["/v1/models", "/health", "/ready", "/metrics"] {
        let received = send(client().get(url(&server, path))).await;
        assert_eq!(received.status, 200, "{path}");
        conforms(&doc, "get", path, &received);
    }
    for (path, body, status) in [
        ("/tokenize", json!({"prompt": "Hello world"}), 200),
        (
            "/tokenize",
            json!({"messages": [{"role": "user", "content": "Hi"}]}),
            200,
        ),
        ("/tokenize", json!({}), 400),
        ("/detokenize", json!({"tokens": [12092, 1533]}), 200),
        ("/detokenize", json!({"tokens": [99999999]}), 400),
        ("/detokenize", json!({"tokens": [1], "model": "nope"}), 404),
    ] {
        assert_eq!(
            post_checked(&server, &doc, path, body.clone()).await.status,
            status,
            "{path} {body}"
        );
    }
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test]
async fn with_an_api_key_the_401_is_documented_and_conforms() {
    let server = start(|c| c.api_key = Some("sekret".into())).await;
    let doc = document(&server).await;
    assert!(doc["components"]["securitySchemes"]["bearer"].is_object());
    let denied = send(
        client()
            .post(url(&server, "/v1/completions"))
            .json(&json!({"prompt": "x"})),
    )
    .await;
    assert_eq!(denied.status, 401);
    conforms(&doc, "post", "/v1/completions", &denied);
    let allowed = send(
        client()
            .get(url(&server, "/v1/models"))
            .bearer_auth("sekret"),
    )
    .await;
    assert_eq!(allowed.status, 200);
    conforms(&doc, "get", "/v1/models", &allowed);
    server.shutdown().await.expect("clean shutdown");
}

/// What the schemathesis stage (`.ci/fuzz.sh`) found, kept as requests: each was valid by the
/// document and got a 400 before the fix, so each must now be served and conform.
#[tokio::test]
async fn inputs_the_fuzzer_found_are_served_as_documented() {
    let server = start(|_| {}).await;
    let doc = document(&server).await;
    let cases = [
        // (0, 1] in JSON, but 0 as an f32: the engine refused "top_p must be in (0, 1], got 0".
        (
            "/v1/completions",
            json!({"prompt": "0", "max_tokens": 2, "top_p": 5e-324}),
        ),
        // > 0 in JSON, but infinite as an f32.
        (
            "/v1/completions",
            json!({"prompt": "0", "max_tokens": 2, "repetition_penalty": 1e300}),
        ),
        (
            "/v1/completions",
            json!({"prompt": "0", "max_tokens": 2, "repetition_penalty": 5e-324}),
        ),
        // JSON Schema's integer includes whole numbers written as floats.
        (
            "/v1/completions",
            json!({"prompt": [9.0, 1e1], "max_tokens": 2.0, "n": 2.0, "logprobs": 1.0}),
        ),
        (
            "/v1/chat/completions",
            json!({"messages": [{"role": "user", "content": "Hi"}],
                                        "max_completion_tokens": 3.0, "top_logprobs": 2.0,
                                        "logprobs": true}),
        ),
        ("/detokenize", json!({"tokens": [191, 504.0]})),
    ];
    for (path, body) in cases {
        let received = post_checked(&server, &doc, path, body.clone()).await;
        assert_eq!(received.status, 200, "{path} {body}: {}", received.body);
    }
    // A whole float past 2^53 is not exact, so it stays an error rather than a rounded count.
    let inexact = post_checked(
        &server,
        &doc,
        "/v1/completions",
        json!({"prompt": "0", "max_tokens": 1e17}),
    )
    .await;
    assert_eq!(inexact.status, 400, "{}", inexact.body);
    server.shutdown().await.expect("clean shutdown");
}
