//! Speculative decoding in the step loop: before each schedule every decoding sequence that
//! may draft proposes tokens from its own history (n-gram lookup), and the drafts that are
//! expected to make the step faster per token, given what rows cost (`spec::cost`, learnt from
//! the steps so far) and how often each sequence's drafts hold, go to the scheduler, most
//! reliable first; after the forward pass the
//! chunk's rows, one per position, are sampled in order exactly as plain decoding would sample
//! them, and the draft holds as long as each sampled token is the drafted one.
//!
//! Why this is exact: row `j` is the model's distribution after the real tokens and drafts
//! `1..j`, which are the real tokens while they agree, so every emitted token is drawn from the
//! same distribution plain decoding would use, with the same sampler state (penalties, grammar,
//! `min_tokens` ban, RNG: one draw per emitted token, in order). For a draft that proposes one
//! token `d` with certainty, the rejection-sampling rule accepts `d` with probability `p(d)`
//! and otherwise draws from `p` without `d`; drawing from `p` and keeping the draft only if the
//! draw is `d` has exactly that law. With batch-invariant logits a seeded or greedy sequence
//! therefore gives bitwise the same tokens and logprobs with or without speculation.
//!
//! Invariants: a draft is proposed only for a live, decoding choice with room left under its
//! `max_tokens` (so drafted positions never pass the context limit); once verified, the
//! scheduler is told how many drafted positions were accepted (the rest are rolled back) unless
//! the choice finished; the counters count every verified draft.

use super::engine::Engine;
use crate::api::types::Failure;
use crate::sched::scheduler::ScheduledStep;
use crate::sched::sequence::SeqStatus;
use crate::spec::cost::draft_pays;

impl Engine {
    /// Proposes this step's drafts to the scheduler.
    pub(super) fn propose_drafts(&mut self) {
        let Some(proposer) = self.proposer else {
            return;
        };
        // One pass: the step's decoding sequences and prompt rows (what the cost model weighs
        // drafts against), and the drafts proposed, each with where its choice lives.
        let mut drafts = Vec::new();
        let (mut decoding, mut rows) = (0usize, 0usize);
        for (&key, req) in self.requests.iter_mut().filter(|(_, r)| r.forked) {
            let max_tokens = req.req.stop.max_tokens;
            for (slot, choice) in req.choices.iter_mut().enumerate() {
                let Some(seq) = self.sched.get(choice.seq) else {
                    continue;
                };
                if choice.finish.is_some() || seq.status != SeqStatus::Running {
                    continue;
                }
                rows += seq.num_uncomputed();
                if seq.num_uncomputed() != 1 {
                    continue;
                }
                decoding += 1;
                // The token this step samples anyway is not drafted: room for one less.
                let room = max_tokens.saturating_sub(choice.num_tokens + 1);
                if room == 0 || !choice.drafting.may_draft() {
                    continue;
                }
                let room = choice.drafting.draft_len(room.min(proposer.max_len()));
                let draft = proposer.propose(&seq.tokens, room);
                if !draft.is_empty() {
                    let acceptance = f64::from(choice.drafting.acceptance());
                    drafts.push((acceptance, choice.seq, (key, slot), draft));
                }
            }
        }
        drafts.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let free_rows = self.step_cost.free_rows();
        let by_batch_size = proposer.disable_by_batch_size();
        let mut tokens = decoding as f64;
        let mut rows = rows.min(self.sched.config().max_num_batched_tokens) as f64;
        for (acceptance, id, (key, slot), draft) in drafts {
            let pays = match by_batch_size {
                Some(limit) => decoding < limit,
                None => draft_pays(acceptance, tokens, rows, free_rows),
            };
            if !pays {
                if let Some(choice) = self
                    .requests
                    .get_mut(&key)
                    .and_then(|r| r.choices.get_mut(slot))
                {
                    choice.drafting.withheld();
                }
                continue;
            }
            tokens += acceptance * draft.len() as f64;
            rows += draft.len() as f64;
            self.sched.set_draft(id, draft);
        }
    }

    /// Feeds a decode-only step's time to the cost model (prompt chunks have rows without
    /// logits, which cost less: they would blur the fit).
    pub(super) fn observe_step_cost(&mut self, step: &ScheduledStep, secs: f64) {
        if self.proposer.is_none() {
            return;
        }
        let decode_only = step
            .batch
            .seqs
            .iter()
            .enumerate()
            .all(|(i, chunk)| chunk.tokens.len() == 1 + step.draft_len(i));
        if decode_only {
            self.step_cost.observe(step.batch.num_tokens(), secs);
        }
    }

    /// Verifies a chunk that ended in `draft`: samples its rows in order while the sampled
    /// token is the drafted one, then settles the draft with the scheduler.
    pub(super) fn verify_draft(
        &mut self,
        key: u64,
        slot: usize,
        draft: &[u32],
        rows: &[f32],
        vocab: usize,
    ) -> Result<(), Failure> {
        let seq = self.requests[&key].choices[slot].seq;
        let mut accepted = 0;
        for (j, row) in rows.chunks_exact(vocab).enumerate() {
            let token = self.sample_choice(key, slot, row)?;
            let agrees = token.is_some() && token == draft.get(j).copied();
            accepted += usize::from(agrees);
            let finished = self.requests[&key].choices[slot].finish.is_some();
            if finished || !agrees {
                break;
            }
        }
        self.spec_drafts += 1;
        self.spec_draft_tokens += draft.len() as u64;
        self.spec_accepted_tokens += accepted as u64;
        if let Some(choice) = self
            .requests
            .get_mut(&key)
            .and_then(|r| r.choices.get_mut(slot))
        {
            choice.drafting.record(draft.len(), accepted);
            if choice.finish.is_none() {
                self.sched.accept_draft(seq, accepted);
            }
        }
        Ok(())
    }
}
