//! Tests of the real `mpt-server` process: `--help` documents every flag, and SIGTERM while a
//! request is streaming lets it finish and the process exit 0. Plain std networking keeps this
//! free of extra dependencies.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_mpt-server");

#[test]
fn help_documents_every_flag() {
    let out = Command::new(BIN).arg("--help").output().expect("runs");
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).expect("utf-8");
    for flag in [
        "--model",
        "--served-model-name",
        "--host",
        "--port",
        "--max-model-len",
        "--max-num-seqs",
        "--max-num-batched-tokens",
        "--block-size",
        "--num-kv-blocks",
        "--kv-cache-memory",
        "--dtype",
        "--device",
        "--threads",
        "--api-key",
        "--max-queue-size",
        "--shutdown-timeout",
        "--config",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
        let env = format!("MPT_SERVER_{}", flag[2..].to_uppercase().replace('-', "_"));
        assert!(help.contains(&env), "--help lacks {env}");
    }
}

/// Kills the child if the test fails half-way.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the binary on a free port; returns it and its address once it is ready.
fn spawn() -> (Server, String) {
    let mut child = Command::new(BIN)
        .args([
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--threads",
            "1",
            "--shutdown-timeout",
            "60",
        ])
        .env("NO_COLOR", "1")
        .env("RUST_LOG", "info")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("binary starts");
    let stdout = child.stdout.take().expect("piped");
    let server = Server(child);
    let mut lines = BufReader::new(stdout).lines();
    let mut addr = None;
    for line in lines.by_ref() {
        let line = line.expect("log line");
        if line.contains("listening") {
            let start = line.find("127.0.0.1:").expect("address logged");
            let port: String = line[start + 10..]
                .chars()
                .take_while(char::is_ascii_digit)
                .collect();
            addr = Some(format!("127.0.0.1:{port}"));
        }
        if line.contains(" ready") {
            break;
        }
    }
    // Keep draining the log so the server never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (server, addr.expect("listening line seen"))
}

fn post(addr: &str, body: &str) -> TcpStream {
    let mut stream = TcpStream::connect(addr).expect("connects");
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("timeout");
    write!(
        stream,
        "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("request written");
    stream
}

/// Reads until `needle` appears (or EOF); returns everything read.
fn read_until(stream: &mut TcpStream, seen: &mut String, needle: &str) {
    let mut buf = [0u8; 4096];
    while !seen.contains(needle) {
        let n = stream.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
}

#[test]
fn sigterm_while_streaming_finishes_the_stream_and_exits_zero() {
    let (mut server, addr) = spawn();
    let body = r#"{"prompt": "Count with me:", "max_tokens": 1500, "ignore_eos": true, "temperature": 0, "stream": true}"#;
    let mut stream = post(&addr, body);
    let mut seen = String::new();
    read_until(&mut stream, &mut seen, "data: {");
    assert!(seen.starts_with("HTTP/1.1 200"), "{seen}");
    let status = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .expect("kill runs");
    assert!(status.success());
    read_until(&mut stream, &mut seen, "data: [DONE]");
    assert!(seen.contains("data: [DONE]"), "stream cut short: {seen}");
    assert!(
        seen.contains(r#""finish_reason":"length""#),
        "stream did not finish normally: {seen}"
    );
    assert!(!seen.contains(r#""error""#), "{seen}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = server.0.try_wait().expect("wait") {
            assert!(status.success(), "exit status {status}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "server did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
