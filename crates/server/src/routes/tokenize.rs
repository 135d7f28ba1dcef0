//! vLLM's `POST /tokenize` and `POST /detokenize`.
//!
//! Invariants: tokenizing uses exactly the ids a completion with the same prompt (or a chat with
//! the same messages) would submit; detokenizing rejects ids outside the vocabulary with a 400
//! naming `tokens`.

use axum::Json;
use axum::extract::State;

use crate::error::ApiError;
use crate::openai::messages::check_messages;
use crate::openai::types::{
    DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse,
};
use crate::openai::validation::check_model;
use crate::routes::ApiJson;
use crate::state::AppState;

/// Text or chat messages → token ids.
pub async fn tokenize(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<TokenizeRequest>,
) -> Result<Json<TokenizeResponse>, ApiError> {
    let loaded = state.loaded()?;
    check_model(req.model.as_deref(), &state.config().model_name)?;
    let text = match (&req.prompt, &req.messages) {
        (Some(prompt), None) => prompt.clone(),
        (None, Some(_)) => {
            let messages = check_messages(req.messages.as_ref())?;
            loaded.chat_template.render(
                messages,
                req.add_generation_prompt.unwrap_or(true),
                None,
            )?
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid(
                "prompt",
                "give either prompt or messages, not both",
            ));
        }
        (None, None) => {
            return Err(ApiError::invalid(
                "prompt",
                "prompt (or messages) is required",
            ));
        }
    };
    let tokens = loaded
        .engine
        .tokenizer()
        .encode(&text)
        .map_err(|e| ApiError::Internal(format!("tokenizer failed: {e}")))?;
    Ok(Json(TokenizeResponse {
        count: tokens.len(),
        max_model_len: loaded.engine.model_info().max_model_len,
        tokens,
    }))
}

/// Token ids → text.
pub async fn detokenize(
    State(state): State<AppState>,
    ApiJson(req): ApiJson<DetokenizeRequest>,
) -> Result<Json<DetokenizeResponse>, ApiError> {
    let loaded = state.loaded()?;
    check_model(req.model.as_deref(), &state.config().model_name)?;
    let vocab = loaded.engine.model_info().vocab_size;
    let ids = req
        .tokens
        .ok_or_else(|| ApiError::invalid("tokens", "tokens is required"))?
        .into_iter()
        .map(|id| {
            u32::try_from(id)
                .ok()
                .filter(|&id| (id as usize) < vocab)
                .ok_or_else(|| {
                    ApiError::invalid(
                        "tokens",
                        format!("token id {id} is outside the vocabulary [0, {vocab})"),
                    )
                })
        })
        .collect::<Result<Vec<u32>, _>>()?;
    let prompt = loaded
        .engine
        .tokenizer()
        .decode(&ids)
        .map_err(|e| ApiError::Internal(format!("decode failed: {e}")))?;
    Ok(Json(DetokenizeResponse { prompt }))
}
