//! What applying the metadata log hands to the outside world.
//!
//! The applier is pure, so effects that belong to the host (catalog DDL,
//! audit records) or to the node runtime (TLS reconfiguration, data-group
//! compensations) leave it as [`AppliedEvent`]s. Events of an entry are
//! delivered only once the whole entry applied: a rejected batch delivers
//! nothing, so the host never sees half of an all-or-nothing entry.

use crate::core::entry::CertFingerprint;
use crate::core::hlc::Hlc;
use crate::core::ids::MigrationId;
use crate::core::migration::Compensation;
use serde::{Deserialize, Serialize};

/// The audit record of a `CatalogDdlAudited` entry, which the host persists.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub index: u64,
    /// The log time at which the statement committed.
    pub committed_at: Hlc,
    pub auth_user_id: u64,
    pub auth_user_name: String,
    pub sql_text: String,
}

/// One effect of an applied entry, in log order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum AppliedEvent {
    /// Host DDL to hand to the host's catalog.
    CatalogDdl {
        index: u64,
        committed_at: Hlc,
        payload: Vec<u8>,
    },
    /// Host DDL with its audit record.
    AuditedDdl {
        payload: Vec<u8>,
        audit: AuditRecord,
    },
    /// The trusted CA set changed: the node rebuilds its TLS configs.
    CaTrustChanged { trusted: Vec<CertFingerprint> },
    /// A compensation of an aborted migration that acts on a data group's
    /// state (unfence a vShard, drop a partial copy); the node executes it.
    DataCompensation {
        index: u64,
        migration_id: MigrationId,
        compensation: Compensation,
    },
}

/// Receives the effects of applied entries.
pub trait MetadataHooks {
    fn on_applied(&mut self, event: &AppliedEvent);
}

/// Hooks for a node that has nothing to do with the events (tests, tools).
impl MetadataHooks for () {
    fn on_applied(&mut self, _event: &AppliedEvent) {}
}

/// Collects events, in order (tests and the simulator's checkers).
impl MetadataHooks for Vec<AppliedEvent> {
    fn on_applied(&mut self, event: &AppliedEvent) {
        self.push(event.clone());
    }
}
