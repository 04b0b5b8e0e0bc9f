//! Cluster topology: which nodes exist and what state each is in
//! (DESIGN.md §3.1 `TopologyChange`, §5 decommission).
//!
//! A node moves through
//!
//! ```text
//! Joining ──Activate──▶ Active(Learner) ──PromoteToVoter──▶ Active(Voter)
//!    │ └──────────────PromoteToVoter──────────────────────────▲
//!    │                 Active(_) ──StartDecommission──▶ Draining
//!    │                 Draining ──FinishDecommission──▶ Decommissioned
//!    └──Leave──▶ removed ◀──Leave── Decommissioned
//! ```
//!
//! Every change is applied in group-0 log order on every node, so every
//! rejection is deterministic and leaves the topology untouched: a duplicate
//! delivery of a change is rejected like any other illegal transition rather
//! than silently accepted, so the cache records the same outcome everywhere.
//! A removed node's id is retired forever, as etcd does with member ids, so a
//! stale message from the old node can never be mistaken for a new one.

use crate::core::ids::NodeId;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// The longest node address accepted, in bytes. Addresses are replicated to
/// every node and kept forever in the topology, so they are capped like host
/// names (255 bytes) instead of being allowed to bloat the metadata group.
pub const MAX_ADDR_LEN: usize = 255;

/// How an active node takes part in the metadata group.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Membership {
    Learner,
    Voter,
}

/// The lifecycle state of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum NodeState {
    /// Admitted with a token; catching up on group 0.
    Joining,
    /// A full member of the cluster.
    Active(Membership),
    /// Being decommissioned: its replicas are being moved off.
    Draining,
    /// Holds no replicas any more; waiting to leave.
    Decommissioned,
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeState::Joining => "joining",
            NodeState::Active(Membership::Learner) => "an active learner",
            NodeState::Active(Membership::Voter) => "an active voter",
            NodeState::Draining => "draining",
            NodeState::Decommissioned => "decommissioned",
        })
    }
}

/// What the cluster knows about one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeInfo {
    /// Where peers reach the node (`host:port`).
    pub addr: String,
    pub state: NodeState,
}

/// A change to the topology, committed to group 0.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TopologyChange {
    /// A new node was admitted: it enters `Joining`.
    Join { node_id: NodeId, addr: String },
    /// `Joining → Active(Learner)`: the joiner caught up as a group-0 learner.
    Activate { node_id: NodeId },
    /// `Joining | Active(Learner) → Active(Voter)`.
    PromoteToVoter { node_id: NodeId },
    /// `Active(_) → Draining`.
    StartDecommission { node_id: NodeId },
    /// `Draining → Decommissioned`.
    FinishDecommission { node_id: NodeId },
    /// `Decommissioned | Joining →` removed; the id is retired forever.
    Leave { node_id: NodeId },
}

impl TopologyChange {
    /// The node the change is about.
    pub fn node_id(&self) -> NodeId {
        match *self {
            TopologyChange::Join { node_id, .. }
            | TopologyChange::Activate { node_id }
            | TopologyChange::PromoteToVoter { node_id }
            | TopologyChange::StartDecommission { node_id }
            | TopologyChange::FinishDecommission { node_id }
            | TopologyChange::Leave { node_id } => node_id,
        }
    }

    /// The variant's name, for error messages.
    fn name(&self) -> &'static str {
        match self {
            TopologyChange::Join { .. } => "Join",
            TopologyChange::Activate { .. } => "Activate",
            TopologyChange::PromoteToVoter { .. } => "PromoteToVoter",
            TopologyChange::StartDecommission { .. } => "StartDecommission",
            TopologyChange::FinishDecommission { .. } => "FinishDecommission",
            TopologyChange::Leave { .. } => "Leave",
        }
    }
}

/// A rejected topology change; the topology is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum TopologyError {
    #[error("node {node_id} is already a member of the cluster and cannot join again")]
    AlreadyMember { node_id: NodeId },
    #[error("node id {node_id} belonged to a node that left the cluster; ids are never reused")]
    Retired { node_id: NodeId },
    #[error("node {node_id} is not a member of the cluster")]
    UnknownNode { node_id: NodeId },
    #[error("{change} does not apply to node {node_id} because it is {from}")]
    IllegalTransition {
        node_id: NodeId,
        from: NodeState,
        change: String,
    },
    #[error("node {node_id} cannot join with an empty address")]
    EmptyAddress { node_id: NodeId },
    #[error("address of node {node_id} is {len} bytes long, more than the {max}-byte limit")]
    AddressTooLong {
        node_id: NodeId,
        len: usize,
        max: usize,
    },
    #[error(
        "node {node_id} is the last active voter of the cluster; \
         promote another node to voter before decommissioning it"
    )]
    LastVoter { node_id: NodeId },
}

