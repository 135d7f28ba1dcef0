//! Token sampling for one sequence: penalties, logit bias, a grammar's token mask, temperature,
//! top-k, top-p, min-p and a per-sequence seeded RNG; plus logprobs from the model's raw
//! distribution.
//!
//! Invariants: a [`Sampler`] consumes its RNG only when it samples with temperature > 0, one
//! draw per token, and it sees only its own sequence's logits and tokens; so a seeded sequence
//! produces the same tokens whatever else is in the batch, in whatever order requests arrive,
//! and after a preemption (the sampler survives it). Greedy decoding breaks ties by lowest id.
//! Reported logprobs are the unprocessed `log_softmax` of the logits, as OpenAI and vLLM do
//! (before penalties, bias and mask). A mask applies after penalties and logit bias and before
//! temperature and the top-k/top-p/min-p filters, so those act on the allowed tokens only.

use std::collections::HashMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::constraint::TokenMask;
use crate::api::types::{SamplingParams, TokenLogprob};

/// Most alternatives the engine reports per position.
pub const MAX_TOP_LOGPROBS: usize = 20;

/// Temperatures below this are treated as greedy.
const GREEDY_EPS: f32 = 1e-5;

/// Seed of the `index`-th sequence of a request seeded with `seed` (splitmix64 mixing, so
/// neighbouring indices get unrelated streams). Index 0 of every request keeps distinct seeds
/// for distinct request seeds.
pub fn derive_seed(seed: u64, index: usize) -> u64 {
    let mut z = seed.wrapping_add((index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Sampling state of one sequence.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: StdRng,
    /// How often each token appears in the output so far.
    output_counts: HashMap<u32, u32>,
    /// Tokens of the prompt (for the repetition penalty).
    prompt_tokens: std::collections::HashSet<u32>,
}

impl Sampler {
    /// A sampler for one sequence, seeded with `seed` (see [`derive_seed`]).
    pub fn new(params: &SamplingParams, seed: u64, prompt: &[u32]) -> Self {
        let prompt_tokens = if params.repetition_penalty != 1.0 {
            prompt.iter().copied().collect()
        } else {
            Default::default()
        };
        Self {
            params: params.clone(),
            rng: StdRng::seed_from_u64(seed),
            output_counts: HashMap::new(),
            prompt_tokens,
        }
    }

    /// Whether this sampler is greedy.
    pub fn is_greedy(&self) -> bool {
        self.params.temperature < GREEDY_EPS
    }

    /// Records a generated token (for the penalties).
    pub fn record(&mut self, token: u32) {
        *self.output_counts.entry(token).or_insert(0) += 1;
    }

    /// Picks the next token from one row of logits.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        self.sample_masked(logits, None)
    }

    /// Picks the next token among those `mask` allows (all when `None`); the mask must allow
    /// at least one token.
    pub fn sample_masked(&mut self, logits: &[f32], mask: Option<&TokenMask>) -> u32 {
        if self.is_greedy() && mask.is_none() && !self.changes_logits() {
            return argmax(logits);
        }
        let mut x = logits.to_vec();
        self.apply_penalties(&mut x);
        if let Some(mask) = mask {
            mask.apply(&mut x);
        }
        if self.is_greedy() {
            return argmax(&x);
        }
        let inv_t = 1.0 / self.params.temperature;
        let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        // Unnormalized probabilities; filtered tokens get 0.
        let mut probs: Vec<f32> = x.iter().map(|&l| ((l - max) * inv_t).exp()).collect();
        let (top_k, top_p, min_p) = (self.params.top_k, self.params.top_p, self.params.min_p);
        if top_k > 0 && top_k < probs.len() {
            let mut sorted = probs.clone();
            let (_, kth, _) = sorted.select_nth_unstable_by(top_k - 1, |a, b| b.total_cmp(a));
            let kth = *kth;
            // Keep exactly k tokens: ties at the threshold are resolved by lowest id.
            let mut kept = 0;
            let above = probs.iter().filter(|&&p| p > kth).count();
            let mut ties_left = top_k - above;
            for p in probs.iter_mut() {
                if *p > kth {
                    kept += 1;
                } else if *p == kth && ties_left > 0 {
                    ties_left -= 1;
                    kept += 1;
                } else {
                    *p = 0.0;
                }
            }
            debug_assert_eq!(kept, top_k);
        }
        if min_p > 0.0 {
            // The maximum of `probs` is exactly 1 (the max logit), before and after top-k.
            for p in probs.iter_mut() {
                if *p < min_p {
                    *p = 0.0;
                }
            }
        }
        if top_p < 1.0 {
            let total: f32 = probs.iter().sum();
            let mut order: Vec<usize> = (0..probs.len()).filter(|&i| probs[i] > 0.0).collect();
            order.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]).then(a.cmp(&b)));
            let mut cum = 0.0;
            let mut cut = order.len();
            for (rank, &i) in order.iter().enumerate() {
                cum += probs[i] / total;
                if cum >= top_p {
                    cut = rank + 1;
                    break;
                }
            }
            for &i in &order[cut..] {
                probs[i] = 0.0;
            }
        }
        let total: f32 = probs.iter().sum();
        let mut r = self.rng.random::<f32>() * total;
        let mut last_nonzero = 0;
        for (i, &p) in probs.iter().enumerate() {
            if p > 0.0 {
                if r < p {
                    return i as u32;
                }
                r -= p;
                last_nonzero = i;
            }
        }
        // Rounding left `r` just past the end: the last candidate wins.
        last_nonzero as u32
    }

    /// Whether penalties or a logit bias change the logits before sampling.
    fn changes_logits(&self) -> bool {
        let p = &self.params;
        p.repetition_penalty != 1.0
            || p.presence_penalty != 0.0
            || p.frequency_penalty != 0.0
            || !p.logit_bias.is_empty()
    }

    fn apply_penalties(&self, x: &mut [f32]) {
        let p = &self.params;
        if p.repetition_penalty != 1.0 {
            let rp = p.repetition_penalty;
            let seen = self.prompt_tokens.iter().chain(self.output_counts.keys());
            for &t in seen {
                if let Some(l) = x.get_mut(t as usize) {
                    *l = if *l > 0.0 { *l / rp } else { *l * rp };
                }
            }
        }
        if p.presence_penalty != 0.0 || p.frequency_penalty != 0.0 {
            for (&t, &c) in &self.output_counts {
                if let Some(l) = x.get_mut(t as usize) {
                    *l -= p.presence_penalty + p.frequency_penalty * c as f32;
                }
            }
        }
        for &(t, bias) in &p.logit_bias {
            if let Some(l) = x.get_mut(t as usize) {
                *l += bias;
            }
        }
    }
}

