//! The conditions the supervisor waits for while it forms, heals and
//! checks the cluster.

use super::clients::execute;
use super::SimCluster;
use crate::history::{Op, Outcome as HistoryOutcome};
use keel::core::codec;
use keel::core::ids::{GroupId, NodeId};
use keel::core::kv::KvCommand;
use keel::core::migration::MigrationPhaseTag;
use keel::core::routing::RoutingTable;
use keel::core::topology::NodeState;

/// A condition the supervisor waits for.
pub(super) trait AsyncCheck<T> {
    async fn check(&mut self, cluster: &SimCluster) -> Option<T>;

    /// What kept the last check from passing, when the check can say.
    fn blocker(&self) -> Option<&str> {
        None
    }
}

/// The node is running and answers.
pub(super) struct Ready(pub(super) NodeId);
impl AsyncCheck<()> for Ready {
    async fn check(&mut self, c: &SimCluster) -> Option<()> {
        c.node(self.0)?.status().await.ok().map(|_| ())
    }
}

/// Every node not lost is registered (started after a restart) and answers.
pub(super) struct AllRunning;
impl AsyncCheck<()> for AllRunning {
    async fn check(&mut self, c: &SimCluster) -> Option<()> {
        for id in c.nodes.keys().filter(|id| !c.is_lost(**id)) {
            c.node(*id)?.status().await.ok()?;
        }
        Some(())
    }
}

/// Group 0 has `0` voters in every node's view.
pub(super) struct MetadataVoters(pub(super) usize);
impl AsyncCheck<()> for MetadataVoters {
    async fn check(&mut self, c: &SimCluster) -> Option<()> {
        for id in c.up_nodes() {
            let view = c.node(id)?.group(GroupId::METADATA).await.ok()??;
            if view.voters.len() != self.0 {
                return None;
            }
        }
        Some(())
    }
}

/// Every node is an active member of the topology (as group 0's leader sees it).
pub(super) struct AllActive;
impl AsyncCheck<()> for AllActive {
    async fn check(&mut self, c: &SimCluster) -> Option<()> {
        use keel::core::topology::NodeState;
        for id in c.up_nodes() {
            let node = c.node(id)?;
            if let Ok(state) = node.metadata().await {
                let active = state
                    .topology
                    .nodes()
                    .filter(|(_, info)| matches!(info.state, NodeState::Active(_)))
                    .count();
                return (active as u64 == c.swarm.nodes).then_some(());
            }
        }
        None
    }
}

/// Every data group's leader runs with the replication factor's voters.
pub(super) struct GroupsReplicated;
impl AsyncCheck<()> for GroupsReplicated {
    async fn check(&mut self, c: &SimCluster) -> Option<()> {
        'groups: for g in 1..=c.swarm.data_groups {
            for id in c.up_nodes() {
                if let Some(view) = c.node(id)?.group(GroupId(g)).await.ok()? {
                    if view.is_leader && view.voters.len() == c.swarm.replication_factor {
                        continue 'groups;
                    }
                }
            }
            return None;
        }
        Some(())
    }
}

/// A write to the key succeeds through some node.
pub(super) struct Writable(pub(super) String);
impl AsyncCheck<()> for Writable {
    async fn check(&mut self, c: &SimCluster) -> Option<()> {
        let node = c.entry().await?;
        let command = KvCommand::Put {
            key: self.0.as_bytes().to_vec(),
            value: b"live".to_vec(),
        };
        let vshard = command.vshard();
        match node.propose(vshard, codec::encode(&command)).await {
            Ok(_) => Some(()),
            Err(e) => {
                tracing::debug!(target: "keel_sim", key = %self.0, error = %e, "liveness write failed");
                None
            }
        }
    }
}

/// The routing table, from a linearizable read of group 0.
pub(super) struct CurrentRouting;
impl AsyncCheck<RoutingTable> for CurrentRouting {
    async fn check(&mut self, c: &SimCluster) -> Option<RoutingTable> {
        Some(c.entry().await?.metadata().await.ok()?.routing)
    }
}

/// The data group, which serves no vShard to write to, has a leader that
/// a quorum follows (it answers a read index); or routing no longer lists
/// it.
pub(super) struct Led(pub(super) GroupId);
impl AsyncCheck<()> for Led {
    async fn check(&mut self, c: &SimCluster) -> Option<()> {
        let node = c.entry().await?;
        if node.metadata().await.ok()?.routing.group(self.0).is_none() {
            return Some(());
        }
        for id in c.up_nodes() {
            if c.node(id)?.group_members(self.0).await.is_ok() {
                return Some(());
            }
        }
        None
    }
}

/// A linearizable read of the key succeeds; yields its value.
pub(super) struct Readable(pub(super) String);
impl AsyncCheck<Option<String>> for Readable {
    async fn check(&mut self, c: &SimCluster) -> Option<Option<String>> {
        let node = c.entry().await?;
        match execute(&node, &self.0, &Op::Get).await {
            HistoryOutcome::Ok(value) => Some(value),
            _ => None,
        }
    }
}

