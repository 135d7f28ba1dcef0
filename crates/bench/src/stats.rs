//! Per-request records and their aggregation into one level's results.
//!
//! Invariants: percentiles use linear interpolation between closest ranks on sorted samples (the
//! numpy default, so numbers agree with other benchmark tools); an empty sample gives no summary
//! (`None`), never a zero that would read as "infinitely fast"; only successful requests enter the
//! latency and throughput figures, failures and cancellations are counted beside them.

use serde::{Deserialize, Serialize};

use crate::scrape::{KvWaste, SpecDecode};

/// Where a request's server-side prefill time came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimingSource {
    /// The response's `timings.prompt_ms` (llama-server).
    ResponseTimings,
    /// `/metrics` scraped before and after the request: `vllm:request_prefill_time_seconds`
    /// `_sum` difference (mpt-serve, vLLM).
    MetricsDiff,
}

impl TimingSource {
    /// How the method reads in tables.
    pub fn describe(self) -> &'static str {
        match self {
            TimingSource::ResponseTimings => "response timings.prompt_ms",
            TimingSource::MetricsDiff => "/metrics vllm:request_prefill_time_seconds diff",
        }
    }
}

/// What happened to one request, as measured by the client.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Seconds from the level's start to sending the request.
    pub start_s: f64,
    /// Seconds from sending to the first chunk carrying text (None if none came).
    pub ttft_s: Option<f64>,
    /// Seconds from sending to the end of the stream.
    pub e2e_s: f64,
    /// Inter-token gaps in seconds: the time between two reads of the stream that carried
    /// text, spread evenly over the text chunks of the later read.
    pub itl_s: Vec<f64>,
    /// Prompt tokens as reported by the server's `usage`.
    pub prompt_tokens: Option<u64>,
    /// Completion tokens: `usage.completion_tokens`, else the number of text chunks.
    pub output_tokens: u64,
    /// Output length the client asked for.
    pub requested_output_tokens: u64,
    /// Prompt length (tokens) the client aimed for.
    pub requested_prompt_tokens: u64,
    /// Error text when the request failed (HTTP status, transport, or an SSE error event).
    pub error: Option<String>,
    /// Server-reported time from first scheduling to the first token sampled, seconds.
    #[serde(default)]
    pub server_prefill_s: Option<f64>,
    /// Server-reported time from arrival to first scheduling, seconds.
    #[serde(default)]
    pub server_queue_s: Option<f64>,
    /// Where `server_prefill_s` came from.
    #[serde(default)]
    pub server_timing_source: Option<TimingSource>,
}

impl RequestRecord {
    /// True when the request completed without error.
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }
}

/// Distribution summary of one metric, in milliseconds (or the unit named by the field holding it).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Arithmetic mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Smallest sample.
    pub min: f64,
    /// Largest sample.
    pub max: f64,
    /// Number of samples.
    pub count: usize,
}

/// Linear-interpolated percentile `q` in [0, 100] of `sorted` (ascending); None when empty.
pub fn percentile(sorted: &[f64], q: f64) -> Option<f64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (q.clamp(0.0, 100.0) / 100.0) * (sorted.len() - 1) as f64;
    let lo = rank.floor() as usize;
    let hi = rank.ceil() as usize;
    let frac = rank - lo as f64;
    Some(sorted[lo] + (sorted[hi] - sorted[lo]) * frac)
}

/// Summarizes samples scaled by `scale` (e.g. 1000 for seconds → ms); None when empty.
pub fn summarize(samples: &[f64], scale: f64) -> Option<Summary> {
    let mut sorted: Vec<f64> = samples
        .iter()
        .filter(|v| v.is_finite())
        .map(|v| v * scale)
        .collect();
    if sorted.is_empty() {
        return None;
    }
    sorted.sort_by(|a, b| a.total_cmp(b));
    let mean = sorted.iter().sum::<f64>() / sorted.len() as f64;
    Some(Summary {
        mean,
        p50: percentile(&sorted, 50.0)?,
        p90: percentile(&sorted, 90.0)?,
        p99: percentile(&sorted, 99.0)?,
        min: sorted[0],
        max: sorted[sorted.len() - 1],
        count: sorted.len(),
    })
}

/// The load applied in one level.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", content = "value", rename_all = "snake_case")]
pub enum Load {
    /// This many requests in flight at all times.
    Concurrency(usize),
    /// Poisson arrivals at this many requests per second.
    RequestRate(f64),
}

impl Load {
    /// The number plotted on a chart's x axis.
    pub fn x(&self) -> f64 {
        match *self {
            Load::Concurrency(n) => n as f64,
            Load::RequestRate(r) => r,
        }
    }

