//! vShard moves between data groups: copy, tail, fence (the bounded write
//! pause), final catch-up and reassignment.

use super::{commit, control, Executor, StepError, MAX_TAIL_ROUNDS};
use crate::core::entry::{BatchEntries, MetadataEntry};
use crate::core::ids::MigrationId;
use crate::core::migration::{
    MigrationCheckpointPayload, MigrationPhaseTag, MigrationRow, VShardMovePayload,
};
use crate::core::routing::RoutingChange;
use crate::core::vshard_gate::GroupControl;
use std::time::Duration;

impl Executor {
    pub(super) async fn vshard_step(
        &mut self,
        id: MigrationId,
        phase: MigrationPhaseTag,
        mut p: VShardMovePayload,
    ) -> Result<Option<(MigrationPhaseTag, MigrationCheckpointPayload)>, StepError> {
        use MigrationPhaseTag as P;
        let wrap = MigrationCheckpointPayload::VShard;
        let (v, a, b) = (p.vshard_id, p.source_group, p.target_group);
        match phase {
            P::Copy | P::Tail => {
                let (index, data) = self.node.export_vshard(a, v).await?;
                let crc = crc32c::crc32c(&data);
                let claim = self.claims.get_mut(&id).expect("claimed");
                let unchanged = claim.last_copy == Some(crc);
                if phase == P::Tail && (unchanged || claim.tail_rounds >= MAX_TAIL_ROUNDS) {
                    p.tail_index = index;
                    return self.step_to(id, P::Fence, wrap(p), Vec::new()).await;
                }
                claim.tail_rounds += u32::from(phase == P::Tail);
                self.ingest(&p, id, data, None).await?;
                if let Some(claim) = self.claims.get_mut(&id) {
                    claim.last_copy = Some(crc);
                }
                if phase == P::Copy {
                    p.copy_index = index;
                    return self.step_to(id, P::Tail, wrap(p), Vec::new()).await;
                }
                Ok(None)
            }
            P::Fence => {
                control(
                    &self.node,
                    a,
                    GroupControl::Fence {
                        vshard: v,
                        migration: id,
                    },
                )
                .await?;
                p.fenced_at_ms = Some(self.node.now_ms());
                self.step_to(id, P::FinalCatchUp, wrap(p), Vec::new()).await
            }
            P::FinalCatchUp => {
                let state = self.node.metadata_local().await?;
                if state.routing.lookup(v).group != a {
                    return Err(StepError::Refused(format!(
                        "vShard {v} left group {a} during its move"
                    )));
                }
                let epoch = state.routing.epoch();
                let (_, data) = self.node.export_vshard(a, v).await?;
                self.check_pause(&p)?;
                self.ingest(&p, id, data, Some(epoch)).await?;
                self.step_to(id, P::Reassign, wrap(p), Vec::new()).await
            }
            P::Reassign => {
                let state = self.node.metadata_local().await?;
                if state.routing.lookup(v).group == a {
                    self.check_pause(&p)?;
                    let route = state
                        .routing
                        .group(b)
                        .ok_or_else(|| StepError::Refused(format!("group {b} no longer exists")))?;
                    let leaseholder = route.leader.or_else(|| route.voters.first().copied());
                    let Some(leaseholder) = leaseholder else {
                        return Err(StepError::Refused(format!("group {b} has no voters")));
                    };
                    p.write_pause_us = Some(pause_us(&p, self.node.now_ms()));
                    // The reassignment and the measured pause commit together,
                    // under the next attempt so the upsert keeps the pause.
                    let attempt = {
                        let claim = self.claims.get_mut(&id).expect("claimed");
                        claim.attempt += 1;
                        claim.attempt
                    };
                    let row =
                        MigrationRow::new(id, P::Reassign, attempt, &wrap(p), self.node.now_ms());
                    commit(
                        &self.node,
                        MetadataEntry::Batch {
                            entries: BatchEntries(vec![
                                MetadataEntry::RoutingChange(RoutingChange::ReassignVShard {
                                    vshard_id: v,
                                    new_group_id: b,
                                    new_leaseholder_node_id: leaseholder,
                                }),
                                MetadataEntry::from(&row),
                            ]),
                        },
                    )
                    .await?;
                    crate::probe!("migration.vshard_reassigned");
                } else if state.routing.lookup(v).group != b {
                    return Err(StepError::Refused(format!(
                        "vShard {v} is in neither group {a} nor {b}"
                    )));
                } else if p.write_pause_us.is_none() {
                    p.write_pause_us = Some(pause_us(&p, self.node.now_ms()));
                }
                control(
                    &self.node,
                    a,
                    GroupControl::Release {
                        vshard: v,
                        migration: id,
                    },
                )
                .await?;
                self.step_to(id, P::Complete, wrap(p), Vec::new()).await
            }
            other => Err(StepError::Refused(format!(
                "a vShard move has no phase {other:?}"
            ))),
        }
    }

    /// Hands the target group a copy of the vShard: `serve_after_epoch` is
    /// `None` for a copy taken while the source still serves writes, and
    /// the routing epoch for the final copy, taken behind the fence.
    async fn ingest(
        &self,
        p: &VShardMovePayload,
        id: MigrationId,
        data: Vec<u8>,
        serve_after_epoch: Option<u64>,
    ) -> Result<(), StepError> {
        let step = GroupControl::Ingest {
            vshard: p.vshard_id,
            migration: id,
            data,
            serve_after_epoch,
        };
        control(&self.node, p.target_group, step).await
    }

    /// Aborts (with the fence lifted) a move whose write pause already
    /// reached its budget.
    fn check_pause(&self, p: &VShardMovePayload) -> Result<(), StepError> {
        let pause = Duration::from_micros(pause_us(p, self.node.now_ms()));
        if pause >= self.config.write_pause_budget {
            crate::probe!("migration.pause_budget_exceeded");
            return Err(StepError::Refused(format!(
                "vShard {} was fenced for {pause:?}, reaching the {:?} write-pause budget",
                p.vshard_id, self.config.write_pause_budget
            )));
        }
        Ok(())
    }
}

/// The write pause of a fenced vShard move so far, in microseconds.
fn pause_us(p: &VShardMovePayload, now_ms: u64) -> u64 {
    p.fenced_at_ms.map_or(0, |fenced| {
        now_ms.saturating_sub(fenced).saturating_mul(1000)
    })
}
