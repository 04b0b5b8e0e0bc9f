use super::*;
use crate::core::arbitrary;
use crate::core::hooks::AppliedEvent;
use crate::core::ids::{DescriptorId, VShardId};
use crate::core::lease::DescriptorLease;
use crate::core::migration::Compensation;
use crate::core::migration::{MigrationCheckpointPayload, MigrationPhaseTag, ReplicaMovePayload};
use crate::core::routing::RoutingChange;
use crate::core::token::{JoinTokenTransitionKind, TokenState};
use crate::core::topology::{NodeState, TopologyChange};
use proptest::prelude::*;

fn n(id: u64) -> NodeId {
    NodeId::new(id).unwrap()
}

fn bootstrap() -> MetadataCache {
    MetadataCache::bootstrap(&Bootstrap {
        cluster_id: [7; 16],
        node_id: n(1),
        addr: "127.0.0.1:7001".into(),
        data_groups: 4,
        replication_factor: 3,
        ca_cert_der: b"ca-one".to_vec(),
    })
    .unwrap()
}

/// Joins nodes 2..=5 and makes them active voters, so that random logs
/// applied after it can place replicas.
fn cluster_prefix() -> Vec<MetadataEntry> {
    let mut entries = Vec::new();
    for id in 2..=5 {
        entries.push(MetadataEntry::TopologyChange(TopologyChange::Join {
            node_id: n(id),
            addr: format!("127.0.0.1:700{id}"),
        }));
        entries.push(MetadataEntry::TopologyChange(TopologyChange::Activate {
            node_id: n(id),
        }));
        entries.push(MetadataEntry::TopologyChange(
            TopologyChange::PromoteToVoter { node_id: n(id) },
        ));
    }
    entries
}

/// Encodes records at consecutive indexes starting at `first`.
fn log_of(first: u64, records: &[MetadataRecord]) -> Vec<(u64, Vec<u8>)> {
    (first..)
        .zip(records.iter().map(MetadataRecord::encode))
        .collect()
}

fn at(wall_ms: u64, entry: MetadataEntry) -> MetadataRecord {
    MetadataRecord::new(Hlc::new(wall_ms, 0), entry)
}

/// Applies entries at consecutive indexes after the current one.
fn apply_entries(
    cache: &mut MetadataCache,
    entries: Vec<MetadataEntry>,
    events: &mut Vec<AppliedEvent>,
) -> Result<u64, FailStop> {
    let first = cache.applied_index() + 1;
    let records: Vec<_> = entries.into_iter().map(|e| at(1_000, e)).collect();
    cache.apply(&log_of(first, &records), events)
}

fn last_rejection(cache: &MetadataCache) -> &RejectReason {
    &cache
        .state()
        .recent_rejections
        .back()
        .expect("a rejection")
        .reason
}

#[test]
fn empty_payload_is_a_noop_that_advances_the_index() {
    let mut cache = bootstrap();
    let before = cache.state().clone();
    let applied = cache
        .apply(&[(1, Vec::new()), (2, Vec::new())], &mut ())
        .unwrap();
    assert_eq!(applied, 2);
    assert_eq!(
        MetadataState {
            applied_index: 0,
            ..cache.state().clone()
        },
        before
    );
}

#[test]
fn replay_at_or_below_applied_index_is_ignored() {
    let mut cache = bootstrap();
    let log = log_of(
        1,
        &[at(
            5,
            MetadataEntry::CatalogDdl {
                payload: b"t".to_vec(),
            },
        )],
    );
    let mut events = Vec::new();
    cache.apply(&log, &mut events).unwrap();
    let snapshot = cache.snapshot();
    cache.apply(&log, &mut events).unwrap();
    assert_eq!(cache.snapshot(), snapshot);
    assert_eq!(
        events.len(),
        1,
        "replayed entry must not reach the host twice"
    );
    assert_eq!(cache.state().ddl_applied, 1);
}

#[test]
fn stale_version_bump_is_rejected_deterministically() {
    let mut cache = bootstrap();
    let current = cache.state().cluster_version;
    apply_entries(
        &mut cache,
        vec![MetadataEntry::ClusterVersionBump {
            from: ClusterVersion::V1,
            to: ClusterVersion(7),
        }],
        &mut Vec::new(),
    )
    .unwrap();
    assert_eq!(cache.state().cluster_version, current);
    assert_eq!(cache.state().rejected_total, 1);
    assert!(matches!(
        last_rejection(&cache),
        RejectReason::Version(VersionError::StaleBump { .. })
    ));
    assert_eq!(
        cache.applied_index(),
        1,
        "a rejection still advances the index"
    );
}

