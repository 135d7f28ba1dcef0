//! Black-box tests of the failure paths, with faults the engine injects on purpose
//! (`ServerConfig::faults`, which no flag reaches): a forward pass that fails, and an engine
//! thread that dies.
//!
//! Documented outcomes: a failed forward pass fails every request in that step (a stream gets
//! an OpenAI error event, then `data: [DONE]`; a plain request a 500 in OpenAI's shape), frees
//! their KV blocks, and leaves the rest (waiting requests, later ones) to be served. A dead
//! engine thread turns `/health`, `/ready` and new requests into 503s, fails what was in flight
//! the same way, and stops the server with an error so the process exits non-zero.

mod common;

use std::time::Duration;

use axum::body::Body;
use axum::http::Request;
use common::*;
use mpt_engine::FaultPlan;
use serde_json::{Value, json};
use tower::ServiceExt;

fn long(stream: bool) -> Value {
    json!({"model": MODEL, "prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": true,
           "temperature": 0, "stream": stream})
}

/// The error event and `[DONE]` that must end a stream cut by a failure.
fn assert_ends_with_an_error(events: &[String]) {
    let n = events.len();
    assert!(n >= 2, "{events:?}");
    assert_eq!(events[n - 1], "[DONE]");
    let error: Value = serde_json::from_str(&events[n - 2]).expect("JSON");
    assert_eq!(error["error"]["type"], "internal_server_error", "{error}");
    assert!(error["error"]["message"].is_string() && error["error"].get("code").is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_forward_pass_fails_its_batch_and_the_server_carries_on() {
    let server = start(|c| {
        c.max_num_seqs = 2;
        c.faults = FaultPlan {
            fail_forward_at_step: Some(100),
            ..FaultPlan::default()
        };
    })
    .await;
    let c = client();
    let mut streamed = c
        .post(url(&server, "/v1/completions"))
        .json(&long(true))
        .send()
        .await
        .expect("sent");
    // The first bytes of the stream: it is running.
    let first = streamed
        .chunk()
        .await
        .expect("read")
        .expect("a first event");
    // Joins the running stream long before step 100, so both are in the failing step.
    let plain = tokio::spawn(post_owned(url(&server, "/v1/completions"), long(false)));
    // Waits behind them (two sequences at most), so it is not in that step.
    let waiting = tokio::spawn(post_owned(
        url(&server, "/v1/completions"),
        json!({"model": MODEL, "prompt": "Hello", "max_tokens": 4}),
    ));
    let text = String::from_utf8(first.to_vec()).expect("utf-8") + &drain(streamed).await;
    assert_ends_with_an_error(&parse_sse(&text));
    let (status, body) = plain.await.expect("joined");
    assert_error(status, &body, 500, None);
    assert_eq!(body["error"]["type"], "internal_server_error");
    let (status, body) = waiting.await.expect("joined");
    assert_eq!(
        status, 200,
        "a request outside the failed step is served: {body}"
    );
    wait_idle(&server).await;
    let (status, _) = post(
        &server,
        "/v1/completions",
        json!({"prompt": "hi", "max_tokens": 3}),
    )
    .await;
    assert_eq!(status, 200, "the server keeps serving");
    server.shutdown().await.expect("clean shutdown");
}

async fn post_owned(url: String, body: Value) -> (u16, Value) {
    let response = client().post(url).json(&body).send().await.expect("sent");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_engine_answers_503_and_stops_the_server() {
    let server = start(|c| {
        c.faults = FaultPlan {
            kill_engine_at_step: Some(40),
            ..FaultPlan::default()
        };
    })
    .await;
    let state = server.state().clone();
    let response = client()
        .post(url(&server, "/v1/completions"))
        .json(&long(true))
        .send()
        .await
        .expect("sent");
    assert_ends_with_an_error(&parse_sse(&drain(response).await));
    // The router itself (the listener may already be closing): probes and new work get 503.
    let router = mpt_server::app(state);
    for (method, path, body) in [
        ("GET", "/health", String::new()),
        ("GET", "/ready", String::new()),
        (
            "POST",
            "/v1/completions",
            json!({"prompt": "hi", "max_tokens": 2}).to_string(),
        ),
    ] {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .expect("request");
        let response = router.clone().oneshot(request).await.expect("answered");
        assert_eq!(response.status(), 503, "{method} {path}");
    }
    // The server stops by itself, with the error the process exits non-zero on.
    let stopped = tokio::time::timeout(Duration::from_secs(15), server.stopped())
        .await
        .expect("the server stops within a bounded time");
    assert!(
        matches!(stopped, Err(mpt_server::ServerError::EngineDied)),
        "{stopped:?}"
    );
}
