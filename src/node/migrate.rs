//! The migration executor (DESIGN.md §5): drives every row of the
//! migration table to `Complete` or aborts it, and carries out the
//! decommissions and ghost-stub expiry that depend on moves.
//!
//! It runs on every node and acts only while the node leads group 0, so a
//! crash or a leadership change of the coordinator hands every migration to
//! the next leader: there is no other state than the rows. A new
//! coordinator *claims* each row it finds by checkpointing it again with
//! the next attempt number, then resumes it from its phase; a row claimed
//! too often, or stuck in a phase past its timeout, is aborted with its
//! compensations. Every step is idempotent (routing changes are checked
//! against the table, data-group steps against the gates), so repeating the
//! step that was under way when the last coordinator died is always safe.
//!
//! Each phase's Raft step is committed together with the next phase's
//! checkpoint in one `Batch`, so a row never claims a step that did not
//! happen, nor misses one that did.

use crate::core::entry::{BatchEntries, MetadataEntry};
use crate::core::ids::{GroupId, MigrationId, NodeId};
use crate::core::migration::{
    compensations, MigrationCheckpointPayload, MigrationPhaseTag, MigrationRow, ReplicaMovePayload,
    VShardMovePayload,
};
use crate::core::rebalance::{plan_decommission, ClusterView, PlannedMove};
use crate::core::routing::RoutingChange;
use crate::core::topology::{NodeState, TopologyChange};
use crate::core::vshard_gate::{Gate, GroupControl};
use crate::node::rpc::{GroupView, NodeError, Outcome};
use crate::node::Node;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// A test hook (the simulator's crash points): asked as a coordinator claims
/// a row, with the claiming node and the row's phase. `true` stalls that
/// coordinator's executor for good, so that the test can kill the node at
/// exactly that point; the next coordinator must then resume the row.
#[derive(Clone)]
pub struct CrashPoint(pub Arc<dyn Fn(NodeId, MigrationPhaseTag) -> bool + Send + Sync>);

impl std::fmt::Debug for CrashPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CrashPoint(..)")
    }
}

/// How migrations run; the defaults suit a real cluster.
#[derive(Clone, Debug)]
pub struct MigrationConfig {
    /// The write pause a move must stay below (DESIGN.md §5); a move whose
    /// pause reaches it aborts and the source serves again, so a zero budget
    /// allows no pause at all.
    pub write_pause_budget: Duration,
    /// A phase that waits longer than this for its condition (a learner
    /// catching up, a configuration settling) aborts the move if it still
    /// can, so that nothing stays half-moved forever.
    pub phase_timeout: Duration,
    /// How often the coordinator looks at the table.
    pub poll: Duration,
    /// A row claimed by this many coordinators is aborted.
    pub max_attempts: u32,
    /// How long a ghost stub keeps redirecting after its move completed.
    pub ghost_ttl: Duration,
    /// Moves in flight at once, cluster-wide, for decommission.
    pub max_in_flight: usize,
    /// Never set outside tests.
    pub crash_point: Option<CrashPoint>,
}

impl Default for MigrationConfig {
    fn default() -> Self {
        MigrationConfig {
            write_pause_budget: Duration::from_millis(500),
            phase_timeout: Duration::from_secs(60),
            poll: Duration::from_millis(100),
            max_attempts: 10,
            ghost_ttl: Duration::from_secs(600),
            max_in_flight: 2,
            crash_point: None,
        }
    }
}

/// How often the coordinator looks at a group whose leadership is moving:
/// the replica move's write pause is measured to this resolution.
const TRANSFER_WATCH: Duration = Duration::from_millis(5);
/// A learner within this many entries of its leader's commit has caught up.
const CATCH_UP_LAG: u64 = 16;
/// How often the coordinator looks for gates of migrations that ended.
const ORPHAN_SWEEP_INTERVAL: Duration = Duration::from_secs(1);
/// Copies of a vShard before the fence, at most: each re-copy shortens the
/// final one only if the vShard stopped changing.
const MAX_TAIL_ROUNDS: u32 = 3;

/// Why a step did not finish. Every one is retried at the next poll except
/// `Stale` (another coordinator moved the row on) and `Refused` (the step
/// can never succeed), which lead to re-reading the row and to an abort.
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    #[error(transparent)]
    Node(#[from] NodeError),
    #[error("the checkpoint was refused: {0}")]
    Stale(String),
    #[error("{0}")]
    Refused(String),
    #[error("waiting: {0}")]
    Waiting(String),
}

