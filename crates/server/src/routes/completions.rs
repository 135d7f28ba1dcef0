//! `POST /v1/completions`: legacy completions, plain and streamed.
//!
//! Invariants: choices are indexed prompt-major (`prompt * n + choice`); every choice gets exactly
//! one non-null `finish_reason`; with `echo` the prompt text (and, with `logprobs`, the prompt
//! logprobs) comes first; `text_offset` counts characters from the start of the choice text; a
//! stream always ends with `data: [DONE]`, preceded by an error event if anything failed.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use mpt_engine::{FinishReason, IncrementalDecoder, TokenLogprob, Tokenizer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::ApiError;
use crate::generation::{Generation, Item, new_id};
use crate::openai::types::{
    CompletionChoice, CompletionLogprobs, CompletionRequest, CompletionResponse, TopLogprobs,
    UsageInfo, finish_reason,
};
use crate::openai::validation::{ValidatedCompletion, parse_prompt, validate_completion};
use crate::routes::{ApiJson, compile_constraint, context, logged_by_handler};
use crate::sse;
use crate::state::{AppState, unix_now};

/// Per-choice accumulated output.
struct Choice {
    text: String,
    logprobs: Option<CompletionLogprobs>,
    /// Where the next generated token starts in `text` (with logprobs only).
    offsets: Option<Offsets>,
    /// Streams only: entries of tokens whose text is still held back (a character cut between
    /// tokens), sent with the chunk that carries their text.
    held: CompletionLogprobs,
    finish: Option<FinishReason>,
}

/// Character offsets of tokens in a text decoded from them: a token starts where the text stood
/// before its bytes, so the tokens that together make one multi-byte character share its
/// offset, and special tokens (absent from the text) take no room.
struct Offsets {
    decoder: IncrementalDecoder,
    chars: usize,
}

impl Offsets {
    /// Offsets of tokens appended after `chars` characters of text.
    fn new(tokenizer: &Tokenizer, chars: usize) -> Self {
        Self {
            decoder: IncrementalDecoder::new(tokenizer.clone()),
            chars,
        }
    }

    /// The offset of token `id`, the next one of the text.
    fn next(&mut self, id: u32) -> usize {
        let at = self.chars;
        match self.decoder.push(id) {
            Ok(text) => self.chars += text.chars().count(),
            Err(e) => tracing::warn!(error = %e, "text_offset: token {id} did not decode"),
        }
        at
    }
}

/// Appends one token's logprob entry at `offset`.
fn push_logprob(
    lp: &mut CompletionLogprobs,
    tokenizer: &Tokenizer,
    token_id: u32,
    entry: Option<&TokenLogprob>,
    offset: usize,
) {
    lp.text_offset.push(offset);
    lp.tokens.push(tokenizer.token_text(token_id));
    match entry {
        None => {
            lp.token_logprobs.push(None);
            lp.top_logprobs.push(None);
        }
        Some(e) => {
            lp.token_logprobs.push(Some(e.logprob));
            lp.top_logprobs.push(Some(top_logprobs(tokenizer, e)));
        }
    }
}

/// The alternatives most likely first, the chosen token among them (OpenAI adds it when it is
/// not in the top k); a token text that occurs twice keeps its likelier entry.
fn top_logprobs(tokenizer: &Tokenizer, e: &TokenLogprob) -> TopLogprobs {
    let mut all: Vec<(u32, f32)> = e.top.clone();
    if !all.iter().any(|&(id, _)| id == e.token_id) {
        all.push((e.token_id, e.logprob));
    }
    all.sort_by(|a, b| b.1.total_cmp(&a.1));
    let mut top: Vec<(String, f32)> = Vec::with_capacity(all.len());
    for (id, logprob) in all {
        let text = tokenizer.token_text(id);
        if !top.iter().any(|(t, _)| *t == text) {
            top.push((text, logprob));
        }
    }
    TopLogprobs(top)
}

/// Logprobs for a prompt's tokens (echo).
fn prompt_logprobs(
    tokenizer: &Tokenizer,
    ids: &[u32],
    entries: &[Option<TokenLogprob>],
) -> CompletionLogprobs {
    let mut lp = CompletionLogprobs::default();
    let mut offsets = Offsets::new(tokenizer, 0);
    for (i, &id) in ids.iter().enumerate() {
        let at = offsets.next(id);
        push_logprob(
            &mut lp,
            tokenizer,
            id,
            entries.get(i).and_then(Option::as_ref),
            at,
        );
    }
    lp
}

/// Logprobs of newly generated tokens, their offsets continuing the choice's text.
fn delta_logprobs(
    tokenizer: &Tokenizer,
    ids: &[u32],
    entries: &[TokenLogprob],
    offsets: &mut Offsets,
) -> CompletionLogprobs {
    let mut lp = CompletionLogprobs::default();
    for (i, &id) in ids.iter().enumerate() {
        let at = offsets.next(id);
        push_logprob(&mut lp, tokenizer, id, entries.get(i), at);
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
    let constraint = valid.requests.first().and_then(|r| r.constraint.as_ref());
    compile_constraint(loaded, constraint, valid.constraint_param).await?;
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
        Ok(logged_by_handler(sse::sse_response(
            ReceiverStream::new(rx),
            state.config().timeouts.sse_keep_alive,
        )))
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
        let with_logprobs = self.valid.logprobs.is_some();
        (0..self.prompt_ids.len() * n)
            .map(|i| {
                let text = if self.valid.echo {
                    self.valid.prompt_texts[i / n].clone()
                } else {
                    String::new()
                };
                let chars = text.chars().count();
                Choice {
                    text,
                    logprobs: with_logprobs.then(CompletionLogprobs::default),
                    offsets: with_logprobs.then(|| Offsets::new(&self.tokenizer, chars)),
                    held: CompletionLogprobs::default(),
                    finish: None,
                }
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
                if let (Some(lp), Some(offsets)) = (c.logprobs.as_mut(), c.offsets.as_mut()) {
                    let more =
                        delta_logprobs(&job.tokenizer, &delta.token_ids, &delta.logprobs, offsets);
                    extend(lp, more);
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
                if let Some(offsets) = c.offsets.as_mut() {
                    let more =
                        delta_logprobs(&job.tokenizer, &delta.token_ids, &delta.logprobs, offsets);
                    extend(&mut c.held, more);
                }
                // Nothing to show yet (part of a character, or a possible stop string): wait
                // for the text instead of sending an empty chunk.
                if delta.text.is_empty() {
                    continue;
                }
                let lp = c.logprobs.is_some().then(|| std::mem::take(&mut c.held));
                job.chunk(vec![piece(index, delta.text, lp, None)], None)
            }
            Item::ChoiceFinished {
                prompt,
                index,
                reason,
            } => {
                aborted |= reason == FinishReason::Abort;
                let index = prompt * n + index;
                let Some(c) = choices.get_mut(index) else {
                    continue;
                };
                c.finish = Some(reason);
                // Entries of tokens whose text never came (held back when the choice ended).
                let lp = c.logprobs.is_some().then(|| std::mem::take(&mut c.held));
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
