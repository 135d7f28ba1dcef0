//! `POST /v1/completions`: legacy completions, plain and streamed.
//!
//! Invariants: choices are indexed prompt-major (`prompt * n + choice`); every choice gets exactly
//! one non-null `finish_reason`; with `echo` the prompt text (and, with `logprobs`, the prompt
//! logprobs) comes first; `text_offset` counts characters from the start of the choice text; a
//! stream always ends with `data: [DONE]`, preceded by an error event if anything failed.

use std::collections::BTreeMap;
use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use mpt_engine::{FinishReason, TokenLogprob, Tokenizer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::ApiError;
use crate::generation::{Generation, Item, new_id};
use crate::openai::types::{
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, UsageInfo,
    finish_reason,
};
use crate::openai::validation::{ValidatedCompletion, parse_prompt, validate_completion};
use crate::routes::{ApiJson, context, logged_by_handler};
use crate::sse;
use crate::state::{AppState, unix_now};

/// Per-choice accumulated output.
#[derive(Default)]
struct Choice {
    text: String,
    chars: usize,
    logprobs: Option<CompletionLogprobs>,
    finish: Option<FinishReason>,
}

/// Appends one token's logprob entry, advancing the character offset.
fn push_logprob(
    lp: &mut CompletionLogprobs,
    tokenizer: &Tokenizer,
    token_id: u32,
    entry: Option<&TokenLogprob>,
    chars: &mut usize,
) {
    let text = tokenizer.token_text(token_id);
    lp.text_offset.push(*chars);
    *chars += text.chars().count();
    lp.tokens.push(text);
    match entry {
        None => {
            lp.token_logprobs.push(None);
            lp.top_logprobs.push(None);
        }
        Some(e) => {
            lp.token_logprobs.push(Some(e.logprob));
            let mut top: BTreeMap<String, f32> = e
                .top
                .iter()
                .map(|&(id, logprob)| (tokenizer.token_text(id), logprob))
                .collect();
            top.entry(tokenizer.token_text(e.token_id))
                .or_insert(e.logprob);
            lp.top_logprobs.push(Some(top));
        }
    }
}

/// Logprobs for a prompt's tokens (echo).
fn prompt_logprobs(
    tokenizer: &Tokenizer,
    ids: &[u32],
    entries: &[Option<TokenLogprob>],
) -> CompletionLogprobs {
    let mut lp = CompletionLogprobs::default();
    let mut chars = 0;
    for (i, &id) in ids.iter().enumerate() {
        push_logprob(
            &mut lp,
            tokenizer,
            id,
            entries.get(i).and_then(Option::as_ref),
            &mut chars,
        );
    }
    lp
}

/// Logprobs of newly generated tokens, offsets continuing from `chars`.
fn delta_logprobs(
    tokenizer: &Tokenizer,
    ids: &[u32],
    entries: &[TokenLogprob],
    chars: &mut usize,
) -> CompletionLogprobs {
    let mut lp = CompletionLogprobs::default();
    for (i, &id) in ids.iter().enumerate() {
        push_logprob(&mut lp, tokenizer, id, entries.get(i), chars);
    }
    lp
}

fn extend(into: &mut CompletionLogprobs, more: CompletionLogprobs) {
    into.tokens.extend(more.tokens);
    into.token_logprobs.extend(more.token_logprobs);
    into.top_logprobs.extend(more.top_logprobs);
    into.text_offset.extend(more.text_offset);
}

/// The handler.
pub async fn completions(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<CompletionRequest>,
) -> Result<Response, ApiError> {
    let loaded = state.loaded()?;
    // Count prompts (cheap, no tokenizing) and take queue slots before any real work.
    let prompts = parse_prompt(req.prompt.as_ref(), loaded.engine.model_info().vocab_size)?.len();
    let admission = state.admit(prompts)?;
    let id = new_id("cmpl-");
    let tokenizer = loaded.engine.tokenizer().clone();
    let ctx = context(&state, loaded);
    let valid = validate_completion(&req, &ctx, &id)?;
    let prompt_ids: Vec<Vec<u32>> = valid
        .requests
        .iter()
        .map(|r| r.prompt_token_ids.clone())
        .collect();
    let generation = Generation::start(
        &state,
        loaded,
        valid.requests.clone(),
        admission,
        &id,
        "/v1/completions",
    )?;
    let model = state.config().model_name.clone();
    let job = Job {
        id,
        model,
        created: unix_now(),
        valid,
        prompt_ids,
        tokenizer,
    };
    if job.valid.stream {
        let (tx, rx) = mpsc::channel(64);
        tokio::spawn(stream_task(job, generation, tx));
        Ok(logged_by_handler(sse::sse_response(ReceiverStream::new(
            rx,
        ))))
    } else {
        Ok(logged_by_handler(
            collect(job, generation).await?.into_response(),
        ))
    }
}

struct Job {
    id: String,
    model: String,
    created: u64,
    valid: ValidatedCompletion,
    prompt_ids: Vec<Vec<u32>>,
    tokenizer: std::sync::Arc<Tokenizer>,
}

impl Job {
    fn fresh_choices(&self) -> Vec<Choice> {
        let n = self.valid.n;
        (0..self.prompt_ids.len() * n)
            .map(|i| {
                let mut c = Choice::default();
                if self.valid.echo {
                    let prompt = &self.valid.prompt_texts[i / n];
                    c.text.push_str(prompt);
                    c.chars = prompt.chars().count();
                }
                if self.valid.logprobs.is_some() {
                    c.logprobs = Some(CompletionLogprobs::default());
                }
                c
            })
            .collect()
    }

    fn chunk(
        &self,
        choices: Vec<CompletionChoice>,
        usage: Option<UsageInfo>,
    ) -> CompletionResponse {
        CompletionResponse {
            id: self.id.clone(),
            object: "text_completion",
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }
}

async fn collect(
    job: Job,
    mut generation: Generation,
) -> Result<axum::Json<CompletionResponse>, ApiError> {
    let n = job.valid.n;
    let mut choices = job.fresh_choices();
    while let Some(item) = generation.next().await {
        match item {
            Item::PromptLogprobs { prompt, logprobs } => {
                let lp = prompt_logprobs(&job.tokenizer, &job.prompt_ids[prompt], &logprobs);
                for c in &mut choices[prompt * n..(prompt + 1) * n] {
                    c.logprobs = Some(lp.clone());
                }
            }
            Item::Delta { prompt, delta } => {
                let Some(c) = choices.get_mut(prompt * n + delta.index) else {
                    continue;
                };
                c.text.push_str(&delta.text);
                if let Some(lp) = c.logprobs.as_mut() {
                    let more = delta_logprobs(
                        &job.tokenizer,
                        &delta.token_ids,
                        &delta.logprobs,
                        &mut c.chars,
                    );
                    extend(lp, more);
                } else {
                    c.chars += delta.text.chars().count();
                }
            }
            Item::ChoiceFinished {
                prompt,
                index,
                reason,
            } => {
                if let Some(c) = choices.get_mut(prompt * n + index) {
                    c.finish = Some(reason);
                }
            }
            Item::Completed { .. } => {}
            Item::Failed(err) => return Err(err),
        }
    }
    if choices
        .iter()
        .any(|c| c.finish == Some(FinishReason::Abort))
    {
        return Err(ApiError::ShuttingDown);
    }
    let usage = generation.usage();
    let out = choices
        .into_iter()
        .enumerate()
        .map(|(index, c)| CompletionChoice {
            index,
            text: c.text,
            logprobs: c.logprobs,
            finish_reason: Some(finish_reason(c.finish.unwrap_or(FinishReason::Length))),
        })
        .collect();
    Ok(axum::Json(job.chunk(
        out,
        Some(UsageInfo::new(usage.prompt_tokens, usage.completion_tokens)),
    )))
}

type Tx = mpsc::Sender<Result<SseEvent, Infallible>>;

/// Sends `event`; false when the client is gone.
async fn send(tx: &Tx, event: SseEvent) -> bool {
    tx.send(Ok(event)).await.is_ok()
}

async fn stream_task(job: Job, mut generation: Generation, tx: Tx) {
    tokio::select! {
        _ = tx.closed() => {}
        _ = pump(&job, &mut generation, &tx) => {}
    }
    // Dropping `generation` here cancels whatever is still running (client gone).
}

async fn pump(job: &Job, generation: &mut Generation, tx: &Tx) {
    let n = job.valid.n;
    let mut choices = job.fresh_choices();
    let piece = |index: usize,
                 text: String,
                 logprobs: Option<CompletionLogprobs>,
                 finish: Option<FinishReason>| {
        CompletionChoice {
            index,
            text,
            logprobs,
            finish_reason: finish.map(finish_reason),
        }
    };
    if job.valid.echo && job.valid.logprobs.is_none() {
        let echo: Vec<_> = choices
            .iter()
            .enumerate()
            .map(|(i, c)| piece(i, c.text.clone(), None, None))
            .collect();
        if !send(tx, sse::json(&job.chunk(echo, None))).await {
            return;
        }
    }
    let mut aborted = false;
    while let Some(item) = generation.next().await {
        let event = match item {
            Item::PromptLogprobs { prompt, logprobs } => {
                let lp = prompt_logprobs(&job.tokenizer, &job.prompt_ids[prompt], &logprobs);
                let text = &job.valid.prompt_texts[prompt];
                let echo = (prompt * n..(prompt + 1) * n)
                    .map(|i| piece(i, text.clone(), Some(lp.clone()), None))
                    .collect();
                job.chunk(echo, None)
            }
            Item::Delta { prompt, delta } => {
                let index = prompt * n + delta.index;
                let Some(c) = choices.get_mut(index) else {
                    continue;
                };
                if delta.text.is_empty() && delta.token_ids.is_empty() {
                    continue;
                }
                let lp = c.logprobs.as_ref().map(|_| {
                    delta_logprobs(
                        &job.tokenizer,
                        &delta.token_ids,
                        &delta.logprobs,
                        &mut c.chars,
                    )
                });
                job.chunk(vec![piece(index, delta.text, lp, None)], None)
            }
            Item::ChoiceFinished {
                prompt,
                index,
                reason,
            } => {
                aborted |= reason == FinishReason::Abort;
                let index = prompt * n + index;
                if let Some(c) = choices.get_mut(index) {
                    c.finish = Some(reason);
                }
                let lp = job.valid.logprobs.map(|_| CompletionLogprobs::default());
                job.chunk(vec![piece(index, String::new(), lp, Some(reason))], None)
            }
            Item::Completed { .. } => continue,
            Item::Failed(err) => {
                if send(tx, sse::error(&err)).await {
                    send(tx, sse::done()).await;
                }
                return;
            }
        };
        if !send(tx, sse::json(&event)).await {
            return;
        }
    }
    if aborted && !send(tx, sse::error(&ApiError::ShuttingDown)).await {
        return;
    }
    if job.valid.include_usage {
        let u = generation.usage();
        let usage = UsageInfo::new(u.prompt_tokens, u.completion_tokens);
        if !send(tx, sse::json(&job.chunk(Vec::new(), Some(usage)))).await {
            return;
        }
    }
    send(tx, sse::done()).await;
}
