//! The checks `submit` makes before a request enters the queue: what can never run is refused
//! at once, on the caller's thread, with the numbers involved (the server words them). The KV
//! pool always holds one `max_model_len` sequence (checked when it is sized), so a request
//! within the context limit always fits the cache.

use crate::api::types::{GenerateRequest, LogprobsOf, SamplingParam, SubmitError};
use crate::decode::sampler::MAX_TOP_LOGPROBS;

/// What `submit` checks a request against.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_model_len: usize,
    pub(crate) vocab_size: usize,
    pub(crate) max_num_seqs: usize,
    pub(crate) max_queue_size: usize,
}

/// Rejects what can never run.
pub(crate) fn validate(req: &GenerateRequest, limits: &Limits) -> Result<(), SubmitError> {
    let prompt_tokens = req.prompt_token_ids.len();
    let max_tokens = req.stop.max_tokens;
    if prompt_tokens == 0 {
        return Err(SubmitError::EmptyPrompt);
    }
    if let Some(&token) = req
        .prompt_token_ids
        .iter()
        .find(|&&t| t as usize >= limits.vocab_size)
    {
        return Err(SubmitError::TokenOutOfVocabulary {
            token,
            vocab_size: limits.vocab_size,
        });
    }
    if prompt_tokens + max_tokens > limits.max_model_len {
        return Err(SubmitError::ContextLength {
            prompt_tokens,
            max_tokens,
            max_model_len: limits.max_model_len,
        });
    }
    if req.n == 0 || req.best_of < req.n || req.best_of > limits.max_num_seqs {
        return Err(SubmitError::ChoiceCount {
            n: req.n,
            best_of: req.best_of,
            max_sequences: limits.max_num_seqs,
        });
    }
    for (value, of) in [
        (req.logprobs, LogprobsOf::Output),
        (req.prompt_logprobs, LogprobsOf::Prompt),
    ] {
        if let Some(requested) = value.filter(|&k| k > MAX_TOP_LOGPROBS) {
            return Err(SubmitError::TooManyLogprobs {
                of,
                requested,
                max: MAX_TOP_LOGPROBS,
            });
        }
    }
    let s = &req.sampling;
    let out_of_range = |param, value| Err(SubmitError::SamplingOutOfRange { param, value });
    // Range checks written so that NaN fails every one of them.
    if !(0.0..).contains(&s.temperature) {
        return out_of_range(SamplingParam::Temperature, s.temperature);
    }
    if !(s.top_p > 0.0 && s.top_p <= 1.0) {
        return out_of_range(SamplingParam::TopP, s.top_p);
    }
    if !(0.0..=1.0).contains(&s.min_p) {
        return out_of_range(SamplingParam::MinP, s.min_p);
    }
    if s.repetition_penalty.is_nan() || s.repetition_penalty <= 0.0 {
        return out_of_range(SamplingParam::RepetitionPenalty, s.repetition_penalty);
    }
    Ok(())
}
