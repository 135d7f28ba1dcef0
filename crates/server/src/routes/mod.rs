//! HTTP handlers, the JSON body extractor and the middleware shared by all routes.
//!
//! Invariants: request bodies are accepted only as `application/json` (else 415), at most
//! [`MAX_BODY_BYTES`] (else 413), within one body-read deadline (else 408, however the bytes
//! trickle in), and must be a JSON object (else 400) — rejections always use our error shape,
//! never axum's plain text; top-level fields are checked by [`crate::openai::fields`] (unknown
//! ones refused unless `--allow-unknown-fields`); `/v1/*`, `/tokenize` and `/detokenize` require
//! the API key when one is set, the probes and `/metrics` never do; each request is counted once
//! in the HTTP metric and logged once (by the generation for completions, by [`track`]
//! otherwise).

pub mod chat;
pub mod completions;
pub mod health;
pub mod models;
pub mod tokenize;

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::{FromRequest, MatchedPath, Request, State};
use axum::http::{Method, Uri, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use subtle::ConstantTimeEq;

use crate::error::ApiError;
use crate::openai::fields::{WireRequest, check_fields};
use crate::openai::validation::ValidationContext;
use crate::state::{AppState, Loaded};

pub use crate::state::MAX_BODY_BYTES;

/// A JSON body deserialized into `T`, with every rejection in our error shape.
pub struct ApiJson<T>(pub T);

fn is_json(content_type: &str) -> bool {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}

impl<T: WireRequest> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let content_type = req
            .headers()
            .get(header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        match content_type.as_deref() {
            Some(ct) if is_json(ct) => {}
            Some(ct) => return Err(ApiError::UnsupportedMediaType(ct.to_string())),
            None => return Err(ApiError::UnsupportedMediaType(String::new())),
        }
        // One deadline for the whole body: a client that trickles bytes never resets it.
        let deadline = state.config().timeouts.body_read;
        let bytes = tokio::time::timeout(deadline, Bytes::from_request(req, state))
            .await
            .map_err(|_| ApiError::Timeout)?
            .map_err(|rejection| {
                if rejection.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::PayloadTooLarge(MAX_BODY_BYTES)
                } else {
                    ApiError::MalformedBody(format!(
                        "could not read the request body: {}",
                        rejection.body_text()
                    ))
                }
            })?;
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::MalformedBody(format!("request body is not valid JSON: {e}")))?;
        let Some(fields) = value.as_object() else {
            return Err(ApiError::MalformedBody(
                "request body must be a JSON object".into(),
            ));
        };
        check_fields::<T>(fields, state.config().allow_unknown_fields)?;
        serde_path_to_error::deserialize(value)
            .map(ApiJson)
            .map_err(|e| {
                let path = e.path().to_string();
                let message = format!("{path}: {}", e.inner());
                ApiError::Invalid {
                    message,
                    param: Some(path),
                    code: None,
                }
            })
    }
}

/// Compiles an output constraint on a blocking thread (bounded by the grammar engine's limits;
/// the engine caches the result, so `submit` finds it); one that does not compile is a 400
/// naming the field it came from.
pub async fn compile_constraint(
    loaded: &Loaded,
    constraint: Option<&mpt_engine::Constraint>,
    param: Option<&'static str>,
) -> Result<(), ApiError> {
    let Some(constraint) = constraint.cloned() else {
        return Ok(());
    };
    let engine = loaded.engine.clone();
    let compiled = tokio::task::spawn_blocking(move || engine.compile_constraint(&constraint))
        .await
        .map_err(|e| ApiError::Internal(format!("grammar compilation panicked: {e}")))?;
    compiled.map_err(|e| {
        let param = param.unwrap_or("response_format");
        let reason = match e {
            mpt_engine::SubmitError::InvalidConstraint(reason) => reason,
            other => other.to_string(),
        };
        ApiError::invalid(param, format!("{param} cannot be enforced: {reason}"))
    })
}

/// Validation context for the loaded model.
pub fn context<'a>(state: &'a AppState, loaded: &'a Loaded) -> ValidationContext<'a> {
    let info = loaded.engine.model_info();
    ValidationContext {
        model_name: &state.config().model_name,
        max_model_len: info.max_model_len,
        vocab_size: info.vocab_size,
        tokenizer: loaded.engine.tokenizer(),
        chat_stop_token: loaded.im_end_id,
    }
}

/// Marks a response whose request the generation logs itself.
#[derive(Clone, Copy)]
pub struct HandlerLogged;

/// Tags `response` with [`HandlerLogged`].
pub fn logged_by_handler(mut response: Response) -> Response {
    response.extensions_mut().insert(HandlerLogged);
    response
}

/// Counts every response by route and status, counts rejections, logs non-generation requests.
pub async fn track(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let method = request.method().clone();
    let path = request.uri().path().to_string();
    let response = next.run(request).await;
    let status = response.status().as_u16();
    state.metrics().http_request(&route, status);
    // Probe answers (503 while loading or draining) are not rejected requests.
    if let Some(err) = response.extensions().get::<ApiError>()
        && !matches!(route.as_str(), "/health" | "/ready")
    {
        state.metrics().rejected(err.reason_label());
    }
    if response.extensions().get::<HandlerLogged>().is_none() {
        let error = response
            .extensions()
            .get::<ApiError>()
            .map(|e| e.to_string());
        tracing::info!(
            method = %method,
            path = %path,
            status,
            error = error.as_deref(),
            total_ms = started.elapsed().as_millis() as u64,
            "request"
        );
    }
    response
}

/// Requires `Authorization: Bearer <key>` when an API key is configured (constant-time compare).
pub async fn require_api_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(expected) = state.config().api_key.as_deref() {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
            return ApiError::Unauthorized.into_response();
        }
    }
    next.run(request).await
}

/// 404 in our shape for unknown routes.
pub async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::RouteNotFound(format!("{method} {}", uri.path()))
}

/// 405 in our shape.
pub async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}
