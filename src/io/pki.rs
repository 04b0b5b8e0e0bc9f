//! The cluster's public-key infrastructure (DESIGN.md §6): the cluster CA,
//! node and admin certificates, and the certificate signing requests with
//! which joining nodes obtain their certificate without their private key
//! ever leaving them.
//!
//! Names: a node's certificate carries `node-<id>.keel` (see
//! [`node_dns_name`]) as its only DNS subject alternative name and as its
//! common name; an admin client's certificate carries [`ADMIN_DNS_NAME`].
//! Whatever a joiner's CSR asks for, the CA only ever certifies the CSR's
//! public key under the name of the node id the cluster assigned.
//!
//! Certificates use rcgen's default validity (1975 to 4096): keel replaces
//! trust through CA rotation, not expiry, so a forgotten renewal can never
//! take a cluster down. Serial numbers are random.

use crate::core::ids::NodeId;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SubjectPublicKeyInfo,
};
use rustls::pki_types::CertificateDer;
use std::fmt;
use x509_parser::prelude::FromDer;

/// The DNS name (SAN and common name) of an admin client's certificate.
pub const ADMIN_DNS_NAME: &str = "admin.keel";

/// The largest CSR the CA looks at; real ones are a few hundred bytes.
const MAX_CSR_LEN: usize = 16 * 1024;

/// What can go wrong generating, loading or using the cluster's keys and
/// certificates.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
pub enum PkiError {
    #[error("generating a key or signing a certificate failed: {0}")]
    Certificate(String),
    #[error("the CA certificate is not a well-formed X.509 CA certificate: {0}")]
    InvalidCaCert(String),
    #[error("the CA private key is not a usable PKCS#8 DER key: {0}")]
    InvalidKey(String),
    #[error("the CA private key does not belong to the CA certificate; load the key that was saved with it")]
    KeyMismatch,
    #[error("the certificate signing request is malformed or its signature does not verify: {0}")]
    InvalidCsr(String),
    #[error("the certificate signing request's key is not ECDSA P-256, ECDSA P-384 or Ed25519, the only key types keel certifies")]
    UnsupportedKey,
}

/// A TLS identity: a certificate chain (leaf first) and its PKCS#8 (or
/// SEC1/PKCS#1) private key, plus the trusted CA set, all DER-encoded.
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
/// `node-<id>.keel`, the id in decimal without leading zeros.
pub fn node_dns_name(node: NodeId) -> String {
    format!("node-{}.keel", node.get())
}

/// A cluster CA: its self-signed certificate and its signing key.
///
/// `Debug` shows the fingerprint only, never the key.
pub struct ClusterCa {
    issuer: Issuer<'static, KeyPair>,
    cert_der: Vec<u8>,
}

impl fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let fingerprint: String = self
            .fingerprint()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        f.debug_struct("ClusterCa")
            .field("fingerprint", &fingerprint)
            .finish_non_exhaustive()
    }
}

fn cert_error(err: rcgen::Error) -> PkiError {
    PkiError::Certificate(err.to_string())
}

/// A random positive serial number of 16 bytes (minimal DER: the first byte
/// is in `0x40..0x80`).
fn random_serial() -> rcgen::SerialNumber {
    let mut bytes = [0u8; 16];
    rand_chacha::ChaCha20Rng::from_os_rng().fill_bytes(&mut bytes);
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    rcgen::SerialNumber::from(bytes.to_vec())
}

/// The parameters of an end-entity certificate naming exactly `name`.
fn leaf_params(
    name: &str,
    usages: Vec<ExtendedKeyUsagePurpose>,
) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(vec![name.to_owned()]).map_err(cert_error)?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    params.distinguished_name = dn;
    params.serial_number = Some(random_serial());
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = usages;
    params.use_authority_key_identifier_extension = true;
    Ok(params)
}

fn node_usages() -> Vec<ExtendedKeyUsagePurpose> {
    vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ]
}

