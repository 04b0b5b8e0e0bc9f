//! The metadata log entries (DESIGN.md §3.1).
//!
//! Every mutation of cluster-wide state is one [`MetadataEntry`], proposed to
//! group 0 inside a [`MetadataRecord`] that also carries the proposer's HLC.
//! That timestamp is the entry's *log time*: the applier uses it (never its
//! own clock) for everything time-dependent — drain expiry, the audit
//! record's commit timestamp — so every replica decides identically.

use crate::core::codec::{self, FrameKind, Wire};
use crate::core::hlc::Hlc;
use crate::core::ids::{DescriptorId, MigrationId, NodeId};
use crate::core::lease::DescriptorLease;
use crate::core::migration::{Compensation, MigrationRow};
use crate::core::routing::RoutingChange;
use crate::core::token::{JoinTokenTransitionKind, TokenHash};
use crate::core::topology::TopologyChange;
use crate::core::version::{ClusterVersion, VersionError};
use serde::{Deserialize, Deserializer, Serialize};

/// A SHA-256 fingerprint of a DER certificate.
pub type CertFingerprint = [u8; 32];

/// One committed mutation of cluster-wide state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MetadataEntry {
    /// Opaque host DDL, handed to the host's catalog hook.
    CatalogDdl {
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
    },
    /// Host DDL plus an audit record the host persists.
    CatalogDdlAudited {
        #[serde(with = "serde_bytes")]
        payload: Vec<u8>,
        auth_user_id: u64,
        auth_user_name: String,
        sql_text: String,
    },
    /// Sub-entries applied in order at one log index, all or nothing.
    Batch {
        entries: BatchEntries,
    },
    TopologyChange(TopologyChange),
    RoutingChange(RoutingChange),
    /// Applies only if `from` is the current version.
    ClusterVersionBump {
        from: ClusterVersion,
        to: ClusterVersion,
    },
    DescriptorLeaseGrant(DescriptorLease),
    DescriptorLeaseRelease {
        node_id: NodeId,
        descriptor_ids: Vec<DescriptorId>,
    },
    /// While active, grants at `version <= up_to_version` are refused.
    DescriptorDrainStart {
        descriptor_id: DescriptorId,
        up_to_version: u64,
        expires_at: Hlc,
    },
    DescriptorDrainEnd {
        descriptor_id: DescriptorId,
    },
    /// Changes the trusted CA set; every node rebuilds its TLS configs.
    CaTrustChange {
        add_ca_cert: Option<Vec<u8>>,
        remove_ca_fingerprint: Option<CertFingerprint>,
    },
    /// Raises the cluster-wide surrogate high-watermark (monotonic max).
    SurrogateAlloc {
        hwm: u32,
    },
    /// One step of a join token's lifecycle. Only the token's hash is logged.
    JoinTokenTransition {
        token_hash: TokenHash,
        transition: JoinTokenTransitionKind,
        ts_ms: u64,
    },
    /// Upserts a migration's row; idempotent on `(id, phase, attempt)`.
    /// The entry carries the row itself, so the applier stores exactly what
    /// the coordinator checkpointed. (On the wire this is the same as the
    /// struct variant it replaced: postcard writes a struct's fields in
    /// order, with no names.)
    MigrationCheckpoint(MigrationRow),
    /// Applies the compensations in order, then deletes the row.
    MigrationAbort {
        migration_id: MigrationId,
        reason: String,
        compensations: Vec<Compensation>,
    },
}

/// The checkpoint entry that upserts `row`.
impl From<&MigrationRow> for MetadataEntry {
    fn from(row: &MigrationRow) -> Self {
        MetadataEntry::MigrationCheckpoint(row.clone())
    }
}

