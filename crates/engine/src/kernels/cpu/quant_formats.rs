//! ggml's block formats (Q8_0, Q4_0, Q4_K, Q6_K): their byte layouts, quantization with ggml's
//! reference rounding (`quantize_row_*_ref` in ggml-quants.c, what `llama-quantize` and
//! `convert_hf_to_gguf.py` produce without an importance matrix) and dequantization.
//!
//! Invariants: a quantized row is a whole number of blocks, so the row length is a multiple of
//! [`GgmlFormat::block_weights`]; the bytes are exactly ggml's (little-endian f16 scales), so a
//! tensor quantized here is byte-identical to llama.cpp's conversion of the same f32 values.
//! Float operations follow the reference's order (no fused multiply-adds), because a different
//! rounding of one intermediate can change a chosen scale.

#[cfg(test)]
use super::ggml_scalars::f16_at;
use super::ggml_scalars::put_f16;
use super::k_quants;

/// A ggml block format for weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum GgmlFormat {
    /// 32 weights: f16 scale, 32 × i8. 8.5 bits per weight.
    Q8_0,
    /// 32 weights: f16 scale, 16 bytes of 4-bit values offset by 8. 4.5 bits per weight.
    Q4_0,
    /// 256 weights: f16 d and dmin, 12 bytes of 6-bit scales and mins, 128 bytes of 4-bit values.
    /// 4.5 bits per weight.
    Q4K,
    /// 256 weights: 128 bytes low 4 bits, 64 bytes high 2 bits, 16 i8 scales, f16 d.
    /// 6.5625 bits per weight.
    Q6K,
}

impl GgmlFormat {
    /// Every format.
    #[cfg(test)]
    pub const ALL: [GgmlFormat; 4] = [Self::Q8_0, Self::Q4K, Self::Q6K, Self::Q4_0];

    /// The lower-case name used on the command line and in logs (`q8_0`, `q4_k`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Self::Q8_0 => "q8_0",
            Self::Q4_0 => "q4_0",
            Self::Q4K => "q4_k",
            Self::Q6K => "q6_k",
        }
    }

    /// Weights per block: a quantized row's length must be a multiple of it.
    pub fn block_weights(self) -> usize {
        match self {
            Self::Q8_0 | Self::Q4_0 => 32,
            Self::Q4K | Self::Q6K => 256,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> usize {
        match self {
            Self::Q8_0 => 34,
            Self::Q4_0 => 18,
            Self::Q4K => 144,
            Self::Q6K => 210,
        }
    }

    /// Bytes of `weights` values (a whole number of blocks).
    pub fn bytes_for(self, weights: usize) -> usize {
        weights / self.block_weights() * self.block_bytes()
    }

    /// Quantizes `x` (a whole number of blocks) into `out` (`bytes_for(x.len())` bytes).
    pub fn quantize_row(self, x: &[f32], out: &mut [u8]) {
        assert!(
            x.len().is_multiple_of(self.block_weights()) && out.len() == self.bytes_for(x.len()),
            "quantize_row: {} values into {} bytes of {}",
            x.len(),
            out.len(),
            self.name()
        );
        let (bw, bb) = (self.block_weights(), self.block_bytes());
        for (x, out) in x.chunks_exact(bw).zip(out.chunks_exact_mut(bb)) {
            match self {
                Self::Q8_0 => quantize_block_q8_0(x, out),
                Self::Q4_0 => quantize_block_q4_0(x, out),
                Self::Q4K => k_quants::quantize_block_q4_k(x, out),
                Self::Q6K => k_quants::quantize_block_q6_k(x, out),
            }
        }
    }

    /// Dequantizes `bytes` (whole blocks) into `out` (`block_weights` values per block); the
    /// kernels never need it (they read the blocks directly), tests check the formats with it.
    #[cfg(test)]
    pub fn dequantize_row(self, bytes: &[u8], out: &mut [f32]) {
        let (bw, bb) = (self.block_weights(), self.block_bytes());
        assert!(
            bytes.len().is_multiple_of(bb) && out.len() == bytes.len() / bb * bw,
            "dequantize_row: {} bytes of {} into {} values",
            bytes.len(),
            self.name(),
            out.len()
        );
        for (b, out) in bytes.chunks_exact(bb).zip(out.chunks_exact_mut(bw)) {
            match self {
                Self::Q8_0 => dequantize_block_q8_0(b, out),
                Self::Q4_0 => dequantize_block_q4_0(b, out),
                Self::Q4K => k_quants::dequantize_block_q4_k(b, out),
                Self::Q6K => k_quants::dequantize_block_q6_k(b, out),
            }
        }
    }
}

/// One Q8_0 block: d = max|x| / 127, q = round(x / d) (half away from zero, as `roundf`).
fn quantize_block_q8_0(x: &[f32], out: &mut [u8]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, d);
    for (q, &v) in out[2..].iter_mut().zip(x) {
        *q = (v * id).round() as i8 as u8;
    }
}