    /// Short label, e.g. `c=16` or `rate=2/s`.
    pub fn label(&self) -> String {
        match *self {
            Load::Concurrency(n) => format!("c={n}"),
            Load::RequestRate(r) => format!("rate={r}/s"),
        }
    }
}

/// Aggregated results of one level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LevelResult {
    /// The load applied.
    pub load: Load,
    /// Requests that completed.
    pub completed: usize,
    /// Requests that failed (HTTP error, transport error, error event).
    pub failed: usize,
    /// Requests cut off by the level's time cap.
    pub cancelled: usize,
    /// Seconds from the first request sent to the last one finished.
    pub duration_s: f64,
    /// Completed requests per second.
    pub request_throughput: f64,
    /// Output tokens per second, all streams together.
    pub output_throughput: f64,
    /// Prompt + output tokens per second.
    pub total_token_throughput: f64,
    /// Mean server-reported prompt tokens (None if the server reported none).
    pub mean_prompt_tokens: Option<f64>,
    /// Mean output tokens per completed request.
    pub mean_output_tokens: f64,
    /// Completed requests whose output length differs from the requested one.
    pub output_length_mismatches: usize,
    /// Time to first token, ms.
    pub ttft_ms: Option<Summary>,
    /// Gap between streamed tokens (per read, spread over its chunks), ms.
    pub itl_ms: Option<Summary>,
    /// Time per output token after the first, (e2e − ttft) / (tokens − 1), ms.
    pub tpot_ms: Option<Summary>,
    /// End-to-end latency, ms.
    pub e2e_ms: Option<Summary>,
    /// Per-request decode speed, (tokens − 1) / (e2e − ttft), tokens/s.
    pub decode_tok_s: Option<Summary>,
    /// Per-request prompt processing speed, prompt tokens / ttft, tokens/s.
    pub prefill_tok_s: Option<Summary>,
    /// First few error messages, for the reader.
    pub errors: Vec<String>,
    /// Server-reported prefill time (first scheduled → first token), ms.
    #[serde(default)]
    pub server_prefill_ms: Option<Summary>,
    /// Server-reported queue time (arrival → first scheduled), ms.
    #[serde(default)]
    pub server_queue_ms: Option<Summary>,
    /// Server overhead: client TTFT minus server-reported prefill, per request, ms.
    #[serde(default)]
    pub overhead_ms: Option<Summary>,
    /// How the server prefill times were read (None when the server gave none).
    #[serde(default)]
    pub overhead_method: Option<String>,
    /// KV-cache waste during the level (None when not measured).
    #[serde(default)]
    pub kv_waste: Option<KvWaste>,
    /// Speculative decoding during the level (None when the server has no such counters).
    #[serde(default)]
    pub spec_decode: Option<SpecDecode>,
}

/// How many distinct error messages a level keeps.
const MAX_ERRORS_KEPT: usize = 5;

