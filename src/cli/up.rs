//! `keel up`: a local cluster on 127.0.0.1 with real QUIC + mutual TLS and
//! redb, each node its own `keel node start` process.
//!
//! The first run writes a `node.toml` per node into the cluster directory,
//! starts node 1 (which bootstraps and writes the admin credential), then
//! joins the others one by one with fresh join tokens. Later runs restart
//! the same nodes from their data. `keel up` stays in the foreground and
//! stops its nodes on Ctrl-C (a kill: keel recovers from crashes by design,
//! and the next `keel up` restarts them).

use crate::cli::client::{AdminClient, ClientArgs};
use crate::cli::status;
use crate::daemon::cluster_dir::ClusterDir;
use crate::daemon::config::{BootstrapSection, NodeFile};
use crate::node::service::{ClientRequest, ClientResponse};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// How long `keel up` waits for the cluster to become healthy.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(clap::Args, Debug)]
pub struct UpArgs {
    /// Nodes in a new cluster (ignored when restarting one).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=7))]
    pub nodes: u64,
    /// The cluster directory: node directories, admin credential, addresses.
    #[arg(long, default_value = crate::daemon::cluster_dir::DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Node N listens on UDP port BASE_PORT + N - 1.
    #[arg(long, default_value_t = 7101)]
    pub base_port: u16,
    /// Data groups of a new cluster.
    #[arg(long, default_value_t = 8)]
    pub data_groups: u64,
    /// Replicas per data group of a new cluster.
    #[arg(long, default_value_t = 3)]
    pub replication_factor: usize,
}

/// One node process `keel up` started.
struct Running {
    node: u64,
    child: Child,
}

fn spawn_node(dir: &ClusterDir, node: u64, token: Option<&str>) -> Result<Running, String> {
    let node_dir = dir.node_dir(node);
    let log_path = node_dir.join("node.log");
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
    let exe = std::env::current_exe().map_err(|e| format!("cannot find the keel binary: {e}"))?;
    let mut command = Command::new(exe);
    command
        .args(["node", "start", "--config"])
        .arg(node_dir.join("node.toml"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(|e| e.to_string())?)
        .stderr(log);
    if let Some(token) = token {
        // Through the environment, so the token does not show in `ps`.
        command.env("KEEL_JOIN_TOKEN", token);
    }
    let child = command
        .spawn()
        .map_err(|e| format!("cannot start node {node}: {e}"))?;
    fs::write(node_dir.join("pid"), child.id().to_string())
        .map_err(|e| format!("cannot write node {node}'s pid file: {e}"))?;
    Ok(Running { node, child })
}

fn write_node_file(dir: &ClusterDir, node: u64, args: &UpArgs) -> Result<(), String> {
    let addr = |n: u64| -> Result<SocketAddr, String> {
        let port = u64::from(args.base_port) + n - 1;
        let port = u16::try_from(port).map_err(|_| format!("port {port} is out of range"))?;
        Ok(SocketAddr::from(([127, 0, 0, 1], port)))
    };
    let file = NodeFile {
        data_dir: "data".into(),
        listen: addr(node)?,
        advertise: None,
        join: (1..node).map(addr).collect::<Result<_, _>>()?,
        cluster_dir: Some("..".into()),
        tick_ms: 100,
        bootstrap: (node == 1).then_some(BootstrapSection {
            data_groups: args.data_groups,
            replication_factor: args.replication_factor,
        }),
    };
    let node_dir = dir.node_dir(node);
    fs::create_dir_all(&node_dir)
        .map_err(|e| format!("cannot create {}: {e}", node_dir.display()))?;
    let text = file.to_toml().map_err(|e| e.to_string())?;
    fs::write(node_dir.join("node.toml"), text).map_err(|e| e.to_string())
}

/// The nodes of an existing cluster directory, from its `node-<id>` folders.
fn existing_nodes(root: &Path) -> Result<Vec<u64>, String> {
    let entries = fs::read_dir(root).map_err(|e| format!("cannot read {}: {e}", root.display()))?;
    let mut nodes: Vec<u64> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str()?.strip_prefix("node-")?.parse().ok())
        .filter(|n| root.join(format!("node-{n}/node.toml")).exists())
        .collect();
    nodes.sort_unstable();
    Ok(nodes)
}

