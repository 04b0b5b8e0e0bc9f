//! DESIGN.md §5's safety check for a move, and the errors that name why
//! one is refused.

use crate::core::ids::{GroupId, MigrationId, NodeId};
use crate::core::migration::{MigrationCheckpointPayload, MigrationPhaseTag, MigrationRow};
use crate::core::routing::GroupRoute;
use crate::core::topology::NodeState;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

use super::{ClusterView, MoveStage};

/// Why a move (or a whole decommission) is refused. Each message names the
/// group, the nodes and the numbers, because an operator reads it to decide
/// what to fix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum SafetyError {
    #[error("node {} is not part of the cluster", .node.get())]
    UnknownNode { node: NodeId },
    #[error("group {} does not exist in the routing table", .group.0)]
    UnknownGroup { group: GroupId },
    #[error(
        "group {} has migration {migration} in flight (phase {phase:?}); a group runs one move \
         at a time, so wait for it to complete or abort",
        .group.0
    )]
    GroupBusy {
        group: GroupId,
        migration: MigrationId,
        phase: MigrationPhaseTag,
    },
    #[error(
        "the checkpoint of migration {migration} does not verify, so it may be changing any \
         group and group {} counts as busy until the corrupt row is repaired",
        .group.0
    )]
    UnverifiedMigration {
        group: GroupId,
        migration: MigrationId,
    },
    #[error(
        "node {} is not a member of group {} (members {}), so it has no replica of it to move",
        .node.get(), .group.0, node_list(.members)
    )]
    SourceNotMember {
        group: GroupId,
        node: NodeId,
        members: Vec<NodeId>,
    },
    #[error(
        "node {} is {state}, so it cannot receive group {}'s replica; only active nodes take \
         new replicas",
        .target.get(), .group.0
    )]
    TargetNotActive {
        group: GroupId,
        target: NodeId,
        state: NodeState,
    },
    #[error(
        "node {} does not answer, so it cannot receive group {}'s replica: the move would \
         only time out waiting for it to catch up",
        .target.get(), .group.0
    )]
    TargetUnreachable { group: GroupId, target: NodeId },
    #[error(
        "node {} is already a member of group {} (members {}), so it cannot hold a second \
         replica of it",
        .target.get(), .group.0, node_list(.members)
    )]
    TargetAlreadyMember {
        group: GroupId,
        target: NodeId,
        members: Vec<NodeId>,
    },
    #[error(
        "moving group {}'s replica from node {} to node {} would leave the group {live} live \
         voter(s) out of {voters} {stage}, fewer than the {need} a majority needs; unreachable \
         voters: {}",
        .group.0, .from.get(), .to.get(), node_list(.unreachable)
    )]
    TooFewLiveVoters {
        group: GroupId,
        from: NodeId,
        to: NodeId,
        stage: MoveStage,
        live: usize,
        voters: usize,
        need: usize,
        unreachable: Vec<NodeId>,
    },
    #[error(
        "node {} is the last active node of the cluster, so there is nowhere to move its \
         replicas; add a node first",
        .node.get()
    )]
    LastNode { node: NodeId },
    #[error(
        "no active node outside group {}'s members {} can take node {}'s replica; add a node first",
        .group.0, node_list(.members), .node.get()
    )]
    NoTarget {
        group: GroupId,
        node: NodeId,
        members: Vec<NodeId>,
    },
    #[error(
        "the active nodes outside group {}'s members that could take node {}'s replica ({}) \
         are all unreachable; bring one back or add a node first",
        .group.0, .node.get(), node_list(.unreachable)
    )]
    NoLiveTarget {
        group: GroupId,
        node: NodeId,
        unreachable: Vec<NodeId>,
    },
}

/// `{1,2,3}`: the operator-facing form of a node set.
fn node_list(nodes: &[NodeId]) -> String {
    let ids: Vec<String> = nodes.iter().map(|node| node.get().to_string()).collect();
    format!("{{{}}}", ids.join(","))
}

/// Groups with an in-flight (non-`Complete`) migration: a vShard move names
/// both its groups. A row that does not verify could be changing any group,
/// and this function cannot list the groups of the routing table, so it adds
/// [`GroupId::METADATA`] to say "every group": group 0 holds the corrupt row
/// and fail-stops on it (DESIGN.md §3.3), so it is busy in its own right.
/// [`ClusterView::busy_groups`] expands the marker to every data group.
pub fn busy_groups(migrations: &BTreeMap<MigrationId, MigrationRow>) -> BTreeSet<GroupId> {
    let busy = Busy::scan(migrations);
    let mut groups: BTreeSet<GroupId> = busy.by_group.keys().copied().collect();
    if busy.unverified.is_some() {
        groups.insert(GroupId::METADATA);
    }
    groups
}

/// The in-flight migrations by group, kept with their ids so that a refusal
/// can name the migration that blocks it.
pub(super) struct Busy {
    by_group: BTreeMap<GroupId, (MigrationId, MigrationPhaseTag)>,
    /// The first row that does not verify; it makes every group busy.
    unverified: Option<MigrationId>,
}

