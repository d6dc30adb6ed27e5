//! Frame types. One enum variant per frame type; the `u8` type codes are wire-stable.

use crate::{Guid, Status};
use bytes::Bytes;

/// `OpenQueue.flags` bit: the handle will PUT.
pub const OPEN_PRODUCER: u8 = 0b01;
/// `OpenQueue.flags` bit: the handle consumes (the server PUSHes to it).
pub const OPEN_CONSUMER: u8 = 0b10;

/// `AckEntry.flags` bit: the message is stored durably (fsynced by a quorum).
/// Clear on an `ok` ACK means it is held in memory only (transient queue).
pub const ACK_DURABLE: u8 = 0b01;

/// One message inside a PUT frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutMessage {
    pub guid: Guid,
    /// Time to live in ms; 0 = the queue's default.
    pub ttl_ms: u64,
    /// Partitioning key; empty = none (the server spreads such messages).
    pub key: Bytes,
    pub payload: Bytes,
}

/// The outcome of one PUT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AckEntry {
    pub guid: Guid,
    pub status: Status,
    /// See [`ACK_DURABLE`].
    pub flags: u8,
}

/// One message delivered to a consumer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushMessage {
    pub guid: Guid,
    pub partition: u16,
    /// 1 on first delivery, raised on every redelivery.
    pub attempt: u32,
    pub payload: Bytes,
    /// Set when the message comes from a dead-letter queue: where and why it died.
    pub dead_letter: Option<DeadLetterInfo>,
}

/// Why a message was moved to a dead-letter queue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeadLetterReason {
    /// It reached the source queue's `max_delivery_attempts` without a CONFIRM.
    MaxAttempts = 1,
    /// Its TTL passed (the source queue dead-letters expired messages).
    Expired = 2,
}

impl DeadLetterReason {
    pub fn name(self) -> &'static str {
        match self {
            DeadLetterReason::MaxAttempts => "max_attempts",
            DeadLetterReason::Expired => "expired",
        }
    }
}

/// Where a dead-lettered message came from; delivered with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeadLetterInfo {
    pub source_queue: String,
    /// "" for a work queue.
    pub subscription: String,
    pub reason: DeadLetterReason,
    /// Failed delivery attempts before it was dead-lettered.
    pub attempts: u32,
    /// Its GUID in the source queue.
    pub original_guid: Guid,
}

/// Names a delivered message for CONFIRM: the GUID plus the partition it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MessageRef {
    pub guid: Guid,
    pub partition: u16,
}

/// Outcome of one CONFIRM.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfirmAckEntry {
    pub guid: Guid,
    pub status: Status,
}

/// NACK of one message: give it back now (`delay_ms == 0`) or after a delay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NackEntry {
    pub guid: Guid,
    pub partition: u16,
    pub delay_ms: u32,
}

/// Extend the visibility timeout of a message the consumer is still working on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExtendEntry {
    pub guid: Guid,
    pub partition: u16,
    pub extra_ms: u32,
}

/// Every frame of protocol version 1. See `docs/protocol.md` for the byte layout.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// 0x01 client→server, first frame on a connection.
    Hello { version: u16, client_name: String },
    /// 0x02 server→client.
    HelloOk {
        version: u16,
        node_id: u64,
        max_frame_bytes: u32,
        heartbeat_interval_ms: u32,
    },
    /// 0x10 client→server.
    OpenQueue {
        req_id: u32,
        queue: String,
        /// "" for work queues; the subscription name for fanout queues.
        subscription: String,
        flags: u8,
        max_unconfirmed_msgs: u32,
        max_unconfirmed_bytes: u64,
    },
    /// 0x11 server→client.
    OpenQueueOk {
        req_id: u32,
        queue_id: u32,
        partitions: u16,
    },
    /// 0x12 client→server.
    CloseQueue { req_id: u32, queue_id: u32 },
    /// 0x13 server→client.
    CloseQueueOk { req_id: u32 },
    /// 0x14 client→server: change a consumer handle's flow control.
    Configure {
        req_id: u32,
        queue_id: u32,
        max_unconfirmed_msgs: u32,
        max_unconfirmed_bytes: u64,
    },
    /// 0x15 server→client.
    ConfigureOk { req_id: u32 },
    /// 0x20 client→server: one or more messages.
    Put {
        queue_id: u32,
        messages: Vec<PutMessage>,
    },
    /// 0x21 server→client: one or more PUT outcomes (any order, each GUID exactly once).
    Ack { acks: Vec<AckEntry> },
    /// 0x30 server→client: one or more messages for a consumer handle.
    Push {
        queue_id: u32,
        messages: Vec<PushMessage>,
    },
    /// 0x31 client→server.
    Confirm {
        queue_id: u32,
        messages: Vec<MessageRef>,
    },
    /// 0x32 server→client: the committed outcome of CONFIRMs.
    ConfirmAck {
        queue_id: u32,
        entries: Vec<ConfirmAckEntry>,
    },
    /// 0x33 client→server.
    Nack {
        queue_id: u32,
        entries: Vec<NackEntry>,
    },
    /// 0x34 client→server.
    Extend {
        queue_id: u32,
        entries: Vec<ExtendEntry>,
    },
    /// 0x40 either direction.
    Heartbeat,
    /// 0x41 answer to Heartbeat.
    HeartbeatAck,
    /// 0x50 either direction: "I am stopping; send me no new PUTs; ACKs and CONFIRMs still flow".
    StopRequest { drain_timeout_ms: u32 },
    /// 0x51 answer to StopRequest.
    StopResponse,
    /// 0x60 client→server: administrative request; `body` is a JSON object (see docs).
    AdminRequest { req_id: u32, body: Bytes },
    /// 0x61 server→client.
    AdminResponse {
        req_id: u32,
        status: Status,
        body: Bytes,
    },
    /// 0x7F server→client: a request failed (`req_id` != 0) or the connection is being
    /// closed because of a protocol error (`req_id` == 0).
    Error {
        req_id: u32,
        status: Status,
        message: String,
    },
}

impl Frame {
    /// The wire type code of this frame.
    pub fn type_code(&self) -> u8 {
        match self {
            Frame::Hello { .. } => 0x01,
            Frame::HelloOk { .. } => 0x02,
            Frame::OpenQueue { .. } => 0x10,
            Frame::OpenQueueOk { .. } => 0x11,
            Frame::CloseQueue { .. } => 0x12,
            Frame::CloseQueueOk { .. } => 0x13,
            Frame::Configure { .. } => 0x14,
            Frame::ConfigureOk { .. } => 0x15,
            Frame::Put { .. } => 0x20,
            Frame::Ack { .. } => 0x21,
            Frame::Push { .. } => 0x30,
            Frame::Confirm { .. } => 0x31,
            Frame::ConfirmAck { .. } => 0x32,
            Frame::Nack { .. } => 0x33,
            Frame::Extend { .. } => 0x34,
            Frame::Heartbeat => 0x40,
            Frame::HeartbeatAck => 0x41,
            Frame::StopRequest { .. } => 0x50,
            Frame::StopResponse => 0x51,
            Frame::AdminRequest { .. } => 0x60,
            Frame::AdminResponse { .. } => 0x61,
            Frame::Error { .. } => 0x7F,
        }
    }
}
