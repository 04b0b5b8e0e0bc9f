//! `keel-etcd-bench`: measures a fresh local 3-member etcd cluster with the
//! load driver of `keel bench` (`keel::cli::bench::load`), so that the two
//! systems are driven by the same closed-loop clients and their latencies
//! counted the same way. `scripts/bench.sh` runs it right after `keel bench`
//! and passes `--compare` the JSON file that `keel bench --json` wrote.
//!
//! etcd runs with its default settings (fsync on every commit), each member
//! with its own data directory under one temporary directory, on loopback:
//! client ports `--client-port`..+2, peer ports `--peer-port`..+2. The
//! members are killed and the directory removed at the end, also on an error
//! or Ctrl-C.
//!
//! The requests, as in `keel bench`:
//! - write: put `load::key(client, seq)` = `load::value()`;
//! - read: linearizable get of the same key (etcd's default,
//!   `serializable = false`: a ReadIndex round through the leader);
//! - meta: put `meta/{client}` = `load::value()` (etcd is itself a metadata
//!   store: its metadata commit is a put).
//!
//! With `--route spread` (the default, as in `keel bench`) client `i` talks
//! to member `i mod 3`, as keel's client `i` talks to node `i mod n`; with
//! `--route leader` every client talks to the member that leads when the
//! runs start, asked with etcd's status call, so that no request is
//! forwarded. Every member has `--conns` gRPC channels (default 1: one
//! HTTP/2 connection carrying all of that member's clients' requests
//! concurrently, as keel's admin client carries them over one QUIC
//! connection per node); a member's clients take its channels in turn.

use clap::Parser;
use etcd_client::{Client, ConnectOptions, KvClient};
use keel::cli::bench::load::{self, LoadResult, Op, Target};
use keel::cli::bench::Route;
use serde::Serialize;
use std::fmt::Write as _;
use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

/// Members of the etcd cluster.
const MEMBERS: usize = 3;
/// The per-request timeout; keel's admin client uses the same 5 s.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the members may take to elect a leader and serve a read.
const HEALTHY_WITHIN: Duration = Duration::from_secs(60);

#[derive(Parser, Debug)]
#[command(
    name = "keel-etcd-bench",
    about = "Measure a local 3-member etcd cluster with keel bench's load driver"
)]
struct Args {
    /// What the load runs measure.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Op::Write, Op::Read, Op::Meta])]
    ops: Vec<Op>,
    /// Concurrent clients of each load run.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 16, 64, 256])]
    clients: Vec<usize>,
    /// How long each load run measures (after a warm-up of a fifth of it).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Also write every figure as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    /// A `keel bench --json` file: also print keel and etcd side by side.
    #[arg(long, value_name = "KEEL_JSON")]
    compare: Option<PathBuf>,
    /// The etcd binary.
    #[arg(long, default_value = "etcd")]
    etcd: PathBuf,
    /// Where each client sends its requests: `spread`, client `i` to
    /// member `i mod 3`; `leader`, to the leader member.
    #[arg(long, value_enum, default_value_t = Route::Spread)]
    route: Route,
    /// gRPC channels (HTTP/2 connections) to each member.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    conns: u64,
    /// Member N's client port is CLIENT_PORT + N.
    #[arg(long, default_value_t = 23790)]
    client_port: u16,
    /// Member N's peer port is PEER_PORT + N.
    #[arg(long, default_value_t = 23800)]
    peer_port: u16,
    /// The members' parent directory; it must not exist (default: a fresh
    /// one under the system's temporary directory).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// Keep the data directories and member logs afterwards.
    #[arg(long)]
    keep: bool,
}

