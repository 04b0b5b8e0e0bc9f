//! `keel migrate`, `keel decommission` and `keel rebalance` (DESIGN.md §5,
//! §9): start moves through the client service, then follow them in the
//! migration table (polling `Status` every 200 ms) until each row is
//! `Complete` — it stays, carrying the measured write pause — or is gone,
//! which means the coordinator aborted it and applied its compensations.

use crate::cli::client::{AdminClient, ClientArgs};
use crate::cli::status;
use crate::core::ids::{GroupId, MigrationId, NodeId, VShardId};
use crate::core::rebalance::PlannedMove;
use crate::node::service::{ClientRequest, ClientResponse, ClusterStatus, MigrationSummary};
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;
use tokio::time::Instant;

/// How often progress is polled.
const POLL: Duration = Duration::from_millis(200);
/// A started migration that the polled node has not shown for this long is
/// taken as aborted (the node answering `Status` may lag the one that
/// committed the start by a few entries, never by seconds).
const UNSEEN_GRACE: Duration = Duration::from_secs(5);
/// Status calls may fail while nodes restart or leadership moves; progress
/// gives up after failing for this long in a row.
const UNREACHABLE_LIMIT: Duration = Duration::from_secs(30);
/// How long a leadership move may take to show in the groups' own state.
const LEADER_WAIT: Duration = Duration::from_secs(15);
/// Rebalance rounds in a row in which every started move aborted, before
/// `keel rebalance` gives up.
const MAX_FUTILE_ROUNDS: u32 = 3;
/// Rebalance rounds before `keel rebalance` stops, should the plans never
/// settle.
const MAX_ROUNDS: u32 = 256;
/// Completed moves `keel status` lists.
pub const RECENT_COMPLETED: usize = 5;

#[derive(clap::Subcommand)]
pub enum MigrateCommand {
    /// Move one replica of a data group from node FROM to node TO.
    Replica {
        #[command(flatten)]
        client: ClientArgs,
        /// The data group.
        #[arg(long)]
        group: u64,
        /// The node that holds the replica now.
        #[arg(long)]
        from: u64,
        /// The node that takes it (active, not yet a member of the group).
        #[arg(long)]
        to: u64,
        #[command(flatten)]
        follow: FollowArgs,
    },
    /// Move a vShard from the data group that serves it to group TO.
    Vshard {
        #[command(flatten)]
        client: ClientArgs,
        /// The vShard (0..1024; `keel vshard KEY` tells a key's).
        vshard: u16,
        /// The data group that takes it.
        #[arg(long)]
        to: u64,
        #[command(flatten)]
        follow: FollowArgs,
    },
    /// Move a data group's leadership to one of its voters.
    Leader {
        #[command(flatten)]
        client: ClientArgs,
        /// The data group.
        #[arg(long)]
        group: u64,
        /// The voter that leads it next.
        #[arg(long)]
        to: u64,
        #[command(flatten)]
        follow: FollowArgs,
    },
}

#[derive(clap::Args, Clone, Copy, Debug)]
pub struct FollowArgs {
    /// Return as soon as the move started instead of following it.
    #[arg(long)]
    pub no_wait: bool,
    /// Print the outcome as JSON (the final row of the migration table).
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct DecommissionArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// The node to drain and remove.
    pub node: u64,
    /// Only check that every replica can move off safely and print the moves.
    #[arg(long)]
    pub dry_run: bool,
    /// Return once the node is draining instead of following the moves.
    #[arg(long, conflicts_with = "dry_run")]
    pub no_wait: bool,
    /// Print the plan as JSON (with --dry-run).
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Args)]
pub struct RebalanceArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    /// Only print the moves the next round would start.
    #[arg(long)]
    pub dry_run: bool,
    /// Moves started per round (never more than one per group).
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_moves: u32,
    /// Print the plan as JSON (with --dry-run).
    #[arg(long)]
    pub json: bool,
}

// ---------------------------------------------------------------------------
// keel migrate
// ---------------------------------------------------------------------------

