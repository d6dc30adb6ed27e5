//! Replicated commands and their binary encoding (the data of one Raft entry).
//!
//! # Format (version 1; all integers big-endian)
//!
//! ```text
//! u8 version (= 1) | u8 tag | u64 now_ms | body
//! Put         (1): u32 count, count × { guid[16] | u64 ttl_ms | u16 key_len | key | u32 len | payload }
//! Confirm     (2): u16 sub_len | subscription (UTF-8) | u32 count | count × guid[16]
//! Purge       (3): (empty)
//! Tick        (4): (empty)
//! Attempts    (5): u16 sub_len | subscription | u32 count | count × { guid[16] | u32 bump }
//! Settle      (6): u16 sub_len | subscription | u8 reason (1 = dead-lettered) | u32 count | count × guid[16]
//! Subscribe   (7): u16 name_len | name
//! Unsubscribe (8): u16 name_len | name
//! Configure   (9): config (the snapshot's encoding of `QueueConfig`, fixed size)
//! PutDeadLetters (10): as Put, each message followed by
//!                  { u8 reason (1 = max attempts, 2 = expired) | u32 attempts |
//!                    guid[16] original | u16 len | source queue | u16 len | subscription }
//! ```
//!
//! A Put whose messages all carry [`DeadLetterInfo`] is encoded with tag 10 (the
//! broker writes dead letters in their own entries); a Put mixing both is refused by
//! the encoder (assert).
//!
//! Decoding is zero-copy: keys and payloads are slices of the entry's bytes, and each
//! payload's offset in the entry is returned so the state machine records where it
//! lives in the log instead of copying it. Decoding never panics and never allocates
//! more than the input justifies: every count is checked against the bytes left.
//! A new command kind gets a new tag; a changed layout gets a new version byte.

use crate::config::{put_config, read_config, QueueConfig, CONFIG_BYTES};
use crate::outcome::DeadLetterReason;
use crate::Guid;
use bytes::{BufMut, Bytes, BytesMut};
use std::sync::Arc;

/// The only format version this crate writes and reads.
pub const COMMAND_FORMAT_VERSION: u8 = 1;
/// Longest message key an encoded Put can carry (its length is a u16).
pub const MAX_KEY_BYTES: usize = u16::MAX as usize;
/// Longest subscription name (its length is a u16 in commands and snapshots).
pub const MAX_SUBSCRIPTION_BYTES: usize = 255;

const TAG_PUT: u8 = 1;
const TAG_CONFIRM: u8 = 2;
const TAG_PURGE: u8 = 3;
const TAG_TICK: u8 = 4;
const TAG_ATTEMPTS: u8 = 5;
const TAG_SETTLE: u8 = 6;
const TAG_SUBSCRIBE: u8 = 7;
const TAG_UNSUBSCRIBE: u8 = 8;
const TAG_CONFIGURE: u8 = 9;
const TAG_PUT_DEAD_LETTERS: u8 = 10;

const HEADER_BYTES: usize = 1 + 1 + 8;
/// guid + ttl + key_len + payload_len: the fixed part of one Put message.
const PUT_FIXED_BYTES: usize = 16 + 8 + 2 + 4;

/// Why bytes could not be decoded as a command or a snapshot.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum CommandError {
    #[error("truncated input")]
    Truncated,
    #[error("unknown format version {0}")]
    UnknownVersion(u8),
    #[error("unknown command tag {0}")]
    UnknownTag(u8),
    #[error("unknown settle reason {0}")]
    UnknownReason(u8),
    #[error("count {0} exceeds the input's size")]
    CountTooLarge(u32),
    #[error("name is not UTF-8 or too long")]
    BadName,
    #[error("trailing bytes after the end")]
    TrailingBytes,
    #[error("inconsistent snapshot: {0}")]
    BadSnapshot(&'static str),
}

/// One message of a Put. `payload` and `key` are zero-copy slices after decoding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutMessage {
    pub guid: Guid,
    /// Time to live in ms; 0 = the queue's default.
    pub ttl_ms: u64,
    /// Routing key (picks the partition upstream); at most [`MAX_KEY_BYTES`].
    pub key: Bytes,
    pub payload: Bytes,
    /// Set on messages the broker writes to a dead-letter queue: where they came from.
    pub dead_letter: Option<Arc<DeadLetterInfo>>,
}

