//! The causal ALiBi softmax shared by the decode and prefill kernels.

use crate::kernels::cpu::fast_math;

/// Turns raw `q·k_j` of the query at position `pos` into attention weights in place: scaled,
/// ALiBi-biased and normalised over `j ≤ pos`, zero beyond.
#[inline(always)]
pub(crate) fn softmax_causal(row: &mut [f32], pos: usize, slope: f32, scale: f32) {
    let (seen, unseen) = row.split_at_mut(pos + 1);
    let mut max = f32::NEG_INFINITY;
    for (j, s) in seen.iter_mut().enumerate() {
        *s = scale * *s + slope * (j as f32 - pos as f32);
        max = max.max(*s);
    }
    let mut sum = 0f32;
    for s in seen.iter_mut() {
        *s = fast_math::exp(*s - max);
        sum += *s;
    }
    let inv = 1.0 / sum;
    seen.iter_mut().for_each(|s| *s *= inv);
    unseen.fill(0.0);
}
