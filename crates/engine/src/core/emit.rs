//! What a step's logits become: prompt logprobs, sampled tokens, the `best_of` fork once a
//! prompt is computed, events for the client, and the final events of a finished request.
//!
//! Invariants: every choice gets exactly one `ChoiceFinished`, and every request exactly one
//! final `Completed` (or `Failed`, sent by the engine); with `best_of > n` nothing is streamed
//! and the best `n` choices are sent, renumbered, when the request completes. A constrained
//! choice samples only tokens its grammar allows (stop tokens banned by `min_tokens` too, unless
//! the grammar allows nothing else) and finishes with `Stop` as soon as its output is complete,
//! even on its `max_tokens`-th token; cut short before that it finishes with `Length`.

use std::time::{Duration, Instant};

use super::engine::Engine;
use super::request::{Choice, Request};
use crate::api::types::{Delta, Event, Failure, FinishReason, Timings, Usage};
use crate::decode::constraint::SeqConstraint;
use crate::decode::detokenizer::IncrementalDecoder;
use crate::decode::sampler::{Sampler, derive_seed, token_logprob};
use crate::decode::stop::OutputText;
use crate::model::{LogitsWanted, SeqChunk};
use crate::sched::sequence::SeqId;
use crate::tokenizer::Tokenizer;

impl Engine {
    pub(super) fn new_choice(&self, req: &Request, seq: SeqId, index: usize) -> Choice {
        Choice {
            seq,
            sampler: Sampler::new(
                &req.req.sampling,
                derive_seed(req.seed, index),
                &req.req.prompt_token_ids,
            ),
            text: OutputText::new(
                IncrementalDecoder::new(Tokenizer::clone(&self.tokenizer)),
                &req.req.stop,
                self.eos,
            ),
            // Forks copy choice 0's state (nothing consumed yet, its mask possibly prepared).
            constraint: match req.choices.first().and_then(|c| c.constraint.as_ref()) {
                Some(parent) => Some(parent.fork()),
                None => req.grammar.as_ref().map(SeqConstraint::new),
            },
            finish: None,
            cum_logprob: 0.0,
            num_tokens: 0,
            buffer: Delta {
                index,
                token_ids: Vec::new(),
                text: String::new(),
                logprobs: Vec::new(),
            },
            drafting: Default::default(),
        }
    }

    pub(super) fn abort(&mut self, key: u64) {
        let Some(req) = self.requests.get_mut(&key) else {
            return;
        };
        let buffered = req.buffered();
        req.forked = true;
        for choice in req.choices.iter_mut().filter(|c| c.finish.is_none()) {
            choice.finish = Some(FinishReason::Abort);
            let text = choice.text.finish().unwrap_or_default();
            choice.buffer.text.push_str(&text);
            if !buffered {
                if !text.is_empty() {
                    let index = choice.buffer.index;
                    let delta = Delta {
                        index,
                        token_ids: Vec::new(),
                        text,
                        logprobs: Vec::new(),
                    };
                    let _ = req.events.send(Event::Delta(delta));
                }
                let _ = req.events.send(Event::ChoiceFinished {
                    index: choice.buffer.index,
                    reason: FinishReason::Abort,
                });
            }
        }
        // Choices that were never forked count as aborted too (n > 1 still in prefill).
        let missing = req.req.n.saturating_sub(req.choices.len());
        if !buffered {
            for index in req.choices.len()..req.choices.len() + missing {
                req.send(Event::ChoiceFinished {
                    index,
                    reason: FinishReason::Abort,
                });
            }
        }
        self.complete(key);
    }

    /// Sends the final events of a request whose choices all finished, and forgets it. With
    /// `best_of > n` the best `n` choices (by cumulative logprob) are sent now, renumbered.
    fn complete(&mut self, key: u64) {
        let Some(mut req) = self.forget(key) else {
            return;
        };
        if req.buffered() {
            let mut returned: Vec<&mut Choice> = req.choices.iter_mut().collect();
            returned.sort_by(|a, b| b.cum_logprob.total_cmp(&a.cum_logprob));
            returned.truncate(req.req.n);
            for (index, choice) in returned.iter_mut().enumerate() {
                let mut delta = std::mem::replace(
                    &mut choice.buffer,
                    Delta {
                        index,
                        token_ids: vec![],
                        text: String::new(),
                        logprobs: vec![],
                    },
                );
                delta.index = index;
                let _ = req.events.send(Event::Delta(delta));
                let reason = choice.finish.unwrap_or(FinishReason::Abort);
                let _ = req.events.send(Event::ChoiceFinished { index, reason });
            }
            // Aborted before the fork: the missing choices end empty.
            for index in returned.len()..req.req.n {
                let reason = FinishReason::Abort;
                let _ = req.events.send(Event::ChoiceFinished { index, reason });
            }
        }
        Self::send_completed(&req);
    }

