//! The tokenizer a GGUF file carries (`tokenizer.ggml.*`), rebuilt as a Hugging Face
//! `tokenizers` BPE: `tokenizer.ggml.model = "gpt2"` (GPT-2 byte-level BPE, as MPT's GPT-NeoX-20B
//! tokenizer is), `tokens` (byte-level strings, by id), `token_type` (1 normal, 3 control,
//! 4 user-defined, 5 unused padding), `merges` ("left right").
//!
//! Invariant: the rebuilt tokenizer gives the ids of the `tokenizer.json` the file was converted
//! from: normal tokens form the BPE vocabulary at their ids; control tokens become special added
//! tokens and user-defined ones normalized added tokens, at their ids, as GPT-NeoX declares
//! them; unused padding ids stay empty. Normalization is NFC and pre-tokenization byte-level
//! without a prefix space, as in GPT-NeoX-20B's `tokenizer.json`.

use std::collections::HashMap;

use candle_core::quantized::gguf_file::Value;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{AddedToken, Tokenizer as HfTokenizer};

use crate::api::error::{EngineError, Result};
use crate::tokenizer::Tokenizer;

/// llama.cpp's token types (`llama_token_type`).
const NORMAL: i32 = 1;
const CONTROL: i32 = 3;
const USER_DEFINED: i32 = 4;
const UNUSED: i32 = 5;

fn bad(message: impl Into<String>) -> EngineError {
    EngineError::Tokenizer(format!("GGUF tokenizer metadata: {}", message.into()))
}

fn strings<'a>(metadata: &'a HashMap<String, Value>, key: &str) -> Result<Vec<&'a str>> {
    let list = metadata
        .get(key)
        .ok_or_else(|| bad(format!("`{key}` is missing")))?
        .to_vec()
        .map_err(|e| bad(format!("`{key}`: {e}")))?;
    list.iter()
        .map(|v| {
            v.to_string()
                .map(String::as_str)
                .map_err(|e| bad(format!("`{key}`: {e}")))
        })
        .collect()
}

/// Rebuilds the tokenizer from a GGUF file's metadata.
pub(crate) fn tokenizer_from_gguf(metadata: &HashMap<String, Value>) -> Result<Tokenizer> {
    match metadata.get("tokenizer.ggml.model") {
        Some(Value::String(m)) if m == "gpt2" => {}
        Some(Value::String(m)) => {
            return Err(bad(format!(
                "tokenizer model `{m}`; only GPT-2 style byte-level BPE (\"gpt2\", what MPT uses) \
                 can be rebuilt: pass --tokenizer with the model's tokenizer.json"
            )));
        }
        _ => return Err(bad("`tokenizer.ggml.model` is missing")),
    }
    let tokens = strings(metadata, "tokenizer.ggml.tokens")?;
    let types: Vec<i32> = match metadata.get("tokenizer.ggml.token_type") {
        None => vec![NORMAL; tokens.len()],
        Some(v) => v
            .to_vec()
            .map_err(|e| bad(e.to_string()))?
            .iter()
            .map(|t| t.to_i32().map_err(|e| bad(format!("token_type: {e}"))))
            .collect::<Result<_>>()?,
    };
    if types.len() != tokens.len() {
        return Err(bad(format!(
            "{} tokens but {} token types",
            tokens.len(),
            types.len()
        )));
    }
    let merges: Vec<(String, String)> = strings(metadata, "tokenizer.ggml.merges")?
        .into_iter()
        .map(|m| {
            m.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .ok_or_else(|| bad(format!("merge {m:?} is not two tokens")))
        })
        .collect::<Result<_>>()?;
    let mut vocab = Vocab::default();
    let (mut special, mut added) = (Vec::new(), Vec::new());
    for (id, (&token, &kind)) in tokens.iter().zip(&types).enumerate() {
        let id = id as u32;
        match kind {
            UNUSED => continue,
            CONTROL => special.push(AddedToken::from(token, true).normalized(false)),
            USER_DEFINED => added.push(AddedToken::from(token, false).normalized(true)),
            _ => {}
        }
        vocab.insert(token.to_string(), id);
    }
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .build()
        .map_err(|e| bad(format!("BPE model: {e}")))?;
    let mut tok = HfTokenizer::new(bpe);
    tok.with_normalizer(Some(NFC))
        .map_err(|e| bad(e.to_string()))?;
    tok.with_pre_tokenizer(Some(ByteLevel::new(false, true, true)));
    tok.with_post_processor(Some(ByteLevel::new(false, true, true)));
    tok.with_decoder(Some(ByteLevel::new(false, true, true)));
    tok.add_special_tokens(special)
        .map_err(|e| bad(e.to_string()))?;
    tok.add_tokens(added).map_err(|e| bad(e.to_string()))?;
    Ok(Tokenizer::from_hf(tok))
}
