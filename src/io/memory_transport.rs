//! The in-process binding of [`Transport`], for multi-node tests that run in
//! one process.
//!
//! A [`MemoryNetwork`] is a registry of endpoints plus a set of cut links, so
//! tests can crash, restart, partition and heal nodes without sockets. Each
//! endpoint's inbound side is an unbounded channel: sends never block, and
//! frames between one pair of nodes arrive in send order (one channel per
//! receiver, filled under one lock).
//!
//! Reachability is decided when a frame is sent or a call is made; a cut made
//! afterwards does not recall what is already queued, just as packets in
//! flight are not recalled by a real partition.

use crate::core::ids::NodeId;
use crate::io::transport::{
    CallFuture, Inbound, InboundReceiver, Transport, TransportError, MAX_FRAME_LEN,
};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// An in-process network: every endpoint registered on it can reach the
/// others. Cheap to clone (Arc inside).
#[derive(Clone, Default)]
pub struct MemoryNetwork {
    state: Arc<Mutex<NetState>>,
}

/// One registered endpoint. The generation tells a node's current
/// incarnation from an earlier one whose transport may still be alive in a
/// lingering task.
struct Registration {
    generation: u64,
    inbound: mpsc::UnboundedSender<Inbound>,
}

#[derive(Default)]
struct NetState {
    nodes: BTreeMap<NodeId, Registration>,
    /// Cut directed links `(from, to)`.
    cuts: BTreeSet<(NodeId, NodeId)>,
    /// Nodes cut from every other node, including nodes registered later.
    isolated: BTreeSet<NodeId>,
    /// Source of registration generations; only ever increases.
    next_generation: u64,
}

impl NetState {
    /// Whether a message from `from` can currently reach `to`. A node always
    /// reaches itself: isolation and cuts model the network between nodes.
    fn link_up(&self, from: NodeId, to: NodeId) -> bool {
        from == to
            || !(self.cuts.contains(&(from, to))
                || self.isolated.contains(&from)
                || self.isolated.contains(&to))
    }

    /// Whether `node` is still registered under `generation`, i.e. has not
    /// been unregistered or replaced by a restart since that endpoint was made.
    fn is_current(&self, node: NodeId, generation: u64) -> bool {
        self.nodes
            .get(&node)
            .is_some_and(|reg| reg.generation == generation)
    }
}

