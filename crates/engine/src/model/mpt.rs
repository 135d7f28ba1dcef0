//! The MPT decoder (mosaicml llm-foundry `MPTForCausalLM`; HF `transformers` `MptForCausalLM` is
//! the reference we test against). Per block: `x + attn(norm_1(x))`, then
//! `x + down(gelu_erf(up(norm_2(x))))`; fused `Wqkv` (q, k, v in that order), optional clamp
//! (`clip_qkv`) and full-width q/k LayerNorms (`qk_ln`); ALiBi instead of positions; logits are
//! `norm_f(h) · wteᵀ`, times `logit_scale` when set.
//!
//! The KV cache is passed in from outside and paged: `forward` takes a mixed batch (prefill
//! chunks and decode tokens of many sequences) and only computes logits for rows that need them.

use std::cell::Cell;

use candle_core::{D, DType, Device, Tensor};

use super::alibi::alibi_slopes;
use super::attention::Attention;
use super::batch::ModelBatch;
use super::config::MptConfig;
use super::demo;
use super::gguf::{GgufFile, GgufTensor, gguf_name};
use super::linear::{Linear, RowRouting, Weight};
use super::quantize::{WeightPlan, refuse_requantizing};
use super::weights::{DummyWeights, WeightFiles};
use crate::api::config::{ModelSource, Quantization};
use crate::api::error::{EngineError, Result};
use crate::api::types::LoadProgress;
use crate::kernels::cpu::gelu::gelu_erf;
use crate::kv::KvCache;

/// LayerNorm with weight and bias; checkpoints without biases get a zero bias so candle's fused
/// kernel is used.
#[derive(Debug, Clone)]
struct Norm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl Norm {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)
    }
}

/// One decoder block's weights.
#[derive(Debug, Clone)]
struct Block {
    norm_1: Norm,
    wqkv: Linear,
    qk_ln: Option<(Norm, Norm)>,
    out_proj: Linear,
    norm_2: Norm,
    up_proj: Linear,
    down_proj: Linear,
}

/// A loaded MPT model on one device.
#[derive(Debug)]
pub struct Mpt {
    config: MptConfig,
    /// The token embedding; without a separate output matrix also the logits projection.
    wte: Linear,
    /// The output projection: `wte` (tied, as MPT ships) or a GGUF file's `output.weight`.
    lm_head: Linear,
    /// Whether `lm_head` is `wte` itself.
    tied: bool,
    /// Which f32 matmul kernel serves which row count (see [`Mpt::set_batch_invariant`]).
    routing: RowRouting,
    blocks: Vec<Block>,
    norm_f: Norm,
    attention: Attention,
    logit_scale: Option<f64>,
    device: Device,
    dtype: DType,
}

/// The dtype of the activations for weights of `dtype` on `device`: f32 for bf16 weights on
/// the CPU, as llama.cpp does — the bf16 kernel rounds its input rows to bf16 itself and sums
/// in f32, and norms, adds, GELU and attention then run on f32 rather than through candle's
/// per-element bf16 conversions. Otherwise the weights' dtype.
fn activation_dtype(device: &Device, dtype: DType) -> DType {
    if device.is_cpu() && dtype == DType::BF16 {
        DType::F32
    } else {
        dtype
    }
}

/// Where weights come from: checkpoint files, a GGUF file, or random values of the same shapes.
enum WeightSource<'a> {
    Files(&'a WeightFiles),
    Gguf(&'a GgufFile),
    Dummy(DummyWeights),
}

/// Reads tensors by their mosaicml names, reporting progress after each.
struct TensorReader<'a> {
    weights: WeightSource<'a>,
    config: &'a MptConfig,
    device: &'a Device,
    dtype: DType,
    plan: WeightPlan,
    report: &'a dyn Fn(LoadProgress),
    loaded: Cell<usize>,
}

