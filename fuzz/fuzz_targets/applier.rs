//! cargo-fuzz entry point of the `applier` target; the body, shared with the
//! stable replay test `tests/fuzz_corpora.rs`, is `keel_fuzz::applier`.
#![no_main]

/// Measures allocations, so the target can check that decoding never
/// allocates more than the input justifies.
#[global_allocator]
static ALLOCATOR: keel_fuzz::alloc::Tracking = keel_fuzz::alloc::Tracking;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    keel_fuzz::applier(data);
});
