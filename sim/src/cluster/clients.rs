//! The chaos phase's client machines: key-value clients recording the
//! history, group-0 traffic, migrations, joins under chaos, and the
//! operator who replaces nodes lost with their disks.

use super::{lock, log_to, n, LostNodes, Registry, TokenConsumptions};
use crate::credentials::SimCredentials;
use crate::history::{History, Op, Outcome as HistoryOutcome};
use crate::swarm::Swarm;
use keel::core::cache::MetadataState;
use keel::core::codec;
use keel::core::entry::MetadataEntry;
use keel::core::hlc::Hlc;
use keel::core::ids::{DescriptorId, GroupId, NodeId, VShardId};
use keel::core::kv::{KvCommand, KvQuery, KvResponse};
use keel::core::lease::DescriptorLease;
use keel::core::rebalance::PlannedMove;
use keel::core::token::{JoinToken, JoinTokenTransitionKind};
use keel::core::topology::NodeState;
use keel::core::topology::TopologyChange;
use keel::node::join::JoinRequest;
use keel::node::rpc::{NodeError, Outcome};
use keel::node::service::{serve, Caller, ClientRequest, ClientResponse};
use keel::node::Node;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::{sleep, Instant};

/// History process ids: each client owns a block of them, and switches to
/// the next after an operation with an unknown outcome.
const PROCESSES_PER_CLIENT: u64 = 1_000_000;
/// The first process id of the final reads (beyond every client's block).
pub(super) const FINAL_READER: u64 = 1 << 40;

pub(super) fn workload_key(k: u64) -> String {
    format!("key{k}")
}

pub(super) fn liveness_key(vshard: VShardId) -> String {
    // Any key of that vShard will do; search a small deterministic space.
    (0u64..)
        .map(|i| format!("live{i}"))
        .find(|k| VShardId::for_key(k.as_bytes()) == vshard)
        .expect("some key maps to every vShard")
}

/// One client: `ops_per_client` operations on random keys through random
/// live nodes, each recorded in the history.
pub(super) async fn client_loop(
    client: u64,
    swarm: Swarm,
    registry: Registry,
    history: Arc<Mutex<History>>,
    start: Instant,
    seed: u64,
    done: Arc<AtomicU64>,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut generation = 0;
    let now = || start.elapsed().as_micros() as u64;
    for op_number in 0..swarm.ops_per_client {
        // Most operations contend on a few hot keys; the rest touch keys
        // spread over the whole vShard space (and so every data group).
        let key = if rng.next_u64() % 4 == 0 {
            format!("cold{}", rng.next_u64() % 100_000)
        } else {
            workload_key(rng.next_u64() % swarm.keys)
        };
        let roll = rng.next_u64() % 100;
        let value = format!("c{client}-{op_number}");
        let op = if roll < swarm.read_percent {
            Op::Get
        } else if roll < swarm.read_percent + swarm.cas_percent {
            let expected = (rng.next_u64() % 2 == 0).then(|| {
                format!(
                    "c{}-{}",
                    rng.next_u64() % swarm.clients,
                    rng.next_u64() % op_number.max(1)
                )
            });
            Op::Cas {
                expected,
                new: value.clone(),
            }
        } else {
            Op::Put {
                value: value.clone(),
            }
        };
        let node = {
            let nodes = lock(&registry);
            let live: Vec<Node> = nodes.values().cloned().collect();
            if live.is_empty() {
                None
            } else {
                Some(live[(rng.next_u64() % live.len() as u64) as usize].clone())
            }
        };
        let Some(node) = node else {
            sleep(Duration::from_millis(100)).await;
            continue;
        };
        let process = client * PROCESSES_PER_CLIENT + generation;
        let id = lock(&history)
            .invoke(process, &key, op.clone(), now())
            .expect("a client invokes one operation at a time, in time order");
        let outcome = execute(&node, &key, &op).await;
        // After an unknown outcome the process is "crashed" (its operation
        // may still take effect at any time); the client carries on as a
        // new process, as Jepsen histories require.
        if outcome == HistoryOutcome::Info {
            generation += 1;
        }
        lock(&history)
            .complete(id, outcome, now())
            .expect("each operation completes once, in time order");
        sleep(Duration::from_millis(rng.next_u64() % 50)).await;
    }
    done.fetch_add(1, Ordering::SeqCst);
}

