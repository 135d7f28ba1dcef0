//! Continuous-batching scheduler: decides, every step, which sequences run and with how many
//! tokens, and owns the KV block bookkeeping. Pure Rust, no tensors.
//!
//! Policy: running sequences go first — decodes before prompt chunks, each group oldest first —
//! each with all its uncomputed tokens (one for a decode, plus its draft when it has one and
//! the budget and free blocks allow; the rest of a prompt for a chunked prefill) within the
//! step's token budget, so a long prefill never stalls running streams; when blocks run out the
//! newest running sequence not yet scheduled in this step is preempted (its blocks freed, its
//! tokens recomputed later); a draft never preempts. Then waiting sequences are admitted
//! strictly FCFS while `max_num_seqs`, the token budget and free blocks allow; a prompt larger
//! than the budget is prefilled in chunks over several steps, and its chunks leave room for the
//! next waiting prompt when that one is short (at most half the budget), so a short request
//! gets its first token within about one step of a long prefill. Nothing is admitted in a step
//! that preempted.
//!
//! Invariants (see [`Scheduler::check_invariants`]): every block's refcount equals the number
//! of live block tables that contain it; finished or cancelled sequences hold nothing; with no
//! sequences left every block is free (cached ones evictable). A block being written is never
//! shared: a partly filled last block shared by forks is copied first (copy on write), and the
//! step carries the `(src, dst)` copies to apply before the forward pass. Drafted positions
//! count as computed only once accepted ([`Scheduler::accept_draft`]): rejected ones are
//! rolled back, blocks left without an accepted position are freed, and prefix-cache hashes
//! cover accepted tokens only.

use std::collections::HashMap;

use crate::kv::BlockAllocator;
use crate::kv::prefix_cache::block_hash;
use crate::model::{LogitsWanted, ModelBatch, SeqChunk};
use crate::sched::sequence::{SeqId, SeqStatus, Sequence, blocks_for};

/// Scheduler limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// KV blocks in the pool.
    pub num_blocks: usize,
    /// Tokens per block.
    pub block_size: usize,
    /// Most sequences per step.
    pub max_num_seqs: usize,
    /// Most new tokens per step.
    pub max_num_batched_tokens: usize,
    /// Reuse cached blocks of identical prefixes.
    pub enable_prefix_caching: bool,
}

/// Most prompt tokens per step for a sequence that wants the logits of every position: each
/// one is a vocabulary-sized row of f32 (~200 KB for MPT), so chunks stay bounded in memory.
pub const PROMPT_LOGITS_CHUNK: usize = 256;

fn chunk_cap(seq: &Sequence) -> usize {
    if seq.wants_prompt_logits {
        PROMPT_LOGITS_CHUNK
    } else {
        usize::MAX
    }
}

/// What to run in one step.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ScheduledStep {
    /// The model batch, one chunk per scheduled sequence.
    pub batch: ModelBatch,
    /// The sequence of each chunk, parallel to `batch.seqs`.
    pub seq_ids: Vec<SeqId>,
    /// Block copies `(src, dst)` to apply before the forward pass (copy on write).
    pub copies: Vec<(u32, u32)>,
    /// Sequences preempted in this step (their tokens will be recomputed).
    pub preempted: Vec<SeqId>,
    /// Drafted tokens at the end of each chunk, parallel to `batch.seqs` (0: no draft); a
    /// chunk with a draft returns the logits of every position.
    pub draft_lens: Vec<usize>,
}

impl ScheduledStep {
    /// Whether there is nothing to run.
    pub fn is_empty(&self) -> bool {
        self.batch.seqs.is_empty()
    }

    /// Drafted tokens at the end of chunk `i`.
    pub fn draft_len(&self, i: usize) -> usize {
        self.draft_lens.get(i).copied().unwrap_or(0)
    }
}

/// The scheduler and block bookkeeping.
#[derive(Debug)]
pub struct Scheduler {
    cfg: SchedulerConfig,
    allocator: BlockAllocator,
    seqs: HashMap<SeqId, Sequence>,
    /// Waiting sequences, sorted by order key (front = next to admit).
    waiting: Vec<SeqId>,
    /// Running sequences (any order; sorted when scheduling).
    running: Vec<SeqId>,
    next_id: SeqId,
    next_arrival: u64,
    /// Total preemptions.
    pub num_preemptions: u64,
    /// Total prompt blocks looked up in the prefix cache.
    pub prefix_queries: u64,
    /// Total prompt blocks found in the prefix cache.
    pub prefix_hits: u64,
}

