//! One engine round's write: what each group stages, checked against its
//! mirror, and how it fills the round's single write transaction.

use super::group::GroupStorage;
use super::mirror::{read, Mirror};
use super::rows::{encode_entry, encode_row, SnapshotRow};
use super::{redb_error, StorageError, RAFT_LOG, RAFT_SNAPSHOT, RAFT_STATE};
use crate::core::ids::GroupId;
use raft::prelude::{ConfState, Entry, HardState, Snapshot};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Puts every staged group into the write transaction.
pub(super) fn fill(txn: &redb::WriteTransaction, staged: &[Staged]) -> Result<(), StorageError> {
    let mut log = txn.open_table(RAFT_LOG).map_err(redb_error)?;
    let mut states = txn.open_table(RAFT_STATE).map_err(redb_error)?;
    let mut snapshots = txn.open_table(RAFT_SNAPSHOT).map_err(redb_error)?;
    for s in staged {
        let g = s.storage.group.0;
        let (first, last) = (s.next.first_index(), s.next.last_index());
        // The durable log was exactly base.first..=base.last; whatever of it
        // falls outside the new range goes, the new entries overwrite the rest.
        if first > s.base.first_index() {
            log.retain_in((g, 0)..(g, first), |_, _| false)
                .map_err(redb_error)?;
        }
        if last < s.base.last_index() {
            log.retain_in((g, last + 1)..=(g, u64::MAX), |_, _| false)
                .map_err(redb_error)?;
        }
        for (&index, bytes) in &s.puts {
            log.insert((g, index), bytes.as_slice())
                .map_err(redb_error)?;
        }
        let state = encode_row(&s.next.state).map_err(|what| StorageError::InvalidWrite {
            group: s.storage.group,
            what: format!("state row {what}"),
        })?;
        states.insert(g, state.as_slice()).map_err(redb_error)?;
        if let Some(row) = &s.snapshot_row {
            snapshots.insert(g, row.as_slice()).map_err(redb_error)?;
        }
    }
    Ok(())
}

/// One group's share of a [`WriteBatch`]: the state it will have after the
/// write, and the database changes that get it there.
pub(super) struct Staged {
    pub(super) storage: GroupStorage,
    /// The mirror when the batch first touched the group (what is durable).
    pub(super) base: Mirror,
    /// The mirror after every operation staged so far.
    pub(super) next: Mirror,
    /// Sealed entries to store, all within `next`'s log range.
    puts: BTreeMap<u64, Vec<u8>>,
    /// The sealed snapshot row to store, if the batch made a new snapshot.
    snapshot_row: Option<Vec<u8>>,
    /// The first invalid operation; the whole batch fails with it.
    pub(super) error: Option<StorageError>,
}

impl Staged {
    fn append(&mut self, entries: &[Entry]) -> Result<(), String> {
        let Some(first) = entries.first() else {
            return Ok(());
        };
        let start = first.index;
        for (offset, entry) in (0u64..).zip(entries) {
            if start.checked_add(offset) != Some(entry.index) {
                return Err(format!(
                    "appended entries are not contiguous: entry {offset} of the batch has index {} after a start of {start}",
                    entry.index
                ));
            }
        }
        if entries.last().map(|e| e.index) == Some(u64::MAX) {
            return Err("appended entries exhaust the index space".into());
        }
        if start <= self.next.state.snapshot_index {
            return Err(format!(
                "append at index {start} would overwrite the log compacted up to {}",
                self.next.state.snapshot_index
            ));
        }
        if start > self.next.last_index().saturating_add(1) {
            return Err(format!(
                "append at index {start} leaves a gap after the last index {}",
                self.next.last_index()
            ));
        }
        let sealed = entries
            .iter()
            .map(|e| encode_entry(e).map(|bytes| (e.index, bytes)))
            .collect::<Result<Vec<_>, _>>()?;
        // Raft's conflict rule: the new entries replace everything from `start` on.
        let keep = start - self.next.first_index();
        self.next.terms.truncate(keep);
        for entry in entries {
            self.next.terms.push(entry.term);
        }
        drop(self.puts.split_off(&start));
        self.puts.extend(sealed);
        Ok(())
    }

    fn compact(
        &mut self,
        index: u64,
        term: u64,
        conf_state: &ConfState,
        data: Vec<u8>,
    ) -> Result<(), String> {
        let state = &self.next.state;
        if index <= state.snapshot_index {
            return Err(format!(
                "compaction at index {index} is not past the snapshot at {}",
                state.snapshot_index
            ));
        }
        if index > state.commit {
            return Err(format!(
                "compaction at index {index} is beyond the commit index {}",
                state.commit
            ));
        }
        match self.next.term(index) {
            Some(stored) if stored == term => {}
            Some(stored) => {
                return Err(format!(
                    "compaction at index {index} claims term {term} but the entry has term {stored}"
                ))
            }
            None => {
                return Err(format!(
                    "compaction at index {index} is beyond the last index {}",
                    self.next.last_index()
                ))
            }
        }
        let row = encode_row(&SnapshotRow::new(index, term, conf_state, data))
            .map_err(|e| format!("snapshot at index {index} {e}"))?;
        let drop = index - self.next.first_index() + 1;
        self.next.terms.drain_front(drop);
        self.puts = self.puts.split_off(&(index + 1));
        let state = &mut self.next.state;
        state.snapshot_index = index;
        state.snapshot_term = term;
        // The snapshot is the state machine through `index`: a restart
        // rebuilds from it, so nothing at or below it needs applying again.
        state.applied = state.applied.max(index);
        // And raft-rs restarts with the membership as of that point; the
        // changes after it are in the log and are applied again in order.
        // (Keeping the older membership here let a restarted node elect
        // itself with a stale configuration: simulator seed 2.)
        state.set_conf_state(conf_state);
        self.snapshot_row = Some(row);
        Ok(())
    }

