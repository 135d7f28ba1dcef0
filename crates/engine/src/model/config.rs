//! The checkpoint's `config.json` ([`MptConfig`]) in mosaicml's format. Unsupported MPT options
//! are rejected here, at startup, naming the field.

use std::path::Path;

use serde::Deserialize;

use crate::api::error::{EngineError, Result};

/// `logit_scale` in `config.json`: absent/null, a number, or the string `"inv_sqrt_d_model"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum LogitScale {
    /// A fixed multiplier.
    Value(f64),
    /// A named rule; only `inv_sqrt_d_model` exists.
    Named(String),
}

/// The `attn_config` block of an MPT `config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct AttnConfig {
    /// ALiBi position biases (the only position scheme we support).
    pub alibi: bool,
    /// Largest ALiBi exponent; slopes are 2^(-i·max/m).
    pub alibi_bias_max: f64,
    /// Clamp the fused qkv projection to [-clip_qkv, clip_qkv].
    pub clip_qkv: Option<f64>,
    /// LayerNorm over the full width of q and k.
    pub qk_ln: bool,
    /// Attention softmax scale; `None` means 1/sqrt(head_dim).
    pub softmax_scale: Option<f64>,
    /// Prefix-LM attention (unsupported).
    pub prefix_lm: bool,
    /// Sequence-id masking (unsupported).
    pub attn_uses_sequence_id: bool,
    /// The kernel used in training; irrelevant for inference.
    pub attn_impl: Option<String>,
    /// Grouped-query attention (only `n_heads` is supported).
    pub kv_n_heads: Option<usize>,
    /// Rotary embeddings (unsupported).
    pub rope: bool,
    /// Attention type; only `multihead_attention` is supported.
    pub attn_type: Option<String>,
}

impl Default for AttnConfig {
    fn default() -> Self {
        Self {
            alibi: false,
            alibi_bias_max: 8.0,
            clip_qkv: None,
            qk_ln: false,
            softmax_scale: None,
            prefix_lm: false,
            attn_uses_sequence_id: false,
            attn_impl: None,
            kv_n_heads: None,
            rope: false,
            attn_type: None,
        }
    }
}

/// An MPT `config.json` (mosaicml field names). Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct MptConfig {
    /// Hidden width.
    pub d_model: usize,
    /// Attention heads.
    pub n_heads: usize,
    /// Decoder blocks.
    pub n_layers: usize,
    /// FFN width multiplier.
    pub expansion_ratio: f64,
    /// Training context length (may be raised at serve time).
    pub max_seq_len: usize,
    /// Embedding rows.
    pub vocab_size: usize,
    /// No biases anywhere (true in all released MPT checkpoints).
    pub no_bias: bool,
    /// `low_precision_layernorm` or `layernorm`; both are LayerNorm at inference.
    pub norm_type: String,
    /// LayerNorm epsilon.
    pub layer_norm_epsilon: f64,
    /// Multiplier applied to the logits.
    pub logit_scale: Option<LogitScale>,
    /// Learned absolute positions; ignored when ALiBi is on (as llm-foundry does).
    pub learned_pos_emb: bool,
    /// Output projection tied to `wte` (the only layout MPT ships).
    pub tie_word_embeddings: bool,
    /// Dtype the checkpoint was saved in.
    pub torch_dtype: Option<String>,
    /// Attention options.
    pub attn_config: AttnConfig,
    /// FFN options; only the plain MLP is supported.
    pub ffn_config: Option<serde_json::Value>,
}

impl Default for MptConfig {
    fn default() -> Self {
        Self {
            d_model: 2048,
            n_heads: 16,
            n_layers: 24,
            expansion_ratio: 4.0,
            max_seq_len: 2048,
            vocab_size: 50368,
            no_bias: false,
            norm_type: "low_precision_layernorm".into(),
            layer_norm_epsilon: 1e-5,
            logit_scale: None,
            learned_pos_emb: true,
            tie_word_embeddings: true,
            torch_dtype: None,
            attn_config: AttnConfig::default(),
            ffn_config: None,
        }
    }
}

