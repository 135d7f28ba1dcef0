//! Drives one level of load: a fixed number of streams in flight, or Poisson arrivals.
//!
//! Invariants: a level is bounded twice: at most `plan.len()` requests, and no request starts
//! after `max_duration`; requests still running at `max_duration` + `grace` are dropped (which
//! closes their connections, so servers that abort on disconnect free the work) and counted as
//! cancelled. Requests are taken from the plan in order, so two servers see the same sequence.
//! Server-side readings: with one stream in flight and a prefill histogram on `/metrics`,
//! each request is bracketed by two scrapes (outside its timed span); KV gauges are sampled on
//! a background task for the whole level.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use indicatif::ProgressBar;
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::client::{Target, send};
use crate::scrape::{
    KvSampler, ServerProbe, kv_waste_structural, prefill_diff, scrape, spec_decode_diff,
};
use crate::stats::{LevelResult, Load, RequestRecord, TimingSource, aggregate};
use crate::workload::{PlannedRequest, poisson_schedule};

/// Time limits of a level.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// No request starts after this.
    pub max_duration: Duration,
    /// Extra time given to requests in flight at `max_duration` before they are cancelled.
    pub grace: Duration,
}

/// The server under test: how to reach it and what it tells about itself.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// HTTP client (connection pool).
    pub client: reqwest::Client,
    /// Where and how to send requests.
    pub target: Target,
    /// What its `/metrics` offers.
    pub probe: ServerProbe,
}

/// Shared state of the workers of one level.
struct Level {
    client: reqwest::Client,
    target: Target,
    /// `/metrics` to scrape around each request for its prefill time (one stream only).
    prefill_metrics: Option<String>,
    plan: Vec<PlannedRequest>,
    next: AtomicUsize,
    /// Requests actually sent (each ends as a record or as a cancellation).
    sent: AtomicUsize,
    started: Instant,
    limits: Limits,
    records: Mutex<Vec<RequestRecord>>,
    progress: ProgressBar,
}

impl Level {
    /// True while new requests may start.
    fn open(&self) -> bool {
        self.started.elapsed() < self.limits.max_duration
    }

    async fn run_one(&self, index: usize) {
        self.sent.fetch_add(1, Ordering::Relaxed);
        let before = match &self.prefill_metrics {
            Some(url) => scrape(&self.client, url).await.ok(),
            None => None,
        };
        let start_s = self.started.elapsed().as_secs_f64();
        let mut record = send(&self.client, &self.target, &self.plan[index], start_s).await;
        if let (Some(before), Some(url)) = (before, &self.prefill_metrics)
            && record.ok()
            && record.server_prefill_s.is_none()
            && let Ok(after) = scrape(&self.client, url).await
            && let Some((prefill, queue)) = prefill_diff(&before, &after)
        {
            record.server_prefill_s = Some(prefill);
            record.server_queue_s = queue;
            record.server_timing_source = Some(TimingSource::MetricsDiff);
        }
        if let Some(e) = &record.error {
            self.progress.set_message(format!("last error: {e}"));
        }
        self.records.lock().await.push(record);
        self.progress.inc(1);
    }
}

/// Runs one level and aggregates its records.
pub async fn run_level(
    endpoint: Endpoint,
    load: Load,
    plan: Vec<PlannedRequest>,
    seed: u64,
    limits: Limits,
    progress: ProgressBar,
) -> (LevelResult, Vec<RequestRecord>) {
    let total = plan.len();
    let Endpoint {
        client,
        target,
        probe,
    } = endpoint;
    // Scrapes bracket a request only when nothing else can move the histogram meanwhile.
    let prefill_metrics = probe
        .metrics_url
        .clone()
        .filter(|_| target.server_timings && probe.prefill_from_metrics)
        .filter(|_| load == Load::Concurrency(1));
    let kv_sampler = match &probe.metrics_url {
        Some(url) if probe.kv_from_metrics => Some(KvSampler::start(
            client.clone(),
            url.clone(),
            probe.kv_interval,
        )),
        _ => None,
    };
    // Speculative-decoding counters around the level (scraped before its clock starts).
    let counters_before = match &probe.metrics_url {
        Some(url) => scrape(&client, url).await.ok(),
        None => None,
    };
    let level = Arc::new(Level {
        client,
        target,
        prefill_metrics,
        plan,
        next: AtomicUsize::new(0),
        sent: AtomicUsize::new(0),
        started: Instant::now(),
        limits,
        records: Mutex::new(Vec::with_capacity(total)),
        progress,
    });
    let mut tasks = tokio::task::JoinSet::new();
    match load {
        Load::Concurrency(n) => {
            for _ in 0..n.min(total) {
                let level = Arc::clone(&level);
                tasks.spawn(async move {
                    loop {
                        let i = level.next.fetch_add(1, Ordering::Relaxed);
                        if i >= level.plan.len() || !level.open() {
                            break;
                        }
                        level.run_one(i).await;
                    }
                });
            }
        }
        Load::RequestRate(rate) => {
            let schedule = poisson_schedule(total, rate, seed);
            let level2 = Arc::clone(&level);
            // The dispatcher sleeps until each arrival and spawns the request on its own task.
            tasks.spawn(async move {
                let mut inner = tokio::task::JoinSet::new();
                for (i, at) in schedule.into_iter().enumerate() {
                    tokio::time::sleep_until(level2.started + Duration::from_secs_f64(at)).await;
                    if !level2.open() {
                        break;
                    }
                    let level3 = Arc::clone(&level2);
                    inner.spawn(async move { level3.run_one(i).await });
                }
                while inner.join_next().await.is_some() {}
            });
        }
    }
    let hard_stop = level.started + limits.max_duration + limits.grace;
    let finished = tokio::time::timeout_at(hard_stop, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if finished.is_err() {
        // Dropping the tasks drops their in-flight requests.
        tasks.shutdown().await;
    }
    let records = std::mem::take(&mut *level.records.lock().await);
    let cancelled = level
        .sent
        .load(Ordering::Relaxed)
        .saturating_sub(records.len());
    level.progress.finish_and_clear();
    let mut result = aggregate(load, &records, cancelled);
    if let (Some(before), Some(url)) = (&counters_before, &probe.metrics_url)
        && let Ok(after) = scrape(&level.client, url).await
    {
        result.spec_decode = spec_decode_diff(before, &after);
    }
    result.kv_waste = match (kv_sampler, probe.kv_slots_per_seq) {
        (Some(sampler), _) => sampler.stop(),
        (None, Some(slots)) => {
            let shapes: Vec<(u64, u64)> = records
                .iter()
                .filter(|r| r.ok())
                .map(|r| {
                    let prompt = r.prompt_tokens.unwrap_or(r.requested_prompt_tokens);
                    (prompt, r.output_tokens)
                })
                .collect();
            kv_waste_structural(&shapes, slots)
        }
        (None, None) => None,
    };
    (result, records)
}
