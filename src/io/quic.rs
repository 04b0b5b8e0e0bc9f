//! The production binding of [`Transport`]: QUIC (quinn) with mutual TLS 1.3.
//!
//! Every node holds a certificate signed by a cluster CA whose DNS subject
//! alternative name (and common name) is `node-<id>.keel`, `<id>` being the
//! node id in decimal without leading zeros (see [`node_dns_name`]). Both ends
//! of every connection present certificates and verify them against the
//! trusted CA set, so a node without a cluster-signed certificate cannot even
//! finish the handshake (DESIGN.md §6). A dialling node also checks that the
//! server's certificate names the node it meant to reach, and an accepting
//! node takes the sender of everything arriving on a connection from the
//! client certificate, never from the bytes: a peer cannot claim another id.
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

use crate::core::ids::NodeId;
use crate::io::transport::{
    CallFuture, Inbound, InboundReceiver, Transport, TransportError, MAX_FRAME_LEN,
};
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use rustls::client::{verify_server_name, WebPkiServerVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::RootCertStore;
use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// The application protocol spoken on keel's QUIC connections; a peer that
/// does not offer it fails the handshake instead of talking past us.
pub const ALPN: &[u8] = b"keel/1";

/// How long dialling a peer may take before it counts as a failed attempt,
/// so one dead peer cannot hold up that peer's frame queue for long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// First wait after a failed dial; doubled per consecutive failure.
const BACKOFF_BASE: Duration = Duration::from_millis(50);

/// Longest wait between dials to an unreachable peer.
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// A connection with no traffic for this long is considered dead.
const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Keep-alives stop idle-but-healthy connections from timing out.
const KEEP_ALIVE: Duration = Duration::from_secs(3);

/// Application error code for a stream or connection refused by protocol
/// (oversized frame, malformed request, unusable certificate).
const CODE_REFUSED: u32 = 1;

/// Application error code for a call the node dropped without answering.
const CODE_DROPPED: u32 = 2;

/// Application error code when the local transport shuts down.
const CODE_SHUTDOWN: u32 = 3;

/// What can go wrong setting up the QUIC binding.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
pub enum QuicError {
    #[error("generating or signing a certificate failed: {0}")]
    Certificate(String),
    #[error("the TLS identity (certificates, key or CA set) is unusable: {0}")]
    Tls(String),
    #[error("binding the QUIC endpoint failed: {0}")]
    Bind(String),
}

/// A node's TLS identity: its certificate chain (leaf first) and PKCS#8 or
/// SEC1/PKCS#1 private key, plus the trusted CA set, all DER-encoded.
///
/// `Debug` is written by hand so that the private key never ends up in logs.
#[derive(Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TlsIdentity {
    pub cert_chain_der: Vec<Vec<u8>>,
    pub key_der: Vec<u8>,
    pub trusted_cas_der: Vec<Vec<u8>>,
}

impl fmt::Debug for TlsIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsIdentity")
            .field("cert_chain_der", &self.cert_chain_der)
            .field("key_der", &"<redacted>")
            .field("trusted_cas_der", &self.trusted_cas_der)
            .finish()
    }
}

/// The DNS name a node's certificate carries, as SAN and common name:
/// `node-<id>.keel`, the id in decimal.
pub fn node_dns_name(node: NodeId) -> String {
    format!("node-{}.keel", node.get())
}

/// Test/bootstrap helper: a self-signed cluster CA and node certificates
/// signed by it, each naming its node through [`node_dns_name`].
pub struct ClusterCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClusterCa").finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// Generates a fresh CA key and its self-signed certificate.
    pub fn generate() -> Result<Self, QuicError> {
        let key = rcgen::KeyPair::generate().map_err(cert_error)?;
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "keel cluster CA");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let issuer = rcgen::CertifiedIssuer::self_signed(params, key).map_err(cert_error)?;
        Ok(Self { issuer })
    }

    /// The CA certificate, DER-encoded: what nodes put in their trusted set.
    pub fn cert_der(&self) -> Vec<u8> {
        self.issuer.der().to_vec()
    }

    /// Issues a certificate for `node` with a fresh key, valid both as TLS
    /// server and client (every node is both), trusting only this CA.
    pub fn issue_node(&self, node: NodeId) -> Result<TlsIdentity, QuicError> {
        let key = rcgen::KeyPair::generate().map_err(cert_error)?;
        let name = node_dns_name(node);
        let mut params = rcgen::CertificateParams::new(vec![name.clone()]).map_err(cert_error)?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::ExplicitNoCa;
        params.key_usages = vec![rcgen::KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = params.signed_by(&key, &self.issuer).map_err(cert_error)?;
        Ok(TlsIdentity {
            cert_chain_der: vec![cert.der().to_vec()],
            key_der: key.serialize_der(),
            trusted_cas_der: vec![self.cert_der()],
        })
    }
}

