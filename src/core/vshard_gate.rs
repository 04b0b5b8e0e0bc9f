//! Which vShards a data group may serve, decided by the group's own log
//! (DESIGN.md §4, §5).
//!
//! Routing lives in group 0 and reaches each node at its own pace, so a
//! node with a stale routing table can still send a vShard's write to the
//! group that used to serve it. A vShard move therefore also records, in
//! the data groups' own logs, where the vShard may be written: the source
//! group is *fenced* (the write pause) before the final copy, the target
//! group holds the copy but serves only requests routed at an epoch after
//! the move, and the source keeps a *departed* marker once it let go. Every
//! replica of a group applies the same control entries at the same indices,
//! so every replica admits or refuses the same writes: this is what makes
//! "never two groups accepting writes to one vShard" hold whatever the
//! routing views of the proposers.
//!
//! A vShard without a gate is served as routing says (the state after
//! bootstrap). Gates are part of the group's snapshot.

use crate::core::ids::{MigrationId, VShardId};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// What a data group may do with one vShard.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Gate {
    /// A move is taking the vShard away: reads and writes are refused (the
    /// write pause). `resume` is the epoch bound the vShard had before the
    /// fence, restored if the move aborts.
    Fenced {
        migration: MigrationId,
        resume: Option<u64>,
    },
    /// A move into this group copied the vShard's data here; it is not
    /// served until the final copy.
    Copying { migration: MigrationId },
    /// The final copy of a move arrived: the vShard is served to requests
    /// routed at an epoch after `after_epoch` (an epoch at which routing
    /// still sent it to the source), so a node whose routing predates the
    /// move can never write here.
    Serving {
        migration: MigrationId,
        after_epoch: u64,
    },
    /// The vShard moved away, or a copy of an aborted move was dropped.
    Departed { migration: MigrationId },
}

/// A control entry of a data group's log: one step of a vShard move.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum GroupControl {
    /// At the source: stop serving the vShard (the write pause starts).
    Fence {
        vshard: VShardId,
        migration: MigrationId,
    },
    /// At the source, when a move aborts: serve the vShard again.
    Unfence {
        vshard: VShardId,
        migration: MigrationId,
    },
    /// At the target: replace the vShard's data with `data` (the state
    /// machine's export). `serve_after_epoch` is `None` for a copy taken
    /// while the source still serves writes, and set on the final copy
    /// taken behind the fence.
    Ingest {
        vshard: VShardId,
        migration: MigrationId,
        data: Vec<u8>,
        serve_after_epoch: Option<u64>,
    },
    /// At the target, when a move aborts: delete the partial copy.
    DropCopy {
        vshard: VShardId,
        migration: MigrationId,
    },
    /// At the source, once routing sends the vShard to the target: delete
    /// the vShard's data and keep only the departed marker.
    Release {
        vshard: VShardId,
        migration: MigrationId,
    },
}

impl GroupControl {
    pub fn vshard(&self) -> VShardId {
        match *self {
            GroupControl::Fence { vshard, .. }
            | GroupControl::Unfence { vshard, .. }
            | GroupControl::Ingest { vshard, .. }
            | GroupControl::DropCopy { vshard, .. }
            | GroupControl::Release { vshard, .. } => vshard,
        }
    }

    pub fn migration(&self) -> MigrationId {
        match *self {
            GroupControl::Fence { migration, .. }
            | GroupControl::Unfence { migration, .. }
            | GroupControl::Ingest { migration, .. }
            | GroupControl::DropCopy { migration, .. }
            | GroupControl::Release { migration, .. } => migration,
        }
    }
}

