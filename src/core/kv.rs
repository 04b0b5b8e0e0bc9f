//! keel's built-in ordered key-value state machine (DESIGN.md §7), used by the
//! CLI, the demo, the benchmarks and the simulator's workloads.
//!
//! Keys are stored partitioned by vShard (DESIGN.md §4, §5): the store is a map
//! `vShard → (key → value)`. A vShard move copies one vShard's data, fences
//! writes to it and finally deletes it; with this layout each of those touches
//! exactly one inner map, and [`KvCommand::vshard`] tells the fence which
//! vShard a command writes.
//!
//! Commands and responses travel as codec frames ([`FrameKind::Rpc`]); the
//! snapshot is a codec frame ([`FrameKind::Snapshot`]) listing the pairs in
//! storage order (vShard, then key), so equal states give equal bytes.
//!
//! Limits: keys up to [`MAX_KEY_LEN`], values up to [`MAX_VALUE_LEN`], and the
//! whole store up to [`MAX_STORE_BYTES`] so that its snapshot always fits in
//! one frame. A command over a limit gets a [`KvResponse::Error`] and changes
//! nothing.

use crate::core::codec::{self, CodecError, FrameKind, Wire, FORMAT_VERSION, MAX_BODY_LEN};
use crate::core::ids::VShardId;
use crate::core::state_machine::{DataStateMachine, StateMachineError};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The longest key accepted.
pub const MAX_KEY_LEN: usize = 4096;
/// The longest value accepted.
pub const MAX_VALUE_LEN: usize = 1 << 20;
/// What one pair costs in the snapshot beyond its key and value: an upper
/// bound on its two postcard length prefixes (2 bytes for a length below
/// 2^14, so any key; 3 below 2^21, so any value).
const ENTRY_OVERHEAD: usize = 5;
/// Room in the snapshot body for the applied index and the pair count (two
/// varints of at most 10 bytes each).
const SNAPSHOT_OVERHEAD: usize = 20;
/// The most the store holds, counting each pair as its key and value lengths
/// plus 5 bytes. Chosen so that the snapshot always fits in one codec frame:
/// a write past it is refused, rather than a later snapshot being impossible.
pub const MAX_STORE_BYTES: usize = MAX_BODY_LEN - SNAPSHOT_OVERHEAD;

/// A write to the store.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KvCommand {
    /// Sets `key` to `value`; answers the previous value.
    Put {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        value: Vec<u8>,
    },
    /// Removes `key`; answers the previous value.
    Delete {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
    /// Compare-and-set, handy for linearizability tests: if the key's value is
    /// `expected` (`None`: absent), sets it to `new` (`None`: deletes it) and
    /// answers `Ok`; otherwise changes nothing and answers `CasFailed`.
    Cas {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        expected: Option<Vec<u8>>,
        #[serde(with = "serde_bytes")]
        new: Option<Vec<u8>>,
    },
}

impl Wire for KvCommand {
    const KIND: FrameKind = FrameKind::Rpc;
}

impl KvCommand {
    /// The key the command writes.
    pub fn key(&self) -> &[u8] {
        match self {
            KvCommand::Put { key, .. } | KvCommand::Delete { key } | KvCommand::Cas { key, .. } => {
                key
            }
        }
    }

    /// The vShard the command writes, so that it can be routed to the
    /// vShard's group and refused while the vShard is fenced.
    pub fn vshard(&self) -> VShardId {
        VShardId::for_key(self.key())
    }
}

/// A read of the store.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KvQuery {
    /// The value of `key`; answered with `KvResponse::Value`.
    Get {
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
    },
}

impl Wire for KvQuery {
    const KIND: FrameKind = FrameKind::Rpc;
}

impl KvQuery {
    /// The vShard the query reads.
    pub fn vshard(&self) -> VShardId {
        match self {
            KvQuery::Get { key } => VShardId::for_key(key),
        }
    }
}

/// The answer to a [`KvCommand`] or [`KvQuery`].
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum KvResponse {
    /// The compare-and-set succeeded.
    Ok,
    /// The value the key held before a `Put` or `Delete` (`None`: absent).
    Value(#[serde(with = "serde_bytes")] Option<Vec<u8>>),
    /// The compare-and-set found `current` instead of the expected value.
    CasFailed {
        #[serde(with = "serde_bytes")]
        current: Option<Vec<u8>>,
    },
    /// The command was refused (undecodable, over a limit, or a replay). It
    /// changed nothing, though it consumed its log index.
    Error(String),
}

impl Wire for KvResponse {
    const KIND: FrameKind = FrameKind::Rpc;
}

/// Why a command was refused; its message becomes the [`KvResponse::Error`].
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("command index {index} was already applied (applied index is {applied}); replays change nothing")]
    AlreadyApplied { index: u64, applied: u64 },
    #[error("command does not decode: {0}")]
    Undecodable(CodecError),
    #[error("key is {len} bytes, over the {MAX_KEY_LEN}-byte limit")]
    KeyTooLong { len: usize },
    #[error("value is {len} bytes, over the {MAX_VALUE_LEN}-byte limit")]
    ValueTooLong { len: usize },
    #[error("store is full: the write would need {needed} of {MAX_STORE_BYTES} bytes; delete keys first")]
    StoreFull { needed: usize },
}

fn check_key(key: &[u8]) -> Result<(), Refusal> {
    if key.len() > MAX_KEY_LEN {
        return Err(Refusal::KeyTooLong { len: key.len() });
    }
    Ok(())
}

fn check_value(value: &[u8]) -> Result<(), Refusal> {
    if value.len() > MAX_VALUE_LEN {
        return Err(Refusal::ValueTooLong { len: value.len() });
    }
    Ok(())
}

