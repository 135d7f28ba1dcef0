//! Scheduler unit tests: a fake "model" appends a token to every sequence whose chunk reached
//! the end of its known tokens, and invariants are checked after every step.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

fn sched(
    num_blocks: usize,
    block_size: usize,
    max_seqs: usize,
    budget: usize,
    caching: bool,
) -> Scheduler {
    Scheduler::new(SchedulerConfig {
        num_blocks,
        block_size,
        max_num_seqs: max_seqs,
        max_num_batched_tokens: budget,
        enable_prefix_caching: caching,
    })
}

/// Schedules, commits, and appends token `7` to every sequence that produced logits for its
/// last position. Returns the step.
fn step(s: &mut Scheduler) -> ScheduledStep {
    let st = s.schedule();
    s.commit(&st);
    for (id, chunk) in st.seq_ids.iter().zip(&st.batch.seqs) {
        if chunk.logits != LogitsWanted::None
            && chunk.context_len() == s.get(*id).expect("alive").tokens.len()
        {
            s.append_token(*id, 7);
        }
    }
    s.check_invariants();
    st
}

fn lens(st: &ScheduledStep) -> Vec<(SeqId, usize)> {
    st.seq_ids
        .iter()
        .zip(&st.batch.seqs)
        .map(|(&id, c)| (id, c.tokens.len()))
        .collect()
}

#[test]
fn admits_fcfs_within_max_num_seqs() {
    let mut s = sched(100, 4, 2, 1000, false);
    let a = s.add(vec![1; 5], false);
    let b = s.add(vec![2; 3], false);
    let c = s.add(vec![3; 2], false);
    let st = step(&mut s);
    assert_eq!(lens(&st), vec![(a, 5), (b, 3)]);
    assert_eq!(st.batch.seqs[0].logits, LogitsWanted::Last);
    assert_eq!((s.num_running(), s.num_waiting()), (2, 1));
    // Running sequences decode one token each; c waits for a free slot.
    assert_eq!(lens(&step(&mut s)), vec![(a, 1), (b, 1)]);
    s.remove(a);
    s.check_invariants();
    let st = step(&mut s);
    assert_eq!(
        lens(&st),
        vec![(b, 1), (c, 2)],
        "decodes first, then admission"
    );
}

#[test]
fn token_budget_chunks_long_prompts_and_decodes_keep_flowing() {
    let mut s = sched(100, 4, 8, 10, false);
    let short = s.add(vec![1; 3], false);
    let long = s.add(vec![2; 25], false);
    let st = step(&mut s);
    assert_eq!(lens(&st), vec![(short, 3), (long, 7)]);
    assert_eq!(
        st.batch.seqs[1].logits,
        LogitsWanted::None,
        "mid-prompt chunk samples nothing"
    );
    let st = step(&mut s);
    assert_eq!(
        lens(&st),
        vec![(short, 1), (long, 9)],
        "short decodes while long prefills"
    );
    assert_eq!(st.batch.seqs[1].start_pos, 7);
    let st = step(&mut s);
    assert_eq!(lens(&st), vec![(short, 1), (long, 9)]);
    assert_eq!(
        st.batch.seqs[1].logits,
        LogitsWanted::Last,
        "last chunk samples"
    );
    assert_eq!(s.get(long).expect("alive").tokens.len(), 26);
    assert!(
        st.batch
            .seqs
            .iter()
            .all(|c| c.block_table.len() * 4 >= c.context_len())
    );
}

#[test]
fn a_short_request_arriving_during_a_long_prefill_starts_in_the_next_step() {
    // An 8k-token prompt in chunks of 512; a 20-token request arrives after its first chunk.
    let mut s = sched(1000, 16, 8, 512, false);
    let long = s.add(vec![2; 8000], false);
    assert_eq!(lens(&step(&mut s)), vec![(long, 512)]);
    let short = s.add(vec![1; 20], false);
    let st = step(&mut s);
    assert_eq!(
        lens(&st),
        vec![(long, 492), (short, 20)],
        "the long chunk leaves room for the short prompt"
    );
    assert_eq!(
        st.batch.seqs[1].logits,
        LogitsWanted::Last,
        "its first token now"
    );
    // Then the short one decodes beside the long prefill, which gets the rest of the budget.
    assert_eq!(lens(&step(&mut s)), vec![(short, 1), (long, 511)]);
    // A waiting prompt longer than half the budget reserves nothing: it is admitted with
    // whatever the running chunks leave, as before.
    let big = s.add(vec![3; 300], false);
    let st = step(&mut s);
    assert_eq!(lens(&st), vec![(short, 1), (long, 511)]);
    assert!(s.get(big).is_some_and(|q| q.status == SeqStatus::Waiting));
}

