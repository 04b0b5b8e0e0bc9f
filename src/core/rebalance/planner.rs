//! The planner: which moves even the cluster out, and which take a node
//! out of it.

use crate::core::ids::{GroupId, NodeId, VShardId};
use crate::core::routing::GroupRoute;
use crate::core::topology::NodeState;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet};

use super::safety::{check_move, has_live_majority, members, Busy};
use super::{ClusterView, PlannedMove, SafetyError};

/// The moves that take every replica off `node`: one replica move per group
/// it is a member of (voter or learner), in group order.
///
/// Each target is the live, active, non-draining non-member with the fewest
/// replicas (ties to the lowest id), counting the targets chosen earlier in
/// the same plan so that the replicas spread instead of piling onto one
/// node. Unreachable nodes are never chosen, since a target that cannot catch
/// up would stall the move and keep its group busy. Every move passes
/// [`check_replica_move`](super::check_replica_move).
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
/// [`check_replica_move`](super::check_replica_move), and leadership and
/// vShard moves only touch groups with a live majority. The rate limit is the caller's: it calls this again
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
