//! End-to-end engine tests on the bundled demo model: batching never changes a request's
//! tokens, a starved KV pool preempts without changing outputs, stops and cancellation behave.

mod common;

use common::*;
use std::time::Instant;

use mpt_engine::{
    EngineConfig, EngineHandle, Event, EventStream, FinishReason, GenerateRequest, KvCacheSize,
    SamplingParams,
};

/// Each request alone, then all at once on a second engine of the same settings, so that the
/// batched run computes every prompt itself instead of finding it in the prefix cache.
fn solo_and_batched(
    make: impl Fn() -> EngineHandle,
    reqs: &[GenerateRequest],
) -> (Vec<Output>, Vec<Output>) {
    let alone = make();
    let solo: Vec<Output> = one_by_one(&alone, reqs, collect);
    drop(alone);
    let together = make();
    let batched = all_at_once(&together, reqs, collect);
    let stats = together.stats();
    assert_eq!(
        stats.prefix_cache_hits, 0,
        "the batched run computed every prompt"
    );
    wait_until(&together, "idle", |s| {
        s.kv_blocks_used == 0 && s.num_running == 0
    });
    (solo, batched)
}

#[test]
fn sixteen_concurrent_greedy_requests_match_solo_runs() {
    let make = || engine(|c| c.max_num_batched_tokens = 64); // forces chunked prefill too
    let reqs: Vec<GenerateRequest> = (0..18)
        .map(|i| {
            request(
                prompt(i, 1 + (i as usize * 13) % 90),
                4 + (i as usize * 5) % 30,
            )
        })
        .collect();
    let (solo, batched) = solo_and_batched(make, &reqs);
    assert_eq!((solo.len(), batched.len()), (reqs.len(), reqs.len()));
    for (i, (s, b)) in solo.iter().zip(&batched).enumerate() {
        assert!(s.completed && b.completed);
        assert_eq!(s.tokens[0].len(), reqs[i].stop.max_tokens);
        assert_eq!(s, b, "request {i} differs when batched");
    }
}

