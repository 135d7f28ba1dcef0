//! Structured outputs, compile side: the token environment llguidance works on, built from our
//! tokenizer's byte-level vocabulary and sized to the model's padded vocabulary, and the
//! [`GrammarCompiler`] that turns a [`Constraint`] into a [`Grammar`], cached by the
//! constraint's hash.
//!
//! Invariants: ids the tokenizer does not have (padding rows of the embedding) have no bytes,
//! so no mask ever allows them; special tokens are never text, only EOS ends a grammar;
//! compilation runs on the caller's thread, never the engine thread, and is bounded by
//! llguidance's limits ([`ParserLimits`]: grammar size, lexer fuel, lexer states), so a hostile
//! grammar becomes an error rather than a stall; failures are cached like successes, so the
//! same hostile grammar is not compiled twice; at most [`CACHE_CAPACITY`] results are kept,
//! the least recently used evicted first.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::{TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
use llguidance::{JsonCompileOptions, Matcher, ParserFactory};
use serde_json::Value;

use crate::api::types::Constraint;
use crate::tokenizer::Tokenizer;

/// Most compiled grammars (or compile errors) kept.
pub const CACHE_CAPACITY: usize = 128;

/// The JSON layout every schema constraint produces: no optional whitespace, `,` and `:` as
/// separators. A small model cannot then wander off into whitespace, and outputs are short.
fn json_options() -> JsonCompileOptions {
    JsonCompileOptions {
        whitespace_flexible: false,
        ..JsonCompileOptions::default()
    }
}

/// `schema` with this engine's JSON layout applied, as llguidance reads it (for schemas that
/// are embedded in a Lark grammar with `%json`; [`Constraint::JsonSchema`] gets it anyway).
pub fn with_json_layout(schema: &Value) -> Value {
    let mut schema = match schema {
        Value::Bool(true) => Value::Object(Default::default()),
        other => other.clone(),
    };
    if schema.is_object() {
        json_options().apply_to(&mut schema);
    }
    schema
}

/// `regex` as a Lark regex literal (`/.../`, slashes escaped), to embed in a larger grammar.
pub fn lark_regex(regex: &str) -> String {
    format!("/{}/", llguidance::regex_to_lark(regex, ""))
}

/// The token environment: our tokenizer's bytes in a trie, EOS the model's.
struct TokenEnv {
    trie: TokTrie,
    tokenizer: Tokenizer,
}

impl TokenizerEnv for TokenEnv {
    fn tok_trie(&self) -> &TokTrie {
        &self.trie
    }

    fn tokenize_bytes(&self, bytes: &[u8]) -> Vec<TokenId> {
        match std::str::from_utf8(bytes)
            .ok()
            .map(|s| self.tokenizer.encode(s))
        {
            Some(Ok(ids)) => ids,
            // Not UTF-8 on its own (a cut character): the trie's greedy split is exact too.
            _ => self.trie.greedy_tokenize(bytes),
        }
    }
}

/// A compiled grammar, ready to start sequences from.
pub struct Grammar {
    /// Fresh matcher state; every sequence starts from a deep copy (its own lexer cache, so
    /// sequences of one grammar compute masks in parallel without sharing a lock).
    template: Mutex<Matcher>,
}

impl std::fmt::Debug for Grammar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grammar").finish_non_exhaustive()
    }
}

impl Grammar {
    /// A new matcher at the start of the grammar.
    pub(crate) fn start(&self) -> Matcher {
        self.template
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .deep_clone()
    }
}

type Compiled = Result<Arc<Grammar>, String>;

#[derive(Default)]
struct Cache {
    entries: HashMap<Constraint, (Compiled, u64)>,
    clock: u64,
}

/// Compiles constraints for one model's vocabulary; shared by every submitting thread.
pub struct GrammarCompiler {
    tokenizer: Tokenizer,
    vocab_size: usize,
    eos: u32,
    /// Built on first use: the trie and llguidance's token slices take a moment.
    factory: OnceLock<Result<ParserFactory, String>>,
    cache: Mutex<Cache>,
}

impl std::fmt::Debug for GrammarCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GrammarCompiler")
            .field("vocab_size", &self.vocab_size)
            .finish_non_exhaustive()
    }
}

