//! keel's [`Transport`] over madsim's simulated network, with keel-level
//! network faults on top (DESIGN.md §8 "Network faults").
//!
//! # Addressing
//!
//! Keel node `N` lives at IP `10.a.b.c`, where `a.b.c` are the low 24 bits of
//! `N` (so `10.0.(N/256).(N%256)` for `N < 65536`), port [`KEEL_PORT`]. The
//! harness must give each madsim node the IP [`node_ip`] of the keel node it
//! runs. Ids above [`MAX_ADDRESSABLE_NODE`] have no address: `bind` refuses
//! them and frames or calls to them go nowhere.
//!
//! # Wire
//!
//! Every message is one madsim datagram on the node's endpoint, carrying a
//! typed `Datagram` (madsim moves Rust values between nodes, so encoding to
//! bytes would only add a copy): the sender's incarnation and either a frame
//! (with an optional per-link sequence number), a request (call id) or a
//! response (the caller's incarnation and call id; `None` when the callee
//! dropped the call). The sender's node id is read from the datagram's source
//! address, so a node cannot claim to be another.
//!
//! # Faults
//!
//! Two layers, both seeded:
//! - madsim's own network: per-datagram latency (`send_latency`), optional
//!   `packet_loss_rate`, and clogging, which [`NetControl`] drives for
//!   partitions. These apply to *all* traffic, calls included.
//! - [`NetFaults`], applied by the sender to one-way frames only: loss,
//!   duplication, reordering delay and delay spikes, from the transport's own
//!   `ChaCha8Rng`. Calls are exempt: they stand for the node's reliable
//!   request streams (QUIC streams in production), and a lost request or
//!   response would only turn into a timeout, which partitions already
//!   exercise. Raft frames are the traffic that must tolerate loss,
//!   duplication and reordering.
//!
//! Datagrams give no delivery error, so a call across a partition or to a
//! dead node ends in [`TransportError::Timeout`], as over a real network;
//! `Unreachable` is only returned for ids without an address.
//!
//! # Order
//!
//! madsim gives each datagram an independent random latency and its mailbox
//! does not keep arrival order, so per-link FIFO is rebuilt here: frames that
//! keel-level faults do not delay carry a per-destination sequence number,
//! and the receiver holds a frame that arrives after a gap for the *holdback
//! window* (madsim's latency spread plus [`HOLDBACK_SLACK`]). Every earlier
//! frame that still arrives does so within that window, so without keel-level
//! delays frames are delivered in send order; a gap left by a lost datagram
//! only delays what follows it by the window. Frames delayed by `reorder_ms`
//! or a spike, and duplicate copies, are sent unsequenced and delivered on
//! arrival: they are the reordering. (With madsim's buggify enabled, its
//! multi-second send delays exceed the window and late frames arrive out of
//! order.)
//!
//! Each `bind` is a new *incarnation*, numbered by the simulated time it
//! bound at, so a restarted sender's sequence restarts from zero and
//! responses meant for a previous incarnation's calls are ignored.
//!
//! # Tasks
//!
//! `bind` spawns, on the current madsim node, a dispatcher (all sends go
//! through it, so they run on the endpoint's node whoever calls `send`) and
//! [`RECEIVE_WORKERS`] receive loops: every madsim receive costs at least a
//! millisecond of simulated time, so one loop would cap a node at a thousand
//! datagrams per second. All of them die with the node when madsim kills it.
//! To restart a node, `kill` it before `restart` (restart alone keeps the old
//! socket bound), then `bind` again on it.

use keel::core::ids::NodeId;
use keel::io::transport::{
    CallFuture, Inbound, InboundReceiver, Transport, TransportError, MAX_FRAME_LEN,
};
use madsim::net::{Endpoint, NetSim};
use madsim::task::NodeId as MadsimNodeId;
use madsim::time::{Instant, TimeHandle};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// The port every keel node listens on.
pub const KEEL_PORT: u16 = 7000;

/// The largest node id that has a simulated address (24 bits of IP).
pub const MAX_ADDRESSABLE_NODE: u64 = (1 << 24) - 1;

/// How many receive loops a node runs (see the module docs).
pub const RECEIVE_WORKERS: usize = 64;

/// Added to madsim's latency spread to form the holdback window: covers the
/// time a datagram may wait in the mailbox for a free receive loop.
pub const HOLDBACK_SLACK: Duration = Duration::from_millis(10);

/// The madsim message tag of keel traffic.
const TAG: u64 = u64::from_be_bytes(*b"keel-net");

/// Keel-level faults on one-way frames, shared with the supervisor so that it
/// can change or heal them during a run.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct NetFaults {
    /// Probability that a one-way frame is dropped.
    pub loss: f64,
    /// Probability that a one-way frame is delivered twice.
    pub duplicate: f64,
    /// Extra random delay of 0..=reorder_ms per frame (reordering).
    pub reorder_ms: u64,
    /// Probability of a delay spike.
    pub spike: f64,
    /// Spike size.
    pub spike_ms: u64,
}

/// The simulated IP of keel node `node` (low 24 bits of the id under 10/8).
pub fn node_ip(node: NodeId) -> IpAddr {
    let [_, _, _, _, _, a, b, c] = node.get().to_be_bytes();
    IpAddr::V4(Ipv4Addr::new(10, a, b, c))
}

/// The simulated socket address of keel node `node`.
pub fn node_addr(node: NodeId) -> SocketAddr {
    SocketAddr::new(node_ip(node), KEEL_PORT)
}

/// The address of `node`, if its id fits the addressing scheme.
fn address(node: NodeId) -> Option<SocketAddr> {
    (node.get() <= MAX_ADDRESSABLE_NODE).then(|| node_addr(node))
}

/// The keel node at `addr`: the inverse of [`node_addr`].
fn node_at(addr: SocketAddr) -> Option<NodeId> {
    match addr {
        SocketAddr::V4(v4) if v4.port() == KEEL_PORT => match v4.ip().octets() {
            [10, a, b, c] => NodeId::new(u64::from_be_bytes([0, 0, 0, 0, 0, a, b, c])).ok(),
            _ => None,
        },
        _ => None,
    }
}

/// One madsim datagram of keel traffic.
struct Datagram {
    /// The sender's incarnation.
    incarnation: u64,
    body: Body,
}