/// The set of nodes and the ids retired by nodes that left.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    nodes: BTreeMap<NodeId, NodeInfo>,
    retired: BTreeSet<NodeId>,
}

impl Topology {
    /// An empty topology.
    pub fn new() -> Self {
        Self::default()
    }

    /// The topology of a freshly bootstrapped cluster: one active voter.
    ///
    /// The address is not validated: it is the bootstrapping node's own
    /// configured address, checked when its configuration was loaded.
    pub fn bootstrap(node_id: NodeId, addr: String) -> Self {
        let mut topology = Self::new();
        topology.nodes.insert(
            node_id,
            NodeInfo {
                addr,
                state: NodeState::Active(Membership::Voter),
            },
        );
        topology
    }

    /// Applies one change, or rejects it and changes nothing.
    pub fn apply(&mut self, change: &TopologyChange) -> Result<(), TopologyError> {
        let node_id = change.node_id();
        if let TopologyChange::Join { addr, .. } = change {
            return self.join(node_id, addr);
        }
        let from = match self.nodes.get(&node_id) {
            Some(info) => info.state,
            None if self.retired.contains(&node_id) => {
                return Err(TopologyError::Retired { node_id })
            }
            None => return Err(TopologyError::UnknownNode { node_id }),
        };
        let to = match (change, from) {
            (TopologyChange::Activate { .. }, NodeState::Joining) => {
                NodeState::Active(Membership::Learner)
            }
            (
                TopologyChange::PromoteToVoter { .. },
                NodeState::Joining | NodeState::Active(Membership::Learner),
            ) => NodeState::Active(Membership::Voter),
            (TopologyChange::StartDecommission { .. }, NodeState::Active(membership)) => {
                // Without a voter, group 0 could never commit again.
                if membership == Membership::Voter && self.voters().count() == 1 {
                    return Err(TopologyError::LastVoter { node_id });
                }
                NodeState::Draining
            }
            (TopologyChange::FinishDecommission { .. }, NodeState::Draining) => {
                NodeState::Decommissioned
            }
            (TopologyChange::Leave { .. }, NodeState::Joining | NodeState::Decommissioned) => {
                self.nodes.remove(&node_id);
                self.retired.insert(node_id);
                return Ok(());
            }
            _ => {
                return Err(TopologyError::IllegalTransition {
                    node_id,
                    from,
                    change: change.name().to_owned(),
                })
            }
        };
        if let Some(info) = self.nodes.get_mut(&node_id) {
            info.state = to;
        }
        Ok(())
    }

    fn join(&mut self, node_id: NodeId, addr: &str) -> Result<(), TopologyError> {
        if self.retired.contains(&node_id) {
            return Err(TopologyError::Retired { node_id });
        }
        if self.nodes.contains_key(&node_id) {
            return Err(TopologyError::AlreadyMember { node_id });
        }
        if addr.is_empty() {
            return Err(TopologyError::EmptyAddress { node_id });
        }
        if addr.len() > MAX_ADDR_LEN {
            return Err(TopologyError::AddressTooLong {
                node_id,
                len: addr.len(),
                max: MAX_ADDR_LEN,
            });
        }
        self.nodes.insert(
            node_id,
            NodeInfo {
                addr: addr.to_owned(),
                state: NodeState::Joining,
            },
        );
        Ok(())
    }

    pub fn get(&self, node_id: NodeId) -> Option<&NodeInfo> {
        self.nodes.get(&node_id)
    }

