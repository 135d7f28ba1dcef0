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

use super::channel::{AliveGuard, Command, Shared, Submission};
use super::load::{Loaded, Ready, load};
use super::request::Request;
use crate::api::config::{EngineConfig, FaultPlan};
use crate::api::error::{EngineError, Result};
use crate::api::types::{EngineStats, Event, Failure, LoadProgress};
use crate::kv::KvCache;
use crate::model::Mpt;
use crate::sched::scheduler::{ScheduledStep, Scheduler};
use crate::sched::sequence::{SeqId, SeqStatus};
use crate::spec::cost::StepCost;
use crate::spec::ngram::NgramProposer;
use crate::tokenizer::Tokenizer;

/// Entry point of the engine thread.
pub(crate) fn run(
    config: EngineConfig,
    commands: Receiver<Command>,
    shared: Arc<Shared>,
    ready: Sender<Result<Ready>>,
    on_progress: &(dyn Fn(LoadProgress) + Sync),
) {
    let _alive = AliveGuard(Arc::clone(&shared));
    let pool = match threads_pool(&config) {
        Ok(pool) => pool,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    let body = move || match load(&config, on_progress) {
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

/// The compute thread pool of `--threads`, if set; a pool that cannot be built is an error
/// rather than a silent fallback to rayon's global pool.
fn threads_pool(config: &EngineConfig) -> Result<Option<rayon::ThreadPool>> {
    let Some(n) = config.threads else {
        return Ok(None);
    };
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .thread_name(|i| format!("mpt-compute-{i}"))
        .build()
        .map(Some)
        .map_err(|e| EngineError::setting("threads", format!("cannot start {n} threads: {e}")))
}

/// Everything the engine thread owns. Fields are shared with `emit.rs`, which turns logits
/// into events.
pub(super) struct Engine {
    /// First field, so it is dropped first: when the engine ends (even by panic) it is marked
    /// dead before the requests' event senders close, so a client that sees its stream fail
    /// already finds the engine dead.
    _alive: AliveGuard,
    pub(super) model: Mpt,
    pub(super) cache: KvCache,
    pub(super) sched: Scheduler,
    pub(super) tokenizer: Arc<Tokenizer>,
    pub(super) shared: Arc<Shared>,
    pub(super) eos: u32,
    /// Live requests by engine-side key.
    pub(super) requests: HashMap<u64, Request>,
    /// Which request and choice slot each live sequence belongs to.
    pub(super) owner: HashMap<SeqId, (u64, usize)>,
    pub(super) next_request: u64,
    pub(super) prompt_tokens: u64,
    pub(super) generation_tokens: u64,
    /// Drafts tokens for decoding sequences, when speculative decoding is on.
    pub(super) proposer: Option<NgramProposer>,
    /// What steps cost by their number of rows (decides which drafts pay).
    pub(super) step_cost: StepCost,
    /// Drafts verified so far.
    pub(super) spec_drafts: u64,
    /// Tokens in the drafts verified so far.
    pub(super) spec_draft_tokens: u64,
    /// Drafted tokens accepted so far.
    pub(super) spec_accepted_tokens: u64,
    /// Steps scheduled so far (what [`FaultPlan`] counts).
    steps: u64,
    faults: FaultPlan,
}

impl Engine {
    fn new(loaded: Loaded, shared: Arc<Shared>) -> Self {
        let engine = Self {
            _alive: AliveGuard(Arc::clone(&shared)),
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
            proposer: loaded.speculative.map(NgramProposer::new),
            step_cost: StepCost::default(),
            spec_drafts: 0,
            spec_draft_tokens: 0,
            spec_accepted_tokens: 0,
            steps: 0,
            faults: loaded.faults,
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
            grammar,
            events,
            submitted,
        } = *sub;
        let key = self.next_request;
        self.next_request += 1;
        let seed = request.sampling.seed.unwrap_or_else(rand::random);
        let seq = self.sched.add_forking(
            request.prompt_token_ids.clone(),
            request.prompt_logprobs.is_some(),
            request.best_of - 1,
        );
        self.prompt_tokens += request.prompt_token_ids.len() as u64;
        let mut req = Request {
            prompt_logprobs: vec![None; request.prompt_token_ids.len()],
            req: request,
            grammar,
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

    /// Removes a request's live sequences and forgets it; fixes the pending count.
    pub(super) fn forget(&mut self, key: u64) -> Option<Request> {
        let req = self.requests.remove(&key)?;
        for choice in &req.choices {
            if self.owner.remove(&choice.seq).is_some() {
                self.sched.remove(choice.seq);
            }
        }
        if req.scheduled_at.is_none() {
            self.shared.dequeue(req.req.best_of);
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

    pub(super) fn fail(&mut self, key: u64, failure: Failure) {
        if let Some(req) = self.forget(key) {
            tracing::warn!(request_id = %req.req.request_id, %failure, "request failed");
            req.send(Event::Failed(failure));
        }
    }

    fn step(&mut self) {
        self.propose_drafts();
        let step = self.sched.schedule();
        if step.is_empty() {
            // Cannot happen with a consistent scheduler; avoid spinning if it does.
            std::thread::sleep(Duration::from_millis(1));
            return;
        }
        self.steps += 1;
        if self.faults.kill_engine_at_step == Some(self.steps) {
            // Outside run_model's catch_unwind: the thread really dies, as after a bug.
            panic!(
                "injected fault: the engine thread dies at step {}",
                self.steps
            );
        }
        let now = Instant::now();
        for id in &step.seq_ids {
            if let Some(&(key, _)) = self.owner.get(id)
                && let Some(req) = self.requests.get_mut(&key)
                && req.scheduled_at.is_none()
            {
                req.scheduled_at = Some(now);
                self.shared
                    .running_slots
                    .store(self.sched.slots_taken(), Ordering::SeqCst);
                self.shared.dequeue(req.req.best_of);
            }
        }
        let result = if self.faults.fail_forward_at_step == Some(self.steps) {
            Err(format!(
                "forward pass failed: injected fault at step {}",
                self.steps
            ))
        } else {
            self.forward_and_prepare_masks(&step)
        };
        let logits = match result {
            Ok(logits) => logits,
            Err(message) => {
                let keys: Vec<u64> = step
                    .seq_ids
                    .iter()
                    .filter_map(|id| self.owner.get(id).map(|o| o.0))
                    .collect();
                for key in keys {
                    self.fail(key, Failure::Internal(message.clone()));
                }
                return;
            }
        };
        self.sched.commit(&step);
        let rows = step.batch.num_logits_rows();
        let vocab = logits.len().checked_div(rows).unwrap_or(0);
        let mut row = 0;
        for (i, (&id, chunk)) in step.seq_ids.iter().zip(&step.batch.seqs).enumerate() {
            let n = chunk.logits.rows(chunk.tokens.len());
            let block = &logits[row * vocab..(row + n) * vocab];
            row += n;
            self.process_chunk(id, chunk, block, vocab, step.draft_len(i));
        }
        self.observe_step_cost(&step, now.elapsed().as_secs_f64());
    }

    /// Applies the step's block copies and runs the forward pass, catching panics.
    pub(super) fn run_model(
        model: &Mpt,
        cache: &mut KvCache,
        step: &ScheduledStep,
    ) -> Result<Vec<f32>, String> {
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
        self.shared
            .running_slots
            .store(self.sched.slots_taken(), Ordering::SeqCst);
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
            spec_decode_drafts: self.spec_drafts,
            spec_decode_draft_tokens: self.spec_draft_tokens,
            spec_decode_accepted_tokens: self.spec_accepted_tokens,
        };
        *self
            .shared
            .stats
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = stats;
    }
}
