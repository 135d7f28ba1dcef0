//! Command-line flags of `mpt-bench` (clap derive).
//!
//! Invariants: every flag has a doc comment (it is the `--help` text); list flags are parsed
//! here into typed values, so a bad value fails before any request is sent; every run is
//! bounded: a request count per level and a time cap per level.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::stats::Load;
use crate::workload::Length;

/// Load generator for OpenAI-compatible `/v1/completions` servers (mpt-serve, llama.cpp, vLLM).
#[derive(Debug, Parser)]
#[command(name = "mpt-bench", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Send load to one server and report latency and throughput per level.
    Run(Box<RunArgs>),
    /// Compare result files of two servers: markdown table of ratios and a chart.
    Compare(CompareArgs),
    /// Constant-rate mixed traffic (valid, invalid, streamed, abandoned) for minutes, then a
    /// pass/fail verdict: statuses, lost requests, KV cache at the end, memory growth.
    Soak(SoakArgs),
}

/// Flags of `mpt-bench soak`.
#[derive(Debug, Args)]
pub struct SoakArgs {
    /// Completions endpoint.
    #[arg(long, default_value = "http://127.0.0.1:8000/v1/completions")]
    pub url: String,
    /// `model` field of the valid requests.
    #[arg(long, default_value = "mpt-demo")]
    pub model: String,
    /// Bearer token for servers started with an API key.
    #[arg(long, env = "MPT_BENCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Requests per second, evenly spaced.
    #[arg(long, default_value_t = 4.0)]
    pub rate: f64,
    /// Seconds of load after the warm-up.
    #[arg(long, default_value_t = 600.0, value_name = "SECS")]
    pub duration: f64,
    /// Seconds of the same load before the memory baseline is taken.
    #[arg(long, default_value_t = 20.0, value_name = "SECS")]
    pub warmup: f64,
    /// Tokens each valid request generates.
    #[arg(long, default_value_t = 32)]
    pub max_tokens: usize,
    /// The server's process id, for its resident memory (without it RSS is not checked).
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,
    /// Prometheus endpoint of the server [default: /metrics on the --url host].
    #[arg(long, value_name = "URL")]
    pub metrics_url: Option<String>,
    /// Seed of the request mix.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Per-request time limit in seconds.
    #[arg(long, default_value_t = 120.0, value_name = "SECS")]
    pub request_timeout: f64,
    /// Write the verdict as JSON here.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Flags of `mpt-bench run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// Completions endpoint.
    #[arg(long, default_value = "http://127.0.0.1:8000/v1/completions")]
    pub url: String,
    /// `model` field sent with each request (omitted if not given).
    #[arg(long)]
    pub model: Option<String>,
    /// Bearer token for servers started with an API key.
    #[arg(long, env = "MPT_BENCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Streams kept in flight, one level per value, run in turn (e.g. `1,4,16`).
    #[arg(long, value_delimiter = ',', conflicts_with = "request_rate")]
    pub concurrency: Vec<usize>,
    /// Poisson arrival rates in requests/s, one level per value (instead of --concurrency).
    #[arg(long, value_delimiter = ',')]
    pub request_rate: Vec<f64>,
    /// Requests per level [default: max(8, 2 × concurrency); 32 for a rate].
    #[arg(long)]
    pub num_requests: Option<usize>,
    /// Prompt length in tokens: `N` or a uniform range `LO:HI`.
    #[arg(long, default_value = "128")]
    pub prompt_tokens: Length,
    /// Output length in tokens, forced with ignore_eos/min_tokens: `N` or `LO:HI`.
    #[arg(long, default_value = "128")]
    pub output_tokens: Length,
    /// Sampling temperature.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f64,
    /// Extra JSON object merged into every request body (e.g. `{"cache_prompt":false}`).
    #[arg(long, value_name = "JSON")]
    pub extra_body: Option<String>,
    /// JSON Schema file: every request asks for output valid against it (`response_format`
    /// json_schema); such an output ends when its value is complete.
    #[arg(long, value_name = "FILE")]
    pub json_schema: Option<PathBuf>,
    /// Seed of prompts, lengths and arrival times (same seed → same requests).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Unmeasured requests sent one at a time before the first level.
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// No request starts later than this many seconds into a level.
    #[arg(long, default_value_t = 300.0, value_name = "SECS")]
    pub max_duration: f64,
    /// Seconds after --max-duration before requests still running are cancelled.
    #[arg(long, default_value_t = 60.0, value_name = "SECS")]
    pub grace: f64,
    /// Per-request time limit in seconds.
    #[arg(long, default_value_t = 600.0, value_name = "SECS")]
    pub request_timeout: f64,
    /// Read each request's server-side prefill time (a response's `timings.prompt_ms`, or the
    /// `vllm:request_prefill_time_seconds` diff on /metrics at concurrency 1) and report TTFT
    /// minus it: the server's overhead.
    #[arg(long)]
    pub server_timings: bool,
    /// Prometheus endpoint of the server [default: /metrics on the --url host].
    #[arg(long, value_name = "URL")]
    pub metrics_url: Option<String>,
    /// Seconds between samples of the KV-cache gauges (mpt:kv_cache_*) during levels; 0 = off.
    #[arg(long, default_value_t = 0.5, value_name = "SECS")]
    pub kv_sample_interval: f64,
    /// KV token slots each sequence holds for its whole life, for servers without KV gauges
    /// (llama-server: -c / -np): KV waste is then estimated from the request shapes.
    #[arg(long, value_name = "TOKENS")]
    pub kv_slots_per_seq: Option<u64>,
    /// Scenario name stored in the results (e.g. `decode`, `prefill`).
    #[arg(long, default_value = "default")]
    pub scenario: String,
    /// Server name for tables and chart legends [default: the URL's host:port].
    #[arg(long)]
    pub label: Option<String>,
    /// Write the results as JSON here.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Write a PNG chart of throughput and latency against load here.
    #[arg(long, value_name = "FILE")]
    pub chart: Option<PathBuf>,
    /// Do not draw a progress bar.
    #[arg(long)]
    pub no_progress: bool,
}