#[cfg(test)]
fn dequantize_block_q8_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b);
    for (o, &q) in out.iter_mut().zip(&b[2..34]) {
        *o = q as i8 as f32 * d;
    }
}

/// One Q4_0 block: d = (the value of largest magnitude) / −8, q = trunc(x / d + 8.5) capped at
/// 15; value j in the low nibble of byte j, value j + 16 in its high nibble.
fn quantize_block_q4_0(x: &[f32], out: &mut [u8]) {
    let (mut amax, mut max) = (0f32, 0f32);
    for &v in x {
        if amax < v.abs() {
            amax = v.abs();
            max = v;
        }
    }
    let d = max / -8.0;
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    put_f16(out, d);
    let level = |v: f32| ((v * id + 8.5) as i8).min(15) as u8;
    for j in 0..16 {
        out[2 + j] = level(x[j]) | (level(x[16 + j]) << 4);
    }
}

#[cfg(test)]
fn dequantize_block_q4_0(b: &[u8], out: &mut [f32]) {
    let d = f16_at(b);
    for j in 0..16 {
        let q = b[2 + j];
        out[j] = ((q & 0x0f) as i32 - 8) as f32 * d;
        out[j + 16] = ((q >> 4) as i32 - 8) as f32 * d;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pseudo(n: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
        (0..n)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                let u = (s % 20_001) as f32 / 10_000.0 - 1.0;
                // A few outliers, as real weight rows have.
                if i % 97 == 3 { u * 6.0 } else { u * 0.05 }
            })
            .collect()
    }

    #[test]
    fn round_trip_error_is_within_each_formats_step() {
        // Worst-case error bounds relative to the block's largest magnitude.
        for (format, bound) in [
            (GgmlFormat::Q8_0, 0.5 / 127.0 + 1e-3),
            // The side opposite the largest value clips at 7/8 of it.
            (GgmlFormat::Q4_0, 1.0 / 8.0 + 1e-3),
            (GgmlFormat::Q4K, 2.0 / 15.0),
            (GgmlFormat::Q6K, 1.0 / 31.0 + 1e-2),
        ] {
            let x = pseudo(1024, 11);
            let mut q = vec![0u8; format.bytes_for(x.len())];
            format.quantize_row(&x, &mut q);
            let mut y = vec![0f32; x.len()];
            format.dequantize_row(&q, &mut y);
            for (xb, yb) in x
                .chunks(format.block_weights())
                .zip(y.chunks(format.block_weights()))
            {
                let amax = xb.iter().fold(0f32, |m, v| m.max(v.abs()));
                let worst = xb
                    .iter()
                    .zip(yb)
                    .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    worst <= bound * amax,
                    "{format:?}: error {worst} for block max {amax}"
                );
            }
        }
    }

    #[test]
    fn zero_blocks_quantize_to_zero_and_back() {
        for format in GgmlFormat::ALL {
            let x = vec![0f32; 256];
            let mut q = vec![0xffu8; format.bytes_for(256)];
            format.quantize_row(&x, &mut q);
            let mut y = vec![1f32; 256];
            format.dequantize_row(&q, &mut y);
            assert!(y.iter().all(|&v| v == 0.0), "{format:?}");
        }
    }

    #[test]
    fn q8_0_block_layout_is_ggmls() {
        let mut x = [0f32; 32];
        // Binary fractions, so every product below is exact.
        x[0] = 127.0 / 64.0;
        x[1] = -63.5 / 64.0;
        x[31] = 0.5 / 64.0;
        let mut q = [0u8; 34];
        GgmlFormat::Q8_0.quantize_row(&x, &mut q);
        assert_eq!(f16_at(&q), 1.0 / 64.0);
        // -63.5 and 0.5 round away from zero (`roundf`), not to even.
        assert_eq!(&q[2..4], &[127, (-64i8) as u8]);
        assert_eq!(q[33], 1);
    }
}
