//! The `applier` target: the metadata applier (`MetadataCache::apply`,
//! src/core/cache.rs) fed arbitrary committed `(index, bytes)` sequences,
//! as group 0's log could deliver them after corruption or a bug upstream.
//!
//! The applier must never panic; an undecodable entry, a corrupt
//! checkpoint or a log gap must fail-stop the group as an error value
//! (DESIGN.md §3.3); and apply must be deterministic (§3.1): caches fed
//! the same log end byte-identical whether the log arrives in one call, one
//! entry per call, or across a snapshot and restore.
//!
//! # Input
//!
//! A sequence of operations, each an opcode byte followed by its operand:
//!
//! - `0`: `u16 len | bytes` committed as they are (mostly undecodable: the
//!   fail-stop path);
//! - `1`: `u16 len | body` committed as a `MetadataRecord` frame around the
//!   body (a valid envelope, so postcard and the apply rules see the body);
//! - `2`: an empty entry (a Raft no-op);
//! - `3`: `i8 delta` added to the next index (a replay below the applied
//!   index is skipped; a jump ahead is a gap, which fail-stops);
//! - bit `0x80` of any opcode ends the current `apply` call after it.
//!
//! Other opcodes are skipped. Lengths are big-endian and clamped to what
//! remains.
//!
//! The entries' decoding is held to the allocation bound by the
//! `metadata_entry` target; here the state itself grows with the log, so
//! only libFuzzer's RSS and malloc limits apply.

use super::{check_message, Verdict};
use keel::core::cache::{Bootstrap, FailCause, FailStop, MetadataCache};
use keel::core::codec::{self, FrameKind, FORMAT_VERSION};
use keel::core::ids::NodeId;

/// Opcodes of the input format (see the module documentation).
pub const RAW: u8 = 0;
pub const RECORD: u8 = 1;
pub const NOOP: u8 = 2;
pub const SKIP: u8 = 3;
pub const FLUSH: u8 = 0x80;

/// The cluster every run starts from: one node, four data groups.
pub fn bootstrap() -> Bootstrap {
    Bootstrap {
        cluster_id: [0x4B; 16],
        node_id: NodeId::new(1).expect("1 is a valid node id"),
        addr: "127.0.0.1:7001".into(),
        data_groups: 4,
        replication_factor: 3,
        ca_cert_der: b"fuzz CA".to_vec(),
    }
}

/// The decoded input: committed entries, split into `apply` calls.
fn parse(data: &[u8]) -> Vec<Vec<(u64, Vec<u8>)>> {
    let mut calls = vec![Vec::new()];
    let mut next_index: u64 = 1;
    let mut rest = data;
    while let Some((&op, tail)) = rest.split_first() {
        rest = tail;
        let take = |rest: &mut &[u8]| -> Vec<u8> {
            let Some((len, tail)) = rest.split_first_chunk::<2>() else {
                *rest = &[];
                return Vec::new();
            };
            let len = usize::from(u16::from_be_bytes(*len)).min(tail.len());
            let (bytes, tail) = tail.split_at(len);
            *rest = tail;
            bytes.to_vec()
        };
        let entry = match op & !FLUSH {
            RAW => Some(take(&mut rest)),
            RECORD => Some(codec::seal(
                FrameKind::MetadataRecord,
                FORMAT_VERSION,
                &take(&mut rest),
            )),
            NOOP => Some(Vec::new()),
            SKIP => {
                if let Some((&delta, tail)) = rest.split_first() {
                    rest = tail;
                    next_index = next_index
                        .saturating_add_signed(i64::from(delta as i8))
                        .max(1);
                }
                None
            }
            _ => None,
        };
        if let Some(bytes) = entry {
            calls
                .last_mut()
                .expect("never empty")
                .push((next_index, bytes));
            next_index = next_index.saturating_add(1);
        }
        if op & FLUSH != 0 {
            calls.push(Vec::new());
        }
    }
    calls
}

/// The fuzz target body; see the module documentation.
pub fn applier(data: &[u8]) -> Verdict {
    let calls = parse(data);
    let entries: Vec<(u64, Vec<u8>)> = calls.iter().flatten().cloned().collect();
    let fresh = || MetadataCache::bootstrap(&bootstrap()).expect("the bootstrap is valid");

    // A: the log in the calls the input asks for.
    let mut a = fresh();
    let mut stopped = None;
    for call in &calls {
        let before = a.applied_index();
        let result = a.apply(call, &mut ());
        check_result(&a, before, &result);
        if let Err(stop) = result {
            stopped.get_or_insert(stop);
        }
    }

    // B: the same log, one entry per call.
    let mut b = fresh();
    for entry in &entries {
        let before = b.applied_index();
        let result = b.apply(std::slice::from_ref(entry), &mut ());
        check_result(&b, before, &result);
    }
    assert_eq!(
        a.failed(),
        b.failed(),
        "fail-stop depends on how the log was batched"
    );
    assert_eq!(
        a.snapshot(),
        b.snapshot(),
        "state depends on how the log was batched"
    );

    // C: half the log, a snapshot and restore (a restart), then the rest.
    let (first, second) = entries.split_at(entries.len() / 2);
    let mut c = fresh();
    if c.apply(first, &mut ()).is_ok() {
        let mut c = MetadataCache::restore(&c.snapshot())
            .unwrap_or_else(|e| panic!("a snapshot of an applied log does not restore: {e}"));
        let _ = c.apply(second, &mut ());
        assert_eq!(
            c.snapshot(),
            a.snapshot(),
            "a restart in the middle changed the state"
        );
        assert_eq!(
            c.failed(),
            a.failed(),
            "a restart in the middle changed the fail-stop"
        );
    }

    // Every cache's snapshot restores to the same bytes.
    let restored = MetadataCache::restore(&a.snapshot())
        .unwrap_or_else(|e| panic!("a snapshot of an applied log does not restore: {e}"));
    assert_eq!(restored.snapshot(), a.snapshot());

    // Accepted: some record got through the envelope and changed the state
    // (not merely the applied index) without stopping the group.
    let baseline = {
        let mut cache = fresh();
        let noops: Vec<(u64, Vec<u8>)> = (1..=a.applied_index()).map(|i| (i, Vec::new())).collect();
        cache.apply(&noops, &mut ()).expect("no-ops always apply");
        cache.snapshot()
    };
    if stopped.is_none() && a.snapshot() != baseline {
        Verdict::Accepted
    } else {
        Verdict::Rejected
    }
}

/// One `apply` call's result must agree with the cache it leaves behind.
fn check_result(cache: &MetadataCache, before: u64, result: &Result<u64, FailStop>) {
    match result {
        Ok(applied) => {
            assert_eq!(*applied, cache.applied_index());
            assert!(*applied >= before, "the applied index went backwards");
            assert!(cache.failed().is_none());
        }
        Err(stop) => {
            check_message(stop);
            assert_eq!(cache.failed(), Some(stop), "the fail-stop is not recorded");
            // The group stops at the entry before the failed one: nothing
            // at or after `stop.index` applied.
            let next = cache.applied_index() + 1;
            match &stop.cause {
                FailCause::LogGap { expected, got } => {
                    assert_eq!(*expected, next);
                    assert_eq!(*got, stop.index);
                    assert!(*got > next);
                }
                _ => assert_eq!(stop.index, next, "stopped elsewhere than at the failure"),
            }
            assert!(stop.group.is_metadata());
        }
    }
}
