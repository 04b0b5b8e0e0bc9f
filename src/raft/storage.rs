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
//! - `raft_log`: `(group, index)` → the protobuf [`Entry`] in a sealed
//!   [`FrameKind::Row`] envelope.
//! - `raft_state`: `group` → the [`GroupState`] (`codec::encode`).
//! - `raft_snapshot`: `group` → the latest snapshot: its index, term, conf
//!   state and data (`codec::encode`). The metadata lives with the data so
//!   that the snapshot handed to a follower always describes exactly the
//!   bytes it carries.
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

use crate::core::codec::{self, FrameKind, Wire};
use crate::core::ids::GroupId;
use crate::raft::terms::Terms;
use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, Snapshot, SnapshotMetadata};
use raft::{GetEntriesContext, RaftState};
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition, TableError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock, RwLockReadGuard, Weak};

/// `(group, index)` → sealed protobuf [`Entry`].
const RAFT_LOG: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("raft_log");
/// `group` → encoded [`GroupState`].
const RAFT_STATE: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_state");
/// `group` → encoded snapshot (metadata and data).
const RAFT_SNAPSHOT: TableDefinition<u64, &[u8]> = TableDefinition::new("raft_snapshot");

/// Everything about a group except its log entries and snapshot data.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupState {
    pub term: u64,
    pub vote: u64,
    pub commit: u64,
    pub voters: Vec<u64>,
    pub learners: Vec<u64>,
    pub voters_outgoing: Vec<u64>,
    pub learners_next: Vec<u64>,
    pub auto_leave: bool,
    /// The log is compacted up to here: the first stored entry is the next one.
    pub snapshot_index: u64,
    /// The term of the entry at `snapshot_index` (kept for raft's log matching).
    pub snapshot_term: u64,
    /// The state machine has applied the log up to here.
    pub applied: u64,
}

impl Wire for GroupState {
    const KIND: FrameKind = FrameKind::Row;
}

impl GroupState {
    fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.commit,
            ..HardState::default()
        }
    }

    fn conf_state(&self) -> ConfState {
        ConfState {
            voters: self.voters.clone(),
            learners: self.learners.clone(),
            voters_outgoing: self.voters_outgoing.clone(),
            learners_next: self.learners_next.clone(),
            auto_leave: self.auto_leave,
            ..ConfState::default()
        }
    }

    fn set_conf_state(&mut self, cs: &ConfState) {
        self.voters = cs.voters.clone();
        self.learners = cs.learners.clone();
        self.voters_outgoing = cs.voters_outgoing.clone();
        self.learners_next = cs.learners_next.clone();
        self.auto_leave = cs.auto_leave;
    }

    /// The ordering raft-rs relies on when it restarts from this state.
    fn check(&self, last_index: u64) -> Result<(), String> {
        if self.snapshot_index > self.applied {
            return Err(format!(
                "applied index {} is below the snapshot index {}",
                self.applied, self.snapshot_index
            ));
        }
        if self.applied > self.commit {
            return Err(format!(
                "applied index {} is beyond the commit index {}",
                self.applied, self.commit
            ));
        }
        if self.commit > last_index {
            return Err(format!(
                "commit index {} is beyond the last log index {last_index}",
                self.commit
            ));
        }
        Ok(())
    }
}

/// The stored snapshot: metadata and data together.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct SnapshotRow {
    index: u64,
    term: u64,
    conf: GroupState,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

impl Wire for SnapshotRow {
    const KIND: FrameKind = FrameKind::Row;
}

impl SnapshotRow {
    fn new(index: u64, term: u64, cs: &ConfState, data: Vec<u8>) -> Self {
        // Only the conf-state fields of `conf` are used; reusing GroupState
        // keeps one encoding of a conf state on disk.
        let mut conf = GroupState::default();
        conf.set_conf_state(cs);
        SnapshotRow {
            index,
            term,
            conf,
            data,
        }
    }

    /// Whether the snapshot's membership names `peer` in any role.
    fn names(&self, peer: u64) -> bool {
        let c = &self.conf;
        [&c.voters, &c.learners, &c.voters_outgoing, &c.learners_next]
            .iter()
            .any(|ids| ids.contains(&peer))
    }

    fn metadata(&self) -> SnapshotMetadata {
        let mut meta = SnapshotMetadata {
            index: self.index,
            term: self.term,
            ..SnapshotMetadata::default()
        };
        meta.set_conf_state(self.conf.conf_state());
        meta
    }
}

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
}

impl From<StorageError> for raft::Error {
    fn from(e: StorageError) -> Self {
        raft::Error::Store(raft::StorageError::Other(Box::new(e)))
    }
}

fn redb_error(e: impl std::fmt::Display) -> StorageError {
    StorageError::Redb(e.to_string())
}

/// Encodes a row like `codec::encode`, but refuses (instead of panicking on)
/// a value too large for one frame.
fn encode_row<T: Wire>(value: &T) -> Result<Vec<u8>, String> {
    let body = postcard::to_allocvec(value).map_err(|e| format!("does not encode: {e}"))?;
    seal_body(T::KIND, &body)
}

fn seal_body(kind: FrameKind, body: &[u8]) -> Result<Vec<u8>, String> {
    if body.len() > codec::MAX_BODY_LEN {
        return Err(format!(
            "encodes to {} bytes, over the {}-byte frame limit",
            body.len(),
            codec::MAX_BODY_LEN
        ));
    }
    Ok(codec::seal(kind, codec::FORMAT_VERSION, body))
}