enum Body {
    /// A one-way frame; `seq` orders it on its link unless it is one that
    /// keel-level faults delayed or duplicated.
    Frame {
        seq: Option<u64>,
        frame: Vec<u8>,
    },
    Request {
        call: u64,
        request: Vec<u8>,
    },
    /// `response` is `None` when the callee dropped the call unanswered.
    Response {
        caller_incarnation: u64,
        call: u64,
        response: Option<Vec<u8>>,
    },
}

/// A datagram on its way to the dispatcher.
struct Outgoing {
    to: SocketAddr,
    delay: Duration,
    datagram: Datagram,
}

/// Everything the transport and its tasks share.
struct Shared {
    me: NodeId,
    incarnation: u64,
    outbound: mpsc::UnboundedSender<Outgoing>,
    inbound: mpsc::UnboundedSender<Inbound>,
    faults: Arc<Mutex<NetFaults>>,
    state: Mutex<State>,
}

struct State {
    /// The only source of keel-level fault decisions.
    rng: ChaCha8Rng,
    /// Next sequence number per destination.
    next_seq: BTreeMap<NodeId, u64>,
    next_call: u64,
    pending: BTreeMap<u64, PendingCall>,
    /// Reassembly of sequenced frames per source.
    streams: BTreeMap<NodeId, Stream>,
}

/// What a caller waits on: the response, or `None` if the callee dropped
/// the call.
type Answer = oneshot::Receiver<Option<Vec<u8>>>;

struct PendingCall {
    to: NodeId,
    reply: oneshot::Sender<Option<Vec<u8>>>,
}

/// The sequenced frames of one source, put back in send order.
struct Stream {
    incarnation: u64,
    next: u64,
    held: BTreeMap<u64, Held>,
    /// The deadline of the earliest armed holdback timer.
    timer: Option<Instant>,
}

/// A frame that arrived after a gap.
struct Held {
    frame: Vec<u8>,
    /// When the gap before it may be skipped: every earlier frame that still
    /// arrives has done so by then.
    deadline: Instant,
}

/// Locks `mutex`, ignoring poisoning: every update under these locks is
/// complete before anything that could panic, so the state stays consistent.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The current simulated time.
fn now() -> Instant {
    TimeHandle::current().now_instant()
}

/// madsim's latency spread plus slack: how long a frame after a gap waits.
fn holdback_window() -> Duration {
    let mut spread = Duration::ZERO;
    // NetSim has no getter for its configuration; this reads it unchanged.
    NetSim::current().update_config(|config| {
        spread = config
            .send_latency
            .end
            .saturating_sub(config.send_latency.start);
    });
    spread + HOLDBACK_SLACK
}

