//! The routing table (DESIGN.md §4): vShard → data group, group → members.
//!
//! Group 0 replicates the table; every node applies the same [`RoutingChange`]s
//! in log order, so every rule here is deterministic and every rejection
//! leaves the table untouched. Each accepted change bumps the routing epoch by
//! exactly one, which lets a node compare two routes it has seen and lets a
//! request carry the epoch it was routed with.
//!
//! Invariants (checked on every decode, kept by every change):
//! - every one of the [`VSHARD_COUNT`] vShards maps to an existing data group;
//! - group 0 (the metadata group) is never in the table: it spans all nodes
//!   and is described by the topology instead;
//! - each group's voters and learners are sorted, unique and disjoint, there
//!   is at least one voter, the leader hint is a voter or `None`, and its
//!   founders are sorted and unique;
//! - no group id is above the highest ever created, so an id is never
//!   given to a second group (a node may still hold a replica of a dropped
//!   one);
//! - a ghost stub `(vshard, group)` names an existing group that no longer
//!   serves that vShard.

use crate::core::ids::{GroupId, NodeId, VShardId, VSHARD_COUNT};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// More data groups than vShards would leave groups that can never serve
/// anything, so bootstrap refuses them.
pub const MAX_DATA_GROUPS: u64 = VSHARD_COUNT as u64;

/// The most voters a data group has: the bound on the replication factor
/// and on a new group's founders (Raft's cost grows with each voter, and
/// seven survive three failures).
pub const MAX_REPLICATION_FACTOR: usize = 7;

/// The membership of one data group, mirroring its Raft configuration.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupRoute {
    /// Sorted, unique.
    pub voters: Vec<NodeId>,
    /// Sorted, unique, disjoint from `voters`.
    pub learners: Vec<NodeId>,
    /// The last known leader; a hint, since Raft may elect another at any time.
    pub leader: Option<NodeId>,
    /// Sorted, unique: the voters the group was created with, the membership
    /// of its first snapshot. Never changes. A founder that is still a voter
    /// and has never hosted the group starts it from that snapshot; every
    /// other member waits for its leader to send one (see
    /// [`GroupRoute::starts_from_scratch`]).
    pub founders: Vec<NodeId>,
}

impl GroupRoute {
    pub fn is_voter(&self, node: NodeId) -> bool {
        self.voters.binary_search(&node).is_ok()
    }

    pub fn is_learner(&self, node: NodeId) -> bool {
        self.learners.binary_search(&node).is_ok()
    }

    /// Voter or learner.
    pub fn is_member(&self, node: NodeId) -> bool {
        self.is_voter(node) || self.is_learner(node)
    }

    /// Whether `node` writes the group's first snapshot itself when it
    /// first hosts the group, rather than waiting for one from the leader:
    /// only a founder that is still a voter. The node must also never have
    /// hosted the group before (its storage refuses otherwise): a founder
    /// that starts from scratch has acknowledged nothing, so it is no more
    /// than a voter that is far behind, whereas one that had acknowledged
    /// entries and starts over would have forgotten them.
    pub fn starts_from_scratch(&self, node: NodeId) -> bool {
        self.is_voter(node) && self.founders.binary_search(&node).is_ok()
    }

    /// Removes voter `node` and the leader hint naming it. The last voter is
    /// refused: a group without voters can never elect a leader again.
    fn remove_voter(&mut self, group: GroupId, node: NodeId) -> Result<(), RoutingError> {
        let Ok(index) = self.voters.binary_search(&node) else {
            return Err(RoutingError::NotAVoter { group, node });
        };
        if self.voters.len() == 1 {
            return Err(RoutingError::LastVoter { group, node });
        }
        self.voters.remove(index);
        if self.leader == Some(node) {
            self.leader = None;
        }
        Ok(())
    }

    fn check(&self) -> Result<(), String> {
        let strictly_sorted = |nodes: &[NodeId]| nodes.windows(2).all(|w| w[0] < w[1]);
        if self.voters.is_empty() {
            return Err("has no voters".into());
        }
        if !strictly_sorted(&self.voters)
            || !strictly_sorted(&self.learners)
            || !strictly_sorted(&self.founders)
        {
            return Err("has unsorted or duplicate members".into());
        }
        if let Some(node) = self.learners.iter().find(|&&n| self.is_voter(n)) {
            return Err(format!("has {node} as both voter and learner"));
        }
        match self.leader {
            Some(leader) if !self.is_voter(leader) => {
                Err(format!("has leader hint {leader}, which is not a voter"))
            }
            _ => Ok(()),
        }
    }
}

/// Inserts `node` into a sorted list, keeping it sorted.
fn insert_sorted(nodes: &mut Vec<NodeId>, node: NodeId) {
    if let Err(index) = nodes.binary_search(&node) {
        nodes.insert(index, node);
    }
}

/// Where a vShard is served: the answer to a routing lookup.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Route {
    pub group: GroupId,
    pub leader: Option<NodeId>,
    pub epoch: u64,
}

/// The redirect for a request sent to a group that does not serve its vShard
/// (typically routed with a stale epoch, before a move): the current route,
/// so the sender retries there instead of getting a silent wrong answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, thiserror::Error)]
#[error(
    "vShard {vshard} is served by group {group} (leader {}) at routing epoch {epoch}, \
     not by the group the request was sent to; resend it there",
    leader_name(.leader)
)]
pub struct WrongGroup {
    pub vshard: VShardId,
    pub group: GroupId,
    pub leader: Option<NodeId>,
    pub epoch: u64,
}

fn leader_name(leader: &Option<NodeId>) -> String {
    leader.map_or_else(|| "unknown".to_owned(), |node| node.to_string())
}

