//! Length-prefixed codec: `u32` BE length of (type byte + body), `u8` type, body.
//!
//! The decoder treats its input as hostile: every length and count is checked
//! against what is actually buffered before anything is allocated, and no input
//! can make it panic. Decoded payloads, keys and admin bodies are zero-copy slices
//! of the frame buffer, so a PUT's payload travels from the socket to the log
//! without a copy.
//!
//! The encoder refuses frames the peer would refuse (larger than
//! `max_frame_bytes`) and never leaves a partial frame in the output buffer.

use crate::{
    AckEntry, ConfirmAckEntry, DeadLetterInfo, DeadLetterReason, ExtendEntry, Frame, Guid,
    MessageRef, NackEntry, PushMessage, PutMessage, Status,
};
use bytes::{Buf, BufMut, Bytes, BytesMut};

/// Default bound on one frame (length field value): 16 MiB.
pub const DEFAULT_MAX_FRAME_BYTES: u32 = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    FrameTooLarge { len: u64, max: u32 },
    #[error("malformed frame type 0x{frame_type:02x}: {reason}")]
    Malformed { frame_type: u8, reason: String },
    #[error("unknown frame type 0x{0:02x}")]
    UnknownType(u8),
}

/// Encodes and decodes [`Frame`]s; rejects frames larger than `max_frame_bytes`.
#[derive(Clone, Debug)]
pub struct FrameCodec {
    pub max_frame_bytes: u32,
}

impl FrameCodec {
    pub fn new(max_frame_bytes: u32) -> Self {
        FrameCodec { max_frame_bytes }
    }
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec::new(DEFAULT_MAX_FRAME_BYTES)
    }
}

/// Size of the length prefix.
const LEN_BYTES: usize = 4;
const GUID_BYTES: usize = 16;

// Smallest wire size of one list item, used to reject a count that cannot fit in
// the bytes left *before* allocating room for it.
const PUT_MESSAGE_MIN: usize = GUID_BYTES + 8 + 4 + 4;
const ACK_ENTRY_MIN: usize = GUID_BYTES + 2 + 1;
/// guid, partition, attempt, payload length, flags.
const PUSH_MESSAGE_MIN: usize = GUID_BYTES + 2 + 4 + 4 + 1;
/// Bit 0 of a PushMessage's flags: a dead-letter section follows.
const PUSH_DEAD_LETTER: u8 = 0x01;
const MESSAGE_REF_MIN: usize = GUID_BYTES + 2;
const CONFIRM_ACK_MIN: usize = GUID_BYTES + 2;
const NACK_ENTRY_MIN: usize = GUID_BYTES + 2 + 4;
const EXTEND_ENTRY_MIN: usize = GUID_BYTES + 2 + 4;

fn malformed(frame_type: u8, reason: impl Into<String>) -> ProtoError {
    ProtoError::Malformed {
        frame_type,
        reason: reason.into(),
    }
}

impl tokio_util::codec::Decoder for FrameCodec {
    type Item = Frame;
    type Error = ProtoError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, ProtoError> {
        let Some(header) = src.get(..LEN_BYTES) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]);
        // Checked before waiting for the body, so a hostile peer cannot make us buffer
        // (or reserve) more than the limit.
        if len > self.max_frame_bytes {
            return Err(ProtoError::FrameTooLarge {
                len: u64::from(len),
                max: self.max_frame_bytes,
            });
        }
        if len == 0 {
            return Err(malformed(
                0,
                "zero frame length (a frame has at least its type byte)",
            ));
        }
        // Saturating: on a 32-bit target 4 + u32::MAX does not fit a usize; such a frame
        // can never be complete and the limit check above already bounds `len`.
        let total = LEN_BYTES.saturating_add(len as usize);
        if src.len() < total {
            // Room for exactly this frame (bounded by the limit), so the read loop does
            // not grow the buffer one chunk at a time.
            src.reserve(total - src.len());
            return Ok(None);
        }
        let mut frame = src.split_to(total).freeze();
        frame.advance(LEN_BYTES);
        decode_frame(frame).map(Some)
    }
}

impl tokio_util::codec::Encoder<Frame> for FrameCodec {
    type Error = ProtoError;

    fn encode(&mut self, item: Frame, dst: &mut BytesMut) -> Result<(), ProtoError> {
        encode_frame(&item, self.max_frame_bytes, dst)
    }
}

/// Size of `frame` on the wire, including the 4-byte length prefix.
///
/// The length field carries `encoded_len(frame) - 4`; that value is what
/// `max_frame_bytes` bounds.
pub fn encoded_len(frame: &Frame) -> usize {
    LEN_BYTES.saturating_add(1).saturating_add(body_len(frame))
}

/// Wire size of one [`PutMessage`] inside a PUT frame; lets a client add messages to
/// a batch and stop before the frame would exceed the peer's limit.
pub fn put_message_encoded_len(m: &PutMessage) -> usize {
    PUT_MESSAGE_MIN
        .saturating_add(m.key.len())
        .saturating_add(m.payload.len())
}

