//! ggml's K-quant blocks of 256 weights, Q4_K and Q6_K: quantization as ggml's reference
//! (`quantize_row_q4_K_ref`, `quantize_row_q6_K_ref`: a small search over scales that minimises
//! a weighted squared error) and dequantization.
//!
//! Invariant: every float expression is evaluated in the reference's order, one rounding per
//! operation, so the chosen scales and levels, and therefore the bytes, are ggml's.

use super::ggml_scalars::{f16_at, nearest_int, put_f16};

/// Weights per K-quant block.
const QK_K: usize = 256;

/// The reference's threshold under which a group counts as all zero.
const GROUP_MAX_EPS: f32 = 1e-15;

/// Scale and minimum for `x` with levels 0..=nmax (`make_qkx2_quants`): fits `scale · l + min`
/// to `x` under `weights`, trying `nstep + 1` scales around the range; writes the levels to `l`
/// and returns `(scale, -min)`.
fn make_qkx2_quants(
    nmax: i32,
    x: &[f32],
    weights: &[f32],
    l: &mut [u8],
    rmin: f32,
    rdelta: f32,
    nstep: i32,
) -> (f32, f32) {
    let n = x.len();
    let mut laux = [0u8; 32];
    let (mut min, mut max) = (x[0], x[0]);
    let mut sum_w = weights[0];
    let mut sum_x = sum_w * x[0];
    for i in 1..n {
        min = min.min(x[i]);
        max = max.max(x[i]);
        let w = weights[i];
        sum_w += w;
        sum_x += w * x[i];
    }
    if min > 0.0 {
        min = 0.0;
    }
    if max == min {
        l[..n].fill(0);
        return (0.0, -min);
    }
    let mut iscale = nmax as f32 / (max - min);
    let mut scale = 1.0 / iscale;
    let mut best_error = 0f32;
    for i in 0..n {
        let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
        l[i] = q as u8;
        let diff = scale * q as f32 + min - x[i];
        best_error += weights[i] * (diff * diff);
    }
    for is in 0..=nstep {
        iscale = (rmin + rdelta * is as f32 + nmax as f32) / (max - min);
        let (mut sum_l, mut sum_l2, mut sum_xl) = (0f32, 0f32, 0f32);
        for i in 0..n {
            let q = nearest_int(iscale * (x[i] - min)).clamp(0, nmax);
            laux[i] = q as u8;
            let (w, q) = (weights[i], q as f32);
            sum_l += w * q;
            sum_l2 += w * q * q;
            sum_xl += w * q * x[i];
        }
        let det = sum_w * sum_l2 - sum_l * sum_l;
        if det > 0.0 {
            let mut this_scale = (sum_w * sum_xl - sum_x * sum_l) / det;
            let mut this_min = (sum_l2 * sum_x - sum_l * sum_xl) / det;
            if this_min > 0.0 {
                this_min = 0.0;
                this_scale = sum_xl / sum_l2;
            }
            let mut cur_error = 0f32;
            for i in 0..n {
                let diff = this_scale * laux[i] as f32 + this_min - x[i];
                cur_error += weights[i] * (diff * diff);
            }
            if cur_error < best_error {
                l[..n].copy_from_slice(&laux[..n]);
                best_error = cur_error;
                scale = this_scale;
                min = this_min;
            }
        }
    }
    (scale, -min)
}

