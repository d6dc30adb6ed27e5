//! Replicated commands and their binary encoding (the data of one Raft entry).
//!
//! Format (all integers big-endian): `u8 version (=1) | u8 tag | u64 now_ms | body`.
//! - Put (tag 1): `u32 count`, then per message `guid[16] | u64 ttl_ms | u16 key_len | key | u32 len | payload`.
//! - Confirm (tag 2): `u16 subscription_len | subscription | u32 count | guid[16]*`.
//! - Purge (3) and Tick (4): no body.
//!
//! Decoding is zero-copy: keys and payloads are slices of the entry's bytes, and each
//! payload's offset in the entry is returned so the state machine can record where it
//! lives in the log instead of copying it.

use crate::{Guid, QueueError};
use bytes::{BufMut, Bytes, BytesMut};

const VERSION: u8 = 1;
const TAG_PUT: u8 = 1;
const TAG_CONFIRM: u8 = 2;
const TAG_PURGE: u8 = 3;
const TAG_TICK: u8 = 4;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutMessage {
    pub guid: Guid,
    /// Time to live in ms; 0 = the queue's default.
    pub ttl_ms: u64,
    pub key: Bytes,
    pub payload: Bytes,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Put {
        now_ms: u64,
        messages: Vec<PutMessage>,
    },
    Confirm {
        now_ms: u64,
        subscription: String,
        guids: Vec<Guid>,
    },
    Purge {
        now_ms: u64,
    },
    Tick {
        now_ms: u64,
    },
}

/// A decoded command plus, for a Put, where each payload sits in the entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodedCommand {
    pub command: Command,
    /// For Put: byte offset of each message's payload within the entry data.
    pub payload_offsets: Vec<u32>,
}

impl Command {
    pub fn now_ms(&self) -> u64 {
        match self {
            Command::Put { now_ms, .. }
            | Command::Confirm { now_ms, .. }
            | Command::Purge { now_ms }
            | Command::Tick { now_ms } => *now_ms,
        }
    }

