//! The redb-backed migration table (DESIGN.md §5, §7).
//!
//! Each node persists the latest checkpoint of every migration so that
//! recovery after a restart can scan the table and resume or abort each one.
//! The helpers here are stateless functions over a transaction the caller
//! owns, so the node can fold migration writes into its one write transaction
//! per engine round; committing (with the right durability) is the caller's.
//!
//! Stored rows are never trusted blindly: every row read is decoded from its
//! envelope and verified, and a row that fails is an error naming the
//! migration (DESIGN.md §3.3), never skipped.

use crate::core::codec;
use crate::core::ids::MigrationId;
use crate::core::migration::{CheckpointCorruption, MigrationError, MigrationRow, UpsertDecision};
use redb::{ReadableTable, TableDefinition, TableError};

/// Table `migrations`: key = the migration id's 16 bytes, value =
/// `codec::encode` of the [`MigrationRow`] (envelope with CRC). redb orders
/// keys bytewise, which is exactly the order of [`MigrationId`].
pub const MIGRATIONS: TableDefinition<&[u8; 16], &[u8]> = TableDefinition::new("migrations");

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MigrationTableError {
    /// redb failed (I/O, a table of another type under this name, ...).
    #[error("migration table storage failed: {0}")]
    Storage(String),
    /// What is stored for this migration does not decode or verify.
    #[error("stored row of migration {migration_id} is corrupt: {cause}")]
    Corrupt {
        migration_id: MigrationId,
        cause: String,
    },
    /// The checkpoint was refused by the upsert rule; nothing was written.
    #[error("migration checkpoint refused: {0}")]
    Rejected(#[from] MigrationError),
    /// The checkpoint handed in does not verify; nothing was written.
    #[error("migration checkpoint is corrupt: {0}")]
    Corruption(#[from] CheckpointCorruption),
}

fn storage(error: impl std::fmt::Display) -> MigrationTableError {
    MigrationTableError::Storage(error.to_string())
}

/// Decodes and verifies the row stored under `key`.
fn decode_stored(key: &[u8; 16], bytes: &[u8]) -> Result<MigrationRow, MigrationTableError> {
    let migration_id = MigrationId::from_bytes(*key);
    let corrupt = |cause: String| MigrationTableError::Corrupt {
        migration_id,
        cause,
    };
    let row: MigrationRow = codec::decode(bytes).map_err(|e| corrupt(e.to_string()))?;
    if row.migration_id != migration_id {
        return Err(corrupt(format!(
            "the row names migration {}",
            row.migration_id
        )));
    }
    row.verify().map_err(|e| corrupt(e.to_string()))?;
    Ok(row)
}

/// Stateless helpers over the `migrations` table.
pub struct MigrationTable;

impl MigrationTable {
    /// Every stored row, sorted by migration id. A missing table is empty.
    /// A row that fails to decode or verify is an error naming the migration.
    pub fn load_all(txn: &redb::ReadTransaction) -> Result<Vec<MigrationRow>, MigrationTableError> {
        let table = match txn.open_table(MIGRATIONS) {
            Ok(table) => table,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(storage(e)),
        };
        let mut rows = Vec::new();
        for entry in table.iter().map_err(storage)? {
            let (key, value) = entry.map_err(storage)?;
            rows.push(decode_stored(key.value(), value.value())?);
        }
        Ok(rows)
    }

    /// Verifies `row`, decides against the stored row (which is verified
    /// too), and writes `row` on `Insert` or `Replace`. On `Err` nothing was
    /// written. Opens and closes the table itself, so the caller must not
    /// hold `MIGRATIONS` open in the same transaction.
    pub fn upsert(
        txn: &redb::WriteTransaction,
        row: &MigrationRow,
    ) -> Result<UpsertDecision, MigrationTableError> {
        row.verify()?;
        let key = row.migration_id.as_bytes();
        let mut table = txn.open_table(MIGRATIONS).map_err(storage)?;
        let existing = match table.get(key).map_err(storage)? {
            Some(bytes) => Some(decode_stored(key, bytes.value())?),
            None => None,
        };
        let decision = MigrationRow::decide(existing.as_ref(), row)?;
        if decision != UpsertDecision::Duplicate {
            table
                .insert(key, codec::encode(row).as_slice())
                .map_err(storage)?;
        }
        Ok(decision)
    }

    /// Deletes the row of `id`; whether there was one.
    pub fn remove(
        txn: &redb::WriteTransaction,
        id: MigrationId,
    ) -> Result<bool, MigrationTableError> {
        let mut table = txn.open_table(MIGRATIONS).map_err(storage)?;
        let removed = table.remove(id.as_bytes()).map_err(storage)?;
        Ok(removed.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ids::{GroupId, NodeId, VShardId};
    use crate::core::migration::{
        MigrationCheckpointPayload, MigrationPhaseTag as P, ReplicaMovePayload, VShardMovePayload,
    };
    use redb::{Database, ReadableDatabase};
    use std::path::Path;

    fn id(byte: u8) -> MigrationId {
        MigrationId::from_random_bytes([byte; 16])
    }

    fn replica_row(migration: MigrationId, phase: P, attempt: u32) -> MigrationRow {
        let payload = MigrationCheckpointPayload::Replica(ReplicaMovePayload {
            group_id: GroupId(2),
            source: NodeId::new(1).expect("non-zero"),
            target: NodeId::new(5).expect("non-zero"),
            source_was_leader: false,
            caught_up_index: 17,
            write_pause_us: None,
        });
        MigrationRow::new(migration, phase, attempt, &payload, 77)
    }

    fn vshard_row(migration: MigrationId, phase: P, attempt: u32) -> MigrationRow {
        let payload = MigrationCheckpointPayload::VShard(VShardMovePayload {
            vshard_id: VShardId::new(9).expect("in range"),
            source_group: GroupId(1),
            target_group: GroupId(3),
            copy_index: 100,
            tail_index: 140,
            fenced_at_ms: Some(5),
            write_pause_us: Some(800),
        });
        MigrationRow::new(migration, phase, attempt, &payload, 78)
    }

    fn write<T>(
        db: &Database,
        f: impl FnOnce(&redb::WriteTransaction) -> Result<T, MigrationTableError>,
    ) -> Result<T, MigrationTableError> {
        let txn = db.begin_write().expect("begin write");
        let result = f(&txn);
        txn.commit().expect("commit");
        result
    }

    fn load(db: &Database) -> Result<Vec<MigrationRow>, MigrationTableError> {
        MigrationTable::load_all(&db.begin_read().expect("begin read"))
    }

    fn stored_bytes(db: &Database, migration: MigrationId) -> Option<Vec<u8>> {
        let txn = db.begin_read().expect("begin read");
        let table = txn.open_table(MIGRATIONS).expect("table exists");
        let bytes = table.get(migration.as_bytes()).expect("get");
        bytes.map(|b| b.value().to_vec())
    }

    fn put_raw(db: &Database, migration: MigrationId, bytes: &[u8]) {
        let txn = db.begin_write().expect("begin write");
        {
            let mut table = txn.open_table(MIGRATIONS).expect("open table");
            table.insert(migration.as_bytes(), bytes).expect("insert");
        }
        txn.commit().expect("commit");
    }

    fn create(path: &Path) -> Database {
        Database::create(path).expect("create database")
    }

    #[test]
    fn a_missing_table_is_empty() {
        let db = Database::builder()
            .create_with_backend(redb::backends::InMemoryBackend::new())
            .expect("in-memory database");
        assert_eq!(load(&db), Ok(Vec::new()));
    }

    #[test]
    fn upserted_rows_survive_a_reopen_sorted_by_id() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keel.redb");
        let (a, b) = (id(0x20), id(0x10));
        {
            let db = create(&path);
            let decisions = write(&db, |txn| {
                Ok([
                    MigrationTable::upsert(txn, &replica_row(a, P::AddLearner, 0))?,
                    MigrationTable::upsert(txn, &vshard_row(b, P::Copy, 0))?,
                    MigrationTable::upsert(txn, &vshard_row(b, P::Tail, 0))?,
                ])
            });
            assert_eq!(
                decisions,
                Ok([
                    UpsertDecision::Insert,
                    UpsertDecision::Insert,
                    UpsertDecision::Replace
                ])
            );
        }
        let db = Database::open(&path).expect("reopen database");
        assert_eq!(
            load(&db),
            Ok(vec![
                vshard_row(b, P::Tail, 0),
                replica_row(a, P::AddLearner, 0)
            ])
        );
    }

    #[test]
    fn a_duplicate_leaves_the_stored_bytes_unchanged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = create(&dir.path().join("keel.redb"));
        let first = replica_row(id(1), P::AddLearner, 0);
        write(&db, |txn| MigrationTable::upsert(txn, &first)).expect("insert");
        let before = stored_bytes(&db, id(1));
        let mut redelivered = replica_row(id(1), P::AddLearner, 0);
        redelivered.ts_ms += 1_000;
        assert_eq!(
            write(&db, |txn| MigrationTable::upsert(txn, &redelivered)),
            Ok(UpsertDecision::Duplicate)
        );
        assert_eq!(stored_bytes(&db, id(1)), before);
        assert_eq!(before, Some(codec::encode(&first)));
    }

    #[test]
    fn stale_and_out_of_order_checkpoints_are_refused_without_writing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = create(&dir.path().join("keel.redb"));
        let current = replica_row(id(1), P::CatchUp, 1);
        write(&db, |txn| {
            MigrationTable::upsert(txn, &replica_row(id(1), P::AddLearner, 0))?;
            MigrationTable::upsert(txn, &current)
        })
        .expect("advance");
        assert!(matches!(
            write(&db, |txn| MigrationTable::upsert(
                txn,
                &replica_row(id(1), P::CatchUp, 0)
            )),
            Err(MigrationTableError::Rejected(MigrationError::Stale { .. }))
        ));
        assert!(matches!(
            write(&db, |txn| MigrationTable::upsert(
                txn,
                &replica_row(id(2), P::Cutover, 0)
            )),
            Err(MigrationTableError::Rejected(
                MigrationError::MustStartAtFirstPhase { .. }
            ))
        ));
        assert_eq!(load(&db), Ok(vec![current]));
    }

    #[test]
    fn a_corrupt_checkpoint_is_refused_without_writing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = create(&dir.path().join("keel.redb"));
        let mut row = replica_row(id(3), P::AddLearner, 0);
        row.payload[0] ^= 0x80;
        assert!(matches!(
            write(&db, |txn| MigrationTable::upsert(txn, &row)),
            Err(MigrationTableError::Corruption(
                CheckpointCorruption::CrcMismatch { .. }
            ))
        ));
        assert_eq!(load(&db), Ok(Vec::new()));
    }

    #[test]
    fn remove_deletes_the_row() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = create(&dir.path().join("keel.redb"));
        write(&db, |txn| {
            MigrationTable::upsert(txn, &vshard_row(id(4), P::Copy, 0))
        })
        .expect("insert");
        assert_eq!(
            write(&db, |txn| MigrationTable::remove(txn, id(4))),
            Ok(true)
        );
        assert_eq!(
            write(&db, |txn| MigrationTable::remove(txn, id(4))),
            Ok(false)
        );
        assert_eq!(load(&db), Ok(Vec::new()));
        // An aborted migration cannot be resurrected by a late checkpoint.
        assert!(matches!(
            write(&db, |txn| MigrationTable::upsert(
                txn,
                &vshard_row(id(4), P::Tail, 0)
            )),
            Err(MigrationTableError::Rejected(_))
        ));
    }

    #[test]
    fn garbage_in_the_table_fails_load_and_upsert_naming_the_migration() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = create(&dir.path().join("keel.redb"));
        write(&db, |txn| {
            MigrationTable::upsert(txn, &replica_row(id(1), P::AddLearner, 0))
        })
        .expect("insert");
        put_raw(&db, id(2), b"garbage");
        let error = load(&db).expect_err("a corrupt row fails the load");
        assert!(matches!(
            &error,
            MigrationTableError::Corrupt { migration_id, .. } if *migration_id == id(2)
        ));
        assert!(error.to_string().contains(&id(2).to_string()));
        assert!(matches!(
            write(&db, |txn| MigrationTable::upsert(txn, &replica_row(id(2), P::AddLearner, 0))),
            Err(MigrationTableError::Corrupt { migration_id, .. }) if migration_id == id(2)
        ));
        assert_eq!(stored_bytes(&db, id(2)), Some(b"garbage".to_vec()));
    }

    #[test]
    fn a_well_framed_row_that_fails_verification_is_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = create(&dir.path().join("keel.redb"));
        let mut row = vshard_row(id(5), P::Fence, 0);
        row.crc32c ^= 1;
        put_raw(&db, id(5), &codec::encode(&row));
        assert!(matches!(
            load(&db),
            Err(MigrationTableError::Corrupt { migration_id, cause })
                if migration_id == id(5) && cause.contains("CRC32C")
        ));
    }

    #[test]
    fn a_row_stored_under_another_id_is_corrupt() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = create(&dir.path().join("keel.redb"));
        put_raw(
            &db,
            id(6),
            &codec::encode(&replica_row(id(7), P::AddLearner, 0)),
        );
        assert!(matches!(
            load(&db),
            Err(MigrationTableError::Corrupt { migration_id, .. }) if migration_id == id(6)
        ));
    }
}
