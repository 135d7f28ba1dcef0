//! `mpt-bench soak`: a constant arrival rate of mixed requests for minutes — valid ones plain
//! and streamed, invalid ones of several kinds, streams the client abandons — then a verdict on
//! what a long-running server must keep: every status as expected, nothing lost or left
//! unfinished, the KV cache empty at the end, resident memory steady.
//!
//! Invariants: the mix is drawn from a seeded RNG (same seed → same requests in the same
//! order); every request has a deadline, and the run ends by itself after `--duration` plus a
//! bounded drain; the verdict fails on any unexpected status, any lost request, KV blocks or
//! requests left at the end, or RSS growth above the limit. Nothing here asserts a latency.

use std::time::{Duration, Instant};

use futures::StreamExt;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use serde_json::{Value, json};

use crate::scrape::{Samples, scrape};
use crate::sse::{SseParser, parse_chunk};
use crate::stats::{Summary, summarize};

/// One kind of request in the mix and the status it must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Kind {
    /// A plain completion: 200 with a full body.
    Plain,
    /// A streamed completion read to `[DONE]`: 200.
    Streamed,
    /// A streamed completion the client drops after its first events.
    Cancelled,
    /// A request the server must refuse with a 4xx (see [`Invalid`]).
    Invalid(Invalid),
}

/// The ways a soak request is wrong, each with the status it must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub enum Invalid {
    /// Temperature out of range: 400.
    Temperature,
    /// A model the server does not serve: 404.
    UnknownModel,
    /// Prompt plus max_tokens beyond the context: 400.
    TooLong,
    /// Not JSON: 400.
    Malformed,
}

impl Kind {
    /// The HTTP status this kind must get.
    pub fn expected_status(self) -> u16 {
        match self {
            Kind::Plain | Kind::Streamed | Kind::Cancelled => 200,
            Kind::Invalid(Invalid::UnknownModel) => 404,
            Kind::Invalid(_) => 400,
        }
    }

    /// Draws a kind: 40% streamed, 30% plain, 15% cancelled, 15% invalid (spread evenly).
    pub fn draw(rng: &mut StdRng) -> Kind {
        match rng.random_range(0..100) {
            0..40 => Kind::Streamed,
            40..70 => Kind::Plain,
            70..85 => Kind::Cancelled,
            n => Kind::Invalid(match n % 4 {
                0 => Invalid::Temperature,
                1 => Invalid::UnknownModel,
                2 => Invalid::TooLong,
                _ => Invalid::Malformed,
            }),
        }
    }
}

/// What the soak needs to know about the server.
#[derive(Debug, Clone)]
pub struct SoakTarget {
    /// Completions endpoint.
    pub url: String,
    /// Its `/metrics`.
    pub metrics_url: String,
    /// The served model name.
    pub model: String,
    /// Bearer token, if the server wants one.
    pub api_key: Option<String>,
    /// The server's process, for its resident memory (Linux `/proc`).
    pub pid: Option<u32>,
    /// Tokens each valid request generates.
    pub max_tokens: usize,
    /// Per-request time limit.
    pub request_timeout: Duration,
}

/// What happened to one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// Its kind.
    pub kind: Kind,
    /// The HTTP status, `None` if no response came.
    pub status: Option<u16>,
    /// Whether a valid request got its whole answer (a full body, or a stream to `[DONE]`);
    /// true for the others once they got any status.
    pub finished: bool,
    /// Seconds to the first text of a stream.
    pub ttft_s: Option<f64>,
    /// What went wrong, for the report.
    pub problem: Option<String>,
}

impl Outcome {
    /// Whether the status is the one the kind must get (a cancelled stream must have started
    /// with 200).
    pub fn status_ok(&self) -> bool {
        self.status == Some(self.kind.expected_status())
    }
}

/// The request body of a kind (`None`: a raw non-JSON body).
pub fn body(kind: Kind, model: &str, max_tokens: usize, rng: &mut StdRng) -> Option<Value> {
    let words = [
        "To be",
        "or not",
        "the king",
        "my lord",
        "once more",
        "good night",
    ];
    let prompt = (0..rng.random_range(1..12))
        .map(|_| words[rng.random_range(0..words.len())])
        .collect::<Vec<_>>()
        .join(" ");
    let mut body = json!({"model": model, "prompt": prompt, "max_tokens": max_tokens,
                          "temperature": 0.8, "seed": rng.random::<u32>(), "ignore_eos": true});
    match kind {
        Kind::Plain => {}
        Kind::Streamed | Kind::Cancelled => body["stream"] = json!(true),
        Kind::Invalid(Invalid::Temperature) => body["temperature"] = json!(7),
        Kind::Invalid(Invalid::UnknownModel) => body["model"] = json!("no-such-model"),
        Kind::Invalid(Invalid::TooLong) => body["max_tokens"] = json!(10_000_000),
        Kind::Invalid(Invalid::Malformed) => return None,
    }
    Some(body)
}