/// Why and from where a message was dead-lettered; kept with the message in the
/// dead-letter queue and shown to its consumers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetterInfo {
    pub source_queue: String,
    /// "" for work queues.
    pub subscription: String,
    pub reason: DeadLetterReason,
    /// Delivery attempts that failed before it was dead-lettered.
    pub attempts: u32,
    /// The GUID the message had in its source queue.
    pub original_guid: Guid,
}

impl DeadLetterInfo {
    fn encoded_len(&self) -> usize {
        1 + 4 + 16 + 2 + self.source_queue.len() + 2 + self.subscription.len()
    }
}

/// Why a Settle command settles messages without a CONFIRM.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum SettleReason {
    /// The broker wrote the message to the dead-letter queue.
    DeadLettered,
}

/// A replicated command. Every variant carries `now_ms`, the leader's clock when it
/// proposed the command: the only source of time for the state machine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Put {
        now_ms: u64,
        messages: Vec<PutMessage>,
    },
    /// Consumers processed these messages. `subscription` is "" for work queues.
    Confirm {
        now_ms: u64,
        subscription: String,
        guids: Vec<Guid>,
    },
    /// Removes every unsettled message (for every subscription).
    Purge { now_ms: u64 },
    /// Advances time only, so expiry and dedup eviction happen without traffic.
    Tick { now_ms: u64 },
    /// Failed delivery attempts (visibility timeout, NACK, consumer gone) to add per
    /// message, batched by the leader from `Dispatcher::take_attempt_updates`.
    Attempts {
        now_ms: u64,
        subscription: String,
        bumps: Vec<(Guid, u32)>,
    },
    /// Settles messages without a CONFIRM (after writing them to the dead-letter queue).
    Settle {
        now_ms: u64,
        subscription: String,
        guids: Vec<Guid>,
        reason: SettleReason,
    },
    /// Fan-out: creates a subscription; it receives messages enqueued from now on.
    Subscribe { now_ms: u64, name: String },
    /// Fan-out: deletes a subscription; messages only it still needed are released.
    Unsubscribe { now_ms: u64, name: String },
    /// New queue settings, applied at this log position on every replica (the safe way
    /// to change limits of a live partition; the mode never changes).
    Configure { now_ms: u64, config: QueueConfig },
}

/// A decoded command plus, for a Put, where each payload sits in the entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedCommand {
    pub command: Command,
    /// For Put: byte offset of each message's payload within the entry data
    /// (one per message, same order). Empty for other commands.
    pub payload_offsets: Vec<u32>,
}

impl DecodedCommand {
    /// For a command built in memory (tests, local apply): encodes it once to learn
    /// the payload offsets it will have in the log entry.
    pub fn from_command(command: Command) -> Self {
        let payload_offsets = match &command {
            Command::Put { messages, .. } => put_payload_offsets(messages),
            _ => Vec::new(),
        };
        DecodedCommand {
            command,
            payload_offsets,
        }
    }
}

fn put_payload_offsets(messages: &[PutMessage]) -> Vec<u32> {
    let mut pos = HEADER_BYTES + 4;
    let mut out = Vec::with_capacity(messages.len());
    for m in messages {
        pos += PUT_FIXED_BYTES + m.key.len();
        out.push(pos as u32);
        pos += m.payload.len() + m.dead_letter.as_ref().map_or(0, |d| d.encoded_len());
    }
    out
}

impl Command {
    pub fn now_ms(&self) -> u64 {
        match self {
            Command::Put { now_ms, .. }
            | Command::Confirm { now_ms, .. }
            | Command::Purge { now_ms }
            | Command::Tick { now_ms }
            | Command::Attempts { now_ms, .. }
            | Command::Settle { now_ms, .. }
            | Command::Subscribe { now_ms, .. }
            | Command::Unsubscribe { now_ms, .. }
            | Command::Configure { now_ms, .. } => *now_ms,
        }
    }

