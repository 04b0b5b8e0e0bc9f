//! Replica moves: a learner added on the target, caught up, promoted, led
//! and the source removed, each phase one idempotent step.

use super::{commit, Executor, StepError, CATCH_UP_LAG, TRANSFER_WATCH};
use crate::core::entry::MetadataEntry;
use crate::core::ids::{MigrationId, NodeId};
use crate::core::migration::{MigrationCheckpointPayload, MigrationPhaseTag, ReplicaMovePayload};
use crate::core::routing::RoutingChange;
use tokio::time::Instant;

impl Executor {
    pub(super) async fn replica_step(
        &mut self,
        id: MigrationId,
        phase: MigrationPhaseTag,
        mut p: ReplicaMovePayload,
    ) -> Result<Option<(MigrationPhaseTag, MigrationCheckpointPayload)>, StepError> {
        use MigrationPhaseTag as P;
        let state = self.node.metadata_local().await?;
        let route = state
            .routing
            .group(p.group_id)
            .ok_or_else(|| StepError::Refused(format!("group {} no longer exists", p.group_id)))?
            .clone();
        let g = p.group_id;
        let wrap = MigrationCheckpointPayload::Replica;
        match phase {
            P::AddLearner => {
                let mut extra = Vec::new();
                if !route.is_member(p.target) {
                    extra.push(MetadataEntry::RoutingChange(RoutingChange::AddLearner {
                        group_id: g,
                        node_id: p.target,
                    }));
                }
                self.step_to(id, P::CatchUp, wrap(p), extra).await
            }
            P::CatchUp => {
                let mut ask: Vec<NodeId> = route.leader.into_iter().collect();
                ask.extend(route.voters.iter().copied());
                let view = self.leader_view(g, &ask).await?;
                let matched = view
                    .peers
                    .iter()
                    .find(|peer| peer.node == p.target)
                    .map_or(0, |peer| peer.matched);
                let in_config =
                    view.learners.contains(&p.target) || view.voters.contains(&p.target);
                if !in_config || matched == 0 || matched + CATCH_UP_LAG < view.commit {
                    return Err(StepError::Waiting(format!(
                        "node {} has {matched} of group {g}'s {} entries",
                        p.target, view.commit
                    )));
                }
                p.caught_up_index = matched;
                self.step_to(id, P::PromoteLearner, wrap(p), Vec::new())
                    .await
            }
            P::PromoteLearner => {
                let mut extra = Vec::new();
                if route.is_learner(p.target) {
                    extra.push(MetadataEntry::RoutingChange(
                        RoutingChange::PromoteLearner {
                            group_id: g,
                            node_id: p.target,
                        },
                    ));
                }
                if route.is_voter(p.source) {
                    extra.push(MetadataEntry::RoutingChange(RoutingChange::DemoteVoter {
                        group_id: g,
                        node_id: p.source,
                    }));
                }
                self.step_to(id, P::LeadershipTransfer, wrap(p), extra)
                    .await
            }
            P::LeadershipTransfer => {
                let view = self.leader_view(g, &route.voters).await?;
                let settled = view.voters_outgoing.is_empty()
                    && view.voters.contains(&p.target)
                    && !view.voters.contains(&p.source);
                if !settled {
                    return Err(StepError::Waiting(format!(
                        "group {g}'s configuration is {:?} (outgoing {:?})",
                        view.voters, view.voters_outgoing
                    )));
                }
                let mut pause_us = 0;
                if p.source_was_leader && view.leader != Some(p.target) {
                    let claim = self.claims.get_mut(&id).expect("claimed");
                    let started = *claim.transfer_started.get_or_insert_with(Instant::now);
                    if route.leader != Some(p.target) {
                        commit(
                            &self.node,
                            MetadataEntry::RoutingChange(RoutingChange::LeadershipTransfer {
                                group_id: g,
                                new_leader_node_id: p.target,
                            }),
                        )
                        .await?;
                    }
                    // Watched closely rather than at the next poll, so that
                    // the pause is measured at the leadership change itself.
                    loop {
                        if started.elapsed() >= self.config.write_pause_budget {
                            crate::probe!("migration.pause_budget_exceeded");
                            return Err(StepError::Refused(format!(
                                "leadership of group {g} did not reach node {} within the {:?} write-pause budget",
                                p.target, self.config.write_pause_budget
                            )));
                        }
                        tokio::time::sleep(TRANSFER_WATCH).await;
                        // Only the target's own word counts: asking it
                        // alone keeps a dead voter out of this tight loop.
                        if self.leader_view(g, &[p.target]).await.is_ok() {
                            break;
                        }
                    }
                }
                if let Some(started) = self.claims.get(&id).and_then(|c| c.transfer_started) {
                    pause_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
                }
                p.write_pause_us = Some(pause_us);
                self.step_to(id, P::Cutover, wrap(p), Vec::new()).await
            }
            P::Cutover => {
                // Routing records the new members (done) and the leader the
                // group really has now, so that nodes outside the group find it.
                let view = self.leader_view(g, &route.voters).await?;
                let mut extra = Vec::new();
                if let Some(leader) = view
                    .leader
                    .filter(|&l| route.leader != Some(l) && l != p.source)
                {
                    extra.push(MetadataEntry::RoutingChange(
                        RoutingChange::LeadershipTransfer {
                            group_id: g,
                            new_leader_node_id: leader,
                        },
                    ));
                }
                if route.is_member(p.source) {
                    extra.push(MetadataEntry::RoutingChange(RoutingChange::RemoveMember {
                        group_id: g,
                        node_id: p.source,
                    }));
                }
                self.step_to(id, P::Complete, wrap(p), extra).await
            }
            other => Err(StepError::Refused(format!(
                "a replica move has no phase {other:?}"
            ))),
        }
    }
}
