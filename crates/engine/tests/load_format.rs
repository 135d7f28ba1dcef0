//! GPU-related startup settings through the engine handle, on the CPU: `--load-format dummy`
//! serves a checkpoint directory that holds only `config.json` and `tokenizer.json`;
//! `--attention-kernels custom` is refused on the CPU with a message naming the fix; the
//! automatic KV cache is the CPU byte budget; the profiling batch of `--gpu-memory-utilization`
//! runs through the model.

mod common;

use common::request;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use mpt_engine::api::config::DEFAULT_CPU_KV_CACHE_BYTES;
use mpt_engine::kv::KvCache;
use mpt_engine::kv::budget::profile_batch;
use mpt_engine::model::Mpt;
use mpt_engine::{
    AttentionKernels, EngineConfig, EngineError, EngineHandle, Event, KvCacheSize, LoadFormat,
    ModelSource, MptConfig,
};

#[path = "../../../tests/common/weightless.rs"]
mod weightless;

const FIXTURE: &str = "heads6-sharded";

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name)
}

/// A fresh directory with the fixture's `config.json` (unless `with_config` is false) and a
/// tokenizer, but no weight files.
fn weightless_dir(with_config: bool) -> PathBuf {
    weightless::weightless_checkpoint(&fixture(FIXTURE), with_config)
}

fn config(model: ModelSource, load_format: LoadFormat) -> EngineConfig {
    EngineConfig {
        model,
        load_format,
        threads: Some(2),
        ..EngineConfig::default()
    }
}

/// Generated token ids and text of a greedy one-choice request.
fn generate(engine: &EngineHandle, prompt: Vec<u32>, max_tokens: usize) -> (Vec<u32>, String) {
    let mut stream = engine
        .submit(request(prompt, max_tokens))
        .expect("accepted");
    let (mut ids, mut text) = (Vec::new(), String::new());
    while let Some(event) = stream.blocking_recv() {
        match event {
            Event::Delta(d) => {
                ids.extend(d.token_ids);
                text.push_str(&d.text);
            }
            Event::Completed { .. } => return (ids, text),
            Event::Failed(message) => panic!("request failed: {message}"),
            _ => {}
        }
    }
    panic!("stream ended without Completed");
}

#[test]
fn dummy_weights_serve_a_directory_without_weight_files() {
    let dir = weightless_dir(true);
    // Without dummy, the missing weights are the error.
    let err = EngineHandle::start(config(ModelSource::Dir(dir.clone()), LoadFormat::Auto))
        .expect_err("no weights");
    assert!(
        matches!(err, EngineError::WeightFile { .. }),
        "unexpected error: {err}"
    );
    let engine = EngineHandle::start(config(ModelSource::Dir(dir.clone()), LoadFormat::Dummy))
        .expect("dummy engine starts");
    let fixture_config = MptConfig::from_dir(&fixture(FIXTURE)).expect("fixture config");
    assert_eq!(engine.model_info().vocab_size, fixture_config.vocab_size);
    assert_eq!(
        engine.model_info().max_model_len,
        fixture_config.max_seq_len
    );
    let prompt = engine.tokenizer().encode("w1 w2 w3 w4").expect("encodes");
    assert_eq!(prompt, [1, 2, 3, 4]);
    let (ids, text) = generate(&engine, prompt.clone(), 12);
    assert_eq!(ids.len(), 12);
    assert!(
        ids.iter()
            .all(|&t| (t as usize) < fixture_config.vocab_size)
    );
    assert!(!text.is_empty());
    // The automatic cache on the CPU is the default byte budget of f16 blocks (auto dtype).
    let per_block = KvCache::bytes_per_block_dtype(&fixture_config, 16, DType::F16);
    assert_eq!(engine.model_info().kv_cache_dtype, "f16");
    assert_eq!(
        engine.model_info().kv_cache_bytes,
        engine.stats().kv_blocks_total as u64 * per_block
    );
    assert_eq!(
        engine.stats().kv_blocks_total as u64,
        DEFAULT_CPU_KV_CACHE_BYTES / per_block
    );
    // The dummy weights are seeded: a second engine generates the same tokens.
    let again = EngineHandle::start(config(ModelSource::Dir(dir.clone()), LoadFormat::Dummy))
        .expect("dummy engine starts");
    assert_eq!(generate(&again, prompt, 12).0, ids);
    drop((engine, again));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn dummy_without_config_json_says_so() {
    let dir = weightless_dir(false);
    let err = EngineHandle::start(config(ModelSource::Dir(dir.clone()), LoadFormat::Dummy))
        .expect_err("no config.json");
    let text = err.to_string();
    assert!(
        text.contains("config.json") && text.contains("--load-format dummy"),
        "{text}"
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn dummy_demo_model_generates() {
    let engine = EngineHandle::start(EngineConfig {
        kv_cache: KvCacheSize::Blocks(64),
        max_model_len: Some(1024),
        ..config(ModelSource::Demo, LoadFormat::Dummy)
    })
    .expect("dummy demo starts");
    let (ids, _) = generate(&engine, vec![510, 3158, 8516], 5);
    assert_eq!(ids.len(), 5);
    assert_eq!(engine.stats().kv_blocks_total, 64);
}

#[test]
fn custom_attention_kernels_are_refused_on_the_cpu() {
    let err = EngineHandle::start(EngineConfig {
        attention_kernels: AttentionKernels::Custom,
        ..config(ModelSource::Demo, LoadFormat::Auto)
    })
    .expect_err("refused on the CPU");
    match &err {
        EngineError::Setting { setting, message } => {
            assert_eq!(setting, "attention_kernels");
            assert!(message.contains("--device cuda"), "{message}");
        }
        other => panic!("unexpected error: {other}"),
    }
}

#[test]
fn gpu_memory_utilization_out_of_range_is_refused() {
    for bad in [0.0, 1.01] {
        let err = EngineHandle::start(EngineConfig {
            gpu_memory_utilization: bad,
            ..config(ModelSource::Demo, LoadFormat::Dummy)
        })
        .expect_err("refused");
        assert!(err.to_string().contains("gpu_memory_utilization"), "{err}");
    }
}

#[test]
fn profile_batch_runs_through_the_tensor_path() {
    let cfg = MptConfig::from_dir(&fixture(FIXTURE)).expect("fixture config");
    let model = Mpt::dummy(cfg.clone(), &Device::Cpu, DType::F32, 1).expect("dummy model");
    // 96 tokens in 40-token sequences at the end of a 40-token context, plus a remainder.
    for (tokens, max_model_len) in [(96, 40), (24, 200)] {
        let (batch, blocks) = profile_batch(tokens, max_model_len, 8, 16, cfg.vocab_size);
        let mut cache =
            KvCache::new_tensors(&cfg, blocks, 16, &Device::Cpu, DType::F32).expect("cache");
        let logits = model.forward(&batch, &mut cache).expect("forward");
        assert_eq!(logits.dims(), &[tokens, cfg.vocab_size]);
    }
}
