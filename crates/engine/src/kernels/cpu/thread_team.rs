//! A team of spinning threads for the short parallel regions of a CPU forward pass.
//!
//! A decode step forks and joins some fifty times (every matmul, attention, GELU), each region
//! a few tens of microseconds. An idle rayon thread sleeps after a few dozen rounds of looking
//! for work, so each fork has to wake it (a futex round trip) and for short regions it arrives
//! when the work is nearly done: part of every matmul then streams its weights on one thread.
//! The team's threads instead spin on a slot of their own for [`SPIN_FOR`] after each region,
//! as llama.cpp's threads do, and only then park, so between requests they burn nothing.
//!
//! One region runs at a time: a caller that finds the team busy (another thread's region, or
//! a region started from inside a task) runs its tasks through rayon instead. A region uses as
//! many threads as the calling rayon pool has (`--threads`), the caller being one of them.
//!
//! Invariants: a job lives on its caller's stack and is handed to each helper through that
//! helper's slot; the caller returns only after every helper it handed the job to has counted
//! itself out, and a helper touches a job only between taking it from its slot and counting
//! out. Task panics are caught on the thread that ran them and resumed on the caller.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::ptr;
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, TryLockError};
use std::thread::Thread;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use super::isa::{detect_isa, with_isa};

/// How long a helper keeps spinning for its next job before it parks: meant to outlast the
/// gaps between the regions of a forward pass (tens of microseconds) with room to spare.
const SPIN_FOR: Duration = Duration::from_millis(2);
/// Elements per task of [`map_elements`]: enough to amortise handing out a task.
pub(crate) const ELEMENTS_PER_TASK: usize = 16 * 1024;
/// Spins between two looks at the clock.
const SPINS_PER_CLOCK_CHECK: u32 = 256;

/// Runs `task(i)` for every `i < n_tasks`, spread over the calling pool's threads.
pub(crate) fn run(n_tasks: usize, task: impl Fn(usize) + Sync) {
    let threads = rayon::current_num_threads();
    if n_tasks <= 1 || threads <= 1 {
        (0..n_tasks).for_each(task);
        return;
    }
    let mut team = match TEAM.try_lock() {
        Ok(team) => team,
        // A panic never unwinds through a held lock (it is resumed after the unlock), but a
        // poisoned team is still a working one.
        Err(TryLockError::Poisoned(poisoned)) => poisoned.into_inner(),
        Err(TryLockError::WouldBlock) => {
            (0..n_tasks).into_par_iter().for_each(&task);
            return;
        }
    };
    let wanted = (threads - 1).min(n_tasks - 1);
    while team.len() < wanted {
        match Helper::spawn(team.len()) {
            Some(helper) => team.push(helper),
            None => break,
        }
    }
    let helpers = &team[..wanted.min(team.len())];
    let job = Job::new(n_tasks, &task, helpers.len());
    let job_ptr = ptr::from_ref(&job).cast_mut();
    for helper in helpers {
        helper.give(job_ptr);
    }
    job.work(0);
    job.wait_for_helpers();
    drop(team);
    if let Some(panic) = job
        .panic
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner)
    {
        resume_unwind(panic);
    }
}

/// Calls `f` on every item, `per_task` consecutive items per task, spread over the calling
/// pool's threads.
pub(crate) fn for_each_mut<I: Send>(items: &mut [I], per_task: usize, f: impl Fn(&mut I) + Sync) {
    let per_task = per_task.max(1);
    let len = items.len();
    let base = SendPtr(items.as_mut_ptr());
    run(len.div_ceil(per_task), |t| {
        let first = t * per_task;
        let count = per_task.min(len - first);
        // SAFETY: task `t` alone gets items `first..first + count` (tasks are numbered once
        // each), which lie inside `items`, borrowed mutably for the whole call.
        let part = unsafe { std::slice::from_raw_parts_mut(base.get().add(first), count) };
        part.iter_mut().for_each(&f);
    });
}

/// `f(i)` for every `i < n`, computed over the calling pool's threads, in order.
pub(crate) fn map<R: Send>(n: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let mut slots: Vec<(usize, Option<R>)> = (0..n).map(|i| (i, None)).collect();
    for_each_mut(&mut slots, 1, |(i, slot)| *slot = Some(f(*i)));
    slots
        .into_iter()
        .map(|(_, r)| r.expect("every task ran"))
        .collect()
}

