//! In-process multi-node tests of the engine: real raft-rs, real redb files,
//! messages delivered by a deterministic loop, nodes crashed by dropping
//! them and restarted from their files.

use crate::core::codec;
use crate::core::ids::{GroupId, NodeId};
use crate::core::kv::{KvCommand, KvStateMachine};
use crate::core::state_machine::DataStateMachine;
use crate::raft::engine::{
    conf_change, conf_change_of, Engine, EngineConfig, GroupApply, GroupBootstrap, BOOTSTRAP_INDEX,
};
use crate::raft::storage::RaftStore;
use raft::prelude::{ConfChangeType, MessageType, ReadState};
use raft::SnapshotStatus;
use raft::StateRole;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::Arc;

fn n(id: u64) -> NodeId {
    NodeId::new(id).unwrap()
}

const G: GroupId = GroupId(1);

struct TestNode {
    engine: Engine,
    machines: BTreeMap<GroupId, KvStateMachine>,
}

impl TestNode {
    fn open(id: NodeId, path: &PathBuf, voters: &[NodeId], config: &EngineConfig) -> Self {
        let db = Arc::new(redb::Database::create(path).expect("open redb"));
        let mut engine = Engine::new(id, config.clone(), RaftStore::new(db));
        let mut machines = BTreeMap::new();
        let mut groups: BTreeSet<GroupId> =
            engine.persisted_groups().unwrap().into_iter().collect();
        groups.insert(G);
        let bootstrap = (!voters.is_empty()).then(|| GroupBootstrap {
            voters: voters.to_vec(),
            data: KvStateMachine::new().snapshot(),
        });
        for group in groups {
            let snapshot = engine.open_group(group, bootstrap.clone()).unwrap();
            let mut sm = KvStateMachine::new();
            if let Some(snapshot) = snapshot {
                sm.restore(snapshot.get_data()).unwrap();
            }
            machines.insert(group, sm);
        }
        TestNode { engine, machines }
    }

    fn apply(&mut self, apply: GroupApply) {
        let sm = self.machines.entry(apply.group).or_default();
        let mut last = None;
        if let Some(snapshot) = &apply.snapshot {
            sm.restore(snapshot.get_data()).unwrap();
            last = Some(snapshot.get_metadata().index);
        }
        for entry in &apply.entries {
            if let Some(change) = conf_change_of(entry).unwrap() {
                self.engine.apply_conf_change(apply.group, &change).unwrap();
            } else if !entry.get_data().is_empty() {
                sm.apply(entry.get_index(), entry.get_data());
            }
            last = Some(entry.get_index());
        }
        if let Some(index) = last {
            self.engine.advance_apply(apply.group, index).unwrap();
        }
    }

    /// Hands the engine a state-machine snapshot where it wants one.
    fn compact(&mut self) {
        let groups: Vec<GroupId> = self.engine.groups().collect();
        for group in groups {
            if self.engine.wants_compaction(group) {
                let applied = self.engine.status(group).unwrap().applied;
                let data = self.machines[&group].snapshot();
                self.engine.compact(group, applied, data).unwrap();
            }
        }
    }
}

/// A cluster of engines on one machine, each with its own redb file.
struct Cluster {
    dir: tempfile::TempDir,
    config: EngineConfig,
    nodes: BTreeMap<NodeId, Option<TestNode>>,
    /// Nodes whose messages, in and out, are dropped.
    isolated: BTreeSet<NodeId>,
    queue: VecDeque<(NodeId, crate::raft::engine::GroupMessage)>,
    /// Raft messages sent so far (to see sleeping groups go quiet).
    sent: usize,
    /// Seeded tick jitter: raft-rs's election timeout is pinned to one value
    /// (DESIGN.md §8), so without jitter every node would campaign in the same
    /// tick forever.
    rng: ChaCha8Rng,
}

