//! TLS for QUIC: rustls configurations on keel's provider, and what a
//! peer's certificate says about it (which node, or the admin, or nobody).

use super::{ClientPeer, QuicError, Tls, ALPN, IDLE_TIMEOUT, KEEP_ALIVE};
use crate::core::ids::NodeId;
use crate::io::pki::{issued_by_any, node_dns_name, TlsIdentity, ADMIN_DNS_NAME};
use quinn::Connection;
use rustls::client::{verify_server_name, WebPkiServerVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::RootCertStore;
use std::fmt;
use std::sync::Arc;

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
pub(super) fn quic_configs(
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
pub(super) fn parse_node_name(name: &[u8]) -> Option<NodeId> {
    let name = std::str::from_utf8(name).ok()?;
    let digits = name.strip_prefix("node-")?.strip_suffix(".keel")?;
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    NodeId::new(digits.parse().ok()?).ok()
}

/// Who is on the other end of an accepted connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Peer {
    Node(NodeId),
    Client(ClientPeer),
}

/// Classifies an established incoming connection by its (already verified)
/// client certificate: none at all is anonymous; a leaf must name exactly
/// one node or the admin, never both.
pub(super) fn classify(conn: &Connection) -> Option<Peer> {
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
pub(super) fn peer_trusted(conn: &Connection, trusted: &[Vec<u8>]) -> bool {
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
pub(super) fn closed_by_tls(conn: &Connection) -> bool {
    conn.close_reason().is_some_and(|err| is_tls_failure(&err))
}

impl Tls {
    /// Records `conn`, established with the configuration of `generation`.
    /// Returns false if the identity changed meanwhile and the new trust
    /// does not accept the peer: the caller must close it.
    pub(super) fn register(&mut self, conn: &Connection, generation: u64) -> bool {
        if generation != self.generation && !peer_trusted(conn, &self.trusted_cas_der) {
            return false;
        }
        self.conns.retain(|c| c.close_reason().is_none());
        self.conns.push(conn.clone());
        true
    }
}
