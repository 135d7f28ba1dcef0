//! What a server says about itself: its Prometheus `/metrics` (per-request prefill time by
//! diffing a histogram around a lone request; KV-cache waste sampled during a level) and the
//! arithmetic that turns those readings into results.
//!
//! Invariants: a reading is only used when it is unambiguous — a prefill diff only when the
//! histogram's `_count` moved by exactly one (so with one request in flight it is that
//! request's own time), a KV sample only when some slots are allocated; samples summed over
//! label sets (one model per server); parsing never fails on unknown or odd lines, it skips
//! them. Nothing here asserts a timing.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Metric names read from servers that expose them (mpt-serve; vLLM has the histograms).
pub mod names {
    /// vLLM histogram: first scheduled → first token, seconds.
    pub const PREFILL_SUM: &str = "vllm:request_prefill_time_seconds_sum";
    /// Its sample count.
    pub const PREFILL_COUNT: &str = "vllm:request_prefill_time_seconds_count";
    /// vLLM histogram: arrival → first scheduled, seconds.
    pub const QUEUE_SUM: &str = "vllm:request_queue_time_seconds_sum";
    /// Its sample count.
    pub const QUEUE_COUNT: &str = "vllm:request_queue_time_seconds_count";
    /// mpt-serve gauge: KV token slots in blocks held by live sequences.
    pub const KV_ALLOCATED: &str = "mpt:kv_cache_allocated_tokens";
    /// mpt-serve gauge: of those, slots holding a computed position.
    pub const KV_FILLED: &str = "mpt:kv_cache_filled_tokens";
    /// vLLM counter: speculative drafts verified.
    pub const SPEC_DRAFTS: &str = "vllm:spec_decode_num_drafts_total";
    /// vLLM counter: tokens in those drafts.
    pub const SPEC_DRAFT_TOKENS: &str = "vllm:spec_decode_num_draft_tokens_total";
    /// vLLM counter: drafted tokens accepted.
    pub const SPEC_ACCEPTED_TOKENS: &str = "vllm:spec_decode_num_accepted_tokens_total";
}

/// One scrape: metric name (with `_sum`/`_count` suffixes as exposed) → value summed over
/// label sets.
pub type Samples = HashMap<String, f64>;

/// Parses the Prometheus text exposition format; comments and malformed lines are skipped.
pub fn parse_prometheus(text: &str) -> Samples {
    let mut out = Samples::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        // Label values may hold spaces or braces, but nothing after the labels does.
        let (name, rest) = match line.find('{') {
            Some(open) => match line.rfind('}') {
                Some(close) if close > open => (&line[..open], &line[close + 1..]),
                _ => continue,
            },
            None => match line.split_once(char::is_whitespace) {
                Some((n, r)) => (n, r),
                None => continue,
            },
        };
        let Some(Ok(value)) = rest.split_whitespace().next().map(str::parse::<f64>) else {
            continue;
        };
        if name.is_empty() || !value.is_finite() {
            continue;
        }
        *out.entry(name.trim().to_string()).or_insert(0.0) += value;
    }
    out
}

/// `http://host:port/metrics` for a completions URL such as `http://host:port/v1/completions`.
pub fn metrics_url(completions_url: &str) -> Option<String> {
    let (scheme, rest) = completions_url.split_once("://")?;
    let host = rest.split('/').next().filter(|h| !h.is_empty())?;
    Some(format!("{scheme}://{host}/metrics"))
}

/// Fetches and parses `/metrics`; an error when unreachable or not 200.
pub async fn scrape(client: &reqwest::Client, url: &str) -> Result<Samples, String> {
    let response = client
        .get(url)
        .timeout(Duration::from_secs(5))
        .send()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    if !response.status().is_success() {
        return Err(format!("GET {url}: HTTP {}", response.status()));
    }
    let text = response
        .text()
        .await
        .map_err(|e| format!("GET {url}: {e}"))?;
    Ok(parse_prometheus(&text))
}

/// What a server's `/metrics` offers the benchmark (decided once, before the first level).
#[derive(Debug, Clone, Default)]
pub struct ServerProbe {
    /// The metrics endpoint (None: not scraped).
    pub metrics_url: Option<String>,
    /// Read each request's prefill time from the prefill histogram (only at concurrency 1).
    pub prefill_from_metrics: bool,
    /// Sample the KV gauges during levels.
    pub kv_from_metrics: bool,
    /// Time between KV samples.
    pub kv_interval: Duration,
    /// For servers without KV gauges: KV token slots each sequence holds from the start (e.g.
    /// llama-server's `-c` / `-np`), from which waste is estimated structurally.
    pub kv_slots_per_seq: Option<u64>,
}

