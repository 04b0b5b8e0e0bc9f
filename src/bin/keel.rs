//! `keel` — operator commands (DESIGN.md §9).
//!
//! The cluster commands (`up`, `node start`, `status`, `kv`, ...) arrive with
//! the node runtime; what is here works on the pure core and needs no
//! running cluster: the key→vShard mapping, decoding frames found on disk or
//! in a log, and inspecting a join token before using it.

use clap::{Parser, Subcommand, ValueEnum};
use keel::core::cache::MetadataState;
use keel::core::codec;
use keel::core::entry::MetadataRecord;
use keel::core::ids::VShardId;
use keel::core::migration::MigrationRow;
use keel::core::token::JoinToken;
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "keel",
    version,
    about = "Cluster coordination engine for sharded databases"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the vShard each key maps to (crc32c(key) % 1024).
    Vshard {
        /// Keys, as UTF-8 strings.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Decode a keel frame (envelope + postcard) from a file and print it.
    Decode {
        /// What the frame holds.
        #[arg(long, value_enum)]
        kind: FrameArg,
        /// The file holding exactly one frame.
        file: PathBuf,
    },
    /// Join tokens.
    Token {
        #[command(subcommand)]
        command: TokenCommand,
    },
}

#[derive(Subcommand)]
enum TokenCommand {
    /// Check a join token and show the CA fingerprint it pins and its expiry.
    Inspect { token: String },
}

#[derive(Clone, Copy, ValueEnum)]
enum FrameArg {
    /// A group-0 log record (MetadataRecord).
    Record,
    /// A metadata snapshot (MetadataState).
    Snapshot,
    /// A migration table row (MigrationRow).
    MigrationRow,
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Vshard { keys } => {
            for key in keys {
                println!("{key}\t{}", VShardId::for_key(key.as_bytes()).get());
            }
        }
        Command::Decode { kind, file } => {
            let bytes =
                std::fs::read(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
            let shown = match kind {
                FrameArg::Record => {
                    codec::decode::<MetadataRecord>(&bytes).map(|v| format!("{v:#?}"))
                }
                FrameArg::Snapshot => {
                    codec::decode::<MetadataState>(&bytes).map(|v| format!("{v:#?}"))
                }
                FrameArg::MigrationRow => {
                    codec::decode::<MigrationRow>(&bytes).map(|v| format!("{v:#?}"))
                }
            }
            .map_err(|e| format!("{} is not a valid frame of that kind: {e}", file.display()))?;
            println!("{shown}");
        }
        Command::Token {
            command: TokenCommand::Inspect { token },
        } => {
            let token = JoinToken::parse(&token).map_err(|e| format!("invalid join token: {e}"))?;
            let fingerprint: String = token
                .ca_fingerprint
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect();
            println!("ca_fingerprint\t{fingerprint}");
            println!("expires_at_ms\t{}", token.expires_at_ms);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
