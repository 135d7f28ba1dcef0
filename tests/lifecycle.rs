//! Black-box lifecycle tests: cancellation on disconnect, backpressure (429), exact metrics, and
//! graceful drain (in-process; the SIGTERM-to-a-process variant is in crates/server/tests).

mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

fn long_stream(max_tokens: usize) -> Value {
    json!({"model": MODEL, "prompt": "Count with me:", "max_tokens": max_tokens, "ignore_eos": true,
           "temperature": 0, "stream": true})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disconnect_cancels_and_frees_kv_blocks() {
    let server = start(|_| {}).await;
    let kv = format!("vllm:kv_cache_usage_perc{{model_name=\"{MODEL}\"}}");
    let generated = format!("vllm:generation_tokens_total{{model_name=\"{MODEL}\"}}");
    let finished = |reason: &str| {
        format!("vllm:request_success_total{{finished_reason=\"{reason}\",model_name=\"{MODEL}\"}}")
    };
    // Streaming: read a few chunks, then hang up.
    let mut response = client()
        .post(url(&server, "/v1/completions"))
        .json(&long_stream(1900))
        .send()
        .await
        .expect("sent");
    read_events(&mut response, 3).await;
    assert!(
        metric(&server, &kv).await > 0.0,
        "a running stream holds KV blocks"
    );
    drop(response);
    wait_idle(&server).await;
    assert_eq!(metric(&server, &kv).await, 0.0);
    let after_stream = metric(&server, &generated).await;
    assert!(
        after_stream < 1900.0,
        "the stream ran to the end ({after_stream} tokens) instead of being cancelled"
    );
    // Counted as aborted, never as finished by length (which a stream run to its end would be).
    assert_eq!(metric(&server, &finished("abort")).await, 1.0);
    assert_eq!(metric(&server, &finished("length")).await, 0.0);
    // Non-streaming: the client gives up after a moment.
    let mut body = long_stream(1900);
    body["stream"] = json!(false);
    let quick = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .expect("client");
    let err = quick
        .post(url(&server, "/v1/completions"))
        .json(&body)
        .send()
        .await;
    assert!(err.is_err(), "the request should not finish within 300 ms");
    wait_idle(&server).await;
    let after_plain = metric(&server, &generated).await;
    assert!(
        after_plain - after_stream < 1900.0,
        "the plain request was not cancelled"
    );
    assert_eq!(metric(&server, &finished("abort")).await, 2.0);
    assert_eq!(metric(&server, &finished("length")).await, 0.0);
    // And the server still serves.
    assert_serves(&server).await;
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flood_beyond_the_queue_gets_exact_429s() {
    // One running + two queued: three requests in flight at most.
    let server = start(|c| {
        c.max_num_seqs = 1;
        c.max_queue_size = 2;
    })
    .await;
    let mut holders = Vec::new();
    for i in 0..3 {
        let mut response = client()
            .post(url(&server, "/v1/completions"))
            .json(&long_stream(1500))
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), 200);
        if i == 0 {
            // The first one is running (and so no longer queued) before the others arrive.
            read_events(&mut response, 2).await;
        }
        holders.push(response);
    }
    let flood = (0..7).map(|_| {
        post(
            &server,
            "/v1/completions",
            json!({"prompt": "hi", "max_tokens": 2}),
        )
    });
    let results = futures::future::join_all(flood).await;
    let rejected = results.iter().filter(|(status, _)| *status == 429).count();
    assert_eq!(rejected, 7, "{results:?}");
    for (status, body) in &results {
        assert_error(*status, body, 429, None);
    }
    // 429s carry Retry-After.
    let r = client()
        .post(url(&server, "/v1/completions"))
        .json(&json!({"prompt": "hi", "max_tokens": 2}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "1");
    let rejected_metric =
        format!("mpt:requests_rejected_total{{model_name=\"{MODEL}\",reason=\"queue_full\"}}");
    assert_eq!(metric(&server, &rejected_metric).await, 8.0);
    // Free the slots: the server keeps serving.
    drop(holders);
    wait_idle(&server).await;
    let (status, v) = post(
        &server,
        "/v1/completions",
        json!({"prompt": "hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_exact_after_k_requests() {
    let server = start(|c| c.served_model_name = MODEL.into()).await;
    const K: usize = 3;
    for _ in 0..K {
        let body = json!({"model": MODEL, "prompt": [11, 12, 13, 14], "max_tokens": 5, "ignore_eos": true});
        let (status, v) = post(&server, "/v1/completions", body).await;
        assert_eq!(status, 200, "{v}");
        assert_eq!(v["usage"]["completion_tokens"], 5);
    }
    let (status, _) = post(&server, "/v1/completions", json!({"prompt": ""})).await;
    assert_eq!(status, 400);
    wait_idle(&server).await;
    let m = |name: &str, labels: &str| {
        let series = if labels.is_empty() {
            format!("{name}{{model_name=\"{MODEL}\"}}")
        } else {
            format!("{name}{{{labels},model_name=\"{MODEL}\"}}")
        };
        let server = &server;
        async move { metric(server, &series).await }
    };
    assert_eq!(m("vllm:prompt_tokens_total", "").await, (4 * K) as f64);
    assert_eq!(m("vllm:generation_tokens_total", "").await, (5 * K) as f64);
    assert_eq!(
        m("vllm:request_success_total", "finished_reason=\"length\"").await,
        K as f64
    );
    assert_eq!(
        m("vllm:e2e_request_latency_seconds_count", "").await,
        K as f64
    );
    assert_eq!(
        m("vllm:time_to_first_token_seconds_count", "").await,
        K as f64
    );
    assert_eq!(
        m("vllm:request_queue_time_seconds_count", "").await,
        K as f64
    );
    assert_eq!(
        m("vllm:inter_token_latency_seconds_count", "").await,
        (4 * K) as f64
    );
    assert_eq!(m("vllm:num_requests_running", "").await, 0.0);
    assert_eq!(m("vllm:gpu_cache_usage_perc", "").await, 0.0);
    let http = |status: u16| {
        format!(
            "mpt:http_requests_total{{model_name=\"{MODEL}\",route=\"/v1/completions\",status=\"{status}\"}}"
        )
    };
    assert_eq!(metric(&server, &http(200)).await, K as f64);
    assert_eq!(metric(&server, &http(400)).await, 1.0);
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_lets_streams_finish_and_refuses_new_work() {
    let server = start(|_| {}).await;
    let base = url(&server, "");
    let mut streams = Vec::new();
    for _ in 0..2 {
        let mut r = client()
            .post(format!("{base}/v1/completions"))
            .json(&long_stream(1000))
            .send()
            .await
            .expect("sent");
        read_events(&mut r, 1).await;
        streams.push(r);
    }
    let shutdown = tokio::spawn(server.shutdown());
    // Readiness flips at once; new requests get 503 while the streams are still going.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let ready = client()
        .get(format!("{base}/ready"))
        .send()
        .await
        .expect("sent");
    assert_eq!(ready.status(), 503);
    let late = client()
        .post(format!("{base}/v1/completions"))
        .json(&json!({"prompt": "hi", "max_tokens": 2}))
        .send()
        .await
        .expect("sent");
    assert_eq!(late.status(), 503);
    let health = client()
        .get(format!("{base}/health"))
        .send()
        .await
        .expect("sent");
    assert_eq!(health.status(), 200, "liveness stays 200 while draining");
    for r in streams {
        let data = parse_sse(&drain(r).await);
        assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
        let finish: Vec<Value> = data[..data.len() - 1]
            .iter()
            .map(|d| serde_json::from_str::<Value>(d).expect("json"))
            .filter_map(|c| c["choices"].get(0).map(|c| c["finish_reason"].clone()))
            .filter(|f| !f.is_null())
            .collect();
        assert_eq!(
            finish,
            vec![json!("length")],
            "the stream finished normally"
        );
    }
    shutdown.await.expect("joined").expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_timeout_aborts_with_an_error_event() {
    let server = start(|c| c.shutdown_timeout = Duration::from_millis(300)).await;
    let mut r = client()
        .post(url(&server, "/v1/completions"))
        .json(&long_stream(1990))
        .send()
        .await
        .expect("sent");
    read_events(&mut r, 1).await;
    let shutdown = tokio::spawn(server.shutdown());
    let data = parse_sse(&drain(r).await);
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"));
    let events: Vec<Value> = data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("json"))
        .collect();
    assert!(
        events.iter().any(|e| e["choices"]
            .get(0)
            .is_some_and(|c| c["finish_reason"] == "abort")),
        "{data:?}"
    );
    assert!(
        events.last().expect("events")["error"]["message"].is_string(),
        "{data:?}"
    );
    shutdown.await.expect("joined").expect("clean shutdown");
}
