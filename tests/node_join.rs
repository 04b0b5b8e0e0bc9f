//! Joining with single-use tokens through the node's client service, on
//! in-process clusters: the token lifecycle committed to group 0, the
//! errors a joiner sees, the dead-man timer, and joins while the bootstrap
//! node is down. Certificates are stood in for by a test issuer; the real
//! CA (rcgen) and QUIC are exercised by the real-process tests.

mod common;

use common::service::*;
use common::*;
use keel::core::cache::fingerprint;
use keel::core::entry::MetadataEntry;
use keel::core::ids::{GroupId, NodeId};
use keel::core::token::{JoinToken, JoinTokenTransitionKind, TokenState};
use keel::core::topology::NodeState;
use keel::node::join::{JoinError, JoinGrant, JoinRequest};
use keel::node::rpc::Outcome;
use keel::node::service::{serve, Caller, ClientRequest, ClientResponse, ServiceError};
use keel::node::Node;
use std::time::Duration;

async fn issue(node: &Node, ttl_ms: u64) -> String {
    match call(node, Caller::Admin, ClientRequest::IssueToken { ttl_ms }).await {
        ClientResponse::Token { token, .. } => token,
        other => panic!("token not issued: {other:?}"),
    }
}

fn join_request(token: &str, csr: &[u8]) -> ClientRequest {
    ClientRequest::Join(JoinRequest {
        token: token.to_owned(),
        csr_der: csr.to_vec(),
        addr: "joiner:7000".into(),
    })
}

async fn join(node: &Node, token: &str) -> Result<JoinGrant, ServiceError> {
    match call(node, Caller::Anonymous, join_request(token, b"csr")).await {
        ClientResponse::Joined(grant) => Ok(grant),
        ClientResponse::Error(e) => Err(e),
        other => panic!("unexpected answer to a join: {other:?}"),
    }
}

fn refused(result: Result<JoinGrant, ServiceError>) -> JoinError {
    match result {
        Err(ServiceError::Join(e)) => e,
        other => panic!("expected a refused join, got {other:?}"),
    }
}

async fn token_state(node: &Node, token: &str) -> Option<TokenState> {
    let hash = JoinToken::parse(token).unwrap().hash();
    let state = node.metadata().await.unwrap();
    state.tokens.get(&hash).map(|r| r.state)
}

/// Admits a node with a fresh token through `via` and starts it under the
/// id the cluster assigned.
async fn admit_and_start(c: &mut Cluster, via: NodeId) -> NodeId {
    let token = issue(c.node(via), 60_000).await;
    let grant = join(c.node(via), &token).await.expect("join admitted");
    assert_eq!(grant.trusted_cas_der, vec![TEST_CA.to_vec()]);
    assert_eq!(
        grant.cert_der,
        format!("cert of node {} for csr", grant.node_id).into_bytes()
    );
    assert!(grant.peers.iter().any(|(id, _)| *id == via));
    c.start(grant.node_id, None);
    grant.node_id
}

async fn await_active(c: &Cluster, id: NodeId) {
    let node = c.node(id).clone();
    eventually(&format!("node {id} active"), || {
        let node = node.clone();
        async move {
            let state = node.metadata_local().await.ok()?;
            matches!(state.topology.get(id)?.state, NodeState::Active(_)).then_some(())
        }
    })
    .await
}