impl Scheduler {
    /// An empty scheduler over a pool of `cfg.num_blocks` blocks.
    pub fn new(cfg: SchedulerConfig) -> Self {
        assert!(cfg.block_size > 0 && cfg.max_num_seqs > 0 && cfg.max_num_batched_tokens > 0);
        Self {
            cfg,
            allocator: BlockAllocator::new(cfg.num_blocks, cfg.enable_prefix_caching),
            seqs: HashMap::new(),
            waiting: Vec::new(),
            running: Vec::new(),
            next_id: 0,
            next_arrival: 0,
            num_preemptions: 0,
            prefix_queries: 0,
            prefix_hits: 0,
        }
    }

    /// The limits it runs under.
    pub fn config(&self) -> &SchedulerConfig {
        &self.cfg
    }

    /// Queues a new request's (first) sequence; returns its id.
    pub fn add(&mut self, prompt: Vec<u32>, wants_prompt_logits: bool) -> SeqId {
        self.add_forking(prompt, wants_prompt_logits, 0)
    }

    /// Queues a sequence that [`Self::fork`] will copy `forks` times once its prompt is
    /// computed; it is admitted only when `1 + forks` sequence slots are free.
    pub fn add_forking(
        &mut self,
        prompt: Vec<u32>,
        wants_prompt_logits: bool,
        forks: usize,
    ) -> SeqId {
        assert!(
            !prompt.is_empty(),
            "empty prompt reached the scheduler: this is a bug"
        );
        let id = self.next_id;
        self.next_id += 1;
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        let mut seq = Sequence::new(id, arrival, prompt, wants_prompt_logits);
        seq.reserved_forks = forks;
        self.seqs.insert(id, seq);
        self.insert_waiting(id);
        id
    }

    /// Sequence slots taken: running sequences plus the forks they will become.
    pub fn slots_taken(&self) -> usize {
        self.running
            .iter()
            .map(|id| 1 + self.seqs[id].reserved_forks)
            .sum()
    }

    /// A sequence, if it is alive.
    pub fn get(&self, id: SeqId) -> Option<&Sequence> {
        self.seqs.get(&id)
    }

    /// Sequences waiting for admission.
    pub fn num_waiting(&self) -> usize {
        self.waiting.len()
    }

    /// Sequences holding blocks.
    pub fn num_running(&self) -> usize {
        self.running.len()
    }

    /// Whether no sequence is alive.
    pub fn is_idle(&self) -> bool {
        self.seqs.is_empty()
    }

    /// The block pool.
    pub fn allocator(&self) -> &BlockAllocator {
        &self.allocator
    }

    /// KV slots holding a computed position of a live sequence, counting a block shared by
    /// several sequences once (at its fullest). Only a sequence's last block can be partly
    /// filled, so `num_used() * block_size` minus this is the slots allocated but unused.
    pub fn kv_tokens_filled(&self) -> usize {
        let bs = self.cfg.block_size;
        let mut filled = 0;
        let mut shared: HashMap<u32, usize> = HashMap::new();
        for seq in self.seqs.values() {
            for (i, &b) in seq.block_table.iter().enumerate() {
                let fill = seq.num_computed.saturating_sub(i * bs).min(bs);
                if self.allocator.refcount(b) > 1 {
                    let slot = shared.entry(b).or_insert(0);
                    *slot = (*slot).max(fill);
                } else {
                    filled += fill;
                }
            }
        }
        filled + shared.values().sum::<usize>()
    }

    fn insert_waiting(&mut self, id: SeqId) {
        let key = self.seqs[&id].order_key();
        let pos = self
            .waiting
            .partition_point(|w| self.seqs[w].order_key() < key);
        self.waiting.insert(pos, id);
    }

