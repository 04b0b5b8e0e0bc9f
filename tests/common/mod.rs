//! The in-process cluster harness shared by the node tests: real nodes
//! (runtime, multi-Raft engine, redb files) on the in-process transport.
#![allow(dead_code)] // each test crate uses its own part of the harness

pub mod service;

use keel::core::cache::Bootstrap;
use keel::core::codec;
use keel::core::entry::MetadataEntry;
use keel::core::ids::{GroupId, MigrationId, NodeId, VShardId};
use keel::core::kv::{KvCommand, KvQuery, KvResponse, KvStateMachine};
use keel::core::migration::{MigrationCheckpointPayload, MigrationPhaseTag};
use keel::core::routing::RoutingChange;
use keel::core::topology::TopologyChange;
use keel::io::clock::{SystemClock, WallClock};
use keel::io::memory_transport::MemoryNetwork;
use keel::io::{open_database, seeded_rng, NodeIo};
use keel::node::rpc::Outcome;
use keel::node::{start, MachineFactory, Node, NodeConfig};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinHandle;

pub fn n(id: u64) -> NodeId {
    NodeId::new(id).unwrap()
}

pub const DATA_GROUPS: u64 = 2;

pub struct Cluster {
    pub net: MemoryNetwork,
    pub dir: tempfile::TempDir,
    pub nodes: BTreeMap<NodeId, (Node, JoinHandle<()>)>,
    pub compact_threshold: u64,
    /// The dead-man timer of join tokens on every node started.
    pub join_dead_man: Duration,
    /// The cluster's replication factor: the group-0 leader places data
    /// replicas on joined nodes up to it. Tests that move replicas by hand
    /// use 1.
    pub replication_factor: usize,
    /// How nodes started from now on run migrations.
    pub migration: keel::node::migrate::MigrationConfig,
    /// The physical clock of each node started from now on that is listed
    /// here; the others read the system's.
    pub clocks: BTreeMap<NodeId, Arc<dyn WallClock>>,
}

pub fn kv_factory() -> MachineFactory {
    Arc::new(|_| Box::new(KvStateMachine::new()))
}