/// Wire size of the body (after the type byte). Saturating so that no input can
/// overflow; a saturated size is far above any frame limit and gets rejected.
fn body_len(frame: &Frame) -> usize {
    fn string(s: &str) -> usize {
        2usize.saturating_add(s.len())
    }
    fn bytes(b: &Bytes) -> usize {
        4usize.saturating_add(b.len())
    }
    fn list<T>(items: &[T], item: impl Fn(&T) -> usize) -> usize {
        items
            .iter()
            .fold(4usize, |acc, i| acc.saturating_add(item(i)))
    }
    match frame {
        Frame::Hello { client_name, .. } => 2usize.saturating_add(string(client_name)),
        Frame::HelloOk { .. } => 2 + 8 + 4 + 4,
        Frame::OpenQueue {
            queue,
            subscription,
            ..
        } => (4 + 1 + 4 + 8usize)
            .saturating_add(string(queue))
            .saturating_add(string(subscription)),
        Frame::OpenQueueOk { .. } => 4 + 4 + 2,
        Frame::CloseQueue { .. } => 4 + 4,
        Frame::CloseQueueOk { .. } => 4,
        Frame::Configure { .. } => 4 + 4 + 4 + 8,
        Frame::ConfigureOk { .. } => 4,
        Frame::Put { messages, .. } => {
            4usize.saturating_add(list(messages, put_message_encoded_len))
        }
        Frame::Ack { acks } => list(acks, |_| ACK_ENTRY_MIN),
        Frame::Push { messages, .. } => 4usize.saturating_add(list(messages, |m| {
            PUSH_MESSAGE_MIN
                .saturating_add(m.payload.len())
                .saturating_add(m.dead_letter.as_ref().map_or(0, |d| {
                    (1 + 4 + GUID_BYTES)
                        .saturating_add(string(&d.source_queue))
                        .saturating_add(string(&d.subscription))
                }))
        })),
        Frame::Confirm { messages, .. } => {
            4usize.saturating_add(list(messages, |_| MESSAGE_REF_MIN))
        }
        Frame::ConfirmAck { entries, .. } => {
            4usize.saturating_add(list(entries, |_| CONFIRM_ACK_MIN))
        }
        Frame::Nack { entries, .. } => 4usize.saturating_add(list(entries, |_| NACK_ENTRY_MIN)),
        Frame::Extend { entries, .. } => 4usize.saturating_add(list(entries, |_| EXTEND_ENTRY_MIN)),
        Frame::Heartbeat | Frame::HeartbeatAck | Frame::StopResponse => 0,
        Frame::StopRequest { .. } => 4,
        Frame::AdminRequest { body, .. } => 4usize.saturating_add(bytes(body)),
        Frame::AdminResponse { body, .. } => (4 + 2usize).saturating_add(bytes(body)),
        Frame::Error { message, .. } => (4 + 2usize).saturating_add(string(message)),
    }
}

/// Rejects a string that does not fit its `u16` length; checked before writing so
/// the output buffer never holds a partial frame.
fn check_strings(frame: &Frame) -> Result<(), ProtoError> {
    let strings: &[&String] = match frame {
        Frame::Hello { client_name, .. } => &[client_name],
        Frame::OpenQueue {
            queue,
            subscription,
            ..
        } => &[queue, subscription],
        Frame::Error { message, .. } => &[message],
        _ => &[],
    };
    match strings.iter().find(|s| s.len() > usize::from(u16::MAX)) {
        Some(s) => Err(malformed(
            frame.type_code(),
            format!(
                "string field of {} bytes exceeds the maximum of {}",
                s.len(),
                u16::MAX
            ),
        )),
        None => Ok(()),
    }
}

