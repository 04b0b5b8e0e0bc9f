//! Migration checkpoint rows and their upsert rule (DESIGN.md §3.1, §3.3, §5).
//!
//! Every phase of a migration is checkpointed to group 0 as a
//! `MigrationCheckpoint`; the metadata cache (and the node's redb migration
//! table) keeps one [`MigrationRow`] per migration: its latest checkpoint.
//! Recovery after a crash reads these rows to resume or abort each migration,
//! so a row must be trustworthy: its payload carries a CRC32C, and a row that
//! fails [`MigrationRow::verify`] is corruption that fail-stops the group
//! (§3.3), never something to skip.
//!
//! Checkpoints may be delivered more than once (retried proposals, replayed
//! logs), and out of order relative to each other. [`MigrationRow::decide`] is
//! the single rule that makes applying them idempotent and monotonic: a row
//! only ever moves forward in `(phase ordinal, attempt)`.

use crate::core::codec::{self, FrameKind, Wire};
use crate::core::ids::{GroupId, MigrationId, NodeId, VShardId};
use serde::{Deserialize, Serialize};

/// The two kinds of migration (DESIGN.md §5).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum MigrationKind {
    /// Moves one replica of a data group from one node to another.
    Replica,
    /// Moves one vShard from one data group to another.
    VShard,
}

/// Phases of both kinds, in order. Replica move: `AddLearner`, `CatchUp`,
/// `PromoteLearner`, `LeadershipTransfer`, `Cutover`, `Complete`.
/// vShard move: `Copy`, `Tail`, `Fence`, `FinalCatchUp`, `Reassign`,
/// `Complete`. `Complete` ends both.
///
/// The derived order is declaration order, which matches phase order within
/// each kind; across kinds it means nothing. Use [`MigrationPhaseTag::ordinal`]
/// to measure progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum MigrationPhaseTag {
    AddLearner,
    CatchUp,
    PromoteLearner,
    LeadershipTransfer,
    Cutover,
    Copy,
    Tail,
    Fence,
    FinalCatchUp,
    Reassign,
    Complete,
}

const REPLICA_PHASES: [MigrationPhaseTag; 6] = [
    MigrationPhaseTag::AddLearner,
    MigrationPhaseTag::CatchUp,
    MigrationPhaseTag::PromoteLearner,
    MigrationPhaseTag::LeadershipTransfer,
    MigrationPhaseTag::Cutover,
    MigrationPhaseTag::Complete,
];

const VSHARD_PHASES: [MigrationPhaseTag; 6] = [
    MigrationPhaseTag::Copy,
    MigrationPhaseTag::Tail,
    MigrationPhaseTag::Fence,
    MigrationPhaseTag::FinalCatchUp,
    MigrationPhaseTag::Reassign,
    MigrationPhaseTag::Complete,
];

impl MigrationPhaseTag {
    /// The phases of `kind`, in the order a migration goes through them.
    pub fn phases(kind: MigrationKind) -> &'static [MigrationPhaseTag] {
        match kind {
            MigrationKind::Replica => &REPLICA_PHASES,
            MigrationKind::VShard => &VSHARD_PHASES,
        }
    }

    /// Whether a migration of `kind` goes through this phase.
    pub fn belongs_to(self, kind: MigrationKind) -> bool {
        self.ordinal(kind).is_some()
    }

    /// Position of this phase in [`MigrationPhaseTag::phases`]`(kind)`, or
    /// `None` when the phase is not one of `kind`'s.
    pub fn ordinal(self, kind: MigrationKind) -> Option<usize> {
        Self::phases(kind).iter().position(|&phase| phase == self)
    }
}

/// Checkpoint payload of a replica move: enough to resume or undo it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ReplicaMovePayload {
    pub group_id: GroupId,
    pub source: NodeId,
    pub target: NodeId,
    /// Whether the source led the group when the move began, so an abort
    /// knows to restore the leader hint and the move knows to transfer it.
    pub source_was_leader: bool,
    /// The log index the target has caught up to (0 until `CatchUp`).
    pub caught_up_index: u64,
    /// The measured write pause, recorded in the `Complete` checkpoint.
    pub write_pause_us: Option<u64>,
}

/// Checkpoint payload of a vShard move: enough to resume or undo it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VShardMovePayload {
    pub vshard_id: VShardId,
    pub source_group: GroupId,
    pub target_group: GroupId,
    /// The index of the source group the copy was taken at.
    pub copy_index: u64,
    /// The index of the source group's log the tail has reached.
    pub tail_index: u64,
    /// When the source was fenced (the coordinator's wall clock), so that a
    /// coordinator resuming the move after a crash still measures the
    /// whole write pause.
    pub fenced_at_ms: Option<u64>,
    /// The measured write pause, recorded in the `Complete` checkpoint.
    pub write_pause_us: Option<u64>,
}