/// A uniform draw in [0, 1).
fn unit(rng: &mut ChaCha8Rng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// True with probability `p` (never for `p <= 0` or NaN, always for `p >= 1`).
fn chance(rng: &mut ChaCha8Rng, p: f64) -> bool {
    p > 0.0 && unit(rng) < p
}

/// The keel-level delay of one frame copy: reordering jitter plus a spike.
fn extra_delay(rng: &mut ChaCha8Rng, faults: &NetFaults) -> Duration {
    let mut ms = 0;
    if faults.reorder_ms > 0 {
        ms = rng.next_u64() % faults.reorder_ms.saturating_add(1);
    }
    if chance(rng, faults.spike) {
        ms = ms.saturating_add(faults.spike_ms);
    }
    Duration::from_millis(ms)
}

impl State {
    fn new(seed: u64) -> Self {
        State {
            rng: ChaCha8Rng::seed_from_u64(seed),
            next_seq: BTreeMap::new(),
            next_call: 0,
            pending: BTreeMap::new(),
            streams: BTreeMap::new(),
        }
    }

    /// The copies of one frame to `to` that go out: `(seq, delay)` each.
    /// Only an undelayed first copy is sequenced; a lost frame takes no
    /// sequence number, so it leaves no gap for the receiver to wait on.
    fn plan_frame(&mut self, faults: &NetFaults, to: NodeId) -> Vec<(Option<u64>, Duration)> {
        if chance(&mut self.rng, faults.loss) {
            return Vec::new();
        }
        let delay = extra_delay(&mut self.rng, faults);
        let seq = delay.is_zero().then(|| {
            let next = self.next_seq.entry(to).or_insert(0);
            let seq = *next;
            *next += 1;
            seq
        });
        let mut copies = vec![(seq, delay)];
        if chance(&mut self.rng, faults.duplicate) {
            copies.push((None, extra_delay(&mut self.rng, faults)));
        }
        copies
    }
}

impl Stream {
    fn new(incarnation: u64) -> Self {
        Stream {
            incarnation,
            next: 0,
            held: BTreeMap::new(),
            timer: None,
        }
    }

    /// Takes in a sequenced frame; frames that can go out at once (late
    /// ones) are appended to `ready`.
    fn accept(
        &mut self,
        incarnation: u64,
        seq: u64,
        frame: Vec<u8>,
        deadline: Instant,
        ready: &mut Vec<Vec<u8>>,
    ) {
        if incarnation > self.incarnation {
            // The sender restarted: gaps before what the old incarnation left
            // held will never fill, and the new one numbers from zero.
            ready.extend(
                std::mem::take(&mut self.held)
                    .into_values()
                    .map(|h| h.frame),
            );
            self.incarnation = incarnation;
            self.next = 0;
        }
        if incarnation < self.incarnation || seq < self.next {
            // From before a restart, or after its gap was skipped: late.
            ready.push(frame);
        } else {
            self.held.entry(seq).or_insert(Held { frame, deadline });
        }
    }

    /// Appends to `ready`, in order, every held frame that is next in line
    /// or whose gap has waited out the holdback window at `now`.
    fn release(&mut self, now: Instant, ready: &mut Vec<Vec<u8>>) {
        loop {
            while let Some(entry) = self.held.first_entry() {
                if *entry.key() != self.next {
                    break;
                }
                ready.push(entry.remove().frame);
                self.next += 1;
            }
            // Once a frame's deadline passes, everything sent before it has
            // arrived or is lost, so the gaps up to it can be skipped.
            let Some(cutoff) = self
                .held
                .iter()
                .filter(|(_, held)| held.deadline <= now)
                .map(|(&seq, _)| seq)
                .max()
            else {
                break;
            };
            let later = self.held.split_off(&cutoff.saturating_add(1));
            let skipped = std::mem::replace(&mut self.held, later);
            ready.extend(skipped.into_values().map(|h| h.frame));
            self.next = cutoff.saturating_add(1);
        }
    }

    /// The deadline to arm a holdback timer for, unless one armed earlier
    /// will fire first (and re-arm as needed).
    fn arm(&mut self) -> Option<Instant> {
        let earliest = self.held.values().map(|held| held.deadline).min()?;
        if self.timer.is_some_and(|armed| armed <= earliest) {
            return None;
        }
        self.timer = Some(earliest);
        Some(earliest)
    }
}

impl Shared {
    /// Queues a datagram for the dispatcher. Fails silently when the node is
    /// dead (its dispatcher gone), as a crashed node sends nothing.
    fn transmit(&self, to: SocketAddr, delay: Duration, body: Body) {
        let datagram = Datagram {
            incarnation: self.incarnation,
            body,
        };
        let _ = self.outbound.send(Outgoing {
            to,
            delay,
            datagram,
        });
    }

    /// Hands a frame to the node. A node that dropped its receiver is going
    /// away; the frame goes with it.
    fn deliver(&self, from: NodeId, frame: Vec<u8>) {
        let _ = self.inbound.send(Inbound::Frame { from, frame });
    }

    fn receive(self: &Arc<Self>, from: NodeId, datagram: Datagram) {
        match datagram.body {
            Body::Frame { seq: None, frame } => self.deliver(from, frame),
            Body::Frame {
                seq: Some(seq),
                frame,
            } => self.sequenced(from, datagram.incarnation, seq, frame),
            Body::Request { call, request } => {
                self.serve(from, datagram.incarnation, call, request)
            }
            Body::Response {
                caller_incarnation,
                call,
                response,
            } => self.complete(from, caller_incarnation, call, response),
        }
    }

    fn sequenced(self: &Arc<Self>, from: NodeId, incarnation: u64, seq: u64, frame: Vec<u8>) {
        let now = now();
        let deadline = now + holdback_window();
        let mut ready = Vec::new();
        let mut state = lock(&self.state);
        let stream = state
            .streams
            .entry(from)
            .or_insert_with(|| Stream::new(incarnation));
        stream.accept(incarnation, seq, frame, deadline, &mut ready);
        stream.release(now, &mut ready);
        let timer = stream.arm();
        // Delivered under the lock, so concurrent receive loops cannot
        // interleave their releases.
        for frame in ready {
            self.deliver(from, frame);
        }
        drop(state);
        if let Some(deadline) = timer {
            self.arm_timer(from, deadline);
        }
    }

    fn arm_timer(self: &Arc<Self>, from: NodeId, deadline: Instant) {
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            madsim::time::sleep_until(deadline).await;
            shared.expire(from, deadline);
        });
    }

    /// A holdback timer fired: release what waited long enough.
    fn expire(self: &Arc<Self>, from: NodeId, deadline: Instant) {
        let now = now();
        let mut ready = Vec::new();
        let mut state = lock(&self.state);
        let Some(stream) = state.streams.get_mut(&from) else {
            return;
        };
        if stream.timer == Some(deadline) {
            stream.timer = None;
        }
        stream.release(now, &mut ready);
        let timer = stream.arm();
        for frame in ready {
            self.deliver(from, frame);
        }
        drop(state);
        if let Some(deadline) = timer {
            self.arm_timer(from, deadline);
        }
    }

    /// Hands a call to the node and sends back whatever it answers, or
    /// `None` if it drops the call (or is not listening any more).
    fn serve(self: &Arc<Self>, from: NodeId, caller_incarnation: u64, call: u64, request: Vec<u8>) {
        let Some(caller) = address(from) else {
            return;
        };
        let (reply, answer) = oneshot::channel();
        // On failure the call (and its reply sender) is dropped, so `answer`
        // resolves to an error and the caller hears "dropped".
        let _ = self.inbound.send(Inbound::Call {
            from,
            request,
            reply,
        });
        let shared = Arc::clone(self);
        tokio::spawn(async move {
            let response = answer.await.ok();
            shared.transmit(
                caller,
                Duration::ZERO,
                Body::Response {
                    caller_incarnation,
                    call,
                    response,
                },
            );
        });
    }

    /// Matches a response to its pending call; anything else (a previous
    /// incarnation's call, a call already timed out, a response from a node
    /// the call did not go to) is ignored.
    fn complete(
        &self,
        from: NodeId,
        caller_incarnation: u64,
        call: u64,
        response: Option<Vec<u8>>,
    ) {
        if caller_incarnation != self.incarnation {
            return;
        }
        let mut state = lock(&self.state);
        if state
            .pending
            .get(&call)
            .is_some_and(|pending| pending.to == from)
        {
            if let Some(pending) = state.pending.remove(&call) {
                // The caller may have stopped waiting; nothing to do then.
                let _ = pending.reply.send(response);
            }
        }
    }

    /// Registers and sends a call; the guard forgets the call when dropped.
    fn start_call(
        self: &Arc<Self>,
        to: NodeId,
        request: Vec<u8>,
    ) -> Result<(PendingGuard, Answer), TransportError> {
        if request.len() > MAX_FRAME_LEN {
            return Err(TransportError::FrameTooLarge { len: request.len() });
        }
        let addr = address(to).ok_or(TransportError::Unreachable(to))?;
        let (reply, answer) = oneshot::channel();
        let mut state = lock(&self.state);
        let call = state.next_call;
        state.next_call += 1;
        state.pending.insert(call, PendingCall { to, reply });
        drop(state);
        self.transmit(addr, Duration::ZERO, Body::Request { call, request });
        let guard = PendingGuard {
            shared: Arc::clone(self),
            call,
        };
        Ok((guard, answer))
    }
}

/// Removes a call from the pending map when its future finishes or is
/// dropped, so timed-out and abandoned calls do not accumulate.
struct PendingGuard {
    shared: Arc<Shared>,
    call: u64,
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        lock(&self.shared.state).pending.remove(&self.call);
    }
}

/// A node's endpoint on madsim's network.
pub struct SimTransport {
    shared: Arc<Shared>,
}

impl SimTransport {
    /// The node this transport sends as.
    pub fn node(&self) -> NodeId {
        self.shared.me
    }
}

impl Transport for SimTransport {
    /// The simulated network attributes every frame to the machine that
    /// sent it, so no peer can forge its identity and there is nothing to drop.
    fn disconnect(&self, _peer: NodeId) {}

