//! The figures of moves and failures: the write pause of repeated vShard
//! and replica moves (as the coordinator measured and checkpointed it),
//! with a writer running throughout; and failover, from SIGKILL of the
//! group-0 leader to the next committed metadata write.

use super::load::{self, percentile, LoadResult, Op};
use super::KeelTarget;
use crate::cli::status;
use crate::cli::up::LocalCluster;
use crate::core::ids::{GroupId, MigrationId, NodeId, VShardId};
use crate::core::rebalance::PlannedMove;
use crate::node::service::{ClientRequest, ClientResponse};
use serde::Serialize;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Clients of the writer that runs while moves are timed.
const WRITERS: usize = 8;
/// The longest one move may take before the bench gives up on it.
const MOVE_TIMEOUT: Duration = Duration::from_secs(120);
/// How often a move's row is looked at.
const POLL: Duration = Duration::from_millis(50);

/// Figures of one kind of move.
#[derive(Debug, Serialize)]
pub struct MoveFigures {
    pub completed: usize,
    pub aborted: usize,
    pub pause_p50_ms: f64,
    pub pause_p99_ms: f64,
    pub pause_max_ms: f64,
    /// Start to `Complete`, as the bench saw it.
    pub duration_p50_s: f64,
    pub duration_max_s: f64,
}

#[derive(Debug, Serialize)]
pub struct MoveReport {
    pub vshard: MoveFigures,
    /// Absent with fewer than 4 nodes (no node to move a replica to).
    pub replica: Option<MoveFigures>,
    /// What a writer saw while the moves ran.
    pub writer: LoadResult,
}

#[derive(Debug, Serialize)]
pub struct FailoverReport {
    pub runs: usize,
    pub p50_ms: f64,
    pub max_ms: f64,
    pub each_ms: Vec<f64>,
}

/// Times `count` vShard moves (each to the next data group) and, with 4 or
/// more nodes, `count` replica moves of group leaders to a node outside the
/// group, one at a time, while a writer runs.
pub async fn time_moves(
    cluster: &LocalCluster,
    target: &Arc<KeelTarget>,
    count: usize,
) -> Result<MoveReport, String> {
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(load::run_until(
        Arc::clone(target),
        Op::Write,
        WRITERS,
        Duration::ZERO,
        Arc::clone(&stop),
    ));
    let moved = move_all(cluster, count).await;
    stop.store(true, Ordering::Relaxed);
    let writer = writer
        .await
        .map_err(|e| format!("the writer failed: {e}"))?;
    let (vshard, replica) = moved?;
    let report = MoveReport {
        vshard,
        replica,
        writer,
    };
    print_moves(&report);
    Ok(report)
}

async fn move_all(
    cluster: &LocalCluster,
    count: usize,
) -> Result<(MoveFigures, Option<MoveFigures>), String> {
    let client = cluster.client()?;
    let mut vshard = Timings::default();
    for i in 0..count {
        let (first, _) = client.statuses().await?;
        let groups = first.vshard_groups.iter().map(|g| g.0).max().unwrap_or(0);
        let v =
            VShardId::new(u16::try_from(i * 37 % 1024).unwrap_or(0)).map_err(|e| e.to_string())?;
        let from = first.vshard_groups[v.index()];
        let to = GroupId(from.0 % groups + 1);
        if from == to {
            return Err("vShard moves need at least 2 data groups".into());
        }
        vshard
            .time(
                &client,
                PlannedMove::VShard {
                    vshard: v,
                    from,
                    to,
                },
            )
            .await?;
    }
    let mut replica = Timings::default();
    let report = status::report(&client).await?;
    if report.nodes.len() < 4 {
        return Ok((vshard.figures(), None));
    }
    for i in 0..count {
        let report = status::report(&client).await?;
        let data: Vec<_> = report.groups.iter().filter(|g| g.group != 0).collect();
        let group = data[i % data.len()];
        let source = group
            .leader
            .ok_or_else(|| format!("group {} has no leader", group.group))?;
        let target = report
            .nodes
            .iter()
            .map(|n| n.id)
            .find(|n| !group.voters.contains(n) && !group.learners.contains(n))
            .ok_or_else(|| format!("every node holds group {}", group.group))?;
        let node = |id| NodeId::new(id).map_err(|e| e.to_string());
        replica
            .time(
                &client,
                PlannedMove::Replica {
                    group: GroupId(group.group),
                    source: node(source)?,
                    target: node(target)?,
                },
            )
            .await?;
    }
    Ok((vshard.figures(), Some(replica.figures())))
}

/// Pauses (µs) and durations of the moves of one kind.
#[derive(Default)]
struct Timings {
    pauses_us: Vec<u64>,
    durations_ms: Vec<u64>,
    aborted: usize,
}

impl Timings {
    /// Starts `planned` and waits until its row is `Complete` (recording
    /// the pause it carries) or gone (aborted).
    async fn time(
        &mut self,
        client: &crate::cli::client::AdminClient,
        planned: PlannedMove,
    ) -> Result<(), String> {
        let started = Instant::now();
        let id = match client.call(&ClientRequest::Migrate(planned)).await? {
            ClientResponse::Migration(id) => id,
            other => return Err(format!("unexpected answer to {planned}: {other:?}")),
        };
        loop {
            if started.elapsed() > MOVE_TIMEOUT {
                return Err(format!("{planned} did not finish within {MOVE_TIMEOUT:?}"));
            }
            tokio::time::sleep(POLL).await;
            match row_state(client, id).await? {
                RowState::Open => continue,
                RowState::Gone => {
                    self.aborted += 1;
                    return Ok(());
                }
                RowState::Complete(pause_us) => {
                    self.pauses_us.push(pause_us);
                    self.durations_ms
                        .push(u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX));
                    return Ok(());
                }
            }
        }
    }

    fn figures(mut self) -> MoveFigures {
        self.pauses_us.sort_unstable();
        self.durations_ms.sort_unstable();
        let ms = |us: u64| us as f64 / 1_000.0;
        let secs = |ms: u64| ms as f64 / 1_000.0;
        MoveFigures {
            completed: self.pauses_us.len(),
            aborted: self.aborted,
            pause_p50_ms: ms(percentile(&self.pauses_us, 0.50)),
            pause_p99_ms: ms(percentile(&self.pauses_us, 0.99)),
            pause_max_ms: ms(self.pauses_us.last().copied().unwrap_or(0)),
            duration_p50_s: secs(percentile(&self.durations_ms, 0.50)),
            duration_max_s: secs(self.durations_ms.last().copied().unwrap_or(0)),
        }
    }
}