fn cert_error(err: rcgen::Error) -> QuicError {
    QuicError::Certificate(err.to_string())
}

fn tls_error(err: impl fmt::Display) -> QuicError {
    QuicError::Tls(err.to_string())
}

/// Builds the quinn server and client configurations for `identity`: TLS 1.3
/// only, client certificates required, both directions verified against the
/// trusted CA set.
fn quic_configs(
    identity: &TlsIdentity,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), QuicError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = RootCertStore::empty();
    for ca in &identity.trusted_cas_der {
        roots
            .add(CertificateDer::from(ca.clone()))
            .map_err(tls_error)?;
    }
    let roots = Arc::new(roots);
    let chain: Vec<CertificateDer<'static>> = identity
        .cert_chain_der
        .iter()
        .map(|der| CertificateDer::from(der.clone()))
        .collect();
    let key = PrivateKeyDer::try_from(identity.key_der.clone()).map_err(tls_error)?;

    let client_verifier =
        WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
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
    let mut client = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_error)?
        .with_webpki_verifier(server_verifier)
        .with_client_auth_cert(chain, key)
        .map_err(tls_error)?;
    client.alpn_protocols = vec![ALPN.to_vec()];

    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(IDLE_TIMEOUT.try_into().map_err(tls_error)?))
        .keep_alive_interval(Some(KEEP_ALIVE));
    let transport = Arc::new(transport);

    let server_crypto =
        quinn::crypto::rustls::QuicServerConfig::try_from(server).map_err(tls_error)?;
    let mut server_config = quinn::ServerConfig::with_crypto(Arc::new(server_crypto));
    server_config.transport_config(transport.clone());
    let client_crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(client).map_err(tls_error)?;
    let mut client_config = quinn::ClientConfig::new(Arc::new(client_crypto));
    client_config.transport_config(transport);
    Ok((server_config, client_config))
}

