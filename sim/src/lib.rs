//! keel-sim — the deterministic simulation harness (DESIGN.md §8).
//!
//! Built with `RUSTFLAGS="--cfg madsim"`, every node runs on madsim's
//! deterministic executor, so one seed fixes the whole run. For now the
//! harness drives the pure metadata applier on simulated nodes that receive
//! the committed log in randomly sized, randomly delayed and re-delivered
//! chunks; it grows into the full fault-injecting cluster simulator.

pub mod workload;

#[cfg(madsim)]
pub mod metadata_replicas;
