//! The binary half of `bench/gpu-check.sh` (see docs/gpu.md): runs our forward pass on one
//! device with one attention path and writes what it saw, for the script to compare and tabulate.
//!
//! ```text
//! gpu_check logits --model DIR --prompts P.json --out OUT.safetensors
//!                  [--device cpu|cuda:N] [--dtype f32|f16|bf16] [--attention cpu|tensor|kernels]
//!                  [--chunk N] [--greedy N] [--quantization q8_0|q4_k|q6_k|q4_0]
//! gpu_check bench  --config CONFIG.json [--device ..] [--dtype ..] [--attention ..] [--quantization ..]
//!                  [--batches 1,16,64] [--context 512] [--steps 32] [--prefill 2048]
//! ```
//! `logits`: every prompt (token ids, a JSON list of lists) runs in one continuous batch: prompt
//! chunks of `--chunk` tokens, then `--greedy` argmax decode steps, all sequences in every step
//! (so steps mix prefill chunks and decodes). Writes `logits.{i}` (every prompt position, f32)
//! and `greedy.{i}` (i64).
//! `bench`: dummy weights of CONFIG's shapes (`Mpt::dummy`); decode steps at each batch size with
//! every sequence already holding `--context` tokens, then one `--prefill`-token prompt. Prints
//! one JSON object per measurement (milliseconds per step, tokens/s, weight bytes).

use std::collections::HashMap;
use std::time::Instant;

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use mpt_engine::kv::KvCache;
use mpt_engine::model::mpt::LoadOptions;
use mpt_engine::model::{LogitsWanted, ModelBatch, Mpt, SeqChunk};
use mpt_engine::{ModelSource, MptConfig, Quantization};

/// `--quantization NAME` (absent: none).
fn load_options(args: &Args) -> anyhow::Result<LoadOptions> {
    let quantization = match args.get("quantization", "none").as_str() {
        "none" => None,
        name => Some(Quantization::parse(name).map_err(anyhow::Error::msg)?),
    };
    Ok(LoadOptions { quantization })
}

struct Args(HashMap<String, String>);

impl Args {
    fn get(&self, key: &str, default: &str) -> String {
        self.0.get(key).cloned().unwrap_or_else(|| default.into())
    }
    fn need(&self, key: &str) -> anyhow::Result<String> {
        self.0
            .get(key)
            .cloned()
            .with_context(|| format!("--{key} is required"))
    }
    fn num(&self, key: &str, default: usize) -> anyhow::Result<usize> {
        Ok(self.get(key, &default.to_string()).parse()?)
    }
}

fn device(spec: &str) -> anyhow::Result<Device> {
    Ok(match spec.strip_prefix("cuda:") {
        Some(n) => Device::new_cuda(n.parse()?)?,
        None if spec == "cpu" => Device::Cpu,
        None => bail!("--device must be cpu or cuda:N"),
    })
}

fn dtype(spec: &str) -> anyhow::Result<DType> {
    Ok(match spec {
        "f32" => DType::F32,
        "f16" => DType::F16,
        "bf16" => DType::BF16,
        _ => bail!("--dtype must be f32, f16 or bf16"),
    })
}

/// A cache of the kind `--attention` asks for; switches the model's kernels on if needed.
fn cache(
    model: &mut Mpt,
    attention: &str,
    blocks: usize,
    block_size: usize,
) -> anyhow::Result<KvCache> {
    let (cfg, dev, dt) = (
        model.config().clone(),
        model.device().clone(),
        model.dtype(),
    );
    Ok(match attention {
        "cpu" => KvCache::new(&cfg, blocks, block_size, &dev)?,
        "tensor" => KvCache::new_tensors(&cfg, blocks, block_size, &dev, dt)?,
        "kernels" => {
            model.set_cuda_attention_kernels(true)?;
            KvCache::new_tensors(&cfg, blocks, block_size, &dev, dt)?
        }
        _ => bail!("--attention must be cpu, tensor or kernels"),
    })
}

fn argmax(row: &[f32]) -> u32 {
    (0..row.len())
        .max_by(|&a, &b| row[a].total_cmp(&row[b]))
        .unwrap_or(0) as u32
}

