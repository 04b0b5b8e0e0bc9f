//! The rows stored per group and their encodings: every value sealed in
//! the CRC32C envelope, log entries as protobuf inside it.

use super::StorageError;
use crate::core::codec::{self, FrameKind, Wire};
use crate::core::ids::{GroupId, NodeId};
use protobuf::Message as _;
use raft::prelude::{ConfState, Entry, HardState, SnapshotMetadata};
use serde::{Deserialize, Serialize};

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
    pub(super) fn hard_state(&self) -> HardState {
        HardState {
            term: self.term,
            vote: self.vote,
            commit: self.commit,
            ..HardState::default()
        }
    }

    pub(super) fn conf_state(&self) -> ConfState {
        ConfState {
            voters: self.voters.clone(),
            learners: self.learners.clone(),
            voters_outgoing: self.voters_outgoing.clone(),
            learners_next: self.learners_next.clone(),
            auto_leave: self.auto_leave,
            ..ConfState::default()
        }
    }

    pub(super) fn set_conf_state(&mut self, cs: &ConfState) {
        self.voters = cs.voters.clone();
        self.learners = cs.learners.clone();
        self.voters_outgoing = cs.voters_outgoing.clone();
        self.learners_next = cs.learners_next.clone();
        self.auto_leave = cs.auto_leave;
    }

    /// The ordering raft-rs relies on when it restarts from this state.
    pub(super) fn check(&self, last_index: u64) -> Result<(), String> {
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

/// The mark a node keeps once it learned that the cluster retired it: the
/// node it names must be the one opening the database.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct RetiredRow {
    pub(super) node: NodeId,
}

impl Wire for RetiredRow {
    const KIND: FrameKind = FrameKind::Row;
}

/// The stored snapshot: metadata and data together.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct SnapshotRow {
    pub(super) index: u64,
    term: u64,
    conf: GroupState,
    #[serde(with = "serde_bytes")]
    pub(super) data: Vec<u8>,
}

impl Wire for SnapshotRow {
    const KIND: FrameKind = FrameKind::Row;
}

impl SnapshotRow {
    pub(super) fn new(index: u64, term: u64, cs: &ConfState, data: Vec<u8>) -> Self {
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
    pub(super) fn names(&self, peer: u64) -> bool {
        let c = &self.conf;
        [&c.voters, &c.learners, &c.voters_outgoing, &c.learners_next]
            .iter()
            .any(|ids| ids.contains(&peer))
    }

    /// Whether the snapshot's membership has `peer` as a learner.
    pub(super) fn lists_as_learner(&self, peer: u64) -> bool {
        self.conf.learners.contains(&peer)
    }

    pub(super) fn metadata(&self) -> SnapshotMetadata {
        let mut meta = SnapshotMetadata {
            index: self.index,
            term: self.term,
            ..SnapshotMetadata::default()
        };
        meta.set_conf_state(self.conf.conf_state());
        meta
    }
}

/// Encodes a row like `codec::encode`, but refuses (instead of panicking on)
/// a value too large for one frame.
pub(super) fn encode_row<T: Wire>(value: &T) -> Result<Vec<u8>, String> {
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

pub(super) fn encode_entry(entry: &Entry) -> Result<Vec<u8>, String> {
    let body = entry
        .write_to_bytes()
        .map_err(|e| format!("entry {} does not encode: {e}", entry.index))?;
    seal_body(FrameKind::Row, &body).map_err(|e| format!("entry {} {e}", entry.index))
}

/// Decodes the entry stored under `(group, index)` and checks it names that index.
pub(super) fn decode_entry(
    group: GroupId,
    index: u64,
    bytes: &[u8],
) -> Result<Entry, StorageError> {
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
