//! The production binding of [`Transport`]: QUIC (quinn) with mutual TLS 1.3.
//!
//! Every node holds a certificate signed by a cluster CA whose DNS subject
//! alternative name (and common name) is `node-<id>.keel`, `<id>` being the
//! node id in decimal without leading zeros (see [`node_dns_name`](crate::io::pki::node_dns_name)). Both ends
//! of every node-to-node connection present certificates and verify them
//! against the trusted CA set, so a node without a cluster-signed certificate
//! cannot even finish the handshake (DESIGN.md §6). A dialling node also
//! checks that the server's certificate names the node it meant to reach, and
//! an accepting node takes the sender of everything arriving on a connection
//! from the client certificate, never from the bytes: a peer cannot claim
//! another id.
//!
//! The same port also serves clients (see `quic_client`), which may only
//! make calls, delivered on a separate channel as [`ClientCall`]s:
//! - admin clients (the CLI, benchmarks) present a certificate from the
//!   trusted CA set naming [`ADMIN_DNS_NAME`](crate::io::pki::ADMIN_DNS_NAME) ([`ClientPeer::Admin`]);
//! - joining nodes, which have no certificate yet, present none
//!   ([`ClientPeer::Anonymous`]). Their calls are bounded: requests of at
//!   most [`MAX_ANONYMOUS_REQUEST_LEN`] bytes, at most
//!   [`MAX_ANONYMOUS_CALLS`] at once per connection.
//!
//! A certificate that does not chain to the trusted CA set, or that names
//! neither exactly one node nor the admin, is refused; what an anonymous
//! caller may do is for the node to decide (it only answers joins).
//!
//! Wire format, on connections dialled by the sending node (each node dials
//! its own outgoing connection to each peer, so traffic from `a` to `b` always
//! rides `a`'s connection, and incoming connections only ever carry traffic
//! *to* the accepting node):
//! - one-way frames go on one long-lived unidirectional stream per
//!   connection, each frame prefixed with its length as a big-endian `u32`,
//!   so frames to one peer arrive in send order;
//! - each call opens a bidirectional stream, writes the length-prefixed
//!   request and finishes; the answer comes back length-prefixed on the same
//!   stream. A stream reset instead of an answer means the callee dropped the
//!   call.
//!
//! [`QuicTransport::reload_identity`] swaps the node's certificate and
//! trusted CA set live (CA rotation). New connections use the new identity;
//! an existing one is closed only if its peer's certificate no longer
//! chains to a trusted CA, so staging a CA (trust only grows) interrupts no
//! call in flight, and finalizing cuts off exactly the peers still on the
//! removed CA.

mod dial;
mod frames;
mod serve;
mod tls;

use crate::core::ids::NodeId;
use crate::io::pki::TlsIdentity;
use crate::io::transport::{CallFuture, InboundReceiver, Transport, TransportError, MAX_FRAME_LEN};
use quinn::{Connection, Endpoint, VarInt};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use dial::write_frames;
use serve::{accept_loop, ServerCtx};
use tls::{classify, peer_trusted, quic_configs, Peer};

pub(crate) use frames::{read_frame, write_frame, ReadFailure};
pub(crate) use tls::{
    chain_and_key, client_builder, crypto_provider, is_tls_failure, node_id_from_cert,
    quic_client_config, root_store,
};

/// The application protocol spoken on keel's QUIC connections; a peer that
/// does not offer it fails the handshake instead of talking past us.
pub const ALPN: &[u8] = b"keel/1";

/// The largest request an anonymous (certificate-less) caller may send. A
/// join request (token and CSR) is well under a kilobyte.
pub const MAX_ANONYMOUS_REQUEST_LEN: usize = 64 * 1024;

/// How many calls one anonymous connection may have in progress; further
/// streams are reset. A joiner only ever needs one.
pub const MAX_ANONYMOUS_CALLS: usize = 4;

/// How long an anonymous caller may take to send its request.
const ANONYMOUS_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How long dialling a peer may take before it counts as a failed attempt,
/// so one dead peer cannot hold up that peer's frame queue for long. A
/// handshake takes milliseconds on a LAN and well under a second across
/// continents.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// First wait after a failed dial; doubled per consecutive failure.
const BACKOFF_BASE: Duration = Duration::from_millis(50);

