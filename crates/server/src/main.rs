//! `mpt-server` binary (being built).

fn main() {}
