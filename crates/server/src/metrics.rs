//! Prometheus metrics with vLLM's names, so existing dashboards, KEDA scalers and the Gateway
//! API Inference Extension work unchanged.
//!
//! Invariants: every series carries the `model_name` label; names and buckets are defined once,
//! in [`names`] and [`LATENCY_BUCKETS`]; engine gauges and counters are read from
//! [`EngineStats`] at scrape time, so they can never drift from the engine's own bookkeeping
//! (counters only ever move up to the engine's total). KV waste (`mpt:kv_cache_*`) is
//! allocated-but-unfilled token slots over allocated slots, from the same snapshot; the
//! prefill histogram is vLLM's (scheduled → first token), which `mpt-bench` subtracts from
//! the client's TTFT to measure server overhead.

use std::time::Duration;

use mpt_engine::{EngineStats, FinishReason, Timings};

use crate::openai::types::finish_reason;
use prometheus::{
    Encoder, GaugeVec, HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry, TextEncoder,
};

/// Metric names (vLLM's where vLLM has one).
pub mod names {
    /// Requests with a running sequence.
    pub const NUM_REQUESTS_RUNNING: &str = "vllm:num_requests_running";
    /// Requests waiting for admission.
    pub const NUM_REQUESTS_WAITING: &str = "vllm:num_requests_waiting";
    /// Fraction of KV blocks in use, 0–1.
    pub const KV_CACHE_USAGE: &str = "vllm:kv_cache_usage_perc";
    /// The same, under vLLM's older name.
    pub const GPU_CACHE_USAGE: &str = "vllm:gpu_cache_usage_perc";
    /// Preemptions since start.
    pub const NUM_PREEMPTIONS: &str = "vllm:num_preemptions_total";
    /// Prompt tokens processed.
    pub const PROMPT_TOKENS: &str = "vllm:prompt_tokens_total";
    /// Tokens generated.
    pub const GENERATION_TOKENS: &str = "vllm:generation_tokens_total";
    /// Finished requests by `finished_reason`.
    pub const REQUEST_SUCCESS: &str = "vllm:request_success_total";
    /// Submission → first token.
    pub const TIME_TO_FIRST_TOKEN: &str = "vllm:time_to_first_token_seconds";
    /// Between consecutive output tokens.
    pub const INTER_TOKEN_LATENCY: &str = "vllm:inter_token_latency_seconds";
    /// Submission → completion.
    pub const E2E_REQUEST_LATENCY: &str = "vllm:e2e_request_latency_seconds";
    /// Submission → first scheduled.
    pub const REQUEST_QUEUE_TIME: &str = "vllm:request_queue_time_seconds";
    /// First scheduled → first token sampled (the prompt's forward passes and sampling).
    pub const REQUEST_PREFILL_TIME: &str = "vllm:request_prefill_time_seconds";
    /// KV token slots in blocks held by live sequences (shared blocks once).
    pub const KV_CACHE_ALLOCATED_TOKENS: &str = "mpt:kv_cache_allocated_tokens";
    /// Of those, slots holding a computed position.
    pub const KV_CACHE_FILLED_TOKENS: &str = "mpt:kv_cache_filled_tokens";
    /// Allocated but unfilled slots / allocated slots, 0–1 (0 when nothing is allocated).
    pub const KV_CACHE_WASTE: &str = "mpt:kv_cache_waste_perc";
    /// Bytes of the KV pool, labelled with its element type (`dtype`).
    pub const KV_CACHE_BYTES: &str = "mpt:kv_cache_bytes";
    /// Prompt blocks looked up in the prefix cache.
    pub const PREFIX_CACHE_QUERIES: &str = "vllm:prefix_cache_queries_total";
    /// Prompt blocks found in the prefix cache.
    pub const PREFIX_CACHE_HITS: &str = "vllm:prefix_cache_hits_total";
    /// Speculative drafts verified.
    pub const SPEC_DECODE_DRAFTS: &str = "vllm:spec_decode_num_drafts_total";
    /// Tokens in the drafts verified.
    pub const SPEC_DECODE_DRAFT_TOKENS: &str = "vllm:spec_decode_num_draft_tokens_total";
    /// Drafted tokens the model agreed with (accepted / drafted is the acceptance rate).
    pub const SPEC_DECODE_ACCEPTED_TOKENS: &str = "vllm:spec_decode_num_accepted_tokens_total";
    /// HTTP requests by route and status.
    pub const HTTP_REQUESTS: &str = "mpt:http_requests_total";
    /// Requests rejected before reaching the engine, by reason.
    pub const REQUESTS_REJECTED: &str = "mpt:requests_rejected_total";
}

/// Histogram buckets for all latencies, in seconds.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0,
];

