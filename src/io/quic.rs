//! The production binding of [`Transport`]: QUIC (quinn) with mutual TLS 1.3.
//!
//! Every node holds a certificate signed by a cluster CA whose DNS subject
//! alternative name (and common name) is `node-<id>.keel`, `<id>` being the
//! node id in decimal without leading zeros (see [`node_dns_name`]). Both ends
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
//!   trusted CA set naming [`ADMIN_DNS_NAME`] ([`ClientPeer::Admin`]);
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

use crate::core::ids::NodeId;
use crate::io::pki::{issued_by_any, node_dns_name, TlsIdentity, ADMIN_DNS_NAME};
use crate::io::transport::{
    CallFuture, Inbound, InboundReceiver, Transport, TransportError, MAX_FRAME_LEN,
};
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use rustls::client::{verify_server_name, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::RootCertStore;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

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
    /// A client presenting a trusted certificate naming [`ADMIN_DNS_NAME`].
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

pub(crate) fn tls_error(err: impl fmt::Display) -> QuicError {
    QuicError::Tls(err.to_string())
}

/// The one crypto provider keel uses (ring), independent of any process-wide
/// default.
pub(crate) fn crypto_provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A root store holding exactly `cas`.
pub(crate) fn root_store(cas: &[Vec<u8>]) -> Result<RootCertStore, QuicError> {
    let mut roots = RootCertStore::empty();
    for ca in cas {
        roots
            .add(CertificateDer::from(ca.clone()))
            .map_err(tls_error)?;
    }
    Ok(roots)
}

/// The identity's certificate chain and key in rustls' types.
pub(crate) fn chain_and_key(
    identity: &TlsIdentity,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), QuicError> {
    let chain = identity
        .cert_chain_der
        .iter()
        .map(|der| CertificateDer::from(der.clone()))
        .collect();
    let key = PrivateKeyDer::try_from(identity.key_der.clone()).map_err(tls_error)?;
    Ok((chain, key))
}

/// A TLS 1.3-only rustls client config builder on keel's provider.
pub(crate) fn client_builder(
    provider: Arc<CryptoProvider>,
) -> Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>, QuicError> {
    rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)
}

/// The QUIC transport parameters shared by nodes and clients.
fn transport_config() -> Result<Arc<quinn::TransportConfig>, QuicError> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(IDLE_TIMEOUT.try_into().map_err(tls_error)?))
        .keep_alive_interval(Some(KEEP_ALIVE));
    Ok(Arc::new(transport))
}

/// Wraps a rustls client config (ALPN set here) into a quinn one.
pub(crate) fn quic_client_config(
    mut client: rustls::ClientConfig,
) -> Result<quinn::ClientConfig, QuicError> {
    client.alpn_protocols = vec![ALPN.to_vec()];
    let client_crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(client).map_err(tls_error)?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(client_crypto));
    client_config.transport_config(transport_config()?);
    Ok(client_config)
}

/// Builds the quinn server and client configurations for `identity`: TLS 1.3
/// only, both directions verified against the trusted CA set. The server
/// also accepts clients that present no certificate at all (they become
/// [`ClientPeer::Anonymous`]); a presented certificate must verify.
fn quic_configs(
    identity: &TlsIdentity,
) -> Result<(Arc<quinn::ServerConfig>, quinn::ClientConfig), QuicError> {
    let provider = crypto_provider();
    let roots = Arc::new(root_store(&identity.trusted_cas_der)?);
    let (chain, key) = chain_and_key(identity)?;

    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .allow_unauthenticated()
            .build()
            .map_err(tls_error)?;
    let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .map_err(tls_error)?;
    server.alpn_protocols = vec![ALPN.to_vec()];

    let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(tls_error)?;
    let client = client_builder(provider)?
        .with_webpki_verifier(server_verifier)
        .with_client_auth_cert(chain, key)
        .map_err(tls_error)?;

    let server_crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(server).map_err(tls_error)?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server_config.transport_config(transport_config()?);
    Ok((Arc::new(server_config), quic_client_config(client)?))
}

/// The node id named by a (verified) leaf certificate.
///
/// The DER is scanned for DNS-name entries (context tag `[2]`, short length)
/// of the form `node-<id>.keel`; the candidate is then confirmed with webpki's
/// own subject-name check, so a look-alike byte sequence elsewhere in the
/// certificate cannot pass. A certificate naming two different ids names none.
pub(crate) fn node_id_from_cert(cert: &CertificateDer<'_>) -> Option<NodeId> {
    let der = cert.as_ref();
    let mut found: Option<NodeId> = None;
    for (i, window) in der.windows(2).enumerate() {
        let (tag, len) = (window[0], usize::from(window[1]));
        if tag != 0x82 || len >= 0x80 {
            continue;
        }
        let Some(candidate) = der.get(i + 2..i + 2 + len).and_then(parse_node_name) else {
            continue;
        };
        match found {
            Some(earlier) if earlier != candidate => return None,
            _ => found = Some(candidate),
        }
    }
    let node = found?;
    cert_names(cert, &node_dns_name(node)).then_some(node)
}

/// Whether webpki finds `name` among the certificate's subject names.
fn cert_names(cert: &CertificateDer<'_>, name: &str) -> bool {
    let Ok(parsed) = ParsedCertificate::try_from(cert) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(name.to_owned()) else {
        return false;
    };
    verify_server_name(&parsed, &name).is_ok()
}

