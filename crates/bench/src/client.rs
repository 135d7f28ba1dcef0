//! One streamed `/v1/completions` request, timed from the client's side.
//!
//! Invariants: the clock starts just before the request is sent and every time is taken when a
//! chunk's bytes arrive (so TTFT includes connection, queueing and prefill, as a user sees it);
//! the output length is forced (`max_tokens` = `min_tokens`, `ignore_eos`; llama.cpp reads
//! `max_tokens` as its `n_predict`) so every server does the same work, except that an output
//! under `--json-schema` ends when its JSON value is complete; a request never panics on what a server sends: anything
//! unexpected becomes the record's `error`. A request that fails to send (no response at all)
//! is sent once more with a fresh clock, so a stale keep-alive connection is not a failure.

use std::time::{Duration, Instant};

use futures::StreamExt;
use serde_json::{Map, Value, json};

use crate::sse::{Chunk, SseParser, parse_chunk};
use crate::stats::{RequestRecord, TimingSource};
use crate::workload::PlannedRequest;

/// Where and how to send requests.
#[derive(Debug, Clone)]
pub struct Target {
    /// Full URL of the completions endpoint.
    pub url: String,
    /// `model` field (omitted when None).
    pub model: Option<String>,
    /// Bearer token.
    pub api_key: Option<String>,
    /// Sampling temperature sent with each request.
    pub temperature: f64,
    /// Extra JSON fields merged into each body (they win over ours).
    pub extra_body: Map<String, Value>,
    /// Per-request time limit.
    pub request_timeout: Duration,
    /// Keep the server-reported prefill time a response carries (`timings.prompt_ms`).
    pub server_timings: bool,
    /// `response_format` sent with each request (`--json-schema`).
    pub response_format: Option<Value>,
}

/// The JSON body for one request.
pub fn request_body(target: &Target, req: &PlannedRequest) -> Value {
    let mut body = json!({
        "prompt": req.prompt,
        "max_tokens": req.output_tokens,
        // vLLM and ours: do not stop before max_tokens; llama.cpp: ignore_eos.
        "min_tokens": req.output_tokens,
        "ignore_eos": true,
        "temperature": target.temperature,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let obj = body
        .as_object_mut()
        .expect("json! object literal; this is a bug");
    if let Some(m) = &target.model {
        obj.insert("model".into(), Value::String(m.clone()));
    }
    if let Some(format) = &target.response_format {
        obj.insert("response_format".into(), format.clone());
    }
    for (k, v) in &target.extra_body {
        obj.insert(k.clone(), v.clone());
    }
    body
}

/// Accumulates what a stream's events say into a record.
#[derive(Debug)]
pub struct StreamTimer {
    sent: Instant,
    last_text: Option<Instant>,
    record: RequestRecord,
    text_chunks: u64,
    completion_tokens: Option<u64>,
    done: bool,
}

impl StreamTimer {
    /// Starts the clock for a request that is about to be sent.
    pub fn start(req: &PlannedRequest, start_s: f64) -> Self {
        Self {
            sent: Instant::now(),
            last_text: None,
            record: RequestRecord {
                start_s,
                requested_output_tokens: req.output_tokens,
                requested_prompt_tokens: req.prompt_tokens,
                ..RequestRecord::default()
            },
            text_chunks: 0,
            completion_tokens: None,
            done: false,
        }
    }

    /// Handles the SSE events of one read of the stream, all received at `now`; returns false
    /// once the stream is over. The gap since the previous read that carried text is spread
    /// evenly over this read's text events: events that arrive in one read have no arrival
    /// times of their own, and timing each at `now` would give zero gaps whenever the client
    /// falls behind (as a busy machine makes it), so inter-token percentiles would swing with
    /// the load instead of measuring the server. Text events that share the first text read
    /// give no gap at all.
    pub fn on_read(&mut self, events: &[String], now: Instant) -> bool {
        let mut text_events = 0u32;
        let mut open = true;
        for data in events {
            if !open {
                break;
            }
            let (has_text, more) = self.on_chunk(&parse_chunk(data));
            text_events += u32::from(has_text);
            open = more;
        }
        if text_events > 0 {
            match self.last_text {
                None => self.record.ttft_s = Some((now - self.sent).as_secs_f64()),
                Some(prev) => {
                    let each = (now - prev).as_secs_f64() / f64::from(text_events);
                    self.record
                        .itl_s
                        .extend(std::iter::repeat_n(each, text_events as usize));
                }
            }
            self.last_text = Some(now);
        }
        open
    }

    /// Takes in what one chunk says; returns (whether it carried text, whether the stream is
    /// still open).
    fn on_chunk(&mut self, chunk: &Chunk) -> (bool, bool) {
        if let Some(e) = &chunk.error {
            self.record.error.get_or_insert(e.clone());
            self.done = true;
            return (false, false);
        }
        let has_text = chunk.text_choices > 0;
        if has_text {
            self.text_chunks += 1;
        }
        if let Some(t) = chunk.timings {
            self.record.server_prefill_s = Some(t.prompt_ms / 1000.0);
            self.record.server_timing_source = Some(TimingSource::ResponseTimings);
        }
        if let Some(u) = chunk.usage {
            if u.prompt_tokens.is_some() {
                self.record.prompt_tokens = u.prompt_tokens;
            }
            if u.completion_tokens.is_some() {
                self.completion_tokens = u.completion_tokens;
            }
        }
        if chunk.done {
            self.done = true;
        }
        (has_text, !self.done)
    }

    /// Ends the request at `now` (with `error` if the transport failed) and returns its record.
    pub fn finish(mut self, now: Instant, error: Option<String>) -> RequestRecord {
        self.record.e2e_s = (now - self.sent).as_secs_f64();
        if let Some(e) = error {
            self.record.error.get_or_insert(e);
        }
        if self.record.error.is_none() && !self.done {
            self.record.error = Some("stream ended without [DONE]".into());
        }
        if self.record.error.is_none() && self.record.ttft_s.is_none() {
            // One-token outputs may arrive as a single chunk with an empty-text token (a special
            // or a partial UTF-8 byte); the first content is then the end of the stream.
            self.record.ttft_s = Some(self.record.e2e_s);
        }
        self.record.output_tokens = self.completion_tokens.unwrap_or(self.text_chunks);
        self.record
    }
}

/// An error with its chain of causes (reqwest's own message rarely says what went wrong).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(": ");
        text.push_str(&c.to_string());
        cause = c.source();
    }
    text
}