/// Longest wait between dials to an unreachable peer: a dial is one small
/// packet, and a restarted peer should be back in its group within about
/// an election timeout, not after a long backoff.
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// A connection with no traffic for this long is considered dead.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Keep-alives stop idle-but-healthy connections from timing out.
const KEEP_ALIVE: Duration = Duration::from_secs(3);

/// Application error code for a stream or connection refused by protocol
/// (oversized frame, malformed request, unusable certificate, a stream kind
/// or count the peer may not open).
pub(crate) const CODE_REFUSED: u32 = 1;

/// Application error code for a call the node dropped without answering.
pub(crate) const CODE_DROPPED: u32 = 2;

/// Application error code when the local transport (or client) shuts down.
pub(crate) const CODE_SHUTDOWN: u32 = 3;

/// Application error code for connections closed because the local TLS
/// identity or trusted CA set changed; the peer re-handshakes.
const CODE_RELOADED: u32 = 4;

/// How often a dial is retried when the TLS identity changes while dialling.
const STALE_DIAL_RETRIES: usize = 3;

/// What can go wrong setting up the QUIC binding.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
pub enum QuicError {
    #[error("the TLS identity (certificates, key or CA set) is unusable: {0}")]
    Tls(String),
    #[error("binding the QUIC endpoint failed: {0}")]
    Bind(String),
}

/// Who made a [`ClientCall`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClientPeer {
    /// A client presenting a trusted certificate naming [`ADMIN_DNS_NAME`](crate::io::pki::ADMIN_DNS_NAME).
    Admin,
    /// A client presenting no certificate (a joining node).
    Anonymous,
}

/// A call from a client rather than a node. The node answers through
/// `reply`; dropping it fails the call.
#[derive(Debug)]
pub struct ClientCall {
    pub peer: ClientPeer,
    pub request: Vec<u8>,
    pub reply: oneshot::Sender<Vec<u8>>,
}

/// The receiving half for client calls that [`bind`] hands to the node.
pub type ClientInboundReceiver = mpsc::UnboundedReceiver<ClientCall>;

/// The outgoing connection to one peer, with the backoff state of dialling it.
#[derive(Default)]
struct PeerLink {
    /// The live connection and the address it was dialled at.
    conn: Option<(Connection, SocketAddr)>,
    /// Consecutive failed dials.
    failures: u32,
    /// No new dial to this address under this TLS generation before this
    /// instant: a new identity or trust set deserves a fresh attempt.
    retry_at: Option<(Instant, SocketAddr, u64)>,
}

/// The current TLS configuration and every connection made under it.
struct Tls {
    /// Bumped by every [`QuicTransport::reload_identity`].
    generation: u64,
    server: Arc<quinn::ServerConfig>,
    client: quinn::ClientConfig,
    /// The CA certificates (DER) trusted now.
    trusted_cas_der: Vec<Vec<u8>>,
    /// Open connections (both directions) whose peer the current trust
    /// accepts; closed ones are pruned lazily.
    conns: Vec<Connection>,
}

/// State shared by the transport handle, its per-peer frame writers and its
/// in-flight calls.
struct Inner {
    me: NodeId,
    endpoint: Endpoint,
    tls: Arc<Mutex<Tls>>,
    peer_addrs: Mutex<BTreeMap<NodeId, SocketAddr>>,
    links: Mutex<BTreeMap<NodeId, Arc<tokio::sync::Mutex<PeerLink>>>>,
    /// Per-peer queues feeding the task that writes one-way frames in order.
    frame_queues: Mutex<BTreeMap<NodeId, mpsc::UnboundedSender<Vec<u8>>>>,
}

/// Locks a std mutex, ignoring poisoning: every critical section here is a
/// few field or map operations that cannot leave the data inconsistent.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A node's QUIC endpoint. Dropping it closes the endpoint and every
/// connection and stops its background tasks.
pub struct QuicTransport {
    inner: Arc<Inner>,
    local_addr: SocketAddr,
}

