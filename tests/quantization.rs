//! Black-box tests of low-precision weights: `--quantization` on the demo model, an MPT GGUF
//! file served with the tokenizer rebuilt from its metadata, and the start-up errors for a
//! quantized GGUF asked to be quantized again.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::*;
use mpt_engine::Quantization;
use mpt_server::config::ServerConfig;
use serde_json::json;

fn gguf(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/gguf")
        .join(name)
}

async fn greedy(server: &mpt_server::RunningServer, model: &str, prompt: &str) -> String {
    let (status, body) = post(
        server,
        "/v1/completions",
        json!({"model": model, "prompt": prompt, "max_tokens": 24, "temperature": 0,
               "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["choices"][0]["text"]
        .as_str()
        .expect("text")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn q8_0_demo_serves_the_f32_demos_greedy_text() {
    let f32 = start(|_| {}).await;
    let q8 = start(|c| c.quantization = Some(Quantization::Q8_0)).await;
    let mut same = 0;
    let prompts = ["KING.\nMy lord,", "To be, or not to be", "Romeo.\n", "O, "];
    for prompt in prompts {
        let (a, b) = (
            greedy(&f32, MODEL, prompt).await,
            greedy(&q8, MODEL, prompt).await,
        );
        assert!(!b.is_empty());
        same += usize::from(a == b);
    }
    // 99% of next tokens agree (tests/fixtures in crates/engine: quantized_accuracy.rs); over
    // 24 greedy tokens most continuations stay identical.
    assert!(
        same >= prompts.len() / 2,
        "only {same} of {} continuations agree",
        prompts.len()
    );
    f32.shutdown().await.expect("clean shutdown");
    q8.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gguf_file_serves_with_the_tokenizer_from_its_metadata() {
    let server = start(|c| {
        c.model = Some(gguf("pow2-f32.gguf"));
        c.served_model_name = "pow2".into();
    })
    .await;
    let (status, body) = post(
        &server,
        "/v1/completions",
        // The fixture's vocabulary is 1024 ids: a token-id prompt inside it, and the text
        // of the completion from the rebuilt tokenizer.
        json!({"model": "pow2", "prompt": [310, 253, 50], "max_tokens": 4, "ignore_eos": true}),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["usage"]["completion_tokens"], 4, "{body}");
    assert!(
        body["choices"][0]["text"]
            .as_str()
            .is_some_and(|t| !t.is_empty()),
        "{body}"
    );
    // The GPT-NeoX ids of the text, from the rebuilt tokenizer.
    let (status, body) = post(&server, "/tokenize", json!({"prompt": "Hello world"})).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["tokens"], json!([12092, 1533]), "{body}");
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quantizing_a_quantized_gguf_stops_startup_with_the_reason() {
    let config = ServerConfig {
        host: "127.0.0.1".into(),
        port: 0,
        threads: Some(1),
        model: Some(gguf("pow2-q8_0.gguf")),
        quantization: Some(Quantization::Q4K),
        shutdown_timeout: Duration::from_secs(5),
        ..ServerConfig::default()
    };
    match mpt_server::start(config).await {
        Ok(_) => panic!("a quantized GGUF must not be quantized again"),
        Err(e) => {
            let text = e.to_string();
            assert!(text.contains("already holds quantized weights"), "{text}");
        }
    }
}
