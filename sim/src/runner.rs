//! The runner behind `keel-sim`: one seed in this process, or many seeds in
//! child processes (a crash or hang of one seed cannot take the sweep down,
//! and every seed starts from a clean process, as its replay will).

use indicatif::{ProgressBar, ProgressStyle};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command as Process, Stdio};
use std::time::Duration;

/// The `keel-sim` subcommands.
#[derive(clap::Subcommand)]
pub enum Command {
    /// Run one seed; print the swarm first and the trace hash last.
    Run {
        #[arg(long)]
        seed: u64,
        /// Write the client history as JSON lines to this file.
        #[arg(long)]
        history: Option<PathBuf>,
        /// Print the fault and phase trace.
        #[arg(long)]
        trace: bool,
        /// Plant a deliberate bug (skip-fsync, forget-vote, stale-reads) to
        /// check that the checkers catch it.
        #[arg(long)]
        plant: Option<String>,
    },
    /// Re-run one seed, printing its trace with --trace.
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
    /// Run one seed twice in two processes and compare the trace hashes;
    /// the second run prints every debug log (to nowhere), since a replay
    /// with logs on must follow the same path as the run it replays.
    CheckDeterminism {
        #[arg(long)]
        seed: u64,
    },
}

pub fn main(command: Command) -> Result<(), String> {
    match command {
        Command::Run {
            seed,
            history,
            trace,
            plant,
        } => run(seed, history, trace, parse_bug(plant.as_deref())?),
        Command::Replay { seed, trace, plant } => {
            run(seed, None, trace, parse_bug(plant.as_deref())?)
        }
        Command::Sweep {
            seeds,
            jobs,
            plant,
            first_failure,
        } => {
            parse_bug(plant.as_deref())?;
            sweep(&seeds, jobs, plant.as_deref(), first_failure)
        }
        Command::CheckDeterminism { seed } => check_determinism(seed),
    }
}

fn parse_bug(name: Option<&str>) -> Result<Option<keel::planted::Bug>, String> {
    name.map(|name| {
        keel::planted::Bug::from_name(name).ok_or_else(|| {
            let known: Vec<&str> = keel::planted::Bug::ALL.iter().map(|b| b.name()).collect();
            format!("unknown bug {name:?}; plant one of: {}", known.join(", "))
        })
    })
    .transpose()
}

#[cfg(madsim)]
fn run(
    seed: u64,
    history: Option<PathBuf>,
    trace: bool,
    plant: Option<keel::planted::Bug>,
) -> Result<(), String> {
    let swarm = crate::swarm::Swarm::from_seed(seed);
    println!("swarm: {}", swarm.describe());
    if let Some(bug) = plant {
        keel::planted::plant(bug);
        println!("planted bug: {}", bug.name());
    }
    crate::probes::install()?;
    let started = std::time::Instant::now();
    let mut result = crate::scenario::run(seed);
    let wall = started.elapsed();
    if let (Ok(()), Err(e)) = (&result.verdict, crate::probes::check_election_safety()) {
        result.verdict = Err(format!("seed {seed}: {e}"));
    }
    if let (Ok(()), Err(e)) = (&result.verdict, crate::probes::check_applied_entries()) {
        result.verdict = Err(format!("seed {seed}: {e}"));
    }
    if let Some(path) = history {
        let mut file = std::fs::File::create(&path)
            .map_err(|e| format!("cannot create {}: {e}", path.display()))?;
        result
            .report
            .history
            .write_jsonl(&mut file)
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if trace {
        for line in &result.report.trace {
            println!("{line}");
        }
    }
    let simulated = result.report.simulated_ms as f64 / 1_000.0;
    println!(
        "simulated {simulated:.1} s in {:.2} s wall ({:.0}x), {} operations",
        wall.as_secs_f64(),
        simulated / wall.as_secs_f64().max(1e-9),
        result.report.history.len()
    );
    println!("{}", crate::probes::line(&crate::probes::counts()));
    let verdict = match &result.verdict {
        Ok(()) => "PASS".to_string(),
        Err(e) => format!("FAIL: {e}"),
    };
    println!("{verdict}");
    println!("trace hash: {:08x}", result.trace_hash);
    result.verdict.map_err(|_| format!("seed {seed} failed"))
}

#[cfg(not(madsim))]
fn run(
    _seed: u64,
    _history: Option<PathBuf>,
    _trace: bool,
    _plant: Option<keel::planted::Bug>,
) -> Result<(), String> {
    Err(
        "keel-sim runs only in the simulator build: use scripts/sim.sh \
         (RUSTFLAGS=\"--cfg madsim\")"
            .into(),
    )
}

fn parse_range(seeds: &str) -> Result<std::ops::Range<u64>, String> {
    let (a, b) = seeds
        .split_once("..")
        .ok_or_else(|| format!("--seeds must look like A..B, not {seeds:?}"))?;
    let a: u64 = a
        .trim()
        .parse()
        .map_err(|_| format!("bad start seed {a:?}"))?;
    let b: u64 = b
        .trim()
        .parse()
        .map_err(|_| format!("bad end seed {b:?}"))?;
    if a >= b {
        return Err(format!("--seeds {seeds}: the range is empty"));
    }
    Ok(a..b)
}

/// How a child run logs.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Logs {
    /// As this process was told (`RUST_LOG`), its stderr kept.
    Inherited,
    /// Every debug log formatted and thrown away.
    AllDiscarded,
}

