//! The bundled demo checkpoint, compiled into the binary so the server runs with no model
//! directory: a tiny MPT trained on Shakespeare, with the real GPT-NeoX-20B tokenizer, made by
//! `tests/fixtures/train_demo.py` (model card: `assets/demo/README.md`).

/// The demo model's `config.json`.
pub const CONFIG_JSON: &str = include_str!("../../assets/demo/config.json");
/// The demo model's weights (safetensors).
pub static WEIGHTS: &[u8] = include_bytes!("../../assets/demo/model.safetensors");
/// The GPT-NeoX-20B tokenizer that MPT uses.
pub static TOKENIZER_JSON: &[u8] = include_bytes!("../../assets/demo/tokenizer.json");
