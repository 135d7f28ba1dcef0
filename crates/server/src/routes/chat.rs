//! `POST /v1/chat/completions`: messages rendered by the [`crate::chat_template`], then
//! generated like a completion, under the grammar of `response_format`, `structured_outputs`
//! or `tools` when given; tool calls are parsed out of the answer ([`ChoiceOutput`]).
//!
//! Invariants: `<|im_end|>` always stops generation (as a stop string, and as a stop token when
//! the vocabulary has it); streams open each choice with a `role` delta and end with `[DONE]`;
//! a grammar that does not compile is a 400 before anything is generated.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use mpt_engine::{FinishReason, Tokenizer};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::ApiError;
use crate::generation::{Generation, Item, new_id};
use crate::openai::messages::check_messages;
use crate::openai::tool_calls::ChoiceOutput;
use crate::openai::tools::tool_plan;
use crate::openai::types::{
    ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatFullMessage, ChatLogprobs,
    ChatResponseMessage, ChatTokenLogprob, ChatTopLogprob, UsageInfo,
};
use crate::openai::validation::{ValidatedChat, check_model, validate_chat};
use crate::routes::{
    ApiJson, compile_constraint, context as validation_context, logged_by_handler,
};
use crate::sse;
use crate::state::{AppState, unix_now};

