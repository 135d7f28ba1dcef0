//! mpt-bench: a load generator for OpenAI-compatible `/v1/completions` endpoints.
//!
//! Modules: [`workload`] (prompts, lengths, arrivals — pure and seeded), [`client`] (one streamed
//! request, timed), [`sse`] (event parsing), [`runner`] (one level of load, bounded in count
//! and time), [`stats`] (percentiles and aggregation), [`scrape`] (what a server's `/metrics`
//! says: prefill times, KV waste), [`report`] (results file, tables), [`chart`] (PNG),
//! [`soak`] (minutes of mixed traffic and a pass/fail verdict).
//! Invariant: nothing here asserts a timing; it only measures.

pub mod chart;
pub mod cli;
pub mod client;
pub mod report;
pub mod runner;
pub mod scrape;
pub mod soak;
pub mod sse;
pub mod stats;
pub mod workload;
