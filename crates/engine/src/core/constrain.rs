//! Structured outputs in the step loop: the masks of the constrained sequences that sample in a
//! step are computed on the rayon pool while the forward pass runs, all of them in parallel,
//! so a batch with constraints is not serialised behind them.
//!
//! Invariants: a mask is prepared only for a live choice whose sequence samples this step (its
//! chunk reaches the end of its tokens), from the grammar state after its last token; a choice
//! whose mask is not ready when it samples (a fork) computes it then; without constrained
//! sequences the forward pass runs exactly as before.

use std::collections::HashSet;

use super::engine::Engine;
use crate::decode::constraint::{SeqConstraint, prepare_masks};
use crate::sched::scheduler::ScheduledStep;
use crate::sched::sequence::SeqId;

impl Engine {
    /// Runs the step's forward pass and, alongside it, prepares the next token masks of the
    /// constrained sequences that sample this step.
    pub(super) fn forward_and_prepare_masks(
        &mut self,
        step: &ScheduledStep,
    ) -> Result<Vec<f32>, String> {
        let sampling: HashSet<SeqId> = step
            .seq_ids
            .iter()
            .zip(&step.batch.seqs)
            .filter(|&(&id, chunk)| {
                self.sched
                    .get(id)
                    .is_some_and(|s| chunk.context_len() >= s.tokens.len())
            })
            .map(|(&id, _)| id)
            .collect();
        let Engine {
            model,
            cache,
            requests,
            ..
        } = self;
        let pending: Vec<&mut SeqConstraint> = requests
            .values_mut()
            .flat_map(|r| r.choices.iter_mut())
            .filter(|c| c.finish.is_none() && sampling.contains(&c.seq))
            .filter_map(|c| c.constraint.as_mut())
            .filter(|c| !c.is_prepared())
            .collect();
        if pending.is_empty() {
            return Engine::run_model(model, cache, step);
        }
        let (logits, ()) = rayon::join(
            || Engine::run_model(model, cache, step),
            || prepare_masks(pending),
        );
        logits
    }
}