/// Symmetric scale for `x` with levels −nmax..nmax−1 stored offset by nmax (`make_qx_quants`
/// with `rmse_type` 1: weights x², 18 scales tried around nmax / max).
fn make_qx_quants(nmax: i32, x: &[f32], l: &mut [i8]) -> f32 {
    let (mut max, mut amax) = (0f32, 0f32);
    for &v in x {
        if v.abs() > amax {
            amax = v.abs();
            max = v;
        }
    }
    if amax < GROUP_MAX_EPS {
        l[..x.len()].fill(0);
        return 0.0;
    }
    let level = |iscale: f32, v: f32| nearest_int(iscale * v).clamp(-nmax, nmax - 1);
    let sums = |iscale: f32| {
        let (mut sumlx, mut suml2) = (0f32, 0f32);
        for &v in x {
            let q = level(iscale, v) as f32;
            let w = v * v;
            sumlx += w * v * q;
            suml2 += w * q * q;
        }
        (sumlx, suml2)
    };
    let mut iscale = -(nmax as f32) / max;
    for (q, &v) in l.iter_mut().zip(x) {
        *q = (level(iscale, v) + nmax) as i8;
    }
    let (sumlx, suml2) = sums(iscale);
    let mut scale = if suml2 != 0.0 { sumlx / suml2 } else { 0.0 };
    let mut best = scale * sumlx;
    for is in -9..=9 {
        if is == 0 {
            continue;
        }
        iscale = -(nmax as f32 + 0.1 * is as f32) / max;
        let (sumlx, suml2) = sums(iscale);
        if suml2 > 0.0 && sumlx * sumlx > best * suml2 {
            for (q, &v) in l.iter_mut().zip(x) {
                *q = (level(iscale, v) + nmax) as i8;
            }
            scale = sumlx / suml2;
            best = scale * sumlx;
        }
    }
    scale
}

/// Sub-block `j`'s 6-bit scale and min from a Q4_K block's 12 packed bytes.
fn scale_min_k4(j: usize, q: &[u8]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0x0f) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// One Q4_K block (144 bytes: d, dmin, 12 scale bytes, 128 bytes of nibbles).
pub(super) fn quantize_block_q4_k(x: &[f32], out: &mut [u8]) {
    let mut levels = [0u8; QK_K];
    let (mut scales, mut mins) = ([0f32; 8], [0f32; 8]);
    let (mut max_scale, mut max_min) = (0f32, 0f32);
    for j in 0..8 {
        let xs = &x[32 * j..32 * j + 32];
        let mut sum_x2 = 0f32;
        for &v in xs {
            sum_x2 += v * v;
        }
        let av_x = (sum_x2 / 32.0).sqrt();
        let mut weights = [0f32; 32];
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = av_x + v.abs();
        }
        let (scale, min) = make_qkx2_quants(
            15,
            xs,
            &weights,
            &mut levels[32 * j..32 * j + 32],
            -1.0,
            0.1,
            20,
        );
        scales[j] = scale;
        mins[j] = min;
        max_scale = max_scale.max_ref(scale);
        max_min = max_min.max_ref(min);
    }
    let inv_scale = if max_scale > 0.0 {
        63.0 / max_scale
    } else {
        0.0
    };
    let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
    let packed = &mut out[4..16];
    packed.fill(0);
    for j in 0..8 {
        let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
        let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
        if j < 4 {
            packed[j] = ls;
            packed[j + 4] = lm;
        } else {
            packed[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
            packed[j - 4] |= (ls >> 4) << 6;
            packed[j] |= (lm >> 4) << 6;
        }
    }
    put_f16(&mut out[0..2], max_scale / 63.0);
    put_f16(&mut out[2..4], max_min / 63.0);
    let (d_all, dmin_all) = (f16_at(&out[0..2]), f16_at(&out[2..4]));
    for j in 0..8 {
        let (sc, m) = scale_min_k4(j, &out[4..16]);
        let d = d_all * sc as f32;
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * m as f32;
        for i in 0..32 {
            levels[32 * j + i] = nearest_int((x[32 * j + i] + dm) / d).clamp(0, 15) as u8;
        }
    }
    let qs = &mut out[16..144];
    for (chunk, group) in levels.chunks_exact(64).enumerate() {
        for i in 0..32 {
            qs[32 * chunk + i] = group[i] | (group[i + 32] << 4);
        }
    }
}