    /// Encodes a Put from borrowed messages (the hot path: no clone of the message list).
    ///
    /// Panics if a key is longer than [`MAX_KEY_BYTES`] or a payload longer than
    /// `u32::MAX`: callers validate input before building commands.
    pub fn encode_put(now_ms: u64, messages: &[PutMessage]) -> Bytes {
        let len = HEADER_BYTES + put_body_len(messages);
        let mut b = BytesMut::with_capacity(len);
        let dead_letters = messages.iter().filter(|m| m.dead_letter.is_some()).count();
        assert!(
            dead_letters == 0 || dead_letters == messages.len(),
            "a Put carries dead letters only or none"
        );
        let tag = if dead_letters > 0 {
            TAG_PUT_DEAD_LETTERS
        } else {
            TAG_PUT
        };
        put_header(&mut b, tag, now_ms);
        put_messages(&mut b, messages);
        debug_assert_eq!(b.len(), len);
        b.freeze()
    }

    /// Encodes into one buffer (see the module docs for the format).
    ///
    /// Panics on a key longer than [`MAX_KEY_BYTES`], a subscription name longer than
    /// [`MAX_SUBSCRIPTION_BYTES`] or more than `u32::MAX` items: the caller validates.
    pub fn encode(&self) -> Bytes {
        if let Command::Put { now_ms, messages } = self {
            return Self::encode_put(*now_ms, messages);
        }
        let mut b = BytesMut::with_capacity(HEADER_BYTES + self.body_len());
        match self {
            Command::Put { .. } => unreachable!("handled above"),
            Command::Confirm {
                now_ms,
                subscription,
                guids,
            } => {
                put_header(&mut b, TAG_CONFIRM, *now_ms);
                put_name(&mut b, subscription);
                put_guids(&mut b, guids);
            }
            Command::Purge { now_ms } => put_header(&mut b, TAG_PURGE, *now_ms),
            Command::Tick { now_ms } => put_header(&mut b, TAG_TICK, *now_ms),
            Command::Attempts {
                now_ms,
                subscription,
                bumps,
            } => {
                put_header(&mut b, TAG_ATTEMPTS, *now_ms);
                put_name(&mut b, subscription);
                put_count(&mut b, bumps.len());
                for (guid, bump) in bumps {
                    b.put_slice(guid);
                    b.put_u32(*bump);
                }
            }
            Command::Settle {
                now_ms,
                subscription,
                guids,
                reason,
            } => {
                put_header(&mut b, TAG_SETTLE, *now_ms);
                put_name(&mut b, subscription);
                b.put_u8(match reason {
                    SettleReason::DeadLettered => 1,
                });
                put_guids(&mut b, guids);
            }
            Command::Subscribe { now_ms, name } => {
                put_header(&mut b, TAG_SUBSCRIBE, *now_ms);
                put_name(&mut b, name);
            }
            Command::Unsubscribe { now_ms, name } => {
                put_header(&mut b, TAG_UNSUBSCRIBE, *now_ms);
                put_name(&mut b, name);
            }
            Command::Configure { now_ms, config } => {
                put_header(&mut b, TAG_CONFIGURE, *now_ms);
                put_config(&mut b, config);
            }
        }
        debug_assert_eq!(b.len(), HEADER_BYTES + self.body_len());
        b.freeze()
    }

    fn body_len(&self) -> usize {
        match self {
            Command::Put { messages, .. } => put_body_len(messages),
            Command::Confirm {
                subscription,
                guids,
                ..
            } => 2 + subscription.len() + 4 + 16 * guids.len(),
            Command::Purge { .. } | Command::Tick { .. } => 0,
            Command::Attempts {
                subscription,
                bumps,
                ..
            } => 2 + subscription.len() + 4 + 20 * bumps.len(),
            Command::Settle {
                subscription,
                guids,
                ..
            } => 2 + subscription.len() + 1 + 4 + 16 * guids.len(),
            Command::Subscribe { name, .. } | Command::Unsubscribe { name, .. } => 2 + name.len(),
            Command::Configure { .. } => CONFIG_BYTES,
        }
    }

