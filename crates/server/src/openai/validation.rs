//! Wire request → validated engine request(s). Pure functions of the request and a
//! [`ValidationContext`]; nothing is submitted here.
//!
//! Invariants: every rejection is an [`ApiError::Invalid`] (or `ModelNotFound`) whose `param`
//! names the OpenAI field at fault; every `GenerateRequest` produced has a non-empty prompt of
//! in-vocabulary ids and `prompt + max_tokens ≤ max_model_len`.

use mpt_engine::Tokenizer;
use mpt_engine::{Constraint, GenerateRequest, SamplingParams, StopConditions};
use serde_json::Value;

use crate::error::ApiError;
use crate::openai::structured::requested_output;
use crate::openai::tools::ToolPlan;
use crate::openai::types::{ChatCompletionRequest, CompletionRequest};

/// Largest `n`/`best_of` accepted.
pub const MAX_N: usize = 128;
/// Largest `logprobs` for completions (OpenAI's limit).
pub const MAX_COMPLETION_LOGPROBS: usize = 5;
/// Largest `top_logprobs` for chat (OpenAI's limit).
pub const MAX_CHAT_TOP_LOGPROBS: usize = 20;
/// Most stop strings (OpenAI's limit).
pub const MAX_STOP_STRINGS: usize = 4;
/// Default `max_tokens` for completions (OpenAI's default).
pub const DEFAULT_MAX_TOKENS: usize = 16;

/// What validation needs to know about the served model.
pub struct ValidationContext<'a> {
    /// Name clients must use in `model`.
    pub model_name: &'a str,
    /// Longest prompt + completion.
    pub max_model_len: usize,
    /// Ids ≥ this are invalid.
    pub vocab_size: usize,
    /// The model's tokenizer.
    pub tokenizer: &'a Tokenizer,
    /// Extra stop token for chat (`<|im_end|>` when the vocabulary has it).
    pub chat_stop_token: Option<u32>,
}

/// A prompt as the client sent it.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptInput {
    /// Text (encoded by the tokenizer).
    Text(String),
    /// Token ids as given.
    Ids(Vec<u32>),
}

/// A validated completions request: one engine request per prompt plus response options.
#[derive(Debug, Clone)]
pub struct ValidatedCompletion {
    /// One per prompt, in prompt order; `request_id` is `{id}-{prompt index}`.
    pub requests: Vec<GenerateRequest>,
    /// The prompts' text (for `echo`): the given text, or the decoded ids.
    pub prompt_texts: Vec<String>,
    /// Choices per prompt.
    pub n: usize,
    /// Include the prompt in the output.
    pub echo: bool,
    /// Top logprobs per position, when requested.
    pub logprobs: Option<usize>,
    /// Stream as SSE.
    pub stream: bool,
    /// Final usage chunk in streams.
    pub include_usage: bool,
    /// The field the requests' constraint comes from, when they have one.
    pub constraint_param: Option<&'static str>,
}

/// A validated chat request.
#[derive(Debug, Clone)]
pub struct ValidatedChat {
    /// The engine request.
    pub request: GenerateRequest,
    /// Choices.
    pub n: usize,
    /// Output-token logprobs with this many alternatives, when requested.
    pub logprobs: Option<usize>,
    /// Stream as SSE.
    pub stream: bool,
    /// Final usage chunk in streams.
    pub include_usage: bool,
    /// The field the request's constraint comes from, when it has one.
    pub constraint_param: Option<&'static str>,
    /// Tool calls are parsed out of the answer.
    pub tools: bool,
}

fn bad(param: &str, message: impl Into<String>) -> ApiError {
    ApiError::invalid(param, message)
}

/// Unknown model names are 404; an absent `model` means the served one.
pub fn check_model(model: Option<&str>, ctx_name: &str) -> Result<(), ApiError> {
    match model {
        Some(m) if m != ctx_name => Err(ApiError::ModelNotFound(m.to_string())),
        _ => Ok(()),
    }
}

fn token_id(v: &Value, vocab_size: usize, param: &str) -> Result<u32, ApiError> {
    let id = v.as_i64().ok_or_else(|| {
        bad(
            param,
            format!("{param} must contain token ids (integers), got {v}"),
        )
    })?;
    if id < 0 || id as u64 >= vocab_size as u64 {
        return Err(bad(
            param,
            format!("token id {id} in {param} is outside the vocabulary [0, {vocab_size})"),
        ));
    }
    Ok(id as u32)
}

fn id_list(items: &[Value], vocab_size: usize, param: &str) -> Result<Vec<u32>, ApiError> {
    if items.is_empty() {
        return Err(bad(param, format!("{param} must not be empty")));
    }
    items
        .iter()
        .map(|v| token_id(v, vocab_size, param))
        .collect()
}

