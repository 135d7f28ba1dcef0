//! OpenAI wire types (requests and responses) for completions, chat, models and vLLM's
//! tokenize/detokenize. Pure data: no validation here (that is `validation.rs`).
//!
//! Invariants: request fields whose JSON type varies (`prompt`, `stop`, message `content`,
//! `response_format`, `tools`, ...) are kept as `serde_json::Value` so validation can name the
//! field in a precise error; fields not declared here are refused or accepted by
//! [`super::fields`] before these types are built.

use std::collections::BTreeMap;

use mpt_engine::FinishReason;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    /// Send a final chunk with `usage` and no choices.
    #[serde(default)]
    pub include_usage: bool,
}

/// `POST /v1/completions` body.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct CompletionRequest {
    /// Model name (must match the served one when given).
    pub model: Option<String>,
    /// String, list of strings, list of token ids, or list of lists of ids.
    pub prompt: Option<Value>,
    /// Not supported: always a 400 when present.
    pub suffix: Option<Value>,
    /// Maximum tokens to generate (default 16).
    pub max_tokens: Option<i64>,
    /// Sampling temperature in [0, 2].
    pub temperature: Option<f64>,
    /// Nucleus mass in (0, 1].
    pub top_p: Option<f64>,
    /// Top-k (vLLM extension; -1 or 0 disables).
    pub top_k: Option<i64>,
    /// Min-p (vLLM extension) in [0, 1].
    pub min_p: Option<f64>,
    /// Completions per prompt.
    pub n: Option<i64>,
    /// Sequences generated per prompt (≥ n).
    pub best_of: Option<i64>,
    /// Stop string or up to 4 strings.
    pub stop: Option<Value>,
    /// Stream chunks as server-sent events.
    #[serde(default)]
    pub stream: Option<bool>,
    /// Stream options.
    pub stream_options: Option<StreamOptions>,
    /// Number of top logprobs (0–5).
    pub logprobs: Option<i64>,
    /// Include the prompt in text and logprobs.
    pub echo: Option<bool>,
    /// RNG seed.
    pub seed: Option<i64>,
    /// In [-2, 2].
    pub presence_penalty: Option<f64>,
    /// In [-2, 2].
    pub frequency_penalty: Option<f64>,
    /// > 0 (vLLM extension).
    pub repetition_penalty: Option<f64>,
    /// Token id (as a string key) → bias in [-100, 100].
    pub logit_bias: Option<BTreeMap<String, f64>>,
    /// End-user id (accepted, only logged).
    pub user: Option<String>,
    /// Keep going past EOS (vLLM extension).
    pub ignore_eos: Option<bool>,
    /// Minimum generated tokens before stopping (vLLM extension).
    pub min_tokens: Option<i64>,
    /// `{"type": "text" | "json_object" | "json_schema", ...}`.
    pub response_format: Option<Value>,
    /// vLLM's `{"json" | "regex" | "choice" | "grammar": ...}`.
    pub structured_outputs: Option<Value>,
}

/// One tool call of an assistant message in the conversation.
#[derive(Debug, Clone, Deserialize, Serialize)]
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
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct MessageFunctionCall {
    /// Function name.
    pub name: String,
    /// Its arguments as a JSON string (as OpenAI sends them back).
    #[serde(default)]
    pub arguments: Value,
}

/// One chat message.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct ChatMessage {
    /// `system`, `user`, `assistant`, ...
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
    /// Tool messages: the call this is the result of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
}

