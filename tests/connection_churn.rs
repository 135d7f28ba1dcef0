//! Black-box test: a thousand quick connect/close cycles (some sending half a request) leave
//! no task or file descriptor behind. Alone in its test binary, so that no other test's
//! sockets or tasks change the counts.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// Open file descriptors of this process (the server runs in it).
fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd (Linux)")
        .count()
}

fn alive_tasks() -> usize {
    tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_connect_close_cycles_leak_nothing() {
    let server = start(|_| {}).await;
    // One real request first, so that lazily created state (pools, metrics) exists already.
    assert_serves(&server).await;
    wait_idle(&server).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (fds, tasks) = (open_fds(), alive_tasks());
    for i in 0..1000 {
        let mut socket = TcpStream::connect(server.addr()).await.expect("connect");
        match i % 3 {
            0 => {}
            1 => {
                let _ = socket.write_all(b"GET /health HTTP/1.1\r\nHo").await;
            }
            _ => {
                let _ = socket
                    .write_all(b"POST /v1/completions HTTP/1.1\r\nContent-Length: 99\r\n\r\n{")
                    .await;
            }
        }
        drop(socket);
    }
    // The server notices each close on its own schedule; give it a bounded while.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (now_fds, now_tasks) = (open_fds(), alive_tasks());
        if now_fds <= fds && now_tasks <= tasks {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "leaked: {fds} -> {now_fds} file descriptors, {tasks} -> {now_tasks} tasks"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, _) = post(
        &server,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "Hi", "max_tokens": 2}),
    )
    .await;
    assert_eq!(status, 200, "still serving");
    server.shutdown().await.expect("clean shutdown");
}
