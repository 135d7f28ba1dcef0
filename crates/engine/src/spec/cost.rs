//! What a step costs, learnt while serving, so that drafts are made only when they pay: a step
//! of `r` rows (tokens through the model, each with its logits) takes about `a + b·r`
//! seconds. `a` (weights streamed from memory, fork-joins) is paid once per step and `b` per
//! row, so `a / b` rows ride along almost free. A large model on a CPU has many such free rows
//! (memory-bound), a tiny one almost none (its vocabulary projection and sampling are per row),
//! and a batch of sixteen streams may already fill them.
//!
//! Invariants: the fit uses decode-only steps (every row has logits), weighted towards recent
//! ones; until the steps seen differ enough in size to tell `a` from `b`, the cost is unknown
//! and drafting is not limited by it.

/// Weight kept by older observations at each new one.
const DECAY: f64 = 0.98;
/// Least spread of row counts (weighted variance) for a slope to mean anything.
const MIN_ROW_VARIANCE: f64 = 0.5;
/// Share of a draft's expected gain counted against the step's efficiency: the estimates are
/// noisy, and a draft that only breaks even costs latency for nothing.
const GAIN_MARGIN: f64 = 0.9;

/// A running least-squares fit of step time against rows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct StepCost {
    weight: f64,
    sum_rows: f64,
    sum_secs: f64,
    sum_rows_sq: f64,
    sum_rows_secs: f64,
}

impl StepCost {
    /// Records one decode-only step of `rows` rows that took `secs` seconds.
    pub fn observe(&mut self, rows: usize, secs: f64) {
        let x = rows as f64;
        self.weight = self.weight * DECAY + 1.0;
        self.sum_rows = self.sum_rows * DECAY + x;
        self.sum_secs = self.sum_secs * DECAY + secs;
        self.sum_rows_sq = self.sum_rows_sq * DECAY + x * x;
        self.sum_rows_secs = self.sum_rows_secs * DECAY + x * secs;
    }

    /// Rows a step carries for the price of one more row, `a / b` (None while unknown).
    pub fn free_rows(&self) -> Option<f64> {
        if self.weight == 0.0 {
            return None;
        }
        let mean_x = self.sum_rows / self.weight;
        let mean_y = self.sum_secs / self.weight;
        let var_x = self.sum_rows_sq / self.weight - mean_x * mean_x;
        if var_x < MIN_ROW_VARIANCE {
            return None;
        }
        let slope = (self.sum_rows_secs / self.weight - mean_x * mean_y) / var_x;
        if slope <= 0.0 {
            return Some(f64::INFINITY); // rows cost nothing measurable
        }
        Some(((mean_y - slope * mean_x) / slope).max(0.0))
    }
}

/// Whether a draft whose tokens are accepted at rate `acceptance` makes a step of `tokens`
/// sampled tokens over `rows` rows faster per token: its expected accepted tokens per row
/// (less a margin) must beat the step's tokens per row-equivalent, `tokens / (free_rows +
/// rows)`.
pub fn draft_pays(acceptance: f64, tokens: f64, rows: f64, free_rows: Option<f64>) -> bool {
    match free_rows {
        None => true,
        Some(free) => acceptance * GAIN_MARGIN > tokens / (free + rows),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn learns_the_fixed_and_per_row_cost_of_a_step() {
        let mut cost = StepCost::default();
        assert_eq!(cost.free_rows(), None);
        for i in 0..200 {
            let rows = 1 + i % 20;
            cost.observe(rows, 0.040 + 0.002 * rows as f64); // 20 rows for the price of one
        }
        let free = cost.free_rows().expect("known");
        assert!((free - 20.0).abs() < 1e-6, "{free}");
    }

    #[test]
    fn steps_of_one_size_tell_nothing() {
        let mut cost = StepCost::default();
        for _ in 0..100 {
            cost.observe(16, 0.008);
        }
        assert_eq!(cost.free_rows(), None);
    }

    #[test]
    fn a_draft_pays_when_rows_are_cheap_or_acceptance_beats_the_batch() {
        // Memory-bound: one stream, 20 free rows; a draft accepted 10% of the time pays.
        assert!(draft_pays(0.1, 1.0, 1.0, Some(20.0)));
        // Compute-bound: 16 streams, one free row; even 99% acceptance is not enough.
        assert!(!draft_pays(0.99, 16.0, 16.0, Some(1.3)));
        // 16 streams with 20 free rows: 60% acceptance pays.
        assert!(draft_pays(0.6, 16.0, 16.0, Some(20.0)));
        assert!(draft_pays(0.0, 16.0, 16.0, None));
    }
}
