//! The node's event loop: one task that owns the multi-Raft engine, the
//! metadata cache and the data state machines.
//!
//! Everything that changes them happens on this task, in the order events
//! arrive: ticks (on a seeded, jittered schedule), frames and calls from
//! peers, and commands from the local [`Node`](super::Node) handle. After
//! each batch of events the loop drives engine rounds until there is nothing
//! left to do: persist, send, apply, answer waiting proposers and readers.
//! It uses only `tokio` (madsim's in the simulator) and the io layer, so the
//! same code runs in production, in tests and under simulation.

mod apply;
mod commands;
mod peers;
mod reads;
mod reconcile;
mod retirement;
mod status;

use crate::core::cache::{Bootstrap, MetadataCache};
use crate::core::codec;
use crate::core::entry::MetadataEntry;
use crate::core::hlc::HlcClock;
use crate::core::hooks::MetadataHooks;
use crate::core::ids::{GroupId, NodeId, VShardId};
use crate::core::state_machine::DataStateMachine;
use crate::core::vshard_gate::GroupControl;
use crate::io::clock::WallClock;
use crate::io::transport::{InboundReceiver, Transport};
use crate::node::data_group::DataGroup;
use crate::node::liveness::Liveness;
use crate::node::rpc::{Committed, NodeError, NodeStatus, Request};
use crate::node::NodeConfig;
use crate::raft::engine::{Engine, EngineError, GroupBootstrap, BOOTSTRAP_INDEX};
use raft::prelude::Snapshot;
use raft::{SnapshotStatus, StateRole};
use rand_chacha::rand_core::RngCore;
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Instant};

/// Builds the state machine of a data group.
pub type MachineFactory = Arc<dyn Fn(GroupId) -> Box<dyn DataStateMachine> + Send + Sync>;

/// The most group-0 voters the leader promotes automatically.
pub const MAX_METADATA_VOTERS: usize = 5;
/// A joining node is activated once it lags the leader by at most this much.
const CATCH_UP_LAG: u64 = 16;

/// How often a node asks whether a replica it still hosts, but that
/// routing no longer lists, has left its group's Raft configuration.
const DESTROY_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Whether a snapshot sent to a peer arrived.
type SnapshotReport = (GroupId, NodeId, SnapshotStatus);

/// Requests from the local handle.
pub(crate) enum Command {
    ProposeMetadata {
        entry: MetadataEntry,
        reply: oneshot::Sender<Result<Committed, NodeError>>,
    },
    Propose {
        vshard: VShardId,
        group: Option<GroupId>,
        command: Vec<u8>,
        reply: oneshot::Sender<Result<Committed, NodeError>>,
    },
    Read {
        vshard: VShardId,
        query: Vec<u8>,
        linearizable: bool,
        reply: oneshot::Sender<Result<Vec<u8>, NodeError>>,
    },
    ProposeControl {
        group: GroupId,
        control: GroupControl,
        reply: oneshot::Sender<Result<Committed, NodeError>>,
    },
    ExportVShard {
        group: GroupId,
        vshard: VShardId,
        reply: oneshot::Sender<Result<(u64, Vec<u8>), NodeError>>,
    },
    /// The group's leader confirmed that this replica left the group's
    /// configuration: delete it.
    DestroyReplica {
        group: GroupId,
    },
    /// A peer's metadata says group 0 retired this node while it was away
    /// (see `retirement`).
    Retired,
    ReadMetadata {
        reply: oneshot::Sender<Result<Box<crate::core::cache::MetadataState>, NodeError>>,
    },
    /// Every node `group`'s configuration lists, read linearizably.
    GroupMembers {
        group: GroupId,
        reply: oneshot::Sender<Result<Vec<NodeId>, NodeError>>,
    },
    ReadMetadataLocal {
        reply: oneshot::Sender<Option<Box<crate::core::cache::MetadataState>>>,
    },
    Entropy {
        reply: oneshot::Sender<[u8; 32]>,
    },
    Status {
        reply: oneshot::Sender<NodeStatus>,
    },
    LocalSnapshot {
        group: GroupId,
        reply: oneshot::Sender<Option<(u64, Vec<u8>)>>,
    },
}

