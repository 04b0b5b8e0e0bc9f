//! Data groups created and dropped on a running in-process cluster: the
//! founders start a new group from its first snapshot, vShards move into
//! it and out again, and a dropped group's replicas are deleted.

mod common;

use common::service::*;
use common::*;
use keel::core::entry::MetadataEntry;
use keel::core::ids::{GroupId, NodeId, VShardId};
use keel::core::rebalance::PlannedMove;
use keel::core::routing::RoutingChange;
use keel::node::migrate::start_move;
use keel::node::rpc::Outcome;
use keel::node::service::{Caller, ClientRequest, ClientResponse, ServiceError};

/// Waits until `group` has a leader that every node in `hosts` follows,
/// at a commit index each of them has applied.
async fn await_group(c: &Cluster, group: GroupId, hosts: &[NodeId]) {
    eventually(&format!("{group} to elect on {hosts:?}"), || async {
        let mut views = Vec::new();
        for id in hosts {
            views.push(c.node(*id).group(group).await.ok()??);
        }
        let leader = views.iter().find(|v| v.is_leader)?;
        views
            .iter()
            .all(|v| v.leader == leader.leader && v.applied >= leader.commit)
            .then_some(())
    })
    .await
}

/// Moves `vshard` to `to` through node 1 and waits until it completed.
async fn move_vshard(c: &Cluster, vshard: VShardId, to: GroupId) {
    move_vshard_via(c, n(1), vshard, to).await;
}

async fn move_vshard_via(c: &Cluster, via: NodeId, vshard: VShardId, to: GroupId) {
    let state = c.node(via).metadata().await.unwrap();
    let from = state.routing.lookup(vshard).group;
    let id = start_move(c.node(via), PlannedMove::VShard { vshard, from, to })
        .await
        .unwrap();
    assert!(
        finished(c.node(via), id).await.is_some(),
        "the move of vShard {vshard} to {to} completes"
    );
}

async fn create(c: &Cluster, via: NodeId, voters: Vec<NodeId>) -> (GroupId, Vec<NodeId>) {
    match call(
        c.node(via),
        Caller::Admin,
        ClientRequest::CreateGroup { voters },
    )
    .await
    {
        ClientResponse::GroupCreated { group, voters } => (group, voters),
        other => panic!("the group was not created: {other:?}"),
    }
}

#[tokio::test]
async fn a_created_group_serves_a_moved_vshard_and_is_dropped() {
    let c = Cluster::form(3).await;
    c.await_replication(3).await;
    let (group, voters) = create(&c, n(2), Vec::new()).await;
    assert_eq!(group, GroupId(DATA_GROUPS + 1));
    assert_eq!(voters, [n(1), n(2), n(3)]);
    await_group(&c, group, &voters).await;

    let vshard = VShardId::new(5).unwrap();
    let keys = keys_of(vshard, 2);
    c.put_via(n(3), &keys[0], "before").await;
    move_vshard(&c, vshard, group).await;
    assert_eq!(c.get_via(n(2), &keys[0]).await, Some(b"before".to_vec()));
    c.put_via(n(1), &keys[1], "in the new group").await;

    let drop = ClientRequest::DropGroup { group };
    match call(c.node(n(1)), Caller::Admin, drop.clone()).await {
        ClientResponse::Error(ServiceError::BadRequest(why)) => {
            assert!(why.contains("still serves 1 vShard;"), "{why}");
        }
        other => panic!("a group serving a vShard was dropped: {other:?}"),
    }
    move_vshard(&c, vshard, GroupId(1)).await;
    assert_eq!(
        c.get_via(n(1), &keys[1]).await,
        Some(b"in the new group".to_vec())
    );
    assert_eq!(
        call(c.node(n(1)), Caller::Admin, drop).await,
        ClientResponse::Done
    );
    eventually(
        "every replica of the dropped group to be deleted",
        || async {
            for id in 1..=3 {
                if c.node(n(id)).group(group).await.ok()?.is_some() {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    // The dropped group's id is never given out again.
    let (next, _) = create(&c, n(3), vec![n(2)]).await;
    assert_eq!(next, GroupId(group.0 + 1));
    await_group(&c, next, &[n(2)]).await;
}

#[tokio::test]
async fn a_founder_down_at_creation_starts_the_group_when_it_returns() {
    let mut c = Cluster::form(3).await;
    c.await_replication(3).await;
    c.crash(n(3)).await;
    let group = GroupId(DATA_GROUPS + 1);
    let committed = c
        .node(n(1))
        .propose_metadata(MetadataEntry::RoutingChange(RoutingChange::CreateGroup {
            group_id: group,
            voters: vec![n(1), n(2), n(3)],
        }))
        .await
        .unwrap();
    assert_eq!(committed.outcome, Outcome::Metadata(None));
    await_group(&c, group, &[n(1), n(2)]).await;
    let vshard = VShardId::new(7).unwrap();
    let key = &keys_of(vshard, 1)[0];
    move_vshard(&c, vshard, group).await;
    c.put_via(n(2), key, "while node 3 was away").await;

    c.start(n(3), None);
    await_group(&c, group, &[n(1), n(2), n(3)]).await;
    // Node 3 is a voter in its own right: with node 1 gone, nodes 2 and 3
    // are the group's quorum.
    c.crash(n(1)).await;
    c.put_via(n(2), key, "without node 1").await;
    assert_eq!(c.get_via(n(3), key).await, Some(b"without node 1".to_vec()));
}

/// A restarted node rebuilds group 0 from a snapshot taken before the
/// group was created (node 3's is from its join); until it has replayed
/// its log past the creation, its routing does not list the group, and it
/// must not delete its replica on that word: it could never start the
/// group again. Restarted alone, its first reconciliation comes on a tick,
/// before anything from a peer makes it replay.
#[tokio::test]
async fn a_founder_restarted_keeps_its_replica_while_group_0_replays() {
    let mut c = Cluster::form(3).await;
    c.await_replication(3).await;
    let (group, voters) = create(&c, n(1), vec![n(1), n(2), n(3)]).await;
    await_group(&c, group, &voters).await;
    for id in &voters {
        c.crash(*id).await;
    }
    c.start(n(3), None);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    c.start(n(1), None);
    c.start(n(2), None);
    await_group(&c, group, &voters).await;
    c.crash(n(1)).await;
    let vshard = VShardId::new(9).unwrap();
    let key = &keys_of(vshard, 1)[0];
    move_vshard_via(&c, n(2), vshard, group).await;
    c.put_via(n(3), key, "served by nodes 2 and 3").await;
}