impl TensorReader<'_> {
    fn progress(&self) {
        let total = match &self.weights {
            WeightSource::Files(files) => files.len(),
            WeightSource::Gguf(file) => file.len(),
            WeightSource::Dummy(_) => 0,
        };
        self.loaded.set(self.loaded.get() + 1);
        (self.report)(LoadProgress {
            tensors_loaded: self.loaded.get(),
            tensors_total: total.max(self.loaded.get()),
        });
    }

    /// A tensor as stored, on the CPU, in `dtype` (files) or as the file has it (GGUF).
    fn raw(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        match &self.weights {
            WeightSource::Files(files) => files.get(name, shape, dtype, device),
            WeightSource::Dummy(dummy) => dummy.get(name, shape, dtype, device),
            WeightSource::Gguf(file) => {
                let gguf = gguf_name(name).ok_or_else(|| EngineError::MissingTensor {
                    tensor: name.to_string(),
                    file: file.path().to_path_buf(),
                })?;
                match file.tensor(&gguf, shape)? {
                    GgufTensor::Float(t) => Ok(t.to_dtype(dtype)?.to_device(device)?),
                    GgufTensor::Quantized(q, _) => Err(EngineError::WeightFile {
                        file: file.path().to_path_buf(),
                        message: format!(
                            "tensor `{gguf}` is {q:?}; a vector must be F32, F16 or BF16"
                        ),
                    }),
                }
            }
        }
    }

    fn tensor(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        // Norms and biases: in the dtype of the activations they apply to.
        let t = self.raw(
            name,
            shape,
            activation_dtype(self.device, self.dtype),
            self.device,
        )?;
        self.plan.count_tensor(&t);
        self.progress();
        Ok(t)
    }

    /// A weight matrix, quantized as the plan says (or as a GGUF file stores it).
    fn matrix(&self, name: &str, rows: usize, k: usize) -> Result<Weight> {
        let weight = if let WeightSource::Gguf(file) = &self.weights
            && let Some(gguf) = gguf_name(name)
            && let GgufTensor::Quantized(dtype, bytes) = file.tensor(&gguf, &[rows, k])?
        {
            self.plan.stored(dtype, bytes, rows, k)?
        } else if self.plan.quantizes(k) {
            let t = self.raw(name, &[rows, k], DType::F32, &Device::Cpu)?;
            self.plan.matrix(name, t)?
        } else {
            let t = self.raw(name, &[rows, k], self.dtype, self.device)?;
            self.plan.matrix(name, t)?
        };
        self.progress();
        Ok(weight)
    }

    fn bias(&self, name: &str, width: usize) -> Result<Option<Tensor>> {
        if self.config.no_bias {
            return Ok(None);
        }
        self.tensor(name, &[width]).map(Some)
    }

    fn linear(&self, prefix: &str, out_dim: usize, in_dim: usize) -> Result<Linear> {
        let weight = self.matrix(&format!("{prefix}.weight"), out_dim, in_dim)?;
        let bias = self.bias(&format!("{prefix}.bias"), out_dim)?;
        Ok(Linear::with_weight(weight, bias))
    }

    fn norm(&self, prefix: &str) -> Result<Norm> {
        let d = self.config.d_model;
        let weight = self.tensor(&format!("{prefix}.weight"), &[d])?;
        let bias = match self.bias(&format!("{prefix}.bias"), d)? {
            Some(b) => b,
            None => Tensor::zeros(d, activation_dtype(self.device, self.dtype), self.device)?,
        };
        Ok(Norm {
            weight,
            bias,
            eps: self.config.layer_norm_epsilon as f32,
        })
    }
}

/// How to load: the run dtype is given separately; this says what else to do with the weights.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// Quantize the linear layers and the embedding to this format while reading them.
    pub quantization: Option<Quantization>,
}

impl Mpt {
    /// Loads the model from a checkpoint directory or the bundled demo model.
    pub fn load(source: &ModelSource, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_reporting(source, device, dtype, &|_| {})
    }

    /// [`Mpt::load`], calling `report` after each tensor read.
    pub fn load_reporting(
        source: &ModelSource,
        device: &Device,
        dtype: DType,
        report: &dyn Fn(LoadProgress),
    ) -> Result<Self> {
        Self::load_with(source, device, dtype, LoadOptions::default(), report)
    }

