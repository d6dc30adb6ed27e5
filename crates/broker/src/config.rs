//! Broker configuration: every bound the server enforces, with its default and unit.
//!
//! The CLI fills this from flags, `TERN_*` environment variables and a TOML file
//! (in that order of precedence). Field names are the TOML keys.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// This node's id in the cluster (never 0).
    pub node_id: u64,
    /// Where logs, snapshots and state files live.
    pub data_dir: PathBuf,
    /// Client protocol listener.
    pub listen: SocketAddr,
    /// Admin HTTP listener (/health, /ready, /metrics, /v1/...).
    pub http_listen: SocketAddr,
    /// Node-to-node listener.
    pub peer_listen: SocketAddr,
    /// `id=host:port` (peer address) of every initial member; empty = a single-node
    /// cluster of this node.
    pub initial_cluster: Vec<String>,
    /// This node joins an existing cluster (after `tern cluster add-node`): it does not
    /// bootstrap; `initial_cluster` is the founding member list, which names the
    /// cluster and gives the first peers to contact.
    pub join: bool,
    /// Replicas per partition (capped by the cluster size).
    pub replication_factor: usize,
    /// Create a queue with default settings when a client first opens it.
    pub auto_create_queues: bool,
    /// Defaults for queues created without explicit settings.
    pub queue_defaults: QueueDefaults,
    /// Largest frame accepted or sent on client connections, in bytes.
    pub max_frame_bytes: u32,
    /// Client connections accepted at once; more are refused with an error frame.
    pub max_connections: usize,
    /// PUTs from one connection waiting for their ACK; beyond it the server stops
    /// reading that socket (TCP back-pressure) until ACKs go out.
    pub max_inflight_puts_per_conn: usize,
    /// Server-wide bound on PUT payload bytes accepted but not yet ACKed; beyond it PUTs
    /// are answered `overloaded`.
    pub max_pending_put_bytes: u64,
    /// Commands queued to the node loop; senders wait when it is full.
    pub node_queue_capacity: usize,
    /// Largest batch of PUTs written as one Raft entry, in bytes.
    pub max_entry_bytes: u64,
    /// Raft tick interval in ms (election timeout = 10 ticks, heartbeat = 2 ticks).
    pub tick_interval_ms: u64,
    /// Client heartbeat interval in ms; a client silent for 3 intervals is disconnected.
    pub heartbeat_interval_ms: u32,
    /// A PUT waiting for a partition leader is answered `timeout` after this many ms.
    pub put_timeout_ms: u64,
    /// Snapshot a partition (and release settled log segments) after this many log bytes.
    pub snapshot_interval_bytes: u64,
    /// Log segment size in bytes.
    pub segment_max_bytes: u64,
    /// In-memory tail cache of each partition log, in bytes (recent payloads served from memory).
    pub log_cache_bytes: u64,
    /// PUTs are answered `storage_full` while the data dir's free space is below this.
    pub min_free_disk_bytes: u64,
    /// Graceful stop: how long to wait for in-flight PUTs and CONFIRMs to drain, in ms.
    pub stop_timeout_ms: u64,
}

/// Default settings of new queues (each can be overridden per queue on create).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueDefaults {
    pub partitions: u16,
    pub max_messages: u64,
    pub max_bytes: u64,
    pub max_message_bytes: u32,
    pub dedup_window_ms: u64,
    pub dedup_max_entries: u64,
}

impl Default for QueueDefaults {
    fn default() -> Self {
        QueueDefaults {
            partitions: 1,
            max_messages: 10_000_000,
            max_bytes: 4 * 1024 * 1024 * 1024,
            max_message_bytes: 4 * 1024 * 1024,
            dedup_window_ms: 5 * 60 * 1000,
            dedup_max_entries: 1_000_000,
        }
    }
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            node_id: 1,
            data_dir: PathBuf::from("./tern-data"),
            listen: SocketAddr::from(([127, 0, 0, 1], 7450)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 7451)),
            peer_listen: SocketAddr::from(([127, 0, 0, 1], 7452)),
            initial_cluster: Vec::new(),
            join: false,
            replication_factor: 3,
            auto_create_queues: true,
            queue_defaults: QueueDefaults::default(),
            max_frame_bytes: tern_proto::DEFAULT_MAX_FRAME_BYTES,
            max_connections: 10_000,
            max_inflight_puts_per_conn: 65_536,
            max_pending_put_bytes: 1024 * 1024 * 1024,
            node_queue_capacity: 65_536,
            max_entry_bytes: 4 * 1024 * 1024,
            tick_interval_ms: 100,
            heartbeat_interval_ms: 2_000,
            put_timeout_ms: 30_000,
            snapshot_interval_bytes: 256 * 1024 * 1024,
            segment_max_bytes: 64 * 1024 * 1024,
            log_cache_bytes: 64 * 1024 * 1024,
            min_free_disk_bytes: 256 * 1024 * 1024,
            stop_timeout_ms: 10_000,
        }
    }
}

