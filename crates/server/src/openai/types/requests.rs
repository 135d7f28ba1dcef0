//! Request bodies as clients send them: completions, chat, vLLM's tokenize/detokenize.
//!
//! Invariants: fields whose JSON type varies (`prompt`, `stop`, message `content`,
//! `response_format`, `tools`, ...) are kept as `serde_json::Value` so validation can name the
//! field in a precise error, and carry their JSON schema from [`crate::openai::schema`]; every
//! numeric range in a `#[schema]` attribute (literals: the attribute takes no constants) is the
//! one `validation.rs` enforces, which the document's tests check bound by bound; fields not
//! declared here are refused or accepted by [`crate::openai::fields`] before these types are
//! built.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;
use utoipa::openapi::{RefOr, schema::Schema};
use utoipa::{PartialSchema, ToSchema};

use super::integer;
use crate::openai::schema;

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct StreamOptions {
    /// Send a final chunk with `usage` and no choices.
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/completions` body.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct CompletionRequest {
    /// Model name (must match the served one when given).
    pub model: Option<String>,
    /// String, list of strings, list of token ids, or list of lists of ids.
    #[schema(schema_with = schema::prompt, required = true)]
    pub prompt: Option<Value>,
    /// Not supported: always a 400 when present (and not `null`).
    #[schema(schema_with = schema::always_null)]
    pub suffix: Option<Value>,
    /// Maximum tokens to generate (default 16); prompt + `max_tokens` must fit the context.
    #[schema(minimum = 0, maximum = 4294967295_i64)]
    #[serde(default, deserialize_with = "integer::option")]
    pub max_tokens: Option<i64>,
    /// Sampling temperature in [0, 2] (default 1; 0 is greedy).
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f64>,
    /// Nucleus mass in (0, 1] (default 1).
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    /// Top-k (vLLM extension; -1 or 0 disables).
    #[schema(minimum = -1)]
    #[serde(default, deserialize_with = "integer::option")]
    pub top_k: Option<i64>,
    /// Min-p (vLLM extension) in [0, 1].
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub min_p: Option<f64>,
    /// Completions per prompt (default 1; at most `--max-num-seqs`).
    #[schema(minimum = 1, maximum = 128)]
    #[serde(default, deserialize_with = "integer::option")]
    pub n: Option<i64>,
    /// Sequences generated per prompt (≥ n; at most `--max-num-seqs`; not with `stream`).
    #[schema(minimum = 1, maximum = 128)]
    #[serde(default, deserialize_with = "integer::option")]
    pub best_of: Option<i64>,
    /// Stop string or up to 4 strings.
    #[schema(schema_with = schema::stop)]
    pub stop: Option<Value>,
    /// Stream chunks as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Stream options.
    pub stream_options: Option<StreamOptions>,
    /// Number of top logprobs (0–5).
    #[schema(minimum = 0, maximum = 5)]
    #[serde(default, deserialize_with = "integer::option")]
    pub logprobs: Option<i64>,
    /// Include the prompt in text and logprobs.
    pub echo: Option<bool>,
    /// RNG seed.
    #[serde(default, deserialize_with = "integer::option")]
    pub seed: Option<i64>,
    /// In [-2, 2].
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub presence_penalty: Option<f64>,
    /// In [-2, 2].
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub frequency_penalty: Option<f64>,
    /// > 0 (vLLM extension).
    #[schema(exclusive_minimum = 0.0)]
    pub repetition_penalty: Option<f64>,
    /// Token id (as a string key) → bias in [-100, 100].
    #[schema(schema_with = schema::logit_bias)]
    pub logit_bias: Option<BTreeMap<String, f64>>,
    /// End-user id (accepted, only logged).
    pub user: Option<String>,
    /// Keep going past EOS (vLLM extension).
    pub ignore_eos: Option<bool>,
    /// Minimum generated tokens before stopping, at most `max_tokens` (vLLM extension).
    #[schema(minimum = 0)]
    #[serde(default, deserialize_with = "integer::option")]
    pub min_tokens: Option<i64>,
    /// `{"type": "text" | "json_object" | "json_schema", ...}`.
    #[schema(schema_with = schema::response_format)]
    pub response_format: Option<Value>,
    /// vLLM's `{"json" | "regex" | "choice" | "grammar": ...}`.
    #[schema(schema_with = schema::structured_outputs)]
    pub structured_outputs: Option<Value>,
}

/// One tool call of an assistant message in the conversation.
#[derive(Debug, Clone, Deserialize, serde::Serialize, ToSchema)]
pub struct MessageToolCall {
    /// `call_...`.
    #[serde(default)]
    pub id: Option<String>,
    /// `function`.
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    /// The call.
    pub function: MessageFunctionCall,
}

/// The function of a [`MessageToolCall`].
#[derive(Debug, Clone, Deserialize, serde::Serialize, ToSchema)]
pub struct MessageFunctionCall {
    /// Function name.
    pub name: String,
    /// Its arguments: a JSON string (as OpenAI sends them back) or the JSON value itself.
    #[serde(default)]
    #[schema(value_type = Value)]
    pub arguments: Value,
}

/// One chat message.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, `tool` or `developer`.
    pub role: String,
    /// A string or a list of `{"type": "text", "text": ...}` parts.
    #[serde(default)]
    pub content: Value,
    /// Optional speaker name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Assistant messages: the tools it called.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<MessageToolCall>>,
    /// Tool messages (required there, non-empty): the call this is the result of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// Which fields a message may carry depends on its role (`messages::check_messages`), which a
/// derived schema cannot say: one object per group of roles.
impl PartialSchema for ChatMessage {
    fn schema() -> RefOr<Schema> {
        schema::chat_message(&MessageToolCall::name()).into()
    }
}

impl ToSchema for ChatMessage {
    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        schemas.push((
            MessageToolCall::name().into_owned(),
            MessageToolCall::schema(),
        ));
        MessageToolCall::schemas(schemas);
    }
}

/// `POST /v1/chat/completions` body.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct ChatCompletionRequest {
    /// Model name.
    pub model: Option<String>,
    /// The conversation.
    #[schema(min_items = 1, required = true)]
    pub messages: Option<Vec<ChatMessage>>,
    /// Maximum generated tokens (legacy name; default: the rest of the context).
    #[schema(minimum = 1, maximum = 4294967295_i64)]
    #[serde(default, deserialize_with = "integer::option")]
    pub max_tokens: Option<i64>,
    /// Maximum generated tokens (current name; wins over `max_tokens`).
    #[schema(minimum = 1, maximum = 4294967295_i64)]
    #[serde(default, deserialize_with = "integer::option")]
    pub max_completion_tokens: Option<i64>,
    /// Sampling temperature in [0, 2].
    #[schema(minimum = 0.0, maximum = 2.0)]
    pub temperature: Option<f64>,
    /// Nucleus mass in (0, 1].
    #[schema(exclusive_minimum = 0.0, maximum = 1.0)]
    pub top_p: Option<f64>,
    /// Top-k (vLLM extension; -1 or 0 disables).
    #[schema(minimum = -1)]
    #[serde(default, deserialize_with = "integer::option")]
    pub top_k: Option<i64>,
    /// Min-p (vLLM extension) in [0, 1].
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub min_p: Option<f64>,
    /// Choices (at most `--max-num-seqs`).
    #[schema(minimum = 1, maximum = 128)]
    #[serde(default, deserialize_with = "integer::option")]
    pub n: Option<i64>,
    /// Stop string or up to 4 strings.
    #[schema(schema_with = schema::stop)]
    pub stop: Option<Value>,
    /// Stream as SSE.
    pub stream: Option<bool>,
    /// Stream options.
    pub stream_options: Option<StreamOptions>,
    /// Return logprobs of the output tokens.
    pub logprobs: Option<bool>,
    /// Alternatives per position (0–20); more than 0 needs `logprobs: true`.
    #[schema(minimum = 0, maximum = 20)]
    #[serde(default, deserialize_with = "integer::option")]
    pub top_logprobs: Option<i64>,
    /// RNG seed.
    #[serde(default, deserialize_with = "integer::option")]
    pub seed: Option<i64>,
    /// In [-2, 2].
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub presence_penalty: Option<f64>,
    /// In [-2, 2].
    #[schema(minimum = -2.0, maximum = 2.0)]
    pub frequency_penalty: Option<f64>,
    /// > 0 (vLLM extension).
    #[schema(exclusive_minimum = 0.0)]
    pub repetition_penalty: Option<f64>,
    /// Token id (as a string key) → bias in [-100, 100].
    #[schema(schema_with = schema::logit_bias)]
    pub logit_bias: Option<BTreeMap<String, f64>>,
    /// End-user id (accepted, only logged).
    pub user: Option<String>,
    /// Keep going past EOS (vLLM extension).
    pub ignore_eos: Option<bool>,
    /// Minimum generated tokens, at most the maximum (vLLM extension).
    #[schema(minimum = 0)]
    #[serde(default, deserialize_with = "integer::option")]
    pub min_tokens: Option<i64>,
    /// `{"type": "text" | "json_object" | "json_schema", ...}`.
    #[schema(schema_with = schema::response_format)]
    pub response_format: Option<Value>,
    /// vLLM's `{"json" | "regex" | "choice" | "grammar": ...}`.
    #[schema(schema_with = schema::structured_outputs)]
    pub structured_outputs: Option<Value>,
    /// `[{"type": "function", "function": {...}}]`.
    #[schema(schema_with = schema::tools)]
    pub tools: Option<Value>,
    /// `none`, `auto`, `required` or `{"type": "function", "function": {"name": ...}}`.
    #[schema(schema_with = schema::tool_choice)]
    pub tool_choice: Option<Value>,
    /// Allow more than one call per answer (default true).
    pub parallel_tool_calls: Option<bool>,
}

/// `POST /tokenize` body (vLLM): exactly one of `prompt` and `messages`.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct TokenizeRequest {
    /// Model name.
    pub model: Option<String>,
    /// Text to tokenize.
    pub prompt: Option<String>,
    /// Chat messages to render and tokenize instead.
    #[schema(min_items = 1)]
    pub messages: Option<Vec<ChatMessage>>,
    /// With `messages`: append the assistant header (default true).
    pub add_generation_prompt: Option<bool>,
    /// Accepted for vLLM compatibility; MPT adds no special tokens.
    pub add_special_tokens: Option<bool>,
}

/// `POST /detokenize` body.
#[derive(Debug, Clone, Default, Deserialize, ToSchema)]
pub struct DetokenizeRequest {
    /// Model name.
    pub model: Option<String>,
    /// Token ids, each below the vocabulary size.
    #[schema(required = true, value_type = Vec<u32>)]
    #[serde(default, deserialize_with = "integer::option_list")]
    pub tokens: Option<Vec<i64>>,
}