/// The phase payload of a checkpoint; its variant fixes the migration's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MigrationCheckpointPayload {
    Replica(ReplicaMovePayload),
    VShard(VShardMovePayload),
}

impl MigrationCheckpointPayload {
    pub fn kind(&self) -> MigrationKind {
        match self {
            MigrationCheckpointPayload::Replica(_) => MigrationKind::Replica,
            MigrationCheckpointPayload::VShard(_) => MigrationKind::VShard,
        }
    }

    /// The data groups the migration changes: at most one migration may
    /// touch a group at a time.
    pub fn groups(&self) -> Vec<GroupId> {
        match self {
            MigrationCheckpointPayload::Replica(p) => vec![p.group_id],
            MigrationCheckpointPayload::VShard(p) => vec![p.source_group, p.target_group],
        }
    }
}

/// A payload travels in its own envelope inside the row, so the payload bytes
/// are self-describing and versioned independently of the row around them.
impl Wire for MigrationCheckpointPayload {
    const KIND: FrameKind = FrameKind::CheckpointPayload;
}

/// Undo steps of an aborted migration, applied in order (DESIGN.md §5), so
/// that no learner, fence, partial copy or ghost stub is ever leaked.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Compensation {
    RemoveLearner {
        group_id: GroupId,
        node_id: NodeId,
    },
    RemoveVoter {
        group_id: GroupId,
        node_id: NodeId,
    },
    /// Makes a demoted move source a voter again (a replica move rolled
    /// back after its joint change).
    RestoreVoter {
        group_id: GroupId,
        node_id: NodeId,
    },
    RestoreLeaderHint {
        group_id: GroupId,
        node_id: NodeId,
    },
    Unfence {
        vshard_id: VShardId,
        group_id: GroupId,
    },
    DropPartialCopy {
        vshard_id: VShardId,
        group_id: GroupId,
    },
    RemoveGhostStub {
        vshard_id: VShardId,
        group_id: GroupId,
    },
}

/// The persisted/replicated row of one migration: its latest checkpoint.
///
/// `payload` is `codec::encode` of a [`MigrationCheckpointPayload`] and
/// `crc32c` is the CRC32C of exactly those bytes (DESIGN.md §5).
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MigrationRow {
    pub migration_id: MigrationId,
    pub phase: MigrationPhaseTag,
    pub attempt: u32,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub crc32c: u32,
    pub ts_ms: u64,
}

impl Wire for MigrationRow {
    const KIND: FrameKind = FrameKind::Row;
}

/// A checkpoint that cannot be trusted. Per DESIGN.md §3.3 it fail-stops the
/// group; it is never skipped, since skipping would diverge the replica.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum CheckpointCorruption {
    #[error(
        "checkpoint of migration {migration_id} at phase {phase:?} has a payload CRC32C of \
         {computed:#010x} but records {stored:#010x}"
    )]
    CrcMismatch {
        migration_id: MigrationId,
        phase: MigrationPhaseTag,
        stored: u32,
        computed: u32,
    },
    #[error(
        "checkpoint of migration {migration_id} at phase {phase:?} has a payload that does not \
         decode: {cause}"
    )]
    Undecodable {
        migration_id: MigrationId,
        phase: MigrationPhaseTag,
        cause: String,
    },
    #[error(
        "checkpoint of migration {migration_id} records phase {phase:?}, which a {kind:?} \
         migration does not have"
    )]
    PhaseKindMismatch {
        migration_id: MigrationId,
        phase: MigrationPhaseTag,
        kind: MigrationKind,
    },
}

