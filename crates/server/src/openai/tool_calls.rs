//! Tool calls parsed back out of generated text (the syntax of [`super::tools`]), incrementally,
//! so that streams can send OpenAI's deltas: the first piece of each call carries its index,
//! id and name, later pieces carry pieces of its `arguments`.
//!
//! Invariants: the concatenation of a call's argument pieces is its arguments text exactly as
//! generated; text that may still turn out to open a call is held back until it does not; text
//! outside calls is content; a call cut short (`max_tokens`) keeps what it has, and one cut
//! before its name arrived is dropped (it has no OpenAI shape, and it is not answer text).

use mpt_engine::FinishReason;
use rand::Rng;
use serde_json::Value;

use super::tools::{CALL_CLOSE, CALL_OPEN, CALL_SEPARATOR};
use super::types::{FunctionCall, FunctionCallDelta, ToolCall, ToolCallDelta, finish_reason};

/// What a piece of generated text contributed.
#[derive(Debug, Clone, PartialEq)]
pub enum Piece {
    /// Plain answer text.
    Content(String),
    /// A call begins.
    CallStart {
        /// Index among the choice's calls.
        index: usize,
        /// Its `call_...` id.
        id: String,
        /// Function name.
        name: String,
    },
    /// More of a call's arguments.
    Arguments {
        /// Index among the choice's calls.
        index: usize,
        /// The next piece of its arguments text.
        text: String,
    },
}

/// One call as parsed so far.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedCall {
    /// `call_...`.
    pub id: String,
    /// Function name.
    pub name: String,
    /// Arguments text (a JSON object once complete).
    pub arguments: String,
    /// Its closing tag was seen.
    pub complete: bool,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// Outside calls.
    Text,
    /// After the opening tag, before the arguments value.
    Header,
    /// Inside the arguments value.
    Arguments,
    /// After the arguments value, up to the closing tag.
    Closing,
    /// After a call: another one, or the end.
    Between,
}

/// A JSON value's extent, scanned one character at a time.
#[derive(Debug, Clone, Copy, Default)]
struct JsonScan {
    depth: usize,
    in_string: bool,
    escaped: bool,
}

impl JsonScan {
    /// Feeds one character; true when it ends the (object or array) value.
    fn push(&mut self, c: char) -> bool {
        if self.in_string {
            match (self.escaped, c) {
                (true, _) => self.escaped = false,
                (false, '\\') => self.escaped = true,
                (false, '"') => self.in_string = false,
                _ => {}
            }
            return false;
        }
        match c {
            '"' => self.in_string = true,
            '{' | '[' => self.depth += 1,
            '}' | ']' => {
                self.depth = self.depth.saturating_sub(1);
                return self.depth == 0;
            }
            _ => {}
        }
        false
    }
}

/// Incremental parser for one choice's text.
#[derive(Debug, Clone)]
pub struct ToolCallParser {
    state: State,
    /// Text not yet accounted for in the current state.
    buf: String,
    scan: JsonScan,
    calls: Vec<ParsedCall>,
}

impl Default for ToolCallParser {
    fn default() -> Self {
        Self::new()
    }
}

/// A fresh `call_` id (24 random letters and digits, as OpenAI's).
pub fn new_call_id() -> String {
    let suffix: String = rand::rng()
        .sample_iter(&rand::distr::Alphanumeric)
        .take(24)
        .map(char::from)
        .collect();
    format!("call_{suffix}")
}

/// Length of the longest suffix of `text` that is a proper prefix of `tag`.
fn partial_suffix(text: &str, tag: &str) -> usize {
    (1..tag.len().min(text.len() + 1))
        .rev()
        .find(|&k| text.is_char_boundary(text.len() - k) && text.ends_with(&tag[..k]))
        .unwrap_or(0)
}

impl ToolCallParser {
    /// A parser at the start of an answer.
    pub fn new() -> Self {
        Self {
            state: State::Text,
            buf: String::new(),
            scan: JsonScan::default(),
            calls: Vec::new(),
        }
    }

    /// The calls so far.
    pub fn calls(&self) -> &[ParsedCall] {
        &self.calls
    }

    /// Feeds newly generated text.
    pub fn push(&mut self, text: &str) -> Vec<Piece> {
        self.buf.push_str(text);
        let mut out = Vec::new();
        loop {
            let before = (self.state, self.buf.len());
            match self.state {
                State::Text => self.text(&mut out),
                State::Header => self.header(&mut out),
                State::Arguments => self.arguments(&mut out),
                State::Closing => self.closing(),
                State::Between => self.between(&mut out),
            }
            if (self.state, self.buf.len()) == before {
                return out;
            }
        }
    }

    /// The end of the answer: what was held back, and what a cut-short call leaves.
    pub fn finish(&mut self) -> Vec<Piece> {
        let rest = std::mem::take(&mut self.buf);
        match self.state {
            State::Text | State::Between if !rest.is_empty() => vec![Piece::Content(rest)],
            _ => Vec::new(),
        }
    }