impl ServerProbe {
    /// Looks at one scrape and says which readings it supports.
    pub fn detect(
        metrics_url: Option<String>,
        samples: Option<&Samples>,
        kv_interval: Duration,
        kv_slots_per_seq: Option<u64>,
    ) -> Self {
        let has = |n: &str| samples.is_some_and(|s| s.contains_key(n));
        Self {
            prefill_from_metrics: has(names::PREFILL_SUM) && has(names::PREFILL_COUNT),
            kv_from_metrics: !kv_interval.is_zero()
                && has(names::KV_ALLOCATED)
                && has(names::KV_FILLED),
            metrics_url,
            kv_interval,
            kv_slots_per_seq,
        }
    }
}

/// Server-side times of one request, from two scrapes around it: (prefill s, queue s).
/// None unless the prefill histogram counted exactly one new request in between.
pub fn prefill_diff(before: &Samples, after: &Samples) -> Option<(f64, Option<f64>)> {
    let delta = |n: &str| Some(after.get(n)? - before.get(n)?);
    if delta(names::PREFILL_COUNT)? != 1.0 {
        return None;
    }
    let prefill = delta(names::PREFILL_SUM)?.max(0.0);
    let queue = if delta(names::QUEUE_COUNT) == Some(1.0) {
        delta(names::QUEUE_SUM).map(|q| q.max(0.0))
    } else {
        None
    };
    Some((prefill, queue))
}

/// Speculative decoding during one level, from the vLLM counters scraped before and after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpecDecode {
    /// Drafts verified.
    pub drafts: f64,
    /// Tokens drafted.
    pub draft_tokens: f64,
    /// Drafted tokens accepted.
    pub accepted_tokens: f64,
    /// Accepted over drafted tokens, percent (None when nothing was drafted).
    pub acceptance_pct: Option<f64>,
    /// Accepted tokens per draft (None when nothing was drafted).
    pub accepted_per_draft: Option<f64>,
}

/// The level's speculative decoding, None when the server has no such counters.
pub fn spec_decode_diff(before: &Samples, after: &Samples) -> Option<SpecDecode> {
    let delta = |n: &str| Some((after.get(n)? - before.get(n)?).max(0.0));
    let drafts = delta(names::SPEC_DRAFTS)?;
    let draft_tokens = delta(names::SPEC_DRAFT_TOKENS)?;
    let accepted_tokens = delta(names::SPEC_ACCEPTED_TOKENS)?;
    Some(SpecDecode {
        drafts,
        draft_tokens,
        accepted_tokens,
        acceptance_pct: (draft_tokens > 0.0).then(|| 100.0 * accepted_tokens / draft_tokens),
        accepted_per_draft: (drafts > 0.0).then(|| accepted_tokens / drafts),
    })
}

/// One KV reading: (allocated slots, filled slots).
pub fn kv_reading(samples: &Samples) -> Option<(f64, f64)> {
    Some((
        *samples.get(names::KV_ALLOCATED)?,
        *samples.get(names::KV_FILLED)?,
    ))
}

/// KV waste of one level: allocated but unused slots over allocated slots, in percent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KvWaste {
    /// How it was obtained (gauges sampled, or estimated from the server's settings).
    pub method: String,
    /// Readings (or requests, for an estimate) it is based on.
    pub samples: usize,
    /// Mean waste, percent.
    pub mean_pct: f64,
    /// Largest waste, percent.
    pub max_pct: f64,
    /// Unused over allocated slots summed over all readings, percent.
    pub overall_pct: f64,
}

/// Waste from gauge readings; readings with nothing allocated are skipped (None if none left).
pub fn kv_waste_from_readings(readings: &[(f64, f64)], interval: Duration) -> Option<KvWaste> {
    let live: Vec<(f64, f64)> = readings
        .iter()
        .copied()
        .filter(|&(a, f)| a > 0.0 && f.is_finite())
        .collect();
    if live.is_empty() {
        return None;
    }
    let pct: Vec<f64> = live
        .iter()
        .map(|&(a, f)| 100.0 * (a - f.min(a)) / a)
        .collect();
    let allocated: f64 = live.iter().map(|r| r.0).sum();
    let unused: f64 = live.iter().map(|&(a, f)| a - f.min(a)).sum();
    Some(KvWaste {
        method: format!(
            "{} / {} sampled every {:.2} s",
            names::KV_FILLED,
            names::KV_ALLOCATED,
            interval.as_secs_f64()
        ),
        samples: live.len(),
        mean_pct: pct.iter().sum::<f64>() / pct.len() as f64,
        max_pct: pct.iter().copied().fold(f64::NEG_INFINITY, f64::max),
        overall_pct: 100.0 * unused / allocated,
    })
}