/// A change to the routing table, committed to group 0.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoutingChange {
    /// The final step of a vShard move: `new_group_id` serves the vShard from
    /// now on, led by `new_leaseholder_node_id` (which must be one of its
    /// voters). The old group keeps a ghost stub that redirects stale requests.
    ReassignVShard {
        vshard_id: VShardId,
        new_group_id: GroupId,
        new_leaseholder_node_id: NodeId,
    },
    /// Records a new leader hint; the new leader must be a voter.
    LeadershipTransfer {
        group_id: GroupId,
        new_leader_node_id: NodeId,
    },
    /// Removes a voter or a learner (never the last voter).
    RemoveMember { group_id: GroupId, node_id: NodeId },
    /// Adds a learner (the first phase of a replica move).
    AddLearner { group_id: GroupId, node_id: NodeId },
    /// Learner → voter.
    PromoteLearner { group_id: GroupId, node_id: NodeId },
    /// Voter → learner: the joint-consensus demotion of a move's source
    /// (never the last voter).
    DemoteVoter { group_id: GroupId, node_id: NodeId },
    /// A new, empty data group.
    CreateGroup {
        group_id: GroupId,
        voters: Vec<NodeId>,
    },
    /// Deletes a data group that serves no vShard, with its ghost stubs.
    DropGroup { group_id: GroupId },
    /// Garbage-collects a ghost stub once no stale request can need it, or
    /// compensates an aborted move.
    RemoveGhostStub {
        vshard_id: VShardId,
        group_id: GroupId,
    },
}

/// Why [`RoutingTable::bootstrap`] refused its parameters.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum BootstrapDefect {
    #[error("at least one data group is required")]
    NoDataGroups,
    #[error("{requested} data groups requested, more than the {max} vShards they would share")]
    TooManyDataGroups { requested: u64, max: u64 },
    #[error("at least one node is required")]
    NoNodes,
    #[error("the replication factor must be at least 1")]
    ZeroReplicationFactor,
    #[error("node {0} is listed twice")]
    DuplicateNode(NodeId),
}

/// A rejected routing change (or bootstrap); the table is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RoutingError {
    #[error("cannot bootstrap the routing table: {defect}")]
    InvalidBootstrap { defect: BootstrapDefect },
    #[error("group 0 is the metadata group, not a data group; routing changes apply to data groups only")]
    MetadataGroup,
    #[error("data group {group} does not exist")]
    UnknownGroup { group: GroupId },
    #[error("data group {group} already exists")]
    GroupExists { group: GroupId },
    #[error("data group {group} cannot be created without voters")]
    NoVoters { group: GroupId },
    #[error("node {node} is listed twice among the voters of new group {group}")]
    DuplicateVoter { group: GroupId, node: NodeId },
    #[error("vShard {vshard} is already served by group {group}")]
    AlreadyInGroup { vshard: VShardId, group: GroupId },
    #[error("node {node} is not a voter of group {group}")]
    NotAVoter { group: GroupId, node: NodeId },
    #[error("node {node} is not a learner of group {group}")]
    NotALearner { group: GroupId, node: NodeId },
    #[error("node {node} is not a member of group {group}")]
    NotAMember { group: GroupId, node: NodeId },
    #[error("node {node} is already a member of group {group}")]
    AlreadyMember { group: GroupId, node: NodeId },
    #[error("node {node} is already the leader hint of group {group}")]
    AlreadyLeader { group: GroupId, node: NodeId },
    #[error(
        "node {node} is the last voter of group {group}; add another voter before removing it"
    )]
    LastVoter { group: GroupId, node: NodeId },
    #[error(
        "group {group} still serves {vshards} vShard{}; move every vShard out of it before dropping it",
        if *vshards == 1 { "" } else { "s" }
    )]
    GroupNotEmpty { group: GroupId, vshards: usize },
    #[error("group {group} holds no ghost stub for vShard {vshard}")]
    NoSuchGhost { vshard: VShardId, group: GroupId },
    #[error("the routing epoch is at its maximum and cannot be bumped again")]
    EpochExhausted,
    #[error("data group id {group} was given to an earlier group (ids up to {last} are taken, dropped groups' too); create group {} instead", last.0.saturating_add(1))]
    GroupIdTaken { group: GroupId, last: GroupId },
    #[error("the cluster already has {max} data groups, one per vShard at most; drop an empty group first")]
    TooManyGroups { max: u64 },
    #[error("new group {group} lists {voters} voters; a group has at most {max}")]
    TooManyVoters {
        group: GroupId,
        voters: usize,
        max: usize,
    },
}

/// A decoded routing table that breaks an invariant.
#[derive(Debug, thiserror::Error)]
#[error("routing table is corrupt: {0}")]
struct CorruptTable(String);

/// The routing table. Decoding validates every invariant (see the module
/// docs), so a table from untrusted bytes can never make a lookup panic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RoutingTableRepr")]
pub struct RoutingTable {
    epoch: u64,
    /// Indexed by [`VShardId::index`]; always [`VSHARD_COUNT`] long.
    vshards: Vec<GroupId>,
    groups: BTreeMap<GroupId, GroupRoute>,
    /// Ghost stubs: `(vshard, group that used to serve it)` → epoch of the move.
    ghosts: BTreeMap<(VShardId, GroupId), u64>,
    /// The highest data group id ever created.
    last_group: GroupId,
}

/// The unchecked wire form of [`RoutingTable`] (same fields, same order).
#[derive(Deserialize)]
struct RoutingTableRepr {
    epoch: u64,
    vshards: Vec<GroupId>,
    groups: BTreeMap<GroupId, GroupRoute>,
    ghosts: BTreeMap<(VShardId, GroupId), u64>,
    last_group: GroupId,
}

impl TryFrom<RoutingTableRepr> for RoutingTable {
    type Error = CorruptTable;

    fn try_from(repr: RoutingTableRepr) -> Result<Self, CorruptTable> {
        let table = RoutingTable {
            epoch: repr.epoch,
            vshards: repr.vshards,
            groups: repr.groups,
            ghosts: repr.ghosts,
            last_group: repr.last_group,
        };
        table.check_invariants().map_err(CorruptTable)?;
        Ok(table)
    }
}