#[test]
fn bump_to_a_version_this_binary_does_not_know_fail_stops() {
    let mut cache = bootstrap();
    let from = cache.state().cluster_version;
    let err = apply_entries(
        &mut cache,
        vec![MetadataEntry::ClusterVersionBump {
            from,
            to: ClusterVersion(from.0 + 1),
        }],
        &mut Vec::new(),
    )
    .unwrap_err();
    assert!(matches!(err.cause, FailCause::UnsupportedVersion(_)));
    assert_eq!(cache.applied_index(), 0);
}

#[test]
fn audited_ddl_is_gated_on_the_cluster_version() {
    let mut state = bootstrap().state().clone();
    state.cluster_version = ClusterVersion::V1;
    let mut cache = MetadataCache::from_state(state);
    let audited = MetadataEntry::CatalogDdlAudited {
        payload: b"create".to_vec(),
        auth_user_id: 1,
        auth_user_name: "root".into(),
        sql_text: "CREATE TABLE t ()".into(),
    };
    let mut events = Vec::new();
    apply_entries(&mut cache, vec![audited.clone()], &mut events).unwrap();
    assert!(events.is_empty());
    assert!(matches!(
        last_rejection(&cache),
        RejectReason::Version(VersionError::NotYetAllowed { .. })
    ));
    apply_entries(
        &mut cache,
        vec![
            MetadataEntry::ClusterVersionBump {
                from: ClusterVersion::V1,
                to: ClusterVersion::V2_AUDITED_DDL,
            },
            audited,
        ],
        &mut events,
    )
    .unwrap();
    assert_eq!(cache.state().audited_ddl_applied, 1);
    match &events[..] {
        [AppliedEvent::AuditedDdl { audit, .. }] => {
            assert_eq!(audit.index, 3);
            assert_eq!(audit.committed_at, Hlc::new(1_000, 0));
            assert_eq!(audit.sql_text, "CREATE TABLE t ()");
        }
        other => panic!("unexpected events {other:?}"),
    }
}

#[test]
fn lease_grant_during_active_drain_is_rejected() {
    let mut cache = bootstrap();
    let d = DescriptorId(9);
    let grant = |version, expires| {
        MetadataEntry::DescriptorLeaseGrant(DescriptorLease {
            descriptor_id: d,
            version,
            node_id: n(1),
            expires_at: Hlc::new(expires, 0),
        })
    };
    let log = [
        at(
            100,
            MetadataEntry::DescriptorDrainStart {
                descriptor_id: d,
                up_to_version: 3,
                expires_at: Hlc::new(500, 0),
            },
        ),
        at(200, grant(3, 1_000)), // refused: drain active, version <= 3
        at(300, grant(4, 1_000)), // allowed: above the drained versions
        at(600, grant(2, 1_000)), // allowed: the drain expired at 500 (log time)
    ];
    cache.apply(&log_of(1, &log), &mut ()).unwrap();
    assert_eq!(cache.state().rejected_total, 1);
    assert_eq!(cache.state().recent_rejections[0].index, 2);
    assert!(matches!(
        cache.state().recent_rejections[0].reason,
        RejectReason::Lease(LeaseError::Draining { .. })
    ));
    assert_eq!(cache.state().leases.leases().count(), 2);
}

#[test]
fn illegal_token_transition_is_rejected_and_single_use_holds() {
    let mut cache = bootstrap();
    let hash = [5u8; 32];
    let step = |transition, ts_ms| MetadataEntry::JoinTokenTransition {
        token_hash: hash,
        transition,
        ts_ms,
    };
    apply_entries(
        &mut cache,
        vec![
            step(JoinTokenTransitionKind::Consume, 10), // not registered: rejected
            step(
                JoinTokenTransitionKind::Register {
                    expires_at_ms: 1_000,
                },
                10,
            ),
            step(JoinTokenTransitionKind::Begin, 20),
            step(JoinTokenTransitionKind::Consume, 30),
            step(JoinTokenTransitionKind::Begin, 40), // consumed: rejected
            step(
                JoinTokenTransitionKind::Register {
                    expires_at_ms: 2_000,
                },
                50,
            ), // reuse: rejected
        ],
        &mut Vec::new(),
    )
    .unwrap();
    assert_eq!(
        cache.state().tokens.get(&hash).unwrap().state,
        TokenState::Consumed
    );
    assert_eq!(cache.state().rejected_total, 3);
    assert!(cache
        .state()
        .recent_rejections
        .iter()
        .all(|r| matches!(r.reason, RejectReason::Token(_))));
}

