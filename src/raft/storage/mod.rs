//! Raft storage for many groups in one redb database (DESIGN.md §7, §10).
//!
//! Every Raft group of a node keeps its log, hard state, conf state, applied
//! index and latest snapshot in the node's single redb database, so that one
//! engine round persists all groups with **one** write transaction
//! ([`RaftStore::write`] of a [`WriteBatch`]), committed in two phases (two
//! fsyncs; see `begin_durable_write` for why).
//!
//! Tables:
//!
//! - `raft_log`: `(group, index)` → the protobuf [`Entry`](raft::prelude::Entry) in a sealed
//!   [`FrameKind::Row`](crate::core::codec::FrameKind::Row) envelope.
//! - `raft_state`: `group` → the [`GroupState`] (`codec::encode`).
//! - `raft_snapshot`: `group` → the latest snapshot: its index, term, conf
//!   state and data (`codec::encode`). The metadata lives with the data so
//!   that the snapshot handed to a follower always describes exactly the
//!   bytes it carries.
//! - `node_retired`: one row, present once this node learned that the
//!   cluster retired it, so that it hosts no group again, even after a
//!   restart into its stale metadata ([`RaftStore::mark_retired`]).
//!
//! Every stored value goes through the CRC32C envelope, so a flipped bit is
//! reported as [`StorageError::Corrupt`], never served and never a panic.
//!
//! Each [`GroupStorage`] keeps an in-memory mirror of its group's state and
//! of the terms of its uncompacted entries, so `term`, `first_index` and
//! `last_index` never touch the disk; entries are read from redb. The mirror
//! changes only after a write has committed durably, so storage never claims
//! anything that a crash could take back.
//!
//! Invariants kept by every write (and checked again when a group is loaded,
//! because raft-rs panics on restart when they do not hold):
//! `snapshot index <= applied <= commit <= last index`, and the log holds
//! exactly the entries `snapshot index + 1 ..= last index`.

mod batch;
mod group;
mod mirror;
mod rows;

use crate::core::codec;
use crate::core::ids::{GroupId, NodeId};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};

pub use batch::WriteBatch;
use batch::{fill, Staged};
pub use group::GroupStorage;
use mirror::{load_mirror, Mirror};
pub use rows::GroupState;
use rows::RetiredRow;

/// `(group, index)` → sealed protobuf [`Entry`](raft::prelude::Entry).
const RAFT_LOG: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("raft_log");
/// `group` → encoded [`GroupState`].
const RAFT_STATE: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_state");
/// `group` → encoded snapshot (metadata and data).
const RAFT_SNAPSHOT: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_snapshot");
/// `group` → nothing: every group whose replica this node deleted. A new
/// group's founder starts it from its first snapshot only if it never had
/// a replica of it (see [`RaftStore::destroyed`]).
const DESTROYED_GROUPS: TableDefinition<u64, ()> = TableDefinition::new("destroyed_groups");
/// `0` → encoded [`RetiredRow`], once this node was retired.
const NODE_RETIRED: TableDefinition<u64, &[u8]> = TableDefinition::new("node_retired");

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum StorageError {
    /// redb failed (I/O, a table of another type under one of our names, ...).
    #[error("raft storage failed in redb: {0}")]
    Redb(String),
    /// What is stored for this group does not decode or is inconsistent.
    #[error("stored raft data of group {group} is corrupt: {what}")]
    Corrupt { group: GroupId, what: String },
    /// An operation in the batch broke the log's rules; nothing was written.
    #[error("write batch for group {group} is invalid, so nothing was written: {what}")]
    InvalidWrite { group: GroupId, what: String },
    /// Another batch wrote the group after this batch staged it; nothing was written.
    #[error("group {group} was written by another batch after this batch staged it, so nothing was written")]
    Conflict { group: GroupId },
    /// The retirement mark does not decode, or names another node.
    #[error("the stored retirement mark is corrupt: {0}")]
    CorruptRetirement(String),
}

impl From<StorageError> for raft::Error {
    fn from(e: StorageError) -> Self {
        raft::Error::Store(raft::StorageError::Other(Box::new(e)))
    }
}

fn redb_error(e: impl std::fmt::Display) -> StorageError {
    StorageError::Redb(e.to_string())
}

/// The Raft storage of every group of a node, in one redb database.
#[derive(Clone)]
pub struct RaftStore {
    db: Arc<Database>,
    /// The mirrors of the groups currently open, so that opening a group
    /// twice shares one mirror instead of letting one handle go stale.
    open: Arc<Mutex<BTreeMap<GroupId, Weak<RwLock<Mirror>>>>>,
}

