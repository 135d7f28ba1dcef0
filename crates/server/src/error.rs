//! The one error type of the HTTP API and its mapping to status codes.
//!
//! Invariants: every error the server returns — JSON responses and SSE error events alike — has
//! OpenAI's shape `{"error": {"message", "type", "param", "code"}}`; 500s carry a generic message
//! (the detail goes to the log only); 429 always carries `Retry-After`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use mpt_engine::{Failure, LogprobsOf, SamplingParam, SubmitError};
use serde::Serialize;
use utoipa::ToSchema;

/// OpenAI's `code` for a prompt + completion longer than the model or the cache allows.
pub const CONTEXT_LENGTH_EXCEEDED: &str = "context_length_exceeded";

/// Seconds a client should wait after a 429.
pub const RETRY_AFTER_SECS: u64 = 1;

/// Everything an API call can fail with.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ApiError {
    /// A request field is missing, has the wrong type or is out of range (400).
    #[error("{message}")]
    Invalid {
        /// What is wrong, naming the field.
        message: String,
        /// The field at fault.
        param: Option<String>,
        /// Machine-readable code, e.g. `context_length_exceeded`.
        code: Option<String>,
    },
    /// The body is not JSON / not an object (400).
    #[error("{0}")]
    MalformedBody(String),
    /// Missing or wrong API key (401).
    #[error("invalid or missing API key")]
    Unauthorized,
    /// Unknown model name (404).
    #[error("the model `{0}` does not exist")]
    ModelNotFound(String),
    /// Unknown route (404).
    #[error("no route for {0}")]
    RouteNotFound(String),
    /// Wrong HTTP method for the route (405).
    #[error("method not allowed")]
    MethodNotAllowed,
    /// The body exceeds the limit (413).
    #[error("request body is larger than the limit of {0} bytes")]
    PayloadTooLarge(usize),
    /// The content type is not JSON (415).
    #[error("unsupported content type {0:?}: send `Content-Type: application/json`")]
    UnsupportedMediaType(String),
    /// The queue is full (429, with `Retry-After`).
    #[error("the server is at capacity: request queue is full, retry later")]
    QueueFull,
    /// The model is still loading (503).
    #[error("the model is still loading, retry later")]
    NotReady,
    /// The server is draining for shutdown (503).
    #[error("the server is shutting down")]
    ShuttingDown,
    /// The engine thread is gone (503).
    #[error("the inference engine has stopped")]
    EngineStopped,
    /// The request body was not received in time (408).
    #[error("request body timed out")]
    Timeout,
    /// A real internal fault (500); the detail is logged, never sent.
    #[error("internal server error")]
    Internal(String),
}

impl ApiError {
    /// A 400 naming the field.
    pub fn invalid(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Invalid {
            message: message.into(),
            param: Some(param.into()),
            code: None,
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Invalid { .. } | Self::MalformedBody(_) => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::ModelNotFound(_) | Self::RouteNotFound(_) => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::QueueFull => StatusCode::TOO_MANY_REQUESTS,
            Self::NotReady | Self::ShuttingDown | Self::EngineStopped => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Timeout => StatusCode::REQUEST_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// OpenAI's `type` string.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Invalid { .. }
            | Self::MalformedBody(_)
            | Self::PayloadTooLarge(_)
            | Self::UnsupportedMediaType(_)
            | Self::MethodNotAllowed
            | Self::Timeout => "invalid_request_error",
            Self::Unauthorized => "authentication_error",
            Self::ModelNotFound(_) | Self::RouteNotFound(_) => "not_found_error",
            Self::QueueFull => "rate_limit_error",
            Self::NotReady | Self::ShuttingDown | Self::EngineStopped => {
                "service_unavailable_error"
            }
            Self::Internal(_) => "internal_server_error",
        }
    }

    /// The wire body.
    pub fn body(&self) -> ErrorBody {
        let (param, code) = match self {
            Self::Invalid { param, code, .. } => (param.clone(), code.clone()),
            Self::ModelNotFound(_) => (Some("model".into()), Some("model_not_found".into())),
            Self::Unauthorized => (None, Some("invalid_api_key".into())),
            Self::QueueFull => (None, Some("queue_full".into())),
            _ => (None, None),
        };
        ErrorBody {
            error: ErrorDetail {
                message: self.to_string(),
                kind: self.kind().to_string(),
                param,
                code,
            },
        }
    }

    /// Short label for the rejected-requests metric.
    pub fn reason_label(&self) -> &'static str {
        match self {
            Self::Invalid { .. } | Self::MalformedBody(_) => "invalid",
            Self::Unauthorized => "unauthorized",
            Self::ModelNotFound(_) | Self::RouteNotFound(_) => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::PayloadTooLarge(_) => "too_large",
            Self::UnsupportedMediaType(_) => "media_type",
            Self::QueueFull => "queue_full",
            Self::NotReady => "not_ready",
            Self::ShuttingDown => "shutting_down",
            Self::EngineStopped => "engine_stopped",
            Self::Timeout => "timeout",
            Self::Internal(_) => "internal",
        }
    }
}

