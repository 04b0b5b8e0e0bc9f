//! [`GroupStorage`]: one group's view of the store, and raft-rs's
//! [`raft::Storage`] for it, served from the mirror and the log table.

use super::mirror::{read, Mirror};
use super::rows::{decode_entry, SnapshotRow};
use super::{redb_error, StorageError, RAFT_LOG, RAFT_SNAPSHOT};
use crate::core::codec;
use crate::core::ids::GroupId;
use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState};
use redb::{Database, ReadableDatabase, TableError};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError, RwLock};

/// The storage of one Raft group, as raft-rs's `RawNode` uses it. Cheap to
/// clone; clones share the group's state.
#[derive(Clone)]
pub struct GroupStorage {
    pub(super) group: GroupId,
    pub(super) db: Arc<Database>,
    pub(super) mem: Arc<RwLock<Mirror>>,
}

impl GroupStorage {
    /// Whether raft-rs asked for a snapshot the stored one could not serve.
    pub fn snapshot_wanted(&self) -> bool {
        read(&self.mem).snapshot_wanted.load(Ordering::Relaxed)
    }

    /// Notes the learners of the configuration raft-rs now runs with, which
    /// decide which snapshot a learner may be sent (see `snapshot`).
    pub fn note_learners(&self, learners: &[u64]) {
        let mem = read(&self.mem);
        let mut live = mem
            .live_learners
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        live.clear();
        live.extend_from_slice(learners);
    }

    /// Clears the request once a fresh snapshot is on its way to disk.
    pub fn clear_snapshot_wanted(&self) {
        read(&self.mem)
            .snapshot_wanted
            .store(false, Ordering::Relaxed);
    }
}

impl std::fmt::Debug for GroupStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mem = read(&self.mem);
        f.debug_struct("GroupStorage")
            .field("group", &self.group)
            .field("state", &mem.state)
            .field("last_index", &mem.last_index())
            .finish()
    }
}

impl GroupStorage {
    pub fn hard_state(&self) -> HardState {
        read(&self.mem).state.hard_state()
    }

    pub fn conf_state(&self) -> ConfState {
        read(&self.mem).state.conf_state()
    }

    pub fn applied(&self) -> u64 {
        read(&self.mem).state.applied
    }

    pub fn first_index(&self) -> u64 {
        read(&self.mem).first_index()
    }

    pub fn last_index(&self) -> u64 {
        read(&self.mem).last_index()
    }

    /// The stored snapshot's metadata and data, if the group has one.
    pub fn snapshot_data(&self) -> Result<Option<(SnapshotMetadata, Vec<u8>)>, StorageError> {
        Ok(self.snapshot_row()?.map(|row| (row.metadata(), row.data)))
    }

    fn snapshot_row(&self) -> Result<Option<SnapshotRow>, StorageError> {
        let _mirror = read(&self.mem);
        let txn = self.db.begin_read().map_err(redb_error)?;
        let table = match txn.open_table(RAFT_SNAPSHOT) {
            Ok(table) => table,
            Err(TableError::TableDoesNotExist(_)) => return Ok(None),
            Err(e) => return Err(redb_error(e)),
        };
        let Some(bytes) = table.get(self.group.0).map_err(redb_error)? else {
            return Ok(None);
        };
        codec::decode::<SnapshotRow>(bytes.value())
            .map(Some)
            .map_err(|e| StorageError::Corrupt {
                group: self.group,
                what: format!("snapshot row: {e}"),
            })
    }