    /// [`Mpt::load_reporting`] with [`LoadOptions`] (in-situ quantization).
    pub fn load_with(
        source: &ModelSource,
        device: &Device,
        dtype: DType,
        options: LoadOptions,
        report: &dyn Fn(LoadProgress),
    ) -> Result<Self> {
        let plan = WeightPlan::new(options.quantization, device, dtype);
        match source {
            ModelSource::Dir(dir) => {
                let weights = WeightFiles::open(dir)?;
                let config = MptConfig::from_dir(dir)?;
                Self::build(
                    config,
                    WeightSource::Files(&weights),
                    plan,
                    report,
                    device,
                    dtype,
                )
            }
            ModelSource::Demo => {
                let weights = WeightFiles::embedded(demo::WEIGHTS, "<bundled demo model>")?;
                let config = MptConfig::from_json(demo::CONFIG_JSON)?;
                Self::build(
                    config,
                    WeightSource::Files(&weights),
                    plan,
                    report,
                    device,
                    dtype,
                )
            }
            ModelSource::Gguf(path) => {
                let file = GgufFile::open(path)?;
                Self::from_gguf(&file, device, dtype, options, report)
            }
        }
    }

    /// Builds the model from an opened GGUF file (refusing `--quantization` on quantized files).
    pub fn from_gguf(
        file: &GgufFile,
        device: &Device,
        dtype: DType,
        options: LoadOptions,
        report: &dyn Fn(LoadProgress),
    ) -> Result<Self> {
        let plan = WeightPlan::new(options.quantization, device, dtype);
        refuse_requantizing(plan.quantization(), file.path(), file.first_quantized())?;
        Self::build(
            file.config()?,
            WeightSource::Gguf(file),
            plan,
            report,
            device,
            dtype,
        )
    }

    /// Builds the model from opened weight files, checking every tensor's shape.
    pub fn from_weights(
        config: MptConfig,
        weights: &WeightFiles,
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        let plan = WeightPlan::new(None, device, dtype);
        Self::build(
            config,
            WeightSource::Files(weights),
            plan,
            &|_| {},
            device,
            dtype,
        )
    }

    /// A model of `config`'s shapes with random weights drawn from `seed` (`--load-format
    /// dummy`): for measuring speed and memory without the checkpoint. Generated on `device`
    /// (on the CPU, one tensor at a time, when quantizing).
    pub fn dummy(config: MptConfig, device: &Device, dtype: DType, seed: u64) -> Result<Self> {
        Self::dummy_with(config, device, dtype, seed, LoadOptions::default())
    }

    /// [`Mpt::dummy`] with [`LoadOptions`] (in-situ quantization of the random weights).
    pub fn dummy_with(
        config: MptConfig,
        device: &Device,
        dtype: DType,
        seed: u64,
        options: LoadOptions,
    ) -> Result<Self> {
        let source = WeightSource::Dummy(DummyWeights::new(seed));
        let plan = WeightPlan::new(options.quantization, device, dtype);
        Self::build(config, source, plan, &|_| {}, device, dtype)
    }

