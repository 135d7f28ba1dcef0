//! Structured outputs, decode side: one sequence's grammar state ([`SeqConstraint`]) and the
//! set of tokens it allows next ([`TokenMask`]); [`prepare_masks`] computes the next masks of
//! many sequences in parallel.
//!
//! Invariants: a sequence's matcher has consumed exactly the tokens it generated, so after a
//! preemption (its KV recomputed) it carries on where it was; a prepared mask belongs to the
//! state it was computed in and is dropped when a token is consumed; a mask never allows an id
//! without bytes (padding) nor a special token other than EOS, and allows EOS only where the
//! grammar may end.

use std::sync::Arc;

use llguidance::Matcher;
use llguidance::toktrie::SimpleVob;
use rayon::prelude::*;

use super::grammar::Grammar;

/// The tokens a grammar allows at one position.
#[derive(Debug, Clone)]
pub struct TokenMask(SimpleVob);

impl TokenMask {
    /// A mask over `size` ids allowing `allowed` (tests).
    #[cfg(test)]
    pub(crate) fn from_ids(size: usize, allowed: &[u32]) -> Self {
        let mut vob = SimpleVob::alloc(size);
        for &id in allowed {
            vob.allow_token(id);
        }
        Self(vob)
    }

    /// Whether `token` may be sampled.
    pub fn allows(&self, token: u32) -> bool {
        (token as usize) < self.0.len() && self.0.is_allowed(token)
    }

    /// Number of allowed tokens.
    pub fn num_allowed(&self) -> usize {
        self.0.num_set()
    }

    /// Sets the logits of every token it does not allow to -inf (ids past the mask too).
    pub fn apply(&self, logits: &mut [f32]) {
        for (word, chunk) in self.0.as_slice().iter().zip(logits.chunks_mut(32)) {
            if *word == u32::MAX {
                continue;
            }
            for (bit, logit) in chunk.iter_mut().enumerate() {
                if word & (1 << bit) == 0 {
                    *logit = f32::NEG_INFINITY;
                }
            }
        }
        let covered = self.0.as_slice().len() * 32;
        for logit in logits.iter_mut().skip(covered) {
            *logit = f32::NEG_INFINITY;
        }
    }

    /// Disallows `tokens` too, unless that would leave nothing allowed (the grammar wins:
    /// `min_tokens` cannot push a complete output past its end). True if they were removed.
    pub fn remove_unless_empty(&mut self, tokens: &[u32]) -> bool {
        let mut reduced = self.0.clone();
        for &t in tokens {
            if (t as usize) < reduced.len() {
                reduced.disallow_token(t);
            }
        }
        if reduced.is_zero() {
            return false;
        }
        self.0 = reduced;
        true
    }
}

/// One sequence's position in its grammar.
pub struct SeqConstraint {
    matcher: Matcher,
    /// The mask of the current state, once computed.
    next: Option<Result<TokenMask, String>>,
}

impl std::fmt::Debug for SeqConstraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SeqConstraint")
            .field("prepared", &self.next.is_some())
            .finish_non_exhaustive()
    }
}

impl SeqConstraint {
    /// A sequence at the start of `grammar`.
    pub fn new(grammar: &Arc<Grammar>) -> Self {
        Self {
            matcher: grammar.start(),
            next: None,
        }
    }

    /// An independent copy in the same state (for the forks of `n` / `best_of`).
    pub fn fork(&self) -> Self {
        Self {
            matcher: self.matcher.deep_clone(),
            next: self.next.clone(),
        }
    }

    /// Computes the mask of the current state unless it is known already.
    pub fn prepare(&mut self) {
        if self.next.is_none() {
            self.next = Some(
                self.matcher
                    .compute_mask()
                    .map(TokenMask)
                    .map_err(|e| format!("the grammar failed to compute a mask: {e}")),
            );
        }
    }

    /// True when a mask for the current state is ready.
    pub fn is_prepared(&self) -> bool {
        self.next.is_some()
    }

    /// The mask of the current state (prepared earlier, or computed now).
    pub fn mask(&mut self) -> Result<TokenMask, String> {
        self.prepare();
        self.next
            .clone()
            .expect("prepare() leaves a mask: this is a bug")
    }

    /// Advances past a sampled token (one the mask allowed).
    pub fn consume(&mut self, token: u32) -> Result<(), String> {
        self.next = None;
        self.matcher
            .consume_token(token)
            .map_err(|e| format!("token {token} was rejected: {e}"))
    }

    /// True once the output is complete and nothing may follow (EOS taken, or no extension).
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped() && !self.matcher.is_error()
    }
}

/// Prepares the next mask of every given sequence, in parallel on the rayon pool.
pub fn prepare_masks(constraints: Vec<&mut SeqConstraint>) {
    constraints.into_par_iter().for_each(SeqConstraint::prepare);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mask_apply_sets_disallowed_to_minus_infinity() {
        let mut vob = SimpleVob::alloc(70);
        vob.allow_token(3);
        vob.allow_token(40);
        let mut mask = TokenMask(vob);
        let mut logits = vec![1.0f32; 75];
        mask.apply(&mut logits);
        let kept: Vec<usize> = (0..75).filter(|&i| logits[i].is_finite()).collect();
        assert_eq!(kept, vec![3, 40], "ids past the mask are disallowed too");
        assert!(mask.allows(40) && !mask.allows(41) && !mask.allows(500));
        assert!(mask.remove_unless_empty(&[3]));
        assert_eq!(mask.num_allowed(), 1);
        assert!(!mask.remove_unless_empty(&[40]), "never leaves nothing");
        assert!(mask.allows(40));
    }
}
