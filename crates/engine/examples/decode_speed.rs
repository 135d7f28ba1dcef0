//! Times the raw forward pass of a model: prefill of a prompt, then greedy decode one token at a
//! time through the paged cache (no scheduler, no sampling beyond argmax).
//!
//! `cargo run --release -p mpt-engine --example decode_speed -- [MODEL_DIR] [PROMPT_LEN] [NEW_TOKENS]`
//! (no MODEL_DIR or `demo`: the bundled demo model).

use std::time::Instant;

use candle_core::{DType, Device};
use mpt_engine::ModelSource;
use mpt_engine::kv_cache::KvCache;
use mpt_engine::model::{LogitsWanted, ModelBatch, Mpt, SeqChunk};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let source = match args.first().map(String::as_str) {
        None | Some("demo") => ModelSource::Demo,
        Some(dir) => ModelSource::Dir(dir.into()),
    };
    let prompt_len: usize = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(128);
    let new_tokens: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(128);
    let model = Mpt::load(&source, &Device::Cpu, DType::F32)?;
    let block_size = 16;
    let blocks = (prompt_len + new_tokens).div_ceil(block_size);
    let mut cache = KvCache::new(model.config(), blocks, block_size, &Device::Cpu)?;
    let table: Vec<u32> = (0..blocks as u32).collect();
    let prompt: Vec<u32> = (0..prompt_len as u32).map(|i| (i * 7919) % 50000).collect();

    let start = Instant::now();
    let batch = ModelBatch {
        seqs: vec![SeqChunk {
            tokens: prompt,
            start_pos: 0,
            block_table: table.clone(),
            logits: LogitsWanted::Last,
        }],
    };
    let mut logits = model.forward(&batch, &mut cache)?;
    let prefill = start.elapsed();

    let start = Instant::now();
    for i in 0..new_tokens {
        let next = logits.argmax(1)?.to_vec1::<u32>()?[0];
        let batch = ModelBatch {
            seqs: vec![SeqChunk {
                tokens: vec![next],
                start_pos: prompt_len + i,
                block_table: table.clone(),
                logits: LogitsWanted::Last,
            }],
        };
        logits = model.forward(&batch, &mut cache)?;
    }
    let decode = start.elapsed();
    println!(
        "prefill {prompt_len} tokens: {:.1} ms ({:.0} tok/s); decode {new_tokens} tokens: {:.2} ms/token ({:.0} tok/s)",
        prefill.as_secs_f64() * 1e3,
        prompt_len as f64 / prefill.as_secs_f64(),
        decode.as_secs_f64() * 1e3 / new_tokens as f64,
        new_tokens as f64 / decode.as_secs_f64()
    );
    Ok(())
}