#[tokio::test]
async fn a_token_admits_exactly_one_node() {
    let mut c = Cluster::new();
    c.form_on(1).await;
    let token = issue(c.node(n(1)), 60_000).await;
    assert_eq!(
        token_state(c.node(n(1)), &token).await,
        Some(TokenState::Issued)
    );

    let grant = join(c.node(n(1)), &token).await.expect("first use admits");
    assert_eq!(grant.node_id, n(2));
    assert_eq!(grant.cluster_id, [9; 16]);
    assert_eq!(grant.ca_key_der, b"test CA key".to_vec());
    assert_eq!(
        token_state(c.node(n(1)), &token).await,
        Some(TokenState::Consumed)
    );
    c.start(grant.node_id, None);
    await_active(&c, n(2)).await;

    // The same token again, through either node: refused, and no node added.
    assert_eq!(
        refused(join(c.node(n(1)), &token).await),
        JoinError::AlreadyUsed
    );
    assert_eq!(
        refused(join(c.node(n(2)), &token).await),
        JoinError::AlreadyUsed
    );
    let state = c.node(n(1)).metadata().await.unwrap();
    assert_eq!(state.topology.len(), 2);

    // A second token admits the next id.
    let id = admit_and_start(&mut c, n(2)).await;
    assert_eq!(id, n(3));
    await_active(&c, id).await;

    // A joiner that was admitted but never started (its process died
    // before storing its certificate) is removed by the operator; an active
    // node cannot be removed that way.
    let token = issue(c.node(n(1)), 60_000).await;
    let ghost = join(c.node(n(1)), &token).await.expect("admitted").node_id;
    assert_eq!(ghost, n(4));
    let remove = |node| ClientRequest::RemoveNode { node };
    assert_eq!(
        call(c.node(n(2)), Caller::Admin, remove(ghost)).await,
        ClientResponse::Done
    );
    let state = c.node(n(1)).metadata().await.unwrap();
    assert!(state.topology.get(ghost).is_none());
    assert!(state.topology.is_retired(ghost));
    match call(c.node(n(1)), Caller::Admin, remove(n(2))).await {
        ClientResponse::Error(ServiceError::BadRequest(reason)) => {
            assert!(reason.contains("active"), "{reason}")
        }
        other => panic!("removing an active node was not refused: {other:?}"),
    }
}

#[tokio::test]
async fn unusable_tokens_and_requests_are_refused_with_the_reason() {
    let mut c = Cluster::new();
    c.form_on(1).await;
    let node = c.node(n(1)).clone();

    // Revoked, by id prefix.
    let token = issue(&node, 60_000).await;
    let id = keel::node::service::token_id(&JoinToken::parse(&token).unwrap().hash());
    let revoked = call(
        &node,
        Caller::Admin,
        ClientRequest::RevokeToken {
            token: id[..10].to_owned(),
        },
    )
    .await;
    assert_eq!(revoked, ClientResponse::Done);
    assert_eq!(refused(join(&node, &token).await), JoinError::Revoked);

    // Never registered here, and from another cluster.
    let mut forged = JoinToken::parse(&issue(&node, 60_000).await).unwrap();
    forged.secret = [7; 32];
    assert_eq!(
        refused(join(&node, &forged.encode()).await),
        JoinError::UnknownToken
    );
    forged.ca_fingerprint = [1; 32];
    assert_eq!(
        refused(join(&node, &forged.encode()).await),
        JoinError::WrongCluster
    );

    // Mistyped.
    let good = issue(&node, 60_000).await;
    let mut typo = good.clone();
    typo.replace_range(20..21, if &good[20..21] == "a" { "b" } else { "a" });
    assert!(matches!(
        refused(join(&node, &typo).await),
        JoinError::BadToken(_)
    ));

    // A bad CSR or address is refused before the token is touched.
    match call(&node, Caller::Anonymous, join_request(&good, b"bad csr")).await {
        ClientResponse::Error(ServiceError::Join(JoinError::BadCsr(_))) => {}
        other => panic!("bad CSR not refused: {other:?}"),
    }
    let mut request = JoinRequest {
        token: good.clone(),
        csr_der: b"csr".to_vec(),
        addr: String::new(),
    };
    match call(
        &node,
        Caller::Anonymous,
        ClientRequest::Join(request.clone()),
    )
    .await
    {
        ClientResponse::Error(ServiceError::Join(JoinError::BadAddress { .. })) => {}
        other => panic!("empty address not refused: {other:?}"),
    }
    assert_eq!(token_state(&node, &good).await, Some(TokenState::Issued));
    request.addr = "joiner:7000".into();

    // Expired: the leader's sweep expires it, and a join is refused.
    let short = issue(&node, 1).await;
    eventually("the short token expires", || {
        let node = node.clone();
        let short = short.clone();
        async move { (token_state(&node, &short).await == Some(TokenState::Expired)).then_some(()) }
    })
    .await;
    assert_eq!(refused(join(&node, &short).await), JoinError::Expired);

    // Anonymous callers may only join; garbage is a clear error.
    assert_eq!(
        call(&node, Caller::Anonymous, ClientRequest::Status).await,
        ClientResponse::Error(ServiceError::Forbidden)
    );
    assert_eq!(
        call(
            &node,
            Caller::Anonymous,
            ClientRequest::IssueToken { ttl_ms: 1000 }
        )
        .await,
        ClientResponse::Error(ServiceError::Forbidden)
    );
    let garbage = serve(
        &node,
        &TestCredentials::default(),
        Caller::Admin,
        b"\x00garbage",
    )
    .await;
    assert!(matches!(
        keel::core::codec::decode::<ClientResponse>(&garbage).unwrap(),
        ClientResponse::Error(ServiceError::BadRequest(_))
    ));
    assert!(matches!(
        call(
            &node,
            Caller::Admin,
            ClientRequest::IssueToken { ttl_ms: 0 }
        )
        .await,
        ClientResponse::Error(ServiceError::BadRequest(_))
    ));

    // The good token still works after all that.
    match call(&node, Caller::Anonymous, ClientRequest::Join(request)).await {
        ClientResponse::Joined(grant) => assert_eq!(grant.node_id, n(2)),
        other => panic!("good token refused: {other:?}"),
    }
}

