//! Reads checkpoint weights from a Hugging Face model directory: `model.safetensors`, sharded
//! safetensors with `model.safetensors.index.json`, `pytorch_model.bin`, or sharded `.bin` with
//! `pytorch_model.bin.index.json` (how mosaicml/mpt-30b ships). Safetensors are memory-mapped;
//! every tensor is checked against the shape the config implies and converted to the run dtype.
//! Errors name the tensor and the file.
//!
//! [`DummyWeights`] stands in for a checkpoint when only `config.json` is at hand (vLLM's
//! `--load-format dummy`): same names and shapes, random values, generated on the target device.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::pickle::PthTensors;
use candle_core::safetensors::{MmapedSafetensors, SliceSafetensors};
use candle_core::{DType, Device, Tensor};

use crate::api::error::{EngineError, Result};

/// One weight file.
enum Shard {
    Mmap(MmapedSafetensors),
    Slice(SliceSafetensors<'static>),
    Pth(PthTensors),
}

/// All weight files of a checkpoint, with each tensor name routed to its file.
pub struct WeightFiles {
    shards: Vec<(PathBuf, Shard)>,
    routing: HashMap<String, usize>,
    /// What to name in "missing tensor" errors: the index file or the single weight file.
    origin: PathBuf,
}

impl WeightFiles {
    /// Finds and opens the weights in `dir`, preferring safetensors over `.bin`.
    pub fn open(dir: &Path) -> Result<Self> {
        let candidates = [
            ("model.safetensors.index.json", true),
            ("model.safetensors", false),
            ("pytorch_model.bin.index.json", true),
            ("pytorch_model.bin", false),
        ];
        for (name, is_index) in candidates {
            let path = dir.join(name);
            if !path.is_file() {
                continue;
            }
            let files = if is_index {
                shard_paths(dir, &path)?
            } else {
                vec![path.clone()]
            };
            let mut weights = Self {
                shards: Vec::new(),
                routing: HashMap::new(),
                origin: path,
            };
            for file in files {
                let shard = open_shard(&file)?;
                weights.add(file, shard);
            }
            return Ok(weights);
        }
        Err(EngineError::WeightFile {
            file: dir.to_path_buf(),
            message: "no weights found: expected model.safetensors, model.safetensors.index.json, \
                      pytorch_model.bin or pytorch_model.bin.index.json"
                .into(),
        })
    }

    /// Weights from safetensors bytes compiled into the binary (the demo model).
    pub fn embedded(bytes: &'static [u8], label: &str) -> Result<Self> {
        let origin = PathBuf::from(label);
        let shard = SliceSafetensors::new(bytes).map_err(|e| EngineError::WeightFile {
            file: origin.clone(),
            message: e.to_string(),
        })?;
        let mut weights = Self {
            shards: Vec::new(),
            routing: HashMap::new(),
            origin: origin.clone(),
        };
        weights.add(origin, Shard::Slice(shard));
        Ok(weights)
    }

    fn add(&mut self, path: PathBuf, shard: Shard) {
        let names: Vec<String> = match &shard {
            Shard::Mmap(st) => st.tensors().into_iter().map(|(n, _)| n).collect(),
            Shard::Slice(st) => st.tensors().into_iter().map(|(n, _)| n).collect(),
            Shard::Pth(pth) => pth.tensor_infos().keys().cloned().collect(),
        };
        let index = self.shards.len();
        for name in names {
            self.routing.insert(name, index);
        }
        self.shards.push((path, shard));
    }

    /// Whether the checkpoint has a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.routing.contains_key(name)
    }

    /// Number of tensors in the checkpoint.
    pub fn len(&self) -> usize {
        self.routing.len()
    }

    /// Whether the checkpoint has no tensors at all.
    pub fn is_empty(&self) -> bool {
        self.routing.is_empty()
    }

    /// Loads `name`, checks its shape, converts it to `dtype` on `device`.
    pub fn get(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let Some(&index) = self.routing.get(name) else {
            return Err(EngineError::MissingTensor {
                tensor: name.to_string(),
                file: self.origin.clone(),
            });
        };
        let (file, shard) = &self.shards[index];
        let read_error = |e: candle_core::Error| EngineError::WeightFile {
            file: file.clone(),
            message: format!("tensor `{name}`: {e}"),
        };
        let tensor =
            match shard {
                Shard::Mmap(st) => st.load(name, &Device::Cpu).map_err(read_error)?,
                Shard::Slice(st) => st.load(name, &Device::Cpu).map_err(read_error)?,
                Shard::Pth(pth) => pth.get(name).map_err(read_error)?.ok_or_else(|| {
                    EngineError::MissingTensor {
                        tensor: name.to_string(),
                        file: file.clone(),
                    }
                })?,
            };
        if tensor.dims() != shape {
            return Err(EngineError::TensorShape {
                tensor: name.to_string(),
                file: file.clone(),
                actual: tensor.dims().to_vec(),
                expected: shape.to_vec(),
            });
        }
        let converted = tensor
            .to_dtype(dtype)
            .and_then(|t| t.to_device(device))
            .map_err(read_error)?;
        Ok(converted)
    }
}

/// Random weights for `--load-format dummy`: matrices uniform with standard deviation 0.02 (the
/// usual initialiser), LayerNorm weights 1 and biases 0, so activations stay finite at any depth.
/// Each tensor's values depend only on the seed and its name. On the CPU they come from a seeded
/// host generator; on a GPU from the device's generator (seeded per tensor), so the two differ.
#[derive(Debug, Clone, Copy)]
pub struct DummyWeights {
    seed: u64,
}

impl DummyWeights {
    /// Standard deviation of the random matrices.
    pub const STD: f64 = 0.02;

