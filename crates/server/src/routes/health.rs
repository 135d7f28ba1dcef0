//! Probes and metrics: `GET /health` (liveness), `GET /ready` (readiness), `GET /metrics`.
//!
//! Invariants: `/health` is 200 while the process runs and the engine thread (once started) is
//! alive; `/ready` is 200 only with the model loaded, the engine alive and no drain in progress;
//! none of these needs the API key.

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::state::AppState;

/// Liveness: 503 only if the engine thread died.
pub async fn health(State(state): State<AppState>) -> Response {
    match state.engine() {
        Some(engine) if !engine.is_alive() => ApiError::EngineStopped.into_response(),
        _ => StatusCode::OK.into_response(),
    }
}

/// Readiness: 503 while loading, draining, or with a dead engine.
pub async fn ready(State(state): State<AppState>) -> Response {
    match state.loaded() {
        Ok(loaded) if loaded.engine.is_alive() => StatusCode::OK.into_response(),
        Ok(_) => ApiError::EngineStopped.into_response(),
        Err(e) => e.into_response(),
    }
}

/// Prometheus text exposition.
pub async fn metrics(State(state): State<AppState>) -> Response {
    let stats = state.engine().map(|e| e.stats());
    let body = state.metrics().render(stats.as_ref());
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response()
}