#[cfg(test)]
pub(super) fn dequantize_block_q4_k(b: &[u8], out: &mut [f32]) {
    let (d, dmin) = (f16_at(&b[0..2]), f16_at(&b[2..4]));
    let (scales, qs) = (&b[4..16], &b[16..144]);
    for chunk in 0..4 {
        let (sc1, m1) = scale_min_k4(2 * chunk, scales);
        let (sc2, m2) = scale_min_k4(2 * chunk + 1, scales);
        let (d1, m1) = (d * sc1 as f32, dmin * m1 as f32);
        let (d2, m2) = (d * sc2 as f32, dmin * m2 as f32);
        for i in 0..32 {
            let q = qs[32 * chunk + i];
            out[64 * chunk + i] = d1 * (q & 0x0f) as f32 - m1;
            out[64 * chunk + 32 + i] = d2 * (q >> 4) as f32 - m2;
        }
    }
}

/// One Q6_K block (210 bytes: 128 low-nibble bytes, 64 bytes of high bits, 16 i8 scales, d).
pub(super) fn quantize_block_q6_k(x: &[f32], out: &mut [u8]) {
    let mut levels = [0i8; QK_K];
    let mut scales = [0f32; 16];
    let (mut max_scale, mut max_abs_scale) = (0f32, 0f32);
    for ib in 0..16 {
        let scale = make_qx_quants(32, &x[16 * ib..16 * ib + 16], &mut levels[16 * ib..]);
        scales[ib] = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        out.fill(0);
        return;
    }
    let iscale = -128.0 / max_scale;
    put_f16(&mut out[208..210], 1.0 / iscale);
    for ib in 0..16 {
        out[192 + ib] = nearest_int(iscale * scales[ib]).min(127) as i8 as u8;
    }
    let d_all = f16_at(&out[208..210]);
    for j in 0..16 {
        let d = d_all * out[192 + j] as i8 as f32;
        if d == 0.0 {
            continue;
        }
        for i in 0..16 {
            let q = nearest_int(x[16 * j + i] / d).clamp(-32, 31);
            levels[16 * j + i] = (q + 32) as i8;
        }
    }
    let (ql, qh) = out[..192].split_at_mut(128);
    for half in 0..2 {
        let l = &levels[128 * half..128 * half + 128];
        let (ql, qh) = (&mut ql[64 * half..], &mut qh[32 * half..]);
        for i in 0..32 {
            let q = [l[i], l[i + 32], l[i + 64], l[i + 96]].map(|v| v as u8);
            ql[i] = (q[0] & 0x0f) | ((q[2] & 0x0f) << 4);
            ql[i + 32] = (q[1] & 0x0f) | ((q[3] & 0x0f) << 4);
            qh[i] = (q[0] >> 4) | ((q[1] >> 4) << 2) | ((q[2] >> 4) << 4) | ((q[3] >> 4) << 6);
        }
    }
}

#[cfg(test)]
pub(super) fn dequantize_block_q6_k(b: &[u8], out: &mut [f32]) {
    let d = f16_at(&b[208..210]);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let y = &mut out[128 * half..128 * half + 128];
        for i in 0..32 {
            let is = i / 16;
            let q1 = ((ql[i] & 0x0f) | ((qh[i] & 3) << 4)) as i32 - 32;
            let q2 = ((ql[i + 32] & 0x0f) | (((qh[i] >> 2) & 3) << 4)) as i32 - 32;
            let q3 = ((ql[i] >> 4) | (((qh[i] >> 4) & 3) << 4)) as i32 - 32;
            let q4 = ((ql[i + 32] >> 4) | (((qh[i] >> 6) & 3) << 4)) as i32 - 32;
            let s = |k: usize| d * sc[is + k] as i8 as f32;
            y[i] = s(0) * q1 as f32;
            y[i + 32] = s(2) * q2 as f32;
            y[i + 64] = s(4) * q3 as f32;
            y[i + 96] = s(6) * q4 as f32;
        }
    }
}

/// `max` as the reference writes it (`if (v > m) m = v`), which keeps `m` when `v` is NaN.
trait MaxRef {
    fn max_ref(self, v: f32) -> f32;
}

impl MaxRef for f32 {
    fn max_ref(self, v: f32) -> f32 {
        if v > self { v } else { self }
    }
}