/// Parses the four accepted `prompt` forms.
pub fn parse_prompt(
    prompt: Option<&Value>,
    vocab_size: usize,
) -> Result<Vec<PromptInput>, ApiError> {
    let shape = "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids";
    let text = |s: &str| {
        if s.is_empty() {
            Err(bad("prompt", "prompt must not be empty"))
        } else {
            Ok(PromptInput::Text(s.to_string()))
        }
    };
    match prompt {
        None | Some(Value::Null) => Err(bad("prompt", "prompt is required")),
        Some(Value::String(s)) => Ok(vec![text(s)?]),
        Some(Value::Array(items)) => match items.first() {
            None => Err(bad("prompt", "prompt must not be empty")),
            Some(Value::String(_)) => items
                .iter()
                .map(|v| {
                    v.as_str()
                        .ok_or_else(|| bad("prompt", shape))
                        .and_then(text)
                })
                .collect(),
            Some(Value::Number(_)) => Ok(vec![PromptInput::Ids(id_list(
                items, vocab_size, "prompt",
            )?)]),
            Some(Value::Array(_)) => items
                .iter()
                .map(|v| match v {
                    Value::Array(ids) => Ok(PromptInput::Ids(id_list(ids, vocab_size, "prompt")?)),
                    _ => Err(bad("prompt", shape)),
                })
                .collect(),
            Some(_) => Err(bad("prompt", shape)),
        },
        Some(_) => Err(bad("prompt", shape)),
    }
}

/// Parses `stop`: a string or a list of up to four non-empty strings.
pub fn parse_stop(stop: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let list = match stop {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| bad("stop", "stop must be a string or a list of strings"))
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(bad("stop", "stop must be a string or a list of strings")),
    };
    if list.len() > MAX_STOP_STRINGS {
        return Err(bad(
            "stop",
            format!(
                "stop accepts at most {MAX_STOP_STRINGS} strings, got {}",
                list.len()
            ),
        ));
    }
    if list.iter().any(String::is_empty) {
        return Err(bad("stop", "stop strings must not be empty"));
    }
    Ok(list)
}

fn in_range(
    param: &str,
    value: Option<f64>,
    lo: f64,
    hi: f64,
    default: f64,
) -> Result<f32, ApiError> {
    let v = value.unwrap_or(default);
    if !(lo..=hi).contains(&v) {
        return Err(bad(
            param,
            format!("{param} must be in [{lo}, {hi}], got {v}"),
        ));
    }
    Ok(v as f32)
}

/// Sampling-related fields shared by completions and chat.
struct Common<'a> {
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    min_p: Option<f64>,
    presence_penalty: Option<f64>,
    frequency_penalty: Option<f64>,
    repetition_penalty: Option<f64>,
    logit_bias: Option<&'a std::collections::BTreeMap<String, f64>>,
    seed: Option<i64>,
}

fn sampling(c: &Common<'_>, vocab_size: usize) -> Result<SamplingParams, ApiError> {
    let top_p = c.top_p.unwrap_or(1.0);
    if !(top_p > 0.0 && top_p <= 1.0) {
        return Err(bad(
            "top_p",
            format!("top_p must be in (0, 1], got {top_p}"),
        ));
    }
    let top_k = match c.top_k.unwrap_or(0) {
        -1 | 0 => 0,
        k if k > 0 => k as usize,
        k => {
            return Err(bad(
                "top_k",
                format!("top_k must be -1 (disabled) or positive, got {k}"),
            ));
        }
    };
    let repetition_penalty = c.repetition_penalty.unwrap_or(1.0);
    if !(repetition_penalty > 0.0 && repetition_penalty.is_finite()) {
        return Err(bad(
            "repetition_penalty",
            format!("repetition_penalty must be > 0, got {repetition_penalty}"),
        ));
    }
    let mut logit_bias = Vec::new();
    for (key, &bias) in c.logit_bias.into_iter().flatten() {
        let id: u32 = key
            .parse()
            .ok()
            .filter(|&id: &u32| (id as usize) < vocab_size)
            .ok_or_else(|| {
                bad(
                    "logit_bias",
                    format!("logit_bias key {key:?} is not a token id in [0, {vocab_size})"),
                )
            })?;
        if !(-100.0..=100.0).contains(&bias) {
            return Err(bad(
                "logit_bias",
                format!("logit_bias value for token {id} must be in [-100, 100], got {bias}"),
            ));
        }
        logit_bias.push((id, bias as f32));
    }
    Ok(SamplingParams {
        temperature: in_range("temperature", c.temperature, 0.0, 2.0, 1.0)?,
        top_k,
        top_p: top_p as f32,
        min_p: in_range("min_p", c.min_p, 0.0, 1.0, 0.0)?,
        presence_penalty: in_range("presence_penalty", c.presence_penalty, -2.0, 2.0, 0.0)?,
        frequency_penalty: in_range("frequency_penalty", c.frequency_penalty, -2.0, 2.0, 0.0)?,
        repetition_penalty: repetition_penalty as f32,
        logit_bias,
        seed: c.seed.map(|s| s as u64),
    })
}

