//! Commands that need no running cluster: the key→vShard mapping, decoding
//! frames found on disk or in a log, and inspecting a join token.

use crate::core::cache::MetadataState;
use crate::core::codec;
use crate::core::entry::MetadataRecord;
use crate::core::ids::VShardId;
use crate::core::migration::MigrationRow;
use crate::core::token::JoinToken;
use std::path::Path;

#[derive(Clone, Copy, clap::ValueEnum)]
pub enum FrameArg {
    /// A group-0 log record (MetadataRecord).
    Record,
    /// A metadata snapshot (MetadataState).
    Snapshot,
    /// A migration table row (MigrationRow).
    MigrationRow,
}

pub fn vshard(keys: &[String]) {
    for key in keys {
        println!("{key}\t{}", VShardId::for_key(key.as_bytes()).get());
    }
}

pub fn decode(kind: FrameArg, file: &Path) -> Result<(), String> {
    let bytes = std::fs::read(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
    let shown = match kind {
        FrameArg::Record => codec::decode::<MetadataRecord>(&bytes).map(|v| format!("{v:#?}")),
        FrameArg::Snapshot => codec::decode::<MetadataState>(&bytes).map(|v| format!("{v:#?}")),
        FrameArg::MigrationRow => codec::decode::<MigrationRow>(&bytes).map(|v| format!("{v:#?}")),
    }
    .map_err(|e| format!("{} is not a valid frame of that kind: {e}", file.display()))?;
    println!("{shown}");
    Ok(())
}

pub fn inspect_token(token: &str) -> Result<(), String> {
    let token = JoinToken::parse(token).map_err(|e| format!("invalid join token: {e}"))?;
    println!("ca_fingerprint\t{}", codec::hex(&token.ca_fingerprint));
    println!("expires_at_ms\t{}", token.expires_at_ms);
    Ok(())
}