/// Index of the largest value (lowest index on ties; NaN never wins).
pub fn argmax(x: &[f32]) -> u32 {
    // The largest value (`f32::max` passes over NaN), then its first position: lane-wise
    // passes the compiler vectorises. A running "best index" would make every step wait on the
    // load of the best value so far, ~10 cycles per element over a 50k vocabulary.
    const LANES: usize = 16;
    let chunks = x.chunks_exact(LANES);
    let tail = chunks.remainder();
    let mut lanes = [f32::NEG_INFINITY; LANES];
    for chunk in chunks {
        for (m, &v) in lanes.iter_mut().zip(chunk) {
            *m = m.max(v);
        }
    }
    let max = lanes
        .into_iter()
        .chain(tail.iter().copied())
        .fold(f32::NEG_INFINITY, f32::max);
    let first = x
        .chunks(LANES)
        .position(|chunk| chunk.contains(&max))
        .and_then(|c| {
            let at = x[c * LANES..].iter().position(|&v| v == max)?;
            Some(c * LANES + at)
        });
    // Only NaN (or nothing): the last index, as a running comparison would end on.
    first.unwrap_or(x.len().saturating_sub(1)) as u32
}

/// Log-probability of `token` and the `k` (≤ [`MAX_TOP_LOGPROBS`]) most likely tokens under
/// `log_softmax(logits)`, most likely first (ties by lowest id).
pub fn token_logprob(logits: &[f32], token: u32, k: usize) -> TokenLogprob {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = max + logits.iter().map(|&l| (l - max).exp()).sum::<f32>().ln();
    let k = k.min(MAX_TOP_LOGPROBS).min(logits.len());
    let mut top: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    if k > 0 {
        // One pass keeping a small sorted list: k ≤ 20, vocab ~50k.
        for (i, &l) in logits.iter().enumerate() {
            if top.len() == k && l <= top[k - 1].1 {
                continue;
            }
            let pos = top.partition_point(|&(_, v)| v >= l);
            top.insert(pos, (i as u32, l));
            top.truncate(k);
        }
    }
    TokenLogprob {
        token_id: token,
        logprob: logits
            .get(token as usize)
            .map_or(f32::NEG_INFINITY, |&l| l - lse),
        top: top.into_iter().map(|(i, l)| (i, l - lse)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(f: impl FnOnce(&mut SamplingParams)) -> SamplingParams {
        let mut p = SamplingParams::default();
        f(&mut p);
        p
    }

    fn histogram(p: &SamplingParams, logits: &[f32], draws: usize) -> Vec<usize> {
        let mut s = Sampler::new(p, 42, &[]);
        let mut h = vec![0; logits.len()];
        for _ in 0..draws {
            h[s.sample(logits) as usize] += 1;
        }
        h
    }

    const LOGITS: [f32; 5] = [1.0, 3.0, 2.0, 3.0, -1.0];

    #[test]
    fn greedy_is_argmax_with_lowest_id_on_ties() {
        let mut s = Sampler::new(&SamplingParams::default(), 0, &[]);
        assert_eq!(s.sample(&LOGITS), 1);
        assert_eq!(argmax(&[f32::NAN, 0.5, 0.7]), 2);
    }

    #[test]
    fn argmax_is_the_first_largest_non_nan_value_at_every_length() {
        // The definition, one element at a time.
        let reference = |x: &[f32]| {
            let mut best = 0;
            for (i, &v) in x.iter().enumerate() {
                if v > x[best] || x[best].is_nan() {
                    best = i;
                }
            }
            best as u32
        };
        let mut state = 7u32;
        let mut next = || {
            state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            state >> 8
        };
        for len in [0, 1, 2, 15, 16, 17, 31, 33, 100, 50_432] {
            for case in 0..6 {
                let mut x: Vec<f32> = (0..len).map(|_| (next() % 50) as f32 - 25.0).collect();
                match case {
                    1 => x.iter_mut().for_each(|v| *v = f32::NAN),
                    2 => x.iter_mut().step_by(3).for_each(|v| *v = f32::NAN),
                    3 => x.iter_mut().for_each(|v| *v = f32::NEG_INFINITY),
                    4 => x
                        .iter_mut()
                        .for_each(|v| *v = if next() % 2 == 0 { 0.0 } else { -0.0 }),
                    5 if len > 0 => x[len - 1] = 1e9, // the maximum in the tail
                    _ => {}
                }
                assert_eq!(argmax(&x), reference(&x), "len {len}, case {case}");
            }
        }
    }

    #[test]
    fn greedy_sampling_still_applies_a_logit_bias() {
        let biased = params(|p| p.logit_bias = vec![(4, 10.0)]);
        let mut s = Sampler::new(&biased, 0, &[]);
        assert_eq!(s.sample(&LOGITS), 4);
        let mut s = Sampler::new(&SamplingParams::default(), 0, &[]);
        assert_eq!(s.sample(&LOGITS), 1);
    }

    #[test]
    fn top_k_top_p_min_p_restrict_support() {
        let t1 = |f: fn(&mut SamplingParams)| {
            params(|p| {
                p.temperature = 1.0;
                f(p)
            })
        };
        let h = histogram(&t1(|p| p.top_k = 2), &LOGITS, 2000);
        assert_eq!(
            (h[0], h[2], h[4]),
            (0, 0, 0),
            "top_k=2 keeps tokens 1 and 3: {h:?}"
        );
        assert!(h[1] > 800 && h[3] > 800, "{h:?}");
        // Probabilities ≈ [.05,.38,.14,.38,.007]: top_p 0.5 keeps the two 0.38s.
        let h = histogram(&t1(|p| p.top_p = 0.5), &LOGITS, 2000);
        assert_eq!((h[0], h[2], h[4]), (0, 0, 0), "{h:?}");
        // min_p 0.3: keeps p ≥ 0.3·max, i.e. logits ≥ 3 + ln 0.3 ≈ 1.8 → tokens 1, 2, 3.
        let h = histogram(&t1(|p| p.min_p = 0.3), &LOGITS, 3000);
        assert_eq!((h[0], h[4]), (0, 0), "{h:?}");
        assert!(h[2] > 300, "{h:?}");
        // Plain temperature 1 reaches every token eventually, in proportion.
        let h = histogram(&t1(|_| {}), &LOGITS, 20000);
        assert!(h.iter().all(|&c| c > 0), "{h:?}");
        assert!((h[1] as f64 / 20000.0 - 0.38).abs() < 0.03, "{h:?}");
    }

    #[test]
    fn low_temperature_sharpens_high_flattens() {
        let cold = histogram(&params(|p| p.temperature = 0.1), &[0.0, 1.0, 0.0], 1000);
        assert!(cold[1] > 990, "{cold:?}");
        let hot = histogram(&params(|p| p.temperature = 100.0), &[0.0, 1.0, 0.0], 3000);
        assert!(hot.iter().all(|&c| c > 800), "{hot:?}");
    }

    #[test]
    fn same_seed_same_tokens_other_seed_differs() {
        let p = params(|p| p.temperature = 1.0);
        let logits: Vec<f32> = (0..100).map(|i| (i % 7) as f32 * 0.3).collect();
        let run = |seed| {
            let mut s = Sampler::new(&p, seed, &[]);
            (0..30).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
        assert_ne!(derive_seed(1, 0), derive_seed(1, 1));
        assert_eq!(derive_seed(9, 3), derive_seed(9, 3));
    }

    #[test]
    fn penalties_and_bias_change_greedy_choice() {
        let logits = [2.0, 1.9, 0.5];
        let mut s = Sampler::new(&params(|p| p.presence_penalty = 0.5), 0, &[]);
        assert_eq!(s.sample(&logits), 0);
        s.record(0);
        assert_eq!(
            s.sample(&logits),
            1,
            "presence penalty pushes token 0 below 1"
        );

        let mut s = Sampler::new(&params(|p| p.frequency_penalty = 0.06), 0, &[]);
        s.record(0);
        assert_eq!(s.sample(&logits), 0, "one occurrence: 2.0 - 0.06 > 1.9");
        s.record(0);
        assert_eq!(s.sample(&logits), 1, "two occurrences: 2.0 - 0.12 < 1.9");

        // Repetition penalty applies to prompt tokens too and divides positive logits.
        let mut s = Sampler::new(&params(|p| p.repetition_penalty = 1.2), 0, &[0]);
        assert_eq!(s.sample(&logits), 1);
        let mut s = Sampler::new(&params(|p| p.repetition_penalty = 1.2), 0, &[2]);
        assert_eq!(
            s.sample(&[-1.0, -1.1, -0.95]),
            0,
            "negative logits are multiplied"
        );

        let mut s = Sampler::new(
            &params(|p| p.logit_bias = vec![(2, 5.0), (99, 1.0)]),
            0,
            &[],
        );
        assert_eq!(
            s.sample(&logits),
            2,
            "bias applies; out-of-range ids are ignored"
        );
    }

    #[test]
    fn mask_applies_after_bias_and_before_top_k() {
        let logits = [2.0, 1.9, 0.5, 0.4];
        let mask = TokenMask::from_ids(4, &[1, 2]);
        let mut s = Sampler::new(&params(|p| p.logit_bias = vec![(2, 5.0)]), 0, &[]);
        assert_eq!(s.sample_masked(&logits, Some(&mask)), 2, "bias then mask");
        let mut s = Sampler::new(&params(|p| p.logit_bias = vec![(3, 5.0)]), 0, &[]);
        assert_eq!(
            s.sample_masked(&logits, Some(&mask)),
            1,
            "a biased token the grammar refuses is never sampled"
        );
        // top_k 1 picks among the allowed tokens, never the masked-out favourite 0.
        let p = params(|p| {
            p.temperature = 1.0;
            p.top_k = 1;
        });
        let mut s = Sampler::new(&p, 7, &[]);
        assert!((0..200).all(|_| s.sample_masked(&logits, Some(&mask)) == 1));
        let p = params(|p| p.temperature = 1.0);
        let mut s = Sampler::new(&p, 7, &[]);
        let mut seen = [0usize; 4];
        for _ in 0..400 {
            seen[s.sample_masked(&logits, Some(&mask)) as usize] += 1;
        }
        assert_eq!((seen[0], seen[3]), (0, 0), "{seen:?}");
        assert!(seen[1] > 0 && seen[2] > 0, "{seen:?}");
    }

    #[test]
    fn logprobs_are_raw_log_softmax_with_sorted_top() {
        let lp = token_logprob(&LOGITS, 2, 3);
        let lse = LOGITS.iter().map(|l| l.exp()).sum::<f32>().ln();
        assert!((lp.logprob - (2.0 - lse)).abs() < 1e-6);
        let ids: Vec<u32> = lp.top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 3, 2]);
        assert!((lp.top[0].1 - (3.0 - lse)).abs() < 1e-6);
        let probs: f32 = LOGITS.iter().map(|&l| (l - lse).exp()).sum();
        assert!((probs - 1.0).abs() < 1e-6);
        assert!(
            token_logprob(&LOGITS, 0, 50).top.len() == 5,
            "k capped at vocab"
        );
        assert!(token_logprob(&LOGITS, 0, 0).top.is_empty());
    }
}