fn replica_checkpoint(phase: MigrationPhaseTag, attempt: u32) -> MigrationRow {
    MigrationRow::new(
        MigrationId::from_random_bytes([1; 16]),
        phase,
        attempt,
        &MigrationCheckpointPayload::Replica(ReplicaMovePayload {
            group_id: GroupId(1),
            source: n(1),
            target: n(2),
            source_was_leader: true,
            caught_up_index: 0,
            write_pause_us: None,
        }),
        42,
    )
}

/// A created group is dropped only while no migration changes it; its
/// founders must be nodes that can host it.
#[test]
fn groups_are_created_on_active_nodes_and_dropped_outside_migrations() {
    use crate::core::routing::RoutingChange;
    let mut cache = bootstrap();
    let mut events = Vec::new();
    apply_entries(&mut cache, cluster_prefix(), &mut events).unwrap();
    let group = cache.state().routing.next_group_id();
    let create = |voters: Vec<NodeId>| {
        MetadataEntry::RoutingChange(RoutingChange::CreateGroup {
            group_id: group,
            voters,
        })
    };
    let last_reason = |cache: &MetadataCache| {
        cache
            .state()
            .recent_rejections
            .back()
            .map(|r| r.reason.clone())
    };
    apply_entries(&mut cache, vec![create(vec![n(2), n(9)])], &mut events).unwrap();
    assert!(matches!(
        last_reason(&cache),
        Some(RejectReason::NodeNotActive { node_id, .. }) if node_id == n(9)
    ));
    apply_entries(&mut cache, vec![create(vec![n(2), n(3)])], &mut events).unwrap();
    assert_eq!(
        cache.state().routing.group(group).unwrap().founders,
        [n(2), n(3)]
    );
    let mut moving = replica_checkpoint(MigrationPhaseTag::AddLearner, 0);
    moving.migration_id = MigrationId::from_random_bytes([7; 16]);
    let mut payload = match moving.verify().unwrap() {
        MigrationCheckpointPayload::Replica(p) => p,
        other => panic!("{other:?}"),
    };
    payload.group_id = group;
    payload.source = n(2);
    payload.target = n(4);
    let moving = MigrationRow::new(
        moving.migration_id,
        MigrationPhaseTag::AddLearner,
        0,
        &MigrationCheckpointPayload::Replica(payload),
        42,
    );
    let drop = MetadataEntry::RoutingChange(RoutingChange::DropGroup { group_id: group });
    apply_entries(
        &mut cache,
        vec![MetadataEntry::from(&moving), drop.clone()],
        &mut events,
    )
    .unwrap();
    assert_eq!(
        last_reason(&cache),
        Some(RejectReason::GroupInMigration {
            group,
            migration: moving.migration_id
        })
    );
    assert!(cache.state().routing.group(group).is_some());
    let abort = MetadataEntry::MigrationAbort {
        migration_id: moving.migration_id,
        reason: "test".into(),
        compensations: Vec::new(),
    };
    let rejected = cache.state().rejected_total;
    apply_entries(&mut cache, vec![abort, drop], &mut events).unwrap();
    assert_eq!(cache.state().rejected_total, rejected);
    assert!(cache.state().routing.group(group).is_none());
}

