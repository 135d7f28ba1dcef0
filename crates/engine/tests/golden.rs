//! The forward pass against golden outputs from HF `transformers` (see tests/fixtures/generate.py):
//! logits, top-5 ids and greedy continuations, for every fixture checkpoint format and MPT option,
//! through the paged cache with different block sizes, chunked prefill and mixed batches.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use mpt_engine::kv::KvCache;
use mpt_engine::model::{LogitsWanted, ModelBatch, Mpt, SeqChunk};
use mpt_engine::{EngineError, ModelSource};

const FIXTURES: [&str; 4] = [
    "pow2",
    "heads6-sharded",
    "qkln-bias-bin-sharded",
    "heads3-bin",
];
const MAX_REL_ERR: f32 = 1e-4;

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

struct Expected(HashMap<String, Tensor>);

impl Expected {
    fn load(path: &Path) -> Self {
        Self(candle_core::safetensors::load(path, &Device::Cpu).expect("expected outputs load"))
    }
    fn ids(&self, key: &str) -> Vec<u32> {
        let t = &self.0[key];
        t.to_dtype(DType::I64)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<i64>()
            .unwrap()
            .into_iter()
            .map(|x| x as u32)
            .collect()
    }
    fn floats(&self, key: &str) -> Vec<f32> {
        self.0[key].flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }
    fn has(&self, key: &str) -> bool {
        self.0.contains_key(key)
    }
    fn num_prompts(&self) -> usize {
        (0..)
            .take_while(|i| self.has(&format!("prompt.{i}")))
            .count()
    }
}

/// A sequence's cache bookkeeping, with blocks handed out in a scrambled order so that any
/// confusion between logical and physical block ids shows up.
struct Seq {
    tokens: Vec<u32>,
    cached: usize,
    table: Vec<u32>,
}

struct Pool {
    free: Vec<u32>,
    block_size: usize,
}

impl Pool {
    fn new(num_blocks: usize, block_size: usize) -> Self {
        let mut free: Vec<u32> = (0..num_blocks as u32).collect();
        // Deterministic scramble: odd blocks from the top first, then even ones.
        free.sort_by_key(|b| (b % 2 == 0, std::cmp::Reverse(*b)));
        Self { free, block_size }
    }
    fn chunk(&mut self, seq: &mut Seq, new: &[u32], logits: LogitsWanted) -> SeqChunk {
        let start_pos = seq.cached;
        seq.tokens.extend_from_slice(new);
        seq.cached += new.len();
        while seq.table.len() * self.block_size < seq.cached {
            seq.table
                .push(self.free.pop().expect("test pool large enough"));
        }
        SeqChunk {
            tokens: new.to_vec(),
            start_pos,
            block_table: seq.table.clone(),
            logits,
        }
    }
}

fn load(name: &str) -> Mpt {
    Mpt::load(
        &ModelSource::Dir(fixtures_dir().join("models").join(name)),
        &Device::Cpu,
        DType::F32,
    )
    .expect("fixture loads")
}

fn new_cache(model: &Mpt, block_size: usize) -> (KvCache, Pool) {
    let blocks = 4096 / block_size + 64;
    (
        // An f32 cache: the reference tolerance holds for exact attention inputs (16-bit caches
        // have their own bounds in long_context.rs).
        KvCache::with_dtype(model.config(), blocks, block_size, &Device::Cpu, DType::F32).unwrap(),
        Pool::new(blocks, block_size),
    )
}

fn rows(t: &Tensor) -> Vec<Vec<f32>> {
    t.to_vec2::<f32>().unwrap()
}

fn rel_err(ours: &[f32], reference: &[f32]) -> f32 {
    assert_eq!(
        ours.len(),
        reference.len(),
        "compared vectors differ in length"
    );
    let diff: f32 = ours
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f32>()
        .sqrt();
    let norm: f32 = reference.iter().map(|b| b * b).sum::<f32>().sqrt();
    diff / norm
}

fn top5(row: &[f32]) -> Vec<u32> {
    let mut idx: Vec<u32> = (0..row.len() as u32).collect();
    idx.sort_by(|&a, &b| row[b as usize].total_cmp(&row[a as usize]));
    idx.truncate(5);
    idx
}

fn argmax(row: &[f32]) -> u32 {
    top5(row)[0]
}