    /// Creates `count` copies of a running sequence sharing all its blocks (for n > 1 /
    /// best_of); they diverge from the next appended token on.
    pub fn fork(&mut self, parent: SeqId, count: usize) -> Vec<SeqId> {
        let parent_seq = self
            .seqs
            .get_mut(&parent)
            .expect("fork of a dead sequence: this is a bug");
        parent_seq.reserved_forks = parent_seq.reserved_forks.saturating_sub(count);
        let template = parent_seq.clone();
        assert_eq!(
            template.status,
            SeqStatus::Running,
            "fork of a waiting sequence: this is a bug"
        );
        let mut ids = Vec::with_capacity(count);
        for _ in 0..count {
            for &b in &template.block_table {
                self.allocator.incref(b);
            }
            let id = self.next_id;
            self.next_id += 1;
            let mut child = template.clone();
            child.id = id;
            self.seqs.insert(id, child);
            self.running.push(id);
            ids.push(id);
        }
        ids
    }

    /// Appends a sampled token to a sequence.
    pub fn append_token(&mut self, id: SeqId, token: u32) {
        let seq = self
            .seqs
            .get_mut(&id)
            .expect("append to a dead sequence: this is a bug");
        seq.tokens.push(token);
    }

    /// Hashes the sequence's newly full, computed blocks into the prefix cache.
    fn register_full_blocks(allocator: &mut BlockAllocator, seq: &mut Sequence, bs: usize) {
        while seq.block_hashes.len() < seq.num_computed / bs {
            let i = seq.block_hashes.len();
            let h = block_hash(
                seq.block_hashes.last().copied(),
                &seq.tokens[i * bs..(i + 1) * bs],
            );
            seq.block_hashes.push(h);
            allocator.register(seq.block_table[i], h);
        }
    }

    /// Removes a sequence (finished, cancelled or failed) and frees its blocks at once.
    pub fn remove(&mut self, id: SeqId) {
        let Some(seq) = self.seqs.remove(&id) else {
            return;
        };
        self.allocator.release_all(&seq.block_table);
        self.waiting.retain(|&w| w != id);
        self.running.retain(|&r| r != id);
    }

    /// Marks the chunks of `step` as computed (call after a successful forward pass) and
    /// registers the blocks they filled in the prefix cache; drafted positions wait for
    /// [`Self::accept_draft`].
    pub fn commit(&mut self, step: &ScheduledStep) {
        let bs = self.cfg.block_size;
        for (i, (id, chunk)) in step.seq_ids.iter().zip(&step.batch.seqs).enumerate() {
            let Some(seq) = self.seqs.get_mut(id) else {
                continue;
            };
            seq.num_computed = chunk.context_len() - step.draft_len(i);
            if seq.num_computed >= seq.prompt_len {
                seq.wants_prompt_logits = false;
            }
            Self::register_full_blocks(&mut self.allocator, seq, bs);
        }
    }

    /// Frees a running sequence's blocks and sends it back to the front of the queue.
    fn preempt(&mut self, id: SeqId) {
        let seq = self
            .seqs
            .get_mut(&id)
            .expect("preempt of a dead sequence: this is a bug");
        let table = std::mem::take(&mut seq.block_table);
        seq.block_hashes.clear();
        seq.num_computed = 0;
        seq.status = SeqStatus::Waiting;
        self.allocator.release_all(&table);
        self.running.retain(|&r| r != id);
        self.insert_waiting(id);
        self.num_preemptions += 1;
    }

    /// Blocks `seq` needs to grow to `new_len` computed positions, including a copy-on-write
    /// block when its partly filled last block is shared.
    fn blocks_needed(&self, seq: &Sequence, new_len: usize) -> usize {
        let grow = blocks_for(new_len, self.cfg.block_size).saturating_sub(seq.block_table.len());
        grow + usize::from(self.needs_cow(seq))
    }

    fn needs_cow(&self, seq: &Sequence) -> bool {
        let bs = self.cfg.block_size;
        !seq.num_computed.is_multiple_of(bs)
            && seq
                .block_table
                .get(seq.num_computed / bs)
                .is_some_and(|&b| self.allocator.refcount(b) > 1)
    }