#[test]
fn admission_waits_for_blocks_and_is_strictly_fcfs() {
    let mut s = sched(4, 4, 8, 100, false);
    let a = s.add(vec![1; 12], false); // 3 blocks
    let b = s.add(vec![2; 8], false); // 2 blocks: does not fit next to a
    let c = s.add(vec![3; 1], false); // would fit, but must not overtake b
    assert_eq!(lens(&step(&mut s)), vec![(a, 12)]);
    assert_eq!(s.num_waiting(), 2);
    s.remove(a);
    assert_eq!(lens(&step(&mut s)), vec![(b, 8), (c, 1)]);
}

#[test]
fn preempts_newest_when_blocks_run_out_and_resumes_by_recompute() {
    let mut s = sched(4, 2, 8, 100, false);
    let a = s.add(vec![1; 3], false); // 2 blocks
    let b = s.add(vec![2; 3], false); // 2 blocks: pool full
    step(&mut s);
    // Both have 4 tokens now; each decode of position 3 fits in block 1 — no growth yet.
    assert!(step(&mut s).preempted.is_empty());
    // Position 5 needs a third block for a: b (newest) is preempted.
    let st = step(&mut s);
    assert_eq!(st.preempted, vec![b]);
    assert_eq!(lens(&st), vec![(a, 1)]);
    let b_tokens = s.get(b).expect("alive").tokens.clone();
    assert_eq!(b_tokens.len(), 5, "b keeps its generated tokens");
    assert_eq!(s.num_preemptions, 1);
    s.remove(a);
    let st = step(&mut s);
    assert_eq!(
        lens(&st),
        vec![(b, 5)],
        "b recomputes prompt and output in one prefill"
    );
    assert_eq!(st.batch.seqs[0].tokens, b_tokens);
    assert_eq!(st.batch.seqs[0].logits, LogitsWanted::Last);
}

#[test]
fn forks_to_come_count_against_max_num_seqs() {
    let mut s = sched(100, 4, 4, 1000, false);
    let a = s.add_forking(vec![1; 5], false, 2); // becomes 3 sequences
    let b = s.add(vec![2; 3], false);
    let c = s.add(vec![3; 2], false);
    let st = step(&mut s);
    assert_eq!(
        lens(&st),
        vec![(a, 5), (b, 3)],
        "c would make 5 after a's fork"
    );
    let kids = s.fork(a, 2);
    assert_eq!((s.num_running(), s.num_waiting()), (4, 1));
    let st = step(&mut s);
    assert_eq!(st.seq_ids.len(), 4);
    assert!(!st.seq_ids.contains(&c));
    s.remove(kids[0]);
    let st = step(&mut s);
    assert!(st.seq_ids.contains(&c), "a freed slot admits c");
    assert_eq!(s.num_running(), 4);
}

#[test]
fn an_older_sequence_short_of_blocks_preempts_the_newest_other() {
    let mut s = sched(3, 2, 8, 100, false);
    let a = s.add(vec![1; 4], false); // 2 blocks
    let b = s.add(vec![2; 1], false); // 1 block
    step(&mut s);
    // a needs a third block for position 4; b is newer and is preempted; a proceeds.
    let st = step(&mut s);
    assert_eq!(st.preempted, vec![b]);
    assert_eq!(lens(&st), vec![(a, 1)]);
}

#[test]
fn preempts_itself_when_it_is_the_newest() {
    let mut s = sched(3, 2, 8, 100, false);
    let a = s.add(vec![1; 3], false); // 2 blocks; its next token still fits
    let b = s.add(vec![2; 2], false); // 1 full block; its next token needs another
    step(&mut s);
    assert_eq!(s.allocator().num_free(), 0);
    // b, the newest, is short of a block and nobody newer is left to preempt: it yields
    // its own blocks and waits, while a decodes.
    let st = step(&mut s);
    assert_eq!(st.preempted, vec![b]);
    assert_eq!(lens(&st), vec![(a, 1)]);
    assert_eq!(s.get(b).expect("alive").status, SeqStatus::Waiting);
}