    /// Decodes one entry's data. Zero-copy: keys and payloads are `data.slice(..)`.
    pub fn decode(data: &Bytes) -> Result<DecodedCommand, CommandError> {
        let mut r = Reader::new(data);
        let version = r.u8()?;
        if version != COMMAND_FORMAT_VERSION {
            return Err(CommandError::UnknownVersion(version));
        }
        let tag = r.u8()?;
        let now_ms = r.u64()?;
        let mut payload_offsets = Vec::new();
        let command = match tag {
            TAG_PUT => decode_put(&mut r, now_ms, &mut payload_offsets, false)?,
            TAG_PUT_DEAD_LETTERS => decode_put(&mut r, now_ms, &mut payload_offsets, true)?,
            TAG_CONFIRM => Command::Confirm {
                now_ms,
                subscription: r.name()?,
                guids: r.guids()?,
            },
            TAG_PURGE => Command::Purge { now_ms },
            TAG_TICK => Command::Tick { now_ms },
            TAG_ATTEMPTS => {
                let subscription = r.name()?;
                let count = r.count(20)?;
                let mut bumps = Vec::with_capacity(count);
                for _ in 0..count {
                    bumps.push((r.guid()?, r.u32()?));
                }
                Command::Attempts {
                    now_ms,
                    subscription,
                    bumps,
                }
            }
            TAG_SETTLE => {
                let subscription = r.name()?;
                let reason = match r.u8()? {
                    1 => SettleReason::DeadLettered,
                    other => return Err(CommandError::UnknownReason(other)),
                };
                Command::Settle {
                    now_ms,
                    subscription,
                    guids: r.guids()?,
                    reason,
                }
            }
            TAG_SUBSCRIBE => Command::Subscribe {
                now_ms,
                name: r.name()?,
            },
            TAG_UNSUBSCRIBE => Command::Unsubscribe {
                now_ms,
                name: r.name()?,
            },
            TAG_CONFIGURE => Command::Configure {
                now_ms,
                config: read_config(&mut r)?,
            },
            other => return Err(CommandError::UnknownTag(other)),
        };
        r.finish()?;
        Ok(DecodedCommand {
            command,
            payload_offsets,
        })
    }
}

fn decode_put(
    r: &mut Reader<'_>,
    now_ms: u64,
    payload_offsets: &mut Vec<u32>,
    dead_letters: bool,
) -> Result<Command, CommandError> {
    let count = r.count(PUT_FIXED_BYTES)?;
    let mut messages = Vec::with_capacity(count);
    payload_offsets.reserve(count);
    for _ in 0..count {
        let guid = r.guid()?;
        let ttl_ms = r.u64()?;
        let key_len = usize::from(r.u16()?);
        let key = r.bytes(key_len)?;
        let len = r.u32()? as usize;
        // An entry's data is far below 4 GiB, so the offset fits a u32.
        payload_offsets.push(u32::try_from(r.pos).map_err(|_| CommandError::Truncated)?);
        let payload = r.bytes(len)?;
        let dead_letter = if dead_letters {
            Some(Arc::new(read_dead_letter(r)?))
        } else {
            None
        };
        messages.push(PutMessage {
            guid,
            ttl_ms,
            key,
            payload,
            dead_letter,
        });
    }
    Ok(Command::Put { now_ms, messages })
}

pub(crate) fn read_dead_letter(r: &mut Reader<'_>) -> Result<DeadLetterInfo, CommandError> {
    let reason = match r.u8()? {
        1 => DeadLetterReason::MaxAttempts,
        2 => DeadLetterReason::Expired,
        other => return Err(CommandError::UnknownReason(other)),
    };
    let attempts = r.u32()?;
    let original_guid = r.guid()?;
    let source_queue = r.name()?;
    let subscription = r.name()?;
    Ok(DeadLetterInfo {
        source_queue,
        subscription,
        reason,
        attempts,
        original_guid,
    })
}

pub(crate) fn put_dead_letter(b: &mut BytesMut, d: &DeadLetterInfo) {
    b.put_u8(match d.reason {
        DeadLetterReason::MaxAttempts => 1,
        DeadLetterReason::Expired => 2,
    });
    b.put_u32(d.attempts);
    b.put_slice(&d.original_guid);
    put_name(b, &d.source_queue);
    put_name(b, &d.subscription);
}

fn put_body_len(messages: &[PutMessage]) -> usize {
    4 + messages
        .iter()
        .map(|m| {
            PUT_FIXED_BYTES
                + m.key.len()
                + m.payload.len()
                + m.dead_letter.as_ref().map_or(0, |d| d.encoded_len())
        })
        .sum::<usize>()
}