    fn apply_snapshot(&mut self, snapshot: &Snapshot) -> Result<(), String> {
        let meta = snapshot.get_metadata();
        let index = meta.index;
        if index <= self.next.state.snapshot_index {
            return Err(format!(
                "snapshot at index {index} is not newer than the stored snapshot at {}",
                self.next.state.snapshot_index
            ));
        }
        if index == u64::MAX {
            return Err("snapshot index exhausts the index space".into());
        }
        let row = encode_row(&SnapshotRow::new(
            index,
            meta.term,
            meta.get_conf_state(),
            snapshot.data.to_vec(),
        ))
        .map_err(|e| format!("snapshot at index {index} {e}"))?;
        self.next.terms.clear();
        self.puts.clear();
        let state = &mut self.next.state;
        state.snapshot_index = index;
        state.snapshot_term = meta.term;
        state.set_conf_state(meta.get_conf_state());
        state.term = state.term.max(meta.term);
        state.commit = state.commit.max(index);
        // The state machine is restored from this snapshot, not replayed.
        state.applied = state.applied.max(index);
        self.snapshot_row = Some(row);
        Ok(())
    }
}

/// What one engine round persists, for every group at once.
///
/// Operations are checked as they are staged; the first invalid one makes
/// [`RaftStore::write`](super::RaftStore::write) fail the whole batch without writing anything.
/// A batch stages each group against its state at the group's first
/// operation, so a group must not be written by another batch meanwhile
/// (that write fails with [`StorageError::Conflict`]).
#[derive(Default)]
pub struct WriteBatch {
    pub(super) groups: BTreeMap<GroupId, Staged>,
}

impl WriteBatch {
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Applies `op` to the group's staged state, recording its failure.
    fn stage(
        &mut self,
        storage: &GroupStorage,
        op: impl FnOnce(&mut Staged) -> Result<(), String>,
    ) {
        let group = storage.group;
        let staged = self.groups.entry(group).or_insert_with(|| {
            let base = read(&storage.mem).clone();
            Staged {
                storage: storage.clone(),
                next: base.clone(),
                base,
                puts: BTreeMap::new(),
                snapshot_row: None,
                error: None,
            }
        });
        if staged.error.is_some() {
            return;
        }
        let result = if Arc::ptr_eq(&staged.storage.mem, &storage.mem) {
            op(staged)
        } else {
            Err("two different storages of the group are in one batch".into())
        };
        if let Err(what) = result {
            staged.error = Some(StorageError::InvalidWrite { group, what });
        }
    }

    /// Appends entries, replacing any stored entries at or after the first
    /// new index (raft's conflict rule). The entries must be contiguous,
    /// start after the snapshot index and at most one past the last index.
    pub fn append(&mut self, storage: &GroupStorage, entries: &[Entry]) {
        if !entries.is_empty() {
            self.stage(storage, |s| s.append(entries));
        }
    }

    pub fn set_hard_state(&mut self, storage: &GroupStorage, hs: &HardState) {
        self.stage(storage, |s| {
            let state = &mut s.next.state;
            state.term = hs.term;
            state.vote = hs.vote;
            state.commit = hs.commit;
            Ok(())
        });
    }

    pub fn set_commit(&mut self, storage: &GroupStorage, commit: u64) {
        self.stage(storage, |s| {
            s.next.state.commit = commit;
            Ok(())
        });
    }

    pub fn set_conf_state(&mut self, storage: &GroupStorage, cs: &ConfState) {
        self.stage(storage, |s| {
            s.next.state.set_conf_state(cs);
            Ok(())
        });
    }

    pub fn set_applied(&mut self, storage: &GroupStorage, applied: u64) {
        self.stage(storage, |s| {
            s.next.state.applied = applied;
            Ok(())
        });
    }

    /// A snapshot received from the leader: replaces the whole log (the first
    /// index becomes the snapshot index + 1), takes its conf state, raises
    /// term, commit and applied to at least the snapshot's, and stores its
    /// data. It must be newer than the stored snapshot.
    pub fn apply_snapshot(&mut self, storage: &GroupStorage, snapshot: &Snapshot) {
        self.stage(storage, |s| s.apply_snapshot(snapshot));
    }

    /// The local state machine's snapshot at `index`, whose entry has `term`
    /// and whose membership was `conf_state`: stores it and deletes the log
    /// entries up to `index`. `index` must be committed (the caller makes sure
    /// it is also applied) and past the stored snapshot; applied is raised to
    /// `index`, since a restart rebuilds the state machine from the snapshot.
    pub fn compact(
        &mut self,
        storage: &GroupStorage,
        index: u64,
        term: u64,
        conf_state: &ConfState,
        data: Vec<u8>,
    ) {
        self.stage(storage, |s| s.compact(index, term, conf_state, data));
    }
}
