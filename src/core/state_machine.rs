//! The data groups' replicated state machine (DESIGN.md §7).
//!
//! Every data Raft group feeds its committed commands, in log order, to one
//! [`DataStateMachine`]. The host plugs in its own; keel ships
//! [`KvStateMachine`](crate::core::kv::KvStateMachine), an ordered key-value
//! store. The engine treats commands, responses and snapshots as opaque bytes,
//! so the trait is all the engine knows about a group's data.

use crate::core::codec::CodecError;
use crate::core::ids::VShardId;

/// A data group's replicated state machine, supplied by the host (or keel's
/// `KvStateMachine`).
///
/// Implementations must be deterministic: the same commands at the same
/// indices give byte-identical snapshots on every replica. So they must never
/// read the clock, draw randomness or iterate a hash map in apply or snapshot.
pub trait DataStateMachine: Send {
    /// Applies one committed command at `index` and returns the response
    /// bytes handed back to the proposer.
    ///
    /// Indices increase but need not be contiguous: the engine does not pass
    /// Raft no-ops or configuration changes on. An `index` at or below
    /// [`applied_index`](Self::applied_index) must change nothing (the engine
    /// replays the log tail after a restart). A command that does not decode
    /// or is invalid must produce a deterministic error *response* — never a
    /// panic, never a divergence — and still counts as applied, because every
    /// replica has the same bytes at that index and must reach the same state.
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8>;

    /// The index of the last applied command (0 for a new state machine).
    fn applied_index(&self) -> u64;

    /// Answers a read-only query on the current state. The node calls it
    /// once the state is recent enough for the read's consistency (after a
    /// read index for linearizable reads). Like `apply`, a query that does
    /// not decode gets an error *response*.
    fn query(&self, query: &[u8]) -> Vec<u8>;

    /// The serialized state as of `applied_index` (a Raft snapshot).
    fn snapshot(&self) -> Vec<u8>;

    /// Replaces the state with a snapshot. The bytes are untrusted (they come
    /// from a peer or from disk): malformed bytes give an error and leave the
    /// state unchanged.
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), StateMachineError>;

    /// One vShard's data, for a vShard move (DESIGN.md §5): bytes that
    /// [`import_vshard`](Self::import_vshard) of the same machine type
    /// accepts. Must be deterministic, like `snapshot`.
    fn export_vshard(&self, vshard: VShardId) -> Vec<u8>;

    /// Replaces `vshard`'s data with an export of it. The bytes are
    /// untrusted: malformed bytes, or data of another vShard, give an error
    /// and leave the state unchanged. Every replica of the target group
    /// imports the same bytes at the same index.
    fn import_vshard(&mut self, vshard: VShardId, export: &[u8]) -> Result<(), StateMachineError>;

    /// Deletes `vshard`'s data (the source after a move, or an aborted copy).
    fn drop_vshard(&mut self, vshard: VShardId);
}

/// A snapshot that cannot be restored.
///
/// Not serializable, unlike most core errors: it wraps [`CodecError`], which
/// is not, and it is a local failure that never enters the replicated state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StateMachineError {
    #[error("snapshot does not decode: {0}")]
    Decode(#[from] CodecError),
    #[error("snapshot decodes but is invalid: {0}")]
    Invalid(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The engine holds state machines as trait objects and moves them
    /// between threads, so the trait must stay object-safe and `Send`.
    #[test]
    fn trait_objects_are_send() {
        fn assert_send<T: Send + ?Sized>() {}
        assert_send::<Box<dyn DataStateMachine>>();
    }

    #[test]
    fn errors_name_the_cause() {
        let decode = StateMachineError::from(CodecError::TooShort { len: 3 });
        assert_eq!(
            decode.to_string(),
            "snapshot does not decode: frame of 3 bytes is shorter than the 11-byte header"
        );
        let invalid = StateMachineError::Invalid("entry 2 is out of order".into());
        assert_eq!(
            invalid.to_string(),
            "snapshot decodes but is invalid: entry 2 is out of order"
        );
    }
}
