//! Admitting a new node with a join token (DESIGN.md §6).
//!
//! The joiner has already authenticated this node by the CA fingerprint in
//! its token; it presents the token, a certificate signing request (its
//! private key never leaves it) and the address it listens on. [`admit`]
//! then walks the token through its lifecycle in group 0:
//!
//! 1. `Begin` (`Issued → InFlight`) is committed first. Only one joiner can
//!    win it, and its rejection says exactly why a token is unusable
//!    (unknown, used, expired, revoked, in use).
//! 2. One batch commits the node's `Join` and the token's `Consume`
//!    together, so a consumed token always left a node in the topology and
//!    a node id is never handed out without its token being spent.
//! 3. Only then is the CSR signed for the node id the log assigned.
//!
//! A failure between 1 and 2 reverts the token at once; a crash there is
//! covered by the group-0 leader's dead-man timer
//! ([`NodeConfig::join_dead_man`](super::NodeConfig::join_dead_man)). Every step is a
//! committed entry, so a token is consumed at most once across crashes and
//! restarts of every node, and any node can admit: joins keep working while
//! the bootstrap node is down.

use crate::core::cache::RejectReason;
use crate::core::entry::{BatchEntries, CertFingerprint, MetadataEntry};
use crate::core::ids::NodeId;
use crate::core::token::{
    JoinToken, JoinTokenTransitionKind, TokenError, TokenHash, TokenParseError, TokenState,
};
use crate::core::topology::{TopologyChange, TopologyError, MAX_ADDR_LEN};
use crate::node::rpc::{NodeError, Outcome};
use crate::node::Node;
use serde::{Deserialize, Serialize};
use std::fmt;

/// How many fresh node ids a join tries when concurrent joins keep taking
/// the one it picked.
const ID_ATTEMPTS: usize = 8;

/// The cluster CA as the admitting node uses it. Production signs with
/// rcgen (`io::pki`); the simulator plugs in a stand-in, so the admission
/// logic above it runs unchanged there.
pub trait Issuer: Send + Sync {
    /// SHA-256 of the signing CA's certificate: what tokens carry.
    fn fingerprint(&self) -> CertFingerprint;
    /// Refuses a CSR that does not parse or whose signature does not verify.
    fn check_csr(&self, csr_der: &[u8]) -> Result<(), String>;
    /// Signs `csr_der` into a certificate naming `node` (and nothing the CSR asked for).
    fn sign(&self, node: NodeId, csr_der: &[u8]) -> Result<Vec<u8>, String>;
    /// The signing CA's certificate and private key, handed to the admitted
    /// node so that it can admit others in turn.
    fn credentials(&self) -> (Vec<u8>, Vec<u8>);
}

/// What a joiner sends.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinRequest {
    /// The token string exactly as the operator gave it.
    pub token: String,
    /// A PKCS#10 certificate signing request for the joiner's own key.
    pub csr_der: Vec<u8>,
    /// Where the joiner listens, for its peers to dial (`host:port`).
    pub addr: String,
}

impl fmt::Debug for JoinRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinRequest")
            .field("token", &"<redacted>")
            .field("csr_der", &self.csr_der.len())
            .field("addr", &self.addr)
            .finish()
    }
}

/// What an admitted node receives.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JoinGrant {
    pub cluster_id: [u8; 16],
    pub node_id: NodeId,
    /// The joiner's certificate, signed by the CA below.
    pub cert_der: Vec<u8>,
    pub ca_cert_der: Vec<u8>,
    pub ca_key_der: Vec<u8>,
    /// Every CA the cluster trusts (more than one during a rotation).
    pub trusted_cas_der: Vec<Vec<u8>>,
    /// Every current node and the address it listens on.
    pub peers: Vec<(NodeId, String)>,
}

impl fmt::Debug for JoinGrant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JoinGrant")
            .field("node_id", &self.node_id)
            .field("ca_key_der", &"<redacted>")
            .field("peers", &self.peers)
            .finish_non_exhaustive()
    }
}

