//! Server-sent events: byte stream → `data:` payloads → what a completion chunk says.
//!
//! Invariants: bytes may arrive split anywhere (inside a line, inside a UTF-8 character, between
//! `\r` and `\n`); an event is emitted only when its blank line has arrived; comment lines (`:`)
//! and fields other than `data` are ignored; several `data:` lines of one event are joined with
//! `\n` as the SSE spec says. Chunk parsing accepts the OpenAI completions shape used by vLLM,
//! llama.cpp's server and ours, and never fails on fields it does not know.

use serde_json::Value;

/// Incremental SSE parser: feed bytes, get complete events' data.
#[derive(Debug, Default)]
pub struct SseParser {
    buf: Vec<u8>,
    data: Vec<String>,
}

impl SseParser {
    /// A parser with nothing buffered.
    pub fn new() -> Self {
        Self::default()
    }

    /// Feeds bytes; returns the data of every event completed by them, in order.
    pub fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut events = Vec::new();
        while let Some(nl) = self.buf.iter().position(|&b| b == b'\n' || b == b'\r') {
            // A lone `\r` at the end may be the first half of `\r\n`: wait for more bytes.
            if self.buf[nl] == b'\r' && nl + 1 == self.buf.len() {
                break;
            }
            let skip = if self.buf[nl] == b'\r' && self.buf[nl + 1] == b'\n' {
                2
            } else {
                1
            };
            let line: Vec<u8> = self.buf.drain(..nl + skip).take(nl).collect();
            let line = String::from_utf8_lossy(&line);
            if line.is_empty() {
                if !self.data.is_empty() {
                    events.push(self.data.join("\n"));
                    self.data.clear();
                }
            } else if let Some(rest) = line.strip_prefix("data:") {
                self.data
                    .push(rest.strip_prefix(' ').unwrap_or(rest).to_string());
            }
        }
        events
    }

    /// Data of an event left unterminated when the stream closed, if any.
    pub fn finish(&mut self) -> Option<String> {
        if !self.buf.is_empty() {
            let rest = std::mem::take(&mut self.buf);
            let line = String::from_utf8_lossy(&rest);
            if let Some(d) = line.strip_prefix("data:") {
                self.data.push(d.strip_prefix(' ').unwrap_or(d).to_string());
            }
        }
        (!self.data.is_empty()).then(|| std::mem::take(&mut self.data).join("\n"))
    }
}

/// Token counts from a chunk's `usage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChunkUsage {
    /// `usage.prompt_tokens`.
    pub prompt_tokens: Option<u64>,
    /// `usage.completion_tokens`.
    pub completion_tokens: Option<u64>,
}

/// The `timings` object llama-server puts on a stream's final chunk (with
/// `timings_per_token`, on every chunk).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ServerTimings {
    /// `prompt_ms`: from the slot starting on the prompt to the first token sampled.
    pub prompt_ms: f64,
    /// `prompt_n`: prompt tokens computed (not taken from its cache).
    pub prompt_n: Option<u64>,
    /// `cache_n`: prompt tokens reused from its cache.
    pub cache_n: Option<u64>,
}

/// What one SSE event of a completions stream carries.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Chunk {
    /// `data: [DONE]`.
    pub done: bool,
    /// Concatenated `choices[*].text` (empty when none).
    pub text: String,
    /// Number of choices in the chunk that carried text (a chunk may hold several tokens' text
    /// but servers send one token per chunk when streaming).
    pub text_choices: usize,
    /// `usage`, when present and not null.
    pub usage: Option<ChunkUsage>,
    /// `error.message` (or the whole error value) for an error event.
    pub error: Option<String>,
    /// `choices[*].finish_reason` when set.
    pub finish_reason: Option<String>,
    /// `timings`, when present with a `prompt_ms` number.
    pub timings: Option<ServerTimings>,
}

/// Parses one event's data; a non-JSON payload is reported as an error chunk.
pub fn parse_chunk(data: &str) -> Chunk {
    let trimmed = data.trim();
    if trimmed == "[DONE]" {
        return Chunk {
            done: true,
            ..Chunk::default()
        };
    }
    let value: Value = match serde_json::from_str(trimmed) {
        Ok(v) => v,
        Err(e) => {
            return Chunk {
                error: Some(format!("unparseable event ({e}): {}", clip(trimmed))),
                ..Chunk::default()
            };
        }
    };
    let mut chunk = Chunk::default();
    if let Some(err) = value.get("error").filter(|e| !e.is_null()) {
        let msg = err
            .get("message")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| clip(&err.to_string()));
        chunk.error = Some(msg);
    }
    if let Some(choices) = value.get("choices").and_then(Value::as_array) {
        for c in choices {
            if let Some(t) = c.get("text").and_then(Value::as_str)
                && !t.is_empty()
            {
                chunk.text.push_str(t);
                chunk.text_choices += 1;
            }
            if let Some(r) = c.get("finish_reason").and_then(Value::as_str) {
                chunk.finish_reason = Some(r.to_string());
            }
        }
    }
    if let Some(u) = value.get("usage").filter(|u| u.is_object()) {
        chunk.usage = Some(ChunkUsage {
            prompt_tokens: u.get("prompt_tokens").and_then(Value::as_u64),
            completion_tokens: u.get("completion_tokens").and_then(Value::as_u64),
        });
    }
    if let Some(t) = value.get("timings")
        && let Some(prompt_ms) = t.get("prompt_ms").and_then(Value::as_f64)
    {
        chunk.timings = Some(ServerTimings {
            prompt_ms,
            prompt_n: t.get("prompt_n").and_then(Value::as_u64),
            cache_n: t.get("cache_n").and_then(Value::as_u64),
        });
    }
    chunk
}