    /// Dummy weights drawn from `seed`.
    pub fn new(seed: u64) -> Self {
        Self { seed }
    }

    /// A tensor named `name` (mosaicml naming) of `shape`, as `dtype` on `device`.
    pub fn get(
        &self,
        name: &str,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let fail = |e: candle_core::Error| EngineError::WeightFile {
            file: PathBuf::from("<dummy weights>"),
            message: format!("tensor `{name}`: {e}"),
        };
        let is_norm = name.contains("norm") || name.contains("_ln.");
        let tensor = if name.ends_with(".bias") {
            Tensor::zeros(shape, dtype, device)
        } else if is_norm {
            Tensor::ones(shape, dtype, device)
        } else {
            self.uniform(name, shape, device)
                .and_then(|t| t.to_dtype(dtype))
        };
        tensor.map_err(fail)
    }

    /// Uniform in ±√3·STD (standard deviation STD), f32.
    fn uniform(&self, name: &str, shape: &[usize], device: &Device) -> candle_core::Result<Tensor> {
        use rand::{Rng, SeedableRng};
        let bound = 3f64.sqrt() * Self::STD;
        // FNV-1a over the name, mixed with the seed: per-tensor streams, order-independent.
        let seed = name
            .bytes()
            .fold(0xcbf2_9ce4_8422_2325u64 ^ self.seed, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
            });
        if device.is_cpu() {
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
            let n: usize = shape.iter().product();
            let b = bound as f32;
            let values: Vec<f32> = (0..n).map(|_| rng.random_range(-b..b)).collect();
            Tensor::from_vec(values, shape, device)
        } else {
            device.set_seed(seed)?;
            Tensor::rand(-bound as f32, bound as f32, shape, device)
        }
    }
}

/// The distinct shard files an index's `weight_map` points at, in first-seen order.
fn shard_paths(dir: &Path, index: &Path) -> Result<Vec<PathBuf>> {
    let bad = |message: String| EngineError::WeightFile {
        file: index.to_path_buf(),
        message,
    };
    let text = std::fs::read_to_string(index).map_err(|e| bad(e.to_string()))?;
    let json: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(e.to_string()))?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| bad("no `weight_map` object".into()))?;
    let mut files: Vec<PathBuf> = Vec::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| {
            bad(format!(
                "weight_map entry for `{tensor}` is not a file name"
            ))
        })?;
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(bad(format!(
                "weight_map names a file outside the model directory: {file}"
            )));
        }
        let path = dir.join(file);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    Ok(files)
}

fn open_shard(path: &Path) -> Result<Shard> {
    let fail = |message: String| EngineError::WeightFile {
        file: path.to_path_buf(),
        message,
    };
    if !path.is_file() {
        return Err(fail("file does not exist".into()));
    }
    let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
    if is_safetensors {
        // SAFETY: the file is mapped read-only; like every inference server we assume nobody
        // truncates or rewrites checkpoint files while they are being served.
        #[allow(unsafe_code)]
        let st = unsafe { MmapedSafetensors::new(path) }.map_err(|e| fail(e.to_string()))?;
        Ok(Shard::Mmap(st))
    } else {
        let pth = PthTensors::new(path, None).map_err(|e| fail(e.to_string()))?;
        Ok(Shard::Pth(pth))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .expect("f32 tensor")
    }

    #[test]
    fn dummy_weights_have_the_shape_and_the_spread_asked_for() {
        let dummy = DummyWeights::new(7);
        let dev = Device::Cpu;
        let w = dummy
            .get(
                "transformer.blocks.0.attn.Wqkv.weight",
                &[96, 32],
                DType::F32,
                &dev,
            )
            .expect("dummy tensor");
        assert_eq!(w.dims(), &[96, 32]);
        let v = values(&w);
        let mean = v.iter().sum::<f32>() / v.len() as f32;
        let std = (v.iter().map(|x| (x - mean).powi(2)).sum::<f32>() / v.len() as f32).sqrt();
        assert!(
            mean.abs() < 2e-3 && (std - 0.02).abs() < 2e-3,
            "{mean} {std}"
        );
        // Deterministic per seed and name; different for another name or seed.
        let again = dummy
            .get(
                "transformer.blocks.0.attn.Wqkv.weight",
                &[96, 32],
                DType::F32,
                &dev,
            )
            .expect("dummy tensor");
        assert_eq!(values(&again), v);
        let other = dummy
            .get(
                "transformer.blocks.1.attn.Wqkv.weight",
                &[96, 32],
                DType::F32,
                &dev,
            )
            .expect("dummy tensor");
        assert_ne!(values(&other), v);
        let reseeded = DummyWeights::new(8)
            .get(
                "transformer.blocks.0.attn.Wqkv.weight",
                &[96, 32],
                DType::F32,
                &dev,
            )
            .expect("dummy tensor");
        assert_ne!(values(&reseeded), v);
    }

    #[test]
    fn dummy_norms_are_identity_and_biases_zero() {
        let dummy = DummyWeights::new(1);
        let dev = Device::Cpu;
        for name in [
            "transformer.norm_f.weight",
            "transformer.blocks.3.norm_2.weight",
            "transformer.blocks.0.attn.q_ln.weight",
        ] {
            let t = dummy.get(name, &[8], DType::BF16, &dev).expect("norm");
            assert_eq!(t.dtype(), DType::BF16);
            assert!(
                values(&t.to_dtype(DType::F32).expect("f32"))
                    .iter()
                    .all(|&x| x == 1.0)
            );
        }
        let b = dummy
            .get(
                "transformer.blocks.0.ffn.up_proj.bias",
                &[8],
                DType::F32,
                &dev,
            )
            .expect("bias");
        assert!(values(&b).iter().all(|&x| x == 0.0));
    }
}
