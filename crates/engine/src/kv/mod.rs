//! The paged KV cache: tensor storage ([`KvCache`]), the pure bookkeeping that decides which
//! sequence owns which block ([`BlockAllocator`], [`prefix_cache`]), and how many blocks the
//! pool gets ([`budget`]).

pub mod block_allocator;
pub mod budget;
pub mod prefix_cache;
pub mod storage;

pub use block_allocator::BlockAllocator;
pub use storage::{KvCache, KvGeometry};