fn encode_entry(entry: &Entry) -> Result<Vec<u8>, String> {
    let body = entry
        .write_to_bytes()
        .map_err(|e| format!("entry {} does not encode: {e}", entry.index))?;
    seal_body(FrameKind::Row, &body).map_err(|e| format!("entry {} {e}", entry.index))
}

/// Decodes the entry stored under `(group, index)` and checks it names that index.
fn decode_entry(group: GroupId, index: u64, bytes: &[u8]) -> Result<Entry, StorageError> {
    let corrupt = |what: String| StorageError::Corrupt { group, what };
    let envelope = codec::open(FrameKind::Row, bytes)
        .map_err(|e| corrupt(format!("log entry {index}: {e}")))?;
    let entry: Entry = codec::parse_protobuf(envelope.body)
        .map_err(|e| corrupt(format!("log entry {index} does not decode: {e}")))?;
    if entry.index != index {
        return Err(corrupt(format!(
            "log entry stored at {index} names index {}",
            entry.index
        )));
    }
    Ok(entry)
}

/// Reads a lock even if a thread panicked while holding it: every write
/// under these locks is a single assignment, so the data is never torn.
fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// What a [`GroupStorage`] knows without reading the disk; always equal to
/// what is durable.
#[derive(Clone, Debug, Default)]
struct Mirror {
    state: GroupState,
    /// Terms of the entries `first_index()..=last_index()`, in order.
    terms: Terms,
    /// Bumped by every write of the group, so a batch staged against an
    /// older state is refused instead of overwriting newer data.
    version: u64,
    /// Set when raft-rs asked for a snapshot that the stored one cannot
    /// serve; the engine answers by taking a fresh one from the state machine.
    snapshot_wanted: Arc<AtomicBool>,
}

impl Mirror {
    fn first_index(&self) -> u64 {
        self.state.snapshot_index.saturating_add(1)
    }

    fn last_index(&self) -> u64 {
        self.state.snapshot_index.saturating_add(self.terms.len())
    }

    /// The term of `index` if it is the snapshot point or in the log.
    fn term(&self, index: u64) -> Option<u64> {
        if index == self.state.snapshot_index {
            return Some(self.state.snapshot_term);
        }
        self.terms.get(index.checked_sub(self.first_index())?)
    }
}

