//! The description of one forward step: for each sequence, a chunk of new tokens and the KV
//! blocks that hold (and will hold) its context. Built by the step loop from the scheduler's
//! decisions; read by the model. Plain data, no tensors.

/// Which logits a sequence needs back from this step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsWanted {
    /// None (a prompt chunk that is not the last one).
    None,
    /// The last new position only (sampling the next token).
    Last,
    /// Every new position (prompt logprobs), in order.
    All,
}

impl LogitsWanted {
    /// Number of logits rows this chunk contributes.
    pub fn rows(self, num_new_tokens: usize) -> usize {
        match self {
            Self::None => 0,
            Self::Last => 1,
            Self::All => num_new_tokens,
        }
    }
}

/// New tokens of one sequence in a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqChunk {
    /// The tokens to run (≥ 1).
    pub tokens: Vec<u32>,
    /// Absolute position of `tokens[0]`, i.e. how many tokens of this sequence are already in
    /// the KV cache and are attended to.
    pub start_pos: usize,
    /// KV block ids covering positions `0 .. start_pos + tokens.len()`, in order.
    pub block_table: Vec<u32>,
    /// Which logits to return.
    pub logits: LogitsWanted,
}

impl SeqChunk {
    /// Total context length once this chunk is written.
    pub fn context_len(&self) -> usize {
        self.start_pos + self.tokens.len()
    }
}

/// A mixed batch: prefill chunks and decode tokens of many sequences together.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelBatch {
    /// One entry per scheduled sequence. Logits rows come back in this order.
    pub seqs: Vec<SeqChunk>,
}

impl ModelBatch {
    /// Total new tokens.
    pub fn num_tokens(&self) -> usize {
        self.seqs.iter().map(|s| s.tokens.len()).sum()
    }

    /// Total logits rows the forward pass returns.
    pub fn num_logits_rows(&self) -> usize {
        self.seqs
            .iter()
            .map(|s| s.logits.rows(s.tokens.len()))
            .sum()
    }
}