/// Sends one request of `kind` and reports what happened.
pub async fn send(
    client: &reqwest::Client,
    target: &SoakTarget,
    kind: Kind,
    body: Option<Value>,
) -> Outcome {
    let mut outcome = Outcome {
        kind,
        status: None,
        finished: false,
        ttft_s: None,
        problem: None,
    };
    let mut request = client
        .post(&target.url)
        .timeout(target.request_timeout)
        .header("content-type", "application/json");
    if let Some(key) = &target.api_key {
        request = request.bearer_auth(key);
    }
    request = match body {
        Some(b) => request.body(b.to_string()),
        None => request.body("{\"model\": oops"),
    };
    let sent = Instant::now();
    let response = match request.send().await {
        Ok(r) => r,
        Err(e) => {
            outcome.problem = Some(format!("no response: {e}"));
            return outcome;
        }
    };
    let status = response.status().as_u16();
    outcome.status = Some(status);
    match kind {
        Kind::Invalid(_) => {
            let text = response.text().await.unwrap_or_default();
            outcome.finished = serde_json::from_str::<Value>(&text)
                .is_ok_and(|v| v["error"]["message"].is_string());
            if !outcome.finished {
                outcome.problem = Some(format!("not an OpenAI error body: {text}"));
            }
        }
        Kind::Plain => match response.json::<Value>().await {
            Ok(v) if v["choices"][0]["finish_reason"].is_string() => outcome.finished = true,
            Ok(v) => outcome.problem = Some(format!("incomplete body: {v}")),
            Err(e) => outcome.problem = Some(format!("body: {e}")),
        },
        Kind::Streamed | Kind::Cancelled => {
            let mut parser = SseParser::new();
            let mut stream = response.bytes_stream();
            let mut events = 0;
            'read: while let Some(item) = stream.next().await {
                let bytes = match item {
                    Ok(b) => b,
                    Err(e) => {
                        outcome.problem = Some(format!("stream broke: {e}"));
                        break;
                    }
                };
                for data in parser.push(&bytes) {
                    let chunk = parse_chunk(&data);
                    if let Some(error) = chunk.error {
                        outcome.problem = Some(format!("error event: {error}"));
                        break 'read;
                    }
                    if chunk.text_choices > 0 && outcome.ttft_s.is_none() {
                        outcome.ttft_s = Some(sent.elapsed().as_secs_f64());
                    }
                    events += 1;
                    if chunk.done {
                        outcome.finished = true;
                        break 'read;
                    }
                    if kind == Kind::Cancelled && events >= 2 {
                        // Hang up mid-stream; the server must free what it held.
                        outcome.finished = true;
                        break 'read;
                    }
                }
            }
            if !outcome.finished && outcome.problem.is_none() {
                outcome.problem = Some("stream ended without [DONE]".into());
            }
        }
    }
    outcome
}

/// Resident memory of a process in bytes, from `/proc/PID/status`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    parse_vm_rss(&status)
}