#[test]
fn a_migration_starts_only_where_it_fits_and_one_per_group() {
    let mut cache = bootstrap();
    let mut events = Vec::new();
    apply_entries(&mut cache, cluster_prefix(), &mut events).unwrap();
    let first = replica_checkpoint(MigrationPhaseTag::AddLearner, 0);
    apply_entries(&mut cache, vec![MetadataEntry::from(&first)], &mut events).unwrap();
    assert_eq!(cache.state().migrations.len(), 1);
    // A second move of group 1 is refused while the first is unfinished.
    let mut second = first.clone();
    second.migration_id = MigrationId::from_random_bytes([2; 16]);
    let rejected = cache.state().rejected_total;
    apply_entries(&mut cache, vec![MetadataEntry::from(&second)], &mut events).unwrap();
    assert_eq!(cache.state().rejected_total, rejected + 1);
    assert!(matches!(
        &cache.state().recent_rejections.back().unwrap().reason,
        RejectReason::Migration(MigrationError::GroupBusy { .. })
    ));
    // A move of a replica the source does not hold is refused.
    let stray = MigrationRow::new(
        MigrationId::from_random_bytes([3; 16]),
        MigrationPhaseTag::AddLearner,
        0,
        &MigrationCheckpointPayload::Replica(ReplicaMovePayload {
            group_id: GroupId(2),
            source: n(4),
            target: n(5),
            source_was_leader: false,
            caught_up_index: 0,
            write_pause_us: None,
        }),
        1,
    );
    apply_entries(&mut cache, vec![MetadataEntry::from(&stray)], &mut events).unwrap();
    assert!(matches!(
        &cache.state().recent_rejections.back().unwrap().reason,
        RejectReason::Migration(MigrationError::CannotStart { reason, .. }) if reason.contains("holds no replica")
    ));
    assert_eq!(cache.state().migrations.len(), 1);
}

#[test]
fn only_the_newest_completed_migrations_are_kept() {
    let mut cache = bootstrap();
    let mut events = Vec::new();
    apply_entries(&mut cache, cluster_prefix(), &mut events).unwrap();
    let total = COMPLETED_MIGRATIONS_KEPT + 2;
    let id = |i: usize| {
        let mut bytes = [9; 16];
        bytes[..8].copy_from_slice(&(i as u64).to_le_bytes());
        MigrationId::from_random_bytes(bytes)
    };
    let payload = replica_checkpoint(MigrationPhaseTag::AddLearner, 0)
        .verify()
        .unwrap();
    for i in 0..total {
        let at = |phase| MigrationRow::new(id(i), phase, 0, &payload, i as u64);
        let mut entries = vec![MetadataEntry::from(&at(MigrationPhaseTag::AddLearner))];
        // The last move stays open: an open move is never forgotten.
        if i + 1 < total {
            entries.push(MetadataEntry::from(&at(MigrationPhaseTag::Complete)));
        }
        apply_entries(&mut cache, entries, &mut events).unwrap();
    }
    let rows = &cache.state().migrations;
    assert_eq!(cache.state().rejected_total, 0);
    assert_eq!(rows.len(), COMPLETED_MIGRATIONS_KEPT + 1);
    assert!(
        !rows.contains_key(&id(0)),
        "the oldest completed row is forgotten"
    );
    assert!(rows.contains_key(&id(1)));
    assert_eq!(rows[&id(total - 1)].phase, MigrationPhaseTag::AddLearner);
}

#[test]
fn checkpoint_crc_mismatch_fail_stops_the_group() {
    let mut cache = bootstrap();
    // A move that fits the bootstrap routing: vShard 0 is in group 1.
    let good = MigrationRow::new(
        MigrationId::from_random_bytes([1; 16]),
        MigrationPhaseTag::Copy,
        0,
        &MigrationCheckpointPayload::VShard(crate::core::migration::VShardMovePayload {
            vshard_id: VShardId::new(0).unwrap(),
            source_group: GroupId(1),
            target_group: GroupId(2),
            copy_index: 0,
            tail_index: 0,
            fenced_at_ms: None,
            write_pause_us: None,
        }),
        42,
    );
    let mut bad = replica_checkpoint(MigrationPhaseTag::CatchUp, 0);
    bad.crc32c ^= 1;
    let log = log_of(
        1,
        &[
            at(1, MetadataEntry::from(&good)),
            at(2, MetadataEntry::from(&bad)),
            at(3, MetadataEntry::SurrogateAlloc { hwm: 9 }),
        ],
    );
    let err = cache.apply(&log, &mut ()).unwrap_err();
    assert_eq!(err.group, GroupId::METADATA);
    assert_eq!(err.index, 2);
    assert!(matches!(
        err.cause,
        FailCause::CorruptCheckpoint(CheckpointCorruption::CrcMismatch { .. })
    ));
    assert!(err.to_string().contains("group g0 fail-stopped at index 2"));
    // Everything before the bad entry applied; nothing at or after it.
    assert_eq!(cache.applied_index(), 1);
    assert_eq!(cache.state().migrations[&good.migration_id], good);
    assert_eq!(cache.state().surrogate_hwm, 0);
    // The group stays stopped: later calls report the same failure.
    assert_eq!(cache.apply(&log, &mut ()).unwrap_err(), err);
    assert_eq!(cache.failed(), Some(&err));
}