/// Parses `node-<id>.keel` (canonical decimal, no sign, no leading zeros).
fn parse_node_name(name: &[u8]) -> Option<NodeId> {
    let name = std::str::from_utf8(name).ok()?;
    let digits = name.strip_prefix("node-")?.strip_suffix(".keel")?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    NodeId::new(digits.parse().ok()?).ok()
}

/// Who is on the other end of an accepted connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Peer {
    Node(NodeId),
    Client(ClientPeer),
}

/// Classifies an established incoming connection by its (already verified)
/// client certificate: none at all is anonymous; a leaf must name exactly
/// one node or the admin, never both.
fn classify(conn: &Connection) -> Option<Peer> {
    let Some(identity) = conn.peer_identity() else {
        return Some(Peer::Client(ClientPeer::Anonymous));
    };
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    let Some(leaf) = chain.first() else {
        return Some(Peer::Client(ClientPeer::Anonymous));
    };
    match (node_id_from_cert(leaf), cert_names(leaf, ADMIN_DNS_NAME)) {
        (Some(node), false) => Some(Peer::Node(node)),
        (None, true) => Some(Peer::Client(ClientPeer::Admin)),
        _ => None,
    }
}

/// Whether the peer that `conn` authenticated is accepted by `trusted`: an
/// anonymous client always is (no CA vouched for it), a certificate only if
/// one of `trusted` signed its leaf.
fn peer_trusted(conn: &Connection, trusted: &[Vec<u8>]) -> bool {
    let Some(identity) = conn.peer_identity() else {
        return true;
    };
    let Ok(chain) = identity.downcast::<Vec<CertificateDer<'static>>>() else {
        return false;
    };
    chain
        .first()
        .is_none_or(|leaf| issued_by_any(leaf.as_ref(), trusted))
}

/// Whether a QUIC connection error carries a TLS alert (transport error
/// codes `0x100..=0x1ff`), from either side: a handshake failure.
pub(crate) fn is_tls_failure(err: &quinn::ConnectionError) -> bool {
    let code = match err {
        quinn::ConnectionError::TransportError(e) => e.code,
        quinn::ConnectionError::ConnectionClosed(close) => close.error_code,
        _ => return false,
    };
    (0x100..=0x1ff).contains(&u64::from(code))
}

/// Whether `conn` is closed because of a TLS failure.
fn closed_by_tls(conn: &Connection) -> bool {
    conn.close_reason().is_some_and(|err| is_tls_failure(&err))
}

/// Why a length-prefixed frame could not be read.
pub(crate) enum ReadFailure {
    /// The prefix announced more bytes than the reader allows.
    TooLarge(usize),
    /// The stream was reset, stopped or ended mid-frame, or the connection died.
    Stream,
}

/// Reads one length-prefixed frame of at most `max_len` bytes; `Ok(None)`
/// when the stream ended cleanly before a new frame began.
pub(crate) async fn read_frame(
    recv: &mut RecvStream,
    max_len: usize,
) -> Result<Option<Vec<u8>>, ReadFailure> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(_) => return Err(ReadFailure::Stream),
    }
    let len = usize::try_from(u32::from_be_bytes(prefix)).map_err(|_| ReadFailure::Stream)?;
    if len > max_len {
        return Err(ReadFailure::TooLarge(len));
    }
    let mut frame = vec![0u8; len];
    recv.read_exact(&mut frame)
        .await
        .map_err(|_| ReadFailure::Stream)?;
    Ok(Some(frame))
}

/// Writes one length-prefixed frame. Callers check the length first; a frame
/// that does not fit the prefix is refused rather than truncated.
pub(crate) async fn write_frame(send: &mut SendStream, frame: &[u8]) -> Result<(), ()> {
    let len = u32::try_from(frame.len()).map_err(|_| ())?;
    send.write_all(&len.to_be_bytes()).await.map_err(|_| ())?;
    send.write_all(frame).await.map_err(|_| ())
}

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

impl Tls {
    /// Records `conn`, established with the configuration of `generation`.
    /// Returns false if the identity changed meanwhile and the new trust
    /// does not accept the peer: the caller must close it.
    fn register(&mut self, conn: &Connection, generation: u64) -> bool {
        if generation != self.generation && !peer_trusted(conn, &self.trusted_cas_der) {
            return false;
        }
        self.conns.retain(|c| c.close_reason().is_none());
        self.conns.push(conn.clone());
        true
    }
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

fn backoff(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_MAX)
}

impl Inner {
    /// The live connection to `to`, dialling one if there is none (or the
    /// peer's address changed). While a recent dial to the same address is
    /// backing off, fails at once instead of dialling again.
    async fn connection(&self, to: NodeId) -> Result<Connection, TransportError> {
        let addr = lock(&self.peer_addrs)
            .get(&to)
            .copied()
            .ok_or(TransportError::Unreachable(to))?;
        let link = lock(&self.links).entry(to).or_default().clone();
        let mut link = link.lock().await;
        if let Some((conn, conn_addr)) = link.conn.take() {
            if conn_addr == addr && conn.close_reason().is_none() {
                link.conn = Some((conn.clone(), conn_addr));
                return Ok(conn);
            }
            // Nothing else owns it once the link lets go: close it rather
            // than leave keep-alives running on an abandoned connection.
            conn.close(VarInt::from_u32(CODE_SHUTDOWN), b"peer address changed");
        }
        let now = Instant::now();
        if let Some((retry_at, failed_addr, generation)) = link.retry_at {
            if failed_addr == addr && generation == lock(&self.tls).generation && now < retry_at {
                return Err(TransportError::Unreachable(to));
            }
        }
        match self.dial(to, addr).await {
            Some(conn) => {
                link.conn = Some((conn.clone(), addr));
                link.failures = 0;
                link.retry_at = None;
                Ok(conn)
            }
            None => {
                link.failures = link.failures.saturating_add(1);
                let generation = lock(&self.tls).generation;
                link.retry_at = Some((Instant::now() + backoff(link.failures), addr, generation));
                Err(TransportError::Unreachable(to))
            }
        }
    }