impl Busy {
    pub(super) fn scan(migrations: &BTreeMap<MigrationId, MigrationRow>) -> Busy {
        let mut busy = Busy {
            by_group: BTreeMap::new(),
            unverified: None,
        };
        for (&id, row) in migrations {
            // Even a `Complete` row is distrusted when it does not verify: its
            // phase sits outside the checksummed payload.
            let payload = match row.verify() {
                Ok(payload) => payload,
                Err(_) => {
                    busy.unverified.get_or_insert(id);
                    continue;
                }
            };
            if row.phase == MigrationPhaseTag::Complete {
                continue;
            }
            let groups = match payload {
                MigrationCheckpointPayload::Replica(p) => vec![p.group_id],
                MigrationCheckpointPayload::VShard(p) => vec![p.source_group, p.target_group],
            };
            for group in groups {
                busy.by_group.entry(group).or_insert((id, row.phase));
            }
        }
        busy
    }

    pub(super) fn contains(&self, group: GroupId) -> bool {
        self.unverified.is_some() || self.by_group.contains_key(&group)
    }

    /// Why no new move may touch `group`, if it is busy.
    fn refusal(&self, group: GroupId) -> Option<SafetyError> {
        if let Some(migration) = self.unverified {
            return Some(SafetyError::UnverifiedMigration { group, migration });
        }
        self.by_group
            .get(&group)
            .map(|&(migration, phase)| SafetyError::GroupBusy {
                group,
                migration,
                phase,
            })
    }
}

/// DESIGN.md §5's safety check for moving `group`'s replica from `source`
/// to `target`.
///
/// Refuses when the group is unknown or busy, `source` is not a member,
/// `target` is not an active (non-draining) node or already a member, or when
/// during or after the move the group would have fewer *live* voters than a
/// majority needs. `target` counts as live only if it is in `view.live`.
///
/// The majority is the larger of `rf/2+1`, with `rf = min(replication_factor,
/// voters the group has)` (the design's floor), and the Raft majority of the
/// configuration concerned: a joint configuration change commits only with a
/// majority of the old voters *and* of the new ones, so a group holding more
/// voters than the replication factor needs that many live voters, or the
/// move would stall half-way with the group busy.
///
/// A voter source is replaced by `target` as a voter; a learner source is
/// replaced by `target` as a learner, which leaves the voters unchanged.
pub fn check_replica_move(
    view: &ClusterView,
    group: GroupId,
    source: NodeId,
    target: NodeId,
) -> Result<(), SafetyError> {
    check_move(view, &Busy::scan(view.migrations), group, source, target)
}

/// [`check_replica_move`] with the migration table already scanned, so that
/// a planner trying many moves verifies each row's CRC once.
pub(super) fn check_move(
    view: &ClusterView,
    busy: &Busy,
    group: GroupId,
    source: NodeId,
    target: NodeId,
) -> Result<(), SafetyError> {
    let route = view
        .routing
        .group(group)
        .ok_or(SafetyError::UnknownGroup { group })?;
    if let Some(refusal) = busy.refusal(group) {
        return Err(refusal);
    }
    if !route.is_member(source) {
        return Err(SafetyError::SourceNotMember {
            group,
            node: source,
            members: members(route),
        });
    }
    match view.topology.get(target) {
        None => return Err(SafetyError::UnknownNode { node: target }),
        Some(info) if !matches!(info.state, NodeState::Active(_)) => {
            return Err(SafetyError::TargetNotActive {
                group,
                target,
                state: info.state,
            })
        }
        Some(_) => {}
    }
    if route.is_member(target) {
        return Err(SafetyError::TargetAlreadyMember {
            group,
            target,
            members: members(route),
        });
    }
    let old = route.voters.clone();
    let new = if route.is_voter(source) {
        let mut new: Vec<NodeId> = old.iter().copied().filter(|&v| v != source).collect();
        new.push(target);
        new.sort_unstable();
        new
    } else {
        old.clone()
    };
    let rf = view.replication_factor.min(old.len());
    for (stage, config) in [(MoveStage::During, &old), (MoveStage::After, &new)] {
        let need = (rf / 2 + 1).max(config.len() / 2 + 1);
        let (up, down): (Vec<NodeId>, Vec<NodeId>) =
            config.iter().partition(|node| view.live.contains(node));
        if up.len() < need {
            return Err(SafetyError::TooFewLiveVoters {
                group,
                from: source,
                to: target,
                stage,
                live: up.len(),
                voters: config.len(),
                need,
                unreachable: down,
            });
        }
    }
    // Checked after the majorities, which say more when a dead target
    // would also cost the group its quorum.
    if !view.live.contains(&target) {
        return Err(SafetyError::TargetUnreachable { group, target });
    }
    Ok(())
}

/// Voters and learners, sorted, for error messages.
pub(super) fn members(route: &GroupRoute) -> Vec<NodeId> {
    let mut all: Vec<NodeId> = route
        .voters
        .iter()
        .chain(&route.learners)
        .copied()
        .collect();
    all.sort_unstable();
    all
}

/// Whether a majority of `route`'s voters is reachable, i.e. whether the
/// group can commit the steps of a leadership transfer or a vShard move.
pub(super) fn has_live_majority(view: &ClusterView, route: &GroupRoute) -> bool {
    let live = route
        .voters
        .iter()
        .filter(|node| view.live.contains(node))
        .count();
    live > route.voters.len() / 2
}