impl RaftStore {
    pub fn new(db: Arc<Database>) -> Self {
        RaftStore {
            db,
            open: Arc::default(),
        }
    }

    /// Groups with persisted state, sorted.
    pub fn groups(&self) -> Result<Vec<GroupId>, StorageError> {
        let txn = self.db.begin_read().map_err(redb_error)?;
        let table = match txn.open_table(RAFT_STATE) {
            Ok(table) => table,
            Err(TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(e) => return Err(redb_error(e)),
        };
        let mut groups = Vec::new();
        for item in table.iter().map_err(redb_error)? {
            let (key, _) = item.map_err(redb_error)?;
            groups.push(GroupId(key.value()));
        }
        Ok(groups)
    }

    /// Loads the storage of one group, or creates it empty (in memory only
    /// until the first write). A new group with `initial_voters` starts with
    /// them as its conf state at index 0 (bootstrap); with none it waits for
    /// a snapshot or append from its leader (a joining replica). Persisted
    /// state always wins over `initial_voters`, and a group that is already
    /// open returns a handle sharing its state.
    pub fn open_group(
        &self,
        group: GroupId,
        initial_voters: &[u64],
    ) -> Result<GroupStorage, StorageError> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        open.retain(|_, mirror| mirror.strong_count() > 0);
        let mem = match open.get(&group).and_then(Weak::upgrade) {
            Some(mem) => mem,
            None => {
                let mem = Arc::new(RwLock::new(load_mirror(&self.db, group, initial_voters)?));
                open.insert(group, Arc::downgrade(&mem));
                mem
            }
        };
        Ok(GroupStorage {
            group,
            db: Arc::clone(&self.db),
            mem,
        })
    }

    /// Deletes everything stored for `group` (its replica was removed and
    /// its data must not leak), durably, and records that it did. The group
    /// must be closed: a group with a live handle is refused, since that
    /// handle would keep serving state that is no longer on disk.
    pub fn destroy_group(&self, group: GroupId) -> Result<(), StorageError> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.get(&group).is_some_and(|m| m.strong_count() > 0) {
            return Err(StorageError::Conflict { group });
        }
        open.remove(&group);
        let txn = begin_durable_write(&self.db, Durability::Immediate)?;
        let deleted = delete_group(&txn, group).and_then(|()| {
            txn.open_table(DESTROYED_GROUPS)
                .map_err(redb_error)?
                .insert(group.0, ())
                .map_err(redb_error)?;
            Ok(())
        });
        if let Err(e) = deleted {
            let _ = txn.abort();
            return Err(e);
        }
        txn.commit().map_err(redb_error)
    }

    /// Whether this node ever deleted a replica of `group`. Such a node may
    /// have acknowledged entries of the group and forgotten them with the
    /// replica, so it must never again write the group's first snapshot and
    /// count as a voter from it: it rejoins only as a learner, from a
    /// snapshot its leader sends.
    pub fn destroyed(&self, group: GroupId) -> Result<bool, StorageError> {
        let txn = self.db.begin_read().map_err(redb_error)?;
        let table = match txn.open_table(DESTROYED_GROUPS) {
            Ok(table) => table,
            Err(TableError::TableDoesNotExist(_)) => return Ok(false),
            Err(e) => return Err(redb_error(e)),
        };
        Ok(table.get(group.0).map_err(redb_error)?.is_some())
    }

    /// Records, durably, that the cluster retired `node` (this database's
    /// node): it hosts no group again. Retirement is final, so nothing
    /// removes the mark.
    pub fn mark_retired(&self, node: NodeId) -> Result<(), StorageError> {
        let row = codec::encode(&RetiredRow { node });
        let txn = begin_durable_write(&self.db, Durability::Immediate)?;
        let inserted = txn
            .open_table(NODE_RETIRED)
            .map_err(redb_error)
            .and_then(|mut table| {
                table.insert(0, row.as_slice()).map_err(redb_error)?;
                Ok(())
            });
        if let Err(e) = inserted {
            let _ = txn.abort();
            return Err(e);
        }
        txn.commit().map_err(redb_error)
    }

    /// Whether [`RaftStore::mark_retired`] recorded `node`'s retirement. A
    /// mark that does not decode, or names another node, is an error: this
    /// database is damaged or belongs to another node.
    pub fn retired(&self, node: NodeId) -> Result<bool, StorageError> {
        let txn = self.db.begin_read().map_err(redb_error)?;
        let table = match txn.open_table(NODE_RETIRED) {
            Ok(table) => table,
            Err(TableError::TableDoesNotExist(_)) => return Ok(false),
            Err(e) => return Err(redb_error(e)),
        };
        let Some(value) = table.get(0).map_err(redb_error)? else {
            return Ok(false);
        };
        let row: RetiredRow = codec::decode(value.value())
            .map_err(|e| StorageError::CorruptRetirement(e.to_string()))?;
        if row.node != node {
            return Err(StorageError::CorruptRetirement(format!(
                "it names node {}, but this is node {node}",
                row.node
            )));
        }
        Ok(true)
    }

    /// Writes the whole batch in one redb write transaction with
    /// [`Durability::Immediate`], then updates the mirrors of the groups it
    /// touched. Returns only once the data is durable. On `Err` the
    /// transaction did not commit and no mirror changed.
    pub fn write(&self, batch: WriteBatch) -> Result<(), StorageError> {
        let staged: Vec<Staged> = batch.groups.into_values().collect();
        for s in &staged {
            let group = s.storage.group;
            if let Some(e) = &s.error {
                return Err(e.clone());
            }
            if !Arc::ptr_eq(&s.storage.db, &self.db) {
                return Err(StorageError::InvalidWrite {
                    group,
                    what: "the group's storage belongs to another database".into(),
                });
            }
            s.next
                .state
                .check(s.next.last_index())
                .map_err(|what| StorageError::InvalidWrite { group, what })?;
        }
        // Hold every touched mirror (in group order, so concurrent writers
        // cannot deadlock) from the version check until the mirrors are
        // updated: readers then never see the database ahead of the mirror.
        let mems: Vec<Arc<RwLock<Mirror>>> =
            staged.iter().map(|s| Arc::clone(&s.storage.mem)).collect();
        let mut guards = Vec::with_capacity(mems.len());
        for (s, mem) in staged.iter().zip(&mems) {
            let guard = mem.write().unwrap_or_else(PoisonError::into_inner);
            if guard.version != s.base.version {
                return Err(StorageError::Conflict {
                    group: s.storage.group,
                });
            }
            guards.push(guard);
        }
        let durability = if crate::planted::planted(crate::planted::Bug::SkipFsync) {
            Durability::None
        } else {
            Durability::Immediate
        };
        let txn = begin_durable_write(&self.db, durability)?;
        let filled = fill(&txn, &staged);
        if let Err(e) = filled {
            // The original error is the one worth reporting.
            let _ = txn.abort();
            return Err(e);
        }
        txn.commit().map_err(redb_error)?;
        for (guard, s) in guards.iter_mut().zip(staged) {
            let version = s.base.version.wrapping_add(1);
            **guard = Mirror { version, ..s.next };
        }
        Ok(())
    }
}

