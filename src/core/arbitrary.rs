//! proptest strategies for the core's wire types, shared by the core's tests.
//!
//! Identifiers are drawn from small ranges on purpose: random logs then hit
//! the same nodes, groups, tokens and migrations again and again, so they
//! exercise accepted transitions as well as rejections.

use crate::core::entry::{BatchEntries, MetadataEntry, MetadataRecord};
use crate::core::hlc::Hlc;
use crate::core::ids::{DescriptorId, GroupId, MigrationId, NodeId, VShardId};
use crate::core::lease::DescriptorLease;
use crate::core::migration::{
    Compensation, MigrationCheckpointPayload, MigrationPhaseTag, MigrationRow, ReplicaMovePayload,
    VShardMovePayload,
};
use crate::core::routing::RoutingChange;
use crate::core::token::JoinTokenTransitionKind;
use crate::core::topology::TopologyChange;
use crate::core::version::ClusterVersion;
use proptest::prelude::*;

pub fn node_id() -> impl Strategy<Value = NodeId> {
    (1u64..=6).prop_map(|n| NodeId::new(n).expect("non-zero"))
}

pub fn group_id() -> impl Strategy<Value = GroupId> {
    (0u64..=5).prop_map(GroupId)
}

pub fn vshard_id() -> impl Strategy<Value = VShardId> {
    prop_oneof![0u16..8, 0u16..1024].prop_map(|v| VShardId::new(v).expect("in range"))
}

pub fn hlc() -> impl Strategy<Value = Hlc> {
    (0u64..20_000, 0u32..4).prop_map(|(w, l)| Hlc::new(w, l))
}

pub fn migration_id() -> impl Strategy<Value = MigrationId> {
    (0u8..3).prop_map(|b| MigrationId::from_random_bytes([b; 16]))
}

pub fn token_hash() -> impl Strategy<Value = [u8; 32]> {
    (0u8..3).prop_map(|b| [b; 32])
}

pub fn topology_change() -> impl Strategy<Value = TopologyChange> {
    prop_oneof![
        (node_id(), "[a-z0-9.:]{0,12}")
            .prop_map(|(node_id, addr)| TopologyChange::Join { node_id, addr }),
        node_id().prop_map(|node_id| TopologyChange::Activate { node_id }),
        node_id().prop_map(|node_id| TopologyChange::PromoteToVoter { node_id }),
        node_id().prop_map(|node_id| TopologyChange::StartDecommission { node_id }),
        node_id().prop_map(|node_id| TopologyChange::FinishDecommission { node_id }),
        node_id().prop_map(|node_id| TopologyChange::Leave { node_id }),
    ]
}

pub fn routing_change() -> impl Strategy<Value = RoutingChange> {
    prop_oneof![
        (vshard_id(), group_id(), node_id()).prop_map(|(vshard_id, g, n)| {
            RoutingChange::ReassignVShard {
                vshard_id,
                new_group_id: g,
                new_leaseholder_node_id: n,
            }
        }),
        (group_id(), node_id()).prop_map(|(group_id, n)| RoutingChange::LeadershipTransfer {
            group_id,
            new_leader_node_id: n,
        }),
        (group_id(), node_id())
            .prop_map(|(group_id, node_id)| RoutingChange::RemoveMember { group_id, node_id }),
        (group_id(), node_id())
            .prop_map(|(group_id, node_id)| RoutingChange::AddLearner { group_id, node_id }),
        (group_id(), node_id())
            .prop_map(|(group_id, node_id)| RoutingChange::PromoteLearner { group_id, node_id }),
        (group_id(), node_id())
            .prop_map(|(group_id, node_id)| RoutingChange::DemoteVoter { group_id, node_id }),
        (group_id(), proptest::collection::vec(node_id(), 0..4))
            .prop_map(|(group_id, voters)| RoutingChange::CreateGroup { group_id, voters }),
        group_id().prop_map(|group_id| RoutingChange::DropGroup { group_id }),
        (vshard_id(), group_id()).prop_map(|(vshard_id, group_id)| {
            RoutingChange::RemoveGhostStub {
                vshard_id,
                group_id,
            }
        }),
    ]
}

pub fn token_transition() -> impl Strategy<Value = JoinTokenTransitionKind> {
    prop_oneof![
        (0u64..20_000)
            .prop_map(|expires_at_ms| JoinTokenTransitionKind::Register { expires_at_ms }),
        Just(JoinTokenTransitionKind::Begin),
        Just(JoinTokenTransitionKind::Consume),
        Just(JoinTokenTransitionKind::Revert),
        Just(JoinTokenTransitionKind::Expire),
        Just(JoinTokenTransitionKind::Abort),
    ]
}

pub fn checkpoint_payload() -> impl Strategy<Value = MigrationCheckpointPayload> {
    prop_oneof![
        (
            group_id(),
            node_id(),
            node_id(),
            any::<bool>(),
            0u64..100,
            any::<Option<u64>>()
        )
            .prop_map(
                |(group_id, source, target, source_was_leader, caught_up_index, write_pause_us)| {
                    MigrationCheckpointPayload::Replica(ReplicaMovePayload {
                        group_id,
                        source,
                        target,
                        source_was_leader,
                        caught_up_index,
                        write_pause_us,
                    })
                }
            ),
        (
            vshard_id(),
            group_id(),
            group_id(),
            0u64..100,
            0u64..100,
            any::<Option<u64>>()
        )
            .prop_map(
                |(
                    vshard_id,
                    source_group,
                    target_group,
                    copy_index,
                    tail_index,
                    write_pause_us,
                )| {
                    MigrationCheckpointPayload::VShard(VShardMovePayload {
                        vshard_id,
                        source_group,
                        target_group,
                        copy_index,
                        tail_index,
                        fenced_at_ms: write_pause_us.map(|p| p / 3),
                        write_pause_us,
                    })
                }
            ),
    ]
}

