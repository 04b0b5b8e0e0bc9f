//! Layer 5: the `keel` command line (DESIGN.md §9). Every command that
//! talks to a cluster goes through [`client::AdminClient`]; errors are one
//! sentence on stderr and a non-zero exit code.

pub mod bench;
pub mod client;
mod group;
pub mod migrate;
mod offline;
pub mod routes;
pub mod status;
pub mod up;

use crate::core::codec::hex;
use crate::core::ids::NodeId;
use crate::core::kv::{KvCommand, KvResponse};
use crate::daemon::cluster_dir::{ClusterDir, StagedCa};
use crate::daemon::config::NodeFile;
use crate::io::pki::ClusterCa;
use crate::node::service::{ClientRequest, ClientResponse};
use clap::{Parser, Subcommand};
use client::{AdminClient, ClientArgs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser)]
#[command(
    name = "keel",
    version,
    about = "Cluster coordination engine for sharded databases"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Start (or restart) a local cluster on 127.0.0.1 and keep it running.
    Up(up::UpArgs),
    /// Run one node.
    Node {
        #[command(subcommand)]
        command: NodeCommand,
    },
    /// Start a fresh local cluster and measure it: throughput and latency
    /// percentiles, move pauses, failover.
    Bench(bench::BenchArgs),
    /// Nodes, groups, leaders, routing epoch, migrations and health.
    Status {
        #[command(flatten)]
        client: ClientArgs,
        /// Print JSON (the stable scripting interface).
        #[arg(long)]
        json: bool,
    },
    /// Join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
    /// The built-in key-value state machine.
    Kv {
        #[command(subcommand)]
        command: KvCommandArg,
    },
    /// Start a migration and follow it until it is done.
    Migrate {
        #[command(subcommand)]
        command: migrate::MigrateCommand,
    },
    /// Move every replica off a node, then remove it from the cluster.
    Decommission(migrate::DecommissionArgs),
    /// Even out replicas, leaders and vShards across the nodes.
    Rebalance(migrate::RebalanceArgs),
    /// Create or drop data groups.
    Group {
        #[command(subcommand)]
        command: group::GroupCommand,
    },
    /// The cluster CA.
    Ca {
        #[command(subcommand)]
        command: CaCommand,
    },
    /// Print the vShard each key maps to (crc32c(key) % 1024).
    Vshard {
        /// Keys, as UTF-8 strings.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Decode a keel frame (envelope + postcard) from a file and print it.
    Decode {
        /// What the frame holds.
        #[arg(long, value_enum)]
        kind: offline::FrameArg,
        /// The file holding exactly one frame.
        file: PathBuf,
    },
}

#[derive(Subcommand)]
enum NodeCommand {
    /// Start a node: bootstrap, join (with a token) or restart, as its
    /// configuration and data directory say.
    Start {
        /// The node's configuration file (see `keel::daemon::config`).
        #[arg(long)]
        config: PathBuf,
        /// A join token, for the first start of a joining node.
        #[arg(long, env = "KEEL_JOIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
    },
    /// Remove a node that never finished joining (say, its process died
    /// before it stored its certificate) or a decommissioned one. Its id is
    /// never used again.
    Remove {
        #[command(flatten)]
        client: ClientArgs,
        /// The node's id.
        node: u64,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Issue a single-use join token.
    Issue {
        #[command(flatten)]
        client: ClientArgs,
        /// How long the token stays valid (e.g. 10m, 1h; at most 24h).
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token, by its id (at least 8 hex digits) or its full string.
    Revoke {
        #[command(flatten)]
        client: ClientArgs,
        token: String,
    },
    /// Check a join token and show the CA fingerprint it pins and its expiry.
    Inspect { token: String },
}

#[derive(Subcommand)]
enum KvCommandArg {
    /// Write KEY = VALUE.
    Put {
        #[command(flatten)]
        client: ClientArgs,
        key: String,
        value: String,
    },
    /// Read KEY (linearizable unless --stale).
    Get {
        #[command(flatten)]
        client: ClientArgs,
        key: String,
        /// Read the contacted node's own replica, possibly stale.
        #[arg(long)]
        stale: bool,
    },
    /// Delete KEY.
    Del {
        #[command(flatten)]
        client: ClientArgs,
        key: String,
    },
}

#[derive(Subcommand)]
enum CaCommand {
    /// Rotate the cluster CA without a restart: --stage, then --finalize.
    Rotate {
        #[command(flatten)]
        client: ClientArgs,
        /// Create a new CA, trust it cluster-wide and reissue every node's
        /// certificate under it.
        #[arg(
            long,
            conflicts_with = "finalize",
            required_unless_present = "finalize"
        )]
        stage: bool,
        /// Stop trusting every other CA, once every node presents a
        /// certificate from the new one.
        #[arg(long)]
        finalize: bool,
    },
}

