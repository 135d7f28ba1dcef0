//! Response bodies and stream chunks as the server sends them.
//!
//! Invariants: a full response (`text_completion`, `chat.completion`) always carries `usage`
//! and a non-null `finish_reason` per choice; a chunk carries `usage` only in the final usage
//! chunk (with no choices), and `finish_reason` is `null` until its choice ends; every field
//! that is always serialized is `required` in the schema.

use std::borrow::Cow;

use mpt_engine::FinishReason;
use serde::Serialize;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::{RefOr, schema::AdditionalProperties};
use utoipa::{PartialSchema, ToSchema};

use crate::error::ErrorBody;
use crate::openai::schema;

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
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq, ToSchema)]
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
#[derive(Debug, Clone, Default, Serialize, PartialEq, ToSchema)]
pub struct CompletionLogprobs {
    /// Token strings.
    pub tokens: Vec<String>,
    /// Their logprobs (`null` for the first prompt token).
    #[schema(required = true)]
    pub token_logprobs: Vec<Option<f32>>,
    /// Top alternatives per position, most likely first (`null` for the first prompt token).
    #[schema(required = true)]
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

impl PartialSchema for TopLogprobs {
    fn schema() -> RefOr<Schema> {
        let logprob = ObjectBuilder::new().schema_type(Type::Number);
        ObjectBuilder::new()
            .schema_type(Type::Object)
            .description(Some("token text → logprob, most likely first"))
            .additional_properties(Some(AdditionalProperties::RefOr(RefOr::T(Schema::Object(
                logprob.build(),
            )))))
            .into()
    }
}

impl ToSchema for TopLogprobs {}

/// One completion choice.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct CompletionChoice {
    /// Index, prompt-major.
    pub index: usize,
    /// Text (with the prompt when echo).
    pub text: String,
    /// Logprobs when requested.
    #[schema(required = true)]
    pub logprobs: Option<CompletionLogprobs>,
    /// `stop`, `length` or `abort`; `null` in stream chunks until the end.
    #[schema(schema_with = schema::completion_finish_reason, required = true)]
    pub finish_reason: Option<&'static str>,
}

/// A completion response (`text_completion`).
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct CompletionResponse {
    /// `cmpl-...`.
    pub id: String,
    /// `text_completion`.
    #[schema(schema_with = schema::text_completion)]
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// Choices.
    pub choices: Vec<CompletionChoice>,
    /// Tokens used.
    pub usage: UsageInfo,
}

/// One `data:` event of a completions stream.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct CompletionChunk {
    /// `cmpl-...`, the same in every chunk of a stream.
    pub id: String,
    /// `text_completion`.
    #[schema(schema_with = schema::text_completion)]
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// The choices this chunk adds to (none in the usage chunk).
    pub choices: Vec<CompletionChoice>,
    /// Only in the final chunk, with `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageInfo>,
}

/// One alternative in chat logprobs.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct ChatTopLogprob {
    /// Token text.
    pub token: String,
    /// Its logprob.
    pub logprob: f32,
    /// UTF-8 bytes of the token text.
    pub bytes: Vec<u8>,
}

/// Logprob of one chat output token.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
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
#[derive(Debug, Clone, Default, Serialize, PartialEq, ToSchema)]
pub struct ChatLogprobs {
    /// Per output token.
    pub content: Vec<ChatTokenLogprob>,
}

/// The increment of a chat choice in a stream chunk.
#[derive(Debug, Clone, Default, Serialize, PartialEq, ToSchema)]
pub struct ChatDelta {
    /// `assistant` (first delta of each choice only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = schema::assistant_role)]
    pub role: Option<&'static str>,
    /// More text.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    /// Pieces of tool calls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallDelta>>,
}

/// The full assistant message of a chat response.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct ChatFullMessage {
    /// `assistant`.
    #[schema(schema_with = schema::assistant_role)]
    pub role: &'static str,
    /// Text; `null` when the answer is only tool calls.
    #[schema(required = true)]
    pub content: Option<String>,
    /// The tools called, when any.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCall>>,
}

/// One tool call of a response.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct ToolCall {
    /// `call_...`.
    pub id: String,
    /// `function`.
    #[serde(rename = "type")]
    #[schema(schema_with = schema::function_type)]
    pub kind: &'static str,
    /// Name and arguments.
    pub function: FunctionCall,
}

/// The function of a [`ToolCall`].
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct FunctionCall {
    /// Function name.
    pub name: String,
    /// Arguments: a JSON object, as a string.
    pub arguments: String,
}

/// A piece of a tool call in a stream: the first piece of each call has `id`, `type` and
/// `function.name`, later ones pieces of `function.arguments`.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct ToolCallDelta {
    /// Which call of the choice (0, 1, ...).
    pub index: usize,
    /// `call_...` (first piece only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// `function` (first piece only).
    #[serde(rename = "type", skip_serializing_if = "Option::is_none")]
    #[schema(schema_with = schema::function_type)]
    pub kind: Option<&'static str>,
    /// Name and/or a piece of the arguments.
    pub function: FunctionCallDelta,
}

