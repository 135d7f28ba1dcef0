//! The n-gram proposer (vLLM's `ngram` method, also called prompt lookup): the longest suffix
//! of a sequence, between `prompt_lookup_min` and `prompt_lookup_max` tokens, that also occurs
//! earlier in the sequence (prompt and output alike) predicts that what followed it then
//! follows now.
//!
//! Invariants: a proposal is a function of the tokens alone (so drafting is the same for a
//! sequence whatever else runs); among the longest matches the most recent one wins, and the
//! proposal is the tokens after it, at most `num_speculative_tokens` and never past the end of
//! the sequence. One backward pass over the tokens, comparing only where the last token recurs.

use crate::api::config::NgramSpeculation;

/// Drafts tokens for a sequence from its own history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NgramProposer {
    settings: NgramSpeculation,
}

impl NgramProposer {
    /// A proposer with checked settings (see `NgramSpeculation::check`).
    pub fn new(settings: NgramSpeculation) -> Self {
        Self { settings }
    }

    /// The batch size from which drafting stops, when set instead of the cost model.
    pub fn disable_by_batch_size(&self) -> Option<usize> {
        self.settings.disable_by_batch_size
    }

    /// Most tokens one proposal holds (`num_speculative_tokens`).
    pub fn max_len(&self) -> usize {
        self.settings.num_speculative_tokens
    }

    /// The tokens proposed to follow `tokens`, at most `limit` of them (empty when no suffix
    /// of at least `prompt_lookup_min` tokens recurs).
    pub fn propose(&self, tokens: &[u32], limit: usize) -> Vec<u32> {
        let limit = limit.min(self.settings.num_speculative_tokens);
        let (min, max) = (
            self.settings.prompt_lookup_min,
            self.settings.prompt_lookup_max,
        );
        let Some((&last, _)) = tokens.split_last() else {
            return Vec::new();
        };
        if limit == 0 || tokens.len() <= min {
            return Vec::new();
        }
        let end = tokens.len() - 1;
        let mut best: Option<(usize, usize)> = None; // (match length, position of its last token)
        for i in (0..end).rev() {
            if tokens[i] != last {
                continue;
            }
            let mut len = 1;
            while len < max && len <= i && tokens[i - len] == tokens[end - len] {
                len += 1;
            }
            if len >= min && best.is_none_or(|(b, _)| len > b) {
                best = Some((len, i));
                if len == max {
                    break;
                }
            }
        }
        match best {
            Some((_, i)) => tokens[i + 1..tokens.len().min(i + 1 + limit)].to_vec(),
            None => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proposer(k: usize, min: usize, max: usize) -> NgramProposer {
        NgramProposer::new(NgramSpeculation {
            num_speculative_tokens: k,
            prompt_lookup_min: min,
            prompt_lookup_max: max,
            disable_by_batch_size: None,
        })
    }

    #[test]
    fn proposes_what_followed_the_longest_recurring_suffix() {
        // Suffix [7, 8, 9] occurs at 0..3 (followed by 1, 2) and [8, 9] at 5..7 (followed by 3):
        // the longer match wins although the shorter one is more recent.
        let tokens = [7, 8, 9, 1, 2, 8, 9, 3, 4, 7, 8, 9];
        assert_eq!(proposer(2, 1, 3).propose(&tokens, 10), vec![1, 2]);
        // Capped at length 2, both match; the most recent one wins.
        assert_eq!(proposer(2, 1, 2).propose(&tokens, 10), vec![3, 4]);
    }

    #[test]
    fn respects_the_minimum_length_the_token_limit_and_the_end() {
        let tokens = [5, 1, 2, 6, 2];
        assert!(proposer(3, 2, 4).propose(&tokens, 10).is_empty());
        assert_eq!(proposer(3, 1, 4).propose(&tokens, 10), vec![6, 2]);
        assert_eq!(proposer(3, 1, 4).propose(&tokens, 1), vec![6]);
        assert!(proposer(3, 1, 4).propose(&tokens, 0).is_empty());
        // A repeating loop drafts into its own suffix, never past the sequence's end.
        let looped = [1, 2, 1, 2, 1, 2];
        assert_eq!(proposer(8, 2, 3).propose(&looped, 10), vec![1, 2]);
    }

    #[test]
    fn short_or_unrepeated_sequences_propose_nothing() {
        let p = proposer(4, 1, 3);
        assert!(p.propose(&[], 4).is_empty());
        assert!(p.propose(&[3], 4).is_empty());
        assert!(p.propose(&[1, 2, 3, 4, 5], 4).is_empty());
    }

    #[test]
    fn a_match_may_start_at_the_first_token() {
        // The earlier occurrence [4, 5] starts at position 0.
        assert_eq!(proposer(2, 2, 2).propose(&[4, 5, 6, 4, 5], 4), vec![6, 4]);
    }
}
