//! Compute kernels kept apart from the model: the model calls them, they know nothing of it.

pub(crate) mod cpu;
