//! Learning that group 0 retired this node while it was away.
//!
//! A node learns it was decommissioned from the group-0 entries that say
//! so. A node that was partitioned off, paused or down while that happened
//! never receives them: the same decommission removes it from group 0's
//! configuration, so no leader sends it anything again, and with pre-vote
//! its campaigns disturb no one. It would keep its data-group replicas, and
//! their data, for good (simulator seed 10737: a node paused for half a
//! minute).
//!
//! So a node whose replica of group 0 has had no leader, or has not heard
//! from the node it takes for the leader, for [`RETIREMENT_CHECK_INTERVAL`]
//! asks its peers for the metadata state, read linearizably at the group-0
//! leader, and once per interval after that. (A voter of group 0 left
//! behind loses its leader at its next election timeout; a learner never
//! campaigns, so it keeps naming the leader that stopped talking to it.)
//! Retirement is final (a decommissioned node's id is never reused), so an
//! answer that says this node is decommissioned or gone holds for good;
//! the reconciler then deletes every data-group replica here. Like etcd's
//! removed members, which learn it from their peers' refusals, the node
//! learns it from the cluster, not from its own stale log.

use super::{Command, Runtime};
use crate::core::cache::MetadataState;
use crate::core::codec;
use crate::core::ids::{GroupId, NodeId};
use crate::core::topology::NodeState;
use crate::io::transport::Transport;
use crate::node::rpc::{NodeError, Request, Response};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// How long this node must have been cut off from group 0's leader before
/// it asks its peers whether it was retired, and how often it asks again.
pub(super) const RETIREMENT_CHECK_INTERVAL: Duration = Duration::from_secs(2);

/// The longest one question to a peer may take: the check runs again a
/// moment later, so a peer that does not answer only costs this much.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

impl Runtime {
    /// On every reconciliation: while this node is cut off from group 0's
    /// leader, asks its peers, once per [`RETIREMENT_CHECK_INTERVAL`],
    /// whether group 0 retired it. A peer that says so sends
    /// [`Command::Retired`].
    pub(super) fn check_retirement(&mut self) {
        let now = Instant::now();
        let cut_off = self
            .engine
            .status(GroupId::METADATA)
            .is_some_and(|s| match s.leader {
                None => true,
                Some(leader) => leader != self.me && !self.liveness.reachable(leader, now),
            });
        if self.retired || !cut_off {
            self.cut_off_since = None;
            return;
        }
        let since = *self.cut_off_since.get_or_insert(now);
        if now < since + RETIREMENT_CHECK_INTERVAL {
            return;
        }
        self.cut_off_since = Some(now);
        let Some(cache) = &self.metadata else {
            return;
        };
        let peers = cache
            .state()
            .topology
            .nodes()
            .map(|(id, _)| id)
            .filter(|&id| id != self.me);
        for peer in peers {
            let transport = Arc::clone(&self.transport);
            let own = self.own_commands.clone();
            let me = self.me;
            tokio::spawn(async move {
                if let Some(true) = ask_whether_retired(&*transport, me, peer).await {
                    let _ = own.send(Command::Retired);
                }
            });
        }
    }

    /// A peer said group 0 retired this node: from now on it hosts no data
    /// and serves no request. The mark goes to disk first, so a restart
    /// into the stale metadata does not host the old groups again. If it
    /// cannot be written, the node stops as after any failed write, and
    /// learns it again from its peers after a restart.
    pub(super) fn on_retired(&mut self) {
        if self.retired {
            return;
        }
        crate::probe!("node.learned_retired");
        tracing::warn!(
            node = %self.me,
            "this node was decommissioned while it was away; deleting its replicas"
        );
        if let Err(e) = self.engine.mark_retired() {
            self.storage_failed(e);
        }
        self.retired = true;
    }

    /// Whether this node is retired: a peer said so, or its own metadata
    /// says it was decommissioned or has left.
    pub(super) fn is_retired(&self) -> bool {
        self.retired
            || self
                .metadata
                .as_ref()
                .is_some_and(|cache| retired_in(cache.state(), self.me))
    }

    /// The metadata that requests are served from, or why none are: this
    /// node has none yet, or it was retired (its routing may be stale for
    /// good, so it must not route or answer anything).
    pub(super) fn serving_state(&self) -> Result<&MetadataState, NodeError> {
        if self.is_retired() {
            return Err(NodeError::Retired { node: self.me });
        }
        self.metadata
            .as_ref()
            .map(|cache| cache.state())
            .ok_or(NodeError::NoMetadata)
    }
}

/// Asks `peer` (and, if it is not the group-0 leader, the leader it names)
/// for the metadata state. `Some(retired)` once one of them answered.
async fn ask_whether_retired(transport: &dyn Transport, me: NodeId, peer: NodeId) -> Option<bool> {
    let mut target = peer;
    for _ in 0..2 {
        let bytes = transport
            .call(target, codec::encode(&Request::ReadMetadata), ASK_TIMEOUT)
            .await
            .ok()?;
        match codec::decode::<Response>(&bytes).ok()? {
            Response::Metadata(state) => return Some(retired_in(&state, me)),
            Response::Error(NodeError::NotLeader {
                leader: Some(leader),
                ..
            }) if leader != target && leader != me => target = leader,
            _ => return None,
        }
    }
    None
}

/// Whether `state` says `node` was decommissioned or is no node of the
/// cluster (it left, or its id was retired): either way it hosts no data.
fn retired_in(state: &MetadataState, node: NodeId) -> bool {
    state
        .topology
        .get(node)
        .is_none_or(|info| info.state == NodeState::Decommissioned)
}
