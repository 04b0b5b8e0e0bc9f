//! In-process clusters of real nodes: the node runtime, the multi-Raft
//! engine and redb files, connected by the in-process transport. Nodes join
//! through group 0, data groups are replicated by routing changes that the
//! runtime reconciles into Raft membership, and nodes crash (their task is
//! aborted) and restart from their files.

mod common;

use common::*;
use keel::core::codec;
use keel::core::entry::MetadataEntry;
use keel::core::hlc::Hlc;
use keel::core::ids::GroupId;
use keel::core::routing::RoutingChange;
use keel::io::clock::WallClock;
use keel::io::transport::Transport;
use keel::node::rpc::{NodeError, Outcome, Request, Response, MAX_FORWARDED_ITEMS};
use serde_bytes::ByteBuf;
use std::sync::Arc;
use std::time::Duration;

#[tokio::test]
async fn three_nodes_join_replicate_and_forward() {
    let c = Cluster::form(3).await;
    c.await_replication(3).await;
    // Writes through any node are forwarded to the group's leader.
    for (i, id) in [1, 2, 3, 2, 3, 1].into_iter().enumerate() {
        c.put_via(n(id), &format!("key{i}"), &format!("v{i}")).await;
    }
    // Linearizable reads through any node see every acknowledged write.
    for id in 1..=3 {
        for i in 0..6 {
            assert_eq!(
                c.get_via(n(id), &format!("key{i}")).await,
                Some(format!("v{i}").into_bytes())
            );
        }
    }
    for id in 1..=3 {
        c.await_local(n(id), "key5", "v5").await;
    }
    // Routing and the real Raft membership agree.
    let state = c.node(n(1)).metadata().await.unwrap();
    for g in 1..=DATA_GROUPS {
        let route = state.routing.group(GroupId(g)).unwrap();
        let view = c.node(n(1)).group(GroupId(g)).await.unwrap().unwrap();
        assert_eq!(route.voters, view.voters);
    }
}

#[tokio::test]
async fn every_node_restarts_with_its_data() {
    let mut c = Cluster::form(3).await;
    c.await_replication(3).await;
    for i in 0..10 {
        c.put_via(n(1 + i % 3), &format!("k{i}"), "x").await;
    }
    for id in 1..=3 {
        c.crash(n(id)).await;
    }
    for id in 1..=3 {
        c.start(n(id), None);
    }
    for i in 0..10 {
        assert_eq!(c.get_via(n(2), &format!("k{i}")).await, Some(b"x".to_vec()));
    }
    c.put_via(n(3), "after", "restart").await;
    assert_eq!(c.get_via(n(1), "after").await, Some(b"restart".to_vec()));
}

#[tokio::test]
async fn leader_crash_elects_a_new_leader_without_losing_writes() {
    let mut c = Cluster::form(3).await;
    c.await_replication(3).await;
    c.put_via(n(1), "before", "1").await;
    let leader = c.metadata_leader().await;
    c.crash(leader).await;
    let survivor = *c.nodes.keys().next().unwrap();
    c.put_via(survivor, "after", "2").await;
    assert_eq!(c.get_via(survivor, "before").await, Some(b"1".to_vec()));
    let new_leader = c.metadata_leader().await;
    assert_ne!(new_leader, leader);
    c.node(survivor)
        .propose_metadata(MetadataEntry::SurrogateAlloc { hwm: 7 })
        .await
        .unwrap();
    // The crashed node comes back and catches up.
    c.start(leader, None);
    c.await_local(leader, "after", "2").await;
}

/// A node outside a group sends a write to a voter it has heard from, not
/// to the dead voter routing happens to name first (simulator seed 144: a
/// node lost with its disk swallowed every forwarded write until the
/// request timed out).
#[tokio::test]
async fn a_node_outside_a_group_forwards_past_a_dead_voter() {
    let mut c = Cluster::form(4).await;
    c.await_replication(3).await;
    let state = c.node(c.metadata_leader().await).metadata().await.unwrap();
    let (group, outsider) = (1..=DATA_GROUPS)
        .map(GroupId)
        .find_map(|g| {
            let route = state.routing.group(g)?;
            let outsider = (1..=4).map(n).find(|id| !route.is_member(*id))?;
            Some((g, outsider))
        })
        .expect("with RF 3 on 4 nodes, every group leaves one node out");
    let route = state.routing.group(group).unwrap();
    // Whom the outsider would name first: routing's hint, else a voter.
    let named = route.leader.unwrap_or(route.voters[0]);
    let key = (0..)
        .map(|i| format!("k{i}"))
        .find(|k| state.routing.lookup(put(k, "").0).group == group)
        .unwrap();
    c.crash(named).await;
    // Fails with a timeout if the outsider keeps naming the dead voter.
    c.put_via(outsider, &key, "written").await;
}