    fn send(&self, to: NodeId, mut frame: Vec<u8>) {
        if frame.len() > MAX_FRAME_LEN {
            tracing::trace!(from = %self.shared.me, %to, len = frame.len(), "dropping oversized frame");
            return;
        }
        let Some(addr) = address(to) else {
            tracing::trace!(from = %self.shared.me, %to, "dropping frame to a node without an address");
            return;
        };
        let faults = lock(&self.shared.faults).clone();
        // Planned and queued under one lock, so sequence numbers reach the
        // dispatcher in order.
        let mut state = lock(&self.shared.state);
        let mut copies = state.plan_frame(&faults, to).into_iter().peekable();
        if copies.peek().is_none() {
            tracing::trace!(from = %self.shared.me, %to, "frame lost (injected)");
        }
        while let Some((seq, delay)) = copies.next() {
            let copy = if copies.peek().is_some() {
                frame.clone()
            } else {
                std::mem::take(&mut frame)
            };
            self.shared
                .transmit(addr, delay, Body::Frame { seq, frame: copy });
        }
    }

    fn call(&self, to: NodeId, request: Vec<u8>, timeout: Duration) -> CallFuture {
        // Sent now, like any binding; the future only waits for the answer.
        let started = self.shared.start_call(to, request);
        Box::pin(async move {
            let (pending, answer) = started?;
            let outcome = madsim::time::timeout(timeout, answer).await;
            drop(pending);
            match outcome {
                Err(_elapsed) => Err(TransportError::Timeout(to)),
                Ok(Err(_) | Ok(None)) => Err(TransportError::Dropped(to)),
                // The response crosses the same network, so the same limit
                // applies to it as to the request.
                Ok(Ok(Some(response))) if response.len() > MAX_FRAME_LEN => {
                    Err(TransportError::FrameTooLarge {
                        len: response.len(),
                    })
                }
                Ok(Ok(Some(response))) => Ok(response),
            }
        })
    }
}

/// Binds keel node `me` on the current madsim node (whose IP must be
/// [`node_ip`]`(me)`) and returns its transport and inbound receiver.
///
/// `faults` is shared with the supervisor, which may change it at any time;
/// `seed` seeds the transport's fault decisions and nothing else.
pub async fn bind(
    me: NodeId,
    faults: Arc<Mutex<NetFaults>>,
    seed: u64,
) -> io::Result<(Arc<SimTransport>, InboundReceiver)> {
    let addr = address(me).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("node id {me} has no simulated address; ids above {MAX_ADDRESSABLE_NODE} cannot be simulated"),
        )
    })?;
    let endpoint = Endpoint::bind(addr).await?;
    let incarnation = u64::try_from(TimeHandle::current().elapsed().as_nanos()).unwrap_or(u64::MAX);
    let (outbound, outbound_rx) = mpsc::unbounded_channel();
    let (inbound, inbound_rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        me,
        incarnation,
        outbound,
        inbound,
        faults,
        state: Mutex::new(State::new(seed)),
    });
    tokio::spawn(dispatch(endpoint.clone(), outbound_rx));
    for _ in 0..RECEIVE_WORKERS {
        tokio::spawn(receive_loop(Arc::clone(&shared), endpoint.clone()));
    }
    Ok((Arc::new(SimTransport { shared }), inbound_rx))
}

/// Sends every queued datagram from its own task, so that madsim's
/// per-send delay does not serialise the node's traffic.
async fn dispatch(endpoint: Endpoint, mut outbound: mpsc::UnboundedReceiver<Outgoing>) {
    while let Some(Outgoing {
        to,
        delay,
        datagram,
    }) = outbound.recv().await
    {
        let endpoint = endpoint.clone();
        tokio::spawn(async move {
            if !delay.is_zero() {
                madsim::time::sleep(delay).await;
            }
            if let Err(error) = endpoint.send_to_raw(to, TAG, Box::new(datagram)).await {
                tracing::trace!(%to, %error, "datagram not sent");
            }
        });
    }
}

async fn receive_loop(shared: Arc<Shared>, endpoint: Endpoint) {
    loop {
        let (payload, source) = match endpoint.recv_from_raw(TAG).await {
            Ok(message) => message,
            Err(error) => {
                tracing::trace!(node = %shared.me, %error, "receive loop ends");
                return;
            }
        };
        let Some(from) = node_at(source) else {
            tracing::trace!(node = %shared.me, %source, "datagram from an address that is no keel node");
            continue;
        };
        match payload.downcast::<Datagram>() {
            Ok(datagram) => shared.receive(from, *datagram),
            Err(_) => {
                tracing::trace!(node = %shared.me, %source, "datagram that is no keel traffic")
            }
        }
    }
}

/// Partitions by keel node id, applied as madsim link clogs.
///
/// The cut state is kept by keel id and re-applied whenever it or the id map
/// changes, so cuts made before a node registers (or re-registers under a new
/// madsim node) take effect once it does. A node always reaches itself.
/// Methods must be called inside the simulation. `heal_all` does not touch
/// [`NetFaults`]; the supervisor resets those itself.
#[derive(Clone, Default)]
pub struct NetControl {
    state: Arc<Mutex<ControlState>>,
}

#[derive(Default)]
struct ControlState {
    nodes: BTreeMap<NodeId, MadsimNodeId>,
    /// Cut directed links `(from, to)`.
    cuts: BTreeSet<(NodeId, NodeId)>,
    /// Nodes cut from every other node.
    isolated: BTreeSet<NodeId>,
    /// The madsim links currently clogged on our behalf.
    applied: BTreeSet<(MadsimNodeId, MadsimNodeId)>,
}

impl ControlState {
    /// The madsim links the recorded cuts call for.
    fn wanted(&self) -> BTreeSet<(MadsimNodeId, MadsimNodeId)> {
        let isolation = self.isolated.iter().flat_map(|&lonely| {
            self.nodes
                .keys()
                .flat_map(move |&other| [(lonely, other), (other, lonely)])
        });
        self.cuts
            .iter()
            .copied()
            .chain(isolation)
            .filter(|(from, to)| from != to)
            .filter_map(|(from, to)| Some((*self.nodes.get(&from)?, *self.nodes.get(&to)?)))
            .collect()
    }

