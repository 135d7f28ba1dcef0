//! Speculative decoding, end to end: a server started with `--speculative-config` (n-gram)
//! answers greedy and seeded completions and chats with bitwise the same text, tokens and
//! logprobs as one without it, streamed or not (the stream's pieces join to the same text); its
//! /metrics count drafts with vLLM's names; and the KV pool is empty again afterwards, also
//! after streams cancelled mid-generation.

mod common;

use common::*;
use mpt_engine::NgramSpeculation;
use mpt_server::config::ServerConfig;
use serde_json::{Value, json};

fn speculative(c: &mut ServerConfig) {
    c.speculative = Some(NgramSpeculation {
        num_speculative_tokens: 4,
        prompt_lookup_max: 3,
        prompt_lookup_min: 1,
        // Drafts whatever the batch: the comparison must not depend on the cost model's timing.
        disable_by_batch_size: Some(usize::MAX),
    });
    c.block_size = 4; // drafts cross block boundaries all the time
}

fn bodies() -> Vec<(&'static str, Value)> {
    let mut out = Vec::new();
    for (i, prompt) in ["Romeo.\n", "KING.\nMy lord,", "To be, or not to be"]
        .iter()
        .enumerate()
    {
        out.push((
            "/v1/completions",
            json!({"model": MODEL, "prompt": prompt, "max_tokens": 64, "temperature": 0,
                   "logprobs": 5}),
        ));
        out.push((
            "/v1/completions",
            json!({"model": MODEL, "prompt": prompt, "max_tokens": 48, "temperature": 0.8,
                   "seed": i, "logprobs": 2, "stop": ["\n\n"]}),
        ));
        out.push((
            "/v1/chat/completions",
            json!({"model": MODEL, "messages": [{"role": "user", "content": prompt}],
                   "max_tokens": 40, "temperature": 0, "logprobs": true, "top_logprobs": 3}),
        ));
    }
    out
}

/// The replies' choices, and for the completions the text its stream joins to.
async fn answers(server: &mpt_server::RunningServer) -> (Vec<Value>, Vec<String>) {
    let (mut choices, mut streamed) = (Vec::new(), Vec::new());
    for (path, body) in bodies() {
        let (status, reply) = post(server, path, body.clone()).await;
        assert_eq!(status, 200, "{reply}");
        choices.push(reply["choices"].clone());
        if path == "/v1/completions" {
            let mut body = body;
            body["stream"] = json!(true);
            let chunks = stream_chunks(server, path, body).await;
            let text = joined_text(&chunks, |c| c["text"].as_str());
            streamed.push(text.concat());
        }
    }
    (choices, streamed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speculation_answers_exactly_as_plain_decoding_and_counts_its_drafts() {
    let plain = start(|c| c.block_size = 4).await;
    let (want, want_streamed) = answers(&plain).await;
    plain.shutdown().await.expect("clean shutdown");

    let server = start(speculative).await;
    let (got, streamed) = answers(&server).await;
    for (i, (g, w)) in got.iter().zip(&want).enumerate() {
        assert_eq!(g, w, "reply {i} differs with speculation");
    }
    assert_eq!(streamed, want_streamed);
    let completions: Vec<&Value> = want.iter().step_by(3).collect();
    for (text, choice) in want_streamed.iter().step_by(2).zip(completions) {
        assert_eq!(Some(text.as_str()), choice[0]["text"].as_str());
    }
    let series = |name: &str| format!("{name}{{model_name=\"{MODEL}\"}}");
    let drafts = metric(&server, &series("vllm:spec_decode_num_drafts_total")).await;
    let drafted = metric(&server, &series("vllm:spec_decode_num_draft_tokens_total")).await;
    let accepted = metric(
        &server,
        &series("vllm:spec_decode_num_accepted_tokens_total"),
    )
    .await;
    assert!(
        drafts > 0.0 && accepted > 0.0,
        "{drafts} drafts, {accepted} accepted"
    );
    assert!(
        drafted >= accepted && drafted >= drafts,
        "{drafted} drafted"
    );
    wait_idle(&server).await;
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelled_speculative_streams_give_their_kv_blocks_back() {
    let server = start(speculative).await;
    let mut open = Vec::new();
    for i in 0..6 {
        let body = json!({"model": MODEL, "prompt": "Romeo.\n", "max_tokens": 300,
                          "temperature": 0, "stream": true, "seed": i});
        let mut response = client()
            .post(url(&server, "/v1/completions"))
            .json(&body)
            .send()
            .await
            .expect("sent");
        assert_eq!(response.status(), 200);
        read_events(&mut response, 3).await;
        open.push(response);
    }
    drop(open); // every client leaves mid-generation
    wait_idle(&server).await;
    let series = format!("vllm:spec_decode_num_drafts_total{{model_name=\"{MODEL}\"}}");
    assert!(metric(&server, &series).await > 0.0);
    server.shutdown().await.expect("clean shutdown");
}
