//! What each weight matrix becomes at load ([`WeightPlan`]): quantized to the `--quantization`
//! format while it is read (one tensor at a time, so peak memory is the final size plus one
//! tensor in f32), kept at the run dtype when its inner dimension is not a whole number of
//! blocks, or taken as stored when a GGUF file already holds it quantized; a bf16 matrix on a
//! CPU with AMX is packed into tile order (`kernels::cpu::bf16_tiles`). Counts bytes per kind
//! for the start-up log.
//!
//! Invariant: a quantized matrix holds ggml's bytes for its format (Q8_0 on the CPU repacked
//! losslessly for our kernel), so what we serve is what llama.cpp would serve from the same file.

use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Storage, Tensor};
use rayon::prelude::*;

use super::linear::{Weight, contiguous};
use crate::api::config::Quantization;
use crate::api::error::{EngineError, Result};
use crate::kernels::cpu::amx::Amx;
use crate::kernels::cpu::bf16_tiles::Bf16Tiles;
use crate::kernels::cpu::q8_0::{Q8Matrix, quantize_matrix};
use crate::kernels::cpu::quant_formats::GgmlFormat;

/// The ggml format of a `--quantization` choice.
pub(crate) fn format_of(q: Quantization) -> GgmlFormat {
    match q {
        Quantization::Q8_0 => GgmlFormat::Q8_0,
        Quantization::Q4K => GgmlFormat::Q4K,
        Quantization::Q6K => GgmlFormat::Q6K,
        Quantization::Q4_0 => GgmlFormat::Q4_0,
    }
}

/// candle's name for a ggml format.
fn candle_dtype(f: GgmlFormat) -> GgmlDType {
    match f {
        GgmlFormat::Q8_0 => GgmlDType::Q8_0,
        GgmlFormat::Q4_0 => GgmlDType::Q4_0,
        GgmlFormat::Q4K => GgmlDType::Q4K,
        GgmlFormat::Q6K => GgmlDType::Q6K,
    }
}

/// Tensors and bytes of one storage kind.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct KindTally {
    /// Number of tensors.
    pub tensors: usize,
    /// Their bytes.
    pub bytes: u64,
}

/// Decides and performs each matrix's conversion, and keeps the tally.
pub(crate) struct WeightPlan {
    format: Option<GgmlFormat>,
    device: Device,
    dtype: DType,
    tally: RefCell<BTreeMap<String, KindTally>>,
    kept: RefCell<Vec<String>>,
    /// bf16 matrices packed for AMX tiles, for the log.
    packed_for_tiles: Cell<usize>,
}

impl WeightPlan {
    /// A plan quantizing to `quantization` (or not) on `device`, other tensors at `dtype`.
    pub(crate) fn new(quantization: Option<Quantization>, device: &Device, dtype: DType) -> Self {
        Self {
            format: quantization.map(format_of),
            device: device.clone(),
            dtype,
            tally: RefCell::default(),
            kept: RefCell::default(),
            packed_for_tiles: Cell::default(),
        }
    }

    /// Whether a matrix of inner dimension `k` is quantized (so it should be read as f32).
    pub(crate) fn quantizes(&self, k: usize) -> bool {
        self.format
            .is_some_and(|f| k > 0 && k.is_multiple_of(f.block_weights()))
    }

    /// Whether any quantization was asked for.
    pub(crate) fn quantization(&self) -> Option<GgmlFormat> {
        self.format
    }