fn encode_frame(frame: &Frame, max_frame_bytes: u32, dst: &mut BytesMut) -> Result<(), ProtoError> {
    let len = 1usize.saturating_add(body_len(frame));
    if len > max_frame_bytes as usize {
        return Err(ProtoError::FrameTooLarge {
            len: len as u64,
            max: max_frame_bytes,
        });
    }
    check_strings(frame)?;
    // From here on every length fits its field: `len` <= max_frame_bytes <= u32::MAX
    // bounds every bytes field and list count, and strings were checked above.
    dst.reserve(LEN_BYTES + len);
    dst.put_u32(len as u32);
    dst.put_u8(frame.type_code());
    match frame {
        Frame::Hello {
            version,
            client_name,
        } => {
            dst.put_u16(*version);
            put_string(dst, client_name);
        }
        Frame::HelloOk {
            version,
            node_id,
            max_frame_bytes,
            heartbeat_interval_ms,
        } => {
            dst.put_u16(*version);
            dst.put_u64(*node_id);
            dst.put_u32(*max_frame_bytes);
            dst.put_u32(*heartbeat_interval_ms);
        }
        Frame::OpenQueue {
            req_id,
            queue,
            subscription,
            flags,
            max_unconfirmed_msgs,
            max_unconfirmed_bytes,
        } => {
            dst.put_u32(*req_id);
            put_string(dst, queue);
            put_string(dst, subscription);
            dst.put_u8(*flags);
            dst.put_u32(*max_unconfirmed_msgs);
            dst.put_u64(*max_unconfirmed_bytes);
        }
        Frame::OpenQueueOk {
            req_id,
            queue_id,
            partitions,
        } => {
            dst.put_u32(*req_id);
            dst.put_u32(*queue_id);
            dst.put_u16(*partitions);
        }
        Frame::CloseQueue { req_id, queue_id } => {
            dst.put_u32(*req_id);
            dst.put_u32(*queue_id);
        }
        Frame::CloseQueueOk { req_id } | Frame::ConfigureOk { req_id } => dst.put_u32(*req_id),
        Frame::Configure {
            req_id,
            queue_id,
            max_unconfirmed_msgs,
            max_unconfirmed_bytes,
        } => {
            dst.put_u32(*req_id);
            dst.put_u32(*queue_id);
            dst.put_u32(*max_unconfirmed_msgs);
            dst.put_u64(*max_unconfirmed_bytes);
        }
        Frame::Put { queue_id, messages } => {
            dst.put_u32(*queue_id);
            put_count(dst, messages.len());
            for m in messages {
                dst.put_slice(&m.guid);
                dst.put_u64(m.ttl_ms);
                put_bytes(dst, &m.key);
                put_bytes(dst, &m.payload);
            }
        }
        Frame::Ack { acks } => {
            put_count(dst, acks.len());
            for a in acks {
                dst.put_slice(&a.guid);
                dst.put_u16(a.status.as_u16());
                dst.put_u8(a.flags);
            }
        }
        Frame::Push { queue_id, messages } => {
            dst.put_u32(*queue_id);
            put_count(dst, messages.len());
            for m in messages {
                dst.put_slice(&m.guid);
                dst.put_u16(m.partition);
                dst.put_u32(m.attempt);
                put_bytes(dst, &m.payload);
                match &m.dead_letter {
                    Some(d) => {
                        dst.put_u8(PUSH_DEAD_LETTER);
                        dst.put_u8(d.reason as u8);
                        dst.put_u32(d.attempts);
                        dst.put_slice(&d.original_guid);
                        put_string(dst, &d.source_queue);
                        put_string(dst, &d.subscription);
                    }
                    None => dst.put_u8(0),
                }
            }
        }
        Frame::Confirm { queue_id, messages } => {
            dst.put_u32(*queue_id);
            put_count(dst, messages.len());
            for m in messages {
                dst.put_slice(&m.guid);
                dst.put_u16(m.partition);
            }
        }
        Frame::ConfirmAck { queue_id, entries } => {
            dst.put_u32(*queue_id);
            put_count(dst, entries.len());
            for e in entries {
                dst.put_slice(&e.guid);
                dst.put_u16(e.status.as_u16());
            }
        }
        Frame::Nack { queue_id, entries } => {
            dst.put_u32(*queue_id);
            put_count(dst, entries.len());
            for e in entries {
                dst.put_slice(&e.guid);
                dst.put_u16(e.partition);
                dst.put_u32(e.delay_ms);
            }
        }
        Frame::Extend { queue_id, entries } => {
            dst.put_u32(*queue_id);
            put_count(dst, entries.len());
            for e in entries {
                dst.put_slice(&e.guid);
                dst.put_u16(e.partition);
                dst.put_u32(e.extra_ms);
            }
        }
        Frame::Heartbeat | Frame::HeartbeatAck | Frame::StopResponse => {}
        Frame::StopRequest { drain_timeout_ms } => dst.put_u32(*drain_timeout_ms),
        Frame::AdminRequest { req_id, body } => {
            dst.put_u32(*req_id);
            put_bytes(dst, body);
        }
        Frame::AdminResponse {
            req_id,
            status,
            body,
        } => {
            dst.put_u32(*req_id);
            dst.put_u16(status.as_u16());
            put_bytes(dst, body);
        }
        Frame::Error {
            req_id,
            status,
            message,
        } => {
            dst.put_u32(*req_id);
            dst.put_u16(status.as_u16());
            put_string(dst, message);
        }
    }
    Ok(())
}

// The writer helpers below rely on `encode_frame` having checked the frame size and
// string lengths, so the `as` conversions cannot truncate.

fn put_string(dst: &mut BytesMut, s: &str) {
    dst.put_u16(s.len() as u16);
    dst.put_slice(s.as_bytes());
}

fn put_bytes(dst: &mut BytesMut, b: &Bytes) {
    dst.put_u32(b.len() as u32);
    dst.put_slice(b);
}

fn put_count(dst: &mut BytesMut, n: usize) {
    dst.put_u32(n as u32);
}

/// Reads fields from one frame's body; every read checks what is left and reports
/// underflow as `Malformed` (naming the frame type) instead of panicking.
struct Reader {
    buf: Bytes,
    frame_type: u8,
}

impl Reader {
    fn err(&self, reason: impl Into<String>) -> ProtoError {
        malformed(self.frame_type, reason)
    }

