//! Routes raft-rs's slog records into `tracing`, so one subscriber configures all logs.

use slog::{Drain, Level, OwnedKVList, Record};

/// A slog drain that forwards to `tracing` under the target `raft`.
pub struct TracingDrain;

impl Drain for TracingDrain {
    type Ok = ();
    type Err = slog::Never;

    fn log(&self, record: &Record<'_>, _values: &OwnedKVList) -> Result<(), slog::Never> {
        let msg = record.msg();
        match record.level() {
            Level::Critical | Level::Error => tracing::error!(target: "raft", "{msg}"),
            Level::Warning => tracing::warn!(target: "raft", "{msg}"),
            Level::Info => tracing::debug!(target: "raft", "{msg}"),
            Level::Debug | Level::Trace => tracing::trace!(target: "raft", "{msg}"),
        }
        Ok(())
    }
}

/// The root logger handed to every `RawNode`.
pub fn raft_logger(group_id: u64) -> slog::Logger {
    slog::Logger::root(TracingDrain.fuse(), slog::o!("group" => group_id))
}
