//! The checks `submit` makes before a request enters the queue: what can never run is refused
//! at once, on the caller's thread, with the numbers involved.

use crate::api::types::{GenerateRequest, SubmitError};
use crate::decode::sampler::MAX_TOP_LOGPROBS;
use crate::sched::sequence::blocks_for;

/// What `submit` checks a request against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_model_len: usize,
    pub(crate) vocab_size: usize,
    pub(crate) num_blocks: usize,
    pub(crate) block_size: usize,
    pub(crate) max_queue_size: usize,
}

fn invalid(message: String, param: &str, code: Option<&str>) -> SubmitError {
    SubmitError::Invalid {
        message,
        param: Some(param.to_string()),
        code: code.map(str::to_string),
    }
}

/// Rejects what can never run, with vLLM's wording for the context limit.
pub(crate) fn validate(req: &GenerateRequest, limits: &Limits) -> Result<(), SubmitError> {
    let p = req.prompt_token_ids.len();
    let m = req.stop.max_tokens;
    if p == 0 {
        return Err(invalid(
            "the prompt must contain at least one token".into(),
            "prompt",
            None,
        ));
    }
    if let Some(&bad) = req
        .prompt_token_ids
        .iter()
        .find(|&&t| t as usize >= limits.vocab_size)
    {
        return Err(invalid(
            format!(
                "token id {bad} is out of vocabulary (vocab size {})",
                limits.vocab_size
            ),
            "prompt",
            None,
        ));
    }
    if p + m > limits.max_model_len {
        return Err(invalid(
            format!(
                "This model's maximum context length is {} tokens. However, you requested {} tokens ({p} in the prompt, {m} for the completion). Please reduce the length of the prompt or completion.",
                limits.max_model_len,
                p + m
            ),
            if m == 0 { "prompt" } else { "max_tokens" },
            Some("context_length_exceeded"),
        ));
    }
    let needed = blocks_for(p + m, limits.block_size);
    if needed > limits.num_blocks {
        return Err(invalid(
            format!(
                "the request needs {} tokens of KV cache ({p} in the prompt, {m} for the completion) but the whole cache holds {}",
                p + m,
                limits.num_blocks * limits.block_size
            ),
            "max_tokens",
            Some("context_length_exceeded"),
        ));
    }
    if req.n == 0 {
        return Err(invalid("n must be at least 1".into(), "n", None));
    }
    if req.best_of < req.n {
        return Err(invalid(
            format!("best_of ({}) must be at least n ({})", req.best_of, req.n),
            "best_of",
            None,
        ));
    }
    for (value, param) in [
        (req.logprobs, "logprobs"),
        (req.prompt_logprobs, "prompt_logprobs"),
    ] {
        if value.is_some_and(|k| k > MAX_TOP_LOGPROBS) {
            return Err(invalid(
                format!("{param} must be at most {MAX_TOP_LOGPROBS}"),
                param,
                None,
            ));
        }
    }
    let s = &req.sampling;
    if !(s.temperature >= 0.0
        && s.top_p > 0.0
        && s.top_p <= 1.0
        && s.min_p >= 0.0
        && s.min_p <= 1.0)
    {
        return Err(invalid(
            "temperature must be ≥ 0, top_p in (0, 1], min_p in [0, 1]".into(),
            "temperature",
            None,
        ));
    }
    if s.repetition_penalty <= 0.0 {
        return Err(invalid(
            "repetition_penalty must be > 0".into(),
            "repetition_penalty",
            None,
        ));
    }
    Ok(())
}