/// Many writes through one node at once reach their leaders in batches
/// (`node::forward`), and each client still gets its own answer.
#[tokio::test]
async fn concurrent_forwarded_writes_each_get_their_own_answer() {
    let c = Cluster::form(3).await;
    c.await_replication(3).await;
    let via = c.node(n(2)).clone();
    let writes: Vec<_> = (0..64)
        .map(|i| {
            let via = via.clone();
            let (vshard, command) = put(&format!("batched{i}"), &format!("v{i}"));
            tokio::spawn(async move { via.propose(vshard, command).await })
        })
        .collect();
    let mut indexes = std::collections::BTreeSet::new();
    for write in writes {
        let committed = write.await.unwrap().unwrap();
        assert!(matches!(committed.outcome, Outcome::Data(_)));
        indexes.insert((committed.hlc, committed.index));
    }
    assert_eq!(indexes.len(), 64, "every write has its own log position");
    for i in 0..64 {
        assert_eq!(
            c.get_via(n(3), &format!("batched{i}")).await,
            Some(format!("v{i}").into_bytes())
        );
    }
}

/// A forwarded batch is validated item by item: only proposals and reads
/// may travel in one, and a bad item fails alone.
#[tokio::test]
async fn a_forwarded_batch_refuses_bad_items_and_runs_the_rest() {
    let c = Cluster::form(3).await;
    let leader = c.metadata_leader().await;
    let (outsider, _inbound) = c.net.endpoint(n(9));
    let propose = |hwm| {
        codec::encode(&Request::ProposeMetadata(MetadataEntry::SurrogateAlloc {
            hwm,
        }))
    };
    let nested = codec::encode(&Request::Forwarded(vec![ByteBuf::from(propose(3))]));
    let items = vec![
        propose(5),
        codec::encode(&Request::Status),
        b"garbage".to_vec(),
        nested,
        propose(9),
    ];
    let batch = Request::Forwarded(items.into_iter().map(ByteBuf::from).collect());
    let answer = outsider
        .call(leader, codec::encode(&batch), Duration::from_secs(10))
        .await
        .unwrap();
    let Response::Forwarded(answers) = codec::decode::<Response>(&answer).unwrap() else {
        panic!("a batch is answered by a batch");
    };
    let answers: Vec<Response> = answers
        .iter()
        .map(|a| codec::decode::<Response>(a).unwrap())
        .collect();
    assert_eq!(answers.len(), 5);
    for committed in [&answers[0], &answers[4]] {
        assert!(matches!(committed, Response::Committed(_)), "{committed:?}");
    }
    for refused in &answers[1..4] {
        assert!(
            matches!(refused, Response::Error(NodeError::BadRequest(_))),
            "{refused:?}"
        );
    }
    // A batch over the limit is refused whole, before any item runs.
    let items = vec![ByteBuf::from(propose(11)); MAX_FORWARDED_ITEMS + 1];
    let answer = outsider
        .call(
            leader,
            codec::encode(&Request::Forwarded(items)),
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    assert!(matches!(
        codec::decode::<Response>(&answer).unwrap(),
        Response::Error(NodeError::BadRequest(_))
    ));
}

#[tokio::test]
async fn five_nodes_have_five_metadata_voters() {
    let c = Cluster::form(5).await;
    let state = c.node(n(5)).metadata().await;
    // Node 5 is not necessarily the leader; its metadata read is then refused.
    if let Err(e) = &state {
        assert!(matches!(e, NodeError::NotLeader { .. }), "{e}");
    }
    let leader = c.metadata_leader().await;
    let state = c.node(leader).metadata().await.unwrap();
    assert_eq!(state.topology.voters().count(), 5);
}

#[tokio::test]
async fn a_new_replica_catches_up_by_snapshot() {
    let mut c = Cluster::with_compaction(20);
    c.replication_factor = 1;
    c.form_on(3).await;
    c.replicate_to(&[n(2)]).await;
    for i in 0..60 {
        c.put_via(n(1), &format!("k{i}"), "v").await;
    }
    // Node 3 joins every data group; the logs were compacted, so it can only
    // catch up from a snapshot.
    let admin = c.node(n(1)).clone();
    for g in 1..=DATA_GROUPS {
        admin
            .propose_metadata(MetadataEntry::RoutingChange(RoutingChange::AddLearner {
                group_id: GroupId(g),
                node_id: n(3),
            }))
            .await
            .unwrap();
    }
    for i in [0, 30, 59] {
        c.await_local(n(3), &format!("k{i}"), "v").await;
    }
}

#[tokio::test]
async fn joint_consensus_replaces_a_voter_and_leadership_follows_routing() {
    let mut c = Cluster::new();
    c.replication_factor = 1;
    c.form_on(4).await;
    c.replicate_to(&[n(2), n(3)]).await;
    c.put_via(n(1), "a", "1").await;
    let g = GroupId(1);
    let admin = c.node(n(1)).clone();
    let propose = |change: RoutingChange| {
        let admin = admin.clone();
        async move {
            let c = admin
                .propose_metadata(MetadataEntry::RoutingChange(change.clone()))
                .await
                .unwrap();
            assert_eq!(c.outcome, Outcome::Metadata(None), "{change:?}");
        }
    };
    // Replace voter 3 by node 4: learner first, then one joint change.
    propose(RoutingChange::AddLearner {
        group_id: g,
        node_id: n(4),
    })
    .await;
    c.await_local(n(4), "a", "1").await;
    admin
        .propose_metadata(MetadataEntry::Batch {
            entries: vec![
                MetadataEntry::RoutingChange(RoutingChange::PromoteLearner {
                    group_id: g,
                    node_id: n(4),
                }),
                MetadataEntry::RoutingChange(RoutingChange::DemoteVoter {
                    group_id: g,
                    node_id: n(3),
                }),
            ]
            .into(),
        })
        .await
        .unwrap();
    propose(RoutingChange::RemoveMember {
        group_id: g,
        node_id: n(3),
    })
    .await;
    let want = vec![n(1), n(2), n(4)];
    let node = c.node(n(1)).clone();
    eventually("group 1 runs with voters 1, 2, 4", || {
        let node = node.clone();
        let want = want.clone();
        async move {
            let view = node.group(g).await.ok()??;
            (view.voters == want && view.learners.is_empty()).then_some(())
        }
    })
    .await;
    // Routing names node 4 the leader: leadership moves there.
    propose(RoutingChange::LeadershipTransfer {
        group_id: g,
        new_leader_node_id: n(4),
    })
    .await;
    let node4 = c.node(n(4)).clone();
    eventually("node 4 leads group 1", || {
        let node4 = node4.clone();
        async move { node4.group(g).await.ok()??.is_leader.then_some(()) }
    })
    .await;
    c.crash(n(3)).await;
    c.put_via(n(2), "b", "2").await;
    assert_eq!(c.get_via(n(4), "b").await, Some(b"2".to_vec()));
}

#[tokio::test]
async fn a_request_for_a_moved_vshard_gets_a_wrong_group_redirect() {
    use keel::io::transport::Transport;
    use keel::node::rpc::{Request, Response};
    let c = Cluster::form(3).await;
    c.await_replication(3).await;
    let (vshard, command) = put("moved", "x");
    let state = c.node(n(1)).metadata().await.unwrap();
    let old = state.routing.lookup(vshard).group;
    let new = GroupId(if old.0 == 1 { 2 } else { 1 });
    let leaseholder = state.routing.group(new).unwrap().voters[0];
    c.node(n(1))
        .propose_metadata(MetadataEntry::RoutingChange(
            RoutingChange::ReassignVShard {
                vshard_id: vshard,
                new_group_id: new,
                new_leaseholder_node_id: leaseholder,
            },
        ))
        .await
        .unwrap();
    // A client with a stale view names the old group: every node redirects it.
    let (client, _inbound) = c.net.endpoint(n(99));
    for id in 1..=3 {
        let request = Request::Propose {
            vshard,
            group: Some(old),
            command: command.clone(),
        };
        let redirect = eventually("the node has applied the move", || {
            let client = client.clone();
            let request = request.clone();
            async move {
                let bytes = client
                    .call(n(id), codec::encode(&request), Duration::from_secs(5))
                    .await
                    .ok()?;
                match codec::decode::<Response>(&bytes).unwrap() {
                    Response::Error(NodeError::WrongGroup(redirect)) => Some(redirect),
                    _ => None,
                }
            }
        })
        .await;
        assert_eq!((redirect.vshard, redirect.group), (vshard, new));
    }
    // Through the API the write lands in the new group.
    c.put_via(n(2), "moved", "x").await;
    assert_eq!(c.get_via(n(3), "moved").await, Some(b"x".to_vec()));
}

/// A physical clock that stands still: a node reading it stamps by its
/// hybrid clock's logical counter alone.
struct StoppedClock(u64);

impl WallClock for StoppedClock {
    fn now_ms(&self) -> u64 {
        self.0
    }
}

/// Node 1 leads with its clock `ahead_ms` ahead of nodes 2 and 3 (all
/// stopped) and stamps a write; nodes 2 and 3 apply it, node 1 dies, and
/// the next leader stamps a second write. Returns both stamps.
async fn stamps_across_a_leader_change(ahead_ms: u64) -> (Hlc, Hlc) {
    const T: u64 = 1_700_000_000_000;
    let mut c = Cluster::new();
    c.clocks.insert(n(1), Arc::new(StoppedClock(T + ahead_ms)));
    for id in 2..=3 {
        c.clocks.insert(n(id), Arc::new(StoppedClock(T)));
    }
    c.form_on(3).await;
    c.await_replication(3).await;
    let (vshard, command) = put("stamped", "first");
    let first = c.node(n(1)).propose(vshard, command).await.unwrap().hlc;
    assert_eq!(
        first.wall_ms,
        T + ahead_ms,
        "node 1 led and stamped the write"
    );
    for id in 2..=3 {
        c.await_local(n(id), "stamped", "first").await;
    }
    c.crash(n(1)).await;
    let (vshard, command) = put("stamped", "second");
    let second = c.node(n(2)).propose(vshard, command).await.unwrap().hlc;
    (first, second)
}

/// The hybrid clock's causality across leaders (DESIGN.md §2): a node that
/// applied a record stamped by a clock running ahead of its own, within the
/// allowed offset (500 ms), stamps what it proposes later after it.
#[tokio::test]
async fn a_new_leader_stamps_after_what_it_applied() {
    let (first, second) = stamps_across_a_leader_change(400).await;
    assert!(second > first, "{second} is not after {first}");
}

/// A stamp further ahead than the allowed offset is committed all the
/// same, but leaves the other nodes' clocks alone, so one runaway clock
/// does not drag the cluster into the future.
#[tokio::test]
async fn a_stamp_beyond_the_clock_offset_leaves_the_clock_alone() {
    let (first, second) = stamps_across_a_leader_change(600).await;
    assert_eq!(
        first.wall_ms - second.wall_ms,
        600,
        "{second} against {first}"
    );
}

/// A replica deletes itself once its group's configuration has left it,
/// and asks the group's leader first. A leader cut off from its group still
/// says it leads, with a configuration the group may have left, until
/// check-quorum demotes it; only a leader a quorum still follows may answer
/// (seed 17065 of the sweep: a stale leader's status said a node was gone,
/// the node deleted its replica, and the group, which had added it back as
/// a voter, lost its quorum for good).
#[tokio::test]
async fn only_a_leader_a_quorum_follows_says_who_a_group_has() {
    let c = Cluster::form(3).await;
    c.await_replication(3).await;
    let group = GroupId(1);
    let (outsider, _inbound) = c.net.endpoint(n(9));
    let ask = |to| {
        let outsider = outsider.clone();
        async move {
            let request = codec::encode(&Request::GroupMembers { group });
            let bytes = outsider
                .call(to, request, Duration::from_secs(1))
                .await
                .ok()?;
            codec::decode::<Response>(&bytes).ok()
        }
    };
    let leader = eventually("group 1 to have a leader", || async {
        for id in 1..=3 {
            if c.node(n(id)).group(group).await.ok()??.is_leader {
                return Some(n(id));
            }
        }
        None
    })
    .await;
    assert_eq!(
        ask(leader).await,
        Some(Response::Members(vec![n(1), n(2), n(3)]))
    );
    let follower = (1..=3).map(n).find(|&id| id != leader).unwrap();
    assert!(matches!(
        ask(follower).await,
        Some(Response::Error(NodeError::NotLeader { .. }))
    ));
    for id in (1..=3).map(n).filter(|&id| id != leader) {
        c.net.partition(leader, id);
    }
    let view = c.node(leader).group(group).await.unwrap().unwrap();
    assert!(view.is_leader, "cut off, it still says it leads: {view:?}");
    let answer = ask(leader).await;
    assert!(
        !matches!(answer, Some(Response::Members(_))),
        "a leader cut off from its group answered: {answer:?}"
    );
}