    fn build(
        config: MptConfig,
        weights: WeightSource<'_>,
        plan: WeightPlan,
        report: &dyn Fn(LoadProgress),
        device: &Device,
        dtype: DType,
    ) -> Result<Self> {
        config.validate()?;
        let (d, ffn) = (config.d_model, config.ffn_hidden_size());
        let separate_output = matches!(&weights, WeightSource::Gguf(f) if f.has("output.weight"));
        let reader = TensorReader {
            weights,
            config: &config,
            device,
            dtype,
            plan,
            report,
            loaded: Cell::new(0),
        };
        let wte = Linear::with_weight(
            reader.matrix("transformer.wte.weight", config.vocab_size, d)?,
            None,
        );
        let mut blocks = Vec::with_capacity(config.n_layers);
        for i in 0..config.n_layers {
            let p = format!("transformer.blocks.{i}");
            let norm_1 = reader.norm(&format!("{p}.norm_1"))?;
            let wqkv = reader.linear(&format!("{p}.attn.Wqkv"), 3 * d, d)?;
            let qk_ln = if config.attn_config.qk_ln {
                Some((
                    reader.norm(&format!("{p}.attn.q_ln"))?,
                    reader.norm(&format!("{p}.attn.k_ln"))?,
                ))
            } else {
                None
            };
            blocks.push(Block {
                norm_1,
                wqkv,
                qk_ln,
                out_proj: reader.linear(&format!("{p}.attn.out_proj"), d, d)?,
                norm_2: reader.norm(&format!("{p}.norm_2"))?,
                up_proj: reader.linear(&format!("{p}.ffn.up_proj"), ffn, d)?,
                down_proj: reader.linear(&format!("{p}.ffn.down_proj"), d, ffn)?,
            });
        }
        let norm_f = reader.norm("transformer.norm_f")?;
        let lm_head = match &reader.weights {
            WeightSource::Gguf(file) if separate_output => {
                let weight = match file.tensor("output.weight", &[config.vocab_size, d])? {
                    GgufTensor::Quantized(q, bytes) => {
                        reader.plan.stored(q, bytes, config.vocab_size, d)?
                    }
                    GgufTensor::Float(t) => reader.plan.matrix("output.weight", t)?,
                };
                Linear::with_weight(weight, None)
            }
            _ => wte.clone(),
        };
        reader.plan.log();
        Ok(Self {
            attention: Attention::new(
                alibi_slopes(config.n_heads, config.attn_config.alibi_bias_max),
                config.softmax_scale() as f32,
            ),
            logit_scale: config.logit_scale_value()?,
            config,
            lm_head,
            tied: !separate_output,
            routing: RowRouting::BatchInvariant,
            wte,
            blocks,
            norm_f,
            device: device.clone(),
            dtype,
        })
    }

    /// Bytes of weights per storage kind (`f32`, `bf16`, `q8_0`, `q4k`, ...).
    pub fn weight_bytes(&self) -> std::collections::BTreeMap<String, u64> {
        let mut out = std::collections::BTreeMap::new();
        let mut add = |w: &Weight| {
            *out.entry(w.kind()).or_insert(0) += w.bytes() as u64;
        };
        add(self.wte.weight());
        if !self.tied {
            add(self.lm_head.weight());
        }
        for b in &self.blocks {
            for l in [&b.wqkv, &b.out_proj, &b.up_proj, &b.down_proj] {
                add(l.weight());
            }
        }
        out
    }

    /// The checkpoint's configuration.
    pub fn config(&self) -> &MptConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The weights' dtype.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Selects our own CUDA attention kernels instead of the candle tensor-op path for tensor
    /// caches (see [`Attention::use_cuda_kernels`]). Off by default: not yet verified on a GPU.
    pub fn set_cuda_attention_kernels(&mut self, on: bool) -> Result<()> {
        let head_dim = self.config.head_dim();
        self.attention
            .use_cuda_kernels(on, &self.device, self.dtype, head_dim)
    }

    /// Whether every row's logits are bitwise independent of the other rows of the step (on by
    /// default): f32 linear layers on the CPU then use our tiled kernel for every row count;
    /// off, prefill chunks of more than 32 rows go to candle's GEMM instead. Attention,
    /// norms and the bf16 and Q8_0 kernels are batch-invariant either way.
    pub fn set_batch_invariant(&mut self, on: bool) {
        self.routing = if on {
            RowRouting::BatchInvariant
        } else {
            RowRouting::Fastest
        };
    }

