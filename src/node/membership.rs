//! Reconciling a group's Raft membership with the membership group 0 wants
//! (DESIGN.md §4: one source of truth, and the engine converges on it).
//!
//! The leader of each group compares its Raft configuration with the wanted
//! one and proposes one step at a time: add missing replicas as learners,
//! then promote and demote (a joint change when more than one voter moves,
//! left explicitly afterwards), then remove replicas no longer wanted. Pure:
//! the runtime supplies both views.

use crate::core::ids::NodeId;
use crate::core::routing::GroupRoute;
use crate::core::topology::{Membership, NodeState, Topology};
use raft::prelude::{ConfChangeType, ConfState};
use std::collections::BTreeSet;

/// The membership a group should have.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wanted {
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
}

impl Wanted {
    /// A data group's membership, from its route.
    pub fn from_route(route: &GroupRoute) -> Self {
        Wanted {
            voters: route.voters.iter().copied().collect(),
            learners: route.learners.iter().copied().collect(),
        }
    }

    /// Group 0's membership, from the topology: joining nodes catch up as
    /// learners; active nodes are what the topology says; a draining node
    /// keeps the role it has until it is decommissioned; decommissioned and
    /// removed nodes leave.
    pub fn from_topology(topology: &Topology, current: &ConfState) -> Self {
        let mut wanted = Wanted::default();
        for (node, info) in topology.nodes() {
            let is_voter = current.get_voters().contains(&node.get());
            match info.state {
                NodeState::Active(Membership::Voter) => {
                    wanted.voters.insert(node);
                }
                NodeState::Joining | NodeState::Active(Membership::Learner) => {
                    wanted.learners.insert(node);
                }
                NodeState::Draining if is_voter => {
                    wanted.voters.insert(node);
                }
                NodeState::Draining => {
                    wanted.learners.insert(node);
                }
                NodeState::Decommissioned => {}
            }
        }
        wanted
    }
}

fn ids(raw: &[u64]) -> BTreeSet<NodeId> {
    raw.iter().filter_map(|&id| NodeId::new(id).ok()).collect()
}

