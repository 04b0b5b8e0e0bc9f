//! Traffic from and to peers: one-way Raft frames (checked against the
//! sender's certificate identity), calls, forwarded batches, and the
//! frames and snapshots this node sends.

use super::{Command, Runtime};
use crate::core::codec;
use crate::core::ids::NodeId;
use crate::io::transport::Inbound;
use crate::node::rpc::{NodeError, RaftFrame, Request, Response, MAX_FORWARDED_ITEMS};
use crate::raft::engine::GroupMessage;
use protobuf::Message as _;
use raft::prelude::{Message, MessageType};
use raft::SnapshotStatus;
use serde_bytes::ByteBuf;
use std::sync::Arc;
use tokio::sync::oneshot;
use tokio::time::Instant;

impl Runtime {
    pub(super) fn on_inbound(&mut self, inbound: Inbound) {
        match inbound {
            Inbound::Frame { from, frame } => match codec::decode::<Request>(&frame) {
                // Only nodes send one-way Raft frames; an empty one is a ping.
                Ok(Request::Raft(frames)) => {
                    self.liveness.heard_from(from, Instant::now());
                    for frame in frames {
                        self.step(from, frame);
                    }
                }
                Ok(other) => {
                    tracing::debug!(%from, request = ?std::mem::discriminant(&other), "unexpected one-way request dropped");
                }
                Err(e) => tracing::warn!(%from, error = %e, "undecodable frame dropped"),
            },
            Inbound::Call {
                from,
                request,
                reply,
            } => self.on_call(from, request, reply),
        }
    }

    /// Feeds one peer's Raft message to its group, after checking that the
    /// message really comes from the peer that sent the frame.
    fn step(&mut self, from: NodeId, frame: RaftFrame) -> bool {
        let message = match codec::parse_protobuf::<Message>(&frame.message) {
            Ok(message) => message,
            Err(e) => {
                tracing::warn!(%from, error = %e, "undecodable raft message dropped");
                return false;
            }
        };
        if message.from != from.get() || message.to != self.me.get() {
            tracing::warn!(%from, claimed = message.from, to = message.to, "raft message with forged endpoints dropped");
            if message.from != from.get() {
                self.transport.disconnect(from);
            }
            return false;
        }
        // Messages for a group this node does not host (yet) are dropped;
        // Raft resends once routing tells this node to host it.
        self.engine.step(frame.group, message).is_ok()
    }

    fn on_call(&mut self, from: NodeId, request: Vec<u8>, reply: oneshot::Sender<Vec<u8>>) {
        match codec::decode::<Request>(&request) {
            Ok(request) => self.on_request(from, request, reply),
            Err(e) => refuse(reply, e.to_string()),
        }
    }

    /// Runs each call of a forwarded batch as if it came alone, and answers
    /// the batch once every call has its answer.
    fn on_forwarded(&mut self, from: NodeId, items: Vec<ByteBuf>, reply: oneshot::Sender<Vec<u8>>) {
        if items.len() > MAX_FORWARDED_ITEMS {
            return refuse(
                reply,
                format!(
                    "a forwarded batch holds at most {MAX_FORWARDED_ITEMS} calls, not {}",
                    items.len()
                ),
            );
        }
        let answers: Vec<_> = items
            .iter()
            .map(|item| {
                let (tx, rx) = oneshot::channel();
                match codec::decode::<Request>(item) {
                    Ok(request) if request.travels_forwarded() => {
                        self.on_request(from, request, tx)
                    }
                    Ok(_) => refuse(
                        tx,
                        "only proposals and reads travel in a forwarded batch".into(),
                    ),
                    Err(e) => refuse(tx, e.to_string()),
                }
                rx
            })
            .collect();
        tokio::spawn(async move {
            let mut encoded = Vec::with_capacity(answers.len());
            for answer in answers {
                let bytes = answer
                    .await
                    .unwrap_or_else(|_| codec::encode(&Response::Error(NodeError::Dropped)));
                encoded.push(ByteBuf::from(bytes));
            }
            let _ = reply.send(codec::encode(&Response::Forwarded(encoded)));
        });
    }