fn count(
    param: &str,
    value: Option<i64>,
    default: usize,
    min: usize,
    max: usize,
) -> Result<usize, ApiError> {
    let v = value.unwrap_or(default as i64);
    if v < min as i64 || v > max as i64 {
        return Err(bad(
            param,
            format!("{param} must be in [{min}, {max}], got {v}"),
        ));
    }
    Ok(v as usize)
}

fn check_context(
    prompt_len: usize,
    max_tokens: usize,
    max_model_len: usize,
) -> Result<(), ApiError> {
    if prompt_len + max_tokens > max_model_len {
        return Err(ApiError::Invalid {
            message: format!(
                "This model's maximum context length is {max_model_len} tokens. However, you requested {} tokens ({prompt_len} in the prompt, {max_tokens} for the completion). Please reduce the length of the prompt or max_tokens.",
                prompt_len + max_tokens
            ),
            param: Some(
                if prompt_len >= max_model_len {
                    "prompt"
                } else {
                    "max_tokens"
                }
                .to_string(),
            ),
            code: Some("context_length_exceeded".into()),
        });
    }
    Ok(())
}

fn encode(tokenizer: &Tokenizer, text: &str, param: &str) -> Result<Vec<u32>, ApiError> {
    let ids = tokenizer
        .encode(text)
        .map_err(|e| ApiError::Internal(format!("tokenizer failed: {e}")))?;
    if ids.is_empty() {
        return Err(bad(param, format!("{param} encodes to no tokens")));
    }
    Ok(ids)
}

/// Validates a completions request into one engine request per prompt.
pub fn validate_completion(
    req: &CompletionRequest,
    ctx: &ValidationContext<'_>,
    request_id: &str,
) -> Result<ValidatedCompletion, ApiError> {
    check_model(req.model.as_deref(), ctx.model_name)?;
    if req.suffix.as_ref().is_some_and(|s| !s.is_null()) {
        return Err(bad("suffix", "suffix is not supported by this server"));
    }
    let prompts = parse_prompt(req.prompt.as_ref(), ctx.vocab_size)?;
    // No upper bound of its own: an oversized max_tokens is a context-length error, reported
    // below with the numbers (as vLLM does).
    let max_tokens = count(
        "max_tokens",
        req.max_tokens,
        DEFAULT_MAX_TOKENS,
        0,
        u32::MAX as usize,
    )?;
    let n = count("n", req.n, 1, 1, MAX_N)?;
    let best_of = count("best_of", req.best_of, n, 1, MAX_N)?;
    if best_of < n {
        return Err(bad(
            "best_of",
            format!("best_of must be ≥ n, got best_of={best_of}, n={n}"),
        ));
    }
    let stream = req.stream.unwrap_or(false);
    if stream && best_of > n {
        return Err(bad("best_of", "best_of > n is not supported with stream"));
    }
    let logprobs = match req.logprobs {
        None => None,
        Some(k) => Some(count("logprobs", Some(k), 0, 0, MAX_COMPLETION_LOGPROBS)?),
    };
    let echo = req.echo.unwrap_or(false);
    let min_tokens = count("min_tokens", req.min_tokens, 0, 0, max_tokens)?;
    let common = Common {
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        min_p: req.min_p,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        repetition_penalty: req.repetition_penalty,
        logit_bias: req.logit_bias.as_ref(),
        seed: req.seed,
    };
    let sampling = sampling(&common, ctx.vocab_size)?;
    let output = requested_output(
        req.response_format.as_ref(),
        req.structured_outputs.as_ref(),
    )?;
    let constraint = output.as_ref().map(|o| o.spec.to_constraint());
    let stop = StopConditions {
        max_tokens,
        min_tokens,
        ignore_eos: req.ignore_eos.unwrap_or(false),
        stop_token_ids: Vec::new(),
        stop_strings: parse_stop(req.stop.as_ref())?,
    };
    let mut requests = Vec::with_capacity(prompts.len());
    let mut prompt_texts = Vec::with_capacity(prompts.len());
    for (i, prompt) in prompts.into_iter().enumerate() {
        let (ids, text) = match prompt {
            PromptInput::Text(text) => (encode(ctx.tokenizer, &text, "prompt")?, text),
            PromptInput::Ids(ids) => {
                let text = if echo {
                    ctx.tokenizer
                        .decode(&ids)
                        .map_err(|e| ApiError::Internal(format!("decode failed: {e}")))?
                } else {
                    String::new()
                };
                (ids, text)
            }
        };
        check_context(ids.len(), max_tokens, ctx.max_model_len)?;
        requests.push(GenerateRequest {
            request_id: format!("{request_id}-{i}"),
            prompt_token_ids: ids,
            sampling: sampling.clone(),
            stop: stop.clone(),
            n,
            best_of,
            logprobs,
            prompt_logprobs: if echo { logprobs } else { None },
            constraint: constraint.clone(),
        });
        prompt_texts.push(text);
    }
    Ok(ValidatedCompletion {
        requests,
        prompt_texts,
        n,
        echo,
        logprobs,
        stream,
        include_usage: stream && req.stream_options.as_ref().is_some_and(|o| o.include_usage),
        constraint_param: output.map(|o| o.param),
    })
}

