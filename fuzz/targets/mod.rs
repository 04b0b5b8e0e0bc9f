//! The bodies of keel's fuzz targets (issue 7, DESIGN.md §3.2 and §3.3).
//!
//! Every target takes untrusted bytes and asserts that keel never panics,
//! never allocates beyond what the input justifies, and fails with a clean
//! error value — plus a property of its own (round trips, determinism,
//! recovery). A violated assertion is a panic, which libFuzzer reports as a
//! crash.
//!
//! This file is the library of the `keel-fuzz` crate (each
//! `fuzz_targets/NAME.rs` calls one function) and is also compiled into the
//! root crate's `tests/fuzz_corpora.rs`, which replays every checked-in
//! corpus and regression input on the stable toolchain. Submodules are
//! named with explicit `#[path]`s so that both inclusions find them.

#[path = "alloc.rs"]
pub mod alloc;
#[path = "applier.rs"]
pub mod applier;
#[path = "envelope.rs"]
pub mod envelope;
#[path = "join_request.rs"]
pub mod join_request;
#[path = "metadata_entry.rs"]
pub mod metadata_entry;
#[path = "rpc_frame.rs"]
pub mod rpc_frame;
#[path = "sim_disk_recovery.rs"]
pub mod sim_disk_recovery;
#[path = "token.rs"]
pub mod token;
#[path = "wire.rs"]
mod wire;
// The simulator's disk, compiled from its own source (see
// `sim_disk_recovery`). Only part of its API is needed here.
#[path = "../../sim/src/disk.rs"]
#[allow(dead_code)]
mod sim_disk;

pub use applier::applier;
pub use envelope::envelope;
pub use join_request::join_request;
pub use metadata_entry::metadata_entry;
pub use rpc_frame::rpc_frame;
pub use sim_disk_recovery::sim_disk_recovery;
pub use token::token;

/// What one input did. The replay test requires every corpus to hold inputs
/// of both kinds, so a corpus that stopped reaching past the first check
/// (say, after a format change) fails the build instead of testing nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// The input got through the decoder or handler to the property checks.
    Accepted,
    /// The input was refused with a clean error.
    Rejected,
}

impl Verdict {
    /// `Accepted` if any part of the input was.
    pub fn or(self, other: Verdict) -> Verdict {
        if self == Verdict::Accepted || other == Verdict::Accepted {
            Verdict::Accepted
        } else {
            Verdict::Rejected
        }
    }

    fn of<T, E>(result: &Result<T, E>) -> Verdict {
        if result.is_ok() {
            Verdict::Accepted
        } else {
            Verdict::Rejected
        }
    }
}

/// A fuzz target body.
pub type Target = fn(&[u8]) -> Verdict;

/// Every target, by the name of its `fuzz_targets/` file and corpus
/// directory.
pub const TARGETS: &[(&str, Target)] = &[
    ("envelope", envelope),
    ("metadata_entry", metadata_entry),
    ("rpc_frame", rpc_frame),
    ("join_request", join_request),
    ("token", token),
    ("applier", applier),
    ("sim_disk_recovery", sim_disk_recovery),
];

/// An error must say something: an empty message is useless to an operator
/// and usually means a `Display` impl went wrong.
fn check_message(error: &dyn std::fmt::Display) {
    let message = error.to_string();
    assert!(!message.trim().is_empty(), "an error with an empty message");
}
