//! Plain data types at the engine/server boundary. Nothing here knows about HTTP, OpenAI wire
//! formats or tensors: the server turns wire requests into a [`GenerateRequest`] and turns the
//! stream of [`Event`]s back into responses.

use std::time::Duration;

/// One generation request, already tokenized and validated by the server.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateRequest {
    /// Caller-chosen id, used in logs and traces.
    pub request_id: String,
    /// Prompt token ids (never empty).
    pub prompt_token_ids: Vec<u32>,
    /// How tokens are picked.
    pub sampling: SamplingParams,
    /// When generation ends.
    pub stop: StopConditions,
    /// Number of completions returned (≥ 1).
    pub n: usize,
    /// Number of sequences generated, the best `n` returned (≥ `n`). Results for
    /// `best_of > n` arrive only when the request finishes.
    pub best_of: usize,
    /// `Some(k)`: report the chosen token's logprob and the top `k` alternatives (k ≤ 20).
    pub logprobs: Option<usize>,
    /// `Some(k)`: report logprobs of every prompt token after the first, with `k` alternatives.
    pub prompt_logprobs: Option<usize>,
    /// `Some`: every choice's output must match this grammar (structured outputs).
    pub constraint: Option<Constraint>,
}

/// A grammar the output must match, as data. Compiled (and cached by its hash) when the
/// request is submitted; the sequence ends with [`FinishReason::Stop`] once its output is
/// complete and cannot be extended.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Constraint {
    /// A JSON Schema document (JSON text); the output is one JSON value valid against it.
    JsonSchema(String),
    /// A regular expression (Rust `regex` syntax) the whole output matches.
    Regex(String),
    /// The output is exactly one of these strings.
    Choice(Vec<String>),
    /// A context-free grammar in llguidance's Lark syntax (may embed `%json {...}` schemas).
    Lark(String),
}

/// Sampling parameters; the defaults are greedy decoding with no penalties.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy.
    pub temperature: f32,
    /// Keep only the `k` most likely tokens; 0 disables.
    pub top_k: usize,
    /// Nucleus sampling mass in (0, 1]; 1 disables.
    pub top_p: f32,
    /// Drop tokens with probability below `min_p` × the top probability; 0 disables.
    pub min_p: f32,
    /// OpenAI presence penalty in [-2, 2].
    pub presence_penalty: f32,
    /// OpenAI frequency penalty in [-2, 2].
    pub frequency_penalty: f32,
    /// CTRL-style repetition penalty (> 0, 1 disables), over prompt and output tokens.
    pub repetition_penalty: f32,
    /// Added to the logits of the given token ids before sampling.
    pub logit_bias: Vec<(u32, f32)>,
    /// Per-request RNG seed; `None` draws one at random.
    pub seed: Option<u64>,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            repetition_penalty: 1.0,
            logit_bias: Vec::new(),
            seed: None,
        }
    }
}

/// When a sequence stops.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct StopConditions {
    /// Maximum number of generated tokens (0 is allowed: prompt logprobs only).
    pub max_tokens: usize,
    /// EOS and stop tokens/strings are ignored until this many tokens were generated.
    pub min_tokens: usize,
    /// Do not stop at the model's EOS token.
    pub ignore_eos: bool,
    /// Extra token ids that end generation (e.g. `<|im_end|>` for chat).
    pub stop_token_ids: Vec<u32>,
    /// Strings that end generation; matched on the detokenized text, never returned.
    pub stop_strings: Vec<String>,
}

/// Why a choice finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FinishReason {
    /// EOS, a stop token or a stop string.
    Stop,
    /// `max_tokens` reached (or the context filled).
    Length,
    /// Aborted by the server (e.g. shutdown timeout).
    Abort,
}

/// Log-probability of one token plus the most likely alternatives at that position.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    /// The token that was chosen (or that stood in the prompt).
    pub token_id: u32,
    /// Its log-probability under the model's (unprocessed) distribution.
    pub logprob: f32,
    /// The top alternatives, most likely first: (token id, logprob).
    pub top: Vec<(u32, f32)>,
}

