//! Forwarded calls travel to their peer in batches.
//!
//! A node that does not lead a group forwards its clients' proposals and
//! reads to the leader. One call per request costs a QUIC stream, a
//! datagram each way and a task at both ends; under load many requests
//! leave for the same leader at nearly the same moment (their clients were
//! answered together, when the previous round committed). So each peer has
//! a queue and a task that takes everything queued by the time it runs and
//! sends it as one [`Request::Forwarded`] call, answered item by item in
//! one [`Response::Forwarded`]. Nothing waits for a batch to fill: the task
//! yields once, so that requests already runnable can join, then sends. A
//! lone request travels as itself, as before batching.
//!
//! A batch fails or succeeds as one call: if it never left, every item may
//! be retried elsewhere; if it timed out, every item's outcome is unknown,
//! exactly as for a call of its own.

use super::rpc::{NodeError, Request, Response, MAX_FORWARDED_ITEMS};
use crate::core::codec;
use crate::core::ids::NodeId;
use crate::io::transport::{Transport, TransportError};
use serde_bytes::ByteBuf;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// A batch stops taking requests once it holds this many bytes (a single
/// larger request still travels, alone).
const MAX_BATCH_BYTES: usize = 1 << 20;

type Answer = Result<Vec<u8>, TransportError>;

struct Pending {
    request: Vec<u8>,
    answer: oneshot::Sender<Answer>,
}

/// The per-peer queues of a node's forwarded calls.
pub(super) struct Forwarder {
    transport: Arc<dyn Transport>,
    timeout: Duration,
    queues: Mutex<HashMap<NodeId, mpsc::UnboundedSender<Pending>>>,
}

impl Forwarder {
    pub(super) fn new(transport: Arc<dyn Transport>, timeout: Duration) -> Self {
        Forwarder {
            transport,
            timeout,
            queues: Mutex::new(HashMap::new()),
        }
    }

    /// Calls `to` with an encoded request that may travel in a batch
    /// ([`Request::travels_forwarded`]); answers as [`Transport::call`] would.
    pub(super) async fn call(&self, to: NodeId, request: Vec<u8>) -> Answer {
        let (answer, answered) = oneshot::channel();
        self.enqueue(to, Pending { request, answer });
        answered.await.unwrap_or(Err(TransportError::Dropped(to)))
    }

    fn enqueue(&self, to: NodeId, pending: Pending) {
        let mut queues = self.queues.lock().unwrap_or_else(|e| e.into_inner());
        let pending = match queues.get(&to) {
            Some(queue) => match queue.send(pending) {
                Ok(()) => return,
                // The queue's task is gone: the runtime that ran it stopped
                // (a handle may outlive the runtime it was first used on).
                Err(mpsc::error::SendError(pending)) => pending,
            },
            None => pending,
        };
        let (queue, receiver) = mpsc::unbounded_channel();
        tokio::spawn(drain(
            Arc::clone(&self.transport),
            to,
            self.timeout,
            receiver,
        ));
        // If the task cannot run either, `pending`'s answer channel closes
        // and the call fails as dropped.
        let _ = queue.send(pending);
        queues.insert(to, queue);
    }
}

