//! The multi-Raft engine: every Raft group this node hosts, driven together.
//!
//! One [`Engine`] holds a raft-rs `RawNode` per group. The node runtime feeds
//! it ticks, incoming messages and proposals and runs rounds. A round has two
//! halves:
//!
//! 1. [`Engine::begin_round`] collects the `Ready` of every group and stages
//!    all of it for **one** redb write transaction (one commit for the whole
//!    node). It hands back at once what does not wait for that write: the
//!    messages raft-rs allows to leave before persistence (a leader's appends
//!    and heartbeats, so followers write in parallel with the leader — the
//!    Raft thesis §10.2.1 optimization) and completed read-index requests.
//! 2. [`Engine::finish_round`] writes, advances every group and returns the
//!    rest: the messages that promise persistence (votes, append responses)
//!    and the committed work to apply.
//!
//! Commit-index durability (DESIGN.md §10: persist the commit index with or
//! before applying): entries committed in a `Ready` are applied after the
//! write that stores that ready's hard state, commit index included. raft-rs
//! reports some commits only once a ready is advanced
//! (`LightReady::commit_index`: this node's own write completed a quorum);
//! those entries wait for the next round's write, which persists the commit
//! index first. A restart therefore never finds applied entries above the
//! stored commit index.
//!
//! State machines are rebuilt on restart from the group's last snapshot plus
//! the committed log after it, so the persisted "applied" point of a group is
//! its snapshot index; [`Engine::compact`] moves it forward and truncates the
//! log, keeping the log bounded.
//!
//! Hibernation: a group with nothing to do stops ticking, so 1024 quiet
//! groups cost no heartbeats (TiKV's hibernate regions, CockroachDB's
//! quiescence). A group is *settled* when its log is committed and applied
//! everywhere it can see: on a leader, every peer has matched the last
//! index and nothing (transfer, read, membership change) is in flight; on a
//! follower, it knows a leader whose node is reachable (node-level pings,
//! [`Engine::peers`]) and has applied the leader's last commit. A group
//! settled for an election timeout of ticks is asleep: [`Engine::tick`]
//! skips it. Anything with work wakes it: a proposal, a read, a transfer,
//! or any message other than a heartbeat (so a restarted peer's pre-vote
//! wakes a sleeping leader, which then heartbeats it). A follower whose
//! leader's node goes silent is no longer settled and ticks towards an
//! election; a sleeping leader that lost its quorum keeps no lease (keel's
//! reads are read-index reads, confirmed by a quorum each time).
//!
//! Determinism: raft-rs draws election timeouts from its own unseeded rng,
//! so the engine pins the range to a single value
//! (`max_election_tick = min + 1`, an exclusive bound) and the runtime adds
//! seeded jitter to the tick schedule instead (DESIGN.md §8).

use crate::core::ids::{GroupId, NodeId};
use crate::raft::logger::raft_logger;
use crate::raft::storage::{GroupStorage, RaftStore, StorageError, WriteBatch};
use raft::prelude::{
    ConfChangeSingle, ConfChangeTransition, ConfChangeType, ConfChangeV2, ConfState, Entry,
    Message, MessageType, ReadState, Snapshot, SnapshotStatus,
};
use raft::{RawNode, Ready, StateRole, Storage};
use std::collections::BTreeMap;

/// The index (and term) at which a bootstrapped group's log begins.
pub const BOOTSTRAP_INDEX: u64 = 5;

/// Tunables of the engine. Defaults suit a LAN: 10 ticks to elect, 2 per heartbeat.
#[derive(Clone, Debug)]
pub struct EngineConfig {
    pub election_tick: usize,
    pub heartbeat_tick: usize,
    /// Upper bound on the bytes of entries in one append message.
    pub max_size_per_msg: u64,
    /// Upper bound on in-flight append messages per follower.
    pub max_inflight_msgs: usize,
    /// Compact a group's log once this many applied entries follow its snapshot.
    pub compact_threshold: u64,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            election_tick: 10,
            heartbeat_tick: 2,
            max_size_per_msg: 1 << 20,
            max_inflight_msgs: 256,
            compact_threshold: 10_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("group {0} is not hosted on this node")]
    UnknownGroup(GroupId),
    #[error("group {0} is already hosted on this node")]
    GroupExists(GroupId),
    #[error("not the leader of group {group}; try {leader:?}")]
    NotLeader {
        group: GroupId,
        leader: Option<NodeId>,
    },
    #[error("raft error in group {group}: {source}")]
    Raft {
        group: GroupId,
        #[source]
        source: raft::Error,
    },
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// How a brand-new group starts: its voters and its state machine's
/// initial snapshot, as of [`BOOTSTRAP_INDEX`].
#[derive(Clone, Debug)]
pub struct GroupBootstrap {
    pub voters: Vec<NodeId>,
    pub data: Vec<u8>,
}

