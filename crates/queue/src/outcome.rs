//! What the state machine reports: message metadata, per-command outcomes, what time
//! and limits made happen, and statistics. Plain data.

use crate::command::SettleReason;
use crate::config::Location;
use crate::Guid;
use bytes::Bytes;

/// What the state machine knows of one unsettled message (no payload).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MessageMeta {
    /// Commit order within the partition, from 1, never reused.
    pub seq: u64,
    pub guid: Guid,
    pub location: Location,
    pub size_bytes: u32,
    pub enqueued_ms: u64,
    pub expires_ms: Option<u64>,
    pub key: Bytes,
    /// Set for messages in a dead-letter queue: where and why they came from.
    pub dead_letter: Option<std::sync::Arc<crate::command::DeadLetterInfo>>,
}

/// The first outcome of a GUID, returned again to any retry within the dedup window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OriginalOutcome {
    Enqueued,
    QuotaExceeded,
    TooLarge,
    InvalidTtl,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PutOutcome {
    Enqueued {
        seq: u64,
    },
    /// The GUID was seen before (in the history or still unsettled): not enqueued again.
    Duplicate {
        original: OriginalOutcome,
    },
    QuotaExceeded,
    TooLarge,
    /// The PUT asked for a TTL above the queue's maximum.
    InvalidTtl,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfirmOutcome {
    Settled,
    /// Not unsettled for that subscription (never PUT, already settled, expired, purged,
    /// or an unknown subscription): nothing changed.
    Unknown,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubscribeOutcome {
    Created,
    AlreadyExists,
    /// Work queues have exactly one implicit subscription.
    NotFanout,
    /// Empty or longer than [`crate::MAX_SUBSCRIPTION_BYTES`].
    InvalidName,
    /// `max_subscriptions` reached.
    TooMany,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UnsubscribeOutcome {
    /// `released`: messages nobody else needed, now released.
    Removed {
        released: u64,
    },
    Unknown,
}

/// Why a message must go to the dead-letter queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DeadLetterReason {
    MaxAttempts,
    Expired,
}

/// A message that is no longer delivered to `subscription`: the leader writes it to the
/// dead-letter queue, then proposes `Settle { reason: DeadLettered }`. Until settled it
/// stays unsettled (and is listed by [`crate::PartitionState::dead_letters_due`], so a new
/// leader finishes the job).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetterDue {
    pub subscription: String,
    pub guid: Guid,
    pub seq: u64,
    /// Failed delivery attempts replicated so far.
    pub attempts: u32,
    pub reason: DeadLetterReason,
}

/// The command's own effect.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Put(Vec<(Guid, PutOutcome)>),
    Confirm {
        subscription: String,
        results: Vec<(Guid, ConfirmOutcome)>,
    },
    Purge {
        removed: u64,
    },
    Tick,
    /// `updated`: bumps that hit an unsettled message of the subscription.
    Attempts {
        subscription: String,
        updated: u32,
    },
    Settle {
        subscription: String,
        reason: SettleReason,
        results: Vec<(Guid, ConfirmOutcome)>,
    },
    Subscribe {
        name: String,
        outcome: SubscribeOutcome,
    },
    Unsubscribe {
        name: String,
        outcome: UnsubscribeOutcome,
    },
    /// The settings now in force (the mode is kept from creation).
    Configure,
}

/// What applying one command did: its outcome plus what time and limits made happen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub outcome: Outcome,
    /// Removed for every subscription because their TTL passed (seq order).
    pub expired: Vec<Guid>,
    /// Removed for every subscription by fan-out retention limits (seq order).
    pub dropped: Vec<Guid>,
    /// Newly due for the dead-letter queue (reported once each).
    pub dead_letter_due: Vec<DeadLetterDue>,
}

/// Partition-wide figures. Counters count since the partition was created.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PartitionStats {
    /// Unsettled messages (needed by at least one subscription).
    pub depth: u64,
    pub bytes: u64,
    pub oldest_enqueued_ms: Option<u64>,
    pub puts_enqueued: u64,
    pub puts_duplicate: u64,
    pub puts_rejected: u64,
    /// CONFIRMs that settled a message for a subscription.
    pub confirms: u64,
    pub purged: u64,
    pub expired: u64,
    /// Settled by `Settle { DeadLettered }` (per subscription).
    pub dead_lettered: u64,
    /// Dropped by fan-out retention.
    pub dropped: u64,
    /// Fan-out messages enqueued while there was no subscription.
    pub unrouted: u64,
    /// Waiting for `Settle { DeadLettered }` now (per subscription).
    pub dead_letter_due: u64,
    pub subscriptions: u64,
    pub dedup_entries: u64,
}

/// One subscription's replicated figures; the dispatcher adds its leader-local ones
/// (see `Dispatcher::subscription_stats`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SubscriptionStats {
    pub name: String,
    /// Messages this subscription has not settled.
    pub depth: u64,
    pub bytes: u64,
    pub oldest_enqueued_ms: Option<u64>,
    /// Seqs from its oldest unsettled message to the newest enqueued one (0 = caught up).
    pub lag: u64,
    /// Waiting for `Settle { DeadLettered }` now.
    pub dead_letter_due: u64,
    pub confirmed: u64,
    pub dead_lettered: u64,
    pub expired: u64,
    pub dropped: u64,
    pub purged: u64,
    /// Leader-local: held by consumers now (0 from the state alone).
    pub in_flight: u64,
    /// Leader-local: NACKed with a delay not yet passed (0 from the state alone).
    pub delayed: u64,
    /// Leader-local: ready to deliver (0 from the state alone).
    pub available: u64,
}