#[test]
fn cancel_while_waiting_and_while_running_frees_blocks_at_once() {
    let mut s = sched(8, 4, 8, 100, false);
    let a = s.add(vec![1; 9], false);
    let b = s.add(vec![2; 9], false);
    let c = s.add(vec![3; 30], false); // cannot be admitted next to a and b
    step(&mut s);
    assert_eq!(s.allocator().num_used(), 6);
    s.remove(c);
    s.check_invariants();
    assert_eq!(
        s.num_waiting(),
        0,
        "cancelled while waiting: never scheduled"
    );
    s.remove(a);
    s.check_invariants();
    assert_eq!(s.allocator().num_used(), 3, "a's blocks are back");
    assert_eq!(lens(&step(&mut s)), vec![(b, 1)]);
    s.remove(b);
    s.check_invariants();
    assert_eq!(s.allocator().num_used(), 0);
    assert!(s.is_idle());
}

#[test]
fn prefix_cache_reuses_full_blocks_of_a_shared_prompt() {
    let mut s = sched(16, 4, 8, 100, true);
    let system: Vec<u32> = (100..110).collect(); // 2 full blocks + 2 tokens
    let mut p1 = system.clone();
    p1.extend([1, 2, 3]);
    let a = s.add(p1, false);
    step(&mut s);
    s.remove(a);
    s.check_invariants();
    assert_eq!(
        s.allocator().num_used(),
        0,
        "cached blocks are free (evictable)"
    );
    let mut p2 = system.clone();
    p2.extend([4, 5]);
    let b = s.add(p2, false);
    let st = step(&mut s);
    assert_eq!(lens(&st), vec![(b, 4)], "two cached blocks skipped");
    assert_eq!(st.batch.seqs[0].start_pos, 8);
    assert_eq!((s.prefix_queries, s.prefix_hits), (3 + 2, 2));
    // A different first block shares nothing.
    let c = s.add((200..213).collect(), false);
    assert_eq!(lens(&step(&mut s)), vec![(b, 1), (c, 13)]);
    // Prompt logprobs need every position: no reuse.
    let d = s.add(system.clone(), true);
    let st = step(&mut s);
    assert_eq!(lens(&st)[2], (d, 10));
    assert_eq!(st.batch.seqs[2].logits, LogitsWanted::All);
}

#[test]
fn decodes_go_before_an_older_sequence_recomputing_its_prompt() {
    let mut s = sched(64, 4, 8, 12, false);
    let old = s.add(vec![1; 30], false);
    let young = s.add(vec![2; 2], false);
    // old is admitted first (strict FCFS) with the whole budget; its next chunk leaves room
    // for young's short prompt; then young's decode goes before old's last chunk.
    assert_eq!(lens(&step(&mut s)), vec![(old, 12)]);
    assert_eq!(lens(&step(&mut s)), vec![(old, 10), (young, 2)]);
    assert_eq!(lens(&step(&mut s)), vec![(young, 1), (old, 8)]);
    // Both decode; then a 30-token prefill of a newcomer is chunked behind the decodes.
    let third = s.add(vec![3; 30], false);
    let st = step(&mut s);
    assert_eq!(lens(&st), vec![(old, 1), (young, 1), (third, 10)]);
    let st = step(&mut s);
    assert_eq!(
        lens(&st),
        vec![(old, 1), (young, 1), (third, 10)],
        "decodes keep flowing"
    );
}

#[test]
fn prompt_logits_requests_are_chunked_to_bound_memory() {
    let mut s = sched(200, 16, 8, 2048, true);
    let a = s.add(vec![1; 600], true);
    let st = step(&mut s);
    assert_eq!(lens(&st), vec![(a, PROMPT_LOGITS_CHUNK)]);
    assert_eq!(st.batch.seqs[0].logits, LogitsWanted::All);
    step(&mut s);
    let st = step(&mut s);
    assert_eq!(lens(&st), vec![(a, 600 - 2 * PROMPT_LOGITS_CHUNK)]);
    assert_eq!(st.batch.seqs[0].logits, LogitsWanted::All);
    assert_eq!(s.get(a).expect("alive").tokens.len(), 601);
    assert_eq!(step(&mut s).batch.seqs[0].logits, LogitsWanted::Last);
}

