//! The simulator's stand-in for the cluster CA. Certificates and TLS are
//! not simulated (quinn and rustls do not run under madsim); what runs is
//! everything around them: the join protocol, token lifecycle and trust
//! set changes of `keel::node::join` and `keel::node::service`. Signing
//! here just binds the CSR bytes to the node id, which is all the admission
//! logic can observe.

use keel::core::cache::fingerprint;
use keel::core::entry::CertFingerprint;
use keel::core::ids::NodeId;
use keel::node::join::Issuer;
use keel::node::service::Credentials;
use std::sync::Arc;

/// The CA certificate every simulated cluster bootstraps with.
pub const SIM_CA: &[u8] = b"simulated cluster CA";

pub struct SimIssuer;

impl Issuer for SimIssuer {
    fn fingerprint(&self) -> CertFingerprint {
        fingerprint(SIM_CA)
    }

    fn check_csr(&self, csr_der: &[u8]) -> Result<(), String> {
        if csr_der.is_empty() {
            return Err("the CSR is empty".into());
        }
        Ok(())
    }

    fn sign(&self, node: NodeId, csr_der: &[u8]) -> Result<Vec<u8>, String> {
        let mut cert = format!("simulated certificate of {node} for ").into_bytes();
        cert.extend_from_slice(csr_der);
        Ok(cert)
    }

    fn credentials(&self) -> (Vec<u8>, Vec<u8>) {
        (SIM_CA.to_vec(), b"simulated CA key".to_vec())
    }
}

/// Every simulated node signs with [`SimIssuer`] and never rotates.
pub struct SimCredentials;

impl Credentials for SimCredentials {
    fn issuer(&self) -> Arc<dyn Issuer> {
        Arc::new(SimIssuer)
    }

    fn cert_ca(&self) -> CertFingerprint {
        fingerprint(SIM_CA)
    }

    fn install_ca(&self, _cert: &[u8], _key: &[u8], _trusted: Vec<Vec<u8>>) -> Result<(), String> {
        Err("the simulator does not rotate its CA".into())
    }
}
