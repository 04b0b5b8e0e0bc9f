//! Layer 2: the multi-Raft engine over raft-rs (`raft` 0.7 `RawNode`).
//! Synchronous: no async, no clock (ticks are driven from outside), storage
//! behind redb, which runs on whatever `StorageBackend` the io binding gives.

pub mod engine;
mod logger;

#[cfg(test)]
mod cluster_tests;
pub mod storage;
mod terms;