/// The keys of a node's endpoint that must survive its restarts: the
/// stateless-reset key and the key of the hash its connection ids carry
/// (which the endpoint checks before it answers a packet at all). Both are
/// derived from the node's private key, so a restarted node recognises
/// packets for its previous run's connections and resets them, and its
/// peers dial afresh at once instead of writing into a dead connection
/// until its idle timeout. quinn's defaults are random per process.
struct EndpointKeys {
    reset: ring::hmac::Key,
    cid: u64,
}

impl EndpointKeys {
    fn of(identity: &TlsIdentity) -> Self {
        use sha2::{Digest, Sha256};
        let secret = Sha256::new()
            .chain_update(b"keel endpoint keys v1")
            .chain_update(&identity.key_der)
            .finalize();
        let mut cid = [0u8; 8];
        cid.copy_from_slice(&secret[..8]);
        EndpointKeys {
            reset: ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret),
            cid: u64::from_be_bytes(cid),
        }
    }

    fn cid_generator(&self) -> quinn_proto::HashedConnectionIdGenerator {
        quinn_proto::HashedConnectionIdGenerator::from_key(self.cid)
    }

    fn endpoint_config(self) -> quinn::EndpointConfig {
        let mut config = quinn::EndpointConfig::new(Arc::new(self.reset.clone()));
        config.cid_generator(move || Box::new(self.cid_generator()));
        config
    }
}

/// Binds a QUIC endpoint on `listen` with TLS 1.3 and starts accepting.
/// Nodes (certificates naming a node, verified against the identity's CA
/// set; ALPN [`ALPN`]) arrive on the [`InboundReceiver`]; admin and
/// anonymous clients' calls on the [`ClientInboundReceiver`]. `peers` gives
/// the addresses to dial; they can be changed later with
/// [`QuicTransport::set_peer_addr`]. Must be called within a tokio runtime.
pub async fn bind(
    me: NodeId,
    listen: SocketAddr,
    identity: TlsIdentity,
    peers: BTreeMap<NodeId, SocketAddr>,
) -> Result<(Arc<QuicTransport>, InboundReceiver, ClientInboundReceiver), QuicError> {
    let (server_config, client_config) = quic_configs(&identity)?;
    let bind_error = |e: std::io::Error| QuicError::Bind(format!("{listen}: {e}"));
    let socket = std::net::UdpSocket::bind(listen).map_err(bind_error)?;
    let runtime = quinn::default_runtime()
        .ok_or_else(|| QuicError::Bind("no async runtime to run the endpoint on".into()))?;
    let endpoint = Endpoint::new(
        EndpointKeys::of(&identity).endpoint_config(),
        Some((*server_config).clone()),
        socket,
        runtime,
    )
    .map_err(bind_error)?;
    let local_addr = endpoint
        .local_addr()
        .map_err(|e| QuicError::Bind(e.to_string()))?;
    let tls = Arc::new(Mutex::new(Tls {
        generation: 0,
        server: server_config,
        client: client_config,
        trusted_cas_der: identity.trusted_cas_der.clone(),
        conns: Vec::new(),
    }));
    let (nodes_tx, nodes_rx) = mpsc::unbounded_channel();
    let (clients_tx, clients_rx) = mpsc::unbounded_channel();
    let ctx = Arc::new(ServerCtx {
        tls: tls.clone(),
        nodes: nodes_tx,
        clients: clients_tx,
    });
    tokio::spawn(accept_loop(endpoint.clone(), ctx));
    let inner = Arc::new(Inner {
        me,
        endpoint,
        tls,
        peer_addrs: Mutex::new(peers),
        links: Mutex::new(BTreeMap::new()),
        frame_queues: Mutex::new(BTreeMap::new()),
    });
    Ok((
        Arc::new(QuicTransport { inner, local_addr }),
        nodes_rx,
        clients_rx,
    ))
}

