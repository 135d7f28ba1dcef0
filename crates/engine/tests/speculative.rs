//! Speculative (n-gram) decoding changes nothing but speed: with it on, greedy and seeded
//! requests give bitwise the same tokens, text, logprobs and finishes as without it, alone or
//! batched, on the demo model and the fixture checkpoints; drafts really are made and accepted;
//! and the KV pool is empty again after a burst that includes cancelled requests.

mod common;

use common::*;

use mpt_engine::{
    Constraint, EngineConfig, EngineHandle, Event, EventStream, FinishReason, GenerateRequest,
    KvCacheSize, ModelSource, NgramSpeculation, SamplingParams, Tokenizer,
};

/// One token's logprob record as bits: (token, logprob, top alternatives).
type LogprobBits = (u32, u32, Vec<(u32, u32)>);

/// What one request produced, logprobs as bits (bitwise comparison).
#[derive(Debug, Default, Clone, PartialEq)]
struct Exact {
    tokens: Vec<Vec<u32>>,
    text: Vec<String>,
    logprobs: Vec<Vec<LogprobBits>>,
    finish: Vec<Option<FinishReason>>,
    completion_tokens: usize,
}

fn collect_exact(mut stream: EventStream) -> Exact {
    let mut out = Exact::default();
    let grow = |out: &mut Exact, i: usize| {
        if out.tokens.len() <= i {
            out.tokens.resize(i + 1, Vec::new());
            out.text.resize(i + 1, String::new());
            out.logprobs.resize(i + 1, Vec::new());
            out.finish.resize(i + 1, None);
        }
    };
    while let Some(event) = stream.blocking_recv() {
        match event {
            Event::Delta(d) => {
                grow(&mut out, d.index);
                out.tokens[d.index].extend(&d.token_ids);
                out.text[d.index].push_str(&d.text);
                out.logprobs[d.index].extend(d.logprobs.iter().map(|l| {
                    let top = l.top.iter().map(|&(t, p)| (t, p.to_bits())).collect();
                    (l.token_id, l.logprob.to_bits(), top)
                }));
            }
            Event::ChoiceFinished { index, reason } => {
                grow(&mut out, index);
                out.finish[index] = Some(reason);
            }
            Event::Completed { usage, .. } => {
                out.completion_tokens = usage.completion_tokens;
                return out;
            }
            Event::PromptLogprobs(_) => {}
            Event::Failed(f) => panic!("request failed: {f}"),
        }
    }
    panic!("stream ended without Completed");
}

/// N-gram speculation that drafts whatever the batch size (so that every test really drafts,
/// whatever the machine's timings make of the cost model).
fn ngram(k: usize, min: usize, max: usize) -> Option<NgramSpeculation> {
    Some(NgramSpeculation {
        num_speculative_tokens: k,
        prompt_lookup_min: min,
        prompt_lookup_max: max,
        disable_by_batch_size: Some(usize::MAX),
    })
}

/// The requests one at a time, then all at once, on one engine; and the stats after both.
fn run(engine: &EngineHandle, reqs: &[GenerateRequest]) -> (Vec<Exact>, Vec<Exact>) {
    let solo = one_by_one(engine, reqs, collect_exact);
    let batched = all_at_once(engine, reqs, collect_exact);
    wait_until(engine, "idle", |s| {
        s.kv_blocks_used == 0 && s.num_running == 0
    });
    (solo, batched)
}

fn demo_prompts() -> Vec<Vec<u32>> {
    let tok = Tokenizer::from_bytes(mpt_engine::model::demo::TOKENIZER_JSON).expect("tokenizer");
    let texts = [
        "Romeo.\n",
        "KING.\nMy lord,",
        "To be, or not to be",
        // The answer is in the prompt: the model is asked to go on with a passage it was shown.
        "HAMLET.\nTo be, or not to be, that is the question.\nHAMLET.\nTo be, or not",
        "O, ",
    ];
    texts.iter().map(|t| tok.encode(t).expect("ids")).collect()
}