/// The handler.
pub async fn chat_completions(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let loaded = state.loaded()?;
    let admission = state.admit(1)?;
    check_model(req.model.as_deref(), &state.config().model_name)?;
    let messages = check_messages(req.messages.as_ref())?;
    let tools = tool_plan(
        req.tools.as_ref(),
        req.tool_choice.as_ref(),
        req.parallel_tool_calls,
    )?;
    let prompt = loaded
        .chat_template
        .render(messages, true, tools.as_ref())?;
    let id = new_id("chatcmpl-");
    let valid = validate_chat(
        &req,
        &validation_context(&state, loaded),
        &id,
        &prompt,
        tools.as_ref(),
    )?;
    compile_constraint(
        loaded,
        valid.request.constraint.as_ref(),
        valid.constraint_param,
    )
    .await?;
    let generation = Generation::start(
        &state,
        loaded,
        vec![valid.request.clone()],
        admission,
        &id,
        "/v1/chat/completions",
    )?;
    let job = Job {
        id,
        model: state.config().model_name.clone(),
        created: unix_now(),
        valid,
        tokenizer: loaded.engine.tokenizer().clone(),
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
    valid: ValidatedChat,
    tokenizer: std::sync::Arc<Tokenizer>,
}

impl Job {
    fn response(
        &self,
        object: &'static str,
        choices: Vec<ChatChoice>,
        usage: Option<UsageInfo>,
    ) -> ChatCompletionResponse {
        ChatCompletionResponse {
            id: self.id.clone(),
            object,
            created: self.created,
            model: self.model.clone(),
            choices,
            usage,
        }
    }

    fn logprobs(&self, delta: &mpt_engine::Delta) -> Option<ChatLogprobs> {
        self.valid.logprobs?;
        let entry = |id: u32, logprob: f32| {
            let token = self.tokenizer.token_text(id);
            ChatTopLogprob {
                bytes: token.as_bytes().to_vec(),
                token,
                logprob,
            }
        };
        let content = delta
            .logprobs
            .iter()
            .map(|lp| {
                let chosen = entry(lp.token_id, lp.logprob);
                ChatTokenLogprob {
                    token: chosen.token,
                    logprob: chosen.logprob,
                    bytes: chosen.bytes,
                    top_logprobs: lp.top.iter().map(|&(id, l)| entry(id, l)).collect(),
                }
            })
            .collect();
        Some(ChatLogprobs { content })
    }
}

async fn collect(
    job: Job,
    mut generation: Generation,
) -> Result<axum::Json<ChatCompletionResponse>, ApiError> {
    let n = job.valid.n;
    let mut texts = vec![ChoiceOutput::new(job.valid.tools); n];
    let mut logprobs: Vec<Option<ChatLogprobs>> =
        vec![job.valid.logprobs.map(|_| ChatLogprobs::default()); n];
    let mut finish = vec![None; n];
    while let Some(item) = generation.next().await {
        match item {
            Item::Delta { delta, .. } if delta.index < n => {
                texts[delta.index].push(&delta.text);
                if let (Some(all), Some(more)) =
                    (logprobs[delta.index].as_mut(), job.logprobs(&delta))
                {
                    all.content.extend(more.content);
                }
            }
            Item::ChoiceFinished { index, reason, .. } if index < n => finish[index] = Some(reason),
            Item::Failed(err) => return Err(err),
            _ => {}
        }
    }
    if finish.contains(&Some(FinishReason::Abort)) {
        return Err(ApiError::ShuttingDown);
    }
    let usage = generation.usage();
    let choices = texts
        .into_iter()
        .zip(logprobs)
        .zip(finish)
        .enumerate()
        .map(|(index, ((mut output, logprobs), finish))| {
            output.finish();
            let tool_calls = output.tool_calls();
            let content = output.content().to_string();
            ChatChoice {
                index,
                message: Some(ChatFullMessage {
                    role: "assistant",
                    // OpenAI's shape: `null` content for an answer that is only tool calls.
                    content: (tool_calls.is_none() || !content.is_empty()).then_some(content),
                    tool_calls,
                }),
                delta: None,
                logprobs,
                finish_reason: Some(output.finish_reason(finish.unwrap_or(FinishReason::Length))),
            }
        })
        .collect();
    let usage = UsageInfo::new(usage.prompt_tokens, usage.completion_tokens);
    Ok(axum::Json(job.response(
        "chat.completion",
        choices,
        Some(usage),
    )))
}

type Tx = mpsc::Sender<Result<SseEvent, Infallible>>;

async fn send(tx: &Tx, event: SseEvent) -> bool {
    tx.send(Ok(event)).await.is_ok()
}

async fn stream_task(job: Job, mut generation: Generation, tx: Tx) {
    tokio::select! {
        _ = tx.closed() => {}
        _ = pump(&job, &mut generation, &tx) => {}
    }
}

fn chunk_choice(
    index: usize,
    delta: ChatResponseMessage,
    logprobs: Option<ChatLogprobs>,
    finish: Option<&'static str>,
) -> ChatChoice {
    ChatChoice {
        index,
        message: None,
        delta: Some(delta),
        logprobs,
        finish_reason: finish,
    }
}

/// A delta with content and/or tool-call pieces.
fn delta_message(
    content: String,
    tool_calls: Vec<crate::openai::types::ToolCallDelta>,
) -> ChatResponseMessage {
    ChatResponseMessage {
        role: None,
        content: (!content.is_empty() || tool_calls.is_empty()).then_some(content),
        tool_calls: (!tool_calls.is_empty()).then_some(tool_calls),
    }
}

async fn pump(job: &Job, generation: &mut Generation, tx: &Tx) {
    const OBJECT: &str = "chat.completion.chunk";
    let opening: Vec<_> = (0..job.valid.n)
        .map(|i| {
            let delta = ChatResponseMessage {
                role: Some("assistant"),
                content: Some(String::new()),
                tool_calls: None,
            };
            chunk_choice(i, delta, None, None)
        })
        .collect();
    if !send(tx, sse::json(&job.response(OBJECT, opening, None))).await {
        return;
    }
    let mut aborted = false;
    let mut outputs = vec![ChoiceOutput::new(job.valid.tools); job.valid.n];
    while let Some(item) = generation.next().await {
        let choice = match item {
            Item::Delta { delta, .. } => {
                let Some(output) = outputs.get_mut(delta.index) else {
                    continue;
                };
                let (content, calls) = output.push(&delta.text);
                let logprobs = job.logprobs(&delta);
                // Nothing to show and no tokens (so no logprobs) to carry: no chunk.
                if content.is_empty() && calls.is_empty() && delta.token_ids.is_empty() {
                    continue;
                }
                chunk_choice(delta.index, delta_message(content, calls), logprobs, None)
            }
            Item::ChoiceFinished { index, reason, .. } => {
                aborted |= reason == FinishReason::Abort;
                let Some(output) = outputs.get_mut(index) else {
                    continue;
                };
                let (content, calls) = output.finish();
                if !(content.is_empty() && calls.is_empty()) {
                    let rest = chunk_choice(index, delta_message(content, calls), None, None);
                    if !send(tx, sse::json(&job.response(OBJECT, vec![rest], None))).await {
                        return;
                    }
                }
                let reason = output.finish_reason(reason);
                chunk_choice(index, ChatResponseMessage::default(), None, Some(reason))
            }
            Item::Failed(err) => {
                if send(tx, sse::error(&err)).await {
                    send(tx, sse::done()).await;
                }
                return;
            }
            Item::PromptLogprobs { .. } | Item::Completed { .. } => continue,
        };
        if !send(tx, sse::json(&job.response(OBJECT, vec![choice], None))).await {
            return;
        }
    }
    if aborted && !send(tx, sse::error(&ApiError::ShuttingDown)).await {
        return;
    }
    if job.valid.include_usage {
        let u = generation.usage();
        let usage = UsageInfo::new(u.prompt_tokens, u.completion_tokens);
        if !send(
            tx,
            sse::json(&job.response(OBJECT, Vec::new(), Some(usage))),
        )
        .await
        {
            return;
        }
    }
    send(tx, sse::done()).await;
}
