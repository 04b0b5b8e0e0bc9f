//! The node's client service as the CLI and joiners reach it, with
//! certificates stood in for by a test issuer.

use keel::core::cache::fingerprint;
use keel::core::entry::CertFingerprint;
use keel::core::ids::NodeId;
use keel::node::join::Issuer;
use keel::node::service::{serve, Caller, ClientRequest, ClientResponse, Credentials};
use keel::node::Node;
use std::sync::{Arc, Mutex};

/// The CA the harness bootstraps with (`Bootstrap::ca_cert_der`).
pub const TEST_CA: &[u8] = b"test CA";

/// Signs by concatenation; refuses CSRs that start with "bad".
pub struct TestIssuer;

impl Issuer for TestIssuer {
    fn fingerprint(&self) -> CertFingerprint {
        fingerprint(TEST_CA)
    }
    fn check_csr(&self, csr_der: &[u8]) -> Result<(), String> {
        if csr_der.is_empty() || csr_der.starts_with(b"bad") {
            return Err("the CSR's signature does not verify".into());
        }
        Ok(())
    }
    fn sign(&self, node: NodeId, csr_der: &[u8]) -> Result<Vec<u8>, String> {
        let mut cert = format!("cert of node {node} for ").into_bytes();
        cert.extend_from_slice(csr_der);
        Ok(cert)
    }
    fn credentials(&self) -> (Vec<u8>, Vec<u8>) {
        (TEST_CA.to_vec(), b"test CA key".to_vec())
    }
}

#[derive(Default)]
pub struct TestCredentials {
    pub installed: Mutex<Vec<Vec<u8>>>,
}

impl Credentials for TestCredentials {
    fn issuer(&self) -> Arc<dyn Issuer> {
        Arc::new(TestIssuer)
    }
    fn cert_ca(&self) -> CertFingerprint {
        fingerprint(TEST_CA)
    }
    fn install_ca(&self, cert: &[u8], _key: &[u8], _trusted: Vec<Vec<u8>>) -> Result<(), String> {
        self.installed.lock().unwrap().push(cert.to_vec());
        Ok(())
    }
}

pub async fn call(node: &Node, caller: Caller, request: ClientRequest) -> ClientResponse {
    let bytes = serve(
        node,
        &TestCredentials::default(),
        caller,
        &keel::core::codec::encode(&request),
    )
    .await;
    keel::core::codec::decode(&bytes).expect("the service answers with a valid frame")
}
