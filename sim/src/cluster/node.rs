//! The keel node machines: what each is made of, its disk faults, and the
//! body madsim runs on every (re)start.

use super::{lock, n, LostNodes, Registry};
use crate::clock::SkewedClock;
use crate::credentials::SIM_CA;
use crate::disk::{DiskFaults, SimDisk};
use crate::net::{self, NetFaults};
use crate::swarm::Swarm;
use keel::core::cache::Bootstrap;
use keel::core::ids::NodeId;
use keel::core::kv::KvStateMachine;
use keel::io::{database_builder, open_guarded, seeded_rng, NodeIo, OpenDbError};
use keel::node::migrate::{CrashPoint, MigrationConfig};
use keel::node::{start, MachineFactory, NodeConfig};
use rand_chacha::rand_core::RngCore;
use rand_chacha::ChaCha8Rng;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

pub(super) fn signed(rng: &mut ChaCha8Rng, bound: u64) -> i64 {
    if bound == 0 {
        0
    } else {
        (rng.next_u64() % (2 * bound + 1)) as i64 - bound as i64
    }
}

/// What a node's machine is made of, fixed across its restarts.
pub(super) struct NodeSetup {
    pub(super) id: NodeId,
    pub(super) swarm: Swarm,
    pub(super) disk: SimDisk,
    pub(super) registry: Registry,
    pub(super) net_faults: Arc<Mutex<NetFaults>>,
    /// The simulation's start, and the node's clock offset and drift.
    pub(super) clock: (Instant, i64, i64),
    pub(super) seed: u64,
    pub(super) crash_point: Option<CrashPoint>,
    pub(super) lost: LostNodes,
}

/// A node's disk faults: none but torn writes and latency outside the chaos
/// phase; during it, injected I/O errors, and bit rot on the swarm's one
/// rotting disk.
pub(super) fn disk_faults(swarm: &Swarm, id: NodeId, chaos: bool) -> DiskFaults {
    let rots = chaos && swarm.rotting_node == Some(id.get());
    DiskFaults {
        keep_unsynced: swarm.keep_unsynced,
        io_error_rate: if chaos { swarm.io_error_rate } else { 0.0 },
        sync_latency_ms: swarm.sync_latency_ms,
        bit_flip_rate: if rots { swarm.bit_flip_rate } else { 0.0 },
    }
}

/// The body of a keel node's machine; madsim runs it again on every restart.
pub(super) fn node_main(
    setup: NodeSetup,
) -> impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()>>> + Send + Sync + 'static {
    let NodeSetup {
        id,
        swarm,
        disk,
        registry,
        net_faults,
        clock,
        seed,
        crash_point,
        lost,
    } = setup;
    let incarnation = Arc::new(AtomicU64::new(0));
    move || {
        let swarm = swarm.clone();
        let crash_point = crash_point.clone();
        let disk = disk.clone();
        let registry = registry.clone();
        let net_faults = Arc::clone(&net_faults);
        let lost = Arc::clone(&lost);
        let run = incarnation.fetch_add(1, Ordering::SeqCst);
        Box::pin(async move {
            let run_seed = seed ^ run.wrapping_mul(0x9E37_79B9_7F4A_7C15);
            let (transport, inbound) = match net::bind(id, net_faults, run_seed).await {
                Ok(bound) => bound,
                Err(e) => return tracing::error!(%id, error = %e, "cannot bind"),
            };
            let db = match open_guarded(|| database_builder().create_with_backend(disk.backend())) {
                Ok(db) => db,
                Err(e) => {
                    if matches!(e, OpenDbError::Damaged(_)) {
                        lock(&lost).insert(id);
                    }
                    return tracing::error!(%id, error = %e, "cannot open the database");
                }
            };
            let io = NodeIo {
                transport,
                inbound,
                clock: Arc::new(SkewedClock::new(clock.0, clock.1, clock.2)),
                rng: seeded_rng(run_seed),
                db: Arc::new(db),
                storage_latency: Some(Arc::new(disk.clone())),
            };
            let mut config = NodeConfig::new(id);
            config.tick_interval = Duration::from_millis(swarm.tick_ms);
            config.request_timeout = Duration::from_secs(2);
            config.engine.compact_threshold = 200;
            // Joins abandoned under chaos come back within the run.
            config.join_dead_man = Duration::from_secs(2);
            // Moves time out, and ghost stubs expire, within a run.
            config.migration = MigrationConfig {
                poll: Duration::from_millis(50),
                phase_timeout: Duration::from_secs(8),
                ghost_ttl: Duration::from_secs(2),
                crash_point,
                ..MigrationConfig::default()
            };
            let bootstrap = (id == n(1)).then(|| Bootstrap {
                cluster_id: swarm
                    .seed
                    .to_be_bytes()
                    .repeat(2)
                    .try_into()
                    .expect("16 bytes"),
                node_id: id,
                addr: net::node_addr(id).to_string(),
                data_groups: swarm.data_groups,
                replication_factor: swarm.replication_factor,
                ca_cert_der: SIM_CA.to_vec(),
            });
            let factory: MachineFactory = Arc::new(|_| Box::new(KvStateMachine::new()));
            match start(config, io, bootstrap, factory, Box::new(())) {
                Ok((node, task)) => {
                    lock(&registry).insert(id, node);
                    let _ = task.await;
                    // The runtime stopped itself; its handle is dead.
                    lock(&registry).remove(&id);
                }
                Err(e) => tracing::error!(%id, error = %e, "node failed to start"),
            }
        })
    }
}
