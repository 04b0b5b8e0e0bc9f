//! The pure core: no I/O, no async, no clock, no randomness, no threads.
//! Time and randomness arrive as arguments, so every function here gives the
//! same output for the same input on every node and in the simulator.

#[cfg(test)]
mod arbitrary;
pub mod cache;
pub mod codec;
pub mod entry;
pub mod hlc;
pub mod hooks;
pub mod ids;
pub mod kv;
pub mod lease;
pub mod migration;
pub mod placement;
pub mod rebalance;
pub mod routing;
pub mod state_machine;
pub mod token;
pub mod topology;
pub mod version;
pub mod vshard_gate;