    /// The request's last event. `completion_tokens` counts every generated sequence, the
    /// `best_of - n` not returned included, as OpenAI bills them.
    fn send_completed(req: &Request) {
        let completion_tokens = req.choices.iter().map(|c| c.num_tokens).sum();
        let now = Instant::now();
        let scheduled = req.scheduled_at.unwrap_or(now);
        let timings = Timings {
            queue: scheduled - req.submitted,
            // Scheduled → first token sampled, as vLLM and llama-server's `prompt_ms` count it.
            prefill: (req.first_token_at.or(req.prefill_done_at))
                .map_or(Duration::ZERO, |t| t.saturating_duration_since(scheduled)),
            first_token: req.first_token_at.map(|t| t - req.submitted),
            total: now - req.submitted,
        };
        let usage = Usage {
            prompt_tokens: req.req.prompt_token_ids.len(),
            completion_tokens,
        };
        tracing::debug!(request_id = %req.req.request_id, ?usage, ?timings, "request completed");
        req.send(Event::Completed { usage, timings });
    }

    /// Turns one chunk's logits rows into prompt logprobs and sampled tokens; a chunk ending in
    /// `drafted` drafted tokens is verified instead (see `speculate.rs`).
    pub(super) fn process_chunk(
        &mut self,
        id: SeqId,
        chunk: &SeqChunk,
        rows: &[f32],
        vocab: usize,
        drafted: usize,
    ) {
        let Some(&(key, own_slot)) = self.owner.get(&id) else {
            return;
        };
        let seq_len = self.sched.get(id).map_or(0, |s| s.tokens.len());
        let Some(req) = self.requests.get_mut(&key) else {
            return;
        };
        if chunk.logits == LogitsWanted::All
            && let Some(k) = req.req.prompt_logprobs
            && !req.prompt_logprobs_sent
        {
            let prompt = &req.req.prompt_token_ids;
            for (j, row) in rows.chunks_exact(vocab).enumerate() {
                let next = chunk.start_pos + j + 1;
                if next < prompt.len() {
                    req.prompt_logprobs[next] = Some(token_logprob(row, prompt[next], k));
                }
            }
            if chunk.context_len() >= prompt.len() {
                req.prompt_logprobs_sent = true;
                req.send(Event::PromptLogprobs(req.prompt_logprobs.clone()));
            }
        }
        if chunk.context_len() < seq_len || rows.is_empty() {
            return; // a prompt chunk that is not the last one
        }
        if drafted > 0 {
            let draft = &chunk.tokens[chunk.tokens.len() - drafted..];
            match self.verify_draft(key, own_slot, draft, rows, vocab) {
                Ok(()) => self.complete_if_finished(key),
                Err(failure) => self.fail(key, failure),
            }
            return;
        }
        let last = &rows[rows.len() - vocab..];
        let now = Instant::now();
        req.prefill_done_at.get_or_insert(now);
        if req.req.stop.max_tokens == 0 {
            // Nothing is generated (prompt logprobs only): all `n` choices end at once, empty,
            // whatever `best_of` is, and there is nothing to rank.
            for index in 0..req.req.n {
                req.send(Event::ChoiceFinished {
                    index,
                    reason: FinishReason::Length,
                });
            }
            if let Some(req) = self.forget(key) {
                Self::send_completed(&req);
            }
            return;
        }
        let slots: Vec<usize> = if req.forked {
            vec![own_slot]
        } else {
            req.forked = true;
            let extra = req.req.best_of - 1;
            if extra > 0 {
                let kids = self.sched.fork(id, extra);
                for (i, kid) in kids.into_iter().enumerate() {
                    let req = &self.requests[&key];
                    let choice = self.new_choice(req, kid, i + 1);
                    self.requests
                        .get_mut(&key)
                        .expect("request exists: this is a bug")
                        .choices
                        .push(choice);
                    self.owner.insert(kid, (key, i + 1));
                }
            }
            (0..=extra).collect()
        };
        for slot in slots {
            if let Err(failure) = self.sample_choice(key, slot, last) {
                self.fail(key, failure);
                return;
            }
        }
        self.complete_if_finished(key);
    }

    /// Completes a request once every choice has finished.
    fn complete_if_finished(&mut self, key: u64) {
        if self.requests.get(&key).is_some_and(Request::all_finished) {
            self.complete(key);
        }
    }

