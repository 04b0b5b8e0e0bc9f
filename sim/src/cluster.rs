//! A keel cluster on madsim: every keel node is a simulated machine with its
//! own IP, simulated disk and skewed clock, running the unchanged node
//! runtime. The supervisor (the run's main task) forms the cluster, runs the
//! chaos phase — workload clients on their own machines while faults are
//! injected — then heals everything and checks liveness and safety.

use crate::clock::SkewedClock;
use crate::credentials::{SimCredentials, SIM_CA};
use crate::disk::{DiskFaults, SimDisk};
use crate::history::{History, Op, Outcome as HistoryOutcome};
use crate::net::{self, NetControl, NetFaults};
use crate::swarm::Swarm;
use keel::core::cache::Bootstrap;
use keel::core::codec;
use keel::core::entry::MetadataEntry;
use keel::core::hlc::Hlc;
use keel::core::ids::{DescriptorId, GroupId, NodeId, VShardId};
use keel::core::kv::{KvCommand, KvQuery, KvResponse, KvStateMachine};
use keel::core::lease::DescriptorLease;
use keel::core::migration::MigrationPhaseTag;
use keel::core::rebalance::PlannedMove;
use keel::core::token::{JoinToken, JoinTokenTransitionKind};
use keel::core::topology::NodeState;
use keel::core::topology::TopologyChange;
use keel::io::{database_builder, open_guarded, seeded_rng, NodeIo, OpenDbError};
use keel::node::join::JoinRequest;
use keel::node::migrate::{CrashPoint, MigrationConfig};
use keel::node::rpc::{NodeError, Outcome};
use keel::node::service::{serve, Caller, ClientRequest, ClientResponse};
use keel::node::{start, MachineFactory, Node, NodeConfig};
use madsim::runtime::{Handle, NodeHandle};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{sleep, Instant};

/// How long the healed cluster has to serve every group again.
pub const LIVENESS_BOUND: Duration = Duration::from_secs(60);
/// How long a lost node's decommission may take, from the end of the
/// liveness phase until it has left the topology. Longer than
/// [`LIVENESS_BOUND`]: moves already heading to the dead node must time out
/// in `CatchUp` first (8 s each), and every pass of the coordinator waits
/// out a status call to it.
pub const REPLACEMENT_BOUND: Duration = Duration::from_secs(120);

/// A run's verdict: `Err` says what broke, where and when.
pub type Verdict = Result<Report, String>;

/// What a passing run observed.
#[derive(Debug, Default)]
pub struct Report {
    pub history: History,
    pub trace: Vec<String>,
    pub simulated_ms: u64,
    /// Final replica states, in node and group order, for the trace hash.
    pub final_states: Vec<u8>,
}

fn n(id: u64) -> NodeId {
    NodeId::new(id).expect("node ids start at 1")
}

/// The latest handle of each running keel node.
type Registry = Arc<Mutex<BTreeMap<NodeId, Node>>>;

/// Nodes whose disk redb found damaged at start-up: lost for good, to be
/// replaced, never restarted (DESIGN.md §3.3).
type LostNodes = Arc<Mutex<BTreeSet<NodeId>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

struct SimNode {
    machine: NodeHandle,
    disk: SimDisk,
    up: bool,
    paused: bool,
    /// When the node was last (re)started.
    started: Instant,
}

/// How long a process supervisor (systemd, say) waits before restarting a
/// node that stopped itself.
const SUPERVISOR_RESTART: Duration = Duration::from_secs(1);
/// How often the chaos loop looks for a coordinator stalled at a crash point.
const CRASH_POINT_POLL: Duration = Duration::from_millis(5);
/// Coordinators stalled (and killed) at the crash phase, at most, per run.
const CRASH_PHASE_KILLS: usize = 3;

/// The swarm's crash points: coordinators that claimed a row in the crash
/// phase stall there (see [`MigrationConfig::crash_point`]) until the chaos
/// loop kills them.
#[derive(Default)]
struct CrashPoints {
    left: usize,
    stalled: Vec<NodeId>,
}

type SharedCrashPoints = Arc<Mutex<CrashPoints>>;

/// The hook a node's executor calls as it claims a row.
fn crash_hook(phase: Option<MigrationPhaseTag>, points: &SharedCrashPoints) -> Option<CrashPoint> {
    let phase = phase?;
    let points = Arc::clone(points);
    Some(CrashPoint(Arc::new(move |node, at| {
        let mut points = lock(&points);
        if at != phase || points.left == 0 {
            return false;
        }
        points.left -= 1;
        points.stalled.push(node);
        true
    })))
}

pub struct SimCluster {
    swarm: Swarm,
    handle: Handle,
    start: Instant,
    rng: ChaCha8Rng,
    nodes: BTreeMap<NodeId, SimNode>,
    registry: Registry,
    net: NetControl,
    net_faults: Arc<Mutex<NetFaults>>,
    trace: Arc<Mutex<Vec<String>>>,
    consumed: TokenConsumptions,
    crash_points: SharedCrashPoints,
    /// Nodes killed at a crash point, and when they come back.
    due_restarts: Vec<(NodeId, Instant)>,
    lost: LostNodes,
}

impl SimCluster {
    fn log(&self, event: String) {
        log_to(&self.trace, self.start, event);
    }

    fn chaos_net_faults(swarm: &Swarm) -> NetFaults {
        NetFaults {
            loss: swarm.loss,
            duplicate: swarm.duplicate,
            reorder_ms: swarm.reorder_ms,
            spike: swarm.spike,
            spike_ms: swarm.spike_ms,
        }
    }

