//! Status codes carried by ACK, CONFIRM-ACK, responses and errors.

/// Outcome of a request. Numeric values are part of the wire protocol and never reused.
///
/// `Ok` is the only success. Everything else says *why* and, for PUTs, whether the
/// message certainly was not stored (`certain_failure`) or the outcome is unknown
/// (`Timeout`): a producer may retry an unknown outcome with the same GUID and the
/// dedup history returns the real one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum Status {
    /// Success. For a PUT: committed (and, for durable queues, fsynced) by a quorum.
    Ok = 0,
    /// The named queue does not exist (and auto-create is off).
    UnknownQueue = 10,
    /// `queue create` for a name that exists with different settings.
    QueueExists = 11,
    /// A request field is invalid (bad name, contradictory settings, bad TTL, ...).
    InvalidArgument = 12,
    /// The payload is larger than the queue's (or the server's) per-message limit.
    MessageTooLarge = 13,
    /// The queue's max messages or max bytes quota would be exceeded.
    QuotaExceeded = 14,
    /// The server's bound on buffered memory or in-flight requests is reached; retry later.
    Overloaded = 15,
    /// The outcome is unknown: a time bound passed before the outcome was known.
    Timeout = 16,
    /// No leader is available for the partition right now; retry later.
    Unavailable = 17,
    /// The node is stopping; send to another node.
    Stopping = 18,
    /// A malformed frame or a frame that is not allowed in this state.
    ProtocolError = 19,
    /// The client's protocol version is not supported.
    UnsupportedVersion = 20,
    /// CONFIRM / NACK for a message that this consumer does not hold.
    UnknownMessage = 21,
    /// The disk is full (below the configured free-space reserve).
    StorageFull = 22,
    /// An internal error (storage failure); details in the message.
    Internal = 23,
    /// The queue handle is not open on this connection.
    UnknownHandle = 24,
}

impl Status {
    /// Decodes a wire value; unknown values map to `None` (the caller reports a protocol error).
    pub fn from_u16(v: u16) -> Option<Status> {
        use Status::*;
        Some(match v {
            0 => Ok,
            10 => UnknownQueue,
            11 => QueueExists,
            12 => InvalidArgument,
            13 => MessageTooLarge,
            14 => QuotaExceeded,
            15 => Overloaded,
            16 => Timeout,
            17 => Unavailable,
            18 => Stopping,
            19 => ProtocolError,
            20 => UnsupportedVersion,
            21 => UnknownMessage,
            22 => StorageFull,
            23 => Internal,
            24 => UnknownHandle,
            _ => return None,
        })
    }

    pub fn as_u16(self) -> u16 {
        self as u16
    }

    /// The stable lower-case name used in CLI JSON output (`"status":"quota_exceeded"`).
    pub fn name(self) -> &'static str {
        use Status::*;
        match self {
            Ok => "ok",
            UnknownQueue => "unknown_queue",
            QueueExists => "queue_exists",
            InvalidArgument => "invalid_argument",
            MessageTooLarge => "message_too_large",
            QuotaExceeded => "quota_exceeded",
            Overloaded => "overloaded",
            Timeout => "timeout",
            Unavailable => "unavailable",
            Stopping => "stopping",
            ProtocolError => "protocol_error",
            UnsupportedVersion => "unsupported_version",
            UnknownMessage => "unknown_message",
            StorageFull => "storage_full",
            Internal => "internal",
            UnknownHandle => "unknown_handle",
        }
    }

    /// True when a PUT with this status certainly was not enqueued (so a retry
    /// with a new GUID cannot duplicate it). `Timeout` is *unknown*, not failed.
    pub fn certain_failure(self) -> bool {
        !matches!(self, Status::Ok | Status::Timeout)
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
