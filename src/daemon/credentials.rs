//! A node's credentials: its identity file and the live TLS state of its
//! QUIC endpoint, kept in step. Every change is written to the identity
//! file before the endpoint uses it, so a restart comes back with what the
//! node last presented and trusted.

use crate::core::cache::fingerprint;
use crate::core::codec::{FrameKind, Wire};
use crate::core::entry::CertFingerprint;
use crate::core::ids::NodeId;
use crate::daemon::files;
use crate::io::pki::{ClusterCa, TlsIdentity};
use crate::io::quic::QuicTransport;
use crate::node::join::Issuer;
use crate::node::service::Credentials;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

/// What a node keeps in `identity.cred`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredIdentity {
    pub node_id: NodeId,
    pub cluster_id: [u8; 16],
    /// Its certificate chain (leaf, signing CA), key and trusted CAs.
    pub tls: TlsIdentity,
    /// The cluster CA it signs joiners' certificates with.
    pub ca_cert_der: Vec<u8>,
    pub ca_key_der: Vec<u8>,
}

impl Wire for StoredIdentity {
    const KIND: FrameKind = FrameKind::Credential;
}

/// Signs with a loaded cluster CA.
struct CaIssuer(ClusterCa);

impl Issuer for CaIssuer {
    fn fingerprint(&self) -> CertFingerprint {
        self.0.fingerprint()
    }

    fn check_csr(&self, csr_der: &[u8]) -> Result<(), String> {
        ClusterCa::check_csr(csr_der).map_err(|e| e.to_string())
    }

    fn sign(&self, node: NodeId, csr_der: &[u8]) -> Result<Vec<u8>, String> {
        self.0
            .sign_node_csr(node, csr_der)
            .map_err(|e| e.to_string())
    }

    fn credentials(&self) -> (Vec<u8>, Vec<u8>) {
        (self.0.cert_der(), self.0.key_der())
    }
}

/// The node's credentials, shared by the client service and the loop that
/// follows the trusted CA set in group 0.
pub struct NodeCredentials {
    path: PathBuf,
    identity: Mutex<StoredIdentity>,
    issuer: Mutex<Arc<CaIssuer>>,
    transport: Arc<QuicTransport>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl NodeCredentials {
    pub fn new(
        path: PathBuf,
        identity: StoredIdentity,
        transport: Arc<QuicTransport>,
    ) -> Result<Self, String> {
        let ca = ClusterCa::from_der(&identity.ca_cert_der, &identity.ca_key_der)
            .map_err(|e| e.to_string())?;
        Ok(NodeCredentials {
            path,
            identity: Mutex::new(identity),
            issuer: Mutex::new(Arc::new(CaIssuer(ca))),
            transport,
        })
    }

    /// Persists `next`, then puts its TLS identity in force.
    fn replace(&self, current: &mut StoredIdentity, next: StoredIdentity) -> Result<(), String> {
        files::write(&self.path, &next).map_err(|e| e.to_string())?;
        self.transport
            .reload_identity(next.tls.clone())
            .map_err(|e| e.to_string())?;
        *current = next;
        Ok(())
    }

    /// Trusts exactly `trusted` (group 0's CA set) if that differs from what
    /// the node trusts now.
    pub fn follow_trust(&self, mut trusted: Vec<Vec<u8>>) -> Result<(), String> {
        trusted.sort();
        let mut identity = lock(&self.identity);
        let mut current = identity.tls.trusted_cas_der.clone();
        current.sort();
        if current == trusted || trusted.is_empty() {
            return Ok(());
        }
        tracing::info!(node = %identity.node_id, cas = trusted.len(), "trusted CA set changed; reloading TLS");
        let mut next = identity.clone();
        next.tls.trusted_cas_der = trusted;
        self.replace(&mut identity, next)
    }
}

impl Credentials for NodeCredentials {
    fn issuer(&self) -> Arc<dyn Issuer> {
        lock(&self.issuer).clone()
    }

    fn cert_ca(&self) -> CertFingerprint {
        let identity = lock(&self.identity);
        // The chain is [leaf, signing CA]; a chain without the CA (older
        // files) was signed by the CA the node signs with.
        identity
            .tls
            .cert_chain_der
            .get(1)
            .map(|ca| fingerprint(ca))
            .unwrap_or_else(|| fingerprint(&identity.ca_cert_der))
    }

    fn install_ca(
        &self,
        cert_der: &[u8],
        key_der: &[u8],
        trusted: Vec<Vec<u8>>,
    ) -> Result<(), String> {
        let ca = ClusterCa::from_der(cert_der, key_der).map_err(|e| e.to_string())?;
        let mut identity = lock(&self.identity);
        let mut tls = ca.issue_node(identity.node_id).map_err(|e| e.to_string())?;
        tls.trusted_cas_der = trusted;
        let next = StoredIdentity {
            tls,
            ca_cert_der: ca.cert_der(),
            ca_key_der: ca.key_der(),
            ..identity.clone()
        };
        self.replace(&mut identity, next)?;
        *lock(&self.issuer) = Arc::new(CaIssuer(ca));
        tracing::info!(node = %identity.node_id, "adopted a staged CA: new certificate in force");
        Ok(())
    }
}