/// A proposal waiting for its entry to apply.
struct PendingProposal {
    group: GroupId,
    hlc: crate::core::hlc::Hlc,
    reply: oneshot::Sender<Result<Committed, NodeError>>,
    /// When the proposal gives up: an entry lost to a leadership change
    /// never applies, and its proposer must not wait forever.
    deadline: Instant,
}

/// A linearizable read waiting for its read index, then for the apply.
struct PendingRead {
    group: GroupId,
    reply: ReadReply,
    /// Set once the read index is known.
    index: Option<u64>,
    deadline: Instant,
}

/// What a linearizable read reads, and where its answer goes.
enum ReadReply {
    Data {
        vshard: VShardId,
        query: Vec<u8>,
        reply: oneshot::Sender<Result<Vec<u8>, NodeError>>,
    },
    Export {
        vshard: VShardId,
        reply: oneshot::Sender<Result<(u64, Vec<u8>), NodeError>>,
    },
    Metadata(oneshot::Sender<Result<Box<crate::core::cache::MetadataState>, NodeError>>),
    Members {
        reply: oneshot::Sender<Result<Vec<NodeId>, NodeError>>,
    },
}

impl ReadReply {
    fn fail(self, error: NodeError) {
        match self {
            ReadReply::Data { reply, .. } => drop(reply.send(Err(error))),
            ReadReply::Export { reply, .. } => drop(reply.send(Err(error))),
            ReadReply::Metadata(tx) => drop(tx.send(Err(error))),
            ReadReply::Members { reply } => drop(reply.send(Err(error))),
        }
    }
}

