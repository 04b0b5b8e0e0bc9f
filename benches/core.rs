//! Throughput of keel's pure core (layer 1, `src/core/`): no I/O, no Raft,
//! one thread. Every group reports per-second rates through criterion's
//! `Throughput`.
//!
//! - `routing_lookup`: [`RoutingTable::lookup`] of a vShard and
//!   [`RoutingTable::route_key`] of a key (CRC32C of the key → vShard, then
//!   the lookup), on a bootstrap table of 8 and of 64 data groups over 5
//!   nodes. One iteration routes a batch of 1024 precomputed vShards (a fixed
//!   permutation of all of them) or 1024 precomputed 24-byte keys; the rate is
//!   lookups per second.
//! - `metadata_apply`: [`MetadataCache::apply`], the group-0 applier every
//!   replica runs, fed 1024 encoded records at consecutive log indexes per
//!   iteration, with hooks that discard the events (`()`). The figure
//!   includes what a replica does per committed entry: open the CRC32C
//!   envelope, decode the record, apply it. Cases: `CatalogDdl` with a
//!   128-byte payload, `SurrogateAlloc` with a rising high-watermark, and
//!   `DescriptorLeaseGrant` of distinct 30 s leases, both into an empty lease
//!   table and into one already holding 8192 live leases. Each iteration
//!   starts from a fresh clone of a cache that bootstrapped and then joined
//!   nodes 2–5 (`iter_batched`, the clone outside the timing), because
//!   applied indexes only move forward and leases accumulate. The rate is
//!   entries per second, and bytes of log per second.
//! - `codec_encode` / `codec_decode`: [`codec::encode`] and [`codec::decode`]
//!   of one [`MetadataRecord`] (the bytes proposed to group 0) holding a
//!   `CatalogDdl` of 128 bytes or 4 KiB, or a vShard move's
//!   `MigrationCheckpoint`; the rate is records per second and frame bytes
//!   (header included) per second.
//! - `kv_snapshot`: [`KvStateMachine`]'s `snapshot` (encode) and `restore`
//!   (decode and check) of a store of 10,000 pairs, 24-byte keys and
//!   128-byte values: what a data group does when it compacts its log or
//!   installs a snapshot. The rate is snapshot bytes per second.
//!
//! Run with `cargo bench --bench core`; add e.g. `-- routing_lookup` to run
//! one group.

/// The simulator build swaps the runtime for madsim; benchmarks measure the
/// real one only.
#[cfg(madsim)]
fn main() {}

#[cfg(not(madsim))]
criterion::criterion_main!(bench::benches);

#[cfg(not(madsim))]
mod bench {
    use criterion::{BatchSize, BenchmarkId, Criterion, Throughput};
    use keel::core::cache::{Bootstrap, MetadataCache};
    use keel::core::codec;
    use keel::core::entry::{MetadataEntry, MetadataRecord};
    use keel::core::hlc::Hlc;
    use keel::core::ids::{DescriptorId, GroupId, MigrationId, NodeId, VShardId, VSHARD_COUNT};
    use keel::core::kv::{KvCommand, KvStateMachine};
    use keel::core::lease::DescriptorLease;
    use keel::core::migration::{
        MigrationCheckpointPayload, MigrationPhaseTag, MigrationRow, VShardMovePayload,
    };
    use keel::core::routing::RoutingTable;
    use keel::core::state_machine::DataStateMachine;
    use keel::core::topology::TopologyChange;
    use std::hint::black_box;

    /// Lookups or entries per iteration.
    const BATCH: usize = 1024;
    /// Data-group counts of the routing tables.
    const DATA_GROUPS: [u64; 2] = [8, 64];
    /// Nodes of the cluster the routing tables and the cache describe.
    const NODES: u64 = 5;
    const REPLICATION_FACTOR: usize = 3;
    /// Log time (ms) of the first benchmarked entry; one ms between entries.
    const T0_MS: u64 = 20_000;
    /// How long a granted descriptor lease lives.
    const LEASE_MS: u64 = 30_000;
    /// Live leases already in the table for the `into_8192` grant case.
    const PRELOADED_LEASES: u64 = 8192;

    fn node(id: u64) -> NodeId {
        NodeId::new(id).expect("node ids are non-zero")
    }

    fn nodes() -> Vec<NodeId> {
        (1..=NODES).map(node).collect()
    }

    // ---- routing ----------------------------------------------------------

    /// Every vShard once, in a fixed scattered order (619 is odd, hence
    /// coprime with 1024, so `i * 619 mod 1024` is a permutation).
    fn vshards() -> Vec<VShardId> {
        assert_eq!(usize::from(VSHARD_COUNT), BATCH);
        (0..BATCH)
            .map(|i| {
                VShardId::new((i * 619 % BATCH) as u16).expect("below VSHARD_COUNT by construction")
            })
            .collect()
    }

