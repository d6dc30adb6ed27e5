//! Partition replication: one Raft group (raft-rs `RawNode`) over one [`tern_log::Log`].
//!
//! Contract:
//! - [`Group`] is sans-IO towards the network: it returns the Raft messages to send
//!   and never opens a socket. It does do disk I/O (its log and small state files),
//!   always on the caller's thread: a group is owned by exactly one node-loop thread.
//! - Persist before promise: entries and hard state are written (and, for durable
//!   groups, fsynced) before the messages that depend on them are returned, and the
//!   leader counts itself toward a quorum only after its own fsync.
//! - Committed entries are returned for apply in log order, each exactly once per
//!   process lifetime; after a restart they are replayed from the last snapshot.
//! - A storage error (above all a failed fsync) is returned as [`ReplicationError`];
//!   the caller must treat it as fatal for the node (page-cache state is unknown).

mod group;
mod logger;
mod storage;

pub use group::{Group, GroupConfig, GroupStatus, MembershipChange, ReadyOutput};
pub use raft::eraftpb::{Entry, EntryType, Message, MessageType};
pub use raft::StateRole;
pub use storage::{LogStorage, SnapshotFile};

/// Errors of a replication group. Storage errors are fatal for the node.
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("storage: {0}")]
    Log(#[from] tern_log::LogError),
    #[error("raft: {0}")]
    Raft(#[from] raft::Error),
    #[error("corrupt state file {path}: {reason}")]
    CorruptState {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("not the leader (leader is {leader:?})")]
    NotLeader { leader: Option<u64> },
    #[error("proposal dropped by raft (leadership change or uncommitted-size limit)")]
    ProposalDropped,
}
