//! Commands from the local [`Node`](crate::node::Node) handle: proposals
//! are checked against routing and the vShard gates, then proposed.

use super::{Command, PendingProposal, ReadReply, Runtime};
use crate::core::codec;
use crate::core::entry::MetadataRecord;
use crate::core::ids::GroupId;
use crate::node::rpc::{Committed, DataBody, DataRecord, NodeError};
use crate::raft::engine::EngineError;
use rand_chacha::rand_core::RngCore;
use tokio::sync::oneshot;
use tokio::time::Instant;

/// The metadata state requests are served from; if there is none (see
/// `Runtime::serving_state`), answers `reply` with why and returns.
macro_rules! serving_or_refuse {
    ($runtime:ident, $reply:ident) => {
        match $runtime.serving_state() {
            Ok(state) => state,
            Err(e) => {
                let _ = $reply.send(Err(e));
                return;
            }
        }
    };
}

impl Runtime {
    fn propose(
        &mut self,
        group: GroupId,
        data: Vec<u8>,
        hlc: crate::core::hlc::Hlc,
        reply: oneshot::Sender<Result<Committed, NodeError>>,
    ) {
        if let Some(cause) = self.failed.get(&group) {
            let _ = reply.send(Err(NodeError::FailStopped {
                group,
                cause: cause.clone(),
            }));
            return;
        }
        let (id, context) = self.next_context();
        match self.engine.propose(group, context, data) {
            Ok(()) => {
                let deadline = Instant::now() + self.config.request_timeout;
                self.proposals.insert(
                    id,
                    PendingProposal {
                        group,
                        hlc,
                        reply,
                        deadline,
                    },
                );
            }
            // raft-rs drops a proposal it did not append (a leadership
            // transfer is under way): nothing was written, so the caller
            // retries, and a write waits out a replica move's pause.
            Err(EngineError::NotLeader { .. })
            | Err(EngineError::UnknownGroup(_))
            | Err(EngineError::Raft {
                source: raft::Error::ProposalDropped,
                ..
            }) => {
                let _ = reply.send(Err(self.not_leader(group)));
            }
            Err(e) => {
                let _ = reply.send(Err(NodeError::BadRequest(e.to_string())));
            }
        }
    }

    pub(super) fn on_command(&mut self, command: Command) {
        match command {
            Command::ProposeMetadata { entry, reply } => {
                let state = serving_or_refuse!(self, reply);
                if let Err(e) = entry.check_allowed(state.cluster_version) {
                    let _ = reply.send(Err(NodeError::BadRequest(e.to_string())));
                    return;
                }
                let hlc = self.hlc.now(self.clock.now_ms());
                let data = MetadataRecord::new(hlc, entry).encode();
                self.propose(GroupId::METADATA, data, hlc, reply);
            }
            Command::Propose {
                vshard,
                group: expected,
                command,
                reply,
            } => {
                let routing = &serving_or_refuse!(self, reply).routing;
                if let Some(expected) = expected {
                    if let Err(redirect) = routing.check(vshard, expected) {
                        crate::probe!("routing.wrong_group_redirect");
                        let _ = reply.send(Err(NodeError::WrongGroup(redirect)));
                        return;
                    }
                }
                let group = routing.lookup(vshard).group;
                let epoch = routing.epoch();
                // The leader refuses early what the gates would refuse at
                // apply time anyway; the apply-time check is the one that counts.
                if let Some(Err(refusal)) =
                    self.machines.get(&group).map(|g| g.admit(vshard, epoch))
                {
                    let _ = reply.send(Err(self.refusal_error(group, refusal)));
                    return;
                }
                let hlc = self.hlc.now(self.clock.now_ms());
                let data = codec::encode(&DataRecord {
                    hlc,
                    vshard,
                    epoch,
                    body: DataBody::Command(command),
                });
                self.propose(group, data, hlc, reply);
            }
            Command::ProposeControl {
                group,
                control,
                reply,
            } => {
                let epoch = serving_or_refuse!(self, reply).routing.epoch();
                let hlc = self.hlc.now(self.clock.now_ms());
                let data = codec::encode(&DataRecord {
                    hlc,
                    vshard: control.vshard(),
                    epoch,
                    body: DataBody::Control(control),
                });
                self.propose(group, data, hlc, reply);
            }
            Command::ExportVShard {
                group,
                vshard,
                reply,
            } => {
                serving_or_refuse!(self, reply);
                self.start_read(group, ReadReply::Export { vshard, reply });
            }
            Command::DestroyReplica { group } => {
                self.destroy_replica(group);
            }
            Command::Retired => self.on_retired(),
            Command::Read {
                vshard,
                query,
                linearizable,
                reply,
            } => {
                let group = serving_or_refuse!(self, reply).routing.lookup(vshard).group;
                if !linearizable {
                    let result = self.query(group, vshard, &query);
                    let _ = reply.send(result);
                    return;
                }
                self.start_read(
                    group,
                    ReadReply::Data {
                        vshard,
                        query,
                        reply,
                    },
                );
            }
            Command::ReadMetadata { reply } => {
                serving_or_refuse!(self, reply);
                self.start_read(GroupId::METADATA, ReadReply::Metadata(reply));
            }
            Command::GroupMembers { group, reply } => {
                self.start_read(group, ReadReply::Members { reply });
            }
            Command::ReadMetadataLocal { reply } => {
                let state = self.metadata.as_ref().map(|c| Box::new(c.state().clone()));
                let _ = reply.send(state);
            }
            Command::Entropy { reply } => {
                let mut bytes = [0u8; 32];
                self.rng.fill_bytes(&mut bytes);
                let _ = reply.send(bytes);
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::LocalSnapshot { group, reply } => {
                let _ = reply.send(self.local_snapshot(group));
            }
        }
    }
}
