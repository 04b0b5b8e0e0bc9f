//! The reconciler: makes this node host what routing says it hosts, moves
//! each group it leads one membership step towards what group 0 wants,
//! deletes replicas that left their group, and, on the group-0 leader,
//! proposes the topology, placement and token steps that are due.

use super::{
    take_where, Command, Runtime, StartError, CATCH_UP_LAG, DESTROY_CHECK_INTERVAL,
    MAX_METADATA_VOTERS,
};
use crate::core::codec;
use crate::core::entry::MetadataEntry;
use crate::core::ids::{GroupId, NodeId};
use crate::node::data_group::DataGroup;
use crate::node::membership::{next_change, Wanted};
use crate::node::rpc::{NodeError, Request, Response};
use crate::raft::engine::{conf_change, EngineError, GroupBootstrap};
use raft::StateRole;
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio::time::Instant;

impl Runtime {
    /// Makes this node host what routing says it hosts, and, where it leads,
    /// moves each group's Raft membership one step towards what group 0 wants.
    pub(super) fn reconcile(&mut self) {
        self.check_retirement();
        let Some(cache) = &self.metadata else {
            return;
        };
        let state = cache.state();
        let mut to_host = Vec::new();
        let mut hints = Vec::new();
        let mut wanted = vec![(
            GroupId::METADATA,
            self.engine
                .conf_state(GroupId::METADATA)
                .map(|cs| Wanted::from_topology(&state.topology, &cs)),
        )];
        // A decommissioned (or since removed) node has left every data
        // group's configuration: decommission finishes only once every
        // replica has moved off. Its peers may no longer answer it, so it
        // asks none of them. One that was away meanwhile learns it from its
        // peers, its own routing being stale for good (`retirement`).
        let retired = self.is_retired();
        let replayed = cache.applied_index() >= self.metadata_replay_to;
        if !replayed {
            crate::probe!("replica.removal_waits_for_replay");
        }
        // Replicas routing no longer lists, with the voters to ask whether
        // the replica has left the group's Raft configuration.
        let removed: Vec<(GroupId, Vec<NodeId>)> = self
            .engine
            .groups()
            .filter(|&g| !g.is_metadata() && (retired || replayed))
            .filter_map(|g| match state.routing.group(g) {
                _ if retired => Some((g, Vec::new())),
                Some(route) if route.is_member(self.me) => None,
                Some(route) => Some((g, route.voters.clone())),
                None => Some((g, Vec::new())),
            })
            .collect();
        // A sleeping group's configuration, leader and peers' progress are
        // all still, so only new metadata can give it something to do: with
        // none since the last pass, it is skipped (1024 quiet groups are not
        // walked every tick).
        let fresh = self.reconciled_metadata != Some(cache.applied_index());
        self.reconciled_metadata = Some(cache.applied_index());
        for (group, route) in state.routing.groups() {
            if route.is_member(self.me) && !retired && !self.engine.hosts(group) {
                // A founder still a voter writes the group's first snapshot
                // itself (the engine refuses if it once had a replica); any
                // other member waits for its leader's.
                let founders = route
                    .starts_from_scratch(self.me)
                    .then(|| route.founders.clone());
                to_host.push((group, founders));
            }
            if !fresh && self.engine.status(group).is_some_and(|s| s.asleep) {
                continue;
            }
            wanted.push((group, Some(Wanted::from_route(route))));
            if let Some(hint) = route.leader {
                hints.push((group, hint));
            }
        }
        let metadata_leader = self
            .engine
            .status(GroupId::METADATA)
            .is_some_and(|s| s.role == StateRole::Leader);
        self.topology_inflight
            .retain_mut(|rx| matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
        let topology_steps = if metadata_leader && self.topology_inflight.is_empty() {
            let mut steps = self.topology_steps();
            steps.extend(self.placement_steps());
            steps.extend(self.token_steps());
            steps
        } else {
            Vec::new()
        };
        for (group, hint) in hints {
            self.follow_leader_hint(group, hint);
        }
        for (group, founders) in to_host {
            let bootstrap = founders.map(|voters| {
                crate::probe!("group.founded");
                GroupBootstrap {
                    voters,
                    data: DataGroup::new((self.factory)(group)).snapshot(),
                }
            });
            match self.host(group, bootstrap) {
                Ok(()) => {}
                Err(StartError::Engine(e @ EngineError::Storage(_))) => self.storage_failed(e),
                Err(e) => {
                    tracing::error!(node = %self.me, %group, error = %e, "cannot host group")
                }
            }
        }
        for (group, voters) in removed {
            self.check_removed(group, voters);
        }
        for (group, wanted) in wanted {
            let Some(wanted) = wanted else { continue };
            let leads = self
                .engine
                .status(group)
                .is_some_and(|s| s.role == StateRole::Leader);
            if !leads || self.engine.conf_change_pending(group) {
                continue;
            }
            let Some(current) = self.engine.conf_state(group) else {
                continue;
            };
            if !wanted.voters.contains(&self.me) {
                // This leader is to be demoted or removed: hand leadership
                // to a wanted voter first (`next_change` never demotes it).
                let successor =
                    wanted.voters.iter().copied().find(|&v| {
                        current.get_voters().contains(&v.get()) && self.caught_up(group, v)
                    });
                if let Some(successor) = successor {
                    crate::probe!("membership.leader_steps_aside");
                    let _ = self.engine.transfer_leader(group, successor);
                }
            }
            let caught_up = |peer: NodeId| self.nearly_caught_up(group, peer);
            if let Some(changes) = next_change(&current, &wanted, self.me, caught_up) {
                match changes.len() {
                    0 => crate::probe!("membership.leave_joint"),
                    1 => crate::probe!("membership.simple_change"),
                    _ => crate::probe!("membership.enter_joint"),
                }
                tracing::info!(node = %self.me, %group, ?changes, "membership change");
                let _ = self
                    .engine
                    .propose_conf_change(group, Vec::new(), conf_change(&changes));
            }
        }
        for entry in topology_steps {
            let (tx, rx) = oneshot::channel();
            self.on_command(Command::ProposeMetadata { entry, reply: tx });
            self.topology_inflight.push(rx);
        }
    }

    /// A replica routing no longer lists may be deleted only once it has
    /// left the group's Raft configuration too: until then it may still
    /// count towards a quorum. Routing removes a replica only after the
    /// group demoted it, but this replica's own view of the configuration
    /// may lag, so the group's leader is asked (at most once per
    /// [`DESTROY_CHECK_INTERVAL`]). A group routing no longer knows at all,
    /// or any group of a retired node, has no configuration left to wait
    /// for (`voters` is empty).
    fn check_removed(&mut self, group: GroupId, voters: Vec<NodeId>) {
        if voters.is_empty() {
            self.destroy_replica(group);
            return;
        }
        let now = Instant::now();
        if self
            .destroy_checks
            .get(&group)
            .is_some_and(|&asked| now < asked + DESTROY_CHECK_INTERVAL)
        {
            return;
        }
        self.destroy_checks.insert(group, now);
        let transport = Arc::clone(&self.transport);
        let own = self.own_commands.clone();
        let me = self.me;
        let timeout = self.config.request_timeout;
        tokio::spawn(async move {
            let ask = codec::encode(&Request::GroupMembers { group });
            for peer in voters.into_iter().filter(|&p| p != me) {
                let Ok(bytes) = transport.call(peer, ask.clone(), timeout).await else {
                    continue;
                };
                // Only the leader answers, and only once a quorum confirmed
                // its leadership: one cut off from the group may still run
                // a configuration the group has left (seed 17065: a stale
                // leader's status said this node was gone, and the group,
                // which had added it back as a voter, lost its quorum).
                if let Ok(Response::Members(members)) = codec::decode::<Response>(&bytes) {
                    if !members.contains(&me) {
                        let _ = own.send(Command::DestroyReplica { group });
                    }
                    return;
                }
            }
        });
    }

    /// Deletes this node's replica of `group`, if routing still does not
    /// list it (a move back may have re-added it since the check) or the
    /// node was retired (its routing may be stale for good).
    pub(super) fn destroy_replica(&mut self, group: GroupId) {
        let listed = !self.retired
            && self.metadata.as_ref().is_none_or(|c| {
                c.state()
                    .routing
                    .group(group)
                    .is_some_and(|r| r.is_member(self.me))
            });
        if listed || !self.engine.hosts(group) {
            return;
        }
        match self.engine.destroy_group(group) {
            Ok(()) => {
                crate::probe!("replica.destroyed");
                tracing::info!(node = %self.me, %group, "replica removed from its group; data deleted");
                self.machines.remove(&group);
                self.failed.remove(&group);
                self.destroy_checks.remove(&group);
                for p in take_where(&mut self.proposals, |p| p.group == group) {
                    let _ = p.reply.send(Err(NodeError::NotLeader {
                        group,
                        leader: None,
                    }));
                }
                for r in take_where(&mut self.reads, |r| r.group == group) {
                    r.reply.fail(NodeError::NotLeader {
                        group,
                        leader: None,
                    });
                }
            }
            Err(e @ EngineError::Storage(_)) => self.storage_failed(e),
            Err(e) => {
                tracing::warn!(node = %self.me, %group, error = %e, "cannot delete a removed replica")
            }
        }
    }

    /// On the leader: whether `peer` holds every committed entry of `group`.
    fn caught_up(&self, group: GroupId, peer: NodeId) -> bool {
        let commit = self.engine.status(group).map_or(u64::MAX, |s| s.commit);
        self.engine
            .matched(group, peer)
            .is_some_and(|m| m >= commit)
    }

    /// On the leader: whether `peer` holds `group`'s log up to at most
    /// [`CATCH_UP_LAG`] entries behind the commit index (and some of it):
    /// close enough to activate a joined node or promote a learner.
    fn nearly_caught_up(&self, group: GroupId, peer: NodeId) -> bool {
        let commit = self.engine.status(group).map_or(u64::MAX, |s| s.commit);
        self.engine
            .matched(group, peer)
            .is_some_and(|m| m > 0 && m.saturating_add(CATCH_UP_LAG) >= commit)
    }

    /// Where this node leads `group` but routing names another voter as its
    /// leader (a `LeadershipTransfer` or `ReassignVShard`), hands leadership
    /// over — once the target has every committed entry, so a dead or
    /// lagging target is never chosen (raft-rs would stall writes for an
    /// election timeout waiting for it).
    fn follow_leader_hint(&mut self, group: GroupId, hint: NodeId) {
        let Some(status) = self.engine.status(group) else {
            return;
        };
        let is_voter = self
            .engine
            .conf_state(group)
            .is_some_and(|cs| cs.get_voters().contains(&hint.get()));
        if status.role == StateRole::Leader
            && hint != self.me
            && is_voter
            && self.caught_up(group, hint)
        {
            crate::probe!("membership.transfer_to_routing_leader");
            let _ = self.engine.transfer_leader(group, hint);
        }
    }

    /// On the group-0 leader: activate joining nodes that caught up, and
    /// promote learners while group 0 has fewer than five voters.
    fn topology_steps(&self) -> Vec<MetadataEntry> {
        use crate::core::topology::{Membership, NodeState, TopologyChange};
        let Some(cache) = &self.metadata else {
            return Vec::new();
        };
        let topology = &cache.state().topology;
        let mut voters = topology.voters().count();
        let mut steps = Vec::new();
        for (node, info) in topology.nodes() {
            match info.state {
                NodeState::Joining if self.nearly_caught_up(GroupId::METADATA, node) => {
                    steps.push(TopologyChange::Activate { node_id: node });
                }
                NodeState::Active(Membership::Learner) if voters < MAX_METADATA_VOTERS => {
                    voters += 1;
                    steps.push(TopologyChange::PromoteToVoter { node_id: node });
                }
                _ => {}
            }
        }
        steps
            .into_iter()
            .map(MetadataEntry::TopologyChange)
            .collect()
    }

    /// On the group-0 leader: add a replica to each data group below the
    /// replication factor, as a learner promoted in the same entry (the
    /// membership reconciler adds it to Raft as a learner first anyway).
    fn placement_steps(&self) -> Vec<MetadataEntry> {
        use crate::core::routing::RoutingChange;
        let Some(cache) = &self.metadata else {
            return Vec::new();
        };
        let state = cache.state();
        let rf = usize::try_from(state.replication_factor).unwrap_or(usize::MAX);
        crate::core::placement::next_replicas(&state.topology, &state.routing, rf)
            .into_iter()
            .map(|(group_id, node_id)| {
                crate::probe!("placement.replica_added");
                MetadataEntry::Batch {
                    entries: crate::core::entry::BatchEntries(vec![
                        MetadataEntry::RoutingChange(RoutingChange::AddLearner {
                            group_id,
                            node_id,
                        }),
                        MetadataEntry::RoutingChange(RoutingChange::PromoteLearner {
                            group_id,
                            node_id,
                        }),
                    ]),
                }
            })
            .collect()
    }

    /// On the group-0 leader: expire tokens past their expiry, and revert
    /// tokens stuck `InFlight` past the dead-man timer so that a join
    /// interrupted by a crash does not burn the token.
    fn token_steps(&self) -> Vec<MetadataEntry> {
        use crate::core::token::{JoinTokenTransitionKind, TokenState};
        let Some(cache) = &self.metadata else {
            return Vec::new();
        };
        let now = self.clock.now_ms();
        let dead_man_ms = u64::try_from(self.config.join_dead_man.as_millis()).unwrap_or(u64::MAX);
        let step = |token_hash, transition| MetadataEntry::JoinTokenTransition {
            token_hash,
            transition,
            ts_ms: now,
        };
        cache
            .state()
            .tokens
            .iter()
            .filter_map(|(hash, record)| match record.state {
                TokenState::Issued | TokenState::InFlight if now >= record.expires_at_ms => {
                    crate::probe!("token.expired");
                    Some(step(*hash, JoinTokenTransitionKind::Expire))
                }
                TokenState::InFlight if now >= record.updated_at_ms.saturating_add(dead_man_ms) => {
                    crate::probe!("token.dead_man_revert");
                    Some(step(*hash, JoinTokenTransitionKind::Revert))
                }
                _ => None,
            })
            .collect()
    }
}
