//! The results file, the console table, and the markdown comparison of two runs.
//!
//! Invariants: the JSON file holds everything needed to redraw charts and tables later (settings
//! and every level's aggregate); a comparison only pairs levels with the same load, and every
//! ratio is oriented so that > 1 means the candidate is better (throughput: candidate/baseline;
//! latency: baseline/candidate); a missing figure prints as `–`, never as 0; a server-side
//! figure (overhead, KV waste) is always printed next to the method that produced it.

use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::stats::{LevelResult, Summary};

/// Settings a run was made with, stored beside its results.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    /// Completions endpoint URL.
    pub url: String,
    /// `model` sent.
    pub model: Option<String>,
    /// Prompt length spec as given (`128` or `64:256`).
    pub prompt_tokens: String,
    /// Output length spec as given.
    pub output_tokens: String,
    /// Sampling temperature.
    pub temperature: f64,
    /// Seed of prompts, lengths and arrivals.
    pub seed: u64,
    /// Per-level time cap, seconds.
    pub max_duration_s: f64,
    /// Unmeasured requests sent first.
    pub warmup: usize,
}

/// One run of the tool: settings and one result per level.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// Name of the scenario (e.g. `decode`, `prefill`).
    pub scenario: String,
    /// Name of the server under test (chart legends, tables).
    pub label: String,
    /// Seconds since the Unix epoch at the start.
    pub started_unix_s: u64,
    /// Settings.
    pub settings: RunSettings,
    /// Results per level, in the order run.
    pub levels: Vec<LevelResult>,
}

/// `x` with a precision that suits its size, or `–`.
fn num(x: Option<f64>) -> String {
    match x {
        None => "–".into(),
        Some(v) if !v.is_finite() => "–".into(),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) if v.abs() >= 10.0 => format!("{v:.1}"),
        Some(v) => format!("{v:.2}"),
    }
}

fn p50(s: &Option<Summary>) -> Option<f64> {
    s.as_ref().map(|s| s.p50)
}

/// A plain-text table of a run, one row per level.
pub fn console_table(run: &RunResult) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} — {} ({})\n{:<12} {:>5} {:>5} {:>7} {:>7} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>9}",
        run.label,
        run.scenario,
        run.settings.url,
        "load",
        "ok",
        "fail",
        "in tok",
        "out tok",
        "req/s",
        "out tok/s",
        "ttft p50",
        "ttft p99",
        "tpot p50",
        "itl p50",
        "itl p99",
        "e2e p50",
        "dec/s",
        "prefill/s"
    );
    for l in &run.levels {
        let _ = writeln!(
            out,
            "{:<12} {:>5} {:>5} {:>7} {:>7} {:>9} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>8} {:>9}",
            l.load.label(),
            l.completed,
            l.failed + l.cancelled,
            num(l.mean_prompt_tokens),
            num(Some(l.mean_output_tokens)),
            num(Some(l.request_throughput)),
            num(Some(l.output_throughput)),
            num(p50(&l.ttft_ms)),
            num(l.ttft_ms.map(|s| s.p99)),
            num(p50(&l.tpot_ms)),
            num(p50(&l.itl_ms)),
            num(l.itl_ms.map(|s| s.p99)),
            num(p50(&l.e2e_ms)),
            num(p50(&l.decode_tok_s)),
            num(p50(&l.prefill_tok_s)),
        );
        if let Some(o) = &l.overhead_ms {
            let _ = writeln!(
                out,
                "  server overhead (TTFT − server prefill, {}): p50 {} ms, p90 {} ms; server prefill p50 {} ms, queue p50 {} ms",
                l.overhead_method.as_deref().unwrap_or("?"),
                num(Some(o.p50)),
                num(Some(o.p90)),
                num(p50(&l.server_prefill_ms)),
                num(p50(&l.server_queue_ms)),
            );
        }
        if let Some(w) = &l.kv_waste {
            let _ = writeln!(
                out,
                "  KV waste ({}): mean {}%, max {}%, overall {}% over {} samples",
                w.method,
                num(Some(w.mean_pct)),
                num(Some(w.max_pct)),
                num(Some(w.overall_pct)),
                w.samples
            );
        }
        if let Some(s) = &l.spec_decode {
            let _ = writeln!(
                out,
                "  speculative decoding: {} drafts, {} tokens drafted, {} accepted ({}%, {} per draft)",
                s.drafts,
                s.draft_tokens,
                s.accepted_tokens,
                num(s.acceptance_pct),
                num(s.accepted_per_draft),
            );
        }
        if l.output_length_mismatches > 0 {
            let _ = writeln!(
                out,
                "  warning: {} requests returned a different number of tokens than asked \
                 (mean {:.1}); the server may not honour ignore_eos/min_tokens",
                l.output_length_mismatches, l.mean_output_tokens
            );
        }
        for e in &l.errors {
            let _ = writeln!(out, "  error: {e}");
        }
    }
    out
}