impl From<SubmitError> for ApiError {
    /// The engine's refusals in OpenAI's terms: the field at fault, and vLLM's sentence and code
    /// for the context limit.
    fn from(e: SubmitError) -> Self {
        let invalid = |param: &str, message: String, code: Option<&str>| Self::Invalid {
            message,
            param: Some(param.to_string()),
            code: code.map(str::to_string),
        };
        match e {
            SubmitError::QueueFull => Self::QueueFull,
            SubmitError::ShuttingDown => Self::ShuttingDown,
            SubmitError::EngineStopped => Self::EngineStopped,
            SubmitError::EmptyPrompt => invalid(
                "prompt",
                "the prompt must contain at least one token".into(),
                None,
            ),
            SubmitError::TokenOutOfVocabulary { token, vocab_size } => invalid(
                "prompt",
                format!("token id {token} is out of vocabulary (vocab size {vocab_size})"),
                None,
            ),
            SubmitError::ContextLength {
                prompt_tokens,
                max_tokens,
                max_model_len,
            } => invalid(
                if max_tokens == 0 {
                    "prompt"
                } else {
                    "max_tokens"
                },
                format!(
                    "This model's maximum context length is {max_model_len} tokens. However, you requested {} tokens ({prompt_tokens} in the prompt, {max_tokens} for the completion). Please reduce the length of the prompt or completion.",
                    prompt_tokens + max_tokens
                ),
                Some(CONTEXT_LENGTH_EXCEEDED),
            ),
            SubmitError::ChoiceCount {
                n,
                best_of,
                max_sequences,
            } => {
                if n == 0 {
                    invalid("n", "n must be at least 1".into(), None)
                } else if best_of < n {
                    invalid(
                        "best_of",
                        format!("best_of ({best_of}) must be at least n ({n})"),
                        None,
                    )
                } else {
                    invalid(
                        if best_of > n { "best_of" } else { "n" },
                        format!(
                            "{best_of} sequences were asked for, but this server runs at most {max_sequences} at once (--max-num-seqs)"
                        ),
                        None,
                    )
                }
            }
            SubmitError::TooManyLogprobs { of, max, .. } => {
                let param = match of {
                    LogprobsOf::Output => "logprobs",
                    LogprobsOf::Prompt => "prompt_logprobs",
                };
                invalid(param, format!("{param} must be at most {max}"), None)
            }
            // The routes compile constraints first and name the field themselves
            // (`generation::compile`); this is the fallback wording.
            SubmitError::InvalidConstraint(reason) => Self::Invalid {
                message: format!("the output constraint does not compile: {reason}"),
                param: None,
                code: None,
            },
            SubmitError::SamplingOutOfRange { param, value } => {
                let (name, range) = match param {
                    SamplingParam::Temperature => ("temperature", "≥ 0"),
                    SamplingParam::TopP => ("top_p", "in (0, 1]"),
                    SamplingParam::MinP => ("min_p", "in [0, 1]"),
                    SamplingParam::RepetitionPenalty => ("repetition_penalty", "> 0"),
                };
                invalid(name, format!("{name} must be {range}, got {value}"), None)
            }
        }
    }
}

impl From<Failure> for ApiError {
    /// A grammar the engine could not follow is the request's fault (400, or an
    /// `invalid_request_error` event in a stream); any other failure is the server's (500, with
    /// the detail only in the log).
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Constraint(_) => Self::Invalid {
                message: failure.to_string(),
                param: None,
                code: None,
            },
            Failure::Internal(message) => {
                Self::Internal(format!("engine failed request: {message}"))
            }
        }
    }
}

/// `{"error": {...}}`.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct ErrorBody {
    /// The detail.
    pub error: ErrorDetail,
}

/// OpenAI's error object.
#[derive(Debug, Clone, Serialize, PartialEq, ToSchema)]
pub struct ErrorDetail {
    /// Human-readable message.
    pub message: String,
    /// Error class.
    #[serde(rename = "type")]
    #[schema(schema_with = error_kind_schema)]
    pub kind: String,
    /// The request field at fault (a dotted path for nested fields), or null.
    #[schema(required = true)]
    pub param: Option<String>,
    /// Machine-readable code (`context_length_exceeded`, `model_not_found`, `invalid_api_key`,
    /// `queue_full`), or null.
    #[schema(required = true)]
    pub code: Option<String>,
}

/// Every `type` an [`ApiError`] can have.
pub const ERROR_KINDS: &[&str] = &[
    "invalid_request_error",
    "authentication_error",
    "not_found_error",
    "rate_limit_error",
    "service_unavailable_error",
    "internal_server_error",
];

