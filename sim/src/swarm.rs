//! Swarm configuration: everything about a run that is not the code under
//! test, drawn from the seed (DESIGN.md §8). Different seeds explore
//! different cluster sizes, fault mixes and workloads, so a sweep covers
//! far more than one hand-written scenario; the same seed always draws the
//! same configuration, printed at the start of every run.

use keel::core::migration::MigrationPhaseTag;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

/// One run's configuration.
#[derive(Clone, Debug, Serialize)]
pub struct Swarm {
    pub seed: u64,
    /// Keel nodes in the cluster (3–7).
    pub nodes: u64,
    /// Data groups at bootstrap (1–8).
    pub data_groups: u64,
    /// Replicas per data group (1–3, at most the node count).
    pub replication_factor: usize,
    /// Clients issuing key-value operations.
    pub clients: u64,
    /// Distinct keys they use (few keys: more contention, sharper checks).
    pub keys: u64,
    /// Operations per client in the chaos phase.
    pub ops_per_client: u64,
    /// Share of operations that are reads, in percent.
    pub read_percent: u64,
    /// Share of operations that are compare-and-sets, in percent.
    pub cas_percent: u64,
    /// Metadata (group-0) operations in the chaos phase.
    pub metadata_ops: u64,
    /// Replica moves, vShard moves, rebalances and decommissions started
    /// during the chaos phase.
    pub migration_ops: u64,
    /// Data groups created, and empty ones dropped, during the chaos phase.
    pub group_ops: u64,
    /// Simulated milliseconds the chaos phase lasts at least.
    pub chaos_ms: u64,
    /// Mean simulated milliseconds between two injected faults (0: none).
    pub fault_interval_ms: u64,
    /// Which faults the run injects.
    pub kills: bool,
    pub partitions: bool,
    pub pauses: bool,
    /// Network faults during chaos.
    pub loss: f64,
    pub duplicate: f64,
    pub reorder_ms: u64,
    pub spike: f64,
    pub spike_ms: u64,
    /// Disk: share of unsynced sectors a crash keeps; I/O error rate; the
    /// most a sync takes (ms).
    pub keep_unsynced: f64,
    pub io_error_rate: f64,
    pub sync_latency_ms: u64,
    /// Per-node clock offset bound (ms) and drift bound (parts per million).
    pub clock_offset_ms: u64,
    pub clock_drift_ppm: u64,
    /// Raft tick (ms).
    pub tick_ms: u64,
    /// Kill the migration coordinator whenever a migration reaches this
    /// phase (a few times per run), so that across a sweep every phase is
    /// a crash point, however briefly a migration stays in it.
    pub crash_phase: Option<MigrationPhaseTag>,
    /// The one node whose disk may rot (at most one per run, so that every
    /// group keeps a quorum of sound replicas; only with three replicas and
    /// kills, since rot strikes at a crash), and the chance that each of its
    /// crashes flips a bit of its durable image.
    pub rotting_node: Option<u64>,
    pub bit_flip_rate: f64,
}

/// The phases a migration can be in, and so crash in: all but `Complete`.
const CRASH_PHASES: [MigrationPhaseTag; 10] = [
    MigrationPhaseTag::AddLearner,
    MigrationPhaseTag::CatchUp,
    MigrationPhaseTag::PromoteLearner,
    MigrationPhaseTag::LeadershipTransfer,
    MigrationPhaseTag::Cutover,
    MigrationPhaseTag::Copy,
    MigrationPhaseTag::Tail,
    MigrationPhaseTag::Fence,
    MigrationPhaseTag::FinalCatchUp,
    MigrationPhaseTag::Reassign,
];

fn pick(rng: &mut ChaCha8Rng, low: u64, high: u64) -> u64 {
    low + rng.next_u64() % (high - low + 1)
}

fn chance(rng: &mut ChaCha8Rng, percent: u64) -> bool {
    rng.next_u64() % 100 < percent
}

fn fraction(rng: &mut ChaCha8Rng, max_percent: u64) -> f64 {
    pick(rng, 0, max_percent) as f64 / 100.0
}

