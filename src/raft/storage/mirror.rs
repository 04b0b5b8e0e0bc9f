//! The in-memory mirror of a group's durable state, and its loading (with
//! every invariant checked) from the database.

use super::rows::{decode_entry, GroupState};
use super::{redb_error, StorageError, RAFT_LOG, RAFT_STATE};
use crate::core::codec;
use crate::core::ids::GroupId;
use crate::raft::terms::Terms;
use redb::{Database, ReadableDatabase, TableError};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard};

/// Reads a lock even if a thread panicked while holding it: every write
/// under these locks is a single assignment, so the data is never torn.
pub(super) fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// What a [`GroupStorage`](super::GroupStorage) knows without reading the disk; always equal to
/// what is durable.
#[derive(Clone, Debug, Default)]
pub(super) struct Mirror {
    pub(super) state: GroupState,
    /// Terms of the entries `first_index()..=last_index()`, in order.
    pub(super) terms: Terms,
    /// Bumped by every write of the group, so a batch staged against an
    /// older state is refused instead of overwriting newer data.
    pub(super) version: u64,
    /// Set when raft-rs asked for a snapshot that the stored one cannot
    /// serve; the engine answers by taking a fresh one from the state machine.
    pub(super) snapshot_wanted: Arc<AtomicBool>,
    /// The learners of the configuration raft-rs runs with now, as the
    /// engine last noted them. Not durable, like `snapshot_wanted`: applied
    /// membership changes reach the disk only with the next snapshot, and
    /// choosing which snapshot to send needs the current ones.
    pub(super) live_learners: Arc<Mutex<Vec<u64>>>,
}

impl Mirror {
    pub(super) fn first_index(&self) -> u64 {
        self.state.snapshot_index.saturating_add(1)
    }

    pub(super) fn last_index(&self) -> u64 {
        self.state.snapshot_index.saturating_add(self.terms.len())
    }

    /// The term of `index` if it is the snapshot point or in the log.
    pub(super) fn term(&self, index: u64) -> Option<u64> {
        if index == self.state.snapshot_index {
            return Some(self.state.snapshot_term);
        }
        self.terms.get(index.checked_sub(self.first_index())?)
    }
}

/// Loads a group's mirror from the database, verifying everything it reads.
pub(super) fn load_mirror(
    db: &Database,
    group: GroupId,
    initial_voters: &[u64],
) -> Result<Mirror, StorageError> {
    let corrupt = |what: String| StorageError::Corrupt { group, what };
    let txn = db.begin_read().map_err(redb_error)?;
    let state = match txn.open_table(RAFT_STATE) {
        Ok(table) => match table.get(group.0).map_err(redb_error)? {
            Some(bytes) => Some(
                codec::decode::<GroupState>(bytes.value())
                    .map_err(|e| corrupt(format!("state row: {e}")))?,
            ),
            None => None,
        },
        Err(TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(redb_error(e)),
    };
    let log = match txn.open_table(RAFT_LOG) {
        Ok(table) => Some(table),
        Err(TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(redb_error(e)),
    };
    let Some(state) = state else {
        // Every write stores the state row, so entries without one mean the
        // database was damaged or written by something else.
        if let Some(log) = &log {
            if log
                .range((group.0, 0)..=(group.0, u64::MAX))
                .map_err(redb_error)?
                .next()
                .is_some()
            {
                return Err(corrupt("log entries exist without a state row".into()));
            }
        }
        // Nothing persisted: a bootstrap group starts from its voters at
        // index 0 (as raft-rs's `MemStorage::new_with_conf_state`), a joining
        // replica from nothing. Stored by the group's first write.
        let state = GroupState {
            voters: initial_voters.to_vec(),
            ..GroupState::default()
        };
        return Ok(Mirror {
            state,
            ..Mirror::default()
        });
    };
    let mut mirror = Mirror {
        state,
        ..Mirror::default()
    };
    if crate::planted::planted(crate::planted::Bug::ForgetVote) {
        mirror.state.vote = 0;
    }
    if let Some(log) = &log {
        for item in log
            .range((group.0, 0)..=(group.0, u64::MAX))
            .map_err(redb_error)?
        {
            let (key, value) = item.map_err(redb_error)?;
            let (_, index) = key.value();
            let expected = mirror.last_index().saturating_add(1);
            if index != expected {
                return Err(corrupt(format!(
                    "log entry {index} found where entry {expected} was expected"
                )));
            }
            let entry = decode_entry(group, index, value.value())?;
            mirror.terms.push(entry.term);
        }
    }
    mirror.state.check(mirror.last_index()).map_err(corrupt)?;
    Ok(mirror)
}
