//! Shared helpers of the black-box tests: start the real server (demo model) on a free loopback
//! port and talk HTTP to it.
#![allow(dead_code)]

pub mod weightless;

use std::time::{Duration, Instant};

use futures::StreamExt;
use mpt_engine::KvCacheSize;
use mpt_server::RunningServer;
use mpt_server::config::ServerConfig;
use serde_json::{Value, json};

/// The demo model's served name.
pub const MODEL: &str = "mpt-demo";

/// Starts a demo server on 127.0.0.1:0 with small, test-friendly limits, adjusted by `tweak`.
pub async fn start(tweak: impl FnOnce(&mut ServerConfig)) -> RunningServer {
    let mut config = ServerConfig {
        host: "127.0.0.1".into(),
        port: 0,
        threads: Some(1),
        max_num_seqs: 8,
        max_queue_size: 16,
        kv_cache: KvCacheSize::Blocks(512),
        shutdown_timeout: Duration::from_secs(30),
        ..ServerConfig::default()
    };
    tweak(&mut config);
    mpt_server::start(config).await.expect("demo server starts")
}

/// `http://addr{path}`.
pub fn url(server: &RunningServer, path: &str) -> String {
    format!("http://{}{path}", server.addr())
}

/// A plain HTTP client.
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(120))
        .build()
        .expect("client builds")
}

/// POSTs JSON; returns status and parsed body (Null when not JSON).
pub async fn post(server: &RunningServer, path: &str, body: Value) -> (u16, Value) {
    let response = client()
        .post(url(server, path))
        .json(&body)
        .send()
        .await
        .expect("request sent");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body read");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Asserts `body` is our error shape with `status`-appropriate content and returns it.
pub fn assert_error(status: u16, body: &Value, want_status: u16, want_param: Option<&str>) {
    assert_eq!(status, want_status, "body: {body}");
    let err = &body["error"];
    assert!(err["message"].is_string(), "no message in {body}");
    assert!(err["type"].is_string(), "no type in {body}");
    assert!(
        err.get("param").is_some() && err.get("code").is_some(),
        "missing keys in {body}"
    );
    if let Some(param) = want_param {
        assert_eq!(err["param"], param, "wrong param in {body}");
    }
}

/// Reads a whole SSE response; returns the `data:` payloads in order (including `[DONE]`).
pub async fn sse_data(response: reqwest::Response) -> Vec<String> {
    assert_eq!(response.status(), 200);
    let content_type = response.headers()["content-type"]
        .to_str()
        .expect("ascii")
        .to_string();
    assert!(
        content_type.starts_with("text/event-stream"),
        "{content_type}"
    );
    let text = response.text().await.expect("stream read");
    parse_sse(&text)
}

/// Splits SSE text into `data:` payloads, checking every event is well-formed.
pub fn parse_sse(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        for line in block.lines() {
            if line.starts_with(':') {
                continue; // keep-alive comment
            }
            let data = line
                .strip_prefix("data: ")
                .unwrap_or_else(|| panic!("bad SSE line {line:?}"));
            out.push(data.to_string());
        }
    }
    out
}

/// Streams a completion and returns the parsed chunks (without `[DONE]`, which is asserted last).
pub async fn stream_chunks(server: &RunningServer, path: &str, body: Value) -> Vec<Value> {
    let response = client()
        .post(url(server, path))
        .json(&body)
        .send()
        .await
        .expect("sent");
    let data = sse_data(response).await;
    assert_eq!(data.last().map(String::as_str), Some("[DONE]"), "{data:?}");
    assert_eq!(data.iter().filter(|d| *d == "[DONE]").count(), 1);
    data[..data.len() - 1]
        .iter()
        .map(|d| serde_json::from_str(d).expect("chunk is JSON"))
        .collect()
}

/// Reads the first `n` SSE `data:` events of a live response (leaves it open).
pub async fn read_events(response: &mut reqwest::Response, n: usize) -> Vec<String> {
    let mut buffer = String::new();
    let mut events = Vec::new();
    while events.len() < n {
        let chunk = response
            .chunk()
            .await
            .expect("read")
            .expect("stream still open");
        buffer.push_str(std::str::from_utf8(&chunk).expect("utf-8"));
        while let Some(end) = buffer.find("\n\n") {
            let block: String = buffer.drain(..end + 2).collect();
            if let Some(data) = block.trim().strip_prefix("data: ") {
                events.push(data.to_string());
            }
        }
    }
    events
}

/// The value of one metric series (exact line match on `name{labels}`), 0 when absent.
pub async fn metric(server: &RunningServer, series: &str) -> f64 {
    let text = client()
        .get(url(server, "/metrics"))
        .send()
        .await
        .expect("sent")
        .text()
        .await
        .expect("read");
    text.lines()
        .find_map(|line| {
            let (name, value) = line.rsplit_once(' ')?;
            (name == series).then(|| value.parse::<f64>().expect("number"))
        })
        .unwrap_or(0.0)
}

/// Polls until the server has no request in flight and no KV block in use.
pub async fn wait_idle(server: &RunningServer) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let kv = metric(
            server,
            &format!("vllm:kv_cache_usage_perc{{model_name=\"{MODEL}\"}}"),
        )
        .await;
        let running = metric(
            server,
            &format!("vllm:num_requests_running{{model_name=\"{MODEL}\"}}"),
        )
        .await;
        let waiting = metric(
            server,
            &format!("vllm:num_requests_waiting{{model_name=\"{MODEL}\"}}"),
        )
        .await;
        if kv == 0.0 && running == 0.0 && waiting == 0.0 && server.state().inflight() == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "not idle: kv {kv}, running {running}, waiting {waiting}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Joined text per choice index from completion stream chunks.
pub fn joined_text(chunks: &[Value], field: impl Fn(&Value) -> Option<&str>) -> Vec<String> {
    let mut texts: Vec<String> = Vec::new();
    for chunk in chunks {
        for choice in chunk["choices"].as_array().expect("choices") {
            let index = choice["index"].as_u64().expect("index") as usize;
            if texts.len() <= index {
                texts.resize(index + 1, String::new());
            }
            if let Some(t) = field(choice) {
                texts[index].push_str(t);
            }
        }
    }
    texts
}

/// Drains a byte stream to the end (used to hold a response open elsewhere).
pub async fn drain(response: reqwest::Response) -> String {
    let mut stream = response.bytes_stream();
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.expect("read"));
    }
    String::from_utf8(out).expect("utf-8")
}

/// Asserts that a small completion still gets a 200 (the server serves after whatever came
/// before).
pub async fn assert_serves(server: &RunningServer) {
    let body = json!({"model": MODEL, "prompt": "hi", "max_tokens": 2});
    let (status, reply) = post(server, "/v1/completions", body).await;
    assert_eq!(status, 200, "{reply}");
}