    fn text(&mut self, out: &mut Vec<Piece>) {
        if let Some(at) = self.buf.find(CALL_OPEN) {
            if at > 0 {
                out.push(Piece::Content(self.buf[..at].to_string()));
            }
            self.buf.drain(..at + CALL_OPEN.len());
            self.state = State::Header;
            return;
        }
        let keep = partial_suffix(&self.buf, CALL_OPEN);
        let emit = self.buf.len() - keep;
        if emit > 0 {
            out.push(Piece::Content(self.buf[..emit].to_string()));
            self.buf.drain(..emit);
        }
    }

    /// Waits for `{"name":"NAME","arguments":` (the grammar's compact layout; whitespace
    /// between the tokens is tolerated).
    fn header(&mut self, out: &mut Vec<Piece>) {
        let squeezed: String = self.buf.chars().filter(|c| !c.is_whitespace()).collect();
        let Some(rest) = squeezed.strip_prefix("{\"name\":\"") else {
            return;
        };
        let Some(end) = rest.find('"') else {
            return;
        };
        let name = rest[..end].to_string();
        let after = &rest[end + 1..];
        let key = ",\"arguments\":";
        if after.len() < key.len() || !after.starts_with(key) {
            return;
        }
        // Drop the original text up to and including the key's colon.
        let colon = self
            .buf
            .match_indices(':')
            .nth(1)
            .map(|(i, _)| i)
            .expect("two colons were seen: this is a bug");
        self.buf.drain(..=colon);
        let id = new_call_id();
        out.push(Piece::CallStart {
            index: self.calls.len(),
            id: id.clone(),
            name: name.clone(),
        });
        self.calls.push(ParsedCall {
            id,
            name,
            arguments: String::new(),
            complete: false,
        });
        self.scan = JsonScan::default();
        self.state = State::Arguments;
    }

    fn arguments(&mut self, out: &mut Vec<Piece>) {
        let call = self
            .calls
            .last_mut()
            .expect("a call is open: this is a bug");
        let mut taken = 0;
        let mut done = false;
        for c in self.buf.chars() {
            taken += c.len_utf8();
            if self.scan.push(c) {
                done = true;
                break;
            }
        }
        let piece: String = self.buf.drain(..taken).collect();
        let piece = if call.arguments.is_empty() {
            piece.trim_start().to_string()
        } else {
            piece
        };
        if !piece.is_empty() {
            call.arguments.push_str(&piece);
            out.push(Piece::Arguments {
                index: self.calls.len() - 1,
                text: piece,
            });
        }
        if done {
            self.state = State::Closing;
        }
    }

    fn closing(&mut self) {
        let squeezed: String = self.buf.chars().filter(|c| !c.is_whitespace()).collect();
        let close = format!("}}{}", CALL_CLOSE.trim());
        if squeezed.len() >= close.len() && squeezed.starts_with(&close) {
            let end = self
                .buf
                .find(CALL_CLOSE.trim())
                .expect("the closing tag was seen: this is a bug")
                + CALL_CLOSE.trim().len();
            self.buf.drain(..end);
            if let Some(call) = self.calls.last_mut() {
                call.complete = true;
            }
            self.state = State::Between;
        }
    }

    fn between(&mut self, out: &mut Vec<Piece>) {
        let next = format!("{CALL_SEPARATOR}{CALL_OPEN}");
        if self.buf.starts_with(&next) {
            self.buf.drain(..next.len());
            self.state = State::Header;
        } else if !next.starts_with(self.buf.as_str()) {
            // Not another call: plain text after the calls.
            self.state = State::Text;
            self.text(out);
        }
    }
}

/// One chat choice's answer as OpenAI shapes it: content, and tool calls when tools are on.
#[derive(Debug, Clone)]
pub struct ChoiceOutput {
    parser: Option<ToolCallParser>,
    content: String,
}

impl ChoiceOutput {
    /// Plain text, or text with tool calls parsed out of it.
    pub fn new(tools: bool) -> Self {
        Self {
            parser: tools.then(ToolCallParser::new),
            content: String::new(),
        }
    }

    fn convert(&mut self, pieces: Vec<Piece>) -> (String, Vec<ToolCallDelta>) {
        let mut content = String::new();
        let mut deltas = Vec::new();
        for piece in pieces {
            match piece {
                Piece::Content(text) => content.push_str(&text),
                Piece::CallStart { index, id, name } => deltas.push(ToolCallDelta {
                    index,
                    id: Some(id),
                    kind: Some("function"),
                    function: FunctionCallDelta {
                        name: Some(name),
                        arguments: Some(String::new()),
                    },
                }),
                Piece::Arguments { index, text } => deltas.push(ToolCallDelta {
                    index,
                    id: None,
                    kind: None,
                    function: FunctionCallDelta {
                        name: None,
                        arguments: Some(text),
                    },
                }),
            }
        }
        self.content.push_str(&content);
        (content, deltas)
    }

