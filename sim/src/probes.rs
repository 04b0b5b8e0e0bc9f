//! Code probes (DESIGN.md §8): keel marks rare paths with `keel::probe!`,
//! a tracing event under the `keel_probe` target. The simulator counts them
//! per run; the sweep adds the counts up and names every probe no seed hit,
//! which is how a sweep shows what it did not exercise.

use std::collections::BTreeMap;
use std::sync::Mutex;
use tracing::field::{Field, Visit};
use tracing::{Event, Metadata, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

/// Every probe keel defines. A test keeps this list equal to the
/// `probe!` calls in keel's sources.
pub const ALL: &[&str] = &[
    "decommission.finished",
    "decommission.leave_resumed",
    "decommission.move_started",
    "decommission.waiting_for_safe_move",
    "group.founded",
    "hlc.remote_ahead_refused",
    "io.database_damaged",
    "join.admitted",
    "join.id_taken_retry",
    "join.reverted",
    "join.token_in_flight",
    "membership.enter_joint",
    "membership.leader_steps_aside",
    "membership.leave_joint",
    "membership.simple_change",
    "membership.transfer_to_routing_leader",
    "metadata.entry_rejected",
    "migration.abort_refused_past_no_return",
    "migration.aborted.before_fence",
    "migration.aborted.before_promotion",
    "migration.aborted.rolled_back",
    "migration.aborted.unfenced",
    "migration.aborted_after_attempts",
    "migration.completed",
    "migration.control_refused",
    "migration.finished_after_attempts",
    "migration.ghost_stub_expired",
    "migration.orphan_gate_cleared",
    "migration.pause_budget_exceeded",
    "migration.phase.add_learner",
    "migration.phase.catch_up",
    "migration.phase.complete",
    "migration.phase.copy",
    "migration.phase.cutover",
    "migration.phase.fence",
    "migration.phase.final_catch_up",
    "migration.phase.leadership_transfer",
    "migration.phase.promote_learner",
    "migration.phase.reassign",
    "migration.phase.tail",
    "migration.phase_timed_out",
    "migration.resumed.add_learner",
    "migration.resumed.catch_up",
    "migration.resumed.copy",
    "migration.resumed.cutover",
    "migration.resumed.fence",
    "migration.resumed.final_catch_up",
    "migration.resumed.leadership_transfer",
    "migration.resumed.promote_learner",
    "migration.resumed.reassign",
    "migration.resumed.tail",
    "migration.started",
    "migration.vshard_reassigned",
    "node.forwarded_batch",
    "node.group_fail_stopped",
    "node.learned_retired",
    "node.metadata_from_snapshot",
    "node.proposal_timed_out",
    "node.read_lost_leadership",
    "node.request_forwarded",
    "node.restart_from_disk",
    "node.storage_failure_stop",
    "node.wrong_group_followed",
    "placement.replica_added",
    "raft.bootstrap_refused_destroyed",
    "raft.commit_deferred_to_next_round",
    "raft.group_hibernated",
    "raft.read_index_held",
    "raft.snapshot_delivered",
    "raft.snapshot_failed",
    "raft.snapshot_refused_uninitialized",
    "raft.snapshot_taken",
    "raft.vote_refused_uninitialized",
    "raft.woken_by_silent_leader",
    "replica.destroyed",
    "replica.removal_waits_for_replay",
    "routing.gate_refused_write",
    "routing.wrong_group_redirect",
    "token.dead_man_revert",
    "token.expired",
];

static COUNTS: Mutex<BTreeMap<String, u64>> = Mutex::new(BTreeMap::new());

/// Counts `keel_probe` events; sees nothing else.
pub struct ProbeLayer;

struct ProbeName(Option<String>);

impl Visit for ProbeName {
    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "probe" {
            self.0 = Some(value.to_string());
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "probe" {
            self.0 = Some(format!("{value:?}").trim_matches('"').to_string());
        }
    }
}

impl<S: Subscriber> Layer<S> for ProbeLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut name = ProbeName(None);
        event.record(&mut name);
        if let Some(name) = name.0 {
            let mut counts = COUNTS.lock().unwrap_or_else(|e| e.into_inner());
            *counts.entry(name).or_default() += 1;
        }
    }
}