fn put_header(b: &mut BytesMut, tag: u8, now_ms: u64) {
    b.put_u8(COMMAND_FORMAT_VERSION);
    b.put_u8(tag);
    b.put_u64(now_ms);
}

fn put_count(b: &mut BytesMut, n: usize) {
    assert!(n <= u32::MAX as usize, "at most u32::MAX items per command");
    b.put_u32(n as u32);
}

fn put_messages(b: &mut BytesMut, messages: &[PutMessage]) {
    put_count(b, messages.len());
    for m in messages {
        assert!(
            m.key.len() <= MAX_KEY_BYTES,
            "key longer than MAX_KEY_BYTES"
        );
        assert!(m.payload.len() <= u32::MAX as usize, "payload below 4 GiB");
        b.put_slice(&m.guid);
        b.put_u64(m.ttl_ms);
        b.put_u16(m.key.len() as u16);
        b.put_slice(&m.key);
        b.put_u32(m.payload.len() as u32);
        b.put_slice(&m.payload);
        if let Some(d) = &m.dead_letter {
            put_dead_letter(b, d);
        }
    }
}

pub(crate) fn put_name(b: &mut BytesMut, name: &str) {
    assert!(
        name.len() <= MAX_SUBSCRIPTION_BYTES,
        "name longer than MAX_SUBSCRIPTION_BYTES"
    );
    b.put_u16(name.len() as u16);
    b.put_slice(name.as_bytes());
}

fn put_guids(b: &mut BytesMut, guids: &[Guid]) {
    put_count(b, guids.len());
    for g in guids {
        b.put_slice(g);
    }
}