/// Polls `check` every 200 ms with a spinner until it says done.
async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<(), String>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool, String>>,
{
    let bar = indicatif::ProgressBar::new_spinner().with_message(what.to_owned());
    let deadline = tokio::time::Instant::now() + timeout;
    let mut last = String::new();
    loop {
        bar.tick();
        match check().await {
            Ok(true) => {
                bar.finish_and_clear();
                return Ok(());
            }
            Ok(false) => {}
            Err(e) => last = e,
        }
        if tokio::time::Instant::now() >= deadline {
            bar.finish_and_clear();
            return Err(format!(
                "timed out waiting: {what} ({last}); see the node.log files under the cluster directory"
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn client(dir: &Path) -> Result<AdminClient, String> {
    AdminClient::open(&ClientArgs {
        dir: dir.to_path_buf(),
        addr: Vec::new(),
        timeout: Duration::from_secs(5),
    })
}

/// Whether the cluster has `nodes` active nodes, a leader in every group,
/// and every group at its replication factor (or the node count).
async fn healthy(dir: &Path, nodes: usize, rf: usize) -> Result<bool, String> {
    let report = status::report(&client(dir)?).await?;
    let replicated = report
        .groups
        .iter()
        .all(|g| g.group == 0 || g.voters.len() >= rf.min(nodes));
    Ok(report.healthy && report.nodes.len() == nodes && replicated)
}

pub async fn up(args: UpArgs) -> Result<(), String> {
    let mut cluster = LocalCluster::start(&args).await?;
    let dir = &cluster.dir;
    let flag = if dir.root() == Path::new(crate::daemon::cluster_dir::DEFAULT_DIR) {
        String::new()
    } else {
        format!(" --dir {}", dir.root().display())
    };
    println!(
        "\nkeel is up: {} nodes on 127.0.0.1, data and logs in {}.\n\
         Try, from another terminal:\n  keel status{flag}\n  keel kv put{flag} hello world\n  keel kv get{flag} hello\n  keel token issue{flag}   (to join another node)\n\
         Ctrl-C stops the cluster; `keel up{flag}` restarts it with its data.",
        cluster.running.len(),
        dir.root().display()
    );
    cluster.watch().await;
    println!("stopping {} nodes", cluster.running.len());
    Ok(())
}

/// The node processes of a local cluster; dropping it kills them (keel
/// recovers from crashes by design).
pub struct LocalCluster {
    dir: ClusterDir,
    running: Vec<Running>,
}

impl LocalCluster {
    /// Creates the cluster `args` describes, or restarts the one in
    /// `args.dir`, and waits until it is healthy; prints its status.
    pub async fn start(args: &UpArgs) -> Result<Self, String> {
        let mut cluster = LocalCluster {
            dir: ClusterDir::new(&args.dir),
            running: Vec::new(),
        };
        start_cluster(args, &cluster.dir, &mut cluster.running).await?;
        Ok(cluster)
    }

    /// An admin client of the cluster.
    pub fn client(&self) -> Result<AdminClient, String> {
        client(self.dir.root())
    }

    /// SIGKILLs node `node`'s process.
    pub fn kill(&mut self, node: u64) -> Result<(), String> {
        let position = self
            .running
            .iter()
            .position(|r| r.node == node)
            .ok_or_else(|| format!("node {node} is not running"))?;
        let mut r = self.running.swap_remove(position);
        r.child
            .kill()
            .map_err(|e| format!("cannot kill node {node}: {e}"))?;
        let _ = r.child.wait();
        Ok(())
    }

    /// Starts node `node` again from its data.
    pub fn restart(&mut self, node: u64) -> Result<(), String> {
        self.running.push(spawn_node(&self.dir, node, None)?);
        Ok(())
    }

    /// Waits until every node is back, every group has a leader and its
    /// replicas.
    pub async fn wait_healthy(&self, rf: usize) -> Result<(), String> {
        let nodes = self.running.len();
        wait_for("the cluster becomes healthy", READY_TIMEOUT, || {
            healthy(self.dir.root(), nodes, rf)
        })
        .await
    }

    /// Waits for Ctrl-C, reporting any node process that exits meanwhile.
    async fn watch(&mut self) {
        let mut reported = std::collections::BTreeSet::new();
        loop {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            for r in self.running.iter_mut() {
                if let Ok(Some(status)) = r.child.try_wait() {
                    if reported.insert(r.node) {
                        eprintln!(
                            "node {} exited ({status}); see {}",
                            r.node,
                            self.dir.node_dir(r.node).join("node.log").display()
                        );
                    }
                }
            }
        }
    }
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for r in &mut self.running {
            let _ = r.child.kill();
            let _ = r.child.wait();
        }
    }
}

async fn start_cluster(
    args: &UpArgs,
    dir: &ClusterDir,
    running: &mut Vec<Running>,
) -> Result<(), String> {
    let restart = dir.has_cluster();
    let nodes = if restart {
        let nodes = existing_nodes(dir.root())?;
        if nodes.is_empty() {
            return Err(format!(
                "{} holds an admin credential but no node directories; remove it or pick another --dir",
                dir.root().display()
            ));
        }
        println!(
            "restarting the cluster in {} ({} nodes)",
            dir.root().display(),
            nodes.len()
        );
        for &node in &nodes {
            running.push(spawn_node(dir, node, None)?);
        }
        nodes
    } else {
        println!(
            "creating a {}-node cluster in {}",
            args.nodes,
            dir.root().display()
        );
        for node in 1..=args.nodes {
            write_node_file(dir, node, args)?;
        }
        running.push(spawn_node(dir, 1, None)?);
        wait_for("node 1 bootstraps the cluster", READY_TIMEOUT, || async {
            Ok(dir.has_cluster() && status::report(&client(dir.root())?).await.is_ok())
        })
        .await?;
        for node in 2..=args.nodes {
            let token = match client(dir.root())?
                .call(&ClientRequest::IssueToken { ttl_ms: 600_000 })
                .await?
            {
                ClientResponse::Token { token, .. } => token,
                other => return Err(format!("unexpected answer to a token request: {other:?}")),
            };
            running.push(spawn_node(dir, node, Some(&token))?);
            wait_for(&format!("node {node} joins"), READY_TIMEOUT, || async {
                let report = status::report(&client(dir.root())?).await?;
                Ok(report.nodes.iter().any(|n| n.id == node && n.reachable))
            })
            .await?;
        }
        (1..=args.nodes).collect()
    };
    let rf = args.replication_factor;
    wait_for("the cluster becomes healthy", READY_TIMEOUT, || {
        healthy(dir.root(), nodes.len(), rf)
    })
    .await?;
    let report = status::report(&client(dir.root())?).await?;
    dir.save_addresses(report.nodes.iter().filter_map(|n| {
        Some((
            crate::core::ids::NodeId::new(n.id).ok()?,
            n.addr.parse().ok()?,
        ))
    }))
    .map_err(|e| e.to_string())?;
    print!("{}", status::render(&report));
    Ok(())
}