/// Starts a move: commits its first checkpoint (the applier refuses it if
/// the move does not fit the current routing or a group is busy).
pub async fn start_move(node: &Node, planned: PlannedMove) -> Result<MigrationId, StepError> {
    let state = node.metadata_local().await?;
    let (phase, payload) = match planned {
        PlannedMove::Replica {
            group,
            source,
            target,
        } => {
            let leader = state.routing.group(group).and_then(|r| r.leader);
            (
                MigrationPhaseTag::AddLearner,
                MigrationCheckpointPayload::Replica(ReplicaMovePayload {
                    group_id: group,
                    source,
                    target,
                    source_was_leader: leader == Some(source),
                    caught_up_index: 0,
                    write_pause_us: None,
                }),
            )
        }
        PlannedMove::VShard { vshard, from, to } => (
            MigrationPhaseTag::Copy,
            MigrationCheckpointPayload::VShard(VShardMovePayload {
                vshard_id: vshard,
                source_group: from,
                target_group: to,
                copy_index: 0,
                tail_index: 0,
                fenced_at_ms: None,
                write_pause_us: None,
            }),
        ),
        PlannedMove::Leader { .. } => {
            return Err(StepError::Refused(
                "a leadership move is a routing change, not a migration".into(),
            ))
        }
    };
    let mut seed = [0u8; 32];
    seed.copy_from_slice(&node.entropy().await?);
    let mut bytes = [0u8; 16];
    rand_chacha::ChaCha8Rng::from_seed(seed).fill_bytes(&mut bytes);
    let id = MigrationId::from_random_bytes(bytes);
    let row = MigrationRow::new(id, phase, 0, &payload, node.now_ms());
    commit(node, MetadataEntry::from(&row)).await?;
    crate::probe!("migration.started");
    probe_phase(phase);
    Ok(id)
}

/// Carries out a planned move: a leadership move commits at once; a
/// replica or vShard move starts a migration the executor then drives.
pub async fn carry_out(
    node: &Node,
    planned: PlannedMove,
) -> Result<Option<MigrationId>, StepError> {
    match planned {
        PlannedMove::Leader { group, to } => {
            commit(
                node,
                MetadataEntry::RoutingChange(RoutingChange::LeadershipTransfer {
                    group_id: group,
                    new_leader_node_id: to,
                }),
            )
            .await?;
            Ok(None)
        }
        other => start_move(node, other).await.map(Some),
    }
}

/// Commits `entry` to group 0; a deterministic rejection is an error.
async fn commit(node: &Node, entry: MetadataEntry) -> Result<(), StepError> {
    let committed = node.propose_metadata(entry).await?;
    match committed.outcome {
        Outcome::Metadata(None) => Ok(()),
        Outcome::Metadata(Some(reason)) => Err(StepError::Stale(reason.to_string())),
        other => Err(StepError::Refused(format!("unexpected outcome {other:?}"))),
    }
}

/// Runs a vShard-move step in a data group; a refusal by its gates is final.
async fn control(node: &Node, group: GroupId, step: GroupControl) -> Result<(), StepError> {
    match node.propose_control(group, step).await?.outcome {
        Outcome::Control(None) => Ok(()),
        Outcome::Control(Some(refusal)) => Err(StepError::Refused(refusal.to_string())),
        other => Err(StepError::Refused(format!("unexpected outcome {other:?}"))),
    }
}

/// What this coordinator remembers of a row it claimed.
struct Claim {
    attempt: u32,
    phase: MigrationPhaseTag,
    phase_started: Instant,
    /// CRC32C of the last copy of the vShard ingested at the target.
    last_copy: Option<u32>,
    tail_rounds: u32,
    /// When the leadership transfer of a replica move was asked for.
    transfer_started: Option<Instant>,
}

pub struct Executor {
    node: Node,
    config: MigrationConfig,
    claims: BTreeMap<MigrationId, Claim>,
    last_sweep: Option<Instant>,
}

