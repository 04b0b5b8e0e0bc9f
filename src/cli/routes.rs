//! Leader-aware routing for long-lived clients: the node that leads the
//! group serving a key, so that a request goes straight to that leader
//! instead of to whichever node the client happens to hold, which would
//! forward it (TiKV's and CockroachDB's clients route the same way, to a
//! region leader or a leaseholder).
//!
//! A route is only a hint. A node that is not the leader forwards the
//! request, so a stale route costs one hop, never an answer; that is why
//! routes can be refreshed lazily, in the background, instead of being
//! kept exact.

use crate::cli::client::AdminClient;
use crate::core::ids::{GroupId, NodeId, VShardId};
use crate::node::service::ClusterStatus;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;
use tokio::time::Instant;

/// How old routes may grow before a request triggers a refresh. Leaders
/// rarely move, and a request on a stale route still succeeds.
pub const REFRESH: Duration = Duration::from_secs(1);

/// Which group serves each vShard and where each group's leader listens.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Routes {
    vshard_groups: Vec<GroupId>,
    leaders: BTreeMap<GroupId, SocketAddr>,
}

impl Routes {
    /// Merges the nodes' views (as [`AdminClient::statuses`] gathers them):
    /// the vShard map of the first node that answered, and for each group
    /// the leader named at the highest term any node reports. A leader
    /// without a parseable address is left out, so requests for its group
    /// go anywhere.
    pub fn merge<'a>(
        first: &'a ClusterStatus,
        each: impl IntoIterator<Item = &'a ClusterStatus>,
    ) -> Routes {
        let addrs: BTreeMap<NodeId, SocketAddr> = first
            .nodes
            .iter()
            .filter_map(|n| Some((n.node, n.addr.parse().ok()?)))
            .collect();
        let mut newest: BTreeMap<GroupId, (u64, NodeId)> = BTreeMap::new();
        for view in std::iter::once(first)
            .chain(each)
            .flat_map(|s| &s.local.groups)
        {
            let Some(leader) = view.leader else { continue };
            let seen = newest.entry(view.group).or_insert((view.term, leader));
            if view.term > seen.0 {
                *seen = (view.term, leader);
            }
        }
        Routes {
            vshard_groups: first.vshard_groups.clone(),
            leaders: newest
                .into_iter()
                .filter_map(|(group, (_, leader))| Some((group, *addrs.get(&leader)?)))
                .collect(),
        }
    }

    /// Where the leader of `group` listens, if known.
    pub fn leader_of(&self, group: GroupId) -> Option<SocketAddr> {
        self.leaders.get(&group).copied()
    }

    /// Where the leader of the group serving `vshard` listens, if known.
    pub fn leader_for(&self, vshard: VShardId) -> Option<SocketAddr> {
        let group = *self.vshard_groups.get(usize::from(vshard.get()))?;
        self.leader_of(group)
    }
}

/// [`Routes`] kept fresh for one client: read without waiting, refreshed
/// by a background task once older than [`REFRESH`] or after a failed call.
pub struct Router {
    client: AdminClient,
    routes: RwLock<(Arc<Routes>, Instant)>,
    refreshing: AtomicBool,
}

impl Router {
    /// A router with the cluster's current routes.
    pub async fn new(client: AdminClient) -> Result<Arc<Router>, String> {
        let routes = fetch(&client).await?;
        Ok(Arc::new(Router {
            client,
            routes: RwLock::new((Arc::new(routes), Instant::now())),
            refreshing: AtomicBool::new(false),
        }))
    }

    /// The current routes; starts a refresh if they are old.
    pub fn routes(self: &Arc<Self>) -> Arc<Routes> {
        let (routes, fetched) = self
            .routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        if fetched.elapsed() >= REFRESH {
            self.refresh();
        }
        routes
    }

    /// Refreshes the routes in the background (a call on one of them
    /// failed, say); does nothing if a refresh is already under way.
    pub fn refresh(self: &Arc<Self>) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let router = Arc::clone(self);
        tokio::spawn(async move {
            // A failed refresh keeps the old routes, which still work, and
            // stamps them so that the next try waits a period instead of
            // following every request.
            let fresh = fetch(&router.client).await.ok();
            let mut current = router
                .routes
                .write()
                .unwrap_or_else(PoisonError::into_inner);
            if let Some(fresh) = fresh {
                current.0 = Arc::new(fresh);
            }
            current.1 = Instant::now();
            drop(current);
            router.refreshing.store(false, Ordering::Release);
        });
    }
}