    /// Samples choice `slot`'s next token from `row`, emits it, and finishes the choice when it
    /// is done; returns the token, or `None` when the grammar allowed none.
    pub(super) fn sample_choice(
        &mut self,
        key: u64,
        slot: usize,
        row: &[f32],
    ) -> Result<Option<u32>, Failure> {
        let req = self
            .requests
            .get_mut(&key)
            .expect("request exists: this is a bug");
        let buffered = req.buffered();
        let want_logprobs = req.req.logprobs;
        let choice = &mut req.choices[slot];
        let banned = choice.text.banned_tokens();
        let mask = match choice.constraint.as_mut() {
            Some(constraint) => {
                let mut mask = constraint.mask().map_err(Failure::Constraint)?;
                mask.remove_unless_empty(&banned);
                Some(mask)
            }
            None => None,
        };
        let token = match &mask {
            Some(mask) if mask.num_allowed() == 0 => {
                // The grammar cannot go on (nor end on EOS): what it produced is its output.
                return self.finish_without_token(key, slot).map(|()| None);
            }
            Some(mask) => choice.sampler.sample_masked(row, Some(mask)),
            None if banned.is_empty() => choice.sampler.sample(row),
            None => {
                let mut masked = row.to_vec();
                for b in banned {
                    if let Some(x) = masked.get_mut(b as usize) {
                        *x = f32::NEG_INFINITY;
                    }
                }
                choice.sampler.sample(&masked)
            }
        };
        if let Some(constraint) = choice.constraint.as_mut() {
            constraint.consume(token).map_err(Failure::Constraint)?;
        }
        choice.sampler.record(token);
        let logprob = (want_logprobs.is_some() || buffered)
            .then(|| token_logprob(row, token, want_logprobs.unwrap_or(0)));
        if let Some(lp) = &logprob {
            choice.cum_logprob += f64::from(lp.logprob);
        }
        choice.num_tokens += 1;
        self.generation_tokens += 1;
        self.sched.append_token(choice.seq, token);
        req.first_token_at.get_or_insert_with(Instant::now);
        let detok = |e| Failure::Internal(format!("detokenization failed: {e}"));
        let mut outcome = choice.text.push(token).map_err(detok)?;
        if choice
            .constraint
            .as_ref()
            .is_some_and(SeqConstraint::is_complete)
            && outcome.finish != Some(FinishReason::Stop)
        {
            if outcome.finish.is_none() {
                outcome.text.push_str(&choice.text.finish().map_err(detok)?);
            }
            outcome.finish = Some(FinishReason::Stop);
        }
        let logprobs = if want_logprobs.is_some() {
            logprob.into_iter().collect()
        } else {
            Vec::new()
        };
        if buffered {
            choice.buffer.token_ids.push(token);
            choice.buffer.text.push_str(&outcome.text);
            choice.buffer.logprobs.extend(logprobs);
        } else {
            let delta = Delta {
                index: slot,
                token_ids: vec![token],
                text: outcome.text,
                logprobs,
            };
            let _ = req.events.send(Event::Delta(delta));
        }
        if let Some(reason) = outcome.finish {
            choice.finish = Some(reason);
            let seq = choice.seq;
            if !buffered {
                let _ = req.events.send(Event::ChoiceFinished {
                    index: slot,
                    reason,
                });
            }
            self.owner.remove(&seq);
            self.sched.remove(seq);
        }
        Ok(Some(token))
    }

    /// Ends a constrained choice whose grammar allows no further token, with `Stop` and the
    /// text still held back.
    fn finish_without_token(&mut self, key: u64, slot: usize) -> Result<(), Failure> {
        let req = self
            .requests
            .get_mut(&key)
            .expect("request exists: this is a bug");
        let buffered = req.buffered();
        let choice = &mut req.choices[slot];
        let text = choice
            .text
            .finish()
            .map_err(|e| Failure::Internal(format!("detokenization failed: {e}")))?;
        choice.finish = Some(FinishReason::Stop);
        let seq = choice.seq;
        if buffered {
            choice.buffer.text.push_str(&text);
        } else {
            if !text.is_empty() {
                let delta = Delta {
                    index: slot,
                    token_ids: Vec::new(),
                    text,
                    logprobs: Vec::new(),
                };
                let _ = req.events.send(Event::Delta(delta));
            }
            let _ = req.events.send(Event::ChoiceFinished {
                index: slot,
                reason: FinishReason::Stop,
            });
        }
        self.owner.remove(&seq);
        self.sched.remove(seq);
        Ok(())
    }
}