    /// Gives `seq` the blocks for `new_len` positions; the caller checked capacity.
    fn grow(&mut self, id: SeqId, new_len: usize, copies: &mut Vec<(u32, u32)>) {
        let bs = self.cfg.block_size;
        let cow = self.needs_cow(&self.seqs[&id]);
        let seq = self
            .seqs
            .get_mut(&id)
            .expect("grow of a dead sequence: this is a bug");
        if cow {
            let i = seq.num_computed / bs;
            let src = seq.block_table[i];
            let dst = self
                .allocator
                .allocate()
                .expect("capacity was checked: this is a bug");
            self.allocator.release(src);
            seq.block_table[i] = dst;
            copies.push((src, dst));
        }
        while seq.block_table.len() < blocks_for(new_len, bs) {
            let b = self
                .allocator
                .allocate()
                .expect("capacity was checked: this is a bug");
            seq.block_table.push(b);
        }
    }

    /// The chunk of `num_tokens` uncomputed tokens, followed by the first `drafted` tokens of
    /// the sequence's draft (whose every position's logits come back to verify it).
    fn chunk_for(&self, id: SeqId, num_tokens: usize, drafted: usize) -> SeqChunk {
        let seq = &self.seqs[&id];
        let start = seq.num_computed;
        let end = start + num_tokens;
        let logits = if seq.wants_prompt_logits || drafted > 0 {
            LogitsWanted::All
        } else if end == seq.tokens.len() {
            LogitsWanted::Last
        } else {
            LogitsWanted::None
        };
        let mut tokens = seq.tokens[start..end].to_vec();
        tokens.extend_from_slice(&seq.draft[..drafted]);
        SeqChunk {
            tokens,
            start_pos: start,
            block_table: seq.block_table.clone(),
            logits,
        }
    }

    /// Looks up the longest cached prefix of a waiting sequence (leaving at least one token to
    /// compute). Returns the blocks and their hashes without taking references.
    fn cached_prefix(&self, seq: &Sequence) -> (Vec<u32>, Vec<u64>) {
        if !self.allocator.caching() || seq.wants_prompt_logits {
            return (Vec::new(), Vec::new());
        }
        let bs = self.cfg.block_size;
        let max_blocks = (seq.tokens.len() - 1) / bs;
        let (mut blocks, mut hashes) = (Vec::new(), Vec::new());
        for i in 0..max_blocks {
            let h = block_hash(hashes.last().copied(), &seq.tokens[i * bs..(i + 1) * bs]);
            match self.allocator.peek_cached(h) {
                Some(b) => {
                    blocks.push(b);
                    hashes.push(h);
                }
                None => break,
            }
        }
        (blocks, hashes)
    }

    /// Tokens a running prompt chunk leaves in the step for the oldest waiting prompt: all of
    /// it when it fits in half the budget (and a sequence slot is free), else none. So a short
    /// request that arrives during a long prefill starts in the next step instead of after the
    /// whole prompt, and the long one loses at most half a step.
    fn room_for_next_waiting(&self) -> usize {
        let Some(id) = self.waiting.first() else {
            return 0;
        };
        let seq = &self.seqs[id];
        let len = seq.tokens.len();
        let fits = len <= self.cfg.max_num_batched_tokens / 2;
        if fits && self.slots_taken() + 1 + seq.reserved_forks <= self.cfg.max_num_seqs {
            len
        } else {
            0
        }
    }