impl MemoryNetwork {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `node` (replacing an earlier registration, as a restarted
    /// node does) and returns its transport and inbound receiver.
    ///
    /// Replacing drops the old registration's sender, so the old receiver
    /// sees its channel closed once it has drained what was already queued,
    /// and the old transport can no longer send or call.
    pub fn endpoint(&self, node: NodeId) -> (Arc<MemoryTransport>, InboundReceiver) {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut state = self.lock();
        let generation = state.next_generation;
        state.next_generation += 1;
        state.nodes.insert(
            node,
            Registration {
                generation,
                inbound: tx,
            },
        );
        let transport = MemoryTransport {
            me: node,
            generation,
            net: self.clone(),
        };
        (Arc::new(transport), rx)
    }

    /// Removes `node`: frames and calls to it fail/drop as if it crashed
    /// (calls get Unreachable). Its own transport goes dead as well, since a
    /// crashed node sends nothing.
    pub fn unregister(&self, node: NodeId) {
        self.lock().nodes.remove(&node);
    }

    /// Cuts both directions between a and b (symmetric partition);
    /// `heal_all` restores everything.
    pub fn partition(&self, a: NodeId, b: NodeId) {
        let mut state = self.lock();
        state.cuts.insert((a, b));
        state.cuts.insert((b, a));
    }

    /// Cuts only a -> b (asymmetric).
    pub fn cut_one_way(&self, from: NodeId, to: NodeId) {
        self.lock().cuts.insert((from, to));
    }

    /// Isolates a node from all others (both directions), including nodes
    /// that register after the isolation.
    pub fn isolate(&self, node: NodeId) {
        self.lock().isolated.insert(node);
    }

    /// Restores every link cut by `partition`, `cut_one_way` or `isolate`.
    /// Unregistered nodes stay unregistered.
    pub fn heal_all(&self) {
        let mut state = self.lock();
        state.cuts.clear();
        state.isolated.clear();
    }

    /// Locks the state. A panic elsewhere while holding the lock (only
    /// possible in a failing test) leaves the state consistent, because
    /// every update is a single collection operation, so poisoning is
    /// ignored rather than spreading the panic.
    fn lock(&self) -> MutexGuard<'_, NetState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Delivers `inbound` from `from` (incarnation `generation`) to `to`, or
    /// hands it back if `to` cannot be reached. When `needs_reply` is set the
    /// reverse link must be up too, since a response could not come back.
    /// Delivery happens under the lock, which is what keeps per-pair order.
    fn deliver(
        &self,
        from: NodeId,
        generation: u64,
        to: NodeId,
        inbound: Inbound,
        needs_reply: bool,
    ) -> Result<(), Inbound> {
        let state = self.lock();
        let reachable = state.is_current(from, generation)
            && state.link_up(from, to)
            && (!needs_reply || state.link_up(to, from));
        match state.nodes.get(&to) {
            Some(reg) if reachable => reg.inbound.send(inbound).map_err(|e| e.0),
            _ => Err(inbound),
        }
    }
}

/// A node's endpoint on a [`MemoryNetwork`].
pub struct MemoryTransport {
    me: NodeId,
    /// The registration this transport belongs to; once replaced or removed,
    /// the transport is dead.
    generation: u64,
    net: MemoryNetwork,
}

impl MemoryTransport {
    /// The node this transport sends as.
    pub fn node(&self) -> NodeId {
        self.me
    }
}

impl Transport for MemoryTransport {
    /// The in-process network has no connections to drop: every frame is
    /// attributed to its sender by construction.
    fn disconnect(&self, _peer: NodeId) {}

    fn send(&self, to: NodeId, frame: Vec<u8>) {
        if frame.len() > MAX_FRAME_LEN {
            tracing::trace!(from = %self.me, %to, len = frame.len(), "dropping oversized frame");
            return;
        }
        let inbound = Inbound::Frame {
            from: self.me,
            frame,
        };
        if self
            .net
            .deliver(self.me, self.generation, to, inbound, false)
            .is_err()
        {
            tracing::trace!(from = %self.me, %to, "dropping frame to unreachable node");
        }
    }