impl ClusterCa {
    /// Generates a fresh CA key (ECDSA P-256) and its self-signed certificate.
    pub fn generate() -> Result<Self, PkiError> {
        let key = KeyPair::generate().map_err(cert_error)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "keel cluster CA");
        params.distinguished_name = dn;
        params.serial_number = Some(random_serial());
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = params.self_signed(&key).map_err(cert_error)?;
        Ok(Self {
            cert_der: cert.der().to_vec(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a persisted CA (cert DER + PKCS#8 key DER); refuses a key that
    /// does not match the cert, and a cert that is not a CA certificate.
    pub fn from_der(cert_der: &[u8], key_der: &[u8]) -> Result<Self, PkiError> {
        let (rest, cert) = x509_parser::parse_x509_certificate(cert_der)
            .map_err(|e| PkiError::InvalidCaCert(e.to_string()))?;
        if !rest.is_empty() {
            return Err(PkiError::InvalidCaCert(
                "trailing bytes after the certificate".into(),
            ));
        }
        match cert.basic_constraints() {
            Ok(Some(constraints)) if constraints.value.ca => {}
            Ok(_) => {
                return Err(PkiError::InvalidCaCert(
                    "its basic constraints do not mark it as a CA".into(),
                ))
            }
            Err(e) => return Err(PkiError::InvalidCaCert(e.to_string())),
        }
        let key = KeyPair::try_from(key_der).map_err(|e| PkiError::InvalidKey(e.to_string()))?;
        if cert.public_key().subject_public_key.as_ref() != key.der_bytes() {
            return Err(PkiError::KeyMismatch);
        }
        let issuer = Issuer::from_ca_cert_der(&CertificateDer::from(cert_der), key)
            .map_err(|e| PkiError::InvalidCaCert(e.to_string()))?;
        Ok(Self {
            issuer,
            cert_der: cert_der.to_vec(),
        })
    }

    /// The CA certificate, DER-encoded: what nodes put in their trusted set.
    pub fn cert_der(&self) -> Vec<u8> {
        self.cert_der.clone()
    }

    /// The CA's private key, PKCS#8 DER: persist it next to [`Self::cert_der`].
    pub fn key_der(&self) -> Vec<u8> {
        self.issuer.key().serialize_der()
    }

    /// SHA-256 of the CA certificate's DER: what join tokens carry and what
    /// the metadata group's CA trust set is keyed by.
    pub fn fingerprint(&self) -> [u8; 32] {
        crate::core::cache::fingerprint(&self.cert_der)
    }

    /// Issues a certificate for `node` with a fresh key (bootstrap, tests),
    /// valid both as TLS server and client (every node is both). The chain
    /// is `[leaf, CA]` so that a joiner can find the CA by its fingerprint;
    /// the trusted set is this CA alone.
    pub fn issue_node(&self, node: NodeId) -> Result<TlsIdentity, PkiError> {
        self.issue_with_fresh_key(&node_dns_name(node), node_usages())
    }

    /// An admin client identity: SAN and CN [`ADMIN_DNS_NAME`], client
    /// authentication only (it cannot serve as a node), chain `[leaf, CA]`,
    /// trusting this CA alone.
    pub fn issue_admin(&self) -> Result<TlsIdentity, PkiError> {
        self.issue_with_fresh_key(ADMIN_DNS_NAME, vec![ExtendedKeyUsagePurpose::ClientAuth])
    }

    fn issue_with_fresh_key(
        &self,
        name: &str,
        usages: Vec<ExtendedKeyUsagePurpose>,
    ) -> Result<TlsIdentity, PkiError> {
        let key = KeyPair::generate().map_err(cert_error)?;
        let cert = leaf_params(name, usages)?
            .signed_by(&key, &self.issuer)
            .map_err(cert_error)?;
        Ok(TlsIdentity {
            cert_chain_der: vec![cert.der().to_vec(), self.cert_der()],
            key_der: key.serialize_der(),
            trusted_cas_der: vec![self.cert_der()],
        })
    }

    /// Signs a joiner's PKCS#10 CSR for `node`: verifies the CSR's
    /// self-signature (proof that the joiner holds the key), ignores every
    /// name and extension the CSR asks for, and issues a leaf naming exactly
    /// [`node_dns_name`]`(node)` (SAN and CN), valid as TLS server and
    /// client, not a CA. Returns the leaf DER. Never panics on garbage.
    pub fn sign_node_csr(&self, node: NodeId, csr_der: &[u8]) -> Result<Vec<u8>, PkiError> {
        let key = csr_public_key(csr_der)?;
        let cert = leaf_params(&node_dns_name(node), node_usages())?
            .signed_by(&key, &self.issuer)
            .map_err(cert_error)?;
        Ok(cert.der().to_vec())
    }

    /// Checks that a CSR parses, its signature verifies and its key type is
    /// one keel certifies, so that a server can refuse a bad join before
    /// committing anything.
    pub fn check_csr(csr_der: &[u8]) -> Result<(), PkiError> {
        csr_public_key(csr_der).map(drop)
    }
}

/// Whether one of `cas_der` signed the certificate `leaf_der`. Unparsable
/// input is signed by nobody. The transport asks this of connections that
/// are already open when the trusted CA set shrinks.
pub fn issued_by_any(leaf_der: &[u8], cas_der: &[Vec<u8>]) -> bool {
    let Ok((_, leaf)) = x509_parser::certificate::X509Certificate::from_der(leaf_der) else {
        return false;
    };
    cas_der.iter().any(|ca_der| {
        x509_parser::certificate::X509Certificate::from_der(ca_der).is_ok_and(|(_, ca)| {
            leaf.issuer() == ca.subject() && leaf.verify_signature(Some(ca.public_key())).is_ok()
        })
    })
}

/// The public key of a well-formed, correctly self-signed CSR whose key type
/// keel certifies. Everything else the CSR says is ignored.
fn csr_public_key(csr_der: &[u8]) -> Result<SubjectPublicKeyInfo, PkiError> {
    if csr_der.len() > MAX_CSR_LEN {
        return Err(PkiError::InvalidCsr(format!(
            "{} bytes exceeds the {MAX_CSR_LEN}-byte limit",
            csr_der.len()
        )));
    }
    let (rest, csr) =
        x509_parser::certification_request::X509CertificationRequest::from_der(csr_der)
            .map_err(|e| PkiError::InvalidCsr(e.to_string()))?;
    if !rest.is_empty() {
        return Err(PkiError::InvalidCsr(
            "trailing bytes after the request".into(),
        ));
    }
    csr.verify_signature()
        .map_err(|e| PkiError::InvalidCsr(format!("signature check failed: {e}")))?;
    let key = SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
        .map_err(|_| PkiError::UnsupportedKey)?;
    let accepted = [
        &rcgen::PKCS_ECDSA_P256_SHA256,
        &rcgen::PKCS_ECDSA_P384_SHA384,
        &rcgen::PKCS_ED25519,
    ];
    if !accepted.contains(&key.algorithm()) {
        return Err(PkiError::UnsupportedKey);
    }
    Ok(key)
}

/// A joiner's fresh key pair (ECDSA P-256) and a CSR for it; the private
/// key never leaves the joiner. Returns `(key_der PKCS#8, csr_der)`. The CSR
/// asks for nothing: the CA decides the name.
pub fn generate_key_and_csr() -> Result<(Vec<u8>, Vec<u8>), PkiError> {
    let key = KeyPair::generate().map_err(cert_error)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "keel joining node");
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key).map_err(cert_error)?;
    Ok((key.serialize_der(), csr.der().to_vec()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::client::danger::ServerCertVerifier;
    use rustls::client::WebPkiServerVerifier;
    use rustls::pki_types::{ServerName, UnixTime};
    use rustls::RootCertStore;
    use std::sync::Arc;
    use x509_parser::extensions::{GeneralName, ParsedExtension};

    fn node(id: u64) -> NodeId {
        NodeId::new(id).expect("test node ids are non-zero")
    }

    /// Whether webpki accepts `leaf` as a TLS server certificate for `name`,
    /// issued by `ca_der`.
    fn server_cert_valid(ca_der: &[u8], leaf: &[u8], name: &str) -> bool {
        let mut roots = RootCertStore::empty();
        roots
            .add(CertificateDer::from(ca_der.to_vec()))
            .expect("ca cert");
        let verifier = WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .expect("verifier");
        verifier
            .verify_server_cert(
                &CertificateDer::from(leaf.to_vec()),
                &[],
                &ServerName::try_from(name.to_owned()).expect("dns name"),
                &[],
                UnixTime::now(),
            )
            .is_ok()
    }

    /// The DNS SANs, common names and CA flag of a certificate.
    fn names_of(der: &[u8]) -> (Vec<String>, Vec<String>, bool) {
        let (_, cert) = x509_parser::parse_x509_certificate(der).expect("parses");
        let mut sans = Vec::new();
        let mut is_ca = false;
        for ext in cert.extensions() {
            match ext.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => {
                    for name in &san.general_names {
                        sans.push(match name {
                            GeneralName::DNSName(dns) => (*dns).to_owned(),
                            other => format!("{other:?}"),
                        });
                    }
                }
                ParsedExtension::BasicConstraints(bc) => is_ca = bc.ca,
                _ => {}
            }
        }
        let cns = cert
            .subject()
            .iter_common_name()
            .map(|cn| cn.as_str().expect("utf8 cn").to_owned())
            .collect();
        (sans, cns, is_ca)
    }

    #[test]
    fn ca_round_trips_through_der_and_keeps_signing() {
        let ca = ClusterCa::generate().expect("ca");
        let loaded = ClusterCa::from_der(&ca.cert_der(), &ca.key_der()).expect("load");
        assert_eq!(loaded.cert_der(), ca.cert_der());
        assert_eq!(loaded.fingerprint(), ca.fingerprint());
        // The reloaded CA issues certificates that chain to the original.
        let identity = loaded.issue_node(node(3)).expect("issue");
        assert!(server_cert_valid(
            &ca.cert_der(),
            &identity.cert_chain_der[0],
            "node-3.keel"
        ));
        assert_eq!(identity.cert_chain_der[1], ca.cert_der());
        assert_eq!(identity.trusted_cas_der, vec![ca.cert_der()]);
        // ... but not for another name.
        assert!(!server_cert_valid(
            &ca.cert_der(),
            &identity.cert_chain_der[0],
            "node-4.keel"
        ));
    }

    #[test]
    fn issued_by_any_checks_the_signature_not_the_name() {
        let ca = ClusterCa::generate().expect("ca");
        let other = ClusterCa::generate().expect("other ca");
        let leaf = ca.issue_node(node(1)).expect("issue").cert_chain_der[0].clone();
        let admin = ca.issue_admin().expect("admin").cert_chain_der[0].clone();
        assert!(issued_by_any(&leaf, &[ca.cert_der()]));
        assert!(issued_by_any(&admin, &[other.cert_der(), ca.cert_der()]));
        // Another CA with the same subject name did not sign it.
        assert!(!issued_by_any(&leaf, &[other.cert_der()]));
        assert!(!issued_by_any(&leaf, &[]));
        assert!(!issued_by_any(b"not a cert", &[ca.cert_der()]));
        assert!(!issued_by_any(&leaf, &[b"not a cert".to_vec()]));
    }

    #[test]
    fn mismatched_or_unusable_ca_material_is_refused() {
        let ca = ClusterCa::generate().expect("ca");
        let other = ClusterCa::generate().expect("other ca");
        assert_eq!(
            ClusterCa::from_der(&ca.cert_der(), &other.key_der()).err(),
            Some(PkiError::KeyMismatch)
        );
        assert!(matches!(
            ClusterCa::from_der(&ca.cert_der(), b"not a key"),
            Err(PkiError::InvalidKey(_))
        ));
        assert!(matches!(
            ClusterCa::from_der(b"not a cert", &ca.key_der()),
            Err(PkiError::InvalidCaCert(_))
        ));
        // A node certificate with its own key is not a CA.
        let leaf = ca.issue_node(node(1)).expect("issue");
        assert!(matches!(
            ClusterCa::from_der(&leaf.cert_chain_der[0], &leaf.key_der),
            Err(PkiError::InvalidCaCert(_))
        ));
        let mut trailing = ca.cert_der();
        trailing.push(0);
        assert!(matches!(
            ClusterCa::from_der(&trailing, &ca.key_der()),
            Err(PkiError::InvalidCaCert(_))
        ));
    }

    #[test]
    fn fingerprint_equals_the_metadata_layers() {
        let ca = ClusterCa::generate().expect("ca");
        assert_eq!(
            ca.fingerprint(),
            crate::core::cache::fingerprint(&ca.cert_der())
        );
        let other = ClusterCa::generate().expect("other ca");
        assert_ne!(ca.fingerprint(), other.fingerprint());
    }

    #[test]
    fn signed_csr_names_the_node_and_nothing_the_csr_asked_for() {
        let ca = ClusterCa::generate().expect("ca");
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(vec!["node-99.keel".to_owned(), ADMIN_DNS_NAME.to_owned()])
                .expect("params");
        params
            .distinguished_name
            .push(DnType::CommonName, "node-99.keel");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::Any];
        let csr = params.serialize_request(&key).expect("csr");
        ClusterCa::check_csr(csr.der()).expect("a valid csr");

        let leaf = ca.sign_node_csr(node(7), csr.der()).expect("sign");
        let (sans, cns, is_ca) = names_of(&leaf);
        assert_eq!(sans, vec!["node-7.keel".to_owned()]);
        assert_eq!(cns, vec!["node-7.keel".to_owned()]);
        assert!(!is_ca, "the CSR asked to be a CA");
        assert!(server_cert_valid(&ca.cert_der(), &leaf, "node-7.keel"));
        assert!(!server_cert_valid(&ca.cert_der(), &leaf, "node-99.keel"));
        assert!(!server_cert_valid(&ca.cert_der(), &leaf, ADMIN_DNS_NAME));
        // The certified key is the CSR's.
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf).expect("parses");
        assert_eq!(
            cert.public_key().subject_public_key.as_ref(),
            key.der_bytes()
        );
    }

    #[test]
    fn generated_csr_is_signable_for_its_own_key() {
        let ca = ClusterCa::generate().expect("ca");
        let (key_der, csr_der) = generate_key_and_csr().expect("csr");
        let key = KeyPair::try_from(key_der.as_slice()).expect("pkcs8 key");
        let leaf = ca.sign_node_csr(node(12), &csr_der).expect("sign");
        let (_, cert) = x509_parser::parse_x509_certificate(&leaf).expect("parses");
        assert_eq!(
            cert.public_key().subject_public_key.as_ref(),
            key.der_bytes()
        );
        assert!(server_cert_valid(&ca.cert_der(), &leaf, "node-12.keel"));
    }

    #[test]
    fn garbage_and_tampered_csrs_are_refused_without_panicking() {
        let ca = ClusterCa::generate().expect("ca");
        let (_, csr) = generate_key_and_csr().expect("csr");
        assert!(matches!(
            ca.sign_node_csr(node(1), b""),
            Err(PkiError::InvalidCsr(_))
        ));
        assert!(matches!(
            ca.sign_node_csr(node(1), &vec![0x30; MAX_CSR_LEN + 1]),
            Err(PkiError::InvalidCsr(_))
        ));
        // Every truncation.
        for len in 0..csr.len() {
            assert!(
                ca.sign_node_csr(node(1), &csr[..len]).is_err(),
                "truncated to {len} bytes"
            );
        }
        let mut trailing = csr.clone();
        trailing.push(0);
        assert!(ClusterCa::check_csr(&trailing).is_err());
        // Flipping any bit never panics; inside the signed request info it
        // must break the structure or the signature. (The unsigned envelope
        // is parsed leniently, which cannot change what gets certified.)
        let (_, parsed) =
            x509_parser::certification_request::X509CertificationRequest::from_der(&csr)
                .expect("parses");
        let info = parsed.certification_request_info.raw;
        let start = info.as_ptr() as usize - csr.as_ptr() as usize;
        let signed = start..start + info.len();
        for i in 0..csr.len() {
            for bit in [0x01u8, 0x80] {
                let mut tampered = csr.clone();
                tampered[i] ^= bit;
                let result = ca.sign_node_csr(node(1), &tampered);
                if signed.contains(&i) {
                    assert!(result.is_err(), "bit {bit:#x} of byte {i} flipped");
                }
            }
        }
        // Random bytes, with and without a plausible DER header.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for round in 0..2000 {
            let mut bytes = vec![0u8; (rng.next_u32() % 600) as usize];
            rng.fill_bytes(&mut bytes);
            if round % 2 == 0 && bytes.len() > 4 {
                bytes[0] = 0x30;
                bytes[1] = 0x82;
            }
            assert!(ca.sign_node_csr(node(1), &bytes).is_err());
        }
    }

    #[test]
    fn admin_certificate_is_client_only() {
        let ca = ClusterCa::generate().expect("ca");
        let admin = ca.issue_admin().expect("admin");
        let (sans, cns, is_ca) = names_of(&admin.cert_chain_der[0]);
        assert_eq!(sans, vec![ADMIN_DNS_NAME.to_owned()]);
        assert_eq!(cns, vec![ADMIN_DNS_NAME.to_owned()]);
        assert!(!is_ca);
        assert_eq!(admin.cert_chain_der[1], ca.cert_der());
        // Not usable as a server certificate (no server-auth usage).
        assert!(!server_cert_valid(
            &ca.cert_der(),
            &admin.cert_chain_der[0],
            ADMIN_DNS_NAME
        ));
    }

    #[test]
    fn debug_shows_no_key() {
        let ca = ClusterCa::generate().expect("ca");
        let shown = format!("{ca:?}");
        assert!(shown.contains("fingerprint"));
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