#[test]
fn undecodable_entry_fail_stops_instead_of_being_skipped() {
    let mut cache = bootstrap();
    let mut flipped = at(1, MetadataEntry::SurrogateAlloc { hwm: 3 }).encode();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    let log = vec![
        (1, at(1, MetadataEntry::SurrogateAlloc { hwm: 2 }).encode()),
        (2, flipped),
        (3, at(1, MetadataEntry::SurrogateAlloc { hwm: 4 }).encode()),
    ];
    let err = cache.apply(&log, &mut ()).unwrap_err();
    assert_eq!(err.index, 2);
    assert!(matches!(
        err.cause,
        FailCause::Undecodable(CodecError::Checksum { .. })
    ));
    assert_eq!(cache.state().surrogate_hwm, 2);
}

#[test]
fn a_gap_in_the_log_fail_stops() {
    let mut cache = bootstrap();
    let err = cache.apply(&[(2, Vec::new())], &mut ()).unwrap_err();
    assert_eq!(
        err.cause,
        FailCause::LogGap {
            expected: 1,
            got: 2
        }
    );
}

#[test]
fn batch_is_all_or_nothing() {
    let mut cache = bootstrap();
    let mut events = Vec::new();
    let batch = MetadataEntry::Batch {
        entries: vec![
            MetadataEntry::CatalogDdl {
                payload: b"a".to_vec(),
            },
            MetadataEntry::SurrogateAlloc { hwm: 77 },
            MetadataEntry::DescriptorDrainEnd {
                descriptor_id: DescriptorId(1),
            }, // no such drain: rejected
        ]
        .into(),
    };
    apply_entries(&mut cache, vec![batch], &mut events).unwrap();
    assert!(
        events.is_empty(),
        "a rejected batch hands nothing to the host"
    );
    assert_eq!(cache.state().surrogate_hwm, 0);
    assert_eq!(cache.state().ddl_applied, 0);
    assert!(matches!(
        last_rejection(&cache),
        RejectReason::Batch { position: 2, .. }
    ));
    let ok = MetadataEntry::Batch {
        entries: vec![
            MetadataEntry::CatalogDdl {
                payload: b"a".to_vec(),
            },
            MetadataEntry::SurrogateAlloc { hwm: 77 },
        ]
        .into(),
    };
    apply_entries(&mut cache, vec![ok], &mut events).unwrap();
    assert_eq!(events.len(), 1);
    assert_eq!(cache.state().surrogate_hwm, 77);
}

#[test]
fn migration_abort_applies_compensations_in_order_and_deletes_the_row() {
    let mut cache = bootstrap();
    let mut events = Vec::new();
    let mut entries = cluster_prefix();
    let row = replica_checkpoint(MigrationPhaseTag::AddLearner, 0);
    entries.push(MetadataEntry::from(&row));
    entries.push(MetadataEntry::RoutingChange(RoutingChange::AddLearner {
        group_id: GroupId(1),
        node_id: n(2),
    }));
    apply_entries(&mut cache, entries, &mut events).unwrap();
    assert!(cache
        .state()
        .routing
        .group(GroupId(1))
        .unwrap()
        .learners
        .contains(&n(2)));
    let epoch = cache.state().routing.epoch();
    let v = VShardId::new(3).unwrap();
    let abort = MetadataEntry::MigrationAbort {
        migration_id: row.migration_id,
        reason: "target went away".into(),
        compensations: vec![
            Compensation::RemoveLearner {
                group_id: GroupId(1),
                node_id: n(2),
            },
            Compensation::Unfence {
                vshard_id: v,
                group_id: GroupId(1),
            },
            Compensation::DropPartialCopy {
                vshard_id: v,
                group_id: GroupId(2),
            },
        ],
    };
    apply_entries(&mut cache, vec![abort.clone()], &mut events).unwrap();
    assert!(cache.state().migrations.is_empty());
    assert!(!cache
        .state()
        .routing
        .group(GroupId(1))
        .unwrap()
        .learners
        .contains(&n(2)));
    assert_eq!(cache.state().routing.epoch(), epoch + 1);
    let compensations: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            AppliedEvent::DataCompensation { compensation, .. } => Some(*compensation),
            _ => None,
        })
        .collect();
    assert_eq!(
        compensations,
        vec![
            Compensation::Unfence {
                vshard_id: v,
                group_id: GroupId(1)
            },
            Compensation::DropPartialCopy {
                vshard_id: v,
                group_id: GroupId(2)
            },
        ]
    );
    // A duplicate abort is a recorded no-op.
    apply_entries(&mut cache, vec![abort], &mut events).unwrap();
    assert!(matches!(
        last_rejection(&cache),
        RejectReason::Migration(MigrationError::UnknownMigration { .. })
    ));
}