/// A Raft message bound for one peer, tagged with its group.
#[derive(Clone, Debug)]
pub struct GroupMessage {
    pub group: GroupId,
    pub message: Message,
}

/// What one group must apply, in order: first the snapshot (if any), then
/// the entries. The caller then reports the last index it applied through
/// [`Engine::advance_apply`] — the snapshot's index when there are no
/// entries: raft-rs counts a restored snapshot as applied only when told.
#[derive(Debug)]
pub struct GroupApply {
    pub group: GroupId,
    pub snapshot: Option<Snapshot>,
    pub entries: Vec<Entry>,
}

/// The first half of a round: everything staged for the write, and what
/// may be used before it (see the module docs).
pub struct PendingRound {
    batch: WriteBatch,
    readies: Vec<(GroupId, Ready)>,
    /// Entries whose commit index this round's write makes durable.
    released: Vec<(GroupId, Vec<Entry>)>,
    /// Messages that may leave before the write, batched per destination.
    pub messages: BTreeMap<NodeId, Vec<GroupMessage>>,
    /// Completed read-index requests.
    pub read_states: Vec<(GroupId, ReadState)>,
}

/// The second half of a round, all of it after the write is durable.
#[derive(Debug, Default)]
pub struct Round {
    /// Messages to send, batched per destination node.
    pub messages: BTreeMap<NodeId, Vec<GroupMessage>>,
    /// Committed work to apply, per group, in commit order.
    pub applies: Vec<GroupApply>,
    /// Groups whose leader or role changed this round, with the new view.
    pub role_changes: Vec<(GroupId, Option<NodeId>, StateRole)>,
}

/// A group's leadership as this node sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GroupStatus {
    pub leader: Option<NodeId>,
    pub role: StateRole,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub first_index: u64,
    pub last_index: u64,
    /// Hibernating: not ticking until something wakes it.
    pub asleep: bool,
}

struct Group {
    raw: RawNode<GroupStorage>,
    /// Entries committed by a `LightReady` whose commit index is not yet durable.
    deferred: Vec<Entry>,
    /// The commit index to persist in the next write.
    deferred_commit: Option<u64>,
    /// Consecutive ticks the group was settled; asleep from an election
    /// timeout on (see the module docs).
    quiet_ticks: usize,
    /// Compaction requested by the runtime: (index, snapshot data).
    compaction: Option<(u64, Vec<u8>)>,
    /// Read-index contexts asked of this leader before it committed an
    /// entry of its own term (see [`Engine::read_index`]).
    held_reads: Vec<Vec<u8>>,
}

impl Group {
    /// Whether held reads can now be asked (the leader committed an entry
    /// of its term) or must be dropped (it no longer leads).
    fn held_reads_due(&self) -> bool {
        !self.held_reads.is_empty()
            && (self.raw.raft.state != StateRole::Leader || self.raw.raft.commit_to_current_term())
    }

    /// Asks raft-rs for the held read indexes, or drops them where this
    /// node no longer leads: the runtime fails a read whose node lost
    /// leadership, and a follower would only forward them.
    fn release_held_reads(&mut self) {
        if !self.held_reads_due() {
            return;
        }
        let held = std::mem::take(&mut self.held_reads);
        if self.raw.raft.state == StateRole::Leader {
            for context in held {
                self.raw.read_index(context);
            }
        }
    }
}

pub struct Engine {
    node: NodeId,
    config: EngineConfig,
    store: RaftStore,
    groups: BTreeMap<GroupId, Group>,
    /// Groups whose applied index moved or that raft-rs may have asked for
    /// a snapshot since [`Engine::compaction_candidates`] last looked: only
    /// these can have come to want a compaction, so 1024 quiet groups are
    /// not scanned after every round.
    touched: std::collections::BTreeSet<GroupId>,
}

fn leader_of(id: u64) -> Option<NodeId> {
    NodeId::new(id).ok()
}