    /// A matrix from a tensor read as stored: quantized from f32 when [`Self::quantizes`],
    /// else converted to the run dtype. `name` is for the log.
    pub(crate) fn matrix(&self, name: &str, t: Tensor) -> Result<Weight> {
        let (rows, k) = t.dims2()?;
        let Some(format) = self.format.filter(|_| self.quantizes(k)) else {
            if let Some(f) = self.format {
                self.kept.borrow_mut().push(format!(
                    "{name} ({rows} x {k}: {k} is not a multiple of {}'s {}-weight block)",
                    f.name(),
                    f.block_weights()
                ));
            }
            let dense = t.to_dtype(self.dtype)?.to_device(&self.device)?;
            return Ok(self.count(self.tiled(dense)?));
        };
        let values = t.to_dtype(DType::F32)?.to_device(&Device::Cpu)?;
        let values = values.flatten_all()?.to_vec1::<f32>()?;
        drop(t);
        let weight = if format == GgmlFormat::Q8_0 && self.device.is_cpu() {
            Weight::Q8(Arc::new(quantize_matrix(&values, rows, k)))
        } else {
            let row_bytes = format.bytes_for(k);
            let mut bytes = vec![0u8; rows * row_bytes];
            bytes
                .par_chunks_mut(row_bytes)
                .zip(values.par_chunks(k))
                .for_each(|(out, x)| format.quantize_row(x, out));
            drop(values);
            self.qtensor(candle_dtype(format), bytes.into(), rows, k)?
        };
        Ok(self.count(weight))
    }

    /// A bf16 matrix on the CPU packed for AMX tiles where the CPU has them and its shape is
    /// whole tiles; any other tensor as it is.
    fn tiled(&self, dense: Tensor) -> Result<Weight> {
        let (rows, k) = dense.dims2()?;
        let packable =
            dense.dtype() == DType::BF16 && dense.device().is_cpu() && Bf16Tiles::fits(rows, k);
        let Some(amx) = Amx::detect().filter(|_| packable) else {
            return Ok(Weight::Dense(dense));
        };
        // Packed straight from the tensor's storage: no second copy of the matrix.
        let dense = dense.contiguous()?;
        let (storage, layout) = dense.storage_and_layout();
        let Storage::Cpu(cpu) = &*storage else {
            unreachable!("a CPU tensor has CPU storage; this is a bug");
        };
        let values = contiguous::<half::bf16>(cpu, layout)?;
        let tiles = Bf16Tiles::pack(amx, values, rows, k).expect("fits was checked; this is a bug");
        self.packed_for_tiles.set(self.packed_for_tiles.get() + 1);
        Ok(Weight::Bf16Tiles(Arc::new(tiles)))
    }

    /// A matrix a GGUF file holds in a ggml format (`bytes` as in the file).
    pub(crate) fn stored(
        &self,
        dtype: GgmlDType,
        bytes: &[u8],
        rows: usize,
        k: usize,
    ) -> Result<Weight> {
        let weight = if dtype == GgmlDType::Q8_0 && self.device.is_cpu() {
            Weight::Q8(Arc::new(Q8Matrix::from_ggml(bytes, rows, k)))
        } else {
            self.qtensor(dtype, Cow::Borrowed(bytes), rows, k)?
        };
        Ok(self.count(weight))
    }

    fn qtensor(
        &self,
        dtype: GgmlDType,
        bytes: Cow<'_, [u8]>,
        rows: usize,
        k: usize,
    ) -> Result<Weight> {
        let storage = QStorage::from_data(bytes, &self.device, dtype)?;
        Ok(Weight::Ggml(Arc::new(QTensor::new(storage, (rows, k))?)))
    }

    /// Counts a tensor that is not a matrix (norms, biases).
    pub(crate) fn count_tensor(&self, t: &Tensor) {
        self.add(
            dtype_name(t.dtype()),
            (t.elem_count() * t.dtype().size_in_bytes()) as u64,
        );
    }

    fn count(&self, w: Weight) -> Weight {
        self.add(&w.kind(), w.bytes() as u64);
        w
    }

    fn add(&self, kind: &str, bytes: u64) {
        let mut tally = self.tally.borrow_mut();
        let entry = tally.entry(kind.to_string()).or_default();
        entry.tensors += 1;
        entry.bytes += bytes;
    }

    /// Bytes per storage kind so far.
    #[cfg(test)]
    pub(crate) fn tally(&self) -> BTreeMap<String, KindTally> {
        self.tally.borrow().clone()
    }