/// Greedy, greedy with top-5 logprobs and stop strings, seeded sampling, `n = 2` and
/// `best_of = 3`, `min_tokens`: every kind of request the verification loop must reproduce.
fn mixed_requests(prompts: &[Vec<u32>], max_tokens: usize) -> Vec<GenerateRequest> {
    let mut reqs = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        let mut greedy = request(p.clone(), max_tokens);
        greedy.logprobs = Some(5);
        reqs.push(greedy.clone());
        let mut stopping = greedy.clone();
        stopping.stop.stop_strings = vec!["lord".into(), "\n\n".into()];
        stopping.stop.ignore_eos = false;
        reqs.push(stopping);
        let mut seeded = greedy.clone();
        seeded.sampling = SamplingParams {
            temperature: 0.7,
            top_p: 0.9,
            seed: Some(i as u64),
            ..Default::default()
        };
        reqs.push(seeded.clone());
        let mut forked = seeded.clone();
        forked.n = 2;
        forked.best_of = 3;
        forked.sampling.temperature = 0.3;
        reqs.push(forked);
        let mut min = greedy;
        min.stop.ignore_eos = false;
        min.stop.min_tokens = max_tokens / 2;
        min.sampling.frequency_penalty = 0.5;
        reqs.push(min);
    }
    reqs
}

fn compare(name: &str, config: impl Fn(&mut EngineConfig), reqs: &[GenerateRequest]) -> u64 {
    let plain = engine(|c| config(c));
    let (plain_solo, plain_batched) = run(&plain, reqs);
    drop(plain);
    let spec = engine(|c| {
        config(c);
        c.speculative = ngram(4, 1, 3);
    });
    let (spec_solo, spec_batched) = run(&spec, reqs);
    for (i, want) in plain_solo.iter().enumerate() {
        assert_eq!(&spec_solo[i], want, "{name}: request {i} alone");
        assert_eq!(&spec_batched[i], want, "{name}: request {i} batched");
        assert_eq!(
            &plain_batched[i], want,
            "{name}: request {i} batched, plain"
        );
    }
    let stats = spec.stats();
    assert!(
        stats.spec_decode_draft_tokens >= stats.spec_decode_accepted_tokens,
        "{stats:?}"
    );
    stats.spec_decode_accepted_tokens
}

#[test]
fn speculation_changes_no_token_or_logprob_on_the_demo_model() {
    // Blocks of 4 tokens: drafts of up to 4 cross block boundaries all the time.
    let reqs = mixed_requests(&demo_prompts(), 60);
    let accepted = compare(
        "demo",
        |c| {
            c.block_size = 4;
            c.max_num_batched_tokens = 64;
        },
        &reqs,
    );
    // The demo repeats itself: lookup must find and the model confirm many drafted tokens.
    assert!(accepted > 200, "accepted {accepted} drafted tokens");
}