impl Cluster {
    fn new(size: u64, config: EngineConfig) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let voters: Vec<NodeId> = (1..=size).map(n).collect();
        let mut nodes = BTreeMap::new();
        for &id in &voters {
            let path = dir.path().join(format!("n{id}.redb"));
            nodes.insert(id, Some(TestNode::open(id, &path, &voters, &config)));
        }
        Cluster {
            dir,
            config,
            nodes,
            isolated: BTreeSet::new(),
            queue: VecDeque::new(),
            sent: 0,
            rng: ChaCha8Rng::seed_from_u64(size),
        }
    }

    fn path(&self, id: NodeId) -> PathBuf {
        self.dir.path().join(format!("n{id}.redb"))
    }

    fn node(&mut self, id: NodeId) -> &mut TestNode {
        self.nodes
            .get_mut(&id)
            .and_then(Option::as_mut)
            .expect("node is up")
    }

    /// Adds a node that knows no configuration: it learns it from a snapshot.
    fn add_empty_node(&mut self, id: NodeId) {
        let node = TestNode::open(id, &self.path(id), &[], &self.config);
        self.nodes.insert(id, Some(node));
    }

    fn crash(&mut self, id: NodeId) {
        self.nodes.insert(id, None);
        self.queue.retain(|(to, _)| *to != id);
    }

    fn restart(&mut self, id: NodeId) {
        let node = TestNode::open(id, &self.path(id), &[], &self.config);
        self.nodes.insert(id, Some(node));
    }

    /// One round on every live node, then delivery of everything sent.
    fn step(&mut self) {
        for (&id, slot) in self.nodes.iter_mut() {
            let Some(node) = slot.as_mut() else { continue };
            node.compact();
            while node.engine.has_work() {
                // As the runtime does: send what the first half releases
                // before the write, the rest after it.
                let mut pending = node.engine.begin_round().unwrap();
                let early = std::mem::take(&mut pending.messages);
                let round = node.engine.finish_round(pending).unwrap();
                for apply in round.applies {
                    node.apply(apply);
                }
                for (to, messages) in early.into_iter().chain(round.messages) {
                    self.sent += messages.len();
                    if self.isolated.contains(&id) || self.isolated.contains(&to) {
                        continue;
                    }
                    self.queue.extend(messages.into_iter().map(|m| (to, m)));
                }
            }
        }
        while let Some((to, message)) = self.queue.pop_front() {
            let (group, from) = (message.group, message.message.from);
            let is_snapshot = message.message.get_msg_type() == MessageType::MsgSnapshot;
            let delivered = match self.nodes.get_mut(&to) {
                // A message for a group the node does not host yet is dropped,
                // as the runtime would until routing tells it to host it.
                Some(Some(node)) => node.engine.step(group, message.message).is_ok(),
                _ => false,
            };
            // The transport reports snapshot delivery, as a real one does.
            if is_snapshot {
                let status = if delivered {
                    SnapshotStatus::Finish
                } else {
                    SnapshotStatus::Failure
                };
                if let Some(Some(sender)) = self.nodes.get_mut(&n(from)) {
                    let _ = sender.engine.report_snapshot(group, to, status);
                }
            }
        }
    }

    /// Each node's tick is late (skipped) one time in three. A peer counts
    /// as reachable (for hibernating groups) when it is up and neither side
    /// is isolated.
    fn tick(&mut self) {
        let up: BTreeSet<NodeId> = self
            .nodes
            .iter()
            .filter(|(id, node)| node.is_some() && !self.isolated.contains(id))
            .map(|(&id, _)| id)
            .collect();
        for (id, node) in self.nodes.iter_mut() {
            let Some(node) = node else { continue };
            if self.rng.next_u32() % 3 != 0 {
                let me_up = up.contains(id);
                node.engine.tick(|peer| me_up && up.contains(&peer));
            }
        }
        self.step();
    }

    /// Ticks until `done` holds; panics after `max_ticks`.
    fn run_until(&mut self, max_ticks: usize, what: &str, mut done: impl FnMut(&mut Self) -> bool) {
        for _ in 0..max_ticks {
            self.step();
            if done(self) {
                return;
            }
            self.tick();
        }
        panic!("not reached within {max_ticks} ticks: {what}");
    }

    fn leader(&self, group: GroupId) -> Option<NodeId> {
        self.nodes.iter().find_map(|(&id, node)| {
            let status = node.as_ref()?.engine.status(group)?;
            (status.role == StateRole::Leader && !self.isolated.contains(&id)).then_some(id)
        })
    }

    fn elect(&mut self, group: GroupId) -> NodeId {
        self.run_until(200, "a leader is elected", |c| c.leader(group).is_some());
        self.leader(group).unwrap()
    }

    fn put(&mut self, group: GroupId, key: &str, value: &str) {
        let leader = self.elect(group);
        let command = codec::encode(&KvCommand::Put {
            key: key.as_bytes().to_vec(),
            value: value.as_bytes().to_vec(),
        });
        self.node(leader)
            .engine
            .propose(group, vec![], command)
            .unwrap();
        let key = key.to_string();
        let value = value.to_string();
        self.run_until(200, "the put is applied on the leader", |c| {
            c.node(leader).machines[&group].get(key.as_bytes()) == Some(value.as_bytes())
        });
    }

    fn value_on(&mut self, id: NodeId, group: GroupId, key: &str) -> Option<Vec<u8>> {
        self.node(id)
            .machines
            .get(&group)?
            .get(key.as_bytes())
            .map(<[u8]>::to_vec)
    }

    /// Waits until every live node has `key = value` in `group`.
    fn converge(&mut self, group: GroupId, key: &str, value: &str) {
        let live: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.is_some())
            .map(|(&id, _)| id)
            .collect();
        self.run_until(300, &format!("{key}={value} everywhere"), |c| {
            live.iter()
                .all(|&id| c.value_on(id, group, key).as_deref() == Some(value.as_bytes()))
        });
    }

    fn propose_conf_change(&mut self, group: GroupId, changes: &[(ConfChangeType, u64)]) {
        let changes: Vec<_> = changes.iter().map(|&(t, id)| (t, n(id))).collect();
        let leader = self.elect(group);
        self.node(leader)
            .engine
            .propose_conf_change(group, vec![], conf_change(&changes))
            .unwrap();
    }

    /// Waits until every live node runs `G` with (voters, learners, outgoing voters).
    fn await_conf(&mut self, what: &str, expected: (Vec<u64>, Vec<u64>, Vec<u64>)) {
        let live: Vec<NodeId> = self
            .nodes
            .iter()
            .filter(|(_, n)| n.is_some())
            .map(|(&id, _)| id)
            .collect();
        for _ in 0..300 {
            self.step();
            if live.iter().all(|&id| self.conf(id, G) == expected) {
                return;
            }
            self.tick();
        }
        let seen: Vec<_> = live.iter().map(|&id| (id, self.conf(id, G))).collect();
        panic!("not reached: {what}; membership per node: {seen:?}");
    }

    fn conf(&mut self, id: NodeId, group: GroupId) -> (Vec<u64>, Vec<u64>, Vec<u64>) {
        let status = self.node(id).engine.conf_state(group).unwrap();
        let mut voters = status.get_voters().to_vec();
        let mut learners = status.get_learners().to_vec();
        let mut outgoing = status.get_voters_outgoing().to_vec();
        voters.sort();
        learners.sort();
        outgoing.sort();
        (voters, learners, outgoing)
    }
}

