//! What nodes (and clients) say to each other. Every frame is a
//! [`Request`] or [`Response`] inside the codec envelope; a node decodes and
//! validates each one, and answers a malformed call with an error.

use crate::core::cache::{MetadataState, RejectReason};
use crate::core::codec::{FrameKind, Wire};
use crate::core::entry::MetadataEntry;
use crate::core::hlc::Hlc;
use crate::core::ids::{GroupId, NodeId, VShardId};
use crate::core::routing::WrongGroup;
use crate::core::vshard_gate::{ControlRefusal, Gate, GateRefusal, GroupControl};
use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

/// One Raft message of one group, in raft-rs's protobuf encoding.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RaftFrame {
    pub group: GroupId,
    #[serde(with = "serde_bytes")]
    pub message: Vec<u8>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// One round's Raft messages for one peer, all groups together (one-way).
    Raft(Vec<RaftFrame>),
    /// A Raft snapshot, sent as a call so that the sender learns whether it
    /// arrived and can tell raft-rs (`report_snapshot`).
    RaftSnapshot(RaftFrame),
    /// Propose a metadata entry (forwarded to the group-0 leader).
    ProposeMetadata(MetadataEntry),
    /// Propose a data command on a vShard. `group` is the group the sender
    /// believes serves the vShard; a leader whose routing disagrees answers
    /// with a [`WrongGroup`] redirect.
    Propose {
        vshard: VShardId,
        group: Option<GroupId>,
        #[serde(with = "serde_bytes")]
        command: Vec<u8>,
    },
    /// A linearizable read on a vShard (forwarded to its group's leader).
    Read {
        vshard: VShardId,
        #[serde(with = "serde_bytes")]
        query: Vec<u8>,
    },
    /// A linearizable read of the metadata state (forwarded to the group-0
    /// leader).
    ReadMetadata,
    Status,
    /// Propose a vShard-move step to a data group (at its leader).
    ProposeControl {
        group: GroupId,
        control: GroupControl,
    },
    /// One vShard's data at a group's leader, read linearizably (a move's
    /// copy); answered with [`Response::Export`].
    ExportVShard {
        group: GroupId,
        vshard: VShardId,
    },
    /// Several forwarded calls to this peer, each an encoded request that
    /// [`Request::travels_forwarded`]; answered by [`Response::Forwarded`]
    /// (see `node::forward`).
    Forwarded(Vec<ByteBuf>),
    /// Every node a group's Raft configuration lists, in any role, read
    /// linearizably at its leader; answered with [`Response::Members`]. A
    /// replica asks before it deletes itself (a leader cut off from its
    /// group may still believe in a configuration the group has left).
    GroupMembers {
        group: GroupId,
    },
}

/// The most calls one [`Request::Forwarded`] batch may hold; a larger batch
/// is refused whole.
pub const MAX_FORWARDED_ITEMS: usize = 256;

impl Request {
    /// Whether the request may travel in a [`Request::Forwarded`] batch:
    /// the proposals and reads a node forwards to a leader for its clients.
    /// Nothing else does, so a batch never holds a batch.
    pub fn travels_forwarded(&self) -> bool {
        matches!(
            self,
            Request::ProposeMetadata(_) | Request::Propose { .. } | Request::Read { .. }
        )
    }
}

impl Wire for Request {
    const KIND: FrameKind = FrameKind::Rpc;
}

/// What a committed proposal produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    /// A metadata entry: applied, or deterministically rejected and why.
    Metadata(Option<RejectReason>),
    /// A data command: the state machine's response.
    Data(Vec<u8>),
    /// A vShard-move step: applied, or refused (a deterministic no-op) and why.
    Control(Option<ControlRefusal>),
}

/// A committed proposal: where it landed and what it did.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    pub index: u64,
    pub hlc: Hlc,
    pub outcome: Outcome,
}