/// Begins a write transaction that commits with `durability` and in two
/// phases: the new commit slot and its pages are synced before the god byte
/// that makes them primary is flipped and synced.
///
/// With one phase, a commit slot whose pages fail their checksum at start-up
/// is taken for a write torn by the crash, and redb quietly falls back to the
/// previous commit. A bit that rotted in an acknowledged commit would then
/// erase a vote or appended entries this node had already promised, which
/// Raft cannot survive. With two phases a torn write can no longer leave a bad
/// primary behind, so redb reports such a primary as corruption and the node
/// refuses to start (DESIGN.md §3.3) instead of forgetting. The price is a
/// second fsync per write; `docs/PERFORMANCE.md` measures it.
fn begin_durable_write(
    db: &Database,
    durability: Durability,
) -> Result<redb::WriteTransaction, StorageError> {
    let mut txn = db.begin_write().map_err(redb_error)?;
    txn.set_two_phase_commit(true);
    if let Err(e) = txn.set_durability(durability) {
        let _ = txn.abort();
        return Err(redb_error(e));
    }
    Ok(txn)
}

/// Deletes every row of `group` in the write transaction.
fn delete_group(txn: &redb::WriteTransaction, group: GroupId) -> Result<(), StorageError> {
    let mut log = txn.open_table(RAFT_LOG).map_err(redb_error)?;
    log.retain_in((group.0, 0)..=(group.0, u64::MAX), |_, _| false)
        .map_err(redb_error)?;
    txn.open_table(RAFT_STATE)
        .map_err(redb_error)?
        .remove(group.0)
        .map_err(redb_error)?;
    txn.open_table(RAFT_SNAPSHOT)
        .map_err(redb_error)?
        .remove(group.0)
        .map_err(redb_error)?;
    Ok(())
}

#[cfg(test)]
mod tests;