#[test]
fn three_nodes_elect_and_replicate() {
    let mut c = Cluster::new(3, EngineConfig::default());
    c.elect(G);
    for i in 0..20 {
        c.put(G, &format!("k{i}"), &format!("v{i}"));
    }
    c.converge(G, "k19", "v19");
}

#[test]
fn five_nodes_survive_a_leader_crash() {
    let mut c = Cluster::new(5, EngineConfig::default());
    let first = c.elect(G);
    c.put(G, "before", "1");
    c.converge(G, "before", "1");
    c.crash(first);
    let second = c.elect(G);
    assert_ne!(first, second);
    c.put(G, "after", "2");
    c.restart(first);
    c.converge(G, "before", "1");
    c.converge(G, "after", "2");
}

#[test]
fn every_node_restarts_with_its_data() {
    let mut c = Cluster::new(3, EngineConfig::default());
    for i in 0..10 {
        c.put(G, &format!("k{i}"), "x");
    }
    c.converge(G, "k9", "x");
    let term_before = {
        let leader = c.leader(G).unwrap();
        c.node(leader).engine.status(G).unwrap().term
    };
    for id in 1..=3 {
        c.crash(n(id));
    }
    for id in 1..=3 {
        c.restart(n(id));
    }
    // Committed data is back before any new election finishes.
    c.step();
    for id in 1..=3 {
        for i in 0..10 {
            assert_eq!(
                c.value_on(n(id), G, &format!("k{i}")).as_deref(),
                Some(&b"x"[..])
            );
        }
        let status = c.node(n(id)).engine.status(G).unwrap();
        assert!(status.term >= term_before, "term went backwards on n{id}");
    }
    c.put(G, "later", "y");
    c.converge(G, "later", "y");
}