    fn call(&self, to: NodeId, request: Vec<u8>, timeout: Duration) -> CallFuture {
        // Everything that depends on the network's state is decided now, at
        // call time; the future only waits for the answer.
        let sent = if request.len() > MAX_FRAME_LEN {
            Err(TransportError::FrameTooLarge { len: request.len() })
        } else {
            let (reply, response) = oneshot::channel();
            let inbound = Inbound::Call {
                from: self.me,
                request,
                reply,
            };
            self.net
                .deliver(self.me, self.generation, to, inbound, true)
                .map(|()| response)
                .map_err(|_| TransportError::Unreachable(to))
        };
        Box::pin(async move {
            let response = sent?;
            match tokio::time::timeout(timeout, response).await {
                Err(_elapsed) => Err(TransportError::Timeout(to)),
                Ok(Err(_closed)) => Err(TransportError::Dropped(to)),
                // The response crosses the same network, so the same limit
                // applies to it as to the request.
                Ok(Ok(response)) if response.len() > MAX_FRAME_LEN => {
                    Err(TransportError::FrameTooLarge {
                        len: response.len(),
                    })
                }
                Ok(Ok(response)) => Ok(response),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::transport::{spawn_echo, DEFAULT_CALL_TIMEOUT};

    fn node(id: u64) -> NodeId {
        NodeId::new(id).expect("test node ids are non-zero")
    }

    /// The next frame waiting in `rx`, if any, without blocking.
    fn next_frame(rx: &mut InboundReceiver) -> Option<(NodeId, Vec<u8>)> {
        match rx.try_recv() {
            Ok(Inbound::Frame { from, frame }) => Some((from, frame)),
            Ok(Inbound::Call { .. }) => panic!("expected a frame, got a call"),
            Err(_) => None,
        }
    }

    #[tokio::test]
    async fn frames_arrive_in_send_order() {
        let net = MemoryNetwork::new();
        let (a, _rx_a) = net.endpoint(node(1));
        let (_b, mut rx_b) = net.endpoint(node(2));
        for i in 0..100u8 {
            a.send(node(2), vec![i]);
        }
        for i in 0..100u8 {
            assert_eq!(next_frame(&mut rx_b), Some((node(1), vec![i])));
        }
        assert_eq!(next_frame(&mut rx_b), None);
    }

    #[tokio::test]
    async fn call_round_trip() {
        let net = MemoryNetwork::new();
        let (a, _rx_a) = net.endpoint(node(1));
        let (_b, rx_b) = net.endpoint(node(2));
        spawn_echo(rx_b);
        let response = a
            .call(node(2), b"ping".to_vec(), DEFAULT_CALL_TIMEOUT)
            .await;
        assert_eq!(response, Ok(b"re:ping".to_vec()));
    }

    #[tokio::test]
    async fn call_reports_the_caller() {
        let net = MemoryNetwork::new();
        let (a, _rx_a) = net.endpoint(node(1));
        let (_b, mut rx_b) = net.endpoint(node(2));
        let call = a.call(node(2), b"who".to_vec(), DEFAULT_CALL_TIMEOUT);
        match rx_b.recv().await {
            Some(Inbound::Call {
                from,
                request,
                reply,
            }) => {
                assert_eq!(from, node(1));
                assert_eq!(request, b"who".to_vec());
                reply.send(b"you".to_vec()).expect("caller is waiting");
            }
            other => panic!("expected a call, got {other:?}"),
        }
        assert_eq!(call.await, Ok(b"you".to_vec()));
    }

    #[tokio::test]
    async fn call_to_unregistered_node_is_unreachable() {
        let net = MemoryNetwork::new();
        let (a, _rx_a) = net.endpoint(node(1));
        let never_registered = a.call(node(2), b"x".to_vec(), DEFAULT_CALL_TIMEOUT);
        assert_eq!(
            never_registered.await,
            Err(TransportError::Unreachable(node(2)))
        );

        let (_b, _rx_b) = net.endpoint(node(2));
        net.unregister(node(2));
        let unregistered = a.call(node(2), b"x".to_vec(), DEFAULT_CALL_TIMEOUT);
        assert_eq!(
            unregistered.await,
            Err(TransportError::Unreachable(node(2)))
        );
    }

    #[tokio::test]
    async fn frames_to_unregistered_node_are_dropped() {
        let net = MemoryNetwork::new();
        let (a, _rx_a) = net.endpoint(node(1));
        let (_b, mut rx_b) = net.endpoint(node(2));
        net.unregister(node(2));
        a.send(node(2), b"lost".to_vec());
        // The network let go of the only sender, so the receiver is closed
        // and empty: the frame went nowhere.
        assert!(rx_b.recv().await.is_none());
    }

    #[tokio::test]
    async fn unregistered_node_can_no_longer_send_or_call() {
        let net = MemoryNetwork::new();
        let (a, _rx_a) = net.endpoint(node(1));
        let (_b, mut rx_b) = net.endpoint(node(2));
        net.unregister(node(1));
        a.send(node(2), b"ghost".to_vec());
        assert_eq!(next_frame(&mut rx_b), None);
        let call = a.call(node(2), b"ghost".to_vec(), DEFAULT_CALL_TIMEOUT);
        assert_eq!(call.await, Err(TransportError::Unreachable(node(2))));
    }

    #[tokio::test]
    async fn partition_blocks_both_directions_until_healed() {
        let net = MemoryNetwork::new();
        let (a, mut rx_a) = net.endpoint(node(1));
        let (b, rx_b) = net.endpoint(node(2));
        let (c, mut rx_c) = net.endpoint(node(3));
        net.partition(node(1), node(2));

        a.send(node(2), b"a->b".to_vec());
        b.send(node(1), b"b->a".to_vec());
        assert_eq!(next_frame(&mut rx_a), None);
        let call = a.call(node(2), b"x".to_vec(), DEFAULT_CALL_TIMEOUT);
        assert_eq!(call.await, Err(TransportError::Unreachable(node(2))));
        let call = b.call(node(1), b"x".to_vec(), DEFAULT_CALL_TIMEOUT);
        assert_eq!(call.await, Err(TransportError::Unreachable(node(1))));

        // Links outside the partition are untouched.
        a.send(node(3), b"a->c".to_vec());
        assert_eq!(next_frame(&mut rx_c), Some((node(1), b"a->c".to_vec())));
        c.send(node(1), b"c->a".to_vec());
        assert_eq!(next_frame(&mut rx_a), Some((node(3), b"c->a".to_vec())));

        net.heal_all();
        b.send(node(1), b"healed".to_vec());
        assert_eq!(next_frame(&mut rx_a), Some((node(2), b"healed".to_vec())));
        spawn_echo(rx_b);
        let call = a.call(node(2), b"x".to_vec(), DEFAULT_CALL_TIMEOUT);
        assert_eq!(call.await, Ok(b"re:x".to_vec()));
    }

    #[tokio::test]
    async fn one_way_cut_blocks_only_that_direction() {
        let net = MemoryNetwork::new();
        let (a, mut rx_a) = net.endpoint(node(1));
        let (b, mut rx_b) = net.endpoint(node(2));
        net.cut_one_way(node(1), node(2));

        a.send(node(2), b"a->b".to_vec());
        assert_eq!(next_frame(&mut rx_b), None);
        b.send(node(1), b"b->a".to_vec());
        assert_eq!(next_frame(&mut rx_a), Some((node(2), b"b->a".to_vec())));

        let call = a.call(node(2), b"x".to_vec(), DEFAULT_CALL_TIMEOUT);
        assert_eq!(call.await, Err(TransportError::Unreachable(node(2))));
        // The response to b's call would have to cross the cut link.
        let call = b.call(node(1), b"x".to_vec(), DEFAULT_CALL_TIMEOUT);
        assert_eq!(call.await, Err(TransportError::Unreachable(node(1))));
        assert_eq!(next_frame(&mut rx_a), None);
    }

    #[tokio::test]
    async fn isolate_cuts_a_node_from_everyone_until_healed() {
        let net = MemoryNetwork::new();
        let (a, mut rx_a) = net.endpoint(node(1));
        let (b, mut rx_b) = net.endpoint(node(2));
        net.isolate(node(1));
        // A node registered after the isolation is cut off from it too.
        let (c, mut rx_c) = net.endpoint(node(3));

        a.send(node(2), b"x".to_vec());
        a.send(node(3), b"x".to_vec());
        b.send(node(1), b"x".to_vec());
        c.send(node(1), b"x".to_vec());
        assert_eq!(next_frame(&mut rx_a), None);
        assert_eq!(next_frame(&mut rx_b), None);
        assert_eq!(next_frame(&mut rx_c), None);

        // The isolated node still reaches itself, and the others each other.
        a.send(node(1), b"self".to_vec());
        assert_eq!(next_frame(&mut rx_a), Some((node(1), b"self".to_vec())));
        b.send(node(3), b"b->c".to_vec());
        assert_eq!(next_frame(&mut rx_c), Some((node(2), b"b->c".to_vec())));

        net.heal_all();
        a.send(node(2), b"healed".to_vec());
        assert_eq!(next_frame(&mut rx_b), Some((node(1), b"healed".to_vec())));
    }

    #[tokio::test]
    async fn call_times_out_when_callee_never_answers() {
        let net = MemoryNetwork::new();
        let (a, _rx_a) = net.endpoint(node(1));
        // The receiver stays alive (so the reply sender is never dropped) but
        // nobody reads it.
        let (_b, _rx_b) = net.endpoint(node(2));
        let call = a.call(node(2), b"x".to_vec(), Duration::from_millis(50));
        assert_eq!(call.await, Err(TransportError::Timeout(node(2))));
    }

    #[tokio::test]
    async fn call_is_dropped_when_callee_drops_the_reply() {
        let net = MemoryNetwork::new();
        let (a, _rx_a) = net.endpoint(node(1));
        let (_b, mut rx_b) = net.endpoint(node(2));
        tokio::spawn(async move {
            while let Some(inbound) = rx_b.recv().await {
                drop(inbound);
            }
        });
        let call = a.call(node(2), b"x".to_vec(), DEFAULT_CALL_TIMEOUT);
        assert_eq!(call.await, Err(TransportError::Dropped(node(2))));
    }

    #[tokio::test]
    async fn call_is_dropped_when_callee_receiver_goes_away() {
        let net = MemoryNetwork::new();
        let (a, _rx_a) = net.endpoint(node(1));
        let (_b, rx_b) = net.endpoint(node(2));
        let call = a.call(node(2), b"x".to_vec(), DEFAULT_CALL_TIMEOUT);
        // The call is queued; the node "crashes" with it unanswered.
        drop(rx_b);
        assert_eq!(call.await, Err(TransportError::Dropped(node(2))));
    }

    #[tokio::test]
    async fn reregistering_closes_the_old_receiver_and_retires_the_old_transport() {
        let net = MemoryNetwork::new();
        let (a, _rx_a) = net.endpoint(node(1));
        let (old_b, mut old_rx) = net.endpoint(node(2));
        a.send(node(2), b"before".to_vec());
        let (new_b, mut new_rx) = net.endpoint(node(2));
        a.send(node(2), b"after".to_vec());

        // What was queued before the restart drains, then the channel is closed.
        match old_rx.recv().await {
            Some(Inbound::Frame { frame, .. }) => assert_eq!(frame, b"before".to_vec()),
            other => panic!("expected the queued frame, got {other:?}"),
        }
        assert!(old_rx.recv().await.is_none());
        assert_eq!(next_frame(&mut new_rx), Some((node(1), b"after".to_vec())));

        // Only the new incarnation may speak for node 2.
        let (_c, mut rx_c) = net.endpoint(node(3));
        old_b.send(node(3), b"stale".to_vec());
        new_b.send(node(3), b"fresh".to_vec());
        assert_eq!(next_frame(&mut rx_c), Some((node(2), b"fresh".to_vec())));
        assert_eq!(next_frame(&mut rx_c), None);
    }

    #[tokio::test]
    async fn oversized_frames_are_refused() {
        let net = MemoryNetwork::new();
        let (a, _rx_a) = net.endpoint(node(1));
        let (_b, mut rx_b) = net.endpoint(node(2));

        a.send(node(2), vec![0; MAX_FRAME_LEN + 1]);
        assert_eq!(next_frame(&mut rx_b), None);
        // The limit itself is allowed.
        a.send(node(2), vec![0; MAX_FRAME_LEN]);
        assert_eq!(
            next_frame(&mut rx_b).map(|(_, frame)| frame.len()),
            Some(MAX_FRAME_LEN)
        );

        let call = a.call(node(2), vec![0; MAX_FRAME_LEN + 1], DEFAULT_CALL_TIMEOUT);
        assert_eq!(
            call.await,
            Err(TransportError::FrameTooLarge {
                len: MAX_FRAME_LEN + 1
            })
        );
        assert!(rx_b.try_recv().is_err(), "the oversized call was delivered");
    }

    #[tokio::test]
    async fn oversized_response_is_refused() {
        let net = MemoryNetwork::new();
        let (a, _rx_a) = net.endpoint(node(1));
        let (_b, mut rx_b) = net.endpoint(node(2));
        tokio::spawn(async move {
            if let Some(Inbound::Call { reply, .. }) = rx_b.recv().await {
                let _ = reply.send(vec![0; MAX_FRAME_LEN + 1]);
            }
        });
        let call = a.call(node(2), b"x".to_vec(), DEFAULT_CALL_TIMEOUT);
        assert_eq!(
            call.await,
            Err(TransportError::FrameTooLarge {
                len: MAX_FRAME_LEN + 1
            })
        );
    }
}
