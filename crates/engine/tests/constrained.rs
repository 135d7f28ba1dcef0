//! Structured outputs end to end on the demo model: a constrained choice only ever produces
//! its grammar's language, ends with `Stop` once complete (`Length` when cut short), keeps its
//! grammar state across preemption and forks, and leaves unconstrained neighbours unchanged.

mod common;

use common::{all_at_once, one_by_one, request};
use std::time::{Duration, Instant};

use mpt_engine::{
    Constraint, EngineConfig, EngineHandle, Event, EventStream, FinishReason, GenerateRequest,
    KvCacheSize, SamplingParams, SubmitError,
};

fn engine(f: impl FnOnce(&mut EngineConfig)) -> EngineHandle {
    let mut config = EngineConfig {
        kv_cache: KvCacheSize::Blocks(512),
        threads: Some(2),
        ..Default::default()
    };
    f(&mut config);
    EngineHandle::start(config).expect("demo engine starts")
}

/// Text, finish reason and token count per choice.
fn collect(mut stream: EventStream) -> Vec<(String, Option<FinishReason>, usize)> {
    let mut out: Vec<(String, Option<FinishReason>, usize)> = Vec::new();
    let slot = |out: &mut Vec<_>, i: usize| {
        if out.len() <= i {
            out.resize(i + 1, (String::new(), None, 0));
        }
    };
    while let Some(event) = stream.blocking_recv() {
        match event {
            Event::Delta(d) => {
                slot(&mut out, d.index);
                out[d.index].0.push_str(&d.text);
                out[d.index].2 += d.token_ids.len();
            }
            Event::ChoiceFinished { index, reason } => {
                slot(&mut out, index);
                assert!(out[index].1.replace(reason).is_none(), "one finish");
            }
            Event::Completed { .. } => break,
            Event::Failed(message) => panic!("request failed: {message}"),
            Event::PromptLogprobs(_) => {}
        }
    }
    out
}

fn constrained(prompt: Vec<u32>, max_tokens: usize, c: Constraint) -> GenerateRequest {
    let mut r = request(prompt, max_tokens);
    r.stop.ignore_eos = false;
    r.constraint = Some(c);
    r
}

fn prompt(seed: u32, len: usize) -> Vec<u32> {
    (0..len as u32)
        .map(|i| (seed * 7919 + i * 104_729) % 50_000 + 1)
        .collect()
}

#[test]
fn complete_output_stops_short_output_is_length() {
    let e = engine(|_| {});
    let digits = Constraint::Regex("[0-9]{5}".into());
    let out = collect(
        e.submit(constrained(prompt(1, 6), 40, digits.clone()))
            .expect("ok"),
    );
    assert_eq!(out[0].1, Some(FinishReason::Stop), "{out:?}");
    assert!(
        out[0].0.len() == 5 && out[0].0.bytes().all(|b| b.is_ascii_digit()),
        "{out:?}"
    );
    let out = collect(e.submit(constrained(prompt(1, 6), 1, digits)).expect("ok"));
    assert_eq!(out[0].1, Some(FinishReason::Length), "{out:?}");
    assert!(out[0].0.bytes().all(|b| b.is_ascii_digit()), "{out:?}");

    // min_tokens cannot push a complete output further; ignore_eos neither.
    let mut r = constrained(prompt(2, 4), 40, Constraint::Regex("[0-9]{3}".into()));
    r.stop.min_tokens = 10;
    r.stop.ignore_eos = true;
    let out = collect(e.submit(r).expect("ok"));
    assert_eq!(out[0].1, Some(FinishReason::Stop));
    assert_eq!(out[0].0.len(), 3, "{out:?}");

    // logit_bias applies before the mask: a huge bias on a refused token changes nothing.
    let choices = vec!["yes".to_string(), "no".to_string()];
    let mut r = constrained(prompt(3, 5), 10, Constraint::Choice(choices.clone()));
    let x = e.tokenizer().encode("x").expect("encode")[0];
    r.sampling.logit_bias = vec![(x, 100.0)];
    let out = collect(e.submit(r).expect("ok"));
    assert!(choices.contains(&out[0].0), "{out:?}");
    assert_eq!(out[0].1, Some(FinishReason::Stop));
}