    /// One dial attempt, requiring the server to present `to`'s certificate.
    /// A connection that completed under an identity replaced meanwhile is
    /// closed and dialled again with the new one.
    async fn dial(&self, to: NodeId, addr: SocketAddr) -> Option<Connection> {
        for _ in 0..STALE_DIAL_RETRIES {
            let (config, generation) = {
                let tls = lock(&self.tls);
                (tls.client.clone(), tls.generation)
            };
            let connecting = match self.endpoint.connect_with(config, addr, &node_dns_name(to)) {
                Ok(connecting) => connecting,
                Err(err) => {
                    tracing::debug!(me = %self.me, %to, %addr, %err, "cannot dial peer");
                    return None;
                }
            };
            let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(err)) => {
                    tracing::debug!(me = %self.me, %to, %addr, %err, "dialling peer failed");
                    return None;
                }
                Err(_elapsed) => {
                    tracing::debug!(me = %self.me, %to, %addr, "dialling peer timed out");
                    return None;
                }
            };
            if lock(&self.tls).register(&conn, generation) {
                return Some(conn);
            }
            conn.close(VarInt::from_u32(CODE_RELOADED), b"TLS identity changed");
        }
        None
    }

    /// One call over a fresh bidirectional stream.
    async fn call(&self, to: NodeId, request: Vec<u8>) -> Result<Vec<u8>, TransportError> {
        let conn = self.connection(to).await?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|_| TransportError::Unreachable(to))?;
        write_frame(&mut send, &request)
            .await
            .map_err(|()| TransportError::Unreachable(to))?;
        send.finish().map_err(|_| TransportError::Unreachable(to))?;
        match read_frame(&mut recv, MAX_FRAME_LEN).await {
            Ok(Some(response)) => Ok(response),
            Err(ReadFailure::TooLarge(len)) => Err(TransportError::FrameTooLarge { len }),
            // The peer refused our certificate only after our side of the
            // handshake completed: it is unreachable to us, not a callee
            // that dropped the call.
            Ok(None) | Err(ReadFailure::Stream) if closed_by_tls(&conn) => {
                Err(TransportError::Unreachable(to))
            }
            Ok(None) | Err(ReadFailure::Stream) => Err(TransportError::Dropped(to)),
        }
    }
}

/// Writes the one-way frames queued for `to`, in order, on one long-lived
/// unidirectional stream, reopening it (and the connection) after failures.
/// Frames that cannot be written are dropped, as [`Transport::send`] allows:
/// Raft retries. Ends when the queue's sender goes away.
async fn write_frames(inner: Arc<Inner>, to: NodeId, mut queue: mpsc::UnboundedReceiver<Vec<u8>>) {
    let mut stream: Option<SendStream> = None;
    while let Some(frame) = queue.recv().await {
        let send = match &mut stream {
            Some(send) => send,
            None => {
                let opened = match inner.connection(to).await {
                    Ok(conn) => conn.open_uni().await.ok(),
                    Err(_) => None,
                };
                match opened {
                    Some(send) => stream.insert(send),
                    None => {
                        // Unreachable: everything queued meanwhile is stale.
                        let mut dropped = 1usize;
                        while queue.try_recv().is_ok() {
                            dropped += 1;
                        }
                        tracing::trace!(me = %inner.me, %to, dropped, "dropping frames to unreachable peer");
                        continue;
                    }
                }
            }
        };
        if write_frame(send, &frame).await.is_err() {
            tracing::trace!(me = %inner.me, %to, "frame stream broke; reopening on next frame");
            stream = None;
        }
    }
}

/// What the accepting side of the endpoint needs.
struct ServerCtx {
    tls: Arc<Mutex<Tls>>,
    nodes: mpsc::UnboundedSender<Inbound>,
    clients: mpsc::UnboundedSender<ClientCall>,
}

/// Accepts connections until the endpoint closes.
async fn accept_loop(endpoint: Endpoint, ctx: Arc<ServerCtx>) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(serve_connection(incoming, ctx.clone()));
    }
}

/// Serves one incoming connection, handshaking under the current TLS
/// configuration: a node's traffic is attributed to the node its
/// certificate names; clients go to the client channel.
async fn serve_connection(incoming: quinn::Incoming, ctx: Arc<ServerCtx>) {
    let (server_config, generation) = {
        let tls = lock(&ctx.tls);
        (tls.server.clone(), tls.generation)
    };
    let connecting = match incoming.accept_with(server_config) {
        Ok(connecting) => connecting,
        Err(err) => {
            tracing::debug!(%err, "incoming connection refused");
            return;
        }
    };
    let conn = match connecting.await {
        Ok(conn) => conn,
        Err(err) => {
            tracing::debug!(%err, "incoming connection failed its handshake");
            return;
        }
    };
    let Some(peer) = classify(&conn) else {
        tracing::warn!(remote = %conn.remote_address(), "peer certificate names neither one node nor the admin");
        conn.close(
            VarInt::from_u32(CODE_REFUSED),
            b"certificate names neither one node nor the admin",
        );
        return;
    };
    if !lock(&ctx.tls).register(&conn, generation) {
        conn.close(VarInt::from_u32(CODE_RELOADED), b"TLS identity changed");
        return;
    }
    match peer {
        Peer::Node(from) => serve_node(conn, from, &ctx.nodes).await,
        Peer::Client(client) => serve_client(conn, client, &ctx.clients).await,
    }
}

