//! The model's tokenizer: a Hugging Face `tokenizer.json` (GPT-NeoX-20B BPE for MPT). Streaming
//! detokenization lives in [`crate::decode::detokenizer`].

use std::path::Path;
use std::sync::Arc;

use crate::api::error::{EngineError, Result};

/// The model's tokenizer (a Hugging Face `tokenizer.json`). MPT adds no BOS token.
#[derive(Clone)]
pub struct Tokenizer {
    inner: Arc<tokenizers::Tokenizer>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.inner.get_vocab_size(true))
            .finish()
    }
}

fn tok_err(e: impl std::fmt::Display) -> EngineError {
    EngineError::Tokenizer(e.to_string())
}

impl Tokenizer {
    /// Loads a `tokenizer.json` file.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| EngineError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(&bytes)
            .map_err(|e| EngineError::Tokenizer(format!("{}: {e}", path.display())))
    }

    /// Parses `tokenizer.json` contents.
    pub fn from_bytes(json: &[u8]) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_bytes(json).map_err(tok_err)?;
        Ok(Self {
            inner: Arc::new(inner),
        })
    }

    /// Wraps a tokenizer built in code (e.g. rebuilt from a GGUF file's metadata).
    pub(crate) fn from_hf(inner: tokenizers::Tokenizer) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Encodes text to ids without adding special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let encoding = self.inner.encode(text, false).map_err(tok_err)?;
        Ok(encoding.get_ids().to_vec())
    }

    /// Decodes ids to text, skipping special tokens.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(tok_err)
    }

    /// Text of one token, for logprobs; special tokens show their name, partial UTF-8 is lossy.
    pub fn token_text(&self, id: u32) -> String {
        match self.inner.decode(&[id], false) {
            Ok(text) if !text.is_empty() => text,
            _ => self.inner.id_to_token(id).unwrap_or_default(),
        }
    }

    /// Id of a token given its vocabulary string (e.g. `<|endoftext|>`).
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The bytes each id stands for, `size` entries (the model's padded vocabulary): a
    /// byte-level BPE token's bytes, an added token's text, a special token's text after
    /// llguidance's marker byte 0xFF (so it never counts as text), and nothing for ids the
    /// tokenizer does not have. An error for tokenizers that are not byte-level.
    pub fn token_bytes(&self, size: usize) -> Result<Vec<Vec<u8>>> {
        if !matches!(
            self.inner.get_decoder(),
            Some(tokenizers::decoders::DecoderWrapper::ByteLevel(_))
        ) {
            return Err(EngineError::Tokenizer(
                "structured outputs need a byte-level BPE tokenizer (as MPT's)".into(),
            ));
        }
        let unicode_to_byte = byte_level_alphabet();
        let mut out = vec![Vec::new(); size];
        for (piece, id) in self.inner.get_vocab(false) {
            let Some(slot) = out.get_mut(id as usize) else {
                continue;
            };
            *slot = piece
                .chars()
                .map(|c| unicode_to_byte.get(&c).copied())
                .collect::<Option<Vec<u8>>>()
                .ok_or_else(|| {
                    EngineError::Tokenizer(format!(
                        "token {id} ({piece:?}) is not in the byte-level alphabet"
                    ))
                })?;
        }
        for (id, added) in self.inner.get_added_tokens_decoder() {
            if let Some(slot) = out.get_mut(id as usize) {
                *slot = if added.special {
                    let mut bytes = vec![0xFF];
                    bytes.extend_from_slice(added.content.as_bytes());
                    bytes
                } else {
                    added.content.into_bytes()
                };
            }
        }
        Ok(out)
    }
}

/// GPT-2's byte-level alphabet, inverted: printable bytes stand for themselves, the other 68
/// bytes for the characters U+0100 onwards, in byte order.
fn byte_level_alphabet() -> std::collections::HashMap<char, u8> {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    let mut next = 0x100u32;
    (0..=255u8)
        .map(|b| {
            if printable(b) {
                (char::from(b), b)
            } else {
                let c = char::from_u32(next).expect("U+0100..U+0144 are chars: this is a bug");
                next += 1;
                (c, b)
            }
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The bundled demo model's tokenizer (the real GPT-NeoX-20B one).
    pub(crate) fn demo_tokenizer() -> Tokenizer {
        Tokenizer::from_bytes(crate::model::demo::TOKENIZER_JSON).expect("bundled tokenizer loads")
    }

    /// Texts that exercise byte-level BPE: punctuation, emoji and ZWJ sequences, CJK, runs of
    /// whitespace, accents.
    pub(crate) const TEXTS: &[&str] = &[
        "Hello, world! This is a test.",
        "emoji: 🦀🚀 and 👩‍👩‍👧 family",
        "中文测试：你好，世界。日本語もテスト。",
        "  leading spaces,\tand    runs   of spaces\n\nnewlines ",
        "mixed é ü ß 🤖 漢字 end",
    ];

    #[test]
    fn round_trip_and_no_special_tokens_added() {
        let tok = demo_tokenizer();
        for text in TEXTS {
            let ids = tok.encode(text).expect("encode");
            assert!(!ids.contains(&0), "no BOS/EOS added");
            assert_eq!(tok.decode(&ids).expect("decode"), *text);
        }
        assert_eq!(tok.token_to_id("<|endoftext|>"), Some(0));
        assert_eq!(tok.token_text(0), "<|endoftext|>");
        assert_eq!(
            tok.decode(&[0]).expect("decode"),
            "",
            "special tokens are skipped"
        );
    }

    #[test]
    fn token_bytes_concatenate_to_the_text() {
        let tok = demo_tokenizer();
        let bytes = tok.token_bytes(50432).expect("byte-level");
        assert_eq!(bytes.len(), 50432);
        for text in TEXTS {
            let ids = tok.encode(text).expect("encode");
            let joined: Vec<u8> = ids
                .iter()
                .flat_map(|&i| bytes[i as usize].clone())
                .collect();
            assert_eq!(String::from_utf8(joined).expect("utf-8"), *text);
        }
        assert_eq!(
            bytes[0],
            b"\xFF<|endoftext|>".to_vec(),
            "special tokens are marked"
        );
        assert!(bytes[50300].is_empty(), "padding ids have no bytes");
    }

    #[test]
    fn token_text_keeps_leading_spaces() {
        let tok = demo_tokenizer();
        assert_eq!(
            tok.token_text(tok.encode(" world").expect("encode")[0]),
            " world"
        );
    }
}