/// Every election seen in this run: (group, term) → the leaders elected.
static ELECTIONS: Mutex<BTreeMap<(u64, u64), Vec<u64>>> = Mutex::new(BTreeMap::new());

/// Records keel's `keel_event` elections.
pub struct ElectionLayer;

#[derive(Default)]
struct Election {
    group: Option<u64>,
    term: Option<u64>,
    leader: Option<u64>,
}

impl Visit for Election {
    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "group" => self.group = Some(value),
            "term" => self.term = Some(value),
            "leader" => self.leader = Some(value),
            _ => {}
        }
    }
    fn record_debug(&mut self, _field: &Field, _value: &dyn std::fmt::Debug) {}
}

impl<S: Subscriber> Layer<S> for ElectionLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut e = Election::default();
        event.record(&mut e);
        if let (Some(group), Some(term), Some(leader)) = (e.group, e.term, e.leader) {
            let mut elections = ELECTIONS.lock().unwrap_or_else(|e| e.into_inner());
            let leaders = elections.entry((group, term)).or_default();
            if !leaders.contains(&leader) {
                leaders.push(leader);
            }
        }
    }
}

/// Raft's election safety: never two leaders of one group in one term.
pub fn check_election_safety() -> Result<usize, String> {
    let elections = ELECTIONS.lock().unwrap_or_else(|e| e.into_inner());
    for ((group, term), leaders) in elections.iter() {
        if leaders.len() > 1 {
            return Err(format!(
                "election safety: group g{group} elected {} leaders in term {term}: {leaders:?}",
                leaders.len()
            ));
        }
    }
    Ok(elections.len())
}

/// An entry as the first replica to apply it saw it.
#[derive(Clone, Copy)]
struct FirstApplied {
    term: u64,
    /// CRC32C of the entry's data.
    crc: u64,
    node: u64,
}

/// Every entry applied in this run, by (group, index).
static APPLIED: Mutex<BTreeMap<(u64, u64), FirstApplied>> = Mutex::new(BTreeMap::new());
/// The first disagreement seen: two replicas applied different entries at
/// one index.
static APPLIED_CONFLICT: Mutex<Option<String>> = Mutex::new(None);

/// Records keel's `keel_event` applied entries.
pub struct AppliedLayer;

#[derive(Default)]
struct Applied {
    group: Option<u64>,
    index: Option<u64>,
    term: Option<u64>,
    crc: Option<u64>,
    node: Option<u64>,
}

impl Visit for Applied {
    fn record_u64(&mut self, field: &Field, value: u64) {
        match field.name() {
            "group" => self.group = Some(value),
            "index" => self.index = Some(value),
            "term" => self.term = Some(value),
            "crc" => self.crc = Some(value),
            "node" => self.node = Some(value),
            _ => {}
        }
    }
    fn record_debug(&mut self, _field: &Field, _value: &dyn std::fmt::Debug) {}
}

impl<S: Subscriber> Layer<S> for AppliedLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        let mut a = Applied::default();
        event.record(&mut a);
        let (Some(group), Some(index), Some(term), Some(crc), Some(node)) =
            (a.group, a.index, a.term, a.crc, a.node)
        else {
            return;
        };
        let mut applied = APPLIED.lock().unwrap_or_else(|e| e.into_inner());
        let first = *applied
            .entry((group, index))
            .or_insert(FirstApplied { term, crc, node });
        if (first.term, first.crc) != (term, crc) {
            let mut conflict = APPLIED_CONFLICT.lock().unwrap_or_else(|e| e.into_inner());
            conflict.get_or_insert_with(|| {
                format!(
                    "state-machine safety: group g{group} applied two entries at index {index}: \
                     term {} (data crc {:08x}) on n{}, term {term} (data crc {crc:08x}) on n{node}",
                    first.term, first.crc, first.node
                )
            });
        }
    }
}

/// State-machine safety: every replica of a group applied the same entry
/// at each index (a replica restored from a snapshot skips some).
pub fn check_applied_entries() -> Result<usize, String> {
    match APPLIED_CONFLICT
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone()
    {
        Some(conflict) => Err(conflict),
        None => Ok(APPLIED.lock().unwrap_or_else(|e| e.into_inner()).len()),
    }
}