#[test]
fn partitioned_leader_is_replaced_and_rejoins() {
    let mut c = Cluster::new(3, EngineConfig::default());
    let old = c.elect(G);
    c.put(G, "a", "1");
    // check-quorum makes the isolated leader step down.
    c.cut_off_leader_is_replaced(old);
}

#[test]
fn new_learner_catches_up_by_snapshot_after_compaction() {
    let config = EngineConfig {
        compact_threshold: 20,
        ..EngineConfig::default()
    };
    let mut c = Cluster::new(3, config);
    for i in 0..60 {
        c.put(G, &format!("k{i}"), "v");
    }
    c.converge(G, "k59", "v");
    let leader = c.leader(G).unwrap();
    let status = c.node(leader).engine.status(G).unwrap();
    assert!(status.first_index > 20, "log was compacted: {status:?}");
    c.add_empty_node(n(4));
    c.propose_conf_change(G, &[(ConfChangeType::AddLearnerNode, 4)]);
    c.converge(G, "k0", "v");
    c.converge(G, "k59", "v");
    let (_, learners, _) = c.conf(n(4), G);
    assert_eq!(learners, vec![4]);
    // The log stays bounded as writes continue.
    for i in 60..120 {
        c.put(G, &format!("k{i}"), "w");
    }
    c.converge(G, "k119", "w");
    let status = c.node(leader).engine.status(G).unwrap();
    assert!(
        status.last_index + 1 - status.first_index < 60,
        "{status:?}"
    );
}

#[test]
fn joint_consensus_replaces_a_voter() {
    let mut c = Cluster::new(3, EngineConfig::default());
    c.put(G, "a", "1");
    c.add_empty_node(n(4));
    c.propose_conf_change(G, &[(ConfChangeType::AddLearnerNode, 4)]);
    c.converge(G, "a", "1");
    // Promote 4 and demote 3 in one joint change, then leave joint explicitly.
    c.propose_conf_change(
        G,
        &[
            (ConfChangeType::AddNode, 4),
            (ConfChangeType::AddLearnerNode, 3),
        ],
    );
    c.await_conf(
        "joint: incoming 1,2,4, outgoing 1,2,3, 3 becomes a learner on leaving",
        (vec![1, 2, 4], vec![], vec![1, 2, 3]),
    );
    c.propose_conf_change(G, &[]);
    c.await_conf("joint left", (vec![1, 2, 4], vec![3], vec![]));
    c.propose_conf_change(G, &[(ConfChangeType::RemoveNode, 3)]);
    c.put(G, "b", "2");
    c.await_conf("3 removed", (vec![1, 2, 4], vec![], vec![]));
    c.crash(n(3));
    c.put(G, "c", "3");
    c.converge(G, "c", "3");
}

