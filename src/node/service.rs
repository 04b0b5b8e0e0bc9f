//! The client-facing service of a node: what the CLI, benchmarks, embedding
//! hosts and joining nodes ask of it (DESIGN.md §9).
//!
//! Node-to-node traffic (Raft, forwarded proposals) goes to the runtime;
//! everything a *client* sends arrives here, already authenticated by the
//! transport as either an admin (a client certificate from the cluster CA)
//! or anonymous (a joiner, which has no certificate yet and may only ask to
//! join). Each request is decoded and validated here, then carried out
//! through the [`Node`] handle, so the same code serves QUIC clients in
//! production and the simulator's clients.

use crate::core::cache::fingerprint;
use crate::core::codec::{self, FrameKind, Wire};
use crate::core::entry::{BatchEntries, CertFingerprint, MetadataEntry};
use crate::core::ids::{GroupId, MigrationId, NodeId, VShardId};
use crate::core::kv::{KvCommand, KvQuery, KvResponse};
use crate::core::migration::{MigrationCheckpointPayload, MigrationPhaseTag, MigrationRow};
use crate::core::placement;
use crate::core::rebalance::{
    check_replica_move, plan_decommission, plan_rebalance, ClusterView, PlannedMove,
};
use crate::core::routing::RoutingChange;
use crate::core::token::{JoinToken, JoinTokenTransitionKind};
use crate::core::topology::TopologyChange;
use crate::node::join::{admit, Issuer, JoinError, JoinGrant, JoinRequest};
use crate::node::migrate::{carry_out, live_nodes, StepError};
use crate::node::rpc::{NodeError, NodeStatus, Outcome};
use crate::node::Node;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// The longest a join token may live: a day, as kubeadm's default.
pub const MAX_TOKEN_TTL_MS: u64 = 24 * 60 * 60 * 1000;

/// Hex digits of a token's id: a prefix of its hash, safe to print and log.
pub const TOKEN_ID_LEN: usize = 16;

/// How long staging a CA waits for the trust change to reach this node.
/// The largest DDL payload a client may commit: schema changes are small,
/// and every node keeps every entry until compaction.
pub const MAX_DDL_PAYLOAD: usize = 64 * 1024;
const STAGE_APPLY_WAIT: Duration = Duration::from_secs(10);

/// Who is calling, as the transport authenticated it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Presented an admin certificate signed by a trusted CA.
    Admin,
    /// Presented no certificate: a joiner, which may only join.
    Anonymous,
}

/// The node's TLS state as the service needs it. Production keeps it in
/// files and the QUIC endpoint; the simulator keeps a stand-in.
pub trait Credentials: Send + Sync {
    /// The CA that signs joiners' certificates now.
    fn issuer(&self) -> Arc<dyn Issuer>;
    /// The fingerprint of the CA that signed this node's own certificate.
    fn cert_ca(&self) -> CertFingerprint;
    /// Adopts a staged CA: signs joiners with it from now on, reissues this
    /// node's certificate under it, and trusts `trusted` (which includes it).
    fn install_ca(
        &self,
        cert_der: &[u8],
        key_der: &[u8],
        trusted: Vec<Vec<u8>>,
    ) -> Result<(), String>;
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRequest {
    /// Join the cluster (the only request an anonymous caller may make).
    Join(JoinRequest),
    /// This node's view of the cluster.
    Status,
    /// Issue a join token valid for `ttl_ms`.
    IssueToken { ttl_ms: u64 },
    /// Revoke a token by its id (see [`token_id`]) or its full string.
    RevokeToken { token: String },
    /// A write on the built-in key-value state machine.
    Kv(KvCommand),
    /// A read on the built-in key-value state machine; linearizable unless
    /// the caller accepts this node's possibly stale replica.
    Get { key: Vec<u8>, linearizable: bool },
    /// Commit an opaque catalog DDL entry to group 0 (what a host database
    /// does for each schema change; `keel bench` measures metadata commits
    /// with it). Answers once it is committed.
    Ddl { payload: Vec<u8> },
    /// Remove a node that never finished joining, or a decommissioned one,
    /// from the topology (its id is retired).
    RemoveNode { node: NodeId },
    /// CA rotation, step 1 (once per node): trust the new CA cluster-wide
    /// and adopt it on this node.
    StageCa { cert_der: Vec<u8>, key_der: Vec<u8> },
    /// CA rotation, step 2: trust only `keep`, once every node's
    /// certificate is signed by it.
    FinalizeCa { keep: CertFingerprint },
    /// Start one move (a leadership move commits at once).
    Migrate(PlannedMove),
    /// Drain a node: check that every replica can move off it safely,
    /// then (unless `dry_run`) mark it draining; the group-0 leader moves
    /// its replicas and retires it. Answers the plan.
    Decommission { node: NodeId, dry_run: bool },
    /// Plan moves that even out replicas, leaders and vShards, and (unless
    /// `dry_run`) start up to `max_moves` of them. Answers the plan.
    Rebalance { dry_run: bool, max_moves: u32 },
    /// Create a data group with `voters` as its founders (none: the
    /// replication factor's worth of active nodes hosting the fewest
    /// replicas). It serves no vShard until moves give it some (`keel
    /// rebalance`). Answers once the creation is committed.
    CreateGroup { voters: Vec<NodeId> },
    /// Drop a data group that serves no vShard and that no migration is
    /// changing; its replicas are deleted.
    DropGroup { group: GroupId },
}

impl Wire for ClientRequest {
    const KIND: FrameKind = FrameKind::Rpc;
}

/// One node of the topology, as `keel status` shows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeSummary {
    pub node: NodeId,
    pub addr: String,
    pub state: String,
    /// Active (a learner or voter of group 0), as opposed to joining,
    /// draining or decommissioned.
    pub active: bool,
}