/// How a group looks from one node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupView {
    pub group: GroupId,
    pub leader: Option<NodeId>,
    pub is_leader: bool,
    pub term: u64,
    pub commit: u64,
    pub applied: u64,
    pub voters: Vec<NodeId>,
    /// The outgoing voters while the group is in a joint configuration
    /// (empty otherwise): until it leaves it, both sets need a quorum.
    pub voters_outgoing: Vec<NodeId>,
    pub learners: Vec<NodeId>,
    /// Set if the group fail-stopped on this node (DESIGN.md §3.3).
    pub failed: Option<String>,
    /// vShard gates of unfinished moves (fences, partial copies).
    pub unsettled: Vec<(VShardId, Gate)>,
    /// On the leader: how far each peer is replicated, and raft-rs's
    /// replication state for it (Probe, Replicate, Snapshot).
    pub peers: Vec<PeerProgress>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerProgress {
    pub node: NodeId,
    pub matched: u64,
    pub state: String,
}

/// A node's view of itself and its groups (`keel status`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub node: NodeId,
    pub routing_epoch: Option<u64>,
    pub metadata_applied: Option<u64>,
    pub groups: Vec<GroupView>,
    /// The node was decommissioned or has left: it serves nothing, and
    /// what it reports of the cluster may be stale for good.
    pub retired: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum NodeError {
    #[error("node is not the leader of group {group}; the leader is {leader:?}")]
    NotLeader {
        group: GroupId,
        leader: Option<NodeId>,
    },
    #[error(transparent)]
    WrongGroup(WrongGroup),
    #[error("this node does not have the cluster's metadata yet; retry shortly")]
    NoMetadata,
    #[error("group {group} is fail-stopped on this node: {cause}")]
    FailStopped { group: GroupId, cause: String },
    #[error("the request timed out; a proposal's outcome is unknown")]
    Timeout,
    #[error("the node is shutting down")]
    Stopped,
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("peer {peer} could not be reached: {cause}")]
    Unreachable { peer: NodeId, cause: String },
    #[error("the proposal was dropped before it committed (leadership changed); retry")]
    Dropped,
    /// The group refused the vShard (a move fences it or took it away); the
    /// request did not execute, so it may be retried once routing catches up.
    #[error(transparent)]
    Unavailable(GateRefusal),
    /// This node was decommissioned (or has left the cluster): it hosts no
    /// data and its metadata may be stale for good, so it serves nothing.
    #[error("node {node} was decommissioned and serves no requests; send them to another node of the cluster")]
    Retired { node: NodeId },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Committed(Committed),
    Read(#[serde(with = "serde_bytes")] Vec<u8>),
    Metadata(Box<MetadataState>),
    Status(NodeStatus),
    /// A vShard's export and the group index it reflects.
    Export {
        index: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// A snapshot frame was received and stepped.
    Ack,
    Error(NodeError),
    /// The encoded answers to a [`Request::Forwarded`] batch, one per item
    /// and in its order.
    Forwarded(Vec<ByteBuf>),
    /// The answer to [`Request::GroupMembers`].
    Members(Vec<NodeId>),
}

impl Wire for Response {
    const KIND: FrameKind = FrameKind::Rpc;
}

/// A data group's log record: the command and when (and for which vShard)
/// its leader proposed it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataRecord {
    pub hlc: Hlc,
    pub vshard: VShardId,
    /// The routing epoch the proposer routed the record with: a group that
    /// received the vShard in a move serves only records routed after it
    /// ([`crate::core::vshard_gate`]).
    pub epoch: u64,
    pub body: DataBody,
}

/// What a data group's log record carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DataBody {
    /// A command for the group's state machine.
    Command(#[serde(with = "serde_bytes")] Vec<u8>),
    /// A step of a vShard move, applied by the node itself.
    Control(GroupControl),
}

impl Wire for DataRecord {
    const KIND: FrameKind = FrameKind::DataRecord;
}