/// New output of one choice.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    /// Choice index in `0..n`.
    pub index: usize,
    /// Token ids produced since the last delta of this choice.
    pub token_ids: Vec<u32>,
    /// Text that can be shown now (held back while it may be the start of a stop string, or ends
    /// in an incomplete UTF-8 sequence).
    pub text: String,
    /// One entry per token id when logprobs were requested, else empty.
    pub logprobs: Vec<TokenLogprob>,
}

/// Token counts of a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    /// Prompt tokens (counted once, whatever `n` is).
    pub prompt_tokens: usize,
    /// Generated tokens over all returned choices.
    pub completion_tokens: usize,
}

/// Per-request timings measured on the engine thread.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Timings {
    /// From submission to first scheduling.
    pub queue: Duration,
    /// From first scheduling to the first token sampled (vLLM's `request_prefill_time`): the
    /// prompt's forward passes plus sampling (to its logits when `max_tokens` is 0); zero if
    /// the request never got that far.
    pub prefill: Duration,
    /// From submission to the first generated token.
    pub first_token: Option<Duration>,
    /// From submission to completion.
    pub total: Duration,
}

/// What the engine sends back for a request, in order: optional `PromptLogprobs`, any number of
/// `Delta` and `ChoiceFinished`, and finally exactly one `Completed` or `Failed`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Logprobs of the prompt tokens; the first entry is `None` (nothing precedes it).
    PromptLogprobs(Vec<Option<TokenLogprob>>),
    /// New tokens for one choice.
    Delta(Delta),
    /// One choice is done; exactly once per choice.
    ChoiceFinished {
        /// Choice index in `0..n`.
        index: usize,
        /// Why it stopped.
        reason: FinishReason,
    },
    /// The request is done; the last event.
    Completed {
        /// Token counts.
        usage: Usage,
        /// Engine-side timings.
        timings: Timings,
    },
    /// The request failed; the last event.
    Failed(Failure),
}

/// Why an accepted request failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Failure {
    /// Its constraint cannot go on: the grammar engine hit one of its limits (a grammar too
    /// large to follow) or rejected a token. The request's doing, not the server's.
    #[error("structured output: {0}")]
    Constraint(String),
    /// The step failed (the forward pass, detokenization): not the request's doing.
    #[error("{0}")]
    Internal(String),
}

/// Why a request was not accepted. Plain data with the numbers involved; the server words it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    /// The bounded submission queue is full; retry later.
    #[error("the request queue is full")]
    QueueFull,
    /// The engine is draining for shutdown.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// The engine thread has died.
    #[error("the engine has stopped")]
    EngineStopped,
    /// The prompt has no tokens.
    #[error("the prompt has no tokens")]
    EmptyPrompt,
    /// A prompt token id is outside the vocabulary.
    #[error("token id {token} is out of vocabulary (size {vocab_size})")]
    TokenOutOfVocabulary {
        /// The offending id.
        token: u32,
        /// Ids must be below this.
        vocab_size: usize,
    },
    /// Prompt plus completion are longer than the context.
    #[error("{prompt_tokens} + {max_tokens} tokens exceed the context of {max_model_len}")]
    ContextLength {
        /// Tokens in the prompt.
        prompt_tokens: usize,
        /// Tokens asked for the completion.
        max_tokens: usize,
        /// The longest prompt + completion accepted.
        max_model_len: usize,
    },
    /// `n` is 0, `best_of` is below `n`, or `best_of` sequences could never run at once.
    #[error("n = {n}, best_of = {best_of} (at most {max_sequences} sequences)")]
    ChoiceCount {
        /// Completions asked for.
        n: usize,
        /// Sequences asked for.
        best_of: usize,
        /// Most sequences the engine runs at once.
        max_sequences: usize,
    },
    /// More top logprobs than the engine reports.
    #[error("{requested} top logprobs asked for, at most {max}")]
    TooManyLogprobs {
        /// Which of the two kinds.
        of: LogprobsOf,
        /// Alternatives asked for.
        requested: usize,
        /// Most alternatives reported.
        max: usize,
    },
    /// The constraint does not compile (or needs a feature the grammar engine cannot honour,
    /// or exceeds its size and time limits).
    #[error("invalid constraint: {0}")]
    InvalidConstraint(String),
    /// A sampling parameter is outside its range.
    #[error("{param:?} = {value} is out of range")]
    SamplingOutOfRange {
        /// Which parameter.
        param: SamplingParam,
        /// The value given.
        value: f32,
    },
}

