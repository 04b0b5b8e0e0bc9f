//! raft-rs logs through `slog`; keel logs through `tracing`. This drain
//! forwards every raft-rs record, with its key-value pairs, to `tracing`
//! under the `raft` target (so `RUST_LOG=raft=debug` shows it). raft-rs is
//! chatty at `info` about routine elections, so its `info` becomes `debug`.

use std::fmt::{self, Write as _};

struct TracingDrain;

/// Collects a record's key-value pairs as ` key=value`.
struct Pairs(String);

impl slog::Serializer for Pairs {
    fn emit_arguments(&mut self, key: slog::Key, val: &fmt::Arguments<'_>) -> slog::Result {
        // Writing to a String cannot fail.
        let _ = write!(self.0, " {key}={val}");
        Ok(())
    }
}

impl slog::Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(
        &self,
        record: &slog::Record<'_>,
        values: &slog::OwnedKVList,
    ) -> Result<(), slog::Never> {
        // raft-rs logs often; build the message only when someone listens.
        let enabled = match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::enabled!(target: "raft", tracing::Level::ERROR)
            }
            slog::Level::Warning => tracing::enabled!(target: "raft", tracing::Level::WARN),
            slog::Level::Info | slog::Level::Debug => {
                tracing::enabled!(target: "raft", tracing::Level::DEBUG)
            }
            slog::Level::Trace => tracing::enabled!(target: "raft", tracing::Level::TRACE),
        };
        if !enabled {
            return Ok(());
        }
        let mut pairs = Pairs(String::new());
        let _ = slog::KV::serialize(&record.kv(), record, &mut pairs);
        let _ = slog::KV::serialize(values, record, &mut pairs);
        let message = record.msg();
        let pairs = pairs.0;
        match record.level() {
            slog::Level::Critical | slog::Level::Error => {
                tracing::error!(target: "raft", "{message}{pairs}")
            }
            slog::Level::Warning => tracing::warn!(target: "raft", "{message}{pairs}"),
            slog::Level::Info | slog::Level::Debug => {
                tracing::debug!(target: "raft", "{message}{pairs}")
            }
            slog::Level::Trace => tracing::trace!(target: "raft", "{message}{pairs}"),
        }
        Ok(())
    }
}

/// A raft-rs logger for one group on one node.
pub fn raft_logger(node: u64, group: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain, slog::o!("node" => node, "group" => group))
}
