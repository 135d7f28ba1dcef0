//! Helpers shared by the engine's integration tests.

use mpt_engine::{GenerateRequest, SamplingParams, StopConditions};

/// A greedy one-choice request for exactly `max_tokens` tokens (EOS ignored).
pub fn request(prompt: Vec<u32>, max_tokens: usize) -> GenerateRequest {
    GenerateRequest {
        request_id: "t".into(),
        prompt_token_ids: prompt,
        sampling: SamplingParams::default(),
        stop: StopConditions {
            max_tokens,
            ignore_eos: true,
            ..Default::default()
        },
        n: 1,
        best_of: 1,
        logprobs: None,
        prompt_logprobs: None,
        constraint: None,
    }
}