/// Prefill `prompt` in chunks of `chunk` tokens, returning logits for every prompt position.
fn prefill_all(
    model: &Mpt,
    cache: &mut KvCache,
    pool: &mut Pool,
    seq: &mut Seq,
    prompt: &[u32],
    chunk: usize,
) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    for piece in prompt.chunks(chunk) {
        let batch = ModelBatch {
            seqs: vec![pool.chunk(seq, piece, LogitsWanted::All)],
        };
        out.extend(rows(&model.forward(&batch, cache).expect("forward")));
    }
    out
}

/// Greedy continuation through the paged cache (one decode token per step).
fn greedy(
    model: &Mpt,
    cache: &mut KvCache,
    pool: &mut Pool,
    seq: &mut Seq,
    last_logits: &[f32],
    steps: usize,
) -> Vec<u32> {
    let mut next = argmax(last_logits);
    let mut out = vec![next];
    while out.len() < steps {
        let batch = ModelBatch {
            seqs: vec![pool.chunk(seq, &[next], LogitsWanted::Last)],
        };
        next = argmax(&rows(&model.forward(&batch, cache).expect("decode"))[0]);
        out.push(next);
    }
    out
}

/// Compares greedy tokens up to the first step where the reference's top-1/top-2 margin is
/// below 1e-3 (there the float noise of any implementation may pick either).
fn assert_greedy_matches(
    fixture: &str,
    i: usize,
    ours: &[u32],
    reference: &[u32],
    margins: &[f32],
) -> usize {
    for step in 0..reference.len() {
        if margins[step] <= 1e-3 {
            return step;
        }
        assert_eq!(
            ours[step], reference[step],
            "{fixture} prompt {i}: greedy token {step} differs ({ours:?} vs {reference:?})"
        );
    }
    reference.len()
}

#[test]
fn logits_top5_and_greedy_match_the_reference() {
    for fixture in FIXTURES {
        let model = load(fixture);
        let expected = Expected::load(
            &fixtures_dir()
                .join("models")
                .join(fixture)
                .join("expected.safetensors"),
        );
        let mut worst = 0f32;
        for i in 0..expected.num_prompts() {
            let prompt = expected.ids(&format!("prompt.{i}"));
            let (mut cache, mut pool) = new_cache(&model, 16);
            let mut seq = Seq {
                tokens: vec![],
                cached: 0,
                table: vec![],
            };
            let logits = prefill_all(&model, &mut cache, &mut pool, &mut seq, &prompt, usize::MAX);
            assert_eq!(logits.len(), prompt.len());
            let reference_all = expected.floats(&format!("logits.{i}"));
            let err = rel_err(&logits.concat(), &reference_all);
            worst = worst.max(err);
            assert!(
                err <= MAX_REL_ERR,
                "{fixture} prompt {i}: all-position logits rel err {err}"
            );
            let last_err = rel_err(
                logits.last().unwrap(),
                &expected.floats(&format!("last_logits.{i}")),
            );
            assert!(
                last_err <= MAX_REL_ERR,
                "{fixture} prompt {i}: last logits rel err {last_err}"
            );
            let reference_top5 = expected.ids(&format!("top5.{i}"));
            for (pos, row) in logits.iter().enumerate() {
                assert_eq!(
                    top5(row),
                    reference_top5[pos * 5..pos * 5 + 5],
                    "{fixture} prompt {i} position {pos}: top-5 ids"
                );
            }
            let ours = greedy(
                &model,
                &mut cache,
                &mut pool,
                &mut seq,
                logits.last().unwrap(),
                20,
            );
            let compared = assert_greedy_matches(
                fixture,
                i,
                &ours,
                &expected.ids(&format!("greedy.{i}")),
                &expected.floats(&format!("margin.{i}")),
            );
            assert!(
                compared >= 5,
                "{fixture} prompt {i}: only {compared} greedy steps had a usable margin"
            );
        }
        println!("{fixture}: worst logits relative error {worst:.2e}");
    }
}