pub async fn migrate(command: MigrateCommand) -> Result<(), String> {
    match command {
        MigrateCommand::Replica {
            client,
            group,
            from,
            to,
            follow,
        } => {
            let planned = PlannedMove::Replica {
                group: data_group(group)?,
                source: node_id(from, "--from")?,
                target: node_id(to, "--to")?,
            };
            if from == to {
                return Err(format!(
                    "--from and --to are both node {from}; name the node that takes the replica"
                ));
            }
            let client = AdminClient::open(&client)?;
            let id = start(&client, planned).await?;
            finish_one(&client, id, planned, follow).await
        }
        MigrateCommand::Vshard {
            client,
            vshard,
            to,
            follow,
        } => {
            let vshard = VShardId::new(vshard).map_err(|e| e.to_string())?;
            let to = data_group(to)?;
            let client = AdminClient::open(&client)?;
            let (planned, id) = start_vshard(&client, vshard, to).await?;
            finish_one(&client, id, planned, follow).await
        }
        MigrateCommand::Leader {
            client,
            group,
            to,
            follow,
        } => {
            let planned = PlannedMove::Leader {
                group: data_group(group)?,
                to: node_id(to, "--to")?,
            };
            let client = AdminClient::open(&client)?;
            let started = Instant::now();
            match client.call(&ClientRequest::Migrate(planned)).await {
                Ok(ClientResponse::Done) => {}
                Ok(other) => return Err(format!("unexpected answer: {other:?}")),
                Err(e) => return Err(server_error(e)),
            }
            if !follow.no_wait {
                wait_for_leader(&client, group, to).await?;
            }
            if follow.json {
                let value = serde_json::json!({
                    "what": planned.to_string(),
                    "complete": !follow.no_wait,
                    "secs": started.elapsed().as_secs_f64(),
                });
                println!("{value}");
            } else if follow.no_wait {
                println!("started: {planned}");
            } else {
                println!(
                    "done: {planned} in {:.1} s",
                    started.elapsed().as_secs_f64()
                );
            }
            Ok(())
        }
    }
}

fn data_group(group: u64) -> Result<GroupId, String> {
    if group == 0 {
        return Err(
            "group 0 is the metadata group, which no migration moves; name a data group (1 and up)"
                .into(),
        );
    }
    Ok(GroupId(group))
}

fn node_id(id: u64, flag: &str) -> Result<NodeId, String> {
    NodeId::new(id).map_err(|_| format!("{flag} must name a node (ids start at 1)"))
}

/// The service's refusals name the reason after a prefix that says only
/// that it is one; the CLI prints the reason.
pub(super) fn server_error(e: String) -> String {
    let e = e.strip_prefix("bad request: ").unwrap_or(&e);
    let e = e.strip_prefix("the checkpoint was refused: ").unwrap_or(e);
    e.to_owned()
}

/// Starts a replica or vShard move; its migration id.
async fn start(client: &AdminClient, planned: PlannedMove) -> Result<MigrationId, String> {
    match client.call(&ClientRequest::Migrate(planned)).await {
        Ok(ClientResponse::Migration(id)) => Ok(id),
        Ok(other) => Err(format!("unexpected answer: {other:?}")),
        Err(e) => Err(server_error(e)),
    }
}

/// Starts the move of `vshard` to `to` from the group routing says serves
/// it now.
async fn start_vshard(
    client: &AdminClient,
    vshard: VShardId,
    to: GroupId,
) -> Result<(PlannedMove, MigrationId), String> {
    let (first, _) = client.statuses().await?;
    if !first.data_groups.contains(&to) {
        let groups: Vec<String> = first.data_groups.iter().map(|g| g.0.to_string()).collect();
        return Err(format!(
            "group {} is not a data group; the data groups are {}",
            to.0,
            groups.join(", ")
        ));
    }
    if let Some(moving) = first.migrations.iter().find(|m| {
        !m.complete
            && matches!(m.planned, Some(PlannedMove::VShard { vshard: v, .. }) if v == vshard)
    }) {
        return Err(format!(
            "vShard {} is already moving (migration {}, phase {}); wait for it to finish",
            vshard.get(),
            moving.id,
            moving.phase
        ));
    }
    let from = *first
        .vshard_groups
        .get(vshard.index())
        .ok_or("the node's status lacks the vShard map; is it an older keel?")?;
    if from == to {
        return Err(format!(
            "vShard {} is already in group {}; nothing to move",
            vshard.get(),
            to.0
        ));
    }
    let planned = PlannedMove::VShard { vshard, from, to };
    start(client, planned).await.map(|id| (planned, id))
}