fn logits(args: &Args) -> anyhow::Result<()> {
    let dev = device(&args.get("device", "cpu"))?;
    let mut model = Mpt::load_with(
        &ModelSource::Dir(args.need("model")?.into()),
        &dev,
        dtype(&args.get("dtype", "f32"))?,
        load_options(args)?,
        &|_| {},
    )?;
    let prompts: Vec<Vec<u32>> =
        serde_json::from_str(&std::fs::read_to_string(args.need("prompts")?)?)?;
    let (chunk, greedy) = (args.num("chunk", usize::MAX)?, args.num("greedy", 8)?);
    let block_size = 16;
    let per_seq = |p: &Vec<u32>| (p.len() + greedy).div_ceil(block_size);
    let total: usize = prompts.iter().map(per_seq).sum();
    let mut cache = cache(&mut model, &args.get("attention", "cpu"), total, block_size)?;
    // Blocks handed out back to front so tables are not the identity.
    let mut next_block = total as u32;
    let tables: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| {
            (0..per_seq(p))
                .map(|_| {
                    next_block -= 1;
                    next_block
                })
                .collect()
        })
        .collect();
    let vocab = model.config().vocab_size;
    let mut done = vec![0usize; prompts.len()];
    let mut rows: Vec<Vec<f32>> = vec![Vec::new(); prompts.len()];
    let mut generated: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    loop {
        let mut batch = ModelBatch::default();
        let mut owners = Vec::new();
        for (i, p) in prompts.iter().enumerate() {
            let (tokens, wanted) = if done[i] < p.len() {
                let end = done[i].saturating_add(chunk).min(p.len());
                (p[done[i]..end].to_vec(), LogitsWanted::All)
            } else if generated[i].len() < greedy {
                (
                    vec![*generated[i].last().context("a decode follows a prompt")?],
                    LogitsWanted::Last,
                )
            } else {
                continue;
            };
            owners.push((i, tokens.len(), wanted));
            batch.seqs.push(SeqChunk {
                start_pos: done[i],
                block_table: tables[i].clone(),
                tokens,
                logits: wanted,
            });
        }
        if batch.seqs.is_empty() {
            break;
        }
        let out = model
            .forward(&batch, &mut cache)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut r = 0;
        for (i, n, wanted) in owners {
            done[i] += n;
            let count = wanted.rows(n);
            let mine = &out[r * vocab..(r + count) * vocab];
            r += count;
            if wanted == LogitsWanted::All {
                rows[i].extend_from_slice(mine);
            }
            if done[i] >= prompts[i].len() {
                generated[i].push(argmax(&mine[mine.len() - vocab..]));
            }
        }
    }
    let mut tensors = HashMap::new();
    for (i, (r, g)) in rows.into_iter().zip(generated).enumerate() {
        let len = r.len() / vocab;
        tensors.insert(
            format!("logits.{i}"),
            Tensor::from_vec(r, (len, vocab), &Device::Cpu)?,
        );
        // `greedy` argmax tokens; the last one was never fed back.
        let g: Vec<i64> = g.into_iter().take(greedy).map(i64::from).collect();
        tensors.insert(format!("greedy.{i}"), Tensor::new(g, &Device::Cpu)?);
    }
    candle_core::safetensors::save(&tensors, args.need("out")?)?;
    Ok(())
}

/// Parameter bytes of `config` in `dtype` (what one decode step must read at least).
fn weight_bytes(c: &MptConfig, dtype: DType) -> usize {
    let d = c.d_model;
    let per_layer = 3 * d * d + d * d + 2 * d * c.ffn_hidden_size() + 4 * d;
    (c.vocab_size * d + c.n_layers * per_layer + 2 * d) * dtype.size_in_bytes()
}

