//! `--speculative-config`, spelt as vLLM spells it: a JSON object on the command line and in
//! `MPT_SERVER_SPECULATIVE_CONFIG`, a table under `speculative_config` in the TOML file. Only
//! the `ngram` method exists here; any other is refused at start-up, naming what is supported.
//!
//! Invariants: unknown keys are refused (a key we do not act on is never silently ignored);
//! the lookup bounds default as vLLM's do (neither given: both 5; one given: the other equal
//! to it); `num_speculative_tokens` is required; ranges are the engine's to check.

use mpt_engine::NgramSpeculation;
use serde::Deserialize;

/// The methods `--speculative-config` accepts.
pub const SUPPORTED_METHODS: [&str; 1] = ["ngram"];

/// Lookup length when neither bound is given (vLLM's default).
const DEFAULT_LOOKUP: usize = 5;

/// The keys of a speculative configuration, as given.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SpeculativeSpec {
    /// The drafting method; only `ngram`.
    pub method: Option<String>,
    /// Most tokens drafted per sequence and step.
    pub num_speculative_tokens: Option<usize>,
    /// Longest suffix looked up.
    pub prompt_lookup_max: Option<usize>,
    /// Shortest suffix looked up.
    pub prompt_lookup_min: Option<usize>,
    /// Draft only while fewer sequences than this decode.
    pub disable_by_batch_size: Option<usize>,
}

impl SpeculativeSpec {
    /// Parses the JSON object of the flag (or env var).
    pub fn from_json(text: &str) -> Result<Self, String> {
        serde_json::from_str(text).map_err(|e| {
            format!(
                "{e} (expected e.g. '{{\"method\":\"ngram\",\"num_speculative_tokens\":4,\
                 \"prompt_lookup_max\":3,\"prompt_lookup_min\":1}}')"
            )
        })
    }

    /// The engine's settings for this configuration.
    pub fn resolve(&self) -> Result<NgramSpeculation, String> {
        match self.method.as_deref() {
            Some("ngram") => {}
            Some(other) => {
                return Err(format!(
                    "method {other:?} is not supported (supported: {})",
                    SUPPORTED_METHODS.join(", ")
                ));
            }
            None => return Err("needs a \"method\" (supported: ngram)".into()),
        }
        let num_speculative_tokens = self
            .num_speculative_tokens
            .ok_or("needs \"num_speculative_tokens\" (tokens drafted per step)")?;
        let (prompt_lookup_min, prompt_lookup_max) =
            match (self.prompt_lookup_min, self.prompt_lookup_max) {
                (None, None) => (DEFAULT_LOOKUP, DEFAULT_LOOKUP),
                (Some(min), None) => (min, min),
                (None, Some(max)) => (max, max),
                (Some(min), Some(max)) => (min, max),
            };
        let settings = NgramSpeculation {
            num_speculative_tokens,
            prompt_lookup_max,
            prompt_lookup_min,
            disable_by_batch_size: self.disable_by_batch_size,
        };
        settings
            .check()
            .map_err(|(field, why)| format!("{field} {why}"))?;
        Ok(settings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(json: &str) -> Result<NgramSpeculation, String> {
        SpeculativeSpec::from_json(json)?.resolve()
    }

    #[test]
    fn vllms_spelling_resolves_with_its_defaults() {
        let full = r#"{"method":"ngram","num_speculative_tokens":4,"prompt_lookup_max":3,"prompt_lookup_min":1}"#;
        assert_eq!(
            resolve(full),
            Ok(NgramSpeculation {
                num_speculative_tokens: 4,
                prompt_lookup_max: 3,
                prompt_lookup_min: 1,
                disable_by_batch_size: None,
            })
        );
        let bounds = |json: &str| resolve(json).map(|s| (s.prompt_lookup_min, s.prompt_lookup_max));
        let k = r#""method":"ngram","num_speculative_tokens":2"#;
        assert_eq!(bounds(&format!("{{{k}}}")), Ok((5, 5)));
        assert_eq!(
            bounds(&format!("{{{k},\"prompt_lookup_max\":4}}")),
            Ok((4, 4))
        );
        assert_eq!(
            bounds(&format!("{{{k},\"prompt_lookup_min\":2}}")),
            Ok((2, 2))
        );
    }

    #[test]
    fn what_cannot_be_honoured_is_refused_by_name() {
        for (json, needle) in [
            (
                r#"{"method":"eagle","num_speculative_tokens":4}"#,
                "\"eagle\" is not supported",
            ),
            (r#"{"num_speculative_tokens":4}"#, "needs a \"method\""),
            (r#"{"method":"ngram"}"#, "num_speculative_tokens"),
            (
                r#"{"method":"ngram","num_speculative_tokens":4,"draft_tensor_parallel_size":1}"#,
                "draft_tensor_parallel_size",
            ),
            (
                r#"{"method":"ngram","num_speculative_tokens":4,"disable_by_batch_size":0}"#,
                "disable_by_batch_size must",
            ),
            (
                r#"{"method":"ngram","num_speculative_tokens":0}"#,
                "num_speculative_tokens must",
            ),
            (
                r#"{"method":"ngram","num_speculative_tokens":4,"prompt_lookup_min":4,"prompt_lookup_max":2}"#,
                "prompt_lookup_max must",
            ),
            (
                r#"{"method":"ngram","num_speculative_tokens":-1}"#,
                "num_speculative_tokens",
            ),
            ("ngram", "expected e.g."),
        ] {
            let err = resolve(json).expect_err(json);
            assert!(err.contains(needle), "{json}: {err}");
        }
    }
}
