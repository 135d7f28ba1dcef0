//! MPT GGUF files as llama.cpp's `convert_hf_to_gguf.py` writes them: hyper-parameters from the
//! `mpt.*` metadata, tensors under llama.cpp's names (`token_embd`, `blk.N.attn_qkv`, ...) in
//! F32, F16, BF16 or a ggml block format, the tokenizer under `tokenizer.ggml.*`
//! (see [`super::gguf_tokenizer`]). The header is read with candle's GGUF reader; the tensor
//! data is memory-mapped and each tensor is sliced from the map when the model asks for it.
//!
//! Invariant: every tensor's byte range was checked against the file's length when it was
//! opened, so a truncated file fails at start-up naming the first tensor it cuts, and a tensor
//! read later never indexes outside the map.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::quantized::GgmlDType;
use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::{DType, Device, Tensor};

use super::config::{AttnConfig, MptConfig};
use crate::api::error::{EngineError, Result};

/// A tensor as the GGUF file stores it.
pub(crate) enum GgufTensor<'a> {
    /// F32, F16 or BF16, as a CPU tensor of that dtype.
    Float(Tensor),
    /// A ggml block format: its type and the bytes as in the file.
    Quantized(GgmlDType, &'a [u8]),
}

/// An opened MPT GGUF file.
pub struct GgufFile {
    path: PathBuf,
    metadata: HashMap<String, Value>,
    /// llama.cpp name → (type, shape as PyTorch orders it, byte range in the file).
    tensors: HashMap<String, (GgmlDType, Vec<usize>, std::ops::Range<usize>)>,
    map: memmap2::Mmap,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "GgufFile({}, {} tensors)",
            self.path.display(),
            self.tensors.len()
        )
    }
}

