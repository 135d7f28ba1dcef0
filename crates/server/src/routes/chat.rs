//! `POST /v1/chat/completions` and the chat template.
//!
//! Invariants: messages are rendered with the model's own `chat_template` (Jinja, rendered by
//! minijinja with Python-compatible string methods) when it has one, else with ChatML
//! (`<|im_start|>role\ncontent<|im_end|>\n` + `<|im_start|>assistant\n`, as mpt-30b-chat uses);
//! `<|im_end|>` always stops generation (as a stop string, and as a stop token when the
//! vocabulary has it); streams open each choice with a `role` delta and end with `[DONE]`.

use std::convert::Infallible;

use axum::extract::State;
use axum::response::sse::Event as SseEvent;
use axum::response::{IntoResponse, Response};
use minijinja::{Environment, ErrorKind, context};
use mpt_engine::{FinishReason, Tokenizer};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::error::ApiError;
use crate::generate::{Generation, Item, new_id};
use crate::openai::{
    ChatChoice, ChatCompletionRequest, ChatCompletionResponse, ChatLogprobs, ChatMessage,
    ChatResponseMessage, ChatTokenLogprob, ChatTopLogprob, UsageInfo,
};
use crate::routes::{ApiJson, context as validation_context, logged_by_handler};
use crate::sse;
use crate::state::{AppState, unix_now};
use crate::validation::{ValidatedChat, check_messages, check_model, message_text, validate_chat};

const TEMPLATE_NAME: &str = "chat";
/// The end-of-turn marker of ChatML.
pub const IM_END: &str = "<|im_end|>";

/// A compiled chat template.
pub struct ChatTemplate {
    env: Option<Environment<'static>>,
}

#[derive(Serialize)]
struct TemplateMessage {
    role: String,
    content: String,
}

impl ChatTemplate {
    /// Compiles the model's template, or falls back to ChatML when there is none.
    pub fn new(source: Option<&str>) -> Result<Self, minijinja::Error> {
        let Some(source) = source else {
            return Ok(Self { env: None });
        };
        let mut env = Environment::new();
        minijinja_contrib::add_to_environment(&mut env);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |message: String| -> Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, message))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, source.to_string())?;
        Ok(Self { env: Some(env) })
    }

    /// True when the model's own template is used.
    pub fn is_custom(&self) -> bool {
        self.env.is_some()
    }

    /// Renders the conversation into the prompt text.
    pub fn render(
        &self,
        messages: &[ChatMessage],
        add_generation_prompt: bool,
    ) -> Result<String, ApiError> {
        let messages: Vec<TemplateMessage> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| {
                Ok(TemplateMessage {
                    role: m.role.clone(),
                    content: message_text(m, i)?,
                })
            })
            .collect::<Result<_, ApiError>>()?;
        let Some(env) = &self.env else {
            let mut out = String::new();
            for m in &messages {
                out.push_str(&format!("<|im_start|>{}\n{}{IM_END}\n", m.role, m.content));
            }
            if add_generation_prompt {
                out.push_str("<|im_start|>assistant\n");
            }
            return Ok(out);
        };
        let template = env
            .get_template(TEMPLATE_NAME)
            .map_err(|e| ApiError::Internal(format!("chat template missing: {e}")))?;
        template
            .render(context! {
                messages => messages,
                add_generation_prompt => add_generation_prompt,
                bos_token => "<|endoftext|>",
                eos_token => "<|endoftext|>",
            })
            .map_err(|e| {
                ApiError::invalid(
                    "messages",
                    format!("the chat template rejected the messages: {e}"),
                )
            })
    }
}

/// The handler.
pub async fn chat_completions(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<ChatCompletionRequest>,
) -> Result<Response, ApiError> {
    let loaded = state.loaded()?;
    let admission = state.admit(1)?;
    check_model(req.model.as_deref(), &state.config().model_name)?;
    let messages = check_messages(req.messages.as_ref())?;
    let prompt = loaded.chat_template.render(messages, true)?;
    let id = new_id("chatcmpl-");
    let valid = validate_chat(&req, &validation_context(&state, loaded), &id, &prompt)?;
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
    let mut texts = vec![String::new(); n];
    let mut logprobs: Vec<Option<ChatLogprobs>> =
        vec![job.valid.logprobs.map(|_| ChatLogprobs::default()); n];
    let mut finish = vec![None; n];
    while let Some(item) = generation.next().await {
        match item {
            Item::Delta { delta, .. } if delta.index < n => {
                texts[delta.index].push_str(&delta.text);
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
        .map(|(index, ((text, logprobs), finish))| ChatChoice {
            index,
            message: Some(ChatResponseMessage {
                role: Some("assistant"),
                content: Some(text),
            }),
            delta: None,
            logprobs,
            finish_reason: Some(finish.unwrap_or(FinishReason::Length).as_str()),
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
    finish: Option<FinishReason>,
) -> ChatChoice {
    ChatChoice {
        index,
        message: None,
        delta: Some(delta),
        logprobs,
        finish_reason: finish.map(FinishReason::as_str),
    }
}

async fn pump(job: &Job, generation: &mut Generation, tx: &Tx) {
    const OBJECT: &str = "chat.completion.chunk";
    let opening: Vec<_> = (0..job.valid.n)
        .map(|i| {
            let delta = ChatResponseMessage {
                role: Some("assistant"),
                content: Some(String::new()),
            };
            chunk_choice(i, delta, None, None)
        })
        .collect();
    if !send(tx, sse::json(&job.response(OBJECT, opening, None))).await {
        return;
    }
    let mut aborted = false;
    while let Some(item) = generation.next().await {
        let choice = match item {
            Item::Delta { delta, .. } => {
                if delta.text.is_empty() && delta.token_ids.is_empty() {
                    continue;
                }
                let logprobs = job.logprobs(&delta);
                let message = ChatResponseMessage {
                    role: None,
                    content: Some(delta.text),
                };
                chunk_choice(delta.index, message, logprobs, None)
            }
            Item::ChoiceFinished { index, reason, .. } => {
                aborted |= reason == FinishReason::Abort;
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

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: &str, content: &str) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: serde_json::Value::String(content.into()),
            name: None,
        }
    }

    #[test]
    fn chatml_fallback() {
        let t = ChatTemplate::new(None).expect("chatml");
        let out = t
            .render(&[msg("system", "Be brief."), msg("user", "Hi")], true)
            .expect("renders");
        assert_eq!(
            out,
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn model_template_with_python_methods() {
        let source = "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}[{{ m.role.upper() }}] {{ m.content.strip() }}\n{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}";
        let t = ChatTemplate::new(Some(source)).expect("compiles");
        assert!(t.is_custom());
        assert_eq!(
            t.render(&[msg("user", "  Hi ")], true).expect("renders"),
            "[USER] Hi\n[ASSISTANT]"
        );
        let err = t.render(&[msg("tool", "x")], true).expect_err("raises");
        assert_eq!(err.body().error.param.as_deref(), Some("messages"));
    }
}