/// Polls `check` every 20 ms until it returns `Some`, for at most 20 s.
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    for _ in 0..1_000 {
        if let Some(value) = check().await {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("not reached within 20 s: {what}");
}

pub fn put(key: &str, value: &str) -> (VShardId, Vec<u8>) {
    let command = KvCommand::Put {
        key: key.as_bytes().to_vec(),
        value: value.as_bytes().to_vec(),
    };
    (command.vshard(), codec::encode(&command))
}

pub fn get(key: &str) -> (VShardId, Vec<u8>) {
    let query = KvQuery::Get {
        key: key.as_bytes().to_vec(),
    };
    (query.vshard(), codec::encode(&query))
}

pub fn value(response: &[u8]) -> Option<Vec<u8>> {
    match codec::decode::<KvResponse>(response).unwrap() {
        KvResponse::Value(v) => v,
        other => panic!("unexpected response {other:?}"),
    }
}

impl Cluster {
    pub fn new() -> Self {
        Self::with_compaction(10_000)
    }

    pub fn with_compaction(compact_threshold: u64) -> Self {
        Cluster {
            net: MemoryNetwork::new(),
            dir: tempfile::tempdir().unwrap(),
            nodes: BTreeMap::new(),
            compact_threshold,
            join_dead_man: NodeConfig::new(n(1)).join_dead_man,
            replication_factor: 3,
            migration: keel::node::migrate::MigrationConfig {
                poll: Duration::from_millis(20),
                ..Default::default()
            },
            clocks: BTreeMap::new(),
        }
    }

    pub fn start(&mut self, id: NodeId, bootstrap: Option<Bootstrap>) {
        let (transport, inbound) = self.net.endpoint(id);
        let db = open_database(&self.dir.path().join(format!("n{id}.redb"))).unwrap();
        let io = NodeIo {
            transport,
            inbound,
            clock: self
                .clocks
                .get(&id)
                .cloned()
                .unwrap_or_else(|| Arc::new(SystemClock)),
            rng: seeded_rng(id.get()),
            db: Arc::new(db),
            storage_latency: None,
        };
        let mut config = NodeConfig::new(id);
        config.tick_interval = Duration::from_millis(10);
        config.request_timeout = Duration::from_secs(10);
        config.engine.compact_threshold = self.compact_threshold;
        config.join_dead_man = self.join_dead_man;
        config.migration = self.migration.clone();
        let (node, task) = start(config, io, bootstrap, kv_factory(), Box::new(())).unwrap();
        self.nodes.insert(id, (node, task));
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[&id].0
    }

    /// Bootstraps node 1 and joins nodes 2..=size through group 0.
    pub async fn form(size: u64) -> Self {
        let mut c = Cluster::new();
        c.form_on(size).await;
        c
    }

    pub async fn form_on(&mut self, size: u64) {
        self.start(
            n(1),
            Some(Bootstrap {
                cluster_id: [9; 16],
                node_id: n(1),
                addr: "n1".into(),
                data_groups: DATA_GROUPS,
                replication_factor: self.replication_factor,
                ca_cert_der: b"test CA".to_vec(),
            }),
        );
        for id in 2..=size {
            self.join(n(id)).await;
        }
        let want = size.min(5) as usize;
        self.await_metadata_voters(want).await;
    }

    pub async fn join(&mut self, id: NodeId) {
        self.start(id, None);
        let first = self.nodes.keys().next().copied().unwrap();
        let committed = self
            .node(first)
            .propose_metadata(MetadataEntry::TopologyChange(TopologyChange::Join {
                node_id: id,
                addr: format!("{id}"),
            }))
            .await
            .unwrap();
        assert_eq!(committed.outcome, Outcome::Metadata(None));
    }

    pub async fn await_metadata_voters(&self, want: usize) {
        let nodes: Vec<Node> = self.nodes.values().map(|(node, _)| node.clone()).collect();
        eventually(&format!("group 0 has {want} voters everywhere"), || {
            let nodes = nodes.clone();
            async move {
                for node in &nodes {
                    let view = node.group(GroupId::METADATA).await.ok()??;
                    if view.voters.len() != want {
                        return None;
                    }
                }
                Some(())
            }
        })
        .await
    }

    /// Waits until every data group runs with `want` voters (placed by the
    /// group-0 leader up to the replication factor).
    pub async fn await_replication(&self, want: usize) {
        for g in 1..=DATA_GROUPS {
            self.await_group_voters(GroupId(g), want).await;
        }
    }

    /// Makes `nodes` voters of every data group via routing changes.
    pub async fn replicate_to(&self, nodes: &[NodeId]) {
        let admin = self.node(n(1)).clone();
        for g in 1..=DATA_GROUPS {
            for &node in nodes {
                for change in [
                    RoutingChange::AddLearner {
                        group_id: GroupId(g),
                        node_id: node,
                    },
                    RoutingChange::PromoteLearner {
                        group_id: GroupId(g),
                        node_id: node,
                    },
                ] {
                    let c = admin
                        .propose_metadata(MetadataEntry::RoutingChange(change.clone()))
                        .await
                        .unwrap();
                    assert_eq!(c.outcome, Outcome::Metadata(None), "{change:?}");
                }
            }
        }
        for g in 1..=DATA_GROUPS {
            self.await_group_voters(GroupId(g), nodes.len() + 1).await;
        }
    }

    pub async fn await_group_voters(&self, group: GroupId, want: usize) {
        let nodes: Vec<Node> = self.nodes.values().map(|(node, _)| node.clone()).collect();
        eventually(&format!("{group} has {want} voters"), || {
            let nodes = nodes.clone();
            async move {
                for node in &nodes {
                    let view = node.group(group).await.ok()?;
                    if let Some(view) = view {
                        // Settled: no joint configuration and no learner
                        // left, so any majority of the voters can elect.
                        let settled = view.voters_outgoing.is_empty() && view.learners.is_empty();
                        if view.is_leader && view.voters.len() == want && settled {
                            return Some(());
                        }
                    }
                }
                None
            }
        })
        .await
    }

    pub async fn put_via(&self, id: NodeId, key: &str, val: &str) {
        let (vshard, command) = put(key, val);
        let committed = self.node(id).propose(vshard, command).await.unwrap();
        assert!(matches!(committed.outcome, Outcome::Data(_)));
    }

    pub async fn get_via(&self, id: NodeId, key: &str) -> Option<Vec<u8>> {
        let (vshard, query) = get(key);
        value(&self.node(id).read(vshard, query).await.unwrap())
    }

    /// Waits until `id`'s own replica shows `key = val`.
    pub async fn await_local(&self, id: NodeId, key: &str, val: &str) {
        let node = self.node(id).clone();
        let want = val.as_bytes().to_vec();
        eventually(&format!("{key}={val} on {id}"), || {
            let node = node.clone();
            let want = want.clone();
            async move {
                let (vshard, query) = get(key);
                let bytes = node.read_stale(vshard, query).await.ok()?;
                (value(&bytes) == Some(want)).then_some(())
            }
        })
        .await
    }

    pub async fn crash(&mut self, id: NodeId) {
        let (_, task) = self.nodes.remove(&id).unwrap();
        self.net.unregister(id);
        task.abort();
        let _ = task.await;
    }

    pub async fn metadata_leader(&self) -> NodeId {
        let nodes: Vec<Node> = self.nodes.values().map(|(node, _)| node.clone()).collect();
        eventually("a group-0 leader", || {
            let nodes = nodes.clone();
            async move {
                for node in &nodes {
                    if node.group(GroupId::METADATA).await.ok()??.is_leader {
                        return Some(node.id());
                    }
                }
                None
            }
        })
        .await
    }
}

/// Keys of `vshard`, found by search (the mapping is crc32c).
pub fn keys_of(vshard: VShardId, count: usize) -> Vec<String> {
    (0u32..)
        .map(|i| format!("key-{i}"))
        .filter(|k| VShardId::for_key(k.as_bytes()) == vshard)
        .take(count)
        .collect()
}

/// Waits until the migration finished; `Some(pause)` if it completed,
/// `None` if it was aborted (its row is gone).
pub async fn finished(node: &Node, id: MigrationId) -> Option<u64> {
    eventually("the migration to finish", || async {
        let state = node.metadata().await.ok()?;
        match state.migrations.get(&id) {
            None => Some(None),
            Some(row) if row.phase == MigrationPhaseTag::Complete => {
                let pause = match row.verify().ok()? {
                    MigrationCheckpointPayload::Replica(p) => p.write_pause_us,
                    MigrationCheckpointPayload::VShard(p) => p.write_pause_us,
                };
                Some(Some(pause.expect("a complete move records its pause")))
            }
            Some(_) => None,
        }
    })
    .await
}
