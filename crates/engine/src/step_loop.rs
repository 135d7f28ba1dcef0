//! The engine thread: owns the model, the KV cache and the scheduler, and turns submissions into
//! events, one batched forward pass per step.
//!
//! Invariants: the thread blocks on the submission channel when it has nothing to do (no busy
//! loop); a request whose event receiver is gone is dropped, and its blocks freed, before the
//! next schedule; every request gets exactly one final event (`Completed` or `Failed`), after
//! one `ChoiceFinished` per returned choice; block copies of a step are applied before its
//! forward pass, and the scheduler is told a step is computed only after the forward pass
//! succeeded (so a failed step never leaves garbage in the prefix cache). A failing or panicking
//! forward pass fails the requests in that batch and the engine carries on.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::UnboundedSender;

use crate::config::EngineConfig;
use crate::error::Result;
use crate::handle::{AliveGuard, Loaded, Ready, Shared, load};
use crate::kv_cache::KvCache;
use crate::model::{LogitsWanted, Mpt, SeqChunk};
use crate::sampling::{Sampler, derive_seed, token_logprob};
use crate::scheduler::{ScheduledStep, Scheduler};
use crate::sequence::{SeqId, SeqStatus};
use crate::stop::OutputText;
use crate::tokenizer::Tokenizer;
use crate::types::{
    Delta, EngineStats, Event, FinishReason, GenerateRequest, Timings, TokenLogprob, Usage,
};

/// A request on its way into the engine.
pub(crate) struct Submission {
    pub(crate) request: GenerateRequest,
    pub(crate) events: UnboundedSender<Event>,
    pub(crate) submitted: Instant,
}

/// Messages from handles to the engine thread.
pub(crate) enum Command {
    /// A new request.
    Submit(Box<Submission>),
    /// Nothing to do but look at the shared flags.
    Wake,
}

/// Entry point of the engine thread.
pub(crate) fn run(
    config: EngineConfig,
    commands: Receiver<Command>,
    shared: Arc<Shared>,
    ready: Sender<Result<Ready>>,
) {
    let _alive = AliveGuard(Arc::clone(&shared));
    let pool = config_threads_pool(&config);
    let body = move || match load(&config) {
        Ok((loaded, info)) => {
            let _ = ready.send(Ok(info));
            drop(ready);
            Engine::new(loaded, shared).run(commands);
        }
        Err(e) => {
            let _ = ready.send(Err(e));
        }
    };
    match pool {
        Some(pool) => pool.install(body),
        None => body(),
    }
}

fn config_threads_pool(config: &EngineConfig) -> Option<rayon::ThreadPool> {
    let n = config.threads?;
    rayon::ThreadPoolBuilder::new().num_threads(n).build().ok()
}

/// One choice (sequence) of a request.
struct Choice {
    seq: SeqId,
    sampler: Sampler,
    text: OutputText,
    finish: Option<FinishReason>,
    cum_logprob: f64,
    num_tokens: usize,
    /// Output kept until the end when `best_of > n`.
    buffer: Delta,
}

/// Engine-side state of one request.
struct Request {
    req: GenerateRequest,
    events: UnboundedSender<Event>,
    submitted: Instant,
    scheduled_at: Option<Instant>,
    prefill_done_at: Option<Instant>,
    first_token_at: Option<Instant>,
    choices: Vec<Choice>,
    forked: bool,
    seed: u64,
    prompt_logprobs: Vec<Option<TokenLogprob>>,
    prompt_logprobs_sent: bool,
}

impl Request {
    fn buffered(&self) -> bool {
        self.req.best_of > self.req.n
    }

    fn send(&self, event: Event) {
        // A closed receiver means the client left; the request is dropped at the next step.
        let _ = self.events.send(event);
    }

    fn all_finished(&self) -> bool {
        self.forked && self.choices.iter().all(|c| c.finish.is_some())
    }
}

struct Engine {
    model: Mpt,
    cache: KvCache,
    sched: Scheduler,
    tokenizer: Arc<Tokenizer>,
    shared: Arc<Shared>,
    eos: u32,
    requests: HashMap<u64, Request>,
    owner: HashMap<SeqId, (u64, usize)>,
    next_request: u64,
    prompt_tokens: u64,
    generation_tokens: u64,
}

impl Engine {
    fn new(loaded: Loaded, shared: Arc<Shared>) -> Self {
        let engine = Self {
            model: loaded.model,
            cache: loaded.cache,
            sched: loaded.sched,
            tokenizer: loaded.tokenizer,
            shared,
            eos: loaded.eos,
            requests: HashMap::new(),
            owner: HashMap::new(),
            next_request: 0,
            prompt_tokens: 0,
            generation_tokens: 0,
        };
        engine.publish_stats();
        engine
    }