    /// Every current node (retired ids excluded), in id order.
    pub fn nodes(&self) -> impl Iterator<Item = (NodeId, &NodeInfo)> + '_ {
        self.nodes.iter().map(|(&id, info)| (id, info))
    }

    /// The active voters, in id order.
    pub fn voters(&self) -> impl Iterator<Item = NodeId> + '_ {
        self.nodes
            .iter()
            .filter(|(_, info)| info.state == NodeState::Active(Membership::Voter))
            .map(|(&id, _)| id)
    }

    /// Whether `node_id` belonged to a node that left; such ids never rejoin.
    pub fn is_retired(&self, node_id: NodeId) -> bool {
        self.retired.contains(&node_id)
    }

    /// The id a newly admitted node gets: one past every id ever used,
    /// current or retired, so an id is never handed out twice. `None` only
    /// once `u64` ids are exhausted.
    pub fn next_node_id(&self) -> Option<NodeId> {
        let highest = self
            .nodes
            .keys()
            .chain(self.retired.iter())
            .map(|id| id.get())
            .max()
            .unwrap_or(0);
        NodeId::new(highest.checked_add(1)?).ok()
    }

    /// The number of current nodes (retired ids excluded).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const LEARNER: NodeState = NodeState::Active(Membership::Learner);
    const VOTER: NodeState = NodeState::Active(Membership::Voter);

    fn n(id: u64) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn join(id: u64) -> TopologyChange {
        TopologyChange::Join {
            node_id: n(id),
            addr: format!("10.0.0.{id}:7000"),
        }
    }

    /// Node 1 is the bootstrap voter; `extra` lists other nodes to create in
    /// the given states (each reached through legal changes).
    fn with_nodes(extra: &[(u64, NodeState)]) -> Topology {
        let mut t = Topology::bootstrap(n(1), "10.0.0.1:7000".into());
        for &(id, state) in extra {
            t.apply(&join(id)).unwrap();
            let node_id = n(id);
            let path: &[TopologyChange] = match state {
                NodeState::Joining => &[],
                NodeState::Active(Membership::Learner) => &[TopologyChange::Activate { node_id }],
                NodeState::Active(Membership::Voter) => &[
                    TopologyChange::Activate { node_id },
                    TopologyChange::PromoteToVoter { node_id },
                ],
                NodeState::Draining => &[
                    TopologyChange::Activate { node_id },
                    TopologyChange::StartDecommission { node_id },
                ],
                NodeState::Decommissioned => &[
                    TopologyChange::Activate { node_id },
                    TopologyChange::StartDecommission { node_id },
                    TopologyChange::FinishDecommission { node_id },
                ],
            };
            for change in path {
                t.apply(change).unwrap();
            }
            assert_eq!(t.get(node_id).unwrap().state, state);
        }
        t
    }

    fn all_changes(id: u64) -> Vec<TopologyChange> {
        let node_id = n(id);
        vec![
            join(id),
            TopologyChange::Activate { node_id },
            TopologyChange::PromoteToVoter { node_id },
            TopologyChange::StartDecommission { node_id },
            TopologyChange::FinishDecommission { node_id },
            TopologyChange::Leave { node_id },
        ]
    }

    #[test]
    fn next_node_id_skips_current_and_retired_ids() {
        let mut t = Topology::new();
        assert_eq!(t.next_node_id(), Some(n(1)));
        t.apply(&join(1)).unwrap();
        t.apply(&join(4)).unwrap();
        assert_eq!(t.next_node_id(), Some(n(5)));
        t.apply(&join(5)).unwrap();
        t.apply(&TopologyChange::Leave { node_id: n(5) }).unwrap();
        assert!(t.is_retired(n(5)));
        assert_eq!(t.next_node_id(), Some(n(6)), "a retired id is never reused");
    }

    #[test]
    fn new_is_empty_and_bootstrap_has_one_voter() {
        assert!(Topology::new().is_empty());
        assert_eq!(Topology::new(), Topology::default());
        let t = Topology::bootstrap(n(1), "a:1".into());
        assert_eq!(t.len(), 1);
        assert_eq!(t.voters().collect::<Vec<_>>(), vec![n(1)]);
        assert_eq!(t.get(n(1)).unwrap().addr, "a:1");
    }

    #[test]
    fn join_enters_joining() {
        let mut t = with_nodes(&[]);
        t.apply(&join(2)).unwrap();
        let info = t.get(n(2)).unwrap();
        assert_eq!(info.state, NodeState::Joining);
        assert_eq!(info.addr, "10.0.0.2:7000");
        assert_eq!(t.len(), 2);
        assert_eq!(
            t.nodes().map(|(id, _)| id).collect::<Vec<_>>(),
            [n(1), n(2)]
        );
    }

    /// Every legal transition, from every state it applies to.
    #[test]
    fn legal_transitions() {
        type Case = (NodeState, fn(NodeId) -> TopologyChange, Option<NodeState>);
        let cases: &[Case] = &[
            (
                NodeState::Joining,
                |node_id| TopologyChange::Activate { node_id },
                Some(LEARNER),
            ),
            (
                NodeState::Joining,
                |node_id| TopologyChange::PromoteToVoter { node_id },
                Some(VOTER),
            ),
            (
                LEARNER,
                |node_id| TopologyChange::PromoteToVoter { node_id },
                Some(VOTER),
            ),
            (
                LEARNER,
                |node_id| TopologyChange::StartDecommission { node_id },
                Some(NodeState::Draining),
            ),
            (
                VOTER,
                |node_id| TopologyChange::StartDecommission { node_id },
                Some(NodeState::Draining),
            ),
            (
                NodeState::Draining,
                |node_id| TopologyChange::FinishDecommission { node_id },
                Some(NodeState::Decommissioned),
            ),
            (
                NodeState::Joining,
                |node_id| TopologyChange::Leave { node_id },
                None,
            ),
            (
                NodeState::Decommissioned,
                |node_id| TopologyChange::Leave { node_id },
                None,
            ),
        ];
        for &(from, make, to) in cases {
            let mut t = with_nodes(&[(2, from)]);
            let change = make(n(2));
            t.apply(&change)
                .unwrap_or_else(|e| panic!("{change:?} from {from:?}: {e}"));
            assert_eq!(t.get(n(2)).map(|i| i.state), to, "{change:?} from {from:?}");
            assert_eq!(t.is_retired(n(2)), to.is_none());
            assert_eq!(t.len(), if to.is_some() { 2 } else { 1 });
        }
    }

    /// Every change that is not in the legal table above is rejected as an
    /// illegal transition (duplicates included), and changes nothing.
    #[test]
    fn illegal_transitions() {
        let legal = |change: &TopologyChange, from: NodeState| {
            matches!(
                (change, from),
                (TopologyChange::Activate { .. }, NodeState::Joining)
                    | (
                        TopologyChange::PromoteToVoter { .. },
                        NodeState::Joining | LEARNER
                    )
                    | (
                        TopologyChange::StartDecommission { .. },
                        NodeState::Active(_)
                    )
                    | (
                        TopologyChange::FinishDecommission { .. },
                        NodeState::Draining
                    )
                    | (
                        TopologyChange::Leave { .. },
                        NodeState::Joining | NodeState::Decommissioned
                    )
            )
        };
        let states = [
            NodeState::Joining,
            LEARNER,
            VOTER,
            NodeState::Draining,
            NodeState::Decommissioned,
        ];
        let mut rejected = 0;
        for from in states {
            for change in all_changes(2) {
                if legal(&change, from) {
                    continue;
                }
                let mut t = with_nodes(&[(2, from)]);
                let before = t.clone();
                let err = t.apply(&change).unwrap_err();
                let expected = match change {
                    TopologyChange::Join { .. } => TopologyError::AlreadyMember { node_id: n(2) },
                    _ => TopologyError::IllegalTransition {
                        node_id: n(2),
                        from,
                        change: change.name().to_owned(),
                    },
                };
                assert_eq!(err, expected, "{change:?} from {from:?}");
                assert_eq!(t, before);
                rejected += 1;
            }
        }
        // 5 states x 6 changes, minus the 8 legal pairs.
        assert_eq!(rejected, 22);
    }

    #[test]
    fn duplicate_promotion_is_rejected() {
        let mut t = with_nodes(&[(2, LEARNER)]);
        let promote = TopologyChange::PromoteToVoter { node_id: n(2) };
        t.apply(&promote).unwrap();
        assert_eq!(
            t.apply(&promote),
            Err(TopologyError::IllegalTransition {
                node_id: n(2),
                from: VOTER,
                change: "PromoteToVoter".into(),
            })
        );
    }

    #[test]
    fn retired_ids_are_never_reused() {
        let mut t = with_nodes(&[(2, NodeState::Decommissioned)]);
        t.apply(&TopologyChange::Leave { node_id: n(2) }).unwrap();
        assert!(t.is_retired(n(2)));
        assert!(t.get(n(2)).is_none());
        let before = t.clone();
        for change in all_changes(2) {
            assert_eq!(
                t.apply(&change),
                Err(TopologyError::Retired { node_id: n(2) }),
                "{change:?}"
            );
        }
        assert_eq!(t, before);
    }

    #[test]
    fn unknown_nodes_are_rejected() {
        let mut t = with_nodes(&[]);
        for change in all_changes(9).into_iter().skip(1) {
            assert_eq!(
                t.apply(&change),
                Err(TopologyError::UnknownNode { node_id: n(9) })
            );
        }
        assert_eq!(t, with_nodes(&[]));
    }

    #[test]
    fn join_validates_the_address() {
        let mut t = with_nodes(&[]);
        let before = t.clone();
        let empty = TopologyChange::Join {
            node_id: n(2),
            addr: String::new(),
        };
        assert_eq!(
            t.apply(&empty),
            Err(TopologyError::EmptyAddress { node_id: n(2) })
        );
        let long = TopologyChange::Join {
            node_id: n(2),
            addr: "a".repeat(MAX_ADDR_LEN + 1),
        };
        assert_eq!(
            t.apply(&long),
            Err(TopologyError::AddressTooLong {
                node_id: n(2),
                len: MAX_ADDR_LEN + 1,
                max: MAX_ADDR_LEN
            })
        );
        assert_eq!(t, before);
        let longest = TopologyChange::Join {
            node_id: n(2),
            addr: "a".repeat(MAX_ADDR_LEN),
        };
        assert_eq!(t.apply(&longest), Ok(()));
    }

    #[test]
    fn the_last_voter_cannot_be_decommissioned() {
        let mut t = with_nodes(&[(2, LEARNER)]);
        let before = t.clone();
        let decommission = TopologyChange::StartDecommission { node_id: n(1) };
        assert_eq!(
            t.apply(&decommission),
            Err(TopologyError::LastVoter { node_id: n(1) })
        );
        assert_eq!(t, before);
        // A learner may go even while only one voter remains.
        t.apply(&TopologyChange::StartDecommission { node_id: n(2) })
            .unwrap();
        // With a second voter, the first may go; then the second is the last.
        let mut t = with_nodes(&[(2, VOTER)]);
        t.apply(&decommission).unwrap();
        assert_eq!(t.voters().collect::<Vec<_>>(), [n(2)]);
        assert_eq!(
            t.apply(&TopologyChange::StartDecommission { node_id: n(2) }),
            Err(TopologyError::LastVoter { node_id: n(2) })
        );
    }

    #[test]
    fn errors_read_as_sentences() {
        let err = TopologyError::IllegalTransition {
            node_id: n(2),
            from: NodeState::Draining,
            change: "Activate".into(),
        };
        assert_eq!(
            err.to_string(),
            "Activate does not apply to node n2 because it is draining"
        );
    }

    fn change_strategy() -> impl Strategy<Value = TopologyChange> {
        let id = (1u64..6).prop_map(n);
        prop_oneof![
            (id.clone(), "[a-z0-9.:]{0,12}")
                .prop_map(|(node_id, addr)| TopologyChange::Join { node_id, addr }),
            id.clone()
                .prop_map(|node_id| TopologyChange::Activate { node_id }),
            id.clone()
                .prop_map(|node_id| TopologyChange::PromoteToVoter { node_id }),
            id.clone()
                .prop_map(|node_id| TopologyChange::StartDecommission { node_id }),
            id.clone()
                .prop_map(|node_id| TopologyChange::FinishDecommission { node_id }),
            id.prop_map(|node_id| TopologyChange::Leave { node_id }),
        ]
    }

    proptest! {
        #[test]
        fn topology_change_serde_round_trips(change in change_strategy()) {
            let bytes = postcard::to_allocvec(&change).unwrap();
            prop_assert_eq!(postcard::from_bytes::<TopologyChange>(&bytes).unwrap(), change);
        }

        /// Random sequences: a rejection changes nothing, retired ids stay
        /// retired and out of the node map, and the cluster always keeps a voter.
        #[test]
        fn random_changes_keep_invariants(changes in prop::collection::vec(change_strategy(), 0..60)) {
            let mut t = Topology::bootstrap(n(1), "a:1".into());
            for change in &changes {
                let before = t.clone();
                if t.apply(change).is_err() {
                    prop_assert_eq!(&t, &before);
                }
                for id in before.retired.iter() {
                    prop_assert!(t.is_retired(*id));
                }
                prop_assert!(t.retired.iter().all(|id| t.get(*id).is_none()));
                prop_assert!(t.voters().count() >= 1);
            }
            let bytes = postcard::to_allocvec(&t).unwrap();
            prop_assert_eq!(postcard::from_bytes::<Topology>(&bytes).unwrap(), t);
        }
    }
}