    /// Clogs and unclogs madsim links until they match the recorded cuts.
    fn sync(&mut self) {
        let wanted = self.wanted();
        let net = NetSim::current();
        for &(from, to) in self.applied.difference(&wanted) {
            net.unclog_link(from, to);
        }
        for &(from, to) in wanted.difference(&self.applied) {
            net.clog_link(from, to);
        }
        self.applied = wanted;
    }
}

impl NetControl {
    pub fn new() -> Self {
        Self::default()
    }

    /// Records that keel node `node` runs on madsim node `madsim_id`
    /// (replacing an earlier registration).
    pub fn register(&self, node: NodeId, madsim_id: MadsimNodeId) {
        let mut state = lock(&self.state);
        state.nodes.insert(node, madsim_id);
        state.sync();
    }

    /// The madsim node keel node `node` is registered on.
    pub fn madsim_id(&self, node: NodeId) -> Option<MadsimNodeId> {
        lock(&self.state).nodes.get(&node).copied()
    }

    /// Cuts both directions between `a` and `b` (symmetric partition).
    pub fn partition(&self, a: NodeId, b: NodeId) {
        let mut state = lock(&self.state);
        state.cuts.insert((a, b));
        state.cuts.insert((b, a));
        state.sync();
    }

    /// Cuts only `from` -> `to` (asymmetric partition).
    pub fn cut_one_way(&self, from: NodeId, to: NodeId) {
        let mut state = lock(&self.state);
        state.cuts.insert((from, to));
        state.sync();
    }

    /// Cuts `node` from every other node, both directions.
    pub fn isolate(&self, node: NodeId) {
        let mut state = lock(&self.state);
        state.isolated.insert(node);
        state.sync();
    }

