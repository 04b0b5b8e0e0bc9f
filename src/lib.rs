//! keel — a cluster coordination engine for sharded databases.
//!
//! The crate is layered (DESIGN.md §1); a layer only calls inward:
//!
//! 1. [`core`] — pure, synchronous state machines: identifiers, HLC, the wire
//!    codec, metadata entries and the metadata cache that applies them,
//!    routing, topology, join tokens, descriptor leases, migration rows.
//! 2. [`raft`] — the multi-Raft engine over raft-rs, persisted in redb.
//! 3. [`io`] — everything that touches the outside world behind small
//!    interfaces: the QUIC transport and its in-memory twin, clocks, the
//!    node's certificates, the redb database and its entropy.
//! 4. [`node`] — the async runtime that drives the engine, applies entries
//!    and serves requests, generic over the io binding.
//! 5. the `keel` binary — operator commands.

/// Marks a rare path as reached. The simulator counts these code probes
/// across a sweep and lists the ones never hit (DESIGN.md §8); elsewhere
/// they cost one disabled tracing callsite.
#[macro_export]
macro_rules! probe {
    ($name:literal) => {
        ::tracing::debug!(target: "keel_probe", probe = $name)
    };
}

#[cfg(not(madsim))]
pub mod cli;
pub mod core;
#[cfg(not(madsim))]
pub mod daemon;
pub mod io;
pub mod node;
pub mod planted;
pub mod raft;