/// Serves a node's connection: every stream on it is attributed to `from`.
async fn serve_node(conn: Connection, from: NodeId, inbound: &mpsc::UnboundedSender<Inbound>) {
    loop {
        tokio::select! {
            uni = conn.accept_uni() => match uni {
                Ok(recv) => {
                    tokio::spawn(read_frames(from, recv, inbound.clone()));
                }
                Err(_) => return,
            },
            bi = conn.accept_bi() => match bi {
                Ok((send, recv)) => {
                    tokio::spawn(serve_call(from, send, recv, inbound.clone()));
                }
                Err(_) => return,
            },
        }
    }
}

/// Serves a client's connection: calls only, bounded for anonymous callers.
async fn serve_client(
    conn: Connection,
    peer: ClientPeer,
    clients: &mpsc::UnboundedSender<ClientCall>,
) {
    let permits = match peer {
        ClientPeer::Admin => None,
        ClientPeer::Anonymous => Some(Arc::new(Semaphore::new(MAX_ANONYMOUS_CALLS))),
    };
    loop {
        tokio::select! {
            uni = conn.accept_uni() => match uni {
                Ok(mut recv) => {
                    tracing::debug!(remote = %conn.remote_address(), ?peer, "refusing a one-way stream from a client");
                    let _ = recv.stop(VarInt::from_u32(CODE_REFUSED));
                }
                Err(_) => return,
            },
            bi = conn.accept_bi() => match bi {
                Ok((mut send, mut recv)) => {
                    let permit = match &permits {
                        None => None,
                        Some(permits) => match permits.clone().try_acquire_owned() {
                            Ok(permit) => Some(permit),
                            Err(_) => {
                                tracing::debug!(remote = %conn.remote_address(), "refusing a call beyond the anonymous limit");
                                let _ = recv.stop(VarInt::from_u32(CODE_REFUSED));
                                let _ = send.reset(VarInt::from_u32(CODE_REFUSED));
                                continue;
                            }
                        },
                    };
                    tokio::spawn(serve_client_call(peer, send, recv, clients.clone(), permit));
                }
                Err(_) => return,
            },
        }
    }
}

/// Delivers the frames of one unidirectional stream, in order.
async fn read_frames(from: NodeId, mut recv: RecvStream, inbound: mpsc::UnboundedSender<Inbound>) {
    loop {
        match read_frame(&mut recv, MAX_FRAME_LEN).await {
            Ok(Some(frame)) => {
                if inbound.send(Inbound::Frame { from, frame }).is_err() {
                    // The node is gone; nobody will read further frames.
                    let _ = recv.stop(VarInt::from_u32(CODE_SHUTDOWN));
                    return;
                }
            }
            Ok(None) | Err(ReadFailure::Stream) => return,
            Err(ReadFailure::TooLarge(len)) => {
                tracing::warn!(%from, len, "refusing oversized frame; stopping its stream");
                let _ = recv.stop(VarInt::from_u32(CODE_REFUSED));
                return;
            }
        }
    }
}

/// Reads a call's request of at most `max_len` bytes; on failure refuses
/// the stream in both directions.
async fn read_request(
    send: &mut SendStream,
    recv: &mut RecvStream,
    max_len: usize,
) -> Option<Vec<u8>> {
    match read_frame(recv, max_len).await {
        Ok(Some(request)) => Some(request),
        failed => {
            if let Err(ReadFailure::TooLarge(len)) = failed {
                tracing::debug!(len, max_len, "refusing oversized request");
            }
            let _ = recv.stop(VarInt::from_u32(CODE_REFUSED));
            let _ = send.reset(VarInt::from_u32(CODE_REFUSED));
            None
        }
    }
}

/// Hands a call to the node through `queue` (built by `make` around the
/// reply channel) and writes its answer, or resets the stream if the node
/// is gone or drops the call.
async fn hand_over<T>(
    mut send: SendStream,
    queue: &mpsc::UnboundedSender<T>,
    make: impl FnOnce(oneshot::Sender<Vec<u8>>) -> T,
) {
    let (reply, response) = oneshot::channel();
    if queue.send(make(reply)).is_err() {
        let _ = send.reset(VarInt::from_u32(CODE_SHUTDOWN));
        return;
    }
    match response.await {
        Ok(response) if response.len() <= MAX_FRAME_LEN => {
            if write_frame(&mut send, &response).await.is_ok() {
                let _ = send.finish();
            }
        }
        Ok(response) => {
            tracing::warn!(len = response.len(), "refusing to send oversized response");
            let _ = send.reset(VarInt::from_u32(CODE_REFUSED));
        }
        Err(_dropped) => {
            let _ = send.reset(VarInt::from_u32(CODE_DROPPED));
        }
    }
}

/// Serves one call from a node: reads the request, hands it to the node and
/// writes the answer, or resets the stream if the node drops the call.
async fn serve_call(
    from: NodeId,
    mut send: SendStream,
    mut recv: RecvStream,
    inbound: mpsc::UnboundedSender<Inbound>,
) {
    let Some(request) = read_request(&mut send, &mut recv, MAX_FRAME_LEN).await else {
        return;
    };
    hand_over(send, &inbound, |reply| Inbound::Call {
        from,
        request,
        reply,
    })
    .await;
}