    /// Creates the machines and starts node 1, which bootstraps the cluster.
    pub fn new(swarm: Swarm) -> Self {
        let handle = Handle::current();
        let start = Instant::now();
        let registry: Registry = Arc::default();
        let net_faults = Arc::new(Mutex::new(NetFaults::default()));
        let trace = Arc::new(Mutex::new(Vec::new()));
        let mut rng = ChaCha8Rng::seed_from_u64(swarm.seed);
        let net = NetControl::default();
        let crash_points = Arc::new(Mutex::new(CrashPoints {
            left: CRASH_PHASE_KILLS,
            stalled: Vec::new(),
        }));
        let lost = LostNodes::default();
        let mut nodes = BTreeMap::new();
        for id in (1..=swarm.nodes).map(n) {
            let disk = SimDisk::new(rng.next_u64(), disk_faults(&swarm, id, false));
            let offset = signed(&mut rng, swarm.clock_offset_ms);
            let drift = signed(&mut rng, swarm.clock_drift_ppm);
            let node_seed = rng.next_u64();
            let machine = handle
                .create_node()
                .name(format!("{id}"))
                .ip(net::node_ip(id))
                .init(node_main(NodeSetup {
                    id,
                    swarm: swarm.clone(),
                    disk: disk.clone(),
                    registry: registry.clone(),
                    net_faults: Arc::clone(&net_faults),
                    clock: (start, offset, drift),
                    seed: node_seed,
                    crash_point: crash_hook(swarm.crash_phase, &crash_points),
                    lost: Arc::clone(&lost),
                }))
                .build();
            net.register(id, machine.id());
            nodes.insert(
                id,
                SimNode {
                    machine,
                    disk,
                    up: true,
                    paused: false,
                    started: start,
                },
            );
        }
        SimCluster {
            swarm,
            handle,
            start,
            rng,
            nodes,
            registry,
            net,
            net_faults,
            trace,
            consumed: Arc::default(),
            crash_points,
            due_restarts: Vec::new(),
            lost,
        }
    }

    /// Only bit rot damages a disk: every torn write, injected I/O error
    /// and crash must leave a database redb recovers. A node lost without
    /// rot means keel's commits are not crash safe.
    pub fn damage_only_from_rot(&self) -> Result<(), String> {
        for &id in lock(&self.lost).iter() {
            if self.nodes[&id].disk.stats().bit_flips == 0 {
                return Err(format!(
                    "seed {}: crash safety: {id}'s database was damaged, but its disk never rotted",
                    self.swarm.seed
                ));
            }
        }
        Ok(())
    }

    /// Replacement (DESIGN.md §3.3): every node lost with its disk is
    /// decommissioned — its replicas rebuilt from their sound copies on the
    /// other nodes — and leaves the topology within the bound, unless the
    /// other nodes are too few to hold its replicas.
    pub async fn lost_nodes_removed(&self) -> Result<(), String> {
        let lost: Vec<NodeId> = lock(&self.lost).iter().copied().collect();
        for id in lost {
            self.until(
                REPLACEMENT_BOUND,
                &format!("{id}, lost with its disk, to be decommissioned and removed"),
                Removed(id),
            )
            .await?;
        }
        Ok(())
    }

    /// Token single use: no join token was consumed twice.
    pub fn tokens_used_once(&self) -> Result<(), String> {
        match lock(&self.consumed).iter().find(|(_, &n)| n > 1) {
            Some((hash, n)) => Err(format!(
                "seed {}: token single use: token {:02x}.. was consumed {n} times",
                self.swarm.seed, hash[0]
            )),
            None => Ok(()),
        }
    }

    fn node(&self, id: NodeId) -> Option<Node> {
        lock(&self.registry).get(&id).cloned()
    }

    fn up_nodes(&self) -> Vec<NodeId> {
        self.nodes
            .iter()
            .filter(|(id, s)| s.up && !s.paused && !self.is_lost(**id))
            .map(|(&id, _)| id)
            .collect()
    }

    fn is_lost(&self, id: NodeId) -> bool {
        lock(&self.lost).contains(&id)
    }