fn child(seed: u64, plant: Option<&str>, logs: Logs) -> Result<Child, String> {
    let exe = std::env::current_exe().map_err(|e| format!("cannot find myself: {e}"))?;
    let mut process = Process::new(exe);
    process.args(["run", "--seed", &seed.to_string()]);
    if let Some(bug) = plant {
        process.args(["--plant", bug]);
    }
    let stderr = match logs {
        Logs::Inherited => Stdio::piped(),
        Logs::AllDiscarded => {
            process.env("RUST_LOG", "debug");
            Stdio::null()
        }
    };
    process
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .map_err(|e| format!("cannot start seed {seed}: {e}"))
}

/// What a finished child reported.
struct ChildOutcome {
    passed: bool,
    /// The trace hash line if it passed, else what failed.
    detail: String,
    probes: BTreeMap<String, u64>,
}

fn outcome(child: Child) -> ChildOutcome {
    match child.wait_with_output() {
        Ok(output) => {
            let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
            let probes = stdout
                .lines()
                .find(|l| l.starts_with("probes:"))
                .map(crate::probes::parse)
                .unwrap_or_default();
            let hash = stdout.lines().last().unwrap_or_default().to_string();
            let failure = stdout
                .lines()
                .find(|l| l.starts_with("FAIL"))
                .map(str::to_string)
                .unwrap_or_else(|| {
                    String::from_utf8_lossy(&output.stderr)
                        .lines()
                        .last()
                        .unwrap_or("crashed")
                        .to_string()
                });
            let passed = output.status.success();
            ChildOutcome {
                passed,
                detail: if passed { hash } else { failure },
                probes,
            }
        }
        Err(e) => ChildOutcome {
            passed: false,
            detail: format!("could not wait: {e}"),
            probes: BTreeMap::new(),
        },
    }
}

fn sweep(seeds: &str, jobs: usize, plant: Option<&str>, first_failure: bool) -> Result<(), String> {
    let range = parse_range(seeds)?;
    let total = range.end - range.start;
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} seeds, {msg} [{elapsed}<{eta}]")
            .map_err(|e| e.to_string())?,
    );
    let mut pending = range.clone();
    let mut running: Vec<(u64, Child)> = Vec::new();
    let mut failures = Vec::new();
    let mut passed = 0u64;
    let mut probes: BTreeMap<String, u64> = BTreeMap::new();
    loop {
        while running.len() < jobs.max(1) {
            match pending.next() {
                Some(seed) if !first_failure || failures.is_empty() => {
                    running.push((seed, child(seed, plant, Logs::Inherited)?))
                }
                _ => break,
            }
        }
        if running.is_empty() {
            break;
        }
        let finished = running
            .iter_mut()
            .position(|(_, c)| matches!(c.try_wait(), Ok(Some(_))));
        match finished {
            Some(i) => {
                let (seed, c) = running.swap_remove(i);
                let done = outcome(c);
                for (probe, count) in done.probes {
                    *probes.entry(probe).or_default() += count;
                }
                if done.passed {
                    passed += 1;
                } else {
                    failures.push((seed, done.detail));
                }
                bar.set_message(format!("{} failed", failures.len()));
                bar.inc(1);
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    bar.finish_and_clear();
    failures.sort();
    let planted = plant.map_or(String::new(), |bug| format!(" --plant {bug}"));
    for (seed, detail) in &failures {
        println!("seed {seed}: {detail}");
        println!("  replay: scripts/sim.sh replay --seed {seed} --trace{planted}");
    }
    let seeds_run = passed + failures.len() as u64;
    if first_failure {
        println!("{seeds_run} seeds run");
    }
    let never: Vec<&str> = crate::probes::ALL
        .iter()
        .copied()
        .filter(|p| !probes.contains_key(*p))
        .collect();
    println!("{}", crate::probes::line(&probes));
    if never.is_empty() {
        println!("every code probe was hit");
    } else {
        println!("probes never hit: {}", never.join(" "));
    }
    println!("{passed} passed, {} failed", failures.len());
    if failures.is_empty() {
        Ok(())
    } else {
        Err(format!("{} of {total} seeds failed", failures.len()))
    }
}

fn check_determinism(seed: u64) -> Result<(), String> {
    let first = outcome(child(seed, None, Logs::Inherited)?);
    let second = outcome(child(seed, None, Logs::AllDiscarded)?);
    if first.detail == second.detail {
        println!("seed {seed}: deterministic ({})", first.detail);
        Ok(())
    } else {
        Err(format!(
            "seed {seed} is not deterministic: first run ended with {:?}, second with {:?}",
            first.detail, second.detail
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_ranges_parse_with_clear_errors() {
        assert_eq!(parse_range("3..7"), Ok(3..7));
        assert!(parse_range("7..3").unwrap_err().contains("empty"));
        assert!(parse_range("x..3").unwrap_err().contains("bad start"));
        assert!(parse_range("12").unwrap_err().contains("A..B"));
    }
}
