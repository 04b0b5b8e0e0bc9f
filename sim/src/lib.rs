//! keel-sim — the deterministic simulation harness (DESIGN.md §8).
//!
//! Built with `RUSTFLAGS="--cfg madsim"` (see `scripts/sim.sh`), every keel
//! node runs unchanged on madsim's deterministic executor with keel's own
//! fault models underneath — a fault-injecting network ([`net`]), a disk
//! that loses or tears unsynced writes ([`disk`]), skewed clocks
//! ([`clock`]) — so one seed fixes the whole run and any failure replays
//! exactly. [`swarm`] draws each seed's configuration, [`cluster`] runs the
//! phases, [`history`] and [`linearizability`] check what clients saw, and
//! [`runner`] is the `keel-sim` command line.

pub mod clock;
pub mod credentials;
pub mod disk;
pub mod history;
pub mod linearizability;
pub mod probes;
pub mod runner;
pub mod swarm;
pub mod workload;

#[cfg(madsim)]
pub mod cluster;
#[cfg(madsim)]
pub mod metadata_replicas;
#[cfg(madsim)]
pub mod net;
#[cfg(madsim)]
pub mod scenario;