#[test]
fn leadership_transfer_moves_the_leader() {
    let mut c = Cluster::new(3, EngineConfig::default());
    c.put(G, "a", "1");
    c.converge(G, "a", "1");
    let old = c.leader(G).unwrap();
    let target = if old == n(1) { n(2) } else { n(1) };
    c.node(old).engine.transfer_leader(G, target).unwrap();
    c.run_until(100, "leadership moved", |c| c.leader(G) == Some(target));
    c.put(G, "b", "2");
    c.converge(G, "b", "2");
}

#[test]
fn proposals_on_a_follower_are_refused_with_a_hint() {
    let mut c = Cluster::new(3, EngineConfig::default());
    let leader = c.elect(G);
    c.step();
    let follower = if leader == n(1) { n(2) } else { n(1) };
    c.run_until(50, "follower knows the leader", |c| {
        c.node(follower).engine.status(G).unwrap().leader == Some(leader)
    });
    let err = c
        .node(follower)
        .engine
        .propose(G, vec![], vec![1])
        .unwrap_err();
    match err {
        crate::raft::engine::EngineError::NotLeader { leader: hint, .. } => {
            assert_eq!(hint, Some(leader))
        }
        other => panic!("unexpected {other}"),
    }
}

/// Runs rounds on `leader` (delivering everything each sends) until a
/// read state for `group` comes out; `None` after 50 rounds.
fn await_read_state(c: &mut Cluster, leader: NodeId, group: GroupId) -> Option<ReadState> {
    for _ in 0..50 {
        let node = c.node(leader);
        let mut pending = node.engine.begin_round().unwrap();
        let found = pending.read_states.drain(..).find(|(g, _)| *g == group);
        let early = std::mem::take(&mut pending.messages);
        let round = node.engine.finish_round(pending).unwrap();
        for apply in round.applies {
            node.apply(apply);
        }
        for (to, messages) in early.into_iter().chain(round.messages) {
            c.queue.extend(messages.into_iter().map(|m| (to, m)));
        }
        if let Some((_, rs)) = found {
            return Some(rs);
        }
        c.step();
    }
    None
}

#[test]
fn read_index_completes_on_the_leader() {
    let mut c = Cluster::new(3, EngineConfig::default());
    c.put(G, "a", "1");
    let leader = c.leader(G).unwrap();
    c.node(leader).engine.read_index(G, b"r1".to_vec()).unwrap();
    let rs = await_read_state(&mut c, leader, G).expect("read index completed");
    assert_eq!(rs.request_ctx, b"r1".to_vec());
    assert!(rs.index >= 2);
}

/// raft-rs drops a read index asked of a leader that has not committed an
/// entry of its own term yet; the engine holds it until that entry commits
/// (found by `every_node_restarts_with_its_data` in the simulator build,
/// `MADSIM_TEST_SEED=1795378660035460904`: a read right after every node
/// restarted waited out its whole deadline).
#[test]
fn read_index_asked_before_the_leaders_first_commit_completes() {
    let mut c = Cluster::new(3, EngineConfig::default());
    let leader = c.elect(G);
    let status = c.node(leader).engine.status(G).unwrap();
    // Nothing of the new term is committed: only the bootstrap entries.
    assert_eq!(
        status.commit, BOOTSTRAP_INDEX,
        "the test needs a leader whose first entry is not committed yet: {status:?}"
    );
    c.node(leader)
        .engine
        .read_index(G, b"early".to_vec())
        .unwrap();
    let rs = await_read_state(&mut c, leader, G).expect("the early read index completed");
    assert_eq!(rs.request_ctx, b"early".to_vec());
    // The read point covers the new leader's first entry.
    assert!(rs.index > BOOTSTRAP_INDEX, "{rs:?}");
}