/// Flags of `mpt-bench compare`.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Result files of the server under test (repeat; paired in order with --baseline).
    #[arg(long, required = true, value_name = "FILE")]
    pub candidate: Vec<PathBuf>,
    /// Result files of the reference server (repeat; same order as --candidate).
    #[arg(long, required = true, value_name = "FILE")]
    pub baseline: Vec<PathBuf>,
    /// Write the markdown table here (it is always printed too).
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Write a chart of the pair with the most levels here.
    #[arg(long, value_name = "FILE")]
    pub chart: Option<PathBuf>,
}

impl RunArgs {
    /// The levels to run, checked: positive and finite.
    pub fn loads(&self) -> Result<Vec<Load>, String> {
        if !self.request_rate.is_empty() {
            return self
                .request_rate
                .iter()
                .map(|&r| {
                    if r.is_finite() && r > 0.0 {
                        Ok(Load::RequestRate(r))
                    } else {
                        Err(format!("--request-rate {r}: must be a positive number"))
                    }
                })
                .collect();
        }
        let levels = if self.concurrency.is_empty() {
            vec![1]
        } else {
            self.concurrency.clone()
        };
        levels
            .into_iter()
            .map(|c| {
                if c == 0 {
                    Err("--concurrency: levels must be at least 1".to_string())
                } else {
                    Ok(Load::Concurrency(c))
                }
            })
            .collect()
    }

    /// Requests to send for `load`.
    pub fn requests_for(&self, load: Load) -> usize {
        self.num_requests.unwrap_or(match load {
            Load::Concurrency(c) => (2 * c).max(8),
            Load::RequestRate(_) => 32,
        })
    }

    /// The `--extra-body` object, parsed.
    pub fn extra_body(&self) -> Result<serde_json::Map<String, serde_json::Value>, String> {
        match &self.extra_body {
            None => Ok(serde_json::Map::new()),
            Some(s) => match serde_json::from_str::<serde_json::Value>(s) {
                Ok(serde_json::Value::Object(m)) => Ok(m),
                Ok(_) => Err("--extra-body must be a JSON object".into()),
                Err(e) => Err(format!("--extra-body is not valid JSON: {e}")),
            },
        }
    }

