//! The queue state machine of one partition, and its leader-local dispatcher.
//!
//! Contract: pure and deterministic. No I/O, no clock, no randomness, no threads.
//! Raft applies the same committed [`Command`]s in the same order on every replica,
//! so every replica's [`PartitionState`] is identical; time comes from the leader's
//! `now_ms` stamped into each command. The [`Dispatcher`] is leader-local (who holds
//! which message now) and rebuilt after a failover.
//!
//! Payloads are not copied here: a message's [`Location`] says where its bytes are
//! in the partition's log, which the caller reads to PUSH it.

mod command;
mod dispatch;
mod state;

pub use command::{Command, DecodedCommand, PutMessage};
pub use dispatch::{ConsumerId, Delivery, DispatchError, Dispatcher, FlowLimits};
pub use state::{
    Applied, ConfirmOutcome, Location, MessageMeta, OriginalOutcome, PartitionState,
    PartitionStats, PutOutcome, QueueConfig,
};

/// 16 bytes naming a message for its whole life.
pub type Guid = [u8; 16];

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum QueueError {
    #[error("cannot decode: {0}")]
    Decode(String),
}

#[cfg(test)]
mod tests;
