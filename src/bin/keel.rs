//! `keel` — the operator command line (DESIGN.md §9); see `keel::cli`.

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