#[test]
fn fixture_models_give_solo_outputs_in_a_mixed_batch() {
    for name in [
        "heads3-bin",
        "heads6-sharded",
        "pow2",
        "qkln-bias-bin-sharded",
    ] {
        let dir = fixture_dir(name);
        let make = || {
            engine(|c| {
                c.model = mpt_engine::ModelSource::Dir(dir.clone());
                c.block_size = 4;
                c.max_num_batched_tokens = 24;
            })
        };
        let reqs: Vec<GenerateRequest> = (0..16u32)
            .map(|i| {
                let p = (0..1 + (i as usize * 7) % 40)
                    .map(|j| (i * 31 + j as u32 * 17) % 1000 + 1)
                    .collect();
                request(p, 3 + (i as usize * 5) % 20)
            })
            .collect();
        let (solo, batched) = solo_and_batched(make, &reqs);
        assert_eq!(solo, batched, "fixture {name}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn engine_start_reports_load_errors() {
    let err = EngineHandle::start(EngineConfig {
        model: mpt_engine::ModelSource::Dir("/nonexistent/model".into()),
        ..Default::default()
    })
    .expect_err("no such model");
    assert!(err.to_string().contains("/nonexistent/model"), "{err}");
}

#[test]
fn seeded_sampling_is_the_same_alone_and_batched() {
    let make = || engine(|_| {});
    // Short prompts (1 to 36 tokens): alone, a prompt's prefill has fewer rows than the batched
    // step it shares with the others. The forward pass is batch-invariant, so the logits and,
    // at temperature 1, every draw are the same either way.
    let reqs: Vec<GenerateRequest> = (0..8)
        .map(|i| {
            let mut r = request(prompt(100 + i, 1 + i as usize * 5), 20);
            r.sampling = SamplingParams {
                temperature: 1.0,
                top_p: 0.95,
                seed: Some(i as u64),
                ..Default::default()
            };
            r
        })
        .collect();
    let (solo, batched) = solo_and_batched(make, &reqs);
    assert_eq!(solo, batched);
    // Different seeds give different streams (the sampler really samples).
    assert_ne!(solo[0].tokens, solo[1].tokens);
}

#[test]
fn tiny_kv_pool_preempts_and_still_gives_unloaded_outputs() {
    // Each request needs 10 + 30 tokens = 10 blocks of 4; the pool holds 14.
    // Odd requests sample with a seed: the sampler's state must survive a preemption.
    let reqs: Vec<GenerateRequest> = (0..8)
        .map(|i| {
            let mut r = request(prompt(200 + i, 10), 30);
            if i % 2 == 1 {
                r.sampling = SamplingParams {
                    temperature: 0.8,
                    seed: Some(u64::from(i)),
                    ..Default::default()
                };
            }
            r
        })
        .collect();
    let roomy = engine(|c| c.block_size = 4);
    let expected: Vec<Output> = one_by_one(&roomy, &reqs, collect);
    let tight = engine(|c| {
        c.block_size = 4;
        c.kv_cache = KvCacheSize::Blocks(14);
        c.max_model_len = Some(56);
    });
    let got: Vec<Output> = all_at_once(&tight, &reqs, collect);
    assert_eq!(got, expected);
    let stats = tight.stats();
    assert!(stats.num_preemptions > 0, "{stats:?}");
    wait_until(&tight, "blocks back", |s| s.kv_blocks_used == 0);
}

#[test]
fn shared_prefix_hits_the_cache_without_changing_outputs() {
    let system = prompt(800, 40);
    let reqs: Vec<GenerateRequest> = (0..4)
        .map(|i| {
            let mut p = system.clone();
            p.extend(prompt(810 + i, 3 + i as usize));
            request(p, 10)
        })
        .collect();
    let cold = engine(|c| c.enable_prefix_caching = false);
    let expected: Vec<Output> = one_by_one(&cold, &reqs, collect);
    assert_eq!(cold.stats().prefix_cache_hits, 0);
    let warm = engine(|c| c.block_size = 8);
    let got: Vec<Output> = one_by_one(&warm, &reqs, collect);
    assert_eq!(got, expected);
    let stats = warm.stats();
    // 40 shared tokens = 5 full blocks of 8, reused by the 3 later requests.
    assert!(stats.prefix_cache_hits >= 15, "{stats:?}");
    assert!(stats.prefix_cache_queries >= stats.prefix_cache_hits);
    wait_until(&warm, "idle", |s| s.kv_blocks_used == 0);
}

#[test]
fn stop_string_across_a_token_boundary_is_cut_in_streamed_text() {
    let e = engine(|_| {});
    let base = request(prompt(300, 8), 40);
    let full = collect(e.submit(base.clone()).expect("ok"));
    let tok = e.tokenizer();
    // Find two consecutive tokens with visible text and build a stop string spanning them.
    let ids = &full.tokens[0];
    let texts: Vec<String> = ids
        .iter()
        .map(|&t| tok.decode(&[t]).expect("decode"))
        .collect();
    let i = (5..ids.len() - 1)
        .find(|&i| {
            let (a, b) = (&texts[i], &texts[i + 1]);
            !a.is_empty() && !b.is_empty() && !a.contains('\u{FFFD}') && !b.contains('\u{FFFD}')
        })
        .expect("two printable consecutive tokens");
    let a_last: String = texts[i]
        .chars()
        .rev()
        .take(2)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    let b_first: String = texts[i + 1].chars().take(2).collect();
    let stop = format!("{a_last}{b_first}");
    let whole = &full.text[0];
    let cut = whole.find(&stop).expect("stop string occurs in the output");
    let mut r = base.clone();
    r.stop.stop_strings = vec![stop.clone()];
    let out = collect(e.submit(r).expect("ok"));
    assert_eq!(out.text[0], whole[..cut], "stop {stop:?}");
    assert_eq!(out.finish[0], Some(FinishReason::Stop));
    assert!(!out.text[0].contains(&stop));
}

#[test]
fn cancelling_frees_blocks_while_running_and_while_waiting() {
    let e = engine(|c| c.max_num_seqs = 1);
    let mut running = e.submit(request(prompt(400, 20), 1500)).expect("ok");
    let waiting = e.submit(request(prompt(401, 20), 1500)).expect("ok");
    // Wait for the first token of the running one, then drop both.
    while !matches!(running.blocking_recv(), Some(Event::Delta(_))) {}
    wait_until(&e, "blocks in use", |s| {
        s.kv_blocks_used > 0 && s.num_waiting == 1
    });
    drop(waiting);
    drop(running);
    wait_until(&e, "blocks freed", |s| {
        s.kv_blocks_used == 0 && s.num_running == 0 && s.num_waiting == 0
    });
    // The engine keeps serving.
    assert!(collect(e.submit(request(prompt(402, 3), 2)).expect("ok")).completed);
}

#[test]
fn prefill_time_ends_at_the_first_token_and_kv_stats_count_filled_slots() {
    let e = engine(|c| c.block_size = 16);
    // 20 prompt tokens in blocks of 16: while decoding, only the last block is partly filled.
    let mut stream = e.submit(request(prompt(450, 20), 1500)).expect("ok");
    while !matches!(stream.blocking_recv(), Some(Event::Delta(_))) {}
    wait_until(&e, "blocks in use", |s| s.kv_blocks_used > 0);
    let s = e.stats();
    assert_eq!(s.kv_block_size, 16);
    let allocated = s.kv_blocks_used * s.kv_block_size;
    assert!(
        s.kv_tokens_filled <= allocated && s.kv_tokens_filled + 16 > allocated,
        "{s:?}"
    );
    assert!(s.kv_tokens_filled >= 20, "the prompt is computed: {s:?}");
    drop(stream);
    wait_until(&e, "blocks freed", |s| {
        s.kv_blocks_used == 0 && s.kv_tokens_filled == 0
    });

    let mut stream = e.submit(request(prompt(451, 20), 3)).expect("ok");
    let timings = loop {
        match stream.blocking_recv() {
            Some(Event::Completed { timings, .. }) => break timings,
            Some(Event::Failed(m)) => panic!("request failed: {m}"),
            Some(_) => {}
            None => panic!("stream ended without Completed"),
        }
    };
    // Queue then prefill, back to back, make up the time to the first token exactly.
    let first = timings.first_token.expect("tokens were sampled");
    assert!(!timings.prefill.is_zero());
    assert_eq!(timings.queue + timings.prefill, first, "{timings:?}");
    assert!(first <= timings.total);
}

#[test]
fn n_and_best_of_fork_from_one_prefill() {
    let e = engine(|c| c.block_size = 4);
    let solo = collect(e.submit(request(prompt(500, 10), 12)).expect("ok"));
    let mut r = request(prompt(500, 10), 12);
    r.n = 3;
    r.best_of = 3;
    let out = collect(e.submit(r.clone()).expect("ok"));
    assert_eq!(out.tokens.len(), 3);
    for t in &out.tokens {
        assert_eq!(*t, solo.tokens[0], "greedy forks agree with the solo run");
    }
    r.sampling = SamplingParams {
        temperature: 1.0,
        seed: Some(5),
        ..Default::default()
    };
    r.n = 2;
    r.best_of = 4;
    let a = collect(e.submit(r.clone()).expect("ok"));
    let b = collect(e.submit(r).expect("ok"));
    assert_eq!(a, b, "seeded best_of is reproducible");
    assert_eq!((a.tokens.len(), a.finish.len()), (2, 2));
    assert_eq!(
        a.completion_tokens,
        4 * 12,
        "usage counts all best_of sequences"
    );
    assert!(a.finish.iter().all(|f| *f == Some(FinishReason::Length)));
    wait_until(&e, "idle", |s| s.kv_blocks_used == 0);
}

#[test]
fn prompt_logprobs_and_max_tokens_zero() {
    let e = engine(|_| {});
    let mut r = request(prompt(600, 7), 0);
    r.prompt_logprobs = Some(2);
    let out = collect(e.submit(r).expect("ok"));
    assert_eq!(out.prompt_logprobs, 7);
    assert_eq!(out.finish, vec![Some(FinishReason::Length)]);
    assert!(out.completed);
    // best_of > n with nothing to generate: each of the n choices ends once, by length.
    let mut r = request(prompt(601, 7), 0);
    r.n = 2;
    r.best_of = 3;
    let out = collect(e.submit(r).expect("ok"));
    assert_eq!(out.finish, vec![Some(FinishReason::Length); 2]);
    assert_eq!(out.completion_tokens, 0);
    assert!(out.completed);
}

/// Decode throughput of the demo model at 1, 4 and 16 concurrent sequences (prompt 128, 128 new
/// tokens each). Run with `--ignored --nocapture`; prints tokens/s.
#[test]
#[ignore = "benchmark: prints numbers, asserts nothing about speed"]
fn decode_throughput_demo_model() {
    let e = engine(|c| c.threads = None);
    // Warm up allocations and caches.
    collect(e.submit(request(prompt(1, 128), 16)).expect("ok"));
    for concurrency in [1usize, 4, 16] {
        let reqs: Vec<GenerateRequest> = (0..concurrency)
            .map(|i| request(prompt(900 + i as u32, 128), 128))
            .collect();
        let start = Instant::now();
        let outputs: Vec<Output> = all_at_once(&e, &reqs, collect);
        let secs = start.elapsed().as_secs_f64();
        let tokens: usize = outputs.iter().map(|o| o.tokens[0].len()).sum();
        println!(
            "concurrency {concurrency:>2}: {tokens} tokens in {secs:.2}s = {:.1} tokens/s (incl. prefill of {} prompt tokens)",
            tokens as f64 / secs,
            128 * concurrency
        );
    }
}

/// Absolute time of a request's first token: its submission plus the engine's `first_token`.
fn first_token_at(submitted: Instant, mut stream: EventStream) -> Instant {
    while let Some(event) = stream.blocking_recv() {
        match event {
            Event::Completed { timings, .. } => {
                return submitted + timings.first_token.expect("a token was generated");
            }
            Event::Failed(message) => panic!("request failed: {message}"),
            _ => {}
        }
    }
    panic!("stream ended without Completed")
}

#[test]
fn a_short_request_during_a_long_prefill_gets_its_first_token_first() {
    // A 1,500-token prompt in chunks of 64 takes 24 steps; a short request submitted right
    // after it is admitted beside the long prefill's next chunk instead of waiting for all of
    // them, so its first token comes long before the long request's.
    let engine = engine(|c| c.max_num_batched_tokens = 64);
    let long_at = Instant::now();
    let long = engine
        .submit(request(prompt(1, 1500), 1))
        .expect("accepted");
    let short_at = Instant::now();
    let short = engine.submit(request(prompt(2, 12), 1)).expect("accepted");
    let short_first = first_token_at(short_at, short);
    let long_first = first_token_at(long_at, long);
    assert!(
        short_first < long_first,
        "the short request waited for the whole prefill ({:?} after the long one's first token)",
        short_first - long_first
    );
}
