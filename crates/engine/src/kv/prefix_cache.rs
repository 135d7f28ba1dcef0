//! Prefix cache: maps the hash of a full KV block (its tokens chained with the hash of every
//! token before it) to the block that holds it, and orders cached blocks nobody references in
//! least-recently-used order so they can be evicted when the pool runs dry.
//!
//! Invariants: a block has at most one hash and a hash at most one block (`by_hash` and
//! `hash_of` are inverse maps); a block is in the LRU order iff it has a hash and its refcount
//! (kept by the allocator) is 0. Only full blocks are ever registered, and full blocks are never
//! written again, so a cached block's contents always match its hash.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};

/// Identity of a full block's contents and of everything before it.
pub type BlockHash = u64;

/// Hash of a full block given its parent's hash (`None` for the first block).
///
/// SipHash with fixed keys: deterministic across runs; 64 bits make an accidental collision
/// between two different prefixes in one server's lifetime vanishingly unlikely.
pub fn block_hash(parent: Option<BlockHash>, tokens: &[u32]) -> BlockHash {
    let mut hasher = std::hash::DefaultHasher::new();
    parent.hash(&mut hasher);
    tokens.hash(&mut hasher);
    hasher.finish()
}

/// Chained hashes of every full block of `tokens`.
pub fn block_hashes(tokens: &[u32], block_size: usize) -> Vec<BlockHash> {
    let mut parent = None;
    tokens
        .chunks_exact(block_size)
        .map(|chunk| {
            let h = block_hash(parent, chunk);
            parent = Some(h);
            h
        })
        .collect()
}

/// Hash ⇄ block maps plus the LRU order of cached blocks that are not referenced.
#[derive(Debug, Default)]
pub struct PrefixCache {
    by_hash: HashMap<BlockHash, u32>,
    hash_of: HashMap<u32, BlockHash>,
    /// Evictable blocks by the tick at which they became unreferenced (oldest first).
    lru: BTreeMap<u64, u32>,
    lru_tick_of: HashMap<u32, u64>,
    tick: u64,
}

impl PrefixCache {
    /// The block holding `hash`, if cached.
    pub fn get(&self, hash: BlockHash) -> Option<u32> {
        self.by_hash.get(&hash).copied()
    }

    /// Whether `block` carries a hash.
    pub fn is_cached(&self, block: u32) -> bool {
        self.hash_of.contains_key(&block)
    }

    /// Records that `block` holds `hash`; a no-op if either side is already registered
    /// (the first copy wins; a duplicate block stays uncached and is freed normally).
    pub fn insert(&mut self, hash: BlockHash, block: u32) {
        if self.by_hash.contains_key(&hash) || self.hash_of.contains_key(&block) {
            return;
        }
        self.by_hash.insert(hash, block);
        self.hash_of.insert(block, hash);
    }

    /// Marks a cached block as unreferenced (most recently used end of the LRU).
    pub fn make_evictable(&mut self, block: u32) {
        debug_assert!(
            self.is_cached(block),
            "only cached blocks are evictable: this is a bug"
        );
        self.tick += 1;
        self.lru.insert(self.tick, block);
        self.lru_tick_of.insert(block, self.tick);
    }

    /// Takes a block out of the LRU because it is referenced again.
    pub fn touch(&mut self, block: u32) {
        if let Some(tick) = self.lru_tick_of.remove(&block) {
            self.lru.remove(&tick);
        }
    }

    /// Evicts the least recently used unreferenced block, forgetting its hash.
    pub fn evict_lru(&mut self) -> Option<u32> {
        let (_, block) = self.lru.pop_first()?;
        self.lru_tick_of.remove(&block);
        if let Some(hash) = self.hash_of.remove(&block) {
            self.by_hash.remove(&hash);
        }
        Some(block)
    }

    /// Number of evictable (cached, unreferenced) blocks.
    pub fn num_evictable(&self) -> usize {
        self.lru.len()
    }

    /// Whether `block` is waiting in the LRU.
    pub fn is_evictable(&self, block: u32) -> bool {
        self.lru_tick_of.contains_key(&block)
    }

    /// Number of blocks that carry a hash.
    pub fn len(&self) -> usize {
        self.hash_of.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.hash_of.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_depends_on_all_previous_tokens() {
        let a = block_hashes(&[1, 2, 3, 4, 5, 6], 2);
        let b = block_hashes(&[9, 2, 3, 4, 5, 6], 2);
        assert_eq!(a.len(), 3);
        assert!(
            a.iter().zip(&b).all(|(x, y)| x != y),
            "a change in block 0 changes all"
        );
        let c = block_hashes(&[1, 2, 3, 4, 5, 6, 7], 2);
        assert_eq!(a, c, "a partial tail block gets no hash");
        assert_ne!(block_hash(None, &[3, 4]), a[1], "same tokens, other parent");
    }

    #[test]
    fn lru_evicts_oldest_unreferenced_first() {
        let mut cache = PrefixCache::default();
        for b in 0..3 {
            cache.insert(100 + b as u64, b);
        }
        cache.insert(100, 7); // duplicate hash: ignored
        assert_eq!(cache.get(100), Some(0));
        cache.make_evictable(2);
        cache.make_evictable(0);
        cache.make_evictable(1);
        cache.touch(0); // referenced again: not evictable
        assert_eq!(cache.num_evictable(), 2);
        assert_eq!(cache.evict_lru(), Some(2));
        assert_eq!(cache.get(102), None, "evicted block forgets its hash");
        assert_eq!(cache.evict_lru(), Some(1));
        assert_eq!(cache.evict_lru(), None);
        assert_eq!(cache.get(100), Some(0));
    }
}