/// `VmRSS:   12345 kB` → bytes.
pub fn parse_vm_rss(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Gauges that must read 0 once the load is gone.
pub const IDLE_GAUGES: [&str; 3] = [
    "vllm:kv_cache_usage_perc",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
];

/// Whether a scrape shows an idle server (no KV block, no request).
pub fn is_idle(samples: &Samples) -> bool {
    IDLE_GAUGES
        .iter()
        .all(|g| samples.get(*g).copied().unwrap_or(0.0) == 0.0)
}

/// The soak's verdict.
#[derive(Debug, Clone, Serialize)]
pub struct SoakReport {
    /// Seconds of load.
    pub duration_s: f64,
    /// Requests per second asked for.
    pub rate: f64,
    /// Requests sent, by kind.
    pub sent: Vec<(String, usize)>,
    /// Requests whose status was not the expected one.
    pub unexpected_statuses: usize,
    /// Requests with no response, or a valid one without its whole answer.
    pub lost: usize,
    /// Up to ten examples of what went wrong.
    pub problems: Vec<String>,
    /// The idle gauges at the end (each must be 0).
    pub end_gauges: Vec<(String, f64)>,
    /// RSS after the warm-up and at the end, bytes.
    pub rss_start: Option<u64>,
    /// RSS at the end, bytes.
    pub rss_end: Option<u64>,
    /// Growth in percent.
    pub rss_growth_pct: Option<f64>,
    /// Time to first text of the streamed requests, ms.
    pub ttft_ms: Option<Summary>,
    /// The criteria that did not hold, in words.
    pub failures: Vec<String>,
    /// Whether every criterion held.
    pub pass: bool,
}

/// Largest RSS growth the soak accepts, percent.
pub const MAX_RSS_GROWTH_PCT: f64 = 10.0;

/// Builds the verdict from the outcomes and the end readings.
pub fn verdict(
    outcomes: &[Outcome],
    duration_s: f64,
    rate: f64,
    end: &Samples,
    rss: (Option<u64>, Option<u64>),
) -> SoakReport {
    let mut sent: Vec<(String, usize)> = Vec::new();
    for o in outcomes {
        let name = format!("{:?}", o.kind);
        match sent.iter_mut().find(|(n, _)| *n == name) {
            Some((_, count)) => *count += 1,
            None => sent.push((name, 1)),
        }
    }
    sent.sort();
    let unexpected_statuses = outcomes.iter().filter(|o| !o.status_ok()).count();
    let lost = outcomes.iter().filter(|o| !o.finished).count();
    let problems = outcomes
        .iter()
        .filter(|o| !o.status_ok() || !o.finished)
        .take(10)
        .map(|o| {
            format!(
                "{:?}: status {:?}: {}",
                o.kind,
                o.status,
                o.problem.as_deref().unwrap_or("-")
            )
        })
        .collect();
    let end_gauges: Vec<(String, f64)> = IDLE_GAUGES
        .iter()
        .map(|g| (g.to_string(), end.get(*g).copied().unwrap_or(0.0)))
        .collect();
    let rss_growth_pct = match rss {
        (Some(start), Some(end)) if start > 0 => {
            Some((end as f64 - start as f64) / start as f64 * 100.0)
        }
        _ => None,
    };
    let ttft: Vec<f64> = outcomes.iter().filter_map(|o| o.ttft_s).collect();
    let mut failures = Vec::new();
    if unexpected_statuses > 0 {
        failures.push(format!("{unexpected_statuses} unexpected statuses"));
    }
    if lost > 0 {
        failures.push(format!("{lost} requests lost or unfinished"));
    }
    if !is_idle(end) {
        failures.push(format!("not idle at the end: {end_gauges:?}"));
    }
    if let Some(g) = rss_growth_pct.filter(|&g| g >= MAX_RSS_GROWTH_PCT) {
        failures.push(format!("RSS grew {g:.1}% (limit {MAX_RSS_GROWTH_PCT}%)"));
    }
    let pass = failures.is_empty();
    SoakReport {
        duration_s,
        rate,
        sent,
        unexpected_statuses,
        lost,
        problems,
        end_gauges,
        rss_start: rss.0,
        rss_end: rss.1,
        rss_growth_pct,
        ttft_ms: summarize(&ttft, 1000.0),
        failures,
        pass,
    }
}

/// Scrapes `/metrics` until the server is idle or `wait` has passed; returns the last scrape.
pub async fn settle(client: &reqwest::Client, metrics_url: &str, wait: Duration) -> Samples {
    let deadline = Instant::now() + wait;
    loop {
        let samples = scrape(client, metrics_url).await.unwrap_or_default();
        if is_idle(&samples) || Instant::now() >= deadline {
            return samples;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Runs the soak: `rate` requests/s for `duration` (after `warmup` at the same rate, whose
/// requests count too), then waits for the server to settle.
pub async fn run(
    client: &reqwest::Client,
    target: &SoakTarget,
    rate: f64,
    duration: Duration,
    warmup: Duration,
    seed: u64,
) -> SoakReport {
    let mut rng = StdRng::seed_from_u64(seed);
    let period = Duration::from_secs_f64(1.0 / rate);
    let started = Instant::now();
    let mut rss_start = None;
    let mut tasks = Vec::new();
    let mut next = started;
    while next < started + warmup + duration {
        tokio::time::sleep_until(next.into()).await;
        if rss_start.is_none() && next >= started + warmup {
            rss_start = target.pid.and_then(rss_bytes);
        }
        let kind = Kind::draw(&mut rng);
        let body = body(kind, &target.model, target.max_tokens, &mut rng);
        let (client, target) = (client.clone(), target.clone());
        tasks.push(tokio::spawn(async move {
            send(&client, &target, kind, body).await
        }));
        next += period;
    }
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        match task.await {
            Ok(outcome) => outcomes.push(outcome),
            Err(e) => outcomes.push(Outcome {
                kind: Kind::Plain,
                status: None,
                finished: false,
                ttft_s: None,
                problem: Some(format!("client task failed: {e}")),
            }),
        }
    }
    let end = settle(client, &target.metrics_url, Duration::from_secs(30)).await;
    let rss_end = target.pid.and_then(rss_bytes);
    verdict(
        &outcomes,
        duration.as_secs_f64(),
        rate,
        &end,
        (rss_start, rss_end),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcome(kind: Kind, status: Option<u16>, finished: bool) -> Outcome {
        Outcome {
            kind,
            status,
            finished,
            ttft_s: None,
            problem: None,
        }
    }

    fn idle() -> Samples {
        IDLE_GAUGES.iter().map(|g| (g.to_string(), 0.0)).collect()
    }

    #[test]
    fn the_mix_is_seeded_and_has_every_kind() {
        let draw = |seed| {
            let mut rng = StdRng::seed_from_u64(seed);
            (0..400).map(|_| Kind::draw(&mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(3), draw(3));
        let kinds = draw(3);
        for kind in [Kind::Plain, Kind::Streamed, Kind::Cancelled] {
            assert!(kinds.contains(&kind), "{kind:?}");
        }
        for bad in [
            Invalid::Temperature,
            Invalid::UnknownModel,
            Invalid::TooLong,
            Invalid::Malformed,
        ] {
            assert!(kinds.contains(&Kind::Invalid(bad)), "{bad:?}");
        }
    }

    #[test]
    fn the_verdict_fails_on_each_criterion() {
        let good = vec![
            outcome(Kind::Plain, Some(200), true),
            outcome(Kind::Invalid(Invalid::UnknownModel), Some(404), true),
        ];
        let mb = 1 << 20;
        assert!(verdict(&good, 1.0, 1.0, &idle(), (Some(100 * mb), Some(105 * mb))).pass);
        let mut wrong = good.clone();
        wrong.push(outcome(
            Kind::Invalid(Invalid::Temperature),
            Some(500),
            true,
        ));
        let r = verdict(&wrong, 1.0, 1.0, &idle(), (None, None));
        assert!(!r.pass && r.unexpected_statuses == 1);
        let mut lost = good.clone();
        lost.push(outcome(Kind::Streamed, Some(200), false));
        assert_eq!(verdict(&lost, 1.0, 1.0, &idle(), (None, None)).lost, 1);
        let mut busy = idle();
        busy.insert("vllm:kv_cache_usage_perc".into(), 0.01);
        assert!(!verdict(&good, 1.0, 1.0, &busy, (None, None)).pass);
        let grown = verdict(&good, 1.0, 1.0, &idle(), (Some(100 * mb), Some(111 * mb)));
        assert!(!grown.pass && grown.rss_growth_pct.is_some_and(|g| g > 10.0));
    }

    #[test]
    fn vm_rss_is_read_in_bytes() {
        let status = "Name:\tmpt-server\nVmPeak:\t  900 kB\nVmRSS:\t  123456 kB\nThreads:\t9\n";
        assert_eq!(parse_vm_rss(status), Some(123_456 * 1024));
        assert_eq!(parse_vm_rss("Name: x\n"), None);
    }

    #[test]
    fn invalid_bodies_are_what_they_say() {
        let mut rng = StdRng::seed_from_u64(1);
        let b = body(Kind::Invalid(Invalid::TooLong), "m", 8, &mut rng).expect("json");
        assert_eq!(b["max_tokens"], 10_000_000);
        assert!(body(Kind::Invalid(Invalid::Malformed), "m", 8, &mut rng).is_none());
        let s = body(Kind::Streamed, "m", 8, &mut rng).expect("json");
        assert_eq!(
            (s["stream"].clone(), s["max_tokens"].clone()),
            (json!(true), json!(8))
        );
    }
}
