//! Descriptor leases and drains (DESIGN.md §3.1 `DescriptorLeaseGrant`,
//! `DescriptorLeaseRelease`, `DescriptorDrainStart`, `DescriptorDrainEnd`).
//!
//! A node caches a catalog descriptor at some version only while it holds a
//! lease on that version. A schema change that moves a descriptor to a new
//! version first starts a *drain* up to the old version: while the drain is
//! active no node can take a lease at or below it, so once the existing leases
//! expire or are released ([`LeaseTable::leases_at_or_below`] is empty), no
//! node can still be using an old version and the change may proceed.
//!
//! Time here is always *log time*: the HLC carried in the committed record,
//! made monotonic by the applier. Local clocks would make replicas disagree
//! about whether a lease or drain is still live. Something is live while its
//! `expires_at` is strictly after `now`.

use crate::core::hlc::Hlc;
use crate::core::ids::{DescriptorId, NodeId};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// A node's lease on one version of a descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DescriptorLease {
    pub descriptor_id: DescriptorId,
    pub version: u64,
    pub node_id: NodeId,
    pub expires_at: Hlc,
}

/// A drain on a descriptor: while active, no lease at `version <= up_to_version`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Drain {
    pub up_to_version: u64,
    pub expires_at: Hlc,
}

/// A refused lease or drain operation. The table is unchanged.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum LeaseError {
    #[error(
        "lease on {descriptor_id} version {version} for {node_id} expires at {expires_at}, \
         which is not after the log time {now}"
    )]
    AlreadyExpired {
        descriptor_id: DescriptorId,
        version: u64,
        node_id: NodeId,
        expires_at: Hlc,
        now: Hlc,
    },
    #[error(
        "lease on {descriptor_id} version {version} is refused: the descriptor is draining \
         versions up to {up_to_version} until {expires_at}"
    )]
    Draining {
        descriptor_id: DescriptorId,
        version: u64,
        up_to_version: u64,
        expires_at: Hlc,
    },
    #[error(
        "drain on {descriptor_id} expires at {expires_at}, which is not after the log time {now}"
    )]
    DrainAlreadyExpired {
        descriptor_id: DescriptorId,
        expires_at: Hlc,
        now: Hlc,
    },
    #[error("there is no drain on {descriptor_id} to end")]
    NoSuchDrain { descriptor_id: DescriptorId },
}

/// A lease's key: descriptor, version, holder.
type LeaseKey = (DescriptorId, u64, NodeId);

/// The replicated lease map and the drains, in deterministic (key) order.
///
/// An index of the leases by expiry makes pruning cost what it removes, not
/// the size of the table (every grant prunes first). The index is derived:
/// it is not encoded, so a snapshot holds exactly the leases and drains,
/// and decoding rebuilds it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredLeaseTable", into = "StoredLeaseTable")]
pub struct LeaseTable {
    leases: BTreeMap<LeaseKey, Hlc>,
    by_expiry: BTreeSet<(Hlc, LeaseKey)>,
    drains: BTreeMap<DescriptorId, Drain>,
}

/// What a [`LeaseTable`] encodes as.
#[derive(Serialize, Deserialize)]
struct StoredLeaseTable {
    leases: BTreeMap<LeaseKey, Hlc>,
    drains: BTreeMap<DescriptorId, Drain>,
}

impl From<StoredLeaseTable> for LeaseTable {
    fn from(stored: StoredLeaseTable) -> Self {
        let by_expiry = stored.leases.iter().map(|(&k, &at)| (at, k)).collect();
        LeaseTable {
            leases: stored.leases,
            by_expiry,
            drains: stored.drains,
        }
    }
}

impl From<LeaseTable> for StoredLeaseTable {
    fn from(table: LeaseTable) -> Self {
        StoredLeaseTable {
            leases: table.leases,
            drains: table.drains,
        }
    }
}

