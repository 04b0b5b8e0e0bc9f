//! Seeded group-0 workloads: the metadata traffic a cluster sees (DDL,
//! audited DDL, descriptor leases and drains, surrogate allocation, join
//! tokens), drawn from a `rand_chacha` generator so that one seed always
//! yields the same log.

use keel::core::entry::{MetadataEntry, MetadataRecord};
use keel::core::hlc::Hlc;
use keel::core::ids::{DescriptorId, NodeId};
use keel::core::lease::DescriptorLease;
use keel::core::token::JoinTokenTransitionKind;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Generates a metadata log: `len` records whose HLCs advance like a
/// leader's clock, over `nodes` nodes, a few descriptors and a few tokens.
pub struct MetadataWorkload {
    rng: ChaCha8Rng,
    nodes: u64,
    clock_ms: u64,
}

const DESCRIPTORS: u64 = 4;
const TOKENS: u64 = 4;

impl MetadataWorkload {
    pub fn new(seed: u64, nodes: u64) -> Self {
        MetadataWorkload {
            rng: ChaCha8Rng::seed_from_u64(seed),
            nodes: nodes.max(1),
            clock_ms: 1_000,
        }
    }

    fn below(&mut self, n: u64) -> u64 {
        self.rng.next_u64() % n
    }

    fn node(&mut self) -> NodeId {
        NodeId::new(1 + self.below(self.nodes)).expect("node ids start at 1")
    }

    fn descriptor(&mut self) -> DescriptorId {
        DescriptorId(self.below(DESCRIPTORS))
    }

    fn entry(&mut self) -> MetadataEntry {
        let at = Hlc::new(self.clock_ms, 0);
        match self.below(10) {
            0 => MetadataEntry::CatalogDdl {
                payload: self.rng.next_u64().to_be_bytes().to_vec(),
            },
            1 => MetadataEntry::CatalogDdlAudited {
                payload: self.rng.next_u32().to_be_bytes().to_vec(),
                auth_user_id: self.below(3),
                auth_user_name: format!("user{}", self.below(3)),
                sql_text: format!("ALTER TABLE t{} ADD COLUMN c", self.below(9)),
            },
            2 | 3 => MetadataEntry::DescriptorLeaseGrant(DescriptorLease {
                descriptor_id: self.descriptor(),
                version: self.below(5),
                node_id: self.node(),
                expires_at: Hlc::new(at.wall_ms + 200 + self.below(800), 0),
            }),
            4 => MetadataEntry::DescriptorLeaseRelease {
                node_id: self.node(),
                descriptor_ids: vec![self.descriptor()],
            },
            5 => MetadataEntry::DescriptorDrainStart {
                descriptor_id: self.descriptor(),
                up_to_version: self.below(5),
                expires_at: Hlc::new(at.wall_ms + self.below(600), 0),
            },
            6 => MetadataEntry::DescriptorDrainEnd {
                descriptor_id: self.descriptor(),
            },
            7 => MetadataEntry::SurrogateAlloc {
                hwm: self.rng.next_u32() >> 8,
            },
            _ => {
                let transition = match self.below(6) {
                    0 => JoinTokenTransitionKind::Register {
                        expires_at_ms: self.clock_ms + self.below(2_000),
                    },
                    1 => JoinTokenTransitionKind::Begin,
                    2 => JoinTokenTransitionKind::Consume,
                    3 => JoinTokenTransitionKind::Revert,
                    4 => JoinTokenTransitionKind::Expire,
                    _ => JoinTokenTransitionKind::Abort,
                };
                MetadataEntry::JoinTokenTransition {
                    token_hash: [self.below(TOKENS) as u8; 32],
                    transition,
                    ts_ms: self.clock_ms,
                }
            }
        }
    }

    /// The next record; the proposer's clock advances 0–49 ms per record.
    pub fn next_record(&mut self) -> MetadataRecord {
        self.clock_ms += self.below(50);
        let hlc = Hlc::new(self.clock_ms, 0);
        MetadataRecord::new(hlc, self.entry())
    }

    /// A log of `len` records at indexes 1..=len, encoded as group 0 stores them.
    pub fn log(&mut self, len: usize) -> Vec<(u64, Vec<u8>)> {
        (1..=len as u64)
            .map(|i| (i, self.next_record().encode()))
            .collect()
    }
}
