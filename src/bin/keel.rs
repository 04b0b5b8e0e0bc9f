//! `keel` — the operator command line (DESIGN.md §9); see `keel::cli`.

/// A loaded node allocates per message, per entry and per write from many
/// threads; mimalloc's thread-local free lists cost a fraction of glibc
/// malloc's consolidation there (docs/PERFORMANCE.md measures it).
#[cfg(not(madsim))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(not(madsim))]
fn main() -> std::process::ExitCode {
    keel::cli::main()
}

/// The CLI drives real processes and sockets, which the simulator build
/// does not have; `keel-sim` is the simulator's entry point.
#[cfg(madsim)]
fn main() -> std::process::ExitCode {
    eprintln!("error: the keel CLI is not built with --cfg madsim; use scripts/sim.sh");
    std::process::ExitCode::FAILURE
}