/// After a single move started: `--no-wait` returns, otherwise follows it.
async fn finish_one(
    client: &AdminClient,
    id: MigrationId,
    planned: PlannedMove,
    follow: FollowArgs,
) -> Result<(), String> {
    if follow.no_wait {
        if follow.json {
            let value = serde_json::json!({ "id": id.to_string(), "what": planned.to_string() });
            println!("{value}");
        } else {
            println!("started migration {id}: {planned}");
        }
        return Ok(());
    }
    let started = Instant::now();
    let bar = spinner(&format!("{planned}: starting"));
    let mut watch = Watch::new([(id.to_string(), planned.to_string())]);
    let ended = loop {
        match watch.poll(client).await {
            Ok(mut ended) => {
                if let Some(end) = ended.pop() {
                    break Ok(end);
                }
            }
            Err(e) => break Err(e),
        }
        if let Some(row) = watch.last.get(&id.to_string()) {
            bar.set_message(format!(
                "{planned}: {} (attempt {})",
                row.phase, row.attempt
            ));
        }
        tokio::time::sleep(POLL).await;
    };
    bar.finish_and_clear();
    match ended? {
        Ended::Complete(row) => {
            if follow.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&row).map_err(|e| e.to_string())?
                );
            } else {
                println!(
                    "done: {} in {:.1} s, write pause {}",
                    row.what,
                    started.elapsed().as_secs_f64(),
                    pause(&row)
                );
            }
            Ok(())
        }
        Ended::Aborted { what, last } => Err(aborted(&id.to_string(), &what, last.as_ref())),
    }
}

fn aborted(id: &str, what: &str, last: Option<&MigrationSummary>) -> String {
    let at = last.map_or(String::new(), |row| {
        format!(" in phase {} (attempt {})", row.phase, row.attempt)
    });
    format!(
        "aborted: {what} (migration {id}) was aborted{at} and its compensations applied; \
         the reason is in the group-0 leader's log (node.log, RUST_LOG=info)"
    )
}

/// A measured write pause, for people.
pub fn pause(row: &MigrationSummary) -> String {
    match row.write_pause_us {
        Some(us) => format!("{:.1} ms", us as f64 / 1000.0),
        None => "not measured".into(),
    }
}

/// Waits until group `group`'s own leader (as its voters see it) is `to`.
async fn wait_for_leader(client: &AdminClient, group: u64, to: u64) -> Result<(), String> {
    let bar = spinner(&format!("waiting for node {to} to lead group {group}"));
    let deadline = Instant::now() + LEADER_WAIT;
    let mut last;
    loop {
        bar.tick();
        match client.statuses().await {
            Ok((first, each)) => {
                let report = status::assemble(&first, &each);
                match report.groups.iter().find(|g| g.group == group) {
                    Some(g) if g.leader == Some(to) => break,
                    Some(g) => {
                        last = format!(
                            "node {} leads it",
                            g.leader.map_or("none".into(), |l| l.to_string())
                        )
                    }
                    None => last = "no reachable node hosts it".into(),
                }
            }
            Err(e) => last = e,
        }
        if Instant::now() >= deadline {
            bar.finish_and_clear();
            return Err(format!(
                "the routing table names node {to} as group {group}'s leader, but after {} s {last}; \
                 check `keel status` and the node logs",
                LEADER_WAIT.as_secs()
            ));
        }
        tokio::time::sleep(POLL).await;
    }
    bar.finish_and_clear();
    Ok(())
}

