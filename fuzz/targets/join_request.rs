//! The `join_request` target: the admission path of a joining node
//! (src/node/join.rs), from the bytes an anonymous caller sends.
//!
//! `admit` needs a running node (it commits token transitions to group 0),
//! so the target drives the part of it that untrusted input reaches before
//! any cluster state is read: decoding the client frame
//! (`service::serve`), then `join::check_request` — the token string, the
//! address and the certificate signing request, in that order, exactly as
//! `admit` calls it. Outside the simulator build the CSR goes through the
//! production check (`io::pki`, x509-parser and ring); in the `madsim` build
//! through the simulator's stand-in rule (non-empty).
//!
//! Each input is read three ways: as a whole `ClientRequest` frame, as a
//! `ClientRequest` body behind a valid header, and split directly into the
//! three fields (`u16 len | token | u16 len | addr | csr`) so that the
//! fuzzer can mutate a CSR without keeping postcard lengths in step.

use super::wire::{decode_checked, decode_sealed};
use super::{alloc, check_message, Verdict};
use keel::core::cache::fingerprint;
use keel::core::entry::CertFingerprint;
use keel::core::ids::NodeId;
use keel::core::token::JoinToken;
use keel::core::topology::MAX_ADDR_LEN;
use keel::node::join::{check_request, Issuer, JoinError, JoinRequest};
use keel::node::service::ClientRequest;

/// Checks CSRs as the node's real issuer does; never signs (nothing the
/// target reaches may sign before the token is committed).
struct FuzzIssuer;

impl Issuer for FuzzIssuer {
    fn fingerprint(&self) -> CertFingerprint {
        fingerprint(b"fuzz CA")
    }

    fn check_csr(&self, csr_der: &[u8]) -> Result<(), String> {
        #[cfg(not(madsim))]
        {
            keel::io::pki::ClusterCa::check_csr(csr_der).map_err(|e| e.to_string())
        }
        #[cfg(madsim)]
        {
            // sim/src/credentials.rs: the simulator only refuses empty CSRs.
            if csr_der.is_empty() {
                Err("the CSR is empty".into())
            } else {
                Ok(())
            }
        }
    }

    fn sign(&self, _node: NodeId, _csr_der: &[u8]) -> Result<Vec<u8>, String> {
        panic!("check_request signed a certificate before the token was committed");
    }

    fn credentials(&self) -> (Vec<u8>, Vec<u8>) {
        panic!("check_request handed out the CA before the token was committed");
    }
}

/// The fuzz target body; see the module documentation.
pub fn join_request(data: &[u8]) -> Verdict {
    let framed = [
        decode_checked::<ClientRequest>(data),
        decode_sealed::<ClientRequest>(data),
    ];
    let mut verdict = Verdict::Rejected;
    for request in framed.iter().flatten() {
        if let ClientRequest::Join(join) = request {
            verdict = verdict.or(check(join));
        }
    }
    if let Some(join) = split(data) {
        verdict = verdict.or(check(&join));
    }
    verdict
}

/// `u16 len | token | u16 len | addr | csr`, lengths big-endian and
/// clamped to what is there; text fields lossily decoded as UTF-8.
fn split(data: &[u8]) -> Option<JoinRequest> {
    fn field<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
        let (len, tail) = rest.split_first_chunk::<2>()?;
        let len = usize::from(u16::from_be_bytes(*len)).min(tail.len());
        let (field, tail) = tail.split_at(len);
        *rest = tail;
        Some(field)
    }
    let mut rest = data;
    let token = String::from_utf8_lossy(field(&mut rest)?).into_owned();
    let addr = String::from_utf8_lossy(field(&mut rest)?).into_owned();
    Some(JoinRequest {
        token,
        csr_der: rest.to_vec(),
        addr,
    })
}

/// Runs `check_request` and checks its answer against the rules it
/// promises: the first failing check names the error, an accepted request
/// carries the parsed token, and no error or log line repeats the token.
fn check(request: &JoinRequest) -> Verdict {
    let size = request.token.len() + request.addr.len() + request.csr_der.len();
    let result = alloc::bounded("join::check_request", size, || {
        check_request(&FuzzIssuer, request)
    });
    let token = JoinToken::parse(&request.token);
    let addr_ok = !request.addr.is_empty() && request.addr.len() <= MAX_ADDR_LEN;
    match &result {
        Ok(parsed) => {
            assert_eq!(
                Ok(parsed),
                token.as_ref(),
                "accepted another token than was sent"
            );
            assert!(addr_ok, "accepted the address {:?}", request.addr);
            assert!(FuzzIssuer.check_csr(&request.csr_der).is_ok());
        }
        Err(e) => {
            check_message(e);
            match (&token, e) {
                (Err(parse), JoinError::BadToken(reported)) => assert_eq!(parse, reported),
                (Err(_), other) => panic!("a bad token was reported as {other:?}"),
                (Ok(_), JoinError::BadAddress { addr }) => {
                    assert!(!addr_ok, "a usable address was refused");
                    assert!(
                        addr.chars().count() <= 64,
                        "the error echoes a long address"
                    );
                }
                (Ok(_), JoinError::BadCsr(_)) => assert!(addr_ok),
                (Ok(_), other) => panic!("a pure check failed with {other:?}"),
            }
        }
    }
    // A well-formed token is a secret: it must not leak into what is logged
    // or sent back (unless the caller also put it in the address, which is
    // echoed on purpose).
    let secret = request.token.trim();
    if token.is_ok() && !request.addr.contains(secret) {
        assert!(
            !format!("{request:?}").contains(secret),
            "Debug shows the token"
        );
        if let Err(e) = &result {
            assert!(
                !e.to_string().contains(secret),
                "the error repeats the token"
            );
        }
    }
    Verdict::of(&result)
}
