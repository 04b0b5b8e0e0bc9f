//! Writes the checked-in seed corpora under `fuzz/corpus/<target>/`:
//! valid encodings of real values for every target, plus edge cases. Run
//! once from `fuzz/` with `cargo run --example gen_corpus`; it overwrites
//! the files it writes and leaves others (e.g. minimised finds) alone.
//!
//! The seeds only need to be meaningful, not exhaustive: they give the
//! fuzzer valid frames and logs to mutate from, so it does not have to
//! discover postcard layouts, checksums or a CSR's DER from scratch.

use keel::core::cache::MetadataCache;
use keel::core::codec::{self, FrameKind, Wire, FORMAT_VERSION, HEADER_LEN};
use keel::core::entry::{BatchEntries, MetadataEntry, MetadataRecord};
use keel::core::hlc::Hlc;
use keel::core::ids::{DescriptorId, GroupId, MigrationId, NodeId, VShardId};
use keel::core::kv::{KvCommand, KvQuery, KvResponse, KvStateMachine};
use keel::core::lease::DescriptorLease;
use keel::core::migration::{
    Compensation, MigrationCheckpointPayload, MigrationPhaseTag, MigrationRow, ReplicaMovePayload,
    VShardMovePayload,
};
use keel::core::routing::RoutingChange;
use keel::core::state_machine::DataStateMachine;
use keel::core::token::{JoinToken, JoinTokenTransitionKind};
use keel::core::topology::TopologyChange;
use keel::core::version::ClusterVersion;
use keel::node::join::JoinRequest;
use keel::node::rpc::{
    Committed, DataBody, DataRecord, NodeError, NodeStatus, Outcome, RaftFrame, Request, Response,
};
use keel::node::service::{ClientRequest, ClientResponse, ServiceError};
use keel_fuzz::{applier, sim_disk_recovery};
use protobuf::Message as _;
use serde_bytes::ByteBuf;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

fn node(id: u64) -> NodeId {
    NodeId::new(id).expect("non-zero")
}

fn at(wall_ms: u64, entry: MetadataEntry) -> MetadataRecord {
    MetadataRecord::new(Hlc::new(wall_ms, 0), entry)
}

/// A token with recognisable fields.
fn token(n: u8) -> JoinToken {
    JoinToken {
        ca_fingerprint: keel::core::cache::fingerprint(b"fuzz CA"),
        secret: [n; 32],
        expires_at_ms: 1_000_000 + u64::from(n),
    }
}

fn replica_row(phase: MigrationPhaseTag, attempt: u32) -> MigrationRow {
    MigrationRow::new(
        MigrationId::from_random_bytes([1; 16]),
        phase,
        attempt,
        &MigrationCheckpointPayload::Replica(ReplicaMovePayload {
            group_id: GroupId(1),
            source: node(1),
            target: node(2),
            source_was_leader: true,
            caught_up_index: 0,
            write_pause_us: None,
        }),
        3_000,
    )
}

