//! The standard scenario: one seed, one run — form the cluster, chaos,
//! heal, liveness, checks — and its trace hash.

use crate::cluster::{Report, SimCluster};
use crate::history::History;
use crate::swarm::Swarm;
use std::sync::{Arc, Mutex};

/// A finished run.
pub struct RunResult {
    pub swarm: Swarm,
    /// `Err` names the broken property, where and when.
    pub verdict: Result<(), String>,
    pub report: Report,
    /// Hash of everything observable: the history, the fault trace and the
    /// final replica states. Same seed, same binary: same hash.
    pub trace_hash: u32,
}

/// Runs `seed` on a fresh madsim runtime.
pub fn run(seed: u64) -> RunResult {
    let swarm = Swarm::from_seed(seed);
    let runtime = madsim::runtime::Runtime::with_seed_and_config(seed, madsim::Config::default());
    let (verdict, report) = runtime.block_on(scenario(swarm.clone()));
    let mut hash = crc32c::crc32c(swarm.describe().as_bytes());
    let mut history = Vec::new();
    report
        .history
        .write_jsonl(&mut history)
        .expect("writing to memory cannot fail");
    hash = crc32c::crc32c_append(hash, &history);
    for line in &report.trace {
        hash = crc32c::crc32c_append(hash, line.as_bytes());
    }
    hash = crc32c::crc32c_append(hash, &report.final_states);
    RunResult {
        swarm,
        verdict,
        report,
        trace_hash: hash,
    }
}

async fn scenario(swarm: Swarm) -> (Result<(), String>, Report) {
    let history = Arc::new(Mutex::new(History::new()));
    let mut cluster = SimCluster::new(swarm.clone());
    let verdict = phases(&mut cluster, &history).await;
    let (verdict, final_states) = match verdict {
        Ok(states) => (Ok(()), states),
        Err(e) => (Err(e), Vec::new()),
    };
    let history = std::mem::take(&mut *history.lock().unwrap_or_else(|e| e.into_inner()));
    let verdict = verdict.and_then(|()| {
        crate::linearizability::check(&history)
            .map_err(|e| format!("seed {}: linearizability: {e}", swarm.seed))
    });
    let report = Report {
        history,
        trace: cluster.trace(),
        simulated_ms: cluster.simulated_ms(),
        final_states,
    };
    (verdict, report)
}

async fn phases(
    cluster: &mut SimCluster,
    history: &Arc<Mutex<History>>,
) -> Result<Vec<u8>, String> {
    cluster.form().await?;
    cluster.chaos(Arc::clone(history)).await;
    cluster.heal();
    cluster.liveness().await?;
    cluster.damage_only_from_rot()?;
    cluster.final_reads(history).await?;
    cluster.tokens_used_once()?;
    cluster.lost_nodes_removed().await?;
    cluster.migrations_settled().await?;
    cluster.converged().await
}