    /// Waits for `check`, polling every 50 ms of simulated time.
    async fn until<T>(
        &self,
        bound: Duration,
        what: &str,
        mut check: impl AsyncCheck<T>,
    ) -> Result<T, String> {
        let deadline = Instant::now() + bound;
        loop {
            if let Some(value) = check.check(self).await {
                return Ok(value);
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "seed {}: not reached within {} s of simulated time: {what}",
                    self.swarm.seed,
                    bound.as_secs()
                ));
            }
            sleep(Duration::from_millis(50)).await;
        }
    }

    /// Joins every node through group 0 and waits for the data groups to
    /// reach the swarm's replication factor — fault-free.
    pub async fn form(&mut self) -> Result<(), String> {
        self.until(Duration::from_secs(30), "node 1 serves", Ready(n(1)))
            .await?;
        let admin = self.node(n(1)).ok_or("node 1 did not start")?;
        for id in (2..=self.swarm.nodes).map(n) {
            self.admit(&admin, id).await?;
        }
        let voters = self.swarm.nodes.min(keel::node::MAX_METADATA_VOTERS as u64) as usize;
        self.until(
            Duration::from_secs(60),
            "group 0 has its voters",
            MetadataVoters(voters),
        )
        .await?;
        self.until(Duration::from_secs(60), "every node is active", AllActive)
            .await?;
        // The group-0 leader places replicas up to the replication factor.
        self.until(
            Duration::from_secs(60),
            "data groups reach their replication factor",
            GroupsReplicated,
        )
        .await?;
        self.log(format!("formed: {} nodes", self.swarm.nodes));
        Ok(())
    }

    /// Admits node `id` the way an operator joins a node: a token issued
    /// through the client service, then presented by the joiner, which must
    /// be granted exactly the id of the machine waiting for it.
    async fn admit(&self, via: &Node, id: NodeId) -> Result<(), String> {
        let issue = ClientRequest::IssueToken { ttl_ms: 60_000 };
        let token = match service_call(via, Caller::Admin, &issue).await? {
            ClientResponse::Token { token, .. } => token,
            other => return Err(format!("issuing a token for {id}: {other:?}")),
        };
        let join = join_request(&token, id.to_string(), net::node_addr(id).to_string());
        match service_call(via, Caller::Anonymous, &join).await? {
            ClientResponse::Joined(grant) if grant.node_id == id => {
                *lock(&self.consumed)
                    .entry(JoinToken::parse(&token).map_err(|e| e.to_string())?.hash())
                    .or_default() += 1;
                Ok(())
            }
            other => Err(format!("seed {}: join of {id}: {other:?}", self.swarm.seed)),
        }
    }

    /// The chaos phase: clients run their operations while faults strike.
    pub async fn chaos(&mut self, history: Arc<Mutex<History>>) {
        *lock(&self.net_faults) = Self::chaos_net_faults(&self.swarm);
        for (&id, state) in &self.nodes {
            state.disk.set_faults(disk_faults(&self.swarm, id, true));
        }
        let done = Arc::new(AtomicU64::new(0));
        for client in 0..self.swarm.clients {
            let machine = self
                .handle
                .create_node()
                .name(format!("client{client}"))
                .ip(IpAddr::V4(Ipv4Addr::new(10, 9, 0, client as u8 + 1)))
                .build();
            let task = client_loop(
                client,
                self.swarm.clone(),
                self.registry.clone(),
                Arc::clone(&history),
                self.start,
                self.rng.next_u64(),
                Arc::clone(&done),
            );
            machine.spawn(task);
        }
        if self.swarm.metadata_ops > 0 {
            let machine = self.handle.create_node().name("admin").build();
            machine.spawn(metadata_loop(
                self.swarm.clone(),
                self.registry.clone(),
                self.start,
                self.rng.next_u64(),
                Arc::clone(&self.consumed),
            ));
            // Two joiners, so that concurrent joins race for node ids.
            for joiner in 0..2 {
                let machine = self
                    .handle
                    .create_node()
                    .name(format!("joiner{joiner}"))
                    .build();
                machine.spawn(join_loop(
                    self.swarm.metadata_ops / 2,
                    self.registry.clone(),
                    self.rng.next_u64(),
                    Arc::clone(&self.consumed),
                ));
            }
        }
        if self.swarm.rotting_node.is_some() {
            let machine = self.handle.create_node().name("operator").build();
            machine.spawn(replace_lost_nodes(
                self.registry.clone(),
                Arc::clone(&self.lost),
                Arc::clone(&self.trace),
                self.start,
            ));
        }
        if self.swarm.migration_ops > 0 {
            let machine = self.handle.create_node().name("mover").build();
            machine.spawn(migration_loop(
                self.swarm.clone(),
                self.registry.clone(),
                self.rng.next_u64(),
            ));
        }
        let chaos_end = Instant::now() + Duration::from_millis(self.swarm.chaos_ms);
        loop {
            let clients_done = done.load(Ordering::SeqCst) == self.swarm.clients;
            if clients_done && Instant::now() >= chaos_end {
                break;
            }
            if self.swarm.fault_interval_ms == 0 {
                sleep(Duration::from_millis(100)).await;
                self.restart_stopped();
                continue;
            }
            let pause = 1 + self.rng.next_u64() % (2 * self.swarm.fault_interval_ms);
            self.sleep_watching_phases(Duration::from_millis(pause))
                .await;
            self.restart_stopped();
            if self.swarm.kills && self.rng.next_u64() % 3 == 0 {
                self.kill_coordinator().await;
            } else {
                self.inject_fault();
            }
        }
    }

    /// Kills the group-0 leader — the migration coordinator — while a
    /// migration is open, so that every phase gets resumed (or aborted) by
    /// a new coordinator in some seed.
    async fn kill_coordinator(&mut self) {
        for id in self.up_nodes() {
            let Some(node) = self.node(id) else { continue };
            let Ok(Some(view)) = node.group(GroupId::METADATA).await else {
                continue;
            };
            if !view.is_leader {
                continue;
            }
            let open = node.metadata_local().await.is_ok_and(|state| {
                state
                    .migrations
                    .values()
                    .any(|row| row.phase != MigrationPhaseTag::Complete)
            });
            if open {
                self.log(format!("kill coordinator {id}"));
                self.kill(id);
            }
            return;
        }
    }

    /// Sleeps `pause`; meanwhile, if the swarm names a crash phase, kills
    /// each coordinator that stalled at it (see [`CrashPoints`]) and
    /// restarts it 0.2–1 s later.
    async fn sleep_watching_phases(&mut self, pause: Duration) {
        if self.swarm.crash_phase.is_none() {
            return sleep(pause).await;
        }
        let wake = Instant::now() + pause;
        while Instant::now() < wake {
            sleep(CRASH_POINT_POLL.min(wake - Instant::now())).await;
            let now = Instant::now();
            let due: Vec<NodeId> = self
                .due_restarts
                .iter()
                .filter(|(_, at)| *at <= now)
                .map(|(id, _)| *id)
                .collect();
            self.due_restarts.retain(|(_, at)| *at > now);
            for id in due {
                if !self.nodes[&id].up {
                    self.restart(id);
                }
            }
            for id in self.kill_stalled() {
                let back = Duration::from_millis(200 + self.rng.next_u64() % 800);
                self.due_restarts.push((id, now + back));
            }
        }
    }

    /// Kills every coordinator stalled at a crash point; returns them.
    fn kill_stalled(&mut self) -> Vec<NodeId> {
        let stalled = std::mem::take(&mut lock(&self.crash_points).stalled);
        for &id in &stalled {
            if let Some(phase) = self.swarm.crash_phase {
                self.log(format!(
                    "kill coordinator {id} at its crash point, phase {phase:?}"
                ));
            }
            if self.nodes[&id].up {
                self.kill(id);
            }
        }
        stalled
    }

    /// Migration completeness (DESIGN.md §8): every migration ended
    /// `Complete` or was aborted, and nothing was leaked — no fence or
    /// partial copy in any data group, no replica on a node routing does
    /// not list, no ghost stub past its time.
    pub async fn migrations_settled(&self) -> Result<(), String> {
        self.until(
            LIVENESS_BOUND,
            "migrations to settle without leaks",
            Settled,
        )
        .await
        .map_err(|e| format!("migration completeness: {e}"))
    }

    /// Restarts nodes that stopped themselves (a storage failure), as a
    /// process supervisor would.
    fn restart_stopped(&mut self) {
        let stopped: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(id, s)| {
                s.up && s.started.elapsed() > SUPERVISOR_RESTART
                    && lock(&self.registry).get(id).is_none()
                    && !self.is_lost(**id)
            })
            .map(|(&id, _)| id)
            .collect();
        for id in stopped {
            self.nodes[&id].disk.kill_process();
            self.log(format!("{id} stopped itself"));
            self.restart(id);
        }
    }

    fn inject_fault(&mut self) {
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        let pick = |rng: &mut ChaCha8Rng| ids[(rng.next_u64() % ids.len() as u64) as usize];
        match self.rng.next_u64() % 6 {
            0 | 1 if self.swarm.kills => {
                let id = pick(&mut self.rng);
                if self.nodes[&id].up {
                    self.kill(id);
                } else {
                    self.restart(id);
                }
            }
            2 | 3 if self.swarm.partitions => {
                let (a, b) = (pick(&mut self.rng), pick(&mut self.rng));
                if a == b {
                    self.net.isolate(a);
                    self.log(format!("isolate {a}"));
                } else if self.rng.next_u64() % 2 == 0 {
                    self.net.partition(a, b);
                    self.log(format!("partition {a} <-> {b}"));
                } else {
                    self.net.cut_one_way(a, b);
                    self.log(format!("cut {a} -> {b}"));
                }
            }
            4 if self.swarm.pauses => {
                let id = pick(&mut self.rng);
                let state = self.nodes.get_mut(&id).expect("known node");
                if state.up {
                    if state.paused {
                        self.handle.resume(state.machine.id());
                    } else {
                        self.handle.pause(state.machine.id());
                    }
                    state.paused = !state.paused;
                    let what = if state.paused { "pause" } else { "resume" };
                    self.log(format!("{what} {id}"));
                }
            }
            _ => {
                self.net.heal_all();
                self.log("heal network".into());
            }
        }
    }

    fn kill(&mut self, id: NodeId) {
        let state = self.nodes.get_mut(&id).expect("known node");
        self.handle.kill(state.machine.id());
        // Power loss: what was written but not synced is lost or torn.
        let rot = state.disk.crash();
        state.up = false;
        state.paused = false;
        lock(&self.registry).remove(&id);
        self.log(format!("kill {id}"));
        if let Some(byte) = rot {
            self.log(format!("bit rot on {id}'s disk, byte {byte}"));
        }
    }

    /// Restarts a node, unless its disk was found damaged: a lost node stays
    /// down until it is replaced.
    fn restart(&mut self, id: NodeId) {
        if self.is_lost(id) {
            return;
        }
        let state = self.nodes.get_mut(&id).expect("known node");
        // madsim's restart keeps the node's sockets; a kill first resets
        // them, as a real process restart does.
        self.handle.kill(state.machine.id());
        self.handle.restart(state.machine.id());
        state.up = true;
        state.started = Instant::now();
        self.log(format!("restart {id}"));
    }

    /// Heals every fault and restarts every node.
    pub fn heal(&mut self) {
        // No crash points once the chaos is over: a coordinator stalled
        // after the heal would never be killed, and nothing would resume.
        lock(&self.crash_points).left = 0;
        self.kill_stalled();
        *lock(&self.net_faults) = NetFaults::default();
        self.net.heal_all();
        let ids: Vec<NodeId> = self.nodes.keys().copied().collect();
        for id in ids {
            let state = self.nodes.get_mut(&id).expect("known node");
            state.disk.set_faults(disk_faults(&self.swarm, id, false));
            if state.paused {
                self.handle.resume(state.machine.id());
                state.paused = false;
            }
            if state.up && lock(&self.registry).get(&id).is_none() {
                // The node stopped itself (a storage failure): its process
                // died, the machine did not.
                state.disk.kill_process();
            }
            if !state.up || lock(&self.registry).get(&id).is_none() {
                self.restart(id);
            }
        }
        self.log("heal all".into());
    }

    /// The liveness phase: every group serves writes again, within the bound.
    pub async fn liveness(&mut self) -> Result<(), String> {
        self.until(LIVENESS_BOUND, "every node runs", AllRunning)
            .await?;
        let groups = self.swarm.data_groups;
        for g in 1..=groups {
            let vshard = VShardId::all()
                .find(|v| v.get() as u64 % groups + 1 == g)
                .expect("every group has vShards");
            let key = liveness_key(vshard);
            let writable = self
                .until(
                    LIVENESS_BOUND,
                    &format!("group {g} accepts a write"),
                    Writable(key.clone()),
                )
                .await;
            if let Err(e) = writable {
                let replicas = self.replica_summary(GroupId(g)).await;
                return Err(format!("{e}; replicas: {replicas}"));
            }
        }
        self.log("liveness: every group writable".into());
        Ok(())
    }

    /// Final reads of every workload key, recorded into the history so that
    /// the linearizability check also proves durability.
    pub async fn final_reads(&self, history: &Arc<Mutex<History>>) -> Result<(), String> {
        for k in 0..self.swarm.keys {
            let key = workload_key(k);
            // Process ids from FINAL_READER up never collide with clients'.
            let id = lock(history)
                .invoke(FINAL_READER + k, &key, Op::Get, self.elapsed_us())
                .map_err(|e| format!("history: {e}"))?;
            let value = self
                .until(
                    LIVENESS_BOUND,
                    &format!("final read of {key}"),
                    Readable(key.clone()),
                )
                .await?;
            lock(history)
                .complete(id, HistoryOutcome::Ok(value), self.elapsed_us())
                .map_err(|e| format!("history: {e}"))?;
        }
        Ok(())
    }

    /// Replicas of every group converge byte for byte at equal applied indexes.
    pub async fn converged(&self) -> Result<Vec<u8>, String> {
        let mut groups = vec![GroupId::METADATA];
        groups.extend((1..=self.swarm.data_groups).map(GroupId));
        let mut finals = Vec::new();
        for group in groups {
            let waited = self
                .until(
                    Duration::from_secs(30),
                    &format!("replicas of {group} converge"),
                    Converged(group),
                )
                .await;
            let states = match waited {
                Ok(states) => states,
                Err(e) => {
                    return Err(format!(
                        "{e}; replicas: {}",
                        self.replica_summary(group).await
                    ))
                }
            };
            for (_, bytes) in states {
                finals.extend_from_slice(&bytes);
            }
        }
        Ok(finals)
    }

    /// Each node's applied index and state checksum for `group`, for
    /// failure messages.
    async fn replica_summary(&self, group: GroupId) -> String {
        let mut parts = Vec::new();
        for id in self.up_nodes() {
            let Some(node) = self.node(id) else { continue };
            let view = node.group(group).await.ok().flatten();
            let state = node.local_snapshot(group).await.ok().flatten();
            parts.push(format!(
                "{id}: {} {}",
                state.map_or("no replica".to_string(), |(i, b)| format!(
                    "applied {i} crc {:08x}",
                    crc32c::crc32c(&b)
                )),
                view.map_or(String::new(), |v| format!(
                    "(term {} commit {} leader {:?} voters {:?} learners {:?} failed {:?} peers {:?})",
                    v.term, v.commit, v.leader, v.voters, v.learners, v.failed, v.peers
                ))
            ));
        }
        parts.join("; ")
    }

    fn elapsed_us(&self) -> u64 {
        self.start.elapsed().as_micros() as u64
    }

    pub fn trace(&self) -> Vec<String> {
        lock(&self.trace).clone()
    }

    pub fn simulated_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }
}