/// A log that exercises every entry kind against the applier's bootstrap
/// cluster (node 1; four data groups): nodes 2..=4 join and become voters,
/// then DDL, routing, tokens, leases, CA rotation, migrations and batches.
fn cluster_log() -> Vec<MetadataRecord> {
    let mut log = Vec::new();
    let mut t = 1_000;
    let mut push = |entry| {
        t += 10;
        log.push(at(t, entry));
    };
    for id in 2..=4 {
        push(MetadataEntry::TopologyChange(TopologyChange::Join {
            node_id: node(id),
            addr: format!("127.0.0.1:700{id}"),
        }));
        push(MetadataEntry::TopologyChange(TopologyChange::Activate {
            node_id: node(id),
        }));
        push(MetadataEntry::TopologyChange(
            TopologyChange::PromoteToVoter { node_id: node(id) },
        ));
    }
    push(MetadataEntry::CatalogDdl {
        payload: b"CREATE TABLE t (k INT PRIMARY KEY)".to_vec(),
    });
    push(MetadataEntry::CatalogDdlAudited {
        payload: b"DROP TABLE t".to_vec(),
        auth_user_id: 42,
        auth_user_name: "admin".into(),
        sql_text: "DROP TABLE t".into(),
    });
    push(MetadataEntry::RoutingChange(RoutingChange::AddLearner {
        group_id: GroupId(1),
        node_id: node(2),
    }));
    push(MetadataEntry::RoutingChange(
        RoutingChange::PromoteLearner {
            group_id: GroupId(1),
            node_id: node(2),
        },
    ));
    push(MetadataEntry::RoutingChange(
        RoutingChange::LeadershipTransfer {
            group_id: GroupId(1),
            new_leader_node_id: node(2),
        },
    ));
    push(MetadataEntry::RoutingChange(RoutingChange::CreateGroup {
        group_id: GroupId(5),
        voters: vec![node(1), node(2), node(3)],
    }));
    push(MetadataEntry::RoutingChange(
        RoutingChange::ReassignVShard {
            vshard_id: VShardId::new(7).expect("in range"),
            new_group_id: GroupId(5),
            new_leaseholder_node_id: node(1),
        },
    ));
    let hash = token(1).hash();
    push(MetadataEntry::JoinTokenTransition {
        token_hash: hash,
        transition: JoinTokenTransitionKind::Register {
            expires_at_ms: 900_000,
        },
        ts_ms: 2_000,
    });
    push(MetadataEntry::JoinTokenTransition {
        token_hash: hash,
        transition: JoinTokenTransitionKind::Begin,
        ts_ms: 2_100,
    });
    push(MetadataEntry::Batch {
        entries: BatchEntries(vec![
            MetadataEntry::TopologyChange(TopologyChange::Join {
                node_id: node(5),
                addr: "127.0.0.1:7005".into(),
            }),
            MetadataEntry::JoinTokenTransition {
                token_hash: hash,
                transition: JoinTokenTransitionKind::Consume,
                ts_ms: 2_200,
            },
        ]),
    });
    push(MetadataEntry::DescriptorLeaseGrant(DescriptorLease {
        descriptor_id: DescriptorId(9),
        version: 3,
        node_id: node(2),
        expires_at: Hlc::new(50_000, 0),
    }));
    push(MetadataEntry::DescriptorDrainStart {
        descriptor_id: DescriptorId(9),
        up_to_version: 3,
        expires_at: Hlc::new(60_000, 0),
    });
    push(MetadataEntry::DescriptorLeaseRelease {
        node_id: node(2),
        descriptor_ids: vec![DescriptorId(9)],
    });
    push(MetadataEntry::DescriptorDrainEnd {
        descriptor_id: DescriptorId(9),
    });
    push(MetadataEntry::CaTrustChange {
        add_ca_cert: Some(b"second fuzz CA".to_vec()),
        remove_ca_fingerprint: None,
    });
    push(MetadataEntry::CaTrustChange {
        add_ca_cert: None,
        remove_ca_fingerprint: Some(keel::core::cache::fingerprint(b"fuzz CA")),
    });
    push(MetadataEntry::SurrogateAlloc { hwm: 1_000 });
    push(MetadataEntry::from(&replica_row(
        MigrationPhaseTag::AddLearner,
        1,
    )));
    push(MetadataEntry::from(&replica_row(
        MigrationPhaseTag::CatchUp,
        1,
    )));
    push(MetadataEntry::MigrationAbort {
        migration_id: MigrationId::from_random_bytes([1; 16]),
        reason: "write pause over budget".into(),
        compensations: vec![
            Compensation::RemoveLearner {
                group_id: GroupId(1),
                node_id: node(2),
            },
            Compensation::Unfence {
                vshard_id: VShardId::new(7).expect("in range"),
                group_id: GroupId(1),
            },
        ],
    });
    push(MetadataEntry::ClusterVersionBump {
        from: ClusterVersion::LATEST,
        to: ClusterVersion(ClusterVersion::LATEST.0 + 1),
    });
    push(MetadataEntry::TopologyChange(
        TopologyChange::StartDecommission { node_id: node(4) },
    ));
    log
}