#[tokio::test]
async fn the_dead_man_timer_gives_back_a_token_whose_joiner_vanished() {
    let mut c = Cluster::new();
    c.join_dead_man = Duration::from_millis(300);
    c.form_on(1).await;
    let node = c.node(n(1)).clone();
    let token = issue(&node, 60_000).await;
    // A joiner that presented the token and vanished: only `Begin` committed.
    let begun = node
        .propose_metadata(MetadataEntry::JoinTokenTransition {
            token_hash: JoinToken::parse(&token).unwrap().hash(),
            transition: JoinTokenTransitionKind::Begin,
            ts_ms: node.now_ms(),
        })
        .await
        .unwrap();
    assert_eq!(begun.outcome, Outcome::Metadata(None));
    assert_eq!(refused(join(&node, &token).await), JoinError::InUse);
    eventually("the dead-man timer reverts the token", || {
        let node = node.clone();
        let token = token.clone();
        async move { (token_state(&node, &token).await == Some(TokenState::Issued)).then_some(()) }
    })
    .await;
    let grant = join(&node, &token)
        .await
        .expect("the reverted token admits");
    assert_eq!(grant.node_id, n(2));
}

#[tokio::test]
async fn joins_work_while_the_bootstrap_node_is_down() {
    let mut c = Cluster::new();
    c.form_on(1).await;
    for _ in 0..2 {
        let id = admit_and_start(&mut c, n(1)).await;
        await_active(&c, id).await;
    }
    c.await_metadata_voters(3).await;
    c.crash(n(1)).await;
    let id = admit_and_start(&mut c, n(2)).await;
    assert_eq!(id, n(4));
    await_active(&c, id).await;
    let group0 = c.node(id).group(GroupId::METADATA).await.unwrap();
    assert!(group0.is_some(), "the new node hosts group 0");
}

#[tokio::test]
async fn staging_a_ca_trusts_it_cluster_wide_and_finalizing_keeps_only_it() {
    let mut c = Cluster::new();
    c.form_on(1).await;
    let node = c.node(n(1)).clone();
    let credentials = TestCredentials::default();
    let stage = ClientRequest::StageCa {
        cert_der: b"new CA".to_vec(),
        key_der: b"new key".to_vec(),
    };
    let bytes = serve(
        &node,
        &credentials,
        Caller::Admin,
        &keel::core::codec::encode(&stage),
    )
    .await;
    assert_eq!(
        keel::core::codec::decode::<ClientResponse>(&bytes).unwrap(),
        ClientResponse::Done
    );
    assert_eq!(
        *credentials.installed.lock().unwrap(),
        vec![b"new CA".to_vec()]
    );
    let state = node.metadata().await.unwrap();
    assert!(state.ca_trust.contains_key(&fingerprint(b"new CA")));
    assert!(state.ca_trust.contains_key(&fingerprint(TEST_CA)));

    // The test credentials still present a certificate from the old CA, so
    // finalizing onto the new one is refused; keeping the old one works.
    let finalize_new = ClientRequest::FinalizeCa {
        keep: fingerprint(b"new CA"),
    };
    assert!(matches!(
        call(&node, Caller::Admin, finalize_new).await,
        ClientResponse::Error(ServiceError::Ca(_))
    ));
    let finalize_old = ClientRequest::FinalizeCa {
        keep: fingerprint(TEST_CA),
    };
    assert_eq!(
        call(&node, Caller::Admin, finalize_old).await,
        ClientResponse::Done
    );
    let state = node.metadata().await.unwrap();
    assert_eq!(
        state.ca_trust.keys().copied().collect::<Vec<_>>(),
        vec![fingerprint(TEST_CA)]
    );
}