/// `f` of every element of `input`, in tasks of [`ELEMENTS_PER_TASK`] over the calling pool's
/// threads, compiled for the CPU's instruction set (so its loop vectorises).
pub(crate) fn map_elements<T: Sync, U: Send + Copy + Default>(
    input: &[T],
    f: impl Fn(&T) -> U + Sync,
) -> Vec<U> {
    let mut out = vec![U::default(); input.len()];
    let isa = detect_isa();
    let mut chunks: Vec<(&mut [U], &[T])> = out
        .chunks_mut(ELEMENTS_PER_TASK)
        .zip(input.chunks(ELEMENTS_PER_TASK))
        .collect();
    for_each_mut(&mut chunks, 1, |(out, input)| {
        with_isa(
            isa,
            #[inline(always)]
            || {
                for (o, x) in out.iter_mut().zip(input.iter()) {
                    *o = f(x);
                }
            },
        )
    });
    out
}

/// A pointer that tasks on other threads may use; what makes each use sound is said there.
struct SendPtr<T>(*mut T);
impl<T> Clone for SendPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for SendPtr<T> {}
// SAFETY: only used by `for_each_mut`, whose tasks touch disjoint items of a slice of `Send`
// items borrowed for the whole call.
unsafe impl<T: Send> Send for SendPtr<T> {}
unsafe impl<T: Send> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the `Sync` wrapper, not the raw field).
    fn get(self) -> *mut T {
        self.0
    }
}

/// The helpers started so far; holding the lock is owning the team for one region.
static TEAM: Mutex<Vec<Arc<Helper>>> = Mutex::new(Vec::new());

/// One region's work. The tasks are cut into one contiguous share per thread (so that each
/// thread streams its own run of weight rows, which the prefetchers follow); a thread that
/// finishes its share takes what is left of the others'.
struct Job<'a> {
    task: &'a (dyn Fn(usize) + Sync),
    shares: Vec<Share>,
    /// Helpers that have the job and have not counted out yet.
    pending: AtomicUsize,
    /// The first panic a task raised.
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

/// One thread's tasks `next..end`; on its own cache line, as its owner claims from it often.
#[repr(align(64))]
struct Share {
    next: AtomicUsize,
    end: usize,
}

impl<'a> Job<'a> {
    fn new(n_tasks: usize, task: &'a (dyn Fn(usize) + Sync), helpers: usize) -> Self {
        let threads = helpers + 1;
        let shares = (0..threads)
            .map(|t| Share {
                next: AtomicUsize::new(n_tasks * t / threads),
                end: n_tasks * (t + 1) / threads,
            })
            .collect();
        Self {
            task,
            shares,
            pending: AtomicUsize::new(helpers),
            panic: Mutex::new(None),
        }
    }

    /// Runs the tasks of share `own`, then helps with the others', until none is left (or a
    /// task panicked).
    fn work(&self, own: usize) {
        let threads = self.shares.len();
        for share in (0..threads).map(|t| &self.shares[(own + t) % threads]) {
            loop {
                let i = share.next.fetch_add(1, Ordering::Relaxed);
                if i >= share.end {
                    break;
                }
                if let Err(panic) = catch_unwind(AssertUnwindSafe(|| (self.task)(i))) {
                    for share in &self.shares {
                        share.next.store(share.end, Ordering::Relaxed);
                    }
                    let mut first = self.panic.lock().unwrap_or_else(PoisonError::into_inner);
                    first.get_or_insert(panic);
                    return;
                }
            }
        }
    }