/// Why a join was refused. Each says what the operator should do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum JoinError {
    #[error("{0}")]
    BadToken(TokenParseError),
    #[error("the join token belongs to another cluster (its CA fingerprint is not trusted here); check --join and --token")]
    WrongCluster,
    #[error("the join token is not registered on this cluster; issue one with `keel token issue`")]
    UnknownToken,
    #[error("the join token was already used, and tokens are single use; issue a new one with `keel token issue`")]
    AlreadyUsed,
    #[error("the join token is being used by another join right now; wait for it to finish or issue a new token")]
    InUse,
    #[error("the join token has expired; issue a new one with `keel token issue`")]
    Expired,
    #[error("the join token was revoked; issue a new one with `keel token issue`")]
    Revoked,
    #[error("the certificate signing request is unusable: {0}")]
    BadCsr(String),
    #[error("the joiner's address {addr:?} is unusable: it must be a non-empty host:port of at most {MAX_ADDR_LEN} bytes")]
    BadAddress { addr: String },
    #[error("the cluster could not complete the join ({0}); the token is still valid, retry")]
    Cluster(NodeError),
    #[error(
        "signing the joiner's certificate failed after it was admitted as node {node}: {cause}"
    )]
    Signing { node: NodeId, cause: String },
}

impl From<NodeError> for JoinError {
    fn from(e: NodeError) -> Self {
        JoinError::Cluster(e)
    }
}

/// Maps a refused token transition to what it means for the joiner.
fn token_refusal(e: &TokenError) -> JoinError {
    match e {
        TokenError::UnknownToken => JoinError::UnknownToken,
        TokenError::Expired { .. } => JoinError::Expired,
        TokenError::IllegalTransition { from, .. } => match from {
            TokenState::Consumed => JoinError::AlreadyUsed,
            TokenState::InFlight => JoinError::InUse,
            TokenState::Expired => JoinError::Expired,
            TokenState::Aborted => JoinError::Revoked,
            // `Begin` from `Issued` is legal; any other refusal is a token
            // the join lost to the dead-man timer or a revoke meanwhile.
            TokenState::Issued => JoinError::InUse,
        },
        _ => JoinError::Cluster(NodeError::BadRequest(e.to_string())),
    }
}

/// The token refusal inside a rejection, looking through batches.
fn token_rejection(reason: &RejectReason) -> Option<&TokenError> {
    match reason {
        RejectReason::Token(e) => Some(e),
        RejectReason::Batch { reason, .. } => token_rejection(reason),
        _ => None,
    }
}

/// What a rejected join step means for the joiner.
fn refusal(reason: &RejectReason) -> JoinError {
    token_rejection(reason)
        .map(token_refusal)
        .unwrap_or_else(|| JoinError::Cluster(NodeError::BadRequest(reason.to_string())))
}

fn transition(
    token_hash: TokenHash,
    transition: JoinTokenTransitionKind,
    ts_ms: u64,
) -> MetadataEntry {
    MetadataEntry::JoinTokenTransition {
        token_hash,
        transition,
        ts_ms,
    }
}

/// The rejection of a committed metadata entry, if it was rejected.
fn rejection(outcome: Outcome) -> Option<RejectReason> {
    match outcome {
        Outcome::Metadata(reason) => reason,
        Outcome::Data(_) | Outcome::Control(_) => None,
    }
}

/// Checks everything about a join request that needs no cluster state —
/// the token string, the address and the CSR — and returns the parsed token.
///
/// [`admit`] runs it before it reads or proposes anything, so a malformed
/// request costs no log entry. It is separate (and synchronous) so that the
/// fuzzer (`fuzz/targets/join_request.rs`) drives exactly the code that
/// untrusted joiner input reaches, without a running node.
pub fn check_request(issuer: &dyn Issuer, request: &JoinRequest) -> Result<JoinToken, JoinError> {
    let token = JoinToken::parse(&request.token).map_err(JoinError::BadToken)?;
    if request.addr.is_empty() || request.addr.len() > MAX_ADDR_LEN {
        return Err(JoinError::BadAddress {
            addr: request.addr.chars().take(64).collect(),
        });
    }
    issuer
        .check_csr(&request.csr_der)
        .map_err(JoinError::BadCsr)?;
    Ok(token)
}

