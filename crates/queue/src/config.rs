//! Per-queue settings and where payloads live.

use crate::command::{CommandError, Reader};
use bytes::{BufMut, BytesMut};

/// Where a message's payload bytes live in the partition's log: the entry index and
/// the byte range inside that entry's data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub index: u64,
    pub offset: u32,
    pub len: u32,
}

/// Work: each message goes to one consumer. Fanout: each subscription gets every message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum QueueMode {
    #[default]
    Work,
    Fanout,
}

/// Per-queue settings, the same on every replica. On a live partition change them with
/// `Command::Configure` (applied at one log position on every replica); calling
/// [`crate::PartitionState::set_config`] at different positions makes replicas diverge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueConfig {
    /// Most unsettled messages; a PUT beyond it is `QuotaExceeded`. Default 1,000,000.
    pub max_messages: u64,
    /// Most unsettled payload bytes; a PUT beyond it is `QuotaExceeded`. Default 1 GiB.
    pub max_bytes: u64,
    /// Largest payload; a larger PUT is `TooLarge`. Default 1 MiB.
    pub max_message_bytes: u32,
    /// How long (command time) a GUID's outcome is remembered. Default 5 minutes.
    pub dedup_window_ms: u64,
    /// Most GUIDs remembered; the oldest are forgotten first. Default 1,000,000.
    pub dedup_max_entries: u64,
    /// TTL of a message PUT with `ttl_ms` 0 (0 = no expiry). Default 0.
    pub default_ttl_ms: u64,
    /// Largest TTL a PUT may ask for (0 = unlimited); more is `InvalidTtl`. When set,
    /// a message that would otherwise never expire gets this TTL. Default 0.
    pub max_ttl_ms: u64,
    /// Work or fan-out. Fixed when the partition is created: `set_config` keeps the old
    /// mode. Default Work.
    pub mode: QueueMode,
    /// A delivery not confirmed within this time goes back for redelivery (counted as a
    /// failed attempt). 0 = never: it stays with its consumer until the consumer
    /// confirms, NACKs or leaves. Leader-local (the dispatcher applies it). Default 0.
    pub visibility_timeout_ms: u64,
    /// After this many failed attempts a message is not delivered again and is reported
    /// as [`crate::DeadLetterDue`]. 0 = unlimited. Default 0.
    pub max_delivery_attempts: u32,
    /// When true, an expired message is reported as [`crate::DeadLetterDue`] (reason
    /// `Expired`) instead of being dropped. Default false.
    pub dead_letter_expired: bool,
    /// Fan-out only: messages older than this are dropped for every subscription
    /// (0 = no age limit). Default 0.
    pub retention_max_age_ms: u64,
    /// Fan-out only: the oldest messages are dropped for every subscription while the
    /// partition holds more payload bytes than this (0 = no limit). Default 0.
    pub retention_max_bytes: u64,
    /// Fan-out only: most subscriptions. Default 64.
    pub max_subscriptions: u32,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_messages: 1_000_000,
            max_bytes: 1 << 30,
            max_message_bytes: 1 << 20,
            dedup_window_ms: 5 * 60 * 1000,
            dedup_max_entries: 1_000_000,
            default_ttl_ms: 0,
            max_ttl_ms: 0,
            mode: QueueMode::Work,
            visibility_timeout_ms: 0,
            max_delivery_attempts: 0,
            dead_letter_expired: false,
            retention_max_age_ms: 0,
            retention_max_bytes: 0,
            max_subscriptions: 64,
        }
    }
}

/// Encoded size of a [`QueueConfig`] (commands and snapshots).
pub(crate) const CONFIG_BYTES: usize = 8 * 9 + 4 * 3 + 2;

pub(crate) fn put_config(b: &mut BytesMut, c: &QueueConfig) {
    b.put_u64(c.max_messages);
    b.put_u64(c.max_bytes);
    b.put_u32(c.max_message_bytes);
    b.put_u64(c.dedup_window_ms);
    b.put_u64(c.dedup_max_entries);
    b.put_u64(c.default_ttl_ms);
    b.put_u64(c.max_ttl_ms);
    b.put_u8(match c.mode {
        QueueMode::Work => 0,
        QueueMode::Fanout => 1,
    });
    b.put_u64(c.visibility_timeout_ms);
    b.put_u32(c.max_delivery_attempts);
    b.put_u8(u8::from(c.dead_letter_expired));
    b.put_u64(c.retention_max_age_ms);
    b.put_u64(c.retention_max_bytes);
    b.put_u32(c.max_subscriptions);
}

pub(crate) fn read_config(r: &mut Reader<'_>) -> Result<QueueConfig, CommandError> {
    Ok(QueueConfig {
        max_messages: r.u64()?,
        max_bytes: r.u64()?,
        max_message_bytes: r.u32()?,
        dedup_window_ms: r.u64()?,
        dedup_max_entries: r.u64()?,
        default_ttl_ms: r.u64()?,
        max_ttl_ms: r.u64()?,
        mode: match r.u8()? {
            0 => QueueMode::Work,
            1 => QueueMode::Fanout,
            _ => return Err(CommandError::BadSnapshot("unknown mode")),
        },
        visibility_timeout_ms: r.u64()?,
        max_delivery_attempts: r.u32()?,
        dead_letter_expired: match r.u8()? {
            0 => false,
            1 => true,
            _ => return Err(CommandError::BadSnapshot("bad flag")),
        },
        retention_max_age_ms: r.u64()?,
        retention_max_bytes: r.u64()?,
        max_subscriptions: r.u32()?,
    })
}