fn main() {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("keel-etcd-bench: cannot start the runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(bench(args));
    // Closes the gRPC channels before the process ends.
    drop(runtime);
    if let Err(e) = result {
        eprintln!("keel-etcd-bench: {e}");
        std::process::exit(1);
    }
}

async fn bench(args: Args) -> Result<(), String> {
    // Read first: a bad --compare file should not cost a whole run.
    let keel = match &args.compare {
        Some(path) => Some(read_keel_report(path)?),
        None => None,
    };
    let dir = args.dir.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("keel-etcd-bench-{}", std::process::id()))
    });
    if dir.exists() {
        return Err(format!(
            "{} exists; keel-etcd-bench starts a fresh cluster, so pick a new --dir",
            dir.display()
        ));
    }
    let version = etcd_version(&args.etcd)?;
    let results = measure(&args, &dir, &version).await;
    if args.keep {
        println!("etcd's data and logs are in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    let results = results?;
    if let Some(path) = &args.json {
        let report = EtcdReport {
            system: "etcd",
            version: &version,
            nodes: MEMBERS,
            conns_per_member: args.conns,
            load: &results,
        };
        let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, text).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if let Some(keel) = &keel {
        println!("\n{}", compare(keel, &results));
    }
    Ok(())
}

/// What `--json` writes: the shape of keel's `BenchReport` (`nodes`, `load`)
/// plus what was measured.
#[derive(Serialize)]
struct EtcdReport<'a> {
    system: &'static str,
    version: &'a str,
    nodes: usize,
    conns_per_member: u64,
    load: &'a [LoadResult],
}

/// Starts the cluster in `dir`, measures it, and stops it again, whatever
/// happens (the caller removes `dir`).
async fn measure(args: &Args, dir: &Path, version: &str) -> Result<Vec<LoadResult>, String> {
    // Dropped on every path out of here: kills the members.
    let mut cluster = EtcdCluster::start(args, dir)?;
    println!(
        "etcd {version}: {MEMBERS} members on 127.0.0.1, client ports {}-{}, data in {}",
        args.client_port,
        args.client_port + MEMBERS as u16 - 1,
        dir.display()
    );
    tokio::select! {
        result = run(args, &mut cluster) => result,
        signal = interrupted() => Err(format!("{signal}; stopping etcd")),
    }
}

/// Waits for SIGINT or SIGTERM; the caller then stops the cluster.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut int), Ok(mut term)) = (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) else {
        // No handler could be installed: never report a signal.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = int.recv() => "interrupted",
        _ = term.recv() => "terminated",
    }
}

async fn run(args: &Args, cluster: &mut EtcdCluster) -> Result<Vec<LoadResult>, String> {
    cluster.wait_healthy().await?;
    let target = Arc::new(EtcdTarget::connect(cluster, args.conns, args.route).await?);
    // A member that died mid-run would make every later figure a lie.
    load::sweep(target, &args.ops, &args.clients, args.duration, || {
        cluster.check_running()
    })
    .await
}

/// `etcd --version`'s first line's version, e.g. "3.4.23".
fn etcd_version(etcd: &Path) -> Result<String, String> {
    let output = Command::new(etcd).arg("--version").output().map_err(|e| {
        format!(
            "cannot run {}: {e} (install etcd, e.g. `apt-get install etcd-server`, or pass --etcd)",
            etcd.display()
        )
    })?;
    let text = String::from_utf8_lossy(&output.stdout);
    Ok(text
        .lines()
        .find_map(|line| line.strip_prefix("etcd Version:"))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| "unknown".into()))
}

/// The members' processes; dropping it kills them.
struct EtcdCluster {
    members: Vec<Member>,
}

struct Member {
    name: String,
    client_url: String,
    log: PathBuf,
    child: Child,
}