/// Why a group refused a request for a vShard. Deterministic: every replica
/// refuses the same request at the same index, and a refused write changed
/// nothing, so the client may retry it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum GateRefusal {
    #[error("vShard {vshard} is fenced by migration {migration} (write pause); retry shortly")]
    Fenced {
        vshard: VShardId,
        migration: MigrationId,
    },
    #[error("vShard {vshard} is not served by this group (it moved or is still being copied)")]
    NotServed { vshard: VShardId },
    #[error(
        "vShard {vshard} was routed here at epoch {epoch}, from before its move into this group \
         (after epoch {after_epoch}); refresh the routing table"
    )]
    StaleEpoch {
        vshard: VShardId,
        epoch: u64,
        after_epoch: u64,
    },
}

/// A control entry the gates refused: a deterministic no-op on every replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{control} of vShard {vshard} by migration {migration} refused: the vShard is {state}")]
pub struct ControlRefusal {
    pub control: String,
    pub vshard: VShardId,
    pub migration: MigrationId,
    pub state: String,
}

/// What an accepted control entry does to the state machine's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DataEffect<'a> {
    None,
    /// Replace the vShard's data with this export.
    Replace(&'a [u8]),
    /// Delete the vShard's data.
    Drop,
}

/// The gates of one data group.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VShardGates {
    gates: BTreeMap<VShardId, Gate>,
}

impl VShardGates {
    pub fn get(&self, vshard: VShardId) -> Option<Gate> {
        self.gates.get(&vshard).copied()
    }

    pub fn iter(&self) -> impl Iterator<Item = (VShardId, Gate)> + '_ {
        self.gates.iter().map(|(&v, &g)| (v, g))
    }

    /// Whether a request for `vshard`, routed at `epoch`, may be served.
    pub fn admit(&self, vshard: VShardId, epoch: u64) -> Result<(), GateRefusal> {
        match self.gates.get(&vshard) {
            None => Ok(()),
            Some(&Gate::Serving { after_epoch, .. }) if epoch > after_epoch => Ok(()),
            Some(&Gate::Serving { after_epoch, .. }) => Err(GateRefusal::StaleEpoch {
                vshard,
                epoch,
                after_epoch,
            }),
            Some(&Gate::Fenced { migration, .. }) => Err(GateRefusal::Fenced { vshard, migration }),
            Some(Gate::Copying { .. } | Gate::Departed { .. }) => {
                Err(GateRefusal::NotServed { vshard })
            }
        }
    }

    /// Applies one control entry. Every entry is idempotent (a redelivered
    /// step of the same migration changes nothing), and one that does not
    /// fit the vShard's state is refused and changes nothing.
    pub fn apply<'c>(
        &mut self,
        control: &'c GroupControl,
    ) -> Result<DataEffect<'c>, ControlRefusal> {
        let vshard = control.vshard();
        let migration = control.migration();
        let current = self.gates.get(&vshard).copied();
        let refuse = |name: &str| ControlRefusal {
            control: name.to_owned(),
            vshard,
            migration,
            state: describe(current),
        };
        let (next, effect) = match (control, current) {
            (GroupControl::Fence { .. }, None) => (
                Some(Gate::Fenced {
                    migration,
                    resume: None,
                }),
                DataEffect::None,
            ),
            (GroupControl::Fence { .. }, Some(Gate::Serving { after_epoch, .. })) => (
                Some(Gate::Fenced {
                    migration,
                    resume: Some(after_epoch),
                }),
                DataEffect::None,
            ),
            (GroupControl::Fence { .. }, Some(Gate::Fenced { migration: m, .. }))
                if m == migration =>
            {
                (current, DataEffect::None)
            }
            (GroupControl::Fence { .. }, _) => return Err(refuse("fence")),

            (
                GroupControl::Unfence { .. },
                Some(Gate::Fenced {
                    migration: m,
                    resume,
                }),
            ) if m == migration => {
                let next = resume.map(|after_epoch| Gate::Serving {
                    migration,
                    after_epoch,
                });
                (next, DataEffect::None)
            }
            // Nothing of this migration to undo (never fenced, or already
            // unfenced by an earlier delivery of the abort).
            (GroupControl::Unfence { .. }, _) => (current, DataEffect::None),

            (
                GroupControl::Ingest {
                    data,
                    serve_after_epoch,
                    ..
                },
                None | Some(Gate::Departed { .. }),
            ) => (
                Some(ingested(migration, *serve_after_epoch)),
                DataEffect::Replace(data),
            ),
            (
                GroupControl::Ingest {
                    data,
                    serve_after_epoch,
                    ..
                },
                Some(Gate::Copying { migration: m }),
            ) if m == migration => (
                Some(ingested(migration, *serve_after_epoch)),
                DataEffect::Replace(data),
            ),
            // Once served, the vShard takes writes here: a late copy of the
            // same move (a redelivery, or a coordinator that lost its role)
            // must never overwrite them, nor stop serving.
            (GroupControl::Ingest { .. }, Some(Gate::Serving { migration: m, .. }))
                if m == migration =>
            {
                (current, DataEffect::None)
            }
            (GroupControl::Ingest { .. }, _) => return Err(refuse("ingest")),

            (
                GroupControl::DropCopy { .. },
                Some(Gate::Copying { migration: m } | Gate::Serving { migration: m, .. }),
            ) if m == migration => (Some(Gate::Departed { migration }), DataEffect::Drop),
            // No copy of this migration here (never made, or already dropped).
            (GroupControl::DropCopy { .. }, _) => (current, DataEffect::None),

            (GroupControl::Release { .. }, Some(Gate::Fenced { migration: m, .. }))
                if m == migration =>
            {
                (Some(Gate::Departed { migration }), DataEffect::Drop)
            }
            (GroupControl::Release { .. }, Some(Gate::Departed { migration: m }))
                if m == migration =>
            {
                (current, DataEffect::None)
            }
            (GroupControl::Release { .. }, _) => return Err(refuse("release")),
        };
        match next {
            Some(gate) => self.gates.insert(vshard, gate),
            None => self.gates.remove(&vshard),
        };
        Ok(effect)
    }
}

