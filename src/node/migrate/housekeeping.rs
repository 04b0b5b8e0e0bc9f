//! What the coordinator tidies besides moves: gates no row explains, ghost
//! stubs past their time, and decommissions waiting for their moves. It
//! runs in its own task beside the executor (see [`run`](super::run)), and like
//! the executor acts only while its node leads group 0.

use super::{
    commit, control, leads_metadata, live_nodes, peer_statuses, start_move, MigrationConfig,
    Rounds, ORPHAN_SWEEP_INTERVAL,
};
use crate::core::entry::MetadataEntry;
use crate::core::ids::{MigrationId, NodeId};
use crate::core::migration::{MigrationCheckpointPayload, MigrationPhaseTag};
use crate::core::rebalance::{plan_decommission, ClusterView};
use crate::core::routing::RoutingChange;
use crate::core::topology::{NodeState, TopologyChange};
use crate::core::vshard_gate::{Gate, GroupControl};
use crate::node::rpc::NodeError;
use crate::node::Node;
use std::collections::BTreeMap;
use tokio::time::Instant;

/// The housekeeping task's state.
pub(super) struct Housekeeper {
    node: Node,
    config: MigrationConfig,
    last_sweep: Option<Instant>,
}

impl Rounds for Housekeeper {
    const NAME: &'static str = "migration housekeeping";

    /// One pass, if this node leads group 0.
    async fn round(&mut self) -> Result<(), NodeError> {
        if !leads_metadata(&self.node).await? {
            return Ok(());
        }
        let state = self.node.metadata_local().await?;
        self.clear_orphan_gates(&state).await?;
        self.expire_ghosts(&state).await;
        self.decommission(&state).await;
        Ok(())
    }
}

impl Housekeeper {
    pub(super) fn new(node: Node, config: MigrationConfig) -> Self {
        Housekeeper {
            node,
            config,
            last_sweep: None,
        }
    }

    /// Settles gates left by migrations that no longer run: an aborted
    /// move whose coordinator died before unfencing, or a late step of a
    /// coordinator that lost its role. A fence or partial copy whose
    /// migration has no open row is undone, as routing says: a fenced
    /// vShard that routing still sends to its group is unfenced (else
    /// released), and a copy in a group routing does not send it to is
    /// dropped. Runs at most once per `ORPHAN_SWEEP_INTERVAL`.
    async fn clear_orphan_gates(
        &mut self,
        state: &crate::core::cache::MetadataState,
    ) -> Result<(), NodeError> {
        if self
            .last_sweep
            .is_some_and(|at| at.elapsed() < ORPHAN_SWEEP_INTERVAL)
        {
            return Ok(());
        }
        self.last_sweep = Some(Instant::now());
        let statuses = peer_statuses(&self.node, state).await;
        // The table as of after the statuses: a move started while they
        // were asked for made its row before its first gate, so every gate
        // they report belongs to a row this copy of the table holds, and a
        // new move's gate is never taken for an orphan.
        let state = self.node.metadata_local().await?;
        let open = |m: MigrationId| {
            state
                .migrations
                .get(&m)
                .is_some_and(|row| row.phase != MigrationPhaseTag::Complete)
        };
        // Keyed by group and step, so that replicas reporting the same gate
        // (a stale leader and the new one) settle it once.
        let mut orphans = BTreeMap::new();
        for status in statuses.values() {
            for view in status.groups.iter().filter(|g| g.is_leader) {
                for &(vshard, gate) in &view.unsettled {
                    let served_here = state.routing.lookup(vshard).group == view.group;
                    let step = match gate {
                        Gate::Fenced { migration, .. } if !open(migration) => {
                            if served_here {
                                GroupControl::Unfence { vshard, migration }
                            } else {
                                GroupControl::Release { vshard, migration }
                            }
                        }
                        Gate::Copying { migration } if !open(migration) && !served_here => {
                            GroupControl::DropCopy { vshard, migration }
                        }
                        _ => continue,
                    };
                    orphans.insert((view.group, format!("{step:?}")), step);
                }
            }
        }
        for ((group, _), step) in orphans {
            if control(&self.node, group, step).await.is_ok() {
                crate::probe!("migration.orphan_gate_cleared");
            }
        }
        Ok(())
    }