fn signed(rng: &mut ChaCha8Rng, bound: u64) -> i64 {
    if bound == 0 {
        0
    } else {
        (rng.next_u64() % (2 * bound + 1)) as i64 - bound as i64
    }
}

/// What a node's machine is made of, fixed across its restarts.
struct NodeSetup {
    id: NodeId,
    swarm: Swarm,
    disk: SimDisk,
    registry: Registry,
    net_faults: Arc<Mutex<NetFaults>>,
    /// The simulation's start, and the node's clock offset and drift.
    clock: (Instant, i64, i64),
    seed: u64,
    crash_point: Option<CrashPoint>,
    lost: LostNodes,
}

/// A node's disk faults: none but torn writes and latency outside the chaos
/// phase; during it, injected I/O errors, and bit rot on the swarm's one
/// rotting disk.
fn disk_faults(swarm: &Swarm, id: NodeId, chaos: bool) -> DiskFaults {
    let rots = chaos && swarm.rotting_node == Some(id.get());
    DiskFaults {
        keep_unsynced: swarm.keep_unsynced,
        io_error_rate: if chaos { swarm.io_error_rate } else { 0.0 },
        sync_latency_ms: swarm.sync_latency_ms,
        bit_flip_rate: if rots { swarm.bit_flip_rate } else { 0.0 },
    }
}

