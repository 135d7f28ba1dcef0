//! Black-box tests of the HTTP API: the real server (demo model) on a free port, real HTTP.
//! Covers every error class, completions in all prompt forms, streaming format, echo/logprobs,
//! the tokenizer endpoints, CORS, and the shipped config files (chat and the OpenAI SDK are in chat_api.rs).

mod common;

use common::*;
use serde_json::{Value, json};

fn completion(extra: Value) -> Value {
    let mut body =
        json!({"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 5, "temperature": 0});
    for (k, v) in extra.as_object().expect("object") {
        body[k] = v.clone();
    }
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_class_has_our_shape() {
    let server = start(|_| {}).await;
    let c = client();
    let raw = |body: &'static str, content_type: &'static str| {
        c.post(url(&server, "/v1/completions"))
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    // Malformed bodies: not JSON, not an object, empty.
    for (body, ct) in [
        ("{not json", "application/json"),
        ("[1, 2]", "application/json"),
        ("", "application/json"),
        ("\"x\"", "application/json"),
    ] {
        let r = raw(body, ct).await.expect("sent");
        let status = r.status().as_u16();
        let v: Value = r.json().await.expect("JSON error body, never plain text");
        assert_error(status, &v, 400, None);
    }
    // Non-JSON content type.
    let r = raw("{}", "text/plain").await.expect("sent");
    let status = r.status().as_u16();
    assert_error(status, &r.json().await.expect("json"), 415, None);
    // Wrong types and out-of-range values name the field.
    let cases = [
        (json!({"temperature": "hot"}), "temperature"),
        (json!({"temperature": 2.5}), "temperature"),
        (json!({"top_p": 0}), "top_p"),
        (json!({"n": 0}), "n"),
        (json!({"n": 2, "best_of": 1}), "best_of"),
        (json!({"logprobs": 6}), "logprobs"),
        (json!({"max_tokens": -1}), "max_tokens"),
        (json!({"max_tokens": "five"}), "max_tokens"),
        (json!({"stop": ["a", "b", "c", "d", "e"]}), "stop"),
        (json!({"stop": 7}), "stop"),
        (json!({"presence_penalty": 3}), "presence_penalty"),
        (json!({"frequency_penalty": -2.5}), "frequency_penalty"),
        (json!({"logit_bias": {"50": 101}}), "logit_bias"),
        (json!({"logit_bias": {"abc": 1}}), "logit_bias"),
        (json!({"prompt": ""}), "prompt"),
        (json!({"prompt": []}), "prompt"),
        (json!({"prompt": [[]]}), "prompt"),
        (json!({"prompt": [1, "a"]}), "prompt"),
        (json!({"prompt": [999_999]}), "prompt"),
        (json!({"prompt": [-1]}), "prompt"),
        (json!({"prompt": {"text": "x"}}), "prompt"),
        (json!({"suffix": "after"}), "suffix"),
        (json!({"stream": true, "best_of": 2}), "best_of"),
        (json!({"echo": "yes"}), "echo"),
    ];
    for (extra, param) in cases {
        let (status, v) = post(&server, "/v1/completions", completion(extra.clone())).await;
        assert_error(status, &v, 400, Some(param));
    }
    let (status, v) = post(&server, "/v1/completions", json!({"model": MODEL})).await;
    assert_error(status, &v, 400, Some("prompt"));
    // Context length: vLLM's message with the numbers.
    let (status, v) = post(
        &server,
        "/v1/completions",
        completion(json!({"prompt": vec![1; 10], "max_tokens": 2045})),
    )
    .await;
    assert_error(status, &v, 400, Some("max_tokens"));
    assert_eq!(v["error"]["code"], "context_length_exceeded");
    let message = v["error"]["message"].as_str().expect("message");
    assert!(
        message.contains("2048")
            && message.contains("2055")
            && message.contains("10 in the prompt"),
        "{message}"
    );
    // Unknown model.
    let (status, v) = post(
        &server,
        "/v1/completions",
        completion(json!({"model": "gpt-4"})),
    )
    .await;
    assert_error(status, &v, 404, Some("model"));
    // Body over the limit.
    let big = "a".repeat(5 * 1024 * 1024);
    let (status, v) = post(
        &server,
        "/v1/completions",
        completion(json!({"prompt": big})),
    )
    .await;
    assert_error(status, &v, 413, None);
    // Unknown route and wrong method: still our shape.
    let r = c.get(url(&server, "/v1/nope")).send().await.expect("sent");
    let status = r.status().as_u16();
    assert_error(status, &r.json().await.expect("json"), 404, None);
    let r = c
        .get(url(&server, "/v1/completions"))
        .send()
        .await
        .expect("sent");
    let status = r.status().as_u16();
    assert_error(status, &r.json().await.expect("json"), 405, None);
    // Chat validation.
    for (body, param) in [
        (json!({"model": MODEL}), "messages"),
        (json!({"model": MODEL, "messages": []}), "messages"),
        (
            json!({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}),
            "messages[0].role",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": 5}]}),
            "messages[0].content",
        ),
        (
            json!({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 0}),
            "max_tokens",
        ),
        (json!({"model": MODEL, "messages": "hi"}), "messages"),
    ] {
        let (status, v) = post(&server, "/v1/chat/completions", body).await;
        assert_error(status, &v, 400, Some(param));
    }
    // Nothing leaked: the server still serves and holds no KV blocks.
    let (status, _) = post(&server, "/v1/completions", completion(json!({}))).await;
    assert_eq!(status, 200);
    wait_idle(&server).await;
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_key_guards_the_api_but_not_the_probes() {
    let server = start(|c| c.api_key = Some("s3cret".into())).await;
    let c = client();
    let body = completion(json!({}));
    let missing = c
        .post(url(&server, "/v1/completions"))
        .json(&body)
        .send()
        .await
        .expect("sent");
    let status = missing.status().as_u16();
    assert_error(status, &missing.json().await.expect("json"), 401, None);
    let wrong = c
        .post(url(&server, "/v1/completions"))
        .bearer_auth("s3cret!")
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert_eq!(wrong.status(), 401);
    let right = c
        .post(url(&server, "/v1/completions"))
        .bearer_auth("s3cret")
        .json(&body)
        .send()
        .await
        .expect("sent");
    assert_eq!(right.status(), 200);
    for (path, body) in [
        ("/tokenize", json!({"model": MODEL, "prompt": "hi"})),
        ("/detokenize", json!({"model": MODEL, "tokens": [1]})),
    ] {
        let missing = c.post(url(&server, path)).json(&body).send().await;
        assert_eq!(missing.expect("sent").status(), 401, "{path}");
        let right = c
            .post(url(&server, path))
            .bearer_auth("s3cret")
            .json(&body)
            .send();
        assert_eq!(right.await.expect("sent").status(), 200, "{path}");
    }
    for path in ["/health", "/ready", "/metrics"] {
        assert_eq!(
            c.get(url(&server, path))
                .send()
                .await
                .expect("sent")
                .status(),
            200,
            "{path}"
        );
    }
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_plain_in_every_prompt_form() {
    let server = start(|_| {}).await;
    let (status, v) = post(&server, "/v1/completions", completion(json!({}))).await;
    assert_eq!(status, 200, "{v}");
    assert!(v["id"].as_str().expect("id").starts_with("cmpl-"));
    assert_eq!(v["object"], "text_completion");
    assert_eq!(v["model"], MODEL);
    assert!(v["created"].as_u64().expect("created") > 1_600_000_000);
    let choice = &v["choices"][0];
    assert_eq!(choice["index"], 0);
    assert!(choice["logprobs"].is_null());
    assert!(matches!(
        choice["finish_reason"].as_str(),
        Some("length" | "stop")
    ));
    let (_, tok) = post(
        &server,
        "/tokenize",
        json!({"model": MODEL, "prompt": "The quick brown fox"}),
    )
    .await;
    let ids: Vec<u64> = tok["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_u64().expect("id"))
        .collect();
    assert_eq!(tok["count"], ids.len());
    assert_eq!(v["usage"]["prompt_tokens"], ids.len());
    let completion_tokens = v["usage"]["completion_tokens"].as_u64().expect("n");
    assert!((1..=5).contains(&completion_tokens));
    assert_eq!(
        v["usage"]["total_tokens"],
        ids.len() as u64 + completion_tokens
    );
    let (_, detok) = post(&server, "/detokenize", json!({"tokens": ids})).await;
    assert_eq!(detok["prompt"], "The quick brown fox");
    let (status, v) = post(&server, "/detokenize", json!({"tokens": [999_999]})).await;
    assert_error(status, &v, 400, Some("tokens"));
    // The same prompt as ids gives the same greedy text.
    let (_, by_ids) = post(
        &server,
        "/v1/completions",
        completion(json!({"prompt": ids})),
    )
    .await;
    assert_eq!(by_ids["choices"][0]["text"], choice["text"]);
    // Several prompts × n: prompt-major indexes; greedy choices of one prompt agree.
    let body =
        completion(json!({"prompt": ["The quick brown fox", "Hello"], "n": 2, "best_of": 3}));
    let (status, v) = post(&server, "/v1/completions", body).await;
    assert_eq!(status, 200, "{v}");
    let choices = v["choices"].as_array().expect("choices");
    assert_eq!(choices.len(), 4);
    for (i, c) in choices.iter().enumerate() {
        assert_eq!(c["index"], i);
    }
    assert_eq!(choices[0]["text"], choice["text"]);
    assert_eq!(choices[1]["text"], choice["text"]);
    assert_eq!(choices[2]["text"], choices[3]["text"]);
    let (_, hello) = post(
        &server,
        "/v1/completions",
        completion(json!({"prompt": "Hello"})),
    )
    .await;
    assert_eq!(choices[2]["text"], hello["choices"][0]["text"]);
    // List of lists of ids.
    let (status, v) = post(
        &server,
        "/v1/completions",
        completion(json!({"prompt": [[1, 2, 3], [4, 5]]})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"].as_array().expect("choices").len(), 2);
    assert_eq!(v["usage"]["prompt_tokens"], 5);
    // Seeded sampling is reproducible.
    let seeded = completion(json!({"temperature": 1.0, "seed": 42, "max_tokens": 8}));
    let (_, a) = post(&server, "/v1/completions", seeded.clone()).await;
    let (_, b) = post(&server, "/v1/completions", seeded).await;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
    // Models.
    let models: Value = client()
        .get(url(&server, "/v1/models"))
        .send()
        .await
        .expect("sent")
        .json()
        .await
        .expect("json");
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], MODEL);
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_strings_cut_the_text() {
    let server = start(|_| {}).await;
    let body = completion(json!({"max_tokens": 24, "ignore_eos": true}));
    let (_, full) = post(&server, "/v1/completions", body.clone()).await;
    let text = full["choices"][0]["text"]
        .as_str()
        .expect("text")
        .to_string();
    let chars: Vec<char> = text.chars().collect();
    assert!(
        chars.len() >= 8,
        "greedy text too short to test stops: {text:?}"
    );
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 2].iter().collect();
    let expected = &text[..text.find(&stop).expect("stop occurs")];
    let mut with_stop = body.clone();
    with_stop["stop"] = json!([stop]);
    let (_, v) = post(&server, "/v1/completions", with_stop.clone()).await;
    assert_eq!(
        v["choices"][0]["text"], expected,
        "stop {stop:?} in {text:?}"
    );
    assert_eq!(v["choices"][0]["finish_reason"], "stop");
    // Streaming honours the stop string identically.
    with_stop["stream"] = json!(true);
    let chunks = stream_chunks(&server, "/v1/completions", with_stop).await;
    assert_eq!(
        joined_text(&chunks, |c| c["text"].as_str()),
        vec![expected.to_string()]
    );
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_format_usage_and_equivalence() {
    let server = start(|_| {}).await;
    let base = completion(
        json!({"prompt": ["The quick brown fox", "Once upon a time"], "n": 2, "max_tokens": 12}),
    );
    let (_, plain) = post(&server, "/v1/completions", base.clone()).await;
    let mut streamed = base.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let chunks = stream_chunks(&server, "/v1/completions", streamed).await;
    let id = chunks[0]["id"].as_str().expect("id");
    for chunk in &chunks {
        assert_eq!(chunk["id"], id);
        assert_eq!(chunk["object"], "text_completion");
    }
    // Exactly one non-null finish_reason per choice, after all of its text.
    let mut finished = [0; 4];
    for chunk in &chunks {
        for c in chunk["choices"].as_array().expect("choices") {
            let i = c["index"].as_u64().expect("index") as usize;
            assert_eq!(finished[i], 0, "text after finish for choice {i}");
            if !c["finish_reason"].is_null() {
                finished[i] += 1;
            }
        }
    }
    assert_eq!(finished, [1; 4]);
    // The usage chunk is last, with no choices, equal to the non-streamed usage.
    let last = chunks.last().expect("chunks");
    assert_eq!(last["choices"], json!([]));
    assert_eq!(last["usage"], plain["usage"]);
    assert!(
        chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c.get("usage").is_none())
    );
    // Joined streamed text == non-streamed text, per choice.
    let texts = joined_text(&chunks, |c| c["text"].as_str());
    let expected: Vec<String> = plain["choices"]
        .as_array()
        .expect("choices")
        .iter()
        .map(|c| c["text"].as_str().expect("text").to_string())
        .collect();
    assert_eq!(texts, expected);
    // Without include_usage there is no usage chunk.
    let mut no_usage = base;
    no_usage["stream"] = json!(true);
    let chunks = stream_chunks(&server, "/v1/completions", no_usage).await;
    assert!(chunks.iter().all(|c| c.get("usage").is_none()));
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_with_prompt_logprobs_and_zero_max_tokens() {
    let server = start(|_| {}).await;
    let prompt = "The capital of France is Paris";
    let (_, tok) = post(&server, "/tokenize", json!({"prompt": prompt})).await;
    let n_prompt = tok["count"].as_u64().expect("count") as usize;
    let (status, v) = post(
        &server,
        "/v1/completions",
        completion(json!({"prompt": prompt, "echo": true, "logprobs": 2, "max_tokens": 0})),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let c = &v["choices"][0];
    assert_eq!(c["text"], prompt);
    let lp = &c["logprobs"];
    assert_eq!(lp["tokens"].as_array().expect("tokens").len(), n_prompt);
    assert_eq!(
        lp["tokens"]
            .as_array()
            .expect("tokens")
            .iter()
            .map(|t| t.as_str().expect("s"))
            .collect::<String>(),
        prompt
    );
    let token_logprobs = lp["token_logprobs"].as_array().expect("token_logprobs");
    assert_eq!(token_logprobs.len(), n_prompt);
    assert!(token_logprobs[0].is_null());
    assert!(
        token_logprobs[1..]
            .iter()
            .all(|l| l.as_f64().expect("number") <= 0.0)
    );
    let top = lp["top_logprobs"].as_array().expect("top_logprobs");
    assert!(top[0].is_null());
    assert!(
        top[1..]
            .iter()
            .all(|t| (1..=3).contains(&t.as_object().expect("dict").len()))
    );
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .expect("offsets")
        .iter()
        .map(|o| o.as_u64().expect("n"))
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] < w[1]));
    assert_eq!(v["usage"]["completion_tokens"], 0);
    assert_eq!(v["usage"]["prompt_tokens"], n_prompt);
    // Echo with generation: prompt first, then generated tokens with continuing offsets.
    let (_, v) = post(&server, "/v1/completions", completion(json!({"prompt": prompt, "echo": true, "logprobs": 1, "max_tokens": 3, "ignore_eos": true}))).await;
    let c = &v["choices"][0];
    assert!(c["text"].as_str().expect("text").starts_with(prompt));
    let lp = &c["logprobs"];
    assert_eq!(lp["tokens"].as_array().expect("tokens").len(), n_prompt + 3);
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .expect("offsets")
        .iter()
        .map(|o| o.as_u64().expect("n"))
        .collect();
    assert_eq!(offsets[n_prompt], prompt.chars().count() as u64);
    // Streaming echo sends the prompt first.
    let chunks = stream_chunks(
        &server,
        "/v1/completions",
        completion(json!({"prompt": prompt, "echo": true, "max_tokens": 2, "stream": true})),
    )
    .await;
    assert_eq!(chunks[0]["choices"][0]["text"], prompt);
    server.shutdown().await.expect("clean shutdown");
}

#[test]
fn shipped_config_files_parse() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("config/ exists") {
        let path = entry.expect("entry").path();
        if path.extension().is_some_and(|e| e == "toml") {
            let file = mpt_server::config::load_file(&path).unwrap_or_else(|e| panic!("{e}"));
            mpt_server::config::ServerConfig::resolve(Default::default(), file)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
    }
    assert!(seen >= 1, "no config/*.toml found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_is_off_by_default_and_configurable() {
    let preflight = |server: &mpt_server::RunningServer| {
        client()
            .request(reqwest::Method::OPTIONS, url(server, "/v1/completions"))
            .header("origin", "https://app.example")
            .header("access-control-request-method", "POST")
            .send()
    };
    let server = start(|_| {}).await;
    let r = preflight(&server).await.expect("sent");
    assert!(r.headers().get("access-control-allow-origin").is_none());
    server.shutdown().await.expect("clean shutdown");
    let server = start(|c| c.cors_allow_origin = vec!["https://app.example".into()]).await;
    let r = preflight(&server).await.expect("sent");
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    server.shutdown().await.expect("clean shutdown");
}
