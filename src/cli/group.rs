//! `keel group`: create a data group, or drop an empty one.
//!
//! The cluster bootstraps with a fixed number of data groups; a cluster
//! that grows needs more of them for its vShards to spread over its nodes
//! (TiKV and CockroachDB split ranges for the same reason). A new group
//! serves no vShard until moves give it some, which `keel rebalance` plans.

use super::client::{AdminClient, ClientArgs};
use super::migrate::server_error;
use crate::core::ids::{GroupId, NodeId};
use crate::node::service::{ClientRequest, ClientResponse};
use clap::Subcommand;
use std::time::{Duration, Instant};

#[derive(Subcommand)]
pub enum GroupCommand {
    /// Create a data group and wait until it has a leader; `keel
    /// rebalance` then moves vShards into it.
    Create {
        #[command(flatten)]
        client: ClientArgs,
        /// Its founding voters, e.g. `--voters 1,2,3` (default: as many as
        /// the replication factor, from the active nodes hosting the fewest
        /// replicas).
        #[arg(long, value_delimiter = ',')]
        voters: Vec<u64>,
        #[arg(long)]
        json: bool,
    },
    /// Drop a data group that serves no vShard; its replicas are deleted.
    Drop {
        #[command(flatten)]
        client: ClientArgs,
        /// The group's id.
        group: u64,
    },
}

/// Waits until a node reports a leader for the new group (its founders
/// elect one within an election timeout or two), so that `keel status`
/// right after shows it healthy.
async fn await_leader(
    admin: &AdminClient,
    group: GroupId,
    timeout: Duration,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let (first, others) = admin.statuses().await?;
        let led = std::iter::once(&first)
            .chain(others.iter().filter_map(|(_, _, status)| status.as_ref()))
            .flat_map(|status| &status.local.groups)
            .any(|view| view.group == group && view.leader.is_some());
        if led {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "group {} was created but elected no leader within {}; see `keel status`",
                group.0,
                humantime::format_duration(timeout)
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub async fn group(command: GroupCommand) -> Result<(), String> {
    match command {
        GroupCommand::Create {
            client,
            voters,
            json,
        } => {
            let voters = voters
                .into_iter()
                .map(|id| {
                    NodeId::new(id)
                        .map_err(|_| "--voters must name nodes (ids start at 1)".to_owned())
                })
                .collect::<Result<Vec<_>, _>>()?;
            let admin = AdminClient::open(&client)?;
            let response = admin
                .call(&ClientRequest::CreateGroup { voters })
                .await
                .map_err(server_error)?;
            let ClientResponse::GroupCreated { group, voters } = response else {
                return Err(format!("unexpected answer: {response:?}"));
            };
            await_leader(&admin, group, client.timeout).await?;
            let voters: Vec<u64> = voters.iter().map(|v| v.get()).collect();
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "group": group.0, "voters": voters })
                );
            } else {
                let names: Vec<String> = voters.iter().map(ToString::to_string).collect();
                println!("created group {} on nodes {}", group.0, names.join(", "));
                eprintln!("it serves no vShard yet; `keel rebalance` moves some into it");
            }
            Ok(())
        }
        GroupCommand::Drop { client, group } => {
            if group == 0 {
                return Err("group 0 is the metadata group, which cannot be dropped".into());
            }
            AdminClient::open(&client)?
                .call(&ClientRequest::DropGroup {
                    group: GroupId(group),
                })
                .await
                .map_err(server_error)?;
            println!("dropped group {group}");
            Ok(())
        }
    }
}
