//! Prometheus metrics (`/metrics`). Families are cheap to clone and update from any thread;
//! the node loop updates them, the admin HTTP task encodes them.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::Mutex;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct PartitionLabels {
    pub queue: String,
    pub partition: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SubscriptionLabels {
    pub queue: String,
    pub partition: String,
    pub subscription: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub queue: String,
    pub status: String,
}

pub struct Metrics {
    pub puts: Family<QueueLabels, Counter>,
    pub acks: Family<StatusLabels, Counter>,
    pub pushes: Family<QueueLabels, Counter>,
    pub confirms: Family<QueueLabels, Counter>,
    pub depth: Family<PartitionLabels, Gauge>,
    pub in_flight: Family<PartitionLabels, Gauge>,
    pub queue_bytes: Family<PartitionLabels, Gauge>,
    pub consumers: Family<PartitionLabels, Gauge>,
    pub log_disk_bytes: Family<PartitionLabels, Gauge>,
    pub sub_depth: Family<SubscriptionLabels, Gauge>,
    pub sub_lag: Family<SubscriptionLabels, Gauge>,
    pub sub_dead_lettered: Family<SubscriptionLabels, Gauge>,
    pub sub_dropped: Family<SubscriptionLabels, Gauge>,
    pub ack_latency: Histogram,
    pub fsync_latency: Histogram,
    pub entries_proposed: Counter,
    pub connections: Gauge,
    /// PUT messages accepted and not yet answered.
    pub pending_puts: Gauge,
    registry: Mutex<Registry>,
}

impl Metrics {
    pub fn new() -> Metrics {
        let m = Metrics {
            puts: Family::default(),
            acks: Family::default(),
            pushes: Family::default(),
            confirms: Family::default(),
            depth: Family::default(),
            in_flight: Family::default(),
            queue_bytes: Family::default(),
            consumers: Family::default(),
            log_disk_bytes: Family::default(),
            sub_depth: Family::default(),
            sub_lag: Family::default(),
            sub_dead_lettered: Family::default(),
            sub_dropped: Family::default(),
            // 50 µs .. ~26 s
            ack_latency: Histogram::new(exponential_buckets(0.00005, 2.0, 20)),
            // 10 µs .. ~5 s
            fsync_latency: Histogram::new(exponential_buckets(0.00001, 2.0, 20)),
            entries_proposed: Counter::default(),
            connections: Gauge::default(),
            pending_puts: Gauge::default(),
            registry: Mutex::new(Registry::with_prefix("tern")),
        };
        m.register();
        m
    }

    fn register(&self) {
        let Ok(mut r) = self.registry.lock() else {
            return;
        };
        r.register("puts", "PUT messages received", self.puts.clone());
        r.register("acks", "ACKs sent, by status", self.acks.clone());
        r.register(
            "pushes",
            "messages PUSHed to consumers",
            self.pushes.clone(),
        );
        r.register("confirms", "CONFIRMs committed", self.confirms.clone());
        r.register("queue_depth", "unsettled messages", self.depth.clone());
        r.register(
            "queue_in_flight",
            "messages PUSHed and not yet confirmed",
            self.in_flight.clone(),
        );
        r.register(
            "queue_bytes",
            "payload bytes of unsettled messages",
            self.queue_bytes.clone(),
        );
        r.register(
            "queue_consumers",
            "consumers attached",
            self.consumers.clone(),
        );
        r.register(
            "log_disk_bytes",
            "bytes of log segments on disk",
            self.log_disk_bytes.clone(),
        );
        r.register(
            "subscription_depth",
            "unsettled messages per subscription (\"\" = work queue)",
            self.sub_depth.clone(),
        );
        r.register(
            "subscription_lag",
            "consumer lag per subscription: seqs from its oldest unsettled message to the newest",
            self.sub_lag.clone(),
        );
        r.register(
            "subscription_dead_lettered",
            "messages dead-lettered per subscription (since the partition was created)",
            self.sub_dead_lettered.clone(),
        );
        r.register(
            "subscription_dropped",
            "messages dropped by fan-out retention per subscription",
            self.sub_dropped.clone(),
        );
        r.register(
            "ack_latency_seconds",
            "PUT received to ACK sent",
            self.ack_latency.clone(),
        );
        r.register(
            "fsync_latency_seconds",
            "log fdatasync duration",
            self.fsync_latency.clone(),
        );
        r.register(
            "raft_entries_proposed",
            "Raft entries proposed (batches)",
            self.entries_proposed.clone(),
        );
        r.register(
            "client_connections",
            "open client connections",
            self.connections.clone(),
        );
        r.register(
            "pending_puts",
            "PUT messages accepted and not yet ACKed",
            self.pending_puts.clone(),
        );
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(r) = self.registry.lock() {
            let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        }
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// PUT messages received and not yet answered, from the counters (used by graceful stop).
    pub fn pending_puts(&self) -> u64 {
        self.pending_puts.get() as u64
    }
}
