//! Linearizable reads: a read-index round on the leader confirms it still
//! leads, then the read waits until its index has been applied.

use super::{take_where, PendingRead, ReadReply, Runtime};
use crate::core::ids::{GroupId, NodeId, VShardId};
use crate::core::vshard_gate::GateRefusal;
use crate::node::rpc::NodeError;
use raft::StateRole;
use tokio::time::Instant;

impl Runtime {
    /// Starts a linearizable read: only the leader serves it, after a read
    /// index round confirms it still leads and its state has caught up.
    pub(super) fn start_read(&mut self, group: GroupId, reply: ReadReply) {
        if crate::planted::planted(crate::planted::Bug::StaleReads) {
            if let ReadReply::Data {
                vshard,
                query,
                reply,
            } = reply
            {
                let _ = reply.send(self.query(group, vshard, &query));
                return;
            }
        }
        let leads = self
            .engine
            .status(group)
            .is_some_and(|s| s.role == StateRole::Leader);
        if !leads {
            reply.fail(self.not_leader(group));
            return;
        }
        let (id, context) = self.next_context();
        match self.engine.read_index(group, context) {
            Ok(()) => {
                self.reads.insert(
                    id,
                    PendingRead {
                        group,
                        reply,
                        index: None,
                        deadline: Instant::now() + self.config.request_timeout,
                    },
                );
            }
            Err(_) => reply.fail(self.not_leader(group)),
        }
    }

    /// Answers a read of `vshard` from this node's replica of `group`,
    /// gated by the routing epoch this node sees now.
    pub(super) fn query(
        &self,
        group: GroupId,
        vshard: VShardId,
        query: &[u8],
    ) -> Result<Vec<u8>, NodeError> {
        let Some(machine) = self.machines.get(&group) else {
            return Err(self.not_leader(group));
        };
        let epoch = self
            .metadata
            .as_ref()
            .map_or(0, |c| c.state().routing.epoch());
        machine
            .query(vshard, epoch, query)
            .map_err(|refusal| self.refusal_error(group, refusal))
    }

    /// A gate refusal as the requester should see it: a redirect if this
    /// node's routing already sends the vShard elsewhere, otherwise "not
    /// available yet" (the move is in its write pause, or routing lags).
    pub(super) fn refusal_error(&self, group: GroupId, refusal: GateRefusal) -> NodeError {
        let vshard = match refusal {
            GateRefusal::Fenced { vshard, .. }
            | GateRefusal::NotServed { vshard }
            | GateRefusal::StaleEpoch { vshard, .. } => vshard,
        };
        if let Some(cache) = &self.metadata {
            if let Err(redirect) = cache.state().routing.check(vshard, group) {
                return NodeError::WrongGroup(redirect);
            }
        }
        NodeError::Unavailable(refusal)
    }

    pub(super) fn on_read_state(&mut self, group: GroupId, state: raft::ReadState) {
        if let Some(id) = self.own_id(&state.request_ctx) {
            if let Some(read) = self.reads.get_mut(&id) {
                if read.group == group {
                    read.index = Some(state.index);
                }
            }
        }
    }

    /// Answers every read whose index has been applied.
    pub(super) fn serve_reads(&mut self) {
        let engine = &self.engine;
        let ready = take_where(&mut self.reads, |r| {
            r.index
                .is_some_and(|index| engine.status(r.group).is_some_and(|s| s.applied >= index))
        });
        for read in ready {
            match read.reply {
                ReadReply::Data {
                    vshard,
                    query,
                    reply,
                } => {
                    let _ = reply.send(self.query(read.group, vshard, &query));
                }
                ReadReply::Export { vshard, reply } => {
                    let result = match (
                        self.machines.get(&read.group),
                        self.engine.status(read.group),
                    ) {
                        (Some(machine), Some(status)) => {
                            Ok((status.applied, machine.export(vshard)))
                        }
                        _ => Err(self.not_leader(read.group)),
                    };
                    let _ = reply.send(result);
                }
                ReadReply::Metadata(tx) => {
                    let result = self
                        .metadata
                        .as_ref()
                        .map(|c| Box::new(c.state().clone()))
                        .ok_or(NodeError::NoMetadata);
                    let _ = tx.send(result);
                }
                ReadReply::Members { reply } => {
                    let result = self
                        .engine
                        .conf_state(read.group)
                        .map(|cs| {
                            let mut ids: Vec<u64> = [
                                cs.get_voters(),
                                cs.get_voters_outgoing(),
                                cs.get_learners(),
                                cs.get_learners_next(),
                            ]
                            .concat();
                            ids.sort_unstable();
                            ids.dedup();
                            ids.into_iter()
                                .filter_map(|id| NodeId::new(id).ok())
                                .collect()
                        })
                        .ok_or_else(|| self.not_leader(read.group));
                    let _ = reply.send(result);
                }
            }
        }
    }

    /// A node that lost leadership cannot complete its pending reads.
    pub(super) fn fail_reads_of_followers(&mut self) {
        let engine = &self.engine;
        let lost = take_where(&mut self.reads, |r| {
            engine
                .status(r.group)
                .is_none_or(|s| s.role != StateRole::Leader)
        });
        for read in lost {
            crate::probe!("node.read_lost_leadership");
            let error = self.not_leader(read.group);
            read.reply.fail(error);
        }
    }
}
