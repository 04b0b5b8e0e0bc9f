//! Replays every checked-in fuzz input — the seed corpora under
//! `fuzz/corpus/<target>/` and the crashes found so far under
//! `fuzz/regressions/<target>/` — through the fuzz targets' own bodies
//! (`fuzz/targets/`, compiled in below), on the stable toolchain, in both
//! the normal and the simulator (`--cfg madsim`) build. A fuzzer find
//! becomes a permanent regression test by dropping its input into
//! `fuzz/regressions/<target>/`.
//!
//! The test refuses to pass vacuously: every target must have a non-empty
//! corpus, each corpus must hold inputs the target accepts and inputs it
//! refuses (so a format change that turns every seed into garbage fails
//! here), and the allocation tracker the targets rely on must be live.

// The module is also the library of the `keel-fuzz` crate, where the seed
// generator uses items (input-format constants, the disk's base image)
// that the replay does not; the simulator's disk it compiles in brings
// API the targets do not call either.
#[allow(dead_code)]
#[path = "../fuzz/targets/mod.rs"]
mod targets;

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use targets::{alloc, Verdict, TARGETS};

/// The targets measure allocations through the global allocator.
#[global_allocator]
static ALLOCATOR: alloc::Tracking = alloc::Tracking;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// The files of `dir`, sorted; empty if it does not exist.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

/// Runs `target` on every file; returns the verdicts, or the failures.
fn replay(target: fn(&[u8]) -> Verdict, files: &[PathBuf]) -> (Vec<Verdict>, Vec<String>) {
    let mut verdicts = Vec::new();
    let mut failures = Vec::new();
    for file in files {
        let data = fs::read(file).expect("readable fuzz input");
        match catch_unwind(AssertUnwindSafe(|| target(&data))) {
            Ok(verdict) => verdicts.push(verdict),
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .map(String::as_str)
                    .or_else(|| panic.downcast_ref::<&str>().copied())
                    .unwrap_or("(non-string panic)");
                failures.push(format!("{}: {message}", file.display()));
            }
        }
    }
    (verdicts, failures)
}

#[test]
fn allocation_tracking_is_live() {
    assert!(
        alloc::installed(),
        "the tracking allocator is not installed, so allocation bounds would pass vacuously"
    );
}

/// Every fuzz target file has a body here and a corpus, and vice versa, so
/// a target cannot be added without seeds or replay.
#[test]
fn every_target_has_a_corpus_and_a_body() {
    let mut on_disk: Vec<String> = fs::read_dir(fuzz_dir().join("fuzz_targets"))
        .expect("fuzz/fuzz_targets exists")
        .map(|entry| {
            let path = entry.expect("readable entry").path();
            path.file_stem()
                .expect("a file name")
                .to_string_lossy()
                .into_owned()
        })
        .collect();
    on_disk.sort();
    let mut known: Vec<String> = TARGETS.iter().map(|(name, _)| name.to_string()).collect();
    known.sort();
    assert_eq!(
        on_disk, known,
        "fuzz/fuzz_targets and targets::TARGETS disagree"
    );
    for (name, _) in TARGETS {
        let corpus = fuzz_dir().join("corpus").join(name);
        assert!(
            !inputs(&corpus).is_empty(),
            "the seed corpus {} is missing or empty; run `cargo run --example gen_corpus` in fuzz/",
            corpus.display()
        );
    }
}

#[test]
fn seed_corpora_replay_cleanly() {
    let mut failures = Vec::new();
    for (name, target) in TARGETS {
        let files = inputs(&fuzz_dir().join("corpus").join(name));
        let (verdicts, failed) = replay(*target, &files);
        failures.extend(failed);
        if files.is_empty() {
            failures.push(format!("{name}: the seed corpus is missing or empty"));
            continue;
        }
        if !verdicts.contains(&Verdict::Accepted) {
            failures.push(format!(
                "{name}: no seed gets past the first check any more; regenerate the corpus"
            ));
        }
        if !verdicts.contains(&Verdict::Rejected) {
            failures.push(format!("{name}: no seed exercises a refusal"));
        }
    }
    assert!(
        failures.is_empty(),
        "fuzz seeds failed:\n{}",
        failures.join("\n")
    );
}

#[test]
fn regressions_replay_cleanly() {
    let mut failures = Vec::new();
    for (name, target) in TARGETS {
        let files = inputs(&fuzz_dir().join("regressions").join(name));
        failures.extend(replay(*target, &files).1);
    }
    assert!(
        failures.is_empty(),
        "fuzz regressions failed:\n{}",
        failures.join("\n")
    );
}

/// The decoders' allocation bound assumes no wire collection holds elements
/// bigger than [`alloc::PER_INPUT_BYTE`] bytes, so that a length prefix can
/// reserve at most that much per byte left in the frame.
#[test]
fn bound_covers_every_element_type() {
    use keel::core::entry::MetadataEntry;
    use keel::core::hooks::AppliedEvent;
    use keel::core::migration::{Compensation, MigrationRow};
    use keel::node::rpc::{GroupView, NodeStatus, PeerProgress, RaftFrame};
    let sizes = [
        ("MetadataEntry", std::mem::size_of::<MetadataEntry>()),
        ("MigrationRow", std::mem::size_of::<MigrationRow>()),
        ("Compensation", std::mem::size_of::<Compensation>()),
        ("RaftFrame", std::mem::size_of::<RaftFrame>()),
        ("GroupView", std::mem::size_of::<GroupView>()),
        ("PeerProgress", std::mem::size_of::<PeerProgress>()),
        ("NodeStatus", std::mem::size_of::<NodeStatus>()),
        ("AppliedEvent", std::mem::size_of::<AppliedEvent>()),
        (
            "(Vec<u8>, Vec<u8>)",
            std::mem::size_of::<(Vec<u8>, Vec<u8>)>(),
        ),
    ];
    for (name, size) in sizes {
        assert!(
            size <= alloc::PER_INPUT_BYTE,
            "{name} is {size} bytes, over the {}-byte per-input-byte allocation bound",
            alloc::PER_INPUT_BYTE
        );
    }
}