/// Loads a group's mirror from the database, verifying everything it reads.
fn load_mirror(
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
    /// its data must not leak), durably. The group must be closed: a group
    /// with a live handle is refused, since that handle would keep serving
    /// state that is no longer on disk.
    pub fn destroy_group(&self, group: GroupId) -> Result<(), StorageError> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.get(&group).is_some_and(|m| m.strong_count() > 0) {
            return Err(StorageError::Conflict { group });
        }
        open.remove(&group);
        let txn = begin_durable_write(&self.db, Durability::Immediate)?;
        let deleted = delete_group(&txn, group);
        if let Err(e) = deleted {
            let _ = txn.abort();
            return Err(e);
        }
        txn.commit().map_err(redb_error)
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

/// Puts every staged group into the write transaction.
fn fill(txn: &redb::WriteTransaction, staged: &[Staged]) -> Result<(), StorageError> {
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
struct Staged {
    storage: GroupStorage,
    /// The mirror when the batch first touched the group (what is durable).
    base: Mirror,
    /// The mirror after every operation staged so far.
    next: Mirror,
    /// Sealed entries to store, all within `next`'s log range.
    puts: BTreeMap<u64, Vec<u8>>,
    /// The sealed snapshot row to store, if the batch made a new snapshot.
    snapshot_row: Option<Vec<u8>>,
    /// The first invalid operation; the whole batch fails with it.
    error: Option<StorageError>,
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
/// [`RaftStore::write`] fail the whole batch without writing anything.
/// A batch stages each group against its state at the group's first
/// operation, so a group must not be written by another batch meanwhile
/// (that write fails with [`StorageError::Conflict`]).
#[derive(Default)]
pub struct WriteBatch {
    groups: BTreeMap<GroupId, Staged>,
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

/// The storage of one Raft group, as raft-rs's `RawNode` uses it. Cheap to
/// clone; clones share the group's state.
#[derive(Clone)]
pub struct GroupStorage {
    group: GroupId,
    db: Arc<Database>,
    mem: Arc<RwLock<Mirror>>,
}

impl GroupStorage {
    /// Whether raft-rs asked for a snapshot the stored one could not serve.
    pub fn snapshot_wanted(&self) -> bool {
        read(&self.mem).snapshot_wanted.load(Ordering::Relaxed)
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
    pub fn group(&self) -> GroupId {
        self.group
    }

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

    /// The stored snapshot. Snapshots are made by compaction (or received),
    /// not on demand, so a follower asking for a newer one than is stored
    /// waits: raft retries after `SnapshotTemporarilyUnavailable`.
    /// The stored snapshot, if it is recent enough and its membership
    /// includes `to` (raft-rs refuses a snapshot whose configuration does not
    /// name it, so sending one would leave the peer stuck). Otherwise asks
    /// for a fresh snapshot and reports it temporarily unavailable; raft-rs
    /// asks again on its next probe.
    fn snapshot(&self, request_index: u64, to: u64) -> raft::Result<Snapshot> {
        match self.snapshot_row()? {
            Some(row) if row.index >= request_index && row.names(to) => {
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use raft::storage::MemStorage;
    use raft::{RawNode, Storage};
    use redb::backends::InMemoryBackend;
    use std::path::Path;

    const G1: GroupId = GroupId(1);

    /// Compaction records the membership at the snapshot point, which is
    /// what a restart must begin from (simulator seed 2 found a restarted
    /// node electing itself under the older, single-voter configuration).
    #[test]
    fn compaction_persists_the_membership_at_the_snapshot() {
        let db = memory_db();
        let store = RaftStore::new(Arc::clone(&db));
        let storage = store.open_group(G1, &[1]).expect("open");
        let mut batch = WriteBatch::default();
        batch.append(&storage, &[entry(1, 1), entry(2, 1), entry(3, 1)]);
        let hs = HardState {
            term: 1,
            commit: 3,
            ..Default::default()
        };
        batch.set_hard_state(&storage, &hs);
        store.write(batch).expect("write");
        let grown = ConfState {
            voters: vec![1, 2, 4],
            ..Default::default()
        };
        let mut batch = WriteBatch::default();
        batch.compact(&storage, 3, 1, &grown, b"state".to_vec());
        store.write(batch).expect("compact");
        drop(storage);
        let reopened = RaftStore::new(db).open_group(G1, &[]).expect("reopen");
        let state = reopened.initial_state().expect("initial state");
        assert_eq!(state.conf_state.voters, vec![1, 2, 4]);
    }
    const G2: GroupId = GroupId(2);
    const G3: GroupId = GroupId(3);

    fn memory_db() -> Arc<Database> {
        Arc::new(
            Database::builder()
                .create_with_backend(InMemoryBackend::new())
                .expect("in-memory database"),
        )
    }

    fn file_db(path: &Path) -> Arc<Database> {
        Arc::new(Database::create(path).expect("file database"))
    }

    /// Every write commits in two phases (see [`begin_durable_write`]).
    /// redb flags a primary committed so in its god byte: byte 9 of the
    /// file, flag 4.
    #[test]
    fn writes_commit_in_two_phases() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft.redb");
        let db = file_db(&path);
        let two_phase = || std::fs::read(&path).expect("read the file")[9] & 4 != 0;
        let one_phase_commit = || db.begin_write().expect("begin").commit().expect("commit");
        let store = RaftStore::new(Arc::clone(&db));
        one_phase_commit();
        assert!(!two_phase(), "a plain redb commit is one phase");
        let storage = store.open_group(G1, &[1]).expect("open");
        let mut batch = WriteBatch::default();
        batch.append(&storage, &[entry(1, 1)]);
        store.write(batch).expect("write");
        assert!(two_phase(), "a batch write");
        drop(storage);
        one_phase_commit();
        store.destroy_group(G1).expect("destroy");
        assert!(two_phase(), "a group's destruction");
    }

    fn entry(index: u64, term: u64) -> Entry {
        Entry {
            index,
            term,
            data: format!("entry {index} of term {term}").into_bytes().into(),
            ..Entry::default()
        }
    }

    fn entries(indexes: std::ops::RangeInclusive<u64>, term: u64) -> Vec<Entry> {
        indexes.map(|i| entry(i, term)).collect()
    }

    fn conf(voters: &[u64], learners: &[u64]) -> ConfState {
        ConfState::from((voters.iter().copied(), learners.iter().copied()))
    }

    fn hard_state(term: u64, vote: u64, commit: u64) -> HardState {
        HardState {
            term,
            vote,
            commit,
            ..HardState::default()
        }
    }

    fn read_all(storage: &GroupStorage, low: u64, high: u64) -> raft::Result<Vec<Entry>> {
        storage.entries(low, high, None, GetEntriesContext::empty(false))
    }

    fn write(store: &RaftStore, f: impl FnOnce(&mut WriteBatch)) -> Result<(), StorageError> {
        let mut batch = WriteBatch::default();
        f(&mut batch);
        store.write(batch)
    }

    /// The storage error inside a raft error, if it is one of ours.
    fn ours(error: &raft::Error) -> Option<&StorageError> {
        match error {
            raft::Error::Store(raft::StorageError::Other(inner)) => inner.downcast_ref(),
            _ => None,
        }
    }

    fn compacted<T>() -> raft::Result<T> {
        Err(raft::Error::Store(raft::StorageError::Compacted))
    }

    fn unavailable<T>() -> raft::Result<T> {
        Err(raft::Error::Store(raft::StorageError::Unavailable))
    }

    fn put_raw_entry(db: &Database, group: GroupId, index: u64, bytes: &[u8]) {
        let txn = db.begin_write().expect("begin write");
        {
            let mut table = txn.open_table(RAFT_LOG).expect("open log");
            table.insert((group.0, index), bytes).expect("insert");
        }
        txn.commit().expect("commit");
    }

    fn stored_keys(db: &Database, group: GroupId) -> Vec<u64> {
        let txn = db.begin_read().expect("begin read");
        let table = txn.open_table(RAFT_LOG).expect("open log");
        table
            .range((group.0, 0)..=(group.0, u64::MAX))
            .expect("range")
            .map(|item| item.expect("item").0.value().1)
            .collect()
    }

    /// A group with entries 1..=5 of term 1, all committed.
    fn five_entries(store: &RaftStore, group: GroupId) -> GroupStorage {
        let storage = store.open_group(group, &[1]).expect("open");
        write(store, |b| {
            b.append(&storage, &entries(1..=5, 1));
            b.set_commit(&storage, 5);
        })
        .expect("write");
        storage
    }

    #[test]
    fn group_storage_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<GroupStorage>();
        check::<RaftStore>();
        check::<WriteBatch>();
    }

    #[test]
    fn a_bootstrap_group_starts_from_its_voters_and_a_joining_one_from_nothing() {
        let store = RaftStore::new(memory_db());
        let boot = store.open_group(G1, &[1, 2, 3]).expect("open");
        let state = boot.initial_state().expect("state");
        assert!(state.initialized());
        assert_eq!(state.conf_state.voters, vec![1, 2, 3]);
        assert_eq!((boot.first_index(), boot.last_index()), (1, 0));
        assert_eq!(boot.term(0), Ok(0));
        let joining = store.open_group(G2, &[]).expect("open");
        assert!(!joining.initial_state().expect("state").initialized());
        // Nothing is persisted until the first write.
        assert_eq!(store.groups(), Ok(vec![]));
        write(&store, |b| b.set_applied(&boot, 0)).expect("write");
        assert_eq!(store.groups(), Ok(vec![G1]));
        assert_eq!(
            RaftStore::new(Arc::clone(&store.db))
                .open_group(G1, &[])
                .expect("reopen")
                .conf_state()
                .voters,
            vec![1, 2, 3]
        );
    }

    #[test]
    fn appended_entries_read_back_with_terms_and_bounds() {
        let store = RaftStore::new(memory_db());
        let storage = store.open_group(G1, &[1]).expect("open");
        let mut ents = entries(1..=3, 1);
        ents.extend(entries(4..=5, 2));
        write(&store, |b| b.append(&storage, &ents)).expect("write");
        assert_eq!((storage.first_index(), storage.last_index()), (1, 5));
        assert_eq!(Storage::first_index(&storage), Ok(1));
        assert_eq!(Storage::last_index(&storage), Ok(5));
        assert_eq!(read_all(&storage, 1, 6), Ok(ents.clone()));
        assert_eq!(read_all(&storage, 2, 4), Ok(ents[1..3].to_vec()));
        assert_eq!(read_all(&storage, 3, 3), Ok(vec![]));
        assert_eq!(storage.term(0), Ok(0));
        assert_eq!(storage.term(3), Ok(1));
        assert_eq!(storage.term(4), Ok(2));
        assert_eq!(storage.term(6), unavailable());
        assert_eq!(read_all(&storage, 0, 2), compacted());
        assert_eq!(read_all(&storage, 1, 7), unavailable());
        assert_eq!(read_all(&storage, 4, 3), unavailable());
        // max_size: always at least one entry, then as many as fit.
        let one = u64::from(ents[0].compute_size());
        let ctx = || GetEntriesContext::empty(false);
        assert_eq!(storage.entries(1, 6, 0, ctx()), Ok(ents[..1].to_vec()));
        assert_eq!(
            storage.entries(1, 6, 2 * one, ctx()),
            Ok(ents[..2].to_vec())
        );
        assert_eq!(
            storage.entries(1, 6, raft::NO_LIMIT, ctx()),
            Ok(ents.clone())
        );
    }

    #[test]
    fn a_conflicting_append_truncates_the_suffix_durably() {
        let db = memory_db();
        let store = RaftStore::new(Arc::clone(&db));
        let storage = store.open_group(G1, &[1]).expect("open");
        write(&store, |b| {
            b.append(&storage, &entries(1..=5, 1));
            b.set_commit(&storage, 2);
        })
        .expect("write");
        write(&store, |b| b.append(&storage, &entries(3..=4, 2))).expect("truncate");
        let mut expected = entries(1..=2, 1);
        expected.extend(entries(3..=4, 2));
        assert_eq!(storage.last_index(), 4);
        assert_eq!(storage.term(3), Ok(2));
        assert_eq!(storage.term(5), unavailable());
        assert_eq!(read_all(&storage, 1, 5), Ok(expected.clone()));
        assert_eq!(stored_keys(&db, G1), vec![1, 2, 3, 4]);
        // The same batch can truncate what it appended itself.
        write(&store, |b| {
            b.append(&storage, &entries(5..=8, 2));
            b.append(&storage, &entries(4..=5, 3));
        })
        .expect("write");
        expected.truncate(3);
        expected.extend(entries(4..=5, 3));
        assert_eq!(read_all(&storage, 1, 6), Ok(expected.clone()));
        assert_eq!(stored_keys(&db, G1), vec![1, 2, 3, 4, 5]);
        let reopened = RaftStore::new(db).open_group(G1, &[]).expect("reopen");
        assert_eq!(read_all(&reopened, 1, 6), Ok(expected));
    }

    #[test]
    fn invalid_operations_fail_the_whole_batch_and_change_nothing() {
        let db = memory_db();
        let store = RaftStore::new(Arc::clone(&db));
        let storage = five_entries(&store, G1);
        let other = store.open_group(G2, &[1]).expect("open");
        let mut shifted = entries(6..=7, 1);
        shifted[1].index = 9;
        type Case<'a> = (&'a str, Box<dyn Fn(&mut WriteBatch) + 'a>);
        let cases: Vec<Case> = vec![
            ("gap", Box::new(|b| b.append(&storage, &entries(7..=8, 1)))),
            ("not contiguous", Box::new(|b| b.append(&storage, &shifted))),
            (
                "index space",
                Box::new(|b| b.append(&storage, &[entry(u64::MAX, 1)])),
            ),
            (
                "truncates below commit",
                Box::new(|b| b.append(&storage, &entries(3..=4, 2))),
            ),
            ("commit beyond log", Box::new(|b| b.set_commit(&storage, 6))),
            (
                "applied beyond commit",
                Box::new(|b| b.set_applied(&storage, 6)),
            ),
            (
                "compaction beyond commit",
                Box::new(|b| {
                    b.append(&storage, &entries(6..=6, 1));
                    b.compact(&storage, 6, 1, &conf(&[1], &[]), vec![]);
                }),
            ),
            (
                "compaction with the wrong term",
                Box::new(|b| b.compact(&storage, 3, 2, &conf(&[1], &[]), vec![])),
            ),
            (
                "compaction beyond the log",
                Box::new(|b| {
                    b.set_commit(&storage, 5);
                    b.compact(&storage, 9, 1, &conf(&[1], &[]), vec![]);
                }),
            ),
            (
                "compaction at the snapshot",
                Box::new(|b| b.compact(&storage, 0, 0, &conf(&[1], &[]), vec![])),
            ),
            (
                "stale snapshot",
                Box::new(|b| {
                    b.apply_snapshot(&storage, &Snapshot::default());
                }),
            ),
            (
                "one bad group fails the others",
                Box::new(|b| {
                    b.append(&other, &entries(1..=1, 1));
                    b.append(&storage, &entries(9..=9, 1));
                }),
            ),
        ];
        let before = read_all(&storage, 1, 6).expect("read");
        for (name, case) in cases {
            let result = write(&store, |b| case(b));
            assert!(
                matches!(result, Err(StorageError::InvalidWrite { .. })),
                "{name}: {result:?}"
            );
            assert_eq!(read_all(&storage, 1, 6), Ok(before.clone()), "{name}");
            assert_eq!(storage.hard_state(), hard_state(0, 0, 5), "{name}");
            assert_eq!((storage.applied(), storage.first_index()), (0, 1), "{name}");
            assert_eq!(stored_keys(&db, G1), vec![1, 2, 3, 4, 5], "{name}");
            assert_eq!(other.last_index(), 0, "{name}");
        }
        assert_eq!(store.groups(), Ok(vec![G1]));
        // A storage of another database is refused too.
        let foreign_store = RaftStore::new(memory_db());
        let foreign = foreign_store.open_group(G3, &[1]).expect("open");
        let result = write(&store, |b| b.set_applied(&foreign, 0));
        assert!(matches!(result, Err(StorageError::InvalidWrite { .. })));
        assert_eq!(store.groups(), Ok(vec![G1]));
    }

    #[test]
    fn a_batch_staged_before_another_write_is_refused() {
        let store = RaftStore::new(memory_db());
        let storage = five_entries(&store, G1);
        let mut first = WriteBatch::default();
        first.append(&storage, &entries(6..=6, 1));
        let mut second = WriteBatch::default();
        second.append(&storage, &entries(6..=7, 1));
        store.write(first).expect("first write");
        assert_eq!(
            store.write(second),
            Err(StorageError::Conflict { group: G1 })
        );
        assert_eq!(storage.last_index(), 6);
    }

    #[test]
    fn opening_an_open_group_shares_its_state() {
        let store = RaftStore::new(memory_db());
        let a = store.open_group(G1, &[1]).expect("open");
        let b = store.open_group(G1, &[7]).expect("open again");
        write(&store, |batch| batch.append(&a, &entries(1..=2, 1))).expect("write");
        assert_eq!(b.last_index(), 2);
        assert_eq!(b.conf_state().voters, vec![1]);
    }

    #[test]
    fn hard_state_conf_state_and_applied_survive_a_reopen_from_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft.redb");
        let cs = {
            let mut cs = conf(&[1, 2, 3], &[4]);
            cs.voters_outgoing = vec![1, 2, 5];
            cs.learners_next = vec![5];
            cs.auto_leave = true;
            cs
        };
        {
            let store = RaftStore::new(file_db(&path));
            let g1 = store.open_group(G1, &[1]).expect("open");
            let g2 = store.open_group(G2, &[1]).expect("open");
            write(&store, |b| {
                b.append(&g1, &entries(1..=4, 3));
                b.set_hard_state(&g1, &hard_state(3, 2, 4));
                b.set_conf_state(&g1, &cs);
                b.set_applied(&g1, 3);
                b.append(&g2, &entries(1..=1, 1));
            })
            .expect("write");
        }
        let store = RaftStore::new(file_db(&path));
        assert_eq!(store.groups(), Ok(vec![G1, G2]));
        let g1 = store.open_group(G1, &[9]).expect("reopen");
        let state = g1.initial_state().expect("state");
        assert_eq!(state.hard_state, hard_state(3, 2, 4));
        assert_eq!(state.conf_state, cs);
        assert_eq!(g1.applied(), 3);
        assert_eq!((g1.first_index(), g1.last_index()), (1, 4));
        assert_eq!(read_all(&g1, 1, 5), Ok(entries(1..=4, 3)));
        let g2 = store.open_group(G2, &[]).expect("reopen");
        assert_eq!(read_all(&g2, 1, 2), Ok(entries(1..=1, 1)));
    }

    #[test]
    fn compaction_stores_the_snapshot_and_drops_the_prefix() {
        let db = memory_db();
        let store = RaftStore::new(Arc::clone(&db));
        let storage = store.open_group(G1, &[1]).expect("open");
        assert_eq!(storage.snapshot_data(), Ok(None));
        assert_eq!(
            storage.snapshot(0, 2),
            Err(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable
            ))
        );
        let mut ents = entries(1..=3, 1);
        ents.extend(entries(4..=6, 2));
        let cs = conf(&[1, 2], &[3]);
        write(&store, |b| {
            b.append(&storage, &ents);
            b.set_commit(&storage, 5);
            b.compact(&storage, 4, 2, &cs, b"state at 4".to_vec());
        })
        .expect("write");
        assert_eq!((storage.first_index(), storage.last_index()), (5, 6));
        assert_eq!(storage.applied(), 4);
        assert_eq!(storage.term(4), Ok(2));
        assert_eq!(storage.term(3), compacted());
        assert_eq!(read_all(&storage, 4, 7), compacted());
        assert_eq!(read_all(&storage, 5, 7), Ok(ents[4..].to_vec()));
        assert_eq!(stored_keys(&db, G1), vec![5, 6]);
        let snapshot = storage.snapshot(0, 2).expect("snapshot");
        assert_eq!(snapshot.get_data(), b"state at 4");
        let meta = snapshot.get_metadata();
        assert_eq!((meta.index, meta.term), (4, 2));
        assert_eq!(meta.get_conf_state(), &cs);
        assert_eq!(storage.snapshot(4, 2), Ok(snapshot.clone()));
        assert_eq!(
            storage.snapshot(5, 2),
            Err(raft::Error::Store(
                raft::StorageError::SnapshotTemporarilyUnavailable
            ))
        );
        let (data_meta, data) = storage.snapshot_data().expect("read").expect("stored");
        assert_eq!((data_meta, data), (meta.clone(), b"state at 4".to_vec()));
        let reopened = RaftStore::new(db).open_group(G1, &[]).expect("reopen");
        assert_eq!((reopened.first_index(), reopened.last_index()), (5, 6));
        assert_eq!(reopened.term(4), Ok(2));
        assert_eq!(reopened.snapshot(0, 2), Ok(snapshot));
    }

    #[test]
    fn an_applied_snapshot_replaces_the_log() {
        let db = memory_db();
        let store = RaftStore::new(Arc::clone(&db));
        let storage = store.open_group(G1, &[]).expect("open");
        write(&store, |b| {
            b.append(&storage, &entries(1..=5, 1));
            b.set_hard_state(&storage, &hard_state(1, 1, 3));
        })
        .expect("write");
        let mut snapshot = Snapshot {
            data: b"leader state".to_vec().into(),
            ..Snapshot::default()
        };
        snapshot.mut_metadata().index = 10;
        snapshot.mut_metadata().term = 4;
        snapshot
            .mut_metadata()
            .set_conf_state(conf(&[1, 2, 3], &[]));
        write(&store, |b| b.apply_snapshot(&storage, &snapshot)).expect("write");
        assert_eq!((storage.first_index(), storage.last_index()), (11, 10));
        assert_eq!(storage.term(10), Ok(4));
        assert_eq!(storage.hard_state(), hard_state(4, 1, 10));
        assert_eq!(storage.applied(), 10);
        assert_eq!(storage.conf_state(), conf(&[1, 2, 3], &[]));
        assert_eq!(read_all(&storage, 1, 6), compacted());
        assert_eq!(stored_keys(&db, G1), Vec::<u64>::new());
        assert_eq!(storage.snapshot(10, 2), Ok(snapshot.clone()));
        // The log continues after the snapshot.
        write(&store, |b| b.append(&storage, &entries(11..=12, 4))).expect("write");
        let reopened = RaftStore::new(db).open_group(G1, &[]).expect("reopen");
        assert_eq!(reopened.hard_state(), hard_state(4, 1, 10));
        assert_eq!(read_all(&reopened, 11, 13), Ok(entries(11..=12, 4)));
        assert_eq!(reopened.snapshot(0, 2), Ok(snapshot));
    }

    #[test]
    fn groups_in_one_batch_are_isolated() {
        let db = memory_db();
        let store = RaftStore::new(Arc::clone(&db));
        let groups: Vec<GroupStorage> = [G1, G2, G3]
            .iter()
            .map(|&g| store.open_group(g, &[1]).expect("open"))
            .collect();
        write(&store, |b| {
            for (term, storage) in (1..).zip(&groups) {
                b.append(storage, &entries(1..=5, term));
                b.set_hard_state(storage, &hard_state(term, 1, 5));
            }
        })
        .expect("write");
        // The middle group drops its whole log; its neighbours keep theirs.
        let mut snapshot = Snapshot::default();
        snapshot.mut_metadata().index = 7;
        snapshot.mut_metadata().term = 9;
        write(&store, |b| {
            b.apply_snapshot(&groups[1], &snapshot);
            b.compact(&groups[2], 2, 3, &conf(&[1], &[]), vec![3]);
        })
        .expect("write");
        assert_eq!(stored_keys(&db, G1), vec![1, 2, 3, 4, 5]);
        assert_eq!(stored_keys(&db, G2), Vec::<u64>::new());
        assert_eq!(stored_keys(&db, G3), vec![3, 4, 5]);
        let reopened = RaftStore::new(db);
        assert_eq!(reopened.groups(), Ok(vec![G1, G2, G3]));
        let g1 = reopened.open_group(G1, &[]).expect("open");
        assert_eq!(read_all(&g1, 1, 6), Ok(entries(1..=5, 1)));
        assert_eq!(g1.hard_state(), hard_state(1, 1, 5));
        let g2 = reopened.open_group(G2, &[]).expect("open");
        assert_eq!((g2.first_index(), g2.last_index()), (8, 7));
        let g3 = reopened.open_group(G3, &[]).expect("open");
        assert_eq!(read_all(&g3, 3, 6), Ok(entries(3..=5, 3)));
        assert_eq!(
            g3.snapshot_data().expect("read").map(|s| s.1),
            Some(vec![3])
        );
    }

    #[test]
    fn corrupt_log_entries_are_clean_errors() {
        let db = memory_db();
        let store = RaftStore::new(Arc::clone(&db));
        let storage = five_entries(&store, G1);
        let good = encode_entry(&entry(2, 1)).expect("encode");
        let mut flipped = good.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 0x01;
        let misplaced = encode_entry(&entry(3, 1)).expect("encode");
        let not_protobuf = codec::seal(FrameKind::Row, codec::FORMAT_VERSION, &[0xFF; 7]);
        for bad in [b"garbage".to_vec(), flipped, misplaced, not_protobuf] {
            put_raw_entry(&db, G1, 2, &bad);
            let error = read_all(&storage, 1, 4).expect_err("corrupt entry served");
            assert!(
                matches!(ours(&error), Some(StorageError::Corrupt { group: G1, .. })),
                "{error:?}"
            );
            assert!(matches!(
                RaftStore::new(Arc::clone(&db)).open_group(G1, &[]),
                Err(StorageError::Corrupt { group: G1, .. })
            ));
            // Other entries still read.
            assert_eq!(read_all(&storage, 3, 6), Ok(entries(3..=5, 1)));
        }
        put_raw_entry(&db, G1, 2, &good);
        assert_eq!(read_all(&storage, 1, 6), Ok(entries(1..=5, 1)));
        // A missing entry, a stray one, and entries without a state row.
        {
            let txn = db.begin_write().expect("begin write");
            txn.open_table(RAFT_LOG)
                .expect("open log")
                .remove((G1.0, 3))
                .expect("remove");
            txn.commit().expect("commit");
        }
        let error = read_all(&storage, 1, 6).expect_err("gap served");
        assert!(matches!(ours(&error), Some(StorageError::Corrupt { .. })));
        let three = 3 * u64::from(entry(1, 1).compute_size());
        let error = storage
            .entries(1, 6, three, GetEntriesContext::empty(false))
            .expect_err("gap served within the size limit");
        assert!(matches!(ours(&error), Some(StorageError::Corrupt { .. })));
        assert!(matches!(
            RaftStore::new(Arc::clone(&db)).open_group(G1, &[]),
            Err(StorageError::Corrupt { .. })
        ));
        // A stray entry below the snapshot index.
        let storage2 = five_entries(&store, G2);
        write(&store, |b| {
            b.compact(&storage2, 2, 1, &conf(&[1], &[]), vec![]);
        })
        .expect("compact");
        put_raw_entry(&db, G2, 1, &encode_entry(&entry(1, 1)).expect("encode"));
        assert!(matches!(
            RaftStore::new(Arc::clone(&db)).open_group(G2, &[]),
            Err(StorageError::Corrupt { group: G2, .. })
        ));
        put_raw_entry(&db, G3, 1, &encode_entry(&entry(1, 1)).expect("encode"));
        assert!(matches!(
            store.open_group(G3, &[1]),
            Err(StorageError::Corrupt { group: G3, .. })
        ));
    }

    #[test]
    fn corrupt_state_and_snapshot_rows_are_clean_errors() {
        let db = memory_db();
        let store = RaftStore::new(Arc::clone(&db));
        let storage = five_entries(&store, G1);
        write(&store, |b| {
            b.compact(&storage, 2, 1, &conf(&[1], &[]), vec![1, 2])
        })
        .expect("write");
        let put = |table: TableDefinition<u64, &[u8]>, bytes: &[u8]| {
            let txn = db.begin_write().expect("begin write");
            txn.open_table(table)
                .expect("open")
                .insert(G1.0, bytes)
                .expect("insert");
            txn.commit().expect("commit");
        };
        put(RAFT_SNAPSHOT, b"not a snapshot");
        assert!(matches!(
            storage.snapshot_data(),
            Err(StorageError::Corrupt { group: G1, .. })
        ));
        let error = storage.snapshot(0, 2).expect_err("corrupt snapshot served");
        assert!(matches!(ours(&error), Some(StorageError::Corrupt { .. })));
        put(RAFT_STATE, b"not a state");
        assert!(matches!(
            RaftStore::new(Arc::clone(&db)).open_group(G1, &[]),
            Err(StorageError::Corrupt { group: G1, .. })
        ));
        // A state that decodes but breaks raft's ordering is corrupt too.
        let broken = GroupState {
            commit: 9,
            snapshot_index: 2,
            applied: 2,
            ..GroupState::default()
        };
        put(RAFT_STATE, &codec::encode(&broken));
        assert!(matches!(
            RaftStore::new(Arc::clone(&db)).open_group(G1, &[]),
            Err(StorageError::Corrupt { group: G1, .. })
        ));
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Append `len` entries starting at a point chosen by `at` among the
        /// indexes raft could append at.
        Append { at: u64, len: u64 },
        /// Commit everything appended so far.
        Commit,
        /// Compact at a committed index chosen by `at`.
        Compact { at: u64 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            3 => (any::<u64>(), 1..6u64).prop_map(|(at, len)| Op::Append { at, len }),
            1 => Just(Op::Commit),
            1 => any::<u64>().prop_map(|at| Op::Compact { at }),
        ]
    }

    /// Compares everything both storages must agree on. raft's `MemStorage`
    /// only knows the term below its first index before any compaction
    /// (keel keeps it: `snapshot_term`), and reports a stale term for 0 after.
    fn assert_agree(ours: &GroupStorage, model: &MemStorage, snapshot_term: u64) {
        let (first, last) = (model.first_index().unwrap(), model.last_index().unwrap());
        assert_eq!(Storage::first_index(ours), Ok(first));
        assert_eq!(Storage::last_index(ours), Ok(last));
        for index in 0..=last + 1 {
            let expected = match index {
                _ if index + 1 < first => compacted(),
                _ if index + 1 == first => Ok(snapshot_term),
                _ => model.term(index),
            };
            assert_eq!(ours.term(index), expected, "term of {index}");
        }
        assert_eq!(ours.term(last + 1), unavailable());
        if last >= first {
            let ctx = || GetEntriesContext::empty(false);
            assert_eq!(
                ours.entries(first, last + 1, None, ctx()),
                model.entries(first, last + 1, None, ctx())
            );
            let size = u64::from(entry(1, 1).compute_size()) * 2;
            assert_eq!(
                ours.entries(first, last + 1, size, ctx()),
                model.entries(first, last + 1, size, ctx())
            );
            assert_eq!(ours.entries(first - 1, last, None, ctx()), compacted());
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        #[test]
        fn agrees_with_raft_mem_storage(
            batches in proptest::collection::vec(proptest::collection::vec(op(), 1..4), 1..20)
        ) {
            let db = memory_db();
            let store = RaftStore::new(Arc::clone(&db));
            let storage = store.open_group(G1, &[1]).expect("open");
            let model = MemStorage::new_with_conf_state(conf(&[1], &[]));
            let (mut term, mut commit, mut snapshot_term) = (0, 0, 0);
            for ops in batches {
                let mut batch = WriteBatch::default();
                for op in ops {
                    let (first, last) = (model.first_index().unwrap(), model.last_index().unwrap());
                    match op {
                        Op::Append { at, len } => {
                            // Raft never rewrites committed entries.
                            let lowest = first.max(commit + 1);
                            let start = lowest + at % (last + 2 - lowest);
                            term += 1;
                            let ents = entries(start..=start + len - 1, term);
                            model.wl().append(&ents).unwrap();
                            batch.append(&storage, &ents);
                        }
                        Op::Commit => {
                            commit = last;
                            batch.set_commit(&storage, commit);
                        }
                        Op::Compact { at } => {
                            // MemStorage misreports its bounds once empty, so
                            // keep one entry.
                            let highest = commit.min(last.saturating_sub(1));
                            if highest < first {
                                continue;
                            }
                            let index = first + at % (highest + 1 - first);
                            snapshot_term = model.term(index).unwrap();
                            model.wl().compact(index + 1).unwrap();
                            batch.compact(&storage, index, snapshot_term, &conf(&[1], &[]), vec![]);
                        }
                    }
                }
                store.write(batch).expect("write");
                assert_agree(&storage, &model, snapshot_term);
            }
            let reopened = RaftStore::new(db).open_group(G1, &[]).expect("reopen");
            assert_agree(&reopened, &model, snapshot_term);
            prop_assert_eq!(reopened.hard_state().commit, commit);
        }
    }

    /// Persists every ready of `raw` the way the engine does, returning the
    /// entries committed meanwhile (applied once their commit is durable).
    fn drive(raw: &mut RawNode<GroupStorage>, store: &RaftStore) -> Vec<Entry> {
        let mut applied = Vec::new();
        while raw.has_ready() {
            let mut ready = raw.ready();
            let storage = raw.store().clone();
            let mut batch = WriteBatch::default();
            if !ready.snapshot().is_empty() {
                batch.apply_snapshot(&storage, ready.snapshot());
            }
            batch.append(&storage, ready.entries());
            if let Some(hs) = ready.hs() {
                batch.set_hard_state(&storage, hs);
            }
            store.write(batch).expect("persist ready");
            let mut committed = ready.take_committed_entries();
            let mut light = raw.advance_append(ready);
            let mut batch = WriteBatch::default();
            if let Some(commit) = light.commit_index() {
                batch.set_commit(&storage, commit);
            }
            committed.extend(light.take_committed_entries());
            if let Some(last) = committed.last() {
                batch.set_applied(&storage, last.index);
            }
            store.write(batch).expect("persist commit and applied");
            applied.extend(committed);
            raw.advance_apply();
        }
        applied
    }

    fn raw_node(storage: GroupStorage) -> RawNode<GroupStorage> {
        let config = raft::Config {
            id: 1,
            election_tick: 10,
            heartbeat_tick: 1,
            applied: storage.applied(),
            ..Default::default()
        };
        let logger = slog::Logger::root(slog::Discard, slog::o!());
        RawNode::new(&config, storage, &logger).expect("raw node")
    }

    fn proposals(applied: &[Entry]) -> Vec<Vec<u8>> {
        applied
            .iter()
            .filter(|e| !e.data.is_empty())
            .map(|e| e.data.to_vec())
            .collect()
    }

    #[test]
    fn a_single_voter_raw_node_commits_and_recovers_from_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("raft.redb");
        let expected: Vec<Vec<u8>> = (0..100).map(|i| format!("p{i}").into_bytes()).collect();
        {
            let store = RaftStore::new(file_db(&path));
            let mut raw = raw_node(store.open_group(G1, &[1]).expect("open"));
            raw.campaign().expect("campaign");
            let mut applied = drive(&mut raw, &store);
            assert_eq!(raw.raft.state, raft::StateRole::Leader);
            for chunk in expected.chunks(10) {
                for data in chunk {
                    raw.propose(vec![], data.clone()).expect("propose");
                }
                applied.extend(drive(&mut raw, &store));
            }
            assert_eq!(proposals(&applied), expected);
            let storage = raw.store();
            // The leader's empty entry of term 1, then the proposals.
            assert_eq!(storage.last_index(), 101);
            assert_eq!(storage.hard_state().commit, 101);
            assert_eq!(storage.applied(), 101);
        }
        let store = RaftStore::new(file_db(&path));
        let mut raw = raw_node(store.open_group(G1, &[1]).expect("reopen"));
        assert_eq!(raw.raft.raft_log.committed, 101);
        assert_eq!(raw.raft.raft_log.last_index(), 101);
        let stored = read_all(raw.store(), 1, 102).expect("entries");
        assert_eq!(proposals(&stored), expected);
        // Nothing is applied twice, and the group goes on.
        raw.campaign().expect("campaign");
        let mut applied = drive(&mut raw, &store);
        raw.propose(vec![], b"after restart".to_vec())
            .expect("propose");
        applied.extend(drive(&mut raw, &store));
        assert_eq!(proposals(&applied), vec![b"after restart".to_vec()]);
        assert_eq!(raw.raft.term, 2);
    }
}