/// The node has left the topology, or the other active nodes are too few to
/// take its replicas (it then stays, dead, in its groups).
pub(super) struct Removed {
    pub(super) node: NodeId,
    /// The node's state at the last check, for the failure message.
    pub(super) last_seen: String,
}
impl AsyncCheck<()> for Removed {
    async fn check(&mut self, c: &SimCluster) -> Option<()> {
        let node = c.entry().await?;
        let state = node.metadata().await.ok()?;
        let others = state
            .topology
            .nodes()
            .filter(|(id, info)| *id != self.node && matches!(info.state, NodeState::Active(_)))
            .count();
        let info = state.topology.get(self.node);
        self.last_seen = match info {
            Some(info) => format!(
                "{} is {}, with replicas in {:?}",
                self.node,
                info.state,
                state.routing.groups_of_node(self.node)
            ),
            None => format!("{} is gone", self.node),
        };
        let stays = info.is_some_and(|info| {
            matches!(info.state, NodeState::Active(_)) && others < c.swarm.replication_factor
        });
        (info.is_none() || stays).then_some(())
    }

    fn blocker(&self) -> Option<&str> {
        Some(self.last_seen.as_str()).filter(|b| !b.is_empty())
    }
}

/// See [`SimCluster::migrations_settled`].
#[derive(Default)]
pub(super) struct Settled {
    /// What kept the last check from passing, for the failure message.
    blocker: String,
}
impl AsyncCheck<()> for Settled {
    async fn check(&mut self, c: &SimCluster) -> Option<()> {
        match self.first_blocker(c).await {
            Some(blocker) => {
                self.blocker = blocker;
                None
            }
            None => Some(()),
        }
    }

    fn blocker(&self) -> Option<&str> {
        Some(self.blocker.as_str()).filter(|b| !b.is_empty())
    }
}

impl Settled {
    /// The first thing found unsettled, or `None` when all is.
    async fn first_blocker(&self, c: &SimCluster) -> Option<String> {
        let Some(node) = c.entry().await else {
            return Some("no running node is active in the group-0 leader's topology".into());
        };
        let state = match node.metadata().await {
            Ok(state) => state,
            Err(e) => return Some(format!("{} did not give its metadata: {e}", node.id())),
        };
        if let Some(row) = state
            .migrations
            .values()
            .find(|row| row.phase != MigrationPhaseTag::Complete)
        {
            return Some(format!(
                "migration {} is at phase {:?}, attempt {}",
                row.migration_id, row.phase, row.attempt
            ));
        }
        if let Some(ghost) = state.routing.ghosts().next() {
            return Some(format!("routing keeps a ghost stub: {ghost:?}"));
        }
        for id in c.up_nodes() {
            let Some(node) = c.node(id) else {
                return Some(format!("{id} is not running"));
            };
            let status = match node.status().await {
                Ok(status) => status,
                Err(e) => return Some(format!("{id} did not give its status: {e}")),
            };
            for view in status.groups.iter().filter(|g| !g.group.is_metadata()) {
                if !view.unsettled.is_empty() {
                    return Some(format!(
                        "{id}'s replica of {} has unsettled gates {:?}",
                        view.group, view.unsettled
                    ));
                }
                let listed = state
                    .routing
                    .group(view.group)
                    .is_some_and(|r| r.is_member(id));
                if !listed {
                    return Some(format!(
                        "{id} has a replica of {}, which routing does not list on it",
                        view.group
                    ));
                }
            }
        }
        None
    }
}

/// All replicas of the group report the same state at the same index.
pub(super) struct Converged(pub(super) GroupId);
impl AsyncCheck<Vec<(NodeId, Vec<u8>)>> for Converged {
    async fn check(&mut self, c: &SimCluster) -> Option<Vec<(NodeId, Vec<u8>)>> {
        let mut states = Vec::new();
        let node = c.entry().await?;
        let state = node.metadata().await.ok()?;
        if !self.0.is_metadata() && state.routing.group(self.0).is_none() {
            // Dropped since the groups were listed: nothing to compare.
            return Some(Vec::new());
        }
        for id in c.up_nodes() {
            // Only current members must converge: a decommissioned node
            // keeps its last view of group 0, and left it for good.
            let member = if self.0.is_metadata() {
                state
                    .topology
                    .get(id)
                    .is_some_and(|info| info.state != NodeState::Decommissioned)
            } else {
                state.routing.group(self.0).is_some_and(|r| r.is_member(id))
            };
            if !member {
                continue;
            }
            if let Some((index, bytes)) = c.node(id)?.local_snapshot(self.0).await.ok()? {
                states.push((id, index, bytes));
            }
        }
        let (_, index, bytes) = states.first()?;
        if states.iter().all(|(_, i, b)| i == index && b == bytes) {
            Some(states.into_iter().map(|(id, _, b)| (id, b)).collect())
        } else {
            None
        }
    }
}
