//! The scalar conversions ggml's block formats share: f16 scales as little-endian bytes (rounded
//! to nearest, ties to even, as `GGML_FP32_TO_FP16`) and ggml's `nearest_int`.
//!
//! Invariant: these match ggml bit for bit; the quantizers in [`super::quant_formats`] and
//! [`super::k_quants`] depend on it for byte-identical output.

use half::f16;

/// Reads the little-endian f16 at `b[0..2]` as f32.
pub(crate) fn f16_at(b: &[u8]) -> f32 {
    f16::from_le_bytes([b[0], b[1]]).to_f32()
}

/// Writes `v` rounded to f16 (nearest, ties to even, as ggml's `GGML_FP32_TO_FP16`).
pub(crate) fn put_f16(out: &mut [u8], v: f32) {
    out[..2].copy_from_slice(&f16::from_f32(v).to_le_bytes());
}

/// ggml's `nearest_int`: round to nearest with ties to even, via the 1.5·2²³ trick, for
/// |v| ≤ 4194303.
pub(crate) fn nearest_int(v: f32) -> i32 {
    let bits = (v + 12_582_912.0f32).to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_int_rounds_ties_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(-0.5), 0);
        assert_eq!(nearest_int(-1.5), -2);
        assert_eq!(nearest_int(3.49), 3);
        assert_eq!(nearest_int(-7.6), -8);
    }
}