fn bench(args: &Args) -> anyhow::Result<()> {
    let dev = device(&args.get("device", "cpu"))?;
    let dt = dtype(&args.get("dtype", "bf16"))?;
    let config = MptConfig::from_json(&std::fs::read_to_string(args.need("config")?)?)?;
    let attention = args.get("attention", "tensor");
    let batches: Vec<usize> = args
        .get("batches", "1,16,64")
        .split(',')
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    let (context, steps, prefill) = (
        args.num("context", 512)?,
        args.num("steps", 32)?,
        args.num("prefill", 2048)?,
    );
    let load = Instant::now();
    let options = load_options(args)?;
    let mut model = Mpt::dummy_with(config.clone(), &dev, dt, 0, options)?;
    dev.synchronize()?;
    let load_s = load.elapsed().as_secs_f64();
    let block_size = 16;
    let max_batch = batches.iter().copied().max().unwrap_or(1);
    let per_seq = (context + steps + 1).div_ceil(block_size);
    let blocks = (max_batch * per_seq).max(prefill.div_ceil(block_size));
    let mut cache = cache(&mut model, &attention, blocks, block_size)?;
    let wb = if options.quantization.is_some() {
        // Matrices at their quantized size, plus the (small) vectors at the run dtype.
        let vectors =
            (config.n_layers * 4 * config.d_model + 2 * config.d_model) * dt.size_in_bytes();
        model.weight_bytes().values().sum::<u64>() as usize + vectors
    } else {
        weight_bytes(&config, dt)
    };
    let vocab = config.vocab_size as u32;
    let common = format!(
        r#""attention":"{attention}","d_model":{},"n_layers":{},"weight_bytes":{wb},"load_s":{load_s:.1}"#,
        config.d_model, config.n_layers
    );
    for &b in &batches {
        let mut times = Vec::new();
        // One warm-up step (kernel loading, cuBLAS handles), then `steps` timed ones.
        for step in 0..=steps {
            let batch = ModelBatch {
                seqs: (0..b)
                    .map(|s| SeqChunk {
                        tokens: vec![(s as u32 * 31 + step as u32) % vocab],
                        start_pos: context + step,
                        block_table: (s * per_seq..(s + 1) * per_seq).map(|x| x as u32).collect(),
                        logits: LogitsWanted::Last,
                    })
                    .collect(),
            };
            let t = Instant::now();
            // Copying the sampled rows to the host is part of a step (and synchronises).
            let _ = model.forward(&batch, &mut cache)?.to_vec2::<f32>()?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let mut timed = times[1..].to_vec();
        timed.sort_by(f64::total_cmp);
        let median = timed[timed.len() / 2];
        println!(
            r#"{{"kind":"decode","batch":{b},"context":{context},"ms_per_step":{median:.3},"tokens_per_s":{:.1},{common}}}"#,
            b as f64 * 1e3 / median
        );
    }
    if prefill > 0 {
        let mut times = Vec::new();
        for _ in 0..3 {
            let batch = ModelBatch {
                seqs: vec![SeqChunk {
                    tokens: (0..prefill as u32).map(|i| (i * 7919) % vocab).collect(),
                    start_pos: 0,
                    block_table: (0..prefill.div_ceil(block_size) as u32).collect(),
                    logits: LogitsWanted::Last,
                }],
            };
            let t = Instant::now();
            let _ = model.forward(&batch, &mut cache)?.to_vec2::<f32>()?;
            times.push(t.elapsed().as_secs_f64());
        }
        let best = times[1..].iter().copied().fold(f64::INFINITY, f64::min);
        println!(
            r#"{{"kind":"prefill","tokens":{prefill},"s":{best:.4},"tokens_per_s":{:.1},{common}}}"#,
            prefill as f64 / best
        );
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let mut argv = std::env::args().skip(1);
    let command = argv.next().unwrap_or_default();
    let mut map = HashMap::new();
    while let Some(key) = argv.next() {
        let key = key
            .strip_prefix("--")
            .with_context(|| format!("unexpected argument {key}"))?;
        map.insert(
            key.to_string(),
            argv.next()
                .with_context(|| format!("--{key} needs a value"))?,
        );
    }
    let args = Args(map);
    match command.as_str() {
        "logits" => logits(&args),
        "bench" => bench(&args),
        _ => bail!("usage: gpu_check logits|bench --key value ... (see the file's header)"),
    }
}