    /// Decides the next step. The step loop runs it, then calls [`Self::commit`].
    pub fn schedule(&mut self) -> ScheduledStep {
        let mut step = ScheduledStep::default();
        let mut budget = self.cfg.max_num_batched_tokens;
        // Decodes first (so a long prefill never stalls running streams), each group oldest
        // first; `pending` holds the running sequences not yet handled, in that order.
        let mut pending = self.running.clone();
        pending.sort_by_key(|id| {
            let seq = &self.seqs[id];
            (seq.num_uncomputed() > 1, seq.order_key())
        });
        pending.reverse(); // pop() yields the next one to schedule
        let reserve = self.room_for_next_waiting();

        // 1. Running sequences; when blocks run out, preempt the newest one not yet scheduled.
        while let Some(id) = pending.pop() {
            if budget == 0 || step.seq_ids.len() == self.cfg.max_num_seqs {
                break;
            }
            let seq = &self.seqs[&id];
            let mut n = seq.num_uncomputed().min(budget).min(chunk_cap(seq));
            if n > 1 {
                n = n.min(budget.saturating_sub(reserve));
            }
            if n == 0 {
                continue;
            }
            let new_len = seq.num_computed + n;
            let mut preempted_self = false;
            while self.blocks_needed(&self.seqs[&id], new_len) > self.allocator.num_free() {
                let newest = pending
                    .iter()
                    .enumerate()
                    .max_by_key(|(_, v)| self.seqs[*v].order_key())
                    .map(|(i, &v)| (i, v));
                let victim = match newest {
                    Some((i, v)) if self.seqs[&v].order_key() > self.seqs[&id].order_key() => {
                        pending.remove(i);
                        v
                    }
                    _ => {
                        preempted_self = true;
                        id
                    }
                };
                self.preempt(victim);
                step.preempted.push(victim);
                if preempted_self {
                    break;
                }
            }
            if preempted_self {
                continue;
            }
            let drafted = self.draft_room(id, new_len, (budget - n).saturating_sub(reserve));
            self.grow(id, new_len + drafted, &mut step.copies);
            step.batch.seqs.push(self.chunk_for(id, n, drafted));
            step.seq_ids.push(id);
            step.draft_lens.push(drafted);
            budget -= n + drafted;
        }

        // 2. Waiting sequences, strictly FCFS; a sequence to be forked needs a slot for each
        // of its forks too, so that `max_num_seqs` holds after the fork.
        while step.preempted.is_empty() && budget > 0 && step.seq_ids.len() < self.cfg.max_num_seqs
        {
            let Some(&id) = self.waiting.first() else {
                break;
            };
            let seq = &self.seqs[&id];
            if self.slots_taken() + 1 + seq.reserved_forks > self.cfg.max_num_seqs {
                break;
            }
            let (hit_blocks, hit_hashes) = self.cached_prefix(seq);
            let cached_len = hit_blocks.len() * self.cfg.block_size;
            let n = (seq.tokens.len() - cached_len)
                .min(budget)
                .min(chunk_cap(seq));
            let fresh = blocks_for(cached_len + n, self.cfg.block_size) - hit_blocks.len();
            let reclaimed = hit_blocks
                .iter()
                .filter(|&&b| self.allocator.is_evictable(b))
                .count();
            if fresh + reclaimed > self.allocator.num_free() {
                break;
            }
            if self.allocator.caching() && !seq.wants_prompt_logits {
                self.prefix_queries += ((seq.tokens.len() - 1) / self.cfg.block_size) as u64;
                self.prefix_hits += hit_blocks.len() as u64;
            }
            for &b in &hit_blocks {
                self.allocator.acquire_cached(b);
            }
            self.waiting.remove(0);
            self.running.push(id);
            let seq = self
                .seqs
                .get_mut(&id)
                .expect("waiting sequence exists: this is a bug");
            seq.status = SeqStatus::Running;
            seq.block_table = hit_blocks;
            seq.block_hashes = hit_hashes;
            seq.num_computed = cached_len;
            self.grow(id, cached_len + n, &mut step.copies);
            step.batch.seqs.push(self.chunk_for(id, n, 0));
            step.seq_ids.push(id);
            step.draft_lens.push(0);
            budget -= n;
        }
        for seq in self.seqs.values_mut() {
            seq.draft.clear(); // a draft is for this step only
        }
        step
    }

    /// Panics unless every block's refcount equals its number of owners among live sequences,
    /// and the allocator's own states are consistent.
    pub fn check_invariants(&self) {
        self.allocator.check_invariants();
        let mut owners = vec![0u32; self.allocator.num_total()];
        for seq in self.seqs.values() {
            if seq.status == SeqStatus::Waiting {
                assert!(
                    seq.block_table.is_empty() && seq.num_computed == 0,
                    "waiting seq {} holds blocks",
                    seq.id
                );
            }
            assert!(seq.block_table.len() * self.cfg.block_size >= seq.num_computed);
            for &b in &seq.block_table {
                owners[b as usize] += 1;
            }
        }
        for (b, &n) in owners.iter().enumerate() {
            assert_eq!(
                self.allocator.refcount(b as u32),
                n,
                "block {b} refcount vs owners"
            );
        }
        assert_eq!(self.waiting.len() + self.running.len(), self.seqs.len());
        if self.seqs.is_empty() {
            assert_eq!(self.allocator.num_used(), 0, "idle but blocks are used");
        }
    }
}

mod drafts;

#[cfg(test)]
#[path = "scheduler_tests.rs"]
mod tests;
