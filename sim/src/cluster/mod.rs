//! A keel cluster on madsim: every keel node is a simulated machine with its
//! own IP, simulated disk and skewed clock, running the unchanged node
//! runtime. The supervisor (the run's main task) forms the cluster, runs the
//! chaos phase — workload clients on their own machines while faults are
//! injected — then heals everything and checks liveness and safety.

mod checks;
mod clients;
mod node;

use crate::disk::SimDisk;
use crate::history::{History, Op, Outcome as HistoryOutcome};
use crate::net::{self, NetControl, NetFaults};
use crate::swarm::Swarm;
use keel::core::ids::{GroupId, NodeId};
use keel::core::migration::MigrationPhaseTag;
use keel::core::token::JoinToken;
use keel::core::topology::NodeState;
use keel::node::migrate::CrashPoint;
use keel::node::service::{Caller, ClientRequest, ClientResponse};
use keel::node::Node;
use madsim::runtime::{Handle, NodeHandle};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{sleep, Instant};

use checks::{
    AllActive, AllRunning, AsyncCheck, Converged, CurrentRouting, GroupsReplicated, Led,
    MetadataVoters, Readable, Ready, Removed, Settled, Writable,
};
use clients::{
    client_loop, group_loop, join_loop, join_request, liveness_key, metadata_loop, migration_loop,
    replace_lost_nodes, service_call, workload_key, FINAL_READER,
};
use node::{disk_faults, node_main, signed, NodeSetup};

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
/// phase stall there (see [`MigrationConfig::crash_point`](keel::node::migrate::MigrationConfig::crash_point)) until the chaos
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
                Removed {
                    node: id,
                    last_seen: String::new(),
                },
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

    /// The node the checks talk to, as an operator's client would: the
    /// first running node that the group-0 leader's topology lists as
    /// active. A node decommissioned while it was away keeps running on a
    /// view of the cluster that stopped changing, and requests sent to it
    /// go where routing pointed long ago (seeds 14514 and 14589: the
    /// liveness checks asked such a node, and timed out for good).
    async fn entry(&self) -> Option<Node> {
        let up = self.up_nodes();
        let mut leader: Option<(u64, Node)> = None;
        for &id in &up {
            let Some(node) = self.node(id) else { continue };
            let Ok(Some(view)) = node.group(GroupId::METADATA).await else {
                continue;
            };
            if view.is_leader && leader.as_ref().is_none_or(|(term, _)| view.term > *term) {
                leader = Some((view.term, node));
            }
        }
        let state = leader?.1.metadata_local().await.ok()?;
        up.into_iter()
            .filter(|&id| {
                state
                    .topology
                    .get(id)
                    .is_some_and(|info| matches!(info.state, NodeState::Active(_)))
            })
            .find_map(|id| self.node(id))
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
                let blocker = check
                    .blocker()
                    .map(|b| format!(" (last check: {b})"))
                    .unwrap_or_default();
                return Err(format!(
                    "seed {}: not reached within {} s of simulated time: {what}{blocker}",
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
        if self.swarm.group_ops > 0 {
            let machine = self.handle.create_node().name("grouper").build();
            machine.spawn(group_loop(
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
            Settled::default(),
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
        let routing = self
            .until(LIVENESS_BOUND, "routing readable", CurrentRouting)
            .await?;
        for (group, _) in routing.groups() {
            // A group that serves vShards takes a write to one of them; a
            // created group that serves none yet must still elect.
            let served = match routing.vshards_of(group).next() {
                Some(vshard) => {
                    self.until(
                        LIVENESS_BOUND,
                        &format!("{group} accepts a write"),
                        Writable(liveness_key(vshard)),
                    )
                    .await
                }
                None => {
                    self.until(LIVENESS_BOUND, &format!("{group} elects"), Led(group))
                        .await
                }
            };
            if let Err(e) = served {
                let replicas = self.replica_summary(group).await;
                return Err(format!("{e}; replicas: {replicas}"));
            }
        }
        self.log("liveness: every group writable or led".into());
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
        let routing = self
            .until(LIVENESS_BOUND, "routing readable", CurrentRouting)
            .await?;
        let mut groups = vec![GroupId::METADATA];
        groups.extend(routing.groups().map(|(group, _)| group));
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
        if let Some(node) = self.entry().await {
            let route = match node.metadata().await {
                Ok(state) => format!("{:?}", state.routing.group(group)),
                Err(e) => format!("unknown ({e})"),
            };
            parts.push(format!("{}'s route: {route}", node.id()));
        }
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

/// How many times each join token was consumed, as acknowledged to the
/// proposers: the token single-use checker's evidence.
type TokenConsumptions = Arc<Mutex<BTreeMap<[u8; 32], u32>>>;

/// Appends `event` to the run's trace, stamped with the simulated time since
/// `start`.
fn log_to(trace: &Mutex<Vec<String>>, start: Instant, event: String) {
    let at = start.elapsed().as_millis();
    lock(trace).push(format!("{at:>7} ms  {event}"));
}