fn error_kind_schema() -> utoipa::openapi::schema::Schema {
    utoipa::openapi::schema::ObjectBuilder::new()
        .schema_type(utoipa::openapi::schema::Type::String)
        .enum_values(Some(ERROR_KINDS.iter().copied()))
        .into()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(detail) = &self {
            tracing::error!(detail = %detail, "internal error");
        }
        let status = self.status();
        let body = serde_json::to_vec(&self.body()).expect("error body serializes; this is a bug");
        let mut response =
            (status, [(header::CONTENT_TYPE, "application/json")], body).into_response();
        if matches!(self, Self::QueueFull) {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
        }
        response.extensions_mut().insert(self);
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shape_and_status() {
        let e = ApiError::invalid("temperature", "temperature must be in [0, 2], got 3");
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        let v = serde_json::to_value(e.body()).expect("serializes");
        assert_eq!(v["error"]["param"], "temperature");
        assert_eq!(v["error"]["type"], "invalid_request_error");
        assert!(v["error"]["code"].is_null());
        let r = ApiError::QueueFull.into_response();
        assert_eq!(r.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
    }

    #[test]
    fn every_error_type_is_one_the_document_lists() {
        let errors = [
            ApiError::invalid("x", "y"),
            ApiError::MalformedBody("x".into()),
            ApiError::Unauthorized,
            ApiError::ModelNotFound("x".into()),
            ApiError::RouteNotFound("x".into()),
            ApiError::MethodNotAllowed,
            ApiError::PayloadTooLarge(1),
            ApiError::UnsupportedMediaType("x".into()),
            ApiError::QueueFull,
            ApiError::NotReady,
            ApiError::ShuttingDown,
            ApiError::EngineStopped,
            ApiError::Timeout,
            ApiError::Internal("x".into()),
        ];
        for e in errors {
            assert!(ERROR_KINDS.contains(&e.kind()), "{e:?}");
        }
    }

    #[test]
    fn a_failing_grammar_is_a_400_and_other_failures_a_500() {
        let e = ApiError::from(Failure::Constraint("token 7 was rejected: too wide".into()));
        assert_eq!(e.status(), StatusCode::BAD_REQUEST);
        assert_eq!(
            e.body().error.message,
            "structured output: token 7 was rejected: too wide"
        );
        let e = ApiError::from(Failure::Internal("shape mismatch".into()));
        assert_eq!(e.status(), StatusCode::INTERNAL_SERVER_ERROR);
    }

    #[test]
    fn internal_errors_leak_nothing() {
        let e = ApiError::Internal("tensor shape mismatch at /secret/path".into());
        assert_eq!(e.body().error.message, "internal server error");
    }

    #[test]
    fn engine_refusals_get_vllms_wording_and_the_field_at_fault() {
        let e = ApiError::from(SubmitError::ContextLength {
            prompt_tokens: 60,
            max_tokens: 50,
            max_model_len: 100,
        });
        let body = e.body().error;
        assert_eq!(
            body.message,
            "This model's maximum context length is 100 tokens. However, you requested 110 tokens (60 in the prompt, 50 for the completion). Please reduce the length of the prompt or completion."
        );
        assert_eq!(body.code.as_deref(), Some(CONTEXT_LENGTH_EXCEEDED));
        assert_eq!(body.param.as_deref(), Some("max_tokens"));
        let prompt_only = ApiError::from(SubmitError::ContextLength {
            prompt_tokens: 120,
            max_tokens: 0,
            max_model_len: 100,
        });
        assert_eq!(prompt_only.body().error.param.as_deref(), Some("prompt"));
        let cases = [
            (SubmitError::EmptyPrompt, "prompt"),
            (
                SubmitError::TokenOutOfVocabulary {
                    token: 9,
                    vocab_size: 5,
                },
                "prompt",
            ),
            (
                SubmitError::ChoiceCount {
                    n: 2,
                    best_of: 1,
                    max_sequences: 8,
                },
                "best_of",
            ),
            (
                SubmitError::ChoiceCount {
                    n: 9,
                    best_of: 9,
                    max_sequences: 8,
                },
                "n",
            ),
            (
                SubmitError::TooManyLogprobs {
                    of: LogprobsOf::Prompt,
                    requested: 30,
                    max: 20,
                },
                "prompt_logprobs",
            ),
            (
                SubmitError::SamplingOutOfRange {
                    param: SamplingParam::TopP,
                    value: 0.0,
                },
                "top_p",
            ),
        ];
        for (refusal, param) in cases {
            let e = ApiError::from(refusal.clone());
            assert_eq!(e.status(), StatusCode::BAD_REQUEST, "{refusal:?}");
            assert_eq!(e.body().error.param.as_deref(), Some(param), "{refusal:?}");
        }
        assert_eq!(
            ApiError::from(SubmitError::QueueFull).status(),
            StatusCode::TOO_MANY_REQUESTS
        );
    }
}