impl MptConfig {
    /// Parses `config.json` text and validates it.
    pub fn from_json(text: &str) -> Result<Self> {
        let config: Self = serde_json::from_str(text)
            .map_err(|e| EngineError::config("config.json", e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Reads `DIR/config.json`.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|source| EngineError::Io {
            path: path.clone(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Rejects options we do not implement, naming the field.
    pub fn validate(&self) -> Result<()> {
        let attn = &self.attn_config;
        let check = |ok: bool, field: &str, message: &str| {
            if ok {
                Ok(())
            } else {
                Err(EngineError::config(field, message))
            }
        };
        check(self.d_model > 0, "d_model", "must be positive")?;
        check(self.n_heads > 0, "n_heads", "must be positive")?;
        check(self.n_layers > 0, "n_layers", "must be positive")?;
        check(self.vocab_size > 0, "vocab_size", "must be positive")?;
        check(self.max_seq_len > 0, "max_seq_len", "must be positive")?;
        check(
            self.d_model.is_multiple_of(self.n_heads),
            "n_heads",
            "d_model must be divisible by n_heads",
        )?;
        check(
            self.expansion_ratio > 0.0 && self.ffn_hidden_size() > 0,
            "expansion_ratio",
            "must be positive",
        )?;
        check(
            matches!(
                self.norm_type.as_str(),
                "low_precision_layernorm" | "layernorm"
            ),
            "norm_type",
            "only layernorm / low_precision_layernorm are supported",
        )?;
        check(
            self.tie_word_embeddings,
            "tie_word_embeddings",
            "only tied output embeddings are supported",
        )?;
        check(
            !attn.prefix_lm,
            "attn_config.prefix_lm",
            "prefix-LM attention is not supported",
        )?;
        check(
            !attn.attn_uses_sequence_id,
            "attn_config.attn_uses_sequence_id",
            "sequence-id attention masking is not supported",
        )?;
        check(
            !attn.rope,
            "attn_config.rope",
            "rotary position embeddings are not supported",
        )?;
        check(
            attn.alibi,
            "attn_config.alibi",
            "only ALiBi position encoding is supported (learned absolute positions are not)",
        )?;
        check(
            attn.kv_n_heads.is_none_or(|kv| kv == self.n_heads),
            "attn_config.kv_n_heads",
            "grouped-query attention is not supported (kv_n_heads must equal n_heads)",
        )?;
        check(
            attn.attn_type
                .as_deref()
                .is_none_or(|t| t == "multihead_attention"),
            "attn_config.attn_type",
            "only multihead_attention is supported",
        )?;
        check(
            attn.clip_qkv.is_none_or(|c| c > 0.0),
            "attn_config.clip_qkv",
            "must be positive",
        )?;
        if let Some(ffn) = &self.ffn_config {
            let kind = ffn
                .get("ffn_type")
                .and_then(|t| t.as_str())
                .unwrap_or("mptmlp");
            check(
                kind == "mptmlp",
                "ffn_config.ffn_type",
                "only the plain MPT MLP is supported",
            )?;
        }
        self.logit_scale_value().map(|_| ())
    }

    /// Per-head width.
    pub fn head_dim(&self) -> usize {
        self.d_model / self.n_heads
    }

    /// FFN inner width, `expansion_ratio · d_model`.
    pub fn ffn_hidden_size(&self) -> usize {
        (self.expansion_ratio * self.d_model as f64) as usize
    }

    /// Softmax scale applied to q·k.
    pub fn softmax_scale(&self) -> f64 {
        self.attn_config
            .softmax_scale
            .unwrap_or(1.0 / (self.head_dim() as f64).sqrt())
    }

    /// The logit multiplier, if any.
    pub fn logit_scale_value(&self) -> Result<Option<f64>> {
        match &self.logit_scale {
            None => Ok(None),
            Some(LogitScale::Value(v)) => Ok(Some(*v)),
            Some(LogitScale::Named(name)) if name == "inv_sqrt_d_model" => {
                Ok(Some(1.0 / (self.d_model as f64).sqrt()))
            }
            Some(LogitScale::Named(name)) => Err(EngineError::config(
                "logit_scale",
                format!("unknown value {name:?} (expected a number or \"inv_sqrt_d_model\")"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MPT_7B: &str = r#"{
      "architectures": ["MPTForCausalLM"],
      "attn_config": {"alibi": true, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0,
        "attn_type": "multihead_attention", "attn_uses_sequence_id": false, "clip_qkv": null,
        "prefix_lm": false, "qk_ln": false, "softmax_scale": null},
      "d_model": 4096, "emb_pdrop": 0, "embedding_fraction": 1.0, "expansion_ratio": 4,
      "init_device": "cpu", "learned_pos_emb": true, "logit_scale": null, "max_seq_len": 2048,
      "model_type": "mpt", "n_heads": 32, "n_layers": 32, "no_bias": true,
      "norm_type": "low_precision_layernorm", "resid_pdrop": 0, "tokenizer_name": "EleutherAI/gpt-neox-20b",
      "torch_dtype": "bfloat16", "vocab_size": 50432, "use_cache": false, "verbose": 0
    }"#;

    #[test]
    fn parses_real_mpt_7b_config() {
        let c = MptConfig::from_json(MPT_7B).expect("mpt-7b config parses");
        assert_eq!(
            (c.d_model, c.n_heads, c.n_layers, c.vocab_size),
            (4096, 32, 32, 50432)
        );
        assert_eq!(c.head_dim(), 128);
        assert_eq!(c.ffn_hidden_size(), 16384);
        assert!(c.no_bias && c.attn_config.alibi);
        assert_eq!(c.logit_scale_value().expect("valid"), None);
        assert!((c.softmax_scale() - 1.0 / 128f64.sqrt()).abs() < 1e-12);
    }

    fn with(field_path: &[&str], value: serde_json::Value) -> String {
        let mut v: serde_json::Value = serde_json::from_str(MPT_7B).expect("valid json");
        let mut cur = &mut v;
        for key in &field_path[..field_path.len() - 1] {
            cur = cur.get_mut(*key).expect("field exists");
        }
        cur[field_path[field_path.len() - 1]] = value;
        v.to_string()
    }

    #[test]
    fn unsupported_options_name_the_field() {
        let cases = [
            (
                vec!["attn_config", "prefix_lm"],
                serde_json::json!(true),
                "attn_config.prefix_lm",
            ),
            (
                vec!["attn_config", "attn_uses_sequence_id"],
                serde_json::json!(true),
                "attn_config.attn_uses_sequence_id",
            ),
            (
                vec!["attn_config", "alibi"],
                serde_json::json!(false),
                "attn_config.alibi",
            ),
            (
                vec!["attn_config", "rope"],
                serde_json::json!(true),
                "attn_config.rope",
            ),
            (
                vec!["logit_scale"],
                serde_json::json!("bogus"),
                "logit_scale",
            ),
            (vec!["n_heads"], serde_json::json!(7), "n_heads"),
        ];
        for (path, value, field) in cases {
            let err = MptConfig::from_json(&with(&path, value)).expect_err("must be rejected");
            match err {
                EngineError::Config { field: f, .. } => assert_eq!(f, field),
                other => panic!("unexpected error {other}"),
            }
        }
    }

    #[test]
    fn logit_scale_forms() {
        let named = MptConfig::from_json(&with(
            &["logit_scale"],
            serde_json::json!("inv_sqrt_d_model"),
        ))
        .expect("valid");
        assert!((named.logit_scale_value().expect("ok").expect("set") - 1.0 / 64.0).abs() < 1e-12);
        let number =
            MptConfig::from_json(&with(&["logit_scale"], serde_json::json!(0.5))).expect("valid");
        assert_eq!(number.logit_scale_value().expect("ok"), Some(0.5));
    }
}