fn spinner(message: &str) -> ProgressBar {
    let bar = ProgressBar::new_spinner().with_message(message.to_owned());
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

/// How a followed migration ended.
enum Ended {
    Complete(MigrationSummary),
    /// The row disappeared (or never showed up): the coordinator aborted it.
    Aborted {
        what: String,
        last: Option<MigrationSummary>,
    },
}

/// Follows a set of migrations through the migration table.
struct Watch {
    /// Unfinished ones: id → (what, when we started following it).
    pending: BTreeMap<String, (String, Instant)>,
    /// The last row seen of each.
    last: BTreeMap<String, MigrationSummary>,
    /// When a status call last succeeded.
    reached: Instant,
    last_error: String,
    /// Nodes to ask first: a node being drained stops following group 0
    /// once it has left, so its own answers would go stale.
    prefer: Vec<SocketAddr>,
}

impl Watch {
    fn new(ids: impl IntoIterator<Item = (String, String)>) -> Self {
        let now = Instant::now();
        Watch {
            pending: ids
                .into_iter()
                .map(|(id, what)| (id, (what, now)))
                .collect(),
            last: BTreeMap::new(),
            reached: now,
            last_error: String::new(),
            prefer: Vec::new(),
        }
    }

    fn add(&mut self, id: String, what: String) {
        self.pending.insert(id, (what, Instant::now()));
    }

    fn is_done(&self) -> bool {
        self.pending.is_empty()
    }

    /// One poll: the table as the contacted node sees it, and the
    /// migrations that ended since the last poll.
    async fn poll(&mut self, client: &AdminClient) -> Result<Vec<Ended>, String> {
        let Some(status) = self.status(client).await? else {
            return Ok(Vec::new());
        };
        Ok(self.observe(&status.migrations))
    }

    /// `Status` from the first node that answers (of `prefer`, if set);
    /// `None` while none does (for up to [`UNREACHABLE_LIMIT`]).
    async fn status(&mut self, client: &AdminClient) -> Result<Option<ClusterStatus>, String> {
        for &addr in &self.prefer {
            if let Ok(ClientResponse::Status(status)) =
                client.call_at(addr, &ClientRequest::Status).await
            {
                self.reached = Instant::now();
                return Ok(Some(*status));
            }
        }
        match client.call(&ClientRequest::Status).await {
            Ok(ClientResponse::Status(status)) => {
                self.reached = Instant::now();
                Ok(Some(*status))
            }
            Ok(other) => Err(format!("unexpected answer to status: {other:?}")),
            Err(e) if self.reached.elapsed() < UNREACHABLE_LIMIT => {
                self.last_error = e;
                Ok(None)
            }
            Err(e) => Err(format!(
                "lost track of the migrations: no node answered for {} s ({e}); they go on \
                 regardless, follow them with `keel status`",
                UNREACHABLE_LIMIT.as_secs()
            )),
        }
    }

    fn observe(&mut self, rows: &[MigrationSummary]) -> Vec<Ended> {
        let rows: BTreeMap<&str, &MigrationSummary> =
            rows.iter().map(|r| (r.id.as_str(), r)).collect();
        let mut ended = Vec::new();
        let ids: Vec<String> = self.pending.keys().cloned().collect();
        for id in ids {
            match rows.get(id.as_str()) {
                Some(row) => {
                    self.last.insert(id.clone(), (*row).clone());
                    if row.complete {
                        self.pending.remove(&id);
                        ended.push(Ended::Complete((*row).clone()));
                    }
                }
                None => {
                    let (what, since) = &self.pending[&id];
                    if self.last.contains_key(&id) || since.elapsed() >= UNSEEN_GRACE {
                        ended.push(Ended::Aborted {
                            what: what.clone(),
                            last: self.last.get(&id).cloned(),
                        });
                        self.pending.remove(&id);
                    }
                }
            }
        }
        ended
    }

    /// What the unfinished ones are doing, for a progress message.
    fn phases(&self) -> String {
        let mut parts: Vec<String> = self
            .pending
            .iter()
            .map(|(id, (what, _))| match self.last.get(id) {
                Some(row) => format!("{what}: {}", row.phase),
                None => format!("{what}: starting"),
            })
            .collect();
        if parts.is_empty() && !self.last_error.is_empty() {
            parts.push(self.last_error.clone());
        }
        parts.join("; ")
    }
}

// ---------------------------------------------------------------------------
// keel decommission
// ---------------------------------------------------------------------------

#[derive(Serialize)]
struct PlanJson {
    moves: Vec<MoveJson>,
}

#[derive(Serialize)]
struct MoveJson {
    text: String,
    #[serde(rename = "move")]
    planned: PlannedMove,
}

fn plan_json(moves: &[PlannedMove]) -> Result<String, String> {
    let plan = PlanJson {
        moves: moves
            .iter()
            .map(|&planned| MoveJson {
                text: planned.to_string(),
                planned,
            })
            .collect(),
    };
    serde_json::to_string_pretty(&plan).map_err(|e| e.to_string())
}

async fn plan(
    client: &AdminClient,
    request: &ClientRequest,
) -> Result<(Vec<PlannedMove>, Vec<MigrationId>), String> {
    match client.call(request).await {
        Ok(ClientResponse::Plan { moves, started }) => Ok((moves, started)),
        Ok(other) => Err(format!("unexpected answer: {other:?}")),
        Err(e) => Err(server_error(e)),
    }
}

pub async fn decommission(args: DecommissionArgs) -> Result<(), String> {
    let target = node_id(args.node, "NODE")?;
    let client = AdminClient::open(&args.client)?;
    let (moves, _) = plan(
        &client,
        &ClientRequest::Decommission {
            node: target,
            dry_run: args.dry_run,
        },
    )
    .await?;
    if args.dry_run {
        if args.json {
            println!("{}", plan_json(&moves)?);
        } else if moves.is_empty() {
            println!(
                "node {} holds no replicas; decommissioning it moves nothing",
                args.node
            );
        } else {
            for planned in &moves {
                println!("{planned}");
            }
        }
        return Ok(());
    }
    if args.no_wait {
        println!(
            "node {} is draining: {} replica move(s) to go; follow with `keel status`",
            args.node,
            moves.len()
        );
        return Ok(());
    }
    follow_decommission(&client, args.node, moves.len()).await
}

/// Follows a draining node until it has left the topology, printing each
/// of its replica moves as it ends.
async fn follow_decommission(
    client: &AdminClient,
    node: u64,
    planned: usize,
) -> Result<(), String> {
    let started = Instant::now();
    let bar = ProgressBar::new(planned as u64).with_style(
        ProgressStyle::with_template("{spinner} [{elapsed}] {pos}/{len} replica moves  {msg}")
            .map_err(|e| e.to_string())?,
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    bar.set_message(format!("node {node} draining"));
    // Rows complete before we started are history, not this decommission's.
    let mut known: BTreeSet<String> = BTreeSet::new();
    let mut first = true;
    let mut watch = Watch::new(Vec::new());
    let (mut done, mut aborted) = (0u64, 0u64);
    loop {
        let Some(status) = watch.status(client).await? else {
            tokio::time::sleep(POLL).await;
            continue;
        };
        if watch.prefer.is_empty() {
            watch.prefer = status
                .nodes
                .iter()
                .filter(|n| n.node.get() != node)
                .filter_map(|n| n.addr.parse().ok())
                .collect();
        }
        let off_node: Vec<&MigrationSummary> = status
            .migrations
            .iter()
            .filter(|m| {
                matches!(m.planned, Some(PlannedMove::Replica { source, .. }) if source.get() == node)
            })
            .collect();
        for row in &off_node {
            if known.insert(row.id.clone()) && !(first && row.complete) {
                watch.add(row.id.clone(), row.what.clone());
            }
        }
        first = false;
        for end in watch.observe(&status.migrations) {
            match end {
                Ended::Complete(row) => {
                    done += 1;
                    bar.inc(1);
                    bar.suspend(|| println!("done: {}, write pause {}", row.what, pause(&row)));
                }
                Ended::Aborted { what, last } => {
                    aborted += 1;
                    let phase = last.map_or(String::new(), |r| format!(" in phase {}", r.phase));
                    bar.suspend(|| {
                        println!("aborted: {what}{phase}; the coordinator plans it again")
                    });
                }
            }
        }
        if done > bar.length().unwrap_or(0) {
            bar.set_length(done);
        }
        let state = status
            .nodes
            .iter()
            .find(|n| n.node.get() == node)
            .map(|n| n.state.clone());
        match state.as_deref() {
            None | Some("decommissioned") => break,
            Some(state) => {
                let phases = watch.phases();
                bar.set_message(if phases.is_empty() {
                    format!("node {node} {state}")
                } else {
                    phases
                });
            }
        }
        tokio::time::sleep(POLL).await;
    }
    bar.finish_and_clear();
    let aborted = if aborted > 0 {
        format!(" ({aborted} aborted and retried)")
    } else {
        String::new()
    };
    println!(
        "node {node} decommissioned and removed in {:.1} s: {done} replica move(s){aborted}",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// keel rebalance
// ---------------------------------------------------------------------------

pub async fn rebalance(args: RebalanceArgs) -> Result<(), String> {
    let client = AdminClient::open(&args.client)?;
    if args.dry_run {
        let (moves, _) = plan(
            &client,
            &ClientRequest::Rebalance {
                dry_run: true,
                max_moves: args.max_moves,
            },
        )
        .await?;
        if args.json {
            println!("{}", plan_json(&moves)?);
        } else if moves.is_empty() {
            println!("nothing to do: the cluster is balanced");
        } else {
            for planned in &moves {
                println!("{planned}");
            }
        }
        return Ok(());
    }
    let started = Instant::now();
    let bar = ProgressBar::new(0).with_style(
        ProgressStyle::with_template("{spinner} [{elapsed}] {pos}/{len} moves  {msg}")
            .map_err(|e| e.to_string())?,
    );
    bar.enable_steady_tick(Duration::from_millis(100));
    let (mut done, mut aborted, mut futile) = (0u64, 0u64, 0u32);
    let mut rounds = 0;
    loop {
        rounds += 1;
        if rounds > MAX_ROUNDS {
            bar.finish_and_clear();
            return Err(format!(
                "the rebalancer still plans moves after {MAX_ROUNDS} rounds ({done} done); \
                 see `keel rebalance --dry-run` and the group-0 leader's log"
            ));
        }
        bar.set_message("planning");
        let (moves, ids) = plan(
            &client,
            &ClientRequest::Rebalance {
                dry_run: false,
                max_moves: args.max_moves,
            },
        )
        .await
        .inspect_err(|_| bar.finish_and_clear())?;
        if moves.is_empty() {
            break;
        }
        // Leadership moves commit at once; each other move started one
        // migration, in plan order.
        let (leaders, migrations): (Vec<PlannedMove>, Vec<PlannedMove>) = moves
            .iter()
            .partition(|m| matches!(m, PlannedMove::Leader { .. }));
        bar.inc_length((leaders.len() + ids.len()) as u64);
        for planned in &leaders {
            done += 1;
            bar.inc(1);
            bar.suspend(|| println!("done: {planned}"));
        }
        let mut watch = Watch::new(ids.iter().enumerate().map(|(i, id)| {
            let what = migrations
                .get(i)
                .map_or_else(|| format!("migration {id}"), |m| m.to_string());
            (id.to_string(), what)
        }));
        let mut completed_this_round = leaders.len();
        while !watch.is_done() {
            tokio::time::sleep(POLL).await;
            let ended = watch
                .poll(&client)
                .await
                .inspect_err(|_| bar.finish_and_clear())?;
            for end in ended {
                bar.inc(1);
                match end {
                    Ended::Complete(row) => {
                        done += 1;
                        completed_this_round += 1;
                        bar.suspend(|| println!("done: {}, write pause {}", row.what, pause(&row)));
                    }
                    Ended::Aborted { what, last } => {
                        aborted += 1;
                        let phase =
                            last.map_or(String::new(), |r| format!(" in phase {}", r.phase));
                        bar.suspend(|| println!("aborted: {what}{phase}"));
                    }
                }
            }
            bar.set_message(watch.phases());
        }
        if completed_this_round == 0 {
            futile += 1;
            if futile >= MAX_FUTILE_ROUNDS {
                bar.finish_and_clear();
                return Err(format!(
                    "every move of the last {MAX_FUTILE_ROUNDS} rounds aborted ({aborted} in all); \
                     the reasons are in the group-0 leader's log (node.log, RUST_LOG=info)"
                ));
            }
        } else {
            futile = 0;
        }
    }
    bar.finish_and_clear();
    let aborted = if aborted > 0 {
        format!(", {aborted} aborted")
    } else {
        String::new()
    };
    if done == 0 && aborted.is_empty() {
        println!("nothing to do: the cluster is balanced");
    } else {
        println!(
            "balanced in {:.1} s: {done} move(s) done{aborted}",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(what: &str, complete: bool, updated_ms: u64) -> MigrationSummary {
        MigrationSummary {
            id: format!("id-{updated_ms}"),
            planned: None,
            what: what.into(),
            phase: if complete { "Complete" } else { "Copy" }.into(),
            attempt: 1,
            complete,
            write_pause_us: complete.then_some(1_500),
            updated_ms,
        }
    }

    #[test]
    fn a_vanished_row_is_an_abort_and_a_complete_one_ends() {
        let mut watch = Watch::new([
            ("a".to_owned(), "move a".to_owned()),
            ("b".to_owned(), "move b".to_owned()),
        ]);
        let mut a = row("move a", false, 1);
        a.id = "a".into();
        let mut b = row("move b", false, 2);
        b.id = "b".into();
        assert!(watch.observe(&[a.clone(), b.clone()]).is_empty());
        b.complete = true;
        let ended = watch.observe(&[b]);
        assert!(
            matches!(ended.as_slice(), [Ended::Aborted { what, last: Some(_) }, Ended::Complete(r)]
            if what == "move a" && r.id == "b")
        );
        assert!(watch.is_done());
    }
}