/// KV token slots (allocated, filled) from the engine's block counts; filled never exceeds
/// allocated.
fn kv_slots(stats: &EngineStats) -> (usize, usize) {
    let allocated = stats.kv_blocks_used * stats.kv_block_size;
    (allocated, stats.kv_tokens_filled.min(allocated))
}

/// All metrics of one server.
pub struct Metrics {
    model_name: String,
    registry: Registry,
    running: GaugeVec,
    waiting: GaugeVec,
    kv_usage: GaugeVec,
    gpu_cache_usage: GaugeVec,
    preemptions: IntCounterVec,
    prompt_tokens: IntCounterVec,
    generation_tokens: IntCounterVec,
    prefix_queries: IntCounterVec,
    prefix_hits: IntCounterVec,
    spec_drafts: IntCounterVec,
    spec_draft_tokens: IntCounterVec,
    spec_accepted_tokens: IntCounterVec,
    request_success: IntCounterVec,
    ttft: HistogramVec,
    itl: HistogramVec,
    e2e: HistogramVec,
    queue_time: HistogramVec,
    prefill_time: HistogramVec,
    kv_allocated: GaugeVec,
    kv_filled: GaugeVec,
    kv_waste: GaugeVec,
    kv_bytes: GaugeVec,
    http_requests: IntCounterVec,
    rejected: IntCounterVec,
}

fn register<T: prometheus::core::Collector + Clone + 'static>(registry: &Registry, metric: T) -> T {
    registry
        .register(Box::new(metric.clone()))
        .expect("metric names are unique and valid; this is a bug");
    metric
}