/// A single voter commits by its own write (`LightReady::commit_index`), so
/// its entries wait for the next write to make the commit index durable
/// before they are applied. Compacting at the applied index then never puts
/// the stored snapshot above the stored commit index (the write would be
/// refused, and raft-rs would refuse the restart); the node restarts with
/// everything.
#[test]
fn a_single_voter_compacts_and_restarts_with_everything() {
    let config = EngineConfig {
        compact_threshold: 3,
        ..EngineConfig::default()
    };
    let mut c = Cluster::new(1, config);
    for i in 0..8 {
        c.put(G, &format!("k{i}"), "x");
    }
    let status = c.node(n(1)).engine.status(G).unwrap();
    let (applied, first_index) = (status.applied, status.first_index);
    assert!(
        first_index > 6,
        "the log was compacted (first index {first_index}, applied {applied})"
    );
    c.crash(n(1));
    c.restart(n(1));
    c.elect(G);
    for i in 0..8 {
        c.converge(G, &format!("k{i}"), "x");
    }
    c.put(G, "later", "y");
}

impl Cluster {
    /// Isolates `old`, the leader of `G`: the others elect a new leader and
    /// commit; once the partition heals, everyone has the write and `old`
    /// no longer leads.
    fn cut_off_leader_is_replaced(&mut self, old: NodeId) {
        self.isolated.insert(old);
        let new = self.elect(G);
        assert_ne!(old, new);
        self.put(G, "b", "2");
        self.isolated.clear();
        self.converge(G, "b", "2");
        assert_ne!(
            self.node(old).engine.status(G).unwrap().role,
            StateRole::Leader
        );
    }

    /// Ticks until every live replica of `group` is asleep.
    fn sleep(&mut self, group: GroupId) {
        self.run_until(200, "every replica is asleep", |c| {
            c.nodes
                .values()
                .flatten()
                .all(|node| node.engine.status(group).is_some_and(|s| s.asleep))
        });
    }
}

#[test]
fn a_quiet_group_falls_asleep_and_sends_nothing() {
    let mut c = Cluster::new(3, EngineConfig::default());
    c.put(G, "a", "1");
    c.converge(G, "a", "1");
    c.sleep(G);
    let sent = c.sent;
    for _ in 0..100 {
        c.tick();
    }
    assert_eq!(c.sent, sent, "a sleeping group sends no heartbeats");
    // A proposal wakes it, and it commits as usual.
    c.put(G, "b", "2");
    c.converge(G, "b", "2");
}

#[test]
fn a_sleeping_groups_followers_elect_when_the_leader_crashes() {
    let mut c = Cluster::new(3, EngineConfig::default());
    c.put(G, "a", "1");
    c.sleep(G);
    let old = c.leader(G).unwrap();
    c.crash(old);
    let new = c.elect(G);
    assert_ne!(new, old);
    c.put(G, "b", "2");
    c.converge(G, "b", "2");
}

#[test]
fn a_sleeping_leader_cut_off_is_replaced_and_steps_down_on_return() {
    let mut c = Cluster::new(3, EngineConfig::default());
    c.put(G, "a", "1");
    c.sleep(G);
    let old = c.leader(G).unwrap();
    // A sleeping leader runs no check-quorum: it steps down on hearing the
    // new term once the partition heals.
    c.cut_off_leader_is_replaced(old);
}

/// A restarted follower knows no leader and a sleeping leader sends no
/// heartbeats: its pre-vote must wake the group, or it never learns one.
#[test]
fn a_restarted_follower_finds_a_sleeping_leader() {
    let mut c = Cluster::new(3, EngineConfig::default());
    c.put(G, "a", "1");
    c.converge(G, "a", "1");
    c.sleep(G);
    let leader = c.leader(G).unwrap();
    let follower = (1..=3).map(n).find(|&id| id != leader).unwrap();
    c.crash(follower);
    c.restart(follower);
    c.run_until(300, "the restarted follower learns the leader", |c| {
        c.node(follower).engine.status(G).unwrap().leader == Some(leader)
    });
    assert_eq!(c.leader(G), Some(leader), "no new election was needed");
}