#[test]
fn forks_each_follow_the_grammar() {
    let e = engine(|_| {});
    let choices: Vec<String> = ["one", "two", "three", "four", "five"]
        .map(String::from)
        .to_vec();
    for (n, best_of) in [(3, 3), (2, 4)] {
        let mut r = constrained(prompt(4, 7), 12, Constraint::Choice(choices.clone()));
        r.n = n;
        r.best_of = best_of;
        r.sampling = SamplingParams {
            temperature: 1.5,
            seed: Some(9),
            ..Default::default()
        };
        let out = collect(e.submit(r).expect("ok"));
        assert_eq!(out.len(), n);
        for (text, finish, _) in &out {
            assert!(choices.contains(text), "{out:?}");
            assert_eq!(*finish, Some(FinishReason::Stop));
        }
    }
}

#[test]
fn preemption_keeps_grammar_state_and_neighbours_unchanged() {
    // Each request needs 10 + 30 tokens = 10 blocks of 4; the pool holds 14. Half of them are
    // constrained to lowercase words (some sampled with a seed), half are not (greedy).
    let words = Constraint::Regex("[a-z]+( [a-z]+)*".into());
    let reqs: Vec<GenerateRequest> = (0..8)
        .map(|i| {
            let mut r = if i % 2 == 0 {
                constrained(prompt(300 + i, 10), 30, words.clone())
            } else {
                request(prompt(300 + i, 10), 30)
            };
            // Some constrained requests sample with a seed: the forward pass is batch-invariant,
            // so recomputing after preemption gives the same logits and the same draws.
            if i % 4 == 0 {
                r.sampling = SamplingParams {
                    temperature: 0.9,
                    seed: Some(u64::from(i)),
                    ..Default::default()
                };
            }
            r
        })
        .collect();
    let roomy = engine(|c| c.block_size = 4);
    let expected: Vec<_> = one_by_one(&roomy, &reqs, collect);
    for (r, out) in reqs.iter().zip(&expected) {
        if r.constraint.is_some() {
            let text = &out[0].0;
            assert!(
                !text.is_empty() && text.bytes().all(|b| b.is_ascii_lowercase() || b == b' '),
                "{text:?}"
            );
        }
    }
    let tight = engine(|c| {
        c.block_size = 4;
        c.kv_cache = KvCacheSize::Blocks(14);
        c.max_model_len = Some(56); // the pool must hold one full-length sequence
    });
    let got: Vec<_> = all_at_once(&tight, &reqs, collect);
    assert_eq!(got, expected);
    assert!(tight.stats().num_preemptions > 0, "{:?}", tight.stats());
    let start = Instant::now();
    while tight.stats().kv_blocks_used > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "blocks not freed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn bad_grammar_is_refused_at_submit() {
    let e = engine(|_| {});
    let r = constrained(prompt(5, 3), 5, Constraint::Regex("(unclosed".into()));
    assert!(matches!(
        e.compile_constraint(r.constraint.as_ref().expect("set")),
        Err(SubmitError::InvalidConstraint(_))
    ));
    assert!(matches!(
        e.submit(r),
        Err(SubmitError::InvalidConstraint(_))
    ));
}

#[test]
fn stop_strings_cut_and_cancelling_frees_the_sequence() {
    let e = engine(|_| {});
    let words = Constraint::Regex("[a-z]+( [a-z]+)*".into());
    let mut r = constrained(prompt(6, 8), 60, words.clone());
    r.stop.stop_strings = vec![" the".into()];
    let out = collect(e.submit(r).expect("ok"));
    assert!(!out[0].0.contains(" the"), "{out:?}");
    // A long constrained request dropped mid-way frees its blocks (and its grammar state).
    let stream = e.submit(constrained(prompt(7, 8), 400, words)).expect("ok");
    let start = Instant::now();
    while e.stats().kv_blocks_used == 0 {
        assert!(start.elapsed() < Duration::from_secs(30), "never scheduled");
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(stream);
    while e.stats().kv_blocks_used > 0 || e.stats().num_running > 0 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "blocks not freed"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}
