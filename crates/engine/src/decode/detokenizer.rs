//! Streaming detokenizer: turns one sequence's token ids into text as they are generated.
//!
//! Invariants of [`IncrementalDecoder`]: every string it returns is complete UTF-8 with no
//! replacement character produced by a token cut in the middle of a character (text ending in
//! an incomplete sequence is held back), and the concatenation of everything returned by
//! [`IncrementalDecoder::push`] followed by [`IncrementalDecoder::finish`] equals
//! [`Tokenizer::decode`] of all ids pushed. It decodes a short window of recent tokens per step
//! (the read-offset method), so the cost per token does not grow with the sequence length: the
//! window moves on after every token that adds no text (special tokens with `ignore_eos`, ids of
//! the padded vocabulary) and is never held for more than [`MAX_HELD_TOKENS`] tokens of broken
//! UTF-8 (a valid character needs at most four byte tokens; past that the bytes are garbage and
//! go out lossily).

use crate::api::error::Result;
use crate::tokenizer::Tokenizer;

/// Most tokens whose text is held back because it ends in an incomplete UTF-8 sequence.
pub const MAX_HELD_TOKENS: usize = 8;

/// Streaming detokenizer for one sequence; see the module docs for its guarantees.
#[derive(Debug, Clone)]
pub struct IncrementalDecoder {
    tokenizer: Tokenizer,
    /// Recent ids: `ids[..prefix_len]` were already emitted and serve as context,
    /// `ids[prefix_len..]` are not emitted yet.
    ids: Vec<u32>,
    prefix_len: usize,
    /// `decode(ids[..prefix_len])`.
    prefix_text: String,
}

impl IncrementalDecoder {
    /// A fresh decoder for one sequence.
    pub fn new(tokenizer: Tokenizer) -> Self {
        Self {
            tokenizer,
            ids: Vec::new(),
            prefix_len: 0,
            prefix_text: String::new(),
        }
    }

    /// Adds one token and returns the text that became final (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self.tokenizer.decode(&self.ids)?;
        let held = self.ids.len() - self.prefix_len;
        let waiting =
            text.ends_with(char::REPLACEMENT_CHARACTER) || !text.starts_with(&self.prefix_text);
        if waiting && held < MAX_HELD_TOKENS {
            // A character cut between tokens: wait for its remaining bytes.
            return Ok(String::new());
        }
        let new_text = match text.strip_prefix(self.prefix_text.as_str()) {
            Some(rest) => rest.to_string(),
            // The window's earlier text decoded differently with the new tokens (never seen
            // with byte-level BPE): send what follows the part both decodings share.
            None => text[common_prefix_len(&text, &self.prefix_text)..].to_string(),
        };
        // Keep the tokens just emitted as context for the next window: some decoders change a
        // token's text depending on what precedes it.
        self.ids.drain(..self.prefix_len);
        self.prefix_len = self.ids.len();
        self.prefix_text = self.tokenizer.decode(&self.ids)?;
        Ok(new_text)
    }

    /// Flushes whatever is still held back (lossy if the sequence ended mid-character).
    pub fn finish(&mut self) -> Result<String> {
        let text = self.tokenizer.decode(&self.ids)?;
        let rest = text
            .strip_prefix(self.prefix_text.as_str())
            .unwrap_or_default()
            .to_string();
        self.ids.drain(..);
        self.prefix_len = 0;
        self.prefix_text.clear();
        Ok(rest)
    }
}

