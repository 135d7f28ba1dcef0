//! A checkpoint directory without weight files, for `--load-format dummy` tests: a fixture's
//! `config.json` and a generated word-level tokenizer. Shared by the engine's and the black-box
//! tests (the engine's `tests/load_format.rs` includes this file by path).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};

/// A word-level tokenizer covering ids `0..vocab_size` (`<|endoftext|>` = 0, then `w1`, `w2`,
/// ...), so every id a fixture model samples decodes.
pub fn tokenizer_json(vocab_size: usize) -> String {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<|endoftext|>".into(), 0.into());
    for id in 1..vocab_size {
        vocab.insert(format!("w{id}"), id.into());
    }
    serde_json::json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [{"id": 0, "content": "<|endoftext|>", "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": null,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<|endoftext|>"}
    })
    .to_string()
}

/// A fresh temporary directory with `fixture`'s `config.json` (unless `with_config` is false)
/// and a tokenizer for its vocabulary, but no weight files.
pub fn weightless_checkpoint(fixture: &Path, with_config: bool) -> PathBuf {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let dir = std::env::temp_dir().join(format!(
        "mpt-weightless-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::SeqCst)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("temp dir");
    let text = std::fs::read_to_string(fixture.join("config.json")).expect("fixture config.json");
    let config: serde_json::Value = serde_json::from_str(&text).expect("config.json is JSON");
    let vocab = config["vocab_size"].as_u64().expect("vocab_size") as usize;
    if with_config {
        std::fs::write(dir.join("config.json"), text).expect("write config.json");
    }
    std::fs::write(dir.join("tokenizer.json"), tokenizer_json(vocab)).expect("tokenizer.json");
    dir
}