#[test]
fn ca_trust_changes_refuse_to_remove_the_last_ca() {
    let mut cache = bootstrap();
    let mut events = Vec::new();
    let old = fingerprint(b"ca-one");
    let new = fingerprint(b"ca-two");
    apply_entries(
        &mut cache,
        vec![
            MetadataEntry::CaTrustChange {
                add_ca_cert: None,
                remove_ca_fingerprint: Some(old),
            },
            MetadataEntry::CaTrustChange {
                add_ca_cert: Some(b"ca-two".to_vec()),
                remove_ca_fingerprint: None,
            },
            MetadataEntry::CaTrustChange {
                add_ca_cert: None,
                remove_ca_fingerprint: Some(old),
            },
            MetadataEntry::CaTrustChange {
                add_ca_cert: None,
                remove_ca_fingerprint: None,
            },
        ],
        &mut events,
    )
    .unwrap();
    let rejections: Vec<_> = cache
        .state()
        .recent_rejections
        .iter()
        .map(|r| (r.index, r.reason.clone()))
        .collect();
    assert_eq!(
        rejections,
        vec![(1, CaError::LastCa.into()), (4, CaError::Empty.into())]
    );
    assert_eq!(
        cache.state().ca_trust.keys().copied().collect::<Vec<_>>(),
        vec![new]
    );
    assert_eq!(
        events,
        vec![
            AppliedEvent::CaTrustChanged {
                trusted: {
                    let mut both = vec![old, new];
                    both.sort();
                    both
                }
            },
            AppliedEvent::CaTrustChanged { trusted: vec![new] },
        ]
    );
}

#[test]
fn finish_decommission_refuses_a_node_that_still_holds_replicas() {
    let mut cache = bootstrap();
    let mut entries = cluster_prefix();
    entries.push(MetadataEntry::TopologyChange(
        TopologyChange::StartDecommission { node_id: n(1) },
    ));
    entries.push(MetadataEntry::TopologyChange(
        TopologyChange::FinishDecommission { node_id: n(1) },
    ));
    apply_entries(&mut cache, entries, &mut Vec::new()).unwrap();
    assert!(matches!(
        last_rejection(&cache),
        RejectReason::StillHoldsReplicas { .. }
    ));
    assert_eq!(
        cache.state().topology.get(n(1)).unwrap().state,
        NodeState::Draining
    );
}

#[test]
fn replicas_only_go_to_active_nodes() {
    let mut cache = bootstrap();
    apply_entries(
        &mut cache,
        vec![
            MetadataEntry::TopologyChange(TopologyChange::Join {
                node_id: n(2),
                addr: "h:2".into(),
            }),
            MetadataEntry::RoutingChange(RoutingChange::AddLearner {
                group_id: GroupId(1),
                node_id: n(2),
            }),
        ],
        &mut Vec::new(),
    )
    .unwrap();
    assert!(matches!(
        last_rejection(&cache),
        RejectReason::NodeNotActive { .. }
    ));
}

#[test]
fn surrogate_hwm_is_a_monotonic_max() {
    let mut cache = bootstrap();
    apply_entries(
        &mut cache,
        [5, 3, 9, 9, 1]
            .into_iter()
            .map(|hwm| MetadataEntry::SurrogateAlloc { hwm })
            .collect(),
        &mut Vec::new(),
    )
    .unwrap();
    assert_eq!(cache.state().surrogate_hwm, 9);
    assert_eq!(cache.state().rejected_total, 0);
}