/// The body of a keel node's machine; madsim runs it again on every restart.
fn node_main(
    setup: NodeSetup,
) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> + Send + Sync + 'static {
    let NodeSetup {
        id,
        swarm,
        disk,
        registry,
        net_faults,
        clock,
        seed,
        crash_point,
        lost,
    } = setup;
    let incarnation = Arc::new(AtomicU64::new(0));
    move || {
        let swarm = swarm.clone();
        let crash_point = crash_point.clone();
        let disk = disk.clone();
        let registry = registry.clone();
        let net_faults = Arc::clone(&net_faults);
        let lost = Arc::clone(&lost);
        let run = incarnation.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let run_seed = seed ^ run.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let (transport, inbound) = match net::bind(id, net_faults, run_seed).await {
                Ok(bound) => bound,
                Err(e) => return tracing::error!(%id, error = %e, "cannot bind"),
            };
            let db = match open_guarded(|| database_builder().create_with_backend(disk.backend())) {
                Ok(db) => db,
                Err(e) => {
                    if matches!(e, OpenDbError::Damaged(_)) {
                        lock(&lost).insert(id);
                    }
                    return tracing::error!(%id, error = %e, "cannot open the database");
                }
            };
            let io = NodeIo {
                transport,
                inbound,
                clock: Arc::new(SkewedClock::new(clock.0, clock.1, clock.2)),
                rng: seeded_rng(run_seed),
                db: Arc::new(db),
                storage_latency: Some(Arc::new(disk.clone())),
            };
            let mut config = NodeConfig::new(id);
            config.tick_interval = Duration::from_millis(swarm.tick_ms);
            config.request_timeout = Duration::from_secs(2);
            config.engine.compact_threshold = 200;
            // Joins abandoned under chaos come back within the run.
            config.join_dead_man = Duration::from_secs(2);
            // Moves time out, and ghost stubs expire, within a run.
            config.migration = MigrationConfig {
                poll: Duration::from_millis(50),
                phase_timeout: Duration::from_secs(8),
                ghost_ttl: Duration::from_secs(2),
                crash_point,
                ..MigrationConfig::default()
            };
            let bootstrap = (id == n(1)).then(|| Bootstrap {
                cluster_id: swarm
                    .seed
                    .to_be_bytes()
                    .repeat(2)
                    .try_into()
                    .expect("16 bytes"),
                node_id: id,
                addr: net::node_addr(id).to_string(),
                data_groups: swarm.data_groups,
                replication_factor: swarm.replication_factor,
                ca_cert_der: SIM_CA.to_vec(),
            });
            let factory: MachineFactory = Arc::new(|_| Box::new(KvStateMachine::new()));
            match start(config, io, bootstrap, factory, Box::new(())) {
                Ok((node, task)) => {
                    lock(&registry).insert(id, node);
                    let _ = task.await;
                    // The runtime stopped itself; its handle is dead.
                    lock(&registry).remove(&id);
                }
                Err(e) => tracing::error!(%id, error = %e, "node failed to start"),
            }
        })
    }
}

/// History process ids: each client owns a block of them, and switches to
/// the next after an operation with an unknown outcome.
const PROCESSES_PER_CLIENT: u64 = 1_000_000;
/// The first process id of the final reads (beyond every client's block).
const FINAL_READER: u64 = 1 << 40;

pub fn workload_key(k: u64) -> String {
    format!("key{k}")
}

fn liveness_key(vshard: VShardId) -> String {
    // Any key of that vShard will do; search a small deterministic space.
    (0u64..)
        .map(|i| format!("live{i}"))
        .find(|k| VShardId::for_key(k.as_bytes()) == vshard)
        .expect("some key maps to every vShard")
}

/// One client: `ops_per_client` operations on random keys through random
/// live nodes, each recorded in the history.
async fn client_loop(
    client: u64,
    swarm: Swarm,
    registry: Registry,
    history: Arc<Mutex<History>>,
    start: Instant,
    seed: u64,
    done: Arc<AtomicU64>,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut generation = 0;
    let now = || start.elapsed().as_micros() as u64;
    for op_number in 0..swarm.ops_per_client {
        // Most operations contend on a few hot keys; the rest touch keys
        // spread over the whole vShard space (and so every data group).
        let key = if rng.next_u64() % 4 == 0 {
            format!("cold{}", rng.next_u64() % 100_000)
        } else {
            workload_key(rng.next_u64() % swarm.keys)
        };
        let roll = rng.next_u64() % 100;
        let value = format!("c{client}-{op_number}");
        let op = if roll < swarm.read_percent {
            Op::Get
        } else if roll < swarm.read_percent + swarm.cas_percent {
            let expected = (rng.next_u64() % 2 == 0).then(|| {
                format!(
                    "c{}-{}",
                    rng.next_u64() % swarm.clients,
                    rng.next_u64() % op_number.max(1)
                )
            });
            Op::Cas {
                expected,
                new: value.clone(),
            }
        } else {
            Op::Put {
                value: value.clone(),
            }
        };
        let node = {
            let nodes = lock(&registry);
            let live: Vec<Node> = nodes.values().cloned().collect();
            if live.is_empty() {
                None
            } else {
                Some(live[(rng.next_u64() % live.len() as u64) as usize].clone())
            }
        };
        let Some(node) = node else {
            sleep(Duration::from_millis(100)).await;
            continue;
        };
        let process = client * PROCESSES_PER_CLIENT + generation;
        let id = lock(&history)
            .invoke(process, &key, op.clone(), now())
            .expect("a client invokes one operation at a time, in time order");
        let outcome = execute(&node, &key, &op).await;
        // After an unknown outcome the process is "crashed" (its operation
        // may still take effect at any time); the client carries on as a
        // new process, as Jepsen histories require.
        if outcome == HistoryOutcome::Info {
            generation += 1;
        }
        lock(&history)
            .complete(id, outcome, now())
            .expect("each operation completes once, in time order");
        sleep(Duration::from_millis(rng.next_u64() % 50)).await;
    }
    done.fetch_add(1, Ordering::SeqCst);
}