impl LeaseTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a lease. `now` is the log time of the entry (the proposal HLC
    /// carried in the committed record, made monotonic by the applier), never
    /// local time.
    ///
    /// Refuses a lease already expired at `now`, and a lease at
    /// `version <= up_to_version` while a drain on the descriptor is active.
    /// A re-grant of the same (descriptor, version, node) keeps the later of
    /// the two expiries, so a delayed, older renewal never shortens a lease.
    pub fn grant(&mut self, lease: &DescriptorLease, now: Hlc) -> Result<(), LeaseError> {
        if lease.expires_at <= now {
            return Err(LeaseError::AlreadyExpired {
                descriptor_id: lease.descriptor_id,
                version: lease.version,
                node_id: lease.node_id,
                expires_at: lease.expires_at,
                now,
            });
        }
        if let Some(drain) = self.active_drain(lease.descriptor_id, now) {
            if lease.version <= drain.up_to_version {
                return Err(LeaseError::Draining {
                    descriptor_id: lease.descriptor_id,
                    version: lease.version,
                    up_to_version: drain.up_to_version,
                    expires_at: drain.expires_at,
                });
            }
        }
        let key = (lease.descriptor_id, lease.version, lease.node_id);
        let expires_at = self.leases.entry(key).or_insert(lease.expires_at);
        self.by_expiry.remove(&(*expires_at, key));
        *expires_at = (*expires_at).max(lease.expires_at);
        self.by_expiry.insert((*expires_at, key));
        Ok(())
    }

    /// Drops all of `node_id`'s leases (every version) on these descriptors
    /// and returns how many were dropped. Releasing what is not held is not an
    /// error: a release may be retried or race with expiry.
    pub fn release(&mut self, node_id: NodeId, descriptor_ids: &[DescriptorId]) -> usize {
        let held: Vec<(LeaseKey, Hlc)> = self
            .leases
            .iter()
            .filter(|((descriptor_id, _, holder), _)| {
                *holder == node_id && descriptor_ids.contains(descriptor_id)
            })
            .map(|(&key, &at)| (key, at))
            .collect();
        for (key, at) in &held {
            self.leases.remove(key);
            self.by_expiry.remove(&(*at, *key));
        }
        held.len()
    }

    /// Starts a drain, replacing any drain already recorded on the
    /// descriptor (a schema change that restarts sets the new bound and
    /// deadline). Refused if `expires_at <= now`: such a drain would never
    /// be active.
    pub fn drain_start(
        &mut self,
        descriptor_id: DescriptorId,
        up_to_version: u64,
        expires_at: Hlc,
        now: Hlc,
    ) -> Result<(), LeaseError> {
        if expires_at <= now {
            return Err(LeaseError::DrainAlreadyExpired {
                descriptor_id,
                expires_at,
                now,
            });
        }
        self.drains.insert(
            descriptor_id,
            Drain {
                up_to_version,
                expires_at,
            },
        );
        Ok(())
    }

    /// Ends the drain recorded on the descriptor, active or expired but not
    /// yet pruned; `NoSuchDrain` if there is none.
    pub fn drain_end(&mut self, descriptor_id: DescriptorId) -> Result<(), LeaseError> {
        match self.drains.remove(&descriptor_id) {
            Some(_) => Ok(()),
            None => Err(LeaseError::NoSuchDrain { descriptor_id }),
        }
    }

    /// The drain on the descriptor if it is still active at `now`.
    pub fn active_drain(&self, descriptor_id: DescriptorId, now: Hlc) -> Option<&Drain> {
        self.drains
            .get(&descriptor_id)
            .filter(|drain| drain.expires_at > now)
    }

    /// Unexpired leases at `now` on versions `<= version`: what a schema
    /// change waits on before it may proceed. In (version, node) order.
    pub fn leases_at_or_below(
        &self,
        descriptor_id: DescriptorId,
        version: u64,
        now: Hlc,
    ) -> Vec<DescriptorLease> {
        // A scan rather than a range: the table holds one entry per node per
        // leased version, and `NodeId` offers no minimum to bound a range with.
        self.leases()
            .filter(|lease| {
                lease.descriptor_id == descriptor_id
                    && lease.version <= version
                    && lease.expires_at > now
            })
            .collect()
    }

    /// Removes leases and drains expired at `now` and returns how many were
    /// removed. The applier calls it with log time, so every replica prunes
    /// identically.
    pub fn prune_expired(&mut self, now: Hlc) -> usize {
        let mut pruned = 0;
        while let Some(&(at, key)) = self.by_expiry.first() {
            if at > now {
                break;
            }
            self.by_expiry.pop_first();
            self.leases.remove(&key);
            pruned += 1;
        }
        let drains = self.drains.len();
        self.drains.retain(|_, drain| drain.expires_at > now);
        pruned + drains - self.drains.len()
    }

    /// Every recorded lease (expired ones too, until pruned), in key order.
    pub fn leases(&self) -> impl Iterator<Item = DescriptorLease> + '_ {
        self.leases
            .iter()
            .map(
                |(&(descriptor_id, version, node_id), &expires_at)| DescriptorLease {
                    descriptor_id,
                    version,
                    node_id,
                    expires_at,
                },
            )
    }

    /// Every recorded drain (expired ones too, until pruned), by descriptor.
    pub fn drains(&self) -> impl Iterator<Item = (DescriptorId, &Drain)> {
        self.drains.iter().map(|(&id, drain)| (id, drain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const D: DescriptorId = DescriptorId(1);

    fn node(id: u64) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn t(wall_ms: u64) -> Hlc {
        Hlc::new(wall_ms, 0)
    }

    fn lease(
        descriptor_id: DescriptorId,
        version: u64,
        n: u64,
        expires_ms: u64,
    ) -> DescriptorLease {
        DescriptorLease {
            descriptor_id,
            version,
            node_id: node(n),
            expires_at: t(expires_ms),
        }
    }

    /// Runs a refused operation and checks the table did not change.
    fn refused<R: std::fmt::Debug>(
        table: &mut LeaseTable,
        op: impl FnOnce(&mut LeaseTable) -> Result<R, LeaseError>,
    ) -> LeaseError {
        let before = table.clone();
        let err = op(table).unwrap_err();
        assert_eq!(*table, before);
        err
    }

    #[test]
    fn grant_during_active_drain_is_refused() {
        let mut table = LeaseTable::new();
        table.drain_start(D, 3, t(100), t(10)).unwrap();
        for version in [0, 3] {
            assert_eq!(
                refused(&mut table, |tb| tb.grant(&lease(D, version, 1, 200), t(20))),
                LeaseError::Draining {
                    descriptor_id: D,
                    version,
                    up_to_version: 3,
                    expires_at: t(100)
                }
            );
        }
        // Other descriptors are unaffected.
        table
            .grant(&lease(DescriptorId(2), 1, 1, 200), t(20))
            .unwrap();
    }

    #[test]
    fn grant_above_drained_versions_is_allowed() {
        let mut table = LeaseTable::new();
        table.drain_start(D, 3, t(100), t(10)).unwrap();
        table.grant(&lease(D, 4, 1, 200), t(20)).unwrap();
        assert_eq!(table.leases().collect::<Vec<_>>(), [lease(D, 4, 1, 200)]);
    }

    #[test]
    fn grant_after_drain_expiry_or_end_is_allowed() {
        let mut table = LeaseTable::new();
        table.drain_start(D, 3, t(100), t(10)).unwrap();
        // The drain is no longer active exactly at its expiry.
        assert!(table.active_drain(D, t(99)).is_some());
        assert!(table.active_drain(D, t(100)).is_none());
        table.grant(&lease(D, 2, 1, 200), t(100)).unwrap();

        let mut table = LeaseTable::new();
        table.drain_start(D, 3, t(100), t(10)).unwrap();
        table.drain_end(D).unwrap();
        table.grant(&lease(D, 2, 1, 200), t(20)).unwrap();
        assert_eq!(table.drains().count(), 0);
    }

    #[test]
    fn expired_grant_is_refused() {
        let mut table = LeaseTable::new();
        for expires in [49, 50] {
            assert_eq!(
                refused(&mut table, |tb| tb.grant(&lease(D, 1, 1, expires), t(50))),
                LeaseError::AlreadyExpired {
                    descriptor_id: D,
                    version: 1,
                    node_id: node(1),
                    expires_at: t(expires),
                    now: t(50)
                }
            );
        }
        // The logical part counts: 50.1 is after 50.0.
        table
            .grant(
                &DescriptorLease {
                    expires_at: Hlc::new(50, 1),
                    ..lease(D, 1, 1, 0)
                },
                t(50),
            )
            .unwrap();
    }

    #[test]
    fn regrant_keeps_the_later_expiry() {
        let mut table = LeaseTable::new();
        table.grant(&lease(D, 1, 1, 100), t(10)).unwrap();
        table.grant(&lease(D, 1, 1, 80), t(20)).unwrap();
        assert_eq!(table.leases().collect::<Vec<_>>(), [lease(D, 1, 1, 100)]);
        table.grant(&lease(D, 1, 1, 150), t(30)).unwrap();
        assert_eq!(table.leases().collect::<Vec<_>>(), [lease(D, 1, 1, 150)]);
    }

    #[test]
    fn drain_start_already_expired_is_refused() {
        let mut table = LeaseTable::new();
        for expires in [9, 10] {
            assert_eq!(
                refused(&mut table, |tb| tb.drain_start(D, 1, t(expires), t(10))),
                LeaseError::DrainAlreadyExpired {
                    descriptor_id: D,
                    expires_at: t(expires),
                    now: t(10)
                }
            );
        }
    }

    #[test]
    fn drain_start_replaces_an_existing_drain() {
        let mut table = LeaseTable::new();
        table.drain_start(D, 3, t(100), t(10)).unwrap();
        table.drain_start(D, 5, t(60), t(20)).unwrap();
        let expected = Drain {
            up_to_version: 5,
            expires_at: t(60),
        };
        assert_eq!(table.drains().collect::<Vec<_>>(), [(D, &expected)]);
    }

    #[test]
    fn drain_end_without_drain_is_refused() {
        let mut table = LeaseTable::new();
        assert_eq!(
            refused(&mut table, |tb| tb.drain_end(D)),
            LeaseError::NoSuchDrain { descriptor_id: D }
        );
        table.drain_start(D, 1, t(100), t(10)).unwrap();
        table.drain_end(D).unwrap();
        assert_eq!(
            refused(&mut table, |tb| tb.drain_end(D)),
            LeaseError::NoSuchDrain { descriptor_id: D }
        );
    }

    #[test]
    fn release_drops_every_version_of_the_named_descriptors_for_that_node_only() {
        let d2 = DescriptorId(2);
        let d3 = DescriptorId(3);
        let mut table = LeaseTable::new();
        for l in [
            lease(D, 1, 1, 100),
            lease(D, 2, 1, 100),
            lease(D, 1, 2, 100),
            lease(d2, 1, 1, 100),
            lease(d3, 1, 1, 100),
        ] {
            table.grant(&l, t(10)).unwrap();
        }
        assert_eq!(table.release(node(1), &[D, d2, D]), 3);
        assert_eq!(
            table.leases().collect::<Vec<_>>(),
            [lease(D, 1, 2, 100), lease(d3, 1, 1, 100)]
        );
        // Idempotent.
        assert_eq!(table.release(node(1), &[D, d2]), 0);
        assert_eq!(table.release(node(9), &[d3]), 0);
        assert_eq!(table.leases().count(), 2);
    }

    #[test]
    fn leases_at_or_below_excludes_expired_higher_and_other_descriptors() {
        let mut table = LeaseTable::new();
        for l in [
            lease(D, 1, 1, 100),
            lease(D, 2, 2, 50),
            lease(D, 3, 1, 100),
            lease(DescriptorId(2), 1, 1, 100),
        ] {
            table.grant(&l, t(10)).unwrap();
        }
        assert_eq!(
            table.leases_at_or_below(D, 2, t(20)),
            [lease(D, 1, 1, 100), lease(D, 2, 2, 50)]
        );
        assert_eq!(table.leases_at_or_below(D, 2, t(50)), [lease(D, 1, 1, 100)]);
        assert_eq!(table.leases_at_or_below(D, 0, t(20)), []);
    }

    #[test]
    fn prune_removes_expired_leases_and_drains() {
        let mut table = LeaseTable::new();
        table.grant(&lease(D, 1, 1, 50), t(10)).unwrap();
        table.grant(&lease(D, 2, 1, 100), t(10)).unwrap();
        table.drain_start(DescriptorId(2), 1, t(50), t(10)).unwrap();
        table
            .drain_start(DescriptorId(3), 1, t(100), t(10))
            .unwrap();
        assert_eq!(table.prune_expired(t(49)), 0);
        assert_eq!(table.prune_expired(t(50)), 2);
        assert_eq!(table.leases().collect::<Vec<_>>(), [lease(D, 2, 1, 100)]);
        assert_eq!(
            table.drains().map(|(id, _)| id).collect::<Vec<_>>(),
            [DescriptorId(3)]
        );
    }

    #[derive(Clone, Debug)]
    enum Op {
        Grant {
            d: u64,
            version: u64,
            node: u64,
            ttl: i64,
            logical: u32,
        },
        Release {
            node: u64,
            ds: Vec<u64>,
        },
        DrainStart {
            d: u64,
            up_to: u64,
            ttl: i64,
        },
        DrainEnd {
            d: u64,
        },
        Prune,
        Advance {
            ms: u64,
            logical: u32,
        },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u64..3, 0u64..6, 1u64..4, -5i64..40, 0u32..3).prop_map(
                |(d, version, node, ttl, logical)| Op::Grant { d, version, node, ttl, logical }
            ),
            1 => (1u64..4, proptest::collection::vec(0u64..3, 0..3))
                .prop_map(|(node, ds)| Op::Release { node, ds }),
            2 => (0u64..3, 0u64..6, -5i64..40)
                .prop_map(|(d, up_to, ttl)| Op::DrainStart { d, up_to, ttl }),
            1 => (0u64..3).prop_map(|d| Op::DrainEnd { d }),
            1 => Just(Op::Prune),
            2 => (0u64..15, 0u32..3).prop_map(|(ms, logical)| Op::Advance { ms, logical }),
        ]
    }

    fn at(now: Hlc, ttl: i64, logical: u32) -> Hlc {
        Hlc::new(now.wall_ms.saturating_add_signed(ttl), logical)
    }

    proptest! {
        /// With monotonic log time, no lease at or below a drain's bound is
        /// ever granted while that drain is active (checked against a model
        /// of the drains kept outside the table), and a refused operation
        /// changes nothing.
        #[test]
        fn no_lease_is_granted_under_an_active_drain(
            ops in proptest::collection::vec(op(), 0..150)
        ) {
            let mut table = LeaseTable::new();
            let mut model: BTreeMap<u64, Drain> = BTreeMap::new();
            let mut now = Hlc::new(100, 0);
            for op in ops {
                let before = table.clone();
                let result = match op {
                    Op::Grant { d, version, node: n, ttl, logical } => {
                        let l = DescriptorLease {
                            descriptor_id: DescriptorId(d),
                            version,
                            node_id: node(n),
                            expires_at: at(now, ttl, logical),
                        };
                        let result = table.grant(&l, now);
                        if result.is_ok() {
                            if let Some(drain) = model.get(&d) {
                                prop_assert!(
                                    !(drain.expires_at > now && version <= drain.up_to_version),
                                    "{:?} granted under {:?} at {}", l, drain, now
                                );
                            }
                            prop_assert!(l.expires_at > now);
                            prop_assert!(table.leases_at_or_below(l.descriptor_id, version, now).iter()
                                .any(|x| x.node_id == l.node_id && x.version == version && x.expires_at >= l.expires_at));
                        }
                        result
                    }
                    Op::Release { node: n, ds } => {
                        let ids: Vec<_> = ds.into_iter().map(DescriptorId).collect();
                        table.release(node(n), &ids);
                        prop_assert!(!table.leases().any(|l| l.node_id == node(n) && ids.contains(&l.descriptor_id)));
                        Ok(())
                    }
                    Op::DrainStart { d, up_to, ttl } => {
                        let drain = Drain { up_to_version: up_to, expires_at: at(now, ttl, 0) };
                        let result = table.drain_start(DescriptorId(d), up_to, drain.expires_at, now);
                        if result.is_ok() {
                            model.insert(d, drain);
                        }
                        result
                    }
                    Op::DrainEnd { d } => {
                        let result = table.drain_end(DescriptorId(d));
                        prop_assert_eq!(result.is_ok(), model.remove(&d).is_some());
                        result
                    }
                    Op::Prune => {
                        table.prune_expired(now);
                        prop_assert!(table.leases().all(|l| l.expires_at > now));
                        prop_assert!(table.drains().all(|(_, d)| d.expires_at > now));
                        model.retain(|_, d| d.expires_at > now);
                        Ok(())
                    }
                    Op::Advance { ms, logical } => {
                        let next = Hlc::new(now.wall_ms + ms, logical);
                        now = now.max(next);
                        Ok(())
                    }
                };
                if result.is_err() {
                    prop_assert_eq!(&table, &before);
                }
                // The expiry index is exactly what the leases derive.
                let rebuilt = LeaseTable::from(StoredLeaseTable::from(table.clone()));
                prop_assert_eq!(&rebuilt, &table);
                for id in 0..3 {
                    let expected = model.get(&id).filter(|d| d.expires_at > now);
                    prop_assert_eq!(table.active_drain(DescriptorId(id), now), expected);
                }
            }
        }

        #[test]
        fn lease_and_drain_postcard_round_trip(
            d in any::<u64>(),
            version in any::<u64>(),
            n in 1u64..,
            wall_ms in any::<u64>(),
            logical in any::<u32>(),
        ) {
            let l = DescriptorLease {
                descriptor_id: DescriptorId(d),
                version,
                node_id: node(n),
                expires_at: Hlc::new(wall_ms, logical),
            };
            let bytes = postcard::to_allocvec(&l).unwrap();
            prop_assert_eq!(postcard::from_bytes::<DescriptorLease>(&bytes).unwrap(), l);
            let drain = Drain { up_to_version: version, expires_at: Hlc::new(wall_ms, logical) };
            let bytes = postcard::to_allocvec(&drain).unwrap();
            prop_assert_eq!(postcard::from_bytes::<Drain>(&bytes).unwrap(), drain);
        }
    }
}