    fn need(&self, n: usize, what: &str) -> Result<(), ProtoError> {
        if self.buf.remaining() < n {
            return Err(self.err(format!(
                "truncated {what}: need {n} bytes, {} left",
                self.buf.remaining()
            )));
        }
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, ProtoError> {
        self.need(1, "u8")?;
        Ok(self.buf.get_u8())
    }

    fn u16(&mut self) -> Result<u16, ProtoError> {
        self.need(2, "u16")?;
        Ok(self.buf.get_u16())
    }

    fn u32(&mut self) -> Result<u32, ProtoError> {
        self.need(4, "u32")?;
        Ok(self.buf.get_u32())
    }

    fn u64(&mut self) -> Result<u64, ProtoError> {
        self.need(8, "u64")?;
        Ok(self.buf.get_u64())
    }

    fn guid(&mut self) -> Result<Guid, ProtoError> {
        self.need(GUID_BYTES, "guid")?;
        let mut guid = [0u8; GUID_BYTES];
        self.buf.copy_to_slice(&mut guid);
        Ok(guid)
    }

    fn status(&mut self) -> Result<Status, ProtoError> {
        let v = self.u16()?;
        Status::from_u16(v).ok_or_else(|| self.err(format!("unknown status {v}")))
    }

    fn string(&mut self) -> Result<String, ProtoError> {
        let len = usize::from(self.u16()?);
        self.need(len, "string")?;
        let raw = self.buf.split_to(len);
        match std::str::from_utf8(&raw) {
            Ok(s) => Ok(s.to_owned()),
            Err(e) => Err(self.err(format!("string is not valid UTF-8: {e}"))),
        }
    }

    /// Zero-copy: the result shares the frame buffer.
    fn bytes(&mut self) -> Result<Bytes, ProtoError> {
        let len = self.u32()? as usize;
        self.need(len, "bytes")?;
        Ok(self.buf.split_to(len))
    }

    /// Reads a list count and checks that `count` items of at least `min_item` bytes
    /// fit in what is left, so a hostile count never drives an allocation.
    fn count(&mut self, min_item: usize) -> Result<usize, ProtoError> {
        let count = self.u32()?;
        let needed = u64::from(count) * min_item as u64;
        if needed > self.buf.remaining() as u64 {
            return Err(self.err(format!(
                "list count {count} needs at least {needed} bytes, {} left",
                self.buf.remaining()
            )));
        }
        Ok(count as usize)
    }

    fn list<T>(
        &mut self,
        min_item: usize,
        mut item: impl FnMut(&mut Self) -> Result<T, ProtoError>,
    ) -> Result<Vec<T>, ProtoError> {
        let count = self.count(min_item)?;
        let mut out = Vec::with_capacity(count);
        for _ in 0..count {
            out.push(item(self)?);
        }
        Ok(out)
    }

    fn finish(&self) -> Result<(), ProtoError> {
        if self.buf.has_remaining() {
            return Err(self.err(format!(
                "{} trailing bytes after the body",
                self.buf.remaining()
            )));
        }
        Ok(())
    }
}

/// Decodes one frame from `frame` = type byte + body (the length prefix removed).
fn decode_frame(frame: Bytes) -> Result<Frame, ProtoError> {
    let mut r = Reader {
        buf: frame,
        frame_type: 0,
    };
    let frame_type = r.u8()?;
    r.frame_type = frame_type;
    let frame = match frame_type {
        0x01 => Frame::Hello {
            version: r.u16()?,
            client_name: r.string()?,
        },
        0x02 => Frame::HelloOk {
            version: r.u16()?,
            node_id: r.u64()?,
            max_frame_bytes: r.u32()?,
            heartbeat_interval_ms: r.u32()?,
        },
        0x10 => Frame::OpenQueue {
            req_id: r.u32()?,
            queue: r.string()?,
            subscription: r.string()?,
            flags: r.u8()?,
            max_unconfirmed_msgs: r.u32()?,
            max_unconfirmed_bytes: r.u64()?,
        },
        0x11 => Frame::OpenQueueOk {
            req_id: r.u32()?,
            queue_id: r.u32()?,
            partitions: r.u16()?,
        },
        0x12 => Frame::CloseQueue {
            req_id: r.u32()?,
            queue_id: r.u32()?,
        },
        0x13 => Frame::CloseQueueOk { req_id: r.u32()? },
        0x14 => Frame::Configure {
            req_id: r.u32()?,
            queue_id: r.u32()?,
            max_unconfirmed_msgs: r.u32()?,
            max_unconfirmed_bytes: r.u64()?,
        },
        0x15 => Frame::ConfigureOk { req_id: r.u32()? },
        0x20 => Frame::Put {
            queue_id: r.u32()?,
            messages: r.list(PUT_MESSAGE_MIN, |r| {
                Ok(PutMessage {
                    guid: r.guid()?,
                    ttl_ms: r.u64()?,
                    key: r.bytes()?,
                    payload: r.bytes()?,
                })
            })?,
        },
        0x21 => Frame::Ack {
            acks: r.list(ACK_ENTRY_MIN, |r| {
                Ok(AckEntry {
                    guid: r.guid()?,
                    status: r.status()?,
                    flags: r.u8()?,
                })
            })?,
        },
        0x30 => Frame::Push {
            queue_id: r.u32()?,
            messages: r.list(PUSH_MESSAGE_MIN, |r| {
                let guid = r.guid()?;
                let partition = r.u16()?;
                let attempt = r.u32()?;
                let payload = r.bytes()?;
                let dead_letter = match r.u8()? {
                    0 => None,
                    PUSH_DEAD_LETTER => Some(DeadLetterInfo {
                        reason: match r.u8()? {
                            1 => DeadLetterReason::MaxAttempts,
                            2 => DeadLetterReason::Expired,
                            other => {
                                return Err(r.err(format!("unknown dead-letter reason {other}")))
                            }
                        },
                        attempts: r.u32()?,
                        original_guid: r.guid()?,
                        source_queue: r.string()?,
                        subscription: r.string()?,
                    }),
                    other => return Err(r.err(format!("unknown push flags 0x{other:02x}"))),
                };
                Ok(PushMessage {
                    guid,
                    partition,
                    attempt,
                    payload,
                    dead_letter,
                })
            })?,
        },
        0x31 => Frame::Confirm {
            queue_id: r.u32()?,
            messages: r.list(MESSAGE_REF_MIN, |r| {
                Ok(MessageRef {
                    guid: r.guid()?,
                    partition: r.u16()?,
                })
            })?,
        },
        0x32 => Frame::ConfirmAck {
            queue_id: r.u32()?,
            entries: r.list(CONFIRM_ACK_MIN, |r| {
                Ok(ConfirmAckEntry {
                    guid: r.guid()?,
                    status: r.status()?,
                })
            })?,
        },
        0x33 => Frame::Nack {
            queue_id: r.u32()?,
            entries: r.list(NACK_ENTRY_MIN, |r| {
                Ok(NackEntry {
                    guid: r.guid()?,
                    partition: r.u16()?,
                    delay_ms: r.u32()?,
                })
            })?,
        },
        0x34 => Frame::Extend {
            queue_id: r.u32()?,
            entries: r.list(EXTEND_ENTRY_MIN, |r| {
                Ok(ExtendEntry {
                    guid: r.guid()?,
                    partition: r.u16()?,
                    extra_ms: r.u32()?,
                })
            })?,
        },
        0x40 => Frame::Heartbeat,
        0x41 => Frame::HeartbeatAck,
        0x50 => Frame::StopRequest {
            drain_timeout_ms: r.u32()?,
        },
        0x51 => Frame::StopResponse,
        0x60 => Frame::AdminRequest {
            req_id: r.u32()?,
            body: r.bytes()?,
        },
        0x61 => Frame::AdminResponse {
            req_id: r.u32()?,
            status: r.status()?,
            body: r.bytes()?,
        },
        0x7F => Frame::Error {
            req_id: r.u32()?,
            status: r.status()?,
            message: r.string()?,
        },
        other => return Err(ProtoError::UnknownType(other)),
    };
    r.finish()?;
    Ok(frame)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::collection::vec;
    use proptest::prelude::*;
    use tokio_util::codec::{Decoder, Encoder};

    const ALL_STATUSES: [Status; 16] = [
        Status::Ok,
        Status::UnknownQueue,
        Status::QueueExists,
        Status::InvalidArgument,
        Status::MessageTooLarge,
        Status::QuotaExceeded,
        Status::Overloaded,
        Status::Timeout,
        Status::Unavailable,
        Status::Stopping,
        Status::ProtocolError,
        Status::UnsupportedVersion,
        Status::UnknownMessage,
        Status::StorageFull,
        Status::Internal,
        Status::UnknownHandle,
    ];

    fn encode(frame: &Frame) -> BytesMut {
        let mut buf = BytesMut::new();
        FrameCodec::default()
            .encode(frame.clone(), &mut buf)
            .expect("encode");
        buf
    }

    /// Decodes every complete frame in `buf`.
    fn decode_all(codec: &mut FrameCodec, buf: &mut BytesMut) -> Result<Vec<Frame>, ProtoError> {
        let mut out = Vec::new();
        while let Some(f) = codec.decode(buf)? {
            out.push(f);
        }
        Ok(out)
    }

    fn decode_one(bytes: &[u8]) -> Result<Option<Frame>, ProtoError> {
        FrameCodec::default().decode(&mut BytesMut::from(bytes))
    }

    fn assert_malformed(r: Result<Option<Frame>, ProtoError>, frame_type: u8, needle: &str) {
        match r {
            Err(ProtoError::Malformed {
                frame_type: t,
                reason,
            }) => {
                assert_eq!(t, frame_type, "{reason}");
                assert!(
                    reason.contains(needle),
                    "reason {reason:?} lacks {needle:?}"
                );
            }
            other => panic!("expected Malformed, got {other:?}"),
        }
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    fn status() -> impl Strategy<Value = Status> {
        prop::sample::select(ALL_STATUSES.to_vec())
    }

    fn bytes() -> impl Strategy<Value = Bytes> {
        vec(any::<u8>(), 0..48).prop_map(Bytes::from)
    }

    fn text() -> impl Strategy<Value = String> {
        // Any Unicode, so multi-byte UTF-8 is exercised.
        ".{0,12}"
    }

    fn guid() -> impl Strategy<Value = Guid> {
        any::<Guid>()
    }

    fn frame() -> impl Strategy<Value = Frame> {
        let put =
            (guid(), any::<u64>(), bytes(), bytes()).prop_map(|(guid, ttl_ms, key, payload)| {
                PutMessage {
                    guid,
                    ttl_ms,
                    key,
                    payload,
                }
            });
        let ack = (guid(), status(), any::<u8>()).prop_map(|(guid, status, flags)| AckEntry {
            guid,
            status,
            flags,
        });
        let push = (guid(), any::<u16>(), any::<u32>(), bytes()).prop_map(
            |(guid, partition, attempt, payload)| PushMessage {
                guid,
                partition,
                attempt,
                dead_letter: (attempt % 2 == 1).then(|| DeadLetterInfo {
                    source_queue: "orders".into(),
                    subscription: String::new(),
                    reason: DeadLetterReason::MaxAttempts,
                    attempts: attempt,
                    original_guid: guid,
                }),
                payload,
            },
        );
        let mref =
            (guid(), any::<u16>()).prop_map(|(guid, partition)| MessageRef { guid, partition });
        let cack = (guid(), status()).prop_map(|(guid, status)| ConfirmAckEntry { guid, status });
        let nack = (guid(), any::<u16>(), any::<u32>()).prop_map(|(guid, partition, delay_ms)| {
            NackEntry {
                guid,
                partition,
                delay_ms,
            }
        });
        let ext = (guid(), any::<u16>(), any::<u32>()).prop_map(|(guid, partition, extra_ms)| {
            ExtendEntry {
                guid,
                partition,
                extra_ms,
            }
        });
        prop_oneof![
            (any::<u16>(), text()).prop_map(|(version, client_name)| Frame::Hello {
                version,
                client_name
            }),
            (any::<u16>(), any::<u64>(), any::<u32>(), any::<u32>()).prop_map(|(a, b, c, d)| {
                Frame::HelloOk {
                    version: a,
                    node_id: b,
                    max_frame_bytes: c,
                    heartbeat_interval_ms: d,
                }
            }),
            (
                any::<u32>(),
                text(),
                text(),
                any::<u8>(),
                any::<u32>(),
                any::<u64>()
            )
                .prop_map(|(a, b, c, d, e, f)| {
                    Frame::OpenQueue {
                        req_id: a,
                        queue: b,
                        subscription: c,
                        flags: d,
                        max_unconfirmed_msgs: e,
                        max_unconfirmed_bytes: f,
                    }
                }),
            (any::<u32>(), any::<u32>(), any::<u16>()).prop_map(
                |(req_id, queue_id, partitions)| Frame::OpenQueueOk {
                    req_id,
                    queue_id,
                    partitions
                }
            ),
            (any::<u32>(), any::<u32>())
                .prop_map(|(req_id, queue_id)| Frame::CloseQueue { req_id, queue_id }),
            any::<u32>().prop_map(|req_id| Frame::CloseQueueOk { req_id }),
            (any::<u32>(), any::<u32>(), any::<u32>(), any::<u64>()).prop_map(|(a, b, c, d)| {
                Frame::Configure {
                    req_id: a,
                    queue_id: b,
                    max_unconfirmed_msgs: c,
                    max_unconfirmed_bytes: d,
                }
            }),
            any::<u32>().prop_map(|req_id| Frame::ConfigureOk { req_id }),
            (any::<u32>(), vec(put, 0..4))
                .prop_map(|(queue_id, messages)| Frame::Put { queue_id, messages }),
            vec(ack, 0..4).prop_map(|acks| Frame::Ack { acks }),
            (any::<u32>(), vec(push, 0..4))
                .prop_map(|(queue_id, messages)| Frame::Push { queue_id, messages }),
            (any::<u32>(), vec(mref, 0..4))
                .prop_map(|(queue_id, messages)| Frame::Confirm { queue_id, messages }),
            (any::<u32>(), vec(cack, 0..4))
                .prop_map(|(queue_id, entries)| Frame::ConfirmAck { queue_id, entries }),
            (any::<u32>(), vec(nack, 0..4))
                .prop_map(|(queue_id, entries)| Frame::Nack { queue_id, entries }),
            (any::<u32>(), vec(ext, 0..4))
                .prop_map(|(queue_id, entries)| Frame::Extend { queue_id, entries }),
            Just(Frame::Heartbeat),
            Just(Frame::HeartbeatAck),
            any::<u32>().prop_map(|drain_timeout_ms| Frame::StopRequest { drain_timeout_ms }),
            Just(Frame::StopResponse),
            (any::<u32>(), bytes()).prop_map(|(req_id, body)| Frame::AdminRequest { req_id, body }),
            (any::<u32>(), status(), bytes()).prop_map(|(req_id, status, body)| {
                Frame::AdminResponse {
                    req_id,
                    status,
                    body,
                }
            }),
            (any::<u32>(), status(), text()).prop_map(|(req_id, status, message)| Frame::Error {
                req_id,
                status,
                message
            }),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn round_trip(f in frame()) {
            let mut buf = encode(&f);
            prop_assert_eq!(buf.len(), encoded_len(&f));
            let mut codec = FrameCodec::default();
            let got = codec.decode(&mut buf).expect("decode");
            prop_assert_eq!(got, Some(f));
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn chunked_decode_yields_the_same_frames(
            frames in vec(frame(), 1..8),
            cuts in vec(1usize..64, 1..64),
        ) {
            let mut wire = BytesMut::new();
            for f in &frames {
                wire.extend_from_slice(&encode(f));
            }
            let mut codec = FrameCodec::default();
            let mut buf = BytesMut::new();
            let mut got = Vec::new();
            let mut rest = &wire[..];
            let mut i = 0;
            while !rest.is_empty() {
                let n = cuts[i % cuts.len()].min(rest.len());
                i += 1;
                buf.extend_from_slice(&rest[..n]);
                rest = &rest[n..];
                got.extend(decode_all(&mut codec, &mut buf).expect("decode"));
            }
            prop_assert_eq!(got, frames);
            prop_assert!(buf.is_empty());
        }

        #[test]
        fn random_bytes_never_panic(data in vec(any::<u8>(), 0..512)) {
            let mut codec = FrameCodec::new(1024);
            let mut buf = BytesMut::from(&data[..]);
            // Must terminate: every Ok(Some) consumes a frame.
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }

        /// Random bodies behind a plausible header reach the body parsers, which pure
        /// random bytes (mostly huge lengths) rarely do.
        #[test]
        fn random_bodies_never_panic(
            ty in prop::sample::select(vec![
                0x01u8, 0x02, 0x10, 0x11, 0x12, 0x13, 0x14, 0x15, 0x20, 0x21, 0x30, 0x31,
                0x32, 0x33, 0x34, 0x40, 0x41, 0x50, 0x51, 0x60, 0x61, 0x7F, 0x00, 0xFF,
            ]),
            body in vec(any::<u8>(), 0..256),
        ) {
            let mut buf = BytesMut::new();
            buf.put_u32(body.len() as u32 + 1);
            buf.put_u8(ty);
            buf.extend_from_slice(&body);
            let _ = FrameCodec::default().decode(&mut buf);
        }

        /// Valid frames with a byte changed or cut short: decoding either fails or
        /// yields some frame, never panics, and always consumes the declared length.
        #[test]
        fn mutated_frames_never_panic(f in frame(), pos in any::<prop::sample::Index>(), val in any::<u8>(), cut in any::<prop::sample::Index>()) {
            let mut wire = encode(&f).to_vec();
            let at = pos.index(wire.len());
            wire[at] = val;
            let keep = cut.index(wire.len() + 1);
            wire.truncate(keep.max(at + 1));
            let mut codec = FrameCodec::new(4096);
            let mut buf = BytesMut::from(&wire[..]);
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }
    }

    #[test]
    fn oversized_length_rejected_before_the_body_arrives() {
        let mut codec = FrameCodec::new(1000);
        let mut buf = BytesMut::new();
        buf.put_u32(1001);
        buf.put_u8(0x20);
        match codec.decode(&mut buf) {
            Err(ProtoError::FrameTooLarge {
                len: 1001,
                max: 1000,
            }) => {}
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        // Only the header has arrived; nothing was reserved for the body.
        assert!(buf.capacity() < 1001, "capacity {}", buf.capacity());

        let mut buf = BytesMut::new();
        buf.put_u32(u32::MAX);
        assert!(matches!(
            FrameCodec::default().decode(&mut buf),
            Err(ProtoError::FrameTooLarge {
                len: 0xFFFF_FFFF,
                max: DEFAULT_MAX_FRAME_BYTES
            })
        ));
        assert!(buf.capacity() < 1024);

        // Exactly at the limit is allowed: waits for the body and reserves just that.
        let mut buf = BytesMut::new();
        buf.put_u32(1000);
        assert!(matches!(codec.decode(&mut buf), Ok(None)));
        assert!(buf.capacity() >= 1004);
    }

    #[test]
    fn incomplete_frames_wait_without_consuming() {
        let wire = encode(&Frame::Hello {
            version: 1,
            client_name: "x".into(),
        });
        for n in 0..wire.len() {
            let mut buf = BytesMut::from(&wire[..n]);
            assert!(matches!(FrameCodec::default().decode(&mut buf), Ok(None)));
            assert_eq!(buf.len(), n);
        }
    }

    #[test]
    fn zero_length_is_malformed() {
        assert_malformed(decode_one(&[0, 0, 0, 0]), 0, "zero frame length");
    }

    #[test]
    fn encoding_over_the_limit_is_refused_and_writes_nothing() {
        let frame = Frame::Put {
            queue_id: 1,
            messages: vec![PutMessage {
                guid: [1; 16],
                ttl_ms: 0,
                key: Bytes::new(),
                payload: Bytes::from(vec![0; 100]),
            }],
        };
        let len = encoded_len(&frame);
        let mut buf = BytesMut::new();
        // The limit bounds the length field, which excludes the 4-byte prefix.
        let exact = (len - 4) as u32;
        match FrameCodec::new(exact - 1).encode(frame.clone(), &mut buf) {
            Err(ProtoError::FrameTooLarge { len: l, max }) => {
                assert_eq!((l, max), (u64::from(exact), exact - 1));
            }
            other => panic!("expected FrameTooLarge, got {other:?}"),
        }
        assert!(buf.is_empty());
        FrameCodec::new(exact)
            .encode(frame.clone(), &mut buf)
            .expect("fits exactly");
        assert_eq!(buf.len(), len);
        // ... and the peer with the same limit accepts it.
        assert_eq!(
            FrameCodec::new(exact).decode(&mut buf).expect("decode"),
            Some(frame)
        );
    }

    #[test]
    fn encoding_a_too_long_string_is_refused() {
        let frame = Frame::Error {
            req_id: 1,
            status: Status::Internal,
            message: "x".repeat(70_000),
        };
        let mut buf = BytesMut::new();
        assert!(matches!(
            FrameCodec::default().encode(frame, &mut buf),
            Err(ProtoError::Malformed {
                frame_type: 0x7F,
                ..
            })
        ));
        assert!(buf.is_empty());
        // 65535 bytes is the largest string that fits.
        let frame = Frame::Error {
            req_id: 1,
            status: Status::Internal,
            message: "x".repeat(65_535),
        };
        let mut buf = encode(&frame);
        assert_eq!(
            FrameCodec::default().decode(&mut buf).expect("decode"),
            Some(frame)
        );
    }

    #[test]
    fn hostile_list_counts_are_rejected_without_allocating() {
        // Put: queue_id 1, count 0xFFFFFFFF, no items.
        let mut buf = BytesMut::new();
        buf.put_u32(1 + 4 + 4);
        buf.put_u8(0x20);
        buf.put_u32(1);
        buf.put_u32(u32::MAX);
        assert_malformed(
            FrameCodec::default().decode(&mut buf),
            0x20,
            "list count 4294967295",
        );
        assert!(buf.is_empty(), "the bad frame is consumed");

        // Every list-bearing frame: a count one larger than the body can hold.
        for (ty, has_queue_id, min) in [
            (0x20u8, true, PUT_MESSAGE_MIN),
            (0x21, false, ACK_ENTRY_MIN),
            (0x30, true, PUSH_MESSAGE_MIN),
            (0x31, true, MESSAGE_REF_MIN),
            (0x32, true, CONFIRM_ACK_MIN),
            (0x33, true, NACK_ENTRY_MIN),
            (0x34, true, EXTEND_ENTRY_MIN),
        ] {
            let mut body = BytesMut::new();
            if has_queue_id {
                body.put_u32(7);
            }
            body.put_u32(3);
            body.extend_from_slice(&vec![0u8; 2 * min]);
            let mut buf = BytesMut::new();
            buf.put_u32(1 + body.len() as u32);
            buf.put_u8(ty);
            buf.extend_from_slice(&body);
            assert_malformed(FrameCodec::default().decode(&mut buf), ty, "list count 3");
        }
    }

    #[test]
    fn byte_field_longer_than_the_frame_is_malformed() {
        // AdminRequest whose body claims 1000 bytes but has 2.
        let mut buf = BytesMut::new();
        buf.put_u32(1 + 4 + 4 + 2);
        buf.put_u8(0x60);
        buf.put_u32(9);
        buf.put_u32(1000);
        buf.put_slice(b"{}");
        assert_malformed(
            FrameCodec::default().decode(&mut buf),
            0x60,
            "truncated bytes",
        );
    }

    #[test]
    fn invalid_utf8_is_malformed() {
        // Hello { version 1, client_name = FF FE }.
        assert_malformed(
            decode_one(&[0, 0, 0, 7, 0x01, 0, 1, 0, 2, 0xFF, 0xFE]),
            0x01,
            "UTF-8",
        );
        // A truncated multi-byte sequence ("é" cut in half) inside OpenQueue's queue name.
        let mut buf = BytesMut::new();
        let body: &[u8] = &[
            0, 0, 0, 1, 0, 1, 0xC3, 0, 0, 0b10, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        buf.put_u32(1 + body.len() as u32);
        buf.put_u8(0x10);
        buf.put_slice(body);
        assert_malformed(FrameCodec::default().decode(&mut buf), 0x10, "UTF-8");
    }

    #[test]
    fn trailing_bytes_are_malformed() {
        assert_malformed(
            decode_one(&[0, 0, 0, 2, 0x40, 0xAA]),
            0x40,
            "1 trailing bytes",
        );
        let mut wire = encode(&Frame::ConfigureOk { req_id: 5 }).to_vec();
        wire[3] += 3;
        wire.extend_from_slice(&[1, 2, 3]);
        assert_malformed(decode_one(&wire), 0x15, "3 trailing bytes");
    }

    #[test]
    fn unknown_type_code_is_rejected() {
        match decode_one(&[0, 0, 0, 1, 0x03]) {
            Err(ProtoError::UnknownType(0x03)) => {}
            other => panic!("expected UnknownType, got {other:?}"),
        }
    }

    #[test]
    fn unknown_status_is_malformed() {
        // Ack with one entry whose status is 9 (unassigned).
        let mut buf = BytesMut::new();
        buf.put_u32(1 + 4 + ACK_ENTRY_MIN as u32);
        buf.put_u8(0x21);
        buf.put_u32(1);
        buf.put_slice(&[0xAB; 16]);
        buf.put_u16(9);
        buf.put_u8(crate::ACK_DURABLE);
        assert_malformed(
            FrameCodec::default().decode(&mut buf),
            0x21,
            "unknown status 9",
        );
        // Error frame with status 0xFFFF.
        assert_malformed(
            decode_one(&[0, 0, 0, 9, 0x7F, 0, 0, 0, 0, 0xFF, 0xFF, 0, 0]),
            0x7F,
            "unknown status 65535",
        );
    }

    #[test]
    fn payloads_are_zero_copy_slices_of_the_frame() {
        let frame = Frame::Put {
            queue_id: 1,
            messages: vec![PutMessage {
                guid: [2; 16],
                ttl_ms: 0,
                key: Bytes::from_static(b"k"),
                payload: Bytes::from_static(b"payload"),
            }],
        };
        let mut buf = encode(&frame);
        let range = buf.as_ptr_range();
        let Some(Frame::Put { messages, .. }) =
            FrameCodec::default().decode(&mut buf).expect("decode")
        else {
            panic!("expected Put");
        };
        for field in [&messages[0].key, &messages[0].payload] {
            assert!(range.contains(&field.as_ptr()), "field was copied");
        }
    }

    /// The worked examples in docs/protocol.md; keep both in sync.
    #[test]
    fn documented_hex_examples() {
        let hello = Frame::Hello {
            version: 1,
            client_name: "demo".into(),
        };
        assert_eq!(hex(&encode(&hello)), "00000009010001000464656d6f");

        let mut guid = [0u8; 16];
        for (i, b) in guid.iter_mut().enumerate() {
            *b = i as u8;
        }
        let put = Frame::Put {
            queue_id: 1,
            messages: vec![PutMessage {
                guid,
                ttl_ms: 0,
                key: Bytes::new(),
                payload: Bytes::from_static(b"hello"),
            }],
        };
        assert_eq!(
            hex(&encode(&put)),
            concat!(
                "0000002e",
                "20",
                "00000001",
                "00000001",
                "000102030405060708090a0b0c0d0e0f",
                "0000000000000000",
                "00000000",
                "00000005",
                "68656c6c6f",
            )
        );
        assert_eq!(encoded_len(&put), 50);

        assert_eq!(hex(&encode(&Frame::Heartbeat)), "0000000140");
        assert_eq!(hex(&encode(&Frame::HeartbeatAck)), "0000000141");
        assert_eq!(hex(&encode(&Frame::StopResponse)), "0000000151");
        let ack = Frame::Ack {
            acks: vec![AckEntry {
                guid,
                status: Status::Ok,
                flags: crate::ACK_DURABLE,
            }],
        };
        assert_eq!(
            hex(&encode(&ack)),
            "000000182100000001000102030405060708090a0b0c0d0e0f000001"
        );
    }
}
