//! Node-level liveness for hibernating groups.
//!
//! A follower of a sleeping group hears nothing from its leader for that
//! group, so it needs another sign that the leader is still there before it
//! may stop counting towards an election. That sign is per node, not per
//! group (CockroachDB's coalesced heartbeats): every frame from a peer
//! counts, and when this node has sent a peer nothing for a ping interval
//! it sends an empty Raft frame. One ping per peer and interval replaces a
//! heartbeat per group.

use crate::core::ids::NodeId;
use std::collections::BTreeMap;
use std::time::Duration;
use tokio::time::Instant;

pub(crate) struct Liveness {
    /// A peer that has sent nothing for this long no longer counts as
    /// reachable: a sleeping follower of a group it leads starts ticking.
    window: Duration,
    /// Send a ping to a peer that was sent nothing for this long.
    ping_interval: Duration,
    heard: BTreeMap<NodeId, Instant>,
    sent: BTreeMap<NodeId, Instant>,
}

impl Liveness {
    /// Pings go out every `ping_interval` (a Raft heartbeat interval); a
    /// peer is reachable while one of its last two pings, with a margin of
    /// half an interval for scheduling, has arrived. The window is thus
    /// longer than the engine's `silence_ticks` (two heartbeat intervals),
    /// which a follower woken by it counts as already elapsed.
    pub(crate) fn new(ping_interval: Duration) -> Self {
        Liveness {
            window: ping_interval * 2 + ping_interval / 2,
            ping_interval,
            heard: BTreeMap::new(),
            sent: BTreeMap::new(),
        }
    }

    pub(crate) fn heard_from(&mut self, peer: NodeId, now: Instant) {
        self.heard.insert(peer, now);
    }

    pub(crate) fn sent_to(&mut self, peer: NodeId, now: Instant) {
        self.sent.insert(peer, now);
    }

    pub(crate) fn reachable(&self, peer: NodeId, now: Instant) -> bool {
        self.heard
            .get(&peer)
            .is_some_and(|&at| now.saturating_duration_since(at) < self.window)
    }

    /// The peers among `peers` that are due a ping now, which the caller
    /// then sends (and records with [`Liveness::sent_to`]). Forgets peers no
    /// longer in `peers`.
    pub(crate) fn pings_due(
        &mut self,
        peers: &std::collections::BTreeSet<NodeId>,
        now: Instant,
    ) -> Vec<NodeId> {
        self.sent.retain(|peer, _| peers.contains(peer));
        self.heard.retain(|peer, _| peers.contains(peer));
        peers
            .iter()
            .copied()
            .filter(|peer| {
                self.sent
                    .get(peer)
                    .is_none_or(|&at| now.saturating_duration_since(at) >= self.ping_interval)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(id: u64) -> NodeId {
        NodeId::new(id).unwrap()
    }

    #[test]
    fn a_peer_is_reachable_for_two_and_a_half_intervals_after_a_frame() {
        let start = Instant::now();
        let mut live = Liveness::new(Duration::from_millis(200));
        assert!(!live.reachable(n(2), start), "never heard from");
        live.heard_from(n(2), start);
        assert!(live.reachable(n(2), start + Duration::from_millis(499)));
        assert!(!live.reachable(n(2), start + Duration::from_millis(500)));
    }

    #[test]
    fn pings_go_only_to_peers_sent_nothing_for_an_interval() {
        let start = Instant::now();
        let mut live = Liveness::new(Duration::from_millis(200));
        let peers = [n(2), n(3)].into_iter().collect();
        assert_eq!(live.pings_due(&peers, start), vec![n(2), n(3)]);
        live.sent_to(n(2), start);
        live.sent_to(n(3), start + Duration::from_millis(100));
        let later = start + Duration::from_millis(200);
        assert_eq!(live.pings_due(&peers, later), vec![n(2)]);
        let fewer = [n(3)].into_iter().collect();
        assert_eq!(live.pings_due(&fewer, later), Vec::<NodeId>::new());
        assert!(
            !live.sent.contains_key(&n(2)),
            "a departed peer is forgotten"
        );
    }
}
