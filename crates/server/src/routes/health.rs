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

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use crate::state::{AppState, StateConfig};

    fn unloaded() -> AppState {
        AppState::new(StateConfig {
            model_name: "m".into(),
            api_key: None,
            max_inflight: 4,
            cors_allow_origin: Vec::new(),
            timeouts: Default::default(),
            allow_unknown_fields: false,
        })
    }

    async fn call(state: &AppState, method: &str, path: &str, body: &str) -> (u16, String) {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .expect("request builds");
        let response = crate::app(state.clone())
            .oneshot(request)
            .await
            .expect("infallible");
        let status = response.status().as_u16();
        let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .expect("body");
        (status, String::from_utf8_lossy(&bytes).into_owned())
    }

    #[tokio::test]
    async fn not_ready_until_the_model_is_loaded() {
        let state = unloaded();
        assert_eq!(call(&state, "GET", "/health", "").await.0, 200);
        let (status, body) = call(&state, "GET", "/ready", "").await;
        assert_eq!(status, 503);
        assert!(body.contains("still loading"), "{body}");
        let (status, body) = call(&state, "POST", "/v1/completions", r#"{"prompt":"hi"}"#).await;
        assert_eq!(status, 503);
        assert!(
            body.contains("\"type\":\"service_unavailable_error\""),
            "{body}"
        );
        state.start_draining();
        let (status, body) =
            call(&state, "POST", "/v1/chat/completions", r#"{"messages":[]}"#).await;
        assert_eq!(status, 503);
        assert!(body.contains("shutting down"), "{body}");
        let (status, metrics) = call(&state, "GET", "/metrics", "").await;
        assert_eq!(status, 200);
        assert!(
            metrics.contains("vllm:num_requests_waiting{model_name=\"m\"} 0"),
            "{metrics}"
        );
        // The completion was rejected; the /ready probe was not a rejected request.
        assert!(
            metrics
                .contains("mpt:requests_rejected_total{model_name=\"m\",reason=\"not_ready\"} 1"),
            "{metrics}"
        );
    }
}