/// Runs one operation. Anything but a definite answer is `Info`: the
/// operation may or may not have taken effect.
pub(super) async fn execute(node: &Node, key: &str, op: &Op) -> HistoryOutcome {
    let key_bytes = key.as_bytes().to_vec();
    let vshard = VShardId::for_key(&key_bytes);
    match op {
        Op::Get => match node
            .read(vshard, codec::encode(&KvQuery::Get { key: key_bytes }))
            .await
        {
            Ok(bytes) => match codec::decode::<KvResponse>(&bytes) {
                Ok(KvResponse::Value(v)) => HistoryOutcome::Ok(v.map(lossy)),
                _ => HistoryOutcome::Fail,
            },
            // A read that did not complete changed nothing.
            Err(_) => HistoryOutcome::Fail,
        },
        Op::Put { value } => {
            let command = KvCommand::Put {
                key: key_bytes,
                value: value.as_bytes().to_vec(),
            };
            match node.propose(vshard, codec::encode(&command)).await {
                Ok(c) => match c.outcome {
                    Outcome::Data(bytes) => match codec::decode::<KvResponse>(&bytes) {
                        Ok(KvResponse::Value(_)) => HistoryOutcome::Ok(None),
                        _ => HistoryOutcome::Fail,
                    },
                    Outcome::Metadata(_) | Outcome::Control(_) => HistoryOutcome::Info,
                },
                Err(e) => indefinite(&e),
            }
        }
        Op::Cas { expected, new } => {
            let command = KvCommand::Cas {
                key: key_bytes,
                expected: expected.as_ref().map(|e| e.as_bytes().to_vec()),
                new: Some(new.as_bytes().to_vec()),
            };
            match node.propose(vshard, codec::encode(&command)).await {
                Ok(c) => match c.outcome {
                    Outcome::Data(bytes) => match codec::decode::<KvResponse>(&bytes) {
                        Ok(KvResponse::Ok) => HistoryOutcome::Ok(None),
                        Ok(KvResponse::CasFailed { .. }) => HistoryOutcome::Fail,
                        _ => HistoryOutcome::Info,
                    },
                    Outcome::Metadata(_) | Outcome::Control(_) => HistoryOutcome::Info,
                },
                Err(e) => indefinite(&e),
            }
        }
    }
}

/// Errors that prove a write never reached the log are failures; the rest
/// leave its fate unknown. (A node retired since answers `Retired` only
/// after every earlier hop proved the write did not execute.)
fn indefinite(error: &NodeError) -> HistoryOutcome {
    match error {
        NodeError::NoMetadata
        | NodeError::BadRequest(_)
        | NodeError::WrongGroup(_)
        | NodeError::Unavailable(_)
        | NodeError::Retired { .. } => HistoryOutcome::Fail,
        _ => HistoryOutcome::Info,
    }
}