    fn on_request(&mut self, from: NodeId, request: Request, reply: oneshot::Sender<Vec<u8>>) {
        match request {
            Request::Forwarded(items) => self.on_forwarded(from, items, reply),
            Request::RaftSnapshot(frame) => {
                let response = if self.step(from, frame) {
                    Response::Ack
                } else {
                    Response::Error(NodeError::BadRequest("snapshot not accepted".into()))
                };
                let _ = reply.send(codec::encode(&response));
            }
            Request::Raft(frames) => {
                for frame in frames {
                    self.step(from, frame);
                }
                let _ = reply.send(codec::encode(&Response::Ack));
            }
            Request::ProposeMetadata(entry) => {
                let (tx, rx) = oneshot::channel();
                self.on_command(Command::ProposeMetadata { entry, reply: tx });
                answer_later(rx, reply, Response::Committed);
            }
            Request::Propose {
                vshard,
                group,
                command,
            } => {
                let (tx, rx) = oneshot::channel();
                self.on_command(Command::Propose {
                    vshard,
                    group,
                    command,
                    reply: tx,
                });
                answer_later(rx, reply, Response::Committed);
            }
            Request::Read { vshard, query } => {
                let (tx, rx) = oneshot::channel();
                self.on_command(Command::Read {
                    vshard,
                    query,
                    linearizable: true,
                    reply: tx,
                });
                answer_later(rx, reply, Response::Read);
            }
            Request::ReadMetadata => {
                let (tx, rx) = oneshot::channel();
                self.on_command(Command::ReadMetadata { reply: tx });
                answer_later(rx, reply, Response::Metadata);
            }
            Request::Status => {
                let _ = reply.send(codec::encode(&Response::Status(self.status())));
            }
            Request::ProposeControl { group, control } => {
                let (tx, rx) = oneshot::channel();
                self.on_command(Command::ProposeControl {
                    group,
                    control,
                    reply: tx,
                });
                answer_later(rx, reply, Response::Committed);
            }
            Request::GroupMembers { group } => {
                let (tx, rx) = oneshot::channel();
                self.on_command(Command::GroupMembers { group, reply: tx });
                answer_later(rx, reply, Response::Members);
            }
            Request::ExportVShard { group, vshard } => {
                let (tx, rx) = oneshot::channel();
                self.on_command(Command::ExportVShard {
                    group,
                    vshard,
                    reply: tx,
                });
                answer_later(rx, reply, |(index, data)| Response::Export { index, data });
            }
        }
    }

    pub(super) fn send(&mut self, to: NodeId, messages: Vec<GroupMessage>) {
        let mut frames = Vec::with_capacity(messages.len());
        for GroupMessage { group, message } in messages {
            let bytes = match message.write_to_bytes() {
                Ok(bytes) => bytes,
                Err(e) => {
                    tracing::error!(error = %e, "raft message does not encode");
                    continue;
                }
            };
            let frame = RaftFrame {
                group,
                message: bytes,
            };
            if message.get_msg_type() == MessageType::MsgSnapshot {
                self.send_snapshot(to, frame);
            } else {
                frames.push(frame);
            }
        }
        if !frames.is_empty() {
            self.transport
                .send(to, codec::encode(&Request::Raft(frames)));
            self.liveness.sent_to(to, Instant::now());
        }
    }

    /// Snapshots go as calls, so that raft-rs learns whether they arrived
    /// (otherwise the leader would wait for a lost snapshot forever).
    fn send_snapshot(&self, to: NodeId, frame: RaftFrame) {
        let transport = Arc::clone(&self.transport);
        let reports = self.snapshot_reports.0.clone();
        let timeout = self.config.request_timeout;
        let group = frame.group;
        tokio::spawn(async move {
            let request = codec::encode(&Request::RaftSnapshot(frame));
            let status = match transport.call(to, request, timeout).await {
                Ok(bytes) if matches!(codec::decode::<Response>(&bytes), Ok(Response::Ack)) => {
                    crate::probe!("raft.snapshot_delivered");
                    SnapshotStatus::Finish
                }
                _ => {
                    crate::probe!("raft.snapshot_failed");
                    SnapshotStatus::Failure
                }
            };
            let _ = reports.send((group, to, status));
        });
    }
}

/// Answers a call that cannot run with why.
fn refuse(reply: oneshot::Sender<Vec<u8>>, why: String) {
    let _ = reply.send(codec::encode(&Response::Error(NodeError::BadRequest(why))));
}

/// Answers a peer's call once the local result is ready, without holding
/// up the event loop.
fn answer_later<T: Send + 'static>(
    rx: oneshot::Receiver<Result<T, NodeError>>,
    reply: oneshot::Sender<Vec<u8>>,
    wrap: fn(T) -> Response,
) {
    tokio::spawn(async move {
        let response = match rx.await {
            Ok(Ok(value)) => wrap(value),
            Ok(Err(e)) => Response::Error(e),
            Err(_) => Response::Error(NodeError::Dropped),
        };
        let _ = reply.send(codec::encode(&response));
    });
}
