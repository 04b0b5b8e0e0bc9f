//! The wire envelope (DESIGN.md §3.2).
//!
//! Every entry, RPC and persisted row is `postcard` inside
//!
//! ```text
//! magic u8 | format version u16 | length u32 | crc32c u32 | body
//! ```
//!
//! Integers in the header are big-endian. `length` is the body length and must
//! match the bytes present exactly. The CRC32C covers the magic, version and
//! length as well as the body, so a flipped bit anywhere is caught. The magic
//! names the kind of value inside, so a row can never be mistaken for an entry.
//!
//! Decoding takes untrusted bytes: every failure is a [`CodecError`], never a
//! panic. The frame size is checked before anything is allocated, and a
//! postcard length prefix that claims more elements than bytes remain is
//! refused by postcard before it reserves memory, so no allocation exceeds the
//! frame's length times the in-memory size of one element
//! (`tests/decode_allocation.rs` measures it). Batches nest at most [`MAX_NESTING`] deep (postcard itself has no
//! recursion limit), so crafted input cannot exhaust the stack.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::cell::Cell;

/// Header size in bytes.
pub const HEADER_LEN: usize = 1 + 2 + 4 + 4;
/// The largest body any frame may carry.
pub const MAX_BODY_LEN: usize = 64 * 1024 * 1024;
/// The format version this binary writes.
pub const FORMAT_VERSION: u16 = 1;
/// The oldest format version this binary still reads.
pub const MIN_FORMAT_VERSION: u16 = 1;
/// How deeply self-nesting values (batches) may nest on the wire.
pub const MAX_NESTING: u32 = 4;

/// What a frame holds; its magic byte is the first byte of the frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    /// A metadata log record (entry plus proposal timestamp).
    MetadataRecord = 0xE1,
    /// A node-to-node or client request/response.
    Rpc = 0xC1,
    /// A row persisted in the node's redb database.
    Row = 0xD1,
    /// The snapshot of a metadata cache.
    Snapshot = 0xB1,
    /// A migration checkpoint's phase payload.
    CheckpointPayload = 0xA1,
    /// A data group's log record (command plus proposal timestamp).
    DataRecord = 0xF1,
    /// A credential file (node identity, admin client credential).
    Credential = 0x91,
}

/// Lowercase hex of `bytes`: how fingerprints, hashes and ids are shown to
/// operators.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A type that travels inside the envelope.
pub trait Wire: Serialize + DeserializeOwned {
    const KIND: FrameKind;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CodecError {
    #[error("frame of {len} bytes is shorter than the {HEADER_LEN}-byte header")]
    TooShort { len: usize },
    #[error("frame magic is {found:#04x}, expected {expected:#04x} ({kind:?})")]
    BadMagic {
        expected: u8,
        found: u8,
        kind: FrameKind,
    },
    #[error(
        "frame format version {found} is not supported by this binary \
         (supported {MIN_FORMAT_VERSION}..={FORMAT_VERSION}); upgrade the binary"
    )]
    UnsupportedVersion { found: u16 },
    #[error("frame body of {declared} bytes exceeds the {MAX_BODY_LEN}-byte limit")]
    TooLarge { declared: usize },
    #[error("frame declares a {declared}-byte body but carries {actual} bytes")]
    LengthMismatch { declared: usize, actual: usize },
    #[error("frame checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum { stored: u32, computed: u32 },
    #[error("frame body does not decode: {0}")]
    Body(String),
    #[error("frame body has {0} trailing bytes after the value")]
    TrailingBytes(usize),
    #[error("frame nests batches more than {MAX_NESTING} deep")]
    TooDeep,
}

/// A checked but not yet decoded frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    pub version: u16,
    pub body: &'a [u8],
}

fn checksum(header: &[u8], body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(header), body)
}

/// Encodes `value` in the current format version.
pub fn encode<T: Wire>(value: &T) -> Vec<u8> {
    encode_with_version(value, FORMAT_VERSION)
}

/// Encodes `value` with an explicit format version (for tests of version
/// handling and for writing the format an older cluster version requires).
pub fn encode_with_version<T: Wire>(value: &T, version: u16) -> Vec<u8> {
    // postcard only fails to serialize sequences of unknown length and types
    // with `serialize_any`-style impls; keel's wire types are plain derives of
    // known-length data, so this cannot fail for any `Wire` value.
    let body = postcard::to_allocvec(value).expect("keel wire types always serialize");
    seal(T::KIND, version, &body)
}

/// Wraps an already-serialized body in the envelope.
pub fn seal(kind: FrameKind, version: u16, body: &[u8]) -> Vec<u8> {
    assert!(
        body.len() <= MAX_BODY_LEN,
        "refusing to seal an oversized frame"
    );
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.push(kind as u8);
    out.extend_from_slice(&version.to_be_bytes());
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    let crc = checksum(&out, body);
    out.extend_from_slice(&crc.to_be_bytes());
    out.extend_from_slice(body);
    out
}

