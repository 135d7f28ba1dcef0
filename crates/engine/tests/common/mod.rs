//! Helpers shared by the engine's integration tests.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use mpt_engine::{
    EngineConfig, EngineHandle, Event, EventStream, FinishReason, GenerateRequest, KvCacheSize,
    SamplingParams, StopConditions,
};

/// A greedy one-choice request for exactly `max_tokens` tokens (EOS ignored).
pub fn request(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        request_id: "t".into(),
        prompt_token_ids: prompt,
        sampling: SamplingParams::default(),
        stop: StopConditions {
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        },
        n: 1,
        best_of: 1,
        logprobs: None,
        prompt_logprobs: None,
        constraint: None,
    }
}

/// A demo-model engine with a 512-block pool and 2 threads, adjusted by `f`.
pub fn engine(f: impl FnOnce(&mut EngineConfig)) -> EngineHandle {
    let mut config = EngineConfig {
        kv_cache: KvCacheSize::Blocks(512),
        threads: Some(2),
        ..Default::default()
    };
    f(&mut config);
    EngineHandle::start(config).expect("demo engine starts")
}

/// Everything one request produced.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Output {
    pub tokens: Vec<Vec<u32>>,
    pub text: Vec<String>,
    pub finish: Vec<Option<FinishReason>>,
    pub completed: bool,
    pub prompt_logprobs: usize,
    pub completion_tokens: usize,
}

/// Reads a request's events to the end (asserting one finish per choice).
pub fn collect(mut stream: EventStream) -> Output {
    let mut out = Output::default();
    while let Some(event) = stream.blocking_recv() {
        match event {
            Event::Delta(d) => {
                if out.tokens.len() <= d.index {
                    out.tokens.resize(d.index + 1, Vec::new());
                    out.text.resize(d.index + 1, String::new());
                    out.finish.resize(d.index + 1, None);
                }
                out.tokens[d.index].extend(&d.token_ids);
                out.text[d.index].push_str(&d.text);
            }
            Event::ChoiceFinished { index, reason } => {
                if out.finish.len() <= index {
                    out.finish.resize(index + 1, None);
                }
                assert!(
                    out.finish[index].replace(reason).is_none(),
                    "one finish per choice"
                );
            }
            Event::PromptLogprobs(lp) => out.prompt_logprobs = lp.len(),
            Event::Completed { usage, .. } => {
                out.completed = true;
                out.completion_tokens = usage.completion_tokens;
                break;
            }
            Event::Failed(message) => panic!("request failed: {message}"),
        }
    }
    out
}

/// A deterministic prompt of `len` in-vocabulary ids.
pub fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (seed * 7919 + i * 104_729) % 50_000 + 1)
        .collect()
}

/// Polls the engine's stats until `cond` holds (30 s at most).
pub fn wait_until(
    engine: &EngineHandle,
    what: &str,
    cond: impl Fn(&mpt_engine::EngineStats) -> bool,
) {
    let start = Instant::now();
    while !cond(&engine.stats()) {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}: {:?}",
            engine.stats()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A copy of a fixture checkpoint with the real tokenizer added (the fixtures ship without one).
pub fn fixture_dir(name: &str) -> std::path::PathBuf {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("../../tests/fixtures/models").join(name);
    let dst = std::env::temp_dir().join(format!("mpt-engine-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dst).expect("temp dir");
    for entry in std::fs::read_dir(&src).expect("fixture exists") {
        let path = entry.expect("dir entry").path();
        std::fs::copy(&path, dst.join(path.file_name().expect("file name"))).expect("copy");
    }
    std::fs::copy(
        root.join("assets/demo/tokenizer.json"),
        dst.join("tokenizer.json"),
    )
    .expect("copy");
    dst
}

/// Submits each request and reads it to the end before the next (each runs alone).
pub fn one_by_one<T>(
    engine: &EngineHandle,
    reqs: &[GenerateRequest],
    read: impl Fn(EventStream) -> T,
) -> Vec<T> {
    reqs.iter()
        .map(|r| read(engine.submit(r.clone()).expect("accepted")))
        .collect()
}

/// Submits every request at once, then reads each to the end (they run batched).
pub fn all_at_once<T>(
    engine: &EngineHandle,
    reqs: &[GenerateRequest],
    read: impl Fn(EventStream) -> T,
) -> Vec<T> {
    let streams: Vec<EventStream> = reqs
        .iter()
        .map(|r| engine.submit(r.clone()).expect("accepted"))
        .collect();
    streams.into_iter().map(read).collect()
}
