//! The `metadata_entry` target: `MetadataRecord` / `MetadataEntry` decoding
//! (src/core/entry.rs), the bytes every node reads from group 0's log.
//!
//! Besides the shared decoder checks (bounded allocation, clean errors,
//! round trip), a decoded record must respect the nesting limit that keeps
//! crafted batches from exhausting the stack, and every question the
//! proposer and the applier ask of an entry must have an answer: its name,
//! the cluster version it needs, and — for a checkpoint — whether its
//! payload verifies.

use super::wire::{decode_checked, decode_sealed, verdict};
use super::{alloc, check_message, Verdict};
use keel::core::codec::{self, MAX_NESTING};
use keel::core::entry::{MetadataEntry, MetadataRecord};
use keel::core::version::ClusterVersion;

/// The fuzz target body; see the module documentation.
pub fn metadata_entry(data: &[u8]) -> Verdict {
    let raw = decode_checked::<MetadataRecord>(data);
    let sealed = decode_sealed::<MetadataRecord>(data);
    for record in raw.iter().chain(sealed.iter()) {
        // `MetadataRecord::encode` is what proposers call; it must be the
        // codec's encoding, or a replica would log other bytes.
        assert_eq!(record.encode(), codec::encode(record));
        check_entry(&record.entry, 0);
    }
    verdict(&raw).or(verdict(&sealed))
}

/// Checks one entry found inside `depth` batches.
fn check_entry(entry: &MetadataEntry, depth: u32) {
    assert!(!entry.name().is_empty());
    let needed = entry.min_cluster_version();
    assert!(needed >= ClusterVersion::V1);
    assert!(
        entry.check_allowed(needed).is_ok(),
        "{} is refused at the version it says it needs",
        entry.name()
    );
    if needed > ClusterVersion::V1 {
        let refused = entry.check_allowed(ClusterVersion(needed.0 - 1));
        match refused {
            Ok(()) => panic!("{} is allowed below its minimum version", entry.name()),
            Err(e) => check_message(&e),
        }
    }
    match entry {
        MetadataEntry::Batch { entries } => {
            assert!(
                depth < MAX_NESTING,
                "a batch nested {} deep decoded past the limit of {MAX_NESTING}",
                depth + 1
            );
            let max_needed = entries
                .iter()
                .map(MetadataEntry::min_cluster_version)
                .max()
                .unwrap_or(ClusterVersion::V1);
            assert_eq!(needed, max_needed, "a batch needs what its entries need");
            for sub in entries.iter() {
                check_entry(sub, depth + 1);
            }
        }
        MetadataEntry::MigrationCheckpoint(row) => {
            // What the applier does with it: a corrupt checkpoint must be an
            // error value (the applier fail-stops on it), never a panic.
            let verified =
                alloc::bounded("MigrationRow::verify", row.payload.len(), || row.verify());
            match verified {
                Ok(decoded) => {
                    assert!(row.phase.belongs_to(decoded.kind()));
                    assert_eq!(row.kind(), Ok(decoded.kind()));
                }
                Err(e) => check_message(&e),
            }
        }
        _ => {}
    }
}
