//! The `envelope` target: the codec envelope
//! (`magic u8 | version u16 | len u32 | crc32c u32 | body`, DESIGN.md §3.2)
//! decoding every wire type keel reads from the network or the disk.
//!
//! Each input is read twice per type: as a whole frame (header, length and
//! checksum checks) and as a body behind a valid header of the type's kind
//! (postcard on untrusted bytes; the checksum would otherwise hide the body
//! from the fuzzer). It is also restored as a metadata and as a key-value
//! snapshot, the two snapshot decoders with checks beyond the codec's.

use super::wire::{decode_checked, decode_sealed, verdict};
use super::{alloc, check_message, Verdict};
use keel::core::cache::{MetadataCache, MetadataState};
use keel::core::entry::MetadataRecord;
use keel::core::kv::{KvCommand, KvQuery, KvResponse, KvStateMachine};
use keel::core::migration::{MigrationCheckpointPayload, MigrationRow};
use keel::core::state_machine::DataStateMachine;
use keel::node::rpc::{DataRecord, Request, Response};
use keel::node::service::{ClientRequest, ClientResponse};
use keel::raft::storage::GroupState;

/// Decodes `$input` with `$decode::<T>` for every wire type; `Accepted` if
/// any type took it.
macro_rules! every_wire_type {
    ($decode:ident, $input:expr) => {{
        let input: &[u8] = $input;
        let mut outcome = Verdict::Rejected;
        outcome = outcome.or(verdict(&$decode::<MetadataRecord>(input)));
        outcome = outcome.or(verdict(&$decode::<MetadataState>(input)));
        outcome = outcome.or(verdict(&$decode::<MigrationRow>(input)));
        outcome = outcome.or(verdict(&$decode::<MigrationCheckpointPayload>(input)));
        outcome = outcome.or(verdict(&$decode::<KvCommand>(input)));
        outcome = outcome.or(verdict(&$decode::<KvQuery>(input)));
        outcome = outcome.or(verdict(&$decode::<KvResponse>(input)));
        outcome = outcome.or(verdict(&$decode::<Request>(input)));
        outcome = outcome.or(verdict(&$decode::<Response>(input)));
        outcome = outcome.or(verdict(&$decode::<DataRecord>(input)));
        outcome = outcome.or(verdict(&$decode::<ClientRequest>(input)));
        outcome = outcome.or(verdict(&$decode::<ClientResponse>(input)));
        outcome = outcome.or(verdict(&$decode::<GroupState>(input)));
        // The credential files exist only outside the simulator build.
        #[cfg(not(madsim))]
        {
            use keel::daemon::cluster_dir::{AdminCredential, StagedCa};
            outcome = outcome.or(verdict(&$decode::<AdminCredential>(input)));
            outcome = outcome.or(verdict(&$decode::<StagedCa>(input)));
        }
        outcome
    }};
}

/// The fuzz target body; see the module documentation.
pub fn envelope(data: &[u8]) -> Verdict {
    let raw = every_wire_type!(decode_checked, data);
    let sealed = every_wire_type!(decode_sealed, data);
    raw.or(sealed)
        .or(restore_metadata(data))
        .or(restore_kv(data))
}

/// A group-0 snapshot: restoring it must give a cache whose own snapshot
/// restores to the same state (the snapshot a restarted node writes next
/// must be as good as the one it read).
fn restore_metadata(data: &[u8]) -> Verdict {
    let restored = alloc::bounded("MetadataCache::restore", data.len(), || {
        MetadataCache::restore(data)
    });
    match &restored {
        Ok(cache) => {
            let snapshot = cache.snapshot();
            let again = MetadataCache::restore(&snapshot)
                .unwrap_or_else(|e| panic!("a restored cache's snapshot does not restore: {e}"));
            assert_eq!(again.state(), cache.state());
            assert_eq!(again.snapshot(), snapshot);
        }
        Err(e) => check_message(e),
    }
    Verdict::of(&restored)
}

/// A data group's key-value snapshot: checked limits and order on top of
/// the codec. Whatever restores must snapshot to bytes that restore to an
/// equal store, and a refused snapshot must leave the store untouched.
fn restore_kv(data: &[u8]) -> Verdict {
    let mut store = KvStateMachine::new();
    let restored = alloc::bounded("KvStateMachine::restore", data.len(), || {
        store.restore(data)
    });
    match &restored {
        Ok(()) => {
            let snapshot = store.snapshot();
            let mut again = KvStateMachine::new();
            again
                .restore(&snapshot)
                .unwrap_or_else(|e| panic!("a restored store's snapshot does not restore: {e}"));
            assert_eq!(again, store);
            assert_eq!(again.snapshot(), snapshot);
        }
        Err(e) => {
            check_message(e);
            assert_eq!(
                store,
                KvStateMachine::new(),
                "a refused restore changed the store"
            );
        }
    }
    Verdict::of(&restored)
}
