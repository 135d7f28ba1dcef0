//! Server-sent events framing for streamed completions.
//!
//! Invariants: every event is `data: <json>`; errors use the same `{"error": {...}}` body as
//! JSON responses; the stream handed to [`sse_response`] is expected to end with [`done`]
//! (the route modules guarantee it); keep-alive comments are sent while nothing else is.

use std::convert::Infallible;
use std::time::Duration;

use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::Stream;
use serde::Serialize;

use crate::error::ApiError;

/// `data: <json>`.
pub fn json<T: Serialize>(value: &T) -> Event {
    Event::default()
        .data(serde_json::to_string(value).expect("wire types serialize; this is a bug"))
}

/// `data: {"error": {...}}`.
pub fn error(err: &ApiError) -> Event {
    json(&err.body())
}

/// `data: [DONE]`, the last event of every stream.
pub fn done() -> Event {
    Event::default().data("[DONE]")
}

/// Wraps an event stream in a `text/event-stream` response with a `: keep-alive` comment
/// whenever nothing was sent for `keep_alive`.
pub fn sse_response<S>(events: S, keep_alive: Duration) -> Response
where
    S: Stream<Item = Result<Event, Infallible>> + Send + 'static,
{
    let mut response = Sse::new(events)
        .keep_alive(KeepAlive::new().interval(keep_alive).text("keep-alive"))
        .into_response();
    // Tell reverse proxies (nginx) not to buffer the stream.
    response.headers_mut().insert(
        "x-accel-buffering",
        axum::http::HeaderValue::from_static("no"),
    );
    response
}
