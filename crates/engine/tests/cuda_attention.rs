//! GPU tests (feature `cuda`): the tensor path on CUDA against the CPU kernel on a fixture, and our
//! CUDA kernels against the tensor path on dummy weights. A `--features cuda` test run is a GPU
//! run: without a CUDA device each test fails, never passes silently. CPU-only builds (and CI,
//! which only builds the CUDA variant) do not compile this file.
#![cfg(feature = "cuda")]

use std::path::Path;

use candle_core::{DType, Device};
use mpt_engine::kv::KvCache;
use mpt_engine::model::{LogitsWanted, ModelBatch, Mpt, SeqChunk};
use mpt_engine::{ModelSource, MptConfig};

fn gpu() -> Device {
    Device::new_cuda(0)
        .unwrap_or_else(|e| panic!("these tests need a CUDA device and none could be opened: {e}"))
}

/// Two steps: a 40-token prompt and a 9-token one in 16-token chunks, then decodes for both.
fn run(model: &Mpt, cache: &mut KvCache) -> Vec<f32> {
    let prompts: [Vec<u32>; 2] = [(0..40).map(|i| i * 7 % 900).collect(), (0..9).collect()];
    let tables = [vec![3u32, 9, 1, 12], vec![5u32]];
    let mut done = [0usize; 2];
    let mut out = Vec::new();
    for step in 0..5 {
        let mut batch = ModelBatch::default();
        for (i, p) in prompts.iter().enumerate() {
            let tokens: Vec<u32> = if done[i] < p.len() {
                p[done[i]..(done[i] + 16).min(p.len())].to_vec()
            } else {
                vec![(step * 13 + i as u32) % 900]
            };
            batch.seqs.push(SeqChunk {
                start_pos: done[i],
                block_table: tables[i].clone(),
                logits: LogitsWanted::Last,
                tokens: tokens.clone(),
            });
            done[i] += tokens.len();
        }
        let logits = model.forward(&batch, cache).expect("forward");
        out.extend(logits.flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    out
}

fn rel_err(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "compared vectors differ in length");
    let d: f32 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f32>()
        .sqrt();
    d / b.iter().map(|y| y * y).sum::<f32>().sqrt()
}

#[test]
fn tensor_path_on_cuda_matches_the_cpu_kernel() {
    let gpu = gpu();
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/models/pow2");
    let source = ModelSource::Dir(dir);
    let cpu_model = Mpt::load(&source, &Device::Cpu, DType::F32).unwrap();
    let gpu_model = Mpt::load(&source, &gpu, DType::F32).unwrap();
    let cfg = cpu_model.config().clone();
    let mut a = KvCache::new(&cfg, 16, 16, &Device::Cpu).unwrap();
    let mut b = KvCache::new_tensors(&cfg, 16, 16, &gpu, DType::F32).unwrap();
    let err = rel_err(&run(&gpu_model, &mut b), &run(&cpu_model, &mut a));
    assert!(err < 1e-4, "f32 tensor path on CUDA vs CPU kernel: {err}");
}

#[test]
fn cuda_kernels_match_the_tensor_path() {
    let gpu = gpu();
    for (d_model, n_heads) in [(256, 4), (448, 4), (512, 4)] {
        let cfg = MptConfig::from_json(&format!(
            r#"{{"d_model":{d_model},"n_heads":{n_heads},"n_layers":2,"vocab_size":1000,
               "max_seq_len":512,"no_bias":true,"attn_config":{{"alibi":true}}}}"#
        ))
        .unwrap();
        for dtype in [DType::BF16, DType::F32] {
            let tensors = Mpt::dummy(cfg.clone(), &gpu, dtype, 5).unwrap();
            let mut kernels = Mpt::dummy(cfg.clone(), &gpu, dtype, 5).unwrap();
            kernels.set_cuda_attention_kernels(true).unwrap();
            let mut a = KvCache::new_tensors(&cfg, 16, 16, &gpu, dtype).unwrap();
            let mut b = KvCache::new_tensors(&cfg, 16, 16, &gpu, dtype).unwrap();
            let err = rel_err(&run(&kernels, &mut b), &run(&tensors, &mut a));
            let bound = if dtype == DType::F32 { 1e-4 } else { 1e-2 };
            assert!(
                err < bound,
                "d{d_model}/{n_heads} {dtype:?}: kernels vs tensors {err}"
            );
        }
    }
}