/// Runs the CLI; the binary's `main`.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command) -> Result<(), String> {
    match command {
        Command::Up(args) => up::up(args).await,
        Command::Bench(args) => bench::bench(args).await,
        Command::Node {
            command: NodeCommand::Start { config, token },
        } => {
            let file = NodeFile::load(&config).map_err(|e| e.to_string())?;
            crate::daemon::run(file, token)
                .await
                .map_err(|e| e.to_string())
        }
        Command::Node {
            command: NodeCommand::Remove { client, node },
        } => {
            let node = NodeId::new(node).map_err(|e| e.to_string())?;
            AdminClient::open(&client)?
                .call(&ClientRequest::RemoveNode { node })
                .await?;
            println!("node {} removed", node.get());
            Ok(())
        }
        Command::Status { client, json } => {
            let report = status::report(&AdminClient::open(&client)?).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?
                );
            } else {
                print!("{}", status::render(&report));
            }
            Ok(())
        }
        Command::Token { command } => token(command).await,
        Command::Kv { command } => kv(command).await,
        Command::Migrate { command } => migrate::migrate(command).await,
        Command::Decommission(args) => migrate::decommission(args).await,
        Command::Rebalance(args) => migrate::rebalance(args).await,
        Command::Group { command } => group::group(command).await,
        Command::Ca {
            command:
                CaCommand::Rotate {
                    client,
                    stage,
                    finalize: _,
                },
        } => {
            if stage {
                stage_ca(&client).await
            } else {
                finalize_ca(&AdminClient::open(&client)?).await
            }
        }
        Command::Vshard { keys } => {
            offline::vshard(&keys);
            Ok(())
        }
        Command::Decode { kind, file } => offline::decode(kind, &file),
    }
}

async fn token(command: TokenCommand) -> Result<(), String> {
    match command {
        TokenCommand::Issue { client, ttl, json } => {
            let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
            let response = AdminClient::open(&client)?
                .call(&ClientRequest::IssueToken { ttl_ms })
                .await?;
            let ClientResponse::Token {
                token,
                id,
                expires_at_ms,
            } = response
            else {
                return Err(format!("unexpected answer: {response:?}"));
            };
            if json {
                let value = serde_json::json!({
                    "token": token, "id": id, "expires_at_ms": expires_at_ms,
                });
                println!("{value}");
            } else {
                println!("{token}");
                eprintln!(
                    "token id {id}, valid for {}; single use. Join with: keel node start --config node.toml --token <token>",
                    humantime::format_duration(ttl)
                );
            }
            Ok(())
        }
        TokenCommand::Revoke { client, token } => {
            AdminClient::open(&client)?
                .call(&ClientRequest::RevokeToken { token })
                .await?;
            println!("revoked");
            Ok(())
        }
        TokenCommand::Inspect { token } => offline::inspect_token(&token),
    }
}

async fn kv(command: KvCommandArg) -> Result<(), String> {
    let (client, request) = match command {
        KvCommandArg::Put { client, key, value } => (
            client,
            ClientRequest::Kv(KvCommand::Put {
                key: key.into_bytes(),
                value: value.into_bytes(),
            }),
        ),
        KvCommandArg::Del { client, key } => (
            client,
            ClientRequest::Kv(KvCommand::Delete {
                key: key.into_bytes(),
            }),
        ),
        KvCommandArg::Get { client, key, stale } => (
            client,
            ClientRequest::Get {
                key: key.into_bytes(),
                linearizable: !stale,
            },
        ),
    };
    let read = matches!(request, ClientRequest::Get { .. });
    match AdminClient::open(&client)?.call(&request).await? {
        // Writes answer with the previous value; the CLI just confirms.
        ClientResponse::Kv(KvResponse::Ok | KvResponse::Value(_)) if !read => println!("OK"),
        ClientResponse::Kv(KvResponse::Value(Some(value))) => {
            println!("{}", String::from_utf8_lossy(&value))
        }
        // Exit code 1 tells "not set" apart from an empty value.
        ClientResponse::Kv(KvResponse::Value(None)) => {
            return Err("the key is not set".into());
        }
        ClientResponse::Kv(KvResponse::Error(e)) => return Err(e),
        other => return Err(format!("unexpected answer: {other:?}")),
    }
    Ok(())
}

