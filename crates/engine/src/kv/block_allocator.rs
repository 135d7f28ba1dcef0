//! KV block bookkeeping: free list, reference counts and the prefix cache. Pure data; the
//! tensors live in `KvCache`, which only ever sees block ids.
//!
//! Invariants (checked by [`BlockAllocator::check_invariants`] in tests): every block is in
//! exactly one state — *used* (refcount > 0), *free* (refcount 0, on the free list, no hash) or
//! *evictable* (refcount 0, carries a prefix-cache hash, in the LRU); hence
//! `num_free() + num_used() == num_total()`, where `num_free` counts evictable blocks too,
//! because allocation reclaims them on demand.

use super::prefix_cache::{BlockHash, PrefixCache};

/// Allocates KV blocks and tracks who references them.
#[derive(Debug)]
pub struct BlockAllocator {
    refcount: Vec<u32>,
    /// Never-cached free blocks; popped from the end (lowest ids first at start).
    free: Vec<u32>,
    cache: PrefixCache,
    caching: bool,
}

impl BlockAllocator {
    /// A pool of `num_blocks` free blocks; `caching` enables prefix reuse.
    pub fn new(num_blocks: usize, caching: bool) -> Self {
        let num_blocks = u32::try_from(num_blocks).expect("block count fits in u32: this is a bug");
        Self {
            refcount: vec![0; num_blocks as usize],
            free: (0..num_blocks).rev().collect(),
            cache: PrefixCache::default(),
            caching,
        }
    }

    /// Blocks in the pool.
    pub fn num_total(&self) -> usize {
        self.refcount.len()
    }

    /// Blocks that can be allocated now (free plus evictable cached ones).
    pub fn num_free(&self) -> usize {
        self.free.len() + self.cache.num_evictable()
    }

    /// Blocks referenced by at least one sequence.
    pub fn num_used(&self) -> usize {
        self.num_total() - self.num_free()
    }

    /// Whether prefix caching is on.
    pub fn caching(&self) -> bool {
        self.caching
    }

    /// References to `block`.
    pub fn refcount(&self, block: u32) -> u32 {
        self.refcount[block as usize]
    }

    /// Takes a block with refcount 1, evicting the least recently used cached block if no
    /// plain free block is left.
    pub fn allocate(&mut self) -> Option<u32> {
        let block = match self.free.pop() {
            Some(b) => b,
            None => self.cache.evict_lru()?,
        };
        debug_assert_eq!(
            self.refcount[block as usize], 0,
            "allocated a used block: this is a bug"
        );
        self.refcount[block as usize] = 1;
        Some(block)
    }

    /// Adds a reference (a fork sharing the block).
    pub fn incref(&mut self, block: u32) {
        let rc = &mut self.refcount[block as usize];
        assert!(*rc > 0, "incref of a free block {block}: this is a bug");
        *rc += 1;
    }

    /// Drops a reference; at zero the block becomes free, or evictable if it is cached.
    pub fn release(&mut self, block: u32) {
        let rc = &mut self.refcount[block as usize];
        assert!(*rc > 0, "double free of block {block}: this is a bug");
        *rc -= 1;
        if *rc == 0 {
            if self.cache.is_cached(block) {
                self.cache.make_evictable(block);
            } else {
                self.free.push(block);
            }
        }
    }

    /// Drops one reference to each block.
    pub fn release_all(&mut self, blocks: &[u32]) {
        for &b in blocks {
            self.release(b);
        }
    }

    /// The cached block holding `hash`, if any, without taking a reference.
    pub fn peek_cached(&self, hash: BlockHash) -> Option<u32> {
        if self.caching {
            self.cache.get(hash)
        } else {
            None
        }
    }

    /// Takes a reference to a cached block found by [`Self::peek_cached`].
    pub fn acquire_cached(&mut self, block: u32) {
        if self.refcount[block as usize] == 0 {
            self.cache.touch(block);
        }
        self.refcount[block as usize] += 1;
    }

    /// Whether taking a reference to `block` would consume allocatable capacity
    /// (it is evictable now).
    pub fn is_evictable(&self, block: u32) -> bool {
        self.cache.is_evictable(block)
    }

    /// Records that the full, referenced `block` holds the prefix identified by `hash`.
    pub fn register(&mut self, block: u32, hash: BlockHash) {
        if self.caching {
            debug_assert!(
                self.refcount(block) > 0,
                "registering a free block: this is a bug"
            );
            self.cache.insert(hash, block);
        }
    }

    /// Panics if a block is in more or fewer than one state (tests and debug checks).
    pub fn check_invariants(&self) {
        let mut on_free = vec![false; self.num_total()];
        for &b in &self.free {
            assert!(!on_free[b as usize], "block {b} twice on the free list");
            on_free[b as usize] = true;
        }
        for (b, &rc) in self.refcount.iter().enumerate() {
            let b32 = b as u32;
            let states = [rc > 0, on_free[b], self.cache.is_evictable(b32)];
            assert_eq!(
                states.iter().filter(|s| **s).count(),
                1,
                "block {b} states {states:?}"
            );
            if self.cache.is_evictable(b32) || on_free[b] {
                assert_eq!(
                    on_free[b],
                    !self.cache.is_cached(b32),
                    "block {b} cache state"
                );
            }
        }
        assert_eq!(self.num_free() + self.num_used(), self.num_total());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocate_release_and_refcounts() {
        let mut a = BlockAllocator::new(3, false);
        let x = a.allocate().expect("free");
        let y = a.allocate().expect("free");
        assert_ne!(x, y);
        a.incref(x);
        assert_eq!((a.num_used(), a.num_free()), (2, 1));
        a.release(x);
        assert_eq!(a.num_used(), 2, "x still referenced once");
        a.release(x);
        a.release(y);
        assert_eq!((a.num_used(), a.num_free()), (0, 3));
        a.check_invariants();
        let all: Vec<_> = (0..3).map(|_| a.allocate().expect("free")).collect();
        assert_eq!(all.len(), 3);
        assert!(a.allocate().is_none(), "pool exhausted");
        a.check_invariants();
    }

    #[test]
    #[should_panic(expected = "double free")]
    fn double_free_is_caught() {
        let mut a = BlockAllocator::new(1, false);
        let x = a.allocate().expect("free");
        a.release(x);
        a.release(x);
    }

    #[test]
    fn cached_blocks_are_reused_then_evicted_lru() {
        let mut a = BlockAllocator::new(2, true);
        let x = a.allocate().expect("free");
        let y = a.allocate().expect("free");
        a.register(x, 11);
        a.register(y, 22);
        a.release(y);
        a.release(x); // x freed last: more recently used
        assert_eq!(a.num_free(), 2, "evictable blocks count as free");
        a.check_invariants();
        assert_eq!(a.peek_cached(11), Some(x));
        a.acquire_cached(x);
        assert_eq!((a.refcount(x), a.num_free()), (1, 1));
        a.check_invariants();
        // Pool dry: the evictable y is reclaimed and forgets its hash.
        assert_eq!(a.allocate(), Some(y));
        assert_eq!(a.peek_cached(22), None);
        assert_eq!(a.peek_cached(11), Some(x));
        a.check_invariants();
    }

    #[test]
    fn caching_disabled_never_hits() {
        let mut a = BlockAllocator::new(1, false);
        let x = a.allocate().expect("free");
        a.register(x, 5);
        a.release(x);
        assert_eq!(a.peek_cached(5), None);
        a.check_invariants();
    }
}