    /// 24-byte keys shaped like a host's row keys.
    fn keys() -> Vec<Vec<u8>> {
        (0..BATCH as u64)
            .map(|i| format!("tbl/{:04}/pk/{:012}", i % 97, i * 7_919).into_bytes())
            .collect()
    }

    fn routing(c: &mut Criterion) {
        let vshards = vshards();
        let keys = keys();
        assert!(keys.iter().all(|k| k.len() == 24));
        let mut group = c.benchmark_group("routing_lookup");
        group.throughput(Throughput::Elements(BATCH as u64));
        for data_groups in DATA_GROUPS {
            let table = RoutingTable::bootstrap(data_groups, &nodes(), REPLICATION_FACTOR)
                .expect("a valid bootstrap");
            group.bench_with_input(
                BenchmarkId::new("lookup", data_groups),
                &table,
                |b, table| {
                    b.iter(|| {
                        let mut sum = 0u64;
                        for &v in black_box(&vshards) {
                            let route = table.lookup(v);
                            sum = sum.wrapping_add(route.group.0 ^ route.epoch);
                        }
                        sum
                    })
                },
            );
            group.bench_with_input(
                BenchmarkId::new("route_key", data_groups),
                &table,
                |b, table| {
                    b.iter(|| {
                        let mut sum = 0u64;
                        for key in black_box(&keys) {
                            let route = table.route_key(key);
                            sum = sum.wrapping_add(route.group.0 ^ route.epoch);
                        }
                        sum
                    })
                },
            );
        }
        group.finish();
    }

    // ---- metadata apply ---------------------------------------------------

    /// A bootstrapped 8-group cluster whose nodes 2–5 joined and became
    /// voters (the cache tests' `cluster_prefix`), at log time 1 s.
    fn base_cache() -> MetadataCache {
        let mut cache = MetadataCache::bootstrap(&Bootstrap {
            cluster_id: [7; 16],
            node_id: node(1),
            addr: "127.0.0.1:7001".into(),
            data_groups: 8,
            replication_factor: REPLICATION_FACTOR,
            ca_cert_der: vec![0x30; 600],
        })
        .expect("a valid bootstrap");
        let mut prefix = Vec::new();
        for id in 2..=NODES {
            prefix.push(MetadataEntry::TopologyChange(TopologyChange::Join {
                node_id: node(id),
                addr: format!("127.0.0.1:700{id}"),
            }));
            prefix.push(MetadataEntry::TopologyChange(TopologyChange::Activate {
                node_id: node(id),
            }));
            prefix.push(MetadataEntry::TopologyChange(
                TopologyChange::PromoteToVoter { node_id: node(id) },
            ));
        }
        let log = encode_log(&cache, 1_000, prefix);
        apply_checked(&mut cache, &log);
        cache
    }

    /// Encodes entries as records at consecutive indexes after the cache's
    /// applied index, at log times `t0_ms`, `t0_ms + 1`, ….
    fn encode_log(
        cache: &MetadataCache,
        t0_ms: u64,
        entries: impl IntoIterator<Item = MetadataEntry>,
    ) -> Vec<(u64, Vec<u8>)> {
        let first = cache.applied_index() + 1;
        (first..)
            .zip(entries)
            .map(|(index, entry)| {
                let hlc = Hlc::new(t0_ms + (index - first), 0);
                (index, MetadataRecord::new(hlc, entry).encode())
            })
            .collect()
    }

    /// Applies a log that must apply whole, with no entry rejected.
    fn apply_checked(cache: &mut MetadataCache, log: &[(u64, Vec<u8>)]) {
        let rejected = cache.state().rejected_total;
        let last = log.last().expect("a non-empty log").0;
        let applied = cache.apply(log, &mut ()).expect("the log applies");
        assert_eq!(applied, last);
        assert_eq!(
            cache.state().rejected_total,
            rejected,
            "benchmark entries must be valid: {:?}",
            cache.state().recent_rejections.back()
        );
    }

    fn lease_grant(i: u64, expires_ms: u64) -> MetadataEntry {
        // Distinct (descriptor, version, node) per i, so every grant inserts.
        MetadataEntry::DescriptorLeaseGrant(DescriptorLease {
            descriptor_id: DescriptorId(i / NODES),
            version: 1,
            node_id: node(i % NODES + 1),
            expires_at: Hlc::new(expires_ms, 0),
        })
    }

    fn ddl(len: usize, seed: u64) -> MetadataEntry {
        MetadataEntry::CatalogDdl {
            payload: (0..len).map(|i| (i as u64 ^ seed) as u8).collect(),
        }
    }