/// Sends one request and times its stream (keeping server timings only if the target asks).
pub async fn send(
    client: &reqwest::Client,
    target: &Target,
    req: &PlannedRequest,
    start_s: f64,
) -> RequestRecord {
    let mut record = send_timed(client, target, req, start_s).await;
    if !target.server_timings {
        record.server_prefill_s = None;
        record.server_timing_source = None;
    }
    record
}

async fn send_timed(
    client: &reqwest::Client,
    target: &Target,
    req: &PlannedRequest,
    start_s: f64,
) -> RequestRecord {
    let body = request_body(target, req);
    let mut retried = false;
    let (mut timer, response) = loop {
        let timer = StreamTimer::start(req, start_s);
        let mut builder = client
            .post(&target.url)
            .timeout(target.request_timeout)
            .json(&body);
        if let Some(key) = &target.api_key {
            builder = builder.bearer_auth(key);
        }
        match builder.send().await {
            Ok(r) => break (timer, r),
            // A kept-alive connection that the server closed just as we reused it fails before
            // any response (llama-server closes them after a few requests): send once more,
            // on a new connection, timed afresh.
            Err(e) if !retried && e.is_request() && !e.is_timeout() => retried = true,
            Err(e) => {
                let why = format!("request failed: {}", with_causes(&e));
                return timer.finish(Instant::now(), Some(why));
            }
        }
    };
    let status = response.status();
    if !status.is_success() {
        let text = response.text().await.unwrap_or_default();
        let msg = crate::sse::parse_chunk(&text)
            .error
            .unwrap_or_else(|| text.chars().take(200).collect());
        return timer.finish(Instant::now(), Some(format!("HTTP {status}: {msg}")));
    }
    let mut parser = SseParser::new();
    let mut stream = response.bytes_stream();
    while let Some(item) = stream.next().await {
        let now = Instant::now();
        match item {
            Ok(bytes) => {
                if !timer.on_read(&parser.push(&bytes), now) {
                    return timer.finish(now, None);
                }
            }
            Err(e) => {
                return timer.finish(now, Some(format!("stream failed: {}", with_causes(&e))));
            }
        }
    }
    let now = Instant::now();
    if let Some(data) = parser.finish() {
        timer.on_read(&[data], now);
    }
    timer.finish(now, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn planned() -> PlannedRequest {
        PlannedRequest {
            prompt: "The of".into(),
            prompt_tokens: 2,
            output_tokens: 3,
        }
    }

    fn target() -> Target {
        let mut extra = Map::new();
        extra.insert("temperature".into(), json!(0.7));
        extra.insert("cache_prompt".into(), json!(false));
        Target {
            url: "http://127.0.0.1:1/v1/completions".into(),
            model: Some("m".into()),
            api_key: None,
            temperature: 0.0,
            extra_body: extra,
            request_timeout: Duration::from_secs(1),
            server_timings: true,
            response_format: None,
        }
    }

    #[test]
    fn body_forces_the_output_length_and_merges_extras() {
        let b = request_body(&target(), &planned());
        assert_eq!(b["max_tokens"], 3);
        assert_eq!(b["min_tokens"], 3);
        assert!(
            b.get("n_predict").is_none(),
            "servers that check fields refuse it"
        );
        assert!(b.get("response_format").is_none());
        let mut t = target();
        t.response_format = Some(json!({"type": "json_object"}));
        assert_eq!(
            request_body(&t, &planned())["response_format"]["type"],
            "json_object"
        );
        assert_eq!(b["ignore_eos"], true);
        assert_eq!(b["stream_options"]["include_usage"], true);
        assert_eq!(b["model"], "m");
        assert_eq!(b["temperature"], 0.7, "extra body wins");
        assert_eq!(b["cache_prompt"], false);
    }

    #[test]
    fn timer_measures_ttft_gaps_and_prefers_server_usage() {
        let t0 = Instant::now();
        let mut timer = StreamTimer::start(&planned(), 1.5);
        let at = |ms: u64| timer.sent + Duration::from_millis(ms);
        let (a, b, c, d) = (at(100), at(130), at(170), at(171));
        let read = |events: &[&str]| events.iter().map(|e| e.to_string()).collect::<Vec<_>>();
        assert!(timer.on_read(&read(&[r#"{"choices":[{"text":"x"}]}"#]), a));
        assert!(timer.on_read(&read(&[r#"{"choices":[{"text":"y"}]}"#]), b));
        assert!(timer.on_read(
            &read(&[
                r#"{"choices":[{"text":"z","finish_reason":"length"}]}"#,
                r#"{"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3},"timings":{"prompt_n":2,"prompt_ms":99.5}}"#,
            ]),
            c
        ));
        assert!(!timer.on_read(&read(&["[DONE]"]), d));
        let r = timer.finish(d, None);
        assert!(r.ok());
        assert_eq!(r.start_s, 1.5);
        assert!((r.ttft_s.unwrap() - 0.1).abs() < 1e-9);
        assert_eq!(r.itl_s.len(), 2);
        assert!((r.itl_s[0] - 0.03).abs() < 1e-9 && (r.itl_s[1] - 0.04).abs() < 1e-9);
        assert!((r.e2e_s - 0.171).abs() < 1e-9);
        assert_eq!((r.prompt_tokens, r.output_tokens), (Some(2), 3));
        assert_eq!(
            r.server_prefill_s,
            Some(0.0995),
            "llama-server's timings.prompt_ms"
        );
        assert_eq!(r.server_timing_source, Some(TimingSource::ResponseTimings));
        assert!(t0 <= d);
    }

    #[test]
    fn timer_reports_errors_and_truncated_streams() {
        let mut timer = StreamTimer::start(&planned(), 0.0);
        let now = timer.sent;
        assert!(!timer.on_read(&[r#"{"error":{"message":"engine died"}}"#.into()], now));
        assert_eq!(
            timer.finish(now, None).error.as_deref(),
            Some("engine died")
        );

        let mut timer = StreamTimer::start(&planned(), 0.0);
        let now = timer.sent;
        assert!(timer.on_read(&[r#"{"choices":[{"text":"x"}]}"#.into()], now));
        let r = timer.finish(now, None);
        assert_eq!(r.error.as_deref(), Some("stream ended without [DONE]"));
        // Without usage, output tokens are the text chunks counted.
        assert_eq!(r.output_tokens, 1);
    }

    #[test]
    fn events_bunched_in_one_read_share_its_gap() {
        let mut timer = StreamTimer::start(&planned(), 0.0);
        let sent = timer.sent;
        let at = |ms: u64| sent + Duration::from_millis(ms);
        let text = |t: &str| format!(r#"{{"choices":[{{"text":"{t}"}}]}}"#);
        assert!(timer.on_read(&[text("a")], at(50)));
        // Four tokens reach the client together 40 ms later: 10 ms each, not 40, 0, 0, 0.
        assert!(timer.on_read(&[text("b"), text("c"), text("d"), text("e")], at(90)));
        assert!(timer.on_read(&[text("f")], at(100)));
        assert!(!timer.on_read(&["[DONE]".into()], at(100)));
        let r = timer.finish(at(100), None);
        assert_eq!(r.itl_s.len(), 5);
        assert!(
            r.itl_s.iter().all(|&g| (g - 0.01).abs() < 1e-9),
            "{:?}",
            r.itl_s
        );
        assert_eq!(r.output_tokens, 6);
    }
}
