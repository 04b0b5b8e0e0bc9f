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

use crate::core::codec::{self, CodecError, FrameKind, Wire};
use crate::core::entry::{CertFingerprint, MetadataEntry, MetadataRecord};
use crate::core::hlc::Hlc;
use crate::core::hooks::{AppliedEvent, AuditRecord, MetadataHooks};
use crate::core::ids::{GroupId, MigrationId, NodeId};
use crate::core::lease::{LeaseError, LeaseTable};
use crate::core::migration::{
    CheckpointCorruption, Compensation, MigrationError, MigrationPhaseTag, MigrationRow,
    UpsertDecision,
};
use crate::core::routing::{RoutingChange, RoutingError, RoutingTable};
use crate::core::token::{TokenError, TokenTable};
use crate::core::topology::{NodeState, Topology, TopologyChange, TopologyError};
use crate::core::version::{ClusterVersion, VersionError};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, VecDeque};

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

/// How one entry failed to apply.
enum EntryOutcome {
    Rejected(RejectReason),
    Failed(FailCause),
}

impl From<RejectReason> for EntryOutcome {
    fn from(reason: RejectReason) -> Self {
        EntryOutcome::Rejected(reason)
    }
}

/// Shorthand so module errors flow into [`EntryOutcome`] with `?`.
fn rejected<E: Into<RejectReason>>(e: E) -> EntryOutcome {
    EntryOutcome::Rejected(e.into())
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

impl MetadataState {
    fn record_rejection(&mut self, index: u64, entry: &str, reason: RejectReason) {
        self.rejected_total += 1;
        if self.recent_rejections.len() == REJECTION_HISTORY {
            self.recent_rejections.pop_front();
        }
        self.recent_rejections.push_back(Rejection {
            index,
            entry: entry.to_string(),
            reason,
        });
    }

    /// Refuses a replica on a node that is not an active member.
    fn check_can_host(&self, node_id: NodeId) -> Result<(), RejectReason> {
        match self.topology.get(node_id).map(|n| &n.state) {
            Some(NodeState::Active(_)) => Ok(()),
            Some(state) => Err(RejectReason::NodeNotActive {
                node_id,
                state: format!("{state:?}"),
            }),
            None => Err(RejectReason::NodeNotActive {
                node_id,
                state: "not in the topology".to_string(),
            }),
        }
    }

    fn apply_topology(&mut self, change: &TopologyChange) -> Result<(), RejectReason> {
        if let TopologyChange::FinishDecommission { node_id } = change {
            let groups = self.routing.groups_of_node(*node_id);
            if !groups.is_empty() {
                return Err(RejectReason::StillHoldsReplicas {
                    node_id: *node_id,
                    groups,
                });
            }
        }
        Ok(self.topology.apply(change)?)
    }

    fn apply_routing(&mut self, change: &RoutingChange) -> Result<(), RejectReason> {
        match change {
            RoutingChange::AddLearner { node_id, .. } => self.check_can_host(*node_id)?,
            RoutingChange::CreateGroup { voters, .. } => {
                for node_id in voters {
                    self.check_can_host(*node_id)?;
                }
            }
            _ => {}
        }
        self.routing.apply(change)?;
        Ok(())
    }

    fn apply_ca_change(
        &mut self,
        add: Option<&Vec<u8>>,
        remove: Option<&CertFingerprint>,
    ) -> Result<(), CaError> {
        if add.is_none() && remove.is_none() {
            return Err(CaError::Empty);
        }
        if let Some(der) = add {
            if der.is_empty() || der.len() > MAX_CA_CERT_LEN {
                return Err(CaError::BadCertLength { len: der.len() });
            }
            self.ca_trust.insert(fingerprint(der), der.clone());
        }
        if let Some(fp) = remove {
            if !self.ca_trust.contains_key(fp) {
                return Err(CaError::UnknownFingerprint(*fp));
            }
            if self.ca_trust.len() == 1 {
                return Err(CaError::LastCa);
            }
            self.ca_trust.remove(fp);
        }
        Ok(())
    }

    /// A new migration starts only if what it moves is where it says, and
    /// no other unfinished migration changes one of its groups. Checked at
    /// apply time, so two coordinators racing to start moves on one group
    /// cannot both win.
    fn check_migration_start(&self, row: &MigrationRow) -> Result<(), MigrationError> {
        use crate::core::migration::MigrationCheckpointPayload as Payload;
        use crate::core::topology::NodeState;
        let migration_id = row.migration_id;
        let payload = row.verify().map_err(MigrationError::Unverified)?;
        let cannot = |reason: String| MigrationError::CannotStart {
            migration_id,
            reason,
        };
        for group in payload.groups() {
            if self.routing.group(group).is_none() {
                return Err(cannot(format!("group {group} does not exist")));
            }
            let busy = self.migrations.iter().find(|(_, other)| {
                other.phase != MigrationPhaseTag::Complete
                    && other.verify().map_or(true, |p| p.groups().contains(&group))
            });
            if let Some((&other, _)) = busy {
                return Err(MigrationError::GroupBusy {
                    migration_id,
                    group,
                    other,
                });
            }
        }
        match payload {
            Payload::Replica(p) => {
                let route = self
                    .routing
                    .group(p.group_id)
                    .ok_or_else(|| cannot(format!("group {} does not exist", p.group_id)))?;
                if !route.is_member(p.source) {
                    return Err(cannot(format!(
                        "node {} holds no replica of group {}",
                        p.source, p.group_id
                    )));
                }
                if route.is_member(p.target) {
                    return Err(cannot(format!(
                        "node {} already holds a replica of group {}",
                        p.target, p.group_id
                    )));
                }
                let active = self
                    .topology
                    .get(p.target)
                    .is_some_and(|info| matches!(info.state, NodeState::Active(_)));
                if !active {
                    return Err(cannot(format!("node {} is not an active node", p.target)));
                }
            }
            Payload::VShard(p) => {
                let serving = self.routing.lookup(p.vshard_id).group;
                if serving != p.source_group {
                    return Err(cannot(format!(
                        "vShard {} is served by group {serving}, not {}",
                        p.vshard_id, p.source_group
                    )));
                }
                if p.target_group == p.source_group {
                    return Err(cannot(format!(
                        "vShard {} is already in group {}",
                        p.vshard_id, p.target_group
                    )));
                }
            }
        }
        Ok(())
    }

    /// A migration past its point of no return can only be finished: a
    /// replica move once cut over, a vShard move once routing sends the
    /// vShard to its target. Checked at apply time, so an abort decided
    /// by a coordinator that lost its role can never undo a finished move.
    fn check_abortable(&self, row: &MigrationRow) -> Result<(), MigrationError> {
        use crate::core::migration::MigrationCheckpointPayload as Payload;
        let payload = row.verify().map_err(MigrationError::Unverified)?;
        let reassigned = match &payload {
            Payload::VShard(p) => self.routing.lookup(p.vshard_id).group == p.target_group,
            Payload::Replica(_) => false,
        };
        if crate::core::migration::compensations(&payload, row.phase, reassigned).is_none() {
            return Err(MigrationError::PastNoReturn {
                migration_id: row.migration_id,
                phase: row.phase,
            });
        }
        Ok(())
    }

    /// Forgets the oldest finished migrations (by commit time, then id)
    /// beyond [`COMPLETED_MIGRATIONS_KEPT`], so that the table stays bounded
    /// however many moves the cluster makes. Deterministic: it looks only at
    /// the rows.
    fn forget_old_completed(&mut self) {
        let mut completed: Vec<(u64, MigrationId)> = self
            .migrations
            .values()
            .filter(|row| row.phase == MigrationPhaseTag::Complete)
            .map(|row| (row.ts_ms, row.migration_id))
            .collect();
        let Some(excess) = completed.len().checked_sub(COMPLETED_MIGRATIONS_KEPT) else {
            return;
        };
        completed.sort_unstable();
        for (_, id) in &completed[..excess] {
            self.migrations.remove(id);
        }
    }

    fn apply_compensation(
        &mut self,
        index: u64,
        migration_id: MigrationId,
        compensation: &Compensation,
        events: &mut Vec<AppliedEvent>,
    ) -> Result<(), RejectReason> {
        // Each routing compensation is skipped when there is nothing left to
        // undo (the step it reverses never happened, or was undone by an
        // earlier, partly delivered abort), so an abort is idempotent.
        let change = match *compensation {
            Compensation::RemoveLearner { group_id, node_id } => self
                .routing
                .group(group_id)
                .filter(|g| g.learners.contains(&node_id))
                .map(|_| RoutingChange::RemoveMember { group_id, node_id }),
            Compensation::RemoveVoter { group_id, node_id } => self
                .routing
                .group(group_id)
                .filter(|g| g.voters.contains(&node_id))
                .map(|_| RoutingChange::RemoveMember { group_id, node_id }),
            Compensation::RestoreVoter { group_id, node_id } => self
                .routing
                .group(group_id)
                .filter(|g| g.learners.contains(&node_id))
                .map(|_| RoutingChange::PromoteLearner { group_id, node_id }),
            Compensation::RestoreLeaderHint { group_id, node_id } => self
                .routing
                .group(group_id)
                .filter(|g| g.voters.contains(&node_id) && g.leader != Some(node_id))
                .map(|_| RoutingChange::LeadershipTransfer {
                    group_id,
                    new_leader_node_id: node_id,
                }),
            Compensation::RemoveGhostStub {
                vshard_id,
                group_id,
            } => self
                .routing
                .ghosts()
                .any(|(v, g, _)| v == vshard_id && g == group_id)
                .then_some(RoutingChange::RemoveGhostStub {
                    vshard_id,
                    group_id,
                }),
            Compensation::Unfence { .. } | Compensation::DropPartialCopy { .. } => {
                events.push(AppliedEvent::DataCompensation {
                    index,
                    migration_id,
                    compensation: *compensation,
                });
                None
            }
        };
        if let Some(change) = change {
            self.routing.apply(&change)?;
        }
        Ok(())
    }
}

/// SHA-256 of a DER certificate: how the trust set names it.
pub fn fingerprint(der: &[u8]) -> CertFingerprint {
    Sha256::digest(der).into()
}

/// Applies one entry to `state`. On `Err` the caller discards `state` if the
/// entry is composite; simple entries leave it unchanged because every
/// module's `apply` is atomic.
fn apply_entry(
    state: &mut MetadataState,
    index: u64,
    hlc: Hlc,
    entry: &MetadataEntry,
    events: &mut Vec<AppliedEvent>,
) -> Result<(), EntryOutcome> {
    entry
        .check_allowed(state.cluster_version)
        .map_err(rejected)?;
    let now = state.log_time.max(hlc);
    match entry {
        MetadataEntry::CatalogDdl { payload } => {
            state.ddl_applied += 1;
            events.push(AppliedEvent::CatalogDdl {
                index,
                committed_at: now,
                payload: payload.clone(),
            });
        }
        MetadataEntry::CatalogDdlAudited {
            payload,
            auth_user_id,
            auth_user_name,
            sql_text,
        } => {
            state.ddl_applied += 1;
            state.audited_ddl_applied += 1;
            events.push(AppliedEvent::AuditedDdl {
                payload: payload.clone(),
                audit: AuditRecord {
                    index,
                    committed_at: now,
                    auth_user_id: *auth_user_id,
                    auth_user_name: auth_user_name.clone(),
                    sql_text: sql_text.clone(),
                },
            });
        }
        MetadataEntry::Batch { entries } => {
            for (position, sub) in entries.iter().enumerate() {
                apply_entry(state, index, hlc, sub, events).map_err(|outcome| match outcome {
                    EntryOutcome::Rejected(reason) => EntryOutcome::Rejected(RejectReason::Batch {
                        position,
                        reason: Box::new(reason),
                    }),
                    failed => failed,
                })?;
            }
        }
        MetadataEntry::TopologyChange(change) => state.apply_topology(change)?,
        MetadataEntry::RoutingChange(change) => state.apply_routing(change)?,
        MetadataEntry::ClusterVersionBump { from, to } => {
            if *from != state.cluster_version {
                return Err(rejected(VersionError::StaleBump {
                    from: *from,
                    current: state.cluster_version,
                }));
            }
            if to <= from {
                return Err(rejected(VersionError::NotForward {
                    from: *from,
                    to: *to,
                }));
            }
            // A version this binary does not know cannot be run: stop here
            // rather than apply later entries under rules it does not have.
            to.check_supported()
                .map_err(|e| EntryOutcome::Failed(FailCause::UnsupportedVersion(e)))?;
            state.cluster_version = *to;
        }
        MetadataEntry::DescriptorLeaseGrant(lease) => {
            state.leases.prune_expired(now);
            state.leases.grant(lease, now).map_err(rejected)?;
        }
        MetadataEntry::DescriptorLeaseRelease {
            node_id,
            descriptor_ids,
        } => {
            state.leases.release(*node_id, descriptor_ids);
        }
        MetadataEntry::DescriptorDrainStart {
            descriptor_id,
            up_to_version,
            expires_at,
        } => {
            state.leases.prune_expired(now);
            state
                .leases
                .drain_start(*descriptor_id, *up_to_version, *expires_at, now)
                .map_err(rejected)?;
        }
        MetadataEntry::DescriptorDrainEnd { descriptor_id } => state
            .leases
            .drain_end(*descriptor_id)
            .map_err(|e: LeaseError| rejected(e))?,
        MetadataEntry::CaTrustChange {
            add_ca_cert,
            remove_ca_fingerprint,
        } => {
            state
                .apply_ca_change(add_ca_cert.as_ref(), remove_ca_fingerprint.as_ref())
                .map_err(rejected)?;
            events.push(AppliedEvent::CaTrustChanged {
                trusted: state.ca_trust.keys().copied().collect(),
            });
        }
        MetadataEntry::SurrogateAlloc { hwm } => {
            state.surrogate_hwm = state.surrogate_hwm.max(*hwm);
        }
        MetadataEntry::JoinTokenTransition {
            token_hash,
            transition,
            ts_ms,
        } => {
            state
                .tokens
                .apply(token_hash, transition, *ts_ms)
                .map_err(|e: TokenError| rejected(e))?;
        }
        MetadataEntry::MigrationCheckpoint {
            migration_id,
            phase,
            attempt,
            payload,
            crc32c,
            ts_ms,
        } => {
            let row = MigrationRow {
                migration_id: *migration_id,
                phase: *phase,
                attempt: *attempt,
                payload: payload.clone(),
                crc32c: *crc32c,
                ts_ms: *ts_ms,
            };
            row.verify()
                .map_err(|c| EntryOutcome::Failed(FailCause::CorruptCheckpoint(c)))?;
            let existing = state.migrations.get(migration_id);
            let decision = MigrationRow::decide(existing, &row).map_err(rejected)?;
            if decision == UpsertDecision::Insert {
                state.check_migration_start(&row).map_err(rejected)?;
            }
            match decision {
                UpsertDecision::Insert | UpsertDecision::Replace => {
                    let complete = row.phase == MigrationPhaseTag::Complete;
                    state.migrations.insert(*migration_id, row);
                    if complete {
                        state.forget_old_completed();
                    }
                }
                UpsertDecision::Duplicate => {}
            }
        }
        MetadataEntry::MigrationAbort {
            migration_id,
            reason: _,
            compensations,
        } => {
            let Some(row) = state.migrations.get(migration_id) else {
                return Err(rejected(MigrationError::UnknownMigration {
                    migration_id: *migration_id,
                }));
            };
            state.check_abortable(row).map_err(rejected)?;
            for (position, compensation) in compensations.iter().enumerate() {
                state
                    .apply_compensation(index, *migration_id, compensation, events)
                    .map_err(|reason| {
                        rejected(RejectReason::Compensation {
                            position,
                            reason: Box::new(reason),
                        })
                    })?;
            }
            state.migrations.remove(migration_id);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::arbitrary;
    use crate::core::ids::{DescriptorId, VShardId};
    use crate::core::lease::DescriptorLease;
    use crate::core::migration::{
        MigrationCheckpointPayload, MigrationPhaseTag, ReplicaMovePayload,
    };
    use crate::core::token::{JoinTokenTransitionKind, TokenState};
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
}
