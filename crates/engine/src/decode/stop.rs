//! Stop conditions on one sequence's output, and the text that may be streamed.
//!
//! Invariants: text that could still turn out to be the start of a stop string is held back;
//! a stop string and anything after it are never returned; stop tokens (EOS unless
//! `ignore_eos`, `stop_token_ids`) and stop strings count only once `min_tokens` tokens were
//! generated (before that, stop tokens are banned from sampling via
//! [`StopChecker::banned_tokens`]); the text of the token that triggered a stop is not returned.
//! The concatenation of every returned text is the sequence's final text.

use crate::api::error::Result;
use crate::api::types::{FinishReason, StopConditions};
use crate::decode::detokenizer::IncrementalDecoder;

/// What one new token produced.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StopOutcome {
    /// Text that can be shown now.
    pub text: String,
    /// `Some` when the sequence is finished.
    pub finish: Option<FinishReason>,
}

/// Checks stop conditions on decoded text, holding back possible stop-string prefixes.
#[derive(Debug, Clone)]
pub struct StopChecker {
    cond: StopConditions,
    eos: u32,
    /// Decoded but not yet returned text.
    pending: String,
    generated: usize,
}

impl StopChecker {
    /// A checker for `cond`; `eos` is the model's end-of-sequence id.
    pub fn new(cond: &StopConditions, eos: u32) -> Self {
        let mut cond = cond.clone();
        cond.stop_strings.retain(|s| !s.is_empty());
        Self {
            cond,
            eos,
            pending: String::new(),
            generated: 0,
        }
    }

    /// Tokens that must not be sampled now (stop tokens while below `min_tokens`).
    pub fn banned_tokens(&self) -> Vec<u32> {
        if self.generated >= self.cond.min_tokens {
            return Vec::new();
        }
        let mut banned = self.cond.stop_token_ids.clone();
        if !self.cond.ignore_eos {
            banned.push(self.eos);
        }
        banned
    }

    /// Number of tokens seen so far.
    pub fn generated(&self) -> usize {
        self.generated
    }

    fn is_stop_token(&self, token: u32) -> bool {
        (token == self.eos && !self.cond.ignore_eos) || self.cond.stop_token_ids.contains(&token)
    }

    /// Feeds one generated token and its newly decoded text.
    pub fn push(&mut self, token: u32, text: &str) -> StopOutcome {
        self.generated += 1;
        let may_stop = self.generated >= self.cond.min_tokens;
        if may_stop && self.is_stop_token(token) {
            // The stop token's own text is dropped; what was held back is real output.
            return StopOutcome {
                text: std::mem::take(&mut self.pending),
                finish: Some(FinishReason::Stop),
            };
        }
        self.pending.push_str(text);
        if may_stop && let Some(pos) = self.find_stop_string() {
            self.pending.truncate(pos);
            return StopOutcome {
                text: std::mem::take(&mut self.pending),
                finish: Some(FinishReason::Stop),
            };
        }
        if self.generated >= self.cond.max_tokens {
            return StopOutcome {
                text: std::mem::take(&mut self.pending),
                finish: Some(FinishReason::Length),
            };
        }
        let hold = self.held_back_len();
        let emit_len = self.pending.len() - hold;
        let rest = self.pending.split_off(emit_len);
        StopOutcome {
            text: std::mem::replace(&mut self.pending, rest),
            finish: None,
        }
    }

    /// Final text after the sequence ended for a reason other than a stop string: `tail` is the
    /// decoder's leftover (e.g. an incomplete character). A stop string completed by it is cut.
    pub fn flush(&mut self, tail: &str) -> String {
        self.pending.push_str(tail);
        if self.generated >= self.cond.min_tokens
            && let Some(pos) = self.find_stop_string()
        {
            self.pending.truncate(pos);
        }
        std::mem::take(&mut self.pending)
    }

    /// Byte offset of the earliest stop string in `pending`.
    fn find_stop_string(&self) -> Option<usize> {
        self.cond
            .stop_strings
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min()
    }

    /// Longest suffix of `pending` that is a proper prefix of some stop string.
    fn held_back_len(&self) -> usize {
        let mut hold = 0;
        for s in &self.cond.stop_strings {
            let max = (s.len() - 1).min(self.pending.len());
            for k in (hold + 1..=max).rev() {
                if s.is_char_boundary(k) && self.pending.ends_with(&s[..k]) {
                    hold = k;
                    break;
                }
            }
        }
        hold
    }
}

/// Detokenizer plus stop checker: turns generated ids into streamable text.
#[derive(Debug, Clone)]
pub struct OutputText {
    decoder: IncrementalDecoder,
    checker: StopChecker,
}

impl OutputText {
    /// Combines a fresh decoder with the request's stop conditions.
    pub fn new(decoder: IncrementalDecoder, cond: &StopConditions, eos: u32) -> Self {
        Self {
            decoder,
            checker: StopChecker::new(cond, eos),
        }
    }

    /// Tokens that must not be sampled now.
    pub fn banned_tokens(&self) -> Vec<u32> {
        self.checker.banned_tokens()
    }

    /// Feeds one token; on a finish the whole remaining text is included.
    pub fn push(&mut self, token: u32) -> Result<StopOutcome> {
        let text = self.decoder.push(token)?;
        let mut outcome = self.checker.push(token, &text);
        if outcome.finish.is_some() {
            let tail = self.decoder.finish()?;
            outcome.text.push_str(&self.checker.flush(&tail));
        }
        Ok(outcome)
    }