/// `POST /v1/chat/completions` body.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct ChatCompletionRequest {
    /// Model name.
    pub model: Option<String>,
    /// The conversation.
    pub messages: Option<Vec<ChatMessage>>,
    /// Maximum generated tokens (legacy name).
    pub max_tokens: Option<i64>,
    /// Maximum generated tokens (current name; wins over `max_tokens`).
    pub max_completion_tokens: Option<i64>,
    /// Sampling temperature in [0, 2].
    pub temperature: Option<f64>,
    /// Nucleus mass.
    pub top_p: Option<f64>,
    /// Top-k (vLLM extension).
    pub top_k: Option<i64>,
    /// Min-p (vLLM extension).
    pub min_p: Option<f64>,
    /// Choices.
    pub n: Option<i64>,
    /// Stop string(s).
    pub stop: Option<Value>,
    /// Stream as SSE.
    pub stream: Option<bool>,
    /// Stream options.
    pub stream_options: Option<StreamOptions>,
    /// Return logprobs of the output tokens.
    pub logprobs: Option<bool>,
    /// Alternatives per position (0–20).
    pub top_logprobs: Option<i64>,
    /// RNG seed.
    pub seed: Option<i64>,
    /// In [-2, 2].
    pub presence_penalty: Option<f64>,
    /// In [-2, 2].
    pub frequency_penalty: Option<f64>,
    /// > 0.
    pub repetition_penalty: Option<f64>,
    /// Token id → bias.
    pub logit_bias: Option<BTreeMap<String, f64>>,
    /// End-user id.
    pub user: Option<String>,
    /// Keep going past EOS.
    pub ignore_eos: Option<bool>,
    /// Minimum generated tokens.
    pub min_tokens: Option<i64>,
    /// `{"type": "text" | "json_object" | "json_schema", ...}`.
    pub response_format: Option<Value>,
    /// vLLM's `{"json" | "regex" | "choice" | "grammar": ...}`.
    pub structured_outputs: Option<Value>,
    /// `[{"type": "function", "function": {...}}]`.
    pub tools: Option<Value>,
    /// `none`, `auto`, `required` or `{"type": "function", "function": {"name": ...}}`.
    pub tool_choice: Option<Value>,
    /// Allow more than one call per answer (default true).
    pub parallel_tool_calls: Option<bool>,
}

/// OpenAI's `finish_reason` for an engine finish reason (also the `finished_reason` label of
/// vLLM's request metrics).
pub fn finish_reason(reason: FinishReason) -> &'static str {
    match reason {
        FinishReason::Stop => "stop",
        FinishReason::Length => "length",
        FinishReason::Abort => "abort",
    }
}

/// `usage`.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct UsageInfo {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Sum of both.
    pub total_tokens: usize,
}

impl UsageInfo {
    /// Builds usage from the two counts.
    pub fn new(prompt_tokens: usize, completion_tokens: usize) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens + completion_tokens,
        }
    }
}

/// Legacy completions logprobs.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct CompletionLogprobs {
    /// Token strings.
    pub tokens: Vec<String>,
    /// Their logprobs (`null` for the first prompt token).
    pub token_logprobs: Vec<Option<f32>>,
    /// Top alternatives per position, most likely first (`null` for the first prompt token).
    pub top_logprobs: Vec<Option<TopLogprobs>>,
    /// Character offset of each token in the choice text.
    pub text_offset: Vec<usize>,
}

/// One position's alternatives as a JSON object `{token: logprob}` whose keys come most likely
/// first, as OpenAI orders them (a map type would sort them by token text).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopLogprobs(pub Vec<(String, f32)>);

impl Serialize for TopLogprobs {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (token, logprob) in &self.0 {
            map.serialize_entry(token, logprob)?;
        }
        map.end()
    }
}

