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

use crate::core::cache::MetadataState;
use crate::core::ids::{GroupId, MigrationId, NodeId, VShardId};
use crate::core::migration::{MigrationCheckpointPayload, MigrationPhaseTag, MigrationRow};
use crate::core::routing::{GroupRoute, RoutingTable};
use crate::core::topology::{NodeState, Topology};
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

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
struct Busy {
    by_group: BTreeMap<GroupId, (MigrationId, MigrationPhaseTag)>,
    /// The first row that does not verify; it makes every group busy.
    unverified: Option<MigrationId>,
}

impl Busy {
    fn scan(migrations: &BTreeMap<MigrationId, MigrationRow>) -> Busy {
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

    fn contains(&self, group: GroupId) -> bool {
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
fn check_move(
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
fn members(route: &GroupRoute) -> Vec<NodeId> {
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
fn has_live_majority(view: &ClusterView, route: &GroupRoute) -> bool {
    let live = route
        .voters
        .iter()
        .filter(|node| view.live.contains(node))
        .count();
    live > route.voters.len() / 2
}

/// The moves that take every replica off `node`: one replica move per group
/// it is a member of (voter or learner), in group order.
///
/// Each target is the live, active, non-draining non-member with the fewest
/// replicas (ties to the lowest id), counting the targets chosen earlier in
/// the same plan so that the replicas spread instead of piling onto one
/// node. Unreachable nodes are never chosen, since a target that cannot catch
/// up would stall the move and keep its group busy. Every move passes
/// [`check_replica_move`].
///
/// Refused as a whole — so that a `--dry-run` shows every obstacle up front
/// rather than half a decommission — when `node` is unknown, is the last
/// active node, or some group has no safe target (busy, no candidate, or too
/// few live voters), naming the group and why.
pub fn plan_decommission(
    view: &ClusterView,
    node: NodeId,
) -> Result<Vec<PlannedMove>, SafetyError> {
    if view.topology.get(node).is_none() {
        return Err(SafetyError::UnknownNode { node });
    }
    let mut planner = Planner::new(view);
    if !planner.load.keys().any(|&other| other != node) {
        return Err(SafetyError::LastNode { node });
    }
    for (group, route) in view.routing.groups() {
        if route.is_member(node) {
            let target = planner.target_for(group, route, node)?;
            planner.record_replica(group, node, target);
        }
    }
    Ok(planner.moves)
}

/// At most `max_moves` moves that even the cluster out, in priority order:
///
/// 1. replicas off draining (or decommissioned) nodes, chosen as by
///    [`plan_decommission`] but skipping groups that are busy or unsafe, so
///    that one stuck group does not hold up the others;
/// 2. replicas per active node: from the node with the most to the live node
///    with the fewest while they differ by more than one, preferring a group
///    the source does not lead (no leadership transfer needed);
/// 3. leaders per active node: from a live node leading more than
///    `ceil(groups / active nodes)` to a live active voter of the group
///    leading fewer than that;
/// 4. vShards per group: from the group with the most to the group with the
///    fewest while they differ by more than one.
///
/// No two moves touch the same group (a vShard move touches both its
/// groups), no move touches a busy group, every replica move passes
/// [`check_replica_move`], and leadership and vShard moves only touch groups
/// with a live majority. The rate limit is the caller's: it calls this again
/// once moves finish, and each call continues where the last left off.
/// Up-replication to the replication factor is
/// [`placement::next_replicas`](crate::core::placement::next_replicas)' job.
pub fn plan_rebalance(view: &ClusterView, max_moves: usize) -> Vec<PlannedMove> {
    let mut planner = Planner::new(view);
    planner.max_moves = max_moves;
    planner.drain();
    planner.balance_replicas();
    planner.balance_leaders();
    planner.balance_vshards();
    planner.moves
}

/// The state of a plan under construction: the loads as they will be once
/// the planned moves are made, and the groups already spoken for.
struct Planner<'v, 'a> {
    view: &'v ClusterView<'a>,
    busy: Busy,
    /// Replicas per active (non-draining) node.
    load: BTreeMap<NodeId, usize>,
    /// Leader hints per active (non-draining) node.
    leaders: BTreeMap<NodeId, usize>,
    /// Groups a planned move touches.
    touched: BTreeSet<GroupId>,
    moves: Vec<PlannedMove>,
    max_moves: usize,
}

impl<'v, 'a> Planner<'v, 'a> {
    fn new(view: &'v ClusterView<'a>) -> Self {
        let load: BTreeMap<NodeId, usize> = view
            .topology
            .nodes()
            .filter(|(_, info)| matches!(info.state, NodeState::Active(_)))
            .map(|(node, _)| (node, 0))
            .collect();
        let mut planner = Planner {
            view,
            busy: Busy::scan(view.migrations),
            leaders: load.clone(),
            load,
            touched: BTreeSet::new(),
            moves: Vec::new(),
            max_moves: usize::MAX,
        };
        for (_, route) in view.routing.groups() {
            for node in route.voters.iter().chain(&route.learners) {
                if let Some(count) = planner.load.get_mut(node) {
                    *count += 1;
                }
            }
            if let Some(count) = route.leader.and_then(|l| planner.leaders.get_mut(&l)) {
                *count += 1;
            }
        }
        planner
    }

    fn full(&self) -> bool {
        self.moves.len() >= self.max_moves
    }

    fn available(&self, group: GroupId) -> bool {
        !self.touched.contains(&group) && !self.busy.contains(group)
    }

    fn live(&self, node: NodeId) -> bool {
        self.view.live.contains(&node)
    }

    /// The target for `group`'s replica on `source`: the first candidate in
    /// (load, id) order that passes the safety check, or why none does.
    fn target_for(
        &self,
        group: GroupId,
        route: &GroupRoute,
        source: NodeId,
    ) -> Result<NodeId, SafetyError> {
        let outside: Vec<(usize, NodeId)> = self
            .load
            .iter()
            .filter(|(node, _)| !route.is_member(**node))
            .map(|(&node, &count)| (count, node))
            .collect();
        let mut candidates: Vec<(usize, NodeId)> = outside
            .iter()
            .copied()
            .filter(|&(_, node)| self.live(node))
            .collect();
        candidates.sort_unstable();
        let mut first_refusal = None;
        for &(_, target) in &candidates {
            match check_move(self.view, &self.busy, group, source, target) {
                Ok(()) => return Ok(target),
                Err(refusal) => {
                    first_refusal.get_or_insert(refusal);
                }
            }
        }
        Err(first_refusal.unwrap_or_else(|| {
            if outside.is_empty() {
                SafetyError::NoTarget {
                    group,
                    node: source,
                    members: members(route),
                }
            } else {
                SafetyError::NoLiveTarget {
                    group,
                    node: source,
                    unreachable: outside.iter().map(|&(_, node)| node).collect(),
                }
            }
        }))
    }

    /// Adds a replica move and its effect on the loads. A voter source that
    /// leads hands the leadership to the target (the move's
    /// `LeadershipTransfer` phase), so the leader counts follow.
    fn record_replica(&mut self, group: GroupId, source: NodeId, target: NodeId) {
        if let Some(count) = self.load.get_mut(&source) {
            *count = count.saturating_sub(1);
        }
        *self.load.entry(target).or_default() += 1;
        let source_leads = self
            .view
            .routing
            .group(group)
            .is_some_and(|route| route.leader == Some(source) && route.is_voter(source));
        if source_leads {
            if let Some(count) = self.leaders.get_mut(&source) {
                *count = count.saturating_sub(1);
            }
            *self.leaders.entry(target).or_default() += 1;
        }
        self.touched.insert(group);
        self.moves.push(PlannedMove::Replica {
            group,
            source,
            target,
        });
    }

    /// Priority 1: replicas off draining and decommissioned nodes.
    fn drain(&mut self) {
        let leaving: Vec<NodeId> = self
            .view
            .topology
            .nodes()
            .filter(|(_, info)| {
                matches!(info.state, NodeState::Draining | NodeState::Decommissioned)
            })
            .map(|(node, _)| node)
            .collect();
        for node in leaving {
            for (group, route) in self.view.routing.groups() {
                if self.full() {
                    return;
                }
                if !route.is_member(node) || !self.available(group) {
                    continue;
                }
                if let Ok(target) = self.target_for(group, route, node) {
                    self.record_replica(group, node, target);
                }
            }
        }
    }

    /// Priority 2: replicas per active node within one of each other.
    fn balance_replicas(&mut self) {
        while !self.full() {
            let Some((group, source, target)) = self.next_replica_balance() else {
                return;
            };
            self.record_replica(group, source, target);
        }
    }

    /// The most-loaded source and least-loaded live target that differ by
    /// more than one and share a movable group. Pairs are tried in order, so
    /// a pair blocked by busy or unsafe groups does not stop the others.
    fn next_replica_balance(&self) -> Option<(GroupId, NodeId, NodeId)> {
        let mut sources: Vec<(NodeId, usize)> = self.load.iter().map(|(&n, &c)| (n, c)).collect();
        sources.sort_unstable_by_key(|&(node, count)| (Reverse(count), node));
        let mut targets: Vec<(NodeId, usize)> = sources
            .iter()
            .copied()
            .filter(|&(node, _)| self.live(node))
            .collect();
        targets.sort_unstable_by_key(|&(node, count)| (count, node));
        for &(source, source_count) in &sources {
            for &(target, target_count) in &targets {
                if source_count < target_count + 2 {
                    break;
                }
                if let Some(group) = self.movable_group(source, target) {
                    return Some((group, source, target));
                }
            }
        }
        None
    }

    /// A group whose replica can move from `source` to `target`: the lowest
    /// id among those `source` does not lead, else the lowest id.
    fn movable_group(&self, source: NodeId, target: NodeId) -> Option<GroupId> {
        self.view
            .routing
            .groups()
            .filter(|&(group, route)| {
                self.available(group)
                    && route.is_member(source)
                    && !route.is_member(target)
                    && check_move(self.view, &self.busy, group, source, target).is_ok()
            })
            .min_by_key(|&(group, route)| (route.leader == Some(source), group))
            .map(|(group, _)| group)
    }

    /// Priority 3: no active node leads more than `ceil(groups / nodes)`.
    fn balance_leaders(&mut self) {
        let nodes = self.leaders.len();
        if nodes == 0 {
            return;
        }
        let cap = self.view.routing.groups().count().div_ceil(nodes);
        while !self.full() {
            let Some((group, from, to)) = self.next_leader_move(cap) else {
                return;
            };
            if let Some(count) = self.leaders.get_mut(&from) {
                *count = count.saturating_sub(1);
            }
            *self.leaders.entry(to).or_default() += 1;
            self.touched.insert(group);
            self.moves.push(PlannedMove::Leader { group, to });
        }
    }

    fn next_leader_move(&self, cap: usize) -> Option<(GroupId, NodeId, NodeId)> {
        let mut sources: Vec<(NodeId, usize)> = self
            .leaders
            .iter()
            .filter(|&(&node, &count)| count > cap && self.live(node))
            .map(|(&n, &c)| (n, c))
            .collect();
        sources.sort_unstable_by_key(|&(node, count)| (Reverse(count), node));
        for (source, _) in sources {
            for (group, route) in self.view.routing.groups() {
                if route.leader != Some(source)
                    || !self.available(group)
                    || !has_live_majority(self.view, route)
                {
                    continue;
                }
                let target = route
                    .voters
                    .iter()
                    .filter(|&&voter| voter != source && self.live(voter))
                    .filter_map(|&voter| self.leaders.get(&voter).map(|&count| (count, voter)))
                    .filter(|&(count, _)| count < cap)
                    .min();
                if let Some((_, target)) = target {
                    return Some((group, source, target));
                }
            }
        }
        None
    }

    /// Priority 4: vShards per group within one of each other. Only the
    /// extremes matter: if the fullest and the emptiest available groups are
    /// within one, so is every other available pair.
    fn balance_vshards(&mut self) {
        let routing = self.view.routing;
        let mut counts: BTreeMap<GroupId, usize> =
            routing.groups().map(|(group, _)| (group, 0)).collect();
        for vshard in VShardId::all() {
            *counts.entry(routing.lookup(vshard).group).or_default() += 1;
        }
        while !self.full() {
            let eligible: Vec<(GroupId, usize)> = counts
                .iter()
                .filter(|&(&group, _)| {
                    self.available(group)
                        && routing
                            .group(group)
                            .is_some_and(|route| has_live_majority(self.view, route))
                })
                .map(|(&g, &c)| (g, c))
                .collect();
            let fullest = eligible
                .iter()
                .min_by_key(|&&(group, count)| (Reverse(count), group));
            let emptiest = eligible
                .iter()
                .min_by_key(|&&(group, count)| (count, group));
            let (Some(&(from, most)), Some(&(to, fewest))) = (fullest, emptiest) else {
                return;
            };
            if most < fewest + 2 {
                return;
            }
            let Some(vshard) = routing.vshards_of(from).next() else {
                return;
            };
            self.touched.insert(from);
            self.touched.insert(to);
            self.moves.push(PlannedMove::VShard { vshard, from, to });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::migration::ReplicaMovePayload;
    use crate::core::routing::RoutingChange;
    use crate::core::topology::TopologyChange;
    use proptest::prelude::*;

    fn n(id: u64) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn nodes(ids: impl IntoIterator<Item = u64>) -> Vec<NodeId> {
        ids.into_iter().map(n).collect()
    }

    /// A topology of `count` active nodes, node 1 bootstrapping.
    fn topology(count: u64) -> Topology {
        let mut topology = Topology::bootstrap(n(1), "a".into());
        for id in 2..=count {
            topology
                .apply(&TopologyChange::Join {
                    node_id: n(id),
                    addr: "a".into(),
                })
                .unwrap();
            topology
                .apply(&TopologyChange::Activate { node_id: n(id) })
                .unwrap();
        }
        topology
    }

    /// Everything a [`ClusterView`] borrows, owned by the test.
    struct Cluster {
        topology: Topology,
        routing: RoutingTable,
        rf: usize,
        migrations: BTreeMap<MigrationId, MigrationRow>,
        live: BTreeSet<NodeId>,
    }

    impl Cluster {
        /// `node_count` active, live nodes; `groups` groups bootstrapped on
        /// the first `routing_nodes` nodes with replication factor `rf`.
        fn new(node_count: u64, routing_nodes: u64, groups: u64, rf: usize) -> Self {
            Cluster {
                topology: topology(node_count),
                routing: RoutingTable::bootstrap(groups, &nodes(1..=routing_nodes), rf).unwrap(),
                rf,
                migrations: BTreeMap::new(),
                live: nodes(1..=node_count).into_iter().collect(),
            }
        }

        fn view(&self) -> ClusterView<'_> {
            ClusterView {
                topology: &self.topology,
                routing: &self.routing,
                replication_factor: self.rf,
                migrations: &self.migrations,
                live: &self.live,
            }
        }

        fn kill(&mut self, ids: &[u64]) {
            for &id in ids {
                self.live.remove(&n(id));
            }
        }

        fn start_move(&mut self, seed: u8, group: u64, phase: MigrationPhaseTag) {
            let row = replica_row(seed, group, phase);
            self.migrations.insert(row.migration_id, row);
        }

        fn replicas(&self, node: NodeId) -> usize {
            self.routing.groups_of_node(node).len()
        }

        fn leaders(&self, node: NodeId) -> usize {
            self.routing
                .groups()
                .filter(|(_, route)| route.leader == Some(node))
                .count()
        }
    }

    fn replica_row(seed: u8, group: u64, phase: MigrationPhaseTag) -> MigrationRow {
        let payload = MigrationCheckpointPayload::Replica(ReplicaMovePayload {
            group_id: GroupId(group),
            source: n(1),
            target: n(9),
            source_was_leader: false,
            caught_up_index: 0,
            write_pause_us: None,
        });
        MigrationRow::new(
            MigrationId::from_random_bytes([seed; 16]),
            phase,
            0,
            &payload,
            1_000,
        )
    }

    fn change(routing: &mut RoutingTable, change: RoutingChange) {
        routing
            .apply(&change)
            .unwrap_or_else(|e| panic!("{change:?}: {e}"));
    }

    /// Makes a planned move the way the migration machinery does, as routing
    /// changes: learner, joint promotion, leadership transfer, demotion,
    /// removal.
    fn apply(routing: &mut RoutingTable, planned: &PlannedMove) {
        match *planned {
            PlannedMove::Replica {
                group: group_id,
                source,
                target,
            } => {
                let route = routing.group(group_id).unwrap().clone();
                change(
                    routing,
                    RoutingChange::AddLearner {
                        group_id,
                        node_id: target,
                    },
                );
                if route.is_voter(source) {
                    change(
                        routing,
                        RoutingChange::PromoteLearner {
                            group_id,
                            node_id: target,
                        },
                    );
                    if route.leader == Some(source) {
                        change(
                            routing,
                            RoutingChange::LeadershipTransfer {
                                group_id,
                                new_leader_node_id: target,
                            },
                        );
                    }
                    change(
                        routing,
                        RoutingChange::DemoteVoter {
                            group_id,
                            node_id: source,
                        },
                    );
                }
                change(
                    routing,
                    RoutingChange::RemoveMember {
                        group_id,
                        node_id: source,
                    },
                );
            }
            PlannedMove::VShard { vshard, to, .. } => {
                let route = routing.group(to).unwrap();
                let leaseholder = route.leader.unwrap_or(route.voters[0]);
                change(
                    routing,
                    RoutingChange::ReassignVShard {
                        vshard_id: vshard,
                        new_group_id: to,
                        new_leaseholder_node_id: leaseholder,
                    },
                );
            }
            PlannedMove::Leader { group, to } => change(
                routing,
                RoutingChange::LeadershipTransfer {
                    group_id: group,
                    new_leader_node_id: to,
                },
            ),
        }
    }

    /// The invariants every plan keeps, checked against the state it was
    /// planned from.
    fn assert_plan_is_safe(view: &ClusterView, plan: &[PlannedMove], max_moves: usize) {
        assert!(plan.len() <= max_moves, "{plan:?}");
        let busy = view.busy_groups();
        let mut touched = BTreeSet::new();
        for planned in plan {
            for group in planned.groups() {
                assert!(!busy.contains(&group), "{planned} touches busy group");
                assert!(touched.insert(group), "two moves touch group {group}");
            }
            match *planned {
                PlannedMove::Replica {
                    group,
                    source,
                    target,
                } => {
                    assert_eq!(
                        check_replica_move(view, group, source, target),
                        Ok(()),
                        "{planned}"
                    );
                    assert!(view.live.contains(&target), "{planned} targets a dead node");
                }
                PlannedMove::Leader { group, to } => {
                    let route = view.routing.group(group).unwrap();
                    assert!(route.is_voter(to) && route.leader != Some(to), "{planned}");
                    assert!(view.live.contains(&to), "{planned}");
                }
                PlannedMove::VShard { vshard, from, to } => {
                    assert_eq!(view.routing.lookup(vshard).group, from, "{planned}");
                    assert!(view.routing.group(to).is_some(), "{planned}");
                }
            }
        }
    }

    /// Plans and applies until the plan is empty; returns the rounds taken,
    /// or `None` if `bound` rounds were not enough.
    fn settle(cluster: &mut Cluster, max_moves: usize, bound: usize) -> Option<usize> {
        for round in 0..bound {
            let plan = plan_rebalance(&cluster.view(), max_moves);
            assert_plan_is_safe(&cluster.view(), &plan, max_moves);
            assert_eq!(plan, plan_rebalance(&cluster.view(), max_moves));
            if plan.is_empty() {
                return Some(round);
            }
            for planned in &plan {
                apply(&mut cluster.routing, planned);
            }
        }
        None
    }

    fn spread(counts: impl IntoIterator<Item = usize>) -> usize {
        let counts: Vec<usize> = counts.into_iter().collect();
        counts.iter().max().unwrap() - counts.iter().min().unwrap()
    }

    // ---- check_replica_move ----

    /// Four nodes, eight groups on nodes 1-3 (all of them in every group).
    fn three_in_four() -> Cluster {
        Cluster::new(4, 3, 8, 3)
    }

    #[test]
    fn a_safe_move_is_allowed() {
        let c = three_in_four();
        assert_eq!(
            check_replica_move(&c.view(), GroupId(3), n(1), n(4)),
            Ok(())
        );
    }

    #[test]
    fn unknown_group_is_refused() {
        let c = three_in_four();
        assert_eq!(
            check_replica_move(&c.view(), GroupId(9), n(1), n(4)),
            Err(SafetyError::UnknownGroup { group: GroupId(9) })
        );
    }

    #[test]
    fn source_must_be_a_member() {
        let mut c = Cluster::new(5, 4, 4, 3);
        c.routing = RoutingTable::bootstrap(1, &nodes(1..=3), 3).unwrap();
        let err = check_replica_move(&c.view(), GroupId(1), n(4), n(5)).unwrap_err();
        assert_eq!(
            err,
            SafetyError::SourceNotMember {
                group: GroupId(1),
                node: n(4),
                members: nodes(1..=3)
            }
        );
        assert_eq!(
            err.to_string(),
            "node 4 is not a member of group 1 (members {1,2,3}), so it has no replica of it to move"
        );
    }

    #[test]
    fn target_must_be_known_and_active() {
        let mut c = three_in_four();
        assert_eq!(
            check_replica_move(&c.view(), GroupId(1), n(1), n(7)),
            Err(SafetyError::UnknownNode { node: n(7) })
        );
        c.topology
            .apply(&TopologyChange::Join {
                node_id: n(5),
                addr: "a".into(),
            })
            .unwrap();
        c.live.insert(n(5));
        assert_eq!(
            check_replica_move(&c.view(), GroupId(1), n(1), n(5)),
            Err(SafetyError::TargetNotActive {
                group: GroupId(1),
                target: n(5),
                state: NodeState::Joining
            })
        );
        c.topology
            .apply(&TopologyChange::StartDecommission { node_id: n(4) })
            .unwrap();
        let err = check_replica_move(&c.view(), GroupId(1), n(1), n(4)).unwrap_err();
        assert_eq!(
            err,
            SafetyError::TargetNotActive {
                group: GroupId(1),
                target: n(4),
                state: NodeState::Draining
            }
        );
        assert!(err.to_string().contains("node 4 is draining"), "{err}");
    }

    #[test]
    fn target_must_not_be_a_member() {
        let c = three_in_four();
        assert_eq!(
            check_replica_move(&c.view(), GroupId(1), n(1), n(2)),
            Err(SafetyError::TargetAlreadyMember {
                group: GroupId(1),
                target: n(2),
                members: nodes(1..=3)
            })
        );
        // Moving a replica onto itself is the same mistake.
        assert!(matches!(
            check_replica_move(&c.view(), GroupId(1), n(1), n(1)),
            Err(SafetyError::TargetAlreadyMember { .. })
        ));
    }

    #[test]
    fn busy_group_is_refused_and_complete_rows_are_not_busy() {
        let mut c = three_in_four();
        c.start_move(1, 2, MigrationPhaseTag::CatchUp);
        c.start_move(2, 5, MigrationPhaseTag::Complete);
        let err = check_replica_move(&c.view(), GroupId(2), n(1), n(4)).unwrap_err();
        assert!(
            matches!(
                err,
                SafetyError::GroupBusy {
                    group: GroupId(2),
                    phase: MigrationPhaseTag::CatchUp,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(
            err.to_string().starts_with("group 2 has migration"),
            "{err}"
        );
        assert_eq!(
            check_replica_move(&c.view(), GroupId(5), n(1), n(4)),
            Ok(())
        );
        assert_eq!(busy_groups(&c.migrations), [GroupId(2)].into());
        assert_eq!(c.view().busy_groups(), [GroupId(2)].into());
    }

    #[test]
    fn an_unverified_row_makes_every_group_busy() {
        let mut c = three_in_four();
        let mut row = replica_row(3, 2, MigrationPhaseTag::Complete);
        row.crc32c ^= 1;
        c.migrations.insert(row.migration_id, row.clone());
        for group in 1..=8 {
            assert_eq!(
                check_replica_move(&c.view(), GroupId(group), n(1), n(4)),
                Err(SafetyError::UnverifiedMigration {
                    group: GroupId(group),
                    migration: row.migration_id
                })
            );
        }
        assert_eq!(busy_groups(&c.migrations), [GroupId::METADATA].into());
        let all: BTreeSet<GroupId> = (0..=8).map(GroupId).collect();
        assert_eq!(c.view().busy_groups(), all);
        assert!(plan_rebalance(&c.view(), 10).is_empty());
    }

    #[test]
    fn live_voters_not_routing_members_decide() {
        let mut c = three_in_four();
        c.kill(&[3]);
        // {1,2,3} with 3 down: 2 live before, {2,4} live after.
        assert_eq!(
            check_replica_move(&c.view(), GroupId(1), n(1), n(4)),
            Ok(())
        );
        // Moving the dead replica away is the repair case, and also safe.
        assert_eq!(
            check_replica_move(&c.view(), GroupId(1), n(3), n(4)),
            Ok(())
        );
        c.kill(&[2]);
        let err = check_replica_move(&c.view(), GroupId(1), n(1), n(4)).unwrap_err();
        assert_eq!(
            err,
            SafetyError::TooFewLiveVoters {
                group: GroupId(1),
                from: n(1),
                to: n(4),
                stage: MoveStage::During,
                live: 1,
                voters: 3,
                need: 2,
                unreachable: nodes([2, 3]),
            }
        );
        assert_eq!(
            err.to_string(),
            "moving group 1's replica from node 1 to node 4 would leave the group 1 live voter(s) \
             out of 3 during the move, fewer than the 2 a majority needs; unreachable voters: {2,3}"
        );
    }

    #[test]
    fn an_unreachable_target_counts_as_dead_and_is_refused() {
        let mut c = three_in_four();
        c.kill(&[3, 4]);
        // Before: {1,2} live of {1,2,3}. After: {2} live of {2,3,4}.
        assert!(matches!(
            check_replica_move(&c.view(), GroupId(1), n(1), n(4)),
            Err(SafetyError::TooFewLiveVoters {
                stage: MoveStage::After,
                live: 1,
                need: 2,
                ..
            })
        ));
        // Replacing the dead voter 3 keeps the live majority, but the move
        // could only time out waiting for node 4 to catch up.
        let err = check_replica_move(&c.view(), GroupId(1), n(3), n(4)).unwrap_err();
        assert_eq!(
            err,
            SafetyError::TargetUnreachable {
                group: GroupId(1),
                target: n(4)
            }
        );
        assert!(
            err.to_string().starts_with("node 4 does not answer"),
            "{err}"
        );
    }

    #[test]
    fn more_voters_than_the_replication_factor_need_a_raft_majority() {
        let mut c = Cluster::new(6, 5, 1, 5);
        c.rf = 3;
        c.kill(&[3, 4, 5]);
        // rf/2+1 = 2 live voters would do by the design's floor, but a joint
        // change of five voters only commits with three of them.
        assert!(matches!(
            check_replica_move(&c.view(), GroupId(1), n(5), n(6)),
            Err(SafetyError::TooFewLiveVoters {
                live: 2,
                voters: 5,
                need: 3,
                ..
            })
        ));
    }

    #[test]
    fn a_learner_source_leaves_the_voters_alone() {
        let mut c = Cluster::new(5, 3, 1, 3);
        change(
            &mut c.routing,
            RoutingChange::AddLearner {
                group_id: GroupId(1),
                node_id: n(4),
            },
        );
        c.kill(&[3]);
        assert_eq!(
            check_replica_move(&c.view(), GroupId(1), n(4), n(5)),
            Ok(())
        );
        c.kill(&[2]);
        assert!(matches!(
            check_replica_move(&c.view(), GroupId(1), n(4), n(5)),
            Err(SafetyError::TooFewLiveVoters { live: 1, .. })
        ));
    }

    // ---- plan_decommission ----

    #[test]
    fn decommission_moves_every_replica_and_spreads_them() {
        let mut c = Cluster::new(4, 4, 8, 3);
        let held = c.routing.groups_of_node(n(4));
        assert_eq!(held.len(), 6);
        let plan = plan_decommission(&c.view(), n(4)).unwrap();
        assert_plan_is_safe(&c.view(), &plan, usize::MAX);
        assert_eq!(Ok(&plan), plan_decommission(&c.view(), n(4)).as_ref());
        let groups: Vec<GroupId> = plan.iter().flat_map(PlannedMove::groups).collect();
        assert_eq!(groups, held, "one move per group the node holds, in order");
        for planned in &plan {
            assert!(matches!(planned, PlannedMove::Replica { source, .. } if *source == n(4)));
            apply(&mut c.routing, planned);
        }
        assert_eq!(c.replicas(n(4)), 0);
        // 24 replicas on the 3 remaining nodes.
        assert_eq!(
            nodes(1..=3)
                .into_iter()
                .map(|node| c.replicas(node))
                .collect::<Vec<_>>(),
            [8, 8, 8]
        );
        assert_eq!(plan_decommission(&c.view(), n(4)), Ok(vec![]));
    }

    #[test]
    fn decommission_targets_spread_when_there_is_choice() {
        // Five nodes, groups on nodes 1-3: node 1's eight replicas go to 4 and 5.
        let c = Cluster::new(5, 3, 8, 3);
        let plan = plan_decommission(&c.view(), n(1)).unwrap();
        assert_eq!(plan.len(), 8);
        let mut per_target: BTreeMap<NodeId, usize> = BTreeMap::new();
        for planned in &plan {
            if let PlannedMove::Replica { target, .. } = planned {
                *per_target.entry(*target).or_default() += 1;
            }
        }
        assert_eq!(per_target, [(n(4), 4), (n(5), 4)].into());
        assert_eq!(
            plan[0].to_string(),
            "move group 1's replica from node 1 to node 4"
        );
        assert_eq!(plan, plan_decommission(&c.view(), n(1)).unwrap());
    }

    #[test]
    fn decommission_without_a_spare_node_is_refused_clearly() {
        let c = Cluster::new(3, 3, 8, 3);
        let err = plan_decommission(&c.view(), n(2)).unwrap_err();
        assert_eq!(
            err,
            SafetyError::NoTarget {
                group: GroupId(1),
                node: n(2),
                members: nodes(1..=3)
            }
        );
        assert_eq!(
            err.to_string(),
            "no active node outside group 1's members {1,2,3} can take node 2's replica; \
             add a node first"
        );
    }

    #[test]
    fn decommission_refuses_unknown_and_last_nodes() {
        let c = Cluster::new(1, 1, 4, 3);
        assert_eq!(
            plan_decommission(&c.view(), n(1)),
            Err(SafetyError::LastNode { node: n(1) })
        );
        assert_eq!(
            plan_decommission(&c.view(), n(2)),
            Err(SafetyError::UnknownNode { node: n(2) })
        );
    }

    #[test]
    fn decommission_refuses_unsafe_busy_and_unreachable_cases() {
        let mut c = three_in_four();
        c.kill(&[2, 3]);
        assert!(matches!(
            plan_decommission(&c.view(), n(1)),
            Err(SafetyError::TooFewLiveVoters {
                group: GroupId(1),
                ..
            })
        ));
        let mut c = three_in_four();
        c.kill(&[4]);
        assert_eq!(
            plan_decommission(&c.view(), n(1)),
            Err(SafetyError::NoLiveTarget {
                group: GroupId(1),
                node: n(1),
                unreachable: vec![n(4)]
            })
        );
        let mut c = three_in_four();
        c.start_move(1, 3, MigrationPhaseTag::AddLearner);
        assert!(matches!(
            plan_decommission(&c.view(), n(1)),
            Err(SafetyError::GroupBusy {
                group: GroupId(3),
                ..
            })
        ));
    }

    #[test]
    fn decommission_of_a_node_without_replicas_is_empty() {
        let c = three_in_four();
        assert_eq!(plan_decommission(&c.view(), n(4)), Ok(vec![]));
    }

    // ---- plan_rebalance ----

    #[test]
    fn a_new_node_is_filled_until_replicas_and_leaders_are_even() {
        let mut c = three_in_four();
        assert_eq!(c.replicas(n(4)), 0);
        let rounds = settle(&mut c, 4, 50).expect("rebalancing settles");
        assert!(rounds >= 2, "four moves per round cannot do it in one");
        for node in nodes(1..=4) {
            assert_eq!(c.replicas(node), 6, "24 replicas on 4 nodes");
            assert_eq!(c.leaders(node), 2, "8 leaders on 4 nodes");
        }
        for (_, route) in c.routing.groups() {
            assert_eq!(route.voters.len(), 3);
            assert!(route.learners.is_empty());
        }
    }

    #[test]
    fn leaders_are_balanced_by_leadership_moves() {
        let mut c = Cluster::new(3, 3, 6, 3);
        for group in 1..=6 {
            if c.routing.group(GroupId(group)).unwrap().leader != Some(n(1)) {
                change(
                    &mut c.routing,
                    RoutingChange::LeadershipTransfer {
                        group_id: GroupId(group),
                        new_leader_node_id: n(1),
                    },
                );
            }
        }
        let plan = plan_rebalance(&c.view(), 10);
        assert_plan_is_safe(&c.view(), &plan, 10);
        assert!(plan
            .iter()
            .all(|planned| matches!(planned, PlannedMove::Leader { .. })));
        assert_eq!(plan.len(), 4);
        assert_eq!(plan[0].to_string(), "move group 1's leadership to node 2");
        for planned in &plan {
            apply(&mut c.routing, planned);
        }
        for node in nodes(1..=3) {
            assert_eq!(c.leaders(node), 2);
        }
        assert!(plan_rebalance(&c.view(), 10).is_empty());
    }

    #[test]
    fn vshards_are_balanced_into_a_new_group() {
        let mut c = Cluster::new(3, 3, 3, 3);
        change(
            &mut c.routing,
            RoutingChange::CreateGroup {
                group_id: GroupId(4),
                voters: nodes(1..=3),
            },
        );
        let plan = plan_rebalance(&c.view(), 1);
        assert_eq!(
            plan,
            [PlannedMove::VShard {
                vshard: VShardId::new(0).unwrap(),
                from: GroupId(1),
                to: GroupId(4)
            }]
        );
        assert_eq!(plan[0].to_string(), "move vShard 0 from group 1 to group 4");
        settle(&mut c, 4, 2_000).expect("vShards settle");
        let counts: Vec<usize> = (1..=4)
            .map(|g| c.routing.vshards_of(GroupId(g)).count())
            .collect();
        assert_eq!(counts, [256, 256, 256, 256]);
    }

    #[test]
    fn draining_nodes_are_emptied_first() {
        let mut c = Cluster::new(5, 4, 8, 3);
        c.topology
            .apply(&TopologyChange::StartDecommission { node_id: n(2) })
            .unwrap();
        let plan = plan_rebalance(&c.view(), 2);
        assert_eq!(plan.len(), 2);
        assert!(plan.iter().all(
            |planned| matches!(planned, PlannedMove::Replica { source, .. } if *source == n(2))
        ));
        settle(&mut c, 3, 50).expect("draining settles");
        assert_eq!(c.replicas(n(2)), 0);
        assert!(spread([1, 3, 4, 5].map(|id| c.replicas(n(id)))) <= 1);
    }

    #[test]
    fn busy_groups_are_never_touched() {
        let mut c = three_in_four();
        c.start_move(1, 1, MigrationPhaseTag::PromoteLearner);
        c.start_move(2, 2, MigrationPhaseTag::Cutover);
        for _ in 0..50 {
            let plan = plan_rebalance(&c.view(), 3);
            assert_plan_is_safe(&c.view(), &plan, 3);
            if plan.is_empty() {
                break;
            }
            for planned in &plan {
                apply(&mut c.routing, planned);
            }
        }
        assert_eq!(c.routing.group(GroupId(1)).unwrap().voters, nodes(1..=3));
        assert_eq!(c.routing.group(GroupId(2)).unwrap().voters, nodes(1..=3));
        // Six groups can still bring node 4 to its share.
        assert_eq!(c.replicas(n(4)), 6);
    }

    #[test]
    fn one_move_per_group_and_max_moves_are_respected() {
        let c = three_in_four();
        assert!(plan_rebalance(&c.view(), 0).is_empty());
        let plan = plan_rebalance(&c.view(), 100);
        assert_plan_is_safe(&c.view(), &plan, 100);
        assert!(!plan.is_empty());
        assert_eq!(plan_rebalance(&c.view(), 1), plan[..1]);
    }

    #[test]
    fn plans_are_deterministic() {
        let a = three_in_four();
        let b = three_in_four();
        assert_eq!(plan_rebalance(&a.view(), 5), plan_rebalance(&b.view(), 5));
        assert_eq!(
            plan_decommission(&a.view(), n(1)),
            plan_decommission(&b.view(), n(1))
        );
    }

    #[test]
    fn moves_list_the_groups_they_touch() {
        let replica = PlannedMove::Replica {
            group: GroupId(3),
            source: n(1),
            target: n(4),
        };
        let vshard = PlannedMove::VShard {
            vshard: VShardId::new(17).unwrap(),
            from: GroupId(2),
            to: GroupId(5),
        };
        let leader = PlannedMove::Leader {
            group: GroupId(3),
            to: n(2),
        };
        assert_eq!(replica.groups(), [GroupId(3)]);
        assert_eq!(vshard.groups(), [GroupId(2), GroupId(5)]);
        assert_eq!(leader.groups(), [GroupId(3)]);
        assert_eq!(
            replica.to_string(),
            "move group 3's replica from node 1 to node 4"
        );
        assert_eq!(vshard.to_string(), "move vShard 17 from group 2 to group 5");
        assert_eq!(leader.to_string(), "move group 3's leadership to node 2");
    }

    // ---- properties ----

    /// Per group: (voter mask, learner mask, leader pick).
    type Shape = (u8, u8, u8);

    /// A routing table of `groups` groups over nodes `1..=node_count` with
    /// the membership `shapes` describes (every group keeps a voter).
    fn random_routing(node_count: u64, groups: u64, shapes: &[Shape]) -> RoutingTable {
        let mut routing = RoutingTable::bootstrap(groups, &[n(1)], 1).unwrap();
        let all = (1u8 << node_count) - 1;
        for (index, &(voter_mask, learner_mask, pick)) in shapes.iter().enumerate() {
            let group_id = GroupId(index as u64 + 1);
            let voters = match voter_mask & all {
                0 => 1,
                mask => mask,
            };
            let learners = learner_mask & all & !voters;
            for id in 2..=node_count {
                let node_id = n(id);
                let bit = 1u8 << (id - 1);
                if (voters | learners) & bit != 0 {
                    change(
                        &mut routing,
                        RoutingChange::AddLearner { group_id, node_id },
                    );
                }
                if voters & bit != 0 {
                    change(
                        &mut routing,
                        RoutingChange::PromoteLearner { group_id, node_id },
                    );
                }
            }
            if voters & 1 == 0 {
                change(
                    &mut routing,
                    RoutingChange::RemoveMember {
                        group_id,
                        node_id: n(1),
                    },
                );
            }
            let route = routing.group(group_id).unwrap();
            let leader = route.voters[usize::from(pick) % route.voters.len()];
            if route.leader != Some(leader) {
                change(
                    &mut routing,
                    RoutingChange::LeadershipTransfer {
                        group_id,
                        new_leader_node_id: leader,
                    },
                );
            }
        }
        routing
    }

    fn shapes() -> impl Strategy<Value = (u64, u64, usize, Vec<Shape>)> {
        (3u64..=7, 1u64..=16, 1usize..=5).prop_flat_map(|(node_count, groups, rf)| {
            (
                Just(node_count),
                Just(groups),
                Just(rf),
                prop::collection::vec(any::<Shape>(), groups as usize),
            )
        })
    }

    /// Generous: these clusters settle in a handful of rounds (at most 3
    /// seen), so needing this many would mean the planner oscillates.
    const ROUND_BOUND: usize = 64;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]

        /// With every node up, repeated rebalancing settles with replica
        /// counts within one, every plan safe.
        #[test]
        fn rebalancing_settles_evenly((node_count, groups, rf, shapes) in shapes()) {
            let mut c = Cluster::new(node_count, 1, 1, rf);
            c.routing = random_routing(node_count, groups, &shapes);
            let replicas: usize = c.routing.groups().map(|(_, r)| r.voters.len() + r.learners.len()).sum();
            let rounds = settle(&mut c, 4, ROUND_BOUND);
            prop_assert!(rounds.is_some(), "did not settle in {} rounds", ROUND_BOUND);
            let counts: Vec<usize> = (1..=node_count).map(|id| c.replicas(n(id))).collect();
            prop_assert!(spread(counts.iter().copied()) <= 1, "{:?}", counts);
            // Moves never create or destroy replicas.
            prop_assert_eq!(counts.iter().sum::<usize>(), replicas);
        }

        /// With nodes down, a node draining and a group busy, every plan is
        /// still safe and rebalancing still terminates.
        #[test]
        fn rebalancing_is_safe_with_failures(
            (node_count, groups, rf, shapes) in shapes(),
            dead in any::<u8>(),
            draining in prop::option::of(2u64..=7),
            busy in prop::option::of(1u64..=16),
        ) {
            let mut c = Cluster::new(node_count, 1, 1, rf);
            c.routing = random_routing(node_count, groups, &shapes);
            for id in 1..=node_count {
                if dead & (1 << (id - 1)) != 0 {
                    c.live.remove(&n(id));
                }
            }
            if let Some(id) = draining.filter(|&id| id <= node_count) {
                c.topology
                    .apply(&TopologyChange::StartDecommission { node_id: n(id) })
                    .unwrap();
            }
            if let Some(group) = busy {
                c.start_move(1, group, MigrationPhaseTag::CatchUp);
            }
            let before = c.routing.clone();
            prop_assert!(settle(&mut c, 4, ROUND_BOUND).is_some());
            if let Some(group) = busy {
                prop_assert_eq!(c.routing.group(GroupId(group)), before.group(GroupId(group)));
            }
        }
    }
}