#[test]
fn speculation_changes_no_token_or_logprob_on_the_fixture_checkpoints() {
    let mut accepted = 0;
    for name in [
        "heads3-bin",
        "heads6-sharded",
        "pow2",
        "qkln-bias-bin-sharded",
    ] {
        let dir = fixture_dir(name);
        let prompts: Vec<Vec<u32>> = (0..3u32)
            .map(|i| {
                (0..5 + i * 9)
                    .map(|j| (i * 31 + j * 17) % 1000 + 1)
                    .collect()
            })
            .collect();
        let reqs = mixed_requests(&prompts, 24);
        accepted += compare(
            name,
            |c| {
                c.model = ModelSource::Dir(dir.clone());
                c.block_size = 4;
            },
            &reqs,
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    assert!(accepted > 0, "no draft was ever accepted");
}

#[test]
fn speculation_under_a_grammar_and_through_preemption_changes_nothing() {
    let prompts = demo_prompts();
    let mut reqs = Vec::new();
    for (i, p) in prompts.iter().enumerate() {
        // A grammar the demo's own loops fit in part: drafts it forbids end there.
        let mut r = request(p.clone(), 40);
        r.logprobs = Some(3);
        r.constraint = Some(Constraint::Regex(
            "((the|king|and|of|my|lord|thee|to|a)[ ,.\n]+)*".into(),
        ));
        reqs.push(r);
        let mut sampled = request(p.clone(), 30);
        sampled.sampling = SamplingParams {
            temperature: 0.5,
            seed: Some(100 + i as u64),
            ..Default::default()
        };
        reqs.push(sampled);
    }
    let accepted = compare("grammar", |c| c.block_size = 4, &reqs);
    assert!(accepted > 0, "no draft held under the grammar");

    // A pool of 20 blocks of 4 for 10 requests of up to 8 + 30 tokens: preemptions, with
    // drafts that must never take a block a running sequence needs.
    let reqs: Vec<GenerateRequest> = (0..10)
        .map(|i| request(prompts[i % prompts.len()].clone(), 30))
        .collect();
    let roomy = engine(|c| c.block_size = 4);
    let want: Vec<Exact> = one_by_one(&roomy, &reqs, collect_exact);
    let tight = engine(|c| {
        c.block_size = 4;
        c.kv_cache = KvCacheSize::Blocks(20);
        c.max_model_len = Some(64);
        c.speculative = ngram(4, 1, 3);
    });
    let got: Vec<Exact> = all_at_once(&tight, &reqs, collect_exact);
    assert_eq!(got, want);
    let stats = tight.stats();
    assert!(
        stats.num_preemptions > 0 && stats.spec_decode_drafts > 0,
        "{stats:?}"
    );
    wait_until(&tight, "blocks back", |s| s.kv_blocks_used == 0);
}

#[test]
fn seeded_speculative_sampling_is_reproducible() {
    let spec = engine(|c| c.speculative = ngram(6, 2, 4));
    let mut r = request(demo_prompts()[2].clone(), 80);
    r.sampling = SamplingParams {
        temperature: 0.9,
        seed: Some(7),
        ..Default::default()
    };
    let first = collect_exact(spec.submit(r.clone()).expect("accepted"));
    let again = collect_exact(spec.submit(r.clone()).expect("accepted"));
    assert_eq!(first, again);
    r.sampling.seed = Some(8);
    let other = collect_exact(spec.submit(r).expect("accepted"));
    assert_ne!(first.tokens, other.tokens, "the seed matters");
}

#[test]
fn kv_blocks_come_back_after_a_burst_with_cancelled_speculative_requests() {
    let spec = engine(|c| {
        c.block_size = 4;
        c.speculative = ngram(8, 1, 4);
    });
    let prompts = demo_prompts();
    let mut kept = Vec::new();
    for i in 0..24 {
        let mut r = request(prompts[i % prompts.len()].clone(), 40 + i * 7);
        r.n = 1 + i % 2;
        r.best_of = r.n;
        let mut stream = spec.submit(r).expect("accepted");
        if i % 3 == 0 {
            // Cancel after the first tokens arrive, mid-draft as often as not.
            let mut deltas = 0;
            while deltas < 3 {
                match stream.blocking_recv() {
                    Some(Event::Delta(_)) => deltas += 1,
                    Some(_) => {}
                    None => break,
                }
            }
            drop(stream);
        } else {
            kept.push(stream);
        }
    }
    for stream in kept {
        let out = collect_exact(stream);
        assert!(out.finish.iter().all(Option::is_some), "{out:?}");
    }
    wait_until(&spec, "every block back", |s| {
        s.kv_blocks_used == 0 && s.num_running == 0 && s.num_waiting == 0
    });
    let stats = spec.stats();
    assert!(stats.spec_decode_drafts > 0, "{stats:?}");
}

#[test]
fn invalid_speculative_settings_are_refused_at_start() {
    let zero = ngram(4, 1, 3).map(|s| NgramSpeculation {
        disable_by_batch_size: Some(0),
        ..s
    });
    for (spec, field) in [
        (zero, "disable_by_batch_size"),
        (ngram(0, 1, 3), "num_speculative_tokens"),
        (ngram(33, 1, 3), "num_speculative_tokens"),
        (ngram(4, 0, 3), "prompt_lookup_min"),
        (ngram(4, 3, 2), "prompt_lookup_max"),
    ] {
        let err = EngineHandle::start(EngineConfig {
            speculative: spec,
            ..Default::default()
        })
        .expect_err("refused");
        let text = err.to_string();
        assert!(
            text.contains("speculative_config") && text.contains(field),
            "{text}"
        );
    }
}