impl QuicTransport {
    /// The address the endpoint is bound to (with the real port when bound
    /// on port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// Sets (or changes) where `node` is dialled. A connection to its old
    /// address is replaced on next use, and backoff from failures at the old
    /// address does not apply to the new one.
    pub fn set_peer_addr(&self, node: NodeId, addr: SocketAddr) {
        lock(&self.inner.peer_addrs).insert(node, addr);
    }

    /// Swaps the node's TLS identity live (CA rotation): the new certificate
    /// and trusted CA set apply to every handshake from now on, in both
    /// directions. An existing connection, outgoing or incoming, is closed
    /// if the new trust does not accept the certificate its peer
    /// authenticated with, so that the peer must re-handshake; calls in
    /// flight on it fail (`Dropped` or `Unreachable`) and frames being
    /// written are lost, as Raft allows. Connections to peers still trusted
    /// stay open: they go on under the identity they were made with. An
    /// unusable identity is refused and the old one stays in force.
    pub fn reload_identity(&self, identity: TlsIdentity) -> Result<(), QuicError> {
        let (server, client) = quic_configs(&identity)?;
        let stale = {
            let mut tls = lock(&self.inner.tls);
            self.inner
                .endpoint
                .set_server_config(Some((*server).clone()));
            tls.generation += 1;
            tls.server = server;
            tls.client = client;
            tls.trusted_cas_der = identity.trusted_cas_der.clone();
            let (keep, stale): (Vec<_>, Vec<_>) = std::mem::take(&mut tls.conns)
                .into_iter()
                .filter(|c| c.close_reason().is_none())
                .partition(|c| peer_trusted(c, &identity.trusted_cas_der));
            tls.conns = keep;
            stale
        };
        tracing::info!(me = %self.inner.me, closing = stale.len(), "TLS identity reloaded");
        for conn in stale {
            conn.close(VarInt::from_u32(CODE_RELOADED), b"TLS identity changed");
        }
        Ok(())
    }
}

impl Drop for QuicTransport {
    fn drop(&mut self) {
        // Dropping the queues ends the frame writers, which hold the last
        // other references to `inner`.
        lock(&self.inner.frame_queues).clear();
        self.inner
            .endpoint
            .close(VarInt::from_u32(CODE_SHUTDOWN), b"transport shut down");
    }
}

impl Transport for QuicTransport {
    fn disconnect(&self, peer: NodeId) {
        let conns: Vec<Connection> = lock(&self.inner.tls)
            .conns
            .iter()
            .filter(|c| matches!(classify(c), Some(Peer::Node(node)) if node == peer))
            .cloned()
            .collect();
        let outgoing = lock(&self.inner.links).get(&peer).cloned();
        tracing::warn!(me = %self.inner.me, %peer, incoming = conns.len(), "disconnecting a peer that forged its identity");
        for conn in conns {
            conn.close(VarInt::from_u32(CODE_REFUSED), b"forged node identity");
        }
        if let Some(link) = outgoing {
            tokio::spawn(async move {
                if let Some((conn, _)) = link.lock().await.conn.take() {
                    conn.close(VarInt::from_u32(CODE_REFUSED), b"forged node identity");
                }
            });
        }
    }

    fn send(&self, to: NodeId, frame: Vec<u8>) {
        if frame.len() > MAX_FRAME_LEN {
            tracing::trace!(me = %self.inner.me, %to, len = frame.len(), "dropping oversized frame");
            return;
        }
        let mut queues = lock(&self.inner.frame_queues);
        let queue = queues.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(write_frames(self.inner.clone(), to, rx));
            tx
        });
        if queue.send(frame).is_err() {
            // The writer ended (only on shutdown); forget its queue.
            queues.remove(&to);
        }
    }

    fn call(&self, to: NodeId, request: Vec<u8>, timeout: Duration) -> CallFuture {
        let inner = self.inner.clone();
        Box::pin(async move {
            if request.len() > MAX_FRAME_LEN {
                return Err(TransportError::FrameTooLarge { len: request.len() });
            }
            tokio::time::timeout(timeout, inner.call(to, request))
                .await
                .unwrap_or(Err(TransportError::Timeout(to)))
        })
    }
}

#[cfg(test)]
mod tests;
