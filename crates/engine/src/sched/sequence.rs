//! One sequence as the scheduler sees it: its tokens, how many of them are in the KV cache,
//! and the blocks that hold them. Pure data.
//!
//! Invariants: `num_computed <= tokens.len()`; `block_table` covers at least the first
//! `num_computed` positions (`block_table.len() * block_size >= num_computed`); `block_hashes[i]`
//! is the chained hash of full block `i` and exists only for blocks whose every position is
//! computed; a waiting sequence holds no blocks and has `num_computed == 0`; a draft is only
//! proposed for a running sequence with one uncomputed token, and lives until the next schedule.

use crate::kv::prefix_cache::BlockHash;

/// Engine-wide sequence id.
pub type SeqId = u64;

/// Where a sequence is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SeqStatus {
    /// Not admitted yet, or preempted (will recompute its tokens).
    Waiting,
    /// Admitted: holds blocks and is scheduled every step.
    Running,
}

/// Scheduler state of one sequence.
#[derive(Debug, Clone)]
pub struct Sequence {
    /// Its id.
    pub id: SeqId,
    /// FCFS order key: the request's arrival number (forks inherit it).
    pub arrival: u64,
    /// Prompt followed by generated tokens.
    pub tokens: Vec<u32>,
    /// Length of the prompt prefix of `tokens`.
    pub prompt_len: usize,
    /// Tokens whose K/V are in the cache.
    pub num_computed: usize,
    /// KV blocks, in position order.
    pub block_table: Vec<u32>,
    /// Chained hashes of the full, computed blocks.
    pub block_hashes: Vec<BlockHash>,
    /// Lifecycle state.
    pub status: SeqStatus,
    /// Return logits of every prompt position (prompt logprobs); disables prefix reuse.
    pub wants_prompt_logits: bool,
    /// Sequences this one will be forked into once its prompt is computed (`best_of - 1`):
    /// slots of `max_num_seqs` held for them from admission on; 0 after the fork.
    pub reserved_forks: usize,
    /// Tokens drafted to follow `tokens` (speculative decoding), verified in the next step.
    pub draft: Vec<u32>,
}

impl Sequence {
    /// A waiting sequence for `prompt`.
    pub fn new(id: SeqId, arrival: u64, prompt: Vec<u32>, wants_prompt_logits: bool) -> Self {
        Self {
            id,
            arrival,
            prompt_len: prompt.len(),
            tokens: prompt,
            num_computed: 0,
            block_table: Vec::new(),
            block_hashes: Vec::new(),
            status: SeqStatus::Waiting,
            wants_prompt_logits,
            reserved_forks: 0,
            draft: Vec::new(),
        }
    }

    /// Generated tokens.
    pub fn output(&self) -> &[u32] {
        &self.tokens[self.prompt_len..]
    }

    /// Tokens not yet in the cache (the prompt rest, or the last sampled token).
    pub fn num_uncomputed(&self) -> usize {
        self.tokens.len() - self.num_computed
    }

    /// Sort key: oldest request first, then sequence id.
    pub fn order_key(&self) -> (u64, SeqId) {
        (self.arrival, self.id)
    }
}

/// Blocks needed to hold `tokens` positions.
pub fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}