/// One completion choice.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CompletionChoice {
    /// Index, prompt-major.
    pub index: usize,
    /// Text (with the prompt when echo).
    pub text: String,
    /// Logprobs when requested.
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop`, `length` or `abort`; `null` in stream chunks until the end.
    pub finish_reason: Option<&'static str>,
}

/// A completion response or stream chunk.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct CompletionResponse {
    /// `cmpl-...`.
    pub id: String,
    /// `text_completion`.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// Choices.
    pub choices: Vec<CompletionChoice>,
    /// Usage (always in responses; in streams only the final chunk, when asked).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageInfo>,
}

/// One alternative in chat logprobs.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatTopLogprob {
    /// Token text.
    pub token: String,
    /// Its logprob.
    pub logprob: f32,
    /// UTF-8 bytes of the token text.
    pub bytes: Vec<u8>,
}

/// Logprob of one chat output token.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatTokenLogprob {
    /// Token text.
    pub token: String,
    /// Its logprob.
    pub logprob: f32,
    /// UTF-8 bytes of the token text.
    pub bytes: Vec<u8>,
    /// Alternatives.
    pub top_logprobs: Vec<ChatTopLogprob>,
}

/// Chat `logprobs` object.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ChatLogprobs {
    /// Per output token.
    pub content: Vec<ChatTokenLogprob>,
}

/// A stream delta of a chat choice.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct ChatResponseMessage {
    /// `assistant` (first stream delta only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'static str>,
    /// Text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Pieces of tool calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// The full assistant message of a chat response.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatFullMessage {
    /// `assistant`.
    pub role: &'static str,
    /// Text; `null` when the answer is only tool calls.
    pub content: Option<String>,
    /// The tools called, when any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// One tool call of a response.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ToolCall {
    /// `call_...`.
    pub id: String,
    /// `function`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    /// Name and arguments.
    pub function: FunctionCall,
}

/// The function of a [`ToolCall`].
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FunctionCall {
    /// Function name.
    pub name: String,
    /// Arguments: a JSON object, as a string.
    pub arguments: String,
}

/// A piece of a tool call in a stream: the first piece of each call has `id`, `type` and
/// `function.name`, later ones pieces of `function.arguments`.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ToolCallDelta {
    /// Which call of the choice (0, 1, ...).
    pub index: usize,
    /// `call_...` (first piece only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `function` (first piece only).
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    pub kind: Option<&'static str>,
    /// Name and/or a piece of the arguments.
    pub function: FunctionCallDelta,
}

/// The function part of a [`ToolCallDelta`].
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct FunctionCallDelta {
    /// Function name (first piece only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The next piece of the arguments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// One chat choice (`message` in responses, `delta` in chunks).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatChoice {
    /// Index.
    pub index: usize,
    /// Full message (responses).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<ChatFullMessage>,
    /// Increment (stream chunks).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delta: Option<ChatResponseMessage>,
    /// Logprobs when requested.
    pub logprobs: Option<ChatLogprobs>,
    /// Why it ended.
    pub finish_reason: Option<&'static str>,
}

/// A chat response (`chat.completion`) or chunk (`chat.completion.chunk`).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ChatCompletionResponse {
    /// `chatcmpl-...`.
    pub id: String,
    /// Object type.
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// Choices.
    pub choices: Vec<ChatChoice>,
    /// Usage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageInfo>,
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, Serialize)]
pub struct ModelCard {
    /// Served name.
    pub id: String,
    /// `model`.
    pub object: &'static str,
    /// Unix seconds at startup.
    pub created: u64,
    /// Owner.
    pub owned_by: &'static str,
    /// Context length (vLLM extension).
    pub max_model_len: usize,
}

/// `GET /v1/models` response.
#[derive(Debug, Clone, Serialize)]
pub struct ModelList {
    /// `list`.
    pub object: &'static str,
    /// The one served model.
    pub data: Vec<ModelCard>,
}

/// `POST /tokenize` body (vLLM): either `prompt` or chat `messages`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TokenizeRequest {
    /// Model name.
    pub model: Option<String>,
    /// Text to tokenize.
    pub prompt: Option<String>,
    /// Chat messages to render and tokenize instead.
    pub messages: Option<Vec<ChatMessage>>,
    /// With `messages`: append the assistant header (default true).
    pub add_generation_prompt: Option<bool>,
    /// Accepted for vLLM compatibility; MPT adds no special tokens.
    pub add_special_tokens: Option<bool>,
}

/// `POST /tokenize` response.
#[derive(Debug, Clone, Serialize)]
pub struct TokenizeResponse {
    /// Token count.
    pub count: usize,
    /// Context length.
    pub max_model_len: usize,
    /// Token ids.
    pub tokens: Vec<u32>,
}

/// `POST /detokenize` body.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct DetokenizeRequest {
    /// Model name.
    pub model: Option<String>,
    /// Token ids.
    pub tokens: Option<Vec<i64>>,
}

/// `POST /detokenize` response.
#[derive(Debug, Clone, Serialize)]
pub struct DetokenizeResponse {
    /// The text.
    pub prompt: String,
}