/// Aggregates one level's records; `cancelled` counts requests cut off by the time cap.
pub fn aggregate(load: Load, records: &[RequestRecord], cancelled: usize) -> LevelResult {
    let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.ok()).collect();
    let mut errors: Vec<String> = Vec::new();
    for r in records.iter().filter(|r| !r.ok()) {
        let e = r.error.clone().unwrap_or_default();
        if errors.len() < MAX_ERRORS_KEPT && !errors.contains(&e) {
            errors.push(e);
        }
    }
    let first_start = records
        .iter()
        .map(|r| r.start_s)
        .fold(f64::INFINITY, f64::min);
    let last_end = records
        .iter()
        .map(|r| r.start_s + r.e2e_s)
        .fold(f64::NEG_INFINITY, f64::max);
    let duration_s = if records.is_empty() {
        0.0
    } else {
        (last_end - first_start).max(0.0)
    };
    let per_s = |x: f64| {
        if duration_s > 0.0 {
            x / duration_s
        } else {
            0.0
        }
    };

    let output_total: u64 = ok.iter().map(|r| r.output_tokens).sum();
    let prompts: Vec<f64> = ok
        .iter()
        .filter_map(|r| r.prompt_tokens.map(|p| p as f64))
        .collect();
    let prompt_total: f64 = prompts.iter().sum();
    let ttft: Vec<f64> = ok.iter().filter_map(|r| r.ttft_s).collect();
    let itl: Vec<f64> = ok.iter().flat_map(|r| r.itl_s.iter().copied()).collect();
    let mut tpot = Vec::new();
    let mut decode = Vec::new();
    let mut prefill = Vec::new();
    for r in &ok {
        let Some(t) = r.ttft_s else { continue };
        if r.output_tokens > 1 && r.e2e_s > t {
            let steps = (r.output_tokens - 1) as f64;
            tpot.push((r.e2e_s - t) / steps);
            decode.push(steps / (r.e2e_s - t));
        }
        if let Some(p) = r.prompt_tokens
            && t > 0.0
        {
            prefill.push(p as f64 / t);
        }
    }
    let e2e: Vec<f64> = ok.iter().map(|r| r.e2e_s).collect();
    let (server_prefill, server_queue, overhead, overhead_method) = server_side(&ok);

    LevelResult {
        load,
        completed: ok.len(),
        failed: records.len() - ok.len(),
        cancelled,
        duration_s,
        request_throughput: per_s(ok.len() as f64),
        output_throughput: per_s(output_total as f64),
        total_token_throughput: per_s(output_total as f64 + prompt_total),
        mean_prompt_tokens: (!prompts.is_empty()).then(|| prompt_total / prompts.len() as f64),
        mean_output_tokens: if ok.is_empty() {
            0.0
        } else {
            output_total as f64 / ok.len() as f64
        },
        output_length_mismatches: ok
            .iter()
            .filter(|r| r.output_tokens != r.requested_output_tokens)
            .count(),
        ttft_ms: summarize(&ttft, 1000.0),
        itl_ms: summarize(&itl, 1000.0),
        tpot_ms: summarize(&tpot, 1000.0),
        e2e_ms: summarize(&e2e, 1000.0),
        decode_tok_s: summarize(&decode, 1.0),
        prefill_tok_s: summarize(&prefill, 1.0),
        errors,
        server_prefill_ms: summarize(&server_prefill, 1000.0),
        server_queue_ms: summarize(&server_queue, 1000.0),
        overhead_ms: summarize(&overhead, 1000.0),
        overhead_method,
        kv_waste: None,
        spec_decode: None,
    }
}