impl Engine {
    pub fn new(node: NodeId, config: EngineConfig, store: RaftStore) -> Self {
        Engine {
            node,
            config,
            store,
            groups: BTreeMap::new(),
            touched: std::collections::BTreeSet::new(),
        }
    }

    /// Groups with state on disk (what a restarting node reopens).
    pub fn persisted_groups(&self) -> Result<Vec<GroupId>, EngineError> {
        Ok(self.store.groups()?)
    }

    /// Hosts `group`. With a [`GroupBootstrap`], a brand-new group starts
    /// from that membership and state-machine snapshot (cluster bootstrap,
    /// group creation), unless this node once had a replica of the group
    /// and deleted it; with none, the replica waits for its leader to send
    /// a snapshot (a new learner or voter). Persisted state, if any, always
    /// wins. Returns the group's stored snapshot, from which the caller
    /// restores the state machine before applying anything.
    pub fn open_group(
        &mut self,
        group: GroupId,
        bootstrap: Option<GroupBootstrap>,
    ) -> Result<Option<Snapshot>, EngineError> {
        if self.groups.contains_key(&group) {
            return Err(EngineError::GroupExists(group));
        }
        let storage = self.store.open_group(group, &[])?;
        let brand_new = storage.last_index() == 0 && storage.snapshot_data()?.is_none();
        if let (true, Some(bootstrap)) = (brand_new, bootstrap) {
            if self.store.destroyed(group)? {
                // Once a member, it may have acknowledged entries it has
                // since forgotten: it waits for a snapshot like any new
                // replica instead of counting as a voter from scratch.
                crate::probe!("raft.bootstrap_refused_destroyed");
            } else {
                self.write_bootstrap_snapshot(&storage, bootstrap)?;
            }
        }
        let snapshot = match storage.snapshot_data()? {
            Some((metadata, data)) => {
                let mut snapshot = Snapshot::default();
                snapshot.set_metadata(metadata);
                snapshot.set_data(data.into());
                Some(snapshot)
            }
            None => None,
        };
        let applied = storage.first_index() - 1;
        let config = raft::Config {
            id: self.node.get(),
            election_tick: self.config.election_tick,
            heartbeat_tick: self.config.heartbeat_tick,
            min_election_tick: self.config.election_tick,
            max_election_tick: self.config.election_tick + 1,
            applied,
            max_size_per_msg: self.config.max_size_per_msg,
            max_inflight_msgs: self.config.max_inflight_msgs,
            check_quorum: true,
            pre_vote: true,
            ..Default::default()
        };
        let logger = raft_logger(self.node.get(), group.0);
        let raw = RawNode::new(&config, storage, &logger)
            .map_err(|source| EngineError::Raft { group, source })?;
        note_learners(&raw);
        self.groups.insert(
            group,
            Group {
                raw,
                deferred: Vec::new(),
                deferred_commit: None,
                quiet_ticks: 0,
                held_reads: Vec::new(),
                compaction: None,
            },
        );
        Ok(snapshot)
    }

    /// Starts a new group's log at [`BOOTSTRAP_INDEX`] with a snapshot of
    /// its voters and initial state. A replica added later starts with
    /// nothing and needs entries below that index, which no log holds, so
    /// its leader sends it a snapshot: every replica learns the initial
    /// membership the same way, from a snapshot, never by replaying a log
    /// that does not contain it (the scheme TiKV uses).
    fn write_bootstrap_snapshot(
        &self,
        storage: &GroupStorage,
        bootstrap: GroupBootstrap,
    ) -> Result<(), EngineError> {
        let mut snapshot = Snapshot::default();
        let metadata = snapshot.mut_metadata();
        metadata.index = BOOTSTRAP_INDEX;
        metadata.term = BOOTSTRAP_INDEX;
        metadata
            .mut_conf_state()
            .set_voters(bootstrap.voters.iter().map(|n| n.get()).collect());
        snapshot.set_data(bootstrap.data.into());
        let mut batch = WriteBatch::default();
        batch.apply_snapshot(storage, &snapshot);
        Ok(self.store.write(batch)?)
    }

    /// Stops hosting `group` (its replica was removed). Its data stays on
    /// disk until the caller deletes it.
    pub fn close_group(&mut self, group: GroupId) -> Result<(), EngineError> {
        self.groups
            .remove(&group)
            .map(|_| ())
            .ok_or(EngineError::UnknownGroup(group))
    }

