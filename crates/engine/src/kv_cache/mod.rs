//! The paged KV cache: tensor storage ([`KvCache`]) and the pure bookkeeping that decides which
//! sequence owns which block ([`BlockAllocator`], prefix cache).

pub mod block_allocator;
pub mod cache;
pub mod prefix_cache;

pub use block_allocator::BlockAllocator;
pub use cache::{KvCache, KvGeometry};
