//! The metadata cache and its applier (DESIGN.md §3.1, §3.3).
//!
//! Every node holds a [`MetadataCache`] and feeds it group 0's committed log.
//! The replicated part, [`MetadataState`], must come out byte-identical on
//! every replica at the same applied index, so the applier:
//!
//! - decides only from the log: time is the record's HLC (made monotonic
//!   along the log), never the local clock; maps are ordered;
//! - turns every illegal entry into a recorded, deterministic rejection —
//!   never a panic, never a divergence;
//! - refuses to skip what it cannot apply. An undecodable entry or a corrupt
//!   checkpoint *fail-stops* the group: the cache stops at the entry before,
//!   and says which index failed and why (§3.3).
//!
//! This module holds the state, the errors and the cache's apply loop;
//! `apply` holds what each entry checks and changes.

use crate::core::codec::{self, CodecError, FrameKind, Wire};
use crate::core::entry::{CertFingerprint, MetadataEntry, MetadataRecord};
use crate::core::hlc::Hlc;
use crate::core::hooks::MetadataHooks;
use crate::core::ids::{GroupId, MigrationId, NodeId};
use crate::core::lease::{LeaseError, LeaseTable};
use crate::core::migration::{CheckpointCorruption, MigrationError, MigrationRow};
use crate::core::routing::{RoutingError, RoutingTable};
use crate::core::token::{TokenError, TokenTable};
use crate::core::topology::{Topology, TopologyError};
use crate::core::version::{ClusterVersion, VersionError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, VecDeque};

mod apply;
#[cfg(test)]
mod tests;

use apply::{apply_entry, EntryOutcome};

/// How many recent rejections the cache keeps for `keel status`.
pub const REJECTION_HISTORY: usize = 64;
/// How many finished migrations the table keeps (they carry the write
/// pause `keel status` shows); older ones are forgotten.
pub const COMPLETED_MIGRATIONS_KEPT: usize = 256;
/// The largest CA certificate accepted into the trust set.
pub const MAX_CA_CERT_LEN: usize = 64 * 1024;

/// Why a committed entry was a no-op. Recorded identically on every replica.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum RejectReason {
    #[error(transparent)]
    Topology(#[from] TopologyError),
    #[error(transparent)]
    Routing(#[from] RoutingError),
    #[error(transparent)]
    Token(#[from] TokenError),
    #[error(transparent)]
    Lease(#[from] LeaseError),
    #[error(transparent)]
    Migration(#[from] MigrationError),
    #[error(transparent)]
    Version(#[from] VersionError),
    #[error(transparent)]
    Ca(#[from] CaError),
    #[error("node {node_id} cannot host replicas: it is not an active member ({state})")]
    NodeNotActive { node_id: NodeId, state: String },
    #[error("node {node_id} still holds replicas of groups {groups:?}; move them off first")]
    StillHoldsReplicas {
        node_id: NodeId,
        groups: Vec<GroupId>,
    },
    #[error("sub-entry {position} of the batch was rejected, so none of it applied: {reason}")]
    Batch {
        position: usize,
        reason: Box<RejectReason>,
    },
    #[error(
        "compensation {position} of the abort was rejected, so the abort did not apply: {reason}"
    )]
    Compensation {
        position: usize,
        reason: Box<RejectReason>,
    },
    #[error("group {group} takes part in migration {migration}; drop it once that migration has finished or aborted")]
    GroupInMigration {
        group: GroupId,
        migration: MigrationId,
    },
}

/// Rejections of `CaTrustChange`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum CaError {
    #[error("the CA trust change neither adds nor removes a certificate")]
    Empty,
    #[error("the CA certificate is {len} bytes; it must be 1..={MAX_CA_CERT_LEN} bytes of DER")]
    BadCertLength { len: usize },
    #[error("no trusted CA has fingerprint {}", crate::core::codec::hex(.0))]
    UnknownFingerprint(CertFingerprint),
    #[error("removing the last trusted CA would lock every node out; stage a new CA first")]
    LastCa,
}

/// A rejected entry, as recorded in the cache.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rejection {
    pub index: u64,
    pub entry: String,
    pub reason: RejectReason,
}

/// Why the metadata group stopped applying (DESIGN.md §3.3).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FailCause {
    #[error("entry does not decode: {0}")]
    Undecodable(CodecError),
    #[error("corrupt migration checkpoint: {0}")]
    CorruptCheckpoint(CheckpointCorruption),
    #[error("log gap: expected index {expected}, got {got}")]
    LogGap { expected: u64, got: u64 },
    #[error(transparent)]
    UnsupportedVersion(VersionError),
}

/// The metadata group fail-stopped: nothing at or after `index` was applied.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("group {group} fail-stopped at index {index}: {cause}")]
pub struct FailStop {
    pub group: GroupId,
    pub index: u64,
    pub cause: FailCause,
}

/// The trusted CA set: fingerprint → DER certificate.
pub type CaTrustSet = BTreeMap<CertFingerprint, Vec<u8>>;

/// What a new cluster starts with, written by the bootstrapping node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bootstrap {
    pub cluster_id: [u8; 16],
    pub node_id: NodeId,
    pub addr: String,
    pub data_groups: u64,
    pub replication_factor: usize,
    pub ca_cert_der: Vec<u8>,
}