/// Runs one operation. Anything but a definite answer is `Info`: the
/// operation may or may not have taken effect.
async fn execute(node: &Node, key: &str, op: &Op) -> HistoryOutcome {
    let key_bytes = key.as_bytes().to_vec();
    let vshard = VShardId::for_key(&key_bytes);
    match op {
        Op::Get => match node
            .read(vshard, codec::encode(&KvQuery::Get { key: key_bytes }))
            .await
        {
            Ok(bytes) => match codec::decode::<KvResponse>(&bytes) {
                Ok(KvResponse::Value(v)) => HistoryOutcome::Ok(v.map(lossy)),
                _ => HistoryOutcome::Fail,
            },
            // A read that did not complete changed nothing.
            Err(_) => HistoryOutcome::Fail,
        },
        Op::Put { value } => {
            let command = KvCommand::Put {
                key: key_bytes,
                value: value.as_bytes().to_vec(),
            };
            match node.propose(vshard, codec::encode(&command)).await {
                Ok(c) => match c.outcome {
                    Outcome::Data(bytes) => match codec::decode::<KvResponse>(&bytes) {
                        Ok(KvResponse::Value(_)) => HistoryOutcome::Ok(None),
                        _ => HistoryOutcome::Fail,
                    },
                    Outcome::Metadata(_) | Outcome::Control(_) => HistoryOutcome::Info,
                },
                Err(e) => indefinite(&e),
            }
        }
        Op::Cas { expected, new } => {
            let command = KvCommand::Cas {
                key: key_bytes,
                expected: expected.as_ref().map(|e| e.as_bytes().to_vec()),
                new: Some(new.as_bytes().to_vec()),
            };
            match node.propose(vshard, codec::encode(&command)).await {
                Ok(c) => match c.outcome {
                    Outcome::Data(bytes) => match codec::decode::<KvResponse>(&bytes) {
                        Ok(KvResponse::Ok) => HistoryOutcome::Ok(None),
                        Ok(KvResponse::CasFailed { .. }) => HistoryOutcome::Fail,
                        _ => HistoryOutcome::Info,
                    },
                    Outcome::Metadata(_) | Outcome::Control(_) => HistoryOutcome::Info,
                },
                Err(e) => indefinite(&e),
            }
        }
    }
}

/// Errors that prove a write never reached the log are failures; the rest
/// leave its fate unknown.
fn indefinite(error: &NodeError) -> HistoryOutcome {
    match error {
        NodeError::NoMetadata
        | NodeError::BadRequest(_)
        | NodeError::WrongGroup(_)
        | NodeError::Unavailable(_) => HistoryOutcome::Fail,
        _ => HistoryOutcome::Info,
    }
}

