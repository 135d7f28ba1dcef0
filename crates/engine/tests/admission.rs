//! Engine admission: what `submit` refuses outright, a pool too small for one sequence, the
//! waiting room (`max_queue_size`), shutdown and abort.

mod common;

use common::*;
use mpt_engine::{EngineConfig, EngineHandle, EventStream, FinishReason, KvCacheSize, SubmitError};

#[test]
fn submit_rejects_what_can_never_run() {
    let e = engine(|c| {
        c.max_model_len = Some(100);
        c.max_num_seqs = 4;
    });
    assert_eq!(
        e.submit(request(prompt(0, 60), 50)).expect_err("too long"),
        SubmitError::ContextLength {
            prompt_tokens: 60,
            max_tokens: 50,
            max_model_len: 100
        }
    );
    assert_eq!(
        e.submit(request(vec![1, 60_000], 1)).expect_err("bad id"),
        SubmitError::TokenOutOfVocabulary {
            token: 60_000,
            vocab_size: 50_432
        }
    );
    let mut forks = request(prompt(2, 5), 5);
    forks.best_of = 5;
    assert_eq!(
        e.submit(forks)
            .expect_err("more sequences than ever run at once"),
        SubmitError::ChoiceCount {
            n: 1,
            best_of: 5,
            max_sequences: 4
        }
    );
}

#[test]
fn a_pool_that_cannot_hold_one_full_length_sequence_is_refused_at_start() {
    let err = EngineHandle::start(EngineConfig {
        block_size: 4,
        kv_cache: KvCacheSize::Blocks(3),
        ..Default::default()
    })
    .expect_err("12 tokens of KV cache for a 2048-token context");
    let text = err.to_string();
    assert!(
        text.contains("--num-kv-blocks") && text.contains("--max-model-len 2048"),
        "{text}"
    );
    let fits = engine(|c| {
        c.block_size = 4;
        c.kv_cache = KvCacheSize::Blocks(3);
        c.max_model_len = Some(12);
    });
    assert_eq!(fits.model_info().max_model_len, 12);
}

#[test]
fn no_waiting_room_still_serves_what_can_start_at_once() {
    let e = engine(|c| {
        c.max_num_seqs = 2;
        c.max_queue_size = 0;
    });
    let out = collect(
        e.submit(request(prompt(800, 5), 3))
            .expect("an idle engine serves"),
    );
    assert!(out.completed);
    wait_until(&e, "idle", |s| s.num_running == 0 && s.num_waiting == 0);
    let running: Vec<EventStream> = (0..2)
        .map(|i| {
            e.submit(request(prompt(801 + i, 5), 500))
                .expect("a free slot each")
        })
        .collect();
    assert_eq!(
        e.submit(request(prompt(809, 5), 3))
            .expect_err("both slots taken"),
        SubmitError::QueueFull
    );
    let mut forks = request(prompt(810, 5), 3);
    forks.best_of = 2;
    assert_eq!(
        e.submit(forks).expect_err("no room for two"),
        SubmitError::QueueFull
    );
    drop(running);
    // Idle once the engine has taken in all three accepted prompts and dropped the two.
    wait_until(&e, "idle", |s| {
        s.prompt_tokens == 15 && s.num_running == 0 && s.num_waiting == 0
    });
    let out = collect(e.submit(request(prompt(811, 5), 3)).expect("served again"));
    assert!(out.completed);
}

#[test]
fn queue_full_shutdown_and_abort_all() {
    let e = engine(|c| {
        c.max_num_seqs = 1;
        c.max_queue_size = 2;
    });
    let mut streams = Vec::new();
    let mut full = 0;
    for i in 0..5 {
        match e.submit(request(prompt(700 + i, 5), 1000)) {
            Ok(s) => streams.push(s),
            Err(SubmitError::QueueFull) => full += 1,
            Err(other) => panic!("unexpected {other:?}"),
        }
    }
    assert!(full > 0, "at most 2 may wait behind the one running");
    e.begin_shutdown();
    assert_eq!(
        e.submit(request(prompt(9, 3), 1)).expect_err("draining"),
        SubmitError::ShuttingDown
    );
    e.abort_all();
    for s in streams {
        let out = collect(s);
        assert!(out.completed);
        assert_eq!(
            out.finish.last().copied().flatten(),
            Some(FinishReason::Abort)
        );
    }
    assert!(e.is_alive());
}