    /// Restores every link cut by `partition`, `cut_one_way` or `isolate`.
    pub fn heal_all(&self) {
        let mut state = lock(&self.state);
        state.cuts.clear();
        state.isolated.clear();
        state.sync();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use keel::io::transport::DEFAULT_CALL_TIMEOUT;
    use madsim::runtime::{Handle, NodeHandle, Runtime};
    use madsim::time::sleep;
    use std::future::Future;

    fn node(id: u64) -> NodeId {
        NodeId::new(id).expect("test node ids are non-zero")
    }

    fn sim<F: Future>(seed: u64, test: F) -> F::Output {
        Runtime::with_seed_and_config(seed, madsim::Config::default()).block_on(test)
    }

    fn faults(faults: NetFaults) -> Arc<Mutex<NetFaults>> {
        Arc::new(Mutex::new(faults))
    }

    struct Peer {
        host: NodeHandle,
        transport: Arc<SimTransport>,
        inbound: InboundReceiver,
    }

    /// Creates a madsim node per keel id, registers it and binds on it.
    async fn start(ids: &[u64], faults: &Arc<Mutex<NetFaults>>, control: &NetControl) -> Vec<Peer> {
        let mut peers = Vec::new();
        for &id in ids {
            let host = Handle::current()
                .create_node()
                .name(format!("n{id}"))
                .ip(node_ip(node(id)))
                .build();
            control.register(node(id), host.id());
            let (transport, inbound) = host
                .spawn(bind(node(id), Arc::clone(faults), id * 1000))
                .await
                .expect("bind task ran")
                .expect("bind succeeded");
            peers.push(Peer {
                host,
                transport,
                inbound,
            });
        }
        peers
    }

    /// Everything that has arrived at `rx` after waiting `wait`.
    async fn drain(rx: &mut InboundReceiver, wait: Duration) -> Vec<(NodeId, Vec<u8>)> {
        sleep(wait).await;
        let mut frames = Vec::new();
        while let Ok(inbound) = rx.try_recv() {
            match inbound {
                Inbound::Frame { from, frame } => frames.push((from, frame)),
                Inbound::Call { .. } => panic!("expected only frames"),
            }
        }
        frames
    }

    fn payloads(frames: &[(NodeId, Vec<u8>)]) -> Vec<u32> {
        frames
            .iter()
            .map(|(_, f)| u32::from_be_bytes(f[..].try_into().expect("4-byte test frames")))
            .collect()
    }

    fn send_numbered(transport: &SimTransport, to: u64, count: u32) {
        for i in 0..count {
            transport.send(node(to), i.to_be_bytes().to_vec());
        }
    }

    /// Answers every call at `rx` with the request prefixed by "re:".
    fn spawn_echo(host: &NodeHandle, mut rx: InboundReceiver) {
        host.spawn(async move {
            while let Some(inbound) = rx.recv().await {
                if let Inbound::Call { request, reply, .. } = inbound {
                    let mut response = b"re:".to_vec();
                    response.extend_from_slice(&request);
                    let _ = reply.send(response);
                }
            }
        });
    }

    #[test]
    fn addressing_is_a_fixed_invertible_mapping() {
        assert_eq!(node_addr(node(1)), "10.0.0.1:7000".parse().unwrap());
        assert_eq!(node_addr(node(258)), "10.0.1.2:7000".parse().unwrap());
        assert_eq!(
            node_addr(node(MAX_ADDRESSABLE_NODE)),
            "10.255.255.255:7000".parse().unwrap()
        );
        for id in [1, 7, 255, 256, 65_535, 65_536, MAX_ADDRESSABLE_NODE] {
            assert_eq!(node_at(node_addr(node(id))), Some(node(id)));
        }
        assert_eq!(address(node(MAX_ADDRESSABLE_NODE + 1)), None);
        assert_eq!(node_at("10.0.0.0:7000".parse().unwrap()), None);
        assert_eq!(node_at("10.0.0.1:7001".parse().unwrap()), None);
        assert_eq!(node_at("11.0.0.1:7000".parse().unwrap()), None);
    }

    #[test]
    fn bind_refuses_ids_without_an_address() {
        sim(1, async {
            let host = Handle::current()
                .create_node()
                .ip("10.0.0.1".parse().unwrap())
                .build();
            let result = host
                .spawn(bind(
                    node(MAX_ADDRESSABLE_NODE + 1),
                    faults(NetFaults::default()),
                    0,
                ))
                .await
                .unwrap();
            let error = result.err().expect("bind must fail");
            assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        });
    }

    #[test]
    fn frames_arrive_in_send_order_despite_madsim_latency_jitter() {
        for seed in 0..5 {
            sim(seed, async {
                let control = NetControl::new();
                let mut peers = start(&[1, 2], &faults(NetFaults::default()), &control).await;
                // Bursts with pauses, so frames overlap in flight.
                for burst in 0..10u32 {
                    for i in 0..50 {
                        peers[0]
                            .transport
                            .send(node(2), (burst * 50 + i).to_be_bytes().to_vec());
                    }
                    sleep(Duration::from_millis(3)).await;
                }
                let frames = drain(&mut peers[1].inbound, Duration::from_secs(1)).await;
                assert!(frames.iter().all(|(from, _)| *from == node(1)));
                assert_eq!(payloads(&frames), (0..500).collect::<Vec<_>>());
            });
        }
    }

    #[test]
    fn lost_datagrams_leave_order_intact_and_do_not_stall_the_link() {
        sim(3, async {
            let control = NetControl::new();
            let mut peers = start(&[1, 2], &faults(NetFaults::default()), &control).await;
            NetSim::current().update_config(|config| config.packet_loss_rate = 0.3);
            for i in 0..300u32 {
                peers[0].transport.send(node(2), i.to_be_bytes().to_vec());
                sleep(Duration::from_millis(1)).await;
            }
            let received = payloads(&drain(&mut peers[1].inbound, Duration::from_secs(1)).await);
            assert!(received.windows(2).all(|w| w[0] < w[1]), "{received:?}");
            assert!((150..260).contains(&received.len()), "{}", received.len());
            // The last frame that got through was not stuck behind a gap.
            assert!(received.last().is_some_and(|&last| last >= 290));
        });
    }

    #[test]
    fn call_round_trip_reports_the_caller() {
        sim(4, async {
            let control = NetControl::new();
            let mut peers = start(&[1, 2], &faults(NetFaults::default()), &control).await;
            let call = peers[0]
                .transport
                .call(node(2), b"who".to_vec(), DEFAULT_CALL_TIMEOUT);
            let mut rx = peers.remove(1).inbound;
            let callee = peers[0].host.spawn(async move {
                match rx.recv().await {
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
                rx
            });
            assert_eq!(call.await, Ok(b"you".to_vec()));
            drop(callee.await.unwrap());
        });
    }

    #[test]
    fn many_concurrent_calls_each_get_their_own_answer() {
        sim(5, async {
            let control = NetControl::new();
            let mut peers = start(&[1, 2], &faults(NetFaults::default()), &control).await;
            let callee = peers.remove(1);
            spawn_echo(&callee.host, callee.inbound);
            let calls: Vec<_> = (0..100u32)
                .map(|i| {
                    peers[0]
                        .transport
                        .call(node(2), i.to_be_bytes().to_vec(), DEFAULT_CALL_TIMEOUT)
                })
                .collect();
            for (i, call) in (0..100u32).zip(calls) {
                let mut expected = b"re:".to_vec();
                expected.extend_from_slice(&i.to_be_bytes());
                assert_eq!(call.await, Ok(expected));
            }
            assert!(lock(&peers[0].transport.shared.state).pending.is_empty());
        });
    }

    #[test]
    fn call_times_out_when_the_callee_never_answers() {
        sim(6, async {
            let control = NetControl::new();
            // The callee's receiver stays alive but nobody reads it.
            let peers = start(&[1, 2], &faults(NetFaults::default()), &control).await;
            let started = now();
            let call = peers[0]
                .transport
                .call(node(2), b"x".to_vec(), Duration::from_millis(300));
            assert_eq!(call.await, Err(TransportError::Timeout(node(2))));
            assert!(now() - started >= Duration::from_millis(300));
            assert!(lock(&peers[0].transport.shared.state).pending.is_empty());
        });
    }

    #[test]
    fn call_is_dropped_when_the_callee_drops_the_reply_or_its_receiver() {
        sim(7, async {
            let control = NetControl::new();
            let mut peers = start(&[1, 2, 3], &faults(NetFaults::default()), &control).await;
            let mut rx2 = peers.remove(1).inbound;
            peers[0].host.spawn(async move {
                while let Some(inbound) = rx2.recv().await {
                    drop(inbound);
                }
            });
            let call = peers[0]
                .transport
                .call(node(2), b"x".to_vec(), DEFAULT_CALL_TIMEOUT);
            assert_eq!(call.await, Err(TransportError::Dropped(node(2))));

            // Node 3 stops listening altogether.
            drop(peers.remove(1).inbound);
            let call = peers[0]
                .transport
                .call(node(3), b"x".to_vec(), DEFAULT_CALL_TIMEOUT);
            assert_eq!(call.await, Err(TransportError::Dropped(node(3))));
        });
    }

    #[test]
    fn call_to_a_node_without_an_address_is_unreachable() {
        sim(8, async {
            let control = NetControl::new();
            let peers = start(&[1], &faults(NetFaults::default()), &control).await;
            let far = node(MAX_ADDRESSABLE_NODE + 1);
            let call = peers[0]
                .transport
                .call(far, b"x".to_vec(), DEFAULT_CALL_TIMEOUT);
            assert_eq!(call.await, Err(TransportError::Unreachable(far)));
        });
    }

    #[test]
    fn oversized_frames_and_calls_are_refused() {
        sim(9, async {
            let control = NetControl::new();
            let mut peers = start(&[1, 2], &faults(NetFaults::default()), &control).await;
            peers[0].transport.send(node(2), vec![0; MAX_FRAME_LEN + 1]);
            assert!(drain(&mut peers[1].inbound, Duration::from_millis(200))
                .await
                .is_empty());
            peers[0].transport.send(node(2), vec![0; MAX_FRAME_LEN]);
            let frames = drain(&mut peers[1].inbound, Duration::from_millis(200)).await;
            assert_eq!(
                frames.iter().map(|(_, f)| f.len()).collect::<Vec<_>>(),
                vec![MAX_FRAME_LEN]
            );

            let call =
                peers[0]
                    .transport
                    .call(node(2), vec![0; MAX_FRAME_LEN + 1], DEFAULT_CALL_TIMEOUT);
            assert_eq!(
                call.await,
                Err(TransportError::FrameTooLarge {
                    len: MAX_FRAME_LEN + 1
                })
            );
            sleep(Duration::from_millis(200)).await;
            assert!(
                peers[1].inbound.try_recv().is_err(),
                "the oversized call was delivered"
            );
        });
    }

    #[test]
    fn oversized_response_is_refused() {
        sim(10, async {
            let control = NetControl::new();
            let mut peers = start(&[1, 2], &faults(NetFaults::default()), &control).await;
            let mut rx2 = peers.remove(1).inbound;
            peers[0].host.spawn(async move {
                if let Some(Inbound::Call { reply, .. }) = rx2.recv().await {
                    let _ = reply.send(vec![0; MAX_FRAME_LEN + 1]);
                }
            });
            let call = peers[0]
                .transport
                .call(node(2), b"x".to_vec(), DEFAULT_CALL_TIMEOUT);
            assert_eq!(
                call.await,
                Err(TransportError::FrameTooLarge {
                    len: MAX_FRAME_LEN + 1
                })
            );
        });
    }

    #[test]
    fn partition_blocks_both_directions_until_healed() {
        sim(11, async {
            let control = NetControl::new();
            let mut peers = start(&[1, 2, 3], &faults(NetFaults::default()), &control).await;
            control.partition(node(1), node(2));
            let wait = Duration::from_millis(300);

            peers[0].transport.send(node(2), b"a->b".to_vec());
            peers[1].transport.send(node(1), b"b->a".to_vec());
            assert!(drain(&mut peers[1].inbound, wait).await.is_empty());
            assert!(drain(&mut peers[0].inbound, wait).await.is_empty());
            let call = peers[0].transport.call(node(2), b"x".to_vec(), wait);
            assert_eq!(call.await, Err(TransportError::Timeout(node(2))));
            // The request was lost, not queued: nothing reached node 2.
            assert!(peers[1].inbound.try_recv().is_err());

            // Links outside the partition are untouched.
            peers[0].transport.send(node(3), b"a->c".to_vec());
            assert_eq!(
                drain(&mut peers[2].inbound, wait).await,
                vec![(node(1), b"a->c".to_vec())]
            );

            control.heal_all();
            peers[1].transport.send(node(1), b"healed".to_vec());
            assert_eq!(
                drain(&mut peers[0].inbound, wait).await,
                vec![(node(2), b"healed".to_vec())]
            );
            let rx2 = std::mem::replace(&mut peers[1].inbound, mpsc::unbounded_channel().1);
            spawn_echo(&peers[1].host, rx2);
            let call = peers[0]
                .transport
                .call(node(2), b"x".to_vec(), DEFAULT_CALL_TIMEOUT);
            assert_eq!(call.await, Ok(b"re:x".to_vec()));
        });
    }

    #[test]
    fn one_way_cut_blocks_only_that_direction_and_calls_needing_it() {
        sim(12, async {
            let control = NetControl::new();
            let mut peers = start(&[1, 2], &faults(NetFaults::default()), &control).await;
            control.cut_one_way(node(1), node(2));
            let wait = Duration::from_millis(300);

            peers[0].transport.send(node(2), b"a->b".to_vec());
            assert!(drain(&mut peers[1].inbound, wait).await.is_empty());
            peers[1].transport.send(node(1), b"b->a".to_vec());
            assert_eq!(
                drain(&mut peers[0].inbound, wait).await,
                vec![(node(2), b"b->a".to_vec())]
            );

            // Node 2's call reaches node 1, but the answer cannot come back.
            let rx1 = std::mem::replace(&mut peers[0].inbound, mpsc::unbounded_channel().1);
            spawn_echo(&peers[0].host, rx1);
            let call = peers[1].transport.call(node(1), b"x".to_vec(), wait);
            assert_eq!(call.await, Err(TransportError::Timeout(node(1))));
            control.heal_all();
            let call = peers[1].transport.call(node(1), b"x".to_vec(), wait);
            assert_eq!(call.await, Ok(b"re:x".to_vec()));
        });
    }

    #[test]
    fn isolation_covers_nodes_registered_later_until_healed() {
        sim(13, async {
            let control = NetControl::new();
            let shared_faults = faults(NetFaults::default());
            let mut peers = start(&[1, 2], &shared_faults, &control).await;
            control.isolate(node(1));
            peers.extend(start(&[3], &shared_faults, &control).await);
            let wait = Duration::from_millis(300);

            peers[0].transport.send(node(2), b"x".to_vec());
            peers[0].transport.send(node(3), b"x".to_vec());
            peers[2].transport.send(node(1), b"x".to_vec());
            peers[0].transport.send(node(1), b"self".to_vec());
            peers[1].transport.send(node(3), b"b->c".to_vec());
            assert!(drain(&mut peers[1].inbound, wait).await.is_empty());
            assert_eq!(
                drain(&mut peers[0].inbound, wait).await,
                vec![(node(1), b"self".to_vec())]
            );
            assert_eq!(
                drain(&mut peers[2].inbound, wait).await,
                vec![(node(2), b"b->c".to_vec())]
            );

            control.heal_all();
            peers[0].transport.send(node(3), b"healed".to_vec());
            assert_eq!(
                drain(&mut peers[2].inbound, wait).await,
                vec![(node(1), b"healed".to_vec())]
            );
        });
    }

    #[test]
    fn total_loss_drops_every_frame_but_calls_still_work() {
        sim(14, async {
            let control = NetControl::new();
            let shared_faults = faults(NetFaults {
                loss: 1.0,
                ..NetFaults::default()
            });
            let mut peers = start(&[1, 2], &shared_faults, &control).await;
            send_numbered(&peers[0].transport, 2, 100);
            assert!(drain(&mut peers[1].inbound, Duration::from_millis(500))
                .await
                .is_empty());
            let callee = peers.remove(1);
            spawn_echo(&callee.host, callee.inbound);
            let call = peers[0]
                .transport
                .call(node(2), b"x".to_vec(), DEFAULT_CALL_TIMEOUT);
            assert_eq!(call.await, Ok(b"re:x".to_vec()));

            // Healing the shared faults restores frames.
            *lock(&shared_faults) = NetFaults::default();
            peers[0].transport.send(node(1), b"self".to_vec());
            assert_eq!(
                drain(&mut peers[0].inbound, Duration::from_millis(200)).await,
                vec![(node(1), b"self".to_vec())]
            );
        });
    }

    #[test]
    fn total_duplication_delivers_each_frame_twice() {
        sim(15, async {
            let control = NetControl::new();
            let shared_faults = faults(NetFaults {
                duplicate: 1.0,
                ..NetFaults::default()
            });
            let mut peers = start(&[1, 2], &shared_faults, &control).await;
            send_numbered(&peers[0].transport, 2, 50);
            let received = payloads(&drain(&mut peers[1].inbound, Duration::from_secs(1)).await);
            let mut counts = BTreeMap::new();
            for frame in &received {
                *counts.entry(*frame).or_insert(0) += 1;
            }
            assert_eq!(counts.len(), 50);
            assert!(counts.values().all(|&count| count == 2), "{counts:?}");
        });
    }

    #[test]
    fn reordering_delay_reorders_but_delivers_everything() {
        sim(16, async {
            let control = NetControl::new();
            let shared_faults = faults(NetFaults {
                reorder_ms: 50,
                ..NetFaults::default()
            });
            let mut peers = start(&[1, 2], &shared_faults, &control).await;
            send_numbered(&peers[0].transport, 2, 200);
            let received = payloads(&drain(&mut peers[1].inbound, Duration::from_secs(1)).await);
            let mut sorted = received.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, (0..200).collect::<Vec<_>>());
            assert_ne!(received, sorted, "a 50 ms jitter must reorder 200 frames");
        });
    }

    #[test]
    fn delay_spikes_hold_frames_back() {
        sim(17, async {
            let control = NetControl::new();
            let shared_faults = faults(NetFaults {
                spike: 1.0,
                spike_ms: 500,
                ..NetFaults::default()
            });
            let mut peers = start(&[1, 2], &shared_faults, &control).await;
            send_numbered(&peers[0].transport, 2, 20);
            assert!(drain(&mut peers[1].inbound, Duration::from_millis(450))
                .await
                .is_empty());
            let received = drain(&mut peers[1].inbound, Duration::from_millis(200)).await;
            assert_eq!(received.len(), 20);
        });
    }

    #[test]
    fn a_restarted_sender_is_delivered_in_order_from_its_first_frame() {
        sim(18, async {
            let control = NetControl::new();
            let shared_faults = faults(NetFaults::default());
            let mut peers = start(&[1, 2], &shared_faults, &control).await;
            for i in 0..10u32 {
                peers[0].transport.send(node(2), i.to_be_bytes().to_vec());
            }
            assert_eq!(
                payloads(&drain(&mut peers[1].inbound, Duration::from_millis(200)).await),
                (0..10).collect::<Vec<_>>()
            );

            let handle = Handle::current();
            let id = peers[0].host.id();
            handle.kill(id);
            handle.restart(id);
            let host = handle.get_node(id).expect("node exists");
            let (transport, _rx) = host
                .spawn(bind(node(1), Arc::clone(&shared_faults), 99))
                .await
                .unwrap()
                .expect("rebinding after a restart works");
            let started = now();
            for i in 10..20u32 {
                transport.send(node(2), i.to_be_bytes().to_vec());
            }
            // Arrives without waiting out a holdback window for the old
            // incarnation's sequence numbers.
            let frames = drain(&mut peers[1].inbound, Duration::from_millis(15)).await;
            assert_eq!(payloads(&frames), (10..20).collect::<Vec<_>>());
            assert!(now() - started < holdback_window());
        });
    }

    #[test]
    fn a_restarted_receiver_gets_everything_in_order() {
        sim(19, async {
            let control = NetControl::new();
            let shared_faults = faults(NetFaults::default());
            let peers = start(&[1, 2], &shared_faults, &control).await;
            send_numbered(&peers[0].transport, 2, 10);
            sleep(Duration::from_millis(200)).await;

            let handle = Handle::current();
            let id = peers[1].host.id();
            handle.kill(id);
            handle.restart(id);
            let host = handle.get_node(id).expect("node exists");
            let (_transport, mut rx) = host
                .spawn(bind(node(2), Arc::clone(&shared_faults), 98))
                .await
                .unwrap()
                .expect("rebinding after a restart works");
            for i in 10..40u32 {
                peers[0].transport.send(node(2), i.to_be_bytes().to_vec());
            }
            let frames = drain(&mut rx, Duration::from_millis(300)).await;
            assert_eq!(payloads(&frames), (10..40).collect::<Vec<_>>());
        });
    }

    /// A chaotic exchange among three nodes, as a trace of what arrived when.
    fn chaos_trace(seed: u64) -> String {
        sim(seed, async move {
            let control = NetControl::new();
            let shared_faults = faults(NetFaults {
                loss: 0.2,
                duplicate: 0.2,
                reorder_ms: 20,
                spike: 0.05,
                spike_ms: 200,
            });
            let mut peers = start(&[1, 2, 3], &shared_faults, &control).await;
            let mut trace = String::new();
            let mut receivers: Vec<_> = peers
                .iter_mut()
                .map(|peer| std::mem::replace(&mut peer.inbound, mpsc::unbounded_channel().1))
                .collect();
            for round in 0..20u32 {
                for (i, peer) in peers.iter().enumerate() {
                    for to in 1..=3u64 {
                        let frame = format!("r{round}:{}>{to}", i + 1);
                        peer.transport.send(node(to), frame.into_bytes());
                    }
                }
                if round == 10 {
                    control.partition(node(1), node(3));
                }
                sleep(Duration::from_millis(7)).await;
                for (i, rx) in receivers.iter_mut().enumerate() {
                    while let Ok(Inbound::Frame { frame, .. }) = rx.try_recv() {
                        let at = TimeHandle::current().elapsed().as_micros();
                        trace.push_str(&format!(
                            "{at} n{} {}\n",
                            i + 1,
                            String::from_utf8_lossy(&frame)
                        ));
                    }
                }
            }
            trace
        })
    }

    #[test]
    fn the_same_seed_gives_the_same_trace() {
        let first = chaos_trace(42);
        assert!(first.lines().count() > 100, "{first}");
        assert_eq!(first, chaos_trace(42));
        assert_ne!(first, chaos_trace(43));
    }

    #[test]
    fn fault_plans_follow_the_configured_probabilities() {
        let mut state = State::new(5);
        let none = NetFaults::default();
        let to = node(2);
        for seq in 0..100 {
            assert_eq!(
                state.plan_frame(&none, to),
                vec![(Some(seq), Duration::ZERO)]
            );
        }
        let lossy = NetFaults {
            loss: 0.5,
            ..NetFaults::default()
        };
        let sent = (0..1000)
            .filter(|_| !state.plan_frame(&lossy, to).is_empty())
            .count();
        assert!((400..600).contains(&sent), "{sent}");
        let nan = NetFaults {
            loss: f64::NAN,
            duplicate: -1.0,
            ..NetFaults::default()
        };
        assert_eq!(state.plan_frame(&nan, to).len(), 1);
    }
}
