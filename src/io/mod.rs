//! Layer 3: everything that touches the outside world — the network, the
//! disk, the clock and entropy — behind small interfaces, so that the node
//! runtime above runs unchanged in production, in in-process tests and in
//! the simulator (DESIGN.md §1).

pub mod clock;
pub mod memory_transport;
pub mod migration_table;
#[cfg(not(madsim))]
pub mod pki;
#[cfg(not(madsim))]
pub mod quic;
#[cfg(not(madsim))]
pub mod quic_client;
pub mod transport;

use crate::io::clock::WallClock;
use crate::io::transport::{InboundReceiver, Transport};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha8Rng;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Everything a node needs from its environment.
pub struct NodeIo {
    pub transport: Arc<dyn Transport>,
    pub inbound: InboundReceiver,
    pub clock: Arc<dyn WallClock>,
    /// The node's only source of randomness (ids, jitter).
    pub rng: ChaCha8Rng,
    pub db: Arc<redb::Database>,
    /// How long the disk took beyond what the calls into it blocked for;
    /// `None` where the disk blocks for real (files).
    pub storage_latency: Option<Arc<dyn StorageLatency>>,
}

/// Disk time a node must wait out before acting on what it wrote. A real
/// `fsync` blocks the node's event loop for as long as the disk takes, so
/// the file binding needs none of this; the simulated disk answers at once
/// and reports the latency it models here, and the node sleeps it off, on
/// its event loop, before sending what the write made durable (DESIGN.md §8).
pub trait StorageLatency: Send + Sync {
    /// The latency accrued since the last call, resetting it.
    fn take(&self) -> Duration;
}

/// A node's rng in production: seeded from the operating system.
pub fn os_seeded_rng() -> ChaCha8Rng {
    ChaCha8Rng::from_os_rng()
}

/// A node's rng in tests and the simulator: fixed by a seed.
pub fn seeded_rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

/// Opens (or creates) the node's redb database in a file.
pub fn open_database(path: &Path) -> Result<redb::Database, redb::DatabaseError> {
    redb::Database::create(path)
}
