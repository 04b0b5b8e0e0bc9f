//! The migration executor (DESIGN.md §5): drives every row of the
//! migration table to `Complete` or aborts it. Beside it, in a task of its
//! own, its housekeeping carries out the decommissions and ghost-stub
//! expiry that depend on moves.
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

mod housekeeping;
mod probes;
mod replica;
mod vshard;

use crate::core::entry::{BatchEntries, MetadataEntry};
use crate::core::ids::{GroupId, MigrationId, NodeId};
use crate::core::migration::{
    compensations, MigrationCheckpointPayload, MigrationPhaseTag, MigrationRow, ReplicaMovePayload,
    VShardMovePayload,
};
use crate::core::rebalance::PlannedMove;
use crate::core::routing::RoutingChange;
use crate::core::topology::NodeState;
use crate::core::vshard_gate::GroupControl;
use crate::node::rpc::{GroupView, NodeError, NodeStatus, Outcome};
use crate::node::Node;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use probes::{probe_aborted, probe_phase, probe_resumed};

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
}

/// Runs the executor, and its housekeeping in a task of its own, until
/// the node stops. Housekeeping probes every node, and a dead one answers
/// only with a timeout: in the executor's loop that wait would hold up
/// every move's next step, even the moves that replace the dead node.
pub async fn run(node: Node, config: MigrationConfig) {
    let poll = config.poll;
    tokio::spawn(poll_rounds(
        poll,
        housekeeping::Housekeeper::new(node.clone(), config.clone()),
    ));
    let executor = Executor {
        node,
        config,
        claims: BTreeMap::new(),
    };
    poll_rounds(poll, executor).await;
}

/// A coordinator task that looks at the cluster once per poll.
trait Rounds {
    /// What a failed round's log line names.
    const NAME: &'static str;
    /// One look; `Err(NodeError::Stopped)` ends the task.
    async fn round(&mut self) -> Result<(), NodeError>;
}

/// Runs `task` every `poll` until its node stops. A failed round is only
/// logged: the next one looks again.
async fn poll_rounds<T: Rounds>(poll: Duration, mut task: T) {
    loop {
        tokio::time::sleep(poll).await;
        match task.round().await {
            Err(NodeError::Stopped) => return,
            Err(e) => tracing::debug!(error = %e, task = T::NAME, "coordinator round failed"),
            Ok(()) => {}
        }
    }
}

impl Rounds for Executor {
    const NAME: &'static str = "migration executor";

    /// One look at the table, if this node leads group 0.
    async fn round(&mut self) -> Result<(), NodeError> {
        if !leads_metadata(&self.node).await? {
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
        Ok(())
    }
}

impl Executor {
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
                if self.undo(&row, &payload).await?.is_some() {
                    crate::probe!("migration.aborted_after_attempts");
                    return self.abort(&row, &payload, "claimed too many times").await;
                }
                // Past its point of no return a move can only be finished,
                // however many coordinators it took: claim it once more.
                crate::probe!("migration.finished_after_attempts");
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

    /// The view of `group` from its leader, found through `candidates`
    /// (its voters), all asked at once: a dead one among them delays the
    /// answer by nothing, where asked in turn it held up every look for a
    /// probe timeout, past a leadership transfer's write-pause budget.
    async fn leader_view(
        &self,
        group: GroupId,
        candidates: &[NodeId],
    ) -> Result<GroupView, StepError> {
        let probes: Vec<_> = candidates
            .iter()
            .map(|&peer| probe_status(&self.node, peer))
            .collect();
        for probe in probes {
            let Ok(Some(status)) = probe.await else {
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

    /// What aborting `row` would undo, or `None` once the move is past its
    /// point of no return (a vShard move once routing sends the vShard to
    /// its target).
    async fn undo(
        &self,
        row: &MigrationRow,
        payload: &MigrationCheckpointPayload,
    ) -> Result<Option<Vec<crate::core::migration::Compensation>>, StepError> {
        let state = self.node.metadata_local().await?;
        let reassigned = match payload {
            MigrationCheckpointPayload::VShard(p) => {
                state.routing.lookup(p.vshard_id).group == p.target_group
            }
            MigrationCheckpointPayload::Replica(_) => false,
        };
        Ok(compensations(payload, row.phase, reassigned))
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
        let Some(undo) = self.undo(row, payload).await? else {
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
}

/// Whether this node leads group 0: only the leader coordinates.
async fn leads_metadata(node: &Node) -> Result<bool, NodeError> {
    let status = node.status().await?;
    Ok(status
        .groups
        .iter()
        .any(|g| g.group == GroupId::METADATA && g.is_leader))
}

/// How long a status probe waits for its answer. A node that misses it
/// counts as not live for now: planning is conservative about such a node
/// (it is no target, and its voter does not count towards a majority), and
/// the caller is not held up by a dead node for a whole request timeout.
const STATUS_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Asks `peer` for its status in a task of its own, for at most
/// [`STATUS_PROBE_TIMEOUT`], so that several peers can be asked at once.
fn probe_status(node: &Node, peer: NodeId) -> tokio::task::JoinHandle<Option<NodeStatus>> {
    let node = node.clone();
    tokio::spawn(async move {
        tokio::time::timeout(STATUS_PROBE_TIMEOUT, node.status_of(peer))
            .await
            .ok()?
            .ok()
    })
}

/// The status of every node of the topology not yet decommissioned that
/// answers within [`STATUS_PROBE_TIMEOUT`], all asked at once, so that any
/// number of dead nodes costs one probe timeout.
pub(super) async fn peer_statuses(
    node: &Node,
    state: &crate::core::cache::MetadataState,
) -> BTreeMap<NodeId, NodeStatus> {
    let probes: Vec<_> = state
        .topology
        .nodes()
        .filter(|(_, info)| !matches!(info.state, NodeState::Decommissioned))
        .map(|(peer, _)| (peer, probe_status(node, peer)))
        .collect();
    let mut statuses = BTreeMap::new();
    for (peer, probe) in probes {
        if let Ok(Some(status)) = probe.await {
            statuses.insert(peer, status);
        }
    }
    statuses
}

/// The nodes that answer a status probe now: the safety check counts live
/// voters, not just the ones routing names.
pub async fn live_nodes(
    node: &Node,
    state: &crate::core::cache::MetadataState,
) -> BTreeSet<NodeId> {
    peer_statuses(node, state).await.into_keys().collect()
}
