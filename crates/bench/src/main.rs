//! `mpt-bench`: runs load against a completions endpoint, or compares result files.
//!
//! Invariants: every run ends by itself (request count and time cap per level); results are
//! written even when some requests failed (failures are counted in them); exit status is
//! non-zero only for a usage error or when no request at all succeeded.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};

use mpt_bench::chart;
use mpt_bench::cli::{Cli, Command, CompareArgs, RunArgs, SoakArgs};
use mpt_bench::client::{Target, send};
use mpt_bench::report::{RunResult, RunSettings, compare_markdown, console_table};
use mpt_bench::runner::{Endpoint, Limits, run_level};
use mpt_bench::scrape::{ServerProbe, scrape};
use mpt_bench::soak::{self, SoakTarget};
use mpt_bench::workload::plan_requests;

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(run(*args))
        }
        Command::Compare(args) => compare(args),
        Command::Soak(args) => {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(soak(args))
        }
    }
}

async fn soak(args: SoakArgs) -> Result<()> {
    if !(args.rate.is_finite() && args.rate > 0.0) {
        bail!("--rate {}: must be a positive number", args.rate);
    }
    for (flag, secs) in [("--duration", args.duration), ("--warmup", args.warmup)] {
        if !(secs.is_finite() && secs >= 0.0) {
            bail!("{flag} {secs}: must be a number of seconds");
        }
    }
    let metrics_url = match &args.metrics_url {
        Some(url) => url.clone(),
        None => mpt_bench::scrape::metrics_url(&args.url)
            .with_context(|| format!("no /metrics URL can be made from {}", args.url))?,
    };
    let target = SoakTarget {
        url: args.url.clone(),
        metrics_url,
        model: args.model.clone(),
        api_key: args.api_key.clone(),
        pid: args.server_pid,
        max_tokens: args.max_tokens,
        request_timeout: Duration::from_secs_f64(args.request_timeout),
    };
    let client = reqwest::Client::builder()
        .pool_idle_timeout(Duration::from_secs(2))
        .build()
        .context("building the HTTP client")?;
    eprintln!(
        "soak: {} req/s for {} s after a {} s warm-up against {}",
        args.rate, args.duration, args.warmup, args.url
    );
    let report = soak::run(
        &client,
        &target,
        args.rate,
        Duration::from_secs_f64(args.duration),
        Duration::from_secs_f64(args.warmup),
        args.seed,
    )
    .await;
    println!("{}", soak_table(&report));
    if let Some(path) = &args.output {
        write_json(path, &report)?;
    }
    for problem in &report.problems {
        eprintln!("  {problem}");
    }
    if !report.pass {
        bail!("soak failed: {}", report.failures.join("; "));
    }
    Ok(())
}

/// The verdict as a markdown table.
fn soak_table(r: &soak::SoakReport) -> String {
    let mib = |b: Option<u64>| b.map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / 1048576.0));
    let sent: usize = r.sent.iter().map(|(_, n)| n).sum();
    let mix: Vec<String> = r.sent.iter().map(|(k, n)| format!("{k} {n}")).collect();
    let gauges: Vec<String> = r
        .end_gauges
        .iter()
        .map(|(g, v)| format!("{g} = {v}"))
        .collect();
    let ttft = r.ttft_ms.as_ref().map_or("-".into(), |s| {
        format!("p50 {:.1} ms, p99 {:.1} ms", s.p50, s.p99)
    });
    [
        "| check | value |".to_string(),
        "| --- | --- |".to_string(),
        format!(
            "| requests | {sent} in {:.0} s at {} req/s ({}) |",
            r.duration_s,
            r.rate,
            mix.join(", ")
        ),
        format!("| unexpected statuses | {} |", r.unexpected_statuses),
        format!("| lost or unfinished | {} |", r.lost),
        format!("| at the end | {} |", gauges.join(", ")),
        format!(
            "| RSS | {} → {} ({}) |",
            mib(r.rss_start),
            mib(r.rss_end),
            r.rss_growth_pct
                .map_or("not measured".into(), |g| format!("{g:+.1}%"))
        ),
        format!("| TTFT of streams | {ttft} |"),
        format!("| verdict | {} |", if r.pass { "pass" } else { "FAIL" }),
    ]
    .join("\n")
}

/// Progress bar for one level (hidden with --no-progress).
fn progress(args: &RunArgs, len: usize, prefix: String) -> ProgressBar {
    if args.no_progress {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len as u64);
    let style = ProgressStyle::with_template(
        "{prefix:>10} [{elapsed_precise}] {bar:30} {pos}/{len} requests {msg}",
    )
    .expect("static template; this is a bug");
    bar.set_style(style);
    bar.set_prefix(prefix);
    bar.enable_steady_tick(Duration::from_millis(250));
    bar
}