    fn run(mut self, commands: Receiver<Command>) {
        loop {
            if self.requests.is_empty() && !self.shared.abort_all.load(Ordering::SeqCst) {
                match commands.recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(_) => break,
                }
            }
            let mut disconnected = false;
            loop {
                match commands.try_recv() {
                    Ok(cmd) => self.handle(cmd),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        disconnected = true;
                        break;
                    }
                }
            }
            if disconnected || self.shared.abort_all.swap(false, Ordering::SeqCst) {
                let keys: Vec<u64> = self.requests.keys().copied().collect();
                for key in keys {
                    self.abort(key);
                }
            }
            if disconnected {
                break;
            }
            self.drop_cancelled();
            if !self.requests.is_empty() {
                self.step();
            }
            self.publish_stats();
        }
        self.publish_stats();
    }

    fn handle(&mut self, cmd: Command) {
        let Command::Submit(sub) = cmd else { return };
        let Submission {
            request,
            events,
            submitted,
        } = *sub;
        let key = self.next_request;
        self.next_request += 1;
        let seed = request.sampling.seed.unwrap_or_else(rand::random);
        let seq = self.sched.add(
            request.prompt_token_ids.clone(),
            request.prompt_logprobs.is_some(),
        );
        self.prompt_tokens += request.prompt_token_ids.len() as u64;
        let mut req = Request {
            prompt_logprobs: vec![None; request.prompt_token_ids.len()],
            req: request,
            events,
            submitted,
            scheduled_at: None,
            prefill_done_at: None,
            first_token_at: None,
            choices: Vec::new(),
            forked: false,
            seed,
            prompt_logprobs_sent: false,
        };
        let choice = self.new_choice(&req, seq, 0);
        req.choices.push(choice);
        self.owner.insert(seq, (key, 0));
        self.requests.insert(key, req);
    }

    fn new_choice(&self, req: &Request, seq: SeqId, index: usize) -> Choice {
        Choice {
            seq,
            sampler: Sampler::new(
                &req.req.sampling,
                derive_seed(req.seed, index),
                &req.req.prompt_token_ids,
            ),
            text: OutputText::new(self.tokenizer.incremental(), &req.req.stop, self.eos),
            finish: None,
            cum_logprob: 0.0,
            num_tokens: 0,
            buffer: Delta {
                index,
                token_ids: Vec::new(),
                text: String::new(),
                logprobs: Vec::new(),
            },
        }
    }

    /// Removes a request's live sequences and forgets it; fixes the pending count.
    fn forget(&mut self, key: u64) -> Option<Request> {
        let req = self.requests.remove(&key)?;
        for choice in &req.choices {
            if self.owner.remove(&choice.seq).is_some() {
                self.sched.remove(choice.seq);
            }
        }
        if req.scheduled_at.is_none() {
            self.shared.pending.fetch_sub(1, Ordering::SeqCst);
        }
        Some(req)
    }

    fn drop_cancelled(&mut self) {
        let gone: Vec<u64> = self
            .requests
            .iter()
            .filter(|(_, r)| r.events.is_closed())
            .map(|(&k, _)| k)
            .collect();
        for key in gone {
            self.forget(key);
        }
    }

    fn fail(&mut self, key: u64, message: String) {
        if let Some(req) = self.forget(key) {
            tracing::warn!(request_id = %req.req.request_id, %message, "request failed");
            req.send(Event::Failed(message));
        }
    }

    fn abort(&mut self, key: u64) {
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

    /// Sends the final events of a request whose choices all finished, and forgets it.
    fn complete(&mut self, key: u64) {
        let Some(mut req) = self.forget(key) else {
            return;
        };
        let mut returned: Vec<&mut Choice> = req.choices.iter_mut().collect();
        if req.req.best_of > req.req.n {
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
        let completion_tokens = returned.iter().map(|c| c.num_tokens).sum();
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

    fn step(&mut self) {
        let step = self.sched.schedule();
        if step.is_empty() {
            // Cannot happen with a consistent scheduler; avoid spinning if it does.
            std::thread::sleep(Duration::from_millis(1));
            return;
        }
        let now = Instant::now();
        for id in &step.seq_ids {
            if let Some(&(key, _)) = self.owner.get(id)
                && let Some(req) = self.requests.get_mut(&key)
                && req.scheduled_at.is_none()
            {
                req.scheduled_at = Some(now);
                self.shared.pending.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let logits = match self.run_model(&step) {
            Ok(logits) => logits,
            Err(message) => {
                let keys: Vec<u64> = step
                    .seq_ids
                    .iter()
                    .filter_map(|id| self.owner.get(id).map(|o| o.0))
                    .collect();
                for key in keys {
                    self.fail(key, message.clone());
                }
                return;
            }
        };
        self.sched.commit(&step);
        let rows = step.batch.num_logits_rows();
        let vocab = logits.len().checked_div(rows).unwrap_or(0);
        let mut row = 0;
        for (&id, chunk) in step.seq_ids.iter().zip(&step.batch.seqs) {
            let n = chunk.logits.rows(chunk.tokens.len());
            let block = &logits[row * vocab..(row + n) * vocab];
            row += n;
            self.process_chunk(id, chunk, block, vocab);
        }
    }

    /// Applies the step's block copies and runs the forward pass, catching panics.
    fn run_model(&mut self, step: &ScheduledStep) -> Result<Vec<f32>, String> {
        let (model, cache) = (&self.model, &mut self.cache);
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| -> Result<Vec<f32>> {
            for &(src, dst) in &step.copies {
                cache.copy_block(src, dst)?;
            }
            let logits = model.forward(&step.batch, cache)?;
            Ok(logits.flatten_all()?.to_vec1::<f32>()?)
        }));
        match result {
            Ok(Ok(logits)) => Ok(logits),
            Ok(Err(e)) => Err(format!("forward pass failed: {e}")),
            Err(panic) => {
                let what = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Err(format!("forward pass panicked: {what}"))
            }
        }
    }

    fn process_chunk(&mut self, id: SeqId, chunk: &SeqChunk, rows: &[f32], vocab: usize) {
        let Some(&(key, _)) = self.owner.get(&id) else {
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
        let last = &rows[rows.len() - vocab..];
        let now = Instant::now();
        req.prefill_done_at.get_or_insert(now);
        if req.req.stop.max_tokens == 0 {
            req.forked = true;
            for choice in &mut req.choices {
                choice.finish = Some(FinishReason::Length);
            }
            for index in 0..req.req.n {
                req.send(Event::ChoiceFinished {
                    index,
                    reason: FinishReason::Length,
                });
            }
            self.complete(key);
            return;
        }
        let slots: Vec<usize> = if req.forked {
            vec![self.owner[&id].1]
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
            if let Err(e) = self.sample_choice(key, slot, last) {
                self.fail(key, format!("detokenization failed: {e}"));
                return;
            }
        }
        if self.requests.get(&key).is_some_and(Request::all_finished) {
            self.complete(key);
        }
    }

    fn sample_choice(&mut self, key: u64, slot: usize, row: &[f32]) -> Result<()> {
        let req = self
            .requests
            .get_mut(&key)
            .expect("request exists: this is a bug");
        let buffered = req.buffered();
        let want_logprobs = req.req.logprobs;
        let choice = &mut req.choices[slot];
        let banned = choice.text.banned_tokens();
        let token = if banned.is_empty() {
            choice.sampler.sample(row)
        } else {
            let mut masked = row.to_vec();
            for b in banned {
                if let Some(x) = masked.get_mut(b as usize) {
                    *x = f32::NEG_INFINITY;
                }
            }
            choice.sampler.sample(&masked)
        };
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
        let outcome = choice.text.push(token)?;
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
        Ok(())
    }

    fn publish_stats(&self) {
        let mut running = 0;
        for req in self.requests.values() {
            let any_running = req.choices.iter().any(|c| {
                self.sched
                    .get(c.seq)
                    .is_some_and(|s| s.status == SeqStatus::Running)
            });
            running += usize::from(any_running);
        }
        let alloc = self.sched.allocator();
        let stats = EngineStats {
            num_waiting: self.requests.len() - running,
            num_running: running,
            kv_blocks_used: alloc.num_used(),
            kv_blocks_total: alloc.num_total(),
            num_preemptions: self.sched.num_preemptions,
            prefix_cache_queries: self.sched.prefix_queries,
            prefix_cache_hits: self.sched.prefix_hits,
            prompt_tokens: self.prompt_tokens,
            generation_tokens: self.generation_tokens,
            kv_block_size: self.sched.config().block_size,
            kv_tokens_filled: self.sched.kv_tokens_filled(),
        };
        *self
            .shared
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = stats;
    }
}
