//! Reads checkpoint weights from a Hugging Face model directory: `model.safetensors`, sharded
//! safetensors with `model.safetensors.index.json`, `pytorch_model.bin`, or sharded `.bin` with
//! `pytorch_model.bin.index.json` (how mosaicml/mpt-30b ships). Safetensors are memory-mapped;
//! every tensor is checked against the shape the config implies and converted to the run dtype.
//! Errors name the tensor and the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::pickle::PthTensors;
use candle_core::safetensors::{MmapedSafetensors, SliceSafetensors};
use candle_core::{DType, Device, Tensor};

use crate::error::{EngineError, Result};

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