    /// Records durably that the cluster retired this node (see
    /// [`RaftStore::mark_retired`]).
    pub fn mark_retired(&self) -> Result<(), EngineError> {
        Ok(self.store.mark_retired(self.node)?)
    }

    /// Whether this node recorded its retirement before it last stopped.
    pub fn retired(&self) -> Result<bool, EngineError> {
        Ok(self.store.retired(self.node)?)
    }

    /// Stops hosting `group` and deletes its stored log, state and
    /// snapshot: the replica was removed from the group for good.
    pub fn destroy_group(&mut self, group: GroupId) -> Result<(), EngineError> {
        self.close_group(group)?;
        Ok(self.store.destroy_group(group)?)
    }

    pub fn hosts(&self, group: GroupId) -> bool {
        self.groups.contains_key(&group)
    }

    pub fn groups(&self) -> impl Iterator<Item = GroupId> + '_ {
        self.groups.keys().copied()
    }

    fn group_mut(&mut self, group: GroupId) -> Result<&mut Group, EngineError> {
        self.groups
            .get_mut(&group)
            .ok_or(EngineError::UnknownGroup(group))
    }

    /// The group, if this node leads it; otherwise a redirect to the leader it knows.
    fn leader_group_mut(&mut self, group: GroupId) -> Result<&mut Group, EngineError> {
        let g = self.group_mut(group)?;
        if g.raw.raft.state == StateRole::Leader {
            Ok(g)
        } else {
            Err(EngineError::NotLeader {
                group,
                leader: leader_of(g.raw.raft.leader_id),
            })
        }
    }

    fn raft_err(group: GroupId) -> impl FnOnce(raft::Error) -> EngineError {
        move |source| EngineError::Raft { group, source }
    }

    /// Advances the logical clock of every group that is awake by one tick
    /// and puts settled groups to sleep. `reachable` says whether a node was
    /// heard from lately (any frame or ping): a follower sleeps only while
    /// its leader's node is. The caller calls a node unreachable once it has
    /// been silent for at least [`Engine::silence_ticks`] ticks; a follower
    /// woken that way counts that silence towards its election timeout, so
    /// a sleeping group fails over about as fast as an awake one.
    pub fn tick(&mut self, reachable: impl Fn(NodeId) -> bool) {
        let sleep_after = self.config.election_tick;
        let silence = self.silence_ticks();
        for g in self.groups.values_mut() {
            let asleep = g.quiet_ticks >= sleep_after;
            if !settled(&g.raw, &reachable) {
                if asleep && leader_of(g.raw.raft.leader_id).is_some_and(|l| !reachable(l)) {
                    crate::probe!("raft.woken_by_silent_leader");
                    for _ in 0..silence {
                        g.raw.tick();
                    }
                }
                g.quiet_ticks = 0;
            } else if asleep {
                continue;
            } else {
                g.quiet_ticks += 1;
                if g.quiet_ticks == sleep_after {
                    crate::probe!("raft.group_hibernated");
                }
            }
            g.raw.tick();
        }
    }

    /// How many ticks of silence make a node unreachable for
    /// [`Engine::tick`]: two heartbeat intervals.
    pub fn silence_ticks(&self) -> usize {
        2 * self.config.heartbeat_tick
    }

    /// A group awake again ticks for at least an election timeout.
    fn wake(g: &mut Group) {
        g.quiet_ticks = 0;
    }

    /// Every other node hosting a replica of a group hosted here: the nodes
    /// that must hear from this one (a ping when nothing else is sent) for
    /// their followers to keep sleeping.
    pub fn peers(&self) -> std::collections::BTreeSet<NodeId> {
        let mut peers = std::collections::BTreeSet::new();
        for g in self.groups.values() {
            let ids = g.raw.raft.prs().iter().map(|(&id, _)| id);
            peers.extend(ids.filter_map(|id| NodeId::new(id).ok()));
        }
        peers.remove(&self.node);
        peers
    }

    /// Feeds a message from a peer into its group. Anything but a heartbeat
    /// (and its answer) wakes the group.
    pub fn step(&mut self, group: GroupId, message: Message) -> Result<(), EngineError> {
        self.touch(group);
        let me = self.node.get();
        let g = self.group_mut(group)?;
        if message.get_msg_type() == MessageType::MsgSnapshot
            && !initialized(&g.raw)
            && !lists_as_learner(&message, me)
        {
            // A replica without a configuration starts from its leader's
            // snapshot. keel adds every replica as a learner (a joining
            // node to group 0, a replica move, placement) and promotes it
            // only once it has caught up, so its real leader's first
            // snapshot lists it as a learner. One that lists it as a voter
            // comes from a leader with a stale configuration that still
            // counts this node from before it was removed and deleted its
            // replica: with this replica's acknowledgements that leader
            // could commit over entries its group committed without it.
            crate::probe!("raft.snapshot_refused_uninitialized");
            tracing::debug!(
                node = me,
                %group,
                from = message.from,
                term = message.term,
                "a replica without a log refused a snapshot that lists it as a voter"
            );
            return Ok(());
        }
        if is_vote_request(&message) && !initialized(&g.raw) {
            // A replica that never heard from a leader knows no log, so
            // raft-rs would grant any candidate its vote. The node may have
            // held this group before, been removed and deleted its replica:
            // a peer with a stale configuration that still counts this node
            // could then win with a vote the old replica would have refused,
            // over entries committed without that peer (simulator seed
            // 14260: two leaders with conflicting committed logs). Such a
            // replica votes only once a leader has given it a log.
            crate::probe!("raft.vote_refused_uninitialized");
            return Ok(());
        }
        if !matches!(
            message.get_msg_type(),
            MessageType::MsgHeartbeat | MessageType::MsgHeartbeatResponse
        ) {
            Self::wake(g);
        }
        g.raw.step(message).map_err(Self::raft_err(group))
    }

    /// Starts an election in `group` now (benchmarks and tests; normally the
    /// election timeout does this).
    pub fn campaign(&mut self, group: GroupId) -> Result<(), EngineError> {
        let g = self.group_mut(group)?;
        Self::wake(g);
        g.raw.campaign().map_err(Self::raft_err(group))
    }

    /// Proposes `data` on the leader. `context` comes back with the committed
    /// entry, which is how the runtime matches commits to waiting proposers.
    pub fn propose(
        &mut self,
        group: GroupId,
        context: Vec<u8>,
        data: Vec<u8>,
    ) -> Result<(), EngineError> {
        self.touch(group);
        let g = self.leader_group_mut(group)?;
        Self::wake(g);
        g.raw.propose(context, data).map_err(Self::raft_err(group))
    }

    /// Proposes a membership change (joint consensus when it changes more
    /// than one voter; keel always leaves the joint state explicitly).
    pub fn propose_conf_change(
        &mut self,
        group: GroupId,
        context: Vec<u8>,
        change: ConfChangeV2,
    ) -> Result<(), EngineError> {
        self.touch(group);
        let g = self.leader_group_mut(group)?;
        Self::wake(g);
        g.raw
            .propose_conf_change(context, change)
            .map_err(Self::raft_err(group))
    }

    /// Applies a committed membership change, in apply order.
    pub fn apply_conf_change(
        &mut self,
        group: GroupId,
        change: &ConfChangeV2,
    ) -> Result<ConfState, EngineError> {
        let g = self.group_mut(group)?;
        let conf = g
            .raw
            .apply_conf_change(change)
            .map_err(Self::raft_err(group))?;
        note_learners(&g.raw);
        Ok(conf)
    }

    /// Requests a linearizable read point; it completes as a `ReadState`
    /// carrying `context` in a later round.
    ///
    /// raft-rs silently drops a read index asked of a leader that has not
    /// yet committed an entry of its own term (its commit index may still
    /// be behind what an earlier leader acknowledged), so the read would
    /// wait out its deadline. Such a request is held here and asked in the
    /// first round after that entry commits, as etcd's raft queues it.
    pub fn read_index(&mut self, group: GroupId, context: Vec<u8>) -> Result<(), EngineError> {
        let g = self.group_mut(group)?;
        Self::wake(g);
        if g.raw.raft.state == StateRole::Leader && !g.raw.raft.commit_to_current_term() {
            crate::probe!("raft.read_index_held");
            g.held_reads.push(context);
        } else {
            g.raw.read_index(context);
        }
        Ok(())
    }

    /// Asks the leader of `group` to hand leadership to `to`.
    pub fn transfer_leader(&mut self, group: GroupId, to: NodeId) -> Result<(), EngineError> {
        let g = self.group_mut(group)?;
        Self::wake(g);
        g.raw.transfer_leader(to.get());
        Ok(())
    }

    /// The transport could not reach `peer`: raft-rs probes it again instead
    /// of streaming appends into the void.
    pub fn report_unreachable(&mut self, group: GroupId, peer: NodeId) -> Result<(), EngineError> {
        self.group_mut(group)?.raw.report_unreachable(peer.get());
        Ok(())
    }

    /// Reports whether a snapshot sent to `peer` arrived.
    pub fn report_snapshot(
        &mut self,
        group: GroupId,
        peer: NodeId,
        status: SnapshotStatus,
    ) -> Result<(), EngineError> {
        self.touch(group);
        self.group_mut(group)?
            .raw
            .report_snapshot(peer.get(), status);
        Ok(())
    }

    /// The runtime applied `group` up to `index`.
    pub fn advance_apply(&mut self, group: GroupId, index: u64) -> Result<(), EngineError> {
        self.touch(group);
        self.group_mut(group)?.raw.advance_apply_to(index);
        Ok(())
    }

    /// Whether `group` needs a fresh snapshot from its state machine: its
    /// log has grown past the compaction threshold, or a peer needs a
    /// snapshot the stored one cannot serve.
    pub fn wants_compaction(&self, group: GroupId) -> bool {
        self.groups.get(&group).is_some_and(|g| {
            let store = g.raw.store();
            let applied = g.raw.raft.raft_log.applied;
            store.snapshot_wanted()
                || applied.saturating_sub(store.first_index() - 1) >= self.config.compact_threshold
        })
    }

    fn touch(&mut self, group: GroupId) {
        self.touched.insert(group);
    }

    /// The groups that want a compaction ([`Engine::wants_compaction`])
    /// among those touched since the last call.
    pub fn compaction_candidates(&mut self) -> Vec<GroupId> {
        let touched = std::mem::take(&mut self.touched);
        touched
            .into_iter()
            .filter(|&group| self.wants_compaction(group))
            .collect()
    }

    /// Records the state machine's snapshot at `index` (its applied index);
    /// the next round stores it and truncates the log up to it.
    pub fn compact(
        &mut self,
        group: GroupId,
        index: u64,
        data: Vec<u8>,
    ) -> Result<(), EngineError> {
        self.group_mut(group)?.compaction = Some((index, data));
        Ok(())
    }

    /// Whether a membership change of `group` is proposed but not yet
    /// applied here (raft-rs refuses another until it is).
    pub fn conf_change_pending(&self, group: GroupId) -> bool {
        self.groups
            .get(&group)
            .is_some_and(|g| g.raw.raft.pending_conf_index > g.raw.raft.raft_log.applied)
    }

    /// On the leader: the highest log index known to be replicated on `peer`.
    pub fn matched(&self, group: GroupId, peer: NodeId) -> Option<u64> {
        let g = self.groups.get(&group)?;
        g.raw.raft.prs().get(peer.get()).map(|p| p.matched)
    }

    /// On the leader: each peer's matched index and replication state.
    pub fn progress(&self, group: GroupId) -> Vec<(NodeId, u64, String)> {
        let Some(g) = self.groups.get(&group) else {
            return Vec::new();
        };
        if g.raw.raft.state != StateRole::Leader {
            return Vec::new();
        }
        g.raw
            .raft
            .prs()
            .iter()
            .filter_map(|(&id, p)| {
                Some((NodeId::new(id).ok()?, p.matched, format!("{:?}", p.state)))
            })
            .collect()
    }

    /// The membership `group` runs with now (as applied on this node).
    pub fn conf_state(&self, group: GroupId) -> Option<ConfState> {
        self.groups
            .get(&group)
            .map(|g| g.raw.raft.prs().conf().to_conf_state())
    }

    pub fn status(&self, group: GroupId) -> Option<GroupStatus> {
        self.groups.get(&group).map(|g| {
            let raft = &g.raw.raft;
            GroupStatus {
                leader: leader_of(raft.leader_id),
                role: raft.state,
                term: raft.term,
                commit: raft.raft_log.committed,
                applied: raft.raft_log.applied,
                first_index: g.raw.store().first_index(),
                last_index: g.raw.store().last_index(),
                asleep: g.quiet_ticks >= self.config.election_tick,
            }
        })
    }

    /// Whether a round would have anything to do.
    pub fn has_work(&self) -> bool {
        self.groups.values().any(|g| {
            g.raw.has_ready()
                || g.compaction.is_some()
                || g.deferred_commit.is_some()
                || g.held_reads_due()
        })
    }

    /// The first half of a round for every group: collects their readies
    /// and stages them in one write. The caller may send the pending
    /// messages and serve the read states before it calls
    /// [`Engine::finish_round`], and must call it before the next round
    /// (raft-rs persists readies in order).
    pub fn begin_round(&mut self) -> Result<PendingRound, EngineError> {
        let mut pending = PendingRound {
            batch: WriteBatch::default(),
            readies: Vec::new(),
            released: Vec::new(),
            messages: BTreeMap::new(),
            read_states: Vec::new(),
        };
        for (&group, g) in self.groups.iter_mut() {
            g.release_held_reads();
            if let Some(commit) = g.deferred_commit.take() {
                pending.batch.set_commit(g.raw.store(), commit);
                pending
                    .released
                    .push((group, std::mem::take(&mut g.deferred)));
            }
            if let Some((index, data)) = g.compaction.take() {
                // Only an applied index still in the log can become the
                // snapshot point; an older request was overtaken.
                let store = g.raw.store();
                if index >= store.first_index() && index <= g.raw.raft.raft_log.applied {
                    let term = store.term(index).map_err(Self::raft_err(group))?;
                    let conf_state = g.raw.raft.prs().conf().to_conf_state();
                    pending.batch.compact(store, index, term, &conf_state, data);
                    store.clear_snapshot_wanted();
                }
            }
            if !g.raw.has_ready() {
                continue;
            }
            self.touched.insert(group);
            let mut ready = g.raw.ready();
            if !ready.snapshot().is_empty() {
                pending
                    .batch
                    .apply_snapshot(g.raw.store(), ready.snapshot());
                note_learners(&g.raw);
            }
            if !ready.entries().is_empty() {
                pending.batch.append(g.raw.store(), ready.entries());
            }
            if let Some(hs) = ready.hs() {
                pending.batch.set_hard_state(g.raw.store(), hs);
            }
            pending
                .read_states
                .extend(ready.take_read_states().into_iter().map(|rs| (group, rs)));
            push_messages(&mut pending.messages, group, ready.take_messages());
            pending.readies.push((group, ready));
        }
        Ok(pending)
    }

    /// The second half of a round: persists what [`Engine::begin_round`]
    /// staged in one write, advances every group, and returns what waited
    /// for the write.
    pub fn finish_round(&mut self, pending: PendingRound) -> Result<Round, EngineError> {
        let PendingRound {
            batch,
            readies,
            released,
            ..
        } = pending;
        if !batch.is_empty() {
            self.store.write(batch)?;
        }
        let mut round = Round::default();
        for (group, entries) in released {
            push_apply(&mut round.applies, group, None, entries);
        }
        for (group, mut ready) in readies {
            let Some(g) = self.groups.get_mut(&group) else {
                continue;
            };
            if let Some(ss) = ready.ss() {
                if ss.raft_state == StateRole::Leader {
                    // For the simulator's election-safety checker: at most
                    // one leader per group and term, ever.
                    tracing::debug!(
                        target: "keel_event",
                        group = group.0,
                        term = g.raw.raft.term,
                        leader = self.node.get(),
                        "elected"
                    );
                }
                round
                    .role_changes
                    .push((group, leader_of(ss.leader_id), ss.raft_state));
            }
            let snapshot = (!ready.snapshot().is_empty()).then(|| ready.snapshot().clone());
            let committed = ready.take_committed_entries();
            push_apply(&mut round.applies, group, snapshot, committed);
            push_messages(&mut round.messages, group, ready.take_persisted_messages());
            let mut light = g.raw.advance_append(ready);
            push_messages(&mut round.messages, group, light.take_messages());
            let newly_committed = light.take_committed_entries();
            match light.commit_index() {
                // This node's own write completed a quorum (a single voter,
                // or followers that acknowledged before the leader's fsync),
                // moving the commit index past what the write persisted:
                // these entries wait until the next write makes it durable.
                Some(commit) => {
                    crate::probe!("raft.commit_deferred_to_next_round");
                    g.deferred_commit = Some(commit);
                    g.deferred.extend(newly_committed);
                }
                // Committed earlier (durably), only now persisted locally.
                None => push_apply(&mut round.applies, group, None, newly_committed),
            }
        }
        Ok(round)
    }
}