impl GrammarCompiler {
    /// A compiler for masks of `vocab_size` ids (the model's padded vocabulary) ending at `eos`.
    pub fn new(tokenizer: Tokenizer, vocab_size: usize, eos: u32) -> Self {
        Self {
            tokenizer,
            vocab_size,
            eos,
            factory: OnceLock::new(),
            cache: Mutex::new(Cache::default()),
        }
    }

    fn factory(&self) -> Result<&ParserFactory, String> {
        self.factory
            .get_or_init(|| {
                let started = Instant::now();
                let words = self
                    .tokenizer
                    .token_bytes(self.vocab_size)
                    .map_err(|e| e.to_string())?;
                let info = TokRxInfo::new(self.vocab_size as u32, self.eos);
                let env: TokEnv = Arc::new(TokenEnv {
                    trie: TokTrie::from(&info, &words),
                    tokenizer: self.tokenizer.clone(),
                });
                let mut factory = ParserFactory::new_simple(&env).map_err(|e| e.to_string())?;
                factory.quiet();
                tracing::info!(
                    ms = started.elapsed().as_millis() as u64,
                    vocab = self.vocab_size,
                    "structured outputs ready"
                );
                Ok(factory)
            })
            .as_ref()
            .map_err(Clone::clone)
    }

    /// The compiled grammar of `constraint`, from the cache or compiled now (on this thread;
    /// it may take milliseconds, so async callers run it on a blocking thread).
    pub fn compile(&self, constraint: &Constraint) -> Result<Arc<Grammar>, String> {
        {
            let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
            cache.clock += 1;
            let now = cache.clock;
            if let Some((compiled, used)) = cache.entries.get_mut(constraint) {
                *used = now;
                return compiled.clone();
            }
        }
        let started = Instant::now();
        let compiled = self.compile_uncached(constraint).map(Arc::new);
        tracing::debug!(
            ms = started.elapsed().as_secs_f64() * 1e3,
            ok = compiled.is_ok(),
            "grammar compiled"
        );
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.entries.len() >= CACHE_CAPACITY
            && let Some(oldest) = cache
                .entries
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(k, _)| k.clone())
        {
            cache.entries.remove(&oldest);
        }
        let now = cache.clock;
        cache
            .entries
            .insert(constraint.clone(), (compiled.clone(), now));
        compiled
    }

    fn compile_uncached(&self, constraint: &Constraint) -> Result<Grammar, String> {
        let factory = self.factory()?;
        let grammar = match constraint {
            Constraint::JsonSchema(text) => {
                let schema: Value = serde_json::from_str(text)
                    .map_err(|e| format!("the schema is not valid JSON: {e}"))?;
                if !(schema.is_object() || schema.is_boolean()) {
                    return Err("a JSON schema must be an object".into());
                }
                TopLevelGrammar::from_json_schema(with_json_layout(&schema))
            }
            Constraint::Regex(regex) => TopLevelGrammar::from_regex(regex),
            Constraint::Choice(choices) => TopLevelGrammar::from_lark(choice_grammar(choices)?),
            Constraint::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        };
        let parser = factory.create_parser(grammar).map_err(|e| e.to_string())?;
        let mut matcher = Matcher::new(Ok(parser));
        // The first mask too is bounded by the per-step limits: a grammar whose very first
        // step is too costly fails here, as a bad request, rather than in the engine.
        matcher.compute_mask().map_err(|e| e.to_string())?;
        Ok(Grammar {
            template: Mutex::new(matcher),
        })
    }
}

/// Lark for "exactly one of these strings" (string literals are JSON-escaped).
fn choice_grammar(choices: &[String]) -> Result<String, String> {
    if choices.is_empty() || choices.iter().any(String::is_empty) {
        return Err("choices must be a non-empty list of non-empty strings".into());
    }
    let alternatives: Vec<String> = choices
        .iter()
        .map(|c| serde_json::to_string(c).expect("a string serializes: this is a bug"))
        .collect();
    Ok(format!("start: {}\n", alternatives.join(" | ")))
}

#[cfg(test)]
#[path = "grammar_tests.rs"]
mod tests;