/// Structural waste of a server that gives each sequence a fixed `slots_per_seq` KV slots for
/// its whole life (llama-server: `-c` / `-np`). Per request (prompt P, output O tokens) the
/// filled slots grow from P to P + O, so its mean waste is 1 − (P + O/2) / slots and its
/// largest 1 − P / slots. Idle slots are not counted (they would only add waste).
pub fn kv_waste_structural(requests: &[(u64, u64)], slots_per_seq: u64) -> Option<KvWaste> {
    if requests.is_empty() || slots_per_seq == 0 {
        return None;
    }
    let n = slots_per_seq as f64;
    let waste = |filled: f64| 100.0 * (1.0 - (filled / n).min(1.0));
    let mean: Vec<f64> = requests
        .iter()
        .map(|&(p, o)| waste(p as f64 + o as f64 / 2.0))
        .collect();
    let max = requests
        .iter()
        .map(|&(p, _)| waste(p as f64))
        .fold(f64::NEG_INFINITY, f64::max);
    let mean_pct = mean.iter().sum::<f64>() / mean.len() as f64;
    Some(KvWaste {
        method: format!(
            "estimated from settings: {slots_per_seq} slots per sequence, 1 − (prompt + output/2) / slots"
        ),
        samples: requests.len(),
        mean_pct,
        max_pct: max,
        overall_pct: mean_pct,
    })
}

/// Samples the KV gauges every `interval` on a background task until [`KvSampler::stop`].
pub struct KvSampler {
    readings: Arc<Mutex<Vec<(f64, f64)>>>,
    task: tokio::task::JoinHandle<()>,
    interval: Duration,
}

