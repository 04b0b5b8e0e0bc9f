//! The client side of keel's QUIC protocol: how the CLI, the benchmarks and
//! joining nodes talk to a node (DESIGN.md §6, §9).
//!
//! A client only makes calls, with the same framing as node-to-node calls
//! (a length-prefixed request on a fresh bidirectional stream, answered
//! length-prefixed on the same stream), over one reused connection per
//! address. TLS 1.3 only, ALPN [`crate::io::quic::ALPN`]. Two kinds of client:
//! - [`QuicClient::admin`] presents an admin certificate and trusts the
//!   cluster's CA set;
//! - [`QuicClient::joiner`] has no certificate yet and trusts exactly one CA,
//!   named by its SHA-256 fingerprint in the join token. It accepts a server
//!   only if the chain the server presents contains that CA certificate and
//!   the server's leaf verifies with it as the only trust root, so a man in
//!   the middle cannot take the token.
//!
//! Either way the server's leaf must name *some* node (`node-<id>.keel`):
//! the client may only know an address, not which node is behind it.

use crate::io::pki::{node_dns_name, TlsIdentity};
use crate::io::quic::{
    chain_and_key, client_builder, crypto_provider, is_tls_failure, lock, node_id_from_cert,
    quic_client_config, read_frame, root_store, write_frame, QuicError, ReadFailure, CODE_SHUTDOWN,
    CONNECT_TIMEOUT, MAX_ANONYMOUS_REQUEST_LEN,
};
use crate::io::transport::MAX_FRAME_LEN;
use quinn::{Connection, ConnectionError, Endpoint, RecvStream, SendStream, VarInt};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, SignatureScheme};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

/// The name the client sends as SNI. Servers have a single certificate and
/// ignore it; which node answers is learnt from its certificate.
const SNI: &str = "keel";

/// What can go wrong for a client.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClientError {
    #[error("the client's TLS credentials are unusable: {0}")]
    Credentials(String),
    #[error("opening the client's UDP socket failed: {0}")]
    Bind(String),
    #[error("cannot connect to {addr}: {cause}")]
    Connect { addr: SocketAddr, cause: String },
    #[error("the TLS handshake with {addr} failed: {cause}")]
    Handshake { addr: SocketAddr, cause: String },
    #[error("the call to {addr} got no answer in time")]
    Timeout { addr: SocketAddr },
    #[error("the node at {addr} closed the call without answering: it refused or dropped the request, or the connection was lost")]
    Dropped { addr: SocketAddr },
    #[error("a frame of {len} bytes exceeds the {max}-byte limit")]
    FrameTooLarge { len: usize, max: usize },
}

fn credentials(err: QuicError) -> ClientError {
    ClientError::Credentials(err.to_string())
}

/// Which CA a client trusts for the server's certificate.
#[derive(Debug)]
enum Trust {
    /// The cluster's CA set (admin clients).
    Cas(Arc<WebPkiServerVerifier>),
    /// Exactly the CA with this SHA-256 fingerprint, found in the chain the
    /// server presents (joiners).
    Fingerprint([u8; 32]),
}

/// Verifies that the server's leaf names some node and chains to the trusted
/// CA; signatures are checked by webpki.
#[derive(Debug)]
struct NodeServerVerifier {
    trust: Trust,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for NodeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let node = node_id_from_cert(end_entity).ok_or(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName,
        ))?;
        let name = ServerName::try_from(node_dns_name(node))
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::NotValidForName))?;
        match &self.trust {
            Trust::Cas(verifier) => {
                verifier.verify_server_cert(end_entity, intermediates, &name, ocsp_response, now)
            }
            Trust::Fingerprint(fingerprint) => {
                let unknown = || rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
                let is_root = |cert: &CertificateDer<'_>| {
                    crate::core::cache::fingerprint(cert.as_ref()) == *fingerprint
                };
                let root = intermediates
                    .iter()
                    .find(|c| is_root(c))
                    .ok_or_else(unknown)?;
                let mut roots = rustls::RootCertStore::empty();
                roots
                    .add(root.clone().into_owned())
                    .map_err(|_| unknown())?;
                let verifier = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(roots),
                    self.provider.clone(),
                )
                .build()
                .map_err(|_| unknown())?;
                let rest: Vec<CertificateDer<'_>> = intermediates
                    .iter()
                    .filter(|c| !is_root(c))
                    .cloned()
                    .collect();
                verifier.verify_server_cert(end_entity, &rest, &name, ocsp_response, now)
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// A client of keel nodes. Dropping it closes its connections.
pub struct QuicClient {
    endpoint: Endpoint,
    config: quinn::ClientConfig,
    joiner: bool,
    /// One connection per address, each behind its own lock so that dialling
    /// one address never waits for another.
    conns: Mutex<HashMap<SocketAddr, Arc<tokio::sync::Mutex<Option<Connection>>>>>,
}