fn body<T: Wire>(value: &T) -> Vec<u8> {
    codec::encode(value)[HEADER_LEN..].to_vec()
}

/// A real raft-rs message, as the runtime sends it.
fn raft_message() -> Vec<u8> {
    let mut message = raft::eraftpb::Message::default();
    message.set_msg_type(raft::eraftpb::MessageType::MsgAppend);
    message.from = 1;
    message.to = 2;
    message.term = 3;
    message.index = 10;
    message.log_term = 3;
    message.commit = 9;
    let entry = raft::eraftpb::Entry {
        index: 11,
        term: 3,
        data: at(5, MetadataEntry::SurrogateAlloc { hwm: 3 })
            .encode()
            .into(),
        ..Default::default()
    };
    message.entries = vec![entry].into();
    message.write_to_bytes().expect("raft messages encode")
}

/// Edge cases every frame decoder should see.
fn frame_edges(kind: FrameKind, valid: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut edges = vec![
        ("empty".to_string(), Vec::new()),
        ("header-only".into(), codec::seal(kind, FORMAT_VERSION, &[])),
        ("truncated".into(), valid[..valid.len() - 1].to_vec()),
        (
            "future-version".into(),
            codec::seal(kind, FORMAT_VERSION + 1, &valid[HEADER_LEN..]),
        ),
    ];
    let mut flipped = valid.to_vec();
    flipped[HEADER_LEN] ^= 0x10;
    edges.push(("bit-flip".into(), flipped));
    let mut huge = valid.to_vec();
    huge[3..7].copy_from_slice(&u32::MAX.to_be_bytes());
    edges.push(("huge-length".into(), huge));
    // A length prefix claiming far more elements than the body holds.
    edges.push((
        "claims-more".into(),
        codec::seal(kind, FORMAT_VERSION, &[0, 0xFF, 0xFF, 0xFF, 0xFF, 0x0F]),
    ));
    edges
}

struct Corpus {
    dir: PathBuf,
    names: BTreeSet<String>,
}

impl Corpus {
    fn new(root: &Path, target: &str) -> Self {
        let dir = root.join(target);
        fs::create_dir_all(&dir).expect("create the corpus directory");
        Corpus {
            dir,
            names: BTreeSet::new(),
        }
    }

    fn add(&mut self, name: &str, bytes: &[u8]) {
        assert!(
            self.names.insert(name.to_string()),
            "duplicate seed name {name}"
        );
        fs::write(self.dir.join(format!("seed-{name}")), bytes).expect("write a seed");
    }
}