impl RoutingTable {
    /// The initial table: groups `1..=data_groups`; vShard `v` → group
    /// `v % data_groups + 1`; epoch 1.
    ///
    /// Each group gets `min(replication_factor, nodes.len())` voters: a run
    /// of consecutive nodes (cyclically) starting at the group's offset, and
    /// its leader hint is the node at that offset. Each full round of
    /// `nodes.len()` groups starts once at every node; the last, partial round
    /// spreads its `s` starts evenly (offset `k * n / s`). That keeps both the
    /// replicas and the leaders per node within one of each other, whatever
    /// the group count.
    pub fn bootstrap(
        data_groups: u64,
        nodes: &[NodeId],
        replication_factor: usize,
    ) -> Result<Self, RoutingError> {
        let refuse = |defect| Err(RoutingError::InvalidBootstrap { defect });
        if data_groups == 0 {
            return refuse(BootstrapDefect::NoDataGroups);
        }
        if data_groups > MAX_DATA_GROUPS {
            return refuse(BootstrapDefect::TooManyDataGroups {
                requested: data_groups,
                max: MAX_DATA_GROUPS,
            });
        }
        if nodes.is_empty() {
            return refuse(BootstrapDefect::NoNodes);
        }
        if replication_factor == 0 {
            return refuse(BootstrapDefect::ZeroReplicationFactor);
        }
        let mut seen = BTreeSet::new();
        if let Some(&node) = nodes.iter().find(|&&node| !seen.insert(node)) {
            return refuse(BootstrapDefect::DuplicateNode(node));
        }

        // u128 so that `k * n` cannot overflow for any slice length.
        let n = nodes.len() as u128;
        let rf = replication_factor.min(nodes.len()) as u128;
        let total = u128::from(data_groups);
        let groups = (0..total)
            .map(|i| {
                let round_start = i - i % n;
                let in_round = (total - round_start).min(n);
                let start = (i % n) * n / in_round;
                // Every index is reduced modulo n, hence in bounds.
                let node_at = |offset: u128| nodes[((start + offset) % n) as usize];
                let mut voters: Vec<NodeId> = (0..rf).map(node_at).collect();
                voters.sort_unstable();
                let route = GroupRoute {
                    founders: voters.clone(),
                    voters,
                    learners: Vec::new(),
                    leader: Some(node_at(0)),
                };
                (GroupId(i as u64 + 1), route)
            })
            .collect();
        let vshards = VShardId::all()
            .map(|v| GroupId(u64::from(v.get()) % data_groups + 1))
            .collect();
        Ok(RoutingTable {
            epoch: 1,
            vshards,
            groups,
            ghosts: BTreeMap::new(),
            last_group: GroupId(data_groups),
        })
    }

    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Where `vshard` is served now.
    pub fn lookup(&self, vshard: VShardId) -> Route {
        // In bounds: vShard ids are below VSHARD_COUNT, the vector's length.
        let group = self.vshards[vshard.index()];
        Route {
            group,
            leader: self.groups.get(&group).and_then(|route| route.leader),
            epoch: self.epoch,
        }
    }

    /// Where the vShard owning `key` is served now.
    pub fn route_key(&self, key: &[u8]) -> Route {
        self.lookup(VShardId::for_key(key))
    }

    /// Whether `group` serves `vshard` now. If not, the redirect names the
    /// current route. The request's own epoch does not matter: a request that
    /// reached the right group is served even if it was routed with an old
    /// epoch, since the vShard has not moved away from it.
    pub fn check(&self, vshard: VShardId, group: GroupId) -> Result<(), WrongGroup> {
        let route = self.lookup(vshard);
        if route.group == group {
            Ok(())
        } else {
            Err(WrongGroup {
                vshard,
                group: route.group,
                leader: route.leader,
                epoch: route.epoch,
            })
        }
    }

    pub fn group(&self, group: GroupId) -> Option<&GroupRoute> {
        self.groups.get(&group)
    }