impl Metrics {
    /// Creates and registers every metric for `model_name`.
    pub fn new(model_name: &str) -> Self {
        let registry = Registry::new();
        let gauge = |name: &str, help: &str| {
            register(
                &registry,
                GaugeVec::new(Opts::new(name, help), &["model_name"])
                    .expect("valid gauge; this is a bug"),
            )
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            register(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels)
                    .expect("valid counter; this is a bug"),
            )
        };
        let histogram = |name: &str, help: &str| {
            register(
                &registry,
                HistogramVec::new(
                    HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                    &["model_name"],
                )
                .expect("valid histogram; this is a bug"),
            )
        };
        use names::*;
        Self {
            model_name: model_name.to_string(),
            running: gauge(
                NUM_REQUESTS_RUNNING,
                "Number of requests currently running.",
            ),
            waiting: gauge(
                NUM_REQUESTS_WAITING,
                "Number of requests waiting to be scheduled.",
            ),
            kv_usage: gauge(KV_CACHE_USAGE, "KV-cache usage, 1 means 100 percent."),
            gpu_cache_usage: gauge(
                GPU_CACHE_USAGE,
                "KV-cache usage, 1 means 100 percent (legacy name).",
            ),
            preemptions: counter(
                NUM_PREEMPTIONS,
                "Cumulative number of preemptions.",
                &["model_name"],
            ),
            prompt_tokens: counter(
                PROMPT_TOKENS,
                "Number of prefill tokens processed.",
                &["model_name"],
            ),
            generation_tokens: counter(
                GENERATION_TOKENS,
                "Number of generated tokens.",
                &["model_name"],
            ),
            prefix_queries: counter(
                PREFIX_CACHE_QUERIES,
                "Prompt blocks looked up in the prefix cache.",
                &["model_name"],
            ),
            prefix_hits: counter(
                PREFIX_CACHE_HITS,
                "Prompt blocks found in the prefix cache.",
                &["model_name"],
            ),
            spec_drafts: counter(
                SPEC_DECODE_DRAFTS,
                "Number of speculative drafts verified.",
                &["model_name"],
            ),
            spec_draft_tokens: counter(
                SPEC_DECODE_DRAFT_TOKENS,
                "Number of drafted tokens verified.",
                &["model_name"],
            ),
            spec_accepted_tokens: counter(
                SPEC_DECODE_ACCEPTED_TOKENS,
                "Number of drafted tokens accepted.",
                &["model_name"],
            ),
            request_success: counter(
                REQUEST_SUCCESS,
                "Count of successfully processed requests.",
                &["model_name", "finished_reason"],
            ),
            ttft: histogram(TIME_TO_FIRST_TOKEN, "Time to first token in seconds."),
            itl: histogram(
                INTER_TOKEN_LATENCY,
                "Time between output tokens in seconds.",
            ),
            e2e: histogram(
                E2E_REQUEST_LATENCY,
                "End-to-end request latency in seconds.",
            ),
            queue_time: histogram(
                REQUEST_QUEUE_TIME,
                "Time spent waiting in the queue in seconds.",
            ),
            prefill_time: histogram(
                REQUEST_PREFILL_TIME,
                "Time from first scheduling to the first token sampled, in seconds.",
            ),
            kv_allocated: gauge(
                KV_CACHE_ALLOCATED_TOKENS,
                "KV-cache token slots in blocks held by running sequences.",
            ),
            kv_filled: gauge(
                KV_CACHE_FILLED_TOKENS,
                "KV-cache token slots holding a computed position.",
            ),
            kv_waste: gauge(
                KV_CACHE_WASTE,
                "Allocated but unfilled KV slots over allocated slots, 1 means 100 percent.",
            ),
            kv_bytes: register(
                &registry,
                GaugeVec::new(
                    Opts::new(
                        KV_CACHE_BYTES,
                        "Bytes of the KV-cache pool, by element type.",
                    ),
                    &["model_name", "dtype"],
                )
                .expect("valid gauge; this is a bug"),
            ),
            http_requests: counter(
                HTTP_REQUESTS,
                "HTTP requests by route and status.",
                &["model_name", "route", "status"],
            ),
            rejected: counter(
                REQUESTS_REJECTED,
                "Requests rejected before generation, by reason.",
                &["model_name", "reason"],
            ),
            registry,
        }
    }

    /// Counts one HTTP response.
    pub fn http_request(&self, route: &str, status: u16) {
        self.http_requests
            .with_label_values(&[self.model_name.as_str(), route, &status.to_string()])
            .inc();
    }

    /// Counts one rejected request.
    pub fn rejected(&self, reason: &str) {
        self.rejected
            .with_label_values(&[self.model_name.as_str(), reason])
            .inc();
    }

    /// Records a finished engine request (its prefill time only if it was prefilled).
    pub fn request_finished(&self, reason: FinishReason, timings: &Timings) {
        let m = [self.model_name.as_str()];
        self.request_success
            .with_label_values(&[self.model_name.as_str(), finish_reason(reason)])
            .inc();
        self.queue_time
            .with_label_values(&m)
            .observe(timings.queue.as_secs_f64());
        if let Some(ttft) = timings.first_token {
            self.ttft.with_label_values(&m).observe(ttft.as_secs_f64());
        }
        // Zero means never prefilled (aborted first): not a sample of prefill time.
        if !timings.prefill.is_zero() {
            self.prefill_time
                .with_label_values(&m)
                .observe(timings.prefill.as_secs_f64());
        }
        self.e2e
            .with_label_values(&m)
            .observe(timings.total.as_secs_f64());
    }

    /// Records an engine request the client cancelled before it finished (vLLM counts these
    /// as `finished_reason="abort"`), `total` after it was submitted.
    pub fn request_aborted(&self, total: Duration) {
        self.request_success
            .with_label_values(&[self.model_name.as_str(), finish_reason(FinishReason::Abort)])
            .inc();
        self.e2e
            .with_label_values(&[self.model_name.as_str()])
            .observe(total.as_secs_f64());
    }

    /// Records the gap before `tokens` new output tokens (spread evenly over them).
    pub fn inter_token(&self, gap: Duration, tokens: usize) {
        if tokens == 0 {
            return;
        }
        let each = gap.as_secs_f64() / tokens as f64;
        let h = self.itl.with_label_values(&[self.model_name.as_str()]);
        for _ in 0..tokens {
            h.observe(each);
        }
    }

    /// Records the KV pool's size and element type (once the engine is loaded).
    pub fn set_kv_cache(&self, dtype: &str, bytes: u64) {
        self.kv_bytes
            .with_label_values(&[self.model_name.as_str(), dtype])
            .set(bytes as f64);
    }

    /// Copies the engine's gauges and counters into the registry.
    pub fn sync_engine(&self, stats: &EngineStats) {
        let m = [self.model_name.as_str()];
        self.running
            .with_label_values(&m)
            .set(stats.num_running as f64);
        self.waiting
            .with_label_values(&m)
            .set(stats.num_waiting as f64);
        let usage = if stats.kv_blocks_total == 0 {
            0.0
        } else {
            stats.kv_blocks_used as f64 / stats.kv_blocks_total as f64
        };
        self.kv_usage.with_label_values(&m).set(usage);
        self.gpu_cache_usage.with_label_values(&m).set(usage);
        let (allocated, filled) = kv_slots(stats);
        self.kv_allocated
            .with_label_values(&m)
            .set(allocated as f64);
        self.kv_filled.with_label_values(&m).set(filled as f64);
        let waste = if allocated == 0 {
            0.0
        } else {
            (allocated - filled) as f64 / allocated as f64
        };
        self.kv_waste.with_label_values(&m).set(waste);
        let catch_up = |c: &IntCounterVec, total: u64| {
            let c = c.with_label_values(&m);
            if total > c.get() {
                c.inc_by(total - c.get());
            }
        };
        catch_up(&self.preemptions, stats.num_preemptions);
        catch_up(&self.prompt_tokens, stats.prompt_tokens);
        catch_up(&self.generation_tokens, stats.generation_tokens);
        catch_up(&self.prefix_queries, stats.prefix_cache_queries);
        catch_up(&self.prefix_hits, stats.prefix_cache_hits);
        catch_up(&self.spec_drafts, stats.spec_decode_drafts);
        catch_up(&self.spec_draft_tokens, stats.spec_decode_draft_tokens);
        catch_up(
            &self.spec_accepted_tokens,
            stats.spec_decode_accepted_tokens,
        );
    }

    /// The Prometheus text exposition, after syncing `stats` when the engine is up.
    pub fn render(&self, stats: Option<&EngineStats>) -> String {
        if let Some(stats) = stats {
            self.sync_engine(stats);
        } else {
            self.sync_engine(&EngineStats::default());
        }
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding of valid metrics cannot fail; this is a bug");
        String::from_utf8(out).expect("prometheus text is UTF-8; this is a bug")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_vllm_names_with_model_label() {
        let m = Metrics::new("demo");
        let stats = EngineStats {
            kv_blocks_used: 1,
            kv_blocks_total: 4,
            prompt_tokens: 7,
            ..Default::default()
        };
        m.request_finished(
            FinishReason::Length,
            &Timings {
                queue: Duration::ZERO,
                prefill: Duration::from_millis(4),
                first_token: Some(Duration::from_millis(5)),
                total: Duration::from_millis(9),
            },
        );
        let text = m.render(Some(&stats));
        assert!(
            text.contains("vllm:kv_cache_usage_perc{model_name=\"demo\"} 0.25"),
            "{text}"
        );
        assert!(
            text.contains("vllm:prompt_tokens_total{model_name=\"demo\"} 7"),
            "{text}"
        );
        assert!(
            text.contains(
                "vllm:request_success_total{finished_reason=\"length\",model_name=\"demo\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("vllm:time_to_first_token_seconds_count{model_name=\"demo\"} 1"),
            "{text}"
        );
        // A second scrape does not double-count.
        let text = m.render(Some(&stats));
        assert!(
            text.contains("vllm:prompt_tokens_total{model_name=\"demo\"} 7"),
            "{text}"
        );
    }

    #[test]
    fn kv_cache_size_is_exported_with_its_dtype() {
        let m = Metrics::new("demo");
        m.set_kv_cache("f16", 1 << 30);
        let text = m.render(None);
        assert!(
            text.contains("mpt:kv_cache_bytes{dtype=\"f16\",model_name=\"demo\"} 1073741824"),
            "{text}"
        );
    }

    #[test]
    fn prefill_time_and_kv_waste_are_exported() {
        let m = Metrics::new("demo");
        let timings = |prefill_ms: u64| Timings {
            queue: Duration::from_millis(1),
            prefill: Duration::from_millis(prefill_ms),
            first_token: (prefill_ms > 0).then(|| Duration::from_millis(prefill_ms + 1)),
            total: Duration::from_millis(prefill_ms + 2),
        };
        m.request_finished(FinishReason::Length, &timings(250));
        m.request_finished(FinishReason::Length, &timings(500));
        // Aborted before it was scheduled: no prefill sample.
        m.request_finished(FinishReason::Abort, &timings(0));
        // 3 blocks of 16 slots held, 40 slots filled: 8 / 48 wasted.
        let stats = EngineStats {
            kv_blocks_used: 3,
            kv_blocks_total: 10,
            kv_block_size: 16,
            kv_tokens_filled: 40,
            ..Default::default()
        };
        let text = m.render(Some(&stats));
        for line in [
            "vllm:request_prefill_time_seconds_count{model_name=\"demo\"} 2",
            "vllm:request_prefill_time_seconds_sum{model_name=\"demo\"} 0.75",
            "vllm:request_queue_time_seconds_count{model_name=\"demo\"} 3",
            "mpt:kv_cache_allocated_tokens{model_name=\"demo\"} 48",
            "mpt:kv_cache_filled_tokens{model_name=\"demo\"} 40",
            "mpt:kv_cache_waste_perc{model_name=\"demo\"} 0.16666666666666666",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        // Nothing allocated: no waste (not NaN).
        let text = m.render(Some(&EngineStats::default()));
        assert!(
            text.contains("mpt:kv_cache_waste_perc{model_name=\"demo\"} 0\n"),
            "{text}"
        );
    }
}
