//! JSON bodies of [`Frame::AdminRequest`](crate::Frame::AdminRequest) and
//! [`Frame::AdminResponse`](crate::Frame::AdminResponse).
//!
//! Admin operations are rare and not on the data path, so they travel as JSON:
//! easy to extend, easy to implement in another language. The same shapes are
//! served by the admin HTTP API (`/v1/queues`, `/v1/queues/{name}`).

use serde::{Deserialize, Serialize};

/// An admin request. Serialized with an `"op"` tag, e.g. `{"op":"list_queues"}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum AdminRequest {
    CreateQueue { name: String, #[serde(default)] spec: QueueSpec },
    DeleteQueue { name: String },
    PurgeQueue { name: String },
    ListQueues,
    QueueStats { name: String },
    ClusterStatus,
}

/// Queue settings. Every field is optional on create; unset fields take the
/// server's defaults, and the server answers with the effective settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QueueSpec {
    /// `"work"` (each message to one consumer) or `"fanout"` (each subscription gets every message).
    pub mode: Option<String>,
    /// `"durable"` (fsync before ACK) or `"memory"` (transient).
    pub storage: Option<String>,
    pub partitions: Option<u16>,
    pub max_messages: Option<u64>,
    pub max_bytes: Option<u64>,
    pub max_message_bytes: Option<u32>,
    pub dedup_window_ms: Option<u64>,
    pub visibility_timeout_ms: Option<u64>,
    pub max_delivery_attempts: Option<u32>,
    pub dead_letter_queue: Option<String>,
    pub default_ttl_ms: Option<u64>,
    pub max_ttl_ms: Option<u64>,
    pub retention_max_age_ms: Option<u64>,
    pub retention_max_bytes: Option<u64>,
}

/// Effective settings and live figures of one queue.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct QueueInfo {
    pub name: String,
    pub spec: QueueSpec,
    /// Unsettled messages over all partitions.
    pub depth: u64,
    pub bytes: u64,
    pub in_flight: u64,
    pub consumers: u64,
    pub oldest_age_ms: Option<u64>,
    pub partitions: Vec<PartitionInfo>,
}

/// Live figures of one partition of a queue.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PartitionInfo {
    pub partition: u16,
    pub leader: Option<u64>,
    pub depth: u64,
    pub bytes: u64,
    pub in_flight: u64,
    pub oldest_age_ms: Option<u64>,
    pub commit_index: u64,
    pub applied_index: u64,
    pub log_first_index: u64,
    pub log_disk_bytes: u64,
    pub puts_enqueued: u64,
    pub puts_duplicate: u64,
    pub puts_rejected: u64,
    pub confirms: u64,
    pub purged: u64,
}

/// Body of a successful AdminResponse, by request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AdminReply {
    Queue(QueueInfo),
    Queues { queues: Vec<QueueInfo> },
    Done { done: bool },
    Cluster(serde_json::Value),
}

/// Body of a failed AdminResponse.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdminErrorBody {
    pub error: String,
}
