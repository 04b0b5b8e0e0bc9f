//! The transport between nodes, as the node runtime sees it.
//!
//! Two kinds of traffic: one-way frames (batched Raft messages; the sender
//! does not wait, Raft retries what is lost) and request/response calls
//! (forwarded proposals, read-index reads, joins, status). Bindings: QUIC +
//! mutual TLS in production, an in-process network for tests, madsim's
//! network in the simulator. Frames are opaque bytes here; the node encodes
//! them with the envelope codec and validates everything it receives.

use crate::core::ids::NodeId;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// The largest frame a transport carries; anything larger is refused.
pub const MAX_FRAME_LEN: usize = 64 * 1024 * 1024;

/// A call timeout for tests and the simulator's own checks; the node takes
/// its timeouts from its configuration.
pub const DEFAULT_CALL_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportError {
    #[error("node {0} is not reachable")]
    Unreachable(NodeId),
    #[error("call to node {0} timed out")]
    Timeout(NodeId),
    #[error("node {0} dropped the call without answering")]
    Dropped(NodeId),
    #[error("frame of {len} bytes exceeds the {MAX_FRAME_LEN}-byte limit")]
    FrameTooLarge { len: usize },
}

/// What arrives at a node.
#[derive(Debug)]
pub enum Inbound {
    /// A one-way frame.
    Frame { from: NodeId, frame: Vec<u8> },
    /// A call; the node answers through `reply` (dropping it fails the call).
    Call {
        from: NodeId,
        request: Vec<u8>,
        reply: oneshot::Sender<Vec<u8>>,
    },
}

/// The receiving half a binding hands to the node.
pub type InboundReceiver = mpsc::UnboundedReceiver<Inbound>;

/// A boxed future: calls must be usable through `dyn Transport`.
pub type CallFuture = Pin<Box<dyn Future<Output = Result<Vec<u8>, TransportError>> + Send>>;

/// The sending half of a node's transport.
pub trait Transport: Send + Sync + 'static {
    /// Sends a one-way frame. Never blocks; a frame that cannot be delivered
    /// is dropped (the node learns of unreachable peers through calls and
    /// Raft's own probing).
    fn send(&self, to: NodeId, frame: Vec<u8>);

    /// Sends a request and waits for the response, at most `timeout`.
    fn call(&self, to: NodeId, request: Vec<u8>, timeout: Duration) -> CallFuture;

    /// Drops every connection with `peer`, both directions: the node found
    /// it claiming another node's identity (DESIGN.md §6). It may connect
    /// again, and is dropped again if it keeps doing so.
    fn disconnect(&self, peer: NodeId);
}

/// Test helper shared by the bindings' tests: answers every call arriving
/// at `rx` with the request prefixed by "re:".
#[cfg(test)]
pub(crate) fn spawn_echo(mut rx: InboundReceiver) {
    tokio::spawn(async move {
        while let Some(inbound) = rx.recv().await {
            if let Inbound::Call { request, reply, .. } = inbound {
                let mut response = b"re:".to_vec();
                response.extend_from_slice(&request);
                // The caller may have given up already; nothing to do then.
                let _ = reply.send(response);
            }
        }
    });
}
