//! Identifiers and wire constants (DESIGN.md §2).
//!
//! Every identifier is a newtype so that a node id can never be passed where a
//! group id is expected. Identifiers with an invariant (non-zero node ids,
//! vShard ids below [`VSHARD_COUNT`]) validate it on construction *and* on
//! deserialization, so untrusted bytes can never produce an invalid id.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Number of vShards. A wire constant: changing it remaps every key.
pub const VSHARD_COUNT: u16 = 1024;

/// An identifier that failed validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("node id 0 is reserved; node ids start at 1")]
    ZeroNodeId,
    #[error("vShard id {0} is out of range; vShard ids are 0..{VSHARD_COUNT}")]
    VShardOutOfRange(u16),
}

/// A node of the cluster. Never zero (raft-rs reserves 0 for "no node").
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u64", into = "u64")]
pub struct NodeId(u64);

impl NodeId {
    pub fn new(id: u64) -> Result<Self, IdError> {
        if id == 0 {
            Err(IdError::ZeroNodeId)
        } else {
            Ok(NodeId(id))
        }
    }

    pub fn get(self) -> u64 {
        self.0
    }
}

impl TryFrom<u64> for NodeId {
    type Error = IdError;
    fn try_from(id: u64) -> Result<Self, IdError> {
        NodeId::new(id)
    }
}

impl From<NodeId> for u64 {
    fn from(id: NodeId) -> u64 {
        id.0
    }
}

impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "n{}", self.0)
    }
}

/// A Raft group. Group 0 is the metadata group; data groups start at 1.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GroupId(pub u64);

impl GroupId {
    /// The metadata group (DESIGN.md §3).
    pub const METADATA: GroupId = GroupId(0);

    pub fn is_metadata(self) -> bool {
        self == Self::METADATA
    }
}

impl fmt::Display for GroupId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "g{}", self.0)
    }
}

/// One of the [`VSHARD_COUNT`] vShards.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u16", into = "u16")]
pub struct VShardId(u16);

impl VShardId {
    pub fn new(id: u16) -> Result<Self, IdError> {
        if id < VSHARD_COUNT {
            Ok(VShardId(id))
        } else {
            Err(IdError::VShardOutOfRange(id))
        }
    }

    /// The vShard that owns `key`: `crc32c(key) % 1024`.
    ///
    /// This mapping is part of the wire contract. CRC32C (Castagnoli) is
    /// defined bit-for-bit by RFC 3720, so it is the same on every platform,
    /// endianness and keel version; it must never change, or every key moves.
    pub fn for_key(key: &[u8]) -> Self {
        VShardId((crc32c::crc32c(key) % u32::from(VSHARD_COUNT)) as u16)
    }

    pub fn get(self) -> u16 {
        self.0
    }

    /// Position in a `VSHARD_COUNT`-long array.
    pub fn index(self) -> usize {
        usize::from(self.0)
    }

    /// All vShards in order.
    pub fn all() -> impl Iterator<Item = VShardId> {
        (0..VSHARD_COUNT).map(VShardId)
    }
}

impl TryFrom<u16> for VShardId {
    type Error = IdError;
    fn try_from(id: u16) -> Result<Self, IdError> {
        VShardId::new(id)
    }
}

impl From<VShardId> for u16 {
    fn from(id: VShardId) -> u16 {
        id.0
    }
}

impl fmt::Display for VShardId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "v{}", self.0)
    }
}

/// A migration. A version-4 UUID built from bytes of the node's seeded rng,
/// which the caller passes in: the core never draws randomness itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MigrationId(uuid::Uuid);

impl MigrationId {
    pub fn from_random_bytes(bytes: [u8; 16]) -> Self {
        MigrationId(uuid::Builder::from_random_bytes(bytes).into_uuid())
    }

    /// Rebuilds an id from its 16 bytes (no version check: any 16 bytes name
    /// a row unambiguously).
    pub fn from_bytes(bytes: [u8; 16]) -> Self {
        MigrationId(uuid::Uuid::from_bytes(bytes))
    }
}

impl fmt::Display for MigrationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A host catalog descriptor (table, schema, ...) whose versions are leased.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DescriptorId(pub u64);

impl fmt::Display for DescriptorId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "d{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_id_zero_is_refused() {
        assert_eq!(NodeId::new(0), Err(IdError::ZeroNodeId));
        assert_eq!(NodeId::new(7).map(NodeId::get), Ok(7));
    }

    #[test]
    fn vshard_range_is_enforced() {
        assert!(VShardId::new(VSHARD_COUNT - 1).is_ok());
        assert_eq!(
            VShardId::new(VSHARD_COUNT),
            Err(IdError::VShardOutOfRange(VSHARD_COUNT))
        );
        assert_eq!(VShardId::all().count(), usize::from(VSHARD_COUNT));
    }

    /// Golden values: the key→vShard mapping is a wire contract, so these
    /// must never change. CRC32C("123456789") = 0xE3069283 (RFC 3720 check value).
    #[test]
    fn key_mapping_is_stable() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        assert_eq!(
            VShardId::for_key(b"123456789").get(),
            (0xE306_9283u32 % 1024) as u16
        );
        assert_eq!(VShardId::for_key(b"").get(), 0);
    }

    #[test]
    fn migration_ids_are_v4_uuids() {
        let id = MigrationId::from_random_bytes([0xAB; 16]);
        assert_eq!(id.0.get_version_num(), 4);
        assert_eq!(MigrationId::from_bytes(*id.0.as_bytes()), id);
    }
}