#[test]
fn identical_prompt_always_computes_its_last_token() {
    let mut s = sched(16, 4, 8, 100, true);
    let a = s.add(vec![5; 8], false);
    step(&mut s);
    s.remove(a);
    let b = s.add(vec![5; 8], false);
    let st = step(&mut s);
    assert_eq!(
        lens(&st),
        vec![(b, 4)],
        "only the first block is reused; the last block has the last token"
    );
}

#[test]
fn eviction_reclaims_lru_cached_blocks_when_pool_is_dry() {
    let mut s = sched(4, 2, 8, 100, true);
    let a = s.add(vec![1, 2, 3, 4, 5], false); // 3 blocks, 2 full get cached
    step(&mut s);
    s.remove(a);
    let b = s.add(vec![9; 7], false); // needs 4 blocks: must evict cached ones
    assert_eq!(lens(&step(&mut s)), vec![(b, 7)]);
    assert_eq!(s.allocator().num_used(), 4);
}

#[test]
fn fork_shares_prompt_blocks_and_copies_partial_last_block_on_write() {
    let mut s = sched(16, 4, 8, 100, false);
    let p = s.add(vec![1; 6], false); // blocks: [full, partial(2)]
    let st = s.schedule();
    s.commit(&st);
    let kids = s.fork(p, 2);
    let table = s.get(p).expect("alive").block_table.clone();
    assert_eq!(table.len(), 2);
    for &b in &table {
        assert_eq!(s.allocator().refcount(b), 3);
    }
    assert_eq!(
        s.allocator().num_used(),
        2,
        "prompt prefilled once, blocks shared"
    );
    for (i, id) in [p, kids[0], kids[1]].into_iter().enumerate() {
        s.append_token(id, 10 + i as u32);
    }
    s.check_invariants();
    let st = step(&mut s);
    assert_eq!(st.seq_ids.len(), 3);
    // The first two writers copy the shared partial block; the last one writes in place.
    assert_eq!(st.copies.len(), 2);
    assert!(st.copies.iter().all(|&(src, _)| src == table[1]));
    let last_blocks: Vec<u32> = st.batch.seqs.iter().map(|c| c.block_table[1]).collect();
    let mut unique = last_blocks.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(
        unique.len(),
        3,
        "each sequence writes its own block: {last_blocks:?}"
    );
    assert!(
        st.batch.seqs.iter().all(|c| c.block_table[0] == table[0]),
        "full block stays shared"
    );
    assert_eq!(s.allocator().num_used(), 4);
}