impl std::fmt::Debug for QuicClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QuicClient")
            .field("joiner", &self.joiner)
            .finish_non_exhaustive()
    }
}

impl QuicClient {
    /// An admin client: presents `identity` (an admin certificate), verifies
    /// servers against `identity.trusted_cas_der` and requires the server's
    /// leaf to name some node. Must be called within a tokio runtime.
    pub fn admin(identity: &TlsIdentity) -> Result<Self, ClientError> {
        let provider = crypto_provider();
        let roots = Arc::new(root_store(&identity.trusted_cas_der).map_err(credentials)?);
        let webpki = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .build()
            .map_err(|e| ClientError::Credentials(e.to_string()))?;
        let verifier = NodeServerVerifier {
            trust: Trust::Cas(webpki),
            provider: provider.clone(),
        };
        let (chain, key) = chain_and_key(identity).map_err(credentials)?;
        let tls = client_builder(provider)
            .map_err(credentials)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_client_auth_cert(chain, key)
            .map_err(|e| ClientError::Credentials(e.to_string()))?;
        Self::new(tls, false)
    }

    /// A joiner's client, which has no certificate: presents none, and
    /// accepts a server only if the chain it presents contains a certificate
    /// whose SHA-256 is `ca_fingerprint`, the leaf verifies with that
    /// certificate as the only trust root, and the leaf names some node.
    /// Requests are limited to [`MAX_ANONYMOUS_REQUEST_LEN`] bytes, as the
    /// server enforces. Must be called within a tokio runtime.
    pub fn joiner(ca_fingerprint: [u8; 32]) -> Result<Self, ClientError> {
        let provider = crypto_provider();
        let verifier = NodeServerVerifier {
            trust: Trust::Fingerprint(ca_fingerprint),
            provider: provider.clone(),
        };
        let tls = client_builder(provider)
            .map_err(credentials)?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(verifier))
            .with_no_client_auth();
        Self::new(tls, true)
    }

    fn new(tls: rustls::ClientConfig, joiner: bool) -> Result<Self, ClientError> {
        let config = quic_client_config(tls).map_err(credentials)?;
        let endpoint = Endpoint::client(SocketAddr::from(([0, 0, 0, 0], 0)))
            .map_err(|e| ClientError::Bind(e.to_string()))?;
        Ok(Self {
            endpoint,
            config,
            joiner,
            conns: Mutex::new(HashMap::new()),
        })
    }

    /// The largest request this client may send.
    fn max_request(&self) -> usize {
        if self.joiner {
            MAX_ANONYMOUS_REQUEST_LEN
        } else {
            MAX_FRAME_LEN
        }
    }

    /// One call to the node at `addr`, waiting at most `timeout` for the
    /// whole of it. Reuses one connection per address and reconnects if it
    /// died. Running out of time before the request could be sent (a dead
    /// address never answers the handshake) is a [`ClientError::Connect`]:
    /// nothing reached the node, so the caller may try another.
    /// [`ClientError::Timeout`] means the request was sent and its outcome is
    /// unknown; such a call is never retried.
    pub async fn call(
        &self,
        addr: SocketAddr,
        request: Vec<u8>,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClientError> {
        let max = self.max_request();
        if request.len() > max {
            return Err(ClientError::FrameTooLarge {
                len: request.len(),
                max,
            });
        }
        let deadline = Instant::now() + timeout;
        let (conn, send, recv) = self.open_stream(addr, deadline).await?;
        tokio::time::timeout_at(deadline, self.exchange(addr, &conn, send, recv, &request))
            .await
            .unwrap_or(Err(ClientError::Timeout { addr }))
    }

    /// A fresh bidirectional stream to `addr`, connecting (once more, if the
    /// cached connection turns out dead) before `deadline`.
    async fn open_stream(
        &self,
        addr: SocketAddr,
        deadline: Instant,
    ) -> Result<(Connection, SendStream, RecvStream), ClientError> {
        let conn = self.connection(addr, deadline).await?;
        match tokio::time::timeout_at(deadline, conn.open_bi()).await {
            Ok(Ok((send, recv))) => return Ok((conn, send, recv)),
            Ok(Err(_)) => {
                if let Some(err) = self.handshake_failure(addr, &conn) {
                    return Err(err);
                }
            }
            Err(_elapsed) => return Err(no_answer(addr)),
        }
        // The cached connection died before anything was sent: once more
        // on a fresh one.
        let conn = self.connection(addr, deadline).await?;
        match tokio::time::timeout_at(deadline, conn.open_bi()).await {
            Ok(Ok((send, recv))) => Ok((conn, send, recv)),
            Ok(Err(_)) => Err(self.lost(addr, &conn)),
            Err(_elapsed) => Err(no_answer(addr)),
        }
    }

    /// Sends the request on an open stream and reads the answer.
    async fn exchange(
        &self,
        addr: SocketAddr,
        conn: &Connection,
        mut send: SendStream,
        mut recv: RecvStream,
        request: &[u8],
    ) -> Result<Vec<u8>, ClientError> {
        if write_frame(&mut send, request).await.is_err() || send.finish().is_err() {
            return Err(self.lost(addr, conn));
        }
        match read_frame(&mut recv, MAX_FRAME_LEN).await {
            Ok(Some(response)) => Ok(response),
            Err(ReadFailure::TooLarge(len)) => Err(ClientError::FrameTooLarge {
                len,
                max: MAX_FRAME_LEN,
            }),
            Ok(None) | Err(ReadFailure::Stream) => Err(self.lost(addr, conn)),
        }
    }

    /// The live connection to `addr`, dialling one if there is none; a dial
    /// gets at most [`CONNECT_TIMEOUT`], and never past `deadline`.
    async fn connection(
        &self,
        addr: SocketAddr,
        deadline: Instant,
    ) -> Result<Connection, ClientError> {
        let slot = lock(&self.conns).entry(addr).or_default().clone();
        let mut slot = slot.lock().await;
        if let Some(conn) = slot.as_ref() {
            if conn.close_reason().is_none() {
                return Ok(conn.clone());
            }
        }
        *slot = None;
        let connecting = self
            .endpoint
            .connect_with(self.config.clone(), addr, SNI)
            .map_err(|e| ClientError::Connect {
                addr,
                cause: e.to_string(),
            })?;
        let give_up = deadline.min(Instant::now() + CONNECT_TIMEOUT);
        let conn = match tokio::time::timeout_at(give_up, connecting).await {
            Ok(Ok(conn)) => conn,
            Ok(Err(err)) => return Err(self.connect_error(addr, &err)),
            Err(_elapsed) => return Err(no_answer(addr)),
        };
        *slot = Some(conn.clone());
        Ok(conn)
    }

    /// Why establishing a connection failed, in the operator's terms.
    fn connect_error(&self, addr: SocketAddr, err: &ConnectionError) -> ClientError {
        if let Some(cause) = self.tls_failure_cause(err) {
            return ClientError::Handshake { addr, cause };
        }
        let cause = match err {
            ConnectionError::TimedOut => "no answer; is a keel node listening there?".to_owned(),
            other => other.to_string(),
        };
        ClientError::Connect { addr, cause }
    }

    /// The handshake error behind a connection that is closed, if TLS is
    /// why it closed (a server may refuse a client certificate only after
    /// the client considered the handshake done).
    fn handshake_failure(&self, addr: SocketAddr, conn: &Connection) -> Option<ClientError> {
        let reason = conn.close_reason()?;
        let cause = self.tls_failure_cause(&reason)?;
        Some(ClientError::Handshake { addr, cause })
    }

    /// What a call that broke on `conn` reports.
    fn lost(&self, addr: SocketAddr, conn: &Connection) -> ClientError {
        self.handshake_failure(addr, conn)
            .unwrap_or(ClientError::Dropped { addr })
    }

    /// A sentence explaining a TLS failure, or `None` if `err` is not one.
    fn tls_failure_cause(&self, err: &ConnectionError) -> Option<String> {
        if !is_tls_failure(err) {
            return None;
        }
        match err {
            ConnectionError::TransportError(e) => Some(if self.joiner {
                format!(
                    "the server did not present a node certificate from the CA named in the join token ({})",
                    e.reason
                )
            } else {
                format!(
                    "the server did not present a node certificate from a CA this client trusts ({})",
                    e.reason
                )
            }),
            ConnectionError::ConnectionClosed(close) => {
                let reason = String::from_utf8_lossy(&close.reason);
                Some(if self.joiner {
                    format!("the server refused the handshake ({reason})")
                } else {
                    format!(
                        "the server refused this client's certificate ({reason}); use an admin credential issued by this cluster's CA"
                    )
                })
            }
            _ => None,
        }
    }
}