/// What a pair counts against [`MAX_STORE_BYTES`].
fn cost(key: &[u8], value: &[u8]) -> usize {
    key.len() + value.len() + ENTRY_OVERHEAD
}

/// Where a key sits in the store: the order of the snapshot's pairs.
fn storage_order(key: &[u8]) -> (VShardId, &[u8]) {
    (VShardId::for_key(key), key)
}

/// The snapshot as decoded: pairs in storage order.
#[derive(Serialize, Deserialize)]
struct KvSnapshot {
    applied_index: u64,
    #[serde(with = "byte_pairs")]
    entries: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Wire for KvSnapshot {
    const KIND: FrameKind = FrameKind::Snapshot;
}

/// The snapshot as encoded, borrowing the store instead of copying it. It
/// serializes to the same bytes as [`KvSnapshot`] (postcard writes a byte
/// slice and a byte vector alike).
#[derive(Serialize)]
struct KvSnapshotRef<'a> {
    applied_index: u64,
    #[serde(serialize_with = "byte_pairs::serialize")]
    entries: Vec<(&'a [u8], &'a [u8])>,
}

/// Key-value pairs as postcard byte strings. The bytes are the same as a
/// plain list of byte-vector pairs (postcard writes a length and the bytes
/// either way), but serde then moves each key and value in one piece
/// instead of one byte at a time: a snapshot of a large store encodes
/// several times faster.
mod byte_pairs {
    use serde::{Deserialize, Deserializer, Serializer};
    use serde_bytes::{ByteBuf, Bytes};

    /// Owned key-value pairs.
    pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

    pub fn serialize<S: Serializer, K: AsRef<[u8]>, V: AsRef<[u8]>>(
        pairs: &[(K, V)],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(
            pairs
                .iter()
                .map(|(k, v)| (Bytes::new(k.as_ref()), Bytes::new(v.as_ref()))),
        )
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Pairs, D::Error> {
        let pairs = Vec::<(ByteBuf, ByteBuf)>::deserialize(deserializer)?;
        Ok(pairs
            .into_iter()
            .map(|(k, v)| (k.into_vec(), v.into_vec()))
            .collect())
    }
}

/// The built-in ordered key-value state machine.
///
/// An `apply` at an index at or below the applied index changes nothing and
/// answers `Error("... already applied ...")`: Raft only re-delivers entries
/// when the engine replays the log after a restart, where the response is
/// dropped anyway, and an error makes any other double delivery visible
/// instead of passing it off as a second successful write.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvStateMachine {
    /// Never holds an empty inner map, so equal contents compare equal.
    data: BTreeMap<VShardId, BTreeMap<Vec<u8>, Vec<u8>>>,
    applied: u64,
    /// The sum of [`cost`] over all pairs, kept up to date to bound the store.
    used: usize,
}