    /// Writes the start-up lines: bytes per kind, and each matrix left unquantized and why.
    pub(crate) fn log(&self) {
        let tally = self.tally.borrow();
        let total: u64 = tally.values().map(|t| t.bytes).sum();
        let kinds: Vec<String> = tally
            .iter()
            .map(|(kind, t)| format!("{kind}: {} tensors, {}", t.tensors, human_bytes(t.bytes)))
            .collect();
        tracing::info!(
            total = %human_bytes(total),
            quantization = self.format.map_or("none", |f| f.name()),
            "weights by kind: {}",
            kinds.join("; ")
        );
        if self.packed_for_tiles.get() > 0 {
            tracing::info!(
                "{} bf16 matrices packed for the CPU's AMX tiles",
                self.packed_for_tiles.get()
            );
        }
        for kept in self.kept.borrow().iter() {
            tracing::warn!("not quantized, kept at {}: {kept}", dtype_name(self.dtype));
        }
    }
}

/// Refuses `--quantization` on a file whose weights are already quantized.
pub(crate) fn refuse_requantizing(
    format: Option<GgmlFormat>,
    file: &std::path::Path,
    stored: Option<(String, GgmlDType)>,
) -> Result<()> {
    match (format, stored) {
        (Some(f), Some((tensor, dtype))) => Err(EngineError::setting(
            "quantization",
            format!(
                "{} already holds quantized weights (`{tensor}` is {dtype:?}); quantizing them \
                 again to {} would lose accuracy twice. Serve it without --quantization, or \
                 quantize the original f32/f16/bf16 checkpoint",
                file.display(),
                f.name()
            ),
        )),
        _ => Ok(()),
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "f32",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        _ => "other",
    }
}

