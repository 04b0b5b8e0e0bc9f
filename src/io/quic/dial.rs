//! The dialling side: one outgoing connection per peer with backoff, the
//! per-peer writer of one-way frames, and calls.

use super::frames::{read_frame, write_frame, ReadFailure};
use super::tls::closed_by_tls;
use super::{
    lock, Inner, BACKOFF_BASE, BACKOFF_MAX, CODE_RELOADED, CODE_SHUTDOWN, CONNECT_TIMEOUT,
    STALE_DIAL_RETRIES,
};
use crate::core::ids::NodeId;
use crate::io::pki::node_dns_name;
use crate::io::transport::{TransportError, MAX_FRAME_LEN};
use quinn::{Connection, SendStream, VarInt};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

fn backoff(failures: u32) -> Duration {
    let factor = 1u32 << failures.saturating_sub(1).min(16);
    BACKOFF_BASE.saturating_mul(factor).min(BACKOFF_MAX)
}

impl Inner {
    /// The live connection to `to`, dialling one if there is none (or the
    /// peer's address changed). While a recent dial to the same address is
    /// backing off, fails at once instead of dialling again.
    pub(super) async fn connection(&self, to: NodeId) -> Result<Connection, TransportError> {
        let addr = lock(&self.peer_addrs)
            .get(&to)
            .copied()
            .ok_or(TransportError::Unreachable(to))?;
        let link = lock(&self.links).entry(to).or_default().clone();
        let mut link = link.lock().await;
        if let Some((conn, conn_addr)) = link.conn.take() {
            if conn_addr == addr && conn.close_reason().is_none() {
                link.conn = Some((conn.clone(), conn_addr));
                return Ok(conn);
            }
            // Nothing else owns it once the link lets go: close it rather
            // than leave keep-alives running on an abandoned connection.
            conn.close(VarInt::from_u32(CODE_SHUTDOWN), b"peer address changed");
        }
        let now = Instant::now();
        if let Some((retry_at, failed_addr, generation)) = link.retry_at {
            if failed_addr == addr && generation == lock(&self.tls).generation && now < retry_at {
                return Err(TransportError::Unreachable(to));
            }
        }
        match self.dial(to, addr).await {
            Some(conn) => {
                link.conn = Some((conn.clone(), addr));
                link.failures = 0;
                link.retry_at = None;
                Ok(conn)
            }
            None => {
                link.failures = link.failures.saturating_add(1);
                let generation = lock(&self.tls).generation;
                link.retry_at = Some((Instant::now() + backoff(link.failures), addr, generation));
                Err(TransportError::Unreachable(to))
            }
        }
    }

    /// One dial attempt, requiring the server to present `to`'s certificate.
    /// A connection that completed under an identity replaced meanwhile is
    /// closed and dialled again with the new one.
    async fn dial(&self, to: NodeId, addr: SocketAddr) -> Option<Connection> {
        for _ in 0..STALE_DIAL_RETRIES {
            let (config, generation) = {
                let tls = lock(&self.tls);
                (tls.client.clone(), tls.generation)
            };
            let connecting = match self.endpoint.connect_with(config, addr, &node_dns_name(to)) {
                Ok(connecting) => connecting,
                Err(err) => {
                    tracing::debug!(me = %self.me, %to, %addr, %err, "cannot dial peer");
                    return None;
                }
            };
            let conn = match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
                Ok(Ok(conn)) => conn,
                Ok(Err(err)) => {
                    tracing::debug!(me = %self.me, %to, %addr, %err, "dialling peer failed");
                    return None;
                }
                Err(_elapsed) => {
                    tracing::debug!(me = %self.me, %to, %addr, "dialling peer timed out");
                    return None;
                }
            };
            if lock(&self.tls).register(&conn, generation) {
                return Some(conn);
            }
            conn.close(VarInt::from_u32(CODE_RELOADED), b"TLS identity changed");
        }
        None
    }

    /// One call over a fresh bidirectional stream.
    pub(super) async fn call(
        &self,
        to: NodeId,
        request: Vec<u8>,
    ) -> Result<Vec<u8>, TransportError> {
        let conn = self.connection(to).await?;
        let (mut send, mut recv) = conn
            .open_bi()
            .await
            .map_err(|_| TransportError::Unreachable(to))?;
        write_frame(&mut send, &request)
            .await
            .map_err(|()| TransportError::Unreachable(to))?;
        send.finish().map_err(|_| TransportError::Unreachable(to))?;
        match read_frame(&mut recv, MAX_FRAME_LEN).await {
            Ok(Some(response)) => Ok(response),
            Err(ReadFailure::TooLarge(len)) => Err(TransportError::FrameTooLarge { len }),
            // The peer refused our certificate only after our side of the
            // handshake completed: it is unreachable to us, not a callee
            // that dropped the call.
            Ok(None) | Err(ReadFailure::Stream) if closed_by_tls(&conn) => {
                Err(TransportError::Unreachable(to))
            }
            Ok(None) | Err(ReadFailure::Stream) => Err(TransportError::Dropped(to)),
        }
    }
}

/// Writes the one-way frames queued for `to`, in order, on one long-lived
/// unidirectional stream, reopening it (and the connection) after failures.
/// Frames that cannot be written are dropped, as [`Transport::send`](crate::io::transport::Transport::send) allows:
/// Raft retries. Ends when the queue's sender goes away.
pub(super) async fn write_frames(
    inner: Arc<Inner>,
    to: NodeId,
    mut queue: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let mut stream: Option<SendStream> = None;
    while let Some(frame) = queue.recv().await {
        let send = match &mut stream {
            Some(send) => send,
            None => {
                let opened = match inner.connection(to).await {
                    Ok(conn) => conn.open_uni().await.ok(),
                    Err(_) => None,
                };
                match opened {
                    Some(send) => stream.insert(send),
                    None => {
                        // Unreachable: everything queued meanwhile is stale.
                        let mut dropped = 1usize;
                        while queue.try_recv().is_ok() {
                            dropped += 1;
                        }
                        tracing::trace!(me = %inner.me, %to, dropped, "dropping frames to unreachable peer");
                        continue;
                    }
                }
            }
        };
        if write_frame(send, &frame).await.is_err() {
            tracing::trace!(me = %inner.me, %to, "frame stream broke; reopening on next frame");
            stream = None;
        }
    }
}
