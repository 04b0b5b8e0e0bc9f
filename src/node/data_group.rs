//! One data group's replicated state on a node: the host's state machine
//! plus the vShard gates that vShard moves write into the group's own log
//! (DESIGN.md §5, `core::vshard_gate`).
//!
//! The group's Raft snapshot carries both, so a replica restored from a
//! snapshot refuses exactly what its peers refuse. Everything here is
//! deterministic: the same records at the same indices give the same
//! answers and the same snapshot bytes on every replica.

use crate::core::codec::{self, CodecError, FrameKind, Wire};
use crate::core::ids::VShardId;
use crate::core::state_machine::{DataStateMachine, StateMachineError};
use crate::core::vshard_gate::{
    ControlRefusal, DataEffect, Gate, GateRefusal, GroupControl, VShardGates,
};
use crate::node::rpc::{DataBody, DataRecord, Outcome};
use serde::{Deserialize, Serialize};

/// The encoding of a data group's Raft snapshot.
#[derive(Serialize, Deserialize)]
struct DataGroupSnapshot {
    gates: VShardGates,
    #[serde(with = "serde_bytes")]
    machine: Vec<u8>,
}

impl Wire for DataGroupSnapshot {
    const KIND: FrameKind = FrameKind::Snapshot;
}

pub(crate) struct DataGroup {
    machine: Box<dyn DataStateMachine>,
    gates: VShardGates,
}

impl DataGroup {
    pub(crate) fn new(machine: Box<dyn DataStateMachine>) -> Self {
        DataGroup {
            machine,
            gates: VShardGates::default(),
        }
    }

    /// Restores a group from its snapshot bytes (untrusted: from a peer or
    /// from disk); `machine` is a fresh state machine of the group's type.
    pub(crate) fn restore(
        mut machine: Box<dyn DataStateMachine>,
        snapshot: &[u8],
    ) -> Result<Self, StateMachineError> {
        let decoded: DataGroupSnapshot =
            codec::decode(snapshot).map_err(|e: CodecError| StateMachineError::Decode(e))?;
        machine.restore(&decoded.machine)?;
        Ok(DataGroup {
            machine,
            gates: decoded.gates,
        })
    }

    pub(crate) fn snapshot(&self) -> Vec<u8> {
        codec::encode(&DataGroupSnapshot {
            gates: self.gates.clone(),
            machine: self.machine.snapshot(),
        })
    }

    /// Whether a request for `vshard` routed at `epoch` may be served.
    pub(crate) fn admit(&self, vshard: VShardId, epoch: u64) -> Result<(), GateRefusal> {
        self.gates.admit(vshard, epoch)
    }

    /// The gates a move has not settled yet (fences and partial copies):
    /// what `keel status` shows, and what must be gone once every
    /// migration has finished.
    pub(crate) fn unsettled_gates(&self) -> Vec<(VShardId, Gate)> {
        self.gates
            .iter()
            .filter(|(_, gate)| matches!(gate, Gate::Fenced { .. } | Gate::Copying { .. }))
            .collect()
    }

    /// Applies one committed record at `index`. A command the gates refuse
    /// changes nothing and comes back as the refusal.
    pub(crate) fn apply(&mut self, index: u64, record: DataRecord) -> Result<Outcome, GateRefusal> {
        match record.body {
            DataBody::Command(command) => {
                self.gates.admit(record.vshard, record.epoch)?;
                Ok(Outcome::Data(self.machine.apply(index, &command)))
            }
            DataBody::Control(control) => Ok(Outcome::Control(self.control(&control).err())),
        }
    }

    /// A move step: the gates decide, then the data follows. If the state
    /// machine refuses an imported copy, the gates stay as they were.
    fn control(&mut self, control: &GroupControl) -> Result<(), ControlRefusal> {
        let mut gates = self.gates.clone();
        match gates.apply(control)? {
            DataEffect::None => {}
            DataEffect::Replace(export) => self
                .machine
                .import_vshard(control.vshard(), export)
                .map_err(|e| ControlRefusal {
                    control: "ingest".into(),
                    vshard: control.vshard(),
                    migration: control.migration(),
                    state: format!("not importable: {e}"),
                })?,
            DataEffect::Drop => self.machine.drop_vshard(control.vshard()),
        }
        self.gates = gates;
        Ok(())
    }

    /// Answers a read of `vshard` routed at `epoch`.
    pub(crate) fn query(
        &self,
        vshard: VShardId,
        epoch: u64,
        query: &[u8],
    ) -> Result<Vec<u8>, GateRefusal> {
        self.gates.admit(vshard, epoch)?;
        Ok(self.machine.query(query))
    }

    /// One vShard's data for a move's copy. Not gated: the final copy is
    /// taken behind the source's own fence.
    pub(crate) fn export(&self, vshard: VShardId) -> Vec<u8> {
        self.machine.export_vshard(vshard)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::hlc::Hlc;
    use crate::core::ids::MigrationId;
    use crate::core::kv::{KvCommand, KvStateMachine};

    fn record(vshard: VShardId, epoch: u64, body: DataBody) -> DataRecord {
        DataRecord {
            hlc: Hlc::default(),
            vshard,
            epoch,
            body,
        }
    }

    fn put(key: &[u8]) -> DataBody {
        DataBody::Command(codec::encode(&KvCommand::Put {
            key: key.to_vec(),
            value: b"v".to_vec(),
        }))
    }

    #[test]
    fn a_fenced_vshard_refuses_writes_and_the_snapshot_keeps_the_fence() {
        let vshard = VShardId::for_key(b"k");
        let migration = MigrationId::from_random_bytes([1; 16]);
        let mut group = DataGroup::new(Box::new(KvStateMachine::new()));
        assert!(group.apply(1, record(vshard, 1, put(b"k"))).is_ok());
        let fence = DataBody::Control(GroupControl::Fence { vshard, migration });
        assert_eq!(
            group.apply(2, record(vshard, 1, fence)),
            Ok(Outcome::Control(None))
        );
        assert_eq!(
            group.apply(3, record(vshard, 9, put(b"k"))),
            Err(GateRefusal::Fenced { vshard, migration })
        );
        let restored =
            DataGroup::restore(Box::new(KvStateMachine::new()), &group.snapshot()).unwrap();
        assert_eq!(restored.snapshot(), group.snapshot());
        assert_eq!(restored.unsettled_gates().len(), 1);
        assert!(restored.query(vshard, 9, b"").is_err());
        // The export still works behind the fence: it is the final copy.
        assert_eq!(restored.export(vshard), group.export(vshard));
    }

    #[test]
    fn an_unimportable_copy_leaves_the_gates_alone() {
        let vshard = VShardId::for_key(b"k");
        let migration = MigrationId::from_random_bytes([2; 16]);
        let mut group = DataGroup::new(Box::new(KvStateMachine::new()));
        let ingest = DataBody::Control(GroupControl::Ingest {
            vshard,
            migration,
            data: b"not an export".to_vec(),
            serve_after_epoch: None,
        });
        let Ok(Outcome::Control(Some(refusal))) = group.apply(1, record(vshard, 1, ingest)) else {
            panic!("a garbage copy must be refused");
        };
        assert!(refusal.to_string().contains("not importable"));
        assert!(group.unsettled_gates().is_empty());
        assert!(DataGroup::restore(Box::new(KvStateMachine::new()), b"junk").is_err());
    }
}