#[test]
fn randomized_arrivals_lengths_and_cancellations_keep_invariants() {
    let (mut preemptions, mut hits, mut copies) = (0, 0, 0);
    for seed in 0..20u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let bs = rng.random_range(1..6);
        let num_blocks = rng.random_range(8..40);
        let caching = rng.random_bool(0.5);
        let mut s = sched(
            num_blocks,
            bs,
            rng.random_range(1..8),
            rng.random_range(4..40),
            caching,
        );
        // (seq id, target total length)
        let mut live: Vec<(SeqId, usize)> = Vec::new();
        let mut completed = 0;
        for t in 0..400 {
            if t < 300 && rng.random_bool(0.3) {
                let max_len = num_blocks * bs; // a sequence alone always fits the pool
                let prompt_len = rng.random_range(1..=max_len.min(30));
                let total = rng.random_range(prompt_len..=max_len.min(prompt_len + 20));
                let shared = rng.random_bool(0.5);
                let prompt: Vec<u32> = (0..prompt_len)
                    .map(|i| {
                        if shared {
                            i as u32
                        } else {
                            rng.random_range(0..50)
                        }
                    })
                    .collect();
                let id = s.add(prompt, rng.random_bool(0.1));
                live.push((id, total.max(prompt_len + 1)));
            }
            if !live.is_empty() && rng.random_bool(0.05) {
                let (id, _) = live.swap_remove(rng.random_range(0..live.len()));
                s.remove(id);
                s.check_invariants();
            }
            let st = s.schedule();
            copies += st.copies.len();
            assert!(st.batch.num_tokens() <= s.config().max_num_batched_tokens);
            assert!(st.seq_ids.len() <= s.config().max_num_seqs);
            for c in &st.batch.seqs {
                assert!(c.block_table.len() * bs >= c.context_len());
            }
            s.commit(&st);
            for (id, chunk) in st.seq_ids.iter().zip(&st.batch.seqs) {
                let seq = s.get(*id).expect("scheduled seqs are alive");
                if chunk.context_len() == seq.tokens.len() {
                    let first_token = seq.prompt_len == seq.tokens.len();
                    s.append_token(*id, rng.random_range(0..50));
                    if rng.random_bool(0.05) && first_token {
                        let kids = s.fork(*id, 1);
                        s.append_token(kids[0], 3);
                        let target = live.iter().find(|l| l.0 == *id).map_or(0, |l| l.1);
                        live.push((kids[0], target));
                    }
                }
            }
            live.retain(|&(id, target)| {
                let done = s.get(id).is_some_and(|q| q.tokens.len() >= target);
                if done {
                    s.remove(id);
                    completed += 1;
                }
                !done
            });
            s.check_invariants();
        }
        // Drain: everything still alive must finish (no starvation, no deadlock).
        for _ in 0..10_000 {
            if live.is_empty() {
                break;
            }
            let st = step(&mut s);
            let _ = st;
            live.retain(|&(id, target)| {
                let done = s.get(id).is_some_and(|q| q.tokens.len() >= target);
                if done {
                    s.remove(id);
                    completed += 1;
                }
                !done
            });
        }
        assert!(live.is_empty(), "seed {seed}: requests starved");
        assert!(s.is_idle());
        s.check_invariants();
        assert_eq!(s.allocator().num_used(), 0);
        assert!(completed > 0);
        preemptions += s.num_preemptions;
        hits += s.prefix_hits;
    }
    assert!(
        preemptions > 0 && hits > 0 && copies > 0,
        "{preemptions} {hits} {copies}: the test must exercise them"
    );
}

#[test]
fn kv_tokens_filled_counts_computed_slots_and_shared_blocks_once() {
    let mut s = sched(16, 4, 8, 100, true);
    assert_eq!(s.kv_tokens_filled(), 0);
    // 6 prompt tokens in 2 blocks: 6 of 8 slots filled.
    let p = s.add(vec![1; 6], false);
    let st = s.schedule();
    s.commit(&st);
    assert_eq!((s.kv_tokens_filled(), s.allocator().num_used()), (6, 2));
    // Two forks share both blocks: still 6 filled slots in 2 blocks.
    let kids = s.fork(p, 2);
    assert_eq!((s.kv_tokens_filled(), s.allocator().num_used()), (6, 2));
    // Each writes its 7th token: the partial block is copied twice, the full one stays shared.
    for (i, id) in [p, kids[0], kids[1]].into_iter().enumerate() {
        s.append_token(id, 10 + i as u32);
    }
    step(&mut s);
    // 4 (shared full block) + 3 × 3 (own partial blocks) = 13 of 4 blocks × 4 slots.
    assert_eq!((s.kv_tokens_filled(), s.allocator().num_used()), (13, 4));
    // The sampled 8th tokens are not computed yet: they fill nothing.
    assert!(
        kids.iter()
            .all(|&k| s.get(k).expect("alive").tokens.len() == 8)
    );

    // A prompt sharing the cached full block (1,1,1,1) counts it once.
    for id in [p, kids[0], kids[1]] {
        s.remove(id);
    }
    let a = s.add(vec![1; 6], false);
    step(&mut s);
    let b = s.add(vec![1, 1, 1, 1, 9], false);
    step(&mut s);
    assert_eq!(
        s.allocator().refcount(s.get(a).expect("a").block_table[0]),
        2
    );
    // a: 4 + 3 computed (its 7th position after one decode), b: 5 → 4 + 3 + 1 distinct.
    let (na, nb) = (
        s.get(a).expect("a").num_computed,
        s.get(b).expect("b").num_computed,
    );
    assert_eq!((na, nb), (7, 5));
    assert_eq!(s.kv_tokens_filled(), 4 + 3 + 1);
    assert_eq!(s.allocator().num_used(), 3);
    s.remove(a);
    s.remove(b);
    assert_eq!(s.kv_tokens_filled(), 0);
}
