//! Drafts in the scheduler (speculative decoding): taking a sequence's proposed tokens, fitting
//! them into a step, and settling them once verified.
//!
//! Invariants: see the parent module's — drafted positions count as computed only once
//! accepted, and blocks holding no computed position are freed when a draft is settled.

use super::Scheduler;
use crate::sched::sequence::{SeqId, SeqStatus, blocks_for};

impl Scheduler {
    /// Proposes `draft` to follow a running sequence's tokens in the next step (which may
    /// schedule a shorter prefix of it, or none, when the budget or the free blocks run short).
    pub fn set_draft(&mut self, id: SeqId, draft: Vec<u32>) {
        if let Some(seq) = self.seqs.get_mut(&id)
            && seq.status == SeqStatus::Running
            && seq.num_uncomputed() == 1
        {
            seq.draft = draft;
        }
    }

    /// Settles a verified draft (call after the step's sampling appended its tokens): the first
    /// `accepted` drafted positions count as computed, the rest are rolled back, and blocks
    /// holding no computed position are freed. A sequence gone meanwhile is ignored.
    pub fn accept_draft(&mut self, id: SeqId, accepted: usize) {
        let bs = self.cfg.block_size;
        let Some(seq) = self.seqs.get_mut(&id) else {
            return;
        };
        seq.num_computed += accepted;
        assert!(
            seq.num_computed < seq.tokens.len(),
            "accepted drafts without their tokens: this is a bug"
        );
        while seq.block_table.len() > blocks_for(seq.num_computed, bs) {
            let b = seq.block_table.pop().expect("non-empty: this is a bug");
            self.allocator.release(b);
        }
        Self::register_full_blocks(&mut self.allocator, seq, bs);
    }

    /// How many of a decoding sequence's drafted tokens fit after its `new_len` positions: at
    /// most `budget`, and only in blocks that are free now (a draft never preempts).
    pub(super) fn draft_room(&self, id: SeqId, new_len: usize, budget: usize) -> usize {
        let seq = &self.seqs[&id];
        if seq.draft.is_empty() || seq.num_uncomputed() != 1 {
            return 0;
        }
        let free = self.allocator.num_free();
        let mut drafted = seq.draft.len().min(budget);
        while drafted > 0 && self.blocks_needed(seq, new_len + drafted) > free {
            drafted -= 1;
        }
        drafted
    }
}

#[cfg(test)]
mod tests {
    use super::super::SchedulerConfig;
    use super::*;
    use crate::model::LogitsWanted;

    fn sched(num_blocks: usize, budget: usize) -> Scheduler {
        Scheduler::new(SchedulerConfig {
            num_blocks,
            block_size: 4,
            max_num_seqs: 4,
            max_num_batched_tokens: budget,
            enable_prefix_caching: true,
        })
    }

    /// A running sequence of `prompt` tokens with its prompt computed and `next` sampled.
    fn decoding(s: &mut Scheduler, prompt: usize, next: u32) -> SeqId {
        let id = s.add((1..=prompt as u32).collect(), false);
        let st = s.schedule();
        s.commit(&st);
        s.append_token(id, next);
        id
    }

    #[test]
    fn a_rejected_draft_across_a_block_boundary_is_rolled_back_and_its_block_freed() {
        let mut s = sched(16, 100);
        let id = decoding(&mut s, 7, 70); // 8 tokens, 7 computed, 2 blocks
        s.set_draft(id, vec![71, 72, 73, 74, 75]);
        let st = s.schedule();
        assert_eq!(st.draft_lens, vec![5]);
        let chunk = &st.batch.seqs[0];
        assert_eq!(chunk.tokens, vec![70, 71, 72, 73, 74, 75]);
        assert_eq!((chunk.start_pos, chunk.logits), (7, LogitsWanted::All));
        assert_eq!(s.get(id).map(|q| q.block_table.len()), Some(4)); // positions 0..13
        s.commit(&st);
        assert_eq!(s.get(id).map(|q| q.num_computed), Some(8));
        // The model agreed with 71 and then chose 99 instead of 72.
        s.append_token(id, 71);
        s.append_token(id, 99);
        s.accept_draft(id, 1);
        let seq = s.get(id).expect("alive").clone();
        assert_eq!(seq.num_computed, 9);
        assert_eq!(
            seq.block_table.len(),
            3,
            "the block of positions 12.. is freed"
        );
        assert_eq!(
            seq.block_hashes.len(),
            2,
            "only full accepted blocks are hashed"
        );
        assert_eq!(s.allocator().num_used(), 3);
        s.check_invariants();
        // The next step computes the correction and goes on from there.
        let st = s.schedule();
        assert_eq!(
            (st.batch.seqs[0].tokens.clone(), st.draft_lens[0]),
            (vec![99], 0)
        );
        s.commit(&st);
        s.remove(id);
        s.check_invariants();
        assert_eq!(s.allocator().num_used(), 0);
    }

    #[test]
    fn a_fully_accepted_draft_counts_every_position_and_hashes_its_blocks() {
        let mut s = sched(16, 100);
        let id = decoding(&mut s, 3, 30); // 4 tokens, 3 computed
        s.set_draft(id, vec![31, 32, 33, 34]);
        let st = s.schedule();
        s.commit(&st);
        for t in [31, 32, 33, 34, 35] {
            s.append_token(id, t);
        }
        s.accept_draft(id, 4);
        let seq = s.get(id).expect("alive");
        assert_eq!((seq.num_computed, seq.tokens.len()), (8, 9));
        assert_eq!((seq.block_table.len(), seq.block_hashes.len()), (2, 2));
        s.check_invariants();
    }

    #[test]
    fn a_draft_is_cut_to_the_budget_and_the_free_blocks_and_never_preempts() {
        // Budget: the decode token plus two drafted ones.
        let mut s = sched(16, 3);
        let id = decoding(&mut s, 2, 20);
        s.set_draft(id, vec![21, 22, 23, 24]);
        assert_eq!(s.schedule().draft_lens, vec![2]);

        // Blocks: 3 of them, 2 taken by another sequence; ours has 1 block of 4 positions.
        let mut s = sched(3, 100);
        let other = decoding(&mut s, 7, 1);
        let id = decoding(&mut s, 2, 20);
        assert_eq!(s.allocator().num_free(), 0);
        s.set_draft(id, vec![21, 22, 23, 24]);
        let st = s.schedule();
        let ours = st.seq_ids.iter().position(|&x| x == id).expect("scheduled");
        assert_eq!(
            st.draft_lens[ours], 1,
            "only position 3 is free in its block"
        );
        assert!(st.preempted.is_empty() && s.get(other).is_some());
    }

    #[test]
    fn drafts_live_for_one_step_and_only_for_decoding_sequences() {
        let mut s = sched(16, 100);
        let waiting = s.add(vec![1, 2, 3], false);
        s.set_draft(waiting, vec![4]);
        assert!(s.get(waiting).expect("alive").draft.is_empty());
        let st = s.schedule();
        s.commit(&st);
        s.append_token(waiting, 5);
        s.set_draft(waiting, vec![6, 7]);
        let _ = s.schedule();
        assert!(s.get(waiting).expect("alive").draft.is_empty());
    }
}
