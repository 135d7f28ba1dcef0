//! The error responses of each kind of endpoint, for the OpenAPI document: which statuses an
//! operation can answer with, each with the one error body ([`ErrorBody`]).
//!
//! Invariants: every status listed is one [`crate::error::ApiError::status`] gives to an error
//! the endpoint's code path can return; 500 is listed everywhere, since a panicking handler is
//! answered with it; 401 is not listed here but added to the protected operations when an API
//! key is configured (`super::protect`); 405 and unknown paths (404) belong to no operation.

use utoipa::IntoResponses;

use crate::error::ErrorBody;

/// Errors of the generating endpoints (`/v1/completions`, `/v1/chat/completions`).
#[derive(IntoResponses)]
pub enum GenerationErrors {
    /// A field is missing, of the wrong type or out of range (`param` names it), an unknown
    /// field, a non-JSON or non-object body, a constraint that cannot be enforced (also one the
    /// grammar engine stops following mid-generation), or a prompt longer than the context
    /// (`code: context_length_exceeded`).
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// The `model` is not the served one (`code: model_not_found`).
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// The request body did not arrive whole in time.
    #[response(status = 408)]
    Timeout(ErrorBody),
    /// The body is over 4 MiB.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// `Content-Type` is not `application/json`.
    #[response(status = 415)]
    MediaType(ErrorBody),
    /// The request queue is full (`code: queue_full`).
    #[response(
        status = 429,
        headers(("Retry-After" = u64, description = "Seconds to wait before retrying"))
    )]
    QueueFull(ErrorBody),
    /// An internal fault (a failed forward pass); the message carries no detail.
    #[response(status = 500)]
    Internal(ErrorBody),
    /// The model is still loading, the server is shutting down, or the engine stopped.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// Errors of `/tokenize` and `/detokenize` (no queue, no generation).
#[derive(IntoResponses)]
pub enum TokenizerErrors {
    /// A field is missing, of the wrong type or out of range (`param` names it), an unknown
    /// field, or a non-JSON or non-object body.
    #[response(status = 400)]
    BadRequest(ErrorBody),
    /// The `model` is not the served one (`code: model_not_found`).
    #[response(status = 404)]
    NotFound(ErrorBody),
    /// The request body did not arrive whole in time.
    #[response(status = 408)]
    Timeout(ErrorBody),
    /// The body is over 4 MiB.
    #[response(status = 413)]
    TooLarge(ErrorBody),
    /// `Content-Type` is not `application/json`.
    #[response(status = 415)]
    MediaType(ErrorBody),
    /// An internal fault; the message carries no detail.
    #[response(status = 500)]
    Internal(ErrorBody),
    /// The model is still loading or the server is shutting down.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// Errors of endpoints that need the loaded model but take no body (`/v1/models`) and of the
/// readiness probe (`/ready`).
#[derive(IntoResponses)]
pub enum UnavailableErrors {
    /// An internal fault; the message carries no detail.
    #[response(status = 500)]
    Internal(ErrorBody),
    /// The model is still loading, the server is shutting down, or the engine stopped.
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// Errors of the liveness probe (`/health`).
#[derive(IntoResponses)]
pub enum HealthErrors {
    /// An internal fault; the message carries no detail.
    #[response(status = 500)]
    Internal(ErrorBody),
    /// The engine thread died (the process exits and should be restarted).
    #[response(status = 503)]
    Unavailable(ErrorBody),
}

/// Errors of endpoints that always answer (`/metrics`, `/openapi.json`).
#[derive(IntoResponses)]
pub enum InternalErrors {
    /// An internal fault; the message carries no detail.
    #[response(status = 500)]
    Internal(ErrorBody),
}