    fn metadata_apply(c: &mut Criterion) {
        let base = base_cache();
        // A table already holding live leases (expiring far after the
        // benchmarked entries), granted before them in log time.
        let mut preloaded = base.clone();
        let preload = encode_log(
            &preloaded,
            2_000,
            (0..PRELOADED_LEASES).map(|i| lease_grant(1_000_000 + i, 1_000_000_000)),
        );
        apply_checked(&mut preloaded, &preload);

        let batch = BATCH as u64;
        let cases: Vec<(&str, &MetadataCache, Vec<MetadataEntry>)> = vec![
            (
                "catalog_ddl_128",
                &base,
                (0..batch).map(|i| ddl(128, i)).collect(),
            ),
            (
                "surrogate_alloc",
                &base,
                (0..batch)
                    .map(|i| MetadataEntry::SurrogateAlloc {
                        hwm: 1_000 + 64 * i as u32,
                    })
                    .collect(),
            ),
            (
                "lease_grant_into_0",
                &base,
                (0..batch)
                    .map(|i| lease_grant(i, T0_MS + i + LEASE_MS))
                    .collect(),
            ),
            (
                "lease_grant_into_8192",
                &preloaded,
                (0..batch)
                    .map(|i| lease_grant(i, T0_MS + i + LEASE_MS))
                    .collect(),
            ),
        ];

        let mut group = c.benchmark_group("metadata_apply");
        for (name, start, entries) in cases {
            let log = encode_log(start, T0_MS, entries);
            // Once outside the timing: every entry must apply, none rejected.
            apply_checked(&mut start.clone(), &log);
            let bytes = log.iter().map(|(_, b)| b.len() as u64).sum();
            group.throughput(Throughput::ElementsAndBytes {
                elements: BATCH as u64,
                bytes,
            });
            group.bench_function(name, |b| {
                b.iter_batched(
                    || start.clone(),
                    |mut cache| {
                        let applied = cache.apply(black_box(&log), &mut ());
                        (applied, cache)
                    },
                    BatchSize::SmallInput,
                )
            });
        }
        group.finish();
    }

    // ---- codec ------------------------------------------------------------

    fn checkpoint_record() -> MetadataRecord {
        let payload = MigrationCheckpointPayload::VShard(VShardMovePayload {
            vshard_id: VShardId::new(517).expect("below VSHARD_COUNT"),
            source_group: GroupId(3),
            target_group: GroupId(6),
            copy_index: 1_204_331,
            tail_index: 1_204_902,
            fenced_at_ms: Some(1_795_000_000_123),
            write_pause_us: None,
        });
        let row = MigrationRow::new(
            MigrationId::from_random_bytes([0x5a; 16]),
            MigrationPhaseTag::Tail,
            1,
            &payload,
            1_795_000_000_000,
        );
        MetadataRecord::new(Hlc::new(1_795_000_000_001, 3), MetadataEntry::from(&row))
    }

    fn codec_records() -> Vec<(&'static str, MetadataRecord)> {
        let hlc = Hlc::new(1_795_000_000_001, 3);
        vec![
            ("catalog_ddl_128", MetadataRecord::new(hlc, ddl(128, 1))),
            ("catalog_ddl_4096", MetadataRecord::new(hlc, ddl(4096, 1))),
            ("migration_checkpoint", checkpoint_record()),
        ]
    }

    fn codec(c: &mut Criterion) {
        let records = codec_records();
        let mut encode = c.benchmark_group("codec_encode");
        for (name, record) in &records {
            let len = record.encode().len() as u64;
            encode.throughput(Throughput::ElementsAndBytes {
                elements: 1,
                bytes: len,
            });
            encode.bench_with_input(BenchmarkId::from_parameter(name), record, |b, record| {
                b.iter(|| codec::encode(black_box(record)))
            });
        }
        encode.finish();

        let mut decode = c.benchmark_group("codec_decode");
        for (name, record) in &records {
            let frame = record.encode();
            let decoded: MetadataRecord = codec::decode(&frame).expect("round trip");
            assert_eq!(&decoded, record);
            decode.throughput(Throughput::ElementsAndBytes {
                elements: 1,
                bytes: frame.len() as u64,
            });
            decode.bench_with_input(BenchmarkId::from_parameter(name), &frame, |b, frame| {
                b.iter(|| codec::decode::<MetadataRecord>(black_box(frame)).expect("a valid frame"))
            });
        }
        decode.finish();
    }

    fn kv_snapshot(c: &mut Criterion) {
        let mut store = KvStateMachine::new();
        for i in 0..10_000u64 {
            let put = KvCommand::Put {
                key: format!("user/{i:019}").into_bytes(),
                value: vec![i as u8; 128],
            };
            store.apply(i + 1, &codec::encode(&put));
        }
        let snapshot = store.snapshot();
        let mut group = c.benchmark_group("kv_snapshot");
        group.throughput(Throughput::Bytes(snapshot.len() as u64));
        group.bench_function("snapshot_10k", |b| b.iter(|| black_box(&store).snapshot()));
        group.bench_function("restore_10k", |b| {
            b.iter(|| {
                let mut restored = KvStateMachine::new();
                restored
                    .restore(black_box(&snapshot))
                    .expect("a valid snapshot");
                restored
            })
        });
        group.finish();
    }

    criterion::criterion_group!(benches, routing, metadata_apply, codec, kv_snapshot);
}