fn lossy(bytes: Vec<u8>) -> String {
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Group-0 traffic during chaos: DDL, leases and drains, surrogate allocation.
/// How many times each join token was consumed, as acknowledged to the
/// proposers: the token single-use checker's evidence.
pub type TokenConsumptions = Arc<Mutex<BTreeMap<[u8; 32], u32>>>;

async fn metadata_loop(
    swarm: Swarm,
    registry: Registry,
    start: Instant,
    seed: u64,
    consumed: TokenConsumptions,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for _ in 0..swarm.metadata_ops {
        let node = lock(&registry).values().next().cloned();
        let Some(node) = node else {
            sleep(Duration::from_millis(200)).await;
            continue;
        };
        let now_ms = crate::clock::EPOCH_MS + start.elapsed().as_millis() as u64;
        let entry = match rng.next_u64() % 6 {
            4 | 5 => {
                let transition = match rng.next_u64() % 6 {
                    0 => JoinTokenTransitionKind::Register {
                        expires_at_ms: now_ms + 5_000,
                    },
                    1 => JoinTokenTransitionKind::Begin,
                    2 | 3 => JoinTokenTransitionKind::Consume,
                    4 => JoinTokenTransitionKind::Revert,
                    _ => JoinTokenTransitionKind::Abort,
                };
                let token_hash = [(rng.next_u64() % 4) as u8; 32];
                let entry = MetadataEntry::JoinTokenTransition {
                    token_hash,
                    transition,
                    ts_ms: now_ms,
                };
                if let Ok(committed) = node.propose_metadata(entry).await {
                    let applied = committed.outcome == Outcome::Metadata(None);
                    if applied && transition == JoinTokenTransitionKind::Consume {
                        *lock(&consumed).entry(token_hash).or_default() += 1;
                    }
                }
                sleep(Duration::from_millis(50 + rng.next_u64() % 200)).await;
                continue;
            }
            0 => MetadataEntry::CatalogDdl {
                payload: rng.next_u64().to_be_bytes().to_vec(),
            },
            1 => MetadataEntry::DescriptorLeaseGrant(DescriptorLease {
                descriptor_id: DescriptorId(rng.next_u64() % 4),
                version: rng.next_u64() % 4,
                node_id: n(1 + rng.next_u64() % swarm.nodes),
                expires_at: Hlc::new(now_ms + 10_000, 0),
            }),
            2 => MetadataEntry::DescriptorDrainStart {
                descriptor_id: DescriptorId(rng.next_u64() % 4),
                up_to_version: rng.next_u64() % 4,
                expires_at: Hlc::new(now_ms + 1_000, 0),
            },
            _ => MetadataEntry::SurrogateAlloc {
                hwm: (rng.next_u64() % 1_000_000) as u32,
            },
        };
        let _ = node.propose_metadata(entry).await;
        sleep(Duration::from_millis(50 + rng.next_u64() % 200)).await;
    }
}

/// Moves under chaos, through the client service of random nodes, as an
/// operator would start them: vShard moves, replica moves, rebalances and
/// (at most once, when the cluster can spare a node) a decommission.
async fn migration_loop(swarm: Swarm, registry: Registry, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut decommissioned = false;
    for _ in 0..swarm.migration_ops {
        sleep(Duration::from_millis(200 + rng.next_u64() % 600)).await;
        let nodes: Vec<Node> = lock(&registry).values().cloned().collect();
        if nodes.is_empty() {
            continue;
        }
        let via = nodes[(rng.next_u64() % nodes.len() as u64) as usize].clone();
        let Ok(state) = via.metadata_local().await else {
            continue;
        };
        let group = GroupId(1 + rng.next_u64() % swarm.data_groups);
        let active: Vec<NodeId> = state
            .topology
            .nodes()
            .filter(|(_, info)| matches!(info.state, NodeState::Active(_)))
            .map(|(id, _)| id)
            .collect();
        let request = match rng.next_u64() % 10 {
            0..=3 => {
                let vshard = VShardId::new((rng.next_u64() % 1024) as u16).expect("in range");
                let from = state.routing.lookup(vshard).group;
                if group == from {
                    continue;
                }
                ClientRequest::Migrate(PlannedMove::VShard {
                    vshard,
                    from,
                    to: group,
                })
            }
            4..=7 => {
                let Some(route) = state.routing.group(group) else {
                    continue;
                };
                let members: Vec<NodeId> = route
                    .voters
                    .iter()
                    .chain(&route.learners)
                    .copied()
                    .collect();
                let targets: Vec<NodeId> = active
                    .iter()
                    .copied()
                    .filter(|id| !route.is_member(*id))
                    .collect();
                if members.is_empty() || targets.is_empty() {
                    continue;
                }
                ClientRequest::Migrate(PlannedMove::Replica {
                    group,
                    source: members[(rng.next_u64() % members.len() as u64) as usize],
                    target: targets[(rng.next_u64() % targets.len() as u64) as usize],
                })
            }
            8 => ClientRequest::Rebalance {
                dry_run: false,
                max_moves: 2,
            },
            _ => {
                // Only with a node to spare beyond the replication factor.
                if decommissioned || (active.len() as u64) <= swarm.replication_factor as u64 + 1 {
                    continue;
                }
                decommissioned = true;
                let node = active[(rng.next_u64() % active.len() as u64) as usize];
                ClientRequest::Decommission {
                    node,
                    dry_run: rng.next_u64() % 4 == 0,
                }
            }
        };
        let _ = service_call(&via, Caller::Admin, &request).await;
    }
}

/// Appends `event` to the run's trace, stamped with the simulated time since
/// `start`.
fn log_to(trace: &Mutex<Vec<String>>, start: Instant, event: String) {
    let at = start.elapsed().as_millis();
    lock(trace).push(format!("{at:>7} ms  {event}"));
}

/// The operator's answer to a node whose disk is damaged (DESIGN.md §3.3):
/// decommission it, so that its replicas are rebuilt on the other nodes from
/// their sound copies. Retried until keel accepts it: a decommission waits
/// for a group-0 leader, and is refused while the other nodes could not take
/// the lost node's replicas (the lost node then stays, dead, in its groups,
/// each of which keeps a quorum of sound replicas). A real operator would
/// also join a fresh machine; the simulator's joiners never start one.
async fn replace_lost_nodes(
    registry: Registry,
    lost: LostNodes,
    trace: Arc<Mutex<Vec<String>>>,
    start: Instant,
) {
    let mut decommissioned = BTreeSet::new();
    loop {
        sleep(Duration::from_secs(1)).await;
        let pending: Vec<NodeId> = lock(&lost).difference(&decommissioned).copied().collect();
        for id in pending {
            let request = ClientRequest::Decommission {
                node: id,
                dry_run: false,
            };
            // As the CLI does: through each node in turn until one answers
            // (a node that does not lead group 0 refuses).
            let nodes: Vec<Node> = lock(&registry).values().cloned().collect();
            for via in nodes {
                if let Ok(ClientResponse::Plan { moves, .. }) =
                    service_call(&via, Caller::Admin, &request).await
                {
                    decommissioned.insert(id);
                    let event = format!(
                        "operator decommissions {id}, lost with its disk: {} moves",
                        moves.len()
                    );
                    log_to(&trace, start, event);
                    break;
                }
            }
        }
    }
}

/// One call to a node's client service, as a CLI or joiner would make it.
async fn service_call(
    via: &Node,
    caller: Caller,
    request: &ClientRequest,
) -> Result<ClientResponse, String> {
    let answer = serve(via, &SimCredentials, caller, &codec::encode(request)).await;
    codec::decode::<ClientResponse>(&answer).map_err(|e| format!("undecodable service answer: {e}"))
}

fn join_request(token: &str, joiner: String, addr: String) -> ClientRequest {
    ClientRequest::Join(JoinRequest {
        token: token.to_owned(),
        csr_der: format!("csr of {joiner}").into_bytes(),
        addr,
    })
}

/// Joins under chaos: tokens issued and presented through random nodes by
/// joiners that never start a node (each admitted one is removed again, as
/// an operator would), some presented twice, some abandoned after `Begin`
/// for the dead-man timer. Every grant counts as a consumption of its
/// token, for the single-use checker.
async fn join_loop(attempts: u64, registry: Registry, seed: u64, consumed: TokenConsumptions) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let pick = |rng: &mut ChaCha8Rng| {
        let nodes: Vec<Node> = lock(&registry).values().cloned().collect();
        (!nodes.is_empty()).then(|| nodes[(rng.next_u64() % nodes.len() as u64) as usize].clone())
    };
    for attempt in 0..attempts {
        sleep(Duration::from_millis(100 + rng.next_u64() % 400)).await;
        let Some(via) = pick(&mut rng) else { continue };
        let issue = ClientRequest::IssueToken { ttl_ms: 3_000 };
        let Ok(ClientResponse::Token { token, .. }) =
            service_call(&via, Caller::Admin, &issue).await
        else {
            continue;
        };
        let Ok(parsed) = JoinToken::parse(&token) else {
            continue;
        };
        let hash = parsed.hash();
        if rng.next_u64() % 4 == 0 {
            // A joiner that presented the token and vanished.
            let _ = via
                .propose_metadata(MetadataEntry::JoinTokenTransition {
                    token_hash: hash,
                    transition: JoinTokenTransitionKind::Begin,
                    ts_ms: via.now_ms(),
                })
                .await;
            continue;
        }
        for _ in 0..1 + rng.next_u64() % 2 {
            let Some(via) = pick(&mut rng) else { break };
            let request = join_request(
                &token,
                format!("phantom {seed:x}/{attempt}"),
                format!("phantom-{seed:x}-{attempt}:7000"),
            );
            if let Ok(ClientResponse::Joined(grant)) =
                service_call(&via, Caller::Anonymous, &request).await
            {
                *lock(&consumed).entry(hash).or_default() += 1;
                let leave = MetadataEntry::TopologyChange(TopologyChange::Leave {
                    node_id: grant.node_id,
                });
                let _ = via.propose_metadata(leave).await;
            }
        }
    }
}