impl MetadataEntry {
    /// The variant's name, for logs, rejections and errors.
    pub fn name(&self) -> &'static str {
        match self {
            MetadataEntry::CatalogDdl { .. } => "CatalogDdl",
            MetadataEntry::CatalogDdlAudited { .. } => "CatalogDdlAudited",
            MetadataEntry::Batch { .. } => "Batch",
            MetadataEntry::TopologyChange(_) => "TopologyChange",
            MetadataEntry::RoutingChange(_) => "RoutingChange",
            MetadataEntry::ClusterVersionBump { .. } => "ClusterVersionBump",
            MetadataEntry::DescriptorLeaseGrant(_) => "DescriptorLeaseGrant",
            MetadataEntry::DescriptorLeaseRelease { .. } => "DescriptorLeaseRelease",
            MetadataEntry::DescriptorDrainStart { .. } => "DescriptorDrainStart",
            MetadataEntry::DescriptorDrainEnd { .. } => "DescriptorDrainEnd",
            MetadataEntry::CaTrustChange { .. } => "CaTrustChange",
            MetadataEntry::SurrogateAlloc { .. } => "SurrogateAlloc",
            MetadataEntry::JoinTokenTransition { .. } => "JoinTokenTransition",
            MetadataEntry::MigrationCheckpoint(_) => "MigrationCheckpoint",
            MetadataEntry::MigrationAbort { .. } => "MigrationAbort",
        }
    }

    /// The cluster version that first allows this entry (for a batch, the
    /// highest any of its sub-entries needs).
    pub fn min_cluster_version(&self) -> ClusterVersion {
        match self {
            MetadataEntry::CatalogDdlAudited { .. } => ClusterVersion::V2_AUDITED_DDL,
            MetadataEntry::Batch { entries } => entries
                .iter()
                .map(MetadataEntry::min_cluster_version)
                .max()
                .unwrap_or(ClusterVersion::V1),
            _ => ClusterVersion::V1,
        }
    }

    /// Refuses an entry the cluster version does not yet allow. Proposers
    /// call it before proposing; the applier calls it again at apply time,
    /// where the answer is the same on every replica.
    pub fn check_allowed(&self, current: ClusterVersion) -> Result<(), VersionError> {
        let needed = self.min_cluster_version();
        if needed <= current {
            Ok(())
        } else {
            Err(VersionError::NotYetAllowed {
                what: self.name().to_string(),
                needed,
                current,
            })
        }
    }
}

/// The sub-entries of a batch. A newtype only so that decoding can bound how
/// deeply batches nest (see [`codec::MAX_NESTING`]): postcard recurses without
/// limit, and crafted input must not overflow the stack.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct BatchEntries(pub Vec<MetadataEntry>);

impl<'de> Deserialize<'de> for BatchEntries {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let _level = codec::NestingGuard::enter::<D::Error>()?;
        Vec::<MetadataEntry>::deserialize(deserializer).map(BatchEntries)
    }
}

impl std::ops::Deref for BatchEntries {
    type Target = [MetadataEntry];
    fn deref(&self) -> &[MetadataEntry] {
        &self.0
    }
}

impl From<Vec<MetadataEntry>> for BatchEntries {
    fn from(entries: Vec<MetadataEntry>) -> Self {
        BatchEntries(entries)
    }
}

/// What group 0's log holds at each index: an entry and its proposal time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataRecord {
    /// The proposer's HLC when it proposed; the entry's log time.
    pub hlc: Hlc,
    pub entry: MetadataEntry,
}

impl Wire for MetadataRecord {
    const KIND: FrameKind = FrameKind::MetadataRecord;
}

impl MetadataRecord {
    pub fn new(hlc: Hlc, entry: MetadataEntry) -> Self {
        MetadataRecord { hlc, entry }
    }