/// Server-side prefill and queue times, overheads (client TTFT − server prefill), in seconds,
/// and how the prefill times were read, from the successful requests that carry them.
fn server_side(ok: &[&RequestRecord]) -> (Vec<f64>, Vec<f64>, Vec<f64>, Option<String>) {
    let (mut prefill, mut queue, mut overhead) = (Vec::new(), Vec::new(), Vec::new());
    let mut sources: Vec<TimingSource> = Vec::new();
    for r in ok {
        if let Some(q) = r.server_queue_s {
            queue.push(q);
        }
        let Some(p) = r.server_prefill_s else {
            continue;
        };
        prefill.push(p);
        if let Some(t) = r.ttft_s {
            overhead.push(t - p);
        }
        if let Some(src) = r.server_timing_source
            && !sources.contains(&src)
        {
            sources.push(src);
        }
    }
    let method = match sources.as_slice() {
        [] => None,
        [one] => Some(one.describe().to_string()),
        many => Some(format!(
            "mixed: {}",
            many.iter()
                .map(|s| s.describe())
                .collect::<Vec<_>>()
                .join(", ")
        )),
    };
    (prefill, queue, overhead, method)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(start: f64, ttft: f64, e2e: f64, tokens: u64) -> RequestRecord {
        RequestRecord {
            start_s: start,
            ttft_s: Some(ttft),
            e2e_s: e2e,
            itl_s: vec![(e2e - ttft) / (tokens - 1) as f64; tokens as usize - 1],
            prompt_tokens: Some(100),
            output_tokens: tokens,
            requested_output_tokens: 5,
            requested_prompt_tokens: 100,
            ..RequestRecord::default()
        }
    }

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile(&v, 50.0), Some(2.5));
        assert_eq!(percentile(&v, 0.0), Some(1.0));
        assert_eq!(percentile(&v, 100.0), Some(4.0));
        // numpy.percentile([1,2,3,4], 90) == 3.7
        assert!((percentile(&v, 90.0).unwrap() - 3.7).abs() < 1e-12);
        assert_eq!(percentile(&[7.0], 99.0), Some(7.0));
        assert_eq!(percentile(&[], 50.0), None);
    }

    #[test]
    fn summary_sorts_scales_and_skips_non_finite() {
        let s = summarize(&[0.003, 0.001, f64::NAN, 0.002], 1000.0).unwrap();
        assert_eq!(s.count, 3);
        assert!((s.p50 - 2.0).abs() < 1e-9);
        assert!((s.mean - 2.0).abs() < 1e-9);
        assert!((s.min - 1.0).abs() < 1e-9 && (s.max - 3.0).abs() < 1e-9);
        assert!(summarize(&[], 1.0).is_none());
    }

    #[test]
    fn aggregation_counts_tokens_over_the_wall_clock_span() {
        // Two overlapping requests: 0..2 s and 1..3 s, 5 tokens each → 10 tokens over 3 s.
        let mut records = vec![rec(0.0, 0.5, 2.0, 5), rec(1.0, 0.25, 2.0, 5)];
        records.push(RequestRecord {
            start_s: 1.5,
            e2e_s: 0.1,
            error: Some("HTTP 500".into()),
            ..Default::default()
        });
        let r = aggregate(Load::Concurrency(2), &records, 1);
        assert_eq!((r.completed, r.failed, r.cancelled), (2, 1, 1));
        assert!((r.duration_s - 3.0).abs() < 1e-12);
        assert!((r.output_throughput - 10.0 / 3.0).abs() < 1e-12);
        assert!((r.request_throughput - 2.0 / 3.0).abs() < 1e-12);
        assert!((r.total_token_throughput - 210.0 / 3.0).abs() < 1e-12);
        assert_eq!(r.output_length_mismatches, 0);
        assert_eq!(r.errors, vec!["HTTP 500".to_string()]);
        // Request 1 decodes 4 tokens in 1.5 s; request 2 in 1.75 s.
        let d = r.decode_tok_s.unwrap();
        assert!((d.max - 4.0 / 1.5).abs() < 1e-9 && (d.min - 4.0 / 1.75).abs() < 1e-9);
        // Prefill: 100 tokens / 0.25 s and / 0.5 s.
        let p = r.prefill_tok_s.unwrap();
        assert!((p.max - 400.0).abs() < 1e-9 && (p.min - 200.0).abs() < 1e-9);
        assert_eq!(r.ttft_ms.unwrap().count, 2);
        assert_eq!(r.itl_ms.unwrap().count, 8);
    }

    #[test]
    fn overhead_is_ttft_minus_server_prefill_per_request() {
        let with = |ttft: f64, prefill: Option<f64>, src: TimingSource| RequestRecord {
            ttft_s: Some(ttft),
            e2e_s: ttft,
            output_tokens: 1,
            requested_output_tokens: 1,
            server_prefill_s: prefill,
            server_queue_s: prefill.map(|_| 0.0001),
            server_timing_source: prefill.map(|_| src),
            ..Default::default()
        };
        let m = TimingSource::MetricsDiff;
        // 0.5 ms, 1.5 ms and 0.25 ms of overhead; one request without a server reading.
        let records = [
            with(0.0505, Some(0.05), m),
            with(0.0415, Some(0.04), m),
            with(0.06025, Some(0.06), m),
            with(0.07, None, m),
        ];
        let r = aggregate(Load::Concurrency(1), &records, 0);
        let o = r.overhead_ms.expect("three readings");
        assert_eq!(o.count, 3);
        assert!((o.p50 - 0.5).abs() < 1e-9, "{o:?}");
        assert!((o.max - 1.5).abs() < 1e-9 && (o.min - 0.25).abs() < 1e-9);
        assert!((r.server_prefill_ms.expect("prefill").p50 - 50.0).abs() < 1e-9);
        assert!((r.server_queue_ms.expect("queue").p50 - 0.1).abs() < 1e-9);
        assert_eq!(r.overhead_method.as_deref(), Some(m.describe()));
        assert_eq!(r.ttft_ms.expect("ttft").count, 4, "TTFT still counts all");

        let mixed = [
            with(0.05, Some(0.04), m),
            with(0.05, Some(0.04), TimingSource::ResponseTimings),
        ];
        let r = aggregate(Load::Concurrency(1), &mixed, 0);
        assert!(r.overhead_method.expect("method").starts_with("mixed: "));
        let r = aggregate(Load::Concurrency(1), &records[3..], 0);
        assert!(r.overhead_ms.is_none() && r.overhead_method.is_none());
    }

    #[test]
    fn aggregation_flags_wrong_output_lengths_and_handles_no_success() {
        let mut short = rec(0.0, 0.1, 1.0, 3);
        short.requested_output_tokens = 5;
        let r = aggregate(Load::RequestRate(1.0), &[short], 0);
        assert_eq!(r.output_length_mismatches, 1);

        let failed = RequestRecord {
            error: Some("connection refused".into()),
            ..Default::default()
        };
        let r = aggregate(Load::Concurrency(1), &[failed], 0);
        assert_eq!((r.completed, r.failed), (0, 1));
        assert!(r.ttft_ms.is_none() && r.e2e_ms.is_none());
        assert_eq!(r.output_throughput, 0.0);
        assert_eq!(r.mean_output_tokens, 0.0);
    }
}
