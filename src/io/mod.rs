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

/// Everything a node needs from its environment.
pub struct NodeIo {
    pub transport: Arc<dyn Transport>,
    pub inbound: InboundReceiver,
    pub clock: Arc<dyn WallClock>,
    /// The node's only source of randomness (ids, jitter).
    pub rng: ChaCha8Rng,
    pub db: Arc<redb::Database>,
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