    /// The bytes proposed to group 0.
    pub fn encode(&self) -> Vec<u8> {
        codec::encode(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::arbitrary;
    use crate::core::codec::{CodecError, HEADER_LEN};
    use proptest::prelude::*;

    /// Batch nested `depth` deep around a no-op entry.
    fn nested(depth: usize) -> MetadataEntry {
        let mut entry = MetadataEntry::SurrogateAlloc { hwm: 1 };
        for _ in 0..depth {
            entry = MetadataEntry::Batch {
                entries: vec![entry].into(),
            };
        }
        entry
    }

    #[test]
    fn batches_nest_up_to_the_limit() {
        let ok = MetadataRecord::new(Hlc::ZERO, nested(codec::MAX_NESTING as usize));
        assert_eq!(codec::decode::<MetadataRecord>(&ok.encode()).unwrap(), ok);
        let deep = MetadataRecord::new(Hlc::ZERO, nested(codec::MAX_NESTING as usize + 1));
        assert_eq!(
            codec::decode::<MetadataRecord>(&deep.encode()),
            Err(CodecError::TooDeep)
        );
        // The guard resets: a valid frame decodes right after a refused one.
        assert_eq!(codec::decode::<MetadataRecord>(&ok.encode()).unwrap(), ok);
    }

    /// A crafted frame of a million nested batch headers must be refused
    /// without recursing a million times (which would overflow the stack).
    #[test]
    fn a_nesting_bomb_does_not_overflow_the_stack() {
        let batch_tag = 2u8; // MetadataEntry::Batch is variant 2
        let mut body = vec![0, 0]; // Hlc { wall_ms: 0, logical: 0 }
        for _ in 0..1_000_000 {
            body.extend_from_slice(&[batch_tag, 1]); // Batch with one sub-entry
        }
        let frame = codec::seal(FrameKind::MetadataRecord, codec::FORMAT_VERSION, &body);
        assert_eq!(
            codec::decode::<MetadataRecord>(&frame),
            Err(CodecError::TooDeep)
        );
    }

    #[test]
    fn batch_min_version_is_the_max_of_its_entries() {
        let audited = MetadataEntry::CatalogDdlAudited {
            payload: vec![],
            auth_user_id: 0,
            auth_user_name: String::new(),
            sql_text: String::new(),
        };
        let batch = MetadataEntry::Batch {
            entries: vec![MetadataEntry::SurrogateAlloc { hwm: 1 }, audited].into(),
        };
        assert_eq!(batch.min_cluster_version(), ClusterVersion::V2_AUDITED_DDL);
        assert!(batch.check_allowed(ClusterVersion::V1).is_err());
        assert!(batch.check_allowed(ClusterVersion::V2_AUDITED_DDL).is_ok());
    }

    /// Logs written by earlier builds must still decode to the same entry:
    /// these are a checkpoint record's bytes as keel has always logged them
    /// (from before the entry held a `MigrationRow`, when it listed the
    /// row's fields itself).
    #[test]
    fn a_checkpoint_record_keeps_its_logged_bytes() {
        use crate::core::ids::GroupId;
        use crate::core::migration::{
            MigrationCheckpointPayload, MigrationPhaseTag, ReplicaMovePayload,
        };
        let row = MigrationRow::new(
            MigrationId::from_bytes([7; 16]),
            MigrationPhaseTag::CatchUp,
            2,
            &MigrationCheckpointPayload::Replica(ReplicaMovePayload {
                group_id: GroupId(3),
                source: NodeId::new(1).unwrap(),
                target: NodeId::new(4).unwrap(),
                source_was_leader: true,
                caught_up_index: 300,
                write_pause_us: None,
            }),
            1_795_000_000_000,
        );
        let record = MetadataRecord::new(Hlc::new(1_795_000_000_001, 3), MetadataEntry::from(&row));
        let logged: &[u8] = &[
            225, 0, 1, 0, 0, 0, 58, 239, 189, 144, 144, 129, 188, 217, 242, 158, 52, 3, 13, 16, 7,
            7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 1, 2, 19, 161, 0, 1, 0, 0, 0, 8, 222, 179,
            169, 3, 0, 3, 1, 4, 1, 172, 2, 0, 131, 245, 174, 163, 6, 128, 188, 217, 242, 158, 52,
        ];
        assert_eq!(record.encode(), logged, "{:?}", record.encode());
        assert_eq!(codec::decode::<MetadataRecord>(logged), Ok(record));
    }

    proptest! {
        #[test]
        fn records_round_trip(record in arbitrary::record()) {
            let bytes = record.encode();
            prop_assert_eq!(codec::decode::<MetadataRecord>(&bytes), Ok(record));
        }

        /// Random bytes never panic the decoder.
        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = codec::decode::<MetadataRecord>(&bytes);
            // Also behind a valid header, so postcard itself sees the garbage.
            let sealed = codec::seal(FrameKind::MetadataRecord, codec::FORMAT_VERSION, &bytes);
            let _ = codec::decode::<MetadataRecord>(&sealed);
        }

        /// Truncated frames are refused.
        #[test]
        fn truncation_is_detected(record in arbitrary::record(), cut in any::<prop::sample::Index>()) {
            let bytes = record.encode();
            let cut = cut.index(bytes.len());
            prop_assert!(codec::decode::<MetadataRecord>(&bytes[..cut]).is_err());
        }

        /// Any single flipped bit is caught (CRC32C detects all 1-bit errors).
        #[test]
        fn bit_flips_are_detected(record in arbitrary::record(), at in any::<prop::sample::Index>(), bit in 0u8..8) {
            let mut bytes = record.encode();
            let at = at.index(bytes.len());
            bytes[at] ^= 1 << bit;
            prop_assert!(codec::decode::<MetadataRecord>(&bytes).is_err());
        }

        /// A corrupted body behind a recomputed, valid checksum either fails
        /// to decode or decodes to some value — never panics.
        #[test]
        fn resealed_garbage_never_panics(record in arbitrary::record(), at in any::<prop::sample::Index>(), byte in any::<u8>()) {
            let bytes = record.encode();
            let mut body = bytes[HEADER_LEN..].to_vec();
            if !body.is_empty() {
                let at = at.index(body.len());
                body[at] = byte;
            }
            let sealed = codec::seal(FrameKind::MetadataRecord, codec::FORMAT_VERSION, &body);
            let _ = codec::decode::<MetadataRecord>(&sealed);
        }
    }
}