/// A bounds-checked cursor over bytes; shared with the snapshot decoder.
pub(crate) struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(data: &'a Bytes) -> Self {
        Reader { data, pos: 0 }
    }

    fn take(&mut self, n: usize) -> Result<&[u8], CommandError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|end| *end <= self.data.len())
            .ok_or(CommandError::Truncated)?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], CommandError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self) -> Result<u8, CommandError> {
        Ok(self.take(1)?[0])
    }

    pub(crate) fn u16(&mut self) -> Result<u16, CommandError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    pub(crate) fn u32(&mut self) -> Result<u32, CommandError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    pub(crate) fn u64(&mut self) -> Result<u64, CommandError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    pub(crate) fn guid(&mut self) -> Result<Guid, CommandError> {
        self.array()
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<Bytes, CommandError> {
        let start = self.pos;
        self.take(n)?;
        Ok(self.data.slice(start..start + n))
    }

    pub(crate) fn name(&mut self) -> Result<String, CommandError> {
        let len = usize::from(self.u16()?);
        if len > MAX_SUBSCRIPTION_BYTES {
            return Err(CommandError::BadName);
        }
        let raw = self.take(len)?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| CommandError::BadName)
    }

    fn guids(&mut self) -> Result<Vec<Guid>, CommandError> {
        let count = self.count(16)?;
        (0..count).map(|_| self.guid()).collect()
    }

    /// A u32 count, checked against the bytes left so a hostile count cannot allocate.
    pub(crate) fn count(&mut self, min_item_bytes: usize) -> Result<usize, CommandError> {
        let n = self.u32()?;
        self.check_count(u64::from(n), min_item_bytes)
    }

    /// A u64 count (snapshots), checked the same way.
    pub(crate) fn count64(&mut self, min_item_bytes: usize) -> Result<usize, CommandError> {
        let n = self.u64()?;
        self.check_count(n, min_item_bytes)
    }

    fn check_count(&self, n: u64, min_item_bytes: usize) -> Result<usize, CommandError> {
        let left = (self.data.len() - self.pos) as u64;
        if n.saturating_mul(min_item_bytes as u64) > left {
            return Err(CommandError::CountTooLarge(
                u32::try_from(n).unwrap_or(u32::MAX),
            ));
        }
        Ok(n as usize)
    }

    pub(crate) fn finish(&self) -> Result<(), CommandError> {
        if self.pos == self.data.len() {
            Ok(())
        } else {
            Err(CommandError::TrailingBytes)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn guid(i: u8) -> Guid {
        [i; 16]
    }

    fn all_kinds() -> Vec<Command> {
        vec![
            Command::Put {
                now_ms: 5,
                messages: vec![
                    PutMessage {
                        guid: guid(1),
                        ttl_ms: 7,
                        key: Bytes::from_static(b"k"),
                        payload: Bytes::from_static(b"hello"),
                        dead_letter: None,
                    },
                    PutMessage {
                        guid: guid(2),
                        ttl_ms: 0,
                        key: Bytes::new(),
                        payload: Bytes::new(),
                        dead_letter: None,
                    },
                ],
            },
            Command::Put {
                now_ms: 11,
                messages: vec![PutMessage {
                    guid: guid(9),
                    ttl_ms: 0,
                    key: Bytes::from_static(b"key"),
                    payload: Bytes::from_static(b"poison"),
                    dead_letter: Some(Arc::new(DeadLetterInfo {
                        source_queue: "orders".into(),
                        subscription: "billing".into(),
                        reason: DeadLetterReason::MaxAttempts,
                        attempts: 5,
                        original_guid: guid(8),
                    })),
                }],
            },
            Command::Confirm {
                now_ms: 6,
                subscription: "s".into(),
                guids: vec![guid(1), guid(2)],
            },
            Command::Purge { now_ms: 7 },
            Command::Tick { now_ms: 8 },
            Command::Attempts {
                now_ms: 9,
                subscription: String::new(),
                bumps: vec![(guid(3), 2)],
            },
            Command::Settle {
                now_ms: 10,
                subscription: "x".into(),
                guids: vec![guid(4)],
                reason: SettleReason::DeadLettered,
            },
            Command::Subscribe {
                now_ms: 11,
                name: "sub".into(),
            },
            Command::Unsubscribe {
                now_ms: 12,
                name: "sub".into(),
            },
            Command::Configure {
                now_ms: 13,
                config: QueueConfig {
                    max_delivery_attempts: 5,
                    dead_letter_expired: true,
                    ..QueueConfig::default()
                },
            },
        ]
    }

    #[test]
    fn every_kind_round_trips_and_truncation_is_an_error() {
        for cmd in all_kinds() {
            let data = cmd.encode();
            let decoded = Command::decode(&data).expect("decode");
            assert_eq!(decoded.command, cmd);
            assert_eq!(decoded, DecodedCommand::from_command(cmd.clone()));
            for cut in 0..data.len() {
                assert!(Command::decode(&data.slice(..cut)).is_err(), "cut {cut}");
            }
            let mut longer = data.to_vec();
            longer.push(0);
            assert_eq!(
                Command::decode(&Bytes::from(longer)),
                Err(CommandError::TrailingBytes)
            );
        }
    }

    #[test]
    fn put_payloads_are_zero_copy_slices_at_the_reported_offsets() {
        let cmd = &all_kinds()[0];
        let data = cmd.encode();
        let d = Command::decode(&data).expect("decode");
        let Command::Put { messages, .. } = &d.command else {
            panic!("not a put")
        };
        for (m, off) in messages.iter().zip(&d.payload_offsets) {
            let off = *off as usize;
            assert_eq!(&data[off..off + m.payload.len()], &m.payload[..]);
            if !m.payload.is_empty() {
                assert_eq!(m.payload.as_ptr(), data[off..].as_ptr(), "not a copy");
            }
        }
    }

    #[test]
    fn hostile_input_is_rejected_without_allocating() {
        let huge_count = [1, TAG_PUT, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            Command::decode(&Bytes::copy_from_slice(&huge_count)),
            Err(CommandError::CountTooLarge(_))
        ));
        assert_eq!(
            Command::decode(&Bytes::from_static(&[9])),
            Err(CommandError::UnknownVersion(9))
        );
        assert_eq!(
            Command::decode(&Bytes::from_static(&[1, 99, 0, 0, 0, 0, 0, 0, 0, 0])),
            Err(CommandError::UnknownTag(99))
        );
        let bad_utf8 = [1, TAG_SUBSCRIBE, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff];
        assert_eq!(
            Command::decode(&Bytes::copy_from_slice(&bad_utf8)),
            Err(CommandError::BadName)
        );
        assert_eq!(Command::decode(&Bytes::new()), Err(CommandError::Truncated));
    }
}