fn main() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    let log = cluster_log();
    let bootstrap = applier::bootstrap();

    // metadata_entry: every entry kind as a frame, some as bare bodies.
    let mut c = Corpus::new(&root, "metadata_entry");
    for (i, record) in log.iter().enumerate() {
        c.add(&format!("{i:02}-{}", record.entry.name()), &record.encode());
    }
    for (i, record) in log.iter().enumerate().step_by(5) {
        c.add(
            &format!("body-{i:02}-{}", record.entry.name()),
            &body(record),
        );
    }
    let mut nested = MetadataEntry::SurrogateAlloc { hwm: 1 };
    for _ in 0..codec::MAX_NESTING + 1 {
        nested = MetadataEntry::Batch {
            entries: BatchEntries(vec![nested]),
        };
    }
    c.add("too-deep", &at(1, nested).encode());
    for (name, bytes) in frame_edges(FrameKind::MetadataRecord, &log[0].encode()) {
        c.add(&name, &bytes);
    }

    // envelope: one frame of every wire type, snapshots, and edge cases.
    let mut c = Corpus::new(&root, "envelope");
    let mut cache = MetadataCache::bootstrap(&bootstrap).expect("bootstrap");
    let entries: Vec<(u64, Vec<u8>)> = (1..).zip(log.iter().map(MetadataRecord::encode)).collect();
    let _ = cache.apply(&entries, &mut ());
    c.add(
        "metadata-snapshot-bootstrap",
        &MetadataCache::bootstrap(&bootstrap)
            .expect("bootstrap")
            .snapshot(),
    );
    c.add("metadata-snapshot-applied", &cache.snapshot());
    let mut kv = KvStateMachine::new();
    for (i, key) in ["a", "b", "user/17", "zz"].iter().enumerate() {
        kv.apply(
            i as u64 + 1,
            &codec::encode(&KvCommand::Put {
                key: key.as_bytes().to_vec(),
                value: vec![i as u8; 8],
            }),
        );
    }
    c.add("kv-snapshot", &kv.snapshot());
    c.add("record", &log[3].encode());
    let row = replica_row(MigrationPhaseTag::CatchUp, 2);
    c.add("migration-row", &codec::encode(&row));
    c.add("migration-payload-replica", &row.payload);
    c.add(
        "migration-payload-vshard",
        &codec::encode(&MigrationCheckpointPayload::VShard(VShardMovePayload {
            vshard_id: VShardId::new(3).expect("in range"),
            source_group: GroupId(1),
            target_group: GroupId(2),
            copy_index: 10,
            tail_index: 12,
            fenced_at_ms: Some(900),
            write_pause_us: Some(1_500),
        })),
    );
    c.add(
        "kv-cas",
        &codec::encode(&KvCommand::Cas {
            key: b"k".to_vec(),
            expected: None,
            new: Some(b"v".to_vec()),
        }),
    );
    c.add(
        "kv-query",
        &codec::encode(&KvQuery::Get { key: b"k".to_vec() }),
    );
    c.add(
        "kv-response",
        &codec::encode(&KvResponse::CasFailed {
            current: Some(b"x".to_vec()),
        }),
    );
    c.add(
        "group-state",
        &codec::encode(&keel::raft::storage::GroupState {
            term: 3,
            vote: 1,
            commit: 9,
            voters: vec![1, 2, 3],
            applied: 8,
            ..Default::default()
        }),
    );
    c.add(
        "staged-ca",
        &codec::encode(&keel::daemon::cluster_dir::StagedCa {
            cert_der: b"cert".to_vec(),
            key_der: b"key".to_vec(),
        }),
    );
    c.add(
        "body-kv-put",
        &body(&KvCommand::Put {
            key: b"a".to_vec(),
            value: b"1".to_vec(),
        }),
    );
    for (name, bytes) in frame_edges(
        FrameKind::Rpc,
        &codec::encode(&KvQuery::Get { key: b"k".to_vec() }),
    ) {
        c.add(&name, &bytes);
    }

    // rpc_frame: every request and response the node and service exchange.
    let mut c = Corpus::new(&root, "rpc_frame");
    let put = codec::encode(&KvCommand::Put {
        key: b"user/1".to_vec(),
        value: b"alice".to_vec(),
    });
    let requests = [
        (
            "raft",
            Request::Raft(vec![RaftFrame {
                group: GroupId(0),
                message: raft_message(),
            }]),
        ),
        (
            "raft-snapshot",
            Request::RaftSnapshot(RaftFrame {
                group: GroupId(2),
                message: raft_message(),
            }),
        ),
        (
            "propose-metadata",
            Request::ProposeMetadata(MetadataEntry::SurrogateAlloc { hwm: 5 }),
        ),
        (
            "propose",
            Request::Propose {
                vshard: VShardId::for_key(b"user/1"),
                group: Some(GroupId(1)),
                command: put.clone(),
            },
        ),
        (
            "read",
            Request::Read {
                vshard: VShardId::for_key(b"k"),
                query: codec::encode(&KvQuery::Get { key: b"k".to_vec() }),
            },
        ),
        ("read-metadata", Request::ReadMetadata),
        ("status", Request::Status),
        ("group-members", Request::GroupMembers { group: GroupId(2) }),
        (
            "forwarded",
            Request::Forwarded(vec![
                ByteBuf::from(codec::encode(&Request::Propose {
                    vshard: VShardId::for_key(b"user/1"),
                    group: None,
                    command: put.clone(),
                })),
                ByteBuf::from(codec::encode(&Request::ReadMetadata)),
            ]),
        ),
    ];
    for (name, request) in &requests {
        c.add(&format!("request-{name}"), &codec::encode(request));
    }
    c.add("body-request-raft", &body(&requests[0].1));
    let responses = [
        (
            "committed",
            Response::Committed(Committed {
                index: 7,
                hlc: Hlc::new(9, 1),
                outcome: Outcome::Data(codec::encode(&KvResponse::Value(None))),
            }),
        ),
        (
            "read",
            Response::Read(codec::encode(&KvResponse::Value(Some(b"v".to_vec())))),
        ),
        (
            "metadata",
            Response::Metadata(Box::new(cache.state().clone())),
        ),
        (
            "status",
            Response::Status(NodeStatus {
                node: node(1),
                routing_epoch: Some(3),
                metadata_applied: Some(10),
                groups: vec![],
                retired: false,
            }),
        ),
        ("ack", Response::Ack),
        (
            "forwarded",
            Response::Forwarded(vec![
                ByteBuf::from(codec::encode(&Response::Ack)),
                ByteBuf::from(codec::encode(&Response::Error(NodeError::Dropped))),
            ]),
        ),
        (
            "error",
            Response::Error(NodeError::NotLeader {
                group: GroupId(1),
                leader: Some(node(2)),
            }),
        ),
        ("members", Response::Members(vec![node(1), node(3)])),
        (
            "error-retired",
            Response::Error(NodeError::Retired { node: node(3) }),
        ),
    ];
    for (name, response) in &responses {
        c.add(&format!("response-{name}"), &codec::encode(response));
    }
    c.add(
        "data-record",
        &codec::encode(&DataRecord {
            hlc: Hlc::new(4, 0),
            vshard: VShardId::for_key(b"user/1"),
            epoch: 1,
            body: DataBody::Command(put),
        }),
    );
    let client_requests = [
        ("status", ClientRequest::Status),
        ("issue-token", ClientRequest::IssueToken { ttl_ms: 600_000 }),
        (
            "revoke-token",
            ClientRequest::RevokeToken {
                token: token(2).encode(),
            },
        ),
        (
            "revoke-id",
            ClientRequest::RevokeToken {
                token: "0123abcd".into(),
            },
        ),
        (
            "kv",
            ClientRequest::Kv(KvCommand::Delete { key: b"k".to_vec() }),
        ),
        (
            "get",
            ClientRequest::Get {
                key: b"k".to_vec(),
                linearizable: true,
            },
        ),
        ("remove-node", ClientRequest::RemoveNode { node: node(4) }),
        (
            "stage-ca",
            ClientRequest::StageCa {
                cert_der: b"cert".to_vec(),
                key_der: b"key".to_vec(),
            },
        ),
        ("finalize-ca", ClientRequest::FinalizeCa { keep: [3; 32] }),
        (
            "create-group",
            ClientRequest::CreateGroup {
                voters: vec![node(1), node(3)],
            },
        ),
        ("drop-group", ClientRequest::DropGroup { group: GroupId(9) }),
    ];
    for (name, request) in &client_requests {
        c.add(&format!("client-request-{name}"), &codec::encode(request));
    }
    let client_responses = [
        (
            "token",
            ClientResponse::Token {
                token: token(3).encode(),
                id: "0123456789abcdef".into(),
                expires_at_ms: 5,
            },
        ),
        ("kv", ClientResponse::Kv(KvResponse::Ok)),
        ("done", ClientResponse::Done),
        (
            "group-created",
            ClientResponse::GroupCreated {
                group: GroupId(9),
                voters: vec![node(1), node(3)],
            },
        ),
        ("error", ClientResponse::Error(ServiceError::Forbidden)),
    ];
    for (name, response) in &client_responses {
        c.add(&format!("client-response-{name}"), &codec::encode(response));
    }
    for (name, bytes) in frame_edges(FrameKind::Rpc, &codec::encode(&Request::Status)) {
        c.add(&name, &bytes);
    }

    // join_request: a real CSR with good and bad tokens, addresses, CSRs.
    let mut c = Corpus::new(&root, "join_request");
    let (_key, csr) = keel::io::pki::generate_key_and_csr().expect("a CSR");
    let good = JoinRequest {
        token: token(4).encode(),
        csr_der: csr.clone(),
        addr: "10.0.0.9:7000".into(),
    };
    let variants = [
        ("valid", good.clone()),
        (
            "token-whitespace",
            JoinRequest {
                token: format!("  {}\n", good.token),
                ..good.clone()
            },
        ),
        (
            "token-uppercase",
            JoinRequest {
                token: good.token.to_uppercase(),
                ..good.clone()
            },
        ),
        (
            "token-truncated",
            JoinRequest {
                token: good.token[..good.token.len() - 3].into(),
                ..good.clone()
            },
        ),
        (
            "address-empty",
            JoinRequest {
                addr: String::new(),
                ..good.clone()
            },
        ),
        (
            "address-long",
            JoinRequest {
                addr: "h".repeat(300),
                ..good.clone()
            },
        ),
        (
            "csr-truncated",
            JoinRequest {
                csr_der: csr[..csr.len() / 2].to_vec(),
                ..good.clone()
            },
        ),
        (
            "csr-empty",
            JoinRequest {
                csr_der: Vec::new(),
                ..good.clone()
            },
        ),
    ];
    for (name, request) in &variants {
        c.add(
            &format!("frame-{name}"),
            &codec::encode(&ClientRequest::Join(request.clone())),
        );
        let mut split = Vec::new();
        split.extend_from_slice(&(request.token.len() as u16).to_be_bytes());
        split.extend_from_slice(request.token.as_bytes());
        split.extend_from_slice(&(request.addr.len() as u16).to_be_bytes());
        split.extend_from_slice(request.addr.as_bytes());
        split.extend_from_slice(&request.csr_der);
        c.add(&format!("split-{name}"), &split);
    }
    let mut flipped = csr.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 1;
    c.add(
        "frame-csr-bad-signature",
        &codec::encode(&ClientRequest::Join(JoinRequest {
            csr_der: flipped,
            ..good.clone()
        })),
    );
    c.add("body-valid", &body(&ClientRequest::Join(good)));

    // token: good tokens and every kind of refusal.
    let mut c = Corpus::new(&root, "token");
    let good = token(5).encode();
    c.add("valid", good.as_bytes());
    c.add(
        "valid-zero",
        JoinToken {
            ca_fingerprint: [0; 32],
            secret: [0; 32],
            expires_at_ms: 0,
        }
        .encode()
        .as_bytes(),
    );
    c.add("valid-padded", format!("\t {good} \r\n").as_bytes());
    c.add("uppercase", good.to_uppercase().as_bytes());
    c.add("wrong-prefix", good.replacen("v1", "v2", 1).as_bytes());
    c.add("short", &good.as_bytes()[..good.len() - 1]);
    c.add("long", format!("{good}0").as_bytes());
    let mut bad_sum = good.clone().into_bytes();
    let end = bad_sum.len() - 1;
    bad_sum[end] = if bad_sum[end] == b'0' { b'1' } else { b'0' };
    c.add("bad-checksum", &bad_sum);
    let mut no_dot = good.clone().into_bytes();
    no_dot[keel::core::token::TOKEN_LEN - 9] = b'0';
    c.add("missing-separator", &no_dot);
    c.add("non-hex", good.replacen('a', "g", 1).as_bytes());
    c.add("multibyte", good.replacen('a', "é", 1).as_bytes());
    c.add("prefix-only", keel::core::token::TOKEN_PREFIX.as_bytes());
    c.add("empty", b"");
    c.add("invalid-utf8", &[0xFF, 0xFE, b'k', b'e', b'e', b'l']);

    // applier: programs (see targets/applier.rs for the format).
    let mut c = Corpus::new(&root, "applier");
    let record_op = |out: &mut Vec<u8>, record: &MetadataRecord, flush: bool| {
        let body = body(record);
        out.push(applier::RECORD | if flush { applier::FLUSH } else { 0 });
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(&body);
    };
    let mut whole = Vec::new();
    for (i, record) in log.iter().enumerate() {
        record_op(&mut whole, record, i % 4 == 3);
    }
    c.add("cluster-log", &whole);
    for (i, chunk) in log.chunks(6).enumerate() {
        let mut program = Vec::new();
        // Chunks after the first need the joins of the first to make sense.
        for record in log.iter().take(9).chain(chunk) {
            record_op(&mut program, record, false);
        }
        c.add(&format!("cluster-log-part-{i}"), &program);
    }
    let mut program = Vec::new();
    record_op(&mut program, &log[0], false);
    program.push(applier::NOOP);
    program.extend_from_slice(&[applier::SKIP, (-2i8) as u8]);
    record_op(&mut program, &log[0], true);
    record_op(&mut program, &log[1], false);
    c.add("replay", &program);
    let mut program = Vec::new();
    record_op(&mut program, &log[0], false);
    program.extend_from_slice(&[applier::SKIP, 3]);
    record_op(&mut program, &log[1], false);
    c.add("gap", &program);
    let mut program = Vec::new();
    record_op(&mut program, &log[0], false);
    program.extend_from_slice(&[applier::RAW, 0, 4, 1, 2, 3, 4]);
    record_op(&mut program, &log[1], false);
    c.add("undecodable", &program);
    let mut corrupt = replica_row(MigrationPhaseTag::AddLearner, 1);
    corrupt.crc32c ^= 1;
    let mut program = Vec::new();
    record_op(&mut program, &at(5, MetadataEntry::from(&corrupt)), false);
    c.add("corrupt-checkpoint", &program);
    c.add(
        "noops",
        &[applier::NOOP, applier::NOOP | applier::FLUSH, applier::NOOP],
    );

    // sim_disk_recovery: headers (see targets/sim_disk_recovery.rs).
    let mut c = Corpus::new(&root, "sim_disk_recovery");
    let header = |flags: u8, batches: u8, keep: u8, errors: u8, truncate: u8, seed: u8| {
        vec![
            flags, batches, keep, errors, truncate, 0, 0, 0, 0, 0, 0, seed,
        ]
    };
    use sim_disk_recovery::{CRASH, TRUNCATE};
    c.add("pristine", &header(0, 0, 0, 0, 0, 0));
    c.add("crash-clean", &header(CRASH, 3, 0, 0, 0, 1));
    c.add("crash-torn", &header(CRASH, 7, 128, 40, 0, 2));
    c.add("crash-keep-all", &header(CRASH, 5, 255, 80, 0, 3));
    c.add("truncate-half", &header(TRUNCATE, 0, 0, 0, 128, 4));
    let image_len = sim_disk_recovery::base_image().len();
    for (name, offset, bytes) in [
        ("patch-magic", 0u32, vec![0xFF; 4]),
        ("patch-header", 64, vec![0x01]),
        ("patch-commit-slot", 512, vec![0x80, 0x01]),
        ("patch-middle", image_len as u32 / 2, vec![0x5A; 16]),
        ("patch-tail", image_len as u32 - 8, vec![0x01; 8]),
    ] {
        let mut input = header(0, 0, 0, 0, 0, 5);
        input.extend_from_slice(&offset.to_be_bytes());
        input.push(bytes.len() as u8);
        input.extend_from_slice(&bytes);
        c.add(name, &input);
    }
    println!(
        "base image: {image_len} bytes; corpora written under {}",
        root.display()
    );
}