/// A condition the supervisor waits for.
trait AsyncCheck<T> {
    async fn check(&mut self, cluster: &SimCluster) -> Option<T>;
}

/// The node is running and answers.
struct Ready(NodeId);
impl AsyncCheck<()> for Ready {
    async fn check(&mut self, c: &SimCluster) -> Option<()> {
        c.node(self.0)?.status().await.ok().map(|_| ())
    }
}

/// Every node not lost is registered (started after a restart) and answers.
struct AllRunning;
impl AsyncCheck<()> for AllRunning {
    async fn check(&mut self, c: &SimCluster) -> Option<()> {
        for id in c.nodes.keys().filter(|id| !c.is_lost(**id)) {
            c.node(*id)?.status().await.ok()?;
        }
        Some(())
    }
}

/// Group 0 has `0` voters in every node's view.
struct MetadataVoters(usize);
impl AsyncCheck<()> for MetadataVoters {
    async fn check(&mut self, c: &SimCluster) -> Option<()> {
        for id in c.up_nodes() {
            let view = c.node(id)?.group(GroupId::METADATA).await.ok()??;
            if view.voters.len() != self.0 {
                return None;
            }
        }
        Some(())
    }
}

/// Every node is an active member of the topology (as group 0's leader sees it).
struct AllActive;
impl AsyncCheck<()> for AllActive {
    async fn check(&mut self, c: &SimCluster) -> Option<()> {
        use keel::core::topology::NodeState;
        for id in c.up_nodes() {
            let node = c.node(id)?;
            if let Ok(state) = node.metadata().await {
                let active = state
                    .topology
                    .nodes()
                    .filter(|(_, info)| matches!(info.state, NodeState::Active(_)))
                    .count();
                return (active as u64 == c.swarm.nodes).then_some(());
            }
        }
        None
    }
}

/// Every data group's leader runs with the replication factor's voters.
struct GroupsReplicated;
impl AsyncCheck<()> for GroupsReplicated {
    async fn check(&mut self, c: &SimCluster) -> Option<()> {
        'groups: for g in 1..=c.swarm.data_groups {
            for id in c.up_nodes() {
                if let Some(view) = c.node(id)?.group(GroupId(g)).await.ok()? {
                    if view.is_leader && view.voters.len() == c.swarm.replication_factor {
                        continue 'groups;
                    }
                }
            }
            return None;
        }
        Some(())
    }
}

/// A write to the key succeeds through some node.
struct Writable(String);
impl AsyncCheck<()> for Writable {
    async fn check(&mut self, c: &SimCluster) -> Option<()> {
        let node = c.node(*c.up_nodes().first()?)?;
        let command = KvCommand::Put {
            key: self.0.as_bytes().to_vec(),
            value: b"live".to_vec(),
        };
        let vshard = command.vshard();
        match node.propose(vshard, codec::encode(&command)).await {
            Ok(_) => Some(()),
            Err(e) => {
                tracing::debug!(target: "keel_sim", key = %self.0, error = %e, "liveness write failed");
                None
            }
        }
    }
}

/// A linearizable read of the key succeeds; yields its value.
struct Readable(String);
impl AsyncCheck<Option<String>> for Readable {
    async fn check(&mut self, c: &SimCluster) -> Option<Option<String>> {
        let node = c.node(*c.up_nodes().first()?)?;
        match execute(&node, &self.0, &Op::Get).await {
            HistoryOutcome::Ok(value) => Some(value),
            _ => None,
        }
    }
}

/// The node has left the topology, or the other active nodes are too few to
/// take its replicas (it then stays, dead, in its groups).
struct Removed(NodeId);
impl AsyncCheck<()> for Removed {
    async fn check(&mut self, c: &SimCluster) -> Option<()> {
        let node = c.node(*c.up_nodes().first()?)?;
        let state = node.metadata().await.ok()?;
        let others = state
            .topology
            .nodes()
            .filter(|(id, info)| *id != self.0 && matches!(info.state, NodeState::Active(_)))
            .count();
        let stays = state.topology.get(self.0).is_some_and(|info| {
            matches!(info.state, NodeState::Active(_)) && others < c.swarm.replication_factor
        });
        (state.topology.get(self.0).is_none() || stays).then_some(())
    }
}

/// See [`SimCluster::migrations_settled`].
struct Settled;
impl AsyncCheck<()> for Settled {
    async fn check(&mut self, c: &SimCluster) -> Option<()> {
        let node = c.node(*c.up_nodes().first()?)?;
        let state = node.metadata().await.ok()?;
        if state
            .migrations
            .values()
            .any(|row| row.phase != MigrationPhaseTag::Complete)
        {
            return None;
        }
        if state.routing.ghosts().next().is_some() {
            return None;
        }
        for id in c.up_nodes() {
            let status = c.node(id)?.status().await.ok()?;
            for view in status.groups.iter().filter(|g| !g.group.is_metadata()) {
                let listed = state
                    .routing
                    .group(view.group)
                    .is_some_and(|r| r.is_member(id));
                if !view.unsettled.is_empty() || !listed {
                    return None;
                }
            }
        }
        Some(())
    }
}

/// All replicas of the group report the same state at the same index.
struct Converged(GroupId);
impl AsyncCheck<Vec<(NodeId, Vec<u8>)>> for Converged {
    async fn check(&mut self, c: &SimCluster) -> Option<Vec<(NodeId, Vec<u8>)>> {
        let mut states = Vec::new();
        let node = c.node(*c.up_nodes().first()?)?;
        let state = node.metadata().await.ok()?;
        for id in c.up_nodes() {
            // Only current members must converge: a decommissioned node
            // keeps its last view of group 0, and left it for good.
            let member = if self.0.is_metadata() {
                state
                    .topology
                    .get(id)
                    .is_some_and(|info| info.state != NodeState::Decommissioned)
            } else {
                state.routing.group(self.0).is_some_and(|r| r.is_member(id))
            };
            if !member {
                continue;
            }
            if let Some((index, bytes)) = c.node(id)?.local_snapshot(self.0).await.ok()? {
                states.push((id, index, bytes));
            }
        }
        let (_, index, bytes) = states.first()?;
        if states.iter().all(|(_, i, b)| i == index && b == bytes) {
            Some(states.into_iter().map(|(id, _, b)| (id, b)).collect())
        } else {
            None
        }
    }
}