/// Shortens text for an error message.
fn clip(s: &str) -> String {
    const MAX: usize = 200;
    if s.len() <= MAX {
        return s.to_string();
    }
    let mut end = MAX;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_survive_arbitrary_splits() {
        let stream = "data: {\"a\":1}\n\n: keep-alive\n\ndata: é\r\n\r\nevent: x\ndata: [DONE]\n\n";
        let bytes = stream.as_bytes();
        // Every split point, including inside the two-byte `é` and between `\r` and `\n`.
        for cut in 0..=bytes.len() {
            let mut p = SseParser::new();
            let mut got = p.push(&bytes[..cut]);
            got.extend(p.push(&bytes[cut..]));
            assert_eq!(got, vec!["{\"a\":1}", "é", "[DONE]"], "cut at {cut}");
            assert_eq!(p.finish(), None);
        }
    }

    #[test]
    fn multi_line_data_is_joined_and_unterminated_data_is_recovered() {
        let mut p = SseParser::new();
        assert_eq!(p.push(b"data: a\ndata:b\n\n"), vec!["a\nb"]);
        assert!(p.push(b"data: tail").is_empty());
        assert_eq!(p.finish().as_deref(), Some("tail"));
    }

    #[test]
    fn parses_text_usage_finish_and_done() {
        let c = parse_chunk(r#"{"choices":[{"index":0,"text":" the","finish_reason":null}]}"#);
        assert_eq!((c.text.as_str(), c.text_choices), (" the", 1));
        assert!(c.usage.is_none() && c.error.is_none() && !c.done);

        // llama.cpp puts usage on the final chunk next to the finish reason.
        let c = parse_chunk(
            r#"{"choices":[{"text":"","finish_reason":"length"}],"usage":{"prompt_tokens":128,"completion_tokens":64,"total_tokens":192},"timings":{}}"#,
        );
        assert_eq!(c.text_choices, 0);
        assert_eq!(c.finish_reason.as_deref(), Some("length"));
        assert_eq!(
            c.usage,
            Some(ChunkUsage {
                prompt_tokens: Some(128),
                completion_tokens: Some(64)
            })
        );

        // vLLM/OpenAI: usage-only chunk with no choices; intermediate chunks carry `usage: null`.
        let c = parse_chunk(r#"{"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7}}"#);
        assert_eq!(c.usage.and_then(|u| u.completion_tokens), Some(7));
        let c = parse_chunk(r#"{"choices":[{"text":"x"}],"usage":null}"#);
        assert!(c.usage.is_none());

        assert!(parse_chunk(" [DONE] ").done);
    }

    #[test]
    fn parses_llama_server_timings() {
        // The final chunk of a llama-server /v1/completions stream (shape of its
        // server_slot_stats::to_json).
        let c = parse_chunk(
            r#"{"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}],"created":1,"model":"m","object":"text_completion","usage":{"completion_tokens":1,"prompt_tokens":32,"total_tokens":33},"id":"x","timings":{"cache_n":1,"prompt_n":31,"prompt_ms":41.25,"prompt_per_token_ms":1.33,"prompt_per_second":751.5,"predicted_n":1,"predicted_ms":0.001,"predicted_per_token_ms":0.0,"predicted_per_second":0.0}}"#,
        );
        assert_eq!(
            c.timings,
            Some(ServerTimings {
                prompt_ms: 41.25,
                prompt_n: Some(31),
                cache_n: Some(1)
            })
        );
        // An empty or partial object is no reading.
        assert_eq!(parse_chunk(r#"{"choices":[],"timings":{}}"#).timings, None);
        assert_eq!(
            parse_chunk(r#"{"timings":{"prompt_ms":"5"}}"#).timings,
            None
        );
        assert_eq!(parse_chunk(r#"{"choices":[]}"#).timings, None);
    }

    #[test]
    fn errors_are_reported() {
        let c = parse_chunk(r#"{"error":{"message":"queue full","type":"x","code":429}}"#);
        assert_eq!(c.error.as_deref(), Some("queue full"));
        let c = parse_chunk("not json");
        assert!(c.error.unwrap().starts_with("unparseable event"));
        let c = parse_chunk(r#"{"error":"boom"}"#);
        assert_eq!(c.error.as_deref(), Some("\"boom\""));
    }
}
