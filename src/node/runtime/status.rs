//! What this node reports about itself: its status and local snapshots.

use super::Runtime;
use crate::core::cache::MetadataCache;
use crate::core::ids::{GroupId, NodeId};
use crate::node::data_group::DataGroup;
use crate::node::rpc::{GroupView, NodeStatus, PeerProgress};
use raft::StateRole;

impl Runtime {
    /// This replica's state of `group` and the index it reflects.
    pub(super) fn local_snapshot(&self, group: GroupId) -> Option<(u64, Vec<u8>)> {
        if group.is_metadata() {
            let cache = self.metadata.as_ref()?;
            Some((cache.applied_index(), cache.snapshot()))
        } else {
            let machine = self.machines.get(&group)?;
            let applied = self.engine.status(group)?.applied;
            Some((applied, machine.snapshot()))
        }
    }

    pub(super) fn status(&self) -> NodeStatus {
        let groups = self
            .engine
            .groups()
            .filter_map(|group| {
                let s = self.engine.status(group)?;
                let cs = self.engine.conf_state(group)?;
                let nodes = |ids: &[u64]| {
                    let mut nodes: Vec<NodeId> =
                        ids.iter().filter_map(|&i| NodeId::new(i).ok()).collect();
                    nodes.sort();
                    nodes
                };
                Some(GroupView {
                    group,
                    leader: s.leader,
                    is_leader: s.role == StateRole::Leader,
                    term: s.term,
                    commit: s.commit,
                    applied: s.applied,
                    voters: nodes(cs.get_voters()),
                    voters_outgoing: nodes(cs.get_voters_outgoing()),
                    learners: nodes(cs.get_learners()),
                    failed: self.failed.get(&group).cloned(),
                    unsettled: self
                        .machines
                        .get(&group)
                        .map(DataGroup::unsettled_gates)
                        .unwrap_or_default(),
                    peers: {
                        let mut peers: Vec<PeerProgress> = self
                            .engine
                            .progress(group)
                            .into_iter()
                            .map(|(node, matched, state)| PeerProgress {
                                node,
                                matched,
                                state,
                            })
                            .collect();
                        peers.sort_by_key(|p| p.node);
                        peers
                    },
                })
            })
            .collect();
        NodeStatus {
            node: self.me,
            routing_epoch: self.metadata.as_ref().map(|c| c.state().routing.epoch()),
            metadata_applied: self.metadata.as_ref().map(MetadataCache::applied_index),
            groups,
            retired: self.is_retired(),
        }
    }
}
