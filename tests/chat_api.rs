//! Black-box tests of chat completions and of a real OpenAI client (async-openai) against the
//! real server (demo model) on a free port.

mod common;

use common::*;
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_plain_and_streamed_agree() {
    let server = start(|_| {}).await;
    let body = json!({"model": MODEL, "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}], "max_tokens": 8, "temperature": 0});
    let (status, v) = post(&server, "/v1/chat/completions", body.clone()).await;
    assert_eq!(status, 200, "{v}");
    assert!(v["id"].as_str().expect("id").starts_with("chatcmpl-"));
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let text = v["choices"][0]["message"]["content"]
        .as_str()
        .expect("content")
        .to_string();
    // The prompt is ChatML: /tokenize with the same messages gives the prompt token count.
    let (_, tok) = post(&server, "/tokenize", json!({"messages": body["messages"]})).await;
    assert_eq!(v["usage"]["prompt_tokens"], tok["count"]);
    let mut streamed = body;
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let chunks = stream_chunks(&server, "/v1/chat/completions", streamed).await;
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert!(
        chunks
            .iter()
            .all(|c| c["object"] == "chat.completion.chunk")
    );
    let joined = joined_text(&chunks, |c| c["delta"]["content"].as_str());
    assert_eq!(joined, vec![text]);
    let finishes = chunks
        .iter()
        .flat_map(|c| c["choices"].as_array().expect("choices").clone())
        .filter(|c| !c["finish_reason"].is_null())
        .count();
    assert_eq!(finishes, 1);
    assert_eq!(chunks.last().expect("chunks")["usage"], v["usage"]);
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_openai_client_works() {
    use async_openai::Client;
    use async_openai::config::OpenAIConfig;
    use async_openai::types::chat::{
        ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs,
    };
    use async_openai::types::completions::CreateCompletionRequestArgs;
    use futures::StreamExt;

    let server = start(|c| c.api_key = Some("sk-test".into())).await;
    let config = OpenAIConfig::new()
        .with_api_base(format!("http://{}/v1", server.addr()))
        .with_api_key("sk-test");
    let client = Client::with_config(config);
    let request = CreateCompletionRequestArgs::default()
        .model(MODEL)
        .prompt("Tell me a story")
        .max_tokens(6u32)
        .temperature(0.0)
        .build()
        .expect("request");
    let response = client
        .completions()
        .create(request.clone())
        .await
        .expect("completion");
    assert_eq!(response.choices.len(), 1);
    let text = response.choices[0].text.clone();
    let usage = response.usage.expect("usage");
    assert!(usage.completion_tokens >= 1);
    let mut stream = client
        .completions()
        .create_stream(request)
        .await
        .expect("stream");
    let mut streamed = String::new();
    while let Some(chunk) = stream.next().await {
        for choice in chunk.expect("chunk parses").choices {
            streamed.push_str(&choice.text);
        }
    }
    assert_eq!(streamed, text);
    let chat = CreateChatCompletionRequestArgs::default()
        .model(MODEL)
        .max_tokens(6u32)
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("Hello!")
            .build()
            .expect("message")
            .into()])
        .build()
        .expect("chat request");
    let reply = client.chat().create(chat.clone()).await.expect("chat");
    assert_eq!(reply.choices.len(), 1);
    assert!(reply.choices[0].message.content.is_some());
    let mut stream = client
        .chat()
        .create_stream(chat)
        .await
        .expect("chat stream");
    let mut chunks = 0;
    while let Some(chunk) = stream.next().await {
        chunk.expect("chat chunk parses");
        chunks += 1;
    }
    assert!(chunks >= 2);
    // The SDK surfaces our error shape.
    let bad = CreateCompletionRequestArgs::default()
        .model("no-such-model")
        .prompt("x")
        .build()
        .expect("request");
    let err = client
        .completions()
        .create(bad)
        .await
        .expect_err("unknown model");
    assert!(err.to_string().contains("no-such-model"), "{err}");
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_logprobs_have_openai_shape() {
    let server = start(|_| {}).await;
    let body = json!({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        "max_tokens": 4, "ignore_eos": true, "logprobs": true, "top_logprobs": 2});
    let (status, v) = post(&server, "/v1/chat/completions", body).await;
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["logprobs"]["content"]
        .as_array()
        .expect("content");
    assert_eq!(content.len(), 4);
    for entry in content {
        assert!(entry["token"].is_string() && entry["logprob"].as_f64().expect("lp") <= 0.0);
        assert_eq!(
            entry["bytes"].as_array().expect("bytes").len(),
            entry["token"].as_str().expect("s").len()
        );
        assert_eq!(entry["top_logprobs"].as_array().expect("top").len(), 2);
    }
    let (status, v) = post(
        &server,
        "/v1/chat/completions",
        json!({"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2}),
    )
    .await;
    assert_error(status, &v, 400, Some("top_logprobs"));
    server.shutdown().await.expect("clean shutdown");
}