/// Admits the joiner described by `request` through `node`, signing with
/// `issuer`. See the module documentation for the protocol.
pub async fn admit(
    node: &Node,
    issuer: &dyn Issuer,
    request: &JoinRequest,
) -> Result<JoinGrant, JoinError> {
    let token = check_request(issuer, request)?;
    let state = node.metadata_local().await?;
    if !state.ca_trust.contains_key(&token.ca_fingerprint) {
        return Err(JoinError::WrongCluster);
    }
    let hash = token.hash();
    let begun = node
        .propose_metadata(transition(
            hash,
            JoinTokenTransitionKind::Begin,
            node.now_ms(),
        ))
        .await?;
    if let Some(reason) = rejection(begun.outcome) {
        return Err(refusal(&reason));
    }
    crate::probe!("join.token_in_flight");
    match commit_join(node, hash, &request.addr).await {
        Ok(node_id) => {
            crate::probe!("join.admitted");
            let cert_der =
                issuer
                    .sign(node_id, &request.csr_der)
                    .map_err(|cause| JoinError::Signing {
                        node: node_id,
                        cause,
                    })?;
            let state = node.metadata_local().await?;
            let (ca_cert_der, ca_key_der) = issuer.credentials();
            Ok(JoinGrant {
                cluster_id: state.cluster_id,
                node_id,
                cert_der,
                ca_cert_der,
                ca_key_der,
                trusted_cas_der: state.ca_trust.values().cloned().collect(),
                peers: state
                    .topology
                    .nodes()
                    .map(|(id, info)| (id, info.addr.clone()))
                    .collect(),
            })
        }
        Err(e) => {
            // Give the token back now rather than at the dead-man timer.
            // Refused if the token moved on meanwhile; either way the
            // joiner learns the original error.
            crate::probe!("join.reverted");
            let revert = transition(hash, JoinTokenTransitionKind::Revert, node.now_ms());
            if let Err(revert_error) = node.propose_metadata(revert).await {
                tracing::warn!(error = %revert_error, "could not revert an interrupted join's token; the dead-man timer will");
            }
            Err(e)
        }
    }
}

/// Commits the joiner's `Join` with the token's `Consume` in one batch,
/// under a fresh node id; returns that id.
async fn commit_join(node: &Node, hash: TokenHash, addr: &str) -> Result<NodeId, JoinError> {
    let mut last = JoinError::Cluster(NodeError::Timeout);
    for _ in 0..ID_ATTEMPTS {
        let state = node.metadata().await?;
        let node_id = state.topology.next_node_id().ok_or_else(|| {
            JoinError::Cluster(NodeError::BadRequest("node ids exhausted".into()))
        })?;
        let batch = MetadataEntry::Batch {
            entries: BatchEntries(vec![
                MetadataEntry::TopologyChange(TopologyChange::Join {
                    node_id,
                    addr: addr.to_owned(),
                }),
                transition(hash, JoinTokenTransitionKind::Consume, node.now_ms()),
            ]),
        };
        let committed = match node.propose_metadata(batch).await {
            Ok(committed) => committed,
            Err(NodeError::Timeout) => {
                // The batch may have committed: the log says whether it did.
                let state = node.metadata().await?;
                let consumed = state
                    .tokens
                    .get(&hash)
                    .is_some_and(|r| r.state == TokenState::Consumed);
                let joined = state.topology.get(node_id).is_some_and(|n| n.addr == addr);
                if consumed && joined {
                    return Ok(node_id);
                }
                return Err(JoinError::Cluster(NodeError::Timeout));
            }
            Err(e) => return Err(e.into()),
        };
        match rejection(committed.outcome) {
            None => return Ok(node_id),
            Some(RejectReason::Batch { reason, .. })
                if matches!(
                    *reason,
                    RejectReason::Topology(
                        TopologyError::AlreadyMember { .. } | TopologyError::Retired { .. }
                    )
                ) =>
            {
                // A concurrent join took this id first: pick the next one.
                crate::probe!("join.id_taken_retry");
                last = JoinError::Cluster(NodeError::BadRequest(reason.to_string()));
            }
            Some(reason) => return Err(refusal(&reason)),
        }
    }
    Err(last)
}