/// A configuration that cannot work, with the reason.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl BrokerConfig {
    /// Rejects contradictory or out-of-range settings before anything starts.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError(m));
        if self.node_id == 0 {
            return bad("node_id must be at least 1".into());
        }
        if self.max_frame_bytes < 1024 {
            return bad("max_frame_bytes must be at least 1024".into());
        }
        if u64::from(self.queue_defaults.max_message_bytes) + 1024 > u64::from(self.max_frame_bytes)
        {
            return bad(format!(
                "queue max_message_bytes ({}) must leave room for headers in max_frame_bytes ({})",
                self.queue_defaults.max_message_bytes, self.max_frame_bytes
            ));
        }
        if self.max_entry_bytes < u64::from(self.queue_defaults.max_message_bytes) {
            return bad("max_entry_bytes must be at least queue max_message_bytes".into());
        }
        if self.tick_interval_ms == 0 || self.heartbeat_interval_ms == 0 {
            return bad("tick_interval_ms and heartbeat_interval_ms must be positive".into());
        }
        if self.queue_defaults.partitions == 0 || self.queue_defaults.partitions > 1024 {
            return bad("queue partitions must be in 1..=1024".into());
        }
        if self.segment_max_bytes < 1024 * 1024 {
            return bad("segment_max_bytes must be at least 1 MiB".into());
        }
        if self.max_connections == 0
            || self.node_queue_capacity == 0
            || self.max_inflight_puts_per_conn == 0
        {
            return bad("max_connections, node_queue_capacity and max_inflight_puts_per_conn must be positive".into());
        }
        let members = self.members()?;
        if self.join && members.is_empty() {
            return bad("--join needs --initial-cluster: the founding members to contact".into());
        }
        if self.join && members.iter().any(|(id, _)| *id == self.node_id) {
            return bad(format!(
                "--join: node id {} is a founding member; a joining node needs a new id",
                self.node_id
            ));
        }
        if !self.join && !members.is_empty() && !members.iter().any(|(id, _)| *id == self.node_id) {
            return bad(format!(
                "--initial-cluster does not list this node's id {}",
                self.node_id
            ));
        }
        if self.replication_factor == 0 {
            return bad("replication_factor must be at least 1".into());
        }
        Ok(())
    }

    /// The initial members as (node id, peer address), sorted by id; empty = single node.
    pub fn members(&self) -> Result<Vec<(u64, String)>, ConfigError> {
        let mut out: Vec<(u64, String)> = Vec::new();
        for item in &self.initial_cluster {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let Some((id, addr)) = item.split_once('=') else {
                return Err(ConfigError(format!(
                    "--initial-cluster entry {item:?} is not ID=HOST:PORT"
                )));
            };
            let id: u64 = id.trim().parse().map_err(|_| {
                ConfigError(format!(
                    "--initial-cluster entry {item:?}: {id:?} is not a node id"
                ))
            })?;
            if id == 0 {
                return Err(ConfigError("node ids start at 1".into()));
            }
            let addr = addr.trim();
            if addr
                .rsplit_once(':')
                .and_then(|(_, p)| p.parse::<u16>().ok())
                .is_none()
            {
                return Err(ConfigError(format!(
                    "--initial-cluster entry {item:?}: {addr:?} is not HOST:PORT"
                )));
            }
            if out.iter().any(|(other, _)| *other == id) {
                return Err(ConfigError(format!(
                    "--initial-cluster lists node {id} twice"
                )));
            }
            out.push((id, addr.to_string()));
        }
        out.sort();
        Ok(out)
    }

    /// Ids of the initial members (just this node for a single-node cluster; none for
    /// a joining node, which starts without a configuration).
    pub fn member_ids(&self) -> Vec<u64> {
        if self.join {
            return Vec::new();
        }
        match self.members() {
            Ok(m) if !m.is_empty() => m.into_iter().map(|(id, _)| id).collect(),
            _ => vec![self.node_id],
        }
    }
}