    /// Reads entries `low..high` (already checked to be in the log), stopping
    /// once they exceed `max_size` (but returning at least one).
    fn read_entries(
        &self,
        low: u64,
        high: u64,
        max_size: Option<u64>,
    ) -> Result<Vec<Entry>, StorageError> {
        let mut entries = Vec::new();
        if low >= high {
            return Ok(entries);
        }
        let group = self.group;
        let missing = |index: u64| StorageError::Corrupt {
            group,
            what: format!("log entry {index} is missing"),
        };
        let txn = self.db.begin_read().map_err(redb_error)?;
        let table = match txn.open_table(RAFT_LOG) {
            Ok(table) => table,
            Err(TableError::TableDoesNotExist(_)) => return Err(missing(low)),
            Err(e) => return Err(redb_error(e)),
        };
        let mut size = 0u64;
        let mut expected = low;
        for item in table
            .range((group.0, low)..(group.0, high))
            .map_err(redb_error)?
        {
            let (key, value) = item.map_err(redb_error)?;
            let (_, index) = key.value();
            if index != expected {
                return Err(missing(expected));
            }
            let entry = decode_entry(group, index, value.value())?;
            size = size.saturating_add(u64::from(entry.compute_size()));
            entries.push(entry);
            expected += 1;
            if max_size.is_some_and(|max| size > max) {
                // raft's own rule decides how many of these are returned.
                raft::util::limit_size(&mut entries, max_size);
                return Ok(entries);
            }
        }
        if expected != high {
            return Err(missing(expected));
        }
        Ok(entries)
    }
}

impl raft::Storage for GroupStorage {
    fn initial_state(&self) -> raft::Result<RaftState> {
        let mem = read(&self.mem);
        Ok(RaftState::new(
            mem.state.hard_state(),
            mem.state.conf_state(),
        ))
    }

    fn entries(
        &self,
        low: u64,
        high: u64,
        max_size: impl Into<Option<u64>>,
        _context: GetEntriesContext,
    ) -> raft::Result<Vec<Entry>> {
        // Holding the mirror keeps a concurrent write from changing the log
        // between the bounds check and the read.
        let mem = read(&self.mem);
        if low < mem.first_index() {
            return Err(raft::Error::Store(raft::StorageError::Compacted));
        }
        if high > mem.last_index().saturating_add(1) || low > high {
            return Err(raft::Error::Store(raft::StorageError::Unavailable));
        }
        Ok(self.read_entries(low, high, max_size.into())?)
    }

    fn term(&self, idx: u64) -> raft::Result<u64> {
        let mem = read(&self.mem);
        match mem.term(idx) {
            Some(term) => Ok(term),
            None if idx < mem.first_index() => {
                Err(raft::Error::Store(raft::StorageError::Compacted))
            }
            None => Err(raft::Error::Store(raft::StorageError::Unavailable)),
        }
    }

    fn first_index(&self) -> raft::Result<u64> {
        Ok(read(&self.mem).first_index())
    }

    fn last_index(&self) -> raft::Result<u64> {
        Ok(read(&self.mem).last_index())
    }

    /// The stored snapshot, if it is recent enough and its membership
    /// includes `to` (raft-rs refuses a snapshot whose configuration does not
    /// name it, so sending one would leave the peer stuck) in the role it
    /// has now if that is a learner's (a replica without a log takes only a
    /// snapshot that lists it as a learner, see `raft::engine`, and the
    /// stored one may be from before the peer was removed and added back).
    /// Otherwise asks for a fresh snapshot and reports it temporarily
    /// unavailable; raft-rs asks again on its next probe. Snapshots are made
    /// by compaction (or received), not on demand, so a follower asking for
    /// a newer one than is stored waits.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        let learner_now = read(&self.mem)
            .live_learners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(&to);
        match self.snapshot_row()? {
            Some(row)
                if row.index >= request_index
                    && row.names(to)
                    && (!learner_now || row.lists_as_learner(to)) =>
            {
                let mut snapshot = Snapshot::default();
                snapshot.set_metadata(row.metadata());
                snapshot.data = row.data.into();
                Ok(snapshot)
            }
            _ => {
                read(&self.mem)
                    .snapshot_wanted
                    .store(true, Ordering::Relaxed);
                Err(raft::Error::Store(
                    raft::StorageError::SnapshotTemporarilyUnavailable,
                ))
            }
        }
    }
}