/// The next membership change the leader `me` should propose, if any. An
/// empty vector means "leave the joint configuration".
///
/// A learner is promoted only once `caught_up` says it holds the leader's
/// log: a voter that has none grants no vote (`raft::engine`), so a group
/// that promoted an empty replica could not elect a leader again until it
/// had one (simulator seed 89: a group of two, its leader restarted).
pub fn next_change(
    current: &ConfState,
    wanted: &Wanted,
    me: NodeId,
    caught_up: impl Fn(NodeId) -> bool,
) -> Option<Vec<(ConfChangeType, NodeId)>> {
    if !current.get_voters_outgoing().is_empty() {
        return Some(Vec::new());
    }
    let voters = ids(current.get_voters());
    let learners = ids(current.get_learners());
    // Never act on a wanted membership with no voters: it can only be a
    // transient view, and applying it would leave the group without quorum.
    if wanted.voters.is_empty() {
        return None;
    }
    if let Some(&new) = wanted
        .voters
        .iter()
        .chain(&wanted.learners)
        .find(|n| !voters.contains(n) && !learners.contains(n))
    {
        return Some(vec![(ConfChangeType::AddLearnerNode, new)]);
    }
    let promoted: Vec<NodeId> = wanted.voters.intersection(&learners).copied().collect();
    if !promoted.iter().all(|&n| caught_up(n)) {
        // The demotions wait too: a move promotes and demotes together.
        return None;
    }
    let mut changes: Vec<_> = promoted
        .into_iter()
        .map(|n| (ConfChangeType::AddNode, n))
        .collect();
    // Voters to demote: wanted as learners, or not wanted at all — a voter
    // leaves as a learner first, so that the replica being removed has
    // stopped counting towards any quorum before it is deleted. The leader
    // is never demoted by itself; leadership moves first.
    changes.extend(
        voters
            .iter()
            .filter(|&&n| n != me && !wanted.voters.contains(&n))
            .map(|&n| (ConfChangeType::AddLearnerNode, n)),
    );
    if !changes.is_empty() {
        return Some(changes);
    }
    learners
        .iter()
        .find(|&&n| !wanted.voters.contains(&n) && !wanted.learners.contains(&n))
        .map(|&n| vec![(ConfChangeType::RemoveNode, n)])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(id: u64) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn conf(voters: &[u64], learners: &[u64], outgoing: &[u64]) -> ConfState {
        let mut cs = ConfState::default();
        cs.set_voters(voters.to_vec());
        cs.set_learners(learners.to_vec());
        cs.set_voters_outgoing(outgoing.to_vec());
        cs
    }

    fn wanted(voters: &[u64], learners: &[u64]) -> Wanted {
        Wanted {
            voters: voters.iter().map(|&i| n(i)).collect(),
            learners: learners.iter().map(|&i| n(i)).collect(),
        }
    }

    use ConfChangeType::{AddLearnerNode, AddNode, RemoveNode};

    #[test]
    fn steps_converge_in_order() {
        let me = n(1);
        let target = wanted(&[1, 2, 4], &[3]);
        // New replicas join as learners first, one at a time.
        assert_eq!(
            next_change(&conf(&[1, 2, 3], &[], &[]), &target, me, |_| true),
            Some(vec![(AddLearnerNode, n(4))])
        );
        // Then promotion and demotion together: a joint change.
        assert_eq!(
            next_change(&conf(&[1, 2, 3], &[4], &[]), &target, me, |_| true),
            Some(vec![(AddNode, n(4)), (AddLearnerNode, n(3))])
        );
        // A joint configuration is always left first.
        assert_eq!(
            next_change(&conf(&[1, 2, 4], &[], &[1, 2, 3]), &target, me, |_| true),
            Some(vec![])
        );
        assert_eq!(
            next_change(&conf(&[1, 2, 4], &[3], &[]), &target, me, |_| true),
            None
        );
        // Unwanted replicas are removed last.
        assert_eq!(
            next_change(
                &conf(&[1, 2, 4], &[3], &[]),
                &wanted(&[1, 2, 4], &[]),
                me,
                |_| true
            ),
            Some(vec![(RemoveNode, n(3))])
        );
        // An unwanted voter is demoted before it is removed.
        assert_eq!(
            next_change(
                &conf(&[1, 2, 3, 4], &[], &[]),
                &wanted(&[1, 2, 4], &[]),
                me,
                |_| true
            ),
            Some(vec![(AddLearnerNode, n(3))])
        );
    }

    #[test]
    fn a_learner_is_promoted_only_once_it_caught_up() {
        let me = n(1);
        let target = wanted(&[1, 2, 4], &[3]);
        let current = conf(&[1, 2, 3], &[4], &[]);
        assert_eq!(next_change(&current, &target, me, |id| id != n(4)), None);
        assert_eq!(
            next_change(&current, &target, me, |_| true),
            Some(vec![(AddNode, n(4)), (AddLearnerNode, n(3))])
        );
    }

    #[test]
    fn the_leader_is_never_demoted_or_removed_by_itself() {
        let me = n(1);
        assert_eq!(
            next_change(
                &conf(&[1, 2, 3], &[], &[]),
                &wanted(&[2, 3], &[1]),
                me,
                |_| true
            ),
            None
        );
        assert_eq!(
            next_change(
                &conf(&[1, 2, 3], &[], &[]),
                &wanted(&[2, 3], &[]),
                me,
                |_| true
            ),
            None
        );
    }

    #[test]
    fn an_empty_wanted_voter_set_is_never_acted_on() {
        assert_eq!(
            next_change(&conf(&[1, 2], &[], &[]), &wanted(&[], &[]), n(1), |_| true),
            None
        );
    }

    #[test]
    fn group_zero_follows_the_topology() {
        use crate::core::topology::TopologyChange;
        let mut topology = Topology::bootstrap(n(1), "a".into());
        for change in [
            TopologyChange::Join {
                node_id: n(2),
                addr: "b".into(),
            },
            TopologyChange::Join {
                node_id: n(3),
                addr: "c".into(),
            },
            TopologyChange::Activate { node_id: n(3) },
            TopologyChange::PromoteToVoter { node_id: n(3) },
        ] {
            topology.apply(&change).unwrap();
        }
        let current = conf(&[1], &[], &[]);
        assert_eq!(
            Wanted::from_topology(&topology, &current),
            wanted(&[1, 3], &[2])
        );
    }
}