/// The replicated metadata state. Its encoding is the group-0 snapshot, and
/// it is byte-identical on every replica at the same applied index.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetadataState {
    pub cluster_id: [u8; 16],
    pub applied_index: u64,
    /// The greatest record HLC applied: the log's own, monotonic clock.
    pub log_time: Hlc,
    pub cluster_version: ClusterVersion,
    pub topology: Topology,
    pub routing: RoutingTable,
    /// How many replicas each data group should have; the group-0 leader
    /// adds replicas on active nodes until it does (`core::placement`).
    pub replication_factor: u64,
    pub leases: LeaseTable,
    pub ca_trust: CaTrustSet,
    pub surrogate_hwm: u32,
    pub tokens: TokenTable,
    pub migrations: BTreeMap<MigrationId, MigrationRow>,
    pub ddl_applied: u64,
    pub audited_ddl_applied: u64,
    pub rejected_total: u64,
    pub recent_rejections: VecDeque<Rejection>,
}

impl Wire for MetadataState {
    const KIND: FrameKind = FrameKind::Snapshot;
}

/// A node's view of group 0: the replicated state plus, if the group
/// fail-stopped on this node, why.
#[derive(Clone, Debug)]
pub struct MetadataCache {
    state: MetadataState,
    failed: Option<FailStop>,
}

impl MetadataCache {
    /// The state of a brand-new cluster, as the bootstrapping node writes it.
    pub fn bootstrap(b: &Bootstrap) -> Result<Self, RoutingError> {
        let routing = RoutingTable::bootstrap(b.data_groups, &[b.node_id], b.replication_factor)?;
        let mut ca_trust = CaTrustSet::new();
        ca_trust.insert(fingerprint(&b.ca_cert_der), b.ca_cert_der.clone());
        Ok(Self::from_state(MetadataState {
            cluster_id: b.cluster_id,
            applied_index: 0,
            log_time: Hlc::ZERO,
            cluster_version: ClusterVersion::LATEST,
            topology: Topology::bootstrap(b.node_id, b.addr.clone()),
            routing,
            replication_factor: b.replication_factor as u64,
            leases: LeaseTable::new(),
            ca_trust,
            surrogate_hwm: 0,
            tokens: TokenTable::new(),
            migrations: BTreeMap::new(),
            ddl_applied: 0,
            audited_ddl_applied: 0,
            rejected_total: 0,
            recent_rejections: VecDeque::new(),
        }))
    }

    pub fn from_state(state: MetadataState) -> Self {
        MetadataCache {
            state,
            failed: None,
        }
    }