/// A node's view of the cluster, from its own replica of group 0.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub cluster_id: [u8; 16],
    pub nodes: Vec<NodeSummary>,
    pub routing_epoch: u64,
    pub trusted_cas: Vec<CertFingerprint>,
    /// The CA that signed this node's certificate.
    pub cert_ca: CertFingerprint,
    /// Join tokens that can still be used (`Issued` or `InFlight`).
    pub live_tokens: usize,
    /// Every row of the migration table, finished ones included (they
    /// carry the measured write pause).
    pub migrations: Vec<MigrationSummary>,
    /// The data group serving each vShard, indexed by vShard id.
    pub vshard_groups: Vec<GroupId>,
    pub rejected_entries: u64,
    /// This node's own groups: leaders, terms, indexes, failures.
    pub local: NodeStatus,
    /// Every data group routing lists, in id order (a new group serves no
    /// vShard until moves give it some).
    pub data_groups: Vec<GroupId>,
}

/// One migration as `keel status` and `keel migrate` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationSummary {
    pub id: String,
    /// The move, unless its checkpoint failed its CRC.
    pub planned: Option<PlannedMove>,
    /// What moves where, in words (or why the row is unreadable).
    pub what: String,
    pub phase: String,
    pub attempt: u32,
    pub complete: bool,
    /// The measured write pause, once known.
    pub write_pause_us: Option<u64>,
    pub updated_ms: u64,
}