impl Drop for QuicClient {
    fn drop(&mut self) {
        self.endpoint
            .close(VarInt::from_u32(CODE_SHUTDOWN), b"client shut down");
    }
}

/// Nothing answered at `addr` before the time ran out, so nothing was sent.
fn no_answer(addr: SocketAddr) -> ClientError {
    ClientError::Connect {
        addr,
        cause: "no answer in time; is a keel node listening there?".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ids::NodeId;
    use crate::io::pki::ClusterCa;
    use crate::io::quic::{
        bind, ClientCall, ClientInboundReceiver, ClientPeer, QuicTransport, CODE_REFUSED,
        MAX_ANONYMOUS_CALLS,
    };
    use crate::io::transport::{InboundReceiver, DEFAULT_CALL_TIMEOUT};
    use std::collections::BTreeMap;

    fn node(id: u64) -> NodeId {
        NodeId::new(id).expect("test node ids are non-zero")
    }

    /// Node 1 on `identity`, listening on loopback.
    async fn server(
        identity: TlsIdentity,
    ) -> (Arc<QuicTransport>, InboundReceiver, ClientInboundReceiver) {
        bind(
            node(1),
            SocketAddr::from(([127, 0, 0, 1], 0)),
            identity,
            BTreeMap::new(),
        )
        .await
        .expect("bind")
    }

    async fn next_call(rx: &mut ClientInboundReceiver) -> ClientCall {
        tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("client call within 10s")
            .expect("client channel open")
    }

    /// Answers every client call with its peer kind and the request.
    fn spawn_client_echo(mut rx: ClientInboundReceiver) {
        tokio::spawn(async move {
            while let Some(call) = rx.recv().await {
                let mut response = format!("{:?}:", call.peer).into_bytes();
                response.extend_from_slice(&call.request);
                let _ = call.reply.send(response);
            }
        });
    }

    /// Nothing arrived on either of the node's channels.
    async fn assert_nothing_arrived(
        nodes: &mut InboundReceiver,
        clients: &mut ClientInboundReceiver,
    ) {
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            nodes.try_recv().is_err(),
            "something reached the node channel"
        );
        assert!(
            clients.try_recv().is_err(),
            "something reached the client channel"
        );
    }

    #[tokio::test]
    async fn admin_call_arrives_as_admin_and_gets_its_answer() {
        let ca = ClusterCa::generate().expect("ca");
        let (n1, mut nodes, mut clients) = server(ca.issue_node(node(1)).expect("issue")).await;
        let client = QuicClient::admin(&ca.issue_admin().expect("admin")).expect("client");
        let addr = n1.local_addr();
        let call = tokio::spawn(async move {
            let first = client
                .call(addr, b"status".to_vec(), DEFAULT_CALL_TIMEOUT)
                .await;
            (client, first)
        });
        let incoming = next_call(&mut clients).await;
        assert_eq!(incoming.peer, ClientPeer::Admin);
        assert_eq!(incoming.request, b"status".to_vec());
        incoming.reply.send(b"ok".to_vec()).expect("caller waits");
        let (client, first) = call.await.expect("join");
        assert_eq!(first, Ok(b"ok".to_vec()));
        assert!(
            nodes.try_recv().is_err(),
            "a client call reached the node channel"
        );

        // Further calls reuse the connection.
        let first_conn = client
            .connection(addr, Instant::now() + DEFAULT_CALL_TIMEOUT)
            .await
            .expect("cached")
            .stable_id();
        spawn_client_echo(clients);
        let second = client
            .call(addr, b"again".to_vec(), DEFAULT_CALL_TIMEOUT)
            .await;
        assert_eq!(second, Ok(b"Admin:again".to_vec()));
        assert_eq!(
            client
                .connection(addr, Instant::now() + DEFAULT_CALL_TIMEOUT)
                .await
                .expect("cached")
                .stable_id(),
            first_conn
        );
    }

    #[tokio::test]
    async fn joiner_with_the_right_fingerprint_arrives_as_anonymous() {
        let ca = ClusterCa::generate().expect("ca");
        let (n1, mut nodes, clients) = server(ca.issue_node(node(1)).expect("issue")).await;
        spawn_client_echo(clients);
        let client = QuicClient::joiner(ca.fingerprint()).expect("client");
        let response = client
            .call(n1.local_addr(), b"join".to_vec(), DEFAULT_CALL_TIMEOUT)
            .await;
        assert_eq!(response, Ok(b"Anonymous:join".to_vec()));
        assert!(nodes.try_recv().is_err());
    }

    #[tokio::test]
    async fn joiner_with_a_wrong_fingerprint_fails_the_handshake() {
        let ca = ClusterCa::generate().expect("ca");
        let other = ClusterCa::generate().expect("other ca");
        let (n1, mut nodes, mut clients) = server(ca.issue_node(node(1)).expect("issue")).await;
        let client = QuicClient::joiner(other.fingerprint()).expect("client");
        let response = client
            .call(n1.local_addr(), b"token".to_vec(), DEFAULT_CALL_TIMEOUT)
            .await;
        match response {
            Err(ClientError::Handshake { addr, cause }) => {
                assert_eq!(addr, n1.local_addr());
                assert!(cause.contains("join token"), "{cause}");
            }
            other => panic!("expected a handshake error, got {other:?}"),
        }
        assert_nothing_arrived(&mut nodes, &mut clients).await;
    }

    #[tokio::test]
    async fn joiner_refuses_a_server_that_shows_the_ca_but_is_not_signed_by_it() {
        // A man in the middle copies the real CA certificate into its chain
        // but cannot sign its own leaf with the real CA's key.
        let ca = ClusterCa::generate().expect("ca");
        let rogue = ClusterCa::generate().expect("rogue ca");
        let mut forged = rogue.issue_node(node(1)).expect("issue");
        forged.cert_chain_der = vec![forged.cert_chain_der[0].clone(), ca.cert_der()];
        let (mitm, mut nodes, mut clients) = server(forged).await;
        let client = QuicClient::joiner(ca.fingerprint()).expect("client");
        let response = client
            .call(mitm.local_addr(), b"token".to_vec(), DEFAULT_CALL_TIMEOUT)
            .await;
        assert!(
            matches!(response, Err(ClientError::Handshake { .. })),
            "{response:?}"
        );
        assert_nothing_arrived(&mut nodes, &mut clients).await;
    }

    #[tokio::test]
    async fn admin_with_a_certificate_from_another_ca_cannot_connect() {
        let ca = ClusterCa::generate().expect("ca");
        let rogue = ClusterCa::generate().expect("rogue ca");
        let (n1, mut nodes, mut clients) = server(ca.issue_node(node(1)).expect("issue")).await;
        // Trusting only its own CA, it refuses the server...
        let client = QuicClient::admin(&rogue.issue_admin().expect("admin")).expect("client");
        let response = client
            .call(n1.local_addr(), b"status".to_vec(), DEFAULT_CALL_TIMEOUT)
            .await;
        assert!(
            matches!(response, Err(ClientError::Handshake { .. })),
            "{response:?}"
        );
        // ... and trusting the cluster's CA, the server refuses it.
        let mut identity = rogue.issue_admin().expect("admin");
        identity.trusted_cas_der = vec![ca.cert_der()];
        let client = QuicClient::admin(&identity).expect("client");
        let response = client
            .call(n1.local_addr(), b"status".to_vec(), DEFAULT_CALL_TIMEOUT)
            .await;
        match response {
            Err(ClientError::Handshake { cause, .. }) => {
                assert!(
                    cause.contains("refused this client's certificate"),
                    "{cause}"
                );
            }
            other => panic!("expected a handshake error, got {other:?}"),
        }
        assert_nothing_arrived(&mut nodes, &mut clients).await;
    }

    #[tokio::test]
    async fn admin_refuses_a_server_that_is_not_a_node() {
        let ca = ClusterCa::generate().expect("ca");
        // A server presenting an admin certificate (right CA, no node name).
        let (impostor, mut nodes, mut clients) = server(ca.issue_admin().expect("admin")).await;
        let client = QuicClient::admin(&ca.issue_admin().expect("admin")).expect("client");
        let response = client
            .call(
                impostor.local_addr(),
                b"status".to_vec(),
                DEFAULT_CALL_TIMEOUT,
            )
            .await;
        assert!(
            matches!(response, Err(ClientError::Handshake { .. })),
            "{response:?}"
        );
        assert_nothing_arrived(&mut nodes, &mut clients).await;
    }

    #[tokio::test]
    async fn anonymous_requests_are_bounded_in_size() {
        let ca = ClusterCa::generate().expect("ca");
        let (n1, mut nodes, mut clients) = server(ca.issue_node(node(1)).expect("issue")).await;
        let addr = n1.local_addr();
        let client = QuicClient::joiner(ca.fingerprint()).expect("client");
        // The client refuses to send an oversized request itself.
        assert_eq!(
            client
                .call(
                    addr,
                    vec![0; MAX_ANONYMOUS_REQUEST_LEN + 1],
                    DEFAULT_CALL_TIMEOUT
                )
                .await,
            Err(ClientError::FrameTooLarge {
                len: MAX_ANONYMOUS_REQUEST_LEN + 1,
                max: MAX_ANONYMOUS_REQUEST_LEN
            })
        );
        // Forged on the wire, the server refuses it.
        let conn = client
            .connection(addr, Instant::now() + DEFAULT_CALL_TIMEOUT)
            .await
            .expect("connect");
        let (mut send, mut recv) = conn.open_bi().await.expect("open stream");
        let oversized = vec![7u8; MAX_ANONYMOUS_REQUEST_LEN + 1];
        let _ = write_frame(&mut send, &oversized).await;
        let _ = send.finish();
        let answer = recv.read_to_end(1024).await;
        assert!(
            matches!(
                answer,
                Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code)))
                    if code == VarInt::from_u32(CODE_REFUSED)
            ),
            "{answer:?}"
        );
        assert_nothing_arrived(&mut nodes, &mut clients).await;
        // A request of exactly the limit is served.
        let call = tokio::spawn(async move {
            let response = client
                .call(
                    addr,
                    vec![1u8; MAX_ANONYMOUS_REQUEST_LEN],
                    DEFAULT_CALL_TIMEOUT,
                )
                .await;
            (client, response)
        });
        let incoming = next_call(&mut clients).await;
        assert_eq!(incoming.peer, ClientPeer::Anonymous);
        assert_eq!(incoming.request.len(), MAX_ANONYMOUS_REQUEST_LEN);
        incoming
            .reply
            .send(b"welcome".to_vec())
            .expect("caller waits");
        assert_eq!(call.await.expect("join").1, Ok(b"welcome".to_vec()));
    }

    #[tokio::test]
    async fn anonymous_calls_are_bounded_in_number() {
        let ca = ClusterCa::generate().expect("ca");
        let (n1, _nodes, mut clients) = server(ca.issue_node(node(1)).expect("issue")).await;
        let addr = n1.local_addr();
        let client = QuicClient::joiner(ca.fingerprint()).expect("client");
        let conn = client
            .connection(addr, Instant::now() + DEFAULT_CALL_TIMEOUT)
            .await
            .expect("connect");
        let mut streams = Vec::new();
        for i in 0..=MAX_ANONYMOUS_CALLS {
            let (mut send, recv) = conn.open_bi().await.expect("open stream");
            write_frame(&mut send, &[u8::try_from(i).expect("small")])
                .await
                .expect("write");
            send.finish().expect("finish");
            streams.push(recv);
        }
        // The first MAX_ANONYMOUS_CALLS reach the node; hold them.
        let mut held = Vec::new();
        for _ in 0..MAX_ANONYMOUS_CALLS {
            held.push(next_call(&mut clients).await);
        }
        let mut seen: Vec<u8> = held.iter().map(|c| c.request[0]).collect();
        seen.sort_unstable();
        let expected: Vec<u8> = (0..MAX_ANONYMOUS_CALLS)
            .map(|i| u8::try_from(i).expect("small"))
            .collect();
        assert_eq!(seen, expected);
        // The one beyond the limit is reset and never delivered.
        let mut extra = streams.pop().expect("extra stream");
        let answer = extra.read_to_end(1024).await;
        assert!(
            matches!(
                answer,
                Err(quinn::ReadToEndError::Read(quinn::ReadError::Reset(code)))
                    if code == VarInt::from_u32(CODE_REFUSED)
            ),
            "{answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(clients.try_recv().is_err(), "the extra call was delivered");
        // Answering frees the slots.
        for call in held {
            call.reply.send(b"done".to_vec()).expect("caller waits");
        }
        for mut recv in streams {
            assert!(recv.read_to_end(1024).await.is_ok());
        }
        spawn_client_echo(clients);
        assert_eq!(
            client
                .call(addr, b"more".to_vec(), DEFAULT_CALL_TIMEOUT)
                .await,
            Ok(b"Anonymous:more".to_vec())
        );
    }

    #[tokio::test]
    async fn one_way_streams_from_clients_are_refused() {
        let ca = ClusterCa::generate().expect("ca");
        let (n1, mut nodes, mut clients) = server(ca.issue_node(node(1)).expect("issue")).await;
        let addr = n1.local_addr();
        let admin = QuicClient::admin(&ca.issue_admin().expect("admin")).expect("client");
        let joiner = QuicClient::joiner(ca.fingerprint()).expect("client");
        for client in [&admin, &joiner] {
            let conn = client
                .connection(addr, Instant::now() + DEFAULT_CALL_TIMEOUT)
                .await
                .expect("connect");
            let mut send = conn.open_uni().await.expect("open stream");
            write_frame(&mut send, b"raft message")
                .await
                .expect("write");
            assert_eq!(
                send.stopped().await,
                Ok(Some(VarInt::from_u32(CODE_REFUSED))),
                "{client:?}"
            );
        }
        assert_nothing_arrived(&mut nodes, &mut clients).await;
    }

    #[tokio::test]
    async fn client_reconnects_after_its_connection_died() {
        let ca = ClusterCa::generate().expect("ca");
        let (n1, _nodes, clients) = server(ca.issue_node(node(1)).expect("issue")).await;
        spawn_client_echo(clients);
        let addr = n1.local_addr();
        let client = QuicClient::admin(&ca.issue_admin().expect("admin")).expect("client");
        assert_eq!(
            client.call(addr, b"1".to_vec(), DEFAULT_CALL_TIMEOUT).await,
            Ok(b"Admin:1".to_vec())
        );
        let old = client
            .connection(addr, Instant::now() + DEFAULT_CALL_TIMEOUT)
            .await
            .expect("cached");
        // The node stops trusting the admin's CA, which closes its
        // connection, then trusts it again.
        let other = ClusterCa::generate().expect("other ca");
        let mut distrust = ca.issue_node(node(1)).expect("issue");
        distrust.trusted_cas_der = vec![other.cert_der()];
        n1.reload_identity(distrust).expect("reload");
        tokio::time::timeout(Duration::from_secs(5), old.closed())
            .await
            .expect("the client learns of the close");
        n1.reload_identity(ca.issue_node(node(1)).expect("issue"))
            .expect("reload");
        assert_eq!(
            client.call(addr, b"2".to_vec(), DEFAULT_CALL_TIMEOUT).await,
            Ok(b"Admin:2".to_vec())
        );
        assert_ne!(
            client
                .connection(addr, Instant::now() + DEFAULT_CALL_TIMEOUT)
                .await
                .expect("cached")
                .stable_id(),
            old.stable_id()
        );
    }

    #[tokio::test]
    async fn a_call_in_flight_survives_a_reload_that_keeps_trusting_its_caller() {
        let ca = ClusterCa::generate().expect("ca");
        let staged = ClusterCa::generate().expect("staged ca");
        let (n1, _nodes, mut clients) = server(ca.issue_node(node(1)).expect("issue")).await;
        let addr = n1.local_addr();
        let client = QuicClient::admin(&ca.issue_admin().expect("admin")).expect("client");
        // A CA stage: the node presents a certificate of the new CA and
        // trusts both, while the admin's call is being served.
        let call = client.call(addr, b"1".to_vec(), DEFAULT_CALL_TIMEOUT);
        let (response, ()) = tokio::join!(call, async {
            let call = next_call(&mut clients).await;
            let mut stage = staged.issue_node(node(1)).expect("issue");
            stage.trusted_cas_der = vec![ca.cert_der(), staged.cert_der()];
            n1.reload_identity(stage).expect("reload");
            tokio::time::sleep(Duration::from_millis(50)).await;
            let _ = call.reply.send(call.request);
        });
        assert_eq!(response, Ok(b"1".to_vec()));
    }

    #[tokio::test]
    async fn unanswered_call_times_out_and_a_dead_address_fails_to_connect() {
        let ca = ClusterCa::generate().expect("ca");
        let (n1, _nodes, mut clients) = server(ca.issue_node(node(1)).expect("issue")).await;
        let addr = n1.local_addr();
        let client = QuicClient::admin(&ca.issue_admin().expect("admin")).expect("client");
        let call = client.call(addr, b"slow".to_vec(), Duration::from_millis(500));
        let (response, held) = tokio::join!(call, next_call(&mut clients));
        assert_eq!(response, Err(ClientError::Timeout { addr }));
        drop(held);
        // A dropped reply is reported as such.
        let call = client.call(addr, b"x".to_vec(), DEFAULT_CALL_TIMEOUT);
        let (response, ()) = tokio::join!(call, async {
            drop(next_call(&mut clients).await);
        });
        assert_eq!(response, Err(ClientError::Dropped { addr }));
        // Nothing listening: the dial runs out of time, which is a connect
        // error (nothing was sent, another node may be tried), not an
        // unknown outcome — and the caller's deadline bounds it.
        drop(n1);
        let nobody = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
        let silent = nobody.local_addr().expect("addr");
        let started = Instant::now();
        let response = client
            .call(silent, b"x".to_vec(), Duration::from_millis(300))
            .await;
        assert!(
            matches!(response, Err(ClientError::Connect { addr, .. }) if addr == silent),
            "{response:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
