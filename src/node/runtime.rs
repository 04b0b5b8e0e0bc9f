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

use crate::core::cache::{Bootstrap, MetadataCache, RejectReason};
use crate::core::codec;
use crate::core::entry::{MetadataEntry, MetadataRecord};
use crate::core::hlc::HlcClock;
use crate::core::hooks::MetadataHooks;
use crate::core::ids::{GroupId, NodeId, VShardId};
use crate::core::state_machine::DataStateMachine;
use crate::core::vshard_gate::{GateRefusal, GroupControl};
use crate::io::clock::WallClock;
use crate::io::transport::{Inbound, InboundReceiver, Transport};
use crate::node::data_group::DataGroup;
use crate::node::liveness::Liveness;
use crate::node::membership::{next_change, Wanted};
use crate::node::rpc::{
    Committed, DataBody, DataRecord, GroupView, NodeError, NodeStatus, Outcome, PeerProgress,
    RaftFrame, Request, Response, MAX_FORWARDED_ITEMS,
};
use crate::node::NodeConfig;
use crate::raft::engine::{
    conf_change, conf_change_of, Engine, EngineError, GroupApply, GroupBootstrap, GroupMessage,
    BOOTSTRAP_INDEX,
};
use protobuf::Message as _;
use raft::prelude::{Entry, Message, MessageType, Snapshot};
use raft::{SnapshotStatus, StateRole};
use rand_chacha::rand_core::RngCore;
use rand_chacha::ChaCha8Rng;
use serde_bytes::ByteBuf;
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
    ReadMetadata {
        reply: oneshot::Sender<Result<Box<crate::core::cache::MetadataState>, NodeError>>,
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
}