    /// New generated text: the content and tool-call pieces it completes.
    pub fn push(&mut self, text: &str) -> (String, Vec<ToolCallDelta>) {
        let pieces = match &mut self.parser {
            Some(parser) => parser.push(text),
            None => vec![Piece::Content(text.to_string())],
        };
        self.convert(pieces)
    }

    /// The end of the answer: whatever was held back.
    pub fn finish(&mut self) -> (String, Vec<ToolCallDelta>) {
        let pieces = self
            .parser
            .as_mut()
            .map(ToolCallParser::finish)
            .unwrap_or_default();
        self.convert(pieces)
    }

    /// All content so far.
    pub fn content(&self) -> &str {
        &self.content
    }

    /// The calls, in OpenAI's shape (`None` when there are none).
    pub fn tool_calls(&self) -> Option<Vec<ToolCall>> {
        let calls = self.parser.as_ref()?.calls();
        (!calls.is_empty()).then(|| {
            calls
                .iter()
                .map(|c| ToolCall {
                    id: c.id.clone(),
                    kind: "function",
                    function: FunctionCall {
                        name: c.name.clone(),
                        arguments: c.arguments.clone(),
                    },
                })
                .collect()
        })
    }

    /// `tool_calls` for an answer that stopped after calls, else the engine's reason.
    pub fn finish_reason(&self, reason: FinishReason) -> &'static str {
        let called = self.parser.as_ref().is_some_and(|p| !p.calls().is_empty());
        if called && reason == FinishReason::Stop {
            "tool_calls"
        } else {
            finish_reason(reason)
        }
    }
}

/// Whether `arguments` is a complete JSON object (what a finished call holds).
pub fn arguments_complete(arguments: &str) -> bool {
    matches!(
        serde_json::from_str::<Value>(arguments),
        Ok(Value::Object(_))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(pieces: &[&str]) -> (String, Vec<ParsedCall>, Vec<Piece>) {
        let mut p = ToolCallParser::new();
        let mut all = Vec::new();
        for piece in pieces {
            all.extend(p.push(piece));
        }
        all.extend(p.finish());
        let content: String = all
            .iter()
            .filter_map(|x| match x {
                Piece::Content(t) => Some(t.as_str()),
                _ => None,
            })
            .collect();
        (content, p.calls().to_vec(), all)
    }

    const CALL: &str =
        "<tool_call>\n{\"name\":\"add\",\"arguments\":{\"a\":1,\"s\":\"}\\\"{\"}}\n</tool_call>";

    #[test]
    fn one_call_in_any_split_streams_its_arguments() {
        for split in 1..CALL.len() {
            if !CALL.is_char_boundary(split) {
                continue;
            }
            let (content, calls, pieces) = run(&[&CALL[..split], &CALL[split..]]);
            assert_eq!(content, "", "split {split}");
            assert_eq!(calls.len(), 1);
            assert_eq!(calls[0].name, "add");
            assert_eq!(calls[0].arguments, "{\"a\":1,\"s\":\"}\\\"{\"}");
            assert!(calls[0].complete && arguments_complete(&calls[0].arguments));
            let streamed: String = pieces
                .iter()
                .filter_map(|x| match x {
                    Piece::Arguments { text, .. } => Some(text.as_str()),
                    _ => None,
                })
                .collect();
            assert_eq!(streamed, calls[0].arguments);
            assert!(matches!(pieces[0], Piece::CallStart { index: 0, .. }));
        }
    }

    #[test]
    fn text_answers_and_parallel_calls() {
        let (content, calls, _) = run(&["Hello <tool", "_ca", "lling> world"]);
        assert_eq!(content, "Hello <tool_calling> world");
        assert!(calls.is_empty());
        let two = format!("{CALL}\n{}", CALL.replace("add", "mul"));
        let (content, calls, _) = run(&[&two]);
        assert_eq!(content, "");
        assert_eq!(
            calls.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            ["add", "mul"]
        );
        assert_ne!(calls[0].id, calls[1].id);
        assert!(calls[1].id.starts_with("call_") && calls[1].id.len() == 29);
    }

    #[test]
    fn cut_short_calls_keep_what_they_have() {
        let (content, calls, _) = run(&["<tool_call>\n{\"name\":\"add\",\"arguments\":{\"a\":"]);
        assert_eq!(content, "");
        assert_eq!(calls[0].arguments, "{\"a\":");
        assert!(!calls[0].complete && !arguments_complete(&calls[0].arguments));
        let (content, calls, _) = run(&["Hi", "<tool_call>\n{\"na"]);
        assert!(calls.is_empty());
        assert_eq!(content, "Hi", "a call without its name yet is dropped");
    }
}