fn is_vote_request(message: &Message) -> bool {
    matches!(
        message.get_msg_type(),
        MessageType::MsgRequestVote | MessageType::MsgRequestPreVote
    )
}

/// Whether the snapshot `message` carries lists node `me` as a learner
/// (not as a voter being demoted, which still counts in the outgoing
/// quorum).
fn lists_as_learner(message: &Message, me: u64) -> bool {
    let conf = message.get_snapshot().get_metadata().get_conf_state();
    conf.learners.contains(&me)
}

/// Tells the group's storage which learners the configuration now has.
fn note_learners(raw: &RawNode<GroupStorage>) {
    let learners: Vec<u64> = raw.raft.prs().conf().learners().iter().copied().collect();
    raw.store().note_learners(&learners);
}

/// Whether the replica has a configuration: bootstrapped, or given a log
/// or snapshot by a leader. A replica created for a join or a move has none
/// until then.
fn initialized(raw: &RawNode<GroupStorage>) -> bool {
    let conf = raw.raft.prs().conf().to_conf_state();
    !(conf.voters.is_empty() && conf.learners.is_empty())
}

/// Whether a group has nothing to do but wait (see the module docs).
fn settled(raw: &RawNode<GroupStorage>, reachable: &impl Fn(NodeId) -> bool) -> bool {
    let raft = &raw.raft;
    let log = &raft.raft_log;
    let last = log.last_index();
    if log.committed != last || log.applied != last || log.persisted != last {
        return false;
    }
    match raft.state {
        StateRole::Leader => {
            raft.lead_transferee.is_none()
                && raft.pending_conf_index <= log.applied
                && raft.pending_read_count() == 0
                && raft.prs().iter().all(|(_, p)| p.matched == last)
        }
        StateRole::Follower => leader_of(raft.leader_id).is_some_and(reachable),
        StateRole::Candidate | StateRole::PreCandidate => false,
    }
}