    /// Runs one mixed batch. Writes the new tokens' K/V into `cache` through each sequence's
    /// block table and returns f32 logits of shape `(batch.num_logits_rows(), vocab_size)`, rows
    /// in batch order.
    pub fn forward(&self, batch: &ModelBatch, cache: &mut KvCache) -> Result<Tensor> {
        self.check_batch(batch, cache)?;
        let d = self.config.d_model;
        let mut ids = Vec::with_capacity(batch.num_tokens());
        let mut logit_rows = Vec::with_capacity(batch.num_logits_rows());
        for seq in &batch.seqs {
            ids.extend_from_slice(&seq.tokens);
            let rows = seq.logits.rows(seq.tokens.len());
            logit_rows.extend((ids.len() - rows..ids.len()).map(|r| r as u32));
        }
        let n = ids.len();
        // Index and bias tensors (or token slots on the CPU), made once for all layers.
        let plan = self.attention.plan(batch, cache, &self.device)?;
        let mut x = self.wte.weight().rows(
            &ids,
            activation_dtype(&self.device, self.dtype),
            &self.device,
        )?; // (n, d)
        for (layer, block) in self.blocks.iter().enumerate() {
            let h = block.norm_1.forward(&x)?;
            let mut qkv = block.wqkv.forward(&h, self.routing)?; // (n, 3d)
            if let Some(c) = self.config.attn_config.clip_qkv {
                qkv = qkv.clamp(-c, c)?;
            }
            let mut q = qkv.narrow(D::Minus1, 0, d)?;
            let mut k = qkv.narrow(D::Minus1, d, d)?;
            let v = qkv.narrow(D::Minus1, 2 * d, d)?;
            if let Some((q_ln, k_ln)) = &block.qk_ln {
                q = q_ln.forward(&q)?;
                k = k_ln.forward(&k)?;
            }
            let attn = self.attention.forward(layer, &q, &k, &v, &plan, cache)?; // (n, d)
            x = (x + block.out_proj.forward(&attn, self.routing)?)?;
            let h = block.norm_2.forward(&x)?;
            let ffn = block.down_proj.forward(
                &gelu_erf(&block.up_proj.forward(&h, self.routing)?)?,
                self.routing,
            )?;
            x = (x + ffn)?;
        }
        if logit_rows.is_empty() {
            return Ok(Tensor::zeros(
                (0, self.config.vocab_size),
                DType::F32,
                &self.device,
            )?);
        }
        let h = if logit_rows.len() == n {
            x
        } else {
            x.index_select(&Tensor::new(logit_rows, &self.device)?, 0)?
        };
        let h = self.norm_f.forward(&h)?;
        let mut logits = self
            .lm_head
            .forward(&h, self.routing)?
            .to_dtype(DType::F32)?;
        if let Some(scale) = self.logit_scale {
            logits = (logits * scale)?;
        }
        Ok(logits)
    }

    /// Rejects batches that would index outside the cache or the vocabulary. These are engine
    /// bugs, not user errors: the scheduler validates requests long before.
    fn check_batch(&self, batch: &ModelBatch, cache: &KvCache) -> Result<()> {
        let g = cache.geometry;
        let bug = |message: String| Err(EngineError::setting("batch", message));
        if g.n_heads != self.config.n_heads || g.head_dim != self.config.head_dim() {
            return bug(format!(
                "KV cache shaped for {} heads of {}, model has {} of {}",
                g.n_heads,
                g.head_dim,
                self.config.n_heads,
                self.config.head_dim()
            ));
        }
        if batch.seqs.is_empty() {
            return bug("empty batch".into());
        }
        for (i, seq) in batch.seqs.iter().enumerate() {
            if seq.tokens.is_empty() {
                return bug(format!("sequence {i} has no new tokens"));
            }
            if seq.block_table.len() * g.block_size < seq.context_len() {
                return bug(format!(
                    "sequence {i}: {} blocks of {} cannot hold {} tokens",
                    seq.block_table.len(),
                    g.block_size,
                    seq.context_len()
                ));
            }
            if let Some(&b) = seq
                .block_table
                .iter()
                .find(|&&b| b as usize >= g.num_blocks)
            {
                return bug(format!(
                    "sequence {i}: block {b} is outside the pool of {}",
                    g.num_blocks
                ));
            }
            if let Some(&t) = seq
                .tokens
                .iter()
                .find(|&&t| t as usize >= self.config.vocab_size)
            {
                return bug(format!(
                    "sequence {i}: token id {t} is outside the vocabulary"
                ));
            }
        }
        Ok(())
    }
}
