//! The `rpc_frame` target: what a node decodes from its peers and clients —
//! `keel::node::rpc::{Request, Response, DataRecord}` and the client
//! service's `ClientRequest` / `ClientResponse` (src/node/service.rs) — and
//! the payloads those frames carry that a node decodes in turn: raft-rs
//! messages (protobuf, stepped by the runtime), key-value commands and
//! queries, state-machine answers, and token strings to revoke.

use super::wire::{decode_checked, decode_sealed, verdict};
use super::{alloc, check_message, Verdict};
use keel::core::codec;
use keel::core::ids::VShardId;
use keel::core::kv::{KvCommand, KvQuery, KvResponse};
use keel::core::token::{JoinToken, TOKEN_PREFIX};
use keel::node::rpc::{DataBody, DataRecord, Outcome, RaftFrame, Request, Response};
use keel::node::service::{ClientRequest, ClientResponse};
use protobuf::Message as _;
use raft::eraftpb::Message;

/// The fuzz target body; see the module documentation.
pub fn rpc_frame(data: &[u8]) -> Verdict {
    let mut verdict_all = Verdict::Rejected;
    for request in [
        decode_checked::<Request>(data),
        decode_sealed::<Request>(data),
    ] {
        verdict_all = verdict_all.or(verdict(&request));
        if let Some(request) = request {
            check_request(&request);
        }
    }
    for response in [
        decode_checked::<Response>(data),
        decode_sealed::<Response>(data),
    ] {
        verdict_all = verdict_all.or(verdict(&response));
        if let Some(response) = response {
            check_response(&response);
        }
    }
    for record in [
        decode_checked::<DataRecord>(data),
        decode_sealed::<DataRecord>(data),
    ] {
        verdict_all = verdict_all.or(verdict(&record));
        if let Some(DataRecord {
            body: DataBody::Command(command),
            ..
        }) = record
        {
            // What a data group's applier does with a committed command.
            decode_checked::<KvCommand>(&command);
        }
    }
    for request in [
        decode_checked::<ClientRequest>(data),
        decode_sealed::<ClientRequest>(data),
    ] {
        verdict_all = verdict_all.or(verdict(&request));
        if let Some(request) = request {
            check_client_request(&request);
        }
    }
    for response in [
        decode_checked::<ClientResponse>(data),
        decode_sealed::<ClientResponse>(data),
    ] {
        verdict_all = verdict_all.or(verdict(&response));
    }
    verdict_all
}

/// What the runtime and the key-value machine decode out of a request.
fn check_request(request: &Request) {
    match request {
        Request::Raft(frames) => frames.iter().for_each(check_raft_frame),
        Request::RaftSnapshot(frame) => check_raft_frame(frame),
        Request::Propose { command, .. } => {
            decode_checked::<KvCommand>(command);
        }
        Request::Read { vshard, query } => {
            if let Some(parsed) = decode_checked::<KvQuery>(query) {
                assert!(parsed.vshard().index() < usize::from(keel::core::ids::VSHARD_COUNT));
            }
            assert!(vshard.index() < usize::from(keel::core::ids::VSHARD_COUNT));
        }
        Request::ProposeMetadata(entry) => assert!(!entry.name().is_empty()),
        // The rest carry nothing the node decodes further.
        _ => {}
    }
}

/// protobuf 2 reserves up to this much for a claimed field length before
/// it checks the claim against the input (`READ_RAW_BYTES_MAX_ALLOC`).
const PROTOBUF_RESERVE_CAP: usize = 10_000_000;

/// The runtime's `step`: a raft-rs message in protobuf, parsed from peer
/// bytes. `codec::parse_protobuf` must stay within the decoders' allocation
/// bound, and whatever it accepts `Message::parse_from_bytes` — what the
/// runtime calls today, which may reserve up to [`PROTOBUF_RESERVE_CAP`]
/// for any input (fuzz/regressions/rpc_frame/protobuf-reserves-claimed-*),
/// but never more — must accept as the same message. (The converse does not
/// hold: `parse_from_bytes` cuts a nested message that runs past the input
/// short at its end, fuzz/regressions/rpc_frame/protobuf-truncated-nested-message,
/// where `parse_protobuf` refuses it.) Whatever parses must write back to
/// bytes that parse to the same message.
fn check_raft_frame(frame: &RaftFrame) {
    let len = frame.message.len();
    let parsed = alloc::bounded("codec::parse_protobuf", len, || {
        codec::parse_protobuf::<Message>(&frame.message)
    });
    let (plain, largest) = alloc::largest_allocation(|| Message::parse_from_bytes(&frame.message));
    assert!(
        largest <= alloc::bound(len).max(PROTOBUF_RESERVE_CAP),
        "Message::parse_from_bytes of {len} bytes allocated {largest} bytes at once"
    );
    match (&parsed, &plain) {
        (Ok(message), Ok(same)) => {
            assert_eq!(
                message, same,
                "parse_protobuf and parse_from_bytes disagree"
            );
            // A field that occurs twice in the input is parsed by clearing
            // the first value, which leaves it an empty-but-allocated set
            // of unknown fields that no longer equals a fresh one
            // (fuzz/regressions/rpc_frame/protobuf-message-field-repeated):
            // the same message, represented differently. So the parsed
            // message must print the same once written and parsed again
            // (every known field survives), and from there a write and a
            // parse must give an equal message. Not equal bytes: unknown
            // fields live in a hash map and are written in its order,
            // which differs from one map to the next
            // (fuzz/regressions/rpc_frame/protobuf-unknown-fields-hash-order).
            let write = |m: &Message| {
                m.write_to_bytes()
                    .unwrap_or_else(|e| panic!("a parsed raft message does not write: {e}"))
            };
            let parse = |b: &[u8]| {
                codec::parse_protobuf::<Message>(b)
                    .unwrap_or_else(|e| panic!("a rewritten raft message does not parse: {e}"))
            };
            let again = parse(&write(message));
            assert_eq!(
                format!("{again:?}"),
                format!("{message:?}"),
                "raft message round trip"
            );
            assert_eq!(parse(&write(&again)), again, "raft message round trip");
        }
        (Err(e), _) => check_message(e),
        (Ok(_), Err(_)) => {
            panic!("parse_protobuf ({parsed:?}) accepts what parse_from_bytes ({plain:?}) refuses")
        }
    }
}

/// What a client decodes out of a node's answer.
fn check_response(response: &Response) {
    match response {
        Response::Committed(committed) => {
            if let Outcome::Data(bytes) = &committed.outcome {
                decode_checked::<KvResponse>(bytes);
            }
        }
        Response::Read(bytes) => {
            decode_checked::<KvResponse>(bytes);
        }
        Response::Error(e) => check_message(e),
        _ => {}
    }
}

/// What the client service computes from a request before it reaches the
/// node (`service::handle`), short of the join (the `join_request` target).
fn check_client_request(request: &ClientRequest) {
    match request {
        ClientRequest::Kv(command) => {
            assert_eq!(command.vshard(), VShardId::for_key(command.key()));
        }
        ClientRequest::Get { key, .. } => {
            assert!(VShardId::for_key(key).index() < usize::from(keel::core::ids::VSHARD_COUNT));
        }
        ClientRequest::RevokeToken { token } => {
            let token = token.trim();
            if token.starts_with(TOKEN_PREFIX) {
                if let Err(e) = JoinToken::parse(token) {
                    check_message(&e);
                }
            }
        }
        _ => {}
    }
}
