//! In-process commit throughput of keel's multi-Raft engine, next to raw raft-rs.
//!
//! Both benchmarks drive a 3-node cluster that lives in this one process,
//! synchronously: every node runs its Raft work, then every message sent is
//! delivered, and again, until the leader has applied the whole batch. The
//! figure is the time from proposing a batch of N proposals on the leader
//! until all N are applied on the leader, for N = 1, 16 and 256 outstanding
//! proposals (criterion reports it per batch and, through
//! `Throughput::Elements`, as proposals per second).
//!
//! - `keel_redb_fsync`: keel's [`Engine`] over [`RaftStore`], each node on
//!   its own redb file with real fsync (`Durability::Immediate`), in a temp
//!   directory under cargo's `CARGO_TARGET_TMPDIR` (or `$KEEL_BENCH_DIR`, to
//!   measure another filesystem). The directory and its filesystem type are
//!   printed first, because a tmpfs makes fsync free.
//! - `raftrs_memstorage`: the same loop over raft-rs's own `RawNode` and
//!   `MemStorage`, with no disk at all: what raft-rs itself costs, so the
//!   difference is keel's storage and engine.
//!
//! The nodes share one thread and one disk, so the followers' fsyncs run one
//! after the other instead of in parallel on their own machines: a lower
//! bound for a real cluster, meant to compare versions of keel on one box.
//! No ticks run while measuring (so no heartbeats); node 1 is made leader
//! by an explicit campaign, which keeps every run identical.
//!
//! Run with `cargo bench --bench commit`.

/// The simulator build swaps the runtime for madsim; benchmarks measure the
/// real one only.
#[cfg(madsim)]
fn main() {}

#[cfg(not(madsim))]
criterion::criterion_main!(bench::benches);

