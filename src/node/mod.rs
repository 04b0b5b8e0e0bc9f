//! Layer 4: the node — the async runtime that wires one keel node together
//! (DESIGN.md §1). [`start`] opens or creates the node's state and spawns
//! its event loop; the returned [`Node`] is the handle through which the
//! host, the CLI and peers' forwarded requests reach it.
//!
//! A request made on a node that does not lead the group concerned is
//! forwarded to the leader the node knows (following redirects), so a
//! client may talk to any node.

mod data_group;
mod forward;
pub mod join;
mod liveness;
pub mod membership;
pub mod migrate;
pub mod rpc;
mod runtime;
pub mod service;

use crate::core::cache::{Bootstrap, MetadataState};
use crate::core::codec;
use crate::core::entry::MetadataEntry;
use crate::core::hlc::DEFAULT_MAX_CLOCK_OFFSET_MS;
use crate::core::hooks::MetadataHooks;
use crate::core::ids::{GroupId, NodeId, VShardId};
use crate::core::vshard_gate::GroupControl;
use crate::io::clock::WallClock;
use crate::io::transport::{Transport, TransportError};
use crate::io::NodeIo;
use crate::raft::engine::EngineConfig;
use forward::Forwarder;
use rpc::{Committed, NodeError, NodeStatus, Request, Response};
use runtime::{Command, Runtime};
pub use runtime::{MachineFactory, StartError, MAX_METADATA_VOTERS};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// How a node runs.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub node_id: NodeId,
    pub engine: EngineConfig,
    /// One Raft tick; elections take `engine.election_tick` of them.
    pub tick_interval: Duration,
    pub max_clock_offset_ms: u64,
    /// How long a proposal or read may take, redirects included.
    pub request_timeout: Duration,
    /// A join token stays `InFlight` at most this long (by the group-0
    /// leader's clock) before the dead-man timer reverts it to `Issued`:
    /// the joiner or the node admitting it vanished mid-join (DESIGN.md §6).
    pub join_dead_man: Duration,
    /// How the migration executor runs (DESIGN.md §5).
    pub migration: migrate::MigrationConfig,
}

impl NodeConfig {
    pub fn new(node_id: NodeId) -> Self {
        NodeConfig {
            node_id,
            engine: EngineConfig::default(),
            tick_interval: Duration::from_millis(100),
            max_clock_offset_ms: DEFAULT_MAX_CLOCK_OFFSET_MS,
            request_timeout: Duration::from_secs(5),
            join_dead_man: Duration::from_secs(30),
            migration: migrate::MigrationConfig::default(),
        }
    }
}

/// A handle to a running node. Cheap to clone.
#[derive(Clone)]
pub struct Node {
    id: NodeId,
    commands: mpsc::UnboundedSender<Command>,
    transport: Arc<dyn Transport>,
    /// Batches the calls this node forwards for its clients, per peer.
    forwarder: Arc<Forwarder>,
    clock: Arc<dyn WallClock>,
    request_timeout: Duration,
}

/// Starts a node: restarts from its persisted state if it has any,
/// otherwise bootstraps a new cluster with `bootstrap`, or, without it,
/// waits to receive group 0 from the cluster it is joining.
pub fn start(
    config: NodeConfig,
    io: NodeIo,
    bootstrap: Option<Bootstrap>,
    factory: MachineFactory,
    hooks: Box<dyn MetadataHooks + Send>,
) -> Result<(Node, JoinHandle<()>), StartError> {
    let (tx, rx) = mpsc::unbounded_channel();
    let node = Node {
        id: config.node_id,
        commands: tx.clone(),
        transport: Arc::clone(&io.transport),
        forwarder: Arc::new(Forwarder::new(
            Arc::clone(&io.transport),
            config.request_timeout,
        )),
        clock: Arc::clone(&io.clock),
        request_timeout: config.request_timeout,
    };
    let migration = config.migration.clone();
    let runtime = Runtime::open(config, io, bootstrap, factory, hooks, (tx, rx))?;
    let task = tokio::spawn(runtime.run());
    // The executor acts only while this node leads group 0, and ends when
    // the runtime does (its requests then fail with `Stopped`).
    tokio::spawn(migrate::run(node.clone(), migration));
    Ok((node, task))
}

/// The pause between attempts while no leader is known.
const RETRY_PAUSE: Duration = Duration::from_millis(20);