/// Stages a new CA. It is saved in the cluster directory and trusted by
/// the admin credential before any node presents it, so an interrupted
/// stage can be re-run and resumes with the same CA. Every node then adopts
/// it (the first also commits the trust change), and the admin credential
/// is reissued under it.
async fn stage_ca(args: &ClientArgs) -> Result<(), String> {
    let dir = ClusterDir::new(&args.dir);
    let staged = match dir.load_staged_ca().map_err(|e| e.to_string())? {
        Some(staged) => staged,
        None => {
            let ca = ClusterCa::generate().map_err(|e| e.to_string())?;
            let staged = StagedCa {
                cert_der: ca.cert_der(),
                key_der: ca.key_der(),
            };
            dir.save_staged_ca(&staged).map_err(|e| e.to_string())?;
            staged
        }
    };
    let ca = ClusterCa::from_der(&staged.cert_der, &staged.key_der).map_err(|e| e.to_string())?;
    let mut credential = dir.load_admin().map_err(|e| e.to_string())?;
    if !credential.tls.trusted_cas_der.contains(&staged.cert_der) {
        credential.tls.trusted_cas_der.push(staged.cert_der.clone());
        dir.save_admin(&credential).map_err(|e| e.to_string())?;
    }
    let client = AdminClient::open(args)?;
    let (_, each) = client.statuses().await?;
    if let Some((node, _, _)) = each.iter().find(|(_, _, s)| s.is_none()) {
        return Err(format!(
            "node {node} is unreachable; every node must adopt the new CA, so bring it back and run --stage again"
        ));
    }
    let request = ClientRequest::StageCa {
        cert_der: staged.cert_der.clone(),
        key_der: staged.key_der.clone(),
    };
    for (node, addr, _) in &each {
        match client.call_at(*addr, &request).await {
            Ok(ClientResponse::Done) => {
                println!("node {node} adopted CA {}", hex(&ca.fingerprint()))
            }
            Ok(ClientResponse::Error(e)) => return Err(format!("node {node}: {e}")),
            Ok(other) => return Err(format!("node {node} answered {other:?}")),
            Err(e) => return Err(format!("node {node}: {e}")),
        }
    }
    let mut tls = ca.issue_admin().map_err(|e| e.to_string())?;
    tls.trusted_cas_der = credential.tls.trusted_cas_der;
    credential.tls = tls;
    dir.save_admin(&credential).map_err(|e| e.to_string())?;
    println!("staged: run `keel ca rotate --finalize` to stop trusting the old CA");
    Ok(())
}

/// Finalizes: once every node presents a certificate from the same CA,
/// the cluster trusts only that CA, and so does the admin credential.
async fn finalize_ca(client: &AdminClient) -> Result<(), String> {
    let (_, each) = client.statuses().await?;
    let mut keep = None;
    for (node, _, status) in &each {
        let Some(status) = status else {
            return Err(format!(
                "node {node} is unreachable; finalizing now could lock it out"
            ));
        };
        match keep {
            None => keep = Some(status.cert_ca),
            Some(fp) if fp != status.cert_ca => {
                return Err(format!(
                    "node {node} presents a certificate from another CA than the others; run `keel ca rotate --stage` first"
                ))
            }
            Some(_) => {}
        }
    }
    let keep = keep.ok_or("the cluster has no nodes")?;
    client.call(&ClientRequest::FinalizeCa { keep }).await?;
    let mut credential = client.dir().load_admin().map_err(|e| e.to_string())?;
    credential
        .tls
        .trusted_cas_der
        .retain(|der| crate::core::cache::fingerprint(der) == keep);
    client
        .dir()
        .save_admin(&credential)
        .map_err(|e| e.to_string())?;
    client.dir().remove_staged_ca().map_err(|e| e.to_string())?;
    println!("finalized: the cluster trusts only CA {}", hex(&keep));
    Ok(())
}