impl EtcdCluster {
    fn start(args: &Args, dir: &Path) -> Result<Self, String> {
        let ports = |base: u16| -> Result<Vec<u16>, String> {
            (0..MEMBERS as u16)
                .map(|n| {
                    base.checked_add(n)
                        .ok_or_else(|| format!("port {base} + {n} is out of range"))
                })
                .collect()
        };
        let (client_ports, peer_ports) = (ports(args.client_port)?, ports(args.peer_port)?);
        // etcd would only say so in its log; say it before starting anything.
        for &port in client_ports.iter().chain(&peer_ports) {
            TcpListener::bind(("127.0.0.1", port))
                .map_err(|e| format!("127.0.0.1:{port} is not free: {e}"))?;
        }
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let name = |n: usize| format!("m{n}");
        let initial_cluster = (0..MEMBERS)
            .map(|n| format!("{}=http://127.0.0.1:{}", name(n), peer_ports[n]))
            .collect::<Vec<_>>()
            .join(",");
        let token = format!("keel-etcd-bench-{}", std::process::id());
        let mut cluster = EtcdCluster {
            members: Vec::new(),
        };
        for n in 0..MEMBERS {
            let client_url = format!("http://127.0.0.1:{}", client_ports[n]);
            let peer_url = format!("http://127.0.0.1:{}", peer_ports[n]);
            let log = dir.join(format!("{}.log", name(n)));
            let out =
                File::create(&log).map_err(|e| format!("cannot create {}: {e}", log.display()))?;
            let err = out.try_clone().map_err(|e| e.to_string())?;
            let child = Command::new(&args.etcd)
                .arg("--name")
                .arg(name(n))
                .arg("--data-dir")
                .arg(dir.join(format!("{}.etcd", name(n))))
                .args(["--listen-client-urls", &client_url])
                .args(["--advertise-client-urls", &client_url])
                .args(["--listen-peer-urls", &peer_url])
                .args(["--initial-advertise-peer-urls", &peer_url])
                .args(["--initial-cluster", &initial_cluster])
                .args(["--initial-cluster-token", &token])
                .args(["--initial-cluster-state", "new"])
                // Not the ETCD_* environment of whoever runs this: the
                // flags above are the whole configuration.
                .env_clear()
                .env("PATH", std::env::var_os("PATH").unwrap_or_default())
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", args.etcd.display()))?;
            cluster.members.push(Member {
                name: name(n),
                client_url,
                log,
                child,
            });
        }
        Ok(cluster)
    }

    /// An error naming the first member that has exited, with its log's end.
    fn check_running(&mut self) -> Result<(), String> {
        for member in &mut self.members {
            if let Ok(Some(status)) = member.child.try_wait() {
                return Err(format!(
                    "etcd member {} exited ({status}); the end of {}:\n{}",
                    member.name,
                    member.log.display(),
                    log_tail(&member.log)
                ));
            }
        }
        Ok(())
    }

