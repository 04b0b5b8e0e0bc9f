//! How CLI commands reach a cluster: the admin credential and node
//! addresses from the cluster directory (or `--addr`), over QUIC + mutual
//! TLS like any node (DESIGN.md §9).

use crate::core::codec;
use crate::core::ids::NodeId;
use crate::daemon::cluster_dir::{ClusterDir, DEFAULT_DIR};
use crate::io::quic_client::{ClientError, QuicClient};
use crate::node::rpc::NodeError;
use crate::node::service::{ClientRequest, ClientResponse, ClusterStatus, ServiceError};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// Where a client command finds the cluster.
#[derive(clap::Args, Clone, Debug)]
pub struct ClientArgs {
    /// The cluster directory holding the admin credential and node addresses.
    #[arg(long, default_value = DEFAULT_DIR)]
    pub dir: PathBuf,
    /// Talk to this node (HOST:PORT) instead of the addresses in the cluster
    /// directory; may be repeated.
    #[arg(long)]
    pub addr: Vec<SocketAddr>,
    /// How long one request may take.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub timeout: Duration,
}

/// One request to the node at `addr`.
async fn call(
    quic: &QuicClient,
    addr: SocketAddr,
    request: &ClientRequest,
    timeout: Duration,
) -> Result<ClientResponse, ClientError> {
    let bytes = quic.call(addr, codec::encode(request), timeout).await?;
    codec::decode::<ClientResponse>(&bytes).map_err(|e| ClientError::Connect {
        addr,
        cause: format!("the node answered an undecodable frame: {e}"),
    })
}

/// An admin client of one cluster; clones share its connections.
#[derive(Clone)]
pub struct AdminClient {
    quic: Arc<QuicClient>,
    dir: ClusterDir,
    addrs: Vec<SocketAddr>,
    timeout: Duration,
}

impl AdminClient {
    pub fn open(args: &ClientArgs) -> Result<Self, String> {
        let dir = ClusterDir::new(&args.dir);
        let credential = dir.load_admin().map_err(|e| e.to_string())?;
        let addrs = if args.addr.is_empty() {
            dir.load_addresses()
                .map_err(|e| e.to_string())?
                .into_values()
                .collect()
        } else {
            args.addr.clone()
        };
        if addrs.is_empty() {
            return Err(format!(
                "no node addresses in {}; pass --addr HOST:PORT",
                dir.root().display()
            ));
        }
        let quic = Arc::new(QuicClient::admin(&credential.tls).map_err(|e| e.to_string())?);
        Ok(AdminClient {
            quic,
            dir,
            addrs,
            timeout: args.timeout,
        })
    }

    pub fn dir(&self) -> &ClusterDir {
        &self.dir
    }

    /// One request to the node at `addr`.
    pub async fn call_at(
        &self,
        addr: SocketAddr,
        request: &ClientRequest,
    ) -> Result<ClientResponse, ClientError> {
        call(&self.quic, addr, request, self.timeout).await
    }

    /// One request to the first node that can be reached and still serves.
    /// A node that was decommissioned refuses every request (which it has
    /// then not executed) and marks its status as retired, so the next node
    /// is asked; a retired node's status is the answer only if no other
    /// node gives one. A request that reached a node but timed out is not
    /// sent again elsewhere: a write's outcome is then unknown, and
    /// repeating it could apply it twice.
    pub async fn call(&self, request: &ClientRequest) -> Result<ClientResponse, String> {
        let mut last = String::new();
        let mut retired_status = None;
        for &addr in &self.addrs {
            match self.call_at(addr, request).await {
                Ok(ClientResponse::Error(ServiceError::Node(e @ NodeError::Retired { .. }))) => {
                    last = e.to_string();
                }
                Ok(ClientResponse::Status(status)) if status.local.retired => {
                    last = format!("node {} was decommissioned", status.local.node);
                    retired_status.get_or_insert(ClientResponse::Status(status));
                }
                Ok(ClientResponse::Error(e)) => return Err(e.to_string()),
                Ok(response) => return Ok(response),
                Err(e @ (ClientError::Timeout { .. } | ClientError::Dropped { .. })) => {
                    return Err(format!("{e}; the request's outcome is unknown"))
                }
                Err(e) => last = e.to_string(),
            }
        }
        retired_status.ok_or_else(|| format!("no node could be reached: {last}"))
    }

    /// Every node's own status: the topology from the first node that
    /// answers, then each node of it asked at its address (`None` where
    /// unreachable).
    pub async fn statuses(
        &self,
    ) -> Result<
        (
            ClusterStatus,
            Vec<(NodeId, SocketAddr, Option<ClusterStatus>)>,
        ),
        String,
    > {
        let first = match self.call(&ClientRequest::Status).await? {
            ClientResponse::Status(status) => *status,
            other => return Err(format!("unexpected answer to status: {other:?}")),
        };
        // All at once, so that dead nodes cost one timeout, not one each.
        let mut asked = tokio::task::JoinSet::new();
        for (position, summary) in first.nodes.iter().enumerate() {
            let Ok(addr) = summary.addr.parse::<SocketAddr>() else {
                continue;
            };
            let (quic, timeout, node) = (Arc::clone(&self.quic), self.timeout, summary.node);
            asked.spawn(async move {
                let status = match call(&quic, addr, &ClientRequest::Status, timeout).await {
                    Ok(ClientResponse::Status(status)) => Some(*status),
                    _ => None,
                };
                (position, node, addr, status)
            });
        }
        let mut each: Vec<_> = asked.join_all().await;
        each.sort_by_key(|(position, ..)| *position);
        let each = each
            .into_iter()
            .map(|(_, node, addr, status)| (node, addr, status))
            .collect();
        Ok((first, each))
    }
}
