//! Decoders never allocate on the word of a length prefix: whatever a frame
//! claims, the largest single allocation made while decoding it is bounded
//! by the bytes the frame actually carries (times the in-memory size of one
//! decoded element), so a 100-byte frame cannot make a node reserve gigabytes.

use keel::core::cache::MetadataState;
use keel::core::codec::{self, FrameKind, Wire, FORMAT_VERSION};
use keel::core::entry::{MetadataEntry, MetadataRecord};
use keel::core::migration::MigrationRow;
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// Tracks the largest allocation made by this thread while `TRACKING` is set.
struct MaxAlloc;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: allocations during thread teardown must not panic.
    let _ = TRACKING.try_with(|tracking| {
        if tracking.get() {
            let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
        }
    });
}

unsafe impl GlobalAlloc for MaxAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: MaxAlloc = MaxAlloc;

/// The largest allocation made while decoding `frame` as `T`.
fn largest_allocation<T: Wire>(frame: &[u8]) -> usize {
    LARGEST.with(|l| l.set(0));
    TRACKING.with(|t| t.set(true));
    let result = codec::decode::<T>(frame);
    TRACKING.with(|t| t.set(false));
    drop(result);
    LARGEST.with(|l| l.get())
}

/// The bound: the frame's length times the size of the largest element type
/// a collection in these types holds.
fn bound(frame: &[u8]) -> usize {
    let element = std::mem::size_of::<MetadataEntry>()
        .max(std::mem::size_of::<MetadataState>())
        .max(std::mem::size_of::<MigrationRow>());
    frame.len() * element
}

/// A varint (LEB128) as postcard writes lengths.
fn varint(mut n: u64) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let byte = (n & 0x7F) as u8;
        n >>= 7;
        if n == 0 {
            out.push(byte);
            return out;
        }
        out.push(byte | 0x80);
    }
}

fn record_body(variant: u8, claimed_len: u64) -> Vec<u8> {
    let mut body = vec![0, 0, variant]; // Hlc { 0, 0 }, then the entry variant
    body.extend(varint(claimed_len));
    body.extend([7u8; 16]); // a few real bytes
    body
}

#[test]
fn length_prefixes_do_not_drive_allocation() {
    for claimed in [1u64 << 20, 1 << 31, u32::MAX as u64, u64::MAX >> 1] {
        // 0 = CatalogDdl { payload }, 2 = Batch { entries }.
        for variant in [0u8, 2] {
            let frame = codec::seal(
                FrameKind::MetadataRecord,
                FORMAT_VERSION,
                &record_body(variant, claimed),
            );
            let largest = largest_allocation::<MetadataRecord>(&frame);
            assert!(
                largest <= bound(&frame),
                "variant {variant} claiming {claimed} elements allocated {largest} bytes \
                 for a {}-byte frame",
                frame.len()
            );
        }
        let mut body = varint(claimed); // MigrationRow's id is a 16-byte uuid: its length prefix
        body.extend([1u8; 16]);
        let frame = codec::seal(FrameKind::Row, FORMAT_VERSION, &body);
        assert!(largest_allocation::<MigrationRow>(&frame) <= bound(&frame));
    }
}

#[test]
fn random_frames_stay_within_the_bound() {
    // A fixed-seed xorshift: deterministic inputs without a dependency.
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..20_000 {
        let len = (next() % 64) as usize;
        let body: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        for kind in [
            FrameKind::MetadataRecord,
            FrameKind::Snapshot,
            FrameKind::Row,
        ] {
            let frame = codec::seal(kind, FORMAT_VERSION, &body);
            let largest = match kind {
                FrameKind::MetadataRecord => largest_allocation::<MetadataRecord>(&frame),
                FrameKind::Snapshot => largest_allocation::<MetadataState>(&frame),
                _ => largest_allocation::<MigrationRow>(&frame),
            };
            assert!(
                largest <= bound(&frame),
                "{kind:?} body {body:?} allocated {largest}"
            );
        }
    }
}