impl Node {
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The node's wall clock, in milliseconds: the time services stamp on
    /// the entries they propose (token transitions).
    pub fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    /// 32 bytes from the node's rng (secrets such as join tokens): the io
    /// layer's seeded generator, so simulations stay reproducible.
    pub async fn entropy(&self) -> Result<[u8; 32], NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Entropy { reply: tx })
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    async fn local<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<T, NodeError>>) -> Command,
    ) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(make(tx))
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)?
    }

    async fn remote(&self, to: NodeId, request: &Request) -> Result<Response, NodeError> {
        let encoded = codec::encode(request);
        let answer = if request.travels_forwarded() {
            self.forwarder.call(to, encoded).await
        } else {
            self.transport.call(to, encoded, self.request_timeout).await
        };
        let bytes = answer.map_err(|e| match e {
            // The request never left: safe to retry elsewhere.
            TransportError::Unreachable(_) | TransportError::FrameTooLarge { .. } => {
                NodeError::Unreachable {
                    peer: to,
                    cause: e.to_string(),
                }
            }
            // It may have arrived and be executing: its outcome is
            // unknown, and retrying could apply it twice.
            TransportError::Timeout(_) | TransportError::Dropped(_) => NodeError::Timeout,
        })?;
        codec::decode::<Response>(&bytes).map_err(|e| NodeError::BadRequest(e.to_string()))
    }

    /// Runs a request here or at the leader, following redirects until the
    /// deadline. `request` builds the request for a peer, given the group
    /// the last redirect named (so a leader whose routing moved the vShard
    /// answers `WrongGroup`); `local` runs it on this node; `unwrap` takes
    /// the result out of a peer's response. Only answers that prove the
    /// request did not execute are retried.
    async fn with_redirects<T, R, L>(
        &self,
        request: R,
        local: L,
        unwrap: fn(Response) -> Option<T>,
    ) -> Result<T, NodeError>
    where
        R: Fn(Option<GroupId>) -> Request,
        L: Fn(oneshot::Sender<Result<T, NodeError>>) -> Command,
    {
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let mut target = self.id;
        let mut group = None;
        loop {
            let result = if target == self.id {
                self.local(&local).await
            } else {
                crate::probe!("node.request_forwarded");
                match self.remote(target, &request(group)).await {
                    Ok(Response::Error(e)) => Err(e),
                    Ok(response) => unwrap(response)
                        .ok_or_else(|| NodeError::BadRequest("unexpected response".into())),
                    Err(e) => Err(e),
                }
            };
            let retry = match &result {
                Err(NodeError::NotLeader {
                    group: g,
                    leader: Some(leader),
                }) if *leader != target => {
                    group = Some(*g);
                    Some(*leader)
                }
                Err(NodeError::WrongGroup(redirect)) => {
                    crate::probe!("node.wrong_group_followed");
                    group = Some(redirect.group);
                    Some(redirect.leader.unwrap_or(self.id))
                }
                // A peer retired since this node's routing named it says
                // nothing about the group; only this node's own retirement
                // is final for the caller.
                Err(
                    e @ (NodeError::NotLeader { .. }
                    | NodeError::NoMetadata
                    | NodeError::Unavailable(_)
                    | NodeError::Unreachable { .. }
                    | NodeError::Retired { .. }),
                ) if !matches!(e, NodeError::Retired { .. }) || target != self.id => {
                    tokio::time::sleep(RETRY_PAUSE).await;
                    group = None;
                    Some(self.id)
                }
                _ => None,
            };
            match retry {
                Some(next) if tokio::time::Instant::now() < deadline => target = next,
                Some(_) => return Err(NodeError::Timeout),
                None => return result,
            }
        }
    }

    /// Proposes a metadata entry to group 0; returns once it applied (or was
    /// deterministically rejected — see [`rpc::Outcome::Metadata`]).
    pub async fn propose_metadata(&self, entry: MetadataEntry) -> Result<Committed, NodeError> {
        self.with_redirects(
            |_| Request::ProposeMetadata(entry.clone()),
            |reply| Command::ProposeMetadata {
                entry: entry.clone(),
                reply,
            },
            |r| match r {
                Response::Committed(c) => Some(c),
                _ => None,
            },
        )
        .await
    }

    /// Proposes a data command on `vshard`; returns once it applied, with
    /// the state machine's response.
    pub async fn propose(
        &self,
        vshard: VShardId,
        command: Vec<u8>,
    ) -> Result<Committed, NodeError> {
        self.with_redirects(
            |group| Request::Propose {
                vshard,
                group,
                command: command.clone(),
            },
            |reply| Command::Propose {
                vshard,
                group: None,
                command: command.clone(),
                reply,
            },
            |r| match r {
                Response::Committed(c) => Some(c),
                _ => None,
            },
        )
        .await
    }

    /// Proposes a vShard-move step to `group` at its leader; returns once
    /// it applied (the outcome says whether the group's gates took it).
    pub async fn propose_control(
        &self,
        group: GroupId,
        control: GroupControl,
    ) -> Result<Committed, NodeError> {
        self.with_redirects(
            |_| Request::ProposeControl {
                group,
                control: control.clone(),
            },
            |reply| Command::ProposeControl {
                group,
                control: control.clone(),
                reply,
            },
            |r| match r {
                Response::Committed(c) => Some(c),
                _ => None,
            },
        )
        .await
    }

    /// `vshard`'s data in `group`, read linearizably at the group's leader,
    /// with the group index it reflects.
    pub async fn export_vshard(
        &self,
        group: GroupId,
        vshard: VShardId,
    ) -> Result<(u64, Vec<u8>), NodeError> {
        self.with_redirects(
            |_| Request::ExportVShard { group, vshard },
            |reply| Command::ExportVShard {
                group,
                vshard,
                reply,
            },
            |r| match r {
                Response::Export { index, data } => Some((index, data)),
                _ => None,
            },
        )
        .await
    }

    /// The status of another node (or this one).
    pub async fn status_of(&self, node: NodeId) -> Result<NodeStatus, NodeError> {
        if node == self.id {
            return self.status().await;
        }
        match self.remote(node, &Request::Status).await? {
            Response::Status(status) => Ok(status),
            Response::Error(e) => Err(e),
            _ => Err(NodeError::BadRequest("unexpected response".into())),
        }
    }

    /// A linearizable read on `vshard`'s group, served by its leader.
    pub async fn read(&self, vshard: VShardId, query: Vec<u8>) -> Result<Vec<u8>, NodeError> {
        self.with_redirects(
            |_| Request::Read {
                vshard,
                query: query.clone(),
            },
            |reply| Command::Read {
                vshard,
                query: query.clone(),
                linearizable: true,
                reply,
            },
            |r| match r {
                Response::Read(bytes) => Some(bytes),
                _ => None,
            },
        )
        .await
    }

    /// A possibly stale read from this node's own replica of `vshard`'s group.
    pub async fn read_stale(&self, vshard: VShardId, query: Vec<u8>) -> Result<Vec<u8>, NodeError> {
        self.local(|reply| Command::Read {
            vshard,
            query,
            linearizable: false,
            reply,
        })
        .await
    }

    /// The metadata state, read linearizably at the group-0 leader.
    pub async fn metadata(&self) -> Result<MetadataState, NodeError> {
        self.with_redirects(
            |_| Request::ReadMetadata,
            |reply| Command::ReadMetadata { reply },
            |r| match r {
                Response::Metadata(state) => Some(state),
                _ => None,
            },
        )
        .await
        .map(|state| *state)
    }

    /// This node's own, possibly stale, copy of the metadata state (no
    /// leader involved): addresses, the trust set and pre-checks that the
    /// committed log re-validates anyway.
    pub async fn metadata_local(&self) -> Result<MetadataState, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::ReadMetadataLocal { reply: tx })
            .map_err(|_| NodeError::Stopped)?;
        rx.await
            .map_err(|_| NodeError::Stopped)?
            .map(|state| *state)
            .ok_or(NodeError::NoMetadata)
    }

    pub async fn status(&self) -> Result<NodeStatus, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Status { reply: tx })
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// This node's own replica of `group`: the Raft index its state
    /// reflects and the state machine's snapshot at that index (group 0:
    /// the metadata cache). For checkers that compare replicas.
    pub async fn local_snapshot(
        &self,
        group: GroupId,
    ) -> Result<Option<(u64, Vec<u8>)>, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::LocalSnapshot { group, reply: tx })
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// Every member of `group`, from the configuration this node applied
    /// as the group's leader, once a quorum confirmed that leadership (a
    /// read index). A node that does not lead the group refuses: a leader
    /// cut off from its group may run a configuration the group has left.
    pub async fn group_members(&self, group: GroupId) -> Result<Vec<NodeId>, NodeError> {
        self.local(|reply| Command::GroupMembers { group, reply })
            .await
    }

    /// The view of `group` from this node, if it hosts it.
    pub async fn group(&self, group: GroupId) -> Result<Option<rpc::GroupView>, NodeError> {
        Ok(self
            .status()
            .await?
            .groups
            .into_iter()
            .find(|g| g.group == group))
    }
}