impl KvStateMachine {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.data
            .get(&VShardId::for_key(key))?
            .get(key)
            .map(Vec::as_slice)
    }

    /// All pairs of one vShard, in key order.
    pub fn scan(&self, vshard: VShardId) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.data
            .get(&vshard)
            .into_iter()
            .flatten()
            .map(|(key, value)| (key.as_slice(), value.as_slice()))
    }

    /// The number of keys.
    pub fn len(&self) -> usize {
        self.data.values().map(BTreeMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Runs a decoded command; on `Err` nothing changed.
    fn execute(&mut self, command: KvCommand) -> Result<KvResponse, Refusal> {
        check_key(command.key())?;
        match command {
            KvCommand::Put { key, value } => {
                check_value(&value)?;
                self.insert(key, value).map(KvResponse::Value)
            }
            KvCommand::Delete { key } => Ok(KvResponse::Value(self.remove(&key))),
            KvCommand::Cas { key, expected, new } => {
                for value in expected.iter().chain(&new) {
                    check_value(value)?;
                }
                let current = self.get(&key);
                if current != expected.as_deref() {
                    return Ok(KvResponse::CasFailed {
                        current: current.map(<[u8]>::to_vec),
                    });
                }
                match new {
                    Some(value) => {
                        self.insert(key, value)?;
                    }
                    None => {
                        self.remove(&key);
                    }
                }
                Ok(KvResponse::Ok)
            }
        }
    }

    /// Sets a key, returning its previous value; refuses (changing nothing)
    /// if the store would outgrow [`MAX_STORE_BYTES`].
    fn insert(&mut self, key: Vec<u8>, value: Vec<u8>) -> Result<Option<Vec<u8>>, Refusal> {
        let freed = self.get(&key).map_or(0, |old| cost(&key, old));
        let needed = self.used - freed + cost(&key, &value);
        if needed > MAX_STORE_BYTES {
            return Err(Refusal::StoreFull { needed });
        }
        self.used = needed;
        Ok(self
            .data
            .entry(VShardId::for_key(&key))
            .or_default()
            .insert(key, value))
    }

    /// Removes a key, returning its value; drops its vShard's map once empty.
    fn remove(&mut self, key: &[u8]) -> Option<Vec<u8>> {
        let vshard = VShardId::for_key(key);
        let keys = self.data.get_mut(&vshard)?;
        let old = keys.remove(key)?;
        if keys.is_empty() {
            self.data.remove(&vshard);
        }
        self.used -= cost(key, &old);
        Some(old)
    }
}

impl DataStateMachine for KvStateMachine {
    fn apply(&mut self, index: u64, command: &[u8]) -> Vec<u8> {
        let response = if index <= self.applied {
            KvResponse::Error(
                Refusal::AlreadyApplied {
                    index,
                    applied: self.applied,
                }
                .to_string(),
            )
        } else {
            self.applied = index;
            codec::decode::<KvCommand>(command)
                .map_err(Refusal::Undecodable)
                .and_then(|command| self.execute(command))
                .unwrap_or_else(|refusal| KvResponse::Error(refusal.to_string()))
        };
        codec::encode(&response)
    }

    fn applied_index(&self) -> u64 {
        self.applied
    }

    fn query(&self, query: &[u8]) -> Vec<u8> {
        let response = match codec::decode::<KvQuery>(query) {
            Ok(KvQuery::Get { key }) => KvResponse::Value(self.get(&key).map(<[u8]>::to_vec)),
            Err(e) => KvResponse::Error(format!("query does not decode: {e}")),
        };
        codec::encode(&response)
    }

    fn snapshot(&self) -> Vec<u8> {
        let snapshot = KvSnapshotRef {
            applied_index: self.applied,
            entries: self
                .data
                .values()
                .flatten()
                .map(|(key, value)| (key.as_slice(), value.as_slice()))
                .collect(),
        };
        // Plain byte data always serializes (see `codec::encode_with_version`),
        // and MAX_STORE_BYTES keeps the body within the frame limit `seal` asserts.
        let body = postcard::to_allocvec(&snapshot).expect("byte pairs always serialize");
        codec::seal(FrameKind::Snapshot, FORMAT_VERSION, &body)
    }

    /// Checks every limit the store keeps, and that the pairs are in strict
    /// storage order: no duplicates, and a snapshot restores only from its
    /// canonical bytes, so restoring and snapshotting again gives them back.
    fn restore(&mut self, snapshot: &[u8]) -> Result<(), StateMachineError> {
        let decoded: KvSnapshot = codec::decode(snapshot)?;
        let invalid = |position: usize, why: String| {
            StateMachineError::Invalid(format!("pair {position}: {why}"))
        };
        let mut used = 0;
        for (position, (key, value)) in decoded.entries.iter().enumerate() {
            check_key(key)
                .and_then(|()| check_value(value))
                .map_err(|refusal| invalid(position, refusal.to_string()))?;
            used += cost(key, value);
        }
        for (position, pair) in decoded.entries.windows(2).enumerate() {
            if storage_order(&pair[0].0) >= storage_order(&pair[1].0) {
                return Err(invalid(
                    position + 1,
                    "key is a duplicate or out of order (pairs are sorted by vShard, then key)"
                        .into(),
                ));
            }
        }
        if used > MAX_STORE_BYTES {
            return Err(StateMachineError::Invalid(format!(
                "the pairs need {used} bytes, over the {MAX_STORE_BYTES}-byte store limit"
            )));
        }
        let mut data: BTreeMap<VShardId, BTreeMap<Vec<u8>, Vec<u8>>> = BTreeMap::new();
        for (key, value) in decoded.entries {
            data.entry(VShardId::for_key(&key))
                .or_default()
                .insert(key, value);
        }
        *self = KvStateMachine {
            data,
            applied: decoded.applied_index,
            used,
        };
        Ok(())
    }

    fn export_vshard(&self, vshard: VShardId) -> Vec<u8> {
        let export = KvVShardExportRef {
            vshard,
            entries: self.scan(vshard).collect(),
        };
        // As in `snapshot`: byte pairs always serialize, and one vShard is
        // part of a store that fits in a frame.
        let body = postcard::to_allocvec(&export).expect("byte pairs always serialize");
        codec::seal(FrameKind::Snapshot, FORMAT_VERSION, &body)
    }

    /// Checks that every pair belongs to `vshard`, keys are strictly
    /// ordered, limits hold and the store stays within its bound once the
    /// vShard's old pairs are replaced.
    fn import_vshard(&mut self, vshard: VShardId, export: &[u8]) -> Result<(), StateMachineError> {
        let decoded: KvVShardExport = codec::decode(export)?;
        if decoded.vshard != vshard {
            return Err(StateMachineError::Invalid(format!(
                "the export is of vShard {}, not {vshard}",
                decoded.vshard
            )));
        }
        let invalid = |position: usize, why: String| {
            StateMachineError::Invalid(format!("pair {position}: {why}"))
        };
        let mut added = 0;
        for (position, (key, value)) in decoded.entries.iter().enumerate() {
            check_key(key)
                .and_then(|()| check_value(value))
                .map_err(|refusal| invalid(position, refusal.to_string()))?;
            if VShardId::for_key(key) != vshard {
                return Err(invalid(
                    position,
                    format!("key belongs to vShard {}", VShardId::for_key(key)),
                ));
            }
            added += cost(key, value);
        }
        if let Some(position) = decoded.entries.windows(2).position(|w| w[0].0 >= w[1].0) {
            return Err(invalid(
                position + 1,
                "key is a duplicate or out of order".into(),
            ));
        }
        let removed: usize = self.scan(vshard).map(|(k, v)| cost(k, v)).sum();
        let needed = self.used - removed + added;
        if needed > MAX_STORE_BYTES {
            return Err(StateMachineError::Invalid(format!(
                "importing the vShard would need {needed} of {MAX_STORE_BYTES} bytes"
            )));
        }
        self.used = needed;
        let keys: BTreeMap<Vec<u8>, Vec<u8>> = decoded.entries.into_iter().collect();
        if keys.is_empty() {
            self.data.remove(&vshard);
        } else {
            self.data.insert(vshard, keys);
        }
        Ok(())
    }

    fn drop_vshard(&mut self, vshard: VShardId) {
        if let Some(keys) = self.data.remove(&vshard) {
            self.used -= keys.iter().map(|(k, v)| cost(k, v)).sum::<usize>();
        }
    }
}

/// One vShard's pairs, in key order: what a vShard move copies.
#[derive(Deserialize)]
struct KvVShardExport {
    vshard: VShardId,
    #[serde(deserialize_with = "byte_pairs::deserialize")]
    entries: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Wire for KvVShardExport {
    const KIND: FrameKind = FrameKind::Snapshot;
}

impl Serialize for KvVShardExport {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        KvVShardExportRef {
            vshard: self.vshard,
            entries: self
                .entries
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_slice()))
                .collect(),
        }
        .serialize(serializer)
    }
}

