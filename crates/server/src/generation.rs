//! Submits validated engine requests and merges their event streams into one, tagged by
//! prompt; records the per-request metrics and writes the request's one log line.
//!
//! Invariants: a [`Generation`] owns the engine event receivers, so dropping it (client gone,
//! handler cancelled) cancels every engine request it submitted and frees their KV blocks; it
//! also owns the [`Admission`], so the in-flight count drops exactly when it does; exactly one
//! log line is written per generation, in `Drop`, with the tokens actually produced (also for a
//! cancelled one); every engine request is counted once in the finished-requests metric, those
//! cancelled by the client as `abort`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures::stream::{BoxStream, SelectAll, StreamExt};
use mpt_engine::{Delta, Event, Failure, FinishReason, GenerateRequest, TokenLogprob, Usage};
use tokio_stream::wrappers::UnboundedReceiverStream;

use crate::error::ApiError;
use crate::state::{Admission, AppState, Loaded};

/// One event of a merged generation.
#[derive(Debug)]
pub enum Item {
    /// Prompt logprobs of prompt `prompt`.
    PromptLogprobs {
        /// Prompt index.
        prompt: usize,
        /// One per prompt token; the first is `None`.
        logprobs: Vec<Option<TokenLogprob>>,
    },
    /// New output of a choice of prompt `prompt`.
    Delta {
        /// Prompt index.
        prompt: usize,
        /// The engine's delta (its `index` is within the prompt's choices).
        delta: Delta,
    },
    /// A choice ended.
    ChoiceFinished {
        /// Prompt index.
        prompt: usize,
        /// Choice index within the prompt.
        index: usize,
        /// Why.
        reason: FinishReason,
    },
    /// The engine request of prompt `prompt` is done.
    Completed {
        /// Prompt index.
        prompt: usize,
        /// Its token counts.
        usage: Usage,
    },
    /// A request failed; the generation is over.
    Failed(ApiError),
}

/// A running generation over one or more prompts.
pub struct Generation {
    events: SelectAll<BoxStream<'static, (usize, Event)>>,
    state: AppState,
    _admission: Admission,
    request_id: String,
    route: &'static str,
    started: Instant,
    remaining: usize,
    /// Per prompt: its token count, and whether its engine request completed.
    prompt_tokens: Vec<usize>,
    completed: Vec<bool>,
    /// Per prompt: output tokens received so far (what a cancelled request still produced).
    streamed: Vec<usize>,
    first_reason: Vec<Option<FinishReason>>,
    last_token: HashMap<(usize, usize), Instant>,
    first_token: Option<Duration>,
    usage: Usage,
    finished: bool,
    outcome: &'static str,
}

impl Generation {
    /// Submits every request (all or none: an error drops the ones already submitted).
    pub fn start(
        state: &AppState,
        loaded: &Loaded,
        requests: Vec<GenerateRequest>,
        admission: Admission,
        request_id: &str,
        route: &'static str,
    ) -> Result<Self, ApiError> {
        let mut events = SelectAll::new();
        let count = requests.len();
        let prompt_tokens = requests.iter().map(|r| r.prompt_token_ids.len()).collect();
        for (prompt, request) in requests.into_iter().enumerate() {
            let receiver = loaded.engine.submit(request)?;
            events.push(
                UnboundedReceiverStream::new(receiver)
                    .map(move |event| (prompt, event))
                    .boxed(),
            );
        }
        Ok(Self {
            events,
            state: state.clone(),
            _admission: admission,
            request_id: request_id.to_string(),
            route,
            started: Instant::now(),
            remaining: count,
            prompt_tokens,
            completed: vec![false; count],
            streamed: vec![0; count],
            first_reason: vec![None; count],
            last_token: HashMap::new(),
            first_token: None,
            usage: Usage::default(),
            finished: false,
            outcome: "cancelled",
        })
    }

    /// Total usage of the prompts completed so far.
    pub fn usage(&self) -> Usage {
        self.usage
    }

    /// The next event; `None` once every prompt completed or after a failure.
    pub async fn next(&mut self) -> Option<Item> {
        if self.finished {
            return None;
        }
        let Some((prompt, event)) = self.events.next().await else {
            self.finished = true;
            self.outcome = "failed";
            return Some(Item::Failed(ApiError::Internal(
                "engine closed a request stream without completing it".into(),
            )));
        };
        let metrics = self.state.metrics();
        Some(match event {
            Event::PromptLogprobs(logprobs) => Item::PromptLogprobs { prompt, logprobs },
            Event::Delta(delta) => {
                let now = Instant::now();
                let tokens = delta.token_ids.len();
                if let Some(streamed) = self.streamed.get_mut(prompt) {
                    *streamed += tokens;
                }
                if tokens > 0 {
                    self.first_token.get_or_insert(now - self.started);
                    if let Some(last) = self.last_token.insert((prompt, delta.index), now) {
                        metrics.inter_token(now - last, tokens);
                    } else if tokens > 1 {
                        metrics.inter_token(Duration::ZERO, tokens - 1);
                    }
                }
                Item::Delta { prompt, delta }
            }
            Event::ChoiceFinished { index, reason } => {
                if let Some(slot) = self.first_reason.get_mut(prompt) {
                    slot.get_or_insert(reason);
                }
                Item::ChoiceFinished {
                    prompt,
                    index,
                    reason,
                }
            }
            Event::Completed { usage, timings } => {
                self.usage.prompt_tokens += usage.prompt_tokens;
                self.usage.completion_tokens += usage.completion_tokens;
                let reason = self
                    .first_reason
                    .get(prompt)
                    .copied()
                    .flatten()
                    .unwrap_or(FinishReason::Length);
                metrics.request_finished(reason, &timings);
                if let Some(done) = self.completed.get_mut(prompt) {
                    *done = true;
                }
                self.remaining = self.remaining.saturating_sub(1);
                if self.remaining == 0 {
                    self.finished = true;
                    self.outcome = "ok";
                }
                Item::Completed { prompt, usage }
            }
            Event::Failed(failure) => {
                if matches!(failure, Failure::Internal(_)) {
                    tracing::error!(request_id = %self.request_id, error = %failure, "engine failed a request");
                } else {
                    tracing::info!(request_id = %self.request_id, error = %failure, "request failed");
                }
                self.finished = true;
                self.outcome = "failed";
                Item::Failed(failure.into())
            }
        })
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        let status = match self.outcome {
            "ok" => 200,
            "failed" => 500,
            _ => 499,
        };
        // Prompts whose engine request never completed: cancelled by the client (or cut short
        // by a failure elsewhere in the generation), counted as aborted with what they produced.
        let mut completion_tokens = self.usage.completion_tokens;
        let elapsed = self.started.elapsed();
        for (prompt, done) in self.completed.iter().enumerate() {
            if !done {
                completion_tokens += self.streamed[prompt];
                if self.outcome != "failed" {
                    self.state.metrics().request_aborted(elapsed);
                }
            }
        }
        tracing::info!(
            request_id = %self.request_id,
            route = self.route,
            status,
            outcome = self.outcome,
            prompt_tokens = self.prompt_tokens.iter().sum::<usize>(),
            completion_tokens,
            ttft_ms = self.first_token.map(|d| d.as_millis() as u64),
            total_ms = self.started.elapsed().as_millis() as u64,
            "request"
        );
    }
}

/// A fresh random id with the given prefix (`cmpl-`, `chatcmpl-`).
pub fn new_id(prefix: &str) -> String {
    format!("{prefix}{:032x}", rand::random::<u128>())
}
