//! `tern server`: runs a broker node until SIGTERM/SIGINT, then stops gracefully.
//!
//! Settings come from, in order of precedence: flags, `TERN_*` environment variables,
//! the TOML file given by `--config`, built-in defaults. With no flags at all this is
//! a single-node cluster with data in `./tern-data`.

use anyhow::Context;
use clap::Args;
use std::net::SocketAddr;
use std::path::PathBuf;
use tern_broker::{Broker, BrokerConfig};

/// Options of `tern server`. Every knob has a default; units are in the names.
#[derive(Args, Debug, Default)]
pub struct ServerArgs {
    /// TOML file with any of the settings below (keys as in the flags, with `_` for `-`;
    /// queue defaults under `[queue_defaults]`).
    #[arg(long, env = "TERN_CONFIG")]
    pub config: Option<PathBuf>,
    /// This node's id in the cluster (>= 1). [default: 1]
    #[arg(long, env = "TERN_NODE_ID")]
    pub node_id: Option<u64>,
    /// Directory for logs, snapshots and state. [default: ./tern-data]
    #[arg(long, env = "TERN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Client protocol address. [default: 127.0.0.1:7450]
    #[arg(long, env = "TERN_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Admin HTTP address (/health /ready /metrics /v1/...). [default: 127.0.0.1:7451]
    #[arg(long, env = "TERN_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// Node-to-node address. [default: 127.0.0.1:7452]
    #[arg(long, env = "TERN_PEER_LISTEN")]
    pub peer_listen: Option<SocketAddr>,
    /// Initial members as `ID=HOST:PORT,ID=HOST:PORT,...` (peer addresses). [default: this node alone]
    #[arg(long, env = "TERN_INITIAL_CLUSTER", value_delimiter = ',')]
    pub initial_cluster: Option<Vec<String>>,
    /// Join an existing cluster (run `tern cluster add-node ID=HOST:PORT` first) instead
    /// of bootstrapping; --initial-cluster is then the founding member list.
    #[arg(long, env = "TERN_JOIN")]
    pub join: bool,
    /// Replicas per partition, capped by the cluster size. [default: 3]
    #[arg(long, env = "TERN_REPLICATION_FACTOR")]
    pub replication_factor: Option<usize>,
    /// Create queues with default settings on first use (true/false). [default: true]
    #[arg(long, env = "TERN_AUTO_CREATE_QUEUES")]
    pub auto_create_queues: Option<bool>,
    /// Largest frame accepted or sent, in bytes. [default: 16777216]
    #[arg(long, env = "TERN_MAX_FRAME_BYTES")]
    pub max_frame_bytes: Option<u32>,
    /// Client connections at once. [default: 10000]
    #[arg(long, env = "TERN_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Un-ACKed PUTs per connection before the server stops reading it. [default: 65536]
    #[arg(long, env = "TERN_MAX_INFLIGHT_PUTS_PER_CONN")]
    pub max_inflight_puts_per_conn: Option<usize>,
    /// Server-wide PUT payload bytes accepted and not yet ACKed; beyond it PUTs get `overloaded`. [default: 1073741824]
    #[arg(long, env = "TERN_MAX_PENDING_PUT_BYTES")]
    pub max_pending_put_bytes: Option<u64>,
    /// Commands queued to the node loop. [default: 65536]
    #[arg(long, env = "TERN_NODE_QUEUE_CAPACITY")]
    pub node_queue_capacity: Option<usize>,
    /// Largest batch of PUTs in one Raft entry, in bytes. [default: 4194304]
    #[arg(long, env = "TERN_MAX_ENTRY_BYTES")]
    pub max_entry_bytes: Option<u64>,
    /// Raft tick in ms (election timeout 10 ticks, heartbeat 2 ticks). [default: 100]
    #[arg(long, env = "TERN_TICK_INTERVAL_MS")]
    pub tick_interval_ms: Option<u64>,
    /// Client heartbeat interval in ms; silent for 3 intervals = dead. [default: 2000]
    #[arg(long, env = "TERN_HEARTBEAT_INTERVAL_MS")]
    pub heartbeat_interval_ms: Option<u32>,
    /// A PUT waiting for a partition leader gets `timeout` after this many ms. [default: 30000]
    #[arg(long, env = "TERN_PUT_TIMEOUT_MS")]
    pub put_timeout_ms: Option<u64>,
    /// Snapshot a partition and release settled segments every this many log bytes. [default: 268435456]
    #[arg(long, env = "TERN_SNAPSHOT_INTERVAL_BYTES")]
    pub snapshot_interval_bytes: Option<u64>,
    /// Log segment size in bytes. [default: 67108864]
    #[arg(long, env = "TERN_SEGMENT_MAX_BYTES")]
    pub segment_max_bytes: Option<u64>,
    /// In-memory tail cache per partition log, in bytes. [default: 67108864]
    #[arg(long, env = "TERN_LOG_CACHE_BYTES")]
    pub log_cache_bytes: Option<u64>,
    /// Refuse PUTs (`storage_full`) below this much free disk, in bytes. [default: 268435456]
    #[arg(long, env = "TERN_MIN_FREE_DISK_BYTES")]
    pub min_free_disk_bytes: Option<u64>,
    /// Graceful stop: wait this long for in-flight PUTs to drain, in ms. [default: 10000]
    #[arg(long, env = "TERN_STOP_TIMEOUT_MS")]
    pub stop_timeout_ms: Option<u64>,
    /// Default partitions of new queues. [default: 1]
    #[arg(long, env = "TERN_DEFAULT_PARTITIONS")]
    pub default_partitions: Option<u16>,
    /// Default max messages of new queues (per partition). [default: 10000000]
    #[arg(long, env = "TERN_DEFAULT_MAX_MESSAGES")]
    pub default_max_messages: Option<u64>,
    /// Default max payload bytes of new queues (per partition). [default: 4294967296]
    #[arg(long, env = "TERN_DEFAULT_MAX_BYTES")]
    pub default_max_bytes: Option<u64>,
    /// Default max size of one message, in bytes. [default: 4194304]
    #[arg(long, env = "TERN_DEFAULT_MAX_MESSAGE_BYTES")]
    pub default_max_message_bytes: Option<u32>,
    /// Default dedup window of new queues, in ms. [default: 300000]
    #[arg(long, env = "TERN_DEFAULT_DEDUP_WINDOW_MS")]
    pub default_dedup_window_ms: Option<u64>,
    /// Log filter (tracing env-filter syntax, e.g. `info`, `tern_broker=debug`). [default: info]
    #[arg(long, env = "TERN_LOG")]
    pub log: Option<String>,
}