/// [`KvVShardExport`] as encoded, borrowing the store.
#[derive(Serialize)]
struct KvVShardExportRef<'a> {
    vshard: VShardId,
    #[serde(serialize_with = "byte_pairs::serialize")]
    entries: Vec<(&'a [u8], &'a [u8])>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;

    /// Keys of one vShard, found by search (the mapping is crc32c).
    fn keys_of(vshard: VShardId, count: usize) -> Vec<Vec<u8>> {
        (0u32..)
            .map(|i| format!("k{i}").into_bytes())
            .filter(|k| VShardId::for_key(k) == vshard)
            .take(count)
            .collect()
    }

    /// Pairs encoded as byte strings are the bytes plain pairs encode to,
    /// so snapshots and exports written before `byte_pairs` still decode.
    #[test]
    fn byte_pairs_encode_as_plain_pairs_do() {
        #[derive(Serialize)]
        struct Plain {
            applied_index: u64,
            entries: Vec<(Vec<u8>, Vec<u8>)>,
        }
        let entries = vec![(b"a".to_vec(), vec![7; 300]), (b"b".to_vec(), Vec::new())];
        let plain = postcard::to_allocvec(&Plain {
            applied_index: 9,
            entries: entries.clone(),
        })
        .unwrap();
        let borrowed = KvSnapshotRef {
            applied_index: 9,
            entries: entries
                .iter()
                .map(|(k, v)| (k.as_slice(), v.as_slice()))
                .collect(),
        };
        assert_eq!(postcard::to_allocvec(&borrowed).unwrap(), plain);
        let owned = KvSnapshot {
            applied_index: 9,
            entries: entries.clone(),
        };
        assert_eq!(postcard::to_allocvec(&owned).unwrap(), plain);
        let decoded: KvSnapshot = postcard::from_bytes(&plain).unwrap();
        assert_eq!(decoded.entries, entries);
    }

    #[test]
    fn a_vshard_exports_imports_and_drops_alone() {
        let vshard = VShardId::for_key(b"a");
        let mut source = KvStateMachine::new();
        let mut index = 0;
        for key in keys_of(vshard, 3)
            .iter()
            .chain(&keys_of(VShardId::for_key(b"zz"), 2))
        {
            index += 1;
            apply(&mut source, index, &put(key, b"v"));
        }
        let export = source.export_vshard(vshard);
        let mut target = KvStateMachine::new();
        apply(&mut target, 1, &put(&keys_of(vshard, 4)[3], b"stale"));
        target.import_vshard(vshard, &export).unwrap();
        assert_eq!(target.scan(vshard).count(), 3);
        assert_eq!(target.export_vshard(vshard), export);
        assert_eq!(target.len(), 3);
        // The wrong vShard, or garbage, is refused and changes nothing.
        let other = VShardId::for_key(b"zz");
        assert!(target.import_vshard(other, &export).is_err());
        assert!(target.import_vshard(vshard, b"garbage").is_err());
        assert_eq!(target.export_vshard(vshard), export);
        source.drop_vshard(vshard);
        assert_eq!(source.len(), 2);
        assert_eq!(source.scan(vshard).count(), 0);
        // The byte accounting stays exact: the store equals a fresh restore.
        let mut restored = KvStateMachine::new();
        restored.restore(&target.snapshot()).unwrap();
        assert_eq!(restored, target);
        // An empty export empties the vShard.
        target
            .import_vshard(vshard, &KvStateMachine::new().export_vshard(vshard))
            .unwrap();
        assert!(target.is_empty());
        assert_eq!(target.used, 0);
    }

    #[test]
    fn an_import_with_a_foreign_key_is_refused() {
        let vshard = VShardId::for_key(b"a");
        let foreign = KvVShardExportRef {
            vshard,
            entries: vec![(b"zz".as_slice(), b"v".as_slice())],
        };
        let bytes = codec::seal(
            FrameKind::Snapshot,
            FORMAT_VERSION,
            &postcard::to_allocvec(&foreign).unwrap(),
        );
        let mut sm = KvStateMachine::new();
        let error = sm.import_vshard(vshard, &bytes).unwrap_err();
        assert!(error.to_string().contains("belongs to vShard"));
        assert!(sm.is_empty());
    }

    fn put(key: &[u8], value: &[u8]) -> KvCommand {
        KvCommand::Put {
            key: key.to_vec(),
            value: value.to_vec(),
        }
    }

    fn delete(key: &[u8]) -> KvCommand {
        KvCommand::Delete { key: key.to_vec() }
    }

    fn cas(key: &[u8], expected: Option<&[u8]>, new: Option<&[u8]>) -> KvCommand {
        KvCommand::Cas {
            key: key.to_vec(),
            expected: expected.map(<[u8]>::to_vec),
            new: new.map(<[u8]>::to_vec),
        }
    }

    fn value(bytes: &[u8]) -> KvResponse {
        KvResponse::Value(Some(bytes.to_vec()))
    }

    /// Applies raw command bytes and decodes the response.
    fn apply_bytes(sm: &mut KvStateMachine, index: u64, command: &[u8]) -> KvResponse {
        codec::decode(&sm.apply(index, command)).expect("responses always decode")
    }

    fn apply(sm: &mut KvStateMachine, index: u64, command: &KvCommand) -> KvResponse {
        apply_bytes(sm, index, &codec::encode(command))
    }

    fn error_containing(response: &KvResponse, needle: &str) -> bool {
        matches!(response, KvResponse::Error(message) if message.contains(needle))
    }

    /// A machine holding a=1, b=2 at applied index 2.
    fn two_keys() -> KvStateMachine {
        let mut sm = KvStateMachine::new();
        apply(&mut sm, 1, &put(b"a", b"1"));
        apply(&mut sm, 2, &put(b"b", b"2"));
        sm
    }

    fn sort_pairs(pairs: &mut [(Vec<u8>, Vec<u8>)]) {
        pairs.sort_by(|x, y| storage_order(&x.0).cmp(&storage_order(&y.0)));
    }

    #[test]
    fn put_get_delete() {
        let mut sm = KvStateMachine::new();
        assert!(sm.is_empty());
        assert_eq!(sm.applied_index(), 0);
        assert_eq!(
            apply(&mut sm, 1, &put(b"k", b"v1")),
            KvResponse::Value(None)
        );
        assert_eq!(apply(&mut sm, 2, &put(b"k", b"v2")), value(b"v1"));
        assert_eq!(
            apply(&mut sm, 3, &put(b"", b"empty key")),
            KvResponse::Value(None)
        );
        assert_eq!(sm.get(b"k"), Some(&b"v2"[..]));
        assert_eq!(sm.get(b""), Some(&b"empty key"[..]));
        assert_eq!(sm.get(b"missing"), None);
        assert_eq!(sm.len(), 2);
        assert_eq!(apply(&mut sm, 4, &delete(b"k")), value(b"v2"));
        assert_eq!(apply(&mut sm, 5, &delete(b"k")), KvResponse::Value(None));
        assert_eq!(sm.get(b"k"), None);
        assert_eq!(apply(&mut sm, 6, &delete(b"")), value(b"empty key"));
        assert!(sm.is_empty());
        assert_eq!(sm.applied_index(), 6);
        // Deleting everything leaves no trace: the state equals a fresh one
        // apart from the applied index.
        assert_eq!(sm.data, BTreeMap::new());
        assert_eq!(sm.used, 0);
    }

    #[test]
    fn cas_semantics() {
        let mut sm = KvStateMachine::new();
        // Create only if absent.
        assert_eq!(
            apply(&mut sm, 1, &cas(b"k", None, Some(b"1"))),
            KvResponse::Ok
        );
        assert_eq!(
            apply(&mut sm, 2, &cas(b"k", None, Some(b"2"))),
            KvResponse::CasFailed {
                current: Some(b"1".to_vec())
            }
        );
        // Wrong expectation: nothing changes.
        assert_eq!(
            apply(&mut sm, 3, &cas(b"k", Some(b"0"), Some(b"2"))),
            KvResponse::CasFailed {
                current: Some(b"1".to_vec())
            }
        );
        assert_eq!(sm.get(b"k"), Some(&b"1"[..]));
        assert_eq!(
            apply(&mut sm, 4, &cas(b"k", Some(b"1"), Some(b"2"))),
            KvResponse::Ok
        );
        assert_eq!(sm.get(b"k"), Some(&b"2"[..]));
        // `new: None` deletes.
        assert_eq!(
            apply(&mut sm, 5, &cas(b"k", Some(b"2"), None)),
            KvResponse::Ok
        );
        assert_eq!(sm.get(b"k"), None);
        assert_eq!(
            apply(&mut sm, 6, &cas(b"k", Some(b"2"), None)),
            KvResponse::CasFailed { current: None }
        );
        // Absent stays absent.
        assert_eq!(apply(&mut sm, 7, &cas(b"k", None, None)), KvResponse::Ok);
        assert!(sm.is_empty());
        assert_eq!(sm.applied_index(), 7);
    }

    #[test]
    fn replays_are_ignored_with_an_error() {
        let mut sm = two_keys();
        let before = sm.clone();
        for index in [0, 1, 2] {
            let response = apply(&mut sm, index, &put(b"a", b"replayed"));
            assert!(
                error_containing(&response, "already applied"),
                "{response:?}"
            );
            assert_eq!(sm, before);
        }
        // Indices may skip (Raft no-ops are not passed on).
        assert_eq!(apply(&mut sm, 10, &put(b"a", b"3")), value(b"1"));
        assert_eq!(sm.applied_index(), 10);
        assert!(error_containing(
            &apply(&mut sm, 9, &delete(b"a")),
            "already applied"
        ));
        assert_eq!(sm.get(b"a"), Some(&b"3"[..]));
    }

    #[test]
    fn undecodable_commands_are_errors_that_still_apply() {
        let mut sm = two_keys();
        let wrong_kind = codec::seal(FrameKind::Row, FORMAT_VERSION, &[2, 1, b'a']);
        let mut flipped = codec::encode(&put(b"a", b"x"));
        let last = flipped.len() - 1;
        flipped[last] ^= 0x40;
        let bad_body = codec::seal(FrameKind::Rpc, FORMAT_VERSION, &[9, 9]);
        for (index, bytes) in (3..).zip([&b""[..], b"garbage", &wrong_kind, &flipped, &bad_body]) {
            let response = apply_bytes(&mut sm, index, bytes);
            assert!(
                error_containing(&response, "command does not decode"),
                "{response:?}"
            );
            assert_eq!(sm.applied_index(), index);
        }
        assert_eq!(sm.len(), 2);
        assert_eq!(sm.get(b"a"), Some(&b"1"[..]));
    }

    #[test]
    fn oversized_commands_are_errors_that_still_apply() {
        let mut sm = two_keys();
        let long_key = vec![b'k'; MAX_KEY_LEN + 1];
        let long_value = vec![0; MAX_VALUE_LEN + 1];
        let cases = [
            (put(&long_key, b"v"), "key is 4097 bytes"),
            (delete(&long_key), "key is 4097 bytes"),
            (cas(&long_key, None, Some(b"v")), "key is 4097 bytes"),
            (put(b"a", &long_value), "value is 1048577 bytes"),
            (cas(b"a", Some(&long_value), None), "value is 1048577 bytes"),
            (
                cas(b"a", Some(b"1"), Some(&long_value)),
                "value is 1048577 bytes",
            ),
        ];
        let before = sm.data.clone();
        for (index, (command, message)) in (3..).zip(cases) {
            let response = apply(&mut sm, index, &command);
            assert!(error_containing(&response, message), "{response:?}");
            assert_eq!(sm.applied_index(), index);
            assert_eq!(sm.data, before);
        }
        // Exactly at the limits is accepted.
        let max_key = vec![b'k'; MAX_KEY_LEN];
        let max_value = vec![1; MAX_VALUE_LEN];
        assert_eq!(
            apply(&mut sm, 20, &put(&max_key, &max_value)),
            KvResponse::Value(None)
        );
        assert_eq!(sm.get(&max_key), Some(&max_value[..]));
    }

    /// Fills the store with the largest pairs until it refuses one: the
    /// refusal changes nothing, and the full store still snapshots (the
    /// accounting really bounds the frame) and restores.
    #[test]
    fn a_full_store_refuses_writes_and_still_snapshots() {
        let mut sm = KvStateMachine::new();
        let big_value = vec![7; MAX_VALUE_LEN];
        let key = |n: u64| {
            let mut key = vec![0; MAX_KEY_LEN];
            key[..8].copy_from_slice(&n.to_be_bytes());
            key
        };
        let mut index = 0;
        let refused = loop {
            index += 1;
            let response = apply(&mut sm, index, &put(&key(index), &big_value));
            if response != KvResponse::Value(None) {
                break response;
            }
        };
        assert!(error_containing(&refused, "store is full"), "{refused:?}");
        let stored = sm.len();
        assert_eq!(stored, MAX_STORE_BYTES / cost(&key(0), &big_value));
        assert_eq!(sm.get(&key(index)), None);
        // Overwriting a pair with one no larger still fits.
        index += 1;
        assert_eq!(
            apply(&mut sm, index, &put(&key(1), b"small")),
            value(&big_value)
        );
        index += 1;
        assert_eq!(
            apply(&mut sm, index, &put(&key(1), &big_value)),
            value(b"small")
        );
        // A compare-and-set that would grow the store is refused too.
        index += 1;
        let response = apply(&mut sm, index, &cas(&key(index), None, Some(&big_value)));
        assert!(error_containing(&response, "store is full"), "{response:?}");
        assert_eq!(sm.len(), stored);

        let snapshot = sm.snapshot();
        assert!(snapshot.len() <= codec::HEADER_LEN + MAX_BODY_LEN);
        let mut restored = KvStateMachine::new();
        restored.restore(&snapshot).unwrap();
        assert_eq!(restored, sm);
    }

    #[test]
    fn restore_refuses_pairs_over_the_store_limit() {
        // 63 of the largest values and a filler that ends one byte over the
        // limit; the frame itself is within the codec's limit.
        let big = (MAX_VALUE_LEN, 63u64);
        let mut pairs: Vec<(Vec<u8>, Vec<u8>)> = (0..big.1)
            .map(|n| (n.to_be_bytes().to_vec(), vec![0; big.0]))
            .collect();
        let used: usize = pairs.iter().map(|(k, v)| cost(k, v)).sum();
        let filler_key = u64::MAX.to_be_bytes().to_vec();
        let filler_len = MAX_STORE_BYTES + 1 - used - cost(&filler_key, b"");
        pairs.push((filler_key, vec![0; filler_len]));
        sort_pairs(&mut pairs);
        let frame = codec::encode(&KvSnapshot {
            applied_index: 0,
            entries: pairs,
        });
        let mut sm = two_keys();
        let before = sm.clone();
        let err = sm.restore(&frame).unwrap_err();
        assert!(
            err.to_string()
                .contains("over the 67108844-byte store limit"),
            "{err}"
        );
        assert_eq!(sm, before);
    }

    #[test]
    fn snapshot_round_trips_into_any_machine() {
        let mut sm = two_keys();
        apply(&mut sm, 3, &put(b"c", b"3"));
        apply(&mut sm, 4, &delete(b"a"));
        let snapshot = sm.snapshot();
        // The borrowed encoding is the owned format's encoding.
        let decoded: KvSnapshot = codec::decode(&snapshot).unwrap();
        assert_eq!(decoded.applied_index, 4);
        assert_eq!(codec::encode(&decoded), snapshot);

        let mut other = KvStateMachine::new();
        apply(&mut other, 7, &put(b"zzz", b"other state"));
        other.restore(&snapshot).unwrap();
        assert_eq!(other, sm);
        assert_eq!(other.snapshot(), snapshot);
        assert_eq!(other.get(b"zzz"), None);
        assert_eq!(other.applied_index(), 4);
        // The restored machine keeps applying where the snapshot left off.
        assert!(error_containing(
            &apply(&mut other, 4, &put(b"x", b"")),
            "already applied"
        ));
        assert_eq!(apply(&mut other, 5, &put(b"b", b"5")), value(b"2"));

        let mut empty = two_keys();
        empty.restore(&KvStateMachine::new().snapshot()).unwrap();
        assert_eq!(empty, KvStateMachine::new());
    }

    #[test]
    fn restore_refuses_garbage_and_every_bit_flip() {
        let snapshot = two_keys().snapshot();
        let mut sm = two_keys();
        apply(&mut sm, 3, &put(b"c", b"3"));
        let before = sm.clone();
        for garbage in [&b""[..], b"garbage", &snapshot[..snapshot.len() - 1]] {
            assert!(matches!(
                sm.restore(garbage),
                Err(StateMachineError::Decode(_))
            ));
            assert_eq!(sm, before);
        }
        let wrong_kind = codec::encode(&put(b"a", b"1"));
        assert!(matches!(
            sm.restore(&wrong_kind),
            Err(StateMachineError::Decode(CodecError::BadMagic { .. }))
        ));
        for byte in 0..snapshot.len() {
            for bit in 0..8 {
                let mut flipped = snapshot.clone();
                flipped[byte] ^= 1 << bit;
                assert!(sm.restore(&flipped).is_err(), "byte {byte} bit {bit}");
                assert_eq!(sm, before);
            }
        }
    }

    #[test]
    fn restore_refuses_well_framed_invalid_pairs() {
        let pair = |key: &[u8], value: &[u8]| (key.to_vec(), value.to_vec());
        let mut ordered = vec![pair(b"a", b"1"), pair(b"b", b"2")];
        sort_pairs(&mut ordered);
        let mut reversed = ordered.clone();
        reversed.reverse();
        let cases = [
            (
                reversed,
                "pair 1: key is a duplicate or out of order (pairs are sorted by vShard, then key)",
            ),
            (
                vec![pair(b"a", b"1"), pair(b"a", b"1")],
                "pair 1: key is a duplicate",
            ),
            (
                vec![pair(&[b'k'; MAX_KEY_LEN + 1], b"")],
                "pair 0: key is 4097 bytes",
            ),
            (
                vec![pair(b"k", &vec![0; MAX_VALUE_LEN + 1])],
                "pair 0: value is 1048577 bytes",
            ),
        ];
        let mut sm = two_keys();
        let before = sm.clone();
        for (entries, message) in cases {
            let frame = codec::encode(&KvSnapshot {
                applied_index: 9,
                entries,
            });
            let err = sm.restore(&frame).unwrap_err();
            assert!(matches!(err, StateMachineError::Invalid(_)));
            assert!(err.to_string().contains(message), "{err}");
            assert_eq!(sm, before);
        }
        // Sorted by key alone is not storage order unless the vShards agree.
        let mut by_key = vec![pair(b"a", b""), pair(b"b", b"")];
        by_key.sort();
        if VShardId::for_key(b"a") > VShardId::for_key(b"b") {
            let frame = codec::encode(&KvSnapshot {
                applied_index: 1,
                entries: by_key,
            });
            assert!(sm.restore(&frame).is_err());
        }
        let frame = codec::encode(&KvSnapshot {
            applied_index: 9,
            entries: ordered,
        });
        sm.restore(&frame).unwrap();
        assert_eq!(sm.applied_index(), 9);
    }

    #[test]
    fn scan_returns_exactly_one_vshards_keys_in_order() {
        let mut sm = KvStateMachine::new();
        let keys: Vec<Vec<u8>> = (0u32..3000).map(|n| n.to_string().into_bytes()).collect();
        for (index, key) in (1..).zip(&keys) {
            apply(&mut sm, index, &put(key, &[key.len() as u8]));
        }
        let mut seen = 0;
        for vshard in VShardId::all() {
            let mut expected: Vec<&[u8]> = keys
                .iter()
                .filter(|key| VShardId::for_key(key) == vshard)
                .map(Vec::as_slice)
                .collect();
            expected.sort();
            let scanned: Vec<(&[u8], &[u8])> = sm.scan(vshard).collect();
            let scanned_keys: Vec<&[u8]> = scanned.iter().map(|(key, _)| *key).collect();
            assert_eq!(scanned_keys, expected, "{vshard}");
            for (key, value) in scanned {
                assert_eq!(value, [key.len() as u8]);
            }
            seen += expected.len();
        }
        assert_eq!(seen, keys.len());
        assert_eq!(sm.len(), keys.len());
    }

    #[test]
    fn commands_name_their_vshard() {
        let key = b"123456789";
        for command in [put(key, b""), delete(key), cas(key, None, None)] {
            assert_eq!(command.key(), key);
            assert_eq!(command.vshard(), VShardId::for_key(key));
        }
    }

    /// Keys and values from tiny alphabets, so that commands collide and
    /// compare-and-sets succeed often; now and then one over a limit.
    #[test]
    fn queries_read_the_store_and_refuse_garbage() {
        let mut kv = KvStateMachine::new();
        kv.apply(
            1,
            &codec::encode(&KvCommand::Put {
                key: b"k".to_vec(),
                value: b"v".to_vec(),
            }),
        );
        let get = |kv: &KvStateMachine, key: &[u8]| {
            codec::decode::<KvResponse>(
                &kv.query(&codec::encode(&KvQuery::Get { key: key.to_vec() })),
            )
            .unwrap()
        };
        assert_eq!(get(&kv, b"k"), KvResponse::Value(Some(b"v".to_vec())));
        assert_eq!(get(&kv, b"absent"), KvResponse::Value(None));
        assert!(matches!(
            codec::decode::<KvResponse>(&kv.query(b"garbage")).unwrap(),
            KvResponse::Error(_)
        ));
    }

    fn key() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            100 => vec(0u8..4, 0..3),
            1 => Just(vec![b'k'; MAX_KEY_LEN + 1]),
        ]
    }

    fn val() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            100 => vec(0u8..2, 0..3),
            1 => Just(vec![0; MAX_VALUE_LEN + 1]),
        ]
    }

    fn command() -> impl Strategy<Value = KvCommand> {
        prop_oneof![
            (key(), val()).prop_map(|(key, value)| KvCommand::Put { key, value }),
            key().prop_map(|key| KvCommand::Delete { key }),
            (
                key(),
                proptest::option::of(val()),
                proptest::option::of(val())
            )
                .prop_map(|(key, expected, new)| KvCommand::Cas { key, expected, new }),
        ]
    }

    fn response() -> impl Strategy<Value = KvResponse> {
        let bytes = || vec(any::<u8>(), 0..16);
        prop_oneof![
            Just(KvResponse::Ok),
            proptest::option::of(bytes()).prop_map(KvResponse::Value),
            proptest::option::of(bytes()).prop_map(|current| KvResponse::CasFailed { current }),
            ".{0,20}".prop_map(KvResponse::Error),
        ]
    }

    /// A log: each step advances the index by 0 (a replay), 1 or 2, and
    /// carries a command or, now and then, garbage (`None`).
    fn steps() -> impl Strategy<Value = Vec<(u64, Option<KvCommand>, Vec<u8>)>> {
        let step = (
            0u64..3,
            prop_oneof![10 => command().prop_map(Some), 1 => Just(None)],
            vec(any::<u8>(), 0..12),
        );
        vec(step, 0..40).prop_map(|steps| {
            let mut index = 0;
            steps
                .into_iter()
                .map(|(gap, command, garbage)| {
                    index += gap;
                    (index, command, garbage)
                })
                .collect()
        })
    }

    fn bytes_of(command: &Option<KvCommand>, garbage: &[u8]) -> Vec<u8> {
        command.as_ref().map_or(garbage.to_vec(), codec::encode)
    }

    /// The model's answer, or `None` where the machine must answer an error.
    fn model_apply(
        model: &mut BTreeMap<Vec<u8>, Vec<u8>>,
        command: &KvCommand,
    ) -> Option<KvResponse> {
        let fits = |v: &Option<Vec<u8>>| v.as_ref().is_none_or(|v| v.len() <= MAX_VALUE_LEN);
        if command.key().len() > MAX_KEY_LEN {
            return None;
        }
        match command.clone() {
            KvCommand::Put { key, value } => {
                (value.len() <= MAX_VALUE_LEN).then(|| KvResponse::Value(model.insert(key, value)))
            }
            KvCommand::Delete { key } => Some(KvResponse::Value(model.remove(&key))),
            KvCommand::Cas { key, expected, new } => {
                if !fits(&expected) || !fits(&new) {
                    return None;
                }
                let current = model.get(&key).cloned();
                if current != expected {
                    return Some(KvResponse::CasFailed { current });
                }
                match new {
                    Some(value) => model.insert(key, value),
                    None => model.remove(&key),
                };
                Some(KvResponse::Ok)
            }
        }
    }

    proptest! {
        #[test]
        fn commands_and_responses_round_trip(command in command(), response in response()) {
            prop_assert_eq!(codec::decode::<KvCommand>(&codec::encode(&command)), Ok(command));
            prop_assert_eq!(codec::decode::<KvResponse>(&codec::encode(&response)), Ok(response));
        }

        /// Restoring a snapshot midway and applying the rest gives the same
        /// responses and a byte-identical snapshot as applying everything.
        #[test]
        fn restore_midway_converges(steps in steps(), split in any::<prop::sample::Index>()) {
            let split = split.index(steps.len() + 1);
            let mut whole = KvStateMachine::new();
            let mut first = KvStateMachine::new();
            let mut whole_responses = Vec::new();
            for (position, (index, command, garbage)) in steps.iter().enumerate() {
                let bytes = bytes_of(command, garbage);
                whole_responses.push(whole.apply(*index, &bytes));
                if position < split {
                    first.apply(*index, &bytes);
                }
            }
            let mut second = KvStateMachine::new();
            second.apply(1, &codec::encode(&put(b"stale", b"state")));
            second.restore(&first.snapshot()).unwrap();
            for ((index, command, garbage), expected) in steps.iter().zip(&whole_responses).skip(split) {
                prop_assert_eq!(&second.apply(*index, &bytes_of(command, garbage)), expected);
            }
            prop_assert_eq!(whole.snapshot(), second.snapshot());
            prop_assert_eq!(whole, second);
        }

        /// Responses and contents match a plain ordered map.
        #[test]
        fn matches_a_model_map(steps in steps()) {
            let mut sm = KvStateMachine::new();
            let mut model = BTreeMap::new();
            let mut applied = 0;
            for (index, command, garbage) in &steps {
                let response = apply_bytes(&mut sm, *index, &bytes_of(command, garbage));
                let expected = if *index <= applied {
                    None
                } else {
                    applied = *index;
                    command.as_ref().and_then(|command| model_apply(&mut model, command))
                };
                match expected {
                    Some(expected) => prop_assert_eq!(response, expected),
                    None => prop_assert!(matches!(response, KvResponse::Error(_)), "{:?}", response),
                }
                prop_assert_eq!(sm.applied_index(), applied);
            }
            prop_assert_eq!(sm.len(), model.len());
            for (key, value) in &model {
                prop_assert_eq!(sm.get(key), Some(value.as_slice()));
            }
            let mut expected: Vec<(Vec<u8>, Vec<u8>)> = model.into_iter().collect();
            sort_pairs(&mut expected);
            let stored: Vec<(Vec<u8>, Vec<u8>)> = VShardId::all()
                .flat_map(|vshard| sm.scan(vshard).map(|(k, v)| (k.to_vec(), v.to_vec())).collect::<Vec<_>>())
                .collect();
            prop_assert_eq!(stored, expected);
        }
    }
}