/// Runs the executor until the node stops.
pub async fn run(node: Node, config: MigrationConfig) {
    let mut executor = Executor {
        node,
        config,
        claims: BTreeMap::new(),
        last_sweep: None,
    };
    loop {
        tokio::time::sleep(executor.config.poll).await;
        match executor.round().await {
            Err(NodeError::Stopped) => return,
            Err(e) => tracing::debug!(error = %e, "migration executor round failed"),
            Ok(()) => {}
        }
    }
}

impl Executor {
    /// One look at the table, if this node leads group 0.
    async fn round(&mut self) -> Result<(), NodeError> {
        let status = self.node.status().await?;
        let leads = status
            .groups
            .iter()
            .any(|g| g.group == GroupId::METADATA && g.is_leader);
        if !leads {
            // Whoever leads now claims the rows anew.
            self.claims.clear();
            return Ok(());
        }
        let state = self.node.metadata_local().await?;
        self.claims.retain(|id, _| {
            state
                .migrations
                .get(id)
                .is_some_and(|r| r.phase != MigrationPhaseTag::Complete)
        });
        let open: Vec<MigrationRow> = state
            .migrations
            .values()
            .filter(|row| row.phase != MigrationPhaseTag::Complete)
            .cloned()
            .collect();
        for row in open {
            let id = row.migration_id;
            if let Err(e) = self.advance(row).await {
                match e {
                    StepError::Node(NodeError::Stopped) => return Err(NodeError::Stopped),
                    StepError::Waiting(why) => tracing::trace!(%id, %why, "migration waiting"),
                    StepError::Stale(why) => {
                        tracing::debug!(%id, %why, "migration row moved on; re-reading");
                        self.claims.remove(&id);
                    }
                    other => {
                        tracing::debug!(%id, error = %other, "migration step failed; retrying")
                    }
                }
            }
        }
        self.clear_orphan_gates(&state).await;
        self.expire_ghosts(&state).await;
        self.decommission(&state).await;
        Ok(())
    }

