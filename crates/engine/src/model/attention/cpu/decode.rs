//! Attention for decode tokens and short chunks on the CPU, flash-decoding style: one task per
//! (token, head, key segment), so that a single sequence's long context is split over every
//! thread; each task runs the tile kernel over its segment from scratch, and the segments'
//! softmax states are then merged per (token, head) left to right — the same definition the
//! prefill path computes (see `attention_tile`).

use super::Step;
use crate::kernels::cpu::attention_tile::{
    SoftmaxState, attend_segment, finish, merge, padded, segment_len,
};
use crate::kernels::cpu::isa::Isa;
use crate::kernels::cpu::kv_elem::KvElem;
use crate::kernels::cpu::thread_team;
use crate::kv::storage::Pools;

/// One task: a key segment of one (token, head).
#[derive(Clone, Copy)]
struct Task {
    token: usize,
    head: usize,
    keys: (usize, usize),
}

/// Fills the output rows (`n_heads · head_dim` each) of the slots listed in `tokens`.
pub(super) fn attend_tokens<T: KvElem>(
    isa: Isa,
    step: &Step<'_>,
    pools: &Pools<T>,
    tokens: &[usize],
    out: &mut [f32],
) {
    if tokens.is_empty() {
        return;
    }
    let (nh, hd) = (step.geom.n_heads, step.geom.head_dim);
    let seg = segment_len(step.geom.block_size);
    let stride = padded(hd);
    let mut tasks = Vec::new();
    for &t in tokens {
        let keys = step.slots[t].pos + 1;
        for head in 0..nh {
            for start in (0..keys).step_by(seg) {
                let keys = (start, (start + seg).min(keys));
                tasks.push(Task {
                    token: t,
                    head,
                    keys,
                });
            }
        }
    }
    let mut states = vec![SoftmaxState::EMPTY; tasks.len()];
    let mut accs = vec![0f32; tasks.len() * stride];
    let mut work: Vec<((&mut [f32], &mut SoftmaxState), &Task)> = accs
        .chunks_mut(stride)
        .zip(states.iter_mut())
        .zip(tasks.iter())
        .collect();
    thread_team::for_each_mut(&mut work, 1, |((acc, state), task)| {
        let mut query = vec![0f32; hd];
        step.scaled_query(task.token, task.head, &mut query);
        let head = step.head(pools, task.token, task.head);
        let pos = step.slots[task.token].pos;
        let keys = task.keys.0..task.keys.1;
        attend_segment(
            isa,
            &head,
            &query,
            pos,
            keys,
            std::slice::from_mut(&mut **state),
            acc,
        );
    });
    // Tasks of one (token, head) are consecutive and in segment order.
    let mut total_acc = vec![0f32; stride];
    let mut i = 0;
    while i < tasks.len() {
        let (token, head) = (tasks[i].token, tasks[i].head);
        let mut total = SoftmaxState::EMPTY;
        while i < tasks.len() && (tasks[i].token, tasks[i].head) == (token, head) {
            merge(
                &mut total,
                &mut total_acc,
                states[i],
                &accs[i * stride..][..stride],
            );
            i += 1;
        }
        let row = &mut out[(token * nh + head) * hd..][..hd];
        finish(total, &total_acc, row);
    }
}
