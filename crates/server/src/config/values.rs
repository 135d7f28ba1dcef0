//! Parsers of single setting values (sizes, dtypes, devices, ...), shared by the flags, the
//! environment and the TOML file, so each value means the same wherever it is written.

use std::path::Path;

use mpt_engine::{AttentionKernels, DTypeSpec, DeviceSpec, KvCacheDtype, LoadFormat};

/// Parses "2GiB", "512MiB", "1.5GB", "4096" (bytes) and the like.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let value: f64 = number.parse().map_err(|_| {
        format!("{text:?} is not a size (expected e.g. \"2GiB\", \"512MiB\" or a number of bytes)")
    })?;
    let multiplier: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "ki" | "kib" => 1024.0,
        "mi" | "mib" => 1024.0 * 1024.0,
        "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
        "ti" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        other => {
            return Err(format!(
                "unknown size unit {other:?} in {text:?} (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
            ));
        }
    };
    let bytes = value * multiplier;
    if !bytes.is_finite() || bytes < 1.0 || bytes > u64::MAX as f64 {
        return Err(format!("size {text:?} is out of range"));
    }
    Ok(bytes as u64)
}

/// `auto`, `f32`, `f16` or `bf16` (and their long names).
pub(super) fn parse_dtype(text: &str) -> Result<DTypeSpec, String> {
    match text.to_ascii_lowercase().as_str() {
        "auto" => Ok(DTypeSpec::Auto),
        "f32" | "float32" | "float" => Ok(DTypeSpec::F32),
        "f16" | "float16" | "half" => Ok(DTypeSpec::F16),
        "bf16" | "bfloat16" => Ok(DTypeSpec::Bf16),
        other => Err(format!(
            "unknown dtype {other:?} (expected auto, f32, f16 or bf16)"
        )),
    }
}

/// Whether `--model` names a GGUF file rather than a model directory.
pub(super) fn is_gguf(path: &Path) -> bool {
    path.extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// One of [`KvCacheDtype::NAMES`], any case.
pub(super) fn parse_kv_cache_dtype(text: &str) -> Result<KvCacheDtype, String> {
    KvCacheDtype::parse(&text.to_ascii_lowercase()).ok_or_else(|| {
        format!(
            "unknown KV cache dtype {text:?} (expected one of: {})",
            KvCacheDtype::NAMES.join(", ")
        )
    })
}

/// `cpu`, `cuda` or `cuda:N`.
pub(super) fn parse_device(text: &str) -> Result<DeviceSpec, String> {
    let t = text.to_ascii_lowercase();
    if t == "cpu" {
        return Ok(DeviceSpec::Cpu);
    }
    if t == "cuda" {
        return Ok(DeviceSpec::Cuda(0));
    }
    if let Some(ordinal) = t.strip_prefix("cuda:") {
        return ordinal
            .parse()
            .map(DeviceSpec::Cuda)
            .map_err(|_| format!("bad CUDA ordinal in {text:?} (expected cuda:N)"));
    }
    Err(format!("unknown device {text:?} (expected cpu or cuda:N)"))
}

/// `auto` or `dummy`.
pub(super) fn parse_load_format(text: &str) -> Result<LoadFormat, String> {
    match text.to_ascii_lowercase().as_str() {
        "auto" => Ok(LoadFormat::Auto),
        "dummy" => Ok(LoadFormat::Dummy),
        other => Err(format!(
            "unknown load format {other:?} (expected auto or dummy)"
        )),
    }
}

/// `candle-ops` or `custom`.
pub(super) fn parse_attention_kernels(text: &str) -> Result<AttentionKernels, String> {
    match text.to_ascii_lowercase().as_str() {
        "candle-ops" | "candle_ops" => Ok(AttentionKernels::CandleOps),
        "custom" => Ok(AttentionKernels::Custom),
        other => Err(format!(
            "unknown attention implementation {other:?} (expected candle-ops or custom)"
        )),
    }
}

/// A fraction in (0, 1].
pub(super) fn parse_fraction(value: f64) -> Result<f64, String> {
    if value > 0.0 && value <= 1.0 {
        Ok(value)
    } else {
        Err(format!(
            "{value} is not a fraction in (0, 1] (e.g. 0.9 lets the process use 90% of the GPU)"
        ))
    }
}
