//! Unit tests of `validation.rs` on the demo model's real tokenizer.

use super::*;
use serde_json::json;

fn tokenizer() -> Tokenizer {
    Tokenizer::from_bytes(mpt_engine::model::demo::TOKENIZER_JSON).expect("demo tokenizer")
}

fn ctx(t: &Tokenizer) -> ValidationContext<'_> {
    ValidationContext {
        model_name: "m",
        max_model_len: 64,
        vocab_size: 50432,
        tokenizer: t,
        chat_stop_token: Some(7),
    }
}

fn completion(body: serde_json::Value) -> CompletionRequest {
    serde_json::from_value(body).expect("wire request")
}

#[test]
fn prompt_forms() {
    let p = |v: serde_json::Value| parse_prompt(Some(&v), 100);
    assert_eq!(
        p(json!("hi")).expect("ok"),
        vec![PromptInput::Text("hi".into())]
    );
    assert_eq!(p(json!(["a", "b"])).expect("ok").len(), 2);
    assert_eq!(
        p(json!([1, 2])).expect("ok"),
        vec![PromptInput::Ids(vec![1, 2])]
    );
    assert_eq!(p(json!([[1], [2, 3]])).expect("ok").len(), 2);
    for bad in [
        json!(""),
        json!([]),
        json!([[]]),
        json!([100]),
        json!([1.5]),
        json!(3),
        json!(["a", 1]),
    ] {
        let err = p(bad.clone()).expect_err("rejected");
        assert_eq!(err.body().error.param.as_deref(), Some("prompt"), "{bad}");
    }
}

#[test]
fn completion_defaults_and_fields() {
    let t = tokenizer();
    let v = validate_completion(
        &completion(json!({"prompt": [[9, 10], [5, 6]], "n": 2, "echo": true, "logprobs": 3, "stop": "x",
            "temperature": 0.5, "top_k": -1, "logit_bias": {"42": -100}, "seed": 9, "min_tokens": 2})),
        &ctx(&t),
        "cmpl-1",
    )
    .expect("valid");
    assert_eq!(v.requests.len(), 2);
    let r = &v.requests[1];
    assert_eq!(r.request_id, "cmpl-1-1");
    assert_eq!(r.prompt_token_ids, vec![5, 6]);
    assert_eq!(
        (r.n, r.best_of, r.logprobs, r.prompt_logprobs),
        (2, 2, Some(3), Some(3))
    );
    assert_eq!(r.stop.max_tokens, DEFAULT_MAX_TOKENS);
    assert_eq!(r.stop.min_tokens, 2);
    assert_eq!(r.stop.stop_strings, vec!["x".to_string()]);
    assert_eq!(r.sampling.top_k, 0);
    assert_eq!(r.sampling.logit_bias, vec![(42, -100.0)]);
    assert_eq!(r.sampling.seed, Some(9));
    assert_eq!(v.prompt_texts[0], t.decode(&[9, 10]).expect("decodes"));
    assert_eq!(v.prompt_texts[1], t.decode(&[5, 6]).expect("decodes"));
}

#[test]
fn max_tokens_beyond_the_context_is_a_context_length_error() {
    let t = tokenizer();
    let err = validate_completion(
        &completion(json!({"prompt": [1, 2], "max_tokens": 100_000})),
        &ctx(&t),
        "x",
    )
    .expect_err("cannot fit");
    let body = err.body().error;
    assert_eq!(body.code.as_deref(), Some("context_length_exceeded"));
    assert!(
        body.message
            .contains("100002 tokens (2 in the prompt, 100000 for the completion)"),
        "{}",
        body.message
    );
}

#[test]
fn context_length_is_checked_with_numbers() {
    let t = tokenizer();
    let err = validate_completion(
        &completion(json!({"prompt": vec![1; 60], "max_tokens": 10})),
        &ctx(&t),
        "x",
    )
    .expect_err("too long");
    let body = err.body().error;
    assert_eq!(body.code.as_deref(), Some("context_length_exceeded"));
    assert!(
        body.message.contains("64") && body.message.contains("70"),
        "{}",
        body.message
    );
    assert!(
        validate_completion(
            &completion(json!({"prompt": vec![1; 60], "max_tokens": 4})),
            &ctx(&t),
            "x"
        )
        .is_ok()
    );
}

#[test]
fn chat_adds_im_end_stops_and_fills_max_tokens() {
    let t = tokenizer();
    let req: ChatCompletionRequest =
        serde_json::from_value(json!({"messages": [{"role": "user", "content": "hi"}]}))
            .expect("wire");
    let v = validate_chat(&req, &ctx(&t), "c", "<|im_start|>user\nhi", None).expect("valid");
    assert!(
        v.request
            .stop
            .stop_strings
            .contains(&"<|im_end|>".to_string())
    );
    assert_eq!(v.request.stop.stop_token_ids, vec![7]);
    assert_eq!(
        v.request.stop.max_tokens + v.request.prompt_token_ids.len(),
        64
    );
}
