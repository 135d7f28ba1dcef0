//! Black-box tests of slow and hostile clients: sockets that never finish their headers are
//! closed at the header timeout without holding up anyone else, a body that trickles in past
//! the body timeout gets 408, and a stream waiting on a long prefill hears keep-alive comments.

mod common;

use std::time::{Duration, Instant};

use common::*;
use mpt_server::config::Timeouts;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn short_timeouts() -> Timeouts {
    Timeouts {
        header_read: Duration::from_secs(1),
        body_read: Duration::from_secs(1),
        sse_keep_alive: Duration::from_millis(10),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partial_headers_are_closed_at_the_timeout_while_others_are_served() {
    let server = start(|c| c.timeouts = short_timeouts()).await;
    let mut idle = Vec::new();
    for _ in 0..64 {
        let mut socket = TcpStream::connect(server.addr()).await.expect("connect");
        socket
            .write_all(b"POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Ty")
            .await
            .expect("write");
        idle.push(socket);
    }
    let opened = Instant::now();
    let (status, body) = post(
        &server,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hello", "max_tokens": 4}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let served_after = opened.elapsed();
    for mut socket in idle {
        let mut buf = [0u8; 256];
        let read = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut buf))
            .await
            .expect("the server closes a socket stuck in its headers");
        // Closed (EOF or reset), possibly after a 408 response; never left open.
        if let Ok(n) = read
            && n > 0
        {
            let text = String::from_utf8_lossy(&buf[..n]);
            assert!(text.starts_with("HTTP/1.1 408"), "{text}");
        }
    }
    let closed_after = opened.elapsed();
    assert!(
        served_after < closed_after && closed_after >= Duration::from_secs(1),
        "served after {served_after:?}, idle sockets closed after {closed_after:?}"
    );
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_trickles_past_the_timeout_gets_408() {
    let server = start(|c| c.timeouts = short_timeouts()).await;
    let body = json!({"model": MODEL, "prompt": "Hello there", "max_tokens": 4}).to_string();
    let mut socket = TcpStream::connect(server.addr()).await.expect("connect");
    let head = format!(
        "POST /v1/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    socket.write_all(head.as_bytes()).await.expect("headers");
    // A byte every 300 ms: the whole body would take far longer than the 1 s limit.
    let mut response = Vec::new();
    for byte in body.as_bytes() {
        if socket.write_all(&[*byte]).await.is_err() {
            break; // the server answered and closed
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut buf = [0u8; 1024];
        match tokio::time::timeout(Duration::from_millis(1), socket.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                response.extend_from_slice(&buf[..n]);
                break;
            }
            _ => {}
        }
    }
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), socket.read_to_end(&mut rest)).await;
    response.extend(rest);
    let text = String::from_utf8_lossy(&response);
    assert!(text.starts_with("HTTP/1.1 408"), "{text}");
    let json_start = text.find('{').expect("an error body");
    let v: serde_json::Value = serde_json::from_str(&text[json_start..]).expect("JSON");
    assert_error(408, &v, 408, None);
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_alive_comments_arrive_during_a_long_prefill() {
    let server = start(|c| {
        c.timeouts = short_timeouts();
        c.max_num_batched_tokens = 32; // a 1,900-token prompt takes 60 steps
    })
    .await;
    let prompt: Vec<u32> = (0..1900).map(|i| 100 + i % 5000).collect();
    let response = client()
        .post(url(&server, "/v1/completions"))
        .json(&json!({"model": MODEL, "prompt": prompt, "max_tokens": 2, "stream": true}))
        .send()
        .await
        .expect("sent");
    let text = drain(response).await;
    let first_data = text.find("data:").expect("events");
    let comments = text[..first_data].matches(":keep-alive").count()
        + text[..first_data].matches(": keep-alive").count();
    assert!(
        comments > 0,
        "no keep-alive before the first event: {:?}",
        &text[..first_data.min(200)]
    );
    assert!(text.trim_end().ends_with("data: [DONE]"));
    server.shutdown().await.expect("clean shutdown");
}
