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
// Admin messages are rare and short-lived; boxing would only complicate the
// shared types' construction and pattern matching for no measurable gain.
#[allow(clippy::large_enum_variant)]
pub enum AdminRequest {
    CreateQueue {
        name: String,
        #[serde(default)]
        spec: QueueSpec,
    },
    DeleteQueue {
        name: String,
    },
    PurgeQueue {
        name: String,
    },
    ListQueues,
    QueueStats {
        name: String,
    },
    /// Fan-out: creates a named subscription; it receives messages PUT from now on.
    CreateSubscription {
        queue: String,
        name: String,
    },
    /// Fan-out: deletes a subscription; messages only it still needed are released.
    DeleteSubscription {
        queue: String,
        name: String,
    },
    ClusterStatus,
    /// Adds a node (by id and peer address); replicas it wins by placement move to it.
    AddNode {
        id: u64,
        peer_addr: String,
    },
    /// Removes a node; its replicas move to the remaining nodes first.
    RemoveNode {
        id: u64,
    },
}

/// Queue settings. Every field is optional on create; unset fields take the
/// server's defaults, and the server answers with the effective settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct QueueSpec {
    /// `"work"` (each message to one consumer) or `"fanout"` (each subscription gets every message).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// `"durable"` (fsync before ACK) or `"memory"` (transient).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub storage: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partitions: Option<u16>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_messages: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_bytes: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_message_bytes: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dedup_window_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub visibility_timeout_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_delivery_attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_queue: Option<String>,
    /// Expired messages go to the dead-letter queue instead of being dropped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_letter_expired: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_ttl_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_ttl_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retention_max_age_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
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
    /// NACKed with a delay that has not passed yet.
    #[serde(default)]
    pub delayed: u64,
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
    /// Messages removed because their TTL passed.
    #[serde(default)]
    pub expired: u64,
    /// Messages moved to the dead-letter queue (or discarded when there is none).
    #[serde(default)]
    pub dead_lettered: u64,
    /// Waiting to be written to the dead-letter queue.
    #[serde(default)]
    pub dead_letter_due: u64,
    /// Fan-out: messages dropped by the retention limits.
    #[serde(default)]
    pub dropped: u64,
    /// Per subscription ("" for a work queue), as seen by the partition's leader.
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionInfo>,
}

/// Live figures of one subscription in one partition.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SubscriptionInfo {
    pub name: String,
    /// Messages this subscription has not settled yet.
    pub depth: u64,
    pub bytes: u64,
    /// Consumer lag: sequence numbers from its oldest unsettled message to the newest
    /// message in the partition (0 = caught up).
    pub lag: u64,
    pub in_flight: u64,
    pub delayed: u64,
    pub dead_letter_due: u64,
    pub oldest_age_ms: Option<u64>,
    pub consumers: u64,
    pub confirmed: u64,
    pub dead_lettered: u64,
    pub expired: u64,
    pub dropped: u64,
}

/// Body of a successful AdminResponse, by request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
// See `AdminRequest`: off the data path, so the size difference does not matter.
#[allow(clippy::large_enum_variant)]
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The request examples of docs/protocol.md §7 parse into the intended ops.
    #[test]
    fn documented_requests_parse() {
        let cases = [
            (
                r#"{"op":"create_queue","name":"orders","spec":{"partitions":2}}"#,
                AdminRequest::CreateQueue {
                    name: "orders".into(),
                    spec: QueueSpec {
                        partitions: Some(2),
                        ..Default::default()
                    },
                },
            ),
            (
                r#"{"op":"create_queue","name":"orders"}"#,
                AdminRequest::CreateQueue {
                    name: "orders".into(),
                    spec: QueueSpec::default(),
                },
            ),
            (
                r#"{"op":"delete_queue","name":"orders"}"#,
                AdminRequest::DeleteQueue {
                    name: "orders".into(),
                },
            ),
            (
                r#"{"op":"purge_queue","name":"orders"}"#,
                AdminRequest::PurgeQueue {
                    name: "orders".into(),
                },
            ),
            (r#"{"op":"list_queues"}"#, AdminRequest::ListQueues),
            (
                r#"{"op":"queue_stats","name":"orders"}"#,
                AdminRequest::QueueStats {
                    name: "orders".into(),
                },
            ),
            (r#"{"op":"cluster_status"}"#, AdminRequest::ClusterStatus),
            (
                r#"{"op":"add_node","id":4,"peer_addr":"10.0.0.4:7452"}"#,
                AdminRequest::AddNode {
                    id: 4,
                    peer_addr: "10.0.0.4:7452".into(),
                },
            ),
            (
                r#"{"op":"remove_node","id":1}"#,
                AdminRequest::RemoveNode { id: 1 },
            ),
        ];
        for (json, want) in cases {
            let got: AdminRequest = serde_json::from_str(json).expect(json);
            assert_eq!(got, want, "{json}");
        }
        assert!(serde_json::from_str::<AdminRequest>(r#"{"op":"nope"}"#).is_err());
    }

    /// The untagged reply shapes of §7 come back as the right variant.
    #[test]
    fn documented_replies_parse() {
        let info = QueueInfo {
            name: "orders".into(),
            spec: QueueSpec {
                partitions: Some(1),
                ..Default::default()
            },
            partitions: vec![PartitionInfo {
                partition: 0,
                leader: Some(1),
                ..Default::default()
            }],
            ..Default::default()
        };
        let json = serde_json::to_string(&AdminReply::Queue(info.clone())).expect("serialize");
        assert_eq!(
            serde_json::from_str::<AdminReply>(&json).expect("parse"),
            AdminReply::Queue(info.clone())
        );
        let json = serde_json::to_string(&AdminReply::Queues {
            queues: vec![info.clone()],
        })
        .expect("serialize");
        assert_eq!(
            serde_json::from_str::<AdminReply>(&json).expect("parse"),
            AdminReply::Queues { queues: vec![info] }
        );
        assert_eq!(
            serde_json::from_str::<AdminReply>(r#"{"done":true}"#).expect("parse"),
            AdminReply::Done { done: true }
        );
        let cluster = r#"{"node_id":1,"nodes":[],"metadata":{"leader":1,"term":2,"commit_index":7},"partitions":[]}"#;
        assert!(matches!(
            serde_json::from_str::<AdminReply>(cluster).expect("parse"),
            AdminReply::Cluster(_)
        ));
        let err: AdminErrorBody =
            serde_json::from_str(r#"{"error":"no queue named \"nope\""}"#).expect("parse");
        assert_eq!(err.error, "no queue named \"nope\"");
    }
}