/// Serves one call from a client. Anonymous callers get a smaller request
/// limit and a deadline for sending it; `_permit` holds their call slot
/// until the answer is written.
async fn serve_client_call(
    peer: ClientPeer,
    mut send: SendStream,
    mut recv: RecvStream,
    clients: mpsc::UnboundedSender<ClientCall>,
    _permit: Option<OwnedSemaphorePermit>,
) {
    let request = match peer {
        ClientPeer::Admin => read_request(&mut send, &mut recv, MAX_FRAME_LEN).await,
        ClientPeer::Anonymous => {
            let read = read_request(&mut send, &mut recv, MAX_ANONYMOUS_REQUEST_LEN);
            match tokio::time::timeout(ANONYMOUS_REQUEST_TIMEOUT, read).await {
                Ok(request) => request,
                Err(_elapsed) => {
                    let _ = recv.stop(VarInt::from_u32(CODE_REFUSED));
                    let _ = send.reset(VarInt::from_u32(CODE_REFUSED));
                    None
                }
            }
        }
    };
    let Some(request) = request else {
        return;
    };
    hand_over(send, &clients, |reply| ClientCall {
        peer,
        request,
        reply,
    })
    .await;
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
mod tests {
    use super::*;
    use crate::io::pki::ClusterCa;
    use crate::io::transport::{spawn_echo, DEFAULT_CALL_TIMEOUT};
    use rand_chacha::rand_core::{RngCore, SeedableRng};

    type Bound = (Arc<QuicTransport>, InboundReceiver, ClientInboundReceiver);

    fn node(id: u64) -> NodeId {
        NodeId::new(id).expect("test node ids are non-zero")
    }

    fn localhost() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    /// Binds nodes 1 and 2 with identities from `ca1` and `ca2`, each knowing
    /// the other's address.
    async fn pair(ca1: &ClusterCa, ca2: &ClusterCa) -> (Bound, Bound) {
        let one = bind(
            node(1),
            localhost(),
            ca1.issue_node(node(1)).expect("issue"),
            BTreeMap::new(),
        )
        .await
        .expect("bind 1");
        let two = bind(
            node(2),
            localhost(),
            ca2.issue_node(node(2)).expect("issue"),
            BTreeMap::new(),
        )
        .await
        .expect("bind 2");
        one.0.set_peer_addr(node(2), two.0.local_addr());
        two.0.set_peer_addr(node(1), one.0.local_addr());
        (one, two)
    }

    async fn next(rx: &mut InboundReceiver) -> Inbound {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("inbound within 10s")
            .expect("inbound channel open")
    }

    #[tokio::test]
    async fn frames_arrive_in_order_from_the_certificate_node() {
        let ca = ClusterCa::generate().expect("ca");
        let ((a, _rx_a, _), (_b, mut rx_b, _)) = pair(&ca, &ca).await;
        for i in 0..200u32 {
            a.send(node(2), i.to_be_bytes().to_vec());
        }
        for i in 0..200u32 {
            match next(&mut rx_b).await {
                Inbound::Frame { from, frame } => {
                    assert_eq!(from, node(1));
                    assert_eq!(frame, i.to_be_bytes().to_vec());
                }
                other => panic!("expected a frame, got {other:?}"),
            }
        }
    }

    #[tokio::test]
    async fn call_round_trip_both_ways() {
        let ca = ClusterCa::generate().expect("ca");
        let ((a, rx_a, _), (b, rx_b, _)) = pair(&ca, &ca).await;
        spawn_echo(rx_a);
        spawn_echo(rx_b);
        let response = a
            .call(node(2), b"ping".to_vec(), DEFAULT_CALL_TIMEOUT)
            .await;
        assert_eq!(response, Ok(b"re:ping".to_vec()));
        let response = b
            .call(node(1), b"pong".to_vec(), DEFAULT_CALL_TIMEOUT)
            .await;
        assert_eq!(response, Ok(b"re:pong".to_vec()));
        // The connection is reused for further calls.
        let response = a.call(node(2), Vec::new(), DEFAULT_CALL_TIMEOUT).await;
        assert_eq!(response, Ok(b"re:".to_vec()));
    }

    #[tokio::test]
    async fn call_reports_the_certificate_node_as_caller() {
        let ca = ClusterCa::generate().expect("ca");
        let ((a, _rx_a, _), (_b, mut rx_b, _)) = pair(&ca, &ca).await;
        let call = tokio::spawn(a.call(node(2), b"who".to_vec(), DEFAULT_CALL_TIMEOUT));
        match next(&mut rx_b).await {
            Inbound::Call {
                from,
                request,
                reply,
            } => {
                assert_eq!(from, node(1));
                assert_eq!(request, b"who".to_vec());
                reply.send(b"you".to_vec()).expect("caller waits");
            }
            other => panic!("expected a call, got {other:?}"),
        }
        assert_eq!(call.await.expect("join"), Ok(b"you".to_vec()));
    }

    #[tokio::test]
    async fn dropped_call_is_reported() {
        let ca = ClusterCa::generate().expect("ca");
        let ((a, _rx_a, _), (_b, mut rx_b, _)) = pair(&ca, &ca).await;
        let call = tokio::spawn(a.call(node(2), b"x".to_vec(), DEFAULT_CALL_TIMEOUT));
        match next(&mut rx_b).await {
            Inbound::Call { reply, .. } => drop(reply),
            other => panic!("expected a call, got {other:?}"),
        }
        assert_eq!(
            call.await.expect("join"),
            Err(TransportError::Dropped(node(2)))
        );
    }

    #[tokio::test]
    async fn unanswered_call_times_out() {
        let ca = ClusterCa::generate().expect("ca");
        let ((a, _rx_a, _), (_b, mut rx_b, _)) = pair(&ca, &ca).await;
        let call = tokio::spawn(a.call(node(2), b"slow".to_vec(), Duration::from_millis(500)));
        // Hold the reply without answering until the caller gave up.
        let held = next(&mut rx_b).await;
        assert_eq!(
            call.await.expect("join"),
            Err(TransportError::Timeout(node(2)))
        );
        drop(held);
    }

    #[tokio::test]
    async fn node_from_another_ca_cannot_connect() {
        let ca = ClusterCa::generate().expect("ca");
        let rogue_ca = ClusterCa::generate().expect("rogue ca");
        let ((a, mut rx_a, _), (b, mut rx_b, _)) = pair(&ca, &rogue_ca).await;
        let from_rogue = b
            .call(node(1), b"let me in".to_vec(), DEFAULT_CALL_TIMEOUT)
            .await;
        assert_eq!(from_rogue, Err(TransportError::Unreachable(node(1))));
        let to_rogue = a
            .call(node(2), b"hello?".to_vec(), DEFAULT_CALL_TIMEOUT)
            .await;
        assert_eq!(to_rogue, Err(TransportError::Unreachable(node(2))));
        b.send(node(1), b"frame".to_vec());
        a.send(node(2), b"frame".to_vec());
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(rx_a.try_recv().is_err(), "nothing reaches the cluster node");
        assert!(rx_b.try_recv().is_err(), "nothing reaches the rogue node");
    }

    #[tokio::test]
    async fn server_must_be_the_node_dialled() {
        // Node 3's address points at node 2: its certificate names node 2,
        // so the dial is refused rather than talking to the wrong node.
        let ca = ClusterCa::generate().expect("ca");
        let ((a, _rx_a, _), (b, rx_b, _)) = pair(&ca, &ca).await;
        spawn_echo(rx_b);
        a.set_peer_addr(node(3), b.local_addr());
        let response = a.call(node(3), b"x".to_vec(), DEFAULT_CALL_TIMEOUT).await;
        assert_eq!(response, Err(TransportError::Unreachable(node(3))));
    }

    #[tokio::test]
    async fn unknown_peer_is_unreachable_and_oversized_is_refused() {
        let ca = ClusterCa::generate().expect("ca");
        let ((a, _rx_a, _), _two) = pair(&ca, &ca).await;
        let response = a.call(node(9), b"x".to_vec(), DEFAULT_CALL_TIMEOUT).await;
        assert_eq!(response, Err(TransportError::Unreachable(node(9))));
        let huge = vec![0u8; MAX_FRAME_LEN + 1];
        let response = a.call(node(2), huge, DEFAULT_CALL_TIMEOUT).await;
        assert_eq!(
            response,
            Err(TransportError::FrameTooLarge {
                len: MAX_FRAME_LEN + 1
            })
        );
    }

    #[tokio::test]
    async fn disconnect_drops_the_peers_connections_and_it_can_come_back() {
        let ca = ClusterCa::generate().expect("ca");
        let ((a, rx_a, _), (b, rx_b, _)) = pair(&ca, &ca).await;
        spawn_echo(rx_a);
        spawn_echo(rx_b);
        let response = a.call(node(2), b"1".to_vec(), DEFAULT_CALL_TIMEOUT).await;
        assert_eq!(response, Ok(b"re:1".to_vec()));
        let response = b.call(node(1), b"2".to_vec(), DEFAULT_CALL_TIMEOUT).await;
        assert_eq!(response, Ok(b"re:2".to_vec()));
        let from_a = a.inner.connection(node(2)).await.expect("a's connection");
        let from_b = b.inner.connection(node(1)).await.expect("b's connection");
        b.disconnect(node(1));
        tokio::time::timeout(Duration::from_secs(5), from_a.closed())
            .await
            .expect("a's connection to b is closed by b");
        tokio::time::timeout(Duration::from_secs(5), from_b.closed())
            .await
            .expect("b's own connection to a is closed");
        // A disconnected peer may dial again.
        let response = a.call(node(2), b"3".to_vec(), DEFAULT_CALL_TIMEOUT).await;
        assert_eq!(response, Ok(b"re:3".to_vec()));
    }

    #[test]
    fn endpoint_keys_survive_a_restart_and_differ_between_nodes() {
        // What a restarted node needs to reset its peers' stale connections:
        // it recognises the connection ids its previous run issued, and
        // derives the same reset tokens. Another node does neither.
        use quinn::crypto::HmacKey;
        use quinn::ConnectionIdGenerator;
        let ca = ClusterCa::generate().expect("ca");
        let identity = ca.issue_node(node(2)).expect("issue");
        let other = ca.issue_node(node(3)).expect("issue");
        let cid = EndpointKeys::of(&identity).cid_generator().generate_cid();
        let restarted = EndpointKeys::of(&identity);
        assert!(restarted.cid_generator().validate(&cid).is_ok());
        assert!(EndpointKeys::of(&other)
            .cid_generator()
            .validate(&cid)
            .is_err());
        let token = |keys: EndpointKeys| {
            let mut signature = vec![0u8; keys.reset.signature_len()];
            keys.reset.sign(&cid, &mut signature);
            signature
        };
        assert_eq!(token(EndpointKeys::of(&identity)), token(restarted));
        assert_ne!(
            token(EndpointKeys::of(&identity)),
            token(EndpointKeys::of(&other))
        );
    }

    #[tokio::test]
    async fn reconnects_to_a_restarted_peer_at_its_new_address() {
        let ca = ClusterCa::generate().expect("ca");
        let ((a, _rx_a, _), (b, rx_b, _)) = pair(&ca, &ca).await;
        spawn_echo(rx_b);
        let response = a.call(node(2), b"1".to_vec(), DEFAULT_CALL_TIMEOUT).await;
        assert_eq!(response, Ok(b"re:1".to_vec()));
        drop(b);
        let (b, mut rx_b, _) = bind(
            node(2),
            localhost(),
            ca.issue_node(node(2)).expect("issue"),
            BTreeMap::new(),
        )
        .await
        .expect("rebind 2");
        a.set_peer_addr(node(2), b.local_addr());
        let call = tokio::spawn(a.call(node(2), b"2".to_vec(), DEFAULT_CALL_TIMEOUT));
        match next(&mut rx_b).await {
            Inbound::Call { from, reply, .. } => {
                assert_eq!(from, node(1));
                reply.send(b"back".to_vec()).expect("caller waits");
            }
            other => panic!("expected a call, got {other:?}"),
        }
        assert_eq!(call.await.expect("join"), Ok(b"back".to_vec()));
        a.send(node(2), b"frame".to_vec());
        match next(&mut rx_b).await {
            Inbound::Frame { from, frame } => {
                assert_eq!(from, node(1));
                assert_eq!(frame, b"frame".to_vec());
            }
            other => panic!("expected a frame, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn oversized_frame_on_the_wire_is_refused() {
        let ca = ClusterCa::generate().expect("ca");
        let ((a, _rx_a, _), (_b, mut rx_b, _)) = pair(&ca, &ca).await;
        // Forge a stream announcing one byte more than the limit.
        let conn = a.inner.connection(node(2)).await.expect("connect");
        let mut forged = conn.open_uni().await.expect("open stream");
        let announced = u32::try_from(MAX_FRAME_LEN + 1).expect("limit fits u32");
        forged
            .write_all(&announced.to_be_bytes())
            .await
            .expect("write prefix");
        forged.write_all(&[0u8; 16]).await.expect("write body");
        // The regular frame path still works, and is all that arrives.
        a.send(node(2), b"ok".to_vec());
        match next(&mut rx_b).await {
            Inbound::Frame { from, frame } => {
                assert_eq!(from, node(1));
                assert_eq!(frame, b"ok".to_vec());
            }
            other => panic!("expected a frame, got {other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(
            rx_b.try_recv().is_err(),
            "the oversized frame was delivered"
        );
        assert_eq!(
            forged.stopped().await,
            Ok(Some(VarInt::from_u32(CODE_REFUSED))),
            "the receiver stops the forged stream"
        );
    }

    #[tokio::test]
    async fn node_presenting_a_foreign_certificate_is_refused_by_the_server() {
        // The rogue trusts the cluster's CA (so it accepts node 1 as server),
        // but its own certificate comes from another CA.
        let ca = ClusterCa::generate().expect("ca");
        let rogue_ca = ClusterCa::generate().expect("rogue ca");
        let (a, mut rx_a, mut clients_a) = bind(
            node(1),
            localhost(),
            ca.issue_node(node(1)).expect("issue"),
            BTreeMap::new(),
        )
        .await
        .expect("bind 1");
        let mut rogue_identity = rogue_ca.issue_node(node(2)).expect("issue");
        rogue_identity.trusted_cas_der = vec![ca.cert_der()];
        let (rogue, _rx, _clients) = bind(
            node(2),
            localhost(),
            rogue_identity,
            BTreeMap::from([(node(1), a.local_addr())]),
        )
        .await
        .expect("bind rogue");
        let response = rogue
            .call(node(1), b"let me in".to_vec(), DEFAULT_CALL_TIMEOUT)
            .await;
        assert!(
            matches!(
                response,
                Err(TransportError::Unreachable(_) | TransportError::Dropped(_))
            ),
            "{response:?}"
        );
        rogue.send(node(1), b"frame".to_vec());
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(rx_a.try_recv().is_err(), "nothing reaches the node channel");
        assert!(
            clients_a.try_recv().is_err(),
            "nothing reaches the client channel"
        );
    }

    /// Calls until one succeeds or 10 s passed; returns the last result.
    async fn call_eventually(
        from: &QuicTransport,
        to: NodeId,
        request: &[u8],
    ) -> Result<Vec<u8>, TransportError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let result = from.call(to, request.to_vec(), DEFAULT_CALL_TIMEOUT).await;
            if result.is_ok() || Instant::now() >= deadline {
                return result;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `ca`'s certificate for `node`, trusting `trusted`.
    fn identity(ca: &ClusterCa, node_id: NodeId, trusted: &[&ClusterCa]) -> TlsIdentity {
        let mut identity = ca.issue_node(node_id).expect("issue");
        identity.trusted_cas_der = trusted.iter().map(|ca| ca.cert_der()).collect();
        identity
    }

    #[tokio::test]
    async fn ca_rotation_by_reloading_identities() {
        let ca1 = ClusterCa::generate().expect("ca1");
        let ca2 = ClusterCa::generate().expect("ca2");
        let ((a, rx_a, _), (b, rx_b, _)) = pair(&ca1, &ca1).await;
        spawn_echo(rx_a);
        spawn_echo(rx_b);
        assert_eq!(
            a.call(node(2), b"1".to_vec(), DEFAULT_CALL_TIMEOUT).await,
            Ok(b"re:1".to_vec())
        );
        assert_eq!(
            b.call(node(1), b"2".to_vec(), DEFAULT_CALL_TIMEOUT).await,
            Ok(b"re:2".to_vec())
        );

        // Stage CA2: both trust {CA1, CA2}; node 1 already presents a CA2 cert.
        b.reload_identity(identity(&ca1, node(2), &[&ca1, &ca2]))
            .expect("stage 2");
        a.reload_identity(identity(&ca2, node(1), &[&ca1, &ca2]))
            .expect("stage 1");
        assert_eq!(
            call_eventually(&a, node(2), b"3").await,
            Ok(b"re:3".to_vec())
        );
        assert_eq!(
            call_eventually(&b, node(1), b"4").await,
            Ok(b"re:4".to_vec())
        );

        // Node 3, with a CA1 certificate and the staged trust, talks to node 1.
        let (c, _rx_c, _) = bind(
            node(3),
            localhost(),
            identity(&ca1, node(3), &[&ca1, &ca2]),
            BTreeMap::from([(node(1), a.local_addr())]),
        )
        .await
        .expect("bind 3");
        assert_eq!(
            c.call(node(1), b"5".to_vec(), DEFAULT_CALL_TIMEOUT).await,
            Ok(b"re:5".to_vec())
        );

        // Finalize: both trust only CA2 and present CA2 certificates.
        a.reload_identity(identity(&ca2, node(1), &[&ca2]))
            .expect("finalize 1");
        b.reload_identity(identity(&ca2, node(2), &[&ca2]))
            .expect("finalize 2");
        assert_eq!(
            call_eventually(&a, node(2), b"6").await,
            Ok(b"re:6".to_vec())
        );
        assert_eq!(
            call_eventually(&b, node(1), b"7").await,
            Ok(b"re:7".to_vec())
        );

        // Node 3 still holds only a CA1 certificate: its existing connection
        // was closed, and it cannot make a new one, in either direction.
        let refused = c.call(node(1), b"8".to_vec(), DEFAULT_CALL_TIMEOUT).await;
        assert!(refused.is_err(), "{refused:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            c.call(node(1), b"9".to_vec(), DEFAULT_CALL_TIMEOUT).await,
            Err(TransportError::Unreachable(node(1)))
        );
        a.set_peer_addr(node(3), c.local_addr());
        assert_eq!(
            a.call(node(3), b"10".to_vec(), DEFAULT_CALL_TIMEOUT).await,
            Err(TransportError::Unreachable(node(3)))
        );
    }

    #[tokio::test]
    async fn unusable_identity_is_refused_and_the_old_one_kept() {
        let ca = ClusterCa::generate().expect("ca");
        let ((a, _rx_a, _), (_b, rx_b, _)) = pair(&ca, &ca).await;
        spawn_echo(rx_b);
        let mut no_trust = ca.issue_node(node(1)).expect("issue");
        no_trust.trusted_cas_der.clear();
        assert!(matches!(
            a.reload_identity(no_trust),
            Err(QuicError::Tls(_))
        ));
        let mut bad_key = ca.issue_node(node(1)).expect("issue");
        bad_key.key_der = b"not a key".to_vec();
        assert!(matches!(a.reload_identity(bad_key), Err(QuicError::Tls(_))));
        assert_eq!(
            a.call(node(2), b"x".to_vec(), DEFAULT_CALL_TIMEOUT).await,
            Ok(b"re:x".to_vec())
        );
    }

    #[tokio::test]
    async fn garbage_datagrams_do_not_disturb_the_endpoint() {
        let ca = ClusterCa::generate().expect("ca");
        let ((a, _rx_a, _), (b, rx_b, _)) = pair(&ca, &ca).await;
        spawn_echo(rx_b);
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp socket");
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(42);
        for i in 0..2000u32 {
            let len = 1 + usize::try_from(rng.next_u32() % 1500).expect("fits");
            let mut datagram = vec![0u8; len];
            rng.fill_bytes(&mut datagram);
            // A third look like QUIC v1 long-header Initial packets, padded
            // to the size a server considers.
            if i % 3 == 0 {
                datagram.resize(1200.max(len), 0);
                datagram[0] = 0xc0 | (datagram[0] & 0x0f);
                datagram[1..5].copy_from_slice(&1u32.to_be_bytes());
                datagram[5] = 8;
            }
            socket
                .send_to(&datagram, b.local_addr())
                .expect("send datagram");
        }
        assert_eq!(
            a.call(node(2), b"still here?".to_vec(), DEFAULT_CALL_TIMEOUT)
                .await,
            Ok(b"re:still here?".to_vec())
        );
    }

    #[test]
    fn certificate_names_its_node() {
        let ca = ClusterCa::generate().expect("ca");
        let identity = ca.issue_node(node(42)).expect("issue");
        let cert = CertificateDer::from(identity.cert_chain_der[0].clone());
        assert_eq!(node_id_from_cert(&cert), Some(node(42)));
        let ca_cert = CertificateDer::from(ca.cert_der());
        assert_eq!(node_id_from_cert(&ca_cert), None);
    }

    #[test]
    fn node_names_parse_only_in_canonical_form() {
        assert_eq!(parse_node_name(b"node-7.keel"), Some(node(7)));
        assert_eq!(parse_node_name(b"node-0.keel"), None);
        assert_eq!(parse_node_name(b"node-07.keel"), None);
        assert_eq!(parse_node_name(b"node-+7.keel"), None);
        assert_eq!(parse_node_name(b"node-.keel"), None);
        assert_eq!(parse_node_name(b"node-7.keel.evil"), None);
        assert_eq!(parse_node_name(b"node-99999999999999999999.keel"), None);
    }
}