    /// Spins until every helper counted out (they are running, so this is short).
    fn wait_for_helpers(&self) {
        let mut spins = 0u32;
        while self.pending.load(Ordering::Acquire) != 0 {
            spins = spins.wrapping_add(1);
            if spins.is_multiple_of(SPINS_PER_CLOCK_CHECK) {
                // A helper may have lost its core to another process: let it run.
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    }
}

/// A helper thread and the slot it takes jobs from.
struct Helper {
    /// The job handed over and not yet taken (type-erased `*const Job<'_>`), or null.
    slot: AtomicPtr<()>,
    /// Its share of every job: the caller has share 0, helper `i` share `i + 1`.
    share: usize,
    /// Set while the thread is parked (or about to park).
    parked: AtomicBool,
    thread: Thread,
}

impl Helper {
    /// Starts helper `index`; `None` if the thread cannot be started (the region then runs
    /// with the helpers it has).
    fn spawn(index: usize) -> Option<Arc<Self>> {
        let (sent, started) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name(format!("mpt-team-{index}"))
            .spawn(move || {
                let me = Arc::new(Self {
                    slot: AtomicPtr::new(ptr::null_mut()),
                    share: index + 1,
                    parked: AtomicBool::new(false),
                    thread: std::thread::current(),
                });
                if sent.send(Arc::clone(&me)).is_ok() {
                    me.serve();
                }
            })
            .ok()?;
        started.recv().ok()
    }

    /// Hands `job` to this helper, waking it if it parked.
    fn give(&self, job: *mut Job<'_>) {
        self.slot.store(job.cast(), Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) {
            self.thread.unpark();
        }
    }

    /// The helper's loop: take a job, work on it, count out, wait for the next.
    fn serve(&self) {
        loop {
            let job = self.next_job();
            // SAFETY: the job's caller waits for this helper's count-out before the job (on
            // its stack) goes away, and nothing here touches it after `fetch_sub`.
            let job = unsafe { &*job.cast::<Job<'_>>() };
            job.work(self.share);
            job.pending.fetch_sub(1, Ordering::Release);
        }
    }

    /// Spins for [`SPIN_FOR`] waiting for a job, then parks until one comes.
    fn next_job(&self) -> *mut () {
        let mut since = Instant::now();
        let mut spins = 0u32;
        loop {
            // Look without writing, so the caller's cache line is not pulled back and forth.
            if !self.slot.load(Ordering::Relaxed).is_null() {
                return self.slot.swap(ptr::null_mut(), Ordering::Acquire);
            }
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(SPINS_PER_CLOCK_CHECK) {
                std::hint::spin_loop();
                continue;
            }
            if since.elapsed() < SPIN_FOR {
                continue;
            }
            // Announce the park, then look once more: a job given after this store sees
            // `parked` and unparks; one given before it is in the slot now.
            self.parked.store(true, Ordering::SeqCst);
            if self.slot.load(Ordering::SeqCst).is_null() {
                std::thread::park();
            }
            self.parked.store(false, Ordering::SeqCst);
            since = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU64;

    use super::*;

    fn in_pool<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> R {
        rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap()
            .install(f)
    }

    #[test]
    fn every_task_runs_exactly_once() {
        for threads in [1, 2, 3] {
            for n in [0, 1, 2, 7, 1000] {
                let counts: Vec<AtomicU64> = (0..n).map(|_| AtomicU64::new(0)).collect();
                in_pool(threads, || {
                    run(n, |i| {
                        counts[i].fetch_add(1, Ordering::Relaxed);
                    })
                });
                assert!(
                    counts.iter().all(|c| c.load(Ordering::Relaxed) == 1),
                    "{threads} threads, {n} tasks"
                );
            }
        }
    }

    #[test]
    fn helpers_take_tasks_and_see_the_callers_data() {
        // With two threads and tasks that wait for each other, the region finishes only if
        // a helper really runs tasks beside the caller.
        let seen = AtomicUsize::new(0);
        let threads_used = Mutex::new(std::collections::HashSet::new());
        in_pool(2, || {
            run(2, |_| {
                threads_used
                    .lock()
                    .unwrap()
                    .insert(std::thread::current().id());
                seen.fetch_add(1, Ordering::SeqCst);
                let start = Instant::now();
                while seen.load(Ordering::SeqCst) < 2 && start.elapsed() < Duration::from_secs(30) {
                    std::hint::spin_loop();
                }
            })
        });
        assert_eq!(seen.load(Ordering::SeqCst), 2);
        assert_eq!(threads_used.lock().unwrap().len(), 2);
    }

    #[test]
    fn many_regions_in_a_row_and_after_the_helpers_parked() {
        in_pool(2, || {
            for round in 0..2000usize {
                let v = map(17, |i| i * round);
                assert_eq!(v, (0..17).map(|i| i * round).collect::<Vec<_>>());
            }
            std::thread::sleep(SPIN_FOR * 3);
            assert_eq!(map(5, |i| i + 1), vec![1, 2, 3, 4, 5]);
        });
    }

    #[test]
    fn nested_and_concurrent_regions_fall_back_and_finish() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|s| {
            for _ in 0..4 {
                s.spawn(|| {
                    in_pool(2, || {
                        run(8, |_| {
                            run(8, |_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            })
                        })
                    })
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 8 * 8);
    }

    #[test]
    fn for_each_mut_gives_each_item_once() {
        let mut items: Vec<u32> = (0..1001).collect();
        in_pool(2, || for_each_mut(&mut items, 10, |x| *x *= 2));
        assert_eq!(items, (0..1001).map(|x| x * 2).collect::<Vec<_>>());
    }

    #[test]
    fn a_task_panic_reaches_the_caller_and_the_team_still_works() {
        let caught = in_pool(2, || {
            catch_unwind(|| {
                run(64, |i| {
                    if i == 40 {
                        panic!("task 40 failed");
                    }
                })
            })
        });
        let panic = caught.expect_err("the panic is resumed on the caller");
        assert_eq!(panic.downcast_ref::<&str>(), Some(&"task 40 failed"));
        assert_eq!(in_pool(2, || map(3, |i| i)), vec![0, 1, 2]);
    }
}