enum RowState {
    Open,
    Gone,
    /// With the measured write pause in µs.
    Complete(u64),
}

async fn row_state(
    client: &crate::cli::client::AdminClient,
    id: MigrationId,
) -> Result<RowState, String> {
    let status = match client.call(&ClientRequest::Status).await? {
        ClientResponse::Status(status) => status,
        other => return Err(format!("unexpected answer to status: {other:?}")),
    };
    let id = id.to_string();
    Ok(match status.migrations.iter().find(|m| m.id == id) {
        None => RowState::Gone,
        Some(m) if m.complete => RowState::Complete(m.write_pause_us.unwrap_or(0)),
        Some(_) => RowState::Open,
    })
}

fn print_moves(report: &MoveReport) {
    println!(
        "\n{:<10}{:>6}{:>9}{:>14}{:>14}{:>14}{:>14}",
        "move", "done", "aborted", "pause p50 ms", "pause p99 ms", "pause max ms", "took p50 s"
    );
    let line = |kind: &str, f: &MoveFigures| {
        println!(
            "{kind:<10}{:>6}{:>9}{:>14.1}{:>14.1}{:>14.1}{:>14.2}",
            f.completed,
            f.aborted,
            f.pause_p50_ms,
            f.pause_p99_ms,
            f.pause_max_ms,
            f.duration_p50_s
        )
    };
    line("vshard", &report.vshard);
    if let Some(replica) = &report.replica {
        line("replica", replica);
    }
    let w = &report.writer;
    println!(
        "a writer ({WRITERS} clients) meanwhile: {} writes, p99 {:.1} ms, max {:.1} ms, {} errors",
        w.ok, w.p99_ms, w.max_ms, w.errors
    );
    if let Some(e) = &w.first_error {
        println!("        first error: {e}");
    }
}

/// Sends a metadata write to the survivors every [`POLL`], in turn, each
/// attempt left running while the next starts; returns when one commits.
async fn first_commit(
    client: &crate::cli::client::AdminClient,
    survivors: &[SocketAddr],
) -> Result<(), String> {
    let started = Instant::now();
    let mut attempts = tokio::task::JoinSet::new();
    let mut tick = tokio::time::interval(POLL);
    let mut next = 0usize;
    loop {
        tokio::select! {
            _ = tick.tick() => {
                if started.elapsed() > MOVE_TIMEOUT {
                    return Err(format!("no metadata write committed within {MOVE_TIMEOUT:?}"));
                }
                let addr = survivors[next % survivors.len()];
                next += 1;
                let client = client.clone();
                attempts.spawn(async move {
                    let ddl = ClientRequest::Ddl {
                        payload: b"failover".to_vec(),
                    };
                    matches!(client.call_at(addr, &ddl).await, Ok(ClientResponse::Done))
                });
            }
            Some(done) = attempts.join_next() => {
                if done.unwrap_or(false) {
                    return Ok(());
                }
            }
        }
    }
}

/// Kills the group-0 leader `runs` times; each time, the figure is from the
/// kill to the first metadata write a surviving node commits. The node is
/// restarted and the cluster healthy again before the next run.
pub async fn time_failovers(
    cluster: &mut LocalCluster,
    rf: usize,
    runs: usize,
) -> Result<FailoverReport, String> {
    let mut each_us = Vec::new();
    for _ in 0..runs {
        let client = cluster.client()?;
        let report = status::report(&client).await?;
        let leader = report
            .groups
            .iter()
            .find(|g| g.group == 0)
            .and_then(|g| g.leader)
            .ok_or("group 0 has no leader")?;
        let survivors: Vec<SocketAddr> = report
            .nodes
            .iter()
            .filter(|n| n.id != leader)
            .filter_map(|n| n.addr.parse().ok())
            .collect();
        cluster.kill(leader)?;
        let killed = Instant::now();
        first_commit(&client, &survivors)
            .await
            .map_err(|e| format!("after killing node {leader}: {e}"))?;
        each_us.push(u64::try_from(killed.elapsed().as_micros()).unwrap_or(u64::MAX));
        cluster.restart(leader)?;
        cluster.wait_healthy(rf).await?;
    }
    let mut sorted = each_us.clone();
    sorted.sort_unstable();
    let ms = |us: u64| us as f64 / 1_000.0;
    let report = FailoverReport {
        runs,
        p50_ms: ms(percentile(&sorted, 0.5)),
        max_ms: ms(sorted.last().copied().unwrap_or(0)),
        each_ms: each_us.into_iter().map(ms).collect(),
    };
    println!(
        "\nfailover (SIGKILL of the group-0 leader to the next committed metadata write), {} runs: p50 {:.0} ms, max {:.0} ms",
        report.runs, report.p50_ms, report.max_ms
    );
    Ok(report)
}