    /// The `response_format` of `--json-schema`, read from its file.
    pub fn response_format(&self) -> Result<Option<serde_json::Value>, String> {
        let Some(path) = &self.json_schema else {
            return Ok(None);
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("--json-schema {}: {e}", path.display()))?;
        let schema: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("--json-schema {}: not JSON: {e}", path.display()))?;
        if !schema.is_object() {
            return Err(format!(
                "--json-schema {}: must be a JSON object",
                path.display()
            ));
        }
        Ok(Some(serde_json::json!({
            "type": "json_schema",
            "json_schema": {"name": "bench", "schema": schema, "strict": true},
        })))
    }

    /// The metrics endpoint: `--metrics-url`, else `/metrics` on the `--url` host.
    pub fn metrics_url(&self) -> Option<String> {
        self.metrics_url
            .clone()
            .or_else(|| crate::scrape::metrics_url(&self.url))
    }

    /// The label: `--label`, else the URL's host and port.
    pub fn label(&self) -> String {
        if let Some(l) = &self.label {
            return l.clone();
        }
        let rest = self.url.split("://").nth(1).unwrap_or(&self.url);
        rest.split('/').next().unwrap_or(rest).to_string()
    }

    /// Checks the time flags: finite and positive.
    pub fn check_times(&self) -> Result<(), String> {
        for (name, v) in [
            ("--max-duration", self.max_duration),
            ("--grace", self.grace),
            ("--request-timeout", self.request_timeout),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("{name} {v}: must be a positive number of seconds"));
            }
        }
        if !(self.kv_sample_interval.is_finite() && self.kv_sample_interval >= 0.0) {
            return Err(format!(
                "--kv-sample-interval {}: must be 0 (off) or a positive number of seconds",
                self.kv_sample_interval
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<RunArgs, clap::Error> {
        let mut all = vec!["mpt-bench", "run"];
        all.extend_from_slice(args);
        Cli::try_parse_from(all).map(|c| match c.command {
            Command::Run(r) => *r,
            other => panic!("expected run, got {other:?}"),
        })
    }

    #[test]
    fn levels_and_defaults() {
        let a = parse(&["--concurrency", "1,4,16", "--prompt-tokens", "64:128"]).expect("parses");
        assert_eq!(
            a.loads(),
            Ok(vec![
                Load::Concurrency(1),
                Load::Concurrency(4),
                Load::Concurrency(16)
            ])
        );
        assert_eq!(a.prompt_tokens, Length::Uniform(64, 128));
        assert_eq!(a.requests_for(Load::Concurrency(1)), 8);
        assert_eq!(a.requests_for(Load::Concurrency(16)), 32);
        assert_eq!(a.label(), "127.0.0.1:8000");
        assert!(a.check_times().is_ok());

        let a = parse(&["--request-rate", "0.5,2", "--num-requests", "10"]).expect("parses");
        assert_eq!(
            a.loads(),
            Ok(vec![Load::RequestRate(0.5), Load::RequestRate(2.0)])
        );
        assert_eq!(a.requests_for(Load::RequestRate(2.0)), 10);
        assert_eq!(
            parse(&[]).expect("parses").loads(),
            Ok(vec![Load::Concurrency(1)])
        );
    }

    #[test]
    fn bad_values_are_refused_before_sending() {
        assert!(parse(&["--concurrency", "2", "--request-rate", "1"]).is_err());
        assert!(parse(&["--output-tokens", "0"]).is_err());
        assert!(
            parse(&["--concurrency", "0"])
                .expect("parses")
                .loads()
                .is_err()
        );
        assert!(
            parse(&["--request-rate", "0"])
                .expect("parses")
                .loads()
                .is_err()
        );
        assert!(
            parse(&["--max-duration", "0"])
                .expect("parses")
                .check_times()
                .is_err()
        );
        assert!(
            parse(&["--kv-sample-interval=-1"])
                .expect("parses")
                .check_times()
                .is_err()
        );
        let a = parse(&["--kv-sample-interval", "0", "--server-timings"]).expect("parses");
        assert!(a.check_times().is_ok() && a.server_timings);
        assert_eq!(
            a.metrics_url().as_deref(),
            Some("http://127.0.0.1:8000/metrics")
        );
        let a = parse(&[
            "--metrics-url",
            "http://h:1/m",
            "--kv-slots-per-seq",
            "1024",
        ])
        .expect("parses");
        assert_eq!(
            (a.metrics_url().as_deref(), a.kv_slots_per_seq),
            (Some("http://h:1/m"), Some(1024))
        );
        let schema =
            std::env::temp_dir().join(format!("mpt-bench-schema-{}.json", std::process::id()));
        std::fs::write(&schema, r#"{"type":"object"}"#).expect("temp file");
        let a = parse(&["--json-schema", schema.to_str().expect("utf-8")]).expect("parses");
        let format = a.response_format().expect("read").expect("set");
        assert_eq!(format["json_schema"]["schema"]["type"], "object");
        std::fs::write(&schema, "[1]").expect("temp file");
        assert!(a.response_format().is_err());
        let _ = std::fs::remove_file(&schema);
        assert_eq!(parse(&[]).expect("parses").response_format(), Ok(None));
        let a = parse(&["--extra-body", r#"{"cache_prompt":false}"#]).expect("parses");
        assert_eq!(a.extra_body().expect("object")["cache_prompt"], false);
        assert!(
            parse(&["--extra-body", "[1]"])
                .expect("parses")
                .extra_body()
                .is_err()
        );
    }
}
