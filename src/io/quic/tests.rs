use super::tls::parse_node_name;
use super::*;
use crate::io::pki::ClusterCa;
use crate::io::transport::Inbound;
use crate::io::transport::{spawn_echo, DEFAULT_CALL_TIMEOUT};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rustls::pki_types::CertificateDer;

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