async fn run(args: RunArgs) -> Result<()> {
    let loads = args.loads().map_err(anyhow::Error::msg)?;
    args.check_times().map_err(anyhow::Error::msg)?;
    let target = Target {
        url: args.url.clone(),
        model: args.model.clone(),
        api_key: args.api_key.clone(),
        temperature: args.temperature,
        extra_body: args.extra_body().map_err(anyhow::Error::msg)?,
        request_timeout: Duration::from_secs_f64(args.request_timeout),
        server_timings: args.server_timings,
        response_format: args.response_format().map_err(anyhow::Error::msg)?,
    };
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        // Servers close idle keep-alive connections (llama-server after 5 s); dropping ours
        // sooner keeps a request from being sent on a connection the server is closing.
        .pool_idle_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .build()
        .context("building the HTTP client")?;
    let limits = Limits {
        max_duration: Duration::from_secs_f64(args.max_duration),
        grace: Duration::from_secs_f64(args.grace),
    };

    // Warm-up: a different seed so measured prompts are not already cached by the server.
    for (i, req) in plan_requests(
        args.warmup,
        args.prompt_tokens,
        args.output_tokens,
        !args.seed,
    )
    .iter()
    .enumerate()
    {
        let r = tokio::time::timeout(limits.max_duration, send(&client, &target, req, 0.0)).await;
        match r {
            Ok(rec) if rec.ok() => {}
            Ok(rec) => bail!(
                "warm-up request {} to {} failed: {}",
                i + 1,
                args.url,
                rec.error.unwrap_or_default()
            ),
            Err(_) => bail!("warm-up request {} took longer than --max-duration", i + 1),
        }
    }

    let probe = probe_server(&client, &args).await;
    let endpoint = Endpoint {
        client: client.clone(),
        target: target.clone(),
        probe,
    };

    let mut result = RunResult {
        scenario: args.scenario.clone(),
        label: args.label(),
        started_unix_s: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        settings: RunSettings {
            url: args.url.clone(),
            model: args.model.clone(),
            prompt_tokens: args.prompt_tokens.to_string(),
            output_tokens: args.output_tokens.to_string(),
            temperature: args.temperature,
            seed: args.seed,
            max_duration_s: args.max_duration,
            warmup: args.warmup,
        },
        levels: Vec::new(),
    };
    for (i, &load) in loads.iter().enumerate() {
        let count = args.requests_for(load);
        // Each level gets its own prompts: no level reuses another's prefixes.
        let seed = args.seed.wrapping_add(i as u64 + 1);
        let plan = plan_requests(count, args.prompt_tokens, args.output_tokens, seed);
        let bar = progress(&args, count, load.label());
        let (level, _records) = run_level(endpoint.clone(), load, plan, seed, limits, bar).await;
        result.levels.push(level);
        if let Some(path) = &args.output {
            write_json(path, &result)?;
        }
    }
    print!("{}", console_table(&result));
    if let Some(path) = &args.output {
        eprintln!("results: {}", path.display());
    }
    if let Some(path) = &args.chart {
        let title = format!("{} — {}", result.label, result.scenario);
        chart::write_png(path, &title, std::slice::from_ref(&result))?;
        eprintln!("chart: {}", path.display());
    }
    if result.levels.iter().all(|l| l.completed == 0) {
        bail!("no request succeeded");
    }
    Ok(())
}

/// Scrapes the server's /metrics once (after warm-up) and says on stderr what it offers.
async fn probe_server(client: &reqwest::Client, args: &RunArgs) -> ServerProbe {
    let kv_interval = Duration::from_secs_f64(args.kv_sample_interval);
    let url = args.metrics_url();
    let wanted = args.server_timings || !kv_interval.is_zero();
    let samples = match (&url, wanted) {
        (Some(u), true) => match scrape(client, u).await {
            Ok(s) => Some(s),
            Err(e) => {
                eprintln!("server metrics: none ({e})");
                None
            }
        },
        _ => None,
    };
    let probe = ServerProbe::detect(url, samples.as_ref(), kv_interval, args.kv_slots_per_seq);
    if args.server_timings {
        eprintln!(
            "server prefill times: {}",
            if probe.prefill_from_metrics {
                "/metrics vllm:request_prefill_time_seconds, diffed around each request at concurrency 1"
            } else {
                "a response's `timings.prompt_ms` if the server sends one (no prefill histogram on /metrics)"
            }
        );
    }
    if probe.kv_from_metrics {
        eprintln!("KV waste: sampling mpt:kv_cache_* every {kv_interval:?}");
    } else if let Some(n) = probe.kv_slots_per_seq {
        eprintln!("KV waste: no KV gauges; estimated from {n} slots per sequence");
    }
    probe
}

fn write_json(path: &Path, result: &impl serde::Serialize) -> Result<()> {
    let json = serde_json::to_string_pretty(result).expect("results serialize; this is a bug");
    std::fs::write(path, json + "\n").with_context(|| format!("writing {}", path.display()))
}

fn read_json(path: &Path) -> Result<RunResult> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("parsing {}", path.display()))
}

fn compare(args: CompareArgs) -> Result<()> {
    if args.candidate.len() != args.baseline.len() {
        bail!(
            "{} --candidate files but {} --baseline files: they are paired in order",
            args.candidate.len(),
            args.baseline.len()
        );
    }
    let mut pairs = Vec::new();
    for (c, b) in args.candidate.iter().zip(&args.baseline) {
        pairs.push((read_json(c)?, read_json(b)?));
    }
    let table = compare_markdown(&pairs);
    print!("{table}");
    if let Some(path) = &args.output {
        std::fs::write(path, &table).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.chart {
        let (c, b) = pairs
            .iter()
            .max_by_key(|(c, _)| c.levels.len())
            .context("no result files given")?;
        let title = format!("{} vs {} — {}", c.label, b.label, c.scenario);
        chart::write_png(path, &title, &[c.clone(), b.clone()])?;
        eprintln!("chart: {}", path.display());
    }
    Ok(())
}
