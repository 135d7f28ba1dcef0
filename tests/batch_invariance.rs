//! Batch invariance, end to end: a request's completion, with the log-probabilities of its
//! tokens and their full top-5, is bitwise the same whether it runs alone or among others in a
//! shuffled concurrent burst, whatever `--max-num-batched-tokens` splits its prompt into, when
//! its prompt comes from the prefix cache, and when it is preempted and recomputed. Greedy and
//! seeded requests alike: a last-bit difference in a logit shows in the logprobs, and at
//! temperature 1 can flip a draw. With bf16 weights too (on a CPU with AMX, the tile kernel
//! for every row count).

mod common;

use common::*;
use mpt_engine::{DTypeSpec, KvCacheSize};
use mpt_server::config::ServerConfig;
use serde_json::{Value, json};

/// Twenty prompts of 1 to 150 token ids, mixed lengths, distinct contents.
fn prompts() -> Vec<Vec<u32>> {
    let lens = [
        1, 150, 7, 33, 2, 64, 90, 15, 31, 120, 5, 48, 3, 17, 149, 66, 9, 100, 32, 40,
    ];
    lens.iter()
        .enumerate()
        .map(|(i, &len)| {
            (0..len as u32)
                .map(|j| (i as u32 * 7919 + j * 104_729) % 50_000 + 1)
                .collect()
        })
        .collect()
}

/// Request `i`: even ones greedy, odd ones sampled at temperature 1 with seed `i`.
fn body(i: usize, prompt: &[u32]) -> Value {
    let mut b = json!({"model": MODEL, "prompt": prompt, "max_tokens": 8, "logprobs": 5});
    if i.is_multiple_of(2) {
        b["temperature"] = json!(0.0);
    } else {
        b["temperature"] = json!(1.0);
        b["seed"] = json!(i);
    }
    b
}

/// The `choices` of request `i` (text, tokens, logprobs and top-5 per token, finish reason).
async fn choices(server: &mpt_server::RunningServer, i: usize, prompt: &[u32]) -> Value {
    let (status, reply) = post(server, "/v1/completions", body(i, prompt)).await;
    assert_eq!(status, 200, "request {i}: {reply}");
    let c = reply["choices"].clone();
    let top = &c[0]["logprobs"]["top_logprobs"];
    assert_eq!(top.as_array().map(Vec::len), Some(8), "request {i}: {c}");
    c
}

/// Every request alone, one after another, on a fresh server.
async fn alone(tweak: impl FnOnce(&mut ServerConfig)) -> Vec<Value> {
    let server = start(tweak).await;
    let mut out = Vec::new();
    for (i, p) in prompts().iter().enumerate() {
        out.push(choices(&server, i, p).await);
    }
    server.shutdown().await.expect("clean shutdown");
    out
}

/// Every request at once, sent in a shuffled order, twice on the same server (the second burst
/// finds the prompts in the prefix cache); the answers in request order, and the metrics.
async fn together(tweak: impl FnOnce(&mut ServerConfig)) -> (Vec<Value>, Vec<Value>, f64, f64) {
    let server = start(|c| {
        c.threads = Some(2);
        c.max_queue_size = 64;
        tweak(c);
    })
    .await;
    let prompts = prompts();
    // A fixed shuffle (i * 7 mod 20 visits every request once).
    let order: Vec<usize> = (0..prompts.len()).map(|i| i * 7 % prompts.len()).collect();
    let mut rounds = Vec::new();
    for _ in 0..2 {
        let calls = order.iter().map(|&i| choices(&server, i, &prompts[i]));
        let answers = futures::future::join_all(calls).await;
        let mut in_order = vec![Value::Null; prompts.len()];
        for (&i, a) in order.iter().zip(answers) {
            in_order[i] = a;
        }
        rounds.push(in_order);
    }
    let series = |name: &str| format!("{name}{{model_name=\"{MODEL}\"}}");
    let hits = metric(&server, &series("vllm:prefix_cache_hits_total")).await;
    let preemptions = metric(&server, &series("vllm:num_preemptions_total")).await;
    server.shutdown().await.expect("clean shutdown");
    let second = rounds.pop().expect("two rounds");
    let first = rounds.pop().expect("two rounds");
    (first, second, hits, preemptions)
}

fn assert_same(want: &[Value], got: &[Value], what: &str) {
    for (i, (w, g)) in want.iter().zip(got).enumerate() {
        assert_eq!(
            w,
            g,
            "request {i} ({} prompt tokens) {what}",
            prompts()[i].len()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn completions_are_bitwise_the_same_alone_batched_split_and_cached() {
    let base = alone(|_| {}).await;
    // Sampled requests really sample, so a flipped draw would show.
    assert_ne!(base[1][0]["text"], base[3][0]["text"]);
    let split = alone(|c| c.max_num_batched_tokens = 32).await;
    assert_same(
        &base,
        &split,
        "alone with prompts split into 32-token chunks",
    );
    for budget in [2048, 32] {
        let (first, cached, hits, _) = together(|c| c.max_num_batched_tokens = budget).await;
        assert_same(
            &base,
            &first,
            &format!("in a burst, {budget} tokens a step"),
        );
        assert!(hits > 0.0, "the second burst hit the prefix cache");
        assert_same(
            &base,
            &cached,
            &format!("from the prefix cache, {budget} a step"),
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn preempted_and_recomputed_requests_keep_their_bits() {
    let base = alone(|_| {}).await;
    // 24 blocks of 16 tokens hold two of the longest requests (150 + 8 tokens = 10 blocks)
    // and a few short ones: a burst of twenty preempts.
    let (first, second, _, preemptions) = together(|c| {
        c.kv_cache = KvCacheSize::Blocks(24);
        c.max_model_len = Some(384);
    })
    .await;
    assert!(preemptions > 0.0, "the burst preempted");
    assert_same(&base, &first, "after preemption");
    assert_same(&base, &second, "after preemption, second burst");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bf16_completions_are_bitwise_the_same_alone_batched_and_split() {
    let bf16 = |c: &mut ServerConfig| c.dtype = DTypeSpec::Bf16;
    let base = alone(bf16).await;
    let (first, cached, hits, _) = together(|c| {
        bf16(c);
        c.max_num_batched_tokens = 32;
    })
    .await;
    assert_same(&base, &first, "bf16, in a burst, 32 tokens a step");
    assert!(hits > 0.0, "the second burst hit the prefix cache");
    assert_same(&base, &cached, "bf16, from the prefix cache");
}