/// Which logprobs a [`SubmitError::TooManyLogprobs`] is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogprobsOf {
    /// Of generated tokens ([`GenerateRequest::logprobs`]).
    Output,
    /// Of prompt tokens ([`GenerateRequest::prompt_logprobs`]).
    Prompt,
}

/// A field of [`SamplingParams`] with a range, for [`SubmitError::SamplingOutOfRange`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SamplingParam {
    /// Must be ≥ 0.
    Temperature,
    /// Must be in (0, 1].
    TopP,
    /// Must be in [0, 1].
    MinP,
    /// Must be > 0.
    RepetitionPenalty,
}

/// Counters and gauges for metrics, read at any time from any thread.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct EngineStats {
    /// Requests waiting to be scheduled (including preempted ones).
    pub num_waiting: usize,
    /// Requests with at least one sequence running.
    pub num_running: usize,
    /// KV blocks in use (referenced by a live sequence).
    pub kv_blocks_used: usize,
    /// KV blocks in the pool.
    pub kv_blocks_total: usize,
    /// Total preemptions since start.
    pub num_preemptions: u64,
    /// Total prompt blocks looked up in the prefix cache.
    pub prefix_cache_queries: u64,
    /// Total prompt blocks found in the prefix cache.
    pub prefix_cache_hits: u64,
    /// Total prompt tokens of finished and running requests.
    pub prompt_tokens: u64,
    /// Total generated tokens.
    pub generation_tokens: u64,
    /// Token slots of one KV block (`kv_blocks_used * kv_block_size` slots are allocated).
    pub kv_block_size: usize,
    /// KV slots holding a computed position of a live sequence; a block shared by several
    /// sequences (prefix cache, forks) counts once. Allocated minus this is waste.
    pub kv_tokens_filled: usize,
    /// Speculative drafts verified since start.
    pub spec_decode_drafts: u64,
    /// Tokens in the drafts verified since start.
    pub spec_decode_draft_tokens: u64,
    /// Drafted tokens the model agreed with since start.
    pub spec_decode_accepted_tokens: u64,
}

/// Static facts about the loaded model that the server needs.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelInfo {
    /// Longest prompt + completion accepted, in tokens.
    pub max_model_len: usize,
    /// Rows of the embedding matrix (ids ≥ this are invalid).
    pub vocab_size: usize,
    /// The end-of-sequence token id.
    pub eos_token_id: u32,
    /// Directory the model was loaded from; `None` for the bundled demo model.
    pub model_dir: Option<std::path::PathBuf>,
    /// The `chat_template` from `tokenizer_config.json`, when present.
    pub chat_template: Option<String>,
    /// Element type of the KV cache: "f32", "f16" or "bf16".
    pub kv_cache_dtype: &'static str,
    /// Bytes of the whole KV pool (K and V, all layers).
    pub kv_cache_bytes: u64,
}

/// How far weight loading has got, reported after each tensor is read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadProgress {
    /// Tensors read so far.
    pub tensors_loaded: usize,
    /// Tensors in the checkpoint (at least `tensors_loaded`; equal to it for dummy weights).
    pub tensors_total: usize,
}