impl ReadReply {
    fn fail(self, error: NodeError) {
        match self {
            ReadReply::Data { reply, .. } => drop(reply.send(Err(error))),
            ReadReply::Export { reply, .. } => drop(reply.send(Err(error))),
            ReadReply::Metadata(tx) => drop(tx.send(Err(error))),
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
        };
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

    fn propose(
        &mut self,
        group: GroupId,
        data: Vec<u8>,
        hlc: crate::core::hlc::Hlc,
        reply: oneshot::Sender<Result<Committed, NodeError>>,
    ) {
        if let Some(cause) = self.failed.get(&group) {
            let _ = reply.send(Err(NodeError::FailStopped {
                group,
                cause: cause.clone(),
            }));
            return;
        }
        let (id, context) = self.next_context();
        match self.engine.propose(group, context, data) {
            Ok(()) => {
                let deadline = Instant::now() + self.config.request_timeout;
                self.proposals.insert(
                    id,
                    PendingProposal {
                        group,
                        hlc,
                        reply,
                        deadline,
                    },
                );
            }
            // raft-rs drops a proposal it did not append (a leadership
            // transfer is under way): nothing was written, so the caller
            // retries, and a write waits out a replica move's pause.
            Err(EngineError::NotLeader { .. })
            | Err(EngineError::UnknownGroup(_))
            | Err(EngineError::Raft {
                source: raft::Error::ProposalDropped,
                ..
            }) => {
                let _ = reply.send(Err(self.not_leader(group)));
            }
            Err(e) => {
                let _ = reply.send(Err(NodeError::BadRequest(e.to_string())));
            }
        }
    }

    fn on_command(&mut self, command: Command) {
        match command {
            Command::ProposeMetadata { entry, reply } => {
                let Some(cache) = &self.metadata else {
                    let _ = reply.send(Err(NodeError::NoMetadata));
                    return;
                };
                if let Err(e) = entry.check_allowed(cache.state().cluster_version) {
                    let _ = reply.send(Err(NodeError::BadRequest(e.to_string())));
                    return;
                }
                let hlc = self.hlc.now(self.clock.now_ms());
                let data = MetadataRecord::new(hlc, entry).encode();
                self.propose(GroupId::METADATA, data, hlc, reply);
            }
            Command::Propose {
                vshard,
                group: expected,
                command,
                reply,
            } => {
                let Some(cache) = &self.metadata else {
                    let _ = reply.send(Err(NodeError::NoMetadata));
                    return;
                };
                let routing = &cache.state().routing;
                if let Some(expected) = expected {
                    if let Err(redirect) = routing.check(vshard, expected) {
                        crate::probe!("routing.wrong_group_redirect");
                        let _ = reply.send(Err(NodeError::WrongGroup(redirect)));
                        return;
                    }
                }
                let group = routing.lookup(vshard).group;
                let epoch = routing.epoch();
                // The leader refuses early what the gates would refuse at
                // apply time anyway; the apply-time check is the one that counts.
                if let Some(Err(refusal)) =
                    self.machines.get(&group).map(|g| g.admit(vshard, epoch))
                {
                    let _ = reply.send(Err(self.refusal_error(group, refusal)));
                    return;
                }
                let hlc = self.hlc.now(self.clock.now_ms());
                let data = codec::encode(&DataRecord {
                    hlc,
                    vshard,
                    epoch,
                    body: DataBody::Command(command),
                });
                self.propose(group, data, hlc, reply);
            }
            Command::ProposeControl {
                group,
                control,
                reply,
            } => {
                let Some(cache) = &self.metadata else {
                    let _ = reply.send(Err(NodeError::NoMetadata));
                    return;
                };
                let hlc = self.hlc.now(self.clock.now_ms());
                let data = codec::encode(&DataRecord {
                    hlc,
                    vshard: control.vshard(),
                    epoch: cache.state().routing.epoch(),
                    body: DataBody::Control(control),
                });
                self.propose(group, data, hlc, reply);
            }
            Command::ExportVShard {
                group,
                vshard,
                reply,
            } => {
                self.start_read(group, ReadReply::Export { vshard, reply });
            }
            Command::DestroyReplica { group } => {
                self.destroy_replica(group);
            }
            Command::Read {
                vshard,
                query,
                linearizable,
                reply,
            } => {
                let Some(cache) = &self.metadata else {
                    let _ = reply.send(Err(NodeError::NoMetadata));
                    return;
                };
                let group = cache.state().routing.lookup(vshard).group;
                if !linearizable {
                    let result = self.query(group, vshard, &query);
                    let _ = reply.send(result);
                    return;
                }
                self.start_read(
                    group,
                    ReadReply::Data {
                        vshard,
                        query,
                        reply,
                    },
                );
            }
            Command::ReadMetadata { reply } => {
                self.start_read(GroupId::METADATA, ReadReply::Metadata(reply));
            }
            Command::ReadMetadataLocal { reply } => {
                let state = self.metadata.as_ref().map(|c| Box::new(c.state().clone()));
                let _ = reply.send(state);
            }
            Command::Entropy { reply } => {
                let mut bytes = [0u8; 32];
                self.rng.fill_bytes(&mut bytes);
                let _ = reply.send(bytes);
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status());
            }
            Command::LocalSnapshot { group, reply } => {
                let _ = reply.send(self.local_snapshot(group));
            }
        }
    }

    /// Starts a linearizable read: only the leader serves it, after a read
    /// index round confirms it still leads and its state has caught up.
    fn start_read(&mut self, group: GroupId, reply: ReadReply) {
        if crate::planted::planted(crate::planted::Bug::StaleReads) {
            if let ReadReply::Data {
                vshard,
                query,
                reply,
            } = reply
            {
                let _ = reply.send(self.query(group, vshard, &query));
                return;
            }
        }
        let leads = self
            .engine
            .status(group)
            .is_some_and(|s| s.role == StateRole::Leader);
        if !leads {
            reply.fail(self.not_leader(group));
            return;
        }
        let (id, context) = self.next_context();
        match self.engine.read_index(group, context) {
            Ok(()) => {
                self.reads.insert(
                    id,
                    PendingRead {
                        group,
                        reply,
                        index: None,
                        deadline: Instant::now() + self.config.request_timeout,
                    },
                );
            }
            Err(_) => reply.fail(self.not_leader(group)),
        }
    }

