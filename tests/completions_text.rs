//! Black-box tests of what completions say about their text: streams never send empty text
//! while a character is held back, `text_offset` lines up with the text for multi-byte
//! characters, and `top_logprobs` come most likely first.

mod common;

use common::*;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde_json::{Value, json};

/// The byte-level BPE token of the single byte 0xF0: the lead byte of a four-byte character,
/// so text made of it alone never becomes valid UTF-8.
fn lead_byte_token() -> u32 {
    let tokenizer = mpt_engine::Tokenizer::from_bytes(mpt_engine::model::demo::TOKENIZER_JSON)
        .expect("demo tokenizer");
    tokenizer.token_to_id("ð").expect("byte token of 0xF0")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_send_no_empty_text_while_bytes_are_held_back() {
    let server = start(|_| {}).await;
    let token = lead_byte_token();
    for logprobs in [Value::Null, json!(1)] {
        let chunks = stream_chunks(
            &server,
            "/v1/completions",
            json!({"model": MODEL, "prompt": "Hello", "max_tokens": 11, "temperature": 0,
                   "ignore_eos": true, "stream": true, "logprobs": logprobs,
                   "logit_bias": {token.to_string(): 100}}),
        )
        .await;
        let mut entries = 0;
        for chunk in &chunks {
            let choice = &chunk["choices"][0];
            assert!(
                choice["text"] != "" || !choice["finish_reason"].is_null(),
                "empty text chunk before the end: {chunk}"
            );
            entries += choice["logprobs"]["tokens"].as_array().map_or(0, Vec::len);
        }
        let finish = chunks.last().expect("chunks")["choices"][0]["finish_reason"].clone();
        assert_eq!(finish, "length");
        if !logprobs.is_null() {
            assert_eq!(entries, 11, "every token's logprob arrives once");
        }
    }
    server.shutdown().await.expect("clean shutdown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_offsets_line_up_with_multibyte_text() {
    let server = start(|_| {}).await;
    let prompt = "I 🦀 you, 中文 too";
    let (status, v) = post(
        &server,
        "/v1/completions",
        json!({"model": MODEL, "prompt": prompt, "echo": true, "logprobs": 1, "max_tokens": 4,
               "temperature": 0}),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    let text: Vec<char> = choice["text"].as_str().expect("text").chars().collect();
    let lp = &choice["logprobs"];
    let tokens: Vec<&str> = lp["tokens"]
        .as_array()
        .expect("tokens")
        .iter()
        .map(|t| t.as_str().expect("token"))
        .collect();
    let offsets: Vec<usize> = lp["text_offset"]
        .as_array()
        .expect("offsets")
        .iter()
        .map(|o| o.as_u64().expect("offset") as usize)
        .collect();
    assert_eq!(tokens.len(), offsets.len());
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]), "{offsets:?}");
    let mut whole = 0;
    for (token, &at) in tokens.iter().zip(&offsets) {
        assert!(at <= text.len(), "offset {at} past the text");
        if token.contains(char::REPLACEMENT_CHARACTER) {
            continue; // part of a character: it starts where that character does
        }
        let found: String = text[at..].iter().take(token.chars().count()).collect();
        assert_eq!(
            found, *token,
            "token {token:?} is not at offset {at} of {text:?}"
        );
        whole += 1;
    }
    assert!(whole > 4, "most tokens are whole and checked");
    server.shutdown().await.expect("clean shutdown");
}

/// A JSON object's entries in the order they were written (serde_json's map sorts keys).
struct Ordered(Vec<(String, f64)>);

impl<'de> serde::Deserialize<'de> for Ordered {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Entries;
        impl<'de> Visitor<'de> for Entries {
            type Value = Ordered;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object of numbers")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Ordered, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = map.next_entry::<String, f64>()? {
                    out.push(entry);
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_map(Entries)
    }
}

#[derive(serde::Deserialize)]
struct Body {
    choices: Vec<BodyChoice>,
}

#[derive(serde::Deserialize)]
struct BodyChoice {
    logprobs: BodyLogprobs,
}

#[derive(serde::Deserialize)]
struct BodyLogprobs {
    top_logprobs: Vec<Ordered>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_logprobs_come_most_likely_first() {
    let server = start(|_| {}).await;
    let text = client()
        .post(url(&server, "/v1/completions"))
        .json(
            &json!({"model": MODEL, "prompt": "To be, or not", "max_tokens": 6,
                      "temperature": 1.0, "seed": 3, "logprobs": 5}),
        )
        .send()
        .await
        .expect("sent")
        .text()
        .await
        .expect("body");
    let body: Body = serde_json::from_str(&text).expect("completion body");
    let positions = &body.choices[0].logprobs.top_logprobs;
    assert_eq!(positions.len(), 6);
    for Ordered(entries) in positions {
        assert!((5..=6).contains(&entries.len()), "{entries:?}");
        assert!(
            entries.windows(2).all(|w| w[0].1 >= w[1].1),
            "not most likely first: {entries:?}"
        );
    }
    server.shutdown().await.expect("clean shutdown");
}
