//! ALiBi slopes in mosaicml's order. The bias itself, `slope · (key_pos − query_pos)`, is computed
//! from positions inside the attention kernel, so there is no table sized by `max_seq_len` and
//! contexts past the training length work.

/// Per-head ALiBi slopes for `n_heads` heads and the config's `alibi_bias_max`.
///
/// With m = the next power of two ≥ n, slope_i = 2^(−i·max/m) for i = 1..m; when n < m the
/// odd-indexed slopes come first, then the even-indexed ones, cut to n (llm-foundry's order).
pub fn alibi_slopes(n_heads: usize, alibi_bias_max: f64) -> Vec<f32> {
    let m = n_heads.next_power_of_two();
    let all: Vec<f64> = (1..=m)
        .map(|i| 2f64.powf(-(i as f64) * alibi_bias_max / m as f64))
        .collect();
    if m == n_heads {
        return all.into_iter().map(|s| s as f32).collect();
    }
    all.iter()
        .skip(1)
        .step_by(2)
        .chain(all.iter().step_by(2))
        .take(n_heads)
        .map(|&s| s as f32)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pow2(exponents: &[i32]) -> Vec<f32> {
        exponents.iter().map(|&e| 2f32.powi(e)).collect()
    }

    #[test]
    fn power_of_two_heads_are_in_order() {
        assert_eq!(
            alibi_slopes(8, 8.0),
            pow2(&[-1, -2, -3, -4, -5, -6, -7, -8])
        );
        assert_eq!(alibi_slopes(4, 8.0), pow2(&[-2, -4, -6, -8]));
    }

    #[test]
    fn non_power_of_two_heads_take_odd_then_even() {
        // The example from FACTS.md: 6 heads, max 8 → m = 8.
        assert_eq!(alibi_slopes(6, 8.0), pow2(&[-2, -4, -6, -8, -1, -3]));
        assert_eq!(alibi_slopes(3, 8.0), pow2(&[-4, -8, -2]));
    }

    #[test]
    fn bias_max_scales_exponents() {
        assert_eq!(alibi_slopes(4, 16.0), pow2(&[-4, -8, -12, -16]));
        // MPT-30B: 64 heads, slopes 2^(-i/8).
        let s = alibi_slopes(64, 8.0);
        assert_eq!(s.len(), 64);
        assert!((s[7] - 0.5).abs() < 1e-7);
    }
}