#[test]
fn block_size_chunking_and_batching_do_not_change_results() {
    let model = load("heads6-sharded");
    let expected =
        Expected::load(&fixtures_dir().join("models/heads6-sharded/expected.safetensors"));
    let prompts: Vec<Vec<u32>> = (0..expected.num_prompts())
        .map(|i| expected.ids(&format!("prompt.{i}")))
        .collect();

    // Alone, whole prompt, block size 16: the baseline.
    let baseline: Vec<Vec<Vec<f32>>> = prompts
        .iter()
        .map(|p| {
            let (mut cache, mut pool) = new_cache(&model, 16);
            let mut seq = Seq {
                tokens: vec![],
                cached: 0,
                table: vec![],
            };
            prefill_all(&model, &mut cache, &mut pool, &mut seq, p, usize::MAX)
        })
        .collect();

    for (block_size, chunk) in [(1, usize::MAX), (32, usize::MAX), (16, 5), (1, 3), (32, 17)] {
        for (p, base) in prompts.iter().zip(&baseline) {
            let (mut cache, mut pool) = new_cache(&model, block_size);
            let mut seq = Seq {
                tokens: vec![],
                cached: 0,
                table: vec![],
            };
            let got = prefill_all(&model, &mut cache, &mut pool, &mut seq, p, chunk);
            let err = rel_err(&got.concat(), &base.concat());
            assert!(
                err < 1e-5,
                "block size {block_size}, chunk {chunk}: rel err {err}"
            );
        }
    }

    // All prompts in one mixed batch: two whole prompts, two in chunks, interleaved with decodes.
    let (mut cache, mut pool) = new_cache(&model, 16);
    let mut seqs: Vec<Seq> = prompts
        .iter()
        .map(|_| Seq {
            tokens: vec![],
            cached: 0,
            table: vec![],
        })
        .collect();
    let mut got: Vec<Vec<Vec<f32>>> = vec![Vec::new(); prompts.len()];
    let chunk = 13;
    loop {
        let mut batch = ModelBatch::default();
        let mut owners = Vec::new();
        for (i, (seq, p)) in seqs.iter_mut().zip(&prompts).enumerate() {
            if seq.cached < p.len() {
                let end = if i % 2 == 0 {
                    p.len()
                } else {
                    (seq.cached + chunk).min(p.len())
                };
                let piece = p[seq.cached..end].to_vec();
                owners.push((i, piece.len()));
                batch.seqs.push(pool.chunk(seq, &piece, LogitsWanted::All));
            }
        }
        if batch.seqs.is_empty() {
            break;
        }
        let out = rows(&model.forward(&batch, &mut cache).unwrap());
        let mut r = 0;
        for (i, n) in owners {
            got[i].extend_from_slice(&out[r..r + n]);
            r += n;
        }
    }
    for (i, (g, base)) in got.iter().zip(&baseline).enumerate() {
        let err = rel_err(&g.concat(), &base.concat());
        assert!(err < 1e-5, "prompt {i} in a mixed batch: rel err {err}");
    }
}

#[test]
fn prompt_longer_than_max_seq_len_runs_and_matches() {
    // pow2's config says max_seq_len 96; prompt 3 has 120 tokens and greedy runs to 140. ALiBi is
    // computed from positions, so nothing is sized by max_seq_len (the engine's limit is raised
    // with max_model_len).
    let model = load("pow2");
    assert_eq!(model.config().max_seq_len, 96);
    let expected = Expected::load(&fixtures_dir().join("models/pow2/expected.safetensors"));
    let prompt = expected.ids("prompt.3");
    assert!(prompt.len() > 96);
    let (mut cache, mut pool) = new_cache(&model, 16);
    let mut seq = Seq {
        tokens: vec![],
        cached: 0,
        table: vec![],
    };
    let logits = prefill_all(&model, &mut cache, &mut pool, &mut seq, &prompt, 50);
    assert!(rel_err(logits.last().unwrap(), &expected.floats("last_logits.3")) <= MAX_REL_ERR);
    let ours = greedy(
        &model,
        &mut cache,
        &mut pool,
        &mut seq,
        logits.last().unwrap(),
        20,
    );
    assert_greedy_matches(
        "pow2",
        3,
        &ours,
        &expected.ids("greedy.3"),
        &expected.floats("margin.3"),
    );
}