/// Checks the header, length and checksum of a frame of the given kind.
pub fn open(kind: FrameKind, bytes: &[u8]) -> Result<Envelope<'_>, CodecError> {
    if bytes.len() < HEADER_LEN {
        return Err(CodecError::TooShort { len: bytes.len() });
    }
    let (header, body) = bytes.split_at(HEADER_LEN);
    if header[0] != kind as u8 {
        return Err(CodecError::BadMagic {
            expected: kind as u8,
            found: header[0],
            kind,
        });
    }
    let version = u16::from_be_bytes([header[1], header[2]]);
    let declared = u32::from_be_bytes([header[3], header[4], header[5], header[6]]) as usize;
    let stored = u32::from_be_bytes([header[7], header[8], header[9], header[10]]);
    if declared > MAX_BODY_LEN {
        return Err(CodecError::TooLarge { declared });
    }
    if declared != body.len() {
        return Err(CodecError::LengthMismatch {
            declared,
            actual: body.len(),
        });
    }
    let computed = checksum(&header[..7], body);
    if computed != stored {
        return Err(CodecError::Checksum { stored, computed });
    }
    if !(MIN_FORMAT_VERSION..=FORMAT_VERSION).contains(&version) {
        return Err(CodecError::UnsupportedVersion { found: version });
    }
    Ok(Envelope { version, body })
}

/// Decodes a frame, returning the value and the format version it was written in.
pub fn decode_versioned<T: Wire>(bytes: &[u8]) -> Result<(T, u16), CodecError> {
    let envelope = open(T::KIND, bytes)?;
    NESTING.with(|depth| depth.set(0));
    let result = postcard::take_from_bytes::<T>(envelope.body);
    let too_deep = NESTING.with(|depth| depth.replace(0)) > MAX_NESTING;
    match result {
        Ok((value, [])) => Ok((value, envelope.version)),
        Ok((_, rest)) => Err(CodecError::TrailingBytes(rest.len())),
        Err(_) if too_deep => Err(CodecError::TooDeep),
        Err(e) => Err(CodecError::Body(e.to_string())),
    }
}

/// Decodes a frame of type `T`.
pub fn decode<T: Wire>(bytes: &[u8]) -> Result<T, CodecError> {
    decode_versioned(bytes).map(|(value, _)| value)
}

/// Parses a protobuf message (raft-rs's wire format: Raft messages from
/// peers, log entries from disk) from untrusted bytes, refusing any length
/// prefix that claims more than the bytes hold before reserving memory.
///
/// protobuf 2's `Message::parse_from_bytes` reserves memory on the word of
/// a length prefix, up to 10 MB per field, before it notices the input is
/// shorter (the `rpc_frame` fuzz target found 10- and 37-byte Raft messages
/// that reserve 2 MB and 140 kB). Two things stop that: a limit of the
/// input's length on the stream, which makes protobuf check a `Vec<u8>`
/// field's claimed length against what remains first; and reading from a
/// shared buffer rather than a slice, which makes it check a `Bytes` field
/// (entry data, snapshot data) before allocating — and then share the
/// input instead of copying it. Whatever this accepts, `parse_from_bytes`
/// accepts as the same message; it also refuses a nested message whose
/// length runs past the input, which `parse_from_bytes` silently cuts
/// short at the end of the bytes (no encoder writes one: it is a truncated
/// or forged frame).
pub fn parse_protobuf<M: protobuf::Message>(bytes: &[u8]) -> protobuf::ProtobufResult<M> {
    fn parse_limited<M: protobuf::Message>(
        input: &mut protobuf::CodedInputStream<'_>,
        len: usize,
    ) -> protobuf::ProtobufResult<M> {
        input.push_limit(len as u64)?;
        let message = M::parse_from(input)?;
        input.check_eof()?;
        Ok(message)
    }
    // One statement, so that the shared copy of the input (protobuf's
    // `Bytes`, whose crate keel does not name) outlives the stream.
    parse_limited(
        &mut protobuf::CodedInputStream::from_carllerche_bytes(&bytes.to_vec().into()),
        bytes.len(),
    )
}

thread_local! {
    /// Depth of self-nesting values in the decode running on this thread.
    /// postcard offers no recursion limit and a `Deserialize` impl cannot see
    /// its deserializer's state, so the guard keeps its count here; it is
    /// reset at the start and end of every decode, so no state leaks between
    /// decodes.
    static NESTING: Cell<u32> = const { Cell::new(0) };
}

/// Holds one level of nesting for the life of the guard; fails past the limit.
pub(crate) struct NestingGuard(());

impl NestingGuard {
    pub(crate) fn enter<E: serde::de::Error>() -> Result<Self, E> {
        let depth = NESTING.with(|d| {
            let depth = d.get() + 1;
            d.set(depth);
            depth
        });
        if depth > MAX_NESTING {
            Err(E::custom("nesting too deep"))
        } else {
            Ok(NestingGuard(()))
        }
    }
}