/// The function part of a [`ToolCallDelta`].
#[derive(Debug, Clone, Default, Serialize, PartialEq, ToSchema)]
pub struct FunctionCallDelta {
    /// Function name (first piece only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The next piece of the arguments.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

/// One choice of a chat response.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct ChatChoice {
    /// Index.
    pub index: usize,
    /// The answer.
    pub message: ChatFullMessage,
    /// Logprobs when requested.
    #[schema(required = true)]
    pub logprobs: Option<ChatLogprobs>,
    /// Why it ended.
    #[schema(schema_with = schema::chat_finish_reason, required = true)]
    pub finish_reason: Option<&'static str>,
}

/// One choice's increment in a chat stream chunk.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct ChatChunkChoice {
    /// Index.
    pub index: usize,
    /// What this chunk adds.
    pub delta: ChatDelta,
    /// Logprobs of the tokens this chunk adds, when requested.
    #[schema(required = true)]
    pub logprobs: Option<ChatLogprobs>,
    /// Why it ended; `null` until the choice's last chunk.
    #[schema(schema_with = schema::chat_finish_reason, required = true)]
    pub finish_reason: Option<&'static str>,
}

/// A chat response (`chat.completion`).
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct ChatCompletionResponse {
    /// `chatcmpl-...`.
    pub id: String,
    /// `chat.completion`.
    #[schema(schema_with = schema::chat_completion)]
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// Choices.
    pub choices: Vec<ChatChoice>,
    /// Tokens used.
    pub usage: UsageInfo,
}

/// One `data:` event of a chat stream (`chat.completion.chunk`).
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct ChatCompletionChunk {
    /// `chatcmpl-...`, the same in every chunk of a stream.
    pub id: String,
    /// `chat.completion.chunk`.
    #[schema(schema_with = schema::chat_completion_chunk)]
    pub object: &'static str,
    /// Unix seconds.
    pub created: u64,
    /// Served model name.
    pub model: String,
    /// The choices this chunk adds to (none in the usage chunk).
    pub choices: Vec<ChatChunkChoice>,
    /// Only in the final chunk, with `stream_options.include_usage`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<UsageInfo>,
}

/// One entry of `GET /v1/models`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelCard {
    /// Served name.
    pub id: String,
    /// `model`.
    #[schema(schema_with = schema::model_object)]
    pub object: &'static str,
    /// Unix seconds at startup.
    pub created: u64,
    /// Owner.
    pub owned_by: &'static str,
    /// Context length (vLLM extension).
    pub max_model_len: usize,
}

/// `GET /v1/models` response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    /// `list`.
    #[schema(schema_with = schema::list_object)]
    pub object: &'static str,
    /// The one served model.
    pub data: Vec<ModelCard>,
}

/// `POST /tokenize` response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct TokenizeResponse {
    /// Token count.
    pub count: usize,
    /// Context length.
    pub max_model_len: usize,
    /// Token ids.
    pub tokens: Vec<u32>,
}

/// `POST /detokenize` response.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct DetokenizeResponse {
    /// The text.
    pub prompt: String,
}

/// Registers `T` and what it references (what a derived `ToSchema::schemas` does for a field).
fn push_schema<T: ToSchema>(schemas: &mut Vec<(String, RefOr<Schema>)>) {
    schemas.push((T::name().into_owned(), T::schema()));
    T::schemas(schemas);
}

/// The events of a completions stream (`text/event-stream`): [`CompletionChunk`]s, an
/// [`ErrorBody`] if generation fails, then `[DONE]`. A schema only: the route sends the events.
pub struct CompletionStream;

impl PartialSchema for CompletionStream {
    fn schema() -> RefOr<Schema> {
        schema::stream_event(&CompletionChunk::name()).into()
    }
}

impl ToSchema for CompletionStream {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("CompletionStreamEvent")
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        push_schema::<CompletionChunk>(schemas);
        push_schema::<ErrorBody>(schemas);
    }
}

/// The events of a chat stream (`text/event-stream`): [`ChatCompletionChunk`]s (with tool-call
/// deltas when tools are called), an [`ErrorBody`] if generation fails, then `[DONE]`.
pub struct ChatStream;

impl PartialSchema for ChatStream {
    fn schema() -> RefOr<Schema> {
        schema::stream_event(&ChatCompletionChunk::name()).into()
    }
}

impl ToSchema for ChatStream {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("ChatStreamEvent")
    }

    fn schemas(schemas: &mut Vec<(String, RefOr<Schema>)>) {
        push_schema::<ChatCompletionChunk>(schemas);
        push_schema::<ErrorBody>(schemas);
    }
}
