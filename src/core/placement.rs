//! Up-replication: which node gets a data group's next replica, and which
//! nodes found a new group.
//!
//! A cluster bootstraps on one node, so every data group starts with one
//! replica; as nodes join and become active, each group is brought up to
//! the cluster's replication factor, like CockroachDB's replicate queue or
//! TiKV's replica checker. The choice is a pure function of the replicated
//! state, so whichever node leads group 0 proposes the same thing.

use crate::core::ids::{GroupId, NodeId};
use crate::core::routing::RoutingTable;
use crate::core::topology::{NodeState, Topology};
use std::collections::BTreeMap;

/// One new replica per under-replicated group: the active node that is not
/// yet a member and hosts the fewest replicas (ties to the lowest id),
/// counting the replicas placed earlier in the same call so that one call
/// spreads them. Groups are visited in id order.
pub fn next_replicas(
    topology: &Topology,
    routing: &RoutingTable,
    replication_factor: usize,
) -> Vec<(GroupId, NodeId)> {
    let mut load = replica_load(topology, routing);
    let mut placed = Vec::new();
    for (group, route) in routing.groups() {
        if route.voters.len() + route.learners.len() >= replication_factor {
            continue;
        }
        let target = load
            .iter()
            .filter(|(node, _)| !route.is_member(**node))
            .min_by_key(|(node, count)| (**count, **node))
            .map(|(node, _)| *node);
        if let Some(node) = target {
            *load.entry(node).or_default() += 1;
            placed.push((group, node));
        }
    }
    placed
}

/// The voters of a new data group: the `replication_factor` active nodes
/// hosting the fewest replicas (ties to the lowest id), or every active
/// node if there are fewer, in id order.
pub fn founders(
    topology: &Topology,
    routing: &RoutingTable,
    replication_factor: usize,
) -> Vec<NodeId> {
    let mut by_load: Vec<(usize, NodeId)> = replica_load(topology, routing)
        .into_iter()
        .map(|(node, count)| (count, node))
        .collect();
    by_load.sort_unstable();
    let mut chosen: Vec<NodeId> = by_load
        .into_iter()
        .take(replication_factor)
        .map(|(_, node)| node)
        .collect();
    chosen.sort_unstable();
    chosen
}

/// How many replicas (voters and learners) each active node hosts.
fn replica_load(topology: &Topology, routing: &RoutingTable) -> BTreeMap<NodeId, usize> {
    let mut load: BTreeMap<NodeId, usize> = topology
        .nodes()
        .filter(|(_, info)| matches!(info.state, NodeState::Active(_)))
        .map(|(node, _)| (node, 0))
        .collect();
    for (_, route) in routing.groups() {
        for node in route.voters.iter().chain(&route.learners) {
            if let Some(count) = load.get_mut(node) {
                *count += 1;
            }
        }
    }
    load
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::routing::RoutingChange;
    use crate::core::topology::TopologyChange;

    fn n(id: u64) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn cluster(nodes: u64, groups: u64) -> (Topology, RoutingTable) {
        let mut topology = Topology::bootstrap(n(1), "a".into());
        for id in 2..=nodes {
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
        (
            topology,
            RoutingTable::bootstrap(groups, &[n(1)], 3).unwrap(),
        )
    }

    /// Applies placements until none is left; returns the rounds taken.
    fn settle(topology: &Topology, routing: &mut RoutingTable, rf: usize) -> usize {
        let mut rounds = 0;
        loop {
            let placed = next_replicas(topology, routing, rf);
            if placed.is_empty() {
                return rounds;
            }
            rounds += 1;
            for (group_id, node_id) in placed {
                routing
                    .apply(&RoutingChange::AddLearner { group_id, node_id })
                    .unwrap();
                routing
                    .apply(&RoutingChange::PromoteLearner { group_id, node_id })
                    .unwrap();
            }
        }
    }

    #[test]
    fn groups_reach_the_replication_factor_spread_evenly() {
        let (topology, mut routing) = cluster(4, 8);
        assert_eq!(settle(&topology, &mut routing, 3), 2);
        let mut per_node: BTreeMap<NodeId, usize> = BTreeMap::new();
        for (_, route) in routing.groups() {
            assert_eq!(route.voters.len(), 3);
            for v in &route.voters {
                *per_node.entry(*v).or_default() += 1;
            }
        }
        // 24 replicas on 4 nodes, node 1 holding all 8 bootstrap ones.
        assert_eq!(per_node[&n(1)], 8);
        let others: Vec<usize> = (2..=4).map(|i| per_node[&n(i)]).collect();
        assert!(
            others.iter().max().unwrap() - others.iter().min().unwrap() <= 1,
            "{per_node:?}"
        );
    }

    #[test]
    fn only_active_nodes_receive_replicas_and_never_twice() {
        let (mut topology, mut routing) = cluster(2, 2);
        topology
            .apply(&TopologyChange::Join {
                node_id: n(3),
                addr: "a".into(),
            })
            .unwrap();
        // Node 3 is still joining: only node 2 can take a replica.
        assert_eq!(settle(&topology, &mut routing, 3), 1);
        for (_, route) in routing.groups() {
            assert_eq!(route.voters, vec![n(1), n(2)]);
        }
        assert!(next_replicas(&topology, &routing, 3).is_empty());
        assert!(next_replicas(&topology, &routing, 1).is_empty());
    }

    #[test]
    fn a_new_group_is_founded_on_the_least_loaded_active_nodes() {
        let (mut topology, mut routing) = cluster(5, 4);
        // Nodes 2..=5 take one replica each of groups 1..=4 (round-robin
        // from the least loaded), node 1 holds all four.
        settle(&topology, &mut routing, 2);
        topology
            .apply(&TopologyChange::StartDecommission { node_id: n(5) })
            .unwrap();
        routing
            .apply(&RoutingChange::AddLearner {
                group_id: GroupId(1),
                node_id: n(3),
            })
            .unwrap();
        // Loads: 1 → 4, 2 → 1, 3 → 2, 4 → 1; node 5 is draining.
        assert_eq!(founders(&topology, &routing, 2), [n(2), n(4)]);
        assert_eq!(founders(&topology, &routing, 3), [n(2), n(3), n(4)]);
        assert_eq!(founders(&topology, &routing, 7), [n(1), n(2), n(3), n(4)]);
    }
}