/// A checkpoint row whose phase fits its payload's kind and whose CRC is right.
pub fn migration_row() -> impl Strategy<Value = MigrationRow> {
    (
        migration_id(),
        checkpoint_payload(),
        0usize..6,
        0u32..3,
        0u64..20_000,
    )
        .prop_map(|(id, payload, phase, attempt, ts_ms)| {
            let phase = MigrationPhaseTag::phases(payload.kind())[phase];
            MigrationRow::new(id, phase, attempt, &payload, ts_ms)
        })
}

pub fn compensation() -> impl Strategy<Value = Compensation> {
    prop_oneof![
        (group_id(), node_id())
            .prop_map(|(group_id, node_id)| Compensation::RemoveLearner { group_id, node_id }),
        (group_id(), node_id())
            .prop_map(|(group_id, node_id)| Compensation::RemoveVoter { group_id, node_id }),
        (group_id(), node_id())
            .prop_map(|(group_id, node_id)| Compensation::RestoreVoter { group_id, node_id }),
        (group_id(), node_id())
            .prop_map(|(group_id, node_id)| Compensation::RestoreLeaderHint { group_id, node_id }),
        (vshard_id(), group_id()).prop_map(|(vshard_id, group_id)| Compensation::Unfence {
            vshard_id,
            group_id
        }),
        (vshard_id(), group_id()).prop_map(|(vshard_id, group_id)| Compensation::DropPartialCopy {
            vshard_id,
            group_id
        }),
        (vshard_id(), group_id()).prop_map(|(vshard_id, group_id)| Compensation::RemoveGhostStub {
            vshard_id,
            group_id
        }),
    ]
}

/// Any entry except a batch.
pub fn simple_entry() -> impl Strategy<Value = MetadataEntry> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..16)
            .prop_map(|payload| MetadataEntry::CatalogDdl { payload }),
        (
            proptest::collection::vec(any::<u8>(), 0..8),
            any::<u64>(),
            "[a-z]{0,8}",
            ".{0,24}"
        )
            .prop_map(|(payload, auth_user_id, auth_user_name, sql_text)| {
                MetadataEntry::CatalogDdlAudited {
                    payload,
                    auth_user_id,
                    auth_user_name,
                    sql_text,
                }
            }),
        topology_change().prop_map(MetadataEntry::TopologyChange),
        routing_change().prop_map(MetadataEntry::RoutingChange),
        (0u32..4, 0u32..4).prop_map(|(from, to)| MetadataEntry::ClusterVersionBump {
            from: ClusterVersion(from),
            to: ClusterVersion(to),
        }),
        ((0u64..3), (0u64..5), node_id(), hlc()).prop_map(|(d, version, node_id, expires_at)| {
            MetadataEntry::DescriptorLeaseGrant(DescriptorLease {
                descriptor_id: DescriptorId(d),
                version,
                node_id,
                expires_at,
            })
        }),
        (
            node_id(),
            proptest::collection::vec((0u64..3).prop_map(DescriptorId), 0..3)
        )
            .prop_map(
                |(node_id, descriptor_ids)| MetadataEntry::DescriptorLeaseRelease {
                    node_id,
                    descriptor_ids,
                }
            ),
        ((0u64..3), (0u64..5), hlc()).prop_map(|(d, up_to_version, expires_at)| {
            MetadataEntry::DescriptorDrainStart {
                descriptor_id: DescriptorId(d),
                up_to_version,
                expires_at,
            }
        }),
        (0u64..3).prop_map(|d| MetadataEntry::DescriptorDrainEnd {
            descriptor_id: DescriptorId(d)
        }),
        (
            proptest::option::of(proptest::collection::vec(any::<u8>(), 0..8)),
            proptest::option::of((0u8..3).prop_map(|b| [b; 32])),
        )
            .prop_map(|(add_ca_cert, remove_ca_fingerprint)| {
                MetadataEntry::CaTrustChange {
                    add_ca_cert,
                    remove_ca_fingerprint,
                }
            }),
        any::<u32>().prop_map(|hwm| MetadataEntry::SurrogateAlloc { hwm }),
        (token_hash(), token_transition(), 0u64..20_000).prop_map(
            |(token_hash, transition, ts_ms)| MetadataEntry::JoinTokenTransition {
                token_hash,
                transition,
                ts_ms,
            }
        ),
        migration_row().prop_map(|row| MetadataEntry::from(&row)),
        (
            migration_id(),
            ".{0,12}",
            proptest::collection::vec(compensation(), 0..4)
        )
            .prop_map(|(migration_id, reason, compensations)| {
                MetadataEntry::MigrationAbort {
                    migration_id,
                    reason,
                    compensations,
                }
            }),
    ]
}

/// Any entry, batches (of simple entries) included.
pub fn entry() -> impl Strategy<Value = MetadataEntry> {
    prop_oneof![
        8 => simple_entry(),
        1 => proptest::collection::vec(simple_entry(), 0..4)
            .prop_map(|entries| MetadataEntry::Batch { entries: BatchEntries(entries) }),
    ]
}

pub fn record() -> impl Strategy<Value = MetadataRecord> {
    (hlc(), entry()).prop_map(|(hlc, entry)| MetadataRecord::new(hlc, entry))
}