    /// Every data group, in id order.
    pub fn groups(&self) -> impl Iterator<Item = (GroupId, &GroupRoute)> + '_ {
        self.groups.iter().map(|(&id, route)| (id, route))
    }

    /// The id a new group takes: one above the highest ever created.
    pub fn next_group_id(&self) -> GroupId {
        GroupId(self.last_group.0.saturating_add(1))
    }

    /// The vShards `group` serves, in id order.
    pub fn vshards_of(&self, group: GroupId) -> impl Iterator<Item = VShardId> + '_ {
        VShardId::all().filter(move |v| self.vshards[v.index()] == group)
    }

    /// Every ghost stub as `(vshard, group holding the stub, epoch of the move)`.
    pub fn ghosts(&self) -> impl Iterator<Item = (VShardId, GroupId, u64)> + '_ {
        self.ghosts
            .iter()
            .map(|(&(vshard, group), &epoch)| (vshard, group, epoch))
    }

    /// The groups in which `node` is a voter or a learner, in id order.
    pub fn groups_of_node(&self, node: NodeId) -> Vec<GroupId> {
        self.groups
            .iter()
            .filter(|(_, route)| route.is_member(node))
            .map(|(&id, _)| id)
            .collect()
    }

    /// Applies one change and returns the new epoch. Every accepted change
    /// bumps the epoch by exactly 1; a rejected change changes nothing.
    pub fn apply(&mut self, change: &RoutingChange) -> Result<u64, RoutingError> {
        let epoch = self
            .epoch
            .checked_add(1)
            .ok_or(RoutingError::EpochExhausted)?;
        self.apply_change(change, epoch)?;
        self.epoch = epoch;
        Ok(epoch)
    }

    /// Validates `change` completely before mutating anything, so that an
    /// error leaves the table as it was.
    fn apply_change(&mut self, change: &RoutingChange, epoch: u64) -> Result<(), RoutingError> {
        match *change {
            RoutingChange::ReassignVShard {
                vshard_id: vshard,
                new_group_id: group_id,
                new_leaseholder_node_id: node,
            } => {
                let old_group = self.vshards[vshard.index()];
                let group = self.data_group_mut(group_id)?;
                if old_group == group_id {
                    return Err(RoutingError::AlreadyInGroup {
                        vshard,
                        group: group_id,
                    });
                }
                if !group.is_voter(node) {
                    return Err(RoutingError::NotAVoter {
                        group: group_id,
                        node,
                    });
                }
                group.leader = Some(node);
                self.vshards[vshard.index()] = group_id;
                // Moving back to a group that kept a stub revives it: the
                // stub would now contradict the route.
                self.ghosts.remove(&(vshard, group_id));
                self.ghosts.insert((vshard, old_group), epoch);
            }
            RoutingChange::LeadershipTransfer {
                group_id,
                new_leader_node_id: node,
            } => {
                let group = self.data_group_mut(group_id)?;
                if !group.is_voter(node) {
                    return Err(RoutingError::NotAVoter {
                        group: group_id,
                        node,
                    });
                }
                if group.leader == Some(node) {
                    return Err(RoutingError::AlreadyLeader {
                        group: group_id,
                        node,
                    });
                }
                group.leader = Some(node);
            }
            RoutingChange::RemoveMember {
                group_id,
                node_id: node,
            } => {
                let group = self.data_group_mut(group_id)?;
                if let Ok(index) = group.learners.binary_search(&node) {
                    group.learners.remove(index);
                } else if group.is_voter(node) {
                    group.remove_voter(group_id, node)?;
                } else {
                    return Err(RoutingError::NotAMember {
                        group: group_id,
                        node,
                    });
                }
            }
            RoutingChange::AddLearner {
                group_id,
                node_id: node,
            } => {
                let group = self.data_group_mut(group_id)?;
                if group.is_member(node) {
                    return Err(RoutingError::AlreadyMember {
                        group: group_id,
                        node,
                    });
                }
                insert_sorted(&mut group.learners, node);
            }
            RoutingChange::PromoteLearner {
                group_id,
                node_id: node,
            } => {
                let group = self.data_group_mut(group_id)?;
                let Ok(index) = group.learners.binary_search(&node) else {
                    return Err(RoutingError::NotALearner {
                        group: group_id,
                        node,
                    });
                };
                group.learners.remove(index);
                insert_sorted(&mut group.voters, node);
            }
            RoutingChange::DemoteVoter {
                group_id,
                node_id: node,
            } => {
                let group = self.data_group_mut(group_id)?;
                group.remove_voter(group_id, node)?;
                insert_sorted(&mut group.learners, node);
            }
            RoutingChange::CreateGroup {
                group_id,
                ref voters,
            } => {
                if group_id.is_metadata() {
                    return Err(RoutingError::MetadataGroup);
                }
                if self.groups.contains_key(&group_id) {
                    return Err(RoutingError::GroupExists { group: group_id });
                }
                if group_id <= self.last_group {
                    return Err(RoutingError::GroupIdTaken {
                        group: group_id,
                        last: self.last_group,
                    });
                }
                if self.groups.len() as u64 >= MAX_DATA_GROUPS {
                    return Err(RoutingError::TooManyGroups {
                        max: MAX_DATA_GROUPS,
                    });
                }
                let mut sorted = voters.clone();
                sorted.sort_unstable();
                if sorted.is_empty() {
                    return Err(RoutingError::NoVoters { group: group_id });
                }
                if sorted.len() > MAX_REPLICATION_FACTOR {
                    return Err(RoutingError::TooManyVoters {
                        group: group_id,
                        voters: sorted.len(),
                        max: MAX_REPLICATION_FACTOR,
                    });
                }
                if let Some(pair) = sorted.windows(2).find(|w| w[0] == w[1]) {
                    return Err(RoutingError::DuplicateVoter {
                        group: group_id,
                        node: pair[0],
                    });
                }
                // No leader hint yet: the group has not elected one. The first
                // LeadershipTransfer or ReassignVShard into it sets one.
                let route = GroupRoute {
                    founders: sorted.clone(),
                    voters: sorted,
                    learners: Vec::new(),
                    leader: None,
                };
                self.groups.insert(group_id, route);
                self.last_group = group_id;
            }
            RoutingChange::DropGroup { group_id } => {
                self.data_group_mut(group_id)?;
                let vshards = self.vshards_of(group_id).count();
                if vshards > 0 {
                    return Err(RoutingError::GroupNotEmpty {
                        group: group_id,
                        vshards,
                    });
                }
                self.groups.remove(&group_id);
                // A dropped group cannot answer with redirects any more.
                self.ghosts.retain(|&(_, group), _| group != group_id);
            }
            RoutingChange::RemoveGhostStub {
                vshard_id: vshard,
                group_id,
            } => {
                if self.ghosts.remove(&(vshard, group_id)).is_none() {
                    return Err(RoutingError::NoSuchGhost {
                        vshard,
                        group: group_id,
                    });
                }
            }
        }
        Ok(())
    }

    /// The data group `group`, or why a change cannot touch it.
    fn data_group_mut(&mut self, group: GroupId) -> Result<&mut GroupRoute, RoutingError> {
        if group.is_metadata() {
            return Err(RoutingError::MetadataGroup);
        }
        self.groups
            .get_mut(&group)
            .ok_or(RoutingError::UnknownGroup { group })
    }

    /// Checks every invariant listed in the module docs.
    fn check_invariants(&self) -> Result<(), String> {
        if self.vshards.len() != usize::from(VSHARD_COUNT) {
            return Err(format!(
                "it maps {} vShards instead of {VSHARD_COUNT}",
                self.vshards.len()
            ));
        }
        if self.groups.contains_key(&GroupId::METADATA) {
            return Err("it lists the metadata group as a data group".into());
        }
        if let Some((&id, _)) = self
            .groups
            .last_key_value()
            .filter(|(&id, _)| id > self.last_group)
        {
            return Err(format!(
                "it lists group {id}, above the highest group id ever created, {}",
                self.last_group
            ));
        }
        for (id, route) in &self.groups {
            route
                .check()
                .map_err(|problem| format!("group {id} {problem}"))?;
        }
        if let Some(v) =
            VShardId::all().find(|v| !self.groups.contains_key(&self.vshards[v.index()]))
        {
            return Err(format!("vShard {v} maps to a group that does not exist"));
        }
        for (&(vshard, group), &epoch) in &self.ghosts {
            if !self.groups.contains_key(&group) || self.vshards[vshard.index()] == group {
                return Err(format!(
                    "ghost stub for vShard {vshard} in group {group} is not a former route"
                ));
            }
            if epoch > self.epoch {
                return Err(format!(
                    "ghost stub for vShard {vshard} in group {group} is from a future epoch"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn n(id: u64) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn v(id: u16) -> VShardId {
        VShardId::new(id).unwrap()
    }

    fn nodes(ids: impl IntoIterator<Item = u64>) -> Vec<NodeId> {
        ids.into_iter().map(n).collect()
    }

    /// Group 1: voters n1 n2, leader n1; group 2: voters n2 n3, leader n2.
    /// Even vShards are in group 1, odd ones in group 2. Node 4 is free.
    fn small() -> RoutingTable {
        let table = RoutingTable::bootstrap(2, &nodes(1..=3), 2).unwrap();
        assert_eq!(table.group(GroupId(1)).unwrap().voters, nodes([1, 2]));
        assert_eq!(table.group(GroupId(2)).unwrap().voters, nodes([2, 3]));
        table
    }

    fn reassign(vshard: u16, group: u64, leaseholder: u64) -> RoutingChange {
        RoutingChange::ReassignVShard {
            vshard_id: v(vshard),
            new_group_id: GroupId(group),
            new_leaseholder_node_id: n(leaseholder),
        }
    }

    #[test]
    fn bootstrap_rejects_bad_parameters() {
        let defect = |groups, node_ids: &[u64], rf| match RoutingTable::bootstrap(
            groups,
            &nodes(node_ids.iter().copied()),
            rf,
        ) {
            Err(RoutingError::InvalidBootstrap { defect }) => defect,
            other => panic!("expected a bootstrap defect, got {other:?}"),
        };
        assert_eq!(defect(0, &[1], 1), BootstrapDefect::NoDataGroups);
        assert_eq!(
            defect(MAX_DATA_GROUPS + 1, &[1], 1),
            BootstrapDefect::TooManyDataGroups {
                requested: MAX_DATA_GROUPS + 1,
                max: MAX_DATA_GROUPS
            }
        );
        assert_eq!(defect(8, &[], 3), BootstrapDefect::NoNodes);
        assert_eq!(defect(8, &[1], 0), BootstrapDefect::ZeroReplicationFactor);
        assert_eq!(
            defect(8, &[1, 2, 1], 3),
            BootstrapDefect::DuplicateNode(n(1))
        );
        assert!(RoutingTable::bootstrap(MAX_DATA_GROUPS, &[n(1)], 1).is_ok());
    }

    #[test]
    fn bootstrap_golden_shape() {
        let table = RoutingTable::bootstrap(8, &nodes(1..=3), 3).unwrap();
        assert_eq!(table.epoch(), 1);
        let leaders: Vec<_> = table
            .groups()
            .map(|(_, g)| g.leader.unwrap().get())
            .collect();
        assert_eq!(leaders, [1, 2, 3, 1, 2, 3, 1, 2]);
        for (id, group) in table.groups() {
            assert_eq!(group.voters, nodes(1..=3), "{id}");
            assert!(group.learners.is_empty());
        }
        assert_eq!(
            table.groups().map(|(id, _)| id.0).collect::<Vec<_>>(),
            [1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(table.lookup(v(0)).group, GroupId(1));
        assert_eq!(table.lookup(v(9)).group, GroupId(2));
        assert_eq!(table.lookup(v(1023)).group, GroupId(8));
        assert!(table.ghosts().next().is_none());
        // Fewer nodes than the replication factor: clamped.
        let table = RoutingTable::bootstrap(2, &nodes([7]), 3).unwrap();
        assert_eq!(table.group(GroupId(2)).unwrap().voters, nodes([7]));
    }

    #[test]
    fn bootstrap_spreads_vshards_replicas_and_leaders_evenly() {
        let spread = |counts: &BTreeMap<NodeId, usize>| {
            counts.values().max().unwrap() - counts.values().min().unwrap()
        };
        for node_count in 1..=7u64 {
            let all = nodes(1..=node_count);
            for rf in 1..=5usize {
                for data_groups in (1..=20).chain([1024]) {
                    let case = format!("n={node_count} rf={rf} groups={data_groups}");
                    let table = RoutingTable::bootstrap(data_groups, &all, rf).unwrap();
                    assert_eq!(table.check_invariants(), Ok(()), "{case}");
                    assert_eq!(table.groups().count() as u64, data_groups, "{case}");

                    let mut per_group = BTreeMap::new();
                    for vshard in VShardId::all() {
                        *per_group
                            .entry(table.lookup(vshard).group)
                            .or_insert(0usize) += 1;
                    }
                    let (lo, hi) = (per_group.values().min(), per_group.values().max());
                    if data_groups <= 1024 {
                        assert_eq!(per_group.len() as u64, data_groups, "{case}");
                    }
                    assert!(
                        hi.unwrap() - lo.unwrap() <= 1,
                        "{case}: vShards {per_group:?}"
                    );

                    let voters = rf.min(all.len());
                    let mut replicas: BTreeMap<NodeId, usize> =
                        all.iter().map(|&x| (x, 0)).collect();
                    let mut leaders = replicas.clone();
                    for (_, group) in table.groups() {
                        assert_eq!(group.voters.len(), voters, "{case}");
                        let leader = group.leader.unwrap();
                        assert!(group.is_voter(leader), "{case}");
                        *leaders.get_mut(&leader).unwrap() += 1;
                        for voter in &group.voters {
                            *replicas.get_mut(voter).unwrap() += 1;
                        }
                    }
                    assert!(spread(&replicas) <= 1, "{case}: replicas {replicas:?}");
                    assert!(spread(&leaders) <= 1, "{case}: leaders {leaders:?}");
                    if (data_groups as usize * voters) % all.len() == 0 {
                        assert_eq!(spread(&replicas), 0, "{case}");
                    }
                }
            }
        }
    }

    #[test]
    fn reassign_redirects_through_the_ghost_stub() {
        let mut table = small();
        assert_eq!(table.check(v(0), GroupId(1)), Ok(()));
        assert_eq!(table.apply(&reassign(0, 2, 3)), Ok(2));
        let route = Route {
            group: GroupId(2),
            leader: Some(n(3)),
            epoch: 2,
        };
        assert_eq!(table.lookup(v(0)), route);
        assert_eq!(table.group(GroupId(2)).unwrap().leader, Some(n(3)));
        let redirect = table.check(v(0), GroupId(1)).unwrap_err();
        assert_eq!(
            redirect,
            WrongGroup {
                vshard: v(0),
                group: GroupId(2),
                leader: Some(n(3)),
                epoch: 2
            }
        );
        assert_eq!(
            redirect.to_string(),
            "vShard v0 is served by group g2 (leader n3) at routing epoch 2, \
             not by the group the request was sent to; resend it there"
        );
        assert_eq!(table.check(v(0), GroupId(2)), Ok(()));
        // Other vShards did not move.
        assert_eq!(table.check(v(2), GroupId(1)), Ok(()));
        assert_eq!(table.ghosts().collect::<Vec<_>>(), [(v(0), GroupId(1), 2)]);
        assert_eq!(table.vshards_of(GroupId(1)).count(), 511);
        assert_eq!(table.vshards_of(GroupId(2)).count(), 513);
        assert_eq!(table.vshards_of(GroupId(2)).next(), Some(v(0)));

        let key = b"user/42";
        assert_eq!(table.route_key(key), table.lookup(VShardId::for_key(key)));
    }

    #[test]
    fn moving_back_removes_the_ghost_it_returns_to() {
        let mut table = small();
        table.apply(&reassign(0, 2, 2)).unwrap();
        table.apply(&reassign(0, 1, 1)).unwrap();
        assert_eq!(table.lookup(v(0)).group, GroupId(1));
        assert_eq!(table.ghosts().collect::<Vec<_>>(), [(v(0), GroupId(2), 3)]);
        assert_eq!(table.check_invariants(), Ok(()));
    }

    #[test]
    fn replica_move_sequence() {
        // Move group 1's replica from n1 (its leader) to n4.
        let mut table = small();
        let g1 = GroupId(1);
        let steps = [
            RoutingChange::AddLearner {
                group_id: g1,
                node_id: n(4),
            },
            RoutingChange::PromoteLearner {
                group_id: g1,
                node_id: n(4),
            },
            RoutingChange::DemoteVoter {
                group_id: g1,
                node_id: n(1),
            },
            RoutingChange::LeadershipTransfer {
                group_id: g1,
                new_leader_node_id: n(4),
            },
            RoutingChange::RemoveMember {
                group_id: g1,
                node_id: n(1),
            },
        ];
        let expected = [
            (nodes([1, 2]), nodes([4]), Some(n(1))),
            (nodes([1, 2, 4]), vec![], Some(n(1))),
            (nodes([2, 4]), nodes([1]), None),
            (nodes([2, 4]), nodes([1]), Some(n(4))),
            (nodes([2, 4]), vec![], Some(n(4))),
        ];
        for (i, (step, (voters, learners, leader))) in steps.iter().zip(expected).enumerate() {
            assert_eq!(table.apply(step), Ok(i as u64 + 2), "{step:?}");
            let group = table.group(g1).unwrap();
            assert_eq!(
                (&group.voters, &group.learners, group.leader),
                (&voters, &learners, leader)
            );
            if i == 0 {
                assert_eq!(table.groups_of_node(n(4)), [g1]);
            }
        }
        assert_eq!(table.groups_of_node(n(1)), []);
        assert_eq!(table.groups_of_node(n(2)), [GroupId(1), GroupId(2)]);
    }

    #[test]
    fn removing_the_leader_voter_clears_the_hint() {
        let mut table = small();
        table
            .apply(&RoutingChange::RemoveMember {
                group_id: GroupId(1),
                node_id: n(1),
            })
            .unwrap();
        let group = table.group(GroupId(1)).unwrap();
        assert_eq!((group.voters.clone(), group.leader), (nodes([2]), None));
        // Removing a non-leader keeps the hint.
        table
            .apply(&RoutingChange::RemoveMember {
                group_id: GroupId(2),
                node_id: n(3),
            })
            .unwrap();
        assert_eq!(table.group(GroupId(2)).unwrap().leader, Some(n(2)));
    }

    #[test]
    fn create_and_drop_groups() {
        let mut table = small();
        let g3 = GroupId(3);
        table
            .apply(&RoutingChange::CreateGroup {
                group_id: g3,
                voters: nodes([4, 1]),
            })
            .unwrap();
        let group = table.group(g3).unwrap();
        assert_eq!((group.voters.clone(), group.leader), (nodes([1, 4]), None));
        assert_eq!(table.vshards_of(g3).count(), 0);
        // Give the group a vShard and take it back: g3 keeps a ghost stub.
        table.apply(&reassign(4, 3, 4)).unwrap();
        table.apply(&reassign(4, 1, 2)).unwrap();
        table.apply(&reassign(6, 2, 3)).unwrap();
        assert_eq!(table.ghosts().count(), 2);
        let epoch = table
            .apply(&RoutingChange::DropGroup { group_id: g3 })
            .unwrap();
        assert_eq!(epoch, 6);
        assert!(table.group(g3).is_none());
        assert_eq!(table.ghosts().collect::<Vec<_>>(), [(v(6), GroupId(1), 5)]);
        assert_eq!(table.check_invariants(), Ok(()));
    }

    #[test]
    fn remove_ghost_stub() {
        let mut table = small();
        table.apply(&reassign(0, 2, 2)).unwrap();
        let remove = RoutingChange::RemoveGhostStub {
            vshard_id: v(0),
            group_id: GroupId(1),
        };
        assert_eq!(table.apply(&remove), Ok(3));
        assert!(table.ghosts().next().is_none());
        assert_eq!(
            table.apply(&remove),
            Err(RoutingError::NoSuchGhost {
                vshard: v(0),
                group: GroupId(1)
            })
        );
    }

    /// Every rejection, each on a fresh `small()` table, which must come out
    /// unchanged (epoch included).
    #[test]
    fn rejections_change_nothing() {
        use RoutingChange as C;
        use RoutingError as E;
        let (g0, g1, g2, g9) = (GroupId(0), GroupId(1), GroupId(2), GroupId(9));
        #[rustfmt::skip]
        let cases = [
            (reassign(0, 0, 1), E::MetadataGroup),
            (reassign(0, 9, 1), E::UnknownGroup { group: g9 }),
            (reassign(0, 1, 1), E::AlreadyInGroup { vshard: v(0), group: g1 }),
            (reassign(0, 2, 1), E::NotAVoter { group: g2, node: n(1) }),
            (C::LeadershipTransfer { group_id: g0, new_leader_node_id: n(1) }, E::MetadataGroup),
            (C::LeadershipTransfer { group_id: g9, new_leader_node_id: n(1) }, E::UnknownGroup { group: g9 }),
            (C::LeadershipTransfer { group_id: g1, new_leader_node_id: n(3) }, E::NotAVoter { group: g1, node: n(3) }),
            (C::LeadershipTransfer { group_id: g1, new_leader_node_id: n(1) }, E::AlreadyLeader { group: g1, node: n(1) }),
            (C::RemoveMember { group_id: g0, node_id: n(1) }, E::MetadataGroup),
            (C::RemoveMember { group_id: g9, node_id: n(1) }, E::UnknownGroup { group: g9 }),
            (C::RemoveMember { group_id: g1, node_id: n(3) }, E::NotAMember { group: g1, node: n(3) }),
            (C::AddLearner { group_id: g0, node_id: n(4) }, E::MetadataGroup),
            (C::AddLearner { group_id: g9, node_id: n(4) }, E::UnknownGroup { group: g9 }),
            (C::AddLearner { group_id: g1, node_id: n(2) }, E::AlreadyMember { group: g1, node: n(2) }),
            (C::PromoteLearner { group_id: g0, node_id: n(4) }, E::MetadataGroup),
            (C::PromoteLearner { group_id: g9, node_id: n(4) }, E::UnknownGroup { group: g9 }),
            (C::PromoteLearner { group_id: g1, node_id: n(4) }, E::NotALearner { group: g1, node: n(4) }),
            (C::PromoteLearner { group_id: g1, node_id: n(1) }, E::NotALearner { group: g1, node: n(1) }),
            (C::DemoteVoter { group_id: g0, node_id: n(1) }, E::MetadataGroup),
            (C::DemoteVoter { group_id: g9, node_id: n(1) }, E::UnknownGroup { group: g9 }),
            (C::DemoteVoter { group_id: g1, node_id: n(3) }, E::NotAVoter { group: g1, node: n(3) }),
            (C::CreateGroup { group_id: g0, voters: nodes([1]) }, E::MetadataGroup),
            (C::CreateGroup { group_id: g1, voters: nodes([1]) }, E::GroupExists { group: g1 }),
            (C::CreateGroup { group_id: g9, voters: vec![] }, E::NoVoters { group: g9 }),
            (C::CreateGroup { group_id: g9, voters: nodes([2, 1, 2]) }, E::DuplicateVoter { group: g9, node: n(2) }),
            (C::CreateGroup { group_id: g9, voters: nodes(1..=8) }, E::TooManyVoters { group: g9, voters: 8, max: MAX_REPLICATION_FACTOR }),
            (C::DropGroup { group_id: g0 }, E::MetadataGroup),
            (C::DropGroup { group_id: g9 }, E::UnknownGroup { group: g9 }),
            (C::DropGroup { group_id: g1 }, E::GroupNotEmpty { group: g1, vshards: 512 }),
            (C::RemoveGhostStub { vshard_id: v(0), group_id: g1 }, E::NoSuchGhost { vshard: v(0), group: g1 }),
        ];
        for (change, expected) in cases {
            let mut table = small();
            assert_eq!(table.apply(&change), Err(expected), "{change:?}");
            assert_eq!(table, small(), "{change:?}");
        }
    }

    #[test]
    fn the_last_voter_cannot_be_removed_or_demoted() {
        let mut table = small();
        let g3 = GroupId(3);
        table
            .apply(&RoutingChange::CreateGroup {
                group_id: g3,
                voters: nodes([4]),
            })
            .unwrap();
        table
            .apply(&RoutingChange::AddLearner {
                group_id: g3,
                node_id: n(1),
            })
            .unwrap();
        let before = table.clone();
        let last = RoutingError::LastVoter {
            group: g3,
            node: n(4),
        };
        let remove = RoutingChange::RemoveMember {
            group_id: g3,
            node_id: n(4),
        };
        let demote = RoutingChange::DemoteVoter {
            group_id: g3,
            node_id: n(4),
        };
        assert_eq!(table.apply(&remove), Err(last.clone()));
        assert_eq!(table.apply(&demote), Err(last));
        assert_eq!(table, before);
        // The learner itself may go.
        let remove_learner = RoutingChange::RemoveMember {
            group_id: g3,
            node_id: n(1),
        };
        assert_eq!(table.apply(&remove_learner), Ok(before.epoch() + 1));
    }

    /// A created group keeps its founders through every membership change,
    /// and only a founder still a voter starts it from scratch.
    #[test]
    fn founders_are_the_voters_a_group_was_created_with() {
        let mut table = small();
        assert_eq!(table.group(GroupId(1)).unwrap().founders, nodes([1, 2]));
        let g3 = table.next_group_id();
        assert_eq!(g3, GroupId(3));
        table
            .apply(&RoutingChange::CreateGroup {
                group_id: g3,
                voters: nodes([4, 1, 3]),
            })
            .unwrap();
        let route = table.group(g3).unwrap();
        assert_eq!(
            (&route.voters, &route.founders),
            (&nodes([1, 3, 4]), &nodes([1, 3, 4]))
        );
        assert_eq!(route.leader, None);
        for change in [
            RoutingChange::RemoveMember {
                group_id: g3,
                node_id: n(1),
            },
            RoutingChange::DemoteVoter {
                group_id: g3,
                node_id: n(3),
            },
            RoutingChange::AddLearner {
                group_id: g3,
                node_id: n(2),
            },
            RoutingChange::PromoteLearner {
                group_id: g3,
                node_id: n(2),
            },
        ] {
            table.apply(&change).unwrap();
        }
        let route = table.group(g3).unwrap();
        assert_eq!(route.founders, nodes([1, 3, 4]));
        let from_scratch: Vec<u64> = (1..=4)
            .filter(|&id| route.starts_from_scratch(n(id)))
            .collect();
        // 1 left, 3 is a learner now, 2 joined later: only 4.
        assert_eq!(from_scratch, [4]);
        assert_eq!(table.next_group_id(), GroupId(4));
    }

    /// A dropped group's id is never given to another group: a node may
    /// still hold a replica of the dropped one.
    #[test]
    fn group_ids_are_never_reused() {
        let mut table = small();
        let g3 = GroupId(3);
        let create = RoutingChange::CreateGroup {
            group_id: g3,
            voters: nodes([1]),
        };
        table.apply(&create).unwrap();
        table
            .apply(&RoutingChange::DropGroup { group_id: g3 })
            .unwrap();
        let before = table.clone();
        let taken = table.apply(&create).unwrap_err();
        assert_eq!(
            taken,
            RoutingError::GroupIdTaken {
                group: g3,
                last: g3
            }
        );
        assert!(
            taken.to_string().contains("create group 4 instead"),
            "{taken}"
        );
        assert_eq!(table, before);
        let older = RoutingChange::CreateGroup {
            group_id: GroupId(2),
            voters: nodes([1]),
        };
        assert_eq!(
            table.apply(&older),
            Err(RoutingError::GroupExists { group: GroupId(2) })
        );
        assert_eq!(table.next_group_id(), GroupId(4));
    }

    #[test]
    fn groups_are_bounded_by_the_vshard_count() {
        let mut table = small();
        for id in 3..=MAX_DATA_GROUPS {
            let create = RoutingChange::CreateGroup {
                group_id: GroupId(id),
                voters: nodes([1]),
            };
            table.apply(&create).unwrap();
        }
        let before = table.clone();
        let one_more = RoutingChange::CreateGroup {
            group_id: table.next_group_id(),
            voters: nodes([1]),
        };
        assert_eq!(
            table.apply(&one_more),
            Err(RoutingError::TooManyGroups {
                max: MAX_DATA_GROUPS
            })
        );
        assert_eq!(table, before);
    }

    #[test]
    fn an_exhausted_epoch_refuses_every_change() {
        let mut table = small();
        table.epoch = u64::MAX;
        let before = table.clone();
        assert_eq!(
            table.apply(&reassign(0, 2, 2)),
            Err(RoutingError::EpochExhausted)
        );
        assert_eq!(table, before);
    }

    /// Decoding checks the invariants: corrupt bytes never yield a table
    /// whose lookups could panic or lie.
    #[test]
    fn corrupt_tables_are_refused_on_decode() {
        let decode = |table: &RoutingTable| {
            let bytes = postcard::to_allocvec(table).unwrap();
            postcard::from_bytes::<RoutingTable>(&bytes)
        };
        let good = small();
        assert_eq!(decode(&good).unwrap(), good);

        let mut short = good.clone();
        short.vshards.pop();
        let mut orphan = good.clone();
        orphan.vshards[5] = GroupId(9);
        let mut bad_leader = good.clone();
        bad_leader.groups.get_mut(&GroupId(1)).unwrap().leader = Some(n(3));
        let mut unsorted = good.clone();
        unsorted.groups.get_mut(&GroupId(1)).unwrap().voters = nodes([2, 1]);
        let mut overlapping = good.clone();
        overlapping.groups.get_mut(&GroupId(1)).unwrap().learners = nodes([2]);
        let mut no_voters = good.clone();
        no_voters
            .groups
            .get_mut(&GroupId(1))
            .unwrap()
            .voters
            .clear();
        no_voters.groups.get_mut(&GroupId(1)).unwrap().leader = None;
        let mut metadata = good.clone();
        metadata
            .groups
            .insert(GroupId::METADATA, good.group(GroupId(1)).unwrap().clone());
        let mut live_ghost = good.clone();
        live_ghost.ghosts.insert((v(0), GroupId(1)), 1);
        let mut future_ghost = good.clone();
        future_ghost.ghosts.insert((v(0), GroupId(2)), 2);
        let mut unsorted_founders = good.clone();
        unsorted_founders
            .groups
            .get_mut(&GroupId(1))
            .unwrap()
            .founders = nodes([2, 1]);
        let mut unborn = good.clone();
        unborn.last_group = GroupId(1);
        for corrupt in [
            short,
            orphan,
            bad_leader,
            unsorted,
            overlapping,
            no_voters,
            metadata,
            live_ghost,
            future_ghost,
            unsorted_founders,
            unborn,
        ] {
            assert!(corrupt.check_invariants().is_err(), "{:?}", corrupt.groups);
            assert!(decode(&corrupt).is_err(), "{:?}", corrupt.groups);
        }
    }

    fn change_strategy(
        node: impl Strategy<Value = NodeId> + Clone + 'static,
        group: impl Strategy<Value = GroupId> + Clone + 'static,
        vshard: impl Strategy<Value = VShardId> + Clone + 'static,
    ) -> impl Strategy<Value = RoutingChange> {
        use RoutingChange as C;
        prop_oneof![
            (vshard.clone(), group.clone(), node.clone()).prop_map(
                |(vshard_id, new_group_id, new_leaseholder_node_id)| {
                    C::ReassignVShard {
                        vshard_id,
                        new_group_id,
                        new_leaseholder_node_id,
                    }
                }
            ),
            (group.clone(), node.clone()).prop_map(|(group_id, new_leader_node_id)| {
                C::LeadershipTransfer {
                    group_id,
                    new_leader_node_id,
                }
            }),
            (group.clone(), node.clone())
                .prop_map(|(group_id, node_id)| C::RemoveMember { group_id, node_id }),
            (group.clone(), node.clone())
                .prop_map(|(group_id, node_id)| C::AddLearner { group_id, node_id }),
            (group.clone(), node.clone())
                .prop_map(|(group_id, node_id)| C::PromoteLearner { group_id, node_id }),
            (group.clone(), node.clone())
                .prop_map(|(group_id, node_id)| C::DemoteVoter { group_id, node_id }),
            (group.clone(), prop::collection::vec(node, 0..4))
                .prop_map(|(group_id, voters)| C::CreateGroup { group_id, voters }),
            group.clone().prop_map(|group_id| C::DropGroup { group_id }),
            (vshard, group).prop_map(|(vshard_id, group_id)| C::RemoveGhostStub {
                vshard_id,
                group_id
            }),
        ]
    }

    /// Small id spaces, so that random changes often hit real members,
    /// groups and ghosts and are accepted.
    fn small_change() -> impl Strategy<Value = RoutingChange> {
        change_strategy(
            (1u64..=5).prop_map(n),
            (0u64..=5).prop_map(GroupId),
            (0u16..6).prop_map(v),
        )
    }

    fn any_change() -> impl Strategy<Value = RoutingChange> {
        change_strategy(
            (1u64..).prop_map(n),
            any::<u64>().prop_map(GroupId),
            (0..VSHARD_COUNT).prop_map(v),
        )
    }

    proptest! {
        #[test]
        fn routing_epoch_is_strictly_increasing(
            changes in prop::collection::vec(small_change(), 0..80)
        ) {
            let mut table = RoutingTable::bootstrap(3, &nodes(1..=4), 3).unwrap();
            for change in &changes {
                let before = table.clone();
                match table.apply(change) {
                    Ok(epoch) => {
                        prop_assert_eq!(epoch, before.epoch() + 1);
                        prop_assert_eq!(table.epoch(), epoch);
                    }
                    Err(_) => prop_assert_eq!(&table, &before),
                }
                prop_assert_eq!(table.check_invariants(), Ok(()));
            }
            let bytes = postcard::to_allocvec(&table).unwrap();
            prop_assert_eq!(postcard::from_bytes::<RoutingTable>(&bytes).unwrap(), table);
        }

        #[test]
        fn routing_change_serde_round_trips(change in any_change()) {
            let bytes = postcard::to_allocvec(&change).unwrap();
            prop_assert_eq!(postcard::from_bytes::<RoutingChange>(&bytes).unwrap(), change);
        }
    }
}
