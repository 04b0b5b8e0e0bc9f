//! The accepting side: each incoming connection classified by its
//! certificate, then its frames and calls handed to the node or, for
//! clients, to the client channel.

use super::frames::{read_frame, write_frame, ReadFailure};
use super::tls::{classify, Peer};
use super::{
    lock, ClientCall, ClientPeer, Tls, ANONYMOUS_REQUEST_TIMEOUT, CODE_DROPPED, CODE_REFUSED,
    CODE_RELOADED, CODE_SHUTDOWN, MAX_ANONYMOUS_CALLS, MAX_ANONYMOUS_REQUEST_LEN,
};
use crate::core::ids::NodeId;
use crate::io::transport::{Inbound, MAX_FRAME_LEN};
use quinn::{Connection, Endpoint, RecvStream, SendStream, VarInt};
use std::sync::{Arc, Mutex};
use tokio::sync::{mpsc, oneshot, OwnedSemaphorePermit, Semaphore};

/// What the accepting side of the endpoint needs.
pub(super) struct ServerCtx {
    pub(super) tls: Arc<Mutex<Tls>>,
    pub(super) nodes: mpsc::UnboundedSender<Inbound>,
    pub(super) clients: mpsc::UnboundedSender<ClientCall>,
}

/// Accepts connections until the endpoint closes.
pub(super) async fn accept_loop(endpoint: Endpoint, ctx: Arc<ServerCtx>) {
    while let Some(incoming) = endpoint.accept().await {
        tokio::spawn(serve_connection(incoming, ctx.clone()));
    }
}

/// Serves one incoming connection, handshaking under the current TLS
/// configuration: a node's traffic is attributed to the node its
/// certificate names; clients go to the client channel.
async fn serve_connection(incoming: quinn::Incoming, ctx: Arc<ServerCtx>) {
    let (server_config, generation) = {
        let tls = lock(&ctx.tls);
        (tls.server.clone(), tls.generation)
    };
    let connecting = match incoming.accept_with(server_config) {
        Ok(connecting) => connecting,
        Err(err) => {
            tracing::debug!(%err, "incoming connection refused");
            return;
        }
    };
    let conn = match connecting.await {
        Ok(conn) => conn,
        Err(err) => {
            tracing::debug!(%err, "incoming connection failed its handshake");
            return;
        }
    };
    let Some(peer) = classify(&conn) else {
        tracing::warn!(remote = %conn.remote_address(), "peer certificate names neither one node nor the admin");
        conn.close(
            VarInt::from_u32(CODE_REFUSED),
            b"certificate names neither one node nor the admin",
        );
        return;
    };
    if !lock(&ctx.tls).register(&conn, generation) {
        conn.close(VarInt::from_u32(CODE_RELOADED), b"TLS identity changed");
        return;
    }
    match peer {
        Peer::Node(from) => serve_node(conn, from, &ctx.nodes).await,
        Peer::Client(client) => serve_client(conn, client, &ctx.clients).await,
    }
}

/// Serves a node's connection: every stream on it is attributed to `from`.
async fn serve_node(conn: Connection, from: NodeId, inbound: &mpsc::UnboundedSender<Inbound>) {
    loop {
        tokio::select! {
            uni = conn.accept_uni() => match uni {
                Ok(recv) => {
                    tokio::spawn(read_frames(from, recv, inbound.clone()));
                }
                Err(_) => return,
            },
            bi = conn.accept_bi() => match bi {
                Ok((send, recv)) => {
                    tokio::spawn(serve_call(from, send, recv, inbound.clone()));
                }
                Err(_) => return,
            },
        }
    }
}

/// Serves a client's connection: calls only, bounded for anonymous callers.
async fn serve_client(
    conn: Connection,
    peer: ClientPeer,
    clients: &mpsc::UnboundedSender<ClientCall>,
) {
    let permits = match peer {
        ClientPeer::Admin => None,
        ClientPeer::Anonymous => Some(Arc::new(Semaphore::new(MAX_ANONYMOUS_CALLS))),
    };
    loop {
        tokio::select! {
            uni = conn.accept_uni() => match uni {
                Ok(mut recv) => {
                    tracing::debug!(remote = %conn.remote_address(), ?peer, "refusing a one-way stream from a client");
                    let _ = recv.stop(VarInt::from_u32(CODE_REFUSED));
                }
                Err(_) => return,
            },
            bi = conn.accept_bi() => match bi {
                Ok((mut send, mut recv)) => {
                    let permit = match &permits {
                        None => None,
                        Some(permits) => match permits.clone().try_acquire_owned() {
                            Ok(permit) => Some(permit),
                            Err(_) => {
                                tracing::debug!(remote = %conn.remote_address(), "refusing a call beyond the anonymous limit");
                                let _ = recv.stop(VarInt::from_u32(CODE_REFUSED));
                                let _ = send.reset(VarInt::from_u32(CODE_REFUSED));
                                continue;
                            }
                        },
                    };
                    tokio::spawn(serve_client_call(peer, send, recv, clients.clone(), permit));
                }
                Err(_) => return,
            },
        }
    }
}