    /// Claims the row if needed, then runs its steps until one must wait.
    async fn advance(&mut self, row: MigrationRow) -> Result<(), StepError> {
        let id = row.migration_id;
        let payload = match row.verify() {
            Ok(payload) => payload,
            // The applier fail-stops group 0 on a corrupt checkpoint, so a
            // row that does not verify cannot be here; never act on one.
            Err(e) => return Err(StepError::Refused(e.to_string())),
        };
        let fresh = !self.claims.contains_key(&id);
        if fresh {
            if row.attempt >= self.config.max_attempts {
                crate::probe!("migration.aborted_after_attempts");
                return self.abort(&row, &payload, "claimed too many times").await;
            }
            if row.attempt > 0 {
                probe_resumed(row.phase);
            }
            let claimed =
                MigrationRow::new(id, row.phase, row.attempt + 1, &payload, self.node.now_ms());
            commit(&self.node, MetadataEntry::from(&claimed)).await?;
            self.claims.insert(
                id,
                Claim {
                    attempt: claimed.attempt,
                    phase: row.phase,
                    phase_started: Instant::now(),
                    last_copy: None,
                    tail_rounds: 0,
                    transfer_started: None,
                },
            );
            if let Some(CrashPoint(crash)) = &self.config.crash_point {
                if crash(self.node.id(), row.phase) {
                    std::future::pending::<()>().await;
                }
            }
        }
        let mut phase = row.phase;
        let mut payload = payload;
        loop {
            let claim = self.claims.get_mut(&id).expect("claimed above");
            if claim.phase != phase {
                claim.phase = phase;
                claim.phase_started = Instant::now();
            }
            let overdue = claim.phase_started.elapsed() > self.config.phase_timeout;
            let step = match &payload {
                MigrationCheckpointPayload::Replica(p) => self.replica_step(id, phase, *p).await,
                MigrationCheckpointPayload::VShard(p) => self.vshard_step(id, phase, *p).await,
            };
            match step {
                Ok(Some((next, next_payload))) => {
                    phase = next;
                    payload = next_payload;
                    if phase == MigrationPhaseTag::Complete {
                        crate::probe!("migration.completed");
                        self.claims.remove(&id);
                        return Ok(());
                    }
                }
                Ok(None) => return Ok(()),
                Err(StepError::Waiting(why)) if overdue => {
                    crate::probe!("migration.phase_timed_out");
                    let row = self.current_row(id, phase, &payload);
                    return self
                        .abort(&row, &payload, &format!("phase {phase:?} timed out: {why}"))
                        .await;
                }
                Err(StepError::Refused(why)) => {
                    let row = self.current_row(id, phase, &payload);
                    return self.abort(&row, &payload, &why).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn current_row(
        &self,
        id: MigrationId,
        phase: MigrationPhaseTag,
        payload: &MigrationCheckpointPayload,
    ) -> MigrationRow {
        let attempt = self.claims.get(&id).map_or(0, |c| c.attempt);
        MigrationRow::new(id, phase, attempt, payload, self.node.now_ms())
    }

    /// Commits `extra` (the phase's Raft step) and the checkpoint of `next`
    /// in one entry.
    async fn step_to(
        &self,
        id: MigrationId,
        next: MigrationPhaseTag,
        payload: MigrationCheckpointPayload,
        extra: Vec<MetadataEntry>,
    ) -> Result<Option<(MigrationPhaseTag, MigrationCheckpointPayload)>, StepError> {
        let attempt = self.claims.get(&id).map_or(0, |c| c.attempt);
        let row = MigrationRow::new(id, next, attempt, &payload, self.node.now_ms());
        let entry = if extra.is_empty() {
            MetadataEntry::from(&row)
        } else {
            let mut entries = extra;
            entries.push(MetadataEntry::from(&row));
            MetadataEntry::Batch {
                entries: BatchEntries(entries),
            }
        };
        commit(&self.node, entry).await?;
        probe_phase(next);
        Ok(Some((next, payload)))
    }

    /// The view of `group` from its leader, found through its voters.
    async fn leader_view(
        &self,
        group: GroupId,
        candidates: &[NodeId],
    ) -> Result<GroupView, StepError> {
        for &node in candidates {
            let Ok(status) = self.node.status_of(node).await else {
                continue;
            };
            if let Some(view) = status
                .groups
                .into_iter()
                .find(|g| g.group == group && g.is_leader)
            {
                return Ok(view);
            }
        }
        Err(StepError::Waiting(format!(
            "group {group} has no reachable leader"
        )))
    }

    async fn replica_step(
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
                        let now = self.leader_view(g, &route.voters).await?;
                        if now.leader == Some(p.target) {
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

    async fn vshard_step(
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
                control(
                    &self.node,
                    b,
                    GroupControl::Ingest {
                        vshard: v,
                        migration: id,
                        data,
                        serve_after_epoch: None,
                    },
                )
                .await?;
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
                control(
                    &self.node,
                    b,
                    GroupControl::Ingest {
                        vshard: v,
                        migration: id,
                        data,
                        serve_after_epoch: Some(epoch),
                    },
                )
                .await?;
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

    /// Aborts a move. `MigrationAbort` commits first: the applier checks
    /// that the move is still before its point of no return, so the
    /// decision is atomic even against a coordinator that lost its role and
    /// does not know it yet; it applies the routing compensations and
    /// deletes the row. The data-group compensations (unfence the source,
    /// drop the partial copy) follow; if this coordinator dies before they
    /// land, the orphan-gate sweep finishes them.
    async fn abort(
        &mut self,
        row: &MigrationRow,
        payload: &MigrationCheckpointPayload,
        reason: &str,
    ) -> Result<(), StepError> {
        let state = self.node.metadata_local().await?;
        let reassigned = match payload {
            MigrationCheckpointPayload::VShard(p) => {
                state.routing.lookup(p.vshard_id).group == p.target_group
            }
            MigrationCheckpointPayload::Replica(_) => false,
        };
        let Some(undo) = compensations(payload, row.phase, reassigned) else {
            crate::probe!("migration.abort_refused_past_no_return");
            return Err(StepError::Waiting(format!(
                "{reason}; past its point of no return, the move will be finished instead"
            )));
        };
        tracing::info!(migration = %row.migration_id, phase = ?row.phase, %reason, "aborting migration");
        commit(
            &self.node,
            MetadataEntry::MigrationAbort {
                migration_id: row.migration_id,
                reason: reason.to_owned(),
                compensations: undo.clone(),
            },
        )
        .await?;
        probe_aborted(row.phase);
        self.claims.remove(&row.migration_id);
        for step in undo {
            use crate::core::migration::Compensation as C;
            let (group, control_step) = match step {
                C::Unfence {
                    vshard_id,
                    group_id,
                } => (
                    group_id,
                    GroupControl::Unfence {
                        vshard: vshard_id,
                        migration: row.migration_id,
                    },
                ),
                C::DropPartialCopy {
                    vshard_id,
                    group_id,
                } => (
                    group_id,
                    GroupControl::DropCopy {
                        vshard: vshard_id,
                        migration: row.migration_id,
                    },
                ),
                _ => continue,
            };
            // Best effort: the orphan-gate sweep retries what fails here.
            let _ = control(&self.node, group, control_step).await;
        }
        Ok(())
    }

    /// Settles gates left by migrations that no longer run: an aborted
    /// move whose coordinator died before unfencing, or a late step of a
    /// coordinator that lost its role. A fence or partial copy whose
    /// migration has no open row is undone, as routing says: a fenced
    /// vShard that routing still sends to its group is unfenced (else
    /// released), and a copy in a group routing does not send it to is
    /// dropped. Runs at most once per `ORPHAN_SWEEP_INTERVAL`.
    async fn clear_orphan_gates(&mut self, state: &crate::core::cache::MetadataState) {
        if self
            .last_sweep
            .is_some_and(|at| at.elapsed() < ORPHAN_SWEEP_INTERVAL)
        {
            return;
        }
        self.last_sweep = Some(Instant::now());
        let open = |m: MigrationId| {
            state
                .migrations
                .get(&m)
                .is_some_and(|row| row.phase != MigrationPhaseTag::Complete)
        };
        // Keyed by group and step, so that replicas reporting the same gate
        // (a stale leader and the new one) settle it once.
        let mut orphans = BTreeMap::new();
        for (peer, info) in state.topology.nodes() {
            if info.state == NodeState::Decommissioned {
                continue;
            }
            let Ok(status) = self.node.status_of(peer).await else {
                continue;
            };
            for view in status.groups.iter().filter(|g| g.is_leader) {
                for &(vshard, gate) in &view.unsettled {
                    let served_here = state.routing.lookup(vshard).group == view.group;
                    let step = match gate {
                        Gate::Fenced { migration, .. } if !open(migration) => {
                            if served_here {
                                GroupControl::Unfence { vshard, migration }
                            } else {
                                GroupControl::Release { vshard, migration }
                            }
                        }
                        Gate::Copying { migration } if !open(migration) && !served_here => {
                            GroupControl::DropCopy { vshard, migration }
                        }
                        _ => continue,
                    };
                    orphans.insert((view.group, format!("{step:?}")), step);
                }
            }
        }
        for ((group, _), step) in orphans {
            if control(&self.node, group, step).await.is_ok() {
                crate::probe!("migration.orphan_gate_cleared");
            }
        }
    }

    /// Removes ghost stubs whose move completed more than `ghost_ttl` ago.
    async fn expire_ghosts(&self, state: &crate::core::cache::MetadataState) {
        let now = self.node.now_ms();
        let ttl = u64::try_from(self.config.ghost_ttl.as_millis()).unwrap_or(u64::MAX);
        for (vshard, group, _) in state.routing.ghosts() {
            let expired = state.migrations.values().any(|row| {
                row.phase == MigrationPhaseTag::Complete
                    && now.saturating_sub(row.ts_ms) >= ttl
                    && matches!(row.verify(), Ok(MigrationCheckpointPayload::VShard(p))
                        if p.vshard_id == vshard && p.source_group == group)
            });
            if expired {
                let change = RoutingChange::RemoveGhostStub {
                    vshard_id: vshard,
                    group_id: group,
                };
                if commit(&self.node, MetadataEntry::RoutingChange(change))
                    .await
                    .is_ok()
                {
                    crate::probe!("migration.ghost_stub_expired");
                }
            }
        }
    }

    /// Moves replicas off draining nodes, a few at a time, and retires a
    /// drained node.
    async fn decommission(&self, state: &crate::core::cache::MetadataState) {
        let draining: Vec<NodeId> = state
            .topology
            .nodes()
            .filter(|(_, info)| info.state == NodeState::Draining)
            .map(|(node, _)| node)
            .collect();
        if draining.is_empty() {
            return;
        }
        let in_flight = state
            .migrations
            .values()
            .filter(|r| r.phase != MigrationPhaseTag::Complete)
            .count();
        let live = live_nodes(&self.node, state).await;
        let mut budget = self.config.max_in_flight.saturating_sub(in_flight);
        for node in draining {
            if state.routing.groups_of_node(node).is_empty() {
                for change in [
                    TopologyChange::FinishDecommission { node_id: node },
                    TopologyChange::Leave { node_id: node },
                ] {
                    if commit(&self.node, MetadataEntry::TopologyChange(change))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
                crate::probe!("decommission.finished");
                continue;
            }
            let view = ClusterView::new(state, &live);
            let busy = view.busy_groups();
            let Ok(plan) = plan_decommission(&view, node) else {
                crate::probe!("decommission.waiting_for_safe_move");
                continue;
            };
            for planned in plan
                .into_iter()
                .filter(|m| m.groups().iter().all(|g| !busy.contains(g)))
            {
                if budget == 0 {
                    return;
                }
                if start_move(&self.node, planned).await.is_ok() {
                    crate::probe!("decommission.move_started");
                    budget -= 1;
                }
            }
        }
    }
}

/// The nodes that answer a status call now: the safety check counts live
/// voters, not just the ones routing names.
pub async fn live_nodes(
    node: &Node,
    state: &crate::core::cache::MetadataState,
) -> BTreeSet<NodeId> {
    let mut live = BTreeSet::new();
    for (peer, info) in state.topology.nodes() {
        if matches!(info.state, NodeState::Decommissioned) {
            continue;
        }
        if node.status_of(peer).await.is_ok() {
            live.insert(peer);
        }
    }
    live
}

/// The write pause of a fenced vShard move so far, in microseconds.
fn pause_us(p: &VShardMovePayload, now_ms: u64) -> u64 {
    p.fenced_at_ms.map_or(0, |fenced| {
        now_ms.saturating_sub(fenced).saturating_mul(1000)
    })
}

fn probe_phase(phase: MigrationPhaseTag) {
    use MigrationPhaseTag as P;
    match phase {
        P::AddLearner => crate::probe!("migration.phase.add_learner"),
        P::CatchUp => crate::probe!("migration.phase.catch_up"),
        P::PromoteLearner => crate::probe!("migration.phase.promote_learner"),
        P::LeadershipTransfer => crate::probe!("migration.phase.leadership_transfer"),
        P::Cutover => crate::probe!("migration.phase.cutover"),
        P::Copy => crate::probe!("migration.phase.copy"),
        P::Tail => crate::probe!("migration.phase.tail"),
        P::Fence => crate::probe!("migration.phase.fence"),
        P::FinalCatchUp => crate::probe!("migration.phase.final_catch_up"),
        P::Reassign => crate::probe!("migration.phase.reassign"),
        P::Complete => crate::probe!("migration.phase.complete"),
    }
}

/// A coordinator picked up a row an earlier one had claimed: the earlier
/// one crashed or lost group-0 leadership while the row was in `phase`.
fn probe_resumed(phase: MigrationPhaseTag) {
    use MigrationPhaseTag as P;
    match phase {
        P::AddLearner => crate::probe!("migration.resumed.add_learner"),
        P::CatchUp => crate::probe!("migration.resumed.catch_up"),
        P::PromoteLearner => crate::probe!("migration.resumed.promote_learner"),
        P::LeadershipTransfer => crate::probe!("migration.resumed.leadership_transfer"),
        P::Cutover => crate::probe!("migration.resumed.cutover"),
        P::Copy => crate::probe!("migration.resumed.copy"),
        P::Tail => crate::probe!("migration.resumed.tail"),
        P::Fence => crate::probe!("migration.resumed.fence"),
        P::FinalCatchUp => crate::probe!("migration.resumed.final_catch_up"),
        P::Reassign => crate::probe!("migration.resumed.reassign"),
        P::Complete => {}
    }
}

fn probe_aborted(phase: MigrationPhaseTag) {
    use MigrationPhaseTag as P;
    match phase {
        P::AddLearner | P::CatchUp => crate::probe!("migration.aborted.before_promotion"),
        P::PromoteLearner | P::LeadershipTransfer => crate::probe!("migration.aborted.rolled_back"),
        P::Copy | P::Tail => crate::probe!("migration.aborted.before_fence"),
        P::Fence | P::FinalCatchUp | P::Reassign => crate::probe!("migration.aborted.unfenced"),
        P::Cutover | P::Complete => {}
    }
}