fn ingested(migration: MigrationId, serve_after_epoch: Option<u64>) -> Gate {
    match serve_after_epoch {
        Some(after_epoch) => Gate::Serving {
            migration,
            after_epoch,
        },
        None => Gate::Copying { migration },
    }
}

fn describe(gate: Option<Gate>) -> String {
    match gate {
        None => "served without a gate".into(),
        Some(Gate::Fenced { migration, .. }) => format!("fenced by migration {migration}"),
        Some(Gate::Copying { migration }) => format!("being copied in by migration {migration}"),
        Some(Gate::Serving { migration, .. }) => format!("served since migration {migration}"),
        Some(Gate::Departed { migration }) => format!("gone since migration {migration}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(id: u16) -> VShardId {
        VShardId::new(id).unwrap()
    }

    fn m(byte: u8) -> MigrationId {
        MigrationId::from_random_bytes([byte; 16])
    }

    fn fence(m: MigrationId) -> GroupControl {
        GroupControl::Fence {
            vshard: v(3),
            migration: m,
        }
    }

    fn ingest(m: MigrationId, after: Option<u64>) -> GroupControl {
        GroupControl::Ingest {
            vshard: v(3),
            migration: m,
            data: b"copy".to_vec(),
            serve_after_epoch: after,
        }
    }

    #[test]
    fn a_move_out_fences_then_departs() {
        let mut gates = VShardGates::default();
        assert_eq!(gates.admit(v(3), 1), Ok(()));
        assert_eq!(gates.apply(&fence(m(1))), Ok(DataEffect::None));
        assert_eq!(
            gates.admit(v(3), 9),
            Err(GateRefusal::Fenced {
                vshard: v(3),
                migration: m(1)
            })
        );
        // Redelivery is a no-op; another migration cannot fence it again.
        assert_eq!(gates.apply(&fence(m(1))), Ok(DataEffect::None));
        assert!(gates.apply(&fence(m(2))).is_err());
        let release = GroupControl::Release {
            vshard: v(3),
            migration: m(1),
        };
        assert_eq!(gates.apply(&release), Ok(DataEffect::Drop));
        assert_eq!(gates.apply(&release), Ok(DataEffect::None));
        assert_eq!(
            gates.admit(v(3), 100),
            Err(GateRefusal::NotServed { vshard: v(3) })
        );
        // Other vShards are untouched.
        assert_eq!(gates.admit(v(4), 1), Ok(()));
    }

    #[test]
    fn an_aborted_move_out_serves_again_with_its_old_bound() {
        let mut gates = VShardGates::default();
        gates.apply(&ingest(m(1), Some(5))).unwrap();
        gates.apply(&fence(m(2))).unwrap();
        let unfence = GroupControl::Unfence {
            vshard: v(3),
            migration: m(2),
        };
        assert_eq!(gates.apply(&unfence), Ok(DataEffect::None));
        assert_eq!(gates.admit(v(3), 6), Ok(()));
        assert!(gates.admit(v(3), 5).is_err());
        // A second delivery of the abort changes nothing.
        assert_eq!(gates.apply(&unfence), Ok(DataEffect::None));
        assert_eq!(gates.admit(v(3), 6), Ok(()));
        // Nor can it release a vShard it no longer fences.
        assert!(gates
            .apply(&GroupControl::Release {
                vshard: v(3),
                migration: m(2)
            })
            .is_err());
    }

    #[test]
    fn a_move_in_serves_only_after_the_final_copy_and_only_newer_epochs() {
        let mut gates = VShardGates::default();
        assert_eq!(
            gates.apply(&ingest(m(1), None)),
            Ok(DataEffect::Replace(b"copy"))
        );
        assert_eq!(
            gates.admit(v(3), 50),
            Err(GateRefusal::NotServed { vshard: v(3) })
        );
        gates.apply(&ingest(m(1), None)).unwrap();
        gates.apply(&ingest(m(1), Some(7))).unwrap();
        // A late copy of the same move changes nothing once served.
        assert_eq!(gates.apply(&ingest(m(1), None)), Ok(DataEffect::None));
        assert_eq!(gates.apply(&ingest(m(1), Some(3))), Ok(DataEffect::None));
        assert_eq!(
            gates.admit(v(3), 7),
            Err(GateRefusal::StaleEpoch {
                vshard: v(3),
                epoch: 7,
                after_epoch: 7
            })
        );
        assert_eq!(gates.admit(v(3), 8), Ok(()));
        // A copy of another migration cannot overwrite a live one.
        assert!(gates.apply(&ingest(m(2), None)).is_err());
    }

    #[test]
    fn dropping_a_copy_is_idempotent_and_only_touches_its_own() {
        let mut gates = VShardGates::default();
        let drop = |mig| GroupControl::DropCopy {
            vshard: v(3),
            migration: mig,
        };
        assert_eq!(gates.apply(&drop(m(1))), Ok(DataEffect::None));
        assert_eq!(gates.get(v(3)), None);
        gates.apply(&ingest(m(1), Some(2))).unwrap();
        assert_eq!(gates.apply(&drop(m(2))), Ok(DataEffect::None));
        assert_eq!(gates.apply(&drop(m(1))), Ok(DataEffect::Drop));
        assert_eq!(gates.get(v(3)), Some(Gate::Departed { migration: m(1) }));
        // A departed vShard can move in again.
        assert_eq!(
            gates.apply(&ingest(m(3), None)),
            Ok(DataEffect::Replace(b"copy"))
        );
    }

    #[test]
    fn a_fenced_vshard_takes_no_copy() {
        let mut gates = VShardGates::default();
        gates.apply(&fence(m(1))).unwrap();
        let refusal = gates.apply(&ingest(m(1), None)).unwrap_err();
        assert!(refusal.to_string().contains("fenced by migration"));
    }
}