/// Whether a bigger number is better for a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Better {
    Higher,
    Lower,
}

/// Metrics compared, with their name, direction and accessor.
type Metric = (&'static str, Better, fn(&LevelResult) -> Option<f64>);

/// The metrics a comparison row set shows. Prefill speed only makes sense when the output is a
/// single token (TTFT is then almost all prefill), and decode speed only when it is longer;
/// server overhead and KV waste when either side measured them.
fn metrics(level: &LevelResult, other: &LevelResult) -> Vec<Metric> {
    let mut m: Vec<Metric> = Vec::new();
    if level.mean_output_tokens <= 1.0 {
        m.push(("prefill tok/s (p50)", Better::Higher, |l| {
            p50(&l.prefill_tok_s)
        }));
        m.push(("TTFT p50 (ms)", Better::Lower, |l| p50(&l.ttft_ms)));
    } else {
        m.push(("output tok/s (all streams)", Better::Higher, |l| {
            Some(l.output_throughput)
        }));
        m.push(("decode tok/s per stream (p50)", Better::Higher, |l| {
            p50(&l.decode_tok_s)
        }));
        m.push(("TTFT p50 (ms)", Better::Lower, |l| p50(&l.ttft_ms)));
        m.push(("TPOT p50 (ms)", Better::Lower, |l| p50(&l.tpot_ms)));
        m.push(("e2e p50 (ms)", Better::Lower, |l| p50(&l.e2e_ms)));
    }
    if level.overhead_ms.is_some() || other.overhead_ms.is_some() {
        m.push((
            "server overhead p50 (ms): TTFT − server prefill",
            Better::Lower,
            |l| p50(&l.overhead_ms),
        ));
        m.push(("server overhead p90 (ms)", Better::Lower, |l| {
            l.overhead_ms.map(|s| s.p90)
        }));
        m.push(("server-reported prefill p50 (ms)", Better::Lower, |l| {
            p50(&l.server_prefill_ms)
        }));
    }
    if level.kv_waste.is_some() || other.kv_waste.is_some() {
        m.push(("KV waste mean (%)", Better::Lower, |l| {
            l.kv_waste.as_ref().map(|w| w.mean_pct)
        }));
        m.push(("KV waste max (%)", Better::Lower, |l| {
            l.kv_waste.as_ref().map(|w| w.max_pct)
        }));
    }
    m
}

/// The "how measured" rows under the server-side figures: (row name, candidate, baseline).
fn method_rows(c: &LevelResult, b: &LevelResult) -> Vec<(&'static str, String, String)> {
    let mut rows = Vec::new();
    let text = |s: Option<&str>| s.unwrap_or("not measured").replace('|', "/");
    if c.overhead_ms.is_some() || b.overhead_ms.is_some() {
        rows.push((
            "server prefill read from",
            text(c.overhead_method.as_deref()),
            text(b.overhead_method.as_deref()),
        ));
    }
    if c.kv_waste.is_some() || b.kv_waste.is_some() {
        let w = |l: &LevelResult| text(l.kv_waste.as_ref().map(|w| w.method.as_str()));
        rows.push(("KV waste method", w(c), w(b)));
    }
    rows
}

/// `candidate` over `baseline` oriented so that > 1 favours the candidate.
pub fn advantage(candidate: f64, baseline: f64, higher_is_better: bool) -> Option<f64> {
    if !(candidate.is_finite() && baseline.is_finite()) || candidate <= 0.0 || baseline <= 0.0 {
        return None;
    }
    Some(if higher_is_better {
        candidate / baseline
    } else {
        baseline / candidate
    })
}

/// A markdown table comparing runs pairwise (candidate[i] against baseline[i]).
pub fn compare_markdown(pairs: &[(RunResult, RunResult)]) -> String {
    let mut out = String::new();
    let (cand, base) = match pairs.first() {
        Some((c, b)) => (c.label.as_str(), b.label.as_str()),
        None => ("candidate", "baseline"),
    };
    let _ = writeln!(
        out,
        "| scenario | load | metric | {cand} | {base} | {cand} vs {base} (×, >1 = {cand} better) |"
    );
    let _ = writeln!(out, "| --- | --- | --- | ---: | ---: | ---: |");
    for (c, b) in pairs {
        for cl in &c.levels {
            let Some(bl) = b.levels.iter().find(|l| l.load == cl.load) else {
                continue;
            };
            // Both sides must have done the same work: server-reported tokens in / out, and
            // requests completed / failed.
            let work = |l: &LevelResult| {
                format!(
                    "{} / {} ({} ok, {} failed)",
                    num(l.mean_prompt_tokens),
                    num(Some(l.mean_output_tokens)),
                    l.completed,
                    l.failed + l.cancelled
                )
            };
            let _ = writeln!(
                out,
                "| {} | {} | tokens in / out per request | {} | {} | |",
                c.scenario,
                cl.load.label(),
                work(cl),
                work(bl)
            );
            for (name, better, get) in metrics(cl, bl) {
                let (cv, bv) = (get(cl), get(bl));
                let ratio = match (cv, bv) {
                    (Some(x), Some(y)) => advantage(x, y, better == Better::Higher),
                    _ => None,
                };
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {} |",
                    c.scenario,
                    cl.load.label(),
                    name,
                    num(cv),
                    num(bv),
                    ratio.map_or("–".into(), |r| format!("{r:.2}×")),
                );
            }
            for (name, cm, bm) in method_rows(cl, bl) {
                let _ = writeln!(
                    out,
                    "| {} | {} | {name} | {cm} | {bm} | |",
                    c.scenario,
                    cl.load.label()
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{Load, RequestRecord, aggregate};

    fn run(label: &str, tokens_per_s: f64, output_tokens: u64) -> RunResult {
        // One request: ttft 0.1 s, then output at `tokens_per_s`.
        let decode = (output_tokens - 1) as f64 / tokens_per_s;
        let r = RequestRecord {
            start_s: 0.0,
            ttft_s: Some(0.1),
            e2e_s: 0.1 + decode,
            itl_s: vec![1.0 / tokens_per_s; output_tokens as usize - 1],
            prompt_tokens: Some(64),
            output_tokens,
            requested_output_tokens: output_tokens,
            requested_prompt_tokens: 64,
            ..RequestRecord::default()
        };
        RunResult {
            scenario: "decode".into(),
            label: label.into(),
            started_unix_s: 0,
            settings: RunSettings {
                url: "http://127.0.0.1:8000/v1/completions".into(),
                model: None,
                prompt_tokens: "64".into(),
                output_tokens: output_tokens.to_string(),
                temperature: 0.0,
                seed: 0,
                max_duration_s: 60.0,
                warmup: 0,
            },
            levels: vec![aggregate(Load::Concurrency(1), &[r], 0)],
        }
    }

    #[test]
    fn advantage_is_oriented_towards_the_candidate() {
        assert_eq!(advantage(20.0, 10.0, true), Some(2.0));
        assert_eq!(advantage(5.0, 10.0, false), Some(2.0));
        assert_eq!(advantage(0.0, 10.0, true), None);
    }

    #[test]
    fn comparison_pairs_levels_and_shows_ratios() {
        let table = compare_markdown(&[(run("ours", 50.0, 11), run("llama", 25.0, 11))]);
        assert!(table.starts_with("| scenario | load | metric | ours | llama |"));
        let row = table
            .lines()
            .find(|l| l.contains("decode tok/s per stream"))
            .expect("decode row");
        assert!(row.contains("| 50.0 | 25.0 | 2.00× |"), "{row}");
        // Same TTFT on both sides → 1.00×.
        let row = table
            .lines()
            .find(|l| l.contains("TTFT"))
            .expect("ttft row");
        assert!(row.ends_with("| 1.00× |"), "{row}");
        let row = table
            .lines()
            .find(|l| l.contains("tokens in / out"))
            .expect("work row");
        assert!(row.contains("| 64.0 / 11.0 (1 ok, 0 failed) |"), "{row}");
        // A one-token run is compared on prefill speed: 64 tokens / 0.1 s.
        let table = compare_markdown(&[(run("ours", 50.0, 1), run("llama", 50.0, 1))]);
        assert!(
            table.contains("| prefill tok/s (p50) | 640 | 640 | 1.00× |"),
            "{table}"
        );
        assert!(!table.contains("decode tok/s"));
    }

    #[test]
    fn server_side_rows_appear_with_their_methods() {
        use crate::scrape::KvWaste;
        let (mut ours, mut theirs) = (run("ours", 50.0, 1), run("llama", 50.0, 1));
        let summary = |p50: f64| crate::stats::summarize(&[p50, p50], 1.0);
        ours.levels[0].overhead_ms = summary(0.5);
        ours.levels[0].server_prefill_ms = summary(99.5);
        ours.levels[0].overhead_method = Some("/metrics diff".into());
        theirs.levels[0].overhead_ms = summary(2.0);
        theirs.levels[0].overhead_method = Some("response timings".into());
        theirs.levels[0].kv_waste = Some(KvWaste {
            method: "estimated from settings".into(),
            samples: 4,
            mean_pct: 81.25,
            max_pct: 87.5,
            overall_pct: 81.25,
        });
        let table = compare_markdown(&[(ours.clone(), theirs)]);
        let row = |key: &str| {
            table
                .lines()
                .find(|l| l.contains(key))
                .unwrap_or_else(|| panic!("no {key} row in\n{table}"))
                .to_string()
        };
        assert!(
            row("server overhead p50").ends_with("| 0.50 | 2.00 | 4.00× |"),
            "{table}"
        );
        assert!(row("server-reported prefill").contains("| 99.5 | – | – |"));
        assert!(row("server prefill read from").contains("| /metrics diff | response timings | |"));
        assert!(row("KV waste mean").contains("| – | 81.2 | – |"), "{table}");
        assert!(row("KV waste method").contains("| not measured | estimated from settings |"));
        // Nothing server-side measured: no such rows.
        let plain = compare_markdown(&[(run("a", 50.0, 5), run("b", 50.0, 5))]);
        assert!(!plain.contains("overhead") && !plain.contains("KV waste"));
        let console = console_table(&ours);
        assert!(
            console.contains("server overhead (TTFT − server prefill, /metrics diff): p50 0.50 ms"),
            "{console}"
        );
    }

    #[test]
    fn results_round_trip_through_json_and_print() {
        let r = run("ours", 40.0, 5);
        let json = serde_json::to_string(&r).expect("serializes");
        let back: RunResult = serde_json::from_str(&json).expect("parses");
        // Floats may differ in the last bit after a text round trip: compare what matters.
        assert_eq!(
            (back.label.as_str(), back.settings.clone()),
            ("ours", r.settings.clone())
        );
        assert_eq!(back.levels.len(), 1);
        let (a, b) = (&back.levels[0], &r.levels[0]);
        assert_eq!((a.load, a.completed), (b.load, b.completed));
        assert!((a.output_throughput - b.output_throughput).abs() < 1e-9);
        let table = console_table(&r);
        assert!(table.contains("c=1"), "{table}");
        assert!(!table.contains("warning"));
    }
}