fn lossy(bytes: Vec<u8>) -> String {
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Group-0 traffic during chaos: DDL, leases and drains, surrogate allocation.
pub(super) async fn metadata_loop(
    swarm: Swarm,
    registry: Registry,
    start: Instant,
    seed: u64,
    consumed: TokenConsumptions,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for _ in 0..swarm.metadata_ops {
        let node = lock(&registry).values().next().cloned();
        let Some(node) = node else {
            sleep(Duration::from_millis(200)).await;
            continue;
        };
        let now_ms = crate::clock::EPOCH_MS + start.elapsed().as_millis() as u64;
        let entry = match rng.next_u64() % 6 {
            4 | 5 => {
                let transition = match rng.next_u64() % 6 {
                    0 => JoinTokenTransitionKind::Register {
                        expires_at_ms: now_ms + 5_000,
                    },
                    1 => JoinTokenTransitionKind::Begin,
                    2 | 3 => JoinTokenTransitionKind::Consume,
                    4 => JoinTokenTransitionKind::Revert,
                    _ => JoinTokenTransitionKind::Abort,
                };
                let token_hash = [(rng.next_u64() % 4) as u8; 32];
                let entry = MetadataEntry::JoinTokenTransition {
                    token_hash,
                    transition,
                    ts_ms: now_ms,
                };
                if let Ok(committed) = node.propose_metadata(entry).await {
                    let applied = committed.outcome == Outcome::Metadata(None);
                    if applied && transition == JoinTokenTransitionKind::Consume {
                        *lock(&consumed).entry(token_hash).or_default() += 1;
                    }
                }
                sleep(Duration::from_millis(50 + rng.next_u64() % 200)).await;
                continue;
            }
            0 => MetadataEntry::CatalogDdl {
                payload: rng.next_u64().to_be_bytes().to_vec(),
            },
            1 => MetadataEntry::DescriptorLeaseGrant(DescriptorLease {
                descriptor_id: DescriptorId(rng.next_u64() % 4),
                version: rng.next_u64() % 4,
                node_id: n(1 + rng.next_u64() % swarm.nodes),
                expires_at: Hlc::new(now_ms + 10_000, 0),
            }),
            2 => MetadataEntry::DescriptorDrainStart {
                descriptor_id: DescriptorId(rng.next_u64() % 4),
                up_to_version: rng.next_u64() % 4,
                expires_at: Hlc::new(now_ms + 1_000, 0),
            },
            _ => MetadataEntry::SurrogateAlloc {
                hwm: (rng.next_u64() % 1_000_000) as u32,
            },
        };
        let _ = node.propose_metadata(entry).await;
        sleep(Duration::from_millis(50 + rng.next_u64() % 200)).await;
    }
}

/// A random registered node and its own (possibly stale) view of the
/// metadata, as an operator's tool would read it.
async fn random_view(registry: &Registry, rng: &mut ChaCha8Rng) -> Option<(Node, MetadataState)> {
    let nodes: Vec<Node> = lock(registry).values().cloned().collect();
    if nodes.is_empty() {
        return None;
    }
    let via = nodes[(rng.next_u64() % nodes.len() as u64) as usize].clone();
    let state = via.metadata_local().await.ok()?;
    Some((via, state))
}

fn active_nodes(state: &MetadataState) -> Vec<NodeId> {
    state
        .topology
        .nodes()
        .filter(|(_, info)| matches!(info.state, NodeState::Active(_)))
        .map(|(id, _)| id)
        .collect()
}

/// Moves under chaos, through the client service of random nodes, as an
/// operator would start them: vShard moves, replica moves, rebalances and
/// (at most once, when the cluster can spare a node) a decommission.
pub(super) async fn migration_loop(swarm: Swarm, registry: Registry, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut decommissioned = false;
    for _ in 0..swarm.migration_ops {
        sleep(Duration::from_millis(200 + rng.next_u64() % 600)).await;
        let Some((via, state)) = random_view(&registry, &mut rng).await else {
            continue;
        };
        // Among the groups routing lists (created and dropped ones too).
        let groups: Vec<GroupId> = state.routing.groups().map(|(g, _)| g).collect();
        let group = groups[(rng.next_u64() % groups.len() as u64) as usize];
        let active = active_nodes(&state);
        let request = match rng.next_u64() % 10 {
            0..=3 => {
                // Half the moves take the vShard of a key the clients use,
                // so that writes and reads meet fences, gates and stale
                // routes; the others any vShard.
                let draw = rng.next_u64();
                let vshard = if draw % 2 == 0 {
                    VShardId::for_key(workload_key(draw / 2 % swarm.keys).as_bytes())
                } else {
                    VShardId::new((draw / 2 % 1024) as u16).expect("in range")
                };
                let from = state.routing.lookup(vshard).group;
                if group == from {
                    continue;
                }
                ClientRequest::Migrate(PlannedMove::VShard {
                    vshard,
                    from,
                    to: group,
                })
            }
            4..=7 => {
                let Some(route) = state.routing.group(group) else {
                    continue;
                };
                let members: Vec<NodeId> = route
                    .voters
                    .iter()
                    .chain(&route.learners)
                    .copied()
                    .collect();
                let targets: Vec<NodeId> = active
                    .iter()
                    .copied()
                    .filter(|id| !route.is_member(*id))
                    .collect();
                if members.is_empty() || targets.is_empty() {
                    continue;
                }
                ClientRequest::Migrate(PlannedMove::Replica {
                    group,
                    source: members[(rng.next_u64() % members.len() as u64) as usize],
                    target: targets[(rng.next_u64() % targets.len() as u64) as usize],
                })
            }
            8 => ClientRequest::Rebalance {
                dry_run: false,
                max_moves: 2,
            },
            _ => {
                // Only with a node to spare beyond the replication factor.
                if decommissioned || (active.len() as u64) <= swarm.replication_factor as u64 + 1 {
                    continue;
                }
                decommissioned = true;
                let node = active[(rng.next_u64() % active.len() as u64) as usize];
                ClientRequest::Decommission {
                    node,
                    dry_run: rng.next_u64() % 4 == 0,
                }
            }
        };
        let _ = service_call(&via, Caller::Admin, &request).await;
    }
}

/// Data groups created and dropped under chaos, through the client service
/// of random nodes: three in four create a group (on founders keel picks,
/// or on a random set of active nodes), one in four drops a group that
/// serves no vShard. Rebalances then move vShards into new groups.
pub(super) async fn group_loop(swarm: Swarm, registry: Registry, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for _ in 0..swarm.group_ops {
        sleep(Duration::from_millis(300 + rng.next_u64() % 1_200)).await;
        let Some((via, state)) = random_view(&registry, &mut rng).await else {
            continue;
        };
        let request = if rng.next_u64() % 4 == 0 {
            let empty: Vec<GroupId> = state
                .routing
                .groups()
                .map(|(g, _)| g)
                .filter(|&g| state.routing.vshards_of(g).next().is_none())
                .collect();
            if empty.is_empty() {
                continue;
            }
            ClientRequest::DropGroup {
                group: empty[(rng.next_u64() % empty.len() as u64) as usize],
            }
        } else if rng.next_u64() % 2 == 0 {
            ClientRequest::CreateGroup { voters: Vec::new() }
        } else {
            let mut active = active_nodes(&state);
            let mut size = 1 + (rng.next_u64() % swarm.replication_factor as u64) as usize;
            if swarm.rotting_node.is_some() {
                // A node whose disk rots is lost; every group must keep a
                // quorum of sound replicas without it (see `Swarm`), which
                // fewer founders than the replication factor may not.
                size = swarm.replication_factor;
            }
            while active.len() > size {
                active.remove((rng.next_u64() % active.len() as u64) as usize);
            }
            ClientRequest::CreateGroup { voters: active }
        };
        let _ = service_call(&via, Caller::Admin, &request).await;
    }
}

/// The operator's answer to a node whose disk is damaged (DESIGN.md §3.3):
/// decommission it, so that its replicas are rebuilt on the other nodes from
/// their sound copies. Retried until keel accepts it: a decommission waits
/// for a group-0 leader, and is refused while the other nodes could not take
/// the lost node's replicas (the lost node then stays, dead, in its groups,
/// each of which keeps a quorum of sound replicas). A real operator would
/// also join a fresh machine; the simulator's joiners never start one.
pub(super) async fn replace_lost_nodes(
    registry: Registry,
    lost: LostNodes,
    trace: Arc<Mutex<Vec<String>>>,
    start: Instant,
) {
    let mut decommissioned = BTreeSet::new();
    loop {
        sleep(Duration::from_secs(1)).await;
        let pending: Vec<NodeId> = lock(&lost).difference(&decommissioned).copied().collect();
        for id in pending {
            let request = ClientRequest::Decommission {
                node: id,
                dry_run: false,
            };
            // As the CLI does: through each node in turn until one answers
            // (a node that does not lead group 0 refuses).
            let nodes: Vec<Node> = lock(&registry).values().cloned().collect();
            for via in nodes {
                if let Ok(ClientResponse::Plan { moves, .. }) =
                    service_call(&via, Caller::Admin, &request).await
                {
                    decommissioned.insert(id);
                    let event = format!(
                        "operator decommissions {id}, lost with its disk: {} moves",
                        moves.len()
                    );
                    log_to(&trace, start, event);
                    break;
                }
            }
        }
    }
}

/// One call to a node's client service, as a CLI or joiner would make it.
pub(super) async fn service_call(
    via: &Node,
    caller: Caller,
    request: &ClientRequest,
) -> Result<ClientResponse, String> {
    let answer = serve(via, &SimCredentials, caller, &codec::encode(request)).await;
    codec::decode::<ClientResponse>(&answer).map_err(|e| format!("undecodable service answer: {e}"))
}

pub(super) fn join_request(token: &str, joiner: String, addr: String) -> ClientRequest {
    ClientRequest::Join(JoinRequest {
        token: token.to_owned(),
        csr_der: format!("csr of {joiner}").into_bytes(),
        addr,
    })
}

/// Joins under chaos: tokens issued and presented through random nodes by
/// joiners that never start a node (each admitted one is removed again, as
/// an operator would), some presented twice, some abandoned after `Begin`
/// for the dead-man timer. Every grant counts as a consumption of its
/// token, for the single-use checker.
pub(super) async fn join_loop(
    attempts: u64,
    registry: Registry,
    seed: u64,
    consumed: TokenConsumptions,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let pick = |rng: &mut ChaCha8Rng| {
        let nodes: Vec<Node> = lock(&registry).values().cloned().collect();
        (!nodes.is_empty()).then(|| nodes[(rng.next_u64() % nodes.len() as u64) as usize].clone())
    };
    for attempt in 0..attempts {
        sleep(Duration::from_millis(100 + rng.next_u64() % 400)).await;
        let Some(via) = pick(&mut rng) else { continue };
        let issue = ClientRequest::IssueToken { ttl_ms: 3_000 };
        let Ok(ClientResponse::Token { token, .. }) =
            service_call(&via, Caller::Admin, &issue).await
        else {
            continue;
        };
        let Ok(parsed) = JoinToken::parse(&token) else {
            continue;
        };
        let hash = parsed.hash();
        if rng.next_u64() % 4 == 0 {
            // A joiner that presented the token and vanished.
            let _ = via
                .propose_metadata(MetadataEntry::JoinTokenTransition {
                    token_hash: hash,
                    transition: JoinTokenTransitionKind::Begin,
                    ts_ms: via.now_ms(),
                })
                .await;
            continue;
        }
        for _ in 0..1 + rng.next_u64() % 2 {
            let Some(via) = pick(&mut rng) else { break };
            let request = join_request(
                &token,
                format!("phantom {seed:x}/{attempt}"),
                format!("phantom-{seed:x}-{attempt}:7000"),
            );
            if let Ok(ClientResponse::Joined(grant)) =
                service_call(&via, Caller::Anonymous, &request).await
            {
                *lock(&consumed).entry(hash).or_default() += 1;
                let leave = MetadataEntry::TopologyChange(TopologyChange::Leave {
                    node_id: grant.node_id,
                });
                let _ = via.propose_metadata(leave).await;
            }
        }
    }
}
