//! Starting and running one production node.

use crate::core::cache::Bootstrap;
use crate::core::codec::{self, hex};
use crate::core::ids::NodeId;
use crate::core::kv::KvStateMachine;
use crate::core::token::{JoinToken, TokenParseError};
use crate::daemon::cluster_dir::{AdminCredential, ClusterDir, DirError};
use crate::daemon::config::NodeFile;
use crate::daemon::credentials::{NodeCredentials, StoredIdentity};
use crate::daemon::files::{self, FileError};
use crate::io::clock::SystemClock;
use crate::io::pki::{self, ClusterCa, PkiError, TlsIdentity};
use crate::io::quic::{self, ClientInboundReceiver, ClientPeer, QuicError, QuicTransport};
use crate::io::quic_client::QuicClient;
use crate::io::{open_database, os_seeded_rng, NodeIo};
use crate::node::join::{JoinError, JoinGrant, JoinRequest};
use crate::node::service::{self, Caller, ClientRequest, ClientResponse, ServiceError};
use crate::node::{self, MachineFactory, Node, NodeConfig, StartError};
use rand_chacha::rand_core::RngCore;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How long a joiner waits for one node to admit it.
const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

/// How often the node copies peer addresses and the trusted CA set from its
/// replica of group 0 into the QUIC endpoint.
const FOLLOW_INTERVAL: Duration = Duration::from_millis(500);

/// Why a node could not start or stopped. Each says what to do.
#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error("cannot create the data directory {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    File(#[from] FileError),
    #[error(transparent)]
    Dir(#[from] DirError),
    #[error("this node has no state yet and its configuration has no [bootstrap] section, so it must join: pass --token (from `keel token issue`) and list nodes under `join`")]
    NeedsToken,
    #[error("the configuration lists no node to join through: add `join = [\"HOST:PORT\"]`")]
    NothingToJoin,
    #[error("the join token is unusable: {0}")]
    BadToken(TokenParseError),
    #[error("the cluster refused to admit this node: {0}")]
    JoinRefused(JoinError),
    #[error("no node admitted this node; last error: {0}")]
    JoinFailed(String),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error(transparent)]
    Quic(#[from] QuicError),
    #[error("cannot open the database {path}: {cause}")]
    Database { path: String, cause: String },
    #[error("the node could not start: {0}")]
    Start(#[from] StartError),
    #[error("the stored credentials are unusable: {0}")]
    Credentials(String),
    #[error(
        "the node stopped after a storage failure; restart it to recover from what is on disk"
    )]
    Stopped,
}

fn kv_factory() -> MachineFactory {
    Arc::new(|_| Box::new(KvStateMachine::new()))
}

/// Runs the node `file` describes until it is told to stop (Ctrl-C or
/// SIGTERM) or fails. `token` is used only by a first start that joins.
pub async fn run(file: NodeFile, token: Option<String>) -> Result<(), DaemonError> {
    std::fs::create_dir_all(&file.data_dir).map_err(|source| DaemonError::DataDir {
        path: file.data_dir.display().to_string(),
        source,
    })?;
    let identity_path = file.data_dir.join("identity.cred");
    let (identity, bootstrap, peers) = match files::read::<StoredIdentity>(&identity_path)? {
        Some(identity) => {
            if token.is_some() {
                tracing::warn!("this node is already a member; ignoring --token");
            }
            (identity, None, BTreeMap::new())
        }
        None => match (&file.bootstrap, token) {
            (Some(_), _) => {
                let (identity, bootstrap) = bootstrap_identity(&file)?;
                files::write(&identity_path, &identity)?;
                (identity, Some(bootstrap), BTreeMap::new())
            }
            (None, Some(token)) => {
                let (grant, key_der) = join(&file, &token).await?;
                let (identity, peers) = joined_identity(grant, key_der);
                files::write(&identity_path, &identity)?;
                (identity, None, peers)
            }
            (None, None) => return Err(DaemonError::NeedsToken),
        },
    };
    let me = identity.node_id;
    let (transport, inbound, clients) =
        quic::bind(me, file.listen, identity.tls.clone(), peers).await?;
    let db_path = file.data_dir.join("keel.redb");
    let db = open_database(&db_path).map_err(|e| DaemonError::Database {
        path: db_path.display().to_string(),
        cause: e.to_string(),
    })?;
    let io = NodeIo {
        transport: transport.clone(),
        inbound,
        clock: Arc::new(SystemClock),
        rng: os_seeded_rng(),
        db: Arc::new(db),
        storage_latency: None,
    };
    let mut config = NodeConfig::new(me);
    config.tick_interval = Duration::from_millis(file.tick_ms);
    let (node, mut task) = node::start(config, io, bootstrap, kv_factory(), Box::new(()))?;
    let credentials = Arc::new(
        NodeCredentials::new(identity_path, identity.clone(), transport.clone())
            .map_err(DaemonError::Credentials)?,
    );
    tokio::spawn(serve_clients(node.clone(), credentials.clone(), clients));
    tokio::spawn(follow_metadata(node.clone(), credentials, transport));
    println!(
        "keel node {me} serving on {} (cluster {})",
        file.advertised(),
        hex(&identity.cluster_id)
    );
    tokio::select! {
        _ = &mut task => Err(DaemonError::Stopped),
        _ = shutdown_signal() => {
            tracing::info!(node = %me, "stopping on signal");
            Ok(())
        }
    }
}