/// `1234567` → "1.23 MB".
pub(crate) fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1e9 {
        format!("{:.2} GB", b / 1e9)
    } else if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else {
        format!("{:.1} KB", b / 1e3)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// tests/fixtures/models/quant256/ggml-expected.safetensors holds llama.cpp's bytes for every
    /// matrix of the fixture (gguf-py for Q8_0/Q4_0, `llama-quantize --pure` for Q4_K/Q6_K; see
    /// tests/fixtures/make_gguf.py): ours must be identical, byte for byte.
    #[test]
    fn quantized_bytes_are_identical_to_llama_cpps() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models/quant256");
        let weights = candle_core::safetensors::load(dir.join("model.safetensors"), &Device::Cpu)
            .expect("fixture weights");
        let expected =
            candle_core::safetensors::load(dir.join("ggml-expected.safetensors"), &Device::Cpu)
                .expect("expected bytes");
        let mut checked = std::collections::BTreeSet::new();
        for (key, want) in &expected {
            let (label, name) = key.split_once('/').expect("format/name");
            let format = format_of(Quantization::parse(label).expect("format label"));
            let w = weights[name].to_dtype(DType::F32).expect("f32");
            let (rows, k) = w.dims2().expect("matrix");
            let values = w
                .flatten_all()
                .and_then(|t| t.to_vec1::<f32>())
                .expect("values");
            let mut ours = vec![0u8; rows * format.bytes_for(k)];
            for (x, out) in values.chunks(k).zip(ours.chunks_mut(format.bytes_for(k))) {
                format.quantize_row(x, out);
            }
            let want = want.to_vec1::<u8>().expect("bytes");
            assert_eq!(ours.len(), want.len(), "{key}: size");
            if let Some(i) = ours.iter().zip(&want).position(|(a, b)| a != b) {
                let block = i / format.block_bytes();
                panic!("{key}: first difference at byte {i} (block {block} of {rows} x {k})");
            }
            checked.insert(label.to_string());
        }
        let all: Vec<&str> = Quantization::ALL.iter().map(|q| q.name()).collect();
        assert_eq!(checked.into_iter().collect::<Vec<_>>(), {
            let mut v: Vec<String> = all.iter().map(|s| s.to_string()).collect();
            v.sort();
            v
        });
    }

    #[test]
    fn bf16_matrices_of_whole_tiles_are_packed_for_amx_where_the_cpu_has_it() {
        let plan = WeightPlan::new(None, &Device::Cpu, DType::BF16);
        let dev = Device::Cpu;
        let whole = Tensor::randn(0f32, 1.0, (32, 64), &dev).expect("tensor");
        let partial = Tensor::randn(0f32, 1.0, (40, 64), &dev).expect("tensor");
        let values: Vec<f32> = whole
            .to_dtype(DType::BF16)
            .and_then(|t| t.to_dtype(DType::F32))
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("values");
        match plan.matrix("a", whole).expect("bf16") {
            Weight::Bf16Tiles(t) => {
                assert!(Amx::detect().is_some());
                let mut row = vec![0f32; 64];
                t.row_f32(31, &mut row);
                assert_eq!(row, values[31 * 64..]);
            }
            Weight::Dense(t) => {
                assert!(Amx::detect().is_none());
                assert_eq!(t.dtype(), DType::BF16);
            }
            other => panic!("a bf16 matrix became {other:?}"),
        }
        assert!(matches!(
            plan.matrix("b", partial).expect("dense"),
            Weight::Dense(_)
        ));
        assert_eq!(plan.tally()["bf16"].bytes, (32 + 40) * 64 * 2);
    }

    #[test]
    fn matrices_with_a_partial_block_stay_at_the_run_dtype() {
        let plan = WeightPlan::new(Some(Quantization::Q8_0), &Device::Cpu, DType::F32);
        let dev = Device::Cpu;
        let whole = Tensor::randn(0f32, 1.0, (8, 64), &dev).expect("tensor");
        let partial = Tensor::randn(0f32, 1.0, (8, 48), &dev).expect("tensor");
        assert!(matches!(
            plan.matrix("a", whole).expect("q8"),
            Weight::Q8(_)
        ));
        assert!(matches!(
            plan.matrix("b", partial).expect("dense"),
            Weight::Dense(_)
        ));
        let tally = plan.tally();
        assert_eq!(
            tally["q8_0"],
            KindTally {
                tensors: 1,
                bytes: 8 * 64 / 32 * 34
            }
        );
        assert_eq!(
            tally["f32"],
            KindTally {
                tensors: 1,
                bytes: 8 * 48 * 4
            }
        );
        assert_eq!(plan.kept.borrow().len(), 1);
        assert!(plan.kept.borrow()[0].contains("48 is not a multiple of q8_0's 32-weight block"));
    }

    #[test]
    fn k_quants_need_whole_super_blocks() {
        let plan = WeightPlan::new(Some(Quantization::Q4K), &Device::Cpu, DType::F32);
        assert!(plan.quantizes(512));
        assert!(!plan.quantizes(96));
        let w = Tensor::randn(0f32, 1.0, (4, 256), &Device::Cpu).expect("tensor");
        match plan.matrix("w", w).expect("q4_k") {
            Weight::Ggml(q) => assert_eq!(q.storage_size_in_bytes(), 4 * 144),
            other => panic!("expected a ggml tensor, got {other:?}"),
        }
    }

    #[test]
    fn requantizing_a_quantized_file_is_refused_with_the_reason() {
        let file = std::path::Path::new("m.gguf");
        let err = refuse_requantizing(
            Some(GgmlFormat::Q4K),
            file,
            Some(("blk.0.attn_qkv.weight".into(), GgmlDType::Q8_0)),
        )
        .expect_err("refused");
        let text = err.to_string();
        assert!(
            text.contains("already holds quantized weights") && text.contains("Q8_0"),
            "{text}"
        );
        assert!(refuse_requantizing(None, file, Some(("x".into(), GgmlDType::Q8_0))).is_ok());
        assert!(refuse_requantizing(Some(GgmlFormat::Q8_0), file, None).is_ok());
    }
}