/// Builds a membership change. One change uses raft's simple protocol;
/// several enter joint consensus, which keel always leaves explicitly (with
/// an empty change, raft-rs's encoding of "leave joint"), never automatically,
/// so the leave is its own checkpointed step (DESIGN.md §5, §10).
pub fn conf_change(changes: &[(ConfChangeType, NodeId)]) -> ConfChangeV2 {
    let mut change = ConfChangeV2::default();
    for &(change_type, node) in changes {
        let mut single = ConfChangeSingle::default();
        single.set_change_type(change_type);
        single.set_node_id(node.get());
        change.mut_changes().push(single);
    }
    if changes.len() > 1 {
        change.set_transition(ConfChangeTransition::Explicit);
    }
    change
}

/// The membership change a committed entry carries, if it is one (both
/// the old single-change and the V2 encodings).
pub fn conf_change_of(entry: &Entry) -> Result<Option<ConfChangeV2>, protobuf::ProtobufError> {
    use crate::core::codec;
    use raft::prelude::{ConfChange, EntryType};
    match entry.get_entry_type() {
        EntryType::EntryNormal => Ok(None),
        EntryType::EntryConfChange => {
            let old: ConfChange = codec::parse_protobuf(entry.get_data())?;
            let mut single = ConfChangeSingle::default();
            single.set_change_type(old.get_change_type());
            single.set_node_id(old.get_node_id());
            let mut change = ConfChangeV2::default();
            change.mut_changes().push(single);
            change.set_context(old.get_context().to_vec().into());
            Ok(Some(change))
        }
        EntryType::EntryConfChangeV2 => Ok(Some(codec::parse_protobuf(entry.get_data())?)),
    }
}

/// Appends committed work for `group`, merging with what is already queued
/// for it so each group appears once, in order.
fn push_apply(
    applies: &mut Vec<GroupApply>,
    group: GroupId,
    snapshot: Option<Snapshot>,
    entries: Vec<Entry>,
) {
    if snapshot.is_none() && entries.is_empty() {
        return;
    }
    match applies.iter_mut().find(|a| a.group == group) {
        Some(apply) if snapshot.is_none() => apply.entries.extend(entries),
        _ => applies.push(GroupApply {
            group,
            snapshot,
            entries,
        }),
    }
}

/// Queues `group`'s messages by destination.
fn push_messages(
    queue: &mut BTreeMap<NodeId, Vec<GroupMessage>>,
    group: GroupId,
    messages: Vec<Message>,
) {
    for message in messages {
        if let Ok(to) = NodeId::new(message.to) {
            queue
                .entry(to)
                .or_default()
                .push(GroupMessage { group, message });
        }
    }
}
