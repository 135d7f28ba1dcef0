//! Tests of the Q8_0 kernel against exact sums and ggml's layout.

use super::super::quant_formats::GgmlFormat;
use super::*;

fn pseudo(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

/// The exact result the kernel must reproduce: both operands dequantized, summed in f64.
fn reference(w: &[u8], n: usize, k: usize, x: &[f32], m: usize) -> Vec<f32> {
    let mut wd = vec![0f32; n * k];
    GgmlFormat::Q8_0.dequantize_row(w, &mut wd);
    let mut xq = vec![0u8; m * k / QK * 34];
    GgmlFormat::Q8_0.quantize_row(x, &mut xq);
    let mut xd = vec![0f32; m * k];
    GgmlFormat::Q8_0.dequantize_row(&xq, &mut xd);
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        for j in 0..n {
            out[i * n + j] = (0..k)
                .map(|l| xd[i * k + l] as f64 * wd[j * k + l] as f64)
                .sum::<f64>() as f32;
        }
    }
    out
}

#[test]
fn every_path_matches_the_dequantized_product() {
    // k with and without whole super-blocks; m around the tile widths; n around the task
    // and tile row counts.
    for (m, k, n) in [
        (1, 256, 8),
        (1, 512, 37),
        (2, 288, 5),
        (4, 768, 20),
        (5, 96, 9),
        (7, 544, 33),
        (1, 32, 3),
        (0, 256, 8),
    ] {
        let wf = pseudo(n * k, 1 + k as u64);
        let mut w = vec![0u8; n * k / QK * 34];
        GgmlFormat::Q8_0.quantize_row(&wf, &mut w);
        let x = pseudo(m * k, 7 + m as u64);
        // Activation scales are f32 here but f16 in ggml's Q8_0 blocks: compare with a
        // tolerance of a few f16 steps of the result.
        let want = reference(&w, n, k, &x, m);
        let matrix = Q8Matrix::from_ggml(&w, n, k);
        for dot in Int8Dot::all_supported() {
            let got = matrix.matmul(dot, &x, m);
            for (idx, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 2e-3 * (1.0 + b.abs()),
                    "{dot:?} m={m} k={k} n={n} at {idx}: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn paths_agree_exactly_on_integer_sums() {
    let (m, k, n) = (3, 512, 11);
    let wf = pseudo(n * k, 3);
    let matrix = quantize_matrix(&wf, n, k);
    let x = pseudo(m * k, 4);
    let all: Vec<Vec<f32>> = Int8Dot::all_supported()
        .into_iter()
        .map(|d| matrix.matmul(d, &x, m))
        .collect();
    for other in &all[1..] {
        for (a, b) in all[0].iter().zip(other) {
            assert!((a - b).abs() <= 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }
}

#[test]
fn repacking_keeps_every_value_and_scale() {
    for k in [256, 288, 64] {
        let n = 3;
        let wf = pseudo(n * k, k as u64);
        let mut w = vec![0u8; n * k / QK * 34];
        GgmlFormat::Q8_0.quantize_row(&wf, &mut w);
        let matrix = Q8Matrix::from_ggml(&w, n, k);
        assert_eq!(matrix.bytes(), w.len());
        let mut want = vec![0f32; n * k];
        GgmlFormat::Q8_0.dequantize_row(&w, &mut want);
        for r in 0..n {
            let mut got = vec![0f32; k];
            matrix.dequantize_row(r, &mut got);
            assert_eq!(got, want[r * k..(r + 1) * k], "k={k} row {r}");
            assert_eq!(
                matrix.scales[r * k / QK].to_f32(),
                ggml_scale(&w[r * k / QK * 34..], 0)
            );
        }
    }
}

#[test]
fn rounding_matches_f32_round_at_halves_and_near_them() {
    let mut values = vec![
        0.49999997f32,
        -0.49999997,
        0.5,
        -0.5,
        1.5,
        -2.5,
        126.5,
        -127.5,
    ];
    values.extend([
        8388607.5f32,
        8388608.0,
        1e9,
        -1e9,
        0.0,
        -0.0,
        f32::MIN_POSITIVE,
    ]);
    for i in -2000..=2000 {
        let x = i as f32 / 8.0;
        values.extend([
            x,
            f32::from_bits(x.to_bits() + 1),
            f32::from_bits(x.to_bits() - 1),
        ]);
    }
    for x in values {
        assert_eq!(round_half_away(x).to_bits(), x.round().to_bits(), "{x}");
    }
}

#[test]
fn activation_rows_are_laid_out_like_the_weights() {
    // A row quantized as activations and as weights holds the same values in the same places
    // (weights carry +128) and the same scales.
    let k = 512 + 64;
    let x = pseudo(k, 11);
    let act = QuantizedActs::new(&x, 1, k);
    let w = quantize_matrix(&x, 1, k);
    let full = k / SUPER * SUPER;
    for i in 0..k {
        let stored = if i < full {
            w.qs[i] as i32 - 128
        } else {
            w.qs[i] as i8 as i32
        };
        assert_eq!(act.qs[i] as i32, stored, "value {i}");
    }
    for b in 0..k / QK {
        let lane_scale = if b < full / QK {
            act.scales[16 * (b / 8) + b % 8]
        } else {
            act.scales[16 * (full / SUPER) + b - full / QK]
        };
        assert_eq!(f16::from_f32(lane_scale), w.scales[b], "scale {b}");
    }
}

#[test]
fn extreme_values_sum_exactly_on_every_path() {
    // ggml's quantizer writes values in -127..=127, but a file may hold -128; with activations
    // at ±127 every pair of products is at its largest, where a 16-bit pair sum would
    // saturate if the AVX2 path got its operands wrong.
    let (n, k) = (9, 512);
    let mut w = vec![0u8; n * k / QK * 34];
    for (b, block) in w.chunks_exact_mut(34).enumerate() {
        block[..2].copy_from_slice(&f16::from_f32(0.5 + b as f32 / 64.0).to_le_bytes());
        for (e, q) in block[2..].iter_mut().enumerate() {
            *q = match (b + e) % 3 {
                0 => 0x80, // -128
                1 => 127,
                _ => 0x81, // -127
            };
        }
    }
    let matrix = Q8Matrix::from_ggml(&w, n, k);
    for m in [1, 5] {
        let x: Vec<f32> = (0..m * k)
            .map(|i| if (i / 7) % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        let want = reference(&w, n, k, &x, m);
        for dot in Int8Dot::all_supported() {
            let got = matrix.matmul(dot, &x, m);
            for (idx, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() <= 1e-4 * (1.0 + b.abs()),
                    "{dot:?} m={m} at {idx}: {a} vs {b}"
                );
            }
        }
    }
}

#[test]
fn every_path_gives_a_row_the_same_bits_in_any_batch() {
    let (n, k, total) = (21, 800, 11); // three super-blocks and a tail block
    let matrix = quantize_matrix(&pseudo(n * k, 5), n, k);
    let x = pseudo(total * k, 6);
    for dot in Int8Dot::all_supported() {
        let all = matrix.matmul(dot, &x, total);
        for (from, m) in [(0, 1), (4, 1), (2, 4), (3, 5), (0, total)] {
            let got = matrix.matmul(dot, &x[from * k..(from + m) * k], m);
            let same = got
                .iter()
                .zip(&all[from * n..(from + m) * n])
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{dot:?}: rows {from}..{} differ in a batch of {total}",
                from + m
            );
        }
    }
}
