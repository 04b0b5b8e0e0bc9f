//! How each committed metadata entry changes [`MetadataState`]: the rules
//! an entry must pass, checked against the state it applies to, and the
//! change it makes. Every check is deterministic, so every replica rejects
//! the same entries for the same reasons.

use super::{
    fingerprint, CaError, FailCause, MetadataState, RejectReason, Rejection,
    COMPLETED_MIGRATIONS_KEPT, MAX_CA_CERT_LEN, REJECTION_HISTORY,
};
use crate::core::entry::{CertFingerprint, MetadataEntry};
use crate::core::hlc::Hlc;
use crate::core::hooks::{AppliedEvent, AuditRecord};
use crate::core::ids::{GroupId, MigrationId, NodeId};
use crate::core::lease::LeaseError;
use crate::core::migration::{
    Compensation, MigrationError, MigrationPhaseTag, MigrationRow, UpsertDecision,
};
use crate::core::routing::RoutingChange;
use crate::core::token::TokenError;
use crate::core::topology::{NodeState, TopologyChange};
use crate::core::version::VersionError;

/// How one entry failed to apply.
pub(super) enum EntryOutcome {
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

impl MetadataState {
    pub(super) fn record_rejection(&mut self, index: u64, entry: &str, reason: RejectReason) {
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
            RoutingChange::DropGroup { group_id } => {
                if let Some(migration) = self.migration_changing(*group_id) {
                    return Err(RejectReason::GroupInMigration {
                        group: *group_id,
                        migration,
                    });
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
    /// The unfinished migration that changes `group`, if any (one whose
    /// checkpoint does not verify counts: it may).
    fn migration_changing(&self, group: GroupId) -> Option<MigrationId> {
        self.migrations
            .iter()
            .find(|(_, row)| {
                row.phase != MigrationPhaseTag::Complete
                    && row.verify().map_or(true, |p| p.groups().contains(&group))
            })
            .map(|(&id, _)| id)
    }

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
            if let Some(other) = self.migration_changing(group) {
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

/// Applies one entry to `state`. On `Err` the caller discards `state` if the
/// entry is composite; simple entries leave it unchanged because every
/// module's `apply` is atomic.
pub(super) fn apply_entry(
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
        MetadataEntry::MigrationCheckpoint(row) => {
            row.verify()
                .map_err(|c| EntryOutcome::Failed(FailCause::CorruptCheckpoint(c)))?;
            let existing = state.migrations.get(&row.migration_id);
            let decision = MigrationRow::decide(existing, row).map_err(rejected)?;
            if decision == UpsertDecision::Insert {
                state.check_migration_start(row).map_err(rejected)?;
            }
            match decision {
                UpsertDecision::Insert | UpsertDecision::Replace => {
                    let complete = row.phase == MigrationPhaseTag::Complete;
                    state.migrations.insert(row.migration_id, row.clone());
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
