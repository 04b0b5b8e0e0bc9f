//! Applying committed entries to group 0's metadata cache and the data
//! state machines, and answering the proposers waiting for them.

use super::Runtime;
use crate::core::cache::RejectReason;
use crate::core::codec;
use crate::core::hlc::Hlc;
use crate::core::ids::GroupId;
use crate::node::rpc::{Committed, DataRecord, NodeError, Outcome};
use crate::raft::engine::{conf_change_of, GroupApply};
use raft::prelude::Entry;

impl Runtime {
    /// Applies a group's committed work; returns whether it was group 0's
    /// (the caller then reconciles this node with the new metadata).
    pub(super) fn apply(&mut self, apply: GroupApply) -> bool {
        let group = apply.group;
        if self.failed.contains_key(&group) {
            return false;
        }
        // A restored snapshot counts as applied up to its index.
        let mut last = None;
        if let Some(snapshot) = &apply.snapshot {
            if let Err(e) = self.restore(group, snapshot) {
                self.fail_stop(group, e.to_string());
                return false;
            }
            last = Some(snapshot.get_metadata().index);
        }
        for entry in &apply.entries {
            // For the simulator's state-machine safety checker: no two
            // replicas of a group ever apply different entries at one index.
            tracing::debug!(
                target: "keel_event",
                group = group.0,
                index = entry.get_index(),
                term = entry.get_term(),
                crc = crc32c::crc32c(entry.get_data()),
                node = self.me.get(),
                "applied"
            );
            if let Err(cause) = self.apply_entry(group, entry) {
                self.fail_stop(group, cause);
                break;
            }
            last = Some(entry.get_index());
        }
        if let Some(index) = last {
            let _ = self.engine.advance_apply(group, index);
        }
        group.is_metadata()
    }

    fn fail_stop(&mut self, group: GroupId, cause: String) {
        crate::probe!("node.group_fail_stopped");
        tracing::error!(node = %self.me, %group, %cause, "group fail-stopped");
        self.failed.insert(group, cause);
    }

    /// Applies one committed entry of `group`; an error fail-stops the group.
    fn apply_entry(&mut self, group: GroupId, entry: &Entry) -> Result<(), String> {
        let index = entry.get_index();
        let change = conf_change_of(entry)
            .map_err(|e| format!("membership change at index {index} does not decode: {e}"))?;
        let payload: &[u8] = if let Some(change) = &change {
            self.engine
                .apply_conf_change(group, change)
                .map_err(|e| format!("membership change at index {index}: {e}"))?;
            &[]
        } else {
            entry.get_data()
        };
        let result: Result<Outcome, NodeError> = if group.is_metadata() {
            let cache = self.metadata.as_mut().ok_or_else(|| {
                "metadata entries arrived before the metadata snapshot".to_string()
            })?;
            let rejected_before = cache.state().rejected_total;
            cache
                .apply(&[(index, payload)], &mut *self.hooks)
                .map_err(|stop| stop.to_string())?;
            let state = cache.state();
            let rejection: Option<RejectReason> = (state.rejected_total > rejected_before)
                .then(|| state.recent_rejections.back().map(|r| r.reason.clone()))
                .flatten();
            if rejection.is_some() {
                crate::probe!("metadata.entry_rejected");
            }
            let log_time = state.log_time;
            self.observe_hlc(log_time);
            Ok(Outcome::Metadata(rejection))
        } else if payload.is_empty() {
            Ok(Outcome::Data(Vec::new()))
        } else {
            let record = codec::decode::<DataRecord>(payload)
                .map_err(|e| format!("entry at index {index} does not decode: {e}"))?;
            self.observe_hlc(record.hlc);
            let machine = self
                .machines
                .get_mut(&group)
                .ok_or_else(|| format!("no state machine for group {group}"))?;
            match machine.apply(index, record) {
                Ok(outcome) => {
                    if matches!(outcome, Outcome::Control(Some(_))) {
                        crate::probe!("migration.control_refused");
                    }
                    Ok(outcome)
                }
                Err(refusal) => {
                    crate::probe!("routing.gate_refused_write");
                    Err(self.refusal_error(group, refusal))
                }
            }
        };
        if let Some(id) = self.own_id(entry.get_context()) {
            if let Some(pending) = self.proposals.remove(&id) {
                debug_assert_eq!(pending.group, group);
                let _ = pending.reply.send(result.map(|outcome| Committed {
                    index,
                    hlc: pending.hlc,
                    outcome,
                }));
            }
        }
        Ok(())
    }

    /// Merges the timestamp of a committed record into this node's clock,
    /// so that whatever it proposes next is stamped after everything it has
    /// seen, whichever node proposed it (the hybrid clock's causality). A
    /// stamp more than the allowed clock offset ahead of this node's clock
    /// leaves the clock alone (DESIGN.md §2). The record is committed all
    /// the same, so this is reported, once until the clocks agree again:
    /// some node's clock is off by more than the cluster allows.
    fn observe_hlc(&mut self, remote: Hlc) {
        match self.hlc.update(remote, self.clock.now_ms()) {
            Ok(_) => {
                if std::mem::take(&mut self.clock_ahead) {
                    tracing::info!(node = %self.me, "committed timestamps are within the clock offset again");
                }
            }
            Err(e) => {
                crate::probe!("hlc.remote_ahead_refused");
                if !std::mem::replace(&mut self.clock_ahead, true) {
                    tracing::warn!(node = %self.me, "{e}");
                }
            }
        }
    }
}