/// Validates a chat request whose messages were already rendered to `prompt` by the template
/// (with `tools` described, when the model may call them).
pub fn validate_chat(
    req: &ChatCompletionRequest,
    ctx: &ValidationContext<'_>,
    request_id: &str,
    prompt: &str,
    tools: Option<&ToolPlan>,
) -> Result<ValidatedChat, ApiError> {
    let output = requested_output(
        req.response_format.as_ref(),
        req.structured_outputs.as_ref(),
    )?;
    let (constraint, constraint_param) = match (tools, output) {
        (Some(plan), output) => (
            Some(Constraint::Lark(
                plan.grammar(output.as_ref().map(|o| &o.spec)),
            )),
            Some("tools"),
        ),
        (None, Some(o)) => (Some(o.spec.to_constraint()), Some(o.param)),
        (None, None) => (None, None),
    };
    let ids = encode(ctx.tokenizer, prompt, "messages")?;
    let room = ctx.max_model_len.saturating_sub(ids.len());
    let (param, value) = match (req.max_completion_tokens, req.max_tokens) {
        (Some(v), _) => ("max_completion_tokens", Some(v)),
        (None, v) => ("max_tokens", v),
    };
    let max_tokens = match value {
        None => room,
        Some(v) => count(param, Some(v), 0, 1, u32::MAX as usize)?,
    };
    if ids.len() >= ctx.max_model_len || max_tokens > room {
        check_context(ids.len(), max_tokens.max(1), ctx.max_model_len)?;
    }
    let n = count("n", req.n, 1, 1, MAX_N)?;
    let logprobs = if req.logprobs.unwrap_or(false) {
        Some(count(
            "top_logprobs",
            req.top_logprobs,
            0,
            0,
            MAX_CHAT_TOP_LOGPROBS,
        )?)
    } else if req.top_logprobs.is_some_and(|k| k > 0) {
        return Err(bad("top_logprobs", "top_logprobs requires logprobs: true"));
    } else {
        None
    };
    let common = Common {
        temperature: req.temperature,
        top_p: req.top_p,
        top_k: req.top_k,
        min_p: req.min_p,
        presence_penalty: req.presence_penalty,
        frequency_penalty: req.frequency_penalty,
        repetition_penalty: req.repetition_penalty,
        logit_bias: req.logit_bias.as_ref(),
        seed: req.seed,
    };
    let mut stop_strings = parse_stop(req.stop.as_ref())?;
    stop_strings.push("<|im_end|>".to_string());
    let stream = req.stream.unwrap_or(false);
    Ok(ValidatedChat {
        request: GenerateRequest {
            request_id: request_id.to_string(),
            prompt_token_ids: ids,
            sampling: sampling(&common, ctx.vocab_size)?,
            stop: StopConditions {
                max_tokens,
                min_tokens: count("min_tokens", req.min_tokens, 0, 0, max_tokens)?,
                ignore_eos: req.ignore_eos.unwrap_or(false),
                stop_token_ids: ctx.chat_stop_token.into_iter().collect(),
                stop_strings,
            },
            n,
            best_of: n,
            logprobs,
            prompt_logprobs: None,
            constraint,
        },
        n,
        logprobs,
        stream,
        include_usage: stream && req.stream_options.as_ref().is_some_and(|o| o.include_usage),
        constraint_param,
        tools: tools.is_some(),
    })
}

#[cfg(test)]
#[path = "validation_tests.rs"]
mod tests;