/// Every reachable node's view of the cluster, merged.
async fn fetch(client: &AdminClient) -> Result<Routes, String> {
    let (first, each) = client.statuses().await?;
    Ok(Routes::merge(
        &first,
        each.iter().filter_map(|(_, _, status)| status.as_ref()),
    ))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::core::ids::VSHARD_COUNT;
    use crate::node::rpc::{GroupView, NodeStatus};
    use crate::node::service::NodeSummary;

    fn node(id: u64) -> NodeId {
        NodeId::new(id).expect("node id")
    }

    fn view(group: u64, leader: Option<u64>, term: u64) -> GroupView {
        GroupView {
            group: GroupId(group),
            leader: leader.map(node),
            is_leader: false,
            term,
            commit: 0,
            applied: 0,
            voters: vec![],
            voters_outgoing: vec![],
            learners: vec![],
            failed: None,
            unsettled: vec![],
            peers: vec![],
        }
    }

    /// Node `me`'s status: nodes 1..=3 at 127.0.0.1:700N, every vShard
    /// in group 1 but the first, which is in group 2.
    pub(in crate::cli) fn status(me: u64, groups: Vec<GroupView>) -> ClusterStatus {
        let mut vshard_groups = vec![GroupId(1); usize::from(VSHARD_COUNT)];
        vshard_groups[0] = GroupId(2);
        ClusterStatus {
            cluster_id: [0; 16],
            nodes: (1..=3)
                .map(|n| NodeSummary {
                    node: node(n),
                    addr: format!("127.0.0.1:700{n}"),
                    state: "active".into(),
                    active: true,
                })
                .collect(),
            routing_epoch: 1,
            trusted_cas: vec![],
            cert_ca: [0; 32],
            live_tokens: 0,
            migrations: vec![],
            vshard_groups,
            rejected_entries: 0,
            local: NodeStatus {
                node: node(me),
                routing_epoch: Some(1),
                metadata_applied: Some(1),
                groups,
                retired: false,
            },
            data_groups: vec![GroupId(1), GroupId(2)],
        }
    }

    pub(in crate::cli) fn addr(n: u64) -> SocketAddr {
        format!("127.0.0.1:700{n}").parse().expect("addr")
    }

    #[test]
    fn the_leader_at_the_highest_term_wins() {
        let first = status(1, vec![view(0, Some(1), 3), view(1, Some(2), 5)]);
        let others = [
            status(2, vec![view(0, Some(1), 3), view(1, Some(3), 6)]),
            status(3, vec![view(0, None, 4), view(2, Some(3), 2)]),
        ];
        let routes = Routes::merge(&first, &others);
        assert_eq!(routes.leader_of(GroupId(0)), Some(addr(1)));
        assert_eq!(routes.leader_of(GroupId(1)), Some(addr(3)));
        assert_eq!(routes.leader_of(GroupId(2)), Some(addr(3)));
        assert_eq!(routes.leader_of(GroupId(9)), None);
    }

    #[test]
    fn a_key_routes_through_its_vshard_to_its_group_leader() {
        let first = status(1, vec![view(1, Some(2), 1), view(2, Some(3), 1)]);
        let routes = Routes::merge(&first, []);
        let key_where = |in_first: bool| {
            (0u32..)
                .map(|i| i.to_be_bytes().to_vec())
                .find(|k| (VShardId::for_key(k).get() == 0) == in_first)
                .expect("a key")
        };
        // vShard 0 is in group 2, led by node 3; the rest in group 1, by 2.
        assert_eq!(
            routes.leader_for(VShardId::for_key(&key_where(true))),
            Some(addr(3))
        );
        assert_eq!(
            routes.leader_for(VShardId::for_key(&key_where(false))),
            Some(addr(2))
        );
    }

    #[test]
    fn a_leader_without_an_address_or_a_short_map_routes_nowhere() {
        let mut first = status(1, vec![view(1, Some(2), 1)]);
        first.nodes[1].addr = "not an address".into();
        assert_eq!(Routes::merge(&first, []).leader_of(GroupId(1)), None);
        let mut first = status(1, vec![view(1, Some(2), 1)]);
        first.vshard_groups.clear();
        assert_eq!(
            Routes::merge(&first, []).leader_for(VShardId::for_key(b"k")),
            None
        );
    }
}