/// The node id named by a peer's (already verified) leaf certificate.
///
/// The DER is scanned for DNS-name entries (context tag `[2]`, short length)
/// of the form `node-<id>.keel`; the candidate is then confirmed with webpki's
/// own subject-name check, so a look-alike byte sequence elsewhere in the
/// certificate cannot pass. A certificate naming two different ids names none.
fn node_id_from_cert(cert: &CertificateDer<'_>) -> Option<NodeId> {
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
    let parsed = ParsedCertificate::try_from(cert).ok()?;
    let name = ServerName::try_from(node_dns_name(node)).ok()?;
    verify_server_name(&parsed, &name).ok()?;
    Some(node)
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

/// The node id of the peer on an established connection, from its leaf
/// certificate.
fn peer_node(conn: &Connection) -> Option<NodeId> {
    let identity = conn.peer_identity()?;
    let chain = identity.downcast::<Vec<CertificateDer<'static>>>().ok()?;
    node_id_from_cert(chain.first()?)
}

/// Why a length-prefixed frame could not be read.
enum ReadFailure {
    /// The prefix announced more than [`MAX_FRAME_LEN`] bytes.
    TooLarge(usize),
    /// The stream was reset, stopped or ended mid-frame, or the connection died.
    Stream,
}

/// Reads one length-prefixed frame; `Ok(None)` when the stream ended cleanly
/// before a new frame began.
async fn read_frame(recv: &mut RecvStream) -> Result<Option<Vec<u8>>, ReadFailure> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(_) => return Err(ReadFailure::Stream),
    }
    let len = usize::try_from(u32::from_be_bytes(prefix)).map_err(|_| ReadFailure::Stream)?;
    if len > MAX_FRAME_LEN {
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
async fn write_frame(send: &mut SendStream, frame: &[u8]) -> Result<(), ()> {
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
    /// No new dial to this address before this instant.
    retry_at: Option<(Instant, SocketAddr)>,
}

/// State shared by the transport handle, its per-peer frame writers and its
/// in-flight calls.
struct Inner {
    me: NodeId,
    endpoint: Endpoint,
    client_config: quinn::ClientConfig,
    peer_addrs: Mutex<BTreeMap<NodeId, SocketAddr>>,
    links: Mutex<BTreeMap<NodeId, Arc<tokio::sync::Mutex<PeerLink>>>>,
    /// Per-peer queues feeding the task that writes one-way frames in order.
    frame_queues: Mutex<BTreeMap<NodeId, mpsc::UnboundedSender<Vec<u8>>>>,
}

/// Locks a std mutex, ignoring poisoning: every critical section here is a
/// single map operation, so a panicking holder cannot leave it inconsistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
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
        if let Some((conn, conn_addr)) = &link.conn {
            if *conn_addr == addr && conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
        }
        link.conn = None;
        let now = Instant::now();
        if let Some((retry_at, failed_addr)) = link.retry_at {
            if failed_addr == addr && now < retry_at {
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
                link.retry_at = Some((Instant::now() + backoff(link.failures), addr));
                Err(TransportError::Unreachable(to))
            }
        }
    }

    /// One dial attempt, requiring the server to present `to`'s certificate.
    async fn dial(&self, to: NodeId, addr: SocketAddr) -> Option<Connection> {
        let connecting =
            match self
                .endpoint
                .connect_with(self.client_config.clone(), addr, &node_dns_name(to))
            {
                Ok(connecting) => connecting,
                Err(err) => {
                    tracing::debug!(me = %self.me, %to, %addr, %err, "cannot dial peer");
                    return None;
                }
            };
        match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
            Ok(Ok(conn)) => Some(conn),
            Ok(Err(err)) => {
                tracing::debug!(me = %self.me, %to, %addr, %err, "dialling peer failed");
                None
            }
            Err(_elapsed) => {
                tracing::debug!(me = %self.me, %to, %addr, "dialling peer timed out");
                None
            }
        }
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
        match read_frame(&mut recv).await {
            Ok(Some(response)) => Ok(response),
            Err(ReadFailure::TooLarge(len)) => Err(TransportError::FrameTooLarge { len }),
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

/// Accepts connections until the endpoint closes.
async fn accept_loop(endpoint: Endpoint, inbound: mpsc::UnboundedSender<Inbound>) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(serve_connection(incoming, inbound.clone()));
    }
}