impl KvSampler {
    /// Starts sampling `url`.
    pub fn start(client: reqwest::Client, url: String, interval: Duration) -> Self {
        let readings = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&readings);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if let Ok(s) = scrape(&client, &url).await
                    && let Some(r) = kv_reading(&s)
                {
                    sink.lock().unwrap_or_else(PoisonError::into_inner).push(r);
                }
            }
        });
        Self {
            readings,
            task,
            interval,
        }
    }

    /// Stops sampling and summarizes the readings.
    pub fn stop(self) -> Option<KvWaste> {
        self.task.abort();
        let readings = self
            .readings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        kv_waste_from_readings(&readings, self.interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP vllm:request_prefill_time_seconds Time from first scheduling.
# TYPE vllm:request_prefill_time_seconds histogram
vllm:request_prefill_time_seconds_bucket{model_name="m",le="0.001"} 0
vllm:request_prefill_time_seconds_bucket{model_name="m",le="+Inf"} 3
vllm:request_prefill_time_seconds_sum{model_name="m"} 0.123456789
vllm:request_prefill_time_seconds_count{model_name="m"} 3
vllm:request_queue_time_seconds_sum{model_name="m"} 0.001
vllm:request_queue_time_seconds_count{model_name="m"} 3
mpt:kv_cache_allocated_tokens{model_name="m"} 4096
mpt:kv_cache_filled_tokens{model_name="m"} 3968
mpt:http_requests_total{model_name="m",route="/v1/completions",status="200"} 5
mpt:http_requests_total{model_name="m",route="/weird path {x}",status="200"} 2
plain_metric 7 1700000000000
broken_line
nan_metric NaN
"#;

    #[test]
    fn parses_names_sums_label_sets_and_skips_junk() {
        let s = parse_prometheus(TEXT);
        assert_eq!(s[names::PREFILL_SUM], 0.123456789);
        assert_eq!(s[names::PREFILL_COUNT], 3.0);
        assert_eq!(s["mpt:http_requests_total"], 7.0, "summed over labels");
        assert_eq!(s["plain_metric"], 7.0, "timestamp ignored");
        assert!(!s.contains_key("broken_line") && !s.contains_key("nan_metric"));
        assert_eq!(kv_reading(&s), Some((4096.0, 3968.0)));
    }

    #[test]
    fn metrics_url_keeps_scheme_and_host() {
        assert_eq!(
            metrics_url("http://127.0.0.1:18000/v1/completions").as_deref(),
            Some("http://127.0.0.1:18000/metrics")
        );
        assert_eq!(
            metrics_url("https://h/x").as_deref(),
            Some("https://h/metrics")
        );
        assert_eq!(metrics_url("no-scheme"), None);
    }

    #[test]
    fn detection_needs_the_metrics() {
        let s = parse_prometheus(TEXT);
        let tick = Duration::from_millis(500);
        let p = ServerProbe::detect(Some("u".into()), Some(&s), tick, None);
        assert!(p.prefill_from_metrics && p.kv_from_metrics);
        let p = ServerProbe::detect(Some("u".into()), Some(&s), Duration::ZERO, None);
        assert!(
            p.prefill_from_metrics && !p.kv_from_metrics,
            "interval 0 = off"
        );
        let other = parse_prometheus("llamacpp:prompt_tokens_total 5\n");
        let p = ServerProbe::detect(None, Some(&other), tick, Some(1024));
        assert!(!p.prefill_from_metrics && !p.kv_from_metrics);
        assert_eq!(p.kv_slots_per_seq, Some(1024));
        assert!(!ServerProbe::detect(None, None, tick, None).prefill_from_metrics);
    }

    #[test]
    fn prefill_diff_needs_exactly_one_new_request() {
        let before = parse_prometheus(TEXT);
        let mut after = before.clone();
        after.insert(names::PREFILL_SUM.into(), 0.123456789 + 0.0421);
        after.insert(names::PREFILL_COUNT.into(), 4.0);
        after.insert(names::QUEUE_SUM.into(), 0.001 + 0.0002);
        after.insert(names::QUEUE_COUNT.into(), 4.0);
        let (p, q) = prefill_diff(&before, &after).expect("one request");
        assert!((p - 0.0421).abs() < 1e-12 && (q.expect("queue") - 0.0002).abs() < 1e-12);
        // Queue histogram missing: prefill alone.
        let mut no_queue = after.clone();
        no_queue.remove(names::QUEUE_COUNT);
        assert_eq!(prefill_diff(&before, &no_queue).map(|d| d.1), Some(None));
        // Two requests finished in between (or none): ambiguous, no reading.
        after.insert(names::PREFILL_COUNT.into(), 5.0);
        assert_eq!(prefill_diff(&before, &after), None);
        assert_eq!(prefill_diff(&before, &before), None);
        assert_eq!(prefill_diff(&Samples::new(), &after), None);
    }

    #[test]
    fn waste_from_readings_skips_idle_and_weights_overall_by_slots() {
        let tick = Duration::from_millis(250);
        // 10% of 100, 0% of 300, idle; overall 10 / 400.
        let w = kv_waste_from_readings(&[(100.0, 90.0), (300.0, 300.0), (0.0, 0.0)], tick)
            .expect("two live readings");
        assert_eq!(w.samples, 2);
        assert!((w.mean_pct - 5.0).abs() < 1e-12);
        assert!((w.max_pct - 10.0).abs() < 1e-12);
        assert!((w.overall_pct - 2.5).abs() < 1e-12);
        assert!(w.method.contains("0.25 s"), "{}", w.method);
        assert_eq!(kv_waste_from_readings(&[(0.0, 0.0)], tick), None);
        // Filled above allocated (a racing scrape) counts as no waste, never negative.
        let w = kv_waste_from_readings(&[(16.0, 20.0)], tick).expect("one");
        assert_eq!(w.max_pct, 0.0);
    }

    #[test]
    fn structural_waste_of_fixed_slots() {
        // Prompt 128 + output 128 in 1024-slot sequences: mean fill 192 → 81.25% waste; at the
        // start 128 → 87.5%.
        let before = parse_prometheus(
            "vllm:spec_decode_num_drafts_total{model_name=\"m\"} 10\n\
             vllm:spec_decode_num_draft_tokens_total{model_name=\"m\"} 40\n\
             vllm:spec_decode_num_accepted_tokens_total{model_name=\"m\"} 20\n",
        );
        let after = parse_prometheus(
            "vllm:spec_decode_num_drafts_total{model_name=\"m\"} 20\n\
             vllm:spec_decode_num_draft_tokens_total{model_name=\"m\"} 80\n\
             vllm:spec_decode_num_accepted_tokens_total{model_name=\"m\"} 50\n",
        );
        let s = spec_decode_diff(&before, &after).expect("counters");
        assert_eq!(
            (s.drafts, s.draft_tokens, s.accepted_tokens),
            (10.0, 40.0, 30.0)
        );
        assert_eq!(
            (s.acceptance_pct, s.accepted_per_draft),
            (Some(75.0), Some(3.0))
        );
        let idle = spec_decode_diff(&after, &after).expect("counters");
        assert_eq!((idle.acceptance_pct, idle.accepted_per_draft), (None, None));
        assert_eq!(spec_decode_diff(&Samples::new(), &after), None);
        let w = kv_waste_structural(&[(128, 128), (128, 128)], 1024).expect("estimate");
        assert!((w.mean_pct - 81.25).abs() < 1e-12);
        assert!((w.max_pct - 87.5).abs() < 1e-12);
        assert_eq!(w.samples, 2);
        assert!(w.method.contains("1024 slots"));
        // Longer than the slot: no negative waste.
        let w = kv_waste_structural(&[(2000, 100)], 1024).expect("estimate");
        assert_eq!((w.mean_pct, w.max_pct), (0.0, 0.0));
        assert_eq!(kv_waste_structural(&[], 1024), None);
        assert_eq!(kv_waste_structural(&[(1, 1)], 0), None);
    }
}