impl MigrationSummary {
    pub fn of(row: &MigrationRow) -> Self {
        let (planned, write_pause_us) = match row.verify() {
            Ok(MigrationCheckpointPayload::Replica(p)) => (
                Ok(PlannedMove::Replica {
                    group: p.group_id,
                    source: p.source,
                    target: p.target,
                }),
                p.write_pause_us,
            ),
            Ok(MigrationCheckpointPayload::VShard(p)) => (
                Ok(PlannedMove::VShard {
                    vshard: p.vshard_id,
                    from: p.source_group,
                    to: p.target_group,
                }),
                p.write_pause_us,
            ),
            Err(e) => (Err(e), None),
        };
        MigrationSummary {
            id: row.migration_id.to_string(),
            what: match &planned {
                Ok(planned) => planned.to_string(),
                Err(e) => format!("unreadable checkpoint: {e}"),
            },
            planned: planned.ok(),
            phase: format!("{:?}", row.phase),
            attempt: row.attempt,
            complete: row.phase == MigrationPhaseTag::Complete,
            write_pause_us,
            updated_ms: row.ts_ms,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientResponse {
    Joined(JoinGrant),
    Status(Box<ClusterStatus>),
    Token {
        token: String,
        id: String,
        expires_at_ms: u64,
    },
    Kv(KvResponse),
    /// A migration started.
    Migration(MigrationId),
    /// The moves of a decommission or rebalance, and which of them started.
    Plan {
        moves: Vec<PlannedMove>,
        started: Vec<MigrationId>,
    },
    Done,
    Error(ServiceError),
    /// A data group was created on these founders.
    GroupCreated {
        group: GroupId,
        voters: Vec<NodeId>,
    },
}

impl Wire for ClientResponse {
    const KIND: FrameKind = FrameKind::Rpc;
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ServiceError {
    #[error("this request needs an admin certificate; a caller without one may only join")]
    Forbidden,
    #[error("the join was refused: {0}")]
    Join(JoinError),
    #[error(transparent)]
    Node(NodeError),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("CA rotation step refused: {0}")]
    Ca(String),
}

impl From<NodeError> for ServiceError {
    fn from(e: NodeError) -> Self {
        ServiceError::Node(e)
    }
}

/// The printable id of a token: the first [`TOKEN_ID_LEN`] hex digits of
/// its hash (the raw token never enters the log, so neither does its id's
/// preimage).
pub fn token_id(hash: &[u8; 32]) -> String {
    codec::hex(&hash[..TOKEN_ID_LEN / 2])
}

/// Serves one encoded client request; answers with an encoded response.
pub async fn serve(
    node: &Node,
    credentials: &dyn Credentials,
    caller: Caller,
    request: &[u8],
) -> Vec<u8> {
    let response = match codec::decode::<ClientRequest>(request) {
        Ok(request) => handle(node, credentials, caller, request)
            .await
            .unwrap_or_else(ClientResponse::Error),
        Err(e) => ClientResponse::Error(ServiceError::BadRequest(e.to_string())),
    };
    codec::encode(&response)
}

async fn handle(
    node: &Node,
    credentials: &dyn Credentials,
    caller: Caller,
    request: ClientRequest,
) -> Result<ClientResponse, ServiceError> {
    if caller != Caller::Admin && !matches!(request, ClientRequest::Join(_)) {
        return Err(ServiceError::Forbidden);
    }
    match request {
        ClientRequest::Join(join) => {
            let issuer = credentials.issuer();
            admit(node, &*issuer, &join)
                .await
                .map(ClientResponse::Joined)
                .map_err(ServiceError::Join)
        }
        ClientRequest::Status => status(node, credentials).await,
        ClientRequest::Migrate(planned) => migrate(node, planned).await,
        ClientRequest::Decommission {
            node: target,
            dry_run,
        } => decommission(node, target, dry_run).await,
        ClientRequest::Rebalance { dry_run, max_moves } => {
            rebalance(node, dry_run, max_moves).await
        }
        ClientRequest::IssueToken { ttl_ms } => issue_token(node, credentials, ttl_ms).await,
        ClientRequest::RevokeToken { token } => revoke_token(node, &token).await,
        ClientRequest::Kv(command) => {
            let vshard = command.vshard();
            let committed = node.propose(vshard, codec::encode(&command)).await?;
            match committed.outcome {
                Outcome::Data(bytes) => kv_response(&bytes),
                Outcome::Metadata(_) | Outcome::Control(_) => Err(ServiceError::BadRequest(
                    "a key-value write committed as something else".into(),
                )),
            }
        }
        ClientRequest::Get { key, linearizable } => {
            let vshard = VShardId::for_key(&key);
            let query = codec::encode(&KvQuery::Get { key });
            let bytes = if linearizable {
                node.read(vshard, query).await?
            } else {
                node.read_stale(vshard, query).await?
            };
            kv_response(&bytes)
        }
        ClientRequest::Ddl { payload } => {
            if payload.len() > MAX_DDL_PAYLOAD {
                return Err(ServiceError::BadRequest(format!(
                    "a DDL payload of {} bytes exceeds the {MAX_DDL_PAYLOAD}-byte limit",
                    payload.len()
                )));
            }
            node.propose_metadata(MetadataEntry::CatalogDdl { payload })
                .await?;
            Ok(ClientResponse::Done)
        }
        ClientRequest::RemoveNode { node: id } => {
            let leave = MetadataEntry::TopologyChange(TopologyChange::Leave { node_id: id });
            commit_checked(node, leave).await?;
            Ok(ClientResponse::Done)
        }
        ClientRequest::StageCa { cert_der, key_der } => {
            stage_ca(node, credentials, cert_der, key_der).await
        }
        ClientRequest::FinalizeCa { keep } => finalize_ca(node, credentials, keep).await,
        ClientRequest::CreateGroup { voters } => create_group(node, voters).await,
        ClientRequest::DropGroup { group } => {
            let drop = RoutingChange::DropGroup { group_id: group };
            commit_checked(node, MetadataEntry::RoutingChange(drop)).await?;
            Ok(ClientResponse::Done)
        }
    }
}

/// Picks the new group's id (and, unless given, its founders) from the
/// leader's state and commits its creation. Two creations racing for one
/// id: the second is refused and names the next free id.
async fn create_group(node: &Node, voters: Vec<NodeId>) -> Result<ClientResponse, ServiceError> {
    let state = node.metadata().await?;
    let voters = if voters.is_empty() {
        let rf = usize::try_from(state.replication_factor).unwrap_or(usize::MAX);
        let founders = placement::founders(&state.topology, &state.routing, rf);
        if founders.is_empty() {
            return Err(ServiceError::BadRequest(
                "no active node can host a new group".into(),
            ));
        }
        founders
    } else {
        voters
    };
    let group = state.routing.next_group_id();
    let create = RoutingChange::CreateGroup {
        group_id: group,
        voters: voters.clone(),
    };
    commit_checked(node, MetadataEntry::RoutingChange(create)).await?;
    let mut voters = voters;
    voters.sort_unstable();
    Ok(ClientResponse::GroupCreated { group, voters })
}

/// Commits an entry to group 0; a rejection is the caller's error.
async fn commit_checked(node: &Node, entry: MetadataEntry) -> Result<(), ServiceError> {
    match node.propose_metadata(entry).await?.outcome {
        Outcome::Metadata(Some(reason)) => Err(ServiceError::BadRequest(reason.to_string())),
        _ => Ok(()),
    }
}

fn kv_response(bytes: &[u8]) -> Result<ClientResponse, ServiceError> {
    codec::decode::<KvResponse>(bytes)
        .map(ClientResponse::Kv)
        .map_err(|e| ServiceError::BadRequest(format!("undecodable state machine answer: {e}")))
}

async fn status(
    node: &Node,
    credentials: &dyn Credentials,
) -> Result<ClientResponse, ServiceError> {
    let state = node.metadata_local().await?;
    let local = node.status().await?;
    Ok(ClientResponse::Status(Box::new(ClusterStatus {
        cluster_id: state.cluster_id,
        nodes: state
            .topology
            .nodes()
            .map(|(node, info)| NodeSummary {
                node,
                addr: info.addr.clone(),
                state: info.state.to_string(),
                active: matches!(info.state, crate::core::topology::NodeState::Active(_)),
            })
            .collect(),
        routing_epoch: state.routing.epoch(),
        trusted_cas: state.ca_trust.keys().copied().collect(),
        cert_ca: credentials.cert_ca(),
        live_tokens: state
            .tokens
            .iter()
            .filter(|(_, r)| !r.state.is_terminal())
            .count(),
        migrations: state
            .migrations
            .values()
            .map(MigrationSummary::of)
            .collect(),
        vshard_groups: VShardId::all()
            .map(|v| state.routing.lookup(v).group)
            .collect(),
        rejected_entries: state.rejected_total,
        local,
        data_groups: state.routing.groups().map(|(group, _)| group).collect(),
    })))
}

fn step_error(e: StepError) -> ServiceError {
    match e {
        StepError::Node(e) => ServiceError::Node(e),
        other => ServiceError::BadRequest(other.to_string()),
    }
}

/// Starts a move asked for by name. A replica move must first pass the
/// safety check the planners apply (DESIGN.md §5): counted among the voters
/// that answer now, not just those routing lists, the group keeps a
/// majority through the joint change and after it.
async fn migrate(node: &Node, planned: PlannedMove) -> Result<ClientResponse, ServiceError> {
    if let PlannedMove::Replica {
        group,
        source,
        target,
    } = planned
    {
        let state = node.metadata().await?;
        let live = live_nodes(node, &state).await;
        check_replica_move(&ClusterView::new(&state, &live), group, source, target)
            .map_err(|e| ServiceError::BadRequest(e.to_string()))?;
    }
    match carry_out(node, planned).await {
        Ok(Some(id)) => Ok(ClientResponse::Migration(id)),
        Ok(None) => Ok(ClientResponse::Done),
        Err(e) => Err(step_error(e)),
    }
}

/// Plans the decommission of `target` against the leader's state and the
/// nodes reachable now; unless a dry run, marks it draining.
async fn decommission(
    node: &Node,
    target: NodeId,
    dry_run: bool,
) -> Result<ClientResponse, ServiceError> {
    let state = node.metadata().await?;
    let live = live_nodes(node, &state).await;
    let view = ClusterView::new(&state, &live);
    let moves =
        plan_decommission(&view, target).map_err(|e| ServiceError::BadRequest(e.to_string()))?;
    if !dry_run {
        let draining = state
            .topology
            .get(target)
            .is_some_and(|info| info.state == crate::core::topology::NodeState::Draining);
        if !draining {
            let committed = node
                .propose_metadata(MetadataEntry::TopologyChange(
                    TopologyChange::StartDecommission { node_id: target },
                ))
                .await?;
            if let Outcome::Metadata(Some(reason)) = committed.outcome {
                return Err(ServiceError::BadRequest(reason.to_string()));
            }
        }
    }
    Ok(ClientResponse::Plan {
        moves,
        started: Vec::new(),
    })
}

/// Plans a rebalance and, unless a dry run, starts its moves.
async fn rebalance(
    node: &Node,
    dry_run: bool,
    max_moves: u32,
) -> Result<ClientResponse, ServiceError> {
    let state = node.metadata().await?;
    let live = live_nodes(node, &state).await;
    let view = ClusterView::new(&state, &live);
    let moves = plan_rebalance(&view, usize::try_from(max_moves).unwrap_or(usize::MAX));
    let mut started = Vec::new();
    if !dry_run {
        for &planned in &moves {
            if let Some(id) = carry_out(node, planned).await.map_err(step_error)? {
                started.push(id);
            }
        }
    }
    Ok(ClientResponse::Plan { moves, started })
}

/// Commits a fresh token's `Register`; the secret comes from the node's rng.
async fn issue_token(
    node: &Node,
    credentials: &dyn Credentials,
    ttl_ms: u64,
) -> Result<ClientResponse, ServiceError> {
    if ttl_ms == 0 || ttl_ms > MAX_TOKEN_TTL_MS {
        return Err(ServiceError::BadRequest(format!(
            "a token's time to live must be between 1 ms and {MAX_TOKEN_TTL_MS} ms (24 h), not {ttl_ms} ms"
        )));
    }
    let now = node.now_ms();
    let token = JoinToken {
        ca_fingerprint: credentials.issuer().fingerprint(),
        secret: node.entropy().await?,
        expires_at_ms: now.saturating_add(ttl_ms),
    };
    let hash = token.hash();
    let committed = node
        .propose_metadata(MetadataEntry::JoinTokenTransition {
            token_hash: hash,
            transition: JoinTokenTransitionKind::Register {
                expires_at_ms: token.expires_at_ms,
            },
            ts_ms: now,
        })
        .await?;
    if let Outcome::Metadata(Some(reason)) = committed.outcome {
        return Err(ServiceError::BadRequest(reason.to_string()));
    }
    Ok(ClientResponse::Token {
        token: token.encode(),
        id: token_id(&hash),
        expires_at_ms: token.expires_at_ms,
    })
}

/// Aborts a token named by its full string or a unique prefix of its id.
async fn revoke_token(node: &Node, token: &str) -> Result<ClientResponse, ServiceError> {
    let token = token.trim();
    let hash = if token.starts_with(crate::core::token::TOKEN_PREFIX) {
        JoinToken::parse(token)
            .map_err(|e| ServiceError::BadRequest(e.to_string()))?
            .hash()
    } else {
        if token.len() < 8 || !token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ServiceError::BadRequest(
                "name the token by its full string or by at least 8 hex digits of its id".into(),
            ));
        }
        let prefix = token.to_ascii_lowercase();
        let state = node.metadata().await?;
        let matches: Vec<[u8; 32]> = state
            .tokens
            .iter()
            .filter(|(hash, _)| codec::hex(hash.as_slice()).starts_with(&prefix))
            .map(|(hash, _)| *hash)
            .collect();
        match matches.as_slice() {
            [one] => *one,
            [] => {
                return Err(ServiceError::BadRequest(format!(
                    "no token has an id starting with {prefix}"
                )))
            }
            _ => {
                return Err(ServiceError::BadRequest(format!(
                    "several tokens have ids starting with {prefix}; give more digits"
                )))
            }
        }
    };
    let committed = node
        .propose_metadata(MetadataEntry::JoinTokenTransition {
            token_hash: hash,
            transition: JoinTokenTransitionKind::Abort,
            ts_ms: node.now_ms(),
        })
        .await?;
    match committed.outcome {
        Outcome::Metadata(Some(reason)) => Err(ServiceError::BadRequest(reason.to_string())),
        _ => Ok(ClientResponse::Done),
    }
}

/// Stages a new CA on this node: commits the trust change (a no-op if an
/// earlier call on another node already did), waits until this node's own
/// replica trusts it, then adopts it here.
async fn stage_ca(
    node: &Node,
    credentials: &dyn Credentials,
    cert_der: Vec<u8>,
    key_der: Vec<u8>,
) -> Result<ClientResponse, ServiceError> {
    let fp = fingerprint(&cert_der);
    let committed = node
        .propose_metadata(MetadataEntry::CaTrustChange {
            add_ca_cert: Some(cert_der.clone()),
            remove_ca_fingerprint: None,
        })
        .await?;
    if let Outcome::Metadata(Some(reason)) = committed.outcome {
        return Err(ServiceError::Ca(reason.to_string()));
    }
    let deadline = tokio::time::Instant::now() + STAGE_APPLY_WAIT;
    let trusted = loop {
        let state = node.metadata_local().await?;
        if state.ca_trust.contains_key(&fp) {
            break state.ca_trust.into_values().collect::<Vec<_>>();
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(ServiceError::Ca(
                "the trust change committed but has not reached this node yet; retry".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    credentials
        .install_ca(&cert_der, &key_der, trusted)
        .map_err(ServiceError::Ca)?;
    Ok(ClientResponse::Done)
}

/// Removes every trusted CA but `keep`, in one all-or-nothing batch.
async fn finalize_ca(
    node: &Node,
    credentials: &dyn Credentials,
    keep: CertFingerprint,
) -> Result<ClientResponse, ServiceError> {
    if credentials.cert_ca() != keep {
        return Err(ServiceError::Ca(
            "this node's own certificate is not signed by the CA to keep; stage it here first"
                .into(),
        ));
    }
    let state = node.metadata().await?;
    if !state.ca_trust.contains_key(&keep) {
        return Err(ServiceError::Ca(
            "the CA to keep is not trusted by the cluster; stage it first".into(),
        ));
    }
    let removals: Vec<MetadataEntry> = state
        .ca_trust
        .keys()
        .filter(|fp| **fp != keep)
        .map(|fp| MetadataEntry::CaTrustChange {
            add_ca_cert: None,
            remove_ca_fingerprint: Some(*fp),
        })
        .collect();
    if removals.is_empty() {
        return Ok(ClientResponse::Done);
    }
    let committed = node
        .propose_metadata(MetadataEntry::Batch {
            entries: BatchEntries(removals),
        })
        .await?;
    match committed.outcome {
        Outcome::Metadata(Some(reason)) => Err(ServiceError::Ca(reason.to_string())),
        _ => Ok(ClientResponse::Done),
    }
}
