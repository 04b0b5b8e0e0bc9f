//! Layer 3: everything that touches the outside world — the network, the
//! disk, the clock and entropy — behind small interfaces, so that the node
//! runtime above runs unchanged in production, in in-process tests and in
//! the simulator (DESIGN.md §1).

pub mod clock;
pub mod memory_transport;
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

/// Why a node's database could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenDbError {
    #[error(transparent)]
    Redb(#[from] redb::DatabaseError),
    #[error("the database is damaged beyond what redb can repair ({0}); decommission this node from another one (`keel decommission ID`) and join a fresh one in its place: its replicas are rebuilt from the others")]
    Damaged(String),
}

/// Runs `open`, turning a checksum failure or a panic inside it into
/// [`OpenDbError::Damaged`]. keel commits in two phases (see
/// `raft::storage`), so a page that fails its checksum at start-up is rot,
/// not a write the crash tore, and the node must not run on what is left.
/// redb 4 can also panic, rather than fail, while repairing some damaged
/// files (fuzzing found one: `fuzz/regressions/sim_disk_recovery/`); a node
/// must say its disk is damaged, not crash half-started.
pub fn open_guarded(
    open: impl FnOnce() -> Result<redb::Database, redb::DatabaseError>,
) -> Result<redb::Database, OpenDbError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(open)) {
        Ok(Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(what)))) => {
            crate::probe!("io.database_damaged");
            Err(OpenDbError::Damaged(what))
        }
        Ok(opened) => Ok(opened?),
        Err(panic) => {
            crate::probe!("io.database_damaged");
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "redb panicked".to_owned());
            Err(OpenDbError::Damaged(message))
        }
    }
}

/// redb configured as keel runs it: every open verifies the checksum of
/// every committed page, not only the opens that follow a crash. A plain
/// open after a clean shutdown trusts the file, so a bit that rotted while
/// the node was down would be served (or make redb panic) instead of being
/// reported; simulator seed 257 found a node whose log had lost entries so.
/// The check reads the whole file once per start.
pub fn database_builder() -> redb::Builder {
    let mut builder = redb::Database::builder();
    builder.set_check_integrity_on_open(true);
    builder
}

/// Opens (or creates) the node's redb database in a file.
pub fn open_database(path: &Path) -> Result<redb::Database, OpenDbError> {
    open_guarded(|| database_builder().create(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_while_opening_is_a_damaged_database() {
        let damaged = open_guarded(|| panic!("allocator state out of range"));
        assert!(
            matches!(&damaged, Err(OpenDbError::Damaged(m)) if m == "allocator state out of range"),
            "{damaged:?}"
        );
        let opened = open_guarded(|| {
            redb::Database::builder().create_with_backend(redb::backends::InMemoryBackend::new())
        });
        assert!(opened.is_ok());
    }

    #[test]
    fn a_checksum_failure_while_opening_is_a_damaged_database() {
        let corrupted = || {
            Err(redb::DatabaseError::Storage(redb::StorageError::Corrupted(
                "Primary is corrupted despite 2-phase commit".into(),
            )))
        };
        let damaged = open_guarded(corrupted);
        assert!(
            matches!(&damaged, Err(OpenDbError::Damaged(m)) if m.contains("2-phase")),
            "{damaged:?}"
        );
        let io = open_guarded(|| {
            Err(redb::DatabaseError::Storage(redb::StorageError::Io(
                std::io::Error::other("disk unplugged"),
            )))
        });
        assert!(matches!(io, Err(OpenDbError::Redb(_))), "{io:?}");
    }
}