    /// Restores from a snapshot; refuses a cluster version this binary does not know.
    pub fn restore(snapshot: &[u8]) -> Result<Self, RestoreError> {
        let state: MetadataState = codec::decode(snapshot)?;
        state.cluster_version.check_supported()?;
        Ok(Self::from_state(state))
    }

    /// The snapshot of the replicated state.
    pub fn snapshot(&self) -> Vec<u8> {
        codec::encode(&self.state)
    }

    pub fn state(&self) -> &MetadataState {
        &self.state
    }

    pub fn applied_index(&self) -> u64 {
        self.state.applied_index
    }

    /// Why the group stopped, if it did.
    pub fn failed(&self) -> Option<&FailStop> {
        self.failed.as_ref()
    }

    /// Applies committed entries `(index, bytes)` in order and returns the
    /// applied index. An empty payload is a Raft no-op (the index advances);
    /// an index at or below the applied index is ignored (replay after a
    /// restart). A gap, an undecodable entry or a corrupt checkpoint stops
    /// the group at the entry before it, for good.
    pub fn apply<B: AsRef<[u8]>>(
        &mut self,
        entries: &[(u64, B)],
        hooks: &mut dyn MetadataHooks,
    ) -> Result<u64, FailStop> {
        if let Some(failed) = &self.failed {
            return Err(failed.clone());
        }
        for (index, bytes) in entries {
            let index = *index;
            if index <= self.state.applied_index {
                continue;
            }
            let expected = self.state.applied_index + 1;
            let result = if index != expected {
                Err(FailCause::LogGap {
                    expected,
                    got: index,
                })
            } else {
                self.apply_one(index, bytes.as_ref(), hooks)
            };
            if let Err(cause) = result {
                let stop = FailStop {
                    group: GroupId::METADATA,
                    index,
                    cause,
                };
                tracing::error!(%stop, "metadata group fail-stopped");
                self.failed = Some(stop.clone());
                return Err(stop);
            }
        }
        Ok(self.state.applied_index)
    }

    fn apply_one(
        &mut self,
        index: u64,
        bytes: &[u8],
        hooks: &mut dyn MetadataHooks,
    ) -> Result<(), FailCause> {
        if bytes.is_empty() {
            self.state.applied_index = index;
            return Ok(());
        }
        let record: MetadataRecord = codec::decode(bytes).map_err(FailCause::Undecodable)?;
        let mut events = Vec::new();
        let mut next = None;
        let outcome = match &record.entry {
            // Entries that touch several parts of the state apply to a copy
            // that replaces the state only if every part succeeded.
            MetadataEntry::Batch { .. }
            | MetadataEntry::MigrationAbort { .. }
            | MetadataEntry::CaTrustChange { .. } => {
                let mut copy = self.state.clone();
                let outcome = apply_entry(&mut copy, index, record.hlc, &record.entry, &mut events);
                next = Some(copy);
                outcome
            }
            _ => apply_entry(
                &mut self.state,
                index,
                record.hlc,
                &record.entry,
                &mut events,
            ),
        };
        match outcome {
            Ok(()) => {
                if let Some(next) = next {
                    self.state = next;
                }
                for event in &events {
                    hooks.on_applied(event);
                }
            }
            Err(EntryOutcome::Rejected(reason)) => {
                tracing::debug!(index, entry = record.entry.name(), %reason, "metadata entry rejected");
                self.state
                    .record_rejection(index, record.entry.name(), reason);
            }
            Err(EntryOutcome::Failed(cause)) => return Err(cause),
        }
        self.state.log_time = self.state.log_time.max(record.hlc);
        self.state.applied_index = index;
        Ok(())
    }
}

/// A snapshot that cannot be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    #[error("metadata snapshot does not decode: {0}")]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Version(#[from] VersionError),
}

/// SHA-256 of a DER certificate: how the trust set names it.
pub fn fingerprint(der: &[u8]) -> CertFingerprint {
    Sha256::digest(der).into()
}