/// The task of one peer's queue: sends everything queued, batch by batch,
/// without waiting for earlier batches to be answered.
async fn drain(
    transport: Arc<dyn Transport>,
    to: NodeId,
    timeout: Duration,
    mut queue: mpsc::UnboundedReceiver<Pending>,
) {
    while let Some(first) = queue.recv().await {
        // Let the tasks that are already runnable queue their requests too.
        tokio::task::yield_now().await;
        let mut bytes = first.request.len();
        let mut batch = vec![first];
        while batch.len() < MAX_FORWARDED_ITEMS && bytes < MAX_BATCH_BYTES {
            match queue.try_recv() {
                Ok(next) => {
                    bytes += next.request.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        tokio::spawn(send(Arc::clone(&transport), to, timeout, batch));
    }
}

async fn send(transport: Arc<dyn Transport>, to: NodeId, timeout: Duration, batch: Vec<Pending>) {
    if batch.len() == 1 {
        let Some(Pending { request, answer }) = batch.into_iter().next() else {
            return;
        };
        let _ = answer.send(transport.call(to, request, timeout).await);
        return;
    }
    crate::probe!("node.forwarded_batch");
    let (requests, answers): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|p| (ByteBuf::from(p.request), p.answer))
        .unzip();
    let sent = requests.len();
    let result = transport
        .call(to, codec::encode(&Request::Forwarded(requests)), timeout)
        .await;
    match result.map(|bytes| split(to, sent, &bytes)) {
        Ok(items) => {
            for (answer, item) in answers.into_iter().zip(items) {
                let _ = answer.send(Ok(item));
            }
        }
        Err(e) => {
            for answer in answers {
                let _ = answer.send(Err(e.clone()));
            }
        }
    }
}

/// Each item's encoded answer from a batch's answer. An answer that is not
/// one per item (an error for the whole batch, or a malformed answer) is
/// given to every item.
fn split(from: NodeId, sent: usize, bytes: &[u8]) -> Vec<Vec<u8>> {
    let whole = match codec::decode::<Response>(bytes) {
        Ok(Response::Forwarded(items)) if items.len() == sent => {
            return items.into_iter().map(ByteBuf::into_vec).collect();
        }
        Ok(Response::Forwarded(items)) => {
            codec::encode(&Response::Error(NodeError::BadRequest(format!(
                "node {from} answered a batch of {sent} forwarded calls with {} answers",
                items.len()
            ))))
        }
        Ok(Response::Error(_)) => bytes.to_vec(),
        Ok(_) => codec::encode(&Response::Error(NodeError::BadRequest(format!(
            "node {from} answered a batch of forwarded calls with something else"
        )))),
        Err(e) => codec::encode(&Response::Error(NodeError::BadRequest(e.to_string()))),
    };
    vec![whole; sent]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::ids::VShardId;
    use crate::io::transport::CallFuture;

    fn n(id: u64) -> NodeId {
        NodeId::new(id).unwrap()
    }

    fn read(query: u8) -> Vec<u8> {
        codec::encode(&Request::Read {
            vshard: VShardId::new(0).unwrap(),
            query: vec![query],
        })
    }

    /// Answers every read with its query, alone or batched, and records
    /// the calls; node 3 is unreachable.
    #[derive(Default)]
    struct Echo {
        calls: Mutex<Vec<Request>>,
    }

    fn echo(request: &Request) -> Response {
        match request {
            Request::Read { query, .. } => Response::Read(query.clone()),
            Request::Forwarded(items) => Response::Forwarded(
                items
                    .iter()
                    .map(|item| {
                        let request = codec::decode::<Request>(item).unwrap();
                        ByteBuf::from(codec::encode(&echo(&request)))
                    })
                    .collect(),
            ),
            _ => Response::Error(NodeError::BadRequest("not a read".into())),
        }
    }

    impl Transport for Echo {
        fn send(&self, _to: NodeId, _frame: Vec<u8>) {}
        fn call(&self, to: NodeId, request: Vec<u8>, _timeout: Duration) -> CallFuture {
            let request = codec::decode::<Request>(&request).unwrap();
            let answer = echo(&request);
            self.calls.lock().unwrap().push(request);
            Box::pin(async move {
                if to == n(3) {
                    return Err(TransportError::Unreachable(to));
                }
                Ok(codec::encode(&answer))
            })
        }
        fn disconnect(&self, _peer: NodeId) {}
    }

    /// Queues `count` reads for `to` in one go, before the queue's task
    /// can run (under any scheduler, the simulator's included), and waits
    /// for their answers.
    async fn call_all(to: NodeId, count: u8) -> (Arc<Echo>, Vec<Answer>) {
        let transport = Arc::new(Echo::default());
        let forwarder = Forwarder::new(transport.clone(), Duration::from_secs(1));
        let answered: Vec<_> = (0..count)
            .map(|i| {
                let (answer, answered) = oneshot::channel();
                forwarder.enqueue(
                    to,
                    Pending {
                        request: read(i),
                        answer,
                    },
                );
                answered
            })
            .collect();
        let mut answers = Vec::new();
        for answer in answered {
            answers.push(answer.await.unwrap());
        }
        (transport, answers)
    }

    #[tokio::test]
    async fn requests_queued_together_travel_in_one_call_and_get_their_own_answers() {
        let (transport, answers) = call_all(n(2), 10).await;
        for (i, answer) in answers.into_iter().enumerate() {
            let response = codec::decode::<Response>(&answer.unwrap()).unwrap();
            assert_eq!(response, Response::Read(vec![i as u8]));
        }
        let calls = transport.calls.lock().unwrap();
        assert!(
            matches!(calls.as_slice(), [Request::Forwarded(items)] if items.len() == 10),
            "{calls:?}"
        );
    }

    #[tokio::test]
    async fn a_lone_request_travels_as_itself() {
        let (transport, answers) = call_all(n(2), 1).await;
        let response = codec::decode::<Response>(answers[0].as_ref().unwrap()).unwrap();
        assert_eq!(response, Response::Read(vec![0]));
        let calls = transport.calls.lock().unwrap();
        assert!(
            matches!(calls.as_slice(), [Request::Read { .. }]),
            "{calls:?}"
        );
    }

    #[tokio::test]
    async fn a_batch_that_never_left_fails_every_item_alike() {
        let (_, answers) = call_all(n(3), 4).await;
        for answer in answers {
            assert_eq!(answer, Err(TransportError::Unreachable(n(3))));
        }
    }

    /// A forwarder first used on a runtime that stopped still works on
    /// the next one: its queue's task died with the first.
    #[cfg(not(madsim))]
    #[test]
    fn a_queue_whose_task_died_is_replaced() {
        let runtime = || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap()
        };
        let transport = Arc::new(Echo::default());
        let forwarder = Forwarder::new(transport, Duration::from_secs(1));
        for _ in 0..2 {
            let answer = runtime().block_on(forwarder.call(n(2), read(7)));
            let response = codec::decode::<Response>(&answer.unwrap()).unwrap();
            assert_eq!(response, Response::Read(vec![7]));
        }
    }

    fn answers_of(response: &Response, sent: usize) -> Vec<Response> {
        split(n(2), sent, &codec::encode(response))
            .iter()
            .map(|bytes| codec::decode::<Response>(bytes).unwrap())
            .collect()
    }

    #[test]
    fn an_answer_for_the_whole_batch_goes_to_every_item() {
        let refused = Response::Error(NodeError::BadRequest("frame".into()));
        assert_eq!(answers_of(&refused, 3), vec![refused.clone(); 3]);
        let bad = |answers: Vec<Response>| {
            answers
                .iter()
                .all(|a| matches!(a, Response::Error(NodeError::BadRequest(_))))
        };
        let one = Response::Forwarded(vec![ByteBuf::from(codec::encode(&Response::Ack))]);
        assert!(bad(answers_of(&one, 2)), "one answer for two items");
        assert!(bad(answers_of(&Response::Ack, 2)), "not a batch's answer");
        let garbage = split(n(2), 2, b"garbage");
        assert_eq!(garbage.len(), 2);
        assert!(garbage.iter().all(|bytes| matches!(
            codec::decode::<Response>(bytes),
            Ok(Response::Error(NodeError::BadRequest(_)))
        )));
    }
}