/// Serves one incoming connection: its sender is the node named by its
/// client certificate, and every stream on it is attributed to that node.
async fn serve_connection(incoming: quinn::Incoming, inbound: mpsc::UnboundedSender<Inbound>) {
    let conn = match incoming.await {
        Ok(conn) => conn,
        Err(err) => {
            tracing::debug!(%err, "incoming connection failed its handshake");
            return;
        }
    };
    let Some(from) = peer_node(&conn) else {
        tracing::warn!(remote = %conn.remote_address(), "peer certificate names no node id");
        conn.close(
            VarInt::from_u32(CODE_REFUSED),
            b"certificate names no node id",
        );
        return;
    };
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

/// Delivers the frames of one unidirectional stream, in order.
async fn read_frames(from: NodeId, mut recv: RecvStream, inbound: mpsc::UnboundedSender<Inbound>) {
    loop {
        match read_frame(&mut recv).await {
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

/// Serves one call: reads the request, hands it to the node and writes the
/// answer, or resets the stream if the node drops the call.
async fn serve_call(
    from: NodeId,
    mut send: SendStream,
    mut recv: RecvStream,
    inbound: mpsc::UnboundedSender<Inbound>,
) {
    let request = match read_frame(&mut recv).await {
        Ok(Some(request)) => request,
        Ok(None) | Err(_) => {
            let _ = recv.stop(VarInt::from_u32(CODE_REFUSED));
            let _ = send.reset(VarInt::from_u32(CODE_REFUSED));
            return;
        }
    };
    let (reply, response) = oneshot::channel();
    if inbound
        .send(Inbound::Call {
            from,
            request,
            reply,
        })
        .is_err()
    {
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
            tracing::warn!(%from, len = response.len(), "refusing to send oversized response");
            let _ = send.reset(VarInt::from_u32(CODE_REFUSED));
        }
        Err(_dropped) => {
            let _ = send.reset(VarInt::from_u32(CODE_DROPPED));
        }
    }
}

/// A node's QUIC endpoint. Dropping it closes the endpoint and every
/// connection and stops its background tasks.
pub struct QuicTransport {
    inner: Arc<Inner>,
    local_addr: SocketAddr,
}

/// Binds a QUIC endpoint on `listen` with mutual TLS 1.3 (client
/// certificates required and verified against the identity's CA set; ALPN
/// [`ALPN`]) and starts accepting. `peers` gives the addresses to dial; they
/// can be changed later with [`QuicTransport::set_peer_addr`]. Must be called
/// within a tokio runtime.
pub async fn bind(
    me: NodeId,
    listen: SocketAddr,
    identity: TlsIdentity,
    peers: BTreeMap<NodeId, SocketAddr>,
) -> Result<(Arc<QuicTransport>, InboundReceiver), QuicError> {
    let (server_config, client_config) = quic_configs(&identity)?;
    let endpoint =
        Endpoint::server(server_config, listen).map_err(|e| QuicError::Bind(e.to_string()))?;
    let local_addr = endpoint
        .local_addr()
        .map_err(|e| QuicError::Bind(e.to_string()))?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(accept_loop(endpoint.clone(), tx));
    let inner = Arc::new(Inner {
        me,
        endpoint,
        client_config,
        peer_addrs: Mutex::new(peers),
        links: Mutex::new(BTreeMap::new()),
        frame_queues: Mutex::new(BTreeMap::new()),
    });
    Ok((Arc::new(QuicTransport { inner, local_addr }), rx))
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
    use crate::io::transport::{spawn_echo, DEFAULT_CALL_TIMEOUT};

    fn node(id: u64) -> NodeId {
        NodeId::new(id).expect("test node ids are non-zero")
    }

    fn localhost() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 0))
    }

    /// Binds nodes 1 and 2 with identities from `ca1` and `ca2`, each knowing
    /// the other's address.
    async fn pair(
        ca1: &ClusterCa,
        ca2: &ClusterCa,
    ) -> (
        (Arc<QuicTransport>, InboundReceiver),
        (Arc<QuicTransport>, InboundReceiver),
    ) {
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
        let ((a, _rx_a), (_b, mut rx_b)) = pair(&ca, &ca).await;
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
        let ((a, rx_a), (b, rx_b)) = pair(&ca, &ca).await;
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
        let ((a, _rx_a), (_b, mut rx_b)) = pair(&ca, &ca).await;
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
        let ((a, _rx_a), (_b, mut rx_b)) = pair(&ca, &ca).await;
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
        let ((a, _rx_a), (_b, mut rx_b)) = pair(&ca, &ca).await;
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
        let ((a, mut rx_a), (b, mut rx_b)) = pair(&ca, &rogue_ca).await;
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
        let ((a, _rx_a), (b, rx_b)) = pair(&ca, &ca).await;
        spawn_echo(rx_b);
        a.set_peer_addr(node(3), b.local_addr());
        let response = a.call(node(3), b"x".to_vec(), DEFAULT_CALL_TIMEOUT).await;
        assert_eq!(response, Err(TransportError::Unreachable(node(3))));
    }

    #[tokio::test]
    async fn unknown_peer_is_unreachable_and_oversized_is_refused() {
        let ca = ClusterCa::generate().expect("ca");
        let ((a, _rx_a), _two) = pair(&ca, &ca).await;
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
    async fn reconnects_to_a_restarted_peer_at_its_new_address() {
        let ca = ClusterCa::generate().expect("ca");
        let ((a, _rx_a), (b, rx_b)) = pair(&ca, &ca).await;
        spawn_echo(rx_b);
        let response = a.call(node(2), b"1".to_vec(), DEFAULT_CALL_TIMEOUT).await;
        assert_eq!(response, Ok(b"re:1".to_vec()));
        drop(b);
        let (b, mut rx_b) = bind(
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
        let ((a, _rx_a), (_b, mut rx_b)) = pair(&ca, &ca).await;
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

    #[test]
    fn tls_identity_debug_hides_the_key() {
        let identity = TlsIdentity {
            cert_chain_der: vec![],
            key_der: vec![0xAB; 4],
            trusted_cas_der: vec![],
        };
        let shown = format!("{identity:?}");
        assert!(shown.contains("<redacted>"));
        assert!(!shown.contains("171"));
    }
}
