//! Rebalancing and decommission planning (DESIGN.md §5, issue 6).
//!
//! The planner decides *which* moves to make; the migration machinery
//! (replica moves, vShard moves, leadership transfers) makes them. Keeping the
//! decision a pure function of replicated state (topology, routing table,
//! migration table) plus the caller's liveness measurement means that the
//! leader of group 0, a `--dry-run` on an operator's terminal and the
//! simulator all compute the same plan from the same inputs, and the safety
//! check that guards a move can be unit-tested without a cluster.
//!
//! Two rules hold for every plan:
//! - a group is touched by at most one move at a time, counting the
//!   migrations already in flight: two concurrent membership changes of one
//!   Raft group could each be safe alone and unsafe together;
//! - every replica move passes [`check_replica_move`], which counts *live*
//!   voters rather than routing members, because a group whose routing lists
//!   three voters of which two are down has no quorum to spare.
//!
//! Up-replication to the replication factor is
//! [`placement::next_replicas`](crate::core::placement::next_replicas)' job;
//! the planner here only moves replicas that already exist.
//!
//! This module holds what a plan is made of; `safety` holds the check that
//! guards each move and the errors that say why one is refused, `planner`
//! the plans themselves.

use crate::core::cache::MetadataState;
use crate::core::ids::{GroupId, MigrationId, NodeId, VShardId};
use crate::core::migration::MigrationRow;
use crate::core::routing::RoutingTable;
use crate::core::topology::Topology;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

mod planner;
mod safety;
#[cfg(test)]
mod tests;

pub use planner::{plan_decommission, plan_rebalance};
pub use safety::{busy_groups, check_replica_move, SafetyError};

/// What the planner looks at.
#[derive(Clone, Copy, Debug)]
pub struct ClusterView<'a> {
    pub topology: &'a Topology,
    pub routing: &'a RoutingTable,
    pub replication_factor: usize,
    pub migrations: &'a BTreeMap<MigrationId, MigrationRow>,
    /// Nodes known to be reachable now (the caller measures it).
    pub live: &'a BTreeSet<NodeId>,
}

impl<'a> ClusterView<'a> {
    /// The view of a replicated metadata state, with the nodes the caller
    /// found reachable.
    pub fn new(state: &'a MetadataState, live: &'a BTreeSet<NodeId>) -> Self {
        ClusterView {
            topology: &state.topology,
            routing: &state.routing,
            replication_factor: usize::try_from(state.replication_factor).unwrap_or(usize::MAX),
            migrations: &state.migrations,
            live,
        }
    }

    /// The data groups no new move may touch: those named by an in-flight
    /// migration, or every group of the routing table (plus the metadata
    /// group) when some migration row does not verify, since such a row may be
    /// changing any group and guessing which would risk two concurrent moves.
    pub fn busy_groups(&self) -> BTreeSet<GroupId> {
        let mut busy = busy_groups(self.migrations);
        if busy.contains(&GroupId::METADATA) {
            busy.extend(self.routing.groups().map(|(group, _)| group));
        }
        busy
    }
}

/// One step of a plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PlannedMove {
    /// A replica move (DESIGN.md §5): `target` replaces `source` in `group`.
    Replica {
        group: GroupId,
        source: NodeId,
        target: NodeId,
    },
    /// A vShard move from data group `from` to data group `to`.
    VShard {
        vshard: VShardId,
        from: GroupId,
        to: GroupId,
    },
    /// A leadership transfer of `group` to its voter `to`.
    Leader { group: GroupId, to: NodeId },
}

impl PlannedMove {
    /// The data groups the move changes; a vShard move changes both ends.
    /// The one-move-per-group rule is checked against this list.
    pub fn groups(&self) -> Vec<GroupId> {
        match *self {
            PlannedMove::Replica { group, .. } | PlannedMove::Leader { group, .. } => vec![group],
            PlannedMove::VShard { from, to, .. } => vec![from, to],
        }
    }
}

/// The `--dry-run` wording: plain numbers, since operators type them back
/// into `keel` commands.
impl fmt::Display for PlannedMove {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            PlannedMove::Replica {
                group,
                source,
                target,
            } => write!(
                f,
                "move group {}'s replica from node {} to node {}",
                group.0,
                source.get(),
                target.get()
            ),
            PlannedMove::VShard { vshard, from, to } => write!(
                f,
                "move vShard {} from group {} to group {}",
                vshard.get(),
                from.0,
                to.0
            ),
            PlannedMove::Leader { group, to } => {
                write!(
                    f,
                    "move group {}'s leadership to node {}",
                    group.0,
                    to.get()
                )
            }
        }
    }
}

/// When during a replica move a group would lack live voters.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum MoveStage {
    /// While the old configuration must still commit (adding the learner,
    /// and the old half of the joint configuration).
    During,
    /// Once the new configuration must commit (the new half of the joint
    /// configuration, and every write afterwards).
    After,
}

impl fmt::Display for MoveStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MoveStage::During => "during the move",
            MoveStage::After => "after the move",
        })
    }
}
