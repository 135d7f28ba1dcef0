//! Times the raw forward pass of a model: prefill of a prompt, then greedy decode one token at a
//! time through the paged cache (no scheduler, no sampling beyond argmax). With BATCH > 1, that
//! many sequences are prefilled one after the other and then decode together, one row each per
//! step, as the scheduler batches them.
//!
//! `cargo run --release -p mpt-engine --example decode_speed -- [MODEL_DIR] [PROMPT_LEN] [NEW_TOKENS] [BATCH] [KV_DTYPE] [CHUNK]`
//! (no MODEL_DIR or `demo`: the bundled demo model; KV_DTYPE f32 (default), f16 or bf16; the
//! prompt is prefilled in steps of CHUNK tokens, default all at once).

use std::time::Instant;

use candle_core::{DType, Device};
use mpt_engine::ModelSource;
use mpt_engine::kv::KvCache;
use mpt_engine::model::{LogitsWanted, ModelBatch, Mpt, SeqChunk};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let source = match args.first().map(String::as_str) {
        None | Some("demo") => ModelSource::Demo,
        Some(dir) => ModelSource::Dir(dir.into()),
    };
    let prompt_len: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(128);
    let new_tokens: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(128);
    let batch_size: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(1);
    anyhow::ensure!(batch_size >= 1, "BATCH must be at least 1");
    let kv_dtype = match args.get(4).map(String::as_str) {
        None | Some("f32") => DType::F32,
        Some("f16") => DType::F16,
        Some("bf16") => DType::BF16,
        Some(other) => anyhow::bail!("KV_DTYPE must be f32, f16 or bf16, not {other}"),
    };
    let chunk: usize = args
        .get(5)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(prompt_len)
        .max(1);
    let model = Mpt::load(&source, &Device::Cpu, DType::F32)?;
    let block_size = 16;
    let blocks_per_seq = (prompt_len + new_tokens).div_ceil(block_size);
    let mut cache = KvCache::with_dtype(
        model.config(),
        blocks_per_seq * batch_size,
        block_size,
        &Device::Cpu,
        kv_dtype,
    )?;
    let tables: Vec<Vec<u32>> = (0..batch_size)
        .map(|s| {
            let first = (s * blocks_per_seq) as u32;
            (first..first + blocks_per_seq as u32).collect()
        })
        .collect();

    // One untimed prefill first: the first forward pays for page faults in fresh buffers and
    // the cache, which a running server has long paid.
    let warmup = ModelBatch {
        seqs: vec![SeqChunk {
            tokens: vec![1; prompt_len],
            start_pos: 0,
            block_table: tables[0].clone(),
            logits: LogitsWanted::Last,
        }],
    };
    model.forward(&warmup, &mut cache)?;

    let start = Instant::now();
    let mut next = Vec::with_capacity(batch_size);
    for (s, table) in tables.iter().enumerate() {
        // Different prompts per sequence, so no two rows are the same work.
        let prompt: Vec<u32> = (0..prompt_len as u32)
            .map(|i| (i * 7919 + s as u32 * 31) % 50000)
            .collect();
        let mut logits = None;
        for (c, piece) in prompt.chunks(chunk).enumerate() {
            let batch = ModelBatch {
                seqs: vec![SeqChunk {
                    tokens: piece.to_vec(),
                    start_pos: c * chunk,
                    block_table: table.clone(),
                    logits: LogitsWanted::Last,
                }],
            };
            logits = Some(model.forward(&batch, &mut cache)?);
        }
        let logits = logits.expect("the prompt has at least one chunk");
        next.push(logits.argmax(1)?.to_vec1::<u32>()?[0]);
    }
    let prefill = start.elapsed() / batch_size as u32;

    let start = Instant::now();
    for i in 0..new_tokens {
        let batch = ModelBatch {
            seqs: tables
                .iter()
                .zip(&next)
                .map(|(table, &token)| SeqChunk {
                    tokens: vec![token],
                    start_pos: prompt_len + i,
                    block_table: table.clone(),
                    logits: LogitsWanted::Last,
                })
                .collect(),
        };
        next = model
            .forward(&batch, &mut cache)?
            .argmax(1)?
            .to_vec1::<u32>()?;
    }
    let step = start.elapsed() / new_tokens as u32;
    println!(
        "prefill {prompt_len} tokens: {:.1} ms ({:.0} tok/s); decode {new_tokens} steps of {batch_size}: {:.2} ms/step ({:.0} tok/s)",
        prefill.as_secs_f64() * 1e3,
        prompt_len as f64 / prefill.as_secs_f64(),
        step.as_secs_f64() * 1e3,
        batch_size as f64 / step.as_secs_f64()
    );
    Ok(())
}