impl ServerArgs {
    /// Defaults, then the TOML file, then flags and environment.
    pub fn to_config(&self) -> anyhow::Result<BrokerConfig> {
        let mut c = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("cannot read config file {}", path.display()))?;
                toml::from_str::<BrokerConfig>(&text)
                    .with_context(|| format!("invalid config file {}", path.display()))?
            }
            None => BrokerConfig::default(),
        };
        macro_rules! set {
            ($($field:ident),*) => { $( if let Some(v) = &self.$field { c.$field = v.clone(); } )* };
        }
        set!(
            node_id,
            data_dir,
            listen,
            http_listen,
            peer_listen,
            initial_cluster,
            replication_factor,
            auto_create_queues
        );
        c.join = c.join || self.join;
        set!(
            max_frame_bytes,
            max_connections,
            max_inflight_puts_per_conn,
            max_pending_put_bytes
        );
        set!(
            node_queue_capacity,
            max_entry_bytes,
            tick_interval_ms,
            heartbeat_interval_ms,
            put_timeout_ms
        );
        set!(
            snapshot_interval_bytes,
            segment_max_bytes,
            log_cache_bytes,
            min_free_disk_bytes,
            stop_timeout_ms
        );
        let d = &mut c.queue_defaults;
        if let Some(v) = self.default_partitions {
            d.partitions = v;
        }
        if let Some(v) = self.default_max_messages {
            d.max_messages = v;
        }
        if let Some(v) = self.default_max_bytes {
            d.max_bytes = v;
        }
        if let Some(v) = self.default_max_message_bytes {
            d.max_message_bytes = v;
        }
        if let Some(v) = self.default_dedup_window_ms {
            d.dedup_window_ms = v;
        }
        c.validate()?;
        Ok(c)
    }
}

pub fn run(args: ServerArgs) -> anyhow::Result<()> {
    let filter = args.log.clone().unwrap_or_else(|| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&filter).context("invalid --log filter")?,
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
    let config = args.to_config()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("tern-io")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(serve(config))
}

async fn serve(config: BrokerConfig) -> anyhow::Result<()> {
    let data_dir = config.data_dir.clone();
    let mut broker = Broker::start(config)
        .await
        .with_context(|| format!("cannot start the broker (data dir {})", data_dir.display()))?;
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("cannot install the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: stopping gracefully"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: stopping gracefully"),
        err = broker.wait_failed() => {
            return Err(anyhow::Error::new(err).context("the node stopped after a fatal error"));
        }
    }
    broker.stop().await.context("graceful stop failed")?;
    tracing::info!("stopped");
    Ok(())
}