/// A replica that never heard from a leader knows no log, so it must not
/// grant votes: its node may have held the group before, and a peer with a
/// stale configuration that still counts that node could win with a vote
/// the old replica would have refused (simulator seed 14260).
#[test]
fn a_replica_without_a_log_grants_no_vote() {
    let mut c = Cluster::new(3, EngineConfig::default());
    c.put(G, "k", "v");
    c.add_empty_node(n(4));
    for msg_type in [MessageType::MsgRequestPreVote, MessageType::MsgRequestVote] {
        let mut request = raft::prelude::Message::default();
        request.set_msg_type(msg_type);
        request.from = 1;
        request.to = 4;
        request.term = 100;
        c.node(n(4)).engine.step(G, request).unwrap();
        let status = c.node(n(4)).engine.status(G).unwrap();
        assert_eq!(status.term, 0, "{msg_type:?} was not ignored: {status:?}");
        assert!(!c.node(n(4)).engine.has_work(), "{msg_type:?} was answered");
    }
}

/// A replica without a configuration takes its first snapshot only if it
/// lists the replica as a learner, which is how keel adds every replica. A
/// snapshot that lists it as a voter comes from a leader whose
/// configuration still counts the replica's node from before it was
/// removed; that leader could commit with the new replica's
/// acknowledgements over entries its group committed without it.
#[test]
fn a_replica_without_a_log_takes_a_first_snapshot_only_as_a_learner() {
    let mut c = Cluster::new(3, EngineConfig::default());
    c.put(G, "k", "v");
    c.add_empty_node(n(4));
    let snapshot = |voters: Vec<u64>, learners: Vec<u64>| {
        let mut message = raft::prelude::Message::default();
        message.set_msg_type(MessageType::MsgSnapshot);
        message.from = 1;
        message.to = 4;
        message.term = 100;
        let metadata = message.mut_snapshot().mut_metadata();
        metadata.index = 50;
        metadata.term = 100;
        metadata.mut_conf_state().voters = voters;
        metadata.mut_conf_state().learners = learners;
        message
    };
    c.node(n(4))
        .engine
        .step(G, snapshot(vec![1, 2, 4], vec![]))
        .unwrap();
    let status = c.node(n(4)).engine.status(G).unwrap();
    assert_eq!(
        status.term, 0,
        "a snapshot naming a voter was taken: {status:?}"
    );
    assert!(!c.node(n(4)).engine.has_work());
    c.node(n(4))
        .engine
        .step(G, snapshot(vec![1, 2, 3], vec![4]))
        .unwrap();
    let status = c.node(n(4)).engine.status(G).unwrap();
    assert_eq!(
        status.term, 100,
        "the learner's snapshot was refused: {status:?}"
    );
    assert!(c.node(n(4)).engine.has_work());
}

/// A node that deleted its replica of a group may have acknowledged
/// entries it no longer has: it never starts that group from its first
/// snapshot again, even after a restart, and waits for its leader's.
#[test]
fn a_deleted_replica_is_never_started_from_scratch_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("n1.redb");
    let bootstrap = GroupBootstrap {
        voters: vec![n(1), n(2)],
        data: KvStateMachine::new().snapshot(),
    };
    let open = || {
        let db = Arc::new(redb::Database::create(&path).expect("open redb"));
        Engine::new(n(1), EngineConfig::default(), RaftStore::new(db))
    };
    let voters = |engine: &Engine, group| engine.conf_state(group).unwrap().get_voters().to_vec();
    let mut engine = open();
    assert!(engine
        .open_group(G, Some(bootstrap.clone()))
        .unwrap()
        .is_some());
    assert_eq!(voters(&engine, G), [1, 2]);
    engine.destroy_group(G).unwrap();
    assert!(engine
        .open_group(G, Some(bootstrap.clone()))
        .unwrap()
        .is_none());
    assert!(voters(&engine, G).is_empty());
    // Another group is not affected.
    let other = GroupId(2);
    assert!(engine
        .open_group(other, Some(bootstrap.clone()))
        .unwrap()
        .is_some());
    drop(engine);
    let mut engine = open();
    assert_eq!(engine.persisted_groups().unwrap(), [other]);
    assert!(engine.open_group(G, Some(bootstrap)).unwrap().is_none());
    assert!(voters(&engine, G).is_empty());
}
