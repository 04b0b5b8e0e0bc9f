//! `keel bench`: starts a fresh local cluster (real processes, QUIC + mutual
//! TLS, redb with fsync) and measures it: closed-loop throughput and
//! latency percentiles of key-value writes, linearizable reads and metadata
//! commits at several client counts; the write pause of repeated vShard and
//! replica moves; and failover, the time from SIGKILL of the group-0 leader
//! to the next committed metadata write. The cluster is removed afterwards
//! unless `--keep`. `scripts/bench.sh` runs it next to etcd.

pub mod load;
mod moves;

use crate::cli::client::AdminClient;
use crate::cli::routes::Router;
use crate::cli::up::{LocalCluster, UpArgs};
use crate::core::ids::{GroupId, VShardId};
use crate::core::kv::KvCommand;
use crate::node::service::{ClientRequest, ClientResponse};
use load::{LoadResult, Op, Target};
use serde::Serialize;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Nodes in the cluster; replica moves need at least 4.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=7))]
    pub nodes: u64,
    /// The cluster directory; it must not exist (default: a fresh one under
    /// the system's temporary directory).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Keep the cluster directory (data and node logs) afterwards.
    #[arg(long)]
    pub keep: bool,
    /// Node N listens on UDP port BASE_PORT + N - 1.
    #[arg(long, default_value_t = 7301)]
    pub base_port: u16,
    /// Data groups.
    #[arg(long, default_value_t = 8)]
    pub data_groups: u64,
    /// What the load runs measure.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Op::Write, Op::Read, Op::Meta])]
    pub ops: Vec<Op>,
    /// Concurrent clients of each load run.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 16, 64, 256])]
    pub clients: Vec<usize>,
    /// How long each load run measures (after a warm-up of a fifth of it).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// vShard moves, and as many replica moves (4+ nodes), to time.
    #[arg(long, default_value_t = 0)]
    pub moves: usize,
    /// Kills of the group-0 leader to time.
    #[arg(long, default_value_t = 0)]
    pub failovers: usize,
    /// Where each client sends its requests: `spread`, client `i` to node
    /// `i mod n`, which forwards to the leader; `leader`, to the leader of
    /// the group it addresses, as a routing client would. On one small
    /// machine `leader` is faster at 64 clients and slower at 256, where the
    /// leader's node then serves every client alone (docs/PERFORMANCE.md).
    #[arg(long, value_enum, default_value_t = Route::Spread)]
    pub route: Route,
    /// Also write every figure as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// How bench clients pick the node to send a request to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Route {
    /// To the group's leader, as routes refreshed in the background name it.
    Leader,
    /// Client `i` to node `i mod n`.
    Spread,
}

/// Every figure of one `keel bench` run.
#[derive(Debug, Default, Serialize)]
pub struct BenchReport {
    pub nodes: u64,
    pub load: Vec<LoadResult>,
    pub moves: Option<moves::MoveReport>,
    pub failover: Option<moves::FailoverReport>,
}

pub async fn bench(args: BenchArgs) -> Result<(), String> {
    let dir = args
        .dir
        .clone()
        .unwrap_or_else(|| std::env::temp_dir().join(format!("keel-bench-{}", std::process::id())));
    if dir.exists() {
        return Err(format!(
            "{} exists; keel bench starts a fresh cluster, so pick a new --dir",
            dir.display()
        ));
    }
    let up = UpArgs {
        nodes: args.nodes,
        dir: dir.clone(),
        base_port: args.base_port,
        data_groups: args.data_groups,
        replication_factor: 3,
    };
    let result = run(&args, &up).await;
    if args.keep {
        println!("the cluster's data and logs are in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let report = result?;
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

async fn run(args: &BenchArgs, up: &UpArgs) -> Result<BenchReport, String> {
    let mut cluster = LocalCluster::start(up).await?;
    let mut report = BenchReport {
        nodes: args.nodes,
        ..BenchReport::default()
    };
    let target = Arc::new(KeelTarget::new(&cluster, args.route).await?);
    report.load = load::sweep(
        Arc::clone(&target),
        &args.ops,
        &args.clients,
        args.duration,
        || Ok(()),
    )
    .await?;
    if args.moves > 0 {
        report.moves = Some(moves::time_moves(&cluster, &target, args.moves).await?);
    }
    if args.failovers > 0 {
        report.failover =
            Some(moves::time_failovers(&mut cluster, up.replication_factor, args.failovers).await?);
    }
    Ok(report)
}

/// keel as a [`Target`]: client `i` sends to node `i mod n`, which forwards
/// to the leader as any client's node would, or with [`Route::Leader`] each
/// request goes to its group's leader.
pub struct KeelTarget {
    client: AdminClient,
    addrs: Vec<SocketAddr>,
    router: Option<Arc<Router>>,
}

impl KeelTarget {
    async fn new(cluster: &LocalCluster, route: Route) -> Result<Self, String> {
        let client = cluster.client()?;
        let router = match route {
            Route::Leader => Some(Router::new(client.clone()).await?),
            Route::Spread => None,
        };
        let addrs = client
            .dir()
            .load_addresses()
            .map_err(|e| e.to_string())?
            .into_values()
            .collect::<Vec<_>>();
        if addrs.is_empty() {
            return Err("the cluster directory lists no node addresses".into());
        }
        Ok(KeelTarget {
            client,
            addrs,
            router,
        })
    }

    /// The node client `client` sends `request` to: the leader of the group
    /// it addresses if known, else its own node of the spread.
    fn addr(&self, client: usize, request: &ClientRequest) -> SocketAddr {
        let spread = self.addrs[client % self.addrs.len()];
        let Some(router) = &self.router else {
            return spread;
        };
        let routes = router.routes();
        let leader = match request {
            ClientRequest::Kv(command) => routes.leader_for(command.vshard()),
            ClientRequest::Get { key, .. } => routes.leader_for(VShardId::for_key(key)),
            ClientRequest::Ddl { .. } => routes.leader_of(GroupId::METADATA),
            _ => None,
        };
        leader.unwrap_or(spread)
    }

    async fn call(&self, client: usize, request: &ClientRequest) -> Result<ClientResponse, String> {
        let result = self
            .client
            .call_at(self.addr(client, request), request)
            .await;
        if let (Err(_), Some(router)) = (&result, &self.router) {
            router.refresh();
        }
        match result {
            Ok(ClientResponse::Error(e)) => Err(e.to_string()),
            Ok(response) => Ok(response),
            Err(e) => Err(e.to_string()),
        }
    }
}

impl Target for KeelTarget {
    async fn request(&self, op: Op, client: usize, seq: u64) -> Result<(), String> {
        let request = match op {
            Op::Write => ClientRequest::Kv(KvCommand::Put {
                key: load::key(client, seq),
                value: load::value(),
            }),
            Op::Read => ClientRequest::Get {
                key: load::key(client, seq),
                linearizable: true,
            },
            Op::Meta => ClientRequest::Ddl {
                payload: load::value(),
            },
        };
        match self.call(client, &request).await? {
            ClientResponse::Kv(crate::core::kv::KvResponse::Error(e)) => Err(e),
            ClientResponse::Kv(_) | ClientResponse::Done => Ok(()),
            other => Err(format!("unexpected answer: {other:?}")),
        }
    }
}
