//! When and how much a sequence drafts. Each sequence keeps an estimate of the share of its
//! drafted tokens the model accepts (recent drafts weigh most; with no evidence it is ½). A
//! draft that gains nothing, when the estimate is below ½, pauses drafting for a while, longer
//! after each further failure, and a sequence whose drafts hold poorly drafts fewer tokens, so workloads where lookup finds
//! nothing useful pay for a few short drafts and then almost nothing.
//!
//! Invariants: the pause and the draft length depend only on the sequence's own drafts and
//! accepted counts, and on how often its draft was held back (what else runs may hold a draft
//! back: see `spec::cost`; outputs never depend on either); a pause counts the sequence's own
//! decode steps; a draft that gains a token resets the pause length to its minimum.

/// Weight an older draft keeps at each newer one in the acceptance estimate.
const DECAY: f32 = 0.7;
/// Weight the evidence keeps at each draft held back for cost, so that the estimate drifts
/// back to ½ and is put to the test again rather than frozen by one bad draft.
const WITHHELD_DECAY: f32 = 0.9;
/// First pause after a draft that gained nothing (with the estimate below ½), in decode steps; it doubles with each
/// further such draft, up to [`MAX_PAUSE`].
const MIN_PAUSE: u32 = 8;
/// Longest pause, in decode steps.
const MAX_PAUSE: u32 = 256;

/// Drafting state of one sequence.
#[derive(Debug, Clone, PartialEq)]
pub struct DraftTracker {
    /// Accepted drafted tokens, decayed.
    accepted: f32,
    /// Drafted tokens, decayed.
    drafted: f32,
    /// Decode steps left without drafting.
    paused: u32,
    /// Length of the next pause.
    next_pause: u32,
}

impl Default for DraftTracker {
    fn default() -> Self {
        Self {
            accepted: 0.0,
            drafted: 0.0,
            paused: 0,
            next_pause: MIN_PAUSE,
        }
    }
}

impl DraftTracker {
    /// Whether the sequence drafts in this decode step (call once per decode step).
    pub fn may_draft(&mut self) -> bool {
        if self.paused > 0 {
            self.paused -= 1;
            return false;
        }
        true
    }

    /// The estimated share of drafted tokens accepted, in (0, 1).
    pub fn acceptance(&self) -> f32 {
        (self.accepted + 1.0) / (self.drafted + 2.0)
    }

    /// How many of at most `max` tokens to draft: all of them while at least half are
    /// accepted, fewer as the estimate falls (a failed draft costs one row per token).
    pub fn draft_len(&self, max: usize) -> usize {
        let share = (2.0 * self.acceptance()).min(1.0);
        ((max as f32 * share) as usize).clamp(1, max.max(1))
    }

    /// Records a draft that was proposed but held back (it did not pay at this batch size).
    pub fn withheld(&mut self) {
        self.accepted *= WITHHELD_DECAY;
        self.drafted *= WITHHELD_DECAY;
    }

    /// Records a verified draft of `drafted` tokens of which the first `accepted` were right.
    pub fn record(&mut self, drafted: usize, accepted: usize) {
        if drafted == 0 {
            return;
        }
        self.accepted = self.accepted * DECAY + accepted as f32;
        self.drafted = self.drafted * DECAY + drafted as f32;
        if accepted == 0 && self.acceptance() < 0.5 {
            self.paused = self.next_pause;
            self.next_pause = (self.next_pause * 2).min(MAX_PAUSE);
        } else {
            self.next_pause = MIN_PAUSE;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Steps a tracker through `steps` decode steps with drafts of 4 tokens; returns how many
    /// drafts it made and how many tokens they had.
    fn run(t: &mut DraftTracker, steps: usize, accept: impl Fn(usize) -> usize) -> (usize, usize) {
        let (mut drafts, mut tokens) = (0, 0);
        for _ in 0..steps {
            if t.may_draft() {
                let n = t.draft_len(4);
                drafts += 1;
                tokens += n;
                t.record(n, accept(n));
            }
        }
        (drafts, tokens)
    }

    #[test]
    fn a_sequence_whose_drafts_fail_drafts_rarely_and_briefly() {
        let mut t = DraftTracker::default();
        let (first, _) = run(&mut t, 100, |_| 0);
        let (later, tokens) = run(&mut t, 1000, |_| 0);
        assert!(first <= 4, "drafted {first} times in 100 steps");
        assert!(later <= 5, "drafted {later} times in 1000 steps");
        assert!(later > 0, "it keeps trying now and then");
        assert_eq!(tokens, later, "failing drafts shrink to one token");
    }

    #[test]
    fn a_sequence_whose_drafts_mostly_succeed_always_drafts_in_full() {
        let mut t = DraftTracker::default();
        assert_eq!(run(&mut t, 200, |n| n.div_ceil(2)), (200, 800));
    }

    #[test]
    fn success_after_failures_shortens_the_next_pause() {
        let mut t = DraftTracker::default();
        run(&mut t, 400, |_| 0);
        assert!(t.next_pause > MIN_PAUSE);
        while !t.may_draft() {}
        t.record(1, 1);
        assert_eq!((t.next_pause, t.paused), (MIN_PAUSE, 0));
    }

    #[test]
    fn an_estimate_held_back_drifts_back_to_even() {
        let mut t = DraftTracker::default();
        assert_eq!(t.acceptance(), 0.5);
        t.record(4, 0);
        let low = t.acceptance();
        for _ in 0..50 {
            t.withheld();
        }
        assert!(t.acceptance() > low && t.acceptance() < 0.5);
        assert!(t.acceptance() > 0.49);
    }

    #[test]
    fn one_miss_among_many_hits_does_not_pause() {
        let mut t = DraftTracker::default();
        run(&mut t, 20, |n| n);
        t.record(4, 0);
        assert!(t.may_draft());
    }

    #[test]
    fn nothing_drafted_changes_nothing() {
        let mut t = DraftTracker::default();
        t.record(0, 0);
        assert_eq!(t, DraftTracker::default());
    }
}