impl Swarm {
    pub fn from_seed(seed: u64) -> Self {
        // A stream of its own, so the swarm draws never shift other uses of the seed.
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5157_4152_4d00_0000);
        let nodes = pick(&mut rng, 3, 7);
        let data_groups = pick(&mut rng, 1, 8);
        let replication_factor = pick(&mut rng, 1, 3).min(nodes) as usize;
        let clients = pick(&mut rng, 2, 6);
        let keys = pick(&mut rng, 2, 12);
        let ops_per_client = pick(&mut rng, 10, 40);
        let read_percent = pick(&mut rng, 10, 50);
        let cas_percent = pick(&mut rng, 0, 30);
        let metadata_ops = pick(&mut rng, 0, 30);
        let chaos_ms = pick(&mut rng, 2_000, 8_000);
        let faulty = chance(&mut rng, 85);
        let fault_interval_ms = if faulty {
            pick(&mut rng, 200, 1_500)
        } else {
            0
        };
        let kills = faulty && chance(&mut rng, 60);
        let partitions = faulty && chance(&mut rng, 60);
        let pauses = faulty && chance(&mut rng, 30);
        let lossy = chance(&mut rng, 50);
        let mut swarm = Swarm {
            seed,
            nodes,
            data_groups,
            replication_factor,
            clients,
            keys,
            ops_per_client,
            read_percent,
            cas_percent,
            metadata_ops,
            chaos_ms,
            fault_interval_ms,
            kills,
            partitions,
            pauses,
            loss: if lossy { fraction(&mut rng, 10) } else { 0.0 },
            duplicate: if lossy { fraction(&mut rng, 5) } else { 0.0 },
            reorder_ms: if lossy { pick(&mut rng, 0, 20) } else { 0 },
            spike: if lossy { fraction(&mut rng, 3) } else { 0.0 },
            spike_ms: pick(&mut rng, 50, 500),
            keep_unsynced: fraction(&mut rng, 100),
            io_error_rate: if chance(&mut rng, 20) {
                pick(&mut rng, 1, 5) as f64 / 1_000.0
            } else {
                0.0
            },
            sync_latency_ms: if chance(&mut rng, 50) {
                pick(&mut rng, 1, 20)
            } else {
                0
            },
            clock_offset_ms: pick(&mut rng, 0, 200),
            clock_drift_ppm: pick(&mut rng, 0, 200),
            tick_ms: pick(&mut rng, 20, 100),
            // Drawn last, so the draws before keep their meaning.
            migration_ops: if chance(&mut rng, 80) {
                pick(&mut rng, 1, 12)
            } else {
                0
            },
            crash_phase: None,
            rotting_node: None,
            bit_flip_rate: 0.0,
            group_ops: 0,
        };
        // Drawn after everything else, for the same reason.
        if swarm.fault_interval_ms > 0 && swarm.migration_ops > 0 {
            let phase = pick(&mut rng, 0, CRASH_PHASES.len() as u64 - 1);
            swarm.crash_phase = Some(CRASH_PHASES[phase as usize]);
        }
        if swarm.kills && swarm.replication_factor >= 3 && chance(&mut rng, 80) {
            swarm.rotting_node = Some(pick(&mut rng, 1, swarm.nodes));
            swarm.bit_flip_rate = pick(&mut rng, 50, 100) as f64 / 100.0;
        }
        if chance(&mut rng, 40) {
            swarm.group_ops = pick(&mut rng, 1, 4);
        }
        swarm
    }

    /// One line for the start of a run.
    pub fn describe(&self) -> String {
        serde_json::to_string(self).expect("plain data serializes")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_draws_the_same_swarm() {
        assert_eq!(
            Swarm::from_seed(7).describe(),
            Swarm::from_seed(7).describe()
        );
    }

    #[test]
    fn swarms_stay_in_their_bounds_and_vary() {
        let mut sizes = std::collections::BTreeSet::new();
        for seed in 0..500 {
            let s = Swarm::from_seed(seed);
            assert!((3..=7).contains(&s.nodes));
            assert!((1..=8).contains(&s.data_groups));
            assert!(s.replication_factor >= 1 && s.replication_factor as u64 <= s.nodes);
            assert!((0.0..=1.0).contains(&s.keep_unsynced));
            sizes.insert(s.nodes);
        }
        assert_eq!(sizes.len(), 5, "every cluster size is drawn");
        let phases: std::collections::BTreeSet<_> = (0..500)
            .filter_map(|seed| Swarm::from_seed(seed).crash_phase)
            .collect();
        assert_eq!(
            phases.len(),
            CRASH_PHASES.len(),
            "every phase is a crash point"
        );
        let rotting: Vec<Swarm> = (0..500)
            .map(Swarm::from_seed)
            .filter(|s| s.rotting_node.is_some())
            .collect();
        assert!(rotting.len() > 20, "disks rot in some seeds");
        for s in rotting {
            assert!(s.kills && s.replication_factor >= 3 && s.bit_flip_rate > 0.0);
            assert!((1..=s.nodes).contains(&s.rotting_node.unwrap_or(0)));
        }
    }
}