#[cfg(not(madsim))]
mod bench {
    use criterion::{BenchmarkId, Criterion, SamplingMode, Throughput};
    use keel::core::ids::{GroupId, NodeId};
    use keel::raft::engine::{
        conf_change_of, Engine, EngineConfig, GroupApply, GroupBootstrap, GroupMessage,
    };
    use keel::raft::storage::RaftStore;
    use raft::prelude::{ConfState, Entry, EntryType, Message};
    use raft::storage::MemStorage;
    use raft::{RawNode, StateRole, Storage};
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};
    use std::sync::Arc;
    use std::time::Duration;

    /// Batch sizes: proposals outstanding at once on the leader.
    const OUTSTANDING: [usize; 3] = [1, 16, 256];
    /// Bytes of each proposal's payload.
    const PAYLOAD: usize = 128;
    /// Delivery steps a batch may take before the bench gives up (a stuck
    /// cluster must fail loudly rather than spin).
    const MAX_STEPS: usize = 1_000;
    const G: GroupId = GroupId(1);
    const NODES: [u64; 3] = [1, 2, 3];

    fn node_id(id: u64) -> NodeId {
        NodeId::new(id).expect("node ids are non-zero")
    }

    /// A 3-node cluster that can commit a batch of proposals on its leader.
    trait Cluster: Sized {
        /// Names the cluster in failure messages.
        const NAME: &'static str;

        /// One step: every node runs, then every message sent is delivered.
        fn step(&mut self);

        /// Proposes one payload on the leader.
        fn propose_on_leader(&mut self);

        /// Normal entries the leader has applied.
        fn leader_applied(&self) -> u64;

        fn drive_until(&mut self, what: &str, done: impl Fn(&Self) -> bool) {
            for _ in 0..MAX_STEPS {
                self.step();
                if done(self) {
                    return;
                }
            }
            panic!(
                "{}: not reached within {MAX_STEPS} steps: {what}",
                Self::NAME
            );
        }

        /// Proposes `n` entries on the leader and drives the cluster until
        /// the leader has applied all of them.
        fn commit_batch(&mut self, n: usize) {
            let target = self.leader_applied() + n as u64;
            for _ in 0..n {
                self.propose_on_leader();
            }
            self.drive_until("the batch is applied on the leader", |c| {
                c.leader_applied() >= target
            });
        }
    }

    // ---- keel: Engine + RaftStore over redb ---------------------------------

    struct KeelNode {
        engine: Engine,
        /// Normal (non-empty) entries applied so far.
        applied: u64,
    }

    impl KeelNode {
        fn apply(&mut self, apply: GroupApply) {
            let mut last = None;
            for entry in &apply.entries {
                let change = conf_change_of(entry).expect("conf change decodes");
                if let Some(change) = change {
                    self.engine
                        .apply_conf_change(apply.group, &change)
                        .expect("conf change applies");
                } else if !entry.get_data().is_empty() {
                    self.applied += 1;
                }
                last = Some(entry.get_index());
            }
            if let Some(index) = last {
                self.engine
                    .advance_apply(apply.group, index)
                    .expect("group is hosted");
            }
        }

        /// Runs rounds until the engine is idle, as the node runtime does,
        /// compacting the log at the engine's threshold so it stays bounded.
        fn run(&mut self, outbox: &mut Vec<(NodeId, GroupMessage)>) {
            if self.engine.wants_compaction(G) {
                let applied = self.engine.status(G).expect("group is hosted").applied;
                self.engine
                    .compact(G, applied, b"bench".to_vec())
                    .expect("group is hosted");
            }
            while self.engine.has_work() {
                let mut pending = self.engine.begin_round().expect("round stages");
                for (to, messages) in std::mem::take(&mut pending.messages) {
                    outbox.extend(messages.into_iter().map(|m| (to, m)));
                }
                let round = self.engine.finish_round(pending).expect("round persists");
                for apply in round.applies {
                    self.apply(apply);
                }
                for (to, messages) in round.messages {
                    outbox.extend(messages.into_iter().map(|m| (to, m)));
                }
            }
        }
    }

    struct KeelCluster {
        nodes: BTreeMap<NodeId, KeelNode>,
        leader: NodeId,
        outbox: Vec<(NodeId, GroupMessage)>,
        payload: Vec<u8>,
        /// Held so the redb files live as long as the cluster.
        _dir: tempfile::TempDir,
    }

    impl KeelCluster {
        fn new(parent: &Path) -> Self {
            let dir = tempfile::Builder::new()
                .prefix("keel-commit-bench-")
                .tempdir_in(parent)
                .expect("create the bench directory");
            let voters: Vec<NodeId> = NODES.iter().map(|&id| node_id(id)).collect();
            let mut nodes = BTreeMap::new();
            for &id in &voters {
                let path = dir.path().join(format!("n{id}.redb"));
                let db = Arc::new(redb::Database::create(path).expect("create redb file"));
                let mut engine = Engine::new(id, EngineConfig::default(), RaftStore::new(db));
                // The state machine is a counter of applied proposals: its
                // initial snapshot is empty.
                let bootstrap = GroupBootstrap {
                    voters: voters.clone(),
                    data: Vec::new(),
                };
                engine
                    .open_group(G, Some(bootstrap))
                    .expect("bootstrap the group");
                nodes.insert(id, KeelNode { engine, applied: 0 });
            }
            let leader = voters[0];
            let mut cluster = KeelCluster {
                nodes,
                leader,
                outbox: Vec::new(),
                payload: vec![0xab; PAYLOAD],
                _dir: dir,
            };
            cluster.node(leader).engine.campaign(G).expect("campaign");
            cluster.drive_until("node 1 leads", |c| {
                c.nodes[&leader].engine.status(G).map(|s| s.role) == Some(StateRole::Leader)
            });
            // The first batch also commits the leader's empty entry of its term.
            cluster.commit_batch(1);
            cluster
        }

        fn node(&mut self, id: NodeId) -> &mut KeelNode {
            self.nodes.get_mut(&id).expect("node exists")
        }
    }

    impl Cluster for KeelCluster {
        const NAME: &'static str = "keel cluster";

        fn step(&mut self) {
            for node in self.nodes.values_mut() {
                node.run(&mut self.outbox);
            }
            for (to, message) in std::mem::take(&mut self.outbox) {
                self.node(to)
                    .engine
                    .step(message.group, message.message)
                    .expect("message steps");
            }
        }

        fn propose_on_leader(&mut self) {
            let data = self.payload.clone();
            self.node(self.leader)
                .engine
                .propose(G, Vec::new(), data)
                .expect("leader accepts the proposal");
        }

        fn leader_applied(&self) -> u64 {
            self.nodes[&self.leader].applied
        }
    }

    // ---- raw raft-rs: RawNode over MemStorage, no disk ----------------------

    struct MemNode {
        raw: RawNode<MemStorage>,
        applied: u64,
        compact_threshold: u64,
    }

    impl MemNode {
        fn new(id: u64, config: &EngineConfig, logger: &slog::Logger) -> Self {
            // The same raft settings keel's engine uses.
            let raft_config = raft::Config {
                id,
                election_tick: config.election_tick,
                heartbeat_tick: config.heartbeat_tick,
                min_election_tick: config.election_tick,
                max_election_tick: config.election_tick + 1,
                max_size_per_msg: config.max_size_per_msg,
                max_inflight_msgs: config.max_inflight_msgs,
                check_quorum: true,
                pre_vote: true,
                ..Default::default()
            };
            let storage =
                MemStorage::new_with_conf_state(ConfState::from((NODES.to_vec(), vec![])));
            let raw = RawNode::new(&raft_config, storage, logger).expect("raft config is valid");
            MemNode {
                raw,
                applied: 0,
                compact_threshold: config.compact_threshold,
            }
        }

        fn apply(&mut self, entries: Vec<Entry>) {
            for entry in entries {
                // Membership never changes here; only count proposals.
                if entry.get_entry_type() == EntryType::EntryNormal && !entry.data.is_empty() {
                    self.applied += 1;
                }
            }
        }

        /// raft-rs's documented ready loop (its `five_mem_node` example).
        fn run(&mut self, outbox: &mut Vec<Message>) {
            while self.raw.has_ready() {
                let mut ready = self.raw.ready();
                outbox.extend(ready.take_messages());
                let store = self.raw.store().clone();
                if !ready.snapshot().is_empty() {
                    store
                        .wl()
                        .apply_snapshot(ready.snapshot().clone())
                        .expect("snapshot applies");
                }
                self.apply(ready.take_committed_entries());
                store.wl().append(ready.entries()).expect("entries append");
                if let Some(hs) = ready.hs() {
                    store.wl().set_hardstate(hs.clone());
                }
                outbox.extend(ready.take_persisted_messages());
                let mut light = self.raw.advance(ready);
                if let Some(commit) = light.commit_index() {
                    store.wl().mut_hard_state().set_commit(commit);
                }
                outbox.extend(light.take_messages());
                self.apply(light.take_committed_entries());
                self.raw.advance_apply();
            }
            // Bound the log at the same threshold keel uses.
            let store = self.raw.store().clone();
            let applied = self.raw.raft.raft_log.applied;
            let first = store.first_index().expect("memory storage");
            if applied.saturating_sub(first - 1) >= self.compact_threshold {
                store.wl().compact(applied).expect("compaction");
            }
        }
    }

    struct MemCluster {
        nodes: BTreeMap<u64, MemNode>,
        leader: u64,
        outbox: Vec<Message>,
        payload: Vec<u8>,
    }

    impl MemCluster {
        fn new() -> Self {
            let config = EngineConfig::default();
            let logger = slog::Logger::root(slog::Discard, slog::o!());
            let nodes = NODES
                .iter()
                .map(|&id| (id, MemNode::new(id, &config, &logger)))
                .collect();
            let leader = NODES[0];
            let mut cluster = MemCluster {
                nodes,
                leader,
                outbox: Vec::new(),
                payload: vec![0xab; PAYLOAD],
            };
            cluster.node(leader).raw.campaign().expect("campaign");
            cluster.drive_until("node 1 leads", |c| {
                c.nodes[&leader].raw.raft.state == StateRole::Leader
            });
            cluster.commit_batch(1);
            cluster
        }

        fn node(&mut self, id: u64) -> &mut MemNode {
            self.nodes.get_mut(&id).expect("node exists")
        }
    }

    impl Cluster for MemCluster {
        const NAME: &'static str = "raft-rs cluster";

        fn step(&mut self) {
            for node in self.nodes.values_mut() {
                node.run(&mut self.outbox);
            }
            for message in std::mem::take(&mut self.outbox) {
                self.node(message.to)
                    .raw
                    .step(message)
                    .expect("message steps");
            }
        }

        fn propose_on_leader(&mut self) {
            let data = self.payload.clone();
            self.node(self.leader)
                .raw
                .propose(Vec::new(), data)
                .expect("leader accepts the proposal");
        }

        fn leader_applied(&self) -> u64 {
            self.nodes[&self.leader].applied
        }
    }

    // ---- criterion ----------------------------------------------------------

    /// Where the redb files go: `$KEEL_BENCH_DIR`, else cargo's per-target
    /// temp directory (on the disk that holds `target/`, not a tmpfs `/tmp`).
    fn bench_dir() -> PathBuf {
        let dir = std::env::var_os("KEEL_BENCH_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_TARGET_TMPDIR")));
        std::fs::create_dir_all(&dir).expect("create the bench directory");
        dir
    }

    /// The filesystem type of the mount holding `dir`, from
    /// `/proc/self/mounts` (Linux), or "unknown".
    fn filesystem_of(dir: &Path) -> String {
        let Ok(dir) = dir.canonicalize() else {
            return "unknown".into();
        };
        let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") else {
            return "unknown".into();
        };
        mounts
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace().skip(1);
                Some((fields.next()?, fields.next()?))
            })
            .filter(|(mount, _)| dir.starts_with(mount))
            .max_by_key(|(mount, _)| mount.len())
            .map_or_else(|| "unknown".into(), |(_, fs)| fs.to_string())
    }

    fn bench_cluster<C: Cluster>(c: &mut Criterion, name: &str, mut make: impl FnMut() -> C) {
        let mut group = c.benchmark_group(name);
        group
            .sample_size(10)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(4))
            .sampling_mode(SamplingMode::Flat);
        for n in OUTSTANDING {
            let mut cluster = make();
            group.throughput(Throughput::Elements(n as u64));
            group.bench_function(BenchmarkId::new("outstanding", n), |b| {
                b.iter(|| cluster.commit_batch(n))
            });
        }
        group.finish();
    }

    fn commit(c: &mut Criterion) {
        let dir = bench_dir();
        println!(
            "keel_redb_fsync: redb files under {} (filesystem: {})",
            dir.display(),
            filesystem_of(&dir)
        );
        bench_cluster(c, "keel_redb_fsync", || KeelCluster::new(&dir));
        bench_cluster(c, "raftrs_memstorage", MemCluster::new);
    }

    criterion::criterion_group!(benches, commit);
}