    /// Encodes a Put from borrowed messages (the hot path: no clone of the message list).
    pub fn encode_put(now_ms: u64, messages: &[PutMessage]) -> Bytes {
        let len = 10
            + 4
            + messages
                .iter()
                .map(|m| 16 + 8 + 2 + m.key.len() + 4 + m.payload.len())
                .sum::<usize>();
        let mut b = BytesMut::with_capacity(len);
        b.put_u8(VERSION);
        b.put_u8(TAG_PUT);
        b.put_u64(now_ms);
        put_messages(&mut b, messages);
        debug_assert_eq!(b.len(), len);
        b.freeze()
    }

    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.encoded_len());
        b.put_u8(VERSION);
        match self {
            Command::Put { now_ms, messages } => {
                b.put_u8(TAG_PUT);
                b.put_u64(*now_ms);
                put_messages(&mut b, messages);
            }
            Command::Confirm {
                now_ms,
                subscription,
                guids,
            } => {
                b.put_u8(TAG_CONFIRM);
                b.put_u64(*now_ms);
                b.put_u16(subscription.len() as u16);
                b.put_slice(subscription.as_bytes());
                b.put_u32(guids.len() as u32);
                for g in guids {
                    b.put_slice(g);
                }
            }
            Command::Purge { now_ms } => {
                b.put_u8(TAG_PURGE);
                b.put_u64(*now_ms);
            }
            Command::Tick { now_ms } => {
                b.put_u8(TAG_TICK);
                b.put_u64(*now_ms);
            }
        }
        b.freeze()
    }

    fn encoded_len(&self) -> usize {
        10 + match self {
            Command::Put { messages, .. } => {
                4 + messages
                    .iter()
                    .map(|m| 16 + 8 + 2 + m.key.len() + 4 + m.payload.len())
                    .sum::<usize>()
            }
            Command::Confirm {
                subscription,
                guids,
                ..
            } => 2 + subscription.len() + 4 + 16 * guids.len(),
            Command::Purge { .. } | Command::Tick { .. } => 0,
        }
    }

    pub fn decode(data: &Bytes) -> Result<DecodedCommand, QueueError> {
        let mut r = Reader { data, pos: 0 };
        let version = r.u8()?;
        if version != VERSION {
            return Err(QueueError::Decode(format!(
                "unknown command format version {version}"
            )));
        }
        let tag = r.u8()?;
        let now_ms = r.u64()?;
        let mut payload_offsets = Vec::new();
        let command = match tag {
            TAG_PUT => {
                let count = r.count(16 + 8 + 2 + 4)?;
                let mut messages = Vec::with_capacity(count);
                for _ in 0..count {
                    let guid = r.guid()?;
                    let ttl_ms = r.u64()?;
                    let key_len = r.u16()? as usize;
                    let key = r.bytes(key_len)?;
                    let len = r.u32()? as usize;
                    payload_offsets.push(r.pos as u32);
                    let payload = r.bytes(len)?;
                    messages.push(PutMessage {
                        guid,
                        ttl_ms,
                        key,
                        payload,
                    });
                }
                Command::Put { now_ms, messages }
            }
            TAG_CONFIRM => {
                let sub_len = r.u16()? as usize;
                let sub = r.bytes(sub_len)?;
                let subscription = String::from_utf8(sub.to_vec())
                    .map_err(|_| QueueError::Decode("subscription is not UTF-8".into()))?;
                let count = r.count(16)?;
                let guids = (0..count).map(|_| r.guid()).collect::<Result<_, _>>()?;
                Command::Confirm {
                    now_ms,
                    subscription,
                    guids,
                }
            }
            TAG_PURGE => Command::Purge { now_ms },
            TAG_TICK => Command::Tick { now_ms },
            other => return Err(QueueError::Decode(format!("unknown command tag {other}"))),
        };
        if r.pos != data.len() {
            return Err(QueueError::Decode("trailing bytes after command".into()));
        }
        Ok(DecodedCommand {
            command,
            payload_offsets,
        })
    }
}

fn put_messages(b: &mut BytesMut, messages: &[PutMessage]) {
    b.put_u32(messages.len() as u32);
    for m in messages {
        b.put_slice(&m.guid);
        b.put_u64(m.ttl_ms);
        b.put_u16(m.key.len() as u16);
        b.put_slice(&m.key);
        b.put_u32(m.payload.len() as u32);
        b.put_slice(&m.payload);
    }
}

struct Reader<'a> {
    data: &'a Bytes,
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], QueueError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|e| *e <= self.data.len())
            .ok_or_else(|| QueueError::Decode("truncated command".into()))?;
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, QueueError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, QueueError> {
        Ok(u16::from_be_bytes(
            self.take(2)?.try_into().unwrap_or_default(),
        ))
    }
    fn u32(&mut self) -> Result<u32, QueueError> {
        Ok(u32::from_be_bytes(
            self.take(4)?.try_into().unwrap_or_default(),
        ))
    }
    fn u64(&mut self) -> Result<u64, QueueError> {
        Ok(u64::from_be_bytes(
            self.take(8)?.try_into().unwrap_or_default(),
        ))
    }
    fn guid(&mut self) -> Result<Guid, QueueError> {
        Ok(self.take(16)?.try_into().unwrap_or_default())
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes, QueueError> {
        let start = self.pos;
        self.take(n)?;
        Ok(self.data.slice(start..start + n))
    }
    /// A count, checked against the bytes left so a hostile count cannot allocate.
    fn count(&mut self, min_item_bytes: usize) -> Result<usize, QueueError> {
        let n = self.u32()? as usize;
        if n.saturating_mul(min_item_bytes) > self.data.len() - self.pos {
            return Err(QueueError::Decode(format!(
                "count {n} exceeds the command's size"
            )));
        }
        Ok(n)
    }
}