/// Bytes of the longest common prefix of `a` and `b` that ends on a character boundary.
fn common_prefix_len(a: &str, b: &str) -> usize {
    a.char_indices()
        .zip(b.chars())
        .find(|((_, x), y)| x != y)
        .map_or(a.len().min(b.len()), |((i, _), _)| i)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizer::tests::{TEXTS, demo_tokenizer};

    fn stream(tok: &Tokenizer, ids: &[u32]) -> Vec<String> {
        let mut dec = IncrementalDecoder::new(tok.clone());
        let mut out: Vec<String> = ids.iter().map(|&id| dec.push(id).expect("push")).collect();
        out.push(dec.finish().expect("finish"));
        out
    }

    #[test]
    fn incremental_matches_full_decode_and_never_breaks_utf8() {
        let tok = demo_tokenizer();
        for text in TEXTS {
            let ids = tok.encode(text).expect("encode");
            let pieces = stream(&tok, &ids);
            for piece in &pieces {
                assert!(
                    !piece.contains(char::REPLACEMENT_CHARACTER),
                    "{text:?}: {pieces:?}"
                );
            }
            assert_eq!(pieces.concat(), *text);
            // Multi-byte characters split over several tokens must have produced empty pieces.
            if text.contains('🦀') {
                assert!(pieces.iter().any(String::is_empty));
            }
        }
    }

    #[test]
    fn incremental_concatenation_equals_decode_for_arbitrary_ids() {
        use rand::{Rng, SeedableRng};
        let tok = demo_tokenizer();
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..50 {
            let len = rng.random_range(1..40);
            // Mix byte-level tokens (ids < 256 are mostly single bytes) with ordinary ones.
            let ids: Vec<u32> = (0..len)
                .map(|_| {
                    if rng.random_bool(0.5) {
                        rng.random_range(0..300)
                    } else {
                        rng.random_range(0..50_277)
                    }
                })
                .collect();
            let pieces = stream(&tok, &ids);
            assert_eq!(
                pieces.concat(),
                tok.decode(&ids).expect("decode"),
                "{ids:?}"
            );
            // Only the final flush may carry a replacement character (sequence ended mid-char).
            for piece in &pieces[..pieces.len() - 1] {
                if piece.ends_with(char::REPLACEMENT_CHARACTER) {
                    panic!("held-back text leaked: {piece:?} for {ids:?}");
                }
            }
        }
    }

    #[test]
    fn spaces_are_kept_between_tokens() {
        let tok = demo_tokenizer();
        let ids = tok.encode(" a  b   c").expect("encode");
        assert_eq!(stream(&tok, &ids).concat(), " a  b   c");
    }

    #[test]
    fn tokens_without_text_keep_the_window_short() {
        let tok = demo_tokenizer();
        let hello = tok.encode("Hello").expect("encode");
        let mut dec = IncrementalDecoder::new(tok.clone());
        let mut text = String::new();
        // <|endoftext|> (skipped by decoding) and ids of the padded vocabulary, which have no
        // token at all, as a run with `ignore_eos` produces them.
        for i in 0..3000u32 {
            let id = if i % 2 == 0 { 0 } else { 50_300 + i % 100 };
            text.push_str(&dec.push(id).expect("push"));
            assert!(dec.ids.len() <= 2, "window grew to {} ids", dec.ids.len());
        }
        for &id in &hello {
            text.push_str(&dec.push(id).expect("push"));
        }
        text.push_str(&dec.finish().expect("finish"));
        assert_eq!(text, "Hello");
    }

    #[test]
    fn broken_utf8_is_held_for_a_bounded_number_of_tokens() {
        let tok = demo_tokenizer();
        let lead = tok.token_to_id("ð").expect("byte token of 0xF0");
        let mut dec = IncrementalDecoder::new(tok.clone());
        let mut pieces = Vec::new();
        for _ in 0..100 {
            pieces.push(dec.push(lead).expect("push"));
            assert!(dec.ids.len() <= 2 * MAX_HELD_TOKENS, "{}", dec.ids.len());
        }
        pieces.push(dec.finish().expect("finish"));
        assert!(pieces.iter().any(|p| !p.is_empty()), "garbage goes out");
        assert_eq!(
            pieces.concat(),
            tok.decode(&vec![lead; 100]).expect("decode")
        );
    }
}