pub(crate) struct Runtime {
    me: NodeId,
    config: NodeConfig,
    engine: Engine,
    transport: Arc<dyn Transport>,
    clock: Arc<dyn WallClock>,
    storage_latency: Option<Arc<dyn crate::io::StorageLatency>>,
    rng: ChaCha8Rng,
    hlc: HlcClock,
    metadata: Option<MetadataCache>,
    machines: BTreeMap<GroupId, DataGroup>,
    factory: MachineFactory,
    hooks: Box<dyn MetadataHooks + Send>,
    /// Groups that fail-stopped here, and why (DESIGN.md §3.3).
    failed: BTreeMap<GroupId, String>,
    /// Random per start, so contexts of proposals from an earlier run of
    /// this node (replayed from the log) never match a new proposal.
    incarnation: u64,
    next_id: u64,
    proposals: BTreeMap<u64, PendingProposal>,
    reads: BTreeMap<u64, PendingRead>,
    commands: mpsc::UnboundedReceiver<Command>,
    /// For tasks this loop spawns to report back to it.
    own_commands: mpsc::UnboundedSender<Command>,
    /// Replicas routing no longer lists, and when their removal from the
    /// Raft configuration was last asked about.
    destroy_checks: BTreeMap<GroupId, Instant>,
    inbound: InboundReceiver,
    /// Outcomes of snapshot sends, from the tasks that sent them.
    snapshot_reports: (
        mpsc::UnboundedSender<SnapshotReport>,
        mpsc::UnboundedReceiver<SnapshotReport>,
    ),
    /// The topology steps this leader proposed and has not seen applied, so
    /// that each tick does not propose them again.
    topology_inflight: Vec<oneshot::Receiver<Result<Committed, NodeError>>>,
    /// Which peers were heard from lately, for hibernating groups.
    liveness: Liveness,
    /// The metadata applied index the last reconciliation saw.
    reconciled_metadata: Option<u64>,
    /// Group 0's commit index as stored when this node started. Its cache
    /// restarts from a snapshot, so until it has applied that far again its
    /// routing may predate what this node acted on before (a group created
    /// since, which it hosts): no replica is deleted on the word of such a
    /// routing.
    metadata_replay_to: u64,
    /// A peer said group 0 retired this node, which this node's own replica
    /// of group 0 may never learn (see `retirement`); kept on disk, so it
    /// holds across restarts.
    retired: bool,
    /// Since when, or since the last question to peers, this node has been
    /// cut off from group 0's leader (see `retirement`).
    cut_off_since: Option<Instant>,
    /// The last committed timestamp observed was too far ahead of this
    /// node's clock (see `apply`), so the warning is not repeated per entry.
    clock_ahead: bool,
    /// A storage error met outside a round (see `storage_failed`), which
    /// stops the node as a failed round does.
    storage_failure: Option<EngineError>,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Engine(#[from] EngineError),
    #[error("the stored metadata snapshot cannot be restored: {0}")]
    Metadata(#[from] crate::core::cache::RestoreError),
    #[error("the stored snapshot of group {group} cannot be restored: {cause}")]
    Machine { group: GroupId, cause: String },
    #[error("bootstrap refused: {0}")]
    Bootstrap(String),
}

impl Runtime {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn open(
        config: NodeConfig,
        io: crate::io::NodeIo,
        bootstrap: Option<Bootstrap>,
        factory: MachineFactory,
        hooks: Box<dyn MetadataHooks + Send>,
        (own_commands, commands): (
            mpsc::UnboundedSender<Command>,
            mpsc::UnboundedReceiver<Command>,
        ),
    ) -> Result<Self, StartError> {
        let me = config.node_id;
        let mut rng = io.rng;
        let ping_interval = config.tick_interval * config.engine.heartbeat_tick as u32;
        let engine = Engine::new(
            me,
            config.engine.clone(),
            crate::raft::storage::RaftStore::new(io.db),
        );
        let mut runtime = Runtime {
            me,
            hlc: HlcClock::new(config.max_clock_offset_ms),
            config,
            engine,
            transport: io.transport,
            clock: io.clock,
            storage_latency: io.storage_latency,
            incarnation: rng.next_u64(),
            rng,
            metadata: None,
            machines: BTreeMap::new(),
            factory,
            hooks,
            failed: BTreeMap::new(),
            next_id: 0,
            proposals: BTreeMap::new(),
            reads: BTreeMap::new(),
            commands,
            own_commands,
            destroy_checks: BTreeMap::new(),
            inbound: io.inbound,
            snapshot_reports: mpsc::unbounded_channel(),
            topology_inflight: Vec::new(),
            liveness: Liveness::new(ping_interval),
            reconciled_metadata: None,
            metadata_replay_to: 0,
            retired: false,
            cut_off_since: None,
            clock_ahead: false,
            storage_failure: None,
        };
        // Before any group is hosted: a retired node hosts nothing again,
        // whatever its stale metadata lists on it (`retirement`).
        runtime.retired = runtime.engine.retired()?;
        let persisted = runtime.engine.persisted_groups()?;
        if !persisted.is_empty() {
            crate::probe!("node.restart_from_disk");
            for group in persisted {
                runtime.host(group, None)?;
            }
        } else if let Some(b) = bootstrap {
            runtime.bootstrap(&b)?;
        } else {
            // A joining node: group 0 arrives as a snapshot from its leader.
            runtime.host(GroupId::METADATA, None)?;
        }
        runtime.metadata_replay_to = runtime
            .engine
            .status(GroupId::METADATA)
            .map_or(0, |s| s.commit);
        Ok(runtime)
    }

    /// Creates the cluster: group 0 with this node as its only voter, and
    /// every data group of the routing table on this node.
    fn bootstrap(&mut self, b: &Bootstrap) -> Result<(), StartError> {
        if b.node_id != self.me {
            return Err(StartError::Bootstrap(format!(
                "bootstrap names node {} but this is node {}",
                b.node_id, self.me
            )));
        }
        let cache =
            MetadataCache::bootstrap(b).map_err(|e| StartError::Bootstrap(e.to_string()))?;
        // The log starts at the bootstrap snapshot: indexes up to it hold nothing.
        let mut state = cache.state().clone();
        state.applied_index = BOOTSTRAP_INDEX;
        let cache = MetadataCache::from_state(state);
        let groups: Vec<(GroupId, Vec<NodeId>)> = cache
            .state()
            .routing
            .groups()
            .map(|(g, route)| (g, route.voters.clone()))
            .collect();
        self.host(
            GroupId::METADATA,
            Some(GroupBootstrap {
                voters: vec![self.me],
                data: cache.snapshot(),
            }),
        )?;
        for (group, voters) in groups {
            let data = DataGroup::new((self.factory)(group)).snapshot();
            self.host(group, Some(GroupBootstrap { voters, data }))?;
        }
        Ok(())
    }

    /// Opens `group` in the engine and restores its state machine from the
    /// stored snapshot, if there is one.
    fn host(
        &mut self,
        group: GroupId,
        bootstrap: Option<GroupBootstrap>,
    ) -> Result<(), StartError> {
        let snapshot = self.engine.open_group(group, bootstrap)?;
        if let Some(snapshot) = snapshot {
            self.restore(group, &snapshot)?;
        } else if !group.is_metadata() {
            self.machines
                .insert(group, DataGroup::new((self.factory)(group)));
        }
        Ok(())
    }

    fn restore(&mut self, group: GroupId, snapshot: &Snapshot) -> Result<(), StartError> {
        let data = snapshot.get_data();
        if group.is_metadata() {
            crate::probe!("node.metadata_from_snapshot");
            let cache = MetadataCache::restore(data)?;
            self.metadata = Some(cache);
        } else {
            let machine = DataGroup::restore((self.factory)(group), data).map_err(|e| {
                StartError::Machine {
                    group,
                    cause: e.to_string(),
                }
            })?;
            self.machines.insert(group, machine);
        }
        Ok(())
    }

    pub(crate) async fn run(mut self) {
        let mut next_tick = Instant::now() + self.jittered_tick();
        loop {
            tokio::select! {
                _ = sleep_until(next_tick) => {
                    self.tick();
                    self.expire_waiters();
                    self.reconcile();
                    next_tick = Instant::now() + self.jittered_tick();
                }
                command = self.commands.recv() => match command {
                    Some(command) => self.on_command(command),
                    None => break,
                },
                Some(inbound) = self.inbound.recv() => self.on_inbound(inbound),
                Some((group, peer, status)) = self.snapshot_reports.1.recv() => {
                    let _ = self.engine.report_snapshot(group, peer, status);
                    if status == SnapshotStatus::Failure {
                        // Let raft-rs probe the peer instead of streaming
                        // appends at it (DESIGN.md §10).
                        let _ = self.engine.report_unreachable(group, peer);
                    }
                }
            }
            // Take whatever else is already waiting before the next round,
            // so that one commit covers as much as possible.
            while let Ok(command) = self.commands.try_recv() {
                self.on_command(command);
            }
            while let Ok(inbound) = self.inbound.try_recv() {
                self.on_inbound(inbound);
            }
            if let Err(e) = self.drive().await {
                // A failed write may have left part of a round on disk and
                // raft-rs holding readies it can no longer advance. The only
                // safe continuation is a restart from what is durable, as
                // after a crash.
                crate::probe!("node.storage_failure_stop");
                tracing::error!(node = %self.me, error = %e, "storage failed; stopping the node");
                break;
            }
        }
        tracing::debug!(node = %self.me, "node runtime stopped");
    }

    /// One Raft tick for every awake group, with pings to peers that were
    /// sent nothing lately so their sleeping followers stay asleep.
    fn tick(&mut self) {
        let now = Instant::now();
        let liveness = &self.liveness;
        self.engine.tick(|peer| liveness.reachable(peer, now));
        let peers = self.engine.peers();
        for peer in self.liveness.pings_due(&peers, now) {
            self.transport
                .send(peer, codec::encode(&Request::Raft(Vec::new())));
            self.liveness.sent_to(peer, now);
        }
    }

    /// The tick interval with up to ±20% seeded jitter: raft-rs's election
    /// timeout is pinned, so this is what keeps elections from colliding.
    fn jittered_tick(&mut self) -> std::time::Duration {
        let base = self.config.tick_interval;
        let jitter = (self.rng.next_u32() % 41) as f64 / 100.0 - 0.2;
        base.mul_f64(1.0 + jitter)
    }

    fn next_context(&mut self) -> (u64, Vec<u8>) {
        self.next_id += 1;
        let mut context = self.incarnation.to_be_bytes().to_vec();
        context.extend_from_slice(&self.next_id.to_be_bytes());
        (self.next_id, context)
    }

    /// The proposal id in a context this incarnation made, if it is one.
    fn own_id(&self, context: &[u8]) -> Option<u64> {
        let (incarnation, id) = context.split_at_checked(8)?;
        (incarnation == self.incarnation.to_be_bytes()).then_some(())?;
        Some(u64::from_be_bytes(id.try_into().ok()?))
    }

    fn not_leader(&self, group: GroupId) -> NodeError {
        let leader = self
            .engine
            .status(group)
            .and_then(|s| s.leader)
            .or_else(|| {
                // Not a replica (or no leader known here): routing's hint,
                // else a voter, which knows its leader. One heard from
                // lately comes first: a dead node (one lost with its disk,
                // say, until it is decommissioned) would swallow every
                // request sent its way until the request timed out.
                let route = self.metadata.as_ref()?.state().routing.group(group)?;
                let now = Instant::now();
                let live = |node: &NodeId| self.liveness.reachable(*node, now);
                let others = || route.voters.iter().copied().filter(|&v| v != self.me);
                route
                    .leader
                    .filter(live)
                    .or_else(|| others().find(live))
                    .or(route.leader)
                    .or_else(|| others().next())
            });
        NodeError::NotLeader { group, leader }
    }

    /// Runs engine rounds until the engine is idle. Each round sends what
    /// may leave before its write, writes, then sends and applies the rest;
    /// membership reconciliation runs once per round, after the applies,
    /// when group 0 applied something.
    async fn drive(&mut self) -> Result<(), EngineError> {
        self.offer_snapshots();
        while self.engine.has_work() {
            self.take_storage_failure()?;
            let mut pending = self.engine.begin_round()?;
            for (to, messages) in std::mem::take(&mut pending.messages) {
                self.send(to, messages);
            }
            for (group, state) in std::mem::take(&mut pending.read_states) {
                self.on_read_state(group, state);
            }
            self.serve_reads();
            let round = self.engine.finish_round(pending)?;
            if let Some(latency) = &self.storage_latency {
                let latency = latency.take();
                if !latency.is_zero() {
                    tokio::time::sleep(latency).await;
                }
            }
            for (to, messages) in round.messages {
                self.send(to, messages);
            }
            let mut metadata_applied = false;
            for apply in round.applies {
                metadata_applied |= self.apply(apply);
            }
            self.serve_reads();
            if metadata_applied {
                self.reconcile();
            }
            if round
                .role_changes
                .iter()
                .any(|(_, _, role)| *role != StateRole::Leader)
            {
                self.fail_reads_of_followers();
            }
            self.offer_snapshots();
        }
        self.take_storage_failure()
    }

    /// Notes a storage error met outside a round: hosting a group, deleting
    /// a replica, marking retirement. redb refuses every write after a
    /// failed one ("close and re-open the database"), and a node whose
    /// groups are all asleep might write nothing for long enough that no
    /// round fails in its place; so it stops at the end of this round, as
    /// after a failed round, and restarts from what is durable.
    fn storage_failed(&mut self, error: EngineError) {
        tracing::error!(node = %self.me, %error, "storage failed outside a round");
        self.storage_failure.get_or_insert(error);
    }

    fn take_storage_failure(&mut self) -> Result<(), EngineError> {
        self.storage_failure.take().map_or(Ok(()), Err)
    }

    /// Hands the engine fresh state-machine snapshots where it wants them.
    fn offer_snapshots(&mut self) {
        for group in self.engine.compaction_candidates() {
            if self.failed.contains_key(&group) {
                continue;
            }
            let data = if group.is_metadata() {
                self.metadata.as_ref().map(MetadataCache::snapshot)
            } else {
                self.machines.get(&group).map(|m| m.snapshot())
            };
            if let (Some(data), Some(status)) = (data, self.engine.status(group)) {
                crate::probe!("raft.snapshot_taken");
                let _ = self.engine.compact(group, status.applied, data);
            }
        }
    }

    /// Answers proposals and reads past their deadline with a timeout: their
    /// outcome is unknown (a proposal may still commit later).
    fn expire_waiters(&mut self) {
        let now = Instant::now();
        for p in take_where(&mut self.proposals, |p| p.deadline <= now) {
            crate::probe!("node.proposal_timed_out");
            let _ = p.reply.send(Err(NodeError::Timeout));
        }
        for r in take_where(&mut self.reads, |r| r.deadline <= now) {
            r.reply.fail(NodeError::Timeout);
        }
    }
}

/// Removes and returns the waiters that match `gone`, in id order.
fn take_where<T>(waiters: &mut BTreeMap<u64, T>, gone: impl Fn(&T) -> bool) -> Vec<T> {
    let (taken, kept): (BTreeMap<u64, T>, BTreeMap<u64, T>) = std::mem::take(waiters)
        .into_iter()
        .partition(|(_, w)| gone(w));
    *waiters = kept;
    taken.into_values().collect()
}
