//! `keel-sim` — runs simulations (DESIGN.md §8). Use it through
//! `scripts/sim.sh`, which builds it with `--cfg madsim`:
//!
//! ```text
//! keel-sim run --seed N [--history FILE] [--trace]   one seed; the trace hash is the last line
//! keel-sim replay --seed N --trace                    the same, printing the full event trace
//! keel-sim sweep --seeds A..B [--jobs J]              each seed in a fresh process
//! keel-sim check-determinism --seed N                 two processes, same hash or a diff
//! ```

use clap::{Parser, Subcommand};
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "keel-sim", about = "Deterministic simulation of keel clusters")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one seed; print the swarm first and the trace hash last.
    Run {
        #[arg(long)]
        seed: u64,
        /// Write the client history as JSON lines to this file.
        #[arg(long)]
        history: Option<std::path::PathBuf>,
        /// Print the fault and phase trace.
        #[arg(long)]
        trace: bool,
        /// Plant a deliberate bug (skip-fsync, forget-vote, stale-reads) to
        /// check that the checkers catch it.
        #[arg(long)]
        plant: Option<String>,
    },
    /// Re-run one seed and print its full trace.
    Replay {
        #[arg(long)]
        seed: u64,
        #[arg(long)]
        trace: bool,
        #[arg(long)]
        plant: Option<String>,
    },
    /// Run a range of seeds, one fresh process each.
    Sweep {
        /// A..B (B exclusive).
        #[arg(long)]
        seeds: String,
        #[arg(long, default_value_t = 2)]
        jobs: usize,
        /// Plant a deliberate bug in every seed.
        #[arg(long)]
        plant: Option<String>,
        /// Stop at the first failing seed.
        #[arg(long)]
        first_failure: bool,
    },
    /// Run one seed twice in two processes and compare the trace hashes.
    CheckDeterminism {
        #[arg(long)]
        seed: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match keel_sim::runner::main(cli.command.into()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

impl From<Command> for keel_sim::runner::Command {
    fn from(command: Command) -> Self {
        use keel_sim::runner::Command as R;
        match command {
            Command::Run {
                seed,
                history,
                trace,
                plant,
            } => R::Run {
                seed,
                history,
                trace,
                plant,
            },
            Command::Replay { seed, trace, plant } => R::Run {
                seed,
                history: None,
                trace,
                plant,
            },
            Command::Sweep {
                seeds,
                jobs,
                plant,
                first_failure,
            } => R::Sweep {
                seeds,
                jobs,
                plant,
                first_failure,
            },
            Command::CheckDeterminism { seed } => R::CheckDeterminism { seed },
        }
    }
}