#[test]
/// The bundled demo is the trained Shakespeare model: its greedy continuations, recorded by
/// `tests/fixtures/train_demo.py` with `transformers`, guard the ALiBi path on real (peaked)
/// attention patterns.
fn bundled_demo_model_matches_the_reference_and_its_tokenizer() {
    let model = Mpt::load(&ModelSource::Demo, &Device::Cpu, DType::F32).expect("demo loads");
    let expected = Expected::load(&fixtures_dir().join("demo-expected.safetensors"));
    let texts: Vec<String> = serde_json::from_str(
        &std::fs::read_to_string(fixtures_dir().join("demo-prompts.json")).unwrap(),
    )
    .unwrap();
    let tokenizer =
        mpt_engine::Tokenizer::from_bytes(mpt_engine::model::demo::TOKENIZER_JSON).unwrap();
    for (i, text) in texts.iter().enumerate() {
        assert_eq!(
            tokenizer.encode(text).unwrap(),
            expected.ids(&format!("prompt.{i}")),
            "tokenization of {text:?}"
        );
    }
    for i in 0..expected.num_prompts() {
        let prompt = expected.ids(&format!("prompt.{i}"));
        let (mut cache, mut pool) = new_cache(&model, 16);
        let mut seq = Seq {
            tokens: vec![],
            cached: 0,
            table: vec![],
        };
        let logits = prefill_all(&model, &mut cache, &mut pool, &mut seq, &prompt, usize::MAX);
        let err = rel_err(
            logits.last().unwrap(),
            &expected.floats(&format!("last_logits.{i}")),
        );
        assert!(err <= MAX_REL_ERR, "demo prompt {i}: rel err {err}");
        let reference = expected.ids(&format!("greedy.{i}"));
        let ours = greedy(
            &model,
            &mut cache,
            &mut pool,
            &mut seq,
            logits.last().unwrap(),
            reference.len(),
        );
        let compared = assert_greedy_matches(
            "demo",
            i,
            &ours,
            &reference,
            &expected.floats(&format!("margin.{i}")),
        );
        // A trained model has clear margins: most of the recorded continuation must be checked.
        assert!(
            compared >= reference.len() / 2,
            "demo prompt {i}: only {compared} steps compared"
        );
    }
}

/// Copies a fixture to a temp dir so a test can break it.
fn broken_copy(name: &str, tag: &str) -> PathBuf {
    let src = fixtures_dir().join("models").join(name);
    let dst = std::env::temp_dir().join(format!("mpt-engine-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dst);
    std::fs::create_dir_all(&dst).unwrap();
    for entry in std::fs::read_dir(&src).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dst.join(entry.file_name())).unwrap();
    }
    dst
}

fn load_err(dir: &Path) -> EngineError {
    Mpt::load(
        &ModelSource::Dir(dir.to_path_buf()),
        &Device::Cpu,
        DType::F32,
    )
    .expect_err("must fail")
}

#[test]
fn bad_checkpoints_name_the_tensor_and_the_file() {
    // A config that promises a wider model than the weights: shape error naming tensor and file.
    let dir = broken_copy("pow2", "shape");
    let cfg = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"vocab_size\": 1024", "\"vocab_size\": 2048");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let err = load_err(&dir).to_string();
    assert!(
        err.contains("transformer.wte.weight")
            && err.contains("model.safetensors")
            && err.contains("[1024, 64]"),
        "{err}"
    );

    // More layers than the checkpoint has: the first missing tensor is named, with the index file.
    let dir = broken_copy("qkln-bias-bin-sharded", "missing");
    let cfg = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"n_layers\": 2", "\"n_layers\": 3");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    let err = load_err(&dir).to_string();
    assert!(
        err.contains("transformer.blocks.2.norm_1.weight")
            && err.contains("pytorch_model.bin.index.json"),
        "{err}"
    );

    // A truncated shard: an error naming that file.
    let dir = broken_copy("heads6-sharded", "truncated");
    let shard = dir.join("model-00002-of-00002.safetensors");
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 3]).unwrap();
    let err = load_err(&dir).to_string();
    assert!(err.contains("model-00002-of-00002.safetensors"), "{err}");

    // A missing shard listed in the index.
    std::fs::remove_file(&shard).unwrap();
    let err = load_err(&dir).to_string();
    assert!(
        err.contains("model-00002-of-00002.safetensors") && err.contains("does not exist"),
        "{err}"
    );

    // No weights at all.
    let dir = broken_copy("pow2", "empty");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert!(matches!(load_err(&dir), EngineError::WeightFile { .. }));

    // An unsupported option names the config field at load time.
    let dir = broken_copy("pow2", "prefixlm");
    let cfg = std::fs::read_to_string(dir.join("config.json"))
        .unwrap()
        .replace("\"prefix_lm\": false", "\"prefix_lm\": true");
    std::fs::write(dir.join("config.json"), cfg).unwrap();
    assert!(load_err(&dir).to_string().contains("attn_config.prefix_lm"));
}