impl Drop for NestingGuard {
    fn drop(&mut self) {
        // Only the depth in excess of the limit must survive (as the marker
        // `decode_versioned` reads); a successful level gives its count back.
        NESTING.with(|d| {
            let depth = d.get();
            if depth <= MAX_NESTING {
                d.set(depth.saturating_sub(1));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    /// Byte fields are marked `serde_bytes` for speed; that must not change
    /// a single encoded byte, or old logs and peers would stop decoding.
    #[test]
    fn byte_fields_encode_exactly_as_a_u8_sequence() {
        #[derive(Serialize, Deserialize)]
        struct Plain {
            a: Vec<u8>,
            b: Option<Vec<u8>>,
        }
        #[derive(Debug, PartialEq, Serialize, Deserialize)]
        struct Bytes {
            #[serde(with = "serde_bytes")]
            a: Vec<u8>,
            #[serde(with = "serde_bytes")]
            b: Option<Vec<u8>>,
        }
        for len in [0usize, 1, 127, 128, 300, 16_384, 70_000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
            for b in [None, Some(data.clone())] {
                let plain = postcard::to_allocvec(&Plain {
                    a: data.clone(),
                    b: b.clone(),
                })
                .unwrap();
                let bytes = Bytes {
                    a: data.clone(),
                    b: b.clone(),
                };
                assert_eq!(postcard::to_allocvec(&bytes).unwrap(), plain, "len {len}");
                assert_eq!(postcard::from_bytes::<Bytes>(&plain).unwrap(), bytes);
            }
        }
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct Probe {
        id: u64,
        data: Vec<u8>,
    }

    impl Wire for Probe {
        const KIND: FrameKind = FrameKind::Rpc;
    }

    fn probe() -> Vec<u8> {
        encode(&Probe {
            id: 300,
            data: vec![1, 2, 3],
        })
    }

    #[test]
    fn header_layout_is_as_documented() {
        let frame = probe();
        assert_eq!(frame[0], FrameKind::Rpc as u8);
        assert_eq!(u16::from_be_bytes([frame[1], frame[2]]), FORMAT_VERSION);
        let len = u32::from_be_bytes([frame[3], frame[4], frame[5], frame[6]]) as usize;
        assert_eq!(len, frame.len() - HEADER_LEN);
        assert_eq!(decode::<Probe>(&frame).unwrap().id, 300);
    }

    #[test]
    fn every_malformation_has_its_own_error() {
        let frame = probe();
        assert_eq!(
            decode::<Probe>(&frame[..5]),
            Err(CodecError::TooShort { len: 5 })
        );
        assert!(matches!(
            decode::<Probe>(&frame[..frame.len() - 1]),
            Err(CodecError::LengthMismatch { .. })
        ));
        let mut wrong_kind = frame.clone();
        wrong_kind[0] = FrameKind::Row as u8;
        assert!(matches!(
            decode::<Probe>(&wrong_kind),
            Err(CodecError::BadMagic { .. })
        ));
        let mut flipped = frame.clone();
        flipped[HEADER_LEN] ^= 0x01;
        assert!(matches!(
            decode::<Probe>(&flipped),
            Err(CodecError::Checksum { .. })
        ));
        let mut huge = frame.clone();
        huge[3..7].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(matches!(
            decode::<Probe>(&huge),
            Err(CodecError::TooLarge { .. })
        ));
        let future = encode_with_version(
            &Probe {
                id: 1,
                data: vec![],
            },
            FORMAT_VERSION + 1,
        );
        assert_eq!(
            decode::<Probe>(&future),
            Err(CodecError::UnsupportedVersion {
                found: FORMAT_VERSION + 1
            })
        );
        let trailing = seal(FrameKind::Rpc, FORMAT_VERSION, &[1, 0, 9]);
        assert_eq!(
            decode::<Probe>(&trailing),
            Err(CodecError::TrailingBytes(1))
        );
        // A length prefix claiming far more elements than the body holds
        // fails cleanly instead of reserving memory for them.
        let claims_more = seal(FrameKind::Rpc, FORMAT_VERSION, &[1, 0xFF, 0xFF, 0xFF, 0x0F]);
        assert!(matches!(
            decode::<Probe>(&claims_more),
            Err(CodecError::Body(_))
        ));
    }

    /// A Raft message whose unknown bytes field claims 2 MB in a 10-byte
    /// input (the `rpc_frame` fuzz find) is refused, and a real one parses.
    /// That no memory is reserved for the claim is measured by replaying the
    /// find (`fuzz/regressions/rpc_frame/`) in `tests/fuzz_corpora.rs`.
    #[test]
    fn protobuf_parsing_refuses_overlong_fields() {
        let claims_two_mb = [0x9a, 0x48, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0x11];
        assert!(parse_protobuf::<raft::eraftpb::Message>(&claims_two_mb).is_err());
        let message = raft::eraftpb::Message {
            from: 1,
            to: 2,
            term: 7,
            ..Default::default()
        };
        let bytes = protobuf::Message::write_to_bytes(&message).unwrap();
        assert_eq!(
            parse_protobuf::<raft::eraftpb::Message>(&bytes).unwrap(),
            message
        );
    }

    #[test]
    fn version_is_reported() {
        let (_, version) = decode_versioned::<Probe>(&probe()).unwrap();
        assert_eq!(version, FORMAT_VERSION);
    }
}
