//! `keel-sim` — runs simulations (DESIGN.md §8). Use it through
//! `scripts/sim.sh`, which builds it with `--cfg madsim`:
//!
//! ```text
//! keel-sim run --seed N [--history FILE] [--trace]   one seed; the trace hash is the last line
//! keel-sim replay --seed N --trace                    the same, printing the full event trace
//! keel-sim sweep --seeds A..B [--jobs J]              each seed in a fresh process
//! keel-sim check-determinism --seed N                 two processes, same hash or a diff
//! ```

use clap::Parser;
use keel_sim::runner::Command;
use std::process::ExitCode;

#[derive(Parser)]
#[command(name = "keel-sim", about = "Deterministic simulation of keel clusters")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match keel_sim::runner::main(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