    /// Ends the sequence from outside (abort): returns the held-back text.
    pub fn finish(&mut self) -> Result<String> {
        let tail = self.decoder.finish()?;
        Ok(self.checker.flush(&tail))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cond(stops: &[&str], max_tokens: usize) -> StopConditions {
        StopConditions {
            max_tokens,
            stop_strings: stops.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// Feeds (token, text) pairs; returns streamed pieces and the finish reason.
    fn run(c: &StopConditions, steps: &[(u32, &str)]) -> (Vec<String>, Option<FinishReason>) {
        let mut s = StopChecker::new(c, 0);
        let mut out = Vec::new();
        for &(t, text) in steps {
            let o = s.push(t, text);
            out.push(o.text);
            if o.finish.is_some() {
                return (out, o.finish);
            }
        }
        (out, None)
    }

    #[test]
    fn stop_string_across_tokens_is_cut_and_prefix_held_back() {
        let c = cond(&["###"], 100);
        let (out, fin) = run(&c, &[(5, "Hello #"), (6, "#"), (7, "# tail")]);
        assert_eq!(out, vec!["Hello ", "", ""]);
        assert_eq!(fin, Some(FinishReason::Stop));
    }

    #[test]
    fn false_prefix_is_released_once_disproved() {
        let c = cond(&["###"], 100);
        let (out, fin) = run(&c, &[(5, "a #"), (6, "#b"), (7, "c")]);
        assert_eq!(out, vec!["a ", "##b", "c"]);
        assert_eq!(fin, None);
    }

    #[test]
    fn earliest_of_several_stop_strings_wins() {
        let c = cond(&["world", "lo w"], 100);
        let (out, fin) = run(&c, &[(5, "hello world")]);
        assert_eq!(
            (out.concat(), fin),
            ("hel".to_string(), Some(FinishReason::Stop))
        );
    }

    #[test]
    fn eos_stops_unless_ignored_and_keeps_held_text() {
        let c = cond(&["xyz"], 100);
        let (out, fin) = run(&c, &[(5, "ab x"), (0, "")]);
        assert_eq!(out, vec!["ab ", "x"], "held-back 'x' is released at EOS");
        assert_eq!(fin, Some(FinishReason::Stop));
        let mut c2 = cond(&[], 3);
        c2.ignore_eos = true;
        let (out, fin) = run(&c2, &[(0, ""), (0, ""), (0, "")]);
        assert_eq!((out.len(), fin), (3, Some(FinishReason::Length)));
    }

    #[test]
    fn max_tokens_gives_length_and_flushes_everything() {
        let c = cond(&["abc"], 2);
        let (out, fin) = run(&c, &[(5, "x"), (6, "ab")]);
        assert_eq!(out, vec!["x", "ab"]);
        assert_eq!(fin, Some(FinishReason::Length));
    }

    #[test]
    fn stop_token_ids_and_min_tokens() {
        let mut c = cond(&["stop"], 10);
        c.stop_token_ids = vec![42];
        c.min_tokens = 2;
        let mut s = StopChecker::new(&c, 0);
        assert_eq!(s.banned_tokens(), vec![42, 0]);
        // Below min_tokens a stop string does not stop (and is not cut later).
        let o = s.push(5, "stop");
        assert_eq!((o.text.as_str(), o.finish), ("stop", None));
        assert_eq!(
            s.banned_tokens(),
            vec![42, 0],
            "as vLLM: banned while fewer than min_tokens"
        );
        assert_eq!(s.push(6, " go").finish, None);
        assert!(s.banned_tokens().is_empty());
        let o = s.push(42, "ignored text");
        assert_eq!(o.finish, Some(FinishReason::Stop));
        assert_eq!(o.text, "", "the stop token's text is dropped");
    }

    #[test]
    fn multibyte_stop_strings_hold_back_on_char_boundaries() {
        let c = cond(&["你好"], 100);
        let (out, fin) = run(&c, &[(5, "说你"), (6, "好吗")]);
        assert_eq!(out, vec!["说", ""]);
        assert_eq!(fin, Some(FinishReason::Stop));
    }

    #[test]
    fn output_text_with_real_tokenizer_cuts_across_token_boundaries() {
        let tok = crate::tokenizer::tests::demo_tokenizer();
        let text = "The answer is 42.\n\nQuestion: what 🦀 next?";
        let ids = tok.encode(text).expect("encode");
        for stop in ["\n\nQuestion", "42.", "🦀", "swer is", "t?"] {
            let mut out = OutputText::new(
                IncrementalDecoder::new(tok.clone()),
                &cond(&[stop], 1000),
                0,
            );
            let mut streamed = String::new();
            let mut finish = None;
            for &id in &ids {
                let o = out.push(id).expect("push");
                streamed.push_str(&o.text);
                if o.finish.is_some() {
                    finish = o.finish;
                    break;
                }
            }
            let expected = &text[..text.find(stop).expect("stop occurs")];
            assert_eq!(
                (streamed.as_str(), finish),
                (expected, Some(FinishReason::Stop)),
                "{stop:?}"
            );
        }
    }
}