/// Delivers the frames of one unidirectional stream, in order.
async fn read_frames(from: NodeId, mut recv: RecvStream, inbound: mpsc::UnboundedSender<Inbound>) {
    loop {
        match read_frame(&mut recv, MAX_FRAME_LEN).await {
            Ok(Some(frame)) => {
                if inbound.send(Inbound::Frame { from, frame }).is_err() {
                    // The node is gone; nobody will read further frames.
                    let _ = recv.stop(VarInt::from_u32(CODE_SHUTDOWN));
                    return;
                }
            }
            Ok(None) | Err(ReadFailure::Stream) => return,
            Err(ReadFailure::TooLarge(len)) => {
                tracing::warn!(%from, len, "refusing oversized frame; stopping its stream");
                let _ = recv.stop(VarInt::from_u32(CODE_REFUSED));
                return;
            }
        }
    }
}

/// Reads a call's request of at most `max_len` bytes; on failure refuses
/// the stream in both directions.
async fn read_request(
    send: &mut SendStream,
    recv: &mut RecvStream,
    max_len: usize,
) -> Option<Vec<u8>> {
    match read_frame(recv, max_len).await {
        Ok(Some(request)) => Some(request),
        failed => {
            if let Err(ReadFailure::TooLarge(len)) = failed {
                tracing::debug!(len, max_len, "refusing oversized request");
            }
            let _ = recv.stop(VarInt::from_u32(CODE_REFUSED));
            let _ = send.reset(VarInt::from_u32(CODE_REFUSED));
            None
        }
    }
}

/// Hands a call to the node through `queue` (built by `make` around the
/// reply channel) and writes its answer, or resets the stream if the node
/// is gone or drops the call.
async fn hand_over<T>(
    mut send: SendStream,
    queue: &mpsc::UnboundedSender<T>,
    make: impl FnOnce(oneshot::Sender<Vec<u8>>) -> T,
) {
    let (reply, response) = oneshot::channel();
    if queue.send(make(reply)).is_err() {
        let _ = send.reset(VarInt::from_u32(CODE_SHUTDOWN));
        return;
    }
    match response.await {
        Ok(response) if response.len() <= MAX_FRAME_LEN => {
            if write_frame(&mut send, &response).await.is_ok() {
                let _ = send.finish();
            }
        }
        Ok(response) => {
            tracing::warn!(len = response.len(), "refusing to send oversized response");
            let _ = send.reset(VarInt::from_u32(CODE_REFUSED));
        }
        Err(_dropped) => {
            let _ = send.reset(VarInt::from_u32(CODE_DROPPED));
        }
    }
}

/// Serves one call from a node: reads the request, hands it to the node and
/// writes the answer, or resets the stream if the node drops the call.
async fn serve_call(
    from: NodeId,
    mut send: SendStream,
    mut recv: RecvStream,
    inbound: mpsc::UnboundedSender<Inbound>,
) {
    let Some(request) = read_request(&mut send, &mut recv, MAX_FRAME_LEN).await else {
        return;
    };
    hand_over(send, &inbound, |reply| Inbound::Call {
        from,
        request,
        reply,
    })
    .await;
}

/// Serves one call from a client. Anonymous callers get a smaller request
/// limit and a deadline for sending it; `_permit` holds their call slot
/// until the answer is written.
async fn serve_client_call(
    peer: ClientPeer,
    mut send: SendStream,
    mut recv: RecvStream,
    clients: mpsc::UnboundedSender<ClientCall>,
    _permit: Option<OwnedSemaphorePermit>,
) {
    let request = match peer {
        ClientPeer::Admin => read_request(&mut send, &mut recv, MAX_FRAME_LEN).await,
        ClientPeer::Anonymous => {
            let read = read_request(&mut send, &mut recv, MAX_ANONYMOUS_REQUEST_LEN);
            match tokio::time::timeout(ANONYMOUS_REQUEST_TIMEOUT, read).await {
                Ok(request) => request,
                Err(_elapsed) => {
                    let _ = recv.stop(VarInt::from_u32(CODE_REFUSED));
                    let _ = send.reset(VarInt::from_u32(CODE_REFUSED));
                    None
                }
            }
        }
    };
    let Some(request) = request else {
        return;
    };
    hand_over(send, &clients, |reply| ClientCall {
        peer,
        request,
        reply,
    })
    .await;
}