/// A checkpoint refused by the upsert rule. These are deterministic: every
/// replica refuses the same checkpoint, and a refusal changes nothing.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum MigrationError {
    #[error(
        "checkpoint of migration {migration_id} at phase {phase:?} attempt {attempt} is older \
         than its recorded phase {current_phase:?} attempt {current_attempt}"
    )]
    Stale {
        migration_id: MigrationId,
        current_phase: MigrationPhaseTag,
        current_attempt: u32,
        phase: MigrationPhaseTag,
        attempt: u32,
    },
    #[error(
        "checkpoint of migration {migration_id} is a {kind:?} migration but the migration is \
         recorded as a {current_kind:?} migration"
    )]
    KindChanged {
        migration_id: MigrationId,
        current_kind: MigrationKind,
        kind: MigrationKind,
    },
    #[error(
        "migration {migration_id} is unknown, and a {kind:?} migration must start at phase \
         {first_phase:?}, not {phase:?}"
    )]
    MustStartAtFirstPhase {
        migration_id: MigrationId,
        kind: MigrationKind,
        phase: MigrationPhaseTag,
        first_phase: MigrationPhaseTag,
    },
    #[error("migration {migration_id} is unknown")]
    UnknownMigration { migration_id: MigrationId },
    #[error(
        "migration {migration_id} would change group {group}, which migration {other} is \
         changing; one move per group at a time"
    )]
    GroupBusy {
        migration_id: MigrationId,
        group: GroupId,
        other: MigrationId,
    },
    #[error(
        "migration {migration_id} is in phase {phase:?}, past its point of no return; it can \
         only be finished, not aborted"
    )]
    PastNoReturn {
        migration_id: MigrationId,
        phase: MigrationPhaseTag,
    },
    #[error("migration {migration_id} cannot start: {reason}")]
    CannotStart {
        migration_id: MigrationId,
        reason: String,
    },
    /// `decide` was handed a row that does not verify, against its contract.
    /// Reported rather than guessed at, so it can still never panic.
    #[error("an upsert decision was asked about an unverified checkpoint: {0}")]
    Unverified(CheckpointCorruption),
}

/// What an upsert of a checkpoint does to the stored row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum UpsertDecision {
    /// No row existed; the checkpoint becomes the row.
    Insert,
    /// The checkpoint is newer than the row and replaces it.
    Replace,
    /// The row already holds this `(phase, attempt)`; nothing changes.
    Duplicate,
}

impl MigrationRow {
    /// Encodes the payload and computes crc32c over the encoded payload bytes.
    pub fn new(
        migration_id: MigrationId,
        phase: MigrationPhaseTag,
        attempt: u32,
        payload: &MigrationCheckpointPayload,
        ts_ms: u64,
    ) -> MigrationRow {
        let payload = codec::encode(payload);
        MigrationRow {
            migration_id,
            phase,
            attempt,
            crc32c: crc32c::crc32c(&payload),
            payload,
            ts_ms,
        }
    }

    /// Checks the CRC32C, decodes the payload, and checks the phase belongs to
    /// the payload's kind. Corruption otherwise.
    pub fn verify(&self) -> Result<MigrationCheckpointPayload, CheckpointCorruption> {
        let computed = crc32c::crc32c(&self.payload);
        if computed != self.crc32c {
            return Err(CheckpointCorruption::CrcMismatch {
                migration_id: self.migration_id,
                phase: self.phase,
                stored: self.crc32c,
                computed,
            });
        }
        let payload: MigrationCheckpointPayload =
            codec::decode(&self.payload).map_err(|e| CheckpointCorruption::Undecodable {
                migration_id: self.migration_id,
                phase: self.phase,
                cause: e.to_string(),
            })?;
        if !self.phase.belongs_to(payload.kind()) {
            return Err(CheckpointCorruption::PhaseKindMismatch {
                migration_id: self.migration_id,
                phase: self.phase,
                kind: payload.kind(),
            });
        }
        Ok(payload)
    }

    /// The migration's kind, from the verified payload (the phase alone cannot
    /// tell: `Complete` ends both kinds).
    pub fn kind(&self) -> Result<MigrationKind, CheckpointCorruption> {
        self.verify().map(|payload| payload.kind())
    }

    /// Idempotent upsert rule on `(id, phase, attempt)`:
    /// - no existing row: `Insert` only if the phase is the first phase of its
    ///   kind (else `MustStartAtFirstPhase`), so a late checkpoint of an
    ///   aborted (deleted) migration cannot resurrect it;
    /// - the kinds differ: `KindChanged` (checked before anything else, since
    ///   ordinals of different kinds are not comparable);
    /// - same `(phase, attempt)`: `Duplicate`, a no-op even if the payload
    ///   differs — first write wins, so a redelivery never rewrites history;
    /// - `(ordinal, attempt)` greater than the existing row's: `Replace`;
    /// - smaller: `Stale`.
    ///
    /// `existing` must be the row stored for `incoming.migration_id`, and both
    /// must already be verified by the caller (a corrupt row must fail-stop
    /// the group before it gets here); an unverified one gives `Unverified`.
    pub fn decide(
        existing: Option<&MigrationRow>,
        incoming: &MigrationRow,
    ) -> Result<UpsertDecision, MigrationError> {
        let kind = incoming.kind().map_err(MigrationError::Unverified)?;
        let phases = MigrationPhaseTag::phases(kind);
        let Some(existing) = existing else {
            return match phases.first() {
                Some(&first_phase) if first_phase != incoming.phase => {
                    Err(MigrationError::MustStartAtFirstPhase {
                        migration_id: incoming.migration_id,
                        kind,
                        phase: incoming.phase,
                        first_phase,
                    })
                }
                _ => Ok(UpsertDecision::Insert),
            };
        };
        let current_kind = existing.kind().map_err(MigrationError::Unverified)?;
        if current_kind != kind {
            return Err(MigrationError::KindChanged {
                migration_id: incoming.migration_id,
                current_kind,
                kind,
            });
        }
        // Both rows verified as `kind`, so both phases have an ordinal.
        let current = (existing.phase.ordinal(kind), existing.attempt);
        let new = (incoming.phase.ordinal(kind), incoming.attempt);
        match new.cmp(&current) {
            std::cmp::Ordering::Equal => Ok(UpsertDecision::Duplicate),
            std::cmp::Ordering::Greater => Ok(UpsertDecision::Replace),
            std::cmp::Ordering::Less => Err(MigrationError::Stale {
                migration_id: incoming.migration_id,
                current_phase: existing.phase,
                current_attempt: existing.attempt,
                phase: incoming.phase,
                attempt: incoming.attempt,
            }),
        }
    }
}

