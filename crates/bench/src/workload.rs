//! What to send: prompt texts of a wanted token length, output lengths, and arrival times.
//!
//! Invariants: everything is a pure function of a seed, so two servers get byte-identical
//! requests in the same order; every prompt starts differently (random words from the first
//! one) so neither server's prefix cache can skip prefill work; each word in [`WORDS`] is one
//! GPT-NeoX/GPT-2 BPE token when preceded by a space (the first word has no space and is
//! capitalized "The", also one token), so a prompt of n words is about n tokens — the server's
//! `usage.prompt_tokens` is reported next to the aim.

use std::str::FromStr;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Common English words, each a single BPE token after a space in GPT-2/GPT-NeoX vocabularies.
pub const WORDS: &[&str] = &[
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "had", "they", "you", "were", "their", "one", "all", "we", "can", "her", "has", "there",
    "been", "if", "more", "when", "will", "would", "who", "so", "no", "time", "people", "water",
    "world", "house", "small", "great", "good", "long", "right", "little", "year", "day", "work",
];

/// A token count: fixed, or drawn uniformly from an inclusive range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Length {
    /// Always this many.
    Fixed(u64),
    /// Uniform in `lo..=hi`.
    Uniform(u64, u64),
}

impl Length {
    /// Draws one length.
    pub fn sample(&self, rng: &mut StdRng) -> u64 {
        match *self {
            Length::Fixed(n) => n,
            Length::Uniform(lo, hi) => rng.random_range(lo..=hi),
        }
    }
}

impl std::fmt::Display for Length {
    /// The same syntax [`FromStr`] reads.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            Length::Fixed(n) => write!(f, "{n}"),
            Length::Uniform(lo, hi) => write!(f, "{lo}:{hi}"),
        }
    }
}

impl FromStr for Length {
    type Err = String;

    /// `128` or `64:256` (inclusive range); zero is refused.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parse = |t: &str| -> Result<u64, String> {
            let n: u64 = t
                .trim()
                .parse()
                .map_err(|_| format!("`{t}` is not a whole number"))?;
            if n == 0 {
                return Err("a length must be at least 1".into());
            }
            Ok(n)
        };
        match s.split_once(':') {
            None => Ok(Length::Fixed(parse(s)?)),
            Some((a, b)) => {
                let (lo, hi) = (parse(a)?, parse(b)?);
                if lo > hi {
                    return Err(format!("range `{s}` has its low end above its high end"));
                }
                Ok(Length::Uniform(lo, hi))
            }
        }
    }
}

/// One request to send.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedRequest {
    /// Prompt text.
    pub prompt: String,
    /// Tokens the prompt aims at.
    pub prompt_tokens: u64,
    /// Exact output length to force.
    pub output_tokens: u64,
}

/// Builds a prompt of about `tokens` tokens from random common words.
pub fn build_prompt(tokens: u64, rng: &mut StdRng) -> String {
    let mut out = String::with_capacity(tokens as usize * 6);
    out.push_str("The");
    for _ in 1..tokens {
        out.push(' ');
        out.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    out
}

/// The requests of one level, reproducible from `seed`.
pub fn plan_requests(
    count: usize,
    prompt: Length,
    output: Length,
    seed: u64,
) -> Vec<PlannedRequest> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count)
        .map(|_| {
            let p = prompt.sample(&mut rng);
            let o = output.sample(&mut rng);
            PlannedRequest {
                prompt: build_prompt(p, &mut rng),
                prompt_tokens: p,
                output_tokens: o,
            }
        })
        .collect()
}

/// Send times (seconds from the level's start) of `count` Poisson arrivals at `rate` per second:
/// exponential gaps drawn by inverse transform from a seeded generator; the first is at 0.
pub fn poisson_schedule(count: usize, rate: f64, seed: u64) -> Vec<f64> {
    assert!(
        rate.is_finite() && rate > 0.0,
        "rate is validated by the caller; this is a bug"
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let mut t = 0.0;
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        if i > 0 {
            // u in (0, 1]: ln(u) is finite.
            let u: f64 = 1.0 - rng.random::<f64>();
            t += -u.ln() / rate;
        }
        out.push(t);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths_parse_fixed_and_ranges() {
        assert_eq!("128".parse::<Length>(), Ok(Length::Fixed(128)));
        assert_eq!(" 64:256".parse::<Length>(), Ok(Length::Uniform(64, 256)));
        assert!("0".parse::<Length>().is_err());
        assert!("9:3".parse::<Length>().is_err());
        assert!("x".parse::<Length>().is_err());
        assert_eq!(Length::Uniform(64, 256).to_string(), "64:256");
        let mut rng = StdRng::seed_from_u64(1);
        for _ in 0..200 {
            let n = Length::Uniform(3, 5).sample(&mut rng);
            assert!((3..=5).contains(&n));
        }
    }

    #[test]
    fn prompts_have_the_requested_word_count_and_differ() {
        let plan = plan_requests(20, Length::Fixed(128), Length::Fixed(4), 7);
        for p in &plan {
            assert_eq!(p.prompt.split(' ').count(), 128);
            assert!(p.prompt.starts_with("The "));
            assert_eq!(p.output_tokens, 4);
        }
        let distinct: std::collections::HashSet<&str> =
            plan.iter().map(|p| &p.prompt[..40]).collect();
        assert_eq!(distinct.len(), plan.len(), "prompts must differ early");
        // Reproducible from the seed, different for another seed.
        assert_eq!(
            plan,
            plan_requests(20, Length::Fixed(128), Length::Fixed(4), 7)
        );
        assert_ne!(
            plan,
            plan_requests(20, Length::Fixed(128), Length::Fixed(4), 8)
        );
        assert_eq!(build_prompt(1, &mut StdRng::seed_from_u64(0)), "The");
    }

    #[test]
    fn poisson_schedule_is_seeded_increasing_and_has_the_right_rate() {
        let a = poisson_schedule(4000, 2.0, 42);
        assert_eq!(a, poisson_schedule(4000, 2.0, 42));
        assert_ne!(a, poisson_schedule(4000, 2.0, 43));
        assert_eq!(a[0], 0.0);
        assert!(a.windows(2).all(|w| w[1] >= w[0]));
        // Mean gap 1/rate = 0.5 s; with 3999 gaps the standard error is ~0.008.
        let mean_gap = a[a.len() - 1] / (a.len() - 1) as f64;
        assert!((mean_gap - 0.5).abs() < 0.05, "mean gap {mean_gap}");
        // Exponential gaps: the coefficient of variation is 1 (a fixed gap would give 0).
        let gaps: Vec<f64> = a.windows(2).map(|w| w[1] - w[0]).collect();
        let var = gaps.iter().map(|g| (g - mean_gap).powi(2)).sum::<f64>() / gaps.len() as f64;
        let cv = var.sqrt() / mean_gap;
        assert!((cv - 1.0).abs() < 0.1, "cv {cv}");
    }
}