    /// Waits until every member answers a linearizable get (as `etcdctl
    /// endpoint health` checks): the cluster has a leader that all reach.
    async fn wait_healthy(&mut self) -> Result<(), String> {
        let options = ConnectOptions::new()
            .with_timeout(Duration::from_secs(2))
            .with_connect_timeout(Duration::from_secs(2));
        let deadline = tokio::time::Instant::now() + HEALTHY_WITHIN;
        for n in 0..self.members.len() {
            let url = self.members[n].client_url.clone();
            loop {
                self.check_running()?;
                let answer = match Client::connect([&url], Some(options.clone())).await {
                    Ok(mut client) => client.get("health", None).await.map(|_| ()),
                    Err(e) => Err(e),
                };
                let Err(e) = answer else { break };
                if tokio::time::Instant::now() >= deadline {
                    return Err(format!(
                        "etcd member {} at {url} was not healthy within {HEALTHY_WITHIN:?}: {e}; the end of {}:\n{}",
                        self.members[n].name,
                        self.members[n].log.display(),
                        log_tail(&self.members[n].log)
                    ));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for member in &mut self.members {
            let _ = member.child.kill();
        }
        for member in &mut self.members {
            let _ = member.child.wait();
        }
    }
}

/// The last lines of a member's log, for an error message.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// etcd as a [`Target`]: `channels[member][conn]`, and with
/// [`Route::Leader`] the leader member every client uses.
struct EtcdTarget {
    channels: Vec<Vec<KvClient>>,
    leader: Option<usize>,
}

impl EtcdTarget {
    async fn connect(cluster: &EtcdCluster, conns: u64, route: Route) -> Result<Self, String> {
        let options = ConnectOptions::new()
            .with_timeout(REQUEST_TIMEOUT)
            .with_connect_timeout(REQUEST_TIMEOUT);
        let mut channels = Vec::new();
        let mut leader = None;
        for (n, member) in cluster.members.iter().enumerate() {
            let mut member_channels = Vec::new();
            let mut last = None;
            for _ in 0..conns {
                // One Client per channel: etcd-client balances a Client's
                // requests over its endpoints, and this one has one endpoint.
                let client = Client::connect([&member.client_url], Some(options.clone()))
                    .await
                    .map_err(|e| format!("cannot connect to {}: {e}", member.client_url))?;
                member_channels.push(client.kv_client());
                last = Some(client);
            }
            channels.push(member_channels);
            if let (Route::Leader, None, Some(mut client)) = (route, leader, last) {
                // A member is the leader if the leader it names is itself.
                let status = client
                    .status()
                    .await
                    .map_err(|e| format!("cannot ask {} its status: {e}", member.client_url))?;
                if status.header().map(|h| h.member_id()) == Some(status.leader()) {
                    leader = Some(n);
                }
            }
        }
        if route == Route::Leader && leader.is_none() {
            return Err("no etcd member reported itself as the leader".into());
        }
        Ok(EtcdTarget { channels, leader })
    }

    /// Client `client`'s channel, cloned: `KvClient`'s calls take `&mut self`,
    /// and a clone shares the channel (the HTTP/2 connection).
    fn kv(&self, client: usize) -> KvClient {
        let (member, conn) = place(
            client,
            self.leader,
            self.channels.len(),
            self.channels[0].len(),
        );
        self.channels[member][conn].clone()
    }
}

/// Client `client`'s member and channel: the leader if every client goes
/// there, else member `client mod members`, as in `keel bench`; then that
/// member's channels in turn.
fn place(client: usize, leader: Option<usize>, members: usize, conns: usize) -> (usize, usize) {
    match leader {
        Some(leader) => (leader, client % conns),
        None => (client % members, (client / members) % conns),
    }
}

impl Target for EtcdTarget {
    async fn request(&self, op: Op, client: usize, seq: u64) -> Result<(), String> {
        let mut kv = self.kv(client);
        let result = match op {
            Op::Write => kv
                .put(load::key(client, seq), load::value(), None)
                .await
                .map(|_| ()),
            // GetOptions' default is a linearizable read (serializable = false).
            Op::Read => kv.get(load::key(client, seq), None).await.map(|_| ()),
            Op::Meta => kv
                .put(format!("meta/{client}"), load::value(), None)
                .await
                .map(|_| ()),
        };
        result.map_err(|e| e.to_string())
    }
}

/// One row of a `keel bench --json` file's `load`.
struct KeelRow {
    op: String,
    clients: u64,
    ops_per_s: f64,
    p99_ms: f64,
    errors: u64,
}

/// The `load` rows of a `keel bench --json` file (`BenchReport`, which is
/// only `Serialize`, so it is read field by field).
fn read_keel_report(path: &Path) -> Result<Vec<KeelRow>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let report: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
    let bad = |what: &str| format!("{} is not a keel bench report: {what}", path.display());
    let rows = report
        .get("load")
        .and_then(|l| l.as_array())
        .ok_or_else(|| bad("no \"load\" array"))?;
    rows.iter()
        .map(|row| {
            let field = |name: &str| row.get(name).ok_or_else(|| bad(&format!("no {name:?}")));
            Ok(KeelRow {
                op: field("op")?
                    .as_str()
                    .ok_or_else(|| bad("\"op\" is not a string"))?
                    .to_string(),
                clients: field("clients")?
                    .as_u64()
                    .ok_or_else(|| bad("\"clients\" is not a count"))?,
                ops_per_s: field("ops_per_s")?.as_f64().unwrap_or(f64::NAN),
                p99_ms: field("p99_ms")?.as_f64().unwrap_or(f64::NAN),
                errors: field("errors")?.as_u64().unwrap_or(0),
            })
        })
        .collect()
}

/// The op's name as `keel bench --json` writes it.
fn op_name(op: Op) -> &'static str {
    match op {
        Op::Write => "write",
        Op::Read => "read",
        Op::Meta => "meta",
    }
}

/// keel's and etcd's figures side by side, in etcd's run order; a run that
/// only one of them made shows "-" for the other.
fn compare(keel: &[KeelRow], etcd: &[LoadResult]) -> String {
    let mut out = format!(
        "{:<8}{:>8}{:>14}{:>14}{:>12}{:>12}{:>12}",
        "op", "clients", "keel ops/s", "etcd ops/s", "keel/etcd", "keel p99", "etcd p99"
    );
    let mut errors = Vec::new();
    let mut rows: Vec<(&str, u64, Option<&KeelRow>, Option<&LoadResult>)> = etcd
        .iter()
        .map(|e| {
            let name = op_name(e.op);
            let clients = e.clients as u64;
            let k = keel.iter().find(|k| k.op == name && k.clients == clients);
            (name, clients, k, Some(e))
        })
        .collect();
    for k in keel {
        if !rows
            .iter()
            .any(|(op, c, _, _)| *op == k.op && *c == k.clients)
        {
            rows.push((&k.op, k.clients, Some(k), None));
        }
    }
    for (op, clients, k, e) in rows {
        let num = |v: Option<f64>, precision: usize| match v {
            Some(v) => format!("{v:.precision$}"),
            None => "-".into(),
        };
        let ratio = match (k, e) {
            (Some(k), Some(e)) if e.ops_per_s > 0.0 => Some(k.ops_per_s / e.ops_per_s),
            _ => None,
        };
        let _ = write!(
            out,
            "\n{op:<8}{clients:>8}{:>14}{:>14}{:>12}{:>12}{:>12}",
            num(k.map(|k| k.ops_per_s), 0),
            num(e.map(|e| e.ops_per_s), 0),
            num(ratio, 2),
            num(k.map(|k| k.p99_ms), 2),
            num(e.map(|e| e.p99_ms), 2),
        );
        if let Some(k) = k.filter(|k| k.errors > 0) {
            errors.push(format!("keel {op} x{clients}: {} errors", k.errors));
        }
        if let Some(e) = e.filter(|e| e.errors > 0) {
            errors.push(format!("etcd {op} x{clients}: {} errors", e.errors));
        }
    }
    out.push_str("\n(p99 in ms; ratio > 1: keel has the higher throughput)");
    for e in errors {
        let _ = write!(out, "\nnote: {e}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn etcd_row(op: Op, clients: usize, ops_per_s: f64) -> LoadResult {
        LoadResult {
            op,
            clients,
            ok: 1,
            errors: 0,
            first_error: None,
            measured_s: 1.0,
            ops_per_s,
            p50_ms: 1.0,
            p99_ms: 2.5,
            p999_ms: 3.0,
            max_ms: 4.0,
        }
    }

    #[test]
    fn reads_what_keel_bench_writes_and_compares() {
        // The shape of keel's BenchReport, serialized by keel's own types.
        let keel_result = etcd_row(Op::Write, 16, 3000.0);
        let report = serde_json::json!({
            "nodes": 3,
            "load": [keel_result, etcd_row(Op::Meta, 1, 10.0)],
            "moves": null,
            "failover": null,
        });
        let path =
            std::env::temp_dir().join(format!("keel-etcd-bench-test-{}.json", std::process::id()));
        std::fs::write(&path, report.to_string()).unwrap();
        let keel = read_keel_report(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(keel.len(), 2);
        assert_eq!((keel[0].op.as_str(), keel[0].clients), ("write", 16));

        let table = compare(
            &keel,
            &[etcd_row(Op::Write, 16, 1500.0), etcd_row(Op::Read, 1, 7.0)],
        );
        let lines: Vec<&str> = table.lines().collect();
        assert!(
            lines[1].starts_with("write") && lines[1].contains("2.00"),
            "{table}"
        );
        assert!(
            lines[2].starts_with("read") && lines[2].contains(" - "),
            "{table}"
        );
        assert!(lines[3].starts_with("meta"), "{table}");
    }

    #[test]
    fn clients_spread_over_members_then_channels() {
        assert_eq!(place(0, None, 3, 1), (0, 0));
        assert_eq!(place(4, None, 3, 1), (1, 0));
        assert_eq!(place(0, None, 3, 2), (0, 0));
        assert_eq!(place(1, None, 3, 2), (1, 0));
        assert_eq!(place(3, None, 3, 2), (0, 1));
        assert_eq!(place(6, None, 3, 2), (0, 0));
    }

    #[test]
    fn routed_clients_share_the_leaders_channels() {
        assert_eq!(place(0, Some(2), 3, 1), (2, 0));
        assert_eq!(place(4, Some(2), 3, 1), (2, 0));
        assert_eq!(place(1, Some(1), 3, 2), (1, 1));
        assert_eq!(place(2, Some(1), 3, 2), (1, 0));
    }
}