/// The undo steps of a migration aborted in `phase`, in the order they must
/// apply (DESIGN.md §5), or `None` once the migration is past the point of
/// no return and can only be finished: a replica move after its cutover,
/// a vShard move once routing sends the vShard to the target
/// (`reassigned`). Every routing compensation is conditional when applied
/// (see the metadata applier), so a list that covers a step that never
/// happened is harmless.
pub fn compensations(
    payload: &MigrationCheckpointPayload,
    phase: MigrationPhaseTag,
    reassigned: bool,
) -> Option<Vec<Compensation>> {
    use MigrationPhaseTag as P;
    match (payload, phase) {
        (MigrationCheckpointPayload::Replica(p), P::AddLearner | P::CatchUp) => {
            Some(vec![Compensation::RemoveLearner {
                group_id: p.group_id,
                node_id: p.target,
            }])
        }
        (MigrationCheckpointPayload::Replica(p), P::PromoteLearner | P::LeadershipTransfer) => {
            // The source becomes a voter again before the target leaves, so
            // the group never drops below its voters; the leader hint can
            // only name a voter, so it comes last.
            let mut undo = vec![
                Compensation::RestoreVoter {
                    group_id: p.group_id,
                    node_id: p.source,
                },
                Compensation::RemoveVoter {
                    group_id: p.group_id,
                    node_id: p.target,
                },
                Compensation::RemoveLearner {
                    group_id: p.group_id,
                    node_id: p.target,
                },
            ];
            if p.source_was_leader {
                undo.push(Compensation::RestoreLeaderHint {
                    group_id: p.group_id,
                    node_id: p.source,
                });
            }
            Some(undo)
        }
        (MigrationCheckpointPayload::VShard(p), P::Copy | P::Tail) => {
            Some(vec![Compensation::DropPartialCopy {
                vshard_id: p.vshard_id,
                group_id: p.target_group,
            }])
        }
        (MigrationCheckpointPayload::VShard(p), P::Fence | P::FinalCatchUp | P::Reassign)
            if !reassigned =>
        {
            Some(vec![
                Compensation::Unfence {
                    vshard_id: p.vshard_id,
                    group_id: p.source_group,
                },
                Compensation::DropPartialCopy {
                    vshard_id: p.vshard_id,
                    group_id: p.target_group,
                },
            ])
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::codec::CodecError;
    use proptest::prelude::*;
    use MigrationPhaseTag as P;

    fn node(id: u64) -> NodeId {
        NodeId::new(id).expect("test node ids are non-zero")
    }

    fn vshard(id: u16) -> VShardId {
        VShardId::new(id).expect("test vShard ids are in range")
    }

    fn mid() -> MigrationId {
        MigrationId::from_random_bytes([7; 16])
    }

    fn replica_payload() -> MigrationCheckpointPayload {
        MigrationCheckpointPayload::Replica(ReplicaMovePayload {
            group_id: GroupId(3),
            source: node(1),
            target: node(4),
            source_was_leader: true,
            caught_up_index: 42,
            write_pause_us: None,
        })
    }

    fn vshard_payload() -> MigrationCheckpointPayload {
        MigrationCheckpointPayload::VShard(VShardMovePayload {
            vshard_id: vshard(1023),
            source_group: GroupId(1),
            target_group: GroupId(2),
            copy_index: 10,
            tail_index: 12,
            fenced_at_ms: Some(900),
            write_pause_us: Some(1_500),
        })
    }

    fn replica_row(phase: MigrationPhaseTag, attempt: u32) -> MigrationRow {
        MigrationRow::new(mid(), phase, attempt, &replica_payload(), 1_000)
    }

    fn vshard_row(phase: MigrationPhaseTag, attempt: u32) -> MigrationRow {
        MigrationRow::new(mid(), phase, attempt, &vshard_payload(), 1_000)
    }

    #[test]
    fn compensations_undo_in_order_until_the_point_of_no_return() {
        let replica = replica_payload();
        assert_eq!(
            compensations(&replica, P::CatchUp, false),
            Some(vec![Compensation::RemoveLearner {
                group_id: GroupId(3),
                node_id: node(4)
            }])
        );
        let undo = compensations(&replica, P::LeadershipTransfer, false).unwrap();
        assert_eq!(
            undo.first(),
            Some(&Compensation::RestoreVoter {
                group_id: GroupId(3),
                node_id: node(1)
            })
        );
        assert_eq!(
            undo.last(),
            Some(&Compensation::RestoreLeaderHint {
                group_id: GroupId(3),
                node_id: node(1)
            })
        );
        assert_eq!(compensations(&replica, P::Cutover, false), None);
        let vshard = vshard_payload();
        assert_eq!(
            compensations(&vshard, P::Tail, false).map(|u| u.len()),
            Some(1)
        );
        assert_eq!(
            compensations(&vshard, P::Reassign, false).map(|u| u.len()),
            Some(2)
        );
        assert!(matches!(
            compensations(&vshard, P::Fence, false).as_deref(),
            Some([
                Compensation::Unfence { .. },
                Compensation::DropPartialCopy { .. }
            ])
        ));
        assert_eq!(compensations(&vshard, P::Reassign, true), None);
        assert_eq!(compensations(&vshard, P::Complete, false), None);
    }

    #[test]
    fn phases_are_ordered_and_complete_ends_both_kinds() {
        for kind in [MigrationKind::Replica, MigrationKind::VShard] {
            let phases = MigrationPhaseTag::phases(kind);
            assert_eq!(phases.last(), Some(&P::Complete));
            for (i, phase) in phases.iter().enumerate() {
                assert_eq!(phase.ordinal(kind), Some(i));
                assert!(phase.belongs_to(kind));
            }
            // Declaration order agrees with phase order within a kind.
            assert!(phases.windows(2).all(|w| w[0] < w[1]));
        }
        assert_eq!(P::Cutover.ordinal(MigrationKind::Replica), Some(4));
        assert_eq!(P::Cutover.ordinal(MigrationKind::VShard), None);
        assert!(!P::Copy.belongs_to(MigrationKind::Replica));
        assert!(P::Reassign.belongs_to(MigrationKind::VShard));
    }

    #[test]
    fn rows_round_trip_and_verify() {
        for (row, payload) in [
            (replica_row(P::CatchUp, 2), replica_payload()),
            (vshard_row(P::Complete, 0), vshard_payload()),
        ] {
            assert_eq!(row.crc32c, crc32c::crc32c(&row.payload));
            assert_eq!(row.verify(), Ok(payload));
            assert_eq!(row.kind(), Ok(payload.kind()));
            let bytes = codec::encode(&row);
            assert_eq!(codec::decode::<MigrationRow>(&bytes), Ok(row));
        }
    }

    #[test]
    fn a_payload_is_not_a_row() {
        let bytes = codec::encode(&replica_payload());
        assert!(matches!(
            codec::decode::<MigrationRow>(&bytes),
            Err(CodecError::BadMagic { .. })
        ));
    }

    #[test]
    fn verify_catches_a_flipped_payload_bit() {
        let mut row = replica_row(P::CatchUp, 1);
        let last = row.payload.len() - 1;
        row.payload[last] ^= 0x01;
        let computed = crc32c::crc32c(&row.payload);
        assert_eq!(
            row.verify(),
            Err(CheckpointCorruption::CrcMismatch {
                migration_id: mid(),
                phase: P::CatchUp,
                stored: replica_row(P::CatchUp, 1).crc32c,
                computed,
            })
        );
        assert!(row.kind().is_err());
    }

    #[test]
    fn verify_catches_a_well_checksummed_payload_that_does_not_decode() {
        let mut row = replica_row(P::AddLearner, 0);
        row.payload = b"not a payload frame".to_vec();
        row.crc32c = crc32c::crc32c(&row.payload);
        assert!(matches!(
            row.verify(),
            Err(CheckpointCorruption::Undecodable { migration_id, phase: P::AddLearner, .. })
                if migration_id == mid()
        ));
    }

    #[test]
    fn verify_catches_a_phase_of_the_wrong_kind() {
        let row = MigrationRow::new(mid(), P::CatchUp, 0, &vshard_payload(), 5);
        assert_eq!(
            row.verify(),
            Err(CheckpointCorruption::PhaseKindMismatch {
                migration_id: mid(),
                phase: P::CatchUp,
                kind: MigrationKind::VShard,
            })
        );
        let row = MigrationRow::new(mid(), P::Fence, 0, &replica_payload(), 5);
        assert!(matches!(
            row.verify(),
            Err(CheckpointCorruption::PhaseKindMismatch {
                kind: MigrationKind::Replica,
                ..
            })
        ));
    }

    #[test]
    fn decide_inserts_only_at_the_first_phase() {
        assert_eq!(
            MigrationRow::decide(None, &replica_row(P::AddLearner, 0)),
            Ok(UpsertDecision::Insert)
        );
        assert_eq!(
            MigrationRow::decide(None, &vshard_row(P::Copy, 3)),
            Ok(UpsertDecision::Insert)
        );
        assert_eq!(
            MigrationRow::decide(None, &replica_row(P::CatchUp, 0)),
            Err(MigrationError::MustStartAtFirstPhase {
                migration_id: mid(),
                kind: MigrationKind::Replica,
                phase: P::CatchUp,
                first_phase: P::AddLearner,
            })
        );
        assert!(matches!(
            MigrationRow::decide(None, &vshard_row(P::Complete, 0)),
            Err(MigrationError::MustStartAtFirstPhase {
                first_phase: P::Copy,
                ..
            })
        ));
    }

    #[test]
    fn decide_treats_the_same_phase_and_attempt_as_a_duplicate() {
        let existing = replica_row(P::CatchUp, 1);
        let mut payload = replica_payload();
        if let MigrationCheckpointPayload::Replica(p) = &mut payload {
            p.caught_up_index = 99;
        }
        let different_payload = MigrationRow::new(mid(), P::CatchUp, 1, &payload, 2_000);
        assert_eq!(
            MigrationRow::decide(Some(&existing), &existing),
            Ok(UpsertDecision::Duplicate)
        );
        assert_eq!(
            MigrationRow::decide(Some(&existing), &different_payload),
            Ok(UpsertDecision::Duplicate)
        );
    }

    #[test]
    fn decide_replaces_with_a_later_phase_or_attempt() {
        let existing = vshard_row(P::Tail, 1);
        for incoming in [vshard_row(P::Fence, 0), vshard_row(P::Tail, 2)] {
            assert_eq!(
                MigrationRow::decide(Some(&existing), &incoming),
                Ok(UpsertDecision::Replace)
            );
        }
    }

    #[test]
    fn decide_refuses_stale_checkpoints() {
        let existing = vshard_row(P::Fence, 1);
        assert_eq!(
            MigrationRow::decide(Some(&existing), &vshard_row(P::Fence, 0)),
            Err(MigrationError::Stale {
                migration_id: mid(),
                current_phase: P::Fence,
                current_attempt: 1,
                phase: P::Fence,
                attempt: 0,
            })
        );
        // Phase order dominates attempts.
        assert!(matches!(
            MigrationRow::decide(Some(&existing), &vshard_row(P::Tail, 9)),
            Err(MigrationError::Stale {
                phase: P::Tail,
                attempt: 9,
                ..
            })
        ));
    }

    #[test]
    fn decide_refuses_a_change_of_kind() {
        let existing = replica_row(P::CatchUp, 0);
        assert_eq!(
            MigrationRow::decide(Some(&existing), &vshard_row(P::Reassign, 0)),
            Err(MigrationError::KindChanged {
                migration_id: mid(),
                current_kind: MigrationKind::Replica,
                kind: MigrationKind::VShard,
            })
        );
        // `Complete` is shared by both kinds; the payload still tells them apart.
        let existing = replica_row(P::Complete, 0);
        assert!(matches!(
            MigrationRow::decide(Some(&existing), &vshard_row(P::Complete, 0)),
            Err(MigrationError::KindChanged { .. })
        ));
    }

    #[test]
    fn decide_reports_unverified_rows() {
        let mut corrupt = replica_row(P::CatchUp, 0);
        corrupt.crc32c ^= 1;
        assert!(matches!(
            MigrationRow::decide(None, &corrupt),
            Err(MigrationError::Unverified(
                CheckpointCorruption::CrcMismatch { .. }
            ))
        ));
        assert!(matches!(
            MigrationRow::decide(Some(&corrupt), &replica_row(P::Cutover, 0)),
            Err(MigrationError::Unverified(
                CheckpointCorruption::CrcMismatch { .. }
            ))
        ));
    }

    fn arb_node() -> impl Strategy<Value = NodeId> {
        (1..=u64::MAX).prop_map(node)
    }

    fn arb_vshard() -> impl Strategy<Value = VShardId> {
        (0..crate::core::ids::VSHARD_COUNT).prop_map(vshard)
    }

    fn arb_group() -> impl Strategy<Value = GroupId> {
        any::<u64>().prop_map(GroupId)
    }

    fn arb_payload() -> impl Strategy<Value = MigrationCheckpointPayload> {
        prop_oneof![
            (
                arb_group(),
                arb_node(),
                arb_node(),
                any::<bool>(),
                any::<u64>(),
                any::<Option<u64>>()
            )
                .prop_map(|(group_id, source, target, leader, caught_up, pause)| {
                    MigrationCheckpointPayload::Replica(ReplicaMovePayload {
                        group_id,
                        source,
                        target,
                        source_was_leader: leader,
                        caught_up_index: caught_up,
                        write_pause_us: pause,
                    })
                }),
            (
                arb_vshard(),
                arb_group(),
                arb_group(),
                any::<u64>(),
                any::<u64>(),
                any::<Option<u64>>()
            )
                .prop_map(|(vshard_id, source, target, copy, tail, pause)| {
                    MigrationCheckpointPayload::VShard(VShardMovePayload {
                        vshard_id,
                        source_group: source,
                        target_group: target,
                        copy_index: copy,
                        tail_index: tail,
                        fenced_at_ms: pause.map(|p| p / 2),
                        write_pause_us: pause,
                    })
                }),
        ]
    }

    fn arb_compensation() -> impl Strategy<Value = Compensation> {
        prop_oneof![
            (arb_group(), arb_node()).prop_map(|(group_id, node_id)| {
                Compensation::RemoveLearner { group_id, node_id }
            }),
            (arb_group(), arb_node())
                .prop_map(|(group_id, node_id)| Compensation::RemoveVoter { group_id, node_id }),
            (arb_group(), arb_node())
                .prop_map(|(group_id, node_id)| Compensation::RestoreVoter { group_id, node_id }),
            (arb_group(), arb_node()).prop_map(|(group_id, node_id)| {
                Compensation::RestoreLeaderHint { group_id, node_id }
            }),
            (arb_vshard(), arb_group()).prop_map(|(vshard_id, group_id)| Compensation::Unfence {
                vshard_id,
                group_id
            }),
            (arb_vshard(), arb_group()).prop_map(|(vshard_id, group_id)| {
                Compensation::DropPartialCopy {
                    vshard_id,
                    group_id,
                }
            }),
            (arb_vshard(), arb_group()).prop_map(|(vshard_id, group_id)| {
                Compensation::RemoveGhostStub {
                    vshard_id,
                    group_id,
                }
            }),
        ]
    }

    /// A checkpoint of the migration `mid()`, with a phase of its payload's kind.
    fn arb_valid_row() -> impl Strategy<Value = MigrationRow> {
        (arb_payload(), 0..6usize, 0..3u32, any::<u64>()).prop_map(
            |(payload, phase, attempt, ts_ms)| {
                let phase = MigrationPhaseTag::phases(payload.kind())[phase];
                MigrationRow::new(mid(), phase, attempt, &payload, ts_ms)
            },
        )
    }

    /// A migration started at its first phase, later checkpoints of the same
    /// kind, and the same checkpoints in another order.
    fn arb_started_history(
    ) -> impl Strategy<Value = (MigrationRow, Vec<MigrationRow>, Vec<MigrationRow>)> {
        (
            arb_payload(),
            proptest::collection::vec(arb_valid_row(), 0..24),
        )
            .prop_flat_map(|(payload, rows)| {
                let kind = payload.kind();
                let first = MigrationPhaseTag::phases(kind)[0];
                let start = MigrationRow::new(mid(), first, 0, &payload, 0);
                let rows: Vec<MigrationRow> =
                    rows.into_iter().filter(|r| r.kind() == Ok(kind)).collect();
                (Just(start), Just(rows.clone()), Just(rows).prop_shuffle())
            })
    }

    fn order_key(row: &MigrationRow, kind: MigrationKind) -> (Option<usize>, u32) {
        (row.phase.ordinal(kind), row.attempt)
    }

    proptest! {
        #[test]
        fn values_round_trip(
            payload in arb_payload(),
            compensation in arb_compensation(),
            id in any::<[u8; 16]>(),
            phase in 0..6usize,
            attempt in any::<u32>(),
            ts_ms in any::<u64>(),
        ) {
            let phase = MigrationPhaseTag::phases(payload.kind())[phase];
            let row = MigrationRow::new(MigrationId::from_random_bytes(id), phase, attempt, &payload, ts_ms);
            prop_assert_eq!(codec::decode::<MigrationRow>(&codec::encode(&row)), Ok(row.clone()));
            prop_assert_eq!(row.verify(), Ok(payload));
            prop_assert_eq!(codec::decode::<MigrationCheckpointPayload>(&codec::encode(&payload)), Ok(payload));

            let bytes = postcard::to_allocvec(&payload).expect("payloads serialize");
            prop_assert_eq!(postcard::from_bytes::<MigrationCheckpointPayload>(&bytes).ok(), Some(payload));
            let bytes = postcard::to_allocvec(&compensation).expect("compensations serialize");
            prop_assert_eq!(postcard::from_bytes::<Compensation>(&bytes).ok(), Some(compensation));
            for kind in [MigrationKind::Replica, MigrationKind::VShard] {
                let bytes = postcard::to_allocvec(&kind).expect("kinds serialize");
                prop_assert_eq!(postcard::from_bytes::<MigrationKind>(&bytes).ok(), Some(kind));
            }
            let bytes = postcard::to_allocvec(&phase).expect("phases serialize");
            prop_assert_eq!(postcard::from_bytes::<MigrationPhaseTag>(&bytes).ok(), Some(phase));
        }

        #[test]
        fn upserts_converge_on_the_greatest_accepted_checkpoint(
            rows in proptest::collection::vec(arb_valid_row(), 1..24),
        ) {
            let mut current: Option<MigrationRow> = None;
            let mut accepted: Vec<MigrationRow> = Vec::new();
            for row in &rows {
                match MigrationRow::decide(current.as_ref(), row) {
                    Ok(UpsertDecision::Insert) => {
                        prop_assert!(current.is_none());
                        accepted.push(row.clone());
                        current = Some(row.clone());
                    }
                    Ok(UpsertDecision::Replace) => {
                        accepted.push(row.clone());
                        current = Some(row.clone());
                    }
                    Ok(UpsertDecision::Duplicate) => {
                        // A duplicate names the stored (phase, attempt); the row stays as it is.
                        let stored = current.as_ref().map(|r| (r.phase, r.attempt));
                        prop_assert_eq!(stored, Some((row.phase, row.attempt)));
                    }
                    Err(MigrationError::MustStartAtFirstPhase { .. }) => {
                        prop_assert!(current.is_none());
                    }
                    Err(MigrationError::Stale { .. } | MigrationError::KindChanged { .. }) => {
                        prop_assert!(current.is_some());
                    }
                    Err(other) => prop_assert!(false, "unexpected rejection {:?}", other),
                }
            }
            match &current {
                None => prop_assert!(accepted.is_empty()),
                Some(row) => {
                    let kind = row.kind().expect("accepted rows verify");
                    prop_assert!(accepted.iter().all(|r| r.kind() == Ok(kind)));
                    let greatest = accepted
                        .iter()
                        .max_by_key(|r| order_key(r, kind))
                        .map(|r| order_key(r, kind));
                    prop_assert_eq!(Some(order_key(row, kind)), greatest);
                    // The stored row is the first accepted write of its (phase, attempt).
                    let first = accepted.iter().find(|r| order_key(r, kind) == order_key(row, kind));
                    prop_assert_eq!(Some(row), first);
                }
            }
        }

        #[test]
        fn upserts_after_the_start_converge_in_any_order(
            (start, rows, shuffled) in arb_started_history(),
        ) {
            let kind = start.kind().expect("generated rows verify");
            let mut finals = Vec::new();
            for order in [&rows, &shuffled] {
                let mut current = start.clone();
                for row in order.iter() {
                    match MigrationRow::decide(Some(&current), row) {
                        Ok(UpsertDecision::Replace) => current = row.clone(),
                        Ok(UpsertDecision::Duplicate) => {
                            prop_assert_eq!(order_key(row, kind), order_key(&current, kind));
                        }
                        Err(MigrationError::Stale { .. }) => {
                            prop_assert!(order_key(row, kind) < order_key(&current, kind));
                        }
                        other => prop_assert!(false, "unexpected decision {:?}", other),
                    }
                }
                finals.push(current);
            }
            let greatest = rows.iter().chain([&start]).map(|r| order_key(r, kind)).max();
            prop_assert_eq!(Some(order_key(&finals[0], kind)), greatest);
            prop_assert_eq!(order_key(&finals[0], kind), order_key(&finals[1], kind));
        }
    }
}
