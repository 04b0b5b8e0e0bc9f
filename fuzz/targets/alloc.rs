//! Allocation accounting for the "never allocates beyond the input" rule
//! (DESIGN.md §3.2): a decoder must not reserve memory on the word of a
//! length prefix, so the largest single allocation made while decoding a
//! frame is bounded by the bytes the frame actually carries.
//!
//! Every binary that runs the targets (each fuzzer, and the replay test)
//! installs [`Tracking`] as its global allocator; [`largest_allocation`]
//! then reports the biggest request made by the current thread inside a
//! closure. [`installed`] lets the replay test prove the measurement is
//! live rather than silently reporting zero.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

/// The system allocator, noting the size of every request made while the
/// current thread is inside [`largest_allocation`].
pub struct Tracking;

thread_local! {
    static TRACKING: Cell<bool> = const { Cell::new(false) };
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: an allocation during thread teardown must not panic.
    let _ = TRACKING.try_with(|tracking| {
        if tracking.get() {
            let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
        }
    });
}

// SAFETY: every call is forwarded unchanged to `System`; the bookkeeping
// only touches const-initialised thread-locals, which never allocate.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

/// Runs `f` and returns its result with the largest single allocation it
/// made on this thread (0 if [`Tracking`] is not the global allocator).
pub fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let outer = TRACKING.with(|t| t.replace(true));
    let before = LARGEST.with(|l| l.replace(0));
    let result = f();
    let largest = LARGEST.with(|l| l.get());
    TRACKING.with(|t| t.set(outer));
    // A nested measurement must not hide its allocations from the outer one.
    LARGEST.with(|l| l.set(before.max(largest)));
    (result, largest)
}

/// Whether [`Tracking`] is this binary's global allocator.
pub fn installed() -> bool {
    let (_, largest) = largest_allocation(|| std::hint::black_box(vec![0u8; 4096]));
    largest >= 4096
}

/// Allocations every decode may make whatever its input: error messages,
/// one B-tree node of a map, and the like.
pub const FLOOR: usize = 16 * 1024;

/// The in-memory size of the largest element any wire collection holds
/// (measured by `bound_covers_every_element_type` in the replay test):
/// a length prefix can make a decoder reserve at most this much per byte
/// that remains in the frame.
pub const PER_INPUT_BYTE: usize = 256;

/// The most a decode of `input_len` bytes may allocate at once.
pub fn bound(input_len: usize) -> usize {
    input_len.saturating_mul(PER_INPUT_BYTE).max(FLOOR)
}

/// Decodes with `f`, failing (a crash, for the fuzzer) if any single
/// allocation exceeded [`bound`] of `input_len`.
pub fn bounded<R>(what: &str, input_len: usize, f: impl FnOnce() -> R) -> R {
    let (result, largest) = largest_allocation(f);
    assert!(
        largest <= bound(input_len),
        "{what}: decoding {input_len} bytes allocated {largest} bytes at once (bound {})",
        bound(input_len)
    );
    result
}
