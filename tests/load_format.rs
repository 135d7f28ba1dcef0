//! Black-box tests of the GPU-path startup flags on the CPU: `--load-format dummy` serves a
//! checkpoint directory that holds only `config.json` and `tokenizer.json` (a fixture's config,
//! no weight files); `--attention-kernels custom` stops startup on the CPU with the reason.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use mpt_engine::{AttentionKernels, LoadFormat};
use mpt_server::config::ServerConfig;
use serde_json::json;

/// A temporary copy of the `heads6-sharded` fixture without its weight files.
fn weightless_checkpoint() -> PathBuf {
    let fixture =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/models/heads6-sharded");
    weightless::weightless_checkpoint(&fixture, true)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dummy_weights_serve_completions_without_weight_files() {
    let dir = weightless_checkpoint();
    let model_dir = dir.clone();
    let server = start(move |c| {
        c.model = Some(model_dir);
        c.load_format = LoadFormat::Dummy;
    })
    .await;
    let (status, body) = post(
        &server,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "w1 w2 w3", "max_tokens": 6, "ignore_eos": true,
               "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["prompt_tokens"], 3, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 6, "{body}");
    assert_eq!(body["choices"][0]["finish_reason"], "length", "{body}");
    // The fixture's context length, from its config.json, is what the server enforces.
    let (status, body) = post(
        &server,
        "/v1/completions",
        json!({"model": MODEL, "prompt": "w1", "max_tokens": 256}),
    )
    .await;
    assert_error(status, &body, 400, Some("max_tokens"));
    server.shutdown().await.expect("clean shutdown");
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_attention_kernels_on_the_cpu_stop_startup_with_the_reason() {
    let config = ServerConfig {
        host: "127.0.0.1".into(),
        port: 0,
        threads: Some(1),
        attention_kernels: AttentionKernels::Custom,
        shutdown_timeout: Duration::from_secs(5),
        ..ServerConfig::default()
    };
    match mpt_server::start(config).await {
        Ok(_) => panic!("--attention-kernels custom must not start on the CPU"),
        Err(e) => {
            let text = e.to_string();
            assert!(
                text.contains("attention_kernels") && text.contains("--device cuda"),
                "{text}"
            );
        }
    }
}