#[test]
fn rejection_history_is_bounded() {
    let mut cache = bootstrap();
    let bad = MetadataEntry::DescriptorDrainEnd {
        descriptor_id: DescriptorId(1),
    };
    apply_entries(
        &mut cache,
        vec![bad; REJECTION_HISTORY + 10],
        &mut Vec::new(),
    )
    .unwrap();
    assert_eq!(cache.state().rejected_total, REJECTION_HISTORY as u64 + 10);
    assert_eq!(cache.state().recent_rejections.len(), REJECTION_HISTORY);
    assert_eq!(cache.state().recent_rejections[0].index, 11);
}

#[test]
fn snapshot_restores_and_unknown_versions_are_refused() {
    let mut cache = bootstrap();
    apply_entries(&mut cache, cluster_prefix(), &mut Vec::new()).unwrap();
    let restored = MetadataCache::restore(&cache.snapshot()).unwrap();
    assert_eq!(restored.state(), cache.state());
    let mut future = cache.state().clone();
    future.cluster_version = ClusterVersion(ClusterVersion::LATEST.0 + 1);
    let err = MetadataCache::restore(&codec::encode(&future)).unwrap_err();
    assert!(matches!(
        err,
        RestoreError::Version(VersionError::Unsupported { .. })
    ));
}

/// A log of random records behind the cluster prefix, with an occasional
/// Raft no-op (empty payload) or corrupted entry among them.
fn random_log() -> impl Strategy<Value = Vec<(u64, Vec<u8>)>> {
    let slot = prop_oneof![
        40 => arbitrary::record().prop_map(|r| r.encode()),
        2 => Just(Vec::new()),
        1 => proptest::collection::vec(any::<u8>(), 0..24),
    ];
    proptest::collection::vec(slot, 0..60).prop_map(|slots| {
        let prefix: Vec<_> = cluster_prefix()
            .into_iter()
            .map(|e| at(1, e).encode())
            .collect();
        (1..).zip(prefix.into_iter().chain(slots)).collect()
    })
}

/// Applies `log` in chunks of the given sizes (cycled), each chunk
/// re-delivering `overlap` entries already applied, then replays it all.
fn apply_split(
    log: &[(u64, Vec<u8>)],
    sizes: &[usize],
    overlap: usize,
) -> (MetadataCache, Vec<AppliedEvent>, Option<FailStop>) {
    let mut cache = bootstrap();
    let mut events = Vec::new();
    let mut result = Ok(0);
    let mut start = 0;
    for size in sizes.iter().cycle() {
        if start >= log.len() || result.is_err() {
            break;
        }
        let end = (start + size).min(log.len());
        result = cache.apply(&log[start.saturating_sub(overlap)..end], &mut events);
        start = end;
    }
    if result.is_ok() {
        result = cache.apply(log, &mut events);
    }
    (cache, events, result.err())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]

    /// The same log gives byte-identical state and the same host events
    /// whatever the batch split, and however often entries are replayed.
    #[test]
    fn any_split_and_replay_gives_identical_state(
        log in random_log(),
        sizes_a in proptest::collection::vec(1usize..8, 1..5),
        sizes_b in proptest::collection::vec(1usize..20, 1..5),
        overlap in 0usize..4,
    ) {
        let (one, events_one, failed_one) = apply_split(&log, &[usize::MAX], 0);
        let (a, events_a, failed_a) = apply_split(&log, &sizes_a, overlap);
        let (b, events_b, failed_b) = apply_split(&log, &sizes_b, 0);
        prop_assert_eq!(one.snapshot(), a.snapshot());
        prop_assert_eq!(one.snapshot(), b.snapshot());
        prop_assert_eq!(&events_one, &events_a);
        prop_assert_eq!(&events_one, &events_b);
        prop_assert_eq!(&failed_one, &failed_a);
        prop_assert_eq!(&failed_one, &failed_b);
        let expected_index = failed_one.map_or(log.len() as u64, |f| f.index - 1);
        prop_assert_eq!(one.applied_index(), expected_index);
    }

    /// A snapshot taken anywhere restores to the identical state.
    #[test]
    fn snapshots_round_trip(log in random_log()) {
        let (cache, _, _) = apply_split(&log, &[usize::MAX], 0);
        let restored = MetadataCache::restore(&cache.snapshot()).unwrap();
        prop_assert_eq!(restored.state(), cache.state());
    }
}