    fn on_inbound(&mut self, inbound: Inbound) {
        match inbound {
            Inbound::Frame { from, frame } => match codec::decode::<Request>(&frame) {
                // Only nodes send one-way Raft frames; an empty one is a ping.
                Ok(Request::Raft(frames)) => {
                    self.liveness.heard_from(from, Instant::now());
                    for frame in frames {
                        self.step(from, frame);
                    }
                }
                Ok(other) => {
                    tracing::debug!(%from, request = ?std::mem::discriminant(&other), "unexpected one-way request dropped");
                }
                Err(e) => tracing::warn!(%from, error = %e, "undecodable frame dropped"),
            },
            Inbound::Call {
                from,
                request,
                reply,
            } => self.on_call(from, request, reply),
        }
    }

    /// Feeds one peer's Raft message to its group, after checking that the
    /// message really comes from the peer that sent the frame.
    fn step(&mut self, from: NodeId, frame: RaftFrame) -> bool {
        let message = match codec::parse_protobuf::<Message>(&frame.message) {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!(%from, error = %e, "undecodable raft message dropped");
                return false;
            }
        };
        if message.from != from.get() || message.to != self.me.get() {
            tracing::warn!(%from, claimed = message.from, to = message.to, "raft message with forged endpoints dropped");
            if message.from != from.get() {
                self.transport.disconnect(from);
            }
            return false;
        }
        // Messages for a group this node does not host (yet) are dropped;
        // Raft resends once routing tells this node to host it.
        self.engine.step(frame.group, message).is_ok()
    }

    fn on_call(&mut self, from: NodeId, request: Vec<u8>, reply: oneshot::Sender<Vec<u8>>) {
        match codec::decode::<Request>(&request) {
            Ok(request) => self.on_request(from, request, reply),
            Err(e) => refuse(reply, e.to_string()),
        }
    }

    /// Runs each call of a forwarded batch as if it came alone, and answers
    /// the batch once every call has its answer.
    fn on_forwarded(&mut self, from: NodeId, items: Vec<ByteBuf>, reply: oneshot::Sender<Vec<u8>>) {
        if items.len() > MAX_FORWARDED_ITEMS {
            return refuse(
                reply,
                format!(
                    "a forwarded batch holds at most {MAX_FORWARDED_ITEMS} calls, not {}",
                    items.len()
                ),
            );
        }
        let answers: Vec<_> = items
            .iter()
            .map(|item| {
                let (tx, rx) = oneshot::channel();
                match codec::decode::<Request>(item) {
                    Ok(request) if request.travels_forwarded() => {
                        self.on_request(from, request, tx)
                    }
                    Ok(_) => refuse(
                        tx,
                        "only proposals and reads travel in a forwarded batch".into(),
                    ),
                    Err(e) => refuse(tx, e.to_string()),
                }
                rx
            })
            .collect();
        tokio::spawn(async move {
            let mut encoded = Vec::with_capacity(answers.len());
            for answer in answers {
                let bytes = answer
                    .await
                    .unwrap_or_else(|_| codec::encode(&Response::Error(NodeError::Dropped)));
                encoded.push(ByteBuf::from(bytes));
            }
            let _ = reply.send(codec::encode(&Response::Forwarded(encoded)));
        });
    }

    fn on_request(&mut self, from: NodeId, request: Request, reply: oneshot::Sender<Vec<u8>>) {
        match request {
            Request::Forwarded(items) => self.on_forwarded(from, items, reply),
            Request::RaftSnapshot(frame) => {
                let response = if self.step(from, frame) {
                    Response::Ack
                } else {
                    Response::Error(NodeError::BadRequest("snapshot not accepted".into()))
                };
                let _ = reply.send(codec::encode(&response));
            }
            Request::Raft(frames) => {
                for frame in frames {
                    self.step(from, frame);
                }
                let _ = reply.send(codec::encode(&Response::Ack));
            }
            Request::ProposeMetadata(entry) => {
                let (tx, rx) = oneshot::channel();
                self.on_command(Command::ProposeMetadata { entry, reply: tx });
                answer_later(rx, reply, Response::Committed);
            }
            Request::Propose {
                vshard,
                group,
                command,
            } => {
                let (tx, rx) = oneshot::channel();
                self.on_command(Command::Propose {
                    vshard,
                    group,
                    command,
                    reply: tx,
                });
                answer_later(rx, reply, Response::Committed);
            }
            Request::Read { vshard, query } => {
                let (tx, rx) = oneshot::channel();
                self.on_command(Command::Read {
                    vshard,
                    query,
                    linearizable: true,
                    reply: tx,
                });
                answer_later(rx, reply, Response::Read);
            }
            Request::ReadMetadata => {
                let (tx, rx) = oneshot::channel();
                self.on_command(Command::ReadMetadata { reply: tx });
                answer_later(rx, reply, Response::Metadata);
            }
            Request::Status => {
                let _ = reply.send(codec::encode(&Response::Status(self.status())));
            }
            Request::ProposeControl { group, control } => {
                let (tx, rx) = oneshot::channel();
                self.on_command(Command::ProposeControl {
                    group,
                    control,
                    reply: tx,
                });
                answer_later(rx, reply, Response::Committed);
            }
            Request::ExportVShard { group, vshard } => {
                let (tx, rx) = oneshot::channel();
                self.on_command(Command::ExportVShard {
                    group,
                    vshard,
                    reply: tx,
                });
                answer_later(rx, reply, |(index, data)| Response::Export { index, data });
            }
        }
    }

    /// Runs engine rounds until the engine is idle. Each round sends what
    /// may leave before its write, writes, then sends and applies the rest;
    /// membership reconciliation runs once per round, after the applies,
    /// when group 0 applied something.
    async fn drive(&mut self) -> Result<(), EngineError> {
        self.offer_snapshots();
        while self.engine.has_work() {
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
        Ok(())
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

    fn send(&mut self, to: NodeId, messages: Vec<GroupMessage>) {
        let mut frames = Vec::with_capacity(messages.len());
        for GroupMessage { group, message } in messages {
            let bytes = match message.write_to_bytes() {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::error!(error = %e, "raft message does not encode");
                    continue;
                }
            };
            let frame = RaftFrame {
                group,
                message: bytes,
            };
            if message.get_msg_type() == MessageType::MsgSnapshot {
                self.send_snapshot(to, frame);
            } else {
                frames.push(frame);
            }
        }
        if !frames.is_empty() {
            self.transport
                .send(to, codec::encode(&Request::Raft(frames)));
            self.liveness.sent_to(to, Instant::now());
        }
    }

    /// Snapshots go as calls, so that raft-rs learns whether they arrived
    /// (otherwise the leader would wait for a lost snapshot forever).
    fn send_snapshot(&self, to: NodeId, frame: RaftFrame) {
        let transport = Arc::clone(&self.transport);
        let reports = self.snapshot_reports.0.clone();
        let timeout = self.config.request_timeout;
        let group = frame.group;
        tokio::spawn(async move {
            let request = codec::encode(&Request::RaftSnapshot(frame));
            let status = match transport.call(to, request, timeout).await {
                Ok(bytes) if matches!(codec::decode::<Response>(&bytes), Ok(Response::Ack)) => {
                    crate::probe!("raft.snapshot_delivered");
                    SnapshotStatus::Finish
                }
                _ => {
                    crate::probe!("raft.snapshot_failed");
                    SnapshotStatus::Failure
                }
            };
            let _ = reports.send((group, to, status));
        });
    }

    /// Applies a group's committed work; returns whether it was group 0's
    /// (the caller then reconciles this node with the new metadata).
    fn apply(&mut self, apply: GroupApply) -> bool {
        let group = apply.group;
        if self.failed.contains_key(&group) {
            return false;
        }
        // A restored snapshot counts as applied up to its index.
        let mut last = None;
        if let Some(snapshot) = &apply.snapshot {
            if let Err(e) = self.restore(group, snapshot) {
                self.fail_stop(group, e.to_string());
                return false;
            }
            last = Some(snapshot.get_metadata().index);
        }
        for entry in &apply.entries {
            if let Err(cause) = self.apply_entry(group, entry) {
                self.fail_stop(group, cause);
                break;
            }
            last = Some(entry.get_index());
        }
        if let Some(index) = last {
            let _ = self.engine.advance_apply(group, index);
        }
        group.is_metadata()
    }

    fn fail_stop(&mut self, group: GroupId, cause: String) {
        crate::probe!("node.group_fail_stopped");
        tracing::error!(node = %self.me, %group, %cause, "group fail-stopped");
        self.failed.insert(group, cause);
    }

    /// Applies one committed entry of `group`; an error fail-stops the group.
    fn apply_entry(&mut self, group: GroupId, entry: &Entry) -> Result<(), String> {
        let index = entry.get_index();
        let change = conf_change_of(entry)
            .map_err(|e| format!("membership change at index {index} does not decode: {e}"))?;
        let payload: &[u8] = if let Some(change) = &change {
            self.engine
                .apply_conf_change(group, change)
                .map_err(|e| format!("membership change at index {index}: {e}"))?;
            &[]
        } else {
            entry.get_data()
        };
        let result: Result<Outcome, NodeError> = if group.is_metadata() {
            let cache = self.metadata.as_mut().ok_or_else(|| {
                "metadata entries arrived before the metadata snapshot".to_string()
            })?;
            let rejected_before = cache.state().rejected_total;
            cache
                .apply(&[(index, payload)], &mut *self.hooks)
                .map_err(|stop| stop.to_string())?;
            let state = cache.state();
            let rejection: Option<RejectReason> = (state.rejected_total > rejected_before)
                .then(|| state.recent_rejections.back().map(|r| r.reason.clone()))
                .flatten();
            if rejection.is_some() {
                crate::probe!("metadata.entry_rejected");
            }
            Ok(Outcome::Metadata(rejection))
        } else if payload.is_empty() {
            Ok(Outcome::Data(Vec::new()))
        } else {
            let record = codec::decode::<DataRecord>(payload)
                .map_err(|e| format!("entry at index {index} does not decode: {e}"))?;
            let machine = self
                .machines
                .get_mut(&group)
                .ok_or_else(|| format!("no state machine for group {group}"))?;
            match machine.apply(index, record) {
                Ok(outcome) => {
                    if matches!(outcome, Outcome::Control(Some(_))) {
                        crate::probe!("migration.control_refused");
                    }
                    Ok(outcome)
                }
                Err(refusal) => {
                    crate::probe!("routing.gate_refused_write");
                    Err(self.refusal_error(group, refusal))
                }
            }
        };
        if let Some(id) = self.own_id(entry.get_context()) {
            if let Some(pending) = self.proposals.remove(&id) {
                debug_assert_eq!(pending.group, group);
                let _ = pending.reply.send(result.map(|outcome| Committed {
                    index,
                    hlc: pending.hlc,
                    outcome,
                }));
            }
        }
        Ok(())
    }

    /// Answers a read of `vshard` from this node's replica of `group`,
    /// gated by the routing epoch this node sees now.
    fn query(&self, group: GroupId, vshard: VShardId, query: &[u8]) -> Result<Vec<u8>, NodeError> {
        let Some(machine) = self.machines.get(&group) else {
            return Err(self.not_leader(group));
        };
        let epoch = self
            .metadata
            .as_ref()
            .map_or(0, |c| c.state().routing.epoch());
        machine
            .query(vshard, epoch, query)
            .map_err(|refusal| self.refusal_error(group, refusal))
    }

    /// A gate refusal as the requester should see it: a redirect if this
    /// node's routing already sends the vShard elsewhere, otherwise "not
    /// available yet" (the move is in its write pause, or routing lags).
    fn refusal_error(&self, group: GroupId, refusal: GateRefusal) -> NodeError {
        let vshard = match refusal {
            GateRefusal::Fenced { vshard, .. }
            | GateRefusal::NotServed { vshard }
            | GateRefusal::StaleEpoch { vshard, .. } => vshard,
        };
        if let Some(cache) = &self.metadata {
            if let Err(redirect) = cache.state().routing.check(vshard, group) {
                return NodeError::WrongGroup(redirect);
            }
        }
        NodeError::Unavailable(refusal)
    }

    fn on_read_state(&mut self, group: GroupId, state: raft::ReadState) {
        if let Some(id) = self.own_id(&state.request_ctx) {
            if let Some(read) = self.reads.get_mut(&id) {
                if read.group == group {
                    read.index = Some(state.index);
                }
            }
        }
    }

    /// Answers every read whose index has been applied.
    fn serve_reads(&mut self) {
        let engine = &self.engine;
        let ready = take_where(&mut self.reads, |r| {
            r.index
                .is_some_and(|index| engine.status(r.group).is_some_and(|s| s.applied >= index))
        });
        for read in ready {
            match read.reply {
                ReadReply::Data {
                    vshard,
                    query,
                    reply,
                } => {
                    let _ = reply.send(self.query(read.group, vshard, &query));
                }
                ReadReply::Export { vshard, reply } => {
                    let result = match (
                        self.machines.get(&read.group),
                        self.engine.status(read.group),
                    ) {
                        (Some(machine), Some(status)) => {
                            Ok((status.applied, machine.export(vshard)))
                        }
                        _ => Err(self.not_leader(read.group)),
                    };
                    let _ = reply.send(result);
                }
                ReadReply::Metadata(tx) => {
                    let result = self
                        .metadata
                        .as_ref()
                        .map(|c| Box::new(c.state().clone()))
                        .ok_or(NodeError::NoMetadata);
                    let _ = tx.send(result);
                }
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

    /// A node that lost leadership cannot complete its pending reads.
    fn fail_reads_of_followers(&mut self) {
        let engine = &self.engine;
        let lost = take_where(&mut self.reads, |r| {
            engine
                .status(r.group)
                .is_none_or(|s| s.role != StateRole::Leader)
        });
        for read in lost {
            crate::probe!("node.read_lost_leadership");
            let error = self.not_leader(read.group);
            read.reply.fail(error);
        }
    }

    /// Makes this node host what routing says it hosts, and, where it leads,
    /// moves each group's Raft membership one step towards what group 0 wants.
    fn reconcile(&mut self) {
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
        // asks none of them.
        let retired = state
            .topology
            .get(self.me)
            .is_none_or(|info| info.state == crate::core::topology::NodeState::Decommissioned);
        // Replicas routing no longer lists, with the voters to ask whether
        // the replica has left the group's Raft configuration.
        let removed: Vec<(GroupId, Vec<NodeId>)> = self
            .engine
            .groups()
            .filter(|&g| !g.is_metadata())
            .filter_map(|g| match state.routing.group(g) {
                Some(route) if route.is_member(self.me) => None,
                Some(_) if retired => Some((g, Vec::new())),
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
            let member = route.voters.contains(&self.me) || route.learners.contains(&self.me);
            if member && !self.engine.hosts(group) {
                to_host.push(group);
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
        for group in to_host {
            if let Err(e) = self.host(group, None) {
                tracing::error!(node = %self.me, %group, error = %e, "cannot host group");
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
            if let Some(changes) = next_change(&current, &wanted, self.me) {
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
            for peer in voters.into_iter().filter(|&p| p != me) {
                let Ok(bytes) = transport
                    .call(peer, codec::encode(&Request::Status), timeout)
                    .await
                else {
                    continue;
                };
                let Ok(Response::Status(status)) = codec::decode::<Response>(&bytes) else {
                    continue;
                };
                let Some(view) = status
                    .groups
                    .iter()
                    .find(|v| v.group == group && v.is_leader)
                else {
                    continue;
                };
                let listed = [&view.voters, &view.voters_outgoing, &view.learners]
                    .iter()
                    .any(|nodes| nodes.contains(&me));
                if !listed {
                    let _ = own.send(Command::DestroyReplica { group });
                }
                return;
            }
        });
    }

    /// Deletes this node's replica of `group`, if routing still does not
    /// list it (a move back may have re-added it since the check).
    fn destroy_replica(&mut self, group: GroupId) {
        let listed = self.metadata.as_ref().is_none_or(|c| {
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
        let Some(status) = self.engine.status(GroupId::METADATA) else {
            return Vec::new();
        };
        let topology = &cache.state().topology;
        let mut voters = topology.voters().count();
        let mut steps = Vec::new();
        for (node, info) in topology.nodes() {
            match info.state {
                NodeState::Joining => {
                    let caught_up = self
                        .engine
                        .matched(GroupId::METADATA, node)
                        .is_some_and(|m| m + CATCH_UP_LAG >= status.commit && m > 0);
                    if caught_up {
                        steps.push(TopologyChange::Activate { node_id: node });
                    }
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

    /// This replica's state of `group` and the index it reflects.
    fn local_snapshot(&self, group: GroupId) -> Option<(u64, Vec<u8>)> {
        if group.is_metadata() {
            let cache = self.metadata.as_ref()?;
            Some((cache.applied_index(), cache.snapshot()))
        } else {
            let machine = self.machines.get(&group)?;
            let applied = self.engine.status(group)?.applied;
            Some((applied, machine.snapshot()))
        }
    }

    fn status(&self) -> NodeStatus {
        let groups = self
            .engine
            .groups()
            .filter_map(|group| {
                let s = self.engine.status(group)?;
                let cs = self.engine.conf_state(group)?;
                let nodes = |ids: &[u64]| {
                    let mut nodes: Vec<NodeId> =
                        ids.iter().filter_map(|&i| NodeId::new(i).ok()).collect();
                    nodes.sort();
                    nodes
                };
                Some(GroupView {
                    group,
                    leader: s.leader,
                    is_leader: s.role == StateRole::Leader,
                    term: s.term,
                    commit: s.commit,
                    applied: s.applied,
                    voters: nodes(cs.get_voters()),
                    voters_outgoing: nodes(cs.get_voters_outgoing()),
                    learners: nodes(cs.get_learners()),
                    failed: self.failed.get(&group).cloned(),
                    unsettled: self
                        .machines
                        .get(&group)
                        .map(DataGroup::unsettled_gates)
                        .unwrap_or_default(),
                    peers: {
                        let mut peers: Vec<PeerProgress> = self
                            .engine
                            .progress(group)
                            .into_iter()
                            .map(|(node, matched, state)| PeerProgress {
                                node,
                                matched,
                                state,
                            })
                            .collect();
                        peers.sort_by_key(|p| p.node);
                        peers
                    },
                })
            })
            .collect();
        NodeStatus {
            node: self.me,
            routing_epoch: self.metadata.as_ref().map(|c| c.state().routing.epoch()),
            metadata_applied: self.metadata.as_ref().map(MetadataCache::applied_index),
            groups,
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

/// Answers a call that cannot run with why.
fn refuse(reply: oneshot::Sender<Vec<u8>>, why: String) {
    let _ = reply.send(codec::encode(&Response::Error(NodeError::BadRequest(why))));
}

/// Answers a peer's call once the local result is ready, without holding
/// up the event loop.
fn answer_later<T: Send + 'static>(
    rx: oneshot::Receiver<Result<T, NodeError>>,
    reply: oneshot::Sender<Vec<u8>>,
    wrap: fn(T) -> Response,
) {
    tokio::spawn(async move {
        let response = match rx.await {
            Ok(Ok(value)) => wrap(value),
            Ok(Err(e)) => Response::Error(e),
            Err(_) => Response::Error(NodeError::Dropped),
        };
        let _ = reply.send(codec::encode(&response));
    });
}