/// Creates the cluster's CA, this node's identity as node 1, and, if the
/// configuration names a cluster directory, the admin credential.
fn bootstrap_identity(file: &NodeFile) -> Result<(StoredIdentity, Bootstrap), DaemonError> {
    let section = file.bootstrap.clone().unwrap_or_default();
    let ca = ClusterCa::generate()?;
    let node_id = NodeId::new(1).expect("1 is a valid node id");
    let mut cluster_id = [0u8; 16];
    os_seeded_rng().fill_bytes(&mut cluster_id);
    let identity = StoredIdentity {
        node_id,
        cluster_id,
        tls: ca.issue_node(node_id)?,
        ca_cert_der: ca.cert_der(),
        ca_key_der: ca.key_der(),
    };
    if let Some(dir) = &file.cluster_dir {
        let dir = ClusterDir::new(dir);
        dir.save_admin(&AdminCredential {
            cluster_id,
            tls: ca.issue_admin()?,
        })?;
        dir.save_addresses([(node_id, file.advertised())])?;
    }
    let bootstrap = Bootstrap {
        cluster_id,
        node_id,
        addr: file.advertised().to_string(),
        data_groups: section.data_groups,
        replication_factor: section.replication_factor,
        ca_cert_der: ca.cert_der(),
    };
    tracing::info!("bootstrapped a new cluster {}", hex(&cluster_id));
    Ok((identity, bootstrap))
}

/// Asks the nodes in `join` in turn to admit this node with `token`,
/// authenticating each by the CA fingerprint the token pins. A refusal of
/// the token itself is final; an unreachable node or a cluster hiccup
/// moves on to the next node.
async fn join(file: &NodeFile, token: &str) -> Result<(JoinGrant, Vec<u8>), DaemonError> {
    let parsed = JoinToken::parse(token).map_err(DaemonError::BadToken)?;
    if file.join.is_empty() {
        return Err(DaemonError::NothingToJoin);
    }
    let (key_der, csr_der) = pki::generate_key_and_csr()?;
    let client = QuicClient::joiner(parsed.ca_fingerprint)
        .map_err(|e| DaemonError::JoinFailed(e.to_string()))?;
    let request = codec::encode(&ClientRequest::Join(JoinRequest {
        token: token.trim().to_owned(),
        csr_der,
        addr: file.advertised().to_string(),
    }));
    let mut last = String::new();
    for addr in &file.join {
        let answer = match client.call(*addr, request.clone(), JOIN_TIMEOUT).await {
            Ok(bytes) => codec::decode::<ClientResponse>(&bytes)
                .map_err(|e| format!("{addr} answered garbage: {e}")),
            Err(e) => Err(e.to_string()),
        };
        match answer {
            // The grant's certificate certifies the key generated above.
            Ok(ClientResponse::Joined(grant)) => return Ok((grant, key_der)),
            Ok(ClientResponse::Error(ServiceError::Join(JoinError::Cluster(e)))) => {
                last = format!("{addr}: {e}");
            }
            Ok(ClientResponse::Error(ServiceError::Join(e))) => {
                return Err(DaemonError::JoinRefused(e))
            }
            Ok(other) => last = format!("{addr} answered {other:?}"),
            Err(e) => last = e,
        }
        tracing::warn!(%addr, error = %last, "join attempt failed; trying the next node");
    }
    Err(DaemonError::JoinFailed(last))
}

/// The identity and first peer addresses of a node the cluster admitted.
fn joined_identity(
    grant: JoinGrant,
    key_der: Vec<u8>,
) -> (StoredIdentity, BTreeMap<NodeId, SocketAddr>) {
    tracing::info!(node = %grant.node_id, "admitted to cluster {}", hex(&grant.cluster_id));
    let peers = grant
        .peers
        .iter()
        .filter_map(|(id, addr)| Some((*id, addr.parse().ok()?)))
        .collect();
    let identity = StoredIdentity {
        node_id: grant.node_id,
        cluster_id: grant.cluster_id,
        tls: TlsIdentity {
            cert_chain_der: vec![grant.cert_der, grant.ca_cert_der.clone()],
            key_der,
            trusted_cas_der: grant.trusted_cas_der,
        },
        ca_cert_der: grant.ca_cert_der,
        ca_key_der: grant.ca_key_der,
    };
    (identity, peers)
}

/// Serves every client call (admins and joiners) on its own task.
async fn serve_clients(
    node: Node,
    credentials: Arc<NodeCredentials>,
    mut clients: ClientInboundReceiver,
) {
    while let Some(call) = clients.recv().await {
        let node = node.clone();
        let credentials = credentials.clone();
        tokio::spawn(async move {
            let caller = match call.peer {
                ClientPeer::Admin => Caller::Admin,
                ClientPeer::Anonymous => Caller::Anonymous,
            };
            let response = service::serve(&node, &*credentials, caller, &call.request).await;
            // The caller may have gone; nothing to do then.
            let _ = call.reply.send(response);
        });
    }
}

/// Keeps the QUIC endpoint in step with this node's replica of group 0:
/// dials every node at the address the topology gives, and trusts exactly
/// the CA set group 0 trusts (a CA rotation's stage and finalize).
async fn follow_metadata(
    node: Node,
    credentials: Arc<NodeCredentials>,
    transport: Arc<QuicTransport>,
) {
    loop {
        if let Ok(state) = node.metadata_local().await {
            for (id, info) in state.topology.nodes() {
                match info.addr.parse::<SocketAddr>() {
                    Ok(addr) if id != node.id() => transport.set_peer_addr(id, addr),
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(%id, addr = %info.addr, error = %e, "node address is not host:port")
                    }
                }
            }
            if let Err(e) = credentials.follow_trust(state.ca_trust.into_values().collect()) {
                tracing::error!(error = %e, "cannot follow the trusted CA set");
            }
        }
        tokio::time::sleep(FOLLOW_INTERVAL).await;
    }
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(term) => term,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only Ctrl-C stops the node");
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
