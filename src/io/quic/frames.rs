//! Length-prefixed frames on QUIC streams, for nodes and clients alike.

use quinn::{RecvStream, SendStream};

/// Why a length-prefixed frame could not be read.
pub(crate) enum ReadFailure {
    /// The prefix announced more bytes than the reader allows.
    TooLarge(usize),
    /// The stream was reset, stopped or ended mid-frame, or the connection died.
    Stream,
}

/// Reads one length-prefixed frame of at most `max_len` bytes; `Ok(None)`
/// when the stream ended cleanly before a new frame began.
pub(crate) async fn read_frame(
    recv: &mut RecvStream,
    max_len: usize,
) -> Result<Option<Vec<u8>>, ReadFailure> {
    let mut prefix = [0u8; 4];
    match recv.read_exact(&mut prefix).await {
        Ok(()) => {}
        Err(quinn::ReadExactError::FinishedEarly(0)) => return Ok(None),
        Err(_) => return Err(ReadFailure::Stream),
    }
    let len = usize::try_from(u32::from_be_bytes(prefix)).map_err(|_| ReadFailure::Stream)?;
    if len > max_len {
        return Err(ReadFailure::TooLarge(len));
    }
    let mut frame = vec![0u8; len];
    recv.read_exact(&mut frame)
        .await
        .map_err(|_| ReadFailure::Stream)?;
    Ok(Some(frame))
}

/// Writes one length-prefixed frame. Callers check the length first; a frame
/// that does not fit the prefix is refused rather than truncated.
pub(crate) async fn write_frame(send: &mut SendStream, frame: &[u8]) -> Result<(), ()> {
    let len = u32::try_from(frame.len()).map_err(|_| ())?;
    send.write_all(&len.to_be_bytes()).await.map_err(|_| ())?;
    send.write_all(frame).await.map_err(|_| ())
}