/// llama.cpp's GGUF name for a mosaicml tensor name, if it has one.
pub(crate) fn gguf_name(name: &str) -> Option<String> {
    let simple = [
        ("transformer.wte.weight", "token_embd.weight"),
        ("transformer.norm_f.weight", "output_norm.weight"),
        ("transformer.norm_f.bias", "output_norm.bias"),
    ];
    if let Some((_, g)) = simple.iter().find(|(m, _)| *m == name) {
        return Some((*g).to_string());
    }
    let rest = name.strip_prefix("transformer.blocks.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = tail.rsplit_once('.')?;
    let mapped = match module {
        "norm_1" => "attn_norm",
        "attn.Wqkv" => "attn_qkv",
        "attn.out_proj" => "attn_output",
        "attn.q_ln" => "attn_q_norm",
        "attn.k_ln" => "attn_k_norm",
        "norm_2" => "ffn_norm",
        "ffn.up_proj" => "ffn_up",
        "ffn.down_proj" => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{mapped}.{kind}"))
}

impl GgufFile {
    /// Opens `path`, reads its header and checks that it is an MPT model whose tensors all fit
    /// inside the file.
    pub fn open(path: &Path) -> Result<Self> {
        let fail = |message: String| EngineError::WeightFile {
            file: path.to_path_buf(),
            message,
        };
        let mut file = std::fs::File::open(path).map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let content = Content::read(&mut file).map_err(|e| {
            let text = e.to_string();
            if let Some(id) = text.strip_prefix("unknown dtype for tensor ") {
                fail(format!(
                    "a tensor has ggml type id {id}, which this server cannot read (it reads \
                     F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0 and Q2_K to Q6_K)"
                ))
            } else {
                fail(format!("not a readable GGUF file: {text}"))
            }
        })?;
        // SAFETY: the file is mapped read-only; as with safetensors we assume nobody truncates or
        // rewrites it while it is served.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| fail(e.to_string()))?;
        let arch = match content.metadata.get("general.architecture") {
            Some(Value::String(a)) => a.clone(),
            _ => return Err(fail("no `general.architecture` in the metadata".into())),
        };
        if arch != "mpt" {
            return Err(fail(format!(
                "this GGUF holds a `{arch}` model; mpt-serve serves only the MPT architecture \
                 (general.architecture = \"mpt\")"
            )));
        }
        let data_start = content.tensor_data_offset as usize;
        let mut tensors = HashMap::new();
        for (name, info) in &content.tensor_infos {
            let elems = info.shape.elem_count();
            let block = info.ggml_dtype.block_size();
            if !elems.is_multiple_of(block) {
                return Err(fail(format!(
                    "tensor `{name}` has {elems} values, not a whole number of {:?} blocks",
                    info.ggml_dtype
                )));
            }
            let size = elems / block * info.ggml_dtype.type_size();
            let start = data_start.saturating_add(info.offset as usize);
            let end = start.saturating_add(size);
            if end > map.len() {
                return Err(fail(format!(
                    "tensor `{name}` needs bytes {start}..{end} but the file has {} bytes: \
                     truncated or corrupt",
                    map.len()
                )));
            }
            tensors.insert(
                name.clone(),
                (info.ggml_dtype, info.shape.dims().to_vec(), start..end),
            );
        }
        Ok(Self {
            path: path.to_path_buf(),
            metadata: content.metadata,
            tensors,
            map,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the file holds no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The first tensor (by name) stored in a ggml block format, if any.
    pub(crate) fn first_quantized(&self) -> Option<(String, GgmlDType)> {
        let mut names: Vec<&String> = self.tensors.keys().collect();
        names.sort();
        names.into_iter().find_map(|n| {
            let dtype = self.tensors[n].0;
            is_block_format(dtype).then(|| (n.clone(), dtype))
        })
    }

    /// Whether the file has a tensor of llama.cpp's name `name`.
    pub(crate) fn has(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    fn shape_of(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|(_, s, _)| s.as_slice())
    }

    /// The tokenizer rebuilt from the file's `tokenizer.ggml.*` metadata.
    pub fn tokenizer(&self) -> Result<crate::tokenizer::Tokenizer> {
        super::gguf_tokenizer::tokenizer_from_gguf(&self.metadata)
    }

    /// `chat_template` from the metadata, if the converter stored one.
    pub fn chat_template(&self) -> Option<String> {
        match self.metadata.get("tokenizer.chat_template") {
            Some(Value::String(s)) => Some(s.clone()),
            _ => None,
        }
    }

    /// The model's hyper-parameters from the `mpt.*` metadata and the tensor shapes.
    pub fn config(&self) -> Result<MptConfig> {
        let bad =
            |field: &str, message: String| EngineError::config(format!("gguf {field}"), message);
        let int = |key: &str| -> Result<usize> {
            let v = self
                .metadata
                .get(key)
                .ok_or_else(|| bad(key, "missing from the file's metadata".into()))?;
            v.to_u64()
                .or_else(|_| v.to_u32().map(u64::from))
                .map(|v| v as usize)
                .map_err(|e| bad(key, e.to_string()))
        };
        let float = |key: &str| -> Result<Option<f64>> {
            match self.metadata.get(key) {
                None => Ok(None),
                Some(v) => v
                    .to_f32()
                    .map(|f| Some(f64::from(f)))
                    .or_else(|_| v.to_f64().map(Some))
                    .map_err(|e| bad(key, e.to_string())),
            }
        };
        let d_model = int("mpt.embedding_length")?;
        let n_heads = int("mpt.attention.head_count")?;
        if let Ok(kv) = int("mpt.attention.head_count_kv")
            && kv != n_heads
        {
            return Err(bad(
                "mpt.attention.head_count_kv",
                format!(
                    "{kv} key/value heads for {n_heads} query heads: grouped-query attention is not supported"
                ),
            ));
        }
        let alibi_bias_max = float("mpt.attention.max_alibi_bias")?.unwrap_or(8.0);
        let vocab_size = match self.shape_of("token_embd.weight") {
            Some([rows, cols]) if *cols == d_model => *rows,
            other => {
                return Err(bad(
                    "token_embd.weight",
                    format!("expected a (vocab, {d_model}) embedding, found {other:?}"),
                ));
            }
        };
        let ffn = match self.shape_of("blk.0.ffn_up.weight") {
            Some([rows, _]) => *rows,
            _ => return Err(bad("blk.0.ffn_up.weight", "missing".into())),
        };
        if self.tensors.keys().any(|n| n.contains(".ffn_act.")) {
            return Err(bad(
                "ffn_act",
                "the file has FFN activation scales (ffn_act), which this server does not implement".into(),
            ));
        }
        Ok(MptConfig {
            d_model,
            n_heads,
            n_layers: int("mpt.block_count")?,
            expansion_ratio: ffn as f64 / d_model.max(1) as f64,
            max_seq_len: int("mpt.context_length")?,
            vocab_size,
            no_bias: !self.has("blk.0.attn_qkv.bias"),
            layer_norm_epsilon: float("mpt.attention.layer_norm_epsilon")?.unwrap_or(1e-5),
            learned_pos_emb: false,
            attn_config: AttnConfig {
                alibi: alibi_bias_max > 0.0,
                alibi_bias_max,
                clip_qkv: float("mpt.attention.clamp_kqv")?,
                qk_ln: self.has("blk.0.attn_q_norm.weight"),
                ..AttnConfig::default()
            },
            ..MptConfig::default()
        })
    }

    /// The tensor llama.cpp names `gguf`, checked against `shape`.
    pub(crate) fn tensor(&self, gguf: &str, shape: &[usize]) -> Result<GgufTensor<'_>> {
        let Some((dtype, dims, range)) = self.tensors.get(gguf) else {
            return Err(EngineError::MissingTensor {
                tensor: gguf.to_string(),
                file: self.path.clone(),
            });
        };
        if dims != shape {
            return Err(EngineError::TensorShape {
                tensor: gguf.to_string(),
                file: self.path.clone(),
                actual: dims.clone(),
                expected: shape.to_vec(),
            });
        }
        let bytes = &self.map[range.clone()];
        let float = match dtype {
            GgmlDType::F32 => DType::F32,
            GgmlDType::F16 => DType::F16,
            GgmlDType::BF16 => DType::BF16,
            other => return Ok(GgufTensor::Quantized(*other, bytes)),
        };
        let t = Tensor::from_raw_buffer(bytes, float, shape, &Device::Cpu).map_err(|e| {
            EngineError::WeightFile {
                file: self.path.clone(),
                message: format!("tensor `{gguf}`: {e}"),
            }
        })?;
        Ok(GgufTensor::Float(t))
    }
}

/// Whether `d` is a ggml block format (not a plain float).
fn is_block_format(d: GgmlDType) -> bool {
    !matches!(d, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mosaicml_names_map_to_llama_cpps() {
        for (m, g) in [
            ("transformer.wte.weight", "token_embd.weight"),
            ("transformer.norm_f.bias", "output_norm.bias"),
            (
                "transformer.blocks.0.norm_1.weight",
                "blk.0.attn_norm.weight",
            ),
            (
                "transformer.blocks.11.attn.Wqkv.weight",
                "blk.11.attn_qkv.weight",
            ),
            (
                "transformer.blocks.2.attn.out_proj.bias",
                "blk.2.attn_output.bias",
            ),
            (
                "transformer.blocks.3.attn.q_ln.weight",
                "blk.3.attn_q_norm.weight",
            ),
            (
                "transformer.blocks.3.attn.k_ln.weight",
                "blk.3.attn_k_norm.weight",
            ),
            (
                "transformer.blocks.1.norm_2.weight",
                "blk.1.ffn_norm.weight",
            ),
            (
                "transformer.blocks.1.ffn.up_proj.weight",
                "blk.1.ffn_up.weight",
            ),
            (
                "transformer.blocks.1.ffn.down_proj.weight",
                "blk.1.ffn_down.weight",
            ),
        ] {
            assert_eq!(gguf_name(m).as_deref(), Some(g), "{m}");
        }
        assert_eq!(gguf_name("transformer.blocks.x.norm_1.weight"), None);
        assert_eq!(gguf_name("lm_head.weight"), None);
    }
}