    /// Removes ghost stubs whose move completed more than `ghost_ttl` ago.
    async fn expire_ghosts(&self, state: &crate::core::cache::MetadataState) {
        let now = self.node.now_ms();
        let ttl = u64::try_from(self.config.ghost_ttl.as_millis()).unwrap_or(u64::MAX);
        for (vshard, group, _) in state.routing.ghosts() {
            let expired = state.migrations.values().any(|row| {
                row.phase == MigrationPhaseTag::Complete
                    && now.saturating_sub(row.ts_ms) >= ttl
                    && matches!(row.verify(), Ok(MigrationCheckpointPayload::VShard(p))
                        if p.vshard_id == vshard && p.source_group == group)
            });
            if expired {
                let change = RoutingChange::RemoveGhostStub {
                    vshard_id: vshard,
                    group_id: group,
                };
                if commit(&self.node, MetadataEntry::RoutingChange(change))
                    .await
                    .is_ok()
                {
                    crate::probe!("migration.ghost_stub_expired");
                }
            }
        }
    }

    /// Moves replicas off draining nodes, a few at a time, and retires a
    /// drained node.
    async fn decommission(&self, state: &crate::core::cache::MetadataState) {
        let in_state = |wanted: NodeState| -> Vec<NodeId> {
            state
                .topology
                .nodes()
                .filter(|(_, info)| info.state == wanted)
                .map(|(node, _)| node)
                .collect()
        };
        // Decommissioned but still in the topology: the coordinator that
        // finished the decommission died, or lost group 0, before the
        // `Leave` (simulator seed 11303).
        for node in in_state(NodeState::Decommissioned) {
            crate::probe!("decommission.leave_resumed");
            self.retire(node, &[TopologyChange::Leave { node_id: node }])
                .await;
        }
        let draining = in_state(NodeState::Draining);
        if draining.is_empty() {
            return;
        }
        let in_flight = state
            .migrations
            .values()
            .filter(|r| r.phase != MigrationPhaseTag::Complete)
            .count();
        let live = live_nodes(&self.node, state).await;
        let mut budget = self.config.max_in_flight.saturating_sub(in_flight);
        for node in draining {
            if state.routing.groups_of_node(node).is_empty() {
                let changes = [
                    TopologyChange::FinishDecommission { node_id: node },
                    TopologyChange::Leave { node_id: node },
                ];
                self.retire(node, &changes).await;
                continue;
            }
            let view = ClusterView::new(state, &live);
            let busy = view.busy_groups();
            let Ok(plan) = plan_decommission(&view, node) else {
                crate::probe!("decommission.waiting_for_safe_move");
                continue;
            };
            for planned in plan
                .into_iter()
                .filter(|m| m.groups().iter().all(|g| !busy.contains(g)))
            {
                if budget == 0 {
                    return;
                }
                if start_move(&self.node, planned).await.is_ok() {
                    crate::probe!("decommission.move_started");
                    budget -= 1;
                }
            }
        }
    }

    /// Commits `changes`, the last steps of `node`'s decommission, in order,
    /// stopping at the first that fails (the next round tries again from
    /// the state it left).
    async fn retire(&self, node: NodeId, changes: &[TopologyChange]) {
        for change in changes {
            let entry = MetadataEntry::TopologyChange(change.clone());
            if let Err(e) = commit(&self.node, entry).await {
                tracing::debug!(%node, error = %e, "decommission step failed; retrying");
                return;
            }
        }
        crate::probe!("decommission.finished");
    }
}