/// Installs the probe counter as this process's tracing subscriber, plus
/// a log printer when `RUST_LOG` is set (`target=level` pairs, e.g.
/// `RUST_LOG=raft=debug,keel=info` while replaying a seed).
///
/// The printer's filter is a [`Targets`](tracing_subscriber::filter::Targets),
/// not an `EnvFilter`: an `EnvFilter` builds std `HashMap`s, and the first
/// `HashMap` on a thread fixes its hash keys. madsim seeds those keys from
/// the run's seed when its runtime starts, but only if nothing fixed them
/// before; an `EnvFilter` built first left them truly random, so a replay
/// with logs on diverged from the seed it replayed.
pub fn install() -> Result<(), String> {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::Layer as _;
    let printer = match std::env::var("RUST_LOG") {
        Ok(filter) => {
            let targets: Targets = filter
                .parse()
                .map_err(|e| format!("RUST_LOG={filter:?} is not a list of target=level: {e}"))?;
            Some(
                tracing_subscriber::fmt::layer()
                    .with_writer(std::io::stderr)
                    .with_filter(targets),
            )
        }
        Err(_) => None,
    };
    // Per-layer filters: each layer sees only what it wants, and events no
    // layer wants cost one disabled callsite.
    let probes =
        ProbeLayer.with_filter(tracing_subscriber::filter::filter_fn(|m: &Metadata<'_>| {
            m.target() == "keel_probe"
        }));
    let elections =
        ElectionLayer.with_filter(tracing_subscriber::filter::filter_fn(|m: &Metadata<'_>| {
            m.target() == "keel_event"
        }));
    let applied =
        AppliedLayer.with_filter(tracing_subscriber::filter::filter_fn(|m: &Metadata<'_>| {
            m.target() == "keel_event"
        }));
    let subscriber = tracing_subscriber::registry()
        .with(probes)
        .with(elections)
        .with(applied)
        .with(printer);
    let _ = tracing::subscriber::set_global_default(subscriber);
    Ok(())
}

/// The counts so far.
pub fn counts() -> BTreeMap<String, u64> {
    COUNTS.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// One line for a run's output: `probes: a=1 b=3`.
pub fn line(counts: &BTreeMap<String, u64>) -> String {
    let pairs: Vec<String> = counts.iter().map(|(k, v)| format!("{k}={v}")).collect();
    format!("probes: {}", pairs.join(" "))
}

/// Parses [`line`]'s output back.
pub fn parse(line: &str) -> BTreeMap<String, u64> {
    line.strip_prefix("probes:")
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            Some((k.to_string(), v.parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The list above and keel's `probe!` calls must not drift apart.
    #[test]
    fn all_probes_are_listed() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../src");
        let mut found = std::collections::BTreeSet::new();
        let mut stack = vec![root];
        while let Some(dir) = stack.pop() {
            for entry in std::fs::read_dir(dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    stack.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for piece in text.split("probe!(\"").skip(1) {
                        if let Some((name, _)) = piece.split_once('"') {
                            found.insert(name.to_string());
                        }
                    }
                }
            }
        }
        let listed: std::collections::BTreeSet<String> =
            ALL.iter().map(|s| s.to_string()).collect();
        assert_eq!(found, listed);
    }

    /// Two replicas applying different entries at one index are caught;
    /// the same entry applied again (a restart replays its log) is not.
    #[test]
    fn conflicting_applied_entries_are_caught() {
        use tracing_subscriber::layer::SubscriberExt;
        let applied = |node: u64, term: u64, crc: u32| {
            tracing::debug!(target: "keel_event", group = 9u64, index = 27u64, term, crc, node, "applied");
        };
        let subscriber = tracing_subscriber::registry().with(AppliedLayer);
        tracing::subscriber::with_default(subscriber, || {
            applied(1, 11, 0xaa);
            applied(1, 11, 0xaa);
            applied(4, 11, 0xaa);
            assert!(check_applied_entries().is_ok());
            applied(2, 12, 0xbb);
        });
        let error = check_applied_entries().unwrap_err();
        assert!(
            error.contains("group g9 applied two entries at index 27"),
            "{error}"
        );
    }

    #[test]
    fn lines_round_trip() {
        let mut counts = BTreeMap::new();
        counts.insert("a.b".to_string(), 3);
        counts.insert("c".to_string(), 1);
        assert_eq!(parse(&line(&counts)), counts);
    }
}
